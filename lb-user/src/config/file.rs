//! The TOML file format: the raw tables serde reads, and their conversion
//! into the model with every key's position kept.

#![expect(
    clippy::result_large_err,
    reason = "a ConfigError is built at most once, at startup; its size costs nothing, and \
              plain fields keep matching on the variants simple"
)]

use super::*;

/// The file as written. Values with their own syntax stay strings here and
/// are parsed by [`Converter`], so the error names the key and its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
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
pub(super) struct RawConntrack {
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
