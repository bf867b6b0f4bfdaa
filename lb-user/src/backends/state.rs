//! The backend state machine of one service: DNS answers and health verdicts
//! in, state transitions out. Pure: no I/O, no clock (callers pass `now`), so
//! every rule below is unit-tested.
//!
//! ```text
//!            new in DNS
//!   (none) ─────────────► probing ──rise passes──► active ◄──────────┐
//!     │ checks off            │                    │   ▲             │
//!     └──────────────────────────────────────────► │   │ back in DNS │
//!                             │ fall failures      │   │             │
//!                             ▼                    │   │             │
//!                            down ◄─fall failures──┘   │             │
//!                             │  ──rise passes────────►┘             │
//!                             │                                      │
//!   gone from DNS: probing, down ──► removed                         │
//!                  active ──► draining ──drain timeout──► removed    │
//!                                 │ ──fall failures─────► removed    │
//!                                 └──────────────────────────────────┘
//! ```
//!
//! Rules, as an operator sees them:
//! - `probing`: in DNS, no health verdict yet. No traffic.
//! - `active`: in DNS and healthy (or in DNS with checks off). In the Maglev
//!   table: receives new flows.
//! - `draining`: was active, gone from DNS. No new flows; existing flows keep
//!   going to it until the drain timeout, then it is removed. A drain timeout
//!   of zero removes it at once.
//! - `down`: in DNS, failed `fall` checks in a row (also a new task that fails
//!   `fall` checks before it ever passed, so a task that never starts is
//!   visibly down). No flows at all: the data plane re-picks existing flows so
//!   their clients fail fast. Back to `active` after `rise` passes.
//! - Removal (`to: None`): a probing or down backend that leaves DNS is
//!   removed at once (it has no flows to finish); so is a draining backend
//!   whose checks fail `fall` times: the task is most likely gone, its flows
//!   are dead, and keeping it would only delay their re-pick.
//! - A draining backend that reappears in DNS goes back to `active` at once
//!   (it was healthy when it left and has not failed since). A down backend
//!   that leaves and reappears starts over as a new, probing backend, so it
//!   gets no traffic until it has passed `rise` checks.
//!
//! Health checks keep running for every tracked backend, draining ones
//! included; start a checker when a transition has `from: None`, stop it when
//! one has `to: None`. An empty DNS answer drains everything, so the caller
//! must only pass sets it trusts (see `discovery`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::{BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING};

use crate::backends::health::{CheckResult, HealthEvent};

/// The state of one backend (a task address and the service's port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// In DNS, no health verdict yet: no traffic.
    Probing,
    /// In DNS and healthy (or checks off): in the Maglev table.
    Active,
    /// Gone from DNS: no new flows, existing flows finish until the timeout.
    Draining,
    /// Failing health checks: no flows at all.
    Down,
}

impl State {
    /// Lower-case name used in logs, the CLI, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Probing => "probing",
            State::Active => "active",
            State::Draining => "draining",
            State::Down => "down",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `BACKENDS` map state for a backend in `state`.
///
/// Probing backends map to `BACKEND_DOWN`: they are never in the Maglev
/// table and have no flows, so writing them as down (or not writing them
/// yet) is the same to the data plane, and a stray lookup fails safe.
/// Removed backends have their slot cleared (`BACKEND_EMPTY`).
pub fn data_plane_state(state: State) -> u8 {
    match state {
        State::Active => BACKEND_ACTIVE,
        State::Draining => BACKEND_DRAINING,
        State::Down | State::Probing => BACKEND_DOWN,
    }
}

/// One state change, for the log (its `Display` is the log line) and for the
/// map writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub addr: SocketAddr,
    /// `None`: the backend is new.
    pub from: Option<State>,
    /// `None`: the backend is removed from the table.
    pub to: Option<State>,
    pub reason: String,
}

impl fmt::Display for Transition {
    /// "10.0.1.7:80 down: 3 consecutive failures: connect timeout after 500ms"
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = self.to.map_or("removed", State::as_str);
        write!(f, "{} {to}: {}", self.addr, self.reason)
    }
}

