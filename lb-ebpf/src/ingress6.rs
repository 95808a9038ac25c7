//! The XDP and TC programs' IPv6 path: DNAT of new and established IPv6 flows to a service's
//! IPv6 backends, reverse NAT of their replies, and forwarding of both, as `ingress`, `reply`
//! and `egress` do for IPv4. A client of one family is balanced over that family's backends
//! only. Backends on other nodes are reached through the mesh, VXLAN over an IPv4 or IPv6
//! underlay (`encap`; `decap` hands the decapsulated frames back here); ICMPv6 errors about
//! forwarded packets are translated on their way out, and errors about replies go to a local
//! backend (`icmp6`). Not (yet) for IPv6: hairpin flows, fragments, errors about replies of a
//! backend on another node (all passed to the kernel), the node's own sockets.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Event, FlowKey6, FlowValue6, PROTO_TCP, PROTO_UDP, Reason, ReverseValue6, SCHEDULER_MAGLEV,
    SERVICE_OTHER_FAMILY_ONLY, SERVICE_PORT_ANY, SERVICE_PORT_VIP, ServiceValue,
};

use crate::{
    conntrack6::{self as flows},
    decap, encap,
    forward::{self, Egress},
    icmp6, ingress,
    maps::{DECAPSULATED_FROM, HOST_ADDRS6, OVERLAY6_PROGRAM},
    nat::{self, Side},
    parse6::{self, Packet6},
    select, stats,
};

/// The XDP program's IPv6 path (`lb_xdp6`, tail-called by `lb_xdp` for every IPv6 frame).
#[inline(always)]
pub fn try_xdp(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let mut key = FlowKey6::default();
    let parsed = parse6::parse6(
        ctx.data(),
        ctx.data_end(),
        ctx.data_end() - ctx.data(),
        &mut key,
    );
    // VXLAN over an IPv6 underlay to this node, whether its UDP checksum is set or 0 (which
    // the parser takes as malformed, leaving the ports and protocol in the key).
    let overlay = match parsed {
        Ok(pkt) => pkt.proto == PROTO_UDP && decap::is_overlay6(&key, pkt.dst_port_be),
        Err(Reason::PassMalformed) => {
            key.proto == PROTO_UDP && decap::is_overlay6(&key, key.dst_port_be)
        }
        Err(_) => false,
    };
    if overlay {
        // SAFETY: the index names an XDP program, as the tail call requires.
        let _ = unsafe { OVERLAY6_PROGRAM.tail_call(ctx, 0) };
        return Ok((xdp_action::XDP_DROP, Reason::DropVxlanMalformed));
    }
    // An ICMPv6 error about a reply goes to its backend (`lb_xdp6_icmp`).
    let pkt = match parsed {
        Err(Reason::PassNotTcpUdp) => return icmp6::to_backend_program(ctx),
        parsed => parsed?,
    };
    let port = select::service_port(pkt.proto, pkt.dst_port_be);
    if port != 0 {
        let event = match flows::pinned(&key, &pkt) {
            Ok((flow, node_ip_be)) => {
                return to_backend(ctx, &pkt, &key, &flow, node_ip_be, false);
            }
            Err(event) => event,
        };
        if let Some(outcome) = to_service(ctx, &pkt, &key, port, event) {
            return outcome;
        }
    }
    match flows::reverse_lookup(&key) {
        Some(reverse) => reply(ctx, &pkt, &key, &reverse),
        None => Err(Reason::PassNotService),
    }
}

/// The service a packet to a service port is addressed to: by its exact address, then by port
/// on any address.
#[inline(always)]
fn lookup_service(key: &FlowKey6, port: u64) -> Option<(&'static ServiceValue, bool)> {
    if port & SERVICE_PORT_VIP != 0
        && let Some(service) = flows::service(&key.dst, key.dst_port_be, key.proto)
    {
        return Some((service, false));
    }
    if port & SERVICE_PORT_ANY == 0 {
        return None;
    }
    flows::service(&[0; 16], key.dst_port_be, key.proto).map(|service| (service, true))
}

