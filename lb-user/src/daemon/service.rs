//! One service as the daemon drives it: its discovery task, its health
//! checkers, its backend tracker, and the writes of its table.

use super::*;

pub(super) fn spec_of(s: &ServiceConfig) -> ServiceSpec {
    ServiceSpec {
        name: s.name.clone(),
        listen: SocketAddr::new(s.listen.addr, s.listen.port),
        udp: s.listen.proto == Proto::Udp,
        maglev_size: s.maglev_size,
        snat_ports: s.snat.ports,
        snat_addr: s.snat.addr,
    }
}

pub(super) fn check_spec(s: &ServiceConfig) -> Option<CheckSpec> {
    let kind = match &s.check.kind {
        CheckKind::None => return None,
        CheckKind::Tcp => SpecKind::Tcp,
        CheckKind::Http {
            path,
            expect_status,
        } => SpecKind::Http {
            path: path.clone(),
            expect_status: *expect_status,
        },
    };
    Some(CheckSpec {
        kind,
        timeout: s.check.timeout,
    })
}

/// One service at run time.
pub(super) struct Svc {
    pub(super) cfg: ServiceConfig,
    pub(super) tracker: BackendTracker,
    pub(super) checkers: HashMap<SocketAddr, (watch::Sender<bool>, JoinHandle<()>)>,
    /// The last DNS answer as it came, before screening.
    pub(super) answer: Option<BTreeSet<IpAddr>>,
    /// Addresses of that answer that are not backends, and why.
    pub(super) rejected: BTreeMap<IpAddr, Rejection>,
    /// The map update that keeps failing, while it does.
    pub(super) failing: Option<Failing>,
    /// Failed map updates since start.
    pub(super) map_write_errors: u64,
    /// Stops this service's discovery (a reload restarts or ends it).
    pub(super) dns_stop: Option<watch::Sender<bool>>,
    /// A reload removed the service: its tasks drain, then it goes.
    pub(super) retiring: Option<Instant>,
    /// Removed from the maps; kept only so indexes stay stable.
    pub(super) gone: bool,
    /// DNS counters, shared by every poller this service has had.
    pub(super) dns: std::sync::Arc<discovery::QueryStats>,
    /// Health-check results and latency (for /metrics).
    pub(super) checks: health::CheckStats,
}

/// A service whose maps lag behind its state: the data plane keeps the last
/// good table while the update is retried with back-off.
pub(super) struct Failing {
    pub(super) message: String,
    pub(super) since: std::time::Instant,
    pub(super) attempts: u64,
    pub(super) retry_at: Instant,
}

/// The first retry of a failed map update; each failure doubles it up to
/// [`RETRY_MAX`].
pub(super) const RETRY_FIRST: Duration = Duration::from_millis(250);
pub(super) const RETRY_MAX: Duration = Duration::from_secs(10);

impl Svc {
    /// A service as configured, with no tasks yet and nothing running.
    pub(super) fn new(cfg: &ServiceConfig) -> Self {
        Self {
            tracker: BackendTracker::new(
                cfg.backends.name.clone(),
                check_spec(cfg).is_some(),
                cfg.drain_timeout,
            ),
            cfg: cfg.clone(),
            checkers: HashMap::new(),
            answer: None,
            rejected: BTreeMap::new(),
            failing: None,
            map_write_errors: 0,
            dns_stop: None,
            retiring: None,
            gone: false,
            dns: Default::default(),
            checks: Default::default(),
        }
    }

    /// Screens a DNS answer (screen.rs): logs each newly rejected address
    /// once, and returns the addresses that may be backends.
    pub(super) fn screen(
        &mut self,
        answer: BTreeSet<IpAddr>,
        host: &HostAddrs,
    ) -> BTreeSet<IpAddr> {
        let current: BTreeSet<IpAddr> = self.tracker.backends().map(|b| b.addr.ip()).collect();
        let policy = screen::Policy {
            family: self.cfg.backends.family,
            vip: self.cfg.listen.addr,
            host,
            cap: self.cfg.backend_cap(),
        };
        let out = screen::screen(&answer, &current, &policy);
        for (ip, why) in &out.rejected {
            if self.rejected.get(ip) == Some(why) {
                continue;
            }
            if *why == Rejection::OverCap {
                tracing::warn!(
                    service = %self.cfg.name,
                    task = %ip,
                    max_backends = policy.cap,
                    "DNS answer holds more tasks than max_backends: task left out"
                );
            } else {
                tracing::warn!(
                    service = %self.cfg.name,
                    addr = %ip,
                    "DNS answer rejected: {why}; it never becomes a backend"
                );
            }
        }
        self.rejected = out.rejected;
        self.answer = Some(answer);
        out.accepted
    }

