//! Socket load balancing: the node's own clients. A process on the node (a shell's `curl`, a
//! service) that connects to a published port on 127.0.0.1, on one of the node's addresses or
//! on a VIP never crosses the XDP hook, which sees what arrives on an interface. So, as Cilium
//! does, cgroup programs on the cgroup v2 root give its socket a backend when it connects (or,
//! for an unconnected UDP socket, when it sends): the socket then talks to the backend itself,
//! and none of its packets is translated.
//!
//! A backend on another node is reached through that node's underlay address: the socket talks
//! to it, and the TC egress program finds the socket's backend by its cookie, DNATs the packet
//! to it and encapsulates it to its node ([`tc_to_node`]); the replies come back through the
//! tunnel, and XDP reverse-NATs them to that node's address before handing them to the kernel
//! (`reply::reply`). Should the socket's entry be gone, its packets reach that node's
//! published port as they are, and that node balances them.
//!
//! `recvmsg` and `getpeername` give the socket the address it asked for back. The programs see
//! every namespace's sockets; they act only on those of the instance's own namespace.
use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_SHOT},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, TcContext},
};
use lb_common::{
    BACKEND_ACTIVE, Backend, Event, FlowKey, PROTO_TCP, PROTO_UDP, Reason, SCHEDULER_MAGLEV,
    ServiceValue, SockFlow, SockKey, reverse_entry,
};

use crate::{
    encap,
    maps::{BACKENDS, HOST_ADDRS, REVERSE_FLOWS, SOCK_FLOWS, SOCK_PEERS, SOCKET_LB},
    nat::{self, Side},
    parse::Packet,
    select, stats,
};

/// The socket's family, `AF_INET`.
const AF_INET: u32 = 2;
/// `IPPROTO_TCP` and `IPPROTO_UDP`, as the socket's protocol reads.
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// `connect` of a TCP or UDP socket, and `sendmsg` with an address on an unconnected UDP
/// socket: a service address gets the socket's backend in its place. With `affinity` (`sendmsg`)
/// the socket keeps the backend it was given for that address while the backend may take new
/// flows; a `connect` chooses afresh (a TCP socket connects once). Returns the program's
/// verdict: 1 lets the call go on, 0 fails it with `EPERM` (a datagram this socket's replies
/// would be confused with another service's).
#[inline(always)]
pub fn to_service(ctx: &SockAddrContext, affinity: bool) -> i32 {
    let Some((cookie, asked)) = own_socket(ctx) else {
        return 1;
    };
    let Some(service) = service_of(&asked) else {
        return 1;
    };
    let key = SockKey { cookie, ..asked };
    let earlier = if affinity {
        // SAFETY: copied out at once.
        unsafe { SOCK_FLOWS.get(&key) }
            .copied()
            .filter(still_usable)
    } else {
        None
    };
    let chosen = earlier.is_none();
    let Some(flow) = earlier.or_else(|| choose(service, &key)) else {
        stats::count_event(Event::SocketNoBackend);
        return 1;
    };
    let peer = peer_of(&key, &flow);
    if let Some(event) = cannot_talk_to(ctx, &peer, &flow, affinity) {
        stats::count_event(event);
        return i32::from(event != Event::SocketPeerTaken);
    }
    // Without this entry, the replies could not be given the service address back (and a
    // packet to another node could not find its backend): the socket is left as it asked.
    if SOCK_PEERS.insert(&peer, &flow, u64::from(BPF_ANY)).is_err() {
        return 1;
    }
    if chosen {
        if affinity {
            // A full LRU evicts; an error only costs the socket its affinity.
            let _ = SOCK_FLOWS.insert(&key, &flow, u64::from(BPF_ANY));
        }
        stats::count_event(Event::SocketBalanced);
        stats::count_new_flow(flow.backend_id);
    }
    set_address(ctx, peer.ip_be, peer.port_be);
    1
}

/// Gives the call the address `ip_be`:`port_be` in place of the one it has.
#[inline(always)]
fn set_address(ctx: &SockAddrContext, ip_be: u32, port_be: u16) {
    // SAFETY: the context's socket address, which these programs may rewrite (the port in
    // network byte order in the field's low 16 bits).
    unsafe {
        (*ctx.sock_addr).user_ip4 = ip_be;
        (*ctx.sock_addr).user_port = u32::from(port_be);
    }
}

