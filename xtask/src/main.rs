//! Developer verbs for xdplb: `cargo xtask <verb>` (alias in .cargo/config.toml).
//!
//! Every verb prints each command before running it, so what it does can be
//! repeated by hand.

mod bench;
mod build;
mod cmd;
mod demo;
mod setup;
mod swarm;
mod test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Developer tasks for xdplb: install the toolchain, build, test, benchmark.
///
/// Start with `cargo xtask setup` (as root), then `cargo xtask test`.
/// Each verb prints the commands it runs; `cargo xtask <verb> --help` explains it.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    /// Also print the quick probe commands (dpkg-query, --version checks, ldd).
    #[arg(long, short, global = true)]
    verbose: bool,

    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install what building and testing need (idempotent; seconds when done before).
    ///
    /// Checks, and installs only what is missing:
    ///   - Debian packages (apt-get; root): build-essential iproute2 ethtool bpftool
    ///     iputils-ping curl tcpdump
    ///   - the nightly toolchain with rust-src, clippy, rustfmt (rustup)
    ///   - clippy on the toolchain cargo xtask runs on (stable by default)
    ///   - bpf-linker 0.13.0 built against nightly's own LLVM (about two minutes,
    ///     once): a prefix in ~/.cache/xdplb/llvm-prefix links nightly's
    ///     lib/libLLVM.so.*, and `cargo install` builds against it
    ///   - bpffs mounted at /sys/fs/bpf (root)
    ///   - that it runs as root (the packet and end-to-end tests need it)
    ///
    /// Every run re-verifies with cheap probes, so a deleted binary or a nightly
    /// update is noticed. ~/.cache/xdplb/setup-v1.stamp records what was
    /// installed. Anything that cannot be provided is named with the reason, and
    /// the exit status is non-zero.
    ///
    /// Example:
    ///   cargo xtask setup
    ///   cargo xtask setup --force     # rebuild bpf-linker anyway
    #[command(verbatim_doc_comment)]
    Setup {
        /// Rebuild bpf-linker even if the installed one looks right.
        #[arg(long)]
        force: bool,
    },

    /// Build only the eBPF object (lb-ebpf) on nightly, to read compiler output.
    ///
    /// Runs, from the workspace root:
    ///   cargo +nightly build --package lb-ebpf --target bpfel-unknown-none \
    ///       -Z build-std=core [--release]
    /// with CARGO_ENCODED_RUSTFLAGS set as aya-build sets them
    /// (--cfg=bpf_target_arch, -Cdebuginfo=2, -Clink-arg=--btf), and prints the
    /// object's path: target/bpfel-unknown-none/{debug,release}/lb-ebpf.
    /// Needs nightly with rust-src and bpf-linker (checked first; see `setup`).
    /// No root needed. The daemon embeds its own --release copy, built by
    /// lb-user's build script; this verb is for iterating on the data plane.
    ///
    /// Example:
    ///   cargo xtask build-ebpf --release
    ///   llvm-objdump -S --no-show-raw-insn target/bpfel-unknown-none/release/lb-ebpf
    #[command(verbatim_doc_comment)]
    BuildEbpf {
        /// Optimised build, the profile the daemon embeds.
        #[arg(long)]
        release: bool,
    },

    /// Release build of the daemon/CLI (target/release/xdplb) with the eBPF object inside.
    ///
    /// Checks the toolchain (see `setup`), then runs `cargo build --release` for the
    /// default members. lb-user's build script compiles lb-ebpf on nightly through
    /// aya-build and embeds the object. No root needed.
    ///
    /// Example:
    ///   cargo xtask build && ./target/release/xdplb --help
    #[command(verbatim_doc_comment)]
    Build,

    /// Run every check CI runs: fmt, unit, packet, (swarm), clippy. Needs root.
    ///
    /// Layers, in order; all run even if one fails, then a summary is printed:
    ///   1. cargo +nightly fmt --all -- --check
    ///   2. unit tests, no root:  cargo test --workspace --exclude lb-ebpf --exclude tests
    ///   3. packet and namespace tests, root:  cargo test --package tests -- --test-threads=1
    ///   4. swarm end-to-end:     `swarm-e2e` when `docker info` answers, else skipped
    ///   5. cargo clippy --workspace --exclude lb-ebpf --all-targets -- -D warnings
    ///   6. cargo +nightly clippy --package lb-ebpf --target bpfel-unknown-none ...
    ///
    /// Runs `setup` first (only the toolchain part when not root; the packet
    /// layer then fails with a message saying root is needed). Everything uses
    /// the dev profile so layers share builds. Exit status non-zero if any layer
    /// failed. This is exactly what .ci/run runs.
    ///
    /// Example:
    ///   cargo xtask test
    ///   AYA_BUILD_SKIP=1 cargo test -p lb-user   # pure-logic unit tests only, fast
    #[command(verbatim_doc_comment)]
    Test,

    /// Benchmark xdplb beside its baselines and beside HAProxy. Needs root.
    ///
    /// Ensures haproxy and wrk (Debian), builds the daemon, then runs
    /// `cargo run --package tests --bin bench -- [--quick] [ARGS...]` (dev
    /// profile: the kernel-reported costs do not depend on it). Every figure
    /// is printed beside a baseline measured in the same run (an empty XDP
    /// program, a MAC-swap XDP_TX program, HAProxy 2.6 on the same testbed),
    /// each target beside its result; docs/BENCHMARKS.md and the
    /// docs/bench-*.png charts are rewritten. The full run says how long it
    /// takes up front (about 7 minutes here); --quick takes about 2.5.
    ///
    /// Example:
    ///   cargo xtask bench --quick
    ///   cargo xtask bench -- --help      # the bench binary's own flags
    #[command(verbatim_doc_comment)]
    Bench {
        /// A short run for a quick look (fewer iterations).
        #[arg(long)]
        quick: bool,
        /// Passed to the bench binary unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },

    /// The guided demo on a namespace testbed: 10 tasks, scale 10 -> 3 -> 12, a task dies. Root.
    ///
    /// Runs `setup`, builds the daemon and the demo in the dev profile
    ///   cargo build --package lb-user --package tests --bin xdplb --bin demo
    /// then becomes target/debug/demo. The demo builds a Docker Swarm host
    /// from network namespaces (client, balancer, overlay bridge, 12 tasks,
    /// Docker's DNS on 127.0.0.11), runs the real `xdplb`, drives HTTP
    /// traffic, and after every step says what the balancer did, with the
    /// numbers (`xdplb stats`, `xdplb backends`). About 15 s once built.
    /// Everything is removed at the end, also on Ctrl-C.
    ///
    /// Example:
    ///   cargo xtask demo
    ///   cargo xtask demo --keep      # then poke at it; Ctrl-C tears it down
    ///   cargo xtask demo --xdp
    #[command(verbatim_doc_comment)]
    Demo {
        /// Leave the testbed and the daemon running afterwards, print how to
        /// poke at them (which namespace, which curl, which xdplb command),
        /// and wait for Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Attach in XDP mode instead of TC (TC is what a Swarm container uses).
        #[arg(long)]
        xdp: bool,
    },

    /// xdplb beside a real `--endpoint-mode dnsrr` service on Docker Swarm, under load.
    ///
    /// Needs a Docker engine (root or the docker group); no registry: builds
    /// xdplb-e2e/xdplb:dev (target/debug/xdplb) and xdplb-e2e/nginx:dev (Debian's
    /// nginx package) with `docker import`. Then:
    ///   - `docker swarm init` unless this node is a manager already, an
    ///     attachable overlay network `xdplb-e2e`, a config from docs/swarm/xdplb.toml
    ///   - `web`: 10 replicas, --endpoint-mode dnsrr; `xdplb`: --mode global,
    ///     port 80 published in host mode, the least capabilities the engine grants
    ///   - under client load to <node address>:80, with counts: spread over 10
    ///     tasks; scale web=3, web=12; update --force web (zero failures);
    ///     docker kill of one task (out within the health-check bound)
    ///   - removes services, config, network, volume, images, and swarm mode if
    ///     it turned it on; on failure too. A few minutes.
    ///
    /// Example:
    ///   cargo xtask swarm-e2e
    ///   cargo xtask swarm-e2e --keep    # leave it all running to look at
    #[command(verbatim_doc_comment)]
    SwarmE2e {
        /// Leave the swarm, services, images running afterwards (the next run
        /// removes them first).
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::set_verbose(cli.verbose);
    match dispatch(cli.verb) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` keeps the context chain on one line and leaves out the
            // backtrace anyhow would print under RUST_BACKTRACE=1: the printed
            // commands above already say where we were.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(verb: Verb) -> Result<()> {
    match verb {
        Verb::Setup { force } => setup::ensure(setup::Scope::Full, force, setup::Report::Each),
        Verb::BuildEbpf { release } => build::build_ebpf(release).map(drop),
        Verb::Build => build::build(),
        Verb::Test => test::test(),
        Verb::Bench { quick, args } => bench::bench(quick, &args),
        Verb::Demo { keep, xdp } => demo::demo(keep, xdp),
        Verb::SwarmE2e { keep } => swarm::swarm_e2e(keep),
    }
}
