//! The connection table: forward and reverse entries, expiry, backend choice
//! for new flows (Maglev) and SNAT port allocation.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use lb_common::{
    hash::flow_hash, reason, refused_within_hold, Backend, Config, Conn, FlowKey, Service,
    BACKEND_ACTIVE, BACKEND_DRAINING, CONN_F_REPLIED, CONN_F_REVERSE, MAGLEV_PROBES, SNAT_PROBES,
    TCP_STATE_CLOSING, TCP_STATE_OPEN,
};

use crate::{
    core::Out,
    maps::{new_flow_slot, NewFlow, Scratch, BACKENDS, CONNS, MAGLEV, REFUSED},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn state_after(old: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        TCP_STATE_CLOSING
    } else {
        old
    }
}

/// Writes into `out` the key that packets of the flow of `c` carry when
/// travelling the other way (for a forward entry: the reply key; for a
/// reverse entry: the client's key).
#[inline(always)]
fn mirror_key(c: &Conn, proto: u8, family: u8, out: &mut FlowKey) {
    out.src = c.new_dst;
    out.dst = c.new_src;
    out.sport_be = c.new_dport_be;
    out.dport_be = c.new_sport_be;
    out.proto = proto;
    out.family = family;
    out._pad = [0; 2];
}

/// Reply path: the reverse entry for `s.key`, refreshed.
///
/// A RST from the backend also closes the forward entry. Otherwise a flow
/// the backend refused (a connection to a task whose server has stopped)
/// would keep an open forward entry: refused connections leave no TIME_WAIT
/// on the client, which soon reuses the port, and its next SYN must be
/// balanced afresh, not sent back to the task that refused it.
#[inline(always)]
pub fn reply(s: &mut Scratch, tcp_flags: u8) -> Option<&'static Conn> {
    let p = CONNS.get_ptr_mut(&s.key)?;
    // SAFETY: the pointer comes from a successful map lookup; concurrent
    // updates of these plain fields can at worst lose a timestamp refresh.
    let c = unsafe { &mut *p };
    if c.flags & CONN_F_REVERSE == 0 {
        return None;
    }
    let now = now();
    c.last_seen_ns = now;
    c.tcp_state = state_after(c.tcp_state, tcp_flags);
    if tcp_flags & TCP_RST == 0 {
        if c.flags & CONN_F_REPLIED == 0 {
            c.flags |= CONN_F_REPLIED;
        }
    } else {
        if c.flags & CONN_F_REPLIED == 0 {
            // The backend refused the connection: new flows avoid it for a
            // while (see `pick`).
            if let Some(p) = REFUSED.get_ptr_mut(c.backend) {
                // SAFETY: an array slot; a plain store, racing ones agree.
                unsafe { *p = now };
            }
        }
        mirror_key(c, s.key.proto, s.key.family, &mut s.key2);
        if let Some(f) = CONNS.get_ptr_mut(&s.key2) {
            // SAFETY: as above; one byte written.
            let f = unsafe { &mut *f };
            if f.flags & CONN_F_REVERSE == 0
                && f.new_sport_be == s.key.dport_be
                && f.new_dst == s.key.src
            {
                f.tcp_state = TCP_STATE_CLOSING;
            }
        }
    }
    Some(c)
}

/// Is the backend of an existing flow still usable for it? A `draining`
/// backend keeps its flows but takes no new connection: a SYN without ACK
/// (`fresh_syn`) is always the start of one, since a client never sends it
/// on an established connection. Re-picking a retransmitted SYN is harmless:
/// the client has no connection yet.
#[inline(always)]
fn keeps_flow(c: &Conn, svc: &Service, fresh_syn: bool, now: u64) -> bool {
    match BACKENDS.get(c.backend) {
        Some(b) => {
            (b.state == BACKEND_ACTIVE || (b.state == BACKEND_DRAINING && !fresh_syn))
                && b.service == svc.id
                && b.addr == c.new_dst
                && b.port_be == c.new_dport_be
                && !(fresh_syn && refused_recently(c.backend, now))
        }
        None => false,
    }
}

