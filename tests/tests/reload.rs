//! Reload without losing a flow (issue 15): the real daemon in the testbed,
//! under new-connection and keep-alive load on service `web`, is reloaded
//! with `xdplb reload` five times:
//!
//! 1. a second service `api` is added: it answers within 3 s;
//! 2. `web`'s checks change (tcp -> http:/healthz);
//! 3. a broken file: `xdplb reload` exits non-zero naming file and line, and
//!    nothing changes;
//! 4. a setting that needs a restart (`conntrack.capacity`): refused, says so;
//! 5. `api` is removed: its established keep-alive flow keeps working while
//!    it drains, then the service is gone from the maps.
//!
//! Through all of it, `web` loses no request.
//!
//! Root only: `cargo test -p tests --test reload -- --test-threads=1`

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use testkit::wait::wait_until;
use tests::testbed::{Daemon, KeepAlive, Mode, Testbed, Topology, HTTP_PORT, VIP};

tests::both_modes!(reload_under_load);

const API_PORT: u16 = 8080;

fn keep_alive(tb: &Testbed, to: SocketAddr, reconnect: bool) -> KeepAlive {
    KeepAlive::start(tb.client_ns(), to, reconnect)
        .unwrap_or_else(|e| panic!("keep-alive to {to}: {e:#}"))
}

/// (answered, failed) so far.
fn counts(k: &KeepAlive) -> (usize, usize) {
    let r = k.requests();
    let ok = r.iter().filter(|q| q.outcome.is_ok()).count();
    (ok, r.len() - ok)
}

fn api_section() -> String {
    format!(
        "\n[[service]]\nname = \"api\"\nlisten = \"{VIP}:{API_PORT}/tcp\"\nbackends = \"tasks.api:{HTTP_PORT}\"\nnameserver = \"{}\"\ninterval = \"200ms\"\ncheck_interval = \"200ms\"\ncheck_timeout = \"150ms\"\nrise = 2\nfall = 2\ndrain_timeout = \"3s\"\n",
        tests::testbed::dns::DNS_ADDR
    )
}

/// `xdplb reload --pin-dir PIN`: (success, stdout, stderr).
fn reload(tb: &Testbed) -> (bool, String, String) {
    let pin = tb.pin_dir().display().to_string();
    let out = tb
        .xdplb(&["reload", "--pin-dir", &pin])
        .unwrap_or_else(|e| panic!("running xdplb reload: {e:#}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn api_get(tb: &Testbed) -> Result<String, String> {
    tb.client()
        .get(&format!("http://{VIP}:{API_PORT}/"))
        .map(|(who, _)| who)
        .map_err(|e| format!("{e:#}"))
}

fn reload_under_load(mode: Mode) {
    let tb = Testbed::build(mode, Topology::new(4))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    tb.set_tasks(&[0, 1]);
    tb.dns().set(
        "tasks.api",
        [
            tests::testbed::backend_addr(2),
            tests::testbed::backend_addr(3),
        ],
    );
    let mut cfg = tb.daemon_config();
    cfg.udp = false;
    let web_only = cfg.toml();
    let path = tb.dir().join("reload.toml");
    write(&path, &web_only);
    let mut d: Daemon = tb
        .start_daemon(&["--config", path.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    d.wait_table("web", 2, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));

    let web = SocketAddr::from((VIP, HTTP_PORT));
    let load = tb.client().start_rate(&tb.url("/"), 200);
    let keep: Vec<KeepAlive> = (0..4).map(|_| keep_alive(&tb, web, true)).collect();
    std::thread::sleep(Duration::from_millis(500));

    // 1. Add a service.
    let with_api = format!("{web_only}{}", api_section());
    write(&path, &with_api);
    let t0 = Instant::now();
    let (ok, out, err) = reload(&tb);
    assert!(ok, "reload adding api: {out}{err}\n{}", d.log());
    assert!(out.contains("added api"), "the summary names it: {out}");
    let who = wait_until(Duration::from_secs(3), "api answers", || api_get(&tb).ok())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    let api_after = t0.elapsed();
    assert!(
        who == "b2" || who == "b3",
        "api is served by its tasks: {who}"
    );
    // An established flow on api, to see it survive the drain later.
    let api_flow = keep_alive(&tb, SocketAddr::from((VIP, API_PORT)), false);

    // 2. Change web's checks.
    let http_checks = with_api.replacen("check = \"tcp\"", "check = \"http:/healthz\"", 1);
    assert_ne!(
        http_checks, with_api,
        "the config has a tcp check to change"
    );
    write(&path, &http_checks);
    let (ok, out, err) = reload(&tb);
    assert!(ok, "reload changing checks: {out}{err}");
    assert!(out.contains("web: checks"), "{out}");

    // 3. A broken file changes nothing.
    let broken = http_checks.replacen("rise = 2", "rise = \"two\"", 1);
    write(&path, &broken);
    let (ok, out, err) = reload(&tb);
    assert!(!ok, "a broken file must be refused: {out}");
    let line = broken.lines().position(|l| l.contains("\"two\"")).unwrap() + 1;
    assert!(
        err.contains(&format!("reload.toml:{line}:")) && err.contains("`rise`"),
        "the refusal names the file, line and key: {err}"
    );
    assert!(d.is_running(), "{}", d.log());
    api_get(&tb).unwrap_or_else(|e| panic!("api still answers after a refused reload: {e}"));

    // 4. A setting that needs a restart is refused.
    let capacity = http_checks.replacen("[conntrack]", "[conntrack]\ncapacity = 4096", 1);
    write(&path, &capacity);
    let (ok, _, err) = reload(&tb);
    assert!(
        !ok && err.contains("conntrack.capacity") && err.contains("restart"),
        "{err}"
    );

    // 5. Remove api: it drains, then goes.
    write(&path, &http_checks.replace(&api_section(), ""));
    let (ok, out, err) = reload(&tb);
    assert!(ok, "reload removing api: {out}{err}");
    assert!(out.contains("removed api"), "{out}");
    let drained_before = counts(&api_flow).0;
    std::thread::sleep(Duration::from_millis(1500));
    let during_drain = counts(&api_flow);
    assert!(
        during_drain.0 > drained_before && during_drain.1 == 0,
        "the established api flow keeps working while api drains: {drained_before} -> {during_drain:?}"
    );
    d.wait_log(
        "removed by a reload: drained, and gone",
        Duration::from_secs(6),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let api_gone = api_get(&tb);
    assert!(api_gone.is_err(), "api no longer answers: {api_gone:?}");

    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    let kept: Vec<(usize, usize)> = keep
        .into_iter()
        .map(|k| {
            let r = k.stop();
            (r.ok(), r.failed())
        })
        .collect();
    drop(api_flow);
    assert_eq!(
        report.failed,
        0,
        "web lost no new-connection request ({} ok)\n{}",
        report.ok,
        d.log()
    );
    for (i, (ok, failed)) in kept.iter().enumerate() {
        assert!(
            *ok > 0 && *failed == 0,
            "keep-alive {i} on web: {ok} ok, {failed} failed"
        );
    }
    let summaries = d.count_log("configuration reloaded:");
    assert_eq!(
        summaries,
        3,
        "one summary line per applied reload\n{}",
        d.log()
    );
    eprintln!(
        "web: {} new-connection requests, keep-alive {kept:?}, 0 failed; api answered {:.2} s \
         after the reload",
        report.ok,
        api_after.as_secs_f64()
    );
}
