//! Tables for stdout and for `docs/BENCHMARKS.md`, and the machine they ran on.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result};

/// One results table: every row carries its baseline and ratio columns.
pub struct Table {
    pub title: String,
    /// What was measured and how, one paragraph.
    pub method: String,
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// Targets and their verdicts, and caveats, printed under the table.
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(
        title: impl Into<String>,
        method: impl Into<String>,
        headers: &[&'static str],
    ) -> Self {
        Self {
            title: title.into(),
            method: method.into(),
            headers: headers.to_vec(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "table {}", self.title);
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.headers[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Aligned plain text: the first column left-aligned, the others right.
    pub fn print(&self) {
        let w = self.widths();
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i == 0 {
                    let _ = write!(s, "{c:<width$}", width = w[0]);
                } else {
                    let _ = write!(s, "  {c:>width$}", width = w[i]);
                }
            }
            println!("{}", s.trim_end());
        };
        println!();
        println!("== {}", self.title);
        line(
            &self
                .headers
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>(),
        );
        for r in &self.rows {
            line(r);
        }
        for n in &self.notes {
            println!("  {n}");
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## {}\n\n{}\n", self.title, self.method);
        let _ = writeln!(s, "| {} |", self.headers.join(" | "));
        let align: Vec<&str> = (0..self.headers.len())
            .map(|i| if i == 0 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(s, "|{}|", align.join("|"));
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s.push('\n');
        s
    }
}

/// `x` as a ratio to `base`, e.g. `1.84x`.
pub fn ratio(x: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}x", x / base)
    } else {
        "n/a".into()
    }
}

/// "met" / "NOT met".
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn probe(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The machine, as a Markdown bullet list.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_string(), |(_, m)| m.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or("unknown".to_string(), |kb| {
            format!("{:.1} GiB", kb / 1024.0 / 1024.0)
        });
    let cpus = probe("nproc", &[]).unwrap_or_else(|| "unknown".into());
    let kernel = probe("uname", &["-r"]).unwrap_or_else(|| "unknown".into());
    let date = probe("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown".into());
    format!(
        "- CPU: {model}, {cpus} CPUs (`nproc`)\n- memory: {mem_gib}\n- kernel: {kernel}\n- date: {date}\n"
    )
}

/// Writes `docs/BENCHMARKS.md`.
pub fn write_markdown(
    path: &Path,
    command: &str,
    took_s: f64,
    tables: &[Table],
    charts: &[(String, String)],
    not_measured: &[&str],
) -> Result<()> {
    let mut s = String::new();
    s.push_str(
        "# xdplb benchmarks\n\n\
         Written by `cargo xtask bench`; do not edit by hand, run it again.\n\n\
         These machines are small and shared, so absolute numbers move from run to run.\n\
         Every figure is printed beside a baseline measured in the same run, and the ratio\n\
         is the headline. Nothing here is a test assertion: targets are printed beside the\n\
         results with \"met\" or \"NOT met\".\n\n",
    );
    let _ = writeln!(
        s,
        "## Machine and command\n\n{}- command: `{command}`\n- took: {took_s:.0} s\n",
        machine()
    );
    for t in tables {
        s.push_str(&t.markdown());
    }
    if !charts.is_empty() {
        s.push_str("## Charts\n\n");
        for (title, file) in charts {
            let _ = writeln!(s, "![{title}]({file})\n");
        }
    }
    if !not_measured.is_empty() {
        s.push_str("## Not measured yet\n\nThese parts of the benchmark plan have no harness yet; no figures are claimed for them.\n\n");
        for n in not_measured {
            let _ = writeln!(s, "- {n}");
        }
        s.push('\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}
