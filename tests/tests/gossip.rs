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
    /// The cluster's key file (`lbctl cluster key generate`), in n1's state folder.
    key_file: String,
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
        let key_file = new_key_file(&lbctl[0], "cluster.key");
        Cluster {
            daemons: (0..mesh.node_count()).map(|_| None).collect(),
            lbctl,
            mesh,
            key_file,
            name,
        }
    }

    fn gossip_addr(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.mesh.node_ip(i), GOSSIP_PORT)
    }

    /// Starts node `i`'s daemon in cluster `cluster`, seeded with n1.
    fn start_in(&mut self, i: usize, cluster: &str) {
        let key_file = self.key_file.clone();
        self.start_with_key(i, cluster, &key_file);
    }

    /// Starts node `i`'s daemon in cluster `cluster` with the keyring `key_file`, seeded with n1.
    fn start_with_key(&mut self, i: usize, cluster: &str, key_file: &str) {
        self.start_sealing(i, cluster, &["--cluster-key-file", key_file]);
    }

    /// Starts node `i`'s daemon in cluster `cluster`, seeded with n1, its gossip sealed as
    /// `sealing` says (`--cluster-key-file PATH`, or `--insecure`).
    fn start_sealing(&mut self, i: usize, cluster: &str, sealing: &[&str]) {
        let (node, gossip, seed) = (
            self.mesh.node_name(i),
            self.gossip_addr(i).to_string(),
            self.gossip_addr(0).to_string(),
        );
        let mut args = vec!["--cluster", cluster];
        args.extend_from_slice(sealing);
        args.extend([
            "--node-name",
            &node,
            "--gossip-addr",
            &gossip,
            "--seed",
            &seed,
            "--gossip-interval",
            GOSSIP_INTERVAL,
        ]);
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

    /// Three nodes, one task on each of n1 and n2, none on n3.
    fn small(name: &'static str) -> Cluster {
        Cluster::build(
            MeshSpec {
                nodes: 3,
                tasks_per_node: vec![1, 1, 0],
                ..MeshSpec::default()
            },
            name,
        )
    }

    /// `web` on n1, its one backend n1's task.
    fn add_web_on_n1(&self) {
        let port = WEB_PORT.to_string();
        let t0 = self.mesh.task_addr(0).to_string();
        self.lbctl[0]
            .run(&["service", "add", "web", &port, &t0])
            .unwrap();
    }

    /// Gossip messages node `i` rejected for `reason` (0 until its daemon has written its first
    /// view: under load that comes a while after it started).
    fn rejected(&self, i: usize, reason: &str) -> u64 {
        let Ok(text) = self.lbctl[i].run(&["cluster", "ls", "--json"]) else {
            return 0;
        };
        let status: serde_json::Value = serde_json::from_str(&text).unwrap();
        status["rejected"][reason].as_u64().unwrap()
    }

    /// Member `name` as node `i`'s daemon lists it (`cluster ls --json`), if listed.
    fn member(&self, i: usize, name: &str) -> Option<serde_json::Value> {
        let status = self.cluster_json(i);
        let members = status["members"].as_array()?;
        members.iter().find(|m| m["name"] == name).cloned()
    }

    /// Why node `i` says member `name` is cut off, if it does.
    fn cut_off(&self, i: usize, name: &str) -> Option<String> {
        self.member(i, name)?["cut_off"].as_str().map(str::to_owned)
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
    let n2 = cluster.member(0, "n2").unwrap();
    assert_eq!(n2["alive"], false, "{n2}");

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
    let mut cluster = Cluster::small("blue");
    cluster.start(0);
    cluster.add_web_on_n1();
    // n2 is in cluster "green" and seeds itself with n1.
    cluster.start_in(1, "green");
    wait("n1 counts n2's SYNs", || {
        cluster.rejected(0, "wrong_cluster") > 0
    });
    wait("n2 counts n1's refusals", || {
        cluster.rejected(1, "rejected_by_peer") > 0
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

    // Garbage at n1's gossip port, from the client: not sealed with the cluster's key.
    let target = cluster.gossip_addr(0);
    cluster.mesh.client().in_netns(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for junk in [&b"junk"[..], &[0x53, 0xb0, 0, 9][..], &[0; 100][..]] {
            socket.send_to(junk, target).unwrap();
        }
    });
    wait("n1 counts the unauthenticated datagrams", || {
        cluster.rejected(0, "unauthenticated") >= 3
    });
    let after = cluster.cluster_json(0);
    assert_eq!(after["digest"], before["digest"]);
    assert_eq!(after["table_generation"], before["table_generation"]);
    assert_eq!(after["members"].as_array().unwrap().len(), 1);
    assert_eq!(
        series(
            &scrape(cluster.mesh.node(0)),
            "lbctl_gossip_rejected_messages_total{reason=\"unauthenticated\"}"
        ),
        Some(cluster.rejected(0, "unauthenticated"))
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

/// A new key file in `lbctl`'s state folder, as `lbctl cluster key generate` writes it.
fn new_key_file(lbctl: &Lbctl, name: &str) -> String {
    let path = lbctl.state_dir().join(name);
    let said = lbctl
        .run(&["cluster", "key", "generate", path.to_str().unwrap()])
        .unwrap();
    assert!(said.contains("mode 600"), "{said}");
    path.to_str().unwrap().to_owned()
}

/// A node whose keyring is not the cluster's does not join: the members drop its datagrams
/// (counted as unauthenticated), it gets no service, and the cluster goes on serving. A key
/// file others may read is refused at start, and a cluster needs a key file or `--insecure`.
#[test]
fn a_node_without_the_clusters_key_does_not_join() {
    let mut cluster = Cluster::small("sealed");
    cluster.start(0);
    cluster.start(1);
    cluster.add_web_on_n1();
    wait("n2 gets web through sealed gossip", || {
        !cluster.web_backends(1).is_empty()
    });
    let other_key = new_key_file(&cluster.lbctl[2], "other.key");
    cluster.start_with_key(2, "sealed", &other_key);
    wait("n1 drops n3's datagrams", || {
        cluster.rejected(0, "unauthenticated") > 0
    });
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        let members = cluster.cluster_json(i)["members"].as_array().unwrap().len();
        assert_eq!(members, 2, "n{}: n3 is not a member", i + 1);
    }
    assert!(cluster.web_backends(2).is_empty(), "n3 got nothing");
    assert_eq!(cluster.spread(1, 2), cluster.evenly(&[0], 2));
    let log = cluster.daemons[0].as_ref().unwrap().log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("no key of this node's keyring opens"))
        .count();
    assert_eq!(lines, 1, "logged once for n3: {log}");
    // n3 hears nobody, and says what to check.
    wait("n3 says it hears from no member", || {
        let log = cluster.daemons[2].as_ref().unwrap().log_text();
        log.contains("no member alive for") && log.contains("cluster's key")
    });

    // Refused at start: a key file others may read; no key file and no --insecure.
    cluster.stop(2);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let gossip = cluster.gossip_addr(2).to_string();
    let base = [
        "daemon",
        "--cluster",
        "sealed",
        "--node-name",
        "n3",
        "--gossip-addr",
        &gossip,
    ];
    let err = cluster.lbctl[2]
        .run_expect_fail(&[&base[..], &["--cluster-key-file", &other_key]].concat())
        .unwrap();
    assert!(err.contains("chmod 600"), "{err}");
    let err = cluster.lbctl[2].run_expect_fail(&base).unwrap();
    assert!(
        err.contains("--cluster-key-file") && err.contains("--insecure"),
        "{err}"
    );
    // Names are checked like every name lbctl takes (they end up in logs and metric labels).
    let mut bad_name = base.to_vec();
    bad_name[2] = "blue cluster\n";
    bad_name.push("--insecure");
    let err = cluster.lbctl[2].run_expect_exit(&bad_name, 2).unwrap();
    assert!(err.contains("invalid cluster name"), "{err}");
    // `cluster key generate` does not overwrite.
    let err = cluster.lbctl[2]
        .run_expect_fail(&["cluster", "key", "generate", &other_key])
        .unwrap();
    assert!(err.contains("never overwrites"), "{err}");
    // A key file the daemon's user does not own is refused too.
    std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&other_key, Some(65534), None).unwrap();
    let err = cluster.lbctl[2]
        .run_expect_fail(&[&base[..], &["--cluster-key-file", &other_key]].concat())
        .unwrap();
    assert!(err.contains("owned by uid 65534"), "{err}");
}

/// The hex keys of a key file, in order.
fn keys_in(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// Replaces the key file at `path` with `keys`, at once (a rename), mode 600.
fn write_keys(path: &str, keys: &[&str]) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let staged = format!("{path}.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staged)
        .unwrap();
    std::io::Write::write_all(&mut file, format!("{}\n", keys.join("\n")).as_bytes()).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The IPv4 UDP datagrams in the classic pcap file `path` (as `tcpdump -w` writes): each
/// one's destination and payload.
fn udp_datagrams(path: &std::path::Path) -> Vec<(std::net::Ipv4Addr, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let mut payloads = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &bytes[at + 16..at + 16 + len];
        if let Ok(sliced) = etherparse::SlicedPacket::from_ethernet(frame)
            && let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net
            && let Some(etherparse::TransportSlice::Udp(udp)) = sliced.transport
        {
            payloads.push((ip.header().destination_addr(), udp.payload().to_vec()));
        }
        at += 16 + len;
    }
    payloads
}

/// Sealed gossip holds against what a host on the underlay can do: datagrams captured between
/// two members and sent again, to the member they were for or to the other one (each is
/// sealed for its receiver's address), change nothing and are counted as replayed; a node gossiping in clear
/// (`--insecure`) that knows the cluster's name and publishes `web` pointing to its own
/// address is not heard (unauthenticated). And the keys rotate without a partition while a
/// client keeps connecting: a new key added on every node, then made first, then the old one
/// removed; every step converged, no connection failed.
#[test]
fn replays_and_clear_gossip_change_nothing_and_keys_rotate_without_a_partition() {
    let mut cluster = Cluster::small("rotating");
    // Each node its own copy of the keyring, as on real hosts.
    let key_files: Vec<String> = (0..2)
        .map(|i| {
            let path = cluster.lbctl[i].state_dir().join("node.key");
            let path = path.to_str().unwrap().to_owned();
            write_keys(&path, &[&keys_in(&cluster.key_file)[0]]);
            path
        })
        .collect();
    for (i, key_file) in key_files.iter().enumerate() {
        cluster.start_with_key(i, "rotating", key_file);
    }
    cluster.add_web_on_n1();
    let want = cluster.tasks(&[0]);
    wait("web reaches n2", || cluster.web_backends(1) == want);
    wait("converged", || {
        cluster.converged(0, 2) && cluster.converged(1, 2)
    });

    // Replays: datagrams between n1 and n2 captured on the underlay, each sent again to both:
    // to the member it was for (a counter already taken) and to the other one (sealed for
    // another address; a counter that member never saw, so only the recipient refuses it).
    let capture = cluster.lbctl[0].state_dir().join("gossip.pcap");
    let filter = format!("udp and dst port {GOSSIP_PORT}");
    let tcpdump = cluster
        .mesh
        .underlay()
        .exec([
            "timeout",
            "10",
            "tcpdump",
            "-i",
            lb_tests::mesh::UNDERLAY_BRIDGE,
            "-c",
            "10",
            "-w",
            capture.to_str().unwrap(),
            &filter,
        ])
        .unwrap();
    assert!(tcpdump.status.success(), "{tcpdump:?}");
    let captured = udp_datagrams(&capture);
    assert_eq!(captured.len(), 10);
    let members = [cluster.gossip_addr(0), cluster.gossip_addr(1)];
    for (to, _) in &captured {
        assert!(members.iter().any(|m| m.ip() == to), "{to}");
    }
    let before: Vec<_> = (0..2).map(|i| cluster.cluster_json(i)).collect();
    let replayed_before: Vec<u64> = (0..2).map(|i| cluster.rejected(i, "replayed")).collect();
    cluster.mesh.client().in_netns(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for (_, datagram) in &captured {
            for member in members {
                socket.send_to(datagram, member).unwrap();
            }
        }
    });
    for (i, replayed) in replayed_before.iter().enumerate() {
        wait(&format!("n{} counts all 10 replays", i + 1), || {
            cluster.rejected(i, "replayed") == replayed + 10
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    for (i, (replayed, before)) in replayed_before.iter().zip(&before).enumerate() {
        assert_eq!(
            cluster.rejected(i, "replayed"),
            replayed + 10,
            "n{}: each replay counted once",
            i + 1
        );
        let after = cluster.cluster_json(i);
        assert_eq!(after["table_generation"], before["table_generation"]);
        assert_eq!(cluster.web_backends(i), want);
    }
    // n1 took the datagrams sealed for n2 (if the capture holds any; else n2 those for n1),
    // and says why it dropped them.
    let misdirected_to = if captured.iter().any(|(to, _)| to != members[0].ip()) {
        0
    } else {
        1
    };
    let log = cluster.daemons[misdirected_to].as_ref().unwrap().log_text();
    assert!(
        log.contains("gossip datagram sealed for another address dropped"),
        "{log}"
    );

    // In clear, with the cluster's name and a `web` of its own.
    let evil = format!("{}:80", cluster.mesh.node_ip(2));
    cluster.lbctl[2]
        .run(&["service", "add", "web", &WEB_PORT.to_string(), &evil])
        .unwrap();
    let unauthenticated = cluster.rejected(0, "unauthenticated");
    cluster.start_sealing(2, "rotating", &["--insecure"]);
    wait("n1 drops the clear gossip", || {
        cluster.rejected(0, "unauthenticated") > unauthenticated
    });
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        assert_eq!(cluster.web_backends(i), want, "n{}", i + 1);
        let members = cluster.cluster_json(i)["members"].as_array().unwrap().len();
        assert_eq!(members, 2, "n{}", i + 1);
    }
    let insecure = cluster.cluster_json(2);
    assert!(insecure["keys"].is_null(), "{insecure}");
    assert!(
        cluster.lbctl[2]
            .run(&["cluster", "ls"])
            .unwrap()
            .contains("IN CLEAR")
    );
    // SIGHUP reloads nothing here, and stops nothing (stop below wants exit 0).
    let pid = cluster.daemons[2]
        .as_ref()
        .unwrap()
        .pid()
        .unwrap()
        .to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    wait("the insecure daemon takes SIGHUP", || {
        let log = cluster.daemons[2].as_ref().unwrap().log_text();
        log.contains("SIGHUP: nothing to reload")
    });
    cluster.stop(2);

    // Rotation under load: connections through n2 to n1's task all along.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let addr = SocketAddrV4::new(cluster.mesh.node_ip(1), WEB_PORT);
    let old = keys_in(&key_files[0])[0].clone();
    let new = keys_in(&new_key_file(&cluster.lbctl[1], "new.key"))[0].clone();
    let steps: [&[&str]; 3] = [&[&old, &new], &[&new, &old], &[&new]];
    let (ok, failed) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = cluster
                    .mesh
                    .client()
                    .in_netns(|| client::http_get_new_connection(addr));
                match reply {
                    Ok(_) => ok += 1,
                    Err(err) => failed.push(format!("{err:#}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        for (step, keys) in steps.iter().enumerate() {
            for key_file in &key_files {
                write_keys(key_file, keys);
                // Each node reloads within a second; the next node's file changes after.
                std::thread::sleep(Duration::from_millis(1500));
            }
            wait("converged after the step", || {
                cluster.converged(0, 2) && cluster.converged(1, 2)
            });
            let status = cluster.cluster_json(0);
            assert_eq!(
                status["keys"].as_array().unwrap().len(),
                keys.len(),
                "step {step}"
            );
            println!("rotation step {step}: keys {}", status["keys"]);
        }
        // Both seal with the new key now, as each sees the other's datagrams.
        let new_id = cluster.cluster_json(0)["keys"][0].clone();
        wait("n2 is seen sealing with the new key", || {
            let status = cluster.cluster_json(0);
            status["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["key"] == new_id)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap()
    });
    println!(
        "rotation under load: {ok} connections, {} failed",
        failed.len()
    );
    assert!(ok > 50, "{ok}");
    assert!(failed.is_empty(), "{failed:?}");

    // A member that misses a step is cut off, and each side says so: n1 makes a newer key first
    // while n2's file still lacks it. n2's datagrams still open at n1 (so the failure detector
    // keeps n2 alive there, with the digest it last published), but n2 opens nothing of n1's.
    let newer = keys_in(&new_key_file(&cluster.lbctl[1], "newer.key"))[0].clone();
    let new_id = cluster.cluster_json(0)["keys"][0].clone();
    write_keys(&key_files[0], &[&newer, &new]);
    let newer_id = {
        let mut id = serde_json::Value::Null;
        wait("n1 seals with the newer key", || {
            id = cluster.cluster_json(0)["keys"][0].clone();
            id != new_id
        });
        id
    };
    wait("n1 sees n2 cut off", || {
        cluster
            .cut_off(0, "n2")
            .is_some_and(|why| why.contains("cannot open this node's gossip"))
    });
    wait("n2 sees n1 cut off", || {
        cluster
            .cut_off(1, "n1")
            .is_some_and(|why| why.contains(newer_id.as_str().unwrap()))
    });
    for i in 0..2 {
        let status = cluster.cluster_json(i);
        assert_eq!(status["converged"], false, "n{}: {status}", i + 1);
        let text = cluster.lbctl[i].run(&["cluster", "ls"]).unwrap();
        assert!(text.contains("CUT OFF"), "{text}");
    }
    let n2 = cluster.member(0, "n2").unwrap();
    assert_eq!(n2["alive"], true, "n1 still hears n2: {n2}");
    assert_eq!(n2["agrees"], false, "{n2}");
    let page = scrape(cluster.mesh.node(0));
    assert_eq!(series(&page, "lbctl_cluster_converged"), Some(0), "{page}");
    assert_eq!(
        series(&page, "lbctl_cluster_members_cut_off"),
        Some(1),
        "{page}"
    );
    let log = cluster.daemons[0].as_ref().unwrap().log_text();
    let said = log.matches("cluster member cut off").count();
    assert_eq!(said, 1, "said once: {log}");
    // n2 restarted still without it: it opens nothing, so it lists no member, but it is not
    // alone: its seed (n1) is listed as cut off and it is not converged.
    cluster.stop(1);
    cluster.start_with_key(1, "rotating", &key_files[1]);
    let seed = cluster.gossip_addr(0).to_string();
    wait("the restarted n2 lists its seed as cut off", || {
        cluster.lbctl[1]
            .run(&["cluster", "ls", "--json"])
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|status| {
                status["cut_off_peers"][0]["gossip_addr"] == seed.as_str()
                    && status["converged"] == false
            })
    });
    let text = cluster.lbctl[1].run(&["cluster", "ls"]).unwrap();
    assert!(text.contains("(not a member here): CUT OFF"), "{text}");
    // n2 gets the newer key: converged again, and said.
    write_keys(&key_files[1], &[&newer, &new]);
    wait("converged once n2 has the newer key", || {
        cluster.converged(0, 2) && cluster.converged(1, 2)
    });
    assert_eq!(cluster.cut_off(0, "n2"), None);
    assert_eq!(cluster.cut_off(1, "n1"), None);
    let log = cluster.daemons[0].as_ref().unwrap().log_text();
    assert!(log.contains("no longer cut off"), "{log}");

    // A key file made readable by others is refused on reload: the keys in force stay, and
    // `cluster ls` and the metrics say so until it is put back.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |m| std::fs::set_permissions(&key_files[0], std::fs::Permissions::from_mode(m));
    mode(0o644).unwrap();
    wait("n1 says its key file is refused", || {
        cluster.cluster_json(0)["key_file_refused"]
            .as_str()
            .is_some_and(|why| why.contains("chmod 600"))
    });
    assert!(
        cluster.lbctl[0]
            .run(&["cluster", "ls"])
            .unwrap()
            .contains("KEY FILE REFUSED")
    );
    let page = scrape(cluster.mesh.node(0));
    assert_eq!(
        series(&page, "lbctl_gossip_key_file_refused"),
        Some(1),
        "{page}"
    );
    mode(0o600).unwrap();
    wait("n1's key file is fine again", || {
        cluster.cluster_json(0)["key_file_refused"].is_null()
    });
    assert!(cluster.converged(0, 2));
}
