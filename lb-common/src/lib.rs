//! Map keys, values and counter enumerations shared by the data plane (`lb-ebpf`) and the
//! controller (`lb-userspace`).
//!
//! Every type is `#[repr(C)]` with explicit padding and a compile-time size assert, so a layout
//! drift between the two sides fails the build instead of corrupting a map. Addresses and ports
//! are kept in network byte order (`_be` suffix) exactly as they appear on the wire.
#![no_std]

/// Most services one node can hold (service ids are `0..MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 16_384;
/// Most backends one node can hold across all services (backend ids are `0..MAX_BACKENDS`):
/// 2^17, so that 10,000 services of 10 backends fit with 31% to spare.
///
/// Memory, fixed when the maps are created: `BACKENDS` takes 16 bytes a slot (2 MiB), and
/// `BACKEND_STATS`, a per-CPU array, 40 bytes a slot *per possible CPU*: 5 MiB per CPU (10 MiB
/// on 2 CPUs, 320 MiB on 64). Twice the slots would double both.
pub const MAX_BACKENDS: u32 = 1 << 17;
/// Most backends one service can list. A power of two: the data plane masks slot indexes with it.
pub const MAX_BACKENDS_PER_SERVICE: usize = 128;
/// Default size of the flow table (and of the reverse-NAT table), in flows.
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 20;

/// VXLAN network identifier used when the operator sets none. Swarm allocates its overlay VNIs
/// from 4096 up, so the ingress overlay conventionally carries 4096.
pub const DEFAULT_VNI: u32 = 4096;
/// Largest VNI: the field is 24 bits wide.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// IANA-assigned VXLAN UDP port (RFC 7348).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN encapsulation adds in front of the inner IPv4 packet: outer IPv4 (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14). An overlay MTU of underlay MTU − 50 (1450 on a
/// 1500 underlay, as Swarm uses) keeps every encapsulated packet within the underlay MTU.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes VXLAN over an IPv6 underlay adds: outer IPv6 (40), UDP (8), VXLAN (8) and the inner
/// Ethernet header (14).
pub const VXLAN6_OVERHEAD: u32 = 70;
/// Most nodes one instance knows (entries of `NODES`).
pub const MAX_NODES: u32 = 4096;

/// Whether a node key (`Backend::node_ip_be`, `TunnelValue`, `NODES`...) names a node of an
/// IPv6 underlay rather than an IPv4 node's address. Every table keeps a node as 32 bits: an
/// IPv4 node by its address, an IPv6 one by a key in 0.0.0.0/8 ([`ipv6_node_key`]), a block no
/// underlay address comes from (RFC 1122: "this network"); `NODE_ADDRS6` gives its address.
#[inline(always)]
pub fn is_ipv6_node_key(node_ip_be: u32) -> bool {
    node_ip_be != 0 && node_ip_be.to_ne_bytes()[0] == 0
}

/// The key of an IPv6 underlay node (see [`is_ipv6_node_key`]): 0 then 24 bits of an FNV-1a
/// hash of its address, never 0.0.0.0, the same on every node. Two nodes of one mesh with the
/// same key cannot both be served: the node table refuses the second.
pub fn ipv6_node_key(addr: &[u8; 16]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in addr {
        hash = (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
    }
    let folded = (hash >> 24) ^ (hash & 0x00ff_ffff);
    let low = if folded == 0 { 1 } else { folded };
    let bytes = low.to_be_bytes();
    u32::from_ne_bytes([0, bytes[1], bytes[2], bytes[3]])
}

/// IANA protocol numbers, as they appear in the IPv4 header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Backend flag: the backend may receive packets. A flow pinned to a backend without this flag
/// (removed, or its slot reused) is treated as new and chooses again.
pub const BACKEND_ACTIVE: u8 = 1;
/// Backend flag: an IPv6 backend, whose address is in `BACKEND_ADDRS6` (`Backend::ip_be` is 0).
pub const BACKEND_IPV6: u8 = 2;

// The types below are the keys and values of pinned maps, which outlive the build that made
// them: appending a field to a value (zero meaning "not known yet") or growing a map is migrated
// by the next `lbctl upgrade`; any other change to existing bytes must bump the map's layout
// version (lb-userspace's `layout::CHANGED_VERSIONS`), so that the old pins are refused.
macro_rules! assert_size {
    ($ty:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
    };
}

pub mod v6;
pub use v6::{
    Addr6, FlowKey6, FlowValue6, LocalBackendKey6, ReverseValue6, ServiceKey6, flow_hash6,
};

/// Key of the `SERVICES` map.
///
/// `vip_be == 0` is a service published on every local address of the node (Swarm's published
/// port); otherwise the service is reached only at that virtual IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(ServiceKey, 8);

/// `SERVICE_PORTS`: which (protocol, port) pairs have a service, two bits each, so that a
/// packet to any other port (a reply, the host's own traffic) costs the data plane no hash
/// lookup, and a packet to a service port at most the ones its bits call for. Bit
/// [`SERVICE_PORT_VIP`]: a service on that port at some virtual IP; bit [`SERVICE_PORT_ANY`]:
/// one on every local address. 2 protocols x 65,536 ports x 2 bits in 64-bit words.
pub const SERVICE_PORT_WORDS: u32 = 2 * 65_536 * 2 / 64;
pub const SERVICE_PORT_VIP: u64 = 1;
pub const SERVICE_PORT_ANY: u64 = 2;

/// Where a (protocol, port) pair's two bits sit in `SERVICE_PORTS`: the word's index and the
/// bits' shift in it. `None` for a protocol no service can have.
#[inline(always)]
pub fn service_port_slot(proto: u8, port_be: u16) -> Option<(u32, u32)> {
    let proto_slot = match proto {
        PROTO_TCP => 0,
        PROTO_UDP => 1,
        _ => return None,
    };
    let pair = (proto_slot << 16) | u32::from(u16::from_be(port_be));
    Some((pair / 32, (pair % 32) * 2))
}

/// The `SERVICE_PORTS` bit a service of `key` sets.
#[inline(always)]
pub fn service_port_bit(key: &ServiceKey) -> u64 {
    if key.vip_be == 0 {
        SERVICE_PORT_ANY
    } else {
        SERVICE_PORT_VIP
    }
}

/// Key of `LOCAL_BACKENDS`: a backend this node reaches by plain routing (hosted here, or on no
/// node), as a decapsulated packet addresses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalBackendKey {
    pub ip_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(LocalBackendKey, 8);

/// Key of `HOST_MACS`: a MAC address of one of the node's interfaces, as a frame carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacKey {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
assert_size!(MacKey, 8);

/// Entries of `HOST_MACS`.
pub const MAX_HOST_MACS: u32 = 1_024;

/// Key of `BRIDGE_PORTS`: a MAC address the bridge `bridge_ifindex` (on this node) learned
/// behind one of its ports, as the FIB gives a next hop: the bridge and the neighbour's MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BridgePortKey {
    pub bridge_ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
assert_size!(BridgePortKey, 12);

/// Entries of `BRIDGE_PORTS`.
pub const MAX_BRIDGE_PORTS: u32 = 4_096;

/// Value of the `SERVICES` map: the service's id and the backends new flows may choose.
///
/// The backend list is part of the value so that userspace replaces it in one map update: the
/// data plane never sees a half-written list.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    pub service_id: u32,
    /// How many entries of `backend_ids` are in use; 0 means the service drops new flows.
    pub backend_count: u32,
    /// `SERVICE_*` flags.
    pub flags: u32,
    /// How new flows choose among `backend_ids`: `SCHEDULER_ROUND_ROBIN` or `SCHEDULER_MAGLEV`.
    pub scheduler: u32,
    /// The backends new flows may choose: the service's backends that are neither drained nor
    /// unhealthy (all undrained ones when every one is unhealthy: `SERVICE_FAIL_OPEN`), each
    /// repeated in proportion to its weight (round-robin takes them in turn). A maglev service
    /// chooses through its `MAGLEV` table instead; `backend_count == 0` still means none.
    pub backend_ids: [u32; MAX_BACKENDS_PER_SERVICE],
}
assert_size!(ServiceValue, 16 + 4 * MAX_BACKENDS_PER_SERVICE);

