//! IPv6 packet tests: crafted IPv6 frames run through the real data plane with BPF_PROG_RUN
//! (the IPv4 programs tail-call the IPv6 ones), checked against the exact frame expected back,
//! the action and the counters.
mod dataplane;

use std::net::{Ipv6Addr, SocketAddr};

use dataplane::*;
use etherparse::PacketBuilder;
use lb_common::{Event, Reason};
use lb_userspace::table::{Proto, Scheduler};

/// The IPv6 services the tests add: TCP on every address, UDP on every address.
const WEB6_PORT: u16 = 8086;
const DNS6_PORT: u16 = 5356;

fn backend6(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::from(BACKENDS6[i]).into(), port)
}

/// `web6` (TCP, both IPv6 backends) and `dns6` (UDP, the first) on every address.
fn with_ipv6_services(node: &mut Node) {
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
    node.apply();
}

/// An IPv6 TCP frame without payload or options; `flags` as `dataplane::with_flags` takes them.
fn segment6(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    hop_limit: u8,
    flags: &str,
) -> Vec<u8> {
    tcp6(macs, src, dst, hop_limit, (flags, None), b"")
}

/// Checks the TCP or UDP checksum of an IPv6 frame by recomputing it.
fn assert_checksum_valid6(frame: &[u8]) {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv6(ip)) = sliced.net else {
        panic!("not IPv6")
    };
    let header = ip.header().to_header();
    match sliced.transport {
        Some(etherparse::TransportSlice::Tcp(tcp)) => {
            let expected = tcp
                .to_header()
                .calc_checksum_ipv6(&header, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expected, "TCP checksum");
        }
        Some(etherparse::TransportSlice::Udp(udp)) => {
            let expected = udp
                .to_header()
                .calc_checksum_ipv6(&header, udp.payload())
                .unwrap();
            assert_eq!(udp.checksum(), expected, "UDP checksum");
        }
        other => panic!("no transport: {other:?}"),
    }
}

/// `frame` with an IPv6 extension header of `kind` (8 bytes: the next header, length 0, then
/// `body`) between the IPv6 header and what followed it.
fn with_extension(frame: &[u8], kind: u8, body: [u8; 6]) -> Vec<u8> {
    let mut out = frame[..54].to_vec();
    let next = out[14 + 6];
    out[14 + 6] = kind;
    let payload_len = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&[next, 0]);
    out.extend_from_slice(&body);
    out.extend_from_slice(&frame[54..]);
    out
}

/// A new IPv6 connection is DNATed to the service's next IPv6 backend in round-robin order and
/// sent back out of the interface it came in on, hop limit one less, TCP checksum updated; its
/// later packets follow it; the backend's reply is reverse-NATed to the address and port the
/// client reached, by XDP and by TC egress (as the kernel routed it).
#[test]
fn ipv6_flows_are_balanced_and_their_replies_reverse_nated() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        let backend_mac = |i: u8| [0x02, 0, 0, 0, 0, 0x06 + i];
        for (port, i) in [(40000, 0), (40001, 1), (40002, 0)] {
            let (action, out) = node.xdp(&client6(port, WEB6_PORT, "S"), ingress);
            assert_eq!(action, XDP_TX, "port {port}");
            let expected = segment6(
                (node.mac, backend_mac(i as u8)),
                (CLIENT_IP6, port),
                (BACKENDS6[i], BACKEND_PORT),
                63,
                "S",
            );
            assert_eq!(out, expected, "port {port}");
            assert_checksum_valid6(&out);
        }
        assert_eq!(node.reason(Reason::ForwardTx), 3);
        assert_eq!(node.event(Event::FlowCreated), 3);
        let (first, second) = (node.backend("web6", 0), node.backend("web6", 1));
        assert_eq!((first.new_flows, second.new_flows), (2, 1));

        // The flow's next packet goes where its SYN went.
        let (action, out) = node.xdp(&client6(40001, WEB6_PORT, "A"), ingress);
        assert_eq!(action, XDP_TX);
        let expected = segment6(
            (node.mac, backend_mac(1)),
            (CLIENT_IP6, 40001),
            (BACKENDS6[1], BACKEND_PORT),
            63,
            "A",
        );
        assert_eq!(out, expected);

        // The reply, through XDP and through TC.
        let reply = |macs| {
            segment6(
                macs,
                (BACKENDS6[1], BACKEND_PORT),
                (CLIENT_IP6, 40001),
                64,
                "SA",
            )
        };
        let (action, out) = node.xdp(&reply((backend_mac(1), INGRESS_MAC)), ingress);
        assert_eq!(action, XDP_TX);
        let to_client = segment6(
            (node.mac, CLIENT_MAC),
            (NODE_IP6, WEB6_PORT),
            (CLIENT_IP6, 40001),
            63,
            "SA",
        );
        assert_eq!(out, to_client);
        assert_checksum_valid6(&out);
        assert_eq!(node.reason(Reason::ReplyTx), 1);
        let routed = reply((node.mac, CLIENT_MAC));
        let (action, out) = node.tc_on(&routed, ingress);
        assert_eq!(action, TC_ACT_UNSPEC);
        let expected = segment6(
            (node.mac, CLIENT_MAC),
            (NODE_IP6, WEB6_PORT),
            (CLIENT_IP6, 40001),
            64,
            "SA",
        );
        assert_eq!(out, expected);
        assert_checksum_valid6(&out);
        assert_eq!(node.reason(Reason::ReplyEgress), 1);
        assert_eq!(node.backend("web6", 1).reply_packets, 2);
    });
}

/// A datagram to an IPv6 UDP service is DNATed with its checksum updated; one with the zero
/// checksum IPv6 forbids goes to the kernel, which drops it.
#[test]
fn ipv6_datagrams_are_balanced_and_a_zero_checksum_is_refused() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        let query = udp6(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP6, 50000),
            (NODE_IP6, DNS6_PORT),
            64,
            b"query",
        );
        let (action, out) = node.xdp(&query, ingress);
        assert_eq!(action, XDP_TX);
        let expected = udp6(
            (node.mac, [0x02, 0, 0, 0, 0, 0x06]),
            (CLIENT_IP6, 50000),
            (BACKENDS6[0], DNS_BACKEND_PORT),
            63,
            b"query",
        );
        assert_eq!(out, expected);
        assert_checksum_valid6(&out);
        let mut zero = query.clone();
        let check = zero.len() - 5 - 2;
        zero[check..check + 2].copy_from_slice(&[0, 0]);
        let (action, out) = node.xdp(&zero, ingress);
        assert_eq!((action, out), (XDP_PASS, zero));
        assert_eq!(node.reason(Reason::PassMalformed), 1);
    });
}

