//! The per-CPU scratch: what one packet's run keeps off the 512-byte
//! stack (its parsed headers, keys, copies of map values), and what a CPU
//! keeps from packet to packet (flood count, log gate). Apart from the
//! other maps (`maps`) because its value holds the parser's types.

use aya_ebpf::{bindings::bpf_fib_lookup, macros::map, maps::PerCpuArray};
use lb_common::{AddrKey, Conn, FloodWindow, FlowKey, ServiceKey};

use crate::{
    gate::LogGate,
    parse::{Seg, L3},
};

/// Per-CPU scratch space for structs too big for the 512-byte BPF stack once
/// everything is inlined. A program runs to completion on its CPU (softirq,
/// no preemption), so one slot per CPU is never shared.
#[repr(C)]
pub struct Scratch {
    /// The packet's network layer.
    pub l3: L3,
    /// The packet's 5-tuple (for ICMP errors: the quoted packet's).
    pub key: FlowKey,
    /// A derived key (reverse key, or the reversed quoted tuple).
    pub key2: FlowKey,
    /// A second derived key (stale-reservation check).
    pub key3: FlowKey,
    pub svc_key: ServiceKey,
    pub addr_key: AddrKey,
    pub fib: bpf_fib_lookup,
    /// TCP sequence and acknowledgment numbers (TCP only).
    pub seg: Seg,
    /// A copy of the connection entry the packet uses (for a new flow: its
    /// forward entry). Copied, never referenced: see `CONNS`.
    pub conn: Conn,
    /// A copy of the flow's other entry (for a new flow: its reverse entry).
    pub other: Conn,
    /// A copy of an entry looked at while probing SNAT ports.
    pub peek: Conn,
    /// A new flow's `flow_hash`.
    pub hash: u32,
    /// 1 while the flood guard is on for the new flow being created.
    pub guard: u32,
    /// The packet's TCP flags (for the new-flow code).
    pub flags: u8,
    /// SNAT port probing (`conntrack::reserve`).
    pub probe: Probe,
    /// The flood guard's count on this CPU; kept from packet to packet.
    pub flood: FloodWindow,
    /// Rate limits of the data plane's log lines; kept like `flood`.
    pub log: LogGate,
}

/// The state of a new flow's SNAT port probes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Probe {
    pub lo: u32,
    pub range: u32,
    pub first: u32,
    pub stride: u32,
    pub now: u64,
    /// The taken port whose unanswered holder was seen the longest ago, and
    /// when (the flood guard's candidate).
    pub oldest_seen: u64,
    pub oldest_port_be: u16,
    /// The port reserved; 0 while none is.
    pub got: u16,
}

#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch.
///
/// # Safety
///
/// No other reference from an earlier call may be live: each is a `&mut` to
/// the same slot. A program run takes it once (`core::run`, then
/// `note::hand_over` after `run` has returned; the log program's
/// `note::write`); the slot is used by one program run at a time on this
/// CPU (see `Scratch`).
#[inline(always)]
pub unsafe fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU slot from a successful lookup; exclusive by the
    // caller's promise.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}
