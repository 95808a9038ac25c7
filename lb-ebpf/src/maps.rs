//! Every map of the data plane. Userspace pins each one under the instance's bpffs folder by
//! the same name (`lb_common::map_names`), so maps outlive the programs and `lbctl` itself.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    Backend, BackendStats, BridgePortKey, Counter, DEFAULT_FLOW_CAPACITY, EVENT_COUNT, FlowKey,
    FlowValue, ICMP_RATE_CAPACITY, IcmpBucket, LocalBackendKey, MAX_BACKENDS, MAX_BRIDGE_PORTS,
    MAX_HOST_ADDRS, MAX_HOST_MACS, MAX_NODES, MAX_ONLINK_SUBNETS, MAX_SERVICES, MacKey,
    MaglevTable, MeshConfig, PassiveHealth, REASON_COUNT, ReverseValue, RrCursor,
    SERVICE_PORT_WORDS, SNAT_FLOW_CAPACITY, SOCK_FLOW_CAPACITY, ServiceKey, ServiceValue,
    SnatValue, SockFlow, SockKey, SocketLbConfig, TunnelValue,
    v6::{Addr6, FlowKey6, FlowValue6, LocalBackendKey6, ReverseValue6, ServiceKey6},
};

/// Published services: (VIP or 0 for every local address, protocol, port) → id and backend list.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Which (protocol, port) pairs have a service, two bits each (`lb_common::service_port_slot`),
/// written by userspace with `SERVICES`: most packets are not for a service, and an array
/// lookup, which the verifier inlines, spares them the hash lookups of `SERVICES`.
#[map]
pub static SERVICE_PORTS: Array<u64> = Array::with_max_entries(SERVICE_PORT_WORDS, 0);

/// Backends by id: address, port and whether they may still receive packets.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Round-robin cursor of each service, by service id, each on a cache line of its own
/// (`RrCursor`). Shared by all CPUs (atomic increment) so that new flows rotate over the
/// backends in order whichever CPU sees them.
#[map]
pub static RR_CURSORS: Array<RrCursor> = Array::with_max_entries(MAX_SERVICES, 0);

/// Maglev lookup table of each maglev service, by service id (64 KiB each). Not preallocated:
/// only maglev services take memory, and an update allocates a new element and swaps it in, so
/// a lookup sees the old table or the new one, never a mix.
#[map]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Flow table: client → service 5-tuple → chosen backend. Resized by userspace at load time.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// Reverse-NAT table: backend → client 5-tuple → the address the client connected to.
#[map]
pub static REVERSE_FLOWS: LruHashMap<FlowKey, ReverseValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// The IPv6 XDP program (`lb_xdp6`, slot 0), which `lb_xdp` tail-calls for every IPv6 frame:
/// verified on its own, with a stack of its own, so that the IPv6 path adds nothing to the IPv4
/// one's verification or stack. Filled by userspace at load, and pinned (the kernel empties a
/// program array no process or pin holds). Empty, IPv6 passes untouched.
#[map]
pub static IPV6_XDP_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The IPv6 TC egress program (`lb_tc_egress6`, slot 0), which `lb_tc_egress` tail-calls; a map
/// of its own, since a program array takes programs of one type.
#[map]
pub static IPV6_TC_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The IPv6 decapsulation program (`lb_xdp6_decap`, slot 0), which `lb_xdp` tail-calls for a
/// VXLAN packet from a node whose inner frame is IPv6. Pinned, as `IPV6_XDP_PROGRAM`.
#[map]
pub static IPV6_DECAP_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The XDP program for ICMPv6 errors about replies (`lb_xdp6_icmp`, slot 0), which `lb_xdp6`
/// tail-calls for ICMPv6 (`icmp6::xdp_to_backend`). Pinned, as `IPV6_XDP_PROGRAM`.
#[map]
pub static ICMP6_XDP_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The ICMPv6 translation program (`lb_tc_icmp6`, slot 0), which `lb_tc_egress6` tail-calls for
/// an ICMPv6 frame. Pinned, as `IPV6_TC_PROGRAM`.
#[map]
pub static IPV6_TC_ICMP_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The encapsulation program (`lb_xdp6_encap`, slot 0), which `lb_xdp6` tail-calls for a
/// packet to a backend on another node (encapsulation needs more stack than `lb_xdp6` has
/// left), and `lb_xdp` for one to a node of an IPv6 underlay (the IPv4 program is at the
/// verifier's limits). What it needs of the packet goes through `ENCAP_HANDOFF`.
#[map]
pub static IPV6_ENCAP_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per CPU, what `lb_xdp6` or `lb_xdp` hands to `lb_xdp6_encap` with the packet it tail-calls
/// it for (`encap::Handoff`), as `DECAPSULATED_FROM`. Not pinned: the programs come from one
/// load.
#[map]
pub static ENCAP_HANDOFF: PerCpuArray<crate::encap::Handoff> = PerCpuArray::with_max_entries(1, 0);