/// Service flag: every backend failed its health checks, so new flows go to all of them
/// anyway (failing open, as cloud load balancers do: the checks may be what is broken). Each
/// new flow chosen so is counted as the `flow_fail_open` event.
pub const SERVICE_FAIL_OPEN: u32 = 1;
/// Service flag: the service has backends, but none of this table's family (an IPv4-only
/// service in `SERVICES6`, an IPv6-only one in `SERVICES`): its new flows of this family are
/// dropped as `drop_no_backend_of_family`.
pub const SERVICE_OTHER_FAMILY_ONLY: u32 = 2;

/// `ServiceValue::scheduler`: new flows take the service's backends in turn (one atomic cursor
/// per service). A TCP packet that is not a SYN and has no flow entry (evicted) is not given a
/// backend: it goes to the kernel (`pass_flow_unknown`), which resets the connection.
pub const SCHEDULER_ROUND_ROBIN: u32 = 0;
/// `ServiceValue::scheduler`: new flows take `MAGLEV[service_id][flow_hash(5-tuple) % M]`, a
/// consistent hash: a flow whose entry was evicted finds the same backend again, as long as the
/// service's backends are the same, and a change of backends moves about 1/N of the flows.
pub const SCHEDULER_MAGLEV: u32 = 1;

/// Entries of a service's maglev lookup table (M): a prime, as Maglev's permutations need, and
/// Cilium's default. With the 128 backends a service may have, each backend holds 127 or 128
/// entries, so the shares of equal backends differ by under 1%.
pub const MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Value of `MAGLEV`, keyed by service id: the maglev lookup table of a maglev service, backend
/// ids by slot. 64 KiB, written whole by userspace (the data plane never sees half a table).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE as usize],
}
assert_size!(MaglevTable, 4 * MAGLEV_TABLE_SIZE as usize);

/// The hash of a flow's client-side 5-tuple that chooses its slot in a maglev table: Bob
/// Jenkins' final mix (the kernel's `jhash_3words`) of the source address, the destination
/// address and both ports, seeded with the protocol. Computed on the numeric values, not their
/// memory bytes, so every node (and userspace, to predict or test a choice) gets the same hash.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    const JHASH_INITVAL: u32 = 0xdead_beef;
    let ports =
        (u32::from(u16::from_be(key.src_port_be)) << 16) | u32::from(u16::from_be(key.dst_port_be));
    let init = JHASH_INITVAL
        .wrapping_add(u32::from(key.proto))
        .wrapping_add(3 << 2);
    v6::jhash_final(
        u32::from_be(key.src_ip_be).wrapping_add(init),
        u32::from_be(key.dst_ip_be).wrapping_add(init),
        ports.wrapping_add(init),
    )
}

impl Default for ServiceValue {
    fn default() -> Self {
        Self {
            service_id: 0,
            backend_count: 0,
            flags: 0,
            scheduler: SCHEDULER_ROUND_ROBIN,
            backend_ids: [0; MAX_BACKENDS_PER_SERVICE],
        }
    }
}

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub ip_be: u32,
    pub port_be: u16,
    /// `BACKEND_*` flags.
    pub flags: u8,
    /// Connections in a row the backend may fail (refuse or leave unanswered) before the data
    /// plane ejects it (`PASSIVE_HEALTH`); 0: never ejected. Its service's setting. (A zero
    /// byte in values pinned before it existed: off until userspace writes the backend again.)
    pub eject_after: u8,
    pub service_id: u32,
    /// Underlay address of the node that hosts the backend when that is another node: packets
    /// to the backend are VXLAN-encapsulated to it. 0 for a backend this node reaches by
    /// plain routing (its own tasks, or addresses routed elsewhere).
    pub node_ip_be: u32,
}
assert_size!(Backend, 16);

/// Value of `RR_CURSORS`: a service's round-robin cursor (the next turn), alone in its 64 bytes.
/// Every new flow of a round-robin service adds to its cursor atomically, on whatever CPU it
/// arrives; eight-byte cursors put eight services on one cache line, whose every add then
/// takes the line from the CPUs adding to the others' (false sharing). 64 bytes apart (an
/// array's values are contiguous), no two cursors share a line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RrCursor {
    pub turn: u64,
    pub _pad: [u64; 7],
}
assert_size!(RrCursor, 64);

/// A connection's 5-tuple as seen on the wire: the key of `FLOWS` (client → service, as the
/// client sent it) and of `REVERSE_FLOWS` (backend → client, as the backend replies).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
assert_size!(FlowKey, 16);

impl FlowKey {
    /// The key of this 5-tuple (network byte order), its padding zero. Built on a zeroed key:
    /// in the data plane LLVM then zeroes the 16 aligned bytes with two stores, where a literal
    /// with its 3 padding bytes costs a call to `memset` (a BPF-to-BPF call, whose return is
    /// dear on CPUs with return-stack mitigations).
    #[inline(always)]
    pub fn new(
        src_ip_be: u32,
        dst_ip_be: u32,
        src_port_be: u16,
        dst_port_be: u16,
        proto: u8,
    ) -> FlowKey {
        // SAFETY: plain integers; all-zero is a valid value.
        let mut key: FlowKey = unsafe { core::mem::zeroed() };
        key.src_ip_be = src_ip_be;
        key.dst_ip_be = dst_ip_be;
        key.src_port_be = src_port_be;
        key.dst_port_be = dst_port_be;
        key.proto = proto;
        key
    }
}

/// Value of `FLOWS`: the backend a connection is pinned to.
///
/// The backend's address is kept beside its id so that a flow whose backend slot was freed and
/// reused for another backend is recognised as stale rather than sent to the wrong place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend_id: u32,
    pub backend_ip_be: u32,
    /// `Backend::node_ip_be` when the flow chose: where its packets are encapsulated to.
    pub node_ip_be: u32,
    pub backend_port_be: u16,
    /// `FLOW_*` flags.
    pub flags: u8,
    pub _pad: u8,
    /// When the client last sent a packet of the flow (`bpf_ktime_get_ns`, CLOCK_MONOTONIC),
    /// refreshed at most every `FLOW_SEEN_GRANULARITY_NS`: how userspace tells live flows from
    /// ones the client abandoned.
    pub last_seen_ns: u64,
}
assert_size!(FlowValue, 24);

