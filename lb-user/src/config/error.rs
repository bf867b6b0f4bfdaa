//! What can be wrong with a configuration, and where: [`ConfigError`],
//! file positions ([`Location`], [`Origin`]) and the translation of TOML
//! errors into them.

use super::*;

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

impl Location {
    /// The position of byte `offset` of `text`, the contents of `file`.
    pub(super) fn in_text(file: &str, text: &str, offset: usize) -> Self {
        let (line, column) = line_col(text, offset);
        Self {
            source: file.to_owned(),
            line: Some(line),
            column: Some(column),
        }
    }
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

pub(super) fn scope(service: &Option<String>) -> String {
    match service {
        Some(name) => format!("service {name:?}: "),
        None => String::new(),
    }
}

pub(super) fn clash_hint(a: &Listen, b: &Listen) -> &'static str {
    if a.addr != b.addr {
        "; a wildcard address (0.0.0.0 or [::]) covers every local address"
    } else {
        ""
    }
}

pub(super) fn invalid(
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
    pub(super) keys: BTreeMap<&'static str, (usize, usize)>,
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
    pub(super) fn file(source: Arc<str>, block: Option<(usize, usize)>) -> Self {
        Self {
            source,
            command_line: false,
            block,
            keys: BTreeMap::new(),
        }
    }

    pub(super) fn command_line() -> Self {
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
    pub(super) fn whole(&self) -> Location {
        Location {
            source: self.source.to_string(),
            line: None,
            column: None,
        }
    }
}

/// Line and column (1-based; the column counts characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
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

/// A document the TOML parser rejects, with the parser's message.
pub(super) fn syntax_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = match e.span() {
        Some(span) => Location::in_text(file, text, span.start),
        None => Location {
            source: file.to_owned(),
            line: None,
            column: None,
        },
    };
    ConfigError::Syntax {
        at,
        message: e.message().trim_end().to_owned(),
    }
}
