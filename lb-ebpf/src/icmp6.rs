//! ICMPv6 errors about the IPv6 flows this node balanced, on their way out (TC egress): an
//! error about a client's packet the node forwarded to its backend (the kernel's own "packet
//! too big" or "time exceeded", made as it routed the DNATed packet, or one a router on the
//! backend's side sent and the kernel routes to the client) quotes the packet as it was
//! forwarded, to the backend. The client's stack matches an error to its socket by the quote,
//! so the quote is given back the address and port the client connected to (and the error
//! the service's address as its source, when the backend itself sent it), checksums updated:
//! without it, a path to the backend narrower than the client's is a black hole for IPv6
//! (path MTU discovery never converges), as `icmp` prevents for IPv4.
//!
//! An error about a backend's reply, from the client's side (a router before the client whose
//! link is narrower: "packet too big"), comes to the service's address: XDP
//! (`lb_xdp6_icmp`, [`xdp_to_backend`]) gives it the backend's address and the quote the
//! backend sent, and routes it to a backend on this node, as `icmp` does for IPv4 (one on
//! another node: left to the kernel, untouched).
//!
//! A "destination unreachable" about a SYN whose flow awaits its backend's answer (the node's
//! own, when a backend on its link no longer answers neighbour discovery; a firewall's
//! reject) is the backend's refusal for passive health, as a RST is: dropped
//! (`drop_backend_unreachable`, as for IPv4), the flow forgotten, so that the client's next SYN chooses again.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use lb_common::{Addr6, FlowKey6, FlowValue6, PROTO_TCP, PROTO_UDP, Reason};
use network_types::eth::EthHdr;

use crate::{
    conntrack6, csum,
    encap::Handoff,
    forward, icmp,
    maps::{BACKENDS, FLOWS6, ICMP6_XDP_PROGRAM, IPV6_TC_ICMP_PROGRAM},
    nat::{self, load16, store16},
    parse::{L3_OFF, ptr_at},
    parse6::{IP6_DST_OFF, IP6_HOP_LIMIT_OFF, IP6_SRC_OFF, IPV6_LEN, Packet6},
    stats,
};

/// ICMPv6 in the IPv6 next-header field.
const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 error types (RFC 4443): destination unreachable, packet too big, time exceeded,
/// parameter problem.
const ERROR_TYPES: core::ops::RangeInclusive<u8> = 1..=4;
/// "Destination unreachable", and its codes that refuse a connection: no route, administratively
/// prohibited, address and port unreachable, source address failed policy, reject route (not 2:
/// beyond the scope of the source address, the client's doing).
const DEST_UNREACH: u8 = 1;
const REFUSING_CODES: [u8; 6] = [0, 1, 3, 4, 5, 6];
/// Where the parts of an error without extension headers sit, from the frame's start.
const ICMP_OFF: usize = L3_OFF + IPV6_LEN;
const ICMP_CHECK_OFF: usize = ICMP_OFF + 2;
const QUOTED_OFF: usize = ICMP_OFF + 8;
const QUOTED_SRC_OFF: usize = QUOTED_OFF + 8;
const QUOTED_DST_OFF: usize = QUOTED_OFF + 24;
const QUOTED_L4_OFF: usize = QUOTED_OFF + IPV6_LEN;
/// The longest ICMPv6 error (RFC 4443: it fits the minimum MTU, 1280 bytes) and its Ethernet
/// header: pulled whole into the linear part of the skb.
const ICMP6_ERROR_MAX: u32 = 14 + 1280;

/// Hands an ICMPv6 frame to `lb_tc_icmp6` ([`tc_translate`]; `IPV6_TC_ICMP_PROGRAM`), which
/// has a stack of its own: `lb_tc_egress6` has too little left. Returns only if that program is
/// not there: the frame then goes on untouched.
#[inline(always)]
pub fn to_translation(ctx: &TcContext) -> i32 {
    // SAFETY: the index names a TC program, as the tail call requires.
    let _ = unsafe { IPV6_TC_ICMP_PROGRAM.tail_call(ctx, 0) };
    TC_ACT_UNSPEC
}

