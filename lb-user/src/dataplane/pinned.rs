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
//!
//! The two reads that cover a whole map, every BACKENDS slot and the CONNS
//! walk, use `BPF_MAP_LOOKUP_BATCH` (4,096 elements per syscall) instead of
//! one or two syscalls per element; kernels without it get the old way.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    Pod,
};
use lb_common::{
    AddrKey, Backend, Config, Conn, Counters, FlowKey, Service, ServiceKey, BACKEND_EMPTY,
    MAP_BACKENDS, MAP_BACKEND_STATS, MAP_CONFIG, MAP_CONNS, MAP_EVENT_STATS, MAP_MAGLEV,
    MAP_REASON_STATS, MAP_REFUSED, MAP_SERVICES, MAP_SERVICE_STATS, MAP_SNAT_ADDRS, MAP_UNANSWERED,
    MAX_BACKENDS,
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
    #[error("reading pinned map {map} in batches (BPF_MAP_LOOKUP_BATCH)")]
    Batch {
        map: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The pinned maps of one pin directory, typed.
pub struct PinnedMaps {
    pin_dir: PathBuf,
    config: Config,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    /// BACKENDS and CONNS again, for the batched reads aya has no call for.
    backends_fd: OwnedFd,
    conns_fd: OwnedFd,
    /// The kernel's id of CONNS: a new id means the maps were recreated.
    conns_id: u32,
    /// Use `BPF_MAP_LOOKUP_BATCH` (see [`Self::one_by_one`]).
    batched: bool,
    maglev: Array<MapData, u32>,
    conns: HashMap<MapData, FlowKey, Conn>,
    conns_capacity: u32,
    /// UNANSWERED: flows not established yet.
    unanswered: HashMap<MapData, FlowKey, Conn>,
    unanswered_fd: OwnedFd,
    unanswered_capacity: u32,
    events: PerCpuArray<MapData, u64>,
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
        let conns_info = conns_data.info().map_err(read_err(MAP_CONNS))?;
        let backends_data = open_data(pin_dir, MAP_BACKENDS)?;
        let unanswered_data = open_data(pin_dir, MAP_UNANSWERED)?;
        let unanswered_capacity = unanswered_data
            .info()
            .map_err(read_err(MAP_UNANSWERED))?
            .max_entries();
        let dup = |map: &'static str, data: &MapData| {
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| PinnedError::Batch { map, source })
        };
        Ok(Self {
            pin_dir: pin_dir.into(),
            config,
            services: open(pin_dir, MAP_SERVICES)?,
            backends_fd: dup(MAP_BACKENDS, &backends_data)?,
            conns_fd: dup(MAP_CONNS, &conns_data)?,
            conns_id: conns_info.id(),
            batched: true,
            backends: typed(pin_dir, MAP_BACKENDS, backends_data)?,
            maglev: open(pin_dir, MAP_MAGLEV)?,
            conns: typed(pin_dir, MAP_CONNS, conns_data)?,
            conns_capacity: conns_info.max_entries(),
            unanswered_fd: dup(MAP_UNANSWERED, &unanswered_data)?,
            unanswered: typed(pin_dir, MAP_UNANSWERED, unanswered_data)?,
            unanswered_capacity,
            events: open(pin_dir, MAP_EVENT_STATS)?,
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

    /// The same maps, read one element per syscall even where the kernel
    /// has `BPF_MAP_LOOKUP_BATCH`: how kernels older than 5.6 read, and the
    /// bench's baseline.
    pub fn one_by_one(mut self) -> Self {
        self.batched = false;
        self
    }

    /// The kernel's id of CONNS. Maps recreated under the same pin
    /// directory (`xdplb down`, then `run`) get a new one.
    pub fn conns_id(&self) -> u32 {
        self.conns_id
    }

    /// Every backend slot in use (state not `empty`), by index: the whole
    /// array in about 16 syscalls, whatever the number in use.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, PinnedError> {
        let mut out = Vec::new();
        if self.batched {
            match lookup_batch(self.backends_fd.as_fd(), |&index: &u32, b: &Backend| {
                if index != 0 && index < MAX_BACKENDS && b.state != BACKEND_EMPTY {
                    out.push((index, *b));
                }
            }) {
                Ok(()) => return Ok(out),
                Err(BatchError::Unsupported) => {}
                Err(BatchError::Failed(source)) => {
                    return Err(PinnedError::Batch {
                        map: MAP_BACKENDS,
                        source,
                    })
                }
            }
        }
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

    /// Walks CONNS, 4,096 entries per syscall (batches copy whole hash
    /// buckets, so an entry is seen at most once). Entries created or
    /// evicted during the walk may be missed. Without batches, two syscalls
    /// per entry, and an entry may be seen twice (the kernel's get-next-key
    /// restarts when the current key vanished).
    pub fn for_each_conn(&self, mut f: impl FnMut(&FlowKey, &Conn)) -> Result<(), PinnedError> {
        if self.batched {
            match lookup_batch(self.conns_fd.as_fd(), &mut f) {
                Ok(()) => return Ok(()),
                Err(BatchError::Unsupported) => {}
                Err(BatchError::Failed(source)) => {
                    return Err(PinnedError::Batch {
                        map: MAP_CONNS,
                        source,
                    })
                }
            }
        }
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

    /// `UNANSWERED[key]`: an entry of a flow not established yet.
    pub fn unanswered_conn(&self, key: &FlowKey) -> Result<Option<Conn>, PinnedError> {
        match self.unanswered.get(key, 0) {
            Ok(c) => Ok(Some(c)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(read_err(MAP_UNANSWERED)(e)),
        }
    }

    /// Walks UNANSWERED like [`Self::for_each_conn`] walks CONNS.
    pub fn for_each_unanswered(
        &self,
        mut f: impl FnMut(&FlowKey, &Conn),
    ) -> Result<(), PinnedError> {
        if self.batched {
            match lookup_batch(self.unanswered_fd.as_fd(), &mut f) {
                Ok(()) => return Ok(()),
                Err(BatchError::Unsupported) => {}
                Err(BatchError::Failed(source)) => {
                    return Err(PinnedError::Batch {
                        map: MAP_UNANSWERED,
                        source,
                    })
                }
            }
        }
        for k in self.unanswered.keys() {
            let k = k.map_err(read_err(MAP_UNANSWERED))?;
            match self.unanswered.get(&k, 0) {
                Ok(c) => f(&k, &c),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(read_err(MAP_UNANSWERED)(e)),
            }
        }
        Ok(())
    }

    /// UNANSWERED `max_entries`.
    pub fn unanswered_capacity(&self) -> u32 {
        self.unanswered_capacity
    }

    /// Every event's count, indexed like `lb_common::event::NAMES`.
    pub fn event_counts(&self) -> Result<Vec<u64>, PinnedError> {
        (0..lb_common::event::COUNT)
            .map(|e| {
                let v = self.events.get(&e, 0).map_err(read_err(MAP_EVENT_STATS))?;
                Ok(v.iter().fold(0u64, |a, c| a.wrapping_add(*c)))
            })
            .collect()
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

// ---- batched reads ---------------------------------------------------------

/// `BPF_MAP_LOOKUP_BATCH` in uapi `linux/bpf.h`'s `enum bpf_cmd`. Linux 5.6
/// added it for arrays (commit cb4d03ab499d, "bpf: Add generic support for
/// lookup batch op") and for hash maps, LRU ones included (commit
/// 057996380a42, "bpf: Add batch ops to all htab bpf map"). aya 0.14 has no
/// call for it.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The kernel's `ENOTSUPP` (not `EOPNOTSUPP`): a map type without batches.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr` (uapi `linux/bpf.h`). Passing
/// fewer bytes than the whole union is allowed; the kernel zero-fills the
/// rest.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(size_of::<BatchAttr>() == 56);

/// Elements per `BPF_MAP_LOOKUP_BATCH` call: 416 KiB of buffers for CONNS.
/// A hash map's batch holds whole buckets (ENOSPC if one does not fit), and
/// no bucket comes near 4,096 entries.
const BATCH: usize = 4096;

enum BatchError {
    /// The kernel has no batches, or not for this map type: read one by one.
    Unsupported,
    Failed(io::Error),
}

/// Hands every element of the map behind `fd` to `f`, reading [`BATCH`] at
/// a time. `K` and `V` must be the map's key and value types, which `typed`
/// checked when the map was opened.
fn lookup_batch<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    mut f: impl FnMut(&K, &V),
) -> Result<(), BatchError> {
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // Where the next batch starts: a key for arrays, a bucket number for
    // hash maps; the kernel writes at most a key's size (40 bytes here).
    let mut next = [0u64; 8];
    let mut first = true;
    loop {
        let start = next;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { start.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values of the
        // map's own sizes and at two 64-byte positions, all alive until the
        // call returns; the kernel writes nothing beyond them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let done = if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The end of the map; `count` says how many came with it.
                Some(libc::ENOENT) => true,
                Some(libc::EINVAL | ENOTSUPP) if first => return Err(BatchError::Unsupported),
                _ => return Err(BatchError::Failed(e)),
            }
        } else {
            false
        };
        let n = (attr.count as usize).min(BATCH);
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            f(k, v);
        }
        if done {
            return Ok(());
        }
        first = false;
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
        let a = crate::clock::monotonic_now_ns();
        let b = crate::clock::monotonic_now_ns();
        assert!(b >= a && a > 0, "CLOCK_MONOTONIC went {a} -> {b}");
    }
}
