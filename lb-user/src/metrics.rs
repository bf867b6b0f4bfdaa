//! Prometheus metrics over HTTP (`GET /metrics`), read from the pinned maps
//! at scrape time. The counters live in the kernel maps, not in this
//! process, so they stay monotonic across daemon restarts and upgrades
//! (until `xdplb down` removes the maps). Off unless `xdplb run` is given
//! `--metrics-addr`.
//!
//! The body is the OpenMetrics 1.0 text format written by `prometheus-client`
//! (the format Prometheus asks for first); classic Prometheus text parsers
//! read it too. Every metric is described in docs/OBSERVABILITY.md.
//!
//! A scrape costs the same whatever the size of the connection table: the
//! counters, services and backends are read on every scrape (BACKENDS in
//! batches, so the number of slots does not matter either), but the walk of
//! the connection table, the one read that grows with it, is reused for
//! [`CONNTRACK_WALK_EVERY`] and its age is exported. One snapshot is taken
//! at a time: requests that arrive while one is being taken wait for it and
//! get the same body. At most [`MAX_CONNECTIONS`] connections are served at
//! once.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};

use crate::{
    pinned::{monotonic_now_ns, PinnedError, PinnedMaps},
    stats::{ConnCounts, Daemon, MapsView, Snapshot},
    status,
};

/// How long one walk of the connection table serves scrapes.
///
/// The walk is the only read whose cost grows with the table: about 0.2 s of
/// CPU for a million entries (docs/BENCHMARKS.md §7). Walking on every
/// scrape would let the scrapers decide how much CPU the daemon spends on
/// it (two Prometheus servers and a dashboard refreshing every second make
/// four walks a second); walking at most every 10 s bounds that at a few
/// percent of one CPU. The price: `xdplb_conntrack_entries` and the
/// `*_active_connections` gauges can be up to 10 s plus a scrape interval
/// old, and `xdplb_conntrack_walk_age_seconds` says how old. Packet, byte
/// and new-connection counters and backend states are read on every scrape.
pub const CONNTRACK_WALK_EVERY: Duration = Duration::from_secs(10);

/// Connections the endpoint serves at once; more wait in the listen
/// backlog. Each serves one request (no keep-alive: an idle connection
/// would hold its place for nothing), and every request shares the
/// snapshot being taken, so this caps file descriptors and buffers, not
/// snapshots.
pub const MAX_CONNECTIONS: usize = 32;

/// How long one connection may stay open: a client that stops reading
/// cannot hold one of the [`MAX_CONNECTIONS`] for good.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Backend states with a `xdplb_backend_state` series each.
pub const STATES: [&str; 4] = ["probing", "active", "draining", "down"];

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// How old the connection-table figures of a snapshot are.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WalkAge {
    /// Since the walk finished.
    pub age: Duration,
    /// How long the walk took.
    pub took: Duration,
}

