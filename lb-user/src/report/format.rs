//! Human formats shared by the readers: counts, bytes, rates, durations,
//! backend states, service addresses, and a plain text table.

use std::{fmt::Write as _, io::Write as _, net::SocketAddr};

use anyhow::Result;
use lb_common::{
    ServiceKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_EMPTY, PROTO_TCP, PROTO_UDP,
};

use crate::dataplane::table::ip_from_bytes;

// ---- human formats ------------------------------------------------------------

/// `1234567` -> `1,234,567`.
pub fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn fmt_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A per-second rate with an SI suffix: `0.5`, `12.0`, `3.4k`, `1.2M`.
pub fn fmt_rate(v: f64) -> String {
    let (v, suffix) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    format!("{v:.1}{suffix}")
}

/// `0.4s`, `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn fmt_duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// `850 µs`, `1.2 ms`, `37 ms`.
pub fn fmt_latency_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{} ms", us / 1000)
    }
}

pub fn fmt_share(s: Option<f64>) -> String {
    s.map(|s| format!("{:.1}%", s * 100.0)).unwrap_or_default()
}

/// A plain text table: left-aligned first columns, right-aligned numbers.
pub struct TextTable {
    rows: Vec<Vec<String>>,
    /// Per column: right-align?
    right: Vec<bool>,
}

impl TextTable {
    pub fn new(header: &[&str], right: &[bool]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
            right: right.to_vec(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self, out: &mut String) {
        let cols = self.right.len();
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let mut line = String::new();
            for (c, w) in width.iter().enumerate() {
                let cell = r.get(c).map_or("", String::as_str);
                if c > 0 {
                    line.push_str("  ");
                }
                if self.right[c] {
                    let _ = write!(line, "{cell:>w$}");
                } else {
                    let _ = write!(line, "{cell:<w$}");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// Lower-case name of a `BACKENDS` state.
pub fn backend_state_name(state: u8) -> String {
    match state {
        BACKEND_EMPTY => "empty".into(),
        BACKEND_ACTIVE => "active".into(),
        BACKEND_DRAINING => "draining".into(),
        BACKEND_DOWN => "down".into(),
        n => format!("unknown({n})"),
    }
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        n => n.to_string(),
    }
}

/// `ADDR:PORT/proto` of a `SERVICES` key (the wildcard shows as 0.0.0.0 / [::]).
pub fn listen_of(key: &ServiceKey) -> String {
    let ip = ip_from_bytes(&key.addr, key.family);
    format!(
        "{}/{}",
        SocketAddr::new(ip, u16::from_be(key.port_be)),
        proto_name(key.proto)
    )
}

/// Writes to stdout; `false` when the reader went away (`| head`).
pub fn emit(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}
