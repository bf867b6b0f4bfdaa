//! The data plane's clock. A leaf.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

/// The data plane's clock: CLOCK_MONOTONIC as of the last timer tick (at
/// most 10 ms behind). Every timeout and hold it measures is 500 ms or
/// longer, and the coarse clock is a memory read where the precise one
/// reads the TSC: 20 ns less per packet (bench-ab).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}
