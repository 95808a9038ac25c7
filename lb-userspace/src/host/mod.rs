//! The node's own network as the kernel shows it, read and changed for the data plane: the
//! interfaces' addresses, subnets and MACs and the neighbour entries towards other nodes
//! (`underlay`, over route netlink: `netlink`), the published ports reserved from ephemeral
//! ports (`reserved_ports`), the NIC drivers and their statistics (`netdev`), the host routes
//! to this node's Docker Swarm tasks (`task_routes`). Used by `dataplane`, `commands` and the
//! daemon; uses `table`.
pub mod netdev;
mod netlink;
pub mod reserved_ports;
pub mod task_routes;
pub mod underlay;
