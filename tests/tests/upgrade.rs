//! Upgrading the daemon in place under load, as README's "Upgrade" section
//! says and the systemd unit does it: the running daemon (started with
//! `--persist`, as the unit's ExecStart has it) gets SIGTERM and leaves its
//! programs attached and its maps pinned; the new binary, from another
//! file, starts with the same config and adopts them, connection table
//! included. Both run with nothing but the unit's capability bounding set
//! (read from dist/xdplb.service, applied with `setpriv`) and no new
//! privileges, so the test also shows that those capabilities are enough to
//! start and to adopt.
//!
//! Under new-connection load and four keep-alive connections, it asserts:
//! no request fails (new connections while no daemon runs included), every
//! keep-alive connection goes on on the same connection and backend under
//! the new daemon, the new daemon logs that it adopted the pinned
//! connection table and keeps every entry, and the process that runs is the
//! new file.
//!
//! The new binary is `XDPLB_UPGRADE_BIN` when set (`cargo xtask test` sets
//! it to the one the .deb installed into a scratch root: a release build
//! taking over from the debug one), else a copy of the test build with its
//! debug info stripped (another file, other bytes, the same code).
//!
//! Root only: `cargo build -p lb-user && cargo test -p tests --test upgrade -- --test-threads=1`

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use testkit::bin::xdplb_bin;
use tests::testbed::{backend_addr, KeepAlive, Mode, Testbed, Topology, HTTP_PORT, VIP};

tests::both_modes!(upgrade_under_load);

/// New-connection requests per second (open loop).
const RATE: u32 = 400;
/// Established connections that must outlive the upgrade.
const KEEPALIVE: usize = 4;
/// How long a daemon may take to bring the tasks into rotation.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The unit's `CapabilityBoundingSet=` as setpriv's `--bounding-set`
/// (`-all,+bpf,+perfmon,+net_admin`).
fn unit_bounding_set() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/xdplb.service");
    let unit = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("{} has no CapabilityBoundingSet=", path.display()));
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        set.push_str(",+");
        set.push_str(&cap.trim_start_matches("CAP_").to_lowercase());
    }
    set
}

/// `bin` started as the unit starts it, less the file-system sandbox: root
/// with the unit's bounding set, and no new privileges. setpriv execs the
/// daemon in place, so the pid stays the daemon's.
fn as_the_unit(bin: &Path) -> Vec<OsString> {
    vec![
        "setpriv".into(),
        format!("--bounding-set={}", unit_bounding_set()).into(),
        "--no-new-privs".into(),
        "--".into(),
        bin.into(),
    ]
}

