//! Mutated frames, millions of them, through the real XDP and TC programs with BPF_PROG_RUN, in
//! the node of `dataplane` (services on this node and on n2, flows established, a tunnel
//! reply entry; IPv6 services beside them): where `hostile.rs` enumerates the defects of a few
//! frames, this keeps going.
//!
//! Valid frames of every kind the data plane handles (clients' TCP and UDP to a service, the
//! backends' replies, VXLAN from n2 for a local backend and with a reply, an ICMP error quoting
//! a forwarded SYN, UDP fragments, IP and TCP options, and frames it passes: ARP, VLAN), and
//! their IPv6 counterparts (clients' TCP and UDP to the IPv6 services, with and without
//! extension headers, the IPv6 backends' replies, an IPv6 flow encapsulated to n2, VXLAN from
//! n2 carrying IPv6 for a local backend and with a reply, and IPv6 it passes: a routing header
//! with segments left, a fragment, ICMPv6) are mutated, one to four edits each: bits flipped,
//! header fields set to edge values (lengths, IHL, data offset, flags, addresses, ports, VNI,
//! the embedded header of an ICMP error; IPv6's payload length, next header, hop limit,
//! extension headers and addresses), truncated, extended, spliced with another frame, bytes
//! inserted or removed in the headers, IPv6 extension headers inserted or removed, the inner
//! frame of a VXLAN packet mutated and wrapped again; then, half the time, lengths and
//! checksums (IPv4's, IPv6's payload length, TCP/UDP's over either pseudo-header) are made
//! consistent again so that the edit is the frame's only defect.
//!
//! After every frame, XDP then TC:
//! - the frame is counted once, under one reason (XDP: plus `xmit_tc` when it said so), and
//!   the action is the one its reason stands for;
//! - a frame passed (a `pass_*` reason; nothing counted by TC) leaves unchanged, and changes no
//!   flow, reverse-NAT, hairpin, tunnel or fragment entry (IPv4's or IPv6's), no event counter,
//!   no backend counter and no passive-health entry;
//! - a frame handled or dropped for a reason of its own is one the reference parser of its
//!   family (`reference`, `reference6`; a VXLAN packet's inner frame's too) takes for a
//!   well-formed packet of that kind (the data plane must not act on a malformed one);
//! - a frame sent on is well formed: lengths consistent, IPv4 checksum valid, TCP/UDP
//!   checksum valid whenever the input's was, only the bytes NAT may change changed (and an
//!   encapsulated SYN's MSS lowered), of the family it came in, and addressed to a configured
//!   backend (DNAT), a mesh node (VXLAN, its outer IPv4 header valid), or from a service's
//!   address (reverse NAT).
//!
//! `cargo xtask fuzz --frames N --seed S` runs it at length (`LBCTL_FUZZ_FRAMES`,
//! `LBCTL_FUZZ_SEED`); the suite runs 100,000 frames of seed 1. A failing frame is printed in
//! hex with the seed and its number, and saved under `target/fuzz-failures/`; it then belongs
//! in the hostile table.
mod dataplane;

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, RawFd},
    time::Instant,
};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData};
use dataplane::*;
use etherparse::PacketBuilder;
use lb_common::{
    BackendStats, Counter, DEFAULT_VXLAN_PORT, FlowKey, FlowKey6, PROTO_TCP, PROTO_UDP,
    PassiveHealth, Reason, TunnelValue,
};
use lb_tests::rng::SplitMix;
use lb_userspace::{
    dataplane::map_ops,
    table::{Proto, parse_backend_spec},
};

const L3: usize = 14;
const PROTO_ICMP: u8 = 1;
/// TC's actions: let it go on (TC_ACT_OK, TC_ACT_UNSPEC), dropped, redirected.
const TC_ACT_OK: i32 = 0;
const TC_ACT_REDIRECT: i32 = 7;
/// Flows created since the last reset past which the tables are emptied and the base flows
/// made again: the state compared after every frame stays small.
const RESET_AFTER_FLOWS: u64 = 8;

// ------------------------------------------------------------------------------- randomness

// ---------------------------------------------------------------------------- frame helpers

fn get_u16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn set_u16(frame: &mut [u8], at: usize, value: u16) {
    if at + 2 <= frame.len() {
        frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }
}

fn ipv4_at(frame: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3])
}

// ------------------------------------------------------------------------ reference parser

/// What the reference parsers make of the IP packet at `l3` in `frame` (an untagged Ethernet
/// frame's or a VXLAN packet's inner frame's): [`reference`] for IPv4, [`reference6`] for IPv6.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ip {
    /// Not an untagged IP frame of the family asked for, or its headers cut short or
    /// contradicting each other.
    Malformed,
    /// A fragment (with a whole IP header): IPv4's `proto` is its protocol; an IPv6 fragment's
    /// is [`NEXT_FRAGMENT`] (44), which no reason the data plane acts on accepts.
    Fragment { proto: u8 },
    /// A whole TCP or UDP packet. `l4_valid`: its TCP/UDP checksum is right.
    TcpUdp {
        proto: u8,
        l4: usize,
        end: usize,
        l4_valid: bool,
    },
    /// Another protocol (ICMP...), the header well formed; for IPv6 also an extension header
    /// the data plane leaves to the kernel (`pass_ipv6_extension`): `proto` is where the walk
    /// stopped, `l4` where that header starts.
    Other { proto: u8, l4: usize, end: usize },
}

/// The IPv4 reference parser, by the rules the data plane states: version 4, IHL of 5 or more,
/// a total length that covers the header and lies in the frame, no martian address; TCP with a
/// data offset of 5 or more within the packet and flags a connection may carry; UDP with a
/// length of 8 or more within the packet.
fn reference(frame: &[u8], l3: usize) -> Ip {
    if frame.len() < l3 + 20 || frame[l3 - 2..l3] != [0x08, 0x00] {
        return Ip::Malformed;
    }
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    let total = usize::from(get_u16(frame, l3 + 2));
    if frame[l3] >> 4 != 4 || ihl < 20 || total < ihl || l3 + total > frame.len() {
        return Ip::Malformed;
    }
    let (src, dst) = (&frame[l3 + 12..l3 + 16], &frame[l3 + 16..l3 + 20]);
    if matches!(src[0], 0 | 127 | 224..=239) || src == [255; 4] || matches!(dst[0], 0 | 127) {
        return Ip::Malformed;
    }
    let proto = frame[l3 + 9];
    if get_u16(frame, l3 + 6) & 0x3fff != 0 {
        return Ip::Fragment { proto };
    }
    let (l4, end) = (l3 + ihl, l3 + total);
    let pseudo = |len: usize| {
        [
            &frame[l3 + 12..l3 + 20],
            &[0, proto],
            &(len as u16).to_be_bytes(),
        ]
        .concat()
    };
    match proto {
        PROTO_TCP => {
            if l4 + 20 > end {
                return Ip::Malformed;
            }
            let doff = usize::from(frame[l4 + 12] >> 4) * 4;
            if doff < 20 || l4 + doff > end || !tcp_flags_valid(frame[l4 + 13]) {
                return Ip::Malformed;
            }
            let l4_valid = internet_checksum(&[&pseudo(end - l4), &frame[l4..end]]) == 0;
            Ip::TcpUdp {
                proto,
                l4,
                end,
                l4_valid,
            }
        }
        PROTO_UDP => {
            if l4 + 8 > end {
                return Ip::Malformed;
            }
            let udp_len = usize::from(get_u16(frame, l4 + 4));
            if udp_len < 8 || l4 + udp_len > end {
                return Ip::Malformed;
            }
            let l4_valid = get_u16(frame, l4 + 6) == 0
                || internet_checksum(&[&pseudo(udp_len), &frame[l4..l4 + udp_len]]) == 0;
            Ip::TcpUdp {
                proto,
                l4,
                end,
                l4_valid,
            }
        }
        _ => Ip::Other { proto, l4, end },
    }
}

/// The flags a TCP segment of a connection may carry (`parse::tcp_flags_valid`): SYN, ACK or
/// RST set, and not SYN with FIN or RST.
fn tcp_flags_valid(flags: u8) -> bool {
    flags & 0x16 != 0 && (flags & 0x02 == 0 || flags & 0x05 == 0)
}

/// IPv6's extension headers (RFC 8200 4.1) the data plane walks, and the fragment header.
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_DEST_OPTS: u8 = 60;
const PROTO_ICMPV6: u8 = 58;
/// Extension headers `parse6` walks before leaving the packet to the kernel.
const MAX_EXTENSIONS: usize = 4;
const L4_6: usize = L3 + 40;

/// The IPv6 reference parser, by the rules `parse6` states: version 6, a payload length that
/// is not 0 and lies in the frame, no unspecified, loopback or multicast source, no loopback
/// destination; up to 4 extension headers walked (hop-by-hop first only, routing with no
/// segments left, destination options), each within the payload; a fragment header is a
/// fragment, a routing header with segments left or a fifth extension header another
/// protocol's (left to the kernel); TCP with a data offset of 5 or more within the payload and
/// flags a connection may carry; UDP with a length of 8 or more within the payload and a
/// checksum (zero is none, which IPv6 forbids).
fn reference6(frame: &[u8], l3: usize) -> Ip {
    if frame.len() < l3 + 40 || frame[l3 - 2..l3] != [0x86, 0xdd] || frame[l3] >> 4 != 6 {
        return Ip::Malformed;
    }
    let payload_len = usize::from(get_u16(frame, l3 + 4));
    let end = l3 + 40 + payload_len;
    if payload_len == 0 || end > frame.len() {
        return Ip::Malformed;
    }
    let (src, dst) = (&frame[l3 + 8..l3 + 24], &frame[l3 + 24..l3 + 40]);
    let loopback = Ipv6Addr::LOCALHOST.octets();
    if src[0] == 0xff || src == [0; 16] || src == loopback || dst == loopback {
        return Ip::Malformed;
    }
    let mut next = frame[l3 + 6];
    let mut l4 = l3 + 40;
    let mut walked = 0;
    while next != PROTO_TCP && next != PROTO_UDP {
        match next {
            NEXT_FRAGMENT => {
                return Ip::Fragment {
                    proto: NEXT_FRAGMENT,
                };
            }
            NEXT_HOP_BY_HOP if walked > 0 => return Ip::Malformed,
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {}
            _ => {
                return Ip::Other {
                    proto: next,
                    l4,
                    end,
                };
            }
        }
        if walked == MAX_EXTENSIONS {
            return Ip::Other {
                proto: next,
                l4,
                end,
            };
        }
        if l4 + 4 > frame.len() {
            return Ip::Malformed;
        }
        if next == NEXT_ROUTING && frame[l4 + 3] != 0 {
            return Ip::Other {
                proto: next,
                l4,
                end,
            };
        }
        next = frame[l4];
        l4 += (usize::from(frame[l4 + 1]) + 1) * 8;
        if l4 > end {
            return Ip::Malformed;
        }
        walked += 1;
    }
    let proto = next;
    let pseudo = |len: usize| {
        [
            &frame[l3 + 8..l3 + 40],
            &(len as u32).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat()
    };
    if proto == PROTO_TCP {
        if l4 + 20 > end {
            return Ip::Malformed;
        }
        let doff = usize::from(frame[l4 + 12] >> 4) * 4;
        if doff < 20 || l4 + doff > end || !tcp_flags_valid(frame[l4 + 13]) {
            return Ip::Malformed;
        }
        let l4_valid = internet_checksum(&[&pseudo(end - l4), &frame[l4..end]]) == 0;
        Ip::TcpUdp {
            proto,
            l4,
            end,
            l4_valid,
        }
    } else {
        if l4 + 8 > end {
            return Ip::Malformed;
        }
        let udp_len = usize::from(get_u16(frame, l4 + 4));
        if udp_len < 8 || l4 + udp_len > end || get_u16(frame, l4 + 6) == 0 {
            return Ip::Malformed;
        }
        let l4_valid = internet_checksum(&[&pseudo(udp_len), &frame[l4..l4 + udp_len]]) == 0;
        Ip::TcpUdp {
            proto,
            l4,
            end,
            l4_valid,
        }
    }
}

/// Whether the frame is an ICMPv6 error (destination unreachable, packet too big, time
/// exceeded, parameter problem) without extension headers, quoting an IPv6 TCP or UDP packet
/// without them.
fn is_icmp6_error(frame: &[u8]) -> bool {
    let quoted = L3 + 48;
    is_ipv6_at(frame, L3)
        && frame.len() >= quoted + 40 + 8
        && L3 + 40 + usize::from(get_u16(frame, L3 + 4)) >= quoted + 40 + 8
        && frame[L3 + 6] == PROTO_ICMPV6
        && (1..=4).contains(&frame[L3 + 40])
        && frame[quoted] >> 4 == 6
        && matches!(frame[quoted + 6], PROTO_TCP | PROTO_UDP)
}

/// Whether the frame whose network header is at `l3` says IPv6.
fn is_ipv6_at(frame: &[u8], l3: usize) -> bool {
    frame.get(l3 - 2..l3) == Some(&[0x86, 0xdd])
}

/// The reference parser of the family the Ethernet type before `l3` names.
fn parse_ip(frame: &[u8], l3: usize) -> Ip {
    if is_ipv6_at(frame, l3) {
        reference6(frame, l3)
    } else {
        reference(frame, l3)
    }
}

/// The source and destination addresses of the IP packet at `l3` (of a well-formed one).
fn addresses(frame: &[u8], l3: usize) -> (IpAddr, IpAddr) {
    if is_ipv6_at(frame, l3) {
        let at = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&frame[i..i + 16]).unwrap());
        (at(l3 + 8), at(l3 + 24))
    } else {
        (
            ipv4_at(frame, l3 + 12).into(),
            ipv4_at(frame, l3 + 16).into(),
        )
    }
}

