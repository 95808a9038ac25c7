//! The gossiped cluster with real daemons (issue 18): N `lbctl daemon --cluster` in namespaces
//! on one underlay bridge (the mesh topology, no tasks), each instance attached with a small
//! flow table (`--flow-capacity 4096`: at the default capacity 50 instances would hold about
//! 16 GB of kernel memory) and without the socket programs (one node, one instance: N instances'
//! programs on the one cgroup root would each run for every socket of the machine).
//!
//! Every node publishes one task of service `web` (an address of its overlay, health checks off,
//! so that nothing changes the table but what is measured). Measured, from each daemon's own
//! log (`--log-json`: the line `applied the cluster's merged table`, written once the maps are,
//! with its timestamp and what changed):
//! - a change: `lbctl service add` of a new service on one node (not the seed) until each other
//!   node applied it; then its `service rm`, likewise. Every round on another node.
//! - a failure: one daemon killed with SIGKILL (a crash: it tells nobody; SIGTERM is the same to
//!   the others, the daemon's shutdown sends no goodbye either) until each other node removed
//!   its task, the failure detector having declared it dead.
//! - CPU at rest: each daemon's user + system time (`/proc/PID/stat`) over an idle window, once
//!   every node agrees, as % of one core.
//!
//! Reported: the median over every node and round, and the time until the last node, median
//! round and slowest round. Every node must apply every change and drop every killed node's
//! task (its `service ls` is checked too), or the section fails, smoke run included.
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::mesh::{Mesh, MeshSpec};
use lb_tests::topology::NODE_UPLINK;
use lb_tests::{Daemon, Lbctl};

use crate::Options;
use crate::report::{Measurement, names};

