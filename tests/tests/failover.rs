//! Failover under load, measured with real tools: `hey` (16 workers, a new connection per
//! request) through lbctl while a backend dies, single node with `lbctl daemon` at its default
//! settings and through the mesh. The tests here take the machine's two cores: they run one at
//! a time (`LOAD`), in a binary of their own, so that what they count is lbctl's doing, not
//! another test's load (the connections a killed server had accepted fail whatever the load
//! balancer does, and how many it holds grows with the machine's load).
mod single_node;

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Mutex,
    time::Duration,
};

use lb_tests::{
    Lbctl, client,
    load::{HeyRun, spawn_hey, wait_hey},
    mesh::{HOST_IF, Mesh, MeshSpec},
    prometheus::http_get,
    topology::{NODE_UPLINK, SingleNode, SingleNodeSpec},
};
use single_node::*;

/// Held by each test for its whole run.
static LOAD: Mutex<()> = Mutex::new(());

/// A mesh with lbctl attached on every node, every node knowing the others, and `web` on
/// port [`WEB_PORT`] of every node over every task. Fields drop in order: the instances are
/// purged while their namespaces still exist.
struct Cluster {
    lbctl: Vec<Lbctl>,
    mesh: Mesh,
}

impl Cluster {
    fn build(spec: MeshSpec) -> Cluster {
        lb_tests::require_root().unwrap();
        let mesh = Mesh::build(spec).unwrap();
        let tasks: Vec<String> = (0..mesh.task_count())
            .map(|k| mesh.task_backend(k, false))
            .collect();
        let port = WEB_PORT.to_string();
        let lbctl = (0..mesh.node_count())
            .map(|i| {
                let node = Lbctl::new(mesh.node(i)).unwrap();
                node.run(&["attach", NODE_UPLINK]).unwrap();
                for j in 0..mesh.node_count() {
                    let ip = mesh.node_ip(j).to_string();
                    node.run(&["node", "add", &mesh.node_name(j), &ip]).unwrap();
                }
                let mut args = vec!["service", "add", "web", &port];
                args.extend(tasks.iter().map(String::as_str));
                node.run(&args).unwrap();
                node
            })
            .collect();
        Cluster { lbctl, mesh }
    }

    fn addr(&self, node: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.mesh.node_ip(node), port)
    }

    /// `count` HTTP requests to `node`'s published port, each on a new connection.
    fn new_connections(&self, node: usize, count: usize) -> Vec<client::Reply> {
        self.mesh.new_connections(node, WEB_PORT, count).unwrap()
    }

    fn reason(&self, node: usize, reason: &str) -> u64 {
        self.lbctl[node].reason_packets(reason).unwrap()
    }
}

/// `hey` (16 workers, a new connection per request) through the node for `duration`, with
/// `fail` done to a backend two seconds in; returns hey's report, printed.
fn load_while(
    topo: &mut SingleNode,
    what: &str,
    duration: Duration,
    fail: impl FnOnce(&mut SingleNode),
) -> HeyRun {
    let url = format!("http://{}:{WEB_PORT}/", topo.node_uplink_ip());
    let hey = spawn_hey(topo.client(), &url, duration, 16).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    fail(topo);
    let run = wait_hey(hey).unwrap();
    println!("{what}: {}; errors: {:?}", run.summary(), run.errors);
    run
}

