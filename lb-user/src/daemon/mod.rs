//! `xdplb run` and `xdplb down`: validate, lock, load (adopting pinned
//! state), attach, then keep the maps in step with DNS and health checks
//! until a signal arrives.

pub mod reload;
mod reloader;
mod service;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use reloader::*;
use service::*;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::Instrument as _;

use crate::{
    backends::{
        discovery::{self, HickoryResolve},
        health::{self, CheckSpec, HealthEvent, SpecKind},
        screen::{self, Rejection},
        state::{self, BackendTracker, Transition},
    },
    cli::RunArgs,
    config::{
        AttachMode, CheckKind, Config, HostAddrs, HostFacts, Proto, ServiceConfig, ShortForm,
    },
    dataplane::{
        attach::{self, Hook, InstanceLock},
        ifwatch::{self, Interfaces},
        maps::{DataPlane, LoadOptions},
        table::{ServiceSpec, Writer},
    },
    status::{
        self, BackendStatus, CheckStatus, RejectedStatus, ServiceError, ServiceStatus, Status,
    },
};

/// The shortest time between two map updates of one service: bursts of
/// transitions are written as one table flip.
const COALESCE: Duration = Duration::from_millis(100);

/// How often the host's addresses are read again (they decide what a DNS
/// answer may hold and whether a SNAT source is still valid).
const HOST_REREAD: Duration = Duration::from_secs(1);

fn writer_host_addrs() -> Result<HostAddrs> {
    HostAddrs::read().context("listing this host's addresses")
}

/// `xdplb run`: builds the config from the command line, then runs.
pub fn run_cli(args: RunArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::from_short_form(ShortForm {
            interfaces: args.iface.clone(),
            listen: args
                .listen
                .context("--listen is required without --config")?,
            backends: args
                .backends
                .clone()
                .context("--backends is required without --config")?,
            nameserver: args.nameserver,
            check: args.check.clone(),
            attach: args.attach,
        })?,
    };
    if let Some(dir) = &args.pin_dir {
        cfg.pin_dir = dir.clone();
        cfg.check_consistency()?;
    }
    let facts = HostFacts::read().context("reading interfaces and ip_local_port_range")?;
    cfg.validate(&facts)?;
    let source = Source {
        path: args.config.clone(),
        pin_dir: args.pin_dir.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(cfg, source, args.persist, args.metrics_addr))
}

/// Where the running configuration came from, so a reload reads it again.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// `--config FILE`; `None` for the short form, which cannot be re-read.
    pub path: Option<PathBuf>,
    /// `--pin-dir`, which overrides the file's `pin_dir`.
    pub pin_dir: Option<PathBuf>,
}

impl Source {
    /// Reads and validates the configuration again, as `xdplb run` did.
    fn load(&self) -> Result<Config> {
        let Some(path) = &self.path else {
            bail!(
                "this daemon was started with command-line options, not --config FILE: there \
                 is no file to read again (restart it to change settings)"
            );
        };
        let mut cfg = Config::load(path)?;
        if let Some(dir) = &self.pin_dir {
            cfg.pin_dir = dir.clone();
            cfg.check_consistency()?;
        }
        let facts = HostFacts::read().context("reading interfaces and ip_local_port_range")?;
        cfg.validate(&facts)?;
        Ok(cfg)
    }
}

/// `xdplb reload`: asks the running daemon to read its config again and
/// prints the outcome.
pub fn reload_cli(pin_dir: &Path, timeout: Duration) -> Result<()> {
    let summary = crate::daemon::reload::request(pin_dir, timeout)?;
    println!("reloaded: {summary}");
    Ok(())
}

