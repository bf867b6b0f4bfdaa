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

/// How old the connection-table figures of a snapshot are.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WalkAge {
    /// Since the walk finished.
    pub age: Duration,
    /// How long the walk took.
    pub took: Duration,
}

/// The two formats `/metrics` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, written by `prometheus-client`.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4, converted from the
    /// OpenMetrics text ([`openmetrics_to_text`]).
    Text,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => CONTENT_TYPE_OPENMETRICS,
            Format::Text => CONTENT_TYPE_TEXT,
        }
    }

    /// The format for a request's `Accept` header (its values joined with
    /// commas; `None` without one).
    ///
    /// OpenMetrics only when the header prefers it, that is when its quality
    /// (`q`, 1 unless given) is higher than the classic format's; the classic
    /// text in every other case: no header, `*/*` (curl, browsers), a tie,
    /// `text/plain` alone (VictoriaMetrics, Telegraf), a header without either
    /// format. Each format's quality comes from the most specific media range
    /// that matches it (RFC 9110 §12.5.1): `application/openmetrics-text`
    /// (`version` absent, `1.0.0` or `0.0.1`), else `application/*`, else
    /// `*/*` for OpenMetrics; `text/plain` (`version` absent, `0.0.4` or
    /// `1.0.0`), else `text/*`, else `*/*` for the classic text. Prometheus
    /// 2 and 3 list OpenMetrics first with the highest quality and get it;
    /// with `scrape_protocols: [PrometheusText0.0.4]` they get the classic
    /// text. The fallback to the classic text is what Prometheus' Go client
    /// does too when nothing matches.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Format::Text;
        };
        // (specificity, quality) of the best range so far, per format.
        let (mut om, mut text) = ((-1, 0.0), (-1, 0.0));
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let Some((ty, sub)) = media.split_once('/') else {
                continue;
            };
            let (mut q, mut version) = (1.0_f64, None);
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    // An unreadable q makes the range unacceptable.
                    "q" => q = v.parse::<f64>().unwrap_or(0.0).clamp(0.0, 1.0),
                    "version" => version = Some(v.to_string()),
                    _ => {}
                }
            }
            let v = version.as_deref();
            let om_spec = match (ty, sub) {
                ("application", "openmetrics-text")
                    if matches!(v, None | Some("1.0.0" | "0.0.1")) =>
                {
                    2
                }
                ("application", "*") => 1,
                ("*", "*") => 0,
                _ => -1,
            };
            let text_spec = match (ty, sub) {
                ("text", "plain") if matches!(v, None | Some("0.0.4" | "1.0.0")) => 2,
                ("text", "*") => 1,
                ("*", "*") => 0,
                _ => -1,
            };
            for (spec, best) in [(om_spec, &mut om), (text_spec, &mut text)] {
                if spec > best.0 || (spec == best.0 && spec >= 0 && q > best.1) {
                    *best = (spec, q);
                }
            }
        }
        if om.1 > text.1 {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// The `Content-Type` of the classic text format.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Label names and values of one series, in the order they are written.
type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// OpenMetrics' info type: one series named `<family>_info`, value 1; a
    /// gauge of that name in the classic text.
    Info,
}

#[derive(Debug)]
enum Value {
    Int(u64),
    Float(f64),
    /// Buckets as (upper bound, observations in that bucket alone), the last
    /// bound `f64::MAX` (written `+Inf`).
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
    Info,
}