/// Offset of the MSS option's value in the TCP header at `l4` (up to `end`), found as
/// `mss::mss_value_off` finds it: the one value encapsulation may lower (its clamp).
fn mss_value_at(frame: &[u8], l4: usize, end: usize) -> Option<usize> {
    let options_end = (l4 + usize::from(*frame.get(l4 + 12)? >> 4) * 4).min(end);
    let mut off = l4 + 20;
    for _ in 0..8 {
        if off + 4 > options_end {
            return None;
        }
        match (frame[off], frame[off + 1]) {
            (0, _) => return None,
            (1, _) => off += 1,
            (2, len) => return (len == 4).then_some(off + 2),
            (_, len) if len < 2 => return None,
            (_, len) => off += usize::from(len),
        }
    }
    None
}

/// The IPv4 header checksum of the packet at `l3` is right.
fn ip_checksum_valid(frame: &[u8], l3: usize) -> bool {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    frame.len() >= l3 + ihl && internet_checksum(&[&frame[l3..l3 + ihl]]) == 0
}

/// Where the inner frame of a well-formed VXLAN packet to this node starts.
fn vxlan_inner(frame: &[u8]) -> Option<usize> {
    match reference(frame, L3) {
        Ip::TcpUdp {
            proto: PROTO_UDP,
            l4,
            end,
            ..
        } if get_u16(frame, l4 + 2) == DEFAULT_VXLAN_PORT && end >= l4 + 16 => Some(l4 + 16),
        _ => None,
    }
}

/// Whether `frame` is IPv6, or VXLAN over IPv4 carrying IPv6.
fn carries_ipv6(frame: &[u8]) -> bool {
    is_ipv6_at(frame, L3) || vxlan_inner(frame).is_some_and(|inner| is_ipv6_at(frame, inner + L3))
}

// ----------------------------------------------------------------------------- the checks

/// How a reason's frame leaves XDP.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Leaves {
    /// Passed unchanged: `pass_*`.
    Untouched,
    /// Dropped.
    Dropped,
    /// Sent on changed, with this XDP action.
    Sent(u32),
    /// An ICMP error sent on (translated, or made here): sent back out, redirected, or handed
    /// to the kernel (to be encapsulated by TC, or through the TC hand-over).
    SentIcmp,
    /// Never an XDP reason (TC's alone).
    NotXdp,
}

fn leaves(reason: Reason) -> Leaves {
    use Reason::*;
    match reason {
        PassNotIpv4 | PassNotTcpUdp | PassFragment | PassTruncated | PassMalformed
        | PassNotService | PassNotLocal | PassVxlanOtherVni | PassFlowUnknown | PassOtherHost
        | PassIpv6Extension | IcmpStack => Leaves::Untouched,
        IcmpToClient | IcmpToBackend | FragNeededSent => Leaves::SentIcmp,
        ForwardTx | ReplyTx | ForwardEncapTx | DecapTx => Leaves::Sent(XDP_TX),
        ForwardRedirect | ReplyRedirect | ForwardEncapRedirect | DecapRedirect | XmitPeer => {
            Leaves::Sent(XDP_REDIRECT)
        }
        ForwardStack | ReplyStack | ForwardTtlExpired | DecapStack | ReplyLocal => {
            Leaves::Sent(XDP_PASS)
        }
        DropNoBackend
        | DropFlowTableFull
        | DropVxlanUnknownSource
        | DropVxlanBadFlags
        | DropVxlanMalformed
        | DropEncapMtu
        | DropEncapNoRoute
        | DropEncapNoNeigh
        | DropMeshUnconfigured
        | DropVxlanWrongNode
        | DropVxlanNotLocalBackend
        | DropSnatPortsExhausted
        | DropSnatNoRoute
        | DropBackendRefused
        | DropBackendUnreachable
        | DropNoBackendOfFamily
        | DropIpv6Hairpin => Leaves::Dropped,
        ReplyEgress | ReplyEncap | SocketEncap | XmitTc | IcmpEgress | IcmpEncap => Leaves::NotXdp,
    }
}

/// Every entry and counter a frame may change: the entries of the flow, reverse-NAT, hairpin,
/// tunnel and fragment tables and of the IPv6 flow, reverse-NAT and tunnel tables (bytes), the
/// events, the backends' counters and passive health.
#[derive(Debug, PartialEq)]
struct State {
    tables: Vec<HashMap<Vec<u8>, Vec<u8>>>,
    events: Vec<u64>,
    backends: Vec<BackendStats>,
    passive: Vec<PassiveHealth>,
}

/// A map the fuzzer reads whole after every frame, as bytes (`lb_userspace`'s `map_ops`): its
/// descriptor, and its key and value sizes (a per-CPU value: every CPU's, each rounded up to 8
/// bytes) and capacity.
struct Batch {
    fd: RawFd,
    key_size: usize,
    value_size: usize,
    max_entries: usize,
}

impl Batch {
    fn of(map: &MapData, per_cpu: bool) -> Batch {
        let info = map.info().unwrap();
        let value_size = info.value_size() as usize;
        let value_size = if per_cpu {
            value_size.div_ceil(8) * 8 * aya::util::nr_cpus().unwrap()
        } else {
            value_size
        };
        Batch {
            fd: map.fd().as_fd().as_raw_fd(),
            key_size: info.key_size() as usize,
            value_size,
            max_entries: info.max_entries() as usize,
        }
    }

    /// Every entry, as (key, value) bytes: a small map in batches, a large one key by key (it
    /// holds a few entries here, and a batch lookup walks every bucket of its capacity).
    fn read(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        // SAFETY: the descriptor belongs to a map the node keeps open for the whole run.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let mut entries = Vec::new();
        let collect = |key: &[u8], value: &[u8]| entries.push((key.to_vec(), value.to_vec()));
        if self.max_entries <= 1024 {
            map_ops::for_each_raw(fd, self.key_size, self.value_size, collect).unwrap();
        } else {
            map_ops::for_each_by_key(fd, self.key_size, self.value_size, collect).unwrap();
        }
        entries
    }

    /// A per-CPU array of counters of `words` u64s each, summed over the CPUs: the first word
    /// of each entry.
    fn first_words(&self, words: usize) -> Vec<u64> {
        let mut entries = self.read();
        entries.sort_by_key(|(key, _)| u32::from_ne_bytes(key[..4].try_into().unwrap()));
        entries
            .iter()
            .map(|(_, value)| {
                value
                    .chunks(words * 8)
                    .map(|cpu| u64::from_ne_bytes(cpu[..8].try_into().unwrap()))
                    .sum()
            })
            .collect()
    }
}

struct Fuzzer<'a> {
    node: &'a mut Node,
    /// The flow, reverse-NAT, hairpin, tunnel and fragment tables, the IPv6 flow, reverse-NAT
    /// and tunnel tables; the reason and event counters.
    tables: Vec<Batch>,
    reasons: Batch,
    events: Batch,
    backend_ids: Vec<u32>,
    /// Where DNAT may send: every backend, IPv4 and IPv6, as (address, port).
    backends: Vec<(IpAddr, u16)>,
    /// Where VXLAN may go: the other nodes.
    nodes: Vec<Ipv4Addr>,
    /// What replies may come from: the services' (address, port): the node's IPv4 address, and
    /// every IPv6 address of the node (services on every address).
    frontends: Vec<(IpAddr, u16)>,
    /// Packets counted under each reason (XDP and TC) for frames that are IPv6, or VXLAN
    /// carrying IPv6: what the IPv6 frames reached.
    counted6: RefCell<Vec<u64>>,
}

