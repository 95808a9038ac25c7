//! Packet tests: crafted frames run through the real data plane with BPF_PROG_RUN, checked
//! against the exact frame expected back, the action, and the counters. Each test runs in a
//! node namespace of its own (see `dataplane`).
mod dataplane;

use std::net::Ipv4Addr;

use dataplane::*;
use etherparse::Ipv4Header;
use etherparse::PacketBuilder;
use lb_common::{
    BridgePortKey, DEFAULT_VNI, DEFAULT_VXLAN_PORT, Event, FlowKey, PROTO_UDP, Reason,
    ReverseValue, SNAT_PORT_COUNT, SNAT_PORT_FIRST, VXLAN_OVERHEAD, flow_hash,
};
use lb_userspace::dataplane::{self as lb_dataplane, sync};
use lb_userspace::table::{Proto, Scheduler, parse_backend, parse_backend_spec};

/// The destination of a DNATed TCP/UDP frame, read back from its bytes.
fn dst_of(frame: &[u8]) -> ([u8; 4], u16) {
    (
        frame[30..34].try_into().unwrap(),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

/// The source of a TCP/UDP frame, read back from its bytes.
fn src_of(frame: &[u8]) -> ([u8; 4], u16) {
    (
        frame[26..30].try_into().unwrap(),
        u16::from_be_bytes([frame[34], frame[35]]),
    )
}

/// Subnets written `NETWORK/LEN`.
fn subnets(written: &[&str]) -> std::collections::BTreeSet<lb_userspace::host::underlay::Subnet> {
    written
        .iter()
        .map(|s| {
            let (network, len) = s.split_once('/').unwrap();
            lb_userspace::host::underlay::Subnet {
                network: network.parse().unwrap(),
                prefix_len: len.parse().unwrap(),
            }
        })
        .collect()
}

/// Checks that `port` is one a hairpin flow's packets may get as their source.
fn assert_hairpin_port(port: u16) {
    assert!(
        (SNAT_PORT_FIRST..=u16::MAX).contains(&port),
        "hairpin source port {port} is outside {SNAT_PORT_FIRST}-65535"
    );
}

/// Checks what the data plane encapsulated: the outer and inner checksums are valid, the outer
/// UDP checksum is 0, the outer source port is in the dynamic range. Returns that port.
fn encap_source_port(frame: &[u8]) -> u16 {
    assert_checksums_valid(frame);
    assert_eq!(&frame[40..42], &[0, 0], "outer UDP checksum is 0 (none)");
    // Outer Ethernet, IPv4, UDP and VXLAN take as many bytes as VXLAN adds to an IPv4 packet.
    assert_checksums_valid(&frame[VXLAN_OVERHEAD as usize..]);
    let port = u16::from_be_bytes([frame[34], frame[35]]);
    assert!(
        (49152..=65535).contains(&port),
        "outer source port {port} is outside the dynamic range"
    );
    port
}

const HTTP_OK: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";

/// An HTTP answer from `from` to the client's `port`: a backend's reply, or the same after
/// reverse NAT.
fn http_ok(macs: ([u8; 6], [u8; 6]), from: ([u8; 4], u16), port: u16, ttl: u8) -> Vec<u8> {
    tcp(macs, from, (CLIENT_IP, port), ttl, "PA", HTTP_OK)
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

/// A backend that connects to the service and is given itself would answer its own address,
/// never through the node: the flow gets the node's address (the one connected to) and a
/// hairpin port as its source, and the reply to them comes back to the backend from the
/// service. Flows from it to the other backends keep its address, until those are known to
/// share its subnet (they would answer it straight over the link): then they are hairpin flows
/// too, while a client on another subnet still is not.
#[test]
fn a_backend_given_itself_or_a_neighbour_on_its_subnet_is_answered_through_the_node() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let from_b0 = |port, flags| {
            tcp(
                (backend_mac(0), INGRESS_MAC),
                (BACKENDS[0], port),
                (NODE_IP, WEB_PORT),
                64,
                flags,
                b"",
            )
        };
        // Round-robin's first turn is 10.0.0.6 itself.
        let (action, out) = node.xdp(&from_b0(40000, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let (source, port) = src_of(&out);
        assert_eq!(source, NODE_IP, "the address the backend connected to");
        assert_hairpin_port(port);
        let to_itself = |flags| {
            tcp(
                (node.mac, backend_mac(0)),
                (NODE_IP, port),
                (BACKENDS[0], BACKEND_PORT),
                63,
                flags,
                b"",
            )
        };
        assert_eq!(out, to_itself("S"));
        assert_checksums_valid(&out);
        let (action, out) = node.xdp(&from_b0(40000, "A"), ingress);
        assert_eq!(
            (action, out),
            (XDP_TX, to_itself("A")),
            "the flow keeps its port"
        );
        assert_eq!(node.event(Event::FlowHairpin), 1);

        let reply = tcp(
            (backend_mac(0), INGRESS_MAC),
            (BACKENDS[0], BACKEND_PORT),
            (NODE_IP, port),
            64,
            "PA",
            HTTP_OK,
        );
        let (action, out) = node.xdp(&reply, ingress);
        assert_eq!(action, XDP_TX);
        let expected = tcp(
            (node.mac, backend_mac(0)),
            (NODE_IP, WEB_PORT),
            (BACKENDS[0], 40000),
            63,
            "PA",
            HTTP_OK,
        );
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(node.reason(Reason::ReplyTx), 1);
        assert_eq!(node.backend("web", 0).reply_packets, 1);

        // Turn 2: 10.0.0.7, which answers 10.0.0.6 through the node as far as lbctl knows.
        let (action, out) = node.xdp(&from_b0(40001, "S"), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(src_of(&out), (BACKENDS[0], 40001), "source kept");
        assert_eq!(dst_of(&out), (BACKENDS[1], BACKEND_PORT));

        // With the node's subnets known, 10.0.0.8 shares 10.0.0.6's: a hairpin flow.
        let subnets = subnets(&["10.0.0.0/24", "192.168.100.0/24"]);
        assert_eq!(node.maps.sync_subnets(&subnets, None).unwrap(), 2);
        assert_eq!(
            node.maps.sync_subnets(&subnets, None).unwrap(),
            0,
            "in line"
        );
        let (action, out) = node.xdp(&from_b0(40002, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let (source, neighbour_port) = src_of(&out);
        assert_eq!(source, NODE_IP);
        assert_hairpin_port(neighbour_port);
        assert_ne!(neighbour_port, port);
        assert_eq!(dst_of(&out), (BACKENDS[2], BACKEND_PORT));
        // A client on the node's other subnet keeps its address (turn 4: 10.0.0.6).
        let (action, out) = node.xdp(&client_syn(40003), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(src_of(&out), (CLIENT_IP, 40003));
        assert_eq!(node.event(Event::FlowHairpin), 2);
        assert_eq!(node.event(Event::FlowCreated), 4);
    });
}

/// A maglev hairpin flow whose flow entry was evicted (and whose source entry too) finds its
/// backend again and, with it, the very source port its backend's connection knows: the next
/// segment leaves exactly as before the eviction.
#[test]
fn an_evicted_maglev_hairpin_flow_keeps_its_source_port() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let me = std::net::SocketAddrV4::new(Ipv4Addr::from(BACKENDS[0]), BACKEND_PORT);
        node.table
            .add_service("self", Proto::Tcp, 8181, None, &[me])
            .unwrap();
        node.set_scheduler("self", Scheduler::Maglev);
        let segment = |flags| {
            tcp(
                (backend_mac(0), INGRESS_MAC),
                (BACKENDS[0], 40000),
                (NODE_IP, 8181),
                64,
                flags,
                b"",
            )
        };
        let (action, out) = node.xdp(&segment("S"), ingress);
        assert_eq!(action, XDP_TX);
        let (_, port) = src_of(&out);
        assert_hairpin_port(port);
        let key = tcp_key((BACKENDS[0], 40000), (NODE_IP, 8181));
        node.maps.flows.remove(&key).unwrap();
        node.maps.snat_flows.remove(&key).unwrap();
        let (action, out) = node.xdp(&segment("A"), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(src_of(&out), (NODE_IP, port), "the same source port");
        assert_eq!(node.event(Event::FlowRecovered), 1);
        assert_eq!(node.event(Event::FlowHairpin), 2);
    });
}

/// A frame for a service addressed to another host's MAC (seen because the interface is
/// promiscuous, or flooded by a switch: a standby that holds the same address) starts no flow:
/// passed untouched, as the kernel, which drops it, would see it. A broadcast frame is every
/// host's and is balanced.
#[test]
fn a_frame_for_another_hosts_mac_starts_no_flow() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let mut frame = client_syn(40000);
        frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        let (action, out) = node.xdp(&frame, ingress);
        assert_eq!((action, &out), (XDP_PASS, &frame), "untouched");
        assert_eq!(node.reason(Reason::PassOtherHost), 1);
        assert_eq!(node.event(Event::FlowCreated), 0);
        let key = tcp_key((CLIENT_IP, 40000), (NODE_IP, WEB_PORT));
        assert!(node.maps.flows.get(&key, 0).is_err(), "no flow recorded");

        frame[..6].copy_from_slice(&[0xff; 6]);
        let (action, out) = node.xdp(&frame, ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(dst_of(&out), (BACKENDS[0], BACKEND_PORT));
        assert_eq!(node.reason(Reason::PassOtherHost), 1);
        assert_eq!(node.event(Event::FlowCreated), 1);
    });
}

/// A hairpin flow takes the first of the ports its 5-tuple hashes to that is free, or held by a
/// flow that ended; when all eight tried are held by live flows, its packet is dropped and
/// counted, and nothing is recorded.
#[test]
fn a_hairpin_flow_takes_a_free_or_ended_flows_port_and_is_dropped_when_none_is_left() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let me = std::net::SocketAddrV4::new(Ipv4Addr::from(BACKENDS[0]), BACKEND_PORT);
        node.table
            .add_service("self", lb_userspace::table::Proto::Tcp, 8181, None, &[me])
            .unwrap();
        node.apply();
        let syn = tcp(
            (backend_mac(0), INGRESS_MAC),
            (BACKENDS[0], 40000),
            (NODE_IP, 8181),
            64,
            "S",
            b"",
        );
        let key = tcp_key((BACKENDS[0], 40000), (NODE_IP, 8181));
        let start = flow_hash(&key);
        let tried: Vec<u16> = (0..8)
            .map(|i| SNAT_PORT_FIRST + (start.wrapping_add(i) % u32::from(SNAT_PORT_COUNT)) as u16)
            .collect();
        let reply_key = |port| tcp_key((BACKENDS[0], BACKEND_PORT), (NODE_IP, port));
        let held = ReverseValue {
            orig_ip_be: u32::from_ne_bytes(NODE_IP),
            orig_port_be: 8181u16.to_be(),
            ..ReverseValue::default()
        };
        // Held for good: the reply 5-tuples of flows whose client has the node's address.
        for port in &tried {
            node.maps
                .reverse_flows
                .insert(reply_key(*port), held, 0)
                .unwrap();
        }
        let (action, _) = node.xdp(&syn, ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropSnatPortsExhausted), 1);
        assert!(node.maps.flows.get(&key, 0).is_err(), "no flow recorded");

        // The sixth port tried now belongs to a hairpin flow whose client → service entry is
        // gone: an ended flow, whose port is given to the new one.
        let ended = ReverseValue {
            client_ip_be: u32::from_ne_bytes(BACKENDS[1]),
            client_port_be: 39999u16.to_be(),
            ..held
        };
        node.maps
            .reverse_flows
            .insert(reply_key(tried[5]), ended, 0)
            .unwrap();
        let (action, out) = node.xdp(&syn, ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(src_of(&out), (NODE_IP, tried[5]));
        let taken = node
            .maps
            .reverse_flows
            .get(&reply_key(tried[5]), 0)
            .unwrap();
        assert_eq!(
            (taken.client_ip_be, u16::from_be(taken.client_port_be)),
            (u32::from_ne_bytes(BACKENDS[0]), 40000)
        );
        assert_eq!(node.event(Event::FlowHairpin), 1);
    });
}

/// On an interface whose frames go out through TC (`TX_VIA_TC`: a veth), every frame XDP would
/// send with XDP_TX is readied exactly as for XDP_TX and handed to the kernel instead
/// (XDP_PASS) behind the note for the TC ingress program in its metadata (the interface's
/// cookie, then its ifindex: a test run's output starts at the metadata), counted under the
/// same reason; once the interface is out of `TX_VIA_TC` the same packets leave by XDP_TX
/// again, byte for byte the same.
#[test]
fn frames_for_an_interface_that_sends_through_tc_are_readied_and_handed_over() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let reply = tcp(
            (backend_mac(0), node.mac),
            (BACKENDS[0], BACKEND_PORT),
            (CLIENT_IP, 40101),
            64,
            "PA",
            b"ok",
        );
        let cases: [(&str, Vec<u8>, Reason); 3] = [
            (
                "a backend on the link",
                client_syn(40101),
                Reason::ForwardTx,
            ),
            ("its reply on the link", reply, Reason::ReplyTx),
            (
                "a backend on another node",
                client_tcp(40102, MESH_PORT, "S"),
                Reason::ForwardEncapTx,
            ),
        ];
        let cookie: u32 = 0x5eed_c0de;
        let mut note = cookie.to_ne_bytes().to_vec();
        note.extend_from_slice(&node.ifindex.to_ne_bytes());
        for (name, frame, reason) in &cases {
            node.maps.tx_via_tc.insert(node.ifindex, cookie, 0).unwrap();
            node.forget_routes();
            let before = node.reason(*reason);
            let (action, handed_over) = node.xdp(frame, ingress);
            assert_eq!(action, XDP_PASS, "{name}: handed to TC");
            assert_eq!(node.reason(*reason), before + 1, "{name}");
            node.maps.tx_via_tc.remove(&node.ifindex).unwrap();
            node.forget_routes();
            let (action, sent) = node.xdp(frame, ingress);
            assert_eq!(action, XDP_TX, "{name}: sent by XDP");
            assert_eq!(
                handed_over,
                [note.as_slice(), &sent].concat(),
                "{name}: the note, then the same frame either way"
            );
            assert_checksums_valid(&sent);
        }
        assert_eq!(
            node.reason(Reason::XmitTc),
            0,
            "counted by TC ingress, not run here"
        );
    });
}

