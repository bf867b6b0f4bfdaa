//! `xdplb stats`: the [`Snapshot`] as text or JSON. The JSON document is
//! described field by field in docs/OBSERVABILITY.md; its `version` changes
//! when a field changes meaning or goes away (new fields may appear without
//! a bump).

use std::{fmt::Write as _, io::IsTerminal as _, time::Duration};

use anyhow::Result;

use crate::{
    cli::StatsArgs,
    report::{
        format::{emit, fmt_bytes, fmt_count, fmt_duration_ms, fmt_rate, fmt_share, TextTable},
        snapshot::{take_snapshot, Rates, ReasonStats, Snapshot},
    },
    status::InterfaceStatus,
};

/// The `xdplb stats` text: counters, or with `rates` per-second rates
/// (`--watch`; `-` until a second reading exists).
pub fn render_text(s: &Snapshot, rates: bool) -> String {
    let mut out = String::new();
    let _ = write!(out, "xdplb stats: {}", s.pin_dir.display());
    match (s.daemon.pid, s.daemon.status_age_ms) {
        (Some(pid), Some(age)) => {
            let _ = writeln!(
                out,
                ", daemon pid {pid} (status written {} ago)",
                fmt_duration_ms(age)
            );
        }
        _ => out.push('\n'),
    }
    if let Some(note) = &s.daemon.note {
        let _ = writeln!(out, "note: {note}");
    }
    if let Some(secs) = s.interval_secs {
        let _ = writeln!(out, "rates over the last {secs:.1}s");
    }
    render_interfaces(&s.daemon.interfaces, s.time_unix_ms, &mut out);
    out.push('\n');
    if s.services.is_empty() {
        out.push_str("no services in the maps yet\n");
    } else {
        let mut t = if rates {
            TextTable::new(
                &[
                    "SERVICE / BACKEND",
                    "STATE",
                    "PKT/S",
                    "BYTES/S",
                    "NEW/S",
                    "ACTIVE",
                    "SHARE",
                ],
                &[false, false, true, true, true, true, true],
            )
        } else {
            TextTable::new(
                &[
                    "SERVICE / BACKEND",
                    "STATE",
                    "PACKETS",
                    "BYTES",
                    "NEW CONNS",
                    "ACTIVE",
                    "SHARE",
                ],
                &[false, false, true, true, true, true, true],
            )
        };
        let cells = |r: Option<Rates>, p: u64, b: u64, n: u64| -> [String; 3] {
            if rates {
                match r {
                    Some(r) => [
                        fmt_rate(r.packets_per_sec),
                        format!("{}/s", fmt_bytes(r.bytes_per_sec)),
                        fmt_rate(r.new_connections_per_sec),
                    ],
                    None => ["-".into(), "-".into(), "-".into()],
                }
            } else {
                [fmt_count(p), fmt_bytes(b as f64), fmt_count(n)]
            }
        };
        for svc in &s.services {
            let title = match &svc.name {
                Some(n) => format!("{n} ({})", svc.listen),
                None => svc.listen.clone(),
            };
            let [a, b, c] = cells(svc.rates, svc.packets, svc.bytes, svc.new_connections);
            t.row(vec![
                title,
                String::new(),
                a,
                b,
                c,
                fmt_count(svc.active_connections),
                String::new(),
            ]);
            for be in &svc.backends {
                let [a, b, c] = cells(be.rates, be.packets, be.bytes, be.new_connections);
                t.row(vec![
                    format!("  {}", be.addr),
                    be.state.clone(),
                    a,
                    b,
                    c,
                    fmt_count(be.active_connections),
                    fmt_share(be.new_connection_share),
                ]);
            }
            if svc.backends.is_empty() {
                t.row(vec!["  (no backends)".into()]);
            }
        }
        t.render(&mut out);
    }
    out.push('\n');
    let counted: Vec<&ReasonStats> = s.reasons.iter().filter(|r| r.packets > 0).collect();
    if counted.is_empty() {
        out.push_str("no packets seen yet\n");
    } else {
        let mut t = if rates {
            TextTable::new(
                &["REASON", "PACKETS", "BYTES", "PKT/S"],
                &[false, true, true, true],
            )
        } else {
            TextTable::new(&["REASON", "PACKETS", "BYTES"], &[false, true, true])
        };
        for r in &counted {
            let mut row = vec![
                r.name.to_string(),
                fmt_count(r.packets),
                fmt_bytes(r.bytes as f64),
            ];
            if rates {
                row.push(r.packets_per_sec.map_or("-".into(), fmt_rate));
            }
            t.row(row);
        }
        t.render(&mut out);
        let zero = s.reasons.len() - counted.len();
        if zero > 0 {
            let _ = writeln!(out, "({zero} reasons at zero not shown; --json lists all)");
        }
    }
    let events: Vec<String> = s
        .events
        .iter()
        .filter(|e| e.count > 0)
        .map(|e| match (rates, e.per_sec) {
            (true, Some(r)) => format!("{} {}/s", e.name, fmt_rate(r)),
            _ => format!("{} {}", e.name, fmt_count(e.count)),
        })
        .collect();
    if !events.is_empty() {
        let _ = writeln!(out, "events: {}", events.join(", "));
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "connection table: {} of {} entries ({:.1}% full), {} live flows",
        fmt_count(s.conntrack.entries),
        fmt_count(s.conntrack.capacity),
        s.conntrack.fill * 100.0,
        fmt_count(s.conntrack.live_flows)
    );
    let u = &s.conntrack.unanswered;
    let _ = writeln!(
        out,
        "unanswered table: {} of {} entries ({:.1}% full), {} of those flows",
        fmt_count(u.entries),
        fmt_count(u.capacity),
        u.fill * 100.0,
        fmt_count(u.live_flows)
    );
    out
}

