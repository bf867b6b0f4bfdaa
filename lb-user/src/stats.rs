//! `xdplb stats` and `xdplb backends`, and the [`Snapshot`] that `top` and
//! the metrics endpoint share: counters read straight from the pinned maps
//! (so they keep counting across daemon restarts), with service names and
//! backend states from the daemon's status file when the daemon runs.
//!
//! Reading is split from building: [`MapsView::read`] does the syscalls,
//! [`Snapshot::build`] is pure, so shapes, shares and rates are unit-tested
//! without root. The JSON documents are described field by field in
//! docs/OBSERVABILITY.md; their `version` changes when a field changes
//! meaning or goes away (new fields may appear without a bump).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Result};
use lb_common::{
    event, reason, Backend, Config, Conn, Counters, FlowKey, Service, ServiceKey, CONN_F_REVERSE,
    CONN_F_UNANSWERED, MAX_BACKENDS, MAX_SERVICES,
};
use serde::Serialize;

use crate::{
    cli::{BackendsArgs, StatsArgs},
    explain::{backend_state_name, listen_of},
    pinned::{monotonic_now_ns, PinnedError, PinnedMaps},
    status::{self, InterfaceStatus, Status},
    table::ip_from_bytes,
};

/// Version of the `xdplb stats --json` document.
pub const STATS_JSON_VERSION: u32 = 1;
/// Version of the `xdplb backends --json` document.
pub const BACKENDS_JSON_VERSION: u32 = 1;

// ---- the daemon's status file -----------------------------------------------

/// What the status file next to the daemon's lock says.
#[derive(Clone, Debug, PartialEq)]
pub enum Daemon {
    /// Written by a process that is still alive.
    Running(Status),
    Missing {
        path: PathBuf,
    },
    /// Written by a process that is gone (killed, or stopped with --persist
    /// before it could remove the file).
    Stale {
        path: PathBuf,
        pid: u32,
    },
    Unreadable {
        path: PathBuf,
        error: String,
    },
}

/// Does process `pid` exist? (signal 0 checks without sending anything)
pub fn pid_alive(pid: u32) -> bool {
    use nix::{errno::Errno, sys::signal::kill, unistd::Pid};
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // No signal: only whether the pid exists (EPERM: it does, not ours).
    matches!(kill(Pid::from_raw(pid), None), Ok(()) | Err(Errno::EPERM))
}

impl Daemon {
    pub fn read(pin_dir: &Path) -> Self {
        let path = status::status_path(pin_dir);
        if !path.exists() {
            return Daemon::Missing { path };
        }
        match Status::read(&path) {
            Ok(s) if pid_alive(s.pid) => Daemon::Running(s),
            Ok(s) => Daemon::Stale { path, pid: s.pid },
            Err(e) => Daemon::Unreadable {
                path,
                error: format!("{e:#}"),
            },
        }
    }

    pub fn status(&self) -> Option<&Status> {
        match self {
            Daemon::Running(s) => Some(s),
            _ => None,
        }
    }

    fn path(&self) -> PathBuf {
        match self {
            Daemon::Running(s) => status::status_path(&s.pin_dir),
            Daemon::Missing { path }
            | Daemon::Stale { path, .. }
            | Daemon::Unreadable { path, .. } => path.clone(),
        }
    }

    /// Why names and states come from the maps; `None` while the daemon runs.
    pub fn note(&self) -> Option<String> {
        let why = match self {
            Daemon::Running(_) => return None,
            Daemon::Missing { path } => format!("no status file {}", path.display()),
            Daemon::Stale { path, pid } => {
                format!("pid {pid}, which wrote {}, is gone", path.display())
            }
            Daemon::Unreadable { error, .. } => error.clone(),
        };
        Some(format!(
            "the daemon isn't running ({why}): services show as VIP:port/proto, backend states come from the maps"
        ))
    }
}

// ---- what the maps hold -----------------------------------------------------

/// Connection-table census of both tables, CONNS (established flows) and
/// UNANSWERED (not established yet). Only forward entries that have not
/// expired (the data plane's own rule, `Conn::expired` in lb-common) count
/// as live flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    /// Every CONNS entry, forward and reverse, expired or not.
    pub entries: u64,
    /// Live flows, established or not.
    pub live_flows: u64,
    /// Every UNANSWERED entry.
    pub unanswered_entries: u64,
    /// Live flows not established yet (part of `live_flows`).
    pub unanswered_flows: u64,
    pub by_service: BTreeMap<u32, u64>,
    /// Keyed by (service id, backend index).
    pub by_backend: BTreeMap<(u32, u32), u64>,
}

impl ConnCounts {
    pub fn add(&mut self, key: &FlowKey, c: &Conn, cfg: &Config, now_ns: u64) {
        let unanswered = c.flags & CONN_F_UNANSWERED != 0;
        if unanswered {
            self.unanswered_entries += 1;
        } else {
            self.entries += 1;
        }
        if c.flags & CONN_F_REVERSE != 0 || c.expired(key.proto, cfg, now_ns) {
            return;
        }
        self.live_flows += 1;
        if unanswered {
            self.unanswered_flows += 1;
        }
        *self.by_service.entry(c.service).or_default() += 1;
        *self.by_backend.entry((c.service, c.backend)).or_default() += 1;
    }

    /// Walks CONNS and UNANSWERED once, judging expiry at the time of the
    /// walk. It costs time in proportion to the tables (about 250 syscalls
    /// for a million entries, each entry copied and counted).
    pub fn walk(maps: &PinnedMaps) -> Result<Self, PinnedError> {
        let config = maps.config();
        let now = monotonic_now_ns();
        let mut conns = Self::default();
        maps.for_each_conn(|k, c| conns.add(k, c, &config, now))?;
        maps.for_each_unanswered(|k, c| conns.add(k, c, &config, now))?;
        Ok(conns)
    }
}

