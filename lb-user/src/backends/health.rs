//! Health checks: one TCP connect or HTTP GET per backend per interval, and
//! the rise/fall hysteresis that turns single results into verdicts.
//!
//! Operator-facing behaviour:
//! - A check is either a TCP connect (pass = the three-way handshake completes
//!   within the timeout) or an HTTP/1.1 `GET http://<task-ip>:<port><path>`
//!   (pass = a response with exactly the expected status arrives within the
//!   timeout; redirects are not followed, the body is not read).
//! - Every check opens a fresh connection: a check that reused a pooled
//!   connection would only prove that an old socket is still open. TCP checks
//!   close with a reset (`SO_LINGER` 0, as HAProxy does), so they leave no
//!   `TIME_WAIT` sockets behind on the balancer.
//! - Checks are ordinary sockets of the host, so they use its ephemeral ports
//!   (`net.ipv4.ip_local_port_range`). The data plane's SNAT port range is
//!   disjoint from that range (the daemon refuses to start otherwise), so
//!   check replies are never mistaken for NATed flows.
//! - HTTP checks send `Host: <task-ip>:<port>` and never use a proxy, whatever
//!   `HTTP_PROXY`/`http_proxy` say in the daemon's environment.
//! - A new backend has no verdict ("probing") and gets no traffic. It becomes
//!   healthy after `rise` consecutive passes, or is declared down after `fall`
//!   consecutive failures (so a task that never starts shows up as down, not
//!   as probing forever). A healthy backend goes down after `fall` consecutive
//!   failures; a down one comes back after `rise` consecutive passes.
use std::{
    error::Error as _,
    fmt, io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
    time::MissedTickBehavior,
};

/// What to check, already mapped from the service's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: SpecKind,
    /// Upper bound on one whole check: connect, and for HTTP also the request
    /// and the response headers.
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecKind {
    /// Pass when a TCP connection is accepted.
    Tcp,
    /// Pass when `GET <path>` answers with `expect_status`. A path without a
    /// leading `/` gets one.
    Http { path: String, expect_status: u16 },
}

/// Why a check failed, for metrics and for branching; the human-readable
/// version is [`CheckResult::detail`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The backend answered the SYN with a reset: nothing listens there.
    Refused,
    /// No connection or no response within the check timeout.
    Timeout,
    /// The connection was reset after it was established.
    Reset,
    /// An HTTP response arrived with another status than expected.
    HttpStatus(u16),
    /// The HTTP exchange failed (malformed response, connection closed early).
    Http(String),
    /// Anything else, e.g. "No route to host".
    Other(String),
}

impl FailureKind {
    /// Stable, machine-friendly name (metrics labels, JSON).
    pub fn label(&self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Timeout => "timeout",
            FailureKind::Reset => "reset",
            FailureKind::HttpStatus(_) => "http_status",
            FailureKind::Http(_) => "http",
            FailureKind::Other(_) => "other",
        }
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    pub ok: bool,
    /// Time from the start of the check to its outcome (connect completed,
    /// response headers received, error, or timeout).
    pub latency: Duration,
    /// One line for operators: "TCP connect in 0.2 ms", "connect refused",
    /// "connect timeout after 500ms", "HTTP 503 (expected 200)",
    /// "HTTP 200 in 3.1 ms".
    pub detail: String,
    /// `None` exactly when `ok`.
    pub failure: Option<FailureKind>,
}

impl CheckResult {
    fn pass(latency: Duration, detail: String) -> Self {
        Self {
            ok: true,
            latency,
            detail,
            failure: None,
        }
    }

