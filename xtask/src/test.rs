//! `cargo xtask test`: every check CI runs, in one command.
//!
//! Order: formatting (instant), unit tests (no root), the release artifacts
//! (`dist.rs`: built, installed into a scratch root, checked), packet tests (root),
//! the VM layer (Debian 12's kernel 6.1 under qemu, `vm.rs`), swarm
//! end-to-end (when a Docker engine answers), then clippy. Every layer
//! runs even when an earlier one failed, so one run shows everything that is
//! wrong; the summary at the end says which layers ran and how they went.
//!
//! Build reuse: everything uses the dev profile, so the unit and packet layers
//! share their artifacts (the eBPF object inside is always `--release`, built
//! once by aya-build). Clippy compiles workspace crates again through
//! clippy-driver; for that check-only build `AYA_BUILD_SKIP=1` saves a second
//! eBPF build (the lints do not need the object's bytes). The dist layer
//! builds `--release`, as `bench` does, and swarm end-to-end reuses it.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::{
    build::{ebpf_rustflags, BPF_TARGET},
    cmd::{cargo, is_root, nightly_cargo, status},
    dist,
    setup::{self, Report, Scope},
    swarm, vm,
};

enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

struct Layer {
    name: &'static str,
    outcome: Outcome,
    secs: f64,
}

fn timed(name: &'static str, f: impl FnOnce() -> Result<Outcome>) -> Layer {
    println!("\n==> {name}");
    let started = Instant::now();
    let outcome = f().unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
    Layer {
        name,
        outcome,
        secs: started.elapsed().as_secs_f64(),
    }
}

fn passed_if(ok: bool, what: &str) -> Outcome {
    if ok {
        Outcome::Passed
    } else {
        Outcome::Failed(format!("{what} failed (output above)"))
    }
}

pub fn test() -> Result<()> {
    let root = is_root();
    // Without root, install nothing system-wide; the packet layer reports the problem.
    let scope = if root { Scope::Full } else { Scope::Toolchain };
    setup::ensure(scope, false, Report::Summary)?;

    let mut layers = Vec::new();

    // rustfmt.toml uses group_imports / imports_granularity, which only nightly
    // rustfmt applies (stable ignores them with a warning).
    layers.push(timed("rustfmt (nightly, all crates)", || {
        let ok = status(nightly_cargo().args(["fmt", "--all", "--", "--check"]))?.success();
        Ok(passed_if(
            ok,
            "`cargo +nightly fmt --all -- --check`; fix with `cargo +nightly fmt --all`",
        ))
    }));

    // lb-ebpf only builds for the BPF target; `tests` holds the root-only layers.
    layers.push(timed("unit tests (no root)", || {
        let ok = status(cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--exclude",
            "tests",
        ]))?
        .success();
        Ok(passed_if(ok, "unit tests"))
    }));

    // Release artifacts, installed and checked (dist.rs). Before the packet
    // layer: its upgrade test then upgrades the debug daemon to the .deb's.
    let mut packaged = None;
    layers.push(timed("dist: tarball, .deb, image", || {
        let checked = dist::check(&dist::build()?)?;
        packaged = Some(checked.installed_xdplb);
        Ok(Outcome::Passed)
    }));

    layers.push(timed(
        "packet + namespace tests (root, tests crate)",
        || {
            if !root {
                return Ok(Outcome::Failed(
                    "needs root: these tests load BPF programs (BPF_PROG_TEST_RUN) and create \
                 network namespaces; run `cargo xtask test` as root"
                        .into(),
                ));
            }
            // One at a time: the tests share pinned paths and namespace names.
            let mut cmd = cargo();
            if let Some(xdplb) = &packaged {
                cmd.env("XDPLB_UPGRADE_BIN", xdplb);
            }
            let ok = status(cmd.args(["test", "--package", "tests", "--", "--test-threads=1"]))?
                .success();
            Ok(passed_if(ok, "tests crate"))
        },
    ));

    // Debian 12's kernel in qemu (TCG): the packet tests, the fuzz run
    // (shortened) and the daemon end to end on 6.1. No root needed; about
    // 8 minutes on 2 cores. `XDPLB_TEST_VM=0` skips it (says so below).
    layers.push(timed("VM (Debian 12 kernel 6.1)", || {
        if std::env::var_os("XDPLB_TEST_VM").is_some_and(|v| v == "0") {
            let why = "XDPLB_TEST_VM=0 (run it alone with `cargo xtask vm-test`)";
            println!("VM layer: skipped: {why}");
            return Ok(Outcome::Skipped(why.into()));
        }
        let report = vm::run(&vm::Options::default())?;
        report.print();
        Ok(if report.passed() {
            Outcome::Passed
        } else {
            Outcome::Failed(report.failure_line())
        })
    }));

    // Runs whenever an engine answers; without one, one line says why.
    layers.push(timed("swarm end-to-end", || match swarm::engine_status() {
        Err(why) => {
            println!("swarm end-to-end: skipped: {why}");
            Ok(Outcome::Skipped(why))
        }
        Ok(engine) => {
            println!("swarm end-to-end: {engine} answers; running `cargo xtask swarm-e2e`");
            swarm::swarm_e2e(false).map(|()| Outcome::Passed)
        }
    }));

    layers.push(timed("clippy (host crates, all targets)", || {
        let ok = status(
            cargo()
                .env("AYA_BUILD_SKIP", "1")
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "lb-ebpf",
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"]),
        )?
        .success();
        Ok(passed_if(ok, "clippy on the host crates"))
    }));

    layers.push(timed("clippy (lb-ebpf, nightly, bpfel)", || {
        let ok = status(
            nightly_cargo()
                .env("CARGO_ENCODED_RUSTFLAGS", ebpf_rustflags())
                .args(["clippy", "--package", "lb-ebpf", "--target", BPF_TARGET])
                .args(["-Z", "build-std=core", "--", "-D", "warnings"]),
        )?
        .success();
        Ok(passed_if(ok, "clippy on the eBPF crate"))
    }));

    println!("\nxtask test summary");
    let mut failed = Vec::new();
    for layer in &layers {
        let (word, note) = match &layer.outcome {
            Outcome::Passed => ("ok", String::new()),
            Outcome::Failed(why) => {
                failed.push(layer.name);
                ("FAILED", format!("  {why}"))
            }
            Outcome::Skipped(why) => ("skipped", format!("  {why}")),
        };
        println!("  {word:<8} {:<46} {:>6.1} s{note}", layer.name, layer.secs);
    }
    if !failed.is_empty() {
        bail!("{} layer(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
