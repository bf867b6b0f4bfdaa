//! Health checks against real sockets and a real HTTP server (hyper) on
//! 127.0.0.1 ephemeral ports. No root needed.
//!
//! Every wait has a deadline and panics with what it was waiting for.
use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use lb_user::backends::health::{
    check_once, http_client, run_checker, CheckSpec, FailureKind, HealthEvent, SpecKind,
};
use testkit::http::HttpServer;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// Longest wait for anything that should happen within a few check intervals.
const DEADLINE: Duration = Duration::from_secs(5);

fn tcp(timeout_ms: u64) -> CheckSpec {
    CheckSpec {
        kind: SpecKind::Tcp,
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn http(path: &str, expect_status: u16, timeout_ms: u64) -> CheckSpec {
    CheckSpec {
        kind: SpecKind::Http {
            path: path.to_owned(),
            expect_status,
        },
        timeout: Duration::from_millis(timeout_ms),
    }
}

/// An address on which nothing listens: bind an ephemeral port, then free it.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    drop(listener);
    addr
}

async fn next_event(rx: &mut mpsc::Receiver<HealthEvent>, waiting_for: &str) -> HealthEvent {
    match tokio::time::timeout(DEADLINE, rx.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("checker stopped while waiting for {waiting_for}"),
        Err(_) => panic!("no health event within {DEADLINE:?} while waiting for {waiting_for}"),
    }
}

/// Receive events until one carries `transition`; returns all of them.
async fn until_transition(
    rx: &mut mpsc::Receiver<HealthEvent>,
    transition: bool,
) -> Vec<HealthEvent> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(rx, &format!("transition to healthy={transition}")).await;
        let done = event.transition == Some(transition);
        seen.push(event);
        if done {
            return seen;
        }
        assert!(
            seen.len() < 100,
            "no transition to healthy={transition} in 100 events: {seen:#?}"
        );
    }
}

struct Checker {
    rx: mpsc::Receiver<HealthEvent>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn spawn_checker(
    target: SocketAddr,
    spec: CheckSpec,
    interval_ms: u64,
    rise: u32,
    fall: u32,
) -> Checker {
    let (tx, rx) = mpsc::channel(16);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(run_checker(
        http_client(),
        target,
        spec,
        Duration::from_millis(interval_ms),
        rise,
        fall,
        tx,
        shutdown_rx,
    ));
    Checker { rx, shutdown, task }
}

async fn expect_finished(task: JoinHandle<()>, why: &str) {
    match tokio::time::timeout(Duration::from_secs(1), task).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => panic!("checker task failed ({why}): {err}"),
        Err(_) => panic!("checker still running 1s after {why}"),
    }
}

// ---- TCP ---------------------------------------------------------------------

#[tokio::test]
async fn tcp_check_passes_against_a_listening_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = listener.local_addr().expect("local_addr");
    let result = check_once(&http_client(), target, &tcp(1000)).await;
    assert!(
        result.ok,
        "expected a pass against a listener, got {result:?}"
    );
    assert_eq!(result.failure, None);
    assert!(
        result.detail.starts_with("TCP connect in ") && result.detail.ends_with(" ms"),
        "unexpected detail {:?}",
        result.detail
    );
    assert!(
        result.latency < Duration::from_secs(1),
        "latency {:?}",
        result.latency
    );
}

#[tokio::test]
async fn tcp_check_is_refused_on_a_closed_port() {
    let target = closed_port().await;
    let result = check_once(&http_client(), target, &tcp(1000)).await;
    assert!(
        !result.ok,
        "expected a failure on a closed port, got {result:?}"
    );
    assert_eq!(result.failure, Some(FailureKind::Refused), "{result:?}");
    assert_eq!(result.detail, "connect refused");
}

#[tokio::test]
async fn tcp_check_times_out_when_the_accept_queue_is_full() {
    // A listener that never accepts, with a backlog of 1: once its accept
    // queue is full, Linux drops further SYNs, so connects hang.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let target = listener.local_addr().expect("local_addr");
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(target)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(err)) => panic!("filling the accept queue: connect failed: {err}"),
            Err(_) => break,
        }
        assert!(
            fillers.len() < 64,
            "accept queue still not full after 64 connections"
        );
    }

    let result = check_once(&http_client(), target, &tcp(300)).await;
    assert_eq!(result.failure, Some(FailureKind::Timeout), "{result:?}");
    assert_eq!(result.detail, "connect timeout after 300ms");
    assert!(
        result.latency >= Duration::from_millis(300),
        "latency {:?}",
        result.latency
    );
    drop(listener);
}

