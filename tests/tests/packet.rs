//! Packet tests: the data plane against the real kernel with
//! `BPF_PROG_TEST_RUN`, one frame at a time, checking the action, the exact
//! output bytes, every checksum, and the map side effects. docs/DATAPLANE.md
//! is the contract under test.
//!
//! Run as root, one test at a time (each test moves its thread into its own
//! network namespace):
//! `cargo test -p tests --test packet -- --test-threads=1`

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_common::{
    event, reason, Conn, Counters, FlowKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING,
    CONN_F_REPLIED, CONN_F_REVERSE, CONN_F_SYN, CONN_F_SYNACK, CONN_F_UNANSWERED, NEXT_HOP_TTL_NS,
    PROTO_TCP, PROTO_UDP, TCP_STATE_OPEN, TCP_STATE_RESET,
};
use tests::packet::*;

/// Runs a test body once for XDP and once for TC, as `name::xdp` / `name::tc`.
macro_rules! both_hooks {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[test]
            fn xdp() {
                super::$name(Hook::Xdp)
            }
            #[test]
            fn tc() {
                super::$name(Hook::Tc)
            }
        }
    )*};
}

both_hooks!(
    new_tcp_flow_v4,
    new_tcp_flow_v6,
    established_flow_survives_table_flip,
    reply_path,
    udp_flow_and_reply,
    icmp_errors_about_snat_side_are_translated,
    icmp_errors_about_client_side_are_translated,
    unknown_service_passes_unchanged,
    service_ports_follow_the_services,
    wildcard_service,
    truncated_frames_pass_unchanged,
    unparsed_packets_pass_with_their_reason,
    draining_keeps_flows_and_down_repicks,
    fresh_syns_leave_draining_and_refused_flows,
    snat_exhaustion_drops,
    no_neighbour_and_oversized,
    next_hops_are_cached_briefly,
    tcp_flows_are_established_by_the_backends_answer,
    udp_flows_are_established_when_the_client_speaks_again,
    unanswered_flows_expire_and_free_their_port,
    a_rst_frees_the_port,
    non_syn_segments_start_unanswered_flows,
    refusals_count_only_for_a_clients_syn,
    flood_guard_drops_non_syn_misses_and_takes_idle_ports,
    replies_count_only_from_the_backend_side,
    icmp_errors_count_only_from_the_quoted_side_of_live_flows,
    the_flow_hash_is_keyed,
    rare_drops_and_the_flood_guard_reach_the_log_once,
);

// ---- shared setup ----------------------------------------------------------------

const V4_BACKENDS: [u8; 4] = [11, 12, 13, 14];
const BACKEND_PORT: u16 = 8080;

fn backends_v4(ns: &[u8], port: u16) -> Vec<SocketAddr> {
    ns.iter().map(|&n| sock(backend_v4(n), port)).collect()
}

fn backends_v6(ns: &[u8], port: u16) -> Vec<SocketAddr> {
    ns.iter().map(|&n| sock(backend_v6(n), port)).collect()
}

fn tcp_v4_service(lab: &mut PacketLab) -> Svc {
    lab.add_service(
        sock(VIP_V4, 80),
        PROTO_TCP,
        40000..=40999,
        &backends_v4(&V4_BACKENDS, BACKEND_PORT),
    )
}

fn tcp_v6_service(lab: &mut PacketLab) -> Svc {
    lab.add_service(
        sock(VIP_V6, 80),
        PROTO_TCP,
        41000..=41999,
        &backends_v6(&V4_BACKENDS, BACKEND_PORT),
    )
}

fn client(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    sock(ip, port)
}

fn lab(hook: Hook, tag: &str) -> PacketLab {
    let t = match hook {
        Hook::Xdp => "x",
        Hook::Tc => "t",
    };
    PacketLab::new(&format!("{tag}-{t}"))
}

// ---- assertions -------------------------------------------------------------------------

/// Runs `input` and checks the action and the exact output.
#[track_caller]
fn expect(lab: &mut PacketLab, hook: Hook, what: &str, input: &[u8], action: u32, want: &[u8]) {
    let (got_action, out) = lab.run(hook, input);
    if got_action != action || out != want {
        panic!(
            "{what} ({hook:?}): expected action {} and the frame below, saw action {}\n{}input was: {}\n{}",
            hook.action_name(action),
            hook.action_name(got_action),
            diff(&out, want),
            describe(input),
            hex(input)
        );
    }
    let c = checksums(&out);
    assert!(
        c.all_valid(),
        "{what} ({hook:?}): output has a broken checksum {c:?}\n{}",
        hex(&out)
    );
}

/// Runs `input` (arriving on `ifindex`, or its side's interface) and checks
/// it was dropped, unchanged, under `why`.
#[track_caller]
fn expect_drop(
    lab: &mut PacketLab,
    hook: Hook,
    what: &str,
    ifindex: Option<u32>,
    input: &[u8],
    why: u32,
) {
    let before = lab.reasons();
    let (action, out) = match ifindex {
        Some(i) => lab.run_on(hook, i, input),
        None => lab.run(hook, input),
    };
    let after = lab.reasons();
    assert!(
        action == hook.drop_() && out == input,
        "{what} ({hook:?}): expected {} with the frame unchanged, saw action {}\n{}",
        hook.action_name(hook.drop_()),
        hook.action_name(action),
        diff(&out, input)
    );
    let mut want = before.clone();
    want[why as usize] += 1;
    assert_eq!(
        after,
        want,
        "{what} ({hook:?}): expected exactly one packet under {}, saw {}",
        reason::NAMES[why as usize],
        reason_delta(&before, &after)
    );
}

/// How much each event moved between two readings, by name.
fn event_delta(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| a != b)
        .map(|(i, (b, a))| (event::NAMES[i], a - b))
        .collect()
}

/// Runs `input` and checks it passed byte-for-byte unchanged under `reason`.
#[track_caller]
fn expect_pass(lab: &mut PacketLab, hook: Hook, what: &str, input: &[u8], why: u32) {
    let before = lab.reasons();
    let (action, out) = lab.run(hook, input);
    let after = lab.reasons();
    assert!(
        action == hook.pass() && out == input,
        "{what} ({hook:?}): expected {} with the frame unchanged, saw action {}\n{}",
        hook.action_name(hook.pass()),
        hook.action_name(action),
        diff(&out, input)
    );
    let mut want = before.clone();
    want[why as usize] += 1;
    assert_eq!(
        after,
        want,
        "{what} ({hook:?}): expected exactly one packet under {}, saw {}",
        reason::NAMES[why as usize],
        reason_delta(&before, &after)
    );
}

/// Checks that exactly one packet was counted, under one of `whys`.
#[track_caller]
fn expect_one_reason(what: &str, before: &[u64], after: &[u64], whys: &[u32]) {
    let total: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
    let hit = whys
        .iter()
        .any(|&w| after[w as usize] == before[w as usize] + 1);
    assert!(
        total == 1 && hit,
        "{what}: expected one packet counted under {:?}, saw {}",
        whys.iter()
            .map(|&w| reason::NAMES[w as usize])
            .collect::<Vec<_>>(),
        reason_delta(before, after)
    );
}

/// The entry `key` must hold, time fields aside.
#[track_caller]
fn expect_conn(lab: &PacketLab, what: &str, key: &FlowKey, want: Conn) {
    let Some(got) = lab.conn(key) else {
        panic!(
            "{what}: expected a CONNS entry for {}, found none; CONNS holds:\n{}",
            show_key(key),
            lab.dump_conns()
        );
    };
    let masked = Conn {
        last_seen_ns: 0,
        created_ns: 0,
        ..got
    };
    assert!(
        masked == want && got.last_seen_ns != 0 && got.created_ns != 0,
        "{what}: CONNS[{}]\n  expected {} (times non-zero)\n  saw      {}",
        show_key(key),
        show_conn(&want, key.family),
        show_conn(&got, key.family)
    );
}

/// The forward entry a client's SYN (from the loopback, ifindex 1) leaves:
/// not established yet.
fn forward_conn(svc: &Svc, input: &Pkt, backend: u32, snat_port: u16) -> Conn {
    let b = svc.backend_sock(backend);
    Conn {
        new_src: addr16(snat_addr_for(input.dst)),
        new_dst: addr16(b.ip()),
        new_sport_be: snat_port.to_be(),
        new_dport_be: b.port().to_be(),
        backend,
        service: svc.id(),
        flags: CONN_F_UNANSWERED | CONN_F_SYN,
        tcp_state: TCP_STATE_OPEN,
        ifindex: 1,
        ..Default::default()
    }
}

/// The reverse entry of that SYN's flow: bound to `back`.
fn reverse_conn(lab: &PacketLab, svc: &Svc, input: &Pkt, backend: u32) -> Conn {
    Conn {
        new_src: addr16(input.dst),
        new_dst: addr16(input.src),
        new_sport_be: input.ports().1.to_be(),
        new_dport_be: input.ports().0.to_be(),
        backend,
        service: svc.id(),
        flags: CONN_F_REVERSE | CONN_F_UNANSWERED | CONN_F_SYN,
        tcp_state: TCP_STATE_OPEN,
        ifindex: lab.back_ifindex,
        ..Default::default()
    }
}

/// The key of the reverse entry: backend -> SNAT address:port.
fn reverse_key(svc: &Svc, input: &Pkt, backend: u32, snat_port: u16) -> FlowKey {
    flow_key(
        svc.backend_sock(backend),
        sock(snat_addr_for(input.dst), snat_port),
        input.proto(),
    )
}

/// `input` as it must leave for `backend` with SNAT port `port`.
fn forwarded(hook: Hook, input: &Pkt, svc: &Svc, backend: u32, port: u16) -> Pkt {
    let b = svc.backend_sock(backend);
    let (es, ed) = hook.fwd_eth(input, b.ip());
    input
        .clone()
        .from(sock(snat_addr_for(input.dst), port))
        .to(b)
        .with_ttl(input.ttl - 1)
        .with_eth(es, ed)
}

/// Sends a new flow's first packet and checks everything about it.
/// Returns (backend index, SNAT port).
#[track_caller]
fn new_flow(lab: &mut PacketLab, hook: Hook, svc: &Svc, input: &Pkt) -> (u32, u16) {
    let key = input.flow_key();
    let backend = svc.slot_backend(&key);
    let port = svc.first_snat_port(&key);
    let want = forwarded(hook, input, svc, backend, port);
    expect(
        lab,
        hook,
        "first packet of a new flow",
        &input.build(),
        hook.redirect(),
        &want.build(),
    );
    (backend, port)
}

fn counters(packets: u64, bytes: u64, new_flows: u64) -> Counters {
    Counters {
        packets,
        bytes,
        new_flows,
    }
}

// ---- 1. new flows -------------------------------------------------------------------------

