//! Docker Swarm services as lbctl services (`lbctl daemon --docker`): the labels that publish a
//! Swarm service through lbctl, the tasks of this node as Docker shows them, and the change they
//! make to the table. Pure: the Engine API is read by `docker`, the table written by `commands`.
//!
//! The convention, on the service's *container* labels (`docker service create
//! --container-label`), since every node sees its own containers but only managers see
//! services:
//!
//! - `lbctl.publish=8080:80` (or `8080:80/udp`; several, comma-separated): publish port 8080 of
//!   every lbctl node, balanced over the service's tasks' port 80. One entry makes an lbctl
//!   service named as the Swarm service; several make `NAME-PORT` (`NAME-PORT-udp` for UDP).
//! - `lbctl.scheduler=maglev` (default round-robin), `lbctl.vip=IP` (publish on that address
//!   only).
//! - `lbctl.check=tcp | http:/PATH | off`: lbctl's active checks. The default is `tcp`, or `off`
//!   when the image has a Docker `HEALTHCHECK`: then Docker's verdict is the task's health
//!   (`starting` and `unhealthy` take no new flows, as Swarm's own balancer does).
//! - `lbctl.eject-after=N`: passive checks, the failed connections in a row after which the data
//!   plane ejects a task (default 3; 0: never).
//! - `lbctl.network=NAME`: the overlay network whose address is the task's (default: the first
//!   by name other than `ingress`).
//!
//! A task is reached at its overlay address (unique in the Swarm): on its own node lbctl routes
//! that address to the task's `docker_gwbridge` address (host routes, `host::task_routes`), and
//! other nodes send its flows there through the mesh.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use super::{
    BackendSpec, Health, HealthCheck, HealthUpdate, Origin, Proto, Scheduler, Table,
    default_weight, parse_port, parse_vip, validate_name,
};

/// The label that publishes a Swarm service through lbctl.
pub const PUBLISH_LABEL: &str = "lbctl.publish";
pub const SCHEDULER_LABEL: &str = "lbctl.scheduler";
pub const VIP_LABEL: &str = "lbctl.vip";
pub const CHECK_LABEL: &str = "lbctl.check";
pub const NETWORK_LABEL: &str = "lbctl.network";
pub const EJECT_AFTER_LABEL: &str = "lbctl.eject-after";
/// Swarm's own label naming a container's service.
pub const SWARM_SERVICE_LABEL: &str = "com.docker.swarm.service.name";

/// One `PUBLISHED:TARGET[/PROTO]` entry of `lbctl.publish`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Publish {
    pub port: u16,
    pub target: u16,
    pub proto: Proto,
}

/// Parses `lbctl.publish`: `8080:80`, `8080:80/udp`, comma-separated.
pub fn parse_publish(value: &str) -> Result<Vec<Publish>, String> {
    let mut entries = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let (ports, proto) = match entry.split_once('/') {
            Some((ports, proto)) => (ports, proto.parse::<Proto>()?),
            None => (entry, Proto::Tcp),
        };
        let (port, target) = ports.split_once(':').ok_or_else(|| {
            format!("'{entry}' is not PUBLISHED:TARGET[/tcp|/udp] (e.g. 8080:80)")
        })?;
        let publish = Publish {
            port: parse_port(port)?,
            target: parse_port(target)?,
            proto,
        };
        if entries
            .iter()
            .any(|p: &Publish| (p.port, p.proto) == (publish.port, publish.proto))
        {
            return Err(format!("port {proto}/{port} is listed twice"));
        }
        entries.push(publish);
    }
    Ok(entries)
}

/// The lbctl service names a Swarm service's entries get.
pub fn service_names(swarm_service: &str, publish: &[Publish]) -> Vec<String> {
    publish
        .iter()
        .map(|p| match (publish.len(), p.proto) {
            (1, _) => swarm_service.to_owned(),
            (_, Proto::Tcp) => format!("{swarm_service}-{}", p.port),
            (_, Proto::Udp) => format!("{swarm_service}-{}-udp", p.port),
        })
        .collect()
}

/// What Docker says of a container's health (`State.Health.Status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerHealth {
    /// The image has no health check.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// A running container of a Swarm service on this node, as the Engine API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub container: String,
    /// Its Swarm service (`com.docker.swarm.service.name`).
    pub service: String,
    /// When the container was created (RFC 3339): the newest task's labels define the service
    /// while a rolling update changes them.
    pub created: String,
    pub labels: BTreeMap<String, String>,
    /// Its address on each network, by network name.
    pub networks: BTreeMap<String, Ipv4Addr>,
    /// Its address on `docker_gwbridge`, which this node's own namespace reaches.
    pub gateway: Option<Ipv4Addr>,
    pub health: DockerHealth,
    /// Docker signalled it to stop (Swarm's shutdown of a task: scale-down, update, removal),
    /// seen in the event stream; it serves on until it exits.
    pub stopping: bool,
    /// Its main process as this namespace sees it (pid, start time in clock ticks), when it
    /// does: while the Engine is away, a task whose process is gone has exited.
    pub process: Option<(u32, u64)>,
}