/// One metric family with its series, as both formats write it.
#[derive(Debug)]
struct Family {
    /// The OpenMetrics family name: without `_total` (counters) or `_info`.
    name: &'static str,
    help: &'static str,
    kind: Kind,
    series: Vec<(Labels, Value)>,
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            series: Vec::new(),
        }
    }

    fn add(&mut self, labels: &[(&'static str, &str)], value: Value) {
        let labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.series.push((labels, value));
    }
}

/// Every family of one snapshot, sorted by name and each one's series by
/// their labels (as Prometheus' Go client sorts them), so two scrapes of
/// the same state are the same text and diff cleanly. `status` is the
/// daemon's, which the DNS and health-check figures come from.
fn families(s: &Snapshot, status: Option<&Status>, walk: WalkAge) -> Vec<Family> {
    use Kind::{Counter, Gauge, Histogram, Info};
    let mut svc_packets = Family::new(
        "xdplb_service_packets",
        Counter,
        "Packets forwarded for the service, both directions (from SERVICE_STATS)",
    );
    let mut svc_bytes = Family::new(
        "xdplb_service_bytes",
        Counter,
        "Bytes (whole frames) forwarded for the service, both directions",
    );
    let mut svc_new = Family::new(
        "xdplb_service_new_connections",
        Counter,
        "New flows the data plane created for the service (Maglev picks, re-picks included)",
    );
    let mut svc_active = Family::new(
        "xdplb_service_active_connections",
        Gauge,
        "Live flows of the service: forward entries in the connection table that have not expired",
    );
    let mut be_packets = Family::new(
        "xdplb_backend_packets",
        Counter,
        "Packets forwarded to or from the backend (from BACKEND_STATS)",
    );
    let mut be_bytes = Family::new(
        "xdplb_backend_bytes",
        Counter,
        "Bytes (whole frames) forwarded to or from the backend",
    );
    let mut be_new = Family::new(
        "xdplb_backend_new_connections",
        Counter,
        "New flows the data plane sent to the backend",
    );
    let mut be_active = Family::new(
        "xdplb_backend_active_connections",
        Gauge,
        "Live flows pinned to the backend: forward entries that have not expired",
    );
    let mut be_state = Family::new(
        "xdplb_backend_state",
        Gauge,
        "1 for the backend's current state (probing, active, draining, down), 0 for the others; \
         the daemon's state, or the data plane's when the daemon is not running",
    );
    for svc in &s.services {
        let service = svc.label();
        let l = [("service", service)];
        svc_packets.add(&l, Value::Int(svc.packets));
        svc_bytes.add(&l, Value::Int(svc.bytes));
        svc_new.add(&l, Value::Int(svc.new_connections));
        svc_active.add(&l, Value::Int(svc.active_connections));
        for b in &svc.backends {
            let addr = b.addr.to_string();
            let l = [("service", service), ("backend", addr.as_str())];
            be_packets.add(&l, Value::Int(b.packets));
            be_bytes.add(&l, Value::Int(b.bytes));
            be_new.add(&l, Value::Int(b.new_connections));
            be_active.add(&l, Value::Int(b.active_connections));
            for st in STATES {
                let l = [("service", service), ("backend", &addr), ("state", st)];
                be_state.add(&l, Value::Int(u64::from(b.state == st)));
            }
        }
    }
    let mut reason_packets = Family::new(
        "xdplb_packets",
        Counter,
        "Packets seen by the data plane, by what happened to them (lb_common::reason names)",
    );
    for r in &s.reasons {
        reason_packets.add(&[("reason", r.name)], Value::Int(r.packets));
    }
    let mut events = Family::new(
        "xdplb_events",
        Counter,
        "Events the data plane counts beside each packet's reason: flows established, TCP \
         segments other than a fresh SYN that missed the table, unanswered flows expired, ports \
         freed by RST, new flows under the flood guard, ports taken under it \
         (lb_common::event names)",
    );
    for e in &s.events {
        events.add(&[("event", e.name)], Value::Int(e.count));
    }
    let one = |name, kind, help, value| {
        let mut f = Family::new(name, kind, help);
        f.add(&[], value);
        f
    };
    let mut out = vec![
        svc_packets,
        svc_bytes,
        svc_new,
        svc_active,
        be_packets,
        be_bytes,
        be_new,
        be_active,
        be_state,
        reason_packets,
        events,
        one(
            "xdplb_conntrack_unanswered_entries",
            Gauge,
            "Entries in the table of flows not established yet (UNANSWERED; two per flow)",
            Value::Int(s.conntrack.unanswered.entries),
        ),
        one(
            "xdplb_conntrack_unanswered_capacity",
            Gauge,
            "Capacity of the table of flows not established yet (an LRU of its own, so they \
             never evict an established flow)",
            Value::Int(s.conntrack.unanswered.capacity),
        ),
        one(
            "xdplb_conntrack_entries",
            Gauge,
            "Entries in the connection table of established flows (two per flow: forward and \
             reverse)",
            Value::Int(s.conntrack.entries),
        ),
        one(
            "xdplb_conntrack_capacity",
            Gauge,
            "Capacity of the connection table (an LRU: the oldest entries go when it is full)",
            Value::Int(s.conntrack.capacity),
        ),
        one(
            "xdplb_conntrack_walk_age_seconds",
            Gauge,
            "Age of the connection-table walk behind xdplb_conntrack_entries and the \
             *_active_connections gauges (one walk serves scrapes for up to 10 s)",
            Value::Float(walk.age.as_secs_f64()),
        ),
        one(
            "xdplb_conntrack_walk_duration_seconds",
            Gauge,
            "How long that walk of the connection table took",
            Value::Float(walk.took.as_secs_f64()),
        ),
        one(
            "xdplb_daemon_running",
            Gauge,
            "1 when a live daemon's status file supplied names and states, 0 when they come \
             from the maps",
            Value::Int(u64::from(s.daemon.running)),
        ),
    ];

    let mut build = Family::new(
        "xdplb_build",
        Info,
        "The xdplb version serving these metrics, the kernel release, and the hooks its \
         interfaces are attached with (xdp, tc, or both as tc+xdp; unknown while the daemon \
         is not running)",
    );
    let hooks: std::collections::BTreeSet<&str> = s
        .daemon
        .interfaces
        .iter()
        .map(|i| i.hook.as_str())
        .collect();
    let attach = if hooks.is_empty() {
        "unknown".to_string()
    } else {
        // `+`, not a comma: naive parsers split label sets at commas.
        hooks.into_iter().collect::<Vec<_>>().join("+")
    };
    build.add(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("kernel", kernel_release()),
            ("attach", &attach),
        ],
        Value::Info,
    );
    out.push(build);

    let mut dns_polls = Family::new(
        "xdplb_dns_polls",
        Counter,
        "DNS lookups of the service's task name since the daemon started",
    );
    let mut dns_failures = Family::new(
        "xdplb_dns_failures",
        Counter,
        "DNS lookups that failed, by error (servfail, timeout, refused, other); the task set \
         is kept through failures",
    );
    let mut dns_negative = Family::new(
        "xdplb_dns_negative_answers",
        Counter,
        "DNS lookups answered with NXDOMAIN or with no address (nodata); empty_polls of them in \
         a row empty the task set",
    );
    let mut dns_changes = Family::new(
        "xdplb_dns_task_set_changes",
        Counter,
        "Times a DNS answer changed the service's task set",
    );
    let mut dns_last = Family::new(
        "xdplb_dns_last_success_timestamp_seconds",
        Gauge,
        "Unix time of the last DNS lookup the nameserver answered (addresses or a negative \
         answer: anything but a failure); absent until the first",
    );
    let mut dns_tasks = Family::new(
        "xdplb_dns_tasks",
        Gauge,
        "Addresses in the service's current DNS task set, by verdict: accepted as backends, or \
         rejected (not a task address, or over max_backends; xdplb backends says why)",
    );
    let mut checks = Family::new(
        "xdplb_health_checks",
        Counter,
        "Health checks of the backend since its checker started, by result (pass, fail)",
    );
    let mut check_latency = Family::new(
        "xdplb_health_check_duration_seconds",
        Histogram,
        "How long the service's health checks took, passed or failed (a timeout counts as the \
         time it waited)",
    );
    let mut map_errors = Family::new(
        "xdplb_service_map_write_errors",
        Counter,
        "Map updates of the service that failed since the daemon started (the data plane kept \
         the last good table; xdplb backends shows the error)",
    );
    let mut map_failing = Family::new(
        "xdplb_service_map_update_failing",
        Gauge,
        "1 while the service's maps lag behind its state because updates fail (retried with \
         back-off), else 0",
    );
    for svc in status.map(|st| &st.services[..]).unwrap_or_default() {
        let service = svc.name.as_str();
        let l = [("service", service)];
        map_errors.add(&l, Value::Int(svc.map_write_errors));
        map_failing.add(&l, Value::Int(u64::from(svc.error.is_some())));
        if let Some(d) = &svc.dns {
            dns_polls.add(&l, Value::Int(d.polls));
            for (error, n) in [
                ("servfail", d.servfail),
                ("timeout", d.timeout),
                ("refused", d.refused),
                ("other", d.other),
            ] {
                dns_failures.add(&[("service", service), ("error", error)], Value::Int(n));
            }
            for (answer, n) in [("nxdomain", d.nxdomain), ("nodata", d.nodata)] {
                dns_negative.add(&[("service", service), ("answer", answer)], Value::Int(n));
            }
            dns_changes.add(&l, Value::Int(d.changes));
            if let Some(ms) = d.last_success_ms {
                dns_last.add(&l, Value::Float(ms as f64 / 1000.0));
            }
            if let Some(tasks) = d.tasks {
                let rejected = svc.rejected.len() as u64;
                for (verdict, n) in [
                    ("accepted", tasks.saturating_sub(rejected)),
                    ("rejected", rejected),
                ] {
                    dns_tasks.add(&[("service", service), ("verdict", verdict)], Value::Int(n));
                }
            }
        }
        if let Some(c) = &svc.checks {
            for b in &c.backends {
                let addr = b.addr.to_string();
                for (result, n) in [("pass", b.passed), ("fail", b.failed)] {
                    let l = [("service", service), ("backend", &addr), ("result", result)];
                    checks.add(&l, Value::Int(n));
                }
            }
            let h = &c.latency;
            if h.counts.len() == h.bounds_us.len() + 1 {
                let bounds = h.bounds_us.iter().map(|&us| us as f64 / 1e6);
                let buckets = bounds.chain([f64::MAX]).zip(h.counts.iter().copied());
                check_latency.add(
                    &l,
                    Value::Histogram {
                        sum: h.sum_us as f64 / 1e6,
                        count: h.count(),
                        buckets: buckets.collect(),
                    },
                );
            }
        }
    }
    out.extend([
        map_errors,
        map_failing,
        dns_polls,
        dns_failures,
        dns_negative,
        dns_changes,
        dns_last,
        dns_tasks,
        checks,
        check_latency,
    ]);

    // A family without series is left out, as Prometheus' Go client does:
    // OpenMetrics allows one, but some parsers then take the next family's
    // HELP for a sample of it (openmetrics-parser 0.5 does).
    out.retain(|f| !f.series.is_empty());
    out.sort_by_key(|f| f.name);
    for f in &mut out {
        f.series.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out
}

/// This machine's kernel release (`uname -r`), read once.
fn kernel_release() -> &'static str {
    static RELEASE: OnceLock<String> = OnceLock::new();
    RELEASE.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    })
}