/// A client of one family is balanced over that family's backends only: an IPv6 client of an
/// IPv4-only service, and an IPv4 client of an IPv6-only one, are dropped with their own
/// reason; IPv6 to another host's address, to no service, or ICMPv6, passes untouched.
#[test]
fn a_client_without_backends_of_its_family_is_dropped_and_other_ipv6_passes() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        // `web` has IPv4 backends only.
        let (action, _) = node.xdp(&client6(40000, WEB_PORT, "S"), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropNoBackendOfFamily), 1);
        let (action, _) = node.xdp(&client_tcp(40000, WEB6_PORT, "S"), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropNoBackendOfFamily), 2);
        assert_eq!(node.reason(Reason::DropNoBackend), 0);

        let mut elsewhere = NODE_IP6;
        elsewhere[15] = 0x99;
        let other_host = segment6(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP6, 40000),
            (elsewhere, WEB6_PORT),
            64,
            "S",
        );
        assert_eq!(
            node.xdp(&other_host, ingress),
            (XDP_PASS, other_host.clone())
        );
        assert_eq!(node.reason(Reason::PassNotLocal), 1);
        let no_service = client6(40000, 9999, "S");
        assert_eq!(
            node.xdp(&no_service, ingress),
            (XDP_PASS, no_service.clone())
        );
        assert_eq!(node.reason(Reason::PassNotService), 1);
        // A neighbour solicitation: ICMPv6, never looked into.
        let mut solicitation = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
            .ipv6(
                CLIENT_IP6,
                [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1],
                255,
            )
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut solicitation, &NODE_IP6)
            .unwrap();
        assert_eq!(
            node.xdp(&solicitation, ingress),
            (XDP_PASS, solicitation.clone())
        );
        assert_eq!(node.reason(Reason::PassNotTcpUdp), 1);
        assert_eq!(node.event(Event::FlowCreated), 0);

        // A client on the backends' own /64 would get its answer straight from the backend:
        // dropped, counted, no flow (IPv6 flows are not given the node's address yet).
        let mut neighbour = BACKENDS6[0];
        neighbour[15] = 0x99;
        let hairpin = segment6(
            (CLIENT_MAC, INGRESS_MAC),
            (neighbour, 40000),
            (NODE_IP6, WEB6_PORT),
            64,
            "S",
        );
        assert_eq!(node.xdp(&hairpin, ingress).0, XDP_DROP);
        assert_eq!(node.reason(Reason::DropIpv6Hairpin), 1);
        assert_eq!(node.maps.flows6.keys().count(), 0);
    });
}

/// Extension headers: hop-by-hop and destination options are walked to the TCP header (and
/// kept); a fragment header, and a routing header with segments left (the destination is a
/// waypoint), send the packet to the kernel untouched.
#[test]
fn ipv6_extension_headers_are_walked_or_left_to_the_kernel() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        // PadN options filling the 8 bytes.
        let pad = [1, 4, 0, 0, 0, 0];
        for (kind, name) in [(0u8, "hop-by-hop"), (60, "destination options")] {
            let syn = with_extension(&client6(41000 + u16::from(kind), WEB6_PORT, "S"), kind, pad);
            let (action, out) = node.xdp(&syn, ingress);
            assert_eq!(action, XDP_TX, "{name}");
            assert_eq!(out[14 + 6], kind, "{name}: kept");
            assert_eq!(
                &out[14 + 40 + 8 + 2..14 + 40 + 8 + 4],
                &BACKEND_PORT.to_be_bytes()
            );
            assert_eq!(&out[14 + 24..14 + 40], &BACKENDS6[usize::from(kind == 60)]);
            assert_eq!(out[14 + 7], 63);
        }
        let fragment = with_extension(&client6(41100, WEB6_PORT, "S"), 44, [0, 0, 0, 0, 0, 1]);
        assert_eq!(node.xdp(&fragment, ingress), (XDP_PASS, fragment.clone()));
        assert_eq!(node.reason(Reason::PassFragment), 1);
        // Routing type 4 (segment routing), one segment left.
        let routed = with_extension(&client6(41101, WEB6_PORT, "S"), 43, [4, 1, 0, 0, 0, 0]);
        assert_eq!(node.xdp(&routed, ingress), (XDP_PASS, routed.clone()));
        assert_eq!(node.reason(Reason::PassIpv6Extension), 1);
        // Truncated inside the extension header.
        let syn = with_extension(&client6(41102, WEB6_PORT, "S"), 0, pad);
        let short = syn[..14 + 40 + 4].to_vec();
        assert_eq!(node.xdp(&short, ingress).0, XDP_PASS);
        assert_eq!(node.event(Event::FlowCreated), 2);
    });
}

