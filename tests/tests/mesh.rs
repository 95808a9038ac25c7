//! End to end across nodes: the routing mesh. An underlay segment joins a client and several
//! node namespaces; each node runs lbctl on its uplink with the same service table and hosts
//! some task namespaces (or none). A client may connect to the published port of any node and
//! reach every task, wherever it runs, through VXLAN done by the XDP and TC programs.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use lb_tests::{
    Lbctl,
    client::{self, KeepAlive, Reply, http_get_new_connection},
    mesh::{HOST_IF, Mesh, MeshSpec},
    netns::NetNs,
    topology::NODE_UPLINK,
};

/// The published ports of the test services.
const WEB_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;

/// A mesh with lbctl attached on every node and the same table everywhere. Fields drop in
/// order: the lbctl instances are purged while their namespaces still exist.
struct Cluster {
    lbctl: Vec<Lbctl>,
    mesh: Mesh,
}

/// `IP:PORT@NODE` of every task, for `service add`.
fn task_backends(mesh: &Mesh, udp: bool) -> Vec<String> {
    (0..mesh.task_count())
        .map(|k| mesh.task_backend(k, udp))
        .collect()
}

impl Cluster {
    fn build(spec: MeshSpec) -> Cluster {
        Cluster::build_attached(spec, &[])
    }

    /// [`Cluster::build`] with `attach_args` after `attach IFACE` on every node.
    fn build_attached(spec: MeshSpec, attach_args: &[&str]) -> Cluster {
        lb_tests::require_root().unwrap();
        let mesh = Mesh::build(spec).unwrap();
        let web = task_backends(&mesh, false);
        let dns = task_backends(&mesh, true);
        let mut lbctl = Vec::new();
        for i in 0..mesh.node_count() {
            let node = Lbctl::new(mesh.node(i)).unwrap();
            node.run(&[&["attach", NODE_UPLINK], attach_args].concat())
                .unwrap();
            for j in 0..mesh.node_count() {
                let ip = mesh.node_ip(j).to_string();
                node.run(&["node", "add", &mesh.node_name(j), &ip]).unwrap();
            }
            for (name, port, proto, backends) in [
                ("web", WEB_PORT, "tcp", &web),
                ("dns", DNS_PORT, "udp", &dns),
            ] {
                let port = port.to_string();
                let mut args = vec!["service", "add", name, &port, "--proto", proto];
                args.extend(backends.iter().map(String::as_str));
                node.run(&args).unwrap();
            }
            lbctl.push(node);
        }
        Cluster { lbctl, mesh }
    }

    fn on_every_node(&self, args: &[&str]) {
        for lbctl in &self.lbctl {
            lbctl.run(args).unwrap();
        }
    }

    /// Adds UDP service `name` on port `published` of every node, whose one backend is port
    /// `task_port` of n1's first task; returns that task.
    fn udp_service_on_a_task(&self, name: &str, published: u16, task_port: u16) -> usize {
        let task = self.mesh.tasks_on(0).start;
        let backend = format!(
            "{}:{task_port}@{}",
            self.mesh.task_ip(task),
            self.mesh.node_name(0)
        );
        let published = published.to_string();
        self.on_every_node(&[
            "service", "add", name, &published, "--proto", "udp", &backend,
        ]);
        task
    }

    /// Adds a TCP and a UDP service on [`VIP`]:[`VIP_PORT`] of every node, over every task.
    fn vip_services(&self) {
        let vip = VIP.to_string();
        let vip_port = VIP_PORT.to_string();
        for (name, proto, udp) in [("vip-web", "tcp", false), ("vip-dns", "udp", true)] {
            let mut args = vec![
                "service", "add", name, &vip_port, "--proto", proto, "--vip", &vip,
            ];
            let backends = task_backends(&self.mesh, udp);
            args.extend(backends.iter().map(String::as_str));
            self.on_every_node(&args);
        }
    }

    fn addr(&self, node: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.mesh.node_ip(node), port)
    }

    /// `count` HTTP requests to `node`'s published port, each on a new connection.
    fn new_connections(&self, node: usize, count: usize) -> Vec<Reply> {
        self.mesh.new_connections(node, WEB_PORT, count).unwrap()
    }

    fn reason(&self, node: usize, reason: &str) -> u64 {
        self.lbctl[node].reason_packets(reason).unwrap()
    }

    /// `count` new TCP connections to `node`'s web port, then `count` datagrams to its DNS
    /// port, from namespace `from`.
    fn tcp_and_udp_from(&self, from: &NetNs, node: usize, count: usize) -> Vec<Reply> {
        let (tcp, udp) = (self.addr(node, WEB_PORT), self.addr(node, DNS_PORT));
        from.in_netns(|| {
            let mut replies = client::new_connections(tcp, count)?;
            replies.extend(client::udp_requests(udp, count)?);
            anyhow::Ok(replies)
        })
        .unwrap()
    }

    /// Every task of the cluster answered exactly `per` of `replies`.
    fn assert_each_task_answered(&self, replies: &[Reply], per: usize, context: &str) {
        let expected: BTreeMap<String, usize> = (0..self.mesh.task_count())
            .map(|k| (self.mesh.task_name(k), per))
            .collect();
        assert_eq!(client::per_backend(replies), expected, "{context}");
    }

    /// Every task in `tasks` answered exactly `per` of `replies`, no other task did, and
    /// every task saw the client's own address.
    fn assert_spread(&self, replies: &[Reply], tasks: &[usize], per: usize, context: &str) {
        for reply in replies {
            assert_eq!(
                *reply.client_seen.ip(),
                self.mesh.client_ip(),
                "{context}: the task must see the client's real IP: {reply:?}"
            );
        }
        let expected: BTreeMap<String, usize> = tasks
            .iter()
            .map(|&k| (self.mesh.task_name(k), per))
            .collect();
        assert_eq!(client::per_backend(replies), expected, "{context}");
    }
}

fn all_tasks(mesh: &Mesh) -> Vec<usize> {
    (0..mesh.task_count()).collect()
}

/// How the frames a node's XDP sends back out of its uplink (encapsulated to another node, or
/// a decapsulated reply to the client) leave it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sent {
    /// Handed to TC, which sends them (a veth whose far end runs no XDP program).
    ThroughTc,
    /// By XDP_TX itself (the far end runs XDP).
    ByXdp,
}

