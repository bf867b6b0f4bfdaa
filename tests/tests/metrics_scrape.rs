//! What one `/metrics` scrape costs: scrapes within the walk window reuse
//! one walk of the connection table (the rest is read live every time), a
//! new CONNS map gets a new walk, and concurrent scrapes share one walk.
//! Against the real kernel maps, through the real endpoint. And the batched
//! reads behind it (`BPF_MAP_LOOKUP_BATCH`) see what reading one element
//! per syscall sees.
//!
//! Run as root: `cargo test -p tests --test metrics_scrape -- --test-threads=1`

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use lb_common::{
    Backend, Conn, FlowKey, Service, ServiceKey, BACKEND_ACTIVE, BACKEND_DOWN, CONN_F_REVERSE,
    FAMILY_V4, PROTO_TCP,
};
use lb_user::{
    dataplane::{
        maps::{DataPlane, LoadOptions},
        pinned::PinnedMaps,
    },
    report::metrics::{self, Scraper},
};
use tests::packet::require_root;

const SERVICE: &str = "10.0.0.100:80/tcp";
const BACKEND: &str = "10.1.0.7:8080";
/// Longer than any test: only a new CONNS map may cause a second walk.
const HOUR: Duration = Duration::from_secs(3600);

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = DataPlane::unpin_all(&self.0);
    }
}

fn pins(tag: &str) -> Pins {
    let p = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-{tag}-{}",
        std::process::id()
    )));
    let _ = DataPlane::unpin_all(&p.0);
    p
}

fn v4(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

fn backend(state: u8) -> Backend {
    Backend {
        addr: v4(Ipv4Addr::new(10, 1, 0, 7)),
        port_be: 8080u16.to_be(),
        family: FAMILY_V4,
        state,
        service: 1,
    }
}

/// One service (id 1) with one backend (index 1).
fn load(pins: &Pins) -> DataPlane {
    let mut opts = LoadOptions::new(&pins.0);
    opts.conns_capacity = 1024;
    opts.maglev_capacity = 1024;
    let mut dp = DataPlane::load(&opts).expect("loading the data plane");
    let key = ServiceKey {
        addr: v4(Ipv4Addr::new(10, 0, 0, 100)),
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    };
    let svc = Service {
        id: 1,
        ..Default::default()
    };
    dp.set_service(&key, &svc).expect("writing SERVICES");
    dp.set_backend(1, &backend(BACKEND_ACTIVE))
        .expect("writing BACKENDS");
    dp
}

/// Live flows `from..to` to the backend (`to` at most 10,000): a forward
/// and a reverse entry each.
fn add_flows(dp: &mut DataPlane, from: u16, to: u16) {
    let now = lb_user::clock::monotonic_now_ns();
    let key = |src: SocketAddrV4, dst: SocketAddrV4| FlowKey {
        src: v4(*src.ip()),
        dst: v4(*dst.ip()),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
    let be = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 7), 8080);
    for i in from..to {
        let client = SocketAddrV4::new(Ipv4Addr::new(172, 16, 0, 1), 30_000 + i);
        let snat = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 20_000 + i);
        let fwd = Conn {
            new_src: v4(*snat.ip()),
            new_dst: v4(*be.ip()),
            new_sport_be: snat.port().to_be(),
            new_dport_be: be.port().to_be(),
            backend: 1,
            service: 1,
            last_seen_ns: now,
            created_ns: now,
            ..Default::default()
        };
        let rev = Conn {
            new_src: v4(*vip.ip()),
            new_dst: v4(*client.ip()),
            new_sport_be: vip.port().to_be(),
            new_dport_be: client.port().to_be(),
            flags: CONN_F_REVERSE,
            ..fwd
        };
        dp.insert_conn(&key(client, vip), &fwd)
            .expect("writing CONNS");
        dp.insert_conn(&key(be, snat), &rev).expect("writing CONNS");
    }
}

