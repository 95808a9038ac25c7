//! ICMP errors about balanced flows (destination unreachable, time exceeded, parameter
//! problem), translated so that they reach the socket they are about, and "fragmentation
//! needed" sent for a client's packet, or a task's datagram, too big to encapsulate. Without them path MTU discovery
//! breaks: a client whose packets are too big for the backend's path, or a backend whose
//! replies are too big for the client's, waits for an answer that never comes.
//!
//! An error quotes the packet it is about, as that packet was when the error was made:
//! - about a packet this node forwarded (client → backend, DNATed: from the backend, a router
//!   on its way, or this node's own stack), it goes to the client: the quoted destination
//!   becomes the address and port the client connected to (and the error's source too, when
//!   the backend itself sent it);
//! - about a reply the client got (service → client, reverse-NATed: from a router on the
//!   client's way), it is addressed to the service: it goes to the flow's backend, the quoted
//!   source becoming the backend's address and port, and the error's destination the backend.
//!
//! Through the mesh the error follows its flow: to the backend's node, encapsulated, or back to
//! the ingress node, which translates it. An error about no known flow passes untouched, and
//! ICMP that is not an error (echo) is never looked at. Checksums are updated incrementally:
//! the quoted IPv4 header's, the quoted TCP or UDP checksum when the quote holds it, and the
//! ICMP checksum over all of them (ICMP has no pseudo-header, so the error's own addresses
//! change only its IPv4 header checksum).
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT, xdp_action},
    helpers::generated::{
        bpf_ktime_get_coarse_ns, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{
    FLOW_SNAT, FlowKey, FlowValue, IcmpBucket, PROTO_UDP, Reason, ReverseValue, is_ipv6_node_key,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    conntrack, csum, decap, encap,
    forward::{self, Egress},
    maps::{FLOWS, ICMP_RATE, TX_VIA_TC},
    nat::{self, Side, load16, store16},
    parse::{ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, IcmpError, L3_OFF, PROTO_ICMP, Packet, ptr_at},
    reply, xmit,
};

/// What an ICMP error is about, by this node's tables.
pub enum About {
    /// A packet this node forwarded to a backend: the error goes to the client.
    Forwarded(ReverseValue),
    /// A reply the client got: the error goes to the flow's backend. The flow's key (client →
    /// service) and entry.
    Reply(FlowKey, FlowValue),
}

/// The flow `error` is about, if this node balanced it. Hairpin flows (`FLOW_SNAT`) are left
/// out: their packets carried another source than the one quoted.
#[inline(always)]
pub fn about(error: &IcmpError) -> Option<About> {
    let q = &error.quoted;
    // An error goes to the quoted packet's source; anything else is not about that packet.
    if error.dst_ip_be != q.src_ip_be {
        return None;
    }
    // The quote reversed: a forwarded packet's reply key, or a reply's flow key.
    let key = conntrack::reply_key_of(q);
    if let Some(reverse) = conntrack::reverse_lookup(&key) {
        return (reverse.client_ip_be == 0).then_some(About::Forwarded(reverse));
    }
    // SAFETY: copied out at once.
    let flow = unsafe { FLOWS.get(&key) }.copied()?;
    (flow.flags & FLOW_SNAT == 0).then_some(About::Reply(key, flow))
}

/// Rewrites the quoted packet's `side` end to `new_ip_be:new_port_be`, with the quoted IPv4
/// header checksum, the quoted TCP or UDP checksum if the quote holds it, and the ICMP checksum.
#[inline(always)]
fn rewrite_quoted(
    data: usize,
    data_end: usize,
    error: &IcmpError,
    side: Side,
    (new_ip_be, new_port_be): (u32, u16),
) -> Option<()> {
    let q = &error.quoted;
    // Offsets LLVM cannot reason about: it would drop bounds checks as implied by the parser's,
    // which the verifier cannot follow through the variable header lengths (see `nat`).
    let (quoted_off, quoted_l4_off) = (
        nat::opaque(error.quoted_off),
        nat::opaque(error.quoted_l4_off),
    );
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Dst => (
            quoted_off + 16,
            quoted_l4_off + 2,
            q.dst_ip_be,
            q.dst_port_be,
        ),
        Side::Src => (quoted_off + 12, quoted_l4_off, q.src_ip_be, q.src_port_be),
    };
    let icmp_check_off = nat::opaque(error.icmp_off) + 2;
    let mut icmp_check = load16(data, data_end, icmp_check_off)?;
    // The quoted IPv4 header: address and checksum.
    let ip_check_off = quoted_off + 10;
    let old_ip_check = load16(data, data_end, ip_check_off)?;
    let new_ip_check = csum::replace32(old_ip_check, old_ip, new_ip_be);
    let ip: *mut [u8; 4] = ptr_at(data, data_end, ip_off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *ip = new_ip_be.to_ne_bytes() };
    store16(data, data_end, ip_check_off, new_ip_check)?;
    store16(data, data_end, port_off, new_port_be)?;
    icmp_check = csum::replace32(icmp_check, old_ip, new_ip_be);
    icmp_check = csum::replace16(icmp_check, old_port, new_port_be);
    icmp_check = csum::replace16(icmp_check, old_ip_check, new_ip_check);
    // The quoted transport checksum, when the quote reaches it (UDP's always: it is in the 8
    // bytes; TCP's when more than 8 bytes are quoted, as the kernel's own errors do).
    let udp = q.proto == PROTO_UDP;
    let l4_check_off = quoted_l4_off + if udp { 6 } else { 16 };
    if l4_check_off + 2 <= error.l3_end
        && let Some(old_l4_check) = load16(data, data_end, l4_check_off)
    {
        let new_l4_check = csum::update_l4(old_l4_check, udp, |check| {
            csum::replace16(
                csum::replace32(check, old_ip, new_ip_be),
                old_port,
                new_port_be,
            )
        });
        store16(data, data_end, l4_check_off, new_l4_check)?;
        icmp_check = csum::replace16(icmp_check, old_l4_check, new_l4_check);
    }
    store16(data, data_end, icmp_check_off, icmp_check)
}