/// `xdplb down`: removes pinned links (detaching the programs) and maps.
pub fn down(pin_dir: &Path) -> Result<()> {
    if InstanceLock::is_held(pin_dir) {
        bail!(
            "an xdplb instance is running with pin directory {}: stop it (SIGTERM) instead",
            pin_dir.display()
        );
    }
    // Before the existence test: under `ip netns exec` the pins are hidden,
    // not gone, and saying "nothing to remove" would be a lie.
    crate::dataplane::pin_dir::check(pin_dir)?;
    if !pin_dir.exists() {
        tracing::info!("nothing to remove: {} does not exist", pin_dir.display());
        return Ok(());
    }
    let links = attach::pinned_links(pin_dir)?;
    let removed = attach::teardown(pin_dir)?;
    for (iface, hook) in links {
        tracing::info!("{iface}: {hook} program detached");
    }
    tracing::info!("removed {removed} xdplb pins under {}", pin_dir.display());
    Ok(())
}

/// The running balancer. Owns the writer and the per-service state.
pub async fn run(
    mut cfg: Config,
    source: Source,
    persist: bool,
    metrics_addr: Option<SocketAddr>,
) -> Result<()> {
    // Before the lock file or anything else exists.
    crate::dataplane::pin_dir::check(&cfg.pin_dir)?;
    let lock = InstanceLock::acquire(&cfg.pin_dir)?;
    // Bound before anything is attached, so a taken port fails start-up cleanly.
    let metrics = match metrics_addr {
        Some(a) => Some(
            crate::report::metrics::bind(a)
                .await
                .with_context(|| format!("binding the metrics endpoint {a}"))?,
        ),
        None => None,
    };
    // Everything that can fail on its own is set up before anything is
    // attached: from here on, an error ends the daemon only through the
    // teardown below.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Signals whose default action would end the daemon without a word (and
    // leave it forwarding from a frozen table behind a stale lock): logged
    // and ignored. SIGPIPE is ignored by Rust's runtime already.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let mut host = writer_host_addrs()?;
    let mut host_read = Instant::now();
    let fresh = !cfg.pin_dir.join("links").exists();
    let started = start(&cfg).await;
    let (mut writer, mut services, mut ifaces) = match started {
        Ok(v) => v,
        Err(e) => {
            if fresh {
                // Leave nothing behind that we created (our pins, by name;
                // whatever else is in the directory stays).
                let _ = attach::teardown(&cfg.pin_dir);
            }
            return Err(e);
        }
    };

    let (health_tx, mut health_rx) = mpsc::channel::<(usize, HealthEvent)>(4096);
    let (dns_tx, mut dns_rx) = mpsc::channel::<(usize, BTreeSet<IpAddr>)>(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let http = health::http_client();
    let mut tasks = Vec::new();
    if let Some(listener) = metrics {
        let (pin, stop) = (cfg.pin_dir.clone(), stop_rx.clone());
        // serve_on logs the address once.
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::report::metrics::serve_on(listener, pin, stop).await {
                tracing::error!("metrics endpoint stopped: {e:#}");
            }
        }));
    }
    for (i, s) in services.iter_mut().enumerate() {
        spawn_discovery(i, s, &dns_tx, &mut tasks);
    }
    let reload_file = crate::daemon::reload::outcome_path(&cfg.pin_dir);
    let mut reloads = 0u64;
    // Interfaces that vanish and come back (ifwatch.rs).
    let (if_tx, mut if_rx) = mpsc::channel::<ifwatch::Event>(64);
    tasks.push(tokio::spawn(ifwatch::watch(if_tx, stop_rx.clone())));

    let mut tick = tokio::time::interval(COALESCE / 2);
    // Per service: changes not yet written, and when the maps were last written.
    let mut dirty = vec![false; services.len()];
    let mut applied = vec![Instant::now() - COALESCE; services.len()];
    let status_file = status::status_path(&cfg.pin_dir);
    let mut status_dirty = true;
    let mut status_written = Instant::now() - Duration::from_secs(10);
    let mut refusals = Refusals::default();
    // DNS polls since start, as last seen: each poll is published (its
    // counters and time are `/metrics`' DNS figures).
    let mut dns_polls = 0;
    tracing::info!(
        "running; SIGTERM or Ctrl-C stops{}",
        if persist {
            " (--persist: state stays)"
        } else {
            ""
        }
    );

    loop {
        let now = Instant::now();
        let mut reload_now = false;
        let (i, transitions) = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); break }
            _ = int.recv() => { tracing::info!("interrupt received"); break }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                reload_now = true;
                (None, Vec::new())
            }
            _ = usr1.recv() => { tracing::info!("SIGUSR1 received and ignored"); (None, Vec::new()) }
            _ = usr2.recv() => { tracing::info!("SIGUSR2 received and ignored"); (None, Vec::new()) }
            Some((i, set)) = dns_rx.recv() => {
                let s = &mut services[i];
                if s.gone || s.retiring.is_some() {
                    continue;
                }
                let port = s.cfg.backends.port;
                tracing::debug!(service = %s.cfg.name, tasks = set.len(), "DNS answer changed");
                let set = s.screen(set, &host);
                status_dirty = true;
                (Some(i), s.tracker.on_dns(&set, port, now.into_std()))
            }
            Some((i, ev)) = health_rx.recv() => {
                status_dirty = true;
                services[i].checks.record(ev.target, &ev.result);
                (Some(i), services[i].tracker.on_event(&ev, now.into_std()))
            }
            Some(ev) = if_rx.recv() => {
                if ifaces.handle(&ev, writer.data_plane_mut()) {
                    // Published at once, like a backend state change.
                    status_written = Instant::now() - Duration::from_secs(10);
                    status_dirty = true;
                    // An interface that came or went takes addresses with it:
                    // read them now rather than at the next periodic read.
                    host_read = Instant::now() - HOST_REREAD;
                }
                (None, Vec::new())
            }
            _ = tick.tick() => (None, Vec::new()),
        };
        let mut changed: Vec<(usize, Vec<Transition>)> = Vec::new();
        if let Some(i) = i {
            changed.push((i, transitions));
        }
        if reload_now {
            reloads += 1;
            let outcome = match source.load() {
                Err(e) => Err(format!("{e:#}")),
                Ok(new) => match crate::daemon::reload::plan(&cfg, &new) {
                    Err(e) => Err(e.to_string()),
                    Ok(plan) => {
                        let mut ctx = ReloadCtx {
                            writer: &mut writer,
                            services: &mut services,
                            dirty: &mut dirty,
                            applied: &mut applied,
                            changed: &mut changed,
                            dns_tx: &dns_tx,
                            tasks: &mut tasks,
                            host: &host,
                            http: &http,
                            health_tx: &health_tx,
                            stop_rx: &stop_rx,
                            now,
                        };
                        match ctx.apply(&plan, &new) {
                            Ok(()) => {
                                cfg = new;
                                Ok(plan.to_string())
                            }
                            Err(e) => Err(format!("{e:#}")),
                        }
                    }
                },
            };
            match &outcome {
                Ok(summary) => tracing::info!("configuration reloaded: {summary}"),
                Err(e) => tracing::error!("reload refused, running unchanged: {e}"),
            }
            let (ok, message) = match outcome {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            };
            let o = crate::daemon::reload::Outcome {
                generation: reloads,
                pid: std::process::id(),
                ok,
                message,
                at_ms: crate::clock::now_ms(),
            };
            if let Err(e) = o.write(&reload_file) {
                tracing::warn!("cannot publish the reload outcome for `xdplb reload`: {e:#}");
            }
            status_written = Instant::now() - Duration::from_secs(10);
            status_dirty = true;
        }
        // Removed services whose tasks have drained (or whose drain timeout
        // has passed) leave the maps.
        for s in services.iter_mut().filter(|s| !s.gone) {
            let Some(since) = s.retiring else { continue };
            let drained = s.tracker.is_empty()
                || since.elapsed() > s.cfg.drain_timeout + Duration::from_secs(1);
            if drained {
                match writer.remove_service(&s.cfg.name) {
                    Ok(()) => {
                        tracing::info!(service = %s.cfg.name, "removed by a reload: drained, and gone from the maps");
                        for (_, (tx, _)) in s.checkers.drain() {
                            let _ = tx.send(true);
                        }
                        s.gone = true;
                        status_dirty = true;
                    }
                    Err(e) => s.failed(&e.context("removing the service")),
                }
            }
        }
        // The host's addresses decide what a DNS answer may hold and which
        // SNAT source is valid; when they change, every service is screened
        // and written again.
        if host_read.elapsed() >= HOST_REREAD {
            host_read = Instant::now();
            match HostAddrs::read() {
                Ok(h) if h != host => {
                    tracing::info!(
                        addresses = ?h.addrs,
                        "this host's addresses changed: DNS answers are screened again and \
                         SNAT sources re-checked"
                    );
                    host = h.clone();
                    writer.set_host_addrs(h);
                    for (j, s) in services.iter_mut().enumerate() {
                        // A failure may have been for want of an address:
                        // retry at once instead of after the back-off.
                        if let Some(f) = &mut s.failing {
                            f.retry_at = now;
                        }
                        if let Some(answer) = s.answer.clone() {
                            let set = s.screen(answer, &host);
                            let port = s.cfg.backends.port;
                            changed.push((j, s.tracker.on_dns(&set, port, now.into_std())));
                        }
                        dirty[j] = true;
                    }
                    status_dirty = true;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot list this host's addresses: {e}"),
            }
        }
        for (j, s) in services.iter_mut().enumerate().filter(|(_, s)| !s.gone) {
            let t = s.tracker.on_tick(now.into_std());
            if !t.is_empty() {
                changed.push((j, t));
            }
        }
        for (i, transitions) in changed {
            if transitions.is_empty() {
                continue;
            }
            let s = &mut services[i];
            for t in &transitions {
                tracing::info!(service = %s.cfg.name, "{t}");
            }
            reconcile_checkers(i, s, &http, &health_tx, &stop_rx);
            dirty[i] = true;
        }
        // A change after a quiet period is written at once; a burst (200
        // tasks passing their checks) becomes one table flip per COALESCE.
        // A failed update keeps the service dirty: the data plane keeps the
        // last good table, and the update is retried with back-off. One
        // service's trouble never stops the others or the daemon.
        for (i, s) in services.iter_mut().enumerate().filter(|(_, s)| !s.gone) {
            let retry_due = s.failing.as_ref().is_none_or(|f| f.retry_at <= now);
            if dirty[i] && retry_due && applied[i].elapsed() >= COALESCE {
                applied[i] = Instant::now();
                match apply(&mut writer, s) {
                    Ok(()) => {
                        dirty[i] = false;
                        s.succeeded();
                    }
                    Err(e) => s.failed(&e),
                }
                // State changes are published at once, check results once a second.
                status_written = Instant::now() - Duration::from_secs(10);
                status_dirty = true;
            }
        }
        if refusals.report(&writer, &services) {
            status_dirty = true;
        }
        let polls = services.iter().map(|s| s.dns.snapshot().queries).sum();
        if polls != dns_polls {
            dns_polls = polls;
            status_dirty = true;
        }
        if status_dirty && status_written.elapsed() >= Duration::from_secs(1) {
            if let Err(e) = snapshot(&cfg, &writer, &services, &ifaces).write(&status_file) {
                tracing::warn!("cannot publish backend status for `xdplb backends`: {e:#}");
            }
            status_dirty = false;
            status_written = Instant::now();
        }
    }
    let _ = std::fs::remove_file(&status_file);

    let _ = stop_tx.send(true);
    for s in &mut services {
        if let Some(stop) = s.dns_stop.take() {
            let _ = stop.send(true);
        }
        for (_, (tx, _)) in s.checkers.drain() {
            let _ = tx.send(true);
        }
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    drop(writer);
    if persist {
        tracing::info!(
            "--persist: programs stay attached and maps pinned under {}; `xdplb down` removes them",
            cfg.pin_dir.display()
        );
    } else {
        attach::teardown(&cfg.pin_dir)?;
        tracing::info!(
            "detached and removed pinned state under {}",
            cfg.pin_dir.display()
        );
    }
    drop(lock);
    Ok(())
}

