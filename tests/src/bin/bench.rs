//! `cargo xtask bench`: data-plane cost per packet, beside baselines measured
//! in the same run.
//!
//! Method (DESIGN.md, "Measuring the data plane"): `BPF_PROG_TEST_RUN` with
//! repeat = 1 in a warm loop, the kernel-reported duration of each run, the
//! median over many runs. `repeat > 1` is unusable for a rewriting program on
//! this kernel: the packet is not reset between repeats, so from the second
//! repeat on the program would time its own output.
//!
//! Every figure is printed beside the empty XDP program (the harness floor)
//! and the ratio is the headline; these machines are too noisy for absolute
//! numbers to mean much.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{PROTO_TCP, PROTO_UDP};
use tests::packet::{
    backend_v4, backend_v6, Hook, PacketLab, Pkt, BACK_MAC, CLIENT_V4, CLIENT_V6, FRONT_MAC,
    SNAT_PORTS, TCP_ACK, TCP_SYN, VIP_V4, VIP_V6,
};

struct Args {
    quick: bool,
    runs: usize,
}

fn parse_args() -> Result<Args> {
    let mut quick = false;
    let mut runs = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--runs" => runs = Some(it.next().context("--runs needs a number")?.parse()?),
            "-h" | "--help" => {
                println!(
                    "bench [--quick] [--runs N]\n\n\
                     Measures xdplb's per-packet cost with BPF_PROG_TEST_RUN (repeat = 1, kernel-\n\
                     reported duration, median of N runs) beside an empty XDP program and a\n\
                     MAC-swap XDP_TX program loaded from the same object in the same run.\n\
                     --quick uses 10,000 runs per case (default 50,000). Needs root."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let runs = runs.unwrap_or(if quick { 10_000 } else { 50_000 });
    Ok(Args { quick, runs })
}

/// One measured case: the frames it cycles through and where it runs.
struct Case {
    name: &'static str,
    hook: Hook,
    frames: Vec<Vec<u8>>,
}

struct Stats {
    median: u64,
    p90: u64,
    verdict: u32,
}

const TC_CTX: [u8; 44] = {
    let mut c = [0u8; 44];
    c[36] = 1; // __sk_buff.ingress_ifindex = loopback, as on ingress
    c
};

fn run_once(lab: &mut PacketLab, hook: Hook, frame: &[u8], out: &mut [u8]) -> Result<(u32, u64)> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: (hook == Hook::Tc).then_some(&TC_CTX[..]),
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

fn run_prog_once(prog: &Xdp, frame: &[u8], out: &mut [u8]) -> Result<(u32, u64)> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        repeat: 1,
        ..Default::default()
    };
    let r = prog.test_run(opts)?;
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

fn measure(lab: &mut PacketLab, case: &Case, runs: usize) -> Result<Stats> {
    let mut out = vec![0u8; 2048];
    // Warm-up runs: a tenth of the measured ones. A case that cycles through
    // distinct frames (new-flow SYNs) only has `frames - runs` spare frames,
    // so every measured SYN still misses the connection table.
    let warm = if case.frames.len() > 1 {
        (runs / 10).min(case.frames.len().saturating_sub(runs))
    } else {
        runs / 10
    };
    let mut durations = Vec::with_capacity(runs);
    let mut verdict = 0;
    for i in 0..warm + runs {
        let frame = &case.frames[i % case.frames.len()];
        let (v, ns) = run_once(lab, case.hook, frame, &mut out)?;
        if i >= warm {
            durations.push(ns);
            verdict = v;
        }
    }
    Ok(summarize(durations, verdict))
}

fn measure_baseline(lab: &mut PacketLab, name: &str, frame: &[u8], runs: usize) -> Result<Stats> {
    let ebpf = lab.dp_mut().ebpf_mut();
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("object has no program {name}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    let mut out = vec![0u8; 2048];
    let mut durations = Vec::with_capacity(runs);
    let mut verdict = 0;
    for i in 0..runs + runs / 10 {
        let (v, ns) = run_prog_once(prog, frame, &mut out)?;
        if i >= runs / 10 {
            durations.push(ns);
            verdict = v;
        }
    }
    Ok(summarize(durations, verdict))
}

fn client(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let mut lab =
        PacketLab::try_new("bench").context("setting up the bench lab (are you root?)")?;
    let backends_v4: Vec<SocketAddr> = (11..=20)
        .map(|n| SocketAddr::new(backend_v4(n).into(), 8080))
        .collect();
    let backends_v6: Vec<SocketAddr> = (11..=20)
        .map(|n| SocketAddr::new(backend_v6(n).into(), 8080))
        .collect();
    let vip4 = SocketAddr::new(VIP_V4.into(), 80);
    let vip6 = SocketAddr::new(VIP_V6.into(), 80);
    let vip4_udp = SocketAddr::new(VIP_V4.into(), 53);
    lab.add_service(vip4, PROTO_TCP, SNAT_PORTS, &backends_v4);
    lab.add_service(vip6, PROTO_TCP, SNAT_PORTS, &backends_v6);
    lab.add_service(vip4_udp, PROTO_UDP, SNAT_PORTS, &backends_v4);

    let c4 = client(CLIENT_V4.into(), 33000);
    let c6 = client(CLIENT_V6.into(), 33000);
    let syn4 = Pkt::tcp(c4, vip4, TCP_SYN)
        .with_eth(FRONT_MAC, FRONT_MAC)
        .build();
    let ack4 = Pkt::tcp(c4, vip4, TCP_ACK)
        .with_eth(FRONT_MAC, FRONT_MAC)
        .build();
    let ack6 = Pkt::tcp(c6, vip6, TCP_ACK)
        .with_eth(FRONT_MAC, FRONT_MAC)
        .build();
    let udp4 = Pkt::udp(c4, vip4_udp, b"0123456789abcdef")
        .with_eth(FRONT_MAC, FRONT_MAC)
        .build();
    let other = Pkt::tcp(c4, SocketAddr::new(VIP_V4.into(), 81), TCP_ACK)
        .with_eth(FRONT_MAC, FRONT_MAC)
        .build();

    // Establish the flows, then learn the reply tuple of the IPv4 one.
    let mut out = vec![0u8; 2048];
    for f in [&syn4, &ack6, &udp4] {
        run_once(&mut lab, Hook::Xdp, f, &mut out)?;
    }
    let key4 = Pkt::tcp(c4, vip4, TCP_ACK).flow_key();
    let conn = lab.conn(&key4).context("the IPv4 flow was not created")?;
    let backend = SocketAddr::new(
        IpAddr::from([
            conn.new_dst[0],
            conn.new_dst[1],
            conn.new_dst[2],
            conn.new_dst[3],
        ]),
        u16::from_be(conn.new_dport_be),
    );
    let snat = SocketAddr::new(
        IpAddr::from([
            conn.new_src[0],
            conn.new_src[1],
            conn.new_src[2],
            conn.new_src[3],
        ]),
        u16::from_be(conn.new_sport_be),
    );
    let reply4 = Pkt::tcp(backend, snat, TCP_ACK)
        .with_eth(BACK_MAC, BACK_MAC)
        .build();

    // New flows: a distinct client port per run (wrapping the client
    // address when the ports run out), so every SYN misses the table.
    let new_flows = args.runs + args.runs / 10;
    let syns: Vec<Vec<u8>> = (0..new_flows)
        .map(|i| {
            let ip = Ipv4Addr::new(10, 0, 0, 3 + (i / 60_000) as u8);
            let port = 1024 + (i % 60_000) as u16;
            Pkt::tcp(client(ip.into(), port), vip4, TCP_SYN)
                .with_eth(FRONT_MAC, FRONT_MAC)
                .build()
        })
        .collect();

    println!(
        "xdplb data-plane cost per packet: BPF_PROG_TEST_RUN, repeat = 1, median of {} runs per case{}",
        args.runs,
        if args.quick { " (--quick)" } else { "" }
    );
    let empty = measure_baseline(&mut lab, "bench_empty", &ack4, args.runs)?;
    let macswap = measure_baseline(&mut lab, "bench_macswap", &ack4, args.runs)?;
    println!();
    println!(
        "{:<34} {:>5} {:>9} {:>9} {:>12} {:>10}",
        "case", "hook", "median", "p90", "vs empty", "verdict"
    );
    let row = |name: &str, hook: &str, s: &Stats| {
        println!(
            "{:<34} {:>5} {:>6} ns {:>6} ns {:>11.2}x {:>10}",
            name,
            hook,
            s.median,
            s.p90,
            s.median as f64 / empty.median.max(1) as f64,
            s.verdict
        );
    };
    row("baseline: empty XDP program", "xdp", &empty);
    row("baseline: MAC swap + XDP_TX", "xdp", &macswap);
    let cases = [
        Case {
            name: "established IPv4 TCP",
            hook: Hook::Xdp,
            frames: vec![ack4.clone()],
        },
        Case {
            name: "new-flow IPv4 SYN",
            hook: Hook::Xdp,
            frames: syns,
        },
        Case {
            name: "non-service IPv4 packet (pass)",
            hook: Hook::Xdp,
            frames: vec![other.clone()],
        },
        Case {
            name: "reply path IPv4 TCP",
            hook: Hook::Xdp,
            frames: vec![reply4.clone()],
        },
        Case {
            name: "established IPv6 TCP",
            hook: Hook::Xdp,
            frames: vec![ack6.clone()],
        },
        Case {
            name: "established IPv4 UDP",
            hook: Hook::Xdp,
            frames: vec![udp4.clone()],
        },
        Case {
            name: "established IPv4 TCP",
            hook: Hook::Tc,
            frames: vec![ack4],
        },
        Case {
            name: "non-service IPv4 packet (pass)",
            hook: Hook::Tc,
            frames: vec![other],
        },
        Case {
            name: "reply path IPv4 TCP",
            hook: Hook::Tc,
            frames: vec![reply4],
        },
    ];
    let mut established = None;
    for case in &cases {
        let s = measure(&mut lab, case, args.runs)?;
        let hook = if case.hook == Hook::Xdp { "xdp" } else { "tc" };
        row(case.name, hook, &s);
        if case.name == "established IPv4 TCP" && case.hook == Hook::Xdp {
            established = Some(s.median);
        }
    }
    if let Some(m) = established {
        let ratio = m as f64 / empty.median.max(1) as f64;
        println!();
        println!(
            "target: established IPv4 TCP within 2.5x the empty program: {ratio:.2}x ({})",
            if ratio <= 2.5 { "met" } else { "NOT met" }
        );
    }
    println!("verdicts: XDP 1=DROP 2=PASS 3=TX 4=REDIRECT; TC 0=OK 2=SHOT 7=REDIRECT");
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
