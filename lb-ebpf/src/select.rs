//! Backend selection for new flows: round-robin over the service's backend list, or a lookup
//! in the service's maglev table by the hash of the flow's 5-tuple; either passes backends the
//! data plane ejected (`passive`) by. For both families: IPv6 (`conntrack6`) gives its own
//! cursors, tables and backends.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::maps::{Array, HashMap};
use lb_common::{
    BACKEND_ACTIVE, Backend, Event, FlowKey, MAGLEV_TABLE_SIZE, MAX_BACKENDS_PER_SERVICE,
    MaglevTable, RrCursor, SERVICE_PORT_ANY, SERVICE_PORT_VIP, ServiceKey, ServiceValue, flow_hash,
    service_port_slot,
};

use crate::{
    maps::{BACKENDS, MAGLEV, RR_CURSORS, SERVICE_PORTS, SERVICES},
    passive,
    stats::count_event,
};

/// The `SERVICE_PORTS` bits of `proto` and `port_be` (`SERVICE_PORT_VIP`, `SERVICE_PORT_ANY`):
/// 0 when no service listens there.
#[inline(always)]
pub fn service_port(proto: u8, port_be: u16) -> u64 {
    let Some((word, shift)) = service_port_slot(proto, port_be) else {
        return 0;
    };
    SERVICE_PORTS.get(word).map_or(0, |bits| {
        (*bits >> shift) & (SERVICE_PORT_VIP | SERVICE_PORT_ANY)
    })
}

/// The service published on `vip_be` (0: on every local address), `port_be` and `proto`.
#[inline(always)]
pub fn service(vip_be: u32, port_be: u16, proto: u8) -> Option<&'static ServiceValue> {
    let key = ServiceKey {
        vip_be,
        port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: service values are replaced whole by userspace, never written in place.
    unsafe { SERVICES.get(&key) }
}

/// Backends a new flow tries past an ejected one (`passive`) before it fails open and takes
/// the backend its turn gave it: enough for a service to lose a few backends at once, few
/// enough to keep the program small. Userspace takes an ejected backend out of the service's
/// list (through its active checks) soon after, so the scan rarely runs.
const EJECTED_TRIES: u32 = 8;

/// The next backend of `service` in round-robin order, passing ejected backends by, or `None`
/// if it has no usable backend.
#[inline(always)]
pub fn round_robin(service: &ServiceValue) -> Option<(u32, Backend)> {
    round_robin_over(service, &RR_CURSORS, active)
}

/// [`round_robin`] for either family: its cursors in `cursors`, and `active` giving a backend
/// id's backend (with what the family needs of it) if it may receive packets.
#[inline(always)]
pub fn round_robin_over<T>(
    service: &ServiceValue,
    cursors: &Array<RrCursor>,
    active: impl Fn(u32) -> Option<T>,
) -> Option<T> {
    let count = service.backend_count;
    if count == 0 || count as usize > MAX_BACKENDS_PER_SERVICE {
        return None;
    }
    let cursor = cursors.get_ptr_mut(service.service_id)?.cast::<u64>();
    // SAFETY: the pointer is a live, aligned u64 in the map. An atomic add (BPF_ATOMIC with
    // BPF_FETCH) rather than core::sync::atomic, which the bpf target does not offer. Not
    // Relaxed: LLVM lowers a relaxed add to the non-fetching BPF instruction.
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::AcqRel }>(cursor, 1) };
    let first = (turn % u64::from(count)) as u32;
    let mut slot = first;
    for tried in 0..EJECTED_TRIES {
        // The verifier does not bound the result of a modulo; LLVM knows it is below `count`
        // and would drop a plain mask, so the mask is applied to a value read back opaquely.
        // SAFETY: reading a local.
        let index =
            unsafe { core::ptr::read_volatile(&slot) } as usize & (MAX_BACKENDS_PER_SERVICE - 1);
        let backend_id = service.backend_ids[index];
        if !passive::is_ejected(backend_id) {
            if tried > 0 {
                count_event(Event::FlowPassedEjected);
            }
            return active(backend_id);
        }
        slot = if slot + 1 >= count { 0 } else { slot + 1 };
    }
    // Every backend tried is ejected: fail open.
    // SAFETY: reading a local.
    let index =
        unsafe { core::ptr::read_volatile(&first) } as usize & (MAX_BACKENDS_PER_SERVICE - 1);
    active(service.backend_ids[index])
}

/// The backend the maglev table of `service` gives the flow `key`: the same for every packet
/// of the flow, on every node, for as long as the table is the same. An ejected backend's flows
/// take the next slots of the table, the same for every packet of the flow too.
#[inline(always)]
pub fn maglev(service: &ServiceValue, key: &FlowKey) -> Option<(u32, Backend)> {
    maglev_over(service, &MAGLEV, flow_hash(key), active)
}

/// [`maglev`] for either family: its tables in `tables`, the flow's hash `hash`, `active` as
/// for [`round_robin_over`].
#[inline(always)]
pub fn maglev_over<T>(
    service: &ServiceValue,
    tables: &HashMap<u32, MaglevTable>,
    hash: u32,
    active: impl Fn(u32) -> Option<T>,
) -> Option<T> {
    if service.backend_count == 0 {
        return None;
    }
    let table = tables.get_ptr(service.service_id)?;
    let first = hash % MAGLEV_TABLE_SIZE;
    let mut slot = first;
    for tried in 0..EJECTED_TRIES {
        // As in `round_robin`: the bound is checked on a value LLVM cannot see through, so
        // that the check reaches the verifier.
        // SAFETY: reading a local.
        let index = unsafe { core::ptr::read_volatile(&slot) };
        if index >= MAGLEV_TABLE_SIZE {
            return None;
        }
        // SAFETY: a live map value, replaced whole by userspace; one aligned u32 is read.
        let backend_id = unsafe { (*table).backend_ids[index as usize] };
        if !passive::is_ejected(backend_id) {
            if tried > 0 {
                count_event(Event::FlowPassedEjected);
            }
            return active(backend_id);
        }
        slot = if index + 1 >= MAGLEV_TABLE_SIZE {
            0
        } else {
            index + 1
        };
    }
    // SAFETY: reading a local.
    let index = unsafe { core::ptr::read_volatile(&first) };
    if index >= MAGLEV_TABLE_SIZE {
        return None;
    }
    // SAFETY: as above.
    active(unsafe { (*table).backend_ids[index as usize] })
}

/// The backend of `backend_id` if it may receive packets.
#[inline(always)]
fn active(backend_id: u32) -> Option<(u32, Backend)> {
    let backend = BACKENDS.get(backend_id)?;
    if backend.flags & BACKEND_ACTIVE == 0 {
        return None;
    }
    Some((backend_id, *backend))
}
