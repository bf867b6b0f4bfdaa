//! The TC checksum helpers: a failing one drops and counts the packet
//! (`drop_csum_failed`) instead of sending it with a stale checksum, and
//! the fallback for kernels without `BPF_F_IPV6` writes the same bytes as
//! the flag does.
//!
//! On this kernel the helper does not fail by itself, so the first test
//! loads the object with its fault knob (`L4Csum::FailForTest`: every
//! `bpf_l4_csum_replace` call gets a flag no kernel knows, and fails with
//! -EINVAL before touching anything, exactly as a kernel without
//! `BPF_F_IPV6` answers that flag). On a kernel without `BPF_F_IPV6` the
//! second test sees the real thing: the object told to use the flag drops
//! and counts every rewritten IPv6 TCP/UDP packet in TC.
//!
//! `BPF_PROG_TEST_RUN` skbs are not CHECKSUM_COMPLETE, so what the
//! fallback does to `skb->csum` (docs/DATAPLANE.md §5) is not observable
//! here: `bpf_csum_update` answers -ENOTSUPP, which the program expects.
//!
//! Root, one test at a time:
//! `cargo test -p tests --test csum_helper -- --test-threads=1`

use std::net::{IpAddr, SocketAddr};

use lb_common::{reason, PROTO_TCP, PROTO_UDP};
use lb_user::dataplane::{
    maps::L4Csum,
    probe::{self, Feature},
};
use tests::packet::*;

const BACKEND_PORT: u16 = 8080;