/// The families, for `prometheus-client`'s OpenMetrics encoder, in their
/// order.
#[derive(Debug)]
struct Collected(Vec<Family>);

/// A label value with OpenMetrics' escapes (`\\`, `\"`, `\n`);
/// `prometheus-client` writes values as they are.
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => e.write_str("\\\\")?,
                '"' => e.write_str("\\\"")?,
                '\n' => e.write_str("\\n")?,
                c => e.write_char(c)?,
            }
        }
        Ok(())
    }
}

struct LabelSet<'a>(&'a [(&'static str, String)]);

impl EncodeLabelSet for LabelSet<'_> {
    fn encode(&self, e: &mut LabelSetEncoder) -> std::fmt::Result {
        for (k, v) in self.0 {
            (*k, Escaped(v)).encode(e.encode_label())?;
        }
        Ok(())
    }
}

impl Collector for Collected {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
                Kind::Info => MetricType::Info,
            };
            let mut family = enc.encode_descriptor(f.name, f.help, None, kind)?;
            for (labels, value) in &f.series {
                let labels = LabelSet(labels);
                if let Value::Info = value {
                    family.encode_info(&labels)?;
                } else if labels.0.is_empty() {
                    write_value(&mut family, f.kind, value)?;
                } else {
                    write_value(&mut family.encode_family(&labels)?, f.kind, value)?;
                }
            }
        }
        Ok(())
    }
}

