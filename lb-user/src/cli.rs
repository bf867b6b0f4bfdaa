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
    /// Remove state left by `xdplb run --persist` (or by a killed daemon):
    /// unpins the program links (detaching the programs) and the maps.
    ///
    ///   xdplb down
    #[command(verbatim_doc_comment)]
    Down(DownArgs),
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
    #[arg(long, value_name = "ADDR:PORT")]
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
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Where maps and links are pinned (bpffs).
    #[arg(long, value_name = "DIR", default_value = crate::maps::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}
