//! VXLAN encapsulation (RFC 7348) towards other nodes: of DNATed client packets in XDP on the
//! ingress node, and of backend replies in TC on the backend's node.
//!
//! The frame sent is: outer Ethernet (next hop's MACs), outer IPv4 (this node → the other node,
//! TTL 64, DF, no options), UDP (source port from the flow hash so the underlay can spread flows,
//! destination the overlay port, checksum 0 as RFC 7348 allows for IPv4), VXLAN (I flag, VNI),
//! then the inner Ethernet frame. The inner MACs repeat the outer ones: the receiving node
//! rewrites them anyway, and a Linux VXLAN device given its host's underlay MAC accepts them.
//!
//! On an IPv6 underlay (a node key, `lb_common::is_ipv6_node_key`) the outer header is IPv6
//! (hop limit 64, the flow's hash in the flow label) and the UDP checksum is 0 as well, as RFC
//! 6935 allows for tunnels (a Linux VXLAN peer takes it with `udp6zerocsumrx`): 70 bytes in all.
//! XDP and TC encapsulate over IPv6 in programs of their own (`lb_xdp6_encap`, `lb_tc_encap6`,
//! through `ENCAP_HANDOFF` and `TC_ENCAP_HANDOFF`).
use core::ptr;

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    FlowKey, FlowKey6, MeshConfig, PROTO_TCP, PROTO_UDP, Reason, VXLAN_OVERHEAD, VXLAN6_OVERHEAD,
    is_ipv6_node_key,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    csum,
    forward::{self, Egress, NextHop},
    icmp, icmp6,
    maps::{
        ENCAP_HANDOFF, IPV6_ENCAP_PROGRAM, MESH, MESH6, NODE_ADDRS6, TC_ENCAP_HANDOFF,
        TC_ENCAP6_PROGRAM,
    },
    mss, nat,
    parse::{self, Packet, ptr_at},
    parse6::{self, Packet6},
    stats,
};

/// VXLAN flags byte with the I bit: the VNI is valid.
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// Outer TTL: the underlay is a routed network of its own, independent of the inner TTL.
const OUTER_TTL: u8 = 64;
/// UDP source ports are taken from the dynamic range 49152–65535 (RFC 6335).
const SOURCE_PORT_BASE: u16 = 0xc000;
const SOURCE_PORT_MASK: u32 = 0x3fff;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// The IPv4 DF flag in the flags and fragment offset field.
const DONT_FRAGMENT: u16 = 0x4000;

/// The VXLAN header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    /// The flags byte and 3 reserved bytes, as one array: initialised alone, the 3 bytes cost
    /// a call to `memset`.
    pub flags: [u8; 4],
    /// VNI, big-endian, 24 bits.
    pub vni: [u8; 3],
    pub _reserved2: u8,
}

/// Everything encapsulation puts in front of the inner packet's IPv4 header, written in one go:
/// the outer headers and the whole inner Ethernet header (TC inserts its room after the
/// original Ethernet header, so the inner one must be written in full).
#[repr(C)]
struct EncapHeaders {
    outer_eth: EthHdr,
    outer_ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}
const _: () =
    assert!(core::mem::size_of::<EncapHeaders>() == VXLAN_OVERHEAD as usize + EthHdr::LEN);

/// [`EncapHeaders`] over an IPv6 underlay.
#[repr(C)]
struct EncapHeaders6 {
    outer_eth: EthHdr,
    outer_ip: Ipv6Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}
const _: () =
    assert!(core::mem::size_of::<EncapHeaders6>() == VXLAN6_OVERHEAD as usize + EthHdr::LEN);

/// The smallest path MTU a "fragmentation needed" names: IPv4's minimum (RFC 791: every host
/// takes 576-byte datagrams); an underlay narrower than that plus the overhead gets no error.
const MIN_PATH_MTU: u16 = 576;

/// IPv6's minimum MTU (RFC 8200): an underlay narrower than that plus the overhead gets no
/// "packet too big" (no IPv6 host could go below it).
const MIN_IPV6_MTU: u16 = 1280;

/// Bytes the outer IPv4 header, UDP and VXLAN add to the inner frame's length.
const OUTER_L3_OVERHEAD: usize = 20 + 8 + 8;
/// The same over an IPv6 underlay: the outer IPv6 length the FIB checks.
const OUTER6_L3_OVERHEAD: usize = 40 + 8 + 8;

/// This node's overlay settings, if it is in the node table.
#[inline(always)]
pub fn mesh() -> Option<&'static MeshConfig> {
    MESH.get(0).filter(|mesh| mesh.local_ip_be != 0)
}

