//! Discovery against a real DNS server: testkit's `FakeDns` (hickory-server)
//! on 127.0.0.1, UDP and TCP on the same ephemeral port, answering like
//! Docker's embedded DNS where it matters here:
//! - `tasks.web.` answers with the current task addresses, TTL 600;
//! - UDP answers are truncated at 512 bytes (or the client's EDNS size) with
//!   the TC bit set, TCP answers are complete;
//! - on demand: SERVFAIL, NXDOMAIN, or no answer at all (timeouts).
//!
//! The server counts every query by transport, so the tests can prove the
//! TCP fallback and measure the query rate.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_user::{
    backends::discovery::{HickoryResolve, LookupError, Poller, QueryStats, Resolve},
    config::Family,
};
use testkit::{
    dns::{DnsMode as Mode, FakeDns},
    wait::until,
};
use tokio::sync::watch;

const TASKS: &str = "tasks.web";

/// The test server, `tasks.web` set (no addresses yet: NODATA).
struct Dns(FakeDns);

impl Dns {
    async fn start() -> Dns {
        let dns = FakeDns::ephemeral().expect("starting the test DNS server");
        dns.set(TASKS, []);
        Dns(dns)
    }

    fn set_tasks(&self, n: u16) {
        self.0.set(TASKS, (0..n).map(task_v4));
    }

    fn set_mode(&self, mode: Mode) {
        self.0.set_mode(mode);
    }

    fn queries(&self) -> (u64, u64) {
        let s = self.0.stats();
        (s.udp, s.tcp)
    }

    fn total_queries(&self) -> u64 {
        let (udp, tcp) = self.queries();
        udp + tcp
    }

    fn resolver(&self, timeout: Duration) -> HickoryResolve {
        HickoryResolve::new(self.0.addr(), timeout)
    }
}

fn task_v4(i: u16) -> Ipv4Addr {
    let [hi, lo] = (i + 2).to_be_bytes();
    Ipv4Addr::new(10, 0, hi, lo)
}

fn tasks_v4(n: u16) -> BTreeSet<IpAddr> {
    (0..n).map(|i| IpAddr::V4(task_v4(i))).collect()
}

const INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_millis(500);
const DEADLINE: Duration = Duration::from_secs(10);

