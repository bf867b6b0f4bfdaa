//! The TOML file format: the raw tables serde reads, and their conversion
//! into the model with every key's position kept.

#![expect(
    clippy::result_large_err,
    reason = "a ConfigError is built at most once, at startup; its size costs nothing, and \
              plain fields keep matching on the variants simple"
)]

use toml::de::{DeTable, DeValue};

use super::*;

/// The file as written, read from the parsed document key by key
/// ([`RawConfig::read`]): every key is checked against those its table
/// allows and every value against its type, so each error names the key,
/// its line and what was meant. Values with their own syntax stay strings
/// here and are parsed by [`Converter`].
pub(super) struct RawConfig {
    interfaces: Spanned<Vec<String>>,
    attach: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    conntrack: Option<RawConntrack>,
    flow_hash_secret: Option<Spanned<String>>,
    backend_slots: Option<Spanned<u32>>,
    services: Vec<Spanned<RawService>>,
}

pub(super) struct RawConntrack {
    capacity: Option<Spanned<u32>>,
    tcp_timeout: Option<Spanned<String>>,
    closing_timeout: Option<Spanned<String>>,
    udp_timeout: Option<Spanned<String>>,
    unanswered_capacity: Option<Spanned<u32>>,
    unanswered_timeout: Option<Spanned<String>>,
    flood_new_flows_per_second: Option<Spanned<u32>>,
}

pub(super) struct RawService {
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

pub(super) const ROOT_KEYS: &[&str] = &[
    "interfaces",
    "attach",
    "pin_dir",
    "conntrack",
    "flow_hash_secret",
    "backend_slots",
    "service",
];
pub(super) const CONNTRACK_KEYS: &[&str] = &[
    "capacity",
    "tcp_timeout",
    "closing_timeout",
    "udp_timeout",
    "unanswered_capacity",
    "unanswered_timeout",
    "flood_new_flows_per_second",
];
pub(super) const SERVICE_KEYS: &[&str] = &[
    "name",
    "listen",
    "backends",
    "nameserver",
    "interval",
    "family",
    "empty_polls",
    "check",
    "check_interval",
    "check_timeout",
    "check_port",
    "rise",
    "fall",
    "expect_status",
    "drain_timeout",
    "maglev_size",
    "snat_ports",
    "snat_addr",
    "max_backends",
];

/// How a duration is written, for the message when it is not.
const DURATION: &str = "a duration in quotes, like \"1s\", \"500ms\" or \"2m\"";

/// One table of the document, with where it starts.
struct Table<'t, 'i> {
    text: &'t str,
    file: &'t str,
    entries: &'t DeTable<'i>,
    at: usize,
}

impl<'t, 'i> Table<'t, 'i> {
    /// Fails on the first key that is not in `allowed`.
    fn new(
        text: &'t str,
        file: &'t str,
        entries: &'t DeTable<'i>,
        at: usize,
        allowed: &[&str],
    ) -> Result<Self, ConfigError> {
        let t = Self {
            text,
            file,
            entries,
            at,
        };
        if let Some((key, _)) = entries
            .iter()
            .find(|(k, _)| !allowed.contains(&k.get_ref().as_ref()))
        {
            let expected = allowed
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ConfigError::UnknownKey {
                at: t.location(key.span().start),
                key: key.get_ref().to_string(),
                expected: format!("expected one of {expected}"),
            });
        }
        Ok(t)
    }

    fn location(&self, offset: usize) -> Location {
        Location::in_text(self.file, self.text, offset)
    }

    /// A value of the wrong type or out of range, said in terms of its key.
    fn wrong(&self, key: &str, v: &Spanned<DeValue<'_>>, what: String) -> ConfigError {
        ConfigError::Syntax {
            at: self.location(v.span().start),
            message: format!("`{key}` {what}"),
        }
    }

    fn get(&self, key: &str) -> Option<&'t Spanned<DeValue<'i>>> {
        self.entries.get(key)
    }

    fn require<T>(&self, key: &str, v: Option<T>) -> Result<T, ConfigError> {
        v.ok_or_else(|| ConfigError::Syntax {
            at: self.location(self.at),
            message: format!("missing key `{key}`"),
        })
    }

