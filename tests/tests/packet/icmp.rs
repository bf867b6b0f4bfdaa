//! ICMP errors about NATed flows, translated for either side.

use super::*;

both_hooks!(
    icmp_errors_about_snat_side_are_translated,
    icmp_errors_about_client_side_are_translated,
);

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
pub(crate) fn icmp_too_big(src: IpAddr, dst: IpAddr, quote: &[u8]) -> Pkt {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Pkt::frag_needed(s, d, 1400, quote),
        (IpAddr::V6(s), IpAddr::V6(d)) => Pkt::packet_too_big(s, d, 1400, quote),
        _ => unreachable!(),
    }
}