/// Maglev for IPv6 backends: a flow whose entry was lost finds its backend again.
#[test]
fn an_ipv6_maglev_flow_finds_its_backend_again() {
    with_node(|node| {
        with_ipv6_services(node);
        node.set_scheduler("web6", Scheduler::Maglev);
        let ingress = Some(node.ifindex);
        let (action, out) = node.xdp(&client6(42000, WEB6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let backend = out[14 + 24..14 + 40].to_vec();
        // Forget every IPv6 flow, as an LRU eviction would.
        let keys: Vec<_> = node.maps.flows6.keys().map(|k| k.unwrap()).collect();
        for key in keys {
            node.maps.flows6.remove(&key).unwrap();
        }
        let (action, out) = node.xdp(&client6(42000, WEB6_PORT, "A"), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(out[14 + 24..14 + 40], backend[..]);
        assert_eq!(node.event(Event::FlowRecovered), 1);
    });
}

/// `mesh6 tcp/9096`: one IPv6 backend on n2, reached through VXLAN over the IPv4 underlay; and
/// `local6 tcp/9097`: the first IPv6 backend, on this node (n1), where n2 may send flows.
const MESH6_PORT: u16 = 9096;
const LOCAL6_PORT: u16 = 9097;
const REMOTE6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
];

fn with_ipv6_mesh_services(node: &mut Node) {
    for (name, port, backend) in [
        ("mesh6", MESH6_PORT, "[2001:db8:20::20]:80@n2"),
        ("local6", LOCAL6_PORT, "[2001:db8:10::6]:80@n1"),
    ] {
        let backend = lb_userspace::table::parse_backend_spec(backend).unwrap();
        node.table
            .add_service(name, Proto::Tcp, port, None, &[backend])
            .unwrap();
    }
    node.apply();
}

/// An IPv6 SYN (or SYN-ACK, `flags` "SA") announcing `mss`.
fn syn6_with_mss(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    hop_limit: u8,
    flags: &str,
    mss: u16,
) -> Vec<u8> {
    tcp6(macs, src, dst, hop_limit, (flags, Some(mss)), b"")
}

/// The outer UDP source port of an encapsulated frame, its outer IPv4 header and inner IPv6
/// transport checksums checked.
fn encap_source_port6(frame: &[u8]) -> u16 {
    assert_checksums_valid(frame);
    assert_eq!(&frame[40..42], &[0, 0], "outer UDP checksum is 0 (none)");
    assert_checksum_valid6(&frame[50..]);
    let port = u16::from_be_bytes([frame[34], frame[35]]);
    assert!((49152..=65535).contains(&port), "outer source port {port}");
    port
}

/// A new IPv6 flow whose backend is on n2 is DNATed and VXLAN-encapsulated over the IPv4
/// underlay (inner Ethernet type IPv6, hop limit one less), its SYN's MSS clamped to what fits
/// the tunnel (1500 − 50 − 60); its later packets keep the flow's outer source port; the
/// backend counts them.
#[test]
fn an_ipv6_flow_to_a_backend_on_another_node_is_encapsulated_over_the_ipv4_underlay() {
    with_node(|node| {
        with_ipv6_mesh_services(node);
        let ingress = Some(node.ifindex);
        let syn = syn6_with_mss(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP6, 40000),
            (NODE_IP6, MESH6_PORT),
            64,
            "S",
            1460,
        );
        let (action, out) = node.xdp(&syn, ingress);
        assert_eq!(action, XDP_TX, "n2 is out of the receiving interface");
        let port = encap_source_port6(&out);
        let inner = syn6_with_mss(
            (node.mac, N2_MAC),
            (CLIENT_IP6, 40000),
            (REMOTE6, BACKEND_PORT),
            63,
            "S",
            1390,
        );
        assert_eq!(out, Tunnel::to_n2(port).wrap(&inner));

        let ack = client6(40000, MESH6_PORT, "A");
        let (action, out) = node.xdp(&ack, ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(encap_source_port6(&out), port, "a flow keeps its port");
        let inner = segment6(
            (node.mac, N2_MAC),
            (CLIENT_IP6, 40000),
            (REMOTE6, BACKEND_PORT),
            63,
            "A",
        );
        assert_eq!(out, Tunnel::to_n2(port).wrap(&inner));
        let (action, out) = node.xdp(&client6(40001, MESH6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        assert_ne!(encap_source_port6(&out), port, "another flow, another port");
        assert_eq!(node.reason(Reason::ForwardEncapTx), 3);
        let stats = node.backend("mesh6", 0);
        assert_eq!(
            (stats.new_flows, stats.packets, stats.bytes),
            (2, 3, (syn.len() + ack.len() + 74) as u64)
        );
    });
}

/// On the backend's node: n2's VXLAN carrying an IPv6 client's SYN for a backend here is
/// decapsulated and delivered (hop limit one less), its ingress node remembered, so that TC
/// encapsulates the backend's reply back to n2 (its SYN-ACK's MSS clamped). What may not be
/// delivered is dropped: a destination that is no backend here, an inner ICMPv6 packet, VXLAN
/// from a node that does not host a flow's backend.
#[test]
fn ipv6_inside_vxlan_is_delivered_and_its_replies_go_back_through_the_tunnel() {
    with_node(|node| {
        with_ipv6_mesh_services(node);
        let ingress = Some(node.ifindex);
        let syn = |dst: [u8; 16]| {
            segment6(
                (N2_MAC, INGRESS_MAC),
                (CLIENT_IP6, 40000),
                (dst, BACKEND_PORT),
                63,
                "S",
            )
        };
        let (action, out) = node.xdp(&Tunnel::from_n2().wrap(&syn(BACKENDS6[0])), ingress);
        assert_eq!(
            action, XDP_TX,
            "the backend is out of the receiving interface"
        );
        let expected = segment6(
            (node.mac, [0x02, 0, 0, 0, 0, 0x06]),
            (CLIENT_IP6, 40000),
            (BACKENDS6[0], BACKEND_PORT),
            62,
            "S",
        );
        assert_eq!(out, expected);
        assert_eq!(node.reason(Reason::DecapTx), 1);
        assert_eq!(node.event(Event::FlowCreated), 0, "n2 balanced the flow");

        let reply = syn6_with_mss(
            (node.mac, CLIENT_MAC),
            (BACKENDS6[0], BACKEND_PORT),
            (CLIENT_IP6, 40000),
            64,
            "SA",
            1460,
        );
        let (action, out) = node.tc_on(&reply, Some(node.ifindex));
        assert_eq!(action, TC_ACT_UNSPEC, "n2 is out of the same interface");
        let port = encap_source_port6(&out);
        let inner = syn6_with_mss(
            (node.mac, N2_MAC),
            (BACKENDS6[0], BACKEND_PORT),
            (CLIENT_IP6, 40000),
            64,
            "SA",
            1390,
        );
        assert_eq!(out, Tunnel::to_n2(port).wrap(&inner));
        assert_eq!(node.reason(Reason::ReplyEncap), 1);

        // Not a backend here (the second IPv6 backend is no service's on n1 in the mesh).
        let (action, _) = node.xdp(&Tunnel::from_n2().wrap(&syn(BACKENDS6[1])), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropVxlanNotLocalBackend), 1);
        // An ICMPv6 echo inside the tunnel.
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(N2_MAC, INGRESS_MAC)
            .ipv6(CLIENT_IP6, BACKENDS6[0], 63)
            .icmpv6_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        let (action, _) = node.xdp(&Tunnel::from_n2().wrap(&echo), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropVxlanMalformed), 1);
        // Its hop limit runs out here: to the kernel, which answers with time exceeded (found by
        // the fuzzer: it was dropped, counted as forward_ttl_expired).
        let mut last_hop = syn(BACKENDS6[0]);
        last_hop[14 + 7] = 1;
        let (action, _) = node.xdp(&Tunnel::from_n2().wrap(&last_hop), ingress);
        assert_eq!(action, XDP_PASS);
        assert_eq!(node.reason(Reason::DecapStack), 1);
    });
}

/// On the ingress node: the reply of an IPv6 flow it encapsulated to n2 comes back inside VXLAN
/// from n2 and is reverse-NATed to the address and port the client reached and sent to it; the
/// same reply from n3, which does not host the backend, is dropped.
#[test]
fn an_ipv6_reply_from_the_backends_node_is_reverse_nated_to_the_client() {
    with_node(|node| {
        with_ipv6_mesh_services(node);
        let ingress = Some(node.ifindex);
        let (action, _) = node.xdp(&client6(40000, MESH6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let reply = segment6(
            (N2_MAC, INGRESS_MAC),
            (REMOTE6, BACKEND_PORT),
            (CLIENT_IP6, 40000),
            63,
            "SA",
        );
        let from_n3 = Tunnel {
            src: (N3_IP, N2_SOURCE_PORT),
            ..Tunnel::from_n2()
        };
        let (action, _) = node.xdp(&from_n3.wrap(&reply), ingress);
        assert_eq!(action, XDP_DROP, "n3 does not host the backend");
        assert_eq!(node.reason(Reason::DropVxlanWrongNode), 1);

        let (action, out) = node.xdp(&Tunnel::from_n2().wrap(&reply), ingress);
        assert_eq!(
            action, XDP_TX,
            "the client is out of the receiving interface"
        );
        let expected = segment6(
            (node.mac, CLIENT_MAC),
            (NODE_IP6, MESH6_PORT),
            (CLIENT_IP6, 40000),
            62,
            "SA",
        );
        assert_eq!(out, expected);
        assert_eq!(node.reason(Reason::ReplyTx), 1);
        assert_eq!(node.backend("mesh6", 0).reply_packets, 1);
    });
}

/// The IPv6 backend (index into `BACKENDS6`) a DNATed frame goes to.
fn backend_of(frame: &[u8]) -> usize {
    BACKENDS6
        .iter()
        .position(|b| frame[38..54] == b[..])
        .unwrap_or_else(|| panic!("not to an IPv6 backend: {frame:02x?}"))
}

/// Passive health for IPv6 backends, as for IPv4: a backend's RST to a SYN is dropped (the
/// client's retransmitted SYN chooses again) and counts as a refusal; three in a row eject the
/// backend, whose turns new flows then pass by, while a SYN-ACK starts the count over; the
/// client's SYN again, a while after its backend left the first unanswered, chooses another
/// backend and counts against the first.
#[test]
fn ipv6_backends_that_refuse_or_leave_syns_unanswered_fail_and_are_ejected() {
    with_node(|node| {
        with_ipv6_services(node);
        let dead = 0;
        let id = node.backend_id("web6", dead);
        let passive = |node: &Node| node.maps.passive_health(id).unwrap();
        // Opens a connection from `port`; the dead backend refuses it (if `refuses`), the
        // other answers.
        let connect_with = |node: &Node, port: u16, refuses: bool| {
            let (action, out) = node.xdp(&client6(port, WEB6_PORT, "S"), Some(node.ifindex));
            assert_eq!(action, XDP_TX);
            let backend = backend_of(&out);
            let refused = backend == dead && refuses;
            let flags = if refused { "R" } else { "SA" };
            let reply = segment6(
                (node.mac, CLIENT_MAC),
                (BACKENDS6[backend], BACKEND_PORT),
                (CLIENT_IP6, port),
                64,
                flags,
            );
            let (action, _) = node.tc_on(&reply, Some(node.ifindex));
            let expected = if refused { TC_ACT_SHOT } else { TC_ACT_UNSPEC };
            assert_eq!(action, expected, "port {port}");
            backend
        };
        let connect = |node: &Node, port: u16| connect_with(node, port, true);
        let mut port = 41000;
        while passive(node).refused < 2 {
            port += 1;
            connect(node, port);
        }
        assert_eq!(node.reason(Reason::DropBackendRefused), 2);
        // The refused flow is forgotten: its retransmitted SYN chooses again (the other one).
        assert_eq!(connect(node, port), 1 - dead);
        // An answer in between starts the count over.
        while connect_with(
            node,
            {
                port += 1;
                port
            },
            false,
        ) != dead
        {}
        assert_eq!(passive(node).failures, 0);
        while passive(node).failures < 3 {
            port += 1;
            connect(node, port);
        }
        assert_eq!(passive(node).ejections, 1);
        assert_eq!(node.event(Event::BackendEjected), 1);
        let passed = node.event(Event::FlowPassedEjected);
        for _ in 0..4 {
            port += 1;
            assert_eq!(connect(node, port), 1 - dead, "ejected: passed by");
        }
        assert_eq!(node.event(Event::FlowPassedEjected), passed + 2);

        // Unanswered: the other backend's turn now, then its SYN again after a while.
        let mut ended = passive(node);
        ended.ejected_ns = 0;
        node.maps.passive_health.set(id, ended, 0).unwrap();
        port += 1;
        let (_, out) = node.xdp(&client6(port, WEB6_PORT, "S"), Some(node.ifindex));
        let first = backend_of(&out);
        let key = lb_common::FlowKey6::new(
            CLIENT_IP6,
            NODE_IP6,
            port.to_be(),
            WEB6_PORT.to_be(),
            lb_common::PROTO_TCP,
        );
        let (_, out) = node.xdp(&client6(port, WEB6_PORT, "S"), Some(node.ifindex));
        assert_eq!(backend_of(&out), first, "a duplicate SYN at once stays");
        let mut flow = node.maps.flows6.get(&key, 0).unwrap();
        flow.last_seen_ns -= lb_common::FLOW_UNANSWERED_NS;
        node.maps.flows6.insert(key, flow, 0).unwrap();
        let (_, out) = node.xdp(&client6(port, WEB6_PORT, "S"), Some(node.ifindex));
        assert_ne!(backend_of(&out), first, "unanswered: chooses again");
        assert_eq!(node.event(Event::FlowUnanswered), 1);
        let health = node
            .maps
            .passive_health(node.backend_id("web6", first))
            .unwrap();
        assert!(health.unanswered >= 1, "{health:?}");
    });
}

/// An ICMPv6 "packet too big" from `src` to the client, quoting `quote` (an IPv6 packet).
fn too_big6(macs: ([u8; 6], [u8; 6]), src: [u8; 16], quote: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src, CLIENT_IP6, 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 })
        .write(&mut frame, quote)
        .unwrap();
    frame
}

/// An ICMPv6 error about a client's packet the node forwarded (the kernel's "packet too big"
/// as it routed it, or one the backend sent) is translated on its way to the client by TC: the
/// quoted packet is the one the client sent (to the service's address and port, its checksum
/// right), and an error from the backend itself comes from the service's address; ICMPv6
/// checksum right. An error about no flow is left alone.
#[test]
fn icmpv6_errors_about_forwarded_packets_are_translated_for_their_client() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        let (action, out) = node.xdp(&client6(40000, WEB6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let backend = BACKENDS6[backend_of(&out)];
        let forwarded = out[14..].to_vec();
        let sent = segment6(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP6, 40000),
            (NODE_IP6, WEB6_PORT),
            63,
            "S",
        );
        let macs = (node.mac, CLIENT_MAC);
        // The node's address on the backends' side: the kernel's own error as it routed.
        let mut router = BACKENDS6[0];
        router[15] = 1;
        let (action, out) = node.tc_on(&too_big6(macs, router, &forwarded), ingress);
        assert_eq!(action, TC_ACT_UNSPEC);
        assert_eq!(out, too_big6(macs, router, &sent[14..]));
        assert_eq!(node.reason(Reason::IcmpEgress), 1);
        // From the backend itself.
        let (_, out) = node.tc_on(&too_big6(macs, backend, &forwarded), ingress);
        assert_eq!(out, too_big6(macs, NODE_IP6, &sent[14..]));
        assert_eq!(node.reason(Reason::IcmpEgress), 2);
        // About a packet of no flow.
        let stray = segment6(
            (node.mac, [0x02, 0, 0, 0, 0, 0x06]),
            (CLIENT_IP6, 40009),
            (backend, BACKEND_PORT),
            63,
            "S",
        );
        let frame = too_big6(macs, router, &stray[14..]);
        assert_eq!(node.tc_on(&frame, ingress), (TC_ACT_UNSPEC, frame));
        assert_eq!(node.reason(Reason::IcmpEgress), 2);
    });
}