/// A backend behind a port of one of the node's bridges (`BRIDGE_PORTS`: the FIB's interface
/// and the backend's MAC → the port; here `lbt0` stands for the bridge, and the port is a veth
/// of the test's): the frame is readied as for XDP_TX (MACs, TTL, DNAT) and handed to TC with
/// the port's cookie and its index marked "into its other end". Without the port's cookie,
/// and once the port is deleted (a container replaced: the kernel takes it out of
/// `PEER_PORTS`), the kernel routes the flow's next packets.
#[test]
fn frames_for_a_backend_behind_a_bridge_port_are_handed_to_tc_for_its_other_end() {
    with_node(|node| {
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&[
            "link", "add", "ptport", "type", "veth", "peer", "name", "ptpeer",
        ]);
        let port = if_index("ptport");
        let cookie: u32 = 0x0b1d_9e00;
        let key = BridgePortKey {
            bridge_ifindex: node.ifindex,
            mac: backend_mac(0),
            _pad: [0; 2],
        };
        node.maps.bridge_ports.insert(key, port, 0).unwrap();
        node.maps.peer_ports.insert(port, port, None, 0).unwrap();
        node.maps.tx_via_tc.insert(port, cookie, 0).unwrap();
        node.forget_routes();
        let (action, handed_over) = node.xdp(&client_syn(40201), None);
        assert_eq!(action, XDP_PASS);
        assert_eq!(node.reason(Reason::ForwardRedirect), 1);
        let mut note = cookie.to_ne_bytes().to_vec();
        note.extend_from_slice(&(port | 1 << 31).to_ne_bytes());
        let (handed_note, frame) = handed_over.split_at(note.len());
        assert_eq!(handed_note, note.as_slice());
        assert_eq!(
            (&frame[0..6], &frame[6..12]),
            (&backend_mac(0)[..], &node.mac[..])
        );
        assert_eq!(frame[22], 63, "TTL");
        assert_eq!(frame[30..34], BACKENDS[0], "DNAT");
        assert_checksums_valid(frame);

        node.maps.tx_via_tc.remove(&port).unwrap();
        node.forget_routes();
        let (action, _) = node.xdp(&client_tcp(40201, WEB_PORT, "A"), None);
        assert_eq!(action, XDP_PASS);
        assert_eq!(node.reason(Reason::ForwardStack), 1);
        assert_eq!(node.reason(Reason::ForwardRedirect), 1);

        node.maps.tx_via_tc.insert(port, cookie, 0).unwrap();
        node.forget_routes();
        node.xdp(&client_tcp(40201, WEB_PORT, "A"), None);
        assert_eq!(node.reason(Reason::ForwardRedirect), 2);
        ip(&["link", "del", "ptport"]);
        assert!(
            node.maps.peer_ports.get(port, 0).is_err(),
            "the kernel took it out"
        );
        node.forget_routes();
        let (action, out) = node.xdp(&client_tcp(40201, WEB_PORT, "A"), None);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out.len(), client_tcp(40201, WEB_PORT, "A").len(), "no note");
        assert_eq!(node.reason(Reason::ForwardStack), 2);
        assert_eq!(node.reason(Reason::ForwardRedirect), 2);
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

/// `frame` as BIG TCP carries it: a GSO packet beyond IPv4's 64 KiB has total length 0, and
/// its header checksum covers that.
fn with_total_length_zero(mut frame: Vec<u8>) -> Vec<u8> {
    frame[16..18].copy_from_slice(&[0, 0]);
    let mut header = Ipv4Header::from_slice(&frame[14..]).unwrap().0;
    header.header_checksum = header.calc_header_checksum();
    frame[24..26].copy_from_slice(&header.header_checksum.to_be_bytes());
    frame
}

/// A TCP GSO reply with IPv4 total length 0 (BIG TCP: the kernel's GSO packets beyond 64 KiB,
/// where the skb's length is the packet's) is reverse-NATed by TC like any reply; without GSO,
/// total length 0 is malformed and the frame goes on untouched.
#[test]
fn a_big_tcp_reply_is_reverse_nated_by_tc_egress() {
    with_node(|node| {
        node.xdp(&client_syn(40002), None);
        let reply = |from| {
            with_total_length_zero(tcp(
                (node.mac, CLIENT_MAC),
                from,
                (CLIENT_IP, 40002),
                63,
                "PA",
                &[7u8; 2800],
            ))
        };
        let (action, out) = node.tc_gso(&reply((BACKENDS[0], BACKEND_PORT)), node.ifindex, 1400);
        assert_eq!(action, TC_ACT_UNSPEC);
        assert_eq!(out, reply((NODE_IP, WEB_PORT)));
        assert_eq!(node.reason(Reason::ReplyEgress), 1);

        let plain = reply((BACKENDS[0], BACKEND_PORT));
        let (action, out) = node.tc_on(&plain, Some(node.ifindex));
        assert_eq!((action, &out), (TC_ACT_UNSPEC, &plain), "untouched");
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

/// A SYN on the 5-tuple of a connection the client ended (FIN, or RST with ACK: an abort) is a
/// new connection and takes the next turn. A RST without ACK is the client's answer to an ACK it
/// cannot place, e.g. from a backend still in TIME_WAIT for an earlier connection on the same
/// 5-tuple, in the middle of a handshake: the SYN it sends again belongs to the same connection
/// and keeps its backend.
#[test]
fn a_syn_after_a_fin_or_an_abort_takes_a_new_turn_and_a_syn_after_a_bare_rst_does_not() {
    with_node(|node| {
        for (i, (ending, new_turn)) in [("R", false), ("FA", true), ("RA", true), ("A", false)]
            .into_iter()
            .enumerate()
        {
            let port = 41000 + i as u16;
            let first = dst_of(&node.xdp(&client_syn(port), None).1);
            assert_eq!(
                node.xdp(&client_tcp(port, WEB_PORT, ending), None).0,
                XDP_PASS,
                "{ending}"
            );
            let created = node.event(Event::FlowCreated);
            let again = dst_of(&node.xdp(&client_syn(port), None).1);
            assert_eq!(
                again != first,
                new_turn,
                "SYN after {ending}: {first:?} then {again:?}"
            );
            assert_eq!(
                node.event(Event::FlowCreated),
                created + u64::from(new_turn),
                "SYN after {ending}"
            );
        }
    });
}

/// A backend that refuses a connection (its server is gone: the kernel answers the SYN with a
/// RST) is not heard by the client: the RST is dropped, in XDP and in TC, with the flow and its
/// reverse entry, and the client's retransmitted SYN chooses again. A RST once the backend has
/// answered (or from the client) ends the connection as before.
#[test]
fn a_backend_refusing_a_syn_is_not_heard_and_the_retransmission_chooses_again() {
    with_node(|node| {
        let refused = |port: u16, backend: [u8; 4]| from_backend(node, backend, port, "RA");
        // Through TC (a backend the kernel routes to) and through XDP (one on an lbctl link).
        for (i, through_xdp) in [(0u16, false), (1, true)] {
            let port = 45000 + i;
            let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
            let (first, _) = dst_of(&node.xdp(&client_syn(port), None).1);
            let reverse = reverse_key(&key, first, BACKEND_PORT);
            let dropped_before = node.reason(Reason::DropBackendRefused);
            if through_xdp {
                let (action, _) = node.xdp(&refused(port, first), None);
                assert_eq!(action, XDP_DROP);
            } else {
                let (action, _) = node.tc_on(&refused(port, first), None);
                assert_eq!(action, TC_ACT_SHOT);
            }
            assert_eq!(node.reason(Reason::DropBackendRefused), dropped_before + 1);
            assert!(
                node.maps.flows.get(&key, 0).is_err(),
                "the flow is forgotten"
            );
            assert!(node.maps.reverse_flows.get(&reverse, 0).is_err());
            let (again, _) = dst_of(&node.xdp(&client_syn(port), None).1);
            assert_ne!(again, first, "the retransmitted SYN takes the next turn");
        }
        // Answered first: a later RST is the connection's end, passed on and reverse-NATed.
        let port = 45010;
        let (backend, _) = dst_of(&node.xdp(&client_syn(port), None).1);
        let syn_ack = from_backend(node, backend, port, "SA");
        assert_eq!(src_of(&node.tc(&syn_ack)), (NODE_IP, WEB_PORT));
        assert_eq!(
            src_of(&node.tc(&refused(port, backend))),
            (NODE_IP, WEB_PORT)
        );
        let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
        let flow = node.maps.flows.get(&key, 0).unwrap();
        assert_eq!(
            flow.flags & lb_common::FLOW_CLOSING,
            lb_common::FLOW_CLOSING
        );
        // A backend whose server is gone but which holds the client port's last connection in
        // TIME_WAIT answers the SYN with an ACK; the client resets that (a bare RST) and sends
        // the SYN again, to the same backend, still awaiting: the backend's RST to it is a
        // refusal too.
        let port = 45012;
        let (backend, _) = dst_of(&node.xdp(&client_syn(port), None).1);
        let time_wait_ack = from_backend(node, backend, port, "A");
        node.tc(&time_wait_ack);
        node.xdp(&client_tcp(port, WEB_PORT, "R"), None);
        assert_eq!(dst_of(&node.xdp(&client_syn(port), None).1).0, backend);
        let (action, _) = node.tc_on(&refused(port, backend), None);
        assert_eq!(action, TC_ACT_SHOT, "refused after the TIME_WAIT exchange");
        assert_eq!(node.reason(Reason::DropBackendRefused), 3);
        // A client's RST is not its backend's refusal.
        let port = 45011;
        node.xdp(&client_syn(port), None);
        node.xdp(&client_tcp(port, WEB_PORT, "RA"), None);
        assert_eq!(node.reason(Reason::DropBackendRefused), 3);
        // Passive health counted the three refusals, and neither the RST that ended an
        // answered connection nor the client's.
        let refused: u64 = (0..BACKENDS.len())
            .map(|i| {
                node.maps
                    .passive_health(node.backend_id("web", i))
                    .unwrap()
                    .refused
            })
            .sum();
        assert_eq!(refused, 3);
    });
}

/// A client that sends its SYN again half a second or more after the first, while the backend
/// has not answered (a vanished host), gets another backend for it; a duplicate SYN at once,
/// or a SYN after the backend answered, stays with its backend.
#[test]
fn a_syn_its_backend_left_unanswered_chooses_again_when_the_client_sends_it_again() {
    with_node(|node| {
        let port = 46000;
        let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
        let (first, _) = dst_of(&node.xdp(&client_syn(port), None).1);
        assert_eq!(
            dst_of(&node.xdp(&client_syn(port), None).1).0,
            first,
            "a duplicate"
        );
        assert_eq!(node.event(Event::FlowUnanswered), 0);
        let age = |node: &mut Node| {
            let mut flow = node.maps.flows.get(&key, 0).unwrap();
            flow.last_seen_ns -= lb_common::FLOW_UNANSWERED_NS;
            node.maps.flows.insert(key, flow, 0).unwrap();
        };
        age(node);
        let (again, _) = dst_of(&node.xdp(&client_syn(port), None).1);
        assert_ne!(again, first, "unanswered: the SYN chooses again");
        assert_eq!(node.event(Event::FlowUnanswered), 1);
        // Once its backend answered (the client's ACK says so), a late SYN stays.
        node.xdp(&client_tcp(port, WEB_PORT, "A"), None);
        age(node);
        assert_eq!(dst_of(&node.xdp(&client_syn(port), None).1).0, again);
        assert_eq!(node.event(Event::FlowUnanswered), 1);
        // Counted against the backend that left it unanswered: one failure, no ejection yet.
        let index = BACKENDS.iter().position(|b| *b == first).unwrap();
        let health = node
            .maps
            .passive_health(node.backend_id("web", index))
            .unwrap();
        assert_eq!(
            (health.unanswered, health.failures, health.ejections),
            (1, 1, 0)
        );
        assert_eq!(health.last_failure, lb_common::PASSIVE_UNANSWERED);
    });
}

/// A segment without payload from `backend`:80 to the client's port `port`, as the node
/// sees it on its way back (`flags` as `tcp` takes them).
fn from_backend(node: &Node, backend: [u8; 4], port: u16, flags: &str) -> Vec<u8> {
    tcp(
        (node.mac, CLIENT_MAC),
        (backend, BACKEND_PORT),
        (CLIENT_IP, port),
        63,
        flags,
        b"",
    )
}

/// Opens a connection from client port `port` to `web`; the backend it is given answers with a
/// SYN-ACK (through TC), unless it is `refusing`, whose RST refuses it. Returns the backend.
fn connect(node: &Node, port: u16, refusing: [u8; 4]) -> [u8; 4] {
    let (backend, _) = dst_of(&node.xdp(&client_syn(port), None).1);
    let flags = if backend == refusing { "RA" } else { "SA" };
    let reply = from_backend(node, backend, port, flags);
    node.tc_on(&reply, None);
    backend
}

/// Passive health checking: a backend that refuses `eject_after` connections in a row (3, the
/// default) is ejected in the data plane at once: new flows pass it by, while its established
/// connections stay with it. A connection it answers in between starts its count over. With
/// every backend ejected, new flows fail open; once an ejection ends, one more refusal ejects
/// the backend again.
#[test]
fn a_backend_that_refuses_connections_in_a_row_is_ejected_and_new_flows_pass_it_by() {
    with_node(|node| {
        let dead = BACKENDS[0];
        let id = node.backend_id("web", 0);
        let passive = |node: &Node| node.maps.passive_health(id).unwrap();
        let mut port = 48000;
        let mut next_port = || {
            port += 1;
            port
        };
        // An established connection to the backend, before it fails.
        let established = next_port();
        assert_eq!(connect(node, established, [0; 4]), dead);
        node.xdp(&client_tcp(established, WEB_PORT, "A"), None);
        let refused_until = |node: &Node, next_port: &mut dyn FnMut() -> u16, refusals: u64| {
            while passive(node).refused < refusals {
                connect(node, next_port(), dead);
            }
        };
        refused_until(node, &mut next_port, 2);
        assert_eq!(passive(node).failures, 2);
        // It answers one: its count starts over.
        while connect(node, next_port(), [0; 4]) != dead {}
        assert_eq!(passive(node).failures, 0);
        refused_until(node, &mut next_port, 4);
        assert_eq!((passive(node).failures, passive(node).ejections), (2, 0));
        refused_until(node, &mut next_port, 5);
        let health = passive(node);
        assert_eq!((health.failures, health.ejections), (3, 1));
        assert_eq!(health.last_failure, lb_common::PASSIVE_REFUSED);
        assert_ne!(health.ejected_ns, 0);
        assert_eq!(node.event(Event::BackendEjected), 1);
        // Ejected: nine new flows, three of whose turns fall on it, go to the other two.
        let passed = node.event(Event::FlowPassedEjected);
        for _ in 0..9 {
            assert_ne!(connect(node, next_port(), dead), dead);
        }
        assert_eq!(node.event(Event::FlowPassedEjected), passed + 3);
        // Its established connection is left alone.
        let ack = client_tcp(established, WEB_PORT, "A");
        assert_eq!(dst_of(&node.xdp(&ack, None).1).0, dead);
        // The ejection ends: the backend takes new flows again, on probation: one more
        // refusal ejects it again.
        let mut ended = passive(node);
        ended.ejected_ns -= lb_common::PASSIVE_EJECTION_NS;
        node.maps.passive_health.set(id, ended, 0).unwrap();
        let mut chosen = false;
        for _ in 0..3 {
            chosen |= connect(node, next_port(), dead) == dead;
        }
        assert!(chosen, "back in the turns");
        assert_eq!(passive(node).ejections, 2, "ejected again at once");
        // Every backend ejected (one refusal each, at eject-after 1): new flows fail open.
        node.table
            .update_health_check(
                "web",
                &lb_userspace::table::HealthUpdate {
                    eject_after: Some(1),
                    ..Default::default()
                },
            )
            .unwrap();
        node.apply();
        for other in [BACKENDS[1], BACKENDS[2]] {
            while connect(node, next_port(), other) != other {}
        }
        assert_eq!(node.event(Event::BackendEjected), 4);
        let (action, out) = node.xdp(&client_syn(next_port()), None);
        assert_ne!(action, XDP_DROP, "fails open");
        assert!(BACKENDS.contains(&dst_of(&out).0));
        // A userspace write ends an ejection (as the daemon's active checks do) and counts
        // the return.
        lb_dataplane::end_ejection(&mut node.maps.passive_health, id).unwrap();
        let returned = passive(node);
        assert_eq!(
            (returned.ejected_ns, returned.failures, returned.returns),
            (0, 0, 1)
        );
        assert_eq!(returned.refused, health.refused + 1, "totals kept");
    });
}

/// On a maglev service, the flows whose slot names an ejected backend take the next slots of
/// the table: another backend, the same one for every packet of the flow and every node.
#[test]
fn on_a_maglev_service_an_ejected_backends_flows_take_the_next_slot() {
    with_node(|node| {
        node.set_scheduler("web", Scheduler::Maglev);
        let ejected = BACKENDS[1];
        let id = node.backend_id("web", 1);
        let health = lb_common::PassiveHealth {
            // A second ago, on the data plane's clock (its coarse reading may lag a tick).
            ejected_ns: lb_dataplane::monotonic_ns() - 1_000_000_000,
            ..Default::default()
        };
        node.maps.passive_health.set(id, health, 0).unwrap();
        let mut moved = 0;
        for port in 50000..50030 {
            let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
            let (chosen, _) = dst_of(&node.xdp(&client_syn(port), None).1);
            assert_ne!(chosen, ejected, "port {port}");
            if node.maglev_choice("web", &key).0 == ejected {
                moved += 1;
                // The same choice again for the same flow.
                node.evict(&key, chosen);
                assert_eq!(dst_of(&node.xdp(&client_syn(port), None).1).0, chosen);
            } else {
                assert_eq!(chosen, node.maglev_choice("web", &key).0, "port {port}");
            }
        }
        assert!(moved > 0, "some flows were the ejected backend's");
        assert_eq!(node.event(Event::FlowPassedEjected), 2 * moved);
    });
}

/// An ICMP destination unreachable about a SYN the data plane forwarded, from the backend's
/// host or a router on its way (through XDP) or from the node's own stack when the backend's
/// neighbour does not answer (through TC egress), is the backend's refusal: dropped, its flow
/// forgotten, and counted. About an answered connection, of another code (fragmentation
/// needed), or any other ICMP, it passes untouched.
#[test]
fn an_icmp_unreachable_about_a_forwarded_syn_is_the_backends_refusal() {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    with_node(|node| {
        let unreachable = |forwarded: &[u8], code: DestUnreachableHeader| {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(backend_mac(0), node.mac)
                .ipv4([10, 0, 0, 254], CLIENT_IP, 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(code))
                // The IPv4 header and the start of the TCP header, as a router quotes them.
                .write(&mut frame, &forwarded[14..14 + 20 + 8])
                .unwrap();
            frame
        };
        let refused =
            |node: &Node, backend: u32| node.maps.passive_health(backend).unwrap().refused;
        for (i, through_tc) in [(0u16, false), (1, true)] {
            let port = 49000 + i;
            let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
            let (_, forwarded) = node.xdp(&client_syn(port), None);
            let (backend, _) = dst_of(&forwarded);
            let index = BACKENDS.iter().position(|b| *b == backend).unwrap();
            let id = node.backend_id("web", index);
            let icmp = unreachable(&forwarded, DestUnreachableHeader::Host);
            let before = node.reason(Reason::DropBackendUnreachable);
            if through_tc {
                assert_eq!(node.tc_on(&icmp, None).0, TC_ACT_SHOT);
            } else {
                assert_eq!(node.xdp(&icmp, None).0, XDP_DROP);
            }
            assert_eq!(node.reason(Reason::DropBackendUnreachable), before + 1);
            assert!(
                node.maps.flows.get(&key, 0).is_err(),
                "the flow is forgotten"
            );
            assert_eq!(refused(node, id), 1);
            let (again, _) = dst_of(&node.xdp(&client_syn(port), None).1);
            assert_ne!(again, backend, "the retransmitted SYN takes the next turn");
        }
        // Awaiting, but quoting fewer than the 8 bytes of the TCP header an error must quote
        // (RFC 792), which the kernel ignores (found by `cargo xtask fuzz`): cut after the
        // ports, or within the sequence number.
        let port = 49005;
        let (_, forwarded) = node.xdp(&client_syn(port), None);
        for cut in [4, 7] {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(backend_mac(0), node.mac)
                .ipv4([10, 0, 0, 254], CLIENT_IP, 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::Host,
                ))
                .write(&mut frame, &forwarded[14..14 + 20 + cut])
                .unwrap();
            assert_eq!(node.xdp(&frame, None), (XDP_PASS, frame.clone()), "{cut}");
            assert_eq!(
                node.tc_on(&frame, None),
                (TC_ACT_UNSPEC, frame.clone()),
                "{cut}"
            );
        }
        let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
        assert!(
            node.maps.flows.get(&key, 0).is_ok(),
            "not taken for a refusal"
        );
        // Awaiting, but fragmentation needed: about the path, not the host.
        let port = 49010;
        let (_, forwarded) = node.xdp(&client_syn(port), None);
        let frag_needed = DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 };
        let frag_needed = unreachable(&forwarded, frag_needed);
        assert_eq!(
            node.xdp(&frag_needed, None),
            (XDP_PASS, frag_needed.clone()),
            "untouched"
        );
        // Answered: the connection is the client's to lose.
        let (backend, _) = dst_of(&forwarded);
        let syn_ack = from_backend(node, backend, port, "SA");
        node.tc(&syn_ack);
        let port_unreachable = unreachable(&forwarded, DestUnreachableHeader::Port);
        assert_eq!(node.xdp(&port_unreachable, None).0, XDP_PASS);
        assert_eq!(node.tc_on(&port_unreachable, None).0, TC_ACT_UNSPEC);
        let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
        assert!(node.maps.flows.get(&key, 0).is_ok());
        assert_eq!(node.reason(Reason::DropBackendUnreachable), 2);
        // Echo requests and replies are never looked at.
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, node.mac)
            .ipv4(CLIENT_IP, NODE_IP, 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        let passed = node.reason(Reason::PassNotTcpUdp);
        assert_eq!(node.xdp(&echo, None), (XDP_PASS, echo.clone()));
        assert_eq!(node.reason(Reason::PassNotTcpUdp), passed + 1);
    });
}

/// A connection ends when both sides have sent their FIN, or either aborts: one FIN is a
/// half-close (`shutdown(SHUT_WR)`), after which the other side may stream on for as long as it
/// likes, and the flow stays live (`backend drain` waits for it). Each row is a connection's
/// closing segments in order, from the client (`C`) or its backend (`B`), with whether the flow
/// is still live after each.
#[test]
fn a_half_close_keeps_the_flow_live_until_the_other_side_closes_too() {
    with_node(|node| {
        let rows: [&[(char, &str, bool)]; 5] = [
            &[('C', "FA", true), ('B', "PA", true), ('B', "FA", false)],
            &[('B', "FA", true), ('C', "A", true), ('C', "FA", false)],
            &[('C', "FA", true), ('B', "RA", false)],
            &[('C', "FA", true), ('C', "FA", true), ('B', "A", true)],
            &[('C', "RA", false)],
        ];
        for (i, row) in rows.iter().enumerate() {
            let port = 43000 + i as u16;
            let (backend, backend_port) = dst_of(&node.xdp(&client_syn(port), None).1);
            let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
            for (step, &(side, flags, live)) in row.iter().enumerate() {
                if side == 'C' {
                    node.xdp(&client_tcp(port, WEB_PORT, flags), None);
                } else {
                    let reply = tcp(
                        (node.mac, CLIENT_MAC),
                        (backend, backend_port),
                        (CLIENT_IP, port),
                        63,
                        flags,
                        b"more",
                    );
                    node.tc(&reply);
                }
                let flow = node.maps.flows.get(&key, 0).unwrap();
                assert_eq!(
                    lb_dataplane::flow_is_live(&key, &flow, lb_dataplane::monotonic_ns()),
                    live,
                    "row {i}, step {step}: {side} {flags}, flags {:#x}",
                    flow.flags
                );
            }
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
fn weights_give_backends_turns_in_proportion() {
    with_node(|node| {
        for (backend, weight) in [("10.0.0.6:80", 3), ("10.0.0.8:80", 0)] {
            node.table
                .set_weight("web", parse_backend(backend).unwrap(), weight)
                .unwrap();
        }
        node.apply();
        let chosen: Vec<[u8; 4]> = (0..8)
            .map(|i| dst_of(&node.xdp(&client_syn(41100 + i), None).1).0)
            .collect();
        let (a, b) = (BACKENDS[0], BACKENDS[1]);
        assert_eq!(
            chosen,
            [a, a, b, a, a, a, b, a],
            "3:1, spread out; weight 0: none"
        );
        assert_eq!(node.backend("web", 2).new_flows, 0);
    });
}

/// A round-robin service cannot tell which backend a connection had once its entry is gone:
/// the packet goes to the kernel, which resets the connection, and is counted.
#[test]
fn a_mid_connection_packet_without_flow_entry_on_a_round_robin_service_goes_to_the_kernel() {
    with_node(|node| {
        let syn = client_syn(48000);
        assert_eq!(dst_of(&node.xdp(&syn, None).1), (BACKENDS[0], BACKEND_PORT));
        let key = tcp_key((CLIENT_IP, 48000), (NODE_IP, WEB_PORT));
        node.evict(&key, BACKENDS[0]);
        for flags in ["A", "PA"] {
            let frame = client_tcp(48000, WEB_PORT, flags);
            node.xdp_case(flags, &frame, None, XDP_PASS, Reason::PassFlowUnknown);
        }
        assert!(node.maps.flows.get(&key, 0).is_err(), "no entry made up");
        assert_eq!(node.event(Event::FlowCreated), 1);
        let packets: u64 = (0..3).map(|i| node.backend("web", i).packets).sum();
        assert_eq!(packets, 1, "only the SYN reached a backend");

        // A new connection on that 5-tuple (a SYN) is a new flow, the next backend in turn.
        assert_eq!(dst_of(&node.xdp(&syn, None).1), (BACKENDS[1], BACKEND_PORT));
        // UDP has no SYN: a datagram without entry starts a new flow, the next in turn.
        let query = client_query(50000);
        assert_eq!(dst_of(&node.xdp(&query, None).1).0, BACKENDS[0]);
        let udp_key = FlowKey {
            proto: PROTO_UDP,
            ..tcp_key((CLIENT_IP, 50000), (NODE_IP, DNS_PORT))
        };
        node.maps.flows.remove(&udp_key).unwrap();
        assert_eq!(dst_of(&node.xdp(&query, None).1).0, BACKENDS[1]);
        assert_eq!(node.reason(Reason::PassFlowUnknown), 2);
    });
}

/// A maglev service sends each new flow where its table says, and a flow whose entries were
/// evicted back to the same backend, with its replies reverse-NATed again.
#[test]
fn on_a_maglev_service_an_evicted_flow_returns_to_its_backend() {
    with_node(|node| {
        node.set_scheduler("web", Scheduler::Maglev);
        let mut seen = std::collections::BTreeSet::new();
        for port in 49000..49030 {
            let key = tcp_key((CLIENT_IP, port), (NODE_IP, WEB_PORT));
            let (action, out) = node.xdp(&client_syn(port), None);
            assert_eq!(action, XDP_PASS);
            assert_eq!(dst_of(&out), node.maglev_choice("web", &key), "port {port}");
            assert_checksums_valid(&out);
            seen.insert(dst_of(&out));
        }
        assert_eq!(
            seen.len(),
            BACKENDS.len(),
            "30 flows spread over every backend"
        );
        assert_eq!(node.event(Event::FlowCreated), 30);

        let key = tcp_key((CLIENT_IP, 49000), (NODE_IP, WEB_PORT));
        let (backend, port) = node.maglev_choice("web", &key);
        let i = BACKENDS.iter().position(|b| *b == backend).unwrap();
        let new_flows = node.backend("web", i).new_flows;
        node.evict(&key, backend);
        let (action, out) = node.xdp(&client_tcp(49000, WEB_PORT, "PA"), None);
        assert_eq!(action, XDP_PASS);
        assert_eq!(dst_of(&out), (backend, port), "the same backend");
        assert_eq!(node.event(Event::FlowRecovered), 1);
        assert_eq!(node.event(Event::FlowCreated), 30, "not a new connection");
        assert_eq!(node.backend("web", i).new_flows, new_flows);
        assert_eq!(
            node.maps.flows.get(&key, 0).unwrap().backend_id,
            node.backend_id("web", i),
            "recorded again"
        );
        let reply = http_ok((node.mac, CLIENT_MAC), (backend, port), 49000, 63);
        assert_eq!(
            node.tc(&reply),
            http_ok((node.mac, CLIENT_MAC), (NODE_IP, WEB_PORT), 49000, 63),
            "its replies are reverse-NATed again"
        );
        // Its next packets find the entry.
        let (_, out) = node.xdp(&client_tcp(49000, WEB_PORT, "A"), None);
        assert_eq!(dst_of(&out), (backend, port));
        assert_eq!(node.event(Event::FlowRecovered), 1);
        assert_eq!(node.reason(Reason::PassFlowUnknown), 0);
    });
}

/// Nothing expires a flow by time: two hours without a packet (IPVS cuts a connection after
/// 900 s), its reverse-NAT entry evicted meanwhile, the connection's next packet still reaches
/// its backend, refreshes the entry and puts the reverse-NAT entry back.
#[test]
fn a_flow_idle_for_two_hours_keeps_its_backend_and_its_replies() {
    with_node(|node| {
        assert_eq!(dst_of(&node.xdp(&client_syn(48500), None).1).0, BACKENDS[0]);
        // Established (a handshake left unanswered that long would be abandoned).
        node.tc(&from_backend(node, BACKENDS[0], 48500, "SA"));
        let key = tcp_key((CLIENT_IP, 48500), (NODE_IP, WEB_PORT));
        let reverse = reverse_key(&key, BACKENDS[0], BACKEND_PORT);
        let mut flow = node.maps.flows.get(&key, 0).unwrap();
        let two_hours_ns = 2 * 3600 * 1_000_000_000;
        let before = lb_dataplane::monotonic_ns();
        // The clock starts at boot: on a machine up for less than two hours the last packet
        // goes back to boot (0, the oldest time a flow can hold), and the census looks from
        // two hours after it.
        flow.last_seen_ns = before.saturating_sub(two_hours_ns);
        node.maps.flows.insert(key, flow, 0).unwrap();
        node.maps.reverse_flows.remove(&reverse).unwrap();
        let census = node
            .maps
            .flow_census_at(flow.last_seen_ns + two_hours_ns)
            .unwrap();
        assert_eq!(census.entries, 1, "the census only counts");
        assert!(census.live.is_empty(), "idle for two hours: not live");
        let census = node
            .maps
            .flow_census_at(flow.last_seen_ns + two_hours_ns / 4)
            .unwrap();
        assert_eq!(census.live.len(), 1, "idle for half an hour: still live");

        let (action, out) = node.xdp(&client_tcp(48500, WEB_PORT, "PA"), None);
        assert_eq!(
            (action, dst_of(&out)),
            (XDP_PASS, (BACKENDS[0], BACKEND_PORT))
        );
        let refreshed = node.maps.flows.get(&key, 0).unwrap().last_seen_ns;
        assert!(
            refreshed + 1_000_000_000 > before,
            "last seen {refreshed}, the packet came after {before}"
        );
        assert_eq!(
            node.maps.reverse_flows.get(&reverse, 0).unwrap(),
            ReverseValue {
                orig_ip_be: u32::from_ne_bytes(NODE_IP),
                orig_port_be: WEB_PORT.to_be(),
                backend_id: node.backend_id("web", 0),
                ..ReverseValue::default()
            }
        );
        let reply = http_ok(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], BACKEND_PORT),
            48500,
            63,
        );
        assert_eq!(
            node.tc(&reply),
            http_ok((node.mac, CLIENT_MAC), (NODE_IP, WEB_PORT), 48500, 63)
        );
        assert_eq!(node.maps.flow_census().unwrap().live.len(), 1, "live again");
        assert_eq!(node.event(Event::FlowCreated), 1);
        assert_eq!(node.event(Event::FlowReselected), 0);
        assert_eq!(node.reason(Reason::PassFlowUnknown), 0);
    });
}

/// A full flow table (an LRU) evicts its least recently used flows: with room for 64 flows,
/// 1,000 new flows are all served and none is dropped; the first one's next packet is counted
/// as evicted, and on a maglev service still reaches its backend.
#[test]
fn a_full_flow_table_serves_new_flows_and_counts_the_evicted_ones() {
    const CAPACITY: u32 = 64;
    with_node_of(CAPACITY, |node| {
        let ack = |port| client_tcp(port, WEB_PORT, "A");
        for (scheduler, first) in [(Scheduler::RoundRobin, 30000), (Scheduler::Maglev, 30001)] {
            node.set_scheduler("web", scheduler);
            let first_key = tcp_key((CLIENT_IP, first), (NODE_IP, WEB_PORT));
            let (_, out) = node.xdp(&client_syn(first), None);
            let first_backend = dst_of(&out);
            let churn = if scheduler == Scheduler::Maglev {
                32000
            } else {
                31000
            };
            for port in churn..churn + 1000 {
                let (action, out) = node.xdp(&client_syn(port), None);
                assert_eq!(action, XDP_PASS, "port {port}");
                assert!(BACKENDS.contains(&dst_of(&out).0), "port {port} DNATed");
            }
            assert!(node.maps.flows.get(&first_key, 0).is_err(), "evicted");
            let entries = node.maps.flow_census().unwrap().entries;
            assert!(entries <= u64::from(CAPACITY), "{entries} entries");
            let (action, out) = node.xdp(&ack(first), None);
            assert_eq!(action, XDP_PASS);
            match scheduler {
                Scheduler::RoundRobin => {
                    assert_eq!(out, ack(first), "left to the kernel untouched");
                    assert_eq!(node.reason(Reason::PassFlowUnknown), 1);
                }
                Scheduler::Maglev => {
                    assert_eq!(dst_of(&out), first_backend);
                    assert_eq!(node.event(Event::FlowRecovered), 1);
                }
            }
        }
        assert_eq!(node.event(Event::FlowCreated), 2002);
        assert_eq!(node.reason(Reason::DropFlowTableFull), 0);
    });
}

#[test]
fn udp_is_balanced_and_a_zero_checksum_stays_zero() {
    with_node(|node| {
        let query = client_query(50000);
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

        let mut no_checksum = client_query(50001);
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
        fragment[21] = 0x01; // a later fragment (offset 8) whose first was never seen
        let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            ("arp", arp, Reason::PassNotIpv4),
            // Link-local addresses are not among those a service on every address is
            // published on (a flow key carries no scope).
            ("ipv6 to a link-local address", ipv6, Reason::PassNotLocal),
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
            (
                "a later fragment without its first",
                fragment,
                Reason::PassFragment,
            ),
        ];
        for (name, frame, reason) in cases {
            node.xdp_case(name, &frame, None, XDP_PASS, reason);
        }
        assert_eq!(node.event(Event::FlowCreated), 0);
    });
}

/// Splits an Ethernet + IPv4 (no options) frame into two fragments with identification `id`,
/// the first carrying `at` bytes (a multiple of 8) of the IPv4 payload, as a sender's kernel
/// fragments a datagram larger than its MTU.
fn fragments(frame: &[u8], id: u16, at: usize) -> [Vec<u8>; 2] {
    let (eth, ip, payload) = (&frame[..14], &frame[14..34], &frame[34..]);
    let fragment = |data: &[u8], offset: usize, more: bool| {
        let mut header = ip.to_vec();
        header[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        header[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = (u16::from(more) << 13) | (offset / 8) as u16;
        header[6..8].copy_from_slice(&flags.to_be_bytes());
        header[10..12].copy_from_slice(&[0, 0]);
        let parsed = etherparse::Ipv4Header::from_slice(&header).unwrap().0;
        header[10..12].copy_from_slice(&parsed.calc_header_checksum().to_be_bytes());
        [eth, &header, data].concat()
    };
    [
        fragment(&payload[..at], 0, true),
        fragment(&payload[at..], at, false),
    ]
}

/// A backend's UDP reply larger than its MTU leaves it in fragments: TC reverse-NATs the first
/// (address, port, the datagram's checksum) and the rest after it (address), so the client
/// reassembles exactly the datagram it would have got whole. A fragment whose first fragment
/// was not seen leaves untouched.
#[test]
fn the_fragments_of_a_udp_reply_are_reverse_nated_like_the_whole_datagram() {
    with_node(|node| {
        let query = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 40500),
            (NODE_IP, DNS_PORT),
            64,
            b"q",
        );
        let backend = dst_of(&node.xdp(&query, None).1);
        let answer: Vec<u8> = (0..2000).map(|i| i as u8).collect();
        let reply = udp(
            (node.mac, CLIENT_MAC),
            backend,
            (CLIENT_IP, 40500),
            63,
            &answer,
        );
        let seen_whole = udp(
            (node.mac, CLIENT_MAC),
            (NODE_IP, DNS_PORT),
            (CLIENT_IP, 40500),
            63,
            &answer,
        );
        let sent = fragments(&reply, 0x1234, 1480);
        let expected = fragments(&seen_whole, 0x1234, 1480);
        for (i, (fragment, expected)) in sent.iter().zip(&expected).enumerate() {
            assert_eq!(node.tc(fragment), *expected, "fragment {i}");
        }
        assert_eq!(node.reason(Reason::ReplyEgress), 2);
        let stray = fragments(&reply, 0x4321, 1480)[1].clone();
        assert_eq!(node.tc(&stray), stray, "its first fragment was never seen");
        assert_eq!(node.reason(Reason::ReplyEgress), 2);
    });
}

/// A client's UDP query larger than its MTU arrives in fragments: XDP DNATs the first (address,
/// port, the datagram's checksum: it picks the backend) and the rest after it (address), and
/// sends them the same way, so the backend reassembles exactly the datagram it would have got
/// whole. A fragment whose first fragment was not seen is passed on untouched.
#[test]
fn the_fragments_of_a_udp_query_are_dnated_like_the_whole_datagram() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let query: Vec<u8> = (0..2000).map(|i| (i * 7) as u8).collect();
        let sent = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 40600),
            (NODE_IP, DNS_PORT),
            64,
            &query,
        );
        let [first, rest] = fragments(&sent, 0x2468, 1480);
        let (action, out) = node.xdp(&first, ingress);
        assert_eq!(
            action, XDP_TX,
            "the backend is out of the receiving interface"
        );
        let (backend, port) = dst_of(&out);
        let i = BACKENDS.iter().position(|b| *b == backend).unwrap();
        let as_sent = udp(
            (node.mac, backend_mac(i)),
            (CLIENT_IP, 40600),
            (backend, port),
            63,
            &query,
        );
        let expected = fragments(&as_sent, 0x2468, 1480);
        assert_eq!(out, expected[0], "first fragment");
        assert_eq!(
            node.xdp(&rest, ingress),
            (XDP_TX, expected[1].clone()),
            "second"
        );
        assert_eq!(node.reason(Reason::ForwardTx), 2);
        assert_eq!(node.event(Event::FlowCreated), 1);
        let stray = fragments(&sent, 0x1357, 1480)[1].clone();
        node.xdp_case(
            "a stray fragment",
            &stray,
            ingress,
            XDP_PASS,
            Reason::PassFragment,
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

/// The maps are read back in batches of a few thousand entries: a table larger than a batch
/// (services and backends) reads back exactly as written, and a slot left active outside the
/// table (an interrupted command) is found and cleared.
#[test]
fn the_maps_read_back_whole_across_batches() {
    with_node(|node| {
        for i in 0..5_000u32 {
            let backends: Vec<_> = (0..3)
                .map(|j| std::net::SocketAddrV4::new(Ipv4Addr::from(0x0a01_0000 + i * 4 + j), 80))
                .collect();
            node.table
                .add_service(
                    &format!("s{i}"),
                    Proto::Tcp,
                    20_000 + i as u16,
                    None,
                    &backends,
                )
                .unwrap();
        }
        node.apply();
        let desired = sync::desired(&node.table, node.self_node);
        assert_eq!(desired.services.len(), 5_004);
        assert_eq!(node.maps.read_contents().unwrap(), desired);

        let stray = lb_common::Backend {
            flags: lb_common::BACKEND_ACTIVE,
            ..lb_common::Backend::default()
        };
        let last = lb_common::MAX_BACKENDS - 1;
        node.maps.backends.set(last, stray, 0).unwrap();
        let delta = sync::delta(&desired, &node.maps.read_contents().unwrap());
        assert_eq!(delta.backends_to_clear, [last]);
        assert_eq!(delta.writes(), 1);
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

/// `ROUTE_CACHE_TTL_NS` of the data plane's per-CPU route cache, plus the coarse clock's tick.
const ROUTE_CACHE_TTL_AND_TICK: std::time::Duration = std::time::Duration::from_millis(110);

#[test]
fn a_changed_neighbour_is_used_once_the_route_cache_expires_and_the_mtu_is_still_checked() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let ack = |port| client_tcp(port, WEB_PORT, "A");
        // Flows pinned to 10.0.0.6, created while its MAC is the first one.
        for port in [47000, 47003] {
            assert_eq!(node.xdp(&client_syn(port), ingress).0, XDP_TX);
            let _ = node.xdp(&client_syn(port + 1), ingress);
            let _ = node.xdp(&client_syn(port + 2), ingress);
        }
        let (_, out) = node.xdp(&ack(47000), ingress);
        assert_eq!(out[..6], backend_mac(0));

        let moved = [0x02, 0, 0, 0, 0, 0x66];
        let status = std::process::Command::new("ip")
            .args([
                "neigh",
                "replace",
                "10.0.0.6",
                "lladdr",
                "02:00:00:00:00:66",
            ])
            .args(["dev", "lbt0", "nud", "permanent"])
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(ROUTE_CACHE_TTL_AND_TICK * 2);
        let (action, out) = node.xdp(&ack(47000), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(out[..6], moved, "the new MAC once the cached route expired");

        // A packet larger than the egress MTU, right after a cached answer for the same
        // backend, still goes to the kernel (which fragments or answers ICMP).
        let big = tcp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 47003),
            (NODE_IP, WEB_PORT),
            64,
            "PA",
            &[0u8; UNDERLAY_MTU],
        );
        assert_eq!(node.xdp(&ack(47003), ingress).0, XDP_TX);
        let (action, out) = node.xdp(&big, ingress);
        assert_eq!(action, XDP_PASS);
        assert_eq!(
            dst_of(&out),
            (BACKENDS[0], BACKEND_PORT),
            "DNATed, left to the kernel"
        );
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

#[test]
fn a_flow_to_a_backend_on_another_node_is_vxlan_encapsulated_to_that_node() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let inner = |port, flags| to_backend((node.mac, N2_MAC), port, REMOTE_BACKEND, 63, flags);
        let syn = client_tcp(40000, MESH_PORT, "S");
        let (action, out) = node.xdp(&syn, ingress);
        assert_eq!(
            action, XDP_TX,
            "n2 is reachable out of the receiving interface"
        );
        let port = encap_source_port(&out);
        assert_eq!(out, Tunnel::to_n2(port).wrap(&inner(40000, "S")));

        let ack = client_tcp(40000, MESH_PORT, "A");
        let (action, out) = node.xdp(&ack, ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(
            encap_source_port(&out),
            port,
            "a flow keeps its source port"
        );
        assert_eq!(out, Tunnel::to_n2(port).wrap(&inner(40000, "A")));

        // The port is a hash of the flow: fixed inputs, so this cannot be flaky.
        let (action, out) = node.xdp(&client_tcp(40001, MESH_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        assert_ne!(encap_source_port(&out), port, "another flow, another port");
        assert_eq!(node.reason(Reason::ForwardEncapTx), 3);
        let stats = node.backend("mesh", 0);
        assert_eq!(
            (stats.new_flows, stats.packets, stats.bytes),
            (2, 3, (2 * syn.len() + ack.len()) as u64)
        );
    });
}

#[test]
fn vxlan_for_a_local_backend_is_decapsulated_sent_on_and_its_ingress_node_remembered() {
    with_node(|node| {
        let frame = Tunnel::from_n2().wrap(&syn_from_n2_for_a_local_backend());
        let (action, out) = node.xdp(&frame, Some(node.ifindex));
        assert_eq!(action, XDP_TX, "10.0.0.6 is out of the receiving interface");
        let expected = to_backend((node.mac, backend_mac(0)), 40000, BACKENDS[0], 62, "S");
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(node.reason(Reason::DecapTx), 1);
        let reply = tcp_key((BACKENDS[0], BACKEND_PORT), (CLIENT_IP, 40000));
        assert_eq!(node.tunnel_replies(), vec![(reply, N2_IP)]);
        assert_eq!(node.event(Event::FlowCreated), 0, "n2 balanced the flow");
    });
}

#[test]
fn reply_of_a_decapsulated_flow_is_encapsulated_back_to_its_ingress_node_by_tc() {
    with_node(|node| {
        let frame = Tunnel::from_n2().wrap(&syn_from_n2_for_a_local_backend());
        assert_eq!(node.xdp(&frame, Some(node.ifindex)).0, XDP_TX);
        // The backend's reply, as the kernel routes it towards the client.
        let reply = |port| {
            http_ok(
                (node.mac, CLIENT_MAC),
                (BACKENDS[0], BACKEND_PORT),
                port,
                63,
            )
        };
        let (action, out) = node.tc_on(&reply(40000), Some(node.ifindex));
        assert_eq!(
            action, TC_ACT_UNSPEC,
            "n2 is out of the same interface: the encapsulated reply leaves by it"
        );
        let port = encap_source_port(&out);
        // The reply whole, but for its MACs: the outer ones.
        let inner = http_ok((node.mac, N2_MAC), (BACKENDS[0], BACKEND_PORT), 40000, 63);
        assert_eq!(out, Tunnel::to_n2(port).wrap(&inner));
        assert_eq!(node.reason(Reason::ReplyEncap), 1);

        // A reply of no tunnelled flow leaves untouched.
        let other = reply(40001);
        assert_eq!(
            node.tc_on(&other, Some(node.ifindex)),
            (TC_ACT_UNSPEC, other)
        );
        assert_eq!(node.reason(Reason::ReplyEncap), 1);
    });
}

/// A fragmented datagram through the mesh, on the ingress node: the query's fragments are
/// DNATed and encapsulated to the backend's node, the later one with the first's outer source
/// port; the answer's fragments, coming back over the tunnel, are decapsulated, reverse-NATed
/// and sent to the client, byte for byte the fragments of the NATed datagram.
#[test]
fn a_fragmented_query_and_its_fragmented_answer_cross_the_mesh_on_the_ingress_node() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let query: Vec<u8> = (0..2000).map(|i| (i * 7) as u8).collect();
        let sent = udp(
            (CLIENT_MAC, INGRESS_MAC),
            (CLIENT_IP, 40600),
            (NODE_IP, MESH_DNS_PORT),
            64,
            &query,
        );
        let inner = udp(
            (node.mac, N2_MAC),
            (CLIENT_IP, 40600),
            (REMOTE_BACKEND, DNS_BACKEND_PORT),
            63,
            &query,
        );
        let expected = fragments(&inner, 0x2468, 1400);
        let [first, rest] = fragments(&sent, 0x2468, 1400);
        let (action, out) = node.xdp(&first, ingress);
        assert_eq!(action, XDP_TX);
        let port = encap_source_port(&out);
        assert_eq!(
            out,
            Tunnel::to_n2(port).wrap(&expected[0]),
            "first fragment"
        );
        let (action, out) = node.xdp(&rest, ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(out, Tunnel::to_n2(port).wrap(&expected[1]), "second");
        assert_eq!(node.reason(Reason::ForwardEncapTx), 2);

        let answer: Vec<u8> = (0..2500).map(|i| (i * 3) as u8).collect();
        let from_task = udp(
            (N2_MAC, INGRESS_MAC),
            (REMOTE_BACKEND, DNS_BACKEND_PORT),
            (CLIENT_IP, 40600),
            64,
            &answer,
        );
        let to_client = udp(
            (node.mac, CLIENT_MAC),
            (NODE_IP, MESH_DNS_PORT),
            (CLIENT_IP, 40600),
            63,
            &answer,
        );
        let expected = fragments(&to_client, 0x1357, 1400);
        for (i, fragment) in fragments(&from_task, 0x1357, 1400).iter().enumerate() {
            let (action, out) = node.xdp(&Tunnel::from_n2().wrap(fragment), ingress);
            assert_eq!(
                (action, &out),
                (XDP_TX, &expected[i]),
                "answer fragment {i}"
            );
        }
        assert_eq!(node.reason(Reason::ReplyTx), 2);
        let stats = node.backend("meshdns", 0);
        assert_eq!((stats.packets, stats.reply_packets), (2, 2));
        // A later fragment of a datagram whose first was never seen is dropped, not relayed.
        let stray = fragments(&from_task, 0x0bad, 1400)[1].clone();
        let (action, _) = node.xdp(&Tunnel::from_n2().wrap(&stray), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropVxlanNotLocalBackend), 1);
    });
}

/// A fragmented datagram through the mesh, on the backend's node: the query's fragments, which
/// n2 balanced to a backend here, are decapsulated and delivered, the first remembering n2 for
/// the replies; the answer's fragments, as the backend's kernel sends them, are encapsulated
/// back to n2 by TC, the later one with the first's outer source port.
#[test]
fn a_fragmented_query_and_its_fragmented_answer_cross_the_mesh_on_the_backends_node() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let query: Vec<u8> = (0..2000).map(|i| (i * 5) as u8).collect();
        let from_n2 = udp(
            (N2_MAC, INGRESS_MAC),
            (CLIENT_IP, 40700),
            (BACKENDS[0], DNS_BACKEND_PORT),
            63,
            &query,
        );
        let delivered = udp(
            (node.mac, backend_mac(0)),
            (CLIENT_IP, 40700),
            (BACKENDS[0], DNS_BACKEND_PORT),
            62,
            &query,
        );
        let expected = fragments(&delivered, 0x4242, 1400);
        for (i, fragment) in fragments(&from_n2, 0x4242, 1400).iter().enumerate() {
            let (action, out) = node.xdp(&Tunnel::from_n2().wrap(fragment), ingress);
            assert_eq!((action, &out), (XDP_TX, &expected[i]), "query fragment {i}");
        }
        assert_eq!(node.reason(Reason::DecapTx), 2);
        let mut reply_key = tcp_key((BACKENDS[0], DNS_BACKEND_PORT), (CLIENT_IP, 40700));
        reply_key.proto = PROTO_UDP;
        assert_eq!(node.tunnel_replies(), vec![(reply_key, N2_IP)]);

        let answer: Vec<u8> = (0..2500).map(|i| (i * 11) as u8).collect();
        let reply = udp(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], DNS_BACKEND_PORT),
            (CLIENT_IP, 40700),
            64,
            &answer,
        );
        let inner = udp(
            (node.mac, N2_MAC),
            (BACKENDS[0], DNS_BACKEND_PORT),
            (CLIENT_IP, 40700),
            64,
            &answer,
        );
        let [first, rest] = fragments(&reply, 0x5151, 1400);
        let expected = fragments(&inner, 0x5151, 1400);
        let (action, out) = node.tc_on(&first, Some(node.ifindex));
        assert_eq!(action, TC_ACT_UNSPEC, "n2 is out of the same interface");
        let port = encap_source_port(&out);
        assert_eq!(out, Tunnel::to_n2(port).wrap(&expected[0]), "first");
        let (action, out) = node.tc_on(&rest, Some(node.ifindex));
        assert_eq!(action, TC_ACT_UNSPEC);
        assert_eq!(out, Tunnel::to_n2(port).wrap(&expected[1]), "second");
        assert_eq!(node.reason(Reason::ReplyEncap), 2);
    });
}

