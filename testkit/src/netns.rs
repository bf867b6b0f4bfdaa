//! Network namespaces for tests: created with `ip netns add`, deleted on drop
//! (also while a test unwinds from a panic), and entered per thread.
//!
//! Names are `xdplb-<tag>-<pid>-<counter>`, so [`sweep_leftovers`] can tell
//! the namespaces of a crashed earlier run (its pid is gone) from those of a
//! run in progress.

use std::{
    fs::File,
    marker::PhantomData,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};
use nix::sched::CloneFlags;

/// Every namespace this crate creates starts with this.
pub const PREFIX: &str = "xdplb-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command and fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawning {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `xdplb-<tag>-<pid>-<counter>`.
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!(
            "{PREFIX}{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]).context("creating a network namespace (root?)")?;
        let ns = Self { name };
        // A fresh namespace has `lo` down; bring it up so it behaves like a host.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME <cmd...>`.
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(cmd);
        run("ip", &all)
    }

    /// The bind-mounted namespace file (`/var/run/netns/NAME`): open it and
    /// `setns` to enter the namespace.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that entered the namespace, and returns its
    /// result. Sockets created by `f` belong to this namespace for their
    /// whole life, whichever thread or runtime uses them afterwards.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = self.enter()?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The interface index of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")])?;
        out.trim()
            .parse()
            .with_context(|| format!("parsing the ifindex of {dev}: {out:?}"))
    }

    /// Moves the calling thread into the namespace until the guard drops.
    ///
    /// Only the calling thread moves (`setns` on a thread of a multi-threaded
    /// process changes that thread's network namespace alone), which is why
    /// the guard is neither `Send` nor `Sync`.
    pub fn enter(&self) -> Result<NsGuard> {
        // The thread's own namespace, not the process's: /proc/self is the
        // thread-group leader, whose namespace may differ from ours.
        let original =
            File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")?;
        let target = File::open(self.path())
            .with_context(|| format!("opening /var/run/netns/{}", self.name))?;
        setns(&target).with_context(|| format!("entering network namespace {}", self.name))?;
        Ok(NsGuard {
            original,
            _not_send: PhantomData,
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

fn setns(ns: &File) -> Result<()> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")
}

/// Restores the thread's original network namespace when dropped.
#[derive(Debug)]
pub struct NsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            // Carrying on in the wrong namespace would make every later test on
            // this thread lie; stopping is the honest option.
            eprintln!("fatal: could not return to the original network namespace: {e:#}");
            std::process::abort();
        }
    }
}

/// Parses `<prefix>[<tag>-]<pid>-<counter>` and returns the pid.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let mut parts = rest.rsplitn(3, '-');
    let _counter: u32 = parts.next()?.parse().ok()?;
    parts.next()?.parse().ok()
}

/// Is process `pid` still running?
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Deletes namespaces named `<prefix>...-<pid>-<n>` whose process is gone
/// (left behind by a run that was killed before its destructors ran).
pub fn sweep_leftovers(prefix: &str) {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        // `ip netns list` prints "name (id: N)" for namespaces with an id.
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(pid) = owner_pid(name, prefix) {
            if !pid_alive(pid) {
                if let Err(e) = run("ip", &["netns", "del", name]) {
                    eprintln!("warning: could not delete stale namespace {name}: {e:#}");
                }
            }
        }
    }
}

/// Deletes directories `<dir>/<prefix>...-<pid>-<n>` whose process is gone.
pub fn sweep_stale_dirs(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Some(pid) = owner_pid(name, prefix) {
            if !pid_alive(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_reads_the_second_to_last_field() {
        assert_eq!(owner_pid("xdplb-pkt-v4-123-7", "xdplb-"), Some(123));
        assert_eq!(owner_pid("xdplb-pkt-123-7", "xdplb-"), Some(123));
        assert_eq!(owner_pid("xdplb-test-123-7", "xdplb-test-"), Some(123));
        assert_eq!(owner_pid("xdplb-123", "xdplb-"), None);
        assert_eq!(owner_pid("other-pkt-1-2", "xdplb-"), None);
        assert_eq!(owner_pid("xdplb-pkt-x-2", "xdplb-"), None);
    }
}
