//! The daemon under hostile input (issue 13), in the namespace testbed with
//! the real `xdplb`, in TC and XDP modes:
//!
//! 1. A poisoned `tasks.web` answer: beside the 3 real tasks it holds
//!    0.0.0.0, 127.0.0.1, the balancer's two addresses, 224.0.0.1,
//!    255.255.255.255 and 169.254.169.254, while something on the balancer
//!    host listens on the service ports. No request fails, the real tasks
//!    serve everything, the host's listener sees nothing, the rejected
//!    addresses show in `xdplb backends`, and the SNAT source stays put.
//! 2. A map update that cannot succeed (`backend_slots = 4` for two services
//!    of 3 tasks each): the daemon stays up, the failing service keeps its
//!    last good table with the error in `xdplb backends`, the other service
//!    keeps updating, and the failing one recovers once slots free up.
//! 3. SIGHUP (a reload of the unchanged file), SIGUSR1, SIGUSR2 and
//!    SIGPIPE: the daemon logs them, stays up and keeps following DNS.
//!
//! Root only: `cargo test -p tests --test hostile_input -- --test-threads=1`

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use testkit::wait::{wait_for, wait_until};
use tests::testbed::{
    backend_addr, signal, Daemon, DaemonConfig, Mode, Signal, Testbed, Topology, HTTP_PORT,
    LB_OVERLAY_ADDR, SERVICE, UDP_PORT, VIP,
};

tests::both_modes!(poisoned_dns, map_write_failure);

