//! The node the packet tests run the data plane in, and the frames they send it: shared by
//! `packets.rs` (exact frames for each feature) and `hostile.rs` (generated malformed frames).
//!
//! The node is a network namespace of its own: a veth `lbt0` with the node address
//! 192.168.100.1/24 and the task subnet 10.0.0.1/24, and permanent neighbour entries for the
//! client, the backends and the other mesh node `n2`, so that the FIB lookups of the program
//! resolve. It is `n1` of a routing mesh: its own backends are reached by routing, `n2`'s
//! through VXLAN.
#![allow(
    dead_code,
    reason = "each test file that includes this module uses a part of it"
)]
use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, PacketBuilder, UdpHeader};
use lb_common::{
    BackendStats, DEFAULT_VNI, DEFAULT_VXLAN_PORT, Event, FlowKey, PROTO_TCP, Reason, program_names,
};
use lb_tests::netns::NetNs;
use lb_userspace::{
    dataplane::maglev,
    dataplane::sync,
    dataplane::{self, Maps},
    table::{Proto, Scheduler, Table, parse_backend_spec},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
/// TC_ACT_UNSPEC: the program lets the packet go on its way.
pub const TC_ACT_UNSPEC: i32 = -1;
/// TC_ACT_SHOT: the program drops the packet.
pub const TC_ACT_SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`: the program redirected the packet (`bpf_redirect`).
pub const TC_ACT_REDIRECT: i32 = 7;

pub const NODE_IP: [u8; 4] = [192, 168, 100, 1];
/// The node's and the client's IPv6 addresses, and the IPv6 backends (neighbours on `lbt0`).
pub const NODE_IP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
pub const CLIENT_IP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
];
pub const BACKENDS6: [[u8; 16]; 2] = [
    [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6,
    ],
    [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
    ],
];
pub const CLIENT_IP: [u8; 4] = [192, 168, 100, 2];
pub const OTHER_IP: [u8; 4] = [192, 168, 100, 77];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const BACKENDS: [[u8; 4]; 3] = [[10, 0, 0, 6], [10, 0, 0, 7], [10, 0, 0, 8]];
pub const BACKEND_PORT: u16 = 80;
pub const WEB_PORT: u16 = 8080;
pub const DNS_PORT: u16 = 5353;
pub const DNS_BACKEND_PORT: u16 = 53;
/// The MAC the client addressed its frames to: the node's, whatever it is.
pub const INGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The other node of the mesh, on the same underlay segment.
pub const N2_IP: [u8; 4] = [192, 168, 100, 11];
pub const N2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
/// A third node, known but hosting none of the test services' backends.
pub const N3_IP: [u8; 4] = [192, 168, 100, 12];
/// n2's and n3's addresses on an IPv6 underlay (n2 a neighbour on `lbt0`, as `N2_IP`).
pub const N2_IP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11,
];
pub const N3_IP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12,
];
/// The UDP source port n2 puts on the VXLAN it sends (its flow hash: any value will do).
pub const N2_SOURCE_PORT: u16 = 0xc123;
/// `mesh tcp/9090` and `meshdns udp/9053` have one backend, on n2.
pub const MESH_PORT: u16 = 9090;
pub const MESH_DNS_PORT: u16 = 9053;
pub const REMOTE_BACKEND: [u8; 4] = [10, 0, 0, 20];
/// MTU of `lbt0` (veth's default), the underlay the VXLAN leaves by.
pub const UNDERLAY_MTU: usize = 1500;

pub fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, BACKENDS[i][3]]
}

pub struct Node {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub table: Table,
    /// The node of the table this instance is (`sync::desired`'s `self_node`).
    pub self_node: Option<&'static str>,
    /// ifindex and MAC of `lbt0`.
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Builds the node namespace; `body` runs inside it with the program loaded and the table
/// `web tcp/8080 → 10.0.0.6-8:80, dns udp/5353 → 10.0.0.6-7:53, mesh tcp/9090 → 10.0.0.20:80@n2,
/// meshdns udp/9053 → 10.0.0.20:53@n2` applied as node `n1` of the nodes `n1` (192.168.100.1)
/// and `n2` (192.168.100.11).
pub fn with_node(body: impl FnOnce(&mut Node) + Send) {
    with_node_of(4096, body);
}

/// [`with_node`] with a flow table of `flow_capacity` flows.
pub fn with_node_of(flow_capacity: u32, body: impl FnOnce(&mut Node) + Send) {
    lb_tests::require_root().unwrap();
    let ns = NetNs::new("pkt").unwrap();
    for args in [
        "link add lbt0 type veth peer name lbt1",
        "link set lbt0 address 02:00:00:00:00:01",
        "link set lbt0 up",
        "link set lbt1 up",
        "addr add 192.168.100.1/24 dev lbt0",
        "addr add 10.0.0.1/24 dev lbt0",
        "neigh add 192.168.100.2 lladdr 02:00:00:00:00:02 dev lbt0 nud permanent",
        "neigh add 10.0.0.6 lladdr 02:00:00:00:00:06 dev lbt0 nud permanent",
        "neigh add 10.0.0.7 lladdr 02:00:00:00:00:07 dev lbt0 nud permanent",
        "neigh add 10.0.0.8 lladdr 02:00:00:00:00:08 dev lbt0 nud permanent",
        "neigh add 192.168.100.11 lladdr 02:00:00:00:00:0b dev lbt0 nud permanent",
        // IPv6: the node 2001:db8:100::1 beside its client, its backends on 2001:db8:10::/64.
        "addr add 2001:db8:100::1/64 dev lbt0 nodad",
        "addr add 2001:db8:10::1/64 dev lbt0 nodad",
        "neigh add 2001:db8:100::2 lladdr 02:00:00:00:00:02 dev lbt0 nud permanent",
        "neigh add 2001:db8:100::11 lladdr 02:00:00:00:00:0b dev lbt0 nud permanent",
        "neigh add 2001:db8:10::6 lladdr 02:00:00:00:00:06 dev lbt0 nud permanent",
        "neigh add 2001:db8:10::7 lladdr 02:00:00:00:00:07 dev lbt0 nud permanent",
    ] {
        ns.ip(args.split(' ')).unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    ns.in_netns(move || {
        let mut ebpf =
            dataplane::load(None, dataplane::FlowCapacity::new(flow_capacity, None)).unwrap();
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::XDP_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        xdp.load().unwrap();
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::TC_EGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        tc.load().unwrap();
        dataplane::load_ipv6_programs(&mut ebpf).unwrap();
        let mut maps = Maps::take(&mut ebpf).unwrap();
        // Frames for another host's MAC start no flow: lbt0's is this node's.
        let host = lb_userspace::host::underlay::host_view(&["lbt0"]).unwrap();
        maps.sync_host_macs(&host.attached_macs).unwrap();
        // A service on every address is balanced at the node's own addresses.
        maps.sync_host_addrs(&host.addrs).unwrap();
        maps.sync_host_addrs6(&lb_userspace::host::underlay::local_addrs6().unwrap())
            .unwrap();
        let ifindex = if_index("lbt0");
        let mut node = Node {
            ebpf,
            maps,
            table: Table::default(),
            self_node: Some("n1"),
            ifindex,
            mac: INGRESS_MAC,
        };
        let web: Vec<_> = BACKENDS
            .iter()
            .map(|ip| std::net::SocketAddrV4::new(Ipv4Addr::from(*ip), BACKEND_PORT))
            .collect();
        let dns: Vec<_> = BACKENDS[..2]
            .iter()
            .map(|ip| std::net::SocketAddrV4::new(Ipv4Addr::from(*ip), DNS_BACKEND_PORT))
            .collect();
        node.table
            .add_service("web", Proto::Tcp, WEB_PORT, None, &web)
            .unwrap();
        node.table
            .add_service("dns", Proto::Udp, DNS_PORT, None, &dns)
            .unwrap();
        for (name, ip) in [("n1", NODE_IP), ("n2", N2_IP), ("n3", N3_IP)] {
            node.table
                .add_node(name, Ipv4Addr::from(ip).into())
                .unwrap();
        }
        for (name, proto, port, backend) in [
            ("mesh", Proto::Tcp, MESH_PORT, "10.0.0.20:80@n2"),
            ("meshdns", Proto::Udp, MESH_DNS_PORT, "10.0.0.20:53@n2"),
        ] {
            let backend = parse_backend_spec(backend).unwrap();
            node.table
                .add_service(name, proto, port, None, &[backend])
                .unwrap();
        }
        node.apply();
        body(&mut node);
    });
}

pub fn if_index(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?}");
    index
}

impl Node {
    /// Empties the XDP program's route cache (`ROUTE_CACHE`), as loading the programs anew does:
    /// a test that changes how an interface sends (`TX_VIA_TC`, `TX_PORTS`, `BRIDGE_PORTS`)
    /// in place would otherwise see the cached decision for up to 25 ticks.
    pub fn forget_routes(&mut self) {
        let cpus = aya::util::nr_cpus().unwrap();
        let mut cache: aya::maps::PerCpuArray<_, [u64; 5]> =
            aya::maps::PerCpuArray::try_from(self.ebpf.map_mut("ROUTE_CACHE").unwrap()).unwrap();
        for slot in 0..cache.len() {
            let empty = aya::maps::PerCpuValues::try_from(vec![[0u64; 5]; cpus]).unwrap();
            cache.set(slot, empty, 0).unwrap();
        }
    }

    pub fn apply(&mut self) {
        let actual = self.maps.read_contents().unwrap();
        let delta = sync::delta(&sync::desired(&self.table, self.self_node), &actual);
        self.maps.apply(&delta).unwrap();
    }

    /// Runs the XDP program on `frame`, as if received on `ingress` (default: loopback).
    pub fn xdp(&self, frame: &[u8], ingress: Option<u32>) -> (u32, Vec<u8>) {
        self.try_xdp(frame, ingress).unwrap()
    }

    /// [`Node::xdp`], or the kernel's refusal to run the program on `frame`.
    pub fn try_xdp(
        &self,
        frame: &[u8],
        ingress: Option<u32>,
    ) -> Result<(u32, Vec<u8>), ProgramError> {
        let prog: &Xdp = self
            .ebpf
            .program(program_names::XDP_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ingress.unwrap_or(0).to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ingress.map(|_| &ctx[..]),
            ..TestRunOptions::new()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// One case of a table: `frame` gets `action`, is counted once under `reason`, and is left
    /// unchanged when passed.
    pub fn xdp_case(
        &self,
        name: &str,
        frame: &[u8],
        ingress: Option<u32>,
        action: u32,
        reason: Reason,
    ) {
        let before = self.reason(reason);
        let (got, out) = self.xdp(frame, ingress);
        assert_eq!(got, action, "{name}");
        if action == XDP_PASS {
            assert_eq!(out, frame, "{name} must pass unchanged");
        }
        assert_eq!(
            self.reason(reason),
            before + 1,
            "{name} is counted as {}",
            reason.name()
        );
    }

    /// Runs the TC egress program on `frame`, as if leaving through `egress` (default:
    /// loopback). Returns the TC action and the frame as the program left it.
    pub fn tc_on(&self, frame: &[u8], egress: Option<u32>) -> (i32, Vec<u8>) {
        self.try_tc_on(frame, egress).unwrap()
    }

    /// [`Node::tc_on`] for a GSO packet of `gso_size`-byte segments (`skb_shinfo`'s segment
    /// size, as a UDP_SEGMENT socket or TSO sets it; the kernel leaves its type unset in a test
    /// run, so it counts as non-TCP GSO).
    pub fn tc_gso(&self, frame: &[u8], egress: u32, gso_size: u32) -> (i32, Vec<u8>) {
        // struct __sk_buff: ifindex at 40, gso_segs at 164, gso_size at 176 (192 bytes).
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&egress.to_ne_bytes());
        let segments = (frame.len() as u32).div_ceil(gso_size.max(1));
        ctx[164..168].copy_from_slice(&segments.to_ne_bytes());
        ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        self.tc_with_ctx(frame, Some(&ctx)).unwrap()
    }

    /// [`Node::tc_on`], or the kernel's refusal to run the program on `frame`.
    pub fn try_tc_on(
        &self,
        frame: &[u8],
        egress: Option<u32>,
    ) -> Result<(i32, Vec<u8>), ProgramError> {
        // struct __sk_buff up to ifindex: len, pkt_type, mark, queue_mapping, protocol,
        // vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex. The kernel
        // refuses any of them but mark, priority, ingress_ifindex and ifindex non-zero, and
        // sets the skb's device from ifindex.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&egress.unwrap_or(0).to_ne_bytes());
        self.tc_with_ctx(frame, egress.map(|_| &ctx[..]))
    }

    /// Runs the TC egress program on `frame` with `ctx` as its `__sk_buff` (if given).
    fn tc_with_ctx(
        &self,
        frame: &[u8],
        ctx: Option<&[u8]>,
    ) -> Result<(i32, Vec<u8>), ProgramError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program_names::TC_EGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..TestRunOptions::new()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// [`Node::tc_on`] out of loopback, for frames the program always lets go on.
    pub fn tc(&self, frame: &[u8]) -> Vec<u8> {
        let (action, out) = self.tc_on(frame, None);
        assert_eq!(action, TC_ACT_UNSPEC, "TC always lets the chain go on");
        out
    }

    pub fn reason(&self, reason: Reason) -> u64 {
        self.maps.reason_totals().unwrap()[reason as usize].packets
    }

    pub fn event(&self, event: Event) -> u64 {
        self.maps.event_totals().unwrap()[event as usize]
    }

    pub fn backend(&self, service: &str, i: usize) -> BackendStats {
        let id = self.table.service(service).unwrap().backends[i].id;
        self.maps.backend_totals(id).unwrap()
    }

    /// `TUNNEL_REPLIES`: reply 5-tuple → the ingress node its replies are encapsulated to.
    pub fn backend_id(&self, service: &str, i: usize) -> u32 {
        self.table.service(service).unwrap().backends[i].id
    }

    /// Makes `service` choose by `scheduler`, in the table and the maps.
    pub fn set_scheduler(&mut self, service: &str, scheduler: Scheduler) {
        self.table.set_scheduler(service, scheduler).unwrap();
        self.apply();
    }

    /// Where the maglev table of `service` sends the flow `key`, as userspace computes it.
    pub fn maglev_choice(&self, service: &str, key: &FlowKey) -> ([u8; 4], u16) {
        let service = self.table.service(service).unwrap();
        let contents = sync::desired(&self.table, self.self_node);
        let id = maglev::backend_of(&contents.maglev[&service.id], key);
        let backend = service.backends.iter().find(|b| b.id == id).unwrap();
        let std::net::SocketAddr::V4(addr) = backend.addr else {
            panic!("{backend} is not an IPv4 backend");
        };
        (addr.ip().octets(), addr.port())
    }

    /// Forgets a flow as the LRU does when the table is full: its entry and its reverse-NAT
    /// entry (pinned to `backend`:80).
    pub fn evict(&mut self, key: &FlowKey, backend: [u8; 4]) {
        self.maps.flows.remove(key).unwrap();
        let reverse = reverse_key(key, backend, BACKEND_PORT);
        self.maps.reverse_flows.remove(&reverse).unwrap();
    }

    /// `TUNNEL_REPLIES`: reply 5-tuple → the ingress node its replies are encapsulated to.
    pub fn tunnel_replies(&self) -> Vec<(FlowKey, [u8; 4])> {
        self.maps
            .tunnel_replies
            .iter()
            .map(|entry| {
                let (key, tunnel) = entry.unwrap();
                (key, tunnel.node_ip_be.to_ne_bytes())
            })
            .collect()
    }
}

/// A TCP frame; `flags` as [`with_flags`] takes them.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0, dst.0, ttl)
        .tcp(src.1, dst.1, 1000, 64240);
    let mut frame = Vec::new();
    with_flags(builder, flags)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// `builder`'s segment with the TCP flags `flags`: "S", "SA", "A", "PA", "FA", "R" or "RA".
fn with_flags(
    builder: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    flags: &str,
) -> etherparse::PacketBuilderStep<etherparse::TcpHeader> {
    match flags {
        "S" => builder.syn(),
        "SA" => builder.syn().ack(1001),
        "A" => builder.ack(1),
        "PA" => builder.psh().ack(1),
        "FA" => builder.fin().ack(1),
        "R" => builder.rst(),
        "RA" => builder.rst().ack(1),
        other => panic!("unknown flags {other}"),
    }
}

pub fn udp(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0, dst.0, ttl)
        .udp(src.1, dst.1)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

pub fn client_syn(port: u16) -> Vec<u8> {
    client_tcp(port, WEB_PORT, "S")
}

/// A client's TCP frame without payload to the node's published port `service_port`.
pub fn client_tcp(port: u16, service_port: u16, flags: &str) -> Vec<u8> {
    tcp(
        (CLIENT_MAC, INGRESS_MAC),
        (CLIENT_IP, port),
        (NODE_IP, service_port),
        64,
        flags,
        b"",
    )
}

/// The Internet checksum (RFC 1071) of `parts`, concatenated.
pub fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP error frame (`macs`: source, destination) from `from` to `to` (TTL `ttl`): `kind` and `code`, then the 4 bytes
/// after the checksum (`rest`: a "fragmentation needed" has the next-hop MTU in the last two),
/// quoting `quoted`; both checksums valid, no DF.
pub fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    (from, to, ttl): ([u8; 4], [u8; 4], u8),
    (kind, code, rest): (u8, u8, [u8; 4]),
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quoted);
    let check = internet_checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = Ipv4Header::new(icmp.len() as u16, ttl, IpNumber::ICMP, from, to).unwrap();
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    // (source, destination), as `PacketBuilder::ethernet2` takes them.
    let mut frame = Vec::new();
    frame.extend_from_slice(&macs.1);
    frame.extend_from_slice(&macs.0);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&icmp);
    frame
}

