//! `cargo xtask vm-test`: the tests on another kernel, in a VM.
//!
//! Boots a Debian kernel package (default: Debian 12's newest 6.1 cloud
//! kernel) under qemu's software emulation and runs inside it, through the
//! real daemon and the real eBPF object:
//!
//! - `e2e_daemon`: the namespace testbed's `basic` scenario in TC and XDP mode
//!   (IPv4: the testbed's DNS answers A records only);
//! - `smoke`: IPv4 and IPv6 services in one daemon, TC and XDP mode, from a
//!   shell script with dnsmasq and busybox httpd (`vm/smoke.sh`);
//! - `packet`: every `BPF_PROG_TEST_RUN` packet test, both hooks, IPv4 and IPv6;
//! - `fuzz`: the random-packet run, shortened (`XDPLB_FUZZ_PACKETS`).
//!
//! Why TCG: `/dev/kvm` on these machines is a nested page-table KVM
//! (`kvm_pvm`) on which stock Debian kernels hang right after decompression
//! (DESIGN.md, toolchain facts); qemu's `-accel tcg -cpu max` boots the 6.1
//! cloud kernel to `/init` in about 3 s and runs everything about 20x slower
//! than the host.
//!
//! The guest has no network and no shared file system (the cloud kernel has
//! no 9p): everything it needs is in the initramfs (`vm/initramfs.rs`), and
//! results come back over the serial console as `XDPLB-VM-...` lines
//! (`vm/init.sh` describes them), which need no driver and stream while the
//! tests run. Every step has a time limit inside the guest; the whole boot
//! has one on the host, which kills qemu. No root needed.

mod cpio;
mod initramfs;
mod kernel;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    build::target_dir,
    cmd::{self, cargo, which},
    setup::{self, Report as SetupReport, Scope},
};

/// The hard limit of the qemu run (boot, every step, power-off) when nobody
/// says otherwise: 25 minutes, a bound for a hung guest, not the layer's
/// usual time (about 15 minutes, builds included, inside CI's 90). The
/// steps' own limits add up to less, so a slow step is killed and reported
/// while the others still run.
pub const DEFAULT_TIMEOUT_SECS: u64 = 1500;

/// One thing run inside the guest.
struct Step {
    name: &'static str,
    /// The `tests` crate's test target whose binary this runs (`/t/<target>`).
    test: Option<&'static str>,
    /// The program when it is not a test binary.
    program: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    /// Seconds before the guest kills it (busybox `timeout -s KILL`).
    limit: u32,
    what: &'static str,
}

/// In order: the short end-to-end steps first, so their answer comes early.
const STEPS: &[Step] = &[
    Step {
        name: "e2e_daemon",
        test: Some("e2e_daemon"),
        program: "",
        args: &["--test-threads=1", "--exact", "basic::tc", "basic::xdp"],
        env: &[],
        // Measured: about 35 s when the daemon fails to start; the testbed
        // waits 30 s for a daemon to come up.
        limit: 130,
        what: "namespace testbed + real daemon, IPv4 TCP/UDP, TC and XDP",
    },
    Step {
        name: "smoke",
        test: None,
        program: "/vm/smoke.sh",
        args: &["tc", "xdp"],
        env: &[],
        // Measured: about 30 s when the daemon fails to start; it waits 60 s
        // per mode for a daemon that does not answer.
        limit: 170,
        what: "real daemon, IPv4 + IPv6 services, TC and XDP",
    },
    Step {
        name: "packet",
        test: Some("packet"),
        program: "",
        args: &["--test-threads=1"],
        env: &[],
        // Measured 2026-12-04 on 6.1.0-57: about 10 s a test, most of it
        // the lab's load (maps, verifier) under emulation; 57 of the 60
        // tests in 600 s on a slow day (host: 53 s for all).
        limit: 1000,
        what: "BPF_PROG_TEST_RUN, XDP and TC, IPv4 and IPv6",
    },
    Step {
        name: "fuzz",
        test: Some("fuzz"),
        program: "",
        args: &["--test-threads=1"],
        env: &[("XDPLB_FUZZ_PACKETS", "20000")],
        // Measured: 37 s; 47 and 67 s on the slow days of 2026-12-04.
        limit: 120,
        what: "random packets, shortened (20,000 XDP + 4,000 TC)",
    },
];

