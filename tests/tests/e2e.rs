//! End to end: a client namespace, a node namespace whose uplink has lbctl attached, and
//! backend namespaces running HTTP/UDP test servers that report the client address they saw.
//! Traffic is real TCP and UDP through the attached XDP and TC programs.
use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use lb_tests::{
    Lbctl,
    client::{self, KeepAlive, Reply, http_get_new_connection, per_backend},
    netns,
    topology::{NODE_UPLINK, SingleNode, SingleNodeSpec, TASK_BRIDGE},
};

/// Requests on the kept-alive connection (and new connections beside them) of the long-lived
/// connection test.
const KEPT_REQUESTS: usize = 25;

/// Builds the topology, attaches lbctl to the node's uplink and publishes `service_port` over
/// every backend's HTTP port.
fn balanced(spec: SingleNodeSpec, service_port: u16) -> (SingleNode, Lbctl) {
    balanced_proto(spec, "tcp", service_port)
}

/// As `balanced`, for `proto` ("tcp": the backends' HTTP ports, "udp": their UDP ports).
fn balanced_proto(spec: SingleNodeSpec, proto: &str, service_port: u16) -> (SingleNode, Lbctl) {
    lb_tests::require_root().unwrap();
    let topo = SingleNode::build(spec).unwrap();
    let lbctl = Lbctl::new(topo.node()).unwrap();
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    let backends: Vec<String> = (0..topo.backend_count())
        .map(|i| match proto {
            "udp" => topo.backend_udp_addr(i).to_string(),
            _ => topo.backend_addr(i).to_string(),
        })
        .collect();
    let port = service_port.to_string();
    let mut args = vec!["service", "add", "web", port.as_str(), "--proto", proto];
    args.extend(backends.iter().map(String::as_str));
    lbctl.run(&args).unwrap();
    (topo, lbctl)
}

fn service_addr(topo: &SingleNode, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(topo.node_uplink_ip(), port)
}

/// `count` requests, each on a new connection, from the client.
fn new_connections(topo: &SingleNode, port: u16, count: usize) -> Vec<Reply> {
    let addr = service_addr(topo, port);
    topo.client()
        .in_netns(|| client::new_connections(addr, count))
        .unwrap()
}

/// Every backend answered exactly `per` of the replies, and each saw the client's real IP.
fn assert_each_backend_served(topo: &SingleNode, replies: &[Reply], per: usize) {
    let expected: BTreeMap<String, usize> = (0..topo.backend_count())
        .map(|i| (topo.backend_name(i), per))
        .collect();
    assert_eq!(per_backend(replies), expected);
    for reply in replies {
        assert_eq!(
            *reply.client_seen.ip(),
            topo.client_ip(),
            "no SNAT: {reply:?}"
        );
    }
}

fn stats_json(lbctl: &Lbctl) -> serde_json::Value {
    serde_json::from_str(&lbctl.run(&["stats", "--json"]).unwrap()).unwrap()
}