/// Every node, with tasks or without, spreads its new connections exactly evenly over every
/// task of the cluster; the replies come back from the address the client connected to (a
/// TCP reply from anywhere else would never reach the client's socket).
fn spreads_evenly(spec: MeshSpec) {
    spreads_evenly_attached(spec, &[], Sent::ThroughTc);
}

/// [`spreads_evenly`] with `attach_args`, the frames XDP sends leaving as `sent` says.
fn spreads_evenly_attached(spec: MeshSpec, attach_args: &[&str], sent: Sent) {
    let cluster = Cluster::build_attached(spec, attach_args);
    let tasks = all_tasks(&cluster.mesh);
    let per = 10;
    for node in 0..cluster.mesh.node_count() {
        let replies = cluster.new_connections(node, per * tasks.len());
        let context = format!("requests to {}", cluster.mesh.node_name(node));
        cluster.assert_spread(&replies, &tasks, per, &context);
    }
    for node in 0..cluster.mesh.node_count() {
        let name = cluster.mesh.node_name(node);
        let remote_tasks = tasks
            .iter()
            .filter(|&&k| cluster.mesh.task_node(k) != node)
            .count();
        let local_tasks = tasks.len() - remote_tasks;
        // Remote tasks' flows leave encapsulated; their replies come back encapsulated and are
        // reverse-NATed in XDP. Tasks of this node (behind its bridge) get the flows other
        // nodes balanced, sent by TC into each task's namespace (a task's first packet may go
        // through the kernel, before the node resolved its address), and their replies go
        // back encapsulated by TC.
        assert_eq!(
            cluster.reason(node, "forward_encap_tx") > 0,
            remote_tasks > 0,
            "{name}"
        );
        let decapsulated = cluster.reason(node, "decap_redirect");
        assert_eq!(decapsulated > 0, local_tasks > 0, "{name}");
        // The flows this node balanced to its own tasks went into their namespaces too.
        assert_eq!(
            cluster.reason(node, "xmit_peer"),
            decapsulated + cluster.reason(node, "forward_redirect"),
            "{name}"
        );
        assert_eq!(
            cluster.reason(node, "reply_encap") > 0,
            local_tasks > 0,
            "{name}"
        );
        for reason in [
            "drop_vxlan_unknown_source",
            "drop_encap_mtu",
            "drop_encap_no_neigh",
        ] {
            assert_eq!(cluster.reason(node, reason), 0, "{name}: {reason}");
        }
        // Every frame XDP sent out (encapsulated flows, decapsulated replies) went through TC,
        // or none did.
        let xdp_sent = cluster.reason(node, "forward_encap_tx") + cluster.reason(node, "reply_tx");
        let through_tc = cluster.reason(node, "xmit_tc");
        match sent {
            Sent::ThroughTc => assert_eq!(through_tc, xdp_sent, "{name}: xmit_tc"),
            Sent::ByXdp => assert_eq!(through_tc, 0, "{name}: xmit_tc"),
        }
    }
}

#[test]
fn every_node_spreads_new_connections_evenly_over_every_task_with_the_client_ip() {
    spreads_evenly(MeshSpec::default());
}

#[test]
fn other_node_counts_subnets_and_task_placements_spread_evenly_too() {
    spreads_evenly(MeshSpec {
        nodes: 4,
        tasks_per_node: vec![0, 3, 1, 2],
        underlay_subnet: [172, 31, 7],
        overlay_subnet: [10, 88, 0],
        http_port: 8000,
        udp_port: 9053,
        ..MeshSpec::default()
    });
}

/// In generic mode (the kernel's receive path, any driver) too.
#[test]
fn generic_mode_spreads_evenly_on_plain_veths() {
    spreads_evenly_attached(
        MeshSpec {
            nodes: 4,
            tasks_per_node: vec![1, 0, 2, 1],
            underlay_subnet: [10, 61, 3],
            overlay_subnet: [10, 62, 0],
            http_port: 8081,
            udp_port: 5300,
            ..MeshSpec::default()
        },
        &["--mode", "generic"],
        Sent::ThroughTc,
    );
}

/// The native XDP_TX fast path: where the far ends run XDP (so the kernel wakes their queue),
/// `--transmit xdp` sends every frame with XDP_TX itself.
#[test]
fn the_native_xdp_tx_fast_path_delivers_to_far_ends_that_run_xdp() {
    spreads_evenly_attached(
        MeshSpec {
            far_end_xdp: true,
            ..MeshSpec::default()
        },
        &["--mode", "native", "--transmit", "xdp"],
        Sent::ByXdp,
    );
}

#[test]
fn a_long_lived_connection_through_a_node_without_tasks_stays_on_one_task() {
    let cluster = Cluster::build(MeshSpec::default());
    let idle = cluster.mesh.node_count() - 1;
    assert!(
        cluster.mesh.tasks_on(idle).is_empty(),
        "the last node has no task"
    );
    let addr = cluster.addr(idle, WEB_PORT);
    cluster.mesh.client().in_netns(|| {
        let mut kept = KeepAlive::connect(addr).unwrap();
        let first = kept.get().unwrap();
        assert_eq!(*first.client_seen.ip(), cluster.mesh.client_ip());
        for round in 0..10 {
            // New connections keep rotating meanwhile.
            let others: Vec<Reply> = (0..4)
                .map(|_| http_get_new_connection(addr).unwrap())
                .collect();
            let mut seen: Vec<&str> = others.iter().map(|r| r.backend.as_str()).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), 4, "round {round}: {others:?}");
            std::thread::sleep(Duration::from_millis(100));
            let again = kept.get().unwrap();
            assert_eq!(again.backend, first.backend, "round {round}");
            assert_eq!(again.client_seen, first.client_seen, "round {round}");
        }
    });
}

#[test]
fn a_removed_backend_is_avoided_by_new_connections_on_every_node() {
    let cluster = Cluster::build(MeshSpec::default());
    let removed = cluster.mesh.task_count() - 1;
    let backend = format!(
        "{}@{}",
        cluster.mesh.task_addr(removed),
        cluster.mesh.node_name(cluster.mesh.task_node(removed))
    );
    cluster.on_every_node(&["backend", "rm", "web", &backend]);
    let remaining: Vec<usize> = (0..removed).collect();
    let per = 5;
    for node in 0..cluster.mesh.node_count() {
        let replies = cluster.new_connections(node, per * remaining.len());
        let context = format!(
            "requests to {} after removing {backend}",
            cluster.mesh.node_name(node)
        );
        cluster.assert_spread(&replies, &remaining, per, &context);
    }
}