/// Did the backend refuse a connection less than `REFUSED_HOLD_NS` ago?
#[inline(always)]
fn refused_recently(index: u32, now: u64) -> bool {
    match REFUSED.get(index) {
        Some(&at) => refused_within_hold(at, now),
        None => false,
    }
}

/// Forward path: the entry for `s.key`, created if needed, and whether it is
/// new. `Err` is the verdict for a packet that cannot be forwarded.
#[inline(always)]
pub fn forward(
    s: &mut Scratch,
    svc: &Service,
    cfg: &Config,
    tcp_flags: u8,
) -> Result<(&'static Conn, bool), Out> {
    if let Some(p) = CONNS.get_ptr_mut(&s.key) {
        // SAFETY: the pointer comes from a successful map lookup; see `reply`.
        let c = unsafe { &mut *p };
        let now = now();
        let fresh_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let reusable = c.flags & CONN_F_REVERSE == 0
            && c.service == svc.id
            && !c.expired(s.key.proto, cfg, now)
            && !(fresh_syn && c.tcp_state == TCP_STATE_CLOSING);
        if reusable && keeps_flow(c, svc, fresh_syn, now) {
            c.last_seen_ns = now;
            c.tcp_state = state_after(c.tcp_state, tcp_flags);
            return Ok((c, false));
        }
        // Expired, a reused 5-tuple, or its backend is down/gone: drop the
        // old port reservation, then pick again as a new flow.
        if c.flags & CONN_F_REVERSE == 0 {
            mirror_key(c, s.key.proto, s.key.family, &mut s.key2);
            let _ = CONNS.remove(&s.key2);
        }
    }
    match new_flow(s, svc, cfg, tcp_flags) {
        0 => {
            let nf = new_flow_slot().ok_or(Out::drop(reason::DROP_CONN_INSERT))?;
            Ok((&nf.fwd, true))
        }
        drop_reason => Err(Out::drop(drop_reason)),
    }
}

/// Creates both entries of a new flow for `s.key`; the forward entry is left
/// in `NEW_FLOW.fwd`. Returns 0, or the drop reason.
///
/// Out of line (a BPF subprogram with its own stack frame) so only new flows
/// pay for it. BPF passes at most five arguments, all in registers, hence the
/// plain return code.
#[inline(never)]
fn new_flow(s: &mut Scratch, svc: &Service, cfg: &Config, tcp_flags: u8) -> u32 {
    let Some(nf) = new_flow_slot() else {
        return reason::DROP_CONN_INSERT;
    };
    let now = now();
    let hash = flow_hash(&s.key);
    let Some((index, backend)) = pick(svc, hash, now) else {
        return reason::DROP_NO_BACKEND;
    };
    let Some(port_be) = snat_port(s, nf, svc, cfg, index, backend, hash, now) else {
        return reason::DROP_SNAT_EXHAUSTED;
    };
    nf.fwd = Conn {
        new_src: svc.snat_addr,
        new_dst: backend.addr,
        new_sport_be: port_be,
        new_dport_be: backend.port_be,
        backend: index,
        service: svc.id,
        flags: 0,
        tcp_state: state_after(TCP_STATE_OPEN, tcp_flags),
        _pad: [0; 2],
        last_seen_ns: now,
        created_ns: now,
    };
    if CONNS.insert(&s.key, &nf.fwd, 0).is_err() {
        // `s.key2` still holds the reverse key reserved by `snat_port`.
        let _ = CONNS.remove(&s.key2);
        return reason::DROP_CONN_INSERT;
    }
    0
}

/// Maglev: the backend in the active half at `hash % size`, or one of the
/// next `MAGLEV_PROBES - 1` slots if that one is not `active` any more. A
/// backend that refused a connection lately is passed over too, unless no
/// probed slot offers anything better.
#[inline(always)]
fn pick(svc: &Service, hash: u32, now: u64) -> Option<(u32, &'static Backend)> {
    let size = svc.maglev_size;
    if size == 0 {
        return None;
    }
    let base = svc.maglev_base + (svc.active_half & 1) * size;
    let first = hash % size;
    let mut fallback = None;
    let mut i = 0;
    while i < MAGLEV_PROBES {
        let mut slot = first + i;
        if slot >= size {
            slot -= size;
        }
        if let Some(&index) = MAGLEV.get(base + slot) {
            if index != 0 {
                if let Some(b) = BACKENDS.get(index) {
                    if b.state == BACKEND_ACTIVE && b.service == svc.id {
                        if !refused_recently(index, now) {
                            return Some((index, b));
                        }
                        if fallback.is_none() {
                            fallback = Some((index, b));
                        }
                    }
                }
            }
        }
        i += 1;
    }
    fallback
}

