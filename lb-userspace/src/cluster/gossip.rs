//! Carries each node's records (`cluster`) to every node with chitchat (Scuttlebutt gossip and
//! a phi-accrual failure detector): each node's records are keys of its chitchat node state,
//! and the members are read back from chitchat's view of the cluster.
//!
//! Keys of a node's state:
//! - `vtep`: its underlay IP;
//! - `svc/<name>`: a service record (JSON `cluster::ServiceRecord`);
//! - `be/<service>`: its tasks of a service (JSON list of `cluster::BackendRecord`), deleted
//!   (a chitchat tombstone) when it has none left;
//! - `digest`: the digest of the table it applied (`cluster::table_digest`).
//!
//! Rejections, counted by reason (`lbctl_gossip_rejected_messages_total`):
//! - `wrong_cluster`: a SYN naming another cluster. Chitchat answers it with `BadCluster` and
//!   takes nothing from it; the transport wrapper here sees it pass and counts it.
//! - `rejected_by_peer`: a `BadCluster` answer: a node of another cluster refused our SYN.
//! - `malformed`: a datagram chitchat's UDP transport could not decode; chitchat drops it and
//!   logs the `invalid-chitchat-payload` event, which a tracing layer here counts. With a key
//!   file, chitchat decodes only what the sealed transport opened and hands it on a loopback
//!   port, so `malformed` there counts what another local process sent to that port (dropped:
//!   it comes from none of the peers' loopback sockets).
//! - `malformed_value`: a well-formed message carrying a key this node cannot read (bad JSON,
//!   a bad name or address): the key is ignored, counted once per key version.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, FailureDetectorConfig,
    ProtocolVersion, spawn_chitchat,
    transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpTransport},
};
use tracing::warn;

use crate::{
    cluster::{
        BackendRecord, Local, MemberView, ServiceRecord,
        seal::{Rejection, key_id_text},
        transport::{CutOff, KeyFile, PeerLinks, SealedTransport},
    },
    table,
};

pub const KEY_VTEP: &str = "vtep";
pub const KEY_DIGEST: &str = "digest";
pub const SERVICE_PREFIX: &str = "svc/";
pub const BACKENDS_PREFIX: &str = "be/";

/// The UDP port Docker Swarm gossips on, and lbctl's default.
pub const DEFAULT_GOSSIP_PORT: u16 = 7946;
/// Time between gossip rounds unless `--gossip-interval` says otherwise.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(500);
/// A member is dead once it has been silent for this many mean heartbeat intervals (chitchat's
/// phi is the silence divided by the mean interval).
pub const DEFAULT_PHI_THRESHOLD: f64 = 8.0;
/// How long a dead member's state is kept (listed as dead) before it is forgotten, and how long
/// a deleted key's tombstone is kept.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// How to join the cluster.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster: String,
    pub node: String,
    /// Where the gossip socket listens, and the address other nodes gossip to.
    pub gossip_addr: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    /// Distinguishes this run of the node from its earlier ones (milliseconds at start).
    pub generation: u64,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
}

impl Config {
    /// The failure detector's settings: dead after `phi_threshold` mean heartbeat intervals of
    /// silence, the mean starting from the gossip interval.
    fn failure_detector(&self) -> FailureDetectorConfig {
        FailureDetectorConfig {
            phi_threshold: self.phi_threshold,
            initial_interval: self.gossip_interval,
            dead_node_grace_period: FORGET_AFTER,
            ..FailureDetectorConfig::default()
        }
    }
}

/// Gossip messages rejected, by reason.
#[derive(Debug, Default)]
pub struct Rejections {
    wrong_cluster: AtomicU64,
    rejected_by_peer: AtomicU64,
    malformed_value: AtomicU64,
    unauthenticated: AtomicU64,
    replayed: AtomicU64,
}

/// Datagrams chitchat's UDP transport could not decode, in this process. A process runs one
/// daemon; tests that start several gossip nodes in one process share it.
static MALFORMED: AtomicU64 = AtomicU64::new(0);

