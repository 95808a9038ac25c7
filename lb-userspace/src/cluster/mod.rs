//! The gossiped cluster (`lbctl daemon --cluster`): what each node publishes and how the
//! records merge into one table (this file), and the gossip transport (`gossip`). Used by
//! `commands`, `instance::state` and the daemon; uses `table`.
//!
//! The gossiped service table: what each node publishes, how every node merges what the live
//! members publish into one table, and how that table is applied over the one in force with
//! stable ids. Pure logic, no I/O; `gossip` carries the records between nodes (chitchat) and
//! the daemon applies the result.
//!
//! Each node publishes:
//! - its underlay address (VTEP);
//! - a *service record* for every service it knows of: the definition (protocol, port, VIP,
//!   health check) or a removal mark, with a version `(milliseconds, node)`. Records are
//!   last-writer-wins registers: the highest version among the live members wins, ties broken by
//!   node name. Every node adopts the winning records and publishes them as its own, so a service
//!   outlives the node that defined it, and a removal outlives the node that removed it;
//! - its own tasks: the backends it hosts, per service, with their drain and health state.
//!   Only the hosting node publishes a backend, so only that node changes it, and its backends
//!   leave every table when it leaves the cluster (fails, stops or becomes unreachable).
pub mod gossip;
pub mod seal;
pub mod transport;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use lb_common::MAX_BACKENDS_PER_SERVICE;
use serde::{Deserialize, Serialize};

use crate::table::{
    BackendSpec, Health, HealthCheck, Node, Origin, Proto, Scheduler, ServiceSpec, Table,
    default_weight, fnv1a, is_default_weight,
};

/// When a service record was written, and by which node: records are ordered by time, then by
/// node name, so two nodes that change the same service resolve it the same way everywhere.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Milliseconds since the Unix epoch, or one more than the newest version the writer had
    /// seen when its clock is behind (a Lamport clock on top of the wall clock).
    pub ms: u64,
    pub node: String,
}

/// What defines a service, apart from its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    pub proto: Proto,
    pub port: u16,
    pub vip: Option<IpAddr>,
    pub health_check: HealthCheck,
    /// Left out when round-robin, so records of services that do not use it read the same as
    /// before there was a choice.
    #[serde(default, skip_serializing_if = "Scheduler::is_default")]
    pub scheduler: Scheduler,
    /// Left out for the operator's, so records read the same as before Docker services.
    #[serde(default, skip_serializing_if = "Origin::is_operator")]
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub defined_at: String,
}

/// A service as gossiped: its definition, or `None` once removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub version: Version,
    pub def: Option<ServiceDef>,
}

/// A task of the publishing node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRecord {
    pub addr: SocketAddr,
    #[serde(default)]
    pub drained: bool,
    #[serde(default)]
    pub health: Health,
    #[serde(default = "default_weight", skip_serializing_if = "is_default_weight")]
    pub weight: u32,
}

/// What this node publishes, kept in its state (`State::cluster`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Local {
    /// This node's name in the cluster.
    pub node: String,
    /// Service records by name: those this node wrote and those it adopted.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceRecord>,
    /// This node's tasks, by service name, in round-robin order.
    #[serde(default)]
    pub backends: BTreeMap<String, Vec<BackendRecord>>,
    /// A daemon ran this instance with `--insecure`: the records it adopted were learned in
    /// clear, from anyone who could reach the gossip port. A daemon started with a key file
    /// drops them (`forget_clear_records`) rather than publish them to the sealed cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learned_in_clear: bool,
}

impl Local {
    /// Drops the service records other nodes wrote (this node's own stay): what a sealed
    /// daemon does with records learned in clear. Returns the names of those dropped; the
    /// sealed cluster's members give this node their records again.
    pub fn forget_clear_records(&mut self) -> Vec<String> {
        let node = self.node.clone();
        let dropped: Vec<String> = self
            .services
            .iter()
            .filter(|(_, record)| record.version.node != node)
            .map(|(name, _)| name.clone())
            .collect();
        self.services
            .retain(|_, record| record.version.node == node);
        self.learned_in_clear = false;
        dropped
    }

    /// The node's own definitions taken from a table in force before it joined a cluster: its
    /// services, and its backends on no node or on itself (another node's are that node's to
    /// publish).
    pub fn from_table(node: &str, table: &Table, now_ms: u64) -> Local {
        let mut local = Local {
            node: node.to_owned(),
            ..Local::default()
        };
        for service in &table.services {
            local.services.insert(
                service.name.clone(),
                ServiceRecord {
                    version: Version {
                        ms: now_ms,
                        node: node.to_owned(),
                    },
                    def: Some(def_of(service)),
                },
            );
            let own = own_backends(node, service);
            if !own.is_empty() {
                local.backends.insert(service.name.clone(), own);
            }
        }
        local
    }

    /// The version a change made now gets: now, or just after the newest record known.
    fn next_version(&self, now_ms: u64) -> Version {
        let newest = self.services.values().map(|r| r.version.ms).max();
        Version {
            ms: newest.map_or(now_ms, |ms| now_ms.max(ms + 1)),
            node: self.node.clone(),
        }
    }
}

fn def_of(service: &crate::table::Service) -> ServiceDef {
    ServiceDef {
        proto: service.proto,
        port: service.port,
        vip: service.vip,
        health_check: service.health_check.clone(),
        scheduler: service.scheduler,
        origin: service.origin,
        defined_at: service.defined_at.clone(),
    }
}

/// The backends of `service` that `node` publishes: on it, or on no node.
fn own_backends(node: &str, service: &crate::table::Service) -> Vec<BackendRecord> {
    service
        .backends
        .iter()
        .filter(|b| b.node.as_deref().is_none_or(|n| n == node))
        .map(|b| BackendRecord {
            addr: b.addr,
            drained: b.drained,
            health: b.health,
            weight: b.weight,
        })
        .collect()
}

/// A member of the cluster as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub name: String,
    /// Distinguishes the runs of one node: a restarted node is a new generation, and only the
    /// newest live generation of a name counts.
    pub generation: u64,
    /// Whether the failure detector holds it alive (this node always is).
    pub alive: bool,
    pub vtep: Option<IpAddr>,
    pub services: BTreeMap<String, ServiceRecord>,
    pub backends: BTreeMap<String, Vec<BackendRecord>>,
    /// The digest of the table it applied, as it published it.
    pub digest: Option<String>,
}

