//! Prometheus metrics over HTTP (`GET /metrics`), read from the pinned maps
//! at scrape time. The counters live in the kernel maps, not in this
//! process, so they stay monotonic across daemon restarts and upgrades
//! (until `xdplb down` removes the maps). Off unless `xdplb run` is given
//! `--metrics-addr`.
//!
//! The body is the OpenMetrics 1.0 text format written by `prometheus-client`
//! (the format Prometheus asks for first); classic Prometheus text parsers
//! read it too. Every metric is described in docs/OBSERVABILITY.md.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, time::Duration};

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
use tokio::{net::TcpListener, sync::watch};

use crate::stats::{take_snapshot, Snapshot};

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

/// The metrics of one snapshot, in the OpenMetrics text format.
pub fn encode_snapshot(s: &Snapshot) -> Result<String> {
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

async fn handle(
    req: Request<Incoming>,
    pin_dir: PathBuf,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    Ok(match (get, req.uri().path()) {
        (true, "/metrics") => {
            // Map reads are syscalls, and a full CONNS walk takes a while:
            // keep them off the async workers.
            let read = tokio::task::spawn_blocking(move || {
                take_snapshot(&pin_dir).and_then(|s| encode_snapshot(&s))
            })
            .await;
            match read {
                Ok(Ok(body)) => {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
                    );
                    r
                }
                Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading the maps failed: {e}\n"),
                ),
            }
        }
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
/// sender goes away). Each scrape opens the maps under `pin_dir` afresh, so
/// it follows a daemon that recreated them; while there are none it answers
/// 503 with the reason.
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
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    tracing::info!(
        "metrics: http://{}/metrics (read from the maps under {})",
        listener
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string()),
        pin_dir.display()
    );
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of fds and the like: back off instead of spinning.
                        tracing::warn!("metrics: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let pin_dir = pin_dir.clone();
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, pin_dir.clone()));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => {
                            if let Err(e) = r {
                                tracing::debug!("metrics: connection from {peer}: {e}");
                            }
                        }
                        _ = stop.wait_for(|s| *s) => {}
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
        let text = encode_snapshot(&snapshot()).unwrap();
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
