//! lbctl data plane: an XDP program on each attached interface (DNAT, reverse NAT,
//! forwarding), a TC egress program beside it (reverse NAT of replies the kernel routed) and a
//! TC ingress program that sends what XDP cannot send itself on that interface (`xmit`); and
//! the socket programs on the cgroup v2 root, which balance the node's own clients (`socklb`).
#![no_std]
#![no_main]
// Atomic add for the round-robin cursor: the bpf target has no core::sync::atomic RMW.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod conntrack6;
mod csum;
mod decap;
mod egress;
mod encap;
mod forward;
mod frag;
mod icmp;
mod icmp6;
mod ingress;
mod ingress6;
mod maps;
mod mss;
mod nat;
mod parse;
mod parse6;
mod passive;
mod reply;
mod select;
mod snat;
mod socklb;
mod stats;
mod xmit;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if parse6::is_ipv6(ctx.data(), ctx.data_end()) {
        // SAFETY: the index names an XDP program, as the tail call requires.
        let _ = unsafe { maps::IPV6_XDP_PROGRAM.tail_call(&ctx, 0) };
        // No IPv6 program loaded: IPv6 passes untouched.
        stats::count_reason(lb_common::Reason::PassNotIpv4, bytes);
        return xdp_action::XDP_PASS;
    }
    let (action, reason) = match ingress::try_lb_xdp(&ctx) {
        Ok(outcome) => outcome,
        Err(reason) => (xdp_action::XDP_PASS, reason),
    };
    stats::count_reason(reason, bytes);
    action
}

/// The IPv6 half of `lb_xdp`, tail-called by it (`maps::IPV6_PROGRAMS`).
#[xdp]
pub fn lb_xdp6(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) =
        ingress6::try_xdp(&ctx).unwrap_or_else(|reason| (xdp_action::XDP_PASS, reason));
    stats::count_reason(reason, bytes);
    action
}

/// An IPv6 frame decapsulated by `lb_xdp` (a client's packet for a backend here, or the reply
/// of a flow this node balanced), tail-called by it (`maps::IPV6_DECAP_PROGRAM`).
#[xdp]
pub fn lb_xdp6_decap(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) = ingress6::try_xdp_from_node(&ctx);
    stats::count_reason(reason, bytes);
    action
}

/// VXLAN encapsulation of a DNATed packet to its backend's node, tail-called with a stack of
/// its own (`maps::IPV6_ENCAP_PROGRAM`) by `lb_xdp6` (an IPv6 packet) and by `lb_xdp` (an IPv4
/// packet to a node of an IPv6 underlay).
#[xdp]
pub fn lb_xdp6_encap(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) = encap::xdp_from_handoff(&ctx);
    stats::count_reason(reason, bytes);
    action
}

/// An ICMPv6 error about a reply, sent to the service address by the client's side, for the
/// flow's backend (`icmp6::xdp_to_backend`); tail-called by `lb_xdp6` for ICMPv6.
#[xdp]
pub fn lb_xdp6_icmp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) =
        icmp6::xdp_to_backend(&ctx).unwrap_or_else(|reason| (xdp_action::XDP_PASS, reason));
    stats::count_reason(reason, bytes);
    action
}

/// VXLAN over an IPv6 underlay to this node, decapsulated (`decap::xdp_from_node6`),
/// tail-called by `lb_xdp6` (`maps::OVERLAY6_PROGRAM`).
#[xdp]
pub fn lb_xdp6_overlay(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) =
        decap::xdp_from_node6(&ctx).unwrap_or_else(|reason| (xdp_action::XDP_PASS, reason));
    stats::count_reason(reason, bytes);
    action
}

/// VXLAN encapsulation over an IPv6 underlay of a reply TC sends back to its ingress node,
/// tail-called by `lb_tc_egress` and `lb_tc_egress6` (`maps::TC_ENCAP6_PROGRAM`).
#[classifier]
pub fn lb_tc_encap6(mut ctx: TcContext) -> i32 {
    encap::tc_from_handoff(&mut ctx)
}

/// The IPv6 half of `lb_tc_egress`, tail-called by it.
#[classifier]
pub fn lb_tc_egress6(mut ctx: TcContext) -> i32 {
    ingress6::try_tc_reply(&mut ctx).unwrap_or(TC_ACT_UNSPEC)
}

/// ICMPv6 errors about IPv6 flows on their way out, translated for their clients; tail-called
/// by `lb_tc_egress6` (`maps::IPV6_TC_ICMP_PROGRAM`).
#[classifier]
pub fn lb_tc_icmp6(mut ctx: TcContext) -> i32 {
    icmp6::tc_translate(&mut ctx)
}

#[classifier]
pub fn lb_tc_egress(mut ctx: TcContext) -> i32 {
    if parse6::is_ipv6(ctx.data(), ctx.data_end()) {
        // SAFETY: the index names a TC program, as the tail call requires.
        let _ = unsafe { maps::IPV6_TC_PROGRAM.tail_call(&ctx, 0) };
        return TC_ACT_UNSPEC;
    }
    // Unless the packet was redirected or must be dropped, let the next program or the default
    // action decide (TC_ACT_UNSPEC is TCX_NEXT).
    egress::try_lb_tc_egress(&mut ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    xmit::try_lb_tc_ingress(&ctx)
}

// The socket programs: each lets the call go on (1), its address rewritten or not, or fails it
// (0: EPERM).

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    socklb::to_service(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    socklb::to_service(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    socklb::from_peer(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    socklb::from_peer(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
