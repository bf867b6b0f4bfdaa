//! xdplb control plane: loads the data plane and drives its maps.
//!
//! Modules follow the data flow: `maglev` (table builder, pure) -> `maps`
//! (the only place that touches BPF maps).
pub mod maglev;
pub mod maps;