/// Runs `f` with the URL of `scraper`'s endpoint on 127.0.0.1.
fn with_endpoint<T>(
    scraper: &Arc<Scraper>,
    f: impl AsyncFnOnce(reqwest::Client, String) -> T,
) -> T {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(metrics::serve_with(listener, Arc::clone(scraper), rx));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let out = f(client, url).await;
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops on shutdown")
            .unwrap()
            .unwrap();
        out
    })
}

async fn get(client: &reqwest::Client, url: &str) -> String {
    let r = client.get(url).send().await.expect("GET /metrics");
    let status = r.status();
    let body = r.text().await.expect("reading the body");
    assert_eq!(status, 200, "GET {url}:\n{body}");
    body
}

fn scrape_once(scraper: &Arc<Scraper>) -> String {
    with_endpoint(scraper, async |c, url| get(&c, &url).await)
}

/// The value of the one sample of `metric` with `labels`.
fn sample(body: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"));
    let hits: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(x)
            | prometheus_parse::Value::Gauge(x)
            | prometheus_parse::Value::Untyped(x) => x,
            ref other => panic!("unexpected sample kind {other:?}"),
        })
        .collect();
    assert_eq!(hits.len(), 1, "{metric}{labels:?}: {hits:?} in:\n{body}");
    hits[0]
}

fn entries(body: &str) -> f64 {
    sample(body, "xdplb_conntrack_entries", &[])
}

fn active(body: &str) -> f64 {
    sample(
        body,
        "xdplb_backend_active_connections",
        &[("service", SERVICE), ("backend", BACKEND)],
    )
}

fn down(body: &str) -> f64 {
    sample(
        body,
        "xdplb_backend_state",
        &[
            ("service", SERVICE),
            ("backend", BACKEND),
            ("state", "down"),
        ],
    )
}

#[test]
fn scrapes_within_the_window_reuse_the_walk_and_read_the_rest_live() {
    require_root();
    let pins = pins("metrics-walk");
    let mut dp = load(&pins);
    add_flows(&mut dp, 0, 3);
    let scraper = Scraper::new(&pins.0, HOUR);

    let first = scrape_once(&scraper);
    assert_eq!(
        (entries(&first), active(&first), down(&first)),
        (6.0, 3.0, 0.0),
        "first scrape (entries, active, down):\n{first}"
    );
    assert_eq!(scraper.walks(), 1, "the first scrape walks the table");

    // New flows and a backend going down: the flows wait for the next walk,
    // the state is read on every scrape.
    add_flows(&mut dp, 3, 5);
    dp.set_backend(1, &backend(BACKEND_DOWN))
        .expect("writing BACKENDS");
    let second = scrape_once(&scraper);
    assert_eq!(
        scraper.walks(),
        1,
        "a scrape within the window walked the table again"
    );
    assert_eq!(
        (entries(&second), active(&second), down(&second)),
        (6.0, 3.0, 1.0),
        "second scrape (entries and active from the first walk, state live):\n{second}"
    );
    let age = sample(&second, "xdplb_conntrack_walk_age_seconds", &[]);
    assert!(
        age > 0.0 && age < HOUR.as_secs_f64(),
        "walk age {age} s for a reused walk"
    );
    assert!(
        sample(&second, "xdplb_conntrack_walk_duration_seconds", &[]) > 0.0,
        "no walk duration:\n{second}"
    );

    // The same maps with a window of zero: every scrape walks and sees the
    // new flows, so the counts above were the reused walk's.
    let eager = Scraper::new(&pins.0, Duration::ZERO);
    let fresh = scrape_once(&eager);
    assert_eq!((entries(&fresh), active(&fresh)), (10.0, 5.0), "{fresh}");
    scrape_once(&eager);
    assert_eq!(eager.walks(), 2, "a window of zero walks on every scrape");

    // Maps recreated under the same pins: the old walk is not reused.
    drop(dp);
    DataPlane::unpin_all(&pins.0).expect("removing the pins");
    let mut dp = load(&pins);
    add_flows(&mut dp, 0, 1);
    let recreated = scrape_once(&scraper);
    assert_eq!(
        (scraper.walks(), entries(&recreated)),
        (2, 2.0),
        "(walks, entries) after the maps were recreated:\n{recreated}"
    );
    assert_eq!(
        sample(
            &recreated,
            "xdplb_service_active_connections",
            &[("service", SERVICE)]
        ),
        1.0
    );
}

