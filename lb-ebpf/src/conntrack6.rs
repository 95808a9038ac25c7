//! The IPv6 flow table: which backend each IPv6 connection is pinned to, how its replies are
//! reverse-NATed, and the choice of a backend for a new one. The IPv4 table's rules, on keys of
//! their own: a flow keeps its backend while the backend is in service; a SYN after the
//! connection ended (a FIN each way, or a reset) chooses again; a backend's refusals and
//! unanswered SYNs count against it (`passive`).
use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or};

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    Addr6, BACKEND_ACTIVE, BACKEND_IPV6, Backend, Event, FLOW_AWAITING_REPLY, FLOW_BACKEND_FIN,
    FLOW_CLIENT_FIN, FLOW_CLOSING, FLOW_SEEN_GRANULARITY_NS, FLOW_UNANSWERED_NS, FlowKey6,
    FlowValue6, LocalBackendKey6, PASSIVE_REFUSED, PASSIVE_UNANSWERED, ReverseValue6,
    SCHEDULER_MAGLEV, ServiceKey6, ServiceValue, flow_hash6,
};

use crate::{
    conntrack, decap,
    maps::{
        BACKEND_ADDRS6, BACKENDS, FLOWS6, LOCAL_BACKENDS6, MAGLEV6, REVERSE_FLOWS6, RR_CURSORS6,
        SERVICES6, TUNNEL_REPLIES6,
    },
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse6::Packet6,
    passive, select,
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
    let backend = BACKENDS.get(backend_id).filter(|b| is_usable(b))?;
    Some((backend_id, *backend, *BACKEND_ADDRS6.get(backend_id)?))
}

/// The flow's entry when its backend is still the one it chose and in service, and the packet
/// does not start a new connection on an ended one (its notes taken, `note`), with the
/// underlay address of the node that hosts the backend (0: routed from here). `Err`: the flow must choose (again), counted as the
/// event given: a new flow, a flow whose backend went (`FlowReselected`), or the client's SYN
/// again while its backend has not answered the first for `FLOW_UNANSWERED_NS`
/// (`FlowUnanswered`: a failure of the backend's, `passive`; its late answer can no longer
/// reach the client).
#[inline(always)]
pub fn pinned(key: &FlowKey6, pkt: &Packet6) -> Result<(FlowValue6, u32), Event> {
    // One lookup for the choice and the notes (`note`): the 40-byte key's hash is what an
    // established IPv6 flow's packet costs most.
    let Some(entry) = FLOWS6.get_ptr_mut(key) else {
        return Err(Event::FlowCreated);
    };
    // SAFETY: a live map value, copied out.
    let flow = unsafe { *entry };
    let Some((_, backend, addr)) = active(flow.backend_id) else {
        return Err(Event::FlowReselected);
    };
    if backend.port_be != flow.backend_port_be || addr != flow.backend_ip {
        return Err(Event::FlowReselected);
    }
    if pkt.is_tcp_syn() {
        let ended = flow.flags & FLOW_CLOSING != 0
            || flow.flags & (FLOW_CLIENT_FIN | FLOW_BACKEND_FIN)
                == FLOW_CLIENT_FIN | FLOW_BACKEND_FIN;
        if ended {
            return Err(Event::FlowCreated);
        }
        if flow.flags & FLOW_AWAITING_REPLY != 0 && unanswered(key, &flow) {
            return Err(Event::FlowUnanswered);
        }
    }
    // A new connection's SYN on a flow that did not end (its ends were never seen) may find its
    // reply 5-tuple taken by another service's flow from the same client port meanwhile.
    if note(entry, flow.flags, pkt.tcp_flags) || pkt.is_tcp_syn() {
        restore_reverse(key, &flow);
    }
    Ok((flow, backend.node_ip_be))
}

/// Makes sure a flow's reverse-NAT entry is its own: called for a client's packet after a
/// second or more of silence, long enough for a full table to have evicted the entry (as
/// `conntrack::restore_reverse` for IPv4), and for a SYN, whose reply 5-tuple another flow of
/// the same client port and backend may have taken since. The backend's replies, routed or
/// coming back through the tunnel, are then reverse-NATed to what this client reached rather
/// than dropped, leaked or sent from another service's port. In a frame of its own: the IPv6
/// path's stack is short.
#[inline(never)]
fn restore_reverse(key: &FlowKey6, flow: &FlowValue6) {
    let (reply_key, reverse) = reverse_entry(key, flow);
    // SAFETY: copied out at once.
    if unsafe { REVERSE_FLOWS6.get(&reply_key) }.copied() != Some(reverse) {
        // A full table evicts another entry; an error leaves the replies as they were.
        let _ = REVERSE_FLOWS6.insert(&reply_key, &reverse, 0);
    }
}