    fn fail(latency: Duration, failure: FailureKind, detail: String) -> Self {
        Self {
            ok: false,
            latency,
            detail,
            failure: Some(failure),
        }
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The HTTP client for all checks of the daemon. Build it once and clone it
/// (clones share one connector).
///
/// - `no_proxy()`: checks go straight to the task, never through a proxy
///   configured in the environment.
/// - `pool_max_idle_per_host(0)`: no keep-alive between checks, so every
///   check really connects.
/// - No redirects: a 3xx is reported as such and compared with the expected
///   status; following it could lead anywhere.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("xdplb-health-check/", env!("CARGO_PKG_VERSION")))
        .build()
        // Building fails only when a TLS backend or the system proxy
        // configuration cannot be initialised; neither is compiled in.
        .expect("building the health-check HTTP client (no TLS, no proxy) cannot fail")
}

/// Run one check against `target`. Never returns an error: every failure is a
/// [`CheckResult`] with `ok == false` and a [`FailureKind`].
pub async fn check_once(
    client: &reqwest::Client,
    target: SocketAddr,
    spec: &CheckSpec,
) -> CheckResult {
    match &spec.kind {
        SpecKind::Tcp => check_tcp(target, spec.timeout).await,
        SpecKind::Http {
            path,
            expect_status,
        } => check_http(client, target, path, *expect_status, spec.timeout).await,
    }
}

async fn check_tcp(target: SocketAddr, timeout: Duration) -> CheckResult {
    let start = Instant::now();
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => {
            let latency = start.elapsed();
            // Abortive close: no TIME_WAIT on our side. A failure to set the
            // option only costs one TIME_WAIT socket, so it is not an error.
            let _ = stream.set_zero_linger();
            drop(stream);
            CheckResult::pass(latency, format!("TCP connect in {}", fmt_latency(latency)))
        }
        Ok(Err(err)) => {
            let (failure, detail) = classify_io(&err);
            CheckResult::fail(start.elapsed(), failure, detail)
        }
        Err(_elapsed) => CheckResult::fail(
            start.elapsed(),
            FailureKind::Timeout,
            format!("connect timeout after {}", fmt_duration(timeout)),
        ),
    }
}

async fn check_http(
    client: &reqwest::Client,
    target: SocketAddr,
    path: &str,
    expect_status: u16,
    timeout: Duration,
) -> CheckResult {
    let url = check_url(target, path);
    let start = Instant::now();
    // One deadline for connect + request + response headers. Dropping the
    // future on timeout drops the connection with it.
    match tokio::time::timeout(timeout, client.get(&url).send()).await {
        Ok(Ok(response)) => {
            let latency = start.elapsed();
            let status = response.status().as_u16();
            if status == expect_status {
                CheckResult::pass(
                    latency,
                    format!("HTTP {status} in {}", fmt_latency(latency)),
                )
            } else {
                CheckResult::fail(
                    latency,
                    FailureKind::HttpStatus(status),
                    format!("HTTP {status} (expected {expect_status})"),
                )
            }
        }
        Ok(Err(err)) => {
            let (failure, detail) = classify_reqwest(&err, timeout);
            CheckResult::fail(start.elapsed(), failure, detail)
        }
        Err(_elapsed) => CheckResult::fail(
            start.elapsed(),
            FailureKind::Timeout,
            format!("HTTP timeout after {}", fmt_duration(timeout)),
        ),
    }
}

/// `http://IP:PORT/path`; IPv6 addresses are bracketed by `SocketAddr`'s
/// `Display`.
fn check_url(target: SocketAddr, path: &str) -> String {
    if path.starts_with('/') {
        format!("http://{target}{path}")
    } else {
        format!("http://{target}/{path}")
    }
}

fn classify_io(err: &io::Error) -> (FailureKind, String) {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => (FailureKind::Refused, "connect refused".to_owned()),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            (FailureKind::Reset, "connection reset".to_owned())
        }
        // The kernel gave up (SYN retries exhausted) before our timeout did.
        io::ErrorKind::TimedOut => (FailureKind::Timeout, "connect timed out".to_owned()),
        _ => (
            FailureKind::Other(err.to_string()),
            format!("connect failed: {err}"),
        ),
    }
}

fn classify_reqwest(err: &reqwest::Error, timeout: Duration) -> (FailureKind, String) {
    // The io::Error, if any, is the most precise description of what happened.
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io_err) = cause.downcast_ref::<io::Error>() {
            if matches!(
                io_err.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ) {
                return classify_io(io_err);
            }
        }
        source = cause.source();
    }
    if err.is_timeout() {
        return (
            FailureKind::Timeout,
            format!("HTTP timeout after {}", fmt_duration(timeout)),
        );
    }
    // reqwest's own message repeats the URL; the causes say what went wrong.
    let mut causes = Vec::new();
    let mut source = err.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let text = if causes.is_empty() {
        err.to_string()
    } else {
        causes.join(": ")
    };
    if err.is_connect() {
        (
            FailureKind::Other(text.clone()),
            format!("connect failed: {text}"),
        )
    } else {
        (
            FailureKind::Http(text.clone()),
            format!("HTTP error: {text}"),
        )
    }
}