/// Splits `tasks` into those still running and those whose main process is gone (`start_of`
/// gives a pid's start time, `None` for no such process): a pid reused by another process
/// has another start time. Tasks whose process this namespace cannot see are kept.
pub fn exited(tasks: &[Task], start_of: impl Fn(u32) -> Option<u64>) -> (Vec<Task>, Vec<Task>) {
    tasks.iter().cloned().partition(|task| match task.process {
        Some((pid, start)) => start_of(pid) == Some(start),
        None => true,
    })
}

/// A service as Docker's labels define it, with this node's tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerService {
    pub name: String,
    pub swarm_service: String,
    /// When the task whose labels define it was created (see `Service::defined_at`).
    pub defined_at: String,
    pub proto: Proto,
    pub port: u16,
    pub vip: Option<IpAddr>,
    pub scheduler: Scheduler,
    pub check: HealthCheck,
    /// This node's tasks.
    pub tasks: Vec<TaskBackend>,
}

/// A task of this node as a backend of a Docker service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskBackend {
    pub addr: SocketAddr,
    /// Docker's health verdict, when it decides (lbctl's checks off).
    pub health: Option<Health>,
    /// Being stopped by Docker: drained (no new flows; its connections finish while it lives),
    /// as Swarm's own balancer does not (moby #38841).
    pub stopping: bool,
}

/// A host route this node needs to reach a task: its overlay address through its
/// `docker_gwbridge` address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TaskRoute {
    pub task: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

/// What this node's tasks ask of the table and of the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: Vec<DockerService>,
    pub routes: Vec<TaskRoute>,
    /// Tasks and services that cannot be published, with why (logged by the daemon).
    pub problems: Vec<String>,
}

/// What the labels of a service's newest task say, apart from its address.
struct Definition {
    publish: Vec<Publish>,
    vip: Option<IpAddr>,
    scheduler: Scheduler,
    check: Option<HealthCheck>,
    eject_after: Option<u32>,
    network: Option<String>,
}

fn definition(labels: &BTreeMap<String, String>) -> Result<Definition, String> {
    let label = |name: &str| labels.get(name).map(|v| v.trim());
    let publish = parse_publish(label(PUBLISH_LABEL).unwrap_or_default())
        .map_err(|err| format!("{PUBLISH_LABEL}: {err}"))?;
    let vip = label(VIP_LABEL)
        .map(parse_vip)
        .transpose()
        .map_err(|err| format!("{VIP_LABEL}: {err}"))?;
    let scheduler = label(SCHEDULER_LABEL)
        .map(str::parse::<Scheduler>)
        .transpose()
        .map_err(|err| format!("{SCHEDULER_LABEL}: {err}"))?
        .unwrap_or_default();
    let check = label(CHECK_LABEL)
        .map(parse_check)
        .transpose()
        .map_err(|err| format!("{CHECK_LABEL}: {err}"))?;
    let eject_after = label(EJECT_AFTER_LABEL)
        .map(|value| {
            value
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= super::MAX_EJECT_AFTER)
                .ok_or_else(|| {
                    format!(
                        "{EJECT_AFTER_LABEL}: '{value}' is not a number of connections from 0 \
                         (never) to {}",
                        super::MAX_EJECT_AFTER
                    )
                })
        })
        .transpose()?;
    Ok(Definition {
        publish,
        vip,
        scheduler,
        check,
        eject_after,
        network: label(NETWORK_LABEL).map(str::to_owned),
    })
}

/// `tcp`, `http:/PATH` or `off`, as lbctl's default check settings otherwise.
fn parse_check(value: &str) -> Result<HealthCheck, String> {
    let update = match value {
        "off" => HealthUpdate {
            enabled: Some(false),
            ..HealthUpdate::default()
        },
        "tcp" => HealthUpdate {
            probe: Some(None),
            ..HealthUpdate::default()
        },
        _ => match value.strip_prefix("http:") {
            Some(path) => HealthUpdate {
                probe: Some(Some(path.to_owned())),
                ..HealthUpdate::default()
            },
            None => return Err(format!("'{value}' is not tcp, http:/PATH or off")),
        },
    };
    let check = update.apply(&HealthCheck::default());
    check.validate()?;
    Ok(check)
}

