//! IPv4 fragments of UDP datagrams (a large DNS query or answer, SIP, games): clients' requests
//! DNATed in XDP, backends' replies reverse-NATed in TC, like whole datagrams. Only the first
//! fragment carries the UDP header and so the ports that find its flow: it is NATed like a
//! whole datagram (address, port, and the checksum, which covers the whole datagram and updates
//! incrementally), and the address it got is remembered by (source, destination, IPv4
//! identification, direction) in `FRAGMENTS` for the fragments that follow. A fragment that
//! comes before its first, or after its entry was evicted, is passed on untouched and is lost,
//! as a lost fragment is. Fragments are not carried through the mesh.
use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    programs::{TcContext, XdpContext},
};
use lb_common::{FLOW_SNAT, FlowKey, PROTO_UDP, Reason};

use crate::{
    conntrack, egress, forward, ingress,
    maps::{FLOWS, FRAGMENTS},
    nat,
    parse::{self, Packet},
    stats,
};

/// Key of `FRAGMENTS`: a fragmented datagram as its sender sent it, and which way it goes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragmentKey {
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub id_be: u16,
    /// [`TO_BACKEND`] or [`TO_CLIENT`].
    pub direction: u8,
    pub _pad: u8,
}

/// A client's datagram to a service.
const TO_BACKEND: u8 = 1;
/// A backend's reply.
const TO_CLIENT: u8 = 2;

/// Value of `FRAGMENTS`: the address the fragments that follow get (the backend for a
/// request, the service for a reply), and the flow's backend, whose counters they add to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragmentNat {
    pub ip_be: u32,
    pub backend_id: u32,
}

/// Reverse-NATs a fragment of a backend's UDP reply, when its datagram belongs to a flow this
/// node balanced. Returns the TC action.
#[inline(always)]
pub fn tc_reply(ctx: &mut TcContext) -> Result<i32, i64> {
    let Some(frag) = parse::parse_udp_fragment(ctx.data(), ctx.data_end(), ctx.len() as usize)
    else {
        return Ok(TC_ACT_UNSPEC);
    };
    let key = FragmentKey {
        src_ip_be: frag.src_ip_be,
        dst_ip_be: frag.dst_ip_be,
        id_be: frag.id_be,
        direction: TO_CLIENT,
        _pad: 0,
    };
    let bytes = u64::from(ctx.len());
    let new_src = match frag.first {
        Some((src_port_be, dst_port_be, l4_off)) => {
            let flow = FlowKey {
                src_ip_be: frag.src_ip_be,
                dst_ip_be: frag.dst_ip_be,
                src_port_be,
                dst_port_be,
                proto: PROTO_UDP,
                _pad: [0; 3],
            };
            // A hairpin flow's replies come back to this node, through XDP.
            let Some(reverse) =
                conntrack::reverse_lookup(&flow).filter(|reverse| reverse.client_ip_be == 0)
            else {
                return Ok(TC_ACT_UNSPEC);
            };
            let udp_check_off = l4_off + 6;
            egress::rewrite_l4_source(
                ctx,
                (l4_off, udp_check_off, true),
                (frag.src_ip_be, src_port_be),
                &reverse,
            )?;
            let nat = FragmentNat {
                ip_be: reverse.orig_ip_be,
                backend_id: reverse.backend_id,
            };
            // A full LRU evicts; an error costs the rest of this datagram, nothing more.
            let _ = FRAGMENTS.insert(&key, &nat, 0);
            stats::count_reply(reverse.backend_id, bytes);
            reverse.orig_ip_be
        }
        // SAFETY: copied out at once.
        None => match unsafe { FRAGMENTS.get(&key) }.copied() {
            Some(nat) => {
                stats::count_reply(nat.backend_id, bytes);
                nat.ip_be
            }
            None => return Ok(TC_ACT_UNSPEC),
        },
    };
    egress::rewrite_l3_source(ctx, frag.src_ip_be, new_src)?;
    stats::count_reason(Reason::ReplyEgress, bytes);
    Ok(TC_ACT_UNSPEC)
}

/// The first fragment of a UDP datagram as `ingress` handles a whole one (it carries the
/// ports), and the key its followers will be found by; `None` for a later fragment.
#[inline(always)]
pub fn first_of_request(frag: &parse::Fragment) -> Option<(Packet, FragmentKey)> {
    let (src_port_be, dst_port_be, l4_off) = frag.first?;
    let pkt = Packet {
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
    };
    Some((pkt, request_key(frag)))
}

fn request_key(frag: &parse::Fragment) -> FragmentKey {
    FragmentKey {
        src_ip_be: frag.src_ip_be,
        dst_ip_be: frag.dst_ip_be,
        id_be: frag.id_be,
        direction: TO_BACKEND,
        _pad: 0,
    }
}

/// After a first fragment went the way of its flow (`outcome`): remembers the backend for the
/// fragments that follow, when this node routes to it (fragments are not carried through the
/// mesh).
#[inline(always)]
pub fn remember_request(
    fragment: &FragmentKey,
    flow_key: &FlowKey,
    outcome: &Result<(u32, Reason), Reason>,
) {
    if !matches!(outcome, Ok((action, _)) if *action != xdp_action::XDP_DROP) {
        return;
    }
    // SAFETY: copied out at once.
    // A hairpin flow's fragments would need their source rewritten too: not handled.
    if let Some(flow) = unsafe { FLOWS.get(flow_key) }.copied()
        && flow.node_ip_be == 0
        && flow.flags & FLOW_SNAT == 0
    {
        let nat = FragmentNat {
            ip_be: flow.backend_ip_be,
            backend_id: flow.backend_id,
        };
        // A full LRU evicts; an error costs the rest of this datagram, nothing more.
        let _ = FRAGMENTS.insert(fragment, &nat, 0);
    }
}

/// A fragment after the first of a client's UDP datagram: its destination becomes the backend
/// its first fragment went to, and it is routed the same way; without an entry it is passed on
/// (`pass_fragment`).
#[inline(always)]
pub fn later_request(ctx: &XdpContext, frag: &parse::Fragment) -> Result<(u32, Reason), Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // SAFETY: copied out at once.
    let nat = unsafe { FRAGMENTS.get(&request_key(frag)) }
        .copied()
        .ok_or(Reason::PassFragment)?;
    nat::rewrite_dst_address(data, data_end, frag.dst_ip_be, nat.ip_be)
        .ok_or(Reason::PassTruncated)?;
    stats::count_to_backend(nat.backend_id, (data_end - data) as u64, false);
    if frag.ttl <= 1 {
        // The kernel answers with ICMP time exceeded.
        return Ok((xdp_action::XDP_PASS, Reason::ForwardTtlExpired));
    }
    let pkt = Packet {
        l4_off: 0,
        proto: PROTO_UDP,
        ttl: frag.ttl,
        tot_len: frag.tot_len,
        src_ip_be: frag.src_ip_be,
        dst_ip_be: nat.ip_be,
        src_port_be: 0,
        dst_port_be: 0,
        l4_check_off: 0,
        tcp_flags: 0,
    };
    forward::to_backend(ctx, &pkt, nat.ip_be)
}
