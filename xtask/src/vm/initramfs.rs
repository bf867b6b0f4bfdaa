//! The guest's root file system: one initramfs in two concatenated parts.
//!
//! - The **base** (cached in `~/.cache/xdplb/vm/initramfs/`, rebuilt when the
//!   kernel, a host tool or a guest script changes): busybox (shell,
//!   coreutils, mount, insmod, nsenter, httpd, timeout), the host's own
//!   iproute2 `ip` and `tc`, `ethtool`, procps `sysctl`, `curl` and
//!   `dnsmasq` with the shared libraries `ldd` names, the kernel modules,
//!   `/init` and the smoke script.
//! - The **run** part, rebuilt every run: the test binaries and `xdplb`
//!   (debug info stripped: they are 130 MB each with it, 8-20 MB without),
//!   their libraries, and the list of steps `/init` runs.
//!
//! Every tool is placed where Debian puts it (`/usr/sbin/ip`, ...) and PATH
//! in the guest lists `/usr/sbin:/usr/bin` before busybox's `/bin`, so the
//! testbed's `Command::new("ip")` finds iproute2, never busybox's applet
//! (which lacks `ip netns`). Busybox gets no link for a name a real tool has.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
    time::UNIX_EPOCH,
};

use anyhow::{bail, Context as _, Result};

use super::{cpio::Writer, kernel::Kernel};
use crate::cmd::{probe, which};

/// PID 1 of the guest.
const INIT: &str = include_str!("init.sh");
/// The dual-stack smoke through the real daemon (see the script's header).
pub const SMOKE: &str = include_str!("smoke.sh");

/// Host tools copied into the guest: (guest path, program name, Debian package).
const TOOLS: &[(&str, &str, &str)] = &[
    ("/usr/sbin/ip", "ip", "iproute2"),
    ("/usr/sbin/tc", "tc", "iproute2"),
    ("/usr/sbin/ethtool", "ethtool", "ethtool"),
    ("/usr/sbin/sysctl", "sysctl", "procps"),
    ("/usr/bin/curl", "curl", "curl"),
    ("/usr/sbin/dnsmasq", "dnsmasq", "dnsmasq-base"),
];

const BUSYBOX: &str = "/bin/busybox";

/// Bumped when the layout of the base changes in a way the key cannot see.
const BASE_FORMAT: u32 = 1;

pub struct Base {
    pub path: PathBuf,
    pub size: u64,
    /// False when the cached archive was reused.
    pub built: bool,
    /// Modules the kernel has neither as a file nor built in.
    pub missing_modules: Vec<String>,
}

/// A host tool by name, refusing busybox's applets (iproute2's `ip` is needed).
fn tool(name: &str, package: &str) -> Result<PathBuf> {
    let path = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .or_else(|| which(name))
        .with_context(|| {
            format!("{name} is missing on the host (Debian package {package}; `cargo xtask setup`)")
        })?;
    let real = fs::canonicalize(&path)?;
    if real.file_name().is_some_and(|n| n == "busybox") {
        bail!(
            "{} is busybox's applet; the guest needs the real {name} ({package})",
            path.display()
        );
    }
    Ok(real)
}

/// The shared libraries `ldd` lists for `binary` (nothing for a static one).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("ldd {}: {}", binary.display(), line.trim());
        }
    }
    Ok(libs)
}

fn stamp(path: &Path, h: &mut impl Hasher) {
    path.hash(h);
    if let Ok(meta) = fs::metadata(path) {
        meta.len().hash(h);
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .hash(h);
    }
}