/// Translates an error about a forwarded packet for its client: the quoted destination (and
/// the error's source, if the backend sent it) becomes what the client connected to.
#[inline(always)]
pub fn translate_for_client(
    data: usize,
    data_end: usize,
    error: &IcmpError,
    reverse: &ReverseValue,
) -> Option<()> {
    rewrite_quoted(
        data,
        data_end,
        error,
        Side::Dst,
        (reverse.orig_ip_be, reverse.orig_port_be),
    )?;
    if error.src_ip_be == error.quoted.dst_ip_be {
        nat::rewrite_address_only(
            data,
            data_end,
            Side::Src,
            error.src_ip_be,
            reverse.orig_ip_be,
        )?;
    }
    Some(())
}

/// Translates an error about a reply for the flow's backend: the quoted source and the
/// error's destination become the backend.
#[inline(always)]
fn translate_for_backend(
    data: usize,
    data_end: usize,
    error: &IcmpError,
    flow: &FlowValue,
) -> Option<()> {
    rewrite_quoted(
        data,
        data_end,
        error,
        Side::Src,
        (flow.backend_ip_be, flow.backend_port_be),
    )?;
    nat::rewrite_address_only(
        data,
        data_end,
        Side::Dst,
        error.dst_ip_be,
        flow.backend_ip_be,
    )
}

/// An ICMP error XDP received from the wire (not over VXLAN). `None`: not about a flow this
/// node balanced; passed untouched by the caller.
#[inline(always)]
pub fn xdp_from_wire(ctx: &XdpContext, error: &IcmpError) -> Option<Result<(u32, Reason), Reason>> {
    Some(match about(error)? {
        About::Forwarded(reverse) => to_client(ctx, error, &reverse),
        About::Reply(key, flow) => to_backend(ctx, error, &key, &flow),
    })
}

/// Sends an error about a forwarded packet on to its client, translated, when XDP can send it
/// itself; otherwise it goes to the kernel untouched, and the TC egress program translates it
/// on its way out (`icmp_stack`), as replies are.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    error: &IcmpError,
    reverse: &ReverseValue,
) -> Result<(u32, Reason), Reason> {
    let pkt = error.as_packet();
    let src_ip_be = if error.src_ip_be == error.quoted.dst_ip_be {
        reverse.orig_ip_be
    } else {
        error.src_ip_be
    };
    let egress = forward::decide(ctx, &pkt, src_ip_be, error.dst_ip_be).without_peer();
    let hop = match egress {
        Egress::Tx(ref hop) | Egress::Redirect(ref hop) => hop,
        Egress::Stack => return Ok((xdp_action::XDP_PASS, Reason::IcmpStack)),
    };
    translate_for_client(ctx.data(), ctx.data_end(), error, reverse)
        .ok_or(Reason::PassTruncated)?;
    forward::prepare_l2(ctx, hop).ok_or(Reason::PassTruncated)?;
    Ok((forward::send(ctx, &egress), Reason::IcmpToClient))
}

