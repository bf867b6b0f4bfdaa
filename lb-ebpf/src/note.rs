//! Rare data-plane events, told to the daemon's log through aya-log (the
//! `AYA_LOGS` ring buffer, which the daemon drains): the flood guard going
//! on and off, SNAT ports running out, a packet with no route.
//!
//! Counters say how often; these lines say when it started and for what.
//! Each kind is rate-limited per CPU (at most one line per `INTERVAL_NS`,
//! the next one says how many it stood for), so a flood that drops
//! millions of packets writes a handful of lines. A full ring buffer loses
//! the line, never the packet.

use aya_ebpf::{helpers::bpf_get_smp_processor_id, maps::ProgramArray, EbpfContext};
use aya_log_ebpf::warn;
use lb_common::{reason, FAMILY_V4};

use crate::{
    clock::now,
    gate::{
        KIND_FLOOD, KIND_ROUTE, KIND_SNAT, LINE_FLOOD_OFF, LINE_FLOOD_ON, LINE_ROUTE, LINE_SNAT,
    },
    scratch::{scratch, Scratch},
};

fn cpu() -> u32 {
    // SAFETY: plain helper call.
    unsafe { bpf_get_smp_processor_id() }
}

/// Notes a dropped packet's cause when it is one of the rare ones. Called
/// for every drop, so the common drops cost one compare.
#[inline(always)]
pub fn drop(s: &mut Scratch, why: u32) {
    if why == reason::DROP_SNAT_EXHAUSTED || why == reason::DROP_NO_ROUTE {
        rare_drop(s, why);
    }
}

#[inline(never)]
fn rare_drop(s: &mut Scratch, why: u32) {
    let (kind, line) = if why == reason::DROP_SNAT_EXHAUSTED {
        (KIND_SNAT, LINE_SNAT)
    } else {
        (KIND_ROUTE, LINE_ROUTE)
    };
    if let Some(held) = s.log.open(kind, now()) {
        s.log.pending |= line;
        s.log.pending_held = held;
    }
}

/// Notes when this CPU's flood guard goes on (`guard`, a new flow over the
/// limit) and off (the first new flow after it ended). An "on" line is
/// rate-limited; an "off" line follows only a logged "on".
#[inline(always)]
pub fn flood(s: &mut Scratch, guard: bool, limit: u32, now: u64) {
    if guard == (s.log.flood_on != 0) {
        return;
    }
    if guard && s.log.open(KIND_FLOOD, now).is_none() {
        return;
    }
    s.log.flood_on = guard as u32;
    s.log.pending |= if guard { LINE_FLOOD_ON } else { LINE_FLOOD_OFF };
    s.log.limit = limit;
}

/// The end of a hook's run, when this packet noted a line (`core::run`
/// says so, so other packets pay no lookup here): hands over to
/// the hook's log program (`progs[0]`), which writes it and returns
/// `action` for us. The verifier then walks the aya-log code once, in that
/// program, instead of on every path of this one (it costs thousands of
/// instructions per call site). Without a log program (not loaded, or its
/// loader gone) the line is lost and the packet goes on unchanged.
#[inline(always)]
pub fn hand_over<C: EbpfContext>(ctx: &C, action: u32, progs: &ProgramArray) {
    // SAFETY: called after `core::run` returned: no other reference to the
    // scratch is live.
    let Some(s) = (unsafe { scratch() }) else {
        return;
    };
    if s.log.pending == 0 {
        return;
    }
    s.log.action = action;
    // SAFETY: the log program only reads the scratch and returns `action`.
    unsafe { progs.tail_call(ctx, 0) };
    s.log.pending = 0;
}

/// The log program's body: writes the noted lines, returns the hook's
/// action (`None`: the scratch slot is missing, which cannot happen).
#[inline(always)]
pub fn write() -> Option<u32> {
    // SAFETY: the log program's only reference to the scratch (a tail
    // call: the hook's program never returns to use its own).
    let s = unsafe { scratch() }?;
    let pending = s.log.pending;
    s.log.pending = 0;
    if pending & (LINE_SNAT | LINE_ROUTE) != 0 {
        drop_line(s, pending & LINE_SNAT != 0);
    }
    if pending & (LINE_FLOOD_ON | LINE_FLOOD_OFF) != 0 {
        flood_line(s, pending & LINE_FLOOD_ON != 0);
    }
    Some(s.log.action)
}

#[inline(always)]
fn drop_line(s: &mut Scratch, snat: bool) {
    let held = s.log.pending_held;
    let (what, name) = if snat {
        ("SNAT ports exhausted", "drop_snat_exhausted")
    } else {
        ("no route", "drop_no_route")
    };
    // Where the packet was going, and what the flow rewrites that to: for
    // a new flow the VIP and its backend, for a reply our SNAT address and
    // the client.
    let c = &s.conn;
    let (port, dport) = (u16::from_be(s.key.dport_be), u16::from_be(c.new_dport_be));
    let cpu = cpu();
    if s.key.family == FAMILY_V4 {
        let (to, via) = (first4(&s.key.dst), first4(&c.new_dst));
        warn!(
            s,
            "{}: a packet to {:i}:{} (rewritten to {:i}:{}) was dropped ({}; {} more on cpu {} \
             since the last line)",
            what,
            to,
            port,
            via,
            dport,
            name,
            held,
            cpu
        );
    } else {
        let (to, via) = (s.key.dst, c.new_dst);
        warn!(
            s,
            "{}: a packet to [{:i}]:{} (rewritten to [{:i}]:{}) was dropped ({}; {} more on cpu \
             {} since the last line)",
            what,
            to,
            port,
            via,
            dport,
            name,
            held,
            cpu
        );
    }
}

fn first4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

#[inline(always)]
fn flood_line(s: &mut Scratch, on: bool) {
    let (state, what) = if on {
        (
            "on",
            "segments that match no flow are dropped (drop_flood_guard), SYNs until \
             they are sent again (drop_syn_challenge)",
        )
    } else {
        ("off", "new flows are handled as usual again")
    };
    warn!(
        s,
        "flood guard {} on cpu {} (limit {} new flows per second): {}",
        state,
        cpu(),
        s.log.limit,
        what
    );
}
