//! Test support for xdplb: network namespaces and the packet-level fixture
//! (`BPF_PROG_TEST_RUN` against the real kernel). The end-to-end testbed
//! joins them here later.

pub mod netns;
pub mod packet;
