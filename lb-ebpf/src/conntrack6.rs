//! The IPv6 flow table: which backend each IPv6 connection is pinned to, how its replies are
//! reverse-NATed, and the choice of a backend for a new one. The IPv4 table's rules, on keys of
//! their own: a flow keeps its backend while the backend is in service; a SYN after the
//! connection ended (a FIN each way, or a reset) chooses again.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    Addr6, BACKEND_ACTIVE, BACKEND_IPV6, Backend, Event, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN,
    FLOW_CLOSING, FLOW_SEEN_GRANULARITY_NS, FlowKey6, FlowValue6, LocalBackendKey6,
    MAGLEV_TABLE_SIZE, MAX_BACKENDS_PER_SERVICE, ReverseValue6, ServiceKey6, ServiceValue,
    flow_hash6,
};

use crate::{
    decap,
    maps::{
        BACKEND_ADDRS6, BACKENDS, FLOWS6, LOCAL_BACKENDS6, MAGLEV6, REVERSE_FLOWS6, RR_CURSORS6,
        SERVICES6, TUNNEL_REPLIES6,
    },
    parse::{TCP_FIN, TCP_RST},
    parse6::Packet6,
    stats::count_event,
};

/// The IPv6 service published on `vip` (all zero: every local address), `port_be`, `proto`.
/// In a frame of its own, as every IPv6 step that builds a key: the IPv6 path's stack is short.
#[inline(never)]
pub fn service(vip: &Addr6, port_be: u16, proto: u8) -> Option<&'static ServiceValue> {
    let key = ServiceKey6 {
        vip: *vip,
        port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: service values are replaced whole by userspace, never written in place.
    unsafe { SERVICES6.get(&key) }
}

/// The IPv6 backend `backend_id`, with its address, if it may receive packets.
#[inline(always)]
fn active(backend_id: u32) -> Option<(u32, Backend, Addr6)> {
    let backend = BACKENDS.get(backend_id)?;
    if backend.flags & (BACKEND_ACTIVE | BACKEND_IPV6) != BACKEND_ACTIVE | BACKEND_IPV6 {
        return None;
    }
    Some((backend_id, *backend, *BACKEND_ADDRS6.get(backend_id)?))
}

/// The flow's entry when its backend is still the one it chose and in service, and the packet
/// does not start a new connection on an ended one. `None`: it must choose (again).
#[inline(always)]
/// With it, the underlay address of the node that hosts the backend (0: routed from here).
pub fn pinned(key: &FlowKey6, pkt: &Packet6) -> Option<(FlowValue6, u32)> {
    // SAFETY: copied out at once.
    let flow = unsafe { FLOWS6.get(key) }.copied()?;
    let (_, backend, addr) = active(flow.backend_id)?;
    if backend.port_be != flow.backend_port_be || addr != flow.backend_ip {
        return None;
    }
    let ended = flow.flags & FLOW_CLOSING != 0
        || flow.flags & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN) == FLOW_CLIENT_FIN | FLOW_BACKEND_FIN;
    if ended && pkt.is_tcp_syn() {
        return None;
    }
    Some((flow, backend.node_ip_be))
}

/// Notes what a packet of the flow `key` says about its connection: a FIN closes its sender's
/// half, a reset the whole; the client's packets also refresh when it was last seen.
#[inline(always)]
pub fn note(key: &FlowKey6, tcp_flags: u8, from_client: bool) {
    let Some(flow) = FLOWS6.get_ptr_mut(key) else {
        return;
    };
    let bits = if tcp_flags & TCP_RST != 0 {
        FLOW_CLOSING
    } else if tcp_flags & TCP_FIN != 0 {
        if from_client {
            FLOW_CLIENT_FIN
        } else {
            FLOW_BACKEND_FIN
        }
    } else {
        0
    };
    // SAFETY: a live map value; a race between CPUs loses at most a refresh or a flag that the
    // next packet sets again.
    unsafe {
        if bits != 0 && (*flow).flags & bits != bits {
            (*flow).flags |= bits;
        }
        if from_client {
            let now = bpf_ktime_get_coarse_ns();
            if now.wrapping_sub((*flow).last_seen_ns) >= FLOW_SEEN_GRANULARITY_NS {
                (*flow).last_seen_ns = now;
            }
        }
    }
}

/// The next IPv6 backend of `service` in round-robin order (its own cursor, `RR_CURSORS6`).
#[inline(always)]
pub fn round_robin(service: &ServiceValue) -> Option<(u32, Backend, Addr6)> {
    let count = service.backend_count;
    if count == 0 || count as usize > MAX_BACKENDS_PER_SERVICE {
        return None;
    }
    let cursor = RR_CURSORS6.get_ptr_mut(service.service_id)?.cast::<u64>();
    // SAFETY: a live, aligned u64 in the map; see `select::round_robin`.
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::AcqRel }>(cursor, 1) };
    let slot = (turn % u64::from(count)) as u32;
    // SAFETY: reading a local (a bound the verifier sees, as in `select::round_robin`).
    let index =
        unsafe { core::ptr::read_volatile(&slot) } as usize & (MAX_BACKENDS_PER_SERVICE - 1);
    active(service.backend_ids[index])
}