// ---- HTTP --------------------------------------------------------------------

#[tokio::test]
async fn http_check_passes_on_the_expected_status_and_requests_the_path() {
    let server = HttpServer::start(200, Duration::ZERO).await;
    let client = http_client();
    let result = check_once(&client, server.addr, &http("/healthz", 200, 1000)).await;
    assert!(result.ok, "expected a pass on HTTP 200, got {result:?}");
    assert!(
        result.detail.starts_with("HTTP 200 in ") && result.detail.ends_with(" ms"),
        "unexpected detail {:?}",
        result.detail
    );
    let result = check_once(&client, server.addr, &http("ready", 200, 1000)).await;
    assert!(result.ok, "expected a pass on HTTP 200, got {result:?}");
    assert_eq!(
        server.paths(),
        ["/healthz", "/ready"],
        "a leading slash is added"
    );
    server.stop().await;
}

#[tokio::test]
async fn http_check_fails_on_another_status() {
    let server = HttpServer::start(503, Duration::ZERO).await;
    let result = check_once(&http_client(), server.addr, &http("/healthz", 200, 1000)).await;
    assert!(!result.ok, "expected a failure on HTTP 503, got {result:?}");
    assert_eq!(result.failure, Some(FailureKind::HttpStatus(503)));
    assert_eq!(result.detail, "HTTP 503 (expected 200)");
    server.stop().await;
}

#[tokio::test]
async fn http_check_accepts_a_configured_status() {
    let server = HttpServer::start(204, Duration::ZERO).await;
    let result = check_once(&http_client(), server.addr, &http("/", 204, 1000)).await;
    assert!(
        result.ok,
        "expected a pass on HTTP 204 when 204 is expected, got {result:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn http_check_does_not_follow_redirects() {
    let server = HttpServer::start(302, Duration::ZERO).await;
    let result = check_once(&http_client(), server.addr, &http("/healthz", 200, 1000)).await;
    assert_eq!(
        result.failure,
        Some(FailureKind::HttpStatus(302)),
        "{result:?}"
    );
    assert_eq!(result.detail, "HTTP 302 (expected 200)");
    assert_eq!(
        server.paths(),
        ["/healthz"],
        "the redirect must not be followed"
    );
    server.stop().await;
}

#[tokio::test]
async fn http_check_times_out_on_a_slow_response() {
    let server = HttpServer::start(200, Duration::from_secs(3)).await;
    let start = Instant::now();
    let result = check_once(&http_client(), server.addr, &http("/slow", 200, 200)).await;
    let took = start.elapsed();
    // The server answers after 3 s: a Timeout result is the check ending at
    // its own timeout. Only the lower bound is timed (a timer never fires
    // early; a busy machine can make anything late).
    assert_eq!(result.failure, Some(FailureKind::Timeout), "{result:?}");
    assert_eq!(result.detail, "HTTP timeout after 200ms");
    assert!(
        took >= Duration::from_millis(200),
        "the check ended before its 200ms timeout, took {took:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn http_check_is_refused_on_a_closed_port() {
    let target = closed_port().await;
    let result = check_once(&http_client(), target, &http("/healthz", 200, 1000)).await;
    assert_eq!(result.failure, Some(FailureKind::Refused), "{result:?}");
    assert_eq!(result.detail, "connect refused");
}

#[tokio::test]
async fn http_checks_open_a_new_connection_every_time() {
    let server = HttpServer::start(200, Duration::ZERO).await;
    let client = http_client();
    for n in 1..=3 {
        let result = check_once(&client, server.addr, &http("/healthz", 200, 1000)).await;
        assert!(result.ok, "check {n}: {result:?}");
    }
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        3,
        "each check must connect anew, not reuse a pooled connection"
    );
    server.stop().await;
}

// ---- run_checker -------------------------------------------------------------

#[tokio::test]
async fn checker_rises_after_rise_passes_and_falls_when_the_server_stops() {
    let server = HttpServer::start(200, Duration::ZERO).await;
    let mut checker = spawn_checker(server.addr, http("/healthz", 200, 500), 50, 2, 2);

    let events = until_transition(&mut checker.rx, true).await;
    assert_eq!(
        events.len(),
        2,
        "rise 2: healthy on the second pass, got {events:#?}"
    );
    assert!(!events[0].healthy && events[0].transition.is_none());
    assert!(
        events[0]
            .reason
            .starts_with("pass 1 of 2 before entering rotation: HTTP 200 in "),
        "reason {:?}",
        events[0].reason
    );
    assert!(events[1].healthy);
    assert!(
        events[1]
            .reason
            .starts_with("2 consecutive passes: HTTP 200 in "),
        "reason {:?}",
        events[1].reason
    );

    server.stop().await;
    let events = until_transition(&mut checker.rx, false).await;
    let failures: Vec<&HealthEvent> = events.iter().filter(|e| !e.result.ok).collect();
    assert_eq!(
        failures.len(),
        2,
        "fall 2: down on the second failure, got {events:#?}"
    );
    assert!(
        failures[0].healthy,
        "one failure must not take it out of rotation"
    );
    assert_eq!(
        failures[0].reason,
        "failure 1 of 2 before leaving rotation: connect refused"
    );
    assert!(!failures[1].healthy);
    assert_eq!(
        failures[1].reason,
        "2 consecutive failures: connect refused"
    );
    assert_eq!(failures[1].target, events[0].target);

    checker.shutdown.send(true).expect("checker is listening");
    expect_finished(checker.task, "shutdown").await;
}

#[tokio::test]
async fn checker_marks_a_backend_that_never_answers_down() {
    let target = closed_port().await;
    let mut checker = spawn_checker(target, tcp(500), 50, 2, 3);
    let events = until_transition(&mut checker.rx, false).await;
    assert_eq!(
        events.len(),
        3,
        "fall 3: down on the third failure, got {events:#?}"
    );
    assert_eq!(
        events[0].reason,
        "failure 1 of 3 before marking down: connect refused"
    );
    assert_eq!(events[2].reason, "3 consecutive failures: connect refused");
    assert_eq!(events[2].result.failure, Some(FailureKind::Refused));
    drop(checker.shutdown);
    expect_finished(checker.task, "dropping the shutdown sender").await;
}

#[tokio::test]
async fn checker_tcp_goes_down_when_the_listener_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = listener.local_addr().expect("local_addr");
    let mut checker = spawn_checker(target, tcp(500), 50, 1, 1);
    let events = until_transition(&mut checker.rx, true).await;
    assert_eq!(
        events.len(),
        1,
        "rise 1: healthy on the first pass, got {events:#?}"
    );
    assert_eq!(events[0].result.failure, None);

    drop(listener);
    let events = until_transition(&mut checker.rx, false).await;
    let last = events.last().expect("at least one event");
    assert_eq!(last.reason, "1 consecutive failure: connect refused");
    checker.shutdown.send(true).expect("checker is listening");
    expect_finished(checker.task, "shutdown").await;
}