/// "3.1 ms": latencies are reported with 0.1 ms resolution.
pub fn fmt_latency(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// "500ms", "1s 500ms": configured durations, as the config file spells them.
fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Rise/fall hysteresis over single check results. Pure: no clock, no I/O.
///
/// A new backend has no verdict (probing, counted as not healthy). It becomes
/// healthy after `rise` consecutive passes, or down after `fall` consecutive
/// failures. A healthy backend goes down after `fall` consecutive failures; a
/// down one becomes healthy after `rise` consecutive passes. Any result of the
/// other kind resets the streak, so a flapping backend keeps its verdict.
/// `rise` and `fall` of 0 are treated as 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    verdict: Option<bool>,
    passes: u32,
    failures: u32,
    last: Option<bool>,
    checks: u64,
}

impl Hysteresis {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            verdict: None,
            passes: 0,
            failures: 0,
            last: None,
            checks: 0,
        }
    }

    /// Feed one check result. Returns `Some(healthy)` when the verdict changes:
    /// `Some(true)` when a probing or down backend has passed `rise` times in a
    /// row, `Some(false)` when a probing or healthy backend has failed `fall`
    /// times in a row. `None` otherwise.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        self.checks += 1;
        self.last = Some(ok);
        if ok {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            if self.verdict != Some(true) && self.passes >= self.rise {
                self.verdict = Some(true);
                return Some(true);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            if self.verdict != Some(false) && self.failures >= self.fall {
                self.verdict = Some(false);
                return Some(false);
            }
        }
        None
    }

    /// Healthy = may receive traffic. Probing counts as not healthy.
    pub fn healthy(&self) -> bool {
        self.verdict == Some(true)
    }

    /// `None` while probing (neither `rise` passes nor `fall` failures yet).
    pub fn verdict(&self) -> Option<bool> {
        self.verdict
    }

    pub fn consecutive_passes(&self) -> u32 {
        self.passes
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Result of the most recent check, `None` before the first.
    pub fn last(&self) -> Option<bool> {
        self.last
    }

    /// Number of results observed.
    pub fn checks(&self) -> u64 {
        self.checks
    }

    pub fn rise(&self) -> u32 {
        self.rise
    }

    pub fn fall(&self) -> u32 {
        self.fall
    }

    /// Explain the state after the last [`observe`](Self::observe), whose
    /// return value is `transition` and whose result reads `detail`:
    /// "3 consecutive failures: connect refused", "2 consecutive passes:
    /// HTTP 200 in 3.1 ms", "failure 1 of 3 before leaving rotation: ...".
    pub fn reason(&self, detail: &str, transition: Option<bool>) -> String {
        match (transition, self.verdict, self.last == Some(true)) {
            (Some(true), ..) => format!("{}: {detail}", count(self.passes, "consecutive pass")),
            (Some(false), ..) => {
                format!("{}: {detail}", count(self.failures, "consecutive failure"))
            }
            (None, Some(true), true) => format!("healthy: {detail}"),
            (None, Some(true), false) => format!(
                "failure {} of {} before leaving rotation: {detail}",
                self.failures, self.fall
            ),
            (None, _, true) => format!(
                "pass {} of {} before entering rotation: {detail}",
                self.passes, self.rise
            ),
            (None, Some(false), false) => format!(
                "still down, {}: {detail}",
                count(self.failures, "consecutive failure")
            ),
            (None, None, false) => format!(
                "failure {} of {} before marking down: {detail}",
                self.failures, self.fall
            ),
        }
    }
}

/// "1 consecutive pass", "2 consecutive passes", "3 consecutive failures".
fn count(n: u32, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else if noun.ends_with('s') {
        format!("{n} {noun}es")
    } else {
        format!("{n} {noun}s")
    }
}

/// One check result of one backend, sent by [`run_checker`] after every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub target: SocketAddr,
    /// The verdict after this result (probing counts as `false`).
    pub healthy: bool,
    /// `Some(new_healthy)` when this result changed the verdict (see
    /// [`Hysteresis::observe`]); feed those to the backend state machine.
    pub transition: Option<bool>,
    pub result: CheckResult,
    /// Why the verdict is what it is, from [`Hysteresis::reason`].
    pub reason: String,
}

