//! Developer verbs for xdplb: `cargo xtask <verb>` (alias in .cargo/config.toml).
//!
//! Every verb prints each command before running it, so what it does can be
//! repeated by hand.

mod bench;
mod build;
mod cmd;
mod demo;
mod dist;
mod setup;
mod swarm;
mod test;
mod vm;

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
    ///     iputils-ping curl tcpdump qemu-system-x86 busybox-static dnsmasq-base procps
    ///   - the VM layer's kernel (newest linux-image-6.1.0-*-cloud-amd64-unsigned,
    ///     apt-get download) and base initramfs, cached in ~/.cache/xdplb/vm
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

    /// Release artifacts in target/dist/: a tarball, a Debian package, a container image.
    ///
    /// Runs `cargo build --release --package lb-user` (the build `bench` uses
    /// too), strips the debug info, and makes from that binary:
    ///   xdplb-VERSION-x86_64-linux-gnu.tar.gz  the binary, the systemd unit
    ///       (dist/xdplb.service), the example config, man pages, completions
    ///   xdplb_VERSION_amd64.deb   the same files in their Debian places
    ///       (dpkg-deb --build; Depends from dpkg-shlibdeps)
    ///   xdplb-VERSION-rootfs.tar  the image's root file system (the binary and
    ///       the libraries ldd lists); imported as xdplb:VERSION and
    ///       xdplb:latest with `docker import` when an engine answers
    ///   SHA256SUMS
    /// Man pages and completions come from the binary (`xdplb generate`).
    /// --check then installs the .deb into a scratch root (dpkg --root as
    /// root, else dpkg -x), runs it, looks for the man pages and completions,
    /// runs `systemd-analyze verify` on the unit, lists the tarball, and runs
    /// `docker run xdplb:VERSION --help`; `cargo xtask test` does the same.
    ///
    /// Example:
    ///   cargo xtask dist --check
    ///   sudo dpkg -i target/dist/xdplb_*.deb
    #[command(verbatim_doc_comment)]
    Dist {
        /// Install the .deb into a scratch root and check every artifact.
        #[arg(long)]
        check: bool,
    },

    /// Run every check CI runs: fmt, unit, packet, VM, (swarm), clippy. Needs root.
    ///
    /// Layers, in order; all run even if one fails, then a summary is printed:
    ///   1. cargo +nightly fmt --all -- --check
    ///   2. unit tests, no root:  cargo test --workspace --exclude lb-ebpf --exclude tests
    ///   3. dist: `cargo xtask dist --check` (release build, tarball, .deb, image)
    ///   4. packet and namespace tests, root:  cargo test --package tests -- --test-threads=1
    ///      (the upgrade test starts the .deb's binary over the debug one)
    ///   5. VM (Debian 12 kernel 6.1): `vm-test`, packet tests and the daemon under qemu
    ///   6. swarm end-to-end:     `swarm-e2e` when `docker info` answers, else skipped
    ///   7. cargo clippy --workspace --exclude lb-ebpf --all-targets -- -D warnings
    ///   8. cargo +nightly clippy --package lb-ebpf --target bpfel-unknown-none ...
    ///
    /// Runs `setup` first (only the toolchain part when not root; the packet
    /// layer then fails with a message saying root is needed). Everything but
    /// dist (and swarm, which uses dist's image) uses the dev profile so layers
    /// share builds. Exit status non-zero if any layer
    /// failed. This is exactly what .ci/run runs.
    ///
    /// Example:
    ///   cargo xtask test
    ///   AYA_BUILD_SKIP=1 cargo test -p lb-user   # pure-logic unit tests only, fast
    #[command(verbatim_doc_comment)]
    Test,

    /// The tests on Debian 12's kernel 6.1 (or another Debian kernel) in a qemu VM.
    ///
    /// Boots the newest `linux-image-6.1.0-*-cloud-amd64-unsigned` under qemu's
    /// software emulation (-accel tcg -cpu max -smp 2 -m 2G; /dev/kvm here hangs
    /// stock kernels) and runs inside, each step under its own time limit:
    ///   e2e_daemon  the testbed's `basic` scenario, TC and XDP (IPv4), real daemon
    ///   smoke       IPv4 and IPv6 services through the real daemon, TC and XDP
    ///   packet      every BPF_PROG_TEST_RUN packet test
    ///   fuzz        the random-packet run, shortened to 20,000 + 4,000 packets
    /// The kernel package is downloaded once (`apt-get download`, `dpkg-deb -x`)
    /// into ~/.cache/xdplb/vm/, with a base initramfs (busybox, iproute2, ethtool,
    /// curl, dnsmasq, the modules veth, bridge, sch_ingress, cls_bpf, act_bpf);
    /// each run adds the freshly built test binaries and xdplb. Results come back
    /// over the serial console (target/vm/console.log). Prints a summary per step
    /// with the kernel `uname -r` saw; exit status non-zero if any step failed.
    /// About 8 minutes on 2 cores. No root needed. `cargo xtask test` runs it as
    /// the layer "VM (Debian 12 kernel 6.1)".
    ///
    /// Example:
    ///   cargo xtask vm-test
    ///   cargo xtask vm-test --only smoke,e2e_daemon
    ///   cargo xtask vm-test --kernel linux-image-6.1.0-40-cloud-amd64-unsigned
    ///   cargo xtask vm-test --kernel ./linux-image-6.12.38+deb13-cloud-amd64-unsigned_6.12.38-1_amd64.deb
    #[command(verbatim_doc_comment)]
    VmTest {
        /// A Debian kernel package name (apt-get download) or a .deb file.
        /// Default: the newest linux-image-6.1.0-*-cloud-amd64-unsigned apt knows.
        #[arg(long, value_name = "PACKAGE_OR_DEB")]
        kernel: Option<String>,
        /// Hard limit for the VM (boot, every step, power-off); qemu is killed after it.
        #[arg(long, value_name = "SECS", default_value_t = vm::DEFAULT_TIMEOUT_SECS)]
        timeout: u64,
        /// Run only these steps (comma-separated): e2e_daemon, smoke, packet, fuzz.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },

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

    /// Compare the per-packet costs (bench §1) of another revision with this checkout's. Root.
    ///
    /// Builds REV's bench in a worktree of its own (target/bench-ab/<rev>,
    /// kept for the next comparison) and this checkout's, then runs
    /// `bench --only dataplane --quick` of each in alternating rounds and
    /// prints each case's cost above the paired empty program, the median
    /// over rounds, beside the other side's, with the change. Single full
    /// runs move 10-20% from run to run here; this is how a change of a few
    /// per cent is told (e.g. "no more than 5% worse than before").
    ///
    /// Example:
    ///   cargo xtask bench-ab 77bd37e
    ///   cargo xtask bench-ab HEAD~3 --rounds 7
    #[command(verbatim_doc_comment)]
    BenchAb {
        /// The revision to compare with (anything `git rev-parse` takes).
        rev: String,
        /// Rounds per side.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Test runs per case and round (the bench's --runs).
        #[arg(long, default_value_t = 20_000)]
        runs: u32,
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
    /// xdplb-e2e/xdplb:dev (the image `dist` ships: its rootfs, from the release
    /// build) and xdplb-e2e/nginx:dev (Debian's nginx package) with `docker
    /// import`. Then:
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
        Verb::Dist { check } => dist::dist_verb(check),
        Verb::Test => test::test(),
        Verb::VmTest {
            kernel,
            timeout,
            only,
        } => vm::vm_test(&vm::Options {
            kernel,
            timeout: std::time::Duration::from_secs(timeout),
            only,
        }),
        Verb::Bench { quick, args } => bench::bench(quick, &args),
        Verb::BenchAb { rev, rounds, runs } => bench::bench_ab(&rev, rounds, runs),
        Verb::Demo { keep, xdp } => demo::demo(keep, xdp),
        Verb::SwarmE2e { keep } => swarm::swarm_e2e(keep),
    }
}