pub struct Options {
    /// A Debian kernel package name or a `.deb`; None: the newest 6.1 cloud kernel.
    pub kernel: Option<String>,
    pub timeout: Duration,
    /// Step names to run; empty: all.
    pub only: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kernel: None,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            only: Vec::new(),
        }
    }
}

/// What one step did, as read from the console.
#[derive(Default)]
struct StepResult {
    name: String,
    what: &'static str,
    started: Option<Instant>,
    secs: f64,
    /// The guest's exit status of the step; None: never finished.
    rc: Option<i32>,
    /// libtest's counts, summed over its "test result:" lines.
    libtest: Option<(u32, u32, u32)>,
    failed_tests: Vec<String>,
    /// Names listed since libtest's last "failures:" line.
    failures_listed: Option<Vec<String>>,
    checks_ok: Vec<String>,
    checks_failed: Vec<String>,
    /// When the last libtest "test NAME ..." line arrived (or the step began).
    last_test_at: Option<Instant>,
    /// Each test's time in the guest: from the line before it to its own
    /// (one test thread, so that is the test's run plus libtest's printing).
    test_secs: Vec<(String, f64)>,
    /// The test whose "test NAME ... " line the step's kill cut short.
    killed_in: Option<(String, f64)>,
}

impl StepResult {
    fn passed(&self) -> bool {
        self.rc == Some(0)
            && self.checks_failed.is_empty()
            && match self.libtest {
                Some((_, failed, _)) => failed == 0,
                None => !self.checks_ok.is_empty(),
            }
    }

    fn counts(&self) -> String {
        let mut s = match self.libtest {
            Some((p, f, i)) => format!("{p} passed, {f} failed, {i} ignored"),
            None if self.checks_ok.len() + self.checks_failed.len() > 0 => format!(
                "{} passed, {} failed",
                self.checks_ok.len(),
                self.checks_failed.len()
            ),
            None => "no result line".into(),
        };
        match (self.rc, &self.killed_in) {
            (Some(137), Some((test, secs))) => {
                let _ = write!(
                    s,
                    "; killed at its time limit in `{test}` ({secs:.0} s in it, {} tests before)",
                    self.test_secs.len()
                );
            }
            (Some(137), None) => s.push_str("; killed at its time limit"),
            (Some(0) | None, _) => {}
            (Some(rc), _) => {
                let _ = write!(s, "; exit {rc}");
            }
        }
        if self.rc.is_none() {
            s.push_str("; did not finish");
        }
        s
    }

    /// The slowest tests, longest first, for the summary: where a step's
    /// time goes, so a limit can be set (or a test shortened) knowingly.
    fn slowest(&self, n: usize) -> Option<String> {
        let mut by_time: Vec<&(String, f64)> = self.test_secs.iter().collect();
        by_time.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shown: Vec<String> = by_time
            .iter()
            .take(n)
            .map(|(name, secs)| format!("{name} {secs:.0} s"))
            .collect();
        (!shown.is_empty()).then(|| shown.join(", "))
    }
}

