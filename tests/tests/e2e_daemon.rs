//! End to end: the real `xdplb` daemon in the namespace testbed
//! (`tests::testbed`), with real HTTP and UDP traffic, proving the restart
//! story: pinned links keep forwarding without a daemon, a restarted daemon
//! adopts the pinned state (connection table included), SIGTERM cleans up
//! unless `--persist`, draining lets flows finish, and one pin directory
//! admits one daemon. A last scenario drives the testbed's faults (stopped
//! and vanished backends, a failing resolver, a truncated DNS answer).
//!
//! Root only, one test at a time, after building the daemon:
//! `cargo build -p lb-user && cargo test -p tests --test e2e_daemon -- --test-threads=1 --nocapture`
//!
//! Every scenario runs in TC and in XDP mode and prints the numbers it saw.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use testkit::wait::wait_for;
use tests::testbed::{
    backend_addr, Daemon, DnsMode, LoadReport, Mode, Testbed, HTTP_PORT, SERVICE, UDP_PORT,
};

tests::both_modes!(
    basic,
    kill9_keeps_forwarding_and_restart_adopts,
    sigterm_cleans_up_unless_persist,
    drain_lets_flows_finish,
    second_instance_is_refused,
    faults,
);

const ACTIVE_TIMEOUT: Duration = Duration::from_secs(10);

fn http_backends(indices: &[usize]) -> Vec<SocketAddr> {
    indices
        .iter()
        .map(|&i| SocketAddr::from((backend_addr(i), HTTP_PORT)))
        .collect()
}

fn udp_backends(indices: &[usize]) -> Vec<SocketAddr> {
    indices
        .iter()
        .map(|&i| SocketAddr::from((backend_addr(i), UDP_PORT)))
        .collect()
}

/// A request's outcome on one line.
fn show(r: &anyhow::Result<(String, Duration)>) -> String {
    match r {
        Ok((name, latency)) => format!("{name} in {latency:.2?}"),
        Err(e) => format!("error: {e:#}"),
    }
}

/// A testbed with `n` backends, all in DNS; panics with the reason.
fn testbed(mode: Mode, n: usize) -> Testbed {
    Testbed::new(mode, n).unwrap_or_else(|e| panic!("building the testbed: {e:#}"))
}

/// Starts the daemon with the testbed's config file (plus `extra` flags)
/// and waits until it runs and every backend in `active` is in rotation.
fn start(tb: &Testbed, extra: &[&str], active: &[usize]) -> Daemon {
    let mut args = tb
        .daemon_args()
        .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
    args.extend(extra.iter().map(|s| s.to_string()));
    start_with(tb, &args, active)
}

