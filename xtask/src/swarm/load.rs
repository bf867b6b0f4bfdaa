//! Continuous client load for the Swarm scenarios: a few threads, each
//! sending one HTTP/1.1 `GET /` per new TCP connection, counting every answer
//! by the backend that gave it and every failure with when it started.
//!
//! One connection per request, so every request is a new flow through the
//! balancer's Maglev pick; that is what makes spreading and removal visible.
//! The backends answer `<hostname> <address>`, so the body names the task.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Client threads. Many, each mostly asleep: a request that hangs until its
/// timeout stalls only its own thread, so one dead task cannot throttle the
/// load that is supposed to show how long it stayed in rotation.
const WORKERS: usize = 16;
/// Pause between two requests of one thread: some 300 requests per second in
/// all, enough to see every task many times a second without crowding two
/// cores that also run the tasks. Faster also means more connections per
/// task in TIME_WAIT, which is where a reused SNAT port gets refused (README,
/// "Deploy on Docker Swarm", known problems).
const PAUSE: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One failed request.
#[derive(Clone, Debug)]
pub struct Failure {
    /// When it started, from the start of the load.
    pub at: Duration,
    pub what: String,
}

/// What the load saw so far (or over a window, see [`Stats::since`]).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Answers per backend (`<hostname> <address>`).
    pub ok: BTreeMap<String, u64>,
    pub failures: Vec<Failure>,
}

impl Stats {
    pub fn answered(&self) -> u64 {
        self.ok.values().sum()
    }

    /// Requests sent and finished: answered plus failed.
    pub fn requests(&self) -> u64 {
        self.answered() + self.failures.len() as u64
    }

    /// What happened after `earlier` was taken (both from the same load).
    pub fn since(&self, earlier: &Stats) -> Stats {
        let ok = self
            .ok
            .iter()
            .filter_map(|(k, v)| {
                let d = v - earlier.ok.get(k).copied().unwrap_or(0);
                (d > 0).then(|| (k.clone(), d))
            })
            .collect();
        Stats {
            ok,
            failures: self.failures[earlier.failures.len()..].to_vec(),
        }
    }

    /// Failures grouped by kind, e.g. `3 x connect: timed out`.
    pub fn failure_kinds(&self) -> String {
        let mut kinds: BTreeMap<&str, u32> = BTreeMap::new();
        for f in &self.failures {
            *kinds.entry(&f.what).or_default() += 1;
        }
        kinds
            .iter()
            .map(|(what, n)| format!("{n} x {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Running load; stops (and joins its threads) when dropped.
pub struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Stats>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(target: SocketAddr) -> Load {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let threads = (0..WORKERS)
            .map(|_| {
                let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let at = started.elapsed();
                        let result = request(target);
                        let mut s = stats.lock().expect("a load thread panicked");
                        match result {
                            Ok(backend) => *s.ok.entry(backend).or_default() += 1,
                            Err(what) => s.failures.push(Failure { at, what }),
                        }
                        drop(s);
                        thread::sleep(PAUSE);
                    }
                })
            })
            .collect();
        Load {
            started,
            stop,
            stats,
            threads,
        }
    }

    /// Time since the load started (the clock of [`Failure::at`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn snapshot(&self) -> Stats {
        self.stats.lock().expect("a load thread panicked").clone()
    }

    /// What a window of `window` shows from now on (the load keeps running).
    pub fn window(&self, window: Duration) -> Stats {
        let before = self.snapshot();
        thread::sleep(window);
        self.snapshot().since(&before)
    }

    /// Stops the threads, waits for requests in flight, and returns everything.
    pub fn finish(mut self) -> Stats {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One request on a new connection. `Ok(backend)` for a 200 with a body,
/// else what went wrong, in a few words that group well.
pub fn request(target: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect: {}", short(&e)))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket: {}", short(&e)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: xdplb-e2e\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {}", short(&e)))?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .map_err(|e| format!("receive: {}", short(&e)))?;
    let reply = String::from_utf8_lossy(&reply);
    if reply.is_empty() {
        return Err("empty reply (closed without an answer)".into());
    }
    let status = reply.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {status}"));
    }
    match reply.split_once("\r\n\r\n") {
        Some((_, body)) if !body.trim().is_empty() => Ok(body.trim().to_string()),
        _ => Err("200 without a body".into()),
    }
}

/// An I/O error without the `(os error N)` suffix, so kinds group.
fn short(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_only_what_happened_in_it() {
        let mut before = Stats::default();
        before.ok.insert("a".into(), 5);
        before.failures.push(Failure {
            at: Duration::ZERO,
            what: "x".into(),
        });
        let mut after = before.clone();
        *after.ok.get_mut("a").unwrap() += 2;
        after.ok.insert("b".into(), 1);
        after.failures.push(Failure {
            at: Duration::from_secs(1),
            what: "y".into(),
        });
        let w = after.since(&before);
        assert_eq!(w.ok.get("a"), Some(&2));
        assert_eq!(w.ok.get("b"), Some(&1));
        assert_eq!(w.failures.len(), 1);
        assert_eq!(w.requests(), 4);
        assert_eq!(w.failure_kinds(), "1 x y");
    }
}