/// The fewest nodes: a seed, a node that changes the table and a node that is killed.
pub const MIN_NODES: usize = 3;
/// The most nodes the mesh's underlay plan holds.
pub const MAX_NODES: usize = 90;
const DEFAULT_NODES: usize = 50;
const SMOKE_NODES: usize = 3;
/// Flows each instance's flow table holds.
const FLOW_CAPACITY: &str = "4096";
const CLUSTER: &str = "lbbench";
/// Docker Swarm's gossip port, lbctl's default.
const GOSSIP_PORT: u16 = 7946;
/// Every daemon serves metrics on its own namespace's loopback.
const METRICS: &str = "127.0.0.1:9617";
const SERVICE: &str = "web";
const WEB_PORT: u16 = 8080;
/// Ports of the services the change rounds add.
const PROBE_PORT: u16 = 9000;
/// The log line a daemon writes once it applied a merged table that changed.
const APPLIED: &str = "applied the cluster's merged table";
/// How long every node may take to join, and a change or a failure to reach every node, before
/// the section fails.
const JOIN_WITHIN: Duration = Duration::from_secs(180);
const WITHIN: Duration = Duration::from_secs(60);
/// Instances attached at once (BPF verification is CPU-bound).
const ATTACH_WORKERS: usize = 2;

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let nodes = opts.nodes.unwrap_or(if opts.smoke {
        SMOKE_NODES
    } else {
        DEFAULT_NODES
    });
    let (change_rounds, failures, settle, rest) = if opts.smoke {
        (1, 1, Duration::from_millis(500), Duration::from_secs(1))
    } else {
        (5, 3, Duration::from_secs(2), Duration::from_secs(10))
    };
    let mut settings = Vec::new();
    let mut variant = format!("{nodes} nodes");
    if let Some(interval) = &opts.gossip_interval {
        settings.extend(["--gossip-interval".to_owned(), interval.clone()]);
        variant.push_str(&format!(", gossip every {interval}"));
    }
    if let Some(phi) = &opts.phi_threshold {
        settings.extend(["--phi-threshold".to_owned(), phi.clone()]);
        variant.push_str(&format!(", phi {phi}"));
    }

    let _neighbours = NeighbourLimits::raise(nodes)?;
    let started = Instant::now();
    let mut cluster = Cluster::build(nodes)?;
    println!(
        "cluster: {nodes} nodes attached in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    cluster.start_daemons(&settings)?;
    cluster.wait_joined()?;
    let joined = started.elapsed();
    println!(
        "cluster: {nodes} daemons started and agreed in {:.1}s",
        joined.as_secs_f64()
    );

    std::thread::sleep(settle);
    let cpu = cluster.cpu_at_rest(rest)?;

    let mut adds = Rounds::default();
    let mut removes = Rounds::default();
    let mut commands = Vec::new();
    let mut apply_cpu = Vec::new();
    let at_rest: f64 = cpu.iter().sum::<f64>() / 100.0;
    for round in 0..change_rounds {
        // Changers spread over the nodes, never the seed (every node knows it first).
        let changer = 1 + (round * 7) % (nodes - 1);
        let change = cluster.change(changer, round)?;
        println!(
            "cluster: service add on {} (the command {:.0} ms): first node {:.0} ms, median {:.0}, \
             every node {:.0}; service rm: {:.0}, {:.0}, {:.0}",
            cluster.mesh.node_name(changer),
            change.command * 1e3,
            min(&change.added) * 1e3,
            median(&mut change.added.clone()) * 1e3,
            max(&change.added) * 1e3,
            min(&change.removed) * 1e3,
            median(&mut change.removed.clone()) * 1e3,
            max(&change.removed) * 1e3
        );
        commands.push(change.command);
        // What applying it cost each node, above what the daemons use at rest meanwhile.
        apply_cpu.push((change.cpu - at_rest * change.window) / (nodes - 1) as f64);
        adds.push(change.added);
        removes.push(change.removed);
    }
    let mut kills = Rounds::default();
    for k in 0..failures {
        // The last nodes, never the seed.
        let victim = nodes - 1 - k;
        let times = cluster.kill(victim)?;
        println!(
            "cluster: {} killed: its task gone from the first node in {:.0} ms, median {:.0}, \
             every other node {:.0}",
            cluster.mesh.node_name(victim),
            min(&times) * 1e3,
            median(&mut times.clone()) * 1e3,
            max(&times) * 1e3
        );
        kills.push(times);
    }

    let mut found = Vec::new();
    let mut record = |case: &str, value: f64, unit: &'static str| {
        found.push(Measurement::new(
            names::CLUSTER,
            case,
            variant.clone(),
            value,
            unit,
        ));
    };
    record(
        "join: daemons started -> every node agrees",
        joined.as_secs_f64(),
        "s",
    );
    record(
        "service add itself (the command, on the node changing), median",
        median(&mut commands) * 1e3,
        names::MS,
    );
    for (what, rounds, every_node) in [
        ("service add", &adds, Some(names::CLUSTER_CHANGE_EVERY_NODE)),
        ("service rm", &removes, None),
        (
            "daemon killed",
            &kills,
            Some(names::CLUSTER_FAILURE_EVERY_NODE),
        ),
    ] {
        let applied = if what == "daemon killed" {
            "its tasks gone from"
        } else {
            "applied on"
        };
        record(
            &format!("{what} -> {applied} a node, median over nodes and rounds"),
            rounds.median_node() * 1e3,
            names::MS,
        );
        record(
            &format!("{what} -> {applied} every node, median round"),
            rounds.median_round() * 1e3,
            names::MS,
        );
        let slowest = every_node.map_or_else(
            || format!("{what} -> {applied} every node, slowest round"),
            str::to_owned,
        );
        record(&slowest, rounds.slowest_round() * 1e3, names::MS);
    }
    record(
        "CPU per node to apply a gossiped change (above rest), median",
        median(&mut apply_cpu) * 1e3,
        names::MS,
    );
    record(
        "CPU per daemon at rest, median",
        median(&mut cpu.clone()),
        "% of a core",
    );
    record("CPU per daemon at rest, max", max(&cpu), "% of a core");
    record(
        "CPU of all daemons at rest",
        cpu.iter().sum(),
        "% of a core",
    );
    Ok(found)
}

