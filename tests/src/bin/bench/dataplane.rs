//! Data-plane cost per packet (§1) and its dependence on table sizes (§2).
//!
//! Method (DESIGN.md, "Measuring the data plane"): `BPF_PROG_TEST_RUN` with
//! repeat = 1 in a warm loop, the kernel-reported duration of each run, the
//! median over many runs. `repeat > 1` is unusable for a rewriting program on
//! this kernel: the packet is not reset between repeats, so from the second
//! repeat on the program would time its own output.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{Conn, FlowKey, FAMILY_V4, PROTO_TCP, PROTO_UDP};
use tests::packet::{
    backend_v4, backend_v6, is_back_side, view, Hook, PacketLab, Pkt, BACK_MAC, CLIENT_V4,
    CLIENT_V6, FRONT_MAC, SNAT_PORTS, TCP_ACK, TCP_SYN, VIP_V4, VIP_V6,
};

/// Medians of one measured case.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: u64,
    pub p90: u64,
    pub verdict: u32,
}

/// `struct __sk_buff` up to `ifindex`: ingress_ifindex (offset 36) = 1, the
/// loopback the skb sits on, as it would be on ingress.
const TC_CTX: [u8; 44] = {
    let mut c = [0u8; 44];
    c[36] = 1;
    c
};

/// A frame from a back-side address (a backend's reply) arrives on `back`:
/// the data plane takes a backend's packets only on the interface the flow's
/// backend is reached by. Others arrive on the loopback.
fn from_back(frame: &[u8]) -> bool {
    view(frame).is_some_and(|v| is_back_side(v.ip.src))
}

fn run_once(lab: &mut PacketLab, hook: Hook, frame: &[u8], out: &mut [u8]) -> Result<(u32, u64)> {
    let back = from_back(frame);
    run_on_side(lab, hook, frame, back, out)
}

/// [`run_once`] with the side already known (the measured loops decide it
/// once per frame, so no parsing runs between two measured runs).
fn run_on_side(
    lab: &mut PacketLab,
    hook: Hook,
    frame: &[u8],
    back: bool,
    out: &mut [u8],
) -> Result<(u32, u64)> {
    let mut tc_ctx = TC_CTX;
    let xdp_md: [u8; 24];
    if back {
        tc_ctx[36..40].copy_from_slice(&lab.back_ifindex.to_le_bytes());
    }
    let ctx_in = match hook {
        Hook::Tc => Some(&tc_ctx[..]),
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, .. }.
        Hook::Xdp if back => {
            let mut md = [0u8; 24];
            md[4..8].copy_from_slice(&(frame.len() as u32).to_le_bytes());
            md[12..16].copy_from_slice(&lab.back_ifindex.to_le_bytes());
            xdp_md = md;
            Some(&xdp_md[..])
        }
        Hook::Xdp => None,
    };
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in,
        repeat: 1,
        ..Default::default()
    };
    let dp = lab.dp_mut();
    let r = match hook {
        Hook::Xdp => dp.xdp().test_run(opts),
        Hook::Tc => dp.tc().test_run(opts),
    }?;
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

fn summarize(mut d: Vec<u64>, verdict: u32) -> Stats {
    d.sort_unstable();
    Stats {
        median: d[d.len() / 2],
        p90: d[d.len() * 9 / 10],
        verdict,
    }
}

/// What happens after each measured new-flow SYN (not timed).
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// Nothing: the flow waits for its backend for the rest of the run, as
    /// a flood's flows do.
    Nothing,
    /// The backend answers it (a bare ACK from its address to the SNAT pair
    /// the SYN left with), which establishes the flow as a real handshake
    /// does: `UNANSWERED` then holds only flows in their handshake, as it
    /// does in service, and `CONNS` the rest.
    Answer,
}

/// The backend's answer to the forwarded packet `out` (its own address to
/// the SNAT pair the packet left with), or None if `out` was not forwarded
/// to a backend.
fn answer_to(out: &[u8]) -> Option<Vec<u8>> {
    let v = view(out)?;
    let (sport, dport) = v.ports?;
    if !is_back_side(v.ip.dst) {
        return None;
    }
    let backend = SocketAddr::new(v.ip.dst, dport);
    let snat = SocketAddr::new(v.ip.src, sport);
    Some(
        Pkt::tcp(backend, snat, TCP_ACK)
            .with_eth(BACK_MAC, BACK_MAC)
            .build(),
    )
}

