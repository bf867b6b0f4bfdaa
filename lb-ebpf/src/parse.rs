//! Header parsing. Every function returns `Err(reason)` for a packet it does
//! not fully understand; the caller passes such packets on untouched.

use ::core::{
    mem::offset_of,
    ptr::{read_volatile, write_volatile},
};
use lb_common::{
    reason, FlowKey, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::ctx::{ptr_at, Packet};

/// Fixed offsets: IPv4 options are never parsed, so L4 always starts here.
pub const L3_OFF: usize = EthHdr::LEN;
pub const L4_OFF_V4: usize = L3_OFF + Ipv4Hdr::LEN;
pub const L4_OFF_V6: usize = L3_OFF + Ipv6Hdr::LEN;

/// IPv4 flags+offset word: MF bit and the 13-bit offset.
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// IPv6 extension headers (RFC 8200 4.1 and IANA): hop-by-hop, routing,
/// fragment, ESP, AH, destination options, mobility, HIP, shim6.
const IPV6_EXT: [u8; 9] = [0, 43, 44, 50, 51, 60, 135, 139, 140];

pub use lb_common::tcp::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN};

/// A TCP segment's sequence and acknowledgment numbers (host order).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Seg {
    pub seq: u32,
    pub ack: u32,
}

/// What the network layer told us.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct L3 {
    /// First and 8-byte aligned: stored (and zeroed) a word at a time. At
    /// an odd alignment LLVM calls a byte-by-byte `memset`/`memcpy` on BPF
    /// for every packet.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    pub proto: u8,
    pub ttl: u8,
    /// IPv4 total length or IPv6 payload length + 40.
    pub ip_len: u16,
}

impl L3 {
    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.family == FAMILY_V6
    }

    /// A constant per family rather than a stored field: a value read back
    /// from the scratch map is an unbounded scalar to the verifier, and
    /// packet-pointer arithmetic needs bounded offsets.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        if self.is_v6() {
            L4_OFF_V6
        } else {
            L4_OFF_V4
        }
    }
}

/// Zeroes an address four bytes at a time (`= [0; 16]` compiles to a call
/// to a byte-by-byte `memset` on BPF).
///
/// # Safety
///
/// `dst` is 4-byte aligned.
#[inline(always)]
pub unsafe fn zero_addr(dst: *mut [u8; 16]) {
    let d = dst as *mut u32;
    let mut i = 0;
    while i < 4 {
        // SAFETY: inside `dst`, aligned by the caller's promise.
        unsafe { write_volatile(d.add(i), 0) };
        i += 1;
    }
}

/// Copies an IPv6 address into or out of the packet two bytes at a time
/// (IPv6 addresses sit at even offsets from the frame's start). `*dst =
/// *src` would compile to a call to a byte-by-byte `memcpy` (the packet
/// gives LLVM no alignment); volatile keeps it from turning this back into
/// one.
///
/// # Safety
///
/// Both point to 16 bytes, at even addresses, in the packet (bounds
/// checked by `ptr_at`) or in memory of ours.
#[inline(always)]
pub unsafe fn copy_addr(dst: *mut [u8; 16], src: *const [u8; 16]) {
    let s = src as *const u16;
    let d = dst as *mut u16;
    let mut i = 0;
    while i < 8 {
        // SAFETY: by the caller's promise. Two-byte accesses at even
        // addresses (BPF would allow them unaligned on these hosts anyway).
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        i += 1;
    }
}

/// The protocol and destination port (host order) of a plain TCP or UDP
/// packet: IPv4 without options or fragmentation, IPv6 with TCP or UDP
/// right after its header. `None` for anything else, which the full parse
/// then names. Reads the packet only: the first test of every packet
/// (`core::run`).
#[inline(always)]
pub fn dest_port<C: Packet>(ctx: &C) -> Option<(u8, u16)> {
    // SAFETY (all reads below): `ptr_at` bounds-checked each one.
    let ether_type = unsafe { *ptr_at::<C, u16>(ctx, 12)? };
    let (proto, l4) = if ether_type == EtherType::Ipv4 as u16 {
        let ver_ihl = unsafe { *ptr_at::<C, u8>(ctx, L3_OFF)? };
        let frags = unsafe { *ptr_at::<C, u16>(ctx, L3_OFF + 6)? };
        if ver_ihl != 0x45 || u16::from_be(frags) & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
            return None;
        }
        (unsafe { *ptr_at::<C, u8>(ctx, L3_OFF + 9)? }, L4_OFF_V4)
    } else if ether_type == EtherType::Ipv6 as u16 {
        if unsafe { *ptr_at::<C, u8>(ctx, L3_OFF)? } >> 4 != 6 {
            return None;
        }
        (unsafe { *ptr_at::<C, u8>(ctx, L3_OFF + 6)? }, L4_OFF_V6)
    } else {
        return None;
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let dport = unsafe { *ptr_at::<C, u16>(ctx, l4 + 2)? };
    Some((proto, u16::from_be(dport)))
}

/// Parses Ethernet and IP into `out`.
#[inline(always)]
pub fn l3<C: Packet>(ctx: &C, out: &mut L3) -> Result<(), u32> {
    let eth = ptr_at::<C, EthHdr>(ctx, 0).ok_or(reason::PASS_TRUNCATED)?;
    // SAFETY: `ptr_at` bounds-checked the Ethernet header.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        ipv4(ctx, out)
    } else if ether_type == EtherType::Ipv6 as u16 {
        ipv6(ctx, out)
    } else {
        Err(reason::PASS_NOT_IP)
    }
}

