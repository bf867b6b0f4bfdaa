//! `xdplb explain`: which backend a flow goes to and why, computed from the
//! pinned maps with the data plane's own rules. Whether a flow's entry
//! carries the packet on and which backend a new flow gets are
//! `lb_common::decide`'s `usable` and `pick`, the very code the kernel runs
//! (lb-ebpf/src/conntrack.rs), as is the hash (`lb_common::hash::flow_hash`,
//! keyed from CONFIG); this file narrates what they report. The order of
//! the steps follows lb-ebpf/src/core.rs (`process`: reply path, then
//! service lookup, then the tables). What explain cannot know (the
//! interface a packet arrives on, whether the per-CPU flood guard is on) it
//! states as a condition. The root test tests/tests/differential.rs checks
//! on 100,000 random tables and packets that the kernel does what explain
//! says.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{bail, Result};
use lb_common::{
    decide::{self, Lookups, Owned, Unusable},
    hash::flow_hash,
    reason, AddrKey, Backend, Config, Conn, FlowKey, Service, ServiceKey, CONN_F_REVERSE,
    CONN_F_UNANSWERED, PROTO_TCP, TCP_STATE_CLOSING, TCP_STATE_RESET,
};
use serde::Serialize;

use crate::{
    dataplane::{
        pinned::PinnedMaps,
        table::{addr_bytes, ip_from_bytes},
    },
    report::{
        format::{backend_state_name, fmt_duration_ms, listen_of, proto_name},
        snapshot::Daemon,
    },
};

/// Version of the `--json` document (docs/OBSERVABILITY.md).
pub const EXPLAIN_JSON_VERSION: u32 = 1;

/// The lookups the data plane makes, so the logic runs against the pinned
/// maps or, in unit tests, against a fake table.
pub trait Tables {
    fn config(&self) -> Config;
    fn is_snat_addr(&self, key: &AddrKey) -> Result<bool>;
    fn service(&self, key: &ServiceKey) -> Result<Option<Service>>;
    /// `CONNS[key]`: established flows.
    fn conn(&self, key: &FlowKey) -> Result<Option<Conn>>;
    /// `UNANSWERED[key]`: flows not established yet.
    fn unanswered(&self, _key: &FlowKey) -> Result<Option<Conn>> {
        Ok(None)
    }
    /// `BACKENDS[index]`, `None` past the end.
    fn backend(&self, index: u32) -> Result<Option<Backend>>;
    /// `MAGLEV[slot]`, `None` past the end.
    fn maglev(&self, slot: u32) -> Result<Option<u32>>;
    /// `REFUSED[index]`: when the backend last refused a connection (0: never).
    fn refused_at(&self, _index: u32) -> Result<u64> {
        Ok(0)
    }
}

impl Tables for PinnedMaps {
    fn config(&self) -> Config {
        PinnedMaps::config(self)
    }
    fn is_snat_addr(&self, key: &AddrKey) -> Result<bool> {
        Ok(PinnedMaps::is_snat_addr(self, key)?)
    }
    fn service(&self, key: &ServiceKey) -> Result<Option<Service>> {
        Ok(PinnedMaps::service(self, key)?)
    }
    fn conn(&self, key: &FlowKey) -> Result<Option<Conn>> {
        Ok(PinnedMaps::conn(self, key)?)
    }
    fn unanswered(&self, key: &FlowKey) -> Result<Option<Conn>> {
        Ok(PinnedMaps::unanswered_conn(self, key)?)
    }
    fn backend(&self, index: u32) -> Result<Option<Backend>> {
        Ok(PinnedMaps::backend(self, index)?)
    }
    fn maglev(&self, slot: u32) -> Result<Option<u32>> {
        Ok(PinnedMaps::maglev_slot(self, slot)?)
    }
    fn refused_at(&self, index: u32) -> Result<u64> {
        Ok(PinnedMaps::refused_at(self, index)?)
    }
}

// ---- the data plane's rules, mirrored ---------------------------------------

fn backend_sock(b: &Backend) -> SocketAddr {
    SocketAddr::new(ip_from_bytes(&b.addr, b.family), u16::from_be(b.port_be))
}