impl Fuzzer<'_> {
    fn state(&self) -> State {
        let maps = &self.node.maps;
        State {
            tables: self
                .tables
                .iter()
                .map(|table| table.read().into_iter().collect())
                .collect(),
            events: self.events.first_words(1),
            backends: self
                .backend_ids
                .iter()
                .map(|id| maps.backend_totals(*id).unwrap())
                .collect(),
            passive: self
                .backend_ids
                .iter()
                .map(|id| maps.passive_health.get(id, 0).unwrap())
                .collect(),
        }
    }

    /// Counts `reason` in [`Fuzzer::counted6`] if `frame` carries IPv6.
    fn tally6(&self, frame: &[u8], reason: Reason) {
        if carries_ipv6(frame) {
            self.counted6.borrow_mut()[reason as usize] += 1;
        }
    }

    /// Packets counted under each reason.
    fn reasons(&self) -> Vec<u64> {
        self.reasons.first_words(std::mem::size_of::<Counter>() / 8)
    }

    /// Empties every table a frame may fill, and counts nothing of it.
    fn reset(&mut self) {
        let maps = &mut self.node.maps;
        empty(&mut maps.flows);
        empty(&mut maps.reverse_flows);
        empty(&mut maps.snat_flows);
        empty(&mut maps.tunnel_replies);
        let mut fragments: BpfHashMap<&mut MapData, [u8; 12], [u8; 16]> =
            BpfHashMap::try_from(self.node.ebpf.map_mut("FRAGMENTS").unwrap()).unwrap();
        empty(&mut fragments);
        empty(&mut self.node.maps.flows6);
        empty(&mut self.node.maps.reverse_flows6);
        let mut tunnels6: BpfHashMap<&mut MapData, FlowKey6, TunnelValue> =
            BpfHashMap::try_from(self.node.ebpf.map_mut("TUNNEL_REPLIES6").unwrap()).unwrap();
        empty(&mut tunnels6);
        for id in &self.backend_ids {
            self.node
                .maps
                .passive_health
                .set(*id, PassiveHealth::default(), 0)
                .unwrap();
        }
    }

    /// Checks what XDP and TC did with `frame`, from `state` (the state now); `Err` says which
    /// invariant it broke. Returns the state after.
    fn check(&self, frame: &[u8], state: State) -> Result<State, String> {
        let before = self.reasons();
        // The kernel never runs XDP on less than an Ethernet header (nor TC).
        if frame.len() < L3 {
            if self.node.try_xdp(frame, Some(self.node.ifindex)).is_ok() {
                return Err("XDP ran on less than an Ethernet header".into());
            }
            if self.reasons() != before {
                return Err("a frame the kernel refused was counted".into());
            }
            return Ok(state);
        }
        let (action, out) = self
            .node
            .try_xdp(frame, Some(self.node.ifindex))
            .map_err(|err| format!("XDP test run refused: {err}"))?;
        let after = self.reasons();
        let state_after = self.state();
        let mut counted = counted(&before, &after);
        counted.retain(|(reason, n)| !(*reason == Reason::XmitTc && *n == 1));
        let [(reason, 1)] = counted[..] else {
            return Err(format!(
                "XDP counted {counted:?}, not once under one reason"
            ));
        };
        self.tally6(frame, reason);
        let what = format!("XDP {} (action {action})", reason.name());
        match leaves(reason) {
            Leaves::NotXdp => return Err(format!("{what}: a reason XDP never counts")),
            Leaves::Untouched => {
                // An error about a flow XDP cannot send on itself goes to the kernel as it came
                // (decapsulated first, when it came from another node): TC translates it.
                let decapsulated = reason == Reason::IcmpStack
                    && vxlan_inner(frame)
                        .is_some_and(|inner| out.get(12..) == frame.get(inner + 12..));
                if action != XDP_PASS || (out != frame && !decapsulated) {
                    return Err(format!("{what}: passed, but action or frame changed"));
                }
                if state_after != state {
                    return Err(format!("{what}: passed, but the state changed"));
                }
            }
            Leaves::Dropped => {
                if action != XDP_DROP {
                    return Err(format!("{what}: a drop reason"));
                }
                self.acted_on_well_formed(frame, reason)
                    .map_err(|e| format!("{what}: {e}"))?;
            }
            Leaves::SentIcmp => {
                if !matches!(action, XDP_TX | XDP_REDIRECT | XDP_PASS) {
                    return Err(format!("{what}: not a way XDP sends a packet on"));
                }
                self.acted_on_well_formed(frame, reason)
                    .map_err(|e| format!("{what}: {e}"))?;
                self.icmp_sent_well_formed(frame, &out, reason)
                    .map_err(|e| format!("{what}: {e}"))?;
            }
            Leaves::Sent(expected) => {
                if action != expected {
                    return Err(format!("{what}: expected action {expected}"));
                }
                self.acted_on_well_formed(frame, reason)
                    .map_err(|e| format!("{what}: {e}"))?;
                // A reply XDP cannot send on itself (its TTL runs out here, or the next hop
                // needs the kernel) goes to the kernel untouched: TC reverse-NATs it on its way
                // out, if the kernel sends it.
                // (Decapsulated first, when it came from another node.)
                // Its MACs are rewritten when it is decapsulated: the inner ones mean nothing.
                let inner = vxlan_inner(frame).unwrap_or(0);
                let untouched_reply = reason == Reason::ReplyStack
                    && out.len() == frame.len() - inner
                    && out.get(12..) == frame.get(inner + 12..);
                if !untouched_reply {
                    self.sent_well_formed(frame, &out, reason)
                        .map_err(|e| format!("{what}: {e}"))?;
                }
            }
        }
        self.check_tc(frame, state_after, after)
    }

    /// [`Fuzzer::check`] of TC, from the `state` and reason counts XDP left.
    fn check_tc(&self, frame: &[u8], state: State, before: Vec<u64>) -> Result<State, String> {
        // BPF_PROG_RUN takes for TC only a frame with an Ethernet header, a whole IPv4 or IPv6
        // header if it says IPv4 or IPv6, and within a page.
        let network_header = match frame.get(12..14) {
            Some([0x08, 0x00]) => 20,
            Some([0x86, 0xdd]) => 40,
            _ => 0,
        };
        if !(L3..=4096 - 64 - 320).contains(&frame.len()) || frame.len() < L3 + network_header {
            return Ok(state);
        }
        let (action, out) = self
            .node
            .try_tc_on(frame, Some(self.node.ifindex))
            .map_err(|err| format!("TC test run refused: {err}"))?;
        let counted = counted(&before, &self.reasons());
        match counted[..] {
            [] => {
                if action != TC_ACT_UNSPEC || out != frame {
                    return Err(format!(
                        "TC counted nothing, but action {action} or the frame changed"
                    ));
                }
                let now = self.state();
                if now != state {
                    return Err("TC counted nothing, but the state changed".into());
                }
                Ok(now)
            }
            [(reason, 1)] => {
                self.tally6(frame, reason);
                let what = format!("TC {} (action {action})", reason.name());
                self.acted_on_well_formed(frame, reason)
                    .map_err(|e| format!("{what}: {e}"))?;
                if action == TC_ACT_SHOT {
                    if leaves(reason) != Leaves::Dropped {
                        return Err(format!("{what}: dropped under a reason that is no drop"));
                    }
                    return Ok(self.state());
                }
                if !matches!(action, TC_ACT_UNSPEC | TC_ACT_OK | TC_ACT_REDIRECT)
                    || !matches!(
                        reason,
                        Reason::ReplyEgress
                            | Reason::ReplyEncap
                            | Reason::SocketEncap
                            | Reason::IcmpEgress
                            | Reason::IcmpEncap
                    )
                {
                    return Err(format!("{what}: not a way TC sends a packet on"));
                }
                if matches!(reason, Reason::IcmpEgress | Reason::IcmpEncap) {
                    self.icmp_sent_well_formed(frame, &out, reason)
                } else {
                    self.sent_well_formed(frame, &out, reason)
                }
                .map_err(|e| format!("{what}: {e}"))?;
                Ok(self.state())
            }
            _ => Err(format!("TC counted {counted:?}, not once under one reason")),
        }
    }

    /// A frame the data plane acted on (sent on changed, or dropped for a reason of its own)
    /// must be well formed for the reference parser, of a kind that reason is about.
    fn acted_on_well_formed(&self, frame: &[u8], reason: Reason) -> Result<(), String> {
        use Reason::*;
        // IPv4 or IPv6, by its Ethernet type; VXLAN comes over the IPv4 underlay only.
        let outer = parse_ip(frame, L3);
        let ok = match reason {
            // About the VXLAN packet itself (its inner frame may be what is wrong).
            DropVxlanUnknownSource | DropVxlanBadFlags | DropVxlanMalformed => matches!(
                reference(frame, L3),
                Ip::TcpUdp { proto: PROTO_UDP, l4, .. } if get_u16(frame, l4 + 2) == DEFAULT_VXLAN_PORT
            ),
            DecapTx
            | DecapRedirect
            | DecapStack
            | DropVxlanWrongNode
            | DropVxlanNotLocalBackend
            | ReplyLocal => vxlan_inner(frame).is_some_and(|inner| {
                matches!(
                    parse_ip(frame, inner + L3),
                    Ip::TcpUdp { .. } | Ip::Fragment { proto: PROTO_UDP }
                ) || icmp_error_at(frame, inner + L3).is_some()
            }),
            // A packet that could not be encapsulated: a client's, a reply, or an ICMP error
            // about a tunnelled flow (TC).
            DropEncapMtu | DropEncapNoRoute | DropEncapNoNeigh | DropMeshUnconfigured => {
                matches!(outer, Ip::TcpUdp { .. } | Ip::Fragment { proto: PROTO_UDP })
                    || icmp_error_at(frame, L3).is_some()
            }
            // An ICMP error quoting an IPv4 header and the 8 bytes after it.
            IcmpEgress => icmp_error_at(frame, L3).is_some(),
            // ... or one decapsulated from another node (a remote backend's refusal too).
            DropBackendUnreachable | IcmpToClient | IcmpToBackend | IcmpEncap => {
                icmp_error_at(frame, L3).is_some()
                    || (reason == IcmpToBackend && is_icmp6_error(frame))
                    || vxlan_inner(frame)
                        .is_some_and(|inner| icmp_error_at(frame, inner + L3).is_some())
            }
            // A UDP datagram's fragments, or a whole packet; or a VXLAN reply of a flow
            // decapsulated, reverse-NATed and sent (the inner packet is then checked).
            _ => match outer {
                Ip::TcpUdp { .. } => true,
                Ip::Fragment { proto } => proto == PROTO_UDP,
                _ => false,
            },
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "acted on a frame the reference takes for {outer:?}"
            ))
        }
    }

    /// A frame sent on is well formed, changed only where NAT may change it, and addressed
    /// where its reason says. IPv4 or IPv6 (its family kept), encapsulated in IPv4 or not.
    fn sent_well_formed(&self, input: &[u8], out: &[u8], reason: Reason) -> Result<(), String> {
        use Reason::*;
        // The packet that was NATed: in a VXLAN input, its inner packet (decapsulated); in an
        // encapsulated output, the inner packet.
        let l3_in = vxlan_inner(input).map_or(L3, |inner| inner + L3);
        let encapsulated = matches!(
            reason,
            ForwardEncapTx | ForwardEncapRedirect | ReplyEncap | SocketEncap
        );
        let l3_out = if encapsulated {
            let outer = reference(out, L3);
            let Some(inner) = vxlan_inner(out) else {
                return Err(format!("encapsulated, but the outer packet is {outer:?}"));
            };
            if !ip_checksum_valid(out, L3) {
                return Err("outer IPv4 checksum wrong".into());
            }
            // The outer lengths are the whole frame's.
            if usize::from(get_u16(out, L3 + 2)) != out.len() - L3
                || usize::from(get_u16(out, inner - 12)) != out.len() - (inner - 16)
            {
                return Err("outer IPv4 or UDP length is not the frame's".into());
            }
            let node = ipv4_at(out, L3 + 16);
            if !self.nodes.contains(&node) {
                return Err(format!("encapsulated to {node}, which is no node"));
            }
            inner + L3
        } else {
            L3
        };
        let v6 = is_ipv6_at(input, l3_in);
        if is_ipv6_at(out, l3_out) != v6 {
            return Err("sent a packet of another family".into());
        }
        let got = parse_ip(out, l3_out);
        let want = parse_ip(input, l3_in);
        if !v6 && !ip_checksum_valid(out, l3_out) && ip_checksum_valid(input, l3_in) {
            return Err("IPv4 checksum wrong".into());
        }
        let (src, dst) = addresses(out, l3_out);
        match (want, got) {
            (
                Ip::TcpUdp {
                    l4_valid: valid_in,
                    l4: l4_in,
                    end: end_in,
                    ..
                },
                Ip::TcpUdp {
                    l4_valid: valid_out,
                    l4,
                    end,
                    proto,
                },
            ) => {
                if valid_in && !valid_out {
                    return Err("TCP/UDP checksum wrong".into());
                }
                if end - l3_out != end_in - l3_in || l4 - l3_out != l4_in - l3_in {
                    return Err("lengths changed".into());
                }
                let (sport, dport) = (get_u16(out, l4), get_u16(out, l4 + 2));
                // Only addresses, ports, TTL or hop limit, and checksums may change; and the MSS
                // of a SYN encapsulated to another node, lowered (its clamp).
                let (ttl_at, addresses_at) = if v6 { (7, 8..=39) } else { (8, 12..=19) };
                if out[l3_out + ttl_at] > input[l3_in + ttl_at] {
                    return Err("TTL or hop limit raised".into());
                }
                let check_at = if proto == PROTO_TCP { 16 } else { 6 };
                let mss = if encapsulated && proto == PROTO_TCP && input[l4_in + 13] & 0x02 != 0 {
                    mss_value_at(input, l4_in, end_in).map(|at| at - l3_in)
                } else {
                    None
                };
                if let Some(at) = mss
                    && get_u16(out, l3_out + at) > get_u16(input, l3_in + at)
                {
                    return Err("MSS raised".into());
                }
                for i in 0..end - l3_out {
                    let may_change = i == ttl_at
                        || (!v6 && matches!(i, 10 | 11))
                        || addresses_at.contains(&i)
                        || mss.is_some_and(|at| i == at || i == at + 1)
                        || (i >= l4 - l3_out
                            && matches!(i - (l4 - l3_out), 0..=3)
                                | (i - (l4 - l3_out) == check_at)
                                | (i - (l4 - l3_out) == check_at + 1));
                    if !may_change && out[l3_out + i] != input[l3_in + i] {
                        let family = if v6 { "IPv6" } else { "IPv4" };
                        return Err(format!("byte {i} of the {family} packet changed"));
                    }
                }
                if reason == ReplyEncap {
                    // Sent back to the node that balanced it, which reverse-NATs it.
                    if !self.backends.contains(&(src, sport)) {
                        return Err(format!(
                            "tunnel reply from {src}:{sport}, which is no backend"
                        ));
                    }
                } else if is_reply(reason) {
                    if !self.frontends.contains(&(src, sport)) {
                        return Err(format!("reply from {src}:{sport}, which is no service"));
                    }
                } else if !self.backends.contains(&(dst, dport)) {
                    return Err(format!("sent to {dst}:{dport}, which is no backend"));
                }
                Ok(())
            }
            (Ip::Fragment { .. }, Ip::Fragment { .. }) if !v6 => {
                let addresses: Vec<IpAddr> = self.backends.iter().map(|b| b.0).collect();
                let service_addresses: Vec<IpAddr> = self.frontends.iter().map(|f| f.0).collect();
                if is_reply(reason) && reason != ReplyEncap && !service_addresses.contains(&src) {
                    return Err(format!("reply fragment from {src}, which is no service"));
                }
                if !is_reply(reason) && !addresses.contains(&dst) {
                    return Err(format!("fragment sent to {dst}, which is no backend"));
                }
                Ok(())
            }
            (want, got) => Err(format!("sent {got:?} for {want:?}")),
        }
    }
}