/// Runs `frames` in order, in blocks that alternate with blocks of the empty
/// XDP program on the first frame, so both see the same machine: these
/// machines are shared, and their speed moves by tens of percent within
/// seconds. The first `warm` runs of the case warm the caches and are not
/// counted; a single frame is reused for every run. `after` says what
/// follows each run, untimed. Returns the case's statistics and the empty
/// program's, measured in between.
fn measure(
    lab: &mut PacketLab,
    hook: Hook,
    frames: &[Vec<u8>],
    runs: usize,
    after: After,
) -> Result<(Stats, Stats)> {
    const BLOCK: usize = 500;
    let mut out = vec![0u8; 2048];
    let mut answer_out = vec![0u8; 2048];
    let warm = warm_runs(runs);
    let mut durations = Vec::with_capacity(runs);
    let mut empty = Vec::with_capacity(runs);
    let mut verdict = 0;
    let mut empty_verdict = 0;
    let sides: Vec<bool> = frames.iter().map(|f| from_back(f)).collect();
    for i in 0..warm + runs {
        let frame = &frames[i % frames.len()];
        let (v, ns) = run_on_side(lab, hook, frame, sides[i % frames.len()], &mut out)?;
        if after == After::Answer {
            let answer = answer_to(&out).with_context(|| {
                format!(
                    "a measured SYN was not forwarded (verdict {})",
                    hook.action_name(v)
                )
            })?;
            run_on_side(lab, hook, &answer, true, &mut answer_out)?;
        }
        if i >= warm {
            durations.push(ns);
            verdict = v;
            if durations.len() % BLOCK == 0 || durations.len() == runs {
                let prog = baseline_prog(lab, "bench_empty")?;
                for _ in 0..durations.len() - empty.len() {
                    let (v, ns) = run_prog(prog, &frames[0], &mut out)?;
                    empty.push(ns);
                    empty_verdict = v;
                }
            }
        }
    }
    Ok((
        summarize(durations, verdict),
        summarize(empty, empty_verdict),
    ))
}

fn run_prog(prog: &Xdp, frame: &[u8], out: &mut [u8]) -> Result<(u32, u64)> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        repeat: 1,
        ..Default::default()
    };
    let r = prog.test_run(opts)?;
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

fn warm_runs(runs: usize) -> usize {
    runs / 10
}

/// Loads one of the baseline programs of the object (`bench_empty`,
/// `bench_macswap`) and measures it on `frame`.
pub fn measure_baseline(
    lab: &mut PacketLab,
    name: &str,
    frame: &[u8],
    runs: usize,
) -> Result<Stats> {
    let prog = baseline_prog(lab, name)?;
    let mut out = vec![0u8; 2048];
    let mut durations = Vec::with_capacity(runs);
    let mut verdict = 0;
    for i in 0..runs + warm_runs(runs) {
        let (v, ns) = run_prog(prog, frame, &mut out)?;
        if i >= warm_runs(runs) {
            durations.push(ns);
            verdict = v;
        }
    }
    Ok(summarize(durations, verdict))
}

