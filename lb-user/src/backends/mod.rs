//! Where a service's backends come from and whether they take traffic, in
//! the order the daemon runs them: `discovery` asks DNS for the tasks,
//! `screen` keeps the addresses that may be backends, `health` checks them
//! and `state` decides who is in rotation.

pub mod discovery;
pub mod health;
pub mod screen;
pub mod state;
