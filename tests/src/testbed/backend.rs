//! One Swarm task: a namespace on the overlay bridge with an HTTP server on
//! port 80 and a UDP echo server on port 5353, both bound inside it.
//!
//! HTTP (hyper, HTTP/1.1):
//! - `GET /` answers `b3 10.20.0.13\n` (the backend's name and address);
//! - `GET /slow?ms=N` streams for N ms: the name line at once, a `.` every
//!   100 ms, then `done\n` (a long-lived connection; a client that sees
//!   `done` knows its flow survived to the end);
//! - `GET /healthz` answers `ok` (for `check = "http:/healthz"`);
//! - `GET /bytes?n=N` answers N bytes (a download as big as the test wants);
//! - `POST /upload` reads the whole body and answers `b3 10.20.0.13 N\n`
//!   with its length N (an upload whose segments are as big as the path
//!   allows: the PMTU scenario);
//! - every answer carries `x-backend: b3`, so a client knows where a
//!   streaming request landed as soon as the headers arrive.
//!
//! UDP: a datagram `msg` is answered with `b3 10.20.0.13 msg`.

use std::{
    convert::Infallible,
    future::Future,
    net::Ipv4Addr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::{Body, Bytes, Frame, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::TokioIo;
use testkit::netns::NetNs;
use tokio::{
    net::{TcpListener, UdpSocket},
    runtime::Handle,
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::{Instant, Sleep},
};

/// The HTTP port of every backend.
pub const HTTP_PORT: u16 = 80;
/// The UDP echo port of every backend.
pub const UDP_PORT: u16 = 5353;
/// Interval between two chunks of a `/slow` answer.
const SLOW_TICK: Duration = Duration::from_millis(100);

/// What a backend served.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    datagrams: AtomicU64,
    /// When each HTTP request arrived, in order.
    request_times: Mutex<Vec<std::time::Instant>>,
}

impl Counters {
    fn request(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.request_times
            .lock()
            .expect("request times lock")
            .push(std::time::Instant::now());
    }
}

/// A snapshot of [`Backend::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Accepted TCP connections (health checks included).
    pub connections: u64,
    /// HTTP requests, any path.
    pub requests: u64,
    /// UDP datagrams answered.
    pub datagrams: u64,
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// One backend task in its own namespace.
pub struct Backend {
    name: String,
    addr: Ipv4Addr,
    /// The bridge port of its veth in the overlay namespace.
    port: String,
    ns: NetNs,
    rt: Handle,
    counters: Arc<Counters>,
    running: Mutex<Option<Running>>,
}

impl Backend {
    pub(crate) fn new(name: String, addr: Ipv4Addr, port: String, ns: NetNs, rt: Handle) -> Self {
        Self {
            name,
            addr,
            port,
            ns,
            rt,
            counters: Arc::default(),
            running: Mutex::new(None),
        }
    }

    /// `b3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `10.20.0.13`.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The overlay bridge port its `eth0` is plugged into (`b3`).
    pub fn bridge_port(&self) -> &str {
        &self.port
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    pub fn stats(&self) -> BackendStats {
        BackendStats {
            connections: self.counters.connections.load(Ordering::SeqCst),
            requests: self.counters.requests.load(Ordering::SeqCst),
            datagrams: self.counters.datagrams.load(Ordering::SeqCst),
        }
    }

    /// When each HTTP request so far arrived, oldest first: the backend's
    /// side of "when did this task take (or stop taking) traffic".
    pub fn request_times(&self) -> Vec<std::time::Instant> {
        self.counters
            .request_times
            .lock()
            .expect("request times lock")
            .clone()
    }

    /// Requests that arrived at or after `t`.
    pub fn requests_since(&self, t: std::time::Instant) -> usize {
        let times = self
            .counters
            .request_times
            .lock()
            .expect("request times lock");
        times.len() - times.partition_point(|&at| at < t)
    }

    /// The first request that arrived at or after `t`.
    pub fn first_request_since(&self, t: std::time::Instant) -> Option<std::time::Instant> {
        let times = self
            .counters
            .request_times
            .lock()
            .expect("request times lock");
        times.get(times.partition_point(|&at| at < t)).copied()
    }

    /// The latest request so far.
    pub fn last_request(&self) -> Option<std::time::Instant> {
        let times = self
            .counters
            .request_times
            .lock()
            .expect("request times lock");
        times.last().copied()
    }

    pub fn is_running(&self) -> bool {
        self.running.lock().expect("backend lock").is_some()
    }

    /// Binds `0.0.0.0:80` (TCP) and `0.0.0.0:5353` (UDP) inside the namespace
    /// and serves them. Does nothing if already running.
    pub fn start(&self) -> Result<()> {
        let mut running = self.running.lock().expect("backend lock");
        if running.is_some() {
            return Ok(());
        }
        let (tcp, udp) = self
            .ns
            .run_in(|| {
                // std sets SO_REUSEADDR, so a restart right after stop() binds
                // even with connections in TIME_WAIT.
                let tcp = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, HTTP_PORT))
                    .context("binding TCP port 80")?;
                let udp = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT))
                    .context("binding UDP port 5353")?;
                tcp.set_nonblocking(true)?;
                udp.set_nonblocking(true)?;
                Ok((tcp, udp))
            })
            .with_context(|| format!("starting backend {}", self.name))?;
        let _rt = self.rt.enter();
        let tcp = TcpListener::from_std(tcp)?;
        let udp = UdpSocket::from_std(udp)?;
        let (stop, stop_rx) = watch::channel(false);
        let ident = Ident {
            name: self.name.clone(),
            addr: self.addr,
        };
        let task = self
            .rt
            .spawn(serve(tcp, udp, ident, Arc::clone(&self.counters), stop_rx));
        *running = Some(Running { stop, task });
        Ok(())
    }

    /// Closes the listeners and every open connection (as a task that exits
    /// does: clients of unfinished answers see their connection close early).
    /// Returns once all of them are closed.
    pub fn stop(&self) {
        let running = self.running.lock().expect("backend lock").take();
        if let Some(Running { stop, task }) = running {
            let _ = stop.send(true);
            let _ = self.rt.block_on(task);
        }
    }

    /// Deletes the backend's `eth0` (and so its bridge port): the task
    /// vanishes from the network without closing anything, like a container
    /// whose node died. Its sockets stay open, unreachable.
    pub fn remove_interface(&self) -> Result<()> {
        self.ns
            .ip(&["link", "del", "eth0"])
            .with_context(|| format!("removing the interface of backend {}", self.name))?;
        Ok(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(Running { stop, task }) = self.running.lock().expect("backend lock").take() {
            let _ = stop.send(true);
            task.abort();
        }
    }
}

