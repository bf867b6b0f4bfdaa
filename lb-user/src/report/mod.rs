//! What the CLI readers and `/metrics` tell an operator, read straight
//! from the pinned maps and the daemon's status file: `stats`, `backends`,
//! `top`, `explain` and the Prometheus text.

pub mod backends;
pub mod explain;
pub mod format;
pub mod metrics;
pub mod snapshot;
pub mod stats;
pub mod top;