/// The services and routes this node's tasks ask for. Tasks are grouped by Swarm service; the
/// newest task's labels define the service. A task without an address on its overlay network
/// or on `docker_gwbridge` cannot be reached from other nodes, or from this one: it is left out
/// and said so.
pub fn desired(tasks: &[Task]) -> Desired {
    let mut by_service: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for task in tasks {
        by_service.entry(&task.service).or_default().push(task);
    }
    let mut out = Desired::default();
    let mut routes = BTreeSet::new();
    let mut taken: BTreeMap<String, &str> = BTreeMap::new();
    for (swarm_service, mut tasks) in by_service {
        tasks.sort_by_cached_key(|t| {
            std::cmp::Reverse((sortable_time(&t.created), t.container.clone()))
        });
        let def = match definition(&tasks[0].labels) {
            Ok(def) => def,
            Err(err) => {
                out.problems.push(format!(
                    "Swarm service '{swarm_service}' is not published: {err}"
                ));
                continue;
            }
        };
        let names = service_names(swarm_service, &def.publish);
        if let Some(Err(err)) = names
            .iter()
            .map(|n| validate_name("service", n))
            .find(Result::is_err)
        {
            out.problems.push(format!(
                "Swarm service '{swarm_service}' is not published: {err}"
            ));
            continue;
        }
        // Services come in name order, so every node keeps the same one of two that would
        // make the same lbctl service (`web` publishing two ports and a service `web-8080`).
        if let Some((name, other)) = names
            .iter()
            .find_map(|n| taken.get(n.as_str()).map(|other| (n, *other)))
        {
            out.problems.push(format!(
                "Swarm service '{swarm_service}' is not published: Swarm service '{other}' \
                 already makes lbctl service '{name}'"
            ));
            continue;
        }
        taken.extend(names.iter().map(|n| (n.clone(), swarm_service)));
        let mut addresses = Vec::new();
        let mut refused = 0;
        for task in &tasks {
            // A container Docker is taking down (or still setting up) has left its networks (or
            // not joined them yet): not a task to publish, nor a problem to report.
            if task.networks.is_empty() {
                continue;
            }
            match address_of(task, def.network.as_deref()) {
                Ok(addr) => {
                    routes.insert(TaskRoute {
                        task: addr,
                        gateway: task.gateway.expect("checked by address_of"),
                    });
                    addresses.push((addr, task.health, task.stopping));
                }
                Err(err) => {
                    refused += 1;
                    out.problems.push(format!(
                        "task {} of Swarm service '{swarm_service}' is left out: {err}",
                        short(&task.container)
                    ));
                }
            }
        }
        // A service none of whose tasks here can be reached is not published from here: it
        // would hold its port on every node and drop what comes to it.
        if addresses.is_empty() && refused > 0 {
            continue;
        }
        addresses.sort_by_key(|&(addr, _, _)| addr);
        let docker_health = tasks.iter().any(|t| t.health != DockerHealth::None);
        let mut check = def.check.clone().unwrap_or_else(|| {
            let enabled = !docker_health;
            HealthCheck {
                enabled,
                ..HealthCheck::default()
            }
        });
        if let Some(eject_after) = def.eject_after {
            check.eject_after = eject_after;
        }
        for (publish, name) in def.publish.iter().zip(names) {
            out.services.push(DockerService {
                name,
                swarm_service: swarm_service.to_owned(),
                defined_at: sortable_time(&tasks[0].created),
                proto: publish.proto,
                port: publish.port,
                vip: def.vip,
                scheduler: def.scheduler,
                check: check.clone(),
                tasks: addresses
                    .iter()
                    .map(|&(addr, health, stopping)| TaskBackend {
                        addr: SocketAddr::V4(SocketAddrV4::new(addr, publish.target)),
                        health: (!check.enabled).then_some(match health {
                            DockerHealth::None => Health::Unknown,
                            DockerHealth::Healthy => Health::Healthy,
                            DockerHealth::Starting | DockerHealth::Unhealthy => Health::Unhealthy,
                        }),
                        stopping,
                    })
                    .collect(),
            });
        }
    }
    out.routes = routes.into_iter().collect();
    out
}

/// Docker's RFC 3339 time (`2026-12-02T14:02:50.9287731Z`: Go trims the fraction's trailing
/// zeros) with nine fractional digits, so that times sort as text.
pub fn sortable_time(rfc3339: &str) -> String {
    let Some(body) = rfc3339.strip_suffix('Z') else {
        return rfc3339.to_owned();
    };
    let (seconds, fraction) = body.split_once('.').unwrap_or((body, ""));
    format!("{seconds}.{fraction:0<9}Z")
}

fn short(container: &str) -> &str {
    &container[..container.len().min(12)]
}

