//! The data plane's rules for a packet of a flow, written once: whether a
//! flow's entry carries the packet on (`usable`) and which backend a new
//! flow gets (`pick`, Maglev with probing). The kernel (lb-ebpf
//! conntrack.rs) runs them over its maps; `xdplb explain` (lb-user
//! explain.rs) over the pinned maps, narrating each step from what they
//! report. tests/tests/differential.rs checks on random tables that the two
//! readers agree with each other.
//!
//! Written for the verifier as much as for people: every loop is bounded by
//! a constant, arithmetic wraps as BPF's does, and the kernel's lookups
//! cannot fail (`Lookups::Error` is `Infallible` there), so what it runs is
//! the plain code.

use core::ops::Deref;

use crate::{
    refused_within_hold, same_addr, Backend, Config, Conn, Service, BACKEND_ACTIVE,
    BACKEND_DRAINING, CONN_F_REVERSE, MAGLEV_PROBES, TCP_STATE_OPEN,
};

/// The map lookups the rules make.
pub trait Lookups {
    /// Why a lookup failed: a syscall's error in userspace; the kernel's
    /// lookups do not fail.
    type Error;
    /// A `BACKENDS` value: a reference into the map in the kernel, a copy
    /// ([`Owned`]) in userspace.
    type Backend: Deref<Target = Backend>;
    /// `MAGLEV[index]`, `None` past the end.
    fn maglev(&self, index: u32) -> Result<Option<u32>, Self::Error>;
    /// `BACKENDS[index]`, `None` past the end.
    fn backend(&self, index: u32) -> Result<Option<Self::Backend>, Self::Error>;
    /// `REFUSED[index]`: when the backend last refused a connection (0:
    /// never, or past the end).
    fn refused_at(&self, index: u32) -> Result<u64, Self::Error>;
}

/// A map value held by copy, for [`Lookups::Backend`] in userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owned<T>(pub T);

impl<T> Deref for Owned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Why a flow's forward entry does not carry the packet on (the flow is
/// then given up and picked again as a new one), in the order checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// A reverse entry under the packet's key.
    Reverse,
    /// The entry belongs to another service than the one the packet
    /// matches (`service` is the entry's).
    OtherService {
        service: u32,
    },
    Expired,
    /// A fresh SYN on a closing or reset connection: the client reuses its
    /// port for a new connection.
    SynOnClosed {
        state: u8,
    },
    /// The backend index is past `BACKENDS`.
    PastBackends,
    /// A fresh SYN while the backend drains: it keeps its flows but takes
    /// no new connection.
    Draining,
    /// The backend is neither active nor draining (`state`).
    NotActive {
        state: u8,
    },
    /// The backend slot now belongs to another service.
    BackendMoved {
        service: u32,
    },
    /// The backend slot now holds another address or port.
    BackendChanged,
    /// A fresh SYN, and the backend refused a connection within
    /// `REFUSED_HOLD_NS` (at `at`).
    Refused {
        at: u64,
    },
}

/// Can the forward entry `c`, found under the packet's key, carry the
/// packet on? Not when it is a reverse entry, belongs to another service,
/// has expired, or the packet is a fresh SYN on a closed one; and not when
/// its backend may not keep it: gone, neither active nor draining (a
/// draining backend keeps its flows, but a fresh SYN, always the start of a
/// connection, goes elsewhere), reused for another service or address, or
/// refusing connections lately (a fresh SYN only).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn usable<L: Lookups>(
    t: &L,
    c: &Conn,
    svc: &Service,
    cfg: &Config,
    proto: u8,
    fresh_syn: bool,
    now: u64,
) -> Result<Result<(), Unusable>, L::Error> {
    if c.flags & CONN_F_REVERSE != 0 {
        return Ok(Err(Unusable::Reverse));
    }
    if c.service != svc.id {
        return Ok(Err(Unusable::OtherService { service: c.service }));
    }
    if c.expired(proto, cfg, now) {
        return Ok(Err(Unusable::Expired));
    }
    if fresh_syn && c.tcp_state != TCP_STATE_OPEN {
        return Ok(Err(Unusable::SynOnClosed { state: c.tcp_state }));
    }
    let Some(b) = t.backend(c.backend)? else {
        return Ok(Err(Unusable::PastBackends));
    };
    if b.state == BACKEND_DRAINING && fresh_syn {
        return Ok(Err(Unusable::Draining));
    }
    if b.state != BACKEND_ACTIVE && b.state != BACKEND_DRAINING {
        return Ok(Err(Unusable::NotActive { state: b.state }));
    }
    if b.service != svc.id {
        return Ok(Err(Unusable::BackendMoved { service: b.service }));
    }
    if !same_addr(&b.addr, &c.new_dst) || b.port_be != c.new_dport_be {
        return Ok(Err(Unusable::BackendChanged));
    }
    if fresh_syn {
        let at = t.refused_at(c.backend)?;
        if refused_within_hold(at, now) {
            return Ok(Err(Unusable::Refused { at }));
        }
    }
    Ok(Ok(()))
}

