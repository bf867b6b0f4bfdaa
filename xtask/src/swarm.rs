//! `cargo xtask swarm-e2e`: xdplb beside a real `--endpoint-mode dnsrr`
//! service on a real Docker engine in swarm mode, under client load.
//!
//! What it does, in order (every command is printed):
//! 1. builds the daemon (`cargo build --release -p lb-user`) and two images
//!    without a registry (see `images`): the daemon's from the root file
//!    system `cargo xtask dist` ships, and nginx from Debian's package;
//! 2. asks the engine which capabilities it can grant: `BPF PERFMON
//!    NET_ADMIN` where it knows them (Engine 23.0+), else `SYS_ADMIN`;
//! 3. `docker swarm init` unless this node is already a manager, an
//!    attachable overlay network, and a swarm config from
//!    docs/swarm/xdplb.toml;
//! 4. `web`: nginx, 10 replicas, `--endpoint-mode dnsrr`, the shape Docker's
//!    docs give; `xdplb`: one task per node (`--mode global`), port 80
//!    published in host mode, resolving `tasks.web` through 127.0.0.11;
//! 5. scenarios, each under continuous client load from this host to the
//!    node's published port: spread over 10 tasks; `docker service scale
//!    web=3` then `web=12`; `docker service update --force web` (zero
//!    failed requests required); `docker kill` of one task's container (out
//!    of rotation within the health-check bound);
//! 6. removes what it created: services, config, network, volume, images,
//!    and swarm mode if it turned swarm mode on. On failure too (a guard
//!    cleans up on the way out); `--keep` leaves everything for a look.
//!    Ctrl-C kills it without cleaning up; everything it makes carries the
//!    label `xdplb-e2e`, and the next run removes such leftovers first.
//!
//! Why host-mode publishing: ingress publishing is refused for dnsrr
//! services ("port published with ingress mode can't be used with dnsrr
//! mode"), and the routing mesh needs IPVS, which this kernel lacks
//! (dockerd: "Could not get ipvs family information from the kernel").

mod daemon;
pub(crate) mod docker;
mod images;
mod load;
mod scenarios;

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use self::{
    docker::{containers, docker, out, poll, wait_for, wait_running},
    images::{NGINX_IMAGE, XDPLB_IMAGE},
    load::Load,
    scenarios::Scenario,
};
use crate::{
    build::target_dir,
    cmd::workspace_root,
    setup::{self, Report, Scope},
};

/// Label on everything this verb creates; a leftover with our name and this
/// label is ours to remove, one without it is somebody else's.
pub const LABEL: &str = "xdplb-e2e";
const NETWORK: &str = "xdplb-e2e";
const WEB: &str = "web";
const LB: &str = "xdplb";
const CONFIG: &str = "xdplb-e2e-conf";
const VOLUME: &str = "xdplb-e2e-bpffs";
const PORT: u16 = 80;
/// The bridge that carries host-mode published ports into task containers.
const GWBRIDGE: &str = "docker_gwbridge";
/// Written when this verb ran `docker swarm init`, removed when it leaves:
/// an interrupted run's swarm is recognised as ours by the next run.
const SWARM_MARKER: &str = "swarm-initialised-by-xtask";

/// One line for `cargo xtask test`: the engine's version, or why there is none.
pub fn engine_status() -> Result<String, String> {
    docker::engine().map(|e| format!("Docker Engine {}", e.version))
}

