//! The packet-test fixture: a loaded data plane inside a private network
//! namespace, driven with `BPF_PROG_TEST_RUN`.
//!
//! Topology inside the namespace (veth pairs, because the test kernels are
//! built without the `dummy` driver; each peer stays in the namespace, down
//! to nothing but a carrier):
//!
//! ```text
//!   clients 10.0.0.2 / fd00::2 (02:00:00:00:00:a2)
//!        |
//!   front 02:00:00:00:00:01  10.0.0.1/24  fd00::1/64     VIPs 10.0.0.100, fd00::100
//!   back  02:00:00:00:00:02  10.1.0.1/24  fd01::1/64     (SNAT addresses)
//!        |
//!   backends 10.1.0.11..20 / fd01::11..20 (02:00:00:00:01:NN)
//! ```
//!
//! `BPF_PROG_TEST_RUN` runs the program in the calling thread's network
//! namespace. A frame from a back-side address (a backend, the back router)
//! arrives on `back`, as it would on the wire: the data plane accepts a
//! backend's packets only on the interface the flow's backend is reached by.
//! Any other frame arrives on the loopback (ingress ifindex 1), so its
//! forwards are `XDP_REDIRECT`s; for TC the skb's device is the loopback
//! either way. `bpf_fib_lookup` then resolves routes and the permanent
//! neighbours configured here. [`PacketLab::run_on`] picks the interface.

use std::{
    fmt::Write as _,
    marker::PhantomData,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{ProgramError, TestRun, TestRunOptions};
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpHeaders, IpNumber, Ipv4Header, Ipv6Header, PacketBuilder, TcpHeader,
};
use lb_common::{
    hash::flow_hash, reason, AddrKey, Backend, Config, Conn, Counters, FlowKey, Service,
    ServiceKey, BACKEND_ACTIVE, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};
use lb_user::dataplane::maps::{DataPlane, L4Csum, LoadOptions};
use nix::{
    sched::{sched_setaffinity, CpuSet},
    unistd::Pid,
};
use testkit::netns::{self, NetNs, NsGuard};

// ---- the topology -------------------------------------------------------------

pub const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa2];

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
pub const SNAT_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
pub const SNAT_V6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 1);
/// A router on the backend side (sends ICMP errors about SNATed packets).
pub const BACK_ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
pub const BACK_ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0xfe);
/// A router on the client side (sends ICMP errors about replies).
pub const FRONT_ROUTER_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
pub const FRONT_ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

/// `CONFIG.snat_port_min..=snat_port_max`: the union of every SNAT range the
/// tests give their services.
pub const SNAT_PORTS: RangeInclusive<u16> = 40000..=49999;
/// Maglev size per half (prime).
pub const MAGLEV_SIZE: u32 = 251;
/// `CONFIG.hash_key` of every lab: the key the flow hash picks backends and
/// SNAT ports with ([`lab_hash`]).
pub const LAB_HASH_KEY: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];

/// The flow hash as the lab's data plane computes it.
pub fn lab_hash(key: &FlowKey) -> u32 {
    flow_hash(key, &LAB_HASH_KEY)
}
pub const MAX_TEST_SERVICES: u32 = 8;

/// Backends are numbered like their addresses: `n` in 11..=20 is 10.1.0.n,
/// fd01::<n as written in decimal, read as hex>, MAC 02:00:00:00:01:<same>.
pub const BACKEND_NUMBERS: RangeInclusive<u8> = 11..=20;

fn decimal_as_hex(n: u8) -> u8 {
    (n / 10) * 16 + n % 10
}

pub fn backend_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, n)
}

pub fn backend_v6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, decimal_as_hex(n) as u16)
}

pub fn backend_mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, decimal_as_hex(n)]
}

/// The neighbour MAC the namespace knows for `addr`, if any.
pub fn neighbour_mac(addr: IpAddr) -> Option<[u8; 6]> {
    if addr == IpAddr::V4(CLIENT_V4) || addr == IpAddr::V6(CLIENT_V6) {
        return Some(CLIENT_MAC);
    }
    BACKEND_NUMBERS
        .clone()
        .find(|&n| addr == IpAddr::V4(backend_v4(n)) || addr == IpAddr::V6(backend_v6(n)))
        .map(backend_mac)
}

/// Whether `addr` lives behind `back` (else behind `front`).
pub fn is_back_side(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.octets()[..3] == [10, 1, 0],
        IpAddr::V6(a) => a.segments()[0] == 0xfd01,
    }
}

pub fn snat_addr_for(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => IpAddr::V4(SNAT_V4),
        IpAddr::V6(_) => IpAddr::V6(SNAT_V6),
    }
}

// ---- hooks and their action codes ---------------------------------------------

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_OK,
        }
    }

    pub fn drop_(self) -> u32 {
        match self {
            Hook::Xdp => XDP_DROP,
            Hook::Tc => TC_ACT_SHOT,
        }
    }

    pub fn redirect(self) -> u32 {
        match self {
            Hook::Xdp => XDP_REDIRECT,
            Hook::Tc => TC_ACT_REDIRECT,
        }
    }

    /// Whether `BPF_PROG_TEST_RUN` may refuse `frame` with EINVAL before
    /// the program runs. bpf_prog_test_run_xdp wants an Ethernet header
    /// (`size < ETH_HLEN`); bpf_prog_test_run_skb on 6.18 also refuses an
    /// IPv4/IPv6 ethertype without a complete fixed IP header (measured:
    /// 33 bytes of IPv4 or 53 of IPv6 fail, 34 / 54 run).
    pub fn kernel_may_refuse(self, frame: &[u8]) -> bool {
        if frame.len() < ETH_LEN {
            return true;
        }
        match (self, be16(frame, 12)) {
            (Hook::Xdp, _) => false,
            (Hook::Tc, 0x0800) => frame.len() < ETH_LEN + 20,
            (Hook::Tc, 0x86dd) => frame.len() < ETH_LEN + 40,
            (Hook::Tc, _) => false,
        }
    }

    pub fn action_name(self, action: u32) -> String {
        let name = match (self, action) {
            (Hook::Xdp, 0) => "XDP_ABORTED",
            (Hook::Xdp, 1) => "XDP_DROP",
            (Hook::Xdp, 2) => "XDP_PASS",
            (Hook::Xdp, 3) => "XDP_TX",
            (Hook::Xdp, 4) => "XDP_REDIRECT",
            (Hook::Tc, 0) => "TC_ACT_OK",
            (Hook::Tc, 2) => "TC_ACT_SHOT",
            (Hook::Tc, 7) => "TC_ACT_REDIRECT",
            _ => "?",
        };
        format!("{action} ({name})")
    }

    /// The Ethernet addresses a forwarded frame carries: XDP writes the FIB
    /// result's MACs, TC leaves the header to `bpf_redirect_neigh`.
    pub fn fwd_eth(self, input: &Pkt, next_hop: IpAddr) -> ([u8; 6], [u8; 6]) {
        match self {
            Hook::Tc => (input.eth_src, input.eth_dst),
            Hook::Xdp => {
                let egress = if is_back_side(next_hop) {
                    BACK_MAC
                } else {
                    FRONT_MAC
                };
                let dst = neighbour_mac(next_hop)
                    .unwrap_or_else(|| panic!("test bug: {next_hop} has no neighbour entry"));
                (egress, dst)
            }
        }
    }
}