/// A packet to a service port without a flow to follow: a reply from a port that is also a
/// service port, or a new flow that chooses its backend here, counted as `event` (why it
/// chooses: `conntrack6::pinned`). `None`: no IPv6 service there.
#[inline(always)]
fn to_service(
    ctx: &XdpContext,
    pkt: &Packet6,
    key: &FlowKey6,
    port: u64,
    event: Event,
) -> Option<Result<(u32, Reason), Reason>> {
    let (service, any_address) = lookup_service(key, port)?;
    if !pkt.is_tcp_syn()
        && let Some(reverse) = flows::reverse_lookup(key)
    {
        return Some(reply(ctx, pkt, key, &reverse));
    }
    if ingress::for_another_host(ctx) {
        return Some(Err(Reason::PassOtherHost));
    }
    // SAFETY: only presence is read.
    if any_address && unsafe { HOST_ADDRS6.get(&key.dst) }.is_none() {
        return Some(Err(Reason::PassNotLocal));
    }
    if service.backend_count == 0 {
        let reason = if service.flags & SERVICE_OTHER_FAMILY_ONLY != 0 {
            Reason::DropNoBackendOfFamily
        } else {
            Reason::DropNoBackend
        };
        return Some(Ok((xdp_action::XDP_DROP, reason)));
    }
    // A TCP segment of a connection this node has no entry for: maglev finds its backend
    // again; round-robin would pick one that never saw it, so the kernel resets it.
    let recovered = pkt.proto == PROTO_TCP && !pkt.is_tcp_syn();
    if recovered && service.scheduler != SCHEDULER_MAGLEV {
        return Some(Err(Reason::PassFlowUnknown));
    }
    let mut flow = FlowValue6::default();
    let node_ip_be = flows::choose(service, key, pkt.tcp_flags, &mut flow);
    if node_ip_be == flows::NO_BACKEND {
        return Some(Ok((xdp_action::XDP_DROP, Reason::DropNoBackend)));
    }
    // The backend would answer this client directly, from its own address.
    // SAFETY: only presence is read.
    if key.src[..8] == flow.backend_ip[..8] || unsafe { HOST_ADDRS6.get(&key.src) }.is_some() {
        return Some(Ok((xdp_action::XDP_DROP, Reason::DropIpv6Hairpin)));
    }
    let event = if recovered {
        Event::FlowRecovered
    } else {
        event
    };
    if !flows::record(key, &flow, event) {
        return Some(Ok((xdp_action::XDP_DROP, Reason::DropFlowTableFull)));
    }
    Some(to_backend(
        ctx,
        pkt,
        key,
        &flow,
        node_ip_be as u32,
        !recovered,
    ))
}

/// The node a decapsulated frame came from (`decap`, through `DECAPSULATED_FROM`), reset for
/// the next packet; 0: none (not called by `decap`).
#[inline(always)]
fn decapsulated_from() -> u32 {
    let Some(from) = DECAPSULATED_FROM.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, written by `lb_xdp` for this packet or left 0.
    unsafe {
        let node_ip_be = *from;
        if node_ip_be != 0 {
            *from = 0;
        }
        node_ip_be
    }
}

/// The IPv6 decapsulation program's work (`lb_xdp6_decap`, tail-called by `decap` with an
/// inner IPv6 frame, the node it came from in `DECAPSULATED_FROM`). Whatever the frame is, it
/// is not the kernel's: it was inside a tunnel.
#[inline(always)]
pub fn try_xdp_from_node(ctx: &XdpContext) -> (u32, Reason) {
    let node_ip_be = decapsulated_from();
    let mut key = FlowKey6::default();
    let parsed = parse6::parse6(
        ctx.data(),
        ctx.data_end(),
        ctx.data_end() - ctx.data(),
        &mut key,
    );
    let outcome = match parsed {
        Ok(pkt) if node_ip_be != 0 => from_node6(ctx, &pkt, &key, node_ip_be),
        _ => return (xdp_action::XDP_DROP, Reason::DropVxlanMalformed),
    };
    outcome.unwrap_or_else(|reason| (xdp_action::XDP_PASS, reason))
}

/// A decapsulated IPv6 packet from the node `node_ip_be` (its VNI and source checked by
/// `decap`): the reply of a flow this node balanced, from the node that hosts its backend
/// (reverse-NATed and sent to the client), or a client's packet for a backend on this node
/// (delivered, and remembered so that TC encapsulates the replies back). As `decap` for IPv4.
#[inline(always)]
fn from_node6(
    ctx: &XdpContext,
    pkt: &Packet6,
    key: &FlowKey6,
    node_ip_be: u32,
) -> Result<(u32, Reason), Reason> {
    if let Some(reverse) = flows::reverse_lookup(key) {
        if !decap::hosts_backend_of(node_ip_be, reverse.backend_id) {
            return Ok((xdp_action::XDP_DROP, Reason::DropVxlanWrongNode));
        }
        return reply(ctx, pkt, key, &reverse);
    }
    if !flows::is_local_backend(key) {
        return Ok((xdp_action::XDP_DROP, Reason::DropVxlanNotLocalBackend));
    }
    flows::remember_ingress_node(key, node_ip_be);
    // A hop limit that runs out here goes to the kernel (`decide6`: `decap_stack`), which
    // answers with time exceeded, as for IPv4.
    let egress = forward::decide6(ctx, pkt, &key.src, &key.dst);
    forward::route6(
        ctx,
        &egress,
        [Reason::DecapTx, Reason::DecapRedirect, Reason::DecapStack],
    )
}

