//! Interfaces come and go: a reconnect, a bond rebuilt, a container's veth
//! re-plumbed. Deleting an interface takes our program with it (the kernel
//! severs the XDP and tcx links: `dev_xdp_uninstall` and `tcx_uninstall`
//! run on unregister), and an interface re-created under the same name is a
//! new device, with a new ifindex and no program. This module follows the
//! kernel's link events (netlink, `RTMGRP_LINK`), re-attaches the configured
//! hook when a configured interface comes back, and keeps each interface's
//! state for the status file (`xdplb stats`).
//!
//! Netlink is lossy: when the socket's buffer overflows, the kernel drops
//! messages and the next read fails with ENOBUFS. So every interface is also
//! re-checked by name (`if_nametoindex`) right after subscribing (the start-up
//! race: a change between the attach and the subscription), after a loss,
//! and every [`POLL`].
//!
//! The watcher task only reads the socket; the daemon's main loop owns the
//! data plane and calls [`Interfaces::handle`] for each [`Event`].

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::sys::socket::{
    self, bind, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, watch},
    time::MissedTickBehavior,
};

use crate::{
    dataplane::{
        attach::{self, Hook},
        maps::DataPlane,
    },
    status::InterfaceStatus,
};

/// How often every interface is re-checked by name, in case link events
/// were lost.
pub const POLL: Duration = Duration::from_secs(2);

/// What the watcher tells the main loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A link appeared, changed (`RTM_NEWLINK`) or went away (`RTM_DELLINK`).
    Link {
        removed: bool,
        index: u32,
        name: Option<String>,
    },
    /// Re-check every configured interface by name.
    Check(Why),
}

/// Why an interface is being checked; it decides what the log says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// A link event named it (or its ifindex).
    Link,
    /// Just subscribed: whatever changed since the attach.
    Subscribed,
    /// Link events were lost (ENOBUFS).
    Lost,
    /// The periodic check.
    Poll,
}

impl Why {
    /// Appended to log lines about a change this check found.
    fn note(self) -> &'static str {
        match self {
            Why::Link => "",
            Why::Subscribed => " (it changed while the daemon was starting)",
            Why::Lost => " (found after link events were lost)",
            Why::Poll => " (found by the periodic check: no link event said so)",
        }
    }
}

/// Where one configured interface stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Attached,
    /// No interface of that name exists.
    Missing,
    /// It exists, and attaching failed.
    Error(String),
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Attached => "attached",
            State::Missing => "missing",
            State::Error(_) => "error",
        }
    }
}

/// What to do about one interface, given its state and the ifindex its name
/// has now. Pure, so the rules are unit-tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Nothing,
    /// The device went away.
    Gone,
    /// A device of that name exists without our program: attach.
    Attach,
}

fn decide(state: &State, ifindex: u32, now: Option<u32>, why: Why) -> Action {
    match (state, now) {
        (State::Missing, None) => Action::Nothing,
        (_, None) => Action::Gone,
        (State::Attached, Some(i)) if i == ifindex => Action::Nothing,
        // The same device that failed: retried at the poll's pace, not on
        // every event it causes.
        (State::Error(_), Some(i)) if i == ifindex && why != Why::Poll => Action::Nothing,
        (_, Some(_)) => Action::Attach,
    }
}

struct Iface {
    name: String,
    hook: Hook,
    /// The device our program is on; while missing or failing, the last one
    /// seen.
    ifindex: u32,
    state: State,
    since: Instant,
}

/// The configured interfaces and their attachment state.
#[derive(Default)]
pub struct Interfaces {
    list: Vec<Iface>,
}

impl Interfaces {
    /// Records that `hook` was attached to `name` (device `ifindex`) at start.
    pub fn attached(&mut self, name: &str, hook: Hook, ifindex: u32) {
        self.list.push(Iface {
            name: name.to_owned(),
            hook,
            ifindex,
            state: State::Attached,
            since: Instant::now(),
        });
    }