/// The TC encapsulation program over an IPv6 underlay (`lb_tc_encap6`, slot 0), which
/// `lb_tc_egress` and `lb_tc_egress6` tail-call for a reply to a node of an IPv6 underlay
/// (their stacks have no room for it). Pinned, as `IPV6_TC_PROGRAM`.
#[map]
pub static TC_ENCAP6_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per CPU, what a TC program hands to `lb_tc_encap6` (`encap::TcHandoff`). Not pinned.
#[map]
pub static TC_ENCAP_HANDOFF: PerCpuArray<crate::encap::TcHandoff> =
    PerCpuArray::with_max_entries(1, 0);

/// IPv6 services: (IPv6 VIP or all zero for every local address, port, protocol) → id and the
/// service's IPv6 backends. `SERVICE_PORTS` covers both families.
#[map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// Round-robin cursor of each service's IPv6 backends, by service id: each family takes its
/// backends in turn on its own.
#[map]
pub static RR_CURSORS6: Array<RrCursor> = Array::with_max_entries(MAX_SERVICES, 0);

/// Maglev lookup table of each maglev service's IPv6 backends, by service id (as `MAGLEV`).
#[map]
pub static MAGLEV6: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// The address of each IPv6 backend (`BACKEND_IPV6`), by backend id; `BACKENDS` holds the rest.
#[map]
pub static BACKEND_ADDRS6: Array<Addr6> = Array::with_max_entries(MAX_BACKENDS, 0);

/// IPv6 flow table: client → service 5-tuple → chosen backend. Resized with `FLOWS`.
#[map]
pub static FLOWS6: LruHashMap<FlowKey6, FlowValue6> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// IPv6 reverse-NAT table: backend → client 5-tuple → the address the client connected to.
#[map]
pub static REVERSE_FLOWS6: LruHashMap<FlowKey6, ReverseValue6> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// The IPv6 addresses of this node's interfaces (not link-local), written by userspace: a new
/// IPv6 flow to a service published on every local address must be addressed to one. A set.
#[map]
pub static HOST_ADDRS6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);

/// The IPv6 backends this node reaches by plain routing, as `LOCAL_BACKENDS`: the only IPv6
/// destinations a decapsulated client packet is delivered to. A set.
#[map]
pub static LOCAL_BACKENDS6: HashMap<LocalBackendKey6, u32> =
    HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// On a backend's node, as `TUNNEL_REPLIES` for IPv6 flows: an IPv6 reply's 5-tuple (backend →
/// client) → the node the flow came in on. Sized like `FLOWS6`.
#[map]
pub static TUNNEL_REPLIES6: LruHashMap<FlowKey6, TunnelValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// Per CPU, the underlay address of the node a decapsulated IPv6 frame came from, set by
/// `lb_xdp` just before it tail-calls `lb_xdp6_decap` with that frame and taken (reset to 0)
/// there: a tail call carries no arguments, and both run on one CPU without preemption, so no
/// other packet sees the value. Pinned, as the program array.
#[map]
pub static DECAPSULATED_FROM: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// An IPv6 underlay's nodes VXLAN packets are accepted from: address → the node's key
/// (`lb_common::ipv6_node_key`), what every other table names the node by. As `NODES`.
#[map]
pub static NODES6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_NODES, 0);

/// An IPv6 underlay's nodes by key → address: where encapsulation sends a node's packets.
#[map]
pub static NODE_ADDRS6: HashMap<u32, Addr6> = HashMap::with_max_entries(MAX_NODES, 0);

/// This node's own address on an IPv6 underlay, in slot 0 (all zero on an IPv4 underlay; then
/// `MeshConfig::local_ip_be` is the address, and otherwise this node's key).
#[map]
pub static MESH6: Array<Addr6> = Array::with_max_entries(1, 0);

/// The decapsulation program of VXLAN over IPv6 (`lb_xdp6_overlay`, slot 0), which `lb_xdp6`
/// tail-calls for a packet to this node's overlay port on its IPv6 underlay address. Pinned,
/// as `IPV6_XDP_PROGRAM`.
#[map]
pub static OVERLAY6_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Hairpin flows (`FLOW_SNAT`): client → service 5-tuple → the source address and port its
/// packets get towards the backend (`snat`). Their replies come back to that address and port,
/// and `REVERSE_FLOWS` holds the client for them. LRU: an evicted entry makes its flow choose
/// again, as a removed backend does.
#[map]
pub static SNAT_FLOWS: LruHashMap<FlowKey, SnatValue> =
    LruHashMap::with_max_entries(SNAT_FLOW_CAPACITY, 0);

