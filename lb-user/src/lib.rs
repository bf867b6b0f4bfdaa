//! xdplb control plane: loads the data plane and drives its maps.
//!
//! Modules follow the data flow (DESIGN.md): `config` -> `discovery` ->
//! `health` -> `state` -> `maglev` (table builder) -> `maps` (the only place
//! that touches BPF maps). Everything except `maps` is pure or talks only to
//! the network, so it is unit-tested without root.
pub mod attach;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod health;
pub mod maglev;
pub mod maps;
pub mod state;
pub mod status;
pub mod table;
