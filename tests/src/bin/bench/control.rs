//! Control-plane timings against HAProxy (§5), on one testbed with ten
//! backends, under a steady HTTP load (new connection per request) from the
//! testbed's client:
//!
//! - scale-up: a task joins DNS; time until it answers its first request;
//! - task death: a task stops answering (still in DNS, like a crashed
//!   container); time from its death to the last failed request;
//! - scale-down 10 -> 3: seven tasks leave DNS and stop 2 s later; failed
//!   requests;
//! - rolling replacement: five tasks replaced one by one (stop-first, Swarm's
//!   default: the old task leaves DNS, stops 2 s later, then a new one
//!   joins); failed requests.
//!
//! - interface re-created (xdplb only): the balancer's backend-side `eth1`
//!   is deleted and re-created 1 s later; time from the re-creation to the
//!   daemon's re-attach (its status file), and to the first request answered.
//!
//! The 2 s are Swarm's own order of shutdown: moby's container executor
//! (`daemon/cluster/executor/container/controller.go`, `Shutdown`) first
//! removes the task from service discovery (`deactivateServiceBinding`), then
//! sleeps `defaultGossipConvergeDelay` (2 s, hard-coded), and only then sends
//! the stop signal. A task that dies without that (a crash) is the task-death
//! case.
//!
//! Both balancers use the same intervals: DNS every second, a TCP check every
//! second, rise 2, fall 3 (HAProxy: `hold valid 1s`, `default-server inter 1s
//! fall 3 rise 2`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use lb_user::status::{self, InterfaceStatus, Status};
use testkit::wait::wait_until;
use tests::testbed::{
    client::{Load, LoadReport},
    Mode, Testbed,
};

use crate::e2e::{wait_backends, Balancer, Haproxy};

pub const INTERVAL: Duration = Duration::from_secs(1);
pub const FALL: u32 = 3;
const CONCURRENCY: usize = 4;
/// Swarm's delay between removing a task from DNS and stopping it
/// (`defaultGossipConvergeDelay`).
pub const SWARM_STOP_DELAY: Duration = Duration::from_secs(2);

pub struct Timings {
    pub balancer: Balancer,
    pub scale_up_s: Option<f64>,
    pub death_failed: u64,
    /// Last failed request after the death, in seconds; `None`: none failed.
    pub removal_s: Option<f64>,
    pub scale_down_failed: u64,
    pub scale_down_requests: u64,
    pub rolling_failed: u64,
    pub rolling_requests: u64,
    /// xdplb: `eth1` re-created; ms from the re-creation to the re-attach,
    /// to the end of the testbed's own configuration of the device, and to
    /// the first request answered.
    pub reattach_ms: Option<(f64, f64, f64)>,
}

/// Runs `f` while the client sends requests for `dur`.
fn with_load(tb: &Testbed, dur: Duration, f: impl FnOnce() -> Result<()>) -> Result<LoadReport> {
    let url = tb.url("/");
    std::thread::scope(|s| {
        let load = s.spawn(|| tb.client().load(&url, Load::For(dur), CONCURRENCY));
        let r = f();
        let report = load.join().expect("the load thread panicked");
        r.map(|()| report)
    })
}

fn tasks(tb: &Testbed, list: &[usize], what: &str) -> Result<()> {
    tb.set_tasks(list);
    for &i in list {
        tb.backend(i).start()?;
    }
    wait_backends(tb, list.len(), what)
}