/// The task's address: on the network `lbctl.network` names, or the first by name other than
/// Swarm's `ingress` and the host-local ones; it must also be on `docker_gwbridge`, the way in
/// from this node's namespace.
fn address_of(task: &Task, network: Option<&str>) -> Result<Ipv4Addr, String> {
    let addr = match network {
        Some(name) => task
            .networks
            .get(name)
            .copied()
            .ok_or_else(|| format!("it has no address on network '{name}' ({NETWORK_LABEL})"))?,
        None => task
            .networks
            .iter()
            .find(|(name, _)| {
                !["ingress", "bridge", "host", "none", "docker_gwbridge"].contains(&name.as_str())
            })
            .map(|(_, addr)| *addr)
            .ok_or_else(|| {
                "it is on no overlay network: attach the service to one (`--network`), whose \
                 addresses are unique in the Swarm"
                    .to_owned()
            })?,
    };
    if task.gateway.is_none() {
        return Err(format!(
            "it has no docker_gwbridge address, through which this node reaches {addr}"
        ));
    }
    Ok(addr)
}

/// The Docker services the table should hold. `self_node` is this node's name in the mesh
/// (its tasks are `ADDR@NODE`), `None` without one. `swarm` is the lbctl service names the
/// Swarm defines, known on a manager only: there a Docker service the Swarm no longer defines
/// is removed; elsewhere a service without tasks here stays (other nodes may have some).
/// Returns what changed and what could not be done, in words.
pub fn follow(
    table: &mut Table,
    desired: &Desired,
    self_node: Option<&str>,
    swarm: Option<&BTreeSet<String>>,
) -> (Vec<String>, Vec<String>) {
    let mut changes = Vec::new();
    let mut refused = Vec::new();
    let wanted: BTreeSet<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
    let own = |node: &Option<String>| node.as_deref() == self_node || node.is_none();
    // A node the table does not list yet (a cluster member before its first merge) gets its
    // tasks without `@NODE`, which the cluster then marks as its own.
    let spec_node = self_node.filter(|name| table.nodes.iter().any(|n| n.name == *name));
    // Services Docker no longer defines (on a manager), or where this node's tasks ended.
    let docker: Vec<String> = table
        .services
        .iter()
        .filter(|s| s.origin == Origin::Docker && !wanted.contains(s.name.as_str()))
        .map(|s| s.name.clone())
        .collect();
    for name in docker {
        if swarm.is_some_and(|defined| !defined.contains(&name)) {
            table.remove_service(&name).expect("listed above");
            changes.push(format!(
                "service {name} removed: the Swarm no longer publishes it"
            ));
            continue;
        }
        let leaving: Vec<BackendSpec> = table
            .service(&name)
            .expect("listed")
            .backends
            .iter()
            .filter(|b| own(&b.node))
            .map(|b| b.spec())
            .collect();
        if !leaving.is_empty() {
            table
                .remove_backends(&name, &leaving)
                .expect("listed from the table");
            changes.push(format!(
                "service {name}: {} task(s) of this node left",
                leaving.len()
            ));
        }
    }
    for want in &desired.services {
        if let Err(err) = follow_service(table, want, self_node, spec_node, &mut changes) {
            refused.push(format!(
                "Swarm service '{}' cannot be published as lbctl service '{}': {err}",
                want.swarm_service, want.name
            ));
        }
    }
    (changes, refused)
}

