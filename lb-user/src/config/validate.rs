//! The model's behaviour: defaults filled in, consistency checked while
//! loading, and the checks against a [`HostFacts`].

#![expect(
    clippy::result_large_err,
    reason = "a ConfigError is built at most once, at startup; its size costs nothing, and \
              plain fields keep matching on the variants simple"
)]

use super::*;

impl Config {
    /// Parses a TOML configuration. `file` is only used in error messages
    /// (a path, or something like `"<stdin>"`). The result has passed
    /// [`Config::check_consistency`]; host checks are [`Config::validate`]'s.
    pub fn from_toml_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw = RawConfig::read(text, file)?;
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
pub(super) fn possible_cpus() -> u32 {
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

/// `web` for `tasks.web` (Docker's name for a service's task records), the
/// name itself otherwise; a trailing dot is ignored.
pub(super) fn derive_name(dns_name: &str) -> String {
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
pub(super) fn prime_suggestion(size: u32) -> u32 {
    (size.max(2).saturating_add(1)..=u32::MAX)
        .find(|&n| is_prime(n))
        .unwrap_or(4_294_967_291)
}

pub(super) fn check_interface_name(name: &str) -> Result<(), &'static str> {
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

pub(super) fn check_service_name(name: &str) -> Result<(), &'static str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        return Err("a service name has 1 to 64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

pub(super) fn check_dns_name(name: &str) -> Result<(), &'static str> {
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

pub(super) fn check_http_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') || !path.chars().all(|c| c.is_ascii_graphic()) {
        return Err(
            "an HTTP check path starts with '/' and has no spaces or control \
                    characters, e.g. http:/healthz",
        );
    }
    Ok(())
}