/// A backend's UDP GSO reply (`UDP_SEGMENT`: QUIC servers send their datagrams so) to a flow
/// another node balanced keeps its segment size when encapsulated, so each segment must fit
/// the underlay once encapsulated: one that would not is dropped as too big for it
/// (`drop_encap_mtu`, not a routing failure). A test run cannot make a UDP GSO packet the
/// kernel would encapsulate (it leaves the GSO type unset): the mesh test of UDP GSO replies
/// checks the other side with a real one.
#[test]
fn a_udp_gso_reply_whose_segments_would_not_fit_once_encapsulated_is_dropped_as_too_big() {
    with_node(|node| {
        let query = udp(
            (N2_MAC, INGRESS_MAC),
            (CLIENT_IP, 40400),
            (BACKENDS[0], DNS_BACKEND_PORT),
            63,
            b"q",
        );
        let (action, _) = node.xdp(&Tunnel::from_n2().wrap(&query), Some(node.ifindex));
        assert_ne!(action, XDP_DROP, "delivered to the local backend");
        // One segment, encapsulated: outer 36, inner Ethernet 14, IPv4 20, UDP 8, payload.
        let too_big = UNDERLAY_MTU - 36 - 14 - 20 - 8 + 1;
        // Two segments' worth of payload behind one set of headers, as GSO hands it to TC (a
        // test run takes at most a page).
        let reply = udp(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], DNS_BACKEND_PORT),
            (CLIENT_IP, 40400),
            63,
            &vec![b'd'; 2 * too_big],
        );
        let (action, _) = node.tc_gso(&reply, node.ifindex, too_big as u32);
        assert_eq!(action, TC_ACT_SHOT);
        assert_eq!(node.reason(Reason::DropEncapMtu), 1);
        assert_eq!(node.reason(Reason::DropEncapNoRoute), 0);
        assert_eq!(node.reason(Reason::ReplyEncap), 0);
    });
}

