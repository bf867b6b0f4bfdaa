//! `xdplb top`: a live dashboard of the same snapshot `xdplb stats` prints.
//! Per-service and per-backend rates as bars, the connection-table fill as
//! a gauge, and a backend whose state changed in the last few seconds
//! flashes. Reads the maps once per interval; `q`, Esc or Ctrl-C quits.

use std::{
    collections::HashMap,
    io::IsTerminal as _,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Gauge, Paragraph, Row, Table},
    Frame,
};

use crate::{
    cli::TopArgs,
    report::{
        format::{fmt_bytes, fmt_count, fmt_rate},
        snapshot::{take_snapshot, BackendStats, Snapshot},
    },
};

/// How long a backend whose state changed stays highlighted.
pub const FLASH: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 20;
/// Redraw period (the flash blinks at this pace); reads follow `--interval`.
const FRAME: Duration = Duration::from_millis(250);

/// `xdplb top`.
pub fn run(args: &TopArgs) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!(
            "xdplb top draws a live dashboard and needs a terminal, but stdout is not one: \
             use `xdplb stats --watch` (or `--json`) instead"
        );
    }
    // The first reading happens before the screen switches, so "no state"
    // and permission errors print as one plain line.
    let first = take_snapshot(&args.pin_dir)?;
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let mut app = App::new(first, Instant::now());
    let res = app.run_loop(
        &mut terminal,
        &args.pin_dir,
        Duration::from_secs_f64(args.interval),
    );
    ratatui::restore();
    res
}

/// Recent state changes, keyed by (service id, backend address).
#[derive(Debug, Default)]
pub struct Changes {
    seen: HashMap<(u32, SocketAddr), (Instant, String)>,
}

impl Changes {
    /// Records every backend whose state differs from `prev` (or that is
    /// new in a service `prev` knew), and forgets changes older than FLASH.
    pub fn update(&mut self, prev: &Snapshot, cur: &Snapshot, now: Instant) {
        for s in &cur.services {
            let Some(ps) = prev.services.iter().find(|p| p.id == s.id) else {
                continue;
            };
            for b in &s.backends {
                let before = ps.backends.iter().find(|p| p.addr == b.addr);
                match before {
                    Some(p) if p.state != b.state => {
                        self.seen.insert((s.id, b.addr), (now, p.state.clone()));
                    }
                    None => {
                        self.seen.insert((s.id, b.addr), (now, "new".into()));
                    }
                    Some(_) => {}
                }
            }
        }
        self.seen.retain(|_, (t, _)| now.duration_since(*t) < FLASH);
    }

    /// The state a backend left within the last FLASH, if it changed.
    pub fn recent(&self, service: u32, addr: SocketAddr, now: Instant) -> Option<&str> {
        self.seen
            .get(&(service, addr))
            .filter(|(t, _)| now.duration_since(*t) < FLASH)
            .map(|(_, from)| from.as_str())
    }
}

/// A horizontal bar of `frac` (0..1) in `width` cells, with eighth blocks.
pub fn bar(frac: f64, width: usize) -> String {
    const PARTS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let frac = if frac.is_finite() {
        frac.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let eighths = (frac * (width * 8) as f64).round() as usize;
    let mut s: String = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) {
        s.push(PARTS[eighths % 8]);
    }
    let len = s.chars().count();
    s.extend(std::iter::repeat_n(' ', width.saturating_sub(len)));
    s
}

pub fn state_color(state: &str) -> Color {
    match state {
        "active" => Color::Green,
        "draining" => Color::Yellow,
        "down" => Color::Red,
        "probing" => Color::Cyan,
        _ => Color::Gray,
    }
}

pub struct App {
    snap: Snapshot,
    error: Option<String>,
    changes: Changes,
    started: Instant,
}

impl App {
    pub fn new(first: Snapshot, now: Instant) -> Self {
        Self {
            snap: first,
            error: None,
            changes: Changes::default(),
            started: now,
        }
    }

