//! Fuzzing the data plane through `BPF_PROG_TEST_RUN`: random frames,
//! mutations of valid ones, and valid ones, checked against invariants that
//! hold whatever the input:
//!
//! - the action is one the hook defines, never `XDP_ABORTED`;
//! - a frame either leaves unchanged (pass, or drop under a drop reason) or
//!   is forwarded: same length, TTL one lower, only NAT fields changed,
//!   destination a backend of the service the input addressed (forward), the
//!   client recorded for that SNAT port (reply), or the inner packet's
//!   source (ICMP error), and every checksum that was valid still valid;
//! - every run is counted under exactly one reason;
//! - a frame from a backend-side address that arrives on the client side is
//!   never forwarded (forged replies and ICMP errors change no flow).
//!
//! The flood guard is switched on and off as the run goes (`churn`), so
//! new flows are made both ways; TCP flags include SYN+FIN, SYN+RST and
//! none at all.
//!
//! `XDPLB_FUZZ_SEED=<n>` replays a run; `XDPLB_FUZZ_PACKETS=<n>` changes the
//! XDP packet count (TC gets a fifth of it). Run as root:
//! `cargo test -p tests --test fuzz -- --test-threads=1 --nocapture`

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use lb_common::{
    reason, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use tests::packet::*;

const DEFAULT_XDP_PACKETS: u64 = 1_000_000;
/// How often the reason totals are reconciled with the runs so far.
const RECONCILE_EVERY: u64 = 50_000;
/// How often a backend changes state and a table flips (and the flood
/// guard goes on or off): every this many runs, or more often in a short
/// run, so that even one of 24,000 packets (the VM layer's) sees at least
/// eight rounds.
const CHURN_EVERY: u64 = 100_000;

struct SvcModel {
    svc: Svc,
    backends: HashSet<SocketAddr>,
}

/// What the test knows about the configuration and the flows it saw.
struct Model {
    services: Vec<SvcModel>,
    backend_addrs: HashSet<IpAddr>,
    /// Backend index -> current state.
    states: HashMap<u32, u8>,
    /// (backend, SNAT address:port, proto) -> (client, VIP) as last assigned.
    replies: HashMap<(SocketAddr, SocketAddr, u8), (SocketAddr, SocketAddr)>,
    /// Recent forwarded flows: (client, VIP, proto, backend, SNAT).
    flows: Vec<(SocketAddr, SocketAddr, u8, SocketAddr, SocketAddr)>,
    clients: HashSet<IpAddr>,
}

impl Model {
    fn service_for(&self, dst: IpAddr, dport: u16, proto: u8) -> Option<&SvcModel> {
        let exact = self
            .services
            .iter()
            .find(|s| s.svc.vip.ip() == dst && s.svc.vip.port() == dport && s.svc.proto == proto);
        exact.or_else(|| {
            self.services.iter().find(|s| {
                s.svc.vip.ip().is_unspecified()
                    && s.svc.vip.is_ipv4() == dst.is_ipv4()
                    && s.svc.vip.port() == dport
                    && s.svc.proto == proto
            })
        })
    }

    fn record_flow(&mut self, f: (SocketAddr, SocketAddr, u8, SocketAddr, SocketAddr)) {
        self.replies.insert((f.3, f.4, f.2), (f.0, f.1));
        self.clients.insert(f.0.ip());
        if self.flows.len() < 4096 {
            self.flows.push(f);
        } else {
            let i = (f.0.port() as usize * 31 + f.3.port() as usize) % 4096;
            self.flows[i] = f;
        }
    }
}

fn setup(lab: &mut PacketLab) -> Model {
    use std::net::Ipv4Addr as V4;
    let specs: Vec<(
        SocketAddr,
        u8,
        std::ops::RangeInclusive<u16>,
        Vec<SocketAddr>,
    )> = vec![
        (
            sock(VIP_V4, 80),
            PROTO_TCP,
            40000..=43999,
            (11..=14).map(|n| sock(backend_v4(n), 8080)).collect(),
        ),
        (
            sock(VIP_V6, 80),
            PROTO_TCP,
            40000..=43999,
            (11..=14).map(|n| sock(backend_v6(n), 8080)).collect(),
        ),
        (
            sock(VIP_V4, 53),
            PROTO_UDP,
            44000..=44999,
            (15..=16).map(|n| sock(backend_v4(n), 53)).collect(),
        ),
        (
            sock(VIP_V6, 53),
            PROTO_UDP,
            44000..=44999,
            (15..=16).map(|n| sock(backend_v6(n), 53)).collect(),
        ),
        (
            sock(V4::UNSPECIFIED, 8443),
            PROTO_TCP,
            45000..=45099,
            (17..=18).map(|n| sock(backend_v4(n), 443)).collect(),
        ),
        (
            sock(V4::new(10, 0, 0, 101), 80),
            PROTO_TCP,
            45100..=45101,
            vec![sock(backend_v4(19), 80)],
        ),
        (
            sock(Ipv6Addr::UNSPECIFIED, 8443),
            PROTO_UDP,
            46000..=46999,
            vec![sock(backend_v6(17), 443)],
        ),
    ];
    let mut model = Model {
        services: Vec::new(),
        backend_addrs: HashSet::new(),
        states: HashMap::new(),
        replies: HashMap::new(),
        flows: Vec::new(),
        clients: HashSet::new(),
    };
    for (vip, proto, snat, backends) in specs {
        let svc = lab.add_service(vip, proto, snat, &backends);
        for (i, b) in &svc.backends {
            model.states.insert(*i, BACKEND_ACTIVE);
            model.backend_addrs.insert(b.ip());
        }
        model.services.push(SvcModel {
            backends: svc.backends.iter().map(|b| b.1).collect(),
            svc,
        });
    }
    model
}

// ---- generation --------------------------------------------------------------------------

fn client_addr(rng: &mut StdRng, v6: bool) -> IpAddr {
    let n: u8 = rng.gen_range(0..40);
    match (v6, n) {
        (false, 0..=19) => CLIENT_V4.into(),
        (false, 20..=29) => Ipv4Addr::new(10, 0, 0, rng.gen_range(3..=9)).into(),
        (false, _) => Ipv4Addr::new(192, 0, 2, rng.gen_range(1..=50)).into(),
        (true, 0..=19) => CLIENT_V6.into(),
        (true, 20..=29) => Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, rng.gen_range(3..=9)).into(),
        (true, _) => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, rng.gen_range(1..=50)).into(),
    }
}

