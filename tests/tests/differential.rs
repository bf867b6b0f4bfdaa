//! `xdplb explain` against the kernel: random table states and random
//! packets, and for each the verdict, the reason and the destination that
//! `explain` predicts (lb-user/src/explain.rs, reading the pinned maps as
//! the command does) must be what `BPF_PROG_TEST_RUN` then does with the
//! same packet on the same maps, through XDP and TC in turn.
//!
//! The states cover backends in every state, recent and old refusals,
//! forward and reverse entries in both tables (open, closing, reset,
//! expired, of another service, pointing at a backend that moved), exact
//! and wildcard services, TCP and UDP, IPv4 and IPv6, Maglev tables with
//! empty slots and other services' backends. A tally of the outcomes must
//! show every branch taken often enough, so the check cannot quietly
//! narrow to the easy cases.
//!
//! What `explain` cannot know, and the generator so leaves out: the flood
//! guard (off here), a client's RST without a flow (the query carries no
//! flags but `--syn`), SNAT exhaustion (ranges stay nearly empty), and a
//! reply on another interface than its flow's (it says which one; the
//! reply arrives there).
//!
//! `XDPLB_DIFF_CASES` sets the number of cases (default 100,000),
//! `XDPLB_DIFF_SEED` the seed (default: random, printed).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use lb_common::{
    reason, Conn, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_EMPTY, CONN_F_REVERSE,
    CONN_F_SYN, CONN_F_UNANSWERED, PROTO_TCP, PROTO_UDP, TCP_STATE_CLOSING, TCP_STATE_OPEN,
    TCP_STATE_RESET,
};
use lb_user::{
    dataplane::pinned::PinnedMaps,
    report::explain::{self, flow_key, Explanation, Names, Query},
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use tests::packet::{
    addr_bytes, backend_v4, backend_v6, sock, view, Hook, PacketLab, Pkt, Svc, CLIENT_V4,
    CLIENT_V6, MAGLEV_SIZE, SNAT_PORTS, SNAT_V4, SNAT_V6, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST,
    TCP_SYN, VIP_V4, VIP_V6, XDP_TX,
};

const DEFAULT_CASES: usize = 100_000;

const SEC: u64 = 1_000_000_000;

/// Short timeouts, so an expired entry needs no long uptime.
const TCP_TIMEOUT: u64 = 60 * SEC;
const CLOSING_TIMEOUT: u64 = 10 * SEC;
const UDP_TIMEOUT: u64 = 20 * SEC;
const UNANSWERED_TIMEOUT: u64 = 5 * SEC;

struct World {
    svcs: Vec<Svc>,
    /// Every backend: (index, address, service position in `svcs`).
    backends: Vec<(u32, SocketAddr, usize)>,
}

impl World {
    fn build(lab: &mut PacketLab) -> Self {
        let v4 = |ns: std::ops::RangeInclusive<u8>, port| {
            ns.map(|n| sock(backend_v4(n), port)).collect::<Vec<_>>()
        };
        let svcs = vec![
            lab.add_service(sock(VIP_V4, 80), PROTO_TCP, SNAT_PORTS, &v4(11..=14, 8080)),
            // The wildcard: any address on port 80 that no exact service has.
            lab.add_service(
                sock(Ipv4Addr::UNSPECIFIED, 80),
                PROTO_TCP,
                SNAT_PORTS,
                &v4(15..=17, 8081),
            ),
            lab.add_service(sock(VIP_V4, 53), PROTO_UDP, SNAT_PORTS, &v4(18..=20, 5353)),
            lab.add_service(
                sock(VIP_V6, 80),
                PROTO_TCP,
                SNAT_PORTS,
                &(11..=13)
                    .map(|n| sock(backend_v6(n), 8080))
                    .collect::<Vec<_>>(),
            ),
        ];
        let backends = svcs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.backends.iter().map(move |&(b, a)| (b, a, i)))
            .collect();
        World { svcs, backends }
    }
}

