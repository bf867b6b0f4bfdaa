//! Loads the embedded eBPF object and gives typed access to its maps.
//!
//! This is the only module that knows map names and layouts on the user side;
//! everything above it (table builder, daemon, stats) goes through
//! [`DataPlane`].

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{xdp::DevMapHash, Array, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    AddrKey, Backend, Config, Conn, Counters, FlowKey, Service, ServiceAt, ServiceKey,
    MAP_BACKENDS, MAP_BACKEND_STATS, MAP_CONFIG, MAP_CONNS, MAP_EVENT_STATS, MAP_LOG_TC,
    MAP_LOG_XDP, MAP_MAGLEV, MAP_REASON_STATS, MAP_REFUSED, MAP_SERVICES, MAP_SERVICE_AT,
    MAP_SERVICE_PORTS, MAP_SERVICE_STATS, MAP_SNAT_ADDRS, MAP_TX_PORTS, MAP_UNANSWERED, PROG_TC,
    PROG_TC_LOG, PROG_XDP, PROG_XDP_LOG,
};

use super::attach::Hook;

/// The eBPF object, built by `build.rs` through aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The maps lb-ebpf pins by name in the pin directory (its `::pinned` maps;
/// the per-CPU scratch map `SCRATCH` is not pinned).
pub const PINNED_MAPS: [&str; 13] = [
    MAP_CONFIG,
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_CONNS,
    MAP_SNAT_ADDRS,
    MAP_TX_PORTS,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_REASON_STATS,
    MAP_REFUSED,
    MAP_UNANSWERED,
    MAP_EVENT_STATS,
];

/// How to load the object.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Directory under bpffs where maps are pinned (and reused if present).
    pub pin_dir: PathBuf,
    pub conns_capacity: u32,
    /// `UNANSWERED` entries (flows not established yet, two entries each).
    pub unanswered_capacity: u32,
    pub maglev_capacity: u32,
    /// How TC patches IPv6 L4 checksums.
    pub l4_csum: L4Csum,
    /// The bench's per-step breakdown only (`lb_common::GLOBAL_BENCH_STOP`):
    /// 0, a normal data plane, everywhere else.
    pub bench_stop: u32,
    /// Load only this hook's programs (tests that run one hook: each load is
    /// a verifier pass, which takes seconds under the VM layer's emulation).
    /// None, as the daemon needs: both. Running an unloaded program fails
    /// with aya's "not loaded" error.
    pub only: Option<Hook>,
}

impl LoadOptions {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            conns_capacity: lb_common::DEFAULT_CONNS_CAPACITY,
            unanswered_capacity: lb_common::DEFAULT_UNANSWERED_CAPACITY,
            maglev_capacity: lb_common::DEFAULT_MAGLEV_CAPACITY,
            l4_csum: L4Csum::Probe,
            bench_stop: 0,
            only: None,
        }
    }
}

/// The object's `L4_CSUM_MODE` (lb-common `GLOBAL_L4_CSUM`): how the TC
/// program patches TCP/UDP checksums after rewriting IPv6 addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum L4Csum {
    /// What the kernel supports (`probe::Feature::L4CsumIpv6`).
    #[default]
    Probe,
    /// `bpf_l4_csum_replace` with `BPF_F_IPV6`.
    Ipv6Flag,
    /// Without `BPF_F_IPV6`, `skb->csum` corrected with `bpf_csum_update`.
    Compensate,
    /// Tests only: every checksum helper call fails (`drop_csum_failed`).
    FailForTest,
}

impl L4Csum {
    fn global(self) -> u32 {
        match self {
            L4Csum::Probe => {
                if crate::dataplane::probe::features()
                    .has(crate::dataplane::probe::Feature::L4CsumIpv6)
                {
                    lb_common::L4_CSUM_IPV6_FLAG
                } else {
                    lb_common::L4_CSUM_COMPENSATE
                }
            }
            L4Csum::Ipv6Flag => lb_common::L4_CSUM_IPV6_FLAG,
            L4Csum::Compensate => lb_common::L4_CSUM_COMPENSATE,
            L4Csum::FailForTest => lb_common::L4_CSUM_FAULT,
        }
    }
}

mod services;

