//! Docker's embedded DNS in the testbed: testkit's [`FakeDns`] on UDP and
//! TCP `127.0.0.11:53` inside the balancer's namespace (what it answers:
//! `testkit::dns`).

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context as _, Result};
pub use testkit::dns::{DnsMode, DnsStats, FakeDns as Dns};
use testkit::netns::NetNs;
use tokio::runtime::Handle;

/// Where Docker's embedded DNS listens inside every container.
pub const DNS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

/// Binds UDP and TCP `127.0.0.11:53` inside `ns` (whose `lo` must be up)
/// and serves them on `rt`.
pub(crate) fn start(ns: &NetNs, rt: &Handle) -> Result<Dns> {
    let (udp, tcp) = ns
        .run_in(|| {
            let udp = std::net::UdpSocket::bind(DNS_ADDR).context("binding UDP 127.0.0.11:53")?;
            let tcp = std::net::TcpListener::bind(DNS_ADDR).context("binding TCP 127.0.0.11:53")?;
            Ok((udp, tcp))
        })
        .with_context(|| format!("starting the DNS server in {}", ns.name()))?;
    let _rt = rt.enter();
    Dns::serve(udp, tcp).context("serving DNS on 127.0.0.11:53")
}