/// Writes CONFIG. The flow hash key is `flow_hash_secret` when configured;
/// otherwise the key already pinned in CONFIG (the one this balancer's
/// flows were hashed with), or on the first start a new random one.
fn write_config(dp: &mut DataPlane, cfg: &Config) -> Result<()> {
    let mut c = cfg.dataplane_config();
    if cfg.flow_hash_secret.is_none() {
        let pinned = dp.config()?.hash_key;
        c.hash_key = if pinned != [0; 2] {
            pinned
        } else {
            tracing::info!(
                "generated a flow hash secret (kept in {}/CONFIG); balancers that must pick \
                 the same backends, such as a Swarm global service's, need one \
                 `flow_hash_secret` in their shared configuration",
                cfg.pin_dir.display()
            );
            crate::config::HashSecret::generate()
                .context("generating the flow hash secret")?
                .0
        };
    }
    dp.set_config(&c)
}

/// Loads (adopting pinned maps and links), writes CONFIG, attaches.
async fn start(cfg: &Config) -> Result<(Writer, Vec<Svc>, Interfaces)> {
    // What this kernel can do: fallbacks logged, or one line and no start.
    crate::dataplane::probe::check(cfg)?;
    let specs: Vec<ServiceSpec> = cfg.services.iter().map(spec_of).collect();
    let maglev_capacity = specs
        .iter()
        .map(|s| 2 * s.maglev_size)
        .sum::<u32>()
        .max(lb_common::DEFAULT_MAGLEV_CAPACITY);
    let mut dp = DataPlane::load(&LoadOptions {
        pin_dir: cfg.pin_dir.clone(),
        conns_capacity: cfg.conntrack.capacity,
        unanswered_capacity: cfg.conntrack.unanswered_capacity,
        maglev_capacity,
        l4_csum: crate::dataplane::maps::L4Csum::Probe,
        bench_stop: 0,
        only: None,
    })?;
    // Before attaching: the programs' first lines are read too. The task
    // ends with the runtime.
    match dp.take_log(crate::logging::DataPlaneLog) {
        Ok(log) => drop(tokio::spawn(crate::logging::drain_data_plane(log))),
        Err(e) => tracing::warn!("{e:#}; the data plane's counters still count"),
    }
    let adopted_conns = dp.conns().map(|c| c.len()).unwrap_or(0);
    if adopted_conns > 0 {
        tracing::info!(entries = adopted_conns, "adopted pinned connection table");
    }
    write_config(&mut dp, cfg)?;
    let mut writer = Writer::new(dp, maglev_capacity, &specs)?;
    writer.set_backend_slots(cfg.backend_slots);
    let mut ifaces = Interfaces::default();
    for iface in &cfg.interfaces {
        let (hook, why) = match cfg.attach {
            AttachMode::Auto => attach::auto_hook(iface),
            AttachMode::Xdp => (Hook::Xdp, format!("{iface}: XDP (configured)")),
            AttachMode::Tc => (Hook::Tc, format!("{iface}: TC (configured)")),
        };
        tracing::info!("attach mode for {why}");
        if hook == Hook::Xdp {
            if let Some(caveat) = attach::xdp_caveat(iface) {
                tracing::warn!("{caveat}");
            }
        }
        let (index, log) = attach::attach(writer.data_plane_mut(), iface, hook)?;
        for msg in log {
            tracing::info!("{msg}");
        }
        ifaces.attached(iface, hook, index);
    }

    let now = std::time::Instant::now();
    let mut services = Vec::new();
    for s in &cfg.services {
        if s.listen.addr.is_ipv6() {
            tracing::info!(
                service = %s.name,
                "listens on IPv6 ({}): {} is resolved for AAAA records, so its tasks need IPv6 \
                 addresses (a Docker network created with --ipv6)",
                s.listen,
                s.backends.name
            );
        }
        let mut tracker = BackendTracker::new(
            s.backends.name.clone(),
            check_spec(s).is_some(),
            s.drain_timeout,
        );
        // Adopted backends that were active stay active while their checks
        // start over: a restart must not take healthy tasks out of rotation.
        let adopted: Vec<SocketAddr> = writer.adopted_active(&s.name);
        if !adopted.is_empty() {
            for t in tracker.adopt_active(&adopted, now) {
                tracing::info!(service = %s.name, "{t}");
            }
        }
        let mut svc = Svc::new(s);
        svc.tracker = tracker;
        services.push(svc);
    }
    Ok((writer, services, ifaces))
}