/// The most recent health check result of a backend, for reporting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastCheck {
    pub ok: bool,
    pub latency: Duration,
    pub detail: String,
    pub at: Instant,
}

/// What the tracker knows about one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    pub addr: SocketAddr,
    pub state: State,
    /// Why it entered `state` (the reason of the last transition).
    pub reason: String,
    /// When it entered `state`.
    pub since: Instant,
    /// The health checker's verdict: `None` until `rise` passes or `fall`
    /// failures (and always `None` with checks off).
    pub healthy: Option<bool>,
    pub last_check: Option<LastCheck>,
    /// When a draining backend will be removed.
    pub drain_deadline: Option<Instant>,
}

/// The backends of one service, keyed by address and port.
#[derive(Clone, Debug)]
pub struct BackendTracker {
    name: String,
    checks_enabled: bool,
    drain_timeout: Duration,
    backends: BTreeMap<SocketAddr, BackendInfo>,
}

impl BackendTracker {
    /// `name` is the DNS name the tasks come from (`tasks.web`), used in
    /// reasons. With `checks_enabled == false` a backend is active as soon as
    /// it is in DNS and health verdicts are ignored.
    pub fn new(name: impl Into<String>, checks_enabled: bool, drain_timeout: Duration) -> Self {
        Self {
            name: name.into(),
            checks_enabled,
            drain_timeout,
            backends: BTreeMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn checks_enabled(&self) -> bool {
        self.checks_enabled
    }

    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// A reload changed `drain_timeout`: backends that start draining from
    /// now on get the new one; those draining already keep their deadline.
    pub fn set_drain_timeout(&mut self, d: Duration) {
        self.drain_timeout = d;
    }

    /// A new DNS answer: the complete set of task addresses. Adds new
    /// backends, drains or removes the ones that left, brings draining ones
    /// back.
    pub fn on_dns(&mut self, set: &BTreeSet<IpAddr>, port: u16, now: Instant) -> Vec<Transition> {
        let wanted: BTreeSet<SocketAddr> =
            set.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        let mut out = Vec::new();

        let tracked: Vec<SocketAddr> = self.backends.keys().copied().collect();
        for addr in tracked {
            let Some(info) = self.backends.get(&addr) else {
                continue;
            };
            let in_dns = wanted.contains(&addr);
            match (info.state, in_dns) {
                (State::Draining, true) => {
                    let (to, reason) = match (self.checks_enabled, info.healthy) {
                        (true, Some(false)) => (
                            State::Down,
                            format!(
                                "back in DNS ({}) while draining, failing health checks",
                                self.name
                            ),
                        ),
                        (true, None) => (
                            State::Probing,
                            format!(
                                "back in DNS ({}) while draining, no health verdict yet",
                                self.name
                            ),
                        ),
                        _ => (
                            State::Active,
                            format!(
                                "back in DNS ({}) while draining, returns to rotation",
                                self.name
                            ),
                        ),
                    };
                    out.push(self.set_state(addr, to, reason, now));
                }
                (State::Active, false) if !self.drain_timeout.is_zero() => {
                    let reason = format!(
                        "gone from DNS ({}), existing flows may finish for {}",
                        self.name,
                        humantime::format_duration(self.drain_timeout)
                    );
                    out.push(self.set_state(addr, State::Draining, reason, now));
                    if let Some(info) = self.backends.get_mut(&addr) {
                        info.drain_deadline = Some(now + self.drain_timeout);
                    }
                }
                (State::Active, false) => {
                    let reason = format!("gone from DNS ({}), drain timeout is 0s", self.name);
                    out.push(self.remove(addr, reason));
                }
                (State::Probing, false) => {
                    let reason =
                        format!("gone from DNS ({}) before passing health checks", self.name);
                    out.push(self.remove(addr, reason));
                }
                (State::Down, false) => {
                    let reason = format!("gone from DNS ({}) while down", self.name);
                    out.push(self.remove(addr, reason));
                }
                (State::Probing | State::Active | State::Down, true) | (State::Draining, false) => {
                }
            }
        }

        for addr in wanted {
            if self.backends.contains_key(&addr) {
                continue;
            }
            let (state, reason) = if self.checks_enabled {
                (
                    State::Probing,
                    format!(
                        "new in DNS ({}), no traffic until health checks pass",
                        self.name
                    ),
                )
            } else {
                (
                    State::Active,
                    format!("new in DNS ({}), health checks off", self.name),
                )
            };
            self.backends.insert(
                addr,
                BackendInfo {
                    addr,
                    state,
                    reason: reason.clone(),
                    since: now,
                    healthy: None,
                    last_check: None,
                    drain_deadline: None,
                },
            );
            out.push(Transition {
                addr,
                from: None,
                to: Some(state),
                reason,
            });
        }
        out
    }

    /// Backends found `active` in the pinned maps when the daemon starts
    /// again: they stay in rotation while their checks start over, because a
    /// restart must not take healthy tasks out. One that fails its checks
    /// leaves after `fall` failures as usual; one missing from the next DNS
    /// answer drains.
    pub fn adopt_active(&mut self, addrs: &[SocketAddr], now: Instant) -> Vec<Transition> {
        let mut out = Vec::new();
        for &addr in addrs {
            if self.backends.contains_key(&addr) {
                continue;
            }
            let reason = "adopted from the pinned maps (active before the restart)".to_string();
            self.backends.insert(
                addr,
                BackendInfo {
                    addr,
                    state: State::Active,
                    reason: reason.clone(),
                    since: now,
                    healthy: self.checks_enabled.then_some(true),
                    last_check: None,
                    drain_deadline: None,
                },
            );
            out.push(Transition {
                addr,
                from: None,
                to: Some(State::Active),
                reason,
            });
        }
        out
    }

    /// A health verdict change from the checker (a [`HealthEvent`] whose
    /// `transition` is set): `healthy` after `rise` passes, not healthy after
    /// `fall` failures. `reason` explains it ("3 consecutive failures:
    /// connect refused"). Repeating the current verdict changes nothing.
    /// Ignored for unknown backends (a checker racing a removal) and when
    /// checks are off.
    ///
    /// Only pass verdict changes: a single failed check of a probing backend
    /// is not a reason to mark it down. [`on_event`](Self::on_event) does
    /// the filtering.
    pub fn on_health(
        &mut self,
        addr: SocketAddr,
        healthy: bool,
        reason: &str,
        now: Instant,
    ) -> Vec<Transition> {
        if !self.checks_enabled {
            return Vec::new();
        }
        let Some(info) = self.backends.get_mut(&addr) else {
            return Vec::new();
        };
        info.healthy = Some(healthy);
        let transition = match (info.state, healthy) {
            (State::Probing | State::Down, true) => {
                self.set_state(addr, State::Active, reason.to_owned(), now)
            }
            (State::Probing | State::Active, false) => {
                self.set_state(addr, State::Down, reason.to_owned(), now)
            }
            (State::Draining, false) => self.remove(
                addr,
                format!("failing health checks while draining ({reason})"),
            ),
            (State::Active | State::Draining, true) | (State::Down, false) => return Vec::new(),
        };
        vec![transition]
    }

    /// Remember `result` as the backend's latest check, for reporting.
    pub fn record_check(&mut self, addr: SocketAddr, result: &CheckResult, now: Instant) {
        if let Some(info) = self.backends.get_mut(&addr) {
            info.last_check = Some(LastCheck {
                ok: result.ok,
                latency: result.latency,
                detail: result.detail.clone(),
                at: now,
            });
        }
    }

    /// Everything a [`HealthEvent`] means: record its result, and apply its
    /// verdict change if it has one.
    pub fn on_event(&mut self, event: &HealthEvent, now: Instant) -> Vec<Transition> {
        self.record_check(event.target, &event.result, now);
        match event.transition {
            Some(healthy) => self.on_health(event.target, healthy, &event.reason, now),
            None => Vec::new(),
        }
    }

    /// Time passes: removes draining backends whose drain timeout has
    /// expired (at `deadline <= now`).
    pub fn on_tick(&mut self, now: Instant) -> Vec<Transition> {
        let expired: Vec<SocketAddr> = self
            .backends
            .values()
            .filter(|info| {
                info.state == State::Draining && info.drain_deadline.is_some_and(|d| d <= now)
            })
            .map(|info| info.addr)
            .collect();
        let reason = format!(
            "drain timeout ({}) expired",
            humantime::format_duration(self.drain_timeout)
        );
        expired
            .into_iter()
            .map(|addr| self.remove(addr, reason.clone()))
            .collect()
    }

    /// The earliest drain deadline, so the caller knows when to call
    /// [`on_tick`](Self::on_tick) next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.backends
            .values()
            .filter_map(|info| info.drain_deadline)
            .min()
    }

    /// The backends that take new flows, in address order: the Maglev input.
    pub fn active_set(&self) -> Vec<SocketAddr> {
        self.backends
            .values()
            .filter(|info| info.state == State::Active)
            .map(|info| info.addr)
            .collect()
    }

    /// Every tracked backend, in address order.
    pub fn backends(&self) -> impl Iterator<Item = &BackendInfo> {
        self.backends.values()
    }

    pub fn get(&self, addr: SocketAddr) -> Option<&BackendInfo> {
        self.backends.get(&addr)
    }

    pub fn state(&self, addr: SocketAddr) -> Option<State> {
        self.backends.get(&addr).map(|info| info.state)
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Move a tracked backend to `to`. The caller checked that it exists.
    fn set_state(
        &mut self,
        addr: SocketAddr,
        to: State,
        reason: String,
        now: Instant,
    ) -> Transition {
        let info = self
            .backends
            .get_mut(&addr)
            .expect("set_state is only called for tracked backends");
        let from = info.state;
        info.state = to;
        info.reason = reason.clone();
        info.since = now;
        if to != State::Draining {
            info.drain_deadline = None;
        }
        Transition {
            addr,
            from: Some(from),
            to: Some(to),
            reason,
        }
    }

    fn remove(&mut self, addr: SocketAddr, reason: String) -> Transition {
        let from = self.backends.remove(&addr).map(|info| info.state);
        Transition {
            addr,
            from,
            to: None,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::BACKEND_EMPTY;

    use super::*;
    use crate::backends::health::FailureKind;

    const PORT: u16 = 80;
    const DRAIN: Duration = Duration::from_secs(30);

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 1, last))
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::new(ip(last), PORT)
    }

    fn dns(lasts: &[u8]) -> BTreeSet<IpAddr> {
        lasts.iter().map(|l| ip(*l)).collect()
    }

    fn tracker(checks: bool) -> BackendTracker {
        BackendTracker::new("tasks.web", checks, DRAIN)
    }

    /// The transitions as their log lines, so a failing test shows them all.
    fn lines(ts: &[Transition]) -> Vec<String> {
        ts.iter().map(ToString::to_string).collect()
    }

    fn t(addr: SocketAddr, from: Option<State>, to: Option<State>, reason: &str) -> Transition {
        Transition {
            addr,
            from,
            to,
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn new_backend_probes_until_checks_pass() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        let ts = tr.on_dns(&dns(&[7]), PORT, t0);
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 probing: new in DNS (tasks.web), no traffic until health checks pass"]
        );
        assert_eq!(ts[0].from, None);
        assert_eq!(tr.active_set(), [], "a probing backend must get no traffic");

        let t1 = t0 + Duration::from_secs(2);
        let ts = tr.on_health(addr(7), true, "2 consecutive passes", t1);
        assert_eq!(
            ts,
            [t(
                addr(7),
                Some(State::Probing),
                Some(State::Active),
                "2 consecutive passes"
            )]
        );
        assert_eq!(lines(&ts), ["10.0.1.7:80 active: 2 consecutive passes"]);
        assert_eq!(tr.active_set(), [addr(7)]);
        let info = tr.get(addr(7)).expect("tracked");
        assert_eq!((info.since, info.healthy), (t1, Some(true)));
        assert_eq!(info.reason, "2 consecutive passes");
    }

    #[test]
    fn checks_off_makes_new_backends_active_at_once_and_ignores_verdicts() {
        let t0 = Instant::now();
        let mut tr = tracker(false);
        let ts = tr.on_dns(&dns(&[7, 8]), PORT, t0);
        assert_eq!(
            lines(&ts),
            [
                "10.0.1.7:80 active: new in DNS (tasks.web), health checks off",
                "10.0.1.8:80 active: new in DNS (tasks.web), health checks off",
            ]
        );
        assert_eq!(tr.active_set(), [addr(7), addr(8)]);
        let ts = tr.on_health(addr(7), false, "1 consecutive failure: connect refused", t0);
        assert_eq!(ts, [], "verdicts must be ignored with checks off");
        assert_eq!(tr.state(addr(7)), Some(State::Active));
    }

    #[test]
    fn checks_off_backend_drains_and_returns() {
        let t0 = Instant::now();
        let mut tr = tracker(false);
        tr.on_dns(&dns(&[7]), PORT, t0);
        let ts = tr.on_dns(&dns(&[]), PORT, t0);
        assert_eq!(ts[0].to, Some(State::Draining), "{:?}", lines(&ts));
        let ts = tr.on_dns(&dns(&[7]), PORT, t0);
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 active: back in DNS (tasks.web) while draining, returns to rotation"]
        );
    }

