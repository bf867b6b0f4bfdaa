//! Interfaces are watched (issue 13): an interface deleted and re-created
//! under the same name (a reconnect, a bond rebuild, a container's veth
//! re-plumbed) gets the program back.
//!
//! Under load, the balancer's backend-side `eth1` is deleted and re-created
//! [`GAP`] later as a new device (new ifindex). Then:
//! - the daemon logs the loss and the re-attach to the new ifindex, within
//!   [`REATTACH_BOUND`] of the re-creation;
//! - `xdplb stats` shows `eth1` missing during the gap and attached with the
//!   new ifindex after it;
//! - the pinned links (TC, and XDP in XDP mode) are on the new ifindex;
//! - every request sent after the re-attach succeeds. Such a request needs
//!   the program on the new `eth1`: the backends answer the SNAT address,
//!   and without the program there the reply meets no socket (a RST). The
//!   requests sent in the gap may fail; they are counted and printed.
//!
//! Root only, one test at a time, after building the daemon:
//! `cargo build -p lb-user && cargo test -p tests --test iface -- --test-threads=1 --nocapture`

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
    time::{Duration, Instant},
};

use testkit::wait::wait_until;
use tests::testbed::{backend_addr, Mode, Testbed, Topology, HTTP_PORT};

tests::both_modes!(reattach_after_recreate);

/// Requests per second of the background load.
const RATE: u32 = 200;
/// How long `eth1` stays deleted.
const GAP: Duration = Duration::from_secs(1);
/// The longest the daemon may take from the re-creation to the re-attach
/// (a link event is handled in milliseconds; the poll fallback is 2 s).
const REATTACH_BOUND: Duration = Duration::from_secs(3);

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// The `eth1` line of `xdplb stats`' "interfaces:" block.
fn eth1_line(tb: &Testbed) -> Option<String> {
    let text = tb.stats_text().ok()?;
    text.lines()
        .find(|l| l.trim_start().starts_with("eth1 "))
        .map(|l| l.trim().to_owned())
}

/// The device the link pinned at `path` is on: the `ifindex:` line of the
/// link fd's fdinfo (`bpf_xdp_link_show_fdinfo` in net/core/dev.c,
/// `tcx_link_fdinfo` in kernel/bpf/tcx.c; 0 for a severed link). Neither
/// aya 0.14 nor this bpftool (7.1, no tcx) reports it.
fn link_ifindex(path: &Path) -> Result<u32, String> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET reads `attr` (of the size passed) and the path it
    // points to, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(format!(
            "opening {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    info.lines()
        .find_map(|l| l.strip_prefix("ifindex:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no ifindex in the fdinfo of {}:\n{info}", path.display()))
}

fn reattach_after_recreate(mode: Mode) {
    let tb = Testbed::build(mode, Topology::new(3))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let mut cfg = tb.daemon_config();
    cfg.udp = false;
    // Checks that outlast the gap (3 failures at 1 s), so the tasks stay in
    // rotation and what the test sees is the interface, not health checks.
    cfg.check_interval = Duration::from_secs(1);
    cfg.check_timeout = Duration::from_millis(500);
    cfg.fall = 3;
    let args = tb.config_args(&cfg).expect("writing the config");
    let mut d = tb.start_daemon(&args).expect("starting the daemon");
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    let tasks: Vec<_> = (0..3)
        .map(|i| std::net::SocketAddr::from((backend_addr(i), HTTP_PORT)))
        .collect();
    d.wait_active(&tasks, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));
    d.wait_table("web", 3, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let old = tb.lb().ifindex("eth1").expect("the ifindex of eth1");

    let load = tb.client().start_rate(&tb.url("/"), RATE);
    std::thread::sleep(Duration::from_millis(500));
    let deleted = Instant::now();
    tb.delete_eth1().expect("deleting eth1");
    d.wait_log(
        "eth1 removed: its program went with it; waiting for it to come back",
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let missing = wait_until(Duration::from_secs(3), "stats showing eth1 missing", || {
        eth1_line(&tb).filter(|l| l.contains("missing"))
    });
    std::thread::sleep(GAP.saturating_sub(deleted.elapsed()));

    let recreated = Instant::now();
    tb.recreate_eth1().expect("re-creating eth1");
    let configured = Instant::now();
    let new = tb
        .lb()
        .ifindex("eth1")
        .expect("the ifindex of the new eth1");
    assert_ne!(new, old, "the re-created eth1 should be a new device");
    let back = format!("eth1 is back (ifindex {new}");
    let line = d
        .wait_line(&format!("{back:?}"), REATTACH_BOUND, |l| l.contains(&back))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let seen = Instant::now();
    // From here on every new request must succeed.
    let ready = seen.max(configured);
    std::thread::sleep(Duration::from_millis(1500));
    let report = load.stop();
    let done = Instant::now();

    let attached = format!("attached ({}, ifindex {new})", mode.as_str());
    let stats = wait_until(
        Duration::from_secs(3),
        "stats showing eth1 attached with its new ifindex",
        || eth1_line(&tb).filter(|l| l.contains(&attached)),
    );
    let hooks: &[&str] = match mode {
        Mode::Tc => &["tc"],
        Mode::Xdp => &["xdp", "tc"],
    };
    let links: Vec<(&str, Result<u32, String>)> = hooks
        .iter()
        .map(|h| {
            let pin = tb.pin_dir().join("links").join(format!("eth1@{h}"));
            (*h, link_ifindex(&pin))
        })
        .collect();
    let (ok_before, failed_before) = report.between(report.started.unwrap_or(deleted), deleted);
    let (ok_gap, failed_gap) = report.between(deleted, ready);
    let (ok_after, failed_after) = report.between(ready, done);
    eprintln!(
        "{} mode: eth1 ifindex {old} deleted, re-created as {new} after {}; re-attach seen {} \
         after the re-creation ({} to configure the device); requests before {ok_before} ok / \
         {failed_before} failed, in the gap {ok_gap} ok / {failed_gap} failed, after the \
         re-attach {ok_after} ok / {failed_after} failed\n  daemon: {line}\n  stats while \
         missing: {missing:?}\n  stats after: {stats:?}\n  pinned links (hook, ifindex): \
         {links:?}",
        mode.as_str(),
        secs(recreated.duration_since(deleted)),
        secs(seen.duration_since(recreated)),
        secs(configured.duration_since(recreated)),
    );

    missing.unwrap_or_else(|e| panic!("{e:#}\n{}", tb.stats_text().unwrap_or_default()));
    stats.unwrap_or_else(|e| panic!("{e:#}\n{}", tb.stats_text().unwrap_or_default()));
    assert_eq!(
        failed_before, 0,
        "requests failed before the deletion: {report}"
    );
    assert!(
        ok_after > 0,
        "no request was sent after the re-attach: {report}"
    );
    assert_eq!(
        failed_after,
        0,
        "{failed_after} requests sent after the re-attach failed (of {}): {report}\n{}",
        ok_after + failed_after,
        tb.diagnostics()
    );
    for (hook, ifindex) in &links {
        assert_eq!(
            ifindex,
            &Ok(new),
            "the pinned {hook} link of eth1 should be on the new device"
        );
    }
}