/// Sends an error about a reply to the flow's backend, translated: routed to a backend on this
/// node, encapsulated to the node of one on another.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    error: &IcmpError,
    key: &FlowKey,
    flow: &FlowValue,
) -> Result<(u32, Reason), Reason> {
    // Routed on by this node: the kernel answers an expiring one.
    if error.ttl <= 1 {
        return Err(Reason::PassNotTcpUdp);
    }
    translate_for_backend(ctx.data(), ctx.data_end(), error, flow).ok_or(Reason::PassTruncated)?;
    let outcome = if flow.node_ip_be != 0 {
        encap::xdp_to_node(
            ctx,
            encap::source_port(key),
            flow.node_ip_be,
            None,
            false,
            None,
        )
    } else {
        let mut pkt = error.as_packet();
        pkt.dst_ip_be = flow.backend_ip_be;
        forward::to_backend(ctx, &pkt, flow.backend_ip_be, 0)
    };
    sent_as(outcome, Reason::IcmpToBackend)
}

/// `outcome` of a send, counted as `reason` unless it was dropped (then under its own reason).
#[inline(always)]
fn sent_as(
    outcome: Result<(u32, Reason), Reason>,
    reason: Reason,
) -> Result<(u32, Reason), Reason> {
    match outcome {
        Ok((action, _)) if action != xdp_action::XDP_DROP => Ok((action, reason)),
        other => other,
    }
}

/// An ICMP error decapsulated from `node_ip_be`: about a flow this node balanced whose backend
/// is on that node (translated and sent to the client), or translated by its ingress node for
/// a backend on this one (delivered). Anything else is dropped, as every other inner packet is.
#[inline(always)]
pub fn xdp_from_node(
    ctx: &XdpContext,
    error: &IcmpError,
    node_ip_be: u32,
) -> Result<(u32, Reason), Reason> {
    let drop = |reason| Ok((xdp_action::XDP_DROP, reason));
    // A remote backend's refusal (its host, or a router before it), encapsulated back here by
    // its node: the flow forgotten, as for a local backend's.
    if conntrack::note_unreachable(error) {
        return drop(Reason::DropBackendUnreachable);
    }
    if let Some(About::Forwarded(reverse)) = about(error) {
        if !decap::hosts_backend_of(node_ip_be, reverse.backend_id) {
            return drop(Reason::DropVxlanWrongNode);
        }
        return to_client(ctx, error, &reverse);
    }
    let q = &error.quoted;
    let for_backend = Packet {
        dst_ip_be: q.src_ip_be,
        dst_port_be: q.src_port_be,
        proto: q.proto,
        ..error.as_packet()
    };
    if error.dst_ip_be != q.src_ip_be || !decap::is_local_backend(&for_backend) {
        return drop(Reason::DropVxlanNotLocalBackend);
    }
    sent_as(
        forward::deliver(ctx, &error.as_packet()),
        Reason::IcmpToBackend,
    )
}

/// The largest IPv4 header a "fragmentation needed" quotes: one without options. A packet with
/// options too big to encapsulate is dropped without an error (rare: the kernel's own TCP and
/// UDP send none).
const QUOTED_LEN: usize = Ipv4Hdr::LEN + 8;
/// The error: IPv4 header, ICMP header, the quoted header and 8 bytes.
const ERROR_L3_LEN: usize = Ipv4Hdr::LEN + 8 + QUOTED_LEN;
/// The ICMP message (header and quote), which its checksum covers.
const ICMP_LEN: usize = 8 + QUOTED_LEN;
/// The IPv4 DF flag.
const DONT_FRAGMENT: u16 = 0x4000;
/// Rate limit of the errors sent to one source, as the kernel's (`net.ipv4.icmp_ratelimit`,
/// 1 s, and its token bucket's burst of 6): one per second, six at once.
const RATE_INTERVAL_NS: u64 = 1_000_000_000;
const RATE_BURST_NS: u64 = 6 * RATE_INTERVAL_NS;
/// IP precedence "internetwork control", which the kernel gives its ICMP errors.
const TOS_INTERNET_CONTROL: u8 = 0xc0;