/// A well-spread 32-bit hash of a flow's 5-tuple (the "lowbias32" finaliser).
#[inline(always)]
fn flow_hash(key: &FlowKey) -> u32 {
    let ports = (u32::from(key.src_port_be) << 16) | u32::from(key.dst_port_be);
    let mut h = key.src_ip_be ^ key.dst_ip_be.rotate_left(8) ^ ports ^ u32::from(key.proto);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The outer UDP source port of a flow: stable for the flow, spread across flows.
#[inline(always)]
pub fn source_port(key: &FlowKey) -> u16 {
    SOURCE_PORT_BASE | (flow_hash(key) & SOURCE_PORT_MASK) as u16
}

/// The outer UDP source port of an IPv6 flow, as [`source_port`].
#[inline(always)]
pub fn source_port6(key: &FlowKey6) -> u16 {
    let word = |addr: &[u8; 16], at: usize| {
        u32::from_ne_bytes([addr[at], addr[at + 1], addr[at + 2], addr[at + 3]])
    };
    let folded = FlowKey::new(
        word(&key.src, 0) ^ word(&key.src, 4) ^ word(&key.src, 8) ^ word(&key.src, 12),
        word(&key.dst, 0) ^ word(&key.dst, 4) ^ word(&key.dst, 8) ^ word(&key.dst, 12),
        key.src_port_be,
        key.dst_port_be,
        key.proto,
    );
    source_port(&folded)
}

/// What encapsulation needs of the inner packet, of either family: its transport header (for
/// MSS clamping and GSO segment sizes) and its Ethernet type.
#[derive(Clone, Copy)]
pub struct Inner {
    pub l4_off: usize,
    pub l4_check_off: usize,
    pub proto: u8,
    pub tcp_flags: u8,
    /// The inner frame's Ethernet type, as the frame carries it.
    pub ether_type: u16,
    /// What an MSS leaves out of the underlay's MTU: the encapsulation (50 bytes over IPv4, 70
    /// over IPv6) and the inner IP and TCP headers without options or extensions (40 for IPv4,
    /// 60 for IPv6).
    pub mss_overhead: u16,
}

impl Inner {
    #[inline(always)]
    pub fn of(pkt: &Packet) -> Inner {
        Inner {
            l4_off: pkt.l4_off,
            l4_check_off: pkt.l4_check_off,
            proto: pkt.proto,
            tcp_flags: pkt.tcp_flags,
            ether_type: ETH_P_IP_BE,
            mss_overhead: VXLAN_OVERHEAD as u16 + 40,
        }
    }

    #[inline(always)]
    pub fn of6(pkt: &Packet6) -> Inner {
        Inner {
            l4_off: pkt.l4_off,
            l4_check_off: pkt.l4_check_off,
            proto: pkt.proto,
            tcp_flags: pkt.tcp_flags,
            ether_type: ETH_P_IPV6_BE,
            mss_overhead: VXLAN_OVERHEAD as u16 + 60,
        }
    }

    /// The same packet encapsulated over an IPv6 underlay: 20 bytes more of overhead.
    #[inline(always)]
    pub fn over_ipv6(self) -> Inner {
        Inner {
            mss_overhead: self.mss_overhead + (VXLAN6_OVERHEAD - VXLAN_OVERHEAD) as u16,
            ..self
        }
    }
}

/// Builds the headers for an inner frame of `inner_len` bytes (Ethernet included) whose
/// Ethernet type is `inner_ether_type`.
#[inline(always)]
fn headers(
    mesh: &MeshConfig,
    node_ip_be: u32,
    hop: &NextHop,
    src_port: u16,
    inner_len: usize,
    inner_ether_type: u16,
) -> EncapHeaders {
    let (ip_len, udp_len) = outer_lengths(inner_len);
    EncapHeaders {
        outer_eth: eth(hop, ETH_P_IP_BE),
        outer_ip: outer_ip(mesh, node_ip_be, ip_len),
        udp: outer_udp(mesh, src_port, udp_len),
        vxlan: vxlan(mesh),
        inner_eth: eth(hop, inner_ether_type),
    }
}

/// The outer IPv4 and UDP lengths for an inner frame of `inner_len` bytes. A GSO packet may
/// not fit the 16-bit lengths: 0 then, the kernel's own convention for a GSO packet beyond
/// 64 KiB (`iph_totlen`). Segmentation writes each segment's lengths.
#[inline(always)]
fn outer_lengths(inner_len: usize) -> (u16, u16) {
    match u16::try_from(OUTER_L3_OVERHEAD + inner_len) {
        Ok(ip_len) => (ip_len, ip_len - 20),
        Err(_) => (0, 0),
    }
}

/// The outer IPv4 header, this node → `node_ip_be`, checksum included.
#[inline(always)]
fn outer_ip(mesh: &MeshConfig, node_ip_be: u32, ip_len: u16) -> Ipv4Hdr {
    let mut outer_ip = Ipv4Hdr {
        vihl: 0x45,
        tos: 0,
        tot_len: ip_len.to_be_bytes(),
        // DF with a constant ID (RFC 6864: an atomic datagram). The packet was made to fit the
        // underlay here; a narrower hop must drop it (and say so) rather than fragment it, whose
        // fragments, all of ID 0, would be reassembled with other packets' fragments.
        id: [0; 2],
        frags: DONT_FRAGMENT.to_be_bytes(),
        ttl: OUTER_TTL,
        proto: PROTO_UDP,
        check: [0; 2],
        src_addr: mesh.local_ip_be.to_ne_bytes(),
        dst_addr: node_ip_be.to_ne_bytes(),
    };
    outer_ip.check = csum::ipv4_header(&outer_ip).to_ne_bytes();
    outer_ip
}

/// The outer UDP header: checksum 0, as RFC 7348 allows over IPv4 and RFC 6935 over IPv6.
#[inline(always)]
fn outer_udp(mesh: &MeshConfig, src_port: u16, udp_len: u16) -> UdpHdr {
    UdpHdr {
        src: src_port.to_be_bytes(),
        dst: mesh.vxlan_port_be.to_ne_bytes(),
        len: udp_len.to_be_bytes(),
        check: [0; 2],
    }
}

#[inline(always)]
fn vxlan(mesh: &MeshConfig) -> VxlanHdr {
    let vni = mesh.vni.to_be_bytes();
    VxlanHdr {
        flags: [VXLAN_FLAG_VNI, 0, 0, 0],
        vni: [vni[1], vni[2], vni[3]],
        _reserved2: 0,
    }
}

#[inline(always)]
fn eth(hop: &NextHop, ether_type: u16) -> EthHdr {
    EthHdr {
        dst_addr: hop.dmac,
        src_addr: hop.smac,
        ether_type,
    }
}

/// How a packet of `outer_len` bytes (outer IPv4 total length) reaches `node_ip_be`, or the
/// reason it cannot, with the underlay's MTU when it is too big (else 0). XDP cannot resolve
/// neighbours or fragment, so both are drops.
#[inline(always)]
fn route_to_node(
    ctx: &XdpContext,
    mesh: &MeshConfig,
    node_ip_be: u32,
    outer_len: u16,
) -> Result<Egress, (Reason, u16)> {
    let ingress = ctx.ingress_ifindex() as u32;
    let (rc, hop) = forward::fib_lookup_cached(
        ctx.ctx.cast(),
        ingress,
        PROTO_UDP,
        outer_len,
        mesh.local_ip_be,
        node_ip_be,
    );
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS if hop.ifindex == ingress => Ok(Egress::Tx(hop)),
        // Not into a bridge port's other end: nodes are reached as before.
        BPF_FIB_LKUP_RET_SUCCESS
            if hop.xmit & forward::XMIT_REDIRECT != 0 && hop.xmit & forward::XMIT_PEER == 0 =>
        {
            Ok(Egress::Redirect(hop))
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err((Reason::DropEncapMtu, hop.mtu)),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err((Reason::DropEncapNoNeigh, 0)),
        _ => Err((Reason::DropEncapNoRoute, 0)),
    }
}

/// Encapsulates a DNATed client packet to the node that hosts its backend and sends it. The
/// inner TTL drops by one, as on any router. `Ok` carries the action and its reason; a packet
/// that cannot be sent is dropped (`Ok((XDP_DROP, reason))`): passing it to the kernel would
/// deliver a DNATed packet to the wrong place. `inner`: the packet as parsed (its offsets hold
/// after the DNAT), for MSS clamping (`mss`) and, when `from_client` (its source is still the
/// client's), for a packet too big once encapsulated, which is answered with an ICMP
/// "fragmentation needed" (`icmp::frag_needed`) when it can be. To a node of an IPv6 underlay
/// the packet goes through `lb_xdp6_encap`, which counts it as `counted_as`'s (backend, new
/// flow) once sent; the caller counts it otherwise.
#[inline(always)]
pub fn xdp_to_node(
    ctx: &XdpContext,
    src_port: u16,
    node_ip_be: u32,
    inner: Option<&Packet>,
    from_client: bool,
    counted_as: Option<(u32, bool)>,
) -> Result<(u32, Reason), Reason> {
    if is_ipv6_node_key(node_ip_be) {
        return xdp_to_node_over_ipv6(ctx, src_port, node_ip_be, inner, from_client, counted_as);
    }
    let drop = |reason| Ok((xdp_action::XDP_DROP, reason));
    let (mesh, inner_len, outer_len) = match xdp_lengths(ctx) {
        Ok(found) => found,
        Err(reason) => return drop(reason),
    };
    let egress = match route_to_node(ctx, mesh, node_ip_be, outer_len) {
        Ok(egress) => egress,
        Err((Reason::DropEncapMtu, mtu)) => {
            let fits = mtu.saturating_sub(VXLAN_OVERHEAD as u16);
            if let Some(client) = inner
                && from_client
                && fits >= MIN_PATH_MTU
            {
                let action = icmp::frag_needed(ctx, client, fits);
                if action != 0 {
                    return Ok((action, Reason::FragNeededSent));
                }
            }
            return drop(Reason::DropEncapMtu);
        }
        Err((reason, _)) => return drop(reason),
    };
    let (hop, reason) = match egress {
        Egress::Tx(ref hop) => (hop, Reason::ForwardEncapTx),
        Egress::Redirect(ref hop) => (hop, Reason::ForwardEncapRedirect),
        Egress::Stack => return drop(Reason::DropEncapNoRoute),
    };
    if let Some(pkt) = inner {
        mss::xdp_clamp(
            ctx.data(),
            ctx.data_end(),
            &Inner::of(pkt),
            hop.mtu,
            outer_len,
        );
    }
    // The inner packet is routed by this node (the caller made sure its TTL is above 1).
    forward::decrement_ttl(ctx.data(), ctx.data_end()).ok_or(Reason::PassTruncated)?;
    let encap = headers(mesh, node_ip_be, hop, src_port, inner_len, ETH_P_IP_BE);
    let Some(at) = make_room(ctx) else {
        return drop(Reason::DropEncapNoRoute);
    };
    // SAFETY: bounds checked by `make_room`; packet data need not be aligned.
    unsafe { ptr::write_unaligned(at, encap) };
    Ok((forward::send(ctx, &egress), reason))
}

/// This node's overlay settings, and the frame's length and its outer IPv4 length once
/// encapsulated; `Err`: why it cannot be.
#[inline(always)]
fn xdp_lengths(ctx: &XdpContext) -> Result<(&'static MeshConfig, usize, u16), Reason> {
    let mesh = mesh().ok_or(Reason::DropMeshUnconfigured)?;
    let inner_len = ctx.data_end() - ctx.data();
    let outer_len =
        u16::try_from(OUTER_L3_OVERHEAD + inner_len).map_err(|_| Reason::DropEncapMtu)?;
    Ok((mesh, inner_len, outer_len))
}

/// Room in front of the frame for the encapsulation's headers, bounds checked; `None` if the
/// driver has no headroom for them.
#[inline(always)]
fn make_room(ctx: &XdpContext) -> Option<*mut EncapHeaders> {
    // SAFETY: the helper only moves ctx->data; the pointer is derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -(VXLAN_OVERHEAD as i32)) } != 0 {
        return None;
    }
    ptr_at(ctx.data(), ctx.data_end(), 0)
}

