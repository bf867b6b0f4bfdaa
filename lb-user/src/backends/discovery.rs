//! Service discovery: polls `tasks.<service>` at Docker's embedded DNS and
//! turns the answers into the set of task addresses a service has now.
//!
//! Operator-facing behaviour:
//! - One lookup per service per poll interval (default 1 s), sent only to the
//!   configured nameserver (default `127.0.0.11:53`, Docker's embedded DNS).
//!   `/etc/resolv.conf`, `/etc/hosts` and search domains play no part: the
//!   name is always asked fully qualified (`tasks.web.`).
//! - Answers are never cached. Docker hands out a 600 s TTL; trusting it would
//!   hide scale-ups and scale-downs for ten minutes.
//! - Queries go over UDP without EDNS. Docker truncates UDP answers at
//!   512 bytes (about 29 tasks) and sets the TC bit; the same query then goes
//!   over TCP to the same address and port, so services with hundreds of tasks
//!   are seen in full.
//! - IPv4 services ask for A records, IPv6 services for AAAA. Records of the
//!   other family are ignored, duplicate records count once, and CNAME chains
//!   are followed.
//! - Timeouts, SERVFAIL, REFUSED and any other failure keep the last good set:
//!   a flaky resolver must never empty a service.
//! - NXDOMAIN or an empty answer (NOERROR without records) means "the service
//!   has no tasks" only once seen on `empty_polls` consecutive polls (default
//!   3, so about 3 s); until then the last good set stays. A failure in the
//!   middle of such a streak starts the count again: the resolver was
//!   unhealthy, so the negative answers around the failure are not trusted
//!   either (dockerd can answer NXDOMAIN for a moment while it restarts).
//!   Tasks that really died leave rotation through health checks meanwhile.
//! - No query storms. A service has at most one lookup in flight. After a
//!   failure, and while a service sits at zero tasks, the delay before the
//!   next lookup doubles from the interval up to `max_backoff` (default 5 s,
//!   never below the interval). A service at 0 replicas thus costs one lookup
//!   every 5 s, and a scale-up from 0 shows up within 5 s, which is about
//!   what a new task needs to start and pass its first health checks anyway.
//!   While a negative streak is being confirmed the interval stays normal,
//!   so confirming costs only `empty_polls` lookups.
//!
//! The decisions live in [`Tracker`], a pure state machine; [`Poller`] (or
//! [`run`]) is the async loop around it, and [`HickoryResolve`] the DNS
//! client.
use std::{
    collections::BTreeSet,
    fmt,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hickory_resolver::{
    config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
    proto::{
        op::ResponseCode,
        rr::{RData, RecordType},
        ProtoErrorKind,
    },
    Name, ResolveError, TokioResolver,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{Family, DEFAULT_EMPTY_POLLS, DEFAULT_POLL_INTERVAL};

/// Longest delay between two lookups after failures or at zero tasks.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A suggested per-query timeout: the embedded DNS answers `tasks.*` from
/// memory in well under a millisecond.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Poll intervals below this are raised to it, so a misconfiguration cannot
/// turn the loop into a query storm.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The DNS name whose records list the tasks of a Swarm service:
/// `tasks.<service>.`, fully qualified.
pub fn tasks_name(service: &str) -> String {
    let service = service.trim_end_matches('.');
    format!("tasks.{service}.")
}

/// `name` fully qualified (a trailing dot), so no search list applies.
pub fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// Why a lookup gave no addresses. [`LookupError::is_negative`] separates the
/// answers that say "no tasks" from the failures that say nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name does not exist: Docker answers so for a service without any
    /// running task, and for a service that does not exist.
    #[error("NXDOMAIN: the name does not exist (no running task, or a wrong service name)")]
    NxDomain,
    /// The name exists but has no address of the wanted family
    /// (NOERROR/NODATA), or the answer was empty.
    #[error("no address records in the answer (NOERROR/NODATA)")]
    NoRecords,
    /// The nameserver failed to answer.
    #[error("SERVFAIL: the nameserver failed to answer")]
    ServFail,
    /// No answer within the query timeout.
    #[error("no answer from the nameserver within the timeout")]
    Timeout,
    /// The nameserver refused the query (wrong nameserver address?).
    #[error("REFUSED: the nameserver refused the query")]
    Refused,
    /// Anything else: a network error, a malformed answer, another rcode.
    #[error("lookup failed: {0}")]
    Other(String),
}

impl LookupError {
    /// A negative answer (NXDOMAIN, NODATA) is a statement that there are no
    /// tasks; everything else is a failure that says nothing about them.
    pub fn is_negative(&self) -> bool {
        matches!(self, LookupError::NxDomain | LookupError::NoRecords)
    }

    /// Short, stable name for logs and metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            LookupError::NxDomain => "NXDOMAIN",
            LookupError::NoRecords => "NODATA",
            LookupError::ServFail => "SERVFAIL",
            LookupError::Timeout => "timeout",
            LookupError::Refused => "REFUSED",
            LookupError::Other(_) => "error",
        }
    }
}

/// A DNS client that answers "which addresses does this name have now".
///
/// Implementations must not cache: every call asks the nameserver.
pub trait Resolve: Send + Sync + 'static {
    /// Looks up the A (`V4`) or AAAA (`V6`) records of `name`, a fully
    /// qualified name such as `tasks.web.`.
    fn lookup(
        &self,
        name: &str,
        family: Family,
    ) -> impl Future<Output = Result<Vec<IpAddr>, LookupError>> + Send;

    /// Who answers, for log lines ("127.0.0.11:53").
    fn describe(&self) -> String {
        String::from("resolver")
    }
}