/// Removes every entry of `map`.
fn empty<T, K, V>(map: &mut BpfHashMap<T, K, V>)
where
    T: std::borrow::BorrowMut<MapData>,
    K: aya::Pod,
    V: aya::Pod,
{
    for key in map.keys().map(Result::unwrap).collect::<Vec<_>>() {
        map.remove(&key).unwrap();
    }
}

/// Where the ICMP error at `l3` has its ICMP header and quoted IPv4 header, and where it ends,
/// if it is one that quotes an IPv4 header and the 8 bytes after it (of a TCP or UDP packet).
fn icmp_error_at(frame: &[u8], l3: usize) -> Option<(usize, usize, usize)> {
    let Ip::Other {
        proto: PROTO_ICMP,
        l4,
        end,
    } = reference(frame, l3)
    else {
        return None;
    };
    if end < l4 + 8 + 20 || !matches!(frame[l4], 3 | 11 | 12) {
        return None;
    }
    let quoted = l4 + 8;
    let quoted_ihl = usize::from(frame[quoted] & 0x0f) * 4;
    (end >= quoted + quoted_ihl + 8 && quoted_ihl >= 20).then_some((l4, quoted, end))
}

impl Fuzzer<'_> {
    /// An ICMP error sent on (translated, or "fragmentation needed" made here) is well formed:
    /// valid IPv4 and ICMP checksums (and the quoted header's, if it was valid), and it is
    /// about a service's flow: its quote names a service as the client knows it (to a client)
    /// or a backend (to a backend, or back to the node that balanced the flow).
    fn icmp_sent_well_formed(
        &self,
        input: &[u8],
        out: &[u8],
        reason: Reason,
    ) -> Result<(), String> {
        use Reason::*;
        if reason == FragNeededSent && is_ipv6_at(out, L3) {
            return self.packet_too_big_well_formed(input, out);
        }
        if reason == IcmpToBackend && is_ipv6_at(out, L3) {
            return self.icmp6_to_backend_well_formed(input, out);
        }
        let l3_out = match vxlan_inner(out) {
            Some(inner) if reference(out, L3) != Ip::Malformed => {
                let node = ipv4_at(out, L3 + 16);
                if !self.nodes.contains(&node) {
                    return Err(format!("encapsulated to {node}, which is no node"));
                }
                if !ip_checksum_valid(out, L3) {
                    return Err("outer IPv4 checksum wrong".into());
                }
                inner + L3
            }
            _ => L3,
        };
        let Some((icmp, quoted, end)) = icmp_error_at(out, l3_out) else {
            return Err(format!(
                "sent {:?}, not an ICMP error",
                reference(out, l3_out)
            ));
        };
        let l3_in = icmp_error_at(input, L3)
            .map(|_| L3)
            .or_else(|| vxlan_inner(input).map(|inner| inner + L3));
        let valid_in =
            |check: &dyn Fn(&[u8], usize) -> bool| l3_in.is_none_or(|l3_in| check(input, l3_in));
        let icmp_valid = |frame: &[u8], l3: usize| {
            icmp_error_at(frame, l3)
                .is_some_and(|(icmp, _, end)| internet_checksum(&[&frame[icmp..end]]) == 0)
        };
        let quoted_valid = |frame: &[u8], l3: usize| {
            icmp_error_at(frame, l3).is_some_and(|(_, quoted, _)| ip_checksum_valid(frame, quoted))
        };
        let made_here = reason == FragNeededSent;
        if !ip_checksum_valid(out, l3_out) && (made_here || valid_in(&ip_checksum_valid)) {
            return Err("IPv4 checksum wrong".into());
        }
        if internet_checksum(&[&out[icmp..end]]) != 0 && (made_here || valid_in(&icmp_valid)) {
            return Err("ICMP checksum wrong".into());
        }
        // A quote is the packet's header as it came: right if it was.
        let quote_was_valid = if made_here {
            ip_checksum_valid(input, L3)
        } else {
            valid_in(&quoted_valid)
        };
        if !ip_checksum_valid(out, quoted) && quote_was_valid {
            return Err("quoted IPv4 checksum wrong".into());
        }
        let quoted_l4 = quoted + usize::from(out[quoted] & 0x0f) * 4;
        let q_src = (
            IpAddr::V4(ipv4_at(out, quoted + 12)),
            get_u16(out, quoted_l4),
        );
        let q_dst = (
            IpAddr::V4(ipv4_at(out, quoted + 16)),
            get_u16(out, quoted_l4 + 2),
        );
        let dst = IpAddr::V4(ipv4_at(out, l3_out + 16));
        let ok = match reason {
            FragNeededSent => {
                out[icmp] == 3
                    && out[icmp + 1] == 4
                    && self.frontends.contains(&q_dst)
                    && dst == IpAddr::V4(ipv4_at(input, L3 + 12))
            }
            IcmpToClient | IcmpEgress => self.frontends.contains(&q_dst) && dst == q_src.0,
            IcmpToBackend => self.backends.contains(&q_src) && dst == q_src.0,
            IcmpEncap => self.backends.contains(&q_dst) && dst == q_src.0,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "an ICMP error to {dst} quoting {q_src:?} → {q_dst:?}: not about a service's flow"
            ))
        }
    }
}

impl Fuzzer<'_> {
    /// An ICMPv6 "packet too big" made here for an IPv6 client's packet too big to
    /// encapsulate: back to the packet's source, from a service address, ICMPv6 checksum right,
    /// an MTU IPv6 takes (at least 1280), quoting an IPv6 packet to a service as the client
    /// knows it.
    fn packet_too_big_well_formed(&self, input: &[u8], out: &[u8]) -> Result<(), String> {
        const ERROR_LEN: usize = L3 + 40 + 8 + 48;
        if out.len() != ERROR_LEN || out[L3 + 6] != 58 || out[L3 + 40] != 2 || out[L3 + 41] != 0 {
            return Err(format!(
                "sent {:?}, not a packet too big",
                reference6(out, L3)
            ));
        }
        let icmp = L3 + 40;
        let pseudo = [
            &out[L3 + 8..L3 + 40],
            &((ERROR_LEN - icmp) as u32).to_be_bytes(),
            &[0, 0, 0, 58],
        ]
        .concat();
        if internet_checksum(&[&pseudo, &out[icmp..]]) != 0 {
            return Err("ICMPv6 checksum wrong".into());
        }
        let mtu = u32::from_be_bytes([out[icmp + 4], out[icmp + 5], out[icmp + 6], out[icmp + 7]]);
        if !(1280..1500).contains(&mtu) {
            return Err(format!("packet too big names an MTU of {mtu}"));
        }
        let quoted = icmp + 8;
        let (src, dst) = addresses(out, L3);
        let at = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&out[i..i + 16]).unwrap());
        let (q_src, q_dst) = (at(quoted + 8), at(quoted + 24));
        let q_dst_port = get_u16(out, quoted + 40 + 2);
        let client = addresses(input, L3).0;
        if dst != client || q_src != client || !self.frontends.contains(&(q_dst, q_dst_port)) {
            return Err(format!(
                "a packet too big to {dst} quoting {q_src} → {q_dst}:{q_dst_port}: not about a \
                 service's flow of its client"
            ));
        }
        if src != q_dst {
            return Err(format!(
                "a packet too big from {src}, not the service {q_dst}"
            ));
        }
        Ok(())
    }
}