/// Everything read from the maps for one snapshot.
#[derive(Clone, Debug, Default)]
pub struct MapsView {
    pub config: Config,
    pub services: Vec<(ServiceKey, Service)>,
    /// Backend slots in use, by index.
    pub backends: Vec<(u32, Backend)>,
    pub service_counters: BTreeMap<u32, Counters>,
    pub backend_counters: BTreeMap<u32, Counters>,
    /// Indexed like `lb_common::reason::NAMES`.
    pub reasons: Vec<Counters>,
    pub conns: ConnCounts,
    pub conns_capacity: u32,
    pub unanswered_capacity: u32,
    /// Indexed like `lb_common::event::NAMES`.
    pub events: Vec<u64>,
}

impl MapsView {
    /// Reads the maps (services, backends, counters, a walk of CONNS).
    pub fn read(maps: &PinnedMaps, status: Option<&Status>) -> Result<Self, PinnedError> {
        Ok(Self {
            conns: ConnCounts::walk(maps)?,
            ..Self::read_without_conns(maps, status)?
        })
    }

    /// Everything but the CONNS walk (`conns` stays empty), for a reader
    /// that keeps a walk of its own (the metrics endpoint). Its cost grows
    /// with the services and backends in use, not with the connection table.
    pub fn read_without_conns(
        maps: &PinnedMaps,
        status: Option<&Status>,
    ) -> Result<Self, PinnedError> {
        let config = maps.config();
        let services = maps.services()?;
        let backends = maps.backends()?;
        let mut service_counters = BTreeMap::new();
        for (_, s) in &services {
            if s.id < MAX_SERVICES {
                service_counters.insert(s.id, maps.service_counters(s.id)?);
            }
        }
        let mut indexes: BTreeSet<u32> = backends.iter().map(|b| b.0).collect();
        for s in status.map(|s| &s.services[..]).unwrap_or_default() {
            indexes.extend(s.backends.iter().filter_map(|b| b.index));
        }
        let mut backend_counters = BTreeMap::new();
        for i in indexes.into_iter().filter(|&i| i < MAX_BACKENDS) {
            backend_counters.insert(i, maps.backend_counters(i)?);
        }
        let reasons = maps.reason_counters()?;
        Ok(Self {
            config,
            services,
            backends,
            service_counters,
            backend_counters,
            reasons,
            conns: ConnCounts::default(),
            conns_capacity: maps.conns_capacity(),
            unanswered_capacity: maps.unanswered_capacity(),
            events: maps.event_counts()?,
        })
    }
}

