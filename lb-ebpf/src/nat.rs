//! Address and port rewrites in XDP, with incremental checksum updates.
use crate::{
    csum,
    parse::{IP_CHECK_OFF, IP_DST_OFF, IP_SRC_OFF, Packet, ptr_at},
    parse6::{IP6_DST_OFF, IP6_SRC_OFF, Packet6},
};
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{Addr6, FlowKey6, PROTO_UDP};

#[inline(always)]
pub fn load16(data: usize, data_end: usize, off: usize) -> Option<u16> {
    let p: *const [u8; 2] = ptr_at(data, data_end, off)?;
    // SAFETY: bounds checked by ptr_at; byte arrays need no alignment.
    Some(u16::from_ne_bytes(unsafe { *p }))
}

#[inline(always)]
pub fn store16(data: usize, data_end: usize, off: usize, value: u16) -> Option<()> {
    let p: *mut [u8; 2] = ptr_at(data, data_end, off)?;
    // SAFETY: as above.
    unsafe { *p = value.to_ne_bytes() };
    Some(())
}

#[inline(always)]
fn store32(data: usize, data_end: usize, off: usize, value: u32) -> Option<()> {
    let p: *mut [u8; 4] = ptr_at(data, data_end, off)?;
    // SAFETY: as above.
    unsafe { *p = value.to_ne_bytes() };
    Some(())
}

/// `value`, which LLVM can no longer reason about (the verifier still can).
#[inline(always)]
pub fn opaque(value: usize) -> usize {
    // SAFETY: reading a local.
    unsafe { core::ptr::read_volatile(&value) }
}

/// Which end of the connection a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// Destination: DNAT of client → service packets.
    Dst,
    /// Source: reverse NAT of backend → client replies.
    Src,
}

/// Rewrites one end's address and port, keeping the IPv4 and TCP/UDP checksums valid.
#[inline(always)]
pub fn rewrite(
    data: usize,
    data_end: usize,
    pkt: &Packet,
    side: Side,
    new_ip_be: u32,
    new_port_be: u16,
) -> Option<()> {
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Dst => (IP_DST_OFF, pkt.l4_off + 2, pkt.dst_ip_be, pkt.dst_port_be),
        Side::Src => (IP_SRC_OFF, pkt.l4_off, pkt.src_ip_be, pkt.src_port_be),
    };
    let l4_check = load16(data, data_end, pkt.l4_check_off)?;
    rewrite_address(data, data_end, ip_off, old_ip, new_ip_be)?;
    store16(data, data_end, port_off, new_port_be)?;
    let l4_check = csum::update_l4(l4_check, pkt.proto == PROTO_UDP, |check| {
        // The TCP/UDP checksum covers the addresses through the pseudo-header.
        csum::replace16(
            csum::replace32(check, old_ip, new_ip_be),
            old_port,
            new_port_be,
        )
    });
    store16(data, data_end, pkt.l4_check_off, l4_check)
}

/// Rewrites one end's address alone (a fragment after the first carries no ports), keeping the
/// IPv4 header checksum valid.
#[inline(always)]
pub fn rewrite_address_only(
    data: usize,
    data_end: usize,
    side: Side,
    old_ip_be: u32,
    new_ip_be: u32,
) -> Option<()> {
    let ip_off = match side {
        Side::Dst => IP_DST_OFF,
        Side::Src => IP_SRC_OFF,
    };
    rewrite_address(data, data_end, ip_off, old_ip_be, new_ip_be)
}

/// Rewrites the address at `ip_off` (source or destination) and the IPv4 header checksum.
///
/// The offsets are hidden from LLVM: after a rewrite of the ports, whose checks are at the
/// transport header's variable offset, LLVM drops the check of a fixed offset before it as
/// implied, which the verifier cannot follow (a hairpin flow's second rewrite). The verifier
/// still sees the constants, through the stack.
#[inline(always)]
fn rewrite_address(
    data: usize,
    data_end: usize,
    ip_off: usize,
    old_ip_be: u32,
    new_ip_be: u32,
) -> Option<()> {
    let check_off = opaque(IP_CHECK_OFF);
    let ip_check = load16(data, data_end, check_off)?;
    store32(data, data_end, opaque(ip_off), new_ip_be)?;
    store16(
        data,
        data_end,
        check_off,
        csum::replace32(ip_check, old_ip_be, new_ip_be),
    )
}

// The TC programs' rewrites go through the kernel's checksum helpers, which also handle a
// checksum left to the NIC (CHECKSUM_PARTIAL).

