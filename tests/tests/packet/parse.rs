//! What is not ours, or not understood: no service, the port filter, the wildcard, truncated frames and unparsed headers pass untouched, each with its reason.

use super::*;

both_hooks!(
    service_ports_follow_the_services,
    unknown_service_passes_unchanged,
    wildcard_service,
    truncated_frames_pass_unchanged,
    unparsed_packets_pass_with_their_reason,
);

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
