//! The daemon's configuration: the typed model, the TOML file format, the
//! short form of the command line, and validation.
//!
//! # Two ways in
//!
//! - A TOML file (`xdplb run --config FILE`, [`Config::load`]). The commented
//!   reference is `docs/xdplb.example.toml`. Every table rejects unknown keys,
//!   and every error names the file and the line.
//! - The short form (`xdplb run --iface eth0 --listen 0.0.0.0:80 --backends
//!   tasks.web:80 ...`, [`Config::from_short_form`]) for one service. It
//!   produces exactly the [`Config`] of the equivalent file: both paths start
//!   from [`ServiceConfig::new`], which is where every default lives.
//!
//! # Validation
//!
//! Checks that need nothing but the configuration ([`Config::check_consistency`])
//! run while loading, so a [`Config`] that exists is self-consistent. Checks
//! against the host (do the interfaces exist, is the SNAT range clear of the
//! kernel's ephemeral ports) need a [`HostFacts`], which
//! [`HostFacts::read`] gathers; [`Config::validate`] itself does no I/O, so
//! both kinds are unit-tested without root.
//!
//! Settings that were written somewhere carry an [`Origin`] (file and line per
//! key) so errors found after parsing still point into the file.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use lb_common::{
    DEFAULT_CLOSING_TIMEOUT_NS, DEFAULT_CONNS_CAPACITY, DEFAULT_MAGLEV_SIZE,
    DEFAULT_TCP_TIMEOUT_NS, DEFAULT_UDP_TIMEOUT_NS, DEFAULT_UNANSWERED_CAPACITY,
    DEFAULT_UNANSWERED_TIMEOUT_NS, MAX_SERVICES, PROTO_TCP, PROTO_UDP,
};
use toml::Spanned;

use crate::dataplane::maglev::is_prime;

mod error;
mod file;
mod host;
mod validate;
mod values;

pub use error::*;
use file::*;
pub use host::*;
pub use validate::*;
pub use values::*;

// ---- defaults -----------------------------------------------------------------

/// Where maps and program links are pinned unless `pin_dir` says otherwise
/// (`/sys/fs/bpf/xdplb`).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdplb";
/// Docker's embedded DNS server, reachable inside every container that is
/// attached to a user-defined network.
pub const DEFAULT_NAMESERVER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53));
/// Delay between two lookups of a healthy, non-empty service. Docker
/// answers with a TTL of 600 s, far too slow to notice a task that went
/// away.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive NXDOMAIN/empty answers before a service counts as empty
/// (Docker briefly answers NXDOMAIN while a service is updated).
pub const DEFAULT_EMPTY_POLLS: u32 = 3;
/// Time between two health checks of one backend.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one health check may take before it counts as failed.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_millis(500);
/// Consecutive passed checks before a backend enters rotation.
pub const DEFAULT_RISE: u32 = 2;
/// Consecutive failed checks before a backend leaves rotation.
pub const DEFAULT_FALL: u32 = 3;
/// Status an HTTP check expects unless `expect_status` says otherwise.
pub const DEFAULT_EXPECT_STATUS: u16 = 200;
/// How long a backend that left DNS keeps its established flows.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default SNAT source ports, inclusive.
///
/// These are the source ports of the balancer's connections *to* backends,
/// so they must never be ports the host hands out to its own sockets (health
/// checks, the DNS client): Linux's default `net.ipv4.ip_local_port_range`
/// is 32768–60999, and this range lies below it. It also stays above the
/// ports services commonly listen on (< 10000), because a listener inside the
/// SNAT range is unreachable (see [`ConfigError::ListenInSnatRange`]). Ten
/// thousand ports allow 10 000 concurrent flows per backend.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (20000, 29999);
/// Shortest DNS poll or health-check interval accepted: anything faster
/// floods the resolver or the backends for no benefit.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Shortest connection-table timeout accepted.
pub const MIN_CONNTRACK_TIMEOUT: Duration = Duration::from_secs(1);
/// New flows per second (over all CPUs) above which the flood guard turns
/// on, unless `conntrack.flood_new_flows_per_second` says otherwise. Well
/// above what one balancer sees from real clients on these hosts; a guard
/// on by mistake costs little (docs/DATAPLANE.md, "Flood guard").
pub const DEFAULT_FLOOD_NEW_FLOWS_PER_SECOND: u32 = 20_000;
/// Backend slots the `BACKENDS` map has (index 0 means "no backend").
pub const MAX_BACKEND_SLOTS: u32 = lb_common::MAX_BACKENDS - 1;

// ---- the model ------------------------------------------------------------------

/// Everything the daemon needs to run one balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Interfaces the data plane is attached to (`interfaces = [...]`,
    /// `--iface`). Never empty. Traffic for the services arrives on them;
    /// replies from backends may arrive on any of them.
    pub interfaces: Vec<String>,
    /// How the data plane is attached (`attach`, `--attach`; default `auto`).
    pub attach: AttachMode,
    /// bpffs directory for pinned maps and links (`pin_dir`; default
    /// [`DEFAULT_PIN_DIR`]). Pins let the data plane keep forwarding while the
    /// daemon restarts.
    pub pin_dir: PathBuf,
    /// Connection-table size and timeouts (`[conntrack]`).
    pub conntrack: ConntrackConfig,
    /// The key of the flow hash that picks backends and SNAT ports
    /// (`flow_hash_secret`, 32 hex digits). Without it the daemon generates
    /// one on its first start and keeps it in the pinned `CONFIG` map for
    /// the next starts. Balancers that must make the same choices (Swarm
    /// global mode: one per node, behind the same addresses) need the same
    /// secret: set it in the configuration they share.
    pub flow_hash_secret: Option<HashSecret>,
    /// How many backend slots (entries of the `BACKENDS` map) the daemon
    /// hands out over all services (`backend_slots`; default and maximum
    /// [`MAX_BACKEND_SLOTS`]). A service whose tasks need more slots than are
    /// free keeps its last good table, and the error shows in `xdplb
    /// backends` and `/metrics` until slots free up.
    pub backend_slots: u32,
    /// The balanced services (`[[service]]`), at least one.
    pub services: Vec<ServiceConfig>,
    /// Where the top-level settings were written (errors only; never
    /// affects equality).
    pub origin: Origin,
}

/// How the data plane program is attached to the interfaces.
///
/// This is a property of the balancer, not of a service: one program is
/// attached to each interface and serves every service that arrives there, so
/// a per-service mode could not be honoured.
///
/// TOML: `attach = "auto" | "xdp" | "tc"`; command line: `--attach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AttachMode {
    /// Let the daemon choose per interface, and log which it chose: XDP on
    /// devices where XDP forwarding works, TC on veths whose peer is out of
    /// our control (the Swarm container case). The default.
    #[default]
    Auto,
    /// XDP (fastest on physical NICs; on a veth the peer needs NAPI/GRO).
    Xdp,
    /// TC clsact ingress, forwarding with `bpf_redirect_neigh` (works on any
    /// device, including veths inside containers).
    Tc,
}

