//! What the host looks like, for the checks that depend on it: its
//! interfaces and addresses, and the kernel's ephemeral ports. The only
//! part of `config` that reads the system.

use super::*;

/// What the host looks like, for the checks that depend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Names of the network interfaces in the daemon's network namespace.
    pub interfaces: Vec<String>,
    /// `net.ipv4.ip_local_port_range`, inclusive: the ports the kernel picks
    /// for the host's own outgoing connections (health checks among them).
    /// Linux uses this range for IPv6 too.
    pub local_port_range: (u16, u16),
    /// Every address of the namespace's interfaces: a configured
    /// `snat_addr` must be one of them.
    pub addresses: Vec<IpAddr>,
}

/// This host's addresses: every interface address, and the broadcast
/// address of every IPv4 subnet (a directed broadcast is no backend either).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddrs {
    pub addrs: BTreeSet<IpAddr>,
    pub broadcasts: BTreeSet<IpAddr>,
}

impl HostAddrs {
    /// Reads the addresses of every interface in this network namespace.
    pub fn read() -> std::io::Result<Self> {
        let mut out = Self::default();
        for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
            if let Some(ip) = ifa.address.as_ref().and_then(sockaddr_ip) {
                out.addrs.insert(ip);
            }
            if let Some(ip) = ifa.broadcast.as_ref().and_then(sockaddr_ip) {
                out.broadcasts.insert(ip);
            }
        }
        Ok(out)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.addrs.contains(&ip)
    }
}

pub(super) fn sockaddr_ip(a: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

impl HostFacts {
    /// Reads the interface names from `/sys/class/net` and the ephemeral port
    /// range from `/proc/sys/net/ipv4/ip_local_port_range`. Both are per
    /// network namespace, so run it in the namespace the daemon serves.
    pub fn read() -> anyhow::Result<Self> {
        const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
        // if_nameindex(3) asks the kernel through a socket, so it lists the
        // interfaces of this process's network namespace even when /sys was
        // mounted for another one (nsenter, a container's view of sysfs).
        let mut interfaces = interface_names().context("listing network interfaces")?;
        interfaces.sort();
        let text = std::fs::read_to_string(RANGE).with_context(|| format!("reading {RANGE}"))?;
        let local_port_range = parse_local_port_range(&text)
            .with_context(|| format!("{RANGE} holds {text:?}, not two port numbers"))?;
        let addresses = HostAddrs::read()
            .context("listing the host's addresses")?
            .addrs
            .into_iter()
            .collect();
        Ok(Self {
            interfaces,
            local_port_range,
            addresses,
        })
    }
}

/// Names of this network namespace's interfaces.
pub(super) fn interface_names() -> std::io::Result<Vec<String>> {
    let list = nix::net::if_::if_nameindex()?;
    Ok(list
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect())
}

/// Parses the contents of `ip_local_port_range` ("32768\t60999\n").
pub(super) fn parse_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) => Some((lo, hi)),
        _ => None,
    }
}