/// Flow flag: the connection has ended (a FIN in each direction, a backend's RST, a client's
/// RST with ACK). A new SYN on the same 5-tuple then starts a new flow that chooses its backend
/// again.
pub const FLOW_CLOSING: u8 = 1;
/// Flow flag: the client sent a FIN. Its half of the connection is closed; the backend may go
/// on sending (a half-close, `shutdown(SHUT_WR)`), so the flow stays live until the backend's
/// FIN too. A new SYN on the 5-tuple starts a new flow.
pub const FLOW_CLIENT_FIN: u8 = 2;
/// Flow flag: the backend sent a FIN; likewise.
pub const FLOW_BACKEND_FIN: u8 = 4;
/// Flow flag: a hairpin flow, whose packets also get this node's address and a port of its own
/// as their source on the way to the backend (`SNAT_FLOWS` holds which), because the backend
/// could not answer the client itself: the client is the backend, or the node hosting it.
pub const FLOW_SNAT: u8 = 8;
/// Flow flag: a TCP flow whose first SYN was forwarded and whose backend has not answered yet
/// (no SYN-ACK seen). A RST from the backend then is a refusal (`drop_backend_refused`), and
/// the client's SYN again `FLOW_UNANSWERED_NS` after the first an unanswered connection
/// (`flow_unanswered`): either way the flow is forgotten, and the client's next SYN chooses
/// again.
pub const FLOW_AWAITING_REPLY: u8 = 16;
/// A client's SYN on a flow still awaiting its backend's SYN-ACK this long after the first is
/// a second retransmission (Linux sends a SYN at 0, 1, 3, 7 s): the backend left it
/// unanswered. Not the first retransmission: a SYN lost once (a neighbour being resolved, a
/// busy host) or a backend slow to accept is not a vanished one, and the flow keeps its backend.
pub const FLOW_UNANSWERED_NS: u64 = 2_500_000_000;
/// A TCP flow still awaiting its backend's SYN-ACK this long after its first SYN was given up by
/// its client (Linux stops retransmitting a SYN after about 127 s, `tcp_syn_retries` 6): no
/// longer live, whatever its backend.
pub const FLOW_ABANDONED_NS: u64 = 180 * 1_000_000_000;
/// A TCP flow idle this long without a FIN or RST is taken for abandoned (its client vanished):
/// no longer live, and its hairpin source port may be given to another flow.
pub const FLOW_IDLE_TCP_NS: u64 = 3_600 * 1_000_000_000;
/// UDP has no end: a flow idle this long is over.
pub const FLOW_IDLE_UDP_NS: u64 = 60 * 1_000_000_000;
/// `FlowValue::last_seen_ns` is refreshed when it is at least this old, so that a busy flow
/// does not write its table entry on every packet.
pub const FLOW_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Value of `REVERSE_FLOWS`: what a backend's reply must look like to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseValue {
    /// The address and port the client connected to.
    pub orig_ip_be: u32,
    pub orig_port_be: u16,
    /// A hairpin flow's client port (`FLOW_SNAT`): the reply's destination is this node's
    /// address and port, which become the client's. 0 otherwise (and in entries made before
    /// hairpin flows existed, where these bytes were padding).
    pub client_port_be: u16,
    pub backend_id: u32,
    /// A hairpin flow's client address; 0 for every other flow (no client has address 0).
    pub client_ip_be: u32,
}
assert_size!(ReverseValue, 16);

/// The backend a flow (or a node's own socket) was given, as its reverse entry names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub backend_id: u32,
    pub ip_be: u32,
    pub port_be: u16,
}

impl FlowValue {
    /// The backend this flow is pinned to.
    #[inline(always)]
    pub const fn chosen(&self) -> Chosen {
        Chosen {
            backend_id: self.backend_id,
            ip_be: self.backend_ip_be,
            port_be: self.backend_port_be,
        }
    }
}

impl SockFlow {
    /// The backend this socket was given.
    #[inline(always)]
    pub const fn chosen(&self) -> Chosen {
        Chosen {
            backend_id: self.backend_id,
            ip_be: self.backend_ip_be,
            port_be: self.backend_port_be,
        }
    }
}

/// The `REVERSE_FLOWS` entry of the client → service flow `key` given the backend `flow`: the
/// reply's 5-tuple (backend → client, or for a hairpin flow backend → its source `snat`), and
/// the address and port the client connected to (`orig`), with the client for a hairpin flow.
#[inline(always)]
pub fn reverse_entry(
    key: &FlowKey,
    flow: Chosen,
    (orig_ip_be, orig_port_be): (u32, u16),
    snat: Option<&SnatValue>,
) -> (FlowKey, ReverseValue) {
    let (dst_ip_be, dst_port_be, client_ip_be, client_port_be) = match snat {
        Some(snat) => (snat.ip_be, snat.port_be, key.src_ip_be, key.src_port_be),
        None => (key.src_ip_be, key.src_port_be, 0, 0),
    };
    let reverse_key = FlowKey::new(flow.ip_be, dst_ip_be, flow.port_be, dst_port_be, key.proto);
    let reverse = ReverseValue {
        orig_ip_be,
        orig_port_be,
        client_port_be,
        backend_id: flow.backend_id,
        client_ip_be,
    };
    (reverse_key, reverse)
}

/// Value of `SNAT_FLOWS`, keyed by a hairpin flow's client → service 5-tuple (`FLOW_SNAT`):
/// the source address and port its packets get on their way to the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatValue {
    pub ip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
assert_size!(SnatValue, 8);

/// Source ports of hairpin flows: `SNAT_PORT_FIRST` and the `SNAT_PORT_COUNT - 1` above it, the
/// top of the port space, above Linux's default ephemeral range (32768–60999), so that they do
/// not meet the node's own connections to a backend (its health checks).
pub const SNAT_PORT_FIRST: u16 = 61_000;
pub const SNAT_PORT_COUNT: u16 = 4_536;
const _: () = assert!(SNAT_PORT_FIRST as u32 + SNAT_PORT_COUNT as u32 == 65_536);
/// The value of `ONLINK_SUBNETS` for the subnet of network `network_be` (network byte order)
/// and prefix length `prefix_len` (1 to 31): the network address (host order) with its first
/// host bit set. Unique: the lowest bit set tells the prefix length (the host bits below it are
/// 0), the rest the network, so 10.0.0.0/8 and 10.0.0.0/24 differ.
pub const fn subnet_id(network_be: u32, prefix_len: u8) -> u32 {
    u32::from_be(network_be) | (1u32 << (31 - prefix_len as u32))
}

