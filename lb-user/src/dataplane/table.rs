//! From "these backends, in these states" to kernel maps, atomically.
//!
//! The writer owns the allocation of service ids, backend indexes and Maglev
//! regions. For each change it fills the *inactive* half of the service's
//! Maglev region (only the slots that differ from what that half held), then
//! replaces the whole `SERVICES` value with `active_half` flipped: a hash-map
//! element replace is atomic for the data plane, so a packet sees either the
//! old table or the new one, never a mix.
//!
//! On start it adopts what is pinned: ids, indexes, regions and both halves,
//! so a restarted daemon changes nothing until the world changes.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr, UdpSocket},
};

use anyhow::{bail, Context as _, Result};
use lb_common::{
    AddrKey, Backend, Service, ServiceKey, BACKEND_ACTIVE, BACKEND_EMPTY, FAMILY_V4, FAMILY_V6,
    MAX_BACKENDS, MAX_SERVICES, PROTO_TCP, PROTO_UDP,
};

use crate::{
    config::HostAddrs,
    dataplane::{
        maglev::{self, MaglevBackend},
        maps::DataPlane,
    },
};

/// What a service looks like to the writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub listen: SocketAddr,
    pub udp: bool,
    pub maglev_size: u32,
    pub snat_ports: (u16, u16),
    /// Fixed SNAT source address; `None` = the address the kernel would use
    /// to reach the first backend (found with a connected UDP socket, which
    /// sends nothing).
    pub snat_addr: Option<IpAddr>,
}

impl ServiceSpec {
    pub fn key(&self) -> ServiceKey {
        let (addr, family) = addr_bytes(self.listen.ip());
        ServiceKey {
            addr,
            port_be: self.listen.port().to_be(),
            proto: if self.udp { PROTO_UDP } else { PROTO_TCP },
            family,
        }
    }
}

/// Address as stored in the maps: wire bytes, IPv4 in the first four.
pub fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            a[..4].copy_from_slice(&v4.octets());
            (a, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// The inverse of [`addr_bytes`].
pub fn ip_from_bytes(a: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::from(*a)
    } else {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    }
}

struct ServiceState {
    spec: ServiceSpec,
    svc: Service,
    /// Backend index per address.
    backends: BTreeMap<SocketAddr, u32>,
    /// Backends that were `active` in the pinned maps at adoption.
    adopted_active: Vec<SocketAddr>,
    /// When the inactive half stopped being the active one.
    retired_at: Option<std::time::Instant>,
    /// The state last written to BACKENDS per backend.
    written: BTreeMap<SocketAddr, u8>,
    /// The region the table lived in before a reload changed its Maglev
    /// size: freed once `SERVICES` points at the new one.
    moved_from: Option<(u32, u32)>,
}

/// A half retired by a flip less than this long ago is rewritten only after
/// an RCU grace period ([`wait_for_running_programs`]): a packet that read
/// the old `SERVICES` value may still be about to read a slot of that half.
/// Programs run to completion in microseconds (softirq, no preemption), so
/// a half retired longer ago has no reader left; the wait only delays two
/// changes that come back to back. Without the grace period (the syscall
/// refused) the writer sleeps out the rest of this instead.
pub const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// Waits until every BPF program run that began before the call has ended:
/// an RCU grace period. XDP and TC programs, and `BPF_PROG_TEST_RUN` runs,
/// are RCU read-side sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)` is
/// `synchronize_rcu()` when more than one CPU is online
/// (kernel/sched/membarrier.c; the BPF selftests' `kern_sync_rcu` relies on
/// it the same way). With one CPU it returns at once, which is enough for
/// XDP and TC: they run in softirq and are never preempted while this
/// thread runs. It fails on `nohz_full` kernels.
pub fn wait_for_running_programs() -> std::io::Result<()> {
    rustix::thread::membarrier(rustix::thread::MembarrierCommand::Global).map_err(Into::into)
}

