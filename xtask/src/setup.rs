//! `cargo xtask setup`: install what the build and the tests need, once.
//!
//! Every run re-verifies everything with cheap probes (a file in the
//! toolchain's sysroot, `bpf-linker --version`, one `dpkg-query`, one read of
//! /proc/mounts), so a deleted binary or an updated nightly is noticed. Only
//! what is missing gets installed; the expensive step (building bpf-linker,
//! about two minutes) happens once per nightly LLVM. The stamp file records
//! what was installed and against which LLVM, for humans reading it later.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::cmd::{self, cargo, is_root, probe, which};

/// The bpf-linker release that matches aya-ebpf 0.2.1 and links with LLVM 21-23.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// LLVM majors bpf-linker 0.13 has a cargo feature for (`llvm-21` ... `llvm-23`).
const BPF_LINKER_LLVM_MAJORS: std::ops::RangeInclusive<u32> = 21..=23;

/// Debian packages the build and the tests use, and why. Extend here.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "build-essential",
        "cc links every Rust binary, bpf-linker included",
    ),
    (
        "iproute2",
        "ip netns/link/route and tc: the testbed's topology",
    ),
    (
        "ethtool",
        "GRO on veth peers (XDP_TX/REDIRECT need it) and xdp counters",
    ),
    ("bpftool", "inspecting loaded programs and pinned maps"),
    ("iputils-ping", "reachability checks in the testbed"),
    ("curl", "HTTP requests through the balancer"),
    ("tcpdump", "watching testbed traffic when a test fails"),
    (
        "qemu-system-x86",
        "the VM layer boots Debian 12's kernel 6.1 under qemu (vm-test)",
    ),
    (
        "busybox-static",
        "the VM's shell, mount, insmod, httpd (vm-test initramfs)",
    ),
    (
        "dnsmasq-base",
        "AAAA records for the VM's IPv6 smoke through the daemon",
    ),
    (
        "hping3",
        "SYN and ACK floods and forged packets in the hostile layer (tests under_attack) and the bench",
    ),
    (
        "procps",
        "sysctl, copied into the VM with iproute2 and ethtool",
    ),
];

/// Debian packages only `cargo xtask bench` uses (the end-to-end comparison
/// against HAProxy); `setup` and `test` do not install them.
pub const BENCH_PACKAGES: &[(&str, &str)] = &[
    (
        "haproxy",
        "the balancer xdplb is compared with (Debian's 2.6, DNS service discovery)",
    ),
    ("wrk", "the HTTP load generator of the end-to-end benchmark"),
];

/// Components each toolchain needs, and the sysroot file that proves one is present.
const NIGHTLY_COMPONENTS: &[(&str, &str)] = &[
    ("rust-src", "lib/rustlib/src/rust/library/core/Cargo.toml"),
    ("clippy", "bin/cargo-clippy"),
    ("rustfmt", "bin/rustfmt"),
];
const HOST_COMPONENTS: &[(&str, &str)] = &[("clippy", "bin/cargo-clippy")];

/// Bumped when what setup installs changes shape.
const STAMP_NAME: &str = "setup-v1.stamp";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scope {
    /// What compiling needs: nightly with rust-src, clippy and rustfmt; clippy
    /// on the host toolchain; bpf-linker against nightly's LLVM. No root needed.
    Toolchain,
    /// Toolchain, plus the Debian packages, a mounted bpffs, and root.
    Full,
}

/// How much to say about checks that pass.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// One line per item (the `setup` verb).
    Each,
    /// One summary line (verbs that run setup first).
    Summary,
}

/// What one setup run found, installed, and could not fix.
struct Run {
    report: Report,
    installed: Vec<String>,
    problems: Vec<String>,
}

impl Run {
    fn ok(&self, what: &str) {
        if self.report == Report::Each {
            println!("  ok       {what}");
        }
    }

    fn fixing(&self, what: &str) {
        println!("  install  {what}");
    }

    fn problem(&mut self, what: String) {
        println!("  MISSING  {what}");
        self.problems.push(what);
    }
}

