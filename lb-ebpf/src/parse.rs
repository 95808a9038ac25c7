//! Bounds-checked packet access and the Ethernet/IPv4/TCP/UDP parser.
use core::mem;

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

/// `ETH_P_IP` as it appears in the frame (network byte order) when read as a native u16.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset, in the IPv4 `frags` field.
const IP_MF_OR_OFFSET: u16 = 0x3fff;
/// The fragment offset in the flags and fragment offset field.
const IP_OFFSET: u16 = 0x1fff;

/// The one bounds-checked accessor: a pointer to a `T` at `offset` bytes into the packet, or
/// `None` if it would reach past `data_end`. All packet access goes through here.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    let start = data.checked_add(offset)?;
    if start.checked_add(mem::size_of::<T>())? > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// What the data plane needs of an IPv4 TCP or UDP packet. Addresses and ports keep the wire's
/// byte order (read as native integers from the packet bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub l4_off: usize,
    pub proto: u8,
    pub ttl: u8,
    /// IPv4 total length, in host byte order.
    pub tot_len: u16,
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// Offset of the TCP or UDP checksum field.
    pub l4_check_off: usize,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 for UDP.
    pub tcp_flags: u8,
}

impl Packet {
    /// A TCP SYN without ACK: the first packet of a connection, never a reply.
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment that can open or belong to a connection: it carries SYN, ACK or RST, and a
/// SYN carries neither FIN nor RST. No TCP stack accepts the others in any state (RFC 9293;
/// netfilter's conntrack calls them invalid): they are scans and evasion attempts, and are
/// never worth a flow.
#[inline(always)]
pub fn tcp_flags_valid(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST) != 0
        && (flags & TCP_SYN == 0 || flags & (TCP_FIN | TCP_RST) == 0)
}

/// Addresses the kernel drops as martians on any packet from the wire: a source that is
/// "this network" (0/8), loopback (127/8), multicast (224/4) or the limited broadcast, or a
/// destination in 0/8 or loopback. XDP runs before that check, so it makes it itself rather
/// than send such a packet on. Addresses in network byte order.
#[inline(always)]
fn is_martian(src: [u8; 4], dst: [u8; 4]) -> bool {
    matches!(src[0], 0 | 127 | 224..=239) || src == [255; 4] || matches!(dst[0], 0 | 127)
}

/// Offset of the IPv4 header: the data plane handles untagged Ethernet only.
pub const L3_OFF: usize = EthHdr::LEN;
/// Offset of the IPv4 header checksum.
pub const IP_CHECK_OFF: usize = L3_OFF + 10;
/// Offset of the IPv4 TTL (followed by the protocol byte).
pub const IP_TTL_OFF: usize = L3_OFF + 8;
pub const IP_SRC_OFF: usize = L3_OFF + 12;
pub const IP_DST_OFF: usize = L3_OFF + 16;

/// The IPv4 header of an untagged Ethernet frame, checked: version 4, a header length of at
/// least 20, and a total length that covers the header and lies within the frame. Returns the
/// header, its length and the packet's length. `big_tcp`: the frame is a TCP GSO packet in TC,
/// which may exceed IPv4's 64 KiB (BIG TCP): a total length of 0 then means the whole frame,
/// as the kernel reads it (`iph_totlen`).
#[inline(always)]
fn ipv4_header(
    data: usize,
    data_end: usize,
    frame_len: usize,
    big_tcp: bool,
) -> Result<(&'static Ipv4Hdr, usize, usize), Reason> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0).ok_or(Reason::PassNotIpv4)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Err(Reason::PassNotIpv4);
    }
    let ip: *const Ipv4Hdr = ptr_at(data, data_end, L3_OFF).ok_or(Reason::PassTruncated)?;
    // SAFETY: as above; the packet outlives the program's run, which is all a caller has.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Reason::PassMalformed);
    }
    let frame_l3_len = frame_len.saturating_sub(L3_OFF);
    let l3_len = match ip.tot_len() {
        0 if big_tcp && ip.proto == PROTO_TCP => frame_l3_len,
        tot_len => usize::from(tot_len),
    };
    if l3_len < ihl || l3_len > frame_l3_len {
        return Err(Reason::PassMalformed);
    }
    Ok((ip, ihl, l3_len))
}

/// Parses a frame whose headers lie between `data` and `data_end`. `frame_len` is the whole
/// frame's length, which for a TC skb may extend past `data_end` into paged data. `Err` names
/// why the frame is not for the load balancer; such frames are passed on untouched.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, frame_len: usize) -> Result<Packet, Reason> {
    parse_ipv4(data, data_end, frame_len, false)
}

