//! Prometheus metrics over HTTP (`GET /metrics`), read from the pinned maps
//! at scrape time. The counters live in the kernel maps, not in this
//! process, so they stay monotonic across daemon restarts and upgrades
//! (until `xdplb down` removes the maps). Off unless `xdplb run` is given
//! `--metrics-addr`.
//!
//! Two formats, chosen by the request's `Accept` header ([`Format::negotiate`]):
//! OpenMetrics 1.0 text, written by `prometheus-client`, when the header
//! prefers it (Prometheus does); the classic Prometheus text format 0.0.4
//! otherwise (curl, no header, `text/plain`), converted from the OpenMetrics
//! text ([`openmetrics_to_text`]) so that both say the same. Families come in
//! name order and series in label order, so two scrapes diff cleanly. The
//! DNS and health-check families come from the daemon's status file; their
//! counters are the daemon's own and start at zero when it starts. Every
//! metric is described in docs/OBSERVABILITY.md.
//!
//! A scrape costs the same whatever the size of the connection table: the
//! counters, services and backends are read on every scrape (BACKENDS in
//! batches, so the number of slots does not matter either), but the walk of
//! the connection table, the one read that grows with it, is reused for
//! [`CONNTRACK_WALK_EVERY`] and its age is exported. One snapshot is taken
//! at a time: requests that arrive while one is being taken wait for it and
//! get the same body (each format is encoded once per snapshot). At most
//! [`MAX_CONNECTIONS`] connections are served at once.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{ACCEPT, CONTENT_TYPE, VARY},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabel as _, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder,
        LabelValueEncoder, MetricEncoder, NoLabelSet,
    },
    metrics::MetricType,
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};

use crate::{
    dataplane::pinned::{PinnedError, PinnedMaps},
    report::snapshot::{ConnCounts, Daemon, MapsView, Snapshot},
    status::Status,
};

mod encode;
mod serve;

pub use encode::*;
pub use serve::*;

/// How long one walk of the connection table serves scrapes.
///
/// The walk is the only read whose cost grows with the table: about 0.3 s
/// for a million entries (docs/BENCHMARKS.md §7). Walking on every
/// scrape would let the scrapers decide how much CPU the daemon spends on
/// it (a dashboard refreshing every second: a third of a CPU); walking at
/// most every 10 s bounds that at a few percent of one. The price: `xdplb_conntrack_entries` and the
/// `*_active_connections` gauges can be up to 10 s plus a scrape interval
/// old, and `xdplb_conntrack_walk_age_seconds` says how old. Packet, byte
/// and new-connection counters and backend states are read on every scrape.
pub const CONNTRACK_WALK_EVERY: Duration = Duration::from_secs(10);

/// Connections the endpoint serves at once; more wait in the listen
/// backlog. Each serves one request (no keep-alive: an idle connection
/// would hold its place for nothing), and every request shares the
/// snapshot being taken, so this caps file descriptors and buffers, not
/// snapshots.
pub const MAX_CONNECTIONS: usize = 32;

