//! `cargo xtask bench`: xdplb's data plane beside baselines measured in the
//! same run, printed as tables and written to `docs/BENCHMARKS.md` with PNG
//! charts next to it.
//!
//! - §1 cost per packet: every case on the XDP and TC entry points, IPv4 and
//!   IPv6, beside an empty XDP program and a MAC-swap XDP_TX program loaded
//!   from the same object ([`dataplane`]).
//! - §2 cost against table sizes: CONNS entries and backends per service.
//! - §3 forwarding rate in live-frames mode on a veth pair ([`live`]).
//!
//! These machines are noisy, so the ratio to the baseline is the headline.
//! Nothing here is a test assertion: targets are printed beside results.

mod attack;
mod charts;
mod control;
mod dataplane;
mod e2e;
mod live;
mod memory;
mod report;
mod scrape;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use tests::packet::{Hook, PacketLab};

use crate::{
    charts::{Bar, Series, BASELINE, XDPLB, XDPLB_TC},
    dataplane::{CostResults, ScalePoint, Stats, COST_LAB_CONNS, ESTABLISHED_V4, NEW_FLOW_V4},
    e2e::{Balancer, Load},
    live::{LiveResults, Rate},
    report::{ratio, verdict, Table},
};

struct Args {
    quick: bool,
    runs: usize,
    out: PathBuf,
    write: bool,
    e2e: bool,
    /// `--only`: the sections to run; `None`: all of them.
    only: Option<Vec<Section>>,
}

/// The parts `--only` can pick.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    /// §1–3: cost per packet, table sizes, live frames.
    Dataplane,
    /// §4: end to end against HAProxy.
    E2e,
    /// §5: control-plane timings against HAProxy.
    Control,
    /// §6: memory.
    Memory,
    /// §7: the cost of a `/metrics` scrape with full tables.
    Metrics,
    /// §8: floods against HAProxy and xdplb.
    Attack,
}

impl Section {
    const ALL: [(&'static str, Section); 6] = [
        ("dataplane", Section::Dataplane),
        ("e2e", Section::E2e),
        ("control", Section::Control),
        ("memory", Section::Memory),
        ("metrics", Section::Metrics),
        ("attack", Section::Attack),
    ];

    fn parse_list(list: &str) -> Result<Vec<Section>> {
        list.split(',')
            .map(|name| {
                Self::ALL
                    .iter()
                    .find(|(n, _)| *n == name.trim())
                    .map(|&(_, s)| s)
                    .with_context(|| {
                        format!(
                            "--only: unknown section {name:?}; the sections are {}",
                            Self::ALL.map(|(n, _)| n).join(", ")
                        )
                    })
            })
            .collect()
    }
}

impl Args {
    fn wants(&self, s: Section) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&s))
    }
}

