//! lbctl, the controller of the lbctl XDP load balancer. The folders, from the bottom up (each
//! uses only those above it in this list):
//!
//! - [`table`]: the operator's model (services, backends, nodes, the mesh), its validation and
//!   the parsing of its values, the table file and the diff between two tables. Knows nothing
//!   of maps, namespaces or sockets.
//! - [`host`]: the node's own network as the kernel shows it: interfaces and their addresses,
//!   subnets and MACs, neighbour entries towards other nodes, reserved ports, NIC drivers.
//! - [`cluster`]: the gossiped cluster: what each node publishes, the merge into one table,
//!   and the gossip transport.
//! - [`dataplane`]: the embedded eBPF object and its pinned maps: table → desired map contents
//!   → delta → writes, the maps' layouts and their migration, installing the programs
//!   (interfaces and the socket programs).
//! - [`instance`]: one instance per network namespace: where its pins and state live, its
//!   lock, the saved state, and the listing of every instance on the machine.
//! - [`commands`]: the operations behind every `lbctl` command, called by the CLI (`main.rs`)
//!   and by the daemon: load the state, change the table, reconcile the maps and the host,
//!   save.
//! - [`docker`]: following the Docker Engine (`lbctl daemon --docker`): this node's Swarm
//!   tasks and the Swarm's services, read over the Engine API on its events.
//! - [`daemon`]: `lbctl daemon`: health checks, metrics, the flow census, the cluster loop and
//!   the Docker watcher.
//!
//! A command flows through them as: parse (`main.rs`, `table` values) → load the state
//! (`instance::state`) → change the table (`table`) → desired map contents and the delta
//! (`dataplane::sync`) → map writes (`dataplane`) and neighbour entries (`host::underlay`) →
//! save (`instance::state`).
pub mod cluster;
pub mod commands;
pub mod daemon;
pub mod dataplane;
pub mod docker;
pub mod host;
pub mod instance;
pub mod table;
