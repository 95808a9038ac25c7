//! VXLAN decapsulation in XDP, over an IPv4 underlay (in `lb_xdp`) or an IPv6 one (in
//! `lb_xdp6_overlay`). Overlay packets are accepted only from known nodes, with this node's
//! VNI; an inner IPv6 frame goes on to the IPv6 program (`ingress6`); an inner IPv4 frame
//! is then either a backend's reply coming back to the node its flow came in on (reverse-NATed
//! and sent to the client) or a client's packet for a backend on this node (delivered, and
//! remembered so that TC encapsulates the replies back).
use aya_ebpf::{
    bindings::{BPF_ANY, xdp_action},
    helpers::generated::bpf_xdp_adjust_head,
    maps::LruHashMap,
    programs::XdpContext,
};
use lb_common::{FlowKey, FlowKey6, LocalBackendKey, MeshConfig, PROTO_UDP, Reason, TunnelValue};
use network_types::{eth::EthHdr, udp::UdpHdr};

use crate::{
    conntrack,
    encap::{self, VXLAN_FLAG_VNI, VxlanHdr},
    forward, frag, icmp,
    maps::{
        BACKENDS, DECAPSULATED_FROM, IPV6_DECAP_PROGRAM, LOCAL_BACKENDS, MESH6, NODES, NODES6,
        REVERSE_FLOWS, TUNNEL_REPLIES,
    },
    parse::{self, Packet, ptr_at},
    parse6, reply,
};

/// True for a packet to this node's overlay port: VXLAN that is this node's to handle.
#[inline(always)]
pub fn is_overlay(pkt: &Packet, mesh: &MeshConfig) -> bool {
    pkt.proto == PROTO_UDP
        && pkt.dst_ip_be == mesh.local_ip_be
        && pkt.dst_port_be == mesh.vxlan_port_be
}

/// Handles an overlay packet (`is_overlay`). Same contract as `ingress::try_lb_xdp`. The first
/// fragment of a UDP datagram goes the way of a whole packet, and the rest follow it (`frag`).
#[inline(always)]
pub fn xdp_from_node(
    ctx: &XdpContext,
    outer: &Packet,
    mesh: &MeshConfig,
) -> Result<(u32, Reason), Reason> {
    let vxlan_off = outer.l4_off + UdpHdr::LEN;
    if let Some(outcome) = check_vxlan(ctx, vxlan_off, mesh) {
        return outcome;
    }
    // SAFETY: NODES is a set written by userspace; only presence is read.
    if unsafe { NODES.get(&outer.src_ip_be) }.is_none() {
        return Ok((xdp_action::XDP_DROP, Reason::DropVxlanUnknownSource));
    }
    from_node(ctx, vxlan_off, mesh, outer.src_ip_be)
}

/// VXLAN over an IPv6 underlay (`lb_xdp6_overlay`, tail-called by `lb_xdp6` for a UDP packet
/// to this node's IPv6 underlay address and overlay port), as [`xdp_from_node`]: from a node
/// of `NODES6`, known from then on by its key.
#[inline(always)]
pub fn xdp_from_node6(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let drop = |reason| Ok((xdp_action::XDP_DROP, reason));
    let Some(mesh) = encap::mesh() else {
        return drop(Reason::DropMeshUnconfigured);
    };
    let mut key = FlowKey6::default();
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Ok(outer) = parse6::parse6_tunnel(data, data_end, data_end - data, &mut key) else {
        return drop(Reason::DropVxlanMalformed);
    };
    if outer.proto != PROTO_UDP || outer.dst_port_be != mesh.vxlan_port_be {
        return drop(Reason::DropVxlanMalformed);
    }
    let vxlan_off = outer.l4_off + UdpHdr::LEN;
    if let Some(outcome) = check_vxlan(ctx, vxlan_off, mesh) {
        return outcome;
    }
    // SAFETY: copied out at once.
    let Some(node_ip_be) = unsafe { NODES6.get(&key.src) }.copied() else {
        return drop(Reason::DropVxlanUnknownSource);
    };
    from_node(ctx, vxlan_off, mesh, node_ip_be)
}