/// The L4 half of a TC rewrite of `side`: its port (`old_port` → `new_port`; the source port
/// at `l4_off`, the destination port after it, in both headers) and the checksum (at
/// `check_off`), which follows the address and the port (`old_ip` → `new_ip`; the address
/// itself is rewritten by [`tc_rewrite_l3`]). UDP's checksum 0 (none) stays 0.
#[inline(always)]
pub fn tc_rewrite_l4(
    ctx: &mut TcContext,
    side: Side,
    (l4_off, check_off, udp): (usize, usize, bool),
    (old_ip, old_port): (u32, u16),
    (new_ip, new_port): (u32, u16),
) -> Result<(), i64> {
    let udp_flag = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    ctx.l4_csum_replace(
        check_off,
        u64::from(old_ip),
        u64::from(new_ip),
        u64::from(BPF_F_PSEUDO_HDR) | udp_flag | 4,
    )?;
    ctx.l4_csum_replace(
        check_off,
        u64::from(old_port),
        u64::from(new_port),
        udp_flag | 2,
    )?;
    let port_off = match side {
        Side::Src => l4_off,
        Side::Dst => l4_off + 2,
    };
    ctx.store(port_off, &new_port, 0)
}

/// The L3 half of a TC rewrite of `side`: the address and the header checksum.
#[inline(always)]
pub fn tc_rewrite_l3(ctx: &mut TcContext, side: Side, old_ip: u32, new_ip: u32) -> Result<(), i64> {
    ctx.l3_csum_replace(IP_CHECK_OFF, u64::from(old_ip), u64::from(new_ip), 4)?;
    let ip_off = match side {
        Side::Src => IP_SRC_OFF,
        Side::Dst => IP_DST_OFF,
    };
    ctx.store(ip_off, &new_ip, 0)
}

/// Rewrites one end of an IPv6 packet (XDP): its address and port, with the TCP/UDP checksum
/// updated incrementally (IPv6 has no header checksum; the pseudo-header covers the addresses).
#[inline(always)]
pub fn rewrite6(
    (data, data_end): (usize, usize),
    pkt: &Packet6,
    key: &FlowKey6,
    side: Side,
    (new_ip, new_port_be): (&Addr6, u16),
) -> Option<()> {
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Dst => (IP6_DST_OFF, pkt.l4_off + 2, &key.dst, pkt.dst_port_be),
        Side::Src => (IP6_SRC_OFF, pkt.l4_off, &key.src, pkt.src_port_be),
    };
    let check = load16(data, data_end, pkt.l4_check_off)?;
    let address: *mut Addr6 = ptr_at(data, data_end, ip_off)?;
    // SAFETY: bounds checked by ptr_at; a byte array needs no alignment.
    unsafe { *address = *new_ip };
    store16(data, data_end, port_off, new_port_be)?;
    let check = csum::replace16(
        csum::replace128(check, old_ip, new_ip),
        old_port,
        new_port_be,
    );
    // A computed zero goes out as 0xffff: zero means "no checksum", invalid for IPv6 UDP.
    let check = if check == 0 && pkt.proto == PROTO_UDP {
        0xffff
    } else {
        check
    };
    store16(data, data_end, pkt.l4_check_off, check)
}

/// [`rewrite6`] in TC, through the kernel's helpers (which also keep a checksum left to the
/// NIC right): the address's checksum difference as one pseudo-header change, then the port.
#[inline(always)]
pub fn tc_rewrite6(
    ctx: &mut TcContext,
    pkt: &Packet6,
    key: &FlowKey6,
    side: Side,
    (new_ip, new_port_be): (&Addr6, u16),
) -> Result<(), i64> {
    let (ip_off, port_off, old_ip, old_port) = match side {
        Side::Dst => (IP6_DST_OFF, pkt.l4_off + 2, &key.dst, pkt.dst_port_be),
        Side::Src => (IP6_SRC_OFF, pkt.l4_off, &key.src, pkt.src_port_be),
    };
    let udp_flag = if pkt.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let mut old = *old_ip;
    let mut new = *new_ip;
    // SAFETY: both buffers are 16 bytes, as given; the helper only reads them.
    let diff =
        unsafe { bpf_csum_diff(old.as_mut_ptr().cast(), 16, new.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 {
        return Err(diff);
    }
    ctx.l4_csum_replace(
        pkt.l4_check_off,
        0,
        diff as u64,
        u64::from(BPF_F_PSEUDO_HDR) | udp_flag,
    )?;
    ctx.l4_csum_replace(
        pkt.l4_check_off,
        u64::from(old_port),
        u64::from(new_port_be),
        udp_flag | 2,
    )?;
    ctx.store(ip_off, new_ip, 0)?;
    ctx.store(port_off, &new_port_be, 0)
}