/// `lb_tc_icmp6`: translates an ICMPv6 error about a forwarded packet for its client (TC
/// egress, for a frame `lb_tc_egress6`'s parser left as not TCP or UDP). Returns the TC
/// action: the error goes on, translated or untouched.
#[inline(always)]
pub fn tc_translate(ctx: &mut TcContext) -> i32 {
    let len = ctx.len();
    if ((ctx.data_end() - ctx.data()) as u32) < len
        && ctx.pull_data(len.min(ICMP6_ERROR_MAX)).is_err()
    {
        return TC_ACT_UNSPEC;
    }
    if is_refusal(ctx.data(), ctx.data_end()) {
        stats::count_reason(Reason::DropBackendUnreachable, u64::from(len));
        return TC_ACT_SHOT;
    }
    if translate(ctx.data(), ctx.data_end()).is_some() {
        stats::count_reason(Reason::IcmpEgress, u64::from(len));
    }
    TC_ACT_UNSPEC
}

/// The error between `data` and `data_end`, if it is one about a TCP or UDP packet going to
/// that packet's source: its type and code, the quoted packet's protocol, and the reply key of
/// the flow the quote is from (backend → client) written to `reply_key`.
#[inline(always)]
fn about_flow(data: usize, data_end: usize, reply_key: &mut FlowKey6) -> Option<(u8, u8)> {
    let header: *const [u8; 8] = ptr_at(data, data_end, L3_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    let [version, _, _, _, _, _, next, _] = unsafe { *header };
    let icmp: *const [u8; 2] = ptr_at(data, data_end, ICMP_OFF)?;
    // SAFETY: as above.
    let [kind, code] = unsafe { *icmp };
    if version >> 4 != 6 || next != PROTO_ICMPV6 || !ERROR_TYPES.contains(&kind) {
        return None;
    }
    // A quote of the IPv6 header and 8 bytes of the transport header at least, within the
    // error's payload: what a stack needs to match an error to its socket.
    let payload_len = usize::from(u16::from_be(load16(data, data_end, L3_OFF + 4)?));
    ptr_at::<[u8; 8]>(data, data_end, QUOTED_L4_OFF)?;
    if payload_len < QUOTED_L4_OFF + 8 - ICMP_OFF {
        return None;
    }
    let quoted: *const [u8; 8] = ptr_at(data, data_end, QUOTED_OFF)?;
    // SAFETY: as above.
    let [quoted_version, _, _, _, _, _, proto, _] = unsafe { *quoted };
    if quoted_version >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    reply_key.dst = addr_at(data, data_end, QUOTED_SRC_OFF)?;
    // An error goes to the quoted packet's source; anything else is not about that packet.
    if addr_at(data, data_end, IP6_DST_OFF)? != reply_key.dst {
        return None;
    }
    reply_key.src = addr_at(data, data_end, QUOTED_DST_OFF)?;
    reply_key.dst_port_be = load16(data, data_end, QUOTED_L4_OFF)?;
    reply_key.src_port_be = load16(data, data_end, QUOTED_L4_OFF + 2)?;
    reply_key.proto = proto;
    Some((kind, code))
}

/// Whether the error between `data` and `data_end` is a backend's refusal of a connection
/// whose SYN this node forwarded (`conntrack6::note_unreachable`, which then forgets the flow).
/// In a frame of its own, as [`translate`]: the two would not fit one.
#[inline(never)]
fn is_refusal(data: usize, data_end: usize) -> bool {
    let mut reply_key = FlowKey6::default();
    let Some((kind, code)) = about_flow(data, data_end, &mut reply_key) else {
        return false;
    };
    if kind != DEST_UNREACH || reply_key.proto != PROTO_TCP || !REFUSING_CODES.contains(&code) {
        return false;
    }
    conntrack6::reverse_lookup(&reply_key)
        .is_some_and(|reverse| conntrack6::note_unreachable(&reply_key, &reverse))
}

/// The 16-byte address at `off`.
#[inline(always)]
fn addr_at(data: usize, data_end: usize, off: usize) -> Option<Addr6> {
    let at: *const Addr6 = ptr_at(data, data_end, off)?;
    // SAFETY: bounds checked by ptr_at; a byte array needs no alignment.
    Some(unsafe { *at })
}

/// Rewrites the error between `data` and `data_end` if it is one about a packet this node
/// forwarded to a backend, going to that packet's client. `None`: not such an error (left as
/// it is). In a frame of its own (see [`is_refusal`]).
#[inline(never)]
fn translate(data: usize, data_end: usize) -> Option<()> {
    let mut reply_key = FlowKey6::default();
    about_flow(data, data_end, &mut reply_key)?;
    let reverse = conntrack6::reverse_lookup(&reply_key)?;
    let (backend, backend_port, proto) = (reply_key.src, reply_key.src_port_be, reply_key.proto);
    let (orig, orig_port) = (reverse.orig_ip, reverse.orig_port_be);

    let mut icmp_check = load16(data, data_end, ICMP_CHECK_OFF)?;
    // The quote's destination, and its transport checksum when the quote holds it (its
    // pseudo-header covers the address).
    let quoted_check_off = QUOTED_L4_OFF + if proto == PROTO_TCP { 16 } else { 6 };
    if let Some(old_check) = load16(data, data_end, quoted_check_off) {
        let new_check = csum::update_l4(old_check, proto == PROTO_UDP, |check| {
            csum::replace16(
                csum::replace128(check, &backend, &orig),
                backend_port,
                orig_port,
            )
        });
        store16(data, data_end, quoted_check_off, new_check)?;
        icmp_check = csum::replace16(icmp_check, old_check, new_check);
    }
    let at: *mut Addr6 = ptr_at(data, data_end, QUOTED_DST_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *at = orig };
    store16(data, data_end, QUOTED_L4_OFF + 2, orig_port)?;
    icmp_check = csum::replace16(
        csum::replace128(icmp_check, &backend, &orig),
        backend_port,
        orig_port,
    );
    // Sent by the backend itself: from the address the client knows (the pseudo-header, which
    // the ICMPv6 checksum covers, changes with it).
    if addr_at(data, data_end, IP6_SRC_OFF)? == backend {
        let at: *mut Addr6 = ptr_at(data, data_end, IP6_SRC_OFF)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *at = orig };
        icmp_check = csum::replace128(icmp_check, &backend, &orig);
    }
    store16(data, data_end, ICMP_CHECK_OFF, icmp_check)
}

