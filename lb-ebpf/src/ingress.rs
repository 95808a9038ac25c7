//! The XDP program's logic: DNAT of new and established flows to services, reverse NAT of
//! replies that arrive on an lbctl interface, and forwarding of both.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use lb_common::{
    Event, FLOW_SNAT, FlowKey, FlowValue, MacKey, PASSIVE_UNANSWERED, PROTO_TCP, Reason,
    SCHEDULER_MAGLEV, SERVICE_FAIL_OPEN, SERVICE_OTHER_FAMILY_ONLY, SERVICE_PORT_ANY,
    SERVICE_PORT_VIP, ServiceValue, SnatValue,
};
use network_types::eth::EthHdr;

use crate::{
    conntrack::{self, Lookup},
    decap, encap, forward, frag, icmp,
    maps::HOST_MACS,
    nat::{self, Side},
    parse::{self, Packet, ptr_at},
    passive, reply, select, snat, stats,
};

/// The service a packet to a service port (`port`: its `SERVICE_PORTS` bits) is addressed to:
/// first by its exact address (a VIP), then by port on any address (checked to be local
/// before a new flow is created). Only the lookups the bits call for are made.
#[inline(always)]
fn lookup_service(pkt: &Packet, port: u64) -> Option<(&'static ServiceValue, bool)> {
    if port & SERVICE_PORT_VIP != 0
        && let Some(service) = select::service(pkt.dst_ip_be, pkt.dst_port_be, pkt.proto)
    {
        return Some((service, false));
    }
    if port & SERVICE_PORT_ANY == 0 {
        return None;
    }
    select::service(0, pkt.dst_port_be, pkt.proto).map(|service| (service, true))
}

/// Handles a parsed packet. `Ok` carries the action and the reason it is counted under;
/// `Err` means "pass untouched", counted under the reason it names.
#[inline(always)]
pub fn try_lb_xdp(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    // A UDP datagram's first fragment carries its ports: it goes the way of a whole datagram
    // to a service (and nowhere else); the fragments after it follow it (`frag`).
    let (pkt, first_fragment) =
        match parse::parse(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data()) {
            Ok(pkt) => (pkt, None),
            Err(Reason::PassFragment) => {
                let fragment = parse::parse_udp_fragment(
                    ctx.data(),
                    ctx.data_end(),
                    ctx.data_end() - ctx.data(),
                )
                .ok_or(Reason::PassFragment)?;
                match frag::first_of_request(&fragment) {
                    Some((pkt, key)) => (pkt, Some(key)),
                    None => return frag::later_request(ctx, &fragment),
                }
            }
            Err(Reason::PassNotTcpUdp) => return unreachable(ctx),
            Err(reason) => return Err(reason),
        };
    if first_fragment.is_none()
        && let Some(mesh) = encap::mesh()
        && decap::is_overlay(&pkt, mesh)
    {
        return decap::xdp_from_node(ctx, &pkt, mesh);
    }
    let key = conntrack::key_of(&pkt);
    let port = select::service_port(pkt.proto, pkt.dst_port_be);
    if port != 0
        && let Some(outcome) = to_service_port(ctx, &pkt, &key, port)
    {
        if let Some(fragment) = first_fragment {
            frag::remember_request(&fragment, &key, &outcome);
        }
        return outcome;
    }
    if first_fragment.is_some() {
        return Err(Reason::PassFragment);
    }
    match conntrack::reverse_lookup(&key) {
        Some(reverse) => reply::reply(ctx, &pkt, &reverse),
        None => Err(Reason::PassNotService),
    }
}

/// A packet that is neither TCP nor UDP: an ICMP destination unreachable about a SYN this
/// node forwarded (from the backend, or a router on its way) is the backend's refusal, and is
/// dropped (`conntrack::note_unreachable`); any other ICMP error about a balanced flow is
/// translated and sent on (`icmp`); anything else passes untouched.
#[inline(always)]
fn unreachable(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let Some(error) =
        parse::parse_icmp_error(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data())
    else {
        return Err(Reason::PassNotTcpUdp);
    };
    if conntrack::note_unreachable(&error) {
        return Ok((xdp_action::XDP_DROP, Reason::DropBackendUnreachable));
    }
    icmp::xdp_from_wire(ctx, &error).unwrap_or(Err(Reason::PassNotTcpUdp))
}

