//! The flow table: which backend each connection is pinned to, and how to reverse-NAT replies.
use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
    maps::LruHashMap,
};
use lb_common::{
    BACKEND_ACTIVE, Event, FLOW_AWAITING_REPLY, FLOW_BACKEND_FIN, FLOW_CLIENT_FIN, FLOW_CLOSING,
    FLOW_SEEN_GRANULARITY_NS, FLOW_SNAT, FLOW_UNANSWERED_NS, FlowKey, FlowValue, PASSIVE_REFUSED,
    PROTO_TCP, Reason, ReverseValue, SnatValue, reverse_entry,
};

use crate::{
    encap,
    maps::{BACKENDS, FLOWS, REVERSE_FLOWS, SNAT_FLOWS, TUNNEL_REPLIES},
    parse::{self, IcmpError, Packet, Quoted, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    passive, snat,
    stats::count_event,
};

pub const EEXIST: i32 = 17;

#[inline(always)]
pub fn key_of(pkt: &Packet) -> FlowKey {
    FlowKey::new(
        pkt.src_ip_be,
        pkt.dst_ip_be,
        pkt.src_port_be,
        pkt.dst_port_be,
        pkt.proto,
    )
}

/// How a flow stands in the table.
pub enum Lookup {
    /// Pinned to a backend that is still in service. `was_idle`: the client had sent nothing
    /// for `FLOW_SEEN_GRANULARITY_NS` or more, long enough for the flow's reverse-NAT entry to
    /// have been evicted meanwhile (see [`restore_reverse`]).
    Pinned {
        flow: FlowValue,
        was_idle: bool,
    },
    /// Pinned to a backend that was removed (or now lives behind another node) since: the flow
    /// must choose again.
    Stale,
    /// A new connection (a SYN) on the 5-tuple of one that ended: a new flow.
    Reused,
    /// The client's SYN again, on a flow whose backend has not answered its first one for
    /// `FLOW_UNANSWERED_NS`: the backend is gone (or too slow); the flow chooses again, once
    /// [`forget_reply`] has made sure the old backend's late answer cannot reach the client.
    Unanswered {
        flow: FlowValue,
    },
    Miss,
}

// Not inlined: inlined, LLVM folds the "entry found" test into an OR of map value pointers,
// which the verifier rejects ("pointer |= pointer prohibited").
/// Looks a client's packet up, and keeps the entry's liveness: when the client was last seen
/// and whether the connection is closing (FIN or RST).
#[inline(never)]
pub fn lookup(key: &FlowKey, tcp_flags: u8) -> Lookup {
    let Some(entry) = FLOWS.get_ptr_mut(key) else {
        return Lookup::Miss;
    };
    // SAFETY: a live map value; concurrent updates replace whole elements or set the same
    // flag bits, so a torn read at worst refreshes liveness once more.
    let flow = unsafe { *entry };
    // The client only starts over on a 5-tuple once it is done with its own half.
    if flow.flags & (FLOW_CLOSING | FLOW_CLIENT_FIN) != 0
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        return Lookup::Reused;
    }
    match BACKENDS.get(flow.backend_id) {
        Some(backend)
            if backend.flags & BACKEND_ACTIVE != 0
                && backend.ip_be == flow.backend_ip_be
                && backend.port_be == flow.backend_port_be
                && backend.node_ip_be == flow.node_ip_be =>
        {
            // SAFETY: as above; plain stores into the entry.
            // The coarse clock (the last tick's time) is enough for liveness measured in seconds,
            // and costs a load where reading the clock source costs tens of ns in a VM.
            let now = unsafe { bpf_ktime_get_coarse_ns() };
            let awaiting = flow.flags & FLOW_AWAITING_REPLY != 0;
            // The client's SYN again while its backend has not answered.
            let retransmitted = awaiting && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if retransmitted {
                if now.wrapping_sub(flow.last_seen_ns) >= FLOW_UNANSWERED_NS
                    && flow.flags & FLOW_SNAT == 0
                {
                    return Lookup::Unanswered { flow };
                }
            } else if awaiting && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK {
                // The client's part of the handshake: its backend answered, whether or not
                // this node saw the answer. Not a bare RST: that is how the client refuses a
                // backend's ACK to its SYN from TIME_WAIT (see `aborts`), after which it sends
                // the SYN again, still awaiting an answer.
                clear_flags(entry, FLOW_AWAITING_REPLY);
            }
            let was_idle = now.wrapping_sub(flow.last_seen_ns) >= FLOW_SEEN_GRANULARITY_NS;
            // A retransmitted SYN leaves the time of the first: the time the backend has had
            // to answer.
            if was_idle && !retransmitted {
                unsafe { (*entry).last_seen_ns = now };
            }
            note_end(entry, flow.flags, tcp_flags, Side::Client);
            Lookup::Pinned { flow, was_idle }
        }
        _ => Lookup::Stale,
    }
}

