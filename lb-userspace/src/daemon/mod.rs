//! `lbctl daemon`: the long-running part of an instance: health checks (`health`), the
//! Prometheus metrics (`metrics`), the flow census and the cluster loop (this file). Uses
//! `commands` for every change it makes, so that the daemon and the CLI change the table alike.
//!
//! `lbctl daemon`: serves Prometheus metrics and runs the health checks of one instance, in
//! the foreground (systemd-friendly: logs to stderr, stops cleanly on SIGTERM and SIGINT).
//!
//! The data plane does not depend on it: the programs and maps are pinned and keep forwarding
//! while the daemon stops or restarts, and every counter it exposes lives in those maps, so no
//! counter goes backwards across a restart. Health results go into the instance's state (under
//! its lock, like any command), so `service ls` shows them and a restarted daemon resumes.
pub mod health;
pub mod metrics;
pub mod passive;
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use axum::{
    Router, extract::State as AxumState, http::header, response::IntoResponse, routing::get,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::{
    cluster::gossip::{self, Gossip},
    cluster::{self, MemberView},
    commands,
    daemon::health::Tracker,
    dataplane::{FlowCensus, Maps},
    docker,
    host::underlay,
    instance::Instance,
    instance::state,
    table::{Health, HealthCheck, Proto, diff::TableDiff},
};

/// Where metrics are served unless `--metrics-addr` says otherwise: loopback only (metrics
/// name every service and backend), on a port of the range exporters use (9100-9999).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9617";
/// How often the table is re-read for services and backends to probe.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// How often the flow table is scanned for live flows at most (a scan walks every entry).
const CENSUS_EVERY: Duration = Duration::from_secs(2);
/// A scan may take at most this share of the time: a table of millions of flows takes seconds
/// to walk, one entry per syscall, and is then scanned less often.
const CENSUS_DUTY_DIVISOR: u32 = 10;
/// Resolution of the probe scheduler.
const TICK: Duration = Duration::from_millis(50);
/// How long a node that has seeds may hear from no member before it says so.
const ALONE_AFTER: Duration = Duration::from_secs(10);
/// How often the data plane's ejections are looked for: the data plane acts at once; this is
/// only how soon they are told and handed to the active checks.
const PASSIVE_EVERY: Duration = Duration::from_millis(200);

pub struct Options {
    pub metrics_addr: SocketAddr,
    pub log_json: bool,
    /// Join a gossiped cluster; `None`: the static table.
    pub cluster: Option<ClusterOptions>,
    /// Follow the Docker Engine at this address (`--docker`).
    pub docker_host: Option<String>,
}

/// How the daemon joins a gossiped cluster.
pub struct ClusterOptions {
    pub gossip: gossip::Config,
    /// The cluster's key file; `None`: gossip in clear (`--insecure`).
    pub keys: Option<Arc<crate::cluster::transport::KeyFile>>,
    /// This node's underlay address (VTEP), published to the others.
    pub vtep: IpAddr,
}

/// What the HTTP handlers and the loops share.
struct Shared {
    instance: Instance,
    /// The last flow-table scan.
    census: Mutex<Option<FlowCensus>>,
    /// The cluster as the last gossip round saw it (`--cluster` only).
    cluster: Mutex<Option<cluster::Status>>,
    /// The Docker Engine link (`--docker` only).
    docker: Option<Arc<Mutex<docker::Link>>>,
}

/// Runs until SIGTERM or SIGINT.
pub fn run(instance: Instance, options: Options) -> Result<()> {
    init_logging(options.log_json);
    // Fail early, before serving anything, if there is nothing to serve.
    commands::attached_state_and_node(&instance)?;
    // Before the cluster makes this node a member on that port.
    if options.docker_host.is_some() {
        let (port, nodes) = commands::mesh_port_in_use(&instance)?;
        docker::check_mesh_port(
            port,
            nodes || options.cluster.is_some(),
            Some(docker::DOCKER_DATA_PATH_PORT),
        )?;
    }
    match &options.cluster {
        Some(cluster) => {
            if !underlay::local_underlay_addrs()?.contains(&cluster.vtep) {
                anyhow::bail!(
                    "underlay IP {} is not an address of network namespace '{}': give this \
                     node's own address (--underlay-ip, or the IP of --gossip-addr)",
                    cluster.vtep,
                    instance.name
                );
            }
            let dropped =
                commands::cluster_join(&instance, &cluster.gossip.node, cluster.keys.is_some())?;
            if !dropped.is_empty() {
                warn!(
                    services = ?dropped,
                    "sealed gossip after a run with --insecure: the service records other nodes wrote, learned in clear, are dropped (the cluster's members give them again); check `lbctl service ls` once converged"
                );
            }
        }
        None => {
            if commands::cluster_leave(&instance)? {
                info!("started without --cluster: the table last merged is now the static table");
            }
        }
    }
    // The runtime's threads are created by this thread, which already entered the instance's
    // network namespace: they inherit it, so sockets and probes live there.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(instance, options))
}

fn init_logging(json: bool) {
    use std::io::IsTerminal as _;
    use tracing::Level;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{Layer as _, filter::filter_fn, layer::SubscriberExt as _};
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let layer = if json {
        layer.json().boxed()
    } else {
        layer.boxed()
    };
    // chitchat warns at every message from another cluster and every malformed datagram: they
    // are counted (and logged once per peer) by `gossip` instead.
    let levels = filter_fn(|meta| {
        if meta.target().starts_with("chitchat") {
            *meta.level() <= Level::ERROR
        } else {
            *meta.level() <= Level::INFO
        }
    });
    // A second daemon in the same process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(levels))
        .with(
            gossip::MalformedCounter
                .with_filter(filter_fn(|meta| meta.target().starts_with("chitchat"))),
        )
        .try_init();
}

async fn serve(instance: Instance, options: Options) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(options.metrics_addr)
        .await
        .with_context(|| format!("listening on {} for metrics", options.metrics_addr))?;
    info!(
        instance = %instance.name,
        metrics = %options.metrics_addr,
        version = env!("CARGO_PKG_VERSION"),
        "lbctl daemon started"
    );
    let shared = Arc::new(Shared {
        instance,
        census: Mutex::new(None),
        cluster: Mutex::new(None),
        docker: options
            .docker_host
            .as_ref()
            .map(|_| Arc::new(Mutex::new(docker::Link::default()))),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // SIGHUP reloads the key file; without one it must still not stop the daemon (its
    // default action), as a reflexive `kill -HUP` or a unit's ExecReload would.
    if options.cluster.as_ref().is_none_or(|c| c.keys.is_none()) {
        tokio::spawn(ignore_hangups(stop_rx.clone()));
    }
    let gossip = match options.cluster {
        Some(cluster) => {
            let config = cluster.gossip.clone();
            match &cluster.keys {
                Some(keys) => info!(
                    key_file = %keys.path().display(),
                    keys = ?keys.ring(),
                    "gossip sealed with the cluster's keyring (the first key seals)"
                ),
                None => warn!(
                    "gossip in clear (--insecure): anyone who can reach the gossip port can join the cluster, publish services and read the table"
                ),
            }
            let keys = cluster.keys.clone();
            let gossip = Gossip::start(cluster.gossip, cluster.keys).await?;
            if let Some(keys) = keys {
                tokio::spawn(reload_keys(keys, stop_rx.clone()));
            }
            info!(
                cluster = %config.cluster,
                node = %config.node,
                gossip = %config.gossip_addr,
                vtep = %cluster.vtep,
                seeds = ?config.seeds,
                interval_ms = config.gossip_interval.as_millis() as u64,
                "joined the gossiped cluster"
            );
            Some(tokio::spawn(cluster_loop(
                shared.clone(),
                gossip,
                cluster.vtep,
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let marker = shared
        .instance
        .maps_dir()
        .join(lb_common::map_names::SERVICES);
    let purged = marker.clone();
    // Docker's watcher stops the daemon only for what a restart would not cure.
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<anyhow::Error>(1);
    let docker = match (&options.docker_host, &shared.docker) {
        (Some(host), Some(link)) => {
            let (instance, host, link) = (shared.instance.clone(), host.clone(), link.clone());
            let stop = stop_rx.clone();
            Some(tokio::spawn(async move {
                if let Err(err) = docker::follow(instance, host, link, stop).await {
                    let _ = fatal_tx.send(err).await;
                }
            }))
        }
        _ => None,
    };
    let health = tokio::spawn(health_loop(shared.clone(), stop_rx.clone()));
    let census = tokio::spawn(census_loop(shared.clone(), stop_rx));
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/", get(|| async { "lbctl daemon: metrics at /metrics\n" }))
        .with_state(shared);
    let fatal = Arc::new(Mutex::new(None));
    let fatal_seen = fatal.clone();
    let stopped = async move {
        tokio::select! {
            () = stop_signal() => {}
            () = instance_purged(marker) => {}
            Some(err) = fatal_rx.recv() => {
                *fatal_seen.lock().unwrap() = Some(err);
            }
        }
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
        .context("serving metrics");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(health, census);
    if let Some(gossip) = gossip {
        let _ = gossip.await;
    }
    if let Some(docker) = docker {
        let _ = docker.await;
    }
    if let Some(err) = fatal.lock().unwrap().take() {
        error!(error = format!("{err:#}"), "lbctl daemon stopped");
        return Err(err);
    }
    if purged.exists() {
        info!("lbctl daemon stopped; the data plane keeps forwarding");
    } else {
        info!("lbctl daemon stopped: its instance was purged");
    }
    served
}

/// Takes SIGHUP on a daemon with no key file to reload: logged, nothing else.
async fn ignore_hangups(mut stop: watch::Receiver<bool>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            Some(()) = hangups.recv() => info!("SIGHUP: nothing to reload (no --cluster-key-file)"),
        }
    }
}

/// Reads the key file again every second when it changed, and on SIGHUP: a rotation takes
/// effect without a restart. A file that cannot be read or is refused leaves the keys in force.
async fn reload_keys(
    keys: Arc<crate::cluster::transport::KeyFile>,
    mut stop: watch::Receiver<bool>,
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(err) => {
            warn!(error = %err, "cannot watch SIGHUP: the key file is still read when it changes");
            None
        }
    };
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    // The last refusal, logged once until the file changes again.
    let mut refused: Option<String> = None;
    loop {
        let force = tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => false,
            Some(()) = async {
                match hangups.as_mut() {
                    Some(hangups) => hangups.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        match keys.reload(force) {
            Ok(Some(ring)) => {
                refused = None;
                info!(
                    key_file = %keys.path().display(),
                    keys = ?ring,
                    "keyring reloaded (the first key seals)"
                );
            }
            // Unchanged since the keyring in force was read: if it was refused since, it was
            // put back as it was (a mode or owner fixed back).
            Ok(None) => {
                if refused.take().is_some() {
                    info!(
                        key_file = %keys.path().display(),
                        "the key file is as it was when its keys were loaded: the keys in force stay"
                    );
                }
            }
            // Logged once until the file changes, and on every SIGHUP (an operator asking).
            Err(err) => {
                let error = format!("{err:#}");
                if force || refused.as_ref() != Some(&error) {
                    warn!(
                        error,
                        "cannot reload the key file: the keys in force are kept"
                    );
                    refused = Some(error);
                }
            }
        }
    }
}

/// Resolves once the instance is purged (`marker`, one of its pinned maps, is gone): the daemon
/// has nothing left to serve, and its loops would warn every second until stopped.
async fn instance_purged(marker: std::path::PathBuf) {
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        if !marker.exists() {
            info!("the instance was purged: stopping");
            return;
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot listen for SIGTERM/SIGINT; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "stopping");
}

async fn metrics_page(AxumState(shared): AxumState<Arc<Shared>>) -> impl IntoResponse {
    let rendered = tokio::task::spawn_blocking(move || {
        snapshot(&shared).map(|s| {
            let mut page = metrics::render(&s);
            if let Some(status) = shared.cluster.lock().unwrap().as_ref() {
                page.push_str(&metrics::render_cluster(status));
            }
            if let Some(link) = &shared.docker {
                page.push_str(&metrics::render_docker(&link.lock().unwrap()));
            }
            page
        })
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    match rendered {
        Ok(body) => (
            axum::http::StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        ),
        Err(err) => {
            error!(error = format!("{err:#}"), "cannot collect metrics");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("cannot collect metrics: {err:#}\n"),
            )
        }
    }
}

/// Everything a scrape shows, read from the state and the pinned maps at scrape time (the flow
/// census from the last scan, so that a scrape does not walk the flow table).
fn snapshot(shared: &Shared) -> Result<metrics::Snapshot> {
    let (state, node) = commands::attached_state_and_node(&shared.instance)?;
    let maps = Maps::open_pinned(&shared.instance.maps_dir())?;
    let census = match shared.census.lock().unwrap().clone() {
        Some(census) => census,
        None => maps.flow_census()?,
    };
    let counters = commands::snapshot::Counters {
        maps: &maps,
        census: &census,
    };
    commands::snapshot::read(&shared.instance, &state, node, Some(counters))
}

/// Scans the flow table now and then, so that scrapes do not walk it, and brings the node's
/// addresses (`HOST_ADDRS`) and its bridges' ports (`BRIDGE_PORTS`) up to date.
async fn census_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let scanning = shared.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut maps = Maps::open_pinned(&scanning.instance.maps_dir())?;
            // The node's addresses change without lbctl (DHCP, an address added by hand): the
            // socket programs balance what `HOST_ADDRS` holds.
            maps.sync_host_addrs(&crate::host::underlay::local_addrs()?)?;
            maps.sync_host_addrs6(&crate::host::underlay::local_addrs6()?)?;
            // Containers start and stop, and their bridges learn and forget their MACs.
            maps.sync_bridge_ports(&crate::host::underlay::bridge_ports()?)?;
            maps.flow_census()
        })
        .await;
        match result {
            Ok(Ok(census)) => *shared.census.lock().unwrap() = Some(census),
            Ok(Err(err)) => warn!(error = format!("{err:#}"), "cannot scan the flow table"),
            Err(err) => warn!(error = %err, "flow-table scan failed"),
        }
        let pause = CENSUS_EVERY.max(started.elapsed() * CENSUS_DUTY_DIVISOR);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A backend this node probes.
struct Probe {
    addr: SocketAddr,
    /// The service's protocol: a UDP service's backends get a datagram, not a connect.
    proto: Proto,
    check: HealthCheck,
    tracker: Tracker,
    next_due: Instant,
    running: bool,
}

/// (service name, backend id): a backend's identity for as long as it is in its service.
type ProbeKey = (String, u32);

/// Probes every backend this node hosts (or reaches by plain routing) of every service whose
/// checks are on, each at its service's interval, and records health flips.
async fn health_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut probes: HashMap<ProbeKey, Probe> = HashMap::new();
    let mut ejections = passive::Watcher::default();
    let mut last_passive = Instant::now();
    let (results_tx, mut results) = mpsc::unbounded_channel::<(ProbeKey, Result<(), String>)>();
    let mut tick = tokio::time::interval(TICK);
    let mut last_reload: Option<Instant> = None;
    loop {
        let mut flips = Vec::new();
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                if last_reload.is_none_or(|at| at.elapsed() >= RELOAD_EVERY) {
                    last_reload = Some(Instant::now());
                    reload(&shared, &mut probes, &mut ejections).await;
                }
                let now = Instant::now();
                if now.duration_since(last_passive) >= PASSIVE_EVERY {
                    last_passive = now;
                    for ejection in ejections.ejections() {
                        take_ejection(&ejection, &mut ejections, &mut probes, &mut flips, now);
                    }
                }
                for (key, probe) in probes.iter_mut() {
                    if probe.running || probe.next_due > now {
                        continue;
                    }
                    probe.running = true;
                    probe.next_due = now + Duration::from_millis(probe.check.interval_ms);
                    let (key, addr, proto, check, tx) = (
                        key.clone(),
                        probe.addr,
                        probe.proto,
                        probe.check.clone(),
                        results_tx.clone(),
                    );
                    tokio::spawn(async move {
                        let _ = tx.send((key, health::probe(addr, proto, &check).await));
                    });
                }
            }
            Some((key, result)) = results.recv() => {
                if let Some(probe) = probes.get_mut(&key) {
                    probe.running = false;
                    if let Err(reason) = &result {
                        debug!(service = %key.0, backend = %probe.addr, reason, "probe failed");
                    }
                    if let Some(health) = probe.tracker.observe(result.is_ok(), &probe.check) {
                        let reason = result.err().unwrap_or_default();
                        flipped(&mut flips, &key, probe.addr, health, &reason);
                        if health == Health::Healthy {
                            match ejections.end(key.1) {
                                Ok(true) => info!(
                                    service = %key.0,
                                    backend = %probe.addr,
                                    "ejection ended: the active checks found the backend healthy"
                                ),
                                Ok(false) => {}
                                Err(err) => warn!(
                                    error = format!("{err:#}"),
                                    "cannot end a backend's ejection"
                                ),
                            }
                        }
                    }
                }
            }
        }
        if !flips.is_empty() {
            let recording = shared.clone();
            let result = tokio::task::spawn_blocking(move || {
                commands::record_health(&recording.instance, &flips)
            })
            .await;
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => error!(error = format!("{err:#}"), "cannot record health"),
                Err(err) => error!(error = %err, "recording health failed"),
            }
        }
    }
}

/// An ejection the data plane made: told, and for a backend this node probes, handed to its
/// active checks (unhealthy until `rise` probes pass; probed at once).
fn take_ejection(
    ejection: &passive::Ejection,
    ejections: &mut passive::Watcher,
    probes: &mut HashMap<ProbeKey, Probe>,
    flips: &mut Vec<(String, u32, Health)>,
    now: Instant,
) {
    let key = (ejection.backend.service.clone(), ejection.id);
    let reason = ejection.reason();
    let Some(probe) = probes.get_mut(&key) else {
        warn!(
            service = %key.0,
            backend = %ejection.backend.addr,
            reason,
            "backend ejected; no active checks here: it takes new flows again in {} s, and one more failure ejects it again",
            lb_common::PASSIVE_EJECTION_NS / 1_000_000_000
        );
        return;
    };
    warn!(
        service = %key.0,
        backend = %ejection.backend.addr,
        reason,
        "backend ejected; the active checks bring it back"
    );
    ejections.hold(ejection.id);
    if let Some(health) = probe.tracker.eject() {
        flipped(flips, &key, probe.addr, health, &reason);
    }
    probe.next_due = now;
}

/// A backend's health flipped: logged, and queued to be recorded.
fn flipped(
    flips: &mut Vec<(String, u32, Health)>,
    key: &ProbeKey,
    addr: SocketAddr,
    health: Health,
    reason: &str,
) {
    info!(
        service = %key.0,
        backend = %addr,
        health = health.as_str(),
        reason,
        "backend health changed"
    );
    flips.push((key.0.clone(), key.1, health));
}

/// Brings the probe set in line with the table: new backends are probed at once, removed ones
/// forgotten, changed settings taken; and the backends whose ejections are watched.
async fn reload(
    shared: &Arc<Shared>,
    probes: &mut HashMap<ProbeKey, Probe>,
    ejections: &mut passive::Watcher,
) {
    let reading = shared.clone();
    let loaded =
        tokio::task::spawn_blocking(move || commands::attached_state_and_node(&reading.instance))
            .await;
    let (state, node) = match loaded {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(err)) => {
            warn!(error = format!("{err:#}"), "cannot read the table");
            return;
        }
        Err(err) => {
            warn!(error = %err, "reading the table failed");
            return;
        }
    };
    let watched = state
        .table
        .services
        .iter()
        .flat_map(|service| {
            service.backends.iter().map(|backend| {
                let watched = passive::Watched {
                    service: service.name.clone(),
                    addr: backend.addr,
                };
                (backend.id, watched)
            })
        })
        .collect();
    if let Err(err) = ejections.reload(&shared.instance.maps_dir(), watched) {
        warn!(
            error = format!("{err:#}"),
            "cannot watch the data plane's ejections"
        );
    }
    let mut wanted = HashMap::new();
    for service in &state.table.services {
        if !service.health_check.enabled {
            continue;
        }
        for backend in &service.backends {
            // Another node's backends are that node's to check.
            if backend.node.is_some() && backend.node != node {
                continue;
            }
            wanted.insert(
                (service.name.clone(), backend.id),
                (
                    backend.addr,
                    service.proto,
                    service.health_check.clone(),
                    backend.health,
                ),
            );
        }
    }
    probes.retain(|key, _| wanted.contains_key(key));
    let now = Instant::now();
    for (key, (addr, proto, check, health)) in wanted {
        match probes.get_mut(&key) {
            Some(probe) if probe.addr == addr => {
                probe.check = check;
                probe.proto = proto;
            }
            _ => {
                probes.insert(
                    key,
                    Probe {
                        addr,
                        proto,
                        check,
                        tracker: Tracker::new(health),
                        next_due: now,
                        running: false,
                    },
                );
            }
        }
    }
}

/// The gossiped cluster, every half gossip interval: publishes this node's records, merges the
/// live members' into the table, applies it when it changed (`commands::cluster_step`), and
/// keeps `cluster.json` and the metrics' view up to date. On stop it leaves the gossip and
/// removes `cluster.json`; the table last applied stays in force.
async fn cluster_loop(
    shared: Arc<Shared>,
    gossip: Gossip,
    vtep: IpAddr,
    mut stop: watch::Receiver<bool>,
) {
    let config = gossip.config().clone();
    let mut tick =
        tokio::time::interval((config.gossip_interval / 2).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut table_changes = 0u64;
    let mut warned = BTreeSet::new();
    let mut live = BTreeSet::new();
    let mut cut_off = BTreeSet::new();
    let mut written: Option<(cluster::Status, Instant)> = None;
    // Until the failure detector could have declared the members of the table in force dead,
    // wait to hear from them before merging: a restart must not drop their tasks (and reset
    // the flows pinned to them) for want of news.
    let warm_until = Instant::now() + config.gossip_interval.mul_f64(config.phi_threshold);
    // A node that hears from no member for this long is told why that may be, once each time.
    let mut heard_at = Instant::now();
    let mut told_alone = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let members = gossip.members().await;
        let others: Vec<MemberView> = members.iter().map(|m| m.view.clone()).collect();
        let stepping = shared.clone();
        let warming_up = Instant::now() < warm_until;
        let result = tokio::task::spawn_blocking(move || {
            commands::cluster_step(&stepping.instance, vtep, &others, warming_up)
        })
        .await;
        let (step, changes) = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(err)) => {
                error!(
                    error = format!("{err:#}"),
                    "cannot apply the cluster's table"
                );
                continue;
            }
            Err(err) => {
                error!(error = %err, "applying the cluster's table failed");
                continue;
            }
        };
        gossip.publish(&step.local, vtep, &step.digest).await;
        if changes.is_some() {
            table_changes += 1;
        }
        log_step(&step, changes.as_ref(), &mut warned);
        if !live.is_empty() {
            (heard_at, told_alone) = (Instant::now(), false);
        } else if !told_alone && !config.seeds.is_empty() && heard_at.elapsed() > ALONE_AFTER {
            told_alone = true;
            warn!(
                seeds = ?config.seeds,
                "no member alive for {} s: check the seeds and the cluster name, and that this node has the cluster's key (members drop what they cannot open, and say so in their own log)",
                ALONE_AFTER.as_secs()
            );
        }
        let mut statuses = member_statuses(members, &config, &step.digest, &mut live);
        let own_key = gossip.key_ids().and_then(|ids| ids.into_iter().next());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for member in &mut statuses {
            if member.this {
                member.key = own_key.clone();
                continue;
            }
            let Ok(addr) = member.gossip_addr.parse() else {
                continue;
            };
            (member.key, member.cut_off) = gossip.peer_link(&addr, now_ms, member.alive);
            if member.cut_off.is_some() {
                member.agrees = false;
            }
        }
        // Seeds and nodes of the table this node lists not as members, yet cut off.
        let listed: BTreeSet<&str> = statuses.iter().map(|m| m.gossip_addr.as_str()).collect();
        let cut_off_peers: Vec<cluster::PeerCutOff> = gossip
            .cut_off_peers(now_ms)
            .into_iter()
            .filter(|(addr, _)| {
                !listed.contains(addr.to_string().as_str())
                    && (config.seeds.contains(addr)
                        || step.table.nodes.iter().any(|n| n.ip == addr.ip()))
            })
            .map(|(addr, why)| cluster::PeerCutOff {
                gossip_addr: addr.to_string(),
                why,
            })
            .collect();
        log_cut_off(&statuses, &cut_off_peers, &mut cut_off);
        // Not converged while a node of the table is not heard yet: just started (its members
        // not alive yet), or a member dead to the failure detector that still sends (a key
        // just fixed: alive within a round or two).
        let detection_ms =
            (config.gossip_interval.as_millis() as f64 * config.phi_threshold) as u64;
        let unheard_yet = (warming_up
            && step
                .table
                .nodes
                .iter()
                .any(|n| n.name != config.node && !live.contains(&n.name)))
            || statuses.iter().any(|m| {
                !m.alive
                    && !m.this
                    && m.gossip_addr
                        .parse()
                        .is_ok_and(|addr| gossip.heard_within(&addr, now_ms, detection_ms))
            });
        let status = cluster::Status {
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            gossip_addr: config.gossip_addr.to_string(),
            vtep,
            generation: config.generation,
            converged: cluster::Status::converged_of(&statuses, warming_up)
                && cut_off_peers.is_empty()
                && !unheard_yet,
            digest: step.digest.clone(),
            table_generation: step.table.generation,
            table_changes,
            members: statuses,
            rejected: gossip
                .rejections()
                .counts()
                .into_iter()
                .map(|(reason, n)| (reason.to_owned(), n))
                .collect(),
            keys: gossip.key_ids(),
            cut_off_peers,
            key_file_refused: gossip.key_file_refused(),
        };
        write_status_if_due(&shared, &status, &mut written).await;
        *shared.cluster.lock().unwrap() = Some(status);
    }
    if let Err(err) = gossip.shutdown().await {
        warn!(error = format!("{err:#}"), "gossip did not stop cleanly");
    }
    let _ = std::fs::remove_file(shared.instance.state_dir.join(state::CLUSTER_FILE));
}