/// The IPv6 backend the service's maglev table (`MAGLEV6`) gives the flow `key`.
#[inline(always)]
pub fn maglev(service: &ServiceValue, key: &FlowKey6) -> Option<(u32, Backend, Addr6)> {
    if service.backend_count == 0 {
        return None;
    }
    let table = MAGLEV6.get_ptr(service.service_id)?;
    let slot = flow_hash6(key) % MAGLEV_TABLE_SIZE;
    // SAFETY: reading a local.
    let index = unsafe { core::ptr::read_volatile(&slot) };
    if index >= MAGLEV_TABLE_SIZE {
        return None;
    }
    // SAFETY: a live map value, replaced whole by userspace.
    active(unsafe { (*table).backend_ids[index as usize] })
}

/// Pins the flow `key` to `flow`'s backend and records how its replies are reverse-NATed (to
/// the address and port the client reached, `key`'s destination). `false` if the tables
/// refused it.
#[inline(never)]
pub fn record(key: &FlowKey6, flow: &FlowValue6, event: Event) -> bool {
    let reply_key = key.reply_of(flow.backend_ip, flow.backend_port_be);
    let reverse = ReverseValue6 {
        orig_ip: key.dst,
        orig_port_be: key.dst_port_be,
        _pad: 0,
        backend_id: flow.backend_id,
    };
    if REVERSE_FLOWS6.insert(&reply_key, &reverse, 0).is_err()
        || FLOWS6.insert(key, flow, 0).is_err()
    {
        return false;
    }
    // The converse of `remember_ingress_node`: replies follow the newest flow of their 5-tuple.
    // SAFETY: only presence is read.
    if unsafe { TUNNEL_REPLIES6.get(&reply_key) }.is_some() {
        let _ = TUNNEL_REPLIES6.remove(&reply_key);
    }
    count_event(event);
    true
}

/// A new flow's entry for `backend`.
#[inline(always)]
pub fn new_flow(backend_id: u32, backend: &Backend, addr: Addr6, tcp_flags: u8) -> FlowValue6 {
    FlowValue6 {
        backend_id,
        backend_port_be: backend.port_be,
        flags: if tcp_flags & TCP_RST != 0 {
            FLOW_CLOSING
        } else if tcp_flags & TCP_FIN != 0 {
            FLOW_CLIENT_FIN
        } else {
            0
        },
        _pad: 0,
        backend_ip: addr,
        // SAFETY: plain helper call.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// The reverse-NAT entry of a backend's reply `key`.
#[inline(always)]
pub fn reverse_lookup(key: &FlowKey6) -> Option<ReverseValue6> {
    // SAFETY: copied out at once.
    unsafe { REVERSE_FLOWS6.get(key) }.copied()
}

/// Whether a decapsulated packet (`key`) is for an IPv6 backend this node reaches itself
/// (`LOCAL_BACKENDS6`): anything else would be relayed out un-NATed, anywhere.
#[inline(always)]
pub fn is_local_backend(key: &FlowKey6) -> bool {
    let local = LocalBackendKey6 {
        addr: key.dst,
        port_be: key.dst_port_be,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: a set written by userspace; only presence is read.
    unsafe { LOCAL_BACKENDS6.get(&local) }.is_some()
}

/// Records the node a client → backend flow (`key`) came in on, where TC encapsulates its
/// replies back to; as `decap::remember_ingress_node`, the reverse-NAT entry of an older flow
/// of the same 5-tuple through this node goes.
#[inline(never)]
pub fn remember_ingress_node(key: &FlowKey6, node_ip_be: u32) {
    let reply_key = FlowKey6::new(
        key.dst,
        key.src,
        key.dst_port_be,
        key.src_port_be,
        key.proto,
    );
    decap::remember_tunnel(&TUNNEL_REPLIES6, &REVERSE_FLOWS6, &reply_key, node_ip_be);
}

/// The node a reply (`key`, backend → client) goes back to, encapsulated: the one its flow came
/// in on, if another node balanced it.
#[inline(always)]
pub fn ingress_node_of(key: &FlowKey6) -> Option<u32> {
    // SAFETY: copied out at once.
    unsafe { TUNNEL_REPLIES6.get(key) }.map(|tunnel| tunnel.node_ip_be)
}

/// Notes what a backend's reply (`key`, reverse-NATed by `reverse`) says about its flow.
#[inline(never)]
pub fn note_reply(key: &FlowKey6, reverse: &ReverseValue6, tcp_flags: u8) {
    if tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    let flow = FlowKey6::new(
        key.dst,
        reverse.orig_ip,
        key.dst_port_be,
        reverse.orig_port_be,
        key.proto,
    );
    note(&flow, tcp_flags, false);
}