/// A task whose server is gone (its kernel answers SYNs with a RST), then a task whose link is
/// down (SYNs go unanswered): new connections through every node still all succeed, each one
/// that met the dead task a second late (refused: the client's retransmitted SYN chooses
/// again) or three (unanswered: its second retransmission does), the refusal dropped where the
/// flow was balanced (the RST crossing the mesh back to it), and the client's address kept.
#[test]
fn a_task_that_refuses_or_vanishes_fails_no_connection_on_any_node() {
    let mut cluster = Cluster::build(MeshSpec::default());
    let check = |cluster: &Cluster, dead: usize, what: &str| {
        let alive: BTreeSet<String> = (0..cluster.mesh.task_count())
            .filter(|&k| k != dead)
            .map(|k| cluster.mesh.task_name(k))
            .collect();
        for node in 0..cluster.mesh.node_count() {
            let addr = cluster.addr(node, WEB_PORT);
            let replies: Vec<Reply> = (0..cluster.mesh.task_count() + 1)
                .map(|i| {
                    cluster
                        .mesh
                        .client()
                        .in_netns(|| client::http_get_patient(addr, Duration::from_secs(10)))
                        .unwrap_or_else(|err| panic!("{what}, request {i} to {addr}: {err:#}"))
                })
                .collect();
            let answered: BTreeSet<String> = replies.iter().map(|r| r.backend.clone()).collect();
            assert_eq!(
                answered,
                alive,
                "{what}, through {}",
                cluster.mesh.node_name(node)
            );
            assert!(
                replies
                    .iter()
                    .all(|r| *r.client_seen.ip() == cluster.mesh.client_ip()),
                "{replies:?}"
            );
        }
    };
    // Refusing: on n1 (its RST dropped on n1 itself, and on n2 and n3 after crossing back).
    cluster.mesh.stop_task(0).unwrap();
    check(&cluster, 0, "task 0 refusing");
    for node in 0..cluster.mesh.node_count() {
        assert!(
            cluster.reason(node, "drop_backend_refused") >= 1,
            "n{}",
            node + 1
        );
    }
    cluster.mesh.start_task(0).unwrap();
    // Vanished: task 2 on n2, its link down.
    cluster
        .mesh
        .task_ns(2)
        .ip(["link", "set", HOST_IF, "down"])
        .unwrap();
    check(&cluster, 2, "task 2 unreachable");
    for node in 0..cluster.mesh.node_count() {
        let stats: serde_json::Value =
            serde_json::from_str(&cluster.lbctl[node].run(&["stats", "--json"]).unwrap()).unwrap();
        assert!(
            stats["events"]["flow_unanswered"].as_u64().unwrap() >= 1,
            "n{}: {}",
            node + 1,
            stats["events"]
        );
    }
}

#[test]
fn a_udp_service_works_across_nodes() {
    let cluster = Cluster::build(MeshSpec::default());
    let tasks = all_tasks(&cluster.mesh);
    let per = 3;
    for node in 0..cluster.mesh.node_count() {
        let addr = cluster.addr(node, DNS_PORT);
        let replies = cluster
            .mesh
            .client()
            .in_netns(|| client::udp_requests(addr, per * tasks.len()))
            .unwrap();
        let context = format!("datagrams to {addr}");
        cluster.assert_spread(&replies, &tasks, per, &context);
    }
}

/// A node's own processes (or the tasks it masquerades) reach every task through another
/// node's published port, exactly evenly, over TCP and UDP, the tasks on their own node
/// included: those flows reach them from the balancing node's address (a packet from their
/// own node's address would be dropped there as martian), every other task sees the calling
/// node's address.
#[test]
fn a_nodes_own_clients_reach_every_task_through_another_nodes_published_port() {
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    let tasks = all_tasks(mesh);
    let per = 2;
    for caller in 0..mesh.node_count() {
        for target in (0..mesh.node_count()).filter(|&n| n != caller) {
            let context = format!(
                "{} calling {}",
                mesh.node_name(caller),
                mesh.node_name(target)
            );
            let replies = cluster.tcp_and_udp_from(mesh.node(caller), target, per * tasks.len());
            for reply in &replies {
                let on_caller = (0..tasks.len())
                    .any(|k| mesh.task_node(k) == caller && reply.backend == mesh.task_name(k));
                let expected = if on_caller { target } else { caller };
                assert_eq!(
                    *reply.client_seen.ip(),
                    mesh.node_ip(expected),
                    "{context}: {reply:?}"
                );
            }
            cluster.assert_each_task_answered(&replies, 2 * per, &context);
        }
    }
}

/// The VIP of the test's VIP services (`service add --vip`): no interface has it.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 10);
const VIP_PORT: u16 = 8443;

/// `count` requests from `from` to `addr` each way a client asks: new TCP connections,
/// datagrams from unconnected and from connected UDP sockets (on `udp_addr`); every socket
/// gets `addr` back as its peer, and every datagram's reply comes from the address asked.
fn every_kind_of_client(
    from: &NetNs,
    addr: SocketAddrV4,
    udp_addr: SocketAddrV4,
    count: usize,
) -> Vec<Reply> {
    from.in_netns(|| {
        let mut replies = (0..count)
            .map(|_| client::http_get_checking_peer(addr))
            .collect::<anyhow::Result<Vec<_>>>()?;
        replies.extend(client::udp_requests(udp_addr, count)?);
        replies.extend(client::udp_connected_requests(udp_addr, count)?);
        anyhow::Ok(replies)
    })
    .unwrap_or_else(|err| panic!("clients of {addr} and {udp_addr}: {err:#}"))
}

