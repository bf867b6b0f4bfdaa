//! `cargo xtask build-ebpf` and `cargo xtask build`.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::{
    cmd::{cargo, nightly_cargo, run, workspace_root},
    setup::{self, Report, Scope},
};

/// The eBPF target: the program runs little-endian, like every host we deploy on.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// `CARGO_ENCODED_RUSTFLAGS` exactly as aya-build 0.2.0 passes them, so this
/// object is the one lb-user embeds: aya-ebpf reads `bpf_target_arch` to pick
/// the host's pt_regs layout, debuginfo feeds BTF, and `--btf` makes
/// bpf-linker emit it (the kernel needs BTF for our maps and for aya-log).
pub fn ebpf_rustflags() -> String {
    let arch = std::env::consts::ARCH;
    [
        "--cfg=bpf_target_arch=\"",
        arch,
        "\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
    ]
    .concat()
}

/// `target/` honouring `CARGO_TARGET_DIR` (relative to the workspace root, like cargo).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Build lb-ebpf alone, on nightly, and return the object's path.
pub fn build_ebpf(release: bool) -> Result<PathBuf> {
    setup::ensure(Scope::Toolchain, false, Report::Summary)?;
    let mut cmd = nightly_cargo();
    cmd.env("CARGO_ENCODED_RUSTFLAGS", ebpf_rustflags()).args([
        "build",
        "--package",
        "lb-ebpf",
        "--target",
        BPF_TARGET,
        "-Z",
        "build-std=core",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let object = target_dir().join(BPF_TARGET).join(profile).join("lb-ebpf");
    if !object.exists() {
        bail!("cargo succeeded but {} is missing", object.display());
    }
    println!("eBPF object: {}", object.display());
    println!("  sections and maps: llvm-objdump -h {}", object.display());
    println!(
        "  code with source:  llvm-objdump -S --no-show-raw-insn {}",
        object.display()
    );
    println!("  once loaded:       bpftool prog dump xlated name xdplb_xdp linum");
    Ok(object)
}

/// Release build of the default members; lb-user's build script builds and
/// embeds the eBPF object (always `--release`) through aya-build.
pub fn build() -> Result<()> {
    setup::ensure(Scope::Toolchain, false, Report::Summary)?;
    release()
}

/// `cargo build --release` of the default members, without the setup check.
pub fn release() -> Result<()> {
    run(cargo().args(["build", "--release"]))?;
    let daemon = target_dir().join("release").join("xdplb");
    if daemon.exists() {
        println!("daemon and CLI: {}", daemon.display());
    }
    Ok(())
}
