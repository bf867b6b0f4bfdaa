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
#![expect(
    clippy::result_large_err,
    reason = "a ConfigError is built at most once, at startup; its size costs nothing, and \
              plain fields keep matching on the variants simple"
)]

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
use serde::Deserialize;
use toml::Spanned;

use crate::dataplane::maglev::is_prime;

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

fn sockaddr_ip(a: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

// ---- behaviour of the model ----------------------------------------------------

impl Config {
    /// Parses a TOML configuration. `file` is only used in error messages
    /// (a path, or something like `"<stdin>"`). The result has passed
    /// [`Config::check_consistency`]; host checks are [`Config::validate`]'s.
    pub fn from_toml_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
        let cfg = Converter {
            file: Arc::from(file),
            text,
        }
        .config(raw)?;
        cfg.check_consistency()?;
        Ok(cfg)
    }

    /// Reads and parses a TOML configuration file (see
    /// [`Config::from_toml_str`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Builds the configuration the short form of the command line describes:
    /// one service, everything else default. Equal to the [`Config`] parsed
    /// from the equivalent file.
    pub fn from_short_form(short: ShortForm) -> Result<Self, ConfigError> {
        let origin = Origin::command_line();
        let mut service = ServiceConfig::new(short.listen, short.backends);
        if let Some(nameserver) = short.nameserver {
            service.backends.nameserver = nameserver;
        }
        if let Some(kind) = short.check {
            service.check.kind = kind;
        }
        service.origin = origin.clone();
        let cfg = Self {
            interfaces: short.interfaces,
            attach: short.attach.unwrap_or_default(),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            conntrack: ConntrackConfig::default(),
            flow_hash_secret: None,
            backend_slots: MAX_BACKEND_SLOTS,
            services: vec![service],
            origin,
        };
        cfg.check_consistency()?;
        Ok(cfg)
    }

    /// Every check: [`Config::check_consistency`], then the checks against
    /// the host. Pure; get `facts` from [`HostFacts::read`].
    pub fn validate(&self, facts: &HostFacts) -> Result<(), ConfigError> {
        self.check_consistency()?;
        for name in &self.interfaces {
            if !facts.interfaces.contains(name) {
                return Err(ConfigError::UnknownInterface {
                    at: self.origin.at("interfaces"),
                    name: name.clone(),
                    present: facts.interfaces.clone(),
                });
            }
        }
        let (eph_lo, eph_hi) = facts.local_port_range;
        for s in &self.services {
            if let Some(addr) = s.snat.addr {
                if !facts.addresses.contains(&addr) {
                    let present: Vec<String> =
                        facts.addresses.iter().map(|a| a.to_string()).collect();
                    return Err(invalid(
                        s.origin.at("snat_addr"),
                        Some(s.name.clone()),
                        "snat_addr",
                        &addr.to_string(),
                        format!(
                            "is not an address of this host (it has {}); backends would answer \
                             a machine that never asked",
                            present.join(", ")
                        ),
                    ));
                }
            }
            let (lo, hi) = s.snat.ports;
            if lo <= eph_hi && eph_lo <= hi {
                return Err(ConfigError::SnatOverlapsEphemeral {
                    at: s.origin.at("snat_ports"),
                    service: s.name.clone(),
                    snat: s.snat.ports,
                    ephemeral: facts.local_port_range,
                });
            }
        }
        Ok(())
    }

    /// The checks that need nothing but the configuration itself. Loading
    /// runs them; call them again after changing a [`Config`] in code.
    pub fn check_consistency(&self) -> Result<(), ConfigError> {
        let at = |key| self.origin.at(key);
        if self.interfaces.is_empty() {
            return Err(ConfigError::NoInterfaces {
                at: at("interfaces"),
            });
        }
        for (i, name) in self.interfaces.iter().enumerate() {
            if let Err(reason) = check_interface_name(name) {
                return Err(invalid(at("interfaces"), None, "interfaces", name, reason));
            }
            if self.interfaces[..i].contains(name) {
                return Err(ConfigError::DuplicateInterface {
                    at: at("interfaces"),
                    name: name.clone(),
                });
            }
        }
        if !self.pin_dir.is_absolute() {
            return Err(invalid(
                at("pin_dir"),
                None,
                "pin_dir",
                &self.pin_dir.display().to_string(),
                "must be an absolute path on a bpffs mount, e.g. /sys/fs/bpf/xdplb",
            ));
        }
        self.conntrack.check(&self.origin)?;
        if !(1..=MAX_BACKEND_SLOTS).contains(&self.backend_slots) {
            return Err(invalid(
                at("backend_slots"),
                None,
                "backend_slots",
                &self.backend_slots.to_string(),
                format!("must be 1 to {MAX_BACKEND_SLOTS} (the size of the BACKENDS map)"),
            ));
        }
        if self.services.is_empty() {
            return Err(ConfigError::NoServices {
                at: self.origin.whole(),
            });
        }
        let max = MAX_SERVICES as usize - 1;
        if self.services.len() > max {
            return Err(ConfigError::TooManyServices {
                at: self.origin.whole(),
                count: self.services.len(),
                max,
            });
        }
        for s in &self.services {
            s.check_consistency()?;
        }
        for (i, s) in self.services.iter().enumerate() {
            for earlier in &self.services[..i] {
                if earlier.name == s.name {
                    return Err(ConfigError::DuplicateName {
                        at: s.origin.at("name"),
                        name: s.name.clone(),
                        first: earlier.origin.at("name"),
                    });
                }
                if earlier.listen.clashes_with(&s.listen) {
                    return Err(ConfigError::ListenerClash {
                        at: s.origin.at("listen"),
                        service: s.name.clone(),
                        listen: s.listen,
                        other: earlier.name.clone(),
                        other_listen: earlier.listen,
                        other_at: earlier.origin.at("listen"),
                    });
                }
            }
        }
        if let Some(span) = self.snat_port_span() {
            for s in &self.services {
                if (span.0..=span.1).contains(&s.listen.port) {
                    return Err(ConfigError::ListenInSnatRange {
                        at: s.origin.at("listen"),
                        service: s.name.clone(),
                        port: s.listen.port,
                        span,
                    });
                }
            }
        }
        Ok(())
    }

    /// The smallest port range covering every service's SNAT range, which is
    /// what the data plane treats as "possibly a reply" (`snat_port_min` /
    /// `snat_port_max` of `lb_common::Config`). `None` without services.
    pub fn snat_port_span(&self) -> Option<(u16, u16)> {
        let lo = self.services.iter().map(|s| s.snat.ports.0).min()?;
        let hi = self.services.iter().map(|s| s.snat.ports.1).max()?;
        Some((lo, hi))
    }

    /// The runtime settings the data plane reads (`CONFIG[0]`). Without a
    /// `flow_hash_secret` the hash key is zero here: the daemon keeps the
    /// key pinned in `CONFIG` or generates one (`daemon::write_config`).
    pub fn dataplane_config(&self) -> lb_common::Config {
        let (snat_port_min, snat_port_max) = self.snat_port_span().unwrap_or((0, 0));
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        lb_common::Config {
            snat_port_min,
            snat_port_max,
            tcp_timeout_ns: ns(self.conntrack.tcp_timeout),
            closing_timeout_ns: ns(self.conntrack.closing_timeout),
            udp_timeout_ns: ns(self.conntrack.udp_timeout),
            unanswered_timeout_ns: ns(self.conntrack.unanswered_timeout),
            flood_new_flows_per_cpu: flood_per_cpu(
                self.conntrack.flood_new_flows_per_second,
                possible_cpus(),
            ),
            hash_key: self.flow_hash_secret.map_or([0; 2], |k| k.0),
            ..lb_common::Config::with_defaults()
        }
    }
}