fn write_value(e: &mut MetricEncoder, kind: Kind, v: &Value) -> std::fmt::Result {
    match v {
        Value::Int(n) if kind == Kind::Counter => e.encode_counter::<NoLabelSet, u64, u64>(n, None),
        Value::Int(n) => e.encode_gauge(n),
        Value::Float(x) => e.encode_gauge(x),
        Value::Histogram {
            sum,
            count,
            buckets,
        } => e.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None),
        Value::Info => Ok(()),
    }
}

/// The metrics of one snapshot in `format`. `status` is the daemon's (the
/// DNS and health-check figures come from it); `walk` says how old the
/// connection-table figures are.
pub fn encode(s: &Snapshot, status: Option<&Status>, walk: WalkAge, format: Format) -> String {
    let om = encode_openmetrics(families(s, status, walk));
    match format {
        Format::OpenMetrics => om,
        Format::Text => openmetrics_to_text(&om),
    }
}

fn encode_openmetrics(families: Vec<Family>) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Collected(families)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)
        .expect("writing into a String cannot fail");
    out
}

/// The metrics of one snapshot, in the OpenMetrics text format, without
/// the daemon's DNS and health-check figures. `walk` says how old its
/// connection-table figures are.
pub fn encode_snapshot(s: &Snapshot, walk: WalkAge) -> Result<String> {
    Ok(encode(s, None, walk, Format::OpenMetrics))
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text as
/// `prometheus-client` writes it (HELP, TYPE, then the samples of each
/// family; no timestamps):
/// - a counter's HELP and TYPE name the family with `_total`, as its samples
///   do, and its `_created` samples go;
/// - an info family becomes a gauge named `<family>_info`;
/// - `unknown`, `stateset` and `gaugehistogram` become `untyped`;
/// - `# UNIT`, `# EOF` and exemplars go; HELP keeps only the `\\` and `\n`
///   escapes (0.0.4 has no `\"`). Label values have the same escapes in
///   both formats and are copied as they are.
pub fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // The family being written: its OpenMetrics name and type.
    let (mut family, mut kind) = ("", "");
    // A HELP line waits for its TYPE, which says what to call the family.
    let mut help: Option<(&str, &str)> = None;
    let flush = |out: &mut String, help: &mut Option<(&str, &str)>, name: &str| {
        if let Some((_, text)) = help.take() {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            out.push_str(&text.replace("\\\"", "\""));
            out.push('\n');
        }
    };
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            let (kw, name, text) = (
                it.next().unwrap_or(""),
                it.next().unwrap_or(""),
                it.next().unwrap_or(""),
            );
            match kw {
                "HELP" => {
                    if let Some((n, _)) = help {
                        flush(&mut out, &mut help, n);
                    }
                    help = Some((name, text));
                }
                "TYPE" => {
                    let (sample, ty) = match text {
                        "counter" => (format!("{name}_total"), "counter"),
                        "info" => (format!("{name}_info"), "gauge"),
                        "gauge" | "histogram" | "summary" => (name.to_string(), text),
                        _ => (name.to_string(), "untyped"),
                    };
                    match help {
                        Some((n, _)) if n == name => flush(&mut out, &mut help, &sample),
                        Some((n, _)) => flush(&mut out, &mut help, n),
                        None => {}
                    }
                    out.push_str("# TYPE ");
                    out.push_str(&sample);
                    out.push(' ');
                    out.push_str(ty);
                    out.push('\n');
                    (family, kind) = (name, text);
                }
                _ => {} // UNIT, EOF
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if let Some((n, _)) = help {
            flush(&mut out, &mut help, n);
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if matches!(kind, "counter" | "histogram" | "summary")
            && name.strip_prefix(family) == Some("_created")
        {
            continue;
        }
        // The labels end at the first `}` outside a quoted value.
        let mut end = name_end;
        if line[name_end..].starts_with('{') {
            let (mut quoted, mut escaped) = (false, false);
            for (i, c) in line[name_end..].char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '}' if !quoted => {
                        end = name_end + i + 1;
                        break;
                    }
                    _ => {}
                }
            }
        }
        // Value, then an optional exemplar after " # ".
        let rest = &line[end..];
        let rest = rest.split(" # ").next().unwrap_or(rest);
        out.push_str(&line[..end]);
        out.push_str(rest.trim_end());
        out.push('\n');
    }
    if let Some((n, _)) = help {
        flush(&mut out, &mut help, n);
    }
    out
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What `/metrics` answers: the body, or the status and the reason.
pub type Scrape = Result<Bytes, (StatusCode, String)>;

