//! Full-NAT rewrite of the outer headers, checksums patched incrementally.

use ::core::mem::offset_of;
use lb_common::{csum, reason, Conn, PROTO_UDP};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    ctx::{ptr_at_mut, read16, write16, Packet},
    parse::{copy_addr, l4_csum_off, L3, L3_OFF},
};

/// IPv4: TTL and protocol share one checksum word.
const V4_TTL_WORD: usize = L3_OFF + offset_of!(Ipv4Hdr, ttl);
const V4_CHECK: usize = L3_OFF + offset_of!(Ipv4Hdr, check);
const V4_SRC: usize = L3_OFF + offset_of!(Ipv4Hdr, src_addr);
const V4_DST: usize = L3_OFF + offset_of!(Ipv4Hdr, dst_addr);
const V6_HOP_LIMIT: usize = L3_OFF + offset_of!(Ipv6Hdr, hop_limit);
const V6_SRC: usize = L3_OFF + offset_of!(Ipv6Hdr, src_addr);
const V6_DST: usize = L3_OFF + offset_of!(Ipv6Hdr, dst_addr);

/// Writes new addresses into the IP header, decrements TTL / hop limit and
/// fixes the IPv4 header checksum. Returns the address accumulator, which
/// every checksum with a pseudo-header must also absorb.
#[inline(always)]
pub fn rewrite_ip<C: Packet>(
    ctx: &mut C,
    l3: &L3,
    new_src: &[u8; 16],
    new_dst: &[u8; 16],
) -> Option<u32> {
    let v6 = l3.is_v6();
    let acc_addr = csum::add_addr(
        csum::add_addr(0, &l3.src, new_src, v6),
        &l3.dst,
        new_dst,
        v6,
    );
    if v6 {
        let src = ptr_at_mut::<C, [u8; 16]>(ctx, V6_SRC)?;
        let dst = ptr_at_mut::<C, [u8; 16]>(ctx, V6_DST)?;
        let hl = ptr_at_mut::<C, u8>(ctx, V6_HOP_LIMIT)?;
        // SAFETY: each pointer was bounds-checked by `ptr_at_mut` above;
        // the addresses sit at even offsets (see `copy_addr`).
        unsafe {
            copy_addr(src, new_src);
            copy_addr(dst, new_dst);
            *hl = l3.ttl - 1;
        }
    } else {
        let old_ttl_word = read16(ctx, V4_TTL_WORD)?;
        let new_ttl_word = old_ttl_word - 0x0100;
        let old_check = read16(ctx, V4_CHECK)?;
        let acc_ip = csum::add16(acc_addr, old_ttl_word, new_ttl_word);
        let src = ptr_at_mut::<C, [u8; 4]>(ctx, V4_SRC)?;
        let dst = ptr_at_mut::<C, [u8; 4]>(ctx, V4_DST)?;
        // SAFETY: each pointer was bounds-checked by `ptr_at_mut` above.
        unsafe {
            *src = [new_src[0], new_src[1], new_src[2], new_src[3]];
            *dst = [new_dst[0], new_dst[1], new_dst[2], new_dst[3]];
        }
        write16(ctx, V4_TTL_WORD, new_ttl_word)?;
        write16(ctx, V4_CHECK, csum::apply(old_check, acc_ip))?;
    }
    Some(acc_addr)
}

/// [`rewrite`]'s code for "done".
pub const REWRITTEN: u32 = u32::MAX;

/// Applies a connection entry to a TCP/UDP packet: addresses, ports, TTL and
/// every checksum. Returns [`REWRITTEN`], `reason::DROP_CSUM_FAILED` if the
/// L4 checksum could not be updated, or `reason::PASS_TRUNCATED` if the
/// headers vanished (cannot happen after parsing; kept for the verifier).
/// Out of line: its own BPF stack frame (see `conntrack::new_flow`), hence
/// the plain return code.
#[inline(never)]
pub fn rewrite<C: Packet>(ctx: &mut C, l3: &L3, sport_be: u16, dport_be: u16, c: &Conn) -> u32 {
    match rewrite_l4(ctx, l3, sport_be, dport_be, c) {
        Ok(()) => REWRITTEN,
        Err(code) => code,
    }
}

#[inline(always)]
fn rewrite_l4<C: Packet>(
    ctx: &mut C,
    l3: &L3,
    sport_be: u16,
    dport_be: u16,
    c: &Conn,
) -> Result<(), u32> {
    let gone = reason::PASS_TRUNCATED;
    let acc_addr = rewrite_ip(ctx, l3, &c.new_src, &c.new_dst).ok_or(gone)?;
    let old_sport = u16::from_be(sport_be);
    let old_dport = u16::from_be(dport_be);
    let new_sport = u16::from_be(c.new_sport_be);
    let new_dport = u16::from_be(c.new_dport_be);
    let acc_ports = csum::add16(csum::add16(0, old_sport, new_sport), old_dport, new_dport);
    // Source and destination ports are the first two words of TCP and UDP.
    write16(ctx, l3.l4_off(), new_sport).ok_or(gone)?;
    write16(ctx, l3.l4_off() + 2, new_dport).ok_or(gone)?;
    ctx.patch_l4_csum(
        l4_csum_off(l3.l4_off(), l3.proto),
        acc_addr,
        acc_ports,
        l3.proto == PROTO_UDP,
        l3.is_v6(),
    )
    .ok_or(reason::DROP_CSUM_FAILED)
}
