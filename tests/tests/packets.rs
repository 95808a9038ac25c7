//! Packet tests: crafted frames run through the real data plane with BPF_PROG_RUN, checked
//! against the exact frame expected back, the action, and the counters.
//!
//! Each test runs in a network namespace of its own holding the "node": a veth `lbt0` with the
//! node address 192.168.100.1/24 and the task subnet 10.0.0.1/24, and permanent neighbour
//! entries for the client and the backends, so that the FIB lookups of the program resolve.
use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use lb_common::{BackendStats, Event, Reason, program_names};
use lb_tests::netns::NetNs;
use lb_userspace::{
    datapath::{self, Maps},
    model::{Proto, Table, parse_backend},
    sync,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const NODE_IP: [u8; 4] = [192, 168, 100, 1];
const CLIENT_IP: [u8; 4] = [192, 168, 100, 2];
const OTHER_IP: [u8; 4] = [192, 168, 100, 77];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKENDS: [[u8; 4]; 3] = [[10, 0, 0, 6], [10, 0, 0, 7], [10, 0, 0, 8]];
const BACKEND_PORT: u16 = 80;
const WEB_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;
const DNS_BACKEND_PORT: u16 = 53;
/// The MAC the client addressed its frames to: the node's, whatever it is.
const INGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, BACKENDS[i][3]]
}

struct Node {
    ebpf: Ebpf,
    maps: Maps,
    table: Table,
    /// ifindex and MAC of `lbt0`.
    ifindex: u32,
    mac: [u8; 6],
}

/// Builds the node namespace; `body` runs inside it with the program loaded and the table
/// `web tcp/8080 → 10.0.0.6-8:80, dns udp/5353 → 10.0.0.6-7:53` applied.
fn with_node(body: impl FnOnce(&mut Node) + Send) {
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
    ] {
        ns.ip(args.split(' ')).unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.in_netns(move || {
        let mut ebpf = datapath::load(None, 4096).unwrap();
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
        let maps = Maps::take(&mut ebpf).unwrap();
        let ifindex = if_index("lbt0");
        let mut node = Node {
            ebpf,
            maps,
            table: Table::default(),
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
        node.apply();
        body(&mut node);
    });
}

fn if_index(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?}");
    index
}

impl Node {
    fn apply(&mut self) {
        let actual = self.maps.read_contents().unwrap();
        let delta = sync::delta(&sync::desired(&self.table, None), &actual);
        self.maps.apply(&delta).unwrap();
    }

    /// Runs the XDP program on `frame`, as if received on `ingress` (default: loopback).
    fn xdp(&self, frame: &[u8], ingress: Option<u32>) -> (u32, Vec<u8>) {
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
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ingress.map(|_| &ctx[..]),
                ..TestRunOptions::new()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn tc(&self, frame: &[u8]) -> Vec<u8> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program_names::TC_EGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .unwrap();
        assert_eq!(
            result.return_value as i32, -1,
            "TC always lets the chain go on"
        );
        out.truncate(result.data_size_out as usize);
        out
    }

    fn reason(&self, reason: Reason) -> u64 {
        self.maps.reason_totals().unwrap()[reason as usize].packets
    }

    fn event(&self, event: Event) -> u64 {
        self.maps.event_totals().unwrap()[event as usize]
    }

    fn backend(&self, service: &str, i: usize) -> BackendStats {
        let id = self.table.service(service).unwrap().backends[i].id;
        self.maps.backend_totals(id).unwrap()
    }
}

/// A TCP frame. `flags` is "S" (SYN), "A" (ACK) or "PA" (data).
#[allow(clippy::too_many_arguments)]
fn tcp(
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
    let builder = match flags {
        "S" => builder.syn(),
        "A" => builder.ack(1),
        "PA" => builder.psh().ack(1),
        other => panic!("unknown flags {other}"),
    };
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}

