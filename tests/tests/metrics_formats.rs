//! `/metrics` in both formats, through real HTTP requests with the `Accept`
//! headers that scrapers send: OpenMetrics 1.0 for a Prometheus, read by an
//! OpenMetrics parser; the classic text format 0.0.4 for `text/plain`, curl
//! (`*/*`) and a request without `Accept`, read by two classic parsers with
//! every family typed. Both carry the build-info, DNS and health-check
//! families.
//!
//! 1. Pinned maps and a status file written here (the pattern of
//!    metrics_scrape.rs): every new family, with its exact values.
//! 2. The real daemon in the testbed: it publishes its DNS polls, task set
//!    and health checks, and the endpoint serves them.
//!
//! Run as root, after building the binary:
//! `cargo build -p lb-user && cargo test -p tests --test metrics_formats -- --test-threads=1`

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use lb_common::{Backend, Service, ServiceKey, BACKEND_ACTIVE, FAMILY_V4, PROTO_TCP};
use lb_user::{
    dataplane::maps::{DataPlane, LoadOptions},
    report::metrics::{self, Scraper},
    status::{self, Status},
};
use openmetrics_parser::{OpenMetricsType as O, PrometheusType as P};
use tests::{
    packet::require_root,
    testbed::{backend_addr, Mode, Testbed, HTTP_PORT, UDP_PORT},
};

const PROMETHEUS_2: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const PROMETHEUS_TEXT_ONLY: &str = "text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The families issue 15 added: OpenMetrics name and type, classic name and type.
const NEW: [(&str, O, &str, P); 9] = [
    ("xdplb_build", O::Info, "xdplb_build_info", P::Gauge),
    (
        "xdplb_dns_polls",
        O::Counter,
        "xdplb_dns_polls_total",
        P::Counter,
    ),
    (
        "xdplb_dns_failures",
        O::Counter,
        "xdplb_dns_failures_total",
        P::Counter,
    ),
    (
        "xdplb_dns_negative_answers",
        O::Counter,
        "xdplb_dns_negative_answers_total",
        P::Counter,
    ),
    (
        "xdplb_dns_task_set_changes",
        O::Counter,
        "xdplb_dns_task_set_changes_total",
        P::Counter,
    ),
    (
        "xdplb_dns_last_success_timestamp_seconds",
        O::Gauge,
        "xdplb_dns_last_success_timestamp_seconds",
        P::Gauge,
    ),
    ("xdplb_dns_tasks", O::Gauge, "xdplb_dns_tasks", P::Gauge),
    (
        "xdplb_health_checks",
        O::Counter,
        "xdplb_health_checks_total",
        P::Counter,
    ),
    (
        "xdplb_health_check_duration_seconds",
        O::Histogram,
        "xdplb_health_check_duration_seconds",
        P::Histogram,
    ),
];

// ---- HTTP and parsing ---------------------------------------------------------

struct Answer {
    content_type: String,
    vary: String,
    body: String,
}

/// `GET /metrics` over HTTP/1.0 with `Accept: accept` (none for `None`),
/// from the calling thread (and so from its network namespace).
fn get(addr: SocketAddr, accept: Option<&str>) -> Answer {
    let mut last = None;
    for _ in 0..100 {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n{accept}\r\n").unwrap();
                let mut raw = String::new();
                s.read_to_string(&mut raw).expect("reading the answer");
                let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
                assert!(head.starts_with("HTTP/1.0 200"), "GET /metrics:\n{raw}");
                let header = |name: &str| {
                    head.lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.trim().to_string())
                        .unwrap_or_default()
                };
                return Answer {
                    content_type: header("content-type"),
                    vary: header("vary"),
                    body: body.to_string(),
                };
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing answers on {addr}: {last:?}");
}

/// The OpenMetrics answer: parsed by an OpenMetrics parser, with every new
/// family of its type.
fn check_openmetrics(a: &Answer) {
    assert_eq!(a.content_type, OPENMETRICS, "{}", a.body);
    assert_eq!(a.vary, "accept");
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&a.body)
        .unwrap_or_else(|e| panic!("not OpenMetrics 1.0 ({e}):\n{}", a.body));
    for (name, ty, _, _) in NEW {
        let f = parsed
            .families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in the OpenMetrics answer:\n{}", a.body));
        assert_eq!(f.family_type, ty, "type of {name}:\n{}", a.body);
        assert!(
            f.iter_samples().next().is_some(),
            "{name} has no sample:\n{}",
            a.body
        );
    }
}