/// A baseline program of the object, loaded on first use.
pub fn baseline_prog<'a>(lab: &'a mut PacketLab, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = lab
        .dp_mut()
        .ebpf_mut()
        .program_mut(name)
        .with_context(|| format!("object has no program {name}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    Ok(prog)
}

fn eth(p: Pkt) -> Vec<u8> {
    p.with_eth(FRONT_MAC, FRONT_MAC).build()
}

fn addr_of(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

/// Every flow of the lab must be established (in CONNS) before a case that
/// measures one.
fn established(lab: &PacketLab) -> Result<()> {
    let (conns, unanswered) = lab.entries();
    if unanswered != 0 || conns == 0 {
        anyhow::bail!(
            "the measured flows are not established ({conns} entries in CONNS, {unanswered} in \
             UNANSWERED):\n{}",
            lab.dump_conns()
        );
    }
    Ok(())
}

/// The backend's UDP answer to a flow, addressed to its SNAT pair.
fn udp_reply_frame(lab: &PacketLab, key: &FlowKey) -> Result<Vec<u8>> {
    let conn = lab.conn(key).context("the flow was not created")?;
    let backend = SocketAddr::new(
        addr_of(&conn.new_dst, key.family),
        u16::from_be(conn.new_dport_be),
    );
    let snat = SocketAddr::new(
        addr_of(&conn.new_src, key.family),
        u16::from_be(conn.new_sport_be),
    );
    Ok(Pkt::udp(backend, snat, b"0123456789abcdef")
        .with_eth(BACK_MAC, BACK_MAC)
        .build())
}

/// The backend's answer to an established flow, addressed to its SNAT pair.
fn reply_frame(lab: &PacketLab, key: &FlowKey) -> Result<Vec<u8>> {
    let conn = lab.conn(key).context("the flow was not created")?;
    let backend = SocketAddr::new(
        addr_of(&conn.new_dst, key.family),
        u16::from_be(conn.new_dport_be),
    );
    let snat = SocketAddr::new(
        addr_of(&conn.new_src, key.family),
        u16::from_be(conn.new_sport_be),
    );
    Ok(Pkt::tcp(backend, snat, TCP_ACK)
        .with_eth(BACK_MAC, BACK_MAC)
        .build())
}

/// Distinct new-flow SYNs to the VIP's `vip_port`: `n` client (address,
/// port) pairs that no other case uses, `lane` keeping the sets of
/// different cases apart.
fn syns(lane: u8, v6: bool, vip_port: u16, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let port = 1024 + (i % 60_000) as u16;
            let hi = (i / 60_000) as u16;
            let (client, vip) = if v6 {
                (
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, lane as u16 + 1, hi, 2)),
                    SocketAddr::new(VIP_V6.into(), vip_port),
                )
            } else {
                (
                    IpAddr::V4(Ipv4Addr::new(10, 2 + lane, hi as u8, 2)),
                    SocketAddr::new(VIP_V4.into(), vip_port),
                )
            };
            eth(Pkt::tcp(SocketAddr::new(client, port), vip, TCP_SYN))
        })
        .collect()
}

pub struct CaseResult {
    pub name: String,
    pub hook: Hook,
    pub stats: Stats,
    /// The empty XDP program, measured in blocks between the case's.
    pub empty: Stats,
}

pub struct CostResults {
    pub runs: usize,
    pub syn_runs: usize,
    pub empty: Stats,
    pub macswap: Stats,
    pub cases: Vec<CaseResult>,
    /// The established IPv4 TCP frame and its reason, for the live-frames run.
    pub established_v4: Vec<u8>,
}

impl CostResults {
    pub fn find(&self, name: &str, hook: Hook) -> Option<&CaseResult> {
        self.cases.iter().find(|c| c.name == name && c.hook == hook)
    }
}

pub const ESTABLISHED_V4: &str = "established TCP IPv4";
pub const NEW_FLOW_V4: &str = "new-flow SYN IPv4";

/// Connection-table capacity of the §1 lab: room for every SYN case's flows
/// (two entries each) without LRU evictions.
pub const COST_LAB_CONNS: u32 = 1 << 20;

/// The ten backends (:8080) of every service the data-plane sections add.
fn ten_backends(v6: bool) -> Vec<SocketAddr> {
    ten_backends_on(v6, 8080)
}

/// The same ten backend addresses on `port`: a service whose flows hold
/// SNAT ports of their own (a reverse entry's key holds the backend port).
fn ten_backends_on(v6: bool, port: u16) -> Vec<SocketAddr> {
    (11..=20)
        .map(|n| {
            let ip: IpAddr = if v6 {
                backend_v6(n).into()
            } else {
                backend_v4(n).into()
            };
            SocketAddr::new(ip, port)
        })
        .collect()
}

