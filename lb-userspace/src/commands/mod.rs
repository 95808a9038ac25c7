//! The operations behind the `lbctl` commands, under both the CLI (`main.rs`, which parses
//! arguments and prints) and the daemon (which records health and joins clusters through
//! them).
//!
//! What each lbctl command does. Every mutating command takes the instance lock, validates
//! its input against the persisted state before touching anything, saves the new state, then
//! brings the maps in line with it (a full reconcile, so an interrupted command heals on the
//! next one).
pub mod attach;
pub mod docker;
pub mod instances;
pub mod membership;
pub mod mesh;
pub mod services;
pub mod show;
pub mod snapshot;

pub use attach::*;
pub use docker::{DockerFollowed, docker_follow, mesh_port_in_use};
pub use membership::*;
pub use mesh::*;
pub use services::*;
pub use show::*;
use std::{collections::BTreeSet, fs, net::IpAddr, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::{VXLAN_OVERHEAD, VXLAN6_OVERHEAD};
use serde::Serialize;
use serde_json::json;

use crate::{
    cluster,
    dataplane::install,
    dataplane::install::{AttachMode, TransmitChoice},
    dataplane::socket_lb,
    dataplane::sync,
    dataplane::{self, Maps},
    host::reserved_ports,
    host::underlay,
    instance::state::{self, Attachment, State},
    instance::{self, Instance},
    table::diff,
    table::file::TableFile,
    table::{BackendSpec, Health, HealthUpdate, Node, Proto, Scheduler, Table},
};

/// Brings the maps, then the managed neighbour entries towards the other nodes, in line with
/// the table (saving the state again when the entries lbctl made changed). Neighbour problems
/// are warnings: the kernel resolves a managed entry on its own time anyway, and the data plane
/// counts what it drops meanwhile. Returns the number of map writes.
fn reconcile(instance: &Instance, state: &mut State) -> Result<usize> {
    let (self_name, underlay) = match state.self_node()? {
        Some(node) => (Some(node.name.clone()), node.ipv4()),
        None => (None, None),
    };
    let mut maps = Maps::open_pinned(&instance.maps_dir())?;
    let desired = sync::desired(&state.table, self_name.as_deref());
    let delta = sync::delta(&desired, &maps.read_contents()?);
    maps.apply(&delta)?;
    let attached: Vec<&str> = state.attachments.iter().map(|a| a.iface.as_str()).collect();
    let host_writes = maps.sync_host(&attached, underlay)?;

    let others: Vec<&Node> = state
        .table
        .nodes
        .iter()
        .filter(|n| Some(&n.name) != self_name.as_ref())
        .collect();
    let backends: BTreeSet<IpAddr> = desired
        .local_backends
        .iter()
        .map(|key| IpAddr::from(key.ip_be.to_ne_bytes()))
        .collect();
    let (managed, warnings) =
        underlay::sync_neighbours(&others, &backends, &attached, &state.managed_neighbours);
    for warning in warnings {
        eprintln!("lbctl: warning: {warning}");
    }
    let wanted = reserved_ports::wanted(&state.table);
    let reserved = match reserved_ports::sync(&state.reserved_ports, &wanted) {
        Ok(now) => now,
        Err(err) => {
            eprintln!("lbctl: warning: published ports not reserved from ephemeral ports: {err:#}");
            state.reserved_ports.clone()
        }
    };
    if managed != state.managed_neighbours || reserved != state.reserved_ports {
        state.managed_neighbours = managed;
        state.reserved_ports = reserved;
        state::save(&instance.state_dir, state)?;
    }
    Ok(delta.writes() + host_writes)
}

/// Loads the state of an instance that has an interface attached (service commands need the
/// maps that attach creates), with every map this lbctl declares pinned: a change could not be
/// applied to an older lbctl's (`lbctl upgrade` first), so none is saved.
fn attached_state(instance: &Instance) -> Result<State> {
    let state = attached_state_of_any_build(instance)?;
    crate::dataplane::require_this_builds_maps(&instance.maps_dir())?;
    Ok(state)
}

/// [`attached_state`] whichever lbctl pinned the maps (`upgrade` installs this one's).
fn attached_state_of_any_build(instance: &Instance) -> Result<State> {
    let state = state::load(&instance.state_dir)?;
    if state.attachments.is_empty()
        || !instance
            .maps_dir()
            .join(lb_common::map_names::SERVICES)
            .exists()
    {
        bail!(
            "no interface is attached in network namespace '{}'; run `lbctl attach <iface>` first",
            instance.name
        );
    }
    Ok(state)
}

/// Saves a changed state and applies it.
fn commit(instance: &Instance, state: &mut State) -> Result<()> {
    state::save(&instance.state_dir, state)?;
    reconcile(instance, state).map(|_| ())
}

/// A state change: under the instance lock, on an attached instance, `edit` checks and changes
/// the state; it is then saved (unless unchanged: saving 100,000 backends takes a third of a
/// re-apply) and applied (always, which heals an interrupted command). A refused change saves
/// and applies nothing. Returns the new state and what `edit` returned.
fn change_state<T>(
    instance: &Instance,
    edit: impl FnOnce(&mut State) -> Result<T>,
) -> Result<(State, T)> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    let loaded = state.clone();
    let out = edit(&mut state)?;
    if state != loaded {
        state::save(&instance.state_dir, &state)?;
    }
    reconcile(instance, &mut state)?;
    Ok((state, out))
}

/// A table change (see `change_state`), recorded for the cluster when there is one.
fn change_table<T>(
    instance: &Instance,
    edit: impl FnOnce(&mut Table) -> Result<T, String>,
) -> Result<(State, T)> {
    change_state(instance, |state| {
        let before = state.table.clone();
        let out = edit(&mut state.table).map_err(|e| anyhow!(e))?;
        record_cluster_edit(state, &before)?;
        Ok(out)
    })
}

/// In a gossiped cluster, records what changed from `before` in what this node publishes (and
/// refuses changes to another node's tasks); the daemon publishes it at its next round.
fn record_cluster_edit(state: &mut State, before: &Table) -> Result<()> {
    if let Some(local) = &mut state.cluster {
        state.table = cluster::record_edit(local, before, state.table.clone(), now_ms())
            .map_err(|e| anyhow!(e))?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Refuses node-list changes in a gossiped cluster, whose nodes are its live members.
fn static_nodes_only(state: &State) -> Result<()> {
    if state.cluster.is_some() {
        bail!(
            "this node is in a gossiped cluster: its nodes are the cluster's live members (`lbctl cluster ls`), not a list to edit"
        );
    }
    Ok(())
}

/// The state of an attached instance and the name of its node in the mesh, if any.
pub fn attached_state_and_node(instance: &Instance) -> Result<(State, Option<String>)> {
    let state = attached_state(instance)?;
    let node = state.self_node()?.map(|n| n.name.clone());
    Ok((state, node))
}