/// A task's UDP reply (DF set, as Linux sends them) too big to encapsulate back to the node
/// its flow came from is answered with an ICMP "fragmentation needed" to the task (next-hop
/// MTU the underlay's less 50, from this node's underlay address, quoting the reply), redirected
/// to it; the task's kernel then fragments its later replies, whose fragments cross the tunnel.
/// The error carries a 4-byte IPv4 option whose sum balances the ICMP checksum: should the
/// kernel finish the checksum the reply left to it (CHECKSUM_PARTIAL, from the offset where the
/// UDP header was, into the field 6 bytes further), it writes the same checksum again.
/// Rate-limited as the client's errors; without DF the reply is dropped.
#[test]
fn a_tasks_udp_reply_too_big_to_encapsulate_is_answered_with_fragmentation_needed() {
    with_node(|node| {
        let query = udp(
            (N2_MAC, INGRESS_MAC),
            (CLIENT_IP, 40500),
            (BACKENDS[0], DNS_BACKEND_PORT),
            63,
            b"q",
        );
        let (action, _) = node.xdp(&Tunnel::from_n2().wrap(&query), Some(node.ifindex));
        assert_ne!(action, XDP_DROP, "delivered to the local backend");
        let overlay_mtu = UNDERLAY_MTU - VXLAN_OVERHEAD as usize;
        let reply = udp(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], DNS_BACKEND_PORT),
            (CLIENT_IP, 40500),
            64,
            &vec![b'r'; overlay_mtu - 28 + 1],
        );
        let (action, out) = node.tc_on(&reply, Some(node.ifindex));
        assert_eq!(action, TC_ACT_REDIRECT, "sent back to the task");
        assert_eq!(out.len(), 14 + 24 + 8 + 28);
        let mtu = (overlay_mtu as u16).to_be_bytes();
        let mut expected = [&backend_mac(0)[..], &node.mac, &[0x08, 0x00]].concat();
        expected.extend_from_slice(&[0x46, 0xc0, 0, 60, 0, 0, 0, 0, 64, 1, 0, 0]);
        expected.extend_from_slice(&NODE_IP);
        expected.extend_from_slice(&BACKENDS[0]);
        // The option: experiment 30 (ignored by receivers), length 4, two balancing bytes.
        expected.extend_from_slice(&[0x1e, 4, out[36], out[37]]);
        let mut icmp = vec![3, 4, 0, 0, 0, 0, mtu[0], mtu[1]];
        icmp.extend_from_slice(&reply[14..14 + 28]);
        let check = internet_checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        expected.extend_from_slice(&icmp);
        let ip_check = internet_checksum(&[&expected[14..38]]);
        expected[14 + 10..14 + 12].copy_from_slice(&ip_check.to_be_bytes());
        assert_eq!(out, expected);
        // The kernel finishing a checksum from offset 34 into offset 40 (summing all that
        // follows, the field's value as its seed) writes what is there.
        assert_eq!(
            internet_checksum(&[&out[34..]]).to_be_bytes(),
            [out[40], out[41]],
            "a checksum finished from the option on differs"
        );
        assert_eq!(node.reason(Reason::FragNeededSent), 1);
        for _ in 0..5 {
            assert_eq!(node.tc_on(&reply, Some(node.ifindex)).0, TC_ACT_REDIRECT);
        }
        assert_eq!(
            node.tc_on(&reply, Some(node.ifindex)).0,
            TC_ACT_SHOT,
            "rate-limited"
        );
        assert_eq!(node.reason(Reason::FragNeededSent), 6);
        assert_eq!(node.reason(Reason::DropEncapMtu), 1);
        // Without DF (the task lets routers fragment it): dropped.
        let mut no_df = reply.clone();
        no_df[14 + 6] = 0;
        no_df[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let check = internet_checksum(&[&no_df[14..34]]);
        no_df[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
        assert_eq!(node.tc_on(&no_df, Some(node.ifindex)).0, TC_ACT_SHOT);
        assert_eq!(node.reason(Reason::DropEncapMtu), 2);
        assert_eq!(node.reason(Reason::ReplyEncap), 0);

        // A reply the task fragmented at its own MTU (1500; fragments carry no DF): its first
        // fragment cannot be encapsulated and is dropped, and so is the rest, rather than let
        // out with the task's address onto the underlay.
        let big = udp(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], DNS_BACKEND_PORT),
            (CLIENT_IP, 40500),
            64,
            &vec![b'f'; 2000],
        );
        let [first, rest] = fragments(&big, 0x6161, 1480);
        assert_eq!(node.tc_on(&first, Some(node.ifindex)).0, TC_ACT_SHOT);
        assert_eq!(node.tc_on(&rest, Some(node.ifindex)).0, TC_ACT_SHOT);
        assert_eq!(node.reason(Reason::DropEncapMtu), 4);
        assert_eq!(node.reason(Reason::FragNeededSent), 6, "no DF: no error");
    });
}