/// The metrics of one snapshot, in the OpenMetrics text format. `walk`
/// says how old its connection-table figures are.
pub fn encode_snapshot(s: &Snapshot, walk: WalkAge) -> Result<String> {
    let counters = || Family::<Labels, Counter>::default();
    let gauges = || Family::<Labels, Gauge>::default();
    let (svc_packets, svc_bytes, svc_new) = (counters(), counters(), counters());
    let svc_active = gauges();
    let (be_packets, be_bytes, be_new) = (counters(), counters(), counters());
    let (be_active, be_state) = (gauges(), gauges());
    let reason_packets = counters();
    let (entries, capacity, daemon) = (
        Gauge::<i64>::default(),
        Gauge::<i64>::default(),
        Gauge::<i64>::default(),
    );
    let (walk_age, walk_took) = (
        Gauge::<f64, AtomicU64>::default(),
        Gauge::<f64, AtomicU64>::default(),
    );

    let gauge_value = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for svc in &s.services {
        let l = labels(&[("service", svc.label())]);
        svc_packets.get_or_create(&l).inc_by(svc.packets);
        svc_bytes.get_or_create(&l).inc_by(svc.bytes);
        svc_new.get_or_create(&l).inc_by(svc.new_connections);
        svc_active
            .get_or_create(&l)
            .set(gauge_value(svc.active_connections));
        for b in &svc.backends {
            let addr = b.addr.to_string();
            let l = labels(&[("service", svc.label()), ("backend", &addr)]);
            be_packets.get_or_create(&l).inc_by(b.packets);
            be_bytes.get_or_create(&l).inc_by(b.bytes);
            be_new.get_or_create(&l).inc_by(b.new_connections);
            be_active
                .get_or_create(&l)
                .set(gauge_value(b.active_connections));
            for st in STATES {
                let l = labels(&[("service", svc.label()), ("backend", &addr), ("state", st)]);
                be_state.get_or_create(&l).set(i64::from(b.state == st));
            }
        }
    }
    for r in &s.reasons {
        reason_packets
            .get_or_create(&labels(&[("reason", r.name)]))
            .inc_by(r.packets);
    }
    entries.set(gauge_value(s.conntrack.entries));
    capacity.set(gauge_value(s.conntrack.capacity));
    daemon.set(i64::from(s.daemon.running));
    walk_age.set(walk.age.as_secs_f64());
    walk_took.set(walk.took.as_secs_f64());

    let mut reg = Registry::default();
    reg.register(
        "xdplb_service_packets",
        "Packets forwarded for the service, both directions (from SERVICE_STATS)",
        svc_packets,
    );
    reg.register(
        "xdplb_service_bytes",
        "Bytes (whole frames) forwarded for the service, both directions",
        svc_bytes,
    );
    reg.register(
        "xdplb_service_new_connections",
        "New flows the data plane created for the service (Maglev picks, re-picks included)",
        svc_new,
    );
    reg.register(
        "xdplb_service_active_connections",
        "Live flows of the service: forward entries in the connection table that have not expired",
        svc_active,
    );
    reg.register(
        "xdplb_backend_packets",
        "Packets forwarded to or from the backend (from BACKEND_STATS)",
        be_packets,
    );
    reg.register(
        "xdplb_backend_bytes",
        "Bytes (whole frames) forwarded to or from the backend",
        be_bytes,
    );
    reg.register(
        "xdplb_backend_new_connections",
        "New flows the data plane sent to the backend",
        be_new,
    );
    reg.register(
        "xdplb_backend_active_connections",
        "Live flows pinned to the backend: forward entries that have not expired",
        be_active,
    );
    reg.register(
        "xdplb_backend_state",
        "1 for the backend's current state (probing, active, draining, down), 0 for the others; \
         the daemon's state, or the data plane's when the daemon is not running",
        be_state,
    );
    reg.register(
        "xdplb_packets",
        "Packets seen by the data plane, by what happened to them (lb_common::reason names)",
        reason_packets,
    );
    reg.register(
        "xdplb_conntrack_entries",
        "Entries in the connection table (two per flow: forward and reverse)",
        entries,
    );
    reg.register(
        "xdplb_conntrack_capacity",
        "Capacity of the connection table (an LRU: the oldest entries go when it is full)",
        capacity,
    );
    reg.register(
        "xdplb_conntrack_walk_age_seconds",
        "Age of the connection-table walk behind xdplb_conntrack_entries and the \
         *_active_connections gauges (one walk serves scrapes for up to 10 s)",
        walk_age,
    );
    reg.register(
        "xdplb_conntrack_walk_duration_seconds",
        "How long that walk of the connection table took",
        walk_took,
    );
    reg.register(
        "xdplb_daemon_running",
        "1 when a live daemon's status file supplied names and states, 0 when they come from the maps",
        daemon,
    );
    let mut out = String::new();
    encode(&mut out, &reg).context("encoding the metrics")?;
    Ok(out)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What `/metrics` answers: the body, or the status and the reason.
pub type Scrape = Result<Bytes, (StatusCode, String)>;

/// One snapshot at a time: requests that arrive while one is being taken
/// wait for it and share its body (a `Bytes`, so not a copy each).
#[derive(Default)]
struct SingleFlight {
    /// The last snapshot and its number. Held while a snapshot is taken, so
    /// requests that arrive meanwhile wait for that one.
    last: Arc<tokio::sync::Mutex<Taken>>,
    /// The number of the last finished snapshot, readable without the lock.
    finished: Arc<AtomicU64>,
}

#[derive(Default)]
struct Taken {
    number: u64,
    scrape: Option<Scrape>,
}

impl SingleFlight {
    /// `take`'s result, or that of the snapshot that was being taken when
    /// the call came. `take` runs on a blocking thread.
    async fn run(&self, take: impl FnOnce() -> Scrape + Send + 'static) -> Scrape {
        let seen = self.finished.load(Ordering::Acquire);
        let mut taken = Arc::clone(&self.last).lock_owned().await;
        if taken.number > seen {
            if let Some(s) = &taken.scrape {
                return s.clone();
            }
        }
        // The snapshot runs in a task of its own that holds the lock: a
        // client that hangs up neither stops it nor lets a second one start.
        let finished = Arc::clone(&self.finished);
        let snapshot = tokio::spawn(async move {
            let scrape = tokio::task::spawn_blocking(take)
                .await
                .unwrap_or_else(|e| Err(failed(e)));
            taken.number += 1;
            taken.scrape = Some(scrape.clone());
            finished.store(taken.number, Ordering::Release);
            scrape
        });
        snapshot.await.unwrap_or_else(|e| Err(failed(e)))
    }
}

fn failed(e: tokio::task::JoinError) -> (StatusCode, String) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("reading the maps failed: {e}\n"),
    )
}