#[derive(Clone)]
struct Ident {
    name: String,
    addr: Ipv4Addr,
}

impl Ident {
    fn line(&self) -> String {
        format!("{} {}\n", self.name, self.addr)
    }
}

async fn serve(
    tcp: TcpListener,
    udp: UdpSocket,
    ident: Ident,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    // Owned here: shutting it down closes every connection.
    let mut open = JoinSet::new();
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = tcp.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                counters.connections.fetch_add(1, Ordering::SeqCst);
                let ident = ident.clone();
                let counters = Arc::clone(&counters);
                open.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        counters.request();
                        let ident = ident.clone();
                        async move { Ok::<_, Infallible>(answer(req, &ident).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            received = udp.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                counters.datagrams.fetch_add(1, Ordering::SeqCst);
                let msg = String::from_utf8_lossy(&buf[..n]);
                let reply = format!("{} {} {msg}", ident.name, ident.addr);
                let _ = udp.send_to(reply.as_bytes(), from).await;
            }
            // Reap finished connections so the set stays small.
            Some(_) = open.join_next(), if !open.is_empty() => {}
        }
    }
    open.shutdown().await;
}

async fn answer(req: Request<Incoming>, ident: &Ident) -> Response<BoxBody<Bytes, Infallible>> {
    let builder = Response::builder().header("x-backend", ident.name.as_str());
    if req.method() == hyper::Method::POST && req.uri().path() == "/upload" {
        let (status, text) = match req.into_body().collect().await {
            Ok(body) => (
                200,
                format!("{} {} {}\n", ident.name, ident.addr, body.to_bytes().len()),
            ),
            Err(e) => (400, format!("reading the upload: {e}\n")),
        };
        return builder
            .status(status)
            .body(Full::new(Bytes::from(text)).boxed())
            .expect("a valid response");
    }
    let body = match req.uri().path() {
        "/" => Full::new(Bytes::from(ident.line())).boxed(),
        "/healthz" => Full::new(Bytes::from_static(b"ok\n")).boxed(),
        "/bytes" => {
            let n = query_u64(&req, "n").unwrap_or(0);
            let n = usize::try_from(n).unwrap_or(0).min(64 << 20);
            Full::new(Bytes::from(vec![b'x'; n])).boxed()
        }
        "/slow" => {
            let ms = query_u64(&req, "ms").unwrap_or(1000);
            SlowBody::new(ident.line(), Duration::from_millis(ms)).boxed()
        }
        _ => {
            return builder
                .status(404)
                .body(Full::new(Bytes::from_static(b"not found\n")).boxed())
                .expect("a valid response");
        }
    };
    builder.body(body).expect("a valid response")
}

/// The number in `?key=N`.
fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The body of `/slow?ms=N`: the name line, a `.` every 100 ms until N ms
/// have passed, then `done\n`.
struct SlowBody {
    first: Option<String>,
    end: Instant,
    sleep: Pin<Box<Sleep>>,
    done: bool,
}

impl SlowBody {
    fn new(first: String, length: Duration) -> Self {
        let now = Instant::now();
        Self {
            first: Some(first),
            end: now + length,
            sleep: Box::pin(tokio::time::sleep_until(now + SLOW_TICK.min(length))),
            done: false,
        }
    }
}

impl Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(first)))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let now = Instant::now();
        if now >= self.end {
            self.done = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"\ndone\n")))));
        }
        let next = (now + SLOW_TICK).min(self.end);
        self.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b".")))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.first.is_none()
    }
}