/// The largest transport offset `lb_xdp6_encap` takes from its handoff: Ethernet, IPv6 and
/// four extension headers of at most 2,048 bytes each fit.
const MAX_HANDOFF_OFF: u16 = 0x3fff;

/// `Handoff::inner_family` of an IPv4 inner packet (anything else: IPv6).
const HANDOFF_INNER_IPV4: u8 = 4;

/// What the XDP programs hand to `lb_xdp6_encap` with a DNATed packet it encapsulates
/// (`ENCAP_HANDOFF`): an IPv6 packet from `lb_xdp6` (over either underlay), or an IPv4 one
/// from `lb_xdp` to a node of an IPv6 underlay.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Handoff {
    pub node_ip_be: u32,
    /// The flow's backend, counted once the packet is sent (when `count` says so).
    pub backend_id: u32,
    /// An IPv4 client's packet: the service address and port it was sent to, for the
    /// "fragmentation needed" that answers one too big (0: none is sent).
    pub service_ip_be: u32,
    /// The same of an IPv6 client's packet (`service6`, for a "packet too big"), or of an IPv4
    /// one.
    pub service_port_be: u16,
    pub src_port: u16,
    pub l4_off: u16,
    pub l4_check_off: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// 0: the caller counted the packet; 1: an established flow's packet; 2: a new flow's.
    pub count: u8,
    /// `HANDOFF_INNER_IPV4`, or 6.
    pub inner_family: u8,
    pub service6: [u8; 16],
}

