//! The client side: an OS thread that entered the client namespace and runs a
//! current-thread tokio runtime, so every socket it creates lives there.
//!
//! The methods are blocking (tests are plain `#[test]` functions): each one
//! hands a future to the client thread and waits for its result. Every HTTP
//! request opens a new connection (so every request is a new flow, with a new
//! source port), and connect and request timeouts are short (2 s), so a
//! broken data plane shows up as errors within seconds, not as a hang.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::{sync::mpsc, task::JoinSet};

/// Connect and whole-request timeout of ordinary requests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How many error messages a [`LoadReport`] keeps (the earliest ones).
const KEEP_ERRORS: usize = 5;
/// A load run stops after this many failures in a row (with 2 s timeouts, a
/// dead data plane would otherwise take minutes to report).
pub const GIVE_UP_AFTER: u64 = 40;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The client driver; dropping it stops its thread (and whatever it runs).
pub struct Client {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    http: reqwest::Client,
}

impl Client {
    /// Starts the client thread in the namespace whose file is `ns_path`
    /// (`/var/run/netns/NAME`).
    pub(crate) fn start(ns_path: PathBuf) -> Result<Self> {
        let http = reqwest::Client::builder()
            // Never a proxy from the environment: traffic stays in the testbed.
            .no_proxy()
            // A new connection for every request.
            .pool_max_idle_per_host(0)
            .connect_timeout(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("testbed-client".into())
            .spawn(move || {
                // The thread stays in the namespace until it exits, so there
                // is nothing to restore.
                let setup = (|| -> Result<tokio::runtime::Runtime> {
                    let ns = File::open(&ns_path)
                        .with_context(|| format!("opening {}", ns_path.display()))?;
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns into the client namespace")?;
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building the client runtime")
                })();
                let rt = match setup {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(()));
                        rt
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job);
                    }
                });
            })
            .context("spawning the client thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the client thread died while starting"))??;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            http,
        })
    }

    /// Runs `fut` on the client thread; its result arrives on the receiver.
    fn spawn<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> std_mpsc::Receiver<T> {
        let (tx, rx) = std_mpsc::channel();
        let job: Job = Box::pin(async move {
            let _ = tx.send(fut.await);
        });
        self.jobs
            .as_ref()
            .expect("client running")
            .send(job)
            .expect("the client thread is gone");
        rx
    }

    /// Runs `fut` on the client thread and waits for its result.
    pub fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        self.spawn(fut)
            .recv()
            .expect("the client thread dropped a job")
    }

    /// `GET url` on a new connection: the backend's name (first word of the
    /// body) and the latency.
    pub fn get(&self, url: &str) -> Result<(String, Duration)> {
        self.run(get(self.http.clone(), url.to_owned()))
    }

    /// Sends `GET url` on new connections, `concurrency` at a time, until
    /// `load` is done.
    pub fn load(&self, url: &str, load: Load, concurrency: usize) -> LoadReport {
        let (count, deadline) = match load {
            Load::Count(n) => (Some(n), None),
            Load::For(d) => (None, Some(d)),
        };
        let stop = Arc::new(AtomicBool::new(false));
        self.run(load_loop(
            self.http.clone(),
            url.to_owned(),
            concurrency,
            count,
            deadline,
            stop,
        ))
    }

    /// Like [`load`](Self::load), in the background until
    /// [`LoadHandle::stop`].
    pub fn start_load(&self, url: &str, concurrency: usize) -> LoadHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let report = self.spawn(load_loop(
            self.http.clone(),
            url.to_owned(),
            concurrency,
            None,
            None,
            Arc::clone(&stop),
        ));
        LoadHandle { stop, report }
    }

    /// Open-loop load in the background until [`LoadHandle::stop`]:
    /// `per_sec` requests a second, each on a new connection, each sent on
    /// time whatever happened to the earlier ones. A request that hangs
    /// (a task that vanished) does not hold the others back, so the rate
    /// the balancer sees stays steady through a fault.
    pub fn start_rate(&self, url: &str, per_sec: u32) -> LoadHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let report = self.spawn(rate_loop(
            self.http.clone(),
            url.to_owned(),
            per_sec,
            Arc::clone(&stop),
        ));
        LoadHandle { stop, report }
    }

    /// Starts a long-lived `GET url` (e.g. `/slow?ms=3000`) that may take up
    /// to `timeout`; the handle tells where it landed and how it ended.
    pub fn slow(&self, url: &str, timeout: Duration) -> SlowRequest {
        let (started_tx, started) = std_mpsc::channel();
        let done = self.spawn(slow(self.http.clone(), url.to_owned(), timeout, started_tx));
        SlowRequest {
            started,
            backend: None,
            done,
        }
    }

    /// `POST url` with `len` bytes on a new connection, waiting up to
    /// `timeout`: the backend's name, the byte count it reported, the time.
    pub fn upload(
        &self,
        url: &str,
        len: usize,
        timeout: Duration,
    ) -> Result<(String, u64, Duration)> {
        self.run(upload(self.http.clone(), url.to_owned(), len, timeout))
    }

    /// `GET url` on a new connection, reading the whole body, waiting up to
    /// `timeout`: the backend's name (`x-backend`), the body's length, the
    /// time.
    pub fn download(&self, url: &str, timeout: Duration) -> Result<(String, u64, Duration)> {
        self.run(download(self.http.clone(), url.to_owned(), timeout))
    }

    /// Sends `msg` from a new UDP socket (a new flow) to `to` and returns the
    /// name of the backend that echoed it.
    pub fn udp(&self, to: SocketAddr, msg: &str) -> Result<String> {
        self.run(udp(to, msg.to_owned()))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn get(http: reqwest::Client, url: String) -> Result<(String, Duration)> {
    let start = Instant::now();
    let response = http.get(&url).send().await?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {}", body.trim());
    }
    let name = body
        .split_whitespace()
        .next()
        .with_context(|| format!("an empty answer from {url}"))?;
    Ok((name.to_owned(), start.elapsed()))
}

