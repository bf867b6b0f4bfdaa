//! What a configuration reload changes (SIGHUP, `xdplb reload`).
//!
//! [`plan`] compares the running configuration with the new one and says
//! what to do, service by service, or refuses: settings that shape the
//! kernel objects (the interfaces and hook, the pin directory, the
//! connection-table capacity) cannot change while the data plane keeps its
//! flows, so a reload that asks for them changes nothing and says that a
//! restart is needed. Pure, so every rule is unit-tested.
//!
//! The outcome of the last reload is published next to the status file
//! (`/run/xdplb/<pin dir>.reload.json`), where `xdplb reload` waits for it.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ServiceConfig};

/// What changes in one service that stays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceChange {
    pub name: String,
    /// DNS name, nameserver, interval, family or `empty_polls`: discovery
    /// restarts (it is seeded with the tasks it had).
    pub dns: bool,
    /// Check kind, interval, timeout, port, rise, fall or status: the
    /// checkers restart; tasks in rotation stay there while the new checks
    /// start, like after a daemon restart.
    pub checks: bool,
    pub drain: bool,
    /// SNAT ports or address.
    pub snat: bool,
    /// A new Maglev size: the table moves to a region of the new size in one
    /// `SERVICES` update.
    pub maglev: bool,
    pub max_backends: bool,
}

impl ServiceChange {
    pub fn is_empty(&self) -> bool {
        *self
            == ServiceChange {
                name: self.name.clone(),
                ..Default::default()
            }
    }

    fn parts(&self) -> Vec<&'static str> {
        [
            (self.dns, "dns"),
            (self.checks, "checks"),
            (self.drain, "drain_timeout"),
            (self.snat, "snat"),
            (self.maglev, "maglev_size"),
            (self.max_backends, "max_backends"),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect()
    }
}

/// What a reload does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// New services: allocated, discovered and checked from scratch.
    pub added: Vec<ServiceConfig>,
    /// Services no longer configured: their tasks drain (established flows
    /// finish, no new ones) for their drain timeout, then the service goes.
    pub removed: Vec<String>,
    /// Services that stay, with what changes.
    pub changed: Vec<(ServiceChange, ServiceConfig)>,
    /// Connection-table timeouts or the SNAT port span (the data plane's
    /// `CONFIG`).
    pub dataplane: bool,
    pub backend_slots: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && !self.dataplane
            && !self.backend_slots
    }
}

impl fmt::Display for Plan {
    /// The one-line summary the daemon logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing changed");
        }
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            let names: Vec<&str> = self.added.iter().map(|s| s.name.as_str()).collect();
            parts.push(format!("added {}", names.join(", ")));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {} (draining)", self.removed.join(", ")));
        }
        for (c, _) in &self.changed {
            parts.push(format!("{}: {}", c.name, c.parts().join(", ")));
        }
        if self.dataplane {
            parts.push("conntrack timeouts / SNAT span".into());
        }
        if self.backend_slots {
            parts.push("backend_slots".into());
        }
        f.write_str(&parts.join("; "))
    }
}

/// Why a reload was refused: each setting that needs a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeedsRestart(pub Vec<String>);

impl fmt::Display for NeedsRestart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cannot change while running; restart xdplb to apply (the connection table is \
             adopted), or put the old value back",
            self.0.join(", ")
        )
    }
}

impl std::error::Error for NeedsRestart {}

/// Compares the running configuration with a new, validated one.
pub fn plan(old: &Config, new: &Config) -> Result<Plan, NeedsRestart> {
    let mut refused = Vec::new();
    if old.interfaces != new.interfaces {
        refused.push(format!(
            "interfaces ({:?} -> {:?})",
            old.interfaces, new.interfaces
        ));
    }
    if old.attach != new.attach {
        refused.push(format!("attach ({} -> {})", old.attach, new.attach));
    }
    if old.pin_dir != new.pin_dir {
        refused.push(format!(
            "pin_dir ({} -> {})",
            old.pin_dir.display(),
            new.pin_dir.display()
        ));
    }
    if old.conntrack.capacity != new.conntrack.capacity {
        refused.push(format!(
            "conntrack.capacity ({} -> {})",
            old.conntrack.capacity, new.conntrack.capacity
        ));
    }
    if old.conntrack.unanswered_capacity != new.conntrack.unanswered_capacity {
        refused.push(format!(
            "conntrack.unanswered_capacity ({} -> {})",
            old.conntrack.unanswered_capacity, new.conntrack.unanswered_capacity
        ));
    }
    for n in &new.services {
        if let Some(o) = old.services.iter().find(|o| o.name == n.name) {
            if o.listen != n.listen {
                refused.push(format!(
                    "the listen address of service {} ({} -> {}; give the new listener a new \
                     service name instead)",
                    n.name, o.listen, n.listen
                ));
            }
        }
    }
    if !refused.is_empty() {
        return Err(NeedsRestart(refused));
    }
    let mut p = Plan {
        dataplane: old.dataplane_config() != new.dataplane_config(),
        backend_slots: old.backend_slots != new.backend_slots,
        ..Default::default()
    };
    for n in &new.services {
        match old.services.iter().find(|o| o.name == n.name) {
            None => p.added.push(n.clone()),
            Some(o) => {
                let c = ServiceChange {
                    name: n.name.clone(),
                    dns: o.backends != n.backends,
                    checks: o.check != n.check,
                    drain: o.drain_timeout != n.drain_timeout,
                    snat: o.snat != n.snat,
                    maglev: o.maglev_size != n.maglev_size,
                    max_backends: o.max_backends != n.max_backends,
                };
                if !c.is_empty() {
                    p.changed.push((c, n.clone()));
                }
            }
        }
    }
    for o in &old.services {
        if !new.services.iter().any(|n| n.name == o.name) {
            p.removed.push(o.name.clone());
        }
    }
    Ok(p)
}