/// A client that reuses a source port can reach one backend of this node through this node and
/// through another node in turn; the backend sees the same 5-tuple both times. Its replies must
/// follow the newest of those flows: reverse-NATed here after a flow this node balanced,
/// encapsulated back after one the other node balanced, in either order and again.
#[test]
fn replies_follow_the_newest_flow_when_a_client_port_reaches_a_local_backend_through_two_nodes() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let reply = http_ok(
            (node.mac, CLIENT_MAC),
            (BACKENDS[0], BACKEND_PORT),
            40000,
            63,
        );
        let nated = http_ok((node.mac, CLIENT_MAC), (NODE_IP, WEB_PORT), 40000, 63);
        // The client's `frame` reaches backend 0 through this node; replies are NATed here.
        let through_this_node = |node: &Node, frame: &[u8], what: &str| {
            let (action, out) = node.xdp(frame, ingress);
            assert_eq!(
                (action, dst_of(&out)),
                (XDP_TX, (BACKENDS[0], BACKEND_PORT)),
                "{what}"
            );
            assert_eq!(
                node.tc_on(&reply, ingress),
                (TC_ACT_UNSPEC, nated.clone()),
                "{what}: the reply must be NATed here"
            );
        };
        // n2 balanced the client's SYN to backend 0; replies go back to n2.
        let tunnelled = Tunnel::from_n2().wrap(&syn_from_n2_for_a_local_backend());
        let through_n2 = |node: &Node, what: &str| {
            assert_eq!(node.xdp(&tunnelled, ingress).0, XDP_TX, "{what}");
            let (action, out) = node.tc_on(&reply, ingress);
            assert_eq!(action, TC_ACT_UNSPEC, "{what}");
            assert_eq!(
                out.len(),
                reply.len() + VXLAN_OVERHEAD as usize,
                "{what}: the reply must be encapsulated back to n2"
            );
            let inner = http_ok((node.mac, N2_MAC), (BACKENDS[0], BACKEND_PORT), 40000, 63);
            assert_eq!(
                out,
                Tunnel::to_n2(encap_source_port(&out)).wrap(&inner),
                "{what}"
            );
        };
        // Backend 0 is this node's first turn.
        through_this_node(node, &client_syn(40000), "this node's flow");
        through_n2(node, "n2's flow");

        // The connection through this node ends; a new one from the same port comes back to
        // backend 0 once the other backends had their turns.
        assert_eq!(
            node.xdp(&client_tcp(40000, WEB_PORT, "FA"), ingress).0,
            XDP_TX
        );
        for port in [40001, 40002] {
            node.xdp(&client_syn(port), ingress);
        }
        through_this_node(node, &client_syn(40000), "this node's new flow");
        through_n2(node, "n2's flow again");

        // The flow through this node speaks again after an idle second or more: its reverse
        // entry comes back, and n2's next packet takes the replies back again.
        let key = tcp_key((CLIENT_IP, 40000), (NODE_IP, WEB_PORT));
        let mut flow = node.maps.flows.get(&key, 0).unwrap();
        // Two seconds back: the clock counts from boot, and this test runs minutes after it.
        flow.last_seen_ns = flow
            .last_seen_ns
            .checked_sub(2_000_000_000)
            .expect("the machine is up for more than two seconds");
        node.maps.flows.insert(key, flow, 0).unwrap();
        let ack = client_tcp(40000, WEB_PORT, "A");
        through_this_node(node, &ack, "this node's idle flow speaking");
        through_n2(node, "n2's flow once more");
        assert_eq!(node.reason(Reason::ReplyEgress), 3);
        assert_eq!(node.reason(Reason::ReplyEncap), 3);
    });
}

