//! SNAT ports: exhaustion, and the rare drops that reach the log once.

use super::*;

both_hooks!(
    rare_drops_and_the_flood_guard_reach_the_log_once,
    snat_exhaustion_drops,
);

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