/// Entries of `ONLINK_SUBNETS`: the subnets of the node's interfaces.
pub const MAX_ONLINK_SUBNETS: u32 = 256;
/// Entries of `SNAT_FLOWS`: hairpin flows are a node's own clients' and its backends', few
/// beside the flow table.
pub const SNAT_FLOW_CAPACITY: u32 = 65_536;

/// Key of `SOCK_FLOWS` and `SOCK_PEERS`: a socket (its cookie, unique for the life of the
/// kernel) and an address it sends to or hears from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub ip_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(SockKey, 16);

/// Value of `SOCK_FLOWS` and `SOCK_PEERS`: the backend a node's own socket was given for a
/// service address, the address the socket really talks to for it, and the service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockFlow {
    pub backend_id: u32,
    pub backend_ip_be: u32,
    /// The underlay address of the backend's node when it is another node (the socket talks
    /// to that node's address and the TC egress program sends its packets to the backend
    /// through the tunnel); 0 when the socket talks to the backend itself.
    pub node_ip_be: u32,
    pub backend_port_be: u16,
    /// The service port the socket asked for.
    pub service_port_be: u16,
    /// The service address the socket asked for.
    pub service_ip_be: u32,
    pub _pad: u32,
}
assert_size!(SockFlow, 24);

/// Entries of each of `SOCK_FLOWS` and `SOCK_PEERS`: the node's own sockets that use a
/// service at once (an LRU: the least recent go first).
pub const SOCK_FLOW_CAPACITY: u32 = 65_536;

/// The single entry of `SOCKET_LB`: which sockets the cgroup programs act on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketLbConfig {
    /// The network namespace cookie of the instance's namespace; 0: socket load balancing
    /// off (the programs touch nothing).
    pub netns_cookie: u64,
}
assert_size!(SocketLbConfig, 8);

/// Entries of `HOST_ADDRS`: the addresses of the node's interfaces.
pub const MAX_HOST_ADDRS: u32 = 1_024;

/// Value of `TUNNEL_REPLIES`, keyed by a reply's 5-tuple (backend → client) on the node that
/// hosts the backend: the node the flow came in on, where the reply is encapsulated back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelValue {
    /// Underlay address of the ingress node (the outer source of the flow's VXLAN packets).
    pub node_ip_be: u32,
    pub _pad: u32,
}
assert_size!(TunnelValue, 8);

/// The single entry of the `MESH` array: this node's place in the VXLAN overlay.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// This node's underlay address: the outer source of the VXLAN packets it sends and the
    /// outer destination of those it accepts. 0 while this node is not in the node table: no
    /// packet is encapsulated or decapsulated then.
    pub local_ip_be: u32,
    /// VXLAN network identifier, host byte order, 24 bits.
    pub vni: u32,
    /// UDP destination port of the overlay.
    pub vxlan_port_be: u16,
    pub _pad: u16,
}
assert_size!(MeshConfig, 12);

/// Per-CPU counters of one backend (`BACKEND_STATS`, indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Client → backend packets and bytes (whole frames, as received).
    pub packets: u64,
    pub bytes: u64,
    /// Backend → client replies reverse-NATed.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows that chose this backend.
    pub new_flows: u64,
}
assert_size!(BackendStats, 40);

/// Value of `ICMP_RATE`, by the address an ICMP error the data plane makes goes to: a token
/// bucket in nanoseconds of `bpf_ktime_get_coarse_ns` (a token is one second's worth).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpBucket {
    pub tokens_ns: u64,
    pub last_ns: u64,
}
assert_size!(IcmpBucket, 16);

/// Entries of `ICMP_RATE`: the clients that recently drew an error (LRU).
pub const ICMP_RATE_CAPACITY: u32 = 16_384;

/// Value of `PASSIVE_HEALTH`, by backend id: what the data plane saw of the backend's
/// connections (passive health checking, or outlier detection). Written by the data plane,
/// each field atomically: the events are rare (a refused or unanswered connection, the first
/// answer after one), so one value shared by every CPU costs nothing on a flow's packets.
/// Userspace writes it whole only to end an ejection (`returns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Connections in a row the backend refused or left unanswered; an answered one (its
    /// SYN-ACK) sets it back to 0.
    pub failures: u32,
    /// What the last failure was: `PASSIVE_REFUSED` or `PASSIVE_UNANSWERED` (0: none yet).
    pub last_failure: u32,
    /// When the data plane ejected the backend (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC);
    /// 0: not ejected. An ejected backend takes no new flows for `PASSIVE_EJECTION_NS` (unless
    /// every backend of its turn is ejected: the flow fails open); after that it is on
    /// probation, and its next failure ejects it again at once.
    pub ejected_ns: u64,
    /// Ejections so far.
    pub ejections: u64,
    /// Connections the backend refused: a RST, or an ICMP destination unreachable, answering
    /// a SYN the data plane forwarded.
    pub refused: u64,
    /// Connections the backend left unanswered: the client's SYN again
    /// `FLOW_UNANSWERED_NS` after the first, with no SYN-ACK between.
    pub unanswered: u64,
    /// Ejections userspace ended because the active checks found the backend healthy again.
    pub returns: u64,
}
assert_size!(PassiveHealth, 48);

/// `PassiveHealth::last_failure`: a RST or an ICMP destination unreachable answered the SYN.
pub const PASSIVE_REFUSED: u32 = 1;
/// `PassiveHealth::last_failure`: no SYN-ACK came before the client sent its SYN again.
pub const PASSIVE_UNANSWERED: u32 = 2;
/// How long an ejection keeps a backend from new flows when nothing ends it sooner (`lbctl
/// daemon` hands the backend to its active checks, and ends the ejection when they find it
/// healthy): with no daemon, or for a backend another node checks, the backend gets new flows
/// again after this, and one more failure ejects it again.
pub const PASSIVE_EJECTION_NS: u64 = 10_000_000_000;
/// Consecutive failures after which a service's backend is ejected unless the service says
/// otherwise (`lbctl service health --eject-after`).
pub const DEFAULT_EJECT_AFTER: u8 = 3;

/// Per-CPU packet and byte counter of one [`Reason`] (`REASON_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
assert_size!(Counter, 16);

/// What the data plane did with a packet, and why. Every packet an lbctl program sees is
/// counted under exactly one reason, so the counters add up to the traffic seen.
macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident = $value:literal => $label:literal, )*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[$doc])* $name = $value, )*
        }

        impl Reason {
            /// Every reason, in counter-slot order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// Stable snake_case name, used by `lbctl stats` and the metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$name => $label,)* }
            }
        }
    };
}