/// The subnets of this node's interfaces, written by userspace: prefix → the subnet itself
/// (its network address and prefix length: `lb_common::subnet_id`),
/// the same for every address in it and different for a longer prefix of the same network. A client in the subnet of
/// the backend it is given (both on a link with this node) would get the backend's reply
/// straight over that link, bypassing the reverse NAT: such a flow is a hairpin flow (`snat`).
#[map]
pub static ONLINK_SUBNETS: LpmTrie<u32, u32> = LpmTrie::with_max_entries(MAX_ONLINK_SUBNETS, 0);

/// The MAC addresses of this node's interfaces (every one, so that an interface enslaved to a
/// bridge knows the bridge's too), written by userspace: a frame for a service addressed to any
/// other unicast MAC is another host's, and starts no flow (`pass_other_host`). A set: the
/// value is unused (0).
#[map]
pub static HOST_MACS: HashMap<MacKey, u32> = HashMap::with_max_entries(MAX_HOST_MACS, 0);

/// Backends (and clients) behind a port of one of this node's bridges, written by userspace
/// from the bridges' forwarding databases: (bridge, MAC) → the port, a veth whose other end is
/// that host's interface. XDP sends a packet whose next hop the FIB puts behind the bridge
/// straight into that namespace (`xmit`, `bpf_redirect_peer`) instead of through the node's
/// stack. Each port also has its `TX_VIA_TC` cookie.
#[map]
pub static BRIDGE_PORTS: HashMap<BridgePortKey, u32> =
    HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

/// The ports `BRIDGE_PORTS` names, as devices (index → index), written with it: the kernel
/// takes a device out of a devmap the moment it goes away, so the port of a container deleted
/// since userspace last looked is seen gone at once, and its packets take the kernel's path
/// (which finds the container that replaced it) instead of vanishing into a dead port.
#[map]
pub static PEER_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_BRIDGE_PORTS, 0);

/// The IPv4 addresses of this node's interfaces, written by userspace: a node's own socket
/// that connects to one of them on a published port is given a backend (`socklb`). A set: the
/// value is unused (0).
#[map]
pub static HOST_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);

/// Socket load balancing's settings, in slot 0 (`SocketLbConfig`): the namespace whose sockets
/// the cgroup programs act on (they see every namespace's), 0 while it is off.
#[map]
pub static SOCKET_LB: Array<SocketLbConfig> = Array::with_max_entries(1, 0);

/// An unconnected UDP socket of the node's own and the service address it sent to → the
/// backend it was given (`socklb`): its later datagrams to that address go to the same backend.
#[map]
pub static SOCK_FLOWS: LruHashMap<SockKey, SockFlow> =
    LruHashMap::with_max_entries(SOCK_FLOW_CAPACITY, 0);

/// A node's own socket and the address it really talks to (its backend, or the node of a
/// backend on another node) → its choice: `recvmsg` and `getpeername` give the socket the
/// service address back, and TC egress finds the backend of a packet to another node here.
#[map]
pub static SOCK_PEERS: LruHashMap<SockKey, SockFlow> =
    LruHashMap::with_max_entries(SOCK_FLOW_CAPACITY, 0);

/// Per-CPU packet, byte and new-flow counters of each backend, by backend id.
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// What the data plane saw of each backend's connections, by backend id (`passive`): failures
/// in a row, refused and unanswered connections, ejections. Shared by every CPU (the events
/// are rare); userspace reads it, and writes an entry only to end an ejection.
#[map]
pub static PASSIVE_HEALTH: Array<PassiveHealth> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The ICMP errors the data plane made ("fragmentation needed", `icmp`), rate-limited by the
/// address they go to: a token bucket each, as the kernel keeps for its own errors.
#[map]
pub static ICMP_RATE: LruHashMap<u32, IcmpBucket> =
    LruHashMap::with_max_entries(ICMP_RATE_CAPACITY, 0);

/// Per-CPU packet and byte counters of each `lb_common::Reason`.
#[map]
pub static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// Per-CPU counters of flow-table `lb_common::Event`s.
#[map]
pub static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_COUNT, 0);

/// Interfaces XDP may redirect to, keyed by ifindex: the interfaces lbctl is attached to.
/// A next hop on any other interface goes through the kernel (XDP_PASS).
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// Interfaces (by ifindex) whose frames XDP hands to the TC ingress program to send, because
/// XDP's own transmission cannot deliver there (`xmit`), with the instance's cookie for each:
/// the note in a frame's metadata must carry it.
#[map]
pub static TX_VIA_TC: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// Backends this node reaches by plain routing (hosted here, or on no node), by address, port
/// and protocol: the only destinations a decapsulated client packet is delivered to. A set (the
/// value is unused, 0); not preallocated, since most backends are elsewhere.
#[map]
pub static LOCAL_BACKENDS: HashMap<LocalBackendKey, u32> =
    HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Underlay addresses (network byte order) of the nodes VXLAN packets are accepted from. A set:
