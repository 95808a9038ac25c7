//! Following the Docker Engine (`lbctl daemon --docker`): reads this node's Swarm tasks and,
//! on a manager, the Swarm's services over the Engine API (bollard), follows its event stream,
//! and hands what they ask for to `commands::docker_follow`. Uses `commands` and `table`; used by
//! the daemon.
//!
//! Events trigger a full read (debounced: a scale of ten tasks is one table change), and a read
//! every `RESYNC_EVERY` catches anything an event did not say. When the Engine is unreachable
//! (dockerd restarting, an API error), the table keeps its Docker services as they are and the
//! daemon reconnects; once back, one read brings the table up to date.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::HealthStatusEnum,
    query_parameters::{EventsOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    commands,
    host::task_routes::GATEWAY_BRIDGE,
    instance::Instance,
    table::docker::{self as labels, DockerHealth, Task},
};

/// Where the Engine listens unless `--docker-host` says otherwise.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// A read of the whole view at least this often, events or not.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// Events arriving within this long of each other make one read.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Reconnection attempts back off up to this; meanwhile each attempt also looks for tasks
/// that exited.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Every API request's timeout, in seconds.
const REQUEST_TIMEOUT_S: u64 = 10;
/// Docker's VXLAN port for overlay networks unless `docker swarm init --data-path-port`.
pub const DOCKER_DATA_PATH_PORT: u16 = 4789;

/// Connects to the Engine at `host` (`unix:///path`, `tcp://host:port` or `http://...`) and
/// settles on the API version both speak (this machine's Debian dockerd speaks 1.41).
pub async fn connect(host: &str) -> Result<Docker> {
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        Docker::connect_with_unix(path, REQUEST_TIMEOUT_S, API_DEFAULT_VERSION)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(
            &host.replacen("tcp://", "http://", 1),
            REQUEST_TIMEOUT_S,
            API_DEFAULT_VERSION,
        )
    } else {
        bail!("--docker-host {host}: give unix:///PATH or tcp://HOST:PORT");
    }
    .with_context(|| format!("connecting to the Docker Engine at {host}"))?;
    docker
        .negotiate_version()
        .await
        .with_context(|| format!("asking the Docker Engine at {host} for its API version"))
}

/// What one read of the Engine found.
pub struct View {
    pub tasks: Vec<Task>,
    /// Containers with `lbctl.publish` that are not Swarm tasks, or cannot be read.
    pub problems: Vec<String>,
    /// The lbctl service names the Swarm defines, on a manager.
    pub swarm: Option<BTreeSet<String>>,
    /// The UDP port of Docker's overlay networks, when the node is in a Swarm.
    pub data_path_port: Option<u16>,
}

