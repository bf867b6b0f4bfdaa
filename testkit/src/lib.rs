//! Test support shared by lb-user's integration tests (no root) and the
//! `tests` crate (root): what both need, written once.
//!
//! - [`dns`]: a DNS server that answers like Docker's embedded DNS where
//!   xdplb cares (`tasks.<service>`, truncation, failures on demand);
//! - [`http`]: an HTTP server with a chosen status and delay;
//! - [`netns`]: network namespaces, deleted on drop, entered per thread;
//! - [`wait`]: waiting with a deadline that names what was awaited;
//! - [`bin`]: the `xdplb` binary a test runs.

pub mod bin;
pub mod dns;
pub mod http;
pub mod netns;
pub mod wait;