/// The flood guard's threshold for one CPU: each CPU counts the new flows it
/// handles against its share of the total (rounded up; 0 stays 0, off).
pub fn flood_per_cpu(total: u32, cpus: u32) -> u32 {
    if total == 0 {
        0
    } else {
        total.div_ceil(cpus.max(1))
    }
}

/// The CPUs the per-CPU maps have a slot for (read once).
fn possible_cpus() -> u32 {
    static CPUS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        aya::util::nr_cpus()
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
    })
}

impl ConntrackConfig {
    fn check(&self, origin: &Origin) -> Result<(), ConfigError> {
        if self.capacity < 2 {
            return Err(invalid(
                origin.at("conntrack.capacity"),
                None,
                "conntrack.capacity",
                &self.capacity.to_string(),
                "must be at least 2 (every flow takes two entries)",
            ));
        }
        if self.unanswered_capacity < 2 {
            return Err(invalid(
                origin.at("conntrack.unanswered_capacity"),
                None,
                "conntrack.unanswered_capacity",
                &self.unanswered_capacity.to_string(),
                "must be at least 2 (every flow takes two entries)",
            ));
        }
        for (key, value) in [
            ("conntrack.tcp_timeout", self.tcp_timeout),
            ("conntrack.closing_timeout", self.closing_timeout),
            ("conntrack.udp_timeout", self.udp_timeout),
            ("conntrack.unanswered_timeout", self.unanswered_timeout),
        ] {
            if value < MIN_CONNTRACK_TIMEOUT {
                return Err(ConfigError::DurationTooShort {
                    at: origin.at(key),
                    service: None,
                    key,
                    value,
                    min: MIN_CONNTRACK_TIMEOUT,
                });
            }
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// A service with every default: the name derived from the backends'
    /// DNS name, the backends' family set to the listen address's, the check
    /// kind chosen by protocol. Both the file and the short form start here.
    pub fn new(listen: Listen, mut backends: BackendsConfig) -> Self {
        backends.family = listen.family();
        Self {
            name: derive_name(&backends.name),
            check: CheckConfig::default_for(listen.proto),
            listen,
            backends,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            maglev_size: DEFAULT_MAGLEV_SIZE,
            snat: SnatConfig::default(),
            max_backends: None,
            origin: Origin::default(),
        }
    }

    /// How many tasks may be backends at once: `max_backends`, or
    /// `maglev_size / 100` (a Maglev table spreads evenly when it has about
    /// 100 slots per backend or more).
    pub fn backend_cap(&self) -> usize {
        self.max_backends.unwrap_or((self.maglev_size / 100).max(1)) as usize
    }

    /// The checks of one service on its own.
    fn check_consistency(&self) -> Result<(), ConfigError> {
        let at = |key| self.origin.at(key);
        let service = || self.name.clone();
        let port_zero = |key| ConfigError::PortZero {
            at: at(key),
            service: service(),
            key,
        };
        if let Err(reason) = check_service_name(&self.name) {
            return Err(invalid(
                at("name"),
                Some(service()),
                "name",
                &self.name,
                reason,
            ));
        }
        if self.listen.port == 0 {
            return Err(port_zero("listen"));
        }
        if let Err(reason) = check_dns_name(&self.backends.name) {
            let name = &self.backends.name;
            return Err(invalid(
                at("backends"),
                Some(service()),
                "backends",
                name,
                reason,
            ));
        }
        if self.backends.port == 0 {
            return Err(port_zero("backends"));
        }
        if self.backends.nameserver.port() == 0 {
            return Err(port_zero("nameserver"));
        }
        if self.check.port == Some(0) {
            return Err(port_zero("check_port"));
        }
        if self.backends.family != self.listen.family() {
            return Err(ConfigError::FamilyMismatch {
                at: at("family"),
                service: service(),
                key: "family",
                value: self.backends.family.config_name().to_string(),
                listen: self.listen,
            });
        }
        if let Some(addr) = self.snat.addr {
            if Family::of(addr) != self.listen.family() {
                return Err(ConfigError::FamilyMismatch {
                    at: at("snat_addr"),
                    service: service(),
                    key: "snat_addr",
                    value: addr.to_string(),
                    listen: self.listen,
                });
            }
            if addr.is_unspecified() || addr.is_multicast() {
                return Err(invalid(
                    at("snat_addr"),
                    Some(service()),
                    "snat_addr",
                    &addr.to_string(),
                    "must be a unicast address of this host (omit it to use the address of \
                     the interface that routes to the backends)",
                ));
            }
        }
        let too_short = |key, value, min| ConfigError::DurationTooShort {
            at: at(key),
            service: Some(service()),
            key,
            value,
            min,
        };
        if self.backends.interval < MIN_INTERVAL {
            return Err(too_short("interval", self.backends.interval, MIN_INTERVAL));
        }
        for (key, value) in [
            ("empty_polls", self.backends.empty_polls),
            ("rise", self.check.rise),
            ("fall", self.check.fall),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroCount {
                    at: at(key),
                    service: service(),
                    key,
                });
            }
        }
        if self.check.kind != CheckKind::None {
            if self.check.interval < MIN_INTERVAL {
                return Err(too_short(
                    "check_interval",
                    self.check.interval,
                    MIN_INTERVAL,
                ));
            }
            if self.check.timeout.is_zero() {
                return Err(too_short(
                    "check_timeout",
                    self.check.timeout,
                    Duration::from_millis(1),
                ));
            }
            if self.check.timeout >= self.check.interval {
                return Err(ConfigError::CheckTimeout {
                    at: at("check_timeout"),
                    service: service(),
                    timeout: self.check.timeout,
                    interval: self.check.interval,
                });
            }
        }
        if let CheckKind::Http {
            path,
            expect_status,
        } = &self.check.kind
        {
            if let Err(reason) = check_http_path(path) {
                return Err(invalid(at("check"), Some(service()), "check", path, reason));
            }
            if !(100..=599).contains(expect_status) {
                return Err(invalid(
                    at("expect_status"),
                    Some(service()),
                    "expect_status",
                    &expect_status.to_string(),
                    "must be an HTTP status code, 100 to 599",
                ));
            }
        }
        if self.maglev_size < 3 || !is_prime(self.maglev_size) {
            return Err(ConfigError::MaglevSize {
                at: at("maglev_size"),
                service: service(),
                size: self.maglev_size,
                suggestion: prime_suggestion(self.maglev_size),
            });
        }
        if let Some(max) = self.max_backends {
            if max == 0 || max > self.maglev_size {
                return Err(invalid(
                    at("max_backends"),
                    Some(service()),
                    "max_backends",
                    &max.to_string(),
                    format!(
                        "must be 1 to maglev_size ({}): a Maglev table cannot hold more backends \
                         than slots",
                        self.maglev_size
                    ),
                ));
            }
        }
        let (lo, hi) = self.snat.ports;
        if lo == 0 || lo > hi {
            return Err(ConfigError::SnatRange {
                at: at("snat_ports"),
                service: service(),
                lo,
                hi,
            });
        }
        Ok(())
    }
}

