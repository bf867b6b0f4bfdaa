//! Read-only access to the maps a data plane left pinned, without loading
//! any program: what `xdplb stats`, `top`, `explain` and the metrics endpoint
//! read. It works whether the daemon runs or not (`run --persist`, or a
//! killed daemon, leave the maps forwarding).
//!
//! Each map is opened from its pin (`MapData::from_pin`), typed by what the
//! kernel says it is (`Map::from_map_data`, so CONNS comes back as the LRU
//! hash it is) and checked against this build's key and value sizes. CONFIG's
//! `abi_version` must match [`lb_common::ABI_VERSION`]: a CLI that reads
//! another layout would print numbers that mean nothing.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    AddrKey, Backend, Config, Conn, Counters, FlowKey, Service, ServiceKey, BACKEND_EMPTY,
    MAP_BACKENDS, MAP_BACKEND_STATS, MAP_CONFIG, MAP_CONNS, MAP_MAGLEV, MAP_REASON_STATS,
    MAP_REFUSED, MAP_SERVICES, MAP_SERVICE_STATS, MAP_SNAT_ADDRS, MAX_BACKENDS,
};

/// Why the pinned maps cannot be read. Every message is one line an
/// operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error(
        "no xdplb state under {}: is `xdplb run` running? (--pin-dir to look elsewhere)",
        .pin_dir.display()
    )]
    NoState { pin_dir: PathBuf },
    #[error(
        "permission denied reading the pinned maps under {}: run as root (CAP_BPF and CAP_SYS_ADMIN)",
        .pin_dir.display()
    )]
    Permission { pin_dir: PathBuf },
    #[error(
        "the maps under {} have ABI version {found}, this xdplb reads version {expected}: \
         use the xdplb binary the daemon runs",
        .pin_dir.display()
    )]
    AbiMismatch {
        pin_dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("cannot open pinned map {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "pinned map {} does not have the layout this xdplb expects \
         (use the xdplb binary the daemon runs)",
        .path.display()
    )]
    Layout {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("reading pinned map {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// The pinned maps of one pin directory, typed.
pub struct PinnedMaps {
    pin_dir: PathBuf,
    config: Config,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, u32>,
    conns: HashMap<MapData, FlowKey, Conn>,
    conns_capacity: u32,
    snat_addrs: HashMap<MapData, AddrKey, u32>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, Counters>,
    /// `REFUSED`; `None` in pins made by builds from before it existed.
    refused: Option<Array<MapData, u64>>,
}

fn is_permission(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s)
        if matches!(s.io_error.kind(), io::ErrorKind::PermissionDenied))
}

fn open_data(pin_dir: &Path, name: &str) -> Result<MapData, PinnedError> {
    let path = pin_dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(PinnedError::Permission {
                pin_dir: pin_dir.into(),
            })
        }
        Err(_) => {
            return Err(PinnedError::NoState {
                pin_dir: pin_dir.into(),
            })
        }
    }
    MapData::from_pin(&path).map_err(|source| {
        if is_permission(&source) {
            PinnedError::Permission {
                pin_dir: pin_dir.into(),
            }
        } else {
            PinnedError::Open { path, source }
        }
    })
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    pin_dir: &Path,
    name: &str,
    data: MapData,
) -> Result<T, PinnedError> {
    let layout = |source| PinnedError::Layout {
        path: pin_dir.join(name),
        source,
    };
    T::try_from(Map::from_map_data(data).map_err(layout)?).map_err(layout)
}

fn open<T: TryFrom<Map, Error = MapError>>(pin_dir: &Path, name: &str) -> Result<T, PinnedError> {
    typed(pin_dir, name, open_data(pin_dir, name)?)
}

fn read_err(map: &'static str) -> impl Fn(MapError) -> PinnedError {
    move |source| PinnedError::Read { map, source }
}