/// The seeds' demo: on every node, tasks or none, `curl 127.0.0.1:PORT`, the node's own
/// address and a VIP reach every task of the cluster, exactly evenly, over TCP and UDP
/// (unconnected and connected sockets), through the socket programs: the node's own clients
/// never cross its XDP hook. Each socket sees the address it asked for as its peer and its
/// replies' source. The tasks on the calling node see the node's address on their bridge (the
/// socket talks to them directly); the others see its underlay address (the socket talks to
/// their node's address, and TC DNATs and encapsulates its packets there). A drained task is
/// skipped by the node's own clients too.
#[test]
fn a_nodes_own_clients_reach_every_task_through_its_loopback_its_addresses_and_a_vip() {
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    cluster.vip_services();
    let tasks = all_tasks(mesh);
    let per = 2;
    let count = per * tasks.len();
    for node in 0..mesh.node_count() {
        let targets = [
            (Ipv4Addr::LOCALHOST, WEB_PORT, DNS_PORT),
            (mesh.node_ip(node), WEB_PORT, DNS_PORT),
            (VIP, VIP_PORT, VIP_PORT),
        ];
        for (ip, tcp_port, udp_port) in targets {
            let (addr, udp_addr) = (
                SocketAddrV4::new(ip, tcp_port),
                SocketAddrV4::new(ip, udp_port),
            );
            let context = format!("{} calling {addr}", mesh.node_name(node));
            let replies = every_kind_of_client(mesh.node(node), addr, udp_addr, count);
            for reply in &replies {
                let on_node = (0..tasks.len())
                    .any(|k| mesh.task_node(k) == node && reply.backend == mesh.task_name(k));
                let expected = if on_node {
                    mesh.overlay_gateway()
                } else {
                    mesh.node_ip(node)
                };
                assert_eq!(*reply.client_seen.ip(), expected, "{context}: {reply:?}");
            }
            cluster.assert_each_task_answered(&replies, 3 * per, &context);
        }
        let stats: serde_json::Value =
            serde_json::from_str(&cluster.lbctl[node].run(&["stats", "--json"]).unwrap()).unwrap();
        assert_eq!(
            stats["events"]["socket_balanced"],
            serde_json::json!(3 * 3 * count),
            "{}: every socket was balanced by the socket programs",
            mesh.node_name(node)
        );
        let remote = (0..tasks.len())
            .filter(|&k| mesh.task_node(k) != node)
            .count();
        assert!(
            cluster.reason(node, "socket_encap") >= (3 * 3 * per * remote) as u64,
            "{}: the packets to other nodes' tasks were encapsulated by TC",
            mesh.node_name(node)
        );
        assert!(
            cluster.reason(node, "reply_local") >= (3 * 3 * per * remote) as u64,
            "{}: their replies were NATed back for the node's sockets",
            mesh.node_name(node)
        );
    }

    // A drained task takes no new socket either; the others share its turns.
    let drained = mesh.tasks_on(1).start;
    cluster.on_every_node(&[
        "backend",
        "drain",
        "web",
        &task_backends(mesh, false)[drained],
    ]);
    let others: Vec<usize> = tasks.iter().copied().filter(|&k| k != drained).collect();
    for node in 0..mesh.node_count() {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, WEB_PORT);
        let replies = mesh
            .node(node)
            .in_netns(|| {
                (0..per * others.len())
                    .map(|_| client::http_get_checking_peer(addr))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .unwrap();
        let expected: BTreeMap<String, usize> =
            others.iter().map(|&k| (mesh.task_name(k), per)).collect();
        assert_eq!(
            client::per_backend(&replies),
            expected,
            "{}: the drained task is skipped",
            mesh.node_name(node)
        );
    }
}

/// A UDP datagram larger than the MTU crosses the mesh as fragments, both ways: a 3,000-byte
/// query to a node without tasks, fragmented by the client's kernel, is DNATed and
/// encapsulated fragment by fragment to the task's node, which decapsulates and delivers them
/// for the task's kernel to reassemble from the client's address; the 3,000-byte answer,
/// fragmented by the task's kernel at the overlay MTU, is encapsulated back fragment by
/// fragment and reverse-NATed by the ingress node, and the client reassembles it from the
/// address it asked. The client's link has the overlay MTU: a fragment of a full underlay MTU
/// would not fit once encapsulated (`drop_encap_mtu`), as a whole datagram would not.
#[test]
fn a_datagram_larger_than_the_mtu_crosses_the_mesh_as_fragments_both_ways() {
    const SIZE: usize = 3000;
    const PORT: u16 = 7777;
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    let task = cluster.udp_service_on_a_task("big", 7000, PORT);
    let overlay_mtu = mesh.spec().overlay_mtu().to_string();
    mesh.client()
        .ip(["link", "set", "eth0", "mtu", &overlay_mtu])
        .unwrap();
    let server = mesh
        .task_ns(task)
        .in_netns(|| UdpSocket::bind(("0.0.0.0", PORT)))
        .unwrap();
    let answering = client::answer_once_plus_one(server, 2 * SIZE);
    let idle = mesh.node_count() - 1;
    let service = cluster.addr(idle, 7000);
    let query: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let (answer, from) = mesh
        .client()
        .in_netns(|| client::udp_query(service, &query, 2 * SIZE))
        .expect("the answer arrives");
    let (got, client) = answering.join().unwrap();
    assert_eq!(got, SIZE, "the task got the query whole");
    assert_eq!(
        client.ip(),
        std::net::IpAddr::V4(mesh.client_ip()),
        "from the client's address"
    );
    let expected: Vec<u8> = query.iter().map(|b| b.wrapping_add(1)).collect();
    assert_eq!(answer, expected, "the client got the answer whole");
    assert_eq!(
        from,
        std::net::SocketAddr::V4(service),
        "from the address it asked"
    );
    // Both ways went as fragments: two or more encapsulated each way.
    assert!(
        cluster.reason(idle, "forward_encap_tx") >= 3,
        "query fragments"
    );
    assert!(cluster.reason(0, "reply_encap") >= 3, "answer fragments");
}

/// A task calling its own node's published port (a container using the routing mesh from
/// the inside) reaches every task of the cluster, exactly evenly, over TCP and UDP, once lbctl
/// is attached to the node's task bridge as well: the packets come in there, not on the
/// uplink. All of them are hairpin flows from the node's address: the tasks here share the
/// caller's subnet, and so do the other nodes' tasks (one overlay subnet, which each node
/// routes to its own bridge).
#[test]
fn a_task_calling_its_own_nodes_published_port_reaches_every_task() {
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    let tasks = all_tasks(mesh);
    let per = 2;
    for node in (0..mesh.node_count()).filter(|&n| !mesh.tasks_on(n).is_empty()) {
        cluster.lbctl[node]
            .run(&["attach", lb_tests::topology::TASK_BRIDGE])
            .unwrap();
        mesh.disable_task_tx_offload(node).unwrap();
        let caller = mesh.tasks_on(node).start;
        let replies = cluster.tcp_and_udp_from(mesh.task_ns(caller), node, per * tasks.len());
        let context = format!(
            "{} calling {}",
            mesh.task_name(caller),
            mesh.node_name(node)
        );
        for reply in &replies {
            assert_eq!(
                *reply.client_seen.ip(),
                mesh.node_ip(node),
                "{context}: {reply:?}"
            );
        }
        cluster.assert_each_task_answered(&replies, 2 * per, &context);
    }
}

/// A container on a node (a task's namespace behind the node's bridge) reaches every task of
/// the cluster, exactly evenly, over TCP and UDP, through its node's address, a VIP and every
/// other node's address, with lbctl attached to the task bridge as well. Its node's address
/// and the VIP are balanced by its node's XDP on the bridge; another node's address is
/// balanced by that node, the container's packets masqueraded to its node's address on their
/// way out as Docker's `docker_gwbridge` does (a task address is every node's own overlay
/// subnet, so nothing could answer it). The rule masquerades only connections to the other
/// nodes' published ports, not every packet leaving the uplink as Docker's does: a task of this
/// node that another node chose is reached through the tunnel and redirected to it by XDP,
/// past conntrack, so its replies would start new conntrack entries and be masqueraded too.
#[test]
fn a_container_reaches_every_task_through_its_node_a_vip_and_every_other_node() {
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    cluster.vip_services();
    let tasks = all_tasks(mesh);
    let per = 2;
    let count = per * tasks.len();
    let node_ips: Vec<String> = (0..mesh.node_count())
        .map(|n| mesh.node_ip(n).to_string())
        .collect();
    let gateway = mesh.overlay_gateway().octets();
    let overlay = format!("{}.{}.{}.0/24", gateway[0], gateway[1], gateway[2]);
    for node in (0..mesh.node_count()).filter(|&n| !mesh.tasks_on(n).is_empty()) {
        cluster.lbctl[node]
            .run(&["attach", lb_tests::topology::TASK_BRIDGE])
            .unwrap();
        mesh.disable_task_tx_offload(node).unwrap();
        let ruleset = format!(
            "add table ip gwbridge; \
             add chain ip gwbridge post {{ type nat hook postrouting priority srcnat; }}; \
             add rule ip gwbridge post ip saddr {overlay} ip daddr {{ {ips} }} \
             tcp dport {WEB_PORT} oifname \"{NODE_UPLINK}\" masquerade; \
             add rule ip gwbridge post ip saddr {overlay} ip daddr {{ {ips} }} \
             udp dport {DNS_PORT} oifname \"{NODE_UPLINK}\" masquerade",
            ips = node_ips.join(", ")
        );
        let nft = mesh.node(node).exec(["nft", &ruleset]).unwrap();
        assert!(
            nft.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&nft.stderr)
        );
        let caller = mesh.tasks_on(node).start;
        let mut targets: Vec<(Ipv4Addr, u16, u16)> = (0..mesh.node_count())
            .map(|n| (mesh.node_ip(n), WEB_PORT, DNS_PORT))
            .collect();
        targets.push((VIP, VIP_PORT, VIP_PORT));
        for (ip, tcp_port, udp_port) in targets {
            let (addr, udp_addr) = (
                SocketAddrV4::new(ip, tcp_port),
                SocketAddrV4::new(ip, udp_port),
            );
            let context = format!("{} calling {addr}", mesh.task_name(caller));
            let replies = every_kind_of_client(mesh.task_ns(caller), addr, udp_addr, count);
            cluster.assert_each_task_answered(&replies, 3 * per, &context);
        }
    }
}

