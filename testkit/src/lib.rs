//! Test support shared by lb-user's integration tests (no root) and the
//! `tests` crate (root): what both need, written once.
//!
//! - [`dns`]: a DNS server that answers like Docker's embedded DNS where
//!   xdplb cares (`tasks.<service>`, truncation, failures on demand).

pub mod dns;