/// The VXLAN header at `vxlan_off`: `None` if it carries this node's VNI, else what becomes of
/// the packet (dropped if malformed; another VNI's traffic is the kernel's).
#[inline(always)]
fn check_vxlan(
    ctx: &XdpContext,
    vxlan_off: usize,
    mesh: &MeshConfig,
) -> Option<Result<(u32, Reason), Reason>> {
    let drop = |reason| Some(Ok((xdp_action::XDP_DROP, reason)));
    let Some(vxlan) = ptr_at::<VxlanHdr>(ctx.data(), ctx.data_end(), vxlan_off) else {
        return drop(Reason::DropVxlanMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let vxlan = unsafe { *vxlan };
    if vxlan.flags[0] & VXLAN_FLAG_VNI == 0 {
        return drop(Reason::DropVxlanBadFlags);
    }
    let vni = u32::from_be_bytes([0, vxlan.vni[0], vxlan.vni[1], vxlan.vni[2]]);
    // The VNI first: overlay traffic of another VNI (Docker's own overlay networks, from Swarm
    // nodes lbctl does not know) is the kernel's, whoever sends it.
    if vni != mesh.vni {
        return Some(Err(Reason::PassVxlanOtherVni));
    }
    None
}

/// Strips the outer headers of a VXLAN packet from the node `node_ip_be` (its VNI and source
/// checked) and handles the inner frame: see the module's comment.
#[inline(always)]
fn from_node(
    ctx: &XdpContext,
    vxlan_off: usize,
    mesh: &MeshConfig,
    node_ip_be: u32,
) -> Result<(u32, Reason), Reason> {
    let drop = |reason| Ok((xdp_action::XDP_DROP, reason));
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(outer_eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return drop(Reason::DropVxlanMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let (own_mac, peer_mac) = unsafe { ((*outer_eth).dst_addr, (*outer_eth).src_addr) };
    let inner_off = vxlan_off + core::mem::size_of::<VxlanHdr>();
    // SAFETY: the helper only moves ctx->data; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), inner_off as i32) } != 0 {
        return drop(Reason::DropVxlanMalformed);
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(inner_eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return drop(Reason::DropVxlanMalformed);
    };
    // The inner MACs mean nothing here: address the frame to this node, as the outer one was,
    // so the kernel accepts it if it ends up routing it.
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*inner_eth).dst_addr = own_mac;
        (*inner_eth).src_addr = peer_mac;
    }
    if parse6::is_ipv6(data, data_end) {
        return to_ipv6_program(ctx, node_ip_be);
    }
    let (inner, fragment) = match parse::parse(data, data_end, data_end - data) {
        Ok(inner) => (inner, None),
        Err(Reason::PassFragment) => {
            let Some(fragment) = parse::parse_udp_fragment(data, data_end, data_end - data) else {
                return drop(Reason::DropVxlanMalformed);
            };
            match frag::first_as_packet(&fragment) {
                Some(first) => (first, Some(fragment.id_be)),
                None => return frag::later_from_node(ctx, &fragment),
            }
        }
        // An ICMP error about a flow: back from the backend's node, or for a backend here.
        Err(Reason::PassNotTcpUdp) => {
            return match parse::parse_icmp_error(data, data_end, data_end - data) {
                Some(error) => icmp::xdp_from_node(ctx, &error, node_ip_be),
                None => drop(Reason::DropVxlanMalformed),
            };
        }
        Err(_) => return drop(Reason::DropVxlanMalformed),
    };
    // VXLAN inside VXLAN: no node encapsulates overlay traffic (flows go to tasks). Handed to
    // the kernel, its VXLAN devices would decapsulate the inner frame too.
    if is_overlay(&inner, mesh) {
        return drop(Reason::DropVxlanMalformed);
    }
    let key = conntrack::key_of(&inner);
    if let Some(reverse) = conntrack::reverse_lookup(&key) {
        if !hosts_backend_of(node_ip_be, reverse.backend_id) {
            return drop(Reason::DropVxlanWrongNode);
        }
        let outcome = reply::reply(ctx, &inner, &reverse);
        if let Some(id_be) = fragment {
            frag::remember_reply_from_node(&inner, id_be, &reverse, &outcome);
        }
        return outcome;
    }
    if !is_local_backend(&inner) {
        return drop(Reason::DropVxlanNotLocalBackend);
    }
    remember_ingress_node(&key, node_ip_be);
    if let Some(id_be) = fragment {
        frag::remember_delivery(&inner, id_be);
    }
    forward::deliver(ctx, &inner)
}

/// Whether an IPv6 packet (`key`, to `dst_port_be` over UDP) is VXLAN to this node on its IPv6
/// underlay: this node's address there (`MESH6`) and its overlay port.
#[inline(always)]
pub fn is_overlay6(key: &FlowKey6, dst_port_be: u16) -> bool {
    let Some(mesh) = encap::mesh() else {
        return false;
    };
    mesh.vxlan_port_be == dst_port_be
        && lb_common::is_ipv6_node_key(mesh.local_ip_be)
        && MESH6.get(0) == Some(&key.dst)
}

/// Hands a decapsulated IPv6 frame from the node `node_ip_be` to the IPv6 decapsulation
/// program (`lb_xdp6_decap`: `ingress6::try_xdp_from_node`), which handles it as this module
/// does an IPv4 one; the node goes through `DECAPSULATED_FROM`. Returns only if the tail call
/// failed (no IPv6 program): then the frame is dropped.
#[inline(always)]
fn to_ipv6_program(ctx: &XdpContext, node_ip_be: u32) -> Result<(u32, Reason), Reason> {
    let Some(from) = DECAPSULATED_FROM.get_ptr_mut(0) else {
        return Ok((xdp_action::XDP_DROP, Reason::DropVxlanMalformed));
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the packet is done.
    unsafe { *from = node_ip_be };
    // SAFETY: the index names an XDP program, as the tail call requires.
    let _ = unsafe { IPV6_DECAP_PROGRAM.tail_call(ctx, 0) };
    // SAFETY: as above.
    unsafe { *from = 0 };
    Ok((xdp_action::XDP_DROP, Reason::DropVxlanMalformed))
}

/// Only the node that hosts a flow's backend (`backend_id`) may send its replies.
#[inline(always)]
pub fn hosts_backend_of(node_ip_be: u32, backend_id: u32) -> bool {
    BACKENDS.get(backend_id).map(|backend| backend.node_ip_be) == Some(node_ip_be)
}

/// Whether a decapsulated packet is for a backend this node reaches itself: anything else (a
/// reply whose reverse entry was evicted, a forged packet) would be relayed out un-NATed,
/// anywhere.
#[inline(always)]
pub fn is_local_backend(inner: &Packet) -> bool {
    let local = LocalBackendKey {
        ip_be: inner.dst_ip_be,
        port_be: inner.dst_port_be,
        proto: inner.proto,
        _pad: 0,
    };
    // SAFETY: a set written by userspace; only presence is read.
    unsafe { LOCAL_BACKENDS.get(&local) }.is_some()
}

/// Records where the replies of this client → backend flow must be encapsulated back to.
///
/// Replies follow the newest flow of their 5-tuple. A client that reuses a source port may
/// reach the same backend through this node first and through another node later (a UDP
/// client does so with one socket): this node's reverse-NAT entry of the older flow would win
/// in TC, which looks it up first, and the client would get replies from the wrong address. So
/// a changed ingress node also removes that entry; `conntrack::record` does the converse.
#[inline(always)]
pub fn remember_ingress_node(key: &FlowKey, node_ip_be: u32) {
    let reply_key = FlowKey::new(
        key.dst_ip_be,
        key.src_ip_be,
        key.dst_port_be,
        key.src_port_be,
        key.proto,
    );
    remember_tunnel(&TUNNEL_REPLIES, &REVERSE_FLOWS, &reply_key, node_ip_be);
}

/// [`remember_ingress_node`]'s work on either family's tables: `tunnels` (the reply key → the
/// ingress node) and `reverse` (this node's own reverse-NAT entries).
#[inline(always)]
pub fn remember_tunnel<K, V>(
    tunnels: &LruHashMap<K, TunnelValue>,
    reverse: &LruHashMap<K, V>,
    reply_key: &K,
    node_ip_be: u32,
) {
    // SAFETY: copied out at once.
    let known = unsafe { tunnels.get(reply_key) }.map(|tunnel| tunnel.node_ip_be);
    if known != Some(node_ip_be) {
        let tunnel = TunnelValue {
            node_ip_be,
            _pad: 0,
        };
        // A full LRU evicts; an error leaves the reply to plain routing, nothing worse.
        let _ = tunnels.insert(reply_key, &tunnel, u64::from(BPF_ANY));
        // Absent in all but the port-reuse case above.
        conntrack::remove_if_present(reverse, reply_key);
    }
}
