//! The connection table: forward and reverse entries in two LRU tables
//! (`UNANSWERED` until the backend has accepted the flow, then `CONNS`),
//! expiry, backend choice for new flows (Maglev), SNAT port allocation, and
//! the flood guard.
//!
//! Entries are copied into the scratch (`s.conn`, `s.other`, `s.peek`) right
//! after their lookup: an LRU element can be recycled for another flow as
//! soon as it is evicted (no RCU grace period), so no reference into one
//! outlives the next helper call. Writes go through the lookup's pointer
//! before any other helper call.

use ::core::{
    convert::Infallible,
    ptr::{read_volatile, write_volatile},
};
use aya_ebpf::{bindings::BPF_NOEXIST, maps::LruHashMap};
use lb_common::{
    decide::{self, infallible, Lookups},
    event, forward_establishes,
    hash::flow_hash,
    is_fresh_syn, reason, reply_establishes, same_addr, syn_stamp, syn_stamp_age, tcp_state_after,
    Backend, Config, Conn, FlowKey, Service, CONN_F_REPLIED, CONN_F_REVERSE, CONN_F_SYN,
    CONN_F_SYNACK, CONN_F_UNANSWERED, FLOOD_WINDOW_NS, PROTO_TCP, SNAT_PROBES, SOURCE_VOUCHED_NS,
    SYN_PENDING_SLOTS, SYN_RETRY_MAX_NS, SYN_RETRY_MIN_NS, SYN_SOURCE_SLOTS, TCP_STATE_OPEN,
    TCP_STATE_RESET,
};

use crate::{
    clock::now,
    ctx::Packet,
    fwd,
    maps::{
        BACKENDS, CONNS, FLOOD_UNTIL, MAGLEV, REFUSED, SERVICE_AT, SYN_PENDING, SYN_SOURCES,
        UNANSWERED,
    },
    note,
    out::{stop_after, Out},
    parse::{TCP_ACK, TCP_RST, TCP_SYN},
    scratch::{Probe, Scratch},
    stats,
};

type Table = LruHashMap<FlowKey, Conn>;