impl<T: Resolve> Resolve for Arc<T> {
    fn lookup(
        &self,
        name: &str,
        family: Family,
    ) -> impl Future<Output = Result<Vec<IpAddr>, LookupError>> + Send {
        (**self).lookup(name, family)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// [`Resolve`] through hickory-resolver, talking to exactly one nameserver
/// over UDP, with TCP for truncated answers.
#[derive(Clone)]
pub struct HickoryResolve {
    resolver: TokioResolver,
    nameserver: SocketAddr,
    timeout: Duration,
}

impl fmt::Debug for HickoryResolve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HickoryResolve")
            .field("nameserver", &self.nameserver)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HickoryResolve {
    /// A client for `nameserver` (UDP and TCP on the same address and port).
    /// `timeout` bounds each exchange; one lookup takes at most three of them
    /// (UDP, then TCP connect and query when the UDP answer was truncated).
    pub fn new(nameserver: SocketAddr, timeout: Duration) -> Self {
        // Two entries, UDP and TCP, for the one nameserver: the pool sends
        // over UDP and repeats the query over TCP when the answer has TC set
        // (hickory-resolver 0.25 `NameServerPool::send`).
        let servers =
            NameServerConfigGroup::from_ips_clear(&[nameserver.ip()], nameserver.port(), true);
        // No domain and no search list: nothing from resolv.conf.
        let config = ResolverConfig::from_parts(None, Vec::new(), servers);

        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        // The poll loop is the retry policy; hickory retrying inside one
        // lookup would multiply the query rate on a failing resolver.
        opts.attempts = 0;
        // No cache at all: size 0 and a zero TTL ceiling, so neither a
        // positive nor a negative answer outlives the lookup that got it.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        // No EDNS, as Docker expects: UDP answers stop at 512 bytes and
        // bigger ones come truncated, which sends the query over TCP.
        opts.edns0 = false;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.num_concurrent_reqs = 1;
        opts.preserve_intermediates = false;
        opts.try_tcp_on_error = false;
        opts.case_randomization = false;
        opts.validate = false;

        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        Self {
            resolver,
            nameserver,
            timeout,
        }
    }

    /// The nameserver this client asks.
    pub fn nameserver(&self) -> SocketAddr {
        self.nameserver
    }
}

impl Resolve for HickoryResolve {
    async fn lookup(&self, name: &str, family: Family) -> Result<Vec<IpAddr>, LookupError> {
        let mut fqdn = Name::from_ascii(name)
            .map_err(|e| LookupError::Other(format!("invalid name {name:?}: {e}")))?;
        // Fully qualified: no search list, no ndots.
        fqdn.set_fqdn(true);
        let record_type = match family {
            Family::V4 => RecordType::A,
            Family::V6 => RecordType::AAAA,
        };
        // Belt and braces next to `cache_size = 0`.
        self.resolver.clear_cache();
        // hickory bounds each exchange by `timeout`; this bounds the whole.
        let lookup = tokio::time::timeout(
            self.timeout.saturating_mul(3),
            self.resolver.lookup(fqdn, record_type),
        )
        .await
        .map_err(|_| LookupError::Timeout)?
        .map_err(|e| classify(&e))?;
        let ips: Vec<IpAddr> = lookup
            .iter()
            .filter_map(|rdata| match (family, rdata) {
                (Family::V4, RData::A(a)) => Some(IpAddr::V4(a.0)),
                (Family::V6, RData::AAAA(aaaa)) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect();
        if ips.is_empty() {
            return Err(LookupError::NoRecords);
        }
        Ok(ips)
    }

    fn describe(&self) -> String {
        self.nameserver.to_string()
    }
}

/// Maps hickory's error to what the tracker branches on.
fn classify(error: &ResolveError) -> LookupError {
    let Some(proto) = error.proto() else {
        return LookupError::Other(error.to_string());
    };
    match proto.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
            ResponseCode::NXDomain => LookupError::NxDomain,
            ResponseCode::NoError => LookupError::NoRecords,
            ResponseCode::ServFail => LookupError::ServFail,
            ResponseCode::Refused => LookupError::Refused,
            other => LookupError::Other(format!("response code {other}")),
        },
        ProtoErrorKind::Timeout => LookupError::Timeout,
        ProtoErrorKind::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => LookupError::Timeout,
        _ => LookupError::Other(error.to_string()),
    }
}

/// What one poll changed, and what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The task set after this poll.
    pub set: BTreeSet<IpAddr>,
    /// Whether `set` differs from the set before this poll.
    pub changed: bool,
    /// Addresses that joined, in order.
    pub added: Vec<IpAddr>,
    /// Addresses that left, in order.
    pub removed: Vec<IpAddr>,
    /// A decision worth a log line, e.g. "SERVFAIL: the nameserver failed to
    /// answer; keeping 10 tasks, next query in 2s" or "NXDOMAIN 2/3: keeping
    /// 4 tasks until confirmed".
    pub note: Option<String>,
    /// How long to wait before the next lookup.
    pub next_delay: Duration,
}

/// The discovery state machine of one service: feed it each poll result, it
/// says what the task set is now, why, and when to ask again. Pure: no I/O,
/// no clock.
#[derive(Debug, Clone)]
pub struct Tracker {
    current: BTreeSet<IpAddr>,
    empty_polls: u32,
    interval: Duration,
    max_backoff: Duration,
    /// Consecutive negative answers while the set was not empty.
    negative_streak: u32,
    /// Consecutive failed polls.
    failures: u32,
    /// Consecutive polls that back off: the next delay is
    /// `interval * 2^backoff`, at most `max_backoff`.
    backoff: u32,
}

impl Tracker {
    /// A tracker with the default interval (1 s) and back-off cap (5 s).
    /// `empty_polls` 0 counts as 1.
    pub fn new(empty_polls: u32) -> Self {
        Self::with_backoff(empty_polls, DEFAULT_POLL_INTERVAL, DEFAULT_MAX_BACKOFF)
    }