impl Rejections {
    /// `(reason, count)` for every reason, in a fixed order.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("wrong_cluster", self.wrong_cluster.load(Ordering::Relaxed)),
            (
                "rejected_by_peer",
                self.rejected_by_peer.load(Ordering::Relaxed),
            ),
            ("malformed", MALFORMED.load(Ordering::Relaxed)),
            (
                "malformed_value",
                self.malformed_value.load(Ordering::Relaxed),
            ),
            (
                Rejection::Unauthenticated.name(),
                self.unauthenticated.load(Ordering::Relaxed),
            ),
            (
                Rejection::Replayed.name(),
                self.replayed.load(Ordering::Relaxed),
            ),
        ]
    }

    /// A datagram the sealed transport dropped (`transport`).
    pub fn count_sealing(&self, rejection: Rejection) {
        let counter = match rejection {
            Rejection::Unauthenticated => &self.unauthenticated,
            Rejection::Replayed | Rejection::Misdirected => &self.replayed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A tracing layer that counts chitchat's `invalid-chitchat-payload` events: datagrams its
/// UDP transport received and could not decode (then dropped).
pub struct MalformedCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for MalformedCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !event.metadata().target().starts_with("chitchat") {
            return;
        }
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 |= format!("{value:?}") == "invalid-chitchat-payload";
                }
            }
        }
        let mut message = Message(false);
        event.record(&mut message);
        if message.0 {
            MALFORMED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A transport that counts the messages chitchat rejects for their cluster, then hands every
/// message to chitchat unchanged (it answers and ignores them itself).
struct CountingTransport {
    inner: Box<dyn Transport>,
    cluster: String,
    rejections: Arc<Rejections>,
}

#[async_trait]
impl Transport for CountingTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(CountingSocket {
            inner: self.inner.open(listen_addr).await?,
            cluster: self.cluster.clone(),
            rejections: self.rejections.clone(),
            reported: HashSet::new(),
        }))
    }
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    cluster: String,
    rejections: Arc<Rejections>,
    /// Peers already logged as foreign, so that each is logged once.
    reported: HashSet<SocketAddr>,
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: chitchat::ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.inner.recv().await?;
        match &outcome.envelope.message {
            ChitchatMessage::Syn { cluster_id, .. } if *cluster_id != self.cluster => {
                self.rejections
                    .wrong_cluster
                    .fetch_add(1, Ordering::Relaxed);
                if self.reported.insert(outcome.from_addr) {
                    warn!(
                        from = %outcome.from_addr,
                        their_cluster = %cluster_id,
                        "gossip from a node of another cluster rejected (counted; logged once per peer)"
                    );
                }
            }
            ChitchatMessage::BadCluster => {
                self.rejections
                    .rejected_by_peer
                    .fetch_add(1, Ordering::Relaxed);
                if self.reported.insert(outcome.from_addr) {
                    warn!(
                        from = %outcome.from_addr,
                        "a node of another cluster refused our gossip (counted; logged once per peer)"
                    );
                }
            }
            _ => {}
        }
        Ok(outcome)
    }
}

/// A member as chitchat knows it.
#[derive(Clone, Debug)]
pub struct Member {
    pub view: MemberView,
    pub gossip_addr: SocketAddr,
}

/// This node's gossip: the chitchat server and what it publishes.
pub struct Gossip {
    handle: ChitchatHandle,
    config: Config,
    rejections: Arc<Rejections>,
    /// Keys already counted as unreadable: (node, generation, key, version).
    unreadable: Mutex<HashSet<(String, u64, String, u64)>>,
    /// The cluster's key file; `None`: gossip in clear.
    keys: Option<Arc<KeyFile>>,
    links: PeerLinks,
}

impl Gossip {
    /// Starts gossiping over UDP on `config.gossip_addr`: sealed with `keys` (the cluster's
    /// key file), or in clear without.
    pub async fn start(config: Config, keys: Option<Arc<KeyFile>>) -> Result<Gossip> {
        let rejections = Arc::new(Rejections::default());
        let links = PeerLinks::default();
        let transport: Box<dyn Transport> = match &keys {
            Some(keys) => Box::new(SealedTransport {
                keys: keys.clone(),
                rejections: rejections.clone(),
                links: links.clone(),
            }),
            None => Box::new(UdpTransport),
        };
        let mut gossip = Self::start_with(config, transport, rejections).await?;
        gossip.keys = keys;
        gossip.links = links;
        Ok(gossip)
    }

