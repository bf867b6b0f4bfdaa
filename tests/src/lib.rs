//! Test support for xdplb: network namespaces, the packet-level fixture
//! (`BPF_PROG_TEST_RUN` against the real kernel), and the end-to-end testbed
//! (a Swarm-like host built from namespaces, running the real daemon).

pub mod netns;
pub mod packet;
pub mod testbed;