fn follow_service(
    table: &mut Table,
    want: &DockerService,
    self_node: Option<&str>,
    spec_node: Option<&str>,
    changes: &mut Vec<String>,
) -> Result<(), String> {
    let name = want.name.as_str();
    let frontend = (want.proto, want.port, want.vip);
    if let Some(service) = table.service(name)
        && service.origin != Origin::Docker
    {
        return Err(format!(
            "an lbctl service of that name exists that is not Docker's (`lbctl service rm \
             {name}` lets Docker's take its place)"
        ));
    }
    let wanted: BTreeSet<SocketAddr> = want.tasks.iter().map(|t| t.addr).collect();
    // Tasks older than those that define the service (another node's, which a rolling update
    // of the labels reached first) leave its definition alone: two generations of labels must
    // not take turns.
    let defines = table
        .service(name)
        .is_none_or(|s| s.defined_at.as_str() <= want.defined_at.as_str());
    // A new frontend is a new service; the other nodes' tasks stay in it (theirs to change:
    // their daemons follow the same labels).
    let mut elsewhere_kept = Vec::new();
    if let Some(service) = table.service(name)
        && defines
        && (service.proto, service.port, service.vip) != frontend
    {
        elsewhere_kept = service
            .backends
            .iter()
            .filter(|b| !(b.node.as_deref() == self_node || b.node.is_none()))
            .filter(|b| !wanted.contains(&b.addr))
            .map(|b| b.spec())
            .collect();
        table.remove_service(name).expect("present");
        changes.push(format!(
            "service {name} published anew on {}/{}",
            want.proto, want.port
        ));
    }
    let spec = |addr: SocketAddr| BackendSpec {
        addr,
        node: spec_node.map(str::to_owned),
        weight: default_weight(),
    };
    if table.service(name).is_none() {
        let mut backends: Vec<BackendSpec> = want
            .tasks
            .iter()
            .filter(|t| !t.stopping)
            .map(|t| spec(t.addr))
            .collect();
        backends.extend(elsewhere_kept);
        table.add_service(name, want.proto, want.port, want.vip, &backends)?;
        changes.push(format!(
            "service {name} added: {}/{} → {} task(s) of this node",
            want.proto,
            want.port,
            want.tasks.len()
        ));
    } else {
        let service = table.service(name).expect("present");
        let present: BTreeSet<SocketAddr> = service
            .backends
            .iter()
            .filter(|b| b.node.as_deref() == self_node || b.node.is_none())
            .map(|b| b.addr)
            .collect();
        let elsewhere: BTreeSet<SocketAddr> = service
            .backends
            .iter()
            .filter(|b| !(b.node.as_deref() == self_node || b.node.is_none()))
            .map(|b| b.addr)
            .collect();
        let leaving: Vec<SocketAddr> = present.difference(&wanted).copied().collect();
        // An address another node still publishes is a task that moved here: it comes once
        // that node's record goes (the gossip's next rounds).
        let stopping: BTreeSet<SocketAddr> = want
            .tasks
            .iter()
            .filter(|t| t.stopping)
            .map(|t| t.addr)
            .collect();
        let arriving: Vec<BackendSpec> = wanted
            .difference(&present)
            .filter(|a| !elsewhere.contains(a) && !stopping.contains(a))
            .map(|&a| spec(a))
            .collect();
        if !leaving.is_empty() {
            table.remove_backends(name, &leaving)?;
            changes.push(format!("service {name}: {} task(s) left", leaving.len()));
        }
        if !arriving.is_empty() {
            table.add_backends(name, &arriving)?;
            changes.push(format!("service {name}: {} task(s) added", arriving.len()));
        }
    }
    if !defines {
        return follow_tasks(table, want, spec, changes);
    }
    table.set_origin(name, Origin::Docker, &want.defined_at)?;
    if table.set_scheduler(name, want.scheduler)? {
        changes.push(format!("service {name}: scheduler {}", want.scheduler));
    }
    let current = table.service(name).expect("present").health_check.clone();
    if current != want.check {
        let update = HealthUpdate {
            enabled: Some(want.check.enabled),
            probe: Some(want.check.http_path.clone()),
            expect_status: Some(want.check.expect_status),
            interval_ms: Some(want.check.interval_ms),
            timeout_ms: Some(want.check.timeout_ms),
            rise: Some(want.check.rise),
            fall: Some(want.check.fall),
            eject_after: Some(want.check.eject_after),
        };
        table.update_health_check(name, &update)?;
        changes.push(format!(
            "service {name}: health checks {}",
            want.check.describe(want.proto)
        ));
    }
    follow_tasks(table, want, spec, changes)
}

