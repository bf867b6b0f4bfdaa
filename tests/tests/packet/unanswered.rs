//! Flows not established yet, the flood guard and forged input: unanswered flows, RST, refusals, the keyed hash, replies and ICMP errors from the wrong side.

use super::*;
use crate::{icmp::icmp_too_big, states::port_landing_on};

both_hooks!(
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
);

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
pub(super) fn ack_of_synack(syn: &Pkt) -> Pkt {
    syn.clone().with_flags(TCP_ACK).with_seq_ack(1001, 5001)
}

/// Runs `p` and checks the hook sent it on (its bytes are checked elsewhere).
#[track_caller]
pub(super) fn sent_on(lab: &mut PacketLab, hook: Hook, what: &str, p: &Pkt) {
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
pub(super) fn handshake(lab: &mut PacketLab, hook: Hook, svc: &Svc, syn: &Pkt) -> (u32, u16) {
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
