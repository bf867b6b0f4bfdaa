//! Locating the `xdplb` binary that a test runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// The `xdplb` binary next to the test executable: tests run from
/// `target/<profile>/deps/`, the binary is `target/<profile>/xdplb`.
/// `XDPLB_BIN` overrides it.
pub fn xdplb_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("XDPLB_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe
        .parent()
        .context("the test executable has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let bin = dir.join("xdplb");
    if !bin.exists() {
        bail!(
            "{} does not exist: build it first: cargo build -p lb-user",
            bin.display()
        );
    }
    warn_if_stale(&bin);
    Ok(bin)
}

/// `cargo test -p tests` does not rebuild the daemon (it belongs to another
/// package), so say so when its sources are newer than the binary.
fn warn_if_stale(bin: &Path) {
    fn newest(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                newest(&path, best);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                    *best = Some((modified, path));
                }
            }
        }
    }
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut best = None;
    for krate in ["lb-user/src", "lb-ebpf/src", "lb-common/src"] {
        newest(&root.join(krate), &mut best);
    }
    if let Some((modified, path)) = best {
        if modified > built {
            eprintln!(
                "warning: {} is older than {}: rebuild it (cargo build -p lb-user)",
                bin.display(),
                path.display()
            );
        }
    }
}