    /// A tracker polling every `interval` (at least [`MIN_INTERVAL`]) and
    /// backing off up to `max_backoff` (at least the interval).
    pub fn with_backoff(empty_polls: u32, interval: Duration, max_backoff: Duration) -> Self {
        let interval = interval.max(MIN_INTERVAL);
        Self {
            current: BTreeSet::new(),
            empty_polls: empty_polls.max(1),
            interval,
            max_backoff: max_backoff.max(interval),
            negative_streak: 0,
            failures: 0,
            backoff: 0,
        }
    }

    /// Starts from a known set (e.g. what the data plane still serves after a
    /// daemon restart) instead of the empty one, so that a first negative
    /// answer has to be confirmed before it empties the service.
    pub fn seed(&mut self, set: BTreeSet<IpAddr>) {
        self.current = set;
    }

    /// The task set as of the last poll.
    pub fn current(&self) -> &BTreeSet<IpAddr> {
        &self.current
    }

    /// Takes one poll's result. `Ok` with an empty list counts as NODATA.
    pub fn observe(&mut self, result: Result<Vec<IpAddr>, LookupError>) -> Observation {
        match result {
            Ok(ips) if !ips.is_empty() => self.answer(ips.into_iter().collect()),
            Ok(_) => self.negative(&LookupError::NoRecords),
            Err(e) if e.is_negative() => self.negative(&e),
            Err(e) => self.failure(&e),
        }
    }

    fn answer(&mut self, set: BTreeSet<IpAddr>) -> Observation {
        let note = if self.failures > 0 {
            Some(format!(
                "the nameserver answers again after {} failed {}",
                self.failures,
                plural(self.failures, "poll", "polls")
            ))
        } else if self.negative_streak > 0 {
            Some(format!(
                "addresses again after {}/{} negative answers; the set was kept",
                self.negative_streak, self.empty_polls
            ))
        } else {
            None
        };
        self.failures = 0;
        self.negative_streak = 0;
        self.backoff = 0;
        self.replace(set, note)
    }

    fn negative(&mut self, error: &LookupError) -> Observation {
        self.failures = 0;
        let label = error.label();
        if self.current.is_empty() {
            self.backoff = self.backoff.saturating_add(1);
            let note = format!(
                "{label}: still no tasks; next query in {}",
                humantime::format_duration(self.delay())
            );
            return self.unchanged(Some(note));
        }
        self.negative_streak += 1;
        if self.negative_streak < self.empty_polls {
            // Confirm at the normal pace: removal should not take longer
            // than `empty_polls` intervals.
            self.backoff = 0;
            let note = format!(
                "{label} {}/{}: keeping {} {} until confirmed",
                self.negative_streak,
                self.empty_polls,
                self.current.len(),
                plural(self.current.len(), "task", "tasks")
            );
            return self.unchanged(Some(note));
        }
        let note = format!(
            "{label} on {} consecutive {}: the service has no tasks now",
            self.negative_streak,
            plural(self.negative_streak, "poll", "polls")
        );
        self.negative_streak = 0;
        self.backoff = 1;
        self.replace(BTreeSet::new(), Some(note))
    }

    fn failure(&mut self, error: &LookupError) -> Observation {
        self.failures = self.failures.saturating_add(1);
        // A failure breaks a negative streak: see the module docs.
        self.negative_streak = 0;
        self.backoff = self.backoff.saturating_add(1);
        let note = format!(
            "{error}; keeping {} {}, next query in {}",
            self.current.len(),
            plural(self.current.len(), "task", "tasks"),
            humantime::format_duration(self.delay())
        );
        self.unchanged(Some(note))
    }

    fn delay(&self) -> Duration {
        let factor = 1u32 << self.backoff.min(16);
        self.interval.saturating_mul(factor).min(self.max_backoff)
    }

    fn unchanged(&self, note: Option<String>) -> Observation {
        Observation {
            set: self.current.clone(),
            changed: false,
            added: Vec::new(),
            removed: Vec::new(),
            note,
            next_delay: self.delay(),
        }
    }

    fn replace(&mut self, set: BTreeSet<IpAddr>, note: Option<String>) -> Observation {
        let added: Vec<IpAddr> = set.difference(&self.current).copied().collect();
        let removed: Vec<IpAddr> = self.current.difference(&set).copied().collect();
        let changed = !added.is_empty() || !removed.is_empty();
        self.current = set;
        Observation {
            set: self.current.clone(),
            changed,
            added,
            removed,
            note,
            next_delay: self.delay(),
        }
    }
}

fn plural<N: PartialEq + From<u8>>(n: N, one: &'static str, many: &'static str) -> &'static str {
    if n == N::from(1) {
        one
    } else {
        many
    }
}

/// Counters of one poll loop, shared with whoever exports them.
///
/// `queries` counts lookups: a truncated answer repeated over TCP, or a CNAME
/// that needs a second question, is one lookup but several DNS messages.
#[derive(Debug, Default)]
pub struct QueryStats {
    queries: AtomicU64,
    answers: AtomicU64,
    nxdomain: AtomicU64,
    nodata: AtomicU64,
    servfail: AtomicU64,
    timeout: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
    changes: AtomicU64,
    /// Unix ms of the last lookup that was not a failure; 0: none yet.
    last_success_ms: AtomicU64,
}