    /// The ids of the keyring in force, the sealing one first; `None`: gossip in clear.
    pub fn key_ids(&self) -> Option<Vec<String>> {
        let keys = self.keys.as_ref()?;
        Some(keys.ring().ids().into_iter().map(key_id_text).collect())
    }

    /// The id of the key the peer at `addr` seals with (as its last datagram said: the one
    /// opened, or the one a datagram this node cannot open names), and why gossip with it is
    /// broken at `now_ms` (Unix milliseconds), if it is (`cluster ls`).
    pub fn peer_link(
        &self,
        addr: &SocketAddr,
        now_ms: u64,
        alive: bool,
    ) -> (Option<String>, Option<String>) {
        let Some(keys) = &self.keys else {
            return (None, None);
        };
        let links = self.links.lock().expect("not poisoned");
        let Some(link) = links.get(addr) else {
            return (None, None);
        };
        let sealing = keys.ring().sealing_id();
        let cut_off = if alive {
            link.cut_off_alive(now_ms, keys.loaded_ms())
        } else {
            link.cut_off(now_ms, keys.loaded_ms())
        };
        let key = match cut_off {
            Some(CutOff::UnknownKey(Some(key))) => Some(key),
            _ => link.key,
        };
        (
            key.map(key_id_text),
            cut_off.map(|cut| CutOff::describe(cut, sealing)),
        )
    }

    /// Every peer address whose gossip with this node is broken at `now_ms`, with why.
    pub fn cut_off_peers(&self, now_ms: u64) -> Vec<(SocketAddr, String)> {
        let Some(keys) = &self.keys else {
            return Vec::new();
        };
        let sealing = keys.ring().sealing_id();
        let links = self.links.lock().expect("not poisoned");
        links
            .iter()
            .filter_map(|(addr, link)| {
                let cut = link.cut_off(now_ms, keys.loaded_ms())?;
                Some((*addr, CutOff::describe(cut, sealing)))
            })
            .collect()
    }

    /// Whether anything came from `addr` (opened or not) within `window_ms` of `now_ms`: a
    /// member the failure detector calls dead that is still sending is not gone, it is not
    /// heard yet (a key just fixed) or not heard at all (cut off).
    pub fn heard_within(&self, addr: &SocketAddr, now_ms: u64, window_ms: u64) -> bool {
        let links = self.links.lock().expect("not poisoned");
        links
            .get(addr)
            .is_some_and(|link| link.heard_within(now_ms, window_ms))
    }

    /// Why the key file on disk is refused, if it is (the keys in force are older).
    pub fn key_file_refused(&self) -> Option<String> {
        self.keys.as_ref()?.refused()
    }

