//! Forwarding: the FIB lookup happens *before* the rewrite, so a packet this
//! hook cannot send on is left untouched (XDP) or dropped and counted (TC).
//! A rewritten packet must never reach the local stack: its source is one of
//! our own addresses, and the stack drops it as a martian.

use ::core::{
    mem::size_of,
    ptr::{read_volatile, write_volatile},
};
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use lb_common::{Conn, NEXT_HOP_TTL_NS};

use crate::{
    clock::now,
    ctx::Packet,
    maps::{NEXT_HOPS, NEXT_HOPS_BITS, TX_PORTS},
    out::Out,
    parse::L3,
    scratch::Scratch,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Looks up the route to the rewritten destination into `fib`; returns the
/// helper's code (`BPF_FIB_LKUP_RET_*`, or a negative error).
#[inline(always)]
fn lookup<C: Packet>(ctx: &mut C, l3: &L3, fib: &mut bpf_fib_lookup, c: &Conn) -> i64 {
    let (src, dst) = (&c.new_src, &c.new_dst);
    zero_fib(fib);
    fib.l4_protocol = l3.proto;
    fib.__bindgen_anon_1.tot_len = ctx.fib_tot_len(l3.ip_len);
    fib.ifindex = ctx.ingress_ifindex();
    if l3.is_v6() {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(src);
        fib.__bindgen_anon_4.ipv6_dst = words(dst);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    }
    // SAFETY: helper call with a live context and a correctly sized struct.
    unsafe { fib_lookup(ctx.raw(), fib, size_of::<bpf_fib_lookup>() as i32, 0) }
}

/// Decides whether this hook can send the packet once rewritten by `c`
/// (`Ok`; `fib.ifindex` is then the egress), or what to do instead (`Err`:
/// the packet is still untouched). Out of line: its own BPF stack frame.
/// Takes the parts of the scratch it needs, so `c` can be the scratch's copy
/// of a connection entry.
#[inline(never)]
pub fn route<C: Packet>(
    ctx: &mut C,
    l3: &L3,
    fib: &mut bpf_fib_lookup,
    c: &Conn,
) -> Result<(), Out> {
    let (rc, tx_port) = cached_lookup(ctx, l3, fib, c);
    ctx.can_send(rc, fib, tx_port)
}

/// [`lookup`] through this CPU's `NEXT_HOPS`: a fresh slot for the
/// destination and ingress interface, filled by a lookup for a packet at
/// least this long (the MTU check: XDP passes the length, TC's skb is
/// checked by the kernel), gives what `can_send` and `send` read (the
/// egress interface and both MACs) and the cached code. Otherwise the FIB
/// is asked, and a usable answer (a route, with or without a neighbour)
/// fills the slot.
#[inline(always)]
fn cached_lookup<C: Packet>(
    ctx: &mut C,
    l3: &L3,
    fib: &mut bpf_fib_lookup,
    c: &Conn,
) -> (i64, bool) {
    let now = now();
    let addr = words(&c.new_dst);
    let ingress = ctx.ingress_ifindex();
    let family = l3.family as u32;
    let mixed = (addr[0] ^ addr[1] ^ addr[2] ^ addr[3] ^ ingress).wrapping_mul(0x9e37_79b1);
    let slot = NEXT_HOPS.get_ptr_mut(mixed >> (32 - NEXT_HOPS_BITS));
    if let Some(h) = slot {
        // SAFETY: this CPU's slot; only programs on this CPU use it, one
        // at a time.
        let h = unsafe { &*h };
        if h.is_for(&addr, ingress, family)
            && now.wrapping_sub(h.at_ns) < NEXT_HOP_TTL_NS
            && l3.ip_len <= h.ok_len
        {
            fib.ifindex = h.ifindex;
            copy_mac(&mut fib.smac, &h.smac);
            copy_mac(&mut fib.dmac, &h.dmac);
            return (h.rc as i64, h.tx_port != 0);
        }
    }
    let rc = lookup(ctx, l3, fib, c);
    let tx_port = fib.ifindex == ingress || TX_PORTS.get_ifindex(fib.ifindex).is_some();
    if let Some(h) = slot {
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            // A colliding destination takes the slot over: the cost of a
            // collision is a lookup, never a wrong next hop.
            h.addr = addr;
            h.ingress = ingress;
            h.family = family;
            h.at_ns = now;
            h.ifindex = fib.ifindex;
            h.rc = rc as u32;
            copy_mac(&mut h.smac, &fib.smac);
            copy_mac(&mut h.dmac, &fib.dmac);
            h.ok_len = l3.ip_len;
            h.tx_port = tx_port as u16;
        } else if h.is_for(&addr, ingress, family) {
            // No usable answer now: the next packet asks again.
            h.at_ns = 0;
        }
    }
    (rc, tx_port)
}

/// Copies a MAC address two bytes at a time (a plain copy becomes a call
/// to a byte-by-byte `memcpy` on BPF).
#[inline(always)]
fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    let mut i = 0;
    while i < 6 {
        // SAFETY: inside both 6-byte arrays.
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Zeroes the lookup's parameters (all-zero is their "unset" state), four
/// bytes at a time. `*fib = zeroed()` compiles to a call to a byte-by-byte
/// `memset` on BPF (64 iterations per packet); volatile keeps LLVM from
/// turning the loop back into that call.
#[inline(always)]
fn zero_fib(fib: &mut bpf_fib_lookup) {
    const WORDS: usize = size_of::<bpf_fib_lookup>() / 4;
    let p = fib as *mut bpf_fib_lookup as *mut u32;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: inside `*fib` (4-byte aligned, 64 bytes), a plain C struct.
        unsafe { write_volatile(p.add(i), 0) };
        i += 1;
    }
}

/// Would we send to `c.new_dst` (from `c.new_src`) out of the interface
/// this packet came in by? The second chance of a packet that arrived on
/// another interface than its flow recorded: after an interface was
/// re-created (a new ifindex) or a route moved, the flow follows the
/// routing table, while a forged packet from another side still fails.
/// Out of line: only such packets pay for it.
#[inline(never)]
pub fn comes_from<C: Packet>(ctx: &mut C, l3: &L3, fib: &mut bpf_fib_lookup, c: &Conn) -> bool {
    let rc = lookup(ctx, l3, fib, c);
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64)
        && fib.ifindex == ctx.ingress_ifindex()
}

/// Sends the rewritten packet along the route `route` accepted.
#[inline(always)]
pub fn send<C: Packet>(ctx: &mut C, s: &Scratch) -> Out {
    ctx.send(&s.fib)
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