/// Check everything `scope` needs and install what is missing.
/// `force` rebuilds bpf-linker even when the installed one looks right.
pub fn ensure(scope: Scope, force: bool, report: Report) -> Result<()> {
    let started = Instant::now();
    let mut run = Run {
        report,
        installed: Vec::new(),
        problems: Vec::new(),
    };
    let root = is_root();
    if report == Report::Each {
        println!("setup ({scope:?}): checking what the build and the tests need");
    }

    // Packages first: build-essential is what `cargo install bpf-linker` links with.
    if scope == Scope::Full {
        packages(&mut run, root)?;
    }
    match nightly(&mut run) {
        Ok(nightly) => {
            components(&mut run, &nightly.sysroot, "nightly", NIGHTLY_COMPONENTS)?;
            bpf_linker(&mut run, &nightly, force)?;
        }
        Err(e) => run.problem(format!("{e:#}")),
    }
    host_components(&mut run)?;
    if scope == Scope::Full {
        vm_cache(&mut run);
        bpffs(&mut run, root)?;
        if root {
            run.ok("running as root (the packet and end-to-end tests load BPF programs)");
        } else {
            run.problem(
                "not running as root: the packet and end-to-end tests load BPF programs and \
                 create network namespaces; run `cargo xtask setup` / `cargo xtask test` as root"
                    .into(),
            );
        }
    }

    let stamp = cache_dir()?.join(STAMP_NAME);
    if !run.installed.is_empty() || (run.problems.is_empty() && !stamp.exists()) {
        write_stamp(&stamp, &run.installed)?;
    }
    let secs = started.elapsed().as_secs_f64();
    if !run.problems.is_empty() {
        bail!(
            "setup could not provide {} item(s):\n  - {}",
            run.problems.len(),
            run.problems.join("\n  - ")
        );
    }
    if run.installed.is_empty() {
        println!("setup: everything in place, nothing installed ({secs:.1} s)");
    } else {
        println!(
            "setup: installed {} ({secs:.1} s; record in {})",
            run.installed.join(", "),
            stamp.display()
        );
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/xdplb` or `~/.cache/xdplb`.
pub fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(
            std::env::var_os("HOME").context("HOME is not set, so there is no cache directory")?,
        )
        .join(".cache"),
    };
    Ok(base.join("xdplb"))
}

fn write_stamp(path: &Path, installed: &[String]) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let nightly_llvm = nightly_probe()
        .ok()
        .and_then(|n| llvm_library(&n.sysroot).ok())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let packages: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).collect();
    let text = format!(
        "# Written by `cargo xtask setup`. Setup re-verifies everything on each run;\n\
         # deleting this file is harmless.\n\
         updated_unix={now}\n\
         bpf_linker={BPF_LINKER_VERSION}\n\
         nightly_libllvm={nightly_llvm}\n\
         debian_packages={}\n\
         installed_last_run={}\n",
        packages.join(" "),
        if installed.is_empty() {
            "nothing".to_string()
        } else {
            installed.join("; ")
        }
    );
    fs::create_dir_all(path.parent().expect("stamp has a parent"))
        .with_context(|| format!("creating {}", path.display()))?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------- packages

/// Which of `names` dpkg does not report as installed. `None`: no dpkg here.
fn missing_packages(names: &[&str]) -> Option<Vec<String>> {
    let mut query = Command::new("dpkg-query");
    query.args(["-W", "-f=${Package}\t${Status}\n"]).args(names);
    // dpkg-query exits 1 when any name is unknown but still lists the others.
    cmd::trace(&query);
    let out = query.stderr(std::process::Stdio::null()).output().ok()?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.ends_with(" installed"))
        .map(|(name, _)| name)
        .collect();
    Some(
        names
            .iter()
            .filter(|name| !installed.contains(name))
            .map(|name| name.to_string())
            .collect(),
    )
}

/// Installs what is missing of `list` (e.g. [`BENCH_PACKAGES`]); fails
/// naming what could not be installed.
pub fn ensure_packages(list: &[(&str, &str)]) -> Result<()> {
    let mut run = Run {
        report: Report::Summary,
        installed: Vec::new(),
        problems: Vec::new(),
    };
    packages_from(&mut run, is_root(), list)?;
    if !run.problems.is_empty() {
        bail!("missing packages: {}", run.problems.join("; "));
    }
    Ok(())
}

fn packages(run: &mut Run, root: bool) -> Result<()> {
    packages_from(run, root, PACKAGES)
}

fn packages_from(run: &mut Run, root: bool, list: &[(&str, &str)]) -> Result<()> {
    let names: Vec<&str> = list.iter().map(|(name, _)| *name).collect();
    let Some(missing) = missing_packages(&names) else {
        run.problem(format!(
            "Debian packages: no dpkg-query here (not Debian?); install by hand: {}",
            names.join(" ")
        ));
        return Ok(());
    };
    if missing.is_empty() {
        run.ok(&format!("Debian packages: {}", names.join(" ")));
        return Ok(());
    }
    for name in &missing {
        let why = list
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, why)| *why);
        run.fixing(&format!("{name} ({why})"));
    }
    if !root {
        run.problem(format!(
            "Debian packages {} (installing needs root: run `cargo xtask setup` as root)",
            missing.join(" ")
        ));
        return Ok(());
    }
    if which("apt-get").is_none() {
        run.problem(format!(
            "Debian packages {} (no apt-get on PATH)",
            missing.join(" ")
        ));
        return Ok(());
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd
    };
    // The package lists may be stale or absent (fresh containers ship without them).
    cmd::run(&mut apt(&["update"])).context("apt-get update (needed to install packages)")?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    if cmd::status(&mut install)?.success() {
        run.installed
            .extend(missing.iter().map(|m| format!("apt:{m}")));
        return Ok(());
    }
    // One unknown name makes apt refuse the whole list: retry one by one so the
    // report names exactly what cannot be installed.
    println!("apt-get refused the list; trying each package alone to find the culprit");
    for name in &missing {
        let mut one = apt(&["install", "-y", "--no-install-recommends", name]);
        if cmd::status(&mut one)?.success() {
            run.installed.push(format!("apt:{name}"));
        } else {
            run.problem(format!(
                "Debian package {name}: `apt-get install {name}` failed (see its output above)"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- rust toolchains

struct Nightly {
    sysroot: PathBuf,
    llvm_major: u32,
}

/// `rustc +nightly`, free of the outer toolchain pin.
fn nightly_rustc() -> Command {
    let mut cmd = Command::new("rustc");
    cmd.arg("+nightly").env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn nightly_probe() -> Result<Nightly> {
    let verbose = probe(nightly_rustc().arg("-vV"))
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` fails: no nightly toolchain"))?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` prints no LLVM version"))?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| anyhow!("cannot read the LLVM major from {llvm:?}"))?;
    let sysroot = probe(nightly_rustc().args(["--print", "sysroot"]))
        .ok_or_else(|| anyhow!("`rustc +nightly --print sysroot` fails"))?;
    Ok(Nightly {
        sysroot: PathBuf::from(sysroot.trim()),
        llvm_major,
    })
}

