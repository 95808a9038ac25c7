//! Passive health checking (outlier detection): what the data plane sees of each backend's
//! connections. A SYN it forwarded that the backend refused (a RST, an ICMP destination
//! unreachable) or left unanswered (the client's SYN again, no SYN-ACK between) is a failure;
//! the backend's SYN-ACK, a success. `Backend::eject_after` failures in a row eject the backend
//! at once, here, without waiting for userspace: new flows pass it by (`select`), established
//! ones are left alone. Userspace reads `PASSIVE_HEALTH` (logs, state, metrics), and ends the
//! ejection when its active checks find the backend healthy; otherwise it ends after
//! `PASSIVE_EJECTION_NS`, and the next failure ejects the backend again.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{Event, PASSIVE_EJECTION_NS, PASSIVE_REFUSED, PassiveHealth};

use crate::{
    maps::{BACKENDS, PASSIVE_HEALTH},
    stats::count_event,
};

/// A connection to `backend_id` failed: `why` is `PASSIVE_REFUSED` or `PASSIVE_UNANSWERED`.
/// Ejects the backend when that makes `eject_after` failures in a row (or more: a backend on
/// probation after its ejection ended fails once more).
#[inline(always)]
pub fn failed(backend_id: u32, why: u32) {
    let Some(health) = PASSIVE_HEALTH.get_ptr_mut(backend_id) else {
        return;
    };
    let eject_after = BACKENDS
        .get(backend_id)
        .map_or(0, |backend| backend.eject_after);
    // SAFETY: a live, aligned map value shared by every CPU; each field is updated atomically
    // (fetching RMWs: AcqRel, as LLVM lowers a relaxed one to the non-fetching instruction).
    unsafe {
        let counter = if why == PASSIVE_REFUSED {
            &raw mut (*health).refused
        } else {
            &raw mut (*health).unanswered
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::AcqRel }>(counter, 1);
        (*health).last_failure = why;
        let failures =
            atomic_xadd::<u32, u32, { AtomicOrdering::AcqRel }>(&raw mut (*health).failures, 1)
                .wrapping_add(1);
        if eject_after == 0 || failures < u32::from(eject_after) {
            return;
        }
        let now = bpf_ktime_get_coarse_ns().max(1);
        let ejected_ns = (*health).ejected_ns;
        if ejected_ns != 0 && now.wrapping_sub(ejected_ns) < PASSIVE_EJECTION_NS {
            return;
        }
        // Two CPUs seeing failures at once eject the backend once.
        let (_, won) = atomic_cxchg::<u64, { AtomicOrdering::AcqRel }, { AtomicOrdering::Acquire }>(
            &raw mut (*health).ejected_ns,
            ejected_ns,
            now,
        );
        if won {
            atomic_xadd::<u64, u64, { AtomicOrdering::AcqRel }>(&raw mut (*health).ejections, 1);
            count_event(Event::BackendEjected);
        }
    }
}

/// `backend_id` answered a connection (its SYN-ACK): its failures in a row start over. Written
/// only when there were some, so that the shared value is not written on every connection.
#[inline(always)]
pub fn answered(backend_id: u32) {
    if let Some(health) = PASSIVE_HEALTH.get_ptr_mut(backend_id) {
        // SAFETY: a live, aligned map value; a plain store of a u32 is atomic.
        unsafe {
            if (*health).failures != 0 {
                (*health).failures = 0;
            }
        }
    }
}

/// Whether `backend_id` is ejected now (new flows pass it by).
#[inline(always)]
pub fn is_ejected(backend_id: u32) -> bool {
    let Some(health) = PASSIVE_HEALTH.get(backend_id) else {
        return false;
    };
    let health: &PassiveHealth = health;
    let ejected_ns = health.ejected_ns;
    // SAFETY: plain helper call, only made for a backend that was ejected.
    ejected_ns != 0
        && unsafe { bpf_ktime_get_coarse_ns() }.wrapping_sub(ejected_ns) < PASSIVE_EJECTION_NS
}