/// Whether a segment aborts its connection: a backend's RST, or a client's RST that carries an
/// ACK. A RST without ACK is how a client answers an ACK it has no connection for; its
/// connection on that 5-tuple, if any, goes on. That happens in a handshake: a backend still in
/// TIME_WAIT for an earlier connection on the same 5-tuple (the client reused its port, e.g.
/// through another node) acknowledges that one instead of the SYN; the client resets it and
/// sends its SYN again, which must go to the same backend rather than start a new flow.
#[inline(always)]
fn aborts(tcp_flags: u8, side: Side) -> bool {
    match side {
        Side::Client => tcp_flags & (TCP_RST | TCP_ACK) == TCP_RST | TCP_ACK,
        Side::Backend => tcp_flags & TCP_RST != 0,
    }
}

/// Which end of a connection sent a segment.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// The flags a flow starts with when its first packet seen is `tcp_flags` from the client (a
/// connection found again after its entry was evicted may be ending already; a SYN awaits its
/// backend's answer). 0 for UDP, whose flags are 0.
#[inline(always)]
pub fn first_flags(tcp_flags: u8) -> u8 {
    if aborts(tcp_flags, Side::Client) {
        FLOW_CLOSING
    } else if tcp_flags & TCP_FIN != 0 {
        FLOW_CLIENT_FIN
    } else if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        FLOW_AWAITING_REPLY
    } else {
        0
    }
}

/// Where the flags sit in a `FlowValue`: byte `FLAGS_SHIFT / 8` (little-endian) of the aligned
/// 8-byte word at `FLAGS_WORD`, which they share with the node address and the backend port.
const FLAGS_WORD: usize = core::mem::offset_of!(FlowValue, flags) & !7;
const FLAGS_SHIFT: u32 = ((core::mem::offset_of!(FlowValue, flags) - FLAGS_WORD) * 8) as u32;
const _: () = assert!(FLAGS_WORD + 8 <= core::mem::size_of::<FlowValue>());

/// Sets `bits` in a flow's flags and returns the flags as they were. Atomic: a client's FIN and
/// a backend's FIN may meet on two CPUs, and neither may be lost. An OR of the bits into the
/// word that holds the flags changes nothing else in it.
#[inline(always)]
fn set_flags(entry: *mut FlowValue, bits: u8) -> u8 {
    // SAFETY: `flags_word` is within the live entry.
    let old = unsafe {
        // AcqRel, not Relaxed: LLVM lowers a relaxed OR to the non-fetching BPF instruction.
        atomic_or::<u64, u64, { AtomicOrdering::AcqRel }>(
            flags_word(entry),
            u64::from(bits) << FLAGS_SHIFT,
        )
    };
    (old >> FLAGS_SHIFT) as u8
}

/// Clears `bits` in a flow's flags, atomically as `set_flags` sets them.
#[inline(always)]
fn clear_flags(entry: *mut FlowValue, bits: u8) {
    // SAFETY: `flags_word` is within the live entry.
    unsafe {
        atomic_and::<u64, u64, { AtomicOrdering::AcqRel }>(
            flags_word(entry),
            !(u64::from(bits) << FLAGS_SHIFT),
        );
    }
}