/// The outcome of one reload, as the daemon publishes it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    /// Counts reloads since the daemon started; `xdplb reload` waits for it
    /// to move.
    pub generation: u64,
    pub pid: u32,
    pub ok: bool,
    /// The one-line summary, or the error.
    pub message: String,
    pub at_ms: u64,
}

/// Where the daemon owning `pin_dir` publishes reload outcomes.
pub fn outcome_path(pin_dir: &Path) -> PathBuf {
    crate::dataplane::attach::InstanceLock::lock_path(pin_dir).with_extension("reload.json")
}

impl Outcome {
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    pub fn read(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// `xdplb reload`: signals the daemon of `pin_dir` (SIGHUP), waits for its
/// outcome and returns it; an error if the reload was refused.
pub fn request(pin_dir: &Path, timeout: std::time::Duration) -> Result<String> {
    let pid = daemon_pid(pin_dir)?;
    let path = outcome_path(pin_dir);
    let before = Outcome::read(&path)
        .filter(|o| o.pid == pid)
        .map_or(0, |o| o.generation);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .with_context(|| format!("signalling xdplb (pid {pid})"))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(o) = Outcome::read(&path).filter(|o| o.pid == pid && o.generation > before) {
            if o.ok {
                return Ok(o.message);
            }
            bail!(
                "reload refused, xdplb (pid {pid}) keeps running unchanged: {}",
                o.message
            );
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "xdplb (pid {pid}) did not report a reload within {} s; see its log",
                timeout.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The pid of the daemon that holds `pin_dir`'s lock.
fn daemon_pid(pin_dir: &Path) -> Result<u32> {
    if !crate::dataplane::attach::InstanceLock::is_held(pin_dir) {
        bail!(
            "no xdplb is running with pin directory {} (--pin-dir to name another)",
            pin_dir.display()
        );
    }
    let status = crate::status::status_path(pin_dir);
    let s = crate::status::Status::read(&status)
        .context("reading the running daemon's status to find its pid")?;
    Ok(s.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"interfaces = ["eth0", "eth1"]
[[service]]
name = "web"
listen = "0.0.0.0:80"
backends = "tasks.web:80"
"#;

    fn cfg(text: &str) -> Config {
        Config::from_toml_str(text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let p = plan(&cfg(BASE), &cfg(BASE)).unwrap();
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.to_string(), "nothing changed");
    }

    #[test]
    fn services_come_go_and_change() {
        let two = format!(
            "{BASE}[[service]]\nname = \"api\"\nlisten = \"0.0.0.0:8080\"\nbackends = \"tasks.api:8080\"\n"
        );
        let p = plan(&cfg(BASE), &cfg(&two)).unwrap();
        assert_eq!(p.added.len(), 1);
        assert_eq!(p.added[0].name, "api");
        assert!(p.removed.is_empty() && p.changed.is_empty());
        let p = plan(&cfg(&two), &cfg(BASE)).unwrap();
        assert_eq!(p.removed, vec!["api".to_string()]);
        assert_eq!(p.to_string(), "removed api (draining)");

        let changed = BASE.replace(
            "backends = \"tasks.web:80\"\n",
            "backends = \"tasks.web:80\"\ncheck = \"http:/healthz\"\nrise = 3\ndrain_timeout = \"5s\"\nmaglev_size = 251\nsnat_ports = \"21000-21999\"\ninterval = \"2s\"\nmax_backends = 2\n",
        );
        let p = plan(&cfg(BASE), &cfg(&changed)).unwrap();
        assert_eq!(p.changed.len(), 1);
        let c = &p.changed[0].0;
        assert!(
            c.dns && c.checks && c.drain && c.snat && c.maglev && c.max_backends,
            "{c:?}"
        );
        assert!(p.dataplane, "the SNAT span moved");
        assert_eq!(
            p.to_string(),
            "web: dns, checks, drain_timeout, snat, maglev_size, max_backends; conntrack timeouts / SNAT span"
        );
    }

    #[test]
    fn settings_of_the_kernel_objects_need_a_restart() {
        let services = &BASE[BASE.find("[[service]]").unwrap()..];
        for (what, new) in [
            ("interfaces", BASE.replace("\"eth1\"", "\"eth2\"")),
            ("attach", format!("attach = \"tc\"\n{BASE}")),
            (
                "pin_dir",
                format!("pin_dir = \"/sys/fs/bpf/other\"\n{BASE}"),
            ),
            (
                "conntrack.capacity",
                format!(
                    "interfaces = [\"eth0\", \"eth1\"]\n[conntrack]\ncapacity = 1024\n{services}"
                ),
            ),
            (
                "conntrack.unanswered_capacity",
                format!(
                    "interfaces = [\"eth0\", \"eth1\"]\n[conntrack]\nunanswered_capacity = 1024\n\
                     {services}"
                ),
            ),
            ("listen", BASE.replace("0.0.0.0:80", "0.0.0.0:81")),
        ] {
            let e = plan(&cfg(BASE), &cfg(&new)).expect_err(what);
            let msg = e.to_string();
            assert!(
                msg.contains(what) && msg.contains("restart"),
                "{what}: {msg}"
            );
        }
    }

    #[test]
    fn timeouts_and_slots_change_live() {
        let new = format!("backend_slots = 100\n{BASE}[conntrack]\ntcp_timeout = \"10m\"\n");
        let p = plan(&cfg(BASE), &cfg(&new)).unwrap();
        assert!(p.dataplane && p.backend_slots, "{p:?}");
        assert!(p.changed.is_empty() && p.added.is_empty());
    }
}