/// One snapshot's body: the OpenMetrics text, and the classic text made
/// from it the first time a request asks for that (each format is encoded
/// at most once per snapshot, whatever the number of requests).
#[derive(Debug)]
pub struct Body {
    openmetrics: Bytes,
    text: OnceLock<Bytes>,
}

impl Body {
    fn new(openmetrics: String) -> Self {
        Self {
            openmetrics: Bytes::from(openmetrics),
            text: OnceLock::new(),
        }
    }

    /// The body in `format` (blocking: it may convert).
    pub fn get(&self, format: Format) -> Bytes {
        match format {
            Format::OpenMetrics => self.openmetrics.clone(),
            Format::Text => self
                .text
                .get_or_init(|| {
                    let om = std::str::from_utf8(&self.openmetrics)
                        .expect("the OpenMetrics body was a String");
                    Bytes::from(openmetrics_to_text(om))
                })
                .clone(),
        }
    }

    /// The body in `format` if no conversion is needed.
    fn ready(&self, format: Format) -> Option<Bytes> {
        match format {
            Format::OpenMetrics => Some(self.openmetrics.clone()),
            Format::Text => self.text.get().cloned(),
        }
    }
}

/// One snapshot at a time: requests that arrive while one is being taken
/// wait for it and share its result (an `Arc<Body>` or `Bytes`, so not a
/// copy each).
struct SingleFlight<T> {
    /// The last snapshot and its number. Held while a snapshot is taken, so
    /// requests that arrive meanwhile wait for that one.
    last: Arc<tokio::sync::Mutex<Taken<T>>>,
    /// The number of the last finished snapshot, readable without the lock.
    finished: Arc<AtomicU64>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        Self {
            last: Arc::new(tokio::sync::Mutex::new(Taken {
                number: 0,
                scrape: None,
            })),
            finished: Arc::default(),
        }
    }
}