/// The reasons whose counters moved between two readings, and by how much.
pub fn counted(before: &[u64], after: &[u64]) -> Vec<(Reason, u64)> {
    Reason::ALL
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (before, after))| before != after)
        .map(|(reason, (before, after))| (*reason, after - before))
        .collect()
}

/// Checks the IPv4 and TCP/UDP checksums of a frame by recomputing them.
pub fn assert_checksums_valid(frame: &[u8]) {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("not IPv4")
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 checksum"
    );
    match sliced.transport {
        Some(etherparse::TransportSlice::Tcp(tcp)) => {
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expected, "TCP checksum");
        }
        Some(etherparse::TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
            let expected = udp
                .to_header()
                .calc_checksum_ipv4(&header, udp.payload())
                .unwrap();
            assert_eq!(udp.checksum(), expected, "UDP checksum");
        }
        _ => {}
    }
}

/// The outer headers of a VXLAN frame, as the data plane writes them.
#[derive(Clone, Copy)]
pub struct Tunnel {
    /// Source and destination MACs, outer and inner alike (the data plane repeats the outer
    /// ones in the inner header).
    pub macs: ([u8; 6], [u8; 6]),
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    /// The VXLAN flags byte; 0x08 is the I flag (the VNI is valid).
    pub flags: u8,
    pub vni: u32,
    /// The outer IPv4 DF flag: lbctl sets it (with a constant ID, RFC 6864: an encapsulated
    /// packet is never fragmented on the way); Linux's VXLAN device leaves it clear by default.
    pub dont_fragment: bool,
}