/// The connection table (`[conntrack]` in TOML).
#[derive(Debug, Clone, PartialEq)]
pub struct ConntrackConfig {
    /// Entries in the LRU connection table (`capacity`; default
    /// [`DEFAULT_CONNS_CAPACITY`]). Every flow takes two entries (one per
    /// direction), so this holds `capacity / 2` flows before the least
    /// recently used ones are evicted.
    pub capacity: u32,
    /// Idle time after which an open TCP flow is forgotten (`tcp_timeout`;
    /// default 1 h).
    pub tcp_timeout: Duration,
    /// Idle time after which a TCP flow that saw FIN or RST is forgotten
    /// (`closing_timeout`; default 65 s: longer than the backends' 60 s
    /// TIME_WAIT, so a SNAT port is not reused while a backend still
    /// remembers the old connection).
    pub closing_timeout: Duration,
    /// Idle time after which a UDP flow is forgotten (`udp_timeout`; default
    /// 60 s).
    pub udp_timeout: Duration,
    /// Entries in the table of flows not established yet
    /// (`unanswered_capacity`; default [`DEFAULT_UNANSWERED_CAPACITY`]): an
    /// LRU of its own, so new flows, a flood's included, never evict an
    /// established one.
    pub unanswered_capacity: u32,
    /// Idle time after which a flow the backend has not accepted yet, or a
    /// TCP flow after a RST, is forgotten and its SNAT port freed
    /// (`unanswered_timeout`; default 5 s).
    pub unanswered_timeout: Duration,
    /// New flows per second above which the flood guard turns on
    /// (`flood_new_flows_per_second`; default
    /// [`DEFAULT_FLOOD_NEW_FLOWS_PER_SECOND`]; 0: never). Counted per CPU,
    /// each against its share of this figure.
    pub flood_new_flows_per_second: u32,
}

/// `flow_hash_secret`: the SipHash key of the flow hash. Its `Debug` does
/// not show it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashSecret(pub [u64; 2]);

impl fmt::Debug for HashSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashSecret(..)")
    }
}

impl fmt::Display for HashSecret {
    /// The 32 hex digits `flow_hash_secret` takes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

impl FromStr for HashSecret {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let s = s.trim();
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ValueError::new(
                "must be 32 hex digits (128 bits), e.g. from `openssl rand -hex 16`",
            ));
        }
        let word = |r: std::ops::Range<usize>| u64::from_str_radix(&s[r], 16).unwrap_or(0);
        let key = [word(0..16), word(16..32)];
        if key == [0, 0] {
            return Err(ValueError::new("must not be all zero"));
        }
        Ok(Self(key))
    }
}

impl HashSecret {
    /// 128 random bits from the kernel.
    pub fn generate() -> std::io::Result<Self> {
        let mut b = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Ok(Self([word(0), word(8) | 1]))
    }
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CONNS_CAPACITY,
            tcp_timeout: Duration::from_nanos(DEFAULT_TCP_TIMEOUT_NS),
            closing_timeout: Duration::from_nanos(DEFAULT_CLOSING_TIMEOUT_NS),
            udp_timeout: Duration::from_nanos(DEFAULT_UDP_TIMEOUT_NS),
            unanswered_capacity: DEFAULT_UNANSWERED_CAPACITY,
            unanswered_timeout: Duration::from_nanos(DEFAULT_UNANSWERED_TIMEOUT_NS),
            flood_new_flows_per_second: DEFAULT_FLOOD_NEW_FLOWS_PER_SECOND,
        }
    }
}

/// One balanced service: a listener and the DNS name whose addresses serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Unique name used in logs, statistics and metrics (`name`). Defaults to
    /// the backends' DNS name without Docker's `tasks.` prefix: `web` for
    /// `tasks.web`.
    pub name: String,
    /// Where clients connect (`listen`, `--listen`).
    pub listen: Listen,
    /// Where the backends are found (`backends`, `nameserver`, `interval`,
    /// `family`, `empty_polls`).
    pub backends: BackendsConfig,
    /// How backends are health-checked (`check`, `check_interval`,
    /// `check_timeout`, `check_port`, `rise`, `fall`, `expect_status`).
    pub check: CheckConfig,
    /// How long a backend that disappeared from DNS but still passes its
    /// checks keeps serving its established flows (`drain_timeout`; default
    /// 30 s). New flows never go to a draining backend. `0s` drops it at once.
    pub drain_timeout: Duration,
    /// Maglev lookup table size (`maglev_size`; default
    /// [`DEFAULT_MAGLEV_SIZE`]). Must be prime; keep it well above 100 times
    /// the largest expected number of backends for an even spread.
    pub maglev_size: u32,
    /// Source NAT towards the backends (`snat_ports`, `snat_addr`).
    pub snat: SnatConfig,
    /// At most this many tasks of the DNS answer become backends
    /// (`max_backends`); the others are left out and logged. `None`, the
    /// default: what the Maglev table serves well, `maglev_size / 100`
    /// (655 for the default size). See [`ServiceConfig::backend_cap`].
    pub max_backends: Option<u32>,
    /// Where this service was written (errors only; never affects equality).
    pub origin: Origin,
}

/// Where a service accepts connections: `ADDR:PORT[/tcp|/udp]`.
///
/// `0.0.0.0` and `[::]` are wildcards meaning "any local address" of that
/// family, like `bind *:80`; a specific address takes precedence over the
/// wildcard on the same port. Without a suffix the protocol is TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listen {
    /// The address clients connect to; unspecified means any local address.
    pub addr: IpAddr,
    /// The port clients connect to (never 0).
    pub port: u16,
    /// The transport protocol.
    pub proto: Proto,
}

/// Transport protocol of a listener (TCP unless the config says otherwise),
/// and of `xdplb explain --proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Proto {
    /// TCP: flows are established by the backend's answer.
    #[default]
    Tcp,
    /// UDP: flows are tracked by 5-tuple and expire after `udp_timeout`.
    Udp,
}

/// Address family: which DNS records are asked for (A or AAAA), and which
/// packets a service sees (`family = "ipv4"` or `"ipv6"`; see
/// [`parse_family`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4: A records.
    #[default]
    #[serde(alias = "ipv4")]
    V4,
    /// IPv6: AAAA records.
    #[serde(alias = "ipv6")]
    V6,
}

impl Family {
    /// Whether `ip` belongs to this family.
    pub fn matches(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }

