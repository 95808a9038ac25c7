//! IPv4 fragments of UDP datagrams (a large DNS query or answer, SIP, games): clients' requests
//! DNATed in XDP, backends' replies reverse-NATed in TC, like whole datagrams, and carried
//! through the mesh both ways. Only the first fragment carries the UDP header and so the ports
//! that find its flow: it goes the way of a whole datagram (NATed: address, port, and the
//! checksum, which covers the whole datagram and updates incrementally; encapsulated to the
//! backend's node, decapsulated there), and what was done to it is remembered by (source,
//! destination, IPv4 identification, direction) in `FRAGMENTS` for the fragments that follow.
//! A fragment that comes before its first, or after its entry was evicted, is passed on
//! untouched (or dropped, out of a tunnel) and is lost, as a lost fragment is.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    programs::{TcContext, XdpContext},
};
use lb_common::{FLOW_SNAT, FlowKey, PROTO_UDP, Reason, ReverseValue};

use crate::{
    conntrack, encap,
    forward::{self, Egress},
    maps::{FLOWS, FRAGMENTS, FragmentKey, FragmentNat, TUNNEL_REPLIES},
    nat::{self, Side},
    parse::{self, Fragment, Packet},
    reply, stats,
};

/// A client's datagram to a service: the later fragments get the backend's address, and are
/// encapsulated to its node if it has one.
const TO_BACKEND: u8 = 1;
/// A backend's reply: the later fragments get the service's address.
const TO_CLIENT: u8 = 2;
/// A client's datagram another node balanced to a backend here: the later fragments are
/// decapsulated and delivered as they are.
const DELIVER: u8 = 3;
/// A backend's reply to a flow another node balanced: the later fragments are encapsulated
/// back to that node.
const TUNNEL: u8 = 4;

impl FragmentNat {
    fn rewrite(ip_be: u32, backend_id: u32) -> FragmentNat {
        FragmentNat {
            ip_be,
            backend_id,
            node_ip_be: 0,
            tunnel_port: 0,
            dropped_as: 0,
        }
    }
}

fn key_of(frag: &Fragment, direction: u8) -> FragmentKey {
    FragmentKey {
        src_ip_be: frag.src_ip_be,
        dst_ip_be: frag.dst_ip_be,
        id_be: frag.id_be,
        direction,
        _pad: 0,
    }
}

/// The key of the datagram whose first fragment is `first`.
fn datagram_key(first: &Packet, id_be: u16, direction: u8) -> FragmentKey {
    FragmentKey {
        src_ip_be: first.src_ip_be,
        dst_ip_be: first.dst_ip_be,
        id_be,
        direction,
        _pad: 0,
    }
}

/// Remembers what the fragments after a first get. A full LRU evicts; an error costs the rest
/// of this datagram, nothing more.
#[inline(always)]
fn remember(key: &FragmentKey, nat: &FragmentNat) {
    let _ = FRAGMENTS.insert(key, nat, 0);
}

/// What was remembered for the fragments of `key`.
#[inline(always)]
fn recall(key: &FragmentKey) -> Option<FragmentNat> {
    // SAFETY: copied out at once.
    unsafe { FRAGMENTS.get(key) }.copied()
}

/// The first fragment of a datagram as the packet its first bytes make (the ports, the UDP
/// checksum); `None` for a later fragment.
#[inline(always)]
pub fn first_as_packet(frag: &Fragment) -> Option<Packet> {
    let (src_port_be, dst_port_be, l4_off) = frag.first?;
    Some(Packet {
        l4_off,
        proto: PROTO_UDP,
        ttl: frag.ttl,
        tot_len: frag.tot_len,
        src_ip_be: frag.src_ip_be,
        dst_ip_be: frag.dst_ip_be,
        src_port_be,
        dst_port_be,
        l4_check_off: l4_off + 6,
        tcp_flags: 0,
    })
}

/// A later fragment as a packet to route to `dst_ip_be` (it has no ports).
#[inline(always)]
fn later_as_packet(frag: &Fragment, dst_ip_be: u32) -> Packet {
    Packet {
        l4_off: 0,
        proto: PROTO_UDP,
        ttl: frag.ttl,
        tot_len: frag.tot_len,
        src_ip_be: frag.src_ip_be,
        dst_ip_be,
        src_port_be: 0,
        dst_port_be: 0,
        l4_check_off: 0,
        tcp_flags: 0,
    }
}

