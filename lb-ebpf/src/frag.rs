//! IPv4 fragments of backends' UDP replies (a large DNS answer, SIP, games), reverse-NATed in
//! TC like whole datagrams. Only the first fragment carries the UDP header and so the ports
//! that find its flow: it is reverse-NATed (address, port, and the checksum, which covers the
//! whole datagram and updates incrementally), and the address it got is remembered by
//! (backend, client, IPv4 identification) in `FRAGMENTS` for the fragments that follow. A
//! fragment that comes before its first, or after its entry was evicted, leaves untouched and
//! is lost, as a lost fragment is.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use lb_common::{FlowKey, PROTO_UDP, Reason};

use crate::{conntrack, egress, maps::FRAGMENTS, parse, stats};

/// Key of `FRAGMENTS`: a fragmented datagram as the backend sent it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragmentKey {
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub id_be: u16,
    pub _pad: u16,
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
            let Some(reverse) = conntrack::reverse_lookup(&flow) else {
                return Ok(TC_ACT_UNSPEC);
            };
            let udp_check_off = l4_off + 6;
            egress::rewrite_l4_source(
                ctx,
                (l4_off, udp_check_off, true),
                (frag.src_ip_be, src_port_be),
                &reverse,
            )?;
            // A full LRU evicts; an error costs the rest of this datagram, nothing more.
            let _ = FRAGMENTS.insert(&key, &reverse.orig_ip_be, 0);
            stats::count_reply(reverse.backend_id, bytes);
            reverse.orig_ip_be
        }
        // SAFETY: copied out at once.
        None => match unsafe { FRAGMENTS.get(&key) } {
            Some(src) => *src,
            None => return Ok(TC_ACT_UNSPEC),
        },
    };
    egress::rewrite_l3_source(ctx, frag.src_ip_be, new_src)?;
    stats::count_reason(Reason::ReplyEgress, bytes);
    Ok(TC_ACT_UNSPEC)
}