#[test]
fn reply_coming_back_over_vxlan_is_decapsulated_and_reverse_nated_to_the_client() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let (action, _) = node.xdp(&client_tcp(40000, MESH_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        let reply = http_ok(
            (N2_MAC, INGRESS_MAC),
            (REMOTE_BACKEND, BACKEND_PORT),
            40000,
            64,
        );
        // Another known node may not answer for the backend n2 hosts.
        let from_n3 = Tunnel {
            src: (N3_IP, N2_SOURCE_PORT),
            ..Tunnel::from_n2()
        };
        let (action, _) = node.xdp(&from_n3.wrap(&reply), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropVxlanWrongNode), 1);
        assert_eq!(node.reason(Reason::ReplyTx), 0);

        let (action, out) = node.xdp(&Tunnel::from_n2().wrap(&reply), ingress);
        assert_eq!(
            action, XDP_TX,
            "the client is out of the receiving interface"
        );
        let expected = http_ok((node.mac, CLIENT_MAC), (NODE_IP, MESH_PORT), 40000, 63);
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(node.reason(Reason::ReplyTx), 1);
        let stats = node.backend("mesh", 0);
        assert_eq!(
            (stats.reply_packets, stats.reply_bytes),
            (1, expected.len() as u64)
        );
        assert_eq!(
            node.tunnel_replies(),
            vec![],
            "a reply is no flow to remember"
        );
    });
}

/// A process on n2 (or a task n2 masquerades) connects to this node's published port, whose
/// task runs on n2: decapsulated there with n2's own address as its source, the packet would
/// be dropped as martian. So it goes with this node's address and a hairpin port as its source,
/// and the task's reply, coming back over the tunnel to them, goes to n2 from the service.
#[test]
fn a_client_on_the_backends_own_node_gets_this_nodes_address_through_the_mesh() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let syn = tcp(
            (N2_MAC, INGRESS_MAC),
            (N2_IP, 40000),
            (NODE_IP, MESH_PORT),
            64,
            "S",
            b"",
        );
        let (action, out) = node.xdp(&syn, ingress);
        assert_eq!(action, XDP_TX);
        let tunnel_port = encap_source_port(&out);
        let (source, port) = src_of(&out[VXLAN_OVERHEAD as usize..]);
        assert_eq!(source, NODE_IP, "this node's underlay address");
        assert_hairpin_port(port);
        let inner = tcp(
            (node.mac, N2_MAC),
            (NODE_IP, port),
            (REMOTE_BACKEND, BACKEND_PORT),
            63,
            "S",
            b"",
        );
        assert_eq!(out, Tunnel::to_n2(tunnel_port).wrap(&inner));

        let reply = tcp(
            (N2_MAC, INGRESS_MAC),
            (REMOTE_BACKEND, BACKEND_PORT),
            (NODE_IP, port),
            64,
            "PA",
            HTTP_OK,
        );
        let (action, out) = node.xdp(&Tunnel::from_n2().wrap(&reply), ingress);
        assert_eq!(action, XDP_TX);
        let expected = tcp(
            (node.mac, N2_MAC),
            (NODE_IP, MESH_PORT),
            (N2_IP, 40000),
            63,
            "PA",
            HTTP_OK,
        );
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(node.event(Event::FlowHairpin), 1);
        // Any other client keeps its address through the mesh.
        let (action, out) = node.xdp(&client_tcp(40001, MESH_PORT, "S"), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(src_of(&out[VXLAN_OVERHEAD as usize..]), (CLIENT_IP, 40001));
        assert_eq!(node.event(Event::FlowHairpin), 1);
    });
}

/// Which clients of a backend on another node are hairpin flows, by subnet: a task of this
/// node (the overlay subnet, which every node routes to its own bridge) is, and gets this
/// node's address; a client on the underlay's subnet (marked as such: every node routes it
/// alike) keeps its address, even when the backend is a host-network one on that subnet.
#[test]
fn a_client_on_a_remote_tasks_subnet_is_a_hairpin_flow_and_one_on_the_underlays_is_not() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let host_network = parse_backend_spec("192.168.100.11:8080@n2").unwrap();
        node.table
            .add_service("hostnet", Proto::Tcp, 8282, None, &[host_network])
            .unwrap();
        node.apply();
        let subnets = subnets(&["10.0.0.0/24", "192.168.100.0/24"]);
        let underlay = Some(Ipv4Addr::from(NODE_IP));
        assert_eq!(node.maps.sync_subnets(&subnets, underlay).unwrap(), 2);
        let syn = |src: [u8; 4], port| {
            tcp(
                (CLIENT_MAC, INGRESS_MAC),
                (src, 40000),
                (NODE_IP, port),
                64,
                "S",
                b"",
            )
        };
        // A task of this node, 10.0.0.9, calling the mesh service (10.0.0.20@n2).
        let (action, out) = node.xdp(&syn([10, 0, 0, 9], MESH_PORT), ingress);
        assert_eq!(action, XDP_TX);
        let (source, port) = src_of(&out[VXLAN_OVERHEAD as usize..]);
        assert_eq!(source, NODE_IP);
        assert_hairpin_port(port);
        // A client on the underlay, to a host-network backend on it.
        let (action, out) = node.xdp(&syn(CLIENT_IP, 8282), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(src_of(&out[VXLAN_OVERHEAD as usize..]), (CLIENT_IP, 40000));
        assert_eq!(
            dst_of(&out[VXLAN_OVERHEAD as usize..]),
            ([192, 168, 100, 11], 8080)
        );
        assert_eq!(node.event(Event::FlowHairpin), 1);
    });
}

