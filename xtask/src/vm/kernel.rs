//! The guest kernel: a Debian `linux-image-*` package, downloaded once with
//! `apt-get download`, unpacked with `dpkg-deb -x` into
//! `~/.cache/xdplb/vm/kernel/<package>_<version>/`, and the modules the
//! tests need (with their dependencies, from each module's `.modinfo`).
//!
//! Neither step needs root: `apt-get download` and `dpkg-deb -x` work as any
//! user, and nothing is installed on the host.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{self, is_root, probe};

/// The kernel the layer boots by default: Debian 12's 6.1 cloud flavour,
/// the newest ABI the package lists know (`6.1.0-<N>`). "cloud" because it
/// boots in seconds (virtio, no firmware); "unsigned" because the signed one
/// is the same kernel wrapped for Secure Boot.
pub const DEFAULT_PATTERN: &str = r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$";

/// What the tests need from the kernel beyond the cloud config's built-ins,
/// and why. Dependencies (`bridge` needs `llc` and `stp`) are found from the
/// modules themselves. In a kernel where one of these is built in, it is
/// skipped.
pub const MODULES: &[(&str, &str)] = &[
    ("veth", "every testbed link"),
    ("bridge", "the overlay network of the testbed"),
    (
        "sch_ingress",
        "the clsact qdisc (TC attach below 6.6, and tc's ingress hook)",
    ),
    ("cls_bpf", "TC classifiers attached through netlink"),
    ("act_bpf", "BPF actions on TC filters"),
];

/// An unpacked kernel package.
pub struct Kernel {
    /// `linux-image-6.1.0-57-cloud-amd64-unsigned` (or the .deb's file name).
    pub package: String,
    /// The package version, `6.1.192-3`.
    pub version: String,
    /// `uname -r` of the kernel, from `boot/vmlinuz-<release>`.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    /// The cache directory of this package.
    pub dir: PathBuf,
    /// Whether this run downloaded it.
    pub downloaded: bool,
}

/// A module to load in the guest, in dependency order.
pub struct Module {
    pub name: String,
    pub host_path: PathBuf,
}

pub fn cache_root() -> Result<PathBuf> {
    Ok(crate::setup::cache_dir()?.join("vm"))
}

/// Resolves `spec` (None: the newest Debian 12 6.1 cloud kernel; a package
/// name; or the path of a `.deb`), downloads and unpacks it unless cached.
pub fn ensure(spec: Option<&str>) -> Result<Kernel> {
    let kernels = cache_root()?.join("kernel");
    fs::create_dir_all(&kernels).with_context(|| format!("creating {}", kernels.display()))?;

    if let Some(deb) = spec.filter(|s| s.ends_with(".deb")) {
        let deb = Path::new(deb);
        if !deb.is_file() {
            bail!("--kernel {}: no such .deb file", deb.display());
        }
        let stem = deb
            .file_stem()
            .and_then(|s| s.to_str())
            .context("the .deb has no file name")?;
        let (package, version) = stem.split_once('_').unwrap_or((stem, "local"));
        let dir = kernels.join(stem);
        let downloaded = !is_unpacked(&dir);
        if downloaded {
            unpack(deb, &dir)?;
        }
        return open(package, version, &dir, downloaded);
    }

    let package = match spec {
        Some(name) => name.to_string(),
        None => newest_default(&kernels)?,
    };
    let version = match candidate_version(&package) {
        Some(v) => v,
        None => {
            // No package lists (or an unknown name): a cached copy still serves.
            if let Some(dir) = newest_cached(&kernels, |name| name == package) {
                let version = version_of(&dir, &package);
                println!(
                    "vm: apt knows no candidate for {package}; using the cached {package} {version}"
                );
                return open(&package, &version, &dir, false);
            }
            bail!(
                "apt has no package {package}; `apt-cache search linux-image-6.1` lists the \
                 kernels it knows (run `apt-get update` first if the lists are old)"
            );
        }
    };
    let dir = kernels.join(format!("{package}_{version}"));
    if is_unpacked(&dir) {
        return open(&package, &version, &dir, false);
    }
    println!(
        "vm: downloading {package} {version} (once; cached in {})",
        dir.display()
    );
    let download = kernels.join(".download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    let mut get = Command::new("apt-get");
    get.current_dir(&download)
        .arg("download")
        .arg(format!("{package}={version}"));
    if is_root() {
        // As root apt drops to the `_apt` user, which cannot write into a
        // root-owned cache; it then warns and downloads anyway. Say so up front.
        get.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd::run(&mut get).with_context(|| {
        format!("downloading {package} (needs Debian's archive: deb.debian.org)")
    })?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    unpack(&deb, &dir)?;
    let _ = fs::remove_dir_all(&download);
    open(&package, &version, &dir, true)
}

fn is_unpacked(dir: &Path) -> bool {
    dir.join(".complete").exists()
}

/// `dpkg-deb -x` into a scratch directory, renamed into place when complete.
fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    let mut scratch = dir.as_os_str().to_owned();
    scratch.push(".partial");
    let scratch = PathBuf::from(scratch);
    let _ = fs::remove_dir_all(&scratch);
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    cmd::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(scratch.join("root")),
    )?;
    fs::write(
        scratch.join(".complete"),
        format!("unpacked from {}\n", deb.display()),
    )?;
    fs::rename(&scratch, dir)
        .with_context(|| format!("renaming {} to {}", scratch.display(), dir.display()))
}

