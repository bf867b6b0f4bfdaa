//! Logs a pipeline can take: no escape codes in a log written to a file,
//! `--log-format json` gives one JSON object per line, and aya's 220-line
//! BTF dump is gone from a daemon's start.
//!
//! Root only (the daemon attaches): `cargo test -p tests --test logs`

use std::{
    fs::File,
    process::{Command, Stdio},
};

use testkit::bin::xdplb_bin;
use tests::testbed::{Mode, Testbed, Topology};

/// `xdplb down` on a pin dir that does not exist: logs one info line and
/// exits 0. Its stderr goes to a file, RUST_LOG and NO_COLOR unset.
fn down_log(extra: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("xdplb-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("down.log");
    let file = File::create(&path).expect("log file");
    let pin = format!("/sys/fs/bpf/xdplb-logs-absent-{}", std::process::id());
    let status = Command::new(xdplb_bin().expect("the xdplb binary"))
        .args(extra)
        .args(["down", "--pin-dir", &pin])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(file)
        .status()
        .expect("running xdplb down");
    let text = std::fs::read_to_string(&path).expect("reading the log");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "xdplb down exited {status}: {text}");
    text
}

#[test]
fn a_log_file_has_no_escape_codes() {
    let text = down_log(&[]);
    assert!(
        text.contains("INFO") && text.contains("nothing to remove"),
        "the info line is there: {text:?}"
    );
    assert!(
        !text.contains('\x1b'),
        "no ANSI escape codes in a log written to a file: {text:?}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let text = down_log(&["--log-format", "json"]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "some log lines: {text:?}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}"));
        assert!(
            v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(),
            "level, message and timestamp in every line: {line}"
        );
    }
    assert!(text.contains("nothing to remove"), "{text}");
}

#[test]
fn daemon_start_logs_json_without_the_btf_dump() {
    let tb = Testbed::build(Mode::Tc, Topology::new(1))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let mut cfg = tb.daemon_config();
    cfg.udp = false;
    let mut args = tb
        .config_args(&cfg)
        .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
    args.extend(["--log-format".to_string(), "json".to_string()]);
    let mut d = tb
        .start_daemon(&args)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    d.sigterm().unwrap_or_else(|e| panic!("{e:#}"));
    let log = d.log();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a daemon log line that is not JSON ({e}): {line:?}"));
        messages.push(v["message"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        messages.iter().any(|m| m.starts_with("running;")),
        "the daemon logged that it runs: {messages:#?}"
    );
    assert!(
        !log.contains("BTF couldn't be loaded") && !log.contains("magic: 0xeb9f"),
        "aya's BTF dump is not in the log:\n{log}"
    );
    assert!(
        messages.len() < 40,
        "a start logs a screenful, not a dump ({} lines):\n{log}",
        messages.len()
    );
}

/// The data plane's own lines reach the daemon's log (aya-log), marked
/// `source=dataplane`, once per event however many packets it hits: a
/// flood-guard threshold of 2 new flows per second, then 40 connections.
#[test]
fn the_data_planes_lines_reach_the_daemon_log() {
    let tb = Testbed::build(Mode::Tc, Topology::new(1))
        .unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let mut cfg = tb.daemon_config();
    cfg.udp = false;
    cfg.extra_conntrack = "flood_new_flows_per_second = 2\n".into();
    let mut args = tb
        .config_args(&cfg)
        .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
    args.extend(["--log-format".to_string(), "json".to_string()]);
    let mut d = tb
        .start_daemon(&args)
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    let url = tb.url("/");
    let mut answered = 0;
    let t0 = std::time::Instant::now();
    for _ in 0..40 {
        if tb.client().get(&url).is_ok() {
            answered += 1;
        }
    }
    eprintln!(
        "40 connections in {:?}; reasons {:?}",
        t0.elapsed(),
        tb.reason_stats().unwrap_or_default()
    );
    // Fresh SYNs still start flows under the guard.
    assert_eq!(
        answered, 40,
        "every connection answered under the flood guard"
    );
    d.wait_log("flood guard on on cpu", std::time::Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    d.sigterm().unwrap_or_else(|e| panic!("{e:#}"));
    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("flood guard on on cpu"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // Each CPU that saw more than its share (one new flow a second) says so,
    // and at most once in the 10 s its lines are limited to.
    assert!(!lines.is_empty() && lines.len() <= 4, "{log}");
    let mut last_on: std::collections::BTreeMap<String, String> = Default::default();
    for l in &lines {
        let msg = l["message"].as_str().unwrap_or_default();
        let cpu = msg.split_whitespace().nth(5).unwrap_or_default().to_owned();
        let at = l["timestamp"].as_str().unwrap_or_default().to_owned();
        if let Some(prev) = last_on.insert(cpu.clone(), at.clone()) {
            let secs = |t: &str| -> f64 {
                // "2026-12-03T15:56:25.405423Z": seconds within the day.
                let hms = &t[11..t.len() - 1];
                let p: Vec<f64> = hms.split(':').map(|x| x.parse().unwrap_or(0.0)).collect();
                p[0] * 3600.0 + p[1] * 60.0 + p[2]
            };
            assert!(
                secs(&at) - secs(&prev) >= 9.9,
                "two \"on\" lines for cpu {cpu} within 10 s:\n{log}"
            );
        }
    }
    for l in &lines {
        assert_eq!(l["source"], "dataplane", "{l}");
        assert_eq!(l["level"], "WARN", "{l}");
    }
}
