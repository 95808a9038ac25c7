//! End to end: the gossiped service table. Every node of the mesh runs `lbctl daemon --cluster`
//! on its uplink address with n1 as seed, and no node is told about another (`node add` is
//! never run): services defined on one node and tasks registered on another reach every node
//! through gossip, a node whose daemon stops leaves every table within the failure detector's
//! window, and comes back with its tasks when it restarts; a node joining late gets the whole
//! table. Real HTTP connections through the XDP data plane check each step.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, Lbctl, client,
    mesh::{Mesh, MeshSpec},
    netns::NetNs,
    prometheus::http_get,
    topology::NODE_UPLINK,
};

const WEB_PORT: u16 = 8080;
/// Docker Swarm's gossip port, lbctl's default.
const GOSSIP_PORT: u16 = 7946;
/// Fast gossip for the tests: a silent member is dead after about 8 mean heartbeat intervals.
const GOSSIP_INTERVAL: &str = "200ms";
/// Every node's daemon serves metrics on its own namespace's loopback.
const METRICS: &str = "127.0.0.1:9617";
/// Longest a change or a failure may take to reach every node here.
const WITHIN: Duration = Duration::from_secs(60);

/// A mesh with lbctl attached on every node (no table) and a daemon slot per node. Fields
/// drop in order: daemons stop, then the instances are purged, then the namespaces go.
struct Cluster {
    daemons: Vec<Option<Daemon>>,
    lbctl: Vec<Lbctl>,
    mesh: Mesh,
    name: &'static str,
}

impl Cluster {
    fn build(spec: MeshSpec, name: &'static str) -> Cluster {
        lb_tests::require_root().unwrap();
        let mesh = Mesh::build(spec).unwrap();
        let lbctl: Vec<Lbctl> = (0..mesh.node_count())
            .map(|i| {
                let node = Lbctl::new(mesh.node(i)).unwrap();
                node.run(&["attach", NODE_UPLINK]).unwrap();
                node
            })
            .collect();
        Cluster {
            daemons: (0..mesh.node_count()).map(|_| None).collect(),
            lbctl,
            mesh,
            name,
        }
    }

