//! xdplb control plane: loads the data plane and drives its maps.
//!
//! The folders follow the data flow (DESIGN.md):
//! - `config`: what the operator asked for, checked before anything runs;
//! - `backends`: `discovery` -> `screen` -> `health` -> `state`, where a
//!   service's backends come from and whether they are in rotation;
//! - `dataplane`: `maglev` and `table` turn backends into map contents,
//!   `maps` is the only place that loads programs and writes BPF maps,
//!   `attach` hooks them to interfaces;
//! - `daemon`: `run`, `down` and `reload`, which drive all of the above;
//! - `status`: the daemon's status file, its report to the CLI;
//! - `report`: the readers (`stats`, `backends`, `top`, `explain`,
//!   `/metrics`), from the pinned maps (`dataplane::pinned`) and the status
//!   file.
//!
//! A module uses only modules of its own layer or below, in this order:
//! `clock`, `logging`, `config`, `dataplane` (`maglev`, `clsact`,
//! `pinned`, `probe`, `pin_dir`, `maps`, `attach`, `table`), `backends`
//! (`discovery`, `screen`), `status`, `backends` (`health`, `state`),
//! `dataplane::ifwatch`, `cli`, `report`, `daemon`. Everything outside
//! `dataplane` is pure or talks only to the network, so it is unit-tested
//! without root.

pub mod backends;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod generate;
pub mod logging;
pub mod report;
pub mod status;