/// A loaded data plane: the programs (loaded, not attached) and typed maps.
pub struct DataPlane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    config: Array<MapData, Config>,
    services: HashMap<MapData, ServiceKey, Service>,
    /// `SERVICE_PORTS`: kept equal to the ports in `services`.
    service_ports: Array<MapData, u32>,
    /// `SERVICE_AT`: where each service is, by id, for the established
    /// path's shortcut (`decide::still_at`); kept equal to `services`.
    service_at: Array<MapData, ServiceAt>,
    /// The keys in `services` and their ids (this process is their only
    /// writer), to tell whether a removed service's port is still
    /// someone's, and which wildcards an exact service shadows, without
    /// iterating the map.
    service_keys: std::collections::HashMap<ServiceKey, u32>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, u32>,
    conns: HashMap<MapData, FlowKey, Conn>,
    unanswered: HashMap<MapData, FlowKey, Conn>,
    snat_addrs: HashMap<MapData, AddrKey, u32>,
    tx_ports: DevMapHash<MapData>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, Counters>,
    refused: Array<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    /// `MAGLEV` mapped into this process, when the map allows it.
    maglev_mem: Option<MaglevMem>,
    /// `LOG_XDP` and `LOG_TC`, held so that their entries stay.
    _log_progs: Vec<ProgramArray<MapData>>,
}

/// `BPF_F_MMAPABLE` (uapi `linux/bpf.h`).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Writes and reads of `MAGLEV` through memory mappings (`BPF_F_MMAPABLE`)
/// instead of one `bpf()` syscall per slot: a 65,537-slot half is compared
/// and written in about a millisecond instead of tens of milliseconds, which
/// is what made a thousand services take minutes to settle. Each operation
/// maps only the pages it touches and unmaps them after, so the daemon's
/// resident memory does not grow by the table's size. The kernel lays array
/// elements out `round_up(value_size, 8)` bytes apart. The table flip stays a
/// `SERVICES` update through the syscall, which orders these stores before it.
struct MaglevMem {
    fd: std::os::fd::OwnedFd,
    entries: u32,
}

/// Bytes between two `MAGLEV` elements in the mapping.
const MAGLEV_STRIDE: usize = 8;

/// Slots `first..first + len` of `MAGLEV`, mapped (shared, read-write);
/// unmapped when dropped.
struct MaglevWindow {
    map: memmap2::MmapRaw,
    len: u32,
}

impl MaglevMem {
    fn open(data: &MapData) -> Result<Self> {
        let info = data.info().context("reading MAGLEV's map info")?;
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            bail!("MAGLEV was created without BPF_F_MMAPABLE (pinned by an older xdplb)");
        }
        if info.value_size() != 4 {
            bail!("MAGLEV values are {} bytes, not 4", info.value_size());
        }
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating MAGLEV's fd")?;
        let mem = Self {
            fd,
            entries: info.max_entries(),
        };
        drop(mem.window(0, 1)?);
        Ok(mem)
    }

    /// The end of slots `first..first + len`, if they lie inside the map.
    fn end(&self, first: u32, len: u32) -> Result<u32> {
        first
            .checked_add(len)
            .filter(|&e| e <= self.entries)
            .with_context(|| {
                format!(
                    "MAGLEV[{first}..{}] is past the map's {} entries",
                    u64::from(first) + u64::from(len),
                    self.entries
                )
            })
    }

    /// Maps slots `first..first + len`; `len` is at least 1 (a mapping
    /// cannot be empty: callers with nothing to touch check the range with
    /// [`Self::end`] and return before).
    fn window(&self, first: u32, len: u32) -> Result<MaglevWindow> {
        let end = self.end(first, len)?;
        // memmap2 maps from the page holding slot `first` and points past
        // the skew; the kernel checks the range against the map again.
        let map = memmap2::MmapOptions::new()
            .offset((first as usize * MAGLEV_STRIDE) as u64)
            .len(len as usize * MAGLEV_STRIDE)
            .map_raw(self.fd.as_raw_fd())
            .with_context(|| format!("mmap of MAGLEV[{first}..{end}]"))?;
        Ok(MaglevWindow { map, len })
    }
}

impl MaglevWindow {
    fn slot(&self, i: u32) -> &AtomicU32 {
        assert!(i < self.len, "slot {i} outside a window of {}", self.len);
        // SAFETY: inside the mapping (i < len), 8-byte aligned (a page-
        // aligned mapping, offsets multiples of the stride), and only ever
        // accessed atomically from here, for as long as `self` keeps the
        // mapping.
        unsafe {
            &*self
                .map
                .as_mut_ptr()
                .add(i as usize * MAGLEV_STRIDE)
                .cast::<AtomicU32>()
        }
    }
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type or layout"))
}