impl CheckConfig {
    /// The default checks for a service of protocol `proto`: TCP connects for
    /// TCP services, none for UDP services.
    pub fn default_for(proto: Proto) -> Self {
        Self {
            kind: match proto {
                Proto::Tcp => CheckKind::Tcp,
                Proto::Udp => CheckKind::None,
            },
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            port: None,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }
}

impl BackendsConfig {
    /// Backends `name:port` with every other setting at its default.
    pub fn new(name: impl Into<String>, port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            nameserver: DEFAULT_NAMESERVER,
            interval: DEFAULT_POLL_INTERVAL,
            family: Family::V4,
            empty_polls: DEFAULT_EMPTY_POLLS,
        }
    }
}

impl Listen {
    /// Whether the address is the wildcard (`0.0.0.0` or `[::]`): any local
    /// address of its family.
    pub fn is_wildcard(&self) -> bool {
        self.addr.is_unspecified()
    }

    /// The address family of the listener.
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// Whether two listeners would claim the same packets: same protocol,
    /// port and family, and the same address or a wildcard on either side.
    pub fn clashes_with(&self, other: &Listen) -> bool {
        self.proto == other.proto
            && self.port == other.port
            && self.family() == other.family()
            && (self.addr == other.addr || self.is_wildcard() || other.is_wildcard())
    }
}

impl Proto {
    /// The IP protocol number (`lb_common::PROTO_*`).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
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
fn interface_names() -> std::io::Result<Vec<String>> {
    let list = nix::net::if_::if_nameindex()?;
    Ok(list
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect())
}

/// Parses the contents of `ip_local_port_range` ("32768\t60999\n").
fn parse_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) => Some((lo, hi)),
        _ => None,
    }
}

/// `web` for `tasks.web` (Docker's name for a service's task records), the
/// name itself otherwise; a trailing dot is ignored.
fn derive_name(dns_name: &str) -> String {
    let name = dns_name.strip_suffix('.').unwrap_or(dns_name);
    match name.get(..6) {
        Some(prefix) if prefix.eq_ignore_ascii_case("tasks.") && name.len() > 6 => {
            name[6..].to_owned()
        }
        _ => name.to_owned(),
    }
}

/// A suggestion for a `maglev_size` that is not a prime of at least 3: the
/// next prime above it, or the largest `u32` prime if there is none above.
fn prime_suggestion(size: u32) -> u32 {
    (size.max(2).saturating_add(1)..=u32::MAX)
        .find(|&n| is_prime(n))
        .unwrap_or(4_294_967_291)
}

fn check_interface_name(name: &str) -> Result<(), &'static str> {
    // IFNAMSIZ is 16 including the terminating NUL (include/uapi/linux/if.h).
    if name.is_empty() || name.len() > 15 {
        return Err("an interface name has 1 to 15 characters");
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || !c.is_ascii_graphic())
    {
        return Err("not a valid interface name");
    }
    Ok(())
}

fn check_service_name(name: &str) -> Result<(), &'static str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        return Err("a service name has 1 to 64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

fn check_dns_name(name: &str) -> Result<(), &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(
            "not a DNS name (labels of 1 to 63 letters, digits, '-' or '_', \
                    separated by dots)",
        );
    }
    Ok(())
}

fn check_http_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') || !path.chars().all(|c| c.is_ascii_graphic()) {
        return Err(
            "an HTTP check path starts with '/' and has no spaces or control \
                    characters, e.g. http:/healthz",
        );
    }
    Ok(())
}