/// An ICMPv6 "address unreachable" about a forwarded SYN (the node's own, when the backend no
/// longer answers neighbour discovery) is the backend's refusal, as a RST is: dropped in TC
/// (`drop_backend_unreachable`, as IPv4's), counted as refused for passive health, the flow forgotten so that
/// the client's SYN again chooses again. Once the backend has answered, the same error is only
/// translated for the client; an error that refuses nothing (beyond scope) is too.
#[test]
fn icmpv6_unreachable_about_a_syn_is_the_backends_refusal() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        let unreachable = |code: u8, quote: &[u8]| {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(node.mac, CLIENT_MAC)
                .ipv6(NODE_IP6, CLIENT_IP6, 64)
                .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                    etherparse::icmpv6::DestUnreachableCode::from_u8(code).unwrap(),
                ))
                .write(&mut frame, quote)
                .unwrap();
            frame
        };
        let (action, out) = node.xdp(&client6(40000, WEB6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let first = backend_of(&out);
        let id = node.backend_id("web6", first);
        let (action, _) = node.tc_on(&unreachable(3, &out[14..]), ingress);
        assert_eq!(action, TC_ACT_SHOT, "address unreachable refuses the SYN");
        assert_eq!(node.reason(Reason::DropBackendUnreachable), 1);
        assert_eq!(node.maps.passive_health(id).unwrap().refused, 1);
        let (action, out) = node.xdp(&client6(40000, WEB6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(backend_of(&out), 1 - first, "the SYN again chooses again");

        // Answered: the flow is established, and an error about it is the client's to see.
        let backend = BACKENDS6[1 - first];
        let answer = segment6(
            (node.mac, CLIENT_MAC),
            (backend, BACKEND_PORT),
            (CLIENT_IP6, 40000),
            64,
            "SA",
        );
        assert_eq!(node.tc_on(&answer, ingress).0, TC_ACT_UNSPEC);
        let (action, _) = node.tc_on(&unreachable(3, &out[14..]), ingress);
        assert_eq!(action, TC_ACT_UNSPEC, "translated, not a refusal");
        assert_eq!(node.reason(Reason::IcmpEgress), 1);
        // Beyond scope refuses nothing, even for a SYN awaiting its answer.
        let (action, out) = node.xdp(&client6(40001, WEB6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let (action, _) = node.tc_on(&unreachable(2, &out[14..]), ingress);
        assert_eq!(action, TC_ACT_UNSPEC);
        assert_eq!(node.reason(Reason::DropBackendUnreachable), 1);
        assert_eq!(node.reason(Reason::IcmpEgress), 2);
    });
}

/// An IPv6 flow's life as an IPv4 one's: a FIN each way ends it (no longer live in the census);
/// the client's bare RST (how it refuses a backend's stale ACK to its SYN) ends nothing, and its
/// SYN again goes to the same backend; a reverse-NAT entry a full table evicted is put back when
/// the client speaks after a second of silence.
#[test]
fn ipv6_flows_end_on_fins_survive_a_bare_rst_and_get_their_reverse_entry_back() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        let key = |port: u16| {
            lb_common::FlowKey6::new(
                CLIENT_IP6,
                NODE_IP6,
                port.to_be(),
                WEB6_PORT.to_be(),
                lb_common::PROTO_TCP,
            )
        };
        let live = |node: &Node| node.maps.flow_census().unwrap().live.values().sum::<u64>();
        // A FIN each way.
        let (_, out) = node.xdp(&client6(40100, WEB6_PORT, "S"), ingress);
        let backend = BACKENDS6[backend_of(&out)];
        assert_eq!(live(node), 1);
        node.xdp(&client6(40100, WEB6_PORT, "FA"), ingress);
        let fin = segment6(
            (node.mac, CLIENT_MAC),
            (backend, BACKEND_PORT),
            (CLIENT_IP6, 40100),
            64,
            "FA",
        );
        assert_eq!(node.tc_on(&fin, ingress).0, TC_ACT_UNSPEC);
        let flags = node.maps.flows6.get(&key(40100), 0).unwrap().flags;
        assert_ne!(flags & lb_common::FLOW_CLOSING, 0, "flags {flags:#x}");
        assert_eq!(live(node), 0, "a connection closed both ways is not live");

        // A bare RST, then the same SYN: the same backend.
        let (_, out) = node.xdp(&client6(40200, WEB6_PORT, "S"), ingress);
        let first = backend_of(&out);
        node.xdp(&client6(40200, WEB6_PORT, "R"), ingress);
        let (_, out) = node.xdp(&client6(40200, WEB6_PORT, "S"), ingress);
        assert_eq!(backend_of(&out), first, "a bare RST ends nothing");

        // The reverse entry evicted, the client silent for a second: put back.
        let reply_key = lb_common::FlowKey6::new(
            BACKENDS6[first],
            CLIENT_IP6,
            BACKEND_PORT.to_be(),
            40200u16.to_be(),
            lb_common::PROTO_TCP,
        );
        let reverse = node.maps.reverse_flows6.get(&reply_key, 0).unwrap();
        node.maps.reverse_flows6.remove(&reply_key).unwrap();
        let mut flow = node.maps.flows6.get(&key(40200), 0).unwrap();
        flow.last_seen_ns -= lb_common::FLOW_SEEN_GRANULARITY_NS;
        node.maps.flows6.insert(key(40200), flow, 0).unwrap();
        node.xdp(&client6(40200, WEB6_PORT, "A"), ingress);
        assert_eq!(
            node.maps.reverse_flows6.get(&reply_key, 0).unwrap(),
            reverse
        );
    });
}

