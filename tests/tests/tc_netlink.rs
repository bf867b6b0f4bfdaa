//! TC on kernels without tcx (before 6.6): the real daemon attaches its TC
//! program as a clsact ingress filter through netlink, at xdplb's fixed
//! priority and handle, and it behaves as the pinned tcx link does. This
//! kernel has tcx, so the daemon is told to do without it
//! (`XDPLB_PRETEND_MISSING=tcx`, the test knob in `lb_user::dataplane::probe`).
//!
//! - traffic flows through the filter;
//! - `kill -9`: the filter stays and keeps forwarding;
//! - a restart adopts the filter: the program is replaced in place (a new
//!   program id at the same priority and handle), with load running across;
//! - a start with tcx again (a kernel upgrade) moves to a tcx link and
//!   deletes the filter;
//! - `xdplb down` and SIGTERM delete exactly our filter (a filter of
//!   someone else's on the same clsact qdisc stays).
//!
//! Root only, one test at a time, after building the daemon:
//! `cargo build -p lb-user && cargo test -p tests --test tc_netlink -- --test-threads=1 --nocapture`

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_user::dataplane::clsact;
use tests::testbed::{backend_addr, Daemon, LoadReport, Mode, Testbed, HTTP_PORT, UDP_PORT};

tests::both_modes!(clsact_filter_lifecycle, sigterm_removes_only_our_filter);

const NO_TCX: &[(&str, &str)] = &[("XDPLB_PRETEND_MISSING", "tcx")];
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(10);
const IFACES: [&str; 2] = ["eth0", "eth1"];

fn testbed(mode: Mode, n: usize) -> Testbed {
    Testbed::new(mode, n).unwrap_or_else(|e| panic!("building the testbed: {e:#}"))
}