    /// Starts gossiping over `transport` (chitchat's in-memory one in tests), counting what it
    /// rejects in `rejections`.
    pub async fn start_with(
        config: Config,
        transport: Box<dyn Transport>,
        rejections: Arc<Rejections>,
    ) -> Result<Gossip> {
        let counting = CountingTransport {
            inner: transport,
            cluster: config.cluster.clone(),
            rejections: rejections.clone(),
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(
                config.node.clone(),
                config.generation,
                config.gossip_addr,
            ),
            cluster_id: config.cluster.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.gossip_addr,
            seed_nodes: config.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: config.failure_detector(),
            marked_for_deletion_grace_period: FORGET_AFTER,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let handle = spawn_chitchat(chitchat_config, Vec::new(), &counting)
            .await
            .with_context(|| format!("starting gossip on {}", config.gossip_addr))?;
        Ok(Gossip {
            handle,
            config,
            rejections,
            unreadable: Mutex::new(HashSet::new()),
            keys: None,
            links: PeerLinks::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn rejections(&self) -> &Rejections {
        &self.rejections
    }

    /// Publishes this node's records, underlay IP and table digest: keys that changed are set,
    /// keys no longer wanted deleted. Unchanged keys are left alone (chitchat then sends
    /// nothing new).
    pub async fn publish(&self, local: &Local, vtep: IpAddr, digest: &str) {
        let wanted = keys_of(local, vtep, digest);
        self.handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                let stale: Vec<String> = state
                    .key_values()
                    .map(|(key, _)| key.to_owned())
                    .filter(|key| !wanted.contains_key(key))
                    .collect();
                for key in stale {
                    state.delete(&key);
                }
                for (key, value) in &wanted {
                    state.set(key, value);
                }
            })
            .await;
    }

    /// Every member chitchat knows, this node included, with what it publishes.
    pub async fn members(&self) -> Vec<Member> {
        let mut unreadable = Vec::new();
        let members = self
            .handle
            .with_chitchat(|chitchat| {
                let live: BTreeSet<&ChitchatId> = chitchat.live_nodes().collect();
                chitchat
                    .node_states()
                    .iter()
                    .filter_map(|(id, state)| {
                        let view = read_member(id, state, live.contains(id), &mut unreadable)?;
                        Some(Member {
                            view,
                            gossip_addr: id.gossip_advertise_addr,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        if !unreadable.is_empty() {
            let mut seen = self.unreadable.lock().unwrap();
            for (entry, reason) in unreadable {
                let (node, key) = (entry.0.clone(), entry.2.clone());
                if seen.insert(entry) {
                    self.rejections
                        .malformed_value
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(
                        node,
                        key, reason, "unreadable gossip value ignored (counted)"
                    );
                }
            }
        }
        members
    }

    /// Leaves: stops gossiping (the others' failure detectors then declare this node dead).
    pub async fn shutdown(self) -> Result<()> {
        self.handle.shutdown().await
    }
}

/// The keys a node with `local` publishes.
pub fn keys_of(local: &Local, vtep: IpAddr, digest: &str) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    keys.insert(KEY_VTEP.to_owned(), vtep.to_string());
    keys.insert(KEY_DIGEST.to_owned(), digest.to_owned());
    for (name, record) in &local.services {
        keys.insert(
            format!("{SERVICE_PREFIX}{name}"),
            serde_json::to_string(record).expect("records serialise"),
        );
    }
    for (service, backends) in local.backends.iter().filter(|(_, b)| !b.is_empty()) {
        keys.insert(
            format!("{BACKENDS_PREFIX}{service}"),
            serde_json::to_string(backends).expect("records serialise"),
        );
    }
    keys
}

type Unreadable = ((String, u64, String, u64), String);

/// Reads a member's keys; unreadable keys are left out and listed in `unreadable`. A member
/// whose name is not a valid node name is left out whole.
fn read_member(
    id: &ChitchatId,
    state: &chitchat::NodeState,
    alive: bool,
    unreadable: &mut Vec<Unreadable>,
) -> Option<MemberView> {
    let name = id.node_id.to_string();
    let mut bad = |key: &str, reason: String| {
        let version = state.get_versioned(key).map_or(0, |v| v.version);
        unreadable.push((
            (name.clone(), id.generation_id, key.to_owned(), version),
            reason,
        ));
    };
    if let Err(err) = table::validate_name("node", &name) {
        bad("", err);
        return None;
    }
    let mut view = MemberView {
        name: name.clone(),
        generation: id.generation_id,
        alive,
        vtep: None,
        services: BTreeMap::new(),
        backends: BTreeMap::new(),
        digest: state.get(KEY_DIGEST).map(str::to_owned),
    };
    if let Some(vtep) = state.get(KEY_VTEP) {
        match table::parse_node_ip(vtep) {
            Ok(ip) => view.vtep = Some(ip),
            Err(err) => bad(KEY_VTEP, err),
        }
    }
    for (key, value) in state.key_values() {
        if let Some(service) = key.strip_prefix(SERVICE_PREFIX) {
            match table::validate_name("service", service).and_then(|()| {
                serde_json::from_str::<ServiceRecord>(value).map_err(|e| e.to_string())
            }) {
                Ok(record) => {
                    view.services.insert(service.to_owned(), record);
                }
                Err(err) => bad(key, err),
            }
        } else if let Some(service) = key.strip_prefix(BACKENDS_PREFIX) {
            match table::validate_name("service", service).and_then(|()| {
                let records: Vec<BackendRecord> =
                    serde_json::from_str(value).map_err(|e| e.to_string())?;
                for record in &records {
                    table::parse_backend(&record.addr.to_string())?;
                }
                Ok(records)
            }) {
                Ok(records) => {
                    view.backends.insert(service.to_owned(), records);
                }
                Err(err) => bad(key, err),
            }
        }
    }
    Some(view)
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Instant};

    use chitchat::transport::ChannelTransport;

    use super::*;
    use crate::{
        cluster::{self, ServiceDef, Version},
        table::{Health, HealthCheck, Proto, Table},
    };

    /// A node of the simulated cluster: its gossip, its applied table and its records.
    struct Sim {
        gossip: Gossip,
        vtep: IpAddr,
        table: Table,
        local: Local,
    }

    impl Sim {
        /// One round of the daemon's loop, without the maps: merge, apply, adopt, publish.
        async fn round(&mut self) {
            let others: Vec<MemberView> = self
                .gossip
                .members()
                .await
                .into_iter()
                .map(|m| m.view)
                .collect();
            let step = cluster::step(&self.table, &self.local, self.vtep, &others);
            self.table = step.table;
            self.local = step.local;
            self.gossip
                .publish(&self.local, self.vtep, &step.digest)
                .await;
        }

        fn digest(&self) -> String {
            cluster::table_digest(&self.table)
        }
    }

    fn task(i: usize, k: usize) -> BackendRecord {
        BackendRecord {
            addr: format!("10.0.{i}.{}:80", 10 + k).parse().unwrap(),
            drained: false,
            health: Health::Unknown,
            weight: 1,
        }
    }

    async fn start(transport: &ChannelTransport, i: usize, cluster: &str) -> Sim {
        let addr: SocketAddr = ([127, 0, 0, 1], 20_000 + i as u16).into();
        let config = Config {
            cluster: cluster.to_owned(),
            node: format!("n{i}"),
            gossip_addr: addr,
            seeds: vec![([127, 0, 0, 1], 20_000).into()],
            generation: 1,
            gossip_interval: Duration::from_millis(100),
            phi_threshold: DEFAULT_PHI_THRESHOLD,
        };
        let gossip = Gossip::start_with(config, Box::new(transport.clone()), Default::default())
            .await
            .unwrap();
        let mut local = Local {
            node: format!("n{i}"),
            ..Local::default()
        };
        local
            .backends
            .insert("web".into(), vec![task(i, 0), task(i, 1)]);
        if i == 0 {
            local.services.insert(
                "web".into(),
                ServiceRecord {
                    version: Version {
                        ms: 1,
                        node: "n0".into(),
                    },
                    def: Some(ServiceDef {
                        proto: Proto::Tcp,
                        port: 8080,
                        vip: None,
                        health_check: HealthCheck::default(),
                        scheduler: Default::default(),
                        origin: Default::default(),
                        defined_at: String::new(),
                    }),
                },
            );
        }
        Sim {
            gossip,
            vtep: Ipv4Addr::new(192, 168, 1, 1 + i as u8).into(),
            table: Table::default(),
            local,
        }
    }

    /// Runs rounds on every node (every 50 ms, as the daemon does at a 100 ms gossip interval)
    /// until `done` holds for every node; returns how long it took.
    async fn converge(sims: &mut [Sim], done: impl Fn(&Sim) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            for sim in sims.iter_mut() {
                sim.round().await;
            }
            let digest = sims[0].digest();
            if sims.iter().all(|s| done(s) && s.digest() == digest) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no convergence in 20 s: {:?}",
                sims.iter()
                    .map(|s| (s.table.nodes.len(), s.table.services.len()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Twelve nodes on chitchat's in-memory transport (every message serialised and decoded as
    /// on the wire), gossiping every 100 ms: they converge on one table, then again after a
    /// change made on one node. Prints the times (`-- --nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twelve_nodes_converge_after_a_change() {
        const NODES: usize = 12;
        let transport = ChannelTransport::with_mtu(65_507);
        let mut sims = Vec::new();
        for i in 0..NODES {
            sims.push(start(&transport, i, "sim").await);
        }
        let joined = converge(&mut sims, |s| {
            s.table.nodes.len() == NODES
                && s.table
                    .service("web")
                    .is_some_and(|w| w.backends.len() == 2 * NODES)
        })
        .await;
        // A change on one node: a new service with a task of its own.
        let changer = 7;
        let mut after = sims[changer].table.clone();
        after
            .add_service(
                "api",
                Proto::Tcp,
                9090,
                None,
                &["10.0.7.99:80".parse::<std::net::SocketAddr>().unwrap()],
            )
            .unwrap();
        let before = sims[changer].table.clone();
        let now = 2;
        sims[changer].table =
            cluster::record_edit(&mut sims[changer].local, &before, after, now).unwrap();
        let changed = converge(&mut sims, |s| s.table.service("api").is_some()).await;
        println!(
            "{NODES} nodes (in-memory transport, gossip every 100 ms): joined and agreed in \
             {joined:?}; a change on one node reached every node in {changed:?}"
        );
        assert!(changed < Duration::from_secs(5), "{changed:?}");
        let api = sims[3].table.service("api").unwrap();
        assert_eq!(api.backends[0].node.as_deref(), Some("n7"));
        for sim in sims {
            sim.gossip.shutdown().await.unwrap();
        }
    }

    /// Nodes of an IPv6 underlay gossip their IPv6 VTEPs: every node's table holds them, with
    /// each node's (IPv4) tasks on it; a node with an IPv4 VTEP among them is refused, and its
    /// tasks with it, on every node alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ipv6_vteps_are_gossiped_and_a_node_of_the_other_family_is_left_out() {
        let transport = ChannelTransport::with_mtu(65_507);
        let mut sims = Vec::new();
        for i in 0..4 {
            let mut sim = start(&transport, i, "v6").await;
            sim.vtep = if i == 3 {
                "192.168.1.4".parse().unwrap()
            } else {
                format!("2001:db8::{}", i + 1).parse().unwrap()
            };
            sims.push(sim);
        }
        // n3 agrees too: its table is the mesh's, of which it is no node.
        converge(&mut sims, |s| {
            s.table.nodes.len() == 3
                && s.table
                    .service("web")
                    .is_some_and(|w| w.backends.len() == 6)
        })
        .await;
        for sim in &sims {
            let mut nodes: Vec<String> = sim
                .table
                .nodes
                .iter()
                .map(|n| format!("{} {}", n.name, n.ip))
                .collect();
            nodes.sort();
            assert_eq!(
                nodes,
                ["n0 2001:db8::1", "n1 2001:db8::2", "n2 2001:db8::3"]
            );
            let web = sim.table.service("web").unwrap();
            assert!(
                web.backends
                    .iter()
                    .any(|b| b.to_string() == "10.0.1.10:80@n1"),
                "{:?}",
                web.backends
            );
            assert!(web.backends.iter().all(|b| b.node.as_deref() != Some("n3")));
            sim.table.validate().unwrap();
        }
        let step = cluster::step(
            &sims[3].table,
            &sims[3].local,
            sims[3].vtep,
            &sims[3]
                .gossip
                .members()
                .await
                .into_iter()
                .map(|m| m.view)
                .collect::<Vec<_>>(),
        );
        assert!(
            step.warnings
                .iter()
                .any(|w| w.contains("'n3'") && w.contains("other family")),
            "{:?}",
            step.warnings
        );
        for sim in sims {
            sim.gossip.shutdown().await.unwrap();
        }
    }

    /// A node of another cluster is refused and counted on both sides, and changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_of_another_cluster_changes_nothing_and_is_counted() {
        let transport = ChannelTransport::with_mtu(65_507);
        let mut ours = start(&transport, 0, "ours").await;
        let mut foreign = start(&transport, 1, "theirs").await;
        for _ in 0..10 {
            ours.round().await;
            foreign.round().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ours.table.nodes.len(), 1, "{:?}", ours.table.nodes);
        assert_eq!(ours.table.service("web").unwrap().backends.len(), 2);
        assert!(foreign.table.service("web").is_none());
        let count = |sim: &Sim, reason: &str| {
            sim.gossip
                .rejections()
                .counts()
                .into_iter()
                .find(|(r, _)| *r == reason)
                .unwrap()
                .1
        };
        assert!(count(&ours, "wrong_cluster") > 0);
        assert!(count(&foreign, "rejected_by_peer") > 0);
        ours.gossip.shutdown().await.unwrap();
        foreign.gossip.shutdown().await.unwrap();
    }
}