/// [`parse`] for TC, where `gso` says the skb is a GSO packet (it may then be BIG TCP, see
/// [`ipv4_header`]).
#[inline(always)]
pub fn parse_tc(
    data: usize,
    data_end: usize,
    frame_len: usize,
    gso: bool,
) -> Result<Packet, Reason> {
    parse_ipv4(data, data_end, frame_len, gso)
}

#[inline(always)]
fn parse_ipv4(
    data: usize,
    data_end: usize,
    frame_len: usize,
    big_tcp: bool,
) -> Result<Packet, Reason> {
    let (ip, ihl, l3_len) = ipv4_header(data, data_end, frame_len, big_tcp)?;
    if u16::from_be_bytes(ip.frags) & IP_MF_OR_OFFSET != 0 {
        return Err(Reason::PassFragment);
    }
    if is_martian(ip.src_addr, ip.dst_addr) {
        return Err(Reason::PassMalformed);
    }
    let l4_off = L3_OFF + ihl;
    let l3_end = L3_OFF + l3_len;
    let (src_port_be, dst_port_be, l4_check_off, tcp_flags) = match ip.proto {
        PROTO_TCP => {
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
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(data, data_end, l4_off).ok_or(Reason::PassTruncated)?;
            // SAFETY: as above.
            let udp = unsafe { &*udp };
            // The UDP length covers its header and lies within the IPv4 packet (shorter is
            // allowed: the kernel trims the rest).
            let udp_len = usize::from(u16::from_be_bytes(udp.len));
            if udp_len < UdpHdr::LEN || l4_off + udp_len > l3_end {
                return Err(Reason::PassMalformed);
            }
            (
                u16::from_ne_bytes(udp.src),
                u16::from_ne_bytes(udp.dst),
                l4_off + 6,
                0,
            )
        }
        _ => return Err(Reason::PassNotTcpUdp),
    };
    Ok(Packet {
        l4_off,
        proto: ip.proto,
        ttl: ip.ttl,
        tot_len: ip.tot_len(),
        src_ip_be: u32::from_ne_bytes(ip.src_addr),
        dst_ip_be: u32::from_ne_bytes(ip.dst_addr),
        src_port_be,
        dst_port_be,
        l4_check_off,
        tcp_flags,
    })
}

/// An IPv4 fragment of a UDP datagram: its addresses and identification, and for the first
/// fragment (offset 0, more to come), which carries the UDP header, the ports and where the
/// header and its checksum sit. Addresses and ports in network byte order.
#[derive(Clone, Copy)]
pub struct Fragment {
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub id_be: u16,
    pub ttl: u8,
    /// IPv4 total length of this fragment, in host byte order.
    pub tot_len: u16,
    /// `(src_port_be, dst_port_be, l4_off)` of the first fragment.
    pub first: Option<(u16, u16, usize)>,
}

/// Parses an IPv4 fragment of a UDP datagram (what [`parse`] refuses as `PassFragment`), with
/// the same checks of the IPv4 header; `None` for anything else.
#[inline(always)]
pub fn parse_udp_fragment(data: usize, data_end: usize, frame_len: usize) -> Option<Fragment> {
    let (ip, ihl, tot_len) = ipv4_header(data, data_end, frame_len, false).ok()?;
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IP_MF_OR_OFFSET == 0 || ip.proto != PROTO_UDP || is_martian(ip.src_addr, ip.dst_addr)
    {
        return None;
    }
    let l4_off = L3_OFF + ihl;
    let first = if frags & IP_OFFSET == 0 {
        // The first fragment carries the whole UDP header (RFC 791: at least 8 bytes of data).
        let udp: *const UdpHdr = ptr_at(data, data_end, l4_off)?;
        if l4_off + UdpHdr::LEN > L3_OFF + tot_len {
            return None;
        }
        // SAFETY: as above.
        let udp = unsafe { &*udp };
        Some((
            u16::from_ne_bytes(udp.src),
            u16::from_ne_bytes(udp.dst),
            l4_off,
        ))
    } else {
        None
    };
    Some(Fragment {
        src_ip_be: u32::from_ne_bytes(ip.src_addr),
        dst_ip_be: u32::from_ne_bytes(ip.dst_addr),
        id_be: u16::from_ne_bytes(ip.id),
        ttl: ip.ttl,
        tot_len: tot_len as u16,
        first,
    })
}

/// IPv4's protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// ICMP destination unreachable, time exceeded and parameter problem: the errors a packet of a
/// flow can draw (RFC 792), which the kernel hands to the socket the quoted packet belongs to.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable's code "fragmentation needed and DF set" (RFC 1191).
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// The packet an ICMP error quotes (its IPv4 header and the first 8 bytes after it: the ports),
/// addresses and ports in network byte order, as that packet carried them.
#[derive(Clone, Copy)]
pub struct Quoted {
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
}