impl Fuzzer<'_> {
    /// An ICMPv6 error about a reply, sent on to its backend: ICMPv6 checksum right if it was
    /// (the pseudo-header's length from the IPv6 payload length), to the address its quote
    /// comes from, a backend (address and port).
    fn icmp6_to_backend_well_formed(&self, input: &[u8], out: &[u8]) -> Result<(), String> {
        if out.len() < L3 + 48 + 40 + 8 || out[L3 + 6] != 58 {
            return Err(format!(
                "sent {:?}, not an ICMPv6 error",
                reference6(out, L3)
            ));
        }
        let icmp = L3 + 40;
        let checksum_valid = |frame: &[u8]| {
            let end = icmp + usize::from(get_u16(frame, L3 + 4));
            end <= frame.len() && {
                let pseudo = [
                    &frame[L3 + 8..L3 + 40],
                    &((end - icmp) as u32).to_be_bytes(),
                    &[0, 0, 0, 58],
                ]
                .concat();
                internet_checksum(&[&pseudo, &frame[icmp..end]]) == 0
            }
        };
        if checksum_valid(input) && !checksum_valid(out) {
            return Err("ICMPv6 checksum wrong".into());
        }
        let quoted = icmp + 8;
        let at = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&out[i..i + 16]).unwrap());
        let q_src = (at(quoted + 8), get_u16(out, quoted + 40));
        let dst = addresses(out, L3).1;
        if dst != q_src.0 || !self.backends.contains(&q_src) {
            return Err(format!(
                "an ICMPv6 error to {dst} quoting a reply from {q_src:?}: not to its backend"
            ));
        }
        Ok(())
    }
}

fn is_reply(reason: Reason) -> bool {
    use Reason::*;
    matches!(
        reason,
        ReplyTx | ReplyRedirect | ReplyStack | ReplyEgress | ReplyEncap | ReplyLocal
    )
}

// ------------------------------------------------------------------------------ the frames

/// A client port of the base flows, each kind its own.
const WEB_CLIENT: u16 = 41000;
const DNS_CLIENT: u16 = 41001;
const MESH_CLIENT: u16 = 41002;
const AWAITING_CLIENT: u16 = 41003;

/// Makes the base flows (a web connection, a DNS exchange, a connection to n2's task, a SYN
/// awaiting its answer, a flow n2 balanced to this node's backend) and returns the valid
/// frames the mutations start from.
fn base(fuzzer: &mut Fuzzer) -> Vec<(&'static str, Vec<u8>)> {
    let node = &*fuzzer.node;
    let send = |frame: &[u8]| {
        let (action, _) = node.xdp(frame, Some(node.ifindex));
        assert_ne!(action, XDP_DROP, "a base frame was dropped");
    };
    let chosen = |key: &FlowKey| -> [u8; 4] {
        let flow = node.maps.flows.get(key, 0).unwrap();
        flow.backend_ip_be.to_ne_bytes()
    };
    let web_syn = client_tcp(WEB_CLIENT, WEB_PORT, "S");
    send(&web_syn);
    let web_backend = chosen(&tcp_key((CLIENT_IP, WEB_CLIENT), (NODE_IP, WEB_PORT)));
    let query = client_query(DNS_CLIENT);
    send(&query);
    let mut dns_key = tcp_key((CLIENT_IP, DNS_CLIENT), (NODE_IP, DNS_PORT));
    dns_key.proto = PROTO_UDP;
    let dns_backend = chosen(&dns_key);
    send(&client_tcp(MESH_CLIENT, MESH_PORT, "S"));
    let awaiting_syn = client_tcp(AWAITING_CLIENT, WEB_PORT, "S");
    send(&awaiting_syn);
    let awaiting_backend = chosen(&tcp_key((CLIENT_IP, AWAITING_CLIENT), (NODE_IP, WEB_PORT)));
    let from_n2 = Tunnel::from_n2().wrap(&syn_from_n2_for_a_local_backend());
    send(&from_n2);
    let mac_of = |ip: [u8; 4]| [0x02, 0, 0, 0, 0, ip[3]];

    let web_reply = tcp(
        (mac_of(web_backend), INGRESS_MAC),
        (web_backend, BACKEND_PORT),
        (CLIENT_IP, WEB_CLIENT),
        64,
        "SA",
        b"",
    );
    let dns_answer = udp(
        (mac_of(dns_backend), INGRESS_MAC),
        (dns_backend, DNS_BACKEND_PORT),
        (CLIENT_IP, DNS_CLIENT),
        64,
        b"an answer of some length",
    );
    let mesh_reply = Tunnel::from_n2().wrap(&tcp(
        (N2_MAC, INGRESS_MAC),
        (REMOTE_BACKEND, BACKEND_PORT),
        (CLIENT_IP, MESH_CLIENT),
        63,
        "SA",
        b"",
    ));
    let local_reply_for_n2 = tcp(
        (backend_mac(0), INGRESS_MAC),
        (BACKENDS[0], BACKEND_PORT),
        (CLIENT_IP, 40000),
        64,
        "SA",
        b"",
    );
    // The forwarded SYN as the node sent it, quoted by the backend's ICMP port unreachable.
    let forwarded = to_backend(
        (INGRESS_MAC, mac_of(awaiting_backend)),
        AWAITING_CLIENT,
        awaiting_backend,
        63,
        "S",
    );
    let unreachable = icmp_unreachable(awaiting_backend, &forwarded[L3..L3 + 28]);
    // ICMP errors about balanced flows, each way: a router before the web backend cannot take
    // the forwarded segment whole; one before the client saw the DNS answer's TTL run out; n2's
    // task cannot take a mesh flow's segment. And a datagram too big to encapsulate.
    let web_forwarded = to_backend(
        (INGRESS_MAC, mac_of(web_backend)),
        WEB_CLIENT,
        web_backend,
        63,
        "PA",
    );
    let frag_needed = icmp_error(
        (mac_of(web_backend), INGRESS_MAC),
        ([10, 0, 0, 254], CLIENT_IP, 64),
        (3, 4, [0, 0, 0x05, 0x78]),
        &web_forwarded[L3..L3 + 28],
    );
    let answer_as_sent = udp(
        (INGRESS_MAC, CLIENT_MAC),
        (NODE_IP, DNS_PORT),
        (CLIENT_IP, DNS_CLIENT),
        63,
        b"answer",
    );
    let time_exceeded = icmp_error(
        (CLIENT_MAC, INGRESS_MAC),
        ([192, 168, 100, 254], NODE_IP, 64),
        (11, 0, [0; 4]),
        &answer_as_sent[L3..],
    );
    let mesh_forwarded = to_backend((N2_MAC, N2_MAC), MESH_CLIENT, REMOTE_BACKEND, 62, "PA");
    let icmp_from_n2 = Tunnel::from_n2().wrap(&icmp_error(
        (N2_MAC, INGRESS_MAC),
        (REMOTE_BACKEND, CLIENT_IP, 63),
        (3, 4, [0, 0, 0x05, 0x00]),
        &mesh_forwarded[L3..],
    ));
    let icmp_about_n2s_flow = icmp_error(
        (backend_mac(0), INGRESS_MAC),
        (BACKENDS[0], CLIENT_IP, 64),
        (3, 3, [0; 4]),
        &syn_from_n2_for_a_local_backend()[L3..],
    );
    let too_big = {
        let mut q = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, DNS_CLIENT + 30),
            (NODE_IP, MESH_DNS_PORT),
            64,
            &[0x5a; 1460],
        );
        set_u16(&mut q, L3 + 6, 0x4000);
        refresh(&mut q, L3);
        q
    };
    let big_query = udp(
        (CLIENT_MAC, INGRESS_MAC),
        (CLIENT_IP, DNS_CLIENT + 10),
        (NODE_IP, DNS_PORT),
        64,
        &[0x5a; 64],
    );
    let [first, later] = fragments(&big_query, 0x4242, 32);
    let with_options = {
        let mut f = client_tcp(WEB_CLIENT, WEB_PORT, "A");
        f.splice(L3 + 20..L3 + 20, [1, 1, 1, 0]);
        f[L3] = 0x46;
        let total = get_u16(&f, L3 + 2) + 4;
        set_u16(&mut f, L3 + 2, total);
        refresh(&mut f, L3);
        f
    };
    let tcp_options = {
        let mut f = client_tcp(WEB_CLIENT, WEB_PORT, "PA");
        f.splice(L3 + 40..L3 + 40, [2, 4, 5, 0xb4, 1, 1, 4, 2]);
        f[L3 + 32] = 0x70;
        let total = get_u16(&f, L3 + 2) + 8;
        set_u16(&mut f, L3 + 2, total);
        refresh(&mut f, L3);
        f
    };
    let mut vlan = web_syn.clone();
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    let mut ipv6 = vec![0u8; 14 + 40 + 20];
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    ipv6[14] = 0x60;
    ipv6[19] = 20;
    ipv6[20] = PROTO_TCP;
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 28 - 8]);
    let mut seeds = vec![
        ("web SYN", client_tcp(WEB_CLIENT + 20, WEB_PORT, "S")),
        ("web ACK", client_tcp(WEB_CLIENT, WEB_PORT, "A")),
        (
            "web data",
            tcp(
                (CLIENT_MAC, INGRESS_MAC),
                (CLIENT_IP, WEB_CLIENT),
                (NODE_IP, WEB_PORT),
                64,
                "PA",
                b"GET / HTTP/1.1\r\n\r\n",
            ),
        ),
        ("web FIN", client_tcp(WEB_CLIENT, WEB_PORT, "FA")),
        ("web RST", client_tcp(WEB_CLIENT, WEB_PORT, "RA")),
        ("web reply", web_reply),
        ("dns query", query),
        ("dns answer", dns_answer),
        ("mesh SYN", client_tcp(MESH_CLIENT + 20, MESH_PORT, "S")),
        ("mesh ACK", client_tcp(MESH_CLIENT, MESH_PORT, "A")),
        ("mesh dns query", {
            let mut q = client_query(DNS_CLIENT + 20);
            set_u16(&mut q, L3 + 22, MESH_DNS_PORT);
            refresh(&mut q, L3);
            q
        }),
        ("VXLAN SYN from n2", from_n2),
        ("VXLAN reply from n2", mesh_reply),
        ("reply to n2's flow", local_reply_for_n2),
        ("ICMP unreachable", unreachable),
        ("ICMP fragmentation needed", frag_needed),
        ("ICMP time exceeded", time_exceeded),
        ("ICMP from n2", icmp_from_n2),
        ("ICMP about n2's flow", icmp_about_n2s_flow),
        ("too big to encapsulate", too_big),
        ("first fragment", first),
        ("later fragment", later),
        ("IP options", with_options),
        ("TCP options", tcp_options),
        ("VLAN", vlan),
        ("IPv6", ipv6),
        ("ARP", arp),
        ("other port", client_tcp(WEB_CLIENT, 22, "S")),
    ];
    seeds.extend(base6(node));
    seeds
}