reasons! {
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...): passed untouched. (IPv6 counted here
    /// too before the data plane balanced it: the name stays, for the metrics' sake.)
    PassNotIpv4 = 0 => "pass_not_ipv4",
    /// IPv4 but neither TCP nor UDP (ICMP, ...): passed untouched.
    PassNotTcpUdp = 1 => "pass_not_tcp_udp",
    /// IPv4 fragment that is not a UDP datagram's to a service, or whose first fragment was not
    /// seen (only the first carries the ports): passed untouched.
    PassFragment = 2 => "pass_fragment",
    /// Frame shorter than its headers claim: passed to the kernel, which rejects it.
    PassTruncated = 3 => "pass_truncated",
    /// Malformed header (bad IHL, total or UDP length beyond the packet, bad TCP data offset,
    /// TCP flags no connection carries, a martian address): passed to the kernel, which
    /// drops it.
    PassMalformed = 4 => "pass_malformed",
    /// TCP/UDP that belongs to no service and no NATed flow: passed untouched.
    PassNotService = 5 => "pass_not_service",
    /// To a service port on an address that is not the node's own: passed untouched.
    PassNotLocal = 6 => "pass_not_local",
    /// Service packet DNATed and sent back out of the receiving interface (XDP_TX).
    ForwardTx = 7 => "forward_tx",
    /// Service packet DNATed and redirected to another lbctl interface, or into the namespace
    /// of a backend behind a port of one of the node's bridges (`xmit_peer`).
    ForwardRedirect = 8 => "forward_redirect",
    /// Service packet DNATed and handed to the kernel to route (next hop not reachable by XDP).
    ForwardStack = 9 => "forward_stack",
    /// Reply reverse-NATed in XDP and sent back out of the receiving interface.
    ReplyTx = 10 => "reply_tx",
    /// Reply reverse-NATed in XDP and redirected to another lbctl interface.
    ReplyRedirect = 11 => "reply_redirect",
    /// Reply reverse-NATed in XDP and handed to the kernel to route.
    ReplyStack = 12 => "reply_stack",
    /// Reply reverse-NATed by the TC egress program on its way out.
    ReplyEgress = 13 => "reply_egress",
    /// Service packet whose TTL would expire: DNATed and handed to the kernel, which answers
    /// with ICMP time exceeded.
    ForwardTtlExpired = 14 => "forward_ttl_expired",
    /// New flow to a service with no backend: dropped.
    DropNoBackend = 15 => "drop_no_backend",
    /// New flow that could not be recorded in the flow table: dropped rather than sent without
    /// a reverse-NAT entry.
    DropFlowTableFull = 16 => "drop_flow_table_full",
    /// Service packet DNATed, VXLAN-encapsulated to the node of its backend and sent back out
    /// of the receiving interface.
    ForwardEncapTx = 17 => "forward_encap_tx",
    /// As `forward_encap_tx`, redirected to another lbctl interface.
    ForwardEncapRedirect = 18 => "forward_encap_redirect",
    /// Overlay packet for a backend on this node: decapsulated and sent back out of the
    /// receiving interface.
    DecapTx = 19 => "decap_tx",
    /// Overlay packet for a backend on this node: decapsulated and redirected.
    DecapRedirect = 20 => "decap_redirect",
    /// Overlay packet for a backend on this node: decapsulated and handed to the kernel, which
    /// routes it to the backend.
    DecapStack = 21 => "decap_stack",
    /// Backend reply encapsulated by the TC egress program back to the node its flow came in on.
    ReplyEncap = 22 => "reply_encap",
    /// VXLAN with another VNI, from any source: passed untouched (the kernel's own VXLAN
    /// devices, such as Docker's overlay networks, may share the port with nodes lbctl does
    /// not know).
    PassVxlanOtherVni = 23 => "pass_vxlan_other_vni",
    /// VXLAN to this node's overlay port from an address that is not a known node: dropped,
    /// so nobody outside the cluster can inject traffic into the overlay.
    DropVxlanUnknownSource = 24 => "drop_vxlan_unknown_source",
    /// VXLAN whose valid-VNI flag (I) is clear: dropped, never decapsulated.
    DropVxlanBadFlags = 25 => "drop_vxlan_bad_flags",
    /// VXLAN whose inner frame is not a well-formed IPv4 TCP or UDP packet: dropped.
    DropVxlanMalformed = 26 => "drop_vxlan_malformed",
    /// Packet that would exceed the underlay MTU once encapsulated: dropped, never truncated.
    DropEncapMtu = 27 => "drop_encap_mtu",
    /// No route to the backend's node, or the route leaves through an interface lbctl is not
    /// attached to: dropped.
    DropEncapNoRoute = 28 => "drop_encap_no_route",
    /// The underlay neighbour of the backend's node is not resolved yet: dropped (lbctl keeps
    /// a managed neighbour entry for every node, so this is transient).
    DropEncapNoNeigh = 29 => "drop_encap_no_neigh",
    /// Backend on another node while this node is not in the node table (no underlay source
    /// address): dropped.
    DropMeshUnconfigured = 30 => "drop_mesh_unconfigured",
    /// VXLAN carrying the reply of a flow this node balanced, from a node other than the one
    /// that hosts the flow's backend: dropped, so one node cannot answer for another's tasks.
    DropVxlanWrongNode = 31 => "drop_vxlan_wrong_node",
    /// TCP packet that is not a SYN, to a round-robin service, with no flow entry: its entry was
    /// evicted (a full table), or the connection began before lbctl. Passed to the kernel
    /// untouched, which answers with a RST (no socket has the connection), so the client learns
    /// at once, rather than sent to a backend that never saw the connection.
    PassFlowUnknown = 32 => "pass_flow_unknown",
    /// A frame XDP readied for an interface where its own transmission cannot deliver (a veth:
    /// its peer takes XDP_TX and redirected frames only while the peer runs an XDP program),
    /// handed to the kernel with a note, and sent by the TC ingress program (`bpf_redirect`).
    /// Counted here on top of the reason XDP counted it under (`forward_tx`, `decap_tx`, ...).
    XmitTc = 33 => "xmit_tc",
    /// VXLAN from a known node whose inner packet is neither a reply of a flow this node
    /// balanced nor for a backend this node reaches itself: dropped, never relayed (a reply
    /// whose reverse-NAT entry was evicted would reach the client un-NATed; a forged one could
    /// be sent anywhere).
    DropVxlanNotLocalBackend = 34 => "drop_vxlan_not_local_backend",
    /// New hairpin flow (`FLOW_SNAT`) for which every source port tried is held by a live flow
    /// to the same backend: dropped (its retransmission tries the same ports, and waits for one
    /// of them to end).
    DropSnatPortsExhausted = 35 => "drop_snat_ports_exhausted",
    /// Packet of a hairpin flow, either way, whose next hop XDP cannot send to itself: dropped,
    /// since its source is the node's own address, which the kernel drops as martian.
    DropSnatNoRoute = 36 => "drop_snat_no_route",
    /// A service packet that would start a flow, in a frame addressed to another host's MAC
    /// (seen only because the interface is promiscuous, a bridge port or a capture, or because
    /// a switch flooded it; a standby holding the same address): passed untouched, and the
    /// kernel drops it, as it drops every frame for another host. Balancing it would send the
    /// other host's traffic to the backends a second time.
    PassOtherHost = 37 => "pass_other_host",
    /// A packet of one of the node's own sockets that was given a backend on another node
    /// (socket load balancing): DNATed to the backend and VXLAN-encapsulated to its node by the
    /// TC egress program.
    SocketEncap = 38 => "socket_encap",
    /// A backend's reply, decapsulated, to one of the node's own sockets: reverse-NATed to the
    /// address the socket talks to and handed to the kernel, which delivers it.
    ReplyLocal = 39 => "reply_local",
    /// A packet XDP readied for a backend (or a client) behind a port of one of the node's
    /// bridges, a veth whose other end is in that host's namespace (`BRIDGE_PORTS`): sent by
    /// the TC ingress program with `bpf_redirect_peer` straight into that namespace, past the
    /// node's bridge, netfilter and routing. Counted on top of its `*_redirect` reason.
    XmitPeer = 40 => "xmit_peer",
    /// A backend's RST answering a SYN the data plane forwarded (the connection refused: its
    /// server is gone): dropped, not passed to the client, and the flow forgotten, so that
    /// the client's retransmitted SYN (about a second later) is balanced again.
    DropBackendRefused = 41 => "drop_backend_refused",
    /// An ICMP destination unreachable (network, host, protocol or port unreachable,
    /// administratively prohibited) about a SYN the data plane forwarded, from the backend or
    /// a router on its way: the connection refused. Dropped, its flow forgotten, as for
    /// `drop_backend_refused`: the client's retransmitted SYN is balanced again.
    DropBackendUnreachable = 42 => "drop_backend_unreachable",
    /// An ICMP error (destination unreachable, time exceeded, parameter problem) about a packet
    /// the data plane forwarded to a backend, from the backend or a router on its way:
    /// translated (the quoted destination becomes the address the client connected to) and
    /// sent on to the client by XDP.
    IcmpToClient = 43 => "icmp_to_client",
    /// An ICMP error about a reply the client got, from a router on the client's way (and
    /// addressed to the service): translated (the quoted source becomes the backend) and sent
    /// to the flow's backend, routed or encapsulated to its node.
    IcmpToBackend = 44 => "icmp_to_backend",
    /// An ICMP error about a forwarded packet that XDP cannot send on itself: handed to the
    /// kernel untouched, and translated by the TC egress program on its way out
    /// (`icmp_egress`).
    IcmpStack = 45 => "icmp_stack",
    /// An ICMP error about a forwarded packet, routed by the kernel (or made by it: time
    /// exceeded, fragmentation needed), translated by the TC egress program on its way to the
    /// client.
    IcmpEgress = 46 => "icmp_egress",
    /// An ICMP error about a flow another node balanced, made by or routed through this node
    /// (the backend's): VXLAN-encapsulated back to the flow's ingress node, which translates it.
    IcmpEncap = 47 => "icmp_encap",
    /// A client's packet (XDP) or a task's UDP reply (TC) that would exceed the underlay MTU
    /// once encapsulated, with DF set: turned into an ICMP "fragmentation needed" back to its
    /// sender, next-hop MTU the underlay's less the VXLAN overhead (path MTU discovery),
    /// rate-limited per sender as the kernel's errors are (one a second, six at once); past
    /// the limit, `drop_encap_mtu`.
    FragNeededSent = 48 => "frag_needed_sent",
    /// A new flow to a service that has backends, but none of the client's address family (an
    /// IPv6 client of an IPv4-only service, or the reverse): dropped. lbctl does not translate
    /// between families.
    DropNoBackendOfFamily = 49 => "drop_no_backend_of_family",
    /// An IPv6 packet whose routing header has segments left (its destination is not its
    /// final one), or with an extension header the data plane does not walk: passed to the
    /// kernel untouched.
    PassIpv6Extension = 50 => "pass_ipv6_extension",
    /// A new IPv6 flow whose backend would answer its client without the node: the client is
    /// the backend itself, on the backend's own /64, or the node. IPv4 gives such flows the
    /// node's address (hairpin flows); IPv6 does not yet, and drops them rather than leave
    /// the client waiting on an answer it would discard.
    DropIpv6Hairpin = 51 => "drop_ipv6_hairpin",
}

