//! Flows across table flips, and backends that drain, go down or refuse.

use super::*;

both_hooks!(
    established_flow_survives_table_flip,
    draining_keeps_flows_and_down_repicks,
    fresh_syns_leave_draining_and_refused_flows,
);

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

// ---- 8. draining and down backends ------------------------------------------------------------

/// A source port whose new flow lands on a slot holding `backend`.
pub(crate) fn port_landing_on(
    svc: &Svc,
    cip: IpAddr,
    vip: SocketAddr,
    backend: u32,
    skip: &[u16],
) -> u16 {
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