// ---- value syntax ---------------------------------------------------------------

/// A setting's value did not parse. The message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ValueError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

impl FromStr for Listen {
    type Err = ValueError;

    /// `ADDR:PORT[/tcp|/udp]`: `0.0.0.0:80`, `10.0.0.5:53/udp`, `[::]:443/tcp`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            ValueError::new(format!(
                "{s:?} is not ADDR:PORT[/tcp|/udp] (e.g. 0.0.0.0:80, [::]:53/udp)"
            ))
        };
        let (socket, proto) = match s.rsplit_once('/') {
            Some((socket, proto)) => (socket, proto.parse()?),
            None => (s, Proto::Tcp),
        };
        if let Some((addr, port)) = socket.rsplit_once(':') {
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            if addr.parse::<IpAddr>().is_ok() {
                parse_port(port).map_err(ValueError::new)?;
            }
        }
        let socket: SocketAddr = socket.parse().map_err(|_| usage())?;
        Ok(Self {
            addr: socket.ip(),
            port: socket.port(),
            proto,
        })
    }
}

impl fmt::Display for Listen {
    /// Always with the protocol, so that it parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

impl FromStr for Proto {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(ValueError::new(format!(
                "protocol {s:?} is neither tcp nor udp"
            ))),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A `family` value as the config file spells it (`Family::config_name`).
pub fn parse_family(s: &str) -> Result<Family, ValueError> {
    [Family::V4, Family::V6]
        .into_iter()
        .find(|f| f.config_name() == s)
        .ok_or_else(|| ValueError::new(format!("family {s:?} is neither ipv4 nor ipv6")))
}

impl FromStr for AttachMode {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AttachMode::Auto),
            "xdp" => Ok(AttachMode::Xdp),
            "tc" => Ok(AttachMode::Tc),
            _ => Err(ValueError::new(format!(
                "attach mode {s:?} is not auto, xdp or tc"
            ))),
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Xdp => "xdp",
            AttachMode::Tc => "tc",
        })
    }
}

impl FromStr for BackendsConfig {
    type Err = ValueError;

    /// `NAME:PORT`, e.g. `tasks.web:80`; every other setting at its default
    /// (family `ipv4` here: [`ServiceConfig::new`] aligns it with `listen`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || ValueError::new(format!("{s:?} is not NAME:PORT (e.g. tasks.web:80)"));
        let (name, port) = s.rsplit_once(':').ok_or_else(usage)?;
        let name_part = name.trim_start_matches('[').trim_end_matches(']');
        if name_part.parse::<IpAddr>().is_ok() {
            return Err(ValueError::new(format!(
                "{name_part} is an address, not a DNS name: xdplb finds the tasks by resolving a \
                 name again and again (Swarm's `tasks.<service>`, e.g. tasks.web:{port}); a \
                 literal address would be sent to DNS as a name"
            )));
        }
        let port = parse_port(port).map_err(ValueError::new)?;
        check_dns_name(name).map_err(|reason| ValueError::new(format!("{name:?}: {reason}")))?;
        Ok(Self::new(name, port))
    }
}

impl fmt::Display for BackendsConfig {
    /// `NAME:PORT`; the other settings are not part of this form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

impl FromStr for CheckKind {
    type Err = ValueError;

    /// `tcp`, `none`, `http:/PATH` (or `http`, meaning `http:/`); HTTP checks
    /// expect status 200.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let http = |path: &str| {
            check_http_path(path).map_err(ValueError::new)?;
            Ok(CheckKind::Http {
                path: path.to_owned(),
                expect_status: DEFAULT_EXPECT_STATUS,
            })
        };
        match s {
            "none" => Ok(CheckKind::None),
            "tcp" => Ok(CheckKind::Tcp),
            "http" => http("/"),
            _ => match s.strip_prefix("http:") {
                Some(path) => http(path),
                None => Err(ValueError::new(format!(
                    "check {s:?} is not tcp, http:/PATH or none"
                ))),
            },
        }
    }
}

impl fmt::Display for CheckKind {
    /// `none`, `tcp` or `http:/PATH` (the expected status is not shown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::None => f.write_str("none"),
            CheckKind::Tcp => f.write_str("tcp"),
            CheckKind::Http { path, .. } => write!(f, "http:{path}"),
        }
    }
}

/// `LO-HI` (inclusive) or a single port.
fn parse_port_range(s: &str) -> Result<(u16, u16), ValueError> {
    let usage = || {
        ValueError::new(format!(
            "{s:?} is not a port range LO-HI (e.g. 20000-29999)"
        ))
    };
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo = lo.trim().parse().map_err(|_| usage())?;
    let hi = hi.trim().parse().map_err(|_| usage())?;
    Ok((lo, hi))
}

fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    humantime::parse_duration(s).map_err(|e| {
        ValueError::new(format!(
            "{e} (write durations like \"500ms\", \"30s\", \"1h\")"
        ))
    })
}

fn parse_ip(s: &str) -> Result<IpAddr, ValueError> {
    s.parse()
        .map_err(|_| ValueError::new(format!("{s:?} is not an IP address")))
}

fn parse_socket(s: &str) -> Result<SocketAddr, ValueError> {
    parse_nameserver(s).map_err(ValueError::new)
}

/// A nameserver: `ADDR:PORT`, or a bare address meaning port 53. Also the
/// parser of `--nameserver`.
pub fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    if let Some((addr, port)) = s.rsplit_once(':') {
        if addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
        {
            let port = parse_port(port).map_err(|e| format!("{s:?}: {e}"))?;
            return s
                .parse::<SocketAddr>()
                .map(|a| SocketAddr::new(a.ip(), port))
                .map_err(|_| {
                    format!("{s:?}: write an IPv6 address in brackets, e.g. [fd00::53]:53")
                });
        }
    }
    Err(format!(
        "{s:?} is not an IP address with an optional port (e.g. 127.0.0.11, 127.0.0.11:53, \
         [fd00::53]:53); a nameserver is given by address, not by name"
    ))
}

