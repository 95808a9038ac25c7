//! End to end against a real two-node Docker Swarm: Debian's dockerd runs in node n1's
//! namespace (the manager) and in n2's (a worker), each with its own data root, exec root and
//! API socket, with a service of `busybox httpd` tasks on an overlay network, published through
//! lbctl by its container label `lbctl.publish`. n1's and n2's `lbctl daemon --docker
//! --cluster` follow their own Engine and gossip their own tasks; n3 runs lbctl only and carries
//! every task through the mesh. A client on the underlay connects to every node's published
//! port. Checked: exact round-robin over the tasks with the client's address kept, through the
//! Swarm node itself and through the mesh; scaling up (the time from `docker service scale` to
//! the new tasks taking connections is printed) and down (connections to surviving tasks stay);
//! a task killed leaves the rotation; the worker's dockerd restarted and lbctl's daemon
//! restarted lose nothing; a second service's Docker health checks decide which of its tasks
//! take new flows.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, Lbctl, client,
    docker::{self, Dockerd, HTTPD_IMAGE, Whoami},
    mesh::{Mesh, MeshSpec},
    topology::NODE_UPLINK,
};

/// The port every node publishes, and the tasks' own.
const PUBLISHED: u16 = 8181;
const TARGET: u16 = 80;
/// The second service's port, whose tasks have a Docker health check.
const API_PORT: u16 = 8282;
const API_PUBLISH: &str = "lbctl.publish=8282:80";
/// The port `web` moves to.
const NEW_PORT: u16 = 8383;
const NEW_PUBLISH: &str = "lbctl.publish=8383:80";
/// lbctl's gossip port here: Swarm's own memberlist holds 7946 on the Swarm node.
const GOSSIP_PORT: u16 = 7947;
const GOSSIP_INTERVAL: &str = "200ms";
/// lbctl's VXLAN port: Docker's overlay networks hold 4789 (and VNI 4096, lbctl's default).
const MESH_PORT: &str = "4790";
/// The Swarm's overlay network for the service, away from Docker's default pool.
const OVERLAY_SUBNET: &str = "10.47.3.0/24";
const METRICS: &str = "127.0.0.1:9617";
/// Longest any step may take here (CI machines are slow and shared).
const WITHIN: Duration = Duration::from_secs(60);

/// The nodes that run a dockerd: n1 (the Swarm's manager) and n2 (a worker).
const SWARM_NODES: usize = 2;

/// Fields drop in order: daemons stop, the dockerds stop (their tasks with them; the worker
/// first), the instances are purged, then the namespaces go.
struct Swarm {
    daemons: Vec<Option<Daemon>>,
    /// The worker's, then the manager's: dropped in that order.
    dockerds: Vec<Dockerd>,
    lbctl: Vec<Lbctl>,
    mesh: Mesh,
}

impl Swarm {
    fn build() -> Swarm {
        lb_tests::require_root().unwrap();
        let mesh = Mesh::build(MeshSpec {
            nodes: 3,
            tasks_per_node: vec![0, 0, 0],
            underlay_subnet: [172, 29, 44],
            overlay_subnet: [10, 201, 7],
            ..MeshSpec::default()
        })
        .unwrap();
        let lbctl: Vec<Lbctl> = (0..3)
            .map(|i| {
                let node = Lbctl::new(mesh.node(i)).unwrap();
                node.run(&["attach", NODE_UPLINK]).unwrap();
                node.run(&["mesh", "set", "--vxlan-port", MESH_PORT])
                    .unwrap();
                node
            })
            .collect();
        let mut dockerds: Vec<Dockerd> = (0..SWARM_NODES)
            .rev()
            .map(|i| Dockerd::start(mesh.node(i)).unwrap())
            .collect();
        let manager = dockerds.pop().unwrap();
        let worker = dockerds.pop().unwrap();
        let swarm = Swarm {
            daemons: vec![None, None, None],
            dockerds: vec![worker, manager],
            lbctl,
            mesh,
        };
        let n1 = swarm.mesh.node_ip(0).to_string();
        swarm.docker(0, &["swarm", "init", "--advertise-addr", &n1]);
        let token = swarm.docker(0, &["swarm", "join-token", "-q", "worker"]);
        let (n2, manager) = (swarm.mesh.node_ip(1).to_string(), format!("{n1}:2377"));
        swarm.docker(
            1,
            &[
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &n2,
                &manager,
            ],
        );
        for node in 0..SWARM_NODES {
            swarm.dockerd(node).import_httpd_image().unwrap();
        }
        swarm
    }

