//! The metric families of a snapshot and their two text formats.

use super::*;

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
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// OpenMetrics' info type: one series named `<family>_info`, value 1; a
    /// gauge of that name in the classic text.
    Info,
}

#[derive(Debug)]
pub(super) enum Value {
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
pub(super) struct Family {
    /// The OpenMetrics family name: without `_total` (counters) or `_info`.
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) kind: Kind,
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
pub(super) fn families(s: &Snapshot, status: Option<&Status>, walk: WalkAge) -> Vec<Family> {
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
pub(super) fn kernel_release() -> &'static str {
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
pub(super) struct Collected(Vec<Family>);

/// A label value with OpenMetrics' escapes (`\\`, `\"`, `\n`);
/// `prometheus-client` writes values as they are.
pub(super) struct Escaped<'a>(&'a str);

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

pub(super) struct LabelSet<'a>(&'a [(&'static str, String)]);

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

pub(super) fn write_value(e: &mut MetricEncoder, kind: Kind, v: &Value) -> std::fmt::Result {
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

pub(super) fn encode_openmetrics(families: Vec<Family>) -> String {
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