// ---- packet descriptions ------------------------------------------------------

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    /// `zero_csum`: send the UDP/IPv4 "no checksum" value 0.
    Udp {
        sport: u16,
        dport: u16,
        zero_csum: bool,
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6), chosen by the addresses.
    Icmp { typ: u8, code: u8, rest: [u8; 4] },
}

/// A frame described by its fields; [`Pkt::build`] serialises it with every
/// length and checksum computed by etherparse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 identification (ignored for IPv6).
    pub ip_id: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Pkt {
    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        let (eth_src, eth_dst) = if is_back_side(src) {
            (neighbour_mac(src).unwrap_or(BACKEND_ROUTER_MAC), BACK_MAC)
        } else {
            (neighbour_mac(src).unwrap_or(CLIENT_MAC), FRONT_MAC)
        };
        Self {
            eth_src,
            eth_dst,
            src,
            dst,
            ttl: 64,
            ip_id: 0x1234,
            l4,
            payload: Vec::new(),
        }
    }

    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Self {
        let ack = if flags & TCP_ACK != 0 { 7001 } else { 0 };
        let l4 = L4::Tcp {
            sport: src.port(),
            dport: dst.port(),
            seq: 1000,
            ack,
            flags,
        };
        Self::new(src.ip(), dst.ip(), l4)
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Self {
        let l4 = L4::Udp {
            sport: src.port(),
            dport: dst.port(),
            zero_csum: false,
        };
        Self {
            payload: payload.to_vec(),
            ..Self::new(src.ip(), dst.ip(), l4)
        }
    }

    /// An ICMP error carrying `inner` (an IP packet without Ethernet).
    pub fn icmp(src: IpAddr, dst: IpAddr, typ: u8, code: u8, rest: [u8; 4], inner: &[u8]) -> Self {
        Self {
            payload: inner.to_vec(),
            ..Self::new(src, dst, L4::Icmp { typ, code, rest })
        }
    }

    /// IPv4 "fragmentation needed" (type 3 code 4) with next-hop MTU `mtu`.
    pub fn frag_needed(src: Ipv4Addr, dst: Ipv4Addr, mtu: u16, inner: &[u8]) -> Self {
        let m = mtu.to_be_bytes();
        Self::icmp(src.into(), dst.into(), 3, 4, [0, 0, m[0], m[1]], inner)
    }

    /// ICMPv6 "packet too big" (type 2) with MTU `mtu`.
    pub fn packet_too_big(src: Ipv6Addr, dst: Ipv6Addr, mtu: u32, inner: &[u8]) -> Self {
        Self::icmp(src.into(), dst.into(), 2, 0, mtu.to_be_bytes(), inner)
    }

    pub fn with_eth(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn with_flags(mut self, f: u8) -> Self {
        if let L4::Tcp { flags, ack, .. } = &mut self.l4 {
            *flags = f;
            *ack = if f & TCP_ACK != 0 { 7001 } else { 0 };
        }
        self
    }

    /// TCP sequence and acknowledgment numbers (`Pkt::tcp` uses 1000, and
    /// 7001 with ACK).
    pub fn with_seq_ack(mut self, s: u32, a: u32) -> Self {
        if let L4::Tcp { seq, ack, .. } = &mut self.l4 {
            *seq = s;
            *ack = a;
        }
        self
    }

    pub fn with_zero_udp_csum(mut self) -> Self {
        if let L4::Udp { zero_csum, .. } = &mut self.l4 {
            *zero_csum = true;
        }
        self
    }

    /// Same packet from `src` (address and port).
    pub fn from(mut self, src: SocketAddr) -> Self {
        self.src = src.ip();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = src.port(),
            L4::Icmp { .. } => {}
        }
        self
    }

    /// Same packet to `dst` (address and port).
    pub fn to(mut self, dst: SocketAddr) -> Self {
        self.dst = dst.ip();
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = dst.port(),
            L4::Icmp { .. } => {}
        }
        self
    }

    pub fn src_sock(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.ports().0)
    }

    pub fn dst_sock(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.ports().1)
    }

    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
            L4::Icmp { .. } => (0, 0),
        }
    }

    pub fn proto(&self) -> u8 {
        match (&self.l4, self.src) {
            (L4::Tcp { .. }, _) => PROTO_TCP,
            (L4::Udp { .. }, _) => PROTO_UDP,
            (L4::Icmp { .. }, IpAddr::V4(_)) => PROTO_ICMP,
            (L4::Icmp { .. }, IpAddr::V6(_)) => PROTO_ICMPV6,
        }
    }

    /// The `CONNS` key this packet looks up (its own 5-tuple).
    pub fn flow_key(&self) -> FlowKey {
        flow_key(self.src_sock(), self.dst_sock(), self.proto())
    }

    pub fn build(&self) -> Vec<u8> {
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(0, self.ttl, IpNumber::TCP, s.octets(), d.octets())
                    .expect("empty IPv4 payload fits");
                h.identification = self.ip_id;
                IpHeaders::Ipv4(h, Default::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                Ipv6Header {
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                    next_header: IpNumber::TCP,
                    ..Default::default()
                },
                Default::default(),
            ),
            _ => panic!(
                "test bug: mixed address families {} -> {}",
                self.src, self.dst
            ),
        };
        let v4 = self.src.is_ipv4();
        let b = PacketBuilder::ethernet2(self.eth_src, self.eth_dst).ip(ip);
        let mut out = Vec::new();
        let res = match self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
            } => {
                let mut h = TcpHeader::new(sport, dport, seq, 64240);
                h.fin = flags & TCP_FIN != 0;
                h.syn = flags & TCP_SYN != 0;
                h.rst = flags & TCP_RST != 0;
                h.psh = flags & TCP_PSH != 0;
                h.ack = flags & TCP_ACK != 0;
                h.acknowledgment_number = ack;
                b.tcp_header(h).write(&mut out, &self.payload)
            }
            L4::Udp { sport, dport, .. } => b.udp(sport, dport).write(&mut out, &self.payload),
            L4::Icmp { typ, code, rest } if v4 => b
                .icmpv4(Icmpv4Type::Unknown {
                    type_u8: typ,
                    code_u8: code,
                    bytes5to8: rest,
                })
                .write(&mut out, &self.payload),
            L4::Icmp { typ, code, rest } => b
                .icmpv6(Icmpv6Type::Unknown {
                    type_u8: typ,
                    code_u8: code,
                    bytes5to8: rest,
                })
                .write(&mut out, &self.payload),
        };
        res.unwrap_or_else(|e| panic!("test bug: cannot serialise {self:?}: {e}"));
        if let L4::Udp {
            zero_csum: true, ..
        } = self.l4
        {
            assert!(v4, "test bug: UDP checksum 0 is only legal over IPv4");
            let at = ETH_LEN + ip_header_len(&out[ETH_LEN..]) + 6;
            out[at..at + 2].copy_from_slice(&[0, 0]);
        }
        out
    }

    /// The IP packet alone (what an ICMP error quotes).
    pub fn build_ip(&self) -> Vec<u8> {
        self.build()[ETH_LEN..].to_vec()
    }
}