/// A service of the merged table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedService {
    pub name: String,
    pub def: ServiceDef,
    /// `(task, node hosting it)`, by node name then in each node's order.
    pub backends: Vec<(BackendRecord, String)>,
}

/// The table every live member's records imply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Live members with an underlay address, by name.
    pub nodes: Vec<Node>,
    /// Live services, by name.
    pub services: Vec<MergedService>,
    /// The winning record of every service name, removals included: what each node adopts.
    pub winners: BTreeMap<String, ServiceRecord>,
    /// What was left out and why (conflicts, limits), for the log.
    pub warnings: Vec<String>,
}

/// The live members, one per name: the newest live generation.
pub fn live_members(members: &[MemberView]) -> BTreeMap<&str, &MemberView> {
    let mut live: BTreeMap<&str, &MemberView> = BTreeMap::new();
    for member in members.iter().filter(|m| m.alive) {
        let newer = live
            .get(member.name.as_str())
            .is_none_or(|seen| seen.generation < member.generation);
        if newer {
            live.insert(&member.name, member);
        }
    }
    live
}

/// Merges what the live members publish (dead members count for nothing):
/// - nodes: every live member with an underlay address (the first by name keeps an address
///   two members claim, or an IPv6 node key). One family per mesh: the family most members
///   publish (on a tie, the first member's by name); a member of the other family is left
///   out, with its tasks, alike on every node;
/// - services: for each name, the record with the highest version wins; a removal wins like a
///   definition. Two live services on the same protocol, port and VIP: the older keeps it;
/// - backends: each live node's tasks of each live service, as `IP:PORT@node`; an address
///   two nodes publish for one service stays with the first node by name.
pub fn merge(members: &[MemberView]) -> Merged {
    let live = live_members(members);
    let mut merged = Merged::default();
    let mut ips = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let vteps: Vec<IpAddr> = live.values().filter_map(|m| m.vtep).collect();
    let ipv6 = vteps.iter().filter(|ip| ip.is_ipv6()).count();
    let ipv6_underlay = match ipv6.cmp(&(vteps.len() - ipv6)) {
        std::cmp::Ordering::Equal => vteps.first().is_some_and(IpAddr::is_ipv6),
        more_or_less => more_or_less.is_gt(),
    };
    for (name, member) in &live {
        match member.vtep {
            Some(ip) if ip.is_ipv6() != ipv6_underlay => merged.warnings.push(format!(
                "node '{name}' publishes underlay IP {ip}, of the other family than the mesh's \
                 {} underlay: left out",
                if ipv6_underlay { "IPv6" } else { "IPv4" }
            )),
            Some(ip) if !ips.insert(ip) => merged.warnings.push(format!(
                "node '{name}' publishes underlay IP {ip}, which another node has: left out"
            )),
            Some(ip) if !keys.insert(crate::table::node_key(ip)) => merged.warnings.push(format!(
                "node '{name}' publishes underlay IP {ip}, whose node key another node has: \
                 left out"
            )),
            Some(ip) => merged.nodes.push(Node {
                name: (*name).to_owned(),
                ip,
            }),
            None => merged
                .warnings
                .push(format!("node '{name}' publishes no underlay IP: left out")),
        }
    }
    let node_names: BTreeSet<&str> = merged.nodes.iter().map(|n| n.name.as_str()).collect();

    for member in live.values() {
        for (name, record) in &member.services {
            let newer = merged
                .winners
                .get(name)
                .is_none_or(|won| won.version < record.version);
            if newer {
                merged.winners.insert(name.clone(), record.clone());
            }
        }
    }
    // Oldest first: a frontend stays with the service that had it.
    let mut defined: Vec<(&String, &ServiceRecord, &ServiceDef)> = merged
        .winners
        .iter()
        .filter_map(|(name, r)| r.def.as_ref().map(|def| (name, r, def)))
        .collect();
    defined.sort_by(|a, b| (&a.1.version, a.0).cmp(&(&b.1.version, b.0)));
    let mut frontends = BTreeMap::new();
    let mut services = Vec::new();
    for (name, _, def) in defined {
        if let Some(other) = frontends.insert((def.proto, def.port, def.vip), name) {
            merged.warnings.push(format!(
                "service '{name}' publishes {}/{} which service '{other}' has: left out",
                def.proto, def.port
            ));
            frontends.insert((def.proto, def.port, def.vip), other);
            continue;
        }
        let mut backends: Vec<(BackendRecord, String)> = Vec::new();
        for (node, member) in &live {
            if !node_names.contains(node) {
                continue;
            }
            for record in member.backends.get(name).into_iter().flatten() {
                if let Some((_, first)) = backends.iter().find(|(b, _)| b.addr == record.addr) {
                    merged.warnings.push(format!(
                        "backend {} of '{name}' is published by '{first}' and '{node}': kept on \
                         '{first}'",
                        record.addr
                    ));
                } else if backends.len() >= MAX_BACKENDS_PER_SERVICE {
                    merged.warnings.push(format!(
                        "service '{name}' has more than {MAX_BACKENDS_PER_SERVICE} backends: \
                         {}@{node} left out",
                        record.addr
                    ));
                } else {
                    backends.push((record.clone(), (*node).to_owned()));
                }
            }
        }
        services.push(MergedService {
            name: name.clone(),
            def: def.clone(),
            backends,
        });
    }
    services.sort_by(|a, b| a.name.cmp(&b.name));
    merged.services = services;
    merged
}

/// Turns the table in force into the merged one with as few changes as possible: services,
/// backends and nodes that stay keep their ids (so flows stay on their backend); what left is
/// removed, what is new is added with fresh ids, through the `Table` methods. Returns the new
/// table and what could not be applied (the table's limits).
pub fn apply(current: &Table, merged: &Merged) -> (Table, Vec<String>) {
    let mut table = current.clone();
    let mut warnings = Vec::new();
    let wanted: BTreeMap<&str, &MergedService> = merged
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let stable_nodes: BTreeSet<&str> = current
        .nodes
        .iter()
        .filter(|n| merged.nodes.contains(n))
        .map(|n| n.name.as_str())
        .collect();

    remove_departed(&mut table, current, &wanted, &stable_nodes);
    sync_nodes(&mut table, merged, &stable_nodes, &mut warnings);
    for want in &merged.services {
        if let Err(err) = add_or_update(&mut table, want) {
            warnings.push(format!("service '{}': {err}", want.name));
        }
    }
    (table, warnings)
}