pub fn swarm_e2e(keep: bool) -> Result<()> {
    let started = Instant::now();
    let engine = docker::engine().map_err(|why| anyhow!("no Docker engine to test on: {why}"))?;
    println!("Docker Engine {}, swarm {}", engine.version, engine.swarm);
    setup::ensure(Scope::Toolchain, false, Report::Summary)?;
    let work = target_dir().join("swarm-e2e");
    let xdplb = work.join("xdplb-rootfs.tar");
    crate::dist::release_rootfs(&work, &xdplb)?;

    let mut bed = Testbed {
        work: work.clone(),
        keep,
        swarm_initialised: false,
        gwbridge_existed: poll(docker(["network", "inspect", GWBRIDGE])).is_ok(),
        done: false,
    };
    let result = bed.run(&engine, &xdplb);
    if result.is_err() {
        bed.show_daemon_log(40);
    }
    let cleaned = bed.finish();
    let scenarios = result?;
    scenarios::print_summary(&scenarios, started.elapsed());
    cleaned?;
    let failed: Vec<&str> = scenarios
        .iter()
        .filter(|s| s.failed())
        .map(|s| s.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("swarm scenario(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The deployment, removed on the way out (unless `keep`).
struct Testbed {
    work: PathBuf,
    keep: bool,
    swarm_initialised: bool,
    /// The engine makes docker_gwbridge for swarm mode and keeps it after
    /// `swarm leave`; it goes too when it wasn't there before us.
    gwbridge_existed: bool,
    done: bool,
}

impl Testbed {
    /// `xdplb`: the daemon image's root file system (`dist::image_rootfs`).
    fn run(&mut self, engine: &docker::Engine, xdplb: &Path) -> Result<Vec<Scenario>> {
        self.clear_leftovers(engine)?;
        images::build(&self.work, xdplb)?;
        let caps = capabilities()?;
        let node = self.swarm(engine)?;
        let target = SocketAddr::new(node.addr, PORT);
        if TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok() {
            bail!("something already answers on {target}; this test publishes port {PORT} there");
        }
        deploy(&node.id, &caps)?;
        let up = Instant::now();
        wait_for(
            "all 10 web tasks answering through xdplb",
            Duration::from_secs(60),
            |note| {
                let w = Load::start(target).window(Duration::from_secs(1));
                *note = format!("{} backends, {} failures", w.ok.len(), w.failures.len());
                Ok((w.ok.len() == 10 && w.failures.is_empty()).then_some(()))
            },
        )?;
        println!(
            "xdplb answers on {target} for all 10 tasks, {:.1} s after its service started",
            up.elapsed().as_secs_f64()
        );
        for line in daemon::log()?.lines().filter(|l| l.contains("attach")) {
            println!("  daemon: {}", daemon::without_timestamp(line));
        }
        let local = SocketAddr::from(([127, 0, 0, 1], PORT));
        match load::request(local) {
            Ok(backend) => println!("{local} (docker-proxy) answers too: {backend}"),
            Err(e) => println!("{local} (docker-proxy) does not answer: {e}"),
        }

        let mut scenarios = vec![scenarios::spread(target)];
        scenarios.push(scenarios::scale(target, 3)?);
        scenarios.push(scenarios::scale(target, 12)?);
        scenarios.push(scenarios::rolling_update(target)?);
        scenarios.push(scenarios::kill_one(target)?);
        Ok(scenarios)
    }

    /// Our own leftovers (label `xdplb-e2e`) go; somebody else's objects
    /// with our names stop the run before anything is touched.
    fn clear_leftovers(&mut self, engine: &docker::Engine) -> Result<()> {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut check = |kind: &str, name: &str, format: &str| -> Result<()> {
            match poll(docker([kind, "inspect", "--format", format, name])) {
                Err(_) => {}
                Ok(label) if label.trim() == "1" => ours.push(format!("{kind} {name}")),
                Ok(_) => theirs.push(format!("{kind} {name}")),
            }
            Ok(())
        };
        let spec_label = format!("{{{{index .Spec.Labels \"{LABEL}\"}}}}");
        let label = format!("{{{{index .Labels \"{LABEL}\"}}}}");
        if engine.swarm == "active" {
            check("service", WEB, &spec_label)?;
            check("service", LB, &spec_label)?;
            check("config", CONFIG, &spec_label)?;
            check("network", NETWORK, &label)?;
        }
        check("volume", VOLUME, &label)?;
        if !theirs.is_empty() {
            bail!(
                "{} already exist and were not made by swarm-e2e (no {LABEL} label); remove them \
                 or run on another engine",
                theirs.join(", ")
            );
        }
        if engine.swarm == "active" && self.work.join(SWARM_MARKER).exists() {
            println!("swarm mode was turned on by an earlier, interrupted run; it will be left");
            self.swarm_initialised = true;
            self.gwbridge_existed = false;
        }
        if !ours.is_empty() {
            println!("removing leftovers of an earlier run: {}", ours.join(", "));
            // Swarm mode stays on: this run needs it (and leaves it at the end
            // when an earlier run of ours turned it on).
            self.remove_all(false)?;
        }
        Ok(())
    }

    /// Turns swarm mode on if needed; returns this node's id and address.
    fn swarm(&mut self, engine: &docker::Engine) -> Result<Node> {
        match engine.swarm.as_str() {
            "inactive" => {
                // Marker first: an interruption right after init still cleans up.
                fs::write(self.work.join(SWARM_MARKER), "")?;
                self.swarm_initialised = true;
                out(docker(["swarm", "init"])).context(
                    "turning on swarm mode (with several addresses, docker wants \
                     --advertise-addr; see the error)",
                )?;
            }
            "active" if engine.manager => {
                if !self.swarm_initialised {
                    println!(
                        "this node is already a swarm manager; swarm mode stays on afterwards"
                    );
                }
            }
            "active" => bail!("this node is a swarm worker; services are created on managers"),
            other => bail!("swarm state is `{other}`; needs `inactive` or an active manager"),
        }
        let info = out(docker([
            "info",
            "--format",
            "{{.Swarm.NodeID}}|{{.Swarm.NodeAddr}}",
        ]))?;
        let (id, addr) = info
            .trim()
            .split_once('|')
            .context("unexpected `docker info` output")?;
        let addr: IpAddr = addr
            .parse()
            .with_context(|| format!("node address `{addr}` from docker info"))?;
        Ok(Node {
            id: id.to_string(),
            addr,
        })
    }

    fn show_daemon_log(&self, lines: usize) {
        if let Ok(log) = daemon::log() {
            let all: Vec<&str> = log.lines().collect();
            println!("last {lines} lines of the xdplb daemon's log:");
            for line in &all[all.len().saturating_sub(lines)..] {
                println!("  {line}");
            }
        }
    }

    /// Cleans up (or says what was kept) and reports what could not be removed.
    fn finish(&mut self) -> Result<()> {
        self.done = true;
        if self.keep {
            println!(
                "--keep: left running. Look: docker service ls; docker service logs {LB}; \
                 curl http://<node address>:{PORT}/. To remove it all, run `cargo xtask \
                 swarm-e2e` again (it clears leftovers first, and cleans up at the end), or \
                 by hand: docker service rm {WEB} {LB}; docker config rm {CONFIG}; docker \
                 network rm {NETWORK}; docker volume rm {VOLUME}; docker image rm \
                 {XDPLB_IMAGE} {NGINX_IMAGE}{}",
                if self.swarm_initialised {
                    "; docker swarm leave --force"
                } else {
                    ""
                }
            );
            return Ok(());
        }
        println!("\n==> cleaning up");
        self.remove_all(true)
    }

    /// Removes everything with our names, and swarm mode if we turned it on
    /// and `leave_swarm`; every step is tried, errors are collected.
    fn remove_all(&mut self, leave_swarm: bool) -> Result<()> {
        let mut errors = Vec::new();
        let mut attempt = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                println!("cleanup: {what}: {e:#}");
                errors.push(what.to_string());
            }
        };
        let services: Vec<&str> = [WEB, LB]
            .into_iter()
            .filter(|s| poll(docker(["service", "inspect", s])).is_ok())
            .collect();
        if !services.is_empty() {
            let mut args = vec!["service", "rm"];
            args.extend(&services);
            attempt("services", out(docker(args)).map(drop));
        }
        // Swarm removes the tasks' containers by itself; the network, the
        // volume and the images are in use until it has.
        attempt(
            "task containers",
            wait_for(
                "the tasks' containers to go",
                Duration::from_secs(60),
                |note| {
                    let left = containers(WEB, true)?.len() + containers(LB, true)?.len();
                    *note = format!("{left} containers");
                    Ok((left == 0).then_some(()))
                },
            ),
        );
        if poll(docker(["config", "inspect", CONFIG])).is_ok() {
            attempt("config", out(docker(["config", "rm", CONFIG])).map(drop));
        }
        if poll(docker(["network", "inspect", NETWORK])).is_ok() {
            attempt("network", retry(|| docker(["network", "rm", NETWORK])));
        }
        if poll(docker(["volume", "inspect", VOLUME])).is_ok() {
            attempt("volume", retry(|| docker(["volume", "rm", VOLUME])));
        }
        if leave_swarm && self.swarm_initialised {
            attempt(
                "swarm mode",
                out(docker(["swarm", "leave", "--force"])).map(drop),
            );
            fs::remove_file(self.work.join(SWARM_MARKER)).ok();
            self.swarm_initialised = false;
            if !self.gwbridge_existed && poll(docker(["network", "inspect", GWBRIDGE])).is_ok() {
                // Best effort: Engine 20.10 sometimes goes on counting an
                // endpoint of the ingress sandbox after `swarm leave` ("has
                // active endpoints" with none listed) until dockerd restarts.
                // Harmless: the next `swarm init` reuses the bridge.
                if let Err(e) = retry(|| docker(["network", "rm", GWBRIDGE])) {
                    println!(
                        "cleanup: {GWBRIDGE} stays (the engine's bookkeeping, not ours; the \
                         next swarm init reuses it, a dockerd restart clears it): {e:#}"
                    );
                }
            }
        }
        for image in [XDPLB_IMAGE, NGINX_IMAGE] {
            if poll(docker(["image", "inspect", image])).is_ok() {
                attempt(image, out(docker(["image", "rm", image])).map(drop));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("cleanup left: {}", errors.join(", "))
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.finish();
        }
    }
}

struct Node {
    id: String,
    addr: IpAddr,
}

/// Runs a removal for up to 10 s: Swarm lets go of networks and volumes a
/// moment after the containers are gone. Printed once.
fn retry(cmd: impl Fn() -> std::process::Command) -> Result<()> {
    let mut last = match out(cmd()) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(500));
        match poll(cmd()) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The least the engine can grant that the kernel accepts. Measured on 6.18
/// (README, "Deploy on Docker Swarm"): CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN,
/// or CAP_SYS_ADMIN alone, which the kernel accepts in place of all three.
fn capabilities() -> Result<Vec<&'static str>> {
    let fine = ["BPF", "PERFMON", "NET_ADMIN"];
    let mut args = vec!["run", "--rm", "--network", "none"];
    for cap in fine {
        args.extend(["--cap-add", cap]);
    }
    args.extend([XDPLB_IMAGE, "--version"]);
    match out(docker(args)) {
        Ok(_) => {
            println!("capabilities: CAP_BPF CAP_PERFMON CAP_NET_ADMIN (the engine knows them)");
            Ok(fine.to_vec())
        }
        Err(e) if e.to_string().contains("unknown capability") => {
            let said = e.to_string();
            let said = said
                .lines()
                .find(|l| l.contains("unknown capability"))
                .map(|l| l.split_once("): ").map_or(l, |(_, msg)| msg).trim())
                .unwrap_or_default()
                .to_string();
            println!(
                "capabilities: CAP_SYS_ADMIN, because this engine does not know CAP_BPF or \
                 CAP_PERFMON (it said: {said}; Engine 20.10 refuses them, moby/moby#42601); \
                 the kernel accepts CAP_SYS_ADMIN in place of all three"
            );
            Ok(vec!["SYS_ADMIN"])
        }
        Err(e) => Err(e.context("probing which capabilities the engine grants")),
    }
}

/// The network, the config, and the two services, exactly as the README shows.
fn deploy(node_id: &str, caps: &[&str]) -> Result<()> {
    // The README's stack file is not deployed here (the commands are), but it
    // must at least be one the CLI accepts.
    let stack = workspace_root().join("docs/swarm/stack.yml");
    match poll(docker(["stack", "config", "-c", &stack.to_string_lossy()])) {
        Ok(_) => println!("{} parses (docker stack config)", stack.display()),
        Err(e) if e.to_string().contains("unknown") => {
            println!("this docker CLI has no `stack config`; docs/swarm/stack.yml not checked")
        }
        Err(e) => return Err(e.context("docs/swarm/stack.yml does not parse")),
    }
    let label = format!("{LABEL}=1");
    // Our images exist on this node only.
    let here = format!("node.id=={node_id}");
    out(docker([
        "network",
        "create",
        "--driver",
        "overlay",
        "--attachable",
        "--label",
        &label,
        NETWORK,
    ]))?;
    let conf = workspace_root().join("docs/swarm/xdplb.toml");
    out(docker([
        "config",
        "create",
        "--label",
        &label,
        CONFIG,
        &conf.to_string_lossy(),
    ]))?;
    // --detach, then our own wait with a timeout: the CLI's own wait never
    // ends when tasks keep failing.
    out(docker([
        "service",
        "create",
        "--detach",
        "--label",
        &label,
        "--constraint",
        &here,
        "--network",
        NETWORK,
        "--name",
        WEB,
        "--replicas",
        "10",
        "--endpoint-mode",
        "dnsrr",
        "--stop-signal",
        "SIGQUIT",
        NGINX_IMAGE,
    ]))?;
    wait_running(WEB, 10, Duration::from_secs(90))?;

    let config = format!("source={CONFIG},target=/etc/xdplb.toml");
    let mount = format!(
        "type=volume,source={VOLUME},target=/sys/fs/bpf,volume-driver=local,\
         volume-opt=type=bpf,volume-opt=device=bpf,volume-label={label}"
    );
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--label",
        &label,
        "--constraint",
        &here,
        "--name",
        LB,
        "--mode",
        "global",
        "--network",
        NETWORK,
        "--endpoint-mode",
        "dnsrr",
        "--publish",
        "mode=host,target=80,published=80",
    ];
    for cap in caps {
        args.extend(["--cap-add", cap]);
    }
    args.extend([
        "--config",
        &config,
        "--mount",
        &mount,
        XDPLB_IMAGE,
        "run",
        "--config",
        "/etc/xdplb.toml",
    ]);
    out(docker(args))?;
    wait_running(LB, 1, Duration::from_secs(60))
}
