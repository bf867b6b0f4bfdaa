//! Test support for xdplb: network namespaces, the packet-level fixture
//! (`BPF_PROG_TEST_RUN` against the real kernel), and the end-to-end testbed
//! (a Swarm-like host built from namespaces, running the real daemon).

pub mod attack;

pub mod packet;
pub mod testbed;

/// Runs a scenario function `fn name(mode: Mode)` once per attach mode, as
/// the tests `name::tc` and `name::xdp`.
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn tc() {
                super::$name($crate::testbed::Mode::Tc)
            }
            #[test]
            fn xdp() {
                super::$name($crate::testbed::Mode::Xdp)
            }
        }
    )*};
}