/// The classic answer: parsed by two classic parsers, every family typed
/// (none `untyped`, which a counter whose TYPE line lacks `_total` becomes),
/// every new family there with HELP and its type.
fn check_classic(a: &Answer) -> prometheus_parse::Scrape {
    assert_eq!(a.content_type, TEXT, "{}", a.body);
    assert_eq!(a.vary, "accept");
    for bad in ["# EOF", "# UNIT"] {
        assert!(
            !a.body.contains(bad),
            "{bad} in the classic text:\n{}",
            a.body
        );
    }
    let families = openmetrics_parser::prometheus::parse_prometheus(&a.body)
        .unwrap_or_else(|e| panic!("not the classic text format ({e}):\n{}", a.body))
        .families;
    let untyped: Vec<&String> = families
        .iter()
        .filter(|(_, f)| f.family_type == P::Unknown)
        .map(|(n, _)| n)
        .collect();
    assert!(
        untyped.is_empty(),
        "untyped families {untyped:?}:\n{}",
        a.body
    );
    let scrape = prometheus_parse::Scrape::parse(a.body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("prometheus-parse: {e}:\n{}", a.body));
    for (_, _, name, ty) in NEW {
        assert_eq!(
            families.get(name).map(|f| &f.family_type),
            Some(&ty),
            "{name} in the classic answer:\n{}",
            a.body
        );
        assert!(
            scrape.docs.contains_key(name),
            "no HELP for {name}:\n{}",
            a.body
        );
    }
    scrape
}

/// The classic samples of `metric` whose labels include `labels`, by the
/// rest of their labels.
fn values(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => *v,
            other => panic!("{metric}: unexpected {other:?}"),
        })
        .collect()
}

fn one(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let v = values(s, metric, labels);
    assert_eq!(v.len(), 1, "{metric}{labels:?}: {v:?}");
    v[0]
}

/// The histogram's buckets (upper bound, cumulative count) for `service`.
fn buckets(s: &prometheus_parse::Scrape, service: &str) -> Vec<(f64, f64)> {
    let h = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "xdplb_health_check_duration_seconds"
                && x.labels.get("service") == Some(service)
        })
        .unwrap_or_else(|| panic!("no check-latency histogram for {service}"));
    match &h.value {
        prometheus_parse::Value::Histogram(b) => b.iter().map(|c| (c.less_than, c.count)).collect(),
        other => panic!("the check latency is not a histogram: {other:?}"),
    }
}

// ---- 1. pinned maps and a status file -----------------------------------------

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(status::status_path(&self.0));
        let _ = DataPlane::unpin_all(&self.0);
    }
}