    /// Records a failed map update and schedules the retry.
    pub(super) fn failed(&mut self, e: &anyhow::Error) {
        let message = format!("{e:#}");
        self.map_write_errors += 1;
        let (attempts, since) = match &self.failing {
            Some(f) => (f.attempts + 1, f.since),
            None => (1, std::time::Instant::now()),
        };
        let backoff = RETRY_FIRST
            .saturating_mul(1 << (attempts - 1).min(8) as u32)
            .min(RETRY_MAX);
        if self.failing.as_ref().is_none_or(|f| f.message != message) {
            tracing::warn!(
                service = %self.cfg.name,
                attempts,
                retry_in_ms = backoff.as_millis() as u64,
                "map update failed, the data plane keeps the last good table: {message}"
            );
        } else {
            tracing::debug!(service = %self.cfg.name, attempts, "map update failed again: {message}");
        }
        self.failing = Some(Failing {
            message,
            since,
            attempts,
            retry_at: Instant::now() + backoff,
        });
    }

    pub(super) fn succeeded(&mut self) {
        if let Some(f) = self.failing.take() {
            tracing::info!(
                service = %self.cfg.name,
                attempts = f.attempts,
                "map update succeeded again after {:.1} s of failures",
                f.since.elapsed().as_secs_f64()
            );
        }
    }
}

/// Logs the data plane's own decisions about refusing tasks: a task that
/// answers a SYN with RST is passed over by new flows for
/// [`lb_common::REFUSED_HOLD_NS`] after each refusal. The daemon only reads
/// the `REFUSED` map (once a second, active tasks only) so the log says why a
/// task stopped getting connections before its checks failed.
#[derive(Default)]
pub(super) struct Refusals {
    /// Per task: the last refusal time seen, and when an episode was logged.
    seen: HashMap<(usize, SocketAddr), (u64, Option<Instant>)>,
    read: Option<Instant>,
}

impl Refusals {
    /// A new episode is logged when the previous log is this old.
    const EPISODE: Duration = Duration::from_secs(10);

    /// Returns whether a task refused a connection since the last read.
    pub(super) fn report(&mut self, writer: &Writer, services: &[Svc]) -> bool {
        if self
            .read
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return false;
        }
        self.read = Some(Instant::now());
        let mut changed = false;
        for (i, s) in services.iter().enumerate() {
            for b in s.tracker.backends() {
                if b.state != state::State::Active {
                    continue;
                }
                let Some(index) = writer.backend_index(&s.cfg.name, b.addr) else {
                    continue;
                };
                let Ok(at) = writer.data_plane().refused_at(index) else {
                    continue;
                };
                let entry = self.seen.entry((i, b.addr)).or_insert((at, None));
                if at == 0 || at == entry.0 {
                    entry.0 = at;
                    continue;
                }
                entry.0 = at;
                changed = true;
                if entry.1.is_none_or(|t| t.elapsed() >= Self::EPISODE) {
                    entry.1 = Some(Instant::now());
                    tracing::warn!(
                        service = %s.cfg.name,
                        task = %b.addr,
                        "task refused a connection (answered a SYN with RST): the data plane \
                         keeps new flows off it for {} s after each refusal; DNS or failed \
                         checks decide whether it leaves rotation",
                        lb_common::REFUSED_HOLD_NS / 1_000_000_000
                    );
                }
            }
        }
        self.seen.retain(|(i, addr), _| {
            services
                .get(*i)
                .is_some_and(|s| s.tracker.get(*addr).is_some())
        });
        changed
    }
}