/// A flow that never ended (its ends were not seen) and a newer flow from the same client port
/// to another service of the same backend share a reply 5-tuple: the newer one's SYN takes the
/// reverse entry, and the older one's SYN again gives it back, so the backend's SYN-ACK leaves
/// from the service that client reached (it left from the other's port, and the client reset
/// it).
#[test]
fn a_syn_takes_its_reverse_entry_back_from_another_services_flow() {
    with_node(|node| {
        let backend = vec![backend6(0, BACKEND_PORT)];
        for (name, port) in [("one6", 8088), ("two6", 8089)] {
            node.table
                .add_service(name, Proto::Tcp, port, None, &backend)
                .unwrap();
        }
        node.apply();
        let ingress = Some(node.ifindex);
        let reply_key = lb_common::FlowKey6::new(
            BACKENDS6[0],
            CLIENT_IP6,
            BACKEND_PORT.to_be(),
            40300u16.to_be(),
            lb_common::PROTO_TCP,
        );
        let held = |node: &Node| {
            let reverse = node.maps.reverse_flows6.get(&reply_key, 0).unwrap();
            u16::from_be(reverse.orig_port_be)
        };
        for port in [8088, 8089, 8088] {
            let (action, _) = node.xdp(&client6(40300, port, "S"), ingress);
            assert_eq!(action, XDP_TX);
            assert_eq!(held(node), port);
        }
    });
}