/// §1: every case on both hooks, IPv4 and IPv6, beside the baselines.
pub fn per_packet(
    lab: &mut PacketLab,
    runs: usize,
    mut progress: impl FnMut(&str),
) -> Result<CostResults> {
    // One CPU for every run, as a NIC's receive queue keeps a flow on one:
    // a thread the scheduler moves between runs makes each run on a new
    // CPU refill that CPU's share of the LRU maps' free lists, and the
    // new-flow cases moved by half from run to run.
    lab.stay_on_one_cpu();
    let vip4 = SocketAddr::new(VIP_V4.into(), 80);
    let vip6 = SocketAddr::new(VIP_V6.into(), 80);
    let vip4_udp = SocketAddr::new(VIP_V4.into(), 53);
    let vip6_udp = SocketAddr::new(VIP_V6.into(), 53);
    lab.add_service(vip4, PROTO_TCP, SNAT_PORTS, &ten_backends(false));
    lab.add_service(vip6, PROTO_TCP, SNAT_PORTS, &ten_backends(true));
    lab.add_service(vip4_udp, PROTO_UDP, SNAT_PORTS, &ten_backends(false));
    lab.add_service(vip6_udp, PROTO_UDP, SNAT_PORTS, &ten_backends(true));
    // The never-answered SYN cases: a service of their own, so the flows
    // they leave waiting take no SNAT port from the answered cases'.
    let waiting = 443;
    for (vip, v6) in [(VIP_V4.into(), false), (VIP_V6.into(), true)] {
        let vip = SocketAddr::new(vip, waiting);
        lab.add_service(vip, PROTO_TCP, SNAT_PORTS, &ten_backends_on(v6, 8081));
    }

    let c4 = SocketAddr::new(CLIENT_V4.into(), 33000);
    let c6 = SocketAddr::new(CLIENT_V6.into(), 33000);
    let ack4 = eth(Pkt::tcp(c4, vip4, TCP_ACK));
    let ack6 = eth(Pkt::tcp(c6, vip6, TCP_ACK));
    let udp4 = eth(Pkt::udp(c4, vip4_udp, b"0123456789abcdef"));
    let udp6 = eth(Pkt::udp(c6, vip6_udp, b"0123456789abcdef"));
    let other4 = eth(Pkt::tcp(c4, SocketAddr::new(VIP_V4.into(), 81), TCP_ACK));
    let other6 = eth(Pkt::tcp(c6, SocketAddr::new(VIP_V6.into(), 81), TCP_ACK));

    // Establish the flows (a SYN, or the first datagram), learn the reply
    // tuples, and have the backend answer: a TCP flow is established by the
    // backend's first segment without SYN, a UDP flow by the client's
    // datagram after the backend's answer. Every case then measures the
    // established path (CONNS), as traffic that lasts takes it.
    let setup = |lab: &mut PacketLab| -> Result<(Vec<u8>, Vec<u8>)> {
        let mut out = vec![0u8; 2048];
        for f in [
            eth(Pkt::tcp(c4, vip4, TCP_SYN)),
            eth(Pkt::tcp(c6, vip6, TCP_SYN)),
            udp4.clone(),
            udp6.clone(),
        ] {
            run_once(lab, Hook::Xdp, &f, &mut out)?;
        }
        let reply4 = reply_frame(lab, &Pkt::tcp(c4, vip4, TCP_ACK).flow_key())?;
        let reply6 = reply_frame(lab, &Pkt::tcp(c6, vip6, TCP_ACK).flow_key())?;
        let udp_answer4 = udp_reply_frame(lab, &Pkt::udp(c4, vip4_udp, b"").flow_key())?;
        let udp_answer6 = udp_reply_frame(lab, &Pkt::udp(c6, vip6_udp, b"").flow_key())?;
        for f in [&reply4, &reply6, &udp_answer4, &udp_answer6, &udp4, &udp6] {
            run_once(lab, Hook::Xdp, f, &mut out)?;
        }
        established(lab)?;
        Ok((reply4, reply6))
    };
    let (mut reply4, mut reply6) = setup(lab)?;

    // New flows use SNAT ports from a 10,000-port range per backend; keep
    // the SYN cases of one service together well under that (10 backends
    // x 10,000).
    let syn_runs = runs.min(20_000);
    let syn_frames = syn_runs + warm_runs(syn_runs);

    progress("baselines");
    let empty = measure_baseline(lab, "bench_empty", &ack4, runs)?;
    let macswap = measure_baseline(lab, "bench_macswap", &ack4, runs)?;

    let mut cases = Vec::new();
    for (h, hook) in [Hook::Xdp, Hook::Tc].into_iter().enumerate() {
        let lane = h as u8;
        if h > 0 {
            // Each hook starts from the same tables: the flows the first
            // hook's SYN cases established would otherwise make the
            // second's new flows walk longer hash chains (hundreds of ns).
            lab.dp_mut().clear_flows()?;
            (reply4, reply6) = setup(lab)?;
        }
        let (plain, answer) = (After::Nothing, After::Answer);
        let list: [(&str, Vec<Vec<u8>>, After); 12] = [
            (ESTABLISHED_V4, vec![ack4.clone()], plain),
            ("established TCP IPv6", vec![ack6.clone()], plain),
            (NEW_FLOW_V4, syns(lane, false, 80, syn_frames), answer),
            (
                "new-flow SYN IPv6",
                syns(lane, true, 80, syn_frames),
                answer,
            ),
            (
                "unanswered SYN IPv4",
                syns(2 + lane, false, waiting, syn_frames),
                plain,
            ),
            (
                "unanswered SYN IPv6",
                syns(2 + lane, true, waiting, syn_frames),
                plain,
            ),
            ("reply path TCP IPv4", vec![reply4.clone()], plain),
            ("reply path TCP IPv6", vec![reply6.clone()], plain),
            ("established UDP IPv4", vec![udp4.clone()], plain),
            ("established UDP IPv6", vec![udp6.clone()], plain),
            ("non-service pass IPv4", vec![other4.clone()], plain),
            ("non-service pass IPv6", vec![other6.clone()], plain),
        ];
        for (name, frames, after) in list {
            progress(&format!("{name} ({hook:?})"));
            let n = if frames.len() > 1 { syn_runs } else { runs };
            // Every answered flow must have left UNANSWERED (counted only
            // around those cases: reading a table walks all of it).
            let waiting_before = (after == answer).then(|| lab.entries().1);
            let (stats, empty) = measure(lab, hook, &frames, n, after)?;
            if let Some(before) = waiting_before {
                let now_waiting = lab.entries().1;
                if now_waiting != before {
                    anyhow::bail!(
                        "{name} ({hook:?}): {} flows still unanswered after their backends' \
                         answers",
                        now_waiting.saturating_sub(before) / 2
                    );
                }
            }
            if after == plain && frames.len() > 1 {
                // The flows this case left waiting: their timeout removes
                // them within seconds in service. Kept, they would hold a
                // third of UNANSWERED for the rest of the run, and every
                // later new-flow case would pay for the longer hash chains
                // (the second hook's more than the first's).
                lab.dp_mut().clear_unanswered()?;
            }
            cases.push(CaseResult {
                name: name.to_string(),
                hook,
                stats,
                empty,
            });
        }
    }
    Ok(CostResults {
        runs,
        syn_runs,
        empty,
        macswap,
        cases,
        established_v4: ack4,
    })
}