/// A backend that dies under load costs almost no request, with the default settings (checks
/// every 2 s, fall 3; ejection after 3 failed connections): the data plane drops the dead
/// backend's refusals (the clients' retransmitted SYNs choose again) and ejects it on the third
/// failure, before the active checks would notice; the daemon hands it to them, and it is back
/// once its server is. A backend whose link goes down (its SYNs unanswered) likewise.
#[test]
fn a_backend_that_dies_under_load_fails_almost_no_request() {
    let _alone = LOAD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let spec = SingleNodeSpec {
        backends: 4,
        uplink_subnet: [192, 168, 141],
        task_subnet: [10, 41, 0],
        ..SingleNodeSpec::default()
    };
    let (mut topo, lbctl) = published(spec);
    let metrics: SocketAddr = "127.0.0.1:9641".parse().unwrap();
    let daemon = lbctl.start_daemon(metrics, topo.node()).unwrap();
    for i in 0..topo.backend_count() {
        wait_for_health(&lbctl, &topo, i, "healthy");
    }
    let killed = 1;
    let run = load_while(&mut topo, "server killed", Duration::from_secs(8), |topo| {
        topo.stop_backend(killed).unwrap()
    });
    assert!(run.failed() <= 10, "{run:?}");
    assert!(run.ok >= 1000, "{run:?}");
    let backend = backend_json(&lbctl, &topo, killed);
    assert!(backend["refused"].as_u64().unwrap() >= 3, "{backend}");
    assert!(backend["ejections"].as_u64().unwrap() >= 1, "{backend}");
    assert_eq!(
        backend["health"], "unhealthy",
        "handed to the active checks"
    );
    let log = daemon.log_text();
    let addr = topo.backend_addr(killed).to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("backend ejected") && l.contains(&addr)),
        "{log}"
    );
    // The daemon holds the ejection past the data plane's own 10 s while the checks fail.
    std::thread::sleep(Duration::from_secs(5));
    let backend = backend_json(&lbctl, &topo, killed);
    assert_eq!(backend["ejected"], true, "held: {backend}");
    // Back with its server: healthy after `rise` probes, the ejection ended and counted.
    topo.start_backend(killed).unwrap();
    wait_for_health(&lbctl, &topo, killed, "healthy");
    let backend = backend_json(&lbctl, &topo, killed);
    assert_eq!(backend["ejected"], false, "{backend}");
    let (_, page) = topo
        .node()
        .in_netns(|| http_get(metrics, "/metrics"))
        .unwrap();
    let returns = format!(
        "lbctl_backend_ejection_returns_total{{service=\"web\",backend=\"{addr}\",node=\"\"}} 1"
    );
    assert!(page.contains(&returns), "{page}");
    let replies = new_connections(&topo, 8);
    assert_eq!(
        client::per_backend(&replies),
        expected(&topo, &[0, 1, 2, 3], 2)
    );

    // Its link down: SYNs unanswered, each connection that met it about 3 s late.
    let vanished = 2;
    let run = load_while(&mut topo, "link down", Duration::from_secs(10), |topo| {
        topo.backend_ns(vanished)
            .ip(["link", "set", "eth0", "down"])
            .unwrap();
    });
    assert!(run.failed() <= 10, "{run:?}");
    let backend = backend_json(&lbctl, &topo, vanished);
    assert!(backend["unanswered"].as_u64().unwrap() >= 3, "{backend}");
    assert!(backend["ejections"].as_u64().unwrap() >= 1, "{backend}");
}

/// Under load through one node (`hey`, 16 workers, a new connection per request), a task on
/// another node whose server is killed, then one whose link goes down on a third, costs almost
/// no request: the refusals cross the mesh back to the node that balanced them, whose data
/// plane drops them and ejects the task on its third failure, as it does unanswered SYNs (no
/// daemon, no gossip needed). The killed task is back in the turns once its server is and its
/// ejection has run out.
#[test]
fn tasks_that_die_under_load_through_the_mesh_fail_almost_no_request() {
    let _alone = LOAD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cluster = Cluster::build(MeshSpec {
        tasks_per_node: vec![1, 2, 2],
        underlay_subnet: [192, 168, 143],
        overlay_subnet: [10, 43, 0],
        ..MeshSpec::default()
    });
    let ingress = 0;
    let url = format!("http://{}/", cluster.addr(ingress, WEB_PORT));
    let backend_json = |cluster: &Cluster, task: usize| -> serde_json::Value {
        let addr = cluster.mesh.task_addr(task).to_string();
        cluster.lbctl[ingress].listed_backend("web", &addr).unwrap()
    };
    let load_while = |cluster: &mut Cluster, what: &str, fail: &dyn Fn(&mut Cluster)| {
        let hey = spawn_hey(cluster.mesh.client(), &url, Duration::from_secs(9), 16).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        fail(cluster);
        let run = wait_hey(hey).unwrap();
        println!(
            "through the mesh, {what}: {}; errors: {:?}",
            run.summary(),
            run.errors
        );
        assert!(run.failed() <= 10, "{what}: {run:?}");
        assert!(run.ok >= 500, "{what}: {run:?}");
    };
    let killed = cluster.mesh.tasks_on(1).start;
    load_while(&mut cluster, "a task's server killed", &|cluster| {
        cluster.mesh.stop_task(killed).unwrap()
    });
    let backend = backend_json(&cluster, killed);
    assert!(backend["refused"].as_u64().unwrap() >= 3, "{backend}");
    assert!(backend["ejections"].as_u64().unwrap() >= 1, "{backend}");
    assert!(cluster.reason(ingress, "drop_backend_refused") >= 3);
    cluster.mesh.start_task(killed).unwrap();
    let back = std::time::Instant::now();
    let name = cluster.mesh.task_name(killed);
    while !cluster
        .new_connections(ingress, cluster.mesh.task_count())
        .iter()
        .any(|reply| reply.backend == name)
    {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "{name} is not back: {}",
            backend_json(&cluster, killed)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "{name} back in the turns {:?} after its server",
        back.elapsed()
    );

    let vanished = cluster.mesh.tasks_on(2).start;
    load_while(&mut cluster, "a task's link down", &|cluster| {
        cluster
            .mesh
            .task_ns(vanished)
            .ip(["link", "set", HOST_IF, "down"])
            .unwrap();
    });
    let backend = backend_json(&cluster, vanished);
    assert!(backend["unanswered"].as_u64().unwrap() >= 3, "{backend}");
    assert!(backend["ejections"].as_u64().unwrap() >= 1, "{backend}");
}