struct Taken<T> {
    number: u64,
    scrape: Option<Result<T, (StatusCode, String)>>,
}

impl<T: Clone + Send + 'static> SingleFlight<T> {
    /// `take`'s result, or that of the snapshot that was being taken when
    /// the call came. `take` runs on a blocking thread.
    async fn run(
        &self,
        take: impl FnOnce() -> Result<T, (StatusCode, String)> + Send + 'static,
    ) -> Result<T, (StatusCode, String)> {
        let seen = self.finished.load(Ordering::Acquire);
        let mut taken = Arc::clone(&self.last).lock_owned().await;
        if taken.number > seen {
            if let Some(s) = &taken.scrape {
                return s.clone();
            }
        }
        // The snapshot runs in a task of its own that holds the lock: a
        // client that hangs up neither stops it nor lets a second one start.
        let finished = Arc::clone(&self.finished);
        let snapshot = tokio::spawn(async move {
            let scrape = tokio::task::spawn_blocking(take)
                .await
                .unwrap_or_else(|e| Err(failed(e)));
            taken.number += 1;
            taken.scrape = Some(scrape.clone());
            finished.store(taken.number, Ordering::Release);
            scrape
        });
        snapshot.await.unwrap_or_else(|e| Err(failed(e)))
    }
}

fn failed(e: tokio::task::JoinError) -> (StatusCode, String) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("reading the maps failed: {e}\n"),
    )
}