fn udp(
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

fn client_syn(port: u16) -> Vec<u8> {
    tcp(
        (CLIENT_MAC, INGRESS_MAC),
        (CLIENT_IP, port),
        (NODE_IP, WEB_PORT),
        64,
        "S",
        b"",
    )
}

/// The destination of a DNATed TCP/UDP frame, read back from its bytes.
fn dst_of(frame: &[u8]) -> ([u8; 4], u16) {
    (
        frame[30..34].try_into().unwrap(),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

/// Checks the IPv4 and TCP/UDP checksums of a frame by recomputing them.
fn assert_checksums_valid(frame: &[u8]) {
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

#[test]
fn syn_to_a_published_port_is_dnated_with_exact_bytes() {
    with_node(|node| {
        let (action, out) = node.xdp(&client_syn(40000), None);
        // From loopback the backend is on another interface, not in TX_PORTS: the kernel
        // forwards the DNATed frame, so MACs and TTL are left to it.
        assert_eq!(action, XDP_PASS);
        let expected = tcp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 40000),
            (BACKENDS[0], BACKEND_PORT),
            64,
            "S",
            b"",
        );
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(node.reason(Reason::ForwardStack), 1);
        assert_eq!(node.event(Event::FlowCreated), 1);
        let stats = node.backend("web", 0);
        assert_eq!(
            (stats.new_flows, stats.packets, stats.bytes),
            (1, 1, expected.len() as u64)
        );
    });
}

#[test]
fn xdp_tx_path_rewrites_macs_and_ttl_and_replies_come_back_reverse_nated() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let (action, out) = node.xdp(&client_syn(40001), ingress);
        assert_eq!(
            action, XDP_TX,
            "backend is reachable out of the receiving interface"
        );
        let expected = tcp(
            (node.mac, backend_mac(0)),
            (CLIENT_IP, 40001),
            (BACKENDS[0], BACKEND_PORT),
            63,
            "S",
            b"",
        );
        assert_eq!(out, expected);
        assert_checksums_valid(&out);

        // The backend answers the client directly; the node sees the reply on the same link.
        let reply = tcp(
            (backend_mac(0), node.mac),
            (BACKENDS[0], BACKEND_PORT),
            (CLIENT_IP, 40001),
            64,
            "PA",
            b"HTTP/1.1 200 OK\r\n\r\n",
        );
        let (action, out) = node.xdp(&reply, ingress);
        assert_eq!(action, XDP_TX);
        let expected = tcp(
            (node.mac, CLIENT_MAC),
            (NODE_IP, WEB_PORT),
            (CLIENT_IP, 40001),
            63,
            "PA",
            b"HTTP/1.1 200 OK\r\n\r\n",
        );
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(node.reason(Reason::ForwardTx), 1);
        assert_eq!(node.reason(Reason::ReplyTx), 1);
        let stats = node.backend("web", 0);
        assert_eq!(
            (stats.reply_packets, stats.reply_bytes),
            (1, expected.len() as u64)
        );
    });
}

#[test]
fn reply_routed_by_the_kernel_is_reverse_nated_by_tc_egress() {
    with_node(|node| {
        node.xdp(&client_syn(40002), None);
        let reply = tcp(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], BACKEND_PORT),
            (CLIENT_IP, 40002),
            63,
            "PA",
            b"hello",
        );
        // Arriving from loopback the client is on another interface: XDP leaves the reply to
        // the kernel untouched (its source would otherwise be a local address, a martian).
        let (action, out) = node.xdp(&reply, None);
        assert_eq!((action, &out), (XDP_PASS, &reply));
        assert_eq!(node.reason(Reason::ReplyStack), 1);
        let out = node.tc(&reply);
        let expected = tcp(
            (node.mac, CLIENT_MAC),
            (NODE_IP, WEB_PORT),
            (CLIENT_IP, 40002),
            63,
            "PA",
            b"hello",
        );
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(node.reason(Reason::ReplyEgress), 1);
        // Traffic that is no reply leaves TC untouched.
        let other = tcp(
            (node.mac, CLIENT_MAC),
            (BACKENDS[1], 22),
            (CLIENT_IP, 40002),
            63,
            "A",
            b"",
        );
        assert_eq!(node.tc(&other), other);
        assert_eq!(node.reason(Reason::ReplyEgress), 1);
    });
}

#[test]
fn new_flows_cycle_through_the_backends_in_order() {
    with_node(|node| {
        let flows = 3 * BACKENDS.len() + 1;
        let chosen: Vec<[u8; 4]> = (0..flows)
            .map(|i| dst_of(&node.xdp(&client_syn(41000 + i as u16), None).1).0)
            .collect();
        let expected: Vec<[u8; 4]> = (0..flows).map(|i| BACKENDS[i % BACKENDS.len()]).collect();
        assert_eq!(chosen, expected);
        for i in 0..BACKENDS.len() {
            let want = flows / BACKENDS.len() + usize::from(i < flows % BACKENDS.len());
            assert_eq!(node.backend("web", i).new_flows, want as u64);
        }
    });
}