/// Whether the client's SYN again (on `flow`, awaiting its backend's answer) comes
/// `FLOW_UNANSWERED_NS` or more after the first: then the backend failed (`passive`) and its
/// reply entry goes. In a frame of its own: the IPv6 path's stack is short.
#[inline(never)]
fn unanswered(key: &FlowKey6, flow: &FlowValue6) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(flow.last_seen_ns) < FLOW_UNANSWERED_NS {
        return false;
    }
    let reply_key = key.reply_of(flow.backend_ip, flow.backend_port_be);
    let _ = REVERSE_FLOWS6.remove(&reply_key);
    passive::failed(flow.backend_id, PASSIVE_UNANSWERED);
    true
}

/// Notes what a client's packet of the flow whose entry is `flow` (its flags `flags`) says
/// about its connection: a FIN closes its half, a RST with ACK the whole
/// (`conntrack::first_flags`' rules), a FIN that closes the second half the whole too; an ACK
/// answers the handshake. It also refreshes when the client was last seen, but for its SYN
/// again, which leaves the time of the first: the time the backend has had to answer. Returns
/// whether the client had been silent for `FLOW_SEEN_GRANULARITY_NS` or more.
#[inline(always)]
fn note(flow: *mut FlowValue6, flags: u8, tcp_flags: u8) -> bool {
    note_end(
        flow,
        flags,
        conntrack::first_flags(tcp_flags),
        (FLOW_CLIENT_FIN, FLOW_BACKEND_FIN),
    );
    let awaiting = flags & FLOW_AWAITING_REPLY != 0;
    if awaiting && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK {
        clear_flags(flow, FLOW_AWAITING_REPLY);
    }
    // SAFETY: a live map value; a race between CPUs loses at most a refresh.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        let was_idle = now.wrapping_sub((*flow).last_seen_ns) >= FLOW_SEEN_GRANULARITY_NS;
        if was_idle && !(awaiting && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN) {
            (*flow).last_seen_ns = now;
        }
        was_idle
    }
}

/// Sets the end flags `seen` says (`FLOW_CLOSING`, or the sender's FIN, `own_fin`) in a flow
/// whose flags were `flags`; a FIN that closes the second half (the other side's, `other_fin`,
/// already set) ends the flow (`FLOW_CLOSING`), as `conntrack::note_end` does for IPv4. Atomic:
/// the client's FIN (XDP) and the backend's (TC) may cross on two CPUs, and each must see the
/// other's.
#[inline(always)]
fn note_end(flow: *mut FlowValue6, flags: u8, seen: u8, (own_fin, other_fin): (u8, u8)) {
    if seen & FLOW_CLOSING != 0 {
        if flags & FLOW_CLOSING == 0 {
            set_flags(flow, FLOW_CLOSING);
        }
    } else if seen & own_fin != 0
        && flags & own_fin == 0
        && set_flags(flow, own_fin) & other_fin != 0
    {
        set_flags(flow, FLOW_CLOSING);
    }
}

/// Where the flags sit in a `FlowValue6`: a byte of the aligned 8-byte word at `FLAGS_WORD`.
const FLAGS_WORD: usize = core::mem::offset_of!(FlowValue6, flags) & !7;
const FLAGS_SHIFT: u32 = ((core::mem::offset_of!(FlowValue6, flags) - FLAGS_WORD) * 8) as u32;

/// Sets `bits` in a flow's flags atomically (the word they share with the backend's id and
/// port is or-ed with them alone); returns the flags before.
#[inline(always)]
fn set_flags(flow: *mut FlowValue6, bits: u8) -> u8 {
    // SAFETY: a live map value, 8-aligned like every map value; the word lies within it.
    let old = unsafe {
        // AcqRel, not Relaxed: LLVM lowers a relaxed OR to the non-fetching BPF instruction.
        atomic_or::<u64, u64, { AtomicOrdering::AcqRel }>(
            flow.cast::<u8>().add(FLAGS_WORD).cast::<u64>(),
            u64::from(bits) << FLAGS_SHIFT,
        )
    };
    (old >> FLAGS_SHIFT) as u8
}