    /// For the status file.
    pub fn status(&self) -> Vec<InterfaceStatus> {
        self.list
            .iter()
            .map(|f| InterfaceStatus {
                name: f.name.clone(),
                ifindex: f.ifindex,
                hook: f.hook.to_string(),
                state: f.state.as_str().to_owned(),
                message: match &f.state {
                    State::Attached => None,
                    State::Missing => Some("removed; waiting for it to come back".into()),
                    State::Error(e) => Some(e.clone()),
                },
                since_unix_ms: crate::clock::instant_to_ms(f.since),
            })
            .collect()
    }

    /// Acts on one event; returns whether any interface changed state.
    pub fn handle(&mut self, ev: &Event, dp: &mut DataPlane) -> bool {
        let mut changed = false;
        for i in 0..self.list.len() {
            let f = &self.list[i];
            let why = match ev {
                Event::Link { index, name, .. } => {
                    if name.as_deref() != Some(f.name.as_str()) && *index != f.ifindex {
                        continue;
                    }
                    Why::Link
                }
                Event::Check(why) => *why,
            };
            changed |= self.check(i, why, dp);
        }
        changed
    }

    fn check(&mut self, i: usize, why: Why, dp: &mut DataPlane) -> bool {
        let f = &self.list[i];
        let now = index_of(&f.name);
        match decide(&f.state, f.ifindex, now, why) {
            Action::Nothing => false,
            Action::Gone => {
                tracing::warn!(
                    "{} removed: its program went with it; waiting for it to come back{}",
                    f.name,
                    why.note()
                );
                self.forget_device(i, dp);
                let f = &mut self.list[i];
                f.state = State::Missing;
                f.since = Instant::now();
                true
            }
            Action::Attach => {
                let now = now.unwrap_or_default();
                if f.state == State::Attached {
                    // Deleted and re-created between two looks.
                    tracing::warn!(
                        "{} was re-created (ifindex {} -> {now}): its program went with the old \
                         device{}",
                        f.name,
                        f.ifindex,
                        why.note()
                    );
                    self.forget_device(i, dp);
                }
                self.reattach(i, now, why, dp)
            }
        }
    }

    /// The old device is gone: its pinned links are severed (the kernel
    /// detached them with the device), and in XDP mode TX_PORTS may still
    /// name its ifindex.
    fn forget_device(&self, i: usize, dp: &mut DataPlane) {
        let f = &self.list[i];
        if let Err(e) = attach::unpin_links(dp.pin_dir(), &f.name) {
            tracing::warn!("{}: removing its severed link pins: {e:#}", f.name);
        }
        if f.hook == Hook::Xdp {
            // The kernel drops an unregistered device from a DEVMAP_HASH
            // itself (`dev_map_hash_remove_netdev`, kernel/bpf/devmap.c,
            // since 5.4); this covers a device that was only renamed away.
            if let Err(e) = dp.remove_tx_port(f.ifindex) {
                tracing::debug!("{}: {e:#}", f.name);
            }
        }
    }

    fn reattach(&mut self, i: usize, now: u32, why: Why, dp: &mut DataPlane) -> bool {
        let t = Instant::now();
        let f = &mut self.list[i];
        let before = match f.state {
            State::Missing => format!(
                ", was {}, missing for {:.2} s",
                f.ifindex,
                f.since.elapsed().as_secs_f64()
            ),
            _ if f.ifindex != now => format!(", was {}", f.ifindex),
            _ => String::new(),
        };
        match attach::attach(dp, &f.name, f.hook) {
            Ok((index, log)) => {
                for line in log {
                    tracing::debug!("{line}");
                }
                let took = t.elapsed().as_secs_f64() * 1e3;
                tracing::info!(
                    "{} is back (ifindex {index}{before}): {} program re-attached in {took:.1} ms{}",
                    f.name,
                    f.hook,
                    why.note()
                );
                if f.hook == Hook::Xdp {
                    tracing::info!(
                        "{}: TX_PORTS holds ifindex {index} now (the redirect map, refreshed in \
                         the same {took:.1} ms)",
                        f.name
                    );
                }
                f.ifindex = index;
                f.state = State::Attached;
                f.since = Instant::now();
                true
            }
            Err(e) => {
                let msg = format!("{e:#}");
                f.ifindex = now;
                if f.state == State::Error(msg.clone()) {
                    return false;
                }
                tracing::warn!(
                    "{}: re-attaching the {} program to ifindex {now} failed: {msg}; retrying \
                     every {} s",
                    f.name,
                    f.hook,
                    POLL.as_secs()
                );
                f.state = State::Error(msg);
                f.since = Instant::now();
                true
            }
        }
    }
}