impl Tunnel {
    /// n2 → this node's overlay port, as n2 sends it.
    pub fn from_n2() -> Tunnel {
        Tunnel {
            macs: (N2_MAC, INGRESS_MAC),
            src: (N2_IP, N2_SOURCE_PORT),
            dst: (NODE_IP, DEFAULT_VXLAN_PORT),
            flags: 0x08,
            vni: DEFAULT_VNI,
            dont_fragment: false,
        }
    }

    /// This node → n2, from the UDP source port the data plane chose.
    pub fn to_n2(src_port: u16) -> Tunnel {
        Tunnel {
            macs: (INGRESS_MAC, N2_MAC),
            src: (NODE_IP, src_port),
            dst: (N2_IP, DEFAULT_VXLAN_PORT),
            dont_fragment: true,
            ..Tunnel::from_n2()
        }
    }

    /// `inner` encapsulated: outer Ethernet, IPv4 (TTL 64, id 0, DF as said), UDP with checksum 0
    /// (none: RFC 7348 allows it over IPv4), VXLAN, then `inner` whole.
    pub fn wrap(&self, inner: &[u8]) -> Vec<u8> {
        let vni = self.vni.to_be_bytes();
        let vxlan = [self.flags, 0, 0, 0, vni[1], vni[2], vni[3], 0];
        let udp_len = (UdpHeader::LEN + vxlan.len() + inner.len()) as u16;
        let mut ip = Ipv4Header::new(udp_len, 64, IpNumber::UDP, self.src.0, self.dst.0).unwrap();
        ip.dont_fragment = self.dont_fragment;
        ip.header_checksum = ip.calc_header_checksum();
        let udp = UdpHeader {
            source_port: self.src.1,
            destination_port: self.dst.1,
            length: udp_len,
            checksum: 0,
        };
        let eth = Ethernet2Header {
            source: self.macs.0,
            destination: self.macs.1,
            ether_type: EtherType::IPV4,
        };
        [
            &eth.to_bytes()[..],
            &ip.to_bytes(),
            &udp.to_bytes(),
            &vxlan,
            inner,
        ]
        .concat()
    }
}