/// A running poll loop for `web`.
struct Loop {
    rx: watch::Receiver<BTreeSet<IpAddr>>,
    stats: Arc<QueryStats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Loop {
    fn start(poller: Poller<HickoryResolve>) -> Loop {
        let (tx, rx) = watch::channel(BTreeSet::new());
        let (stop, stop_rx) = watch::channel(false);
        let stats = poller.stats();
        let task = tokio::spawn(poller.run(tx, stop_rx));
        Loop {
            rx,
            stats,
            stop,
            task,
        }
    }

    /// Waits until the published set satisfies `what`, or panics with the last
    /// set seen.
    async fn wait(&mut self, label: &str, what: impl FnMut(&BTreeSet<IpAddr>) -> bool) {
        let timed_out = tokio::time::timeout(DEADLINE, self.rx.wait_for(what))
            .await
            .is_err();
        if timed_out {
            panic!(
                "waited {DEADLINE:?} for {label}; last published set has {} tasks, stats {:?}",
                self.rx.borrow().len(),
                self.stats.snapshot()
            );
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("the loop stops within 2 s of shutdown")
            .unwrap();
    }
}

fn poller(dns: &Dns) -> Poller<HickoryResolve> {
    Poller::new(dns.resolver(TIMEOUT), "tasks.web", Family::V4)
        .interval(INTERVAL)
        .empty_polls(3)
        .max_backoff(Duration::from_millis(400))
}

#[tokio::test]
async fn three_tasks_resolve_over_udp() {
    let dns = Dns::start().await;
    dns.set_tasks(3);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("3 tasks", |s| *s == tasks_v4(3)).await;
    let (udp, tcp) = dns.queries();
    assert!(udp >= 1, "the answer came over UDP: udp {udp}");
    assert_eq!(tcp, 0, "3 tasks fit in 512 bytes: no TCP expected");
    lp.stop().await;
}

#[tokio::test]
async fn two_hundred_tasks_arrive_over_tcp_after_truncation() {
    let dns = Dns::start().await;
    dns.set_tasks(3);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("3 tasks", |s| *s == tasks_v4(3)).await;
    assert_eq!(dns.queries().1, 0, "no TCP while the answer fits");

    dns.set_tasks(200);
    lp.wait("200 tasks", |s| *s == tasks_v4(200)).await;
    let (udp, tcp) = dns.queries();
    let truncated = dns.0.stats().truncated;
    let max_udp = dns.0.stats().max_udp_len;
    eprintln!("200 tasks: {udp} UDP queries, {tcp} TCP, {truncated} truncated, biggest UDP answer {max_udp} B");
    assert!(
        truncated >= 1,
        "the server must have truncated a UDP answer"
    );
    assert!(
        tcp >= 1,
        "the full answer must have come over TCP: tcp {tcp}"
    );
    assert!(
        max_udp <= 512,
        "UDP answers stay within 512 bytes, saw {max_udp}"
    );

    lp.stop().await;

    // Every lookup of a big service is a truncated UDP answer plus a TCP one.
    let before = dns.queries();
    let resolver = dns.resolver(TIMEOUT);
    let ips = resolver.lookup("tasks.web.", Family::V4).await.unwrap();
    assert_eq!(ips.into_iter().collect::<BTreeSet<_>>(), tasks_v4(200));
    let after = dns.queries();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "one lookup = one UDP query (truncated) + one TCP query"
    );
}

#[tokio::test]
async fn answers_are_never_cached() {
    let dns = Dns::start().await;
    dns.set_tasks(2);
    let resolver = dns.resolver(TIMEOUT);
    for round in 1..=3u64 {
        let ips = resolver.lookup("tasks.web", Family::V4).await.unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(
            dns.total_queries(),
            round,
            "TTL 600 must not be honoured: round {round}"
        );
    }
    dns.set_tasks(5);
    let ips = resolver.lookup("tasks.web", Family::V4).await.unwrap();
    assert_eq!(ips.len(), 5, "a change is seen on the very next lookup");
}

#[tokio::test]
async fn servfail_keeps_the_set() {
    let dns = Dns::start().await;
    dns.set_tasks(4);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("4 tasks", |s| *s == tasks_v4(4)).await;

    dns.set_mode(Mode::ServFail);
    let stats = Arc::clone(&lp.stats);
    until(DEADLINE, "5 SERVFAILs", || stats.snapshot().servfail >= 5).await;
    assert_eq!(
        *lp.rx.borrow(),
        tasks_v4(4),
        "SERVFAIL must keep the last good set"
    );
    assert_eq!(
        stats.snapshot().changes,
        1,
        "only the first answer was published"
    );

    dns.set_tasks(6);
    lp.wait("6 tasks after SERVFAIL", |s| *s == tasks_v4(6))
        .await;
    lp.stop().await;
}

#[tokio::test]
async fn timeouts_keep_the_set() {
    let dns = Dns::start().await;
    dns.set_tasks(4);
    let poller = Poller::new(
        dns.resolver(Duration::from_millis(100)),
        "tasks.web",
        Family::V4,
    )
    .interval(INTERVAL)
    .max_backoff(Duration::from_millis(200));
    let mut lp = Loop::start(poller);
    lp.wait("4 tasks", |s| *s == tasks_v4(4)).await;

    dns.set_mode(Mode::Drop);
    let stats = Arc::clone(&lp.stats);
    until(DEADLINE, "3 timeouts", || stats.snapshot().timeout >= 3).await;
    assert_eq!(
        *lp.rx.borrow(),
        tasks_v4(4),
        "timeouts must keep the last good set"
    );
    let counts = stats.snapshot();
    assert_eq!(
        counts.other, 0,
        "timeouts must be classified as such: {counts:?}"
    );

    dns.set_mode(Mode::Answer);
    dns.set_tasks(1);
    lp.wait("1 task after timeouts", |s| *s == tasks_v4(1))
        .await;
    lp.stop().await;
}

#[tokio::test]
async fn nxdomain_empties_only_after_three_polls() {
    let dns = Dns::start().await;
    dns.set_tasks(4);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("4 tasks", |s| *s == tasks_v4(4)).await;

    dns.set_mode(Mode::NxDomain);
    let stats = Arc::clone(&lp.stats);
    let mut nx_when_emptied = 0;
    lp.wait("empty", |s| {
        nx_when_emptied = stats.snapshot().nxdomain;
        s.is_empty()
    })
    .await;
    // 3 exactly, or 4 if this task ran late and the loop polled again (the
    // next poll is 100 ms later); never fewer than 3.
    assert!(
        (3..=4).contains(&nx_when_emptied),
        "emptied after {nx_when_emptied} NXDOMAIN answers, expected the 3rd"
    );
    lp.stop().await;
}

#[tokio::test]
async fn empty_answer_counts_like_nxdomain() {
    let dns = Dns::start().await;
    dns.set_tasks(2);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("2 tasks", |s| *s == tasks_v4(2)).await;

    dns.set_tasks(0);
    let stats = Arc::clone(&lp.stats);
    let mut nodata_when_emptied = 0;
    lp.wait("empty", |s| {
        nodata_when_emptied = stats.snapshot().nodata;
        s.is_empty()
    })
    .await;
    assert!(
        (3..=4).contains(&nodata_when_emptied),
        "emptied after {nodata_when_emptied} empty answers, expected the 3rd"
    );
    lp.stop().await;
}

#[tokio::test]
async fn query_rate_at_zero_replicas_is_bounded() {
    let dns = Dns::start().await;
    dns.set_tasks(3);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("3 tasks", |s| *s == tasks_v4(3)).await;

    dns.set_mode(Mode::NxDomain);
    lp.wait("empty", |s| s.is_empty()).await;
    let window = Duration::from_secs(3);
    let before = dns.total_queries();
    tokio::time::sleep(window).await;
    let during = dns.total_queries() - before;
    // Interval 50 ms, cap 400 ms: after emptying the delays are 100, 200,
    // then 400 ms, so about 2 + 3 s / 400 ms = 9.5 queries in 3 s, where
    // polling at the interval would send 60.
    eprintln!(
        "at zero replicas: {during} queries in {window:?} (interval {INTERVAL:?}, cap 400ms)"
    );
    assert!(
        during <= 11,
        "{during} queries in {window:?} at zero replicas, expected <= 11"
    );
    assert!(
        during >= 4,
        "{during} queries in {window:?}: the loop must keep asking"
    );

    // A scale-up from zero is seen within the cap (plus a query's latency).
    dns.set_tasks(2);
    let start = Instant::now();
    lp.wait("scale-up from zero", |s| *s == tasks_v4(2)).await;
    let seen = start.elapsed();
    // How soon is bounded by the paused-clock unit test
    // (`scale_up_from_zero_is_seen_within_the_cap`); a wall-clock bound here
    // would fail on a busy machine.
    eprintln!("scale-up from zero seen after {seen:?}");
    lp.stop().await;
}

#[tokio::test]
async fn query_rate_while_servfail_is_bounded() {
    let dns = Dns::start().await;
    dns.set_tasks(3);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("3 tasks", |s| *s == tasks_v4(3)).await;

    dns.set_mode(Mode::ServFail);
    let before = dns.total_queries();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let during = dns.total_queries() - before;
    // 100, 200, 400, 400, ... ms: about 3 + 2.3 s / 400 ms = 9 queries.
    eprintln!("during SERVFAIL: {during} queries in {window:?}");
    assert!(
        during <= 11,
        "{during} queries in {window:?} of SERVFAIL, expected <= 11"
    );
    assert_eq!(*lp.rx.borrow(), tasks_v4(3));
    lp.stop().await;
}

#[tokio::test]
async fn aaaa_for_v6_and_other_family_ignored() {
    let dns = Dns::start().await;
    let v6: Vec<Ipv6Addr> = (1..=3)
        .map(|i| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))
        .collect();
    dns.0.set(TASKS, [task_v4(0), task_v4(1)]);
    dns.0.set_v6(TASKS, v6.iter().copied());
    dns.0.set_mixed(true); // A and AAAA in every answer
    let expected: BTreeSet<IpAddr> = v6.iter().copied().map(IpAddr::V6).collect();
    let poller = Poller::new(dns.resolver(TIMEOUT), "tasks.web", Family::V6).interval(INTERVAL);
    let mut lp = Loop::start(poller);
    lp.wait("3 IPv6 tasks", |s| *s == expected).await;