/// A listener on `127.0.0.1:port` (TCP and UDP) of namespace `ns` that answers every
/// connection and datagram with `name`, for as long as the test runs.
fn local_listener(ns: &NetNs, port: u16, name: &'static str) {
    let (tcp, udp) = ns
        .in_netns(|| {
            anyhow::Ok((
                std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?,
                UdpSocket::bind((Ipv4Addr::LOCALHOST, port))?,
            ))
        })
        .unwrap();
    std::thread::spawn(move || {
        for mut stream in tcp.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut stream, name.as_bytes());
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
}

/// What `127.0.0.1:port` answers in namespace `ns`, over TCP and over UDP.
fn local_answers(ns: &NetNs, port: u16) -> (String, String) {
    ns.in_netns(|| {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut tcp = String::new();
        std::io::Read::read_to_string(&mut stream, &mut tcp)?;
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send_to(b"ping", addr)?;
        let mut buf = [0u8; 64];
        let (len, _) = socket.recv_from(&mut buf)?;
        anyhow::Ok((tcp, String::from_utf8_lossy(&buf[..len]).into_owned()))
    })
    .unwrap()
}

/// The socket programs see every namespace's sockets and act only on their own instance's:
/// with a service on a port in n1 only, a process of n2 (another instance, on the same machine)
/// and one of the client's namespace (no instance) reach their own listener on 127.0.0.1 at
/// that port, over TCP and UDP, and no instance counts them; n1's own clients are balanced.
#[test]
fn socket_programs_act_only_on_the_sockets_of_their_own_namespace() {
    const PORT: u16 = 9191;
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    let task = mesh.tasks_on(0).start;
    let (tcp_backend, udp_backend) = (
        format!("{}@{}", mesh.task_addr(task), mesh.node_name(0)),
        format!("{}@{}", mesh.task_udp_addr(task), mesh.node_name(0)),
    );
    let port = PORT.to_string();
    for (name, proto, backend) in [
        ("n1-web", "tcp", &tcp_backend),
        ("n1-dns", "udp", &udp_backend),
    ] {
        cluster.lbctl[0]
            .run(&["service", "add", name, &port, "--proto", proto, backend])
            .unwrap();
    }
    local_listener(mesh.node(1), PORT, "n2-local");
    local_listener(mesh.client(), PORT, "client-local");
    let balanced = |node: usize| -> u64 {
        let stats: serde_json::Value =
            serde_json::from_str(&cluster.lbctl[node].run(&["stats", "--json"]).unwrap()).unwrap();
        stats["events"]["socket_balanced"].as_u64().unwrap()
    };
    let before: Vec<u64> = (0..mesh.node_count()).map(balanced).collect();
    for (ns, name) in [(mesh.node(1), "n2-local"), (mesh.client(), "client-local")] {
        let (tcp, udp) = local_answers(ns, PORT);
        assert_eq!((tcp.as_str(), udp.as_str()), (name, name), "{}", ns.name());
    }
    let after: Vec<u64> = (0..mesh.node_count()).map(balanced).collect();
    assert_eq!(
        after, before,
        "no instance balanced another namespace's sockets"
    );

    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
    let replies = every_kind_of_client(mesh.node(0), addr, addr, 2);
    for reply in &replies {
        assert_eq!(
            reply.backend,
            mesh.task_name(task),
            "n1's own clients: {reply:?}"
        );
    }
    assert_eq!(balanced(0), before[0] + 6, "n1 balanced its own sockets");
}

/// The socket programs' links of `lbctl`'s instance that are pinned.
fn socket_links(lbctl: &Lbctl) -> Vec<String> {
    let dir = lbctl.pin_dir().join("links");
    let mut pins: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| name.starts_with("socket_"))
                .collect()
        })
        .unwrap_or_default();
    pins.sort();
    pins
}