/// Number of counter slots in `REASON_STATS`.
pub const REASON_COUNT: u32 = Reason::ALL.len() as u32;

/// Flows that were pinned to a backend that has since been removed and chose again: counted
/// on top of their forwarding reason in `EVENT_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new flow was recorded.
    FlowCreated = 0,
    /// A flow's backend was removed; the flow chose a new one.
    FlowReselected = 1,
    /// Two CPUs raced to create the same flow; the loser used the winner's backend.
    FlowRaceLost = 2,
    /// A new flow chose among unhealthy backends because every backend of its service was
    /// unhealthy (`SERVICE_FAIL_OPEN`).
    FlowFailOpen = 3,
    /// A TCP packet that is not a SYN found no flow entry (evicted) on a maglev service: its
    /// backend was found again through the maglev table and recorded. An eviction, observed.
    FlowRecovered = 4,
    /// A new flow is a hairpin flow (`FLOW_SNAT`): its client is the chosen backend or the node
    /// hosting it, so its packets get this node's address as their source.
    FlowHairpin = 5,
    /// A socket of the node's own (`connect`, or a UDP `sendmsg` to a new address) was given a
    /// backend by the socket programs: no packet of it is translated on the way to a backend
    /// this node reaches; one on another node is through TC (`socket_encap`).
    SocketBalanced = 6,
    /// A socket of the node's own asked for a service with no backend it can reach: left as it
    /// was (it connects to whatever listens on that address, or is refused).
    SocketNoBackend = 7,
    /// A socket of the node's own, bound to a loopback address, asked for a service whose
    /// backend it could not reach from there (the kernel refuses a route from 127/8 to
    /// anywhere else): left as it asked.
    SocketLoopbackBound = 8,
    /// An unconnected UDP socket of the node's own sent to a service whose backend it would
    /// talk to at the address it already talks to for another service (two services sharing a
    /// backend, or with backends on one other node behind the same port): the datagram is
    /// refused (`EPERM`), since the replies of the two could not be told apart.
    SocketPeerTaken = 9,
    /// A client sent its SYN again (`FLOW_UNANSWERED_NS` or more after the first: its second
    /// retransmission) while its flow's backend had not answered: the flow chose again, so a
    /// vanished backend costs the connection about three seconds rather than all of them.
    FlowUnanswered = 10,
    /// A backend refused or left unanswered its `eject_after`-th connection in a row: the data
    /// plane ejected it (`PASSIVE_HEALTH`), and new flows pass it by.
    BackendEjected = 11,
    /// A new flow's turn fell on an ejected backend and went to the next backend in the
    /// service's order that is not ejected.
    FlowPassedEjected = 12,
}