async fn upload(
    http: reqwest::Client,
    url: String,
    len: usize,
    timeout: Duration,
) -> Result<(String, u64, Duration)> {
    let start = Instant::now();
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let response = http.post(&url).timeout(timeout).body(body).send().await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {}", text.trim());
    }
    // `b3 10.20.0.13 N`
    let mut words = text.split_whitespace();
    let name = words.next().unwrap_or_default().to_owned();
    let count = words
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no byte count in the answer {text:?}"))?;
    Ok((name, count, start.elapsed()))
}

async fn download(
    http: reqwest::Client,
    url: String,
    timeout: Duration,
) -> Result<(String, u64, Duration)> {
    let start = Instant::now();
    let response = http.get(&url).timeout(timeout).send().await?;
    let status = response.status();
    let name = response
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let body = response.bytes().await?;
    if !status.is_success() {
        bail!("HTTP {status} from {name}");
    }
    Ok((name, body.len() as u64, start.elapsed()))
}

/// How much load to send.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// This many requests in all.
    Count(u64),
    /// Requests for this long.
    For(Duration),
}

/// One request of a load run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When it was sent (the connection attempt began).
    pub at: Instant,
    pub latency: Duration,
    /// The backend that answered; `None` if the request failed.
    pub backend: Option<String>,
}

/// What a load run saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// When the run started.
    pub started: Option<Instant>,
    /// Every request, in the order they were sent.
    pub outcomes: Vec<Outcome>,
    pub ok: u64,
    pub failed: u64,
    /// Successful requests per backend name.
    pub per_backend: BTreeMap<String, u64>,
    /// The first few errors, each with its time since the start.
    pub errors: Vec<String>,
    pub elapsed: Duration,
    pub max_latency: Duration,
    /// Time since the start of the first and of the last failure.
    pub failure_window: Option<(Duration, Duration)>,
    /// The run stopped early: [`GIVE_UP_AFTER`] requests in a row failed.
    pub gave_up: bool,
}