/// A port number with an error that says what is wrong with it.
fn parse_port(p: &str) -> Result<u16, String> {
    // 0 parses: the checks of the whole service say why it is refused.
    match p.parse::<u64>() {
        Ok(n) => u16::try_from(n).map_err(|_| format!("port {n} is out of range (1 to 65535)")),
        Err(_) => Err(format!("{p:?} is not a port number (1 to 65535)")),
    }
}

// ---- errors -----------------------------------------------------------------------

/// A place in the configuration: a file (or `command line`) and, when known,
/// the line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File name, or `command line (--flag)`.
    pub source: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}

/// Why a configuration was rejected. Every message starts with the
/// [`Location`] (`file:line:column`) and names the service and key involved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    /// The reason is part of the message and not an error `source`, so a
    /// printed chain says it once.
    #[error("cannot read configuration file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Not valid TOML, a value of the wrong type, or a required key missing.
    #[error("{at}: {message}")]
    Syntax {
        /// Where the TOML parser stopped.
        at: Location,
        /// The parser's message.
        message: String,
    },
    /// A key this version does not know (often a typo).
    #[error("{at}: unknown key `{key}`; {expected}")]
    UnknownKey {
        /// Where the key is.
        at: Location,
        /// The key as written.
        key: String,
        /// The keys that are allowed there.
        expected: String,
    },
    /// A value that does not parse or is out of its range.
    #[error("{at}: {}invalid `{key}` = {value:?}: {reason}", scope(.service))]
    InvalidValue {
        /// Where the value is.
        at: Location,
        /// The service, if the key belongs to one.
        service: Option<String>,
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `interfaces` is empty.
    #[error("{at}: `interfaces` is empty: name at least one interface to attach to")]
    NoInterfaces {
        /// Where `interfaces` is.
        at: Location,
    },
    /// An interface is named twice.
    #[error("{at}: interface {name:?} is listed twice in `interfaces`")]
    DuplicateInterface {
        /// Where `interfaces` is.
        at: Location,
        /// The interface.
        name: String,
    },
    /// An interface does not exist on this host.
    #[error(
        "{at}: interface {name:?} (in `interfaces`) does not exist in this network namespace; \
         present: {}", present.join(", ")
    )]
    UnknownInterface {
        /// Where `interfaces` is.
        at: Location,
        /// The missing interface.
        name: String,
        /// The interfaces that exist.
        present: Vec<String>,
    },
    /// No `[[service]]` at all.
    #[error("{at}: no service defined: add a [[service]] block with `listen` and `backends`")]
    NoServices {
        /// The file.
        at: Location,
    },
    /// More services than the data plane has ids for.
    #[error("{at}: {count} services defined; at most {max} are supported")]
    TooManyServices {
        /// The file.
        at: Location,
        /// How many there are.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Two services with the same name.
    #[error(
        "{at}: service name {name:?} is already used by the service at {first}; \
         set a distinct `name` on one of them"
    )]
    DuplicateName {
        /// Where the second one is.
        at: Location,
        /// The name.
        name: String,
        /// Where the first one is.
        first: Location,
    },
    /// Two services would receive the same packets.
    #[error(
        "{at}: service {service:?}: `listen` = {listen} clashes with service {other:?} \
         (`listen` = {other_listen} at {other_at}){}",
        clash_hint(.listen, .other_listen)
    )]
    ListenerClash {
        /// Where the second service's `listen` is.
        at: Location,
        /// The second service.
        service: String,
        /// Its listener.
        listen: Listen,
        /// The first service.
        other: String,
        /// Its listener.
        other_listen: Listen,
        /// Where the first service's `listen` is.
        other_at: Location,
    },
    /// A port of 0 where a real port is needed.
    #[error("{at}: service {service:?}: `{key}` has port 0; give a port from 1 to 65535")]
    PortZero {
        /// Where the key is.
        at: Location,
        /// The service.
        service: String,
        /// `listen`, `backends`, `nameserver` or `check_port`.
        key: &'static str,
    },
    /// `family` or `snat_addr` of the other family than `listen`.
    #[error(
        "{at}: service {service:?}: `{key}` = {value} is not of the same family as \
         `listen` = {listen}; the data plane does not translate between IPv4 and IPv6"
    )]
    FamilyMismatch {
        /// Where the key is.
        at: Location,
        /// The service.
        service: String,
        /// `family` or `snat_addr`.
        key: &'static str,
        /// Its value.
        value: String,
        /// The service's listener.
        listen: Listen,
    },
    /// A duration below its minimum.
    #[error(
        "{at}: {}`{key}` = {} is too short; the minimum is {}",
        scope(.service), humantime::format_duration(*.value), humantime::format_duration(*.min)
    )]
    DurationTooShort {
        /// Where the key is.
        at: Location,
        /// The service, if the key belongs to one.
        service: Option<String>,
        /// The key.
        key: &'static str,
        /// The value.
        value: Duration,
        /// The minimum.
        min: Duration,
    },
    /// A count that must be at least 1 is 0.
    #[error("{at}: service {service:?}: `{key}` must be at least 1")]
    ZeroCount {
        /// Where the key is.
        at: Location,
        /// The service.
        service: String,
        /// `rise`, `fall` or `empty_polls`.
        key: &'static str,
    },
    /// A check timeout that does not fit in the check interval.
    #[error(
        "{at}: service {service:?}: `check_timeout` = {} must be shorter than \
         `check_interval` = {}",
        humantime::format_duration(*.timeout), humantime::format_duration(*.interval)
    )]
    CheckTimeout {
        /// Where `check_timeout` is.
        at: Location,
        /// The service.
        service: String,
        /// The timeout.
        timeout: Duration,
        /// The interval.
        interval: Duration,
    },
    /// A Maglev table size that is not a prime of at least 3.
    #[error(
        "{at}: service {service:?}: `maglev_size` = {size} is not a prime of at least 3 \
         (Maglev needs a prime table size); use {suggestion}"
    )]
    MaglevSize {
        /// Where `maglev_size` is.
        at: Location,
        /// The service.
        service: String,
        /// The size given.
        size: u32,
        /// The next prime above it.
        suggestion: u32,
    },
    /// A SNAT range that is empty or includes port 0.
    #[error(
        "{at}: service {service:?}: `snat_ports` = \"{lo}-{hi}\" is not a range of ports: \
         write LO-HI with 1 <= LO <= HI"
    )]
    SnatRange {
        /// Where `snat_ports` is.
        at: Location,
        /// The service.
        service: String,
        /// Low end as given.
        lo: u16,
        /// High end as given.
        hi: u16,
    },
    /// A listener inside the SNAT port span, where packets to it would be
    /// taken for replies and never reach the service.
    #[error(
        "{at}: service {service:?}: `listen` port {port} lies inside the SNAT ports \
         {}-{} (all services' `snat_ports` together), so packets to it would be taken for \
         replies to the balancer; move `snat_ports` away from it",
        span.0, span.1
    )]
    ListenInSnatRange {
        /// Where `listen` is.
        at: Location,
        /// The service.
        service: String,
        /// The listen port.
        port: u16,
        /// Lowest and highest SNAT port of all services.
        span: (u16, u16),
    },
    /// A SNAT range overlapping the host's ephemeral ports.
    #[error(
        "{at}: service {service:?}: `snat_ports` = \"{}-{}\" overlaps this host's \
         net.ipv4.ip_local_port_range {}-{}, the source ports of the host's own connections \
         (health checks, DNS); choose `snat_ports` outside {}-{} (e.g. the default {}-{}), or \
         move the ephemeral range with `sysctl -w net.ipv4.ip_local_port_range=\"LO HI\"` so it \
         excludes {}-{}",
        snat.0, snat.1, ephemeral.0, ephemeral.1, ephemeral.0, ephemeral.1,
        DEFAULT_SNAT_PORTS.0, DEFAULT_SNAT_PORTS.1, snat.0, snat.1
    )]
    SnatOverlapsEphemeral {
        /// Where `snat_ports` is (or the service, when it is the default).
        at: Location,
        /// The service.
        service: String,
        /// Its SNAT range.
        snat: (u16, u16),
        /// `net.ipv4.ip_local_port_range`.
        ephemeral: (u16, u16),
    },
}