/// Copies a connection entry eight bytes at a time. A plain `*dst = *src`
/// of the 72-byte `Conn` compiles to a call to a byte-by-byte `memcpy` on
/// BPF (LLVM inlines copies of up to 64 bytes only): about 600 instructions
/// per copy instead of 18. Volatile, so LLVM does not turn the loop back
/// into that call.
///
/// # Safety
///
/// `src` points to a whole `Conn`, readable (a map value from a successful
/// lookup, read at once: see the module).
#[inline(always)]
pub unsafe fn copy_conn(dst: &mut Conn, src: *const Conn) {
    const WORDS: usize = size_of::<Conn>() / 8;
    let s = src as *const u64;
    let d = dst as *mut Conn as *mut u64;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: both point to a whole `Conn` (8-byte aligned, its size a
        // multiple of 8): `dst` a reference, `src` by the caller's promise.
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        i += 1;
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

/// Reply path: copies the reverse entry for `s.key` into `s.conn` and
/// updates the flow. `Err`: drop (no flow holds this SNAT port, or the
/// packet came in on another interface than the flow's backend side, see
/// `backend_side`).
///
/// - A RST from the backend resets the forward entry too (an established
///   flow keeps its entries for `unanswered_timeout`, refreshed by any
///   packet), or frees an unanswered flow at once. A RST before any other
///   answer to a client's SYN is a refusal (see `pick`).
/// - An unanswered TCP flow records the backend's SYN-ACK and is
///   established by the backend's first segment without SYN or RST.
#[inline(always)]
pub fn reply<C: Packet>(ctx: &mut C, s: &mut Scratch, flags: u8) -> Result<(), Out> {
    let now = now();
    let ingress = ctx.ingress_ifindex();
    if let Some(p) = CONNS.get_ptr_mut(&s.key) {
        // SAFETY: a successful lookup's pointer, read at once (see the module).
        unsafe { copy_conn(&mut s.conn, p) };
        is_reverse(&s.conn)?;
        let p = if s.conn.ifindex == ingress {
            p
        } else {
            backend_side(ctx, s, &CONNS, ingress)?
        };
        let state = tcp_state_after(s.conn.tcp_state, flags);
        // SAFETY: the same pointer, no helper call since the lookup; plain
        // stores (a racing CPU can at worst lose a refresh).
        unsafe {
            (*p).last_seen_ns = now;
            if state != s.conn.tcp_state {
                (*p).tcp_state = state;
            }
        }
        if state == TCP_STATE_RESET && s.conn.tcp_state != TCP_STATE_RESET {
            mirror_key(&s.conn, s.key.proto, s.key.family, &mut s.key2);
            reset_forward(s);
        }
        return Ok(());
    }
    let Some(p) = UNANSWERED.get_ptr_mut(&s.key) else {
        return Err(Out::drop(reason::DROP_REPLY_NO_CONN));
    };
    // SAFETY: as above.
    unsafe { copy_conn(&mut s.conn, p) };
    is_reverse(&s.conn)?;
    let p = if s.conn.ifindex == ingress {
        p
    } else {
        backend_side(ctx, s, &UNANSWERED, ingress)?
    };
    let rst = flags & TCP_RST != 0;
    if !rst {
        s.conn.last_seen_ns = now;
        s.conn.flags |= CONN_F_REPLIED;
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            s.conn.flags |= CONN_F_SYNACK;
            s.conn.seq = s.seg.seq;
        }
        // SAFETY: as above.
        unsafe {
            (*p).last_seen_ns = now;
            (*p).flags = s.conn.flags;
            (*p).seq = s.conn.seq;
        }
    }
    mirror_key(&s.conn, s.key.proto, s.key.family, &mut s.key2);
    if rst {
        if s.conn.flags & (CONN_F_SYN | CONN_F_REPLIED) == CONN_F_SYN {
            // The backend refused a client's SYN: new flows avoid it for a
            // while (see `pick`).
            if let Some(r) = REFUSED.get_ptr_mut(s.conn.backend) {
                // SAFETY: an array slot; a plain store, racing ones agree.
                unsafe { *r = now };
            }
        }
        // No TIME_WAIT follows a RST: the port is free at once.
        let _ = UNANSWERED.remove(&s.key);
        remove_forward_if_ours(&UNANSWERED, s);
        stats::event(event::RST_FREED);
    } else if reply_establishes(s.key.proto, flags) {
        // SAFETY: read-only, copied at once.
        if let Some(f) = unsafe { UNANSWERED.get(&s.key2) } {
            // SAFETY: a whole entry from the lookup just made.
            unsafe { copy_conn(&mut s.other, f) };
            if forward_is_ours(s) {
                s.other.last_seen_ns = now;
                promote(s);
            }
        }
    }
    Ok(())
}

/// Is `c`, found under a reply's key, a reverse entry?
#[inline(always)]
fn is_reverse(c: &Conn) -> Result<(), Out> {
    if c.flags & CONN_F_REVERSE == 0 {
        return Err(Out::drop(reason::DROP_REPLY_NO_CONN));
    }
    Ok(())
}

/// A reply that arrived on another interface than its flow's backend side
/// (`s.conn.ifindex`) is accepted only if the backend is now reached by
/// the interface it came in by (`fwd::comes_from`: an interface re-created,
/// a route moved); the flow is then bound to it. Returns a fresh pointer to
/// the entry (the route lookup was a helper call), or the drop.
#[inline(always)]
fn backend_side<C: Packet>(
    ctx: &mut C,
    s: &mut Scratch,
    t: &Table,
    ingress: u32,
) -> Result<*mut Conn, Out> {
    let wrong = Out::drop(reason::DROP_REPLY_WRONG_IFACE);
    s.peek.new_src = s.key.dst;
    s.peek.new_dst = s.key.src;
    if !fwd::comes_from(ctx, &s.l3, &mut s.fib, &s.peek) {
        return Err(wrong);
    }
    let p = t.get_ptr_mut(&s.key).ok_or(wrong)?;
    // SAFETY: a successful lookup's pointer, written at once.
    unsafe { (*p).ifindex = ingress };
    s.conn.ifindex = ingress;
    Ok(p)
}

/// Does `s.other`, found under `s.key2` (the mirror of the reverse entry
/// `s.key`), still send its packets from the SNAT port `s.key` is about?
#[inline(always)]
fn forward_is_ours(s: &Scratch) -> bool {
    s.other.flags & CONN_F_REVERSE == 0
        && s.other.new_sport_be == s.key.dport_be
        && same_addr(&s.other.new_dst, &s.key.src)
}

/// Removes the forward entry `s.key2` from `t` if it still belongs to the
/// reverse entry `s.key`.
#[inline(always)]
fn remove_forward_if_ours(t: &Table, s: &mut Scratch) {
    // SAFETY: read-only, copied at once.
    if let Some(f) = unsafe { t.get(&s.key2) } {
        // SAFETY: a whole entry from the lookup just made.
        unsafe { copy_conn(&mut s.other, f) };
        if forward_is_ours(s) {
            // The only error (-ENOENT: gone already) leaves it gone too.
            let _ = t.remove(&s.key2);
        }
    }
}

/// Marks the established forward entry `s.key2` reset, if it belongs to
/// the reverse entry `s.key`.
#[inline(always)]
fn reset_forward(s: &mut Scratch) {
    if let Some(p) = CONNS.get_ptr_mut(&s.key2) {
        // SAFETY: a successful lookup's pointer, read at once.
        unsafe { copy_conn(&mut s.other, p) };
        if forward_is_ours(s) {
            // SAFETY: the same pointer, no helper call since the lookup.
            unsafe { (*p).tcp_state = TCP_STATE_RESET };
        }
    }
}

/// Moves a flow from `UNANSWERED` to `CONNS`: `s.conn` (at `s.key`) and
/// `s.other` (at `s.key2`) are its two entries. The new entries go in before
/// the old ones go, so a packet always finds one of them. Out of line: only
/// once per flow.
#[inline(never)]
fn promote(s: &mut Scratch) {
    s.conn.flags &= !CONN_F_UNANSWERED;
    s.other.flags &= !CONN_F_UNANSWERED;
    if CONNS.insert(&s.key2, &s.other, 0).is_err() {
        return;
    }
    if CONNS.insert(&s.key, &s.conn, 0).is_err() {
        let _ = CONNS.remove(&s.key2);
        return;
    }
    let _ = UNANSWERED.remove(&s.key);
    let _ = UNANSWERED.remove(&s.key2);
    stats::event(event::ESTABLISHED);
}

/// The data plane's maps, as the shared rules (`lb_common::decide`) read
/// them.
struct Maps;

impl Lookups for Maps {
    type Error = Infallible;
    type Backend = &'static Backend;
    #[inline(always)]
    fn maglev(&self, index: u32) -> Result<Option<u32>, Infallible> {
        Ok(MAGLEV.get(index).copied())
    }
    #[inline(always)]
    fn backend(&self, index: u32) -> Result<Option<&'static Backend>, Infallible> {
        Ok(BACKENDS.get(index))
    }
    #[inline(always)]
    fn refused_at(&self, index: u32) -> Result<u64, Infallible> {
        Ok(REFUSED.get(index).copied().unwrap_or(0))
    }
}