/// Changes named in one log line at most; the rest are counted.
const LOGGED_CHANGES: usize = 20;

/// Logs what a round of the cluster loop changed: the merged table, once its maps are written,
/// with what changed (`changes`: services and backends added and removed, as `apply --dry-run`
/// words them), and each warning not already logged the round before (`warned`, updated).
fn log_step(step: &cluster::Step, changes: Option<&TableDiff>, warned: &mut BTreeSet<String>) {
    if let Some(changes) = changes {
        let mut lines: Vec<&str> = changes
            .lines
            .iter()
            .take(LOGGED_CHANGES)
            .map(String::as_str)
            .collect();
        let more = changes.lines.len().saturating_sub(LOGGED_CHANGES);
        let more = format!("and {more} more");
        if changes.lines.len() > LOGGED_CHANGES {
            lines.push(&more);
        }
        info!(
            digest = %step.digest,
            generation = step.table.generation,
            nodes = step.table.nodes.len(),
            services = step.table.services.len(),
            backends = step.table.services.iter().map(|s| s.backends.len()).sum::<usize>(),
            changes = %lines.join("; "),
            "applied the cluster's merged table"
        );
    }
    for warning in &step.warnings {
        if !warned.contains(warning) {
            warn!(warning = %warning, "part of the cluster's table left out");
        }
    }
    *warned = step.warnings.iter().cloned().collect();
}