fn scope(service: &Option<String>) -> String {
    match service {
        Some(name) => format!("service {name:?}: "),
        None => String::new(),
    }
}

fn clash_hint(a: &Listen, b: &Listen) -> &'static str {
    if a.addr != b.addr {
        "; a wildcard address (0.0.0.0 or [::]) covers every local address"
    } else {
        ""
    }
}

fn invalid(
    at: Location,
    service: Option<String>,
    key: &'static str,
    value: &str,
    reason: impl fmt::Display,
) -> ConfigError {
    ConfigError::InvalidValue {
        at,
        service,
        key,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

/// Where a [`Config`] or [`ServiceConfig`] was written: the file name (or the
/// command line) and the line and column of each key, so that errors found
/// after parsing can point into the file.
///
/// It is metadata, not configuration: every `Origin` compares equal to every
/// other (as `toml::Spanned` compares only its value), so a configuration
/// read from a file equals the same configuration given on the command line.
#[derive(Debug, Clone)]
pub struct Origin {
    source: Arc<str>,
    command_line: bool,
    /// Line and column of the `[[service]]` header or of the document.
    block: Option<(usize, usize)>,
    keys: BTreeMap<&'static str, (usize, usize)>,
}

impl Default for Origin {
    /// For configurations built in code: no file, no lines.
    fn default() -> Self {
        Self {
            source: Arc::from("<config>"),
            command_line: false,
            block: None,
            keys: BTreeMap::new(),
        }
    }
}

impl PartialEq for Origin {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Origin {
    fn file(source: Arc<str>, block: Option<(usize, usize)>) -> Self {
        Self {
            source,
            command_line: false,
            block,
            keys: BTreeMap::new(),
        }
    }

    fn command_line() -> Self {
        Self {
            source: Arc::from("command line"),
            command_line: true,
            ..Self::default()
        }
    }

    /// The file name, `command line`, or `<config>` for configurations built
    /// in code.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where `key` was written: its line, else the line of its block, else
    /// just the source. On the command line, the flag that set it.
    pub fn at(&self, key: &str) -> Location {
        if self.command_line {
            let flag = match key {
                "interfaces" => Some("--iface"),
                "attach" => Some("--attach"),
                "listen" | "name" => Some("--listen"),
                "backends" | "family" => Some("--backends"),
                "nameserver" => Some("--nameserver"),
                "check" => Some("--check"),
                _ => None,
            };
            let source = match flag {
                Some(flag) => format!("{} ({flag})", self.source),
                None => self.source.to_string(),
            };
            return Location {
                source,
                line: None,
                column: None,
            };
        }
        let pos = self.keys.get(key).copied().or(self.block);
        Location {
            source: self.source.to_string(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
        }
    }

    /// The source as a whole, without a line.
    fn whole(&self) -> Location {
        Location {
            source: self.source.to_string(),
            line: None,
            column: None,
        }
    }
}

/// Line and column (1-based; the column counts characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = text
        .get(start..offset)
        .map_or(offset - start, |s| s.chars().count())
        + 1;
    (line, column)
}

fn syntax_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            Location {
                source: file.to_owned(),
                line: Some(line),
                column: Some(column),
            }
        }
        None => Location {
            source: file.to_owned(),
            line: None,
            column: None,
        },
    };
    let message = e.message().trim_end();
    if let Some(better) = e
        .span()
        .and_then(|span| typed_value_error(text, span.start, message))
    {
        return ConfigError::Syntax {
            at,
            message: better,
        };
    }
    // serde's wording for `deny_unknown_fields`: "unknown field `x`, expected ...".
    if let Some((key, rest)) = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split_once('`'))
    {
        let expected = rest.trim_start_matches(',').trim();
        return ConfigError::UnknownKey {
            at,
            key: key.to_owned(),
            expected: expected.to_owned(),
        };
    }
    // serde's wording for a missing required key: "missing field `x`".
    let message = message.replace("missing field `", "missing key `");
    ConfigError::Syntax { at, message }
}