fn new_tcp_flow(hook: Hook, v6: bool) {
    let mut lab = lab(hook, if v6 { "new6" } else { "new4" });
    let svc = if v6 {
        tcp_v6_service(&mut lab)
    } else {
        tcp_v4_service(&mut lab)
    };
    let (cip, vip): (IpAddr, IpAddr) = if v6 {
        (CLIENT_V6.into(), VIP_V6.into())
    } else {
        (CLIENT_V4.into(), VIP_V4.into())
    };
    let syn = Pkt::tcp(client(cip, 33000), sock(vip, 80), TCP_SYN);
    let frame = syn.build();

    let key = syn.flow_key();
    let h = lab_hash(&key);
    let backend = svc.tables[0][(h % MAGLEV_SIZE) as usize];
    let port = 40000 + if v6 { 1000 } else { 0 } + (h % 1000) as u16;
    assert_eq!(
        (backend, port),
        (svc.slot_backend(&key), svc.first_snat_port(&key))
    );

    let before = lab.reasons();
    let want = forwarded(hook, &syn, &svc, backend, port).build();
    expect(
        &mut lab,
        hook,
        "SYN of a new flow",
        &frame,
        hook.redirect(),
        &want,
    );
    expect_one_reason(
        "SYN of a new flow",
        &before,
        &lab.reasons(),
        &[reason::FWD_REDIRECT],
    );

    expect_conn(
        &lab,
        "forward entry",
        &key,
        forward_conn(&svc, &syn, backend, port),
    );
    let rkey = reverse_key(&svc, &syn, backend, port);
    expect_conn(
        &lab,
        "reverse entry",
        &rkey,
        reverse_conn(&lab, &svc, &syn, backend),
    );
    assert_eq!(
        lab.entries(),
        (0, 2),
        "one flow must create exactly two entries, in UNANSWERED:\n{}",
        lab.dump_conns()
    );

    let len = frame.len() as u64;
    assert_eq!(
        lab.service_counters(svc.id()),
        counters(1, len, 1),
        "service counters"
    );
    assert_eq!(
        lab.backend_counters(backend),
        counters(1, len, 1),
        "backend {backend} counters"
    );
    for (other, _) in svc.backends.iter().filter(|b| b.0 != backend) {
        assert_eq!(
            lab.backend_counters(*other),
            counters(0, 0, 0),
            "backend {other} counters"
        );
    }

    // The next packet of the flow: same backend and port, no new flow.
    let ack = syn.clone().with_flags(TCP_ACK);
    let want = forwarded(hook, &ack, &svc, backend, port).build();
    expect(
        &mut lab,
        hook,
        "ACK of the same flow",
        &ack.build(),
        hook.redirect(),
        &want,
    );
    assert_eq!(
        lab.service_counters(svc.id()),
        counters(2, 2 * len, 1),
        "service counters"
    );
    assert_eq!(
        lab.entries(),
        (0, 2),
        "no new entries, and an ACK that acknowledges nothing the backend sent \
         establishes nothing:\n{}",
        lab.dump_conns()
    );
}

fn new_tcp_flow_v4(hook: Hook) {
    new_tcp_flow(hook, false)
}

fn new_tcp_flow_v6(hook: Hook) {
    new_tcp_flow(hook, true)
}

// ---- 2. table flips -----------------------------------------------------------------------

fn established_flow_survives_table_flip(hook: Hook) {
    let mut lab = lab(hook, "flip");
    let mut svc = tcp_v4_service(&mut lab);
    let syn = Pkt::tcp(client(CLIENT_V4, 33001), sock(VIP_V4, 80), TCP_SYN);
    let (backend, port) = new_flow(&mut lab, hook, &svc, &syn);

    // Every slot of the new table differs from the old one.
    let indexes: Vec<u32> = svc.backends.iter().map(|b| b.0).collect();
    lab.write_table(&mut svc, 1, round_robin(&indexes, 1));
    lab.flip(&mut svc);
    assert_ne!(
        svc.slot_backend(&syn.flow_key()),
        backend,
        "test bug: the flip must move the slot"
    );

    let ack = syn.clone().with_flags(TCP_ACK);
    let want = forwarded(hook, &ack, &svc, backend, port).build();
    expect(
        &mut lab,
        hook,
        "established flow after a flip",
        &ack.build(),
        hook.redirect(),
        &want,
    );

    // A new flow uses the new half.
    let syn2 = Pkt::tcp(client(CLIENT_V4, 33002), sock(VIP_V4, 80), TCP_SYN);
    let key2 = syn2.flow_key();
    let b2 = svc.tables[1][svc.slot(&key2)];
    assert_eq!(b2, svc.slot_backend(&key2));
    let (got, _) = new_flow(&mut lab, hook, &svc, &syn2);
    assert_eq!(got, b2);

    // And flipping back restores the old mapping for new flows.
    lab.flip(&mut svc);
    let syn3 = Pkt::tcp(client(CLIENT_V4, 33003), sock(VIP_V4, 80), TCP_SYN);
    let b3 = svc.tables[0][svc.slot(&syn3.flow_key())];
    let (got, _) = new_flow(&mut lab, hook, &svc, &syn3);
    assert_eq!(got, b3);
}

// ---- 3. replies ----------------------------------------------------------------------------

fn reply_path(hook: Hook) {
    let mut lab = lab(hook, "reply");
    let svc4 = tcp_v4_service(&mut lab);
    let svc6 = tcp_v6_service(&mut lab);
    for (svc, cip, vip) in [
        (&svc4, IpAddr::from(CLIENT_V4), IpAddr::from(VIP_V4)),
        (&svc6, CLIENT_V6.into(), VIP_V6.into()),
    ] {
        let syn = Pkt::tcp(client(cip, 34000), sock(vip, 80), TCP_SYN);
        let (backend, port) = new_flow(&mut lab, hook, svc, &syn);
        let b = svc.backend_sock(backend);
        let synack = Pkt::tcp(b, sock(snat_addr_for(vip), port), TCP_SYN | TCP_ACK);
        let (es, ed) = hook.fwd_eth(&synack, cip);
        let want = synack
            .clone()
            .from(sock(vip, 80))
            .to(client(cip, 34000))
            .with_ttl(synack.ttl - 1)
            .with_eth(es, ed);
        let before = lab.reasons();
        let sc = lab.service_counters(svc.id());
        let bc = lab.backend_counters(backend);
        let what = format!("SYN-ACK from backend {b}");
        expect(
            &mut lab,
            hook,
            &what,
            &synack.build(),
            hook.redirect(),
            &want.build(),
        );
        expect_one_reason(&what, &before, &lab.reasons(), &[reason::FWD_REDIRECT]);
        let len = synack.build().len() as u64;
        assert_eq!(
            lab.service_counters(svc.id()),
            counters(sc.packets + 1, sc.bytes + len, sc.new_flows),
            "service counters count replies, without a new flow"
        );
        assert_eq!(
            lab.backend_counters(backend),
            counters(bc.packets + 1, bc.bytes + len, bc.new_flows),
            "backend counters count replies, without a new flow"
        );

        // A reply from another backend to the same SNAT port is no reply of
        // ours: dropped (the stack would answer it with a reset).
        let other = svc.backends.iter().find(|x| x.0 != backend).unwrap().1;
        let stray = synack.clone().from(other);
        expect_drop(
            &mut lab,
            hook,
            "reply from the wrong backend",
            None,
            &stray.build(),
            reason::DROP_REPLY_NO_CONN,
        );
    }
}

// ---- 4. UDP ---------------------------------------------------------------------------------

fn udp_flow_and_reply(hook: Hook) {
    let mut lab = lab(hook, "udp");
    let svc4 = lab.add_service(
        sock(VIP_V4, 53),
        PROTO_UDP,
        42000..=42999,
        &backends_v4(&[15, 16], 53),
    );
    let svc6 = lab.add_service(
        sock(VIP_V6, 53),
        PROTO_UDP,
        43000..=43999,
        &backends_v6(&[15, 16], 53),
    );
    let query =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
    let cases = [
        (
            &svc4,
            IpAddr::from(CLIENT_V4),
            IpAddr::from(VIP_V4),
            false,
            35000,
        ),
        (&svc4, CLIENT_V4.into(), VIP_V4.into(), true, 35001),
        (&svc6, CLIENT_V6.into(), VIP_V6.into(), false, 35002),
    ];
    for (svc, cip, vip, zero, cport) in cases {
        let mut q = Pkt::udp(client(cip, cport), sock(vip, 53), query);
        if zero {
            q = q.with_zero_udp_csum();
        }
        let (backend, port) = new_flow(&mut lab, hook, svc, &q);
        if zero {
            let (_, out) = lab.run(hook, &q.build());
            let at = ETH_LEN + 20 + 6;
            assert_eq!(
                &out[at..at + 2],
                &[0, 0],
                "a UDP/IPv4 checksum of 0 must stay 0\n{}",
                hex(&out)
            );
        }
        let b = svc.backend_sock(backend);
        let mut answer = Pkt::udp(b, sock(snat_addr_for(vip), port), b"answer");
        if zero {
            answer = answer.with_zero_udp_csum();
        }
        let (es, ed) = hook.fwd_eth(&answer, cip);
        let want = answer
            .clone()
            .from(sock(vip, 53))
            .to(client(cip, cport))
            .with_ttl(answer.ttl - 1)
            .with_eth(es, ed);
        let what = format!("UDP answer from {b} (checksum 0: {zero})");
        expect(
            &mut lab,
            hook,
            &what,
            &answer.build(),
            hook.redirect(),
            &want.build(),
        );
        let f = lab.conn(&q.flow_key()).expect("UDP forward entry");
        assert_eq!(f.tcp_state, 0, "UDP entries keep tcp_state 0");
    }
}

// ---- 5. ICMP errors --------------------------------------------------------------------------

/// A router behind `back` says our SNATed packet was too big.
fn icmp_errors_about_snat_side_are_translated(hook: Hook) {
    let mut lab = lab(hook, "icmpb");
    let svc4 = tcp_v4_service(&mut lab);
    let svc6 = tcp_v6_service(&mut lab);
    for (svc, cip, vip, router) in [
        (
            &svc4,
            IpAddr::from(CLIENT_V4),
            IpAddr::from(VIP_V4),
            IpAddr::from(BACK_ROUTER_V4),
        ),
        (
            &svc6,
            CLIENT_V6.into(),
            VIP_V6.into(),
            BACK_ROUTER_V6.into(),
        ),
    ] {
        let syn = Pkt::tcp(client(cip, 36000), sock(vip, 80), TCP_SYN).with_ttl(50);
        let (backend, port) = new_flow(&mut lab, hook, svc, &syn);
        // What the router saw: the packet as we sent it (TTL already 49).
        let sent = forwarded(hook, &syn, svc, backend, port);
        // As the client sent it, but with the TTL it had when quoted.
        let orig = syn.clone().with_ttl(sent.ttl);
        let cut = ip_len(vip) + 8;
        // A full quote gets every inner checksum patched; a quote of the IP
        // header + 8 bytes ends before the inner TCP checksum, so only the
        // inner IPv4 header checksum and the ports change.
        for (label, quote, want_inner) in [
            ("full quote", sent.build_ip(), orig.build_ip()),
            (
                "IP header + 8 bytes",
                sent.build_ip()[..cut].to_vec(),
                orig.build_ip()[..cut].to_vec(),
            ),
        ] {
            let input = icmp_too_big(router, snat_addr_for(vip), &quote);
            let (es, ed) = hook.fwd_eth(&input, cip);
            let want = icmp_too_big(vip, cip, &want_inner)
                .with_ttl(input.ttl - 1)
                .with_eth(es, ed);
            let before = lab.reasons();
            let what = format!("ICMP too-big from {router} about flow to {backend}, {label}");
            expect(
                &mut lab,
                hook,
                &what,
                &input.build(),
                hook.redirect(),
                &want.build(),
            );
            expect_one_reason(
                &what,
                &before,
                &lab.reasons(),
                &[reason::FWD_ICMP, reason::FWD_REDIRECT],
            );
        }
    }
}