/// ICMPv6 "packet too big".
const PACKET_TOO_BIG: u8 = 2;
/// What a "packet too big" quotes: the packet's IPv6 header and its transport header's first 8
/// bytes (the ports: what the client's stack needs to find its socket).
const PTB_QUOTE_LEN: usize = IPV6_LEN + 8;
/// The error's IPv6 packet: its header, the ICMPv6 header, the quote.
const PTB_L3_LEN: usize = IPV6_LEN + 8 + PTB_QUOTE_LEN;

/// Turns an IPv6 client's packet too big to encapsulate (already DNATed; `handoff` holds the
/// address and port the client sent it to) into an ICMPv6 "packet too big" back to the client
/// naming `mtu`, from the address the client sent to, quoting the packet as the client sent it,
/// and sends it back where the packet came from, as `icmp::frag_needed` does for IPv4.
/// Returns the XDP action; 0: none is sent (a packet with extension headers, rate-limited),
/// and the caller drops the packet.
#[inline(never)]
pub fn packet_too_big(ctx: &XdpContext, handoff: &Handoff, mtu: u16) -> u32 {
    packet_too_big_inner(ctx, handoff, mtu).unwrap_or(0)
}

#[inline(always)]
fn packet_too_big_inner(ctx: &XdpContext, handoff: &Handoff, mtu: u16) -> Option<u32> {
    let l4_off = usize::from(handoff.l4_off);
    // Extension headers would take the quote's room: no error then.
    if l4_off != L3_OFF + IPV6_LEN || (handoff.proto != PROTO_TCP && handoff.proto != PROTO_UDP) {
        return None;
    }
    // Few values live on this frame (it adds to `lb_xdp6_encap`'s): the addresses are read
    // from the packet where they are, not copied out.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let client: *const [u32; 4] = ptr_at(data, data_end, IP6_SRC_OFF)?;
    // SAFETY: bounds checked by ptr_at; read unaligned.
    let [a, b, c, d] = unsafe { client.read_unaligned() };
    if !icmp::rate_allows(a ^ b ^ c ^ d) {
        return None;
    }
    // The quote as the client sent it: its destination back to the service, with UDP's
    // checksum (which the 8 quoted bytes hold; TCP's lies beyond them).
    let backend: *mut Addr6 = ptr_at(data, data_end, IP6_DST_OFF)?;
    let backend_port = load16(data, data_end, l4_off + 2)?;
    if handoff.proto == PROTO_UDP {
        let check = load16(data, data_end, l4_off + 6)?;
        let check = csum::update_l4(check, true, |check| {
            // SAFETY: bounds checked by ptr_at.
            let backend = unsafe { &*backend };
            csum::replace16(
                csum::replace128(check, backend, &handoff.service6),
                backend_port,
                handoff.service_port_be,
            )
        });
        store16(data, data_end, l4_off + 6, check)?;
    }
    // SAFETY: bounds checked by ptr_at.
    unsafe { *backend = handoff.service6 };
    store16(data, data_end, l4_off + 2, handoff.service_port_be)?;
    // Room for the error's IPv6 and ICMPv6 headers in front of the quoted header, which stays
    // where it is; then the frame ends after the quote.
    let grow = IPV6_LEN + 8;
    // SAFETY: the helper only moves ctx->data; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -(grow as i32)) } != 0 {
        return None;
    }
    let len = ctx.data_end() - ctx.data();
    let cut = len.checked_sub(L3_OFF + PTB_L3_LEN)?;
    // SAFETY: as above.
    if cut > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx.cast(), -(cut as i32)) } != 0 {
        return None;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // The frame now: room (`grow` bytes), the client's Ethernet header, the quote.
    let old_eth: *const EthHdr = ptr_at(data, data_end, grow)?;
    let eth: *mut EthHdr = ptr_at(data, data_end, 0)?;
    let ip: *mut [u8; 8] = ptr_at(data, data_end, L3_OFF)?;
    let src: *mut Addr6 = ptr_at(data, data_end, IP6_SRC_OFF)?;
    let dst: *mut Addr6 = ptr_at(data, data_end, IP6_DST_OFF)?;
    let quoted_src: *const Addr6 = ptr_at(data, data_end, QUOTED_SRC_OFF)?;
    let message: *mut [u8; 8] = ptr_at(data, data_end, ICMP_OFF)?;
    // What the checksum covers in the packet: the addresses, the message and the quote.
    let covered: *const [u8; 32 + 8 + PTB_QUOTE_LEN] = ptr_at(data, data_end, IP6_SRC_OFF)?;
    let payload_len = ((8 + PTB_QUOTE_LEN) as u16).to_be_bytes();
    let mtu = u32::from(mtu).to_be_bytes();
    // SAFETY: bounds checked by ptr_at; plain bytes (alignment 1). The old Ethernet header is
    // read before the ICMPv6 header, which overlaps its end, is written.
    unsafe {
        (*eth).dst_addr = (*old_eth).src_addr;
        (*eth).src_addr = (*old_eth).dst_addr;
        (*eth).ether_type = 0x86ddu16.to_be();
        *ip = [
            0x60,
            0,
            0,
            0,
            payload_len[0],
            payload_len[1],
            PROTO_ICMPV6,
            64,
        ];
        *src = handoff.service6;
        core::ptr::copy_nonoverlapping(quoted_src, dst, 1);
        *message = [PACKET_TOO_BIG, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]];
        // The pseudo-header's length and next header, then what the packet holds.
        let mut sum = u32::from(u16::from_ne_bytes(payload_len))
            + u32::from(u16::from_ne_bytes([0, PROTO_ICMPV6]));
        let words = covered.cast::<u16>();
        // A loop LLVM does not unroll (the bound hidden from it, not from the verifier): the
        // unrolled one spilled its loads onto this frame.
        let count = nat::opaque((32 + 8 + PTB_QUOTE_LEN) / 2).min((32 + 8 + PTB_QUOTE_LEN) / 2);
        let mut i = 0;
        while i < count {
            sum += u32::from(words.add(i).read_unaligned());
            i += 1;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let check = (!(sum as u16)).to_ne_bytes();
        (*message)[2] = check[0];
        (*message)[3] = check[1];
    }
    Some(icmp::back_out(ctx))
}