/// Can the forward entry `c` carry this packet of the service `service`
/// on (`decide::usable`)?
#[inline(always)]
fn usable(c: &Conn, service: u32, cfg: &Config, proto: u8, fresh_syn: bool, now: u64) -> bool {
    infallible(decide::usable(
        &Maps, c, service, cfg, proto, fresh_syn, now,
    ))
    .is_ok()
}

/// What [`established`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fast {
    /// The flow carries the packet on: `s.conn` holds its forward entry,
    /// refreshed; the packet is still to be routed.
    Hit,
    /// `CONNS` has no entry for the packet: [`forward`] need not look again.
    Miss,
    /// An entry the shortcut does not decide on (its service may have
    /// moved, or the flow may not carry the packet on), a packet whose TTL
    /// runs out, or a fresh SYN: the full path decides, from the
    /// `SERVICES` lookup on.
    Unsure,
}

/// The established path's shortcut: the packet's `CONNS` entry, and its
/// service through the id the entry holds (`SERVICE_AT`, an array slot)
/// instead of the `SERVICES` hash lookup, where `decide::still_at` says
/// that lookup would find the same service. Then what [`forward`] does
/// with an entry it can use: refresh it and follow the TCP state.
///
/// A fresh SYN starts a flow far more often than it belongs to one, so it
/// takes the whole path at once: looked up here first, a new flow's SYN
/// cost 12-36% more (bench-ab, two runs).
#[inline(always)]
pub fn established(s: &mut Scratch, cfg: &Config, flags: u8) -> Fast {
    let proto = s.key.proto;
    if s.l3.ttl <= 1 || (proto == PROTO_TCP && is_fresh_syn(flags)) {
        return Fast::Unsure;
    }
    let now = now();
    let Some(p) = CONNS.get_ptr_mut(&s.key) else {
        return Fast::Miss;
    };
    // SAFETY: a successful lookup's pointer, read at once (see the module).
    unsafe { copy_conn(&mut s.conn, p) };
    let Some(at) = SERVICE_AT.get(s.conn.service) else {
        return Fast::Unsure;
    };
    // Not a fresh SYN (above).
    let fresh_syn = false;
    if !decide::still_at(at, &s.key) || !usable(&s.conn, s.conn.service, cfg, proto, fresh_syn, now)
    {
        return Fast::Unsure;
    }
    // SAFETY: the same pointer; array lookups only since (no helper call).
    // A plain store, as in `forward`.
    unsafe { (*p).last_seen_ns = now };
    follow_state(s, flags);
    Fast::Hit
}

/// The flow in `s.conn` (at `s.key` in `CONNS`) carries a packet with TCP
/// `flags` on: a FIN or RST moves its state, and a RST its reverse entry's.
#[inline(always)]
fn follow_state(s: &mut Scratch, flags: u8) {
    let state = tcp_state_after(s.conn.tcp_state, flags);
    if state != s.conn.tcp_state {
        // FIN or RST: rare enough for a second lookup.
        set_state(&CONNS, &s.key, state);
        s.conn.tcp_state = state;
        if state == TCP_STATE_RESET {
            reset_reverse(s);
        }
    }
}

