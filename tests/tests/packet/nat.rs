//! New flows and their full-NAT rewrite (TCP, IPv4 and IPv6), and UDP flows with their replies.

use super::*;

both_hooks!(new_tcp_flow_v4, new_tcp_flow_v6, udp_flow_and_reply,);

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