/// [`start`] with the given arguments.
fn start_with(tb: &Testbed, args: &[String], active: &[usize]) -> Daemon {
    let mut d = tb
        .start_daemon(args)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    let mut all = http_backends(active);
    all.extend(udp_backends(active));
    d.wait_active(&all, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.diagnostics()));
    for service in ["web", "web-udp"] {
        d.wait_table(service, active.len(), ACTIVE_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    d
}

/// Panics unless every request of `report` succeeded and exactly the
/// backends `names` answered.
fn assert_all_ok(tb: &Testbed, what: &str, report: &LoadReport, names: &[&str]) {
    eprintln!("{what}: {report}");
    assert_eq!(
        report.failed,
        0,
        "{what}: expected no failed request, saw {report}\n{}",
        tb.diagnostics()
    );
    let seen: BTreeSet<&str> = report.per_backend.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(
        seen,
        expected,
        "{what}: expected answers from {expected:?}, saw {report}\n{}",
        tb.diagnostics()
    );
}

/// 1. Three backends in DNS: once they are active, 300 requests on new
///    connections all succeed and reach all three; UDP works too.
fn basic(mode: Mode) {
    let tb = testbed(mode, 3);
    let _d = start(&tb, &[], &[0, 1, 2]);

    let report = tb.load(300, 4);
    assert_all_ok(&tb, "300 requests", &report, &["b0", "b1", "b2"]);
    assert_eq!(report.ok, 300, "{report}");

    let mut udp_seen = BTreeSet::new();
    for i in 0..30 {
        let name = tb
            .udp(&format!("ping {i}"))
            .unwrap_or_else(|e| panic!("UDP round trip {i}: {e:#}\n{}", tb.diagnostics()));
        udp_seen.insert(name);
    }
    eprintln!("30 UDP round trips answered by {udp_seen:?}");
    assert!(
        udp_seen.len() >= 2,
        "30 UDP flows should spread over the 3 backends, saw {udp_seen:?}"
    );
    eprintln!("{}", tb.diagnostics());
}

/// 2. kill -9 leaves the pinned links forwarding (a long flow finishes, new
///    flows work), and a restarted daemon adopts the pinned state: the
///    connection table survives (a flow from before the restart completes),
///    and a load run across the restart sees no failure.
fn kill9_keeps_forwarding_and_restart_adopts(mode: Mode) {
    let tb = testbed(mode, 3);
    let args = tb.daemon_args().expect("config");
    let mut d = start_with(&tb, &args, &[0, 1, 2]);

    let mut long = tb.slow(3000);
    let on = long.backend().expect("the long request got its headers");
    std::thread::sleep(Duration::from_millis(500));
    d.kill9().expect("kill -9");
    let killed_at = Instant::now();
    assert!(tb.pins_exist(), "pins must survive kill -9");

    let report = tb.load(100, 4);
    assert_all_ok(
        &tb,
        "100 requests with no daemon",
        &report,
        &["b0", "b1", "b2"],
    );
    let (name, took) = long.wait().unwrap_or_else(|e| {
        panic!(
            "the long request across kill -9: {e:#}\n{}",
            tb.diagnostics()
        )
    });
    eprintln!(
        "long request on {on}: completed on {name} in {took:.2?} ({:.2?} after kill -9)",
        killed_at.elapsed()
    );
    assert_eq!(name, on);

    // A flow established before the restart, to finish after it.
    let mut across = tb.slow(4000);
    let across_on = across
        .backend()
        .expect("headers of the flow across the restart");
    let load = tb.client().start_load(&tb.url("/"), 2);
    std::thread::sleep(Duration::from_millis(300));

    let before = tb.conns().expect("reading CONNS");
    let restart_at = Instant::now();
    let mut d2 = tb.start_daemon(&args).expect("restarting the daemon");
    d2.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    d2.wait_active(&http_backends(&[0, 1, 2]), ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ready_after = restart_at.elapsed();
    // The table was kept if the entries from before the restart are still
    // there, created at the same instant (a re-created entry would carry a
    // new creation time, even where the hash gave it the same SNAT port).
    let after = tb.conns().expect("reading CONNS");
    let kept = before
        .iter()
        .filter(|(k, c)| after.get(*k).is_some_and(|a| a.created_ns == c.created_ns))
        .count();
    eprintln!(
        "restart: ready after {ready_after:.2?}; {kept} of {} CONNS entries from before the \
         restart kept with their creation time ({} entries now)",
        before.len(),
        after.len()
    );
    assert_eq!(
        kept,
        before.len(),
        "the restart must keep every connection-table entry"
    );
    // Keep the load going through the restarted daemon's first DNS polls and
    // health checks (several intervals).
    std::thread::sleep(Duration::from_millis(1500));
    let report = load.stop();
    let log = d2.log();
    eprintln!(
        "restart: {:?}",
        log.lines()
            .find(|l| l.contains("adopted pinned connection table"))
    );
    assert!(
        log.contains("adopted pinned connection table"),
        "the restarted daemon must adopt the pinned connection table; log:\n{log}"
    );
    assert_all_ok(&tb, "load across the restart", &report, &["b0", "b1", "b2"]);
    let (name, took) = across.wait().unwrap_or_else(|e| {
        panic!(
            "the flow from before the restart must complete: {e:#}\n{}",
            tb.diagnostics()
        )
    });
    eprintln!("flow across the restart: {across_on} -> completed on {name} in {took:.2?}");
    assert_eq!(name, across_on);

    let after = tb.load(100, 4);
    assert_all_ok(
        &tb,
        "100 requests after the restart",
        &after,
        &["b0", "b1", "b2"],
    );
}

/// 3. SIGTERM without `--persist` detaches and removes the pins (the VIP is
///    the balancer's own address again: connection refused); with
///    `--persist` forwarding goes on after exit until `xdplb down`.
fn sigterm_cleans_up_unless_persist(mode: Mode) {
    let tb = testbed(mode, 2);
    let mut d = start(&tb, &[], &[0, 1]);
    assert_all_ok(&tb, "before SIGTERM", &tb.load(50, 2), &["b0", "b1"]);
    let status = d.sigterm().expect("SIGTERM");
    assert!(
        status.success(),
        "SIGTERM: expected exit 0, saw {status}; log:\n{}",
        d.log()
    );
    assert!(
        !tb.pins_exist(),
        "without --persist the pin dir {} must be gone",
        tb.pin_dir().display()
    );
    let refused = tb.get();
    eprintln!("after SIGTERM: GET / -> {}", show(&refused));
    match refused {
        Ok(hit) => {
            panic!("after SIGTERM without --persist the VIP still reaches a backend: {hit:?}")
        }
        Err(e) => assert!(
            format!("{e:#}").contains("refused"),
            "expected the balancer's own stack to refuse the connection, saw {e:#}"
        ),
    }

    let mut d = start(&tb, &["--persist"], &[0, 1]);
    let status = d.sigterm().expect("SIGTERM");
    assert!(
        status.success(),
        "SIGTERM --persist: expected exit 0, saw {status}"
    );
    assert!(tb.pins_exist(), "--persist must leave the pins");
    let report = tb.load(100, 4);
    assert_all_ok(
        &tb,
        "with no daemon after --persist",
        &report,
        &["b0", "b1"],
    );

    let out = tb.down().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("xdplb down: {}", out.trim());
    assert!(
        !tb.pins_exist(),
        "xdplb down must remove {}",
        tb.pin_dir().display()
    );
    let refused = tb.get();
    eprintln!("after xdplb down: GET / -> {}", show(&refused));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("refused")),
        "after xdplb down the VIP must be the balancer's own (refused), saw {refused:?}"
    );
}