/// Reserves a SNAT port by inserting the reverse entry (`s.key2` ->
/// `nf.rev`). Returns the port in network byte order.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; a struct would cost BPF stack"
)]
fn snat_port(
    s: &mut Scratch,
    nf: &mut NewFlow,
    svc: &Service,
    cfg: &Config,
    index: u32,
    backend: &Backend,
    hash: u32,
    now: u64,
) -> Option<u16> {
    let lo = svc.snat_port_lo as u32;
    let hi = svc.snat_port_hi as u32;
    if hi < lo || lo == 0 {
        return None;
    }
    let range = hi - lo + 1;
    let first = hash % range;
    // Double hashing: the first port depends only on the flow (a flow whose
    // entries were evicted gets the same port back), the stride on other
    // bits of the hash. Linear probing would grow runs of taken ports that
    // turn into false exhaustion long before the range is full. The stride
    // is a prime, so it is coprime with the range unless it divides it, and
    // the SNAT_PROBES probes land on distinct ports. Ranges of at most
    // SNAT_PROBES ports are walked one by one: exhaustive and exact.
    let prime = match (hash >> 16) & 7 {
        0 => 7919,
        1 => 7927,
        2 => 7933,
        3 => 7937,
        4 => 7949,
        5 => 7951,
        6 => 7963,
        _ => 7993,
    };
    let stride = if range <= SNAT_PROBES || range.is_multiple_of(prime) {
        1
    } else {
        prime % range
    };
    nf.rev = Conn {
        new_src: s.key.dst,
        new_dst: s.key.src,
        new_sport_be: s.key.dport_be,
        new_dport_be: s.key.sport_be,
        backend: index,
        service: svc.id,
        flags: CONN_F_REVERSE,
        tcp_state: TCP_STATE_OPEN,
        _pad: [0; 2],
        last_seen_ns: now,
        created_ns: now,
    };
    s.key2 = FlowKey {
        src: backend.addr,
        dst: svc.snat_addr,
        sport_be: backend.port_be,
        dport_be: 0,
        proto: s.key.proto,
        family: s.key.family,
        _pad: [0; 2],
    };
    let mut i = 0;
    while i < SNAT_PROBES && i < range {
        // `first + i * stride` < 32 * 65536: no overflow.
        let off = (first + i * stride) % range;
        let port_be = ((lo + off) as u16).to_be();
        s.key2.dport_be = port_be;
        if CONNS.insert(&s.key2, &nf.rev, BPF_NOEXIST as u64).is_ok() {
            return Some(port_be);
        }
        if reservation_is_stale(s, cfg, now) && CONNS.insert(&s.key2, &nf.rev, 0).is_ok() {
            return Some(port_be);
        }
        i += 1;
    }
    None
}

/// The reverse entry at `s.key2` is stale when its forward entry is gone,
/// expired, or now points elsewhere, or when it belongs to `s.key` itself
/// (the flow being picked again).
#[inline(always)]
fn reservation_is_stale(s: &mut Scratch, cfg: &Config, now: u64) -> bool {
    // SAFETY: read-only use of a map value pointer (RCU-protected).
    let Some(rev) = (unsafe { CONNS.get(&s.key2) }) else {
        return true;
    };
    mirror_key(rev, s.key2.proto, s.key2.family, &mut s.key3);
    if s.key3 == s.key {
        return true;
    }
    // SAFETY: read-only use of a map value pointer (RCU-protected).
    match unsafe { CONNS.get(&s.key3) } {
        Some(f) => {
            f.flags & CONN_F_REVERSE != 0
                || f.new_sport_be != s.key2.dport_be
                || f.new_dst != s.key2.src
                || f.expired(s.key2.proto, cfg, now)
        }
        None => true,
    }
}