/// The ifindex of `name` in this network namespace, if it exists.
fn index_of(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

// ---- the watcher task ---------------------------------------------------------

/// Follows link events and sends them to the main loop, with a
/// [`Why::Subscribed`] check once subscribed and a [`Why::Poll`] check every
/// [`POLL`], until `stop` changes.
pub async fn watch(tx: mpsc::Sender<Event>, mut stop: watch::Receiver<bool>) {
    let mut sock = match LinkSocket::open() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "cannot follow link events (netlink: {e}); checking the interfaces every {} s \
                 instead",
                POLL.as_secs()
            );
            None
        }
    };
    if tx.send(Event::Check(Why::Subscribed)).await.is_err() {
        return;
    }
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + POLL, POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let events = tokio::select! {
            // Queued link events before the poll, so the poll does not claim
            // a change an event was about to report.
            biased;
            _ = stop.changed() => return,
            r = recv(sock.as_ref(), &mut buf) => match r {
                Ok(n) => parse(&buf[..n]),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!(
                        "link events were lost (ENOBUFS: the netlink socket's buffer \
                         overflowed); checking every interface by name"
                    );
                    vec![Event::Check(Why::Lost)]
                }
                Err(e) => {
                    tracing::warn!(
                        "reading link events failed ({e}); checking the interfaces every {} s \
                         only",
                        POLL.as_secs()
                    );
                    sock = None;
                    Vec::new()
                }
            },
            _ = poll.tick() => vec![Event::Check(Why::Poll)],
        };
        for ev in events {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

async fn recv(sock: Option<&LinkSocket>, buf: &mut [u8]) -> io::Result<usize> {
    match sock {
        Some(s) => s.recv(buf).await,
        None => std::future::pending().await,
    }
}

/// A netlink route socket subscribed to `RTMGRP_LINK`.
struct LinkSocket(AsyncFd<OwnedFd>);

impl LinkSocket {
    fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, libc::RTMGRP_LINK as u32),
        )?;
        // SAFETY: the OwnedFd stays open, the same descriptor, for as long
        // as the AsyncFd that owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Self(fd))
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            let r = ready.try_io(|fd| Ok(socket::recv(fd.as_raw_fd(), buf, MsgFlags::empty())?));
            if let Ok(r) = r {
                return r;
            }
        }
    }
}

// ---- netlink messages (include/uapi/linux/netlink.h, rtnetlink.h) --------------

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTA_HDRLEN: usize = 4;
/// `NLA_TYPE_MASK`: without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The link events in one datagram. A message cut short (a datagram larger
/// than the buffer) or an `NLMSG_OVERRUN` means events were lost: a
/// [`Why::Lost`] check.
fn parse(buf: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let (Some(len), Some(kind)) = (u32_at(buf, at), u16_at(buf, at + 4)) else {
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            out.push(Event::Check(Why::Lost));
            break;
        }
        let msg = &buf[at + NLMSG_HDRLEN..at + len];
        match kind {
            libc::RTM_NEWLINK | libc::RTM_DELLINK => {
                if let Some(ev) = link(msg, kind == libc::RTM_DELLINK) {
                    out.push(ev);
                }
            }
            k if k == libc::NLMSG_OVERRUN as u16 => out.push(Event::Check(Why::Lost)),
            _ => {}
        }
        at += align4(len);
    }
    out
}

