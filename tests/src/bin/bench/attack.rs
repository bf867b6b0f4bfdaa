//! §8 Under attack: HAProxy 2.6 and xdplb (TC, XDP) on the namespace
//! testbed while hping3 floods the VIP from random sources
//! (`tests::attack`), with new connections (20 a second, each a new TCP
//! connection) and 4 keep-alive connections running throughout. Per
//! balancer and flood: the flood's packet rate as hping3 reported it, the
//! share of new connections that succeeded during the flood and their p99
//! latency, and failed keep-alive requests. The same hosts, backends and
//! client in the same run; HAProxy is the baseline.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tests::{
    attack::{self, FloodKind, Hping},
    testbed::{KeepAlive, Mode, Testbed, HTTP_PORT, VIP},
};

use crate::{
    e2e::{wait_backends, Balancer, Haproxy},
    report::Table,
};

pub const NOT_MEASURED: &str = "§8 under attack (needs hping3 and haproxy: `cargo xtask setup`)";

const BACKENDS: usize = 3;
const NEW_PER_SEC: u32 = 20;
const KEEPALIVE: usize = 4;

pub struct Row {
    pub balancer: Balancer,
    pub kind: FloodKind,
    pub flood_pps: f64,
    pub ok: u64,
    pub all: u64,
    pub p99_ms: f64,
    pub keepalive_failed: usize,
}

fn p99(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Both floods against whatever serves the VIP of `tb` now.
fn floods(tb: &Testbed, balancer: Balancer, secs: u64, out: &mut Vec<Row>) -> Result<()> {
    let vip = std::net::SocketAddr::from((VIP, HTTP_PORT));
    let kept: Vec<KeepAlive> = (0..KEEPALIVE)
        .map(|_| KeepAlive::start(tb.client_ns(), vip, true))
        .collect::<Result<_>>()?;
    let load = tb.client().start_rate(&tb.url("/"), NEW_PER_SEC);
    std::thread::sleep(Duration::from_secs(1));
    let mut windows = Vec::new();
    for kind in [FloodKind::Syn, FloodKind::Ack] {
        let h = Hping::flood(tb.client_ns(), tb.dir(), kind, VIP, HTTP_PORT)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let sent = h.stop()?;
        windows.push((kind, t0, Instant::now(), sent.rate()));
        std::thread::sleep(Duration::from_secs(4));
    }
    let report = load.stop();
    let kept: Vec<_> = kept.into_iter().map(KeepAlive::stop).collect();
    for (kind, t0, t1, pps) in windows {
        let (ok, failed) = report.between(t0, t1);
        let lat: Vec<f64> = report
            .outcomes
            .iter()
            .filter(|o| o.at >= t0 && o.at < t1 && o.backend.is_some())
            .map(|o| o.latency.as_secs_f64() * 1e3)
            .collect();
        let keepalive_failed = kept
            .iter()
            .flat_map(|k| k.requests.iter())
            .filter(|r| r.at >= t0 && r.at < t1 && r.outcome.is_err())
            .count();
        out.push(Row {
            balancer,
            kind,
            flood_pps: pps,
            ok,
            all: ok + failed,
            p99_ms: p99(lat),
            keepalive_failed,
        });
    }
    Ok(())
}

pub fn run(secs: u64, mut progress: impl FnMut(&str)) -> Result<Vec<Row>> {
    attack::require_hping3()?;
    tests::testbed::set_quiet(true);
    let mut out = Vec::new();
    {
        let tb = Testbed::new(Mode::Tc, BACKENDS)?;
        tb.client_reuses_time_wait()?;
        progress(&format!(
            "under attack: {} ({secs} s per flood)",
            Balancer::Haproxy.label()
        ));
        {
            let h = Haproxy::start(&tb, false)?;
            wait_backends(&tb, BACKENDS, "HAProxy to reach every backend")
                .with_context(|| format!("HAProxy's log ends:\n{}", h.log_tail()))?;
            floods(&tb, Balancer::Haproxy, secs, &mut out)?;
        }
        progress(&format!(
            "under attack: {} ({secs} s per flood)",
            Balancer::XdplbTc.label()
        ));
        let daemon = tb.start_daemon(&tb.daemon_args()?)?;
        wait_backends(&tb, BACKENDS, "xdplb to reach every backend")?;
        floods(&tb, Balancer::XdplbTc, secs, &mut out)?;
        drop(daemon);
        tb.down()?;
    }
    {
        let tb = Testbed::new(Mode::Xdp, BACKENDS)?;
        tb.client_reuses_time_wait()?;
        progress(&format!(
            "under attack: {} ({secs} s per flood)",
            Balancer::XdplbXdp.label()
        ));
        let daemon = tb.start_daemon(&tb.daemon_args()?)?;
        wait_backends(&tb, BACKENDS, "xdplb to reach every backend")?;
        floods(&tb, Balancer::XdplbXdp, secs, &mut out)?;
        drop(daemon);
        tb.down()?;
    }
    Ok(out)
}

pub fn table(rows: &[Row], secs: u64) -> Table {
    let mut t = Table::new(
        "8. Under attack",
        format!(
            "The namespace testbed ({BACKENDS} tasks) with HAProxy 2.6 (the usual Swarm \
             configuration, TC-mode testbed, nothing attached) and xdplb in TC and XDP mode, \
             each in the same run. hping3 in the client namespace floods the VIP for {secs} s \
             from random sources (`-S` or `-A`, `--flood --rand-source`), at the highest rate \
             it reaches against that balancer (its own count over the flood's length), while \
             the client opens {NEW_PER_SEC} new connections a second (2 s timeout each) and \
             {KEEPALIVE} keep-alive connections send requests back to back. Per flood: new \
             connections begun during it that succeeded, the p99 latency of those, and failed \
             keep-alive requests. A new client source pays one SYN retransmission (1 s) under \
             xdplb's flood guard; the testbed's one client has completed handshakes before \
             the flood, so it is vouched for (docs/DATAPLANE.md §8)."
        ),
        &[
            "balancer",
            "flood",
            "flood packets/s",
            "new connections ok",
            "p99 of those",
            "vs HAProxy",
            "keep-alive failures",
        ],
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.balancer == Balancer::Haproxy && b.kind == r.kind);
        let share = |r: &Row| r.ok as f64 / r.all.max(1) as f64;
        let vs = match base {
            Some(b) if r.balancer != Balancer::Haproxy && share(b) > 0.0 => {
                format!("{:.2}x success", share(r) / share(b))
            }
            _ => "baseline".into(),
        };
        t.row(vec![
            r.balancer.label().to_string(),
            r.kind.label().to_string(),
            format!("{:.0}", r.flood_pps),
            format!("{}/{} ({:.0}%)", r.ok, r.all, 100.0 * share(r)),
            format!("{:.1} ms", r.p99_ms),
            vs,
            r.keepalive_failed.to_string(),
        ]);
    }
    t
}