/// The IPv6 services the fuzzer adds: `web6 tcp/8086` (both IPv6 backends) and `dns6
/// udp/5356` (the first) on every address; `mesh6 tcp/9096`, one IPv6 backend on n2 reached
/// through VXLAN over the IPv4 underlay; `local6 tcp/9097`, the first IPv6 backend, on this
/// node (n1), where n2 may send flows (as `packets6.rs`).
const WEB6_PORT: u16 = 8086;
const DNS6_PORT: u16 = 5356;
const MESH6_PORT: u16 = 9096;
const LOCAL6_PORT: u16 = 9097;
/// `mesh6`'s backend, on n2.
const REMOTE6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
];
/// A client port of the IPv6 base flows, each kind its own; n2's client of `local6`.
const WEB6_CLIENT: u16 = 42000;
const DNS6_CLIENT: u16 = 42001;
const MESH6_CLIENT: u16 = 42002;
const N2_CLIENT6: u16 = 42003;

fn add_ipv6_services(node: &mut Node) {
    let backend6 = |i: usize, port| SocketAddr::new(Ipv6Addr::from(BACKENDS6[i]).into(), port);
    let web: Vec<SocketAddr> = (0..2).map(|i| backend6(i, BACKEND_PORT)).collect();
    node.table
        .add_service("web6", Proto::Tcp, WEB6_PORT, None, &web)
        .unwrap();
    node.table
        .add_service(
            "dns6",
            Proto::Udp,
            DNS6_PORT,
            None,
            &[backend6(0, DNS_BACKEND_PORT)],
        )
        .unwrap();
    for (name, port, backend) in [
        ("mesh6", MESH6_PORT, "[2001:db8:20::20]:80@n2"),
        ("local6", LOCAL6_PORT, "[2001:db8:10::6]:80@n1"),
    ] {
        let backend = parse_backend_spec(backend).unwrap();
        node.table
            .add_service(name, Proto::Tcp, port, None, &[backend])
            .unwrap();
    }
    node.apply();
}

/// `frame` (IPv6, no extension header) with an extension header of `kind` (8 bytes: the next
/// header, length 0, then `body`) after the IPv6 header; or before the first one it has.
fn with_extension(frame: &[u8], kind: u8, body: [u8; 6]) -> Vec<u8> {
    let mut out = frame[..L4_6].to_vec();
    let next = out[L3 + 6];
    out[L3 + 6] = kind;
    let payload_len = get_u16(&out, L3 + 4) + 8;
    set_u16(&mut out, L3 + 4, payload_len);
    out.extend_from_slice(&[next, 0]);
    out.extend_from_slice(&body);
    out.extend_from_slice(&frame[L4_6..]);
    out
}

/// An ICMPv6 message from `src` to `dst`.
fn icmp6(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): ([u8; 16], [u8; 16]),
    hop_limit: u8,
    kind: etherparse::Icmpv6Type,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src, dst, hop_limit)
        .icmpv6(kind)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// Makes the IPv6 base flows (a web6 connection, a dns6 exchange, a connection to n2's mesh6
/// task, a flow n2 balanced to this node's local6 backend) and returns the valid IPv6 frames
/// the mutations start from: the clients', with and without extension headers; the backends'
/// replies, directly and through the tunnel; ones passed (extension headers left to the
/// kernel, a fragment, ICMPv6).
fn base6(node: &Node) -> Vec<(&'static str, Vec<u8>)> {
    let send = |frame: &[u8]| {
        let (action, _) = node.xdp(frame, Some(node.ifindex));
        assert_ne!(action, XDP_DROP, "an IPv6 base frame was dropped");
    };
    let mac_of = |ip: [u8; 16]| [0x02, 0, 0, 0, 0, ip[15]];
    let client = (CLIENT_MAC, INGRESS_MAC);
    let pad = [1, 4, 0, 0, 0, 0];
    send(&client6(WEB6_CLIENT, WEB6_PORT, "S"));
    let key = FlowKey6::new(
        CLIENT_IP6,
        NODE_IP6,
        WEB6_CLIENT.to_be(),
        WEB6_PORT.to_be(),
        PROTO_TCP,
    );
    let web6_backend = node.maps.flows6.get(&key, 0).unwrap().backend_ip;
    let query = udp6(
        client,
        (CLIENT_IP6, DNS6_CLIENT),
        (NODE_IP6, DNS6_PORT),
        64,
        b"query",
    );
    send(&query);
    let mesh6_syn = |port| {
        tcp6(
            client,
            (CLIENT_IP6, port),
            (NODE_IP6, MESH6_PORT),
            64,
            ("S", Some(1460)),
            b"",
        )
    };
    send(&mesh6_syn(MESH6_CLIENT));
    let from_n2 = Tunnel::from_n2().wrap(&tcp6(
        (N2_MAC, INGRESS_MAC),
        (CLIENT_IP6, N2_CLIENT6),
        (BACKENDS6[0], BACKEND_PORT),
        63,
        ("S", Some(1460)),
        b"",
    ));
    send(&from_n2);

    let web6_ack = client6(WEB6_CLIENT, WEB6_PORT, "A");
    let mut last_hop = web6_ack.clone();
    last_hop[L3 + 7] = 1;
    let echo = |macs, addresses, hop_limit| {
        icmp6(
            macs,
            addresses,
            hop_limit,
            etherparse::Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
            b"ping",
        )
    };
    let solicitation = icmp6(
        (CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 1]),
        (
            CLIENT_IP6,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1).octets(),
        ),
        255,
        etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        },
        &NODE_IP6,
    );
    let mut router = CLIENT_IP6;
    router[15] = 0x99;
    let web6_reply_as_sent = tcp6(
        (INGRESS_MAC, CLIENT_MAC),
        (NODE_IP6, WEB6_PORT),
        (CLIENT_IP6, WEB6_CLIENT),
        64,
        ("A", None),
        b"",
    );
    let too_big_about_reply = icmp6(
        client,
        (router, NODE_IP6),
        64,
        etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 },
        &web6_reply_as_sent[L3..],
    );
    let seeds = vec![
        ("web6 SYN", client6(WEB6_CLIENT + 20, WEB6_PORT, "S")),
        (
            "ICMPv6 packet too big about a web6 reply",
            too_big_about_reply,
        ),
        ("web6 ACK", web6_ack.clone()),
        (
            "web6 data",
            tcp6(
                client,
                (CLIENT_IP6, WEB6_CLIENT),
                (NODE_IP6, WEB6_PORT),
                64,
                ("PA", None),
                b"GET / HTTP/1.1\r\n\r\n",
            ),
        ),
        ("web6 FIN", client6(WEB6_CLIENT, WEB6_PORT, "FA")),
        (
            "web6 SYN, hop-by-hop options",
            with_extension(&client6(WEB6_CLIENT + 21, WEB6_PORT, "S"), 0, pad),
        ),
        (
            "web6 ACK, destination options",
            with_extension(&web6_ack, NEXT_DEST_OPTS, pad),
        ),
        (
            "web6 ACK, routing header, no segment left",
            with_extension(&web6_ack, NEXT_ROUTING, [4, 0, 0, 0, 0, 0]),
        ),
        (
            "web6 ACK, hop-by-hop and destination options",
            with_extension(&with_extension(&web6_ack, NEXT_DEST_OPTS, pad), 0, pad),
        ),
        (
            "web6 SYN, routing header, a segment left",
            with_extension(
                &client6(WEB6_CLIENT + 22, WEB6_PORT, "S"),
                NEXT_ROUTING,
                [4, 1, 0, 0, 0, 0],
            ),
        ),
        (
            "web6 SYN, fragment header",
            with_extension(
                &client6(WEB6_CLIENT + 23, WEB6_PORT, "S"),
                NEXT_FRAGMENT,
                [0, 1, 0, 0, 0, 1],
            ),
        ),
        ("web6 ACK, last hop", last_hop),
        (
            "web6 reply",
            tcp6(
                (mac_of(web6_backend), INGRESS_MAC),
                (web6_backend, BACKEND_PORT),
                (CLIENT_IP6, WEB6_CLIENT),
                64,
                ("SA", None),
                b"",
            ),
        ),
        ("dns6 query", query.clone()),
        (
            "dns6 query, hop-by-hop options",
            with_extension(&query, NEXT_HOP_BY_HOP, pad),
        ),
        (
            "dns6 answer",
            udp6(
                (mac_of(BACKENDS6[0]), INGRESS_MAC),
                (BACKENDS6[0], DNS_BACKEND_PORT),
                (CLIENT_IP6, DNS6_CLIENT),
                64,
                b"an answer of some length",
            ),
        ),
        ("mesh6 SYN", mesh6_syn(MESH6_CLIENT + 20)),
        ("mesh6 ACK", client6(MESH6_CLIENT, MESH6_PORT, "A")),
        ("VXLAN IPv6 SYN from n2", from_n2),
        (
            "VXLAN IPv6 reply from n2",
            Tunnel::from_n2().wrap(&tcp6(
                (N2_MAC, INGRESS_MAC),
                (REMOTE6, BACKEND_PORT),
                (CLIENT_IP6, MESH6_CLIENT),
                63,
                ("SA", Some(1400)),
                b"",
            )),
        ),
        (
            "VXLAN ICMPv6 echo from n2",
            Tunnel::from_n2().wrap(&echo((N2_MAC, INGRESS_MAC), (CLIENT_IP6, BACKENDS6[0]), 63)),
        ),
        (
            "IPv6 reply to n2's flow",
            tcp6(
                (INGRESS_MAC, CLIENT_MAC),
                (BACKENDS6[0], BACKEND_PORT),
                (CLIENT_IP6, N2_CLIENT6),
                64,
                ("SA", Some(1460)),
                b"",
            ),
        ),
        (
            "IPv6 SYN to an IPv4-only service",
            client6(WEB6_CLIENT + 24, WEB_PORT, "S"),
        ),
        (
            "mesh6 data too big to encapsulate",
            tcp6(
                client,
                (CLIENT_IP6, MESH6_CLIENT),
                (NODE_IP6, MESH6_PORT),
                64,
                ("PA", None),
                &[0x5a; 1440],
            ),
        ),
        (
            "VXLAN IPv6 reply from n3",
            Tunnel {
                src: (N3_IP, N2_SOURCE_PORT),
                ..Tunnel::from_n2()
            }
            .wrap(&tcp6(
                (N2_MAC, INGRESS_MAC),
                (REMOTE6, BACKEND_PORT),
                (CLIENT_IP6, MESH6_CLIENT),
                63,
                ("A", None),
                b"",
            )),
        ),
        ("ICMPv6 echo", echo(client, (CLIENT_IP6, NODE_IP6), 64)),
        ("ICMPv6 neighbour solicitation", solicitation),
    ];
    // The reference parser takes the frames for what they are.
    for (name, frame) in &seeds {
        let l3 = vxlan_inner(frame).map_or(L3, |inner| inner + L3);
        let parsed = reference6(frame, l3);
        let expected = match *name {
            "web6 SYN, routing header, a segment left" => matches!(
                parsed,
                Ip::Other {
                    proto: NEXT_ROUTING,
                    ..
                }
            ),
            "web6 SYN, fragment header" => {
                parsed
                    == Ip::Fragment {
                        proto: NEXT_FRAGMENT,
                    }
            }
            "VXLAN ICMPv6 echo from n2"
            | "ICMPv6 echo"
            | "ICMPv6 neighbour solicitation"
            | "ICMPv6 packet too big about a web6 reply" => {
                matches!(
                    parsed,
                    Ip::Other {
                        proto: PROTO_ICMPV6,
                        ..
                    }
                )
            }
            _ => matches!(parsed, Ip::TcpUdp { l4_valid: true, .. }),
        };
        assert!(
            expected,
            "IPv6 seed {name}: the reference takes it for {parsed:?}"
        );
    }
    seeds
}