/// Source MAC used for frames from back-side hosts without a neighbour entry.
pub const BACKEND_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];

pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    let mut k = FlowKey {
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto,
        ..Default::default()
    };
    k.family = addr_bytes(src.ip(), &mut k.src);
    addr_bytes(dst.ip(), &mut k.dst);
    k
}

/// Writes `a` as the maps store it; returns its `FAMILY_*`.
pub fn addr_bytes(a: IpAddr, out: &mut [u8; 16]) -> u8 {
    match a {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            FAMILY_V4
        }
        IpAddr::V6(a) => {
            out.copy_from_slice(&a.octets());
            FAMILY_V6
        }
    }
}

pub fn addr16(a: IpAddr) -> [u8; 16] {
    let mut out = [0; 16];
    addr_bytes(a, &mut out);
    out
}

pub fn sock(a: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(a.into(), port)
}

// ---- raw parsing and checksum verification --------------------------------------
//
// Written from the RFCs, independent of etherparse (which builds the packets)
// and of lb-common (the code under test).

pub const ETH_LEN: usize = 14;

fn ip_header_len(ip: &[u8]) -> usize {
    if ip[0] >> 4 == 4 {
        (ip[0] & 0x0f) as usize * 4
    } else {
        40
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// One's-complement sum of `data` added to `sum` (not folded).
fn ones_sum(data: &[u8], mut sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

fn sums_to_ffff(mut sum: u64) -> bool {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// An IP header as seen in a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpView {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub proto: u8,
    pub header_len: usize,
    /// Header + payload as the header claims.
    pub total_len: usize,
    /// IPv4 MF set or offset != 0.
    pub fragment: bool,
}

/// Parses the IP header at the start of `b` (no extension headers).
pub fn parse_ip(b: &[u8]) -> Option<IpView> {
    match *b.first()? >> 4 {
        4 => {
            let ihl = (b[0] & 0x0f) as usize * 4;
            if b.len() < 20 || ihl < 20 || b.len() < ihl {
                return None;
            }
            let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]).into();
            let dst = Ipv4Addr::new(b[16], b[17], b[18], b[19]).into();
            let frag = be16(b, 6);
            Some(IpView {
                src,
                dst,
                ttl: b[8],
                proto: b[9],
                header_len: ihl,
                total_len: be16(b, 2) as usize,
                fragment: frag & 0x3fff != 0,
            })
        }
        6 => {
            if b.len() < 40 {
                return None;
            }
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&b[8..24]).unwrap()).into();
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&b[24..40]).unwrap()).into();
            Some(IpView {
                src,
                dst,
                ttl: b[7],
                proto: b[6],
                header_len: 40,
                total_len: 40 + be16(b, 4) as usize,
                fragment: false,
            })
        }
        _ => None,
    }
}

fn pseudo_sum(ip: &IpView, l4_len: usize) -> u64 {
    let mut s = 0;
    match (ip.src, ip.dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            s = ones_sum(&a.octets(), s);
            s = ones_sum(&b.octets(), s);
            s += ip.proto as u64 + l4_len as u64;
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            s = ones_sum(&a.octets(), s);
            s = ones_sum(&b.octets(), s);
            s = ones_sum(&(l4_len as u32).to_be_bytes(), s);
            s += ip.proto as u64;
        }
        _ => unreachable!(),
    }
    s
}