/// Takes the snapshots behind `/metrics`: one at a time, shared by the
/// requests that wait for it, with the connection-table walk reused for
/// `walk_every`.
pub struct Scraper {
    pin_dir: PathBuf,
    walk_every: Duration,
    flight: SingleFlight,
    walk: Mutex<Option<Walk>>,
    walks: AtomicU64,
}

struct Walk {
    /// CONNS's id: maps recreated under the same pins need a new walk.
    conns_id: u32,
    counts: ConnCounts,
    at: Instant,
    took: Duration,
}

impl Scraper {
    /// Reads the maps under `pin_dir`, walking the connection table at
    /// most once per `walk_every` ([`CONNTRACK_WALK_EVERY`] in the daemon).
    pub fn new(pin_dir: impl Into<PathBuf>, walk_every: Duration) -> Arc<Self> {
        Arc::new(Self {
            pin_dir: pin_dir.into(),
            walk_every,
            flight: SingleFlight::default(),
            walk: Mutex::new(None),
            walks: AtomicU64::new(0),
        })
    }

    /// Snapshots taken so far (each served one request or more).
    pub fn snapshots(&self) -> u64 {
        self.flight.finished.load(Ordering::Acquire)
    }

    /// Walks of the connection table so far.
    pub fn walks(&self) -> u64 {
        self.walks.load(Ordering::Relaxed)
    }

    /// The body of `/metrics`: a new snapshot, or the one being taken when
    /// the request came.
    pub async fn scrape(self: &Arc<Self>) -> Scrape {
        let me = Arc::clone(self);
        self.flight
            .run(move || {
                me.read()
                    .map(Bytes::from)
                    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")))
            })
            .await
    }

    /// One snapshot, encoded (blocking).
    fn read(&self) -> Result<String> {
        let started = Instant::now();
        let maps = PinnedMaps::open(&self.pin_dir)?;
        let daemon = Daemon::read(&self.pin_dir);
        let mut view = MapsView::read_without_conns(&maps, daemon.status())?;
        let walk;
        (view.conns, walk) = self.conns(&maps)?;
        let snapshot = Snapshot::build(
            &view,
            &daemon,
            &self.pin_dir,
            status::now_ms(),
            monotonic_now_ns(),
        );
        let body = encode_snapshot(&snapshot, walk)?;
        tracing::debug!(
            "metrics: snapshot of {} services in {:.0?}, connection table walked {:.1?} ago (in {:.0?})",
            snapshot.services.len(),
            started.elapsed(),
            walk.age,
            walk.took
        );
        Ok(body)
    }

    /// The connection-table census: the last walk while it is younger than
    /// `walk_every` and of the same maps, else a new walk.
    fn conns(&self, maps: &PinnedMaps) -> Result<(ConnCounts, WalkAge), PinnedError> {
        let mut last = self.walk.lock().unwrap_or_else(PoisonError::into_inner);
        match last.as_ref() {
            Some(w) if w.conns_id == maps.conns_id() && w.at.elapsed() < self.walk_every => {}
            _ => {
                let started = Instant::now();
                let counts = ConnCounts::walk(maps)?;
                self.walks.fetch_add(1, Ordering::Relaxed);
                *last = Some(Walk {
                    conns_id: maps.conns_id(),
                    counts,
                    at: Instant::now(),
                    took: started.elapsed(),
                });
            }
        }
        let w = last.as_ref().expect("walked above");
        Ok((
            w.counts.clone(),
            WalkAge {
                age: w.at.elapsed(),
                took: w.took,
            },
        ))
    }
}