/// Socket load balancing follows the instance: `attach --no-socket-lb` removes the programs'
/// links and the node's `127.0.0.1:PORT` is refused again (nothing listens there), `attach
/// --socket-lb` brings them back, and the last `detach` removes them.
#[test]
fn socket_load_balancing_is_turned_off_and_on_and_goes_with_the_last_interface() {
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    let node = mesh.node_count() - 1;
    let lbctl = &cluster.lbctl[node];
    let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, WEB_PORT);
    let answers = || mesh.node(node).in_netns(|| http_get_new_connection(local));
    let refused = |what: &str| client::assert_refused(answers(), what);
    let all = [
        "socket_connect4",
        "socket_getpeername4",
        "socket_recvmsg4",
        "socket_sendmsg4",
    ];
    assert_eq!(socket_links(lbctl), all);
    answers().expect("balanced while on");

    let out = lbctl
        .run(&["attach", NODE_UPLINK, "--no-socket-lb"])
        .unwrap();
    assert!(out.contains("socket load balancing: off"), "{out}");
    assert!(socket_links(lbctl).is_empty());
    refused("127.0.0.1 is refused once off");
    // Kept by a later attach without the flag.
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    assert!(socket_links(lbctl).is_empty());

    lbctl.run(&["attach", NODE_UPLINK, "--socket-lb"]).unwrap();
    assert_eq!(socket_links(lbctl), all);
    answers().expect("balanced again");

    let out = lbctl.run(&["detach", NODE_UPLINK]).unwrap();
    assert!(out.contains("socket load balancing removed"), "{out}");
    assert!(socket_links(lbctl).is_empty());
    refused("127.0.0.1 is refused once detached");
}

/// What a node's own UDP sockets meet beyond one small datagram, from the node without tasks:
/// a 4,000-byte answer from a task on another node crosses the tunnel as fragments and reaches
/// the socket whole, from the address it asked; a connected socket whose task is removed is
/// balanced by that task's node from then on (its next answer comes from another task, still
/// from the address it asked); one unconnected socket sending to two services it would reach at
/// the same address (two VIPs with the same port, their backends on one node) is refused the
/// second (`EPERM`, counted), since their answers could not be told apart.
#[test]
fn a_nodes_own_udp_sockets_get_large_answers_survive_a_removed_task_and_refuse_ambiguity() {
    const BIG: usize = 4000;
    const BIG_PORT: u16 = 7100;
    const TASK_PORT: u16 = 7777;
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    let caller = mesh.node_count() - 1;
    assert!(mesh.tasks_on(caller).is_empty());

    // A large answer.
    let task = cluster.udp_service_on_a_task("big", BIG_PORT, TASK_PORT);
    let server = mesh
        .task_ns(task)
        .in_netns(|| UdpSocket::bind(("0.0.0.0", TASK_PORT)))
        .unwrap();
    let answering = std::thread::spawn(move || {
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        let (_, from) = server.recv_from(&mut buf).unwrap();
        let answer: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        server.send_to(&answer, from).unwrap();
    });
    let service = SocketAddrV4::new(Ipv4Addr::LOCALHOST, BIG_PORT);
    let (answer, from) = mesh
        .node(caller)
        .in_netns(|| client::udp_query(service, b"big?", 2 * BIG))
        .expect("the large answer arrives");
    answering.join().unwrap();
    assert_eq!(answer.len(), BIG, "whole");
    assert_eq!(
        from,
        std::net::SocketAddr::V4(service),
        "from the address asked"
    );
    assert!(cluster.reason(caller, "reply_local") >= 3, "as fragments");

    // A connected socket whose task is removed.
    let dns = SocketAddrV4::new(Ipv4Addr::LOCALHOST, DNS_PORT);
    let socket = mesh
        .node(caller)
        .in_netns(|| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(dns)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            anyhow::Ok(socket)
        })
        .unwrap();
    let exchange = |socket: &UdpSocket| {
        socket.send(b"ping\n").unwrap();
        let mut buf = [0u8; 512];
        let len = socket.recv(&mut buf).expect("an answer");
        client::Reply::parse(std::str::from_utf8(&buf[..len]).unwrap()).unwrap()
    };
    let first = exchange(&socket);
    let gone = (0..mesh.task_count())
        .find(|&k| mesh.task_name(k) == first.backend)
        .unwrap();
    cluster.on_every_node(&["backend", "rm", "dns", &task_backends(mesh, true)[gone]]);
    let second = exchange(&socket);
    assert_ne!(second.backend, first.backend, "another task answers");
    assert_eq!(socket.peer_addr().unwrap(), std::net::SocketAddr::V4(dns));

    // Two services behind one address.
    let task = mesh.tasks_on(0).start;
    let backend = format!("{}@{}", mesh.task_udp_addr(task), mesh.node_name(0));
    let port = VIP_PORT.to_string();
    let vips = [VIP, Ipv4Addr::new(10, 254, 0, 11)];
    for (i, vip) in vips.iter().enumerate() {
        let (name, vip) = (format!("vip-{i}"), vip.to_string());
        cluster.on_every_node(&[
            "service", "add", &name, &port, "--proto", "udp", "--vip", &vip, &backend,
        ]);
    }
    let refused = mesh
        .node(caller)
        .in_netns(|| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 512];
            socket.send_to(b"ping\n", SocketAddrV4::new(vips[0], VIP_PORT))?;
            let (_, from) = socket.recv_from(&mut buf)?;
            anyhow::ensure!(from == std::net::SocketAddr::V4(SocketAddrV4::new(vips[0], VIP_PORT)));
            anyhow::Ok(socket.send_to(b"ping\n", SocketAddrV4::new(vips[1], VIP_PORT)))
        })
        .unwrap();
    let err = refused.expect_err("the second service is refused");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    let stats: serde_json::Value =
        serde_json::from_str(&cluster.lbctl[caller].run(&["stats", "--json"]).unwrap()).unwrap();
    assert_eq!(stats["events"]["socket_peer_taken"], serde_json::json!(1));
}