/// Forward path: copies the entry for `s.key` into `s.conn`, creating the
/// flow if needed. `Ok(true)`: a new flow, already routed (`s.fib`);
/// `Ok(false)`: an existing one, still to be routed. `Err`: the verdict for
/// a packet that cannot be forwarded; a new flow then leaves no state.
/// `in_conns`: `CONNS` may hold the flow (false: [`established`] just
/// missed there).
#[inline(always)]
pub fn forward<C: Packet>(
    ctx: &mut C,
    s: &mut Scratch,
    svc: &Service,
    cfg: &Config,
    flags: u8,
    in_conns: bool,
) -> Result<bool, Out> {
    let now = now();
    // For `choose`, read back from the scratch: a register would carry what
    // the branches below learned about it into the new-flow code, and the
    // verifier would walk that code once per variant.
    s.flags = flags;
    let proto = s.key.proto;
    let fresh_syn = proto == PROTO_TCP && is_fresh_syn(flags);
    let mut found = false;
    let conns = if in_conns {
        CONNS.get_ptr_mut(&s.key)
    } else {
        None
    };
    if let Some(p) = conns {
        // SAFETY: a successful lookup's pointer, read and refreshed at once
        // (see the module); plain stores, a racing CPU can at worst lose a
        // refresh. An entry about to be released gets one it won't need.
        unsafe { copy_conn(&mut s.conn, p) };
        // SAFETY: as above.
        unsafe { (*p).last_seen_ns = now };
        if usable(&s.conn, svc.id, cfg, proto, fresh_syn, now) {
            follow_state(s, flags);
            return Ok(false);
        }
        // Expired, a reused 5-tuple, or its backend is down or gone: give
        // up the flow's port and entries, then pick again as a new flow.
        release(&CONNS, s);
        found = true;
    } else if let Some(p) = UNANSWERED.get_ptr_mut(&s.key) {
        // SAFETY: as above.
        unsafe { copy_conn(&mut s.conn, p) };
        // SAFETY: as above.
        unsafe { (*p).last_seen_ns = now };
        if usable(&s.conn, svc.id, cfg, proto, fresh_syn, now) {
            if flags & TCP_RST != 0 {
                // The client gave up: no TIME_WAIT follows, free the port.
                release(&UNANSWERED, s);
                stats::event(event::RST_FREED);
            } else if proto != PROTO_TCP || flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK {
                establish_forward(s, cfg, flags, now);
            }
            return Ok(false);
        }
        if s.conn.expired(proto, cfg, now) {
            stats::event(event::UNANSWERED_EXPIRED);
        }
        release(&UNANSWERED, s);
        found = true;
    }
    let local = s.flood.count(now, cfg.flood_new_flows_per_cpu);
    note::flood(s, local, cfg.flood_new_flows_per_cpu, now);
    let guard = flood_guard(local, cfg.flood_new_flows_per_cpu, now);
    if guard {
        stats::event(event::FLOOD_GUARD_ACTIVE);
    }
    if proto == PROTO_TCP && !fresh_syn && !found {
        stats::event(event::NON_SYN_MISS);
        if flags & TCP_RST != 0 {
            // Nothing to reset: no flow, no SNAT port for it.
            return Err(Out::drop(reason::DROP_RST_NO_CONN));
        }
        if guard {
            return Err(Out::drop(reason::DROP_FLOOD_GUARD));
        }
    }
    if guard && fresh_syn && !found && !challenge(s, cfg, now) {
        return Err(Out::drop(reason::DROP_SYN_CHALLENGE));
    }
    s.guard = guard as u32;
    stop_after(lb_common::BENCH_STOP_MISS)?;
    new_flow(ctx, s, svc, cfg, now)?;
    Ok(true)
}

/// Is the flood guard on for this new flow? On when this CPU counts a
/// flood (`local`, which then publishes it), or while another CPU's
/// published guard lasts (unless the guard is off: `limit` 0).
#[inline(always)]
fn flood_guard(local: bool, limit: u32, now: u64) -> bool {
    if limit == 0 {
        return false;
    }
    let Some(p) = FLOOD_UNTIL.get_ptr_mut(0) else {
        return local;
    };
    // SAFETY: an array slot from a successful lookup; a plain u64 that
    // CPUs race on harmlessly (each writes a time a window ahead).
    let until = unsafe { *p };
    if local {
        let want = now + FLOOD_WINDOW_NS;
        // Written a few times a window, not per packet: no cache line
        // bouncing between the CPUs of a flood.
        if until < want - FLOOD_WINDOW_NS / 4 {
            // SAFETY: as above.
            unsafe { *p = want };
        }
        return true;
    }
    now < until
}