/// Per-CPU counters summed over CPUs (wrapping, like the counters).
pub fn sum_counters<'a>(per_cpu: impl IntoIterator<Item = &'a Counters>) -> Counters {
    per_cpu
        .into_iter()
        .fold(Counters::default(), |a, c| Counters {
            packets: a.packets.wrapping_add(c.packets),
            bytes: a.bytes.wrapping_add(c.bytes),
            new_flows: a.new_flows.wrapping_add(c.new_flows),
        })
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`, which
/// stamps `Conn::last_seen_ns` and `created_ns`.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

impl PinnedMaps {
    /// Opens every map under `pin_dir` and checks the ABI version.
    pub fn open(pin_dir: &Path) -> Result<Self, PinnedError> {
        match std::fs::metadata(pin_dir) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(PinnedError::Permission {
                    pin_dir: pin_dir.into(),
                })
            }
            _ => {
                return Err(PinnedError::NoState {
                    pin_dir: pin_dir.into(),
                })
            }
        }
        // CONFIG first: if the layout differs, nothing else is worth reading.
        let config_map: Array<MapData, Config> =
            match typed(pin_dir, MAP_CONFIG, open_data(pin_dir, MAP_CONFIG)?) {
                Ok(m) => m,
                Err(PinnedError::Layout { .. }) => {
                    return Err(PinnedError::AbiMismatch {
                        pin_dir: pin_dir.into(),
                        found: 0,
                        expected: lb_common::ABI_VERSION,
                    })
                }
                Err(e) => return Err(e),
            };
        let config = config_map.get(&0, 0).map_err(read_err(MAP_CONFIG))?;
        if config.abi_version != lb_common::ABI_VERSION {
            return Err(PinnedError::AbiMismatch {
                pin_dir: pin_dir.into(),
                found: config.abi_version,
                expected: lb_common::ABI_VERSION,
            });
        }
        let conns_data = open_data(pin_dir, MAP_CONNS)?;
        let conns_capacity = conns_data
            .info()
            .map_err(read_err(MAP_CONNS))?
            .max_entries();
        Ok(Self {
            pin_dir: pin_dir.into(),
            config,
            services: open(pin_dir, MAP_SERVICES)?,
            backends: open(pin_dir, MAP_BACKENDS)?,
            maglev: open(pin_dir, MAP_MAGLEV)?,
            conns: typed(pin_dir, MAP_CONNS, conns_data)?,
            conns_capacity,
            snat_addrs: open(pin_dir, MAP_SNAT_ADDRS)?,
            service_stats: open(pin_dir, MAP_SERVICE_STATS)?,
            backend_stats: open(pin_dir, MAP_BACKEND_STATS)?,
            reason_stats: open(pin_dir, MAP_REASON_STATS)?,
            refused: if pin_dir.join(MAP_REFUSED).exists() {
                Some(open(pin_dir, MAP_REFUSED)?)
            } else {
                None
            },
        })
    }

    /// `REFUSED[index]`: when the backend last refused a connection
    /// (`CLOCK_MONOTONIC` ns; 0: never, or pins without that map).
    pub fn refused_at(&self, index: u32) -> Result<u64, PinnedError> {
        match &self.refused {
            Some(m) => match m.get(&index, 0) {
                Ok(at) => Ok(at),
                Err(MapError::OutOfBounds { .. }) => Ok(0),
                Err(e) => Err(read_err(MAP_REFUSED)(e)),
            },
            None => Ok(0),
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// CONFIG as read when the maps were opened.
    pub fn config(&self) -> Config {
        self.config
    }

    pub fn services(&self) -> Result<Vec<(ServiceKey, Service)>, PinnedError> {
        self.services
            .iter()
            .map(|r| r.map_err(read_err(MAP_SERVICES)))
            .collect()
    }

    pub fn service(&self, key: &ServiceKey) -> Result<Option<Service>, PinnedError> {
        match self.services.get(key, 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(read_err(MAP_SERVICES)(e)),
        }
    }

    /// `BACKENDS[index]`; `None` past the end, like the data plane's lookup.
    pub fn backend(&self, index: u32) -> Result<Option<Backend>, PinnedError> {
        match self.backends.get(&index, 0) {
            Ok(b) => Ok(Some(b)),
            Err(MapError::OutOfBounds { .. }) => Ok(None),
            Err(e) => Err(read_err(MAP_BACKENDS)(e)),
        }
    }

    /// Every backend slot in use (state not `empty`), by index.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, PinnedError> {
        let mut out = Vec::new();
        for index in 1..MAX_BACKENDS {
            let b = self
                .backends
                .get(&index, 0)
                .map_err(read_err(MAP_BACKENDS))?;
            if b.state != BACKEND_EMPTY {
                out.push((index, b));
            }
        }
        Ok(out)
    }

    /// `MAGLEV[slot]`; `None` past the end.
    pub fn maglev_slot(&self, slot: u32) -> Result<Option<u32>, PinnedError> {
        match self.maglev.get(&slot, 0) {
            Ok(b) => Ok(Some(b)),
            Err(MapError::OutOfBounds { .. }) => Ok(None),
            Err(e) => Err(read_err(MAP_MAGLEV)(e)),
        }
    }

    pub fn is_snat_addr(&self, key: &AddrKey) -> Result<bool, PinnedError> {
        match self.snat_addrs.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(read_err(MAP_SNAT_ADDRS)(e)),
        }
    }

    pub fn conn(&self, key: &FlowKey) -> Result<Option<Conn>, PinnedError> {
        match self.conns.get(key, 0) {
            Ok(c) => Ok(Some(c)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(read_err(MAP_CONNS)(e)),
        }
    }

    /// Walks CONNS. Entries created or evicted during the walk may be missed
    /// or seen twice (the kernel's get-next-key restarts when the current
    /// key vanished); entries that vanish between key and value are skipped.
    pub fn for_each_conn(&self, mut f: impl FnMut(&FlowKey, &Conn)) -> Result<(), PinnedError> {
        for k in self.conns.keys() {
            let k = k.map_err(read_err(MAP_CONNS))?;
            match self.conns.get(&k, 0) {
                Ok(c) => f(&k, &c),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(read_err(MAP_CONNS)(e)),
            }
        }
        Ok(())
    }

    /// CONNS `max_entries` (two entries per flow).
    pub fn conns_capacity(&self) -> u32 {
        self.conns_capacity
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters, PinnedError> {
        let v = self
            .service_stats
            .get(&id, 0)
            .map_err(read_err(MAP_SERVICE_STATS))?;
        Ok(sum_counters(v.iter()))
    }

    pub fn backend_counters(&self, index: u32) -> Result<Counters, PinnedError> {
        let v = self
            .backend_stats
            .get(&index, 0)
            .map_err(read_err(MAP_BACKEND_STATS))?;
        Ok(sum_counters(v.iter()))
    }

    /// Every reason's counters, indexed like `lb_common::reason::NAMES`.
    pub fn reason_counters(&self) -> Result<Vec<Counters>, PinnedError> {
        (0..lb_common::reason::COUNT)
            .map(|r| {
                let v = self
                    .reason_stats
                    .get(&r, 0)
                    .map_err(read_err(MAP_REASON_STATS))?;
                Ok(sum_counters(v.iter()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_counters_sum_and_wrap() {
        let v = [
            Counters {
                packets: 1,
                bytes: 100,
                new_flows: 1,
            },
            Counters {
                packets: 2,
                bytes: u64::MAX,
                new_flows: 0,
            },
        ];
        let s = sum_counters(v.iter());
        assert_eq!((s.packets, s.bytes, s.new_flows), (3, 99, 1));
    }

    #[test]
    fn missing_pin_dir_says_where_it_looked() {
        let dir = std::env::temp_dir().join("xdplb-no-such-pin-dir");
        let e = PinnedMaps::open(&dir)
            .err()
            .expect("a missing directory fails");
        let msg = e.to_string();
        assert!(
            msg.starts_with("no xdplb state under ") && msg.contains("--pin-dir"),
            "message was: {msg}"
        );
        assert!(!msg.contains('\n'), "one line, got: {msg}");
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(b >= a && a > 0, "CLOCK_MONOTONIC went {a} -> {b}");
    }
}