    fn gossip_addr(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.mesh.node_ip(i), GOSSIP_PORT)
    }

    /// Starts node `i`'s daemon in cluster `cluster`, seeded with n1.
    fn start_in(&mut self, i: usize, cluster: &str) {
        let (node, gossip, seed) = (
            self.mesh.node_name(i),
            self.gossip_addr(i).to_string(),
            self.gossip_addr(0).to_string(),
        );
        let args = [
            "--cluster",
            cluster,
            "--node-name",
            &node,
            "--gossip-addr",
            &gossip,
            "--seed",
            &seed,
            "--gossip-interval",
            GOSSIP_INTERVAL,
        ];
        let daemon = self.lbctl[i]
            .start_daemon_with(METRICS.parse().unwrap(), self.mesh.node(i), &args)
            .unwrap();
        self.daemons[i] = Some(daemon);
    }

    fn start(&mut self, i: usize) {
        self.start_in(i, self.name);
    }

    fn stop(&mut self, i: usize) {
        let status = self.daemons[i].take().unwrap().stop().unwrap();
        assert!(status.success(), "{status}");
    }

    /// `IP:PORT@NODE` of every backend of `web` on node `i` (empty without `web`).
    fn web_backends(&self, i: usize) -> Vec<String> {
        let doc: serde_json::Value =
            serde_json::from_str(&self.lbctl[i].run(&["service", "ls", "--json"]).unwrap())
                .unwrap();
        let mut backends: Vec<String> = doc["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == "web")
            .flat_map(|s| s["backends"].as_array().unwrap().clone())
            .map(|b| format!("{}@{}", b["address"].as_str().unwrap(), b["node"]))
            .collect();
        backends.sort();
        backends
    }

    /// `IP:PORT@"NODE"` (as `web_backends` writes them) of tasks `tasks`.
    fn tasks(&self, tasks: &[usize]) -> Vec<String> {
        let mut out: Vec<String> = tasks
            .iter()
            .map(|&k| {
                format!(
                    "{}@\"{}\"",
                    self.mesh.task_addr(k),
                    self.mesh.node_name(self.mesh.task_node(k))
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Waits until `web` has exactly tasks `tasks` on every node of `nodes`; returns how long
    /// it took.
    fn wait_for_tasks(&self, nodes: &[usize], tasks: &[usize], what: &str) -> Duration {
        let want = self.tasks(tasks);
        wait(what, || nodes.iter().all(|&i| self.web_backends(i) == want))
    }

    fn cluster_json(&self, i: usize) -> serde_json::Value {
        serde_json::from_str(&self.lbctl[i].run(&["cluster", "ls", "--json"]).unwrap()).unwrap()
    }

    /// Whether node `i`'s daemon sees `alive` live members that all agree with it (false until
    /// it has written its first view).
    fn converged(&self, i: usize, alive: usize) -> bool {
        let Ok(text) = self.lbctl[i].run(&["cluster", "ls", "--json"]) else {
            return false;
        };
        let status: serde_json::Value = serde_json::from_str(&text).unwrap();
        let live = status["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["alive"] == true)
            .count();
        status["converged"] == true && live == alive
    }

    /// `(IP:PORT, id)` of `web`'s backends on node `i`.
    fn web_ids(&self, i: usize) -> Vec<(String, u64)> {
        let doc: serde_json::Value =
            serde_json::from_str(&self.lbctl[i].run(&["service", "ls", "--json"]).unwrap())
                .unwrap();
        doc["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap().to_owned(),
                    b["id"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// `count` HTTP requests to node `i`'s published port, each on a new connection; how many
    /// each task answered. Every task must see the client's own address.
    fn spread(&self, i: usize, count: usize) -> BTreeMap<String, usize> {
        let addr = SocketAddrV4::new(self.mesh.node_ip(i), WEB_PORT);
        let replies = self
            .mesh
            .client()
            .in_netns(|| client::new_connections(addr, count))
            .unwrap();
        for reply in &replies {
            assert_eq!(*reply.client_seen.ip(), self.mesh.client_ip(), "{reply:?}");
        }
        client::per_backend(&replies)
    }

    fn evenly(&self, tasks: &[usize], per: usize) -> BTreeMap<String, usize> {
        tasks
            .iter()
            .map(|&k| (self.mesh.task_name(k), per))
            .collect()
    }
}

/// Polls `done` every 50 ms until it holds; panics after `WITHIN`.
fn wait(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WITHIN, "not within {WITHIN:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// `GET /metrics` of the daemon in `ns`.
fn scrape(ns: &NetNs) -> String {
    let addr: SocketAddr = METRICS.parse().unwrap();
    let (status, body) = ns.in_netns(|| http_get(addr, "/metrics")).unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one series (`name{labels}` exactly as exposed).
fn series(page: &str, name_and_labels: &str) -> Option<u64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// The scenarios in the three-node swarm plus a fourth node joining late (tasks t0, t1
/// on n1, t2, t3 on n2; none on n3 and n4).
#[test]
fn the_table_is_gossiped_nodes_fail_and_return_and_late_joiners_get_everything() {
    let mut cluster = Cluster::build(
        MeshSpec {
            nodes: 4,
            tasks_per_node: vec![2, 2, 0, 0],
            ..MeshSpec::default()
        },
        "swarm",
    );
    for i in 0..3 {
        cluster.start(i);
    }
    let port = WEB_PORT.to_string();
    let (t0, t1, t2, t3) = (
        cluster.mesh.task_addr(0).to_string(),
        cluster.mesh.task_addr(1).to_string(),
        cluster.mesh.task_addr(2).to_string(),
        cluster.mesh.task_addr(3).to_string(),
    );

    // A service defined on n1 (with n1's tasks, given without @NODE: this node's) reaches n3.
    cluster.lbctl[0]
        .run(&["service", "add", "web", &port, &t0, &t1])
        .unwrap();
    let took = cluster.wait_for_tasks(&[1, 2], &[0, 1], "web from n1 on n2 and n3");
    println!("a service added on n1 reached n2 and n3 in {took:?}");
    assert_eq!(cluster.spread(2, 20), cluster.evenly(&[0, 1], 10));

    // Tasks registered on n2 are served from n1 and n3.
    cluster.lbctl[1]
        .run(&["backend", "add", "web", &format!("{t2}@n2"), &t3])
        .unwrap();
    let took = cluster.wait_for_tasks(&[0, 1, 2], &[0, 1, 2, 3], "n2's tasks everywhere");
    println!("tasks registered on n2 reached n1 and n3 in {took:?}");
    for node in [0, 2] {
        assert_eq!(cluster.spread(node, 40), cluster.evenly(&[0, 1, 2, 3], 10));
    }

    // Each node changes only its own tasks; the node list is the live members.
    let err = cluster.lbctl[0]
        .run_expect_fail(&["backend", "rm", "web", &t2])
        .unwrap();
    assert!(err.contains("is node 'n2''s"), "{err}");
    let err = cluster.lbctl[0]
        .run_expect_fail(&["node", "add", "n9", "192.168.200.99"])
        .unwrap();
    assert!(err.contains("gossiped cluster"), "{err}");

    // n2's daemon stops: its tasks leave n1's and n3's tables within the detection window,
    // and clients are served by the remaining tasks.
    cluster.stop(1);
    let took = cluster.wait_for_tasks(&[0, 2], &[0, 1], "n2's tasks gone from n1 and n3");
    println!(
        "n2's daemon stopped: its tasks left n1 and n3 in {took:?} (gossip every {GOSSIP_INTERVAL})"
    );
    for node in [0, 2] {
        assert_eq!(cluster.spread(node, 20), cluster.evenly(&[0, 1], 10));
    }
    let n1 = cluster.cluster_json(0);
    let n2 = n1["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n2")
        .unwrap();
    assert_eq!(n2["alive"], false, "{n1}");

    // Restarted, n2 brings its tasks back.
    cluster.start(1);
    let took = cluster.wait_for_tasks(&[0, 2], &[0, 1, 2, 3], "n2's tasks back");
    println!("n2's daemon restarted: its tasks were back on n1 and n3 in {took:?}");
    assert_eq!(cluster.spread(2, 40), cluster.evenly(&[0, 1, 2, 3], 10));

    // A fourth node joining late receives the whole table and serves every task.
    cluster.start(3);
    let took = cluster.wait_for_tasks(&[3], &[0, 1, 2, 3], "the table on n4");
    println!("n4 joined late and had the whole table in {took:?}");
    // The tasks' nodes accept n4's VXLAN once they count it a member (NODES): until then they
    // drop it as `drop_vxlan_unknown_source`, which a node that has the table may be quicker
    // than. Every node applied the same table, and says so.
    wait("every node converged", || {
        (0..4).all(|i| cluster.converged(i, 4))
    });
    assert_eq!(cluster.spread(3, 40), cluster.evenly(&[0, 1, 2, 3], 10));

    // A restarted daemon hears from the members it knows before it merges: no task leaves its
    // table meanwhile, so every backend keeps its id, and its flows.
    let ids = cluster.web_ids(0);
    cluster.stop(0);
    cluster.start(0);
    wait("n1 converged again", || cluster.converged(0, 4));
    assert_eq!(cluster.web_ids(0), ids);
    wait("every node converged again", || {
        (0..4).all(|i| cluster.converged(i, 4))
    });
    let status = cluster.cluster_json(0);
    let members: Vec<(&str, bool)> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["alive"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        members,
        [("n1", true), ("n2", true), ("n3", true), ("n4", true)]
    );
    // Every node reports the same table. Health checks run meanwhile: a task's second good
    // probe turns it healthy, a change of the table (and of its digest) that reaches the nodes
    // a gossip round apart, so agreement is awaited rather than sampled once.
    wait("every node reports the same digest", || {
        let digests: Vec<serde_json::Value> = (0..4)
            .map(|i| cluster.cluster_json(i)["digest"].clone())
            .collect();
        digests[0].is_string() && digests.iter().all(|d| *d == digests[0])
    });
    let mut text = String::new();
    wait("n1 says every live member has its table", || {
        text = cluster.lbctl[0].run(&["cluster", "ls"]).unwrap();
        text.contains("every live member has this table")
    });
    assert!(text.contains("n4"), "{text}");
    // The metrics say the same, once the daemon's view has caught up (every half round). All
    // four members alive is part of what is awaited: a view that counts only itself alive for
    // a moment is "converged" with its own digest too.
    let mut page = String::new();
    wait("n1's metrics show the agreed table of four", || {
        let digest = cluster.cluster_json(0)["digest"].clone();
        page = scrape(cluster.mesh.node(0));
        series(&page, "lbctl_cluster_converged") == Some(1)
            && series(&page, "lbctl_cluster_members{state=\"alive\"}") == Some(4)
            && digest
                .as_str()
                .is_some_and(|d| page.contains(&format!("digest=\"{d}\"")))
    });
}

/// A node of another cluster and malformed datagrams are rejected, counted, and change
/// nothing.
#[test]
fn another_cluster_and_malformed_gossip_are_rejected_and_counted() {
    let mut cluster = Cluster::build(
        MeshSpec {
            nodes: 3,
            tasks_per_node: vec![1, 1, 0],
            ..MeshSpec::default()
        },
        "blue",
    );
    cluster.start(0);
    let port = WEB_PORT.to_string();
    let t0 = cluster.mesh.task_addr(0).to_string();
    cluster.lbctl[0]
        .run(&["service", "add", "web", &port, &t0])
        .unwrap();
    // n2 is in cluster "green" and seeds itself with n1.
    cluster.start_in(1, "green");
    let rejected = |i: usize, reason: &str| {
        cluster.cluster_json(i)["rejected"][reason]
            .as_u64()
            .unwrap()
    };
    wait("n1 counts n2's SYNs", || rejected(0, "wrong_cluster") > 0);
    wait("n2 counts n1's refusals", || {
        rejected(1, "rejected_by_peer") > 0
    });
    let before = cluster.cluster_json(0);
    assert_eq!(before["members"].as_array().unwrap().len(), 1, "{before}");
    assert_eq!(
        cluster.cluster_json(1)["members"].as_array().unwrap().len(),
        1
    );
    assert!(
        cluster.web_backends(1).is_empty(),
        "green got nothing from blue"
    );

    // Garbage at n1's gossip port, from the client.
    let target = cluster.gossip_addr(0);
    cluster.mesh.client().in_netns(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for junk in [&b"junk"[..], &[0x53, 0xb0, 0, 9][..], &[0; 100][..]] {
            socket.send_to(junk, target).unwrap();
        }
    });
    wait("n1 counts the malformed datagrams", || {
        rejected(0, "malformed") >= 3
    });
    let after = cluster.cluster_json(0);
    assert_eq!(after["digest"], before["digest"]);
    assert_eq!(after["table_generation"], before["table_generation"]);
    assert_eq!(after["members"].as_array().unwrap().len(), 1);
    assert_eq!(
        series(
            &scrape(cluster.mesh.node(0)),
            "lbctl_gossip_rejected_messages_total{reason=\"malformed\"}"
        ),
        Some(rejected(0, "malformed"))
    );
    // n1 still serves its own table; the node of the other cluster has its own (empty) one
    // and serves nothing: a connection to its port is refused by its kernel (no listener).
    assert_eq!(cluster.spread(0, 2), cluster.evenly(&[0], 2));
    let green = SocketAddrV4::new(cluster.mesh.node_ip(1), WEB_PORT);
    client::assert_refused(
        cluster
            .mesh
            .client()
            .in_netns(|| client::http_get_new_connection(green)),
        "the other cluster's node serves nothing",
    );
}