/// Hands an ICMPv6 frame `lb_xdp6` does not balance to `lb_xdp6_icmp` ([`xdp_to_backend`];
/// `ICMP6_XDP_PROGRAM`). Returns only if that program is not there: the frame then goes on to
/// the kernel untouched.
#[inline(always)]
pub fn to_backend_program(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    // SAFETY: the index names an XDP program, as the tail call requires.
    let _ = unsafe { ICMP6_XDP_PROGRAM.tail_call(ctx, 0) };
    Err(Reason::PassNotTcpUdp)
}

/// `lb_xdp6_icmp`: an ICMPv6 error (without extension headers) about a backend's reply this
/// node reverse-NATed, sent by the client's side to the service address the reply came from:
/// the error goes to the flow's backend (on this node), its quote given back the backend's
/// address and port, checksums updated, and is routed there (`icmp_to_backend`). Anything else
/// (neighbour discovery among it) goes on to the kernel untouched.
#[inline(always)]
pub fn xdp_to_backend(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let mut key = FlowKey6::default();
    // The quote is the reply as it left (service → client): what `about_flow` writes for it,
    // the quote turned around, is the flow's key (client → service).
    about_flow(data, data_end, &mut key).ok_or(Reason::PassNotTcpUdp)?;
    // SAFETY: copied out at once.
    let flow = unsafe { FLOWS6.get(&key) }
        .copied()
        .ok_or(Reason::PassNotTcpUdp)?;
    // A backend on another node: the error is left to the kernel (not carried there yet).
    let local = BACKENDS
        .get(flow.backend_id)
        .is_some_and(|backend| backend.node_ip_be == 0);
    if !local {
        return Err(Reason::PassNotTcpUdp);
    }
    translate_for_backend(data, data_end, &key, &flow).ok_or(Reason::PassTruncated)?;
    let hop_limit: *const u8 =
        ptr_at(data, data_end, IP6_HOP_LIMIT_OFF).ok_or(Reason::PassTruncated)?;
    let payload_len = load16(data, data_end, L3_OFF + 4).ok_or(Reason::PassTruncated)?;
    let error = Packet6 {
        l4_off: ICMP_OFF,
        proto: PROTO_ICMPV6,
        // SAFETY: bounds checked by ptr_at.
        hop_limit: unsafe { *hop_limit },
        payload_len: u16::from_be(payload_len),
        src_port_be: 0,
        dst_port_be: 0,
        l4_check_off: ICMP_CHECK_OFF,
        tcp_flags: 0,
    };
    let src = addr_at(data, data_end, IP6_SRC_OFF).ok_or(Reason::PassTruncated)?;
    let egress = forward::decide6(ctx, &error, &src, &flow.backend_ip);
    forward::route6(
        ctx,
        &egress,
        [
            Reason::IcmpToBackend,
            Reason::IcmpToBackend,
            Reason::IcmpToBackend,
        ],
    )
}