/// Takes the snapshots behind `/metrics`: one at a time, shared by the
/// requests that wait for it, with the connection-table walk reused for
/// `walk_every`.
pub struct Scraper {
    pin_dir: PathBuf,
    walk_every: Duration,
    flight: SingleFlight<Arc<Body>>,
    walk: Mutex<Option<Walk>>,
    walks: AtomicU64,
}

struct Walk {
    /// CONNS's id: maps recreated under the same pins need a new walk.
    conns_id: u32,
    counts: ConnCounts,
    at: Instant,
    took: Duration,
}

impl Scraper {
    /// Reads the maps under `pin_dir`, walking the connection table at
    /// most once per `walk_every` ([`CONNTRACK_WALK_EVERY`] in the daemon).
    pub fn new(pin_dir: impl Into<PathBuf>, walk_every: Duration) -> Arc<Self> {
        Arc::new(Self {
            pin_dir: pin_dir.into(),
            walk_every,
            flight: SingleFlight::default(),
            walk: Mutex::new(None),
            walks: AtomicU64::new(0),
        })
    }

    /// Snapshots taken so far (each served one request or more).
    pub fn snapshots(&self) -> u64 {
        self.flight.finished.load(Ordering::Acquire)
    }

    /// Walks of the connection table so far.
    pub fn walks(&self) -> u64 {
        self.walks.load(Ordering::Relaxed)
    }

    /// The body of `/metrics` in `format`: of a new snapshot, or of the one
    /// being taken when the request came.
    pub async fn scrape(self: &Arc<Self>, format: Format) -> Scrape {
        let me = Arc::clone(self);
        let body = self
            .flight
            .run(move || {
                me.read()
                    .map(|om| Arc::new(Body::new(om)))
                    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")))
            })
            .await?;
        match body.ready(format) {
            Some(b) => Ok(b),
            None => tokio::task::spawn_blocking(move || body.get(format))
                .await
                .map_err(failed),
        }
    }

    /// One snapshot, encoded in the OpenMetrics format (blocking).
    fn read(&self) -> Result<String> {
        let started = Instant::now();
        let maps = PinnedMaps::open(&self.pin_dir)?;
        let daemon = Daemon::read(&self.pin_dir);
        let mut view = MapsView::read_without_conns(&maps, daemon.status())?;
        let walk;
        (view.conns, walk) = self.conns(&maps)?;
        let snapshot = Snapshot::build(
            &view,
            &daemon,
            &self.pin_dir,
            crate::clock::now_ms(),
            crate::clock::monotonic_now_ns(),
        );
        let body = encode(&snapshot, daemon.status(), walk, Format::OpenMetrics);
        tracing::debug!(
            "metrics: snapshot of {} services in {:.0?}, connection table walked {:.1?} ago (in {:.0?})",
            snapshot.services.len(),
            started.elapsed(),
            walk.age,
            walk.took
        );
        Ok(body)
    }

