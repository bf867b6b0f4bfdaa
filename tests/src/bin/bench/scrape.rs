//! The cost of a `/metrics` scrape (§7) with full tables: 1,000,000 CONNS
//! entries (500,000 flows, forward and reverse) and 10,000 backends in ten
//! services, with a status file as a running daemon writes it.
//!
//! The data plane is loaded with its own pin directory (no namespace, no
//! traffic: the entries are written with `bpf()`), the endpoint is the real
//! one (`lb_user::report::metrics`) on 127.0.0.1, and the client is reqwest.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_common::{
    Backend, Conn, FlowKey, Service, ServiceKey, CONN_F_REVERSE, FAMILY_V4, PROTO_TCP,
};
use lb_user::{
    dataplane::{
        maps::{DataPlane, LoadOptions},
        pinned::PinnedMaps,
    },
    report::{
        metrics::{self, encode_snapshot, Scraper, WalkAge, CONNTRACK_WALK_EVERY},
        snapshot::{Daemon, MapsView, Snapshot},
    },
    status::{self, BackendStatus, ServiceStatus, Status},
};

use crate::report::{ratio, Table};

pub const FLOWS: u32 = 500_000;
pub const SERVICES: u32 = 10;
pub const BACKENDS_PER_SERVICE: u32 = 1_000;

pub struct ScrapeResults {
    pub entries: u64,
    pub backends: u32,
    pub fill_s: f64,
    pub body_bytes: usize,
    /// The old `/metrics`: a full snapshot one element per syscall (65,535
    /// BACKENDS slots, two syscalls per CONNS entry), encoded.
    pub one_by_one: Timing,
    /// `xdplb stats`' reading now: a full snapshot with batched reads.
    pub full_batched: Timing,
    /// `/metrics` scrapes that walk the table (walk window zero).
    pub walking: Timing,
    /// `/metrics` scrapes within the walk window.
    pub warm: Timing,
    /// Walks of the table during the warm scrapes.
    pub warm_walks: u64,
    /// The walk's own time, as the endpoint exports it.
    pub walk_s: f64,
    /// Twenty concurrent scrapes on a fresh endpoint: wall time, snapshots
    /// taken, walks.
    pub concurrent_s: f64,
    pub concurrent_snapshots: u64,
    pub concurrent_walks: u64,
}

/// The median of some runs, in milliseconds.
pub struct Timing {
    pub median_ms: f64,
    pub runs: usize,
}

impl Timing {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self {
            median_ms: ms[ms.len() / 2],
            runs: ms.len(),
        }
    }
}

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(status::status_path(&self.0));
        let _ = DataPlane::unpin_all(&self.0);
    }
}

fn vip(service: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 8000 + service as u16)
}

fn backend_addr(index: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 1, (index >> 8) as u8, index as u8), 8080)
}