impl LoadReport {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// Requests sent in `[from, to)`: (succeeded, failed).
    pub fn between(&self, from: Instant, to: Instant) -> (u64, u64) {
        let mut counts = (0, 0);
        for o in self.outcomes.iter().filter(|o| o.at >= from && o.at < to) {
            if o.backend.is_some() {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
        counts
    }

    /// Successful requests per backend among those sent in `[from, to)`.
    pub fn per_backend_between(&self, from: Instant, to: Instant) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for o in self.outcomes.iter().filter(|o| o.at >= from && o.at < to) {
            if let Some(b) = &o.backend {
                *out.entry(b.clone()).or_default() += 1;
            }
        }
        out
    }

    /// When the last failed request was sent.
    pub fn last_failure(&self) -> Option<Instant> {
        self.outcomes
            .iter()
            .filter(|o| o.backend.is_none())
            .map(|o| o.at)
            .max()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests in {:.2?}: {} ok, {} failed; per backend {:?}; max latency {:.1?}",
            self.total(),
            self.elapsed,
            self.ok,
            self.failed,
            self.per_backend,
            self.max_latency
        )?;
        if self.gave_up {
            write!(f, "; GAVE UP after {GIVE_UP_AFTER} failures in a row")?;
        }
        if let Some((first, last)) = self.failure_window {
            write!(f, "; failures from +{first:.2?} to +{last:.2?}")?;
        }
        for e in &self.errors {
            write!(f, "\n    {e}")?;
        }
        Ok(())
    }
}

/// A load run in the background.
pub struct LoadHandle {
    stop: Arc<AtomicBool>,
    report: std_mpsc::Receiver<LoadReport>,
}

impl LoadHandle {
    /// Stops sending (requests in flight finish) and returns the report.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.report
            .recv()
            .expect("the client thread dropped a load run")
    }
}

#[derive(Default)]
struct Partial {
    ok: Vec<(Duration, String, Duration)>,
    failed: Vec<(Duration, String)>,
    outcomes: Vec<Outcome>,
}

impl Partial {
    /// Records one request sent at `sent` that ended `took` later (`start`
    /// is the run's start).
    fn record(
        &mut self,
        start: Instant,
        sent: Instant,
        took: Duration,
        result: Result<(String, Duration)>,
    ) {
        let at = sent - start;
        match result {
            Ok((name, latency)) => {
                self.outcomes.push(Outcome {
                    at: sent,
                    latency,
                    backend: Some(name.clone()),
                });
                self.ok.push((at, name, latency));
            }
            Err(e) => {
                self.outcomes.push(Outcome {
                    at: sent,
                    latency: took,
                    backend: None,
                });
                self.failed.push((at, format!("{e:#}")));
            }
        }
    }

    fn extend(&mut self, other: Partial) {
        self.ok.extend(other.ok);
        self.failed.extend(other.failed);
        self.outcomes.extend(other.outcomes);
    }
}

async fn rate_loop(
    http: reqwest::Client,
    url: String,
    per_sec: u32,
    stop: Arc<AtomicBool>,
) -> LoadReport {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec.max(1));
    // Late ticks are sent late, not in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = JoinSet::new();
    let mut all = Partial::default();
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let (http, url) = (http.clone(), url.clone());
        in_flight.spawn(async move {
            let sent = Instant::now();
            let result = get(http, url).await;
            (sent, sent.elapsed(), result)
        });
        while let Some(done) = in_flight.try_join_next() {
            let (sent, took, result) = done.expect("a request task panicked");
            all.record(start, sent, took, result);
        }
    }
    while let Some(done) = in_flight.join_next().await {
        let (sent, took, result) = done.expect("a request task panicked");
        all.record(start, sent, took, result);
    }
    finish(start, all, false)
}

async fn load_loop(
    http: reqwest::Client,
    url: String,
    concurrency: usize,
    count: Option<u64>,
    length: Option<Duration>,
    stop: Arc<AtomicBool>,
) -> LoadReport {
    let start = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let failing = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (http, url, stop, issued, failing) = (
            http.clone(),
            url.clone(),
            Arc::clone(&stop),
            Arc::clone(&issued),
            Arc::clone(&failing),
        );
        workers.spawn(async move {
            let mut seen = Partial::default();
            loop {
                if stop.load(Ordering::SeqCst)
                    || length.is_some_and(|d| start.elapsed() >= d)
                    || failing.load(Ordering::SeqCst) >= GIVE_UP_AFTER
                {
                    break;
                }
                if count.is_some_and(|n| issued.fetch_add(1, Ordering::SeqCst) >= n) {
                    break;
                }
                let sent = Instant::now();
                let result = get(http.clone(), url.clone()).await;
                if result.is_ok() {
                    failing.store(0, Ordering::SeqCst);
                } else {
                    failing.fetch_add(1, Ordering::SeqCst);
                }
                seen.record(start, sent, sent.elapsed(), result);
            }
            seen
        });
    }
    let mut all = Partial::default();
    while let Some(done) = workers.join_next().await {
        all.extend(done.expect("a load worker panicked"));
    }
    finish(start, all, failing.load(Ordering::SeqCst) >= GIVE_UP_AFTER)
}