impl DataPlane {
    /// Loads the embedded object. Maps already pinned under `pin_dir` are
    /// reused (a restart keeps the connection table); new ones are pinned there.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this xdplb was built with AYA_BUILD_SKIP=1 and embeds no eBPF object; rebuild without it (`cargo xtask build`)");
        }
        crate::dataplane::pin_dir::create(&opts.pin_dir)?;
        check_pinned_abi(&opts.pin_dir)?;
        drop_resized_reason_stats(&opts.pin_dir)?;
        let l4_csum = opts.l4_csum.global();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&opts.pin_dir)
            .map_max_entries(MAP_CONNS, opts.conns_capacity)
            .map_max_entries(MAP_UNANSWERED, opts.unanswered_capacity)
            .map_max_entries(MAP_MAGLEV, opts.maglev_capacity)
            .override_global(lb_common::GLOBAL_L4_CSUM, &l4_csum, true)
            .override_global(lb_common::GLOBAL_BENCH_STOP, &opts.bench_stop, true)
            .load(EBPF_OBJECT)
            .context("loading the xdplb eBPF object (are you root, is bpffs mounted?)")?;
        // Each hook with the log program its log lines go to.
        let hooks: &[(&str, &str, &str)] = match opts.only {
            None => &[
                (PROG_XDP, MAP_LOG_XDP, PROG_XDP_LOG),
                (PROG_TC, MAP_LOG_TC, PROG_TC_LOG),
            ],
            Some(Hook::Xdp) => &[(PROG_XDP, MAP_LOG_XDP, PROG_XDP_LOG)],
            Some(Hook::Tc) => &[(PROG_TC, MAP_LOG_TC, PROG_TC_LOG)],
        };
        for name in hooks.iter().flat_map(|&(hook, _, log)| [hook, log]) {
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("eBPF object has no program {name}"))?;
            match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            }
            .with_context(|| format!("the kernel verifier rejected {name}"))?;
        }
        // Each hook hands its rare log lines to its log program (a tail
        // call; lb-ebpf/src/note.rs). The arrays keep their entries while
        // this process holds them: without a reader the lines stop too.
        let mut log_progs = Vec::new();
        for &(_, map, prog) in hooks {
            let mut array: ProgramArray<MapData> = take(&mut ebpf, map)?;
            let fd = match ebpf.program(prog) {
                Some(aya::programs::Program::Xdp(p)) => p.fd()?,
                Some(aya::programs::Program::SchedClassifier(p)) => p.fd()?,
                _ => bail!("eBPF object has no program {prog} of the expected type"),
            };
            array
                .set(0, fd, 0)
                .with_context(|| format!("putting {prog} into {map}"))?;
            log_progs.push(array);
        }
        let maglev_mem = match ebpf.map(MAP_MAGLEV) {
            Some(aya::maps::Map::Array(data)) => MaglevMem::open(data)
                .inspect_err(|e| {
                    tracing::info!("Maglev tables are written slot by slot through bpf(): {e:#}");
                })
                .ok(),
            _ => None,
        };
        let mut dp = Self {
            maglev_mem,
            config: take(&mut ebpf, MAP_CONFIG)?,
            services: take(&mut ebpf, MAP_SERVICES)?,
            service_ports: take(&mut ebpf, MAP_SERVICE_PORTS)?,
            service_at: take(&mut ebpf, MAP_SERVICE_AT)?,
            service_keys: Default::default(),
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            maglev: take(&mut ebpf, MAP_MAGLEV)?,
            conns: take(&mut ebpf, MAP_CONNS)?,
            unanswered: take(&mut ebpf, MAP_UNANSWERED)?,
            snat_addrs: take(&mut ebpf, MAP_SNAT_ADDRS)?,
            tx_ports: take(&mut ebpf, MAP_TX_PORTS)?,
            service_stats: take(&mut ebpf, MAP_SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, MAP_BACKEND_STATS)?,
            reason_stats: take(&mut ebpf, MAP_REASON_STATS)?,
            refused: take(&mut ebpf, MAP_REFUSED)?,
            events: take(&mut ebpf, MAP_EVENT_STATS)?,
            pin_dir: opts.pin_dir.clone(),
            _log_progs: log_progs,
            ebpf,
        };
        let cfg = dp.config()?;
        if cfg.abi_version == 0 {
            dp.set_config(&Config::with_defaults())?;
        } else if cfg.abi_version != lb_common::ABI_VERSION {
            bail!(
                "pinned maps in {} have ABI version {}, this build speaks {}; \
                 run `xdplb down` to remove the old state first",
                opts.pin_dir.display(),
                cfg.abi_version,
                lb_common::ABI_VERSION
            );
        }
        dp.rebuild_service_maps()?;
        Ok(dp)
    }

    /// The data plane's log (aya-log's ring buffer of this load) for
    /// [`crate::logging::drain_data_plane`]. Once per load.
    /// Each record goes to `logger` when the logger is flushed.
    pub fn take_log<T: log::Log>(&mut self, logger: T) -> Result<aya_log::EbpfLogger<T>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .context("opening the data plane's log ring buffer (AYA_LOGS)")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn xdp(&mut self) -> &mut Xdp {
        match self.ebpf.program_mut(PROG_XDP) {
            Some(aya::programs::Program::Xdp(p)) => p,
            _ => unreachable!("checked at load"),
        }
    }

    pub fn tc(&mut self) -> &mut SchedClassifier {
        match self.ebpf.program_mut(PROG_TC) {
            Some(aya::programs::Program::SchedClassifier(p)) => p,
            _ => unreachable!("checked at load"),
        }
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn config(&self) -> Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        self.config.set(0, cfg, 0).context("writing CONFIG")
    }

    pub fn set_backend(&mut self, index: u32, b: &Backend) -> Result<()> {
        self.backends
            .set(index, b, 0)
            .with_context(|| format!("writing BACKENDS[{index}]"))
    }

    /// Zeroes a backend slot's counters on every CPU and its last refusal: a
    /// reused index must not carry the previous backend's numbers into the
    /// new one's series, nor its refusals into the new one's picks.
    pub fn reset_backend_counters(&mut self, index: u32) -> Result<()> {
        self.refused
            .set(index, 0, 0)
            .with_context(|| format!("zeroing REFUSED[{index}]"))?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
        self.backend_stats
            .set(index, zeros, 0)
            .with_context(|| format!("zeroing BACKEND_STATS[{index}]"))
    }

    /// `CLOCK_MONOTONIC` nanoseconds of the backend's last refused
    /// connection as the data plane saw it (0: none).
    pub fn refused_at(&self, index: u32) -> Result<u64> {
        Ok(self.refused.get(&index, 0)?)
    }

    /// Sets when the backend last refused a connection (the data plane
    /// writes it; tests and the differential check set it directly).
    pub fn set_refused_at(&mut self, index: u32, at_ns: u64) -> Result<()> {
        self.refused
            .set(index, at_ns, 0)
            .with_context(|| format!("writing REFUSED[{index}]"))
    }

    pub fn backend(&self, index: u32) -> Result<Backend> {
        Ok(self.backends.get(&index, 0)?)
    }

    /// Writes one half of a service's Maglev table; `slots` must hold exactly
    /// `svc.maglev_size` backend indexes. Flip with [`Self::set_service`].
    pub fn write_maglev_half(&mut self, svc: &Service, half: u32, slots: &[u32]) -> Result<()> {
        if slots.len() != svc.maglev_size as usize {
            bail!(
                "Maglev table has {} slots, service expects {}",
                slots.len(),
                svc.maglev_size
            );
        }
        let base = svc.maglev_base + half * svc.maglev_size;
        self.write_maglev_changes(base, slots)?;
        Ok(())
    }

    pub fn set_maglev_slot(&mut self, index: u32, backend: u32) -> Result<()> {
        if let Some(m) = &self.maglev_mem {
            m.window(index, 1)?
                .slot(0)
                .store(backend, Ordering::Relaxed);
            return Ok(());
        }
        self.maglev
            .set(index, backend, 0)
            .with_context(|| format!("writing MAGLEV[{index}]"))
    }

    pub fn maglev_slot(&self, index: u32) -> Result<u32> {
        if let Some(m) = &self.maglev_mem {
            return Ok(m.window(index, 1)?.slot(0).load(Ordering::Relaxed));
        }
        Ok(self.maglev.get(&index, 0)?)
    }

    /// `MAGLEV[base..base + len]`.
    pub fn maglev_range(&self, base: u32, len: u32) -> Result<Vec<u32>> {
        if let Some(m) = &self.maglev_mem {
            if len == 0 {
                m.end(base, 0)?;
                return Ok(Vec::new());
            }
            let w = m.window(base, len)?;
            return Ok((0..len)
                .map(|i| w.slot(i).load(Ordering::Relaxed))
                .collect());
        }
        (base..base + len).map(|i| self.maglev_slot(i)).collect()
    }

    /// Writes `table` at `MAGLEV[base..]`, only the slots that differ from
    /// what the map holds; returns how many were written.
    pub fn write_maglev_changes(&mut self, base: u32, table: &[u32]) -> Result<usize> {
        let len = u32::try_from(table.len()).context("Maglev table length")?;
        let mut n = 0;
        if let Some(m) = &self.maglev_mem {
            if len == 0 {
                m.end(base, 0)?;
                return Ok(0);
            }
            let w = m.window(base, len)?;
            for (i, &new) in table.iter().enumerate() {
                let slot = w.slot(i as u32);
                if slot.load(Ordering::Relaxed) != new {
                    slot.store(new, Ordering::Relaxed);
                    n += 1;
                }
            }
            return Ok(n);
        }
        for (i, &new) in table.iter().enumerate() {
            let index = base + i as u32;
            if self.maglev_slot(index)? != new {
                self.set_maglev_slot(index, new)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether Maglev slots are written through a memory mapping (see
    /// [`MaglevMem`]) rather than one syscall each.
    pub fn maglev_mapped(&self) -> bool {
        self.maglev_mem.is_some()
    }

    pub fn add_snat_addr(&mut self, key: &AddrKey) -> Result<()> {
        self.snat_addrs
            .insert(key, 1, 0)
            .context("writing SNAT_ADDRS")
    }

    /// Lets XDP redirect to `ifindex` (XDP mode only; TC uses bpf_redirect_neigh).
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to TX_PORTS"))
    }

    /// Drops `ifindex` from TX_PORTS (an interface that went away).
    pub fn remove_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .remove(ifindex)
            .with_context(|| format!("removing ifindex {ifindex} from TX_PORTS"))
    }

    pub fn conn(&self, key: &FlowKey) -> Result<Option<Conn>> {
        match self.conns.get(key, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading CONNS"),
        }
    }

    pub fn insert_conn(&mut self, key: &FlowKey, c: &Conn) -> Result<()> {
        self.conns.insert(key, c, 0).context("writing CONNS")
    }

    pub fn conns(&self) -> Result<Vec<(FlowKey, Conn)>> {
        self.conns
            .iter()
            .map(|r| r.context("iterating CONNS"))
            .collect()
    }

    /// `UNANSWERED[key]`: an entry of a flow not established yet.
    pub fn unanswered_conn(&self, key: &FlowKey) -> Result<Option<Conn>> {
        match self.unanswered.get(key, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading UNANSWERED"),
        }
    }

    pub fn unanswered_conns(&self) -> Result<Vec<(FlowKey, Conn)>> {
        self.unanswered
            .iter()
            .map(|r| r.context("iterating UNANSWERED"))
            .collect()
    }

    pub fn insert_unanswered(&mut self, key: &FlowKey, c: &Conn) -> Result<()> {
        self.unanswered
            .insert(key, c, 0)
            .context("writing UNANSWERED")
    }

    /// Removes every flow from `CONNS` and `UNANSWERED`; returns how many
    /// entries went. For tests: the daemon never empties the tables (flows
    /// outlive it by design).
    pub fn clear_flows(&mut self) -> Result<usize> {
        Ok(self.clear_established()? + self.clear_unanswered()?)
    }

    /// Removes every flow from `CONNS` (see [`DataPlane::clear_flows`]).
    pub fn clear_established(&mut self) -> Result<usize> {
        clear_table(&mut self.conns, "CONNS")
    }

    /// Removes every flow from `UNANSWERED`, as their timeout would (see
    /// [`DataPlane::clear_flows`]).
    pub fn clear_unanswered(&mut self) -> Result<usize> {
        clear_table(&mut self.unanswered, "UNANSWERED")
    }

    /// Every event's count, indexed like `lb_common::event::NAMES`.
    pub fn events(&self) -> Result<Vec<u64>> {
        (0..lb_common::event::COUNT)
            .map(|e| {
                let v = self.events.get(&e, 0)?;
                Ok(v.iter().fold(0u64, |a, c| a.wrapping_add(*c)))
            })
            .collect()
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        sum(&self.service_stats.get(&id, 0)?)
    }

    pub fn backend_counters(&self, index: u32) -> Result<Counters> {
        sum(&self.backend_stats.get(&index, 0)?)
    }

    pub fn reason_counters(&self, reason: u32) -> Result<Counters> {
        sum(&self.reason_stats.get(&reason, 0)?)
    }

    /// Every reason's packet count, indexed like `lb_common::reason::NAMES`.
    pub fn reasons(&self) -> Result<Vec<u64>> {
        (0..lb_common::reason::COUNT)
            .map(|r| self.reason_counters(r).map(|c| c.packets))
            .collect()
    }

    /// Removes the map pins xdplb makes under `pin_dir` ([`PINNED_MAPS`]);
    /// anything else there stays. Returns how many went. On bpffs a regular
    /// file is a pin, so a directory or symlink of the same name is not ours.
    pub fn unpin_maps(pin_dir: &Path) -> Result<usize> {
        let mut removed = 0;
        for name in PINNED_MAPS {
            let path = pin_dir.join(name);
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("unpinning {}", path.display()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes xdplb's map pins, then `pin_dir` if nothing else is in it
    /// (tests and examples; `xdplb down` goes through `attach::teardown`,
    /// which removes the links first).
    pub fn unpin_all(pin_dir: &Path) -> Result<()> {
        Self::unpin_maps(pin_dir)?;
        crate::dataplane::pin_dir::remove_dirs(pin_dir)?;
        Ok(())
    }
}

/// Refuses pinned maps of another layout before the object is loaded (the
/// verifier would otherwise reject the programs against the old maps, with
/// a message that names no cause): CONFIG's size and `abi_version` tell.
fn check_pinned_abi(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(MAP_CONFIG);
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let size = data
        .info()
        .map(|i| i.value_size())
        .with_context(|| format!("reading {}", path.display()))?;
    let layout = if size as usize == size_of::<Config>() {
        let map: Array<MapData, Config> = Array::try_from(aya::maps::Map::Array(data))
            .with_context(|| format!("opening {}", path.display()))?;
        match map.get(&0, 0)?.abi_version {
            0 => return Ok(()),
            v if v == lb_common::ABI_VERSION => return Ok(()),
            v => format!("ABI version {v}"),
        }
    } else {
        format!("a {size}-byte CONFIG")
    };
    bail!(
        "pinned maps in {} have {layout}, this build speaks ABI version {}; run `xdplb down` \
         to remove the old state first (established flows are lost)",
        pin_dir.display(),
        lb_common::ABI_VERSION
    )
}

/// A `REASON_STATS` pinned by a build with another number of reasons
/// (`lb_common::reason::COUNT`) goes, and a new one of the right size is
/// made: the program would count the new reasons nowhere, and readers would
/// fail on the missing slots. Its counters start again from zero (the other
/// maps, the connection table included, are kept).
fn drop_resized_reason_stats(pin_dir: &Path) -> Result<()> {
    for (map, count, what) in [
        (MAP_REASON_STATS, lb_common::reason::COUNT, "reasons"),
        (MAP_EVENT_STATS, lb_common::event::COUNT, "events"),
    ] {
        let path = pin_dir.join(map);
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let entries = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map(|i| i.max_entries())
            .with_context(|| format!("reading {}", path.display()))?;
        if entries != count {
            tracing::info!(
                "{} has {entries} {what}, this build counts {count}: replacing it ({what} \
                 counters start from zero)",
                path.display(),
            );
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
    }
    Ok(())
}

/// Summed over CPUs, wrapping like the counters themselves (one rule with
/// the CLI's readers: `pinned::sum_counters`).
fn sum(v: &PerCpuValues<Counters>) -> Result<Counters> {
    Ok(crate::dataplane::pinned::sum_counters(v.iter()))
}

/// Removes every entry of a connection table; returns how many went.
fn clear_table(table: &mut HashMap<MapData, FlowKey, Conn>, name: &str) -> Result<usize> {
    let keys: Vec<FlowKey> = table
        .keys()
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {name}"))?;
    let mut n = 0;
    for k in keys {
        match table.remove(&k) {
            Ok(()) => n += 1,
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing from {name}")),
        }
    }
    Ok(n)
}
