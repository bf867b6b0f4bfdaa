//! What the xdplb task says about itself: its log, and its drop counters
//! (`xdplb stats --json` run inside its container).

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};

use super::{
    docker::{containers, docker, poll},
    LB,
};
use crate::cmd::trace;

fn container() -> Result<String> {
    containers(LB, false)?
        .into_iter()
        .next()
        .context("no running xdplb container")
}

/// The daemon's log (stderr and stdout), colour codes removed.
pub fn log() -> Result<String> {
    let mut cmd = docker(["logs", &container()?]);
    trace(&cmd);
    let output = cmd.output().context("docker logs")?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok(strip_ansi(&text))
}

/// Packets the data plane dropped so far, by reason (`drop_*`), read with
/// `xdplb stats --json` inside the task. Empty if the daemon can't be asked.
pub fn drops() -> BTreeMap<String, u64> {
    container()
        .and_then(|id| poll(docker(["exec", &id, "xdplb", "stats", "--json"])))
        .map(|json| drop_counters(&json))
        .unwrap_or_default()
}

/// The counters that grew between two [`drops`] readings, as `name +N, ...`.
pub fn drops_between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let grown: Vec<String> = after
        .iter()
        .filter_map(|(name, n)| {
            let d = n.saturating_sub(before.get(name).copied().unwrap_or(0));
            (d > 0).then(|| format!("{name} +{d}"))
        })
        .collect();
    if grown.is_empty() {
        "none".into()
    } else {
        grown.join(", ")
    }
}

/// `reasons[]` entries of kind `drop` from `xdplb stats --json`
/// (docs/OBSERVABILITY.md): `{"name": .., "kind": "drop", "packets": N, ..}`.
/// A field scan, not a JSON parser: xtask stays on std, clap and anyhow.
fn drop_counters(json: &str) -> BTreeMap<String, u64> {
    let Some(start) = json.find("\"reasons\"") else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    let (mut name, mut is_drop) = (String::new(), false);
    for field in json[start..].split(['{', '}', ',', '\n']) {
        let Some((key, value)) = field.split_once(':') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match key.trim().trim_matches('"') {
            "name" => (name, is_drop) = (value.to_string(), false),
            "kind" => is_drop = value == "drop",
            "packets" if is_drop => {
                if let Ok(n) = value.parse() {
                    out.insert(name.clone(), n);
                }
            }
            _ => {}
        }
        if field.contains(']') {
            break;
        }
    }
    out
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A log line without its leading RFC 3339 timestamp.
pub fn without_timestamp(line: &str) -> &str {
    match line.split_once("Z ") {
        Some((ts, rest)) if ts.len() < 32 => rest.trim_start(),
        _ => line,
    }
}

/// Seconds into the UTC day of a log line's timestamp (`2026-11-26T07:55:37.543126Z`).
pub fn log_time_of_day(line: &str) -> Option<f64> {
    let time = line.get(11..)?.split('Z').next()?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

pub fn utc_time_of_day(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() % 86_400.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_lose_colour_and_timestamp() {
        let line = "\x1b[2m2026-11-26T07:55:37.543126Z\x1b[0m \x1b[32m INFO\x1b[0m 10.0.1.64:80 \
                    draining: gone from DNS";
        let plain = strip_ansi(line);
        assert_eq!(
            plain,
            "2026-11-26T07:55:37.543126Z  INFO 10.0.1.64:80 draining: gone from DNS"
        );
        assert_eq!(
            without_timestamp(&plain),
            "INFO 10.0.1.64:80 draining: gone from DNS"
        );
        let tod = log_time_of_day(&plain).unwrap();
        assert!((tod - (7.0 * 3600.0 + 55.0 * 60.0 + 37.543126)).abs() < 1e-6);
    }

    #[test]
    fn drop_counters_come_from_the_reasons_list() {
        let json = r#"{
  "services": [{"name": "web", "packets": 5}],
  "reasons": [
    {
      "name": "pass_not_ip",
      "kind": "pass",
      "packets": 53,
      "bytes": 2226
    },
    {
      "name": "drop_no_backend",
      "kind": "drop",
      "packets": 12,
      "bytes": 888
    }
  ],
  "conntrack": {"entries": 3}
}"#;
        let drops = drop_counters(json);
        assert_eq!(drops.len(), 1, "{drops:?}");
        assert_eq!(drops["drop_no_backend"], 12);
        let compact = json.replace(['\n', ' '], "");
        assert_eq!(drop_counters(&compact), drops);
        let mut later = drops.clone();
        *later.get_mut("drop_no_backend").unwrap() += 3;
        assert_eq!(drops_between(&drops, &later), "drop_no_backend +3");
        assert_eq!(drops_between(&drops, &drops), "none");
    }
}
