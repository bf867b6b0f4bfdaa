//! ICMP / ICMPv6 errors about NATed flows (PMTU discovery across the NAT).
//!
//! The inner packet is a copy of what one side sent; the entry found for its
//! reversed tuple says how the *other* side addressed that flow, so the same
//! entry rewrites the outer header (like the packet it is about) and, mirrored,
//! the inner one.

use ::core::mem::offset_of;
use lb_common::{csum, reason, FlowKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use network_types::{
    icmp::Icmpv4Hdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    clock::now,
    conntrack::copy_conn,
    ctx::{ptr_at, ptr_at_mut, read16, write16, Packet},
    fwd,
    maps::{CONFIG, CONNS, UNANSWERED},
    nat,
    out::{Out, Verdict},
    parse::{copy_addr, l4_csum_off, L3_OFF},
    scratch::Scratch,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// ICMP and ICMPv6 headers are both 8 bytes before the quoted packet.
const ICMP_HDR_LEN: usize = Icmpv4Hdr::LEN;
const ICMP_CHECK: usize = offset_of!(Icmpv4Hdr, check);
/// Bytes of the quoted TCP/UDP header an error must carry (RFC 792).
const QUOTED_L4_MIN: usize = 8;

/// Out of line: a BPF subprogram with its own stack frame, so the ICMP
/// temporaries never share the 512-byte stack with the TCP/UDP path's.
#[inline(never)]
pub fn translate<C: Packet>(ctx: &mut C, s: &mut Scratch) -> Result<Out, Out> {
    let l3 = &s.l3;
    let hdr = ptr_at::<C, Icmpv4Hdr>(ctx, l3.l4_off()).ok_or(Out::pass(reason::PASS_TRUNCATED))?;
    // SAFETY: `ptr_at` bounds-checked the whole 8-byte ICMP/ICMPv6 header.
    let ty = unsafe { (*hdr).type_ };
    let v6 = l3.is_v6();
    let is_error = if v6 {
        ty == ICMPV6_DEST_UNREACH || ty == ICMPV6_PACKET_TOO_BIG
    } else {
        ty == ICMP_DEST_UNREACH
    };
    if !is_error {
        return Err(Out::pass(reason::PASS_OTHER_PROTO));
    }
    let l4_off = l3.l4_off();
    let ttl = l3.ttl;
    let inner_off = l4_off + ICMP_HDR_LEN;
    let inner_l4_off = if v6 {
        inner_v6(ctx, inner_off, &mut s.key)?
    } else {
        inner_v4(ctx, inner_off, &mut s.key)?
    };
    // The quote must hold 8 bytes of TCP/UDP (RFC 792) inside the outer IP
    // packet: bytes past its length (Ethernet padding) are not part of the
    // message and not covered by its checksum.
    let ip_end = L3_OFF + s.l3.ip_len as usize;
    if inner_l4_off + QUOTED_L4_MIN > ip_end {
        return Err(Out::pass(reason::PASS_TRUNCATED));
    }
    let ports = ptr_at::<C, [u8; QUOTED_L4_MIN]>(ctx, inner_l4_off)
        .ok_or(Out::pass(reason::PASS_TRUNCATED))?;
    // SAFETY: `ptr_at` bounds-checked the 8 quoted bytes.
    let ports = unsafe { *ports };
    s.key.sport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    s.key.dport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    s.key2 = s.key.reversed();
    flow_of_quote(ctx, s)?;
    if ttl <= 1 {
        return Err(Out::pass(reason::PASS_TTL_EXPIRED));
    }
    let e = &s.conn;
    fwd::route(ctx, &s.l3, &mut s.fib, e)?;
    let ikey = &s.key;

    // Inner packet: it now reads as what the other side sent.
    let acc_addr = csum::add_addr(
        csum::add_addr(0, &ikey.src, &e.new_dst, v6),
        &ikey.dst,
        &e.new_src,
        v6,
    );
    let acc_ports = csum::add16(
        csum::add16(0, u16::from_be(ikey.sport_be), u16::from_be(e.new_dport_be)),
        u16::from_be(ikey.dport_be),
        u16::from_be(e.new_sport_be),
    );
    let mut acc_icmp = acc_addr + acc_ports;
    let bad = Out::pass(reason::PASS_TRUNCATED);
    if v6 {
        let src =
            ptr_at_mut::<C, [u8; 16]>(ctx, inner_off + offset_of!(Ipv6Hdr, src_addr)).ok_or(bad)?;
        let dst =
            ptr_at_mut::<C, [u8; 16]>(ctx, inner_off + offset_of!(Ipv6Hdr, dst_addr)).ok_or(bad)?;
        // SAFETY: both pointers were bounds-checked by `ptr_at_mut`; the
        // quoted addresses sit at even offsets (see `copy_addr`).
        unsafe {
            copy_addr(src, &e.new_dst);
            copy_addr(dst, &e.new_src);
        }
    } else {
        let check_off = inner_off + offset_of!(Ipv4Hdr, check);
        let old = read16(ctx, check_off).ok_or(bad)?;
        let new = csum::apply(old, acc_addr);
        write16(ctx, check_off, new).ok_or(bad)?;
        acc_icmp = csum::add16(acc_icmp, old, new);
        let src =
            ptr_at_mut::<C, [u8; 4]>(ctx, inner_off + offset_of!(Ipv4Hdr, src_addr)).ok_or(bad)?;
        let dst =
            ptr_at_mut::<C, [u8; 4]>(ctx, inner_off + offset_of!(Ipv4Hdr, dst_addr)).ok_or(bad)?;
        // SAFETY: both pointers were bounds-checked by `ptr_at_mut`.
        unsafe {
            *src = [e.new_dst[0], e.new_dst[1], e.new_dst[2], e.new_dst[3]];
            *dst = [e.new_src[0], e.new_src[1], e.new_src[2], e.new_src[3]];
        }
    }
    write16(ctx, inner_l4_off, u16::from_be(e.new_dport_be)).ok_or(bad)?;
    write16(ctx, inner_l4_off + 2, u16::from_be(e.new_sport_be)).ok_or(bad)?;
    // The quoted L4 checksum is only there if the router quoted enough bytes
    // (RFC 792 promises 8; Linux quotes far more).
    let l4_check = l4_csum_off(inner_l4_off, ikey.proto);
    let quoted_check = if l4_check + 2 <= ip_end {
        read16(ctx, l4_check)
    } else {
        None
    };
    if let Some(old) = quoted_check {
        let acc = acc_addr + acc_ports;
        let new = if ikey.proto == PROTO_UDP {
            csum::apply_udp(old, acc)
        } else {
            csum::apply(old, acc)
        };
        write16(ctx, l4_check, new).ok_or(bad)?;
        acc_icmp = csum::add16(acc_icmp, old, new);
    }

    // Outer header: from the VIP to the client, or from SNAT to the backend.
    let acc_outer = nat::rewrite_ip(ctx, &s.l3, &e.new_src, &e.new_dst).ok_or(bad)?;
    if v6 {
        // ICMPv6 covers the IPv6 pseudo-header (RFC 4443 2.3).
        acc_icmp += acc_outer;
    }
    let check_off = l4_off + ICMP_CHECK;
    let old = read16(ctx, check_off).ok_or(bad)?;
    write16(ctx, check_off, csum::apply(old, acc_icmp)).ok_or(bad)?;

    let mut out = fwd::send(ctx, s);
    if out.verdict == Verdict::Tx || out.verdict == Verdict::Redirect {
        out.reason = reason::FWD_ICMP;
    }
    Ok(out)
}

/// Copies into `s.conn` the entry of the flow the error quotes (`s.key2`:
/// the quoted packet's tuple, reversed), from either table. The error must
/// come from the side of the flow the quoted packet went to: an error about
/// what we sent a backend (a reverse entry) on the interface the backend is
/// reached by, an error about our reply to a client (a forward entry) on the
/// one the client's packets arrive on; and the flow must be live. Else it is
/// dropped: translated, a forged error would reach a client from the VIP,
/// or a backend from the SNAT address.
#[inline(always)]
fn flow_of_quote<C: Packet>(ctx: &mut C, s: &mut Scratch) -> Result<(), Out> {
    // SAFETY: read-only, copied at once (an LRU element can be recycled
    // for another flow as soon as it is evicted).
    match unsafe { CONNS.get(&s.key2) } {
        // SAFETY: a whole entry from the lookup just made.
        Some(c) => unsafe { copy_conn(&mut s.conn, c) },
        // SAFETY: as above.
        None => match unsafe { UNANSWERED.get(&s.key2) } {
            // SAFETY: as above.
            Some(c) => unsafe { copy_conn(&mut s.conn, c) },
            None => return Err(Out::pass(reason::PASS_ICMP_NO_FLOW)),
        },
    }
    let rejected = Out::drop(reason::DROP_ICMP_REJECTED);
    // CONFIG is an array: the lookup of index 0 cannot fail once loaded.
    let cfg = CONFIG.get(0).ok_or(rejected)?;
    if s.conn.expired(s.key2.proto, cfg, now()) {
        return Err(rejected);
    }
    if s.conn.ifindex != ctx.ingress_ifindex() {
        // Unless that side is now reached by the interface it came in by
        // (see `fwd::comes_from`): the flow's peer is `s.key2.src`.
        s.peek.new_src = s.key2.dst;
        s.peek.new_dst = s.key2.src;
        if !fwd::comes_from(ctx, &s.l3, &mut s.fib, &s.peek) {
            return Err(rejected);
        }
    }
    Ok(())
}

#[inline(always)]
fn inner_v4<C: Packet>(ctx: &C, off: usize, k: &mut FlowKey) -> Result<usize, Out> {
    let ip = ptr_at::<C, Ipv4Hdr>(ctx, off).ok_or(Out::pass(reason::PASS_TRUNCATED))?;
    // SAFETY: `ptr_at` bounds-checked the inner IPv4 header.
    let ip = unsafe { &*ip };
    if ip.version() != 4 || ip.ihl() != 20 || (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP) {
        return Err(Out::pass(reason::PASS_ICMP_NO_FLOW));
    }
    *k = FlowKey {
        proto: ip.proto,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    k.src[..4].copy_from_slice(&ip.src_addr);
    k.dst[..4].copy_from_slice(&ip.dst_addr);
    Ok(off + Ipv4Hdr::LEN)
}

#[inline(always)]
fn inner_v6<C: Packet>(ctx: &C, off: usize, k: &mut FlowKey) -> Result<usize, Out> {
    let ip = ptr_at::<C, Ipv6Hdr>(ctx, off).ok_or(Out::pass(reason::PASS_TRUNCATED))?;
    // SAFETY: `ptr_at` bounds-checked the inner IPv6 header.
    let ip = unsafe { &*ip };
    if ip.version() != 6 || (ip.next_hdr != PROTO_TCP && ip.next_hdr != PROTO_UDP) {
        return Err(Out::pass(reason::PASS_ICMP_NO_FLOW));
    }
    *k = FlowKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto: ip.next_hdr,
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    Ok(off + Ipv6Hdr::LEN)
}
