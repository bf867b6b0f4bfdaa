//! The clocks the daemon and the readers share: Unix time for what an
//! operator reads, `CLOCK_MONOTONIC` for what the data plane stamps. A
//! leaf.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Converts a monotonic instant to Unix milliseconds (for display).
pub fn instant_to_ms(at: Instant) -> u64 {
    let age = Instant::now().saturating_duration_since(at);
    now_ms().saturating_sub(age.as_millis() as u64)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`, which
/// stamps `Conn::last_seen_ns` and `created_ns`.
pub fn monotonic_now_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // CLOCK_MONOTONIC always exists on Linux.
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    (ts.tv_sec() as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec() as u64)
}