/// Why the socket cannot be given `peer` for `flow`, if it cannot: bound to a loopback address,
/// it could not reach a peer elsewhere (the kernel refuses such a route: the socket is left as
/// it asked); or, sending without a connection, it already talks to `peer` for another
/// service, and the replies of the two could not be told apart (the datagram is refused).
#[inline(always)]
fn cannot_talk_to(
    ctx: &SockAddrContext,
    peer: &SockKey,
    flow: &SockFlow,
    unconnected: bool,
) -> Option<Event> {
    // SAFETY: the context's socket, which these programs may read.
    let bound_be = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() { 0 } else { (*sk).src_ip4 }
    };
    if is_loopback(bound_be) && !is_loopback(peer.ip_be) {
        return Some(Event::SocketLoopbackBound);
    }
    if unconnected {
        // SAFETY: copied out at once.
        let taken = unsafe { SOCK_PEERS.get(peer) }.copied();
        if taken.is_some_and(|other| {
            (other.service_ip_be, other.service_port_be)
                != (flow.service_ip_be, flow.service_port_be)
        }) {
            return Some(Event::SocketPeerTaken);
        }
    }
    None
}

/// Whether `ip_be` is in 127/8.
#[inline(always)]
fn is_loopback(ip_be: u32) -> bool {
    ip_be.to_ne_bytes()[0] == 127
}

/// `recvmsg` of a UDP socket (the datagram's source) and `getpeername`: the address a socket
/// talks to for a service becomes the service address again.
#[inline(always)]
pub fn from_peer(ctx: &SockAddrContext) {
    let Some((cookie, peer)) = own_socket(ctx) else {
        return;
    };
    let key = SockKey { cookie, ..peer };
    // SAFETY: copied out at once.
    if let Some(flow) = unsafe { SOCK_PEERS.get(&key) }.copied() {
        set_address(ctx, flow.service_ip_be, flow.service_port_be);
    }
}

/// The socket's cookie and the address of the call (cookie 0), for a TCP or UDP socket of the
/// instance's namespace while socket load balancing is on.
#[inline(always)]
fn own_socket(ctx: &SockAddrContext) -> Option<(u64, SockKey)> {
    let config = SOCKET_LB.get(0)?;
    let addr = ctx.sock_addr;
    // SAFETY: plain helper calls on the program's context.
    if config.netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(addr.cast()) } != config.netns_cookie
    {
        return None;
    }
    // SAFETY: reading the context's fields.
    let (family, protocol, ip_be, port) = unsafe {
        (
            (*addr).family,
            (*addr).protocol,
            (*addr).user_ip4,
            (*addr).user_port,
        )
    };
    // An IPv6 socket sending to an IPv4-mapped address reaches these IPv4 hooks too: left
    // alone, as its connect (an IPv6 hook) is.
    if family != AF_INET {
        return None;
    }
    let proto = match protocol {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => return None,
    };
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(addr.cast()) };
    let asked = SockKey {
        cookie: 0,
        ip_be,
        // The port is in network byte order in the field's low 16 bits.
        port_be: port as u16,
        proto,
        _pad: 0,
    };
    Some((cookie, asked))
}

/// The service at `asked`: a VIP by its exact address, a published port on a loopback address,
/// on 0.0.0.0 (which `connect` takes for this host) or on one of the node's addresses.
#[inline(always)]
fn service_of(asked: &SockKey) -> Option<&'static ServiceValue> {
    if let Some(service) = select::service(asked.ip_be, asked.port_be, asked.proto) {
        return Some(service);
    }
    // SAFETY: a set written by userspace; only presence is read.
    let local = asked.ip_be == 0
        || is_loopback(asked.ip_be)
        || unsafe { HOST_ADDRS.get(&asked.ip_be) }.is_some();
    if !local {
        return None;
    }
    select::service(0, asked.port_be, asked.proto)
}

/// A backend of `service` for the socket `key`, by the service's scheduler (maglev hashes the
/// socket's cookie with the service address). A backend on another node needs this node in
/// the mesh.
#[inline(always)]
fn choose(service: &ServiceValue, key: &SockKey) -> Option<SockFlow> {
    let (backend_id, backend) = if service.scheduler == SCHEDULER_MAGLEV {
        let flow = FlowKey::new(
            key.cookie as u32,
            key.ip_be,
            (key.cookie >> 32) as u16,
            key.port_be,
            key.proto,
        );
        select::maglev(service, &flow)?
    } else {
        select::round_robin(service)?
    };
    // A socket of this node reaches a backend on another node through that node's IPv4
    // address (TC encapsulates what it sends there, `tc_to_node`): a node of an IPv6 underlay
    // has none, so its backends are not chosen for sockets (`socket_no_backend`).
    if backend.node_ip_be != 0
        && (encap::mesh().is_none() || lb_common::is_ipv6_node_key(backend.node_ip_be))
    {
        return None;
    }
    Some(SockFlow {
        backend_id,
        backend_ip_be: backend.ip_be,
        node_ip_be: backend.node_ip_be,
        backend_port_be: backend.port_be,
        service_port_be: key.port_be,
        service_ip_be: key.ip_be,
        _pad: 0,
    })
}