    /// The family of an address.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// As the config file spells it (`family = "ipv4"`); `Display` is the
    /// human spelling, for logs (`IPv4`).
    pub fn config_name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The DNS record type asked for: `A` or `AAAA`.
    pub fn record_type(self) -> &'static str {
        match self {
            Family::V4 => "A",
            Family::V6 => "AAAA",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Where the backends of a service come from: a DNS name resolved over and
/// over (Swarm's `tasks.<service>` for an `--endpoint-mode dnsrr` service).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendsConfig {
    /// DNS name to resolve, e.g. `tasks.web` (`backends = "NAME:PORT"`).
    pub name: String,
    /// Port the backends serve on (never 0).
    pub port: u16,
    /// DNS server to ask (`nameserver`, `--nameserver`; default
    /// `127.0.0.11:53`, Docker's embedded DNS).
    pub nameserver: SocketAddr,
    /// Time between two queries (`interval`; default 1 s; at least 100 ms).
    pub interval: Duration,
    /// Which records to ask for (`family`). It always equals the listen
    /// address's family, because the data plane does not translate between
    /// IPv4 and IPv6; in a file it may be omitted and follows `listen`.
    pub family: Family,
    /// Consecutive NXDOMAIN or empty answers after which the service really
    /// has zero tasks (`empty_polls`; default 3). Until then the last good
    /// set is kept. Timeouts and SERVFAIL never empty the set.
    pub empty_polls: u32,
}

/// Health checking of the backends of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    /// What a check does (`check`, `--check`). Default: `tcp` for TCP
    /// services, `none` for UDP services (UDP has no handshake to probe).
    pub kind: CheckKind,
    /// Time between two checks of one backend (`check_interval`; default 1 s;
    /// at least 100 ms).
    pub interval: Duration,
    /// How long one check may take (`check_timeout`; default 500 ms; less than
    /// `interval`).
    pub timeout: Duration,
    /// Port to check (`check_port`); `None`, the default, checks the backend
    /// port. Set it for UDP services or a separate health endpoint.
    pub port: Option<u16>,
    /// Consecutive passes before a backend enters rotation (`rise`; default
    /// 2; at least 1).
    pub rise: u32,
    /// Consecutive failures before a backend leaves rotation (`fall`; default
    /// 3; at least 1).
    pub fall: u32,
}

/// What a health check does: `tcp`, `http:/PATH` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// No checks: a backend is in rotation as soon as DNS lists it.
    None,
    /// A TCP connect that completes counts as a pass.
    Tcp,
    /// `GET PATH` over HTTP/1.1; a response with `expect_status` passes.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// Expected status code (`expect_status`; default 200). The short
        /// form `http:/PATH` always means 200.
        expect_status: u16,
    },
}

/// Source NAT of the connections the balancer opens towards backends.
///
/// Full NAT makes replies come back through the balancer whatever the
/// backend's routing: the backend sees the balancer's address as the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatConfig {
    /// Source ports, inclusive (`snat_ports = "LO-HI"`; default
    /// [`DEFAULT_SNAT_PORTS`]). They must lie outside the host's
    /// `net.ipv4.ip_local_port_range`, and no service may listen inside them.
    /// Services may share ranges: a port is reserved per (backend address,
    /// backend port, SNAT address, SNAT port, protocol), so two services'
    /// flows can never be confused.
    pub ports: (u16, u16),
    /// Source address (`snat_addr`). `None`, the default: the address of the
    /// interface that routes to the backends, found at runtime.
    pub addr: Option<IpAddr>,
}

impl Default for SnatConfig {
    fn default() -> Self {
        Self {
            ports: DEFAULT_SNAT_PORTS,
            addr: None,
        }
    }
}

/// The short form of `xdplb run`: one service, everything else default.
///
/// ```text
/// xdplb run --iface IFACE [--iface IFACE2] --listen ADDR:PORT[/tcp|/udp]
///           --backends NAME:PORT [--nameserver ADDR:PORT]
///           [--check tcp|http:/PATH|none] [--attach auto|xdp|tc]
/// ```
///
/// Each field is filled by one flag through the type's `FromStr`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShortForm {
    /// `--iface`, repeatable.
    pub interfaces: Vec<String>,
    /// `--listen`.
    pub listen: Listen,
    /// `--backends NAME:PORT`. Its other fields are used as given (the
    /// `FromStr` impl fills in the defaults), except `family`, which always
    /// follows `listen`, and `nameserver` when `--nameserver` is given.
    pub backends: BackendsConfig,
    /// `--nameserver`; `None` keeps the backends' nameserver (default
    /// `127.0.0.11:53`).
    pub nameserver: Option<SocketAddr>,
    /// `--check`; `None` means the protocol's default (see [`CheckConfig`]).
    pub check: Option<CheckKind>,
    /// `--attach`; `None` means `auto`.
    pub attach: Option<AttachMode>,
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const FILE: &str = "test.toml";

    /// A valid file with one service, for tests that append or replace lines.
    const MINIMAL: &str = r#"interfaces = ["eth0", "eth1"]
