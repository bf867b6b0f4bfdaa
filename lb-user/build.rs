//! Builds the eBPF object with aya-build and embeds it (`include_bytes_aligned!`
//! in `src/maps.rs`). Needs the nightly toolchain with rust-src and bpf-linker;
//! `cargo xtask setup` installs both.
use std::process::Command;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Host-only builds (unit tests of pure logic) embed an empty object;
        // `DataPlane::load` then refuses with a clear error.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("lb-ebpf");
        std::fs::write(out, b"")?;
        return Ok(());
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !linker_ok {
        panic!(
            "bpf-linker is not on PATH, so the eBPF object cannot be built. \
             Run `cargo xtask setup` (installs rust-src for nightly and bpf-linker \
             against nightly's LLVM), then build again."
        );
    }
    let pkg = aya_build::Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default()).map_err(|e| {
        anyhow::anyhow!("building lb-ebpf failed ({e:#}); run `cargo xtask build-ebpf` to see the full compiler output")
    })
}
