//! The docker CLI: printed commands that return their output, quiet polls,
//! and the engine probe that decides whether the Swarm layer runs at all.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{render, trace, which};

pub fn docker<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new("docker");
    cmd.args(args);
    cmd
}

/// Print `cmd`, run it, and return its stdout; fail with its stderr.
pub fn out(mut cmd: Command) -> Result<String> {
    println!("$ {}", render(&cmd));
    capture(&mut cmd)
}

/// Like [`out`], printed only with `--verbose`: for polls in a loop.
pub fn poll(mut cmd: Command) -> Result<String> {
    trace(&cmd);
    capture(&mut cmd)
}

fn capture(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", render(cmd)))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "`{}` failed ({}): {}",
            render(cmd),
            output.status,
            stderr.trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What `docker info` says about the engine and this node's Swarm role.
pub struct Engine {
    pub version: String,
    /// `inactive`, `active`, `pending`, `error`, `locked`.
    pub swarm: String,
    /// This node is a manager (can create services).
    pub manager: bool,
}

/// Asks the engine; `Err` is one line saying why there is no usable engine.
pub fn engine() -> Result<Engine, String> {
    if which("docker").is_none() {
        return Err("no `docker` CLI on PATH".into());
    }
    let mut cmd = docker([
        "info",
        "--format",
        "{{.ServerVersion}}|{{.Swarm.LocalNodeState}}|{{.Swarm.ControlAvailable}}",
    ]);
    trace(&cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`docker info` could not start: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<&str> = stdout.trim().split('|').collect();
    match fields.as_slice() {
        [version, swarm, manager] if output.status.success() && !version.is_empty() => Ok(Engine {
            version: version.to_string(),
            swarm: swarm.to_string(),
            manager: *manager == "true",
        }),
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = stderr
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("no answer");
            Err(format!("`docker info` got no answer from an engine: {why}"))
        }
    }
}

/// Retry `f` every 250 ms until it returns `Some`, or fail after `timeout`
/// with `what` and the last note `f` left.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&mut String) -> Result<Option<T>>,
) -> Result<T> {
    let started = Instant::now();
    let mut note = String::new();
    loop {
        if let Some(v) = f(&mut note)? {
            return Ok(v);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {note}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Running tasks of `service` (desired and current state both running), and
/// the errors of any task that failed, for messages.
pub fn running_tasks(service: &str) -> Result<(usize, Vec<String>)> {
    let ps = poll(docker([
        "service",
        "ps",
        service,
        "--format",
        "{{.DesiredState}}|{{.CurrentState}}|{{.Error}}",
    ]))?;
    let mut running = 0;
    let mut errors = Vec::new();
    for line in ps.lines() {
        let mut f = line.splitn(3, '|');
        let (desired, current, error) = (
            f.next().unwrap_or_default(),
            f.next().unwrap_or_default(),
            f.next().unwrap_or_default().trim(),
        );
        if desired == "Running" && current.starts_with("Running") {
            running += 1;
        }
        if !error.is_empty() && !errors.iter().any(|e| e == error) {
            errors.push(error.to_string());
        }
    }
    Ok((running, errors))
}

/// Waits until `service` runs exactly `want` tasks.
pub fn wait_running(service: &str, want: usize, timeout: Duration) -> Result<()> {
    wait_for(
        &format!("{want} running tasks of {service}"),
        timeout,
        |note| {
            let (running, errors) = running_tasks(service)?;
            *note = format!("{running} running; task errors: {errors:?}");
            Ok((running == want).then_some(()))
        },
    )
}

/// Container ids of `service`'s tasks on this node (running only unless `all`).
pub fn containers(service: &str, all: bool) -> Result<Vec<String>> {
    let label = format!("label=com.docker.swarm.service.name={service}");
    let mut args = vec!["ps", "-q", "--no-trunc", "--filter", &label];
    if all {
        args.push("-a");
    }
    Ok(poll(docker(args))?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}