/// A router on the client side says our reply (VIP -> client) was too big.
fn icmp_errors_about_client_side_are_translated(hook: Hook) {
    let mut lab = lab(hook, "icmpf");
    let svc4 = tcp_v4_service(&mut lab);
    let svc6 = tcp_v6_service(&mut lab);
    for (svc, cip, vip, router) in [
        (
            &svc4,
            IpAddr::from(CLIENT_V4),
            IpAddr::from(VIP_V4),
            IpAddr::from(FRONT_ROUTER_V4),
        ),
        (
            &svc6,
            CLIENT_V6.into(),
            VIP_V6.into(),
            FRONT_ROUTER_V6.into(),
        ),
    ] {
        let syn = Pkt::tcp(client(cip, 36100), sock(vip, 80), TCP_SYN);
        let (backend, port) = new_flow(&mut lab, hook, svc, &syn);
        let b = svc.backend_sock(backend);
        // Our reply as it left towards the client, quoted in full.
        let reply = Pkt::tcp(sock(vip, 80), client(cip, 36100), TCP_SYN | TCP_ACK).with_ttl(63);
        // The same packet as the backend sent it.
        let orig = Pkt::tcp(b, sock(snat_addr_for(vip), port), TCP_SYN | TCP_ACK).with_ttl(63);
        let input = icmp_too_big(router, vip, &reply.build_ip());
        let (es, ed) = hook.fwd_eth(&input, b.ip());
        let want = icmp_too_big(snat_addr_for(vip), b.ip(), &orig.build_ip())
            .with_ttl(input.ttl - 1)
            .with_eth(es, ed);
        let what = format!("ICMP too-big from {router} about a reply to {cip}");
        expect(
            &mut lab,
            hook,
            &what,
            &input.build(),
            hook.redirect(),
            &want.build(),
        );
    }
}

fn ip_len(a: IpAddr) -> usize {
    if a.is_ipv4() {
        20
    } else {
        40
    }
}

/// Fragmentation needed (IPv4) or packet too big (IPv6), MTU 1400.
fn icmp_too_big(src: IpAddr, dst: IpAddr, quote: &[u8]) -> Pkt {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Pkt::frag_needed(s, d, 1400, quote),
        (IpAddr::V6(s), IpAddr::V6(d)) => Pkt::packet_too_big(s, d, 1400, quote),
        _ => unreachable!(),
    }
}

// ---- 6. not ours ----------------------------------------------------------------------------

/// `SERVICE_PORTS`, the data plane's first test, lists a port while some
/// service (any address) listens on it, and no longer: a service removed
/// leaves its port to the other service on it, and the last one takes it.
fn service_ports_follow_the_services(hook: Hook) {
    let mut lab = lab(hook, "ports");
    let v4 = tcp_v4_service(&mut lab);
    let v6 = tcp_v6_service(&mut lab);
    let listed = |lab: &PacketLab, proto, port| {
        lab.dp()
            .service_port_listed(proto, port)
            .expect("reading SERVICE_PORTS")
    };
    assert!(listed(&lab, PROTO_TCP, 80), "TCP 80 has two services");
    assert!(!listed(&lab, PROTO_UDP, 80), "no UDP service on port 80");
    assert!(!listed(&lab, PROTO_TCP, 81), "no service on TCP 81");

    lab.dp_mut()
        .remove_service(&v4.key)
        .expect("removing the IPv4 service");
    assert!(
        listed(&lab, PROTO_TCP, 80),
        "the IPv6 service still listens on TCP 80"
    );
    let syn6 = Pkt::tcp(client(CLIENT_V6, 37100), sock(VIP_V6, 80), TCP_SYN);
    new_flow(&mut lab, hook, &v6, &syn6);
    let syn4 = Pkt::tcp(client(CLIENT_V4, 37100), sock(VIP_V4, 80), TCP_SYN);
    expect_pass(
        &mut lab,
        hook,
        "the removed IPv4 service",
        &syn4.build(),
        reason::PASS_NO_SERVICE,
    );

    lab.dp_mut()
        .remove_service(&v6.key)
        .expect("removing the IPv6 service");
    assert!(!listed(&lab, PROTO_TCP, 80), "no service left on TCP 80");
    let syn6 = Pkt::tcp(client(CLIENT_V6, 37101), sock(VIP_V6, 80), TCP_SYN);
    expect_pass(
        &mut lab,
        hook,
        "the removed IPv6 service",
        &syn6.build(),
        reason::PASS_NO_SERVICE,
    );
}

fn unknown_service_passes_unchanged(hook: Hook) {
    let mut lab = lab(hook, "nosvc");
    let svc = tcp_v4_service(&mut lab);
    tcp_v6_service(&mut lab);
    let cases = [
        (
            "right VIP, wrong port",
            Pkt::tcp(client(CLIENT_V4, 37000), sock(VIP_V4, 81), TCP_SYN),
        ),
        (
            "wrong VIP, right port",
            Pkt::tcp(client(CLIENT_V4, 37000), sock([10, 0, 0, 200], 80), TCP_SYN),
        ),
        (
            "right VIP and port, UDP",
            Pkt::udp(client(CLIENT_V4, 37000), sock(VIP_V4, 80), b"x"),
        ),
        (
            "IPv6 VIP, wrong port",
            Pkt::tcp(client(CLIENT_V6, 37000), sock(VIP_V6, 443), TCP_SYN),
        ),
        ("IPv4 VIP bytes in an IPv6 address", {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&VIP_V4.octets());
            Pkt::tcp(
                client(CLIENT_V6, 37000),
                sock(std::net::Ipv6Addr::from(a), 80),
                TCP_SYN,
            )
        }),
        (
            "SNAT address, port outside the SNAT range",
            Pkt::tcp(sock(backend_v4(11), 8080), sock(SNAT_V4, 22), TCP_SYN),
        ),
    ];
    for (what, p) in cases {
        expect_pass(&mut lab, hook, what, &p.build(), reason::PASS_NO_SERVICE);
    }
    for (what, p) in [
        (
            "SYN-ACK to a SNAT port without a connection",
            Pkt::tcp(svc.backend_sock(1), sock(SNAT_V4, 40500), TCP_SYN | TCP_ACK),
        ),
        (
            "data to a SNAT port without a connection (a lost flow's)",
            Pkt::tcp(svc.backend_sock(1), sock(SNAT_V4, 40501), TCP_ACK | TCP_PSH),
        ),
        (
            "UDP to a SNAT port without a connection",
            Pkt::udp(svc.backend_sock(1), sock(SNAT_V4, 40502), b"x"),
        ),
    ] {
        expect_drop(
            &mut lab,
            hook,
            what,
            None,
            &p.build(),
            reason::DROP_REPLY_NO_CONN,
        );
    }
    assert_eq!(
        lab.entries(),
        (0, 0),
        "passing and dropped packets create no state:\n{}",
        lab.dump_conns()
    );
}

fn wildcard_service(hook: Hook) {
    let mut lab = lab(hook, "wild");
    let exact = tcp_v4_service(&mut lab);
    let wild = lab.add_service(
        sock(std::net::Ipv4Addr::UNSPECIFIED, 8443),
        PROTO_TCP,
        44000..=44999,
        &backends_v4(&[17, 18], 443),
    );
    // Any address on the wildcard's port, including the exact service's VIP.
    for dst in [VIP_V4, std::net::Ipv4Addr::new(10, 0, 0, 77)] {
        let syn = Pkt::tcp(client(CLIENT_V4, 38000), sock(dst, 8443), TCP_SYN);
        let (backend, port) = new_flow(&mut lab, hook, &wild, &syn);
        // The reply goes back from the address the client used.
        let b = wild.backend_sock(backend);
        let synack = Pkt::tcp(b, sock(SNAT_V4, port), TCP_SYN | TCP_ACK);
        let (es, ed) = hook.fwd_eth(&synack, CLIENT_V4.into());
        let want = synack
            .clone()
            .from(sock(dst, 8443))
            .to(client(CLIENT_V4, 38000))
            .with_ttl(63)
            .with_eth(es, ed);
        expect(
            &mut lab,
            hook,
            "reply through the wildcard",
            &synack.build(),
            hook.redirect(),
            &want.build(),
        );
    }
    // The exact service still wins on its own port.
    let syn = Pkt::tcp(client(CLIENT_V4, 38001), sock(VIP_V4, 80), TCP_SYN);
    new_flow(&mut lab, hook, &exact, &syn);
    assert_eq!(lab.service_counters(wild.id()).new_flows, 2);
    assert_eq!(lab.service_counters(exact.id()).new_flows, 1);
}

// ---- 7. truncation and unparsed headers -----------------------------------------------------

