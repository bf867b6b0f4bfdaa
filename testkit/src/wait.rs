//! Waiting for something to become true, with a deadline that names what
//! was awaited. Deadlines are generous upper bounds for a busy machine,
//! never a measure of speed (that is `cargo xtask bench`'s job).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`
/// saying what it waited for.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            bail!("waited {timeout:?} for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`] for a condition.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    wait_until(timeout, what, || cond().then_some(()))
}

/// Polls `cond` every 5 ms on the tokio clock until it holds; panics after
/// `deadline` saying what it waited for.
pub async fn until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "waited {deadline:?} for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
