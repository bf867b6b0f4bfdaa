//! Per-CPU counters: per reason, per service, per backend, per event.

use crate::maps::{BACKEND_STATS, EVENT_STATS, REASON_STATS, SERVICE_STATS};

/// Counts one `lb_common::event`.
#[inline(always)]
pub fn event(event: u32) {
    if let Some(c) = EVENT_STATS.get_ptr_mut(event) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn reason(reason: u32, bytes: u64) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a forwarded packet against its service and backend.
#[inline(always)]
pub fn flow(service: u32, backend: u32, bytes: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a new flow against its service and backend.
#[inline(always)]
pub fn new_flow(service: u32, backend: u32) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
        unsafe { (*c).new_flows += 1 };
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: as above.
        unsafe { (*c).new_flows += 1 };
    }
}