async fn handle(
    req: Request<Incoming>,
    scraper: Arc<Scraper>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    Ok(match (get, req.uri().path()) {
        (true, "/metrics") => match scraper.scrape().await {
            Ok(body) => {
                let mut r = Response::new(Full::new(body));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
                );
                r
            }
            Err((status, reason)) => text(status, reason),
        },
        (true, "/") => text(
            StatusCode::OK,
            "xdplb: Prometheus metrics at /metrics\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: xdplb serves GET /metrics\n".into(),
        ),
    })
}

/// Serves `GET /metrics` on `addr` until `shutdown` becomes `true` (or its
/// sender goes away). Each snapshot opens the maps under `pin_dir` afresh,
/// so it follows a daemon that recreated them; while there are none it
/// answers 503 with the reason.
pub async fn serve(
    addr: SocketAddr,
    pin_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve_on(bind(addr).await?, pin_dir, shutdown).await
}

/// Binds the metrics listener: a caller that wants a taken port to stop
/// its start-up binds first, then hands the listener to [`serve_on`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr} (--metrics-addr)"))
}

/// [`serve`] on a listener that is already bound.
pub async fn serve_on(
    listener: TcpListener,
    pin_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve_with(
        listener,
        Scraper::new(pin_dir, CONNTRACK_WALK_EVERY),
        shutdown,
    )
    .await
}