/// One random case: the packet, and where it arrives.
struct Case {
    hook: Hook,
    proto: u8,
    flags: u8,
    src: SocketAddr,
    dst: SocketAddr,
}

impl Case {
    fn frame(&self) -> Vec<u8> {
        match self.proto {
            PROTO_UDP => Pkt::udp(self.src, self.dst, b"differential").build(),
            _ => Pkt::tcp(self.src, self.dst, self.flags).build(),
        }
    }

    fn fresh_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

fn pick<T: Copy>(rng: &mut StdRng, weighted: &[(u32, T)]) -> T {
    let total: u32 = weighted.iter().map(|w| w.0).sum();
    let mut x = rng.gen_range(0..total);
    for &(w, v) in weighted {
        if x < w {
            return v;
        }
        x -= w;
    }
    unreachable!()
}

/// New backend states, refusals and Maglev tables for a few backends and
/// services: the state drifts from case to case without ever settling.
fn stir(lab: &mut PacketLab, w: &mut World, rng: &mut StdRng, now: u64) {
    for _ in 0..2 {
        let (b, _, _) = *w.backends.choose(rng).unwrap();
        let state = pick(
            rng,
            &[
                (60, BACKEND_ACTIVE),
                (15, BACKEND_DRAINING),
                (15, BACKEND_DOWN),
                (10, BACKEND_EMPTY),
            ],
        );
        lab.set_backend_state(b, state);
        let (b, _, _) = *w.backends.choose(rng).unwrap();
        let at = pick(
            rng,
            &[
                (40, now.saturating_sub(SEC / 10).max(1)),
                (30, now.saturating_sub(30 * SEC).max(1)),
                (30, 0),
            ],
        );
        lab.dp_mut().set_refused_at(b, at).expect("writing REFUSED");
    }
    if rng.gen_ratio(1, 40) {
        let i = rng.gen_range(0..w.svcs.len());
        let own: Vec<u32> = w.svcs[i].backends.iter().map(|b| b.0).collect();
        let all: Vec<u32> = w.backends.iter().map(|b| b.0).collect();
        for half in 0..2 {
            let slots = (0..MAGLEV_SIZE)
                .map(|_| match rng.gen_range(0..10) {
                    0 => 0,
                    1 => *all.choose(rng).unwrap(),
                    _ => *own.choose(rng).unwrap(),
                })
                .collect();
            let svc = &mut w.svcs[i];
            lab.write_table(svc, half, slots);
        }
        if rng.gen_bool(0.5) {
            lab.flip(&mut w.svcs[i]);
        }
    }
}

fn random_case(w: &World, rng: &mut StdRng, hook: Hook) -> (Case, usize, bool) {
    let i = rng.gen_range(0..w.svcs.len());
    let svc = &w.svcs[i];
    let proto = svc.proto;
    let v6 = svc.vip.is_ipv6();
    let client = SocketAddr::new(
        if v6 {
            IpAddr::V6(CLIENT_V6)
        } else {
            IpAddr::V4(CLIENT_V4)
        },
        rng.gen_range(1024..=65535),
    );
    let tcp_flags = |rng: &mut StdRng, reply: bool| {
        if proto != PROTO_TCP {
            return 0;
        }
        let mut choices = vec![
            (40, TCP_SYN),
            (20, TCP_ACK),
            (15, TCP_PSH | TCP_ACK),
            (10, TCP_FIN | TCP_ACK),
            (5, TCP_SYN | TCP_ACK),
        ];
        if reply {
            choices.push((10, TCP_RST));
        }
        pick(rng, &choices)
    };
    let reply = rng.gen_ratio(1, 4);
    if reply {
        // A backend's packet to a SNAT pair.
        let (_, backend) = *svc.backends.choose(rng).unwrap();
        let snat = if v6 {
            IpAddr::V6(SNAT_V6)
        } else {
            IpAddr::V4(SNAT_V4)
        };
        let case = Case {
            hook,
            proto,
            flags: tcp_flags(rng, true),
            src: backend,
            dst: SocketAddr::new(snat, rng.gen_range(SNAT_PORTS)),
        };
        return (case, i, true);
    }
    let mut dst = svc.vip;
    if dst.ip().is_unspecified() {
        dst = sock(Ipv4Addr::new(10, 0, 0, rng.gen_range(101..=110)), 80);
    }
    if rng.gen_ratio(1, 20) {
        // No service on this port.
        dst.set_port(dst.port() + 1);
    }
    let case = Case {
        hook,
        proto,
        flags: tcp_flags(rng, false),
        src: client,
        dst,
    };
    (case, i, false)
}

/// Maybe an entry under the case's own key, in CONNS or UNANSWERED.
fn random_entry(
    lab: &mut PacketLab,
    w: &World,
    rng: &mut StdRng,
    case: &Case,
    svc: usize,
    reply: bool,
    now: u64,
) {
    let table = pick(rng, &[(30, 0u8), (40, 1), (30, 2)]);
    if table == 0 {
        return;
    }
    let s = &w.svcs[svc];
    let key = flow_key(case.proto, case.src, case.dst);
    let mut c = Conn::default();
    let (index, backend) = if rng.gen_ratio(4, 5) {
        *s.backends.choose(rng).unwrap()
    } else {
        let b = w.backends.choose(rng).unwrap();
        (b.0, b.1)
    };
    c.backend = index;
    c.service = if rng.gen_ratio(9, 10) {
        s.id()
    } else {
        w.svcs.choose(rng).unwrap().id()
    };
    if reply {
        // A reverse entry: back to the client, from the VIP.
        c.flags = if rng.gen_ratio(9, 10) {
            CONN_F_REVERSE
        } else {
            0
        };
        let client = if case.src.is_ipv6() {
            sock(CLIENT_V6, rng.gen_range(1024..=65535))
        } else {
            sock(CLIENT_V4, rng.gen_range(1024..=65535))
        };
        let vip = if s.vip.ip().is_unspecified() {
            sock(Ipv4Addr::new(10, 0, 0, 101), 80)
        } else {
            s.vip
        };
        addr_bytes(client.ip(), &mut c.new_dst);
        c.new_dport_be = client.port().to_be();
        addr_bytes(vip.ip(), &mut c.new_src);
        c.new_sport_be = vip.port().to_be();
        c.ifindex = lab.back_ifindex;
    } else {
        c.flags = if rng.gen_ratio(1, 12) {
            CONN_F_REVERSE
        } else {
            0
        };
        let to = if rng.gen_ratio(7, 8) {
            backend
        } else {
            w.backends.choose(rng).unwrap().1
        };
        addr_bytes(to.ip(), &mut c.new_dst);
        c.new_dport_be = to.port().to_be();
        let snat = if case.src.is_ipv6() {
            IpAddr::V6(SNAT_V6)
        } else {
            IpAddr::V4(SNAT_V4)
        };
        addr_bytes(snat, &mut c.new_src);
        c.new_sport_be = rng.gen_range(SNAT_PORTS).to_be();
        c.ifindex = lab.front_ifindex;
    }
    if rng.gen_bool(0.5) {
        c.flags |= CONN_F_SYN;
    }
    c.tcp_state = pick(
        rng,
        &[
            (70, TCP_STATE_OPEN),
            (20, TCP_STATE_CLOSING),
            (10, TCP_STATE_RESET),
        ],
    );
    let idle = if rng.gen_ratio(4, 5) {
        SEC
    } else {
        // Well past every timeout.
        3 * TCP_TIMEOUT
    };
    c.last_seen_ns = now.saturating_sub(idle).max(1);
    c.created_ns = c.last_seen_ns.saturating_sub(SEC).max(1);
    if table == 2 {
        c.flags |= CONN_F_UNANSWERED;
        lab.dp_mut()
            .insert_unanswered(&key, &c)
            .expect("writing UNANSWERED");
    } else {
        lab.dp_mut().insert_conn(&key, &c).expect("writing CONNS");
    }
}

/// What the kernel did: the verdict as `explain` names it, the reason
/// counted, and where a forwarded packet went.
fn kernel(lab: &mut PacketLab, case: &Case) -> (&'static str, &'static str, Option<SocketAddr>) {
    let before = lab.reasons();
    let (action, out) = lab.run(case.hook, &case.frame());
    let after = lab.reasons();
    let counted: Vec<usize> = (0..after.len())
        .filter(|&i| after[i] != before.get(i).copied().unwrap_or(0))
        .collect();
    let reason = match counted.as_slice() {
        [one] => reason::NAMES[*one],
        _ => "(not exactly one reason counted)",
    };
    let verdict = if action == case.hook.pass() {
        "pass"
    } else if action == case.hook.drop_() {
        "drop"
    } else if action == case.hook.redirect() || (case.hook == Hook::Xdp && action == XDP_TX) {
        "forward"
    } else {
        "(an action explain never predicts)"
    };
    let to = (verdict == "forward")
        .then(|| view(&out))
        .flatten()
        .and_then(|v| v.ports.map(|(_, d)| SocketAddr::new(v.ip.dst, d)));
    (verdict, reason, to)
}

/// The tally's label for an explanation: its path, verdict, reason, why an
/// entry was not used (digits dropped), how the service matched, and
/// whether Maglev fell back to a backend that refused lately.
fn label(e: &Explanation, case: &Case) -> String {
    let why = e
        .connection
        .as_ref()
        .map(|c| match &c.why_not {
            Some(w) => w.chars().filter(|ch| !ch.is_ascii_digit()).collect(),
            None if c.used => format!("used {}", c.table),
            None => "unused".into(),
        })
        .unwrap_or_else(|| "no entry".into());
    // Maglev stops at the first usable probe, so a chosen probe before the
    // last is the fallback to a backend that refused lately.
    let fallback = e.maglev.as_ref().is_some_and(|m| {
        m.probes
            .iter()
            .position(|p| p.chosen)
            .is_some_and(|i| i + 1 < m.probes.len())
    });
    format!(
        "{} {} {} {} | {} | {} | {}{}",
        e.proto,
        e.path,
        e.verdict,
        e.reason.unwrap_or("-"),
        why,
        e.service.as_ref().map_or("-", |s| s.matched),
        if case.dst.is_ipv6() { "v6" } else { "v4" },
        if fallback { " | refused fallback" } else { "" },
    )
}

#[test]
fn explain_predicts_what_the_kernel_does() {
    let cases: usize = std::env::var("XDPLB_DIFF_CASES")
        .ok()
        .map(|v| v.parse().expect("XDPLB_DIFF_CASES: a number"))
        .unwrap_or(DEFAULT_CASES);
    let seed: u64 = std::env::var("XDPLB_DIFF_SEED")
        .ok()
        .map(|v| v.parse().expect("XDPLB_DIFF_SEED: a number"))
        .unwrap_or_else(rand::random);
    eprintln!("differential: {cases} cases, XDPLB_DIFF_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut lab = PacketLab::new("diff");
    lab.set_config(|c| {
        c.tcp_timeout_ns = TCP_TIMEOUT;
        c.closing_timeout_ns = CLOSING_TIMEOUT;
        c.udp_timeout_ns = UDP_TIMEOUT;
        c.unanswered_timeout_ns = UNANSWERED_TIMEOUT;
        c.flood_new_flows_per_cpu = 0;
    });
    let mut w = World::build(&mut lab);
    let maps = PinnedMaps::open(lab.pin_dir()).expect("opening the pinned maps");
    let names = Names::default();

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let mut mismatch_count = 0;
    for n in 0..cases {
        let hook = if n % 2 == 0 { Hook::Xdp } else { Hook::Tc };
        lab.dp_mut().clear_flows().expect("emptying the tables");
        let now = lb_user::clock::monotonic_now_ns();
        stir(&mut lab, &mut w, &mut rng, now);
        let (case, svc, reply) = random_case(&w, &mut rng, hook);
        random_entry(&mut lab, &w, &mut rng, &case, svc, reply, now);

        let q = Query {
            proto: case.proto,
            src: case.src,
            dst: case.dst,
            syn: case.fresh_syn(),
        };
        let e = explain::explain(&maps, &q, lb_user::clock::monotonic_now_ns(), &names)
            .unwrap_or_else(|err| panic!("case {n}: explain failed: {err:#}"));
        let (verdict, reason, to) = kernel(&mut lab, &case);

        let predicted_reason = e.reason.unwrap_or(if verdict == "forward" {
            reason
        } else {
            "(none)"
        });
        let same = e.verdict == verdict
            && predicted_reason == reason
            && (verdict != "forward" || e.to == to);
        *tally.entry(label(&e, &case)).or_default() += 1;
        if !same {
            mismatch_count += 1;
            if mismatches.len() < 5 {
                mismatches.push(format!(
                    "case {n} ({:?}, flags {:#04x}): {} -> {}\n  explain: {} {} to {:?}\n  \
                     kernel:  {verdict} {reason} to {to:?}\n{}",
                    case.hook,
                    case.flags,
                    case.src,
                    case.dst,
                    e.verdict,
                    e.reason.unwrap_or("-"),
                    e.to,
                    explain::render(&e)
                ));
            }
        }
    }
    let report: String = tally
        .iter()
        .map(|(k, v)| format!("{v:>7}  {k}\n"))
        .collect();
    eprintln!("outcomes:\n{report}");
    assert!(
        mismatch_count == 0,
        "explain and the kernel disagreed on {mismatch_count} of {cases} cases \
         (XDPLB_DIFF_SEED={seed}):\n\n{}",
        mismatches.join("\n\n")
    );

    // Every branch was taken: a fixed share of the cases each.
    let min = (cases / 2_000).max(3);
    let seen = |what: &[&str]| -> usize {
        tally
            .iter()
            .filter(|(k, _)| what.iter().all(|w| k.contains(w)))
            .map(|(_, v)| v)
            .sum()
    };
    let must = [
        vec!["forward forward", "no entry"],
        vec!["forward forward", "used established"],
        vec!["forward forward", "used unanswered"],
        vec!["it is a reverse entry"],
        vec!["it belongs to service"],
        vec!["it has expired"],
        vec!["a fresh SYN on a closing connection"],
        vec!["a fresh SYN on a reset connection"],
        vec!["refused a connection"],
        vec!["is draining: a fresh SYN"],
        vec!["is down"],
        vec!["is empty"],
        vec!["now belongs to service"],
        vec!["not the flow's"],
        vec!["refused fallback"],
        vec!["drop_no_backend"],
        vec!["pass_no_service"],
        vec!["wildcard"],
        vec!["v6", "forward forward"],
        vec!["udp forward forward", "no entry"],
        vec!["udp forward forward", "used"],
        vec!["udp reply forward"],
        vec!["reply forward"],
        vec!["reply drop drop_reply_no_conn", "no entry"],
        vec!["reply drop drop_reply_no_conn", "forward entry"],
    ];
    let thin: Vec<String> = must
        .iter()
        .filter(|w| seen(w) < min)
        .map(|w| format!("{w:?}: {}", seen(w)))
        .collect();
    assert!(
        thin.is_empty(),
        "branches taken fewer than {min} times in {cases} cases (the generator drifted):\n{}",
        thin.join("\n")
    );
}