/// Reverse-NATs a fragment of a backend's UDP reply when its datagram belongs to a flow this
/// node balanced, or encapsulates it back to the node that balanced it. Returns the TC action.
#[inline(always)]
pub fn tc_reply(ctx: &mut TcContext) -> Result<i32, i64> {
    let Some(frag) = parse::parse_udp_fragment(ctx.data(), ctx.data_end(), ctx.len() as usize)
    else {
        return Ok(TC_ACT_UNSPEC);
    };
    let bytes = u64::from(ctx.len());
    let Some(pkt) = first_as_packet(&frag) else {
        if let Some(nat) = recall(&key_of(&frag, TO_CLIENT)) {
            stats::count_reply(nat.backend_id, bytes);
            nat::tc_rewrite_l3(ctx, Side::Src, frag.src_ip_be, nat.ip_be)?;
            stats::count_reason(Reason::ReplyEgress, bytes);
        } else if let Some(nat) = recall(&key_of(&frag, TUNNEL)) {
            if nat.dropped_as != 0 {
                // Its first fragment was dropped: so is the rest, rather than let out with the
                // backend's address onto a network that cannot route it back.
                stats::count_reason_slot(u32::from(nat.dropped_as) - 1, bytes);
                return Ok(TC_ACT_SHOT);
            }
            let pkt = later_as_packet(&frag, frag.dst_ip_be);
            return Ok(to_node(ctx, &pkt, &nat, bytes).0);
        }
        return Ok(TC_ACT_UNSPEC);
    };
    let flow = conntrack::key_of(&pkt);
    let Some(reverse) = conntrack::reverse_lookup(&flow) else {
        // SAFETY: copied out at once.
        let Some(tunnel) = unsafe { TUNNEL_REPLIES.get(&flow) }.copied() else {
            return Ok(TC_ACT_UNSPEC);
        };
        let nat = FragmentNat {
            ip_be: tunnel.node_ip_be,
            backend_id: 0,
            node_ip_be: tunnel.node_ip_be,
            tunnel_port: encap::source_port(&flow),
            dropped_as: 0,
        };
        let (action, reason) = to_node(ctx, &pkt, &nat, bytes);
        let dropped_as = if action == TC_ACT_SHOT {
            reason as u16 + 1
        } else {
            0
        };
        remember(&key_of(&frag, TUNNEL), &FragmentNat { dropped_as, ..nat });
        return Ok(action);
    };
    // A hairpin flow's replies come back to this node, through XDP.
    if reverse.client_ip_be != 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    nat::tc_rewrite_l4(
        ctx,
        Side::Src,
        (pkt.l4_off, pkt.l4_check_off, true),
        (frag.src_ip_be, pkt.src_port_be),
        (reverse.orig_ip_be, reverse.orig_port_be),
    )?;
    remember(
        &key_of(&frag, TO_CLIENT),
        &FragmentNat::rewrite(reverse.orig_ip_be, reverse.backend_id),
    );
    stats::count_reply(reverse.backend_id, bytes);
    nat::tc_rewrite_l3(ctx, Side::Src, frag.src_ip_be, reverse.orig_ip_be)?;
    stats::count_reason(Reason::ReplyEgress, bytes);
    Ok(TC_ACT_UNSPEC)
}

/// Encapsulates a reply fragment back to the node `nat` names, counted; returns the TC action
/// and its reason.
#[inline(always)]
fn to_node(ctx: &mut TcContext, pkt: &Packet, nat: &FragmentNat, bytes: u64) -> (i32, Reason) {
    let (action, reason) = encap::tc_to_node(
        ctx,
        pkt,
        nat.node_ip_be,
        nat.tunnel_port,
        false,
        Reason::ReplyEncap,
    );
    stats::count_reason(reason, bytes);
    (action, reason)
}

/// The first fragment of a UDP datagram as `ingress` handles a whole one (it carries the
/// ports), and the key its followers will be found by; `None` for a later fragment.
#[inline(always)]
pub fn first_of_request(frag: &Fragment) -> Option<(Packet, FragmentKey)> {
    Some((first_as_packet(frag)?, key_of(frag, TO_BACKEND)))
}

/// After a first fragment went the way of its flow (`outcome`): remembers the backend, and its
/// node, for the fragments that follow.
#[inline(always)]
pub fn remember_request(
    fragment: &FragmentKey,
    flow_key: &FlowKey,
    outcome: &Result<(u32, Reason), Reason>,
) {
    if !matches!(outcome, Ok((action, _)) if *action != xdp_action::XDP_DROP) {
        return;
    }
    // A hairpin flow's fragments would need their source rewritten too: not handled, and an
    // older datagram's entry under the same key must not steer them.
    // SAFETY: copied out at once.
    let Some(flow) = unsafe { FLOWS.get(flow_key) }.copied() else {
        return;
    };
    if flow.flags & FLOW_SNAT != 0 {
        let _ = FRAGMENTS.remove(fragment);
    } else {
        let tunnel_port = if flow.node_ip_be != 0 {
            encap::source_port(flow_key)
        } else {
            0
        };
        let nat = FragmentNat {
            node_ip_be: flow.node_ip_be,
            tunnel_port,
            ..FragmentNat::rewrite(flow.backend_ip_be, flow.backend_id)
        };
        remember(fragment, &nat);
    }
}

