//! The flow table: which backend each connection is pinned to, and how to reverse-NAT replies.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{BACKEND_ACTIVE, Event, FlowKey, FlowValue, ReverseValue};

use crate::{
    maps::{BACKENDS, FLOWS, REVERSE_FLOWS},
    parse::Packet,
    stats::count_event,
};

const EEXIST: i32 = 17;

#[inline(always)]
pub fn key_of(pkt: &Packet) -> FlowKey {
    FlowKey {
        src_ip_be: pkt.src_ip_be,
        dst_ip_be: pkt.dst_ip_be,
        src_port_be: pkt.src_port_be,
        dst_port_be: pkt.dst_port_be,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

/// How a flow stands in the table.
pub enum Lookup {
    /// Pinned to a backend that is still in service.
    Pinned(FlowValue),
    /// Pinned to a backend that was removed (or now lives behind another node) since: the flow
    /// must choose again.
    Stale,
    Miss,
}

// Not inlined: inlined, LLVM folds the "entry found" test into an OR of map value pointers,
// which the verifier rejects ("pointer |= pointer prohibited").
#[inline(never)]
pub fn lookup(key: &FlowKey) -> Lookup {
    // SAFETY: the value is copied out at once; a concurrent update replaces whole elements.
    let Some(flow) = (unsafe { FLOWS.get(key) }).copied() else {
        return Lookup::Miss;
    };
    match BACKENDS.get(flow.backend_id) {
        Some(backend)
            if backend.flags & BACKEND_ACTIVE != 0
                && backend.ip_be == flow.backend_ip_be
                && backend.port_be == flow.backend_port_be
                && backend.node_ip_be == flow.node_ip_be =>
        {
            Lookup::Pinned(flow)
        }
        _ => Lookup::Stale,
    }
}

#[inline(always)]
pub fn reverse_lookup(key: &FlowKey) -> Option<ReverseValue> {
    // SAFETY: copied out at once, as above.
    unsafe { REVERSE_FLOWS.get(key) }.copied()
}

/// Records the backend a flow chose, and the entry that reverse-NATs its replies.
///
/// When another CPU recorded the same new flow first, its choice wins so that every packet of
/// the connection goes to one backend; the flag returned says whether this call created it.
/// `replace` overwrites a stale entry instead.
#[inline(always)]
pub fn record(
    key: &FlowKey,
    flow: FlowValue,
    orig_ip_be: u32,
    orig_port_be: u16,
    replace: bool,
) -> Result<(FlowValue, bool), ()> {
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST };
    let flow = match FLOWS.insert(key, flow, u64::from(flags)) {
        Ok(()) => flow,
        Err(err) if err == -EEXIST => {
            count_event(Event::FlowRaceLost);
            // SAFETY: copied out at once.
            return unsafe { FLOWS.get(key) }
                .copied()
                .map(|won| (won, false))
                .ok_or(());
        }
        Err(_) => return Err(()),
    };
    let reverse_key = FlowKey {
        src_ip_be: flow.backend_ip_be,
        dst_ip_be: key.src_ip_be,
        src_port_be: flow.backend_port_be,
        dst_port_be: key.src_port_be,
        proto: key.proto,
        _pad: [0; 3],
    };
    let reverse = ReverseValue {
        orig_ip_be,
        orig_port_be,
        _pad: 0,
        backend_id: flow.backend_id,
        _pad2: 0,
    };
    if REVERSE_FLOWS
        .insert(&reverse_key, reverse, u64::from(BPF_ANY))
        .is_err()
    {
        // Without its reverse entry the replies could not be NATed: forget the flow.
        let _ = FLOWS.remove(key);
        return Err(());
    }
    count_event(if replace {
        Event::FlowReselected
    } else {
        Event::FlowCreated
    });
    Ok((flow, true))
}
