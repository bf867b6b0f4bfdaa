//! Memory (§6): the daemon's resident set and the kernel memory of its pinned
//! maps, with 1, 100 and 1,000 services in one configuration.
//!
//! The daemon runs in the testbed's `lb` namespace. Every service listens on
//! the VIP on its own port and discovers the testbed's `tasks.web`, with the
//! default Maglev size; health checks are off and DNS polls every 5 s so a
//! thousand services do not load the two-CPU machine while it settles. The
//! figures are read once the daemon has settled (under 5% of a CPU over two
//! seconds).

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tests::testbed::{dns::DNS_ADDR, Mode, Testbed, SERVICE, VIP};

use crate::e2e::{clk_tck, process_cpu_ticks};

pub struct MemPoint {
    pub services: usize,
    pub rss_kib: u64,
    pub map_bytes: u64,
    /// From start to the daemon's "running;" line (maps built, programs
    /// attached).
    pub running_s: f64,
    /// From start until every service's two tasks were logged `active`.
    pub active_s: f64,
    /// From start until it used under 5% of a CPU over 2 s.
    pub settle_s: f64,
}

fn config(services: usize) -> String {
    let mut s = String::from("interfaces = [\"eth0\", \"eth1\"]\nattach = \"tc\"\n");
    for i in 0..services {
        let _ = write!(
            s,
            "\n[[service]]\nname = \"svc{i}\"\nlisten = \"{VIP}:{}/tcp\"\nbackends = \"{SERVICE}:80\"\n\
             nameserver = \"{DNS_ADDR}\"\ninterval = \"5s\"\ncheck = \"none\"\n",
            2000 + i
        );
    }
    s
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn pinned_map_bytes(tb: &Testbed) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(tb.pin_dir())? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(entry.path())
            .output()
            .context("running bpftool")?;
        if !out.status.success() {
            continue;
        }
        let json = String::from_utf8_lossy(&out.stdout);
        if let Some(at) = json.find("\"bytes_memlock\":") {
            let digits: String = json[at + 16..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            total += digits.parse::<u64>().unwrap_or(0);
        }
    }
    if total == 0 {
        bail!("no pinned maps found in {}", tb.pin_dir().display());
    }
    Ok(total)
}

pub fn run(counts: &[usize], mut progress: impl FnMut(&str)) -> Result<Vec<MemPoint>> {
    tests::testbed::set_quiet(true);
    let tb = Testbed::new(Mode::Tc, 2)?;
    let mut points = Vec::new();
    for &n in counts {
        progress(&format!("memory: daemon with {n} services"));
        let path = tb.dir().join(format!("memory-{n}.toml"));
        std::fs::write(&path, config(n))?;
        let mut daemon = tb.start_daemon(&["--config".to_string(), path.display().to_string()])?;
        let pid = daemon.pid();
        let started = Instant::now();
        daemon.wait_log("running;", Duration::from_secs(600))?;
        let running_s = started.elapsed().as_secs_f64();
        loop {
            if daemon.count_log(":80 active:") >= 2 * n {
                break;
            }
            if !daemon.is_running() {
                bail!("the daemon with {n} services exited:\n{}", daemon.log());
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the tasks of {n} services did not all become active within 600 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let active_s = started.elapsed().as_secs_f64();
        // Settled: under 5% of a CPU over the last 2 s (its DNS polls and
        // map reads go on).
        let window = Duration::from_secs(2);
        let idle_ticks = (clk_tck() * window.as_secs_f64() * 0.05).max(1.0) as u64;
        let mut last = process_cpu_ticks(pid)?;
        loop {
            std::thread::sleep(window);
            if !daemon.is_running() {
                bail!("the daemon with {n} services exited:\n{}", daemon.log());
            }
            let now = process_cpu_ticks(pid)?;
            if now - last <= idle_ticks {
                break;
            }
            last = now;
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the daemon with {n} services did not settle within 600 s");
            }
        }
        points.push(MemPoint {
            services: n,
            rss_kib: vm_rss_kib(pid)?,
            map_bytes: pinned_map_bytes(&tb)?,
            running_s,
            active_s,
            settle_s: started.elapsed().as_secs_f64(),
        });
        drop(daemon);
        tb.down()?;
    }
    Ok(points)
}