/// Gives the error the flow's backend as its destination and its quote the backend's address
/// and port as the reply's source (`key`: the flow, client → service), the quoted transport
/// checksum (when the quote holds it) and the ICMPv6 checksum updated.
#[inline(never)]
fn translate_for_backend(
    data: usize,
    data_end: usize,
    key: &FlowKey6,
    flow: &FlowValue6,
) -> Option<()> {
    let (service, service_port) = (&key.dst, key.dst_port_be);
    let (backend, backend_port) = (&flow.backend_ip, flow.backend_port_be);
    let mut icmp_check = load16(data, data_end, ICMP_CHECK_OFF)?;
    let quoted_check_off = QUOTED_L4_OFF + if key.proto == PROTO_TCP { 16 } else { 6 };
    if let Some(old_check) = load16(data, data_end, quoted_check_off) {
        let new_check = csum::update_l4(old_check, key.proto == PROTO_UDP, |check| {
            csum::replace16(
                csum::replace128(check, service, backend),
                service_port,
                backend_port,
            )
        });
        store16(data, data_end, quoted_check_off, new_check)?;
        icmp_check = csum::replace16(icmp_check, old_check, new_check);
    }
    // The quote's source and the error's destination (in the pseudo-header): both the
    // service's address, now the backend's.
    for off in [QUOTED_SRC_OFF, IP6_DST_OFF] {
        let at: *mut Addr6 = ptr_at(data, data_end, off)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *at = *backend };
        icmp_check = csum::replace128(icmp_check, service, backend);
    }
    store16(data, data_end, QUOTED_L4_OFF, backend_port)?;
    icmp_check = csum::replace16(icmp_check, service_port, backend_port);
    store16(data, data_end, ICMP_CHECK_OFF, icmp_check)
}