/// [`xdp_to_node`] for a node of an IPv6 underlay: the packet is handed to `lb_xdp6_encap`,
/// which sends it and, with `counted_as` (backend, new flow), counts it. Returns only if that
/// program is not there: the packet is dropped then.
#[inline(always)]
fn xdp_to_node_over_ipv6(
    ctx: &XdpContext,
    src_port: u16,
    node_ip_be: u32,
    inner: Option<&Packet>,
    from_client: bool,
    counted_as: Option<(u32, bool)>,
) -> Result<(u32, Reason), Reason> {
    let Some(handoff) = ENCAP_HANDOFF.get_ptr_mut(0) else {
        return Ok((xdp_action::XDP_DROP, Reason::DropEncapNoRoute));
    };
    let (backend_id, count) = match counted_as {
        Some((backend_id, new_flow)) => (backend_id, 1 + u8::from(new_flow)),
        None => (0, 0),
    };
    // SAFETY: this CPU's slot, read by the program tail-called next on this CPU; field by
    // field (the IPv4 program's stack is short too).
    unsafe {
        (*handoff).node_ip_be = node_ip_be;
        (*handoff).backend_id = backend_id;
        (*handoff).src_port = src_port;
        (*handoff).count = count;
        (*handoff).inner_family = HANDOFF_INNER_IPV4;
        (*handoff).service_ip_be = 0;
        (*handoff).service_port_be = 0;
        // No transport header to clamp: an ICMP error, a later fragment.
        (*handoff).proto = 0;
        (*handoff).tcp_flags = 0;
        (*handoff).l4_off = 0;
        (*handoff).l4_check_off = 0;
        if let Some(pkt) = inner {
            (*handoff).proto = pkt.proto;
            (*handoff).tcp_flags = pkt.tcp_flags;
            (*handoff).l4_off = pkt.l4_off as u16;
            (*handoff).l4_check_off = pkt.l4_check_off as u16;
            if from_client {
                (*handoff).service_ip_be = pkt.dst_ip_be;
                (*handoff).service_port_be = pkt.dst_port_be;
            }
        }
    }
    // SAFETY: the index names an XDP program, as the tail call requires.
    let _ = unsafe { IPV6_ENCAP_PROGRAM.tail_call(ctx, 0) };
    Ok((xdp_action::XDP_DROP, Reason::DropEncapNoRoute))
}

/// [`xdp_to_node`] for a DNATed IPv6 client packet (`pkt`, parsed before the DNAT; its offsets
/// hold) of the flow `key`, pinned to `backend_id`: handed to `lb_xdp6_encap`
/// ([`xdp_from_handoff`]), which sends it and counts it. Returns only if that program is not
/// there: the packet is dropped then.
#[inline(always)]
pub fn xdp6_to_node(
    ctx: &XdpContext,
    key: &FlowKey6,
    pkt: &Packet6,
    node_ip_be: u32,
    backend_id: u32,
    new_flow: bool,
) -> Result<(u32, Reason), Reason> {
    let Some(handoff) = ENCAP_HANDOFF.get_ptr_mut(0) else {
        return Ok((xdp_action::XDP_DROP, Reason::DropEncapNoRoute));
    };
    // SAFETY: this CPU's slot, read by the program tail-called next on this CPU. Field by
    // field: a whole value built first would take its bytes of `lb_xdp6`'s short stack.
    unsafe {
        (*handoff).node_ip_be = node_ip_be;
        (*handoff).backend_id = backend_id;
        (*handoff).src_port = source_port6(key);
        (*handoff).l4_off = pkt.l4_off as u16;
        (*handoff).l4_check_off = pkt.l4_check_off as u16;
        (*handoff).proto = pkt.proto;
        (*handoff).tcp_flags = pkt.tcp_flags;
        (*handoff).count = 1 + u8::from(new_flow);
        (*handoff).inner_family = 6;
        (*handoff).service_ip_be = 0;
        (*handoff).service_port_be = key.dst_port_be;
        (*handoff).service6 = key.dst;
    }
    // SAFETY: the index names an XDP program, as the tail call requires.
    let _ = unsafe { IPV6_ENCAP_PROGRAM.tail_call(ctx, 0) };
    Ok((xdp_action::XDP_DROP, Reason::DropEncapNoRoute))
}

/// `lb_xdp6_encap`: encapsulates the DNATed packet handed over ([`Handoff`]) to its backend's
/// node and sends it, as [`xdp_to_node`] does: an IPv6 packet over either underlay, an IPv4
/// one over an IPv6 underlay. Its TTL or hop limit drops by one, its MSS is clamped. One too
/// big once encapsulated is answered with a "fragmentation needed" (IPv4) or a "packet too
/// big" (IPv6) to the client (`frag_needed_sent`) when it can be, else dropped
/// (`drop_encap_mtu`). The backend's counters count it once it is sent.
#[inline(always)]
pub fn xdp_from_handoff(ctx: &XdpContext) -> (u32, Reason) {
    let drop = |reason| (xdp_action::XDP_DROP, reason);
    let Some(handoff) = ENCAP_HANDOFF.get(0).copied() else {
        return drop(Reason::DropEncapNoRoute);
    };
    // Offsets the verifier can bound (it checks nothing against a packet pointer whose offset
    // may pass 64 KiB); the parser's never come near.
    if handoff.l4_off > MAX_HANDOFF_OFF || handoff.l4_check_off > MAX_HANDOFF_OFF {
        return drop(Reason::PassTruncated);
    }
    let (mesh, inner_len, outer_len) = match xdp_lengths(ctx) {
        Ok(found) => found,
        Err(reason) => return drop(reason),
    };
    // Masked behind a barrier (`nat::opaque`): a no-op after the test above, but one LLVM
    // cannot fold away, which gives the verifier its bound on every copy.
    let bounded = |off: u16| nat::opaque(usize::from(off)) & usize::from(MAX_HANDOFF_OFF);
    let ipv4 = handoff.inner_family == HANDOFF_INNER_IPV4;
    let inner = Inner {
        l4_off: bounded(handoff.l4_off),
        l4_check_off: bounded(handoff.l4_check_off),
        proto: handoff.proto,
        tcp_flags: handoff.tcp_flags,
        ether_type: if ipv4 { ETH_P_IP_BE } else { ETH_P_IPV6_BE },
        mss_overhead: VXLAN_OVERHEAD as u16 + if ipv4 { 40 } else { 60 },
    };
    let (action, reason) = if is_ipv6_node_key(handoff.node_ip_be) {
        xdp_over_ipv6(ctx, mesh, &handoff, &inner.over_ipv6(), inner_len)
    } else if !ipv4 {
        xdp6_over_ipv4(ctx, mesh, &handoff, &inner, inner_len, outer_len)
    } else {
        // IPv4 over IPv4 never comes here (`xdp_to_node` encapsulates it itself).
        return drop(Reason::DropEncapNoRoute);
    };
    if action != xdp_action::XDP_DROP && reason != Reason::FragNeededSent && handoff.count != 0 {
        stats::count_to_backend(handoff.backend_id, inner_len as u64, handoff.count == 2);
    }
    (action, reason)
}