/// A packet to a service port (`port`: its `SERVICE_PORTS` bits): an established flow, a reply
/// that happens to come from a service port, or a new flow that picks its backend here.
/// `None`: no service is published at the packet's address after all.
///
/// The flow table is looked up before the service: an established flow's packet needs
/// nothing from the service (its backend was chosen, and a removed service's backends are
/// cleared, which makes its flows stale), so the most common packet costs one hash lookup.
#[inline(always)]
fn to_service_port(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    port: u64,
) -> Option<Result<(u32, Reason), Reason>> {
    let orig = (pkt.dst_ip_be, pkt.dst_port_be);
    let (replace, event) = match conntrack::lookup(key, pkt.tcp_flags) {
        Lookup::Pinned { flow, was_idle } => match snat::of_flow(key, &flow) {
            // A hairpin flow whose source entry was evicted chooses again, as a stale flow
            // does: a maglev flow comes back to its backend and finds its port again there
            // (`snat::allocate`).
            None if flow.flags & FLOW_SNAT != 0 => (true, Event::FlowReselected),
            snat => {
                if !was_idle || conntrack::restore_reverse(key, &flow, orig, snat.as_ref()) {
                    return Some(to_backend(ctx, pkt, key, &flow, snat.as_ref(), false));
                }
                // Its port went to another flow while its reverse entry was evicted.
                (true, Event::FlowReselected)
            }
        },
        Lookup::Stale => (true, Event::FlowReselected),
        Lookup::Reused => (true, Event::FlowCreated),
        Lookup::Unanswered { flow } => {
            conntrack::forget_reply(key, &flow);
            passive::failed(flow.backend_id, PASSIVE_UNANSWERED);
            (true, Event::FlowUnanswered)
        }
        Lookup::Miss => (false, Event::FlowCreated),
    };
    let (service, any_address) = lookup_service(pkt, port)?;
    Some(to_service(
        ctx,
        pkt,
        key,
        service,
        any_address,
        (replace, event),
    ))
}