/// The aligned word of a flow's entry that holds its flags (see `FLAGS_WORD`).
#[inline(always)]
fn flags_word(entry: *mut FlowValue) -> *mut u64 {
    // SAFETY: `entry` is a live map value, 8-aligned like every map value; the word lies
    // within it (asserted above).
    unsafe { entry.cast::<u8>().add(FLAGS_WORD).cast::<u64>() }
}

/// Notes a segment of `side` in its flow's entry (whose flags were `flags`): a RST that aborts
/// ends the flow; a FIN closes that side's half, and the flow ends once both halves are closed.
#[inline(always)]
fn note_end(entry: *mut FlowValue, flags: u8, tcp_flags: u8, side: Side) {
    let (own_fin, other_fin) = match side {
        Side::Client => (FLOW_CLIENT_FIN, FLOW_BACKEND_FIN),
        Side::Backend => (FLOW_BACKEND_FIN, FLOW_CLIENT_FIN),
    };
    if aborts(tcp_flags, side) {
        if flags & FLOW_CLOSING == 0 {
            set_flags(entry, FLOW_CLOSING);
        }
    } else if tcp_flags & TCP_FIN != 0
        && flags & own_fin == 0
        && set_flags(entry, own_fin) & other_fin != 0
    {
        set_flags(entry, FLOW_CLOSING);
    }
}

/// The client a reply goes to: its destination, or for a hairpin flow the client its reverse
/// entry holds.
#[inline(always)]
pub fn client_of(pkt: &Packet, reverse: &ReverseValue) -> (u32, u16) {
    if reverse.client_ip_be != 0 {
        (reverse.client_ip_be, reverse.client_port_be)
    } else {
        (pkt.dst_ip_be, pkt.dst_port_be)
    }
}

/// Forgets the reverse-NAT entry of `flow`, keyed by the client → service 5-tuple `key`: the
/// backend's SYN-ACK, should it come after all, must not reach the client as the answer to the
/// SYN that goes to another backend now.
#[inline(always)]
pub fn forget_reply(key: &FlowKey, flow: &FlowValue) {
    let (reverse_key, _) =
        reverse_entry(key, flow.chosen(), (key.dst_ip_be, key.dst_port_be), None);
    let _ = REVERSE_FLOWS.remove(&reverse_key);
}

/// What a backend's reply says of its flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Pass it on to the client.
    Pass,
    /// A RST answering the flow's SYN: the backend refused the connection. The flow is
    /// forgotten and the RST must be dropped (`drop_backend_refused`), so that the client's
    /// retransmitted SYN chooses again rather than fail.
    Refused,
}

/// A backend's SYN-ACK, FIN or RST counts for its flow too: noted in the client → service entry
/// the reply belongs to. Data segments cost nothing here.
#[inline(always)]
pub fn note_reply(pkt: &Packet, reverse: &ReverseValue) -> Heard {
    if pkt.tcp_flags & (TCP_FIN | TCP_RST | TCP_SYN) == 0 {
        return Heard::Pass;
    }
    let (client_ip_be, client_port_be) = client_of(pkt, reverse);
    let key = FlowKey::new(
        client_ip_be,
        reverse.orig_ip_be,
        client_port_be,
        reverse.orig_port_be,
        pkt.proto,
    );
    let Some(entry) = FLOWS.get_ptr_mut(&key) else {
        return Heard::Pass;
    };
    // SAFETY: a live map value, read for its flags.
    let flags = unsafe { (*entry).flags };
    if flags & FLOW_AWAITING_REPLY != 0 {
        // A hairpin flow keeps its port through a refusal: its RST goes on (not yet here).
        if pkt.tcp_flags & TCP_RST != 0 && flags & FLOW_SNAT == 0 {
            let _ = FLOWS.remove(&key);
            let _ = REVERSE_FLOWS.remove(&key_of(pkt));
            passive::failed(reverse.backend_id, PASSIVE_REFUSED);
            return Heard::Refused;
        }
        if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            clear_flags(entry, FLOW_AWAITING_REPLY);
            passive::answered(reverse.backend_id);
        }
    }
    note_end(entry, flags, pkt.tcp_flags, Side::Backend);
    Heard::Pass
}