fn truncated_frames_pass_unchanged(hook: Hook) {
    let mut lab = lab(hook, "trunc");
    let svc4 = tcp_v4_service(&mut lab);
    let svc6 = tcp_v6_service(&mut lab);
    lab.add_service(
        sock(VIP_V4, 53),
        PROTO_UDP,
        42000..=42999,
        &backends_v4(&[15], 53),
    );
    lab.add_service(
        sock(VIP_V6, 53),
        PROTO_UDP,
        43000..=43999,
        &backends_v6(&[15], 53),
    );

    // An established flow, so the ICMP errors below quote a NATed packet.
    let syn = Pkt::tcp(client(CLIENT_V4, 39000), sock(VIP_V4, 80), TCP_SYN);
    let (backend, port) = new_flow(&mut lab, hook, &svc4, &syn);
    let sent = forwarded(hook, &syn, &svc4, backend, port).build_ip();
    let syn6 = Pkt::tcp(client(CLIENT_V6, 39000), sock(VIP_V6, 80), TCP_SYN);
    let (b6, p6) = new_flow(&mut lab, hook, &svc6, &syn6);
    let sent6 = forwarded(hook, &syn6, &svc6, b6, p6).build_ip();

    let frames = [
        (
            "TCP/IPv4 SYN",
            Pkt::tcp(client(CLIENT_V4, 39001), sock(VIP_V4, 80), TCP_SYN).build(),
        ),
        (
            "TCP/IPv6 SYN",
            Pkt::tcp(client(CLIENT_V6, 39001), sock(VIP_V6, 80), TCP_SYN).build(),
        ),
        (
            "UDP/IPv4",
            Pkt::udp(client(CLIENT_V4, 39001), sock(VIP_V4, 53), b"").build(),
        ),
        (
            "UDP/IPv6",
            Pkt::udp(client(CLIENT_V6, 39001), sock(VIP_V6, 53), b"").build(),
        ),
        // Quotes of exactly IP header + 8 bytes: every cut loses a needed byte.
        (
            "ICMP frag needed",
            Pkt::frag_needed(BACK_ROUTER_V4, SNAT_V4, 1400, &sent[..28]).build(),
        ),
        (
            "ICMPv6 too big",
            Pkt::packet_too_big(BACK_ROUTER_V6, SNAT_V6, 1400, &sent6[..48]).build(),
        ),
        // Not an error: only the 8-byte ICMP header is needed.
        (
            "ICMP echo request",
            Pkt::icmp(CLIENT_V4.into(), VIP_V4.into(), 8, 0, [0, 1, 0, 1], b"").build(),
        ),
    ];
    let mut failures = Vec::new();
    for (what, full) in frames {
        let mut ran = 0u64;
        let mut wrong = Vec::new();
        let first = lab.reasons();
        for len in 0..full.len() {
            let cut = &full[..len];
            let before = lab.reasons();
            let (action, out) = match lab.try_run(hook, cut) {
                Ok(r) => r,
                Err(e) => {
                    assert!(
                        hook.kernel_may_refuse(cut),
                        "{what}: BPF_PROG_TEST_RUN refused a {len}-byte frame: {e}"
                    );
                    continue;
                }
            };
            let after = lab.reasons();
            ran += 1;
            let counted = after[reason::PASS_TRUNCATED as usize]
                == before[reason::PASS_TRUNCATED as usize] + 1
                && after.iter().sum::<u64>() == before.iter().sum::<u64>() + 1;
            if action != hook.pass() || out != cut || !counted {
                wrong.push(format!(
                    "    {len} bytes: {}, {}, counted as {}",
                    hook.action_name(action),
                    if out == cut { "unchanged" } else { "rewritten" },
                    reason_delta(&before, &after)
                ));
            }
        }
        let last = lab.reasons();
        let total = last.iter().sum::<u64>() - first.iter().sum::<u64>();
        if !wrong.is_empty() || total != ran {
            failures.push(format!(
                "{what} ({} bytes; {ran} cuts run, {total} counted): cuts not passed unchanged \
                 as pass_truncated:\n{}",
                full.len(),
                wrong.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "truncated frames ({hook:?}), expected {} unchanged under pass_truncated:\n{}",
        hook.action_name(hook.pass()),
        failures.join("\n")
    );
    // The untruncated ICMP errors are translated (the quotes are complete).
    let full = Pkt::frag_needed(BACK_ROUTER_V4, SNAT_V4, 1400, &sent[..28]).build();
    let (action, _) = lab.run(hook, &full);
    assert_eq!(
        action,
        hook.redirect(),
        "the complete ICMP error is translated"
    );
}

fn unparsed_packets_pass_with_their_reason(hook: Hook) {
    let mut lab = lab(hook, "unparsed");
    tcp_v4_service(&mut lab);
    tcp_v6_service(&mut lab);
    let syn4 = Pkt::tcp(client(CLIENT_V4, 39500), sock(VIP_V4, 80), TCP_SYN).build();
    let syn6 = Pkt::tcp(client(CLIENT_V6, 39500), sock(VIP_V6, 80), TCP_SYN).build();

    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("ARP", arp_frame(), reason::PASS_NOT_IP),
        ("VLAN-tagged IPv4", vlan_tag(&syn4), reason::PASS_NOT_IP),
        (
            "IPv4 with options (IHL 6)",
            ipv4_with_options(&syn4),
            reason::PASS_IP_OPTIONS,
        ),
        (
            "IPv4 IHL 4",
            patch_ipv4(&syn4, |ip| ip[0] = 0x44),
            reason::PASS_BAD_HEADER,
        ),
        (
            "IPv4 version 5 under the IPv4 ethertype",
            patch_ipv4(&syn4, |ip| ip[0] = 0x55),
            reason::PASS_BAD_HEADER,
        ),
        (
            "IPv6 version 4 under the IPv6 ethertype",
            {
                let mut f = syn6.clone();
                f[ETH_LEN] = 0x40;
                f
            },
            reason::PASS_BAD_HEADER,
        ),
        (
            "TCP data offset 4",
            tcp_data_offset(&syn4, 4),
            reason::PASS_BAD_HEADER,
        ),
        (
            "IPv6 with hop-by-hop options",
            ipv6_with_hbh(&syn6),
            reason::PASS_IPV6_EXT,
        ),
        (
            "IPv4 first fragment (MF)",
            patch_ipv4(&syn4, |ip| ip[6] |= 0x20),
            reason::PASS_FRAGMENT,
        ),
        (
            "IPv4 later fragment (offset 185)",
            patch_ipv4(&syn4, |ip| {
                ip[6] = 0;
                ip[7] = 185
            }),
            reason::PASS_FRAGMENT,
        ),
        (
            "GRE",
            patch_ipv4(&syn4, |ip| ip[9] = 47),
            reason::PASS_OTHER_PROTO,
        ),
        (
            "ICMP echo request to the VIP",
            Pkt::icmp(CLIENT_V4.into(), VIP_V4.into(), 8, 0, [0, 1, 0, 1], b"ping").build(),
            reason::PASS_OTHER_PROTO,
        ),
        (
            "ICMPv6 echo request to the VIP",
            Pkt::icmp(
                CLIENT_V6.into(),
                VIP_V6.into(),
                128,
                0,
                [0, 1, 0, 1],
                b"ping",
            )
            .build(),
            reason::PASS_OTHER_PROTO,
        ),
        (
            "ICMP time exceeded",
            Pkt::icmp(
                BACK_ROUTER_V4.into(),
                SNAT_V4.into(),
                11,
                0,
                [0; 4],
                &syn4[ETH_LEN..],
            )
            .build(),
            reason::PASS_OTHER_PROTO,
        ),
        (
            "ICMP unreachable about no flow",
            Pkt::frag_needed(BACK_ROUTER_V4, SNAT_V4, 1400, &syn4[ETH_LEN..]).build(),
            reason::PASS_ICMP_NO_FLOW,
        ),
        (
            "ICMPv6 too big about no flow",
            Pkt::packet_too_big(BACK_ROUTER_V6, SNAT_V6, 1400, &syn6[ETH_LEN..]).build(),
            reason::PASS_ICMP_NO_FLOW,
        ),
        (
            "TTL 1",
            Pkt::tcp(client(CLIENT_V4, 39501), sock(VIP_V4, 80), TCP_SYN)
                .with_ttl(1)
                .build(),
            reason::PASS_TTL_EXPIRED,
        ),
        (
            "hop limit 1",
            Pkt::tcp(client(CLIENT_V6, 39501), sock(VIP_V6, 80), TCP_SYN)
                .with_ttl(1)
                .build(),
            reason::PASS_TTL_EXPIRED,
        ),
        (
            "TTL 0",
            Pkt::tcp(client(CLIENT_V4, 39502), sock(VIP_V4, 80), TCP_SYN)
                .with_ttl(0)
                .build(),
            reason::PASS_TTL_EXPIRED,
        ),
    ];
    let total_before: u64 = lab.reasons().iter().sum();
    let n = cases.len() as u64;
    for (what, frame, why) in cases {
        expect_pass(&mut lab, hook, what, &frame, why);
    }
    let total_after: u64 = lab.reasons().iter().sum();
    assert_eq!(
        total_after - total_before,
        n,
        "every packet is counted under exactly one reason"
    );
}

fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT_V4.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&VIP_V4.octets());
    f
}

fn vlan_tag(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    f.extend_from_slice(&frame[12..]);
    f
}

fn ipv4_header_checksum(ip: &mut [u8]) {
    let ihl = (ip[0] & 0x0f).max(5) as usize * 4;
    ip[10] = 0;
    ip[11] = 0;
    let c = lb_common_free_checksum(&ip[..ihl.min(ip.len())]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// RFC 1071 checksum, written here so the tests do not trust lb-common's.
fn lb_common_free_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Edits the IPv4 header and fixes its checksum.
fn patch_ipv4(frame: &[u8], f: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut out = frame.to_vec();
    f(&mut out[ETH_LEN..]);
    ipv4_header_checksum(&mut out[ETH_LEN..]);
    out
}

fn ipv4_with_options(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..ETH_LEN + 20].to_vec();
    out.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
    out.extend_from_slice(&frame[ETH_LEN + 20..]);
    let ip = &mut out[ETH_LEN..];
    ip[0] = 0x46;
    let total = u16::from_be_bytes([ip[2], ip[3]]) + 4;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ipv4_header_checksum(ip);
    out
}

fn ipv6_with_hbh(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..ETH_LEN + 40].to_vec();
    let next = out[ETH_LEN + 6];
    // Hop-by-hop: next header, length 0 (8 bytes), PadN of 4 bytes.
    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&frame[ETH_LEN + 40..]);
    out[ETH_LEN + 6] = 0;
    let plen = u16::from_be_bytes([out[ETH_LEN + 4], out[ETH_LEN + 5]]) + 8;
    out[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&plen.to_be_bytes());
    out
}

fn tcp_data_offset(frame: &[u8], doff: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    let at = ETH_LEN + 20 + 12;
    out[at] = (doff << 4) | (out[at] & 0x0f);
    out
}

// ---- 8. draining and down backends ------------------------------------------------------------

/// A source port whose new flow lands on a slot holding `backend`.
fn port_landing_on(svc: &Svc, cip: IpAddr, vip: SocketAddr, backend: u32, skip: &[u16]) -> u16 {
    (20000..60000u16)
        .find(|&p| {
            !skip.contains(&p)
                && svc.slot_backend(&flow_key(client(cip, p), vip, svc.proto)) == backend
        })
        .expect("some source port hashes to every backend")
}

fn draining_keeps_flows_and_down_repicks(hook: Hook) {
    let mut lab = lab(hook, "drain");
    let svc = tcp_v4_service(&mut lab);
    let vip = sock(VIP_V4, 80);
    let b = svc.backends[1].0;
    let p1 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[]);
    let syn = Pkt::tcp(client(CLIENT_V4, p1), vip, TCP_SYN);
    let (got, port) = new_flow(&mut lab, hook, &svc, &syn);
    assert_eq!(got, b);

    lab.set_backend_state(b, BACKEND_DRAINING);
    let ack = syn.clone().with_flags(TCP_ACK);
    let want = forwarded(hook, &ack, &svc, b, port).build();
    expect(
        &mut lab,
        hook,
        "established flow to a draining backend",
        &ack.build(),
        hook.redirect(),
        &want,
    );

    // A new flow whose slot points at the draining backend probes onwards.
    let p2 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[p1]);
    let next = expect_next_slot(
        &mut lab,
        hook,
        &svc,
        &Pkt::tcp(client(CLIENT_V4, p2), vip, TCP_SYN),
        "new flow on a draining backend's slot",
    );
    assert_ne!(next, b);

    // Down: the established flow is re-picked like a new flow.
    lab.set_backend_state(b, BACKEND_DOWN);
    let key = syn.flow_key();
    let repick = svc.tables[0][(svc.slot(&key) + 1) % MAGLEV_SIZE as usize];
    let want = forwarded(hook, &ack, &svc, repick, svc.first_snat_port(&key)).build();
    expect(
        &mut lab,
        hook,
        "established flow to a down backend",
        &ack.build(),
        hook.redirect(),
        &want,
    );
    let f = lab
        .conn(&key)
        .expect("the forward entry survives a re-pick");
    assert_eq!(
        f.backend,
        repick,
        "CONNS must point at the new backend:\n{}",
        lab.dump_conns()
    );
    let rkey = reverse_key(&svc, &syn, repick, svc.first_snat_port(&key));
    expect_conn(
        &lab,
        "reverse entry after the re-pick (an ACK: not a SYN-started flow)",
        &rkey,
        Conn {
            flags: CONN_F_REVERSE | CONN_F_UNANSWERED,
            ..reverse_conn(&lab, &svc, &syn, repick)
        },
    );

    // Active again: new flows on its slots reach it again.
    lab.set_backend_state(b, BACKEND_ACTIVE);
    let p3 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[p1, p2]);
    let (got, _) = new_flow(
        &mut lab,
        hook,
        &svc,
        &Pkt::tcp(client(CLIENT_V4, p3), vip, TCP_SYN),
    );
    assert_eq!(got, b);
}

/// Sends `pkt`, whose own Maglev slot holds a backend that must be passed
/// over, and expects it forwarded to the backend of the next slot, from the
/// first SNAT port of its hash. Returns that backend.
fn expect_next_slot(lab: &mut PacketLab, hook: Hook, svc: &Svc, pkt: &Pkt, what: &str) -> u32 {
    let key = pkt.flow_key();
    let next = svc.tables[0][(svc.slot(&key) + 1) % MAGLEV_SIZE as usize];
    let want = forwarded(hook, pkt, svc, next, svc.first_snat_port(&key)).build();
    expect(lab, hook, what, &pkt.build(), hook.redirect(), &want);
    next
}

