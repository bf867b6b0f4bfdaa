//! xdplb data plane: connection-hashed L4 forwarding with full NAT.
//!
//! The XDP and TC entry points are thin; both call [`core::run`] through the
//! [`ctx::Packet`] trait, which hides how each hook patches checksums and
//! forwards. docs/DATAPLANE.md is the packet-by-packet contract.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map helpers take `impl Borrow<K>`; passing keys by value copies 20-40 byte keys \
              onto the 512-byte BPF stack, so keys in the per-CPU scratch map go by reference"
)]

// The modules form layers, each using only those below it (no cycles):
// clock, gate, maps, out (leaves); ctx, stats; parse; scratch, nat; note,
// fwd; conntrack; icmp; core, which runs them all.
mod clock;
mod conntrack;
mod core;
mod ctx;
mod fwd;
mod gate;
mod icmp;
mod maps;
mod nat;
mod note;
mod out;
mod parse;
mod scratch;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    macros::{classifier, map, xdp},
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};

/// Each hook's log program (`note::hand_over`), filled in at load: a
/// program array takes programs of one type only.
#[map(name = "LOG_XDP")]
static LOG_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map(name = "LOG_TC")]
static LOG_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[xdp]
pub fn xdplb_xdp(ctx: XdpContext) -> u32 {
    let mut pkt = ctx::Xdp(ctx);
    let (out, log) = core::run(&mut pkt);
    let action = out.xdp_action();
    if log {
        note::hand_over(&pkt.0, action, &LOG_XDP);
    }
    action
}

#[classifier]
pub fn xdplb_tc(ctx: TcContext) -> i32 {
    let mut pkt = ctx::Tc(ctx);
    let (out, log) = core::run(&mut pkt);
    let action = out.tc_action();
    if log {
        note::hand_over(&pkt.0, action as u32, &LOG_TC);
    }
    action
}

/// `xdplb_xdp`'s rare log lines (note.rs); ends the packet's run with the
/// action `xdplb_xdp` chose. Dropping is the safe answer to the impossible
/// case (no scratch slot): the packet may be rewritten already.
#[xdp]
pub fn xdplb_xdp_log(_ctx: XdpContext) -> u32 {
    note::write().unwrap_or(xdp_action::XDP_DROP)
}

/// `xdplb_tc`'s rare log lines, as `xdplb_xdp_log`.
#[classifier]
pub fn xdplb_tc_log(_ctx: TcContext) -> i32 {
    note::write().map_or(TC_ACT_SHOT, |a| a as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &::core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this point,
    // so it is never executed; it only satisfies no_std.
    unsafe { ::core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Baselines for `cargo xtask bench`, never attached by the daemon. Measured
/// in the same run as the balancer, they give the harness floor (empty) and a
/// minimal rewriting forwarder (MAC swap + XDP_TX).
mod baseline {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    use crate::ctx::{ptr_at_mut, Xdp};

    #[xdp]
    pub fn bench_empty(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[xdp]
    pub fn bench_macswap(ctx: XdpContext) -> u32 {
        let pkt = Xdp(ctx);
        let Some(eth) = ptr_at_mut::<Xdp, [u8; 12]>(&pkt, 0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: `ptr_at_mut` checked the 12 MAC bytes are in the packet.
        unsafe {
            let m = *eth;
            let mut swapped = [0u8; 12];
            swapped[..6].copy_from_slice(&m[6..]);
            swapped[6..].copy_from_slice(&m[..6]);
            *eth = swapped;
        }
        xdp_action::XDP_TX
    }
}