/// The test node's mesh moved to an IPv6 underlay: n1 (this node), n2 and n3 by their IPv6
/// addresses, and a service of each family with its backend on n2.
fn with_ipv6_underlay(node: &mut Node) {
    for service in ["mesh", "meshdns"] {
        node.table.remove_service(service).unwrap();
    }
    for name in ["n1", "n2", "n3"] {
        node.table.remove_node(name).unwrap();
    }
    for (name, ip) in [("n1", NODE_IP6), ("n2", N2_IP6), ("n3", N3_IP6)] {
        node.table
            .add_node(name, Ipv6Addr::from(ip).into())
            .unwrap();
    }
    for (name, port, backend) in [
        ("mesh", MESH_PORT, "10.0.0.20:80@n2"),
        ("mesh6", MESH6_PORT, "[2001:db8:20::20]:80@n2"),
        ("local", 9098, "10.0.0.6:80@n1"),
    ] {
        let backend = lb_userspace::table::parse_backend_spec(backend).unwrap();
        node.table
            .add_service(name, Proto::Tcp, port, None, &[backend])
            .unwrap();
    }
    node.apply();
}

/// An IPv4 TCP segment without payload, with an MSS option when `mss` is given.
fn tcp4(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    (flags, mss): (&str, Option<u16>),
) -> Vec<u8> {
    let Some(mss) = mss else {
        return tcp(macs, src, dst, ttl, flags, b"");
    };
    let builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0, dst.0, ttl)
        .tcp(src.1, dst.1, 1000, 64240);
    let builder = match flags {
        "S" => builder.syn(),
        "SA" => builder.syn().ack(0),
        other => panic!("flags {other}"),
    };
    let mut frame = Vec::new();
    builder
        .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(mss)])
        .unwrap()
        .write(&mut frame, b"")
        .unwrap();
    frame
}

/// The outer UDP source port of VXLAN over IPv6, its flow label the same, the inner frame's
/// checksums valid.
fn encap_source_port_over_ipv6(frame: &[u8]) -> u16 {
    let port = u16::from_be_bytes([frame[54], frame[55]]);
    assert!((49152..=65535).contains(&port), "outer source port {port}");
    assert_eq!(&frame[60..62], &[0, 0], "outer UDP checksum is 0 (none)");
    let label = u32::from_be_bytes([frame[14], frame[15], frame[16], frame[17]]) & 0xf_ffff;
    assert_eq!(label, u32::from(port), "flow label");
    match u16::from_be_bytes([frame[82], frame[83]]) {
        0x0800 => assert_checksums_valid(&frame[70..]),
        _ => assert_checksum_valid6(&frame[70..]),
    }
    port
}