/// Reads this node's running containers that carry `lbctl.publish`, their addresses and
/// health, and on a manager the Swarm's services.
/// `stopping`: the containers Docker signalled to stop (from the event stream).
pub async fn read(docker: &Docker, stopping: &HashSet<String>) -> Result<View> {
    let filters = HashMap::from([
        ("label".to_owned(), vec![labels::PUBLISH_LABEL.to_owned()]),
        ("status".to_owned(), vec!["running".to_owned()]),
    ]);
    let listed = docker
        .list_containers(Some(ListContainersOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .context("listing containers")?;
    let mut problems = Vec::new();
    let gateways = if listed.is_empty() {
        HashMap::new()
    } else {
        gateway_addresses(docker).await?
    };
    let mut tasks = Vec::new();
    for summary in listed {
        let Some(id) = summary.id else { continue };
        let container = match docker.inspect_container(&id, None).await {
            Ok(container) => container,
            // Gone between the list and now: the next event reads again.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => continue,
            Err(err) => return Err(anyhow!(err).context(format!("inspecting container {id}"))),
        };
        let labels: BTreeMap<String, String> = container
            .config
            .and_then(|c| c.labels)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let Some(service) = labels.get(labels::SWARM_SERVICE_LABEL).cloned() else {
            problems.push(format!(
                "container {} has {} but is not a Swarm task (`docker service create \
                 --container-label`): left out",
                &id[..id.len().min(12)],
                labels::PUBLISH_LABEL
            ));
            continue;
        };
        let health = match container
            .state
            .as_ref()
            .and_then(|s| s.health.as_ref())
            .and_then(|h| h.status)
        {
            Some(HealthStatusEnum::HEALTHY) => DockerHealth::Healthy,
            Some(HealthStatusEnum::STARTING) => DockerHealth::Starting,
            Some(HealthStatusEnum::UNHEALTHY) => DockerHealth::Unhealthy,
            _ => DockerHealth::None,
        };
        let networks = container
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, endpoint)| {
                let addr = endpoint.ip_address?.parse::<Ipv4Addr>().ok()?;
                Some((name, addr))
            })
            .collect();
        let process = container
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid > 0)
            .and_then(|pid| process_start(pid).map(|start| (pid, start)));
        tasks.push(Task {
            gateway: gateways.get(&id).copied(),
            stopping: stopping.contains(&id),
            process,
            container: id,
            service,
            created: container.created.unwrap_or_default(),
            labels,
            networks,
            health,
        });
    }
    let info = docker.info().await.context("reading the Engine's info")?;
    let swarm_info = info.swarm.unwrap_or_default();
    let in_swarm = swarm_info
        .node_id
        .as_deref()
        .is_some_and(|id| !id.is_empty());
    let manager = swarm_info.control_available.unwrap_or(false);
    let data_path_port = in_swarm.then(|| {
        swarm_info
            .cluster
            .and_then(|c| c.data_path_port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .unwrap_or(DOCKER_DATA_PATH_PORT)
    });
    let swarm = if manager {
        Some(swarm_services(docker).await?)
    } else {
        None
    };
    Ok(View {
        tasks,
        problems,
        swarm,
        data_path_port,
    })
}

/// When process `pid` started (clock ticks since boot, field 22 of `/proc/PID/stat`), if this
/// namespace sees it.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces but ends with the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Each container's address on `docker_gwbridge`, by container id.
async fn gateway_addresses(docker: &Docker) -> Result<HashMap<String, Ipv4Addr>> {
    let network = match docker.inspect_network(GATEWAY_BRIDGE, None).await {
        Ok(network) => network,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(HashMap::new()),
        Err(err) => return Err(anyhow!(err).context(format!("inspecting {GATEWAY_BRIDGE}"))),
    };
    Ok(network
        .containers
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(id, endpoint)| {
            let cidr = endpoint.ipv4_address?;
            let addr = cidr.split('/').next()?.parse().ok()?;
            Some((id, addr))
        })
        .collect())
}

/// The lbctl service names the Swarm's services define (managers only can list them).
async fn swarm_services(docker: &Docker) -> Result<BTreeSet<String>> {
    let services = docker
        .list_services(None)
        .await
        .context("listing the Swarm's services")?;
    let mut names = BTreeSet::new();
    for service in services {
        let Some(spec) = service.spec else { continue };
        let Some(name) = spec.name else { continue };
        let Some(template) = spec.task_template else {
            continue;
        };
        // A service on no network has no task address lbctl could reach from other nodes
        // (`table::docker::desired` leaves its tasks out).
        if template.networks.unwrap_or_default().is_empty() {
            continue;
        }
        let publish = template
            .container_spec
            .and_then(|c| c.labels)
            .and_then(|l| l.get(labels::PUBLISH_LABEL).cloned());
        if let Some(Ok(publish)) = publish.map(|p| labels::parse_publish(&p)) {
            names.extend(labels::service_names(&name, &publish));
        }
    }
    Ok(names)
}

