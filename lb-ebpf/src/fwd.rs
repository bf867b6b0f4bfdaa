//! Forwarding after the rewrite: a FIB lookup, then the hook's way out.

use ::core::mem::{size_of, zeroed};
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use lb_common::{reason, Conn};

use crate::{core::Out, ctx::Packet, maps::Scratch};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Out of line: its own BPF stack frame (see `conntrack::new_flow`).
#[inline(never)]
pub fn forward<C: Packet>(ctx: &mut C, s: &mut Scratch, c: &Conn) -> Out {
    let l3 = &s.l3;
    let (src, dst) = (&c.new_src, &c.new_dst);
    let fib = &mut s.fib;
    // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is its "unset" state.
    *fib = unsafe { zeroed() };
    fib.l4_protocol = l3.proto;
    fib.__bindgen_anon_1.tot_len = l3.ip_len;
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
    let rc = unsafe { fib_lookup(ctx.raw(), fib, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc < 0 {
        return Out::stack(reason::FWD_STACK_FIB);
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => ctx.redirect(fib),
        BPF_FIB_LKUP_RET_NO_NEIGH => ctx.redirect_no_neigh(fib),
        // The stack will refuse it too; documented limitation: the balancer's
        // egress MTU must not be smaller than its ingress MTU.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Out::stack(reason::FWD_STACK_FRAG_NEEDED),
        _ => Out::stack(reason::FWD_STACK_FIB),
    }
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