fn v4(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

/// Service `web` (id 1) with one backend (index 1), named by a status file
/// of this (live) process, with DNS counters, a rejected address, health
/// checks, and an interface attached with TC.
fn lab(pins: &Pins) -> DataPlane {
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
    dp.set_service(
        &key,
        &Service {
            id: 1,
            ..Default::default()
        },
    )
    .expect("writing SERVICES");
    let backend = Backend {
        addr: v4(Ipv4Addr::new(10, 1, 0, 7)),
        port_be: 8080u16.to_be(),
        family: FAMILY_V4,
        state: BACKEND_ACTIVE,
        service: 1,
    };
    dp.set_backend(1, &backend).expect("writing BACKENDS");

    let be: SocketAddr = "10.1.0.7:8080".parse().unwrap();
    let mut latency = status::LatencyHistogram::new(&lb_user::backends::health::LATENCY_BUCKETS_US);
    for us in [400, 900, 520_000] {
        latency.observe(us);
    }
    let st = Status {
        version: status::STATUS_VERSION,
        pid: std::process::id(),
        written_ms: lb_user::clock::now_ms(),
        pin_dir: pins.0.clone(),
        interfaces: vec![status::InterfaceStatus {
            name: "eth0".into(),
            ifindex: 2,
            hook: "tc".into(),
            state: "attached".into(),
            message: None,
            since_unix_ms: 0,
        }],
        services: vec![status::ServiceStatus {
            name: "web".into(),
            listen: "10.0.0.100:80/tcp".into(),
            id: 1,
            backends_name: "tasks.web".into(),
            rejected: vec![status::RejectedStatus {
                addr: "127.0.0.1".parse().unwrap(),
                reason: "loopback address".into(),
            }],
            dns: Some(status::DnsStatus {
                polls: 20,
                answers: 17,
                nxdomain: 0,
                nodata: 1,
                servfail: 1,
                timeout: 1,
                refused: 0,
                other: 0,
                changes: 2,
                last_success_ms: Some(1_700_000_000_250),
                tasks: Some(2),
            }),
            checks: Some(status::ChecksStatus {
                latency,
                backends: vec![status::BackendChecks {
                    addr: be,
                    passed: 5,
                    failed: 1,
                }],
            }),
            ..Default::default()
        }],
    };
    let path = status::status_path(&pins.0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    st.write(&path).expect("writing the status file");
    dp
}

#[test]
fn endpoint_serves_each_format_to_the_scraper_that_asks_for_it() {
    require_root();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-metrics-formats-{}",
        std::process::id()
    )));
    let _ = DataPlane::unpin_all(&pins.0);
    let dp = lab(&pins);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(metrics::bind("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let scraper = Scraper::new(&pins.0, Duration::from_secs(3600));
    let server = rt.spawn(metrics::serve_with(listener, Arc::clone(&scraper), rx));

    check_openmetrics(&get(addr, Some(PROMETHEUS_2)));
    let mut classic = Vec::new();
    for accept in [Some(PROMETHEUS_TEXT_ONLY), Some("*/*"), None] {
        let a = get(addr, accept);
        let scrape = check_classic(&a);
        classic.push((accept, a.body, scrape));
    }
    let (_, body, s) = &classic[0];
    let svc = [("service", "web")];
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        one(
            s,
            "xdplb_build_info",
            &[("version", version), ("attach", "tc")]
        ),
        1.0,
        "{body}"
    );
    assert_eq!(one(s, "xdplb_dns_polls_total", &svc), 20.0);
    assert_eq!(
        values(s, "xdplb_dns_failures_total", &svc)
            .iter()
            .sum::<f64>(),
        2.0,
        "failures by error:\n{body}"
    );
    assert_eq!(
        one(
            s,
            "xdplb_dns_negative_answers_total",
            &[("service", "web"), ("answer", "nodata")]
        ),
        1.0
    );
    assert_eq!(one(s, "xdplb_dns_task_set_changes_total", &svc), 2.0);
    assert_eq!(
        one(s, "xdplb_dns_last_success_timestamp_seconds", &svc),
        1_700_000_000.25
    );
    for (verdict, n) in [("accepted", 1.0), ("rejected", 1.0)] {
        assert_eq!(
            one(
                s,
                "xdplb_dns_tasks",
                &[("service", "web"), ("verdict", verdict)]
            ),
            n,
            "{verdict}:\n{body}"
        );
    }
    let be = [("service", "web"), ("backend", "10.1.0.7:8080")];
    let result = |r: &'static str| [be[0], be[1], ("result", r)];
    assert_eq!(one(s, "xdplb_health_checks_total", &result("pass")), 5.0);
    assert_eq!(one(s, "xdplb_health_checks_total", &result("fail")), 1.0);
    let b: BTreeMap<String, f64> = buckets(s, "web")
        .into_iter()
        .map(|(le, n)| (le.to_string(), n))
        .collect();
    assert_eq!(
        (b["0.0005"], b["0.001"], b["0.5"], b["1"], b["inf"]),
        (1.0, 2.0, 2.0, 3.0, 3.0),
        "cumulative buckets: {b:?}\n{body}"
    );
    // One snapshot state, three classic answers: the same text.
    for (accept, other, _) in &classic[1..] {
        assert_eq!(
            strip_walk_age(other),
            strip_walk_age(body),
            "Accept {accept:?} got another text"
        );
    }

    tx.send(true).unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops on shutdown")
            .unwrap()
            .unwrap()
    });
    drop(dp);
}