fn flags(rng: &mut StdRng) -> u8 {
    *[
        TCP_SYN,
        TCP_SYN,
        TCP_ACK,
        TCP_ACK | TCP_PSH,
        TCP_FIN | TCP_ACK,
        TCP_RST,
        TCP_SYN | TCP_ACK,
        TCP_SYN | TCP_FIN,
        TCP_SYN | TCP_RST,
        0,
    ]
    .choose(rng)
    .unwrap()
}

fn l4_pkt(rng: &mut StdRng, src: SocketAddr, dst: SocketAddr, proto: u8) -> Pkt {
    let payload_len = if rng.gen_bool(0.7) {
        0
    } else {
        rng.gen_range(1..200)
    };
    let payload: Vec<u8> = (0..payload_len).map(|_| rng.r#gen()).collect();
    let mut p = if proto == PROTO_UDP {
        let p = Pkt::udp(src, dst, &payload);
        if src.is_ipv4() && rng.gen_bool(0.1) {
            p.with_zero_udp_csum()
        } else {
            p
        }
    } else {
        let mut p = Pkt::tcp(src, dst, flags(rng));
        p.payload = payload;
        p
    };
    p.ttl = *[64, 64, 64, 2, 1, 255].choose(rng).unwrap();
    p.ip_id = rng.r#gen();
    p
}

/// A valid frame: new and continuing flows, replies, ICMP errors, and
/// packets near the services (right VIP wrong port and so on).
fn gen_valid(rng: &mut StdRng, model: &Model) -> Vec<u8> {
    let pick = rng.gen_range(0..100);
    let known = (!model.flows.is_empty()).then(|| *model.flows.choose(rng).unwrap());
    match (pick, known) {
        // Next packet of a known flow.
        (0..=19, Some((c, v, proto, _, _))) => l4_pkt(rng, c, v, proto).build(),
        // Reply from the backend.
        (20..=34, Some((_, _, proto, b, s))) => l4_pkt(rng, b, s, proto).build(),
        // ICMP error about our SNATed packet, from a back-side router.
        (35..=41, Some((_, _, proto, b, s))) => {
            let sent = l4_pkt(rng, s, b, proto).build_ip();
            let quote = quote(rng, &sent);
            icmp_error(rng, back_router(s.ip()), s.ip(), &quote).build()
        }
        // ICMP error about our reply, from a front-side router.
        (42..=47, Some((c, v, proto, _, _))) => {
            let sent = l4_pkt(rng, v, c, proto).build_ip();
            let quote = quote(rng, &sent);
            icmp_error(rng, front_router(v.ip()), v.ip(), &quote).build()
        }
        // A stray "reply" to a SNAT port nobody holds (probably).
        (48..=52, _) => {
            let v6 = rng.gen_bool(0.3);
            let b = if v6 {
                backend_v6(rng.gen_range(11..=20)).into()
            } else {
                backend_v4(rng.gen_range(11..=20)).into()
            };
            let port = rng.gen_range(*SNAT_PORTS.start()..=*SNAT_PORTS.end());
            let proto = if rng.gen_bool(0.5) {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            l4_pkt(rng, sock(b, 8080), sock(snat_addr_for(b), port), proto).build()
        }
        // ICMP that is not an error we translate.
        (53..=55, _) => {
            let v6 = rng.gen_bool(0.5);
            let (c, v): (IpAddr, IpAddr) = if v6 {
                (CLIENT_V6.into(), VIP_V6.into())
            } else {
                (CLIENT_V4.into(), VIP_V4.into())
            };
            let typ = if v6 {
                128
            } else {
                *[0, 8, 11, 5].choose(rng).unwrap()
            };
            Pkt::icmp(c, v, typ, 0, rng.r#gen(), b"payload").build()
        }
        // New flow to a service, or near one.
        _ => {
            let s = &model.services.choose(rng).unwrap().svc;
            let v6 = s.vip.is_ipv6();
            let c = sock(client_addr(rng, v6), rng.gen_range(1024..=65535));
            let mut dst = if s.vip.ip().is_unspecified() {
                let a: IpAddr = if v6 {
                    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, rng.r#gen()).into()
                } else {
                    Ipv4Addr::new(10, 0, 0, rng.r#gen()).into()
                };
                sock(a, s.vip.port())
            } else {
                s.vip
            };
            let mut proto = s.proto;
            match rng.gen_range(0..10) {
                0 => dst.set_port(dst.port().wrapping_add(1)),
                1 => dst.set_ip(if v6 {
                    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101).into()
                } else {
                    Ipv4Addr::new(10, 0, 0, 102).into()
                }),
                2 => {
                    proto = if proto == PROTO_TCP {
                        PROTO_UDP
                    } else {
                        PROTO_TCP
                    }
                }
                _ => {}
            }
            l4_pkt(rng, c, dst, proto).build()
        }
    }
}

fn back_router(a: IpAddr) -> IpAddr {
    if a.is_ipv4() {
        BACK_ROUTER_V4.into()
    } else {
        BACK_ROUTER_V6.into()
    }
}

fn front_router(a: IpAddr) -> IpAddr {
    if a.is_ipv4() {
        FRONT_ROUTER_V4.into()
    } else {
        FRONT_ROUTER_V6.into()
    }
}

/// The whole packet, or the IP header + 8 bytes, or something in between.
fn quote(rng: &mut StdRng, sent: &[u8]) -> Vec<u8> {
    let min = if sent[0] >> 4 == 4 { 28 } else { 48 };
    match rng.gen_range(0..3) {
        0 => sent.to_vec(),
        1 => sent[..min.min(sent.len())].to_vec(),
        _ => sent[..rng.gen_range(min.min(sent.len())..=sent.len())].to_vec(),
    }
}

fn icmp_error(rng: &mut StdRng, src: IpAddr, dst: IpAddr, quote: &[u8]) -> Pkt {
    let mut p = if src.is_ipv4() {
        let code = *[4, 4, 0, 1, 3, 13].choose(rng).unwrap();
        Pkt::icmp(src, dst, 3, code, [0, 0, 0x05, 0x78], quote)
    } else if rng.gen_bool(0.6) {
        Pkt::icmp(src, dst, 2, 0, 1400u32.to_be_bytes(), quote)
    } else {
        Pkt::icmp(src, dst, 1, rng.gen_range(0..=6), [0; 4], quote)
    };
    p.ttl = *[64, 64, 1, 255].choose(rng).unwrap();
    p
}

fn mutate(rng: &mut StdRng, f: &mut Vec<u8>) {
    let hot = |rng: &mut StdRng, len: usize| {
        if rng.gen_bool(0.8) {
            rng.gen_range(0..len.min(100))
        } else {
            rng.gen_range(0..len)
        }
    };
    let rounds = rng.gen_range(1..=3);
    for _ in 0..rounds {
        match rng.gen_range(0..10) {
            0..=2 => {
                let at = hot(rng, f.len());
                f[at] ^= 1 << rng.gen_range(0..8);
            }
            3..=4 => {
                let at = hot(rng, f.len());
                f[at] = rng.r#gen();
            }
            5..=6 if f.len() > ETH_LEN + 1 => {
                let to = rng.gen_range(ETH_LEN..f.len());
                f.truncate(to);
            }
            7 => f.extend((0..rng.gen_range(1..40)).map(|_| rng.r#gen::<u8>())),
            // Field edits that keep the IPv4 header checksum right, so the
            // program sees a plausible header.
            _ if f.len() >= ETH_LEN + 20 && f[12..14] == [0x08, 0x00] => {
                let ip = &mut f[ETH_LEN..];
                match rng.gen_range(0..5) {
                    0 => ip[8] = rng.gen_range(0..3),
                    1 => ip[6] |= if rng.r#gen() { 0x20 } else { 0x01 },
                    2 => ip[0] = 0x40 | rng.gen_range(0..16),
                    3 => ip[9] = rng.r#gen(),
                    _ => ip[2..4].copy_from_slice(&rng.r#gen::<u16>().to_be_bytes()),
                }
                let ihl = ((ip[0] & 0x0f).max(5) as usize * 4).min(ip.len()) & !1;
                ip[10] = 0;
                ip[11] = 0;
                let mut sum = 0u32;
                for c in ip[..ihl].chunks(2) {
                    sum += u16::from_be_bytes([c[0], c[1]]) as u32;
                }
                while sum >> 16 != 0 {
                    sum = (sum & 0xffff) + (sum >> 16);
                }
                ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            }
            _ => {
                let at = hot(rng, f.len());
                f[at] = f[at].wrapping_add(1);
            }
        }
    }
}

fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.gen_range(ETH_LEN..=160);
    let mut f: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
    match rng.gen_range(0..4) {
        0 => f[12..14].copy_from_slice(&[0x08, 0x00]),
        1 => f[12..14].copy_from_slice(&[0x86, 0xdd]),
        _ => {}
    }
    if f.len() > ETH_LEN && rng.gen_bool(0.5) {
        f[ETH_LEN] = if f[12] == 0x86 { 0x60 } else { 0x45 };
    }
    f
}

// ---- invariants --------------------------------------------------------------------------

/// Byte positions a forwarded frame may change: MACs, TTL, addresses,
/// ports, checksums, and the same inside a quoted packet.
fn changeable(input: &[u8]) -> Vec<bool> {
    let mut m = vec![false; input.len()];
    let mut mark = |from: usize, to: usize| {
        for b in m.iter_mut().take(to).skip(from) {
            *b = true;
        }
    };
    mark(0, 12);
    let Some(v) = view(input) else {
        return m;
    };
    let l3 = ETH_LEN;
    let ip_fields = |at: usize, v4: bool, mark: &mut dyn FnMut(usize, usize), outer: bool| {
        if v4 {
            if outer {
                mark(at + 8, at + 9);
            }
            mark(at + 10, at + 20);
        } else {
            if outer {
                mark(at + 7, at + 8);
            }
            mark(at + 8, at + 40);
        }
    };
    ip_fields(l3, v.ip.src.is_ipv4(), &mut mark, true);
    let l4 = l3 + v.ip.header_len;
    let l4_fields = |at: usize, proto: u8, mark: &mut dyn FnMut(usize, usize)| match proto {
        PROTO_TCP => {
            mark(at, at + 4);
            mark(at + 16, at + 18);
        }
        PROTO_UDP => {
            mark(at, at + 4);
            mark(at + 6, at + 8);
        }
        PROTO_ICMP | PROTO_ICMPV6 => mark(at + 2, at + 4),
        _ => {}
    };
    l4_fields(l4, v.ip.proto, &mut mark);
    if let Some((inner, _)) = &v.inner {
        let i3 = l4 + 8;
        ip_fields(i3, inner.src.is_ipv4(), &mut mark, false);
        l4_fields(i3 + inner.header_len, inner.proto, &mut mark);
    }
    m
}

/// A broken invariant: `kind` groups the failures, `detail` is this one's.
struct Violation {
    kind: String,
    detail: String,
}

fn v(kind: impl Into<String>, detail: impl Into<String>) -> Violation {
    Violation {
        kind: kind.into(),
        detail: detail.into(),
    }
}

impl From<&'static str> for Violation {
    fn from(kind: &'static str) -> Self {
        v(kind, "")
    }
}

struct Stats {
    runs: u64,
    refused: u64,
    drops: u64,
    forwarded: u64,
    by_action: HashMap<(Hook, u32), u64>,
}

fn sock_of(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Checks one run; `Err` says which invariant broke.
#[expect(clippy::too_many_arguments, reason = "one call site; the run's state")]
fn check(
    hook: Hook,
    on_client_side: bool,
    input: &[u8],
    action: u32,
    out: &[u8],
    model: &mut Model,
    stats: &mut Stats,
    lab: &PacketLab,
) -> Result<(), Violation> {
    let allowed: &[u32] = match hook {
        Hook::Xdp => &[XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT],
        Hook::Tc => &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
    };
    if !allowed.contains(&action) {
        return Err(v(
            "action outside the hook's policy actions",
            hook.action_name(action),
        ));
    }
    let moved = action != hook.pass() && action != hook.drop_();
    if out == input && !moved {
        // A packet to a service may leave state behind even when it passes
        // (TTL expired after the pick): its source is a client from now on.
        if let Some(v) = view(input) {
            if let Some((_, dport)) = v.ports {
                if model.service_for(v.ip.dst, dport, v.ip.proto).is_some() {
                    model.clients.insert(v.ip.src);
                }
            }
        }
        if action == hook.drop_() {
            stats.drops += 1;
            let v = view(input).ok_or("dropped a frame that is not IP")?;
            // Replies and ICMP errors come to a SNAT address; when the
            // client they translate to has no route, the data plane drops
            // them (drop_no_route) rather than hand a rewritten packet to
            // the stack, which would drop it as a martian.
            // ICMP errors are matched by the packet they quote, whatever
            // their outer destination, and can meet the same fate.
            let to_snat = v.ip.dst == IpAddr::from(SNAT_V4) || v.ip.dst == IpAddr::from(SNAT_V6);
            let icmp = v.ip.proto == 1 || v.ip.proto == 58;
            if !to_snat && !icmp {
                let (_, dport) = v.ports.ok_or("dropped a frame without ports")?;
                if model.service_for(v.ip.dst, dport, v.ip.proto).is_none() {
                    return Err("dropped a packet addressed to no service".into());
                }
            }
        }
        return Ok(());
    }
    if action == hook.drop_() {
        return Err("dropped, but the frame was changed".into());
    }
    stats.forwarded += 1;
    if out.len() != input.len() {
        return Err(v(
            "forwarded frame changed length",
            format!("{} bytes for {} in", out.len(), input.len()),
        ));
    }
    let mask = changeable(input);
    if let Some(at) = (0..input.len()).find(|&i| input[i] != out[i] && !mask[i]) {
        return Err(v(
            "a byte that is no NAT field changed",
            format!("byte {at}"),
        ));
    }
    let i = view(input).ok_or("rewrote a frame that does not parse")?;
    let o = view(out).ok_or("the rewritten frame does not parse")?;
    if i.ip.ttl < 2 || o.ip.ttl != i.ip.ttl - 1 {
        return Err(v(
            "TTL not decremented by one (or forwarded at TTL <= 1)",
            format!("TTL {} became {}", i.ip.ttl, o.ip.ttl),
        ));
    }
    let broken = checksums(input).broken_in(&checksums(out));
    if !broken.is_empty() {
        let what = match (&i.inner, i.ip.proto) {
            (Some((inner, _)), _) => {
                // Where the quoted TCP/UDP checksum sits, against where the
                // outer IP header says the packet ends (trailing bytes such
                // as Ethernet padding are not covered by the ICMP checksum).
                let at = ETH_LEN + i.ip.header_len + 8 + inner.header_len;
                let csum_end = at + if inner.proto == PROTO_UDP { 8 } else { 18 };
                if csum_end > ETH_LEN + i.ip.total_len && csum_end <= input.len() {
                    "ICMP error whose quoted L4 checksum lies in bytes past the outer IP length"
                } else {
                    "ICMP error"
                }
            }
            (None, PROTO_TCP) => "TCP",
            (None, PROTO_UDP) => "UDP",
            _ => "other",
        };
        return Err(v(
            format!("{broken:?} checksum valid in the input broken by the rewrite ({what})"),
            "",
        ));
    }
    if hook == Hook::Xdp && (action == XDP_REDIRECT || action == XDP_TX) {
        let egress = if is_back_side(o.ip.dst) {
            BACK_MAC
        } else {
            FRONT_MAC
        };
        if neighbour_mac(o.ip.dst) != Some(o.eth_dst) || o.eth_src != egress {
            return Err(v(
                "MACs differ from the FIB's",
                format!(
                    "sent with MACs {} -> {}, the FIB says {} -> {:?}",
                    mac_str(o.eth_src),
                    mac_str(o.eth_dst),
                    mac_str(egress),
                    neighbour_mac(o.ip.dst).map(mac_str)
                ),
            ));
        }
    }
    // A reply to a SNAT port, or an ICMP error about what we sent a
    // backend, is accepted only from the backend side.
    let snat = |ip: IpAddr| ip == IpAddr::from(SNAT_V4) || ip == IpAddr::from(SNAT_V6);
    let reply = snat(i.ip.dst) && i.ports.is_some_and(|(_, d)| SNAT_PORTS.contains(&d));
    let about_backend_leg = i.inner.as_ref().is_some_and(|(inner, _)| snat(inner.src));
    if on_client_side && (reply || about_backend_leg) {
        return Err(v(
            "a reply or ICMP error forwarded though it arrived on the client side",
            format!("{} -> {}", i.ip.src, i.ip.dst),
        ));
    }
    if hook == Hook::Tc && action == TC_ACT_REDIRECT && out[..12] != input[..12] {
        return Err("TC changed the Ethernet header (bpf_redirect_neigh writes it)".into());
    }

    if let Some((inner, iports)) = &o.inner {
        // A translated ICMP error goes to the quoted packet's source, from
        // its destination.
        if o.ip.dst != inner.src || o.ip.src != inner.dst {
            return Err(
                "translated ICMP error does not point back at the quoted packet's sender".into(),
            );
        }
        if !model.backend_addrs.contains(&o.ip.dst) && !model.clients.contains(&o.ip.dst) {
            return Err(v(
                "ICMP error sent to neither a backend nor a client",
                o.ip.dst.to_string(),
            ));
        }
        let quoted_l4 =
            input.len() as isize - (ETH_LEN + i.ip.header_len + 8 + inner.header_len) as isize;
        if quoted_l4 < 8 {
            return Err(v(
                "translated an ICMP error quoting fewer than 8 bytes of L4 header",
                format!("{quoted_l4} bytes quoted"),
            ));
        }
        match &i.inner {
            Some((ip, ports)) if ip.proto == inner.proto && ports.is_some() == iports.is_some() => {
            }
            _ => {
                return Err("translated an ICMP error whose quote changed shape or was none".into())
            }
        }
        return Ok(());
    }

    let (isport, idport) = i.ports.ok_or("forwarded a packet without ports")?;
    let (osport, odport) = o.ports.ok_or("output lost its ports")?;
    let (isrc, idst) = (sock_of(i.ip.src, isport), sock_of(i.ip.dst, idport));
    let (osrc, odst) = (sock_of(o.ip.src, osport), sock_of(o.ip.dst, odport));
    let proto = i.ip.proto;
    let is_reply = (i.ip.dst == IpAddr::V4(SNAT_V4) || i.ip.dst == IpAddr::V6(SNAT_V6))
        && SNAT_PORTS.contains(&idport);
    if is_reply {
        if let Some(&(client, vip)) = model.replies.get(&(isrc, idst, proto)) {
            if (osrc, odst) == (vip, client) {
                return Ok(());
            }
        }
        // Not what the forwarded packets we saw assigned: the flow may have
        // been set up by a packet that passed (TTL expired after the pick).
        // Then the table must say so, and the client must have sent to us.
        let key = flow_key(isrc, idst, proto);
        let entry = lab.conn(&key);
        let seen = model.replies.get(&(isrc, idst, proto));
        let consistent = entry.is_some_and(|c| {
            c.flags & lb_common::CONN_F_REVERSE != 0
                && addr16(osrc.ip()) == c.new_src
                && addr16(odst.ip()) == c.new_dst
                && osport.to_be() == c.new_sport_be
                && odport.to_be() == c.new_dport_be
        });
        if !consistent || !model.clients.contains(&odst.ip()) {
            return Err(v(
                "reply translated to something no flow assigned",
                format!(
                    "reply {isrc} -> {idst} became {osrc} -> {odst}; forwarded packets assigned \
                     that port to {seen:?} (client, VIP); CONNS holds {}",
                    entry.map_or("nothing".into(), |c| show_conn(&c, key.family))
                ),
            ));
        }
        return Ok(());
    }
    let svc = model.service_for(i.ip.dst, idport, proto).ok_or_else(|| {
        v(
            "forwarded a packet no service claims",
            format!("{isrc} -> {idst} proto {proto}"),
        )
    })?;
    if !svc.backends.contains(&odst) {
        return Err(v(
            "sent to a backend of another service",
            format!("{odst} is not a backend of service {}", svc.svc.id()),
        ));
    }
    let snat = snat_addr_for(i.ip.dst);
    let range = svc.svc.val.snat_port_lo..=svc.svc.val.snat_port_hi;
    if osrc.ip() != snat || !range.contains(&osport) {
        return Err(v(
            "wrong SNAT source",
            format!("source became {osrc}, want {snat} with a port in {range:?}"),
        ));
    }
    let index = svc.svc.backends.iter().find(|b| b.1 == odst).unwrap().0;
    if model.states[&index] == BACKEND_DOWN {
        return Err(v(
            "sent to a down backend",
            format!("backend {index} ({odst})"),
        ));
    }
    model.record_flow((isrc, idst, proto, odst, osrc));
    Ok(())
}

// ---- the run --------------------------------------------------------------------------------

fn churn(lab: &mut PacketLab, model: &mut Model, round: u64) {
    // The flood guard is on every other round (a low threshold: most new
    // flows of the round meet it).
    let limit = if round % 2 == 1 { 20 } else { 0 };
    lab.set_config(|c| c.flood_new_flows_per_cpu = limit);
    // Backend 4 (10.1.0.14:8080 of the first service) cycles through its states.
    let state = [BACKEND_DRAINING, BACKEND_DOWN, BACKEND_ACTIVE][(round % 3) as usize];
    lab.set_backend_state(4, state);
    model.states.insert(4, state);
    // The first service flips to a rotated table.
    let mut svc = model.services[0].svc.clone();
    let inactive = svc.val.active_half ^ 1;
    let indexes: Vec<u32> = svc.backends.iter().map(|b| b.0).collect();
    lab.write_table(&mut svc, inactive, round_robin(&indexes, round as usize));
    lab.flip(&mut svc);
    model.services[0].svc = svc;
}

#[test]
fn fuzz_xdp_and_tc() {
    require_root();
    let seed: u64 = match std::env::var("XDPLB_FUZZ_SEED") {
        Ok(s) => s.parse().expect("XDPLB_FUZZ_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    let xdp_packets: u64 = std::env::var("XDPLB_FUZZ_PACKETS")
        .map(|s| s.parse().expect("XDPLB_FUZZ_PACKETS must be a number"))
        .unwrap_or(DEFAULT_XDP_PACKETS);
    let tc_packets = xdp_packets / 5;
    eprintln!("fuzz seed {seed} (replay with XDPLB_FUZZ_SEED={seed}); {xdp_packets} XDP + {tc_packets} TC packets");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lab = PacketLab::new("fuzz");
    let mut model = setup(&mut lab);
    let mut stats = Stats {
        runs: 0,
        refused: 0,
        drops: 0,
        forwarded: 0,
        by_action: HashMap::new(),
    };
    let mut violations: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let start = Instant::now();
    let total = xdp_packets + tc_packets;
    let churn_every = CHURN_EVERY.min(total / 8).max(1);
    let (mut xdp_left, mut tc_left) = (xdp_packets, tc_packets);

    // Frames the kernel refuses to run do not count towards the totals.
    let mut n = 0u64;
    while xdp_left + tc_left > 0 {
        n += 1;
        let hook = if rng.gen_range(0..xdp_left + tc_left) < xdp_left {
            Hook::Xdp
        } else {
            Hook::Tc
        };
        let frame = match rng.gen_range(0..100) {
            0..=9 => random_frame(&mut rng),
            10..=44 => gen_valid(&mut rng, &model),
            45 => (0..rng.gen_range(0..ETH_LEN + 20))
                .map(|_| rng.r#gen())
                .collect(),
            _ => {
                let mut f = gen_valid(&mut rng, &model);
                mutate(&mut rng, &mut f);
                f
            }
        };
        // Now and then a frame from the backend side arrives on the client
        // side, as a forged one would.
        let on_client_side =
            rng.gen_bool(0.05) && view(&frame).is_some_and(|v| is_back_side(v.ip.src));
        let res = if on_client_side {
            let front = lab.front_ifindex;
            lab.try_run_on(hook, front, &frame)
        } else {
            lab.try_run(hook, &frame)
        };
        let (action, out) = match res {
            Ok(r) => r,
            Err(_) if hook.kernel_may_refuse(&frame) => {
                stats.refused += 1;
                continue;
            }
            Err(e) => panic!(
                "seed {seed}, packet {n} ({hook:?}): BPF_PROG_TEST_RUN failed: {e}\n{}",
                hex(&frame)
            ),
        };
        match hook {
            Hook::Xdp => xdp_left -= 1,
            Hook::Tc => tc_left -= 1,
        }
        stats.runs += 1;
        *stats.by_action.entry((hook, action)).or_default() += 1;
        if let Err(bad) = check(
            hook,
            on_client_side,
            &frame,
            action,
            &out,
            &mut model,
            &mut stats,
            &lab,
        ) {
            let entry = violations.entry(bad.kind).or_insert_with(|| {
                let example = format!(
                    "packet {n} ({hook:?}, action {}): {}\n      input:  {}\n{}      output: {}\n{}",
                    hook.action_name(action),
                    bad.detail,
                    describe(&frame),
                    hex(&frame),
                    describe(&out),
                    hex(&out)
                );
                (0, example)
            });
            entry.0 += 1;
        }
        if stats.runs.is_multiple_of(RECONCILE_EVERY) || stats.runs == total {
            let reasons = lab.reasons();
            let counted: u64 = reasons.iter().sum();
            assert_eq!(
                counted, stats.runs,
                "seed {seed}, after packet {n}: {} runs but {counted} counted under reasons: {reasons:?}",
                stats.runs
            );
            let dropped: u64 = reason::NAMES
                .iter()
                .zip(&reasons)
                .filter(|(name, _)| name.starts_with("drop_"))
                .map(|(_, n)| n)
                .sum();
            assert_eq!(
                dropped, stats.drops,
                "seed {seed}, after packet {n}: {} drops seen, {dropped} counted under drop reasons",
                stats.drops
            );
        }
        if stats.runs.is_multiple_of(churn_every) {
            churn(&mut lab, &mut model, stats.runs / churn_every);
        }
    }
    let reasons = lab.reasons();
    let conns = lab.dp().conns().map(|c| c.len()).unwrap_or(0);
    eprintln!(
        "fuzz done in {:.1?}: {} runs ({} refused by the kernel as too short), {} forwarded, {} dropped, CONNS holds {conns}",
        start.elapsed(),
        stats.runs,
        stats.refused,
        stats.forwarded,
        stats.drops
    );
    let mut actions: Vec<_> = stats.by_action.iter().collect();
    actions.sort_by_key(|(k, _)| (k.0 == Hook::Tc, k.1));
    for ((hook, action), count) in actions {
        eprintln!("  {hook:?} {}: {count}", hook.action_name(*action));
    }
    for (i, count) in reasons.iter().enumerate().filter(|(_, c)| **c > 0) {
        eprintln!("  {}: {count}", reason::NAMES[i]);
    }
    let events = lab.events();
    for (i, count) in events.iter().enumerate() {
        eprintln!("  event {}: {count}", lb_common::event::NAMES[i]);
    }
    if !violations.is_empty() {
        let mut report = String::new();
        for (kind, (count, example)) in &violations {
            report.push_str(&format!("\n  {count} x {kind}\n    first: {example}"));
        }
        panic!("seed {seed}: invariants broken (replay with XDPLB_FUZZ_SEED={seed}):{report}");
    }
    // The run must have reached the interesting paths, or it proved little.
    for r in [
        reason::FWD_REDIRECT,
        reason::PASS_TRUNCATED,
        reason::PASS_NO_SERVICE,
        reason::DROP_REPLY_WRONG_IFACE,
        reason::DROP_FLOOD_GUARD,
        reason::DROP_SYN_CHALLENGE,
        reason::DROP_RST_NO_CONN,
    ] {
        assert!(
            reasons[r as usize] > 0,
            "seed {seed}: no packet took {}",
            reason::NAMES[r as usize]
        );
    }
    for e in [
        lb_common::event::ESTABLISHED,
        lb_common::event::NON_SYN_MISS,
    ] {
        assert!(
            events[e as usize] > 0,
            "seed {seed}: no {} event",
            lb_common::event::NAMES[e as usize]
        );
    }
    assert!(
        stats.forwarded > total / 20,
        "seed {seed}: only {} packets were forwarded",
        stats.forwarded
    );
}