/// Keys whose value is a duration string.
const DURATION_KEYS: &[&str] = &[
    "interval",
    "check_interval",
    "check_timeout",
    "drain_timeout",
    "tcp_timeout",
    "closing_timeout",
    "udp_timeout",
];

/// A value of the wrong type, said in terms of the key: serde reports
/// `invalid type: string "two", expected u32` at the value's position, so
/// the key is what precedes the `=` on that line.
fn typed_value_error(text: &str, at: usize, message: &str) -> Option<String> {
    let before = text.get(..at)?;
    let line = before.rsplit('\n').next()?;
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        return None;
    }
    let found = |m: &str| {
        m.split_once(", expected")
            .map(|(f, _)| f.trim().to_owned())
            .unwrap_or_default()
    };
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        let found = found(rest).replace('`', "");
        if DURATION_KEYS.contains(&key) {
            return Some(format!(
                "`{key}` must be a duration in quotes, like \"1s\", \"500ms\" or \"2m\" (found \
                 {found})"
            ));
        }
        if rest.ends_with("expected a string") {
            return Some(format!(
                "`{key}` must be a string in quotes (found {found})"
            ));
        }
        if rest.contains("expected u") || rest.contains("expected i") {
            return Some(format!("`{key}` must be a whole number (found {found})"));
        }
        return Some(format!("`{key}`: {message}"));
    }
    if let Some(rest) = message.strip_prefix("invalid value: integer `") {
        let n = rest.split('`').next().unwrap_or_default();
        let range = if rest.ends_with("expected u16") {
            if key.ends_with("port") {
                "a port is 1 to 65535"
            } else {
                "at most 65535"
            }
        } else if rest.ends_with("expected u32") {
            "at most 4294967295"
        } else {
            return Some(format!("`{key}`: {message}"));
        };
        return Some(format!("`{key}` = {n} is out of range ({range})"));
    }
    None
}

// ---- the file format --------------------------------------------------------------

/// The file as written. Values with their own syntax stay strings here and
/// are parsed by [`Converter`], so the error names the key and its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Spanned<Vec<String>>,
    attach: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    conntrack: Option<RawConntrack>,
    flow_hash_secret: Option<Spanned<String>>,
    backend_slots: Option<Spanned<u32>>,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    capacity: Option<Spanned<u32>>,
    tcp_timeout: Option<Spanned<String>>,
    closing_timeout: Option<Spanned<String>>,
    udp_timeout: Option<Spanned<String>>,
    unanswered_capacity: Option<Spanned<u32>>,
    unanswered_timeout: Option<Spanned<String>>,
    flood_new_flows_per_second: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Spanned<String>>,
    listen: Spanned<String>,
    backends: Spanned<String>,
    nameserver: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    family: Option<Spanned<String>>,
    empty_polls: Option<Spanned<u32>>,
    check: Option<Spanned<String>>,
    check_interval: Option<Spanned<String>>,
    check_timeout: Option<Spanned<String>>,
    check_port: Option<Spanned<u16>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    expect_status: Option<Spanned<u16>>,
    drain_timeout: Option<Spanned<String>>,
    maglev_size: Option<Spanned<u32>>,
    snat_ports: Option<Spanned<String>>,
    snat_addr: Option<Spanned<String>>,
    max_backends: Option<Spanned<u32>>,
}

/// Turns the raw file into the model, recording where each key was.
struct Converter<'a> {
    file: Arc<str>,
    text: &'a str,
}