/// Docker's health verdicts and stop signals on this node's tasks of `want`.
fn follow_tasks(
    table: &mut Table,
    want: &DockerService,
    spec: impl Fn(SocketAddr) -> BackendSpec,
    changes: &mut Vec<String>,
) -> Result<(), String> {
    let name = want.name.as_str();
    let ids: Vec<(u32, Health)> = {
        let service = table.service(name).expect("present");
        want.tasks
            .iter()
            .filter_map(|task| {
                let backend = service.backends.iter().find(|b| b.addr == task.addr)?;
                Some((backend.id, task.health?))
            })
            .collect()
    };
    for (id, health) in ids {
        table.set_health(name, id, health);
    }
    for task in want.tasks.iter().filter(|t| t.stopping) {
        let present = table
            .service(name)
            .expect("present")
            .backends
            .iter()
            .any(|b| b.addr == task.addr);
        if present && table.set_drained(name, spec(task.addr), true)? {
            changes.push(format!(
                "service {name}: task {} stopping: no new flows",
                task.addr
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(service: &str, n: u8, created: &str, labels: &[(&str, &str)]) -> Task {
        Task {
            container: format!("c{service}{n}"),
            service: service.into(),
            created: created.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            networks: [
                ("ingress".to_owned(), Ipv4Addr::new(10, 0, 0, n)),
                ("appnet".to_owned(), Ipv4Addr::new(10, 0, 1, n)),
            ]
            .into_iter()
            .collect(),
            gateway: Some(Ipv4Addr::new(172, 18, 0, n)),
            health: DockerHealth::None,
            stopping: false,
            process: None,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn publish_labels_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_publish("8080:80, 5353:53/udp").unwrap(),
            vec![
                Publish {
                    port: 8080,
                    target: 80,
                    proto: Proto::Tcp
                },
                Publish {
                    port: 5353,
                    target: 53,
                    proto: Proto::Udp
                },
            ]
        );
        for bad in [
            "8080",
            "8080:0",
            "x:80",
            "8080:80/sctp",
            "8080:80,8080:81",
            "",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
        let names = service_names("web", &parse_publish("8080:80,8443:443,53:53/udp").unwrap());
        assert_eq!(names, ["web-8080", "web-8443", "web-53-udp"]);
        assert_eq!(
            service_names("web", &parse_publish("8080:80").unwrap()),
            ["web"]
        );
    }

    #[test]
    fn tasks_become_a_service_at_their_overlay_addresses_with_routes_through_the_gateway() {
        let labels = [(PUBLISH_LABEL, "8080:80"), (SCHEDULER_LABEL, "maglev")];
        let tasks = [task("web", 3, "t1", &labels), task("web", 2, "t1", &labels)];
        let desired = desired(&tasks);
        assert!(desired.problems.is_empty(), "{:?}", desired.problems);
        let web = &desired.services[0];
        assert_eq!(
            (web.name.as_str(), web.port, web.scheduler),
            ("web", 8080, Scheduler::Maglev)
        );
        assert_eq!(
            web.tasks
                .iter()
                .map(|t| (t.addr, t.health))
                .collect::<Vec<_>>(),
            vec![(addr("10.0.1.2:80"), None), (addr("10.0.1.3:80"), None)]
        );
        assert!(
            web.check.enabled,
            "no Docker health check: lbctl's TCP check"
        );
        assert_eq!(
            desired.routes,
            vec![
                TaskRoute {
                    task: "10.0.1.2".parse().unwrap(),
                    gateway: "172.18.0.2".parse().unwrap()
                },
                TaskRoute {
                    task: "10.0.1.3".parse().unwrap(),
                    gateway: "172.18.0.3".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn the_newest_task_defines_the_service_and_unreachable_tasks_are_named() {
        let old = [(PUBLISH_LABEL, "8080:80")];
        let new = [(PUBLISH_LABEL, "9090:80")];
        let mut lonely = task("web", 4, "t0", &old);
        lonely.networks.retain(|n, _| n == "ingress");
        let mut no_gateway = task("web", 5, "t0", &old);
        no_gateway.gateway = None;
        let tasks = [
            task("web", 2, "t1", &old),
            task("web", 3, "t2", &new),
            lonely,
            no_gateway,
        ];
        let desired = desired(&tasks);
        assert_eq!(desired.services[0].port, 9090);
        assert_eq!(desired.services[0].tasks.len(), 2);
        assert_eq!(desired.problems.len(), 2, "{:?}", desired.problems);
        assert!(
            desired
                .problems
                .iter()
                .any(|p| p.contains("no overlay network"))
        );
        assert!(
            desired
                .problems
                .iter()
                .any(|p| p.contains("docker_gwbridge"))
        );
        // Tasks that left their networks (stopping) are skipped without a word; a service whose
        // every task here is unreachable is not published.
        let mut stopping = task("web", 6, "t3", &new);
        stopping.networks.clear();
        let mut lonely = task("api", 7, "t", &old);
        lonely.networks = [("bridge".to_owned(), Ipv4Addr::new(172, 17, 0, 7))].into();
        let second = super::desired(&[stopping, task("web", 2, "t1", &new), lonely]);
        assert_eq!(second.services.len(), 1, "{:?}", second.services);
        assert_eq!(second.services[0].tasks.len(), 1);
        assert_eq!(second.problems.len(), 1, "{:?}", second.problems);
        assert!(second.problems[0].contains("'api'"));
        let bad = desired_of_labels(&[(PUBLISH_LABEL, "80")]);
        assert!(bad.services.is_empty() && bad.problems[0].contains("lbctl.publish"));
        let bad = desired_of_labels(&[(PUBLISH_LABEL, "80:80"), (CHECK_LABEL, "ping")]);
        assert!(bad.problems[0].contains("lbctl.check"));
        for value in ["-1", "101", "three"] {
            let bad = desired_of_labels(&[(PUBLISH_LABEL, "80:80"), (EJECT_AFTER_LABEL, value)]);
            assert!(bad.services.is_empty(), "{value}");
            assert!(bad.problems[0].contains("lbctl.eject-after"), "{value}");
        }
        let five = desired_of_labels(&[(PUBLISH_LABEL, "80:80"), (EJECT_AFTER_LABEL, "5")]);
        assert_eq!(five.services[0].check.eject_after, 5);
        let default = desired_of_labels(&[(PUBLISH_LABEL, "80:80")]);
        assert_eq!(default.services[0].check.eject_after, 3);
    }

    #[test]
    fn two_swarm_services_making_one_lbctl_service_keep_the_first_by_name() {
        let two = [(PUBLISH_LABEL, "8080:80,8443:443")];
        let one = [(PUBLISH_LABEL, "9090:80")];
        let desired = desired(&[task("web", 2, "t", &two), task("web-8080", 3, "t", &one)]);
        let names: Vec<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web-8080", "web-8443"]);
        assert_eq!(desired.services[0].port, 8080, "web's");
        assert!(
            desired.problems[0].contains("'web-8080' is not published"),
            "{:?}",
            desired.problems
        );
    }

    fn desired_of_labels(labels: &[(&str, &str)]) -> Desired {
        desired(&[task("web", 2, "t", labels)])
    }

    #[test]
    fn docker_health_decides_when_lbctl_checks_are_off() {
        let labels = [(PUBLISH_LABEL, "8080:80")];
        let mut tasks = [
            task("web", 2, "t", &labels),
            task("web", 3, "t", &labels),
            task("web", 4, "t", &labels),
        ];
        tasks[0].health = DockerHealth::Healthy;
        tasks[1].health = DockerHealth::Starting;
        tasks[2].health = DockerHealth::Unhealthy;
        let web = &desired(&tasks).services[0];
        assert!(!web.check.enabled);
        let healths: Vec<_> = web.tasks.iter().map(|t| t.health).collect();
        assert_eq!(
            healths,
            [
                Some(Health::Healthy),
                Some(Health::Unhealthy),
                Some(Health::Unhealthy)
            ]
        );
        let checked = [(PUBLISH_LABEL, "8080:80"), (CHECK_LABEL, "http:/health")];
        tasks.iter_mut().for_each(|t| {
            t.labels = checked
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        });
        let web = &desired(&tasks).services[0];
        assert_eq!(web.check.http_path.as_deref(), Some("/health"));
        assert!(
            web.tasks.iter().all(|t| t.health.is_none()),
            "lbctl's checks decide"
        );
    }

    #[test]
    fn the_table_follows_scaling_keeps_the_ids_of_tasks_that_stay_and_other_nodes_tasks() {
        let labels = [(PUBLISH_LABEL, "8080:80")];
        let mut table = Table::default();
        table.add_node("a", "192.0.2.1".parse().unwrap()).unwrap();
        table.add_node("b", "192.0.2.2".parse().unwrap()).unwrap();
        let three: Vec<Task> = (2..5).map(|n| task("web", n, "t", &labels)).collect();
        let (changes, refused) = follow(&mut table, &desired(&three), Some("a"), None);
        assert!(
            refused.is_empty() && changes.len() == 1,
            "{changes:?} {refused:?}"
        );
        let web = table.service("web").unwrap();
        assert_eq!(web.origin, Origin::Docker);
        assert_eq!(web.backends.len(), 3);
        let id_of = |t: &Table, a: &str| {
            t.service("web")
                .unwrap()
                .backends
                .iter()
                .find(|b| b.addr == addr(a))
                .map(|b| b.id)
        };
        let kept = id_of(&table, "10.0.1.3:80");
        // Another node's task, as the gossip brings it.
        table
            .add_backends(
                "web",
                &[BackendSpec {
                    addr: addr("10.0.1.9:80"),
                    node: Some("b".into()),
                    weight: 1,
                }],
            )
            .unwrap();
        let two: Vec<Task> = (3..5).map(|n| task("web", n, "t", &labels)).collect();
        follow(&mut table, &desired(&two), Some("a"), None);
        assert_eq!(
            id_of(&table, "10.0.1.3:80"),
            kept,
            "a task that stays keeps its flows"
        );
        assert_eq!(id_of(&table, "10.0.1.2:80"), None);
        assert!(
            id_of(&table, "10.0.1.9:80").is_some(),
            "node b's task is b's"
        );
        // No task left here: the service stays for the other node's, unless a manager says
        // the Swarm no longer defines it.
        follow(&mut table, &desired(&[]), Some("a"), None);
        assert_eq!(table.service("web").unwrap().backends.len(), 1);
        follow(
            &mut table,
            &desired(&[]),
            Some("a"),
            Some(&BTreeSet::from(["web".to_owned()])),
        );
        assert!(table.service("web").is_some());
        let (changes, _) = follow(&mut table, &desired(&[]), Some("a"), Some(&BTreeSet::new()));
        assert!(table.service("web").is_none(), "{changes:?}");
    }

    #[test]
    fn a_new_port_keeps_the_other_nodes_tasks_and_this_nodes_ids_change() {
        let mut table = Table::default();
        table.add_node("a", "192.0.2.1".parse().unwrap()).unwrap();
        table.add_node("b", "192.0.2.2".parse().unwrap()).unwrap();
        let old = [(PUBLISH_LABEL, "8080:80")];
        follow(
            &mut table,
            &desired(&[task("web", 2, "t", &old)]),
            Some("a"),
            None,
        );
        table
            .add_backends(
                "web",
                &[BackendSpec {
                    addr: addr("10.0.1.9:80"),
                    node: Some("b".into()),
                    weight: 1,
                }],
            )
            .unwrap();
        let new = [(PUBLISH_LABEL, "9191:80")];
        let (changes, refused) = follow(
            &mut table,
            &desired(&[task("web", 3, "t", &new)]),
            Some("a"),
            None,
        );
        assert!(refused.is_empty(), "{refused:?}");
        assert!(changes[0].contains("published anew"), "{changes:?}");
        let web = table.service("web").unwrap();
        assert_eq!(web.port, 9191);
        let backends: Vec<(SocketAddr, Option<&str>)> = web
            .backends
            .iter()
            .map(|b| (b.addr, b.node.as_deref()))
            .collect();
        assert_eq!(
            backends,
            [
                (addr("10.0.1.3:80"), Some("a")),
                (addr("10.0.1.9:80"), Some("b"))
            ]
        );
    }

    #[test]
    fn a_stopping_task_is_drained_not_added_and_exited_ones_are_found_by_their_process() {
        let labels = [(PUBLISH_LABEL, "8080:80")];
        let mut table = Table::default();
        let mut tasks: Vec<Task> = (2..4).map(|n| task("web", n, "t", &labels)).collect();
        follow(&mut table, &desired(&tasks), None, None);
        tasks[0].stopping = true;
        let mut late = task("web", 4, "t", &labels);
        late.stopping = true;
        tasks.push(late);
        let (changes, _) = follow(&mut table, &desired(&tasks), None, None);
        let web = table.service("web").unwrap();
        let drained: Vec<(SocketAddr, bool)> =
            web.backends.iter().map(|b| (b.addr, b.drained)).collect();
        assert_eq!(
            drained,
            [(addr("10.0.1.2:80"), true), (addr("10.0.1.3:80"), false)],
            "{changes:?}"
        );
        // While the Engine is away: a process gone, or its pid reused, is an exited task.
        tasks[0].process = Some((100, 7));
        tasks[1].process = Some((101, 8));
        tasks[2].process = Some((102, 9));
        let (running, gone) = exited(&tasks, |pid| match pid {
            100 => Some(7),
            102 => Some(99),
            _ => None,
        });
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].process, Some((100, 7)));
        assert_eq!(gone.len(), 2);
    }

    #[test]
    fn older_tasks_leave_the_definition_to_newer_ones_whose_times_sort_as_text() {
        assert_eq!(
            sortable_time("2026-12-02T14:02:50.9287731Z"),
            "2026-12-02T14:02:50.928773100Z"
        );
        assert_eq!(
            sortable_time("2026-12-02T14:02:50Z"),
            "2026-12-02T14:02:50.000000000Z"
        );
        let mut table = Table::default();
        let new = [(PUBLISH_LABEL, "9191:80")];
        let old = [(PUBLISH_LABEL, "8080:80")];
        // Another node's newer task defined the service on 9191; this node's older tasks,
        // still labelled 8080, join it without redefining it.
        follow(
            &mut table,
            &desired(&[task("web", 2, "2026-12-02T10:00:01.5Z", &new)]),
            None,
            None,
        );
        let (changes, refused) = follow(
            &mut table,
            &desired(&[
                task("web", 2, "2026-12-02T10:00:01.5Z", &new),
                task("web", 3, "2026-12-02T09:00:00Z", &old),
            ]),
            None,
            None,
        );
        assert!(refused.is_empty(), "{refused:?}");
        let web = table.service("web").unwrap();
        assert_eq!(web.port, 9191, "{changes:?}");
        let older = desired(&[task("web", 3, "2026-12-02T09:00:00Z", &old)]);
        follow(&mut table, &older, None, None);
        let web = table.service("web").unwrap();
        assert_eq!((web.port, web.backends.len()), (9191, 1));
        assert_eq!(web.defined_at, "2026-12-02T10:00:01.500000000Z");
    }

    #[test]
    fn an_operators_service_is_never_taken_over() {
        let mut table = Table::default();
        table
            .add_service("web", Proto::Tcp, 8080, None, &[addr("10.9.0.1:80")])
            .unwrap();
        let before = table.clone();
        let (changes, refused) = follow(
            &mut table,
            &desired_of_labels(&[(PUBLISH_LABEL, "8080:80")]),
            None,
            Some(&BTreeSet::new()),
        );
        assert!(changes.is_empty());
        assert!(refused[0].contains("not Docker's"), "{refused:?}");
        assert_eq!(table, before);
        // Another name on a port the operator's service holds: refused by the table's rules.
        let mut labels = desired_of_labels(&[(PUBLISH_LABEL, "8080:80")]);
        labels.services[0].name = "api".into();
        let (_, refused) = follow(&mut table, &labels, None, None);
        assert!(refused[0].contains("already published"), "{refused:?}");
        assert_eq!(table, before);
    }
}