/// Clears `bits` in a flow's flags, atomically as `set_flags` sets them.
#[inline(always)]
fn clear_flags(flow: *mut FlowValue6, bits: u8) {
    // SAFETY: as in `set_flags`.
    unsafe {
        atomic_and::<u64, u64, { AtomicOrdering::AcqRel }>(
            flow.cast::<u8>().add(FLAGS_WORD).cast::<u64>(),
            !(u64::from(bits) << FLAGS_SHIFT),
        );
    }
}

/// What [`choose`] returns when `service` has no backend to give.
pub const NO_BACKEND: u64 = u64::MAX;

/// Chooses the backend of the new flow `key` of `service` (its maglev table's, or the next in
/// round-robin order), writes the flow's entry (`new_flow`, whose first packet has `tcp_flags`)
/// to `flow` and returns the underlay address of the backend's node (0: routed from here), or
/// [`NO_BACKEND`].
#[inline(always)]
pub fn choose(service: &ServiceValue, key: &FlowKey6, tcp_flags: u8, flow: &mut FlowValue6) -> u64 {
    if service.scheduler == SCHEDULER_MAGLEV {
        choose_by_maglev(service, key, tcp_flags, flow)
    } else {
        choose_in_turn(service, tcp_flags, flow)
    }
}

/// Whether `backend_id` is an IPv6 backend that may receive packets, as the scans of `select`
/// take it: by id only, a backend copied out on every try would take the stack.
#[inline(always)]
fn usable(backend_id: u32) -> Option<u32> {
    BACKENDS
        .get(backend_id)
        .filter(|b| is_usable(b))
        .map(|_| backend_id)
}

/// Whether `backend` is an IPv6 one that may receive packets.
#[inline(always)]
fn is_usable(backend: &Backend) -> bool {
    backend.flags & (BACKEND_ACTIVE | BACKEND_IPV6) == BACKEND_ACTIVE | BACKEND_IPV6
}

/// [`choose`] for a maglev service (`MAGLEV6`), ejected backends passed by. Each way in a frame
/// of its own: the IPv6 path's stack is short.
#[inline(never)]
fn choose_by_maglev(
    service: &ServiceValue,
    key: &FlowKey6,
    tcp_flags: u8,
    flow: &mut FlowValue6,
) -> u64 {
    // Hashed before the table's lookup, not around it: LLVM would otherwise load the key's
    // bytes first and keep them on the stack across the call.
    let hash = flow_hash6(key);
    // SAFETY: reading a local.
    let hash = unsafe { core::ptr::read_volatile(&hash) };
    let chosen = select::maglev_over(service, &MAGLEV6, hash, usable);
    write_chosen(chosen, tcp_flags, flow)
}

/// [`choose`] for a round-robin service (its own cursor, `RR_CURSORS6`), ejected backends
/// passed by.
#[inline(never)]
fn choose_in_turn(service: &ServiceValue, tcp_flags: u8, flow: &mut FlowValue6) -> u64 {
    let chosen = select::round_robin_over(service, &RR_CURSORS6, usable);
    write_chosen(chosen, tcp_flags, flow)
}

#[inline(always)]
fn write_chosen(chosen: Option<u32>, tcp_flags: u8, flow: &mut FlowValue6) -> u64 {
    let Some((backend_id, backend, addr)) = chosen.and_then(active) else {
        return NO_BACKEND;
    };
    *flow = new_flow(backend_id, &backend, addr, tcp_flags);
    u64::from(backend.node_ip_be)
}

/// The reverse-NAT entry of the flow `key` pinned to `flow`'s backend: its replies' 5-tuple,
/// and the address and port the client reached (`key`'s destination) they must come from.
#[inline(always)]
fn reverse_entry(key: &FlowKey6, flow: &FlowValue6) -> (FlowKey6, ReverseValue6) {
    let reverse = ReverseValue6 {
        orig_ip: key.dst,
        orig_port_be: key.dst_port_be,
        _pad: 0,
        backend_id: flow.backend_id,
    };
    (key.reply_of(flow.backend_ip, flow.backend_port_be), reverse)
}