#[test]
fn a_flow_keeps_its_backend_when_the_list_changes_until_its_backend_is_removed() {
    with_node(|node| {
        let syn = client_syn(42000);
        let first = dst_of(&node.xdp(&syn, None).1);
        assert_eq!(first, (BACKENDS[0], BACKEND_PORT));
        let ack = tcp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 42000),
            (NODE_IP, WEB_PORT),
            64,
            "A",
            b"",
        );
        // A new backend joins and another leaves: the flow stays where it is.
        node.table
            .add_backends("web", &[parse_backend("10.0.0.9:80").unwrap()])
            .unwrap();
        node.table
            .remove_backends("web", &[parse_backend("10.0.0.7:80").unwrap()])
            .unwrap();
        node.apply();
        for _ in 0..3 {
            assert_eq!(dst_of(&node.xdp(&ack, None).1), first);
        }
        assert_eq!(node.backend("web", 0).packets, 4);
        assert_eq!(node.event(Event::FlowCreated), 1);
        // Its own backend leaves: the flow chooses again, among the remaining backends.
        node.table
            .remove_backends("web", &[parse_backend("10.0.0.6:80").unwrap()])
            .unwrap();
        node.apply();
        let (action, out) = node.xdp(&ack, None);
        assert_eq!(action, XDP_PASS);
        let moved = dst_of(&out);
        assert_ne!(moved, first);
        assert!(
            [(BACKENDS[2], BACKEND_PORT), ([10, 0, 0, 9], BACKEND_PORT)].contains(&moved),
            "{moved:?}"
        );
        assert_eq!(node.event(Event::FlowReselected), 1);
        assert_checksums_valid(&out);
    });
}

#[test]
fn udp_is_balanced_and_a_zero_checksum_stays_zero() {
    with_node(|node| {
        let query = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 50000),
            (NODE_IP, DNS_PORT),
            64,
            b"query",
        );
        let (action, out) = node.xdp(&query, None);
        assert_eq!(action, XDP_PASS);
        let expected = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 50000),
            (BACKENDS[0], DNS_BACKEND_PORT),
            64,
            b"query",
        );
        assert_eq!(out, expected);
        assert_checksums_valid(&out);

        let mut no_checksum = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 50001),
            (NODE_IP, DNS_PORT),
            64,
            b"query",
        );
        no_checksum[40..42].copy_from_slice(&[0, 0]);
        let (_, out) = node.xdp(&no_checksum, None);
        assert_eq!(dst_of(&out), (BACKENDS[1], DNS_BACKEND_PORT));
        assert_eq!(
            &out[40..42],
            &[0, 0],
            "UDP checksum 0 means none and must stay 0"
        );
        assert_checksums_valid(&out);

        // The reply, reverse-NATed on its way out.
        let reply = udp(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], DNS_BACKEND_PORT),
            (CLIENT_IP, 50000),
            63,
            b"answer",
        );
        let out = node.tc(&reply);
        let expected = udp(
            (node.mac, CLIENT_MAC),
            (NODE_IP, DNS_PORT),
            (CLIENT_IP, 50000),
            63,
            b"answer",
        );
        assert_eq!(out, expected);
    });
}

#[test]
fn traffic_that_is_not_for_a_service_passes_unchanged() {
    with_node(|node| {
        let macs = (CLIENT_MAC, INGRESS_MAC);
        let mut arp = vec![0u8; 42];
        arp[..6].copy_from_slice(&[0xff; 6]);
        arp[6..12].copy_from_slice(&CLIENT_MAC);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, INGRESS_MAC)
            .ipv4(CLIENT_IP, NODE_IP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut icmp, b"ping")
            .unwrap();
        let mut ipv6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, INGRESS_MAC)
            .ipv6(
                [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                64,
            )
            .tcp(40000, WEB_PORT, 1, 1000)
            .syn()
            .write(&mut ipv6, b"")
            .unwrap();
        let mut fragment = udp(
            macs,
            (CLIENT_IP, 50000),
            (NODE_IP, DNS_PORT),
            64,
            b"first fragment",
        );
        fragment[20] |= 0x20; // more fragments
        let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            ("arp", arp, Reason::PassNotIpv4),
            ("ipv6 to the service port", ipv6, Reason::PassNotIpv4),
            ("icmp", icmp, Reason::PassNotTcpUdp),
            (
                "ssh to the node",
                tcp(macs, (CLIENT_IP, 40000), (NODE_IP, 22), 64, "S", b""),
                Reason::PassNotService,
            ),
            (
                "udp to an unpublished port",
                udp(macs, (CLIENT_IP, 40000), (NODE_IP, 9999), 64, b"x"),
                Reason::PassNotService,
            ),
            (
                "tcp to the udp service's port",
                tcp(macs, (CLIENT_IP, 40000), (NODE_IP, DNS_PORT), 64, "S", b""),
                Reason::PassNotService,
            ),
            (
                "service port on an address that is not local",
                tcp(macs, (CLIENT_IP, 40000), (OTHER_IP, WEB_PORT), 64, "S", b""),
                Reason::PassNotLocal,
            ),
            ("fragment", fragment, Reason::PassFragment),
        ];
        for (name, frame, reason) in cases {
            let before = node.reason(reason);
            let (action, out) = node.xdp(&frame, None);
            assert_eq!(action, XDP_PASS, "{name}");
            assert_eq!(out, frame, "{name} must pass unchanged");
            assert_eq!(
                node.reason(reason),
                before + 1,
                "{name} is counted as {}",
                reason.name()
            );
        }
        assert_eq!(node.event(Event::FlowCreated), 0);
    });
}