/// VXLAN to a node's overlay port from the client, which is no node: dropped and counted, and
/// the task it names never sees it.
#[test]
fn vxlan_from_an_address_that_is_not_a_node_is_dropped_and_counted() {
    let cluster = Cluster::build(MeshSpec::default());
    let target = 0;
    let before = cluster.reason(target, "drop_vxlan_unknown_source");
    let task = cluster.mesh.tasks_on(target).start;
    let inner = inner_udp_frame(
        cluster.mesh.client_ip(),
        *cluster.mesh.task_udp_addr(task).ip(),
        cluster.mesh.task_udp_addr(task).port(),
    );
    let mut datagram = vec![0x08, 0, 0, 0];
    datagram.extend_from_slice(&lb_common::DEFAULT_VNI.to_be_bytes()[1..]);
    datagram.push(0);
    datagram.extend_from_slice(&inner);
    let overlay = SocketAddrV4::new(cluster.mesh.node_ip(target), lb_common::DEFAULT_VXLAN_PORT);
    let sent = 5;
    cluster.mesh.client().in_netns(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..sent {
            socket.send_to(&datagram, overlay).unwrap();
        }
    });
    // The frames were dropped in XDP, counted on arrival (waited for, not slept on).
    let counted = std::time::Instant::now();
    while cluster.reason(target, "drop_vxlan_unknown_source") - before < sent as u64 {
        assert!(
            counted.elapsed() < Duration::from_secs(20),
            "the frames were not all counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        cluster.reason(target, "drop_vxlan_unknown_source") - before,
        sent as u64
    );
    assert_eq!(
        cluster.reason(target, "decap_stack") + cluster.reason(target, "decap_redirect"),
        0
    );
}

/// An Ethernet + IPv4 + UDP frame with a valid IPv4 header checksum (UDP checksum 0: none).
fn inner_udp_frame(src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let payload = b"ping\n";
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let check = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&dst_port.to_be_bytes());
    frame.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The overlay MTU rule: a datagram that fits the overlay MTU crosses nodes; one that fits
/// the underlay only without encapsulation is never sent truncated: sent with DF (as a UDP
/// socket does by default), it draws an ICMP "fragmentation needed" that brings the client's
/// path MTU to the overlay's.
#[test]
fn a_packet_too_big_once_encapsulated_is_answered_with_fragmentation_needed() {
    let cluster = Cluster::build(MeshSpec::default());
    let idle = cluster.mesh.node_count() - 1;
    let addr = cluster.addr(idle, DNS_PORT);
    let underlay_mtu = cluster.mesh.spec().underlay_mtu as usize;
    let overlay_mtu = underlay_mtu - lb_common::VXLAN_OVERHEAD as usize;
    cluster.mesh.client().in_netns(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        // IPv4 (20) + UDP (8) + payload = the overlay MTU exactly: fits once encapsulated.
        let fits = vec![b'x'; overlay_mtu - 28];
        socket.send_to(&fits, addr).unwrap();
        let mut buf = [0u8; 2048];
        let (len, from) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(from, std::net::SocketAddr::V4(addr));
        let reply = client::Reply::parse(std::str::from_utf8(&buf[..len]).unwrap()).unwrap();
        assert_eq!(
            *reply.client_seen.ip(),
            cluster.mesh.client_ip(),
            "{reply:?}"
        );
        // One byte more than the overlay MTU: the client's own MTU lets it out, encapsulation
        // would not fit the underlay.
        let too_big = vec![b'x'; overlay_mtu - 28 + 1];
        socket.send_to(&too_big, addr).unwrap();
        assert!(
            socket.recv_from(&mut buf).is_err(),
            "no reply to a datagram that cannot cross"
        );
    });
    assert_eq!(cluster.reason(idle, "frag_needed_sent"), 1);
    assert_eq!(cluster.reason(idle, "drop_encap_mtu"), 0);
    let route = cluster
        .mesh
        .client()
        .ip(["route", "get", &addr.ip().to_string()])
        .unwrap();
    assert!(
        route.contains(&format!("mtu {overlay_mtu}")),
        "the client learned the overlay MTU: {route}"
    );
}

/// `setsockopt(SOL_UDP, UDP_SEGMENT)` (linux/udp.h): datagrams larger than this are sent as one
/// GSO packet of segments this size, as QUIC servers send theirs.
const UDP_SEGMENT: libc::c_int = 103;

