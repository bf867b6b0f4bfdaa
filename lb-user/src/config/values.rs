//! Value syntax shared by the file and the command line: listen
//! addresses, protocols, families, durations, port ranges, backends and
//! checks.

use super::*;

/// A setting's value did not parse. The message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ValueError {
    pub(super) fn new(msg: impl Into<String>) -> Self {
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
pub(super) fn parse_port_range(s: &str) -> Result<(u16, u16), ValueError> {
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

pub(super) fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    humantime::parse_duration(s).map_err(|e| {
        ValueError::new(format!(
            "{e} (write durations like \"500ms\", \"30s\", \"1h\")"
        ))
    })
}

pub(super) fn parse_ip(s: &str) -> Result<IpAddr, ValueError> {
    s.parse()
        .map_err(|_| ValueError::new(format!("{s:?} is not an IP address")))
}

pub(super) fn parse_socket(s: &str) -> Result<SocketAddr, ValueError> {
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
pub(super) fn parse_port(p: &str) -> Result<u16, String> {
    // 0 parses: the checks of the whole service say why it is refused.
    match p.parse::<u64>() {
        Ok(n) => u16::try_from(n).map_err(|_| format!("port {n} is out of range (1 to 65535)")),
        Err(_) => Err(format!("{p:?} is not a port number (1 to 65535)")),
    }
}