/// A copy of [`QueryStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryCounts {
    /// Lookups started.
    pub queries: u64,
    /// Lookups that returned at least one address.
    pub answers: u64,
    pub nxdomain: u64,
    pub nodata: u64,
    pub servfail: u64,
    pub timeout: u64,
    pub refused: u64,
    pub other: u64,
    /// Times the published task set changed.
    pub changes: u64,
    /// Unix time (ms) of the last lookup that was not a failure (addresses
    /// or a negative answer); 0: none yet.
    pub last_success_unix_ms: u64,
}

impl QueryCounts {
    /// Lookups that failed (not counting negative answers).
    pub fn failures(&self) -> u64 {
        self.servfail + self.timeout + self.refused + self.other
    }
}

impl QueryStats {
    /// Reads all counters (each one atomically, not all together).
    pub fn snapshot(&self) -> QueryCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueryCounts {
            queries: get(&self.queries),
            answers: get(&self.answers),
            nxdomain: get(&self.nxdomain),
            nodata: get(&self.nodata),
            servfail: get(&self.servfail),
            timeout: get(&self.timeout),
            refused: get(&self.refused),
            other: get(&self.other),
            changes: get(&self.changes),
            last_success_unix_ms: get(&self.last_success_ms),
        }
    }

    fn record(&self, result: &Result<Vec<IpAddr>, LookupError>) {
        let counter = match result {
            Ok(ips) if !ips.is_empty() => &self.answers,
            Ok(_) | Err(LookupError::NoRecords) => &self.nodata,
            Err(LookupError::NxDomain) => &self.nxdomain,
            Err(LookupError::ServFail) => &self.servfail,
            Err(LookupError::Timeout) => &self.timeout,
            Err(LookupError::Refused) => &self.refused,
            Err(LookupError::Other(_)) => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !matches!(result, Err(e) if !e.is_negative()) {
            self.last_success_ms
                .store(crate::clock::now_ms(), Ordering::Relaxed);
        }
    }
}

/// The poll loop of one service.
///
/// ```no_run
/// # async fn f() {
/// use std::collections::BTreeSet;
/// use lb_user::{backends::discovery::{self, HickoryResolve, Poller}, config::{Family, DEFAULT_NAMESERVER}};
/// let resolver = HickoryResolve::new(DEFAULT_NAMESERVER, discovery::DEFAULT_QUERY_TIMEOUT);
/// let (tx, rx) = tokio::sync::watch::channel(BTreeSet::new());
/// let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
/// let poller = Poller::new(resolver, "tasks.web", Family::V4);
/// let stats = poller.stats();
/// tokio::spawn(poller.run(tx, stop_rx));
/// # }
/// ```
#[derive(Debug)]
pub struct Poller<R> {
    resolver: R,
    service: String,
    family: Family,
    interval: Duration,
    empty_polls: u32,
    max_backoff: Duration,
    stats: Arc<QueryStats>,
}

impl<R: Resolve> Poller<R> {
    /// A poller for the DNS name `service` as configured (`tasks.web`, the
    /// name Docker answers with one record per task; asked fully qualified,
    /// so no search domain applies), with the default interval,
    /// `empty_polls` and back-off cap.
    pub fn new(resolver: R, service: impl Into<String>, family: Family) -> Self {
        Self {
            resolver,
            service: service.into(),
            family,
            interval: DEFAULT_POLL_INTERVAL,
            empty_polls: DEFAULT_EMPTY_POLLS,
            max_backoff: DEFAULT_MAX_BACKOFF,
            stats: Arc::default(),
        }
    }

    /// Delay between lookups while all is well (at least [`MIN_INTERVAL`]).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Consecutive negative answers before the service counts as empty.
    #[must_use]
    pub fn empty_polls(mut self, empty_polls: u32) -> Self {
        self.empty_polls = empty_polls;
        self
    }

    /// Longest delay after failures or at zero tasks (at least the interval).
    #[must_use]
    pub fn max_backoff(mut self, max_backoff: Duration) -> Self {
        self.max_backoff = max_backoff;
        self
    }

    /// Counters this poller updates.
    pub fn stats(&self) -> Arc<QueryStats> {
        Arc::clone(&self.stats)
    }

