//! xdplb control plane: loads the data plane and drives its maps.
//!
//! Modules follow the data flow (DESIGN.md): `config` -> `discovery` ->
//! `health` -> `state` -> `maglev` (table builder) -> `maps` (the only place
//! that touches BPF maps). Everything except `maps` is pure or talks only to
//! the network, so it is unit-tested without root.
//!
//! Observability reads the same maps from the other end: `pinned` opens
//! them read-only from their pins (no programs loaded), `stats` builds the
//! snapshot that `stats`, `backends`, `top`, `explain` and `metrics` show.
pub mod attach;
pub mod cli;
pub mod clsact;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod explain;
pub mod generate;
pub mod health;
pub mod ifwatch;
pub mod logging;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod pin_dir;
pub mod pinned;
pub mod probe;
pub mod reload;
pub mod screen;
pub mod state;
pub mod stats;
pub mod status;
pub mod table;
pub mod top;
