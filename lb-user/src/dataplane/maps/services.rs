//! The service maps of a [`DataPlane`]: `SERVICES`, and the two the data
//! plane reads beside it and every load rebuilds from it, `SERVICE_PORTS`
//! (the first filter) and `SERVICE_AT` (an established flow's way to its
//! service, `decide::still_at`).

use anyhow::{Context as _, Result};
use lb_common::{decide, Service, ServiceAt, ServiceKey, SERVICE_PORT_WORDS};

use super::DataPlane;

impl DataPlane {
    /// Adds or replaces a service. Its port's `SERVICE_PORTS` bit is set
    /// first, so a packet that can see the service also passes the filter.
    ///
    /// `SERVICE_AT` follows `SERVICES` so that an established flow's
    /// shortcut (`decide::still_at`) never names another service than the
    /// `SERVICES` lookup would: what makes the shortcut's answer differ
    /// (an id that leaves its key, a wildcard that an exact service now
    /// shadows) is written before `SERVICES` changes, and what lets the
    /// shortcut be taken (the new entry) after. In between, the flows take
    /// the lookup.
    pub fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<()> {
        self.set_service_port(key, true)?;
        if let Some(&old) = self.service_keys.get(key).filter(|&&id| id != svc.id) {
            self.clear_service_at(old)?;
        }
        let mut keys = self.service_keys.clone();
        keys.insert(*key, svc.id);
        self.reshadow(key, &keys)?;
        self.services
            .insert(key, svc, 0)
            .context("writing SERVICES")?;
        self.service_keys = keys;
        self.write_service_at(svc.id, &decide::service_at(key, self.service_keys.keys()))
    }

    /// Rewrites the `SERVICE_AT` entries of the wildcards that the exact
    /// service at `key` shadows, for the services at `keys`.
    fn reshadow(
        &mut self,
        key: &ServiceKey,
        keys: &std::collections::HashMap<ServiceKey, u32>,
    ) -> Result<()> {
        for (wildcard, &id) in keys {
            if decide::shadows(key, wildcard) {
                self.write_service_at(id, &decide::service_at(wildcard, keys.keys()))?;
            }
        }
        Ok(())
    }

    /// Writes a live `SERVICE_AT` entry. A new key goes in with its flags
    /// clear first, so a packet reading the slot during the write finds it
    /// not live (a map update is a plain copy, not atomic for readers);
    /// the flags, one byte, follow.
    fn write_service_at(&mut self, id: u32, at: &ServiceAt) -> Result<()> {
        if self.service_at(id)?.key != at.key {
            let quiet = ServiceAt { flags: 0, ..*at };
            self.service_at
                .set(id, quiet, 0)
                .with_context(|| format!("writing SERVICE_AT[{id}]"))?;
        }
        self.service_at
            .set(id, *at, 0)
            .with_context(|| format!("writing SERVICE_AT[{id}]"))
    }

    /// Marks the `SERVICE_AT` entry of `id` not live (its flags, one byte;
    /// the key stays): its flows take the `SERVICES` lookup.
    fn clear_service_at(&mut self, id: u32) -> Result<()> {
        let cur = self.service_at(id)?;
        self.service_at
            .set(id, ServiceAt { flags: 0, ..cur }, 0)
            .with_context(|| format!("writing SERVICE_AT[{id}]"))
    }

    /// `SERVICE_AT[id]`.
    pub fn service_at(&self, id: u32) -> Result<ServiceAt> {
        self.service_at
            .get(&id, 0)
            .with_context(|| format!("reading SERVICE_AT[{id}]"))
    }

    /// Sets or clears the `SERVICE_PORTS` bit of `key`'s protocol and port.
    fn set_service_port(&mut self, key: &ServiceKey, on: bool) -> Result<()> {
        let (word, bit) = lb_common::service_port_bit(key.proto, u16::from_be(key.port_be));
        debug_assert!(word < SERVICE_PORT_WORDS);
        let old = self
            .service_ports
            .get(&word, 0)
            .context("reading SERVICE_PORTS")?;
        let new = if on { old | bit } else { old & !bit };
        if new != old {
            self.service_ports
                .set(word, new, 0)
                .context("writing SERVICE_PORTS")?;
        }
        Ok(())
    }

    pub fn service(&self, key: &ServiceKey) -> Result<Option<Service>> {
        match self.services.get(key, 0) {
            Ok(s) => Ok(Some(s)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading SERVICES"),
        }
    }

    /// Removes a service; its port's `SERVICE_PORTS` bit is cleared after,
    /// unless another service (another address, the same port) keeps it.
    /// Its `SERVICE_AT` entry goes first and the wildcards it shadowed
    /// are unshadowed after (see `set_service`).
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        if let Some(&id) = self.service_keys.get(key) {
            self.clear_service_at(id)?;
        }
        self.services
            .remove(key)
            .context("removing from SERVICES")?;
        self.service_keys.remove(key);
        let keys = self.service_keys.clone();
        self.reshadow(key, &keys)?;
        let port = u16::from_be(key.port_be);
        let bit = lb_common::service_port_bit(key.proto, port);
        let shared = self
            .service_keys
            .keys()
            .any(|k| lb_common::service_port_bit(k.proto, u16::from_be(k.port_be)) == bit);
        if !shared {
            self.set_service_port(key, false)?;
        }
        Ok(())
    }

    /// Whether `SERVICE_PORTS` has the bit of this protocol and port.
    pub fn service_port_listed(&self, proto: u8, port: u16) -> Result<bool> {
        let (word, bit) = lb_common::service_port_bit(proto, port);
        let w = self
            .service_ports
            .get(&word, 0)
            .context("reading SERVICE_PORTS")?;
        Ok(w & bit != 0)
    }

    pub fn services(&self) -> Result<Vec<(ServiceKey, Service)>> {
        self.services
            .iter()
            .map(|r| r.context("iterating SERVICES"))
            .collect()
    }

    /// A new `SERVICE_PORTS` and `SERVICE_AT` (neither is pinned) for the
    /// services already pinned: at every load, a restart's included.
    pub(super) fn rebuild_service_maps(&mut self) -> Result<()> {
        for (key, svc) in self.services()? {
            self.set_service_port(&key, true)?;
            self.service_keys.insert(key, svc.id);
        }
        for (key, id) in self.service_keys.clone() {
            self.write_service_at(id, &decide::service_at(&key, self.service_keys.keys()))?;
        }
        Ok(())
    }
}