/// Refuses a mesh whose VXLAN port is Docker's overlay port: Docker's overlay networks use the
/// same VNIs lbctl's mesh does (its `ingress` network has VNI 4096, lbctl's default), and lbctl
/// would take their packets.
/// `docker_port`: the Swarm's data path port, `None` outside a Swarm.
pub fn check_mesh_port(mesh_port: u16, mesh_in_use: bool, docker_port: Option<u16>) -> Result<()> {
    if let Some(docker_port) = docker_port
        && mesh_in_use
        && docker_port == mesh_port
    {
        bail!(
            "the mesh's VXLAN port {mesh_port} is the port of Docker's overlay networks, whose \
             VNIs lbctl's would collide with: move lbctl's mesh to another port on every node \
             (`lbctl mesh set --vxlan-port 4790`) before `lbctl daemon --docker`"
        );
    }
    Ok(())
}

/// What the daemon shows of its Docker link (`lbctl service ls`, metrics).
#[derive(Clone, Debug, Default)]
pub struct Link {
    pub connected: bool,
    pub reads: u64,
    pub changes: u64,
}

/// Follows the Engine at `host` until `stop`: reconnects when it goes away, reads on events
/// and every `RESYNC_EVERY`. Returns an error only for what a restart would not cure (the
/// mesh's port is Docker's).
pub async fn follow(
    instance: Instance,
    host: String,
    link: std::sync::Arc<std::sync::Mutex<Link>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Duration::from_millis(200);
    let mut last_error: Option<String> = None;
    let mut memory = Memory::default();
    loop {
        let docker = tokio::select! {
            _ = stop.changed() => return Ok(()),
            connected = connect(&host) => connected,
        };
        let docker = match docker {
            Ok(docker) => docker,
            Err(err) => {
                let text = format!("{err:#}");
                if last_error.as_ref() != Some(&text) {
                    warn!(error = %text, "cannot reach the Docker Engine; its services stay in the table as they are, retrying");
                    last_error = Some(text);
                }
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                prune_exited(&instance, &mut memory).await;
                continue;
            }
        };
        info!(host = %host, api = %docker.client_version(), "following the Docker Engine");
        last_error = None;
        backoff = Duration::from_millis(200);
        link.lock().unwrap().connected = true;
        let outcome = follow_connected(&instance, &docker, &link, &mut stop, &mut memory).await;
        link.lock().unwrap().connected = false;
        match outcome {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(Fatal(err)) => return Err(err),
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
    }
}

struct Fatal(anyhow::Error);

/// What the watcher keeps between reads, and across reconnections.
#[derive(Default)]
struct Memory {
    /// The problems logged, each once while it lasts.
    said: BTreeSet<String>,
    /// Containers Docker signalled to stop: drained until they exit.
    stopping: HashSet<String>,
    /// This node's tasks at the last read.
    tasks: Vec<Task>,
}

/// While the Engine is away: the tasks whose process exited since the last read (dockerd
/// stopping without live-restore stops its containers) leave the table, so that their
/// service's new flows go to the tasks still running.
async fn prune_exited(instance: &Instance, memory: &mut Memory) {
    let (running, gone) = labels::exited(&memory.tasks, process_start);
    if gone.is_empty() {
        return;
    }
    let names: Vec<String> = gone
        .iter()
        .map(|t| t.container[..12.min(t.container.len())].to_owned())
        .collect();
    warn!(tasks = %names.join(" "), "tasks of this node exited while the Docker Engine is away: out of the table");
    memory.tasks = running;
    let desired = labels::desired(&memory.tasks);
    let applying = instance.clone();
    match tokio::task::spawn_blocking(move || commands::docker_follow(&applying, &desired, None))
        .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => error!(error = format!("{err:#}"), "cannot apply Docker's services"),
        Err(err) => error!(error = %err, "applying Docker's services failed"),
    }
}

