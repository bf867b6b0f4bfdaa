//! `cargo xtask bench`: run the benchmark binary of the `tests` crate.

use anyhow::{bail, Context as _, Result};

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

/// `cargo xtask bench-ab REV`: §1's per-packet costs of the data plane at
/// `REV` beside this checkout's, measured in alternating rounds on the same
/// machine in the same minutes. A full run's figures move by 10-20% between
/// runs (the empty floor alone moves 80-110 ns here), too much to tell a 5%
/// change; alternating rounds see the same drift on both sides.
pub fn bench_ab(base: &str, rounds: usize, runs: u32) -> Result<()> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    setup::ensure(Scope::Full, false, Report::Summary)?;
    let root = workspace_root();
    let rev = {
        let out = std::process::Command::new("git")
            .current_dir(root)
            .args(["rev-parse", "--verify", "--short=12"])
            .arg(format!("{base}^{{commit}}"))
            .output()?;
        if !out.status.success() {
            bail!(
                "{base:?} is not a commit of this repository: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // A worktree of its own (and so a target directory of its own) per
    // base, kept for the next comparison: building a base takes minutes.
    let tree = root.join("target/bench-ab").join(&rev);
    if !tree.join("Cargo.toml").exists() {
        let _ = std::fs::remove_dir_all(&tree);
        run(std::process::Command::new("git").current_dir(root).args([
            "worktree",
            "add",
            "--force",
            "--detach",
            &tree.to_string_lossy(),
            &rev,
        ]))?;
    }
    for dir in [tree.as_path(), root] {
        run(cargo()
            .current_dir(dir)
            .args(["build", "--package", "tests", "--bin", "bench"]))?;
    }
    let sides = [
        (format!("base {rev}"), tree.join("target/debug/bench")),
        ("this checkout".to_owned(), root.join("target/debug/bench")),
    ];
    let mut results: Vec<Vec<ab::Round>> = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        // Alternate which side goes first, so neither always runs on a
        // machine the other has just warmed.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (name, bin) = &sides[side];
            println!("round {}/{rounds}: {name}", round + 1);
            let out = std::process::Command::new(bin)
                .args(["--only", "dataplane", "--quick", "--runs"])
                .arg(runs.to_string())
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", bin.display()))?;
            if !out.status.success() {
                bail!("{} failed ({})", bin.display(), out.status);
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let parsed = ab::parse_cost_table(&text);
            if parsed.is_empty() {
                bail!("{} printed no per-packet table:\n{text}", bin.display());
            }
            results[side].push(parsed);
        }
    }
    print!("{}", ab::compare(&sides[0].0, &results[0], &results[1]));
    Ok(())
}

/// Reading §1's table and comparing two sides (pure; unit-tested).
mod ab {
    use std::{collections::BTreeMap, fmt::Write as _};

    /// One round: (case, hook) -> (median ns, paired empty ns).
    pub type Round = BTreeMap<(String, String), (f64, f64)>;

    /// The rows of §1's table as the bench prints it: `case hook median ns
    /// p90 ns empty ns ...`, columns aligned with spaces, between the
    /// section's `== 1.` heading and the next heading.
    pub fn parse_cost_table(text: &str) -> Round {
        let mut out = Round::new();
        let section = text
            .split("\n== ")
            .find(|s| s.starts_with("1."))
            .unwrap_or("");
        for line in section.lines().skip(1) {
            let t: Vec<&str> = line.split_whitespace().collect();
            let Some(i) = t.iter().position(|w| matches!(*w, "xdp" | "tc")) else {
                continue;
            };
            if i == 0 || t.len() < i + 7 || t[i + 2] != "ns" || t[i + 6] != "ns" {
                continue;
            }
            let case = t[..i].join(" ");
            if case.starts_with("baseline") {
                continue;
            }
            if let (Ok(median), Ok(empty)) = (t[i + 1].parse::<f64>(), t[i + 5].parse::<f64>()) {
                out.insert((case, t[i].to_owned()), (median, empty));
            }
        }
        out
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    /// Per case: the median over rounds of (median - paired empty) on each
    /// side, and the change.
    pub fn compare(base: &str, a: &[Round], b: &[Round]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\ncost above the empty program (paired), median of {} rounds each\n\n\
             | case | hook | {base} | this checkout | change |\n|---|---|---:|---:|---:|",
            a.len().min(b.len())
        );
        let above = |rounds: &[Round], k: &(String, String)| -> Option<f64> {
            let v: Vec<f64> = rounds
                .iter()
                .filter_map(|r| r.get(k).map(|(m, e)| m - e))
                .collect();
            (!v.is_empty()).then(|| median(v))
        };
        let keys: std::collections::BTreeSet<_> =
            a.iter().chain(b).flat_map(|r| r.keys().cloned()).collect();
        for k in keys {
            let (x, y) = (above(a, &k), above(b, &k));
            let cell = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.0} ns"));
            let change = match (x, y) {
                (Some(x), Some(y)) if x > 0.0 => format!("{:+.1}%", (y - x) / x * 100.0),
                _ => "–".to_owned(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {change} |",
                k.0,
                k.1,
                cell(x),
                cell(y)
            );
        }
        s
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const TABLE: &str = "\
xdplb benchmarks (--quick)

== 1. Data-plane cost per packet
case                         hook   median      p90  empty XDP (paired)  vs empty XDP
baseline: empty XDP program   xdp    80 ns   110 ns               80 ns         1.00x
established TCP IPv4          xdp   561 ns   681 ns               80 ns         7.01x
established TCP IPv4           tc   801 ns   882 ns              101 ns         7.93x

== 2a. Cost against connection-table size
1000 xdp 681 ns 90 ns 90 ns 7.57x
";

        #[test]
        fn reads_the_cost_rows_only() {
            let r = parse_cost_table(TABLE);
            assert_eq!(r.len(), 2, "{r:?}");
            let k = ("established TCP IPv4".to_owned(), "tc".to_owned());
            assert_eq!(r[&k], (801.0, 101.0));
        }

        #[test]
        fn compares_cost_above_the_paired_empty_program() {
            let a = vec![parse_cost_table(TABLE)];
            let b = vec![parse_cost_table(&TABLE.replace(
                "561 ns   681 ns               80 ns",
                "520 ns   681 ns               60 ns",
            ))];
            let out = compare("base", &a, &b);
            // 481 ns above empty before, 460 after: -4.4%.
            assert!(
                out.contains("| established TCP IPv4 | xdp | 481 ns | 460 ns | -4.4% |"),
                "{out}"
            );
            assert!(
                out.contains("| established TCP IPv4 | tc | 700 ns | 700 ns | +0.0% |"),
                "{out}"
            );
        }
    }
}