/// Everything the run measured.
pub struct Report {
    package: String,
    version: String,
    guest_release: Option<String>,
    download: Option<f64>,
    build_secs: f64,
    initramfs_secs: f64,
    base_cached: bool,
    initrd_mib: f64,
    boot_secs: Option<f64>,
    vm_secs: f64,
    steps: Vec<StepResult>,
    warnings: Vec<String>,
    /// Why the run as a whole failed (timeout, qemu error, no power-off).
    fatal: Option<String>,
    console_log: PathBuf,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.fatal.is_none() && self.steps.iter().all(StepResult::passed)
    }

    /// One line naming what failed, for the `cargo xtask test` summary.
    pub fn failure_line(&self) -> String {
        let mut parts: Vec<String> = self
            .steps
            .iter()
            .filter(|s| !s.passed())
            .map(|s| format!("{}: {}", s.name, s.counts()))
            .collect();
        if let Some(fatal) = &self.fatal {
            parts.push(fatal.clone());
        }
        format!(
            "{} (kernel {}; console log {})",
            parts.join("; "),
            self.guest_release.as_deref().unwrap_or("?"),
            self.console_log.display()
        )
    }

    pub fn print(&self) {
        println!(
            "\nvm-test summary: {} {}, `uname -r` inside: {}",
            self.package,
            self.version,
            self.guest_release.as_deref().unwrap_or("(never booted)")
        );
        for s in &self.steps {
            let word = if s.passed() { "ok" } else { "FAILED" };
            println!(
                "  {word:<7} {:<11} {:<48} {:>6.1} s  {}",
                s.name,
                s.counts(),
                s.secs,
                s.what
            );
            for t in &s.failed_tests {
                println!("            failed: {t}");
            }
            if let Some(slowest) = s.slowest(5) {
                println!("            slowest: {slowest}");
            }
            for c in &s.checks_ok {
                println!("            ok      {c}");
            }
            for c in &s.checks_failed {
                println!("            FAILED  {c}");
            }
        }
        for w in &self.warnings {
            println!("  warning: {w}");
        }
        let download = match self.download {
            Some(secs) => format!("downloaded in {secs:.1} s"),
            None => "cached".into(),
        };
        println!(
            "  kernel {download}; builds {:.1} s; initramfs {:.1} MiB in {:.1} s (base {}); \
             boot to /init {}; in the VM {:.1} s",
            self.build_secs,
            self.initrd_mib,
            self.initramfs_secs,
            if self.base_cached { "cached" } else { "built" },
            self.boot_secs
                .map_or("never".into(), |s| format!("{s:.1} s")),
            self.vm_secs
        );
        if let Some(fatal) = &self.fatal {
            println!("  FAILED: {fatal}");
        }
        println!("  console log: {}", self.console_log.display());
    }
}

/// `cargo xtask vm-test`.
pub fn vm_test(opts: &Options) -> Result<()> {
    // What building needs (nightly, bpf-linker); the VM itself needs no root.
    setup::ensure(Scope::Toolchain, false, SetupReport::Summary)?;
    let report = run(opts)?;
    report.print();
    if !report.passed() {
        bail!("vm-test failed: {}", report.failure_line());
    }
    Ok(())
}

/// What `cargo xtask setup` caches: the kernel package and the base initramfs.
/// Returns a line saying what is cached, and whether this call fetched or
/// built anything.
pub fn prepare_cache(kernel_spec: Option<&str>) -> Result<(String, bool)> {
    let started = Instant::now();
    let kernel = kernel::ensure(kernel_spec)?;
    let base = initramfs::base(&kernel)?;
    let line = format!(
        "VM kernel {} {} ({}) and initramfs base ({}, {:.1} MiB) in {}{}",
        kernel.package,
        kernel.version,
        if kernel.downloaded {
            format!("downloaded in {:.1} s", started.elapsed().as_secs_f64())
        } else {
            "cached".into()
        },
        if base.built { "built" } else { "cached" },
        base.size as f64 / 1048576.0,
        kernel::cache_root()?.display(),
        if base.missing_modules.is_empty() {
            String::new()
        } else {
            format!(
                "; the kernel lacks modules {}",
                base.missing_modules.join(", ")
            )
        }
    );
    Ok((line, kernel.downloaded || base.built))
}