/// One `ifinfomsg` and its attributes: the index and `IFLA_IFNAME`.
fn link(msg: &[u8], removed: bool) -> Option<Event> {
    // struct ifinfomsg { u8 family, pad; u16 type; i32 index; u32 flags, change; }
    let index = u32_at(msg, 4)?;
    let mut name = None;
    let mut at = IFINFOMSG_LEN;
    while at + RTA_HDRLEN <= msg.len() {
        let len = u16_at(msg, at)? as usize;
        let kind = u16_at(msg, at + 2)? & NLA_TYPE_MASK;
        if len < RTA_HDRLEN || at + len > msg.len() {
            break;
        }
        if kind == libc::IFLA_IFNAME {
            let v = &msg[at + RTA_HDRLEN..at + len];
            let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
            name = Some(String::from_utf8_lossy(&v[..end]).into_owned());
        }
        at += align4(len);
    }
    Some(Event::Link {
        removed,
        index,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link message as the kernel sends it: header, ifinfomsg, IFLA_MTU,
    /// IFLA_IFNAME.
    fn message(kind: u16, index: u32, name: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&8u16.to_ne_bytes());
        attrs.extend_from_slice(&libc::IFLA_MTU.to_ne_bytes());
        attrs.extend_from_slice(&1500u32.to_ne_bytes());
        let nlen = RTA_HDRLEN + name.len() + 1;
        attrs.extend_from_slice(&(nlen as u16).to_ne_bytes());
        attrs.extend_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
        attrs.extend_from_slice(name.as_bytes());
        attrs.push(0);
        attrs.resize(align4(attrs.len()), 0);
        let mut ifi = vec![0u8; IFINFOMSG_LEN];
        ifi[4..8].copy_from_slice(&index.to_ne_bytes());
        let len = NLMSG_HDRLEN + ifi.len() + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend(ifi);
        m.extend(attrs);
        m
    }

    fn ev(removed: bool, index: u32, name: &str) -> Event {
        Event::Link {
            removed,
            index,
            name: Some(name.into()),
        }
    }

    #[test]
    fn link_messages_parse() {
        let mut buf = message(libc::RTM_DELLINK, 5, "eth1");
        buf.extend(message(libc::RTM_NEWLINK, 9, "eth1.100"));
        assert_eq!(
            parse(&buf),
            vec![ev(true, 5, "eth1"), ev(false, 9, "eth1.100")]
        );
    }

    #[test]
    fn a_cut_message_means_lost_events() {
        let mut buf = message(libc::RTM_NEWLINK, 3, "eth0");
        let whole = buf.len();
        buf.extend(message(libc::RTM_NEWLINK, 4, "eth1"));
        buf.truncate(whole + 20);
        assert_eq!(
            parse(&buf),
            vec![ev(false, 3, "eth0"), Event::Check(Why::Lost)]
        );
    }

    #[test]
    fn other_messages_are_ignored() {
        let mut m = message(libc::RTM_NEWLINK, 3, "eth0");
        m[4..6].copy_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
        assert_eq!(parse(&m), vec![]);
    }

    #[test]
    fn decisions() {
        use Action::*;
        let err = State::Error("x".into());
        for (state, now, why, want) in [
            (State::Attached, Some(5), Why::Link, Nothing),
            (State::Attached, None, Why::Link, Gone),
            (State::Attached, Some(7), Why::Poll, Attach),
            (State::Missing, None, Why::Poll, Nothing),
            (State::Missing, Some(7), Why::Link, Attach),
            (err.clone(), Some(5), Why::Link, Nothing),
            (err.clone(), Some(5), Why::Poll, Attach),
            (err.clone(), Some(8), Why::Link, Attach),
            (err, None, Why::Link, Gone),
        ] {
            assert_eq!(
                decide(&state, 5, now, why),
                want,
                "{state:?}, ifindex 5 before, {now:?} now, {why:?}"
            );
        }
    }
}