/// An ICMP destination unreachable (port) from `from` to the client, quoting `quoted` (an IPv4
/// header and 8 bytes).
fn icmp_unreachable(from: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    icmp_error(
        ([0x02, 0, 0, 0, 0, from[3]], INGRESS_MAC),
        (from, CLIENT_IP, 64),
        (3, 3, [0; 4]),
        quoted,
    )
}

/// Splits an IPv4 frame without options into two fragments, the first with `at` bytes.
fn fragments(frame: &[u8], id: u16, at: usize) -> [Vec<u8>; 2] {
    let (eth, ip, payload) = (&frame[..L3], &frame[L3..L3 + 20], &frame[L3 + 20..]);
    let fragment = |data: &[u8], offset: usize, more: bool| {
        let mut f = [eth, ip, data].concat();
        set_u16(&mut f, L3 + 2, (20 + data.len()) as u16);
        set_u16(&mut f, L3 + 4, id);
        set_u16(
            &mut f,
            L3 + 6,
            (u16::from(more) << 13) | (offset / 8) as u16,
        );
        refresh_ip(&mut f, L3);
        f
    };
    [
        fragment(&payload[..at], 0, true),
        fragment(&payload[at..], at, false),
    ]
}

fn refresh_ip(frame: &mut [u8], l3: usize) {
    if frame.len() < l3 + 20 {
        return;
    }
    let ihl = (usize::from(frame[l3] & 0x0f) * 4).max(20);
    if frame.len() < l3 + ihl {
        return;
    }
    set_u16(frame, l3 + 10, 0);
    let check = internet_checksum(&[&frame[l3..l3 + ihl]]);
    set_u16(frame, l3 + 10, check);
}

/// Makes the IPv4 checksum, and the TCP/UDP checksum where the segment is whole, right; for an
/// IPv6 packet, the TCP/UDP checksum over IPv6's pseudo-header.
fn refresh(frame: &mut [u8], l3: usize) {
    if is_ipv6_at(frame, l3) {
        refresh6(frame, l3);
        return;
    }
    refresh_ip(frame, l3);
    if let Ip::TcpUdp { proto, l4, end, .. } = reference(frame, l3) {
        let (at, len) = if proto == PROTO_TCP {
            (l4 + 16, end - l4)
        } else {
            (l4 + 6, usize::from(get_u16(frame, l4 + 4)))
        };
        set_u16(frame, at, 0);
        let pseudo = [
            &frame[l3 + 12..l3 + 20],
            &[0, proto],
            &(len as u16).to_be_bytes(),
        ]
        .concat();
        let check = match internet_checksum(&[&pseudo, &frame[l4..l4 + len]]) {
            0 if proto == PROTO_UDP => 0xffff,
            check => check,
        };
        set_u16(frame, at, check);
    }
}

/// [`refresh`] of an IPv6 packet: its TCP/UDP checksum, where the segment is whole.
fn refresh6(frame: &mut [u8], l3: usize) {
    if let Ip::TcpUdp { proto, l4, end, .. } = reference6(frame, l3) {
        let (at, len) = if proto == PROTO_TCP {
            (l4 + 16, end - l4)
        } else {
            (l4 + 6, usize::from(get_u16(frame, l4 + 4)))
        };
        set_u16(frame, at, 0);
        let pseudo = [
            &frame[l3 + 8..l3 + 40],
            &(len as u32).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat();
        let check = match internet_checksum(&[&pseudo, &frame[l4..l4 + len]]) {
            0 if proto == PROTO_UDP => 0xffff,
            check => check,
        };
        set_u16(frame, at, check);
    }
}

/// Where the transport header of the IPv6 packet at `l3` starts, and its protocol: the
/// extension headers walked as `parse6` walks them, whatever their other defects.
fn l4_of6(frame: &[u8], l3: usize) -> (u8, usize) {
    let mut next = frame.get(l3 + 6).copied().unwrap_or(PROTO_TCP);
    let mut l4 = l3 + 40;
    for _ in 0..MAX_EXTENSIONS {
        if !matches!(next, NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS) || l4 + 2 > frame.len()
        {
            break;
        }
        next = frame[l4];
        l4 += (usize::from(frame[l4 + 1]) + 1) * 8;
    }
    (next, l4)
}

/// Makes the IPv4 total length or the IPv6 payload length (and the UDP length) fill the frame
/// from `l3`.
fn fit_lengths(frame: &mut [u8], l3: usize) {
    if is_ipv6_at(frame, l3) {
        if frame.len() < l3 + 40 {
            return;
        }
        let payload = (frame.len() - l3 - 40).min(0xffff) as u16;
        set_u16(frame, l3 + 4, payload);
        let (next, l4) = l4_of6(frame, l3);
        if next == PROTO_UDP && frame.len() >= l4 + 8 {
            set_u16(frame, l4 + 4, (frame.len() - l4).min(0xffff) as u16);
        }
        return;
    }
    if frame.len() < l3 + 20 {
        return;
    }
    let total = (frame.len() - l3).min(0xffff) as u16;
    set_u16(frame, l3 + 2, total);
    let l4 = l3 + usize::from(frame[l3] & 0x0f) * 4;
    if frame[l3 + 9] == PROTO_UDP && frame.len() >= l4 + 8 {
        set_u16(frame, l4 + 4, (frame.len() - l4).min(0xffff) as u16);
    }
}

/// Header offsets worth editing in a frame whose IP header starts at `l3`.
fn fields(frame: &[u8], l3: usize) -> Vec<usize> {
    if is_ipv6_at(frame, l3) {
        return fields6(frame, l3);
    }
    let mut at: Vec<usize> = (0..20).map(|i| l3 + i).collect();
    at.extend([12, 13]);
    if frame.len() > l3 {
        let l4 = l3 + usize::from(frame[l3] & 0x0f) * 4;
        at.extend((0..20).map(|i| l4 + i));
        // An ICMP error's embedded header, a VXLAN header.
        at.extend((8..36).map(|i| l4 + i));
    }
    at.retain(|&i| i < frame.len());
    at
}

/// [`fields`] of an IPv6 packet: the IPv6 header, its payload length, next header and hop
/// limit and the ends of its addresses twice over; the first extension header's next header,
/// length, routing type and segments left; the transport header.
fn fields6(frame: &[u8], l3: usize) -> Vec<usize> {
    let mut at: Vec<usize> = (0..40).map(|i| l3 + i).collect();
    at.extend([12, 13]);
    at.extend([4, 5, 6, 7, 8, 23, 24, 39].map(|i| l3 + i));
    if frame.get(l3 + 6).is_some_and(|next| {
        matches!(
            *next,
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_FRAGMENT | NEXT_DEST_OPTS
        )
    }) {
        at.extend((0..4).flat_map(|i| [l3 + 40 + i, l3 + 40 + i]));
    }
    let (_, l4) = l4_of6(frame, l3);
    at.extend((0..20).map(|i| l4 + i));
    at.retain(|&i| i < frame.len());
    at
}

const EDGE_BYTES: &[u8] = &[
    0,
    1,
    2,
    4,
    5,
    6,
    0x0f,
    0x10,
    0x11,
    0x12,
    0x3f,
    0x40,
    0x45,
    0x7f,
    0x80,
    0xff,
    // IPv6: version 6, the extension headers, ICMPv6.
    0x60,
    NEXT_ROUTING,
    NEXT_FRAGMENT,
    NEXT_DEST_OPTS,
    PROTO_ICMPV6,
];

/// Addresses worth putting in an IPv6 header: unspecified, loopback, multicast, link-local,
/// the node's, the client's, the backends', n2's backend, one on the backends' /64.
fn edge_address6(rng: &mut SplitMix) -> [u8; 16] {
    let mut beside_backends = BACKENDS6[0];
    beside_backends[15] = 0x99;
    *rng.pick(&[
        [0; 16],
        Ipv6Addr::LOCALHOST.octets(),
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets(),
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).octets(),
        NODE_IP6,
        CLIENT_IP6,
        BACKENDS6[0],
        BACKENDS6[1],
        REMOTE6,
        beside_backends,
    ])
}

/// An IPv6 extension header edit: one inserted after the IPv6 header (hop-by-hop, routing
/// with or without segments left, fragment, destination options, or another), the first one
/// removed, or its length set to an edge value.
fn mutate_extension(rng: &mut SplitMix, frame: &mut Vec<u8>, l3: usize) {
    if frame.len() < l3 + 40 {
        return;
    }
    let first = l3 + 40;
    match rng.index(4) {
        0 | 1 => {
            let random = rng.next_u64() as u8;
            let kind = *rng.pick(&[
                NEXT_HOP_BY_HOP,
                NEXT_ROUTING,
                NEXT_FRAGMENT,
                NEXT_DEST_OPTS,
                PROTO_ICMPV6,
                random,
            ]);
            let words = rng.index(3);
            let mut ext = vec![0u8; (words + 1) * 8];
            ext[0] = frame[l3 + 6];
            ext[1] = words as u8;
            match kind {
                NEXT_ROUTING => {
                    ext[2] = 4;
                    ext[3] = u8::from(rng.chance(30));
                }
                NEXT_FRAGMENT => {
                    // Offset 0 and more fragments, or a later one.
                    ext[1] = 0;
                    ext.truncate(8);
                    ext[3] = if rng.chance(50) { 1 } else { 0x08 };
                    ext[7] = 1;
                }
                // PadN filling the rest.
                _ => {
                    ext[2] = 1;
                    ext[3] = (ext.len() - 4) as u8;
                }
            }
            frame[l3 + 6] = kind;
            let payload = get_u16(frame, l3 + 4).wrapping_add(ext.len() as u16);
            set_u16(frame, l3 + 4, payload);
            frame.splice(first..first, ext);
        }
        2 => {
            if matches!(
                frame[l3 + 6],
                NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_FRAGMENT | NEXT_DEST_OPTS
            ) && frame.len() >= first + 2
            {
                let len = (usize::from(frame[first + 1]) + 1) * 8;
                frame[l3 + 6] = frame[first];
                frame.drain(first..(first + len).min(frame.len()));
            }
        }
        _ => {
            if frame.len() > first + 1 {
                frame[first + 1] = *rng.pick(&[0, 1, 2, 0x7f, 0xfe, 0xff]);
            }
        }
    }
}

fn edge_u16(rng: &mut SplitMix, frame_len: usize) -> u16 {
    let len = frame_len as u16;
    let random = rng.next_u64() as u16;
    *rng.pick(&[
        0,
        1,
        7,
        8,
        19,
        20,
        21,
        40,
        len.wrapping_sub(14),
        len.wrapping_sub(13),
        len.wrapping_sub(15),
        len.wrapping_sub(34),
        len.wrapping_sub(33),
        // IPv6's payload length: the frame's, one more or less, less an extension header.
        len.wrapping_sub(54),
        len.wrapping_sub(53),
        len.wrapping_sub(55),
        len.wrapping_sub(62),
        len,
        0x7fff,
        0x8000,
        0xffff,
        random,
    ])
}