/// A SYN without ACK always starts a connection. On the entry of a flow whose
/// backend is draining it is balanced afresh (draining takes no new
/// connections; the ACKs of that flow stay, see the test above), and a
/// backend's RST closes the forward entry too, so a client reusing the port
/// of a refused connection is balanced afresh.
fn fresh_syns_leave_draining_and_refused_flows(hook: Hook) {
    let mut lab = lab(hook, "freshsyn");
    let svc = tcp_v4_service(&mut lab);
    let vip = sock(VIP_V4, 80);
    let b = svc.backends[2].0;

    let p1 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[]);
    let syn = Pkt::tcp(client(CLIENT_V4, p1), vip, TCP_SYN);
    assert_eq!(new_flow(&mut lab, hook, &svc, &syn).0, b);
    lab.set_backend_state(b, BACKEND_DRAINING);
    let next = expect_next_slot(
        &mut lab,
        hook,
        &svc,
        &syn,
        "a SYN on the 5-tuple of a flow to a draining backend",
    );
    assert_ne!(next, b);
    assert_eq!(lab.conn(&syn.flow_key()).map(|c| c.backend), Some(next));
    lab.set_backend_state(b, BACKEND_ACTIVE);

    // Refused: the backend answers the SYN with RST|ACK.
    let p2 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[p1]);
    let syn = Pkt::tcp(client(CLIENT_V4, p2), vip, TCP_SYN);
    let key = syn.flow_key();
    let (got, port) = new_flow(&mut lab, hook, &svc, &syn);
    assert_eq!(got, b);
    assert_eq!(lab.conn(&key).map(|c| c.tcp_state), Some(TCP_STATE_OPEN));
    let rst = Pkt::tcp(
        svc.backend_sock(b),
        sock(snat_addr_for(VIP_V4.into()), port),
        TCP_RST | TCP_ACK,
    );
    let (es, ed) = hook.fwd_eth(&rst, CLIENT_V4.into());
    let want = rst
        .clone()
        .from(vip)
        .to(client(CLIENT_V4, p2))
        .with_ttl(rst.ttl - 1)
        .with_eth(es, ed);
    expect(
        &mut lab,
        hook,
        "the backend's RST to the SYN",
        &rst.build(),
        hook.redirect(),
        &want.build(),
    );
    assert_eq!(
        lab.conn(&key),
        None,
        "the backend's RST to an unanswered flow must free both entries:\n{}",
        lab.dump_conns()
    );
    assert_ne!(
        lab.dp().refused_at(b).unwrap(),
        0,
        "a RST before any other reply is a refusal"
    );
    // The client's next SYN on that port goes elsewhere, and so does a new
    // flow that lands on the refusing backend's slot.
    expect_next_slot(
        &mut lab,
        hook,
        &svc,
        &syn,
        "a SYN reusing the port of a refused connection",
    );
    let p3 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[p1, p2]);
    let next = expect_next_slot(
        &mut lab,
        hook,
        &svc,
        &Pkt::tcp(client(CLIENT_V4, p3), vip, TCP_SYN),
        "a new flow on the slot of a backend that just refused one",
    );
    assert_ne!(next, b);

    // A RST after the backend's SYN-ACK ends a connection; it is no refusal.
    let c = svc.backends[3].0;
    let p4 = port_landing_on(&svc, CLIENT_V4.into(), vip, c, &[p1, p2, p3]);
    let syn4 = Pkt::tcp(client(CLIENT_V4, p4), vip, TCP_SYN);
    let (got, port) = new_flow(&mut lab, hook, &svc, &syn4);
    assert_eq!(got, c);
    let from_c = sock(snat_addr_for(VIP_V4.into()), port);
    for flags in [TCP_SYN | TCP_ACK, TCP_RST | TCP_ACK] {
        let (action, _) = lab.run(hook, &Pkt::tcp(svc.backend_sock(c), from_c, flags).build());
        assert_eq!(action, hook.redirect());
    }
    assert_eq!(lab.dp().refused_at(c).unwrap(), 0);
}

// ---- 9. SNAT exhaustion -------------------------------------------------------------------------

/// SNAT exhaustion and the flood guard going on and off reach the data
/// plane's log (aya-log), one line each however many packets they hit.
fn rare_drops_and_the_flood_guard_reach_the_log_once(hook: Hook) {
    let mut lab = lab(hook, "ratelog");
    lab.stay_on_one_cpu();
    let vip = sock(std::net::Ipv4Addr::new(10, 0, 0, 101), 80);
    let svc = lab.add_service(vip, PROTO_TCP, 45000..=45001, &backends_v4(&[19], 80));
    for cport in [46001u16, 46002] {
        let (action, _) = lab.run(
            hook,
            &Pkt::tcp(client(CLIENT_V4, cport), vip, TCP_SYN).build(),
        );
        assert_eq!(action, hook.redirect(), "flow from port {cport}");
    }
    assert_eq!(lab.log_lines(), Vec::<String>::new(), "nothing rare yet");
    let before = lab.reasons();
    for cport in 46003u16..46053 {
        let (action, _) = lab.run(
            hook,
            &Pkt::tcp(client(CLIENT_V4, cport), vip, TCP_SYN).build(),
        );
        assert_eq!(action, hook.drop_(), "flow from port {cport}");
    }
    let after = lab.reasons();
    let dropped =
        after[reason::DROP_SNAT_EXHAUSTED as usize] - before[reason::DROP_SNAT_EXHAUSTED as usize];
    assert_eq!(dropped, 50);
    let lines = lab.log_lines();
    let backend = svc.backend_sock(svc.backends[0].0);
    assert_eq!(lines.len(), 1, "50 exhausted drops, one line: {lines:#?}");
    assert!(
        lines[0].starts_with("WARN SNAT ports exhausted: a packet to 10.0.0.101:80 (rewritten to ")
            && lines[0].contains(&format!(
                "(rewritten to {backend}) was dropped (drop_snat_exhausted; 0 more on cpu "
            ))
            && lines[0].ends_with(" since the last line)"),
        "{lines:#?}"
    );

    // The flood guard: one line when it goes on, one when a new flow finds
    // it off again (at most two one-second windows after the flood).
    let other = tcp_v4_service(&mut lab);
    lab.set_config(|c| c.flood_new_flows_per_cpu = 3);
    let flows = |lab: &mut PacketLab, ports: std::ops::Range<u16>| {
        for p in ports {
            let syn = Pkt::tcp(client(CLIENT_V4, p), sock(VIP_V4, 80), TCP_SYN);
            let (action, _) = lab.run(hook, &syn.build());
            assert_eq!(action, hook.redirect(), "SYN from port {p}");
        }
    };
    flows(&mut lab, 47000..47003);
    // Over the limit: the guard goes on; the SYN challenge drops these.
    for p in 47003..47020 {
        let syn = Pkt::tcp(client(CLIENT_V4, p), sock(VIP_V4, 80), TCP_SYN);
        let (action, _) = lab.run(hook, &syn.build());
        assert_eq!(action, hook.drop_(), "SYN from port {p}");
    }
    let lines = lab.log_lines();
    assert_eq!(
        lines.len(),
        1,
        "20 new flows over a limit of 3, one line: {lines:#?}"
    );
    assert!(
        lines[0].starts_with("WARN flood guard on on cpu ")
            && lines[0].contains("(limit 3 new flows per second): segments that match no flow"),
        "{lines:#?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    flows(&mut lab, 47020..47021);
    let lines = lab.log_lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("WARN flood guard off on cpu ")
            && lines[0]
                .ends_with("(limit 3 new flows per second): new flows are handled as usual again"),
        "{lines:#?}"
    );
    let _ = other;
}

fn snat_exhaustion_drops(hook: Hook) {
    let mut lab = lab(hook, "snat");
    let vip = sock(std::net::Ipv4Addr::new(10, 0, 0, 101), 80);
    let svc = lab.add_service(vip, PROTO_TCP, 45000..=45001, &backends_v4(&[19], 80));
    let backend = svc.backends[0].0;
    let mut used = Vec::new();
    for cport in [46001u16, 46002] {
        let syn = Pkt::tcp(client(CLIENT_V4, cport), vip, TCP_SYN);
        let key = syn.flow_key();
        let first = svc.first_snat_port(&key);
        // The first free port from the hashed one, wrapping in the range.
        let port = if used.contains(&first) {
            (90001 - u32::from(first)) as u16
        } else {
            first
        };
        let want = forwarded(hook, &syn, &svc, backend, port).build();
        expect(
            &mut lab,
            hook,
            &format!("flow {} of 2", used.len() + 1),
            &syn.build(),
            hook.redirect(),
            &want,
        );
        used.push(port);
    }
    used.sort();
    assert_eq!(used, vec![45000, 45001]);

    let syn = Pkt::tcp(client(CLIENT_V4, 46003), vip, TCP_SYN);
    let frame = syn.build();
    let before = lab.reasons();
    let (action, out) = lab.run(hook, &frame);
    assert!(
        action == hook.drop_() && out == frame,
        "third flow on a 2-port range: expected {} (unchanged), saw {}\n{}",
        hook.action_name(hook.drop_()),
        hook.action_name(action),
        diff(&out, &frame)
    );
    expect_one_reason(
        "third flow",
        &before,
        &lab.reasons(),
        &[reason::DROP_SNAT_EXHAUSTED],
    );
    assert!(
        lab.conn(&syn.flow_key()).is_none(),
        "a dropped flow leaves no entry:\n{}",
        lab.dump_conns()
    );
    assert_eq!(
        lab.entries(),
        (0, 4),
        "two flows, four entries:\n{}",
        lab.dump_conns()
    );
    assert_eq!(lab.service_counters(svc.id()).new_flows, 2);
}

// ---- 10. unanswered and established flows, the flood guard, forged input --------------------

/// The backend's SYN-ACK to `syn`'s flow (ISN 5000).
fn synack_for(svc: &Svc, syn: &Pkt, backend: u32, port: u16) -> Pkt {
    Pkt::tcp(
        svc.backend_sock(backend),
        sock(snat_addr_for(syn.dst), port),
        TCP_SYN | TCP_ACK,
    )
    .with_seq_ack(5000, 1001)
}

/// The client's ACK of [`synack_for`].
fn ack_of_synack(syn: &Pkt) -> Pkt {
    syn.clone().with_flags(TCP_ACK).with_seq_ack(1001, 5001)
}

/// Runs `p` and checks the hook sent it on (its bytes are checked elsewhere).
#[track_caller]
fn sent_on(lab: &mut PacketLab, hook: Hook, what: &str, p: &Pkt) {
    let before = lab.reasons();
    let (action, _) = lab.run(hook, &p.build());
    assert_eq!(
        action,
        hook.redirect(),
        "{what} ({hook:?}): expected {}, saw {} ({})\n{}",
        hook.action_name(hook.redirect()),
        hook.action_name(action),
        reason_delta(&before, &lab.reasons()),
        lab.dump_conns()
    );
}

/// A TCP handshake through the balancer: the client's SYN, the backend's
/// SYN-ACK, the client's ACK. Returns (backend, SNAT port).
fn handshake(lab: &mut PacketLab, hook: Hook, svc: &Svc, syn: &Pkt) -> (u32, u16) {
    let (backend, port) = new_flow(lab, hook, svc, syn);
    sent_on(lab, hook, "SYN-ACK", &synack_for(svc, syn, backend, port));
    sent_on(lab, hook, "the ACK of the SYN-ACK", &ack_of_synack(syn));
    (backend, port)
}

/// A service with a single SNAT port and a single backend (10.1.0.19:80).
fn one_port_service(lab: &mut PacketLab) -> Svc {
    let vip = sock(std::net::Ipv4Addr::new(10, 0, 0, 101), 80);
    lab.add_service(vip, PROTO_TCP, 45000..=45000, &backends_v4(&[19], 80))
}

