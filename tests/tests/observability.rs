//! Observability against the real kernel: traffic goes through the data
//! plane with `BPF_PROG_TEST_RUN`, then the real `xdplb` binary (`stats`,
//! `backends`, `explain`) and `lb_user::report::metrics::serve` read the lab's
//! pinned maps, and every number must match what was sent, exactly.
//!
//! Run as root, after building the binary:
//! `cargo build -p lb-user && cargo test -p tests --test observability -- --test-threads=1`

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use lb_common::{
    reason, Conn, Counters, BACKEND_ACTIVE, BACKEND_DOWN, CONN_F_REVERSE, PROTO_TCP, PROTO_UDP,
};
use lb_user::status::{self, BackendStatus, CheckStatus, ServiceStatus, Status};
use serde_json::Value;
use tests::packet::*;

// ---- the binary ---------------------------------------------------------------

/// The binary under test (`XDPLB_BIN`, or `target/<profile>/xdplb`).
fn xdplb_bin() -> PathBuf {
    testkit::bin::xdplb_bin().expect("the xdplb binary")
}

fn xdplb(args: &[&str]) -> Output {
    Command::new(xdplb_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running xdplb")
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `xdplb <args> --pin-dir <lab>` and parses its JSON stdout.
fn xdplb_json(lab: &PacketLab, args: &[&str]) -> Value {
    let pin = lab.pin_dir().to_str().unwrap().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", "--pin-dir", &pin]);
    let o = xdplb(&all);
    assert!(o.status.success(), "xdplb {all:?} failed:\n{}", show(&o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("xdplb {all:?} printed no JSON ({e}):\n{}", show(&o)))
}

/// The command fails with exactly one line on stderr, which contains `want`.
fn fails_with_one_line(args: &[&str], want: &str) {
    let o = xdplb(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "xdplb {args:?} should fail:\n{}",
        show(&o)
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "xdplb {args:?} should say why in one line:\n{}",
        show(&o)
    );
    assert!(
        err.starts_with("xdplb: error: ") && err.contains(want),
        "xdplb {args:?}: expected a line containing {want:?}:\n{}",
        show(&o)
    );
    assert!(o.stdout.is_empty(), "nothing on stdout:\n{}", show(&o));
}

// ---- traffic with known counters ------------------------------------------------

const TCP_BACKENDS: [u8; 3] = [11, 12, 13];
const UDP_BACKENDS: [u8; 2] = [14, 15];

/// What the counters must say after [`drive`].
#[derive(Debug, Default)]
struct Expected {
    service: BTreeMap<u32, Counters>,
    backend: BTreeMap<u32, Counters>,
    active_service: BTreeMap<u32, u64>,
    active_backend: BTreeMap<u32, u64>,
    reasons: Vec<Counters>,
    /// CONNS entries (established flows).
    entries: u64,
    /// UNANSWERED entries (flows not established yet).
    unanswered: u64,
    established: u64,
    live_flows: u64,
}

fn add(c: &mut Counters, len: usize, new: bool) {
    c.packets += 1;
    c.bytes += len as u64;
    c.new_flows += new as u64;
}

impl Expected {
    fn forwarded(&mut self, service: u32, backend: u32, len: usize, new: bool) {
        add(self.service.entry(service).or_default(), len, new);
        add(self.backend.entry(backend).or_default(), len, new);
        add(&mut self.reasons[reason::FWD_REDIRECT as usize], len, false);
        if new {
            *self.active_service.entry(service).or_default() += 1;
            *self.active_backend.entry(backend).or_default() += 1;
            self.unanswered += 2;
            self.live_flows += 1;
        }
    }

    fn passed(&mut self, why: u32, len: usize) {
        add(&mut self.reasons[why as usize], len, false);
    }
}

struct World {
    tcp: Svc,
    udp: Svc,
    exp: Expected,
}

fn forward(lab: &mut PacketLab, frame: &[u8]) -> Vec<u8> {
    let (action, out) = lab.run_xdp(frame);
    assert_eq!(
        action,
        XDP_REDIRECT,
        "expected {}, got {}: {}",
        Hook::Xdp.action_name(XDP_REDIRECT),
        Hook::Xdp.action_name(action),
        describe(frame)
    );
    out
}

/// A TCP and a UDP service, 12 TCP flows (5 with a second packet, one
/// reply and the client's ACK of it: established), 6 UDP flows, 3 packets
/// to no service, 2 non-IP frames, and a stale UDP entry that must not
/// count as live.
fn drive(lab: &mut PacketLab) -> World {
    let tcp = lab.add_service(
        sock(VIP_V4, 80),
        PROTO_TCP,
        40000..=40999,
        &TCP_BACKENDS.map(|n| sock(backend_v4(n), 8080)),
    );
    let udp = lab.add_service(
        sock(VIP_V4, 53),
        PROTO_UDP,
        41000..=41999,
        &UDP_BACKENDS.map(|n| sock(backend_v4(n), 5353)),
    );
    let mut exp = Expected {
        reasons: vec![Counters::default(); reason::COUNT as usize],
        ..Default::default()
    };
    for i in 0..12u16 {
        let p = Pkt::tcp(sock(CLIENT_V4, 30000 + i), sock(VIP_V4, 80), TCP_SYN);
        let frame = p.build();
        forward(lab, &frame);
        let c = lab.conn(&p.flow_key()).expect("a SYN creates an entry");
        exp.forwarded(tcp.id(), c.backend, frame.len(), true);
        if i < 5 {
            let p = Pkt {
                payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                ..p.clone().with_flags(TCP_ACK | TCP_PSH)
            };
            let frame = p.build();
            forward(lab, &frame);
            exp.forwarded(tcp.id(), c.backend, frame.len(), false);
        }
        if i == 0 {
            let port = u16::from_be(c.new_sport_be);
            let reply = Pkt::tcp(
                tcp.backend_sock(c.backend),
                sock(SNAT_V4, port),
                TCP_SYN | TCP_ACK,
            );
            let frame = reply.build();
            forward(lab, &frame);
            exp.forwarded(tcp.id(), c.backend, frame.len(), false);
            // The client acknowledges the SYN-ACK (ISN 1000): established.
            let frame = p
                .clone()
                .with_flags(TCP_ACK)
                .with_seq_ack(1001, 1001)
                .build();
            forward(lab, &frame);
            exp.forwarded(tcp.id(), c.backend, frame.len(), false);
            exp.unanswered -= 2;
            exp.entries += 2;
            exp.established += 1;
        }
    }
    for i in 0..6u16 {
        let p = Pkt::udp(sock(CLIENT_V4, 31000 + i), sock(VIP_V4, 53), b"query");
        let frame = p.build();
        forward(lab, &frame);
        let c = lab
            .conn(&p.flow_key())
            .expect("a UDP packet creates an entry");
        exp.forwarded(udp.id(), c.backend, frame.len(), true);
    }
    for i in 0..3u16 {
        let frame = Pkt::tcp(sock(CLIENT_V4, 32000 + i), sock(VIP_V4, 81), TCP_SYN).build();
        assert_eq!(lab.run_xdp(&frame).0, XDP_PASS);
        exp.passed(reason::PASS_NO_SERVICE, frame.len());
    }
    for _ in 0..2 {
        let mut frame = vec![0u8; 14 + 28];
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&CLIENT_MAC);
        frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(lab.run_xdp(&frame).0, XDP_PASS);
        exp.passed(reason::PASS_NOT_IP, frame.len());
    }
    // An entry idle for longer than the UDP timeout (60 s): in the table,
    // not live. CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    let now = lb_user::clock::monotonic_now_ns();
    let idle = 61_000_000_000;
    assert!(
        now > 2 * idle,
        "test needs an uptime above two minutes (monotonic clock at {now} ns)"
    );
    let stale = flow_key(sock(CLIENT_V4, 31999), sock(VIP_V4, 53), PROTO_UDP);
    let b = udp.backends[0];
    lab.dp_mut()
        .insert_conn(
            &stale,
            &Conn {
                new_src: addr16(SNAT_V4.into()),
                new_dst: addr16(b.1.ip()),
                new_sport_be: 41999u16.to_be(),
                new_dport_be: b.1.port().to_be(),
                backend: b.0,
                service: udp.id(),
                last_seen_ns: now - idle,
                created_ns: now - idle,
                ..Default::default()
            },
        )
        .expect("writing CONNS");
    exp.entries += 1;
    World { tcp, udp, exp }
}

fn num(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a number, got {v}"))
}

fn find<'a>(list: &'a Value, key: &str, want: &Value) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|x| &x[key] == want))
        .unwrap_or_else(|| panic!("no entry with {key} = {want} in {list:#}"))
}