/// Under the flood guard: may this fresh SYN start a flow? Yes when its
/// source passed the challenge within `SOURCE_VOUCHED_NS`, or when this
/// very SYN (same 4-tuple) was dropped between `SYN_RETRY_MIN_NS` and
/// `SYN_RETRY_MAX_NS` ago: a real client retransmits after 1 s, a flood
/// from random sources never repeats itself. That passes and vouches for
/// the source. Otherwise the SYN is remembered and dropped: a flood's SYNs
/// cost no entry, no port and no backend work. Both tables are indexed by
/// the keyed flow hash, so an outsider cannot aim at a slot.
#[inline(never)]
fn challenge(s: &mut Scratch, cfg: &Config, now: u64) -> bool {
    let (src_slot, src_hash) = source_slot(s, cfg);
    let Some(src_slot) = src_slot else {
        return true;
    };
    // SAFETY: an array slot from a successful lookup; a plain u32 that
    // CPUs race on harmlessly (the worst case: one more challenge).
    let vouched = unsafe { *src_slot };
    if syn_stamp_age(vouched, now, src_hash).is_some_and(|age| age < SOURCE_VOUCHED_NS) {
        // SAFETY: as above.
        unsafe { *src_slot = syn_stamp(now, src_hash) };
        return true;
    }
    let flow = flow_hash(&s.key, &cfg.hash_key);
    let Some(slot) = SYN_PENDING.get_ptr_mut(flow & (SYN_PENDING_SLOTS - 1)) else {
        return true;
    };
    // SAFETY: as above.
    let seen = unsafe { *slot };
    if syn_stamp_age(seen, now, flow)
        .is_some_and(|age| (SYN_RETRY_MIN_NS..SYN_RETRY_MAX_NS).contains(&age))
    {
        // SAFETY: as above (both slots, from their lookups).
        unsafe {
            *slot = 0;
            *src_slot = syn_stamp(now, src_hash);
        }
        stats::event(event::SOURCE_VOUCHED);
        return true;
    }
    // SAFETY: as above.
    unsafe { *slot = syn_stamp(now, flow) };
    false
}

/// The `SYN_SOURCES` slot of the packet's source, and the source's hash.
#[inline(always)]
fn source_slot(s: &mut Scratch, cfg: &Config) -> (Option<*mut u32>, u32) {
    // The source alone: a FlowKey with everything but `src` zero.
    s.key3 = FlowKey {
        src: s.key.src,
        dst: [0; 16],
        sport_be: 0,
        dport_be: 0,
        proto: 0,
        family: s.key.family,
        _pad: [0; 2],
    };
    let hash = flow_hash(&s.key3, &cfg.hash_key);
    (SYN_SOURCES.get_ptr_mut(hash & (SYN_SOURCE_SLOTS - 1)), hash)
}

/// A client completed a handshake (it acknowledged the backend's SYN-ACK
/// exactly, which only a real source can): its SYNs pass the challenge at
/// once from now on, for `SOURCE_VOUCHED_NS`. Whether or not the guard is
/// on: the guard comes and goes with the load, and a client must not pay
/// the challenge again each time it comes back.
#[inline(never)]
fn vouch(s: &mut Scratch, cfg: &Config, now: u64) {
    let (slot, hash) = source_slot(s, cfg);
    if let Some(slot) = slot {
        // SAFETY: an array slot from a successful lookup (see `challenge`).
        unsafe { *slot = syn_stamp(now, hash) };
    }
}

/// Sets the TCP state of the entry at `key` in `t`.
#[inline(always)]
fn set_state(t: &Table, key: &FlowKey, state: u8) {
    if let Some(p) = t.get_ptr_mut(key) {
        // SAFETY: a successful lookup's pointer, one byte stored at once.
        unsafe { (*p).tcp_state = state };
    }
}

/// Gives up the flow whose forward entry `s.conn` was found at `s.key` in
/// `t`: its reverse entry (if still its own) and its forward entry.
#[inline(always)]
fn release(t: &Table, s: &mut Scratch) {
    if s.conn.flags & CONN_F_REVERSE != 0 {
        return;
    }
    mirror_key(&s.conn, s.key.proto, s.key.family, &mut s.key2);
    // SAFETY: read-only, copied at once.
    if let Some(r) = unsafe { t.get(&s.key2) } {
        // SAFETY: a whole entry from the lookup just made.
        unsafe { copy_conn(&mut s.other, r) };
        // Another flow may hold the port by now (it was free for the
        // taking once this flow expired): leave that one alone.
        if s.other.flags & CONN_F_REVERSE != 0 && s.other.points_back_to(&s.key) {
            // The only error (-ENOENT: gone already) leaves it gone too.
            let _ = t.remove(&s.key2);
        }
    }
    let _ = t.remove(&s.key);
}

/// Marks the established reverse entry of the forward entry `s.conn` reset.
#[inline(always)]
fn reset_reverse(s: &mut Scratch) {
    mirror_key(&s.conn, s.key.proto, s.key.family, &mut s.key2);
    if let Some(p) = CONNS.get_ptr_mut(&s.key2) {
        // SAFETY: a successful lookup's pointer, read at once.
        unsafe { copy_conn(&mut s.other, p) };
        if s.other.flags & CONN_F_REVERSE != 0 && s.other.points_back_to(&s.key) {
            // SAFETY: the same pointer, no helper call since the lookup.
            unsafe { (*p).tcp_state = TCP_STATE_RESET };
        }
    }
}

