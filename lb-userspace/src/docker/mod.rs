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
    collections::{BTreeMap, BTreeSet, HashMap},
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
/// Reconnection attempts back off up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Every API request's timeout, in seconds.
const REQUEST_TIMEOUT_S: u64 = 10;
/// Docker's VXLAN port for overlay networks unless `docker swarm init --data-path-port`.
const DOCKER_DATA_PATH_PORT: u16 = 4789;

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
pub async fn read(docker: &Docker) -> Result<View> {
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
            .and_then(|s| s.health)
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
        tasks.push(Task {
            gateway: gateways.get(&id).copied(),
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
        let publish = spec
            .task_template
            .and_then(|t| t.container_spec)
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
pub fn check_mesh_port(mesh_port: u16, mesh_in_use: bool, view: &View) -> Result<()> {
    if let Some(docker_port) = view.data_path_port
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
    let mut said = BTreeSet::new();
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
                continue;
            }
        };
        info!(host = %host, api = %docker.client_version(), "following the Docker Engine");
        last_error = None;
        backoff = Duration::from_millis(200);
        link.lock().unwrap().connected = true;
        let outcome = follow_connected(&instance, &docker, &link, &mut stop, &mut said).await;
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

/// Follows one connection: `Ok(true)` when stopped, `Ok(false)` when the Engine went away.
async fn follow_connected(
    instance: &Instance,
    docker: &Docker,
    link: &std::sync::Arc<std::sync::Mutex<Link>>,
    stop: &mut watch::Receiver<bool>,
    said: &mut BTreeSet<String>,
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
                    let action = event.action.unwrap_or_default();
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
                if !sync_once(instance, docker, link, said).await? {
                    return Ok(false);
                }
            }
            _ = resync.tick() => {
                if !sync_once(instance, docker, link, said).await? {
                    return Ok(false);
                }
            }
        }
    }
}

/// One read and table change; `Ok(false)` when the Engine could not be read.
async fn sync_once(
    instance: &Instance,
    docker: &Docker,
    link: &std::sync::Arc<std::sync::Mutex<Link>>,
    said: &mut BTreeSet<String>,
) -> Result<bool, Fatal> {
    let view = match read(docker).await {
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
    check_mesh_port(mesh_port, mesh_in_use, &view).map_err(Fatal)?;
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
            for problem in now.difference(said) {
                warn!("{problem}");
            }
            *said = now;
        }
        Err(err) => error!(error = format!("{err:#}"), "cannot apply Docker's services"),
    }
    Ok(true)
}