    /// The dockerd of node `i` (0: the manager, 1: the worker).
    fn dockerd(&self, i: usize) -> &Dockerd {
        &self.dockerds[SWARM_NODES - 1 - i]
    }

    /// The cluster's key file, made by `lbctl cluster key generate` in n1's state folder.
    fn key_file(&self) -> String {
        let path = self.lbctl[0].state_dir().join("cluster.key");
        if !path.exists() {
            self.lbctl[0]
                .run(&["cluster", "key", "generate", path.to_str().unwrap()])
                .unwrap();
        }
        path.to_str().unwrap().to_owned()
    }

    fn dockerd_mut(&mut self, i: usize) -> &mut Dockerd {
        &mut self.dockerds[SWARM_NODES - 1 - i]
    }

    fn start_daemon(&mut self, i: usize) {
        let key_file = self.key_file();
        let (node, gossip, seed, host) = (
            self.mesh.node_name(i),
            SocketAddrV4::new(self.mesh.node_ip(i), GOSSIP_PORT).to_string(),
            SocketAddrV4::new(self.mesh.node_ip(0), GOSSIP_PORT).to_string(),
            (i < SWARM_NODES).then(|| self.dockerd(i).host()),
        );
        let mut args = vec![
            "--cluster",
            "swarm-e2e",
            "--cluster-key-file",
            &key_file,
            "--node-name",
            &node,
            "--gossip-addr",
            &gossip,
            "--gossip-interval",
            GOSSIP_INTERVAL,
        ];
        if let Some(host) = &host {
            args.extend(["--docker", "--docker-host", host]);
        }
        if i > 0 {
            args.extend(["--seed", &seed]);
        }
        let daemon = self.lbctl[i]
            .start_daemon_with(METRICS.parse().unwrap(), self.mesh.node(i), &args)
            .unwrap();
        self.daemons[i] = Some(daemon);
    }

    fn stop_daemon(&mut self, i: usize) {
        let status = self.daemons[i].take().unwrap().stop().unwrap();
        assert!(status.success(), "n{}'s daemon: {status}", i + 1);
    }

    /// `docker ARGS` against node `i`'s dockerd.
    fn docker(&self, i: usize, args: &[&str]) -> String {
        self.dockerd(i).docker(args).unwrap()
    }