/// The 5-tuple of the answers to the packet an ICMP error quotes (the quote reversed): the
/// reply key of a forwarded packet, the flow key of a reply.
#[inline(always)]
pub fn reply_key_of(quoted: &Quoted) -> FlowKey {
    FlowKey::new(
        quoted.dst_ip_be,
        quoted.src_ip_be,
        quoted.dst_port_be,
        quoted.src_port_be,
        quoted.proto,
    )
}

/// An ICMP error that refuses a connection (`parse::is_refusal`) about a packet of a flow this
/// node balanced (client → backend, as it was forwarded) counts as the backend's refusal while
/// the flow awaits its backend's SYN-ACK: the flow and its reverse entry are forgotten, as for
/// a RST (`Heard::Refused`), and the ICMP message must be dropped. Returns whether it was so.
/// A hairpin flow's packets had another source, and are never matched here.
#[inline(always)]
pub fn note_unreachable(error: &IcmpError) -> bool {
    if !parse::is_refusal(error) {
        return false;
    }
    let quoted = &error.quoted;
    let reverse_key = reply_key_of(quoted);
    let Some(reverse) = reverse_lookup(&reverse_key) else {
        return false;
    };
    if reverse.client_ip_be != 0 {
        return false;
    }
    let key = FlowKey::new(
        quoted.src_ip_be,
        reverse.orig_ip_be,
        quoted.src_port_be,
        reverse.orig_port_be,
        PROTO_TCP,
    );
    // SAFETY: copied out at once.
    let Some(flow) = (unsafe { FLOWS.get(&key) }).copied() else {
        return false;
    };
    if flow.flags & (FLOW_AWAITING_REPLY | FLOW_SNAT) != FLOW_AWAITING_REPLY
        || flow.backend_ip_be != quoted.dst_ip_be
        || flow.backend_port_be != quoted.dst_port_be
    {
        return false;
    }
    let _ = FLOWS.remove(&key);
    let _ = REVERSE_FLOWS.remove(&reverse_key);
    passive::failed(reverse.backend_id, PASSIVE_REFUSED);
    true
}

#[inline(always)]
pub fn reverse_lookup(key: &FlowKey) -> Option<ReverseValue> {
    // SAFETY: copied out at once, as above.
    unsafe { REVERSE_FLOWS.get(key) }.copied()
}

/// A flow as recorded: the backend it is pinned to, and for a hairpin flow the source its
/// packets get.
pub struct Recorded {
    pub flow: FlowValue,
    pub snat: Option<SnatValue>,
    /// Whether this call created the flow (another CPU may have recorded it first).
    pub created: bool,
}