/// The client's packet on an unanswered flow: establishes it if it proves
/// the backend answered (`forward_establishes`).
#[inline(always)]
fn establish_forward(s: &mut Scratch, cfg: &Config, flags: u8, now: u64) {
    mirror_key(&s.conn, s.key.proto, s.key.family, &mut s.key2);
    // SAFETY: read-only, copied at once.
    let Some(r) = (unsafe { UNANSWERED.get(&s.key2) }) else {
        return;
    };
    // SAFETY: a whole entry from the lookup just made.
    unsafe { copy_conn(&mut s.other, r) };
    if s.other.flags & CONN_F_REVERSE == 0
        || !s.other.points_back_to(&s.key)
        || !forward_establishes(s.key.proto, flags, s.seg.ack, &s.other)
    {
        return;
    }
    s.conn.last_seen_ns = now;
    s.conn.tcp_state = tcp_state_after(s.conn.tcp_state, flags);
    promote(s);
    if s.key.proto == PROTO_TCP {
        vouch(s, cfg, now);
    }
}

/// Creates a new flow for `s.key`: picks its backend, routes the packet
/// (before any state exists, so a packet this hook cannot send leaves
/// none: XDP hands it to TC untouched, and TC creates the flow), reserves a
/// SNAT port (the reverse entry) and inserts the forward entry, both into
/// `UNANSWERED`. Leaves the forward entry in `s.conn`.
#[inline(always)]
fn new_flow<C: Packet>(
    ctx: &mut C,
    s: &mut Scratch,
    svc: &Service,
    cfg: &Config,
    now: u64,
) -> Result<(), Out> {
    let r = choose(s, svc, cfg, now);
    if r != 0 {
        return Err(Out::drop(r));
    }
    stop_after(lb_common::BENCH_STOP_CHOOSE)?;
    s.conn.ifindex = ctx.ingress_ifindex();
    fwd::route(ctx, &s.l3, &mut s.fib, &s.conn)?;
    stop_after(lb_common::BENCH_STOP_NEW_ROUTE)?;
    let r = reserve(s, svc, cfg, now);
    if r != 0 {
        return Err(Out::drop(r));
    }
    stop_after(lb_common::BENCH_STOP_RESERVE)?;
    if UNANSWERED.insert(&s.key, &s.conn, 0).is_err() {
        // `s.key2` still holds the reverse key just reserved; the only error
        // (-ENOENT: already evicted) leaves the port free too.
        let _ = UNANSWERED.remove(&s.key2);
        return Err(Out::drop(reason::DROP_CONN_INSERT));
    }
    Ok(())
}

/// Picks the backend of a new flow and fills `s.conn` with its forward
/// entry, SNAT port and ingress interface still unset. Returns 0, or the
/// drop reason. Out of line (a BPF subprogram with its own stack frame) so
/// only new flows pay for it; BPF passes at most five arguments, all in
/// registers, hence the plain code.
#[inline(never)]
fn choose(s: &mut Scratch, svc: &Service, cfg: &Config, now: u64) -> u32 {
    let flags = s.flags;
    s.hash = flow_hash(&s.key, &cfg.hash_key);
    let Some((index, backend)) = pick(svc, s.hash, now) else {
        return reason::DROP_NO_BACKEND;
    };
    let syn = if s.key.proto == PROTO_TCP && is_fresh_syn(flags) {
        CONN_F_SYN
    } else {
        0
    };
    // Field by field, not a struct literal: see `copy_conn`.
    let c = &mut s.conn;
    c.new_src = svc.snat_addr;
    c.new_dst = backend.addr;
    c.new_sport_be = 0;
    c.new_dport_be = backend.port_be;
    c.backend = index;
    c.service = svc.id;
    c.flags = CONN_F_UNANSWERED | syn;
    c.tcp_state = tcp_state_after(TCP_STATE_OPEN, flags);
    c._pad = [0; 2];
    c.ifindex = 0;
    c.seq = 0;
    c.last_seen_ns = now;
    c.created_ns = now;
    0
}

/// Maglev (`decide::pick`): the backend of a new flow.
#[inline(always)]
fn pick(svc: &Service, hash: u32, now: u64) -> Option<(u32, &'static Backend)> {
    infallible(decide::pick(&Maps, svc, hash, now, |_, _| {}))
}