/// The nightly toolchain, installed if absent.
fn nightly(run: &mut Run) -> Result<Nightly> {
    if which("rustup").is_none() {
        bail!(
            "rustup is not on PATH; install it from https://rustup.rs and add ~/.cargo/bin to PATH"
        );
    }
    if let Ok(nightly) = nightly_probe() {
        run.ok(&format!(
            "nightly toolchain (LLVM {}) at {}",
            nightly.llvm_major,
            nightly.sysroot.display()
        ));
        return Ok(nightly);
    }
    run.fixing("nightly toolchain (builds the eBPF crate with -Z build-std=core)");
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src,clippy,rustfmt",
    ]))?;
    run.installed.push("rustup:nightly".into());
    nightly_probe()
}

fn components(
    run: &mut Run,
    sysroot: &Path,
    toolchain: &str,
    wanted: &[(&str, &str)],
) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, file)| !sysroot.join(file).exists())
        .map(|(name, _)| *name)
        .collect();
    let names: Vec<&str> = wanted.iter().map(|(name, _)| *name).collect();
    if missing.is_empty() {
        run.ok(&format!("{toolchain} components: {}", names.join(" ")));
        return Ok(());
    }
    run.fixing(&format!("{toolchain} components: {}", missing.join(" ")));
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    if toolchain == "nightly" {
        add.args(["--toolchain", "nightly"]);
    }
    // Without --toolchain, rustup honours RUSTUP_TOOLCHAIN: the toolchain cargo xtask runs on.
    if let Err(e) = cmd::run(&mut add) {
        run.problem(format!(
            "{toolchain} components {}: {e:#}",
            missing.join(" ")
        ));
        return Ok(());
    }
    run.installed
        .extend(missing.iter().map(|m| format!("rustup:{toolchain}:{m}")));
    Ok(())
}

