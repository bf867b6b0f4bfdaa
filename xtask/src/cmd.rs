//! Running external commands: print them first, then run them, and turn a
//! failure into an error that names the command.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context as _, Result};

/// `--verbose`: also print the cheap probe commands (`dpkg-query`, `--version` checks).
static VERBOSE: AtomicBool = AtomicBool::new(false);

pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// `cargo` on the toolchain the outer `cargo xtask` runs on (stable by default).
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo +nightly`, for everything that builds or lints the eBPF crate.
///
/// The outer `cargo xtask` runs through the rustup proxy, which exports
/// `RUSTUP_TOOLCHAIN=stable-...` to us; left in place, it would pin every
/// child to stable. `RUSTC` and `RUSTC_WORKSPACE_WRAPPER` are removed for the
/// same reason aya-build removes them: they would point the inner cargo at the
/// outer toolchain's compiler (or at clippy-driver).
pub fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(workspace_root());
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WORKSPACE_WRAPPER"] {
        cmd.env_remove(var);
    }
    cmd
}

/// A copy-pasteable rendering of `cmd`: explicitly set variables, program, arguments.
pub fn render(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

/// Shell quoting: bare when safe, `'...'` for spaces and quotes, `$'...'` when
/// the value holds control characters (the `\x1f` of `CARGO_ENCODED_RUSTFLAGS`).
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_=+./:,@%^".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        return s.into_owned();
    }
    if s.chars().any(|c| c.is_control()) {
        let mut out = String::from("$'");
        for c in s.chars() {
            match c {
                '\'' => out.push_str("\\'"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('\'');
        return out;
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn announce(cmd: &Command) {
    match cmd.get_current_dir() {
        Some(dir) if dir != workspace_root() => {
            println!("$ (cd {}) {}", dir.display(), render(cmd))
        }
        _ => println!("$ {}", render(cmd)),
    }
}

/// Print a probe command, only with `--verbose`.
pub fn trace(cmd: &Command) {
    if VERBOSE.load(Ordering::Relaxed) {
        announce(cmd);
    }
}

/// Print `cmd`, run it with inherited stdio, and return its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    announce(cmd);
    cmd.status()
        .with_context(|| format!("could not start `{}`", render(cmd)))
}

/// Print `cmd`, run it, and fail unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", render(cmd));
    }
    Ok(())
}

/// Run a quiet probe and return its stdout, or `None` when the program is
/// missing or exits non-zero. Printed only with `--verbose`.
pub fn probe(cmd: &mut Command) -> Option<String> {
    trace(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether we run with effective uid 0 (read from /proc, so no libc binding is needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            // Uid: real effective saved filesystem
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// Look `name` up on PATH the way the shell would.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_simple_words_bare_and_escapes_the_rest() {
        assert_eq!(quote(OsStr::new("build-std=core")), "build-std=core");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(
            quote(OsStr::new("--cfg=x=\"y\"\x1f-Cdebuginfo=2")),
            "$'--cfg=x=\"y\"\\x1f-Cdebuginfo=2'"
        );
    }
}