/// Whether an error may be sent to `ip_be` now (and takes a token if so); an IPv6 address is
/// taken folded to 32 bits.
#[inline(always)]
pub fn rate_allows(ip_be: u32) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a per-source entry; a race between CPUs costs at most one error more.
    let bucket = match unsafe { ICMP_RATE.get(&ip_be) }.copied() {
        Some(bucket) => bucket,
        None => IcmpBucket {
            tokens_ns: RATE_BURST_NS,
            last_ns: now,
        },
    };
    let tokens = (bucket.tokens_ns + now.saturating_sub(bucket.last_ns)).min(RATE_BURST_NS);
    let allowed = tokens >= RATE_INTERVAL_NS;
    let fresh = IcmpBucket {
        tokens_ns: if allowed {
            tokens - RATE_INTERVAL_NS
        } else {
            tokens
        },
        last_ns: now,
    };
    let _ = ICMP_RATE.insert(&ip_be, &fresh, 0);
    allowed
}

/// Turns a client's packet that is too big to encapsulate (already DNATed: `pkt` is how the
/// client sent it) into an ICMP "fragmentation needed" back to the client, with `mtu` as the
/// next-hop MTU, from the address the client reached (or this node's underlay address for a
/// VIP), and sends it back where the packet came from (its source MAC, out of the interface it
/// came in on: the client or the router before it). Returns the XDP action, counted as
/// `frag_needed_sent`; 0: no error is sent (no DF, IP options, rate-limited), and the caller
/// drops the packet as before.
///
/// In a frame of its own (a BPF-to-BPF call, made only for a packet too big): its locals would
/// not fit on the XDP program's main frame, on the path of every encapsulated packet.
#[inline(never)]
pub fn frag_needed(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> u32 {
    frag_needed_inner(ctx, pkt, mtu).unwrap_or(0)
}

#[inline(always)]
fn frag_needed_inner(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Option<u32> {
    // Few values live across the helper calls below (each one spills what is): what is needed
    // after moving the packet's head is read back from the packet.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let frags = load16(data, data_end, L3_OFF + 6)?;
    if u16::from_be(frags) & DONT_FRAGMENT == 0 || pkt.l4_off != L3_OFF + Ipv4Hdr::LEN {
        return None;
    }
    if !rate_allows(pkt.src_ip_be) {
        return None;
    }
    // The quote as the client sent it: its destination back to the service, with the checksums
    // (the IPv4 header's; UDP's, which the 8 bytes hold).
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let flow_dst = load_address(data, data_end, L3_OFF + 16)?;
    let flow_port = load16(data, data_end, pkt.l4_off + 2)?;
    nat::rewrite_address_only(data, data_end, Side::Dst, flow_dst, pkt.dst_ip_be)?;
    store16(data, data_end, pkt.l4_off + 2, pkt.dst_port_be)?;
    if pkt.proto == PROTO_UDP {
        let check = load16(data, data_end, pkt.l4_check_off)?;
        let check = csum::update_l4(check, true, |check| {
            csum::replace16(
                csum::replace32(check, flow_dst, pkt.dst_ip_be),
                flow_port,
                pkt.dst_port_be,
            )
        });
        store16(data, data_end, pkt.l4_check_off, check)?;
    }
    // Room for the error's IPv4 and ICMP headers in front of the quoted header, which stays
    // where it is; then the frame ends after the quote.
    let grow = Ipv4Hdr::LEN + 8;
    // SAFETY: the helper only moves ctx->data; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -(grow as i32)) } != 0 {
        return None;
    }
    let len = ctx.data_end() - ctx.data();
    let cut = len.checked_sub(L3_OFF + ERROR_L3_LEN)?;
    // SAFETY: as above.
    if cut > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx.cast(), -(cut as i32)) } != 0 {
        return None;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // The frame now: room (`grow` bytes), the client's Ethernet header, the quote.
    let old_eth: *const EthHdr = ptr_at(data, data_end, grow)?;
    let quoted: *const Ipv4Hdr = ptr_at(data, data_end, L3_OFF + grow)?;
    let eth: *mut EthHdr = ptr_at(data, data_end, 0)?;
    // SAFETY: bounds checked by ptr_at; the two headers do not overlap.
    let (client, service) = unsafe {
        (*eth).dst_addr = (*old_eth).src_addr;
        (*eth).src_addr = (*old_eth).dst_addr;
        (*eth).ether_type = 0x0800u16.to_be();
        ((*quoted).src_addr, (*quoted).dst_addr)
    };
    let service = u32::from_ne_bytes(service);
    // On an IPv6 underlay this node has no underlay IPv4 address (its key stands in for one):
    // the service address then, VIP or not.
    let local_ip_be = encap::mesh()?.local_ip_be;
    let src_ip_be = if reply::is_host_addr(service) || is_ipv6_node_key(local_ip_be) {
        service
    } else {
        local_ip_be
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, L3_OFF)?;
    let icmp: *mut [u8; ICMP_LEN] = ptr_at(data, data_end, L3_OFF + Ipv4Hdr::LEN)?;
    // SAFETY: bounds checked by ptr_at; the headers are plain bytes (alignment 1). Written in
    // place, field by field: a header built on the stack first would not fit this frame.
    unsafe {
        let ip = &mut *ip;
        ip.vihl = 0x45;
        ip.tos = TOS_INTERNET_CONTROL;
        ip.tot_len = (ERROR_L3_LEN as u16).to_be_bytes();
        ip.id = [0; 2];
        ip.frags = [0; 2];
        ip.ttl = 64;
        ip.proto = PROTO_ICMP;
        ip.check = [0; 2];
        ip.src_addr = src_ip_be.to_ne_bytes();
        ip.dst_addr = client;
        ip.check = csum::ipv4_header(ip).to_ne_bytes();
        let message = &mut *icmp;
        let mtu = mtu.to_be_bytes();
        message[..8].copy_from_slice(&[
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            0,
            0,
            0,
            0,
            mtu[0],
            mtu[1],
        ]);
        let check = checksum(message);
        message[2..4].copy_from_slice(&check.to_ne_bytes());
    }
    Some(back_out(ctx))
}