/// Removes from `table` (a copy of `current`) the services that left or whose frontend changed
/// (they come back as new services), and the backends that left or whose node left or moved.
fn remove_departed(
    table: &mut Table,
    current: &Table,
    wanted: &BTreeMap<&str, &MergedService>,
    stable_nodes: &BTreeSet<&str>,
) {
    let gone: Vec<String> = table
        .services
        .iter()
        .filter(|s| {
            wanted
                .get(s.name.as_str())
                .is_none_or(|w| (w.def.proto, w.def.port, w.def.vip) != (s.proto, s.port, s.vip))
        })
        .map(|s| s.name.clone())
        .collect();
    for name in &gone {
        table.remove_service(name).expect("listed above");
    }
    // Backends that left, or whose node left or moved.
    for service in current.services.iter().filter(|s| !gone.contains(&s.name)) {
        let keep = &wanted[service.name.as_str()].backends;
        let leaving: Vec<BackendSpec> = service
            .backends
            .iter()
            .filter(|b| {
                let node_stays = b.node.as_deref().is_some_and(|n| stable_nodes.contains(n));
                !node_stays
                    || !keep
                        .iter()
                        .any(|(r, n)| r.addr == b.addr && Some(n) == b.node.as_ref())
            })
            .map(crate::table::Backend::spec)
            .collect();
        if !leaving.is_empty() {
            table
                .remove_backends(&service.name, &leaving)
                .expect("backends listed from the table");
        }
    }
}

/// Brings `table`'s nodes in line with the merged ones: the nodes that are not stable leave
/// (unless they still host backends: a warning), the merged ones are added.
fn sync_nodes(
    table: &mut Table,
    merged: &Merged,
    stable_nodes: &BTreeSet<&str>,
    warnings: &mut Vec<String>,
) {
    let leaving_nodes: Vec<String> = table
        .nodes
        .iter()
        .filter(|n| !stable_nodes.contains(n.name.as_str()))
        .map(|n| n.name.clone())
        .collect();
    for name in leaving_nodes {
        if let Err(err) = table.remove_node(&name) {
            warnings.push(err);
        }
    }
    for node in &merged.nodes {
        if let Err(err) = table.add_node(&node.name, node.ip) {
            warnings.push(err);
        }
    }
}

/// Adds the merged service `want` to `table`, or its new backends to the service already
/// there, then gives the service and its backends the merged settings (health check,
/// scheduler, drain, weight: a change bumps the table's generation; health does not).
fn add_or_update(table: &mut Table, want: &MergedService) -> Result<(), String> {
    let exists = table.service(&want.name).is_some();
    let present: Vec<SocketAddr> = table
        .service(&want.name)
        .map(|s| s.backends.iter().map(|b| b.addr).collect())
        .unwrap_or_default();
    let new: Vec<BackendSpec> = want
        .backends
        .iter()
        .filter(|(r, _)| !present.contains(&r.addr))
        .map(|(r, node)| BackendSpec {
            addr: r.addr,
            node: Some(node.clone()),
            weight: r.weight,
        })
        .collect();
    let result = if exists {
        if new.is_empty() {
            Ok(())
        } else {
            table.add_backends(&want.name, &new)
        }
    } else {
        table.add_service(
            &want.name,
            want.def.proto,
            want.def.port,
            want.def.vip,
            &new,
        )
    };
    result?;
    let generation = table.generation;
    let service = table
        .services
        .iter_mut()
        .find(|s| s.name == want.name)
        .expect("present or just added");
    let mut changed = false;
    if service.health_check != want.def.health_check {
        service.health_check = want.def.health_check.clone();
        changed = true;
    }
    if service.scheduler != want.def.scheduler {
        service.scheduler = want.def.scheduler;
        changed = true;
    }
    if (service.origin, &service.defined_at) != (want.def.origin, &want.def.defined_at) {
        service.origin = want.def.origin;
        service.defined_at = want.def.defined_at.clone();
        changed = true;
    }
    for backend in &mut service.backends {
        if let Some((record, _)) = want.backends.iter().find(|(r, _)| r.addr == backend.addr) {
            changed |= backend.drained != record.drained || backend.weight != record.weight;
            backend.drained = record.drained;
            backend.weight = record.weight;
            // Health is runtime state: it does not count as a change of the table.
            backend.health = record.health;
        }
    }
    table.generation = generation + u64::from(changed);
    Ok(())
}

