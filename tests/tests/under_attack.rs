//! The hostile layer (issue 12): the namespace testbed with the real daemon,
//! in TC and XDP modes, under attack from the client side while keep-alive
//! connections and a steady stream of new connections run:
//!
//! 1. a SYN flood from random sources (`hping3 -S --flood --rand-source`);
//! 2. a bare-ACK flood from random sources (`hping3 -A --flood ...`);
//! 3. forged RSTs and UDP "replies" from every task's address to every SNAT
//!    port (10,000 each), sent from the client side;
//! 4. forged ICMP port-unreachables from every task's address quoting every
//!    SNAT port.
//!
//! It shows: no request fails on a connection opened before the attack; at
//! least 95% of new connections succeed during the SYN flood, all of them
//! from 2 s after any flood ends; forged packets exhaust no SNAT port and
//! change no live flow (each keep-alive connection stays on its backend,
//! and the forgeries are counted as refused). The summary line per phase
//! goes to stderr (`--nocapture`).
//!
//! Root only, needs hping3 (`cargo xtask setup`):
//! `cargo test -p tests --test under_attack -- --test-threads=1`

use std::time::{Duration, Instant};

use tests::{
    attack::{self, FloodKind, Hping},
    testbed::{
        backend_addr, KeepAlive, LoadReport, Mode, Testbed, Topology, HTTP_PORT, LB_OVERLAY_ADDR,
        UDP_PORT, VIP,
    },
};

tests::both_modes!(floods_and_forgeries_cost_live_flows_nothing);

const TASKS: usize = 3;
const KEEPALIVE: usize = 4;
/// New connections per second throughout.
const NEW_PER_SEC: u32 = 20;
const FLOOD: Duration = Duration::from_secs(5);
/// After a flood: the 2 s it may take to recover, then a stretch in which
/// every new connection must succeed.
const SETTLE: Duration = Duration::from_secs(2);
const CALM: Duration = Duration::from_secs(3);
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 20000..=29999;