/// Adds a TCP service at `vip` and establishes one flow from `client`
/// through the XDP program (its SYN, then the backend's answer); returns the
/// flow's next client frame, a bare ACK.
fn establish(
    lab: &mut PacketLab,
    vip: SocketAddr,
    backends: &[SocketAddr],
    client: SocketAddr,
) -> Result<Vec<u8>> {
    lab.add_service(vip, PROTO_TCP, SNAT_PORTS, backends);
    let mut out = vec![0u8; 2048];
    run_once(
        lab,
        Hook::Xdp,
        &eth(Pkt::tcp(client, vip, TCP_SYN)),
        &mut out,
    )?;
    let reply = reply_frame(lab, &Pkt::tcp(client, vip, TCP_ACK).flow_key())?;
    run_once(lab, Hook::Xdp, &reply, &mut out)?;
    established(lab)?;
    Ok(eth(Pkt::tcp(client, vip, TCP_ACK)))
}

/// One stage of §1b.
pub struct Step {
    pub name: &'static str,
    pub stats: Stats,
    pub empty: Stats,
}

/// §1b's stages: the established IPv4 TCP packet's run ends after each in
/// turn (`lb_common::BENCH_STOP_*`; 0 runs the whole path).
/// An established flow's packet finds its service through its flow
/// (`SERVICE_AT`), so it has no stage of its own for the `SERVICES`
/// lookup.
pub const STEPS: [(&str, u32); 5] = [
    (
        "parse: service-port filter, scratch, Ethernet, IP, TCP",
        lb_common::BENCH_STOP_PARSE,
    ),
    (
        "connection table: CONNS, the flow's service and backend",
        lb_common::BENCH_STOP_CONNS,
    ),
    (
        "next hop: NEXT_HOPS (FIB on a miss)",
        lb_common::BENCH_STOP_ROUTE,
    ),
    (
        "rewrite: addresses, ports, checksums, TTL",
        lb_common::BENCH_STOP_REWRITE,
    ),
    ("counters and send (the whole path)", 0),
];