/// Whether a socket's earlier backend is still the one recorded and not removed: as a flow
/// does, the socket keeps a drained or unhealthy backend (`BACKEND_ACTIVE` stays set for
/// those; only the choice of new flows skips them).
#[inline(always)]
fn still_usable(flow: &SockFlow) -> bool {
    BACKENDS
        .get(flow.backend_id)
        .is_some_and(|backend| backend.flags & BACKEND_ACTIVE != 0 && is_recorded(backend, flow))
}

/// Whether `backend` (the slot of `flow.backend_id`) is still the backend `flow` was given: a
/// removed backend's slot may hold another one since. A drained or unhealthy backend is still
/// its established flows' backend.
#[inline(always)]
fn is_recorded(backend: &Backend, flow: &SockFlow) -> bool {
    backend.ip_be == flow.backend_ip_be
        && backend.port_be == flow.backend_port_be
        && backend.node_ip_be == flow.node_ip_be
}

/// The address the socket talks to for `flow`: the backend, or the published port of the node
/// of a backend on another node.
#[inline(always)]
fn peer_of(key: &SockKey, flow: &SockFlow) -> SockKey {
    let (ip_be, port_be) = if flow.node_ip_be != 0 {
        (flow.node_ip_be, key.port_be)
    } else {
        (flow.backend_ip_be, flow.backend_port_be)
    };
    SockKey {
        cookie: key.cookie,
        ip_be,
        port_be,
        proto: key.proto,
        _pad: 0,
    }
}

/// TC egress: a packet of one of the node's own sockets to the node of its backend on another
/// node is DNATed to the backend and encapsulated to that node, with a reverse entry for its
/// replies. `None`: not such a packet.
#[inline(always)]
pub fn tc_to_node(ctx: &mut TcContext, pkt: &Packet, key: &FlowKey) -> Option<Result<i32, i64>> {
    // SAFETY: plain helper call; 0 for a packet without a socket (a forwarded one).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if cookie == 0 {
        return None;
    }
    let peer = SockKey {
        cookie,
        ip_be: pkt.dst_ip_be,
        port_be: pkt.dst_port_be,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let flow = unsafe { SOCK_PEERS.get(&peer) }.copied()?;
    // A backend removed since: the packet goes to that node's published port as it is, and
    // that node decides (a new UDP flow is balanced there; a TCP connection is reset).
    if flow.node_ip_be == 0
        || flow.node_ip_be != pkt.dst_ip_be
        || !BACKENDS
            .get(flow.backend_id)
            .is_some_and(|backend| is_recorded(backend, &flow))
    {
        return None;
    }
    Some(send_to_node(ctx, pkt, key, &flow))
}

#[inline(always)]
fn send_to_node(
    ctx: &mut TcContext,
    pkt: &Packet,
    key: &FlowKey,
    flow: &SockFlow,
) -> Result<i32, i64> {
    remember_reply(pkt, key, flow);
    nat::tc_rewrite_l4(
        ctx,
        Side::Dst,
        (pkt.l4_off, pkt.l4_check_off, pkt.proto == PROTO_UDP),
        (pkt.dst_ip_be, pkt.dst_port_be),
        (flow.backend_ip_be, flow.backend_port_be),
    )?;
    nat::tc_rewrite_l3(ctx, Side::Dst, pkt.dst_ip_be, flow.backend_ip_be)?;
    let bytes = u64::from(ctx.len());
    let (action, reason) = encap::tc_to_node(
        ctx,
        pkt,
        flow.node_ip_be,
        encap::source_port(key),
        false,
        Reason::SocketEncap,
    );
    stats::count_reason(reason, bytes);
    if action != TC_ACT_SHOT {
        stats::count_to_backend(flow.backend_id, bytes, false);
    }
    Ok(action)
}

/// Makes sure the replies of the socket's flow `key` (backend → this node) find their way back
/// to the node's published-port address the socket talks to (`reply::reply`).
#[inline(always)]
fn remember_reply(pkt: &Packet, key: &FlowKey, flow: &SockFlow) {
    let (reply_key, reverse) =
        reverse_entry(key, flow.chosen(), (pkt.dst_ip_be, pkt.dst_port_be), None);
    // SAFETY: copied out at once.
    if unsafe { REVERSE_FLOWS.get(&reply_key) }.copied() != Some(reverse) {
        // A full LRU evicts; an error costs this packet's reply, and the next packet tries again.
        let _ = REVERSE_FLOWS.insert(&reply_key, &reverse, u64::from(BPF_ANY));
    }
}
