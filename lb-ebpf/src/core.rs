//! The one core both hooks run: parse, reply path, service lookup,
//! connection table, rewrite, forward. docs/DATAPLANE.md walks through it.

use ::core::{
    convert::Infallible,
    mem::size_of,
    ptr::{read_volatile, write_volatile},
};
use lb_common::{
    decide::{self, infallible},
    reason, Config, Service, ServiceKey,
};

use crate::{
    conntrack::{self, Fast},
    ctx::Packet,
    fwd, icmp,
    maps::{self, CONFIG, SERVICES, SNAT_ADDRS},
    nat, note,
    out::{stop_after, Out, Verdict},
    parse,
    parse::copy_addr,
    scratch::{self, Scratch},
    stats,
};

/// Runs the core on one packet: its fate, and whether it noted a log line
/// for the hook's log program (`note::hand_over`).
#[inline(always)]
pub fn run<C: Packet>(ctx: &mut C) -> (Out, bool) {
    let pulled = ctx.prepare();
    let len = ctx.frame_len();
    if pulled.is_some() && !maybe_ours(ctx) {
        stats::reason(reason::PASS_NO_SERVICE, len);
        return (Out::pass(reason::PASS_NO_SERVICE), false);
    }
    let mut log = false;
    // SAFETY: the run's only reference to the scratch; it ends with `run`,
    // before `note::hand_over` takes its own.
    let out = match (pulled, unsafe { scratch::scratch() }) {
        // The headers could not be made readable (TC: `bpf_skb_pull_data`
        // failed, which changes nothing): untouched, like any truncated packet.
        (None, _) => Out::pass(reason::PASS_TRUNCATED),
        (Some(()), Some(s)) => {
            let out = match process(ctx, s, len) {
                Ok(out) => out,
                Err(out) => {
                    if out.verdict == Verdict::Drop {
                        note::drop(s, out.reason);
                    }
                    out
                }
            };
            log = s.log.pending != 0;
            out
        }
        // A per-CPU array slot always exists; kept for the verifier.
        (Some(()), None) => Out::pass(reason::PASS_BAD_HEADER),
    };
    stats::reason(out.reason, len);
    (out, log)
}

/// Could the packet be ours: for a service's port, a reply to a SNAT
/// port, or anything but plain TCP and UDP (ICMP errors, and what the full
/// parse must name)? Most of what a NIC receives in XDP mode is none of
/// these (the host's SSH, Docker's traffic), and pays one array lookup.
#[inline(always)]
fn maybe_ours<C: Packet>(ctx: &C) -> bool {
    let Some((proto, port)) = parse::dest_port(ctx) else {
        return true;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return true;
    };
    if cfg.in_snat_range(port) {
        return true;
    }
    let (word, bit) = lb_common::service_port_bit(proto, port);
    maps::SERVICE_PORTS.get(word).is_none_or(|w| w & bit != 0)
}

#[inline(always)]
fn process<C: Packet>(ctx: &mut C, s: &mut Scratch, len: u64) -> Result<Out, Out> {
    parse::l3(ctx, &mut s.l3).map_err(Out::pass)?;
    if parse::is_icmp(&s.l3) {
        return icmp::translate(ctx, s);
    }
    let tcp_flags = parse::l4(ctx, &s.l3, &mut s.key, &mut s.seg).map_err(Out::pass)?;
    stop_after(lb_common::BENCH_STOP_PARSE)?;
    // CONFIG is an array: the lookup of index 0 cannot fail once loaded.
    let cfg: &Config = CONFIG.get(0).ok_or(Out::pass(reason::PASS_NO_SERVICE))?;

    if is_reply(s, cfg) {
        conntrack::reply(ctx, s, tcp_flags)?;
        if s.l3.ttl <= 1 {
            return Err(Out::pass(reason::PASS_TTL_EXPIRED));
        }
        let c = &s.conn;
        fwd::route(ctx, &s.l3, &mut s.fib, c)?;
        rewritten(nat::rewrite(ctx, &s.l3, s.key.sport_be, s.key.dport_be, c))?;
        stats::flow(c.service, c.backend, len);
        return Ok(fwd::send(ctx, s));
    }

    // An established flow's packet, most of what is forwarded, finds its
    // service through its flow (`conntrack::established`); the rest, and
    // any the shortcut does not decide on, look the service up.
    let fast = conntrack::established(s, cfg, tcp_flags);
    if fast == Fast::Hit {
        stop_after(lb_common::BENCH_STOP_CONNS)?;
        fwd::route(ctx, &s.l3, &mut s.fib, &s.conn)?;
    } else {
        let svc = service(s).ok_or(Out::pass(reason::PASS_NO_SERVICE))?;
        stop_after(lb_common::BENCH_STOP_SERVICE)?;
        if s.l3.ttl <= 1 {
            return Err(Out::pass(reason::PASS_TTL_EXPIRED));
        }
        if conntrack::forward(ctx, s, svc, cfg, tcp_flags, fast == Fast::Unsure)? {
            // Routed before it was created: a packet XDP cannot send leaves
            // no state, and TC, which gets it untouched, creates and counts
            // it.
            stats::new_flow(svc.id, s.conn.backend);
        } else {
            stop_after(lb_common::BENCH_STOP_CONNS)?;
            fwd::route(ctx, &s.l3, &mut s.fib, &s.conn)?;
        }
    }
    stop_after(lb_common::BENCH_STOP_ROUTE)?;
    let c = &s.conn;
    rewritten(nat::rewrite(ctx, &s.l3, s.key.sport_be, s.key.dport_be, c))?;
    stop_after(lb_common::BENCH_STOP_REWRITE)?;
    // The flow's service: the packet's, whichever way it was found.
    stats::flow(c.service, c.backend, len);
    Ok(fwd::send(ctx, s))
}