/// Verdict on every checksum of a frame: `Some(valid)` when it can be
/// verified, `None` when absent (UDP/IPv4 zero, IPv6 header), not covered by
/// the bytes present, or not applicable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checksums {
    pub ip: Option<bool>,
    /// TCP, UDP, ICMP or ICMPv6 of the outer packet.
    pub l4: Option<bool>,
    /// Inside an ICMP error: the quoted IPv4 header.
    pub inner_ip: Option<bool>,
    /// Inside an ICMP error: the quoted TCP/UDP segment, when complete.
    pub inner_l4: Option<bool>,
}

impl Checksums {
    pub fn all_valid(&self) -> bool {
        [self.ip, self.l4, self.inner_ip, self.inner_l4]
            .iter()
            .all(|c| *c != Some(false))
    }

    /// Names of checksums valid in `self` but not in `out`.
    pub fn broken_in(&self, out: &Checksums) -> Vec<&'static str> {
        let pairs = [
            ("IP header", self.ip, out.ip),
            ("L4", self.l4, out.l4),
            ("inner IP header", self.inner_ip, out.inner_ip),
            ("inner L4", self.inner_l4, out.inner_l4),
        ];
        pairs
            .iter()
            .filter(|(_, a, b)| *a == Some(true) && *b != Some(true))
            .map(|p| p.0)
            .collect()
    }
}

fn l4_checksum(ip: &IpView, seg: &[u8]) -> Option<bool> {
    let v6 = ip.src.is_ipv6();
    let min = match (ip.proto, v6) {
        (PROTO_TCP, _) => 20,
        (PROTO_UDP, _) => 8,
        (PROTO_ICMP, false) | (PROTO_ICMPV6, true) => 8,
        _ => return None,
    };
    if seg.len() < min || ip.fragment {
        return None;
    }
    if ip.proto == PROTO_UDP && !v6 && be16(seg, 6) == 0 {
        return None;
    }
    let base = if ip.proto == PROTO_ICMP {
        0
    } else {
        pseudo_sum(ip, seg.len())
    };
    Some(sums_to_ffff(ones_sum(seg, base)))
}

/// The L4 segment of an IP packet, when the header's length is covered.
fn segment<'a>(ip_bytes: &'a [u8], ip: &IpView) -> Option<&'a [u8]> {
    if ip.total_len < ip.header_len || ip.total_len > ip_bytes.len() {
        return None;
    }
    Some(&ip_bytes[ip.header_len..ip.total_len])
}

pub fn is_icmp_error(v6: bool, typ: u8) -> bool {
    if v6 {
        (1..=4).contains(&typ)
    } else {
        matches!(typ, 3 | 4 | 5 | 11 | 12)
    }
}

/// Verifies every checksum present in an Ethernet frame.
pub fn checksums(frame: &[u8]) -> Checksums {
    let mut c = Checksums::default();
    if frame.len() < ETH_LEN {
        return c;
    }
    let ethertype = be16(frame, 12);
    let b = &frame[ETH_LEN..];
    let Some(ip) = parse_ip(b) else {
        return c;
    };
    if (ethertype == 0x0800) != ip.src.is_ipv4() || !matches!(ethertype, 0x0800 | 0x86dd) {
        return c;
    }
    if ip.src.is_ipv4() {
        c.ip = Some(sums_to_ffff(ones_sum(&b[..ip.header_len], 0)));
    }
    let Some(seg) = segment(b, &ip) else {
        return c;
    };
    c.l4 = l4_checksum(&ip, seg);
    let icmp = (ip.proto == PROTO_ICMP && ip.src.is_ipv4())
        || (ip.proto == PROTO_ICMPV6 && ip.src.is_ipv6());
    if icmp && seg.len() >= 8 && is_icmp_error(ip.src.is_ipv6(), seg[0]) {
        let inner = &seg[8..];
        if let Some(iip) = parse_ip(inner) {
            if iip.src.is_ipv4() {
                c.inner_ip = Some(sums_to_ffff(ones_sum(&inner[..iip.header_len], 0)));
            }
            if let Some(iseg) = segment(inner, &iip) {
                if matches!(iip.proto, PROTO_TCP | PROTO_UDP) {
                    c.inner_l4 = l4_checksum(&iip, iseg);
                }
            }
        }
    }
    c
}

/// What a frame is, as far as the tests care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameView {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub ip: IpView,
    /// TCP/UDP ports (when the first 4 L4 bytes are present).
    pub ports: Option<(u16, u16)>,
    /// ICMP (type, code).
    pub icmp: Option<(u8, u8)>,
    /// The packet quoted by an ICMP error and its ports (if present).
    pub inner: Option<(IpView, Option<(u16, u16)>)>,
}

pub fn view(frame: &[u8]) -> Option<FrameView> {
    if frame.len() < ETH_LEN || !matches!(be16(frame, 12), 0x0800 | 0x86dd) {
        return None;
    }
    let b = &frame[ETH_LEN..];
    let ip = parse_ip(b)?;
    let l4 = &b[ip.header_len..];
    let ports = |ip: &IpView, l4: &[u8]| {
        (matches!(ip.proto, PROTO_TCP | PROTO_UDP) && l4.len() >= 4)
            .then(|| (be16(l4, 0), be16(l4, 2)))
    };
    let is_icmp = (ip.proto == PROTO_ICMP && ip.src.is_ipv4())
        || (ip.proto == PROTO_ICMPV6 && ip.src.is_ipv6());
    let icmp = (is_icmp && l4.len() >= 2).then(|| (l4[0], l4[1]));
    let inner = match icmp {
        Some((t, _)) if l4.len() >= 8 && is_icmp_error(ip.src.is_ipv6(), t) => parse_ip(&l4[8..])
            .map(|iip| {
                let p = ports(&iip, l4.get(8 + iip.header_len..).unwrap_or(&[]));
                (iip, p)
            }),
        _ => None,
    };
    Some(FrameView {
        eth_dst: frame[0..6].try_into().unwrap(),
        eth_src: frame[6..12].try_into().unwrap(),
        ports: ports(&ip, l4),
        icmp,
        inner,
        ip,
    })
}

// ---- readable failures -------------------------------------------------------------

pub fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in b.chunks(16).enumerate() {
        let _ = write!(s, "  {:04x}:", i * 16);
        for byte in line {
            let _ = write!(s, " {byte:02x}");
        }
        s.push('\n');
    }
    s
}

