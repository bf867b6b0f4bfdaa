//! `cargo xtask demo`: a guided tour of xdplb on the namespace testbed.
//!
//! A Swarm host built from network namespaces (`tests::testbed`): a client,
//! the balancer running the real `xdplb` daemon, an overlay bridge, twelve
//! tasks of service `web`, and Docker's DNS on 127.0.0.11 answering
//! `tasks.web`. The demo drives traffic, scales 10 -> 3 -> 12, kills a task,
//! and after each step says what the balancer did, with the numbers (from
//! the data plane's own counters, the backends, and `xdplb stats`).
//!
//! ```text
//! demo [--keep] [--xdp]
//!   --keep   leave everything up afterwards, print how to poke at it, and
//!            wait for Ctrl-C (the DNS server and the tasks live in this process)
//!   --xdp    attach in XDP mode instead of TC (TC is what a Swarm container uses)
//! ```
//!
//! Root only. `cargo xtask demo` builds `xdplb` and this binary first; run by
//! hand, `xdplb` must sit next to it (`target/debug/`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::ExitCode,
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb_user::{
    dataplane::{pinned::PinnedMaps, table::ip_from_bytes},
    report::snapshot::take_snapshot,
};
use testkit::wait::wait_for;
use tests::testbed::{self, backend_addr, Daemon, DaemonConfig, Mode, Testbed, HTTP_PORT, VIP};

/// Tasks built; the first ten are in DNS at the start.
const TASKS: usize = 12;
const START_TASKS: usize = 10;
/// The task killed in the last step.
const VICTIM: usize = 5;

/// Requests per second of the background loads (open loop: a request that
/// hangs does not slow the others down).
const RATE: u32 = 400;

/// Set by the signal thread on SIGINT/SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

struct Options {
    keep: bool,
    mode: Mode,
}

const USAGE: &str = "usage: demo [--keep] [--xdp]
  --keep   leave the testbed up afterwards, print how to poke at it, wait for Ctrl-C
  --xdp    attach in XDP mode (default: TC, what a Swarm container uses)";

fn main() -> ExitCode {
    let mut opts = Options {
        keep: false,
        mode: Mode::Tc,
    };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--keep" => opts.keep = true,
            "--xdp" => opts.mode = Mode::Xdp,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("demo: unknown argument {other:?}\n{USAGE}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "demo: needs root (it creates network namespaces and loads BPF programs); \
             run `sudo cargo xtask demo`"
        );
        return ExitCode::FAILURE;
    }
    if let Err(e) = catch_signals() {
        eprintln!("demo: {e:#}");
        return ExitCode::FAILURE;
    }
    testbed::set_quiet(true);
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if INTERRUPTED.load(Ordering::SeqCst) {
                println!("\nInterrupted; everything has been cleaned up.");
            } else {
                eprintln!("\ndemo failed: {e:#}\n(everything has been cleaned up)");
            }
            ExitCode::FAILURE
        }
    }
}

/// Blocks SIGINT and SIGTERM in every thread (threads inherit the mask, and
/// no other thread exists yet) and takes them with `sigwait` on a thread of
/// their own, so Ctrl-C ends the demo through the normal cleanup path.
fn catch_signals() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                SIGNAL.store(sig as i32, Ordering::SeqCst);
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking up early on Ctrl-C.
fn nap(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        interrupted()?;
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
    interrupted()
}