/// A decapsulated packet is delivered only to a backend this node reaches itself (by address,
/// port and protocol), or reverse-NATed as a reply of a flow this node balanced: a reply whose
/// reverse entry was evicted is not sent to the client un-NATed, and a packet from a node for
/// any other destination is not relayed there. Dropped and counted, remembering nothing.
#[test]
fn decapsulated_packets_go_only_to_this_nodes_backends() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let n2 = Tunnel::from_n2();
        // A flow through this node to n2's backend, whose reverse entry is then evicted.
        let syn = client_tcp(40300, MESH_PORT, "S");
        assert_eq!(node.xdp(&syn, ingress).0, XDP_TX);
        let key = tcp_key((CLIENT_IP, 40300), (NODE_IP, MESH_PORT));
        let reverse = reverse_key(&key, REMOTE_BACKEND, BACKEND_PORT);
        node.maps.reverse_flows.remove(&reverse).unwrap();
        let orphan_reply = tcp(
            (N2_MAC, INGRESS_MAC),
            (REMOTE_BACKEND, BACKEND_PORT),
            (CLIENT_IP, 40300),
            63,
            "A",
            b"",
        );
        let not_a_backend = to_backend((N2_MAC, INGRESS_MAC), 40301, [10, 0, 0, 99], 63, "S");
        let udp_to_a_tcp_backend = udp(
            (N2_MAC, INGRESS_MAC),
            (CLIENT_IP, 40302),
            (BACKENDS[0], BACKEND_PORT),
            63,
            b"x",
        );
        let elsewhere = to_backend((N2_MAC, INGRESS_MAC), 40303, OTHER_IP, 63, "S");
        for (name, inner) in [
            ("a reply whose reverse entry was evicted", orphan_reply),
            ("a SYN to an address that is no backend", not_a_backend),
            ("UDP to a TCP backend's port", udp_to_a_tcp_backend),
            ("a SYN to another host of the underlay", elsewhere),
        ] {
            node.xdp_case(
                name,
                &n2.wrap(&inner),
                ingress,
                XDP_DROP,
                Reason::DropVxlanNotLocalBackend,
            );
        }
        assert_eq!(node.tunnel_replies(), vec![], "nothing remembered");
        // A backend of this node still gets its flows.
        let (action, _) = node.xdp(&n2.wrap(&syn_from_n2_for_a_local_backend()), ingress);
        assert_ne!(action, XDP_DROP);
        assert_eq!(node.tunnel_replies().len(), 1);
    });
}

#[test]
fn vxlan_that_is_not_this_nodes_to_decapsulate_is_dropped_or_passed_untouched() {
    with_node(|node| {
        let inner = syn_from_n2_for_a_local_backend();
        let ours = Tunnel::from_n2();
        let stranger = Tunnel {
            macs: (CLIENT_MAC, INGRESS_MAC),
            src: (OTHER_IP, N2_SOURCE_PORT),
            ..ours
        };
        let mut arp = vec![0u8; 42];
        arp[..6].copy_from_slice(&INGRESS_MAC);
        arp[6..12].copy_from_slice(&N2_MAC);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(N2_MAC, INGRESS_MAC)
            .ipv4(CLIENT_IP, BACKENDS[0], 63)
            .icmpv4_echo_request(1, 1)
            .write(&mut icmp, b"ping")
            .unwrap();
        let short_vxlan = udp(ours.macs, ours.src, ours.dst, 64, &[0x08, 0, 0, 0, 0, 0x10]);
        let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
            (
                "from an address that is no node",
                stranger.wrap(&inner),
                XDP_DROP,
                Reason::DropVxlanUnknownSource,
            ),
            (
                "I flag clear",
                Tunnel { flags: 0, ..ours }.wrap(&inner),
                XDP_DROP,
                Reason::DropVxlanBadFlags,
            ),
            (
                "every flag but I",
                Tunnel {
                    flags: 0xf7,
                    ..ours
                }
                .wrap(&inner),
                XDP_DROP,
                Reason::DropVxlanBadFlags,
            ),
            (
                "another VNI",
                Tunnel {
                    vni: DEFAULT_VNI + 1,
                    ..ours
                }
                .wrap(&inner),
                XDP_PASS,
                Reason::PassVxlanOtherVni,
            ),
            (
                // Docker's own overlay from a Swarm node lbctl does not know: the kernel's.
                "another VNI from an address that is no node",
                Tunnel {
                    vni: DEFAULT_VNI + 1,
                    ..stranger
                }
                .wrap(&inner),
                XDP_PASS,
                Reason::PassVxlanOtherVni,
            ),
            (
                "VXLAN header cut short",
                short_vxlan,
                XDP_DROP,
                Reason::DropVxlanMalformed,
            ),
            (
                "inner Ethernet header cut short",
                ours.wrap(&inner[..10]),
                XDP_DROP,
                Reason::DropVxlanMalformed,
            ),
            (
                "inner frame cut in its IPv4 header",
                ours.wrap(&inner[..24]),
                XDP_DROP,
                Reason::DropVxlanMalformed,
            ),
            (
                "inner frame cut in its TCP header",
                ours.wrap(&inner[..44]),
                XDP_DROP,
                Reason::DropVxlanMalformed,
            ),
            (
                "inner frame not IPv4",
                ours.wrap(&arp),
                XDP_DROP,
                Reason::DropVxlanMalformed,
            ),
            (
                "inner frame neither TCP nor UDP",
                ours.wrap(&icmp),
                XDP_DROP,
                Reason::DropVxlanMalformed,
            ),
            (
                "to another UDP port",
                Tunnel {
                    dst: (NODE_IP, DEFAULT_VXLAN_PORT + 1),
                    ..ours
                }
                .wrap(&inner),
                XDP_PASS,
                Reason::PassNotService,
            ),
            (
                "to another address of the node",
                Tunnel {
                    dst: ([10, 0, 0, 1], DEFAULT_VXLAN_PORT),
                    ..ours
                }
                .wrap(&inner),
                XDP_PASS,
                Reason::PassNotService,
            ),
        ];
        for (name, frame, action, reason) in cases {
            node.xdp_case(name, &frame, Some(node.ifindex), action, reason);
            assert_eq!(
                node.tunnel_replies(),
                vec![],
                "{name} must not be remembered"
            );
        }
        let decapsulated: u64 = [Reason::DecapTx, Reason::DecapRedirect, Reason::DecapStack]
            .iter()
            .map(|reason| node.reason(*reason))
            .sum();
        assert_eq!(decapsulated, 0);
    });
}