/// An IPv6 packet encapsulated over the IPv4 underlay ([`xdp_from_handoff`]).
#[inline(always)]
fn xdp6_over_ipv4(
    ctx: &XdpContext,
    mesh: &MeshConfig,
    handoff: &Handoff,
    inner: &Inner,
    inner_len: usize,
    outer_len: u16,
) -> (u32, Reason) {
    let drop = |reason| (xdp_action::XDP_DROP, reason);
    let egress = match route_to_node(ctx, mesh, handoff.node_ip_be, outer_len) {
        Ok(egress) => egress,
        Err((Reason::DropEncapMtu, mtu)) => {
            return too_big6(ctx, handoff, mtu.saturating_sub(VXLAN_OVERHEAD as u16));
        }
        Err((reason, _)) => return drop(reason),
    };
    let (hop, reason) = match egress {
        Egress::Tx(ref hop) => (hop, Reason::ForwardEncapTx),
        Egress::Redirect(ref hop) => (hop, Reason::ForwardEncapRedirect),
        Egress::Stack => return drop(Reason::DropEncapNoRoute),
    };
    mss::xdp_clamp(ctx.data(), ctx.data_end(), inner, hop.mtu, outer_len);
    if !decrement_hop_limit(ctx) {
        return (xdp_action::XDP_PASS, Reason::PassTruncated);
    }
    let Some(at) = make_room(ctx) else {
        return drop(Reason::DropEncapNoRoute);
    };
    write_headers(
        at,
        mesh,
        handoff.node_ip_be,
        hop,
        handoff.src_port,
        inner_len,
    );
    (forward::send(ctx, &egress), reason)
}

/// An IPv6 client's packet too big to encapsulate (`fits`: the size that would fit): answered
/// with an ICMPv6 "packet too big" (`icmp6::packet_too_big`) when it can be, dropped.
#[inline(always)]
fn too_big6(ctx: &XdpContext, handoff: &Handoff, fits: u16) -> (u32, Reason) {
    if fits >= MIN_IPV6_MTU {
        let action = icmp6::packet_too_big(ctx, handoff, fits);
        if action != 0 {
            return (action, Reason::FragNeededSent);
        }
    }
    (xdp_action::XDP_DROP, Reason::DropEncapMtu)
}

/// The inner IPv6 packet's hop limit one less (`lb_xdp6` made sure it is above 1); false if
/// the frame is too short to hold it.
#[inline(always)]
fn decrement_hop_limit(ctx: &XdpContext) -> bool {
    let Some(hop_limit) = ptr_at::<u8>(ctx.data(), ctx.data_end(), parse6::IP6_HOP_LIMIT_OFF)
    else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { *hop_limit = (*hop_limit).saturating_sub(1) };
    true
}

/// A packet of either family encapsulated over the IPv6 underlay ([`xdp_from_handoff`]): to
/// the node's address (`NODE_ADDRS6`) from this node's (`MESH6`).
#[inline(always)]
fn xdp_over_ipv6(
    ctx: &XdpContext,
    mesh: &MeshConfig,
    handoff: &Handoff,
    inner: &Inner,
    inner_len: usize,
) -> (u32, Reason) {
    let drop = |reason| (xdp_action::XDP_DROP, reason);
    // SAFETY: copied out at once.
    let (Some(node), Some(local)) = (
        unsafe { NODE_ADDRS6.get(&handoff.node_ip_be) }.copied(),
        MESH6.get(0).copied(),
    ) else {
        return drop(Reason::DropEncapNoRoute);
    };
    let Ok(outer_len) = u16::try_from(OUTER6_L3_OVERHEAD + inner_len) else {
        return drop(Reason::DropEncapMtu);
    };
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: all-zero is a valid NextHop.
    let mut hop: NextHop = unsafe { core::mem::zeroed() };
    let query = forward::Fib6Query {
        ifindex: ingress,
        tot_len: outer_len,
        proto: PROTO_UDP,
        src: &local,
        dst: &node,
    };
    let rc = forward::fib_lookup6_cached(ctx.ctx.cast(), &query, &mut hop);
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            let fits = hop.mtu.saturating_sub(VXLAN6_OVERHEAD as u16);
            if inner.ether_type == ETH_P_IPV6_BE {
                return too_big6(ctx, handoff, fits);
            }
            if handoff.service_ip_be != 0 && fits >= MIN_PATH_MTU {
                let action = frag_needed_for_handoff(ctx, handoff, inner, fits);
                if action != 0 {
                    return (action, Reason::FragNeededSent);
                }
            }
            return drop(Reason::DropEncapMtu);
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => return drop(Reason::DropEncapNoNeigh),
        _ => return drop(Reason::DropEncapNoRoute),
    }
    let tx = hop.ifindex == ingress;
    // Not into a bridge port's other end: nodes are reached as before.
    if !tx && (hop.xmit & forward::XMIT_REDIRECT == 0 || hop.xmit & forward::XMIT_PEER != 0) {
        return drop(Reason::DropEncapNoRoute);
    }
    mss::xdp_clamp(ctx.data(), ctx.data_end(), inner, hop.mtu, outer_len);
    let ttl_lowered = if inner.ether_type == ETH_P_IP_BE {
        forward::decrement_ttl(ctx.data(), ctx.data_end()).is_some()
    } else {
        decrement_hop_limit(ctx)
    };
    if !ttl_lowered {
        return (xdp_action::XDP_PASS, Reason::PassTruncated);
    }
    // SAFETY: the helper only moves ctx->data; the pointer is derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -(VXLAN6_OVERHEAD as i32)) } != 0 {
        return drop(Reason::DropEncapNoRoute);
    }
    let Some(at) = ptr_at::<EncapHeaders6>(ctx.data(), ctx.data_end(), 0) else {
        return drop(Reason::DropEncapNoRoute);
    };
    let udp_len = outer_len - 40;
    // SAFETY: bounds checked by ptr_at; packet data need not be aligned. Piece by piece, as
    // `write_headers`.
    unsafe {
        ptr::write_unaligned(ptr::addr_of_mut!((*at).outer_eth), eth(&hop, ETH_P_IPV6_BE));
        ptr::write_unaligned(
            ptr::addr_of_mut!((*at).outer_ip),
            outer_ip6(&local, &node, handoff.src_port, udp_len),
        );
        ptr::write_unaligned(
            ptr::addr_of_mut!((*at).udp),
            outer_udp(mesh, handoff.src_port, udp_len),
        );
        ptr::write_unaligned(ptr::addr_of_mut!((*at).vxlan), vxlan(mesh));
        ptr::write_unaligned(
            ptr::addr_of_mut!((*at).inner_eth),
            eth(&hop, inner.ether_type),
        );
    }
    if tx {
        (forward::send(ctx, &Egress::Tx(hop)), Reason::ForwardEncapTx)
    } else {
        let egress = Egress::Redirect(hop);
        (forward::send(ctx, &egress), Reason::ForwardEncapRedirect)
    }
}