impl Event {
    pub const ALL: &'static [Event] = &[
        Event::FlowCreated,
        Event::FlowReselected,
        Event::FlowRaceLost,
        Event::FlowFailOpen,
        Event::FlowRecovered,
        Event::FlowHairpin,
        Event::SocketBalanced,
        Event::SocketNoBackend,
        Event::SocketLoopbackBound,
        Event::SocketPeerTaken,
        Event::FlowUnanswered,
        Event::BackendEjected,
        Event::FlowPassedEjected,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Event::FlowCreated => "flow_created",
            Event::FlowReselected => "flow_reselected",
            Event::FlowRaceLost => "flow_race_lost",
            Event::FlowFailOpen => "flow_fail_open",
            Event::FlowRecovered => "flow_recovered",
            Event::FlowHairpin => "flow_hairpin",
            Event::SocketBalanced => "socket_balanced",
            Event::SocketNoBackend => "socket_no_backend",
            Event::SocketLoopbackBound => "socket_loopback_bound",
            Event::SocketPeerTaken => "socket_peer_taken",
            Event::FlowUnanswered => "flow_unanswered",
            Event::BackendEjected => "backend_ejected",
            Event::FlowPassedEjected => "flow_passed_ejected",
        }
    }
}

pub const EVENT_COUNT: u32 = Event::ALL.len() as u32;