    /// A string; `what` says what it should be when it is not one.
    fn string(&self, key: &str, what: &str) -> Result<Option<Spanned<String>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.get_ref().as_str() {
            Some(s) => Ok(Some(Spanned::new(v.span(), s.to_owned()))),
            None => Err(self.wrong(key, v, format!("must be {what} (found {})", found(v)))),
        }
    }

    fn text(&self, key: &str) -> Result<Option<Spanned<String>>, ConfigError> {
        self.string(key, "a string in quotes")
    }

    fn duration(&self, key: &str) -> Result<Option<Spanned<String>>, ConfigError> {
        self.string(key, DURATION)
    }

    /// A whole number that fits `T`; `range` says which do.
    fn whole<T: TryFrom<i128>>(
        &self,
        key: &str,
        range: &str,
    ) -> Result<Option<Spanned<T>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Some(n) = v.get_ref().as_integer() else {
            return Err(self.wrong(
                key,
                v,
                format!("must be a whole number (found {})", found(v)),
            ));
        };
        i128::from_str_radix(n.as_str(), n.radix())
            .ok()
            .and_then(|n| T::try_from(n).ok())
            .map(|n| Some(Spanned::new(v.span(), n)))
            .ok_or_else(|| self.wrong(key, v, format!("= {n} is out of range ({range})")))
    }

    fn u32(&self, key: &str) -> Result<Option<Spanned<u32>>, ConfigError> {
        self.whole(key, "at most 4294967295")
    }

    fn u16(&self, key: &str) -> Result<Option<Spanned<u16>>, ConfigError> {
        self.whole(key, "at most 65535")
    }

    fn port(&self, key: &str) -> Result<Option<Spanned<u16>>, ConfigError> {
        self.whole(key, "a port is 1 to 65535")
    }

    /// A list of strings.
    fn texts(&self, key: &str) -> Result<Option<Spanned<Vec<String>>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v.get_ref().as_array().and_then(|items| {
            items
                .iter()
                .map(|i| i.get_ref().as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        });
        match list {
            Some(list) => Ok(Some(Spanned::new(v.span(), list))),
            None => Err(self.wrong(
                key,
                v,
                format!(
                    "must be a list of strings in quotes, like [\"eth0\"] (found {})",
                    found(v)
                ),
            )),
        }
    }

    /// A sub-table (`[conntrack]`).
    fn table(&self, key: &str, allowed: &[&str]) -> Result<Option<Table<'t, 'i>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.get_ref().as_table() {
            Some(t) => Ok(Some(Table::new(
                self.text,
                self.file,
                t,
                v.span().start,
                allowed,
            )?)),
            None => Err(self.wrong(
                key,
                v,
                format!("must be a table, [{key}] (found {})", found(v)),
            )),
        }
    }

    /// An array of tables (`[[service]]`), each with where it starts.
    fn tables(&self, key: &str, allowed: &[&str]) -> Result<Vec<Table<'t, 'i>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let not_tables = || {
            self.wrong(
                key,
                v,
                format!("must be [[{key}]] tables (found {})", found(v)),
            )
        };
        let items = v.get_ref().as_array().ok_or_else(not_tables)?;
        items
            .iter()
            .map(|item| match item.get_ref().as_table() {
                Some(t) => Table::new(self.text, self.file, t, item.span().start, allowed),
                None => Err(not_tables()),
            })
            .collect()
    }
}

/// What a value is, for messages: `string "two"`, `integer 5`, `an array`.
fn found(v: &Spanned<DeValue<'_>>) -> String {
    match v.get_ref() {
        DeValue::String(s) => format!("string {s:?}"),
        DeValue::Integer(n) => format!("integer {n}"),
        DeValue::Float(f) => format!("float {}", f.as_str()),
        DeValue::Boolean(b) => format!("boolean {b}"),
        DeValue::Datetime(d) => format!("datetime {d}"),
        DeValue::Array(_) => "an array".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

impl RawConfig {
    /// Parses `text` and reads the document.
    pub(super) fn read(text: &str, file: &str) -> Result<Self, ConfigError> {
        let doc = DeTable::parse(text).map_err(|e| syntax_error(file, text, &e))?;
        let root = Table::new(text, file, doc.get_ref(), 0, ROOT_KEYS)?;
        let conntrack = root
            .table("conntrack", CONNTRACK_KEYS)?
            .map(|t| RawConntrack::read(&t))
            .transpose()?;
        let services = root
            .tables("service", SERVICE_KEYS)?
            .iter()
            .map(|t| {
                let span = t.at..t.at;
                RawService::read(t).map(|s| Spanned::new(span, s))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            interfaces: root.require("interfaces", root.texts("interfaces")?)?,
            attach: root.text("attach")?,
            pin_dir: root.text("pin_dir")?,
            conntrack,
            flow_hash_secret: root.text("flow_hash_secret")?,
            backend_slots: root.u32("backend_slots")?,
            services,
        })
    }
}

impl RawConntrack {
    fn read(t: &Table<'_, '_>) -> Result<Self, ConfigError> {
        Ok(Self {
            capacity: t.u32("capacity")?,
            tcp_timeout: t.duration("tcp_timeout")?,
            closing_timeout: t.duration("closing_timeout")?,
            udp_timeout: t.duration("udp_timeout")?,
            unanswered_capacity: t.u32("unanswered_capacity")?,
            unanswered_timeout: t.duration("unanswered_timeout")?,
            flood_new_flows_per_second: t.u32("flood_new_flows_per_second")?,
        })
    }
}

impl RawService {
    fn read(t: &Table<'_, '_>) -> Result<Self, ConfigError> {
        Ok(Self {
            name: t.text("name")?,
            listen: t.require("listen", t.text("listen")?)?,
            backends: t.require("backends", t.text("backends")?)?,
            nameserver: t.text("nameserver")?,
            interval: t.duration("interval")?,
            family: t.text("family")?,
            empty_polls: t.u32("empty_polls")?,
            check: t.text("check")?,
            check_interval: t.duration("check_interval")?,
            check_timeout: t.duration("check_timeout")?,
            check_port: t.port("check_port")?,
            rise: t.u32("rise")?,
            fall: t.u32("fall")?,
            expect_status: t.u16("expect_status")?,
            drain_timeout: t.duration("drain_timeout")?,
            maglev_size: t.u32("maglev_size")?,
            snat_ports: t.text("snat_ports")?,
            snat_addr: t.text("snat_addr")?,
            max_backends: t.u32("max_backends")?,
        })
    }
}

/// Turns the raw file into the model, recording where each key was.
pub(super) struct Converter<'a> {
    pub(super) file: Arc<str>,
    pub(super) text: &'a str,
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

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
