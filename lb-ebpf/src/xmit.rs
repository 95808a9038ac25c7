//! Transmission where XDP's own cannot deliver. A veth takes the frames XDP sends into it
//! (XDP_TX on it, or a redirect to it) only while its peer runs an XDP program: the kernel
//! (`veth_xdp_flush`) wakes the peer's queue only then, so towards an ordinary peer (a bridge
//! port, a container's end) the frames would wait unseen. On such interfaces (`TX_VIA_TC`) XDP
//! hands the readied frame to the kernel with a note in its metadata, and the TC ingress
//! program, the first thing the kernel runs on it, sends it with `bpf_redirect`, through the
//! interface's ordinary transmit path, which delivers to any peer.
use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    helpers::generated::{bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use lb_common::Reason;

use crate::{maps::TX_VIA_TC, parse::ptr_at, stats};

/// The note XDP leaves in a frame's metadata for the TC ingress program.
#[repr(C)]
#[derive(Clone, Copy)]
struct XmitNote {
    /// The instance's cookie for the interface (`TX_VIA_TC`): metadata left by anyone else
    /// (another instance's XDP on a peer, another program) never matches it.
    cookie: u32,
    /// Where the frame leaves, with [`NOTE_PEER`] set when it goes into the other end of that
    /// interface (a veth's peer in another namespace, `bpf_redirect_peer`: the frame is
    /// received there, as if it came in on that interface) rather than out of it. Not a field
    /// of its own: the note's 4 more bytes would not fit on the XDP program's stack.
    ifindex: u32,
}

/// `XmitNote::ifindex`: into the interface's other end. Interface indexes are positive `int`s,
/// so the top bit is never an index's own.
const NOTE_PEER: u32 = 1 << 31;
const NOTE_LEN: usize = core::mem::size_of::<XmitNote>();

/// When frames for `ifindex` must leave through TC: readies the hand-over and returns
/// `XDP_PASS`. `None`: XDP sends the frame itself (or the metadata could not be made, which
/// only a driver without metadata support refuses). Called only for an interface the route
/// cache found in `TX_VIA_TC` (`forward::XMIT_VIA_TC`), so that XDP's own sends skip the
/// lookup. `peer`: into the other end of `ifindex`, a bridge port (`BRIDGE_PORTS`).
#[inline(always)]
pub fn through_tc(ctx: &XdpContext, ifindex: u32, peer: bool) -> Option<u32> {
    // SAFETY: copied out at once.
    let cookie = *unsafe { TX_VIA_TC.get(&ifindex) }?;
    // SAFETY: the helper only moves ctx->data_meta; the pointer is derived afterwards.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx.cast(), -(NOTE_LEN as i32)) } != 0 {
        return None;
    }
    let note: *mut XmitNote = ptr_at(ctx.metadata(), ctx.data(), 0)?;
    let ifindex = if peer { ifindex | NOTE_PEER } else { ifindex };
    // SAFETY: bounds checked by ptr_at against the start of the packet.
    unsafe { note.write_unaligned(XmitNote { cookie, ifindex }) };
    Some(xdp_action::XDP_PASS)
}

/// The TC ingress program: sends the frames XDP handed over (see [`through_tc`]); every other
/// packet goes on its way untouched.
#[inline(always)]
pub fn try_lb_tc_ingress(ctx: &TcContext) -> i32 {
    // SAFETY: the context points at the program's __sk_buff for the whole run.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    // Metadata starts with the note when XDP left one; its cookie tells (an equality check on
    // the length instead would not teach the verifier the bounds).
    let Some(note) = ptr_at::<XmitNote>(meta, data, 0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: bounds checked by ptr_at.
    let note = unsafe { note.read_unaligned() };
    let ifindex = note.ifindex & !NOTE_PEER;
    // SAFETY: copied out at once.
    if unsafe { TX_VIA_TC.get(&ifindex) }.copied() != Some(note.cookie) {
        return TC_ACT_UNSPEC;
    }
    if note.ifindex & NOTE_PEER != 0 {
        stats::count_reason(Reason::XmitPeer, u64::from(ctx.len()));
        // SAFETY: plain helper call; it only records where the skb goes. The kernel resets the
        // skb's packet type for the other namespace, as a received frame addressed to it.
        return unsafe { bpf_redirect_peer(ifindex, 0) as i32 };
    }
    stats::count_reason(Reason::XmitTc, u64::from(ctx.len()));
    // SAFETY: plain helper call; it only records where the skb goes.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