/// The binary to upgrade to, and where it came from.
fn new_binary(tb: &Testbed) -> (PathBuf, String) {
    if let Some(bin) = std::env::var_os("XDPLB_UPGRADE_BIN") {
        let bin = PathBuf::from(bin);
        return (bin.clone(), format!("XDPLB_UPGRADE_BIN={}", bin.display()));
    }
    let old = xdplb_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let new = tb.dir().join("upgrade/usr/bin/xdplb");
    std::fs::create_dir_all(new.parent().unwrap()).expect("creating the upgrade's directory");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&old)
        .arg(&new)
        .status()
        .expect("running objcopy (binutils)");
    assert!(
        status.success(),
        "objcopy --strip-debug {}: {status}",
        old.display()
    );
    let how = format!("{} with its debug info stripped", old.display());
    (new, how)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn upgrade_under_load(mode: Mode) {
    let tb = Testbed::build(mode, Topology::new(3))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let mut cfg = tb.daemon_config();
    cfg.udp = false;
    let mut args = tb.config_args(&cfg).expect("writing the config");
    args.push("--persist".into());
    let tasks: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from((backend_addr(i), HTTP_PORT)))
        .collect();

    let old = xdplb_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let (new, how) = new_binary(&tb);
    let canonical = |p: &Path| {
        p.canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    assert_ne!(
        canonical(&old),
        canonical(&new),
        "the upgrade must start another file than the running daemon's"
    );

    let mut a = tb
        .start_daemon_via(&as_the_unit(&old), &args, &[])
        .expect("starting the old daemon");
    a.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    a.wait_active(&tasks, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.diagnostics()));
    a.wait_table("web", tasks.len(), ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));

    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let keep: Vec<KeepAlive> = (0..KEEPALIVE)
        .map(|_| {
            KeepAlive::start(tb.client_ns(), vip, false)
                .unwrap_or_else(|e| panic!("keep-alive connection: {e:#}"))
        })
        .collect();
    let load = tb.client().start_rate(&tb.url("/"), RATE);
    std::thread::sleep(Duration::from_millis(500));

    // The upgrade: SIGTERM (systemctl restart), then the new file.
    let stopping = Instant::now();
    let status = a.sigterm().expect("stopping the old daemon");
    assert!(status.success(), "the old daemon exited with {status}");
    assert!(
        a.log().contains("--persist: programs stay attached"),
        "the old daemon must leave its state for the new one; log:\n{}",
        a.log()
    );
    assert!(tb.pins_exist(), "the pins must outlive the old daemon");
    let before = tb.conns().expect("reading CONNS");
    let starting = Instant::now();
    let mut b = tb
        .start_daemon_via(&as_the_unit(&new), &args, &[])
        .expect("starting the new daemon");
    b.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    let ready = starting.elapsed();
    let after = tb.conns().expect("reading CONNS");
    let kept = before
        .iter()
        .filter(|(k, c)| after.get(*k).is_some_and(|a| a.created_ns == c.created_ns))
        .count();
    let exe = std::fs::read_link(format!("/proc/{}/exe", b.pid())).expect("reading /proc/PID/exe");
    b.wait_active(&tasks, ACTIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.diagnostics()));
    let up = Instant::now();
    // Load on the new daemon for a while.
    std::thread::sleep(Duration::from_secs(1));
    let report = load.stop();
    let kept_alive: Vec<_> = keep.into_iter().map(KeepAlive::stop).collect();

    let adopted = b
        .log()
        .lines()
        .find(|l| l.contains("adopted pinned connection table"))
        .map(str::to_owned);
    let (ok_gap, failed_gap) = report.between(stopping, up);
    eprintln!(
        "upgrade ({mode:?}) to {how}: the old daemon stopped in {}, the new one was ready \
         {} later; {ok_gap} ok / {failed_gap} failed between the SIGTERM and all tasks active \
         again; {kept} of {} CONNS entries kept ({} now); {adopted:?}\n  new connections: \
         {report}",
        secs(starting - stopping),
        secs(ready),
        before.len(),
        after.len(),
    );
    for k in &kept_alive {
        eprintln!("  {k}");
    }

    assert_eq!(
        canonical(&exe),
        canonical(&new),
        "the daemon now running must be the new file"
    );
    assert_eq!(
        report.failed,
        0,
        "expected no failed request across the upgrade, saw {report}\n{}",
        tb.diagnostics()
    );
    assert!(
        ok_gap > 0,
        "no request was answered between the SIGTERM and the new daemon's tasks being active"
    );
    assert!(
        adopted.is_some(),
        "the new daemon must adopt the pinned connection table; log:\n{}",
        b.log()
    );
    assert!(
        !before.is_empty() && kept == before.len(),
        "the upgrade must keep every connection-table entry: {kept} of {} kept",
        before.len()
    );
    for k in &kept_alive {
        assert!(
            k.failed() == 0 && k.connections() == 1 && k.backends().len() == 1,
            "each keep-alive connection must go on, on one connection and one backend: {k}"
        );
        assert!(
            k.ok_since(up) > 0,
            "each keep-alive connection must be answered under the new daemon: {k}"
        );
    }
    let status = b.sigterm().expect("stopping the new daemon");
    assert!(status.success(), "the new daemon exited with {status}");
}