/// Records in `local` what a command changed from `before` (the table in force) to `after`:
/// services it added, changed or removed get a new record; its own tasks (backends on this node,
/// or given without a node, which in a cluster means this node) replace the published ones.
/// Another node's backends cannot be changed here. Returns `after` with this node's backends
/// marked as on this node, as the merge will list them (so their ids stay).
pub fn record_edit(
    local: &mut Local,
    before: &Table,
    mut after: Table,
    now_ms: u64,
) -> Result<Table, String> {
    let node = local.node.clone();
    let others = |table: &Table, service: &str| -> BTreeSet<(SocketAddr, String, bool)> {
        table
            .service(service)
            .into_iter()
            .flat_map(|s| &s.backends)
            .filter_map(|b| match &b.node {
                Some(n) if *n != node => Some((b.addr, n.clone(), b.drained)),
                _ => None,
            })
            .collect()
    };
    let names: BTreeSet<String> = before
        .services
        .iter()
        .chain(&after.services)
        .map(|s| s.name.clone())
        .collect();
    // A service given a new frontend is a new service, its backends' state reset; but the drain
    // and health of another node's tasks are that node's to publish (the next merge would bring
    // them back), and until then the data plane must not send new flows to a drained task.
    for service in &mut after.services {
        let Some(was) = before.service(&service.name) else {
            continue;
        };
        if was.frontend_key() == service.frontend_key() {
            continue;
        }
        for backend in service
            .backends
            .iter_mut()
            .filter(|b| b.node.as_deref() != Some(node.as_str()))
        {
            if let Some(old) = was
                .backends
                .iter()
                .find(|old| old.addr == backend.addr && old.node == backend.node)
            {
                backend.drained = old.drained;
                backend.health = old.health;
            }
        }
    }
    // A removed service takes every backend with it, whoever hosts them.
    for name in names.iter().filter(|n| after.service(n).is_some()) {
        let (was, is) = (others(before, name), others(&after, name));
        if let Some((addr, owner, _)) = was.symmetric_difference(&is).next() {
            return Err(format!(
                "backend {addr}@{owner} of service '{name}' is node '{owner}''s: change it with \
                 lbctl on that node (in a gossiped cluster each node changes only its own tasks)"
            ));
        }
    }
    let version = local.next_version(now_ms);
    for service in &mut after.services {
        for backend in &mut service.backends {
            backend.node.get_or_insert_with(|| node.clone());
        }
    }
    for name in &names {
        let name = name.as_str();
        let old = before.service(name).map(def_of);
        let new = after.service(name).map(def_of);
        if old != new {
            local.services.insert(
                name.to_owned(),
                ServiceRecord {
                    version: version.clone(),
                    def: new,
                },
            );
        }
        match after.service(name).map(|s| own_backends(&node, s)) {
            Some(own) if !own.is_empty() => {
                local.backends.insert(name.to_owned(), own);
            }
            _ => {
                local.backends.remove(name);
            }
        }
    }
    Ok(after)
}

/// A declared table (`lbctl apply`) as this node may declare it in a cluster, where each node
/// changes only its own tasks: a backend without `@NODE` is this node's, and the tasks other
/// nodes publish for a declared service stay, after the declared backends.
pub fn own_declaration(
    local: &Local,
    table: &Table,
    mut services: Vec<ServiceSpec>,
) -> Vec<ServiceSpec> {
    let current: BTreeMap<&str, &crate::table::Service> = table
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    for spec in &mut services {
        for backend in &mut spec.backends {
            backend.node.get_or_insert_with(|| local.node.clone());
        }
        let Some(service) = current.get(spec.name.as_str()) else {
            continue;
        };
        let declared: BTreeSet<SocketAddr> = spec.backends.iter().map(|b| b.addr).collect();
        let others = service.backends.iter().filter(|b| {
            b.node.as_ref().is_some_and(|n| *n != local.node) && !declared.contains(&b.addr)
        });
        spec.backends
            .extend(others.map(crate::table::Backend::spec));
    }
    services
}

/// Adopts the winning records into `local` and forgets its tasks of removed services. Returns
/// whether `local` changed.
pub fn adopt(local: &mut Local, merged: &Merged) -> bool {
    let mut changed = false;
    for (name, record) in &merged.winners {
        if local.services.get(name) != Some(record) {
            local.services.insert(name.clone(), record.clone());
            changed = true;
        }
        if record.def.is_none() && local.backends.remove(name).is_some() {
            changed = true;
        }
    }
    changed
}

/// What `lbctl daemon --cluster` knows of the cluster, for `lbctl cluster ls` (its
/// `cluster.json`) and the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub cluster: String,
    pub node: String,
    pub gossip_addr: String,
    pub vtep: IpAddr,
    /// This run of the node (milliseconds at the daemon's start).
    pub generation: u64,
    /// The digest of the table this node applied.
    pub digest: String,
    pub table_generation: u64,
    /// Merged tables applied since the daemon started.
    pub table_changes: u64,
    /// Every live member published this node's digest, and no member is cut off (see
    /// [`MemberStatus::cut_off`]).
    pub converged: bool,
    /// One per node name (its newest live run, else its newest run), by name.
    pub members: Vec<MemberStatus>,
    /// Gossip messages rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// The ids of the keyring in force, the sealing one first; `None`: gossip in clear
    /// (`--insecure`).
    #[serde(default)]
    pub keys: Option<Vec<String>>,
    /// Seeds and nodes of the table that are not listed as members (this node never opened
    /// what they send) but whose gossip with this node is broken: a node restarted without
    /// the cluster's current key knows no member, yet it is not alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cut_off_peers: Vec<PeerCutOff>,
    /// Why the key file on disk is refused (its keys in force were read earlier; a restart
    /// would fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file_refused: Option<String>,
}

/// A peer that is not a listed member, cut off (see [`MemberStatus::cut_off`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCutOff {
    pub gossip_addr: String,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub generation: u64,
    pub gossip_addr: String,
    pub vtep: Option<IpAddr>,
    pub alive: bool,
    /// The digest of the table it applied, as it published it.
    pub digest: Option<String>,
    /// It is alive, its digest is this node's, and it is not cut off.
    pub agrees: bool,
    /// It is this node.
    #[serde(rename = "self")]
    pub this: bool,
    /// The id of the key it seals its gossip with (as its last datagram said; this node's
    /// own: its first key); `None` in clear, or not heard from directly yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Why gossip between it and this node is broken though datagrams still arrive (keys that
    /// do not match one way or the other): then it does not agree, whatever digest it last
    /// published, since it cannot learn this node's table (or this node its).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_off: Option<String>,
}

impl Status {
    pub fn alive(&self) -> usize {
        self.members.iter().filter(|m| m.alive).count()
    }

    pub fn agreeing(&self) -> usize {
        self.members.iter().filter(|m| m.agrees).count()
    }

    /// Members and other peers cut off.
    pub fn cut_off(&self) -> usize {
        self.members.iter().filter(|m| m.cut_off.is_some()).count() + self.cut_off_peers.len()
    }

    /// Whether `members` converged: every live member agrees, and none (live or dead) is cut
    /// off: a member that sends what this node cannot open looks dead here, but it is there,
    /// serving a table of its own. Nor while `warming_up` (just started) with a member not
    /// heard from yet: it is dead only for want of news.
    pub fn converged_of(members: &[MemberStatus], warming_up: bool) -> bool {
        members
            .iter()
            .filter(|m| m.alive || m.cut_off.is_some())
            .all(|m| m.agrees)
            && !(warming_up && members.iter().any(|m| !m.alive))
    }
}