/// TCP and UDP services on both families, and one first packet for each.
fn services(lab: &mut PacketLab) -> Vec<(Svc, Pkt)> {
    let mut out = Vec::new();
    for (i, (vip, client, backends, proto)) in [
        (
            IpAddr::from(VIP_V4),
            IpAddr::from(CLIENT_V4),
            [backend_v4(11), backend_v4(12)].map(IpAddr::from),
            PROTO_TCP,
        ),
        (
            VIP_V6.into(),
            CLIENT_V6.into(),
            [backend_v6(11), backend_v6(12)].map(IpAddr::from),
            PROTO_TCP,
        ),
        (
            VIP_V4.into(),
            CLIENT_V4.into(),
            [backend_v4(13), backend_v4(14)].map(IpAddr::from),
            PROTO_UDP,
        ),
        (
            VIP_V6.into(),
            CLIENT_V6.into(),
            [backend_v6(13), backend_v6(14)].map(IpAddr::from),
            PROTO_UDP,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let lo = 40000 + 1000 * i as u16;
        let backends: Vec<SocketAddr> = backends.iter().map(|&b| sock(b, BACKEND_PORT)).collect();
        let svc = lab.add_service(sock(vip, 80), proto, lo..=lo + 999, &backends);
        let pkt = if proto == PROTO_TCP {
            Pkt::tcp(sock(client, 33000), sock(vip, 80), TCP_SYN)
        } else {
            Pkt::udp(sock(client, 33000), sock(vip, 80), b"query")
        };
        out.push((svc, pkt));
    }
    out
}

fn describe_pkt(p: &Pkt) -> String {
    let proto = if p.proto() == PROTO_TCP { "TCP" } else { "UDP" };
    format!("{proto} {} -> {}", p.src_sock(), p.dst_sock())
}

/// Runs `frame` and expects TC_ACT_SHOT counted once under
/// `drop_csum_failed`, with nothing counted as forwarded.
#[track_caller]
fn expect_csum_drop(lab: &mut PacketLab, what: &str, frame: &[u8], service: u32) {
    let before = lab.reasons();
    let svc_before = lab.service_counters(service);
    let (action, out) = lab.run(Hook::Tc, frame);
    let after = lab.reasons();
    let mut want = before.clone();
    want[reason::DROP_CSUM_FAILED as usize] += 1;
    assert!(
        action == TC_ACT_SHOT && after == want,
        "{what}: expected {} counted once under drop_csum_failed, saw action {} and {}\n{}",
        Hook::Tc.action_name(TC_ACT_SHOT),
        Hook::Tc.action_name(action),
        reason_delta(&before, &after),
        hex(&out)
    );
    assert_eq!(
        lab.service_counters(service).packets,
        svc_before.packets,
        "{what}: a dropped packet must not count as forwarded for its service"
    );
}

#[test]
fn a_failing_checksum_helper_drops_and_counts() {
    let mut lab = PacketLab::with_l4_csum("csumfail", L4Csum::FailForTest);
    let all = services(&mut lab);
    for (svc, pkt) in &all {
        let what = format!("{} with the checksum helper failing", describe_pkt(pkt));
        expect_csum_drop(&mut lab, &what, &pkt.build(), svc.id());

        // The flow's entries exist (made before the rewrite), so the
        // backend's answer takes the reply path and fails the same way.
        let key = pkt.flow_key();
        let conn = lab.conn(&key).unwrap_or_else(|| {
            panic!(
                "{what}: the forward entry must exist:\n{}",
                lab.dump_conns()
            )
        });
        let backend = svc.backend_sock(conn.backend);
        let snat = sock(snat_addr_for(pkt.dst), u16::from_be(conn.new_sport_be));
        let answer = if pkt.proto() == PROTO_TCP {
            Pkt::tcp(backend, snat, TCP_SYN | TCP_ACK)
        } else {
            Pkt::udp(backend, snat, b"answer")
        };
        let what = format!(
            "answer {} with the checksum helper failing",
            describe_pkt(&answer)
        );
        expect_csum_drop(&mut lab, &what, &answer.build(), svc.id());
    }

    // XDP patches checksums itself, with no helper: it forwards as usual.
    let (svc, syn) = &all[0];
    let syn = syn.clone().from(sock(CLIENT_V4, 33999));
    let before = lab.reasons();
    let (action, out) = lab.run(Hook::Xdp, &syn.build());
    assert_eq!(
        action,
        XDP_REDIRECT,
        "XDP must not be affected by the TC checksum fault knob (service {}), saw {}\n{}",
        svc.id(),
        reason_delta(&before, &lab.reasons()),
        hex(&out)
    );
    assert!(checksums(&out).all_valid(), "{}", hex(&out));
}

/// The TC output of each first packet, and the reasons it was counted under.
fn run_firsts(tag: &str, mode: L4Csum) -> Vec<(String, u32, Vec<u8>, String)> {
    let mut lab = PacketLab::with_l4_csum(tag, mode);
    let mut out = Vec::new();
    for (_, pkt) in services(&mut lab) {
        let before = lab.reasons();
        let (action, frame) = lab.run(Hook::Tc, &pkt.build());
        out.push((
            describe_pkt(&pkt),
            action,
            frame,
            reason_delta(&before, &lab.reasons()),
        ));
    }
    out
}

#[test]
fn the_ipv6_fallback_writes_what_the_flag_writes() {
    let fallback = run_firsts("csumcomp", L4Csum::Compensate);
    for (what, action, frame, reasons) in &fallback {
        assert!(
            *action == TC_ACT_REDIRECT && checksums(frame).all_valid(),
            "{what} with the fallback (no BPF_F_IPV6, bpf_csum_update): expected {} with valid \
             checksums, saw action {} ({reasons}), checksums {:?}\n{}",
            Hook::Tc.action_name(TC_ACT_REDIRECT),
            Hook::Tc.action_name(*action),
            checksums(frame),
            hex(frame)
        );
    }
    let flag = run_firsts("csumflag", L4Csum::Ipv6Flag);
    let kernel_has_flag = probe::features().has(Feature::L4CsumIpv6);
    eprintln!(
        "{}; BPF_F_IPV6 {}",
        probe::features().release,
        if kernel_has_flag {
            "present"
        } else {
            "missing"
        }
    );
    for ((what, a1, f1, _), (_, a2, f2, r2)) in fallback.iter().zip(&flag) {
        let v6 = what.contains('[');
        if kernel_has_flag || !v6 {
            assert!(
                a1 == a2 && f1 == f2,
                "{what}: the fallback and BPF_F_IPV6 must write the same frame\nfallback: {}\nflag: \
                 action {} ({r2})\n{}",
                hex(f1),
                Hook::Tc.action_name(*a2),
                diff(f2, f1)
            );
        } else {
            // The kernel refuses the flag: the helper fails, and the packet
            // is dropped and counted, never sent with a stale checksum.
            assert!(
                *a2 == TC_ACT_SHOT && r2.contains("drop_csum_failed +1"),
                "{what}: on a kernel without BPF_F_IPV6, the flag must fail the helper and drop \
                 the packet under drop_csum_failed; saw action {} ({r2})",
                Hook::Tc.action_name(*a2)
            );
        }
    }
}