    let resolver = dns.resolver(TIMEOUT);
    let v4 = resolver.lookup("tasks.web.", Family::V4).await.unwrap();
    assert_eq!(v4.len(), 2, "the A lookup ignores the AAAA records: {v4:?}");
    lp.stop().await;
}

#[tokio::test]
async fn aaaa_lookup_of_a_v4_only_service_is_nodata() {
    let dns = Dns::start().await;
    dns.set_tasks(2);
    let resolver = dns.resolver(TIMEOUT);
    let result = resolver.lookup("tasks.web.", Family::V6).await;
    assert_eq!(result, Err(LookupError::NoRecords));
}

#[tokio::test]
async fn duplicates_are_collapsed() {
    let dns = Dns::start().await;
    dns.0
        .set(TASKS, [task_v4(0), task_v4(1), task_v4(0), task_v4(1)]);
    let mut lp = Loop::start(poller(&dns));
    lp.wait("2 distinct tasks", |s| *s == tasks_v4(2)).await;
    lp.stop().await;
}

#[tokio::test]
async fn cname_chain_is_followed() {
    let dns = Dns::start().await;
    dns.0.set("real.web", [task_v4(0), task_v4(1), task_v4(2)]);
    dns.0.set_cname(TASKS, Some("real.web"));
    let resolver = dns.resolver(TIMEOUT);
    let ips = resolver.lookup("tasks.web.", Family::V4).await.unwrap();
    assert_eq!(ips.into_iter().collect::<BTreeSet<_>>(), tasks_v4(3));
    assert_eq!(
        dns.total_queries(),
        2,
        "one query for the CNAME, one for its target"
    );
}

#[tokio::test]
async fn error_kinds_are_classified() {
    let dns = Dns::start().await;
    let resolver = dns.resolver(Duration::from_millis(100));
    for (mode, expected) in [
        (Mode::NxDomain, LookupError::NxDomain),
        (Mode::ServFail, LookupError::ServFail),
        (Mode::Drop, LookupError::Timeout),
    ] {
        dns.set_mode(mode);
        let before = dns.total_queries();
        let result = resolver.lookup("tasks.web.", Family::V4).await;
        assert_eq!(result, Err(expected), "server mode {mode:?}");
        assert_eq!(
            dns.total_queries() - before,
            1,
            "{mode:?}: exactly one query, no retries"
        );
    }
    dns.set_tasks(1);
    let unknown = resolver.lookup("tasks.nope.", Family::V4).await;
    assert_eq!(unknown, Err(LookupError::NxDomain));
}