/// The "interfaces:" block: one line per configured interface, e.g.
/// `  eth1  attached (xdp, ifindex 9) for 1.2s`.
fn render_interfaces(list: &[InterfaceStatus], now_ms: u64, out: &mut String) {
    if list.is_empty() {
        return;
    }
    out.push_str("interfaces:\n");
    let width = list.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for i in list {
        let _ = write!(
            out,
            "  {:width$}  {} ({}, ifindex {}) for {}",
            i.name,
            i.state,
            i.hook,
            i.ifindex,
            fmt_duration_ms(now_ms.saturating_sub(i.since_unix_ms))
        );
        if let Some(m) = &i.message {
            let _ = write!(out, ": {m}");
        }
        out.push('\n');
    }
}

/// `xdplb stats`.
pub fn run_stats(args: &StatsArgs) -> Result<()> {
    let interval = args.watch.map(Duration::from_secs_f64);
    let clear = interval.is_some() && !args.json && std::io::stdout().is_terminal();
    let mut prev: Option<Snapshot> = None;
    loop {
        let mut snap = match (take_snapshot(&args.pin_dir), &prev, interval) {
            (Ok(s), _, _) => s,
            // Once watching, a reading that fails (a daemon restart without
            // --persist removes and recreates the maps) is reported and
            // retried; only the first one decides the exit status.
            (Err(e), Some(_), Some(iv)) => {
                eprintln!(
                    "xdplb stats: {e:#} (retrying every {:.1}s)",
                    iv.as_secs_f64()
                );
                std::thread::sleep(iv);
                continue;
            }
            (Err(e), _, _) => return Err(e),
        };
        if let Some(p) = &prev {
            snap.add_rates(p);
        }
        let text = match (args.json, interval.is_some()) {
            (true, false) => format!("{}\n", serde_json::to_string_pretty(&snap)?),
            (true, true) => format!("{}\n", serde_json::to_string(&snap)?),
            (false, watch) => {
                let mut t = String::new();
                if clear {
                    // Home, clear screen: redraw in place.
                    t.push_str("\x1b[H\x1b[2J");
                }
                t.push_str(&render_text(&snap, watch));
                if watch && !clear {
                    t.push('\n');
                }
                t
            }
        };
        if !emit(&text)? {
            return Ok(());
        }
        let Some(iv) = interval else {
            return Ok(());
        };
        prev = Some(snap);
        std::thread::sleep(iv);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr, path::Path};

    use lb_common::{
        event, reason, Backend, Config, Conn, Counters, FlowKey, Service, ServiceKey,
        BACKEND_ACTIVE, BACKEND_DOWN, CONN_F_REVERSE, CONN_F_UNANSWERED, FAMILY_V4, PROTO_TCP,
        PROTO_UDP, TCP_STATE_CLOSING,
    };

    // The tests of the snapshot, the formats and `backends` as well: they
    // share these fixtures.
    use super::*;
    use crate::{
        dataplane::table::addr_bytes,
        report::{backends::*, format::*, snapshot::*},
        status::{self, BackendStatus, CheckStatus, ServiceStatus, Status},
    };

    const S: u64 = 1_000_000_000;

    fn c(p: u64, b: u64, n: u64) -> Counters {
        Counters {
            packets: p,
            bytes: b,
            new_flows: n,
        }
    }

    fn key(addr: &str, port: u16, proto: u8) -> ServiceKey {
        let (a, family) = addr_bytes(addr.parse().unwrap());
        ServiceKey {
            addr: a,
            port_be: port.to_be(),
            proto,
            family,
        }
    }

    fn backend(addr: &str, state: u8, service: u32) -> Backend {
        let a: SocketAddr = addr.parse().unwrap();
        let (bytes, family) = addr_bytes(a.ip());
        Backend {
            addr: bytes,
            port_be: a.port().to_be(),
            family,
            state,
            service,
        }
    }

    fn flow(sport: u16, proto: u8) -> FlowKey {
        FlowKey {
            sport_be: sport.to_be(),
            proto,
            family: FAMILY_V4,
            ..Default::default()
        }
    }

    fn conn(service: u32, backend: u32, last_seen: u64, flags: u8, tcp_state: u8) -> Conn {
        Conn {
            service,
            backend,
            last_seen_ns: last_seen,
            flags,
            tcp_state,
            ..Default::default()
        }
    }

    #[test]
    fn live_flows_follow_the_data_planes_timeouts() {
        // Explicit timeouts: the test is about the rule, not the defaults.
        let cfg = Config {
            tcp_timeout_ns: 3600 * S,
            closing_timeout_ns: 10 * S,
            udp_timeout_ns: 60 * S,
            ..Config::with_defaults()
        };
        let now = 10_000 * S;
        let mut n = ConnCounts::default();
        // open TCP, idle 3599 s: live
        n.add(
            &flow(1, PROTO_TCP),
            &conn(1, 2, now - 3599 * S, 0, 0),
            &cfg,
            now,
        );
        // open TCP, idle 3601 s: expired
        n.add(
            &flow(2, PROTO_TCP),
            &conn(1, 2, now - 3601 * S, 0, 0),
            &cfg,
            now,
        );
        // closing TCP, idle 11 s: expired
        n.add(
            &flow(3, PROTO_TCP),
            &conn(1, 3, now - 11 * S, 0, TCP_STATE_CLOSING),
            &cfg,
            now,
        );
        // UDP idle 59 s: live; a reverse entry never counts
        n.add(
            &flow(4, PROTO_UDP),
            &conn(2, 7, now - 59 * S, 0, 0),
            &cfg,
            now,
        );
        n.add(
            &flow(5, PROTO_TCP),
            &conn(1, 2, now, CONN_F_REVERSE, 0),
            &cfg,
            now,
        );
        // last_seen in the future (another CPU's clock read raced ours): live
        n.add(&flow(6, PROTO_TCP), &conn(1, 3, now + S, 0, 0), &cfg, now);
        assert_eq!(n.entries, 6);
        assert_eq!(n.live_flows, 3);
        assert_eq!(n.by_service, BTreeMap::from([(1, 2), (2, 1)]));
        assert_eq!(
            n.by_backend,
            BTreeMap::from([((1, 2), 1), ((1, 3), 1), ((2, 7), 1)])
        );
        // Not established yet: counted apart, with its own (shorter) timeout.
        let u = |seen| conn(1, 3, seen, CONN_F_UNANSWERED, 0);
        n.add(&flow(7, PROTO_TCP), &u(now - S), &cfg, now);
        n.add(&flow(8, PROTO_TCP), &u(now - 6 * S), &cfg, now);
        assert_eq!((n.entries, n.unanswered_entries), (6, 2));
        assert_eq!((n.live_flows, n.unanswered_flows), (4, 1));
    }

    fn view() -> MapsView {
        let mut conns = ConnCounts {
            entries: 6,
            live_flows: 3,
            unanswered_entries: 2,
            unanswered_flows: 1,
            ..Default::default()
        };
        conns.by_service.insert(1, 3);
        conns.by_backend.insert((1, 1), 2);
        conns.by_backend.insert((1, 2), 1);
        let mut reasons = vec![Counters::default(); reason::COUNT as usize];
        reasons[reason::FWD_REDIRECT as usize] = c(10, 1000, 0);
        reasons[reason::PASS_NO_SERVICE as usize] = c(2, 120, 0);
        MapsView {
            config: Config::with_defaults(),
            services: vec![(
                key("0.0.0.0", 80, PROTO_TCP),
                Service {
                    id: 1,
                    ..Default::default()
                },
            )],
            backends: vec![
                (1, backend("10.1.0.11:8080", BACKEND_ACTIVE, 1)),
                (2, backend("10.1.0.12:8080", BACKEND_DOWN, 1)),
            ],
            service_counters: BTreeMap::from([(1, c(10, 1000, 4))]),
            backend_counters: BTreeMap::from([(1, c(7, 700, 3)), (2, c(3, 300, 1))]),
            reasons,
            conns,
            conns_capacity: 1000,
            unanswered_capacity: 500,
            events: {
                let mut e = vec![0; event::COUNT as usize];
                e[event::ESTABLISHED as usize] = 4;
                e
            },
        }
    }

    fn status() -> Status {
        Status {
            version: status::STATUS_VERSION,
            pid: 4242,
            written_ms: 1_000_000,
            pin_dir: "/sys/fs/bpf/xdplb".into(),
            interfaces: Vec::new(),
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "0.0.0.0:80/tcp".into(),
                id: 1,
                backends_name: "tasks.web".into(),
                backends: vec![
                    BackendStatus {
                        addr: "10.1.0.11:8080".parse().unwrap(),
                        index: Some(1),
                        state: "active".into(),
                        reason: "2 checks passed".into(),
                        since_ms: 900_000,
                        last_check: Some(CheckStatus {
                            ok: true,
                            latency_us: 412,
                            detail: "connected".into(),
                            at_ms: 999_500,
                        }),
                        last_refused_ms: Some(999_700),
                    },
                    BackendStatus {
                        addr: "10.1.0.12:8080".parse().unwrap(),
                        index: Some(2),
                        state: "probing".into(),
                        reason: "new in DNS".into(),
                        since_ms: 998_000,
                        last_check: None,
                        last_refused_ms: None,
                    },
                    BackendStatus {
                        addr: "10.1.0.13:8080".parse().unwrap(),
                        index: None,
                        state: "probing".into(),
                        reason: "new in DNS".into(),
                        since_ms: 999_000,
                        last_check: None,
                        last_refused_ms: None,
                    },
                ],
                rejected: vec![status::RejectedStatus {
                    addr: "127.0.0.1".parse().unwrap(),
                    reason: "loopback address".into(),
                }],
                snat_addr: Some("10.1.0.1".parse().unwrap()),
                error: Some(status::ServiceError {
                    message: "no free backend slot".into(),
                    since_ms: 990_000,
                    attempts: 4,
                }),
                map_write_errors: 4,
                ..Default::default()
            }],
        }
    }

    /// The `stats --json` shape, pinned: a change here is a change of a
    /// documented interface (docs/OBSERVABILITY.md), so bump the version
    /// when a field changes meaning or disappears.
    #[test]
    fn stats_json_golden_without_daemon() {
        let d = Daemon::Missing {
            path: "/run/xdplb/x.status.json".into(),
        };
        let snap = Snapshot::build(&view(), &d, Path::new("/sys/fs/bpf/xdplb"), 1_000_400, 5);
        let mut json = serde_json::to_value(&snap).unwrap();
        // Keep the golden short: check the reasons apart.
        let reasons = json["reasons"].take();
        assert_eq!(reasons.as_array().unwrap().len(), reason::COUNT as usize);
        assert_eq!(
            reasons[reason::FWD_REDIRECT as usize],
            serde_json::json!({"name": "fwd_redirect", "kind": "fwd", "packets": 10, "bytes": 1000, "packets_per_sec": null})
        );
        assert_eq!(reasons[0]["kind"], "pass");
        assert_eq!(reasons[reason::DROP_NO_BACKEND as usize]["kind"], "drop");
        let want = serde_json::json!({
            "version": 1,
            "pin_dir": "/sys/fs/bpf/xdplb",
            "time_unix_ms": 1_000_400,
            "interval_secs": null,
            "daemon": {
                "running": false,
                "pid": null,
                "status_file": "/run/xdplb/x.status.json",
                "status_age_ms": null,
                "note": "the daemon isn't running (no status file /run/xdplb/x.status.json): services show as VIP:port/proto, backend states come from the maps",
                "interfaces": []
            },
            "services": [{
                "id": 1,
                "name": null,
                "listen": "0.0.0.0:80/tcp",
                "packets": 10, "bytes": 1000, "new_connections": 4, "active_connections": 3,
                "rates": null,
                "backends": [
                    {"index": 1, "addr": "10.1.0.11:8080", "state": "active", "dataplane_state": "active",
                     "reason": null, "state_since_unix_ms": null,
                     "packets": 7, "bytes": 700, "new_connections": 3, "active_connections": 2,
                     "new_connection_share": 0.75, "rates": null},
                    {"index": 2, "addr": "10.1.0.12:8080", "state": "down", "dataplane_state": "down",
                     "reason": null, "state_since_unix_ms": null,
                     "packets": 3, "bytes": 300, "new_connections": 1, "active_connections": 1,
                     "new_connection_share": 0.25, "rates": null}
                ]
            }],
            "reasons": null,
            "events": [
                {"name": "established", "count": 4, "per_sec": null},
                {"name": "non_syn_miss", "count": 0, "per_sec": null},
                {"name": "unanswered_expired", "count": 0, "per_sec": null},
                {"name": "rst_freed", "count": 0, "per_sec": null},
                {"name": "flood_guard_active", "count": 0, "per_sec": null},
                {"name": "flood_port_taken", "count": 0, "per_sec": null},
                {"name": "source_vouched", "count": 0, "per_sec": null}
            ],
            "conntrack": {"entries": 6, "capacity": 1000, "fill": 0.006, "live_flows": 3,
                "unanswered": {"entries": 2, "capacity": 500, "fill": 0.004, "live_flows": 1}}
        });
        assert_eq!(
            json,
            want,
            "got:\n{}",
            serde_json::to_string_pretty(&json).unwrap()
        );
    }

    #[test]
    fn daemon_status_supplies_names_states_and_unwritten_backends() {
        let snap = Snapshot::build(
            &view(),
            &Daemon::Running(status()),
            Path::new("/p"),
            1_000_400,
            5,
        );
        assert!(snap.daemon.running && snap.daemon.note.is_none());
        assert_eq!(snap.daemon.status_age_ms, Some(400));
        let s = &snap.services[0];
        assert_eq!((s.name.as_deref(), s.label()), (Some("web"), "web"));
        let rows: Vec<(String, Option<u32>, &str, Option<&str>)> = s
            .backends
            .iter()
            .map(|b| {
                (
                    b.addr.to_string(),
                    b.index,
                    b.state.as_str(),
                    b.dataplane_state.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("10.1.0.11:8080".into(), Some(1), "active", Some("active")),
                ("10.1.0.12:8080".into(), Some(2), "probing", Some("down")),
                ("10.1.0.13:8080".into(), None, "probing", None),
            ]
        );
        assert_eq!(s.backends[2].packets, 0);
        assert_eq!(s.backends[0].reason.as_deref(), Some("2 checks passed"));
    }

    #[test]
    fn rates_are_per_second_and_survive_counter_resets() {
        assert_eq!(rate(100, 300, 2.0), 100.0);
        assert_eq!(rate(300, 50, 0.5), 100.0, "a reset counts from zero");
        assert_eq!(rate(1, 2, 0.0), 0.0);
        let d = Daemon::Missing { path: "/x".into() };
        let prev = Snapshot::build(&view(), &d, Path::new("/p"), 0, 1_000_000_000);
        let mut v = view();
        v.service_counters.insert(1, c(30, 3000, 8));
        v.backend_counters.insert(1, c(27, 2700, 7));
        v.reasons[reason::FWD_REDIRECT as usize].packets = 30;
        let mut cur = Snapshot::build(&v, &d, Path::new("/p"), 0, 3_000_000_000);
        cur.add_rates(&prev);
        assert_eq!(cur.interval_secs, Some(2.0));
        assert_eq!(
            cur.services[0].rates,
            Some(Rates {
                packets_per_sec: 10.0,
                bytes_per_sec: 1000.0,
                new_connections_per_sec: 2.0
            })
        );
        assert_eq!(
            cur.services[0].backends[0].rates.unwrap().packets_per_sec,
            10.0
        );
        assert_eq!(
            cur.services[0].backends[1].rates.unwrap().packets_per_sec,
            0.0
        );
        assert_eq!(
            cur.reasons[reason::FWD_REDIRECT as usize].packets_per_sec,
            Some(10.0)
        );
        let text = render_text(&cur, true);
        assert!(text.contains("rates over the last 2.0s"), "{text}");
        assert!(text.contains("1000 B/s"), "{text}");
    }

    #[test]
    fn interfaces_block() {
        let iface = |name: &str, ifindex, state: &str, message: Option<&str>| InterfaceStatus {
            name: name.into(),
            ifindex,
            hook: "tc".into(),
            state: state.into(),
            message: message.map(String::from),
            since_unix_ms: 1_000,
        };
        let mut out = String::new();
        render_interfaces(
            &[
                iface("eth0", 2, "attached", None),
                iface("bond0", 7, "missing", Some("removed")),
            ],
            2_500,
            &mut out,
        );
        assert_eq!(
            out,
            "interfaces:\n  eth0   attached (tc, ifindex 2) for 1.5s\n  bond0  missing (tc, \
             ifindex 7) for 1.5s: removed\n"
        );
    }

    #[test]
    fn human_formats() {
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(1000), "1,000");
        assert_eq!(fmt_count(1_234_567), "1,234,567");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(1536.0), "1.5 KiB");
        assert_eq!(fmt_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(fmt_rate(0.5), "0.5");
        assert_eq!(fmt_rate(3400.0), "3.4k");
        assert_eq!(fmt_rate(1_200_000.0), "1.2M");
        assert_eq!(fmt_duration_ms(400), "0.4s");
        assert_eq!(fmt_duration_ms(42_000), "42s");
        assert_eq!(fmt_duration_ms(185_000), "3m05s");
        assert_eq!(fmt_duration_ms(7_620_000), "2h07m");
        assert_eq!(fmt_duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(fmt_latency_us(850), "850 µs");
        assert_eq!(fmt_latency_us(1234), "1.2 ms");
        assert_eq!(fmt_latency_us(37_000), "37 ms");
    }

    #[test]
    fn stats_text_table() {
        let snap = Snapshot::build(
            &view(),
            &Daemon::Running(status()),
            Path::new("/sys/fs/bpf/xdplb"),
            1_000_400,
            5,
        );
        let want = "\
xdplb stats: /sys/fs/bpf/xdplb, daemon pid 4242 (status written 0.4s ago)

SERVICE / BACKEND     STATE    PACKETS   BYTES  NEW CONNS  ACTIVE  SHARE
web (0.0.0.0:80/tcp)                10  1000 B          4       3
  10.1.0.11:8080      active         7   700 B          3       2  75.0%
  10.1.0.12:8080      probing        3   300 B          1       1  25.0%
  10.1.0.13:8080      probing        0     0 B          0       0   0.0%

REASON           PACKETS   BYTES
pass_no_service        2   120 B
fwd_redirect          10  1000 B
(26 reasons at zero not shown; --json lists all)
events: established 4

connection table: 6 of 1,000 entries (0.6% full), 3 live flows
unanswered table: 2 of 500 entries (0.4% full), 1 of those flows
";
        assert_eq!(render_text(&snap, false), want);
    }

    #[test]
    fn backends_report_json_golden_and_text() {
        let r = BackendsReport::from_status(&status(), 1_000_400);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["services"][0]["backends"][0],
            serde_json::json!({
                "addr": "10.1.0.11:8080", "index": 1, "state": "active",
                "reason": "2 checks passed", "since_unix_ms": 900_000, "in_state_ms": 100_400,
                "last_check": {"ok": true, "latency_us": 412, "detail": "connected",
                               "at_unix_ms": 999_500, "age_ms": 900},
                "last_refused_unix_ms": 999_700, "refused_ago_ms": 700
            })
        );
        assert_eq!(
            (&json["version"], &json["pid"], &json["written_unix_ms"]),
            (
                &serde_json::json!(1),
                &serde_json::json!(4242),
                &serde_json::json!(1_000_000)
            )
        );
        assert_eq!(
            json["services"][0]["backends"][2]["index"],
            serde_json::Value::Null
        );
        let text = r.render();
        let want = "\
SERVICE  BACKEND         STATE       FOR  LAST CHECK              REASON
web      10.1.0.11:8080  active    1m40s  ok in 412 µs, 0.9s ago  2 checks passed (refused a connection 0.7s ago)
web      10.1.0.12:8080  probing    2.4s  none yet                new in DNS
web      10.1.0.13:8080  probing    1.4s  none yet                new in DNS
web      127.0.0.1       rejected      -  -                       from DNS: loopback address
web: map update failing for 10s (4 attempts; the data plane keeps the last good table): no free backend slot
";
        assert_eq!(text, want);
        assert_eq!(
            json["services"][0]["rejected"],
            serde_json::json!([{"addr": "127.0.0.1", "reason": "loopback address"}])
        );
        assert_eq!(
            json["services"][0]["error"],
            serde_json::json!({"message": "no free backend slot", "since_unix_ms": 990_000,
                               "for_ms": 10_400, "attempts": 4})
        );
    }

    #[test]
    fn a_missing_status_names_the_file() {
        let d = Daemon::read(Path::new("/sys/fs/bpf/xdplb-unit-test-nothing-here"));
        assert!(matches!(d, Daemon::Missing { .. }), "{d:?}");
        assert!(d.note().unwrap().contains("isn't running"));
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
    }
}
