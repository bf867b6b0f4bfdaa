//! End to end through the namespace testbed (§4): the same topology and the
//! same backends behind HAProxy 2.6 and behind xdplb (TC and XDP mode), loaded
//! with wrk from the client namespace.
//!
//! HAProxy is configured the way the Docker Swarm DNS pattern usually is:
//! `resolvers` at 127.0.0.11, `server-template ... check`, `balance
//! roundrobin`. It runs in the `lb` namespace on the VIP, with no xdplb
//! attached. CPU per request: HAProxy's process CPU (utime + stime); xdplb's
//! kernel BPF run time (`kernel.bpf_stats_enabled`) plus the machine's softirq
//! time, which also holds the client's and the backends' networking and other
//! work on the machine, so it overstates xdplb's share.

use std::{
    collections::BTreeSet,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use testkit::wait::wait_until;
use tests::testbed::{Mode, Testbed};

/// Connections wrk keeps open.
pub const CONNECTIONS: u32 = 32;

/// Which balancer serves the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balancer {
    Haproxy,
    XdplbTc,
    XdplbXdp,
}

impl Balancer {
    pub fn label(self) -> &'static str {
        match self {
            Balancer::Haproxy => "HAProxy 2.6",
            Balancer::XdplbTc => "xdplb (TC)",
            Balancer::XdplbXdp => "xdplb (XDP)",
        }
    }
}

/// One wrk run.
pub struct Load {
    pub balancer: Balancer,
    pub keepalive: bool,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The balancer's CPU per request as the issue defines it (see the module
    /// docs): HAProxy's process CPU; xdplb's BPF run time plus softirq time.
    pub cpu_us_per_req: f64,
    /// The balancer's own CPU per request: HAProxy's process CPU; xdplb's
    /// BPF run time.
    pub own_us_per_req: f64,
    /// Machine-wide softirq time per request, for both balancers.
    pub softirq_us_per_req: f64,
}

/// Clock ticks per second of `/proc` CPU times.
pub fn clk_tck() -> f64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// utime + stime of `pid`, in clock ticks.
pub fn process_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// utime + stime of `pid`, in nanoseconds.
fn process_cpu_ns(pid: u32) -> Result<f64> {
    Ok(process_cpu_ticks(pid)? as f64 * 1e9 / clk_tck())
}

/// The machine's softirq time over all CPUs, in nanoseconds.
fn softirq_ns() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let ticks: f64 = cpu
        .split_whitespace()
        .nth(7)
        .context("no softirq field")?
        .parse()?;
    Ok(ticks * 1e9 / clk_tck())
}