/// The outer IPv6 header, `local` → `node`, for a UDP datagram of `udp_len` bytes (wire order):
/// hop limit 64; the flow label from the flow's outer source port, so that the underlay, which
/// may hash on the label alone (RFC 6438), spreads flows as the port does over IPv4.
#[inline(always)]
fn outer_ip6(local: &[u8; 16], node: &[u8; 16], src_port: u16, udp_len: u16) -> Ipv6Hdr {
    let label = u32::from(src_port) & 0x000f_ffff;
    Ipv6Hdr {
        vcf: (0x6000_0000 | label).to_be_bytes(),
        payload_len: udp_len.to_be_bytes(),
        next_hdr: PROTO_UDP,
        hop_limit: OUTER_TTL,
        src_addr: *local,
        dst_addr: *node,
    }
}

/// An IPv4 client's packet too big to encapsulate over the IPv6 underlay, as the handoff
/// describes it: answered with a "fragmentation needed" (`icmp::frag_needed`) naming `mtu`.
/// Returns the XDP action, 0 for none.
#[inline(always)]
fn frag_needed_for_handoff(ctx: &XdpContext, handoff: &Handoff, inner: &Inner, mtu: u16) -> u32 {
    if inner.ether_type != ETH_P_IP_BE {
        return 0;
    }
    let Some(src) = ptr_at::<[u8; 4]>(ctx.data(), ctx.data_end(), parse::L3_OFF + 12) else {
        return 0;
    };
    let client = Packet {
        l4_off: inner.l4_off,
        proto: inner.proto,
        ttl: 0,
        tot_len: 0,
        // SAFETY: bounds checked by ptr_at.
        src_ip_be: u32::from_ne_bytes(unsafe { *src }),
        dst_ip_be: handoff.service_ip_be,
        src_port_be: 0,
        dst_port_be: handoff.service_port_be,
        l4_check_off: inner.l4_check_off,
        tcp_flags: inner.tcp_flags,
    };
    icmp::frag_needed(ctx, &client, mtu)
}

/// [`headers`] for an inner IPv6 frame, written in place piece by piece: the whole set built
/// on the stack first would not fit the IPv6 path's.
#[inline(always)]
fn write_headers(
    at: *mut EncapHeaders,
    mesh: &MeshConfig,
    node_ip_be: u32,
    hop: &NextHop,
    src_port: u16,
    inner_len: usize,
) {
    let (ip_len, udp_len) = outer_lengths(inner_len);
    // SAFETY: `at` was bounds checked for the whole set; packet data need not be aligned.
    unsafe {
        ptr::write_unaligned(ptr::addr_of_mut!((*at).outer_eth), eth(hop, ETH_P_IP_BE));
        ptr::write_unaligned(
            ptr::addr_of_mut!((*at).outer_ip),
            outer_ip(mesh, node_ip_be, ip_len),
        );
        ptr::write_unaligned(
            ptr::addr_of_mut!((*at).udp),
            outer_udp(mesh, src_port, udp_len),
        );
        ptr::write_unaligned(ptr::addr_of_mut!((*at).vxlan), vxlan(mesh));
        ptr::write_unaligned(ptr::addr_of_mut!((*at).inner_eth), eth(hop, ETH_P_IPV6_BE));
    }
}

/// The outer IPv4 length of one segment of a TCP GSO packet once encapsulated: outer headers,
/// the inner frame's headers (TCP's with its options), `gso_size` bytes of payload.
#[inline(always)]
fn tcp_segment_len(ctx: &TcContext, pkt: &Inner, gso_size: u32, l3_overhead: usize) -> Option<u16> {
    let data_offset: u8 = ctx.load(pkt.l4_off + 12).ok()?;
    let segment = l3_overhead + pkt.l4_off + usize::from(data_offset >> 4) * 4 + gso_size as usize;
    u16::try_from(segment).ok()
}

/// The skb fields TC reads here that `TcContext` does not expose: the interface, and the GSO
/// segment size (0: not a GSO packet; `gso_segs` is no guide, tap and VM backends send GSO
/// packets with it 0).
#[inline(always)]
fn skb_ifindex_and_gso_size(ctx: &TcContext) -> (u32, u32) {
    // SAFETY: the context points at the program's __sk_buff for the whole run.
    unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) }
}