/// §1b: where the established IPv4 TCP packet's time goes on `hook`. Each
/// stage runs in a lab of its own, loaded to end the run after it, with the
/// same service and the same flow (copied from a lab that established it:
/// the stopped programs could not).
pub fn breakdown(hook: Hook, runs: usize, progress: impl FnMut(&str)) -> Result<Vec<Step>> {
    let vip4 = SocketAddr::new(VIP_V4.into(), 80);
    let backends = ten_backends(false);
    let c4 = SocketAddr::new(CLIENT_V4.into(), 33000);
    let (entries, ack4) = {
        let mut lab = PacketLab::try_new("bench-steps")?;
        let ack4 = establish(&mut lab, vip4, &backends, c4)?;
        (lab.dp().conns()?, vec![ack4])
    };
    let setup = |lab: &mut PacketLab| -> Result<()> {
        lab.add_service(vip4, PROTO_TCP, SNAT_PORTS, &backends);
        for (k, c) in &entries {
            lab.dp_mut().insert_conn(k, c)?;
        }
        Ok(())
    };
    staged(&STEPS, hook, runs, 65_536, &ack4, setup, progress)
}

/// One lab per stage, loaded to end each run after it, set up by `setup`
/// and fed `frames`: the rows of §1b and §1c.
fn staged(
    stages: &[(&'static str, u32)],
    hook: Hook,
    runs: usize,
    conns_capacity: u32,
    frames: &[Vec<u8>],
    mut setup: impl FnMut(&mut PacketLab) -> Result<()>,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for &(name, stop) in stages {
        progress(&format!("{name} ({hook:?})"));
        let mut lab = PacketLab::with_bench_stop("bench-steps", conns_capacity, stop, Some(hook))?;
        lab.stay_on_one_cpu();
        setup(&mut lab)?;
        let (stats, empty) = measure(&mut lab, hook, frames, runs, After::Nothing)?;
        steps.push(Step { name, stats, empty });
    }
    Ok(steps)
}

/// §1c's stages: a new flow's SYN (IPv4) ends after each in turn. A
/// fresh SYN skips the established path's shortcut, so its `CONNS` miss
/// is in the second stage.
pub const SYN_STEPS: [(&str, u32); 8] = [
    ("parse and service lookup", lb_common::BENCH_STOP_SERVICE),
    (
        "table misses: CONNS, UNANSWERED, flood guard",
        lb_common::BENCH_STOP_MISS,
    ),
    (
        "backend choice: flow hash, Maglev, BACKENDS, REFUSED",
        lb_common::BENCH_STOP_CHOOSE,
    ),
    ("next hop", lb_common::BENCH_STOP_NEW_ROUTE),
    (
        "SNAT port: the reverse entry into UNANSWERED",
        lb_common::BENCH_STOP_RESERVE,
    ),
    (
        "the forward entry into UNANSWERED",
        lb_common::BENCH_STOP_ROUTE,
    ),
    ("rewrite", lb_common::BENCH_STOP_REWRITE),
    ("counters and send (the whole path)", 0),
];

/// §1c: where a new flow's SYN (IPv4) spends its time on `hook`: one fresh
/// lab per stage, loaded to end the run after it, each fed the same
/// distinct SYNs (so every stage sees the tables fill the same way).
pub fn syn_breakdown(hook: Hook, runs: usize, progress: impl FnMut(&str)) -> Result<Vec<Step>> {
    let vip4 = SocketAddr::new(VIP_V4.into(), 80);
    let backends = ten_backends(false);
    let runs = runs.min(20_000);
    let frames = syns(0, false, 80, runs + warm_runs(runs));
    let setup = |lab: &mut PacketLab| -> Result<()> {
        lab.add_service(vip4, PROTO_TCP, SNAT_PORTS, &backends);
        Ok(())
    };
    staged(
        &SYN_STEPS,
        hook,
        runs,
        COST_LAB_CONNS,
        &frames,
        setup,
        progress,
    )
}

/// One point of a scaling series.
pub struct ScalePoint {
    pub size: usize,
    pub established: Stats,
    pub empty: Stats,
}

/// A synthetic forward entry: client 172.16/12 address `i`, to the VIP.
fn synthetic_conn(i: u32) -> (FlowKey, Conn) {
    let client = Ipv4Addr::from(0xac10_0000 | (i >> 8 & 0x000f_ffff));
    let key = Pkt::tcp(
        SocketAddr::new(client.into(), 1024 + (i & 0xff) as u16),
        SocketAddr::new(VIP_V4.into(), 80),
        TCP_ACK,
    )
    .flow_key();
    let mut conn = Conn {
        new_sport_be: (40000 + (i % 10_000) as u16).to_be(),
        new_dport_be: 8080u16.to_be(),
        backend: 1,
        service: 1,
        ..Default::default()
    };
    conn.new_src[..4].copy_from_slice(&tests::packet::SNAT_V4.octets());
    conn.new_dst[..4].copy_from_slice(&backend_v4(11).octets());
    (key, conn)
}

/// §2a: established IPv4 TCP with CONNS holding `sizes` entries in turn.
pub fn conns_scaling(
    sizes: &[usize],
    runs: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<ScalePoint>> {
    let largest = sizes.iter().copied().max().unwrap_or(0);
    // Twice the entries, so the LRU map never has to evict at the largest size.
    let capacity = (2 * largest).next_power_of_two().max(65_536) as u32;
    let mut lab = PacketLab::with_conns_capacity("bench-conns", capacity);
    let vip4 = SocketAddr::new(VIP_V4.into(), 80);
    let backends = ten_backends(false);
    let c4 = SocketAddr::new(CLIENT_V4.into(), 33000);
    let ack4 = vec![establish(&mut lab, vip4, &backends, c4)?];
    // The measured flow's two entries count toward the size.
    let mut filled = 2usize;
    let mut points = Vec::new();
    for &size in sizes {
        progress(&format!("filling CONNS to {size} entries"));
        while filled < size {
            let (k, c) = synthetic_conn(filled as u32);
            lab.dp_mut().insert_conn(&k, &c)?;
            filled += 1;
        }
        progress(&format!("established TCP IPv4 with {size} CONNS entries"));
        let (established, empty) = measure(&mut lab, Hook::Xdp, &ack4, runs, After::Nothing)?;
        points.push(ScalePoint {
            size,
            established,
            empty,
        });
    }
    Ok(points)
}

/// §2b: established IPv4 TCP in services of `counts` backends.
pub fn backends_scaling(
    counts: &[usize],
    runs: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<ScalePoint>> {
    let mut lab = PacketLab::try_new("bench-backends")?;
    let mut points = Vec::new();
    for (k, &count) in counts.iter().enumerate() {
        progress(&format!("service with {count} backends"));
        let vip = SocketAddr::new(VIP_V4.into(), 8000 + k as u16);
        // Ten neighbour addresses exist on the lab's back side: the backends
        // are their (address, port) pairs.
        let backends: Vec<SocketAddr> = (0..count)
            .map(|i| {
                SocketAddr::new(
                    backend_v4(11 + (i % 10) as u8).into(),
                    1024 + (i / 10) as u16,
                )
            })
            .collect();
        let client = SocketAddr::new(CLIENT_V4.into(), 34000 + k as u16);
        let ack = vec![establish(&mut lab, vip, &backends, client)?];
        let (established, empty) = measure(&mut lab, Hook::Xdp, &ack, runs, After::Nothing)?;
        points.push(ScalePoint {
            size: count,
            established,
            empty,
        });
    }
    Ok(points)
}