/// Both frames, side by side where they differ.
pub fn diff(got: &[u8], want: &[u8]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "got {} bytes, want {} bytes", got.len(), want.len());
    let diffs: Vec<usize> = (0..got.len().max(want.len()))
        .filter(|&i| got.get(i) != want.get(i))
        .collect();
    if !diffs.is_empty() {
        let shown: Vec<String> = diffs
            .iter()
            .take(24)
            .map(|&i| {
                let g = got.get(i).map_or("--".into(), |b| format!("{b:02x}"));
                let w = want.get(i).map_or("--".into(), |b| format!("{b:02x}"));
                format!("@{i}: {g}!={w}")
            })
            .collect();
        let _ = writeln!(s, "differing bytes (got!=want): {}", shown.join(" "));
    }
    let _ = writeln!(s, "got:  {}\n{}", describe(got), hex(got));
    let _ = writeln!(s, "want: {}\n{}", describe(want), hex(want));
    s
}

/// One line: addresses, ports, TTL and checksum verdicts.
pub fn describe(frame: &[u8]) -> String {
    match view(frame) {
        None => format!("(not IP, {} bytes)", frame.len()),
        Some(v) => {
            let p = v.ports.map_or(String::new(), |(s, d)| format!(" {s}->{d}"));
            let icmp = v
                .icmp
                .map_or(String::new(), |(t, c)| format!(" icmp {t}/{c}"));
            let inner = v.inner.as_ref().map_or(String::new(), |(i, p)| {
                let p = p.map_or(String::new(), |(s, d)| format!(" {s}->{d}"));
                format!(" [inner {} -> {} proto {}{p}]", i.src, i.dst, i.proto)
            });
            format!(
                "{} -> {} ttl {} proto {}{p}{icmp}{inner}; checksums {:?}",
                v.ip.src,
                v.ip.dst,
                v.ip.ttl,
                v.ip.proto,
                checksums(frame)
            )
        }
    }
}

// ---- services as the tests configure them ------------------------------------------

/// A configured service and the Maglev halves the test wrote for it.
#[derive(Clone, Debug)]
pub struct Svc {
    pub key: ServiceKey,
    pub val: Service,
    /// The VIP as the test addresses it (for a wildcard: unspecified).
    pub vip: SocketAddr,
    pub proto: u8,
    /// (backend index, address:port) in index order.
    pub backends: Vec<(u32, SocketAddr)>,
    pub tables: [Vec<u32>; 2],
}

impl Svc {
    pub fn id(&self) -> u32 {
        self.val.id
    }

    pub fn snat_lo(&self) -> u16 {
        self.val.snat_port_lo
    }

    pub fn snat_len(&self) -> u32 {
        (self.val.snat_port_hi - self.val.snat_port_lo) as u32 + 1
    }

    pub fn backend_sock(&self, index: u32) -> SocketAddr {
        self.backends
            .iter()
            .find(|b| b.0 == index)
            .unwrap_or_else(|| panic!("test bug: backend {index} is not in service {}", self.id()))
            .1
    }

    /// The active half's slot for `key`, before any probing.
    pub fn slot(&self, key: &FlowKey) -> usize {
        (lab_hash(key) % self.val.maglev_size) as usize
    }

    /// The backend index in the active half's first slot for `key`.
    pub fn slot_backend(&self, key: &FlowKey) -> u32 {
        self.tables[self.val.active_half as usize][self.slot(key)]
    }

    /// The first SNAT port a new flow tries.
    pub fn first_snat_port(&self, key: &FlowKey) -> u16 {
        self.snat_lo() + (lab_hash(key) % self.snat_len()) as u16
    }
}

/// Round-robin over `backends`, starting at `offset`: every slot differs from
/// the table with offset + 1 (when there are at least two backends).
pub fn round_robin(backends: &[u32], offset: usize) -> Vec<u32> {
    (0..MAGLEV_SIZE as usize)
        .map(|i| backends[(i + offset) % backends.len()])
        .collect()
}

// ---- the fixture ----------------------------------------------------------------------

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
const PIN_ROOT: &str = "/sys/fs/bpf";
const PIN_PREFIX: &str = "xdplb-test-";

pub struct PacketLab {
    dp: Option<DataPlane>,
    pin_dir: PathBuf,
    _guard: NsGuard,
    pub ns: NetNs,
    pub front_ifindex: u32,
    pub back_ifindex: u32,
    next_service_id: u32,
    next_backend: u32,
    next_maglev_base: u32,
    /// The data plane's log (aya-log), taken at the first `log_lines`.
    log: Option<(aya_log::EbpfLogger<LogCapture>, LogCapture)>,
    _not_send: PhantomData<*const ()>,
}

/// Collects the data plane's log lines (aya-log records) for a test.
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for LogCapture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let line = format!("{} {}", r.level(), r.args());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

/// Fails loudly when not root: these tests cannot mean anything otherwise.
pub fn require_root() {
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "the packet tests load eBPF programs and create network namespaces: run them as root \
         (euid is {euid}), e.g. `sudo -E cargo test -p tests --test packet -- --test-threads=1`"
    );
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == PIN_ROOT && f[2] == "bpf"
    });
    if !mounted {
        netns::run("mount", &["-t", "bpf", "bpf", PIN_ROOT])
            .context("bpffs is not mounted on /sys/fs/bpf and mounting it failed")?;
    }
    Ok(())
}

impl PacketLab {
    /// Builds the namespace, loads the data plane and enters the namespace on
    /// the calling thread. Panics with the reason when anything fails.
    pub fn new(tag: &str) -> Self {
        require_root();
        Self::try_new(tag).unwrap_or_else(|e| panic!("setting up the packet lab failed: {e:#}"))
    }

    /// Like [`Self::new`] for a test that runs only `hook`: the other hook's
    /// programs are not loaded (a verifier pass each, seconds under the VM
    /// layer's emulation).
    pub fn for_hook(tag: &str, hook: Hook) -> Self {
        require_root();
        Self::try_new_with(tag, 65536, L4Csum::Probe, 0, Some(hook))
            .unwrap_or_else(|e| panic!("setting up the packet lab failed: {e:#}"))
    }