fn open(package: &str, version: &str, dir: &Path, downloaded: bool) -> Result<Kernel> {
    let root = dir.join("root");
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| {
            format!(
                "listing {} (is this a linux-image package?)",
                boot.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("matched above")
        .to_string();
    // Debian 13 moved modules to /usr/lib/modules.
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|d| d.is_dir())
        .with_context(|| format!("no lib/modules/{release} in {}", root.display()))?;
    Ok(Kernel {
        package: package.to_string(),
        version: version.to_string(),
        release,
        vmlinuz,
        modules_dir,
        dir: dir.to_path_buf(),
        downloaded,
    })
}

/// The newest `linux-image-6.1.0-<N>-cloud-amd64-unsigned` apt knows, by N.
/// Without package lists: `apt-get update` (root), else the newest cached.
fn newest_default(kernels: &Path) -> Result<String> {
    let search = || {
        probe(Command::new("apt-cache").args(["search", "--names-only", DEFAULT_PATTERN]))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .max_by_key(|name| abi_of(name))
    };
    if let Some(name) = search() {
        return Ok(name);
    }
    if is_root() && cmd::which("apt-get").is_some() {
        println!("vm: apt knows no 6.1 cloud kernel; refreshing the package lists");
        cmd::run(Command::new("apt-get").arg("update"))?;
        if let Some(name) = search() {
            return Ok(name);
        }
    }
    if let Some(dir) = newest_cached(kernels, |name| name.starts_with("linux-image-6.1.0-")) {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        return Ok(name.split('_').next().unwrap_or(name).to_string());
    }
    bail!(
        "no Debian 12 6.1 cloud kernel: `apt-cache search linux-image-6.1.0` finds none and none \
         is cached. This needs Debian 12 (bookworm) package lists: run `apt-get update`, or pass \
         --kernel PACKAGE_OR_DEB"
    )
}

/// `6.1.0-57-cloud-amd64` -> 57 (0 when there is no ABI number).
fn abi_of(name: &str) -> u32 {
    name.split('-')
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn candidate_version(package: &str) -> Option<String> {
    let policy = probe(Command::new("apt-cache").args(["policy", package]))?;
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .map(str::to_string)
        .filter(|v| v != "(none)")
}

/// The newest complete cache entry whose package name passes `wanted`.
fn newest_cached(kernels: &Path, wanted: impl Fn(&str) -> bool) -> Option<PathBuf> {
    fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_unpacked(p))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once('_'))
                .is_some_and(|(name, _)| wanted(name))
        })
        .max_by_key(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            (abi_of(name), name.to_string())
        })
}

fn version_of(dir: &Path, package: &str) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(package))
        .and_then(|n| n.strip_prefix('_'))
        .unwrap_or("cached")
        .to_string()
}

impl Kernel {
    /// The modules of [`MODULES`] and their dependencies, dependencies first.
    /// Names built into this kernel are left out; names it has neither way
    /// are returned in the second list.
    pub fn modules(&self) -> Result<(Vec<Module>, Vec<String>)> {
        let mut files = BTreeMap::new();
        index(&self.modules_dir.join("kernel"), &mut files)?;
        let builtin: BTreeSet<String> =
            fs::read_to_string(self.modules_dir.join("modules.builtin"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| module_name(Path::new(l)))
                .collect();
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for (name, _) in MODULES {
            self.visit(name, &files, &builtin, &mut seen, &mut order, &mut missing)?;
        }
        Ok((order, missing))
    }

    fn visit(
        &self,
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
        missing: &mut Vec<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) || builtin.contains(name) {
            return Ok(());
        }
        let Some(path) = files.get(name) else {
            missing.push(name.to_string());
            return Ok(());
        };
        let bytes = read_module(path)?;
        for dep in depends(&bytes) {
            self.visit(&dep, files, builtin, seen, order, missing)?;
        }
        order.push(Module {
            name: name.to_string(),
            host_path: path.clone(),
        });
        Ok(())
    }
}

/// `net/bridge/bridge.ko.xz` -> `bridge` (dashes become underscores, as the
/// kernel names modules).
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

fn index(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index(&path, out)?;
        } else if let Some(name) = module_name(&path) {
            out.insert(name, path);
        }
    }
    Ok(())
}

/// The module's bytes, decompressed when the package compresses modules
/// (Debian 13 ships `.ko.xz`; busybox `insmod` hands the file to
/// `init_module`, which wants a plain ELF object).
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    let Some(tool) = tool else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("`{tool} -dc {}` failed ({})", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section ("depends=llc,stp").
fn depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &module[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_and_names() {
        let blob = b"\x7fELF junk\0license=GPL\0depends=llc,stp\0name=bridge\0";
        assert_eq!(depends(blob), ["llc", "stp"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(depends(b"no modinfo here").is_empty());
        assert_eq!(
            module_name(Path::new("kernel/net/sched/sch-ingress.ko.xz")).as_deref(),
            Some("sch_ingress")
        );
        assert_eq!(module_name(Path::new("x/readme.txt")), None);
    }

    #[test]
    fn abi_numbers_sort_numerically() {
        assert_eq!(abi_of("linux-image-6.1.0-57-cloud-amd64-unsigned"), 57);
        assert!(
            abi_of("linux-image-6.1.0-9-cloud-amd64-unsigned")
                < abi_of("linux-image-6.1.0-10-cloud-amd64-unsigned")
        );
    }
}
