//! Host routes to the Docker Swarm tasks of this node (`lbctl daemon --docker`): a task's
//! overlay address, unique in the Swarm but unreachable from the node's own namespace (Docker
//! keeps overlay networks in namespaces of their own), routed to the task's `docker_gwbridge`
//! address, which is. The task accepts packets for its overlay address on that interface (Linux
//! accepts any of its addresses on any interface), and answers from it through its default
//! route, `docker_gwbridge`: a source Docker does not masquerade (only `docker_gwbridge`'s own
//! subnet is), so replies reach lbctl's reverse NAT or tunnel with the address the flow went to.
//!
//! The routes carry their own protocol number (`proto 245`, `ip route show proto 245`), so
//! lbctl finds the ones it made after a restart without a record of them, and leaves every
//! other route alone. The gateway's neighbour entry is made managed, so that the kernel keeps
//! it resolved and XDP sends to the task without waiting for the kernel's path.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use netlink_packet_route::neighbour::NeighbourState;

use super::netlink::{HostRoute, Rtnl};
use crate::table::docker::TaskRoute;

/// The route protocol number lbctl's task routes carry (unassigned in iproute2's
/// `rt_protos`).
pub const PROTOCOL: u8 = 245;
/// The bridge through which a node reaches its Swarm tasks.
pub const GATEWAY_BRIDGE: &str = "docker_gwbridge";

/// The routes lbctl made (task address → gateway), whatever their gateway now.
fn made(rtnl: &mut Rtnl) -> Result<BTreeMap<Ipv4Addr, HostRoute>, String> {
    Ok(rtnl
        .host_routes_of(PROTOCOL)?
        .into_iter()
        .map(|route| (route.dst, route))
        .collect())
}

fn bridge_index(rtnl: &mut Rtnl) -> Result<u32, String> {
    rtnl.links()?
        .into_iter()
        .find(|l| l.name == GATEWAY_BRIDGE)
        .map(|l| l.index)
        .ok_or_else(|| format!("there is no {GATEWAY_BRIDGE} in this network namespace"))
}

/// Adds (or corrects) the routes `wanted` asks for and makes their gateways' neighbour entries
/// managed; then waits up to `wait` for those entries to resolve, so that XDP can send to the
/// tasks at once (the kernel's own path may be closed to them: Docker's FORWARD policy is
/// DROP).
pub fn add(wanted: &[TaskRoute], wait: Duration) -> Result<(), String> {
    if wanted.is_empty() {
        return Ok(());
    }
    let mut rtnl = Rtnl::open()?;
    let bridge = bridge_index(&mut rtnl)?;
    let made = made(&mut rtnl)?;
    let mut added = Vec::new();
    for route in wanted {
        if made
            .get(&route.task)
            .is_some_and(|r| (r.gateway, r.oif) == (Some(route.gateway), Some(bridge)))
        {
            continue;
        }
        rtnl.host_route_replace(route.task, route.gateway, bridge, PROTOCOL)
            .map_err(|err| {
                format!(
                    "routing task {} via {} dev {GATEWAY_BRIDGE}: {err}",
                    route.task, route.gateway
                )
            })?;
        rtnl.neighbour_replace_managed(route.gateway.into(), bridge)
            .map_err(|err| format!("making neighbour {} managed: {err}", route.gateway))?;
        added.push(*route);
    }
    let waiting: BTreeSet<IpAddr> = added.iter().map(|r| r.gateway.into()).collect();
    let deadline = Instant::now() + wait;
    while !waiting.is_empty() && Instant::now() < deadline {
        let resolved: BTreeSet<IpAddr> = rtnl
            .neighbours()?
            .into_iter()
            .filter(|n| {
                n.ifindex == bridge
                    && matches!(
                        n.state,
                        NeighbourState::Reachable
                            | NeighbourState::Stale
                            | NeighbourState::Delay
                            | NeighbourState::Probe
                    )
            })
            .map(|n| n.addr)
            .collect();
        if waiting.is_subset(&resolved) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Deletes the routes lbctl made that `wanted` no longer lists, and their gateways' neighbour
/// entries (unless a wanted route uses the address again).
pub fn remove_others(wanted: &[TaskRoute]) -> Result<(), String> {
    let mut rtnl = Rtnl::open()?;
    let made = made(&mut rtnl)?;
    let keep: BTreeSet<Ipv4Addr> = wanted.iter().map(|r| r.task).collect();
    let gateways: BTreeSet<Ipv4Addr> = wanted.iter().map(|r| r.gateway).collect();
    for (dst, HostRoute { gateway, oif, .. }) in made {
        if keep.contains(&dst) {
            continue;
        }
        rtnl.host_route_delete(dst, PROTOCOL)
            .map_err(|err| format!("deleting the route to task {dst}: {err}"))?;
        if let (Some(gateway), Some(oif)) = (gateway, oif)
            && !gateways.contains(&gateway)
        {
            // Gone already with its container's veth, or someone else's: not an error.
            let _ = rtnl.neighbour_delete(gateway.into(), oif);
        }
    }
    Ok(())
}
