//! Backend selection for new flows: round-robin over the service's backend list.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{BACKEND_ACTIVE, Backend, MAX_BACKENDS_PER_SERVICE, ServiceValue};

use crate::maps::{BACKENDS, RR_CURSORS};

/// The next backend of `service` in round-robin order, or `None` if it has no usable backend.
#[inline(always)]
pub fn round_robin(service: &ServiceValue) -> Option<(u32, Backend)> {
    let count = service.backend_count;
    if count == 0 || count as usize > MAX_BACKENDS_PER_SERVICE {
        return None;
    }
    let cursor = RR_CURSORS.get_ptr_mut(service.service_id)?;
    // SAFETY: the pointer is a live, aligned u64 in the map. An atomic add (BPF_ATOMIC with
    // BPF_FETCH) rather than core::sync::atomic, which the bpf target does not offer. Not
    // Relaxed: LLVM lowers a relaxed add to the non-fetching BPF instruction.
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::AcqRel }>(cursor, 1) };
    let slot = turn % u64::from(count);
    // The verifier does not bound the result of a modulo; LLVM knows it is below `count` and
    // would drop a plain mask, so the mask is applied to a value read back opaquely.
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&slot) } as usize & (MAX_BACKENDS_PER_SERVICE - 1);
    let backend_id = service.backend_ids[slot];
    let backend = BACKENDS.get(backend_id)?;
    if backend.flags & BACKEND_ACTIVE == 0 {
        return None;
    }
    Some((backend_id, *backend))
}