fn v4(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

/// Ten services of a thousand backends each, and the status file that says so.
fn fill_services(dp: &mut DataPlane, pin_dir: &Path) -> Result<()> {
    let mut services = Vec::new();
    for s in 1..=SERVICES {
        let key = ServiceKey {
            addr: v4(Ipv4Addr::new(10, 0, 0, 100)),
            port_be: vip(s).port().to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        };
        dp.set_service(
            &key,
            &Service {
                id: s,
                ..Default::default()
            },
        )?;
        let mut backends = Vec::new();
        for i in 0..BACKENDS_PER_SERVICE {
            let index = (s - 1) * BACKENDS_PER_SERVICE + i + 1;
            let a = backend_addr(index);
            dp.set_backend(
                index,
                &Backend {
                    addr: v4(*a.ip()),
                    port_be: a.port().to_be(),
                    family: FAMILY_V4,
                    state: lb_common::BACKEND_ACTIVE,
                    service: s,
                },
            )?;
            backends.push(BackendStatus {
                addr: a.into(),
                index: Some(index),
                state: "active".into(),
                reason: "checks passing".into(),
                since_ms: lb_user::clock::now_ms(),
                last_check: None,
                last_refused_ms: None,
            });
        }
        services.push(ServiceStatus {
            name: format!("svc{s}"),
            listen: format!("{}/tcp", vip(s)),
            id: s,
            backends_name: "tasks.web".into(),
            backends,
            ..Default::default()
        });
    }
    let path = status::status_path(pin_dir);
    std::fs::create_dir_all(path.parent().context("status path has a parent")?)?;
    Status {
        version: status::STATUS_VERSION,
        pid: std::process::id(),
        written_ms: lb_user::clock::now_ms(),
        pin_dir: pin_dir.into(),
        services,
        interfaces: Vec::new(),
    }
    .write(&path)
}

/// `FLOWS` live TCP flows spread over every backend: a forward and a
/// reverse entry each.
fn fill_conns(dp: &mut DataPlane) -> Result<()> {
    let now = lb_user::clock::monotonic_now_ns();
    let snat = Ipv4Addr::new(10, 1, 255, 1);
    let key = |src: SocketAddrV4, dst: SocketAddrV4| FlowKey {
        src: v4(*src.ip()),
        dst: v4(*dst.ip()),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    for i in 0..FLOWS {
        let index = i % (SERVICES * BACKENDS_PER_SERVICE) + 1;
        let service = (index - 1) / BACKENDS_PER_SERVICE + 1;
        let client = SocketAddrV4::new(
            Ipv4Addr::from(0xac10_0000 | (i >> 8 & 0x000f_ffff)),
            1024 + (i & 0xff) as u16,
        );
        let (v, b) = (vip(service), backend_addr(index));
        let snat_sock = SocketAddrV4::new(snat, 20_000 + (i % 40_000) as u16);
        let fwd = Conn {
            new_src: v4(snat),
            new_dst: v4(*b.ip()),
            new_sport_be: snat_sock.port().to_be(),
            new_dport_be: b.port().to_be(),
            backend: index,
            service,
            last_seen_ns: now,
            created_ns: now,
            ..Default::default()
        };
        dp.insert_conn(&key(client, v), &fwd)?;
        let rev = Conn {
            new_src: v4(*v.ip()),
            new_dst: v4(*client.ip()),
            new_sport_be: v.port().to_be(),
            new_dport_be: client.port().to_be(),
            flags: CONN_F_REVERSE,
            ..fwd
        };
        dp.insert_conn(&key(b, snat_sock), &rev)?;
    }
    Ok(())
}

fn time_ms(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// A full snapshot (every BACKENDS slot, a walk of CONNS), encoded, as
/// `/metrics` took one on every scrape before the walk was reused.
fn full_snapshot(pin_dir: &Path, one_by_one: bool) -> Result<()> {
    let mut maps = PinnedMaps::open(pin_dir)?;
    if one_by_one {
        maps = maps.one_by_one();
    }
    let daemon = Daemon::read(pin_dir);
    let view = MapsView::read(&maps, daemon.status())?;
    let s = Snapshot::build(
        &view,
        &daemon,
        pin_dir,
        lb_user::clock::now_ms(),
        lb_user::clock::monotonic_now_ns(),
    );
    encode_snapshot(&s, WalkAge::default())?;
    Ok(())
}

/// Serves `scraper` on 127.0.0.1 while `f` runs with the `/metrics` URL.
async fn with_endpoint<T>(
    scraper: Arc<Scraper>,
    f: impl AsyncFnOnce(&reqwest::Client, &str) -> Result<T>,
) -> Result<T> {
    let listener = metrics::bind("127.0.0.1:0".parse()?).await?;
    let url = format!("http://{}/metrics", listener.local_addr()?);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(metrics::serve_with(listener, scraper, rx));
    let client = reqwest::Client::builder().no_proxy().build()?;
    let r = f(&client, &url).await;
    tx.send(true)?;
    server.await??;
    r
}

async fn get(client: &reqwest::Client, url: &str) -> Result<String> {
    let r = client.get(url).send().await?;
    anyhow::ensure!(r.status() == 200, "GET {url}: {}", r.status());
    Ok(r.text().await?)
}

/// Timed scrapes, one after another.
async fn scrapes(client: &reqwest::Client, url: &str, n: usize) -> Result<(Vec<f64>, String)> {
    let mut ms = Vec::new();
    let mut body = String::new();
    for _ in 0..n {
        let t = Instant::now();
        body = get(client, url).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((ms, body))
}

fn gauge(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

pub fn run(mut progress: impl FnMut(&str)) -> Result<ScrapeResults> {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-bench-scrape-{}",
        std::process::id()
    )));
    let _ = DataPlane::unpin_all(&pins.0);
    let mut opts = LoadOptions::new(&pins.0);
    // Twice the entries, so the LRU map never has to evict.
    opts.conns_capacity = (4 * FLOWS).next_power_of_two();
    let mut dp = DataPlane::load(&opts).context("loading the data plane")?;
    progress("metrics scrape: filling 10,000 backends and 1,000,000 CONNS entries");
    let t = Instant::now();
    fill_services(&mut dp, &pins.0)?;
    fill_conns(&mut dp)?;
    let fill_s = t.elapsed().as_secs_f64();
    let pin_dir = pins.0.as_path();

    progress("metrics scrape: full snapshots, one element per syscall and batched");
    let one_by_one = Timing::of(
        (0..3)
            .map(|_| time_ms(|| full_snapshot(pin_dir, true)))
            .collect::<Result<_>>()?,
    );
    let full_batched = Timing::of(
        (0..5)
            .map(|_| time_ms(|| full_snapshot(pin_dir, false)))
            .collect::<Result<_>>()?,
    );

    progress("metrics scrape: GET /metrics");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (walking, walk_s) = rt.block_on(with_endpoint(
        Scraper::new(pin_dir, Duration::ZERO),
        async |c, url| {
            let (ms, body) = scrapes(c, url, 5).await?;
            let walk_s = gauge(&body, "xdplb_conntrack_walk_duration_seconds")
                .context("no xdplb_conntrack_walk_duration_seconds in /metrics")?;
            Ok((Timing::of(ms), walk_s))
        },
    ))?;
    let scraper = Scraper::new(pin_dir, CONNTRACK_WALK_EVERY);
    let (warm, body_bytes) = rt.block_on(with_endpoint(Arc::clone(&scraper), async |c, url| {
        get(c, url).await?;
        let (ms, body) = scrapes(c, url, 9).await?;
        Ok((Timing::of(ms), body.len()))
    }))?;
    let warm_walks = scraper.walks() - 1;
    let scraper = Scraper::new(pin_dir, CONNTRACK_WALK_EVERY);
    let concurrent_s = rt.block_on(with_endpoint(Arc::clone(&scraper), async |c, url| {
        let t = Instant::now();
        let all: Vec<_> = (0..20)
            .map(|_| {
                let (c, url) = (c.clone(), url.to_string());
                tokio::spawn(async move { get(&c, &url).await })
            })
            .collect();
        for r in all {
            r.await??;
        }
        Ok(t.elapsed().as_secs_f64())
    }))?;
    drop(dp);
    Ok(ScrapeResults {
        entries: 2 * u64::from(FLOWS),
        backends: SERVICES * BACKENDS_PER_SERVICE,
        fill_s,
        body_bytes,
        one_by_one,
        full_batched,
        walking,
        warm,
        warm_walks,
        walk_s,
        concurrent_s,
        concurrent_snapshots: scraper.snapshots(),
        concurrent_walks: scraper.walks(),
    })
}

/// Seconds the section takes: filling the maps, then the scrapes.
pub const ESTIMATE_S: f64 = 40.0;

pub const NOT_MEASURED: &str =
    "§7 the cost of a `/metrics` scrape with 1,000,000 CONNS entries and 10,000 backends.";

fn ms(t: &Timing) -> String {
    format!("{:.0} ms", t.median_ms)
}

pub fn table(r: &ScrapeResults) -> Table {
    let mut t = Table::new(
        "7. Metrics scrape with full tables",
        format!(
            "The data plane loaded with its own pins and filled through `bpf()` in {:.1} s: \
             {} CONNS entries ({} live TCP flows, forward and reverse) and {} backends in {} \
             services, with a status file as a running daemon writes it. `/metrics` is the real \
             endpoint (`lb_user::report::metrics::serve_with`) on 127.0.0.1, read with reqwest; the \
             body is {:.1} MiB. Medians of the runs shown. The baseline is what every scrape \
             cost before the walk was reused: a full snapshot reading one element per syscall \
             (65,535 BACKENDS slots, two syscalls per CONNS entry), timed in the same run \
             without HTTP. The walk window is `CONNTRACK_WALK_EVERY` ({} s). `cargo xtask \
             bench` runs the dev build, so the userspace parts (counting, encoding) are slower \
             than in the release daemon.",
            r.fill_s,
            r.entries,
            r.entries / 2,
            r.backends,
            SERVICES,
            r.body_bytes as f64 / (1024.0 * 1024.0),
            CONNTRACK_WALK_EVERY.as_secs(),
        ),
        &["read", "runs", "median", "vs one element per syscall"],
    );
    let base = r.one_by_one.median_ms;
    for (what, timing) in [
        (
            "full snapshot, one element per syscall (before; baseline)",
            &r.one_by_one,
        ),
        (
            "full snapshot, batched reads (`xdplb stats`)",
            &r.full_batched,
        ),
        ("GET /metrics that walks the table", &r.walking),
        ("GET /metrics within the walk window", &r.warm),
    ] {
        t.row(vec![
            what.to_string(),
            timing.runs.to_string(),
            ms(timing),
            ratio(timing.median_ms, base),
        ]);
    }
    t.notes.push(format!(
        "the walk of {} CONNS entries itself took {:.0} ms (`xdplb_conntrack_walk_duration_seconds`); \
         {} walks during the {} scrapes within the window",
        r.entries,
        r.walk_s * 1e3,
        r.warm_walks,
        r.warm.runs,
    ));
    t.notes.push(format!(
        "20 concurrent GET /metrics on a fresh endpoint: all answered in {:.2} s, from {} \
         snapshot(s) and {} walk(s) of the table",
        r.concurrent_s, r.concurrent_snapshots, r.concurrent_walks,
    ));
    t
}
