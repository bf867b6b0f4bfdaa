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
    is_zero_addr, refused_within_hold, same_addr, Backend, Config, Conn, FlowKey, Service,
    ServiceAt, ServiceKey, BACKEND_ACTIVE, BACKEND_DRAINING, CONN_F_REVERSE, MAGLEV_PROBES,
    SERVICE_AT_LIVE, SERVICE_AT_SHADOWED, TCP_STATE_OPEN,
};

/// How a packet's destination matched its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matched {
    /// The service's own address.
    Exact,
    /// The wildcard (all-zero address) of the port, protocol and family.
    Wildcard,
}

/// The service of a packet to `key` (its destination address and port,
/// protocol and family): the exact address first, then the wildcard, which
/// `key` then holds. `lookup` is `SERVICES[key]`.
#[inline(always)]
pub fn find_service<S, E>(
    key: &mut ServiceKey,
    mut lookup: impl FnMut(&ServiceKey) -> Result<Option<S>, E>,
) -> Result<Option<(S, Matched)>, E> {
    if let Some(s) = lookup(key)? {
        return Ok(Some((s, Matched::Exact)));
    }
    key.clear_addr();
    Ok(lookup(key)?.map(|s| (s, Matched::Wildcard)))
}

/// Does `exact`, an exact-address service, take packets that the wildcard
/// service `wildcard` would take otherwise? Only at one address, but
/// [`still_at`] does not know which: every flow of a shadowed wildcard
/// takes the `SERVICES` lookup.
pub fn shadows(exact: &ServiceKey, wildcard: &ServiceKey) -> bool {
    !is_zero_addr(&exact.addr)
        && is_zero_addr(&wildcard.addr)
        && exact.port_be == wildcard.port_be
        && exact.proto == wildcard.proto
        && exact.family == wildcard.family
}

/// The `SERVICE_AT` entry of the live service at `key`, among the services
/// at `all` (`key` itself may be among them).
pub fn service_at<'a>(
    key: &ServiceKey,
    all: impl IntoIterator<Item = &'a ServiceKey>,
) -> ServiceAt {
    let shadowed = all.into_iter().any(|other| shadows(other, key));
    ServiceAt {
        key: *key,
        flags: SERVICE_AT_LIVE | if shadowed { SERVICE_AT_SHADOWED } else { 0 },
    }
}