/// Names of the maps, shared so userspace pins and opens exactly what the programs declare.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RR_CURSORS: &str = "RR_CURSORS";
    pub const FLOWS: &str = "FLOWS";
    pub const REVERSE_FLOWS: &str = "REVERSE_FLOWS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const EVENT_STATS: &str = "EVENT_STATS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const NODES: &str = "NODES";
    pub const MESH: &str = "MESH";
    pub const TUNNEL_REPLIES: &str = "TUNNEL_REPLIES";
    pub const MAGLEV: &str = "MAGLEV";
    pub const TX_VIA_TC: &str = "TX_VIA_TC";
    pub const LOCAL_BACKENDS: &str = "LOCAL_BACKENDS";
    pub const SNAT_FLOWS: &str = "SNAT_FLOWS";
    pub const ONLINK_SUBNETS: &str = "ONLINK_SUBNETS";
    pub const HOST_MACS: &str = "HOST_MACS";
    pub const HOST_ADDRS: &str = "HOST_ADDRS";
    pub const SOCKET_LB: &str = "SOCKET_LB";
    pub const SOCK_FLOWS: &str = "SOCK_FLOWS";
    pub const SOCK_PEERS: &str = "SOCK_PEERS";
    pub const SERVICE_PORTS: &str = "SERVICE_PORTS";
    pub const BRIDGE_PORTS: &str = "BRIDGE_PORTS";
    pub const PEER_PORTS: &str = "PEER_PORTS";
    pub const PASSIVE_HEALTH: &str = "PASSIVE_HEALTH";
    pub const ICMP_RATE: &str = "ICMP_RATE";
    pub const SERVICES6: &str = "SERVICES6";
    pub const RR_CURSORS6: &str = "RR_CURSORS6";
    pub const MAGLEV6: &str = "MAGLEV6";
    pub const BACKEND_ADDRS6: &str = "BACKEND_ADDRS6";
    pub const FLOWS6: &str = "FLOWS6";
    pub const REVERSE_FLOWS6: &str = "REVERSE_FLOWS6";
    pub const HOST_ADDRS6: &str = "HOST_ADDRS6";
    pub const LOCAL_BACKENDS6: &str = "LOCAL_BACKENDS6";
    pub const TUNNEL_REPLIES6: &str = "TUNNEL_REPLIES6";
    pub const DECAPSULATED_FROM: &str = "DECAPSULATED_FROM";
    /// An IPv6 underlay: node address → key, key → address, and this node's own address.
    pub const NODES6: &str = "NODES6";
    pub const NODE_ADDRS6: &str = "NODE_ADDRS6";
    pub const MESH6: &str = "MESH6";
    /// The decapsulation program of VXLAN over IPv6 (`lb_xdp6_overlay`), which `lb_xdp6`
    /// tail-calls.
    pub const OVERLAY6_PROGRAM: &str = "OVERLAY6_PROGRAM";
    /// The TC encapsulation program over an IPv6 underlay (`lb_tc_encap6`), which the TC egress
    /// programs tail-call.
    pub const TC_ENCAP6_PROGRAM: &str = "TC_ENCAP6_PROGRAM";
    /// The XDP program for ICMPv6 errors about replies (`lb_xdp6_icmp`), which `lb_xdp6`
    /// tail-calls.
    pub const ICMP6_XDP_PROGRAM: &str = "ICMP6_XDP_PROGRAM";
    /// The IPv6 programs the IPv4 ones tail-call, one map per program type (a program array
    /// takes programs of one type). Pinned like the others: the kernel empties a program array
    /// when no process or pin holds it any more, even while a program still tail-calls through
    /// it.
    pub const IPV6_XDP_PROGRAM: &str = "IPV6_XDP_PROGRAM";
    pub const IPV6_TC_PROGRAM: &str = "IPV6_TC_PROGRAM";
    /// The IPv6 encapsulation program (`lb_xdp6_encap`), which `lb_xdp6` tail-calls, and the
    /// decapsulation program (`lb_xdp6_decap`), which `lb_xdp` tail-calls.
    pub const IPV6_DECAP_PROGRAM: &str = "IPV6_DECAP_PROGRAM";
    /// The ICMPv6 translation program (`lb_tc_icmp6`), which `lb_tc_egress6` tail-calls.
    pub const IPV6_TC_ICMP_PROGRAM: &str = "IPV6_TC_ICMP_PROGRAM";
    pub const IPV6_ENCAP_PROGRAM: &str = "IPV6_ENCAP_PROGRAM";

    /// Every map, so that pinning cannot forget one.
    pub const ALL: &[&str] = &[
        SERVICES,
        BACKENDS,
        RR_CURSORS,
        FLOWS,
        REVERSE_FLOWS,
        BACKEND_STATS,
        REASON_STATS,
        EVENT_STATS,
        TX_PORTS,
        NODES,
        MESH,
        TUNNEL_REPLIES,
        MAGLEV,
        TX_VIA_TC,
        LOCAL_BACKENDS,
        SNAT_FLOWS,
        ONLINK_SUBNETS,
        HOST_MACS,
        HOST_ADDRS,
        SOCKET_LB,
        SOCK_FLOWS,
        SOCK_PEERS,
        SERVICE_PORTS,
        BRIDGE_PORTS,
        PEER_PORTS,
        PASSIVE_HEALTH,
        ICMP_RATE,
        SERVICES6,
        RR_CURSORS6,
        MAGLEV6,
        BACKEND_ADDRS6,
        FLOWS6,
        REVERSE_FLOWS6,
        HOST_ADDRS6,
        LOCAL_BACKENDS6,
        TUNNEL_REPLIES6,
        DECAPSULATED_FROM,
        NODES6,
        NODE_ADDRS6,
        MESH6,
        OVERLAY6_PROGRAM,
        TC_ENCAP6_PROGRAM,
        ICMP6_XDP_PROGRAM,
        IPV6_XDP_PROGRAM,
        IPV6_TC_PROGRAM,
        IPV6_ENCAP_PROGRAM,
        IPV6_DECAP_PROGRAM,
        IPV6_TC_ICMP_PROGRAM,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const XDP_INGRESS: &str = "lb_xdp";
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// The IPv6 halves of `lb_xdp` and `lb_tc_egress`, which they tail-call.
    pub const XDP_INGRESS6: &str = "lb_xdp6";
    pub const TC_EGRESS6: &str = "lb_tc_egress6";
    /// VXLAN encapsulation of DNATed IPv6 packets, tail-called by `lb_xdp6` with a stack of its
    /// own.
    pub const XDP_ENCAP6: &str = "lb_xdp6_encap";
    /// What `lb_xdp` decapsulated when it is IPv6, tail-called by it.
    pub const XDP_DECAP6: &str = "lb_xdp6_decap";
    /// VXLAN over an IPv6 underlay, decapsulated, tail-called by `lb_xdp6`.
    pub const XDP_OVERLAY6: &str = "lb_xdp6_overlay";
    /// ICMPv6 errors about replies, for their backends, tail-called by `lb_xdp6`.
    pub const XDP_ICMP6: &str = "lb_xdp6_icmp";
    /// VXLAN encapsulation over an IPv6 underlay in TC, tail-called by the TC egress programs.
    pub const TC_ENCAP6: &str = "lb_tc_encap6";
    /// ICMPv6 errors translated for their clients, tail-called by `lb_tc_egress6`.
    pub const TC_ICMP6: &str = "lb_tc_icmp6";
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    /// The socket programs, attached to the cgroup v2 root: `connect`, unconnected UDP
    /// `sendmsg`, UDP `recvmsg` and `getpeername`.
    pub const SOCK_CONNECT: &str = "lb_sock_connect4";
    pub const SOCK_SENDMSG: &str = "lb_sock_sendmsg4";
    pub const SOCK_RECVMSG: &str = "lb_sock_recvmsg4";
    pub const SOCK_GETPEERNAME: &str = "lb_sock_getpeername4";
    pub const SOCKET: [&str; 4] = [SOCK_CONNECT, SOCK_SENDMSG, SOCK_RECVMSG, SOCK_GETPEERNAME];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), made of integers only, with all padding explicit.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for IcmpBucket {}
    unsafe impl aya::Pod for LocalBackendKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for TunnelValue {}
    unsafe impl aya::Pod for SnatValue {}
    unsafe impl aya::Pod for RrCursor {}
    unsafe impl aya::Pod for MacKey {}
    unsafe impl aya::Pod for BridgePortKey {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockFlow {}
    unsafe impl aya::Pod for SocketLbConfig {}
    unsafe impl aya::Pod for MeshConfig {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for PassiveHealth {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for FlowValue6 {}
    unsafe impl aya::Pod for ReverseValue6 {}
    unsafe impl aya::Pod for LocalBackendKey6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_node_keys_are_in_this_network_and_spread() {
        extern crate std;
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let mut addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            addr[14..].copy_from_slice(&(i as u16).to_be_bytes());
            let key = ipv6_node_key(&addr);
            assert!(is_ipv6_node_key(key), "{key:#x}");
            assert_eq!(key, ipv6_node_key(&addr), "deterministic");
            seen.insert(key);
        }
        // 4,096 addresses in 2^24 keys: a collision or two is possible, not more.
        assert!(seen.len() >= 4090, "{}", seen.len());
        let ipv4_node = u32::from_ne_bytes([10, 0, 0, 1]);
        assert!(!is_ipv6_node_key(ipv4_node));
        assert!(!is_ipv6_node_key(0));
    }

    #[test]
    fn reasons_fill_their_slots_in_order() {
        for (slot, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, slot, "{} is out of order", reason.name());
        }
        for (slot, event) in Event::ALL.iter().enumerate() {
            assert_eq!(*event as usize, slot, "{} is out of order", event.name());
        }
    }

    #[test]
    fn every_protocol_and_port_has_its_own_two_bits_in_service_ports() {
        let mut taken = [0u64; SERVICE_PORT_WORDS as usize];
        for proto in [PROTO_TCP, PROTO_UDP] {
            for port in 0..=u16::MAX {
                let (word, shift) = service_port_slot(proto, port.to_be()).unwrap();
                assert!(word < SERVICE_PORT_WORDS && shift <= 62 && shift % 2 == 0);
                let bits = &mut taken[word as usize];
                assert_eq!(*bits >> shift & 3, 0, "{proto}/{port} shares its bits");
                *bits |= 3 << shift;
            }
        }
        assert!(taken.iter().all(|word| *word == u64::MAX));
        assert_eq!(service_port_slot(1, 80u16.to_be()), None);
        let vip = ServiceKey {
            vip_be: 1,
            ..ServiceKey::default()
        };
        assert_eq!(service_port_bit(&vip), SERVICE_PORT_VIP);
        assert_eq!(service_port_bit(&ServiceKey::default()), SERVICE_PORT_ANY);
    }

    /// Computed by `jhash_3words` of the kernel's include/linux/jhash.h, compiled with gcc.
    const JHASH_OF_KEY: u32 = 0x4ffd_2029;

    #[test]
    fn the_flow_hash_is_the_kernels_jhash_3words_of_the_numeric_tuple() {
        // jhash_3words(0x0a000001, 0xc0a80001, (40000 << 16) | 8080, 6), as the kernel's
        // include/linux/jhash.h computes it.
        let key = FlowKey {
            src_ip_be: 0x0a00_0001u32.to_be(),
            dst_ip_be: 0xc0a8_0001u32.to_be(),
            src_port_be: 40000u16.to_be(),
            dst_port_be: 8080u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        assert_eq!(flow_hash(&key), JHASH_OF_KEY);
        let other_port = FlowKey {
            src_port_be: 40001u16.to_be(),
            ..key
        };
        assert_ne!(flow_hash(&other_port), flow_hash(&key));
    }

    #[test]
    fn subnet_ids_differ_for_a_network_under_another_prefix() {
        let net = |o: [u8; 4]| u32::from_ne_bytes(o);
        assert_ne!(
            subnet_id(net([10, 0, 0, 0]), 8),
            subnet_id(net([10, 0, 0, 0]), 24)
        );
        // Every valid subnet whose last octet is in play (prefixes 24 to 31) or that ends in 0.
        let mut ids = [(0u32, 0u32, 0u8); 9 * 256];
        let mut n = 0;
        for len in [8u8, 16, 24, 25, 26, 27, 28, 29, 30, 31] {
            let mask = u32::MAX << (32 - u32::from(len));
            for last in 0u32..=255 {
                let network = (0x0a01_0200 | last) & mask;
                if network & 0xff != last && len >= 24 {
                    continue;
                }
                if n < ids.len() && (len >= 24 || last == 0) {
                    ids[n] = (subnet_id(network.to_be(), len), network, len);
                    n += 1;
                }
            }
        }
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (ids[i], ids[j]);
                assert!(
                    a.0 != b.0 || (a.1, a.2) == (b.1, b.2),
                    "{a:?} and {b:?} meet"
                );
            }
        }
    }

    #[test]
    fn slot_mask_works_because_max_backends_per_service_is_a_power_of_two() {
        assert!(MAX_BACKENDS_PER_SERVICE.is_power_of_two());
    }
}