/// Over an IPv6 underlay, new flows of both families whose backend is on n2 are DNATed and
/// encapsulated in VXLAN over IPv6 (70 bytes, to n2's IPv6 address), their SYN's MSS clamped
/// to what fits (1500 − 70 − 40 for IPv4, − 60 for IPv6), TTL or hop limit one less; the
/// backends count them.
#[test]
fn over_an_ipv6_underlay_flows_of_both_families_are_encapsulated_in_ipv6() {
    with_node(|node| {
        with_ipv6_underlay(node);
        let ingress = Some(node.ifindex);
        let syn4 = tcp4(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 40000),
            (NODE_IP, MESH_PORT),
            64,
            ("S", Some(1460)),
        );
        let (action, out) = node.xdp(&syn4, ingress);
        assert_eq!(action, XDP_TX, "n2 is out of the receiving interface");
        let port = encap_source_port_over_ipv6(&out);
        let inner = tcp4(
            (node.mac, N2_MAC),
            (CLIENT_IP, 40000),
            (REMOTE_BACKEND, BACKEND_PORT),
            63,
            ("S", Some(1390)),
        );
        assert_eq!(out, Tunnel6::to_n2(port).wrap(&inner));

        let syn6 = syn6_with_mss(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP6, 40000),
            (NODE_IP6, MESH6_PORT),
            64,
            "S",
            1460,
        );
        let (action, out) = node.xdp(&syn6, ingress);
        assert_eq!(action, XDP_TX);
        let port6 = encap_source_port_over_ipv6(&out);
        let inner = syn6_with_mss(
            (node.mac, N2_MAC),
            (CLIENT_IP6, 40000),
            (REMOTE6, BACKEND_PORT),
            63,
            "S",
            1370,
        );
        assert_eq!(out, Tunnel6::to_n2(port6).wrap(&inner));
        let (action, out) = node.xdp(&client6(40000, MESH6_PORT, "A"), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(
            encap_source_port_over_ipv6(&out),
            port6,
            "a flow keeps its port"
        );
        assert_eq!(node.reason(Reason::ForwardEncapTx), 3);
        let four = node.backend("mesh", 0);
        assert_eq!((four.new_flows, four.packets), (1, 1));
        let six = node.backend("mesh6", 0);
        assert_eq!((six.new_flows, six.packets), (1, 2));
    });
}

/// On the backend's node over an IPv6 underlay: n2's VXLAN over IPv6 carrying an IPv4 client's
/// SYN for a backend here is decapsulated and delivered, and TC encapsulates the backend's
/// SYN-ACK back to n2 over IPv6 (its MSS clamped to 1500 − 70 − 40). VXLAN from an IPv6 address
/// that is no node's is dropped; another VNI's is the kernel's.
#[test]
fn over_an_ipv6_underlay_vxlan_is_decapsulated_and_replies_go_back_in_ipv6() {
    with_node(|node| {
        with_ipv6_underlay(node);
        let ingress = Some(node.ifindex);
        let syn = tcp(
            (N2_MAC, INGRESS_MAC),
            (CLIENT_IP, 40000),
            (BACKENDS[0], BACKEND_PORT),
            63,
            "S",
            b"",
        );
        let (action, out) = node.xdp(&Tunnel6::from_n2().wrap(&syn), ingress);
        assert_eq!(
            action, XDP_TX,
            "the backend is out of the receiving interface"
        );
        let expected = tcp(
            (node.mac, backend_mac(0)),
            (CLIENT_IP, 40000),
            (BACKENDS[0], BACKEND_PORT),
            62,
            "S",
            b"",
        );
        assert_eq!(out, expected);
        assert_eq!(node.reason(Reason::DecapTx), 1);
        let n2_key = lb_common::ipv6_node_key(&N2_IP6).to_ne_bytes();
        let reply_key = reverse_key(
            &tcp_key((CLIENT_IP, 40000), (BACKENDS[0], BACKEND_PORT)),
            BACKENDS[0],
            BACKEND_PORT,
        );
        assert_eq!(node.tunnel_replies(), vec![(reply_key, n2_key)]);

        let reply = tcp4(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], BACKEND_PORT),
            (CLIENT_IP, 40000),
            64,
            ("SA", Some(1460)),
        );
        let (action, out) = node.tc_on(&reply, Some(node.ifindex));
        assert_eq!(action, TC_ACT_UNSPEC, "n2 is out of the same interface");
        let port = encap_source_port_over_ipv6(&out);
        let inner = tcp4(
            (node.mac, N2_MAC),
            (BACKENDS[0], BACKEND_PORT),
            (CLIENT_IP, 40000),
            64,
            ("SA", Some(1390)),
        );
        assert_eq!(out, Tunnel6::to_n2(port).wrap(&inner));
        assert_eq!(node.reason(Reason::ReplyEncap), 1);

        // With its UDP checksum set, as a Linux VXLAN device sends it by default: the same.
        let checksummed = Tunnel6 {
            udp_checksum: true,
            ..Tunnel6::from_n2()
        };
        let (action, _) = node.xdp(&checksummed.wrap(&syn), ingress);
        assert_eq!(action, XDP_TX, "decapsulated and delivered");
        assert_eq!(node.reason(Reason::DecapTx), 2);

        let stranger = Tunnel6 {
            src: (CLIENT_IP6, N2_SOURCE_PORT),
            ..Tunnel6::from_n2()
        };
        let (action, _) = node.xdp(&stranger.wrap(&syn), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropVxlanUnknownSource), 1);
        let (action, _) = node.xdp(
            &Tunnel6 {
                udp_checksum: true,
                ..stranger
            }
            .wrap(&syn),
            ingress,
        );
        assert_eq!(action, XDP_DROP, "checksummed, from a stranger");
        assert_eq!(node.reason(Reason::DropVxlanUnknownSource), 2);
        let other_vni = Tunnel6 {
            vni: 7,
            ..Tunnel6::from_n2()
        };
        let (action, _) = node.xdp(&other_vni.wrap(&syn), ingress);
        assert_eq!(action, XDP_PASS);
        assert_eq!(node.reason(Reason::PassVxlanOtherVni), 1);
    });
}