#[tokio::test]
async fn checker_checks_at_once_then_every_interval() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = listener.local_addr().expect("local_addr");
    // At once: with an interval far longer than DEADLINE, the first event
    // can only come from a check made at start.
    let mut slow = spawn_checker(target, tcp(500), 3_600_000, 2, 2);
    next_event(&mut slow.rx, "the first check, before any interval").await;
    slow.shutdown.send(true).expect("checker is listening");
    expect_finished(slow.task, "shutdown").await;

    // Then every interval: never sooner (a timer never fires early; only
    // lower bounds are timed, as a busy machine can make anything late).
    let start = Instant::now();
    let mut checker = spawn_checker(target, tcp(500), 300, 2, 2);
    next_event(&mut checker.rx, "the first check").await;
    next_event(&mut checker.rx, "the second check").await;
    let second = start.elapsed();
    assert!(
        second >= Duration::from_millis(290),
        "second check after {second:?}, want one 300ms interval"
    );
    checker.shutdown.send(true).expect("checker is listening");
    expect_finished(checker.task, "shutdown").await;
}

#[tokio::test]
async fn checker_shutdown_interrupts_a_check_in_progress() {
    let server = HttpServer::start(200, Duration::from_secs(30)).await;
    let checker = spawn_checker(server.addr, http("/slow", 200, 30_000), 50, 2, 2);
    // Wait until the check has reached the server, so shutdown lands mid-check.
    let deadline = Instant::now() + DEADLINE;
    while server.paths().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the check never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    checker.shutdown.send(true).expect("checker is listening");
    expect_finished(checker.task, "shutdown during a 30s check").await;
    server.stop().await;
}

#[tokio::test]
async fn checker_stops_when_nobody_listens_for_events() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = listener.local_addr().expect("local_addr");
    let Checker {
        rx,
        shutdown: _shutdown,
        task,
    } = spawn_checker(target, tcp(500), 50, 2, 2);
    drop(rx);
    expect_finished(task, "the event receiver was dropped").await;
}
