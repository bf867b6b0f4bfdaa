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
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tests::testbed::{wait_until, Daemon, Mode, Testbed, Topology, HTTP_PORT, VIP};

tests::both_modes!(reload_under_load);

const API_PORT: u16 = 8080;

/// Keep-alive HTTP/1.1 requests on one connection, one after the other.
/// Counts answers and failures; reconnects after a failure unless `once`.
struct KeepAlive {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn connect(tb: &Testbed, to: SocketAddr) -> std::io::Result<TcpStream> {
    tb.client_ns()
        .run_in(|| Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2))?))
        .map_err(std::io::Error::other)
}

/// One request on `s`; the body's first word (the backend's name).
fn request(s: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: keep-alive\r\n\r\n")?;
    let mut len = None;
    let mut status = String::new();
    s.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status line {status:?}")));
    }
    loop {
        let mut line = String::new();
        if s.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0u8; len.ok_or_else(|| std::io::Error::other("no content-length"))?];
    s.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

impl KeepAlive {
    fn start(tb: &Testbed, to: SocketAddr, reconnect: bool) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let first = connect(tb, to).unwrap_or_else(|e| panic!("keep-alive connect to {to}: {e}"));
        let ns = tb.client_ns().path();
        let (o, f, halt) = (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            // This thread reconnects from inside the client namespace
            // (setns changes only the calling thread's namespace).
            let target = std::fs::File::open(&ns).expect("opening the client namespace");
            // SAFETY: setns(2) on an fd we own, for this thread only.
            let rc = unsafe {
                libc::setns(std::os::fd::AsRawFd::as_raw_fd(&target), libc::CLONE_NEWNET)
            };
            assert_eq!(rc, 0, "entering the client namespace");
            let mut conn = Some(BufReader::new(first));
            while !halt.load(Ordering::SeqCst) {
                let Some(c) = conn.as_mut() else {
                    if !reconnect {
                        break;
                    }
                    match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                        Ok(s) => conn = Some(BufReader::new(s)),
                        Err(_) => {
                            f.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                    continue;
                };
                let _ = c.get_ref().set_read_timeout(Some(Duration::from_secs(2)));
                match request(c) {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {
                        f.fetch_add(1, Ordering::SeqCst);
                        conn = None;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            ok,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
    let keep: Vec<KeepAlive> = (0..4).map(|_| KeepAlive::start(&tb, web, true)).collect();
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
    let api_flow = KeepAlive::start(&tb, SocketAddr::from((VIP, API_PORT)), false);

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
    let drained_before = api_flow.counts().0;
    std::thread::sleep(Duration::from_millis(1500));
    let during_drain = api_flow.counts();
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
    let kept: Vec<(u64, u64)> = keep.into_iter().map(KeepAlive::stop).collect();
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