    /// Counts into `stats` instead of counters of its own: a poller that
    /// replaces another (a reload that changed the DNS name) keeps counting
    /// where that one stopped.
    #[must_use]
    pub fn with_stats(mut self, stats: Arc<QueryStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Polls until `shutdown` becomes `true` (or its sender is dropped).
    ///
    /// The value in `tx` at the start is taken as the last good set (see
    /// [`Tracker::seed`]); every change is published on it, and only changes.
    pub async fn run(
        self,
        tx: watch::Sender<BTreeSet<IpAddr>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Self {
            resolver,
            service,
            family,
            interval,
            empty_polls,
            max_backoff,
            stats,
        } = self;
        let name = fqdn(&service);
        let server = resolver.describe();
        let mut tracker = Tracker::with_backoff(empty_polls, interval, max_backoff);
        tracker.seed(tx.borrow().clone());
        info!(
            dns = %service,
            query = %name,
            record = family.record_type(),
            nameserver = %server,
            interval = %humantime::format_duration(interval.max(MIN_INTERVAL)),
            empty_polls,
            "discovery starts"
        );
        loop {
            if *shutdown.borrow() {
                break;
            }
            stats.queries.fetch_add(1, Ordering::Relaxed);
            let result = tokio::select! {
                biased;
                () = stopped(&mut shutdown) => break,
                result = resolver.lookup(&name, family) => result,
            };
            // The resolver filters already; a foreign family must never reach
            // the data plane whatever `R` does.
            let result =
                result.map(|ips| ips.into_iter().filter(|ip| family.matches(ip)).collect());
            stats.record(&result);
            let failed = matches!(&result, Err(e) if !e.is_negative());
            debug!(dns = %service, query = %name, result = ?result, "poll");

            let observation = tracker.observe(result);
            if observation.changed {
                stats.changes.fetch_add(1, Ordering::Relaxed);
                info!(
                    dns = %service,
                    tasks = observation.set.len(),
                    added = ?observation.added,
                    removed = ?observation.removed,
                    reason = observation.note.as_deref().unwrap_or("new answer"),
                    "task set of {service} changes: +{} -{}, {} now",
                    observation.added.len(),
                    observation.removed.len(),
                    observation.set.len(),
                );
                tx.send_if_modified(|published| {
                    if *published == observation.set {
                        false
                    } else {
                        published.clone_from(&observation.set);
                        true
                    }
                });
            } else if let Some(note) = &observation.note {
                if failed {
                    warn!(dns = %service, nameserver = %server, "{name}: {note}");
                } else if tracker.current().is_empty() {
                    debug!(dns = %service, nameserver = %server, "{name}: {note}");
                } else {
                    info!(dns = %service, nameserver = %server, "{name}: {note}");
                }
            }

            tokio::select! {
                biased;
                () = stopped(&mut shutdown) => break,
                () = tokio::time::sleep(observation.next_delay) => {}
            }
        }
        debug!(dns = %service, "discovery stops");
    }
}

/// Resolves once `shutdown` is `true` or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: nobody can stop us any more,
    // which only happens when the daemon is going away.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The poll loop of one service (see [`Poller`] for the knobs and the
/// counters): asks `tasks.<service>.` every `interval`, keeps the set through
/// failures, empties it after `empty_polls` consecutive negative answers, and
/// publishes each changed set on `tx` until `shutdown` becomes `true`.
pub async fn run<R: Resolve>(
    resolver: R,
    service: String,
    family: Family,
    interval: Duration,
    empty_polls: u32,
    tx: watch::Sender<BTreeSet<IpAddr>>,
    shutdown: watch::Receiver<bool>,
) {
    Poller::new(resolver, service, family)
        .interval(interval)
        .empty_polls(empty_polls)
        .run(tx, shutdown)
        .await;
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        net::{Ipv4Addr, Ipv6Addr},
        sync::{
            atomic::{AtomicU32, AtomicU64},
            Mutex,
        },
    };