/// Sends an error this node made of a packet back out of the interface the packet came in on
/// (its MACs already swapped), through TC where XDP_TX cannot deliver. Returns the action.
#[inline(always)]
pub fn back_out(ctx: &XdpContext) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: only presence is read.
    if unsafe { TX_VIA_TC.get(&ingress) }.is_some()
        && let Some(action) = xmit::through_tc(ctx, ingress, false)
    {
        return action;
    }
    xdp_action::XDP_TX
}

#[inline(always)]
fn load_address(data: usize, data_end: usize, off: usize) -> Option<u32> {
    let p: *const [u8; 4] = ptr_at(data, data_end, off)?;
    // SAFETY: bounds checked by ptr_at.
    Some(u32::from_ne_bytes(unsafe { *p }))
}

/// The Internet checksum of an ICMP message whose checksum field is zero.
#[inline(always)]
fn checksum(message: &[u8; ICMP_LEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < ICMP_LEN {
        sum += u32::from(u16::from_ne_bytes([message[i], message[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The IPv4 option the TC error carries (RFC 4727's experiment number 30, not copied, class 0:
/// receivers ignore it), whose two data bytes balance the ICMP checksum; see [`tc_frag_needed`].
const OPTION_EXPERIMENT: u8 = 0x1e;
/// The TC error's IPv4 header: 20 bytes and the 4-byte option.
const TC_ERROR_IP_LEN: usize = Ipv4Hdr::LEN + 4;
/// The TC error's IPv4 packet: its header, the ICMP header and the quote.
const TC_ERROR_L3_LEN: usize = TC_ERROR_IP_LEN + ICMP_LEN;
/// Offset of the UDP checksum field in a UDP header.
const UDP_CHECK_OFF: usize = 6;

/// Turns a task's UDP datagram that is too big to encapsulate back to its ingress node (`pkt`,
/// DF set, no IP options, not GSO) into an ICMP "fragmentation needed" to the task, next-hop
/// MTU `mtu`, from this node's underlay address, and redirects it to the task (TC egress, on
/// the task's node). The task's kernel then fragments its later datagrams to that size, and
/// those cross the tunnel. Returns whether it was sent (counted `frag_needed_sent` by the
/// caller); if not (no DF, options, rate-limited, no neighbour for the task), the caller drops
/// the datagram.
///
/// The skb becomes the error: the datagram's checksum may be left for the kernel to finish
/// (CHECKSUM_PARTIAL: a sum over everything from the UDP header's offset, stored 6 bytes
/// further), a state TC can neither read nor clear. So the error is laid out for both cases:
/// the 4-byte option sits where the UDP header began, putting the ICMP checksum field where
/// the UDP one was. The field holds the right checksum; the option's data make its own sum the
/// complement of that checksum, so a sum finished from the option on gives the same value. A
/// kernel that leaves the checksum unfinished (delivery to a local task) also takes the packet
/// without checking it.
///
/// In a frame of its own: see [`frag_needed`].
#[inline(never)]
pub fn tc_frag_needed(ctx: &mut TcContext, pkt: &Packet, mtu: u16) -> bool {
    tc_frag_needed_inner(ctx, pkt, mtu).is_some()
}

#[inline(always)]
fn tc_frag_needed_inner(ctx: &mut TcContext, pkt: &Packet, mtu: u16) -> Option<()> {
    let frags: u16 = ctx.load(L3_OFF + 6).ok()?;
    if pkt.proto != PROTO_UDP
        || u16::from_be(frags) & DONT_FRAGMENT == 0
        || pkt.l4_off != L3_OFF + Ipv4Hdr::LEN
    {
        return None;
    }
    let node_ip_be = encap::mesh()?.local_ip_be;
    // SAFETY: the context points at the program's __sk_buff for the whole run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (rc, hop) = forward::fib_lookup_raw(
        ctx.skb.skb.cast(),
        ifindex,
        PROTO_ICMP,
        0,
        node_ip_be,
        pkt.src_ip_be,
    );
    if rc != BPF_FIB_LKUP_RET_SUCCESS || !rate_allows(pkt.src_ip_be) {
        return None;
    }
    // Built whole here (the checksums need it), the quote loaded straight into it; the frame's
    // stack is short (it adds to the TC program's 512 bytes), so nothing is copied twice.
    let mut error = [0u8; TC_ERROR_L3_LEN];
    let quote = error[TC_ERROR_IP_LEN + 8..].as_mut_ptr();
    // SAFETY: the helper writes exactly QUOTED_LEN bytes, the length of the slice at `quote`
    // (a constant length: aya's `load_bytes` clamps it, which the verifier refuses here).
    if unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            L3_OFF as u32,
            quote.cast(),
            QUOTED_LEN as u32,
        )
    } != 0
    {
        return None;
    }
    // SAFETY: plain helper call; the skb is shortened to the error's length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), (L3_OFF + TC_ERROR_L3_LEN) as u32, 0) } != 0
    {
        return None;
    }
    let mtu = mtu.to_be_bytes();
    let src = node_ip_be.to_ne_bytes();
    let dst = pkt.src_ip_be.to_ne_bytes();
    let tot_len = (TC_ERROR_L3_LEN as u16).to_be_bytes();
    error[..TC_ERROR_IP_LEN].copy_from_slice(&[
        0x46,
        TOS_INTERNET_CONTROL,
        tot_len[0],
        tot_len[1],
        0,
        0,
        0,
        0,
        64,
        PROTO_ICMP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        OPTION_EXPERIMENT,
        4,
        0,
        0,
    ]);
    let icmp = TC_ERROR_IP_LEN;
    error[icmp..icmp + 8].copy_from_slice(&[
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        0,
        0,
        0,
        0,
        mtu[0],
        mtu[1],
    ]);
    let check = !sum16(&error[icmp..]);
    error[icmp + 2..icmp + 4].copy_from_slice(&check.to_ne_bytes());
    // The option's words: its kind and length, then what makes their sum !check.
    let head = u16::from_ne_bytes([OPTION_EXPERIMENT, 4]);
    let balance = !fold_add(u32::from(check), u32::from(head));
    error[Ipv4Hdr::LEN + 2..Ipv4Hdr::LEN + 4].copy_from_slice(&balance.to_ne_bytes());
    let ip_check = !sum16(&error[..TC_ERROR_IP_LEN]);
    error[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    // Where the finished sum would land: the ICMP checksum, as laid out above.
    const _: () = assert!(TC_ERROR_IP_LEN - Ipv4Hdr::LEN + 2 == UDP_CHECK_OFF);
    // The Ethernet type stays IPv4.
    ctx.store(0, &hop.dmac, 0).ok()?;
    ctx.store(6, &hop.smac, 0).ok()?;
    ctx.store(L3_OFF, &error, 0).ok()?;
    // SAFETY: plain helper call.
    (unsafe { bpf_redirect(hop.ifindex, 0) } as i32 == TC_ACT_REDIRECT).then_some(())
}

/// The one's-complement sum of `bytes` (an even count) as 16-bit words, folded.
#[inline(always)]
fn sum16(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    fold_add(sum, 0)
}

/// `a + b` in one's-complement arithmetic, folded to 16 bits.
#[inline(always)]
fn fold_add(a: u32, b: u32) -> u16 {
    let mut sum = a + b;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