fn tcp_flows_are_established_by_the_backends_answer(hook: Hook) {
    let mut lab = lab(hook, "estab");
    let svc = tcp_v4_service(&mut lab);
    let syn = Pkt::tcp(client(CLIENT_V4, 42000), sock(VIP_V4, 80), TCP_SYN);
    let key = syn.flow_key();
    let (backend, port) = new_flow(&mut lab, hook, &svc, &syn);
    let rkey = reverse_key(&svc, &syn, backend, port);
    assert_eq!(lab.entries(), (0, 2), "{}", lab.dump_conns());

    // The SYN-ACK is recorded; the flow is still not established.
    sent_on(
        &mut lab,
        hook,
        "SYN-ACK",
        &synack_for(&svc, &syn, backend, port),
    );
    let rev = lab.conn(&rkey).expect("reverse entry");
    let answered = CONN_F_REVERSE | CONN_F_UNANSWERED | CONN_F_SYN | CONN_F_REPLIED | CONN_F_SYNACK;
    assert_eq!(
        (rev.flags, rev.seq),
        (answered, 5000),
        "{}",
        lab.dump_conns()
    );
    assert_eq!(lab.entries(), (0, 2));

    // An ACK that acknowledges something else (what a spoofer sends blind)
    // establishes nothing.
    sent_on(
        &mut lab,
        hook,
        "a guessed ACK",
        &syn.clone().with_flags(TCP_ACK),
    );
    assert_eq!(lab.entries(), (0, 2), "{}", lab.dump_conns());

    // The ACK of the SYN-ACK does: both entries move to CONNS.
    let before = lab.events();
    sent_on(
        &mut lab,
        hook,
        "the ACK of the SYN-ACK",
        &ack_of_synack(&syn),
    );
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("established", 1)],
        "{}",
        lab.dump_conns()
    );
    assert_eq!(lab.entries(), (2, 0), "{}", lab.dump_conns());
    expect_conn(
        &lab,
        "established forward entry",
        &key,
        Conn {
            flags: CONN_F_SYN,
            ..forward_conn(&svc, &syn, backend, port)
        },
    );
    expect_conn(
        &lab,
        "established reverse entry",
        &rkey,
        Conn {
            flags: CONN_F_REVERSE | CONN_F_SYN | CONN_F_REPLIED | CONN_F_SYNACK,
            seq: 5000,
            ..reverse_conn(&lab, &svc, &syn, backend)
        },
    );

    // Established flows outlive the unanswered timeout.
    lab.set_config(|c| c.unanswered_timeout_ns = 1_000_000);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let data = syn.clone().with_flags(TCP_ACK | TCP_PSH);
    let want = forwarded(hook, &data, &svc, backend, port).build();
    expect(
        &mut lab,
        hook,
        "established flow after the unanswered timeout",
        &data.build(),
        hook.redirect(),
        &want,
    );

    // The backend's first segment without SYN establishes a flow too (the
    // client's ACK may come later, or not through us).
    lab.set_config(|c| c.unanswered_timeout_ns = lb_common::DEFAULT_UNANSWERED_TIMEOUT_NS);
    let syn2 = Pkt::tcp(client(CLIENT_V4, 42001), sock(VIP_V4, 80), TCP_SYN);
    let (b2, p2) = new_flow(&mut lab, hook, &svc, &syn2);
    sent_on(
        &mut lab,
        hook,
        "SYN-ACK 2",
        &synack_for(&svc, &syn2, b2, p2),
    );
    let from_backend = Pkt::tcp(svc.backend_sock(b2), sock(SNAT_V4, p2), TCP_ACK | TCP_PSH);
    sent_on(&mut lab, hook, "the backend's data", &from_backend);
    assert_eq!(lab.entries(), (4, 0), "{}", lab.dump_conns());
}

fn udp_flows_are_established_when_the_client_speaks_again(hook: Hook) {
    let mut lab = lab(hook, "udpest");
    let svc = lab.add_service(
        sock(VIP_V4, 53),
        PROTO_UDP,
        42000..=42999,
        &backends_v4(&[15, 16], 53),
    );
    let q = Pkt::udp(client(CLIENT_V4, 43000), sock(VIP_V4, 53), b"query");
    let (backend, port) = new_flow(&mut lab, hook, &svc, &q);
    // Unanswered: a second query establishes nothing.
    sent_on(&mut lab, hook, "a second unanswered query", &q);
    assert_eq!(lab.entries(), (0, 2), "{}", lab.dump_conns());
    let answer = Pkt::udp(svc.backend_sock(backend), sock(SNAT_V4, port), b"answer");
    sent_on(&mut lab, hook, "the answer", &answer);
    assert_eq!(
        lab.entries(),
        (0, 2),
        "a one-shot exchange stays unanswered (and goes soon):\n{}",
        lab.dump_conns()
    );
    let before = lab.events();
    let want = forwarded(hook, &q, &svc, backend, port).build();
    expect(
        &mut lab,
        hook,
        "the client speaks again",
        &q.build(),
        hook.redirect(),
        &want,
    );
    assert_eq!(event_delta(&before, &lab.events()), [("established", 1)]);
    assert_eq!(lab.entries(), (2, 0), "{}", lab.dump_conns());
}

fn unanswered_flows_expire_and_free_their_port(hook: Hook) {
    let mut lab = lab(hook, "unexp");
    let svc = one_port_service(&mut lab);
    lab.set_config(|c| c.unanswered_timeout_ns = 200_000_000);
    let a = Pkt::tcp(client(CLIENT_V4, 44000), svc.vip, TCP_SYN);
    let b = Pkt::tcp(client(CLIENT_V4, 44001), svc.vip, TCP_SYN);
    let c = Pkt::tcp(client(CLIENT_V4, 44002), svc.vip, TCP_SYN);
    new_flow(&mut lab, hook, &svc, &a);
    expect_drop(
        &mut lab,
        hook,
        "a second flow while the only port is held",
        None,
        &b.build(),
        reason::DROP_SNAT_EXHAUSTED,
    );
    std::thread::sleep(std::time::Duration::from_millis(250));
    let before = lab.events();
    let (_, port) = new_flow(&mut lab, hook, &svc, &b);
    assert_eq!(port, 45000);
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("unanswered_expired", 1)],
        "the second flow takes the port of the expired one"
    );
    // The expired flow's client comes back: its old entry is gone, and the
    // port now belongs to the other flow, whose entries stay.
    let rkey_b = reverse_key(&svc, &b, svc.backends[0].0, 45000);
    let held = lab.conn(&rkey_b).expect("b's reverse entry");
    expect_drop(
        &mut lab,
        hook,
        "the expired flow's next segment (the only port is b's)",
        None,
        &a.clone().with_flags(TCP_ACK).build(),
        reason::DROP_SNAT_EXHAUSTED,
    );
    assert_eq!(lab.conn(&a.flow_key()), None, "{}", lab.dump_conns());
    assert_eq!(
        lab.conn(&rkey_b).map(|c| c.new_dport_be),
        Some(held.new_dport_be)
    );

    // An established flow keeps its port past the unanswered timeout.
    let backend = svc.backends[0].0;
    sent_on(
        &mut lab,
        hook,
        "SYN-ACK",
        &synack_for(&svc, &b, backend, 45000),
    );
    sent_on(&mut lab, hook, "ACK", &ack_of_synack(&b));
    assert_eq!(lab.entries(), (2, 0), "{}", lab.dump_conns());
    std::thread::sleep(std::time::Duration::from_millis(250));
    expect_drop(
        &mut lab,
        hook,
        "a new flow while an established one holds the only port",
        None,
        &c.build(),
        reason::DROP_SNAT_EXHAUSTED,
    );
}

fn a_rst_frees_the_port(hook: Hook) {
    let mut lab = lab(hook, "rstfree");
    let svc = one_port_service(&mut lab);
    let backend = svc.backends[0].0;
    let flow = |p| Pkt::tcp(client(CLIENT_V4, p), svc.vip, TCP_SYN);

    // The backend refuses: the RST goes to the client, the port is free.
    let a = flow(44100);
    new_flow(&mut lab, hook, &svc, &a);
    let before = lab.events();
    let rst = Pkt::tcp(
        svc.backend_sock(backend),
        sock(SNAT_V4, 45000),
        TCP_RST | TCP_ACK,
    );
    sent_on(&mut lab, hook, "the backend's RST", &rst);
    assert_eq!(event_delta(&before, &lab.events()), [("rst_freed", 1)]);
    assert_eq!(lab.entries(), (0, 0), "{}", lab.dump_conns());

    // The client gives up: the same.
    let b = flow(44101);
    new_flow(&mut lab, hook, &svc, &b);
    sent_on(
        &mut lab,
        hook,
        "the client's RST",
        &b.clone().with_flags(TCP_RST),
    );
    assert_eq!(lab.entries(), (0, 0), "{}", lab.dump_conns());

    // An established flow: a RST resets both entries, which then last as
    // long as an unanswered flow (any packet refreshes them: a forged RST
    // cannot cut a live connection).
    let c = flow(44102);
    handshake(&mut lab, hook, &svc, &c);
    sent_on(
        &mut lab,
        hook,
        "the client's RST",
        &c.clone().with_flags(TCP_RST | TCP_ACK),
    );
    let rkey = reverse_key(&svc, &c, backend, 45000);
    for k in [c.flow_key(), rkey] {
        assert_eq!(
            lab.conn(&k)
                .map(|e| (e.tcp_state, e.flags & CONN_F_UNANSWERED)),
            Some((TCP_STATE_RESET, 0)),
            "{}",
            lab.dump_conns()
        );
    }
    sent_on(&mut lab, hook, "a packet after the RST", &ack_of_synack(&c));
    lab.set_config(|c| c.unanswered_timeout_ns = 200_000_000);
    std::thread::sleep(std::time::Duration::from_millis(250));
    let (_, port) = new_flow(&mut lab, hook, &svc, &flow(44103));
    assert_eq!(port, 45000, "the reset flow's port is free again");
}

fn non_syn_segments_start_unanswered_flows(hook: Hook) {
    let mut lab = lab(hook, "nonsyn");
    let svc = tcp_v4_service(&mut lab);
    let cases = [
        ("a bare ACK", TCP_ACK),
        ("data", TCP_ACK | TCP_PSH),
        ("FIN", TCP_FIN | TCP_ACK),
        ("SYN+FIN", TCP_SYN | TCP_FIN),
        ("no flags", 0),
    ];
    for (i, (what, flags)) in cases.into_iter().enumerate() {
        let p = Pkt::tcp(client(CLIENT_V4, 44200 + i as u16), sock(VIP_V4, 80), flags);
        let before = lab.events();
        new_flow(&mut lab, hook, &svc, &p);
        assert_eq!(
            event_delta(&before, &lab.events()),
            [("non_syn_miss", 1)],
            "{what}"
        );
        let f = lab.conn(&p.flow_key()).expect("an unanswered flow");
        assert_eq!(f.flags, CONN_F_UNANSWERED, "{what}: not a SYN-started flow");
    }
    for (i, (what, flags)) in [
        ("SYN+RST", TCP_SYN | TCP_RST),
        ("RST", TCP_RST),
        ("RST+ACK", TCP_RST | TCP_ACK),
    ]
    .into_iter()
    .enumerate()
    {
        let p = Pkt::tcp(client(CLIENT_V4, 44300 + i as u16), sock(VIP_V4, 80), flags);
        expect_drop(
            &mut lab,
            hook,
            what,
            None,
            &p.build(),
            reason::DROP_RST_NO_CONN,
        );
        assert_eq!(lab.conn(&p.flow_key()), None, "{what}");
    }
    assert_eq!(lab.entries(), (0, 10), "{}", lab.dump_conns());
}

fn refusals_count_only_for_a_clients_syn(hook: Hook) {
    let mut lab = lab(hook, "refusal");
    let svc = tcp_v4_service(&mut lab);
    let vip = sock(VIP_V4, 80);
    let b = svc.backends[1].0;
    let rst_to = |port| Pkt::tcp(svc.backend_sock(b), sock(SNAT_V4, port), TCP_RST | TCP_ACK);
    // A bare ACK (what a forger sends) answered by RST: no refusal.
    let p1 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[]);
    let ack = Pkt::tcp(client(CLIENT_V4, p1), vip, TCP_ACK);
    let (got, port) = new_flow(&mut lab, hook, &svc, &ack);
    assert_eq!(got, b);
    sent_on(&mut lab, hook, "RST to a bare ACK", &rst_to(port));
    assert_eq!(
        lab.dp().refused_at(b).unwrap(),
        0,
        "a bare ACK's RST is no refusal"
    );
    // A client's SYN answered by RST: a refusal.
    let p2 = port_landing_on(&svc, CLIENT_V4.into(), vip, b, &[p1]);
    let syn = Pkt::tcp(client(CLIENT_V4, p2), vip, TCP_SYN);
    let (_, port) = new_flow(&mut lab, hook, &svc, &syn);
    sent_on(&mut lab, hook, "RST to a SYN", &rst_to(port));
    assert_ne!(
        lab.dp().refused_at(b).unwrap(),
        0,
        "a SYN's RST is a refusal"
    );
}