    /// The connection-table census: the last walk while it is younger than
    /// `walk_every` and of the same maps, else a new walk.
    fn conns(&self, maps: &PinnedMaps) -> Result<(ConnCounts, WalkAge), PinnedError> {
        let mut last = self.walk.lock().unwrap_or_else(PoisonError::into_inner);
        match last.as_ref() {
            Some(w) if w.conns_id == maps.conns_id() && w.at.elapsed() < self.walk_every => {}
            _ => {
                let started = Instant::now();
                let counts = ConnCounts::walk(maps)?;
                self.walks.fetch_add(1, Ordering::Relaxed);
                *last = Some(Walk {
                    conns_id: maps.conns_id(),
                    counts,
                    at: Instant::now(),
                    took: started.elapsed(),
                });
            }
        }
        let w = last.as_ref().expect("walked above");
        Ok((
            w.counts.clone(),
            WalkAge {
                age: w.at.elapsed(),
                took: w.took,
            },
        ))
    }
}

async fn handle(
    req: Request<Incoming>,
    scraper: Arc<Scraper>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    Ok(match (get, req.uri().path()) {
        (true, "/metrics") => {
            let accept: Vec<&str> = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let format =
                Format::negotiate((!accept.is_empty()).then(|| accept.join(",")).as_deref());
            match scraper.scrape(format).await {
                Ok(body) => {
                    let mut r = Response::new(Full::new(body));
                    let h = r.headers_mut();
                    h.insert(
                        CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(format.content_type()),
                    );
                    // The body depends on Accept: caches must not mix them up.
                    h.insert(VARY, hyper::header::HeaderValue::from_static("accept"));
                    r
                }
                Err((status, reason)) => text(status, reason),
            }
        }
        (true, "/") => text(
            StatusCode::OK,
            "xdplb: Prometheus metrics at /metrics\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: xdplb serves GET /metrics\n".into(),
        ),
    })
}

/// Serves `GET /metrics` on `addr` until `shutdown` becomes `true` (or its
/// sender goes away). Each snapshot opens the maps under `pin_dir` afresh,
/// so it follows a daemon that recreated them; while there are none it
/// answers 503 with the reason.
pub async fn serve(
    addr: SocketAddr,
    pin_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve_on(bind(addr).await?, pin_dir, shutdown).await
}

/// Binds the metrics listener: a caller that wants a taken port to stop
/// its start-up binds first, then hands the listener to [`serve_on`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr} (--metrics-addr)"))
}

/// [`serve`] on a listener that is already bound.
pub async fn serve_on(
    listener: TcpListener,
    pin_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve_with(
        listener,
        Scraper::new(pin_dir, CONNTRACK_WALK_EVERY),
        shutdown,
    )
    .await
}

/// [`serve_on`] with a scraper of the caller's (tests and the bench count
/// its snapshots and walks).
pub async fn serve_with(
    listener: TcpListener,
    scraper: Arc<Scraper>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    tracing::info!(
        "metrics: http://{}/metrics (read from the maps under {}; connection table walked at most every {} s)",
        listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string()),
        scraper.pin_dir.display(),
        scraper.walk_every.as_secs_f64(),
    );
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let next = async {
            let slot = Arc::clone(&open)
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            (slot, listener.accept().await)
        };
        tokio::select! {
            (slot, accepted) = next => {
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of fds and the like: back off instead of spinning.
                        tracing::warn!("metrics: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let scraper = Arc::clone(&scraper);
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let svc = service_fn(move |req| handle(req, Arc::clone(&scraper)));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .keep_alive(false)
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    let ended = tokio::select! {
                        r = conn.as_mut() => Some(r),
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(CONNECTION_LIFETIME) => None,
                    };
                    let r = match ended {
                        Some(r) => r,
                        None => {
                            // Finish the response in flight, if any, then close.
                            conn.as_mut().graceful_shutdown();
                            match tokio::time::timeout(Duration::from_secs(10), conn).await {
                                Ok(r) => r,
                                Err(_) => return,
                            }
                        }
                    };
                    if let Err(e) = r {
                        tracing::debug!("metrics: connection from {peer}: {e}");
                    }
                });
            }
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    tracing::debug!("metrics: stopped");
    Ok(())
}

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
