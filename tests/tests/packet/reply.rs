//! The reply path: a backend's packet translated back to the client.

use super::*;

both_hooks!(reply_path,);

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