fn scenarios(tb: &Testbed, balancer: Balancer) -> Result<Timings> {
    // Scale-up: 3 -> 4.
    let mut scale_up_s = None;
    with_load(tb, Duration::from_secs(6), || {
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        tb.set_tasks(&[0, 1, 2, 3]);
        scale_up_s = wait_until(
            Duration::from_secs(5),
            "the new task's first request",
            || tb.backend(3).first_request_since(t),
        )
        .ok()
        .map(|first| first.duration_since(t).as_secs_f64());
        Ok(())
    })?;

    // Task death: task 1 stops answering, stays in DNS.
    tasks(tb, &[0, 1, 2, 3], "four tasks in rotation")?;
    let mut death = None;
    let report = with_load(tb, Duration::from_secs(8), || {
        std::thread::sleep(Duration::from_millis(500));
        death = Some(Instant::now());
        tb.backend(1).stop();
        Ok(())
    })?;
    let death = death.context("no death time")?;
    let failed: Vec<_> = report
        .outcomes
        .iter()
        .filter(|o| o.backend.is_none() && o.at >= death)
        .collect();
    let removal_s = failed
        .iter()
        .map(|o| o.at.duration_since(death).as_secs_f64())
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let death_failed = failed.len() as u64;

    // Scale-down 10 -> 3.
    let all: Vec<usize> = (0..10).collect();
    tasks(tb, &all, "ten tasks in rotation")?;
    std::thread::sleep(Duration::from_secs(2));
    let report = with_load(tb, Duration::from_secs(7), || {
        std::thread::sleep(Duration::from_secs(1));
        tb.set_tasks(&[0, 1, 2]);
        std::thread::sleep(SWARM_STOP_DELAY);
        for i in 3..10 {
            tb.backend(i).stop();
        }
        Ok(())
    })?;
    let (scale_down_failed, scale_down_requests) = (report.failed, report.ok + report.failed);

    // Rolling replacement of five tasks: 0..5 -> 5..10.
    tasks(tb, &[0, 1, 2, 3, 4], "five tasks in rotation")?;
    for i in 5..10 {
        tb.backend(i).start()?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let report = with_load(tb, Duration::from_secs(17), || {
        std::thread::sleep(Duration::from_secs(1));
        let mut current: Vec<usize> = (0..5).collect();
        for old in 0..5 {
            current.retain(|&t| t != old);
            tb.set_tasks(&current);
            std::thread::sleep(SWARM_STOP_DELAY);
            tb.backend(old).stop();
            current.push(old + 5);
            tb.set_tasks(&current);
            std::thread::sleep(Duration::from_secs(1));
        }
        Ok(())
    })?;
    let (rolling_failed, rolling_requests) = (report.failed, report.ok + report.failed);
    Ok(Timings {
        balancer,
        scale_up_s,
        death_failed,
        removal_s,
        scale_down_failed,
        scale_down_requests,
        rolling_failed,
        rolling_requests,
        reattach_ms: None,
    })
}

/// Deletes `eth1` and re-creates it 1 s later: ms from the re-creation to
/// the daemon's re-attach (the `since` of its status), to the device being
/// configured (address, up), and to the first request answered.
fn reattach(tb: &Testbed) -> Result<(f64, f64, f64)> {
    let path = status::status_path(tb.pin_dir());
    let eth1 = |state: &str| -> Option<InterfaceStatus> {
        Status::read(&path)
            .ok()?
            .interfaces
            .into_iter()
            .find(|i| i.name == "eth1" && i.state == state)
    };
    tb.delete_eth1()?;
    wait_until(Duration::from_secs(5), "the daemon to see eth1 go", || {
        eth1("missing")
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let (created_ms, t) = (lb_user::clock::now_ms(), Instant::now());
    tb.recreate_eth1()?;
    let configured = t.elapsed();
    let first = wait_until(
        Duration::from_secs(10),
        "a request through the new eth1",
        || tb.get().ok().map(|_| t.elapsed()),
    )?;
    let attached = wait_until(Duration::from_secs(5), "eth1 re-attached", || {
        eth1("attached").filter(|i| i.since_unix_ms >= created_ms)
    })?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((
        (attached.since_unix_ms - created_ms) as f64,
        ms(configured),
        ms(first),
    ))
}

pub fn run(mut progress: impl FnMut(&str)) -> Result<Vec<Timings>> {
    tests::testbed::set_quiet(true);
    let mut out = Vec::new();
    for balancer in [Balancer::Haproxy, Balancer::XdplbTc] {
        progress(&format!("control plane: {}", balancer.label()));
        let tb = Testbed::new(Mode::Tc, 10)?;
        tb.client_reuses_time_wait()?;
        tb.set_tasks(&[0, 1, 2]);
        let timings = match balancer {
            Balancer::Haproxy => {
                let h = Haproxy::start(&tb, true)?;
                wait_backends(&tb, 3, "HAProxy to reach three tasks")
                    .with_context(|| format!("HAProxy's log ends:\n{}", h.log_tail()))?;
                scenarios(&tb, balancer)?
            }
            _ => {
                let mut cfg = tb.daemon_config();
                cfg.dns_interval = INTERVAL;
                cfg.check_interval = INTERVAL;
                cfg.check_timeout = Duration::from_millis(500);
                cfg.rise = 2;
                cfg.fall = FALL;
                let daemon = tb.start_daemon(&tb.config_args(&cfg)?)?;
                wait_backends(&tb, 3, "xdplb to reach three tasks")?;
                let mut t = scenarios(&tb, balancer)?;
                t.reattach_ms = Some(reattach(&tb)?);
                drop(daemon);
                tb.down()?;
                t
            }
        };
        out.push(timings);
    }
    Ok(out)
}