/// Is the service whose `SERVICE_AT` entry is `at` the one
/// [`find_service`] gives a packet of the flow `key`? Yes when the entry is
/// live and at the packet's address, port, protocol and family; or a
/// wildcard of its port, protocol and family that no exact-address service
/// shadows (the exact lookup would miss, the wildcard's would find it).
/// The established path's shortcut past the `SERVICES` lookup: `false`
/// is never wrong, only slower (the packet takes the lookup).
#[inline(always)]
pub fn still_at(at: &ServiceAt, key: &FlowKey) -> bool {
    if at.flags & SERVICE_AT_LIVE == 0
        || at.key.port_be != key.dport_be
        || at.key.proto != key.proto
        || at.key.family != key.family
    {
        return false;
    }
    same_addr(&at.key.addr, &key.dst)
        || (is_zero_addr(&at.key.addr) && at.flags & SERVICE_AT_SHADOWED == 0)
}

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
/// packet on (`service`: the id of the packet's service)? Not when it is
/// a reverse entry, belongs to another service, has expired, or the packet
/// is a fresh SYN on a closed one; and not when
/// its backend may not keep it: gone, neither active nor draining (a
/// draining backend keeps its flows, but a fresh SYN, always the start of a
/// connection, goes elsewhere), reused for another service or address, or
/// refusing connections lately (a fresh SYN only).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn usable<L: Lookups>(
    t: &L,
    c: &Conn,
    service: u32,
    cfg: &Config,
    proto: u8,
    fresh_syn: bool,
    now: u64,
) -> Result<Result<(), Unusable>, L::Error> {
    if c.flags & CONN_F_REVERSE != 0 {
        return Ok(Err(Unusable::Reverse));
    }
    if c.service != service {
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
    if b.service != service {
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

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{BACKEND_DOWN, CONN_F_UNANSWERED, PROTO_TCP, TCP_STATE_CLOSING};

    /// Tables as plain arrays: `maglev[i]`, `backends[i]`, `refused[i]`.
    struct Fake {
        maglev: Vec<u32>,
        backends: Vec<Backend>,
        refused: Vec<u64>,
    }

    impl Lookups for Fake {
        type Error = core::convert::Infallible;
        type Backend = Owned<Backend>;
        fn maglev(&self, i: u32) -> Result<Option<u32>, Self::Error> {
            Ok(self.maglev.get(i as usize).copied())
        }
        fn backend(&self, i: u32) -> Result<Option<Owned<Backend>>, Self::Error> {
            Ok(self.backends.get(i as usize).copied().map(Owned))
        }
        fn refused_at(&self, i: u32) -> Result<u64, Self::Error> {
            Ok(self.refused.get(i as usize).copied().unwrap_or(0))
        }
    }

    const NOW: u64 = 100 * 1_000_000_000;

    fn backend(n: u8, state: u8, service: u32) -> Backend {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[10, 1, 0, n]);
        Backend {
            addr,
            port_be: 8080u16.to_be(),
            family: crate::FAMILY_V4,
            state,
            service,
        }
    }

    /// Service 1 over a 5-slot table in half 1 (half 0 all empty); backends
    /// 1-4 of service 1, 5 of service 2.
    fn world(half1: [u32; 5]) -> (Fake, Service) {
        let mut maglev = std::vec![0; 5];
        maglev.extend_from_slice(&half1);
        let backends = std::vec![
            backend(0, BACKEND_ACTIVE, 0),
            backend(11, BACKEND_ACTIVE, 1),
            backend(12, BACKEND_ACTIVE, 1),
            backend(13, BACKEND_ACTIVE, 1),
            backend(14, BACKEND_ACTIVE, 1),
            backend(15, BACKEND_ACTIVE, 2),
        ];
        let svc = Service {
            id: 1,
            maglev_base: 0,
            maglev_size: 5,
            active_half: 1,
            ..Default::default()
        };
        let refused = std::vec![0; backends.len()];
        (
            Fake {
                maglev,
                backends,
                refused,
            },
            svc,
        )
    }

    fn probes(t: &Fake, svc: &Service, hash: u32) -> (Option<u32>, Vec<Probe>) {
        let mut seen = Vec::new();
        let r = infallible(pick(t, svc, hash, NOW, |p, _| seen.push(p.found)));
        (r.map(|(i, _)| i), seen)
    }

    #[test]
    fn pick_probes_inside_the_active_half_past_what_cannot_take_the_flow() {
        let (mut t, svc) = world([5, 0, 1, 2, 3]);
        t.backends[1].state = BACKEND_DOWN;
        // hash 8: slot 3 of 5 (backend 2), taken at once.
        assert_eq!(probes(&t, &svc, 8), (Some(2), std::vec![Probe::Taken]));
        // hash 5: slot 0, another service's backend; slot 1, empty; slot 2,
        // backend 1, down; slot 3, backend 2.
        let (got, seen) = probes(&t, &svc, 5);
        assert_eq!(got, Some(2));
        assert_eq!(
            seen,
            std::vec![
                Probe::OtherService { service: 2 },
                Probe::Empty,
                Probe::NotActive {
                    state: BACKEND_DOWN
                },
                Probe::Taken
            ]
        );
        // hash 4: slot 4 (backend 3), taken. Once it refused: slot 4
        // refused, then wrapping inside the half: slot 0 (other service),
        // 1 (empty), 2 (down), 3 (backend 2).
        assert_eq!(probes(&t, &svc, 4).0, Some(3));
        t.refused[3] = NOW - 1;
        let (got, seen) = probes(&t, &svc, 4);
        assert_eq!(got, Some(2));
        assert_eq!(seen[0], Probe::Refused { at: NOW - 1 });
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn pick_takes_the_first_refusing_backend_when_nothing_better_is_probed() {
        let (mut t, svc) = world([1, 2, 1, 2, 1]);
        t.refused[1] = NOW - 10;
        t.refused[2] = NOW - 20;
        let (got, seen) = probes(&t, &svc, 1);
        // Every probe refused: the first (slot 1, backend 2) is taken.
        assert_eq!(got, Some(2));
        assert_eq!(seen.len(), MAGLEV_PROBES as usize);
        // A refusal older than the hold no longer counts.
        t.refused[2] = NOW - crate::REFUSED_HOLD_NS - 1;
        assert_eq!(probes(&t, &svc, 1), (Some(2), std::vec![Probe::Taken]));
        // No table at all.
        let empty = Service {
            maglev_size: 0,
            ..svc
        };
        assert_eq!(probes(&t, &empty, 1), (None, Vec::new()));
    }

    #[test]
    fn the_exact_address_goes_before_the_wildcard() {
        let mut key = ServiceKey {
            addr: [10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: crate::FAMILY_V4,
        };
        let wildcard = ServiceKey {
            addr: [0; 16],
            ..key
        };
        let both = |k: &ServiceKey| Ok::<_, ()>(Some(if k.addr == [0; 16] { 2 } else { 1 }));
        assert_eq!(find_service(&mut key, both), Ok(Some((1, Matched::Exact))));
        let only_wildcard = |k: &ServiceKey| Ok::<_, ()>((k.addr == [0; 16]).then_some(2));
        let mut k = key;
        assert_eq!(
            find_service(&mut k, only_wildcard),
            Ok(Some((2, Matched::Wildcard)))
        );
        assert_eq!(k, wildcard, "the key names the wildcard it matched");
        let none = |_: &ServiceKey| Ok::<Option<u32>, ()>(None);
        assert_eq!(find_service(&mut key, none), Ok(None));
        let failing = |_: &ServiceKey| Err::<Option<u32>, _>("EPERM");
        assert_eq!(find_service(&mut key, failing), Err("EPERM"));
    }

    fn flow(backend: u32, t: &Fake) -> Conn {
        let b = t.backends[backend as usize];
        Conn {
            new_dst: b.addr,
            new_dport_be: b.port_be,
            backend,
            service: 1,
            last_seen_ns: NOW - 1_000_000_000,
            created_ns: NOW - 2_000_000_000,
            ..Default::default()
        }
    }

    fn check(t: &Fake, c: &Conn, svc: &Service, syn: bool) -> Result<(), Unusable> {
        infallible(usable(
            t,
            c,
            svc.id,
            &Config::with_defaults(),
            PROTO_TCP,
            syn,
            NOW,
        ))
    }

    /// Every set of services over two addresses and the wildcard, two
    /// ports and both protocols (4,096 sets), and every packet to those
    /// ports at those addresses and a third: the established path's
    /// shortcut (`still_at` on the flow's service) never names another
    /// service than the `SERVICES` lookup (`find_service`), and it is
    /// taken whenever that service is at the packet's own address or is an
    /// unshadowed wildcard.
    #[test]
    fn still_at_agrees_with_the_services_lookup() {
        use crate::{FAMILY_V4, PROTO_UDP};
        let addr = |last: u8| {
            let mut a = [0u8; 16];
            if last != 0 {
                a[..4].copy_from_slice(&[10, 0, 0, last]);
            }
            a
        };
        let mut keys = Vec::new();
        for a in [0, 1, 2] {
            for port in [80u16, 81] {
                for proto in [PROTO_TCP, PROTO_UDP] {
                    keys.push(ServiceKey {
                        addr: addr(a),
                        port_be: port.to_be(),
                        proto,
                        family: FAMILY_V4,
                    });
                }
            }
        }
        let (mut shortcuts, mut lookups) = (0u32, 0u32);
        for set in 0u32..1 << keys.len() {
            let live: Vec<(u32, ServiceKey)> = (0..keys.len())
                .filter(|i| set & 1 << i != 0)
                .map(|i| (i as u32 + 1, keys[i]))
                .collect();
            let all: Vec<ServiceKey> = live.iter().map(|(_, k)| *k).collect();
            let at: Vec<(u32, ServiceAt)> = live
                .iter()
                .map(|(id, k)| (*id, service_at(k, &all)))
                .collect();
            for dst in [1, 2, 3] {
                for port in [80u16, 81] {
                    for proto in [PROTO_TCP, PROTO_UDP] {
                        let flow = FlowKey {
                            dst: addr(dst),
                            dport_be: port.to_be(),
                            proto,
                            family: FAMILY_V4,
                            ..Default::default()
                        };
                        let mut skey = ServiceKey {
                            addr: flow.dst,
                            port_be: flow.dport_be,
                            proto,
                            family: FAMILY_V4,
                        };
                        let found = infallible(find_service(&mut skey, |k| {
                            Ok(live.iter().find(|(_, l)| l == k).map(|(id, _)| *id))
                        }));
                        for (id, entry) in &at {
                            let short = still_at(entry, &flow);
                            if short {
                                assert_eq!(found.map(|(s, _)| s), Some(*id), "{entry:?} {flow:?}");
                                shortcuts += 1;
                            }
                            let unshadowed = all.iter().all(|k| !shadows(k, &entry.key));
                            if found == Some((*id, Matched::Exact))
                                || (found == Some((*id, Matched::Wildcard)) && unshadowed)
                            {
                                assert!(short, "{entry:?} {flow:?}: the lookup was not needed");
                            }
                            if found.is_some_and(|(s, _)| s == *id) && !short {
                                lookups += 1;
                            }
                            let dead = ServiceAt { flags: 0, ..*entry };
                            assert!(!still_at(&dead, &flow));
                        }
                    }
                }
            }
        }
        // Both ways are taken: the shortcut, and the lookup (a wildcard
        // with an exact service on its port).
        assert!(
            shortcuts > 10_000 && lookups > 1_000,
            "{shortcuts} {lookups}"
        );
    }

    #[test]
    fn usable_keeps_a_flow_on_its_backend_until_a_rule_gives_it_up() {
        let (mut t, svc) = world([1, 2, 3, 4, 1]);
        let c = flow(2, &t);
        assert_eq!(check(&t, &c, &svc, false), Ok(()));
        assert_eq!(check(&t, &c, &svc, true), Ok(()));
        // Draining: the flow stays, a fresh SYN does not.
        t.backends[2].state = BACKEND_DRAINING;
        assert_eq!(check(&t, &c, &svc, false), Ok(()));
        assert_eq!(check(&t, &c, &svc, true), Err(Unusable::Draining));
        t.backends[2].state = BACKEND_DOWN;
        assert_eq!(
            check(&t, &c, &svc, false),
            Err(Unusable::NotActive {
                state: BACKEND_DOWN
            })
        );
        t.backends[2].state = BACKEND_ACTIVE;
        // A refusal turns fresh SYNs away only.
        t.refused[2] = NOW - 5;
        assert_eq!(check(&t, &c, &svc, false), Ok(()));
        assert_eq!(
            check(&t, &c, &svc, true),
            Err(Unusable::Refused { at: NOW - 5 })
        );
        t.refused[2] = 0;
        // The slot reused for another address, or another service.
        t.backends[2].addr[3] = 99;
        assert_eq!(check(&t, &c, &svc, false), Err(Unusable::BackendChanged));
        t.backends[2].addr[3] = 12;
        t.backends[2].service = 2;
        assert_eq!(
            check(&t, &c, &svc, false),
            Err(Unusable::BackendMoved { service: 2 })
        );
        t.backends[2].service = 1;
        // The entry itself.
        let mut closing = c;
        closing.tcp_state = TCP_STATE_CLOSING;
        assert_eq!(check(&t, &closing, &svc, false), Ok(()));
        assert_eq!(
            check(&t, &closing, &svc, true),
            Err(Unusable::SynOnClosed {
                state: TCP_STATE_CLOSING
            })
        );
        let mut old = c;
        old.flags = CONN_F_UNANSWERED;
        old.last_seen_ns = NOW - crate::DEFAULT_UNANSWERED_TIMEOUT_NS - 1;
        assert_eq!(check(&t, &old, &svc, false), Err(Unusable::Expired));
        let mut reverse = c;
        reverse.flags = CONN_F_REVERSE;
        assert_eq!(check(&t, &reverse, &svc, false), Err(Unusable::Reverse));
        let mut other = c;
        other.service = 2;
        assert_eq!(
            check(&t, &other, &svc, false),
            Err(Unusable::OtherService { service: 2 })
        );
        let mut gone = c;
        gone.backend = 40;
        assert_eq!(check(&t, &gone, &svc, false), Err(Unusable::PastBackends));
    }
}