    /// Like [`Self::new`] with a custom connection-table capacity.
    pub fn with_conns_capacity(tag: &str, conns_capacity: u32) -> Self {
        require_root();
        Self::try_new_with(tag, conns_capacity, L4Csum::Probe, 0, None)
            .unwrap_or_else(|e| panic!("setting up the packet lab failed: {e:#}"))
    }

    /// Like [`Self::new`] with the object's TC checksum mode set (the
    /// fallback for kernels without `BPF_F_IPV6`, or fault injection).
    pub fn with_l4_csum(tag: &str, l4_csum: L4Csum) -> Self {
        require_root();
        Self::try_new_with(tag, 65536, l4_csum, 0, None)
            .unwrap_or_else(|e| panic!("setting up the packet lab failed: {e:#}"))
    }

    /// For the bench's per-step breakdown: forwarded packets end their run
    /// after stage `stop` (`lb_common::BENCH_STOP_*`). `only`: as in
    /// [`Self::for_hook`] (None: both hooks).
    pub fn with_bench_stop(
        tag: &str,
        conns_capacity: u32,
        stop: u32,
        only: Option<Hook>,
    ) -> Result<Self> {
        Self::try_new_with(tag, conns_capacity, L4Csum::Probe, stop, only)
    }

    pub fn try_new(tag: &str) -> Result<Self> {
        Self::try_new_with(tag, 65536, L4Csum::Probe, 0, None)
    }