/// The 5-tuple key the data plane builds for this packet (parse.rs `l4`).
pub fn flow_key(proto: u8, src: SocketAddr, dst: SocketAddr) -> FlowKey {
    let (s, family) = addr_bytes(src.ip());
    let (d, _) = addr_bytes(dst.ip());
    FlowKey {
        src: s,
        dst: d,
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

// ---- the explanation --------------------------------------------------------

/// What to explain.
#[derive(Clone, Debug)]
pub struct Query {
    pub proto: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The packet is a fresh SYN (SYN without ACK).
    pub syn: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub version: u32,
    pub proto: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub syn: bool,
    /// `reply` (destination is a SNAT address and port) or `forward`.
    pub path: &'static str,
    /// `forward`, `pass` or `drop`.
    pub verdict: &'static str,
    /// The `REASON_STATS` name for `pass` and `drop`.
    pub reason: Option<&'static str>,
    pub service: Option<ServiceMatch>,
    pub connection: Option<ConnInfo>,
    pub maglev: Option<MaglevInfo>,
    /// Where the packet goes (for `reply`: the backend of the flow).
    pub backend: Option<BackendRef>,
    /// Where the rewritten packet is sent: the backend, or for a reply the client.
    pub to: Option<SocketAddr>,
    /// A new flow's first SNAT port candidate (`lo + hash % range`).
    pub snat_first_port: Option<u16>,
    /// What the verdict depends on that the maps do not say (the interface
    /// a reply arrives on, the flood guard).
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceMatch {
    pub id: u32,
    pub name: Option<String>,
    pub listen: String,
    /// `exact` or `wildcard`.
    pub matched: &'static str,
    pub maglev_size: u32,
    pub active_half: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnInfo {
    /// `established` (CONNS) or `unanswered` (UNANSWERED).
    pub table: &'static str,
    pub reverse: bool,
    pub service_id: u32,
    pub backend_index: u32,
    /// The rewritten destination (the backend; for a reverse entry, the client).
    pub new_dst: SocketAddr,
    /// The rewritten source (SNAT address and port; for a reverse entry, the VIP).
    pub new_src: SocketAddr,
    /// `open`, `closing` or `reset` for TCP, absent for UDP.
    pub tcp_state: Option<&'static str>,
    /// The interface this direction's packets arrive on (a reverse entry's
    /// packets are accepted only there).
    pub ifindex: u32,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub timeout_ms: u64,
    pub expired: bool,
    /// Whether the data plane keeps using this entry.
    pub used: bool,
    pub why_not: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MaglevInfo {
    pub hash: u32,
    pub size: u32,
    pub half: u32,
    /// `MAGLEV` index of the active half's slot 0.
    pub base: u32,
    /// `hash % size`.
    pub first_slot: u32,
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Probe {
    /// Slot within the half.
    pub slot: u32,
    /// `MAGLEV` index read.
    pub map_index: u32,
    pub backend_index: Option<u32>,
    pub backend: Option<SocketAddr>,
    pub state: Option<String>,
    pub chosen: bool,
    pub why_not: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRef {
    pub index: u32,
    pub addr: SocketAddr,
    pub state: String,
}

fn ns_to_ms(ns: u64) -> u64 {
    ns / 1_000_000
}

/// The entry for `key`, established first (the order the data plane looks).
fn lookup(t: &impl Tables, key: &FlowKey) -> Result<Option<Conn>> {
    match t.conn(key)? {
        Some(c) => Ok(Some(c)),
        None => t.unanswered(key),
    }
}

/// Walks the data plane's decision for `q` (core.rs `process`).
pub fn explain(t: &impl Tables, q: &Query, now_ns: u64, names: &Names) -> Result<Explanation> {
    if q.src.is_ipv4() != q.dst.is_ipv4() {
        bail!(
            "--src {} and --dst {} are of different address families",
            q.src,
            q.dst
        );
    }
    if q.syn && q.proto != PROTO_TCP {
        // The kernel reads the flag from a TCP header only
        // (conntrack.rs `forward`: `proto == PROTO_TCP && is_fresh_syn`).
        bail!(
            "--syn applies to TCP only: a {} packet has no SYN flag, and the data plane \
             never treats one as the start of a connection",
            proto_name(q.proto)
        );
    }
    let key = flow_key(q.proto, q.src, q.dst);
    let cfg = t.config();
    let mut e = Explanation {
        version: EXPLAIN_JSON_VERSION,
        proto: proto_name(q.proto),
        src: q.src,
        dst: q.dst,
        syn: q.syn,
        path: "forward",
        verdict: "pass",
        reason: None,
        service: None,
        connection: None,
        maglev: None,
        backend: None,
        to: None,
        snat_first_port: None,
        note: None,
    };

    // Reply path first (core.rs `is_reply`, conntrack.rs `reply`).
    let dport = q.dst.port();
    let in_range = cfg.in_snat_range(dport);
    if in_range
        && t.is_snat_addr(&AddrKey {
            addr: key.dst,
            family: key.family,
            _pad: [0; 3],
        })?
    {
        e.path = "reply";
        match lookup(t, &key)? {
            Some(c) if c.flags & CONN_F_REVERSE != 0 => {
                e.connection = Some(conn_info(&c, &key, &cfg, now_ns, true, None));
                e.backend = backend_ref(t, c.backend)?;
                e.to = Some(sock(&c.new_dst, c.new_dport_be, key.family));
                e.verdict = "forward";
                e.note = Some(format!(
                    "if it arrives on interface {} (the flow's backend side); elsewhere it is \
                     dropped ({})",
                    c.ifindex,
                    reason::NAMES[reason::DROP_REPLY_WRONG_IFACE as usize]
                ));
            }
            other => {
                e.connection = other.map(|c| {
                    conn_info(
                        &c,
                        &key,
                        &cfg,
                        now_ns,
                        false,
                        Some("a forward entry, not a reply translation".into()),
                    )
                });
                e.verdict = "drop";
                e.reason = Some(reason::NAMES[reason::DROP_REPLY_NO_CONN as usize]);
            }
        }
        return Ok(e);
    }

    // Service: exact address, then the wildcard (`decide::find_service`).
    let mut skey = ServiceKey {
        addr: key.dst,
        port_be: key.dport_be,
        proto: key.proto,
        family: key.family,
    };
    let (svc, matched) = match decide::find_service(&mut skey, |k| t.service(k))? {
        Some((s, decide::Matched::Exact)) => (s, "exact"),
        Some((s, decide::Matched::Wildcard)) => (s, "wildcard"),
        None => {
            e.reason = Some(reason::NAMES[reason::PASS_NO_SERVICE as usize]);
            return Ok(e);
        }
    };
    e.service = Some(ServiceMatch {
        id: svc.id,
        name: names.service(svc.id),
        listen: listen_of(&skey),
        matched,
        maglev_size: svc.maglev_size,
        active_half: svc.active_half & 1,
    });

    // Connection tables (conntrack.rs `forward`, `usable`).
    let entry = lookup(t, &key)?;
    if let Some(c) = entry {
        let why_not = decide::usable(&Read(t), &c, svc.id, &cfg, key.proto, q.syn, now_ns)?
            .err()
            .map(|u| unusable(u, &c, &svc, t, now_ns))
            .transpose()?;
        let used = why_not.is_none();
        e.connection = Some(conn_info(&c, &key, &cfg, now_ns, used, why_not));
        if used {
            e.verdict = "forward";
            e.backend = backend_ref(t, c.backend)?;
            e.to = Some(sock(&c.new_dst, c.new_dport_be, key.family));
            return Ok(e);
        }
    }

    // A new flow (or a re-pick): Maglev (conntrack.rs `choose`, `pick`).
    if key.proto == PROTO_TCP && !q.syn && entry.is_none() {
        e.note = Some(format!(
            "not a fresh SYN: it starts an unanswered flow, or is dropped ({}) while the flood \
             guard is on, or if it carries RST ({})",
            reason::NAMES[reason::DROP_FLOOD_GUARD as usize],
            reason::NAMES[reason::DROP_RST_NO_CONN as usize]
        ));
    } else if q.syn && entry.is_none() && cfg.flood_new_flows_per_cpu != 0 {
        e.note = Some(format!(
            "while the flood guard is on (over {} new flows a second on one CPU), a fresh SYN \
             from a source that has not completed a handshake lately is dropped once ({}) and \
             passes when the client sends it again",
            cfg.flood_new_flows_per_cpu,
            reason::NAMES[reason::DROP_SYN_CHALLENGE as usize]
        ));
    }
    let hash = flow_hash(&key, &cfg.hash_key);
    let (maglev, chosen) = pick(t, &svc, hash, now_ns)?;
    e.maglev = Some(maglev);
    match chosen {
        Some((index, b)) => {
            e.verdict = "forward";
            e.backend = Some(BackendRef {
                index,
                addr: backend_sock(&b),
                state: backend_state_name(b.state),
            });
            e.to = Some(backend_sock(&b));
            let (lo, hi) = (svc.snat_port_lo as u32, svc.snat_port_hi as u32);
            if lo != 0 && hi >= lo {
                e.snat_first_port = Some((lo + hash % (hi - lo + 1)) as u16);
            }
        }
        None => {
            e.verdict = "drop";
            e.reason = Some(reason::NAMES[reason::DROP_NO_BACKEND as usize]);
        }
    }
    Ok(e)
}

/// `explain`'s tables as the shared rules read them.
struct Read<'a, T>(&'a T);

impl<T: Tables> Lookups for Read<'_, T> {
    type Error = anyhow::Error;
    type Backend = Owned<Backend>;
    fn maglev(&self, index: u32) -> Result<Option<u32>> {
        self.0.maglev(index)
    }
    fn backend(&self, index: u32) -> Result<Option<Owned<Backend>>> {
        Ok(self.0.backend(index)?.map(Owned))
    }
    fn refused_at(&self, index: u32) -> Result<u64> {
        self.0.refused_at(index)
    }
}

/// Why the flow's entry `c` is given up, in words.
fn unusable(u: Unusable, c: &Conn, svc: &Service, t: &impl Tables, now_ns: u64) -> Result<String> {
    let b = c.backend;
    Ok(match u {
        Unusable::Reverse => "it is a reverse entry".into(),
        Unusable::OtherService { service } => format!(
            "it belongs to service {service}, the packet matches service {}",
            svc.id
        ),
        Unusable::Expired => "it has expired".into(),
        Unusable::SynOnClosed { state } => format!(
            "a fresh SYN on a {} connection starts a new one",
            tcp_state_name(state)
        ),
        Unusable::PastBackends => format!("backend index {b} is past BACKENDS"),
        Unusable::Draining => {
            format!("its backend #{b} is draining: a fresh SYN starts a new connection")
        }
        Unusable::NotActive { state } => {
            format!("its backend #{b} is {}", backend_state_name(state))
        }
        Unusable::BackendMoved { service } => {
            format!("its backend #{b} now belongs to service {service}")
        }
        Unusable::BackendChanged => match t.backend(b)? {
            Some(now) => format!("backend #{b} is now {}, not the flow's", backend_sock(&now)),
            None => format!("backend index {b} is past BACKENDS"),
        },
        Unusable::Refused { at } => format!(
            "its backend #{b} refused a connection {} ms ago: a fresh SYN goes elsewhere",
            ns_to_ms(now_ns.saturating_sub(at))
        ),
    })
}

/// `decide::pick`, step by step: the active half's slot `hash % size` and
/// up to `MAGLEV_PROBES - 1` more, wrapping inside the half, until one holds
/// an `active` backend of this service that has not refused a connection
/// lately; failing that, the first active one that has.
pub fn pick(
    t: &impl Tables,
    svc: &Service,
    hash: u32,
    now_ns: u64,
) -> Result<(MaglevInfo, Option<(u32, Backend)>)> {
    let (base, first) = decide::maglev_start(svc, hash);
    let mut info = MaglevInfo {
        hash,
        size: svc.maglev_size,
        half: svc.active_half & 1,
        base: if svc.maglev_size == 0 { 0 } else { base },
        first_slot: first,
        probes: Vec::new(),
    };
    let chosen = decide::pick(&Read(t), svc, hash, now_ns, |p, b| {
        let why_not = match p.found {
            decide::Probe::PastEnd => Some("past the end of MAGLEV".into()),
            decide::Probe::Empty => Some("empty slot".into()),
            decide::Probe::PastBackends => Some("index past BACKENDS".into()),
            decide::Probe::NotActive { state } => {
                Some(format!("{}, not active", backend_state_name(state)))
            }
            decide::Probe::OtherService { service } => {
                Some(format!("belongs to service {service}"))
            }
            decide::Probe::Refused { at } => Some(format!(
                "refused a connection {} ms ago",
                ns_to_ms(now_ns.saturating_sub(at))
            )),
            decide::Probe::Taken => None,
        };
        info.probes.push(Probe {
            slot: p.slot,
            map_index: p.map_index,
            backend_index: (p.found != decide::Probe::PastEnd).then_some(p.backend),
            backend: b.map(backend_sock),
            state: b.map(|b| backend_state_name(b.state)),
            chosen: p.found == decide::Probe::Taken,
            why_not,
        });
    })?
    .map(|(index, b)| (index, b.0));
    // A fallback (every probe failed, one refused lately): that probe is
    // the one taken.
    if let Some((index, _)) = chosen {
        if !info.probes.iter().any(|p| p.chosen) {
            if let Some(p) = info
                .probes
                .iter_mut()
                .find(|p| p.backend_index == Some(index))
            {
                p.chosen = true;
                p.why_not = None;
            }
        }
    }
    Ok((info, chosen))
}

fn sock(addr: &[u8; 16], port_be: u16, family: u8) -> SocketAddr {
    SocketAddr::new(ip_from_bytes(addr, family), u16::from_be(port_be))
}

fn conn_info(
    c: &Conn,
    key: &FlowKey,
    cfg: &Config,
    now_ns: u64,
    used: bool,
    why_not: Option<String>,
) -> ConnInfo {
    ConnInfo {
        table: if c.flags & CONN_F_UNANSWERED != 0 {
            "unanswered"
        } else {
            "established"
        },
        reverse: c.flags & CONN_F_REVERSE != 0,
        service_id: c.service,
        backend_index: c.backend,
        new_dst: sock(&c.new_dst, c.new_dport_be, key.family),
        new_src: sock(&c.new_src, c.new_sport_be, key.family),
        tcp_state: (key.proto == PROTO_TCP).then(|| tcp_state_name(c.tcp_state)),
        ifindex: c.ifindex,
        age_ms: ns_to_ms(now_ns.saturating_sub(c.created_ns)),
        idle_ms: ns_to_ms(now_ns.saturating_sub(c.last_seen_ns)),
        timeout_ms: ns_to_ms(c.idle_timeout_ns(key.proto, cfg)),
        expired: c.expired(key.proto, cfg, now_ns),
        used,
        why_not,
    }
}

fn tcp_state_name(state: u8) -> &'static str {
    match state {
        TCP_STATE_CLOSING => "closing",
        TCP_STATE_RESET => "reset",
        _ => "open",
    }
}

fn backend_ref(t: &impl Tables, index: u32) -> Result<Option<BackendRef>> {
    Ok(t.backend(index)?.map(|b| BackendRef {
        index,
        addr: backend_sock(&b),
        state: backend_state_name(b.state),
    }))
}

/// Service names from the daemon's status, when it runs.
#[derive(Clone, Debug, Default)]
pub struct Names {
    services: Vec<(u32, String)>,
}

impl Names {
    pub fn from_daemon(d: &Daemon) -> Self {
        Self {
            services: d
                .status()
                .map(|s| s.services.iter().map(|s| (s.id, s.name.clone())).collect())
                .unwrap_or_default(),
        }
    }

    pub fn service(&self, id: u32) -> Option<String> {
        self.services
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.clone())
    }
}

// ---- text -------------------------------------------------------------------

/// The explanation for people, one fact per line.
pub fn render(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "flow      {} {} -> {}{}",
        e.proto,
        e.src,
        e.dst,
        if e.syn { " (fresh SYN)" } else { "" }
    );
    if e.path == "reply" {
        let _ = writeln!(
            s,
            "path      reply: {} is a SNAT address and port {} is in the SNAT range",
            e.dst.ip(),
            e.dst.port()
        );
        match (&e.connection, e.verdict) {
            (Some(c), "forward") => {
                let _ = writeln!(
                    s,
                    "table     {} reverse entry: source := {}, destination := {} (backend #{}, service {}), {}",
                    c.table,
                    c.new_src,
                    c.new_dst,
                    c.backend_index,
                    c.service_id,
                    ages(c)
                );
            }
            _ => {
                let _ = writeln!(s, "table     no reverse entry for this 5-tuple");
            }
        }
        if let Some(n) = &e.note {
            let _ = writeln!(s, "note      {n}");
        }
        verdict_line(&mut s, e);
        return s;
    }
    let Some(svc) = &e.service else {
        let _ = writeln!(
            s,
            "service   none: no service listens on {} ({}) nor on the wildcard address",
            e.dst, e.proto
        );
        verdict_line(&mut s, e);
        return s;
    };
    let _ = writeln!(
        s,
        "service   #{}{} {} ({} match), Maglev size {}, active half {}",
        svc.id,
        svc.name
            .as_ref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default(),
        svc.listen,
        svc.matched,
        svc.maglev_size,
        svc.active_half
    );
    match &e.connection {
        None => {
            let _ = writeln!(s, "table     no entry for this 5-tuple: a new flow");
        }
        Some(c) => {
            let _ = writeln!(
                s,
                "table     {} entry: backend #{} {}, SNAT {}, {}{}",
                c.table,
                c.backend_index,
                c.new_dst,
                c.new_src,
                c.tcp_state.map(|t| format!("{t}, ")).unwrap_or_default(),
                ages(c)
            );
            match &c.why_not {
                None => {
                    let _ = writeln!(s, "          the flow keeps its backend");
                }
                Some(w) => {
                    let _ = writeln!(s, "          not used ({w}): picked again as a new flow");
                }
            }
        }
    }
    if let Some(m) = &e.maglev {
        let _ = writeln!(s, "hash      flow_hash = {} ({:#010x})", m.hash, m.hash);
        if m.size == 0 {
            let _ = writeln!(s, "maglev    the service has no table (size 0)");
        } else {
            let _ = writeln!(
                s,
                "maglev    slot {} = {} % {} in half {} (MAGLEV[{}])",
                m.first_slot,
                m.hash,
                m.size,
                m.half,
                m.base.wrapping_add(m.first_slot)
            );
        }
        for (i, p) in m.probes.iter().enumerate() {
            let what = match (p.backend_index, p.backend) {
                (Some(idx), Some(a)) => {
                    format!("backend #{idx} {a} ({})", p.state.as_deref().unwrap_or("?"))
                }
                (Some(0), None) => "no backend".into(),
                (Some(idx), None) => format!("backend #{idx}"),
                (None, _) => "nothing".into(),
            };
            let verdict = if p.chosen {
                "chosen".to_string()
            } else {
                format!("skipped: {}", p.why_not.as_deref().unwrap_or("?"))
            };
            let _ = writeln!(s, "  probe {i}  slot {} -> {what}: {verdict}", p.slot);
        }
    }
    if let Some(p) = e.snat_first_port {
        let _ = writeln!(
            s,
            "snat      first source port tried: {p} (then the next free one)"
        );
    }
    if let Some(n) = &e.note {
        let _ = writeln!(s, "note      {n}");
    }
    verdict_line(&mut s, e);
    s
}

fn ages(c: &ConnInfo) -> String {
    format!(
        "age {}, last seen {} ago (idle timeout {}){}",
        fmt_duration_ms(c.age_ms),
        fmt_duration_ms(c.idle_ms),
        fmt_duration_ms(c.timeout_ms),
        if c.expired { ", expired" } else { "" }
    )
}

fn verdict_line(s: &mut String, e: &Explanation) {
    let line = match (e.verdict, &e.backend, e.to) {
        ("forward", Some(b), Some(to)) if e.path == "reply" => {
            format!(
                "forward to the client {to} (reply from backend #{} {})",
                b.index, b.addr
            )
        }
        ("forward", _, Some(to)) if e.path == "reply" => format!("forward to the client {to}"),
        ("forward", Some(b), _) => {
            let how = match &e.connection {
                Some(c) if c.used => "existing connection",
                _ => "new connection",
            };
            format!("forward to backend #{} {} ({how})", b.index, b.addr)
        }
        (v, _, _) => format!(
            "{} ({}): {}",
            v,
            e.reason.unwrap_or("?"),
            match e.reason {
                Some("pass_no_service") => "the packet goes to the stack unchanged",
                Some("drop_reply_no_conn") => {
                    "no flow holds this SNAT port (the stack would answer with a reset)"
                }
                Some("drop_no_backend") => "no active backend within the probed slots",
                _ => "",
            }
        ),
    };
    let _ = writeln!(s, "verdict   {line}");
}

/// `xdplb explain`.
pub fn run(args: &crate::cli::ExplainArgs) -> Result<()> {
    let maps = PinnedMaps::open(&args.pin_dir)?;
    let daemon = Daemon::read(&args.pin_dir);
    let q = Query {
        proto: args.proto.number(),
        src: args.src,
        dst: args.dst,
        syn: args.syn,
    };
    let e = explain(
        &maps,
        &q,
        crate::clock::monotonic_now_ns(),
        &Names::from_daemon(&daemon),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", render(&e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lb_common::{
        BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, FAMILY_V4, MAGLEV_PROBES, PROTO_UDP,
        TCP_STATE_OPEN,
    };

    use super::*;

    /// An in-memory data plane: what the maps would hold.
    #[derive(Default)]
    struct Fake {
        cfg: Config,
        snat: Vec<AddrKey>,
        services: HashMap<ServiceKey, Service>,
        conns: HashMap<FlowKey, Conn>,
        unanswered: HashMap<FlowKey, Conn>,
        backends: Vec<Backend>,
        maglev: Vec<u32>,
        refused: HashMap<u32, u64>,
    }

    impl Tables for Fake {
        fn config(&self) -> Config {
            self.cfg
        }
        fn is_snat_addr(&self, key: &AddrKey) -> Result<bool> {
            Ok(self.snat.contains(key))
        }
        fn service(&self, key: &ServiceKey) -> Result<Option<Service>> {
            Ok(self.services.get(key).copied())
        }
        fn conn(&self, key: &FlowKey) -> Result<Option<Conn>> {
            Ok(self.conns.get(key).copied())
        }
        fn unanswered(&self, key: &FlowKey) -> Result<Option<Conn>> {
            Ok(self.unanswered.get(key).copied())
        }
        fn backend(&self, index: u32) -> Result<Option<Backend>> {
            Ok(self.backends.get(index as usize).copied())
        }
        fn maglev(&self, slot: u32) -> Result<Option<u32>> {
            Ok(self.maglev.get(slot as usize).copied())
        }
        fn refused_at(&self, index: u32) -> Result<u64> {
            Ok(self.refused.get(&index).copied().unwrap_or(0))
        }
    }

    const SIZE: u32 = 13;
    const KEY: [u64; 2] = [0x1234, 0x5678];
    const SECOND: u64 = 1_000_000_000;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn backend(addr: &str, state: u8, service: u32) -> Backend {
        let a = v4(addr);
        let (bytes, family) = addr_bytes(a.ip());
        Backend {
            addr: bytes,
            port_be: a.port().to_be(),
            family,
            state,
            service,
        }
    }

    /// Service 1 on 10.0.0.100:80/tcp, backends #1..#3, half 1 active with
    /// the slots `1, 2, 3, 1, 2, 3, ...` (half 0 all empty).
    fn fake() -> Fake {
        let mut f = Fake {
            cfg: Config {
                snat_port_min: 40000,
                snat_port_max: 40999,
                // Explicit, so the tests do not follow the defaults.
                closing_timeout_ns: 10 * SECOND,
                unanswered_timeout_ns: 5 * SECOND,
                hash_key: KEY,
                ..Config::with_defaults()
            },
            ..Default::default()
        };
        let (snat, _) = addr_bytes("10.1.0.1".parse().unwrap());
        f.snat.push(AddrKey {
            addr: snat,
            family: FAMILY_V4,
            _pad: [0; 3],
        });
        let svc = Service {
            id: 1,
            flags: 0,
            maglev_base: 0,
            maglev_size: SIZE,
            active_half: 1,
            snat_port_lo: 40000,
            snat_port_hi: 40999,
            snat_addr: snat,
        };
        let (vip, family) = addr_bytes("10.0.0.100".parse().unwrap());
        f.services.insert(
            ServiceKey {
                addr: vip,
                port_be: 80u16.to_be(),
                proto: PROTO_TCP,
                family,
            },
            svc,
        );
        f.backends = vec![
            Backend::default(),
            backend("10.1.0.11:8080", BACKEND_ACTIVE, 1),
            backend("10.1.0.12:8080", BACKEND_ACTIVE, 1),
            backend("10.1.0.13:8080", BACKEND_ACTIVE, 1),
        ];
        f.maglev = vec![0; SIZE as usize];
        f.maglev.extend((0..SIZE).map(|i| i % 3 + 1));
        f
    }

    fn query(src: &str) -> Query {
        Query {
            proto: PROTO_TCP,
            src: v4(src),
            dst: v4("10.0.0.100:80"),
            syn: false,
        }
    }

    fn run(f: &Fake, q: &Query) -> Explanation {
        explain(f, q, 100 * SECOND, &Names::default()).expect("explain")
    }

    #[test]
    fn new_flow_takes_the_slot_hash_mod_size_of_the_active_half() {
        let f = fake();
        let q = query("10.0.0.2:40000");
        let e = run(&f, &q);
        let hash = flow_hash(&flow_key(PROTO_TCP, q.src, q.dst), &KEY);
        let m = e.maglev.as_ref().expect("a new flow goes through Maglev");
        assert_eq!((m.hash, m.first_slot, m.base), (hash, hash % SIZE, SIZE));
        let want = f.maglev[(SIZE + hash % SIZE) as usize];
        assert_eq!(e.backend.as_ref().map(|b| b.index), Some(want), "{e:#?}");
        assert_eq!(m.probes.len(), 1, "the first slot was active: {e:#?}");
        assert_eq!(e.verdict, "forward");
        assert_eq!(e.snat_first_port, Some(40000 + (hash % 1000) as u16));
        assert_eq!(e.service.as_ref().unwrap().matched, "exact");
    }

    #[test]
    fn probing_skips_non_active_and_foreign_backends_and_wraps() {
        let mut f = fake();
        let q = query("10.0.0.2:40001");
        let hash = flow_hash(&flow_key(PROTO_TCP, q.src, q.dst), &KEY);
        let first = hash % SIZE;
        // Put the walk at the end of the half, so it wraps to slot 0.
        let slots: Vec<u32> = (0..4).map(|i| (first + i) % SIZE).collect();
        f.backends.push(backend("10.1.0.14:8080", BACKEND_DOWN, 1)); // #4
        f.backends
            .push(backend("10.1.0.15:8080", BACKEND_ACTIVE, 2)); // #5
        f.backends
            .push(backend("10.1.0.16:8080", BACKEND_DRAINING, 1)); // #6
        f.backends
            .push(backend("10.1.0.17:8080", BACKEND_ACTIVE, 1)); // #7
        for (s, b) in slots.iter().zip([4, 5, 6, 0]) {
            f.maglev[(SIZE + s) as usize] = b;
        }
        f.maglev[(SIZE + (first + 4) % SIZE) as usize] = 7;
        let e = run(&f, &q);
        let m = e.maglev.as_ref().unwrap();
        let seen: Vec<(u32, Option<u32>, bool)> = m
            .probes
            .iter()
            .map(|p| (p.slot, p.backend_index, p.chosen))
            .collect();
        let want: Vec<(u32, Option<u32>, bool)> = vec![
            (slots[0], Some(4), false),
            (slots[1], Some(5), false),
            (slots[2], Some(6), false),
            (slots[3], Some(0), false),
            ((first + 4) % SIZE, Some(7), true),
        ];
        assert_eq!(seen, want, "probe sequence; explanation:\n{}", render(&e));
        assert_eq!(e.backend.unwrap().index, 7);
        assert_eq!(m.probes[1].why_not.as_deref(), Some("belongs to service 2"));
    }

    #[test]
    fn no_active_backend_within_the_probes_drops() {
        let mut f = fake();
        for b in &mut f.backends[1..] {
            b.state = BACKEND_DOWN;
        }
        let e = run(&f, &query("10.0.0.2:40002"));
        assert_eq!((e.verdict, e.reason), ("drop", Some("drop_no_backend")));
        assert_eq!(e.maglev.unwrap().probes.len(), MAGLEV_PROBES as usize);
    }

    #[test]
    fn a_backend_that_refused_lately_is_passed_over_unless_all_did() {
        let mut f = fake();
        let q = query("10.0.0.2:40005");
        let hash = flow_hash(&flow_key(PROTO_TCP, q.src, q.dst), &KEY);
        let first = f.maglev[(SIZE + hash % SIZE) as usize];
        // `run` looks at 100 s; 0.3 s ago is inside the 1 s hold.
        f.refused.insert(first, 100 * SECOND - 300_000_000);
        let e = run(&f, &q);
        let m = e.maglev.as_ref().unwrap();
        assert_eq!(
            m.probes[0].why_not.as_deref(),
            Some("refused a connection 300 ms ago"),
            "{e:#?}"
        );
        assert_ne!(e.backend.as_ref().unwrap().index, first);
        // 1.5 s ago: over.
        f.refused.insert(first, 100 * SECOND - 1_500_000_000);
        assert_eq!(run(&f, &q).backend.unwrap().index, first);
        // Every backend refused lately: the first candidate after all.
        for i in 1..=3 {
            f.refused.insert(i, 100 * SECOND - 1);
        }
        let e = run(&f, &q);
        assert_eq!(e.verdict, "forward");
        assert_eq!(e.backend.as_ref().unwrap().index, first, "{e:#?}");
        assert!(e.maglev.unwrap().probes[0].chosen);
    }

    #[test]
    fn syn_is_refused_for_udp_as_the_kernel_never_sees_one() {
        let f = fake();
        let mut q = query("10.0.0.2:40007");
        q.proto = PROTO_UDP;
        q.syn = true;
        let err = explain(&f, &q, 100 * SECOND, &Names::default())
            .expect_err("a UDP packet with --syn")
            .to_string();
        assert!(err.contains("--syn applies to TCP only"), "{err}");
        q.syn = false;
        assert_eq!(run(&f, &q).proto, "udp");
    }

    #[test]
    fn a_fresh_syn_leaves_a_draining_or_refusing_backends_entry() {
        let mut q = query("10.0.0.2:40006");
        let mut f = fake();
        entry(&mut f, &q, 2, TCP_STATE_OPEN, 90 * SECOND);
        f.backends[2].state = BACKEND_DRAINING;
        assert!(run(&f, &q).connection.unwrap().used, "an ACK stays");
        q.syn = true;
        let e = run(&f, &q);
        let c = e.connection.unwrap();
        assert!(!c.used);
        assert!(c.why_not.unwrap().contains("draining"));
        f.backends[2].state = BACKEND_ACTIVE;
        assert!(
            run(&f, &q).connection.unwrap().used,
            "a retransmitted SYN stays"
        );
        f.refused.insert(2, 100 * SECOND - 1);
        let c = run(&f, &q).connection.unwrap();
        assert!(!c.used && c.why_not.unwrap().contains("refused"));
    }

    fn entry(f: &mut Fake, q: &Query, backend: u32, state: u8, last_seen: u64) {
        let b = f.backends[backend as usize];
        f.conns.insert(
            flow_key(q.proto, q.src, q.dst),
            Conn {
                new_src: f.snat[0].addr,
                new_dst: b.addr,
                new_sport_be: 40123u16.to_be(),
                new_dport_be: b.port_be,
                backend,
                service: 1,
                flags: 0,
                tcp_state: state,
                _pad: [0; 2],
                ifindex: 0,
                seq: 0,
                last_seen_ns: last_seen,
                created_ns: 40 * SECOND,
            },
        );
    }

    #[test]
    fn a_live_entry_keeps_its_backend_even_when_maglev_says_otherwise() {
        let mut f = fake();
        let q = query("10.0.0.2:40003");
        let hash = flow_hash(&flow_key(PROTO_TCP, q.src, q.dst), &KEY);
        let maglev_choice = f.maglev[(SIZE + hash % SIZE) as usize];
        let other = maglev_choice % 3 + 1;
        entry(&mut f, &q, other, TCP_STATE_OPEN, 90 * SECOND);
        let e = run(&f, &q);
        let c = e.connection.as_ref().unwrap();
        assert!(c.used && e.maglev.is_none(), "{e:#?}");
        assert_eq!(e.backend.as_ref().unwrap().index, other);
        assert_eq!((c.age_ms, c.idle_ms), (60_000, 10_000));
        assert_eq!(c.new_src, v4("10.1.0.1:40123"));
        let text = render(&e);
        for want in [
            "table     established entry: backend #",
            "SNAT 10.1.0.1:40123, open, age 1m00s, last seen 10s ago (idle timeout 1h00m)",
            "the flow keeps its backend",
            "(existing connection)",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn down_backend_expired_entry_and_syn_on_closing_are_repicked() {
        let q = query("10.0.0.2:40004");
        // Down backend.
        let mut f = fake();
        entry(&mut f, &q, 2, TCP_STATE_OPEN, 90 * SECOND);
        f.backends[2].state = BACKEND_DOWN;
        let e = run(&f, &q);
        assert_eq!(
            e.connection.as_ref().unwrap().why_not.as_deref(),
            Some("its backend #2 is down")
        );
        assert!(e.maglev.is_some());
        // Draining keeps the flow.
        f.backends[2].state = BACKEND_DRAINING;
        assert!(run(&f, &q).connection.unwrap().used);
        // Expired: closing timeout is 10 s; idle 11 s.
        let mut f = fake();
        entry(&mut f, &q, 2, TCP_STATE_CLOSING, 89 * SECOND);
        let e = run(&f, &q);
        let c = e.connection.unwrap();
        assert!(c.expired && !c.used, "{c:#?}");
        // Fresh SYN on a closing (not yet expired) entry.
        let mut f = fake();
        entry(&mut f, &q, 2, TCP_STATE_CLOSING, 95 * SECOND);
        assert!(run(&f, &q).connection.unwrap().used);
        let e = run(&f, &Query { syn: true, ..q });
        assert!(!e.connection.unwrap().used);
    }

    #[test]
    fn wildcard_and_no_service() {
        let mut f = fake();
        let (k, s) = f.services.drain().next().unwrap();
        f.services.insert(ServiceKey { addr: [0; 16], ..k }, s);
        let e = run(&f, &query("10.0.0.2:40005"));
        assert_eq!(e.service.unwrap().matched, "wildcard");
        let e = explain(
            &f,
            &Query {
                dst: v4("10.0.0.100:81"),
                ..query("10.0.0.2:40005")
            },
            0,
            &Names::default(),
        )
        .unwrap();
        assert_eq!((e.verdict, e.reason), ("pass", Some("pass_no_service")));
        assert!(render(&e).contains("no service listens on 10.0.0.100:81"));
    }

    #[test]
    fn replies_to_snat_ports_take_the_reply_path() {
        let mut f = fake();
        let q = Query {
            proto: PROTO_TCP,
            src: v4("10.1.0.12:8080"),
            dst: v4("10.1.0.1:40123"),
            syn: false,
        };
        let e = run(&f, &q);
        assert_eq!(
            (e.path, e.verdict, e.reason),
            ("reply", "drop", Some("drop_reply_no_conn"))
        );
        f.conns.insert(
            flow_key(q.proto, q.src, q.dst),
            Conn {
                new_src: addr_bytes("10.0.0.100".parse().unwrap()).0,
                new_dst: addr_bytes("10.0.0.2".parse().unwrap()).0,
                new_sport_be: 80u16.to_be(),
                new_dport_be: 40003u16.to_be(),
                backend: 2,
                service: 1,
                flags: CONN_F_REVERSE,
                ..Default::default()
            },
        );
        let e = run(&f, &q);
        assert_eq!(e.verdict, "forward");
        assert_eq!(e.to, Some(v4("10.0.0.2:40003")));
        assert!(render(&e).contains("forward to the client 10.0.0.2:40003"));
        assert!(e.note.unwrap().contains("interface 0"));
    }

    #[test]
    fn unanswered_flows_are_found_and_expire_sooner() {
        let mut f = fake();
        let q = query("10.0.0.2:40007");
        entry(&mut f, &q, 2, TCP_STATE_OPEN, 94 * SECOND);
        let key = flow_key(q.proto, q.src, q.dst);
        let mut c = f.conns.remove(&key).unwrap();
        c.flags |= CONN_F_UNANSWERED;
        f.unanswered.insert(key, c);
        let e = run(&f, &q);
        let info = e.connection.as_ref().unwrap();
        assert_eq!((info.table, info.timeout_ms), ("unanswered", 5_000));
        assert!(info.expired && !info.used, "idle 6 s > 5 s: {e:#?}");
        assert!(render(&e).contains("table     unanswered entry"));
        // Idle 1 s: still used.
        f.unanswered.get_mut(&key).unwrap().last_seen_ns = 99 * SECOND;
        assert!(run(&f, &q).connection.unwrap().used);
        // A TCP segment other than a fresh SYN that misses: the guard note.
        let e = run(&f, &query("10.0.0.2:40008"));
        assert!(e.note.unwrap().contains("drop_flood_guard"));
        let e = run(
            &f,
            &Query {
                syn: true,
                ..query("10.0.0.2:40008")
            },
        );
        assert!(e.note.is_none());
        // With the flood guard configured, a fresh SYN's note names the
        // challenge.
        f.cfg.flood_new_flows_per_cpu = 5_000;
        let syn = Query {
            syn: true,
            ..query("10.0.0.2:40008")
        };
        let note = run(&f, &syn).note.unwrap();
        assert!(
            note.contains("drop_syn_challenge") && note.contains("5000"),
            "{note}"
        );
        assert!(render(&run(&f, &syn)).contains("drop_syn_challenge"));
    }

    #[test]
    fn a_reset_connection_expires_like_an_unanswered_one() {
        let mut f = fake();
        let q = query("10.0.0.2:40009");
        entry(&mut f, &q, 2, TCP_STATE_RESET, 99 * SECOND);
        let e = run(&f, &q);
        let c = e.connection.unwrap();
        assert_eq!(
            (c.tcp_state, c.timeout_ms, c.used),
            (Some("reset"), 5_000, true)
        );
        let e = run(&f, &Query { syn: true, ..q });
        assert!(e.connection.unwrap().why_not.unwrap().contains("reset"));
    }

    #[test]
    fn mixed_families_are_refused() {
        let q = Query {
            dst: "[fd00::100]:80".parse().unwrap(),
            ..query("10.0.0.2:1")
        };
        assert!(explain(&fake(), &q, 0, &Names::default()).is_err());
    }
}
