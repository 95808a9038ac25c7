//! The IPv6 parser: Ethernet, IPv6 with its extension headers, TCP or UDP.
use lb_common::{Addr6, FlowKey6, PROTO_TCP, PROTO_UDP, Reason};
use network_types::{eth::EthHdr, tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{L3_OFF, TCP_ACK, TCP_SYN, ptr_at, tcp_flags_valid};

/// `ETH_P_IPV6` as it appears in the frame when read as a native u16.
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// The fixed IPv6 header.
pub const IPV6_LEN: usize = 40;
/// Offsets in the IPv6 header, from the frame's start.
pub const IP6_HOP_LIMIT_OFF: usize = L3_OFF + 7;
pub const IP6_SRC_OFF: usize = L3_OFF + 8;
pub const IP6_DST_OFF: usize = L3_OFF + 24;
/// Extension headers walked to the transport header (RFC 8200 4.1): hop-by-hop options (first
/// only), routing, destination options.
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving the packet to the kernel: real traffic carries one or
/// two, and every one walked costs the verifier a copy of the loop.
const MAX_EXTENSIONS: usize = 4;

/// What the data plane needs of an IPv6 TCP or UDP packet (the counterpart of `Packet`), but
/// for its addresses, which [`parse6`] writes into the flow's key instead: the IPv6 path's
/// stack has no room for two copies.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Packet6 {
    pub l4_off: usize,
    pub proto: u8,
    pub hop_limit: u8,
    /// The IPv6 payload length (extension headers and transport), in host byte order.
    pub payload_len: u16,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// Offset of the TCP or UDP checksum field.
    pub l4_check_off: usize,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
}