/// clippy on the toolchain `cargo xtask` itself runs on (stable by default).
fn host_components(run: &mut Run) -> Result<()> {
    let Some(sysroot) = probe(Command::new("rustc").args(["--print", "sysroot"])) else {
        run.problem("`rustc --print sysroot` fails on the host toolchain".into());
        return Ok(());
    };
    let name = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "host".into());
    components(run, Path::new(sysroot.trim()), &name, HOST_COMPONENTS)
}

// ---------------------------------------------------------------- bpf-linker

/// The real shared library in nightly's `lib/`: `libLLVM.so.<ver>-rust-<ver>-nightly`.
/// (`libLLVM-<major>-rust-*.so` next to it is a linker script, not a library.)
fn llvm_library(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let found: Vec<PathBuf> = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("libLLVM.so.")
        })
        .map(|entry| entry.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no libLLVM.so.* in {}", lib.display()),
        many => bail!("several libLLVM.so.* in {}: {many:?}", lib.display()),
    }
}

/// `Ok(())` when the bpf-linker on PATH is the right version and loads exactly `llvm`.
fn linker_matches(llvm: &Path) -> std::result::Result<(), String> {
    let path = which("bpf-linker").ok_or("not on PATH")?;
    let version = probe(Command::new(&path).arg("--version")).ok_or(
        "`bpf-linker --version` fails (the libLLVM it was built against is probably gone, \
         e.g. after a nightly update)",
    )?;
    let version = version.trim();
    if !version.ends_with(&format!(" {BPF_LINKER_VERSION}")) {
        return Err(format!("found `{version}`, need {BPF_LINKER_VERSION}"));
    }
    // The loader's view of which libLLVM the binary really uses.
    let ldd = probe(Command::new("ldd").arg(&path)).ok_or("`ldd bpf-linker` fails")?;
    let loaded = ldd
        .lines()
        .find(|l| l.contains("libLLVM"))
        .and_then(|l| l.split("=>").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or("it does not link a shared libLLVM (built against some other LLVM?)")?;
    let same = match (fs::canonicalize(loaded), fs::canonicalize(llvm)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(format!(
            "it loads {loaded}, not nightly's {}; its bitcode would not match rustc's",
            llvm.display()
        ));
    }
    Ok(())
}

fn bpf_linker(run: &mut Run, nightly: &Nightly, force: bool) -> Result<()> {
    let llvm = llvm_library(&nightly.sysroot)?;
    let why_not = if force {
        Err("--force".to_string())
    } else {
        linker_matches(&llvm)
    };
    let reason = match why_not {
        Ok(()) => {
            run.ok(&format!(
                "bpf-linker {BPF_LINKER_VERSION} on nightly's LLVM {} ({})",
                nightly.llvm_major,
                llvm.display()
            ));
            return Ok(());
        }
        Err(reason) => reason,
    };
    if !BPF_LINKER_LLVM_MAJORS.contains(&nightly.llvm_major) {
        run.problem(format!(
            "bpf-linker {BPF_LINKER_VERSION}: nightly uses LLVM {}, but bpf-linker \
             {BPF_LINKER_VERSION} only has features for LLVM {}..={}",
            nightly.llvm_major,
            BPF_LINKER_LLVM_MAJORS.start(),
            BPF_LINKER_LLVM_MAJORS.end()
        ));
        return Ok(());
    }
    run.fixing(&format!(
        "bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {} (about two minutes): {reason}",
        nightly.llvm_major
    ));

    // bpf-linker's build script looks for `$LLVM_PREFIX/lib/libLLVM.so` and
    // bakes `$LLVM_PREFIX/lib` into the binary's RUNPATH, so the loader then
    // needs the soname file there too. Both are symlinks to nightly's library.
    let prefix = cache_dir()?.join("llvm-prefix");
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let soname = llvm.file_name().expect("library path has a file name");
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
        let link = lib_dir.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), llvm.display()))?;
    }

    let feature = format!("llvm-{}", nightly.llvm_major);
    let mut install = cargo();
    install.env("LLVM_PREFIX", &prefix).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        &feature,
        "--force",
    ]);
    if let Err(e) = cmd::run(&mut install) {
        run.problem(format!(
            "bpf-linker {BPF_LINKER_VERSION}: {e:#}. It needs crates.io access and a C \
             toolchain (Debian: build-essential)."
        ));
        return Ok(());
    }
    match linker_matches(&llvm) {
        Ok(()) => run
            .installed
            .push(format!("bpf-linker {BPF_LINKER_VERSION} ({feature})")),
        Err(reason) => {
            let cargo_bin = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .map(|home| home.join("bin"));
            let hint = match cargo_bin {
                Some(bin) if bin.join("bpf-linker").exists() && which("bpf-linker").is_none() => {
                    format!(" (it is in {}: add that directory to PATH)", bin.display())
                }
                _ => String::new(),
            };
            run.problem(format!(
                "bpf-linker {BPF_LINKER_VERSION}: installed, but still unusable: {reason}{hint}"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- VM layer

/// The kernel package and the base initramfs of `cargo xtask vm-test`, in
/// ~/.cache/xdplb/vm (a download of about 27 MB, once). When another verb
/// runs setup first (`test`), a failure here is a warning only: the VM layer
/// then fails and says why, and the other layers still run.
fn vm_cache(run: &mut Run) {
    match crate::vm::prepare_cache(None) {
        Ok((line, fetched)) => {
            if fetched {
                run.fixing(&line);
                run.installed.push("vm:kernel+initramfs".into());
            } else {
                run.ok(&line);
            }
        }
        Err(e) if run.report == Report::Each => {
            run.problem(format!("VM kernel and initramfs (vm-test): {e:#}"))
        }
        Err(e) => println!("  warning  VM kernel and initramfs (vm-test): {e:#}"),
    }
}

// ---------------------------------------------------------------- bpffs

const BPFFS: &str = "/sys/fs/bpf";

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
        })
    })
}

/// The pinned maps and links live under /sys/fs/bpf/xdplb, so bpffs must be mounted.
fn bpffs(run: &mut Run, root: bool) -> Result<()> {
    if bpffs_mounted() {
        run.ok(&format!("bpffs mounted at {BPFFS}"));
        return Ok(());
    }
    if !root {
        run.problem(format!(
            "bpffs is not mounted at {BPFFS} (mounting needs root: `mount -t bpf bpf {BPFFS}`)"
        ));
        return Ok(());
    }
    run.fixing(&format!(
        "bpffs at {BPFFS} (maps and links are pinned there)"
    ));
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    if let Err(e) = cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])) {
        run.problem(format!("bpffs at {BPFFS}: {e:#}"));
    } else if bpffs_mounted() {
        run.installed.push(format!("mount:bpffs:{BPFFS}"));
    } else {
        run.problem(format!(
            "bpffs at {BPFFS}: mount succeeded but /proc/mounts does not show it"
        ));
    }
    Ok(())
}
