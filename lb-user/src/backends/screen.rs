//! Which addresses from a DNS answer may become backends.
//!
//! A `tasks.<service>` answer is input from the network, and a poisoned or
//! misconfigured one must not take the service down. Only unicast addresses
//! of the service's family that belong to some other host can serve its
//! flows: the data plane rewrites the destination to the backend address
//! and sends the packet out through a FIB lookup, so a loopback, broadcast
//! or own address would send client traffic into the balancer host itself
//! (seen: a poisoned answer with 127.0.0.1 next to a local listener passed
//! its checks and took flows that the host stack then reset).
//!
//! [`screen`] is pure: the daemon gathers the host's addresses
//! ([`HostAddrs::read`]) and logs each rejection once.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::config::{Family, HostAddrs};

/// Why an address from a DNS answer is not a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    /// An IPv6 address for an IPv4 service or the other way round.
    WrongFamily,
    /// `0.0.0.0/8` or `::`.
    Unspecified,
    /// `127.0.0.0/8` or `::1`.
    Loopback,
    /// `224.0.0.0/4` or `ff00::/8`.
    Multicast,
    /// `255.255.255.255`, or the broadcast address of a subnet of this host.
    Broadcast,
    /// `240.0.0.0/4` (reserved, never assigned to a host).
    Reserved,
    /// `169.254.0.0/16` or `fe80::/10` (only valid on one link, and the cloud
    /// metadata address lives there).
    LinkLocal,
    /// `::ffff:0:0/96` (an IPv4 address in IPv6 clothing) or the deprecated
    /// IPv4-compatible `::a.b.c.d`.
    Ipv4Mapped,
    /// One of this host's own addresses.
    HostAddress,
    /// The address clients connect to (the service's VIP).
    ServiceAddress,
    /// A valid address beyond the per-service backend cap.
    OverCap,
}

impl Rejection {
    /// The reason as `xdplb backends` and the logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::WrongFamily => "wrong address family for this service",
            Rejection::Unspecified => "unspecified address",
            Rejection::Loopback => "loopback address",
            Rejection::Multicast => "multicast address",
            Rejection::Broadcast => "broadcast address",
            Rejection::Reserved => "reserved address (240.0.0.0/4)",
            Rejection::LinkLocal => "link-local address",
            Rejection::Ipv4Mapped => "IPv4-mapped IPv6 address",
            Rejection::HostAddress => "an address of this host",
            Rejection::ServiceAddress => "the service's own listen address",
            Rejection::OverCap => "over the service's max_backends",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a service accepts.
#[derive(Clone, Debug)]
pub struct Policy<'a> {
    pub family: Family,
    /// The listen address; a wildcard (`0.0.0.0`, `::`) rejects nothing
    /// beyond the host's own addresses.
    pub vip: IpAddr,
    pub host: &'a HostAddrs,
    /// At most this many backends; the rest are left out.
    pub cap: usize,
}

/// The outcome for one answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Screened {
    pub accepted: BTreeSet<IpAddr>,
    pub rejected: BTreeMap<IpAddr, Rejection>,
}