pub struct Writer {
    dp: DataPlane,
    services: BTreeMap<String, ServiceState>,
    maglev_capacity: u32,
    /// Backend indexes in use (index -> owning service id).
    used_backends: HashMap<u32, u32>,
    /// At most this many backend indexes are handed out (`backend_slots`).
    backend_slots: u32,
    /// This host's addresses: a SNAT source must be one of them.
    host: HostAddrs,
}

/// What one `apply` did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub flipped: bool,
    pub slots_written: usize,
    pub active: usize,
}

impl Writer {
    /// Wraps a loaded data plane and adopts any pinned state for `specs`.
    pub fn new(dp: DataPlane, maglev_capacity: u32, specs: &[ServiceSpec]) -> Result<Self> {
        let mut w = Self {
            dp,
            services: BTreeMap::new(),
            maglev_capacity,
            used_backends: HashMap::new(),
            backend_slots: MAX_BACKENDS - 1,
            host: HostAddrs::read().context("listing the host's addresses")?,
        };
        w.adopt(specs)?;
        Ok(w)
    }

    /// Hands out at most `n` backend indexes (config `backend_slots`).
    /// Indexes already in use stay.
    pub fn set_backend_slots(&mut self, n: u32) {
        self.backend_slots = n.min(MAX_BACKENDS - 1);
    }

    /// The host's addresses changed: a SNAT source that is no longer one of
    /// them is chosen again on the service's next [`Writer::apply`].
    /// Returns whether anything changed.
    pub fn set_host_addrs(&mut self, host: HostAddrs) -> bool {
        let changed = host != self.host;
        self.host = host;
        changed
    }

    /// The SNAT source address service `name` uses now, if it has one.
    pub fn snat_addr(&self, name: &str) -> Option<IpAddr> {
        let st = self.services.get(name)?;
        let ip = ip_from_bytes(&st.svc.snat_addr, family_of(st.spec.listen.ip()));
        (!ip.is_unspecified()).then_some(ip)
    }

    pub fn data_plane(&self) -> &DataPlane {
        &self.dp
    }

    pub fn data_plane_mut(&mut self) -> &mut DataPlane {
        &mut self.dp
    }

