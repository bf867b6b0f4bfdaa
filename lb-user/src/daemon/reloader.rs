//! Applying a reload [`Plan`](reload::Plan) to the running daemon:
//! services added, changed and removed without a dropped flow.

use super::*;

/// What applying a reload needs of the running daemon.
pub(super) struct ReloadCtx<'a> {
    pub(super) writer: &'a mut Writer,
    pub(super) services: &'a mut Vec<Svc>,
    pub(super) dirty: &'a mut Vec<bool>,
    pub(super) applied: &'a mut Vec<Instant>,
    pub(super) changed: &'a mut Vec<(usize, Vec<Transition>)>,
    pub(super) dns_tx: &'a mpsc::Sender<(usize, BTreeSet<IpAddr>)>,
    pub(super) tasks: &'a mut Vec<JoinHandle<()>>,
    pub(super) host: &'a HostAddrs,
    pub(super) http: &'a reqwest::Client,
    pub(super) health_tx: &'a mpsc::Sender<(usize, HealthEvent)>,
    pub(super) stop_rx: &'a watch::Receiver<bool>,
    pub(super) now: Instant,
}

impl ReloadCtx<'_> {
    fn index(&self, name: &str) -> Option<usize> {
        self.services
            .iter()
            .position(|s| !s.gone && s.retiring.is_none() && s.cfg.name == name)
    }

    /// Applies `plan` (from the running config to `new`). What can fail is
    /// done first and undone on failure, so a refused reload changes nothing.
    pub(super) fn apply(&mut self, plan: &crate::daemon::reload::Plan, new: &Config) -> Result<()> {
        // A removed service whose name comes back must be gone first.
        for s in &plan.added {
            if self
                .services
                .iter()
                .any(|o| !o.gone && o.retiring.is_some() && o.cfg.name == s.name)
            {
                bail!(
                    "service {} is still draining from an earlier reload; reload again once it \
                     is gone (its drain_timeout)",
                    s.name
                );
            }
        }
        let mut added: Vec<String> = Vec::new();
        for s in &plan.added {
            if let Err(e) = self.writer.add_service(&spec_of(s)) {
                for name in &added {
                    let _ = self.writer.remove_service(name);
                }
                return Err(e.context(format!("adding service {}", s.name)));
            }
            added.push(s.name.clone());
        }
        if plan.dataplane {
            if let Err(e) = write_config(self.writer.data_plane_mut(), new) {
                for name in &added {
                    let _ = self.writer.remove_service(name);
                }
                return Err(e.context("writing the data plane's CONFIG"));
            }
        }
        if plan.backend_slots {
            self.writer.set_backend_slots(new.backend_slots);
        }
        for s in &plan.added {
            let mut svc = Svc::new(s);
            let i = self.services.len();
            spawn_discovery(i, &mut svc, self.dns_tx, self.tasks);
            self.services.push(svc);
            self.dirty.push(false);
            self.applied.push(self.now - COALESCE);
        }
        for name in &plan.removed {
            let Some(i) = self.index(name) else { continue };
            let s = &mut self.services[i];
            if let Some(stop) = s.dns_stop.take() {
                let _ = stop.send(true);
            }
            s.retiring = Some(self.now);
            // As if the service's tasks left DNS: the ones in rotation drain
            // (established flows finish, no new ones), the rest go.
            let port = s.cfg.backends.port;
            let t = s
                .tracker
                .on_dns(&BTreeSet::new(), port, self.now.into_std());
            self.changed.push((i, t));
            self.dirty[i] = true;
        }
        for (c, new_cfg) in &plan.changed {
            let Some(i) = self.index(&c.name) else {
                continue;
            };
            if c.snat || c.maglev {
                if let Err(e) = self.writer.update_spec(&spec_of(new_cfg)) {
                    // Only this service keeps its old table settings; the
                    // error shows in `xdplb backends` like a failed update.
                    self.services[i].failed(&e);
                    continue;
                }
            }
            let s = &mut self.services[i];
            let old_checks = check_spec(&s.cfg).is_some();
            s.cfg = new_cfg.clone();
            if c.drain {
                s.tracker.set_drain_timeout(new_cfg.drain_timeout);
            }
            if c.checks {
                for (_, (tx, h)) in s.checkers.drain() {
                    let _ = tx.send(true);
                    h.abort();
                }
                let checks = check_spec(new_cfg).is_some();
                if checks != old_checks {
                    // Tasks in rotation stay there while the new checks
                    // start, as after a restart.
                    let active = s.tracker.active_set();
                    let mut tracker = BackendTracker::new(
                        new_cfg.backends.name.clone(),
                        checks,
                        new_cfg.drain_timeout,
                    );
                    let t = tracker.adopt_active(&active, self.now.into_std());
                    s.tracker = tracker;
                    self.changed.push((i, t));
                }
                reconcile_checkers(i, s, self.http, self.health_tx, self.stop_rx);
            }
            if c.dns {
                spawn_discovery(i, s, self.dns_tx, self.tasks);
            } else if c.max_backends {
                if let Some(answer) = s.answer.clone() {
                    let set = s.screen(answer, self.host);
                    let port = s.cfg.backends.port;
                    let t = s.tracker.on_dns(&set, port, self.now.into_std());
                    self.changed.push((i, t));
                }
            }
            self.dirty[i] = true;
        }
        Ok(())
    }
}