/// Compares `xdplb stats --json` with the traffic, field by field.
fn check_stats(v: &Value, w: &World) {
    let ctx = |what: &str| format!("{what}; stats:\n{v:#}");
    for svc in [&w.tcp, &w.udp] {
        let s = find(&v["services"], "id", &svc.id().into());
        let c = w.exp.service.get(&svc.id()).copied().unwrap_or_default();
        let proto = if svc.proto == PROTO_TCP { "tcp" } else { "udp" };
        assert_eq!(
            s["listen"],
            format!("{}/{proto}", svc.vip),
            "{}",
            ctx("listen")
        );
        for (field, want) in [
            ("packets", c.packets),
            ("bytes", c.bytes),
            ("new_connections", c.new_flows),
            (
                "active_connections",
                w.exp.active_service.get(&svc.id()).copied().unwrap_or(0),
            ),
        ] {
            assert_eq!(
                num(&s[field], field),
                want,
                "{}",
                ctx(&format!("service {} {field}", svc.id()))
            );
        }
        assert_eq!(
            s["backends"].as_array().map(Vec::len),
            Some(svc.backends.len()),
            "{}",
            ctx("every backend listed")
        );
        for (index, addr) in &svc.backends {
            let b = find(&s["backends"], "index", &(*index).into());
            let bc = w.exp.backend.get(index).copied().unwrap_or_default();
            assert_eq!(b["addr"], addr.to_string(), "{}", ctx("backend addr"));
            assert_eq!(
                b["state"],
                "active",
                "{}",
                ctx("backend state from the maps")
            );
            for (field, want) in [
                ("packets", bc.packets),
                ("bytes", bc.bytes),
                ("new_connections", bc.new_flows),
                (
                    "active_connections",
                    w.exp.active_backend.get(index).copied().unwrap_or(0),
                ),
            ] {
                assert_eq!(
                    num(&b[field], field),
                    want,
                    "{}",
                    ctx(&format!("backend #{index} {field}"))
                );
            }
            let share = bc.new_flows as f64 / c.new_flows as f64;
            let got = b["new_connection_share"].as_f64().expect("a share");
            assert!((got - share).abs() < 1e-12, "{}", ctx("share"));
        }
    }
    let reasons = v["reasons"].as_array().expect("reasons");
    assert_eq!(reasons.len(), reason::COUNT as usize);
    for (i, r) in reasons.iter().enumerate() {
        let want = w.exp.reasons[i];
        assert_eq!(r["name"], reason::NAMES[i], "{}", ctx("reason order"));
        assert_eq!(
            (num(&r["packets"], "packets"), num(&r["bytes"], "bytes")),
            (want.packets, want.bytes),
            "{}",
            ctx(&format!("reason {}", reason::NAMES[i]))
        );
    }
    let ct = &v["conntrack"];
    assert_eq!(
        num(&ct["entries"], "entries"),
        w.exp.entries,
        "{}",
        ctx("entries")
    );
    assert_eq!(
        num(&ct["capacity"], "capacity"),
        65536,
        "{}",
        ctx("capacity")
    );
    assert_eq!(
        num(&ct["live_flows"], "live_flows"),
        w.exp.live_flows,
        "{}",
        ctx("live flows")
    );
    assert_eq!(
        num(&ct["unanswered"]["entries"], "unanswered entries"),
        w.exp.unanswered,
        "{}",
        ctx("unanswered entries")
    );
    let events = v["events"].as_array().expect("events");
    assert_eq!(events.len(), lb_common::event::COUNT as usize);
    assert_eq!(
        events[lb_common::event::ESTABLISHED as usize],
        serde_json::json!({"name": "established", "count": w.exp.established, "per_sec": null}),
        "{}",
        ctx("events")
    );
}