/// The cached base archive for `kernel`, built when missing or stale.
pub fn base(kernel: &Kernel) -> Result<Base> {
    let busybox = Path::new(BUSYBOX);
    if !busybox.is_file() {
        bail!("{BUSYBOX} is missing (Debian package busybox-static; `cargo xtask setup`)");
    }
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    files.insert(BUSYBOX.into(), busybox.to_path_buf());
    let mut provided = BTreeSet::new();
    for (guest, name, package) in TOOLS {
        let host = tool(name, package)?;
        for lib in libraries(&host)? {
            files.insert(lib.to_string_lossy().into_owned(), lib);
        }
        files.insert(guest.to_string(), host);
        provided.insert(*name);
    }
    for lib in libraries(busybox)? {
        files.insert(lib.to_string_lossy().into_owned(), lib);
    }
    let (modules, missing_modules) = kernel.modules()?;

    let mut h = std::collections::hash_map::DefaultHasher::new();
    (BASE_FORMAT, INIT, SMOKE, &kernel.dir).hash(&mut h);
    for (guest, host) in &files {
        guest.hash(&mut h);
        stamp(host, &mut h);
    }
    for m in &modules {
        stamp(&m.host_path, &mut h);
    }
    let dir = super::kernel::cache_root()?.join("initramfs");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("base-{}-{:016x}.cpio", kernel.release, h.finish()));
    if let Ok(meta) = fs::metadata(&path) {
        return Ok(Base {
            path,
            size: meta.len(),
            built: false,
            missing_modules,
        });
    }
    // Older bases are stale by construction; keep the cache to one file.
    for entry in fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("base-") {
            let _ = fs::remove_file(entry.path());
        }
    }

    let scratch = path.with_extension("partial"); // base-<release>-<hash>.partial
    let mut w = Writer::create(&scratch)?;
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/t",
        "/vm/modules",
    ] {
        w.dir(d)?;
    }
    w.char_dev("/dev/console", 5, 1)?;
    w.symlink("/var/run", "/run")?;
    w.file("/init", 0o755, INIT.as_bytes())?;
    w.file("/vm/smoke.sh", 0o755, SMOKE.as_bytes())?;
    w.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    w.file("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    w.file(
        "/etc/hosts",
        0o644,
        b"127.0.0.1 localhost\n::1 localhost ip6-localhost\n",
    )?;
    for (guest, host) in &files {
        w.copy(guest, host)?;
    }
    // Busybox applets, except where a real tool stands in.
    let applets = probe(Command::new(BUSYBOX).arg("--list"))
        .with_context(|| format!("`{BUSYBOX} --list` failed"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" && !provided.contains(applet) {
            w.symlink(&format!("/bin/{applet}"), "busybox")?;
        }
    }
    let mut order = String::new();
    for m in &modules {
        let bytes = super::kernel::read_module(&m.host_path)?;
        w.file(&format!("/vm/modules/{}.ko", m.name), 0o644, &bytes)?;
        order.push_str(&m.name);
        order.push('\n');
    }
    w.file("/vm/modules.order", 0o644, order.as_bytes())?;
    let size = w.finish()?;
    fs::rename(&scratch, &path)?;
    Ok(Base {
        path,
        size,
        built: true,
        missing_modules,
    })
}

/// The per-run part: `binaries` (guest path -> host path) with their debug
/// info stripped into `scratch`, their libraries, and `/vm/steps.sh`.
pub fn run_part(
    out: &Path,
    scratch: &Path,
    binaries: &[(String, PathBuf)],
    steps: &str,
) -> Result<u64> {
    fs::create_dir_all(scratch)?;
    let mut w = Writer::create(out)?;
    let mut libs = BTreeSet::new();
    for (guest, host) in binaries {
        let name = Path::new(guest).file_name().context("guest path")?;
        let stripped = scratch.join(name);
        let status = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(host)
            .arg(&stripped)
            .status()
            .context("running objcopy (Debian package binutils, part of build-essential)")?;
        if !status.success() {
            bail!(
                "`objcopy --strip-debug {}` failed ({status})",
                host.display()
            );
        }
        w.copy(guest, &stripped)?;
        libs.extend(libraries(host)?);
    }
    for lib in libs {
        w.copy(&lib.to_string_lossy(), &lib)?;
    }
    w.file("/vm/steps.sh", 0o644, steps.as_bytes())?;
    w.finish()
}

/// `base` then `run`, one file: the kernel unpacks concatenated archives in order.
pub fn concat(base: &Path, run: &Path, out: &Path) -> Result<u64> {
    let mut file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut n = std::io::copy(&mut fs::File::open(base)?, &mut file)?;
    n += std::io::copy(&mut fs::File::open(run)?, &mut file)?;
    Ok(n)
}