/// Check `target` every `interval` until `shutdown` turns `true` (or its
/// sender is dropped) or `tx`'s receiver is dropped.
///
/// The first check runs at once; later ones start `interval` after the
/// previous one started, or right after it ended if it took longer than that
/// (checks of one backend never overlap). An interval of zero is treated as
/// 1 ms. Every result is sent as a [`HealthEvent`], so the daemon can publish
/// the latest result and latency; `transition` is set when the verdict
/// changes. Shutdown interrupts a check in progress.
///
/// `client` is the daemon's shared [`http_client`]; TCP checks don't use it.
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per check setting; a struct would only be unpacked again"
)]
pub async fn run_checker(
    client: reqwest::Client,
    target: SocketAddr,
    spec: CheckSpec,
    interval: Duration,
    rise: u32,
    fall: u32,
    tx: mpsc::Sender<HealthEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hysteresis = Hysteresis::new(rise, fall);
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => return,
            result = check_once(&client, target, &spec) => result,
        };
        let transition = hysteresis.observe(result.ok);
        let reason = hysteresis.reason(&result.detail, transition);
        tracing::debug!(%target, ok = result.ok, latency = ?result.latency, %reason, "health check");
        let event = HealthEvent {
            target,
            healthy: hysteresis.healthy(),
            transition,
            result,
            reason,
        };
        tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => return,
            sent = tx.send(event) => if sent.is_err() { return },
        }
    }
}

/// Upper bounds (µs) of the check-latency histogram's buckets
/// (`xdplb_health_check_duration_seconds`).
///
/// A check across the overlay to a task that answers takes from 0.1 to a
/// few milliseconds (a TCP connect is one round trip; an HTTP check adds
/// the request and the application's time to its headers), so the buckets
/// are dense there: 0.25, 0.5, 1, 2.5, 5, 10 and 25 ms separate a healthy
/// task from one that is slowing down. 50 to 250 ms is a task in trouble.
/// 500 ms is the default `check_timeout`: a check that timed out waited a
/// little longer than that and lands in the 1 s bucket, so `le="0.5"`
/// counts the checks that got an answer in time and the step from 0.5 to 1
/// counts the timeouts. 2.5 and 5 s cover longer timeouts (a timeout is
/// shorter than the check interval). 14 buckets with +Inf, per service.
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

/// Health-check results of one service, for `xdplb_health_checks_total` and
/// `xdplb_health_check_duration_seconds` (through the status file). Kept by
/// the daemon, so they start at zero when it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckStats {
    backends: std::collections::BTreeMap<SocketAddr, crate::status::BackendChecks>,
    latency: crate::status::LatencyHistogram,
}

impl Default for CheckStats {
    fn default() -> Self {
        Self {
            backends: Default::default(),
            latency: crate::status::LatencyHistogram::new(&LATENCY_BUCKETS_US),
        }
    }
}