// ---- tests ------------------------------------------------------------------------

#[test]
fn stats_json_counts_exactly_what_was_sent() {
    let mut lab = PacketLab::new("obs-stats");
    let w = drive(&mut lab);
    let v = xdplb_json(&lab, &["stats"]);
    assert_eq!(v["version"], 1);
    assert_eq!(v["daemon"]["running"], false, "no daemon: {v:#}");
    assert!(
        v["daemon"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("isn't running")),
        "the daemon's absence is said: {v:#}"
    );
    assert_eq!(v["services"][0]["name"], Value::Null);
    check_stats(&v, &w);

    // The text form carries the same numbers.
    let pin = lab.pin_dir().to_str().unwrap();
    let o = xdplb(&["stats", "--pin-dir", pin]);
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let tcp = w.exp.service[&w.tcp.id()];
    for want in [
        "note: the daemon isn't running".to_string(),
        format!("{}/tcp", w.tcp.vip),
        format!("  {}", w.tcp.backends[0].1),
        format!("pass_no_service  {:>width$}", 3, width = "PACKETS".len()),
        format!("connection table: {} of 65,536 entries", w.exp.entries),
        format!("{} live flows", w.exp.live_flows),
        tcp.new_flows.to_string(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    eprintln!("xdplb stats:\n{text}");
}

/// Removes the status file it wrote.
struct StatusFile(PathBuf);

impl StatusFile {
    fn write(pin_dir: &Path, s: &Status) -> Self {
        let path = status::status_path(pin_dir);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        s.write(&path).expect("writing the status file");
        Self(path)
    }
}

impl Drop for StatusFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn status_for(lab: &PacketLab, w: &World, pid: u32) -> Status {
    let now = lb_user::clock::now_ms();
    let backends = w
        .tcp
        .backends
        .iter()
        .enumerate()
        .map(|(i, (index, addr))| BackendStatus {
            addr: *addr,
            index: Some(*index),
            state: if i == 1 { "draining" } else { "active" }.into(),
            reason: if i == 1 {
                "gone from DNS".into()
            } else {
                "2 consecutive checks passed".into()
            },
            since_ms: now - 65_000,
            last_check: Some(CheckStatus {
                ok: true,
                latency_us: 250,
                detail: "connected".into(),
                at_ms: now - 500,
            }),
            last_refused_ms: None,
        })
        .collect();
    Status {
        version: status::STATUS_VERSION,
        pid,
        written_ms: now,
        pin_dir: lab.pin_dir().into(),
        interfaces: Vec::new(),
        services: vec![ServiceStatus {
            name: "web".into(),
            listen: format!("{}/tcp", w.tcp.vip),
            id: w.tcp.id(),
            backends_name: "tasks.web".into(),
            backends,
            ..Default::default()
        }],
    }
}

#[test]
fn daemon_status_names_services_and_backends_reports_states() {
    let mut lab = PacketLab::new("obs-status");
    let w = drive(&mut lab);
    let pin = lab.pin_dir().to_str().unwrap().to_string();
    fails_with_one_line(
        &["backends", "--pin-dir", &pin],
        "is `xdplb run` running? (--pin-dir to look elsewhere)",
    );

    let file = StatusFile::write(lab.pin_dir(), &status_for(&lab, &w, std::process::id()));
    let v = xdplb_json(&lab, &["stats"]);
    assert_eq!(v["daemon"]["running"], true, "{v:#}");
    assert_eq!(num(&v["daemon"]["pid"], "pid"), std::process::id() as u64);
    let s = find(&v["services"], "id", &w.tcp.id().into());
    assert_eq!(s["name"], "web", "{v:#}");
    let draining = find(&s["backends"], "index", &w.tcp.backends[1].0.into());
    assert_eq!(
        (
            &draining["state"],
            &draining["dataplane_state"],
            &draining["reason"]
        ),
        (
            &Value::from("draining"),
            &Value::from("active"),
            &Value::from("gone from DNS")
        ),
        "the daemon's state wins, the data plane's is kept beside it: {v:#}"
    );
    let b = xdplb_json(&lab, &["backends"]);
    assert_eq!(b["version"], 1);
    let svc = &b["services"][0];
    assert_eq!(
        (&svc["name"], &svc["backends_name"]),
        (&Value::from("web"), &Value::from("tasks.web"))
    );
    let rows = svc["backends"].as_array().expect("backends");
    assert_eq!(rows.len(), TCP_BACKENDS.len(), "{b:#}");
    for r in rows {
        let in_state = num(&r["in_state_ms"], "in_state_ms");
        assert!((65_000..120_000).contains(&in_state), "{r:#}");
        assert_eq!(r["last_check"]["latency_us"], 250);
    }
    let o = xdplb(&["backends", "--pin-dir", &pin]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    for want in [
        "SERVICE",
        "draining",
        "gone from DNS",
        "ok in 250 µs",
        "1m05s",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    eprintln!("xdplb backends:\n{text}");

    // A status written by a process that is gone is stale.
    let mut child = Command::new("true").spawn().expect("spawning true");
    let dead = child.id();
    child.wait().unwrap();
    drop(file);
    let _file = StatusFile::write(lab.pin_dir(), &status_for(&lab, &w, dead));
    fails_with_one_line(&["backends", "--pin-dir", &pin], "stale");
    let v = xdplb_json(&lab, &["stats"]);
    assert_eq!(v["daemon"]["running"], false, "{v:#}");
    assert!(
        v["daemon"]["note"]
            .as_str()
            .is_some_and(|n| n.contains(&format!("pid {dead}"))),
        "{v:#}"
    );
}

/// `xdplb explain --json` for a TCP packet from `src` to `dst`.
fn explain(lab: &PacketLab, src: SocketAddr, dst: SocketAddr, syn: bool) -> Value {
    let (s, d) = (src.to_string(), dst.to_string());
    let mut args = vec!["explain", "--proto", "tcp", "--src", &s, "--dst", &d];
    if syn {
        args.push("--syn");
    }
    xdplb_json(lab, &args)
}

fn ip_of(v: &Value) -> std::net::IpAddr {
    v.as_str()
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .map(|s| s.ip())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

#[test]
fn explain_names_the_backend_the_data_plane_picks() {
    let mut lab = PacketLab::new("obs-explain");
    let backends: Vec<SocketAddr> = [11, 12, 13, 14].map(|n| sock(backend_v4(n), 8080)).to_vec();
    let mut svc = lab.add_service(sock(VIP_V4, 80), PROTO_TCP, 40000..=40999, &backends);
    let vip = sock(VIP_V4, 80);

    // A new flow: the Maglev slot of the active half.
    let a = Pkt::tcp(sock(CLIENT_V4, 33000), vip, TCP_SYN);
    let key = a.flow_key();
    let e = explain(&lab, a.src_sock(), vip, true);
    assert_eq!(
        (&e["verdict"], &e["connection"]),
        (&Value::from("forward"), &Value::Null),
        "{e:#}"
    );
    assert_eq!(
        num(&e["maglev"]["first_slot"], "slot"),
        svc.slot(&key) as u64,
        "{e:#}"
    );
    let picked = num(&e["backend"]["index"], "backend") as u32;
    assert_eq!(
        picked,
        svc.slot_backend(&key),
        "explain vs the table the test wrote: {e:#}"
    );
    let out = forward(&mut lab, &a.build());
    let conn = lab.conn(&key).expect("the SYN created an entry");
    assert_eq!(
        conn.backend, picked,
        "the data plane chose another backend than explained:\n{e:#}"
    );
    assert_eq!(view(&out).unwrap().ip.dst, ip_of(&e["to"]), "{e:#}");
    assert_eq!(
        e["snat_first_port"],
        Value::from(svc.first_snat_port(&key)),
        "{e:#}"
    );

    // The same flow now hits the table, even after the table moved every
    // slot to another backend.
    let indexes: Vec<u32> = svc.backends.iter().map(|b| b.0).collect();
    lab.write_table(&mut svc, 1, round_robin(&indexes, 1));
    lab.flip(&mut svc);
    assert_ne!(
        svc.slot_backend(&key),
        picked,
        "test bug: the flip should move the slot"
    );
    let e = explain(&lab, a.src_sock(), vip, false);
    assert_eq!(e["connection"]["used"], true, "{e:#}");
    assert_eq!(
        num(&e["backend"]["index"], "backend") as u32,
        picked,
        "{e:#}"
    );
    assert_eq!(
        e["connection"]["new_src"],
        format!("{SNAT_V4}:{}", u16::from_be(conn.new_sport_be)),
        "{e:#}"
    );
    let out = forward(&mut lab, &a.clone().with_flags(TCP_ACK).build());
    assert_eq!(view(&out).unwrap().ip.dst, svc.backend_sock(picked).ip());

    // A new flow whose slot holds a backend that is down: the probe sequence.
    let b = Pkt::tcp(sock(CLIENT_V4, 33001), vip, TCP_SYN);
    let bkey = b.flow_key();
    let down = svc.slot_backend(&bkey);
    lab.set_backend_state(down, BACKEND_DOWN);
    let e = explain(&lab, b.src_sock(), vip, true);
    let probes = e["maglev"]["probes"].as_array().expect("probes");
    assert!(probes.len() >= 2, "{e:#}");
    assert_eq!(
        num(&probes[0]["backend_index"], "index") as u32,
        down,
        "{e:#}"
    );
    assert_eq!(
        (&probes[0]["chosen"], &probes[0]["state"]),
        (&Value::from(false), &Value::from("down"))
    );
    let chosen = num(&e["backend"]["index"], "backend") as u32;
    assert_ne!(chosen, down);
    let text = {
        let pin = lab.pin_dir().to_str().unwrap();
        let (s, d) = (b.src_sock().to_string(), vip.to_string());
        let o = xdplb(&[
            "explain",
            "--proto",
            "tcp",
            "--src",
            &s,
            "--dst",
            &d,
            "--pin-dir",
            pin,
        ]);
        assert!(o.status.success(), "{}", show(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    forward(&mut lab, &b.build());
    assert_eq!(
        lab.conn(&bkey).expect("entry").backend,
        chosen,
        "the data plane probed to another backend than explained:\n{text}"
    );
    for want in [
        "skipped: down, not active".to_string(),
        format!("forward to backend #{chosen}"),
        format!("flow_hash = {}", lab_hash(&bkey)),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    eprintln!("xdplb explain:\n{text}");
    lab.set_backend_state(down, BACKEND_ACTIVE);

    // No service: passed.
    let port81 = sock(VIP_V4, 81);
    let e = explain(&lab, sock(CLIENT_V4, 33002), port81, true);
    assert_eq!(
        (&e["verdict"], &e["reason"]),
        (&Value::from("pass"), &Value::from("pass_no_service")),
        "{e:#}"
    );
    let frame = Pkt::tcp(sock(CLIENT_V4, 33002), port81, TCP_SYN).build();
    assert_eq!(lab.run_xdp(&frame).0, XDP_PASS);

    // A reply to the flow's SNAT port takes the reply path.
    let port = u16::from_be(conn.new_sport_be);
    let reply_src = svc.backend_sock(picked);
    let e = explain(&lab, reply_src, sock(SNAT_V4, port), false);
    assert_eq!(
        (&e["path"], &e["verdict"]),
        (&Value::from("reply"), &Value::from("forward")),
        "{e:#}"
    );
    assert_eq!(e["to"], a.src_sock().to_string(), "{e:#}");
    let rev = lab
        .conn(&flow_key(reply_src, sock(SNAT_V4, port), PROTO_TCP))
        .expect("reverse entry");
    assert!(rev.flags & CONN_F_REVERSE != 0);
}

fn sample_value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Gauge(x)
        | prometheus_parse::Value::Untyped(x) => *x,
        other => panic!("unexpected sample kind {other:?}"),
    }
}

#[test]
fn metrics_endpoint_parses_and_matches_the_maps() {
    let mut lab = PacketLab::new("obs-metrics");
    let w = drive(&mut lab);
    let pin_dir = lab.pin_dir().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt.block_on(async {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(lb_user::report::metrics::serve(addr, pin_dir, rx));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("http://{addr}/metrics");
        let mut got = None;
        for _ in 0..100 {
            if let Ok(r) = client.get(&url).send().await {
                let ct = r
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                assert_eq!(r.status(), 200, "GET {url}");
                // reqwest sends `Accept: */*`: the classic text format.
                assert!(
                    ct.starts_with("text/plain; version=0.0.4"),
                    "content type {ct}"
                );
                got = Some(r.text().await.unwrap());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops on shutdown")
            .unwrap()
            .unwrap();
        got.expect("the metrics server never answered")
    });
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"));
    let get = |metric: &str, labels: &[(&str, &str)]| -> f64 {
        let hits: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .map(|s| sample_value(&s.value))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{metric}{labels:?}: {} samples in:\n{body}",
            hits.len()
        );
        hits[0]
    };
    // Classic text: a counter's HELP names it with `_total`.
    for family in [
        "xdplb_service_packets_total",
        "xdplb_service_bytes_total",
        "xdplb_service_new_connections_total",
        "xdplb_backend_packets_total",
        "xdplb_backend_bytes_total",
        "xdplb_backend_new_connections_total",
        "xdplb_backend_state",
        "xdplb_backend_active_connections",
        "xdplb_packets_total",
        "xdplb_conntrack_entries",
        "xdplb_conntrack_capacity",
    ] {
        assert!(
            scrape.docs.contains_key(family),
            "no HELP for {family}:\n{body}"
        );
    }
    for svc in [&w.tcp, &w.udp] {
        let proto = if svc.proto == PROTO_TCP { "tcp" } else { "udp" };
        let name = format!("{}/{proto}", svc.vip);
        let c = w.exp.service[&svc.id()];
        let l = [("service", name.as_str())];
        assert_eq!(get("xdplb_service_packets_total", &l), c.packets as f64);
        assert_eq!(get("xdplb_service_bytes_total", &l), c.bytes as f64);
        assert_eq!(
            get("xdplb_service_new_connections_total", &l),
            c.new_flows as f64
        );
        for (index, addr) in &svc.backends {
            let a = addr.to_string();
            let l = [("service", name.as_str()), ("backend", a.as_str())];
            let bc = w.exp.backend.get(index).copied().unwrap_or_default();
            assert_eq!(
                get("xdplb_backend_packets_total", &l),
                bc.packets as f64,
                "{a}"
            );
            assert_eq!(get("xdplb_backend_bytes_total", &l), bc.bytes as f64, "{a}");
            assert_eq!(
                get("xdplb_backend_new_connections_total", &l),
                bc.new_flows as f64,
                "{a}"
            );
            assert_eq!(
                get("xdplb_backend_active_connections", &l),
                w.exp.active_backend.get(index).copied().unwrap_or(0) as f64,
                "{a}"
            );
            for (state, want) in [
                ("active", 1.0),
                ("down", 0.0),
                ("draining", 0.0),
                ("probing", 0.0),
            ] {
                let l = [
                    ("service", name.as_str()),
                    ("backend", a.as_str()),
                    ("state", state),
                ];
                assert_eq!(get("xdplb_backend_state", &l), want, "{a} {state}");
            }
        }
    }
    for (i, name) in reason::NAMES.iter().enumerate() {
        assert_eq!(
            get("xdplb_packets_total", &[("reason", name)]),
            w.exp.reasons[i].packets as f64,
            "{name}"
        );
    }
    assert_eq!(get("xdplb_conntrack_entries", &[]), w.exp.entries as f64);
    assert_eq!(
        get("xdplb_conntrack_unanswered_entries", &[]),
        w.exp.unanswered as f64
    );
    assert_eq!(
        get("xdplb_events_total", &[("event", "established")]),
        w.exp.established as f64
    );
    assert_eq!(get("xdplb_conntrack_capacity", &[]), 65536.0);
    let excerpt: Vec<&str> = body
        .lines()
        .filter(|l| {
            l.contains("10.0.0.100:80/tcp")
                || l.starts_with("# ")
                || l.starts_with("xdplb_conntrack")
        })
        .take(40)
        .collect();
    eprintln!("/metrics excerpt:\n{}", excerpt.join("\n"));
}

#[test]
fn no_pins_wrong_pin_dir_and_abi_mismatch_exit_nonzero_with_one_line() {
    require_root();
    let missing = format!("/sys/fs/bpf/xdplb-test-none-{}", std::process::id());
    let no_state = format!(
        "no xdplb state under {missing}: is `xdplb run` running? (--pin-dir to look elsewhere)"
    );
    fails_with_one_line(&["stats", "--pin-dir", &missing], &no_state);
    fails_with_one_line(&["stats", "--json", "--pin-dir", &missing], &no_state);
    fails_with_one_line(&["stats", "--watch", "--pin-dir", &missing], &no_state);
    fails_with_one_line(
        &[
            "explain",
            "--proto",
            "udp",
            "--src",
            "10.0.0.2:1",
            "--dst",
            "10.0.0.100:53",
            "--pin-dir",
            &missing,
        ],
        &no_state,
    );
    fails_with_one_line(
        &["backends", "--pin-dir", &missing],
        "is `xdplb run` running? (--pin-dir to look elsewhere)",
    );
    fails_with_one_line(&["top", "--pin-dir", &missing], "needs a terminal");
    // A directory that exists but holds no maps.
    let tmp = std::env::temp_dir();
    fails_with_one_line(
        &["stats", "--pin-dir", tmp.to_str().unwrap()],
        "no xdplb state under",
    );

    // Maps of another layout version.
    let mut lab = PacketLab::new("obs-abi");
    let mut cfg = lab.dp().config().unwrap();
    cfg.abi_version = 999;
    lab.dp_mut().set_config(&cfg).unwrap();
    let pin = lab.pin_dir().to_str().unwrap().to_string();
    fails_with_one_line(
        &["stats", "--pin-dir", &pin],
        "have ABI version 999, this xdplb reads version 2",
    );
}