/// Pins the flow `key` to `flow`'s backend and records how its replies are reverse-NATed (to
/// the address and port the client reached, `key`'s destination). `false` if the tables
/// refused it.
#[inline(never)]
pub fn record(key: &FlowKey6, flow: &FlowValue6, event: Event) -> bool {
    let (reply_key, reverse) = reverse_entry(key, flow);
    if REVERSE_FLOWS6.insert(&reply_key, &reverse, 0).is_err()
        || FLOWS6.insert(key, flow, 0).is_err()
    {
        return false;
    }
    // The converse of `remember_ingress_node`: replies follow the newest flow of their 5-tuple.
    conntrack::remove_if_present(&TUNNEL_REPLIES6, &reply_key);
    count_event(event);
    true
}

/// A new flow's entry for `backend`.
#[inline(always)]
pub fn new_flow(backend_id: u32, backend: &Backend, addr: Addr6, tcp_flags: u8) -> FlowValue6 {
    FlowValue6 {
        backend_id,
        backend_port_be: backend.port_be,
        // A SYN awaits its backend's answer (passive health).
        flags: conntrack::first_flags(tcp_flags),
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

/// The client → service key of the flow whose replies `key` (backend → client) and `reverse`
/// describe.
#[inline(always)]
fn flow_key_of(key: &FlowKey6, reverse: &ReverseValue6) -> FlowKey6 {
    FlowKey6::new(
        key.dst,
        reverse.orig_ip,
        key.dst_port_be,
        reverse.orig_port_be,
        key.proto,
    )
}

/// An ICMPv6 "destination unreachable" that refuses a connection, about a packet of the flow
/// whose replies `key` (backend → client) and `reverse` describe: while the flow awaits its
/// backend's answer, it is the backend's refusal, as a RST is ([`note_reply`]): the flow is
/// forgotten and `true` returned, the error must be dropped so that the client's retransmitted
/// SYN chooses again. An established flow is left as it is.
#[inline(never)]
pub fn note_unreachable(key: &FlowKey6, reverse: &ReverseValue6) -> bool {
    let flow_key = flow_key_of(key, reverse);
    let Some(flow) = FLOWS6.get_ptr_mut(&flow_key) else {
        return false;
    };
    // SAFETY: a live map value, read for its flags.
    if unsafe { (*flow).flags } & FLOW_AWAITING_REPLY == 0 {
        return false;
    }
    let _ = FLOWS6.remove(&flow_key);
    let _ = REVERSE_FLOWS6.remove(key);
    passive::failed(reverse.backend_id, PASSIVE_REFUSED);
    true
}

/// Notes what a backend's reply (`key`, reverse-NATed by `reverse`) says about its flow: a FIN
/// closes its half, a RST the whole; while the flow awaits the backend's answer, a SYN-ACK is
/// one (`passive::answered`) and a RST refuses the connection: the flow is forgotten and `true`
/// returned, the RST must be dropped (`drop_backend_refused`) so that the client's
/// retransmitted SYN chooses again (`passive::failed`).
#[inline(never)]
pub fn note_reply(key: &FlowKey6, reverse: &ReverseValue6, tcp_flags: u8) -> bool {
    if tcp_flags & (TCP_FIN | TCP_RST | TCP_SYN) == 0 {
        return false;
    }
    let flow_key = flow_key_of(key, reverse);
    let Some(flow) = FLOWS6.get_ptr_mut(&flow_key) else {
        return false;
    };
    // SAFETY: a live map value, read for its flags.
    let flags = unsafe { (*flow).flags };
    if flags & FLOW_AWAITING_REPLY != 0 {
        if tcp_flags & TCP_RST != 0 {
            let _ = FLOWS6.remove(&flow_key);
            let _ = REVERSE_FLOWS6.remove(key);
            passive::failed(reverse.backend_id, PASSIVE_REFUSED);
            return true;
        }
        if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            clear_flags(flow, FLOW_AWAITING_REPLY);
            passive::answered(reverse.backend_id);
        }
    }
    let seen = if tcp_flags & TCP_RST != 0 {
        FLOW_CLOSING
    } else if tcp_flags & TCP_FIN != 0 {
        FLOW_BACKEND_FIN
    } else {
        0
    };
    note_end(flow, flags, seen, (FLOW_BACKEND_FIN, FLOW_CLIENT_FIN));
    false
}