fn bpftool_json(args: &[&str]) -> Result<String> {
    let out = Command::new("bpftool").arg("-j").args(args).output()?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number after `"key":` in a flat JSON object.
fn json_u64(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The programs attached through the links pinned in `pin_dir/links`.
fn attached_prog_ids(pin_dir: &Path) -> Result<BTreeSet<u64>> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(pin_dir.join("links"))? {
        let path = entry?.path();
        let json = bpftool_json(&["link", "show", "pinned", &path.display().to_string()])?;
        ids.insert(json_u64(&json, "prog_id").context("link without prog_id")?);
    }
    if ids.is_empty() {
        bail!("no links pinned in {}", pin_dir.display());
    }
    Ok(ids)
}

/// Total `run_time_ns` of `ids` (0 unless kernel.bpf_stats_enabled is on).
fn bpf_run_time_ns(ids: &BTreeSet<u64>) -> Result<f64> {
    let mut total = 0;
    for id in ids {
        let json = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
        total += json_u64(&json, "run_time_ns").unwrap_or(0);
    }
    Ok(total as f64)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns on kernel.bpf_stats_enabled while alive, then restores it.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Result<Self> {
        let old = std::fs::read_to_string(BPF_STATS)?.trim().to_string();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self(old))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

struct WrkOut {
    requests: u64,
    errors: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_wrk(text: &str) -> Result<WrkOut> {
    let mut out = WrkOut {
        requests: 0,
        errors: 0,
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
    };
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("50%") {
            out.p50_ms = parse_duration_ms(v).unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("99%") {
            out.p99_ms = parse_duration_ms(v).unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            out.rps = v.trim().parse().unwrap_or(0.0);
        } else if line.contains(" requests in ") {
            out.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            out.errors += v
                .split(',')
                .filter_map(|f| f.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            out.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if out.requests == 0 {
        bail!("wrk reported no requests:\n{text}");
    }
    Ok(out)
}

fn wrk(tb: &Testbed, keepalive: bool, secs: u32) -> Result<WrkOut> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", tb.client_ns().path().display()))
        .args(["--", "wrk", "-t2", "--latency"])
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{secs}s"));
    if !keepalive {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(tb.url("/"));
    let out = cmd.output().context("running wrk (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {}{text}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text)
}

/// Waits until every backend has answered through the VIP.
fn wait_all_backends(tb: &Testbed, what: &str) -> Result<()> {
    wait_backends(tb, tb.backends().len(), what)
}

/// Waits until `want` distinct backends have answered through the VIP.
pub fn wait_backends(tb: &Testbed, want: usize, what: &str) -> Result<()> {
    let mut seen = BTreeSet::new();
    wait_until(Duration::from_secs(30), what, || {
        if let Ok((body, _)) = tb.get() {
            if let Some(name) = body.split_whitespace().next() {
                seen.insert(name.to_string());
            }
        }
        (seen.len() >= want).then_some(())
    })
}

/// The usual Swarm pattern. `timing`: check every second, `fall 3 rise 2`, and
/// re-resolve every second, holding answers no longer (the control-plane
/// comparison uses the same intervals for both balancers).
fn haproxy_config(tasks: usize, timing: bool) -> String {
    let (hold, server) = if timing {
        ("1s", "\x20   default-server inter 1s fall 3 rise 2\n")
    } else {
        ("10s", "")
    };
    format!(
        "global\n\
         \x20   maxconn 4000\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 30s\n\
         \x20   timeout server 30s\n\
         resolvers docker\n\
         \x20   nameserver dns 127.0.0.11:53\n\
         \x20   resolve_retries 3\n\
         \x20   timeout resolve 1s\n\
         \x20   timeout retry 1s\n\
         \x20   hold valid {hold}\n\
         \x20   accepted_payload_size 8192\n\
         frontend web\n\
         \x20   bind 10.10.0.1:80\n\
         \x20   default_backend web\n\
         backend web\n\
         \x20   balance roundrobin\n\
         {server}\
         \x20   server-template web {tasks} tasks.web:80 check resolvers docker \
         init-addr none resolve-prefer ipv4\n"
    )
}

/// HAProxy in the `lb` namespace, its output in a log file; killed on drop.
pub struct Haproxy {
    child: Child,
    log: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy; `timing` as in [`haproxy_config`].
    pub fn start(tb: &Testbed, timing: bool) -> Result<Self> {
        let cfg = tb.dir().join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(20, timing))?;
        let log = tb.dir().join("haproxy.log");
        let file = File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", tb.lb().path().display()))
            .args(["--", "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting haproxy (is it installed?)")?;
        Ok(Self { child, log })
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both wrk modes against one balancer on `tb`.
fn measure(tb: &Testbed, balancer: Balancer, secs: u32, out: &mut Vec<Load>) -> Result<()> {
    let run = |keepalive: bool, cpu: &dyn Fn() -> Result<f64>| -> Result<Load> {
        // A short warm-up, then the measured run.
        wrk(tb, keepalive, 1)?;
        let (c0, s0) = (cpu()?, softirq_ns()?);
        let w = wrk(tb, keepalive, secs)?;
        let (c1, s1) = (cpu()?, softirq_ns()?);
        let n = w.requests.max(1) as f64;
        let softirq = (s1 - s0) / n / 1e3;
        let own = (c1 - c0) / n / 1e3;
        Ok(Load {
            balancer,
            keepalive,
            requests: w.requests,
            errors: w.errors,
            rps: w.rps,
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
            cpu_us_per_req: if balancer == Balancer::Haproxy {
                own
            } else {
                own + softirq
            },
            own_us_per_req: own,
            softirq_us_per_req: softirq,
        })
    };
    match balancer {
        Balancer::Haproxy => {
            let h = Haproxy::start(tb, false)?;
            let pid = h.child.id();
            wait_all_backends(tb, "HAProxy to reach every backend")
                .with_context(|| format!("HAProxy's log ends:\n{}", h.log_tail()))?;
            for keepalive in [false, true] {
                out.push(run(keepalive, &|| process_cpu_ns(pid))?);
            }
        }
        Balancer::XdplbTc | Balancer::XdplbXdp => {
            let daemon = tb.start_daemon(&tb.daemon_args()?)?;
            wait_all_backends(tb, "xdplb to reach every backend")?;
            let ids = attached_prog_ids(tb.pin_dir())?;
            let stats = BpfStats::enable()?;
            for keepalive in [false, true] {
                let before = tb.reason_stats()?;
                out.push(run(keepalive, &|| bpf_run_time_ns(&ids))?);
                let after = tb.reason_stats()?;
                let other: Vec<String> = after
                    .iter()
                    .filter(|(name, _)| !name.starts_with("fwd_"))
                    .filter_map(|(name, n)| {
                        let d = n - before.get(name).copied().unwrap_or(0);
                        (d > 0).then(|| format!("{name} {d}"))
                    })
                    .collect();
                println!(
                    "  {} {}: {} connection-table entries; reasons other than forwarding: {}",
                    balancer.label(),
                    if keepalive { "keep-alive" } else { "close" },
                    tb.conn_entries()?,
                    if other.is_empty() {
                        "none".to_string()
                    } else {
                        other.join(", ")
                    }
                );
            }
            drop(stats);
            drop(daemon);
            tb.down()?;
        }
    }
    Ok(())
}

/// Runs HAProxy and xdplb (TC) on one TC-mode testbed, then xdplb (XDP) on an
/// XDP-mode one (GRO on the peers). `backends` tasks, `secs` per wrk run.
pub fn run(backends: usize, secs: u32, mut progress: impl FnMut(&str)) -> Result<Vec<Load>> {
    tests::testbed::set_quiet(true);
    let started = Instant::now();
    let mut out = Vec::new();
    {
        let tb = Testbed::new(Mode::Tc, backends)?;
        tb.client_reuses_time_wait()?;
        for b in [Balancer::Haproxy, Balancer::XdplbTc] {
            progress(&format!("end to end: {} (wrk {secs} s x 2)", b.label()));
            measure(&tb, b, secs, &mut out)?;
        }
    }
    {
        let tb = Testbed::new(Mode::Xdp, backends)?;
        tb.client_reuses_time_wait()?;
        progress(&format!(
            "end to end: {} (wrk {secs} s x 2)",
            Balancer::XdplbXdp.label()
        ));
        measure(&tb, Balancer::XdplbXdp, secs, &mut out)?;
    }
    progress(&format!(
        "end to end done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(out)
}
