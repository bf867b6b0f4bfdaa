//! `cargo xtask bench`: run the benchmark binary of the `tests` crate.

use anyhow::{bail, Result};

use crate::{
    cmd::{cargo, run, workspace_root},
    setup::{self, Report, Scope},
};

/// Whether the `tests` crate has a `bench` binary yet.
fn bench_binary_exists() -> bool {
    let tests = workspace_root().join("tests");
    tests.join("src/bin/bench.rs").exists()
        || tests.join("src/bin/bench/main.rs").exists()
        || std::fs::read_to_string(tests.join("Cargo.toml"))
            .is_ok_and(|manifest| manifest.contains("name = \"bench\""))
}

pub fn bench(quick: bool, args: &[String]) -> Result<()> {
    if !bench_binary_exists() {
        bail!(
            "the benchmark binary (tests/src/bin/bench.rs) does not exist yet; \
             it arrives with the benchmark issue (xdplb vs HAProxy)"
        );
    }
    setup::ensure(Scope::Full, false, Report::Summary)?;
    let e2e = !args
        .iter()
        .any(|a| a == "--no-e2e" || a == "--help" || a == "-h");
    if e2e {
        // haproxy and wrk serve only the end-to-end comparison: `setup` and
        // `test` do not install them. Without them the bench says what it
        // skipped.
        if let Err(e) = setup::ensure_packages(setup::BENCH_PACKAGES) {
            println!("warning: {e:#}; the end-to-end comparison with HAProxy will be skipped");
        }
        // The testbed runs the release daemon, as operators do: the debug
        // build spends seconds building Maglev tables for 1,000 services.
        run(cargo().args(["build", "--release", "--package", "lb-user"]))?;
    }
    let mut cmd = cargo();
    cmd.args([
        "run",
        // The dev profile: the kernel-reported durations do not depend on
        // userspace optimisation, and the test build is reused.
        "--package",
        "tests",
        "--bin",
        "bench",
        "--",
    ]);
    if quick {
        cmd.arg("--quick");
    }
    cmd.args(args);
    // The command line docs/BENCHMARKS.md records.
    let mut line = String::from("cargo xtask bench");
    for a in quick
        .then_some("--quick")
        .into_iter()
        .chain(args.iter().map(String::as_str))
    {
        line.push(' ');
        line.push_str(a);
    }
    cmd.env("XDPLB_BENCH_COMMAND", line);
    if e2e {
        cmd.env("XDPLB_BIN", workspace_root().join("target/release/xdplb"));
    }
    run(&mut cmd)
}