fn floods_and_forgeries_cost_live_flows_nothing(mode: Mode) {
    attack::require_hping3().unwrap_or_else(|e| panic!("{e:#}"));
    let tb = Testbed::build(mode, Topology::new(TASKS))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let cfg = tb.daemon_config();
    let args = tb
        .config_args(&cfg)
        .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
    let mut d = tb
        .start_daemon(&args)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_table("web", TASKS, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"));

    let vip = std::net::SocketAddr::from((VIP, HTTP_PORT));
    let kept: Vec<KeepAlive> = (0..KEEPALIVE)
        .map(|i| {
            KeepAlive::start(tb.client_ns(), vip, false)
                .unwrap_or_else(|e| panic!("keep-alive connection {i}: {e:#}"))
        })
        .collect();
    let load = tb.client().start_rate(&tb.url("/"), NEW_PER_SEC);
    std::thread::sleep(Duration::from_secs(1));
    let before = tb.reason_stats().unwrap_or_else(|e| panic!("{e:#}"));

    // Floods: (kind, start, end, packets per second).
    let mut floods = Vec::new();
    for kind in [FloodKind::Syn, FloodKind::Ack] {
        let h = Hping::flood(tb.client_ns(), tb.dir(), kind, VIP, HTTP_PORT)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let t0 = Instant::now();
        std::thread::sleep(FLOOD);
        let sent = h
            .stop()
            .unwrap_or_else(|e| panic!("{}: {e:#}", kind.label()));
        let t1 = Instant::now();
        assert!(
            sent.packets > 10_000,
            "{}: hping3 sent only {} packets",
            kind.label(),
            sent.packets
        );
        floods.push((kind, t0, t1, sent.rate()));
        std::thread::sleep(SETTLE + CALM);
    }

    // Forgeries from the client side, aimed at every reverse tuple a live
    // flow could have.
    let forged_from = Instant::now();
    let mut forged = 0u64;
    for i in 0..TASKS {
        let task = backend_addr(i);
        for (port, flags) in [(HTTP_PORT, Some("-R")), (UDP_PORT, None)] {
            let s = attack::spoof_sweep(
                tb.client_ns(),
                tb.dir(),
                task,
                port,
                LB_OVERLAY_ADDR,
                SNAT_PORTS,
                flags,
            )
            .unwrap_or_else(|e| panic!("forging from {task}:{port}: {e:#}"));
            forged += s.packets;
        }
        forged += attack::forged_icmp_sweep(
            tb.client_ns(),
            task,
            HTTP_PORT,
            LB_OVERLAY_ADDR,
            SNAT_PORTS,
            true,
        )
        .unwrap_or_else(|e| panic!("forging ICMP errors from {task}: {e:#}"));
    }
    let forged_to = Instant::now();
    std::thread::sleep(SETTLE + CALM);
    let end = Instant::now();
    std::thread::sleep(Duration::from_millis(500));

    let report = load.stop();
    let after = tb.reason_stats().unwrap_or_else(|e| panic!("{e:#}"));
    let delta =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    let kept: Vec<_> = kept.into_iter().map(KeepAlive::stop).collect();
    let log = d.log();

    // The summary, for the closing note and for a failure.
    let mut summary = format!("{} mode:\n", mode.as_str());
    for (kind, t0, t1, rate) in &floods {
        let (ok, failed) = report.between(*t0, *t1);
        let (ok2, failed2) = report.between(*t1 + SETTLE, *t1 + SETTLE + CALM);
        summary.push_str(&format!(
            "  {}: {:.0} packets/s; new connections during it {ok}/{}, from 2 s after it \
             {ok2}/{}\n",
            kind.label(),
            rate,
            ok + failed,
            ok2 + failed2
        ));
    }
    let (ok, failed) = report.between(forged_from, forged_to);
    summary.push_str(&format!(
        "  forgeries: {forged} packets in {:.1} s; new connections meanwhile {ok}/{}\n",
        (forged_to - forged_from).as_secs_f64(),
        ok + failed
    ));
    for k in &kept {
        summary.push_str(&format!(
            "  keep-alive: {} requests ok, {} failed, backends {:?}\n",
            k.ok(),
            k.failed(),
            k.backends()
        ));
    }
    let reasons: Vec<String> = after
        .keys()
        .filter(|n| !n.starts_with("fwd_") && delta(n) > 0)
        .map(|n| format!("{n} {}", delta(n)))
        .collect();
    summary.push_str(&format!("  reasons: {}\n", reasons.join(", ")));
    eprintln!("{summary}");

    // Connections opened before the attack: every request answered, by
    // the backend it started on, and still answering at the end.
    for k in &kept {
        assert_eq!(
            k.failed(),
            0,
            "a keep-alive connection failed: {:?}\n{summary}",
            k.first_error()
        );
        assert_eq!(
            k.backends().len(),
            1,
            "a keep-alive connection moved\n{summary}"
        );
        assert!(
            k.ok_since(end) > 0,
            "a keep-alive connection stopped\n{summary}"
        );
    }
    // New connections: 95% during the SYN flood, all from 2 s after each
    // flood ended and during the forgeries.
    let rate = |r: &LoadReport, a: Instant, b: Instant| {
        let (ok, failed) = r.between(a, b);
        (ok, ok + failed)
    };
    for (kind, t0, t1, _) in &floods {
        if *kind == FloodKind::Syn {
            let (ok, all) = rate(&report, *t0, *t1);
            assert!(
                all > 0 && ok * 100 >= all * 95,
                "SYN flood: {ok}/{all} new connections\n{summary}"
            );
        }
        let (ok, all) = rate(&report, *t1 + SETTLE, *t1 + SETTLE + CALM);
        assert!(
            all > 0 && ok == all,
            "after the {}: {ok}/{all}\n{summary}",
            kind.label()
        );
    }
    let (ok, all) = rate(&report, forged_from, end);
    assert!(
        all > 0 && ok == all,
        "during and after the forgeries: {ok}/{all}\n{summary}"
    );
    // Forged packets: no SNAT port exhausted, and each kind refused.
    assert_eq!(delta("drop_snat_exhausted"), 0, "{summary}");
    assert!(
        delta("drop_reply_wrong_iface") > 0,
        "the forged replies were not seen\n{summary}"
    );
    assert!(
        delta("drop_icmp_rejected") > 0,
        "the forged ICMP errors were not seen\n{summary}"
    );
    assert!(d.is_running(), "the daemon ended:\n{log}");
}