fn s(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `1234` -> `1,234`.
fn n(v: impl Into<u64>) -> String {
    lb_user::report::format::fmt_count(v.into())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
}

fn step(k: usize, title: &str) {
    println!("\n[{k}/6] {title}");
}

fn say(line: impl AsRef<str>) {
    println!("      {}", line.as_ref());
}

/// New connections per backend address of service `web`, as the data plane
/// counted them (the NEW CONNS column of `xdplb stats`).
fn new_conns(tb: &Testbed) -> Result<BTreeMap<Ipv4Addr, u64>> {
    let snap = take_snapshot(tb.pin_dir()).context("reading the stats")?;
    let web = snap
        .services
        .iter()
        .find(|s| s.name.as_deref() == Some("web") || s.listen.starts_with(&VIP.to_string()))
        .context("service web is not in the maps")?;
    Ok(web
        .backends
        .iter()
        .filter(|b| b.addr.port() == HTTP_PORT)
        .filter_map(|b| match b.addr.ip() {
            IpAddr::V4(ip) => Some((ip, b.new_connections)),
            IpAddr::V6(_) => None,
        })
        .collect())
}

/// The task name of an address (`b3`).
fn task_name(ip: Ipv4Addr) -> String {
    (0..TASKS)
        .find(|&i| backend_addr(i) == ip)
        .map_or_else(|| ip.to_string(), |i| format!("b{i}"))
}

/// Prints the new connections each task got between two readings, with a
/// bar: the distribution of one step.
fn print_distribution(before: &BTreeMap<Ipv4Addr, u64>, after: &BTreeMap<Ipv4Addr, u64>) {
    let delta: Vec<(Ipv4Addr, u64)> = after
        .iter()
        .map(|(ip, v)| (*ip, v.saturating_sub(before.get(ip).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect();
    let total: u64 = delta.iter().map(|(_, v)| v).sum();
    if total == 0 {
        say("(no new connections)");
        return;
    }
    let max = delta.iter().map(|(_, v)| *v).max().unwrap_or(1);
    for (ip, v) in &delta {
        let bar = "#".repeat(((*v as f64 / max as f64) * 30.0).round() as usize);
        say(format!(
            "{:<4} {:<15} {:>6}  {:>5.1}%  {bar}",
            task_name(*ip),
            ip,
            n(*v),
            *v as f64 * 100.0 / total as f64
        ));
    }
}

struct Demo {
    tb: Testbed,
    d: Daemon,
    cfg: DaemonConfig,
}

fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let mode = opts.mode.as_str().to_uppercase();
    println!(
        "xdplb demo, {mode} mode: a Docker Swarm host built from network namespaces, the real \
         `xdplb` daemon,\nreal HTTP traffic. Docker's `--replicas 10` example: service `web` \
         with 10 tasks behind one address."
    );

    step(1, "Building the testbed");
    let t = Instant::now();
    let tb = Testbed::new(opts.mode, TASKS)?;
    tb.set_tasks(&(0..START_TASKS).collect::<Vec<_>>());
    say(format!("done in {}:", s(t.elapsed())));
    say(format!(
        "client {} ({})  ->  VIP {VIP}:80 on the balancer ({})",
        testbed::CLIENT_ADDR,
        tb.client_ns().name(),
        tb.lb().name()
    ));
    say(format!(
        "balancer {}  ->  overlay bridge ({})  ->  tasks b0..b{} at {}..{}",
        testbed::LB_OVERLAY_ADDR,
        tb.ovl().name(),
        TASKS - 1,
        backend_addr(0),
        backend_addr(TASKS - 1)
    ));
    say(format!(
        "Docker's DNS (127.0.0.11 inside the balancer's namespace) answers tasks.web with \
         b0..b{}; b{} and b{} wait for the scale-up.",
        START_TASKS - 1,
        START_TASKS,
        TASKS - 1
    ));
    interrupted()?;

    step(2, "Starting xdplb");
    let mut cfg = tb.daemon_config();
    // One service, `web`: the story is about TCP (the scenarios cover UDP).
    cfg.udp = false;
    let args = tb.config_args(&cfg)?;
    let t = Instant::now();
    let mut d = tb.start_daemon(&args)?;
    say(format!(
        "$ xdplb run {} --pin-dir {}",
        args.join(" "),
        tb.pin_dir().display()
    ));
    say(format!(
        "  (attach = \"{}\"; DNS polled every {} ms, TCP health checks every {} ms, rise {}, \
         fall {}: short, for the demo)",
        cfg.attach,
        cfg.dns_interval.as_millis(),
        cfg.check_interval.as_millis(),
        cfg.rise,
        cfg.fall
    ));
    d.wait_ready()?;
    let ready = t.elapsed();
    let http: Vec<SocketAddr> = (0..START_TASKS)
        .map(|i| SocketAddr::from((backend_addr(i), HTTP_PORT)))
        .collect();
    d.wait_active(&http, Duration::from_secs(15))?;
    d.wait_table("web", START_TASKS, Duration::from_secs(15))?;
    say(format!(
        "programs attached and maps pinned after {}; all 10 tasks passed {} health checks and \
         are in the Maglev table after {}.",
        s(ready),
        cfg.rise,
        s(t.elapsed())
    ));
    let mut demo = Demo { tb, d, cfg };
    interrupted()?;

    spread(&demo)?;
    scale_down(&mut demo)?;
    scale_up(&mut demo)?;
    kill_task(&mut demo)?;

    let tb = &demo.tb;
    println!("\nThe final `xdplb stats` (all steps together):");
    print!("{}", indent(&tb.stats_text()?));
    println!("\nDemo finished in {}.", s(started.elapsed()));

    if opts.keep {
        keep(&demo)?;
    } else {
        println!("Cleaning up: daemon, programs, pins, namespaces.");
    }
    Ok(())
}

/// Step 3: 5,000 new connections over ten tasks.
fn spread(demo: &Demo) -> Result<()> {
    const REQUESTS: u64 = 5_000;
    let tb = &demo.tb;
    step(
        3,
        "Traffic: 5,000 HTTP requests from the client, each on a new connection",
    );
    let before = new_conns(tb)?;
    let report = tb.load(REQUESTS, 16);
    interrupted()?;
    say(format!(
        "{} ok, {} failed in {} ({:.0} requests/s, slowest {:.1?}).",
        n(report.ok),
        n(report.failed),
        s(report.elapsed),
        report.total() as f64 / report.elapsed.as_secs_f64(),
        report.max_latency
    ));
    let after = new_conns(tb)?;
    let shares: Vec<f64> = after
        .iter()
        .map(|(ip, v)| {
            v.saturating_sub(before.get(ip).copied().unwrap_or(0)) as f64 / REQUESTS as f64
        })
        .collect();
    let (lo, hi) = shares
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    say(
        "The data plane picked a task for each new connection with its Maglev table (a hash of \
         the 5-tuple)",
    );
    say("and counted it. `xdplb stats` reads those counters straight from the pinned maps:");
    println!();
    print!("{}", indent(&tb.stats_text()?));
    println!();
    say(format!(
        "Every task got between {:.1}% and {:.1}% of the new connections; the ideal is 10%.",
        lo * 100.0,
        hi * 100.0
    ));
    if report.failed > 0 {
        bail!("{} requests failed: {report}", report.failed);
    }
    Ok(())
}

/// Step 4: 10 -> 3 under load, with a long download on a removed task.
fn scale_down(demo: &mut Demo) -> Result<()> {
    let Demo { tb, d, cfg } = demo;
    step(
        4,
        "Scaling down to 3 tasks while traffic flows (as `docker service scale web=3` would)",
    );
    // A long download first, so that it runs on a task about to be removed.
    let mut long = tb.slow(2500);
    let long_on = long.backend()?;
    let long_index: usize = long_on[1..].parse().context("a task name bN")?;
    let kept: Vec<usize> = (0..START_TASKS)
        .filter(|&i| i != long_index)
        .take(3)
        .collect();
    let removed: Vec<usize> = (0..START_TASKS).filter(|i| !kept.contains(i)).collect();
    let kept_names = kept
        .iter()
        .map(|i| format!("b{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    say(format!(
        "A long download (GET /slow?ms=2500, 2.5 s) is running on {long_on}, which is about to \
         be removed."
    ));
    let load = tb.client().start_rate(&tb.url("/"), RATE);
    nap(Duration::from_millis(300))?;
    let flips = d.count_log("Maglev table flipped service=web active=3 ");
    let at_change = new_conns(tb)?;
    let t0 = Instant::now();
    tb.set_tasks(&kept);
    say(format!(
        "DNS now answers tasks.web with {kept_names}; background traffic: {RATE} requests/s, \
         each on a new connection."
    ));
    for &i in &removed {
        let addr = SocketAddr::from((backend_addr(i), HTTP_PORT));
        d.wait_log(&format!("{addr} draining"), Duration::from_secs(5))?;
    }
    let draining = t0.elapsed();
    d.wait_log_count(
        "Maglev table flipped service=web active=3 ",
        flips + 1,
        Duration::from_secs(5),
    )?;
    let flipped = t0.elapsed();
    let at_flip = new_conns(tb)?;
    let t_flip = Instant::now();
    nap(Duration::from_millis(1500))?;
    let report = load.stop();
    let after = new_conns(tb)?;
    let (long_done_on, long_took) = long.wait()?;
    let last_removed = removed
        .iter()
        .filter_map(|&i| tb.backend(i).last_request())
        .filter(|&t| t >= t0)
        .max()
        .map(|t| t - t0);
    let bound = cfg.dns_interval + Duration::from_secs(1);
    let late: usize = removed
        .iter()
        .map(|&i| tb.backend(i).requests_since(t0 + bound))
        .sum();
    let in_between: u64 = removed
        .iter()
        .map(|&i| {
            let ip = backend_addr(i);
            at_flip
                .get(&ip)
                .copied()
                .unwrap_or(0)
                .saturating_sub(at_change.get(&ip).copied().unwrap_or(0))
        })
        .sum();
    let (ok_after, failed_after) = report.between(t0, Instant::now());
    let removed_names = removed
        .iter()
        .map(|i| format!("b{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    say(format!(
        "+{}  the daemon's next DNS poll saw 7 tasks gone ({removed_names}): `draining`, i.e. \
         open connections finish, no new ones",
        s(draining)
    ));
    say(format!(
        "+{}  it flipped the Maglev table to 3 active tasks (one atomic map update); in between, \
         the removed",
        s(flipped)
    ));
    say(format!(
        "        tasks still got {in_between} new connections from the old table"
    ));
    say(format!(
        "The last new request a removed task served arrived at +{}; after +{} (poll interval + \
         1 s) they got {late}.",
        last_removed.map_or("-".into(), s),
        s(bound)
    ));
    say(format!(
        "The long download on {long_on} finished on {long_done_on} after {}: draining let it \
         complete.",
        s(long_took)
    ));
    say(format!(
        "{} requests since the DNS change: {} ok, {} failed (slowest request of the step: {:.1?}).",
        n(ok_after + failed_after),
        n(ok_after),
        n(failed_after),
        report.max_latency
    ));
    say(format!(
        "New connections per task in the {} after the flip (data-plane counters):",
        s(Instant::now() - t_flip)
    ));
    print_distribution(&at_flip, &after);
    // Let the drain timeout run out, so that the scale-up below meets new
    // tasks (a task back in DNS while draining returns to rotation at once).
    for &i in &removed {
        let addr = SocketAddr::from((backend_addr(i), HTTP_PORT));
        d.wait_log(&format!("{addr} removed"), cfg.drain_timeout * 2)?;
    }
    say(format!(
        "+{}  the drain timeout ({} s here) ran out: the 7 tasks are forgotten.",
        s(t0.elapsed()),
        cfg.drain_timeout.as_secs()
    ));
    Ok(())
}

/// Step 5: 3 -> 12 under load.
fn scale_up(demo: &mut Demo) -> Result<()> {
    let Demo { tb, d, cfg } = demo;
    step(5, "Scaling up to 12 tasks while traffic flows");
    let load = tb.client().start_rate(&tb.url("/"), RATE);
    nap(Duration::from_millis(300))?;
    let flips = d.count_log("Maglev table flipped service=web active=12 ");
    let t0 = Instant::now();
    say("DNS now answers tasks.web with b0..b11.");
    let old = current_tasks(tb);
    let new: Vec<usize> = (0..TASKS).filter(|i| !old.contains(i)).collect();
    tb.set_tasks(&(0..TASKS).collect::<Vec<_>>());
    let probing_line = format!("{}:{HTTP_PORT} probing", backend_addr(TASKS - 1));
    d.wait_log(&probing_line, Duration::from_secs(5))?;
    let probing = t0.elapsed();
    d.wait_log_count(
        "Maglev table flipped service=web active=12 ",
        flips + 1,
        Duration::from_secs(10),
    )?;
    let all_active = t0.elapsed();
    let _ = wait_for(Duration::from_secs(3), "", || {
        new.iter()
            .all(|&i| tb.backend(i).first_request_since(t0).is_some())
    });
    let before = new_conns(tb)?;
    let t1 = Instant::now();
    nap(Duration::from_millis(1500))?;
    let report = load.stop();
    let after = new_conns(tb)?;
    let mut firsts: Vec<(Duration, usize)> = new
        .iter()
        .filter_map(|&i| tb.backend(i).first_request_since(t0).map(|t| (t - t0, i)))
        .collect();
    firsts.sort();
    say(format!(
        "+{}  the next DNS poll saw 9 new tasks: `probing`, no traffic until {} health checks \
         pass",
        s(probing),
        cfg.rise
    ));
    say(format!(
        "+{}  every one passed and the table holds 12 active tasks",
        s(all_active)
    ));
    if let (Some(first), Some(last)) = (firsts.first(), firsts.last()) {
        say(format!(
            "First request served by a new task: b{} at +{}; the last of the 9 to get one: b{} \
             at +{} ({} of 9 got traffic).",
            first.1,
            s(first.0),
            last.1,
            s(last.0),
            firsts.len()
        ));
    }
    say(format!(
        "{} requests during the step: {} ok, {} failed.",
        n(report.total()),
        n(report.ok),
        n(report.failed)
    ));
    say(format!(
        "New connections per task in the {} after the flip:",
        s(Instant::now() - t1)
    ));
    print_distribution(&before, &after);
    Ok(())
}

/// The tasks DNS lists now, by index.
fn current_tasks(tb: &Testbed) -> Vec<usize> {
    let listed = tb.dns().get(testbed::SERVICE);
    (0..TASKS)
        .filter(|&i| listed.contains(&backend_addr(i)))
        .collect()
}

/// The data plane's BACKENDS index of `addr:80`.
fn backend_index(maps: &PinnedMaps, addr: Ipv4Addr) -> Result<u32> {
    maps.backends()?
        .into_iter()
        .find_map(|(i, b)| {
            (ip_from_bytes(&b.addr, b.family) == IpAddr::V4(addr)
                && u16::from_be(b.port_be) == HTTP_PORT)
                .then_some(i)
        })
        .with_context(|| format!("{addr}:{HTTP_PORT} has no BACKENDS slot"))
}

/// Step 6: a task dies under load.
fn kill_task(demo: &mut Demo) -> Result<()> {
    let Demo { tb, d, cfg } = demo;
    let victim = tb.backend(VICTIM);
    let addr = victim.addr();
    step(
        6,
        &format!(
            "Killing task b{VICTIM} ({addr}) under traffic: its server stops, like a crashed \
             container"
        ),
    );
    let maps = PinnedMaps::open(tb.pin_dir())?;
    let index = backend_index(&maps, addr)?;
    let load = tb.client().start_rate(&tb.url("/"), RATE);
    nap(Duration::from_millis(300))?;
    let down_line = format!("{addr}:{HTTP_PORT} down");
    let bound = cfg.check_interval * cfg.fall + Duration::from_secs(1);
    let t0 = Instant::now();
    victim.stop();
    let mut flows = maps.backend_counters(index)?.new_flows;
    let mut last_flow = None;
    let mut down_at = None;
    let until = t0 + bound + Duration::from_millis(1000);
    while Instant::now() < until {
        interrupted()?;
        let now = maps.backend_counters(index)?.new_flows;
        if now != flows {
            flows = now;
            last_flow = Some(t0.elapsed());
        }
        if down_at.is_none() && d.count_log(&down_line) > 0 {
            down_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = load.stop();
    let down_at = down_at.context("the daemon never marked the dead task down")?;
    let reason = d
        .log()
        .lines()
        .find(|l| l.contains(&down_line))
        .and_then(|l| l.split(&format!("{down_line}: ")).nth(1))
        .map(|r| r.split(" service=").next().unwrap_or(r).to_owned())
        .unwrap_or_default();
    let left = t0 + down_at.max(last_flow.unwrap_or_default());
    let (ok_in, failed_in) = report.between(t0, left);
    let (ok_out, failed_out) = report.between(left, Instant::now());
    say(format!(
        "+{}  the daemon marked it `down` ({reason})",
        s(down_at)
    ));
    say(format!(
        "       the data plane's last new connection to it: {}; the bound is check interval x \
         fall + 1 s = {}",
        last_flow.map_or("none after the kill".into(), |t| format!("+{}", s(t))),
        s(bound)
    ));
    say(format!(
        "Requests sent before it left rotation: {ok_in} ok, {failed_in} failed (connection \
         refused by the dead task);"
    ));
    say(format!("after it: {} ok, {failed_out} failed.", n(ok_out)));
    say("`xdplb backends` (the daemon's view of every task):");
    println!();
    print!("{}", indent(&tb.backends_text()?));
    Ok(())
}

/// `--keep`: print how to poke at the testbed, then wait for Ctrl-C.
fn keep(demo: &Demo) -> Result<()> {
    let tb = &demo.tb;
    let xdplb = testkit::bin::xdplb_bin()?;
    let xdplb = xdplb.display();
    let pin = tb.pin_dir().display();
    let client = tb.client_ns().path();
    let client = client.display();
    let cname = tb.client_ns().name();
    let lb = tb.lb().name();
    println!(
        "\nThe testbed stays up (--keep). Try, in another terminal:\n\
         \n  # a request through the balancer (the answer names the task):\
         \n  nsenter --net={client} curl -s http://{VIP}/\
         \n  ip netns exec {cname} curl -s 'http://{VIP}/slow?ms=3000'\
         \n  # the balancer's counters, tasks, and a live dashboard:\
         \n  {xdplb} stats --pin-dir {pin}\
         \n  {xdplb} stats --watch --pin-dir {pin}\
         \n  {xdplb} backends --pin-dir {pin}\
         \n  {xdplb} top --pin-dir {pin}\
         \n  {xdplb} explain --proto tcp --src {}:40000 --dst {VIP}:80 --pin-dir {pin}\
         \n  # the daemon's log, and the balancer's namespace:\
         \n  tail -f {}\
         \n  ip netns exec {lb} ip -s link\
         \n  ip netns exec {lb} bpftool net\
         \n\nNamespaces: client {cname}, balancer {lb}, overlay {}; tasks b0..b11 at {}..{} \
         (b{VICTIM} stopped), each in\
         \nits own namespace: {} ... (`ip netns list`).\
         \n\nPress Ctrl-C to tear everything down.",
        testbed::CLIENT_ADDR,
        demo.d.log_path().display(),
        tb.ovl().name(),
        backend_addr(0),
        backend_addr(TASKS - 1),
        tb.backend(0).ns().name(),
    );
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let sig = match SIGNAL.load(Ordering::SeqCst) {
        libc::SIGTERM => "SIGTERM",
        _ => "Ctrl-C",
    };
    println!("\n{sig}: cleaning up: daemon, programs, pins, namespaces.");
    Ok(())
}
