//! The HTTP endpoint: one snapshot at a time shared by every waiting
//! request, the connection-table walk reused, connections capped.

use super::*;

pub(super) fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
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

/// One snapshot's body: the OpenMetrics text, and the classic text made
/// from it the first time a request asks for that (each format is encoded
/// at most once per snapshot, whatever the number of requests).
#[derive(Debug)]
pub struct Body {
    openmetrics: Bytes,
    text: OnceLock<Bytes>,
}

impl Body {
    fn new(openmetrics: String) -> Self {
        Self {
            openmetrics: Bytes::from(openmetrics),
            text: OnceLock::new(),
        }
    }

    /// The body in `format` (blocking: it may convert).
    pub fn get(&self, format: Format) -> Bytes {
        match format {
            Format::OpenMetrics => self.openmetrics.clone(),
            Format::Text => self
                .text
                .get_or_init(|| {
                    let om = std::str::from_utf8(&self.openmetrics)
                        .expect("the OpenMetrics body was a String");
                    Bytes::from(openmetrics_to_text(om))
                })
                .clone(),
        }
    }

    /// The body in `format` if no conversion is needed.
    fn ready(&self, format: Format) -> Option<Bytes> {
        match format {
            Format::OpenMetrics => Some(self.openmetrics.clone()),
            Format::Text => self.text.get().cloned(),
        }
    }
}

/// One snapshot at a time: requests that arrive while one is being taken
/// wait for it and share its result (an `Arc<Body>` or `Bytes`, so not a
/// copy each).
pub(super) struct SingleFlight<T> {
    /// The last snapshot and its number. Held while a snapshot is taken, so
    /// requests that arrive meanwhile wait for that one.
    last: Arc<tokio::sync::Mutex<Taken<T>>>,
    /// The number of the last finished snapshot, readable without the lock.
    finished: Arc<AtomicU64>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        Self {
            last: Arc::new(tokio::sync::Mutex::new(Taken {
                number: 0,
                scrape: None,
            })),
            finished: Arc::default(),
        }
    }
}

pub(super) struct Taken<T> {
    number: u64,
    scrape: Option<Result<T, (StatusCode, String)>>,
}

impl<T: Clone + Send + 'static> SingleFlight<T> {
    /// `take`'s result, or that of the snapshot that was being taken when
    /// the call came. `take` runs on a blocking thread.
    pub(super) async fn run(
        &self,
        take: impl FnOnce() -> Result<T, (StatusCode, String)> + Send + 'static,
    ) -> Result<T, (StatusCode, String)> {
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

pub(super) fn failed(e: tokio::task::JoinError) -> (StatusCode, String) {
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
    flight: SingleFlight<Arc<Body>>,
    walk: Mutex<Option<Walk>>,
    walks: AtomicU64,
}

pub(super) struct Walk {
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

    /// The body of `/metrics` in `format`: of a new snapshot, or of the one
    /// being taken when the request came.
    pub async fn scrape(self: &Arc<Self>, format: Format) -> Scrape {
        let me = Arc::clone(self);
        let body = self
            .flight
            .run(move || {
                me.read()
                    .map(|om| Arc::new(Body::new(om)))
                    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")))
            })
            .await?;
        match body.ready(format) {
            Some(b) => Ok(b),
            None => tokio::task::spawn_blocking(move || body.get(format))
                .await
                .map_err(failed),
        }
    }

    /// One snapshot, encoded in the OpenMetrics format (blocking).
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
            crate::clock::now_ms(),
            crate::clock::monotonic_now_ns(),
        );
        let body = encode(&snapshot, daemon.status(), walk, Format::OpenMetrics);
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

pub(super) async fn handle(
    req: Request<Incoming>,
    scraper: Arc<Scraper>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    Ok(match (get, req.uri().path()) {
        (true, "/metrics") => {
            let accept: Vec<&str> = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let format =
                Format::negotiate((!accept.is_empty()).then(|| accept.join(",")).as_deref());
            match scraper.scrape(format).await {
                Ok(body) => {
                    let mut r = Response::new(Full::new(body));
                    let h = r.headers_mut();
                    h.insert(
                        CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(format.content_type()),
                    );
                    // The body depends on Accept: caches must not mix them up.
                    h.insert(VARY, hyper::header::HeaderValue::from_static("accept"));
                    r
                }
                Err((status, reason)) => text(status, reason),
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