    use tokio::time::Instant;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 1, last))
    }

    fn set(lasts: &[u8]) -> BTreeSet<IpAddr> {
        lasts.iter().map(|&l| ip(l)).collect()
    }

    fn ok(lasts: &[u8]) -> Result<Vec<IpAddr>, LookupError> {
        Ok(lasts.iter().map(|&l| ip(l)).collect())
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn first_answer_adds_everything() {
        let mut t = Tracker::new(3);
        let o = t.observe(ok(&[3, 1, 2]));
        assert!(o.changed);
        assert_eq!(o.added, vec![ip(1), ip(2), ip(3)], "added must be sorted");
        assert!(o.removed.is_empty());
        assert_eq!(o.note, None);
        assert_eq!(o.next_delay, SECOND);
        assert_eq!(t.current(), &set(&[1, 2, 3]));
    }

    #[test]
    fn added_and_removed_are_the_differences() {
        let mut t = Tracker::new(3);
        t.observe(ok(&[1, 2, 3]));
        let o = t.observe(ok(&[2, 3, 4, 5]));
        assert!(o.changed);
        assert_eq!(o.added, vec![ip(4), ip(5)]);
        assert_eq!(o.removed, vec![ip(1)]);
        assert_eq!(o.set, set(&[2, 3, 4, 5]));

        let same = t.observe(ok(&[5, 4, 3, 2]));
        assert!(
            !same.changed,
            "same set in another order is no change: {same:?}"
        );
        assert!(same.added.is_empty() && same.removed.is_empty());
    }

    #[test]
    fn duplicates_count_once() {
        let mut t = Tracker::new(3);
        let o = t.observe(ok(&[7, 7, 8, 7, 8]));
        assert_eq!(o.set, set(&[7, 8]));
        assert_eq!(o.added, vec![ip(7), ip(8)]);
    }

    #[test]
    fn failures_keep_the_last_set() {
        for error in [
            LookupError::ServFail,
            LookupError::Timeout,
            LookupError::Refused,
            LookupError::Other("connection refused".into()),
        ] {
            let mut t = Tracker::new(3);
            t.observe(ok(&[1, 2]));
            for _ in 0..10 {
                let o = t.observe(Err(error.clone()));
                assert!(!o.changed, "{error:?} changed the set: {o:?}");
                assert_eq!(o.set, set(&[1, 2]), "{error:?} must keep the set");
            }
            let note = t
                .observe(Err(error.clone()))
                .note
                .expect("failures get a note");
            assert!(
                note.contains("keeping 2 tasks"),
                "note for {error:?}: {note}"
            );
        }
    }

    #[test]
    fn servfail_note_says_what_is_kept() {
        let mut t = Tracker::new(3);
        t.observe(ok(&(1..=10).collect::<Vec<_>>()));
        let o = t.observe(Err(LookupError::ServFail));
        assert_eq!(
            o.note.as_deref(),
            Some("SERVFAIL: the nameserver failed to answer; keeping 10 tasks, next query in 2s")
        );
    }

    #[test]
    fn negative_answers_empty_only_after_n_consecutive() {
        for negative in [
            Err(LookupError::NxDomain),
            Err(LookupError::NoRecords),
            Ok(vec![]),
        ] {
            let mut t = Tracker::new(3);
            t.observe(ok(&[1, 2, 3, 4]));
            let o1 = t.observe(negative.clone());
            let o2 = t.observe(negative.clone());
            assert_eq!(
                o1.set,
                set(&[1, 2, 3, 4]),
                "{negative:?} 1/3 must keep the set"
            );
            assert_eq!(
                o2.set,
                set(&[1, 2, 3, 4]),
                "{negative:?} 2/3 must keep the set"
            );
            assert!(!o1.changed && !o2.changed);
            let o3 = t.observe(negative.clone());
            assert!(o3.changed, "{negative:?} 3/3 must empty the set: {o3:?}");
            assert!(o3.set.is_empty());
            assert_eq!(o3.removed, vec![ip(1), ip(2), ip(3), ip(4)]);
            assert!(t.current().is_empty());
        }
    }

    #[test]
    fn negative_notes_count_the_streak() {
        let mut t = Tracker::new(3);
        t.observe(ok(&[1, 2, 3, 4]));
        let o = t.observe(Err(LookupError::NxDomain));
        assert_eq!(
            o.note.as_deref(),
            Some("NXDOMAIN 1/3: keeping 4 tasks until confirmed")
        );
        let o = t.observe(Err(LookupError::NxDomain));
        assert_eq!(
            o.note.as_deref(),
            Some("NXDOMAIN 2/3: keeping 4 tasks until confirmed")
        );
        let o = t.observe(Err(LookupError::NxDomain));
        assert_eq!(
            o.note.as_deref(),
            Some("NXDOMAIN on 3 consecutive polls: the service has no tasks now")
        );
    }

    #[test]
    fn nxdomain_and_nodata_mix_in_one_streak() {
        let mut t = Tracker::new(3);
        t.observe(ok(&[1]));
        t.observe(Err(LookupError::NxDomain));
        t.observe(Ok(vec![]));
        let o = t.observe(Err(LookupError::NoRecords));
        assert!(
            o.set.is_empty(),
            "three negative answers of any kind empty the set: {o:?}"
        );
    }

    /// Decision: a failure in the middle of a negative streak starts the count
    /// again (module docs explain why).
    #[test]
    fn failure_resets_the_negative_streak() {
        let mut t = Tracker::new(3);
        t.observe(ok(&[1, 2]));
        t.observe(Err(LookupError::NxDomain));
        t.observe(Err(LookupError::NxDomain));
        t.observe(Err(LookupError::ServFail));
        let o = t.observe(Err(LookupError::NxDomain));
        assert_eq!(
            o.set,
            set(&[1, 2]),
            "NX, NX, SERVFAIL, NX must keep the set"
        );
        assert_eq!(
            o.note.as_deref(),
            Some("NXDOMAIN 1/3: keeping 2 tasks until confirmed")
        );
        t.observe(Err(LookupError::NxDomain));
        let o = t.observe(Err(LookupError::NxDomain));
        assert!(
            o.set.is_empty(),
            "three clean NX after the failure empty the set: {o:?}"
        );
    }

    #[test]
    fn answer_resets_the_negative_streak() {
        let mut t = Tracker::new(3);
        t.observe(ok(&[1, 2]));
        t.observe(Err(LookupError::NxDomain));
        t.observe(Err(LookupError::NxDomain));
        let back = t.observe(ok(&[1, 2]));
        assert!(!back.changed);
        assert!(
            back.note.is_some(),
            "recovery from a negative streak is worth a note"
        );
        t.observe(Err(LookupError::NxDomain));
        let o = t.observe(Err(LookupError::NxDomain));
        assert_eq!(o.set, set(&[1, 2]), "the streak restarted after the answer");
    }

    #[test]
    fn empty_polls_zero_means_one() {
        let mut t = Tracker::new(0);
        t.observe(ok(&[1]));
        let o = t.observe(Err(LookupError::NxDomain));
        assert!(o.set.is_empty(), "empty_polls 0 acts as 1: {o:?}");
    }

    #[test]
    fn negative_answer_without_tasks_changes_nothing() {
        let mut t = Tracker::new(3);
        let o = t.observe(Err(LookupError::NxDomain));
        assert!(!o.changed);
        assert!(o.set.is_empty());
        assert_eq!(
            o.note.as_deref(),
            Some("NXDOMAIN: still no tasks; next query in 2s")
        );
    }

    #[test]
    fn seed_is_kept_until_confirmed() {
        let mut t = Tracker::new(2);
        t.seed(set(&[1, 2]));
        assert_eq!(t.observe(Err(LookupError::NxDomain)).set, set(&[1, 2]));
        assert!(t.observe(Err(LookupError::NxDomain)).set.is_empty());
    }

    fn delays(t: &mut Tracker, results: &[Result<Vec<IpAddr>, LookupError>]) -> Vec<Duration> {
        results
            .iter()
            .map(|r| t.observe(r.clone()).next_delay)
            .collect()
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_cap() {
        let mut t = Tracker::new(3);
        t.observe(ok(&[1]));
        let d = delays(&mut t, &vec![Err(LookupError::Timeout); 6]);
        let secs: Vec<u64> = d.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![2, 4, 5, 5, 5, 5]);
        assert_eq!(
            t.observe(ok(&[1])).next_delay,
            SECOND,
            "an answer resets the back-off"
        );
    }

    #[test]
    fn confirmation_runs_at_the_interval_then_backs_off() {
        let mut t = Tracker::new(3);
        t.observe(ok(&[1]));
        let d = delays(&mut t, &vec![Err(LookupError::NxDomain); 7]);
        let secs: Vec<u64> = d.iter().map(Duration::as_secs).collect();
        // 1/3 and 2/3 at the interval; emptied at 3/3, then 2, 4, 5 (cap).
        assert_eq!(secs, vec![1, 1, 2, 4, 5, 5, 5]);
        assert_eq!(
            t.observe(ok(&[1])).next_delay,
            SECOND,
            "a scale-up resets the back-off"
        );
    }

    #[test]
    fn back_off_never_exceeds_the_cap_nor_undercuts_the_interval() {
        let interval = Duration::from_millis(300);
        let cap = Duration::from_millis(1000);
        let mut t = Tracker::with_backoff(3, interval, cap);
        for d in delays(&mut t, &vec![Err(LookupError::ServFail); 100]) {
            assert!(
                interval <= d && d <= cap,
                "delay {d:?} outside [{interval:?}, {cap:?}]"
            );
        }
        // A cap below the interval is raised to the interval.
        let mut t = Tracker::with_backoff(3, SECOND, Duration::from_millis(1));
        assert_eq!(t.observe(Err(LookupError::ServFail)).next_delay, SECOND);
        // A zero interval is raised to MIN_INTERVAL.
        let mut t = Tracker::with_backoff(3, Duration::ZERO, Duration::ZERO);
        assert_eq!(t.observe(ok(&[1])).next_delay, MIN_INTERVAL);
    }

    #[test]
    fn lookup_error_kinds() {
        assert!(LookupError::NxDomain.is_negative());
        assert!(LookupError::NoRecords.is_negative());
        for e in [
            LookupError::ServFail,
            LookupError::Timeout,
            LookupError::Refused,
            LookupError::Other("x".into()),
        ] {
            assert!(
                !e.is_negative(),
                "{e:?} is a failure, not a negative answer"
            );
        }
    }

    #[test]
    fn tasks_name_is_fully_qualified() {
        assert_eq!(tasks_name("web"), "tasks.web.");
        assert_eq!(tasks_name("stack_web"), "tasks.stack_web.");
        assert_eq!(tasks_name("web."), "tasks.web.");
        assert_eq!(fqdn("tasks.web"), "tasks.web.");
        assert_eq!(fqdn("tasks.web."), "tasks.web.");
    }

    #[test]
    fn family_matches_its_addresses() {
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(Family::V4.matches(&ip(1)) && !Family::V4.matches(&v6));
        assert!(Family::V6.matches(&v6) && !Family::V6.matches(&ip(1)));
    }

    type Step = Result<Vec<IpAddr>, LookupError>;

    /// A scripted resolver: returns the steps in order, then repeats the last.
    struct Fake {
        script: Mutex<VecDeque<Step>>,
        calls: Mutex<Vec<(Instant, String)>>,
        latency: Duration,
        in_flight: AtomicU32,
        max_in_flight: AtomicU32,
        done: AtomicU64,
    }

    impl Fake {
        fn new(steps: Vec<Step>, latency: Duration) -> Arc<Self> {
            Arc::new(Self {
                script: Mutex::new(steps.into()),
                calls: Mutex::default(),
                latency,
                in_flight: AtomicU32::new(0),
                max_in_flight: AtomicU32::new(0),
                done: AtomicU64::new(0),
            })
        }

        fn call_times(&self, start: Instant) -> Vec<Duration> {
            let calls = self.calls.lock().unwrap();
            calls
                .iter()
                .map(|(at, _)| at.duration_since(start))
                .collect()
        }
    }

    impl Resolve for Fake {
        async fn lookup(&self, name: &str, _family: Family) -> Result<Vec<IpAddr>, LookupError> {
            self.calls
                .lock()
                .unwrap()
                .push((Instant::now(), name.to_owned()));
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.latency).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.done.fetch_add(1, Ordering::SeqCst);
            let mut script = self.script.lock().unwrap();
            if script.len() > 1 {
                script.pop_front().unwrap()
            } else {
                script.front().cloned().expect("empty script")
            }
        }
    }

    struct Running {
        rx: watch::Receiver<BTreeSet<IpAddr>>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        stats: Arc<QueryStats>,
        start: Instant,
    }

    fn spawn(poller: Poller<Arc<Fake>>, initial: BTreeSet<IpAddr>) -> Running {
        let (tx, rx) = watch::channel(initial);
        let (stop, stop_rx) = watch::channel(false);
        let stats = poller.stats();
        let start = Instant::now();
        let task = tokio::spawn(poller.run(tx, stop_rx));
        Running {
            rx,
            stop,
            task,
            stats,
            start,
        }
    }

    impl Running {
        async fn stop(self) {
            self.stop.send(true).unwrap();
            tokio::time::timeout(SECOND, self.task)
                .await
                .expect("the loop must stop within 1 s of shutdown")
                .unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn loop_asks_tasks_name_and_publishes_changes() {
        let fake = Fake::new(vec![ok(&[1, 2]), ok(&[1, 2]), ok(&[2, 3])], Duration::ZERO);
        let mut run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4),
            BTreeSet::new(),
        );
        let first = run.rx.wait_for(|s| !s.is_empty()).await.unwrap().clone();
        assert_eq!(first, set(&[1, 2]));
        let second = run.rx.wait_for(|s| *s != first).await.unwrap().clone();
        assert_eq!(second, set(&[2, 3]));
        assert_eq!(fake.calls.lock().unwrap()[0].1, "tasks.web.");
        let counts = run.stats.snapshot();
        assert_eq!(counts.changes, 2, "two changes published: {counts:?}");
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn loop_keeps_the_set_through_failures_and_backs_off() {
        let fake = Fake::new(
            vec![
                ok(&[1]),
                Err(LookupError::ServFail),
                Err(LookupError::ServFail),
                Err(LookupError::ServFail),
                Err(LookupError::Timeout),
                ok(&[1, 2]),
            ],
            Duration::ZERO,
        );
        let mut run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4),
            BTreeSet::new(),
        );
        let mut seen = Vec::new();
        loop {
            run.rx.changed().await.unwrap();
            let now = run.rx.borrow_and_update().clone();
            seen.push(now.clone());
            if now.len() == 2 {
                break;
            }
        }
        assert_eq!(
            seen,
            vec![set(&[1]), set(&[1, 2])],
            "failures must never publish a set"
        );
        let secs: Vec<u64> = fake
            .call_times(run.start)
            .iter()
            .map(Duration::as_secs)
            .collect();
        assert_eq!(secs, vec![0, 1, 3, 7, 12, 17], "query times with back-off");
        let counts = run.stats.snapshot();
        assert_eq!(
            (counts.servfail, counts.timeout, counts.answers),
            (3, 1, 2),
            "{counts:?}"
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn loop_empties_after_empty_polls_at_the_interval() {
        let fake = Fake::new(
            vec![ok(&[1, 2]), Err(LookupError::NxDomain)],
            Duration::ZERO,
        );
        let mut run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4),
            BTreeSet::new(),
        );
        run.rx.wait_for(|s| !s.is_empty()).await.unwrap();
        run.rx.wait_for(|s| s.is_empty()).await.unwrap();
        assert_eq!(
            run.start.elapsed(),
            Duration::from_secs(3),
            "answer at 0 s, NX at 1, 2, 3 s"
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn query_rate_at_zero_replicas_is_bounded() {
        let fake = Fake::new(vec![Err(LookupError::NxDomain)], Duration::ZERO);
        let run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4),
            BTreeSet::new(),
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        let times = fake.call_times(run.start);
        let secs: Vec<u64> = times.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![0, 2, 6, 11, 16, 21, 26, 31, 36, 41, 46, 51, 56]);
        assert_eq!(run.stats.snapshot().queries, 13);
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scale_up_from_zero_is_seen_within_the_cap() {
        let fake = Fake::new(vec![Err(LookupError::NxDomain)], Duration::ZERO);
        let mut run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4),
            BTreeSet::new(),
        );
        // Long at zero: the back-off is at its cap.
        tokio::time::sleep(Duration::from_secs(30)).await;
        *fake.script.lock().unwrap() = VecDeque::from([ok(&[9])]);
        let scaled = Instant::now();
        run.rx.wait_for(|s| !s.is_empty()).await.unwrap();
        assert!(
            scaled.elapsed() <= DEFAULT_MAX_BACKOFF,
            "scale-up seen after {:?}, cap {DEFAULT_MAX_BACKOFF:?}",
            scaled.elapsed()
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_one_lookup_in_flight() {
        let fake = Fake::new(vec![ok(&[1])], Duration::from_secs(3));
        let run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4),
            BTreeSet::new(),
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), 1);
        let times = fake.call_times(run.start);
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_secs(4),
                "a lookup started {:?} after the previous one; expected latency 3 s + interval 1 s",
                pair[1] - pair[0]
            );
        }
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_interrupts_a_lookup() {
        let fake = Fake::new(vec![ok(&[1])], Duration::from_secs(3600));
        let run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4),
            BTreeSet::new(),
        );
        tokio::time::sleep(SECOND).await;
        assert_eq!(fake.in_flight.load(Ordering::SeqCst), 1);
        run.stop().await;
        assert_eq!(
            fake.done.load(Ordering::SeqCst),
            0,
            "the lookup was dropped, not awaited"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn foreign_family_is_ignored() {
        let v6: IpAddr = "fd00::7".parse().unwrap();
        let fake = Fake::new(vec![Ok(vec![ip(1), v6, v6])], Duration::ZERO);
        let mut run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V6),
            BTreeSet::new(),
        );
        let got = run.rx.wait_for(|s| !s.is_empty()).await.unwrap().clone();
        assert_eq!(got, BTreeSet::from([v6]));
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_channel_value_seeds_the_tracker() {
        let fake = Fake::new(vec![Err(LookupError::NxDomain)], Duration::ZERO);
        let mut run = spawn(
            Poller::new(Arc::clone(&fake), "tasks.web", Family::V4).empty_polls(2),
            set(&[1, 2]),
        );
        run.rx.wait_for(|s| s.is_empty()).await.unwrap();
        assert_eq!(
            run.start.elapsed(),
            SECOND,
            "the seeded set is emptied by the 2nd NX at 1 s, not by the first"
        );
        run.stop().await;
    }

    /// The last success moves on answers, negative ones included, never on
    /// failures; a poller given shared counters counts into them.
    #[tokio::test(start_paused = true)]
    async fn last_success_is_the_last_answer_and_shared_stats_keep_counting() {
        let stats = QueryStats::default();
        for failure in [LookupError::Timeout, LookupError::ServFail] {
            stats.record(&Err(failure));
        }
        assert_eq!(
            stats.snapshot().last_success_unix_ms,
            0,
            "failures set a last success"
        );
        let before = crate::clock::now_ms();
        stats.record(&Err(LookupError::NxDomain));
        let at = stats.snapshot().last_success_unix_ms;
        assert!(
            at >= before,
            "NXDOMAIN is an answer: last success {at}, before {before}"
        );

        let shared = Arc::new(QueryStats::default());
        for _ in 0..2 {
            let fake = Fake::new(vec![ok(&[1])], Duration::ZERO);
            let poller = Poller::new(Arc::clone(&fake), "tasks.web", Family::V4)
                .with_stats(Arc::clone(&shared));
            let mut run = spawn(poller, BTreeSet::new());
            run.rx.wait_for(|s| !s.is_empty()).await.unwrap();
            run.stop().await;
        }
        let c = shared.snapshot();
        assert_eq!(
            (c.queries, c.answers, c.changes),
            (2, 2, 2),
            "two pollers sharing counters: {c:?}"
        );
        assert!(c.last_success_unix_ms > 0, "{c:?}");
    }
}