// ---- the snapshot (the `stats --json` document) -----------------------------

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub version: u32,
    pub pin_dir: PathBuf,
    /// Unix time (ms) of the reading.
    pub time_unix_ms: u64,
    /// Seconds between this reading and the previous one (`--watch`);
    /// `null` without a previous reading.
    pub interval_secs: Option<f64>,
    pub daemon: DaemonInfo,
    pub services: Vec<ServiceStats>,
    /// Every reason, in `lb_common::reason` order.
    pub reasons: Vec<ReasonStats>,
    /// Every event, in `lb_common::event` order.
    pub events: Vec<EventStats>,
    pub conntrack: ConntrackStats,
    /// CLOCK_MONOTONIC of the reading, for rates.
    #[serde(skip)]
    pub mono_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DaemonInfo {
    pub running: bool,
    pub pid: Option<u32>,
    pub status_file: PathBuf,
    /// Age of the status file (ms) when read.
    pub status_age_ms: Option<u64>,
    pub note: Option<String>,
    /// The configured interfaces and whether the program is on them, from
    /// the daemon; empty without it.
    pub interfaces: Vec<InterfaceStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceStats {
    pub id: u32,
    /// From the daemon; `null` when it isn't running.
    pub name: Option<String>,
    pub listen: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub active_connections: u64,
    pub rates: Option<Rates>,
    pub backends: Vec<BackendStats>,
}

impl ServiceStats {
    /// The name, or `ADDR:PORT/proto` without the daemon.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.listen)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendStats {
    /// BACKENDS index; `null` for a backend the daemon tracks but has not
    /// written yet.
    pub index: Option<u32>,
    pub addr: SocketAddr,
    /// The daemon's state (probing, active, draining, down) when it runs,
    /// else the data plane's (active, draining, down).
    pub state: String,
    /// The state in BACKENDS (`null` if not in the maps). The daemon writes
    /// `probing` as `down`.
    pub dataplane_state: Option<String>,
    pub reason: Option<String>,
    pub state_since_unix_ms: Option<u64>,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub active_connections: u64,
    /// This backend's new connections / the service's (0..1); `null` before
    /// the service has any.
    pub new_connection_share: Option<f64>,
    pub rates: Option<Rates>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rates {
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    pub new_connections_per_sec: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReasonStats {
    pub name: &'static str,
    /// `pass`, `fwd` or `drop`.
    pub kind: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_sec: Option<f64>,
}

/// An `lb_common::event` counter: things the data plane counts beside each
/// packet's reason (flows established, unanswered flows expired, the flood
/// guard at work, ...).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventStats {
    pub name: &'static str,
    pub count: u64,
    pub per_sec: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConntrackStats {
    /// Entries in CONNS, the established flows (two per flow: forward and
    /// reverse).
    pub entries: u64,
    pub capacity: u64,
    /// entries / capacity, 0..1.
    pub fill: f64,
    /// Forward entries not expired, established or not.
    pub live_flows: u64,
    /// UNANSWERED: flows the backend has not accepted yet.
    pub unanswered: UnansweredStats,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnansweredStats {
    pub entries: u64,
    pub capacity: u64,
    /// entries / capacity, 0..1.
    pub fill: f64,
    /// Forward entries not expired (counted in `live_flows` too).
    pub live_flows: u64,
}

/// Per-second rate of a counter; a counter that went down (maps recreated)
/// counts from zero, like Prometheus' `rate()`.
pub fn rate(prev: u64, cur: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    let delta = if cur >= prev { cur - prev } else { cur };
    delta as f64 / secs
}

impl Rates {
    fn between(prev: (u64, u64, u64), cur: (u64, u64, u64), secs: f64) -> Self {
        Self {
            packets_per_sec: rate(prev.0, cur.0, secs),
            bytes_per_sec: rate(prev.1, cur.1, secs),
            new_connections_per_sec: rate(prev.2, cur.2, secs),
        }
    }
}

fn sock_of(b: &Backend) -> SocketAddr {
    SocketAddr::new(ip_from_bytes(&b.addr, b.family), u16::from_be(b.port_be))
}

fn reason_kind(name: &str) -> &'static str {
    match name.split('_').next() {
        Some("pass") => "pass",
        Some("drop") => "drop",
        _ => "fwd",
    }
}

impl Snapshot {
    /// Builds the document from one reading of the maps and the daemon.
    pub fn build(
        view: &MapsView,
        daemon: &Daemon,
        pin_dir: &Path,
        time_unix_ms: u64,
        mono_ns: u64,
    ) -> Self {
        let status = daemon.status();
        let mut services: Vec<ServiceStats> = Vec::new();
        let mut sorted: Vec<&(ServiceKey, Service)> = view.services.iter().collect();
        sorted.sort_by_key(|(_, s)| s.id);
        for (key, svc) in sorted {
            let st = status.and_then(|s| s.services.iter().find(|x| x.id == svc.id));
            let c = view
                .service_counters
                .get(&svc.id)
                .copied()
                .unwrap_or_default();
            let counters = |i: Option<u32>| {
                i.and_then(|i| view.backend_counters.get(&i).copied())
                    .unwrap_or_default()
            };
            let active = |i: Option<u32>| {
                i.and_then(|i| view.conns.by_backend.get(&(svc.id, i)).copied())
                    .unwrap_or(0)
            };
            let mut rows: Vec<BackendStats> = view
                .backends
                .iter()
                .filter(|(_, b)| b.service == svc.id)
                .map(|(i, b)| {
                    let bc = counters(Some(*i));
                    BackendStats {
                        index: Some(*i),
                        addr: sock_of(b),
                        state: backend_state_name(b.state),
                        dataplane_state: Some(backend_state_name(b.state)),
                        reason: None,
                        state_since_unix_ms: None,
                        packets: bc.packets,
                        bytes: bc.bytes,
                        new_connections: bc.new_flows,
                        active_connections: active(Some(*i)),
                        new_connection_share: None,
                        rates: None,
                    }
                })
                .collect();
            for b in st.map(|s| &s.backends[..]).unwrap_or_default() {
                let pos = rows
                    .iter()
                    .position(|r| b.index.is_some() && r.index == b.index)
                    .or_else(|| rows.iter().position(|r| r.addr == b.addr));
                let row = match pos {
                    Some(p) => &mut rows[p],
                    None => {
                        let bc = counters(b.index);
                        rows.push(BackendStats {
                            index: b.index,
                            addr: b.addr,
                            state: String::new(),
                            dataplane_state: None,
                            reason: None,
                            state_since_unix_ms: None,
                            packets: bc.packets,
                            bytes: bc.bytes,
                            new_connections: bc.new_flows,
                            active_connections: active(b.index),
                            new_connection_share: None,
                            rates: None,
                        });
                        rows.last_mut().expect("just pushed")
                    }
                };
                row.state = b.state.clone();
                row.reason = Some(b.reason.clone());
                row.state_since_unix_ms = Some(b.since_ms);
            }
            for r in &mut rows {
                r.new_connection_share =
                    (c.new_flows > 0).then(|| r.new_connections as f64 / c.new_flows as f64);
            }
            rows.sort_by_key(|r| (r.addr, r.index));
            services.push(ServiceStats {
                id: svc.id,
                name: st.map(|s| s.name.clone()),
                listen: listen_of(key),
                packets: c.packets,
                bytes: c.bytes,
                new_connections: c.new_flows,
                active_connections: view.conns.by_service.get(&svc.id).copied().unwrap_or(0),
                rates: None,
                backends: rows,
            });
        }
        let reasons = reason::NAMES
            .iter()
            .enumerate()
            .map(|(i, &name)| {
                let c = view.reasons.get(i).copied().unwrap_or_default();
                ReasonStats {
                    name,
                    kind: reason_kind(name),
                    packets: c.packets,
                    bytes: c.bytes,
                    packets_per_sec: None,
                }
            })
            .collect();
        let capacity = u64::from(view.conns_capacity);
        let unanswered_capacity = u64::from(view.unanswered_capacity);
        let fill = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
        let events = event::NAMES
            .iter()
            .enumerate()
            .map(|(i, &name)| EventStats {
                name,
                count: view.events.get(i).copied().unwrap_or_default(),
                per_sec: None,
            })
            .collect();
        Snapshot {
            version: STATS_JSON_VERSION,
            pin_dir: pin_dir.into(),
            time_unix_ms,
            interval_secs: None,
            daemon: DaemonInfo {
                running: status.is_some(),
                pid: status.map(|s| s.pid),
                status_file: daemon.path(),
                status_age_ms: status.map(|s| time_unix_ms.saturating_sub(s.written_ms)),
                note: daemon.note(),
                interfaces: status.map(|s| s.interfaces.clone()).unwrap_or_default(),
            },
            services,
            reasons,
            events,
            conntrack: ConntrackStats {
                entries: view.conns.entries,
                capacity,
                fill: fill(view.conns.entries, capacity),
                live_flows: view.conns.live_flows,
                unanswered: UnansweredStats {
                    entries: view.conns.unanswered_entries,
                    capacity: unanswered_capacity,
                    fill: fill(view.conns.unanswered_entries, unanswered_capacity),
                    live_flows: view.conns.unanswered_flows,
                },
            },
            mono_ns,
        }
    }

    /// Fills `rates` against an earlier reading. Services match by id and
    /// listen address, backends by index and address (an index reused by
    /// another backend starts without a rate).
    pub fn add_rates(&mut self, prev: &Snapshot) {
        let secs = self.mono_ns.saturating_sub(prev.mono_ns) as f64 / 1e9;
        if secs <= 0.0 {
            return;
        }
        self.interval_secs = Some(secs);
        let triple = |p: u64, b: u64, n: u64| (p, b, n);
        for s in &mut self.services {
            let Some(ps) = prev
                .services
                .iter()
                .find(|p| p.id == s.id && p.listen == s.listen)
            else {
                continue;
            };
            s.rates = Some(Rates::between(
                triple(ps.packets, ps.bytes, ps.new_connections),
                triple(s.packets, s.bytes, s.new_connections),
                secs,
            ));
            for b in &mut s.backends {
                if let Some(pb) = ps
                    .backends
                    .iter()
                    .find(|p| p.index == b.index && p.addr == b.addr)
                {
                    b.rates = Some(Rates::between(
                        triple(pb.packets, pb.bytes, pb.new_connections),
                        triple(b.packets, b.bytes, b.new_connections),
                        secs,
                    ));
                }
            }
        }
        for (r, p) in self.reasons.iter_mut().zip(&prev.reasons) {
            r.packets_per_sec = Some(rate(p.packets, r.packets, secs));
        }
        for (e, p) in self.events.iter_mut().zip(&prev.events) {
            e.per_sec = Some(rate(p.count, e.count, secs));
        }
    }
}

/// Opens the maps, reads the daemon's status and builds a snapshot.
pub fn take_snapshot(pin_dir: &Path) -> Result<Snapshot> {
    let maps = PinnedMaps::open(pin_dir)?;
    let daemon = Daemon::read(pin_dir);
    let view = MapsView::read(&maps, daemon.status())?;
    Ok(Snapshot::build(
        &view,
        &daemon,
        pin_dir,
        status::now_ms(),
        monotonic_now_ns(),
    ))
}

// ---- human formats ------------------------------------------------------------

/// `1234567` -> `1,234,567`.
pub fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn fmt_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A per-second rate with an SI suffix: `0.5`, `12.0`, `3.4k`, `1.2M`.
pub fn fmt_rate(v: f64) -> String {
    let (v, suffix) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    format!("{v:.1}{suffix}")
}

/// `0.4s`, `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn fmt_duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// `850 µs`, `1.2 ms`, `37 ms`.
pub fn fmt_latency_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{} ms", us / 1000)
    }
}

fn fmt_share(s: Option<f64>) -> String {
    s.map(|s| format!("{:.1}%", s * 100.0)).unwrap_or_default()
}

/// A plain text table: left-aligned first columns, right-aligned numbers.
struct TextTable {
    rows: Vec<Vec<String>>,
    /// Per column: right-align?
    right: Vec<bool>,
}

impl TextTable {
    fn new(header: &[&str], right: &[bool]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
            right: right.to_vec(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let cols = self.right.len();
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let mut line = String::new();
            for (c, w) in width.iter().enumerate() {
                let cell = r.get(c).map_or("", String::as_str);
                if c > 0 {
                    line.push_str("  ");
                }
                if self.right[c] {
                    let _ = write!(line, "{cell:>w$}");
                } else {
                    let _ = write!(line, "{cell:<w$}");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// The `xdplb stats` text: counters, or with `rates` per-second rates
/// (`--watch`; `-` until a second reading exists).
pub fn render_text(s: &Snapshot, rates: bool) -> String {
    let mut out = String::new();
    let _ = write!(out, "xdplb stats: {}", s.pin_dir.display());
    match (s.daemon.pid, s.daemon.status_age_ms) {
        (Some(pid), Some(age)) => {
            let _ = writeln!(
                out,
                ", daemon pid {pid} (status written {} ago)",
                fmt_duration_ms(age)
            );
        }
        _ => out.push('\n'),
    }
    if let Some(note) = &s.daemon.note {
        let _ = writeln!(out, "note: {note}");
    }
    if let Some(secs) = s.interval_secs {
        let _ = writeln!(out, "rates over the last {secs:.1}s");
    }
    render_interfaces(&s.daemon.interfaces, s.time_unix_ms, &mut out);
    out.push('\n');
    if s.services.is_empty() {
        out.push_str("no services in the maps yet\n");
    } else {
        let mut t = if rates {
            TextTable::new(
                &[
                    "SERVICE / BACKEND",
                    "STATE",
                    "PKT/S",
                    "BYTES/S",
                    "NEW/S",
                    "ACTIVE",
                    "SHARE",
                ],
                &[false, false, true, true, true, true, true],
            )
        } else {
            TextTable::new(
                &[
                    "SERVICE / BACKEND",
                    "STATE",
                    "PACKETS",
                    "BYTES",
                    "NEW CONNS",
                    "ACTIVE",
                    "SHARE",
                ],
                &[false, false, true, true, true, true, true],
            )
        };
        let cells = |r: Option<Rates>, p: u64, b: u64, n: u64| -> [String; 3] {
            if rates {
                match r {
                    Some(r) => [
                        fmt_rate(r.packets_per_sec),
                        format!("{}/s", fmt_bytes(r.bytes_per_sec)),
                        fmt_rate(r.new_connections_per_sec),
                    ],
                    None => ["-".into(), "-".into(), "-".into()],
                }
            } else {
                [fmt_count(p), fmt_bytes(b as f64), fmt_count(n)]
            }
        };
        for svc in &s.services {
            let title = match &svc.name {
                Some(n) => format!("{n} ({})", svc.listen),
                None => svc.listen.clone(),
            };
            let [a, b, c] = cells(svc.rates, svc.packets, svc.bytes, svc.new_connections);
            t.row(vec![
                title,
                String::new(),
                a,
                b,
                c,
                fmt_count(svc.active_connections),
                String::new(),
            ]);
            for be in &svc.backends {
                let [a, b, c] = cells(be.rates, be.packets, be.bytes, be.new_connections);
                t.row(vec![
                    format!("  {}", be.addr),
                    be.state.clone(),
                    a,
                    b,
                    c,
                    fmt_count(be.active_connections),
                    fmt_share(be.new_connection_share),
                ]);
            }
            if svc.backends.is_empty() {
                t.row(vec!["  (no backends)".into()]);
            }
        }
        t.render(&mut out);
    }
    out.push('\n');
    let counted: Vec<&ReasonStats> = s.reasons.iter().filter(|r| r.packets > 0).collect();
    if counted.is_empty() {
        out.push_str("no packets seen yet\n");
    } else {
        let mut t = if rates {
            TextTable::new(
                &["REASON", "PACKETS", "BYTES", "PKT/S"],
                &[false, true, true, true],
            )
        } else {
            TextTable::new(&["REASON", "PACKETS", "BYTES"], &[false, true, true])
        };
        for r in &counted {
            let mut row = vec![
                r.name.to_string(),
                fmt_count(r.packets),
                fmt_bytes(r.bytes as f64),
            ];
            if rates {
                row.push(r.packets_per_sec.map_or("-".into(), fmt_rate));
            }
            t.row(row);
        }
        t.render(&mut out);
        let zero = s.reasons.len() - counted.len();
        if zero > 0 {
            let _ = writeln!(out, "({zero} reasons at zero not shown; --json lists all)");
        }
    }
    let events: Vec<String> = s
        .events
        .iter()
        .filter(|e| e.count > 0)
        .map(|e| match (rates, e.per_sec) {
            (true, Some(r)) => format!("{} {}/s", e.name, fmt_rate(r)),
            _ => format!("{} {}", e.name, fmt_count(e.count)),
        })
        .collect();
    if !events.is_empty() {
        let _ = writeln!(out, "events: {}", events.join(", "));
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "connection table: {} of {} entries ({:.1}% full), {} live flows",
        fmt_count(s.conntrack.entries),
        fmt_count(s.conntrack.capacity),
        s.conntrack.fill * 100.0,
        fmt_count(s.conntrack.live_flows)
    );
    let u = &s.conntrack.unanswered;
    let _ = writeln!(
        out,
        "unanswered table: {} of {} entries ({:.1}% full), {} of those flows",
        fmt_count(u.entries),
        fmt_count(u.capacity),
        u.fill * 100.0,
        fmt_count(u.live_flows)
    );
    out
}

/// The "interfaces:" block: one line per configured interface, e.g.
/// `  eth1  attached (xdp, ifindex 9) for 1.2s`.
fn render_interfaces(list: &[InterfaceStatus], now_ms: u64, out: &mut String) {
    if list.is_empty() {
        return;
    }
    out.push_str("interfaces:\n");
    let width = list.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for i in list {
        let _ = write!(
            out,
            "  {:width$}  {} ({}, ifindex {}) for {}",
            i.name,
            i.state,
            i.hook,
            i.ifindex,
            fmt_duration_ms(now_ms.saturating_sub(i.since_unix_ms))
        );
        if let Some(m) = &i.message {
            let _ = write!(out, ": {m}");
        }
        out.push('\n');
    }
}

/// Writes to stdout; `false` when the reader went away (`| head`).
fn emit(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `xdplb stats`.
pub fn run_stats(args: &StatsArgs) -> Result<()> {
    let interval = args.watch.map(Duration::from_secs_f64);
    let clear = interval.is_some() && !args.json && std::io::stdout().is_terminal();
    let mut prev: Option<Snapshot> = None;
    loop {
        let mut snap = match (take_snapshot(&args.pin_dir), &prev, interval) {
            (Ok(s), _, _) => s,
            // Once watching, a reading that fails (a daemon restart without
            // --persist removes and recreates the maps) is reported and
            // retried; only the first one decides the exit status.
            (Err(e), Some(_), Some(iv)) => {
                eprintln!(
                    "xdplb stats: {e:#} (retrying every {:.1}s)",
                    iv.as_secs_f64()
                );
                std::thread::sleep(iv);
                continue;
            }
            (Err(e), _, _) => return Err(e),
        };
        if let Some(p) = &prev {
            snap.add_rates(p);
        }
        let text = match (args.json, interval.is_some()) {
            (true, false) => format!("{}\n", serde_json::to_string_pretty(&snap)?),
            (true, true) => format!("{}\n", serde_json::to_string(&snap)?),
            (false, watch) => {
                let mut t = String::new();
                if clear {
                    // Home, clear screen: redraw in place.
                    t.push_str("\x1b[H\x1b[2J");
                }
                t.push_str(&render_text(&snap, watch));
                if watch && !clear {
                    t.push('\n');
                }
                t
            }
        };
        if !emit(&text)? {
            return Ok(());
        }
        let Some(iv) = interval else {
            return Ok(());
        };
        prev = Some(snap);
        std::thread::sleep(iv);
    }
}

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
    let report = BackendsReport::from_status(&status, status::now_ms());
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&report)?)
    } else {
        report.render()
    };
    emit(&text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_common::{
        BACKEND_ACTIVE, BACKEND_DOWN, FAMILY_V4, PROTO_TCP, PROTO_UDP, TCP_STATE_CLOSING,
    };

    use super::*;
    use crate::{
        status::{BackendStatus, CheckStatus, ServiceStatus},
        table::addr_bytes,
    };

    const S: u64 = 1_000_000_000;

    fn c(p: u64, b: u64, n: u64) -> Counters {
        Counters {
            packets: p,
            bytes: b,
            new_flows: n,
        }
    }

    fn key(addr: &str, port: u16, proto: u8) -> ServiceKey {
        let (a, family) = addr_bytes(addr.parse().unwrap());
        ServiceKey {
            addr: a,
            port_be: port.to_be(),
            proto,
            family,
        }
    }

    fn backend(addr: &str, state: u8, service: u32) -> Backend {
        let a: SocketAddr = addr.parse().unwrap();
        let (bytes, family) = addr_bytes(a.ip());
        Backend {
            addr: bytes,
            port_be: a.port().to_be(),
            family,
            state,
            service,
        }
    }

    fn flow(sport: u16, proto: u8) -> FlowKey {
        FlowKey {
            sport_be: sport.to_be(),
            proto,
            family: FAMILY_V4,
            ..Default::default()
        }
    }

    fn conn(service: u32, backend: u32, last_seen: u64, flags: u8, tcp_state: u8) -> Conn {
        Conn {
            service,
            backend,
            last_seen_ns: last_seen,
            flags,
            tcp_state,
            ..Default::default()
        }
    }

    #[test]
    fn live_flows_follow_the_data_planes_timeouts() {
        // Explicit timeouts: the test is about the rule, not the defaults.
        let cfg = Config {
            tcp_timeout_ns: 3600 * S,
            closing_timeout_ns: 10 * S,
            udp_timeout_ns: 60 * S,
            ..Config::with_defaults()
        };
        let now = 10_000 * S;
        let mut n = ConnCounts::default();
        // open TCP, idle 3599 s: live
        n.add(
            &flow(1, PROTO_TCP),
            &conn(1, 2, now - 3599 * S, 0, 0),
            &cfg,
            now,
        );
        // open TCP, idle 3601 s: expired
        n.add(
            &flow(2, PROTO_TCP),
            &conn(1, 2, now - 3601 * S, 0, 0),
            &cfg,
            now,
        );
        // closing TCP, idle 11 s: expired
        n.add(
            &flow(3, PROTO_TCP),
            &conn(1, 3, now - 11 * S, 0, TCP_STATE_CLOSING),
            &cfg,
            now,
        );
        // UDP idle 59 s: live; a reverse entry never counts
        n.add(
            &flow(4, PROTO_UDP),
            &conn(2, 7, now - 59 * S, 0, 0),
            &cfg,
            now,
        );
        n.add(
            &flow(5, PROTO_TCP),
            &conn(1, 2, now, CONN_F_REVERSE, 0),
            &cfg,
            now,
        );
        // last_seen in the future (another CPU's clock read raced ours): live
        n.add(&flow(6, PROTO_TCP), &conn(1, 3, now + S, 0, 0), &cfg, now);
        assert_eq!(n.entries, 6);
        assert_eq!(n.live_flows, 3);
        assert_eq!(n.by_service, BTreeMap::from([(1, 2), (2, 1)]));
        assert_eq!(
            n.by_backend,
            BTreeMap::from([((1, 2), 1), ((1, 3), 1), ((2, 7), 1)])
        );
        // Not established yet: counted apart, with its own (shorter) timeout.
        let u = |seen| conn(1, 3, seen, CONN_F_UNANSWERED, 0);
        n.add(&flow(7, PROTO_TCP), &u(now - S), &cfg, now);
        n.add(&flow(8, PROTO_TCP), &u(now - 6 * S), &cfg, now);
        assert_eq!((n.entries, n.unanswered_entries), (6, 2));
        assert_eq!((n.live_flows, n.unanswered_flows), (4, 1));
    }

    fn view() -> MapsView {
        let mut conns = ConnCounts {
            entries: 6,
            live_flows: 3,
            unanswered_entries: 2,
            unanswered_flows: 1,
            ..Default::default()
        };
        conns.by_service.insert(1, 3);
        conns.by_backend.insert((1, 1), 2);
        conns.by_backend.insert((1, 2), 1);
        let mut reasons = vec![Counters::default(); reason::COUNT as usize];
        reasons[reason::FWD_REDIRECT as usize] = c(10, 1000, 0);
        reasons[reason::PASS_NO_SERVICE as usize] = c(2, 120, 0);
        MapsView {
            config: Config::with_defaults(),
            services: vec![(
                key("0.0.0.0", 80, PROTO_TCP),
                Service {
                    id: 1,
                    ..Default::default()
                },
            )],
            backends: vec![
                (1, backend("10.1.0.11:8080", BACKEND_ACTIVE, 1)),
                (2, backend("10.1.0.12:8080", BACKEND_DOWN, 1)),
            ],
            service_counters: BTreeMap::from([(1, c(10, 1000, 4))]),
            backend_counters: BTreeMap::from([(1, c(7, 700, 3)), (2, c(3, 300, 1))]),
            reasons,
            conns,
            conns_capacity: 1000,
            unanswered_capacity: 500,
            events: {
                let mut e = vec![0; event::COUNT as usize];
                e[event::ESTABLISHED as usize] = 4;
                e
            },
        }
    }

    fn status() -> Status {
        Status {
            version: status::STATUS_VERSION,
            pid: 4242,
            written_ms: 1_000_000,
            pin_dir: "/sys/fs/bpf/xdplb".into(),
            interfaces: Vec::new(),
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "0.0.0.0:80/tcp".into(),
                id: 1,
                backends_name: "tasks.web".into(),
                backends: vec![
                    BackendStatus {
                        addr: "10.1.0.11:8080".parse().unwrap(),
                        index: Some(1),
                        state: "active".into(),
                        reason: "2 checks passed".into(),
                        since_ms: 900_000,
                        last_check: Some(CheckStatus {
                            ok: true,
                            latency_us: 412,
                            detail: "connected".into(),
                            at_ms: 999_500,
                        }),
                        last_refused_ms: Some(999_700),
                    },
                    BackendStatus {
                        addr: "10.1.0.12:8080".parse().unwrap(),
                        index: Some(2),
                        state: "probing".into(),
                        reason: "new in DNS".into(),
                        since_ms: 998_000,
                        last_check: None,
                        last_refused_ms: None,
                    },
                    BackendStatus {
                        addr: "10.1.0.13:8080".parse().unwrap(),
                        index: None,
                        state: "probing".into(),
                        reason: "new in DNS".into(),
                        since_ms: 999_000,
                        last_check: None,
                        last_refused_ms: None,
                    },
                ],
                rejected: vec![status::RejectedStatus {
                    addr: "127.0.0.1".parse().unwrap(),
                    reason: "loopback address".into(),
                }],
                snat_addr: Some("10.1.0.1".parse().unwrap()),
                error: Some(status::ServiceError {
                    message: "no free backend slot".into(),
                    since_ms: 990_000,
                    attempts: 4,
                }),
                map_write_errors: 4,
                ..Default::default()
            }],
        }
    }

    /// The `stats --json` shape, pinned: a change here is a change of a
    /// documented interface (docs/OBSERVABILITY.md), so bump the version
    /// when a field changes meaning or disappears.
    #[test]
    fn stats_json_golden_without_daemon() {
        let d = Daemon::Missing {
            path: "/run/xdplb/x.status.json".into(),
        };
        let snap = Snapshot::build(&view(), &d, Path::new("/sys/fs/bpf/xdplb"), 1_000_400, 5);
        let mut json = serde_json::to_value(&snap).unwrap();
        // Keep the golden short: check the reasons apart.
        let reasons = json["reasons"].take();
        assert_eq!(reasons.as_array().unwrap().len(), reason::COUNT as usize);
        assert_eq!(
            reasons[reason::FWD_REDIRECT as usize],
            serde_json::json!({"name": "fwd_redirect", "kind": "fwd", "packets": 10, "bytes": 1000, "packets_per_sec": null})
        );
        assert_eq!(reasons[0]["kind"], "pass");
        assert_eq!(reasons[reason::DROP_NO_BACKEND as usize]["kind"], "drop");
        let want = serde_json::json!({
            "version": 1,
            "pin_dir": "/sys/fs/bpf/xdplb",
            "time_unix_ms": 1_000_400,
            "interval_secs": null,
            "daemon": {
                "running": false,
                "pid": null,
                "status_file": "/run/xdplb/x.status.json",
                "status_age_ms": null,
                "note": "the daemon isn't running (no status file /run/xdplb/x.status.json): services show as VIP:port/proto, backend states come from the maps",
                "interfaces": []
            },
            "services": [{
                "id": 1,
                "name": null,
                "listen": "0.0.0.0:80/tcp",
                "packets": 10, "bytes": 1000, "new_connections": 4, "active_connections": 3,
                "rates": null,
                "backends": [
                    {"index": 1, "addr": "10.1.0.11:8080", "state": "active", "dataplane_state": "active",
                     "reason": null, "state_since_unix_ms": null,
                     "packets": 7, "bytes": 700, "new_connections": 3, "active_connections": 2,
                     "new_connection_share": 0.75, "rates": null},
                    {"index": 2, "addr": "10.1.0.12:8080", "state": "down", "dataplane_state": "down",
                     "reason": null, "state_since_unix_ms": null,
                     "packets": 3, "bytes": 300, "new_connections": 1, "active_connections": 1,
                     "new_connection_share": 0.25, "rates": null}
                ]
            }],
            "reasons": null,
            "events": [
                {"name": "established", "count": 4, "per_sec": null},
                {"name": "non_syn_miss", "count": 0, "per_sec": null},
                {"name": "unanswered_expired", "count": 0, "per_sec": null},
                {"name": "rst_freed", "count": 0, "per_sec": null},
                {"name": "flood_guard_active", "count": 0, "per_sec": null},
                {"name": "flood_port_taken", "count": 0, "per_sec": null},
                {"name": "source_vouched", "count": 0, "per_sec": null}
            ],
            "conntrack": {"entries": 6, "capacity": 1000, "fill": 0.006, "live_flows": 3,
                "unanswered": {"entries": 2, "capacity": 500, "fill": 0.004, "live_flows": 1}}
        });
        assert_eq!(
            json,
            want,
            "got:\n{}",
            serde_json::to_string_pretty(&json).unwrap()
        );
    }

    #[test]
    fn daemon_status_supplies_names_states_and_unwritten_backends() {
        let snap = Snapshot::build(
            &view(),
            &Daemon::Running(status()),
            Path::new("/p"),
            1_000_400,
            5,
        );
        assert!(snap.daemon.running && snap.daemon.note.is_none());
        assert_eq!(snap.daemon.status_age_ms, Some(400));
        let s = &snap.services[0];
        assert_eq!((s.name.as_deref(), s.label()), (Some("web"), "web"));
        let rows: Vec<(String, Option<u32>, &str, Option<&str>)> = s
            .backends
            .iter()
            .map(|b| {
                (
                    b.addr.to_string(),
                    b.index,
                    b.state.as_str(),
                    b.dataplane_state.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("10.1.0.11:8080".into(), Some(1), "active", Some("active")),
                ("10.1.0.12:8080".into(), Some(2), "probing", Some("down")),
                ("10.1.0.13:8080".into(), None, "probing", None),
            ]
        );
        assert_eq!(s.backends[2].packets, 0);
        assert_eq!(s.backends[0].reason.as_deref(), Some("2 checks passed"));
    }

    #[test]
    fn rates_are_per_second_and_survive_counter_resets() {
        assert_eq!(rate(100, 300, 2.0), 100.0);
        assert_eq!(rate(300, 50, 0.5), 100.0, "a reset counts from zero");
        assert_eq!(rate(1, 2, 0.0), 0.0);
        let d = Daemon::Missing { path: "/x".into() };
        let prev = Snapshot::build(&view(), &d, Path::new("/p"), 0, 1_000_000_000);
        let mut v = view();
        v.service_counters.insert(1, c(30, 3000, 8));
        v.backend_counters.insert(1, c(27, 2700, 7));
        v.reasons[reason::FWD_REDIRECT as usize].packets = 30;
        let mut cur = Snapshot::build(&v, &d, Path::new("/p"), 0, 3_000_000_000);
        cur.add_rates(&prev);
        assert_eq!(cur.interval_secs, Some(2.0));
        assert_eq!(
            cur.services[0].rates,
            Some(Rates {
                packets_per_sec: 10.0,
                bytes_per_sec: 1000.0,
                new_connections_per_sec: 2.0
            })
        );
        assert_eq!(
            cur.services[0].backends[0].rates.unwrap().packets_per_sec,
            10.0
        );
        assert_eq!(
            cur.services[0].backends[1].rates.unwrap().packets_per_sec,
            0.0
        );
        assert_eq!(
            cur.reasons[reason::FWD_REDIRECT as usize].packets_per_sec,
            Some(10.0)
        );
        let text = render_text(&cur, true);
        assert!(text.contains("rates over the last 2.0s"), "{text}");
        assert!(text.contains("1000 B/s"), "{text}");
    }

    #[test]
    fn interfaces_block() {
        let iface = |name: &str, ifindex, state: &str, message: Option<&str>| InterfaceStatus {
            name: name.into(),
            ifindex,
            hook: "tc".into(),
            state: state.into(),
            message: message.map(String::from),
            since_unix_ms: 1_000,
        };
        let mut out = String::new();
        render_interfaces(
            &[
                iface("eth0", 2, "attached", None),
                iface("bond0", 7, "missing", Some("removed")),
            ],
            2_500,
            &mut out,
        );
        assert_eq!(
            out,
            "interfaces:\n  eth0   attached (tc, ifindex 2) for 1.5s\n  bond0  missing (tc, \
             ifindex 7) for 1.5s: removed\n"
        );
    }

    #[test]
    fn human_formats() {
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(1000), "1,000");
        assert_eq!(fmt_count(1_234_567), "1,234,567");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(1536.0), "1.5 KiB");
        assert_eq!(fmt_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(fmt_rate(0.5), "0.5");
        assert_eq!(fmt_rate(3400.0), "3.4k");
        assert_eq!(fmt_rate(1_200_000.0), "1.2M");
        assert_eq!(fmt_duration_ms(400), "0.4s");
        assert_eq!(fmt_duration_ms(42_000), "42s");
        assert_eq!(fmt_duration_ms(185_000), "3m05s");
        assert_eq!(fmt_duration_ms(7_620_000), "2h07m");
        assert_eq!(fmt_duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(fmt_latency_us(850), "850 µs");
        assert_eq!(fmt_latency_us(1234), "1.2 ms");
        assert_eq!(fmt_latency_us(37_000), "37 ms");
    }

    #[test]
    fn stats_text_table() {
        let snap = Snapshot::build(
            &view(),
            &Daemon::Running(status()),
            Path::new("/sys/fs/bpf/xdplb"),
            1_000_400,
            5,
        );
        let want = "\
xdplb stats: /sys/fs/bpf/xdplb, daemon pid 4242 (status written 0.4s ago)

SERVICE / BACKEND     STATE    PACKETS   BYTES  NEW CONNS  ACTIVE  SHARE
web (0.0.0.0:80/tcp)                10  1000 B          4       3
  10.1.0.11:8080      active         7   700 B          3       2  75.0%
  10.1.0.12:8080      probing        3   300 B          1       1  25.0%
  10.1.0.13:8080      probing        0     0 B          0       0   0.0%

REASON           PACKETS   BYTES
pass_no_service        2   120 B
fwd_redirect          10  1000 B
(26 reasons at zero not shown; --json lists all)
events: established 4

connection table: 6 of 1,000 entries (0.6% full), 3 live flows
unanswered table: 2 of 500 entries (0.4% full), 1 of those flows
";
        assert_eq!(render_text(&snap, false), want);
    }

    #[test]
    fn backends_report_json_golden_and_text() {
        let r = BackendsReport::from_status(&status(), 1_000_400);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["services"][0]["backends"][0],
            serde_json::json!({
                "addr": "10.1.0.11:8080", "index": 1, "state": "active",
                "reason": "2 checks passed", "since_unix_ms": 900_000, "in_state_ms": 100_400,
                "last_check": {"ok": true, "latency_us": 412, "detail": "connected",
                               "at_unix_ms": 999_500, "age_ms": 900},
                "last_refused_unix_ms": 999_700, "refused_ago_ms": 700
            })
        );
        assert_eq!(
            (&json["version"], &json["pid"], &json["written_unix_ms"]),
            (
                &serde_json::json!(1),
                &serde_json::json!(4242),
                &serde_json::json!(1_000_000)
            )
        );
        assert_eq!(
            json["services"][0]["backends"][2]["index"],
            serde_json::Value::Null
        );
        let text = r.render();
        let want = "\
SERVICE  BACKEND         STATE       FOR  LAST CHECK              REASON
web      10.1.0.11:8080  active    1m40s  ok in 412 µs, 0.9s ago  2 checks passed (refused a connection 0.7s ago)
web      10.1.0.12:8080  probing    2.4s  none yet                new in DNS
web      10.1.0.13:8080  probing    1.4s  none yet                new in DNS
web      127.0.0.1       rejected      -  -                       from DNS: loopback address
web: map update failing for 10s (4 attempts; the data plane keeps the last good table): no free backend slot
";
        assert_eq!(text, want);
        assert_eq!(
            json["services"][0]["rejected"],
            serde_json::json!([{"addr": "127.0.0.1", "reason": "loopback address"}])
        );
        assert_eq!(
            json["services"][0]["error"],
            serde_json::json!({"message": "no free backend slot", "since_unix_ms": 990_000,
                               "for_ms": 10_400, "attempts": 4})
        );
    }

    #[test]
    fn a_missing_status_names_the_file() {
        let d = Daemon::read(Path::new("/sys/fs/bpf/xdplb-unit-test-nothing-here"));
        assert!(matches!(d, Daemon::Missing { .. }), "{d:?}");
        assert!(d.note().unwrap().contains("isn't running"));
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
    }
}