#[test]
fn twenty_concurrent_scrapes_all_succeed_from_one_walk() {
    require_root();
    let pins = pins("metrics-concurrent");
    let mut dp = load(&pins);
    add_flows(&mut dp, 0, 100);
    let scraper = Scraper::new(&pins.0, HOUR);
    let bodies = with_endpoint(&scraper, async |client, url| {
        let all: Vec<_> = (0..20)
            .map(|_| {
                let (c, url) = (client.clone(), url.clone());
                tokio::spawn(async move { get(&c, &url).await })
            })
            .collect();
        let mut bodies = Vec::new();
        for r in all {
            bodies.push(r.await.expect("a scrape panicked"));
        }
        bodies
    });
    assert_eq!(bodies.len(), 20);
    for b in &bodies {
        assert_eq!((entries(b), active(b)), (200.0, 100.0), "{b}");
    }
    assert_eq!(
        scraper.walks(),
        1,
        "20 concurrent scrapes walked the table {} times",
        scraper.walks()
    );
    let snapshots = scraper.snapshots();
    assert!(
        (1..=20).contains(&snapshots),
        "{snapshots} snapshots for 20 scrapes"
    );
    eprintln!("20 concurrent scrapes: {snapshots} snapshot(s), 1 walk");
    drop(dp);
}

#[test]
fn batched_reads_see_what_one_by_one_reads_see() {
    require_root();
    let pins = pins("metrics-batch");
    let mut opts = LoadOptions::new(&pins.0);
    opts.conns_capacity = 16_384;
    opts.maglev_capacity = 1024;
    let mut dp = DataPlane::load(&opts).expect("loading the data plane");
    // Slots at both ends of BACKENDS and across several batches of 4,096.
    let indexes = [1, 2, 4095, 4096, 4097, 30_000, lb_common::MAX_BACKENDS - 1];
    for (n, &i) in indexes.iter().enumerate() {
        let mut b = backend(BACKEND_ACTIVE);
        b.addr[3] = n as u8;
        dp.set_backend(i, &b).expect("writing BACKENDS");
    }
    // 12,000 entries: three batches and a bit.
    add_flows(&mut dp, 0, 6_000);
    let batched = PinnedMaps::open(&pins.0).expect("opening the pins");
    let one_by_one = PinnedMaps::open(&pins.0)
        .expect("opening the pins")
        .one_by_one();

    let got = batched.backends().expect("batched BACKENDS");
    assert_eq!(
        got.iter().map(|b| b.0).collect::<Vec<_>>(),
        indexes,
        "batched BACKENDS slots in use"
    );
    assert_eq!(
        got,
        one_by_one.backends().expect("BACKENDS one by one"),
        "batched and one-by-one BACKENDS differ"
    );

    let conns = |m: &PinnedMaps| {
        let mut v = Vec::new();
        m.for_each_conn(|k, c| v.push((*k, *c)))
            .expect("walking CONNS");
        v.sort_by_key(|(k, _)| (k.src, k.dst, k.sport_be, k.dport_be));
        v
    };
    let walked = conns(&batched);
    assert_eq!(walked.len(), 12_000, "batched walk of 12,000 entries");
    assert!(
        walked == conns(&one_by_one),
        "batched and one-by-one walks of CONNS differ"
    );
    drop(dp);
}
