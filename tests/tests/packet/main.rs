//! Packet tests: the data plane against the real kernel with
//! `BPF_PROG_TEST_RUN`, one frame at a time, checking the action, the exact
//! output bytes, every checksum, and the map side effects. docs/DATAPLANE.md
//! is the contract under test.
//!
//! Run as root, one test at a time (each test moves its thread into its own
//! network namespace):
//! `cargo test -p tests --test packet -- --test-threads=1`
//!
//! One module per path: `parse`, `nat`, `reply`, `icmp`, `snat`,
//! `states`, `unanswered`, `forward`; the shared setup and assertions are
//! here.

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

mod forward;
mod icmp;
mod nat;
mod parse;
mod reply;
mod snat;
mod states;
mod unanswered;

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
    PacketLab::for_hook(&format!("{tag}-{t}"), hook)
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