/// The one line that changes between two scrapes of the same state.
fn strip_walk_age(body: &str) -> String {
    body.lines()
        .filter(|l| !l.starts_with("xdplb_conntrack_walk_age_seconds "))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- 2. the daemon ------------------------------------------------------------

/// The daemon (TC mode, two tasks, TCP checks on `web`, none on `web-udp`)
/// publishes its DNS polls, its task set and its checks; its endpoint,
/// reached from inside the `lb` namespace, serves them in both formats.
#[test]
fn daemon_publishes_dns_and_health_check_metrics() {
    require_root();
    let tb = Testbed::new(Mode::Tc, 2).unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let lb = tb.lb();
    let in_lb = |f: &(dyn Fn() -> Answer + Sync)| -> Answer {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _g = lb.enter().expect("entering lb");
                f()
            })
            .join()
            .expect("the request thread panicked")
        })
    };
    let port = std::thread::scope(|s| {
        s.spawn(|| {
            let _g = lb.enter().expect("entering lb");
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        })
        .join()
        .unwrap()
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut args = tb.daemon_args().unwrap_or_else(|e| panic!("{e:#}"));
    args.extend(["--metrics-addr".into(), addr.to_string()]);
    let mut d = tb
        .start_daemon(&args)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    let active: Vec<SocketAddr> = (0..2)
        .flat_map(|i| {
            [
                SocketAddr::from((backend_addr(i), HTTP_PORT)),
                SocketAddr::from((backend_addr(i), UDP_PORT)),
            ]
        })
        .collect();
    d.wait_active(&active, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.diagnostics()));
    // A few DNS polls (200 ms) and checks (200 ms) after rotation, and a
    // status file written since (once a second).
    std::thread::sleep(Duration::from_millis(2_500));

    check_openmetrics(&in_lb(&|| get(addr, Some(PROMETHEUS_2))));
    let a = in_lb(&|| get(addr, None));
    let s = check_classic(&a);
    let body = &a.body;
    for service in ["web", "web-udp"] {
        let l = [("service", service)];
        let polls = one(&s, "xdplb_dns_polls_total", &l);
        assert!(polls >= 3.0, "{service}: {polls} DNS polls:\n{body}");
        assert_eq!(
            values(&s, "xdplb_dns_failures_total", &l)
                .iter()
                .sum::<f64>(),
            0.0,
            "{service}: DNS failures against the testbed's nameserver:\n{body}"
        );
        assert_eq!(
            one(
                &s,
                "xdplb_dns_tasks",
                &[("service", service), ("verdict", "accepted")]
            ),
            2.0,
            "{service}: tasks in DNS:\n{body}"
        );
        let last = one(&s, "xdplb_dns_last_success_timestamp_seconds", &l);
        let now = lb_user::clock::now_ms() as f64 / 1000.0;
        assert!(
            (now - 30.0..=now + 1.0).contains(&last),
            "{service}: last DNS success at {last}, now {now}:\n{body}"
        );
    }
    for i in 0..2 {
        let backend = SocketAddr::from((backend_addr(i), HTTP_PORT)).to_string();
        let l = [
            ("service", "web"),
            ("backend", &backend),
            ("result", "pass"),
        ];
        let passes = one(&s, "xdplb_health_checks_total", &l);
        assert!(passes >= 2.0, "{backend}: {passes} passed checks:\n{body}");
    }
    let count = buckets(&s, "web").last().map_or(0.0, |b| b.1);
    assert!(
        count >= 4.0,
        "web: {count} checks in the latency histogram:\n{body}"
    );
    assert!(
        values(&s, "xdplb_health_checks_total", &[("service", "web-udp")]).is_empty(),
        "web-udp has no checks, yet:\n{body}"
    );
    assert_eq!(
        one(&s, "xdplb_build_info", &[("attach", "tc")]),
        1.0,
        "{body}"
    );
    d.sigterm().unwrap_or_else(|e| panic!("{e:#}"));
}