/// Records the backend a flow chose, and the entry that reverse-NATs its replies; a hairpin
/// flow (`snat_ip_be` not 0, see `snat`) first gets its source port.
///
/// When another CPU recorded the same new flow first, its choice wins so that every packet of
/// the connection goes to one backend. `replace` overwrites a stale or ended entry instead;
/// `event` is what the new flow counts as. `Err` is the reason the packet is dropped for.
#[inline(always)]
pub fn record(
    key: &FlowKey,
    flow: FlowValue,
    orig: (u32, u16),
    replace: bool,
    event: Event,
    snat_ip_be: u32,
) -> Result<Recorded, Reason> {
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST };
    let flow = match FLOWS.insert(key, flow, u64::from(flags)) {
        Ok(()) => flow,
        Err(err) if err == -EEXIST => {
            count_event(Event::FlowRaceLost);
            // SAFETY: copied out at once.
            let won = unsafe { FLOWS.get(key) }
                .copied()
                .ok_or(Reason::DropFlowTableFull)?;
            // The winner may not have its hairpin source yet: this packet is dropped, and the
            // client's retransmission finds it.
            let snat = snat::of_flow(key, &won);
            if won.flags & lb_common::FLOW_SNAT != 0 && snat.is_none() {
                return Err(Reason::DropFlowTableFull);
            }
            return Ok(Recorded {
                flow: won,
                snat,
                created: false,
            });
        }
        Err(_) => return Err(Reason::DropFlowTableFull),
    };
    let snat = match snat_ip_be {
        0 => {
            let (reverse_key, reverse) = reverse_entry(key, flow.chosen(), orig, None);
            if REVERSE_FLOWS
                .insert(&reverse_key, reverse, u64::from(BPF_ANY))
                .is_err()
            {
                // Without its reverse entry the replies could not be NATed: forget the flow.
                let _ = FLOWS.remove(key);
                return Err(Reason::DropFlowTableFull);
            }
            supersede_tunnel(&reverse_key, &flow);
            None
        }
        snat_ip_be => {
            let Some(snat) = snat::allocate(key, &flow, snat_ip_be, orig) else {
                let _ = FLOWS.remove(key);
                return Err(Reason::DropSnatPortsExhausted);
            };
            if SNAT_FLOWS.insert(key, snat, u64::from(BPF_ANY)).is_err() {
                let (reverse_key, _) = reverse_entry(key, flow.chosen(), orig, Some(&snat));
                let _ = REVERSE_FLOWS.remove(&reverse_key);
                let _ = FLOWS.remove(key);
                return Err(Reason::DropFlowTableFull);
            }
            count_event(Event::FlowHairpin);
            Some(snat)
        }
    };
    count_event(event);
    Ok(Recorded {
        flow,
        snat,
        created: true,
    })
}

/// Puts back the reverse-NAT entry of a pinned flow if the LRU evicted it while the flow was
/// idle: the two tables evict independently, and a flow whose replies cannot be NATed is as
/// dead as a flow without an entry. Called when the client speaks after an idle second, so a
/// busy flow pays nothing; the lookup also marks the entry as recently used. Returns false when
/// a hairpin flow's port was given to another flow meanwhile (its entry was evicted, so the
/// port looked free): the flow must choose again rather than share the port.
#[inline(always)]
pub fn restore_reverse(
    key: &FlowKey,
    flow: &FlowValue,
    orig: (u32, u16),
    snat: Option<&SnatValue>,
) -> bool {
    let (reverse_key, reverse) = reverse_entry(key, flow.chosen(), orig, snat);
    // SAFETY: copied out at once.
    match unsafe { REVERSE_FLOWS.get(&reverse_key) }.copied() {
        Some(held) => {
            held.client_ip_be == reverse.client_ip_be
                && held.client_port_be == reverse.client_port_be
        }
        None => {
            // A full table evicts another entry; an error leaves the replies as they were.
            // Not over an entry another CPU just made.
            if REVERSE_FLOWS
                .insert(&reverse_key, reverse, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                supersede_tunnel(&reverse_key, flow);
            }
            true
        }
    }
}

/// Called when this node (re)creates the reverse-NAT entry `reverse_key` of `flow`. A backend
/// on this node may hold a tunnel entry for the same reply 5-tuple, left by a flow another node
/// balanced from the same client port: this node's flow spoke last, and the next packet through
/// that node must find the tunnel entry missing to take the replies back (see
/// `decap::remember_ingress_node`). Only nodes in a mesh have tunnel entries.
#[inline(always)]
fn supersede_tunnel(reverse_key: &FlowKey, flow: &FlowValue) {
    if flow.node_ip_be == 0 && encap::mesh().is_some() {
        remove_if_present(&TUNNEL_REPLIES, reverse_key);
    }
}

/// Removes `key` from `map` if it is there. Looked up first: a lookup is lock-free, a removal
/// locks its bucket even when the key is absent, as it almost always is where this is called.
#[inline(always)]
pub fn remove_if_present<K, V>(map: &LruHashMap<K, V>, key: &K) {
    // SAFETY: only presence is read.
    if unsafe { map.get(key) }.is_some() {
        let _ = map.remove(key);
    }
}