/// The members to list: per name, the newest live run, else the newest run.
pub fn member_statuses(
    members: &[(MemberView, String)],
    this: (&str, u64),
    digest: &str,
) -> Vec<MemberStatus> {
    let mut by_name: BTreeMap<&str, &(MemberView, String)> = BTreeMap::new();
    for entry in members {
        let m = &entry.0;
        let better = by_name
            .get(m.name.as_str())
            .is_none_or(|(seen, _)| (m.alive, m.generation) > (seen.alive, seen.generation));
        if better {
            by_name.insert(&m.name, entry);
        }
    }
    by_name
        .into_values()
        .map(|(m, addr)| MemberStatus {
            name: m.name.clone(),
            generation: m.generation,
            gossip_addr: addr.clone(),
            vtep: m.vtep,
            alive: m.alive,
            digest: m.digest.clone(),
            agrees: m.alive && m.digest.as_deref() == Some(digest),
            this: (m.name.as_str(), m.generation) == this,
            key: None,
            cut_off: None,
        })
        .collect()
}

/// The nodes of `table` (other than `this`) not yet seen alive among `others`. A daemon that
/// just started waits for them (up to the failure detector's window) before its first merge,
/// so that a restart does not drop the tasks of members it has not heard from yet.
pub fn not_yet_alive<'a>(table: &'a Table, this: &str, others: &[MemberView]) -> Vec<&'a str> {
    let live = live_members(others);
    table
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .filter(|name| *name != this && !live.contains_key(name))
        .collect()
}

/// One round of a node in a cluster: merges its own records (`local`, at `vtep`) with the
/// other members', applies the result over `table` and adopts the winning records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub table: Table,
    pub local: Local,
    /// `table_digest` of `table`.
    pub digest: String,
    /// What the merge left out and the table refused.
    pub warnings: Vec<String>,
}

/// See [`Step`]. Members named like this node (its earlier runs, or an impostor) are ignored:
/// this node speaks for itself.
pub fn step(table: &Table, local: &Local, vtep: IpAddr, others: &[MemberView]) -> Step {
    let mut members: Vec<MemberView> = others
        .iter()
        .filter(|m| m.name != local.node)
        .cloned()
        .collect();
    members.push(MemberView {
        name: local.node.clone(),
        generation: 0,
        alive: true,
        vtep: Some(vtep),
        services: local.services.clone(),
        backends: local.backends.clone(),
        digest: None,
    });
    let merged = merge(&members);
    let (table, mut warnings) = apply(table, &merged);
    let mut local = local.clone();
    adopt(&mut local, &merged);
    warnings.extend(merged.warnings);
    Step {
        digest: table_digest(&table),
        table,
        local,
        warnings,
    }
}