    /// The service's current `SERVICES` value.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name).map(|s| &s.svc)
    }

    /// Backends of service `name` that were `active` in the pinned maps.
    pub fn adopted_active(&self, name: &str) -> Vec<SocketAddr> {
        self.services
            .get(name)
            .map(|s| s.adopted_active.clone())
            .unwrap_or_default()
    }

    /// Backend index of `addr` in service `name`.
    pub fn backend_index(&self, name: &str, addr: SocketAddr) -> Option<u32> {
        self.services.get(name)?.backends.get(&addr).copied()
    }

    /// Adopts pinned services that match `specs` (same key and table size),
    /// allocates the rest, and removes pinned services no longer configured.
    fn adopt(&mut self, specs: &[ServiceSpec]) -> Result<()> {
        let pinned: HashMap<ServiceKey, Service> = self.dp.services()?.into_iter().collect();
        let mut pinned_backends: HashMap<u32, Vec<(u32, Backend)>> = HashMap::new();
        if !pinned.is_empty() {
            for index in 1..MAX_BACKENDS {
                let b = self.dp.backend(index)?;
                if b.state != BACKEND_EMPTY {
                    pinned_backends
                        .entry(b.service)
                        .or_default()
                        .push((index, b));
                }
            }
        }
        let mut taken_ids = Vec::new();
        for spec in specs {
            let key = spec.key();
            let Some(svc) = pinned
                .get(&key)
                .filter(|s| s.maglev_size == spec.maglev_size)
            else {
                continue;
            };
            let mut backends = BTreeMap::new();
            let mut adopted_active = Vec::new();
            let mut written = BTreeMap::new();
            for (index, b) in pinned_backends.remove(&svc.id).unwrap_or_default() {
                let addr =
                    SocketAddr::new(ip_from_bytes(&b.addr, b.family), u16::from_be(b.port_be));
                backends.insert(addr, index);
                if b.state == BACKEND_ACTIVE {
                    adopted_active.push(addr);
                }
                written.insert(addr, b.state);
                self.used_backends.insert(index, svc.id);
            }
            tracing::info!(
                service = %spec.name,
                id = svc.id,
                backends = backends.len(),
                "adopted pinned service state (connection table kept)"
            );
            taken_ids.push(svc.id);
            // The SNAT range may have been reconfigured; ports of live flows
            // stay valid (their reverse entries keep them).
            let mut svc = *svc;
            svc.snat_port_lo = spec.snat_ports.0;
            svc.snat_port_hi = spec.snat_ports.1;
            self.dp.set_service(&key, &svc)?;
            self.services.insert(
                spec.name.clone(),
                ServiceState {
                    spec: spec.clone(),
                    svc,
                    backends,
                    adopted_active,
                    retired_at: None,
                    written,
                    moved_from: None,
                },
            );
        }
        // Pinned services that are no longer configured (or changed shape).
        for (key, svc) in &pinned {
            if !taken_ids.contains(&svc.id) {
                tracing::info!(
                    id = svc.id,
                    "removing pinned service that is no longer configured"
                );
                self.dp.remove_service(key)?;
                for (index, _) in pinned_backends.remove(&svc.id).unwrap_or_default() {
                    self.dp.set_backend(index, &Backend::default())?;
                }
            }
        }
        for spec in specs {
            if !self.services.contains_key(&spec.name) {
                self.add_service(spec)?;
            }
        }
        Ok(())
    }

    /// Maglev regions in use: every service's two halves, and regions left
    /// behind by a size change that are not free yet.
    fn regions(&self) -> Vec<(u32, u32)> {
        self.services
            .values()
            .flat_map(|st| {
                std::iter::once((st.svc.maglev_base, 2 * st.svc.maglev_size)).chain(st.moved_from)
            })
            .collect()
    }

    /// Adds a service (a reload): a free id and Maglev region, both halves
    /// zeroed, then its `SERVICES` entry. Nothing is written if it fails.
    pub fn add_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        if self.services.contains_key(&spec.name) {
            bail!("service {} exists already", spec.name);
        }
        let taken: Vec<u32> = self.services.values().map(|st| st.svc.id).collect();
        let id = (1..MAX_SERVICES)
            .find(|i| !taken.contains(i))
            .context("no free service id: too many services")?;
        let need = 2 * spec.maglev_size;
        let base = first_fit(&self.regions(), need, self.maglev_capacity).with_context(|| {
            format!(
                "Maglev map full: service {} needs {need} slots; restart to grow the map, or \
                 lower maglev_size",
                spec.name
            )
        })?;
        let zeros = vec![0u32; spec.maglev_size as usize];
        for h in 0..2 {
            self.dp
                .write_maglev_changes(base + h * spec.maglev_size, &zeros)?;
        }
        let svc = Service {
            id,
            flags: 0,
            maglev_base: base,
            maglev_size: spec.maglev_size,
            active_half: 0,
            snat_port_lo: spec.snat_ports.0,
            snat_port_hi: spec.snat_ports.1,
            snat_addr: spec.snat_addr.map(|a| addr_bytes(a).0).unwrap_or_default(),
        };
        self.dp.set_service(&spec.key(), &svc)?;
        self.services.insert(
            spec.name.clone(),
            ServiceState {
                spec: spec.clone(),
                svc,
                backends: BTreeMap::new(),
                adopted_active: Vec::new(),
                retired_at: None,
                written: BTreeMap::new(),
                moved_from: None,
            },
        );
        Ok(())
    }

    /// Removes a service (a reload, after its tasks drained): its `SERVICES`
    /// entry first, so no packet finds it, then its backends; its id,
    /// indexes and region become free.
    pub fn remove_service(&mut self, name: &str) -> Result<()> {
        let Some(st) = self.services.get(name) else {
            return Ok(());
        };
        self.dp.remove_service(&st.spec.key())?;
        let st = self.services.remove(name).expect("checked above");
        for index in st.backends.values() {
            self.dp.set_backend(*index, &Backend::default())?;
            self.used_backends.remove(index);
        }
        Ok(())
    }

    /// A reload changed a service's settings (same listen address). SNAT
    /// settings apply on the next [`Writer::apply`]; a new Maglev size moves
    /// the table to a new region there, in one `SERVICES` update.
    pub fn update_spec(&mut self, spec: &ServiceSpec) -> Result<()> {
        let regions = self.regions();
        let capacity = self.maglev_capacity;
        let st = self
            .services
            .get_mut(&spec.name)
            .with_context(|| format!("unknown service {}", spec.name))?;
        if st.spec.key() != spec.key() {
            bail!(
                "service {}: a new listen address is a new service",
                spec.name
            );
        }
        if spec.maglev_size != st.svc.maglev_size {
            if st.moved_from.is_some() {
                bail!(
                    "service {}: the previous Maglev size change is not written yet",
                    spec.name
                );
            }
            let need = 2 * spec.maglev_size;
            let base = first_fit(&regions, need, capacity).with_context(|| {
                format!(
                    "Maglev map full: service {} needs {need} slots for maglev_size {}; restart \
                     to grow the map",
                    spec.name, spec.maglev_size
                )
            })?;
            st.moved_from = Some((st.svc.maglev_base, 2 * st.svc.maglev_size));
            // The kernel keeps reading the old region until apply() writes
            // the new `SERVICES` value; the halves start zeroed.
            let zeros = vec![0u32; spec.maglev_size as usize];
            for h in 0..2 {
                self.dp
                    .write_maglev_changes(base + h * spec.maglev_size, &zeros)?;
            }
            st.svc.maglev_base = base;
            st.svc.maglev_size = spec.maglev_size;
            st.svc.active_half = 0;
            st.retired_at = None;
        }
        st.svc.snat_port_lo = spec.snat_ports.0;
        st.svc.snat_port_hi = spec.snat_ports.1;
        if spec.snat_addr != st.spec.snat_addr {
            // Chosen again (or taken from the config) on the next apply.
            st.svc.snat_addr = spec.snat_addr.map(|a| addr_bytes(a).0).unwrap_or_default();
        }
        st.spec = spec.clone();
        Ok(())
    }

    /// Makes the data plane match `backends` (address -> data-plane state,
    /// `lb_common::BACKEND_*`) for service `name`. Backends missing from the
    /// list are removed; only `active` ones enter the Maglev table.
    pub fn apply(
        &mut self,
        name: &str,
        backends: &BTreeMap<SocketAddr, u8>,
    ) -> Result<ApplyReport> {
        let st = self
            .services
            .get_mut(name)
            .with_context(|| format!("unknown service {name}"))?;
        let id = st.svc.id;

        // Room for the new backends, checked before anything is written: a
        // service that does not fit keeps its last good table.
        let new = backends
            .keys()
            .filter(|a| !st.backends.contains_key(a))
            .count();
        // Departed backends free their indexes only after the flip, so they
        // do not count as room.
        let in_use = self.used_backends.len();
        let free = (self.backend_slots as usize).saturating_sub(in_use);
        if new > free {
            bail!(
                "no free backend slot: {new} new task(s) need slots, {free} of backend_slots = {} \
                 are free ({in_use} in use)",
                self.backend_slots
            );
        }

        // SNAT address: fixed, or what the kernel would use towards the
        // backends. Never an address from DNS: the source must be one of this
        // host's addresses, and it is chosen again only when it stops being one.
        if st.spec.snat_addr.is_none() {
            let family = family_of(st.spec.listen.ip());
            let current = ip_from_bytes(&st.svc.snat_addr, family);
            let keep = !current.is_unspecified() && self.host.contains(current);
            if !keep && !backends.is_empty() {
                let ip = choose_snat(backends.keys(), &self.host).with_context(|| {
                    format!("choosing the SNAT source address of service {name}")
                })?;
                let (bytes, family) = addr_bytes(ip);
                if current.is_unspecified() {
                    tracing::info!(service = name, snat = %ip, "SNAT source address chosen (route towards the backends)");
                } else {
                    tracing::warn!(service = name, snat = %ip, old = %current, "SNAT source address chosen again: the old one is no longer an address of this host");
                }
                self.dp.add_snat_addr(&AddrKey {
                    addr: bytes,
                    family,
                    _pad: [0; 3],
                })?;
                st.svc.snat_addr = bytes;
            }
        } else if let Some(ip) = st.spec.snat_addr {
            let (bytes, family) = addr_bytes(ip);
            self.dp.add_snat_addr(&AddrKey {
                addr: bytes,
                family,
                _pad: [0; 3],
            })?;
        }

        // Backend indexes: keep known ones, free the departed, allocate new.
        let departed: Vec<(SocketAddr, u32)> = st
            .backends
            .iter()
            .filter(|(a, _)| !backends.contains_key(a))
            .map(|(a, i)| (*a, *i))
            .collect();
        for (addr, _) in &departed {
            st.backends.remove(addr);
        }
        for addr in backends.keys() {
            if !st.backends.contains_key(addr) {
                let index = (1..=self.backend_slots)
                    .find(|i| !self.used_backends.contains_key(i))
                    .context("no free backend slot")?;
                self.used_backends.insert(index, id);
                st.backends.insert(*addr, index);
                self.dp.reset_backend_counters(index)?;
            }
        }
        // Order matters for packets in flight. Backends entering rotation are
        // written `active` before any table points at them; backends leaving
        // it are written `draining`/`down` only after the flip, or new flows
        // that still read the old table would find them refused (the data
        // plane probes only MAGLEV_PROBES slots) and be dropped.
        for (addr, state) in backends.iter().filter(|(_, s)| **s == BACKEND_ACTIVE) {
            write_backend(&mut self.dp, st, id, *addr, *state)?;
        }
        let members: Vec<MaglevBackend> = backends
            .iter()
            .filter(|(_, s)| **s == BACKEND_ACTIVE)
            .map(|(a, _)| MaglevBackend {
                key: a.to_string(),
                index: st.backends[a],
                weight: 1,
            })
            .collect();
        let table = maglev::build_table(&members, st.svc.maglev_size)?;
        let active = st.svc.active_half as usize & 1;
        let mut report = ApplyReport {
            active: members.len(),
            ..Default::default()
        };
        // Anything of the value the kernel has that differs (SNAT settings,
        // or a region moved by a Maglev size change) is written below.
        let snat_changed = {
            let pinned = self.dp.service(&st.spec.key())?;
            pinned.map(|p| p != st.svc).unwrap_or(true)
        };
        let size = st.svc.maglev_size;
        let live = self
            .dp
            .maglev_range(st.svc.maglev_base + active as u32 * size, size)?;
        if table != live {
            let inactive = 1 - active;
            if let Some(at) = st.retired_at {
                let wait = RETIRE_GRACE.saturating_sub(at.elapsed());
                if !wait.is_zero() && wait_for_running_programs().is_err() {
                    std::thread::sleep(wait);
                }
            }
            report.slots_written = self
                .dp
                .write_maglev_changes(st.svc.maglev_base + inactive as u32 * size, &table)?;
            st.svc.active_half = inactive as u32;
            report.flipped = true;
        }
        if report.flipped || snat_changed {
            self.dp.set_service(&st.spec.key(), &st.svc)?;
        }
        if report.flipped {
            st.retired_at = Some(std::time::Instant::now());
        }
        if st.moved_from.take().is_some() {
            // `SERVICES` points at the new region now; no table refers to the
            // old one, which is free (and zeroed before it is handed out).
            tracing::info!(
                service = name,
                maglev_size = st.svc.maglev_size,
                "Maglev table moved to a region of the new size"
            );
        }
        for (addr, state) in backends.iter().filter(|(_, s)| **s != BACKEND_ACTIVE) {
            write_backend(&mut self.dp, st, id, *addr, *state)?;
        }
        // Departed backends are cleared only after the flip: no table points
        // at them any more, and flows pinned to them re-pick.
        for (addr, index) in departed {
            self.dp.set_backend(index, &Backend::default())?;
            self.used_backends.remove(&index);
            st.written.remove(&addr);
        }
        Ok(report)
    }
}