/// An ICMP error about a TCP or UDP packet: the error's own addresses and where its parts
/// sit, and the packet it quotes.
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub kind: u8,
    pub code: u8,
    pub ttl: u8,
    /// The error's IPv4 total length, in host byte order.
    pub tot_len: u16,
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    /// Offsets of the ICMP header, of the quoted IPv4 header and of the quoted transport
    /// header, and the end of the error's IPv4 packet.
    pub icmp_off: usize,
    pub quoted_off: usize,
    pub quoted_l4_off: usize,
    pub l3_end: usize,
    pub quoted: Quoted,
}

impl IcmpError {
    /// The error as a [`Packet`] for the FIB lookups and TTL of the way it is sent on (its own
    /// addresses; no ports).
    #[inline(always)]
    pub fn as_packet(&self) -> Packet {
        Packet {
            l4_off: self.icmp_off,
            proto: PROTO_ICMP,
            ttl: self.ttl,
            tot_len: self.tot_len,
            src_ip_be: self.src_ip_be,
            dst_ip_be: self.dst_ip_be,
            src_port_be: 0,
            dst_port_be: 0,
            l4_check_off: self.icmp_off + 2,
            tcp_flags: 0,
        }
    }
}

/// Parses an ICMP error (destination unreachable, time exceeded, parameter problem) that
/// quotes a TCP or UDP packet with at least the 8 bytes of its transport header an error must
/// quote (RFC 792; the kernel ignores one that quotes fewer, `icmp_unreach`, and so does the
/// data plane: found by `cargo xtask fuzz`, a quote cut after the ports was taken for a
/// refusal); `None` for anything else (echo, fragments, a quoted later fragment, truncated or
/// malformed quotes, martian addresses).
#[inline(always)]
pub fn parse_icmp_error(data: usize, data_end: usize, frame_len: usize) -> Option<IcmpError> {
    let (ip, ihl, l3_len) = ipv4_header(data, data_end, frame_len, false).ok()?;
    if ip.proto != PROTO_ICMP
        || u16::from_be_bytes(ip.frags) & IP_MF_OR_OFFSET != 0
        || is_martian(ip.src_addr, ip.dst_addr)
    {
        return None;
    }
    let icmp_off = L3_OFF + ihl;
    let icmp: *const [u8; 2] = ptr_at(data, data_end, icmp_off)?;
    // SAFETY: bounds checked above.
    let [kind, code] = unsafe { *icmp };
    if !matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return None;
    }
    let quoted_off = icmp_off + 8;
    let quoted: *const Ipv4Hdr = ptr_at(data, data_end, quoted_off)?;
    // SAFETY: as above.
    let quoted = unsafe { &*quoted };
    let quoted_ihl = usize::from(quoted.ihl());
    if quoted.version() != 4
        || quoted_ihl < Ipv4Hdr::LEN
        || !matches!(quoted.proto, PROTO_TCP | PROTO_UDP)
        || u16::from_be_bytes(quoted.frags) & IP_OFFSET != 0
    {
        return None;
    }
    let quoted_l4_off = quoted_off + quoted_ihl;
    let l3_end = L3_OFF + l3_len;
    if quoted_l4_off + 8 > l3_end {
        return None;
    }
    let ports: *const [u16; 2] = ptr_at(data, data_end, quoted_l4_off)?;
    // SAFETY: as above.
    let [src_port_be, dst_port_be] = unsafe { ports.read_unaligned() };
    Some(IcmpError {
        kind,
        code,
        ttl: ip.ttl,
        tot_len: l3_len as u16,
        src_ip_be: u32::from_ne_bytes(ip.src_addr),
        dst_ip_be: u32::from_ne_bytes(ip.dst_addr),
        icmp_off,
        quoted_off,
        quoted_l4_off,
        l3_end,
        quoted: Quoted {
            src_ip_be: u32::from_ne_bytes(quoted.src_addr),
            dst_ip_be: u32::from_ne_bytes(quoted.dst_addr),
            src_port_be,
            dst_port_be,
            proto: quoted.proto,
        },
    })
}

/// Whether an ICMP error says a connection cannot be made (destination unreachable: network,
/// host, protocol or port unreachable; network, host or communication administratively
/// prohibited) about a TCP segment. Other codes (fragmentation needed is about a path's MTU,
/// not about the host) and other errors are not.
#[inline(always)]
pub fn is_refusal(error: &IcmpError) -> bool {
    error.kind == ICMP_DEST_UNREACH
        && matches!(error.code, 0..=3 | 9 | 10 | 13)
        && error.quoted.proto == PROTO_TCP
}