/// The outer headers of VXLAN over an IPv6 underlay, as the data plane writes them.
#[derive(Clone, Copy)]
pub struct Tunnel6 {
    /// Source and destination MACs, outer and inner alike.
    pub macs: ([u8; 6], [u8; 6]),
    pub src: ([u8; 16], u16),
    pub dst: ([u8; 16], u16),
    pub vni: u32,
    /// The outer flow label (lbctl: the outer UDP source port).
    pub flow_label: u32,
    /// Whether the outer UDP checksum is computed (Linux's VXLAN devices do by default) or 0
    /// (lbctl's, RFC 6935).
    pub udp_checksum: bool,
}

impl Tunnel6 {
    /// n2 → this node's overlay port over the IPv6 underlay.
    pub fn from_n2() -> Tunnel6 {
        Tunnel6 {
            macs: (N2_MAC, INGRESS_MAC),
            src: (N2_IP6, N2_SOURCE_PORT),
            dst: (NODE_IP6, DEFAULT_VXLAN_PORT),
            vni: DEFAULT_VNI,
            flow_label: 0,
            udp_checksum: false,
        }
    }

    /// This node → n2, from the UDP source port the data plane chose (also its flow label).
    pub fn to_n2(src_port: u16) -> Tunnel6 {
        Tunnel6 {
            macs: (INGRESS_MAC, N2_MAC),
            src: (NODE_IP6, src_port),
            dst: (N2_IP6, DEFAULT_VXLAN_PORT),
            flow_label: u32::from(src_port),
            ..Tunnel6::from_n2()
        }
    }