/// Encapsulates a backend's reply to the node its flow came in on (TC egress on the backend's
/// node). Returns the TC action: `TC_ACT_UNSPEC` to let the encapsulated packet leave through
/// this interface, `TC_ACT_REDIRECT` towards another one, `TC_ACT_SHOT` when it cannot be sent.
/// The outer MACs come from the FIB; an unresolved neighbour is left to the kernel
/// (`bpf_redirect_neigh`), which TC, unlike XDP, can ask for. A UDP datagram too big once
/// encapsulated is answered with "fragmentation needed" when `answer_too_big` (a task's reply:
/// `icmp::tc_frag_needed`), and is otherwise dropped.
#[inline(always)]
pub fn tc_to_node(
    ctx: &mut TcContext,
    pkt: &Packet,
    node_ip_be: u32,
    src_port: u16,
    answer_too_big: bool,
    sent_as: Reason,
) -> (i32, Reason) {
    let too_big = if answer_too_big { Some(pkt) } else { None };
    tc_encap(ctx, &Inner::of(pkt), node_ip_be, src_port, too_big, sent_as)
}

/// [`tc_to_node`] for an IPv6 packet (a task's reply). One too big once encapsulated is
/// dropped (`drop_encap_mtu`): ICMPv6 "packet too big" is not sent yet.
#[inline(always)]
pub fn tc6_to_node(
    ctx: &mut TcContext,
    pkt: &Packet6,
    node_ip_be: u32,
    src_port: u16,
) -> (i32, Reason) {
    tc_encap(
        ctx,
        &Inner::of6(pkt),
        node_ip_be,
        src_port,
        None,
        Reason::ReplyEncap,
    )
}

/// [`tc_to_node`]'s work for an inner packet of either family; `too_big`: the IPv4 packet to
/// answer with "fragmentation needed" if it does not fit (over the IPv4 underlay only: over
/// the IPv6 one, this node has no IPv4 address to send it from); `sent_as`: the reason a packet
/// sent is counted as. To a node of an IPv6 underlay the packet goes to `lb_tc_encap6`
/// ([`tc_from_handoff`]), which counts it itself: the IPv4 and IPv6 TC programs have no stack
/// left for that encapsulation's frame.
#[inline(always)]
fn tc_encap(
    ctx: &mut TcContext,
    pkt: &Inner,
    node_ip_be: u32,
    src_port: u16,
    too_big: Option<&Packet>,
    sent_as: Reason,
) -> (i32, Reason) {
    if is_ipv6_node_key(node_ip_be) {
        return tc_to_encap_program(ctx, pkt, node_ip_be, src_port, sent_as);
    }
    tc_encap_over::<false>(ctx, pkt, node_ip_be, src_port, too_big, sent_as)
}

/// What the TC programs hand to `lb_tc_encap6` with a packet to a node of an IPv6 underlay
/// (`TC_ENCAP_HANDOFF`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcHandoff {
    pub node_ip_be: u32,
    /// The reason the packet is counted as once sent.
    pub sent_as: Reason,
    pub l4_off: u16,
    pub l4_check_off: u16,
    pub src_port: u16,
    pub ether_type: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub _pad: [u8; 2],
}

/// Hands the packet to `lb_tc_encap6`. Returns only if that program is not there: the packet is
/// dropped then (not counted: the caller counts what this returns).
#[inline(always)]
fn tc_to_encap_program(
    ctx: &mut TcContext,
    pkt: &Inner,
    node_ip_be: u32,
    src_port: u16,
    sent_as: Reason,
) -> (i32, Reason) {
    let Some(handoff) = TC_ENCAP_HANDOFF.get_ptr_mut(0) else {
        return (TC_ACT_SHOT, Reason::DropEncapNoRoute);
    };
    // SAFETY: this CPU's slot, read by the program tail-called next on this CPU; field by
    // field, as the XDP handoff.
    unsafe {
        (*handoff).node_ip_be = node_ip_be;
        (*handoff).sent_as = sent_as;
        (*handoff).l4_off = pkt.l4_off as u16;
        (*handoff).l4_check_off = pkt.l4_check_off as u16;
        (*handoff).src_port = src_port;
        (*handoff).ether_type = pkt.ether_type;
        (*handoff).proto = pkt.proto;
        (*handoff).tcp_flags = pkt.tcp_flags;
    }
    // SAFETY: the index names a TC program, as the tail call requires.
    let _ = unsafe { TC_ENCAP6_PROGRAM.tail_call(ctx, 0) };
    (TC_ACT_SHOT, Reason::DropEncapNoRoute)
}

/// `lb_tc_encap6`: encapsulates the packet a TC program handed over ([`TcHandoff`]) to its
/// node over the IPv6 underlay; returns the TC action, the reason counted.
#[inline(always)]
pub fn tc_from_handoff(ctx: &mut TcContext) -> i32 {
    let Some(handoff) = TC_ENCAP_HANDOFF.get(0).copied() else {
        return TC_ACT_SHOT;
    };
    if handoff.l4_off > MAX_HANDOFF_OFF || handoff.l4_check_off > MAX_HANDOFF_OFF {
        return TC_ACT_SHOT;
    }
    let bounded = |off: u16| nat::opaque(usize::from(off)) & usize::from(MAX_HANDOFF_OFF);
    let ipv4 = handoff.ether_type == ETH_P_IP_BE;
    let inner = Inner {
        l4_off: bounded(handoff.l4_off),
        l4_check_off: bounded(handoff.l4_check_off),
        proto: handoff.proto,
        tcp_flags: handoff.tcp_flags,
        ether_type: handoff.ether_type,
        mss_overhead: VXLAN6_OVERHEAD as u16 + if ipv4 { 40 } else { 60 },
    };
    let (action, reason) = tc_encap_over::<true>(
        ctx,
        &inner,
        handoff.node_ip_be,
        handoff.src_port,
        None,
        handoff.sent_as,
    );
    stats::count_reason(reason, u64::from(ctx.len()));
    action
}