impl Packet6 {
    /// A TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Whether the frame is IPv6 (what [`parse6`] takes).
#[inline(always)]
pub fn is_ipv6(data: usize, data_end: usize) -> bool {
    ptr_at::<EthHdr>(data, data_end, 0)
        // SAFETY: bounds checked by ptr_at.
        .is_some_and(|eth| unsafe { (*eth).ether_type } == ETH_P_IPV6_BE)
}

/// Addresses the kernel drops as martians from the wire: an unspecified, loopback or multicast
/// source (RFC 4291), a loopback destination.
#[inline(always)]
fn is_martian(src: &Addr6, dst: &Addr6) -> bool {
    const LOOPBACK: Addr6 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    src[0] == 0xff || *src == [0; 16] || *src == LOOPBACK || *dst == LOOPBACK
}

/// Parses an IPv6 frame whose headers lie between `data` and `data_end` (`frame_len`: the whole
/// frame), its 5-tuple written to `key`. `Err` names why it is not for the load balancer:
/// passed on untouched. A fragment
/// header goes to the kernel (`pass_fragment`), as do a routing header with segments left and
/// more extension headers than the walk takes (`pass_ipv6_extension`), and anything but TCP and
/// UDP (`pass_not_tcp_udp`: ICMPv6, neighbour discovery and router advertisements included).
///
/// A UDP datagram with a zero checksum is `pass_malformed` (RFC 8200 8.1), with its ports and
/// protocol in `key` (an overlay packet has one: [`parse6_tunnel`]).
#[inline(always)]
pub fn parse6(
    data: usize,
    data_end: usize,
    frame_len: usize,
    key: &mut FlowKey6,
) -> Result<Packet6, Reason> {
    parse6_any::<false>(data, data_end, frame_len, key)
}

/// [`parse6`] for VXLAN over an IPv6 underlay, whose UDP checksum is 0 (RFC 6935 allows it for
/// tunnels).
#[inline(always)]
pub fn parse6_tunnel(
    data: usize,
    data_end: usize,
    frame_len: usize,
    key: &mut FlowKey6,
) -> Result<Packet6, Reason> {
    parse6_any::<true>(data, data_end, frame_len, key)
}

#[inline(always)]
fn parse6_any<const ZERO_UDP_CHECKSUM: bool>(
    data: usize,
    data_end: usize,
    frame_len: usize,
    key: &mut FlowKey6,
) -> Result<Packet6, Reason> {
    if !is_ipv6(data, data_end) {
        return Err(Reason::PassNotIpv4);
    }
    let header: *const [u8; IPV6_LEN] =
        ptr_at(data, data_end, L3_OFF).ok_or(Reason::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let header = unsafe { &*header };
    if header[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let payload_len = u16::from_be_bytes([header[4], header[5]]);
    // A payload length of 0 is a jumbogram's (hop-by-hop option): not on an Ethernet MTU.
    let l3_end = L3_OFF + IPV6_LEN + usize::from(payload_len);
    if payload_len == 0 || l3_end > frame_len {
        return Err(Reason::PassMalformed);
    }
    key.src.copy_from_slice(&header[8..24]);
    key.dst.copy_from_slice(&header[24..40]);
    if is_martian(&key.src, &key.dst) {
        return Err(Reason::PassMalformed);
    }
    let mut next = header[6];
    let mut off = L3_OFF + IPV6_LEN;
    let mut walked = 0;
    while next != PROTO_TCP && next != PROTO_UDP {
        match next {
            NEXT_FRAGMENT => return Err(Reason::PassFragment),
            NEXT_HOP_BY_HOP if walked > 0 => return Err(Reason::PassMalformed),
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {}
            _ => return Err(Reason::PassNotTcpUdp),
        }
        if walked == MAX_EXTENSIONS {
            return Err(Reason::PassIpv6Extension);
        }
        let ext: *const [u8; 4] = ptr_at(data, data_end, off).ok_or(Reason::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let [ext_next, ext_len, _, segments_left] = unsafe { *ext };
        if next == NEXT_ROUTING && segments_left != 0 {
            // Its destination is a waypoint: the kernel routes it on.
            return Err(Reason::PassIpv6Extension);
        }
        off += (usize::from(ext_len) + 1) * 8;
        if off > l3_end {
            return Err(Reason::PassMalformed);
        }
        next = ext_next;
        walked += 1;
    }
    let l4_off = off;
    let (src_port_be, dst_port_be, l4_check_off, tcp_flags) = if next == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(data, data_end, l4_off).ok_or(Reason::PassTruncated)?;
        // SAFETY: as above.
        let tcp = unsafe { &*tcp };
        let doff = usize::from(tcp.doff()) * 4;
        if doff < TcpHdr::LEN || l4_off + doff > l3_end {
            return Err(Reason::PassMalformed);
        }
        // SAFETY: the header was bounds checked above; byte 13 is the flags byte.
        let flags = unsafe { *(tcp as *const TcpHdr).cast::<u8>().add(13) };
        if !tcp_flags_valid(flags) {
            return Err(Reason::PassMalformed);
        }
        (
            u16::from_ne_bytes(tcp.source),
            u16::from_ne_bytes(tcp.dest),
            l4_off + 16,
            flags,
        )
    } else {
        let udp: *const UdpHdr = ptr_at(data, data_end, l4_off).ok_or(Reason::PassTruncated)?;
        // SAFETY: as above.
        let udp = unsafe { &*udp };
        let udp_len = usize::from(u16::from_be_bytes(udp.len));
        if udp_len < UdpHdr::LEN || l4_off + udp_len > l3_end {
            return Err(Reason::PassMalformed);
        }
        // A zero checksum is invalid in IPv6 (RFC 8200 8.1): the kernel drops such datagrams,
        // but for tunnels that allow it.
        if !ZERO_UDP_CHECKSUM && udp.check == [0, 0] {
            key.src_port_be = u16::from_ne_bytes(udp.src);
            key.dst_port_be = u16::from_ne_bytes(udp.dst);
            key.proto = next;
            return Err(Reason::PassMalformed);
        }
        (
            u16::from_ne_bytes(udp.src),
            u16::from_ne_bytes(udp.dst),
            l4_off + 6,
            0,
        )
    };
    key.src_port_be = src_port_be;
    key.dst_port_be = dst_port_be;
    key.proto = next;
    key._pad = [0; 3];
    Ok(Packet6 {
        l4_off,
        proto: next,
        hop_limit: header[7],
        payload_len,
        src_port_be,
        dst_port_be,
        l4_check_off,
        tcp_flags,
    })
}
