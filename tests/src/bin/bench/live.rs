//! Forwarding rate (§3): `BPF_PROG_RUN` in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux 5.18, commit b530e9e1063e) on the
//! packet lab's veths.
//!
//! The kernel feeds copies of one frame from a page pool to the program and
//! honours its verdict: XDP_TX leaves through the ingress device (`front`),
//! XDP_REDIRECT through the devmap (`back` for a backend). Both peers get GRO
//! on, since a veth only receives XDP frames when its peer has NAPI
//! (DESIGN.md). The frame is an established IPv4 TCP flow; the REASON_STATS
//! delta proves every frame was forwarded (a program that saw its own
//! rewritten output would count a different reason, see [`BATCH`]), and the
//! peer's `rx_packets` delta proves the frames were delivered.

use std::time::Instant;

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp};
use lb_common::reason;
use tests::packet::PacketLab;

use crate::dataplane::baseline_prog;

/// Frames per batch, and per syscall. The page pool initialises a page from
/// the input frame only when the page is first allocated; a recycled page
/// keeps what the previous run wrote, so a rewriting program would see its
/// own output from the second batch on (checked on 6.18: with repeat 1M only
/// the first 64 frames of each call were forwarded). One batch per call keeps
/// every frame fresh; the kernel's duration excludes the per-call page-pool
/// setup, the wall clock includes it. 256 is the kernel's maximum batch.
const BATCH: u32 = 256;

pub struct Rate {
    pub frames: u64,
    /// Frames per second from the wall-clock time of the syscalls.
    pub pps_wall: f64,
    /// Frames per second from the kernel-reported mean duration.
    pub pps_kernel: f64,
    /// Frames counted on the receiving peer.
    pub delivered: u64,
    /// Frames the data plane counted as forwarded (xdplb only).
    pub forwarded: Option<u64>,
}

pub struct LiveResults {
    pub macswap: Rate,
    pub xdplb: Rate,
}

fn rx_packets(lab: &PacketLab, dev: &str) -> Result<u64> {
    let s = lab.ns.exec(&[
        "cat",
        &format!("/sys/class/net/{dev}/statistics/rx_packets"),
    ])?;
    s.trim()
        .parse()
        .with_context(|| format!("rx_packets of {dev}: {s:?}"))
}

/// One syscall of `BATCH` frames: one batch, so every frame is a fresh
/// page-pool page initialised from `frame`. Returns the kernel-reported mean
/// duration per frame, in nanoseconds.
fn run_live(prog: &Xdp, frame: &[u8], ifindex: u32) -> Result<f64> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex }: data_end must equal the size.
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: BATCH,
        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
        ..Default::default()
    };
    let r = prog.test_run(opts)?;
    Ok(r.duration.as_nanos() as f64)
}

fn forwarded(lab: &PacketLab) -> u64 {
    let r = lab.reasons();
    r[reason::FWD_TX as usize] + r[reason::FWD_REDIRECT as usize]
}

/// Median of `rounds` runs of `repeat` frames each.
fn rate(
    lab: &mut PacketLab,
    prog_name: Option<&str>,
    frame: &[u8],
    peer: &str,
    repeat: u32,
    rounds: usize,
) -> Result<Rate> {
    let ifindex = lab.front_ifindex;
    let rx0 = rx_packets(lab, peer)?;
    let fwd0 = forwarded(lab);
    let mut wall = Vec::new();
    let mut kernel = Vec::new();
    let calls = (repeat / BATCH).max(1);
    for _ in 0..rounds {
        let prog: &Xdp = match prog_name {
            Some(name) => baseline_prog(lab, name)?,
            None => lab.dp_mut().xdp(),
        };
        let started = Instant::now();
        let mut kernel_ns = 0.0;
        for _ in 0..calls {
            kernel_ns += run_live(prog, frame, ifindex)? * BATCH as f64;
        }
        let frames = (calls * BATCH) as f64;
        wall.push(frames / started.elapsed().as_secs_f64());
        kernel.push(if kernel_ns > 0.0 {
            frames * 1e9 / kernel_ns
        } else {
            0.0
        });
    }
    // Delivery to the peer finishes in its NAPI poll; give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let delivered = rx_packets(lab, peer)? - rx0;
    let fwd = forwarded(lab) - fwd0;
    wall.sort_by(f64::total_cmp);
    kernel.sort_by(f64::total_cmp);
    Ok(Rate {
        frames: (calls * BATCH) as u64 * rounds as u64,
        pps_wall: wall[wall.len() / 2],
        pps_kernel: kernel[kernel.len() / 2],
        delivered,
        forwarded: prog_name.is_none().then_some(fwd),
    })
}

/// Runs both programs on the established frame; `frame` must belong to a
/// flow the lab's data plane already knows.
pub fn forwarding(
    lab: &mut PacketLab,
    frame: &[u8],
    repeat: u32,
    rounds: usize,
) -> Result<LiveResults> {
    for peer in ["front-peer", "back-peer"] {
        lab.ns
            .exec(&["ethtool", "-K", peer, "gro", "on"])
            .with_context(|| format!("turning GRO on for {peer} (needs ethtool)"))?;
    }
    let macswap = rate(
        lab,
        Some("bench_macswap"),
        frame,
        "front-peer",
        repeat,
        rounds,
    )?;
    let xdplb = rate(lab, None, frame, "back-peer", repeat, rounds)?;
    Ok(LiveResults { macswap, xdplb })
}