/// The encapsulation of [`tc_encap`] over the IPv4 underlay, or over the IPv6 one (`OUTER6`:
/// `pkt`'s MSS overhead already includes it).
#[inline(always)]
fn tc_encap_over<const OUTER6: bool>(
    ctx: &mut TcContext,
    pkt: &Inner,
    node_ip_be: u32,
    src_port: u16,
    too_big: Option<&Packet>,
    sent_as: Reason,
) -> (i32, Reason) {
    let shot = |reason| (TC_ACT_SHOT, reason);
    let Some(mesh) = mesh() else {
        return shot(Reason::DropMeshUnconfigured);
    };
    let (l3_overhead, overhead) = if OUTER6 {
        (OUTER6_L3_OVERHEAD, VXLAN6_OVERHEAD)
    } else {
        (OUTER_L3_OVERHEAD, VXLAN_OVERHEAD)
    };
    let (node, local) = if OUTER6 {
        // SAFETY: copied out at once.
        match (
            unsafe { NODE_ADDRS6.get(&node_ip_be) }.copied(),
            MESH6.get(0).copied(),
        ) {
            (Some(node), Some(local)) => (node, local),
            _ => return shot(Reason::DropEncapNoRoute),
        }
    } else {
        ([0; 16], [0; 16])
    };
    let inner_len = ctx.len() as usize;
    let outer_len = l3_overhead + inner_len;
    let (ifindex, gso_size) = skb_ifindex_and_gso_size(ctx);
    // UDP GSO (`UDP_SEGMENT`: QUIC servers) keeps its segment size: adjust_room takes non-TCP
    // GSO only as fixed-size, so each segment grows by the overhead and must fit as it is. TCP
    // GSO keeps its segment size too when its segments fit once encapsulated (its connection's
    // MSS was clamped, `mss`); otherwise adjust_room shrinks it by the overhead.
    let udp_gso = gso_size != 0 && pkt.proto == PROTO_UDP;
    let tcp_gso_segment = if gso_size != 0 && pkt.proto == PROTO_TCP {
        tcp_segment_len(ctx, pkt, gso_size, l3_overhead)
    } else {
        None
    };
    let checked_len = if let Some(segment) = tcp_gso_segment {
        segment
    } else if udp_gso {
        // Outer headers, inner Ethernet, inner IP and UDP headers, one segment's payload.
        let segment = l3_overhead + pkt.l4_off + UdpHdr::LEN + gso_size as usize;
        if segment > usize::from(u16::MAX) {
            return shot(Reason::DropEncapMtu);
        }
        segment as u16
    } else if gso_size != 0 || outer_len > usize::from(u16::MAX) {
        0
    } else {
        outer_len as u16
    };
    let lookup = |checked_len| {
        if OUTER6 {
            // SAFETY: all-zero is a valid NextHop.
            let mut hop: NextHop = unsafe { core::mem::zeroed() };
            let query = forward::Fib6Query {
                ifindex,
                tot_len: checked_len,
                proto: PROTO_UDP,
                src: &local,
                dst: &node,
            };
            let rc = forward::fib_lookup6(ctx.skb.skb.cast(), &query, &mut hop);
            (rc, hop)
        } else {
            forward::fib_lookup_raw(
                ctx.skb.skb.cast(),
                ifindex,
                PROTO_UDP,
                checked_len,
                mesh.local_ip_be,
                node_ip_be,
            )
        }
    };
    let (mut rc, mut hop) = lookup(checked_len);
    let mut fixed_gso = udp_gso;
    if tcp_gso_segment.is_some() {
        if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
            (rc, hop) = lookup(0);
        } else {
            fixed_gso = true;
        }
    }
    match rc {
        // The MTU is known only once the neighbour is: a SYN-ACK then goes unclamped, and the
        // client learns the size from this node's "fragmentation needed" instead.
        BPF_FIB_LKUP_RET_SUCCESS => mss::tc_clamp(ctx, pkt, hop.mtu, checked_len),
        BPF_FIB_LKUP_RET_NO_NEIGH => {}
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            let fits = hop.mtu.saturating_sub(overhead as u16);
            if let Some(pkt) = too_big
                && gso_size == 0
                && fits >= MIN_PATH_MTU
                && icmp::tc_frag_needed(ctx, pkt, fits)
            {
                return (TC_ACT_REDIRECT, Reason::FragNeededSent);
            }
            return shot(Reason::DropEncapMtu);
        }
        _ => return shot(Reason::DropEncapNoRoute),
    }
    let fixed_gso = if fixed_gso {
        BPF_F_ADJ_ROOM_FIXED_GSO
    } else {
        0
    };
    let l3 = if OUTER6 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    };
    let flags =
        u64::from(l3 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH | fixed_gso)
            | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    // Room goes after the MAC header: the old Ethernet header becomes the outer one and is
    // rewritten with the rest.
    if ctx
        .adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return shot(Reason::DropEncapNoRoute);
    }
    let stored = if OUTER6 {
        let (_, udp_len) = outer_lengths(inner_len);
        let encap = EncapHeaders6 {
            outer_eth: eth(&hop, ETH_P_IPV6_BE),
            outer_ip: outer_ip6(&local, &node, src_port, udp_len),
            udp: outer_udp(mesh, src_port, udp_len),
            vxlan: vxlan(mesh),
            inner_eth: eth(&hop, pkt.ether_type),
        };
        ctx.store(0, &encap, 0)
    } else {
        let encap = headers(mesh, node_ip_be, &hop, src_port, inner_len, pkt.ether_type);
        ctx.store(0, &encap, 0)
    };
    if stored.is_err() {
        return shot(Reason::DropEncapNoRoute);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: no neighbour parameters: the kernel looks the outer destination up itself.
        let action = unsafe { bpf_redirect_neigh(hop.ifindex, ptr::null_mut(), 0, 0) };
        return (action as i32, sent_as);
    }
    if hop.ifindex == ifindex {
        return (aya_ebpf::bindings::TC_ACT_UNSPEC, sent_as);
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(hop.ifindex, 0) };
    if action as i32 == TC_ACT_REDIRECT {
        (TC_ACT_REDIRECT, sent_as)
    } else {
        shot(Reason::DropEncapNoRoute)
    }
}