/// What `nat::rewrite`'s code means for the packet: a failed checksum update
/// drops it (it is rewritten already and must neither leave with a stale
/// checksum nor reach the stack); headers that vanished (cannot happen after
/// parsing; kept for the verifier) pass it.
#[inline(always)]
fn rewritten(code: u32) -> Result<(), Out> {
    match code {
        nat::REWRITTEN => Ok(()),
        reason::DROP_CSUM_FAILED => Err(Out::drop(code)),
        _ => Err(Out::pass(code)),
    }
}

/// Could this be a backend's reply to one of our SNAT (address, port) pairs?
#[inline(always)]
fn is_reply(s: &mut Scratch, cfg: &Config) -> bool {
    let dport = u16::from_be(s.key.dport_be);
    if !cfg.in_snat_range(dport) {
        return false;
    }
    // Field by field (a struct literal becomes calls to byte-by-byte
    // `memcpy` and `memset` on BPF); the family and the padding are one
    // 4-byte word.
    // SAFETY: `AddrKey` is 4-byte aligned: its address at 0, its family and
    // padding the word at 16; `FlowKey` is 8-byte aligned.
    unsafe {
        copy_addr(&mut s.addr_key.addr, &s.key.dst);
        write_volatile(
            &mut s.addr_key.family as *mut u8 as *mut u32,
            s.key.family as u32,
        );
    }
    SNAT_ADDRS.get_ptr(&s.addr_key).is_some()
}

/// The service for the packet's destination: exact address first, then the
/// wildcard (all-zero address): `decide::find_service`, as explain reads it.
#[inline(always)]
fn service(s: &mut Scratch) -> Option<&'static Service> {
    // Field by field: see `is_reply`.
    // SAFETY: `ServiceKey` is 4-byte aligned, `FlowKey` 8-byte aligned.
    unsafe { copy_addr(&mut s.svc_key.addr, &s.key.dst) };
    s.svc_key.port_be = s.key.dport_be;
    s.svc_key.proto = s.key.proto;
    s.svc_key.family = s.key.family;
    let lookup = |k: &ServiceKey| Ok::<_, Infallible>(SERVICES.get_ptr(k));
    let (p, _) = infallible(decide::find_service(&mut s.svc_key, lookup))?;
    // Copied, not kept: an update swaps in a new element, but the kernel's
    // BPF allocator may hand the old one to the next update before this run
    // ends (no RCU grace period on reuse since 6.1), and a Service read
    // field by field across the new-flow path was seen torn (the Maglev half
    // of one version, the SNAT range of another: tests `flip`). The copy is
    // one version, which is what makes a Maglev flip atomic (see maps.rs).
    // Into per-CPU map memory, not the stack: the verifier tracks stack
    // values and would walk the new-flow path once per variant.
    let copy = maps::SVC_COPY.get_ptr_mut(0)?;
    // SAFETY: `p` is a successful lookup's pointer to a whole Service,
    // `copy` this CPU's slot (used by one program run at a time); both
    // 4-byte aligned, 40 bytes.
    unsafe {
        let (src, dst) = (p as *const u32, copy as *mut u32);
        let mut i = 0;
        while i < size_of::<Service>() / 4 {
            write_volatile(dst.add(i), read_volatile(src.add(i)));
            i += 1;
        }
        Some(&*copy)
    }
}