/// How long one connection may stay open: a client that stops reading
/// cannot hold one of the [`MAX_CONNECTIONS`] for good.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The `Content-Type` of the OpenMetrics format.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Backend states with a `xdplb_backend_state` series each.
pub const STATES: [&str; 4] = ["probing", "active", "draining", "down"];

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path};

    use lb_common::{reason, Backend, Config, Counters, Service, ServiceKey, BACKEND_DOWN};

    use super::*;
    use crate::{
        report::snapshot::{ConnCounts, Daemon, MapsView},
        status,
    };

    fn snapshot() -> Snapshot {
        let d = Daemon::Missing { path: "/x".into() };
        Snapshot::build(&view(), &d, Path::new("/p"), 0, 0)
    }

    fn view() -> MapsView {
        let mut conns = ConnCounts {
            entries: 4,
            live_flows: 2,
            ..Default::default()
        };
        conns.by_service.insert(3, 2);
        conns.by_backend.insert((3, 9), 2);
        let mut reasons = vec![Counters::default(); reason::COUNT as usize];
        reasons[reason::FWD_TX as usize].packets = 5;
        let mut key = ServiceKey {
            port_be: 53u16.to_be(),
            proto: lb_common::PROTO_UDP,
            family: lb_common::FAMILY_V4,
            ..Default::default()
        };
        key.addr[..4].copy_from_slice(&[10, 0, 0, 5]);
        let mut b = Backend {
            port_be: 5353u16.to_be(),
            family: lb_common::FAMILY_V4,
            state: BACKEND_DOWN,
            service: 3,
            ..Default::default()
        };
        b.addr[..4].copy_from_slice(&[10, 1, 0, 9]);
        MapsView {
            config: Config::with_defaults(),
            services: vec![(
                key,
                Service {
                    id: 3,
                    ..Default::default()
                },
            )],
            backends: vec![(9, b)],
            service_counters: BTreeMap::from([(
                3,
                Counters {
                    packets: 7,
                    bytes: 700,
                    new_flows: 2,
                },
            )]),
            backend_counters: BTreeMap::from([(
                9,
                Counters {
                    packets: 7,
                    bytes: 700,
                    new_flows: 2,
                },
            )]),
            reasons,
            conns,
            conns_capacity: 100,
            unanswered_capacity: 50,
            events: vec![0; lb_common::event::COUNT as usize],
        }
    }

    /// A daemon's status for [`view`]'s service (id 3): named `dns`, with
    /// DNS counters, one rejected address and health checks, on an
    /// interface attached with TC.
    fn status() -> Status {
        let be: SocketAddr = "10.1.0.9:5353".parse().unwrap();
        let mut latency =
            status::LatencyHistogram::new(&crate::backends::health::LATENCY_BUCKETS_US);
        for us in [300, 800, 800, 504_000] {
            latency.observe(us);
        }
        Status {
            version: status::STATUS_VERSION,
            pid: 1,
            written_ms: 0,
            pin_dir: "/p".into(),
            interfaces: vec![status::InterfaceStatus {
                name: "eth0".into(),
                ifindex: 2,
                hook: "tc".into(),
                state: "attached".into(),
                message: None,
                since_unix_ms: 0,
            }],
            services: vec![status::ServiceStatus {
                name: "dns".into(),
                listen: "10.0.0.5:53/udp".into(),
                id: 3,
                backends_name: "tasks.dns".into(),
                backends: vec![status::BackendStatus {
                    addr: be,
                    index: Some(9),
                    state: "active".into(),
                    reason: "2 checks passed".into(),
                    since_ms: 0,
                    last_check: None,
                    last_refused_ms: None,
                }],
                rejected: vec![status::RejectedStatus {
                    addr: "127.0.0.1".parse().unwrap(),
                    reason: "loopback address".into(),
                }],
                error: Some(status::ServiceError {
                    message: "no free backend slot".into(),
                    since_ms: 0,
                    attempts: 3,
                }),
                map_write_errors: 3,
                dns: Some(status::DnsStatus {
                    polls: 12,
                    answers: 8,
                    nxdomain: 1,
                    nodata: 0,
                    servfail: 2,
                    timeout: 1,
                    refused: 0,
                    other: 0,
                    changes: 3,
                    last_success_ms: Some(1_700_000_000_500),
                    tasks: Some(2),
                }),
                checks: Some(status::ChecksStatus {
                    latency,
                    backends: vec![status::BackendChecks {
                        addr: be,
                        passed: 3,
                        failed: 1,
                    }],
                }),
                ..Default::default()
            }],
        }
    }

    /// [`view`] read while the daemon of [`status`] runs.
    fn running() -> (Snapshot, Status) {
        let st = status();
        let d = Daemon::Running(st.clone());
        (Snapshot::build(&view(), &d, Path::new("/p"), 0, 0), st)
    }

    #[test]
    fn every_metric_is_there_with_help_and_labels() {
        let text = encode_snapshot(&snapshot(), WalkAge::default()).unwrap();
        for line in [
            "# HELP xdplb_service_packets Packets forwarded for the service",
            "# TYPE xdplb_service_packets counter",
            "xdplb_service_packets_total{service=\"10.0.0.5:53/udp\"} 7",
            "xdplb_service_bytes_total{service=\"10.0.0.5:53/udp\"} 700",
            "xdplb_service_new_connections_total{service=\"10.0.0.5:53/udp\"} 2",
            "xdplb_service_active_connections{service=\"10.0.0.5:53/udp\"} 2",
            "xdplb_backend_packets_total{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 7",
            "xdplb_backend_bytes_total{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 700",
            "xdplb_backend_new_connections_total{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 2",
            "xdplb_backend_active_connections{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 2",
            "xdplb_backend_state{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\",state=\"down\"} 1",
            "xdplb_backend_state{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\",state=\"active\"} 0",
            "# TYPE xdplb_packets counter",
            "xdplb_packets_total{reason=\"fwd_tx\"} 5",
            "xdplb_packets_total{reason=\"pass_not_ip\"} 0",
            "xdplb_conntrack_entries 4",
            "xdplb_conntrack_capacity 100",
            "xdplb_daemon_running 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "missing line starting with {line:?} in:\n{text}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("xdplb_packets_total"))
                .count(),
            reason::COUNT as usize
        );
    }

    /// What Prometheus, curl, other scrapers and odd clients send, and the
    /// format each gets.
    #[test]
    fn openmetrics_only_when_the_accept_header_prefers_it() {
        use Format::{OpenMetrics as Om, Text};
        for (accept, want) in [
            (None, Text),
            (Some("*/*"), Text),
            (Some(""), Text),
            // Prometheus 2.x.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                     version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Om,
            ),
            // Prometheus 3.x, default scrape_protocols.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
                     application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;\
                     escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
                ),
                Om,
            ),
            // Prometheus 3.x with scrape_protocols: [PrometheusText0.0.4].
            (Some("text/plain;version=0.0.4;q=0.2,*/*;q=0.1"), Text),
            // Telegraf (no protobuf here: the text is the one it can take).
            (
                Some(
                    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
                     encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3",
                ),
                Text,
            ),
            // A browser.
            (
                Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                Text,
            ),
            (Some("application/openmetrics-text"), Om),
            (Some("Application/OpenMetrics-Text; Version=\"1.0.0\""), Om),
            (Some("application/openmetrics-text; version=0.0.1"), Om),
            // A version we do not write.
            (Some("application/openmetrics-text; version=2.0.0"), Text),
            // A tie goes to the classic text.
            (Some("application/openmetrics-text, text/plain"), Text),
            (Some("application/openmetrics-text;q=0.5, text/plain"), Text),
            (
                Some("text/plain;q=0.4, application/openmetrics-text;q=0.5"),
                Om,
            ),
            // The most specific range decides: text/plain refused outright.
            (Some("text/plain;q=0, */*"), Om),
            (Some("text/*;q=0.1, application/*;q=0.2"), Om),
            (Some("application/openmetrics-text;q=0"), Text),
            (Some("application/openmetrics-text;q=oops"), Text),
            (Some("application/json"), Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "Accept: {accept:?}");
        }
    }

    fn om_families(text: &str) -> BTreeMap<String, openmetrics_parser::OpenMetricsType> {
        let parsed = openmetrics_parser::openmetrics::parse_openmetrics(text)
            .unwrap_or_else(|e| panic!("not OpenMetrics ({e}):\n{text}"));
        parsed
            .families
            .into_iter()
            .map(|(name, f)| (name, f.family_type))
            .collect()
    }

    /// Every family of a running daemon's snapshot, in both formats, read by
    /// independent parsers: OpenMetrics by an OpenMetrics 1.0 parser, the
    /// classic text by two classic ones, each family with its type (a counter
    /// whose TYPE line lacks `_total` reads as untyped there).
    #[test]
    fn both_formats_parse_with_independent_parsers_and_every_family_is_typed() {
        use openmetrics_parser::{OpenMetricsType as O, PrometheusType as P};
        let (s, st) = running();
        let om = encode(&s, Some(&st), WalkAge::default(), Format::OpenMetrics);
        let text = encode(&s, Some(&st), WalkAge::default(), Format::Text);
        let om_types = om_families(&om);
        let text_types: BTreeMap<String, P> =
            openmetrics_parser::prometheus::parse_prometheus(&text)
                .unwrap_or_else(|e| panic!("not the classic text format ({e}):\n{text}"))
                .families
                .into_iter()
                .map(|(name, f)| (name, f.family_type))
                .collect();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("prometheus-parse reads the classic text");
        let untyped: Vec<&str> = scrape
            .samples
            .iter()
            .filter(|x| matches!(x.value, prometheus_parse::Value::Untyped(_)))
            .map(|x| x.metric.as_str())
            // This parser files a histogram's _sum and _count as untyped.
            .filter(|m| !m.starts_with("xdplb_health_check_duration_seconds_"))
            .collect();
        assert!(
            untyped.is_empty(),
            "untyped in the classic text: {untyped:?}\n{text}"
        );

        let families = families(&s, Some(&st), WalkAge::default());
        assert_eq!(om_types.len(), families.len(), "{om}");
        assert_eq!(text_types.len(), families.len(), "{text}");
        for f in &families {
            let (om_type, text_name, text_type) = match f.kind {
                Kind::Counter => (O::Counter, format!("{}_total", f.name), P::Counter),
                Kind::Gauge => (O::Gauge, f.name.to_string(), P::Gauge),
                Kind::Histogram => (O::Histogram, f.name.to_string(), P::Histogram),
                Kind::Info => (O::Info, format!("{}_info", f.name), P::Gauge),
            };
            assert_eq!(om_types.get(f.name), Some(&om_type), "{} in:\n{om}", f.name);
            assert_eq!(
                text_types.get(&text_name),
                Some(&text_type),
                "{text_name} in:\n{text}"
            );
            assert!(
                scrape.docs.contains_key(&text_name),
                "no HELP for {text_name}:\n{text}"
            );
        }
        for new in [
            "xdplb_build",
            "xdplb_dns_polls",
            "xdplb_dns_failures",
            "xdplb_dns_negative_answers",
            "xdplb_dns_task_set_changes",
            "xdplb_dns_last_success_timestamp_seconds",
            "xdplb_dns_tasks",
            "xdplb_health_checks",
            "xdplb_health_check_duration_seconds",
        ] {
            assert!(om_types.contains_key(new), "no {new} in:\n{om}");
        }
        // The same numbers: every classic sample is in the OpenMetrics text.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                om.lines().any(|l| l == line),
                "{line:?} is not in the OpenMetrics text:\n{om}"
            );
        }
    }

    /// Without a daemon there are no DNS or health-check series: their
    /// families are left out, and both formats still parse (an empty family
    /// trips openmetrics-parser).
    #[test]
    fn without_a_daemon_both_formats_parse() {
        let s = snapshot();
        let om = encode(&s, None, WalkAge::default(), Format::OpenMetrics);
        let families = om_families(&om);
        assert!(families.contains_key("xdplb_build"), "{om}");
        assert!(!families.contains_key("xdplb_dns_polls"), "{om}");
        let text = encode(&s, None, WalkAge::default(), Format::Text);
        openmetrics_parser::prometheus::parse_prometheus(&text)
            .unwrap_or_else(|e| panic!("not the classic text ({e}):\n{text}"));
        assert!(!text.contains("xdplb_dns"), "{text}");
    }

    /// The new families' samples, exactly, in the classic text.
    #[test]
    fn classic_text_has_typed_counters_info_as_gauge_and_the_histogram() {
        let (s, st) = running();
        let text = encode(&s, Some(&st), WalkAge::default(), Format::Text);
        let kernel = kernel_release();
        let build = format!(
            "xdplb_build_info{{version=\"{}\",kernel=\"{kernel}\",attach=\"tc\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        for line in [
            "# HELP xdplb_service_packets_total Packets forwarded for the service",
            "# TYPE xdplb_service_packets_total counter",
            "xdplb_service_packets_total{service=\"dns\"} 7",
            "# TYPE xdplb_build_info gauge",
            &build,
            "# TYPE xdplb_dns_polls_total counter",
            "xdplb_dns_polls_total{service=\"dns\"} 12",
            "xdplb_dns_failures_total{service=\"dns\",error=\"servfail\"} 2",
            "xdplb_dns_failures_total{service=\"dns\",error=\"timeout\"} 1",
            "xdplb_dns_negative_answers_total{service=\"dns\",answer=\"nxdomain\"} 1",
            "xdplb_dns_task_set_changes_total{service=\"dns\"} 3",
            "# TYPE xdplb_dns_last_success_timestamp_seconds gauge",
            "xdplb_dns_last_success_timestamp_seconds{service=\"dns\"} 1700000000.5",
            "xdplb_dns_tasks{service=\"dns\",verdict=\"accepted\"} 1",
            "xdplb_dns_tasks{service=\"dns\",verdict=\"rejected\"} 1",
            "# TYPE xdplb_service_map_write_errors_total counter",
            "xdplb_service_map_write_errors_total{service=\"dns\"} 3",
            "xdplb_service_map_update_failing{service=\"dns\"} 1",
            "# TYPE xdplb_health_checks_total counter",
            "xdplb_health_checks_total{service=\"dns\",backend=\"10.1.0.9:5353\",result=\"fail\"} 1",
            "xdplb_health_checks_total{service=\"dns\",backend=\"10.1.0.9:5353\",result=\"pass\"} 3",
            "# TYPE xdplb_health_check_duration_seconds histogram",
            "xdplb_health_check_duration_seconds_bucket{le=\"0.00025\",service=\"dns\"} 0",
            "xdplb_health_check_duration_seconds_bucket{le=\"0.0005\",service=\"dns\"} 1",
            "xdplb_health_check_duration_seconds_bucket{le=\"0.001\",service=\"dns\"} 3",
            "xdplb_health_check_duration_seconds_bucket{le=\"0.5\",service=\"dns\"} 3",
            "xdplb_health_check_duration_seconds_bucket{le=\"1.0\",service=\"dns\"} 4",
            "xdplb_health_check_duration_seconds_bucket{le=\"+Inf\",service=\"dns\"} 4",
            "xdplb_health_check_duration_seconds_sum{service=\"dns\"} 0.5059",
            "xdplb_health_check_duration_seconds_count{service=\"dns\"} 4",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "missing line starting with {line:?} in:\n{text}"
            );
        }
        for bad in [
            "# EOF",
            "# UNIT",
            "_created",
            "# TYPE xdplb_service_packets counter",
        ] {
            assert!(!text.contains(bad), "{bad:?} in the classic text:\n{text}");
        }
    }

    /// What the converter does to what `prometheus-client` could write but
    /// xdplb does not (yet): `_created`, exemplars, UNIT, unknown types;
    /// and escapes, with a `}` and ` # ` inside a label value.
    #[test]
    fn openmetrics_to_text_follows_the_classic_rules() {
        let om = "\
# HELP a_seconds A \\\"quoted\\\" word, a \\\\ and a\\nnewline.
# TYPE a_seconds counter
# UNIT a_seconds seconds
a_seconds_total{l=\"x}y # z\\\"\"} 1.5 # {trace_id=\"1\"} 1.0 1.0
a_seconds_created{l=\"x}y # z\\\"\"} 1.7e9
# HELP u Unknown.
# TYPE u unknown
u 3
# HELP i Info.
# TYPE i info
i_info{v=\"1\"} 1
# HELP h H.
# TYPE h histogram
h_sum 1.0
h_count 1
h_bucket{le=\"+Inf\"} 1
h_created 1.7e9
# EOF
";
        let want = "\
# HELP a_seconds_total A \"quoted\" word, a \\\\ and a\\nnewline.
# TYPE a_seconds_total counter
a_seconds_total{l=\"x}y # z\\\"\"} 1.5
# HELP u Unknown.
# TYPE u untyped
u 3
# HELP i_info Info.
# TYPE i_info gauge
i_info{v=\"1\"} 1
# HELP h H.
# TYPE h histogram
h_sum 1.0
h_count 1
h_bucket{le=\"+Inf\"} 1
";
        assert_eq!(openmetrics_to_text(om), want);
        openmetrics_parser::prometheus::parse_prometheus(want)
            .unwrap_or_else(|e| panic!("not the classic text ({e}):\n{want}"));
    }

    /// Label values with `"`, `\` and a newline come out escaped in both
    /// formats, and read back as they were.
    #[test]
    fn label_values_are_escaped() {
        let (mut s, mut st) = running();
        let name = "we\"ird\\na\nme";
        s.services[0].name = Some(name.into());
        st.services[0].name = name.into();
        for format in [Format::OpenMetrics, Format::Text] {
            let out = encode(&s, Some(&st), WalkAge::default(), format);
            assert!(
                out.contains("xdplb_dns_polls_total{service=\"we\\\"ird\\\\na\\nme\"} 12"),
                "{format:?}:\n{out}"
            );
        }
        let om = encode(&s, Some(&st), WalkAge::default(), Format::OpenMetrics);
        let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&om)
            .unwrap_or_else(|e| panic!("not OpenMetrics ({e}):\n{om}"));
        let polls = &parsed.families["xdplb_dns_polls"];
        assert!(
            polls
                .get_sample_by_label_values(&[name.to_string()])
                .is_some(),
            "{name:?} did not read back from:\n{om}"
        );
    }

    /// Families in name order, series in label order, whatever order the
    /// services, backends and reasons came in: two encodings of the same
    /// state are the same text.
    #[test]
    fn families_and_series_are_sorted() {
        let (mut s, st) = running();
        let mut b = s.services[0].backends[0].clone();
        b.addr = "10.1.0.10:5353".parse().unwrap();
        s.services[0].backends.push(b);
        s.reasons.reverse();
        let text = encode(&s, Some(&st), WalkAge::default(), Format::Text);
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "families out of order");
        let series = |prefix: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
                .collect()
        };
        for family in ["xdplb_packets_total{", "xdplb_backend_state{"] {
            let got = series(family);
            let mut want = got.clone();
            want.sort();
            assert_eq!(got, want, "{family} series out of order");
        }
        assert_eq!(
            series("xdplb_backend_packets_total{"),
            [
                "xdplb_backend_packets_total{service=\"dns\",backend=\"10.1.0.10:5353\"}",
                "xdplb_backend_packets_total{service=\"dns\",backend=\"10.1.0.9:5353\"}",
            ]
        );
        for _ in 0..3 {
            assert_eq!(
                encode(&s, Some(&st), WalkAge::default(), Format::Text),
                text,
                "two encodings of one state differ"
            );
        }
    }

    /// `prometheus-client` writes HELP as it is: ours must need no escape.
    #[test]
    fn help_texts_need_no_escaping() {
        let (s, st) = running();
        for f in families(&s, Some(&st), WalkAge::default()) {
            assert!(
                !f.help.contains(['\\', '"', '\n']),
                "{}: HELP needs escaping: {:?}",
                f.name,
                f.help
            );
        }
    }

    #[tokio::test]
    async fn serve_answers_503_without_maps_404_elsewhere_and_stops() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            addr,
            Path::new("/sys/fs/bpf/xdplb-unit-test-nothing-here").into(),
            rx,
        ));
        let get = |path: &'static str| async move {
            for _ in 0..50 {
                if let Ok(r) = http_get(addr, path).await {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the metrics server on {addr} never answered");
        };
        let (code, body) = get("/metrics").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("no xdplb state under"), "{body}");
        assert_eq!(get("/nope").await.0, 404);
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops when told")
            .unwrap()
            .unwrap();
    }

    /// The first snapshot waits at a gate until nineteen more requests
    /// queue behind it: all twenty get its body, and it is the only one
    /// taken. A request after it takes a new one.
    #[tokio::test(flavor = "current_thread")]
    async fn requests_during_a_snapshot_wait_for_it_and_share_it() {
        use std::sync::Condvar;
        let flight = Arc::new(SingleFlight::default());
        let taken = Arc::new(AtomicU64::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let take = || {
            let (taken, gate) = (Arc::clone(&taken), Arc::clone(&gate));
            move || {
                let n = taken.fetch_add(1, Ordering::SeqCst) + 1;
                let (open, cv) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                Ok(Bytes::from(format!("snapshot {n}")))
            }
        };
        let request = || {
            let (flight, take) = (Arc::clone(&flight), take());
            tokio::spawn(async move { flight.run(take).await })
        };
        let first = request();
        while taken.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut requests: Vec<_> = (0..19).map(|_| request()).collect();
        // One runtime thread: each queued task reaches the lock and waits.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        requests.insert(0, first);
        for r in requests {
            assert_eq!(r.await.unwrap(), Ok(Bytes::from("snapshot 1")));
        }
        assert_eq!(
            taken.load(Ordering::SeqCst),
            1,
            "twenty requests during one snapshot took more than one"
        );
        assert_eq!(flight.run(take()).await, Ok(Bytes::from("snapshot 2")));
    }

    /// A minimal HTTP/1.0 GET, so the test needs no client crate.
    async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        let code = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        Ok((code, body))
    }
}
