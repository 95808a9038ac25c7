//! Where a rewritten packet goes: a FIB lookup decides between sending it straight back out
//! (XDP_TX), redirecting it to another lbctl interface, or handing it to the kernel.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup_helper, bpf_jiffies64},
    programs::XdpContext,
};
use lb_common::{BridgePortKey, Reason};
use network_types::eth::EthHdr;

use crate::{
    csum,
    maps::{
        BRIDGE_PORTS, CachedRoute, PEER_PORTS, ROUTE_CACHE, ROUTE_CACHE_BITS, ROUTE_CACHE6,
        TX_PORTS, TX_VIA_TC,
    },
    nat::{load16, store16},
    parse::{IP_CHECK_OFF, IP_TTL_OFF, Packet, ptr_at},
    parse6::Packet6,
    xmit,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The next hop of a packet, as the kernel's FIB sees it.
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The egress MTU, when the lookup was given a length to check and succeeded.
    pub mtu: u16,
    /// How XDP sends to `ifindex`, `XMIT_*` flags (filled by [`fib_lookup_cached`], XDP's
    /// lookup; 0 from [`fib_lookup_raw`]). One byte in the struct's padding: the XDP program's
    /// stack has no room for more.
    pub xmit: u8,
}

/// `NextHop::xmit`: XDP may redirect there (an lbctl interface, `TX_PORTS`, or a bridge port).
pub const XMIT_REDIRECT: u8 = 1;
/// `NextHop::xmit`: frames for it go through the TC ingress program (`xmit`, `TX_VIA_TC`).
pub const XMIT_VIA_TC: u8 = 2;
/// `NextHop::xmit`: `ifindex` is a bridge port (`BRIDGE_PORTS`) that TC sends the frame through
/// to its other end, into the next hop's own namespace (`bpf_redirect_peer`).
pub const XMIT_PEER: u8 = 4;

/// How long a cached FIB answer is used, in ticks of the kernel's clock (`jiffies`): route and
/// neighbour changes reach the data plane within this time, 100 ms at HZ=250 (Debian's
/// kernels), 25 ms at HZ=1000. Ticks rather than nanoseconds because the verifier inlines
/// `bpf_jiffies64` into a load, where a clock read is a helper call on every packet.
const ROUTE_CACHE_TTL_JIFFIES: u64 = 25;

/// How a packet leaves XDP.
pub enum Egress {
    /// Back out of the interface it came in on.
    Tx(NextHop),
    /// Out of another interface lbctl is attached to.
    Redirect(NextHop),
    /// Through the kernel stack: the next hop is elsewhere, unresolved, or needs the kernel.
    Stack,
}

impl Egress {
    /// The way out for a packet that must not go into a bridge port's other end (a reply, an
    /// encapsulated packet: sent as before, through the kernel): such a redirect becomes
    /// `Stack`.
    #[inline(always)]
    pub fn without_peer(self) -> Egress {
        match self {
            Egress::Redirect(hop) if hop.xmit & XMIT_PEER != 0 => Egress::Stack,
            egress => egress,
        }
    }
}

/// Looks up the route from `src` to `dst` (network byte order) for a packet of `tot_len` bytes
/// (IPv4 total length, 0 to skip the MTU check) as if it had arrived on `ifindex`. Works for XDP
/// and TC contexts alike. Returns the kernel's `BPF_FIB_LKUP_RET_*` code and the next hop.
#[inline(always)]
pub fn fib_lookup_raw(
    ctx: *mut c_void,
    ifindex: u32,
    proto: u8,
    tot_len: u16,
    src_ip_be: u32,
    dst_ip_be: u32,
) -> (u32, NextHop) {
    let query = FibQuery::new(ifindex, proto, tot_len, src_ip_be, dst_ip_be);
    // SAFETY: all-zero is a valid NextHop.
    let mut hop: NextHop = unsafe { core::mem::zeroed() };
    let rc = fib_lookup_into(ctx, &query, &mut hop);
    (rc, hop)
}