/// The report of a finished run.
fn finish(start: Instant, mut all: Partial, gave_up: bool) -> LoadReport {
    all.failed.sort_by_key(|(at, _)| *at);
    all.outcomes.sort_by_key(|o| o.at);
    let mut report = LoadReport {
        started: Some(start),
        outcomes: all.outcomes,
        ok: all.ok.len() as u64,
        failed: all.failed.len() as u64,
        elapsed: start.elapsed(),
        gave_up,
        ..LoadReport::default()
    };
    for (_, name, latency) in all.ok {
        *report.per_backend.entry(name).or_default() += 1;
        report.max_latency = report.max_latency.max(latency);
    }
    report.failure_window = all
        .failed
        .first()
        .zip(all.failed.last())
        .map(|(first, last)| (first.0, last.0));
    report.errors = all
        .failed
        .iter()
        .take(KEEP_ERRORS)
        .map(|(at, e)| format!("+{at:.3?}: {e}"))
        .collect();
    report
}

/// A long-lived request in flight.
pub struct SlowRequest {
    started: std_mpsc::Receiver<Result<String>>,
    backend: Option<String>,
    done: std_mpsc::Receiver<Result<(String, Duration)>>,
}

impl SlowRequest {
    /// The backend serving it (from the response headers), waiting up to 5 s
    /// for them.
    pub fn backend(&mut self) -> Result<String> {
        if let Some(name) = &self.backend {
            return Ok(name.clone());
        }
        let name = self
            .started
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("no response headers within 5 s"))??;
        self.backend = Some(name.clone());
        Ok(name)
    }

    /// Waits for the end: the backend's name and the total time, or why the
    /// answer did not arrive complete.
    pub fn wait(self) -> Result<(String, Duration)> {
        self.done
            .recv()
            .expect("the client thread dropped a request")
    }
}

async fn slow(
    http: reqwest::Client,
    url: String,
    timeout: Duration,
    started: std_mpsc::Sender<Result<String>>,
) -> Result<(String, Duration)> {
    let start = Instant::now();
    let response = match http.get(&url).timeout(timeout).send().await {
        Ok(r) => r,
        Err(e) => {
            let _ = started.send(Err(anyhow!("{e:#}")));
            return Err(e.into());
        }
    };
    let name = response
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let _ = started.send(Ok(name.clone()));
    let status = response.status();
    let mut response = response;
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                let e = anyhow::Error::new(e);
                bail!(
                    "{url} on {name}: the answer broke off after {:.2?} and {} bytes: {e:#}",
                    start.elapsed(),
                    body.len()
                );
            }
        }
    }
    if !status.is_success() || !body.ends_with(b"done\n") {
        bail!(
            "{url} on {name}: HTTP {status}, incomplete answer after {:.2?}: {:?}",
            start.elapsed(),
            String::from_utf8_lossy(&body)
        );
    }
    Ok((name, start.elapsed()))
}

async fn udp(to: SocketAddr, msg: String) -> Result<String> {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    socket.send_to(msg.as_bytes(), to).await?;
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(REQUEST_TIMEOUT, socket.recv_from(&mut buf))
        .await
        .map_err(|_| anyhow!("no UDP answer from {to} within {REQUEST_TIMEOUT:?}"))??;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if from != to || !reply.ends_with(msg.as_str()) {
        bail!("unexpected UDP answer from {from} (sent {msg:?} to {to}): {reply:?}");
    }
    let name = reply.split_whitespace().next().unwrap_or_default();
    Ok(name.to_owned())
}