impl CheckStats {
    /// One check of `backend` (the backend's address, not the check target).
    pub fn record(&mut self, backend: SocketAddr, result: &CheckResult) {
        let c = self
            .backends
            .entry(backend)
            .or_insert(crate::status::BackendChecks {
                addr: backend,
                passed: 0,
                failed: 0,
            });
        if result.ok {
            c.passed += 1;
        } else {
            c.failed += 1;
        }
        self.latency
            .observe(u64::try_from(result.latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Drops the counters of backends not in `known` (they left, and their
    /// checkers stopped).
    pub fn retain(&mut self, known: &std::collections::BTreeSet<SocketAddr>) {
        self.backends.retain(|addr, _| known.contains(addr));
    }

    /// What the status file carries: the histogram, and the counters of the
    /// backends in `known` (zero for those not checked yet).
    pub fn status(
        &self,
        known: impl IntoIterator<Item = SocketAddr>,
    ) -> crate::status::ChecksStatus {
        let mut backends: Vec<_> = known
            .into_iter()
            .map(|addr| {
                self.backends
                    .get(&addr)
                    .copied()
                    .unwrap_or(crate::status::BackendChecks {
                        addr,
                        passed: 0,
                        failed: 0,
                    })
            })
            .collect();
        backends.sort_by_key(|b| b.addr);
        backends.dedup_by_key(|b| b.addr);
        crate::status::ChecksStatus {
            latency: self.latency.clone(),
            backends,
        }
    }
}

/// Resolves once the flag is `true` or its sender is gone. Cancel-safe.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// Feed `results` ("+" pass, "-" fail) and collect the transitions.
    fn run(h: &mut Hysteresis, results: &str) -> Vec<Option<bool>> {
        results.chars().map(|c| h.observe(c == '+')).collect()
    }

    #[test]
    fn new_backend_rises_after_rise_passes() {
        let mut h = Hysteresis::new(2, 3);
        assert!(!h.healthy(), "a new backend must start unhealthy");
        assert_eq!(h.verdict(), None, "a new backend has no verdict");
        assert_eq!(h.last(), None);
        assert_eq!(run(&mut h, "++"), [None, Some(true)]);
        assert!(h.healthy());
        assert_eq!(h.consecutive_passes(), 2);
        assert_eq!(h.last(), Some(true));
        assert_eq!(
            run(&mut h, "+++"),
            [None; 3],
            "already healthy: no more flips"
        );
    }

    #[test]
    fn healthy_backend_falls_after_fall_failures() {
        let mut h = Hysteresis::new(2, 3);
        run(&mut h, "++");
        assert_eq!(run(&mut h, "---"), [None, None, Some(false)]);
        assert!(!h.healthy());
        assert_eq!(h.verdict(), Some(false));
        assert_eq!(h.consecutive_failures(), 3);
        assert_eq!(h.consecutive_passes(), 0);
        assert_eq!(
            run(&mut h, "--"),
            [None, None],
            "already down: no more flips"
        );
        assert_eq!(
            run(&mut h, "++"),
            [None, Some(true)],
            "down comes back after rise"
        );
        assert_eq!(h.checks(), 9);
    }

    #[test]
    fn probing_backend_that_keeps_failing_is_declared_down() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(run(&mut h, "---"), [None, None, Some(false)]);
        assert_eq!(h.verdict(), Some(false));
        assert_eq!(run(&mut h, "-"), [None]);
    }

    #[test]
    fn flapping_never_flips_and_resets_streaks() {
        let mut h = Hysteresis::new(2, 2);
        assert_eq!(
            run(&mut h, "+-+-+-+-"),
            [None; 8],
            "alternating results must not decide"
        );
        assert_eq!(h.verdict(), None);
        run(&mut h, "++");
        assert!(h.healthy());
        assert_eq!(
            run(&mut h, "-+-+-+"),
            [None; 6],
            "a healthy flapper stays healthy"
        );
        assert!(h.healthy());
        assert_eq!(h.consecutive_passes(), 1);
        assert_eq!(h.consecutive_failures(), 0);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut h = Hysteresis::new(1, 1);
        assert_eq!(
            run(&mut h, "+-+--+"),
            [
                Some(true),
                Some(false),
                Some(true),
                Some(false),
                None,
                Some(true)
            ]
        );
    }

    #[test]
    fn zero_rise_and_fall_behave_like_one() {
        let mut h = Hysteresis::new(0, 0);
        assert_eq!((h.rise(), h.fall()), (1, 1));
        assert_eq!(run(&mut h, "+-"), [Some(true), Some(false)]);
    }

    #[test]
    fn reasons_explain_each_decision() {
        let mut h = Hysteresis::new(2, 3);
        let t = h.observe(false);
        assert_eq!(
            h.reason("connect refused", t),
            "failure 1 of 3 before marking down: connect refused"
        );
        let t = h.observe(true);
        assert_eq!(
            h.reason("HTTP 200 in 1.0 ms", t),
            "pass 1 of 2 before entering rotation: HTTP 200 in 1.0 ms"
        );
        let t = h.observe(true);
        assert_eq!(
            h.reason("HTTP 200 in 1.0 ms", t),
            "2 consecutive passes: HTTP 200 in 1.0 ms"
        );
        let t = h.observe(true);
        assert_eq!(
            h.reason("HTTP 200 in 1.0 ms", t),
            "healthy: HTTP 200 in 1.0 ms"
        );
        let detail = "connect timeout after 500ms";
        let t = h.observe(false);
        assert_eq!(
            h.reason(detail, t),
            "failure 1 of 3 before leaving rotation: connect timeout after 500ms"
        );
        h.observe(false);
        let t = h.observe(false);
        assert_eq!(t, Some(false));
        assert_eq!(
            h.reason(detail, t),
            "3 consecutive failures: connect timeout after 500ms"
        );
        let t = h.observe(false);
        assert_eq!(
            h.reason(detail, t),
            "still down, 4 consecutive failures: connect timeout after 500ms"
        );
        let mut one = Hysteresis::new(1, 1);
        let t = one.observe(true);
        assert_eq!(one.reason("x", t), "1 consecutive pass: x");
        let t = one.observe(false);
        assert_eq!(one.reason("y", t), "1 consecutive failure: y");
    }

    #[test]
    fn urls_bracket_ipv6_and_add_a_leading_slash() {
        let v4 = SocketAddr::from((Ipv4Addr::new(10, 0, 1, 7), 8080));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 80));
        assert_eq!(check_url(v4, "/healthz"), "http://10.0.1.7:8080/healthz");
        assert_eq!(check_url(v4, "healthz"), "http://10.0.1.7:8080/healthz");
        assert_eq!(check_url(v6, "/"), "http://[::1]:80/");
        assert_eq!(check_url(v6, ""), "http://[::1]:80/");
    }