/// A packet to `service` without a flow to follow: a reply that happens to come from a
/// service port, or a new flow (`replace`: over a stale or ended entry; `event`: what it
/// counts as) that picks its backend here.
#[inline(always)]
fn to_service(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    service: &ServiceValue,
    any_address: bool,
    (replace, event): (bool, Event),
) -> Result<(u32, Reason), Reason> {
    let orig = (pkt.dst_ip_be, pkt.dst_port_be);
    // A backend's reply from a port that is also a service port; never a connection's first
    // SYN, for which the lookup (of a cold table slot) is skipped.
    if !pkt.is_tcp_syn()
        && let Some(reverse) = conntrack::reverse_lookup(key)
    {
        return reply::reply(ctx, pkt, &reverse);
    }
    if for_another_host(ctx) {
        return Err(Reason::PassOtherHost);
    }
    if any_address && !replace && !forward::is_local(pkt) {
        return Err(Reason::PassNotLocal);
    }
    // A TCP packet that is not a SYN and has no entry belongs to a connection whose entry was
    // evicted (or that began before lbctl): maglev finds its backend again; round-robin would
    // pick another one, which never saw the connection, so the packet goes to the kernel.
    let evicted = !replace && pkt.proto == PROTO_TCP && !pkt.is_tcp_syn();
    let chosen = if service.scheduler == SCHEDULER_MAGLEV {
        select::maglev(service, key)
    } else if evicted {
        return Err(Reason::PassFlowUnknown);
    } else {
        select::round_robin(service)
    };
    let Some((backend_id, backend)) = chosen else {
        let reason = if service.flags & SERVICE_OTHER_FAMILY_ONLY != 0 {
            Reason::DropNoBackendOfFamily
        } else {
            Reason::DropNoBackend
        };
        return Ok((xdp_action::XDP_DROP, reason));
    };
    let snat_ip_be = snat::hairpin_source(pkt, &backend);
    let snat_flag = if snat_ip_be != 0 { FLOW_SNAT } else { 0 };
    let chosen = FlowValue {
        backend_id,
        backend_ip_be: backend.ip_be,
        node_ip_be: backend.node_ip_be,
        backend_port_be: backend.port_be,
        // A recovered connection may be ending already.
        flags: conntrack::first_flags(pkt.tcp_flags) | snat_flag,
        _pad: 0,
        // SAFETY: plain helper call.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let event = if evicted { Event::FlowRecovered } else { event };
    let recorded = match conntrack::record(key, chosen, orig, replace, event, snat_ip_be) {
        Ok(recorded) => recorded,
        Err(reason) => return Ok((xdp_action::XDP_DROP, reason)),
    };
    // A recovered flow is an old connection: not counted as a new one of its backend.
    let new_flow = recorded.created && !evicted;
    if new_flow && service.flags & SERVICE_FAIL_OPEN != 0 {
        stats::count_event(Event::FlowFailOpen);
    }
    to_backend(
        ctx,
        pkt,
        key,
        &recorded.flow,
        recorded.snat.as_ref(),
        new_flow,
    )
}

/// Whether the frame is addressed to the unicast MAC of a host other than this node: one the
/// interface saw only because it is promiscuous, or because a switch flooded it. The kernel
/// drops those (`PACKET_OTHERHOST`); a flow made of it would send another host's traffic to
/// the backends as well. Checked where a flow would start, not on every packet: a frame for
/// another host finds no flow of this node's to follow.
#[inline(always)]
pub fn for_another_host(ctx: &XdpContext) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let mac = unsafe { (*eth).dst_addr };
    // Broadcast and multicast frames are every host's, this node's included.
    if mac[0] & 1 != 0 {
        return false;
    }
    let key = MacKey { mac, _pad: [0; 2] };
    // SAFETY: a set written by userspace; only presence is read.
    unsafe { HOST_MACS.get(&key) }.is_none()
}

/// DNATs a client's packet to its flow's backend (and gives a hairpin flow's packet its source,
/// `snat`) and sends it on: routed to a backend this node reaches, or encapsulated to the node
/// that hosts it.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    flow: &FlowValue,
    snat: Option<&SnatValue>,
    new_flow: bool,
) -> Result<(u32, Reason), Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    nat::rewrite(
        data,
        data_end,
        pkt,
        Side::Dst,
        flow.backend_ip_be,
        flow.backend_port_be,
    )
    .ok_or(Reason::PassTruncated)?;
    let bytes = (data_end - data) as u64;
    if pkt.ttl <= 1 {
        stats::count_to_backend(flow.backend_id, bytes, new_flow);
        // The kernel answers with ICMP time exceeded (to the client: the source is still its).
        return Ok((xdp_action::XDP_PASS, Reason::ForwardTtlExpired));
    }
    let snat_ip_be = match snat {
        Some(snat) => {
            nat::rewrite(data, data_end, pkt, Side::Src, snat.ip_be, snat.port_be)
                .ok_or(Reason::PassTruncated)?;
            snat.ip_be
        }
        None => 0,
    };
    let outcome = if flow.node_ip_be != 0 {
        // Too big once encapsulated: the client is told the size that fits (not for a hairpin
        // flow's packet, whose source is no longer the client's).
        encap::xdp_to_node(
            ctx,
            encap::source_port(key),
            flow.node_ip_be,
            Some(pkt),
            snat.is_none(),
            Some((flow.backend_id, new_flow)),
        )
    } else {
        forward::to_backend(ctx, pkt, flow.backend_ip_be, snat_ip_be)
    };
    // A packet the backend will not get (no route to its node, too big once encapsulated: then
    // dropped, or turned into an error back to the client) is not counted as the backend's.
    if let Ok((action, reason)) = outcome
        && action != xdp_action::XDP_DROP
        && reason != Reason::FragNeededSent
    {
        stats::count_to_backend(flow.backend_id, bytes, new_flow);
    }
    outcome
}