/// A task that replies with UDP GSO (one send, several datagrams): its reply leaves its node as
/// one GSO packet, which TC encapsulates with its segment size kept, and the client gets every
/// datagram, from the address it sent to.
#[test]
fn a_udp_gso_reply_crosses_the_mesh_as_its_datagrams() {
    const PORT: u16 = 7443;
    const SEGMENT: usize = 1000;
    const SEGMENTS: usize = 3;
    let cluster = Cluster::build(MeshSpec::default());
    let mesh = &cluster.mesh;
    let task = cluster.udp_service_on_a_task("quic", PORT, PORT);
    // UDP GSO needs checksum offload on the sending device, as containers have it.
    let task_ns = mesh.task_ns(task);
    let out = task_ns.exec(["ethtool", "-K", "eth0", "tx", "on"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let server = task_ns.in_netns(|| UdpSocket::bind(("0.0.0.0", PORT)).unwrap());
    let segment = SEGMENT as libc::c_int;
    // SAFETY: a valid socket and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&server),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&raw const segment).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let replier = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (_, client) = server.recv_from(&mut buf).unwrap();
        let reply: Vec<u8> = (0..SEGMENTS * SEGMENT)
            .map(|i| (i / SEGMENT) as u8)
            .collect();
        assert_eq!(server.send_to(&reply, client).unwrap(), reply.len());
    });
    let idle = mesh.node_count() - 1;
    let addr = cluster.addr(idle, PORT);
    let got: Vec<(Vec<u8>, std::net::SocketAddr)> = mesh.client().in_netns(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket.send_to(b"hello", addr).unwrap();
        (0..SEGMENTS)
            .map(|_| {
                let mut buf = [0u8; 2048];
                let (len, from) = socket.recv_from(&mut buf).expect("every datagram arrives");
                (buf[..len].to_vec(), from)
            })
            .collect()
    });
    replier.join().unwrap();
    for (i, (datagram, from)) in got.iter().enumerate() {
        assert_eq!(*from, std::net::SocketAddr::V4(addr), "datagram {i}");
        assert_eq!(*datagram, vec![i as u8; SEGMENT], "datagram {i}");
    }
    assert!(cluster.reason(0, "reply_encap") > 0);
    assert_eq!(cluster.reason(0, "drop_encap_no_route"), 0);
    assert_eq!(cluster.reason(0, "drop_encap_mtu"), 0);
}

/// The kernel's IPv4 neighbour entries of `ns` on `dev`: address → (managed, states, lladdr).
fn neighbour_entries(
    ns: &NetNs,
    dev: &str,
) -> BTreeMap<Ipv4Addr, (bool, Vec<String>, Option<String>)> {
    let json = ns.ip(["-4", "-j", "neigh", "show", "dev", dev]).unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    entries
        .iter()
        .map(|entry| {
            let addr = entry["dst"].as_str().unwrap().parse().unwrap();
            let states = entry["state"]
                .as_array()
                .map(|s| s.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            let lladdr = entry
                .get("lladdr")
                .and_then(|l| l.as_str())
                .map(str::to_owned);
            (addr, (entry.get("managed").is_some(), states, lladdr))
        })
        .collect()
}

/// lbctl keeps a managed neighbour entry for each other node's next hop (the node on-link, the
/// route's gateway otherwise), turns a learned entry into one and keeps its address, leaves an
/// administrator's static entry alone, warns about a node without a route or one routed out of
/// an interface it is not attached to, and deletes only the entries it made: when a node goes
/// and on purge. The route lookups and neighbour changes are lbctl's own netlink requests; the
/// test reads the result with iproute2.
#[test]
fn managed_neighbours_follow_the_node_list_and_leave_others_alone() {
    lb_tests::require_root().unwrap();
    let ns = NetNs::new("neigh").unwrap();
    ns.add_veth_pair("up0", "up1").unwrap();
    ns.add_veth_pair("side0", "side1").unwrap();
    for (addr, dev) in [("172.29.40.1/22", "up0"), ("198.18.7.1/24", "side0")] {
        ns.ip(["addr", "add", addr, "dev", dev]).unwrap();
    }
    ns.ip(["route", "add", "10.233.0.0/16", "via", "172.29.41.254"])
        .unwrap();
    let learned_mac = "02:5e:00:00:00:17";
    ns.ip([
        "neigh",
        "add",
        "172.29.42.17",
        "lladdr",
        learned_mac,
        "dev",
        "up0",
        "nud",
        "stale",
    ])
    .unwrap();
    ns.ip([
        "neigh",
        "add",
        "172.29.43.9",
        "lladdr",
        "02:5e:00:00:00:09",
        "dev",
        "up0",
        "nud",
        "permanent",
    ])
    .unwrap();
    let mut lbctl = Lbctl::new(&ns).unwrap();
    lbctl.run(&["attach", "up0"]).unwrap();

    let mut warnings = String::new();
    for (name, ip) in [
        ("self", "172.29.40.1"),
        ("on-link", "172.29.42.17"),
        ("routed", "10.233.5.5"),
        ("static", "172.29.43.9"),
        ("unrouted", "203.0.113.77"),
        ("aside", "198.18.7.20"),
    ] {
        warnings += &lbctl.run_with_stderr(&["node", "add", name, ip]).unwrap().1;
    }
    let entries = neighbour_entries(&ns, "up0");
    let on_link = &entries[&"172.29.42.17".parse().unwrap()];
    assert!(on_link.0, "the learned entry is made managed: {entries:?}");
    assert_eq!(
        on_link.2.as_deref(),
        Some(learned_mac),
        "and keeps its address"
    );
    assert!(
        entries[&"172.29.41.254".parse().unwrap()].0,
        "the gateway's: {entries:?}"
    );
    let fixed = &entries[&"172.29.43.9".parse().unwrap()];
    assert!(
        !fixed.0 && fixed.1 == ["PERMANENT"],
        "left alone: {entries:?}"
    );
    assert!(
        !entries.contains_key(&"172.29.40.1".parse().unwrap()),
        "not this node's own"
    );
    assert!(
        warnings.contains("no route to node 'unrouted' (203.0.113.77)")
            && warnings.contains("Network is unreachable"),
        "{warnings}"
    );
    assert!(
        warnings.contains("the route to node 'aside' (198.18.7.20) leaves by side0"),
        "{warnings}"
    );

    lbctl.run(&["node", "rm", "routed"]).unwrap();
    let entries = neighbour_entries(&ns, "up0");
    assert!(
        !entries.contains_key(&"172.29.41.254".parse().unwrap()),
        "{entries:?}"
    );
    assert!(entries[&"172.29.42.17".parse().unwrap()].0);

    lbctl.purge().unwrap();
    let entries = neighbour_entries(&ns, "up0");
    assert!(
        !entries.contains_key(&"172.29.42.17".parse().unwrap()),
        "{entries:?}"
    );
    assert_eq!(entries[&"172.29.43.9".parse().unwrap()].1, ["PERMANENT"]);
}