/// Starts the daemon with `env` and waits until backends 0 and 1 serve
/// (a restart adopts them: no table flip to wait for).
fn start(tb: &Testbed, env: &[(&str, &str)], restart: bool) -> Daemon {
    let args = tb
        .daemon_args()
        .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
    let mut d = tb
        .start_daemon_env(&args, env)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    let mut all: Vec<SocketAddr> = (0..2)
        .map(|i| SocketAddr::from((backend_addr(i), HTTP_PORT)))
        .collect();
    all.extend((0..2).map(|i| SocketAddr::from((backend_addr(i), UDP_PORT))));
    d.wait_active(&all, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.diagnostics()));
    if !restart {
        for service in ["web", "web-udp"] {
            d.wait_table(service, 2, ACTIVE_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
    }
    d
}

fn assert_all_ok(tb: &Testbed, what: &str, report: &LoadReport) {
    eprintln!("{what}: {report}");
    assert!(
        report.failed == 0 && report.ok > 0,
        "{what}: expected every request to succeed, saw {report}\n{}",
        tb.diagnostics()
    );
}

/// `tc filter show dev IFACE ingress` inside `lb`.
fn tc_filters(tb: &Testbed, iface: &str) -> String {
    tb.lb()
        .exec(&["tc", "filter", "show", "dev", iface, "ingress"])
        .unwrap_or_else(|e| panic!("tc filter show dev {iface} ingress: {e:#}"))
}

/// The program id of our filter on `iface`, from `tc filter show`; panics
/// unless exactly one filter runs `xdplb_tc`, at xdplb's priority and handle.
fn our_filter(tb: &Testbed, iface: &str) -> u32 {
    let out = tc_filters(tb, iface);
    let ours: Vec<&str> = out.lines().filter(|l| l.contains("xdplb_tc")).collect();
    let place = format!(
        "pref {} bpf chain 0 handle {:#x} xdplb_tc",
        clsact::PRIORITY,
        clsact::HANDLE
    );
    assert!(
        ours.len() == 1 && ours[0].contains(&place),
        "{iface}: expected one filter `{place} ...`, saw:\n{out}"
    );
    let id = ours[0]
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .and_then(|w| w.parse().ok());
    id.unwrap_or_else(|| panic!("{iface}: no program id in {:?}", ours[0]))
}

fn assert_no_filter(tb: &Testbed, iface: &str, when: &str) {
    let out = tc_filters(tb, iface);
    assert!(
        !out.contains("xdplb_tc"),
        "{when}: {iface} must have no xdplb filter left, saw:\n{out}"
    );
}

fn assert_vip_refused(tb: &Testbed, when: &str) {
    let r = tb.get();
    assert!(
        r.as_ref()
            .is_err_and(|e| format!("{e:#}").contains("refused")),
        "{when}: the VIP must be the balancer's own address again (refused), saw {r:?}"
    );
}

fn pins(tb: &Testbed) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(tb.pin_dir().join("links"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn clsact_filter_lifecycle(mode: Mode) {
    let tb = testbed(mode, 2);

    // 1. Attached as a filter, recorded in the pin directory, forwarding.
    let mut d = start(&tb, NO_TCX, false);
    let log = d.log();
    for iface in IFACES {
        let line = format!(
            "{iface}: tcx hidden by XDPLB_PRETEND_MISSING: attached a clsact ingress filter \
             (netlink, priority {}, handle {:#x}) instead",
            clsact::PRIORITY,
            clsact::HANDLE
        );
        assert!(log.contains(&line), "expected `{line}` in the log:\n{log}");
    }
    eprintln!(
        "{}",
        log.lines()
            .find(|l| l.contains("eth0: tcx hidden"))
            .unwrap_or_default()
    );
    let first: Vec<u32> = IFACES.iter().map(|i| our_filter(&tb, i)).collect();
    let mut want_pins = vec!["eth0@clsact".to_string(), "eth1@clsact".to_string()];
    if mode == Mode::Xdp {
        want_pins = vec!["eth0@clsact", "eth0@xdp", "eth1@clsact", "eth1@xdp"]
            .into_iter()
            .map(String::from)
            .collect();
    }
    assert_eq!(pins(&tb), want_pins, "pins under links/");
    assert_all_ok(&tb, "through the clsact filter", &tb.load(100, 4));

    // 2. kill -9: the filter holds the program and keeps forwarding.
    d.kill9().expect("kill -9");
    assert_eq!(
        IFACES.map(|i| our_filter(&tb, i)).to_vec(),
        first,
        "kill -9 must leave the filters as they were"
    );
    assert_all_ok(&tb, "no daemon after kill -9", &tb.load(100, 4));

    // 3. A restart adopts the filter: the same place, a new program, and
    //    no failed request across it.
    let load = tb.client().start_load(&tb.url("/"), 2);
    std::thread::sleep(Duration::from_millis(300));
    let restart = Instant::now();
    let mut d = start(&tb, NO_TCX, true);
    eprintln!("restart ready after {:.2?}", restart.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    assert_all_ok(&tb, "load across the restart", &load.stop());
    let log = d.log();
    for iface in IFACES {
        let line = format!(
            "{iface}: tcx hidden by XDPLB_PRETEND_MISSING: adopted its clsact ingress filter"
        );
        assert!(log.contains(&line), "expected `{line}` in the log:\n{log}");
    }
    let second: Vec<u32> = IFACES.iter().map(|i| our_filter(&tb, i)).collect();
    for (i, iface) in IFACES.iter().enumerate() {
        assert_ne!(
            first[i], second[i],
            "{iface}: the restart must replace the filter's program (id {} before)",
            first[i]
        );
    }
    eprintln!("program ids: {first:?} before the restart, {second:?} after");

    // 4. tcx again (a kernel upgrade): a tcx link, and the filter goes.
    d.kill9().expect("kill -9");
    let d = start(&tb, &[], true);
    let log = d.log();
    assert!(
        log.contains("eth0: attached tc (ingress), link pinned at")
            && log.contains("the clsact filter of a kernel without tcx removed"),
        "with tcx the daemon must attach a tcx link and remove its filter; log:\n{log}"
    );
    for iface in IFACES {
        assert_no_filter(&tb, iface, "after moving to tcx");
    }
    assert!(
        pins(&tb).iter().all(|p| !p.ends_with("@clsact")),
        "no clsact records with tcx: {:?}",
        pins(&tb)
    );
    assert_all_ok(&tb, "through tcx after the filter", &tb.load(50, 4));

    // 5. Back to the filter (kill -9 first), then `xdplb down` deletes it.
    drop(d);
    let mut d = start(&tb, NO_TCX, true);
    assert!(
        d.log().contains("its tcx link"),
        "moving from tcx to a filter must say that the tcx link went; log:\n{}",
        d.log()
    );
    for iface in IFACES {
        our_filter(&tb, iface);
    }
    d.kill9().expect("kill -9");
    let out = tb.down().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("xdplb down: {}", out.trim());
    for iface in IFACES {
        assert_no_filter(&tb, iface, "after xdplb down");
    }
    assert!(
        !tb.pins_exist(),
        "xdplb down must remove {}",
        tb.pin_dir().display()
    );
    assert_vip_refused(&tb, "after xdplb down");
}

fn sigterm_removes_only_our_filter(mode: Mode) {
    let tb = testbed(mode, 2);
    let mut d = start(&tb, NO_TCX, false);
    // Someone else's filter on the same qdisc, next to ours (classic BPF
    // that matches nothing).
    tb.lb()
        .exec(&[
            "tc",
            "filter",
            "add",
            "dev",
            "eth0",
            "ingress",
            "pref",
            "7",
            "protocol",
            "arp",
            "bpf",
            "bytecode",
            "1,6 0 0 0,",
        ])
        .unwrap_or_else(|e| panic!("adding another filter: {e:#}"));
    our_filter(&tb, "eth0");
    assert_all_ok(&tb, "through the clsact filter", &tb.load(50, 4));
    let status = d.sigterm().expect("SIGTERM");
    assert!(
        status.success(),
        "SIGTERM: exit {status}; log:\n{}",
        d.log()
    );
    for iface in IFACES {
        assert_no_filter(&tb, iface, "after SIGTERM");
    }
    let out = tc_filters(&tb, "eth0");
    assert!(
        out.contains("bytecode '1,6 0 0 0'"),
        "SIGTERM must leave other filters alone, saw:\n{out}"
    );
    assert!(!tb.pins_exist(), "SIGTERM must remove the pins");
    assert_vip_refused(&tb, "after SIGTERM");
}