/// Why `ip` cannot be a backend of a service of `family`, or `None`.
pub fn classify(ip: IpAddr, family: Family) -> Option<Rejection> {
    match (ip, family) {
        (IpAddr::V4(v4), Family::V4) => classify_v4(v4),
        (IpAddr::V6(v6), Family::V6) => classify_v6(v6),
        _ => Some(Rejection::WrongFamily),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Rejection> {
    let first = ip.octets()[0];
    if first == 0 {
        Some(Rejection::Unspecified)
    } else if ip.is_loopback() {
        Some(Rejection::Loopback)
    } else if ip.is_multicast() {
        Some(Rejection::Multicast)
    } else if ip.is_broadcast() {
        Some(Rejection::Broadcast)
    } else if first >= 240 {
        Some(Rejection::Reserved)
    } else if ip.is_link_local() {
        Some(Rejection::LinkLocal)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Rejection> {
    let s = ip.segments();
    if ip.is_unspecified() {
        Some(Rejection::Unspecified)
    } else if ip.is_loopback() {
        Some(Rejection::Loopback)
    } else if ip.is_multicast() {
        Some(Rejection::Multicast)
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some(Rejection::LinkLocal)
    } else if ip.to_ipv4_mapped().is_some() || s[..6] == [0; 6] {
        // `::a.b.c.d` (deprecated IPv4-compatible); `::` and `::1` are
        // caught above.
        Some(Rejection::Ipv4Mapped)
    } else {
        None
    }
}

/// Splits one DNS answer into backends and rejections. Over `cap`, the
/// addresses in `current` (already backends) are kept first, then the
/// lowest, so a growing answer never reshuffles who serves.
pub fn screen(answer: &BTreeSet<IpAddr>, current: &BTreeSet<IpAddr>, p: &Policy) -> Screened {
    let mut out = Screened::default();
    let mut valid = Vec::new();
    for &ip in answer {
        let why = classify(ip, p.family).or_else(|| {
            if ip == p.vip {
                Some(Rejection::ServiceAddress)
            } else if p.host.contains(ip) {
                Some(Rejection::HostAddress)
            } else if p.host.broadcasts.contains(&ip) {
                Some(Rejection::Broadcast)
            } else {
                None
            }
        });
        match why {
            Some(r) => {
                out.rejected.insert(ip, r);
            }
            None => valid.push(ip),
        }
    }
    // Stable: known first, each group in address order.
    valid.sort_by_key(|ip| !current.contains(ip));
    for (i, ip) in valid.into_iter().enumerate() {
        if i < p.cap {
            out.accepted.insert(ip);
        } else {
            out.rejected.insert(ip, Rejection::OverCap);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn host() -> HostAddrs {
        HostAddrs {
            addrs: ["10.20.0.1", "10.10.0.1", "fd00:20::1"]
                .into_iter()
                .map(ip)
                .collect(),
            broadcasts: [ip("10.20.0.255")].into(),
        }
    }

    fn policy<'a>(family: Family, vip: &str, host: &'a HostAddrs, cap: usize) -> Policy<'a> {
        Policy {
            family,
            vip: ip(vip),
            host,
            cap,
        }
    }

    fn one(addr: &str, family: Family, vip: &str) -> Option<Rejection> {
        let h = host();
        let p = policy(family, vip, &h, 100);
        let s = screen(&[ip(addr)].into(), &BTreeSet::new(), &p);
        assert_eq!(
            s.accepted.len() + s.rejected.len(),
            1,
            "{addr}: every address is either accepted or rejected: {s:?}"
        );
        s.rejected.get(&ip(addr)).copied()
    }

    #[test]
    fn ipv4_classes() {
        use Rejection::*;
        let v4 = |a| one(a, Family::V4, "0.0.0.0");
        assert_eq!(v4("10.20.0.5"), None, "an ordinary task address");
        assert_eq!(v4("192.0.2.7"), None);
        assert_eq!(v4("0.0.0.0"), Some(Unspecified));
        assert_eq!(v4("0.1.2.3"), Some(Unspecified));
        assert_eq!(v4("127.0.0.1"), Some(Loopback));
        assert_eq!(v4("127.255.0.9"), Some(Loopback));
        assert_eq!(v4("224.0.0.1"), Some(Multicast));
        assert_eq!(v4("239.1.1.1"), Some(Multicast));
        assert_eq!(v4("255.255.255.255"), Some(Broadcast));
        assert_eq!(
            v4("10.20.0.255"),
            Some(Broadcast),
            "a local subnet's broadcast"
        );
        assert_eq!(v4("240.0.0.1"), Some(Reserved));
        assert_eq!(v4("169.254.169.254"), Some(LinkLocal));
        assert_eq!(v4("10.20.0.1"), Some(HostAddress));
        assert_eq!(v4("10.10.0.1"), Some(HostAddress));
        assert_eq!(v4("fd00:20::5"), Some(WrongFamily));
        assert_eq!(
            one("10.10.0.100", Family::V4, "10.10.0.100"),
            Some(ServiceAddress)
        );
    }

    #[test]
    fn ipv6_classes() {
        use Rejection::*;
        let v6 = |a| one(a, Family::V6, "::");
        assert_eq!(v6("fd00:20::5"), None, "an ordinary task address");
        assert_eq!(v6("2001:db8::7"), None);
        assert_eq!(v6("::"), Some(Unspecified));
        assert_eq!(v6("::1"), Some(Loopback));
        assert_eq!(v6("ff02::1"), Some(Multicast));
        assert_eq!(v6("fe80::1"), Some(LinkLocal));
        assert_eq!(v6("febf::1"), Some(LinkLocal));
        assert_eq!(v6("::ffff:10.20.0.5"), Some(Ipv4Mapped));
        assert_eq!(v6("::10.20.0.5"), Some(Ipv4Mapped));
        assert_eq!(v6("fd00:20::1"), Some(HostAddress));
        assert_eq!(v6("10.20.0.5"), Some(WrongFamily));
        assert_eq!(
            one("fd00:10::100", Family::V6, "fd00:10::100"),
            Some(ServiceAddress)
        );
    }

    #[test]
    fn the_poisoned_answer_keeps_only_the_tasks() {
        let h = host();
        let answer: BTreeSet<IpAddr> = [
            "10.20.0.2",
            "10.20.0.3",
            "10.20.0.4",
            "0.0.0.0",
            "127.0.0.1",
            "10.20.0.1",
            "10.10.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.169.254",
        ]
        .into_iter()
        .map(ip)
        .collect();
        let s = screen(
            &answer,
            &BTreeSet::new(),
            &policy(Family::V4, "0.0.0.0", &h, 655),
        );
        let want: BTreeSet<IpAddr> = ["10.20.0.2", "10.20.0.3", "10.20.0.4"]
            .into_iter()
            .map(ip)
            .collect();
        assert_eq!(s.accepted, want);
        assert_eq!(s.rejected.len(), 7, "{:?}", s.rejected);
    }

    #[test]
    fn the_cap_keeps_current_backends_first_then_the_lowest() {
        let h = host();
        let answer: BTreeSet<IpAddr> = (2..=9).map(|i| ip(&format!("10.20.0.{i}"))).collect();
        let current: BTreeSet<IpAddr> = [ip("10.20.0.8"), ip("10.20.0.9")].into();
        let s = screen(&answer, &current, &policy(Family::V4, "0.0.0.0", &h, 4));
        let want: BTreeSet<IpAddr> = ["10.20.0.2", "10.20.0.3", "10.20.0.8", "10.20.0.9"]
            .into_iter()
            .map(ip)
            .collect();
        assert_eq!(s.accepted, want);
        assert_eq!(s.rejected.len(), 4);
        assert!(s.rejected.values().all(|r| *r == Rejection::OverCap));
    }

    #[test]
    fn host_addresses_are_read() {
        // Every namespace has loopback up in the test environments; an empty
        // read would make the own-address rule silently useless.
        let h = HostAddrs::read().expect("getifaddrs");
        assert!(
            h.addrs.iter().any(|a| a.is_loopback()),
            "expected 127.0.0.1 or ::1 among {:?}",
            h.addrs
        );
    }
}
