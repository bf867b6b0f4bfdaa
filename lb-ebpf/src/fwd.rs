//! Forwarding: the FIB lookup happens *before* the rewrite, so a packet this
//! hook cannot send on is left untouched (XDP) or dropped and counted (TC).
//! A rewritten packet must never reach the local stack: its source is one of
//! our own addresses, and the stack drops it as a martian.

use ::core::{mem::size_of, ptr::write_volatile};
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use lb_common::Conn;

use crate::{core::Out, ctx::Packet, maps::Scratch, parse::L3};

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
    let rc = lookup(ctx, l3, fib, c);
    ctx.can_send(rc, fib)
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
