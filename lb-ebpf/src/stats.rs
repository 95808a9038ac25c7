//! Per-CPU counters: one slot per `Reason` and `Event`, one per backend. Userspace sums CPUs.
use lb_common::{Event, Reason};

use crate::maps::{BACKEND_STATS, EVENT_STATS, REASON_STATS};

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    count_reason_slot(reason as u32, bytes);
}

/// [`count_reason`] by the reason's number, as recorded in a map (a number that is no reason's
/// counts nowhere).
#[inline(always)]
pub fn count_reason_slot(slot: u32, bytes: u64) {
    if let Some(counter) = REASON_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_event(event: Event) {
    if let Some(counter) = EVENT_STATS.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 }
    }
}

/// A client → backend packet; `new_flow` when it is the packet that chose the backend.
#[inline(always)]
pub fn count_to_backend(backend_id: u32, bytes: u64, new_flow: bool) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes;
            if new_flow {
                (*stats).new_flows += 1;
            }
        }
    }
}

/// A new flow of a node's own socket (`socklb`), whose packets this node may never see.
#[inline(always)]
pub fn count_new_flow(backend_id: u32) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        unsafe { (*stats).new_flows += 1 }
    }
}

/// A backend → client reply that was reverse-NATed.
#[inline(always)]
pub fn count_reply(backend_id: u32, bytes: u64) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).reply_packets += 1;
            (*stats).reply_bytes += bytes;
        }
    }
}
