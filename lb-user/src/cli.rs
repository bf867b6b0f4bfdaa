//! The `xdplb` command line. The spellings of `run` are a contract
//! (README.md, "Command line").

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{AttachMode, BackendsConfig, CheckKind, Listen};

/// xdplb: a kernel-level L4 load balancer for Docker Swarm `dnsrr` services.
///
/// It resolves `tasks.<service>` through Docker's DNS, health-checks every
/// task, and steers connections to healthy tasks from XDP/TC (Maglev hashing,
/// a connection table, full NAT), without proxying them through userspace.
#[derive(Parser, Debug)]
#[command(name = "xdplb", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` or `json` (one object per line, for log
    /// pipelines). Logs go to stderr, coloured only on a terminal
    /// (NO_COLOR turns that off too); RUST_LOG filters them (default info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        value_name = "FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the balancer (attach, discover, health-check, keep the maps current).
    ///
    /// Either a config file:
    ///
    ///   xdplb run --config /etc/xdplb.toml
    ///
    /// or the short form for one service (Docker's `--replicas 10` example):
    ///
    ///   xdplb run --iface eth0 --iface eth1 --listen 0.0.0.0:80 --backends tasks.web:80
    ///
    /// which asks 127.0.0.11:53 for tasks.web every second and TCP-checks each task.
    /// SIGTERM or Ctrl-C detaches and removes all pinned state unless --persist
    /// is given. Logs go to stderr; RUST_LOG=debug shows every poll and check.
    #[command(verbatim_doc_comment)]
    Run(Box<RunArgs>),
    /// Make the running daemon read its config file again, and say how it went.
    ///
    /// Sends SIGHUP to the `xdplb run` of this pin directory (a plain SIGHUP
    /// does the same) and waits for its verdict. A valid file is applied
    /// without losing a flow: new services start, removed ones drain and go,
    /// changed checks, intervals, drain, SNAT and Maglev settings take effect.
    /// An invalid file, or one that changes what needs a restart (interfaces,
    /// attach, pin_dir, conntrack.capacity, a service's listen address),
    /// changes nothing: the daemon keeps running and this exits non-zero with
    /// the reason.
    ///
    ///   xdplb reload
    ///   systemctl reload xdplb       # ExecReload runs the same
    #[command(verbatim_doc_comment)]
    Reload(ReloadArgs),
    /// Remove state left by `xdplb run --persist` (or by a killed daemon):
    /// unpins the program links (detaching the programs) and the maps.
    ///
    ///   xdplb down
    #[command(verbatim_doc_comment)]
    Down(DownArgs),
    /// Counters per service and backend, read straight from the pinned maps.
    ///
    /// Packets, bytes, new and active connections per service and backend,
    /// each backend's share of new connections, packets by pass/forward/drop
    /// reason, and the connection-table fill. Works whether the daemon runs
    /// or not; names and backend states come from the daemon when it runs.
    ///
    ///   xdplb stats
    ///   xdplb stats --watch          # redraw every second, with rates
    ///   xdplb stats --json | jq '.services[] | {name, active_connections}'
    ///
    /// The JSON is documented field by field in docs/OBSERVABILITY.md.
    #[command(verbatim_doc_comment)]
    Stats(StatsArgs),
    /// Every backend the daemon knows: state, reason, time in state, last check.
    ///
    ///   xdplb backends
    ///   xdplb backends --json | jq '.services[].backends[] | select(.state != "active")'
    ///
    /// Needs a running daemon (it reads its status file); exits non-zero otherwise.
    #[command(verbatim_doc_comment)]
    Backends(BackendsArgs),
    /// Live dashboard: rates per service and backend, state changes flash; q quits.
    ///
    ///   xdplb top
    ///   xdplb top --interval 2
    ///
    /// Needs a terminal; for logs or pipes use `xdplb stats --watch`.
    #[command(verbatim_doc_comment)]
    Top(TopArgs),
    /// Which backend a flow goes to, and why (connection table or Maglev slot).
    ///
    /// Follows the data plane's own steps: reply path, service lookup (exact
    /// address, then the wildcard), connection-table entry, and for a new
    /// flow the flow hash, the Maglev slot and the probe sequence.
    ///
    ///   xdplb explain --proto tcp --src 10.0.0.2:51234 --dst 10.0.0.100:80
    ///   xdplb explain --proto udp --src [fd00::2]:5000 --dst [fd00::100]:53 --json
    #[command(verbatim_doc_comment)]
    Explain(ExplainArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// TOML config file with one or more services (see docs/xdplb.example.toml).
    /// Cannot be combined with the short-form options.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with_all = ["iface", "listen", "backends", "nameserver", "check", "attach"])]
    pub config: Option<PathBuf>,

    /// Interface to attach to; repeat for several (e.g. the client-facing one
    /// and the overlay). Example: --iface eth0 --iface eth1
    #[arg(long, value_name = "IFACE", required_unless_present = "config")]
    pub iface: Vec<String>,

    /// Address, port and protocol to balance; 0.0.0.0 or [::] means any local
    /// address. Examples: 0.0.0.0:80, 10.0.0.5:443/tcp, [::]:53/udp
    #[arg(
        long,
        value_name = "ADDR:PORT[/tcp|/udp]",
        required_unless_present = "config"
    )]
    pub listen: Option<Listen>,

    /// DNS name whose A records are the tasks, and the port they serve on.
    /// Example: tasks.web:80
    #[arg(long, value_name = "NAME:PORT", required_unless_present = "config")]
    pub backends: Option<BackendsConfig>,

    /// DNS server to ask [default: 127.0.0.11:53, Docker's embedded DNS]
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = crate::config::parse_nameserver)]
    pub nameserver: Option<std::net::SocketAddr>,

    /// Health check: tcp (connect), http:/PATH (GET, expects 200) or none
    /// (tasks take traffic as soon as DNS lists them) [default: tcp for TCP
    /// services, none for UDP]
    #[arg(long, value_name = "tcp|http:/PATH|none")]
    pub check: Option<CheckKind>,

    /// How to hook into the interfaces: auto (XDP on physical NICs, TC on
    /// veths and other virtual devices), xdp, or tc [default: auto]
    #[arg(long, value_name = "auto|xdp|tc")]
    pub attach: Option<AttachMode>,

    /// On SIGTERM/Ctrl-C leave the programs attached and the maps pinned, so
    /// forwarding goes on and a later `xdplb run` adopts them; `xdplb down`
    /// removes them.
    #[arg(long)]
    pub persist: bool,

    /// Where maps and links are pinned (bpffs) [default: /sys/fs/bpf/xdplb]
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Serve Prometheus metrics on this address (GET /metrics), read from the
    /// maps at scrape time. Off unless given. Example: 127.0.0.1:9090
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct ReloadArgs {
    /// The pin directory of the daemon to reload (bpffs).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// How long to wait for the daemon's verdict, in seconds.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_interval)]
    pub timeout: f64,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Where maps and links are pinned (bpffs).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// `--watch` and `--interval` values: seconds, 0.1 to 3600.
fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if (0.1..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} s is outside 0.1..3600"))
    }
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Print JSON (docs/OBSERVABILITY.md); with --watch, one document per line.
    #[arg(long)]
    pub json: bool,

    /// Redraw every SECS seconds (default 1) with per-second rates; Ctrl-C stops.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1", value_parser = parse_interval)]
    pub watch: Option<f64>,

    /// Where the maps are pinned (bpffs).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct BackendsArgs {
    /// Print JSON (docs/OBSERVABILITY.md).
    #[arg(long)]
    pub json: bool,

    /// The daemon's pin directory (its status file is named after it).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Seconds between readings of the maps.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval)]
    pub interval: f64,

    /// Where the maps are pinned (bpffs).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Transport protocol of the packet.
    #[arg(long, value_enum)]
    pub proto: crate::config::Proto,

    /// Source address and port as the balancer receives the packet (the
    /// client). IPv6 in brackets. Example: 10.0.0.2:51234
    #[arg(long, value_name = "IP:PORT")]
    pub src: std::net::SocketAddr,

    /// Destination address and port (the service's VIP, or for a reply, the
    /// SNAT address and port). Example: 10.0.0.100:80
    #[arg(long, value_name = "IP:PORT")]
    pub dst: std::net::SocketAddr,

    /// Explain a fresh SYN (SYN without ACK): it does not reuse a closing
    /// entry, nor one whose backend is draining or refused a connection
    /// lately. TCP only (a UDP datagram has no such flag).
    #[arg(long)]
    pub syn: bool,

    /// Print JSON (docs/OBSERVABILITY.md).
    #[arg(long)]
    pub json: bool,

    /// Where the maps are pinned (bpffs).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}
