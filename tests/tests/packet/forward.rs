//! Forwarding corner cases: an established flow's way to its service, the next-hop cache, no neighbour, oversized packets, XDP hairpin, and the harness checksum verifier.

use std::net::Ipv4Addr;

use lb_common::{BENCH_STOP_SERVICE, SERVICE_AT_LIVE, SERVICE_AT_SHADOWED};

use super::{
    unanswered::{ack_of_synack, handshake, sent_on},
    *,
};

both_hooks!(
    established_flows_find_their_service,
    next_hops_are_cached_briefly,
    no_neighbour_and_oversized,
);

// ---- an established flow's service ------------------------------------------------------------

/// An established flow's packet finds its service through its flow
/// (`SERVICE_AT`), without the `SERVICES` lookup, while that lookup would
/// find the same service; when it might not (a wildcard's flow once an
/// exact service shares its port, a service removed), the packet takes the
/// lookup and follows what it finds. The shortcut is seen from a lab whose
/// runs end right after the `SERVICES` lookup (`BENCH_STOP_SERVICE`): a
/// packet that takes the lookup passes there, one that skips it is
/// forwarded.
fn established_flows_find_their_service(hook: Hook) {
    let other = Ipv4Addr::new(10, 0, 0, 77);
    let wild_at = sock(Ipv4Addr::UNSPECIFIED, 8443);
    let wild_backends = backends_v4(&[17, 18], 443);
    let to_exact = Pkt::tcp(client(CLIENT_V4, 38100), sock(VIP_V4, 80), TCP_SYN);
    let to_wild = Pkt::tcp(client(CLIENT_V4, 38101), sock(other, 8443), TCP_SYN);
    let (ack_exact, ack_wild) = (ack_of_synack(&to_exact), ack_of_synack(&to_wild));

    // The whole path: both flows established, then an exact service at the
    // wildcard flow's own address takes its next packet (an exact match
    // wins, for established flows too).
    let conns = {
        let mut lab = lab(hook, "at");
        let exact = tcp_v4_service(&mut lab);
        let wild = lab.add_service(wild_at, PROTO_TCP, 44000..=44999, &wild_backends);
        handshake(&mut lab, hook, &exact, &to_exact);
        handshake(&mut lab, hook, &wild, &to_wild);
        let conns = lab.dp().conns().expect("reading CONNS");
        assert_eq!(conns.len(), 4, "{}", lab.dump_conns());
        let here = lab.add_service(
            sock(other, 8443),
            PROTO_TCP,
            45000..=45999,
            &backends_v4(&[19], 443),
        );
        new_flow(&mut lab, hook, &here, &ack_wild);
        sent_on(&mut lab, hook, "the exact service's flow", &ack_exact);
        conns
    };

    // The shortcut, with the same services (same ids) and flows.
    let mut lab = PacketLab::with_bench_stop("at-stop", 65536, BENCH_STOP_SERVICE, Some(hook))
        .expect("loading the stopped lab");
    let exact = tcp_v4_service(&mut lab);
    let wild = lab.add_service(wild_at, PROTO_TCP, 44000..=44999, &wild_backends);
    for (k, c) in &conns {
        lab.dp_mut().insert_conn(k, c).expect("copying CONNS");
    }
    let at = |lab: &PacketLab, id| lab.dp().service_at(id).expect("reading SERVICE_AT");
    let shortcut = |lab: &mut PacketLab, what: &str, p: &Pkt, want: bool| {
        let (action, _) = lab.run(hook, &p.build());
        let want_action = if want { hook.redirect() } else { hook.pass() };
        assert_eq!(
            action,
            want_action,
            "{what} ({hook:?}): expected {} (the SERVICES lookup {}), saw {}",
            hook.action_name(want_action),
            if want { "skipped" } else { "taken" },
            hook.action_name(action),
        );
    };
    assert_eq!(at(&lab, wild.id()).flags, SERVICE_AT_LIVE);
    shortcut(&mut lab, "an exact service's flow", &ack_exact, true);
    shortcut(&mut lab, "an unshadowed wildcard's flow", &ack_wild, true);

    let here = lab.add_service(
        sock(other, 8443),
        PROTO_TCP,
        45000..=45999,
        &backends_v4(&[19], 443),
    );
    assert_eq!(
        at(&lab, wild.id()).flags,
        SERVICE_AT_LIVE | SERVICE_AT_SHADOWED
    );
    shortcut(&mut lab, "a shadowed wildcard's flow", &ack_wild, false);
    shortcut(&mut lab, "the exact service's flow", &ack_exact, true);

    lab.dp_mut()
        .remove_service(&here.key)
        .expect("removing a service");
    assert_eq!(at(&lab, wild.id()).flags, SERVICE_AT_LIVE);
    shortcut(&mut lab, "the wildcard's flow, unshadowed", &ack_wild, true);

    lab.dp_mut()
        .remove_service(&exact.key)
        .expect("removing a service");
    assert_eq!(at(&lab, exact.id()).flags, 0);
    shortcut(&mut lab, "a removed service's flow", &ack_exact, false);
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
