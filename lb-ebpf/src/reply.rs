//! Replies of balanced flows seen by XDP (from a backend on a link lbctl is on, or
//! decapsulated from the backend's node): reverse NAT, and sending them on to the client.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Reason, ReverseValue};

use crate::{
    conntrack,
    forward::{self, Egress},
    maps::HOST_ADDRS,
    nat::{self, Side},
    parse::Packet,
    stats,
};

/// Reverse-NATs a backend's reply when XDP can send it on itself, or when it is for one of the
/// node's own sockets. Otherwise the reply goes to the kernel untouched: with the node's own
/// address as its source the kernel would drop it as martian, so the TC egress program NATs it
/// on its way out instead.
#[inline(always)]
pub fn reply(
    ctx: &XdpContext,
    pkt: &Packet,
    reverse: &ReverseValue,
) -> Result<(u32, Reason), Reason> {
    if conntrack::note_reply(pkt, reverse) == conntrack::Heard::Refused {
        return Ok((xdp_action::XDP_DROP, Reason::DropBackendRefused));
    }
    let hairpin = reverse.client_ip_be != 0;
    let (client_ip_be, client_port_be) = conntrack::client_of(pkt, reverse);
    let egress = forward::decide(ctx, pkt, reverse.orig_ip_be, client_ip_be).without_peer();
    let (hop, reason) = match egress {
        Egress::Tx(ref hop) => (hop, Reason::ReplyTx),
        Egress::Redirect(ref hop) => (hop, Reason::ReplyRedirect),
        // Addressed to this node, a hairpin flow's reply cannot be left to the kernel.
        Egress::Stack if hairpin => return Ok((xdp_action::XDP_DROP, Reason::DropSnatNoRoute)),
        // To one of the node's own sockets (`socklb`), which no TC program will see: NATed
        // here, and delivered by the kernel.
        Egress::Stack if is_host_addr(client_ip_be) => {
            let bytes = restore_source(ctx, pkt, reverse)?;
            stats::count_reply(reverse.backend_id, bytes);
            return Ok((xdp_action::XDP_PASS, Reason::ReplyLocal));
        }
        Egress::Stack => return Ok((xdp_action::XDP_PASS, Reason::ReplyStack)),
    };
    let bytes = restore_source(ctx, pkt, reverse)?;
    if hairpin {
        nat::rewrite(
            ctx.data(),
            ctx.data_end(),
            pkt,
            Side::Dst,
            client_ip_be,
            client_port_be,
        )
        .ok_or(Reason::PassTruncated)?;
    }
    forward::prepare_l2(ctx, hop).ok_or(Reason::PassTruncated)?;
    stats::count_reply(reverse.backend_id, bytes);
    Ok((forward::send(ctx, &egress), reason))
}

/// A reply's source becomes the address its client connected to. Returns the packet's length.
#[inline(always)]
fn restore_source(ctx: &XdpContext, pkt: &Packet, reverse: &ReverseValue) -> Result<u64, Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    nat::rewrite(
        data,
        data_end,
        pkt,
        Side::Src,
        reverse.orig_ip_be,
        reverse.orig_port_be,
    )
    .ok_or(Reason::PassTruncated)?;
    Ok((data_end - data) as u64)
}

/// Whether `ip_be` is one of the node's own addresses (`HOST_ADDRS`).
#[inline(always)]
pub fn is_host_addr(ip_be: u32) -> bool {
    // SAFETY: a set written by userspace; only presence is read.
    unsafe { HOST_ADDRS.get(&ip_be) }.is_some()
}