/// Starts (or restarts) discovery for service `i`, seeded with the tasks it
/// has: a restart that meets NXDOMAIN or a silent resolver keeps them
/// (discovery needs `empty_polls` answers to empty a set).
pub(super) fn spawn_discovery(
    i: usize,
    s: &mut Svc,
    dns_tx: &mpsc::Sender<(usize, BTreeSet<IpAddr>)>,
    tasks: &mut Vec<JoinHandle<()>>,
) {
    if let Some(old) = s.dns_stop.take() {
        let _ = old.send(true);
    }
    let (stop, stop_rx) = watch::channel(false);
    s.dns_stop = Some(stop);
    let b = &s.cfg.backends;
    let seed: BTreeSet<IpAddr> = s.tracker.backends().map(|b| b.addr.ip()).collect();
    let (tx, mut rx) = watch::channel(seed);
    let resolver = HickoryResolve::new(
        b.nameserver,
        b.interval.min(discovery::DEFAULT_QUERY_TIMEOUT),
    );
    // Log lines carry the configured service name (two services may ask
    // for the same DNS name); the DNS name is the `dns` field.
    tasks.push(tokio::spawn(
        discovery::Poller::new(resolver, b.name.clone(), b.family)
            .interval(b.interval)
            .empty_polls(b.empty_polls)
            .with_stats(std::sync::Arc::clone(&s.dns))
            .run(tx, stop_rx)
            .instrument(tracing::info_span!("discovery", service = %s.cfg.name)),
    ));
    let fwd = dns_tx.clone();
    tasks.push(tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let set = rx.borrow_and_update().clone();
            if fwd.send((i, set)).await.is_err() {
                break;
            }
        }
    }));
    tasks.retain(|t| !t.is_finished());
}

/// Starts checkers for backends the tracker knows and stops the others.
pub(super) fn reconcile_checkers(
    i: usize,
    s: &mut Svc,
    http: &reqwest::Client,
    tx: &mpsc::Sender<(usize, HealthEvent)>,
    stop: &watch::Receiver<bool>,
) {
    let Some(spec) = check_spec(&s.cfg) else {
        return;
    };
    let wanted: BTreeSet<SocketAddr> = s.tracker.backends().map(|b| b.addr).collect();
    s.checkers.retain(|addr, (stop_one, _)| {
        let keep = wanted.contains(addr);
        if !keep {
            let _ = stop_one.send(true);
        }
        keep
    });
    s.checks.retain(&wanted);
    for addr in wanted {
        if s.checkers.contains_key(&addr) {
            continue;
        }
        let target = SocketAddr::new(addr.ip(), s.cfg.check.port.unwrap_or(addr.port()));
        let (stop_one, stop_rx) = watch::channel(false);
        let (ev_tx, mut ev_rx) = mpsc::channel::<HealthEvent>(16);
        let fwd = tx.clone();
        let mut global_stop = stop.clone();
        let c = &s.cfg.check;
        let span = tracing::info_span!("health", service = %s.cfg.name);
        let checker = tokio::spawn(
            health::run_checker(
                http.clone(),
                target,
                spec.clone(),
                c.interval,
                c.rise,
                c.fall,
                ev_tx,
                stop_rx,
            )
            .instrument(span),
        );
        let handle = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = ev_rx.recv() => match ev {
                        Some(mut ev) => {
                            // Events are keyed by the backend address, which
                            // differs from the check target with check_port.
                            ev.target = addr;
                            if fwd.send((i, ev)).await.is_err() { break }
                        }
                        None => break,
                    },
                    _ = global_stop.changed() => break,
                }
            }
            checker.abort();
        });
        s.checkers.insert(addr, (stop_one, handle));
    }
}

/// Writes the tracker's view of one service into the maps.
pub(super) fn apply(writer: &mut Writer, s: &Svc) -> Result<()> {
    let backends: BTreeMap<SocketAddr, u8> = s
        .tracker
        .backends()
        .map(|b| (b.addr, state::data_plane_state(b.state)))
        .collect();
    let report = writer
        .apply(&s.cfg.name, &backends)
        .with_context(|| format!("updating the maps of service {}", s.cfg.name))?;
    if report.flipped {
        tracing::info!(
            service = %s.cfg.name,
            active = report.active,
            slots_changed = report.slots_written,
            "Maglev table flipped"
        );
    }
    Ok(())
}