    #[test]
    fn active_backend_fails_and_goes_down_then_recovers() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[7]), PORT, t0);
        tr.on_health(addr(7), true, "2 consecutive passes", t0);
        let reason = "3 consecutive failures: connect timeout after 500ms";
        let ts = tr.on_health(addr(7), false, reason, t0);
        assert_eq!(
            ts,
            [t(addr(7), Some(State::Active), Some(State::Down), reason)]
        );
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 down: 3 consecutive failures: connect timeout after 500ms"]
        );
        assert_eq!(tr.active_set(), []);
        assert_eq!(tr.on_health(addr(7), false, reason, t0), [], "already down");

        let ts = tr.on_health(addr(7), true, "2 consecutive passes", t0);
        assert_eq!(
            ts,
            [t(
                addr(7),
                Some(State::Down),
                Some(State::Active),
                "2 consecutive passes"
            )]
        );
        assert_eq!(
            tr.on_health(addr(7), true, "2 consecutive passes", t0),
            [],
            "already active"
        );
    }

    #[test]
    fn probing_backend_that_fails_goes_down() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[7]), PORT, t0);
        let ts = tr.on_health(
            addr(7),
            false,
            "3 consecutive failures: connect refused",
            t0,
        );
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 down: 3 consecutive failures: connect refused"]
        );
        assert_eq!(ts[0].from, Some(State::Probing));
    }

    #[test]
    fn active_backend_gone_from_dns_drains_until_timeout() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[7, 9]), PORT, t0);
        tr.on_health(addr(7), true, "2 consecutive passes", t0);
        tr.on_health(addr(9), true, "2 consecutive passes", t0);

        let t1 = t0 + Duration::from_secs(5);
        let ts = tr.on_dns(&dns(&[7]), PORT, t1);
        assert_eq!(
            lines(&ts),
            ["10.0.1.9:80 draining: gone from DNS (tasks.web), existing flows may finish for 30s"]
        );
        assert_eq!(ts[0].from, Some(State::Active));
        assert_eq!(
            tr.active_set(),
            [addr(7)],
            "a draining backend takes no new flows"
        );
        assert_eq!(tr.next_deadline(), Some(t1 + DRAIN));
        assert_eq!(
            tr.on_dns(&dns(&[7]), PORT, t1),
            [],
            "same answer, no change"
        );

        assert_eq!(
            tr.on_tick(t1 + DRAIN - Duration::from_millis(1)),
            [],
            "too early"
        );
        assert_eq!(tr.state(addr(9)), Some(State::Draining));
        let ts = tr.on_tick(t1 + DRAIN);
        assert_eq!(
            ts,
            [t(
                addr(9),
                Some(State::Draining),
                None,
                "drain timeout (30s) expired"
            )]
        );
        assert_eq!(
            lines(&ts),
            ["10.0.1.9:80 removed: drain timeout (30s) expired"]
        );
        assert_eq!(tr.get(addr(9)), None);
        assert_eq!(tr.next_deadline(), None);
        assert_eq!(tr.len(), 1);
    }

    #[test]
    fn zero_drain_timeout_removes_at_once() {
        let t0 = Instant::now();
        let mut tr = BackendTracker::new("tasks.web", false, Duration::ZERO);
        tr.on_dns(&dns(&[7]), PORT, t0);
        let ts = tr.on_dns(&dns(&[]), PORT, t0);
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 removed: gone from DNS (tasks.web), drain timeout is 0s"]
        );
        assert!(tr.is_empty());
    }

    #[test]
    fn draining_backend_reappearing_in_dns_is_active_again() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[9]), PORT, t0);
        tr.on_health(addr(9), true, "2 consecutive passes", t0);
        tr.on_dns(&dns(&[]), PORT, t0);
        let t1 = t0 + Duration::from_secs(3);
        let ts = tr.on_dns(&dns(&[9]), PORT, t1);
        assert_eq!(
            ts,
            [t(
                addr(9),
                Some(State::Draining),
                Some(State::Active),
                "back in DNS (tasks.web) while draining, returns to rotation"
            )]
        );
        assert_eq!(tr.active_set(), [addr(9)]);
        let info = tr.get(addr(9)).expect("tracked");
        assert_eq!((info.since, info.drain_deadline), (t1, None));
        assert_eq!(
            tr.on_tick(t0 + DRAIN),
            [],
            "the old drain deadline must be forgotten"
        );
    }

    #[test]
    fn draining_backend_failing_checks_is_removed_early() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[9]), PORT, t0);
        tr.on_health(addr(9), true, "2 consecutive passes", t0);
        tr.on_dns(&dns(&[]), PORT, t0);
        assert_eq!(tr.on_health(addr(9), true, "2 consecutive passes", t0), []);
        let ts = tr.on_health(
            addr(9),
            false,
            "3 consecutive failures: connect refused",
            t0,
        );
        assert_eq!(
            lines(&ts),
            ["10.0.1.9:80 removed: failing health checks while draining \
                 (3 consecutive failures: connect refused)"]
        );
        assert_eq!(ts[0].from, Some(State::Draining));
        assert!(tr.is_empty());
    }

    #[test]
    fn down_backend_gone_from_dns_is_removed_and_probes_again_when_back() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[7]), PORT, t0);
        tr.on_health(addr(7), true, "2 consecutive passes", t0);
        tr.on_health(
            addr(7),
            false,
            "3 consecutive failures: connect refused",
            t0,
        );
        let ts = tr.on_dns(&dns(&[]), PORT, t0);
        assert_eq!(
            ts,
            [t(
                addr(7),
                Some(State::Down),
                None,
                "gone from DNS (tasks.web) while down"
            )]
        );
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 removed: gone from DNS (tasks.web) while down"]
        );

        let ts = tr.on_dns(&dns(&[7]), PORT, t0);
        assert_eq!(
            (ts[0].from, ts[0].to),
            (None, Some(State::Probing)),
            "{:?}",
            lines(&ts)
        );
        assert_eq!(
            tr.active_set(),
            [],
            "back from down: no traffic before rise passes"
        );
    }

    #[test]
    fn down_backend_staying_in_dns_stays_down() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[7]), PORT, t0);
        tr.on_health(
            addr(7),
            false,
            "3 consecutive failures: connect refused",
            t0,
        );
        assert_eq!(
            tr.on_dns(&dns(&[7, 8]), PORT, t0).len(),
            1,
            "only 10.0.1.8 is new"
        );
        assert_eq!(tr.state(addr(7)), Some(State::Down));
    }

    #[test]
    fn probing_backend_gone_from_dns_is_removed() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[7]), PORT, t0);
        let ts = tr.on_dns(&dns(&[]), PORT, t0);
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 removed: gone from DNS (tasks.web) before passing health checks"]
        );
        assert_eq!(ts[0].from, Some(State::Probing));
    }

    #[test]
    fn verdicts_for_unknown_backends_are_ignored() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        assert_eq!(tr.on_health(addr(7), true, "2 consecutive passes", t0), []);
        assert!(tr.is_empty(), "a verdict must not create a backend");
    }

    #[test]
    fn port_change_replaces_backends() {
        let t0 = Instant::now();
        let mut tr = tracker(false);
        tr.on_dns(&dns(&[7]), 80, t0);
        let ts = tr.on_dns(&dns(&[7]), 8080, t0);
        assert_eq!(
            lines(&ts),
            [
                "10.0.1.7:80 draining: gone from DNS (tasks.web), existing flows may finish for 30s",
                "10.0.1.7:8080 active: new in DNS (tasks.web), health checks off",
            ]
        );
    }

    #[test]
    fn events_record_results_and_apply_only_verdict_changes() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[7]), PORT, t0);
        let failed = HealthEvent {
            target: addr(7),
            healthy: false,
            transition: None,
            result: CheckResult {
                ok: false,
                latency: Duration::from_millis(1),
                detail: "connect refused".to_owned(),
                failure: Some(FailureKind::Refused),
            },
            reason: "failure 1 of 3 before marking down: connect refused".to_owned(),
        };
        assert_eq!(tr.on_event(&failed, t0), [], "one failure must not decide");
        assert_eq!(tr.state(addr(7)), Some(State::Probing));
        let last = tr
            .get(addr(7))
            .and_then(|i| i.last_check.clone())
            .expect("recorded");
        assert_eq!(
            (last.ok, last.detail.as_str(), last.at),
            (false, "connect refused", t0)
        );

        let passed = HealthEvent {
            healthy: true,
            transition: Some(true),
            result: CheckResult {
                ok: true,
                latency: Duration::from_micros(300),
                detail: "TCP connect in 0.3 ms".to_owned(),
                failure: None,
            },
            reason: "2 consecutive passes: TCP connect in 0.3 ms".to_owned(),
            ..failed
        };
        let ts = tr.on_event(&passed, t0);
        assert_eq!(
            lines(&ts),
            ["10.0.1.7:80 active: 2 consecutive passes: TCP connect in 0.3 ms"]
        );
        let last = tr
            .get(addr(7))
            .and_then(|i| i.last_check.clone())
            .expect("recorded");
        assert_eq!(last.latency, Duration::from_micros(300));
    }

    #[test]
    fn active_set_holds_only_active_backends_in_order() {
        let t0 = Instant::now();
        let mut tr = tracker(true);
        tr.on_dns(&dns(&[9, 3, 5, 7]), PORT, t0);
        for last in [9, 3, 7] {
            tr.on_health(addr(last), true, "2 consecutive passes", t0);
        }
        tr.on_health(
            addr(7),
            false,
            "3 consecutive failures: connect refused",
            t0,
        );
        tr.on_dns(&dns(&[3, 5, 7]), PORT, t0);
        assert_eq!(tr.active_set(), [addr(3)]);
        let states: Vec<(SocketAddr, State)> = tr.backends().map(|i| (i.addr, i.state)).collect();
        assert_eq!(
            states,
            [
                (addr(3), State::Active),
                (addr(5), State::Probing),
                (addr(7), State::Down),
                (addr(9), State::Draining),
            ]
        );
    }

    #[test]
    fn data_plane_states_match_lb_common() {
        assert_eq!(data_plane_state(State::Active), BACKEND_ACTIVE);
        assert_eq!(data_plane_state(State::Draining), BACKEND_DRAINING);
        assert_eq!(data_plane_state(State::Down), BACKEND_DOWN);
        assert_eq!(data_plane_state(State::Probing), BACKEND_DOWN);
        for s in [State::Probing, State::Active, State::Draining, State::Down] {
            assert_ne!(
                data_plane_state(s),
                BACKEND_EMPTY,
                "{s} must not look like a free slot"
            );
        }
    }
}
