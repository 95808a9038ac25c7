//! MSS clamping of the TCP connections that cross the mesh. A SYN or SYN-ACK encapsulated to
//! another node announces at most the segment that fits the tunnel (underlay MTU − 50 bytes of
//! encapsulation, 70 over an IPv6 underlay, − 40 of IPv4 and TCP headers, 60 of IPv6 and TCP), as
//! `iptables -j TCPMSS --clamp-mss-to-pmtu` does for tunnels. Without it, a task whose link has the underlay's MTU (a plain veth at
//! 1500) sends full-size segments that cannot be encapsulated, and TC, which cannot answer them
//! with an ICMP error, drops them: a download would hang. Clients learn the same limit from the
//! task's SYN-ACK, before their first large segment, instead of from a "fragmentation needed".
use aya_ebpf::programs::TcContext;
use lb_common::PROTO_TCP;

use crate::{
    csum,
    encap::Inner,
    parse::{TCP_SYN, ptr_at},
};

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
/// Options looked at before giving up: every stack puts the MSS first or after a few NOPs.
const MAX_OPTIONS: usize = 8;
/// Linux's smallest MSS it sends with (`tcp_min_snd_mss`): no clamp goes below it.
const MIN_MSS: u16 = 48;

/// The largest MSS a connection of `pkt`'s family through a tunnel over `underlay_mtu` can use:
/// the MTU less the encapsulation and the IP and TCP headers without options
/// (`Inner::mss_overhead`). `checked_len` is the length the FIB lookup was asked about: a kernel
/// that does not report the MTU leaves it in its place, and then nothing is clamped.
#[inline(always)]
fn limit(pkt: &Inner, underlay_mtu: u16, checked_len: u16) -> Option<u16> {
    if underlay_mtu <= checked_len {
        return None;
    }
    underlay_mtu
        .checked_sub(pkt.mss_overhead)
        .filter(|limit| *limit >= MIN_MSS)
}

/// Offset (from the start of the frame) of the MSS option's value in the TCP header at
/// `l4_off`, read through `load` (two bytes at an offset, `None` past the end).
#[inline(always)]
fn mss_value_off(load: impl Fn(usize) -> Option<[u8; 2]>, l4_off: usize) -> Option<usize> {
    let [data_offset, _] = load(l4_off + 12)?;
    let options_end = l4_off + usize::from(data_offset >> 4) * 4;
    let mut off = l4_off + 20;
    for _ in 0..MAX_OPTIONS {
        if off + 4 > options_end {
            return None;
        }
        let [kind, len] = load(off)?;
        match kind {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => off += 1,
            TCPOPT_MSS => return (len == 4).then_some(off + 2),
            _ if len < 2 => return None,
            _ => off += usize::from(len),
        }
    }
    None
}

/// The value to write for an MSS option holding `old_be` (wire order), if it must shrink.
#[inline(always)]
fn clamped(old_be: u16, limit: u16) -> Option<u16> {
    (u16::from_be(old_be) > limit).then(|| limit.to_be())
}

/// A checksum update of a 16-bit value at `off` from the TCP header: a value at an odd offset
/// straddles two of the checksum's words and counts byte-swapped.
#[inline(always)]
fn as_summed(value: u16, off: usize, l4_off: usize) -> u16 {
    if (off - l4_off) % 2 == 1 {
        value.swap_bytes()
    } else {
        value
    }
}

#[inline(always)]
fn is_tcp_syn_or_syn_ack(pkt: &Inner) -> bool {
    pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN != 0
}

/// Clamps the MSS of a SYN or SYN-ACK (XDP: the frame between `data` and `data_end`, checksum
/// complete) about to be encapsulated through an underlay of `underlay_mtu`.
#[inline(always)]
pub fn xdp_clamp(data: usize, data_end: usize, pkt: &Inner, underlay_mtu: u16, checked_len: u16) {
    if !is_tcp_syn_or_syn_ack(pkt) {
        return;
    }
    let Some(limit) = limit(pkt, underlay_mtu, checked_len) else {
        return;
    };
    let load = |off| {
        let at: *const [u8; 2] = ptr_at(data, data_end, off)?;
        // SAFETY: bounds checked by ptr_at.
        Some(unsafe { *at })
    };
    let Some(off) = mss_value_off(load, pkt.l4_off) else {
        return;
    };
    let (Some(mss_at), Some(check_at)) = (
        ptr_at::<u16>(data, data_end, off),
        ptr_at::<u16>(data, data_end, pkt.l4_check_off),
    ) else {
        return;
    };
    // SAFETY: bounds checked by ptr_at; packet data need not be aligned.
    unsafe {
        let old = mss_at.read_unaligned();
        let Some(new) = clamped(old, limit) else {
            return;
        };
        let check = check_at.read_unaligned();
        let (old_summed, new_summed) = (
            as_summed(old, off, pkt.l4_off),
            as_summed(new, off, pkt.l4_off),
        );
        check_at.write_unaligned(csum::replace16(check, old_summed, new_summed));
        mss_at.write_unaligned(new);
    }
}

/// Clamps the MSS of a SYN or SYN-ACK in an skb about to be encapsulated through an underlay
/// of `underlay_mtu` (TC). The kernel's checksum helper keeps a checksum left to the NIC right.
#[inline(always)]
pub fn tc_clamp(ctx: &mut TcContext, pkt: &Inner, underlay_mtu: u16, checked_len: u16) {
    if !is_tcp_syn_or_syn_ack(pkt) {
        return;
    }
    let Some(limit) = limit(pkt, underlay_mtu, checked_len) else {
        return;
    };
    let Some(off) = mss_value_off(|off| ctx.load::<[u8; 2]>(off).ok(), pkt.l4_off) else {
        return;
    };
    let Ok(old) = ctx.load::<u16>(off) else {
        return;
    };
    let Some(new) = clamped(old, limit) else {
        return;
    };
    let (old_summed, new_summed) = (
        as_summed(old, off, pkt.l4_off),
        as_summed(new, off, pkt.l4_off),
    );
    if ctx
        .l4_csum_replace(
            pkt.l4_check_off,
            u64::from(old_summed),
            u64::from(new_summed),
            2,
        )
        .is_ok()
    {
        let _ = ctx.store(off, &new, 0);
    }
}