#[test]
fn a_packet_that_would_exceed_the_underlay_mtu_once_encapsulated_is_answered_or_dropped() {
    with_node(|node| {
        // The encapsulated packet's IPv4 length is the inner one plus VXLAN_OVERHEAD.
        let datagram = |port, outer_ip_len: usize| {
            let payload = vec![0x5a; outer_ip_len - VXLAN_OVERHEAD as usize - 20 - 8];
            let macs = (CLIENT_MAC, INGRESS_MAC);
            let frame = udp(
                macs,
                (CLIENT_IP, port),
                (NODE_IP, MESH_DNS_PORT),
                64,
                &payload,
            );
            (frame, payload)
        };
        let ingress = Some(node.ifindex);
        // Without DF (the client lets routers fragment it): dropped.
        let (mut too_big, _) = datagram(50000, UNDERLAY_MTU + 1);
        too_big[14 + 6] = 0;
        too_big[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let check = internet_checksum(&[&too_big[14..34]]);
        too_big[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
        let (action, _) = node.xdp(&too_big, ingress);
        assert_eq!(action, XDP_DROP, "never truncated, never fragmented");
        assert_eq!(node.reason(Reason::DropEncapMtu), 1);
        // With DF: answered with "fragmentation needed" from the address it was sent to, the
        // next-hop MTU the underlay's less the VXLAN overhead, quoting the datagram as sent.
        let (too_big, _) = datagram(50002, UNDERLAY_MTU + 1);
        let mtu = ((UNDERLAY_MTU - VXLAN_OVERHEAD as usize) as u16).to_be_bytes();
        let mut error = icmp_error(
            (INGRESS_MAC, CLIENT_MAC),
            (NODE_IP, CLIENT_IP, 64),
            (3, 4, [0, 0, mtu[0], mtu[1]]),
            &too_big[14..14 + 28],
        );
        // IP precedence "internetwork control", as the kernel's errors (and a new checksum).
        error[14 + 1] = 0xc0;
        error[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let check = internet_checksum(&[&error[14..34]]);
        error[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
        assert_eq!(node.xdp(&too_big, ingress), (XDP_TX, error));
        assert_eq!(node.reason(Reason::FragNeededSent), 1);
        // Rate-limited per client as the kernel's errors are: six at once, then dropped.
        for _ in 0..5 {
            assert_eq!(node.xdp(&too_big, ingress).0, XDP_TX);
        }
        assert_eq!(node.xdp(&too_big, ingress).0, XDP_DROP);
        assert_eq!(node.reason(Reason::FragNeededSent), 6);
        assert_eq!(node.reason(Reason::DropEncapMtu), 2);
        let stats = node.backend("meshdns", 0);
        assert_eq!(
            (stats.packets, stats.bytes),
            (0, 0),
            "a dropped packet is not the backend's traffic"
        );

        let (fits, payload) = datagram(50001, UNDERLAY_MTU);
        let (action, out) = node.xdp(&fits, ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(out.len(), 14 + UNDERLAY_MTU);
        let port = encap_source_port(&out);
        let inner = udp(
            (node.mac, N2_MAC),
            (CLIENT_IP, 50001),
            (REMOTE_BACKEND, DNS_BACKEND_PORT),
            63,
            &payload,
        );
        assert_eq!(out, Tunnel::to_n2(port).wrap(&inner));
        assert_eq!(node.reason(Reason::ForwardEncapTx), 1);
        assert_eq!(node.reason(Reason::DropEncapMtu), 2);
        let stats = node.backend("meshdns", 0);
        assert_eq!((stats.packets, stats.bytes), (1, fits.len() as u64));
    });
}

/// `frame` (Ethernet, IPv4 without options, TCP without options) with TCP `options` (a
/// multiple of 4 bytes) after its header: data offset, lengths and both checksums made right.
fn with_tcp_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut out = frame[..14 + 40].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[14 + 40..]);
    let ip_len = (out.len() - 14) as u16;
    out[14 + 2..14 + 4].copy_from_slice(&ip_len.to_be_bytes());
    out[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let check = internet_checksum(&[&out[14..34]]);
    out[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    out[34 + 12] = (((20 + options.len()) / 4) << 4) as u8;
    out[34 + 16..34 + 18].copy_from_slice(&[0, 0]);
    let tcp_len = ((out.len() - 34) as u16).to_be_bytes();
    let pseudo = [&out[26..34], &[0, 6], &tcp_len[..]].concat();
    let check = internet_checksum(&[&pseudo, &out[34..]]);
    out[34 + 16..34 + 18].copy_from_slice(&check.to_be_bytes());
    out
}

/// An MSS option of `mss`, in wire order.
fn mss_option(mss: u16) -> [u8; 4] {
    let [high, low] = mss.to_be_bytes();
    [2, 4, high, low]
}

/// A connection through the mesh announces at most what fits the tunnel: the client's SYN (in
/// XDP, on the ingress node) and the backend's SYN-ACK (in TC, on the backend's node) carry an
/// MSS of the underlay MTU less 90 (VXLAN 50, IPv4 and TCP 40), wherever the option sits among
/// the others, with the TCP checksum updated; a smaller MSS, and segments without SYN, are left
/// as they are.
#[test]
fn syns_through_the_mesh_announce_at_most_the_segment_that_fits_the_tunnel() {
    let limit = (UNDERLAY_MTU - VXLAN_OVERHEAD as usize - 40) as u16;
    const SACK_OK: [u8; 2] = [4, 2];
    // Kind 8, length 10, then the two 32-bit timestamps.
    const TIMESTAMPS: [u8; 10] = [8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
    // Linux's order: MSS first; an odd offset after one NOP (the value straddles two words of
    // the checksum); and after other options.
    type Options = fn(u16) -> Vec<u8>;
    let layouts: [(&str, Options); 3] = [
        ("first", |mss| {
            [&mss_option(mss)[..], &SACK_OK, &TIMESTAMPS, &[1, 3, 3, 7]].concat()
        }),
        ("after a NOP", |mss| {
            [&[1u8][..], &mss_option(mss), &[1, 1, 1]].concat()
        }),
        ("after timestamps", |mss| {
            [&[1u8, 1][..], &TIMESTAMPS, &mss_option(mss), &[1, 1, 4, 2]].concat()
        }),
    ];
    with_node(|node| {
        let ingress = Some(node.ifindex);
        for (i, (layout, options)) in layouts.iter().enumerate() {
            let port = 41000 + i as u16;
            let syn = with_tcp_options(&client_tcp(port, MESH_PORT, "S"), &options(1460));
            let (action, out) = node.xdp(&syn, ingress);
            assert_eq!(action, XDP_TX, "{layout}");
            let inner = to_backend((node.mac, N2_MAC), port, REMOTE_BACKEND, 63, "S");
            let expected = with_tcp_options(&inner, &options(limit));
            let source_port = encap_source_port(&out);
            assert_eq!(
                out,
                Tunnel::to_n2(source_port).wrap(&expected),
                "MSS {layout}"
            );
            assert_checksums_valid(&out[50..]);
        }
        // Already small enough: untouched (but for the DNAT).
        let syn = with_tcp_options(&client_tcp(41010, MESH_PORT, "S"), &mss_option(1200));
        let (_, out) = node.xdp(&syn, ingress);
        let inner = to_backend((node.mac, N2_MAC), 41010, REMOTE_BACKEND, 63, "S");
        let expected = with_tcp_options(&inner, &mss_option(1200));
        assert_eq!(out, Tunnel::to_n2(encap_source_port(&out)).wrap(&expected));
        // Not a SYN: an MSS option there means nothing and stays.
        let ack = with_tcp_options(&client_tcp(41010, MESH_PORT, "A"), &mss_option(1460));
        let (_, out) = node.xdp(&ack, ingress);
        let inner = to_backend((node.mac, N2_MAC), 41010, REMOTE_BACKEND, 63, "A");
        let expected = with_tcp_options(&inner, &mss_option(1460));
        assert_eq!(out, Tunnel::to_n2(encap_source_port(&out)).wrap(&expected));

        // The backend's SYN-ACK, encapsulated back to the ingress node by TC.
        let frame = Tunnel::from_n2().wrap(&syn_from_n2_for_a_local_backend());
        assert_eq!(node.xdp(&frame, ingress).0, XDP_TX);
        let syn_ack = |macs| {
            tcp(
                macs,
                (BACKENDS[0], BACKEND_PORT),
                (CLIENT_IP, 40000),
                63,
                "SA",
                b"",
            )
        };
        for (layout, options) in &layouts {
            let reply = with_tcp_options(&syn_ack((node.mac, CLIENT_MAC)), &options(1460));
            let (action, out) = node.tc_on(&reply, ingress);
            assert_eq!(action, TC_ACT_UNSPEC, "{layout}");
            let expected = with_tcp_options(&syn_ack((node.mac, N2_MAC)), &options(limit));
            assert_eq!(
                out,
                Tunnel::to_n2(encap_source_port(&out)).wrap(&expected),
                "MSS {layout}"
            );
            assert_checksums_valid(&out[50..]);
        }
    });
}

#[test]
fn without_this_node_in_the_node_table_nothing_is_encapsulated_or_decapsulated() {
    with_node(|node| {
        node.self_node = None;
        node.apply();
        let ingress = Some(node.ifindex);
        let (action, _) = node.xdp(&client_tcp(40000, MESH_PORT, "S"), ingress);
        assert_eq!(
            action, XDP_DROP,
            "there is no underlay address to send from"
        );
        assert_eq!(node.reason(Reason::DropMeshUnconfigured), 1);

        let frame = Tunnel::from_n2().wrap(&syn_from_n2_for_a_local_backend());
        let (action, out) = node.xdp(&frame, ingress);
        assert_eq!((action, out), (XDP_PASS, frame), "not overlay traffic");
        assert_eq!(node.reason(Reason::PassNotService), 1);
        assert_eq!(node.tunnel_replies(), vec![]);

        // Backends this node routes to are served as ever.
        let (action, _) = node.xdp(&client_syn(40001), ingress);
        assert_eq!(action, XDP_TX);
        assert_eq!(node.reason(Reason::ForwardTx), 1);
    });
}

/// `frame` with its IPv4 TTL set to `ttl` (the header checksum recomputed).
fn with_ttl(frame: &[u8], ttl: u8) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[14 + 8] = ttl;
    frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let check = internet_checksum(&[&frame[14..14 + 20]]);
    frame[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    frame
}

/// "Fragmentation needed" with a next-hop MTU of 1400, and "time exceeded".
const FRAG_NEEDED_1400: (u8, u8, [u8; 4]) = (3, 4, [0, 0, 0x05, 0x78]);
const TIME_EXCEEDED: (u8, u8, [u8; 4]) = (11, 0, [0; 4]);
/// A router between the node and the backends, and one before the client.
const BACKEND_SIDE_ROUTER: [u8; 4] = [10, 0, 0, 254];
const CLIENT_SIDE_ROUTER: [u8; 4] = [192, 168, 100, 254];

/// ICMP errors about a balanced flow reach the socket they are about, translated. About a
/// segment forwarded to the backend (from a router on its way, from the backend itself, or
/// made by the node's own stack and seen by TC on its way out): to the client, the quote's
/// destination (and the error's source when the backend sent it) what the client connected
/// to. About a reply the client got (from a router before the client, addressed to the
/// service): to the backend, the quote's source the backend. Exact frames: the checksums of the
/// error, of its quoted header and of a quoted UDP datagram are updated incrementally. Errors
/// about no flow pass untouched.
#[test]
fn icmp_errors_about_a_balanced_flow_reach_its_client_and_its_backend_translated() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let port = 49100;
        let (_, forwarded) = node.xdp(&client_syn(port), ingress);
        let (backend, _) = dst_of(&forwarded);
        let index = BACKENDS.iter().position(|b| *b == backend).unwrap();
        // The SYN as the client sent it, with the TTL the forwarded one has: the quote the
        // client's stack must find.
        let as_client_sent = with_ttl(&client_syn(port), 63);
        let quote = |frame: &[u8]| frame[14..14 + 28].to_vec();

        // From a router before the backend.
        let error = icmp_error(
            (backend_mac(index), node.mac),
            (BACKEND_SIDE_ROUTER, CLIENT_IP, 64),
            FRAG_NEEDED_1400,
            &quote(&forwarded),
        );
        let expected = icmp_error(
            (node.mac, CLIENT_MAC),
            (BACKEND_SIDE_ROUTER, CLIENT_IP, 63),
            FRAG_NEEDED_1400,
            &quote(&as_client_sent),
        );
        assert_eq!(node.xdp(&error, ingress), (XDP_TX, expected));
        assert_eq!(node.reason(Reason::IcmpToClient), 1);

        // From the backend itself: its address becomes the service's too.
        let error = icmp_error(
            (backend_mac(index), node.mac),
            (backend, CLIENT_IP, 64),
            TIME_EXCEEDED,
            &quote(&forwarded),
        );
        let expected = icmp_error(
            (node.mac, CLIENT_MAC),
            (NODE_IP, CLIENT_IP, 63),
            TIME_EXCEEDED,
            &quote(&as_client_sent),
        );
        assert_eq!(node.xdp(&error, ingress), (XDP_TX, expected));
        assert_eq!(node.reason(Reason::IcmpToClient), 2);

        // Made by the node's own stack (the forwarded segment too big for its next hop), seen
        // by TC on its way to the client: the whole segment quoted, TCP checksum included.
        let error = icmp_error(
            (node.mac, CLIENT_MAC),
            (NODE_IP, CLIENT_IP, 64),
            FRAG_NEEDED_1400,
            &forwarded[14..],
        );
        let expected = icmp_error(
            (node.mac, CLIENT_MAC),
            (NODE_IP, CLIENT_IP, 64),
            FRAG_NEEDED_1400,
            &as_client_sent[14..],
        );
        assert_eq!(node.tc_on(&error, ingress), (TC_ACT_UNSPEC, expected));
        assert_eq!(node.reason(Reason::IcmpEgress), 1);

        // About the reply the client got, from a router before the client: to the backend.
        let syn_ack = from_backend(node, backend, port, "SA");
        let (_, got) = node.xdp(&syn_ack, ingress);
        let error = icmp_error(
            (CLIENT_MAC, node.mac),
            (CLIENT_SIDE_ROUTER, NODE_IP, 64),
            TIME_EXCEEDED,
            &quote(&got),
        );
        let reply_as_sent = with_ttl(&syn_ack, got[14 + 8]);
        let expected = icmp_error(
            (node.mac, backend_mac(index)),
            (CLIENT_SIDE_ROUTER, backend, 63),
            TIME_EXCEEDED,
            &quote(&reply_as_sent),
        );
        assert_eq!(node.xdp(&error, ingress), (XDP_TX, expected));
        assert_eq!(node.reason(Reason::IcmpToBackend), 1);

        // A UDP exchange: the quoted datagram's checksum follows the NAT.
        let (_, query) = node.xdp(&client_query(49101), ingress);
        let (dns_backend, _) = dst_of(&query);
        let dns_index = BACKENDS.iter().position(|b| *b == dns_backend).unwrap();
        let error = icmp_error(
            (backend_mac(dns_index), node.mac),
            (BACKEND_SIDE_ROUTER, CLIENT_IP, 64),
            FRAG_NEEDED_1400,
            &query[14..],
        );
        let (action, out) = node.xdp(&error, ingress);
        assert_eq!(action, XDP_TX);
        let expected = icmp_error(
            (node.mac, CLIENT_MAC),
            (BACKEND_SIDE_ROUTER, CLIENT_IP, 63),
            FRAG_NEEDED_1400,
            &with_ttl(&client_query(49101), 63)[14..],
        );
        assert_eq!(out, expected);

        // About no flow: untouched, XDP and TC.
        let stranger = client_tcp(49102, WEB_PORT, "A");
        let error = icmp_error(
            (backend_mac(0), node.mac),
            (BACKEND_SIDE_ROUTER, CLIENT_IP, 64),
            FRAG_NEEDED_1400,
            &stranger[14..14 + 28],
        );
        assert_eq!(node.xdp(&error, ingress), (XDP_PASS, error.clone()));
        assert_eq!(node.tc_on(&error, ingress), (TC_ACT_UNSPEC, error.clone()));
        assert_eq!(node.reason(Reason::IcmpToClient), 3);
        assert_eq!(node.reason(Reason::IcmpEgress), 1);
    });
}

/// Through the mesh an ICMP error follows its flow: about a reply of a flow whose backend is on
/// n2, translated and encapsulated to n2; from n2 about a flow this node balanced, decapsulated,
/// translated and sent to the client; from a backend here about a flow n2 balanced, encapsulated
/// back to n2 by TC (n2 translates it).
#[test]
fn icmp_errors_follow_their_flow_through_the_mesh() {
    with_node(|node| {
        let ingress = Some(node.ifindex);
        let port = 49200;
        let (_, out) = node.xdp(&client_tcp(port, MESH_PORT, "S"), ingress);
        let tunnel_port = encap_source_port(&out);
        // n2's task answers; the reply comes back over VXLAN and goes to the client.
        let reply = tcp(
            (N2_MAC, INGRESS_MAC),
            (REMOTE_BACKEND, BACKEND_PORT),
            (CLIENT_IP, port),
            63,
            "SA",
            b"",
        );
        let (_, got) = node.xdp(&Tunnel::from_n2().wrap(&reply), ingress);
        let quote = |frame: &[u8]| frame[14..14 + 28].to_vec();
        let error = icmp_error(
            (CLIENT_MAC, node.mac),
            (CLIENT_SIDE_ROUTER, NODE_IP, 64),
            FRAG_NEEDED_1400,
            &quote(&got),
        );
        let inner = icmp_error(
            (node.mac, N2_MAC),
            (CLIENT_SIDE_ROUTER, REMOTE_BACKEND, 63),
            FRAG_NEEDED_1400,
            &quote(&with_ttl(&reply, got[14 + 8])),
        );
        assert_eq!(
            node.xdp(&error, ingress),
            (XDP_TX, Tunnel::to_n2(tunnel_port).wrap(&inner))
        );
        assert_eq!(node.reason(Reason::IcmpToBackend), 1);

        // From n2's task, about the segment n2 delivered to it: back here, to the client.
        let delivered = to_backend((N2_MAC, N2_MAC), port, REMOTE_BACKEND, 62, "A");
        let error = icmp_error(
            (N2_MAC, INGRESS_MAC),
            (REMOTE_BACKEND, CLIENT_IP, 63),
            FRAG_NEEDED_1400,
            &quote(&delivered),
        );
        let as_client_sent = with_ttl(&client_tcp(port, MESH_PORT, "A"), 62);
        let expected = icmp_error(
            (node.mac, CLIENT_MAC),
            (NODE_IP, CLIENT_IP, 62),
            FRAG_NEEDED_1400,
            &quote(&as_client_sent),
        );
        assert_eq!(
            node.xdp(&Tunnel::from_n2().wrap(&error), ingress),
            (XDP_TX, expected)
        );
        assert_eq!(node.reason(Reason::IcmpToClient), 1);
        // The same from n3, which does not host the flow's backend: dropped.
        let mut from_n3 = Tunnel::from_n2();
        from_n3.src.0 = N3_IP;
        let (action, _) = node.xdp(&from_n3.wrap(&error), ingress);
        assert_eq!(action, XDP_DROP);
        assert_eq!(node.reason(Reason::DropVxlanWrongNode), 1);

        // A flow n2 balanced to this node's backend: the backend's error, routed by the kernel
        // towards the client, goes back to n2 whole (but for its MACs).
        let from_n2 = Tunnel::from_n2().wrap(&syn_from_n2_for_a_local_backend());
        assert_eq!(node.xdp(&from_n2, ingress).0, XDP_TX);
        let delivered = to_backend((node.mac, backend_mac(0)), 40000, BACKENDS[0], 62, "S");
        let error = |macs| {
            icmp_error(
                macs,
                (BACKENDS[0], CLIENT_IP, 63),
                (3, 3, [0; 4]),
                &quote(&delivered),
            )
        };
        let (action, out) = node.tc_on(&error((node.mac, CLIENT_MAC)), ingress);
        assert_eq!(action, TC_ACT_UNSPEC);
        let port = encap_source_port(&out);
        assert_eq!(out, Tunnel::to_n2(port).wrap(&error((node.mac, N2_MAC))));
        assert_eq!(node.reason(Reason::IcmpEncap), 1);

        // Translated by n2 for this node's backend (about the reply as the client got it from
        // n2): decapsulated and delivered.
        let reply_quote = tcp(
            (backend_mac(0), N2_MAC),
            (BACKENDS[0], BACKEND_PORT),
            (CLIENT_IP, 40000),
            63,
            "SA",
            b"",
        );
        let for_backend = icmp_error(
            (N2_MAC, INGRESS_MAC),
            (CLIENT_SIDE_ROUTER, BACKENDS[0], 63),
            FRAG_NEEDED_1400,
            &quote(&reply_quote),
        );
        let (action, out) = node.xdp(&Tunnel::from_n2().wrap(&for_backend), ingress);
        assert_eq!(action, XDP_TX);
        let expected = icmp_error(
            (node.mac, backend_mac(0)),
            (CLIENT_SIDE_ROUTER, BACKENDS[0], 62),
            FRAG_NEEDED_1400,
            &quote(&reply_quote),
        );
        assert_eq!(out, expected);
        assert_eq!(node.reason(Reason::IcmpToBackend), 2);
    });
}