fn flood_guard_drops_non_syn_misses_and_takes_idle_ports(hook: Hook) {
    let mut lab = lab(hook, "flood");
    lab.stay_on_one_cpu();
    let svc = tcp_v4_service(&mut lab);
    let one = one_port_service(&mut lab);
    let vip = sock(VIP_V4, 80);
    let est = Pkt::tcp(client(CLIENT_V4, 44400), vip, TCP_SYN);
    let (eb, ep) = handshake(&mut lab, hook, &svc, &est);
    lab.set_config(|c| c.flood_new_flows_per_cpu = 3);

    for p in 44401..=44403 {
        let before = lab.events();
        new_flow(
            &mut lab,
            hook,
            &svc,
            &Pkt::tcp(client(CLIENT_V4, p), vip, TCP_SYN),
        );
        assert_eq!(
            event_delta(&before, &lab.events()),
            [],
            "new flow {p} is under the limit"
        );
    }
    // Over the limit: the SYN challenge. A fresh SYN from a source not
    // vouched for is dropped and remembered; sent again too soon (a flood
    // repeating itself), dropped again; sent again after 0.5 s (a real
    // client retransmits after 1 s), it starts its flow and vouches for
    // the source, whose next SYNs pass at once.
    let stranger = std::net::Ipv4Addr::new(10, 0, 0, 3);
    let first = Pkt::tcp(client(stranger, 44404), vip, TCP_SYN);
    for what in ["a SYN under the guard", "the same SYN again at once"] {
        let before = lab.events();
        expect_drop(
            &mut lab,
            hook,
            what,
            None,
            &first.build(),
            reason::DROP_SYN_CHALLENGE,
        );
        assert_eq!(
            event_delta(&before, &lab.events()),
            [("flood_guard_active", 1)]
        );
        assert_eq!(lab.conn(&first.flow_key()), None);
    }
    // Another flow of the same source is not vouched for by the first.
    let other = Pkt::tcp(client(stranger, 44409), vip, TCP_SYN);
    expect_drop(
        &mut lab,
        hook,
        "another flow",
        None,
        &other.build(),
        reason::DROP_SYN_CHALLENGE,
    );
    std::thread::sleep(std::time::Duration::from_millis(600));
    let before = lab.events();
    new_flow(&mut lab, hook, &svc, &first);
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("flood_guard_active", 1), ("source_vouched", 1)]
    );
    let before = lab.events();
    new_flow(&mut lab, hook, &svc, &other);
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("flood_guard_active", 1)],
        "a vouched source's SYN passes at once"
    );
    // CLIENT_V4 completed a handshake before the flood: vouched for too.
    let before = lab.events();
    new_flow(
        &mut lab,
        hook,
        &svc,
        &Pkt::tcp(client(CLIENT_V4, 44410), vip, TCP_SYN),
    );
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("flood_guard_active", 1)],
        "a source with an established connection passes at once"
    );
    // A segment other than a SYN that misses: dropped, no state.
    let ack = Pkt::tcp(client(CLIENT_V4, 44405), vip, TCP_ACK);
    let before = lab.events();
    expect_drop(
        &mut lab,
        hook,
        "a bare ACK under the flood guard",
        None,
        &ack.build(),
        reason::DROP_FLOOD_GUARD,
    );
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("non_syn_miss", 1), ("flood_guard_active", 1)]
    );
    assert_eq!(lab.conn(&ack.flow_key()), None);
    // The established flow goes on.
    let data = est.clone().with_flags(TCP_ACK | TCP_PSH);
    let want = forwarded(hook, &data, &svc, eb, ep).build();
    expect(
        &mut lab,
        hook,
        "established flow under the flood guard",
        &data.build(),
        hook.redirect(),
        &want,
    );

    // Every probed port held by an unanswered flow: the new flow takes the
    // longest-idle one's, whose forward entry goes.
    let a = Pkt::tcp(client(CLIENT_V4, 44406), one.vip, TCP_SYN);
    let b = Pkt::tcp(client(CLIENT_V4, 44407), one.vip, TCP_SYN);
    new_flow(&mut lab, hook, &one, &a);
    let before = lab.events();
    let (_, port) = new_flow(&mut lab, hook, &one, &b);
    assert_eq!(port, 45000);
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("flood_guard_active", 1), ("flood_port_taken", 1)]
    );
    assert_eq!(lab.conn(&a.flow_key()), None, "{}", lab.dump_conns());
    let rkey = reverse_key(&one, &b, one.backends[0].0, 45000);
    assert_eq!(
        lab.conn(&rkey).map(|c| c.new_dport_be),
        Some(44407u16.to_be()),
        "{}",
        lab.dump_conns()
    );
    // Without the guard, a held port stays held.
    lab.set_config(|c| c.flood_new_flows_per_cpu = 0);
    let c = Pkt::tcp(client(CLIENT_V4, 44408), one.vip, TCP_SYN);
    expect_drop(
        &mut lab,
        hook,
        "no guard, no port",
        None,
        &c.build(),
        reason::DROP_SNAT_EXHAUSTED,
    );
    // ... until its unanswered holder has waited a second for the backend:
    // then the new flow takes the port, guard or not.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let before = lab.events();
    let (_, port) = new_flow(&mut lab, hook, &one, &c);
    assert_eq!(port, 45000);
    assert_eq!(
        event_delta(&before, &lab.events()),
        [("flood_port_taken", 1)]
    );
    assert_eq!(lab.conn(&b.flow_key()), None, "{}", lab.dump_conns());
}

fn replies_count_only_from_the_backend_side(hook: Hook) {
    let mut lab = lab(hook, "wrongif");
    let svc = tcp_v4_service(&mut lab);
    let syn = Pkt::tcp(client(CLIENT_V4, 44500), sock(VIP_V4, 80), TCP_SYN);
    let (backend, port) = handshake(&mut lab, hook, &svc, &syn);
    let rkey = reverse_key(&svc, &syn, backend, port);
    let before = (lab.conn(&syn.flow_key()), lab.conn(&rkey));
    let b = svc.backend_sock(backend);
    let front = lab.front_ifindex;
    for (what, flags) in [("data", TCP_ACK | TCP_PSH), ("a RST", TCP_RST | TCP_ACK)] {
        let p = Pkt::tcp(b, sock(SNAT_V4, port), flags);
        for ifindex in [front, 1] {
            expect_drop(
                &mut lab,
                hook,
                &format!("{what} from the backend's address arriving on ifindex {ifindex}"),
                Some(ifindex),
                &p.build(),
                reason::DROP_REPLY_WRONG_IFACE,
            );
        }
    }
    assert_eq!(
        (lab.conn(&syn.flow_key()), lab.conn(&rkey)),
        before,
        "forged replies changed the flow:\n{}",
        lab.dump_conns()
    );
    sent_on(
        &mut lab,
        hook,
        "the reply on the backend side",
        &Pkt::tcp(b, sock(SNAT_V4, port), TCP_ACK | TCP_PSH),
    );
    // The backend side's interface was re-created (a new ifindex): its
    // packets now come in by another one, which the route to the backend
    // confirms; the flow is bound to it again.
    let mut rev = lab.conn(&rkey).expect("reverse entry");
    rev.ifindex = 4242;
    lab.dp_mut()
        .insert_conn(&rkey, &rev)
        .expect("writing CONNS");
    sent_on(
        &mut lab,
        hook,
        "the reply after the backend side's interface was re-created",
        &Pkt::tcp(b, sock(SNAT_V4, port), TCP_ACK | TCP_PSH),
    );
    assert_eq!(
        lab.conn(&rkey).map(|c| c.ifindex),
        Some(lab.back_ifindex),
        "{}",
        lab.dump_conns()
    );
    // An unanswered flow: a forged SYN-ACK records nothing.
    let syn2 = Pkt::tcp(client(CLIENT_V4, 44501), sock(VIP_V4, 80), TCP_SYN);
    let (b2, p2) = new_flow(&mut lab, hook, &svc, &syn2);
    let r2 = reverse_key(&svc, &syn2, b2, p2);
    let before = lab.conn(&r2);
    expect_drop(
        &mut lab,
        hook,
        "a SYN-ACK arriving on the client side",
        Some(front),
        &synack_for(&svc, &syn2, b2, p2).build(),
        reason::DROP_REPLY_WRONG_IFACE,
    );
    assert_eq!(lab.conn(&r2), before);
}

fn icmp_errors_count_only_from_the_quoted_side_of_live_flows(hook: Hook) {
    let mut lab = lab(hook, "icmpside");
    let svc = tcp_v4_service(&mut lab);
    let cip = IpAddr::from(CLIENT_V4);
    let vip = IpAddr::from(VIP_V4);
    let syn = Pkt::tcp(client(cip, 44600), sock(vip, 80), TCP_SYN);
    let (backend, port) = new_flow(&mut lab, hook, &svc, &syn);
    // About what we sent the backend: it must come from the backend side.
    let sent = forwarded(hook, &syn, &svc, backend, port);
    let about_backend = icmp_too_big(BACK_ROUTER_V4.into(), SNAT_V4.into(), &sent.build_ip());
    let front = lab.front_ifindex;
    expect_drop(
        &mut lab,
        hook,
        "an error about the backend leg from the client side",
        Some(front),
        &about_backend.build(),
        reason::DROP_ICMP_REJECTED,
    );
    sent_on(
        &mut lab,
        hook,
        "the same error from the backend side",
        &about_backend,
    );
    // About our reply to the client: it must come from the client side.
    let reply = Pkt::tcp(sock(vip, 80), client(cip, 44600), TCP_SYN | TCP_ACK).with_ttl(63);
    let about_client = icmp_too_big(FRONT_ROUTER_V4.into(), vip, &reply.build_ip());
    let back = lab.back_ifindex;
    expect_drop(
        &mut lab,
        hook,
        "an error about the client leg from the backend side",
        Some(back),
        &about_client.build(),
        reason::DROP_ICMP_REJECTED,
    );
    sent_on(
        &mut lab,
        hook,
        "the same error from the client side",
        &about_client,
    );
    // A flow that has expired: no translation.
    lab.set_config(|c| c.unanswered_timeout_ns = 100_000_000);
    std::thread::sleep(std::time::Duration::from_millis(150));
    expect_drop(
        &mut lab,
        hook,
        "an error about an expired flow",
        None,
        &about_backend.build(),
        reason::DROP_ICMP_REJECTED,
    );
}

fn the_flow_hash_is_keyed(hook: Hook) {
    let mut lab = lab(hook, "hashkey");
    let svc = tcp_v4_service(&mut lab);
    let other = [0x0bad_cafe, 0xdead_beef];
    lab.set_config(|c| c.hash_key = other);
    let vip = sock(VIP_V4, 80);
    // A flow whose backend and SNAT port differ under the two keys.
    let p = (45000..46000u16)
        .map(|p| Pkt::tcp(client(CLIENT_V4, p), vip, TCP_SYN))
        .find(|syn| {
            let k = syn.flow_key();
            let h = lb_common::hash::flow_hash(&k, &other);
            svc.tables[0][(h % MAGLEV_SIZE) as usize] != svc.slot_backend(&k)
                && svc.snat_lo() + (h % svc.snat_len()) as u16 != svc.first_snat_port(&k)
        })
        .expect("some flow moves with the key");
    let h = lb_common::hash::flow_hash(&p.flow_key(), &other);
    let backend = svc.tables[0][(h % MAGLEV_SIZE) as usize];
    let port = svc.snat_lo() + (h % svc.snat_len()) as u16;
    let want = forwarded(hook, &p, &svc, backend, port).build();
    expect(
        &mut lab,
        hook,
        "a new flow under another hash key",
        &p.build(),
        hook.redirect(),
        &want,
    );
}