#[inline(always)]
fn ipv4<C: Packet>(ctx: &C, out: &mut L3) -> Result<(), u32> {
    let ip = ptr_at::<C, Ipv4Hdr>(ctx, L3_OFF).ok_or(reason::PASS_TRUNCATED)?;
    // SAFETY: `ptr_at` bounds-checked the IPv4 header.
    let ip = unsafe { &*ip };
    if ip.version() != 4 || ip.ihl() < 20 {
        return Err(reason::PASS_BAD_HEADER);
    }
    if ip.ihl() != 20 {
        return Err(reason::PASS_IP_OPTIONS);
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return Err(reason::PASS_FRAGMENT);
    }
    out.family = FAMILY_V4;
    out.proto = ip.proto;
    // SAFETY: `L3` is 8-byte aligned and its addresses come first.
    unsafe {
        zero_addr(&mut out.src);
        zero_addr(&mut out.dst);
    }
    out.src[..4].copy_from_slice(&ip.src_addr);
    out.dst[..4].copy_from_slice(&ip.dst_addr);
    out.ttl = ip.ttl;
    out.ip_len = u16::from_be_bytes(ip.tot_len);
    Ok(())
}

#[inline(always)]
fn ipv6<C: Packet>(ctx: &C, out: &mut L3) -> Result<(), u32> {
    let ip = ptr_at::<C, Ipv6Hdr>(ctx, L3_OFF).ok_or(reason::PASS_TRUNCATED)?;
    // SAFETY: `ptr_at` bounds-checked the IPv6 header.
    let ip = unsafe { &*ip };
    if ip.version() != 6 {
        return Err(reason::PASS_BAD_HEADER);
    }
    let nh = ip.next_hdr;
    let mut i = 0;
    while i < IPV6_EXT.len() {
        if nh == IPV6_EXT[i] {
            return Err(if nh == 44 {
                reason::PASS_FRAGMENT
            } else {
                reason::PASS_IPV6_EXT
            });
        }
        i += 1;
    }
    out.family = FAMILY_V6;
    out.proto = nh;
    // SAFETY: the header was bounds-checked by `ptr_at`; its addresses
    // start at even offsets, `out` is 8-byte aligned.
    unsafe {
        copy_addr(&mut out.src, &ip.src_addr);
        copy_addr(&mut out.dst, &ip.dst_addr);
    }
    out.ttl = ip.hop_limit;
    out.ip_len = u16::from_be_bytes(ip.payload_len).wrapping_add(Ipv6Hdr::LEN as u16);
    Ok(())
}

/// TCP or UDP on top of `l3`: fills the flow key and `seg`, returns the TCP
/// flags.
#[inline(always)]
pub fn l4<C: Packet>(ctx: &C, l3: &L3, key: &mut FlowKey, seg: &mut Seg) -> Result<u8, u32> {
    key.src = l3.src;
    key.dst = l3.dst;
    key.proto = l3.proto;
    key.family = l3.family;
    key._pad = [0; 2];
    let mut flags = 0;
    if l3.proto == PROTO_TCP {
        let tcp = ptr_at::<C, TcpHdr>(ctx, l3.l4_off()).ok_or(reason::PASS_TRUNCATED)?;
        // SAFETY: `ptr_at` bounds-checked the TCP header.
        let tcp = unsafe { &*tcp };
        if tcp.doff() < 5 {
            return Err(reason::PASS_BAD_HEADER);
        }
        key.sport_be = u16::from_ne_bytes(tcp.source);
        key.dport_be = u16::from_ne_bytes(tcp.dest);
        seg.seq = u32::from_be_bytes(tcp.seq);
        seg.ack = u32::from_be_bytes(tcp.ack_seq);
        flags = tcp_flags(tcp);
    } else if l3.proto == PROTO_UDP {
        let udp = ptr_at::<C, UdpHdr>(ctx, l3.l4_off()).ok_or(reason::PASS_TRUNCATED)?;
        // SAFETY: `ptr_at` bounds-checked the UDP header.
        let udp = unsafe { &*udp };
        key.sport_be = u16::from_ne_bytes(udp.src);
        key.dport_be = u16::from_ne_bytes(udp.dst);
    } else {
        return Err(reason::PASS_OTHER_PROTO);
    }
    Ok(flags)
}

#[inline(always)]
fn tcp_flags(tcp: &TcpHdr) -> u8 {
    let mut f = 0;
    if tcp.fin() != 0 {
        f |= TCP_FIN;
    }
    if tcp.syn() != 0 {
        f |= TCP_SYN;
    }
    if tcp.rst() != 0 {
        f |= TCP_RST;
    }
    if tcp.ack() != 0 {
        f |= TCP_ACK;
    }
    f
}

/// Is `proto` an ICMP for this family?
#[inline(always)]
pub fn is_icmp(l3: &L3) -> bool {
    (l3.family == FAMILY_V4 && l3.proto == PROTO_ICMP)
        || (l3.family == FAMILY_V6 && l3.proto == PROTO_ICMPV6)
}

/// Offset of the L4 checksum field.
#[inline(always)]
pub fn l4_csum_off(l4_off: usize, proto: u8) -> usize {
    if proto == PROTO_TCP {
        l4_off + offset_of!(TcpHdr, check)
    } else {
        l4_off + offset_of!(UdpHdr, check)
    }
}