/// What one Maglev probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The slot's index is past the end of `MAGLEV`.
    PastEnd,
    /// An empty slot (backend index 0).
    Empty,
    /// The backend index is past `BACKENDS`.
    PastBackends,
    /// The backend is not active (`state`).
    NotActive { state: u8 },
    /// The backend belongs to another service.
    OtherService { service: u32 },
    /// Active, but it refused a connection lately (at `at`): taken only if
    /// no probe finds better (the first such one).
    Refused { at: u64 },
    /// Active and not refusing: taken.
    Taken,
}

/// One probe, as [`pick`] reports it: the slot within the active half, the
/// `MAGLEV` index read, the backend index found there (0 when none), and
/// what it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probed {
    pub slot: u32,
    pub map_index: u32,
    pub backend: u32,
    pub found: Probe,
}

/// The active half's base index in `MAGLEV` and the first slot for `hash`.
/// u32 arithmetic wraps, as in BPF.
#[inline(always)]
pub fn maglev_start(svc: &Service, hash: u32) -> (u32, u32) {
    let size = svc.maglev_size;
    let base = svc
        .maglev_base
        .wrapping_add((svc.active_half & 1).wrapping_mul(size));
    let first = if size == 0 { 0 } else { hash % size };
    (base, first)
}

/// Maglev: the backend in the active half at `hash % size`, or in one of
/// the next `MAGLEV_PROBES - 1` slots (wrapping inside the half) if that one
/// is not `active` for this service. A backend that refused a connection
/// lately is passed over too, unless no probed slot offers anything better:
/// then the first such one is taken. `seen` is told each probe, in order
/// (the kernel passes a closure that does nothing). Returns the backend's
/// index and value, or None: no backend for a new flow.
#[inline(always)]
pub fn pick<L: Lookups>(
    t: &L,
    svc: &Service,
    hash: u32,
    now: u64,
    mut seen: impl FnMut(Probed, Option<&Backend>),
) -> Result<Option<(u32, L::Backend)>, L::Error> {
    let size = svc.maglev_size;
    if size == 0 {
        return Ok(None);
    }
    let (base, first) = maglev_start(svc, hash);
    let mut fallback: Option<(u32, L::Backend)> = None;
    let mut i = 0;
    while i < MAGLEV_PROBES {
        let mut slot = first.wrapping_add(i);
        if slot >= size {
            slot -= size;
        }
        let map_index = base.wrapping_add(slot);
        let mut p = Probed {
            slot,
            map_index,
            backend: 0,
            found: Probe::Empty,
        };
        match t.maglev(map_index)? {
            None => {
                p.found = Probe::PastEnd;
                seen(p, None);
            }
            Some(0) => seen(p, None),
            Some(index) => {
                p.backend = index;
                match t.backend(index)? {
                    None => {
                        p.found = Probe::PastBackends;
                        seen(p, None);
                    }
                    Some(b) => {
                        if b.state != BACKEND_ACTIVE {
                            p.found = Probe::NotActive { state: b.state };
                        } else if b.service != svc.id {
                            p.found = Probe::OtherService { service: b.service };
                        } else {
                            let at = t.refused_at(index)?;
                            if refused_within_hold(at, now) {
                                p.found = Probe::Refused { at };
                            } else {
                                p.found = Probe::Taken;
                            }
                        }
                        seen(p, Some(&b));
                        match p.found {
                            Probe::Taken => return Ok(Some((index, b))),
                            Probe::Refused { .. } if fallback.is_none() => {
                                fallback = Some((index, b));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        i += 1;
    }
    Ok(fallback)
}

/// The value of a lookup that cannot fail (the kernel's).
#[inline(always)]
pub fn infallible<T>(r: Result<T, core::convert::Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => match e {},
    }
}