    fn try_new_with(
        tag: &str,
        conns_capacity: u32,
        l4_csum: L4Csum,
        bench_stop: u32,
        only: Option<Hook>,
    ) -> Result<Self> {
        netns::sweep_leftovers(netns::PREFIX);
        ensure_bpffs()?;
        netns::sweep_stale_dirs(Path::new(PIN_ROOT), PIN_PREFIX);
        let ns = NetNs::new(tag)?;
        build_topology(&ns).context("building the lab topology")?;
        let front_ifindex = ns.ifindex("front")?;
        let back_ifindex = ns.ifindex("back")?;
        let guard = ns.enter()?;
        let pin_dir = Path::new(PIN_ROOT).join(format!(
            "{PIN_PREFIX}{}-{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        DataPlane::unpin_all(&pin_dir)?;
        let opts = LoadOptions {
            pin_dir: pin_dir.clone(),
            conns_capacity,
            // Room for the benches' new-flow runs without evictions, and
            // no more (LRU maps are preallocated).
            unanswered_capacity: conns_capacity.min(1 << 18),
            maglev_capacity: MAX_TEST_SERVICES * 2 * MAGLEV_SIZE,
            l4_csum,
            bench_stop,
            only: only.map(|hook| match hook {
                Hook::Xdp => lb_user::dataplane::attach::Hook::Xdp,
                Hook::Tc => lb_user::dataplane::attach::Hook::Tc,
            }),
        };
        let dp = match DataPlane::load(&opts) {
            Ok(dp) => dp,
            Err(e) => {
                let _ = DataPlane::unpin_all(&pin_dir);
                return Err(e);
            }
        };
        let mut lab = Self {
            dp: Some(dp),
            pin_dir,
            _guard: guard,
            ns,
            front_ifindex,
            back_ifindex,
            next_service_id: 1,
            next_backend: 1,
            next_maglev_base: 0,
            log: None,
            _not_send: PhantomData,
        };
        lab.configure()?;
        Ok(lab)
    }

    /// Writes TX_PORTS, CONFIG and SNAT_ADDRS (done on the lab's own thread,
    /// inside the namespace: the devmap resolves ifindexes in the caller's).
    fn configure(&mut self) -> Result<()> {
        let (front, back) = (self.front_ifindex, self.back_ifindex);
        let dp = self.dp_mut();
        dp.add_tx_port(back)?;
        dp.add_tx_port(front)?;
        dp.set_config(&Config {
            snat_port_min: *SNAT_PORTS.start(),
            snat_port_max: *SNAT_PORTS.end(),
            hash_key: LAB_HASH_KEY,
            ..Config::with_defaults()
        })?;
        for a in [IpAddr::V4(SNAT_V4), IpAddr::V6(SNAT_V6)] {
            let mut k = AddrKey::default();
            k.family = addr_bytes(a, &mut k.addr);
            dp.add_snat_addr(&k)?;
        }
        Ok(())
    }

    pub fn dp(&self) -> &DataPlane {
        self.dp.as_ref().expect("data plane is loaded")
    }

    /// The data plane's log lines ("LEVEL message") written since the last
    /// call (all since the load at the first).
    pub fn log_lines(&mut self) -> Vec<String> {
        if self.log.is_none() {
            let capture = LogCapture::default();
            let logger = self
                .dp_mut()
                .take_log(capture.clone())
                .expect("the data plane's log ring buffer");
            self.log = Some((logger, capture));
        }
        let (logger, capture) = self.log.as_mut().expect("taken above");
        logger.flush();
        std::mem::take(&mut *capture.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes CONFIG with `f`.
    pub fn set_config(&mut self, f: impl FnOnce(&mut Config)) {
        let mut c = self.dp().config().expect("reading CONFIG");
        f(&mut c);
        self.dp_mut().set_config(&c).expect("writing CONFIG");
    }

    /// Keeps the calling thread (and so every test run) on one CPU: the
    /// flood guard counts new flows per CPU.
    pub fn stay_on_one_cpu(&self) {
        let mut set = CpuSet::new();
        set.set(0).expect("CPU 0 is in a CpuSet");
        sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity to CPU 0");
    }

    pub fn dp_mut(&mut self) -> &mut DataPlane {
        self.dp.as_mut().expect("data plane is loaded")
    }

    /// Adds a service with one backend per entry of `backends`, a
    /// round-robin Maglev table in half 0 (half 1 empty), and the SNAT
    /// address of its family. An unspecified `vip` address is the wildcard.
    pub fn add_service(
        &mut self,
        vip: SocketAddr,
        proto: u8,
        snat: RangeInclusive<u16>,
        backends: &[SocketAddr],
    ) -> Svc {
        assert!(
            SNAT_PORTS.contains(snat.start()) && SNAT_PORTS.contains(snat.end()),
            "test bug: SNAT range {snat:?} is outside CONFIG's {SNAT_PORTS:?}"
        );
        assert!(
            self.next_service_id <= MAX_TEST_SERVICES,
            "test bug: too many services"
        );
        let id = self.next_service_id;
        self.next_service_id += 1;
        let mut key = ServiceKey {
            port_be: vip.port().to_be(),
            proto,
            ..Default::default()
        };
        key.family = addr_bytes(vip.ip(), &mut key.addr);
        let mut val = Service {
            id,
            flags: 0,
            maglev_base: self.next_maglev_base,
            maglev_size: MAGLEV_SIZE,
            active_half: 0,
            snat_port_lo: *snat.start(),
            snat_port_hi: *snat.end(),
            snat_addr: [0; 16],
        };
        addr_bytes(snat_addr_for(vip.ip()), &mut val.snat_addr);
        self.next_maglev_base += 2 * MAGLEV_SIZE;
        let mut list = Vec::new();
        for b in backends {
            let index = self.next_backend;
            self.next_backend += 1;
            let mut be = Backend {
                port_be: b.port().to_be(),
                state: BACKEND_ACTIVE,
                service: id,
                ..Default::default()
            };
            be.family = addr_bytes(b.ip(), &mut be.addr);
            self.dp_mut()
                .set_backend(index, &be)
                .expect("writing BACKENDS");
            list.push((index, *b));
        }
        let indexes: Vec<u32> = list.iter().map(|b| b.0).collect();
        let mut svc = Svc {
            key,
            val,
            vip,
            proto,
            backends: list,
            tables: [Vec::new(), vec![0; MAGLEV_SIZE as usize]],
        };
        self.write_table(&mut svc, 0, round_robin(&indexes, 0));
        self.write_table(&mut svc, 1, vec![0; MAGLEV_SIZE as usize]);
        self.dp_mut()
            .set_service(&svc.key, &svc.val)
            .expect("writing SERVICES");
        svc
    }

    pub fn write_table(&mut self, svc: &mut Svc, half: u32, slots: Vec<u32>) {
        self.dp_mut()
            .write_maglev_half(&svc.val, half, &slots)
            .expect("writing MAGLEV");
        svc.tables[half as usize] = slots;
    }

    /// Makes the other half active (one SERVICES update).
    pub fn flip(&mut self, svc: &mut Svc) {
        svc.val.active_half ^= 1;
        self.dp_mut()
            .set_service(&svc.key, &svc.val)
            .expect("writing SERVICES");
    }

    pub fn set_backend_state(&mut self, index: u32, state: u8) {
        let mut b = self.dp().backend(index).expect("reading BACKENDS");
        b.state = state;
        self.dp_mut()
            .set_backend(index, &b)
            .expect("writing BACKENDS");
    }

    /// Runs one frame through the hook, arriving on the interface of its
    /// source's side (see the module). `Err` is the syscall's (the kernel
    /// refuses frames shorter than an Ethernet header, for instance).
    pub fn try_run(&mut self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let back = view(frame).is_some_and(|v| is_back_side(v.ip.src));
        let ingress = back.then_some(self.back_ifindex);
        self.try_run_ctx(hook, frame, ingress)
    }

    /// [`Self::run_on`], with the syscall's error.
    pub fn try_run_on(
        &mut self,
        hook: Hook,
        ifindex: u32,
        frame: &[u8],
    ) -> Result<(u32, Vec<u8>), ProgramError> {
        self.try_run_ctx(hook, frame, Some(ifindex))
    }

    /// Runs one frame arriving on `ifindex` (1: the loopback).
    pub fn run_on(&mut self, hook: Hook, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run_ctx(hook, frame, Some(ifindex))
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN ({hook:?} on ifindex {ifindex}) failed: {e}\n{}",
                    hex(frame)
                )
            })
    }

    fn try_run_ctx(
        &mut self,
        hook: Hook,
        frame: &[u8],
        ingress: Option<u32>,
    ) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; frame.len() + 512];
        let xdp_md: [u32; 6];
        let mut tc_ctx = TC_CTX;
        let ctx: Option<&[u8]> = match (hook, ingress) {
            // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
            // rx_queue_index, egress_ifindex }: data_end must equal the size.
            (Hook::Xdp, Some(ifindex)) if ifindex != 1 => {
                xdp_md = [0, frame.len() as u32, 0, ifindex, 0, 0];
                Some(u32s_as_bytes(&xdp_md))
            }
            (Hook::Xdp, _) => None,
            // struct __sk_buff up to `ifindex`: ingress_ifindex (offset 36),
            // which the kernel copies into skb->skb_iif.
            (Hook::Tc, i) => {
                tc_ctx[36..40].copy_from_slice(&i.unwrap_or(1).to_le_bytes());
                Some(&tc_ctx)
            }
        };
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            repeat: 1,
            ..Default::default()
        };
        let dp = self.dp_mut();
        let res = match hook {
            Hook::Xdp => dp.xdp().test_run(opts),
            Hook::Tc => dp.tc().test_run(opts),
        }?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(hook, frame).unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN ({hook:?}) failed: {e}\ninput:\n{}",
                hex(frame)
            )
        })
    }

    pub fn run_xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(Hook::Xdp, frame)
    }

    pub fn run_tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(Hook::Tc, frame)
    }

    /// XDP with the frame arriving on `ifindex` instead of the loopback.
    pub fn run_xdp_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(Hook::Xdp, ifindex, frame)
    }

    /// Packets per reason, indexed like `reason::NAMES`.
    pub fn reasons(&self) -> Vec<u64> {
        self.dp().reasons().expect("reading REASON_STATS")
    }

    pub fn service_counters(&self, id: u32) -> Counters {
        self.dp()
            .service_counters(id)
            .expect("reading SERVICE_STATS")
    }

    pub fn backend_counters(&self, index: u32) -> Counters {
        self.dp()
            .backend_counters(index)
            .expect("reading BACKEND_STATS")
    }

    /// The entry for `key` in CONNS (established) or else UNANSWERED, the
    /// order the data plane looks in.
    pub fn conn(&self, key: &FlowKey) -> Option<Conn> {
        match self.dp().conn(key).expect("reading CONNS") {
            Some(c) => Some(c),
            None => self.dp().unanswered_conn(key).expect("reading UNANSWERED"),
        }
    }

    /// Entries in both tables: (CONNS, UNANSWERED).
    pub fn entries(&self) -> (usize, usize) {
        (
            self.dp().conns().expect("reading CONNS").len(),
            self.dp()
                .unanswered_conns()
                .expect("reading UNANSWERED")
                .len(),
        )
    }

    /// Every event's count, indexed like `event::NAMES`.
    pub fn events(&self) -> Vec<u64> {
        self.dp().events().expect("reading EVENT_STATS")
    }

    /// Every connection entry of both tables, one per line (for failure
    /// messages).
    pub fn dump_conns(&self) -> String {
        let mut s = String::new();
        for (k, c) in self.dp().conns().unwrap_or_default() {
            let _ = writeln!(s, "  CONNS {} => {}", show_key(&k), show_conn(&c, k.family));
        }
        for (k, c) in self.dp().unanswered_conns().unwrap_or_default() {
            let _ = writeln!(
                s,
                "  UNANSWERED {} => {}",
                show_key(&k),
                show_conn(&c, k.family)
            );
        }
        if s.is_empty() {
            s.push_str("  (CONNS and UNANSWERED are empty)\n");
        }
        s
    }
}