/// A client's datagram too big to encapsulate is answered with the size that fits, quoting it
/// as the client sent it: over the IPv4 underlay an IPv6 one gets a "packet too big" naming
/// 1500 − 50; over an IPv6 underlay 1500 − 70, and an IPv4 one with DF a "fragmentation needed"
/// naming the same. Nothing reaches the backend.
#[test]
fn clients_datagrams_too_big_for_the_tunnel_are_answered_with_the_size_that_fits() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let add_udp = |node: &mut Node| {
            for (name, port, backend) in [
                ("big6", 9201, "[2001:db8:20::20]:53@n2"),
                ("big4", 9202, "10.0.0.20:53@n2"),
            ] {
                let backend = lb_userspace::table::parse_backend_spec(backend).unwrap();
                node.table
                    .add_service(name, Proto::Udp, port, None, &[backend])
                    .unwrap();
            }
            node.apply();
        };
        add_udp(node);
        let datagram6 = |port: u16| {
            udp6(
                (CLIENT_MAC, INGRESS_MAC),
                (CLIENT_IP6, port),
                (NODE_IP6, 9201),
                64,
                &vec![b'd'; 1500 - 48],
            )
        };
        let too_big = |datagram: &[u8], mtu: u32| {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(INGRESS_MAC, CLIENT_MAC)
                .ipv6(NODE_IP6, CLIENT_IP6, 64)
                .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu })
                .write(&mut frame, &datagram[14..14 + 48])
                .unwrap();
            frame
        };
        let datagram = datagram6(40000);
        assert_eq!(
            node.xdp(&datagram, ingress),
            (XDP_TX, too_big(&datagram, 1450))
        );
        assert_eq!(node.reason(Reason::FragNeededSent), 1);
        assert_eq!(node.backend("big6", 0).packets, 0);

        for service in ["big6", "big4"] {
            node.table.remove_service(service).unwrap();
        }
        with_ipv6_underlay(node);
        add_udp(node);
        let datagram = datagram6(40001);
        assert_eq!(
            node.xdp(&datagram, ingress),
            (XDP_TX, too_big(&datagram, 1430))
        );
        let mut datagram4 = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 40000),
            (NODE_IP, 9202),
            64,
            &vec![b'd'; 1500 - 28],
        );
        // DF, the IPv4 header's checksum again.
        datagram4[14 + 6] = 0x40;
        datagram4[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let check = internet_checksum(&[&datagram4[14..34]]);
        datagram4[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
        let (action, out) = node.xdp(&datagram4, ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[..12], &[&CLIENT_MAC[..], &INGRESS_MAC].concat()[..]);
        assert_eq!(&out[26..34], &[&NODE_IP[..], &CLIENT_IP].concat()[..]);
        // Destination unreachable, fragmentation needed, next-hop MTU 1430; the quote as sent.
        assert_eq!(&out[34..36], &[3, 4]);
        assert_eq!(&out[40..42], &1430u16.to_be_bytes());
        assert_eq!(&out[42..42 + 28], &datagram4[14..14 + 28]);
        assert_eq!(node.reason(Reason::FragNeededSent), 3);
        assert_eq!(node.backend("big4", 0).packets, 0);
        assert_eq!(node.reason(Reason::DropEncapMtu), 0);
    });
}

/// An ICMPv6 error about a backend's reply, sent by the client's side to the service address
/// the reply came from ("packet too big" from a narrower link before the client), goes to the
/// flow's backend: addressed to it, its quote given back the backend's address and port (the
/// quoted and ICMPv6 checksums right), hop limit one less. An error about no flow and
/// neighbour discovery go to the kernel untouched.
#[test]
fn icmpv6_errors_about_replies_go_to_their_backend() {
    with_node(|node| {
        with_ipv6_services(node);
        let ingress = Some(node.ifindex);
        let (action, out) = node.xdp(&client6(40000, WEB6_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let chosen = backend_of(&out);
        let backend = BACKENDS6[chosen];
        let mut router = CLIENT_IP6;
        router[15] = 0x99;
        let error = |macs: ([u8; 6], [u8; 6]), dst: [u8; 16], hop_limit: u8, quote: &[u8]| {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(macs.0, macs.1)
                .ipv6(router, dst, hop_limit)
                .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 })
                .write(&mut frame, quote)
                .unwrap();
            frame
        };
        let reply_as_sent = segment6(
            (node.mac, CLIENT_MAC),
            (NODE_IP6, WEB6_PORT),
            (CLIENT_IP6, 40000),
            64,
            "SA",
        );
        let reply_of_backend = segment6(
            (node.mac, CLIENT_MAC),
            (backend, BACKEND_PORT),
            (CLIENT_IP6, 40000),
            64,
            "SA",
        );
        let input = error(
            (CLIENT_MAC, INGRESS_MAC),
            NODE_IP6,
            64,
            &reply_as_sent[14..],
        );
        let (action, out) = node.xdp(&input, ingress);
        assert_eq!(
            action, XDP_TX,
            "the backend is out of the receiving interface"
        );
        let backend_mac = [0x02, 0, 0, 0, 0, backend[15]];
        assert_eq!(
            out,
            error(
                (node.mac, backend_mac),
                backend,
                63,
                &reply_of_backend[14..]
            )
        );
        assert_eq!(node.reason(Reason::IcmpToBackend), 1);

        // About a reply of no flow: the kernel's.
        let stray = segment6(
            (node.mac, CLIENT_MAC),
            (NODE_IP6, WEB6_PORT),
            (CLIENT_IP6, 40099),
            64,
            "SA",
        );
        let input = error((CLIENT_MAC, INGRESS_MAC), NODE_IP6, 64, &stray[14..]);
        assert_eq!(node.xdp(&input, ingress), (XDP_PASS, input.clone()));
        // Neighbour discovery: the kernel's, untouched.
        let mut solicitation = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, INGRESS_MAC)
            .ipv6(CLIENT_IP6, NODE_IP6, 255)
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut solicitation, &NODE_IP6)
            .unwrap();
        assert_eq!(
            node.xdp(&solicitation, ingress),
            (XDP_PASS, solicitation.clone())
        );
        assert_eq!(node.reason(Reason::IcmpToBackend), 1);
    });
}
