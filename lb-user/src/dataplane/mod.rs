//! The kernel side as the daemon and the CLI see it: `maps` loads the
//! object and opens its maps, `maglev` and `table` turn backends into map
//! contents, `attach` and `clsact` hook the programs to interfaces and
//! `ifwatch` follows the interfaces; `pinned` reads the maps read-only for
//! the CLI; `pin_dir` and `probe` check the host first.

pub mod attach;
pub mod clsact;
pub mod ifwatch;
pub mod maglev;
pub mod maps;
pub mod pin_dir;
pub mod pinned;
pub mod probe;
pub mod table;