fn parse_args() -> Result<Args> {
    let mut quick = false;
    let mut runs = None;
    let mut out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut write = true;
    let mut e2e = true;
    let mut only = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--runs" => runs = Some(it.next().context("--runs needs a number")?.parse()?),
            "--out" => out = it.next().context("--out needs a directory")?.into(),
            "--no-write" => write = false,
            "--no-e2e" => e2e = false,
            "--only" => {
                only = Some(Section::parse_list(
                    &it.next().context("--only needs a list of sections")?,
                )?);
                // A partial run must not overwrite the full report.
                write = false;
            }
            "-h" | "--help" => {
                println!(
                    "bench [--quick] [--runs N] [--out DIR] [--no-write] [--no-e2e] [--only LIST]\n\n\
                     Measures xdplb's data plane beside baselines measured in the same run and\n\
                     writes DIR/BENCHMARKS.md and DIR/bench-*.png (DIR defaults to docs/).\n\
                     --quick: 10,000 runs per case (default 50,000), CONNS up to 100k entries\n\
                     (default 1M), shorter live-frames and wrk runs. --no-write: print only.\n\
                     --no-e2e: skip the parts that run the daemon in the namespace testbed: the\n\
                     comparison with HAProxy (needs haproxy, wrk, bpftool and the xdplb binary)\n\
                     and the memory figures. --only dataplane,e2e,control,memory,metrics,attack: run just\n\
                     these sections and print them (implies --no-write), for iterating on one.\n\
                     Needs root."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let runs = runs.unwrap_or(if quick { 10_000 } else { 50_000 });
    let out = out.canonicalize().unwrap_or(out);
    if runs < 100 {
        bail!("--runs must be at least 100");
    }
    Ok(Args {
        quick,
        runs,
        out,
        write,
        e2e,
        only,
    })
}

/// What the run will do, for the up-front estimate and the progress lines.
struct Plan {
    conns_sizes: Vec<usize>,
    backend_counts: Vec<usize>,
    live_repeat: u32,
    live_rounds: usize,
    /// Seconds per wrk run; 0: no end-to-end runs.
    e2e_secs: u32,
    /// Service counts of the memory figures; empty: not measured.
    memory_services: Vec<usize>,
}

impl Plan {
    fn new(args: &Args) -> Self {
        Self {
            conns_sizes: if args.quick {
                vec![1_000, 100_000]
            } else {
                vec![1_000, 100_000, 1_000_000]
            },
            backend_counts: vec![10, 1_000, 10_000],
            // Each live-frames call sets up and tears down a page pool, which
            // waits for an RCU grace period (milliseconds): few, full calls.
            live_repeat: if args.quick { 25_600 } else { 102_400 },
            live_rounds: 3,
            e2e_secs: match (args.e2e, args.quick) {
                (false, _) => 0,
                (true, true) => 3,
                (true, false) => 10,
            },
            memory_services: match (args.e2e, args.quick) {
                (false, _) => Vec::new(),
                (true, true) => vec![1, 100],
                (true, false) => vec![1, 100, 1_000],
            },
        }
    }

    /// Test runs in the warm loops (measured plus warm-up).
    fn test_runs(&self, runs: usize) -> usize {
        let syn = runs.min(20_000);
        // Baselines, 16 cost cases, 12 breakdown stages, the scaling
        // points; 8 SYN cases (4 of them answered: two runs per SYN) and
        // 16 new-flow stages.
        let loops = 2 + 16 + 12 + 2 * (self.conns_sizes.len() + self.backend_counts.len());
        (loops * runs + (12 + 16) * syn) * 11 / 10
    }

    /// A rough duration: `per_run` seconds per warm-loop run, about 2 µs per
    /// CONNS insert, the live-frames calls, and lab setup.
    fn estimate_s(&self, runs: usize, per_run: f64) -> f64 {
        let fill = self.conns_sizes.iter().max().copied().unwrap_or(0) as f64 * 2e-6;
        // About 25 ms per live-frames call of 256 frames (an RCU grace period).
        let live = 2.0 * (self.live_repeat / 256) as f64 * self.live_rounds as f64 * 0.025;
        // Three balancers x two wrk runs (plus a 1 s warm-up each), and the
        // testbeds' and balancers' start-up.
        // The control-plane scenarios: about 45 s per balancer.
        let e2e = if self.e2e_secs > 0 {
            6.0 * (self.e2e_secs as f64 + 1.0) + 40.0 + 90.0
        } else {
            0.0
        };
        // The daemon writes each service's 65,537 Maglev slots one syscall at
        // a time: roughly 0.25 s per service, plus a few seconds to settle.
        let memory: f64 = self
            .memory_services
            .iter()
            .map(|n| *n as f64 * 0.25 + 5.0)
            .sum();
        self.test_runs(runs) as f64 * per_run
            + fill
            + live
            + e2e
            + memory
            + scrape::ESTIMATE_S
            + 10.0
    }
}

/// HTTP backends in the end-to-end testbed.
const E2E_BACKENDS: usize = 4;

struct Progress {
    started: Instant,
    step: usize,
}

impl Progress {
    fn say(&mut self, what: &str) {
        self.step += 1;
        println!(
            "  [{:>5.1} s] {:>2}. {what}",
            self.started.elapsed().as_secs_f64(),
            self.step
        );
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn ns(s: &Stats) -> String {
    format!("{} ns", s.median)
}

/// A case's cost above the empty program measured beside it (0 when the
/// noise puts it below).
fn above(s: &Stats, empty: &Stats) -> u64 {
    s.median.saturating_sub(empty.median)
}

/// The per-packet targets (XDP, IPv4, cost above the paired empty program:
/// Katran's figures on this kind of machine), and TC and IPv6 within 15% of
/// each.
fn cost_targets(r: &CostResults) -> Vec<String> {
    let mut notes = Vec::new();
    let cost = |name: &str, hook: Hook| r.find(name, hook).map(|c| above(&c.stats, &c.empty));
    for (v4, v6, target) in [
        (ESTABLISHED_V4, "established TCP IPv6", 260),
        (NEW_FLOW_V4, "new-flow SYN IPv6", 830),
        ("non-service pass IPv4", "non-service pass IPv6", 40),
    ] {
        let Some(xdp) = cost(v4, Hook::Xdp) else {
            continue;
        };
        notes.push(format!(
            "target: {v4} (XDP) at most {target} ns above the empty program: {xdp} ns, {}",
            verdict(xdp <= target)
        ));
        let limit = (xdp as f64 * 1.15).max(xdp as f64 + 10.0);
        for (name, hook) in [(v4, Hook::Tc), (v6, Hook::Xdp), (v6, Hook::Tc)] {
            if let Some(c) = cost(name, hook) {
                notes.push(format!(
                    "target: {name} ({hook:?}) within 15% of {v4} (XDP), {xdp} ns: {c} ns, {}",
                    verdict(c as f64 <= limit)
                ));
            }
        }
    }
    notes
}

/// §1b or §1c on both hooks: `measure` gives one hook's stages.
fn stage_table(
    title: &str,
    what: &str,
    runs: usize,
    mut measure: impl FnMut(Hook) -> Result<Vec<dataplane::Step>>,
) -> Result<Table> {
    let mut by_hook = Vec::new();
    for hook in [Hook::Xdp, Hook::Tc] {
        by_hook.push((hook, measure(hook)?));
    }
    Ok(steps_table(title, what, runs, &by_hook))
}

/// §1b and §1c: a packet's cost stage by stage.
fn steps_table(
    title: &str,
    what: &str,
    runs: usize,
    by_hook: &[(Hook, Vec<dataplane::Step>)],
) -> Table {
    let mut t = Table::new(
        title,
        format!(
            "{what}, in labs loaded so that its run ends after \
             each stage in turn (the object's `BENCH_STOP` constant, which a normal load leaves \
             at 0 and the verifier then removes). Median of {runs} runs per stage; \
             \"above empty\" is the cumulative cost above the empty XDP program measured \
             beside it, \"this stage\" the difference from the stage before."
        ),
        &[
            "hook",
            "run ends after",
            "median",
            "empty XDP (paired)",
            "above empty",
            "this stage",
        ],
    );
    for (hook, steps) in by_hook {
        let mut before = 0i64;
        for s in steps {
            let cum = above(&s.stats, &s.empty) as i64;
            t.row(vec![
                format!("{hook:?}").to_lowercase(),
                s.name.to_string(),
                ns(&s.stats),
                ns(&s.empty),
                format!("{cum} ns"),
                format!("{:+} ns", cum - before),
            ]);
            before = cum;
        }
    }
    t.notes.push(
        "Each stage's figure includes what every run pays at its end (the reason counter), so \
         the first stage carries it. Differences of 10-20 ns are within the noise."
            .into(),
    );
    t
}

fn cost_table(r: &CostResults) -> Table {
    let mut t = Table::new(
        "1. Data-plane cost per packet",
        format!(
            "`BPF_PROG_TEST_RUN` with repeat = 1 in a warm loop; the median (and 90th \
             percentile) of the kernel-reported duration over {} runs per case ({} for the \
             SYN cases, each run a SYN of a flow never seen before). After each new-flow SYN, \
             untimed, its backend answers, which establishes the flow as a real handshake does: \
             the tables then hold what traffic that gets answered leaves behind. The \
             unanswered SYN cases (a service of their own) leave every flow waiting for its \
             backend, as a SYN flood's flows do when the flood guard is off. Baselines: an \
             empty XDP program (the harness floor) and a MAC-swap XDP_TX program, from the same \
             object, same run. Services have 10 backends; XDP runs on the loopback ifindex, so \
             forwarded packets leave with XDP_REDIRECT or XDP_TX as decided by the FIB lookup.",
            r.runs, r.syn_runs
        ),
        &[
            "case",
            "hook",
            "median",
            "p90",
            "empty XDP (paired)",
            "above empty",
            "vs empty XDP",
            "vs MAC-swap XDP",
            "verdict",
        ],
    );
    let mut add = |name: &str, hook: Hook, s: &Stats, empty: &Stats| {
        t.row(vec![
            name.to_string(),
            format!("{hook:?}").to_lowercase(),
            ns(s),
            format!("{} ns", s.p90),
            ns(empty),
            format!("{} ns", above(s, empty)),
            ratio(s.median as f64, empty.median as f64),
            ratio(s.median as f64, r.macswap.median as f64),
            hook.action_name(s.verdict),
        ]);
    };
    add("baseline: empty XDP program", Hook::Xdp, &r.empty, &r.empty);
    add(
        "baseline: MAC swap + XDP_TX",
        Hook::Xdp,
        &r.macswap,
        &r.empty,
    );
    for c in &r.cases {
        add(&c.name, c.hook, &c.stats, &c.empty);
    }
    t.notes.extend(cost_targets(r));
    t.notes.push(
        "\"empty XDP (paired)\": the empty program measured in blocks of 500 runs alternating \
         with the case's own, so each ratio compares runs made moments apart. The TC entry \
         point runs on an skb the harness allocates per run, so its floor is higher than XDP's; \
         its ratio to the empty XDP program includes that difference."
            .into(),
    );
    t
}

fn scale_table(title: &str, what: &'static str, method: &str, points: &[ScalePoint]) -> Table {
    let mut t = Table::new(
        title,
        method,
        &[
            what,
            "established TCP IPv4 (XDP)",
            "empty XDP (paired)",
            "vs empty",
            "vs smallest",
        ],
    );
    let first = points.first().map_or(1, |p| p.established.median.max(1)) as f64;
    for p in points {
        t.row(vec![
            p.size.to_string(),
            ns(&p.established),
            ns(&p.empty),
            ratio(p.established.median as f64, p.empty.median as f64),
            ratio(p.established.median as f64, first),
        ]);
    }
    if let (Some(a), Some(b)) = (points.first(), points.last()) {
        let ra = a.established.median as f64 / a.empty.median.max(1) as f64;
        let rb = b.established.median as f64 / b.empty.median.max(1) as f64;
        t.notes.push(format!(
            "target: flat cost. Ratio to the empty program {ra:.2}x at {} -> {rb:.2}x at {} \
             ({:+.0}%)",
            a.size,
            b.size,
            (rb / ra - 1.0) * 100.0
        ));
    }
    t
}

fn mpps(pps: f64) -> String {
    format!("{:.2} Mpps", pps / 1e6)
}

fn live_table(l: &LiveResults, repeat: u32, rounds: usize) -> Table {
    let mut t = Table::new(
        "3. Forwarding rate (XDP live frames)",
        format!(
            "`BPF_PROG_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`, {rounds} rounds of {repeat} \
             frames in calls of one 256-frame batch each (a page-pool page is initialised from \
             the input only when first allocated, so a longer call would feed a rewriting \
             program its own output), median round. The frame enters the packet lab's `front` \
             veth; the MAC-swap baseline sends it back out of `front` (XDP_TX), xdplb forwards \
             an established IPv4 TCP flow to a backend out of `back` (devmap redirect). GRO is \
             on at both peers so the veths accept XDP frames. \"kernel\" is the rate from the \
             kernel-reported duration (program, transmit and flush; the headline); \"wall\" \
             is frames over the syscalls' wall-clock time, which also pays a page-pool setup \
             per call. Delivered: the receiving peer's rx_packets delta; forwarded: xdplb's \
             FWD_* reason counters (every frame must count there)."
        ),
        &[
            "program",
            "frames",
            "rate (wall, with setup)",
            "rate (kernel)",
            "delivered",
            "forwarded",
            "vs MAC swap (kernel)",
        ],
    );
    let mut add = |name: &str, r: &Rate| {
        t.row(vec![
            name.to_string(),
            r.frames.to_string(),
            mpps(r.pps_wall),
            mpps(r.pps_kernel),
            r.delivered.to_string(),
            r.forwarded.map_or("-".into(), |f| f.to_string()),
            ratio(r.pps_kernel, l.macswap.pps_kernel),
        ]);
    };
    add("baseline: MAC swap + XDP_TX", &l.macswap);
    add("xdplb (established TCP IPv4)", &l.xdplb);
    let x = l.xdplb.pps_kernel / l.macswap.pps_kernel.max(1.0);
    t.notes.push(format!(
        "target: forwarding rate at least 0.8x the MAC-swap baseline: {x:.2}x, {}",
        verdict(x >= 0.8)
    ));
    if l.xdplb.forwarded != Some(l.xdplb.frames) {
        t.notes.push(format!(
            "WARNING: xdplb counted {:?} forwarded of {} frames: some copies were not forwarded",
            l.xdplb.forwarded, l.xdplb.frames
        ));
    }
    t
}

const NOT_MEASURED_E2E: &str = "§4 end to end through the testbed against HAProxy 2.6 (wrk, new \
     connection per request and keep-alive; requests/s, p50/p99, CPU per request).";

const NOT_MEASURED_MEMORY: &str =
    "§6 memory: daemon RSS and pinned map memory for 1, 100 and 1,000 services.";

const NOT_MEASURED_CONTROL: &str =
    "§5 control-plane timings against HAProxy (scale-up to first request, task death to removal, \
     failed requests in scale-down 10 -> 3 and in a rolling replacement).";

fn control_table(rows: &[control::Timings]) -> Table {
    let mut t = Table::new(
        "5. Control plane against HAProxy",
        "One testbed per balancer with ten HTTP backends, under a steady load of new \
         connections (4 at a time) from the client namespace. Both balancers poll DNS every \
         second and check every task over TCP every second, rise 2, fall 3 (HAProxy: \
         `hold valid 1s`, `default-server inter 1s fall 3 rise 2`; xdplb in TC mode). \
         Scale-up: tasks 3 -> 4, time until the new task answers its first request. Task death: \
         a task stops answering but stays in DNS (a crashed container); the time from its death \
         to the last failed request is when the balancer stopped sending to it. Scale-down: ten \
         tasks -> three; the seven leave DNS and stop 2 s later. Rolling replacement: five tasks \
         replaced one at a time, stop-first (Swarm's default order): the old task leaves DNS, \
         stops 2 s later, and its replacement joins. The 2 s are Swarm's: its executor removes a \
         task from service discovery, sleeps `defaultGossipConvergeDelay` (2 s) and only then \
         sends the stop signal (moby, `daemon/cluster/executor/container/controller.go`). A \
         task that dies without that order is the task-death case. The baseline is HAProxy, same \
         testbed shape, same run.",
        &[
            "balancer",
            "scale-up to first request",
            "task death: last failure after",
            "failed after death",
            "scale-down 10 -> 3 failed",
            "rolling replacement failed",
        ],
    );
    fn secs(v: Option<f64>) -> String {
        v.map_or("-".into(), |v| format!("{v:.2} s"))
    }
    for r in rows {
        t.row(vec![
            r.balancer.label().to_string(),
            secs(r.scale_up_s),
            secs(r.removal_s),
            r.death_failed.to_string(),
            format!("{} of {}", r.scale_down_failed, r.scale_down_requests),
            format!("{} of {}", r.rolling_failed, r.rolling_requests),
        ]);
    }
    t.notes.push(
        "HAProxy is a proxy: it retries a refused connection (`retries 3`) before answering 503, \
         so a dead task costs its clients little. xdplb forwards packets and cannot retry a \
         connection, but its data plane sees a task refuse one (a RST answering a SYN) and passes \
         over that task for 1 s after each refusal, until checks take it out of rotation: a \
         stopped server costs about one failed connection per second, not every connection \
         sent to it (docs/DATAPLANE.md §2). A task that vanishes without refusing (no RST) \
         delays its connections by a SYN retransmission (~1 s) instead."
            .into(),
    );
    let h = rows.iter().find(|r| r.balancer == Balancer::Haproxy);
    let bound = control::INTERVAL.as_secs_f64() * control::FALL as f64 + 1.0;
    for r in rows.iter().filter(|r| r.balancer != Balancer::Haproxy) {
        let hap = |f: fn(&control::Timings) -> String| h.map_or("n/a".into(), f);
        t.notes.push(format!(
            "target: scale-up under 2 s: {} ({}), HAProxy {}",
            secs(r.scale_up_s),
            verdict(r.scale_up_s.is_some_and(|s| s < 2.0)),
            hap(|h| secs(h.scale_up_s)),
        ));
        t.notes.push(format!(
            "target: removal under interval x fall + 1 s = {bound:.0} s: {} ({}), HAProxy {}",
            secs(r.removal_s),
            verdict(r.removal_s.is_none_or(|s| s < bound)),
            hap(|h| secs(h.removal_s)),
        ));
        t.notes.push(format!(
            "target: zero failed requests in scale-down: {} ({}), HAProxy {}; in rolling \
             replacement: {} ({}), HAProxy {}",
            r.scale_down_failed,
            verdict(r.scale_down_failed == 0),
            hap(|h| h.scale_down_failed.to_string()),
            r.rolling_failed,
            verdict(r.rolling_failed == 0),
            hap(|h| h.rolling_failed.to_string()),
        ));
        if let Some((attach, configured, first)) = r.reattach_ms {
            t.notes.push(format!(
                "interface re-created: the backend-side eth1 deleted and re-created 1 s later; \
                 {} re-attached its program {attach:.0} ms after the re-creation (a link event; \
                 status-file resolution 1 ms); the first request was answered {first:.0} ms after \
                 it, {configured:.0} ms of which the testbed spent giving the device its address \
                 and bringing it up",
                r.balancer.label()
            ));
        }
    }
    t
}

fn memory_table(points: &[memory::MemPoint]) -> Table {
    let mut t = Table::new(
        "6. Memory",
        "The daemon in the testbed's lb namespace with N services in one configuration (each on \
         the VIP with its own port, discovering `tasks.web` with 2 tasks, default Maglev size \
         65,537, health checks off, DNS every 5 s). \
         \"running after\": from its start to its `running;` log line (maps built and filled, \
         programs attached); \"all tasks active after\": until every service's two tasks were \
         logged active (first DNS answers, tables written); \"idle after\": until it used under \
         5% of a CPU over 2 s, when RSS is read. `cargo xtask bench` runs the release build of \
         the daemon here and in §4-5 (`XDPLB_BIN`). Maglev tables are written through memory mappings of \
         the BPF array, not one syscall per slot (before that change, 1,000 services took 166 s \
         to settle and 544 MiB of RSS, half of it a userspace copy of the tables). RSS: \
         VmRSS of the daemon. Pinned maps: the sum of `bytes_memlock` (bpftool) of the maps \
         pinned in its pin directory; the connection table is preallocated at its default \
         capacity, and the Maglev array grows by two halves of 65,537 slots per service. The \
         baseline is the one-service figure of the same run.",
        &[
            "services",
            "daemon RSS",
            "pinned maps",
            "RSS vs 1 service",
            "maps vs 1 service",
            "running after",
            "all tasks active after",
            "idle after",
        ],
    );
    let base = points.first();
    for p in points {
        t.row(vec![
            p.services.to_string(),
            format!("{:.1} MiB", p.rss_kib as f64 / 1024.0),
            format!("{:.1} MiB", p.map_bytes as f64 / 1048576.0),
            base.map_or("n/a".into(), |b| ratio(p.rss_kib as f64, b.rss_kib as f64)),
            base.map_or("n/a".into(), |b| {
                ratio(p.map_bytes as f64, b.map_bytes as f64)
            }),
            format!("{:.1} s", p.running_s),
            format!("{:.1} s", p.active_s),
            format!("{:.0} s", p.settle_s),
        ]);
    }
    t.notes
        .push("The issue sets no memory target; these figures are for sizing.".into());
    t
}

fn e2e_table(loads: &[Load], backends: usize, secs: u32) -> Table {
    let mut t = Table::new(
        "4. End to end through the testbed, against HAProxy",
        format!(
            "The namespace testbed (client, lb, overlay bridge, {backends} HTTP backends, \
             Docker-like DNS at 127.0.0.11 answering `tasks.web`). HAProxy 2.6 runs in the lb \
             namespace on the VIP with `resolvers docker` (nameserver 127.0.0.11:53), \
             `server-template web 20 tasks.web:80 check resolvers docker init-addr none` and \
             `balance roundrobin`; xdplb runs its default testbed configuration (TCP checks). \
             wrk from the client namespace: 2 threads, {} connections, {secs} s after a 1 s \
             warm-up; \"close\" sends `Connection: close` (a new connection per request), \
             \"keep-alive\" reuses connections. The client namespace reuses its TIME_WAIT ports \
             (`tcp_tw_reuse=1`, as load generators are set up): behind an L4 balancer the client \
             closes first and keeps the TIME_WAIT sockets (behind HAProxy, HAProxy does), and \
             without reuse its own ports ran out within seconds (2.4k req/s instead of 7.7k, same \
             balancer). CPU per request: HAProxy's process CPU \
             (utime + stime); xdplb's kernel BPF run time (kernel.bpf_stats_enabled) plus the \
             machine's softirq time (\"CPU/req\", the issue's definition, and the target). \
             Softirq time covers all networking on the machine (the client's and the backends' \
             too, and other work), so it overstates xdplb's share; it is shown for both \
             balancers in its own column, and \"own CPU/req\" leaves it out for both (HAProxy: \
             process CPU; xdplb: BPF run time). The balancers run one after the other on a \
             shared two-CPU machine that also runs the client, the backends and the DNS \
             server, so these figures move by tens of percent between runs: compare several.",
            e2e::CONNECTIONS
        ),
        &[
            "balancer",
            "connections",
            "requests",
            "req/s",
            "p50",
            "p99",
            "errors",
            "own CPU/req",
            "softirq/req",
            "CPU/req",
            "req/s vs HAProxy",
            "CPU/req vs HAProxy",
            "own CPU vs HAProxy",
        ],
    );
    let base = |keepalive: bool| {
        loads
            .iter()
            .find(|l| l.balancer == Balancer::Haproxy && l.keepalive == keepalive)
    };
    for l in loads {
        let h = base(l.keepalive);
        t.row(vec![
            l.balancer.label().to_string(),
            if l.keepalive { "keep-alive" } else { "close" }.to_string(),
            l.requests.to_string(),
            format!("{:.0}", l.rps),
            format!("{:.2} ms", l.p50_ms),
            format!("{:.2} ms", l.p99_ms),
            l.errors.to_string(),
            format!("{:.1} µs", l.own_us_per_req),
            format!("{:.1} µs", l.softirq_us_per_req),
            format!("{:.1} µs", l.cpu_us_per_req),
            h.map_or("n/a".into(), |h| ratio(l.rps, h.rps)),
            h.map_or("n/a".into(), |h| ratio(l.cpu_us_per_req, h.cpu_us_per_req)),
            h.map_or("n/a".into(), |h| ratio(l.own_us_per_req, h.own_us_per_req)),
        ]);
    }
    for l in loads.iter().filter(|l| l.balancer != Balancer::Haproxy) {
        if let Some(h) = base(l.keepalive) {
            let (r, c) = (
                l.rps / h.rps.max(1e-9),
                l.cpu_us_per_req / h.cpu_us_per_req.max(1e-9),
            );
            t.notes.push(format!(
                "target ({}, {}): req/s at or above HAProxy's: {r:.2}x, {}; CPU per request at \
                 most 0.25x HAProxy's: {c:.2}x, {}",
                l.balancer.label(),
                if l.keepalive { "keep-alive" } else { "close" },
                verdict(r >= 1.0),
                verdict(c <= 0.25)
            ));
        }
    }
    t
}

fn draw_charts(
    dir: &Path,
    cost: &CostResults,
    conns: &[ScalePoint],
    backends: &[ScalePoint],
    live: Option<&LiveResults>,
    loads: &[Load],
) -> Result<Vec<(String, String)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let font = charts::init_font()?;
    println!("charts: text in {font}");
    let mut made = Vec::new();

    let mut bars: Vec<Bar> = vec![
        Bar {
            label: "empty XDP (baseline)".into(),
            value: cost.empty.median as f64,
            color: BASELINE,
        },
        Bar {
            label: "MAC swap + XDP_TX (baseline)".into(),
            value: cost.macswap.median as f64,
            color: BASELINE,
        },
    ];
    bars.extend(cost.cases.iter().map(|c| Bar {
        label: format!("{} ({})", c.name, format!("{:?}", c.hook).to_lowercase()),
        value: c.stats.median as f64,
        color: if c.hook == Hook::Xdp { XDPLB } else { XDPLB_TC },
    }));
    let target = 2.5 * cost.empty.median as f64;
    charts::bars(
        &dir.join("bench-cost.png"),
        "xdplb cost per packet (median ns, BPF_PROG_TEST_RUN)",
        "ns per packet (blue: XDP, orange: TC, grey: baselines)",
        &bars,
        &[(target, "target for established: 2.5x empty")],
    )?;
    made.push(("Cost per packet".into(), "bench-cost.png".into()));

    let series = |points: &[ScalePoint]| {
        vec![
            Series {
                name: "established TCP IPv4 (XDP)".into(),
                points: points
                    .iter()
                    .map(|p| (p.size as f64, p.established.median as f64))
                    .collect(),
                color: XDPLB,
            },
            Series {
                name: "empty XDP (baseline)".into(),
                points: points
                    .iter()
                    .map(|p| (p.size as f64, p.empty.median as f64))
                    .collect(),
                color: BASELINE,
            },
        ]
    };
    charts::log_lines(
        &dir.join("bench-scaling.png"),
        "Established-flow cost against table sizes (median ns)",
        &[
            (
                "CONNS entries",
                "entries in the connection table",
                series(conns),
            ),
            ("backends in the service", "backends", series(backends)),
        ],
        "ns per packet",
    )?;
    made.push((
        "Cost against table sizes".into(),
        "bench-scaling.png".into(),
    ));

    if let Some(l) = live {
        charts::bars(
            &dir.join("bench-forwarding.png"),
            "Forwarding rate, XDP live frames on a veth pair (Mpps, kernel-reported)",
            "million frames per second",
            &[
                Bar {
                    label: "MAC swap + XDP_TX (baseline)".into(),
                    value: l.macswap.pps_kernel / 1e6,
                    color: BASELINE,
                },
                Bar {
                    label: "xdplb, established TCP IPv4".into(),
                    value: l.xdplb.pps_kernel / 1e6,
                    color: XDPLB,
                },
            ],
            &[(0.8 * l.macswap.pps_kernel / 1e6, "target: 0.8x MAC swap")],
        )?;
        made.push(("Forwarding rate".into(), "bench-forwarding.png".into()));
    }

    if !loads.is_empty() {
        let bars: Vec<Bar> = loads
            .iter()
            .map(|l| Bar {
                label: format!(
                    "{}, {}",
                    l.balancer.label(),
                    if l.keepalive { "keep-alive" } else { "close" }
                ),
                value: l.rps,
                color: match l.balancer {
                    Balancer::Haproxy => BASELINE,
                    Balancer::XdplbTc => XDPLB_TC,
                    Balancer::XdplbXdp => XDPLB,
                },
            })
            .collect();
        charts::bars(
            &dir.join("bench-e2e.png"),
            "End to end through the testbed: requests per second (wrk)",
            "requests per second (grey: HAProxy, orange: xdplb TC, blue: xdplb XDP)",
            &bars,
            &[],
        )?;
        made.push(("End to end against HAProxy".into(), "bench-e2e.png".into()));
    }
    Ok(made)
}

/// What §1–3 measured, for the charts.
struct Dataplane {
    cost: CostResults,
    conns: Vec<ScalePoint>,
    backends: Vec<ScalePoint>,
    live: Option<LiveResults>,
}

/// §1–3: cost per packet, live frames, table sizes; their tables go to `tables`.
fn dataplane_sections(
    args: &Args,
    plan: &Plan,
    progress: &mut Progress,
    tables: &mut Vec<Table>,
) -> Result<Dataplane> {
    let first = tables.len();
    let mut lab = PacketLab::with_conns_capacity("bench", COST_LAB_CONNS);
    let t0 = Instant::now();
    let cost = dataplane::per_packet(&mut lab, args.runs, |what| {
        progress.say(&format!("cost per packet: {what}"));
    })?;
    let per_run = t0.elapsed().as_secs_f64() / ((18 * args.runs + 4 * cost.syn_runs) as f64 * 1.1);
    println!(
        "  measured {:.1} µs of wall time per test run; the whole run should take about {:.0} s",
        per_run * 1e6,
        plan.estimate_s(args.runs, per_run)
    );
    tables.push(cost_table(&cost));
    tables.last().expect("just pushed").print();

    tables.push(stage_table(
        "1b. Where an established packet's time goes",
        "The established IPv4 TCP packet of §1",
        args.runs,
        |hook| {
            dataplane::breakdown(hook, args.runs, |what| {
                progress.say(&format!("stage by stage: {what}"));
            })
        },
    )?);
    tables.last().expect("just pushed").print();
    tables.push(stage_table(
        "1c. Where a new flow's SYN spends its time",
        "Distinct IPv4 SYNs of new flows (a fresh lab per stage, fed the same SYNs)",
        args.runs.min(20_000),
        |hook| {
            dataplane::syn_breakdown(hook, args.runs, |what| {
                progress.say(&format!("new flow stage by stage: {what}"));
            })
        },
    )?);
    tables.last().expect("just pushed").print();

    progress.say("forwarding rate: live frames, MAC swap then xdplb");
    let live = match live::forwarding(
        &mut lab,
        &cost.established_v4,
        plan.live_repeat,
        plan.live_rounds,
    ) {
        Ok(l) => {
            tables.push(live_table(&l, plan.live_repeat, plan.live_rounds));
            tables.last().expect("just pushed").print();
            Some(l)
        }
        Err(e) => {
            println!("forwarding rate not measured: {e:#}");
            None
        }
    };
    drop(lab);

    let conns = dataplane::conns_scaling(&plan.conns_sizes, args.runs, |what| {
        progress.say(&format!("table sizes: {what}"));
    })?;
    let backends = dataplane::backends_scaling(&plan.backend_counts, args.runs, |what| {
        progress.say(&format!("table sizes: {what}"));
    })?;
    let conns_table = scale_table(
        "2a. Cost against connection-table size",
        "CONNS entries",
        "The established IPv4 TCP flow of §1 (XDP), with the connection table (an LRU hash, \
         capacity twice the largest size so nothing is evicted) filled with synthetic flows \
         through the map API. Median of the kernel-reported duration, beside the empty XDP \
         program measured at the same fill.",
        &conns,
    );
    let backends_table = scale_table(
        "2b. Cost against backends per service",
        "backends",
        "The established IPv4 TCP flow (XDP) of a service with this many backends (one \
         BACKENDS entry each; the bench lab's Maglev tables have 251 slots, so at most 251 of \
         them receive new flows). Median of the kernel-reported duration, beside the empty XDP \
         program measured at the same point.",
        &backends,
    );
    conns_table.print();
    backends_table.print();
    // Keep the document in section order.
    let live_table = if live.is_some() {
        Some(tables.remove(first + 1))
    } else {
        None
    };
    tables.push(conns_table);
    tables.push(backends_table);
    tables.extend(live_table);

    Ok(Dataplane {
        cost,
        conns,
        backends,
        live,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !is_root() {
        bail!("the benchmark loads eBPF programs and creates network namespaces: run it as root");
    }
    let command = std::env::var("XDPLB_BENCH_COMMAND").unwrap_or_else(|_| {
        std::iter::once("bench".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ")
    });
    let plan = Plan::new(&args);
    let mut progress = Progress {
        started: Instant::now(),
        step: 0,
    };
    println!(
        "xdplb benchmarks{}: {} runs per case, CONNS up to {} entries, {} live frames x {} rounds.",
        if args.quick { " (--quick)" } else { "" },
        args.runs,
        plan.conns_sizes.last().copied().unwrap_or(0),
        plan.live_repeat,
        plan.live_rounds,
    );
    // About 5 µs of wall time per test run on these machines: refined below.
    println!(
        "estimated duration: about {:.0} s ({} test runs); progress follows.",
        plan.estimate_s(args.runs, 5e-6),
        plan.test_runs(args.runs)
    );

    let mut tables = Vec::new();
    let dataplane = if args.wants(Section::Dataplane) {
        Some(dataplane_sections(
            &args,
            &plan,
            &mut progress,
            &mut tables,
        )?)
    } else {
        None
    };

    let mut not_measured: Vec<&str> = Vec::new();
    let loads = if !args.wants(Section::E2e) {
        Vec::new()
    } else if plan.e2e_secs > 0 {
        match e2e::run(E2E_BACKENDS, plan.e2e_secs, |what| progress.say(what)) {
            Ok(loads) => {
                let t = e2e_table(&loads, E2E_BACKENDS, plan.e2e_secs);
                t.print();
                tables.push(t);
                loads
            }
            Err(e) => {
                println!("end to end not measured: {e:#}");
                not_measured.push(NOT_MEASURED_E2E);
                Vec::new()
            }
        }
    } else {
        not_measured.push(NOT_MEASURED_E2E);
        Vec::new()
    };
    if args.wants(Section::Control) {
        if plan.e2e_secs == 0 {
            not_measured.push(NOT_MEASURED_CONTROL);
        } else {
            match control::run(|what| progress.say(what)) {
                Ok(rows) => {
                    let t = control_table(&rows);
                    t.print();
                    tables.push(t);
                }
                Err(e) => {
                    println!("control plane not measured: {e:#}");
                    not_measured.push(NOT_MEASURED_CONTROL);
                }
            }
        }
    }
    if args.wants(Section::Memory) {
        if plan.memory_services.is_empty() {
            not_measured.push(NOT_MEASURED_MEMORY);
        } else {
            match memory::run(&plan.memory_services, |what| progress.say(what)) {
                Ok(points) => {
                    let t = memory_table(&points);
                    t.print();
                    tables.push(t);
                }
                Err(e) => {
                    println!("memory not measured: {e:#}");
                    not_measured.push(NOT_MEASURED_MEMORY);
                }
            }
        }
    }

    if args.wants(Section::Metrics) {
        match scrape::run(|what| progress.say(what)) {
            Ok(r) => {
                let t = scrape::table(&r);
                t.print();
                tables.push(t);
            }
            Err(e) => {
                println!("metrics scrape not measured: {e:#}");
                not_measured.push(scrape::NOT_MEASURED);
            }
        }
    }

    if args.wants(Section::Attack) {
        if plan.e2e_secs == 0 {
            not_measured.push(attack::NOT_MEASURED);
        } else {
            let secs = if args.quick { 3 } else { 5 };
            match attack::run(secs, |what| progress.say(what)) {
                Ok(rows) => {
                    let t = attack::table(&rows, secs);
                    t.print();
                    tables.push(t);
                }
                Err(e) => {
                    println!("under attack not measured: {e:#}");
                    not_measured.push(attack::NOT_MEASURED);
                }
            }
        }
    }

    let took = progress.started.elapsed().as_secs_f64();
    println!();
    println!("took {took:.1} s");
    if !args.write {
        return Ok(());
    }
    let d = dataplane.context("the data-plane sections did not run")?;
    let charts = match draw_charts(
        &args.out,
        &d.cost,
        &d.conns,
        &d.backends,
        d.live.as_ref(),
        &loads,
    ) {
        Ok(c) => c,
        Err(e) => {
            println!("charts not drawn: {e:#}");
            Vec::new()
        }
    };
    let md = args.out.join("BENCHMARKS.md");
    report::write_markdown(&md, &command, took, &tables, &charts, &not_measured)?;
    println!("wrote {}", md.display());
    for (_, file) in &charts {
        println!("wrote {}", args.out.join(file).display());
    }
    Ok(())
}