    /// The published port of node `i`.
    fn published(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.mesh.node_ip(i), PUBLISHED)
    }

    /// One request on a new connection from the client to node `i`.
    fn ask(&self, i: usize) -> anyhow::Result<Whoami> {
        let addr = self.published(i);
        self.mesh.client().in_netns(|| docker::whoami(addr))
    }

    /// `count` requests to node `i`: answers per task, and how many failed.
    fn spread(&self, i: usize, count: usize) -> (BTreeMap<String, usize>, usize) {
        let mut per_task = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..count {
            match self.ask(i) {
                Ok(answer) => {
                    assert_eq!(
                        answer.client,
                        self.mesh.client_ip().to_string(),
                        "the task saw the client's own address"
                    );
                    *per_task.entry(answer.task).or_insert(0) += 1;
                }
                Err(_) => failed += 1,
            }
        }
        (per_task, failed)
    }

    /// `per` requests per task to every node: each task answers exactly `per`, none fails.
    fn assert_evenly(&self, tasks: &BTreeMap<String, Ipv4Addr>, per: usize) {
        let evenly: BTreeMap<String, usize> = tasks.keys().map(|t| (t.clone(), per)).collect();
        for node in 0..3 {
            let (spread, failed) = self.spread(node, per * tasks.len());
            assert_eq!(
                (spread, failed),
                (evenly.clone(), 0),
                "through n{}",
                node + 1
            );
        }
    }

    /// The tasks Docker runs on every Swarm node: hostname (short container id) → overlay
    /// address.
    fn running_tasks(&self) -> BTreeMap<String, Ipv4Addr> {
        self.running("web")
    }

    /// The tasks of Swarm service `service` on every Swarm node.
    fn running(&self, service: &str) -> BTreeMap<String, Ipv4Addr> {
        (0..SWARM_NODES)
            .flat_map(|i| self.service_tasks_of(i, service))
            .collect()
    }

    /// The tasks of `web` node `i`'s dockerd runs.
    fn tasks_of(&self, i: usize) -> BTreeMap<String, Ipv4Addr> {
        self.service_tasks_of(i, "web")
    }

    /// The tasks of Swarm service `service` node `i`'s dockerd runs.
    fn service_tasks_of(&self, i: usize, service: &str) -> BTreeMap<String, Ipv4Addr> {
        let dockerd = self.dockerd(i);
        let filter = format!("label=com.docker.swarm.service.name={service}");
        let Ok(ids) = dockerd.docker(&["ps", "-q", "--filter", &filter]) else {
            return BTreeMap::new(); // Restarting.
        };
        // A container starting or stopping has no address yet, or any more; one gone between
        // the list and the inspect is not running.
        ids.lines()
            .filter_map(|id| {
                let addr = dockerd
                    .docker(&[
                        "inspect",
                        "--format",
                        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                        id,
                    ])
                    .ok()?;
                Some((id[..12].to_owned(), addr.parse().ok()?))
            })
            .collect()
    }

    /// The backends of `web` in node `i`'s table.
    fn backends(&self, i: usize) -> BTreeSet<Ipv4Addr> {
        self.health(i, "web").into_keys().collect()
    }

    /// The backends of `service` in node `i`'s table, with their health as lbctl has it.
    fn health(&self, i: usize, service: &str) -> BTreeMap<Ipv4Addr, String> {
        let Ok(text) = self.lbctl[i].run(&["service", "ls", "--json"]) else {
            return BTreeMap::new();
        };
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        doc["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == service)
            .flat_map(|s| s["backends"].as_array().unwrap().clone())
            .map(|b| {
                let addr = b["address"].as_str().unwrap().split(':').next().unwrap();
                (
                    addr.parse().unwrap(),
                    b["health"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Waits until every node's table holds exactly the tasks Docker runs, `count` of them.
    fn wait_for_tasks(&self, count: usize, what: &str) -> BTreeMap<String, Ipv4Addr> {
        let mut tasks = BTreeMap::new();
        wait(what, || {
            tasks = self.running_tasks();
            let addrs: BTreeSet<Ipv4Addr> = tasks.values().copied().collect();
            tasks.len() == count && (0..3).all(|i| self.backends(i) == addrs)
        });
        tasks
    }
}

/// Seconds since the Unix epoch of Docker's RFC 3339 UTC time (`2026-12-02T14:02:50.92Z`).
fn unix_seconds(rfc3339: &str) -> f64 {
    let (date, time) = rfc3339
        .trim()
        .trim_end_matches('Z')
        .split_once('T')
        .unwrap();
    let mut ymd = date.split('-').map(|v| v.parse::<i64>().unwrap());
    let (y, m, d) = (
        ymd.next().unwrap(),
        ymd.next().unwrap(),
        ymd.next().unwrap(),
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next().unwrap().parse::<f64>().unwrap(),
        hms.next().unwrap().parse::<f64>().unwrap(),
    );
    let sec: f64 = hms.next().unwrap().parse().unwrap();
    days as f64 * 86_400.0 + h * 3_600.0 + min * 60.0 + sec
}

fn wait(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WITHIN, "not within {WITHIN:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn a_swarm_service_published_through_lbctl_follows_scaling_failures_health_and_restarts() {
    assert!((unix_seconds("2026-12-02T14:02:50.92Z") - 1_796_220_170.92).abs() < 1e-3);
    let mut swarm = Swarm::build();
    swarm.docker(
        0,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            OVERLAY_SUBNET,
            "appnet",
        ],
    );
    let publish = format!("lbctl.publish={PUBLISHED}:{TARGET}");
    swarm.docker(
        0,
        &[
            "service",
            "create",
            "-d",
            "--no-resolve-image",
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "appnet",
            "--endpoint-mode",
            "dnsrr",
            "--stop-grace-period",
            "1s",
            "--container-label",
            &publish,
            HTTPD_IMAGE,
        ],
    );
    for i in 0..3 {
        swarm.start_daemon(i);
    }
    let tasks = swarm.wait_for_tasks(3, "3 tasks in every node's table");
    // Tasks on both Swarm nodes, each published by its own node's daemon (`ADDR@NODE`).
    let listed: serde_json::Value =
        serde_json::from_str(&swarm.lbctl[2].run(&["service", "ls", "--json"]).unwrap()).unwrap();
    let node_of: BTreeMap<String, String> = listed["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for node in 0..SWARM_NODES {
        let own = swarm.tasks_of(node);
        assert!(!own.is_empty(), "Swarm placed no task on n{}", node + 1);
        for addr in own.values() {
            let name = format!("n{}", node + 1);
            assert_eq!(
                node_of.get(&format!("{addr}:{TARGET}")),
                Some(&name),
                "{node_of:?}"
            );
        }
    }
    let listed = swarm.lbctl[1].run(&["service", "ls"]).unwrap();
    assert!(listed.contains("web tcp/8181 from Docker"), "{listed}");
    let metrics: std::net::SocketAddr = METRICS.parse().unwrap();
    let (status, page) = swarm
        .mesh
        .node(0)
        .in_netns(|| lb_tests::prometheus::http_get(metrics, "/metrics"))
        .unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("\nlbctl_docker_engine_up 1\n"), "{page}");
    assert!(
        page.contains("\nlbctl_docker_table_changes_total "),
        "{page}"
    );
    let refused = swarm.lbctl[0]
        .run_expect_fail(&["service", "rm", "web"])
        .unwrap();
    assert!(refused.contains("follows Docker"), "{refused}");

    // Exactly round-robin, the client's address kept: on the Swarm node and through the mesh.
    swarm.assert_evenly(&tasks, 10);

    // Scale to 5: new connections reach the new tasks, through the mesh too.
    let start = Instant::now();
    swarm.docker(0, &["service", "scale", "-d", "web=5"]);
    let mut failed = 0;
    let mut seen = BTreeSet::new();
    wait("the 5 tasks taking connections through n2", || {
        seen.clear();
        for _ in 0..5 {
            match swarm.ask(1) {
                Ok(answer) => {
                    seen.insert(answer.task);
                }
                Err(_) => failed += 1,
            }
        }
        seen.len() == 5
    });
    let took = start.elapsed();
    let all_answering = std::time::SystemTime::now();
    // lbctl's share: from the last of the new containers starting (Docker's own clock) to
    // every task answering through another node.
    let last_started = (0..SWARM_NODES)
        .flat_map(|i| {
            swarm
                .tasks_of(i)
                .into_keys()
                .map(move |task| (i, task))
                .collect::<Vec<_>>()
        })
        .map(|(i, task)| {
            unix_seconds(&swarm.docker(i, &["inspect", "--format", "{{.State.StartedAt}}", &task]))
        })
        .fold(0.0, f64::max);
    let since_start = all_answering
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - last_started;
    println!(
        "docker service scale web=5 → the 5 tasks taking connections through n2: {took:?} ({failed} failed requests meanwhile); {since_start:.2} s after the last new container started"
    );
    assert_eq!(failed, 0, "no request fails while the service scales up");
    let tasks = swarm.wait_for_tasks(5, "5 tasks in every node's table");
    swarm.assert_evenly(&tasks, 4);

    // Connections open to every task (5 new flows in a row through n2: one each), idle while
    // the service scales down to 2: those to the tasks that remain are answered by them.
    let kept: Vec<_> = (0..5)
        .map(|_| {
            let addr = swarm.published(1);
            swarm
                .mesh
                .client()
                .in_netns(|| client::connect(addr))
                .unwrap()
        })
        .collect();
    // Meanwhile new connections keep coming through n3: Swarm's stop signal drains a task
    // before it exits, so none of them fails.
    swarm.docker(0, &["service", "scale", "-d", "web=2"]);
    let mut failed = 0;
    let mut survivors = BTreeMap::new();
    wait("2 tasks in every node's table", || {
        failed += swarm.spread(2, 3).1;
        survivors = swarm.running_tasks();
        let addrs: BTreeSet<Ipv4Addr> = survivors.values().copied().collect();
        survivors.len() == 2 && (0..3).all(|i| swarm.backends(i) == addrs)
    });
    assert_eq!(
        failed, 0,
        "no new connection fails while the service scales down"
    );
    let answered: Vec<String> = kept
        .into_iter()
        .filter_map(|stream| docker::ask(stream).ok().map(|w| w.task))
        .collect();
    assert_eq!(
        answered.iter().cloned().collect::<BTreeSet<_>>(),
        survivors.keys().cloned().collect::<BTreeSet<_>>(),
        "each surviving task answers on the connection it had"
    );
    assert_eq!(answered.len(), 2, "{answered:?}");
    swarm.assert_evenly(&survivors, 5);

    // A task killed: it leaves every table, Swarm's replacement joins.
    let victim = survivors.keys().next().unwrap().clone();
    let host = (0..SWARM_NODES)
        .find(|&i| swarm.tasks_of(i).contains_key(&victim))
        .unwrap();
    swarm.docker(host, &["kill", &victim]);
    let took = wait("the killed task out of every table", || {
        (0..3).all(|i| !swarm.backends(i).contains(&survivors[&victim]))
    });
    println!("docker kill: the task left every node's table within {took:?}");
    let tasks = swarm.wait_for_tasks(2, "Swarm's replacement in every node's table");
    assert!(!tasks.contains_key(&victim));
    swarm.assert_evenly(&tasks, 5);

    // The worker's dockerd stopped: its tasks stop with it (no live-restore) and leave every
    // table, though its Engine cannot say so, while the manager's serve on; once it is back,
    // the tables follow the tasks Swarm runs then.
    assert!(
        !swarm.tasks_of(1).is_empty(),
        "a task on the worker: {tasks:?}"
    );
    swarm.dockerd_mut(1).stop().unwrap();
    let managers: BTreeMap<String, Ipv4Addr> = swarm.tasks_of(0);
    let took = wait("the worker's exited tasks out of every table", || {
        let addrs: BTreeSet<Ipv4Addr> = swarm.tasks_of(0).values().copied().collect();
        (0..3).all(|i| swarm.backends(i) == addrs)
    });
    println!("the worker's dockerd stopped: its tasks left every table within {took:?}");
    let (spread, failed) = swarm.spread(2, 6);
    assert_eq!(failed, 0, "{spread:?}");
    assert!(
        spread
            .keys()
            .all(|t| managers.contains_key(t) || swarm.tasks_of(0).contains_key(t))
    );
    swarm.dockerd_mut(1).restart().unwrap();
    let tasks = swarm.wait_for_tasks(2, "the tasks after dockerd's restart");
    wait("the tasks answering after dockerd's restart", || {
        swarm.spread(1, 4).1 == 0
    });
    swarm.assert_evenly(&tasks, 5);

    // lbctl's daemon restarted on the Swarm node: same table, same backend ids, still served.
    let ids: Vec<String> = (0..3)
        .map(|i| swarm.lbctl[i].run(&["service", "ls", "--json"]).unwrap())
        .collect();
    let ids_of = |text: &str| -> Vec<(String, u64)> {
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
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
    };
    swarm.stop_daemon(0);
    swarm.start_daemon(0);
    std::thread::sleep(Duration::from_secs(2));
    for (i, before) in ids.iter().enumerate() {
        let now = swarm.lbctl[i].run(&["service", "ls", "--json"]).unwrap();
        assert_eq!(
            ids_of(&now),
            ids_of(before),
            "n{}'s backends after the restart",
            i + 1
        );
    }
    swarm.assert_evenly(&tasks, 5);

    // Docker's health checks decide when lbctl's are off (the default for a task with a
    // HEALTHCHECK): both tasks of `api` start failing theirs (no /ok yet, within the start
    // period, so Swarm keeps them: `starting`), and lbctl fails open; each task then made
    // healthy takes new flows, the other none, on every node.
    swarm.docker(
        0,
        &[
            "service",
            "create",
            "-d",
            "--no-resolve-image",
            "--name",
            "api",
            "--replicas",
            "2",
            "--network",
            "appnet",
            "--endpoint-mode",
            "dnsrr",
            "--stop-grace-period",
            "1s",
            "--health-cmd",
            "test -f /ok",
            "--health-interval",
            "500ms",
            "--health-retries",
            "1",
            "--health-start-period",
            "5m",
            "--container-label",
            API_PUBLISH,
            HTTPD_IMAGE,
        ],
    );
    let mut api = BTreeMap::new();
    wait(
        "api's 2 starting tasks unhealthy in every node's table",
        || {
            api = swarm.running("api");
            let addrs: BTreeSet<Ipv4Addr> = api.values().copied().collect();
            api.len() == 2
                && (0..3).all(|i| {
                    let health = swarm.health(i, "api");
                    health.keys().copied().collect::<BTreeSet<_>>() == addrs
                        && health.values().all(|h| h == "unhealthy")
                })
        },
    );
    let listed = swarm.lbctl[2].run(&["service", "ls"]).unwrap();
    assert!(listed.contains("api tcp/8282 from Docker"), "{listed}");
    assert!(listed.contains("FAILING OPEN"), "{listed}");
    let (first, second) = {
        let mut tasks = api.iter();
        (tasks.next().unwrap(), tasks.next().unwrap())
    };
    let exec_touch = |task: &str| {
        let host = (0..SWARM_NODES)
            .find(|&i| swarm.service_tasks_of(i, "api").contains_key(task))
            .unwrap();
        swarm.docker(host, &["exec", task, "touch", "/ok"]);
    };
    let start = Instant::now();
    exec_touch(first.0);
    wait("the healthy task healthy in every node's table", || {
        (0..3).all(|i| swarm.health(i, "api").get(first.1).map(String::as_str) == Some("healthy"))
    });
    println!(
        "docker exec touch /ok → the task healthy in every node's table: {:?}",
        start.elapsed()
    );
    let api_port = SocketAddrV4::new(swarm.mesh.node_ip(2), API_PORT);
    for _ in 0..6 {
        let answer = swarm
            .mesh
            .client()
            .in_netns(|| docker::whoami(api_port))
            .unwrap();
        assert_eq!(
            &answer.task, first.0,
            "only the healthy task takes new flows"
        );
    }
    exec_touch(second.0);
    wait("both tasks healthy in every node's table", || {
        (0..3).all(|i| swarm.health(i, "api").values().all(|h| h == "healthy"))
    });
    let answers: BTreeSet<String> = (0..6)
        .map(|_| {
            swarm
                .mesh
                .client()
                .in_netns(|| docker::whoami(api_port))
                .unwrap()
                .task
        })
        .collect();
    assert_eq!(answers, api.keys().cloned().collect::<BTreeSet<_>>());

    // A new published port through the label (a rolling update): every node follows, the old
    // port is free again.
    swarm.docker(
        0,
        &[
            "service",
            "update",
            "-d",
            "--container-label-add",
            NEW_PUBLISH,
            "web",
        ],
    );
    let new_port = |i: usize| SocketAddrV4::new(swarm.mesh.node_ip(i), NEW_PORT);
    let took = wait("every node answering on the new port", || {
        (0..3).all(|i| {
            swarm
                .mesh
                .client()
                .in_netns(|| docker::whoami(new_port(i)))
                .is_ok()
        }) && (0..3).all(|i| {
            let listed = swarm.lbctl[i].run(&["service", "ls"]).unwrap_or_default();
            listed.contains(&format!("web tcp/{NEW_PORT} from Docker"))
        })
    });
    println!(
        "docker service update --container-label-add {NEW_PUBLISH}: every node on the new port within {took:?}"
    );
    let tasks = swarm.wait_for_tasks(2, "the updated tasks in every node's table");
    wait("the updated tasks answering on the new port", || {
        let answers: BTreeSet<String> = (0..4)
            .filter_map(|_| {
                swarm
                    .mesh
                    .client()
                    .in_netns(|| docker::whoami(new_port(2)))
                    .ok()
            })
            .map(|w| w.task)
            .collect();
        answers == tasks.keys().cloned().collect()
    });
    for i in 0..3 {
        let old = swarm.published(i);
        client::assert_refused(
            swarm.mesh.client().in_netns(|| client::connect(old)),
            &format!("the old port through n{}", i + 1),
        );
    }
}