/// The packets the node's netfilter forward hook saw towards `backends` (an nftables counter
/// the test put there).
fn forwarded_by_the_kernel(topo: &SingleNode) -> u64 {
    let out = topo
        .node()
        .exec([
            "nft",
            "-j",
            "list",
            "counter",
            "ip",
            "e2e_seen",
            "to_backends",
        ])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listed["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|item| item["counter"]["packets"].as_u64())
        .unwrap()
}

/// A backend container replaced behind the node's bridge, Docker's way (a new veth, the same
/// address and MAC), with no lbctl command and no daemon after it: the data plane sees the old
/// port gone at once (the kernel takes it out of `PEER_PORTS`) and sends the backend's packets
/// through the kernel, which finds the new port; the next command sends them into it again.
#[test]
fn a_backend_replaced_behind_the_bridge_is_served_without_a_command() {
    let spec = SingleNodeSpec {
        backends: 2,
        ..SingleNodeSpec::default()
    };
    let (topo, lbctl) = balanced(spec, 8080);
    assert_each_backend_served(&topo, &new_connections(&topo, 8080, 4), 2);
    let peer_sent = |lbctl: &Lbctl| {
        stats_json(lbctl)["reasons"]["xmit_peer"]["packets"]
            .as_u64()
            .unwrap()
    };
    assert!(peer_sent(&lbctl) > 0);

    // Backend 0's veth is replaced: the server in its namespace goes on listening.
    let (node, backend) = (topo.node(), topo.backend_ns(0));
    let mac = backend.mac("eth0").unwrap();
    let addr = topo.backend_addr(0);
    node.ip(["link", "del", "vb0"]).unwrap();
    netns::veth(backend, "eth0", node, "vb0").unwrap();
    let mac_text = netns::format_mac(mac);
    backend
        .ip(["link", "set", "eth0", "address", &mac_text])
        .unwrap();
    node.ip(["link", "set", "vb0", "master", TASK_BRIDGE])
        .unwrap();
    node.disable_tx_offload("vb0").unwrap();
    backend
        .ip(["addr", "add", &format!("{}/24", addr.ip()), "dev", "eth0"])
        .unwrap();
    let gateway = format!(
        "{}",
        std::net::Ipv4Addr::from(u32::from(*addr.ip()) & !0xff | 1)
    );
    backend
        .ip(["route", "add", "default", "via", &gateway])
        .unwrap();

    // No command since: every connection is served, backend 0's through the kernel.
    let before = stats_json(&lbctl);
    assert_each_backend_served(&topo, &new_connections(&topo, 8080, 10), 5);
    let after = stats_json(&lbctl);
    let moved = |reason: &str| {
        after["reasons"][reason]["packets"].as_u64().unwrap()
            - before["reasons"][reason]["packets"].as_u64().unwrap()
    };
    assert!(moved("forward_stack") >= 3 * 5, "{}", after["reasons"]);

    // The next command reads the bridge again: into the new port, once the route cache has let
    // its answer for backend 0 go (25 ticks: 100 ms at HZ=250, 250 ms at HZ=100).
    lbctl
        .run(&["service", "set", "web", "--scheduler", "rr"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = peer_sent(&lbctl);
    assert_each_backend_served(&topo, &new_connections(&topo, 8080, 10), 5);
    assert!(peer_sent(&lbctl) - before >= 3 * 10);
}

#[test]
fn connections_rotate_evenly_and_backends_see_the_client_ip() {
    let (topo, lbctl) = balanced(SingleNodeSpec::default(), 8080);
    // Counts what the node's own forwarding path (netfilter's forward hook) carries to the
    // backends' subnet.
    let subnet = format!("{}/24", topo.backend_addr(0).ip());
    let rules = format!(
        "table ip e2e_seen {{ counter to_backends {{ }} ; chain forward {{ type filter hook \
         forward priority 0 ; policy accept ; ip daddr {subnet} counter name to_backends ; }} ; }}"
    );
    let out = topo.node().exec(["nft", &rules]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let per = 10;
    let replies = new_connections(&topo, 8080, per * topo.backend_count());
    assert_each_backend_served(&topo, &replies, per);
    // The counters agree with what the backends saw.
    // Each connection's packets took the path: at least its SYN, request and FIN to the
    // backend (sent by TC straight into the backend's namespace, its veth's other end: the
    // backends are behind the node's bridge), and its SYN-ACK and response back (reverse-NATed
    // by TC); how many ACKs ride along varies.
    let stats = stats_json(&lbctl);
    let connections = (per * topo.backend_count()) as u64;
    for backend in stats["services"][0]["backends"].as_array().unwrap() {
        assert_eq!(backend["new_flows"], per, "{backend}");
        let replies = backend["reply_packets"].as_u64().unwrap();
        assert!(replies >= 2 * per as u64, "{backend}");
    }
    let packets = |reason: &str| stats["reasons"][reason]["packets"].as_u64().unwrap();
    // Only a backend's first packet may have gone through the kernel, sent before the node
    // had resolved its address; every other went past the node's bridge, netfilter and
    // routing.
    let backends = topo.backend_count() as u64;
    assert!(
        packets("forward_redirect") + packets("forward_stack") >= 3 * connections
            && packets("forward_stack") <= backends
            && packets("xmit_peer") == packets("forward_redirect"),
        "{}",
        stats["reasons"]
    );
    assert_eq!(forwarded_by_the_kernel(&topo), packets("forward_stack"));
    assert!(
        packets("reply_egress") >= 2 * connections,
        "{}",
        stats["reasons"]
    );
}

#[test]
fn other_subnets_ports_and_backend_counts_work_too() {
    let spec = SingleNodeSpec {
        backends: 5,
        uplink_subnet: [172, 20, 9],
        task_subnet: [10, 77, 3],
        http_port: 8000,
        udp_port: 9053,
    };
    let (topo, _lbctl) = balanced(spec, 443);
    let replies = new_connections(&topo, 443, 15);
    assert_each_backend_served(&topo, &replies, 3);
}

#[test]
fn a_long_lived_connection_stays_on_its_backend_while_new_ones_rotate() {
    let (topo, _lbctl) = balanced(SingleNodeSpec::default(), 8080);
    let addr = service_addr(&topo, 8080);
    let (kept, rotated) = topo.client().in_netns(|| {
        let mut conn = KeepAlive::connect(addr).unwrap();
        let mut kept = Vec::new();
        let mut rotated = Vec::new();
        // A count, not a time: a loaded machine makes fewer requests in a given time.
        for _ in 0..KEPT_REQUESTS {
            kept.push(conn.get().unwrap());
            rotated.push(http_get_new_connection(addr).unwrap());
            std::thread::sleep(Duration::from_millis(100));
        }
        (kept, rotated)
    });
    assert_eq!(kept.len(), KEPT_REQUESTS);
    let first = &kept[0];
    for reply in &kept {
        assert_eq!(reply.backend, first.backend, "the kept connection moved");
        assert_eq!(reply.client_seen, first.client_seen);
    }
    let counts = per_backend(&rotated);
    assert_eq!(
        counts.len(),
        topo.backend_count(),
        "new connections rotate: {counts:?}"
    );
}

#[test]
fn removed_backends_and_services_get_no_new_connections() {
    let (topo, lbctl) = balanced(SingleNodeSpec::default(), 8080);
    let removed = topo.backend_addr(1).to_string();
    lbctl.run(&["backend", "rm", "web", &removed]).unwrap();
    let replies = new_connections(&topo, 8080, 12);
    let counts = per_backend(&replies);
    assert_eq!(counts.get(&topo.backend_name(1)), None, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 12);
    assert_eq!(counts.len(), topo.backend_count() - 1, "{counts:?}");

    // It comes back at the end of the rotation when added again.
    lbctl.run(&["backend", "add", "web", &removed]).unwrap();
    let counts = per_backend(&new_connections(&topo, 8080, 9));
    assert_eq!(counts.get(&topo.backend_name(1)), Some(&3), "{counts:?}");

    lbctl.run(&["service", "rm", "web"]).unwrap();
    let addr = service_addr(&topo, 8080);
    let result = topo.client().in_netns(|| http_get_new_connection(addr));
    client::assert_refused(result, "port 8080 is no longer balanced");
}

#[test]
fn a_udp_service_answers_through_the_balancer() {
    let spec = SingleNodeSpec::default();
    let udp_port = spec.udp_port;
    let (topo, _lbctl) = balanced_proto(spec, "udp", 53);
    assert_ne!(udp_port, 53);
    let addr = service_addr(&topo, 53);
    // udp_requests checks that the answers come from the address it asked.
    let replies = topo
        .client()
        .in_netns(|| client::udp_requests(addr, 6))
        .unwrap();
    assert_each_backend_served(&topo, &replies, 2);
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    lb_tests::require_root().unwrap();
    let topo = SingleNode::build(SingleNodeSpec {
        backends: 2,
        ..Default::default()
    })
    .unwrap();
    let lbctl = Lbctl::new(topo.node()).unwrap();
    let b0 = topo.backend_addr(0).to_string();
    let b1 = topo.backend_addr(1).to_string();

    let err = lbctl
        .run_expect_fail(&["service", "add", "web", "8080", &b0])
        .unwrap();
    assert!(err.contains("lbctl attach"), "{err}");
    let err = lbctl.run_expect_fail(&["attach", "nosuch0"]).unwrap();
    assert!(err.contains("nosuch0"), "{err}");

    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    lbctl.run(&["service", "add", "web", "8080", &b0]).unwrap();
    let before = lbctl.run(&["service", "ls", "--json"]).unwrap();
    // Exit 2 for a malformed argument (the parser's), 1 for a refused change.
    let refused: [(&[&str], &str, i32); 10] = [
        (&["service", "add", "api", "0", &b1], "'0'", 2),
        (&["service", "add", "api", "65536", &b1], "'65536'", 2),
        (
            &["service", "add", "api", "9090", "10.0.0.300:80"],
            "10.0.0.300:80",
            2,
        ),
        (
            &["service", "add", "api", "9090", "10.0.0.7"],
            "10.0.0.7",
            2,
        ),
        (&["service", "add", "web", "9090", &b1], "'web'", 1),
        (&["service", "add", "api", "8080", &b1], "8080", 1),
        (&["service", "rm", "nosuch"], "nosuch", 1),
        (&["backend", "add", "nosuch", &b1], "nosuch", 1),
        (&["backend", "rm", "web", &b1], &b1, 1),
        (&["backend", "add", "web", &b0], &b0, 1),
    ];
    for (args, named, code) in refused {
        let err = lbctl.run_expect_exit(args, code).unwrap();
        assert!(
            err.contains(named),
            "{args:?}: error does not name {named}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert_eq!(
            lbctl.run(&["service", "ls", "--json"]).unwrap(),
            before,
            "{args:?} changed state"
        );
    }

    // The table survives detach and re-attach, and still balances.
    lbctl.run(&["detach", NODE_UPLINK]).unwrap();
    let err = lbctl.run_expect_fail(&["detach", NODE_UPLINK]).unwrap();
    assert!(err.contains("not attached"), "{err}");
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    assert_eq!(lbctl.run(&["service", "ls", "--json"]).unwrap(), before);
    let replies = new_connections(&topo, 8080, 2);
    assert!(replies.iter().all(|r| r.backend == topo.backend_name(0)));
}

/// UDP datagrams larger than the MTU cross the balancer as fragments, both ways: a 3,000-byte
/// query, fragmented by the client's kernel, is DNATed fragment by fragment and reassembled
/// whole by the backend's; its 3,000-byte answer, fragmented by the backend's kernel, is
/// reverse-NATed fragment by fragment and reassembled by the client's, from the address the
/// client asked.
#[test]
fn datagrams_larger_than_the_mtu_cross_as_fragments_both_ways() {
    const SIZE: usize = 3000;
    lb_tests::require_root().unwrap();
    let spec = SingleNodeSpec {
        backends: 1,
        ..SingleNodeSpec::default()
    };
    let topo = SingleNode::build(spec).unwrap();
    let lbctl = Lbctl::new(topo.node()).unwrap();
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    let server = topo
        .backend_ns(0)
        .in_netns(|| std::net::UdpSocket::bind("0.0.0.0:7777"))
        .unwrap();
    let backend = SocketAddrV4::new(*topo.backend_addr(0).ip(), 7777);
    lbctl
        .run(&[
            "service",
            "add",
            "big",
            "7000",
            "--proto",
            "udp",
            &backend.to_string(),
        ])
        .unwrap();
    let answering = client::answer_once_plus_one(server, 2 * SIZE);
    let service = SocketAddrV4::new(topo.node_uplink_ip(), 7000);
    let query: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let (answer, from) = topo
        .client()
        .in_netns(|| client::udp_query(service, &query, 2 * SIZE))
        .expect("the answer arrives");
    let (got, client) = answering.join().unwrap();
    assert_eq!(got, SIZE, "the backend got the query whole");
    assert_eq!(
        client.ip(),
        std::net::IpAddr::V4(topo.client_ip()),
        "client IP kept"
    );
    assert_eq!(
        from,
        std::net::SocketAddr::V4(service),
        "answered from the service"
    );
    let expected: Vec<u8> = query.iter().map(|b| b.wrapping_add(1)).collect();
    assert_eq!(answer, expected);
}