/// A fragment after the first of a client's UDP datagram: its destination becomes the backend
/// its first fragment went to, and it is routed, or encapsulated, the same way; without an
/// entry it is passed on (`pass_fragment`).
#[inline(always)]
pub fn later_request(ctx: &XdpContext, frag: &Fragment) -> Result<(u32, Reason), Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let nat = recall(&key_of(frag, TO_BACKEND)).ok_or(Reason::PassFragment)?;
    nat::rewrite_address_only(data, data_end, Side::Dst, frag.dst_ip_be, nat.ip_be)
        .ok_or(Reason::PassTruncated)?;
    stats::count_to_backend(nat.backend_id, (data_end - data) as u64, false);
    if frag.ttl <= 1 {
        // The kernel answers with ICMP time exceeded.
        return Ok((xdp_action::XDP_PASS, Reason::ForwardTtlExpired));
    }
    if nat.node_ip_be != 0 {
        return encap::xdp_to_node(ctx, nat.tunnel_port, nat.node_ip_be, None, false, None);
    }
    forward::to_backend(ctx, &later_as_packet(frag, nat.ip_be), nat.ip_be, 0)
}

/// After the first fragment of a reply that came back from a backend's node went the way of a
/// whole one (`outcome`): the rest follow it, sent on by XDP, or, when the first went to the
/// kernel untouched (its next hop out of an interface lbctl is not on, or unresolved), passed
/// to it untouched too and reverse-NATed by TC by the same entry (the kernel may hold the first
/// for reassembly before TC sees it). A hairpin flow's are not handled.
///
/// `first` is the first fragment as a packet, `id_be` its datagram's identification (only that,
/// not the whole `Fragment`, is kept meanwhile: the XDP program's stack is near its limit).
#[inline(always)]
pub fn remember_reply_from_node(
    first: &Packet,
    id_be: u16,
    reverse: &ReverseValue,
    outcome: &Result<(u32, Reason), Reason>,
) {
    if reverse.client_ip_be == 0
        && matches!(
            outcome,
            Ok((
                _,
                Reason::ReplyTx | Reason::ReplyRedirect | Reason::ReplyStack | Reason::ReplyLocal
            ))
        )
    {
        remember(
            &datagram_key(first, id_be, TO_CLIENT),
            &FragmentNat::rewrite(reverse.orig_ip_be, reverse.backend_id),
        );
    }
}

/// After the first fragment of a client's datagram for a backend here was delivered: the rest
/// follow it.
#[inline(always)]
pub fn remember_delivery(first: &Packet, id_be: u16) {
    remember(
        &datagram_key(first, id_be, DELIVER),
        &FragmentNat::rewrite(first.dst_ip_be, 0),
    );
}

/// A decapsulated fragment after the first: it follows its first fragment.
#[inline(always)]
pub fn later_from_node(ctx: &XdpContext, frag: &Fragment) -> Result<(u32, Reason), Reason> {
    if let Some(nat) = recall(&key_of(frag, TO_CLIENT)) {
        let pkt = later_as_packet(frag, frag.dst_ip_be);
        let egress = forward::decide(ctx, &pkt, nat.ip_be, frag.dst_ip_be).without_peer();
        let (hop, reason) = match egress {
            Egress::Tx(ref hop) => (hop, Reason::ReplyTx),
            Egress::Redirect(ref hop) => (hop, Reason::ReplyRedirect),
            // For one of the node's own sockets, as its first fragment was.
            Egress::Stack if reply::is_host_addr(frag.dst_ip_be) => {
                let (data, data_end) = (ctx.data(), ctx.data_end());
                nat::rewrite_address_only(data, data_end, Side::Src, frag.src_ip_be, nat.ip_be)
                    .ok_or(Reason::PassTruncated)?;
                stats::count_reply(nat.backend_id, (data_end - data) as u64);
                return Ok((xdp_action::XDP_PASS, Reason::ReplyLocal));
            }
            // Untouched: TC rewrites it by the same entry on its way out.
            Egress::Stack => return Ok((xdp_action::XDP_PASS, Reason::ReplyStack)),
        };
        let (data, data_end) = (ctx.data(), ctx.data_end());
        nat::rewrite_address_only(data, data_end, Side::Src, frag.src_ip_be, nat.ip_be)
            .ok_or(Reason::PassTruncated)?;
        forward::prepare_l2(ctx, hop).ok_or(Reason::PassTruncated)?;
        stats::count_reply(nat.backend_id, (data_end - data) as u64);
        return Ok((forward::send(ctx, &egress), reason));
    }
    if recall(&key_of(frag, DELIVER)).is_some() {
        return forward::deliver(ctx, &later_as_packet(frag, frag.dst_ip_be));
    }
    Ok((xdp_action::XDP_DROP, Reason::DropVxlanNotLocalBackend))
}