/// Logs each member (or other peer, by address) that became cut off, or was cut off and no
/// longer is, since the round before (`cut_off`, updated: member names and peer addresses).
fn log_cut_off(
    statuses: &[cluster::MemberStatus],
    peers: &[cluster::PeerCutOff],
    cut_off: &mut BTreeSet<String>,
) {
    let now_cut: Vec<(&str, &str)> = statuses
        .iter()
        .filter_map(|m| Some((m.name.as_str(), m.cut_off.as_deref()?)))
        .chain(
            peers
                .iter()
                .map(|p| (p.gossip_addr.as_str(), p.why.as_str())),
        )
        .collect();
    for (member, why) in &now_cut {
        if !cut_off.contains(*member) {
            warn!(member = %member, why = %why, "cluster member cut off: gossip with it is broken, its table and this node's no longer follow each other");
        }
    }
    let now: BTreeSet<String> = now_cut.iter().map(|(m, _)| (*m).to_owned()).collect();
    for name in cut_off.difference(&now) {
        info!(member = %name, "cluster member no longer cut off: gossip with it works again");
    }
    *cut_off = now;
}

/// Every member's status against this node's table `digest` (this node agreeing with itself),
/// logging the members that came alive or died since the round before (`live`, updated).
fn member_statuses(
    members: Vec<gossip::Member>,
    config: &gossip::Config,
    digest: &str,
    live: &mut BTreeSet<String>,
) -> Vec<cluster::MemberStatus> {
    let listed: Vec<(MemberView, String)> = members
        .into_iter()
        .map(|m| (m.view, m.gossip_addr.to_string()))
        .collect();
    let mut statuses =
        cluster::member_statuses(&listed, (config.node.as_str(), config.generation), digest);
    for member in statuses.iter_mut().filter(|m| m.this) {
        member.digest = Some(digest.to_owned());
        member.agrees = true;
    }
    let now_live: BTreeSet<String> = statuses
        .iter()
        .filter(|m| m.alive && !m.this)
        .map(|m| m.name.clone())
        .collect();
    for joined in now_live.difference(live) {
        info!(member = %joined, "cluster member alive");
    }
    for left in live.difference(&now_live) {
        warn!(member = %left, "cluster member dead (failure detector): its tasks leave the table");
    }
    *live = now_live;
    statuses
}

/// Writes `status` to the state folder's cluster file (for `lbctl cluster ls`) when it
/// changed since the last write (`written`, updated); rejection counts alone rewrite it at
/// most once a second.
async fn write_status_if_due(
    shared: &Arc<Shared>,
    status: &cluster::Status,
    written: &mut Option<(cluster::Status, Instant)>,
) {
    let due = written.as_ref().is_none_or(|(last, at)| {
        let mut same = last.clone();
        same.rejected = status.rejected.clone();
        same != *status
            || (last.rejected != status.rejected && at.elapsed() >= Duration::from_secs(1))
    });
    if !due {
        return;
    }
    let text = serde_json::to_vec_pretty(status).expect("status serialises");
    let dir = shared.instance.state_dir.clone();
    match tokio::task::spawn_blocking(move || state::write_atomic(&dir, state::CLUSTER_FILE, &text))
        .await
    {
        Ok(Ok(())) => *written = Some((status.clone(), Instant::now())),
        Ok(Err(err)) => warn!(error = format!("{err:#}"), "cannot write cluster.json"),
        Err(err) => warn!(error = %err, "writing cluster.json failed"),
    }
}