/// Builds, boots, runs the steps; `Err` only when the VM could not be
/// started at all (the report says how the tests went).
pub fn run(opts: &Options) -> Result<Report> {
    let steps: Vec<&Step> = STEPS
        .iter()
        .filter(|s| opts.only.is_empty() || opts.only.iter().any(|o| o == s.name))
        .collect();
    if steps.is_empty() {
        let names: Vec<&str> = STEPS.iter().map(|s| s.name).collect();
        bail!("--only matches no step; the steps are {}", names.join(", "));
    }
    let qemu = which("qemu-system-x86_64").context(
        "qemu-system-x86_64 is missing (Debian package qemu-system-x86; `cargo xtask setup` \
         as root installs it)",
    )?;

    let started = Instant::now();
    let kernel = kernel::ensure(opts.kernel.as_deref())?;
    let download = kernel.downloaded.then(|| started.elapsed().as_secs_f64());
    println!(
        "vm: kernel {} {} ({}), vmlinuz {}",
        kernel.package,
        kernel.version,
        kernel.release,
        kernel.vmlinuz.display()
    );

    let build_started = Instant::now();
    let binaries = build_binaries(&steps)?;
    let build_secs = build_started.elapsed().as_secs_f64();

    let init_started = Instant::now();
    let base = initramfs::base(&kernel)?;
    let work = target_dir().join("vm");
    fs::create_dir_all(&work)?;
    let run_part = work.join("run.cpio");
    initramfs::run_part(
        &run_part,
        &work.join("bin"),
        &binaries,
        &steps_script(&steps),
    )?;
    let initrd = work.join("initrd.cpio");
    let initrd_size = initramfs::concat(&base.path, &run_part, &initrd)?;
    let initramfs_secs = init_started.elapsed().as_secs_f64();
    println!(
        "vm: initramfs {} ({:.1} MiB; base {} {})",
        initrd.display(),
        initrd_size as f64 / 1048576.0,
        if base.built { "built" } else { "cached" },
        base.path.display()
    );
    let mut warnings: Vec<String> = base
        .missing_modules
        .iter()
        .map(|m| {
            format!(
                "kernel {} has no module {m} (neither file nor built in)",
                kernel.release
            )
        })
        .collect();

    let console_log = work.join("console.log");
    let mut report = Report {
        package: kernel.package.clone(),
        version: kernel.version.clone(),
        guest_release: None,
        download,
        build_secs,
        initramfs_secs,
        base_cached: !base.built,
        initrd_mib: initrd_size as f64 / 1048576.0,
        boot_secs: None,
        vm_secs: 0.0,
        steps: steps
            .iter()
            .map(|s| StepResult {
                name: s.name.into(),
                what: s.what,
                ..StepResult::default()
            })
            .collect(),
        warnings: Vec::new(),
        fatal: None,
        console_log: console_log.clone(),
    };
    boot(
        &qemu,
        &kernel.vmlinuz,
        &initrd,
        opts.timeout,
        &console_log,
        &mut report,
    )?;
    warnings.append(&mut report.warnings);
    report.warnings = warnings;
    Ok(report)
}

/// Builds `xdplb` and the test binaries the steps need (dev profile, the one
/// `cargo xtask test` already built), and returns (guest path, host path).
fn build_binaries(steps: &[&Step]) -> Result<Vec<(String, PathBuf)>> {
    // An eBPF-less daemon (AYA_BUILD_SKIP) would fail every step; never inherit it.
    cmd::run(cargo().env_remove("AYA_BUILD_SKIP").args([
        "build",
        "--package",
        "lb-user",
        "--bin",
        "xdplb",
    ]))?;
    let daemon = target_dir().join("debug").join("xdplb");
    let mut out = vec![("/t/xdplb".to_string(), daemon)];
    let tests: Vec<&str> = steps.iter().filter_map(|s| s.test).collect();
    if tests.is_empty() {
        return Ok(out);
    }
    let mut no_run = cargo();
    no_run.env_remove("AYA_BUILD_SKIP").args([
        "test",
        "--package",
        "tests",
        "--no-run",
        "--message-format=json",
    ]);
    for t in &tests {
        no_run.args(["--test", t]);
    }
    println!("$ {}", cmd::render(&no_run));
    let output = no_run
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the test binaries failed ({})", output.status);
    }
    let json = String::from_utf8_lossy(&output.stdout);
    for t in tests {
        let exe = executable_of(&json, t)
            .with_context(|| format!("cargo printed no executable for test target {t}"))?;
        out.push((format!("/t/{t}"), exe));
    }
    Ok(out)
}