/// Follows one connection: `Ok(true)` when stopped, `Ok(false)` when the Engine went away.
async fn follow_connected(
    instance: &Instance,
    docker: &Docker,
    link: &std::sync::Arc<std::sync::Mutex<Link>>,
    stop: &mut watch::Receiver<bool>,
    memory: &mut Memory,
) -> Result<bool, Fatal> {
    let filters = HashMap::from([(
        "type".to_owned(),
        vec!["container".to_owned(), "network".to_owned()],
    )]);
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }));
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first read once the event stream is open (the debounce gives it time to connect).
    let mut due = Some(tokio::time::Instant::now() + DEBOUNCE);
    loop {
        let wait_due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => return Ok(true),
            event = events.next() => match event {
                Some(Ok(event)) => {
                    let action = event.action.clone().unwrap_or_default();
                    if let Some(id) = stop_signalled(&event) {
                        memory.stopping.insert(id);
                    }
                    if !action.starts_with("exec_") && due.is_none() {
                        due = Some(tokio::time::Instant::now() + DEBOUNCE);
                    }
                }
                Some(Err(err)) => {
                    warn!(error = %err, "lost the Docker Engine's event stream; its services stay in the table as they are, reconnecting");
                    return Ok(false);
                }
                None => {
                    warn!("the Docker Engine closed its event stream; its services stay in the table as they are, reconnecting");
                    return Ok(false);
                }
            },
            () = wait_due => {
                due = None;
                if !sync_once(instance, docker, link, memory).await? {
                    return Ok(false);
                }
            }
            _ = resync.tick() => {
                if !sync_once(instance, docker, link, memory).await? {
                    return Ok(false);
                }
            }
        }
    }
}

/// The container a `kill` event signals to stop (SIGTERM, SIGKILL, SIGINT or SIGQUIT: how
/// Docker stops a container, and Swarm a task), not a reload (SIGHUP) or a user signal.
fn stop_signalled(event: &bollard::models::EventMessage) -> Option<String> {
    if event.action.as_deref() != Some("kill") {
        return None;
    }
    let actor = event.actor.as_ref()?;
    let signal = actor.attributes.as_ref()?.get("signal")?;
    ["15", "9", "2", "3"]
        .contains(&signal.as_str())
        .then(|| actor.id.clone())
        .flatten()
}

/// One read and table change; `Ok(false)` when the Engine could not be read.
async fn sync_once(
    instance: &Instance,
    docker: &Docker,
    link: &std::sync::Arc<std::sync::Mutex<Link>>,
    memory: &mut Memory,
) -> Result<bool, Fatal> {
    let view = match read(docker, &memory.stopping).await {
        Ok(view) => view,
        Err(err) => {
            warn!(
                error = format!("{err:#}"),
                "cannot read the Docker Engine; its services stay in the table as they are, reconnecting"
            );
            return Ok(false);
        }
    };
    let checked = instance.clone();
    let (mesh_port, mesh_in_use) =
        tokio::task::spawn_blocking(move || commands::mesh_port_in_use(&checked))
            .await
            .map_err(|err| Fatal(anyhow!(err)))?
            .map_err(Fatal)?;
    check_mesh_port(mesh_port, mesh_in_use, view.data_path_port).map_err(Fatal)?;
    // Forget the stopped containers that are gone.
    memory
        .stopping
        .retain(|id| view.tasks.iter().any(|t| t.container == *id));
    memory.tasks = view.tasks.clone();
    let desired = labels::desired(&view.tasks);
    let swarm = view.swarm.clone();
    let applying = instance.clone();
    let wanted = desired.clone();
    let result = tokio::task::spawn_blocking(move || {
        commands::docker_follow(&applying, &wanted, swarm.as_ref())
    })
    .await
    .map_err(|err| Fatal(anyhow!(err)))?;
    let mut link = link.lock().unwrap();
    link.reads += 1;
    match result {
        Ok(followed) => {
            if !followed.changes.is_empty() {
                link.changes += 1;
                info!(changes = %followed.changes.join("; "), "the table follows Docker");
            }
            let now: BTreeSet<String> = view
                .problems
                .iter()
                .chain(&desired.problems)
                .chain(&followed.refused)
                .cloned()
                .collect();
            for problem in now.difference(&memory.said) {
                warn!("{problem}");
            }
            memory.said = now;
        }
        Err(err) => error!(error = format!("{err:#}"), "cannot apply Docker's services"),
    }
    Ok(true)
}