/// One edit of `frame` (IP header at `l3`); `other` is another seed, for splices.
fn mutate_once(rng: &mut SplitMix, frame: &mut Vec<u8>, l3: usize, other: &[u8]) {
    if frame.is_empty() {
        frame.push(rng.next_u64() as u8);
        return;
    }
    let v6 = is_ipv6_at(frame, l3);
    match rng.index(if v6 { 10 } else { 9 }) {
        0 => {
            for _ in 0..=rng.index(3) {
                let at = rng.index(frame.len());
                frame[at] ^= 1 << rng.index(8);
            }
        }
        1 | 2 => {
            let fields = fields(frame, l3);
            if let Some(&at) = fields.get(rng.index(fields.len())) {
                frame[at] = if rng.chance(70) {
                    *rng.pick(EDGE_BYTES)
                } else {
                    rng.next_u64() as u8
                };
            }
        }
        3 => {
            let fields = fields(frame, l3);
            if let Some(&at) = fields.get(rng.index(fields.len())) {
                let value = edge_u16(rng, frame.len());
                set_u16(frame, at, value);
            }
        }
        4 => {
            let len = rng.index(frame.len());
            frame.truncate(len);
        }
        5 => {
            let extra = 1 + rng.index(64);
            let zeros = rng.chance(50);
            frame.extend((0..extra).map(|_| if zeros { 0 } else { rng.next_u64() as u8 }));
        }
        6 => {
            let cut = rng.index(frame.len());
            let from = rng.index(other.len().max(1));
            frame.truncate(cut);
            frame.extend_from_slice(&other[from.min(other.len())..]);
        }
        7 => {
            let limit = frame.len().min(l3 + if v6 { 108 } else { 80 });
            let at = rng.index(limit);
            if rng.chance(50) {
                let n = 1 + rng.index(8);
                for _ in 0..n {
                    frame.insert(at, rng.next_u64() as u8);
                }
            } else {
                let n = (1 + rng.index(8)).min(frame.len() - at);
                frame.drain(at..at + n);
            }
        }
        8 if v6 => {
            // Extension headers, or the data offset grown or shrunk by whole words.
            let (_, l4) = l4_of6(frame, l3);
            if rng.chance(60) || frame.len() < l4 + 13 {
                mutate_extension(rng, frame, l3);
            } else {
                frame[l4 + 12] = ((rng.index(16) as u8) << 4) | (frame[l4 + 12] & 0x0f);
            }
        }
        9 => {
            // An IPv6 source or destination address of note.
            if frame.len() >= l3 + 40 {
                let at = l3 + if rng.chance(50) { 8 } else { 24 };
                frame[at..at + 16].copy_from_slice(&edge_address6(rng));
            }
        }
        _ => {
            // Options: IHL or data offset grown or shrunk by whole words.
            if frame.len() > l3 + 20 {
                let l4 = l3 + usize::from(frame[l3] & 0x0f) * 4;
                if rng.chance(50) || frame.len() < l4 + 13 {
                    frame[l3] = (frame[l3] & 0xf0) | (rng.index(16) as u8);
                } else {
                    frame[l4 + 12] = ((rng.index(16) as u8) << 4) | (frame[l4 + 12] & 0x0f);
                }
            }
        }
    }
}

/// A mutant of `seed`: one to four edits, of the VXLAN packet's inner frame when it has one
/// (and then wrapped again, its lengths right) or of the frame; then, half the time, lengths
/// and checksums made consistent.
fn mutant(rng: &mut SplitMix, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut frame = seed.to_vec();
    let inner = vxlan_inner(seed).filter(|_| rng.chance(60));
    let l3 = inner.map_or(L3, |inner| inner + L3);
    for _ in 0..=rng.index(4) {
        mutate_once(rng, &mut frame, l3, other);
    }
    if rng.chance(30) {
        fit_lengths(&mut frame, l3);
    }
    if let Some(inner) = inner
        && frame.len() > inner
        && rng.chance(70)
    {
        // The outer lengths fit the new inner frame.
        let outer_l4 = inner - 16;
        let total = (frame.len() - L3) as u16;
        set_u16(&mut frame, L3 + 2, total);
        let udp_len = (frame.len() - outer_l4) as u16;
        set_u16(&mut frame, outer_l4 + 4, udp_len);
        if rng.chance(50) {
            refresh(&mut frame, l3);
        }
        refresh_ip(&mut frame, L3);
    } else if rng.chance(50) {
        refresh(&mut frame, l3);
    }
    frame
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

#[test]
fn mutated_frames_of_every_kind_keep_the_data_planes_invariants() {
    let frames = env_u64("LBCTL_FUZZ_FRAMES", 100_000);
    let seed = env_u64("LBCTL_FUZZ_SEED", 1);
    // A small flow table: the state compared after every frame is read whole.
    with_node_of(256, |node| {
        add_ipv6_services(node);
        let backend_ids: Vec<u32> = node
            .table
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let backends = node
            .table
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (b.addr.ip(), b.addr.port())))
            .collect();
        // Services are on every address: IPv6 ones on each of the node's IPv6 addresses.
        let mut addresses = vec![IpAddr::from(NODE_IP)];
        addresses.extend(
            node.maps
                .host_addrs6
                .keys()
                .map(|addr| IpAddr::from(addr.unwrap())),
        );
        let frontends = node
            .table
            .services
            .iter()
            .flat_map(|s| addresses.iter().map(|addr| (*addr, s.port)))
            .collect();
        // Descriptors of maps the node keeps open for the whole run.
        let fragments: BpfHashMap<&MapData, [u8; 12], [u8; 16]> =
            BpfHashMap::try_from(node.ebpf.map("FRAGMENTS").unwrap()).unwrap();
        let tunnels6: BpfHashMap<&MapData, FlowKey6, TunnelValue> =
            BpfHashMap::try_from(node.ebpf.map("TUNNEL_REPLIES6").unwrap()).unwrap();
        let maps = &node.maps;
        let tables = vec![
            Batch::of(maps.flows.map(), false),
            Batch::of(maps.reverse_flows.map(), false),
            Batch::of(maps.snat_flows.map(), false),
            Batch::of(maps.tunnel_replies.map(), false),
            Batch::of(fragments.map(), false),
            Batch::of(maps.flows6.map(), false),
            Batch::of(maps.reverse_flows6.map(), false),
            Batch::of(tunnels6.map(), false),
        ];
        let reasons = Batch::of(maps.reason_stats.map(), true);
        let events = Batch::of(maps.event_stats.map(), true);
        let mut fuzzer = Fuzzer {
            node,
            tables,
            reasons,
            events,
            backend_ids,
            backends,
            nodes: vec![Ipv4Addr::from(N2_IP), Ipv4Addr::from(N3_IP)],
            frontends,
            counted6: RefCell::new(vec![0; Reason::ALL.len()]),
        };
        let mut rng = SplitMix(seed);
        let mut seeds = base(&mut fuzzer);
        // Every seed keeps the invariants as it is.
        let mut state = fuzzer.state();
        for (name, frame) in &seeds {
            state = fuzzer
                .check(frame, state)
                .unwrap_or_else(|err| panic!("seed frame {name}: {err}"));
        }
        let failures_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
        let created = |state: &State| state.events[lb_common::Event::FlowCreated as usize];
        let mut created_at_reset = created(&state);
        let mut failures: Vec<String> = Vec::new();
        let reasons_at_start = fuzzer.reasons();
        fuzzer.counted6.borrow_mut().fill(0);
        let started = Instant::now();
        let mut checked = 0;
        for n in 0..frames {
            let (_, seed_frame) = &seeds[rng.index(seeds.len())];
            let (_, other) = &seeds[rng.index(seeds.len())];
            let frame = mutant(&mut rng, seed_frame, other);
            checked += 1;
            match fuzzer.check(&frame, state) {
                Ok(after) if created(&after) - created_at_reset > RESET_AFTER_FLOWS => {
                    fuzzer.reset();
                    seeds = base(&mut fuzzer);
                    state = fuzzer.state();
                    created_at_reset = created(&state);
                }
                Ok(after) => state = after,
                Err(err) => {
                    let line = format!("seed {seed} frame {n}: {err}\n  {}", hex(&frame));
                    eprintln!("FAILED {line}");
                    std::fs::create_dir_all(&failures_dir).unwrap();
                    std::fs::write(
                        failures_dir.join(format!("seed-{seed}-frame-{n}.hex")),
                        format!("# {err}\n{}\n", hex(&frame)),
                    )
                    .unwrap();
                    failures.push(line);
                    if failures.len() >= 20 {
                        break;
                    }
                    // Start again from a known state.
                    fuzzer.reset();
                    seeds = base(&mut fuzzer);
                    state = fuzzer.state();
                    created_at_reset = created(&state);
                }
            }
            if n > 0 && n % 1_000_000 == 0 {
                let secs = started.elapsed().as_secs_f64();
                println!("{n} frames, {:.0} frames/s", n as f64 / secs);
            }
        }
        let counted: Vec<u64> = fuzzer
            .reasons()
            .iter()
            .zip(&reasons_at_start)
            .map(|(after, before)| after - before)
            .collect();
        let frames = checked;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "fuzz: seed {seed}, {frames} frames in {secs:.1} s ({:.0} frames/s), {} failed",
            frames as f64 / secs,
            failures.len()
        );
        let mut by_reason: Vec<(u64, &str)> = Reason::ALL
            .iter()
            .zip(&counted)
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| (*n, reason.name()))
            .collect();
        by_reason.sort_unstable_by(|a, b| b.cmp(a));
        println!("counted (XDP and TC): {by_reason:?}");
        let counted6 = fuzzer.counted6.borrow().clone();
        let frames6: u64 = counted6.iter().sum();
        let mut by_reason6: Vec<(u64, &str)> = Reason::ALL
            .iter()
            .zip(&counted6)
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| (*n, reason.name()))
            .collect();
        by_reason6.sort_unstable_by(|a, b| b.cmp(a));
        println!("of which IPv6 (or IPv6 in VXLAN), {frames6} counts: {by_reason6:?}");
        assert!(
            failures.is_empty(),
            "{} frames broke an invariant:\n{}",
            failures.len(),
            failures.join("\n")
        );
        // The frames reached past the parser: forwarded, replied, decapsulated and dropped
        // for reasons of their own, not only passed.
        for reason in [
            Reason::ForwardTx,
            Reason::ReplyTx,
            Reason::DecapTx,
            Reason::ForwardEncapTx,
            Reason::PassMalformed,
            Reason::PassTruncated,
        ] {
            assert!(
                counted[reason as usize] > 0 || frames < 10_000,
                "no frame counted as {}",
                reason.name()
            );
        }
        // And so did the IPv6 ones, both ways, through the tunnel both ways, through TC.
        for reason in [
            Reason::ForwardTx,
            Reason::ReplyTx,
            Reason::ReplyEgress,
            Reason::DecapTx,
            Reason::ForwardEncapTx,
            Reason::ReplyEncap,
            Reason::PassMalformed,
            Reason::PassTruncated,
            Reason::PassIpv6Extension,
        ] {
            assert!(
                counted6[reason as usize] > 0 || frames < 10_000,
                "no IPv6 frame counted as {}",
                reason.name()
            );
        }
    });
}