/// The `executable` of the compiler-artifact message for test target `name`
/// (cargo's JSON messages, one per line; read without a JSON parser: the
/// fields are plain strings).
fn executable_of(json: &str, name: &str) -> Option<PathBuf> {
    let field = |line: &str, key: &str| -> Option<String> {
        let start = line.find(key)? + key.len();
        let end = line[start..].find('"')?;
        Some(line[start..start + end].to_string())
    };
    json.lines()
        .filter(|l| l.contains(r#""reason":"compiler-artifact""#))
        .filter(|l| {
            l.find(r#""target":{"#)
                .and_then(|at| field(&l[at..], r#""name":""#))
                .is_some_and(|n| n == name)
        })
        .find_map(|l| field(l, r#""executable":""#))
        .map(PathBuf::from)
}

/// `/vm/steps.sh`: one `step` line each (the function is in `vm/init.sh`).
fn steps_script(steps: &[&Step]) -> String {
    let mut s = String::from("# Written by cargo xtask vm-test.\nexport XDPLB_BIN=/t/xdplb\n");
    for step in steps {
        let mut words = vec![step.name.to_string(), step.limit.to_string()];
        if !step.env.is_empty() {
            words.push("env".into());
            words.extend(step.env.iter().map(|(k, v)| format!("{k}={v}")));
        }
        words.push(match step.test {
            Some(t) => format!("/t/{t}"),
            None => step.program.to_string(),
        });
        words.extend(step.args.iter().map(|a| a.to_string()));
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let _ = writeln!(s, "step {}", quoted.join(" "));
    }
    s
}

/// Boots qemu, streams the console to stdout and `console_log`, and fills in
/// `report` from the protocol lines. Kills qemu at `timeout`.
fn boot(
    qemu: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    timeout: Duration,
    console_log: &Path,
    report: &mut Report,
) -> Result<()> {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2G"])
        // No VGA, NIC or monitor: the serial port is the guest's only device.
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1: if /init dies, the kernel reboots at once, and
        // -no-reboot turns that into qemu exiting.
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!("$ {}", cmd::render(&cmd));
    println!(
        "vm: console below (prefixed `vm|`), also in {}; hard limit {} s",
        console_log.display(),
        timeout.as_secs()
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let log_path = console_log.to_path_buf();
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut log = fs::File::create(&log_path)?;
        let mut lines = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if lines.read_until(b'\n', &mut buf)? == 0 {
                return Ok(());
            }
            log.write_all(&buf)?;
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if tx.send(line).is_err() {
                return Ok(());
            }
        }
    });

    let deadline = started + timeout;
    let mut done = false;
    let mut current: Option<usize> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let during = match current {
                Some(i) => format!(
                    "while step `{}` ran ({:.0} s in)",
                    report.steps[i].name,
                    report.steps[i]
                        .started
                        .map_or(0.0, |t| t.elapsed().as_secs_f64())
                ),
                None if report.guest_release.is_none() => "before the guest reached /init".into(),
                None => "between steps".into(),
            };
            report.fatal = Some(format!(
                "the VM exceeded its hard limit of {} s {during}; qemu was killed. The steps' \
                 own limits should have stopped it first: the guest is slower than usual or \
                 hangs (see the console log); raise the limit with --timeout SECS",
                timeout.as_secs()
            ));
            break;
        }
        let line = match rx.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        println!("vm| {line}");
        // Kernel messages may precede a marker on the same console line.
        let marker = line.find("XDPLB-VM-").map(|at| &line[at..]);
        match marker.and_then(|m| m.split_once(' ').or(Some((m, "")))) {
            Some(("XDPLB-VM-BOOTED", rest)) => {
                report.boot_secs = Some(started.elapsed().as_secs_f64());
                report.guest_release = rest.strip_prefix("kernel=").map(str::to_string);
            }
            Some(("XDPLB-VM-WARN", rest)) => report.warnings.push(rest.to_string()),
            Some(("XDPLB-VM-BEGIN", name)) => {
                current = report.steps.iter().position(|s| s.name == name);
                if let Some(i) = current {
                    report.steps[i].started = Some(Instant::now());
                    report.steps[i].last_test_at = report.steps[i].started;
                }
            }
            Some(("XDPLB-VM-END", rest)) => {
                if let Some(i) = current.take() {
                    let s = &mut report.steps[i];
                    // A test cut short leaves "test NAME ... " unfinished,
                    // and the marker lands on the end of that line.
                    let before = &line[..line.len() - marker.map_or(0, str::len)];
                    if let Some(name) = test_line_name(before) {
                        let secs = s.last_test_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
                        s.killed_in = Some((name.to_string(), secs));
                    }
                    s.rc = rest
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("rc="))
                        .and_then(|rc| rc.parse().ok());
                    s.secs = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
                }
            }
            Some(("XDPLB-VM-CHECK", rest)) => {
                if let Some(i) = current {
                    let mut words = rest.splitn(3, ' ');
                    let (name, verdict, detail) = (
                        words.next().unwrap_or(""),
                        words.next().unwrap_or(""),
                        words.next().unwrap_or(""),
                    );
                    let entry = format!("{name}: {detail}");
                    if verdict == "ok" {
                        report.steps[i].checks_ok.push(entry);
                    } else {
                        report.steps[i].checks_failed.push(entry);
                    }
                }
            }
            Some(("XDPLB-VM-DONE", _)) => done = true,
            _ => {
                if let Some(i) = current {
                    libtest_line(&line, &mut report.steps[i], Instant::now());
                }
            }
        }
    }
    // Powered off (or killed): qemu exits, the reader sees EOF.
    let status = child.wait().context("waiting for qemu")?;
    let _ = reader.join();
    report.vm_secs = started.elapsed().as_secs_f64();
    if let Some(i) = current {
        let s = &mut report.steps[i];
        s.secs = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    }
    if report.fatal.is_none() {
        if report.guest_release.is_none() {
            report.fatal = Some(format!(
                "the guest never reached /init (qemu {status}); see the console log"
            ));
        } else if !done {
            report.fatal = Some(format!(
                "the guest stopped before finishing its steps (qemu {status}; a kernel panic \
                 or a crash of /init); see the console log"
            ));
        }
    }
    Ok(())
}

/// NAME, from libtest's "test NAME ... " (with or without its verdict).
fn test_line_name(line: &str) -> Option<&str> {
    let (name, _) = line.strip_prefix("test ")?.split_once(" ... ")?;
    (!name.is_empty() && !name.contains(' ')).then_some(name)
}

/// libtest's "test result: ok. 32 passed; 0 failed; 1 ignored; ..." and the
/// list of failed tests before it ("failures:", then one indented name a
/// line). "test NAME ... FAILED" is no use: a test's own output often comes
/// between the name and the verdict. Also times each test (`test_secs`)
/// and notes the one a kill cut short (`killed_in`).
fn libtest_line(line: &str, step: &mut StepResult, now: Instant) {
    if let Some(name) = test_line_name(line) {
        let since = step.last_test_at.replace(now).unwrap_or(now);
        let secs = (now - since).as_secs_f64();
        // The guest's shell reports the step's kill on the test's own line.
        if line.ends_with(" ... Killed") {
            step.killed_in = Some((name.to_string(), secs));
        } else {
            step.test_secs.push((name.to_string(), secs));
        }
    } else if line.trim_end() == "failures:" {
        step.failures_listed = Some(Vec::new());
    } else if let (Some(names), Some(name)) = (
        step.failures_listed.as_mut(),
        line.strip_prefix("    ")
            .filter(|n| !n.is_empty() && !n.contains(' ')),
    ) {
        names.push(name.to_string());
    } else if let Some(rest) = line.trim().strip_prefix("test result: ") {
        step.failed_tests
            .extend(step.failures_listed.take().unwrap_or_default());
        let count = |word: &str| -> u32 {
            rest.split(';')
                .filter_map(|part| {
                    let mut it = part.split_whitespace().rev();
                    let (w, n) = (it.next()?, it.next()?);
                    (w == word).then(|| n.parse::<u32>().ok()).flatten()
                })
                .sum()
        };
        let (p, f, i) = step.libtest.unwrap_or_default();
        step.libtest = Some((
            p + count("passed"),
            f + count("failed"),
            i + count("ignored"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_counts_are_read() {
        let mut s = StepResult::default();
        for line in [
            "test basic::tc ... --- daemon 0 log ---",
            "FAILED",
            "failures:",
            "",
            "---- basic::tc stdout ----",
            "    some indented output",
            "failures:",
            "    basic::tc",
            "",
        ] {
            libtest_line(line, &mut s, Instant::now());
        }
        libtest_line(
            "test result: FAILED. 31 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; \
             finished in 290.12s",
            &mut s,
            Instant::now(),
        );
        assert_eq!(s.libtest, Some((31, 1, 2)));
        assert_eq!(s.failed_tests, ["basic::tc"]);
    }

    #[test]
    fn each_test_is_timed_from_the_line_before_it() {
        let began = Instant::now();
        let mut s = StepResult {
            last_test_at: Some(began),
            ..StepResult::default()
        };
        let at = |secs| began + Duration::from_secs(secs);
        libtest_line("test parse::short ... ok", &mut s, at(2));
        libtest_line("some output the test printed", &mut s, at(3));
        libtest_line("test forward::long ... ok", &mut s, at(40));
        libtest_line("test states::ignored ... ignored", &mut s, at(41));
        libtest_line("test reply::reply_path::xdp ... Killed", &mut s, at(61));
        assert_eq!(
            s.killed_in,
            Some(("reply::reply_path::xdp".to_string(), 20.0))
        );
        let secs: Vec<(&str, u64)> = s
            .test_secs
            .iter()
            .map(|(n, t)| (n.as_str(), t.round() as u64))
            .collect();
        assert_eq!(
            secs,
            [
                ("parse::short", 2),
                ("forward::long", 38),
                ("states::ignored", 1)
            ]
        );
        assert_eq!(
            s.slowest(2).as_deref(),
            Some("forward::long 38 s, parse::short 2 s")
        );
        // What the step's kill leaves: the unfinished line, then the marker.
        assert_eq!(test_line_name("test nat::slow ... "), Some("nat::slow"));
        assert_eq!(test_line_name("test result: ok. 3 passed"), None);
        assert_eq!(test_line_name("tests ran ... fine"), None);
    }

    #[test]
    fn executables_are_found_by_target_name() {
        let json = concat!(
            r#"{"reason":"compiler-artifact","package_id":"x","target":{"kind":["lib"],"name":"tests"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","package_id":"x","target":{"kind":["test"],"name":"packet","src_path":"/w/tests/tests/packet.rs"},"profile":{},"executable":"/w/target/debug/deps/packet-1234"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            executable_of(json, "packet"),
            Some(PathBuf::from("/w/target/debug/deps/packet-1234"))
        );
        assert_eq!(executable_of(json, "tests"), None);
        assert_eq!(executable_of(json, "fuzz"), None);
    }

    #[test]
    fn steps_fit_inside_the_hard_limit() {
        let total: u64 = STEPS.iter().map(|s| u64::from(s.limit)).sum();
        // Boot (about 6 s) and power-off take seconds.
        assert!(
            total + 30 <= DEFAULT_TIMEOUT_SECS,
            "steps' limits add up to {total} s, the hard limit is {DEFAULT_TIMEOUT_SECS} s"
        );
    }
}