/// The kernel's IPv4 neighbour table limits (`gc_thresh2`, `gc_thresh3`), raised for the
/// section and put back when dropped. Every daemon keeps a managed neighbour entry towards each
/// other node, which the kernel never garbage-collects, and the limits count the entries of every
/// namespace of the machine together: N nodes on one kernel hold N(N-1), 2,450 at 50 nodes,
/// past the default hard limit of 1,024, after which ARP fails with ENOBUFS ("neighbor table
/// overflow") and nodes never hear from each other. One node per machine holds N-1.
struct NeighbourLimits {
    saved: Vec<(&'static str, String)>,
}

impl NeighbourLimits {
    const KEYS: [&'static str; 2] = [
        "/proc/sys/net/ipv4/neigh/default/gc_thresh2",
        "/proc/sys/net/ipv4/neigh/default/gc_thresh3",
    ];

    /// Raises both limits by twice what `nodes` nodes hold, above whatever else the machine
    /// has in its tables.
    fn raise(nodes: usize) -> Result<NeighbourLimits> {
        let mut limits = NeighbourLimits { saved: Vec::new() };
        for key in Self::KEYS {
            let text =
                std::fs::read_to_string(key).with_context(|| format!("cannot read {key}"))?;
            let was: usize = text
                .trim()
                .parse()
                .with_context(|| format!("{key} is {text:?}"))?;
            let raised = was + 2 * nodes * nodes;
            std::fs::write(key, raised.to_string())
                .with_context(|| format!("cannot set {key} to {raised}"))?;
            limits.saved.push((key, text.trim().to_owned()));
        }
        Ok(limits)
    }
}

impl Drop for NeighbourLimits {
    fn drop(&mut self) {
        for (key, value) in &self.saved {
            if let Err(e) = std::fs::write(key, value) {
                eprintln!("warning: cannot put {key} back to {value}: {e}");
            }
        }
    }
}

/// The mesh with lbctl attached on every node, `web` published with one task of each node, and
/// a daemon slot per node. Fields drop in order: daemons stop, then the instances are purged,
/// then the namespaces go.
struct Cluster {
    daemons: Vec<Option<Daemon>>,
    lbctl: Vec<Lbctl>,
    mesh: Mesh,
    /// Nodes whose daemon was killed.
    killed: Vec<usize>,
}

impl Cluster {
    fn build(nodes: usize) -> Result<Cluster> {
        let mesh = Mesh::build(MeshSpec {
            nodes,
            tasks_per_node: vec![0; nodes],
            ..MeshSpec::default()
        })?;
        let lbctl = (0..nodes)
            .map(|i| Lbctl::new(mesh.node(i)))
            .collect::<Result<Vec<_>>>()?;
        let cluster = Cluster {
            daemons: (0..nodes).map(|_| None).collect(),
            lbctl,
            mesh,
            killed: Vec::new(),
        };
        // Before joining, each node publishes `web` with its own task (a backend on no node
        // becomes this node's task when the daemon joins), health checks off.
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..ATTACH_WORKERS)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= nodes {
                                return Ok(());
                            }
                            let lbctl = &cluster.lbctl[i];
                            let task = cluster.task(i).to_string();
                            lbctl.run(&[
                                "attach",
                                NODE_UPLINK,
                                "--flow-capacity",
                                FLOW_CAPACITY,
                                "--no-socket-lb",
                            ])?;
                            lbctl.run(&[
                                "service",
                                "add",
                                SERVICE,
                                &WEB_PORT.to_string(),
                                &task,
                            ])?;
                            lbctl.run(&["service", "health", SERVICE, "--off"])?;
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.join().expect("attach worker panicked")?;
            }
            Ok(())
        })?;
        Ok(cluster)
    }

    fn nodes(&self) -> usize {
        self.mesh.node_count()
    }

    /// Node `i`'s task of `web`: an address of its overlay, `.10 + i`.
    fn task(&self, i: usize) -> SocketAddrV4 {
        let [a, b, c] = self.mesh.spec().overlay_subnet;
        SocketAddrV4::new([a, b, c, 10 + i as u8].into(), 80)
    }

    fn gossip_addr(&self, i: usize) -> String {
        SocketAddrV4::new(self.mesh.node_ip(i), GOSSIP_PORT).to_string()
    }

    /// The nodes whose daemon runs.
    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes()).filter(|i| !self.killed.contains(i))
    }

    /// Starts every node's daemon, seeded with the first node, logging JSON.
    fn start_daemons(&mut self, settings: &[String]) -> Result<()> {
        let seed = self.gossip_addr(0);
        // Sealed gossip, as a production cluster runs it.
        let key_file = self.lbctl[0].state_dir().join("cluster.key");
        if !key_file.exists() {
            let path = key_file.to_str().context("a UTF-8 state folder")?;
            self.lbctl[0].run(&["cluster", "key", "generate", path])?;
        }
        let key_file = key_file
            .to_str()
            .context("a UTF-8 state folder")?
            .to_owned();
        for i in 0..self.nodes() {
            let (node, gossip) = (self.mesh.node_name(i), self.gossip_addr(i));
            let mut args: Vec<&str> = vec![
                "--cluster",
                CLUSTER,
                "--cluster-key-file",
                &key_file,
                "--node-name",
                &node,
                "--gossip-addr",
                &gossip,
                "--seed",
                &seed,
                "--log-json",
            ];
            args.extend(settings.iter().map(String::as_str));
            let daemon =
                self.lbctl[i].start_daemon_with(METRICS.parse()?, self.mesh.node(i), &args)?;
            self.daemons[i] = Some(daemon);
        }
        Ok(())
    }

    fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().expect("the daemon runs")
    }

    /// Waits until every daemon sees every node alive and agreeing with it (its `cluster.json`),
    /// then checks that a node's table has every task.
    fn wait_joined(&self) -> Result<()> {
        let nodes = self.nodes();
        let started = Instant::now();
        loop {
            let waiting: Vec<usize> = self.running().filter(|&i| !self.agrees(i, nodes)).collect();
            if waiting.is_empty() {
                break;
            }
            if started.elapsed() > JOIN_WITHIN {
                bail!(
                    "{} of {nodes} daemons did not see {nodes} live members agreeing within \
                     {JOIN_WITHIN:?}, e.g. {}: {}",
                    waiting.len(),
                    self.mesh.node_name(waiting[0]),
                    self.daemon(waiting[0]).log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let tasks = self.web_tasks(0)?;
        ensure!(
            tasks.len() == nodes,
            "{} has {} tasks of {SERVICE} where every node published one: {tasks:?}",
            self.mesh.node_name(0),
            tasks.len()
        );
        Ok(())
    }

    /// Whether node `i`'s daemon sees `alive` live members that all have its table.
    fn agrees(&self, i: usize, alive: usize) -> bool {
        let path = self.lbctl[i].state_dir().join("cluster.json");
        let Some(status) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        else {
            return false;
        };
        let live = status["members"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["alive"] == true).count());
        status["converged"] == true && live == alive
    }

    /// `IP:PORT@NODE` of every backend of `web` in node `i`'s table.
    fn web_tasks(&self, i: usize) -> Result<Vec<String>> {
        Ok(self.services(i)?.get(SERVICE).cloned().unwrap_or_default())
    }

    /// Node `i`'s services and their backends (`IP:PORT@NODE`), from `lbctl service ls`.
    fn services(&self, i: usize) -> Result<BTreeMap<String, Vec<String>>> {
        let doc: serde_json::Value =
            serde_json::from_str(&self.lbctl[i].run(&["service", "ls", "--json"])?)?;
        let services = doc["services"]
            .as_array()
            .context("service ls --json without services")?;
        Ok(services
            .iter()
            .map(|s| {
                let backends = s["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        format!(
                            "{}@{}",
                            b["address"].as_str().unwrap_or_default(),
                            b["node"].as_str().unwrap_or_default()
                        )
                    })
                    .collect();
                (s["name"].as_str().unwrap_or_default().to_owned(), backends)
            })
            .collect())
    }

    /// CPU (user + system) all running daemons used so far, in seconds.
    fn cpu_seconds(&self) -> Result<f64> {
        let mut ticks = 0;
        for i in self.running() {
            ticks += cpu_ticks(self.daemon(i).pid().context("daemon without a pid")?)?;
        }
        Ok(ticks as f64 / ticks_per_second())
    }

    /// Each running daemon's CPU (user + system) over `window`, as % of one core.
    fn cpu_at_rest(&self, window: Duration) -> Result<Vec<f64>> {
        let pids: Vec<u32> = self
            .running()
            .map(|i| self.daemon(i).pid().context("daemon without a pid"))
            .collect::<Result<_>>()?;
        let before = pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .collect::<Result<Vec<_>>>()?;
        let started = Instant::now();
        std::thread::sleep(window);
        let after = pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .collect::<Result<Vec<_>>>()?;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a - b) as f64 / ticks_per_second() / elapsed * 100.0)
            .collect())
    }

    /// A change round on node `changer`: `service add` of a new service with a task of its own,
    /// until every other node applied it, then `service rm` likewise. Returns each node's time
    /// for both, in seconds.
    fn change(&self, changer: usize, round: usize) -> Result<Change> {
        let name = format!("probe{round}");
        let port = (PROBE_PORT + round as u16).to_string();
        let task = SocketAddrV4::new(*self.task(changer).ip(), 81);
        let others: Vec<usize> = self.running().filter(|&i| i != changer).collect();

        let cpu_before = self.cpu_seconds()?;
        let at = SystemTime::now();
        let started = Instant::now();
        self.lbctl[changer].run(&["service", "add", &name, &port, &task.to_string()])?;
        let command = started.elapsed().as_secs_f64();
        let added = self.wait_applied(&others, at, &format!("+ service {name} "))?;
        let cpu = self.cpu_seconds()? - cpu_before;
        let window = started.elapsed().as_secs_f64();
        let want = vec![format!("{task}@{}", self.mesh.node_name(changer))];
        for &i in &others {
            let services = self.services(i)?;
            ensure!(
                services.get(&name) == Some(&want),
                "{} logged {name} as applied, but its table has {:?}",
                self.mesh.node_name(i),
                services.get(&name)
            );
        }

        let at = SystemTime::now();
        self.lbctl[changer].run(&["service", "rm", &name])?;
        let removed = self.wait_applied(&others, at, &format!("- service {name} "))?;
        for &i in &others {
            ensure!(
                !self.services(i)?.contains_key(&name),
                "{} logged {name} as removed, but its table still has it",
                self.mesh.node_name(i)
            );
        }
        Ok(Change {
            command,
            added,
            removed,
            cpu,
            window,
        })
    }

    /// Kills node `victim`'s daemon (SIGKILL) and waits until every other running node removed
    /// its task. Returns each node's time, in seconds.
    fn kill(&mut self, victim: usize) -> Result<Vec<f64>> {
        let task = format!("{}@{}", self.task(victim), self.mesh.node_name(victim));
        let mut daemon = self.daemons[victim].take().expect("the daemon runs");
        let at = SystemTime::now();
        daemon.kill()?;
        self.killed.push(victim);
        let others: Vec<usize> = self.running().collect();
        let times = self.wait_applied(&others, at, &format!("- {task}"))?;
        let name = format!("\"{}\"", self.mesh.node_name(victim));
        for &i in &others {
            let tasks = self.web_tasks(i)?;
            if tasks.contains(&task) {
                // Its log about the killed node says why (declared alive again?).
                let log = self.daemon(i).log_text();
                let about: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains(&name) || l.contains(&task))
                    .collect();
                bail!(
                    "{} logged {task} as removed, but its table has it again; its log about {}:\n{}",
                    self.mesh.node_name(i),
                    self.mesh.node_name(victim),
                    about.join("\n")
                );
            }
            ensure!(
                tasks.len() == self.nodes() - self.killed.len(),
                "{} has {} tasks of {SERVICE} with {} of {} nodes killed: {tasks:?}",
                self.mesh.node_name(i),
                tasks.len(),
                self.killed.len(),
                self.nodes()
            );
        }
        Ok(times)
    }

    /// Waits until each node of `nodes` logged a table applied at or after `since` whose changes
    /// contain `change`; returns for each the time from `since` to its line, in seconds. The
    /// times are the daemons' own timestamps, whenever and in whatever order the logs are read.
    fn wait_applied(&self, nodes: &[usize], since: SystemTime, change: &str) -> Result<Vec<f64>> {
        let since = since.duration_since(UNIX_EPOCH)?.as_secs_f64();
        let mut times: BTreeMap<usize, f64> = BTreeMap::new();
        let started = Instant::now();
        loop {
            for &i in nodes {
                if times.contains_key(&i) {
                    continue;
                }
                if let Some(at) = applied_at(&self.daemon(i).log_text(), since, change)? {
                    times.insert(i, at - since);
                }
            }
            if times.len() == nodes.len() {
                return Ok(times.into_values().collect());
            }
            if started.elapsed() > WITHIN {
                let missing: Vec<String> = nodes
                    .iter()
                    .filter(|i| !times.contains_key(i))
                    .map(|&i| self.mesh.node_name(i))
                    .collect();
                bail!(
                    "`{change}` not applied within {WITHIN:?} by {} of {} nodes: {missing:?}",
                    missing.len(),
                    nodes.len()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The timestamp (seconds since the epoch) of the first line of `log` at or after `since`
/// saying the daemon applied a table whose changes contain `change`.
fn applied_at(log: &str, since: f64, change: &str) -> Result<Option<f64>> {
    for line in log.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &event["fields"];
        if fields["message"] != APPLIED
            || !fields["changes"]
                .as_str()
                .is_some_and(|c| c.contains(change))
        {
            continue;
        }
        let stamp = event["timestamp"]
            .as_str()
            .with_context(|| format!("log line without a timestamp: {line}"))?;
        let at = parse_rfc3339(stamp)?;
        if at >= since {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// Seconds since the epoch of a UTC timestamp as the daemon's log writes it
/// (`2026-12-02T07:31:59.123456Z`).
fn parse_rfc3339(text: &str) -> Result<f64> {
    let bad = || format!("timestamp {text:?} is not YYYY-MM-DDTHH:MM:SS[.frac]Z");
    let body = text.strip_suffix('Z').with_context(bad)?;
    let (date, time) = body.split_once('T').with_context(bad)?;
    let date: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let hms: Vec<i64> = hms
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    ensure!(date.len() == 3 && hms.len() == 3, "{}", bad());
    let frac: f64 = format!("0.{frac}").parse().with_context(bad)?;
    let days = days_from_civil(date[0], date[1], date[2]);
    Ok((days * 86_400 + hms[0] * 3_600 + hms[1] * 60 + hms[2]) as f64 + frac)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Clock ticks per second of `/proc/PID/stat`'s times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// User + system clock ticks of process `pid`, all its threads (`/proc/PID/stat` fields 14, 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("/proc/{pid}/stat unreadable: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat has no field {n}: {stat}"))
    };
    Ok(field(14)? + field(15)?)
}

/// A change round's times, in seconds.
struct Change {
    /// `service add` itself, on the node that changes the table.
    command: f64,
    /// Each other node's time to apply the new service, then its removal.
    added: Vec<f64>,
    removed: Vec<f64>,
    /// CPU the daemons used from `service add` until the last node applied it (at rest's
    /// included), and how long that was.
    cpu: f64,
    window: f64,
}

/// Per-node times of each round, in seconds.
#[derive(Default)]
struct Rounds(Vec<Vec<f64>>);

impl Rounds {
    fn push(&mut self, times: Vec<f64>) {
        self.0.push(times);
    }

    /// The median over every node of every round.
    fn median_node(&self) -> f64 {
        median(&mut self.0.iter().flatten().copied().collect::<Vec<_>>())
    }

    /// The median over the rounds of each round's last node.
    fn median_round(&self) -> f64 {
        median(&mut self.0.iter().map(|r| max(r)).collect::<Vec<_>>())
    }

    /// The last node of the slowest round.
    fn slowest_round(&self) -> f64 {
        self.0.iter().map(|r| max(r)).fold(0.0, f64::max)
    }
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}