impl Drop for PacketLab {
    fn drop(&mut self) {
        // Close the maps and programs before their pins and namespace go.
        drop(self.dp.take());
        if let Err(e) = DataPlane::unpin_all(&self.pin_dir) {
            eprintln!("warning: {e:#}");
        }
        // Then `_guard` restores the thread's namespace and `ns` deletes ours.
    }
}

fn u32s_as_bytes(v: &[u32; 6]) -> &[u8] {
    // SAFETY: a [u32; 6] is 24 initialised bytes with no padding; the slice
    // borrows it for its own lifetime and u8 has no alignment needs.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), 24) }
}

/// `struct __sk_buff` up to and including `ifindex` (44 bytes): only
/// `ingress_ifindex` (bytes 36..40) is set, to 1 (little-endian hosts);
/// `try_run_ctx` sets it to the frame's interface.
const TC_CTX: [u8; 44] = {
    let mut c = [0u8; 44];
    c[36] = 1;
    c
};

fn build_topology(ns: &NetNs) -> Result<()> {
    for (dev, mac, v4, v6) in [
        ("front", FRONT_MAC, "10.0.0.1/24", "fd00::1/64"),
        ("back", BACK_MAC, "10.1.0.1/24", "fd01::1/64"),
    ] {
        let peer = format!("{dev}-peer");
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer])?;
        ns.ip(&["link", "set", dev, "address", &mac_str(mac)])?;
        ns.ip(&["addr", "add", v4, "dev", dev])?;
        ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"])?;
        ns.ip(&["link", "set", &peer, "up"])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let neigh = |addr: String, mac: [u8; 6], dev: &str| {
        ns.ip(&[
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac_str(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])
    };
    neigh(CLIENT_V4.to_string(), CLIENT_MAC, "front")?;
    neigh(CLIENT_V6.to_string(), CLIENT_MAC, "front")?;
    for n in BACKEND_NUMBERS {
        neigh(backend_v4(n).to_string(), backend_mac(n), "back")?;
        neigh(backend_v6(n).to_string(), backend_mac(n), "back")?;
    }
    // IPv6 routes appear once the link has a carrier; make sure they did.
    let routes = ns.ip(&["-6", "route", "show"])?;
    if !routes.contains("fd01::/64") || !routes.contains("fd00::/64") {
        bail!("IPv6 routes missing in the lab namespace:\n{routes}");
    }
    Ok(())
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn show_addr(a: &[u8; 16], family: u8) -> String {
    if family == FAMILY_V4 {
        Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
    } else {
        format!("[{}]", Ipv6Addr::from(*a))
    }
}

pub fn show_key(k: &FlowKey) -> String {
    format!(
        "{}:{} -> {}:{} proto {} family {}{}",
        show_addr(&k.src, k.family),
        u16::from_be(k.sport_be),
        show_addr(&k.dst, k.family),
        u16::from_be(k.dport_be),
        k.proto,
        k.family,
        if k._pad != [0; 2] {
            format!(" pad {:?}", k._pad)
        } else {
            String::new()
        }
    )
}

pub fn show_conn(c: &Conn, family: u8) -> String {
    format!(
        "src := {}:{}, dst := {}:{}, backend {}, service {}, flags {:#x}, tcp_state {}, ifindex {}, seq {}, last_seen {}, created {}",
        show_addr(&c.new_src, family),
        u16::from_be(c.new_sport_be),
        show_addr(&c.new_dst, family),
        u16::from_be(c.new_dport_be),
        c.backend,
        c.service,
        c.flags,
        c.tcp_state,
        c.ifindex,
        c.seq,
        c.last_seen_ns,
        c.created_ns
    )
}

/// Reason deltas between two snapshots, by name (for failure messages).
pub fn reason_delta(before: &[u64], after: &[u64]) -> String {
    let parts: Vec<String> = before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| a != b)
        .map(|(i, (b, a))| format!("{} +{}", reason::NAMES[i], a.wrapping_sub(*b)))
        .collect();
    if parts.is_empty() {
        "(no reason counted)".into()
    } else {
        parts.join(", ")
    }
}

impl PacketLab {
    /// The bpffs directory holding this lab's pinned maps (what the CLI's
    /// `--pin-dir` names).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}