    #[test]
    fn durations_read_like_the_config_file() {
        assert_eq!(fmt_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1s 500ms");
        assert_eq!(fmt_latency(Duration::from_micros(3140)), "3.1 ms");
        assert_eq!(fmt_latency(Duration::from_micros(260)), "0.3 ms");
    }

    #[test]
    fn io_errors_map_to_failure_kinds() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            classify_io(&refused),
            (FailureKind::Refused, "connect refused".to_owned())
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(classify_io(&reset).0, FailureKind::Reset);
        let unreachable = io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        let (kind, detail) = classify_io(&unreachable);
        assert!(
            matches!(kind, FailureKind::Other(_)) && detail.starts_with("connect failed: "),
            "EHOSTUNREACH should be Other/\"connect failed: ...\", got {kind:?}/{detail:?}"
        );
        assert_eq!(FailureKind::HttpStatus(503).label(), "http_status");
    }

    /// Passes and failures per backend; latency into the bucket whose bound
    /// is the first at or above it (`le` is inclusive), above every bound
    /// into the last; forgotten backends report zero.
    #[test]
    fn check_stats_count_results_and_bucket_latency() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.1.2:80".parse().unwrap(),
            "10.0.1.1:80".parse().unwrap(),
        );
        let ms = Duration::from_millis;
        let mut s = CheckStats::default();
        s.record(a, &CheckResult::pass(ms(1), String::new()));
        s.record(
            a,
            &CheckResult::pass(Duration::from_micros(1_001), String::new()),
        );
        s.record(
            a,
            &CheckResult::fail(ms(503), FailureKind::Timeout, String::new()),
        );
        s.record(
            b,
            &CheckResult::fail(ms(9_000), FailureKind::Timeout, String::new()),
        );
        let st = s.status([a, b, a]);
        let got: Vec<_> = st
            .backends
            .iter()
            .map(|c| (c.addr, c.passed, c.failed))
            .collect();
        assert_eq!(
            got,
            vec![(b, 0, 1), (a, 2, 1)],
            "in address order, once each"
        );
        let h = &st.latency;
        let at = |bound_us: u64| h.counts[h.bounds_us.iter().position(|&x| x == bound_us).unwrap()];
        assert_eq!(
            (
                at(1_000),
                at(2_500),
                at(1_000_000),
                h.counts[h.counts.len() - 1]
            ),
            (1, 1, 1, 1),
            "1 ms in le=0.001, 1.001 ms in le=0.0025, a 503 ms timeout in le=1, \
             9 s above every bound: {h:?}"
        );
        assert_eq!(
            (h.count(), h.sum_us),
            (4, 1_000 + 1_001 + 503_000 + 9_000_000)
        );
        s.retain(&[b].into());
        let got: Vec<_> = s
            .status([a, b])
            .backends
            .iter()
            .map(|c| (c.addr, c.passed, c.failed))
            .collect();
        assert_eq!(
            got,
            vec![(b, 0, 1), (a, 0, 0)],
            "a left: its counts must go"
        );
    }
}