    /// Takes a new reading; a failed one keeps the last and shows why.
    pub fn refresh(&mut self, next: Result<Snapshot>, now: Instant) {
        match next {
            Ok(mut s) => {
                s.add_rates(&self.snap);
                self.changes.update(&self.snap, &s, now);
                self.snap = s;
                self.error = None;
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    fn run_loop(
        &mut self,
        terminal: &mut ratatui::DefaultTerminal,
        pin_dir: &Path,
        interval: Duration,
    ) -> Result<()> {
        let mut next = Instant::now() + interval;
        loop {
            terminal.draw(|f| self.draw(f, Instant::now()))?;
            let wait = FRAME.min(next.saturating_duration_since(Instant::now()));
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if k.kind == KeyEventKind::Press
                        && (matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) || ctrl_c)
                    {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= next {
                self.refresh(take_snapshot(pin_dir), Instant::now());
                next = Instant::now() + interval;
            }
        }
    }

    /// The state cell and row style of a backend, flashing after a change.
    fn backend_look(&self, service: u32, b: &BackendStats, now: Instant) -> (String, Style) {
        let since_change = b
            .state_since_unix_ms
            .map(|since| self.snap.time_unix_ms.saturating_sub(since));
        let from = self.changes.recent(service, b.addr, now).or_else(|| {
            since_change
                .filter(|&ms| ms < FLASH.as_millis() as u64)
                .map(|_| "")
        });
        let color = state_color(&b.state);
        match from {
            None => (b.state.clone(), Style::default()),
            Some(from) => {
                let label = if from.is_empty() || from == "new" {
                    format!("{} (new)", b.state)
                } else {
                    format!("{} (was {from})", b.state)
                };
                let blink = (now.duration_since(self.started).as_millis() / 500).is_multiple_of(2);
                let style = if blink {
                    Style::default()
                        .bg(color)
                        .fg(Color::Black)
                        .add_modifier(Modifier::BOLD)
                } else {
                    Style::default().fg(color).add_modifier(Modifier::BOLD)
                };
                (label, style)
            }
        }
    }

    pub fn draw(&self, f: &mut Frame, now: Instant) {
        let s = &self.snap;
        let counted = s.reasons.iter().filter(|r| r.packets > 0).count();
        let [head, gauge, table, reasons, foot] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Length(1),
            Constraint::Min(4),
            Constraint::Length((counted as u16).clamp(1, 8) + 2),
            Constraint::Length(1),
        ])
        .areas(f.area());

        let daemon = match (s.daemon.pid, &s.daemon.note) {
            (Some(pid), _) => format!("daemon pid {pid}"),
            (None, _) => {
                "daemon not running: names are VIP:port/proto, states from the maps".into()
            }
        };
        let mut lines = vec![Line::from(vec![
            Span::styled("xdplb top", Style::default().add_modifier(Modifier::BOLD)),
            Span::raw(format!("  {}  {daemon}", s.pin_dir.display())),
        ])];
        lines.push(match &self.error {
            Some(e) => Line::styled(format!("read failed: {e}"), Style::default().fg(Color::Red)),
            None => Line::raw(match s.interval_secs {
                Some(secs) => format!("rates over {secs:.1}s"),
                None => "rates after the next reading".into(),
            }),
        });
        f.render_widget(Paragraph::new(lines), head);

        let fill = s.conntrack.fill;
        let gauge_color = if fill > 0.9 {
            Color::Red
        } else if fill > 0.7 {
            Color::Yellow
        } else {
            Color::Green
        };
        f.render_widget(
            Gauge::default()
                .ratio(fill.clamp(0.0, 1.0))
                .gauge_style(Style::default().fg(gauge_color))
                .label(format!(
                    "connections {} / {} entries ({:.1}%), {} live flows",
                    fmt_count(s.conntrack.entries),
                    fmt_count(s.conntrack.capacity),
                    fill * 100.0,
                    fmt_count(s.conntrack.live_flows)
                )),
            gauge,
        );

        let pps = |r: Option<crate::report::snapshot::Rates>| r.map(|r| r.packets_per_sec);
        let max_svc = s
            .services
            .iter()
            .filter_map(|x| pps(x.rates))
            .fold(0.0, f64::max);
        let num = |v: Option<f64>| v.map_or("-".to_string(), fmt_rate);
        let bytes = |v: Option<f64>| v.map_or("-".to_string(), |b| format!("{}/s", fmt_bytes(b)));
        let mut rows = Vec::new();
        for svc in &s.services {
            let p = pps(svc.rates);
            rows.push(
                Row::new(vec![
                    Cell::from(match &svc.name {
                        Some(n) => format!("{n} {}", svc.listen),
                        None => svc.listen.clone(),
                    }),
                    Cell::from(""),
                    Cell::from(num(p)),
                    Cell::from(bar(p.unwrap_or(0.0) / max_svc.max(1e-9), BAR_WIDTH))
                        .style(Style::default().fg(Color::Blue)),
                    Cell::from(bytes(svc.rates.map(|r| r.bytes_per_sec))),
                    Cell::from(num(svc.rates.map(|r| r.new_connections_per_sec))),
                    Cell::from(fmt_count(svc.active_connections)),
                    Cell::from(""),
                ])
                .style(Style::default().add_modifier(Modifier::BOLD)),
            );
            for b in &svc.backends {
                let (state, style) = self.backend_look(svc.id, b, now);
                let bp = pps(b.rates);
                let frac = match (bp, p) {
                    (Some(bp), Some(p)) if p > 0.0 => bp / p,
                    _ => 0.0,
                };
                rows.push(
                    Row::new(vec![
                        Cell::from(format!("  {}", b.addr)),
                        Cell::from(state).style(Style::default().fg(state_color(&b.state))),
                        Cell::from(num(bp)),
                        Cell::from(bar(frac, BAR_WIDTH)).style(Style::default().fg(Color::Cyan)),
                        Cell::from(bytes(b.rates.map(|r| r.bytes_per_sec))),
                        Cell::from(num(b.rates.map(|r| r.new_connections_per_sec))),
                        Cell::from(fmt_count(b.active_connections)),
                        Cell::from(
                            b.new_connection_share
                                .map(|x| format!("{:.1}%", x * 100.0))
                                .unwrap_or_default(),
                        ),
                    ])
                    .style(style),
                );
            }
        }
        if rows.is_empty() {
            rows.push(Row::new(vec![Cell::from("no services in the maps yet")]));
        }
        let widths = [
            Constraint::Min(24),
            Constraint::Length(22),
            Constraint::Length(8),
            Constraint::Length(BAR_WIDTH as u16),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
        ];
        let header = Row::new(vec![
            "SERVICE / BACKEND",
            "STATE",
            "PKT/S",
            "",
            "BYTES/S",
            "NEW/S",
            "ACTIVE",
            "SHARE",
        ])
        .style(Style::default().add_modifier(Modifier::REVERSED));
        f.render_widget(
            Table::new(rows, widths)
                .header(header)
                .block(Block::bordered().title(" services and backends ")),
            table,
        );

        let mut reason_lines: Vec<Line> = s
            .reasons
            .iter()
            .filter(|r| r.packets > 0)
            .map(|r| {
                let color = match r.kind {
                    "drop" => Color::Red,
                    "pass" => Color::Yellow,
                    _ => Color::Green,
                };
                Line::from(vec![
                    Span::styled(format!("{:<24}", r.name), Style::default().fg(color)),
                    Span::raw(format!(
                        "{:>16} packets  {:>10}/s",
                        fmt_count(r.packets),
                        r.packets_per_sec.map_or("-".into(), fmt_rate)
                    )),
                ])
            })
            .collect();
        if reason_lines.is_empty() {
            reason_lines.push(Line::raw("no packets seen yet"));
        }
        f.render_widget(
            Paragraph::new(reason_lines)
                .block(Block::bordered().title(" pass / forward / drop reasons ")),
            reasons,
        );
        f.render_widget(
            Paragraph::new("q quits  ·  a backend flashes for 5 s after its state changes")
                .style(Style::default().add_modifier(Modifier::DIM)),
            foot,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::report::snapshot::{ConntrackStats, DaemonInfo, ServiceStats};

    fn backend(addr: &str, state: &str) -> BackendStats {
        BackendStats {
            index: Some(1),
            addr: addr.parse().unwrap(),
            state: state.into(),
            dataplane_state: Some(state.into()),
            reason: None,
            state_since_unix_ms: None,
            packets: 10,
            bytes: 1000,
            new_connections: 2,
            active_connections: 1,
            new_connection_share: Some(0.5),
            rates: None,
        }
    }

    fn snap(states: [&str; 2], mono_ns: u64, packets: u64) -> Snapshot {
        let mut b = [
            backend("10.1.0.11:80", states[0]),
            backend("10.1.0.12:80", states[1]),
        ];
        b[0].packets = packets;
        Snapshot {
            version: 1,
            pin_dir: PathBuf::from("/sys/fs/bpf/xdplb"),
            time_unix_ms: 1_000_000,
            interval_secs: None,
            daemon: DaemonInfo {
                running: true,
                pid: Some(7),
                status_file: "/run/x".into(),
                status_age_ms: Some(1),
                note: None,
                interfaces: Vec::new(),
            },
            services: vec![ServiceStats {
                id: 1,
                name: Some("web".into()),
                listen: "0.0.0.0:80/tcp".into(),
                packets,
                bytes: 2000,
                new_connections: 4,
                active_connections: 2,
                rates: None,
                backends: b.to_vec(),
            }],
            reasons: vec![],
            events: vec![],
            conntrack: ConntrackStats {
                entries: 4,
                capacity: 100,
                fill: 0.04,
                live_flows: 2,
                unanswered: crate::report::snapshot::UnansweredStats {
                    entries: 0,
                    capacity: 50,
                    fill: 0.0,
                    live_flows: 0,
                },
            },
            mono_ns,
        }
    }

    #[test]
    fn bars_use_eighths_and_keep_their_width() {
        assert_eq!(bar(0.0, 4), "    ");
        assert_eq!(bar(1.0, 4), "████");
        assert_eq!(bar(0.5, 4), "██  ");
        assert_eq!(bar(1.0 / 32.0, 4), "▏   ");
        assert_eq!(bar(2.0, 3), "███", "clamped");
        assert_eq!(bar(f64::NAN, 2), "  ");
    }

    #[test]
    fn state_changes_are_remembered_for_a_few_seconds() {
        let t0 = Instant::now();
        let a = snap(["active", "active"], 0, 10);
        let b = snap(["active", "down"], 1_000_000_000, 20);
        let addr: SocketAddr = "10.1.0.12:80".parse().unwrap();
        let mut c = Changes::default();
        c.update(&a, &b, t0);
        assert_eq!(
            c.recent(1, addr, t0 + Duration::from_secs(1)),
            Some("active")
        );
        assert_eq!(c.recent(1, "10.1.0.11:80".parse().unwrap(), t0), None);
        assert_eq!(c.recent(1, addr, t0 + FLASH), None);
        c.update(&b, &b, t0 + FLASH);
        assert!(c.seen.is_empty(), "old changes are forgotten");
    }

    #[test]
    fn dashboard_renders_rates_bars_and_the_changed_backend() {
        let t0 = Instant::now();
        let mut app = App::new(snap(["active", "active"], 0, 10), t0);
        app.refresh(Ok(snap(["active", "down"], 1_000_000_000, 110)), t0);
        let mut term = Terminal::new(TestBackend::new(110, 24)).unwrap();
        term.draw(|f| app.draw(f, t0)).unwrap();
        let buf = term.backend().buffer().clone();
        let text: String = (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    + "\n"
            })
            .collect();
        for want in [
            "xdplb top",
            "daemon pid 7",
            "web 0.0.0.0:80/tcp",
            "100.0",
            "down (was active)",
            "connections 4 / 100 entries",
            "q quits",
            "████",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        app.refresh(Err(anyhow::anyhow!("no xdplb state under /x")), t0);
        term.draw(|f| app.draw(f, t0)).unwrap();
        let buf = term.backend().buffer().clone();
        let line: String = (0..buf.area.width)
            .map(|x| buf[(x, 1)].symbol().to_string())
            .collect();
        assert!(line.contains("read failed: no xdplb state"), "{line}");
    }
}