/// 4. A task leaves DNS while a long request runs on it: the request
///    completes (draining), and new requests after a poll interval plus 1 s
///    never go to it.
fn drain_lets_flows_finish(mode: Mode) {
    let tb = testbed(mode, 3);
    let cfg = tb.daemon_config();
    let mut d = start(&tb, &[], &[0, 1, 2]);

    let mut long = tb.slow(2000);
    let on = long.backend().expect("the long request got its headers");
    let gone = tb.backend_named(&on).expect("a known backend");
    let gone_index: usize = on[1..].parse().expect("bN");
    let keep: Vec<usize> = (0..3).filter(|&i| i != gone_index).collect();
    tb.set_tasks(&keep);
    let removed_at = Instant::now();
    let gone_addr = SocketAddr::from((gone.addr(), HTTP_PORT));
    d.wait_log(&format!("{gone_addr} draining"), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{on} draining after {:.2?}", removed_at.elapsed());

    let (name, took) = long.wait().unwrap_or_else(|e| {
        panic!(
            "the draining task's request must complete: {e:#}\n{}",
            tb.diagnostics()
        )
    });
    eprintln!("long request on draining {on} completed on {name} in {took:.2?}");
    assert_eq!(name, on);

    let settle = cfg.dns_interval + Duration::from_secs(1);
    std::thread::sleep(settle.saturating_sub(removed_at.elapsed()));
    let served_before = gone.stats().requests;
    let report = tb.load(200, 4);
    let names: Vec<String> = keep.iter().map(|i| format!("b{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_all_ok(&tb, "200 requests after the drain began", &report, &names);
    let served = gone.stats().requests - served_before;
    assert_eq!(
        served, 0,
        "the removed task {on} served {served} new requests"
    );
}

/// 5. A second `xdplb run` on the same pin dir exits non-zero naming the
///    running instance; the first keeps working.
fn second_instance_is_refused(mode: Mode) {
    let tb = testbed(mode, 2);
    let first = start(&tb, &[], &[0, 1]);
    // The short form of the command line, as an operator would type it.
    let mut second = tb
        .start_daemon(&tb.daemon_args_short())
        .expect("starting the second daemon");
    let status = second
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = second.log();
    eprintln!("second instance: {status}: {}", log.trim());
    assert!(
        !status.success(),
        "the second instance must fail, saw {status}"
    );
    let pid = format!("pid {}", first.pid());
    assert!(
        log.contains("another xdplb instance") && log.contains(&pid),
        "the error must name the other instance ({pid}); saw:\n{log}"
    );
    wait_for(Duration::from_secs(1), "pins to stay", || tb.pins_exist()).expect("pins");
    assert_all_ok(
        &tb,
        "first instance after the refusal",
        &tb.load(100, 4),
        &["b0", "b1"],
    );
}

/// 6. The testbed's faults, and the daemon's answers to them: a backend that
///    stops breaks its long request and leaves rotation until it is started
///    again; a backend whose interface vanishes leaves rotation; SERVFAIL and
///    a silent resolver keep the task set; 40 tasks arrive over TCP after a
///    truncated UDP answer.
fn faults(mode: Mode) {
    let tb = testbed(mode, 3);
    let mut d = start(&tb, &[], &[0, 1, 2]);
    let flips = |d: &Daemon, n: usize| {
        d.count_log(&format!("Maglev table flipped service=web active={n} "))
    };

    // stop(): its connections close, so the long request breaks off.
    let mut long = tb.slow(3000);
    let on = long.backend().expect("the long request got its headers");
    let stopped_index: usize = on[1..].parse().expect("bN");
    let stopped = tb.backend(stopped_index);
    let stopped_addr = SocketAddr::from((stopped.addr(), HTTP_PORT));
    std::thread::sleep(Duration::from_millis(300));
    // Flips are coalesced (the bring-up may go 1 -> 3 active at once), so
    // count the ones after each action.
    let flips2_before = flips(&d, 2);
    stopped.stop();
    let broken = long.wait();
    eprintln!("long request on {on} across stop(): {}", show(&broken));
    assert!(
        broken.is_err(),
        "stopping {on} must break its long request, saw {}",
        show(&broken)
    );
    d.wait_log(&format!("{stopped_addr} down"), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let up: Vec<usize> = (0..3).filter(|&i| i != stopped_index).collect();
    let up_names: Vec<String> = up.iter().map(|i| format!("b{i}")).collect();
    let up_names: Vec<&str> = up_names.iter().map(String::as_str).collect();
    wait_for(
        ACTIVE_TIMEOUT,
        "the table without the stopped backend",
        || flips(&d, 2) > flips2_before,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    assert_all_ok(
        &tb,
        &format!("with {on} stopped"),
        &tb.load(100, 4),
        &up_names,
    );

    // start(): back in rotation once rise checks pass.
    let flips3_before = flips(&d, 3);
    stopped.start().expect("restarting the backend");
    d.wait_log_count(&format!("{stopped_addr} active"), 2, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for(ACTIVE_TIMEOUT, "the table with 3 backends again", || {
        flips(&d, 3) > flips3_before
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    assert_all_ok(
        &tb,
        &format!("with {on} started again"),
        &tb.load(150, 4),
        &["b0", "b1", "b2"],
    );

    // remove_interface(): nothing is closed, the checks time out.
    let gone_index = up[0];
    let gone = tb.backend(gone_index);
    let gone_addr = SocketAddr::from((gone.addr(), HTTP_PORT));
    let flips2_before = flips(&d, 2);
    gone.remove_interface().expect("removing the interface");
    let removed_at = Instant::now();
    d.wait_log(&format!("{gone_addr} down"), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "b{gone_index} down {:.2?} after its interface vanished",
        removed_at.elapsed()
    );
    let alive: Vec<usize> = (0..3).filter(|&i| i != gone_index).collect();
    let alive_names: Vec<String> = alive.iter().map(|i| format!("b{i}")).collect();
    let alive_names: Vec<&str> = alive_names.iter().map(String::as_str).collect();
    wait_for(
        ACTIVE_TIMEOUT,
        "the table without the vanished backend",
        || flips(&d, 2) > flips2_before,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    assert_all_ok(
        &tb,
        &format!("with b{gone_index} gone"),
        &tb.load(100, 4),
        &alive_names,
    );

    // SERVFAIL, then no answers at all: the set stays.
    let changes = d.count_log("task set of");
    for mode in [DnsMode::ServFail, DnsMode::Drop] {
        let before = tb.dns().stats();
        tb.dns().set_mode(mode);
        wait_for(
            Duration::from_secs(5),
            &format!("4 queries answered with {mode:?}"),
            || tb.dns().stats().udp >= before.udp + 4,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let report = tb.load(100, 4);
        assert_all_ok(&tb, &format!("DNS {mode:?}"), &report, &alive_names);
    }
    let (changed, drained) = (
        d.count_log("task set of") - changes,
        d.count_log(" draining: ") + d.count_log(" removed: "),
    );
    assert_eq!(
        (changed, drained),
        (0, 0),
        "resolver failures must change no task set and drain or remove nothing; log:\n{}",
        d.log()
    );

    // 40 tasks (38 of them addresses nobody answers): the UDP answer is
    // truncated, the full one comes over TCP.
    let before = tb.dns().stats();
    let mut tasks: Vec<Ipv4Addr> = alive.iter().map(|&i| backend_addr(i)).collect();
    tasks.extend((100..138).map(|last| Ipv4Addr::new(10, 20, 0, last)));
    tb.dns().set(SERVICE, tasks);
    d.wait_log("10.20.0.137:80 probing", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the last of 40 tasks must arrive (over TCP): {e:#}"));
    let after = tb.dns().stats();
    eprintln!(
        "40 tasks: {} UDP queries ({} truncated, biggest answer {} B), {} TCP queries",
        after.udp - before.udp,
        after.truncated - before.truncated,
        after.max_udp_len,
        after.tcp - before.tcp
    );
    assert!(
        after.truncated > before.truncated,
        "the UDP answer must be truncated: {after:?}"
    );
    assert!(
        after.tcp > before.tcp,
        "the full answer must come over TCP: {after:?}"
    );
    assert!(
        after.max_udp_len <= 512,
        "UDP answers stay within 512 bytes: {after:?}"
    );
    assert_all_ok(
        &tb,
        "with 38 dead tasks in DNS",
        &tb.load(100, 4),
        &alive_names,
    );
}
