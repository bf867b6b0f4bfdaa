//! Logging set-up: `tracing` with an env filter, to stderr, as text or JSON.
//!
//! - Colour only when stderr is a terminal and `NO_COLOR` is unset, so a log
//!   written to a file or the journal carries no escape codes.
//! - `--log-format json` writes one JSON object per line (timestamp, level,
//!   fields, message) for log pipelines.
//! - aya warns once per start that the kernel refused the object's BTF and
//!   dumps the whole BTF (about 220 lines ending `Invalid member
//!   bits_offset`; the kernel rejects the BTF rustc emits for some types,
//!   and aya loads the programs without it). That dump is replaced by one
//!   debug line naming the kernel's reason.
//! - The data plane's own lines (flood guard on and off, SNAT ports
//!   exhausted, no route; lb-ebpf/src/note.rs) come through aya-log's ring
//!   buffer; [`drain_data_plane`] re-emits each as an event with
//!   `source="dataplane"`. The kernel side rate-limits them.

use std::{fmt, io::IsTerminal as _};

use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{filter::filter_fn, layer::Context, prelude::*, EnvFilter, Layer};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Is this aya's "object BTF couldn't be loaded" warning?
fn is_btf_dump(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "aya::bpf" && *meta.level() == Level::WARN
}

/// Turns aya's BTF dump into one debug line.
struct BtfNote;

#[derive(Default)]
struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for BtfNote {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !is_btf_dump(event.metadata()) {
            return;
        }
        let mut m = Message::default();
        event.record(&mut m);
        // The kernel's verdict is the dump's last non-empty line.
        let reason =
            m.0.lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("no reason given")
                .to_owned();
        tracing::debug!(
            "the kernel refused the eBPF object's BTF ({reason}); aya loaded the programs \
             without it, which changes nothing for xdplb (RUST_LOG=aya::bpf=warn shows the dump)"
        );
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let explicit_aya = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("aya::bpf"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let keep = filter_fn(move |meta| explicit_aya || !is_btf_dump(meta));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(keep).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(keep).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with((!explicit_aya).then_some(BtfNote))
        .init();
}

/// Re-emits aya-log records from the data plane as tracing events.
pub struct DataPlaneLog;

impl log::Log for DataPlaneLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(source = "dataplane", "{msg}"),
            log::Level::Warn => tracing::warn!(source = "dataplane", "{msg}"),
            log::Level::Info => tracing::info!(source = "dataplane", "{msg}"),
            log::Level::Debug => tracing::debug!(source = "dataplane", "{msg}"),
            log::Level::Trace => tracing::trace!(source = "dataplane", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Logs the data plane's lines as they arrive, until the task is dropped.
pub async fn drain_data_plane(logger: aya_log::EbpfLogger<DataPlaneLog>) {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: the logger owns the ring buffer's fd (its `MapData`) and
    // moves into the `AsyncFd`, so the fd stays open, and the same, for the
    // `AsyncFd`'s whole life.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            let e = e.into_parts().1;
            tracing::warn!(
                "the data plane's log lines cannot be read (epoll: {e}); its counters still count"
            );
            return;
        }
    };
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("stopped reading the data plane's log lines: {e}");
                return;
            }
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