/// [`serve_on`] with a scraper of the caller's (tests and the bench count
/// its snapshots and walks).
pub async fn serve_with(
    listener: TcpListener,
    scraper: Arc<Scraper>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    tracing::info!(
        "metrics: http://{}/metrics (read from the maps under {}; connection table walked at most every {} s)",
        listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string()),
        scraper.pin_dir.display(),
        scraper.walk_every.as_secs_f64(),
    );
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let next = async {
            let slot = Arc::clone(&open)
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            (slot, listener.accept().await)
        };
        tokio::select! {
            (slot, accepted) = next => {
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of fds and the like: back off instead of spinning.
                        tracing::warn!("metrics: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let scraper = Arc::clone(&scraper);
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let svc = service_fn(move |req| handle(req, Arc::clone(&scraper)));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .keep_alive(false)
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    let ended = tokio::select! {
                        r = conn.as_mut() => Some(r),
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(CONNECTION_LIFETIME) => None,
                    };
                    let r = match ended {
                        Some(r) => r,
                        None => {
                            // Finish the response in flight, if any, then close.
                            conn.as_mut().graceful_shutdown();
                            match tokio::time::timeout(Duration::from_secs(10), conn).await {
                                Ok(r) => r,
                                Err(_) => return,
                            }
                        }
                    };
                    if let Err(e) = r {
                        tracing::debug!("metrics: connection from {peer}: {e}");
                    }
                });
            }
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    tracing::debug!("metrics: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path};

    use lb_common::{reason, Backend, Config, Counters, Service, ServiceKey, BACKEND_DOWN};

    use super::*;
    use crate::stats::{ConnCounts, Daemon, MapsView};

    fn snapshot() -> Snapshot {
        let mut conns = ConnCounts {
            entries: 4,
            live_flows: 2,
            ..Default::default()
        };
        conns.by_service.insert(3, 2);
        conns.by_backend.insert((3, 9), 2);
        let mut reasons = vec![Counters::default(); reason::COUNT as usize];
        reasons[reason::FWD_TX as usize].packets = 5;
        let mut key = ServiceKey {
            port_be: 53u16.to_be(),
            proto: lb_common::PROTO_UDP,
            family: lb_common::FAMILY_V4,
            ..Default::default()
        };
        key.addr[..4].copy_from_slice(&[10, 0, 0, 5]);
        let mut b = Backend {
            port_be: 5353u16.to_be(),
            family: lb_common::FAMILY_V4,
            state: BACKEND_DOWN,
            service: 3,
            ..Default::default()
        };
        b.addr[..4].copy_from_slice(&[10, 1, 0, 9]);
        let view = MapsView {
            config: Config::with_defaults(),
            services: vec![(
                key,
                Service {
                    id: 3,
                    ..Default::default()
                },
            )],
            backends: vec![(9, b)],
            service_counters: BTreeMap::from([(
                3,
                Counters {
                    packets: 7,
                    bytes: 700,
                    new_flows: 2,
                },
            )]),
            backend_counters: BTreeMap::from([(
                9,
                Counters {
                    packets: 7,
                    bytes: 700,
                    new_flows: 2,
                },
            )]),
            reasons,
            conns,
            conns_capacity: 100,
        };
        let d = Daemon::Missing { path: "/x".into() };
        Snapshot::build(&view, &d, Path::new("/p"), 0, 0)
    }

    #[test]
    fn every_metric_is_there_with_help_and_labels() {
        let text = encode_snapshot(&snapshot(), WalkAge::default()).unwrap();
        for line in [
            "# HELP xdplb_service_packets Packets forwarded for the service",
            "# TYPE xdplb_service_packets counter",
            "xdplb_service_packets_total{service=\"10.0.0.5:53/udp\"} 7",
            "xdplb_service_bytes_total{service=\"10.0.0.5:53/udp\"} 700",
            "xdplb_service_new_connections_total{service=\"10.0.0.5:53/udp\"} 2",
            "xdplb_service_active_connections{service=\"10.0.0.5:53/udp\"} 2",
            "xdplb_backend_packets_total{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 7",
            "xdplb_backend_bytes_total{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 700",
            "xdplb_backend_new_connections_total{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 2",
            "xdplb_backend_active_connections{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\"} 2",
            "xdplb_backend_state{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\",state=\"down\"} 1",
            "xdplb_backend_state{service=\"10.0.0.5:53/udp\",backend=\"10.1.0.9:5353\",state=\"active\"} 0",
            "# TYPE xdplb_packets counter",
            "xdplb_packets_total{reason=\"fwd_tx\"} 5",
            "xdplb_packets_total{reason=\"pass_not_ip\"} 0",
            "xdplb_conntrack_entries 4",
            "xdplb_conntrack_capacity 100",
            "xdplb_daemon_running 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "missing line starting with {line:?} in:\n{text}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("xdplb_packets_total"))
                .count(),
            reason::COUNT as usize
        );
    }

    #[tokio::test]
    async fn serve_answers_503_without_maps_404_elsewhere_and_stops() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            addr,
            Path::new("/sys/fs/bpf/xdplb-unit-test-nothing-here").into(),
            rx,
        ));
        let get = |path: &'static str| async move {
            for _ in 0..50 {
                if let Ok(r) = http_get(addr, path).await {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the metrics server on {addr} never answered");
        };
        let (code, body) = get("/metrics").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("no xdplb state under"), "{body}");
        assert_eq!(get("/nope").await.0, 404);
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve stops when told")
            .unwrap()
            .unwrap();
    }

    /// The first snapshot waits at a gate until nineteen more requests
    /// queue behind it: all twenty get its body, and it is the only one
    /// taken. A request after it takes a new one.
    #[tokio::test(flavor = "current_thread")]
    async fn requests_during_a_snapshot_wait_for_it_and_share_it() {
        use std::sync::Condvar;
        let flight = Arc::new(SingleFlight::default());
        let taken = Arc::new(AtomicU64::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let take = || {
            let (taken, gate) = (Arc::clone(&taken), Arc::clone(&gate));
            move || {
                let n = taken.fetch_add(1, Ordering::SeqCst) + 1;
                let (open, cv) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                Ok(Bytes::from(format!("snapshot {n}")))
            }
        };
        let request = || {
            let (flight, take) = (Arc::clone(&flight), take());
            tokio::spawn(async move { flight.run(take).await })
        };
        let first = request();
        while taken.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut requests: Vec<_> = (0..19).map(|_| request()).collect();
        // One runtime thread: each queued task reaches the lock and waits.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        requests.insert(0, first);
        for r in requests {
            assert_eq!(r.await.unwrap(), Ok(Bytes::from("snapshot 1")));
        }
        assert_eq!(
            taken.load(Ordering::SeqCst),
            1,
            "twenty requests during one snapshot took more than one"
        );
        assert_eq!(flight.run(take()).await, Ok(Bytes::from("snapshot 2")));
    }

    /// A minimal HTTP/1.0 GET, so the test needs no client crate.
    async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        let code = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        Ok((code, body))
    }
}
