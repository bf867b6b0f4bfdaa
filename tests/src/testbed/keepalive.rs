//! Keep-alive load: HTTP/1.1 requests one after another on one TCP
//! connection, from a thread in the client namespace.
//!
//! The new-connection loads of [`Client`](super::Client) prove that new
//! flows work; this proves that an established flow goes on working (its
//! connection-table entry and SNAT port are still there), which is what a
//! daemon restart, upgrade or reload must not break. A failed request ends
//! the connection; it is counted, and the load stops there unless told to
//! reconnect.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use testkit::netns::NetNs;

/// Connect and per-request timeout.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two requests on the connection.
const PAUSE: Duration = Duration::from_millis(20);

/// One request on the connection.
#[derive(Clone, Debug)]
pub struct KeptRequest {
    pub at: Instant,
    /// Which connection of this load it went on (0 = the first).
    pub connection: u32,
    /// The backend that answered, or what went wrong.
    pub outcome: Result<String, String>,
}

/// A keep-alive load in the background until [`stop`](Self::stop).
pub struct KeepAlive {
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<KeptRequest>>>,
    thread: Option<JoinHandle<()>>,
}

impl KeepAlive {
    /// Connects to `to` from `ns` and starts sending. With `reconnect`, a
    /// failed connection is replaced by a new one; without, the load ends
    /// at the first failure.
    pub fn start(ns: &NetNs, to: SocketAddr, reconnect: bool) -> Result<Self> {
        let path = ns.path();
        let first = ns
            .run_in(|| {
                TcpStream::connect_timeout(&to, TIMEOUT)
                    .with_context(|| format!("keep-alive connection to {to}"))
            })
            .context("entering the client namespace")?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (halt, log) = (Arc::clone(&stop), Arc::clone(&requests));
        let thread = std::thread::Builder::new()
            .name("keep-alive".into())
            .spawn(move || {
                // Reconnects come from the client namespace too: setns moves
                // only this thread, for its whole life.
                let ns = File::open(&path).expect("opening the client namespace");
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the client namespace");
                let record = |connection, outcome| {
                    log.lock().expect("keep-alive log").push(KeptRequest {
                        at: Instant::now(),
                        connection,
                        outcome,
                    })
                };
                let mut connection = 0;
                let mut conn = Some(BufReader::new(first));
                while !halt.load(Ordering::SeqCst) {
                    let Some(c) = conn.as_mut() else {
                        if !reconnect {
                            break;
                        }
                        connection += 1;
                        match TcpStream::connect_timeout(&to, TIMEOUT) {
                            Ok(s) => conn = Some(BufReader::new(s)),
                            Err(e) => {
                                record(connection, Err(format!("connect: {e}")));
                                std::thread::sleep(PAUSE);
                            }
                        }
                        continue;
                    };
                    let sent = Instant::now();
                    let outcome = request(c).map_err(|e| e.to_string());
                    if outcome.is_err() {
                        conn = None;
                    }
                    log.lock().expect("keep-alive log").push(KeptRequest {
                        at: sent,
                        connection,
                        outcome,
                    });
                    std::thread::sleep(PAUSE);
                }
            })
            .context("spawning the keep-alive thread")?;
        Ok(Self {
            to,
            stop,
            requests,
            thread: Some(thread),
        })
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<KeptRequest> {
        self.requests.lock().expect("keep-alive log").clone()
    }

    /// Stops (the request in flight finishes) and returns every request.
    pub fn stop(mut self) -> KeepAliveReport {
        self.halt();
        KeepAliveReport {
            to: self.to,
            requests: self.requests(),
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What a [`KeepAlive`] load saw.
#[derive(Clone, Debug)]
pub struct KeepAliveReport {
    pub to: SocketAddr,
    pub requests: Vec<KeptRequest>,
}

impl KeepAliveReport {
    pub fn ok(&self) -> usize {
        self.requests.iter().filter(|r| r.outcome.is_ok()).count()
    }

    pub fn failed(&self) -> usize {
        self.requests.len() - self.ok()
    }

    /// Successful requests sent at or after `t`.
    pub fn ok_since(&self, t: Instant) -> usize {
        self.requests
            .iter()
            .filter(|r| r.at >= t && r.outcome.is_ok())
            .count()
    }

    /// Connections used (1 when the first one lasted).
    pub fn connections(&self) -> u32 {
        self.requests
            .iter()
            .map(|r| r.connection)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// The backends that answered, in order of first appearance.
    pub fn backends(&self) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for r in &self.requests {
            if let Ok(b) = &r.outcome {
                if !seen.contains(b) {
                    seen.push(b.clone());
                }
            }
        }
        seen
    }

    /// The first failure, for messages.
    pub fn first_error(&self) -> Option<&str> {
        self.requests
            .iter()
            .find_map(|r| r.outcome.as_ref().err().map(String::as_str))
    }
}

impl std::fmt::Display for KeepAliveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "keep-alive to {}: {} ok, {} failed on {} connection(s), backends {:?}",
            self.to,
            self.ok(),
            self.failed(),
            self.connections(),
            self.backends()
        )?;
        if let Some(e) = self.first_error() {
            write!(f, "; first error: {e}")?;
        }
        Ok(())
    }
}

/// `GET /` on `s` with `Connection: keep-alive`: the first word of the
/// body (the backend's name).
fn request(s: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    s.get_ref().set_read_timeout(Some(TIMEOUT))?;
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: keep-alive\r\n\r\n")?;
    let mut status = String::new();
    if s.read_line(&mut status)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status line {status:?}")));
    }
    let mut len = None;
    loop {
        let mut line = String::new();
        if s.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    let len = len.ok_or_else(|| std::io::Error::other("no content-length"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