/// A digest of a table's content as every node sees it (nodes, services, their settings and
/// backends with node, drain and health), leaving out what each node numbers for itself (ids,
/// generation): nodes whose tables agree have the same digest. FNV-1a (64 bits) of a canonical
/// text, as 16 hexadecimal digits: the same on every build and platform.
pub fn table_digest(table: &Table) -> String {
    let mut text = String::new();
    let mut nodes: Vec<&Node> = table.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for node in nodes {
        let _ = writeln!(text, "node {} {}", node.name, node.ip);
    }
    let mut services: Vec<&crate::table::Service> = table.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    for service in services {
        let check = serde_json::to_string(&service.health_check).unwrap_or_default();
        // What is left at its default is left out, so tables that do not use schedulers or
        // weights keep the digests they had before there were any.
        let scheduler = if service.scheduler.is_default() {
            String::new()
        } else {
            format!(" {}", service.scheduler)
        };
        let _ = writeln!(
            text,
            "service {} {} {} {:?} {check}{scheduler}",
            service.name, service.proto, service.port, service.vip
        );
        let mut backends: Vec<&crate::table::Backend> = service.backends.iter().collect();
        backends.sort_by_key(|b| b.addr);
        for b in backends {
            let weight = if is_default_weight(&b.weight) {
                String::new()
            } else {
                format!(" *{}", b.weight)
            };
            let _ = writeln!(
                text,
                "backend {} {:?} {} {}{weight}",
                b.addr,
                b.node,
                b.drained,
                b.health.as_str()
            );
        }
    }
    format!("{:016x}", fnv1a(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::parse_backend;
    use std::net::Ipv4Addr;

    fn addr(s: &str) -> SocketAddr {
        parse_backend(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn version(ms: u64, node: &str) -> Version {
        Version {
            ms,
            node: node.into(),
        }
    }

    fn web(port: u16) -> ServiceDef {
        ServiceDef {
            proto: Proto::Tcp,
            port,
            vip: None,
            health_check: HealthCheck::default(),
            scheduler: Scheduler::default(),
            origin: Origin::default(),
            defined_at: String::new(),
        }
    }

    fn task(s: &str) -> BackendRecord {
        BackendRecord {
            addr: addr(s),
            drained: false,
            health: Health::Unknown,
            weight: 1,
        }
    }

    /// A live member `n<i>` at 192.168.1.<i>.
    fn member(i: u8) -> MemberView {
        MemberView {
            name: format!("n{i}"),
            generation: 1,
            alive: true,
            vtep: Some(Ipv4Addr::new(192, 168, 1, i).into()),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            digest: None,
        }
    }

    fn with_service(
        mut m: MemberView,
        name: &str,
        v: Version,
        def: Option<ServiceDef>,
    ) -> MemberView {
        m.services
            .insert(name.into(), ServiceRecord { version: v, def });
        m
    }

    fn with_tasks(mut m: MemberView, service: &str, tasks: &[&str]) -> MemberView {
        m.backends
            .insert(service.into(), tasks.iter().map(|t| task(t)).collect());
        m
    }

    /// n1 defines web (tcp/8080) with two tasks, n2 has two tasks of web, n3 none.
    fn three() -> Vec<MemberView> {
        vec![
            with_tasks(
                with_service(member(1), "web", version(10, "n1"), Some(web(8080))),
                "web",
                &["10.0.0.10:80", "10.0.0.11:80"],
            ),
            with_tasks(member(2), "web", &["10.0.0.12:80", "10.0.0.13:80"]),
            member(3),
        ]
    }

    /// `(IP:PORT@NODE[*WEIGHT], id)` of a service's backends, in order.
    fn backends_of(table: &Table, service: &str) -> Vec<(String, u32)> {
        table
            .service(service)
            .map(|s| {
                s.backends
                    .iter()
                    .map(|b| (b.spec().to_string(), b.id))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_merge_takes_every_live_nodes_tasks_and_vtep() {
        let merged = merge(&three());
        assert!(merged.warnings.is_empty(), "{:?}", merged.warnings);
        let names: Vec<&str> = merged.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n1", "n2", "n3"]);
        let (table, warnings) = apply(&Table::default(), &merged);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            backends_of(&table, "web"),
            [
                ("10.0.0.10:80@n1".into(), 0),
                ("10.0.0.11:80@n1".into(), 1),
                ("10.0.0.12:80@n2".into(), 2),
                ("10.0.0.13:80@n2".into(), 3)
            ]
        );
        assert_eq!(table.node("n3").unwrap().ip, ip("192.168.1.3"));
    }

    /// IPv6 tasks are gossiped as IPv4 ones are: each lands on its node, both families in one
    /// service (the data plane reaches the other node's over the IPv4 underlay).
    #[test]
    fn ipv6_tasks_are_merged_onto_their_nodes() {
        let members = vec![
            with_tasks(
                with_service(member(1), "web", version(10, "n1"), Some(web(8080))),
                "web",
                &["10.0.0.10:80", "[fd00::10]:80"],
            ),
            with_tasks(member(2), "web", &["[fd00::12]:80"]),
        ];
        let (table, warnings) = apply(&Table::default(), &merge(&members));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            backends_of(&table, "web"),
            [
                ("10.0.0.10:80@n1".into(), 0),
                ("[fd00::10]:80@n1".into(), 1),
                ("[fd00::12]:80@n2".into(), 2)
            ]
        );
        table.validate().unwrap();
    }

    /// Members of an IPv6 underlay: their tasks (IPv4 here) land on IPv6 nodes; a member of
    /// the other family is left out with its tasks; the majority's family wins.
    #[test]
    fn ipv6_nodes_take_their_tasks_and_the_other_family_is_left_out() {
        let v6 = |i: u8, vtep: &str| MemberView {
            vtep: Some(vtep.parse().unwrap()),
            ..member(i)
        };
        let members = vec![
            with_tasks(
                with_service(
                    v6(1, "2001:db8::1"),
                    "web",
                    version(10, "n1"),
                    Some(web(8080)),
                ),
                "web",
                &["10.0.0.10:80"],
            ),
            with_tasks(v6(2, "2001:db8::2"), "web", &["10.0.0.12:80"]),
            // An IPv4 member first by name would not make the mesh IPv4: the majority does.
            with_tasks(member(0), "web", &["10.0.0.13:80"]),
        ];
        let merged = merge(&members);
        assert_eq!(merged.warnings.len(), 1, "{:?}", merged.warnings);
        assert!(merged.warnings[0].contains("'n0'"), "{:?}", merged.warnings);
        let (table, warnings) = apply(&Table::default(), &merged);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(table.node("n2").unwrap().ip, ip("2001:db8::2"));
        assert!(table.node("n0").is_none());
        assert_eq!(
            backends_of(&table, "web"),
            [("10.0.0.10:80@n1".into(), 0), ("10.0.0.12:80@n2".into(), 1)]
        );
        table.validate().unwrap();
    }

    #[test]
    fn a_dead_member_counts_for_nothing_and_comes_back_with_new_ids() {
        let mut members = three();
        let (table, _) = apply(&Table::default(), &merge(&members));
        members[1].alive = false;
        let (without, warnings) = apply(&table, &merge(&members));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            backends_of(&without, "web"),
            [("10.0.0.10:80@n1".into(), 0), ("10.0.0.11:80@n1".into(), 1)],
            "n2's tasks leave; n1's keep their ids"
        );
        assert!(without.node("n2").is_none());
        // Back as a new generation (a restarted daemon): the dead generation is ignored.
        let mut back = members[1].clone();
        back.alive = true;
        back.generation = 2;
        members.push(back);
        let (again, _) = apply(&without, &merge(&members));
        let ids: Vec<u32> = backends_of(&again, "web").iter().map(|b| b.1).collect();
        assert_eq!(
            ids,
            [0, 1, 4, 5],
            "fresh ids: flows of the old ones chose again"
        );
    }

    #[test]
    fn re_merging_the_same_records_changes_nothing() {
        let members = three();
        let (table, _) = apply(&Table::default(), &merge(&members));
        let (again, _) = apply(&table, &merge(&members));
        assert_eq!(again, table, "same ids, same generation");
        assert_eq!(table_digest(&again), table_digest(&table));
    }

    #[test]
    fn the_newest_record_wins_and_a_removal_is_a_record() {
        let mut members = three();
        let mut slow = web(8080);
        slow.health_check.interval_ms = 5_000;
        members[2] = with_service(members[2].clone(), "web", version(20, "n3"), Some(slow));
        let merged = merge(&members);
        assert_eq!(merged.services[0].def.health_check.interval_ms, 5_000);
        // Same time: the node name decides, the same way everywhere.
        members[1] = with_service(members[1].clone(), "web", version(20, "n2"), None);
        assert_eq!(merge(&members).services.len(), 1, "n3 > n2 at the same ms");
        members[1] = with_service(members[1].clone(), "web", version(21, "n2"), None);
        let merged = merge(&members);
        assert!(merged.services.is_empty());
        assert_eq!(merged.winners["web"].def, None);
        let mut local = Local {
            node: "n1".into(),
            ..Local::default()
        };
        local
            .backends
            .insert("web".into(), vec![task("10.0.0.10:80")]);
        assert!(adopt(&mut local, &merged));
        assert!(
            local.backends.is_empty(),
            "tasks of a removed service are forgotten"
        );
        assert!(
            !adopt(&mut local, &merged),
            "adopting twice changes nothing"
        );
    }

    #[test]
    fn two_services_on_one_frontend_the_older_keeps_it() {
        let members = vec![
            with_service(member(1), "web", version(10, "n1"), Some(web(8080))),
            with_service(member(2), "www", version(9, "n2"), Some(web(8080))),
        ];
        let merged = merge(&members);
        let names: Vec<&str> = merged.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["www"]);
        assert!(
            merged.warnings[0].contains("'web'"),
            "{:?}",
            merged.warnings
        );
    }

    #[test]
    fn an_address_two_nodes_publish_stays_with_the_first() {
        let mut members = three();
        members[2] = with_tasks(members[2].clone(), "web", &["10.0.0.12:80"]);
        let merged = merge(&members);
        let nodes: Vec<&str> = merged.services[0]
            .backends
            .iter()
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(nodes, ["n1", "n1", "n2", "n2"]);
        assert_eq!(merged.warnings.len(), 1);
    }

    #[test]
    fn drain_and_health_follow_the_publisher() {
        let mut members = three();
        let (table, _) = apply(&Table::default(), &merge(&members));
        let tasks = members[1].backends.get_mut("web").unwrap();
        tasks[0].drained = true;
        tasks[1].health = Health::Unhealthy;
        let (after, _) = apply(&table, &merge(&members));
        let web = after.service("web").unwrap();
        assert!(web.backends[2].drained);
        assert_eq!(web.backends[3].health, Health::Unhealthy);
        assert_eq!(after.generation, table.generation + 1, "drain is a change");
        assert_ne!(table_digest(&after), table_digest(&table));
    }

    #[test]
    fn the_scheduler_and_weights_follow_their_publishers_and_keep_ids() {
        let mut members = three();
        let (table, _) = apply(&Table::default(), &merge(&members));
        let plain_digest = table_digest(&table);
        // A digest of a table without schedulers or weights, as builds before them computed it.
        assert_eq!(plain_digest, "08387d6b7c365b69");
        let mut maglev = web(8080);
        maglev.scheduler = Scheduler::Maglev;
        members[0] = with_service(members[0].clone(), "web", version(20, "n1"), Some(maglev));
        members[1].backends.get_mut("web").unwrap()[0].weight = 3;
        let (after, _) = apply(&table, &merge(&members));
        assert_eq!(after.service("web").unwrap().scheduler, Scheduler::Maglev);
        assert_eq!(
            backends_of(&after, "web"),
            [
                ("10.0.0.10:80@n1".into(), 0),
                ("10.0.0.11:80@n1".into(), 1),
                ("10.0.0.12:80@n2*3".into(), 2),
                ("10.0.0.13:80@n2".into(), 3),
            ]
        );
        assert_eq!(after.generation, table.generation + 1);
        assert_ne!(table_digest(&after), plain_digest);
        // Records of an older build, without the fields, read as round-robin and weight 1.
        let old: BackendRecord =
            serde_json::from_str(r#"{"addr": "10.0.0.12:80", "drained": false}"#).unwrap();
        assert_eq!(old.weight, 1);
        let old: ServiceDef = serde_json::from_str(
            r#"{"proto": "tcp", "port": 8080, "vip": null, "health_check": {"enabled": true,
                "http_path": null, "expect_status": 200, "interval_ms": 2000,
                "timeout_ms": 1000, "rise": 2, "fall": 3}}"#,
        )
        .unwrap();
        assert_eq!(old, web(8080));
        assert_eq!(serde_json::to_value(&old).unwrap().get("scheduler"), None);
    }

    #[test]
    fn a_moved_frontend_is_a_new_service_and_a_moved_node_keeps_nothing() {
        let mut members = three();
        let (table, _) = apply(&Table::default(), &merge(&members));
        members[0] = with_service(
            members[0].clone(),
            "web",
            version(11, "n1"),
            Some(web(9090)),
        );
        members[1].vtep = Some(ip("192.168.1.22"));
        let (after, warnings) = apply(&table, &merge(&members));
        assert!(warnings.is_empty(), "{warnings:?}");
        let web = after.service("web").unwrap();
        assert_eq!((web.port, web.id), (9090, 1));
        assert_eq!(after.node("n2").unwrap().ip, ip("192.168.1.22"));
    }

    #[test]
    fn a_starting_node_waits_for_the_nodes_it_knows() {
        let mut members = three();
        let (table, _) = apply(&Table::default(), &merge(&members));
        assert_eq!(not_yet_alive(&table, "n1", &[]), ["n2", "n3"]);
        members[2].alive = false;
        assert_eq!(not_yet_alive(&table, "n1", &members), ["n3"]);
        assert!(not_yet_alive(&Table::default(), "n4", &[]).is_empty());
    }

    #[test]
    fn the_digest_ignores_ids_and_order() {
        let (a, _) = apply(&Table::default(), &merge(&three()));
        let mut b = a.clone();
        b.services[0].backends.reverse();
        for backend in &mut b.services[0].backends {
            backend.id += 100;
        }
        b.generation += 5;
        b.nodes.reverse();
        assert_eq!(table_digest(&a), table_digest(&b));
        assert_eq!(table_digest(&a).len(), 16);
        b.services[0].backends.pop();
        assert_ne!(table_digest(&a), table_digest(&b));
    }

    /// n2's own state, holding the record of `web` on 8080 that n1 published.
    fn n2_with_web_from_n1() -> Local {
        let mut local = Local {
            node: "n2".into(),
            ..Local::default()
        };
        local.services.insert(
            "web".into(),
            ServiceRecord {
                version: version(10, "n1"),
                def: Some(web(8080)),
            },
        );
        local
    }

    #[test]
    fn records_learned_in_clear_are_forgotten_but_this_nodes_own() {
        let mut local = n2_with_web_from_n1();
        // A tombstone another node wrote (in clear: anyone could have), and n2's own record.
        local.services.insert(
            "api".into(),
            ServiceRecord {
                version: version(20, "evil"),
                def: None,
            },
        );
        local.services.insert(
            "dns".into(),
            ServiceRecord {
                version: version(5, "n2"),
                def: Some(web(53)),
            },
        );
        local.learned_in_clear = true;
        let dropped = local.forget_clear_records();
        assert_eq!(dropped, ["api", "web"]);
        assert_eq!(local.services.keys().collect::<Vec<_>>(), ["dns"]);
        assert!(!local.learned_in_clear);
        // Saved without the flag once cleared, with it while set.
        assert!(
            !serde_json::to_string(&local)
                .unwrap()
                .contains("learned_in_clear")
        );
        local.learned_in_clear = true;
        let json = serde_json::to_string(&local).unwrap();
        assert!(
            serde_json::from_str::<Local>(&json)
                .unwrap()
                .learned_in_clear
        );
    }

    #[test]
    fn commands_record_this_nodes_changes_only() {
        let (table, _) = apply(&Table::default(), &merge(&three()));
        let mut local = n2_with_web_from_n1();
        // A task of this node, given without a node, and a new service.
        let mut after = table.clone();
        after.add_backends("web", &[addr("10.0.0.14:80")]).unwrap();
        after
            .add_service("api", Proto::Tcp, 9090, None, &[addr("10.0.0.15:80")])
            .unwrap();
        let after = record_edit(&mut local, &table, after, 5).unwrap();
        assert_eq!(
            after.service("web").unwrap().backends[4].node.as_deref(),
            Some("n2")
        );
        let own: Vec<String> = local.backends["web"]
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(own, ["10.0.0.12:80", "10.0.0.13:80", "10.0.0.14:80"]);
        assert_eq!(
            local.services["api"].version,
            version(11, "n2"),
            "after the newest seen"
        );
        assert_eq!(
            local.services["web"].version,
            version(10, "n1"),
            "web's def unchanged"
        );
        // Another node's task is that node's business.
        let mut other = after.clone();
        other
            .remove_backends("web", &[addr("10.0.0.10:80")])
            .unwrap();
        let before = local.clone();
        let err = record_edit(&mut local, &after, other, 6).unwrap_err();
        assert!(err.contains("10.0.0.10:80@n1"), "{err}");
        assert_eq!(local, before);
        // Removing a service records a removal, whoever hosts its backends.
        let mut gone = after.clone();
        gone.remove_service("web").unwrap();
        record_edit(&mut local.clone(), &after, gone, 7).unwrap();
        // Removing a service records a removal.
        let mut removed = after.clone();
        removed.remove_service("api").unwrap();
        record_edit(&mut local, &after, removed, 7).unwrap();
        assert_eq!(local.services["api"].def, None);
        assert!(!local.backends.contains_key("api"));
    }

    /// What `lbctl apply` does on `local`'s node with a file that declares only `web`, on `port`
    /// with `backends`: the table it puts in force.
    fn declare_web(local: &mut Local, table: &Table, port: u16, backends: &[&str]) -> Table {
        let declared = vec![ServiceSpec {
            name: "web".into(),
            proto: Proto::Tcp,
            port,
            vip: None,
            backends: backends
                .iter()
                .map(|b| crate::table::parse_backend_spec(b).unwrap())
                .collect(),
            health_check: HealthCheck::default(),
            scheduler: Scheduler::default(),
        }];
        let declared = own_declaration(local, table, declared);
        let mut after = table.clone();
        after.apply(None, &declared).unwrap();
        record_edit(local, table, after, 5).unwrap()
    }

    #[test]
    fn a_new_frontend_declared_here_keeps_the_drain_and_health_of_other_nodes_tasks() {
        let mut members = three();
        let n1_tasks = members[0].backends.get_mut("web").unwrap();
        n1_tasks[0].drained = true;
        n1_tasks[1].health = Health::Unhealthy;
        let (table, _) = apply(&Table::default(), &merge(&members));
        let mut local = n2_with_web_from_n1();
        // n2 moves web to port 9090 with its own two tasks.
        let after = declare_web(&mut local, &table, 9090, &["10.0.0.12:80", "10.0.0.13:80"]);
        let web = after.service("web").unwrap();
        assert_eq!(web.port, 9090);
        let state = |addr: &str| {
            let b = web
                .backends
                .iter()
                .find(|b| b.addr.to_string() == addr)
                .unwrap();
            (b.drained, b.health)
        };
        assert_eq!(state("10.0.0.10:80"), (true, Health::Unknown));
        assert_eq!(state("10.0.0.11:80"), (false, Health::Unhealthy));
        assert_eq!(local.services["web"].def.as_ref().unwrap().port, 9090);
    }

    #[test]
    fn a_declared_table_changes_this_nodes_tasks_and_keeps_the_others() {
        let (table, _) = apply(&Table::default(), &merge(&three()));
        let mut local = Local {
            node: "n2".into(),
            ..Local::default()
        };
        // n2 declares web with one of its tasks kept, one dropped, one new (without @NODE),
        // and says nothing of n1's.
        let after = declare_web(&mut local, &table, 8080, &["10.0.0.12:80", "10.0.0.14:80"]);
        assert_eq!(
            backends_of(&after, "web"),
            [
                ("10.0.0.12:80@n2".into(), 2),
                ("10.0.0.14:80@n2".into(), 4),
                ("10.0.0.10:80@n1".into(), 0),
                ("10.0.0.11:80@n1".into(), 1)
            ]
        );
        let own: Vec<String> = local.backends["web"]
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(own, ["10.0.0.12:80", "10.0.0.14:80"]);
    }

    #[test]
    fn a_static_table_becomes_the_nodes_own_records() {
        let mut table = Table::default();
        table.add_node("n1", ip("192.168.1.1")).unwrap();
        table.add_node("n2", ip("192.168.1.2")).unwrap();
        table
            .add_service(
                "web",
                Proto::Tcp,
                8080,
                None,
                &[
                    crate::table::parse_backend_spec("10.0.0.10:80@n1").unwrap(),
                    crate::table::parse_backend_spec("10.0.0.12:80@n2").unwrap(),
                    crate::table::parse_backend_spec("10.9.0.1:80").unwrap(),
                ],
            )
            .unwrap();
        let local = Local::from_table("n1", &table, 42);
        let own: Vec<String> = local.backends["web"]
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(own, ["10.0.0.10:80", "10.9.0.1:80"]);
        assert_eq!(local.services["web"].version, version(42, "n1"));
    }
}
