//! `cargo xtask demo`: build what the demo needs, then become the demo
//! (`target/debug/demo`, the `tests` crate's binary).

use std::os::unix::process::CommandExt as _;

use anyhow::{bail, Context as _, Result};

use crate::{
    build::target_dir,
    cmd::{cargo, is_root, render, run},
    setup::{self, Report, Scope},
};

pub fn demo(keep: bool, xdp: bool) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo needs root: it creates network namespaces and loads BPF programs; run \
             `sudo cargo xtask demo` (or as root)"
        );
    }
    setup::ensure(Scope::Full, false, Report::Summary)?;
    // The dev profile, like `cargo xtask test`: the builds are shared (the
    // eBPF object inside the daemon is always optimised).
    run(cargo().args([
        "build",
        "--package",
        "lb-user",
        "--package",
        "tests",
        "--bin",
        "xdplb",
        "--bin",
        "demo",
    ]))?;
    let bin = target_dir().join("debug").join("demo");
    let mut cmd = std::process::Command::new(&bin);
    if keep {
        cmd.arg("--keep");
    }
    if xdp {
        cmd.arg("--xdp");
    }
    println!("$ {}", render(&cmd));
    // exec: Ctrl-C reaches the demo directly, which cleans up on its own.
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not start {}", bin.display()))
}