/// Reserves a SNAT port for the new flow in `s.conn` (routed: `s.fib`) by
/// inserting its reverse entry (`s.key2` -> `s.other`) into `UNANSWERED`,
/// and sets it in `s.conn`. Returns 0, or the drop reason. Out of line,
/// like `choose`.
///
/// The first port tried depends only on the flow (a flow whose entries
/// were lost gets the same port back); double hashing: the stride depends
/// on other bits of the hash. Linear probing would grow runs of taken ports
/// that turn into false exhaustion long before the range is full. The
/// stride is a prime, so it is coprime with the range unless it divides
/// it, and the SNAT_PROBES probes land on distinct ports. Ranges of at most
/// SNAT_PROBES ports are walked one by one: exhaustive and exact.
///
/// A port is taken while an established flow holds it (`CONNS`), or an
/// unanswered one that has not expired. Under the flood guard, when every
/// probed port is taken, the new flow takes the port of the unanswered flow
/// idle the longest among them: a SYN flood cannot exhaust the range, and a
/// real handshake, idle no longer than a round trip, is the last to go.
#[inline(never)]
fn reserve(s: &mut Scratch, svc: &Service, cfg: &Config, now: u64) -> u32 {
    let lo = svc.snat_port_lo as u32;
    let hi = svc.snat_port_hi as u32;
    if hi < lo || lo == 0 {
        return reason::DROP_SNAT_EXHAUSTED;
    }
    let range = hi - lo + 1;
    let first = s.hash % range;
    let prime = match (s.hash >> 16) & 7 {
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
    let r = &mut s.other;
    r.new_src = s.key.dst;
    r.new_dst = s.key.src;
    r.new_sport_be = s.key.dport_be;
    r.new_dport_be = s.key.sport_be;
    r.backend = s.conn.backend;
    r.service = svc.id;
    r.flags = CONN_F_REVERSE | CONN_F_UNANSWERED | (s.conn.flags & CONN_F_SYN);
    r.tcp_state = TCP_STATE_OPEN;
    r._pad = [0; 2];
    // The backend side: where its answers must come from.
    r.ifindex = s.fib.ifindex;
    r.seq = 0;
    r.last_seen_ns = now;
    r.created_ns = now;
    s.key2 = FlowKey {
        src: s.conn.new_dst,
        dst: svc.snat_addr,
        sport_be: s.conn.new_dport_be,
        dport_be: 0,
        proto: s.key.proto,
        family: s.key.family,
        _pad: [0; 2],
    };
    s.probe = Probe {
        lo,
        range,
        first,
        stride,
        now,
        // Under the flood guard: the taken port whose unanswered holder was
        // seen the longest ago.
        oldest_seen: u64::MAX,
        oldest_port_be: 0,
        got: 0,
    };
    // The flow's own first port, reclaimed if its reservation went stale
    // (the flow's own, lost half, included: a flow re-created after losing
    // an entry gets its port back); then the next ports free in both
    // tables; then, among the first RECLAIM_PROBES, stale reservations. In
    // passes because a staleness check costs the verifier about 15,000
    // instructions per probe: on all SNAT_PROBES probes it would take most
    // of its budget of 1,000,000.
    // Under the flood guard the free-port pass stops early: with the range
    // full of a flood's reservations, 32 probes of two tables each would
    // cost every flood SYN more than the rest of its path.
    let free_probes = if s.guard != 0 {
        FLOOD_FREE_PROBES
    } else {
        SNAT_PROBES
    };
    if !probe_port(s, cfg, 0) {
        let mut i = 1;
        while i < free_probes && i < range {
            if probe_free_port(s, i) {
                break;
            }
            i += 1;
        }
        let mut i = 1;
        while s.probe.got == 0 && i < RECLAIM_PROBES && i < range {
            if probe_port(s, cfg, i) {
                break;
            }
            i += 1;
        }
    }
    let mut got = s.probe.got;
    // Every probed port is held: under the flood guard, the new flow takes
    // the port of the unanswered flow idle the longest; without it, only
    // when that flow has been waiting for the backend for RECLAIM_IDLE_NS
    // (a flood's leftovers, or a SYN the client will send again anyway).
    if got == 0
        && s.probe.oldest_port_be != 0
        && (s.guard != 0 || now.saturating_sub(s.probe.oldest_seen) >= RECLAIM_IDLE_NS)
    {
        let port_be = s.probe.oldest_port_be;
        if take_over(s, port_be) {
            got = port_be;
        }
    }
    if got == 0 {
        return reason::DROP_SNAT_EXHAUSTED;
    }
    s.conn.new_sport_be = got;
    0
}

/// Under the flood guard: how many ports the free-port pass probes.
const FLOOD_FREE_PROBES: u32 = 4;

/// Without the flood guard, how long an unanswered flow must have been idle
/// before a new flow that found every probed port held may take its port.
/// A client retransmits an unanswered SYN after 1 s; its flow then starts
/// afresh.
const RECLAIM_IDLE_NS: u64 = 1_000_000_000;

/// How many of the probed ports a new flow may also take from a stale
/// reservation (or, under the flood guard, from the longest-idle unanswered
/// flow).
const RECLAIM_PROBES: u32 = 8;

/// The `i`th probed SNAT port (see `reserve`), in network byte order, now
/// also in `s.key2`.
#[inline(always)]
fn probed_port(s: &mut Scratch, i: u32) -> u16 {
    let p = &s.probe;
    // `first + i * stride` < 32 * 65536: no overflow.
    let off = (p.first + i * p.stride) % p.range;
    let port_be = ((p.lo + off) as u16).to_be();
    s.key2.dport_be = port_be;
    port_be
}

/// The `i`th probe of the first pass: reserves the port if no flow holds
/// it in either table.
#[inline(always)]
fn probe_free_port(s: &mut Scratch, i: u32) -> bool {
    let port_be = probed_port(s, i);
    // SAFETY: only whether the entry exists is read.
    if unsafe { CONNS.get(&s.key2) }.is_some() {
        return false;
    }
    if UNANSWERED
        .insert(&s.key2, &s.other, BPF_NOEXIST as u64)
        .is_ok()
    {
        s.probe.got = port_be;
        return true;
    }
    false
}

/// The `i`th probe of the second pass: takes the port from a stale
/// reservation (true), or notes the longest-idle unanswered holder and
/// goes on.
#[inline(always)]
fn probe_port(s: &mut Scratch, cfg: &Config, i: u32) -> bool {
    let port_be = probed_port(s, i);
    let now = s.probe.now;
    if held_by_established(s, cfg, now) {
        return false;
    }
    if UNANSWERED
        .insert(&s.key2, &s.other, BPF_NOEXIST as u64)
        .is_ok()
    {
        s.probe.got = port_be;
        return true;
    }
    let seen = unanswered_holder(s, cfg, now);
    if seen == 0 {
        if UNANSWERED.insert(&s.key2, &s.other, 0).is_ok() {
            s.probe.got = port_be;
            return true;
        }
    } else if seen < s.probe.oldest_seen {
        s.probe.oldest_seen = seen;
        s.probe.oldest_port_be = port_be;
    }
    false
}

/// Is the port of `s.key2` held by a live established flow? A stale
/// reservation there (its forward entry gone, expired, moved to another
/// port, or the flow being picked again) is removed.
#[inline(always)]
fn held_by_established(s: &mut Scratch, cfg: &Config, now: u64) -> bool {
    // SAFETY: read-only, copied at once.
    let Some(r) = (unsafe { CONNS.get(&s.key2) }) else {
        return false;
    };
    // SAFETY: a whole entry from the lookup just made.
    unsafe { copy_conn(&mut s.peek, r) };
    if holder_seen(&CONNS, s, cfg, now) != 0 {
        return true;
    }
    let _ = CONNS.remove(&s.key2);
    false
}

/// The unanswered holder of the port of `s.key2`: 0 if its reservation is
/// stale (free for the taking), else when its forward entry was last seen.
#[inline(always)]
fn unanswered_holder(s: &mut Scratch, cfg: &Config, now: u64) -> u64 {
    // SAFETY: read-only, copied at once.
    let Some(r) = (unsafe { UNANSWERED.get(&s.key2) }) else {
        return 0;
    };
    // SAFETY: a whole entry from the lookup just made.
    unsafe { copy_conn(&mut s.peek, r) };
    let seen = holder_seen(&UNANSWERED, s, cfg, now);
    // Stale, and not the flow being picked again: an unanswered flow that
    // expired (or lost its forward entry to the LRU).
    if seen == 0 && !s.key3.same(&s.key) {
        stats::event(event::UNANSWERED_EXPIRED);
    }
    seen
}

/// For the reverse entry `s.peek` found at `s.key2` in `t`: when its flow's
/// forward entry was last seen (at least 1), or 0 if the reservation is
/// stale: no forward entry, one that expired or moved to another port, or
/// the flow of `s.key` itself, which is being picked again. Leaves the
/// forward key in `s.key3`.
#[inline(always)]
fn holder_seen(t: &Table, s: &mut Scratch, cfg: &Config, now: u64) -> u64 {
    mirror_key(&s.peek, s.key2.proto, s.key2.family, &mut s.key3);
    if s.key3.same(&s.key) {
        return 0;
    }
    // SAFETY: read-only, copied at once.
    let Some(f) = (unsafe { t.get(&s.key3) }) else {
        return 0;
    };
    // SAFETY: a whole entry from the lookup just made.
    unsafe { copy_conn(&mut s.peek, f) };
    if s.peek.flags & CONN_F_REVERSE != 0
        || s.peek.new_sport_be != s.key2.dport_be
        || !same_addr(&s.peek.new_dst, &s.key2.src)
        || s.peek.expired(s.key2.proto, cfg, now)
    {
        return 0;
    }
    if s.peek.last_seen_ns == 0 {
        1
    } else {
        s.peek.last_seen_ns
    }
}

/// Under the flood guard: the new flow takes `port_be` from its unanswered
/// holder, whose forward entry goes too (a packet of that flow then starts
/// afresh instead of colliding with the new one on the backend).
#[inline(always)]
fn take_over(s: &mut Scratch, port_be: u16) -> bool {
    s.key2.dport_be = port_be;
    // SAFETY: read-only, copied at once.
    if let Some(r) = unsafe { UNANSWERED.get(&s.key2) } {
        // SAFETY: a whole entry from the lookup just made.
        unsafe { copy_conn(&mut s.peek, r) };
        mirror_key(&s.peek, s.key2.proto, s.key2.family, &mut s.key3);
        let _ = UNANSWERED.remove(&s.key3);
    }
    if UNANSWERED.insert(&s.key2, &s.other, 0).is_err() {
        return false;
    }
    stats::event(event::FLOOD_PORT_TAKEN);
    true
}
