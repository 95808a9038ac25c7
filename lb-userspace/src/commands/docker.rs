//! Docker's services in the table (`lbctl daemon --docker`): the change this node's Swarm tasks
//! make, with the host routes that reach them, and the rule that keeps the operator's commands
//! off Docker's services.
use super::*;
use crate::{
    host::task_routes,
    table::docker::{self, Desired},
    table::{Origin, Service},
};

/// How long a new task's gateway may take to resolve before the table sends it flows.
const GATEWAY_RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// What one round of following Docker did.
#[derive(Debug, Default)]
pub struct DockerFollowed {
    /// What changed in the table, in words.
    pub changes: Vec<String>,
    /// What Docker asks for that the table refused, with why.
    pub refused: Vec<String>,
}

/// Makes the table's Docker services what this node's tasks (`desired`) say, under the lock:
/// routes to new tasks first (so their flows have a way in), then the table (the maps, and in a
/// cluster this node's published tasks), then the routes of tasks that left are deleted.
/// `swarm`: the lbctl service names the Swarm defines, on a manager (see `docker::follow`).
pub fn docker_follow(
    instance: &Instance,
    desired: &Desired,
    swarm: Option<&BTreeSet<String>>,
) -> Result<DockerFollowed> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    task_routes::add(&desired.routes, GATEWAY_RESOLVE_WAIT).map_err(|err| anyhow!(err))?;
    let before = state.table.clone();
    let self_node = match &state.cluster {
        Some(local) => Some(local.node.clone()),
        None => state.self_node()?.map(|n| n.name.clone()),
    };
    let (changes, refused) = docker::follow(&mut state.table, desired, self_node.as_deref(), swarm);
    if state.table != before {
        record_cluster_edit(&mut state, &before)?;
        state::save(&instance.state_dir, &state)?;
    }
    reconcile(instance, &mut state)?;
    task_routes::remove_others(&desired.routes).map_err(|err| anyhow!(err))?;
    Ok(DockerFollowed { changes, refused })
}

/// Refuses an operator's change to a service Docker defines.
pub(super) fn operators_only(table: &Table, name: &str) -> Result<(), String> {
    match table.service(name) {
        Some(Service {
            origin: Origin::Docker,
            ..
        }) => Err(format!(
            "service '{name}' follows Docker (`lbctl daemon --docker`): change its Swarm \
             service's lbctl.* container labels, or scale it, with `docker service update`; \
             `lbctl backend drain` and `backend weight` still apply"
        )),
        _ => Ok(()),
    }
}

/// The mesh's VXLAN port, and whether the mesh is in use (a cluster, or a node list).
pub fn mesh_port_in_use(instance: &Instance) -> Result<(u16, bool)> {
    let _lock = instance::lock_shared(instance)?;
    let state = state::load(&instance.state_dir)?;
    let in_use = state.cluster.is_some() || !state.table.nodes.is_empty();
    Ok((state.table.vxlan_port, in_use))
}
