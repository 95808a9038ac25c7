//! The TC egress program's logic, for backend replies that the kernel routed out of an lbctl
//! interface: reverse NAT of the flows this node balanced, and VXLAN encapsulation of the
//! replies of flows another node sent here. Checksums go through the kernel helpers, which
//! also handle packets whose checksum is left to the NIC (CHECKSUM_PARTIAL).
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use lb_common::{PROTO_UDP, Reason};

use crate::{
    conntrack, encap, frag,
    icmp::{self, About},
    maps::TUNNEL_REPLIES,
    nat::{self, Side},
    parse, socklb, stats,
};

/// The longest ICMP error the kernel makes (RFC 1812: 576 bytes of IPv4) and its Ethernet
/// header: pulled whole into the linear part of the skb to be translated.
const ICMP_ERROR_MAX: u32 = 14 + 576;

/// Headers the parser may need in the linear part of the skb: Ethernet, IPv4 with the largest
/// options, TCP without options.
const HEADERS_MAX: u32 = 14 + 60 + 20;

/// Reverse-NATs the packet if it is a reply of a flow this node balanced, encapsulates it
/// back to the ingress node of a flow another node balanced, or, for a packet of one of the
/// node's own sockets whose backend is on another node, DNATs and encapsulates it there. Returns the TC action. `Err` only
/// on a helper failure, which leaves the packet as the kernel built it.
#[inline(always)]
pub fn try_lb_tc_egress(ctx: &mut TcContext) -> Result<i32, i64> {
    let len = ctx.len() as usize;
    // SAFETY: the context points at the program's __sk_buff for the whole run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let mut parsed = parse::parse_tc(ctx.data(), ctx.data_end(), len, gso);
    if parsed == Err(Reason::PassTruncated) && len > ctx.data_end() - ctx.data() {
        // Headers may sit outside the linear part of the skb: pull them in and look again.
        ctx.pull_data(ctx.len().min(HEADERS_MAX))?;
        parsed = parse::parse_tc(ctx.data(), ctx.data_end(), len, gso);
    }
    let pkt = match parsed {
        Ok(pkt) => pkt,
        Err(Reason::PassFragment) => return frag::tc_reply(ctx),
        Err(Reason::PassNotTcpUdp) => return icmp_error(ctx, len),
        Err(_) => return Ok(TC_ACT_UNSPEC),
    };
    let key = conntrack::key_of(&pkt);
    let Some(reverse) = conntrack::reverse_lookup(&key) else {
        // SAFETY: copied out at once.
        return Ok(match unsafe { TUNNEL_REPLIES.get(&key) }.copied() {
            Some(tunnel) => {
                let (action, reason) = encap::tc_to_node(
                    ctx,
                    &pkt,
                    tunnel.node_ip_be,
                    encap::source_port(&key),
                    true,
                    Reason::ReplyEncap,
                );
                stats::count_reason(reason, u64::from(ctx.len()));
                action
            }
            None => match socklb::tc_to_node(ctx, &pkt, &key) {
                Some(sent) => sent?,
                None => TC_ACT_UNSPEC,
            },
        });
    };
    if reverse.client_ip_be != 0 {
        // A hairpin flow's reply is addressed to this node, where XDP takes it: one routed out
        // instead (its address is not local here) would reach neither this node nor the client.
        stats::count_reason(Reason::DropSnatNoRoute, u64::from(ctx.len()));
        return Ok(TC_ACT_SHOT);
    }
    if conntrack::note_reply(&pkt, &reverse) == conntrack::Heard::Refused {
        stats::count_reason(Reason::DropBackendRefused, u64::from(ctx.len()));
        return Ok(TC_ACT_SHOT);
    }
    nat::tc_rewrite_l4(
        ctx,
        Side::Src,
        (pkt.l4_off, pkt.l4_check_off, pkt.proto == PROTO_UDP),
        (pkt.src_ip_be, pkt.src_port_be),
        (reverse.orig_ip_be, reverse.orig_port_be),
    )?;
    nat::tc_rewrite_l3(ctx, Side::Src, pkt.src_ip_be, reverse.orig_ip_be)?;
    let bytes = u64::from(ctx.len());
    stats::count_reason(Reason::ReplyEgress, bytes);
    stats::count_reply(reverse.backend_id, bytes);
    Ok(TC_ACT_UNSPEC)
}

/// An ICMP error on its way out. The node's own destination unreachable about a SYN it
/// forwarded (its neighbour for the backend never answered, no route) is the backend's
/// refusal, as in XDP. Any other error about a packet this node forwarded (the kernel's own:
/// time exceeded, fragmentation needed; or one it routed) is translated for the client; one
/// about a flow another node balanced (this node hosts the backend) is encapsulated back to
/// that node, which translates it. Anything else goes on untouched.
#[inline(always)]
fn icmp_error(ctx: &mut TcContext, len: usize) -> Result<i32, i64> {
    if ctx.data_end() - ctx.data() < len {
        ctx.pull_data(ctx.len().min(ICMP_ERROR_MAX))?;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(error) = parse::parse_icmp_error(data, data_end, len) else {
        return Ok(TC_ACT_UNSPEC);
    };
    if conntrack::note_unreachable(&error) {
        stats::count_reason(Reason::DropBackendUnreachable, len as u64);
        return Ok(TC_ACT_SHOT);
    }
    if let Some(About::Forwarded(reverse)) = icmp::about(&error) {
        if icmp::translate_for_client(data, data_end, &error, &reverse).is_some() {
            stats::count_reason(Reason::IcmpEgress, len as u64);
        }
        return Ok(TC_ACT_UNSPEC);
    }
    // An error goes to the quoted packet's source; anything else is not about that packet.
    if error.dst_ip_be != error.quoted.src_ip_be {
        return Ok(TC_ACT_UNSPEC);
    }
    let reply_key = conntrack::reply_key_of(&error.quoted);
    // SAFETY: copied out at once.
    let Some(tunnel) = (unsafe { TUNNEL_REPLIES.get(&reply_key) }).copied() else {
        return Ok(TC_ACT_UNSPEC);
    };
    let (action, reason) = encap::tc_to_node(
        ctx,
        &error.as_packet(),
        tunnel.node_ip_be,
        encap::source_port(&reply_key),
        false,
        Reason::IcmpEncap,
    );
    stats::count_reason(reason, u64::from(ctx.len()));
    Ok(action)
}