/// DNATs a client's packet to its flow's backend and routes it there.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet6,
    key: &FlowKey6,
    flow: &FlowValue6,
    node_ip_be: u32,
    new_flow: bool,
) -> Result<(u32, Reason), Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let to = (&flow.backend_ip, flow.backend_port_be);
    nat::rewrite6((data, data_end), pkt, key, Side::Dst, to).ok_or(Reason::PassTruncated)?;
    let bytes = (data_end - data) as u64;
    if pkt.hop_limit <= 1 {
        stats::count_to_backend(flow.backend_id, bytes, new_flow);
        // The kernel answers with ICMPv6 time exceeded, to the client.
        return Ok((xdp_action::XDP_PASS, Reason::ForwardTtlExpired));
    }
    if node_ip_be != 0 {
        // Counted as the backend's by the encapsulation program, once sent.
        return encap::xdp6_to_node(ctx, key, pkt, node_ip_be, flow.backend_id, new_flow);
    }
    stats::count_to_backend(flow.backend_id, bytes, new_flow);
    let egress = forward::decide6(ctx, pkt, &key.src, &flow.backend_ip);
    forward::route6(
        ctx,
        &egress,
        [
            Reason::ForwardTx,
            Reason::ForwardRedirect,
            Reason::ForwardStack,
        ],
    )
}

/// Reverse-NATs a backend's IPv6 reply when XDP sends it on itself; otherwise it goes to the
/// kernel untouched, and TC egress NATs it on its way out ([`try_tc_reply`]).
#[inline(always)]
fn reply(
    ctx: &XdpContext,
    pkt: &Packet6,
    key: &FlowKey6,
    reverse: &ReverseValue6,
) -> Result<(u32, Reason), Reason> {
    if flows::note_reply(key, reverse, pkt.tcp_flags) {
        return Ok((xdp_action::XDP_DROP, Reason::DropBackendRefused));
    }
    let egress = forward::decide6(ctx, pkt, &reverse.orig_ip, &key.dst).without_peer();
    let (hop, reason) = match egress {
        Egress::Tx(ref hop) => (hop, Reason::ReplyTx),
        Egress::Redirect(ref hop) => (hop, Reason::ReplyRedirect),
        Egress::Stack => return Ok((xdp_action::XDP_PASS, Reason::ReplyStack)),
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let to = (&reverse.orig_ip, reverse.orig_port_be);
    nat::rewrite6((data, data_end), pkt, key, Side::Src, to).ok_or(Reason::PassTruncated)?;
    forward::prepare_l2_6(ctx, hop).ok_or(Reason::PassTruncated)?;
    stats::count_reply(reverse.backend_id, (data_end - data) as u64);
    Ok((forward::send(ctx, &egress), reason))
}

/// TC egress's IPv6 path (`lb_tc_egress6`, tail-called by `lb_tc_egress`): reverse-NATs a
/// backend's reply the kernel routed out of an lbctl interface. Returns the TC action.
#[inline(always)]
pub fn try_tc_reply(ctx: &mut TcContext) -> Result<i32, i64> {
    let len = ctx.len() as usize;
    let mut key = FlowKey6::default();
    let mut parsed = parse6::parse6(ctx.data(), ctx.data_end(), len, &mut key);
    if parsed == Err(Reason::PassTruncated) && len > ctx.data_end() - ctx.data() {
        // Headers may sit outside the linear part of the skb: pull them in and look again.
        ctx.pull_data(ctx.len().min(TC_HEADERS_MAX))?;
        parsed = parse6::parse6(ctx.data(), ctx.data_end(), len, &mut key);
    }
    let pkt = match parsed {
        Ok(pkt) => pkt,
        // ICMPv6: an error about a flow is translated for its client.
        Err(Reason::PassNotTcpUdp) => return Ok(icmp6::to_translation(ctx)),
        Err(_) => return Ok(TC_ACT_UNSPEC),
    };
    let Some(reverse) = flows::reverse_lookup(&key) else {
        // The reply of a flow another node balanced: back to that node.
        let Some(node_ip_be) = flows::ingress_node_of(&key) else {
            return Ok(TC_ACT_UNSPEC);
        };
        let (action, reason) = encap::tc6_to_node(ctx, &pkt, node_ip_be, encap::source_port6(&key));
        stats::count_reason(reason, u64::from(ctx.len()));
        return Ok(action);
    };
    if flows::note_reply(&key, &reverse, pkt.tcp_flags) {
        stats::count_reason(Reason::DropBackendRefused, u64::from(ctx.len()));
        return Ok(TC_ACT_SHOT);
    }
    let to = (&reverse.orig_ip, reverse.orig_port_be);
    nat::tc_rewrite6(ctx, &pkt, &key, Side::Src, to)?;
    let bytes = u64::from(ctx.len());
    stats::count_reason(Reason::ReplyEgress, bytes);
    stats::count_reply(reverse.backend_id, bytes);
    Ok(TC_ACT_UNSPEC)
}

/// Headers the IPv6 parser may need in the skb's linear part: Ethernet, IPv6, two extension
/// headers of 64 bytes, TCP with options.
const TC_HEADERS_MAX: u32 = 14 + 40 + 128 + 60;