/// the value is unused (0).
#[map]
pub static NODES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_NODES, 0);

/// This node's overlay settings, in slot 0 (`MeshConfig`).
#[map]
pub static MESH: Array<MeshConfig> = Array::with_max_entries(1, 0);

/// On a backend's node: reply 5-tuple (backend → client) → the node the flow came in on, so
/// the TC egress program encapsulates the reply back there. Sized like the flow table.
#[map]
pub static TUNNEL_REPLIES: LruHashMap<FlowKey, TunnelValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// Fragmented UDP datagrams whose first fragment was NATed: (source, destination, IPv4
/// identification, direction) → the address the fragments that follow get (`frag`).
/// Short-lived by nature (an LRU); not pinned: a lost entry costs one datagram, as a lost
/// fragment does.
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentNat> =
    LruHashMap::with_max_entries(16_384, 0);

/// Per CPU, recent FIB answers by destination (see `forward::fib_lookup_cached`). Not pinned:
/// a cache, empty after every load.
#[map]
pub static ROUTE_CACHE: PerCpuArray<CachedRoute> =
    PerCpuArray::with_max_entries(ROUTE_CACHE_SLOTS, 0);

/// The IPv6 path's per-CPU route cache, as `ROUTE_CACHE` for IPv4: what the FIB answered for
/// an IPv6 destination (`CachedRoute6`), by a hash of it.
#[map]
pub static ROUTE_CACHE6: PerCpuArray<CachedRoute6> =
    PerCpuArray::with_max_entries(ROUTE_CACHE_SLOTS, 0);

// Value and key types of the maps that are the data plane's alone (not pinned, never read
// by userspace); the pinned ones' live in `lb_common`.

/// Slots of the per-CPU route cache (a power of two: the slot is a hash's top bits).
pub const ROUTE_CACHE_SLOTS: u32 = 1 << ROUTE_CACHE_BITS;
pub const ROUTE_CACHE_BITS: u32 = 10;

/// A FIB answer this CPU got for `dst_ip_be`, arriving on `ingress_ifindex`, at
/// `checked_jiffies` (the kernel's tick count; 0: empty slot). Only answers that do not depend
/// on the packet are kept: a forward (with its egress MTU, so the length check still applies
/// to every packet) and "local address". With a forward, how XDP sends to its next hop (`xmit`): each a hash
/// lookup spared per packet (`TX_PORTS`, `TX_VIA_TC`, `BRIDGE_PORTS`); `ifindex` is then the
/// bridge port a next hop behind a bridge is reached through.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedRoute {
    pub checked_jiffies: u64,
    pub dst_ip_be: u32,
    pub ingress_ifindex: u32,
    pub ifindex: u32,
    /// `BPF_FIB_LKUP_RET_SUCCESS` or `BPF_FIB_LKUP_RET_NOT_FWDED`.
    pub rc: u32,
    pub mtu: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// `forward::XMIT_*` flags.
    pub xmit: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<CachedRoute>() == 40);

/// [`CachedRoute`] for an IPv6 destination: a forward only (successful lookups).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedRoute6 {
    pub checked_jiffies: u64,
    pub dst: [u8; 16],
    pub ingress_ifindex: u32,
    pub ifindex: u32,
    pub mtu: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub xmit: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<CachedRoute6>() == 56);

/// Key of `FRAGMENTS`: a fragmented datagram as it arrives, and what its later fragments get.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragmentKey {
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub id_be: u16,
    /// `frag::TO_BACKEND`, `TO_CLIENT`, `DELIVER` or `TUNNEL`.
    pub direction: u8,
    pub _pad: u8,
}

/// Value of `FRAGMENTS`: the address the later fragments get (the backend for a request, the
/// service for a reply), the flow's backend, whose counters they add to, and where they are
/// encapsulated to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragmentNat {
    pub ip_be: u32,
    pub backend_id: u32,
    /// The node the fragments are encapsulated to (`frag::TO_BACKEND` towards another node's
    /// backend, `frag::TUNNEL`); 0 otherwise.
    pub node_ip_be: u32,
    /// The outer UDP source port of the datagram's flow, when encapsulated.
    pub tunnel_port: u16,
    /// 1 + the reason the datagram's first fragment was dropped for (`frag::TUNNEL`): its
    /// later fragments are dropped as it was, not let out untouched. 0: it was sent.
    pub dropped_as: u16,
}