impl Converter<'_> {
    fn pos<T>(&self, v: &Spanned<T>) -> (usize, usize) {
        line_col(self.text, v.span().start)
    }

    fn note<T>(&self, origin: &mut Origin, key: &'static str, v: &Option<Spanned<T>>) {
        if let Some(v) = v {
            origin.keys.insert(key, self.pos(v));
        }
    }

    /// Parses `v` with `parse`; a failure names `key`, its line and `service`.
    fn parse<T>(
        &self,
        origin: &Origin,
        service: &Option<String>,
        key: &'static str,
        v: &Spanned<String>,
        parse: impl FnOnce(&str) -> Result<T, ValueError>,
    ) -> Result<T, ConfigError> {
        parse(v.get_ref())
            .map_err(|e| invalid(origin.at(key), service.clone(), key, v.get_ref(), e))
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut origin = Origin::file(self.file.clone(), Some((1, 1)));
        origin.keys.insert("interfaces", self.pos(&raw.interfaces));
        self.note(&mut origin, "attach", &raw.attach);
        self.note(&mut origin, "pin_dir", &raw.pin_dir);
        self.note(&mut origin, "backend_slots", &raw.backend_slots);
        let attach = match &raw.attach {
            Some(v) => self.parse(&origin, &None, "attach", v, str::parse)?,
            None => AttachMode::default(),
        };
        let pin_dir = raw.pin_dir.map_or_else(
            || PathBuf::from(DEFAULT_PIN_DIR),
            |v| PathBuf::from(v.into_inner()),
        );
        let mut conntrack = ConntrackConfig::default();
        if let Some(ct) = raw.conntrack {
            self.note(&mut origin, "conntrack.capacity", &ct.capacity);
            self.note(&mut origin, "conntrack.tcp_timeout", &ct.tcp_timeout);
            self.note(
                &mut origin,
                "conntrack.closing_timeout",
                &ct.closing_timeout,
            );
            self.note(&mut origin, "conntrack.udp_timeout", &ct.udp_timeout);
            self.note(
                &mut origin,
                "conntrack.unanswered_capacity",
                &ct.unanswered_capacity,
            );
            self.note(
                &mut origin,
                "conntrack.unanswered_timeout",
                &ct.unanswered_timeout,
            );
            self.note(
                &mut origin,
                "conntrack.flood_new_flows_per_second",
                &ct.flood_new_flows_per_second,
            );
            if let Some(v) = ct.capacity {
                conntrack.capacity = v.into_inner();
            }
            if let Some(v) = ct.unanswered_capacity {
                conntrack.unanswered_capacity = v.into_inner();
            }
            if let Some(v) = ct.flood_new_flows_per_second {
                conntrack.flood_new_flows_per_second = v.into_inner();
            }
            for (key, v, slot) in [
                (
                    "conntrack.tcp_timeout",
                    &ct.tcp_timeout,
                    &mut conntrack.tcp_timeout,
                ),
                (
                    "conntrack.closing_timeout",
                    &ct.closing_timeout,
                    &mut conntrack.closing_timeout,
                ),
                (
                    "conntrack.udp_timeout",
                    &ct.udp_timeout,
                    &mut conntrack.udp_timeout,
                ),
                (
                    "conntrack.unanswered_timeout",
                    &ct.unanswered_timeout,
                    &mut conntrack.unanswered_timeout,
                ),
            ] {
                if let Some(v) = v {
                    *slot = self.parse(&origin, &None, key, v, parse_duration)?;
                }
            }
        }
        self.note(&mut origin, "flow_hash_secret", &raw.flow_hash_secret);
        let flow_hash_secret = match &raw.flow_hash_secret {
            // The value stays out of the error message.
            Some(v) => Some(v.get_ref().parse().map_err(|e| {
                invalid(
                    origin.at("flow_hash_secret"),
                    None,
                    "flow_hash_secret",
                    "(hidden)",
                    e,
                )
            })?),
            None => None,
        };
        let services = raw
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.service(i, s))
            .collect::<Result<_, _>>()?;
        Ok(Config {
            interfaces: raw.interfaces.into_inner(),
            attach,
            pin_dir,
            conntrack,
            flow_hash_secret,
            backend_slots: raw
                .backend_slots
                .map_or(MAX_BACKEND_SLOTS, Spanned::into_inner),
            services,
            origin,
        })
    }

    fn service(
        &self,
        index: usize,
        raw: Spanned<RawService>,
    ) -> Result<ServiceConfig, ConfigError> {
        let mut origin = Origin::file(self.file.clone(), Some(self.pos(&raw)));
        let raw = raw.into_inner();
        origin.keys.insert("listen", self.pos(&raw.listen));
        origin.keys.insert("backends", self.pos(&raw.backends));
        self.note(&mut origin, "name", &raw.name);
        self.note(&mut origin, "nameserver", &raw.nameserver);
        self.note(&mut origin, "interval", &raw.interval);
        self.note(&mut origin, "family", &raw.family);
        self.note(&mut origin, "empty_polls", &raw.empty_polls);
        self.note(&mut origin, "check", &raw.check);
        self.note(&mut origin, "check_interval", &raw.check_interval);
        self.note(&mut origin, "check_timeout", &raw.check_timeout);
        self.note(&mut origin, "check_port", &raw.check_port);
        self.note(&mut origin, "rise", &raw.rise);
        self.note(&mut origin, "fall", &raw.fall);
        self.note(&mut origin, "expect_status", &raw.expect_status);
        self.note(&mut origin, "drain_timeout", &raw.drain_timeout);
        self.note(&mut origin, "maglev_size", &raw.maglev_size);
        self.note(&mut origin, "snat_ports", &raw.snat_ports);
        self.note(&mut origin, "snat_addr", &raw.snat_addr);
        self.note(&mut origin, "max_backends", &raw.max_backends);

        // The name errors will carry, before the real one is known.
        let label = Some(
            match (&raw.name, raw.backends.get_ref().parse::<BackendsConfig>()) {
                (Some(name), _) => name.get_ref().clone(),
                (None, Ok(b)) => derive_name(&b.name),
                (None, Err(_)) => format!("#{}", index + 1),
            },
        );
        let listen = self.parse(&origin, &label, "listen", &raw.listen, str::parse)?;
        let backends = self.parse(&origin, &label, "backends", &raw.backends, str::parse)?;
        let mut s = ServiceConfig::new(listen, backends);
        if let Some(v) = raw.name {
            s.name = v.into_inner();
        }
        let label = Some(s.name.clone());
        let duration = |key, v: &Option<Spanned<String>>, slot: &mut Duration| {
            if let Some(v) = v {
                *slot = self.parse(&origin, &label, key, v, parse_duration)?;
            }
            Ok::<_, ConfigError>(())
        };
        duration("interval", &raw.interval, &mut s.backends.interval)?;
        duration("check_interval", &raw.check_interval, &mut s.check.interval)?;
        duration("check_timeout", &raw.check_timeout, &mut s.check.timeout)?;
        duration("drain_timeout", &raw.drain_timeout, &mut s.drain_timeout)?;
        if let Some(v) = &raw.nameserver {
            s.backends.nameserver = self.parse(&origin, &label, "nameserver", v, parse_socket)?;
        }
        if let Some(v) = &raw.family {
            s.backends.family = self.parse(&origin, &label, "family", v, parse_family)?;
        }
        if let Some(v) = raw.empty_polls {
            s.backends.empty_polls = v.into_inner();
        }
        if let Some(v) = &raw.check {
            s.check.kind = self.parse(&origin, &label, "check", v, str::parse)?;
        }
        if let Some(v) = raw.expect_status {
            match &mut s.check.kind {
                CheckKind::Http { expect_status, .. } => *expect_status = *v.get_ref(),
                other => {
                    let reason = format!("only HTTP checks have a status, and `check` is {other}");
                    let value = v.get_ref().to_string();
                    return Err(invalid(
                        origin.at("expect_status"),
                        label,
                        "expect_status",
                        &value,
                        reason,
                    ));
                }
            }
        }
        if let Some(v) = raw.check_port {
            s.check.port = Some(v.into_inner());
        }
        if let Some(v) = raw.rise {
            s.check.rise = v.into_inner();
        }
        if let Some(v) = raw.fall {
            s.check.fall = v.into_inner();
        }
        if let Some(v) = raw.maglev_size {
            s.maglev_size = v.into_inner();
        }
        if let Some(v) = &raw.snat_ports {
            s.snat.ports = self.parse(&origin, &label, "snat_ports", v, parse_port_range)?;
        }
        if let Some(v) = &raw.snat_addr {
            s.snat.addr = Some(self.parse(&origin, &label, "snat_addr", v, parse_ip)?);
        }
        if let Some(v) = raw.max_backends {
            s.max_backends = Some(v.into_inner());
        }
        s.origin = origin;
        Ok(s)
    }
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