    /// `inner` encapsulated: outer Ethernet, IPv6 (hop limit 64), UDP with checksum 0 (RFC
    /// 6935), VXLAN with the I flag, then `inner` whole.
    pub fn wrap(&self, inner: &[u8]) -> Vec<u8> {
        let vni = self.vni.to_be_bytes();
        let vxlan = [0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
        let udp_len = (UdpHeader::LEN + vxlan.len() + inner.len()) as u16;
        let mut ip = vec![];
        ip.extend_from_slice(&(0x6000_0000 | self.flow_label).to_be_bytes());
        ip.extend_from_slice(&udp_len.to_be_bytes());
        ip.extend_from_slice(&[17, 64]);
        ip.extend_from_slice(&self.src.0);
        ip.extend_from_slice(&self.dst.0);
        let mut udp = UdpHeader {
            source_port: self.src.1,
            destination_port: self.dst.1,
            length: udp_len,
            checksum: 0,
        };
        if self.udp_checksum {
            let pseudo = [
                &self.src.0[..],
                &self.dst.0,
                &u32::from(udp_len).to_be_bytes(),
                &[0, 0, 0, 17],
            ]
            .concat();
            udp.checksum = internet_checksum(&[&pseudo, &udp.to_bytes(), &vxlan, inner]);
        }
        let eth = Ethernet2Header {
            source: self.macs.0,
            destination: self.macs.1,
            ether_type: EtherType::IPV6,
        };
        [&eth.to_bytes()[..], &ip, &udp.to_bytes(), &vxlan, inner].concat()
    }
}

/// A client's TCP frame without payload, DNATed to `backend`:80.
pub fn to_backend(
    macs: ([u8; 6], [u8; 6]),
    port: u16,
    backend: [u8; 4],
    ttl: u8,
    flags: &str,
) -> Vec<u8> {
    tcp(
        macs,
        (CLIENT_IP, port),
        (backend, BACKEND_PORT),
        ttl,
        flags,
        b"",
    )
}

/// The client's SYN to `web` that n2 balanced to `10.0.0.6:80@n1` (this node), inner frame as
/// n2 encapsulates it: MACs as its outer ones, TTL one less.
pub fn syn_from_n2_for_a_local_backend() -> Vec<u8> {
    to_backend((N2_MAC, INGRESS_MAC), 40000, BACKENDS[0], 63, "S")
}

/// The reply direction of client flow `key` pinned to `backend`:`port`.
pub fn reverse_key(key: &FlowKey, backend: [u8; 4], port: u16) -> FlowKey {
    FlowKey {
        src_ip_be: u32::from_ne_bytes(backend),
        dst_ip_be: key.src_ip_be,
        src_port_be: port.to_be(),
        dst_port_be: key.src_port_be,
        ..*key
    }
}

/// A TCP flow key as the data plane writes it (addresses and ports in network byte order).
pub fn tcp_key(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> FlowKey {
    FlowKey {
        src_ip_be: u32::from_ne_bytes(src.0),
        dst_ip_be: u32::from_ne_bytes(dst.0),
        src_port_be: src.1.to_be(),
        dst_port_be: dst.1.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// A client's datagram `query` from `port` to the `dns` service.
pub fn client_query(port: u16) -> Vec<u8> {
    udp(
        (CLIENT_MAC, INGRESS_MAC),
        (CLIENT_IP, port),
        (NODE_IP, DNS_PORT),
        64,
        b"query",
    )
}

/// An IPv6 TCP frame; `flags` as [`with_flags`] takes them; `mss`: a SYN's MSS option.
pub fn tcp6(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    hop_limit: u8,
    (flags, mss): (&str, Option<u16>),
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src.0, dst.0, hop_limit)
        .tcp(src.1, dst.1, 1000, 64240);
    let builder = with_flags(builder, flags);
    let builder = match mss {
        Some(mss) => builder
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(mss)])
            .unwrap(),
        None => builder,
    };
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}

/// An IPv6 UDP frame.
pub fn udp6(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src.0, dst.0, hop_limit)
        .udp(src.1, dst.1)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// The IPv6 client's TCP frame without payload to the node's `service_port`.
pub fn client6(port: u16, service_port: u16, flags: &str) -> Vec<u8> {
    tcp6(
        (CLIENT_MAC, INGRESS_MAC),
        (CLIENT_IP6, port),
        (NODE_IP6, service_port),
        64,
        (flags, None),
        b"",
    )
}
