//! The [`Snapshot`] that `stats`, `top` and the metrics endpoint share:
//! counters read straight from the pinned maps (so they keep counting
//! across daemon restarts), with service names and backend states from the
//! daemon's status file when the daemon runs.
//!
//! Reading is split from building: [`MapsView::read`] does the syscalls,
//! [`Snapshot::build`] is pure, so shapes, shares and rates are unit-tested
//! without root (the tests are in `report::stats`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Result;
use lb_common::{
    event, reason, Backend, Config, Conn, Counters, FlowKey, Service, ServiceKey, CONN_F_REVERSE,
    CONN_F_UNANSWERED, MAX_BACKENDS, MAX_SERVICES,
};
use serde::Serialize;

use crate::{
    dataplane::{
        pinned::{PinnedError, PinnedMaps},
        table::ip_from_bytes,
    },
    report::format::{backend_state_name, listen_of},
    status::{self, InterfaceStatus, Status},
};

/// Version of the `xdplb stats --json` document.
pub const STATS_JSON_VERSION: u32 = 1;
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
        let now = crate::clock::monotonic_now_ns();
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
        crate::clock::now_ms(),
        crate::clock::monotonic_now_ns(),
    ))
}
