//! What the daemon knows that the maps do not: service names and each
//! backend's state, reason, age and latest health check. The daemon writes it
//! as JSON next to its lock (`/run/xdplb/<pin dir>.status.json`, mode 0600, atomically:
//! write a temporary file, then rename), at most once a second and on every
//! state change; `xdplb backends` and `xdplb stats` read it. The format is
//! versioned (`version`) and documented in docs/OBSERVABILITY.md.

use std::{
    fs::OpenOptions,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

pub const STATUS_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: u32,
    pub pid: u32,
    /// Unix time (ms) of this snapshot.
    pub written_ms: u64,
    pub pin_dir: PathBuf,
    pub services: Vec<ServiceStatus>,
    /// The configured interfaces and whether the program is on them.
    /// Absent in status files of older daemons.
    #[serde(default)]
    pub interfaces: Vec<InterfaceStatus>,
}

/// One configured interface (lb-user/src/ifwatch.rs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InterfaceStatus {
    pub name: String,
    /// The device the program is on; while missing or failing, the last one
    /// seen.
    pub ifindex: u32,
    /// `xdp` or `tc` (XDP mode attaches TC as well).
    pub hook: String,
    /// `attached`, `missing` (no interface of that name) or `error`
    /// (attaching failed; retried).
    pub state: String,
    /// What happened, unless attached.
    pub message: Option<String>,
    /// Unix time (ms) when it entered `state`.
    pub since_unix_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    /// `ADDR:PORT/proto`.
    pub listen: String,
    /// Service id (index of its counters in SERVICE_STATS).
    pub id: u32,
    /// The DNS name the tasks come from.
    pub backends_name: String,
    pub backends: Vec<BackendStatus>,
    /// Addresses of the last DNS answer that are not backends, with the
    /// reason (loopback, an address of this host, over `max_backends`, ...).
    /// Absent in status files of older daemons.
    #[serde(default)]
    pub rejected: Vec<RejectedStatus>,
    /// The SNAT source address in use, once chosen.
    #[serde(default)]
    pub snat_addr: Option<std::net::IpAddr>,
    /// The last failed map update, while the service's maps lag behind its
    /// state (the data plane keeps the last good table; retried with
    /// back-off). `None` once an update succeeds.
    #[serde(default)]
    pub error: Option<ServiceError>,
    /// Map updates that failed since the daemon started (a counter).
    #[serde(default)]
    pub map_write_errors: u64,
    /// DNS polling of `backends_name` since the daemon started. Absent in
    /// status files of older daemons.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
    /// Health-check results and latency; `None` with checks off. Absent in
    /// status files of older daemons.
    #[serde(default)]
    pub checks: Option<ChecksStatus>,
}

/// Counters of one service's DNS poll loop (discovery.rs `QueryCounts`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsStatus {
    /// Lookups started.
    pub polls: u64,
    /// Lookups answered with at least one address.
    pub answers: u64,
    pub nxdomain: u64,
    /// Answers without an address of the service's family.
    pub nodata: u64,
    pub servfail: u64,
    pub timeout: u64,
    pub refused: u64,
    /// Other failures (connection refused by the nameserver, I/O errors).
    pub other: u64,
    /// Times the task set changed.
    pub changes: u64,
    /// Unix time (ms) of the last lookup the nameserver answered (addresses,
    /// NXDOMAIN or no records: anything but a failure); `None`: none yet.
    pub last_success_ms: Option<u64>,
    /// Addresses in the current task set, before screening (`rejected`
    /// lists those that are not backends); `None` before the first answer.
    pub tasks: Option<u64>,
}

impl DnsStatus {
    /// From the poll loop's counters and the size of the current task set.
    pub fn new(c: &crate::backends::discovery::QueryCounts, tasks: Option<usize>) -> Self {
        Self {
            polls: c.queries,
            answers: c.answers,
            nxdomain: c.nxdomain,
            nodata: c.nodata,
            servfail: c.servfail,
            timeout: c.timeout,
            refused: c.refused,
            other: c.other,
            changes: c.changes,
            last_success_ms: (c.last_success_unix_ms != 0).then_some(c.last_success_unix_ms),
            tasks: tasks.map(|n| n as u64),
        }
    }

    /// Lookups that failed: SERVFAIL, timeouts, REFUSED and other errors
    /// (negative answers are answers).
    pub fn failures(&self) -> u64 {
        self.servfail + self.timeout + self.refused + self.other
    }
}

/// A latency histogram as the status file carries it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyHistogram {
    /// Upper bounds of the buckets in microseconds, ascending (inclusive,
    /// like Prometheus' `le`).
    pub bounds_us: Vec<u64>,
    /// Observations per bucket, not cumulative: one entry per bound, and a
    /// last one for those above every bound.
    pub counts: Vec<u64>,
    /// Sum of all observations, in microseconds.
    pub sum_us: u64,
}

impl LatencyHistogram {
    /// Empty, with these bucket bounds.
    pub fn new(bounds_us: &[u64]) -> Self {
        Self {
            bounds_us: bounds_us.to_vec(),
            counts: vec![0; bounds_us.len() + 1],
            sum_us: 0,
        }
    }

    pub fn observe(&mut self, us: u64) {
        let i = self.bounds_us.partition_point(|&b| b < us);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Observations in all buckets.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Health checks of one service since the daemon started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChecksStatus {
    /// How long the checks of every backend took, passed or failed (a
    /// timeout counts as the time it waited).
    pub latency: LatencyHistogram,
    /// Per backend the daemon knows, in address order.
    pub backends: Vec<BackendChecks>,
}

/// Health-check results of one backend since its checker started (it stops
/// when the backend leaves).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendChecks {
    pub addr: SocketAddr,
    pub passed: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RejectedStatus {
    pub addr: std::net::IpAddr,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceError {
    pub message: String,
    /// Unix time (ms) of the first failure of this episode.
    pub since_ms: u64,
    /// Failed attempts in this episode.
    pub attempts: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub addr: SocketAddr,
    /// Index in BACKENDS / BACKEND_STATS (absent while probing before the
    /// first map write).
    pub index: Option<u32>,
    /// probing, active, draining or down.
    pub state: String,
    pub reason: String,
    /// Unix time (ms) when it entered `state`.
    pub since_ms: u64,
    pub last_check: Option<CheckStatus>,
    /// Unix time (ms) of the last connection the task refused, as the data
    /// plane recorded it (`REFUSED`); `None`: none since its index was
    /// assigned. Absent in status files of older daemons.
    #[serde(default)]
    pub last_refused_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckStatus {
    pub ok: bool,
    pub latency_us: u64,
    pub detail: String,
    pub at_ms: u64,
}

/// Where the status of the daemon owning `pin_dir` lives.
pub fn status_path(pin_dir: &Path) -> PathBuf {
    let lock = crate::dataplane::attach::InstanceLock::lock_path(pin_dir);
    lock.with_extension("status.json")
}

impl Status {
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self)?;
        // Mode 0600: it names every backend and its health. A fresh file
        // (O_EXCL), so a leftover 0644 one or a symlink is not written through.
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&text)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Self = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not an xdplb status file", path.display()))?;
        anyhow::ensure!(
            s.version == STATUS_VERSION,
            "{} has status version {}, this xdplb reads {STATUS_VERSION}",
            path.display(),
            s.version
        );
        Ok(s)
    }
}