[[service]]
listen = "0.0.0.0:80"
backends = "tasks.web:80"
"#;

    #[expect(clippy::result_large_err, reason = "the error is the value under test")]
    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, FILE)
    }

    fn parse_ok(text: &str) -> Config {
        parse(text).unwrap_or_else(|e| panic!("expected {text:?} to parse, got: {e}"))
    }

    /// Parses `text`, expects an error at `line`, and returns it.
    fn parse_err(text: &str, line: usize) -> ConfigError {
        match parse(text) {
            Ok(cfg) => panic!("expected an error at line {line}, parsed: {cfg:#?}"),
            Err(e) => {
                assert_located(&e, line);
                e
            }
        }
    }

    /// The message starts with `test.toml:LINE:`.
    fn assert_located(e: &ConfigError, line: usize) {
        let msg = e.to_string();
        let want = format!("{FILE}:{line}:");
        assert!(
            msg.starts_with(&want),
            "expected the message to start with {want:?}: {msg}"
        );
    }

    fn facts() -> HostFacts {
        HostFacts {
            interfaces: vec!["eth0".into(), "eth1".into(), "lo".into()],
            local_port_range: (32768, 60999),
            addresses: vec!["127.0.0.1".parse().unwrap(), "10.0.1.2".parse().unwrap()],
        }
    }

    fn listen(s: &str) -> Listen {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    // ---- defaults and the file format ----

    #[test]
    fn minimal_file_gets_every_default() {
        let cfg = parse_ok(MINIMAL);
        assert_eq!(cfg.interfaces, ["eth0", "eth1"]);
        assert_eq!(cfg.attach, AttachMode::Auto);
        assert_eq!(cfg.pin_dir, Path::new("/sys/fs/bpf/xdplb"));
        assert_eq!(
            cfg.conntrack,
            ConntrackConfig {
                capacity: 262_144,
                tcp_timeout: Duration::from_secs(3600),
                closing_timeout: Duration::from_secs(65),
                udp_timeout: Duration::from_secs(60),
                unanswered_capacity: 131_072,
                unanswered_timeout: Duration::from_secs(5),
                flood_new_flows_per_second: 20_000,
            }
        );
        let s = &cfg.services[..];
        assert_eq!(s.len(), 1, "{s:#?}");
        let want = ServiceConfig {
            name: "web".into(),
            listen: Listen {
                addr: Ipv4Addr::UNSPECIFIED.into(),
                port: 80,
                proto: Proto::Tcp,
            },
            backends: BackendsConfig {
                name: "tasks.web".into(),
                port: 80,
                nameserver: "127.0.0.11:53".parse().unwrap(),
                interval: Duration::from_secs(1),
                family: Family::V4,
                empty_polls: 3,
            },
            check: CheckConfig {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                port: None,
                rise: 2,
                fall: 3,
            },
            drain_timeout: Duration::from_secs(30),
            maglev_size: 65537,
            snat: SnatConfig {
                ports: (20000, 29999),
                addr: None,
            },
            max_backends: None,
            origin: Origin::default(),
        };
        assert_eq!(s[0], want);
        cfg.validate(&facts())
            .expect("the minimal file is valid on a host with eth0/eth1");
    }

    #[test]
    fn udp_service_defaults_to_no_check_and_ipv6_listen_to_aaaa() {
        let cfg = parse_ok(
            r#"interfaces = ["eth0"]
[[service]]
listen = "[::]:53/udp"
backends = "tasks.dns:53"
"#,
        );
        let s = &cfg.services[0];
        assert_eq!(s.check.kind, CheckKind::None);
        assert_eq!(s.backends.family, Family::V6);
        assert_eq!(s.listen.proto, Proto::Udp);
        assert!(s.listen.is_wildcard());
    }

    #[test]
    fn every_key_of_the_brief_example_is_read() {
        let cfg = parse_ok(
            r#"interfaces = ["eth0", "eth1"]
attach = "tc"
pin_dir = "/sys/fs/bpf/lb2"
[conntrack]
capacity = 1024
tcp_timeout = "2h"
closing_timeout = "5s"
udp_timeout = "30s"
[[service]]
name = "front"
listen = "10.0.0.1:8080/tcp"
backends = "tasks.web:80"
nameserver = "10.0.0.53:5353"
interval = "2s"
family = "ipv4"
empty_polls = 5
check = "http:/healthz"
expect_status = 204
check_port = 8081
check_interval = "3s"
check_timeout = "1s"
rise = 4
fall = 6
drain_timeout = "1m"
maglev_size = 251
snat_ports = "10000-10099"
snat_addr = "10.0.1.2"
"#,
        );
        assert_eq!(cfg.attach, AttachMode::Tc);
        assert_eq!(cfg.pin_dir, Path::new("/sys/fs/bpf/lb2"));
        assert_eq!(
            cfg.conntrack,
            ConntrackConfig {
                capacity: 1024,
                tcp_timeout: Duration::from_secs(7200),
                closing_timeout: Duration::from_secs(5),
                udp_timeout: Duration::from_secs(30),
                ..ConntrackConfig::default()
            }
        );
        let s = &cfg.services[0];
        assert_eq!(s.name, "front");
        assert_eq!(s.listen, listen("10.0.0.1:8080/tcp"));
        assert_eq!(
            s.backends,
            BackendsConfig {
                name: "tasks.web".into(),
                port: 80,
                nameserver: "10.0.0.53:5353".parse().unwrap(),
                interval: Duration::from_secs(2),
                family: Family::V4,
                empty_polls: 5,
            }
        );
        assert_eq!(
            s.check,
            CheckConfig {
                kind: CheckKind::Http {
                    path: "/healthz".into(),
                    expect_status: 204
                },
                interval: Duration::from_secs(3),
                timeout: Duration::from_secs(1),
                port: Some(8081),
                rise: 4,
                fall: 6,
            }
        );
        assert_eq!(s.drain_timeout, Duration::from_secs(60));
        assert_eq!(s.maglev_size, 251);
        assert_eq!(
            s.snat,
            SnatConfig {
                ports: (10000, 10099),
                addr: Some("10.0.1.2".parse().unwrap())
            }
        );
    }

    #[test]
    fn example_file_in_docs_is_valid() {
        let text = include_str!("../../../docs/xdplb.example.toml");
        let cfg = Config::from_toml_str(text, "docs/xdplb.example.toml")
            .unwrap_or_else(|e| panic!("the example config must parse: {e}"));
        cfg.validate(&facts())
            .unwrap_or_else(|e| panic!("the example config must validate: {e}"));
        let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "dns", "dns-tcp"]);
        // The example documents the defaults: apart from the check, the first
        // service is what the two keys alone give.
        let mut web = cfg.services[0].clone();
        web.check.kind = CheckKind::Tcp;
        let defaults = ServiceConfig::new(listen("0.0.0.0:80"), "tasks.web:80".parse().unwrap());
        assert_eq!(web, defaults);
        assert_eq!(cfg.conntrack, ConntrackConfig::default());
    }

    // ---- the short form ----

    #[test]
    fn short_form_equals_the_equivalent_file() {
        let short = ShortForm {
            interfaces: vec!["eth0".into(), "eth1".into()],
            listen: listen("0.0.0.0:80"),
            backends: "tasks.web:80".parse().unwrap(),
            nameserver: None,
            check: None,
            attach: None,
        };
        let from_cli = Config::from_short_form(short).expect("valid short form");
        assert_eq!(from_cli, parse_ok(MINIMAL));
        assert_eq!(from_cli.services[0].backends.nameserver, DEFAULT_NAMESERVER);
        assert_eq!(from_cli.services[0].check.kind, CheckKind::Tcp);
    }

    #[test]
    fn short_form_with_every_flag_equals_the_equivalent_file() {
        let short = ShortForm {
            interfaces: vec!["eth0".into()],
            listen: listen("[::1]:5353/udp"),
            backends: "tasks.dns:53".parse().unwrap(),
            nameserver: Some("[::1]:53".parse().unwrap()),
            check: Some("http:/ready".parse().unwrap()),
            attach: Some(AttachMode::Xdp),
        };
        let file = parse_ok(
            r#"interfaces = ["eth0"]
attach = "xdp"
[[service]]
listen = "[::1]:5353/udp"
backends = "tasks.dns:53"
nameserver = "[::1]:53"
check = "http:/ready"
"#,
        );
        let from_cli = Config::from_short_form(short).expect("valid short form");
        assert_eq!(from_cli, file);
        assert_eq!(from_cli.services[0].backends.family, Family::V6);
    }

    #[test]
    fn short_form_errors_name_the_flag() {
        let short = ShortForm {
            interfaces: vec!["eth0".into()],
            listen: listen("0.0.0.0:0"),
            backends: "tasks.web:80".parse().unwrap(),
            nameserver: None,
            check: None,
            attach: None,
        };
        let e = Config::from_short_form(short).expect_err("port 0 must be rejected");
        assert!(
            matches!(e, ConfigError::PortZero { key: "listen", .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with("command line (--listen): "),
            "{e}"
        );
    }

    // ---- value syntax ----

    #[test]
    fn listen_parses_and_displays_round_trip() {
        let cases = [
            (
                "0.0.0.0:80",
                "0.0.0.0:80/tcp",
                Ipv4Addr::UNSPECIFIED.into(),
                80,
                Proto::Tcp,
            ),
            (
                "10.0.0.5:53/udp",
                "10.0.0.5:53/udp",
                Ipv4Addr::new(10, 0, 0, 5).into(),
                53,
                Proto::Udp,
            ),
            (
                "[::]:80/udp",
                "[::]:80/udp",
                Ipv6Addr::UNSPECIFIED.into(),
                80,
                Proto::Udp,
            ),
            (
                "[2001:db8::1]:443/tcp",
                "[2001:db8::1]:443/tcp",
                "2001:db8::1".parse().unwrap(),
                443,
                Proto::Tcp,
            ),
        ];
        for (text, shown, addr, port, proto) in cases {
            let l = listen(text);
            assert_eq!(l, Listen { addr, port, proto }, "parsing {text:?}");
            assert_eq!(l.to_string(), shown, "displaying {text:?}");
            assert_eq!(listen(&l.to_string()), l, "round trip of {text:?}");
        }
        for bad in [
            "80",
            "0.0.0.0",
            "0.0.0.0:80/sctp",
            "::1:80",
            "web:80",
            "0.0.0.0:65536",
            "",
        ] {
            assert!(
                bad.parse::<Listen>().is_err(),
                "{bad:?} should not parse as a listener"
            );
        }
    }

    #[test]
    fn check_kind_parses_and_displays_round_trip() {
        let http = |path: &str| CheckKind::Http {
            path: path.into(),
            expect_status: 200,
        };
        let cases = [
            ("none", CheckKind::None),
            ("tcp", CheckKind::Tcp),
            ("http:/healthz", http("/healthz")),
            ("http:/a/b?c=d", http("/a/b?c=d")),
            ("http:/", http("/")),
        ];
        for (text, want) in cases {
            let got: CheckKind = text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(got, want, "parsing {text:?}");
            assert_eq!(got.to_string(), text, "displaying {text:?}");
        }
        assert_eq!("http".parse::<CheckKind>(), Ok(http("/")));
        for bad in ["http:", "http:healthz", "http:/a b", "udp", "TCP", ""] {
            assert!(
                bad.parse::<CheckKind>().is_err(),
                "{bad:?} should not parse as a check"
            );
        }
    }

    #[test]
    fn backends_parse_and_display_round_trip() {
        let b: BackendsConfig = "tasks.web:80".parse().unwrap();
        assert_eq!(b, BackendsConfig::new("tasks.web", 80));
        assert_eq!(b.to_string(), "tasks.web:80");
        assert_eq!(b.to_string().parse::<BackendsConfig>(), Ok(b));
        let b: BackendsConfig = "tasks.my-stack_api.:8080".parse().unwrap();
        assert_eq!((b.name.as_str(), b.port), ("tasks.my-stack_api.", 8080));
        for bad in [
            "tasks.web",
            "tasks.web:",
            ":80",
            "tasks..web:80",
            "tasks web:80",
            "web:http",
        ] {
            assert!(
                bad.parse::<BackendsConfig>().is_err(),
                "{bad:?} should not parse as backends"
            );
        }
    }

    #[test]
    fn enums_parse_and_display_round_trip() {
        for m in [AttachMode::Auto, AttachMode::Xdp, AttachMode::Tc] {
            assert_eq!(m.to_string().parse::<AttachMode>(), Ok(m));
        }
        for f in [Family::V4, Family::V6] {
            assert_eq!(parse_family(f.config_name()), Ok(f));
        }
        for p in [Proto::Tcp, Proto::Udp] {
            assert_eq!(p.to_string().parse::<Proto>(), Ok(p));
        }
        assert_eq!(AttachMode::Xdp.to_string(), "xdp");
        assert_eq!(Family::V6.config_name(), "ipv6");
        assert_eq!(Family::V6.to_string(), "IPv6");
        assert!(parse_family("IPv6").is_err());
        assert!("XDP".parse::<AttachMode>().is_err());
        assert_eq!((Proto::Tcp.number(), Proto::Udp.number()), (6, 17));
    }

    #[test]
    fn wildcards_clash_with_specific_addresses_of_their_family_only() {
        assert!(listen("0.0.0.0:80").is_wildcard());
        assert!(listen("[::]:80").is_wildcard());
        assert!(!listen("10.0.0.1:80").is_wildcard());
        assert!(!listen("[::1]:80").is_wildcard());

        let clash = |a: &str, b: &str| {
            let (a, b) = (listen(a), listen(b));
            assert_eq!(
                a.clashes_with(&b),
                b.clashes_with(&a),
                "clashing is symmetric: {a} {b}"
            );
            a.clashes_with(&b)
        };
        assert!(clash("0.0.0.0:80", "0.0.0.0:80"));
        assert!(clash("0.0.0.0:80", "10.0.0.1:80"));
        assert!(clash("[::]:80", "[2001:db8::1]:80"));
        assert!(!clash("10.0.0.1:80", "10.0.0.2:80"));
        assert!(!clash("0.0.0.0:80", "0.0.0.0:81"));
        assert!(!clash("0.0.0.0:53/tcp", "0.0.0.0:53/udp"));
        assert!(!clash("0.0.0.0:80", "[::]:80"));
        assert!(!clash("0.0.0.0:80", "[::1]:80"));
    }

    #[test]
    fn names_are_derived_from_docker_task_names() {
        assert_eq!(derive_name("tasks.web"), "web");
        assert_eq!(derive_name("tasks.stack_web."), "stack_web");
        assert_eq!(derive_name("TASKS.web"), "web");
        assert_eq!(derive_name("web.internal"), "web.internal");
        assert_eq!(derive_name("tasks"), "tasks");
        assert_eq!(derive_name("tasks."), "tasks");
    }

    #[test]
    fn line_and_column_count_lines_and_characters() {
        let text = "ab\ncé=x\n\nz";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 2), (1, 3));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(
            line_col(text, 6),
            (2, 3),
            "é is one column though two bytes"
        );
        assert_eq!(line_col(text, 10), (4, 1));
        assert_eq!(line_col(text, 99), (4, 2), "offsets past the end clamp");
    }

    #[test]
    fn local_port_range_is_read_from_the_sysctl_format() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_local_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_local_port_range("32768\n"), None);
        assert_eq!(parse_local_port_range("1 2 3"), None);
        assert_eq!(parse_local_port_range("a b"), None);
    }

    #[test]
    fn prime_suggestions_are_the_next_prime_of_at_least_3() {
        assert_eq!(prime_suggestion(65536), 65537);
        assert_eq!(prime_suggestion(65535), 65537);
        assert_eq!(prime_suggestion(0), 3);
        assert_eq!(prime_suggestion(2), 3);
        assert_eq!(prime_suggestion(u32::MAX), 4_294_967_291);
    }

    #[test]
    fn dataplane_config_carries_timeouts_and_the_snat_span() {
        let cfg = parse_ok(&format!(
            "{MINIMAL}snat_ports = \"21000-21999\"\n[[service]]\nlisten = \"0.0.0.0:81\"\n\
             backends = \"tasks.api:81\"\nsnat_ports = \"20000-20999\"\n"
        ));
        let dp = cfg.dataplane_config();
        assert_eq!((dp.snat_port_min, dp.snat_port_max), (20000, 21999));
        assert_eq!(dp.tcp_timeout_ns, lb_common::DEFAULT_TCP_TIMEOUT_NS);
        assert_eq!(dp.closing_timeout_ns, lb_common::DEFAULT_CLOSING_TIMEOUT_NS);
        assert_eq!(dp.udp_timeout_ns, lb_common::DEFAULT_UDP_TIMEOUT_NS);
        assert_eq!(dp.abi_version, lb_common::ABI_VERSION);
        assert_eq!(
            dp.unanswered_timeout_ns,
            lb_common::DEFAULT_UNANSWERED_TIMEOUT_NS
        );
        assert_eq!(dp.hash_key, [0; 2], "no secret configured: the daemon's");
        assert!(dp.flood_new_flows_per_cpu > 0);
    }

    #[test]
    fn unanswered_flows_flood_guard_and_hash_secret() {
        let cfg = parse_ok(&format!(
            "flow_hash_secret = \"00112233445566778899AABBCCDDEEFF\"\n{MINIMAL}\
             [conntrack]\nunanswered_timeout = \"2s\"\nunanswered_capacity = 1000\n\
             flood_new_flows_per_second = 0\n"
        ));
        assert_eq!(cfg.conntrack.unanswered_timeout, Duration::from_secs(2));
        assert_eq!(cfg.conntrack.unanswered_capacity, 1000);
        let dp = cfg.dataplane_config();
        assert_eq!(dp.unanswered_timeout_ns, 2_000_000_000);
        assert_eq!(dp.flood_new_flows_per_cpu, 0, "0: the guard is off");
        assert_eq!(dp.hash_key, [0x0011_2233_4455_6677, 0x8899_aabb_ccdd_eeff]);
        assert_eq!(
            cfg.flow_hash_secret.unwrap().to_string(),
            "00112233445566778899aabbccddeeff"
        );
        assert_eq!(
            format!("{:?}", cfg.flow_hash_secret),
            "Some(HashSecret(..))"
        );
        for bad in [
            "abc",
            "00000000000000000000000000000000",
            "0011223344556677889900aabbccddeeg",
        ] {
            let e = parse_err(&format!("flow_hash_secret = \"{bad}\"\n{MINIMAL}"), 1);
            assert!(
                e.to_string().contains("flow_hash_secret") && !e.to_string().contains(bad),
                "{e}"
            );
        }
        assert_eq!(flood_per_cpu(20_000, 3), 6667);
        assert_eq!(flood_per_cpu(1, 64), 1);
        assert_eq!(flood_per_cpu(0, 4), 0);
        let a = HashSecret::generate().unwrap();
        assert_ne!(a, HashSecret::generate().unwrap());
        assert_eq!(a.to_string().parse::<HashSecret>().unwrap(), a);
    }

    // ---- errors ----

    #[test]
    fn toml_syntax_errors_give_line_and_column() {
        let e = parse_err(
            "interfaces = [\"eth0\"]\n[[service]]\nlisten = 0.0.0.0:80\n",
            3,
        );
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        let e = parse_err(
            "interfaces = [\"eth0\"]\n[[service]]\nlisten = \"0.0.0.0:80\"\n",
            2,
        );
        assert!(
            e.to_string().contains("missing key `backends`"),
            "a missing key is named: {e}"
        );
    }

    /// Every key a table allows is read, and type-checked: a value of the
    /// wrong type is named by its key (the allowed lists and the reads in
    /// `file.rs` cannot drift apart unseen).
    #[test]
    fn every_allowed_key_is_read() {
        let wrong = "[[1]]";
        for key in ROOT_KEYS
            .iter()
            .filter(|k| !["interfaces", "service"].contains(k))
        {
            let m = parse_err(&format!("{key} = {wrong}\n{MINIMAL}"), 1).to_string();
            assert!(m.contains(&format!("`{key}` must be")), "{key}: {m}");
        }
        for key in SERVICE_KEYS
            .iter()
            .filter(|k| !["listen", "backends"].contains(k))
        {
            let m = parse_err(&format!("{MINIMAL}{key} = {wrong}\n"), 5).to_string();
            assert!(m.contains(&format!("`{key}` must be")), "{key}: {m}");
        }
        for key in ["listen", "backends"] {
            let text = MINIMAL.replace(&format!("{key} = "), &format!("{key} = {wrong}\n# "));
            let m = parse_err(&text, if key == "listen" { 3 } else { 4 }).to_string();
            assert!(m.contains(&format!("`{key}` must be")), "{key}: {m}");
        }
        for key in CONNTRACK_KEYS {
            let m = parse_err(&format!("{MINIMAL}[conntrack]\n{key} = {wrong}\n"), 6).to_string();
            assert!(m.contains(&format!("`{key}` must be")), "{key}: {m}");
        }
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = parse_err(&format!("{MINIMAL}chek = \"tcp\"\n"), 5);
        match &e {
            ConfigError::UnknownKey { key, expected, .. } => {
                assert_eq!(key, "chek");
                assert!(
                    expected.contains("`check`"),
                    "the allowed keys are listed: {e}"
                );
            }
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        let e = parse_err("interfaces = [\"eth0\"]\nattach_mode = \"tc\"\n", 2);
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, .. } if key == "attach_mode"),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}[conntrack]\ntcp_timout = \"1h\"\n"), 6);
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, .. } if key == "tcp_timout"),
            "{e:?}"
        );
    }

    #[test]
    fn bad_values_name_the_key_the_service_and_the_line() {
        let e = parse_err(&MINIMAL.replace("0.0.0.0:80", "0.0.0.0:80/sctp"), 3);
        assert!(
            matches!(e, ConfigError::InvalidValue { key: "listen", .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("service \"web\""), "{e}");
        let e = parse_err(&format!("{MINIMAL}check_interval = \"soon\"\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::InvalidValue {
                    key: "check_interval",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}snat_ports = \"20000:29999\"\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::InvalidValue {
                    key: "snat_ports",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_err(&format!("attach = \"xpd\"\n{MINIMAL}"), 1);
        assert!(
            matches!(
                e,
                ConfigError::InvalidValue {
                    key: "attach",
                    service: None,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}expect_status = 204\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::InvalidValue {
                    key: "expect_status",
                    ..
                }
            ),
            "{e:?}"
        );
        // Before the name is known, errors say which block.
        let e = parse_err(
            "interfaces = [\"eth0\"]\n[[service]]\nlisten = \"x\"\nbackends = \"?\"\n",
            3,
        );
        assert!(e.to_string().contains("service \"#1\""), "{e}");
    }

    #[test]
    fn two_services_on_the_same_listener_are_refused() {
        let text = format!(
            "{MINIMAL}\n[[service]]\nname = \"other\"\nlisten = \"0.0.0.0:80/tcp\"\n\
             backends = \"tasks.other:80\"\n"
        );
        let e = parse_err(&text, 8);
        match &e {
            ConfigError::ListenerClash {
                service,
                other,
                other_at,
                ..
            } => {
                assert_eq!((service.as_str(), other.as_str()), ("other", "web"));
                assert_eq!(other_at.line, Some(3), "the first service's line is given");
            }
            other => panic!("expected ListenerClash, got {other:?}"),
        }
        assert!(
            e.to_string().contains("\"web\""),
            "both services are named: {e}"
        );
    }

    #[test]
    fn a_wildcard_and_a_specific_address_on_one_port_clash() {
        let text = "interfaces = [\"eth0\"]\n\
                    [[service]]\nlisten = \"10.0.0.1:443\"\nbackends = \"tasks.a:443\"\n\
                    [[service]]\nlisten = \"0.0.0.0:443\"\nbackends = \"tasks.b:443\"\n";
        let e = parse_err(text, 6);
        let ConfigError::ListenerClash { service, other, .. } = &e else {
            panic!("expected ListenerClash, got {e:?}");
        };
        assert_eq!((service.as_str(), other.as_str()), ("b", "a"));
        let msg = e.to_string();
        assert!(
            msg.contains("wildcard"),
            "the message explains the wildcard: {msg}"
        );
        // Same port, other protocol or other family: fine.
        parse_ok(&text.replace("0.0.0.0:443\"", "0.0.0.0:443/udp\""));
        parse_ok(&text.replace("0.0.0.0:443\"", "[::]:443\""));
    }

    #[test]
    fn missing_interfaces_are_refused_with_the_line() {
        let cfg = parse_ok(&format!("# comment\n{MINIMAL}"));
        let host = HostFacts {
            interfaces: vec!["eth0".into(), "lo".into()],
            ..facts()
        };
        let e = cfg.validate(&host).expect_err("eth1 does not exist");
        assert!(
            matches!(&e, ConfigError::UnknownInterface { name, .. } if name == "eth1"),
            "{e:?}"
        );
        assert_located(&e, 2);
        assert!(e.to_string().contains("present: eth0, lo"), "{e}");

        let e = parse_err(&MINIMAL.replace("[\"eth0\", \"eth1\"]", "[]"), 1);
        assert!(matches!(e, ConfigError::NoInterfaces { .. }), "{e:?}");
        let e = parse_err(&MINIMAL.replace("\"eth1\"", "\"eth0\""), 1);
        assert!(matches!(e, ConfigError::DuplicateInterface { .. }), "{e:?}");
        let e = parse_err(&MINIMAL.replace("\"eth1\"", "\"a/b\""), 1);
        assert!(
            matches!(
                e,
                ConfigError::InvalidValue {
                    key: "interfaces",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn snat_range_overlapping_ephemeral_ports_is_refused() {
        let cfg = parse_ok(&format!("{MINIMAL}snat_ports = \"30000-40000\"\n"));
        let e = cfg
            .validate(&facts())
            .expect_err("30000-40000 overlaps 32768-60999");
        assert!(
            matches!(e, ConfigError::SnatOverlapsEphemeral { .. }),
            "{e:?}"
        );
        assert_located(&e, 5);
        let msg = e.to_string();
        for part in [
            "30000-40000",
            "32768-60999",
            "ip_local_port_range",
            "sysctl",
            "snat_ports",
        ] {
            assert!(
                msg.contains(part),
                "the message should mention {part:?}: {msg}"
            );
        }
        // The same range is fine where the host's ephemeral ports are elsewhere.
        let host = HostFacts {
            local_port_range: (50000, 60999),
            ..facts()
        };
        cfg.validate(&host).expect("disjoint ranges are fine");
        // The default range overlapping a widened ephemeral range: located at the block.
        let e = parse_ok(MINIMAL)
            .validate(&HostFacts {
                local_port_range: (1024, 65535),
                ..facts()
            })
            .expect_err("20000-29999 overlaps 1024-65535");
        assert_located(&e, 2);
    }

    #[test]
    fn maglev_size_must_be_a_prime_of_at_least_3() {
        let e = parse_err(&format!("{MINIMAL}maglev_size = 65536\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::MaglevSize {
                    size: 65536,
                    suggestion: 65537,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("use 65537"), "{e}");
        let e = parse_err(&format!("{MINIMAL}maglev_size = 2\n"), 5);
        assert!(
            matches!(e, ConfigError::MaglevSize { suggestion: 3, .. }),
            "{e:?}"
        );
        assert_eq!(
            parse_ok(&format!("{MINIMAL}maglev_size = 3\n")).services[0].maglev_size,
            3
        );
    }

    #[test]
    fn check_timeout_must_be_shorter_than_the_interval() {
        let e = parse_err(
            &format!("{MINIMAL}check_interval = \"1s\"\ncheck_timeout = \"1s\"\n"),
            6,
        );
        assert!(matches!(e, ConfigError::CheckTimeout { .. }), "{e:?}");
        assert!(e.to_string().contains("service \"web\""), "{e}");
        // Without checks, their timing does not matter.
        parse_ok(&format!(
            "{MINIMAL}check = \"none\"\ncheck_timeout = \"5s\"\n"
        ));
    }

    #[test]
    fn rise_fall_and_empty_polls_must_be_at_least_1() {
        for key in ["rise", "fall", "empty_polls"] {
            let e = parse_err(&format!("{MINIMAL}{key} = 0\n"), 5);
            assert!(
                matches!(&e, ConfigError::ZeroCount { key: k, .. } if *k == key),
                "{e:?}"
            );
        }
    }

    #[test]
    fn intervals_and_timeouts_have_minimums() {
        let e = parse_err(&format!("{MINIMAL}interval = \"10ms\"\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::DurationTooShort {
                    key: "interval",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}[conntrack]\nudp_timeout = \"0s\"\n"), 6);
        assert!(
            matches!(
                e,
                ConfigError::DurationTooShort {
                    key: "conntrack.udp_timeout",
                    service: None,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn an_empty_service_list_is_refused() {
        let e = parse("interfaces = [\"eth0\"]\n").expect_err("no services");
        assert!(matches!(e, ConfigError::NoServices { .. }), "{e:?}");
        assert!(e.to_string().starts_with("test.toml: "), "{e}");
    }

    #[test]
    fn port_zero_is_refused() {
        let e = parse_err(&MINIMAL.replace("0.0.0.0:80", "0.0.0.0:0"), 3);
        assert!(
            matches!(e, ConfigError::PortZero { key: "listen", .. }),
            "{e:?}"
        );
        let e = parse_err(&MINIMAL.replace("tasks.web:80", "tasks.web:0"), 4);
        assert!(
            matches!(
                e,
                ConfigError::PortZero {
                    key: "backends",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}check_port = 0\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::PortZero {
                    key: "check_port",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_types_name_the_key_and_what_was_meant() {
        let msg = |extra: &str| parse_err(&format!("{MINIMAL}{extra}\n"), 5).to_string();
        let m = msg("rise = \"two\"");
        assert!(
            m.contains("`rise` must be a whole number") && m.contains("\"two\""),
            "{m}"
        );
        let m = msg("interval = 1");
        assert!(
            m.contains("`interval` must be a duration in quotes, like \"1s\""),
            "{m}"
        );
        let m = msg("check_port = 70000");
        assert!(
            m.contains("`check_port` = 70000 is out of range (a port is 1 to 65535)"),
            "{m}"
        );
        let m = msg("maglev_size = 99999999999");
        assert!(
            m.contains("`maglev_size` = 99999999999 is out of range"),
            "{m}"
        );
        let m = msg("name = 5");
        assert!(m.contains("`name` must be a string in quotes"), "{m}");
        let m = msg("rise = -1");
        assert!(
            m.contains("`rise` = -1 is out of range (at most 4294967295)"),
            "{m}"
        );
        let m = msg("fall = 2.5");
        assert!(
            m.contains("`fall` must be a whole number (found float 2.5)"),
            "{m}"
        );
        let m = msg("expect_status = 0x10000");
        assert!(
            m.contains("`expect_status` = 0x10000 is out of range (at most 65535)"),
            "{m}"
        );
        let m = parse_err("interfaces = \"eth0\"\n", 1).to_string();
        assert!(
            m.contains("`interfaces` must be a list of strings in quotes, like [\"eth0\"] (found string \"eth0\")"),
            "{m}"
        );
        let m = parse_err(&format!("conntrack = 5\n{MINIMAL}"), 1).to_string();
        assert!(
            m.contains("`conntrack` must be a table, [conntrack] (found integer 5)"),
            "{m}"
        );
        let m = parse_err("interfaces = [\"eth0\"]\nservice = \"web\"\n", 2).to_string();
        assert!(m.contains("`service` must be [[service]] tables"), "{m}");
        let m = parse_err("interfaces = [\"eth0\"]\nbackend_slots = true\n", 2).to_string();
        assert!(
            m.contains("`backend_slots` must be a whole number (found boolean true)"),
            "{m}"
        );
    }

    #[test]
    fn ports_out_of_range_and_literal_addresses_are_named() {
        let e = "0.0.0.0:70000".parse::<Listen>().expect_err("70000");
        assert_eq!(e.to_string(), "port 70000 is out of range (1 to 65535)");
        let e = "tasks.web:99999"
            .parse::<BackendsConfig>()
            .expect_err("99999");
        assert_eq!(e.to_string(), "port 99999 is out of range (1 to 65535)");
        let e = "10.0.0.5:80"
            .parse::<BackendsConfig>()
            .expect_err("an address");
        assert!(
            e.to_string().contains("is an address, not a DNS name"),
            "{e}"
        );
        assert_eq!(
            parse_nameserver("10.0.0.2"),
            Ok("10.0.0.2:53".parse().unwrap()),
            "a bare address means port 53"
        );
        assert_eq!(
            parse_nameserver("[fd00::53]:5353"),
            Ok("[fd00::53]:5353".parse().unwrap())
        );
        let e = parse_nameserver("10.0.0.2:70000").expect_err("port");
        assert!(e.contains("port 70000 is out of range"), "{e}");
        let e = parse_nameserver("dns.example").expect_err("a name");
        assert!(e.contains("given by address, not by name"), "{e}");
    }

    #[test]
    fn a_missing_file_says_its_error_once() {
        let e = Config::load("/nonexistent/xdplb.toml").expect_err("missing");
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
    }

    #[test]
    fn max_backends_defaults_to_what_maglev_serves_and_is_bounded() {
        let cfg = parse_ok(MINIMAL);
        assert_eq!(cfg.services[0].backend_cap(), 655, "65537 / 100");
        let cfg = parse_ok(&format!("{MINIMAL}maglev_size = 251\n"));
        assert_eq!(cfg.services[0].backend_cap(), 2);
        let cfg = parse_ok(&format!("{MINIMAL}max_backends = 40\n"));
        assert_eq!(cfg.services[0].backend_cap(), 40);
        for bad in ["0", "65538"] {
            let e = parse_err(&format!("{MINIMAL}max_backends = {bad}\n"), 5);
            assert!(
                matches!(
                    &e,
                    ConfigError::InvalidValue {
                        key: "max_backends",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("maglev_size (65537)"), "{e}");
        }
    }

    #[test]
    fn backend_slots_are_bounded_by_the_map() {
        let cfg = parse_ok(MINIMAL);
        assert_eq!(cfg.backend_slots, MAX_BACKEND_SLOTS);
        let cfg = parse_ok(&format!("backend_slots = 4\n{MINIMAL}"));
        assert_eq!(cfg.backend_slots, 4);
        for bad in ["0", "65536"] {
            let e = parse_err(&format!("backend_slots = {bad}\n{MINIMAL}"), 1);
            assert!(
                matches!(
                    &e,
                    ConfigError::InvalidValue {
                        key: "backend_slots",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn snat_addr_must_belong_to_this_host() {
        let cfg = parse_ok(&format!("{MINIMAL}snat_addr = \"10.0.1.2\"\n"));
        cfg.validate(&facts()).expect("10.0.1.2 is a host address");
        let cfg = parse_ok(&format!("{MINIMAL}snat_addr = \"10.0.1.3\"\n"));
        let e = cfg.validate(&facts()).expect_err("10.0.1.3 is not ours");
        assert_located(&e, 5);
        let msg = e.to_string();
        assert!(
            msg.contains("not an address of this host") && msg.contains("10.0.1.2"),
            "{msg}"
        );
    }

    #[test]
    fn snat_ranges_must_be_ranges_and_keep_clear_of_listeners() {
        let e = parse_err(&format!("{MINIMAL}snat_ports = \"29999-20000\"\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::SnatRange {
                    lo: 29999,
                    hi: 20000,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}snat_ports = \"0-100\"\n"), 5);
        assert!(matches!(e, ConfigError::SnatRange { .. }), "{e:?}");
        let e = parse_err(&MINIMAL.replace("0.0.0.0:80", "0.0.0.0:25000"), 3);
        assert!(
            matches!(e, ConfigError::ListenInSnatRange { port: 25000, .. }),
            "{e:?}"
        );
        assert_eq!(
            parse_ok(&format!("{MINIMAL}snat_ports = \"20000\"\n")).services[0]
                .snat
                .ports,
            (20000, 20000)
        );
    }

    #[test]
    fn services_may_share_snat_ranges() {
        // Ports are reserved per (backend, SNAT address, SNAT port, protocol)
        // in the data plane, so sharing is safe and defaults must not clash.
        let cfg = parse_ok(&format!(
            "{MINIMAL}[[service]]\nlisten = \"0.0.0.0:81\"\nbackends = \"tasks.api:81\"\n"
        ));
        assert_eq!(cfg.services[0].snat, cfg.services[1].snat);
        cfg.validate(&facts())
            .expect("two services with default SNAT settings are valid");
    }

    #[test]
    fn families_must_match_the_listener() {
        let e = parse_err(&format!("{MINIMAL}family = \"ipv6\"\n"), 5);
        assert!(
            matches!(e, ConfigError::FamilyMismatch { key: "family", .. }),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}snat_addr = \"2001:db8::1\"\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::FamilyMismatch {
                    key: "snat_addr",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse_err(&format!("{MINIMAL}snat_addr = \"0.0.0.0\"\n"), 5);
        assert!(
            matches!(
                e,
                ConfigError::InvalidValue {
                    key: "snat_addr",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn service_names_must_be_unique() {
        let e = parse_err(
            "interfaces = [\"eth0\"]\n\
             [[service]]\nlisten = \"0.0.0.0:53/udp\"\nbackends = \"tasks.dns:53\"\n\
             [[service]]\nlisten = \"0.0.0.0:53/tcp\"\nbackends = \"tasks.dns:53\"\n",
            5,
        );
        match &e {
            ConfigError::DuplicateName { name, first, .. } => {
                assert_eq!(name, "dns");
                assert_eq!(first.line, Some(2), "the first block's line is given");
            }
            other => panic!("expected DuplicateName, got {other:?}"),
        }
        assert!(e.to_string().contains("set a distinct `name`"), "{e}");
    }

    #[test]
    fn load_reads_files_and_names_missing_ones() {
        let dir = std::env::temp_dir().join(format!("xdplb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, format!("{MINIMAL}rise = 0\n")).unwrap();
        let e = Config::load(&path).expect_err("rise = 0 is invalid");
        let want = format!("{}:5:", path.display());
        assert!(
            e.to_string().starts_with(&want),
            "expected {want:?} in: {e}"
        );
        std::fs::write(&path, MINIMAL).unwrap();
        assert_eq!(Config::load(&path).expect("valid file"), parse_ok(MINIMAL));
        std::fs::remove_dir_all(&dir).unwrap();
        let e = Config::load(&path).expect_err("the file is gone");
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("lb.toml"), "{e}");
    }
}