// ---- forwarding corner cases ------------------------------------------------------------------------

/// Runs `big`, bigger than the egress MTU (1500), and checks the hook
/// would not send it: XDP passes it (`pass_xdp_fib`) to the TC program
/// beside it, TC drops it (`drop_frag_needed`): a rewritten packet handed
/// to the stack would be dropped there as a martian. Returns the output.
#[track_caller]
fn expect_oversized(lab: &mut PacketLab, hook: Hook, what: &str, big: &Pkt) -> Vec<u8> {
    let before = lab.reasons();
    let (action, out) = lab.run(hook, &big.build());
    let (want_action, want_reason) = match hook {
        Hook::Xdp => (XDP_PASS, reason::PASS_XDP_FIB),
        Hook::Tc => (TC_ACT_SHOT, reason::DROP_FRAG_NEEDED),
    };
    assert_eq!(
        action,
        want_action,
        "{what}: expected {}, saw {}",
        hook.action_name(want_action),
        hook.action_name(action)
    );
    expect_one_reason(what, &before, &lab.reasons(), &[want_reason]);
    out
}

/// The data plane caches each next hop per CPU for `NEXT_HOP_TTL_NS`
/// (`NEXT_HOPS`): a route that goes, a neighbour whose MAC changes and a
/// route that comes back are all seen once it has passed, and the MTU
/// check is never skipped for a packet longer than the one the cached
/// lookup was made for.
fn next_hops_are_cached_briefly(hook: Hook) {
    let mut lab = lab(hook, "nhop");
    let svc = tcp_v4_service(&mut lab);
    let syn = Pkt::tcp(client(CLIENT_V4, 40200), sock(VIP_V4, 80), TCP_SYN);
    let (backend, port) = new_flow(&mut lab, hook, &svc, &syn);
    let ack = Pkt::tcp(client(CLIENT_V4, 40200), sock(VIP_V4, 80), TCP_ACK);
    let want = forwarded(hook, &ack, &svc, backend, port);
    expect(
        &mut lab,
        hook,
        "the flow's next packet",
        &ack.build(),
        hook.redirect(),
        &want.build(),
    );
    // Past the TTL and a tick of the coarse clock (at most 10 ms).
    let expire =
        || std::thread::sleep(Duration::from_nanos(NEXT_HOP_TTL_NS) + Duration::from_millis(60));

    let target = format!("{}/32", svc.backend_sock(backend).ip());
    lab.ns
        .ip(&["route", "add", "unreachable", &target])
        .expect("adding a route");
    expire();
    match hook {
        Hook::Xdp => {
            let before = lab.reasons();
            expect(
                &mut lab,
                hook,
                "no route to the backend any more",
                &ack.build(),
                XDP_PASS,
                &ack.build(),
            );
            expect_one_reason("no route", &before, &lab.reasons(), &[reason::PASS_XDP_FIB]);
        }
        Hook::Tc => expect_drop(
            &mut lab,
            hook,
            "no route to the backend any more",
            None,
            &ack.build(),
            reason::DROP_NO_ROUTE,
        ),
    }
    lab.ns
        .ip(&["route", "del", "unreachable", &target])
        .expect("removing the route");
    expire();
    expect(
        &mut lab,
        hook,
        "the route is back",
        &ack.build(),
        hook.redirect(),
        &want.build(),
    );

    if hook == Hook::Xdp {
        // The task re-created at the same address with another MAC.
        let mac = [0x02, 0, 0, 0, 0x77, 0x77];
        let ip = svc.backend_sock(backend).ip();
        let original = neighbour_mac(ip).expect("the lab's backends have neighbours");
        let addr = ip.to_string();
        let nud = ["nud", "permanent"];
        let set = |lab: &PacketLab, m: [u8; 6]| {
            let mut args = vec!["neigh", "replace", addr.as_str(), "lladdr"];
            let m = mac_str(m);
            args.extend([m.as_str(), "dev", "back"]);
            args.extend(nud);
            lab.ns.ip(&args).expect("replacing the neighbour");
        };
        set(&lab, mac);
        expire();
        let moved = want.clone().with_eth(BACK_MAC, mac);
        expect(
            &mut lab,
            hook,
            "the backend's new MAC",
            &ack.build(),
            hook.redirect(),
            &moved.build(),
        );
        set(&lab, original);
    }

    // A small packet caches the next hop; a longer one on the same flow is
    // still checked against the MTU (1500).
    let udp = lab.add_service(
        sock(VIP_V4, 53),
        PROTO_UDP,
        42000..=42999,
        &backends_v4(&[15], 53),
    );
    let small = Pkt::udp(client(CLIENT_V4, 40201), sock(VIP_V4, 53), b"q");
    let (b, p) = new_flow(&mut lab, hook, &udp, &small);
    let again = forwarded(hook, &small, &udp, b, p);
    expect(
        &mut lab,
        hook,
        "the small packet again",
        &small.build(),
        hook.redirect(),
        &again.build(),
    );
    let big = Pkt::udp(
        client(CLIENT_V4, 40201),
        sock(VIP_V4, 53),
        &vec![0x5a; 1600],
    );
    let out = expect_oversized(&mut lab, hook, "oversized on a cached next hop", &big);
    assert_eq!(
        out,
        big.build(),
        "oversized on a cached next hop ({hook:?}): the frame must stay unchanged\n{}",
        diff(&out, &big.build())
    );
}

fn no_neighbour_and_oversized(hook: Hook) {
    let mut lab = lab(hook, "fib");
    let svc = tcp_v4_service(&mut lab);
    let _udp = lab.add_service(
        sock(VIP_V4, 53),
        PROTO_UDP,
        42000..=42999,
        &backends_v4(&[15], 53),
    );

    // A client without a neighbour entry: XDP hands the rewritten reply to
    // the stack, TC lets bpf_redirect_neigh resolve it.
    let stranger = std::net::Ipv4Addr::new(10, 0, 0, 3);
    let syn = Pkt::tcp(client(stranger, 40100), sock(VIP_V4, 80), TCP_SYN);
    let (backend, port) = new_flow(&mut lab, hook, &svc, &syn);
    let synack = Pkt::tcp(
        svc.backend_sock(backend),
        sock(SNAT_V4, port),
        TCP_SYN | TCP_ACK,
    );
    let rewritten = synack
        .clone()
        .from(sock(VIP_V4, 80))
        .to(client(stranger, 40100))
        .with_ttl(63);
    let before = lab.reasons();
    let (action, out) = lab.run(hook, &synack.build());
    let after = lab.reasons();
    match hook {
        Hook::Xdp => {
            assert_eq!(
                action,
                XDP_PASS,
                "no neighbour: XDP_PASS, saw {}",
                hook.action_name(action)
            );
            expect_one_reason(
                "reply to a client without neighbour",
                &before,
                &after,
                &[reason::PASS_XDP_NO_NEIGH],
            );
            // XDP leaves it untouched to the TC program beside it: a
            // rewritten packet would be a martian to the local stack.
            assert_eq!(
                out,
                synack.build(),
                "XDP must pass a packet it cannot send untouched\n{}",
                diff(&out, &synack.build())
            );
        }
        Hook::Tc => {
            assert_eq!(
                action,
                TC_ACT_REDIRECT,
                "no neighbour: bpf_redirect_neigh, saw {}",
                hook.action_name(action)
            );
            expect_one_reason(
                "reply to a client without neighbour",
                &before,
                &after,
                &[reason::FWD_REDIRECT],
            );
        }
    }
    if hook == Hook::Tc {
        assert_eq!(
            &out[ETH_LEN..],
            &rewritten.build()[ETH_LEN..],
            "TC rewrites the reply and lets bpf_redirect_neigh resolve the client\n{}",
            diff(&out, &rewritten.build())
        );
    }

    // Bigger than the egress MTU (1500). XDP leaves it untouched to TC; TC
    // drops it and counts it (a rewritten packet handed to the stack would
    // be dropped there as a martian: its source is our own address).
    let big = Pkt::udp(
        client(CLIENT_V4, 40101),
        sock(VIP_V4, 53),
        &vec![0x5a; 1600],
    );
    let out = expect_oversized(&mut lab, hook, "oversized packet", &big);
    // Routed before it is created: a new flow this hook cannot send leaves
    // no state (XDP's TC sibling creates it, and counts it).
    assert_eq!(
        lab.conn(&big.flow_key()),
        None,
        "a new flow that was not sent left an entry:\n{}",
        lab.dump_conns()
    );
    if hook == Hook::Xdp {
        assert_eq!(
            out,
            big.build(),
            "XDP must pass the oversized packet untouched\n{}",
            diff(&out, &big.build())
        );
    }
}

/// XDP only: a frame that arrives on the interface it must leave by is sent
/// back out with XDP_TX.
#[test]
fn xdp_hairpin_uses_tx() {
    let mut lab = PacketLab::new("hairpin");
    let svc = tcp_v4_service(&mut lab);
    let syn = Pkt::tcp(client(CLIENT_V4, 41000), sock(VIP_V4, 80), TCP_SYN);
    let key = syn.flow_key();
    let backend = svc.slot_backend(&key);
    let want = forwarded(Hook::Xdp, &syn, &svc, backend, svc.first_snat_port(&key)).build();
    let before = lab.reasons();
    let back = lab.back_ifindex;
    let (action, out) = lab.run_xdp_on(back, &syn.build());
    assert!(
        action == XDP_TX && out == want,
        "SYN arriving on `back` for a backend behind `back`: expected XDP_TX, saw {}\n{}",
        Hook::Xdp.action_name(action),
        diff(&out, &want)
    );
    expect_one_reason("hairpin", &before, &lab.reasons(), &[reason::FWD_TX]);

    // Arriving on `front`: a redirect to `back`.
    let syn = Pkt::tcp(client(CLIENT_V4, 41001), sock(VIP_V4, 80), TCP_SYN);
    let front = lab.front_ifindex;
    let (action, _) = lab.run_xdp_on(front, &syn.build());
    assert_eq!(
        action,
        XDP_REDIRECT,
        "SYN arriving on `front`: {}",
        Hook::Xdp.action_name(action)
    );
}

/// The harness itself: checksums it calls valid are valid, and a broken one is seen.
#[test]
fn harness_checksum_verifier_catches_errors() {
    let f = Pkt::tcp(client(CLIENT_V4, 1), sock(VIP_V4, 80), TCP_SYN).build();
    assert_eq!(
        checksums(&f),
        Checksums {
            ip: Some(true),
            l4: Some(true),
            inner_ip: None,
            inner_l4: None
        }
    );
    let mut bad = f.clone();
    bad[ETH_LEN + 20 + 4] ^= 1;
    assert_eq!(checksums(&bad).l4, Some(false));
    let mut bad = f.clone();
    bad[ETH_LEN + 8] ^= 1;
    assert_eq!(checksums(&bad).ip, Some(false));
    let icmp = Pkt::frag_needed(BACK_ROUTER_V4, SNAT_V4, 1400, &f[ETH_LEN..]).build();
    let c = checksums(&icmp);
    assert!(
        c.all_valid() && c.inner_ip == Some(true) && c.inner_l4 == Some(true),
        "{c:?}"
    );
    let six = Pkt::packet_too_big(
        BACK_ROUTER_V6,
        SNAT_V6,
        1400,
        &Pkt::udp(client(CLIENT_V6, 1), sock(VIP_V6, 53), b"q").build_ip(),
    )
    .build();
    let c = checksums(&six);
    assert!(
        c.all_valid() && c.l4 == Some(true) && c.inner_l4 == Some(true),
        "{c:?}"
    );
    let z = Pkt::udp(client(CLIENT_V4, 1), sock(VIP_V4, 53), b"q")
        .with_zero_udp_csum()
        .build();
    assert_eq!(checksums(&z).l4, None);
}