/// What [`fib_lookup6`] asks the FIB: the route from `src` to `dst` for a packet of `tot_len`
/// bytes (IPv6 header included, 0 to skip the MTU check) arriving on `ifindex`.
pub struct Fib6Query<'a> {
    pub ifindex: u32,
    pub tot_len: u16,
    /// The packet's transport protocol (for policy routing by protocol).
    pub proto: u8,
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
}

/// [`fib_lookup_raw`] for IPv6 (`query`), the next hop written to `hop`. For the encapsulation
/// to a node of an IPv6 underlay, in TC (XDP goes through [`fib_lookup6_cached`]). In a frame
/// of its own: its 64-byte parameters.
#[inline(never)]
pub fn fib_lookup6(ctx: *mut c_void, query: &Fib6Query, hop: &mut NextHop) -> u32 {
    fib_lookup6_into(ctx, query, hop)
}

/// [`fib_lookup6`]'s work, in its caller's frame.
#[inline(always)]
fn fib_lookup6_into(ctx: *mut c_void, query: &Fib6Query, hop: &mut NextHop) -> u32 {
    let Fib6Query {
        ifindex,
        tot_len,
        proto,
        src,
        dst,
    } = *query;
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex;
    // SAFETY: 16 bytes of address into the 16 bytes of the unions' IPv6 members.
    unsafe {
        params.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(*src);
        params.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(*dst);
    }
    hop.xmit = 0;
    ask_fib(ctx, &mut params, hop)
}

