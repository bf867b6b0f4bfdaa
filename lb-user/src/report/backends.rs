//! `xdplb backends`: every backend of every service, its state, checks and
//! refusals, from the daemon's status file. The JSON document is described
//! field by field in docs/OBSERVABILITY.md.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::{
    cli::BackendsArgs,
    report::{
        format::{emit, fmt_duration_ms, fmt_latency_us, TextTable},
        snapshot::Daemon,
    },
    status::Status,
};

/// Version of the `xdplb backends --json` document.
pub const BACKENDS_JSON_VERSION: u32 = 1;
// ---- xdplb backends -------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendsReport {
    pub version: u32,
    pub pid: u32,
    pub written_unix_ms: u64,
    pub services: Vec<BackendsService>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendsService {
    pub name: String,
    pub id: u32,
    pub listen: String,
    pub backends_name: String,
    pub backends: Vec<BackendRow>,
    /// Addresses of the last DNS answer that are not backends, and why.
    pub rejected: Vec<RejectedRow>,
    /// The SNAT source address in use.
    pub snat_addr: Option<std::net::IpAddr>,
    /// The failing map update, while there is one.
    pub error: Option<ErrorRow>,
    /// Failed map updates since the daemon started.
    pub map_write_errors: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RejectedRow {
    pub addr: std::net::IpAddr,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorRow {
    pub message: String,
    pub since_unix_ms: u64,
    /// How long the maps have lagged behind (ms) when read.
    pub for_ms: u64,
    pub attempts: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRow {
    pub addr: SocketAddr,
    pub index: Option<u32>,
    pub state: String,
    pub reason: String,
    pub since_unix_ms: u64,
    /// How long it has been in `state` (ms) when read.
    pub in_state_ms: u64,
    pub last_check: Option<CheckRow>,
    /// When the data plane last saw the task refuse a connection (Unix ms).
    pub last_refused_unix_ms: Option<u64>,
    /// Its age when read (ms).
    pub refused_ago_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckRow {
    pub ok: bool,
    pub latency_us: u64,
    pub detail: String,
    pub at_unix_ms: u64,
    pub age_ms: u64,
}

/// `xdplb backends` mentions refusals younger than this in the REASON column.
const RECENT_REFUSAL_MS: u64 = 60_000;

impl BackendsReport {
    pub fn from_status(s: &Status, now_ms: u64) -> Self {
        Self {
            version: BACKENDS_JSON_VERSION,
            pid: s.pid,
            written_unix_ms: s.written_ms,
            services: s
                .services
                .iter()
                .map(|svc| BackendsService {
                    name: svc.name.clone(),
                    id: svc.id,
                    listen: svc.listen.clone(),
                    backends_name: svc.backends_name.clone(),
                    backends: svc
                        .backends
                        .iter()
                        .map(|b| BackendRow {
                            addr: b.addr,
                            index: b.index,
                            state: b.state.clone(),
                            reason: b.reason.clone(),
                            since_unix_ms: b.since_ms,
                            in_state_ms: now_ms.saturating_sub(b.since_ms),
                            last_check: b.last_check.as_ref().map(|c| CheckRow {
                                ok: c.ok,
                                latency_us: c.latency_us,
                                detail: c.detail.clone(),
                                at_unix_ms: c.at_ms,
                                age_ms: now_ms.saturating_sub(c.at_ms),
                            }),
                            last_refused_unix_ms: b.last_refused_ms,
                            refused_ago_ms: b.last_refused_ms.map(|t| now_ms.saturating_sub(t)),
                        })
                        .collect(),
                    rejected: svc
                        .rejected
                        .iter()
                        .map(|r| RejectedRow {
                            addr: r.addr,
                            reason: r.reason.clone(),
                        })
                        .collect(),
                    snat_addr: svc.snat_addr,
                    error: svc.error.as_ref().map(|e| ErrorRow {
                        message: e.message.clone(),
                        since_unix_ms: e.since_ms,
                        for_ms: now_ms.saturating_sub(e.since_ms),
                        attempts: e.attempts,
                    }),
                    map_write_errors: svc.map_write_errors,
                })
                .collect(),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut t = TextTable::new(
            &["SERVICE", "BACKEND", "STATE", "FOR", "LAST CHECK", "REASON"],
            &[false, false, false, true, false, false],
        );
        for s in &self.services {
            if s.backends.is_empty() {
                t.row(vec![
                    s.name.clone(),
                    format!("(none in {})", s.backends_name),
                ]);
            }
            for b in &s.backends {
                let check = match &b.last_check {
                    None => "none yet".to_string(),
                    Some(c) if c.ok => format!(
                        "ok in {}, {} ago",
                        fmt_latency_us(c.latency_us),
                        fmt_duration_ms(c.age_ms)
                    ),
                    Some(c) => format!(
                        "failed after {} ({}), {} ago",
                        fmt_latency_us(c.latency_us),
                        c.detail,
                        fmt_duration_ms(c.age_ms)
                    ),
                };
                let reason = match b.refused_ago_ms {
                    Some(ago) if ago < RECENT_REFUSAL_MS => format!(
                        "{} (refused a connection {} ago)",
                        b.reason,
                        fmt_duration_ms(ago)
                    ),
                    _ => b.reason.clone(),
                };
                t.row(vec![
                    s.name.clone(),
                    b.addr.to_string(),
                    b.state.clone(),
                    fmt_duration_ms(b.in_state_ms),
                    check,
                    reason,
                ]);
            }
            for r in &s.rejected {
                t.row(vec![
                    s.name.clone(),
                    r.addr.to_string(),
                    "rejected".into(),
                    "-".into(),
                    "-".into(),
                    format!("from DNS: {}", r.reason),
                ]);
            }
        }
        t.render(&mut out);
        for s in &self.services {
            if let Some(e) = &s.error {
                let _ = writeln!(
                    out,
                    "{}: map update failing for {} ({} attempts; the data plane keeps the last \
                     good table): {}",
                    s.name,
                    fmt_duration_ms(e.for_ms),
                    e.attempts,
                    e.message
                );
            }
        }
        out
    }
}

/// `xdplb backends`.
pub fn run_backends(args: &BackendsArgs) -> Result<()> {
    let hint = "is `xdplb run` running? (--pin-dir to look elsewhere)";
    let status = match Daemon::read(&args.pin_dir) {
        Daemon::Running(s) => s,
        Daemon::Missing { path } => bail!(
            "no backend status for {} ({} does not exist): {hint}",
            args.pin_dir.display(),
            path.display()
        ),
        Daemon::Stale { path, pid } => bail!(
            "the backend status in {} is stale: pid {pid}, which wrote it, is gone: {hint}",
            path.display()
        ),
        Daemon::Unreadable { error, .. } => bail!("{error}"),
    };
    let report = BackendsReport::from_status(&status, crate::clock::now_ms());
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&report)?)
    } else {
        report.render()
    };
    emit(&text)?;
    Ok(())
}