#[test]
fn truncated_and_malformed_frames_are_passed_untouched_and_never_forwarded() {
    with_node(|node| {
        let syn = client_syn(43000);
        // BPF_PROG_RUN refuses XDP frames shorter than an Ethernet header.
        for len in 14..syn.len() {
            let frame = &syn[..len];
            let (action, out) = node.xdp(frame, None);
            assert_eq!(action, XDP_PASS, "truncated to {len}");
            assert_eq!(out, frame, "truncated to {len}");
        }
        let mut malformed = Vec::new();
        let mut bad_ihl = syn.clone();
        bad_ihl[14] = 0x44;
        malformed.push(("IHL below 5", bad_ihl));
        let mut bad_version = syn.clone();
        bad_version[14] = 0x65;
        malformed.push(("version 6 in an IPv4 frame", bad_version));
        let mut long_total = syn.clone();
        long_total[16..18].copy_from_slice(&200u16.to_be_bytes());
        malformed.push(("total length beyond the frame", long_total));
        let mut bad_doff = syn.clone();
        bad_doff[14 + 20 + 12] = 0x40;
        malformed.push(("TCP data offset below 5", bad_doff));
        let mut ihl_past_frame = syn.clone();
        ihl_past_frame[14] = 0x4f;
        malformed.push(("IHL past the TCP header", ihl_past_frame));
        for (name, frame) in &malformed {
            let (action, out) = node.xdp(frame, None);
            assert_eq!(action, XDP_PASS, "{name}");
            assert_eq!(&out, frame, "{name}");
        }
        let reasons = node.maps.reason_totals().unwrap();
        let forwarded: u64 = [
            Reason::ForwardTx,
            Reason::ForwardRedirect,
            Reason::ForwardStack,
        ]
        .iter()
        .map(|r| reasons[*r as usize].packets)
        .sum();
        assert_eq!(forwarded, 0);
        assert_eq!(node.event(Event::FlowCreated), 0);
        assert!(node.reason(Reason::PassTruncated) > 0);
        assert!(node.reason(Reason::PassMalformed) >= malformed.len() as u64);
        let seen: u64 = reasons.iter().map(|c| c.packets).sum();
        assert_eq!(
            seen,
            (syn.len() - 14 + malformed.len()) as u64,
            "every frame is counted once"
        );
    });
}

#[test]
fn ip_options_are_parsed_not_mistaken_for_ports() {
    with_node(|node| {
        let syn = client_syn(44000);
        // Insert 4 bytes of IP options (NOP NOP NOP EOL) and fix lengths and checksum.
        let mut frame = syn[..34].to_vec();
        frame.extend_from_slice(&[1, 1, 1, 0]);
        frame.extend_from_slice(&syn[34..]);
        frame[14] = 0x46;
        let total = (frame.len() - 14) as u16;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        frame[24..26].copy_from_slice(&[0, 0]);
        let header = etherparse::Ipv4Header::from_slice(&frame[14..]).unwrap().0;
        frame[24..26].copy_from_slice(&header.calc_header_checksum().to_be_bytes());
        let (action, out) = node.xdp(&frame, None);
        assert_eq!(action, XDP_PASS);
        assert_eq!(&out[30..34], &BACKENDS[0], "DNAT of the address");
        assert_eq!(
            &out[40..42],
            &BACKEND_PORT.to_be_bytes(),
            "port found after the options"
        );
        assert_checksums_valid(&out);
    });
}

#[test]
fn a_service_without_backends_drops_new_flows_and_counts_them() {
    with_node(|node| {
        let all: Vec<_> = BACKENDS
            .iter()
            .map(|ip| std::net::SocketAddrV4::new(Ipv4Addr::from(*ip), BACKEND_PORT))
            .collect();
        node.table.remove_backends("web", &all).unwrap();
        node.apply();
        let (action, _) = node.xdp(&client_syn(45000), None);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropNoBackend), 1);
    });
}

#[test]
fn a_next_hop_on_another_lbctl_interface_is_redirected() {
    with_node(|node| {
        node.maps
            .tx_ports
            .insert(node.ifindex, node.ifindex, None, 0)
            .unwrap();
        let (action, out) = node.xdp(&client_syn(46000), None);
        assert_eq!(action, XDP_REDIRECT);
        let expected = tcp(
            (node.mac, backend_mac(0)),
            (CLIENT_IP, 46000),
            (BACKENDS[0], BACKEND_PORT),
            63,
            "S",
            b"",
        );
        assert_eq!(out, expected);
        assert_eq!(node.reason(Reason::ForwardRedirect), 1);
    });
}