/// Signals do not depend on the hook: TC only.
#[test]
fn common_signals_do_not_end_the_daemon() {
    let tb = Testbed::build(Mode::Tc, Topology::new(2))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let mut cfg = tb.daemon_config();
    cfg.udp = false;
    let mut d = start(&tb, &cfg);
    d.wait_table("web", 2, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pid = d.pid();
    for sig in [
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPIPE,
    ] {
        let name = sig.as_str();
        signal(pid, sig).unwrap_or_else(|e| panic!("sending {name}: {e}"));
        std::thread::sleep(Duration::from_millis(200));
        assert!(d.is_running(), "{name} ended the daemon\n{}", d.log());
    }
    for name in ["SIGUSR1", "SIGUSR2"] {
        d.wait_log(
            &format!("{name} received and ignored"),
            Duration::from_secs(2),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
    // SIGHUP reloads; the file is unchanged.
    d.wait_log(
        "configuration reloaded: nothing changed",
        Duration::from_secs(2),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // Still following DNS and still forwarding.
    let before = flips(&d, "web", 1);
    tb.set_tasks(&[1]);
    next_flip(&mut d, before, "web", 1, Duration::from_secs(10));
    for _ in 0..5 {
        let (who, _) = tb
            .get()
            .unwrap_or_else(|e| panic!("a request after the signals: {e:#}"));
        assert_eq!(who, "b1", "the table follows DNS after the signals");
    }
}

const ACTIVE_TIMEOUT: Duration = Duration::from_secs(15);

fn start(tb: &Testbed, cfg: &DaemonConfig) -> Daemon {
    let args = tb
        .config_args(cfg)
        .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
    let mut d = tb
        .start_daemon(&args)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    d
}

/// Waits for the next Maglev flip of `service` to `active` backends (an
/// earlier flip to the same count, logged during start-up, does not count).
fn next_flip(d: &mut Daemon, before: usize, service: &str, active: usize, timeout: Duration) {
    let line = format!("Maglev table flipped service={service} active={active} ");
    d.wait_log_count(&line, before + 1, timeout)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
}

fn flips(d: &Daemon, service: &str, active: usize) -> usize {
    d.count_log(&format!(
        "Maglev table flipped service={service} active={active} "
    ))
}

fn service<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("service {name} in `xdplb backends --json`: {v:#}"))
}

/// Something on the balancer host that answers on the service ports, the
/// way a host's own web server or DNS cache would. Counts what reaches it.
struct HostListener {
    tcp_accepted: Arc<AtomicU64>,
    udp_received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostListener {
    fn start(tb: &Testbed) -> Self {
        let (tcp, udp) = tb
            .lb()
            .run_in(|| {
                let tcp = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, HTTP_PORT))?;
                let udp = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT))?;
                tcp.set_nonblocking(true)?;
                udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok((tcp, udp))
            })
            .unwrap_or_else(|e| panic!("listening on the balancer host: {e:#}"));
        let tcp_accepted = Arc::new(AtomicU64::new(0));
        let udp_received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (Arc::clone(&tcp_accepted), Arc::clone(&stop));
        let t1 = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 1024];
                        let _ = c.read(&mut buf);
                        let _ = c.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nlb-host\n",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let (count, halt) = (Arc::clone(&udp_received), Arc::clone(&stop));
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !halt.load(Ordering::SeqCst) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = udp.send_to(b"lb-host", from);
                }
            }
        });
        Self {
            tcp_accepted,
            udp_received,
            stop,
            threads: vec![t1, t2],
        }
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn poisoned_dns(mode: Mode) {
    let tb = Testbed::build(mode, Topology::new(3))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let host = HostListener::start(&tb);
    let cfg = tb.daemon_config();
    let mut d = start(&tb, &cfg);
    let tasks: Vec<Ipv4Addr> = (0..3).map(backend_addr).collect();
    let mut all: Vec<SocketAddr> = tasks.iter().map(|&a| (a, HTTP_PORT).into()).collect();
    all.extend(tasks.iter().map(|&a| SocketAddr::from((a, UDP_PORT))));
    d.wait_active(&all, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.diagnostics()));
    d.wait_table("web", 3, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let before = tb.backends_json().unwrap_or_else(|e| panic!("{e:#}"));
    let snat_before = service(&before, "web")["snat_addr"].clone();
    assert_eq!(
        snat_before,
        Value::from(LB_OVERLAY_ADDR.to_string()),
        "the SNAT source is the balancer's overlay address before the attack"
    );

    let load = tb.client().start_rate(&tb.url("/"), 200);
    std::thread::sleep(Duration::from_millis(500));
    let poison: Vec<Ipv4Addr> = [
        "0.0.0.0",
        "127.0.0.1",
        "10.10.0.1",
        "10.20.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "169.254.169.254",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    assert!(poison.contains(&VIP) && poison.contains(&LB_OVERLAY_ADDR));
    let t0 = Instant::now();
    tb.dns().set(
        SERVICE,
        tasks.iter().chain(&poison).copied().collect::<Vec<_>>(),
    );
    let rejected = wait_until(
        Duration::from_secs(5),
        "7 rejected addresses for web",
        || {
            let v = tb.backends_json().ok()?;
            let r = service(&v, "web")["rejected"].as_array()?.clone();
            (r.len() == poison.len()).then_some(r)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    eprintln!("rejected after {:?}: {rejected:?}", t0.elapsed());
    // Keep the load running well past a few DNS polls and check rounds.
    std::thread::sleep(Duration::from_secs(3));
    let udp_replies: Vec<String> = (0..20)
        .map(|i| {
            tb.udp(&format!("m{i}"))
                .unwrap_or_else(|e| panic!("UDP request {i} during the poisoned answer: {e:#}"))
        })
        .collect();
    let report = load.stop();

    assert_eq!(
        report.failed,
        0,
        "no request may fail while DNS is poisoned ({} ok)\n{}",
        report.ok,
        d.log()
    );
    let per_backend = report.per_backend_between(t0, Instant::now());
    let served: BTreeSet<&str> = per_backend.keys().map(String::as_str).collect();
    assert_eq!(
        served,
        BTreeSet::from(["b0", "b1", "b2"]),
        "only the real tasks serve after the poisoned answer: {per_backend:?}"
    );
    for r in &udp_replies {
        assert!(
            ["b0", "b1", "b2"].contains(&r.as_str()),
            "a UDP reply came from a real task: {r:?}"
        );
    }
    assert_eq!(
        (
            host.tcp_accepted.load(Ordering::SeqCst),
            host.udp_received.load(Ordering::SeqCst)
        ),
        (0, 0),
        "nothing (no client flow, no health check) reached the balancer host's own listener"
    );
    let after = tb.backends_json().unwrap_or_else(|e| panic!("{e:#}"));
    for name in ["web", "web-udp"] {
        let svc = service(&after, name);
        let got: BTreeSet<IpAddr> = svc["rejected"]
            .as_array()
            .expect("rejected list")
            .iter()
            .map(|r| r["addr"].as_str().unwrap().parse().unwrap())
            .collect();
        let want: BTreeSet<IpAddr> = poison.iter().map(|&a| IpAddr::V4(a)).collect();
        assert_eq!(
            got, want,
            "{name}: every poisoned address shows as rejected"
        );
        let backends: BTreeSet<String> = svc["backends"]
            .as_array()
            .expect("backends list")
            .iter()
            .map(|b| b["addr"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            backends.len(),
            3,
            "{name}: only the 3 tasks are backends: {backends:?}"
        );
    }
    assert_eq!(
        service(&after, "web")["snat_addr"],
        snat_before,
        "the SNAT source did not move"
    );
    let text = tb.backends_text().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        text.contains("127.0.0.1") && text.contains("from DNS: loopback address"),
        "`xdplb backends` shows the rejection:\n{text}"
    );
    let warned = d.count_log("DNS answer rejected");
    assert_eq!(
        warned,
        2 * poison.len(),
        "each rejected address is logged once per service, not once per poll"
    );
    assert!(d.is_running(), "the daemon is still running\n{}", d.log());
    eprintln!(
        "{} requests, 0 failed; served by {per_backend:?}; rejected {} addresses per service",
        report.ok,
        poison.len()
    );
}

fn map_write_failure(mode: Mode) {
    let tb = Testbed::build(mode, Topology::new(3))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let mut cfg = tb.daemon_config();
    // Two services of 3 tasks each need 6 backend slots.
    cfg.extra_top = "backend_slots = 4\n".into();
    let mut d = start(&tb, &cfg);
    let (ok, failing) = wait_until(
        Duration::from_secs(15),
        "one service updated, the other failing for lack of slots",
        || {
            let v = tb.backends_json().ok()?;
            let err = |n| {
                service(&v, n)["error"]["message"]
                    .as_str()
                    .map(str::to_owned)
            };
            match (err("web"), err("web-udp")) {
                (None, Some(m)) if m.contains("no free backend slot") => Some(("web", "web-udp")),
                (Some(m), None) if m.contains("no free backend slot") => Some(("web-udp", "web")),
                _ => None,
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    d.wait_table(ok, 3, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let check = |name: &str| {
        if name == "web" {
            for _ in 0..10 {
                tb.get()
                    .unwrap_or_else(|e| panic!("HTTP through {name}: {e:#}"));
            }
        } else {
            for i in 0..10 {
                tb.udp(&format!("m{i}"))
                    .unwrap_or_else(|e| panic!("UDP through {name}: {e:#}"));
            }
        }
    };
    check(ok);
    assert!(
        d.is_running(),
        "the daemon survives a failing map update\n{}",
        d.log()
    );
    let text = tb.backends_text().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        text.contains(&format!("{failing}: map update failing for"))
            && text.contains("no free backend slot"),
        "`xdplb backends` names the failing update:\n{text}"
    );
    assert_eq!(
        d.count_log("map update failed"),
        1,
        "the same error is logged once, not once per retry\n{}",
        d.log()
    );

    // Scale down: the healthy service keeps updating and frees a slot, and
    // the failing one's retry then fits.
    let (ok_before, failing_before) = (flips(&d, ok, 2), flips(&d, failing, 2));
    assert_eq!(
        failing_before,
        0,
        "the failing service never flipped\n{}",
        d.log()
    );
    tb.set_tasks(&[0, 1]);
    next_flip(&mut d, ok_before, ok, 2, Duration::from_secs(10));
    next_flip(&mut d, failing_before, failing, 2, Duration::from_secs(30));
    wait_for(
        Duration::from_secs(5),
        "no service reports an error",
        || {
            tb.backends_json().is_ok_and(|v| {
                service(&v, "web")["error"].is_null() && service(&v, "web-udp")["error"].is_null()
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let v = tb.backends_json().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        service(&v, failing)["map_write_errors"].as_u64() >= Some(1),
        "the failures were counted: {v:#}"
    );
    check("web");
    check("web-udp");
    assert!(
        d.count_log("map update succeeded again") >= 1,
        "{}",
        d.log()
    );
    assert!(d.is_running());
}