/// The daemon's view for `xdplb backends` / `xdplb stats`.
fn snapshot(cfg: &Config, writer: &Writer, services: &[Svc], ifaces: &Interfaces) -> Status {
    let (mono_now, unix_now) = (crate::clock::monotonic_now_ns(), crate::clock::now_ms());
    // REFUSED holds CLOCK_MONOTONIC ns; the status file speaks Unix ms.
    let refused_ms = |index: Option<u32>| {
        let at = writer.data_plane().refused_at(index?).ok()?;
        (at != 0 && at <= mono_now).then(|| unix_now.saturating_sub((mono_now - at) / 1_000_000))
    };
    Status {
        version: status::STATUS_VERSION,
        pid: std::process::id(),
        written_ms: crate::clock::now_ms(),
        pin_dir: cfg.pin_dir.clone(),
        interfaces: ifaces.status(),
        services: services
            .iter()
            .filter(|s| !s.gone)
            .map(|s| ServiceStatus {
                name: s.cfg.name.clone(),
                listen: s.cfg.listen.to_string(),
                id: writer.service(&s.cfg.name).map(|v| v.id).unwrap_or(0),
                backends_name: s.cfg.backends.name.clone(),
                backends: s
                    .tracker
                    .backends()
                    .map(|b| BackendStatus {
                        addr: b.addr,
                        index: writer.backend_index(&s.cfg.name, b.addr),
                        state: b.state.as_str().to_string(),
                        reason: b.reason.clone(),
                        since_ms: crate::clock::instant_to_ms(b.since),
                        last_check: b.last_check.as_ref().map(|c| CheckStatus {
                            ok: c.ok,
                            latency_us: c.latency.as_micros() as u64,
                            detail: c.detail.clone(),
                            at_ms: crate::clock::instant_to_ms(c.at),
                        }),
                        last_refused_ms: refused_ms(writer.backend_index(&s.cfg.name, b.addr)),
                    })
                    .collect(),
                rejected: s
                    .rejected
                    .iter()
                    .map(|(addr, why)| RejectedStatus {
                        addr: *addr,
                        reason: why.to_string(),
                    })
                    .collect(),
                snat_addr: writer.snat_addr(&s.cfg.name),
                error: s.failing.as_ref().map(|f| ServiceError {
                    message: f.message.clone(),
                    since_ms: crate::clock::instant_to_ms(f.since),
                    attempts: f.attempts,
                }),
                map_write_errors: s.map_write_errors,
                dns: Some(status::DnsStatus::new(
                    &s.dns.snapshot(),
                    s.answer.as_ref().map(BTreeSet::len),
                )),
                checks: check_spec(&s.cfg)
                    .map(|_| s.checks.status(s.tracker.backends().map(|b| b.addr))),
            })
            .collect(),
    }
}