/// [`fib_lookup6`] through the IPv6 route cache (`ROUTE_CACHE6`, as [`fib_lookup_cached`] for
/// IPv4: a FIB lookup costs more than the rest of an established flow's path), for XDP: a
/// successful answer is kept for [`ROUTE_CACHE_TTL_JIFFIES`] with how XDP
/// sends to its next hop ([`how_to_send`]), and a packet longer than its MTU then gets
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED`. `query.tot_len` must not be 0. In a frame of its own.
#[inline(never)]
pub fn fib_lookup6_cached(ctx: *mut c_void, query: &Fib6Query, hop: &mut NextHop) -> u32 {
    // The FIB's parameters in a frame of their own: `lb_xdp6_encap`'s is large.
    through_route_cache6(query, hop, |hop| fib_lookup6(ctx, query, hop))
}

/// The route cache's part of [`fib_lookup6_cached`], `lookup` asking the FIB on a miss. Inline:
/// `decide6_into` has it in its own frame, the FIB's parameters with it (one frame more would
/// not fit `lb_xdp6`'s stack).
#[inline(always)]
fn through_route_cache6(
    query: &Fib6Query,
    hop: &mut NextHop,
    lookup: impl FnOnce(&mut NextHop) -> u32,
) -> u32 {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_jiffies64() };
    let dst = query.dst;
    let words = |at: usize| u32::from_ne_bytes([dst[at], dst[at + 1], dst[at + 2], dst[at + 3]]);
    let mixed = words(0) ^ words(4) ^ words(8) ^ words(12);
    let slot = mixed.wrapping_mul(0x9e37_79b1) >> (32 - ROUTE_CACHE_BITS);
    let cache = ROUTE_CACHE6.get_ptr_mut(slot);
    if let Some(entry) = cache {
        // SAFETY: this CPU's slot; nothing else writes it while the program runs.
        let cached = unsafe { &*entry };
        if cached.checked_jiffies != 0
            && cached.dst == *dst
            && cached.ingress_ifindex == query.ifindex
            && now.wrapping_sub(cached.checked_jiffies) < ROUTE_CACHE_TTL_JIFFIES
        {
            hop.ifindex = cached.ifindex;
            hop.smac = cached.smac;
            hop.dmac = cached.dmac;
            hop.mtu = cached.mtu;
            hop.xmit = cached.xmit;
            return if query.tot_len > cached.mtu {
                BPF_FIB_LKUP_RET_FRAG_NEEDED
            } else {
                BPF_FIB_LKUP_RET_SUCCESS
            };
        }
    }
    let rc = lookup(hop);
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return rc;
    }
    how_to_send(hop);
    // A kernel that did not report the MTU left the length in its place: nothing to cache.
    if let Some(entry) = cache
        && hop.mtu != query.tot_len
    {
        // SAFETY: as above; field by field, as `decide6_into`.
        unsafe {
            (*entry).checked_jiffies = now;
            (*entry).dst = *dst;
            (*entry).ingress_ifindex = query.ifindex;
            (*entry).ifindex = hop.ifindex;
            (*entry).mtu = hop.mtu;
            (*entry).smac = hop.smac;
            (*entry).dmac = hop.dmac;
            (*entry).xmit = hop.xmit;
        }
    }
    rc
}

/// What [`fib_lookup_uncached`] asks the FIB.
#[repr(C)]
struct FibQuery {
    ifindex: u32,
    src_ip_be: u32,
    dst_ip_be: u32,
    tot_len: u16,
    proto: u8,
    _pad: u8,
}

impl FibQuery {
    #[inline(always)]
    fn new(ifindex: u32, proto: u8, tot_len: u16, src_ip_be: u32, dst_ip_be: u32) -> FibQuery {
        FibQuery {
            ifindex,
            src_ip_be,
            dst_ip_be,
            tot_len,
            proto,
            _pad: 0,
        }
    }
}

/// [`fib_lookup_raw`] in a frame of its own (a BPF-to-BPF call): its 64-byte `bpf_fib_lookup`
/// parameters are not on the XDP program's main frame, which is at the verifier's stack limit.
/// Writes the next hop to `hop` and returns the kernel's code.
#[inline(never)]
fn fib_lookup_uncached(ctx: *mut c_void, query: &FibQuery, hop: &mut NextHop) -> u32 {
    fib_lookup_into(ctx, query, hop)
}

/// Asks the kernel's FIB `query`, writing the next hop straight into `hop` (a copy would take
/// stack too). Returns the kernel's `BPF_FIB_LKUP_RET_*` code.
#[inline(always)]
fn fib_lookup_into(ctx: *mut c_void, query: &FibQuery, hop: &mut NextHop) -> u32 {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = query.proto;
    params.__bindgen_anon_1.tot_len = query.tot_len;
    params.ifindex = query.ifindex;
    params.__bindgen_anon_3.ipv4_src = query.src_ip_be;
    params.__bindgen_anon_4.ipv4_dst = query.dst_ip_be;
    ask_fib(ctx, &mut params, hop)
}

/// Asks the kernel's FIB `params` (of either family), the next hop written to `hop` (its
/// `xmit` left as it is). Returns the kernel's `BPF_FIB_LKUP_RET_*` code.
#[inline(always)]
fn ask_fib(ctx: *mut c_void, params: &mut bpf_fib_lookup, hop: &mut NextHop) -> u32 {
    // SAFETY: the helper reads and writes only `params`, whose size it is given.
    let rc = unsafe {
        fib_lookup_helper(
            ctx,
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    hop.ifindex = params.ifindex;
    hop.smac = params.smac;
    hop.dmac = params.dmac;
    // SAFETY: a plain u16 either way (the kernel writes the MTU over the length).
    hop.mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    rc as u32
}

/// [`fib_lookup_raw`] through a per-CPU cache of recent answers by destination, for XDP, with
/// how XDP sends to the next hop (`NextHop::xmit`, [`how_to_send`]).
///
/// A FIB lookup costs more than all the rest of an established flow's path, and the next hop
/// of a backend, a node or a client rarely changes: so each CPU keeps what the FIB answered
/// for [`ROUTE_CACHE_TTL_JIFFIES`], in a direct-mapped table (a colliding destination just
/// looks up again). The source address only matters to policy routing by source, which a
/// cached answer ignores for that time. So do the entries of `TX_VIA_TC` and `TX_PORTS`, which
/// change only when an interface is attached or detached (an attach loads new programs, with
/// an empty cache; a frame redirected to an interface just detached goes to the kernel), and
/// of `BRIDGE_PORTS` and `PEER_PORTS` (a port deleted meanwhile drops what TC sends into it).
/// `tot_len` must not be 0: the cached MTU is checked against it.
#[inline(always)]
pub fn fib_lookup_cached(
    ctx: *mut c_void,
    ingress_ifindex: u32,
    proto: u8,
    tot_len: u16,
    src_ip_be: u32,
    dst_ip_be: u32,
) -> (u32, NextHop) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_jiffies64() };
    let slot = dst_ip_be.wrapping_mul(0x9e37_79b1) >> (32 - ROUTE_CACHE_BITS);
    let cache = ROUTE_CACHE.get_ptr_mut(slot);
    if let Some(entry) = cache {
        // SAFETY: this CPU's slot; nothing else writes it while the program runs.
        let cached = unsafe { *entry };
        if cached.checked_jiffies != 0
            && cached.dst_ip_be == dst_ip_be
            && cached.ingress_ifindex == ingress_ifindex
            && now.wrapping_sub(cached.checked_jiffies) < ROUTE_CACHE_TTL_JIFFIES
        {
            let rc = if cached.rc == BPF_FIB_LKUP_RET_SUCCESS && tot_len > cached.mtu {
                BPF_FIB_LKUP_RET_FRAG_NEEDED
            } else {
                cached.rc
            };
            let hop = NextHop {
                ifindex: cached.ifindex,
                smac: cached.smac,
                dmac: cached.dmac,
                mtu: cached.mtu,
                xmit: cached.xmit,
            };
            return (rc, hop);
        }
    }
    let query = FibQuery::new(ingress_ifindex, proto, tot_len, src_ip_be, dst_ip_be);
    // SAFETY: all-zero is a valid NextHop.
    let mut hop: NextHop = unsafe { core::mem::zeroed() };
    let rc = fib_lookup_uncached(ctx, &query, &mut hop);
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        how_to_send(&mut hop);
    }
    // A kernel that did not report the MTU left the length in its place: nothing to cache.
    let cacheable =
        rc == BPF_FIB_LKUP_RET_NOT_FWDED || (rc == BPF_FIB_LKUP_RET_SUCCESS && hop.mtu != tot_len);
    if let Some(entry) = cache
        && cacheable
    {
        let fresh = CachedRoute {
            checked_jiffies: now,
            dst_ip_be,
            ingress_ifindex,
            ifindex: hop.ifindex,
            rc,
            mtu: if rc == BPF_FIB_LKUP_RET_SUCCESS {
                hop.mtu
            } else {
                0
            },
            smac: hop.smac,
            dmac: hop.dmac,
            xmit: hop.xmit,
            _pad: 0,
        };
        // SAFETY: as above.
        unsafe { *entry = fresh };
    }
    (rc, hop)
}

/// Fills in how XDP sends to the FIB's next hop `hop` (`NextHop::xmit`): to an lbctl interface
/// (`TX_PORTS`) by redirect, or through TC when `TX_VIA_TC` says so; behind a port of one of the
/// node's bridges (`BRIDGE_PORTS`, by the neighbour's MAC), through TC into the port's other
/// end, `hop.ifindex` becoming the port. Anything else goes through the kernel. In a frame of
/// its own (a BPF-to-BPF call, made on a cache miss only), like [`fib_lookup_uncached`]: its
/// keys would not fit on the main frame.
#[inline(never)]
pub fn how_to_send(hop: &mut NextHop) {
    let mut xmit = 0;
    if TX_PORTS.get(hop.ifindex).is_some() {
        xmit = XMIT_REDIRECT;
    } else {
        let key = BridgePortKey {
            bridge_ifindex: hop.ifindex,
            mac: hop.dmac,
            _pad: [0; 2],
        };
        // SAFETY: copied out at once.
        if let Some(port) = unsafe { BRIDGE_PORTS.get(&key) }.copied()
            && PEER_PORTS.get(port).is_some()
        {
            hop.ifindex = port;
            xmit = XMIT_REDIRECT | XMIT_PEER;
        }
    }
    // SAFETY: only presence is read. (Also for the interface a packet came in on, which XDP_TX
    // sends out of: it need not be a redirect target.)
    if unsafe { TX_VIA_TC.get(&hop.ifindex) }.is_some() {
        xmit |= XMIT_VIA_TC;
    } else if xmit & XMIT_PEER != 0 {
        // Only TC can send into a port's other end: without its cookie, the kernel routes.
        xmit = 0;
    }
    hop.xmit = xmit;
}

/// [`fib_lookup_cached`] for the packet being handled by XDP.
#[inline(always)]
fn fib_lookup(ctx: &XdpContext, pkt: &Packet, src_ip_be: u32, dst_ip_be: u32) -> (u32, NextHop) {
    fib_lookup_cached(
        ctx.ctx.cast(),
        ctx.ingress_ifindex() as u32,
        pkt.proto,
        pkt.tot_len,
        src_ip_be,
        dst_ip_be,
    )
}

/// True when the packet's destination is one of this node's own addresses: one its interfaces
/// have (`HOST_ADDRS`: written at attach, kept current by the daemon). Not the FIB's answer:
/// it says "not forwarded" for a subnet's broadcast address as for a local one, and a
/// datagram to 192.168.1.255 would start a flow whose replies come from the broadcast address
/// (found by `cargo xtask fuzz`).
#[inline(always)]
pub fn is_local(pkt: &Packet) -> bool {
    crate::reply::is_host_addr(pkt.dst_ip_be)
}

/// Decides how a packet from `src` to `dst` leaves, without touching it.
#[inline(always)]
pub fn decide(ctx: &XdpContext, pkt: &Packet, src_ip_be: u32, dst_ip_be: u32) -> Egress {
    if pkt.ttl <= 1 {
        return Egress::Stack;
    }
    let (rc, hop) = fib_lookup(ctx, pkt, src_ip_be, dst_ip_be);
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Egress::Stack;
    }
    egress_of(hop, ctx.ingress_ifindex() as u32)
}

/// Readies a packet for its next hop, as a router does: new MAC addresses, TTL one less.
#[inline(always)]
pub fn prepare_l2(ctx: &XdpContext, hop: &NextHop) -> Option<()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    set_macs(data, data_end, hop)?;
    decrement_ttl(data, data_end)
}

/// [`prepare_l2`] for IPv6: the hop limit one less (IPv6 has no header checksum). A function
/// of its own rather than a test of the frame's type in `prepare_l2`, which would double the
/// paths the verifier walks after every IPv4 call.
#[inline(always)]
pub fn prepare_l2_6(ctx: &XdpContext, hop: &NextHop) -> Option<()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    set_macs(data, data_end, hop)?;
    let hop_limit: *mut u8 = ptr_at(data, data_end, crate::parse6::IP6_HOP_LIMIT_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *hop_limit = (*hop_limit).saturating_sub(1) };
    Some(())
}

#[inline(always)]
fn set_macs(data: usize, data_end: usize, hop: &NextHop) -> Option<()> {
    let eth: *mut EthHdr = ptr_at(data, data_end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = hop.dmac;
        (*eth).src_addr = hop.smac;
    }
    Some(())
}

/// [`decide`] for an IPv6 packet from `src` to `dst`: the FIB's next hop, through the per-CPU
/// cache `ROUTE_CACHE6` (as [`fib_lookup_cached`] for IPv4: answers kept for
/// [`ROUTE_CACHE_TTL_JIFFIES`], the length checked against the cached MTU: [`fib_lookup6_cached`],
/// which the encapsulation over an IPv6 underlay shares), and how XDP sends there. In frames of
/// their own, which hold the lookup's 64-byte parameters: the IPv6 path's stack is short.
#[inline(always)]
pub fn decide6(ctx: &XdpContext, pkt: &Packet6, src: &[u8; 16], dst: &[u8; 16]) -> Egress {
    let mut egress = Egress::Stack;
    decide6_into(ctx, pkt, src, dst, &mut egress);
    egress
}

/// [`decide6`]'s work, written to `egress` (a BPF function returns one register: an `Egress`
/// returned by value would be a pointer into this frame).
#[inline(never)]
fn decide6_into(
    ctx: &XdpContext,
    pkt: &Packet6,
    src: &[u8; 16],
    dst: &[u8; 16],
    egress: &mut Egress,
) {
    if pkt.hop_limit <= 1 {
        return;
    }
    let query = Fib6Query {
        ifindex: ctx.ingress_ifindex() as u32,
        tot_len: pkt.payload_len.saturating_add(40),
        proto: pkt.proto,
        src,
        dst,
    };
    // SAFETY: all-zero is a valid NextHop.
    let mut hop: NextHop = unsafe { core::mem::zeroed() };
    let lookup = |hop: &mut NextHop| fib_lookup6_into(ctx.ctx.cast(), &query, hop);
    if through_route_cache6(&query, &mut hop, lookup) == BPF_FIB_LKUP_RET_SUCCESS {
        *egress = egress_of(hop, query.ifindex);
    }
}

/// How a packet leaves by `hop`, having come in on `ingress`.
#[inline(always)]
fn egress_of(hop: NextHop, ingress: u32) -> Egress {
    if hop.ifindex == ingress {
        Egress::Tx(hop)
    } else if hop.xmit & XMIT_REDIRECT != 0 {
        Egress::Redirect(hop)
    } else {
        Egress::Stack
    }
}

/// TTL one less, with the header checksum updated. The caller made sure the TTL is above 1.
#[inline(always)]
pub fn decrement_ttl(data: usize, data_end: usize) -> Option<()> {
    // TTL and protocol share one 16-bit word of the header checksum.
    let old = load16(data, data_end, IP_TTL_OFF)?;
    let mut bytes = old.to_ne_bytes();
    bytes[0] = bytes[0].saturating_sub(1);
    let new = u16::from_ne_bytes(bytes);
    store16(data, data_end, IP_TTL_OFF, new)?;
    let check = load16(data, data_end, IP_CHECK_OFF)?;
    store16(
        data,
        data_end,
        IP_CHECK_OFF,
        csum::replace16(check, old, new),
    )
}

/// Sends a routed packet the way `egress` says, readied for its next hop when XDP sends it
/// itself. `reasons` are what it is counted under when it leaves by XDP_TX, by redirect, or
/// through the kernel.
#[inline(always)]
pub fn route(
    ctx: &XdpContext,
    egress: &Egress,
    reasons: [Reason; 3],
) -> Result<(u32, Reason), Reason> {
    route_readied_by(ctx, egress, reasons, prepare_l2)
}

/// [`route`] for an IPv6 packet.
#[inline(always)]
pub fn route6(
    ctx: &XdpContext,
    egress: &Egress,
    reasons: [Reason; 3],
) -> Result<(u32, Reason), Reason> {
    route_readied_by(ctx, egress, reasons, prepare_l2_6)
}

#[inline(always)]
fn route_readied_by(
    ctx: &XdpContext,
    egress: &Egress,
    reasons: [Reason; 3],
    prepare_l2: impl Fn(&XdpContext, &NextHop) -> Option<()>,
) -> Result<(u32, Reason), Reason> {
    let [tx, redirect, stack] = reasons;
    let reason = match egress {
        // Into a bridge port's other end, which only TC can send to: the note first, so that
        // a driver that cannot carry it (no XDP metadata) leaves the packet to the kernel as
        // it is, rather than readied for a next hop the kernel would take for another host.
        Egress::Redirect(hop) if hop.xmit & XMIT_PEER != 0 => {
            if xmit::through_tc(ctx, hop.ifindex, true).is_none() {
                return Ok((xdp_action::XDP_PASS, stack));
            }
            prepare_l2(ctx, hop).ok_or(Reason::PassTruncated)?;
            return Ok((xdp_action::XDP_PASS, redirect));
        }
        Egress::Tx(hop) => {
            prepare_l2(ctx, hop).ok_or(Reason::PassTruncated)?;
            tx
        }
        Egress::Redirect(hop) => {
            prepare_l2(ctx, hop).ok_or(Reason::PassTruncated)?;
            redirect
        }
        Egress::Stack => stack,
    };
    Ok((send(ctx, egress), reason))
}

/// Routes a client's packet, DNATed to `backend_ip_be`, to that backend (on this node), counted
/// as `forward_tx`, `forward_redirect` or `forward_stack`. `snat_ip_be` is the source a hairpin
/// flow's packet was given (0: none, the client's is kept): the kernel would drop a packet
/// with its own address as the source, so such a packet XDP cannot send itself is dropped
/// (`drop_snat_no_route`).
#[inline(always)]
pub fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    backend_ip_be: u32,
    snat_ip_be: u32,
) -> Result<(u32, Reason), Reason> {
    let src_ip_be = if snat_ip_be != 0 {
        snat_ip_be
    } else {
        pkt.src_ip_be
    };
    let egress = decide(ctx, pkt, src_ip_be, backend_ip_be);
    let outcome = route(
        ctx,
        &egress,
        [
            Reason::ForwardTx,
            Reason::ForwardRedirect,
            Reason::ForwardStack,
        ],
    );
    // Through the kernel (no next hop XDP sends to, or a bridge port's hand-over that could not
    // be made), untouched but for the NAT.
    if snat_ip_be != 0 && matches!(outcome, Ok((_, Reason::ForwardStack))) {
        return Ok((xdp_action::XDP_DROP, Reason::DropSnatNoRoute));
    }
    outcome
}

/// Sends a prepared packet: XDP_TX, a redirect through `TX_PORTS`, or, towards an interface
/// where those cannot deliver, through the TC ingress program (`xmit`). Never into a bridge
/// port's other end ([`route`] does that; the other paths take [`Egress::without_peer`]).
#[inline(always)]
pub fn send(ctx: &XdpContext, egress: &Egress) -> u32 {
    // Out of `hop.ifindex`, which for XDP_TX is the interface the frame came in on.
    let hop = match egress {
        Egress::Tx(hop) | Egress::Redirect(hop) => hop,
        Egress::Stack => return xdp_action::XDP_PASS,
    };
    if hop.xmit & XMIT_VIA_TC != 0
        && let Some(action) = xmit::through_tc(ctx, hop.ifindex, false)
    {
        return action;
    }
    match egress {
        Egress::Tx(_) => xdp_action::XDP_TX,
        Egress::Redirect(hop) => TX_PORTS
            .redirect(hop.ifindex, 0)
            .unwrap_or(xdp_action::XDP_PASS),
        Egress::Stack => xdp_action::XDP_PASS,
    }
}

/// Sends a decapsulated client packet on to its backend on this node.
#[inline(always)]
pub fn deliver(ctx: &XdpContext, inner: &Packet) -> Result<(u32, Reason), Reason> {
    let egress = decide(ctx, inner, inner.src_ip_be, inner.dst_ip_be);
    route(
        ctx,
        &egress,
        [Reason::DecapTx, Reason::DecapRedirect, Reason::DecapStack],
    )
}