/// Writes one BACKENDS entry if its state changed since the last write.
fn write_backend(
    dp: &mut DataPlane,
    st: &mut ServiceState,
    id: u32,
    addr: SocketAddr,
    state: u8,
) -> Result<()> {
    if st.written.get(&addr) == Some(&state) {
        return Ok(());
    }
    let (a, family) = addr_bytes(addr.ip());
    let b = Backend {
        addr: a,
        port_be: addr.port().to_be(),
        family,
        state,
        service: id,
    };
    dp.set_backend(st.backends[&addr], &b)?;
    st.written.insert(addr, state);
    Ok(())
}

/// Lowest base where `need` slots fit between the regions in use.
fn first_fit(regions: &[(u32, u32)], need: u32, capacity: u32) -> Option<u32> {
    let mut r: Vec<_> = regions.to_vec();
    r.sort();
    let mut base = 0u32;
    for (b, len) in r {
        if base + need <= b {
            return Some(base);
        }
        base = base.max(b + len);
    }
    (base.checked_add(need)? <= capacity).then_some(base)
}

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv6() {
        FAMILY_V6
    } else {
        FAMILY_V4
    }
}

/// The SNAT source for a service with `backends`: the source the kernel
/// would use towards the first backend that has a route, if that source is
/// an ordinary address of this host.
fn choose_snat<'a>(
    backends: impl Iterator<Item = &'a SocketAddr>,
    host: &HostAddrs,
) -> Result<IpAddr> {
    let mut why = Vec::new();
    for b in backends {
        match source_addr_towards(*b) {
            Ok(ip) if host.contains(ip) && !ip.is_loopback() => return Ok(ip),
            Ok(ip) => why.push(format!(
                "{b}: source {ip} is not a non-loopback host address"
            )),
            Err(e) => why.push(format!("{b}: {e:#}")),
        }
        if why.len() >= 3 {
            break;
        }
    }
    bail!(
        "no usable source address towards the backends ({})",
        why.join("; ")
    )
}

/// The source address the kernel would pick to reach `dst` (a connected UDP
/// socket sends nothing).
pub fn source_addr_towards(dst: SocketAddr) -> Result<IpAddr> {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(dst)
        .with_context(|| format!("no route towards backend {dst}"))?;
    let ip = s.local_addr()?.ip();
    if ip.is_unspecified() {
        bail!("no source address towards backend {dst}");
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_fills_gaps_and_respects_capacity() {
        assert_eq!(first_fit(&[], 10, 100), Some(0));
        assert_eq!(first_fit(&[(0, 10), (30, 10)], 20, 100), Some(10));
        assert_eq!(first_fit(&[(0, 10), (30, 10)], 21, 100), Some(40));
        assert_eq!(first_fit(&[(0, 90)], 20, 100), None);
    }

    #[test]
    fn addresses_round_trip_through_map_bytes() {
        for ip in ["10.0.1.7", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (b, f) = addr_bytes(ip);
            assert_eq!(ip_from_bytes(&b, f), ip);
        }
    }
}
