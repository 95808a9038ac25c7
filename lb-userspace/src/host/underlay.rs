//! The underlay network as the instance's namespace sees it: its own addresses (which node of
//! the mesh this is), the next hop towards each other node, and the managed neighbour entries
//! lbctl keeps for those next hops.
//!
//! XDP cannot resolve ARP: an encapsulated packet whose next hop has no resolved neighbour entry
//! is dropped (`drop_encap_no_neigh`). A *managed* entry (`ip neigh replace ADDR dev DEV
//! managed`, kernel 5.16+) is one the kernel keeps resolved by itself, probing again whenever it
//! goes stale and retrying until the peer answers, so the data plane finds it ready.
//!
//! Everything runs in the namespace lbctl has entered with `setns`: `getifaddrs` and the route
//! netlink socket (`netlink`) are opened there. One socket serves a whole command's lookups and
//! changes, whatever the number of nodes.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use netlink_packet_route::{neighbour::NeighbourState, route::RouteType};
use serde::{Deserialize, Serialize};

use super::netlink::{FdbEntry, Link, Neighbour, Route, Rtnl};
use crate::table::Node;

/// What the data plane takes from the namespace's own interfaces (`Maps::sync_host`), read in
/// one go: one address listing, one route netlink socket, one link listing.
pub struct HostView {
    /// See [`local_subnets`].
    pub subnets: BTreeSet<Subnet>,
    /// See [`local_addrs`].
    pub addrs: BTreeSet<Ipv4Addr>,
    /// See [`macs_of`].
    pub attached_macs: BTreeSet<[u8; 6]>,
    /// See [`bridge_ports`].
    pub bridge_ports: BTreeMap<(u32, [u8; 6]), u32>,
}

/// The namespace's [`HostView`], `attached` the interfaces lbctl is on.
pub fn host_view(attached: &[&str]) -> Result<HostView> {
    let addrs = interface_addrs()?;
    let mut rtnl = Rtnl::open().map_err(anyhow::Error::msg)?;
    let links = rtnl.links().map_err(anyhow::Error::msg)?;
    let fdb = rtnl.bridge_fdb().map_err(anyhow::Error::msg)?;
    Ok(HostView {
        subnets: local_subnets(&addrs),
        addrs: addrs.iter().map(|a| a.addr).collect(),
        attached_macs: macs_of(&links, attached),
        bridge_ports: veth_ports(&links, &fdb),
    })
}

/// The hosts behind a port of one of the namespace's bridges that the data plane can send to
/// directly (`BRIDGE_PORTS`): (bridge, MAC) → the port, for every MAC a bridge reaches through a
/// port that is a veth (a container's, whose other end is in the container's namespace).
pub fn bridge_ports() -> Result<BTreeMap<(u32, [u8; 6]), u32>> {
    let mut rtnl = Rtnl::open().map_err(anyhow::Error::msg)?;
    let links = rtnl.links().map_err(anyhow::Error::msg)?;
    let fdb = rtnl.bridge_fdb().map_err(anyhow::Error::msg)?;
    Ok(veth_ports(&links, &fdb))
}

fn veth_ports(links: &[Link], fdb: &[FdbEntry]) -> BTreeMap<(u32, [u8; 6]), u32> {
    fdb.iter()
        .filter(|entry| {
            links.iter().any(|link| {
                link.index == entry.port && link.veth && link.master == Some(entry.bridge)
            })
        })
        .map(|entry| ((entry.bridge, entry.mac), entry.port))
        .collect()
}

/// The IPv4 addresses assigned to the namespace's interfaces (up or down).
pub fn local_addrs() -> Result<BTreeSet<Ipv4Addr>> {
    Ok(interface_addrs()?.into_iter().map(|a| a.addr).collect())
}

/// The addresses of the namespace's interfaces a node of the mesh may have: IPv4 ones
/// ([`local_addrs`]) and global IPv6 ones ([`local_addrs6`]).
pub fn local_underlay_addrs() -> Result<BTreeSet<IpAddr>> {
    Ok(local_addrs()?
        .into_iter()
        .map(IpAddr::V4)
        .chain(
            local_addrs6()?
                .into_iter()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        )
        .collect())
}

/// The IPv6 addresses of the namespace's interfaces that a client may reach a service on
/// every address at: not link-local (valid on one link only, with a scope a flow key does not
/// carry) and not loopback (no client comes from the wire to it).
pub fn local_addrs6() -> Result<BTreeSet<[u8; 16]>> {
    let list =
        nix::ifaddrs::getifaddrs().context("listing the namespace's addresses (getifaddrs)")?;
    Ok(list
        .filter_map(|entry| entry.address?.as_sockaddr_in6().map(|sin6| sin6.ip()))
        .filter(|ip| !ip.is_unicast_link_local() && !ip.is_loopback())
        .map(|ip| ip.octets())
        .collect())
}

/// The MAC addresses a frame arriving on one of the `attached` interfaces may carry to be this
/// node's: the interface's own, and its master's (a bridge it is a port of). Only these: a
/// Docker host has a veth per container, and the map is bounded.
fn macs_of(links: &[Link], attached: &[&str]) -> BTreeSet<[u8; 6]> {
    let masters: BTreeSet<u32> = links
        .iter()
        .filter(|l| attached.contains(&l.name.as_str()))
        .filter_map(|l| l.master)
        .collect();
    links
        .iter()
        .filter(|l| attached.contains(&l.name.as_str()) || masters.contains(&l.index))
        .filter_map(|l| l.mac)
        .collect()
}

/// An IPv4 address of an interface, as `getifaddrs` lists it.
struct InterfaceAddr {
    addr: Ipv4Addr,
    netmask: Option<Ipv4Addr>,
    loopback: bool,
}

/// Every IPv4 address of the namespace's interfaces (`getifaddrs`).
fn interface_addrs() -> Result<Vec<InterfaceAddr>> {
    let list =
        nix::ifaddrs::getifaddrs().context("listing the namespace's addresses (getifaddrs)")?;
    let ipv4 = |addr: Option<nix::sys::socket::SockaddrStorage>| {
        addr.and_then(|a| a.as_sockaddr_in().map(|sin| sin.ip()))
    };
    Ok(list
        .filter_map(|entry| {
            let addr = ipv4(entry.address)?;
            Some(InterfaceAddr {
                addr,
                netmask: ipv4(entry.netmask),
                loopback: entry
                    .flags
                    .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK),
            })
        })
        .collect())
}

/// A subnet of an interface: its network address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl Subnet {
    /// The subnet of an interface address with netmask `mask`; `None` for a host address (/32),
    /// which has no neighbours, or a netmask that is not a prefix.
    pub fn of(addr: Ipv4Addr, mask: Ipv4Addr) -> Option<Subnet> {
        let mask = u32::from(mask);
        let prefix_len = mask.leading_ones();
        if prefix_len == 0 || prefix_len == 32 || mask.count_ones() != prefix_len {
            return None;
        }
        Some(Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len: prefix_len as u8,
        })
    }
}

impl Subnet {
    /// Whether `addr` is in the subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        u32::from(addr) & mask == u32::from(self.network)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// The subnets of the namespace's interfaces (`addrs`) other than loopback: where a client and
/// a backend may reach each other over a link without this node.
fn local_subnets(addrs: &[InterfaceAddr]) -> BTreeSet<Subnet> {
    addrs
        .iter()
        .filter(|a| !a.loopback)
        .filter_map(|a| Subnet::of(a.addr, a.netmask?))
        .collect()
}

/// The MTU of an interface of the namespace.
pub fn mtu(iface: &str) -> Result<u32, String> {
    let links = Rtnl::open()?.links()?;
    let link = links
        .iter()
        .find(|l| l.name == iface)
        .ok_or_else(|| format!("no interface {iface}"))?;
    link.mtu.ok_or_else(|| format!("{iface} has no MTU"))
}

/// The MTU of the path to `dst` (IPv4 or IPv6) as the data plane's FIB lookups see it: the
/// route's own (`mtu lock 1400`, or one path MTU discovery learnt), else its interface's.
/// `None` without a route.
pub fn path_mtu(dst: IpAddr) -> Result<Option<u32>, String> {
    let mut rtnl = Rtnl::open()?;
    let Ok(route) = rtnl.route_get(dst) else {
        return Ok(None);
    };
    let link_mtus: BTreeMap<u32, u32> = rtnl
        .links()?
        .into_iter()
        .filter_map(|link| Some((link.index, link.mtu?)))
        .collect();
    Ok(path_mtu_of(&route, &link_mtus))
}

fn path_mtu_of(route: &Route, link_mtus: &BTreeMap<u32, u32>) -> Option<u32> {
    if route.kind != RouteType::Unicast {
        return None;
    }
    route.mtu.or_else(|| link_mtus.get(&route.oif?).copied())
}

/// A neighbour entry: the next hop towards a node (the node itself when on-link, else the
/// route's gateway) on the interface the route leaves by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NextHop {
    /// IPv4, or IPv6 (`ip -6 neigh`) towards a node of an IPv6 underlay.
    pub addr: IpAddr,
    pub dev: String,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} dev {}", self.addr, self.dev)
    }
}

/// The namespace's route netlink socket and its interfaces' names, opened and listed once for
/// all the lookups and changes of a command.
struct Netlink {
    rtnl: Rtnl,
    names: BTreeMap<u32, String>,
}

impl Netlink {
    fn open() -> Result<Netlink, String> {
        let mut rtnl = Rtnl::open()?;
        let names = rtnl.link_names()?;
        Ok(Netlink { rtnl, names })
    }

    /// The next hop towards each address, by the kernel's own routing decision (`ip route
    /// get`), or why there is none.
    fn next_hops(&mut self, dsts: &BTreeSet<IpAddr>) -> BTreeMap<IpAddr, Result<NextHop, String>> {
        dsts.iter()
            .map(|&dst| {
                let hop = self
                    .rtnl
                    .route_get(dst)
                    .map_err(|err| format!("looking up the route to {dst}: {err}"))
                    .and_then(|route| next_hop(&route, dst, &self.names));
                (dst, hop)
            })
            .collect()
    }

    /// The kernel's IPv4 and IPv6 neighbour entries (`ip neigh show`, `ip -6 neigh show`).
    fn neighbours(&mut self) -> Result<BTreeMap<NextHop, Kernel>, String> {
        Ok(classify(&self.rtnl.neighbours()?, &self.names))
    }

    /// Runs `change` on each hop's address and interface index; returns the hops it failed
    /// for, with why.
    fn change_each(
        &mut self,
        hops: &[NextHop],
        change: impl Fn(&mut Rtnl, IpAddr, u32) -> Result<(), String>,
    ) -> Vec<(NextHop, String)> {
        let indexes: BTreeMap<&str, u32> =
            self.names.iter().map(|(i, n)| (n.as_str(), *i)).collect();
        hops.iter()
            .filter_map(|hop| {
                let result = match indexes.get(hop.dev.as_str()) {
                    Some(&index) => change(&mut self.rtnl, hop.addr, index),
                    None => Err(format!("no interface {}", hop.dev)),
                };
                result.err().map(|err| (hop.clone(), err))
            })
            .collect()
    }

    /// Makes (or turns) the entries for `hops` managed; returns the failures. Replacing turns
    /// an existing learned entry, even a REACHABLE one, into a managed one and keeps its
    /// address (checked on kernel 6.18).
    fn add_managed(&mut self, hops: &[NextHop]) -> Vec<(NextHop, String)> {
        self.change_each(hops, Rtnl::neighbour_replace_managed)
    }

    /// Deletes the entries for `hops`; returns the failures.
    fn delete(&mut self, hops: &[NextHop]) -> Vec<(NextHop, String)> {
        self.change_each(hops, Rtnl::neighbour_delete)
    }
}

/// The next hop `route`, the kernel's route to `dst`, leads to.
fn next_hop(route: &Route, dst: IpAddr, names: &BTreeMap<u32, String>) -> Result<NextHop, String> {
    match route.kind {
        RouteType::Unicast | RouteType::Unspec => {}
        RouteType::Local => return Err(format!("{dst} is an address of this namespace")),
        other => {
            return Err(format!(
                "the route to {dst} is of type {}",
                route_type_name(other)
            ));
        }
    }
    let dev = route
        .oif
        .and_then(|index| names.get(&index))
        .ok_or_else(|| format!("the route to {dst} names no interface"))?;
    Ok(NextHop {
        addr: route.gateway.unwrap_or(dst),
        dev: dev.clone(),
    })
}

/// A route type as iproute2 names it.
fn route_type_name(kind: RouteType) -> String {
    match kind {
        RouteType::Broadcast => "broadcast".into(),
        RouteType::Anycast => "anycast".into(),
        RouteType::Multicast => "multicast".into(),
        RouteType::BlackHole => "blackhole".into(),
        RouteType::Unreachable => "unreachable".into(),
        RouteType::Prohibit => "prohibit".into(),
        RouteType::Throw => "throw".into(),
        RouteType::Nat => "nat".into(),
        RouteType::ExternalResolve => "xresolve".into(),
        other => format!("{}", u8::from(other)),
    }
}

/// What the kernel holds for a next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Managed: kept resolved by the kernel.
    Managed,
    /// Set by an administrator (PERMANENT or NOARP): always resolved, and not lbctl's to change.
    /// `ip neigh replace ... managed` would drop its link-layer address.
    Static,
    /// Learned by ARP; may expire.
    Learned,
}

fn classify(entries: &[Neighbour], names: &BTreeMap<u32, String>) -> BTreeMap<NextHop, Kernel> {
    entries
        .iter()
        .filter_map(|entry| {
            let dev = names.get(&entry.ifindex)?;
            let kind = if entry.managed {
                Kernel::Managed
            } else if matches!(
                entry.state,
                NeighbourState::Permanent | NeighbourState::Noarp
            ) {
                Kernel::Static
            } else {
                Kernel::Learned
            };
            let hop = NextHop {
                addr: entry.addr,
                dev: dev.clone(),
            };
            Some((hop, kind))
        })
        .collect()
}

/// What to do to the kernel's neighbour table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NeighPlan {
    /// Entries to make managed (missing, or only learned).
    pub add: Vec<NextHop>,
    /// Managed entries lbctl made that no node needs any more.
    pub delete: Vec<NextHop>,
    /// Entries lbctl made that are no longer its own (gone, or set static by someone):
    /// dropped from the record, left alone.
    pub forget: Vec<NextHop>,
}

/// Plans the neighbour changes: `wanted` next hops, the ones lbctl `recorded` as made by it, and
/// what the kernel holds. A managed entry lbctl did not make, and any static entry, is left
/// alone and not recorded: whoever made it owns it.
pub fn plan(
    wanted: &BTreeSet<NextHop>,
    recorded: &BTreeSet<NextHop>,
    kernel: &BTreeMap<NextHop, Kernel>,
) -> NeighPlan {
    let mut plan = NeighPlan::default();
    for hop in wanted {
        match kernel.get(hop) {
            Some(Kernel::Static) if recorded.contains(hop) => plan.forget.push(hop.clone()),
            Some(Kernel::Static | Kernel::Managed) => {}
            Some(Kernel::Learned) | None => plan.add.push(hop.clone()),
        }
    }
    for hop in recorded.difference(wanted) {
        match kernel.get(hop) {
            Some(Kernel::Managed) => plan.delete.push(hop.clone()),
            _ => plan.forget.push(hop.clone()),
        }
    }
    plan
}

/// Brings the managed neighbour entries in line with `nodes` (every node but this one) and the
/// `backends` this node routes to itself, given those lbctl `recorded` as made by it. Kept
/// resolved, their next hops never send XDP's packets to the kernel for want of a neighbour (a
/// hairpin flow's packet cannot go through the kernel at all: its source is the node's own
/// address). Returns the new record and warnings: a node without a route yet, or an `ip`
/// failure, must not fail the command (the maps are already written; the data plane counts
/// such packets, and the next command tries again). A backend routed out of an interface lbctl
/// is not attached to is the kernel's to reach, without a warning.
pub fn sync_neighbours(
    nodes: &[&Node],
    backends: &BTreeSet<IpAddr>,
    attached: &[&str],
    recorded: &[NextHop],
) -> (Vec<NextHop>, Vec<String>) {
    let mut warnings = Vec::new();
    if nodes.is_empty() && backends.is_empty() && recorded.is_empty() {
        return (Vec::new(), warnings);
    }
    let mut record: BTreeSet<NextHop> = recorded.iter().cloned().collect();
    let dsts: BTreeSet<IpAddr> = nodes
        .iter()
        .map(|n| n.ip)
        .chain(backends.iter().copied())
        .collect();
    let listed = Netlink::open().and_then(|mut netlink| {
        let hops = netlink.next_hops(&dsts);
        let kernel = netlink.neighbours()?;
        Ok((netlink, hops, kernel))
    });
    let (mut netlink, hops, kernel) = match listed {
        Ok(listed) => listed,
        Err(err) => {
            warnings.push(format!("cannot manage neighbour entries: {err}"));
            return (recorded.to_vec(), warnings);
        }
    };
    let mut wanted = BTreeSet::new();
    for node in nodes {
        match &hops[&node.ip] {
            Ok(hop) => {
                if !attached.contains(&hop.dev.as_str()) {
                    warnings.push(format!(
                        "the route to node '{}' ({}) leaves by {}, where lbctl is not attached: \
                         packets encapsulated to it are dropped (drop_encap_no_route)",
                        node.name, node.ip, hop.dev
                    ));
                }
                wanted.insert(hop.clone());
            }
            Err(err) => warnings.push(format!(
                "no route to node '{}' ({}): {err}; packets encapsulated to it are dropped \
                 (drop_encap_no_route) until there is one and lbctl runs again",
                node.name, node.ip
            )),
        }
    }
    for backend in backends {
        if let Ok(hop) = &hops[backend]
            && attached.contains(&hop.dev.as_str())
        {
            wanted.insert(hop.clone());
        }
    }
    let plan = plan(&wanted, &record, &kernel);
    for hop in &plan.forget {
        record.remove(hop);
    }
    let failed = netlink.add_managed(&plan.add);
    for hop in &plan.add {
        if !failed.iter().any(|(f, _)| f == hop) {
            record.insert(hop.clone());
        }
    }
    for (hop, err) in failed {
        warnings.push(format!("cannot add a managed neighbour {hop}: {err}"));
    }
    let failed = netlink.delete(&plan.delete);
    for hop in &plan.delete {
        if !failed.iter().any(|(f, _)| f == hop) {
            record.remove(hop);
        }
    }
    for (hop, err) in failed {
        warnings.push(format!("cannot delete neighbour {hop}: {err}"));
    }
    (record.into_iter().collect(), warnings)
}

/// Deletes every managed entry lbctl made (purge). An entry already gone is no error.
pub fn delete_all(recorded: &[NextHop]) -> Vec<String> {
    if recorded.is_empty() {
        return Vec::new();
    }
    let listed = Netlink::open().and_then(|mut netlink| Ok((netlink.neighbours()?, netlink)));
    let (kernel, mut netlink) = match listed {
        Ok(listed) => listed,
        Err(err) => return vec![format!("cannot list neighbour entries: {err}")],
    };
    let ours: Vec<NextHop> = recorded
        .iter()
        .filter(|hop| kernel.get(*hop) == Some(&Kernel::Managed))
        .cloned()
        .collect();
    netlink
        .delete(&ours)
        .into_iter()
        .map(|(hop, err)| format!("cannot delete neighbour {hop}: {err}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(addr: &str, dev: &str) -> NextHop {
        NextHop {
            addr: addr.parse().unwrap(),
            dev: dev.to_owned(),
        }
    }

    #[test]
    fn a_paths_mtu_is_its_routes_else_its_interfaces() {
        let link_mtus = BTreeMap::from([(4, 1500), (5, 9000)]);
        let route = |kind, oif, mtu| Route {
            kind,
            oif,
            gateway: None,
            mtu,
        };
        assert_eq!(
            path_mtu_of(&route(RouteType::Unicast, Some(4), None), &link_mtus),
            Some(1500)
        );
        assert_eq!(
            path_mtu_of(&route(RouteType::Unicast, Some(5), Some(1400)), &link_mtus),
            Some(1400),
            "mtu lock 1400 on a 9000 link"
        );
        assert_eq!(
            path_mtu_of(&route(RouteType::Unreachable, None, None), &link_mtus),
            None
        );
        assert_eq!(
            path_mtu_of(&route(RouteType::Unicast, Some(9), None), &link_mtus),
            None,
            "an interface gone since"
        );
    }

    #[test]
    fn the_next_hop_is_the_gateway_or_the_node_itself() {
        let dst: IpAddr = "172.30.5.5".parse().unwrap();
        let names = BTreeMap::from([(1, "lo".to_owned()), (4, "v0".to_owned())]);
        let route = |kind, oif, gateway: Option<&str>| {
            let route = Route {
                kind,
                oif,
                gateway: gateway.map(|g| g.parse().unwrap()),
                mtu: None,
            };
            next_hop(&route, dst, &names)
        };
        assert_eq!(
            route(RouteType::Unicast, Some(4), Some("192.168.77.2")),
            Ok(hop("192.168.77.2", "v0"))
        );
        assert_eq!(
            route(RouteType::Unicast, Some(4), None),
            Ok(hop("172.30.5.5", "v0"))
        );
        let local = route(RouteType::Local, Some(1), None).unwrap_err();
        assert!(local.contains("address of this namespace"), "{local}");
        let blackhole = route(RouteType::BlackHole, None, None).unwrap_err();
        assert!(blackhole.ends_with("of type blackhole"), "{blackhole}");
        for oif in [None, Some(9)] {
            let err = route(RouteType::Unicast, oif, None).unwrap_err();
            assert!(err.contains("no interface"), "{err}");
        }
    }

    #[test]
    fn an_ipv6_nodes_next_hop_is_its_gateway_often_link_local_or_itself() {
        let dst: IpAddr = "2001:db8:2::2".parse().unwrap();
        let names = BTreeMap::from([(4, "v0".to_owned())]);
        let route = |gateway: Option<&str>| Route {
            kind: RouteType::Unicast,
            oif: Some(4),
            gateway: gateway.map(|g| g.parse().unwrap()),
            mtu: Some(1400),
        };
        assert_eq!(
            next_hop(&route(Some("fe80::1")), dst, &names),
            Ok(hop("fe80::1", "v0"))
        );
        assert_eq!(
            next_hop(&route(None), dst, &names),
            Ok(hop("2001:db8:2::2", "v0"))
        );
        let link_mtus = BTreeMap::from([(4, 9000)]);
        assert_eq!(path_mtu_of(&route(None), &link_mtus), Some(1400));
    }

    #[test]
    fn ipv6_neighbours_are_classified_and_planned_as_ipv4_ones() {
        let names = BTreeMap::from([(4, "v0".to_owned())]);
        let entry = |addr: &str, state, managed| Neighbour {
            addr: addr.parse().unwrap(),
            ifindex: 4,
            state,
            managed,
        };
        let kernel = classify(
            &[
                entry("fe80::1", NeighbourState::Reachable, true),
                entry("2001:db8::9", NeighbourState::Permanent, false),
                entry("2001:db8::3", NeighbourState::Stale, false),
                entry("192.168.77.3", NeighbourState::Stale, false),
            ],
            &names,
        );
        assert_eq!(kernel[&hop("fe80::1", "v0")], Kernel::Managed);
        assert_eq!(kernel[&hop("2001:db8::9", "v0")], Kernel::Static);
        assert_eq!(kernel[&hop("2001:db8::3", "v0")], Kernel::Learned);
        assert_eq!(kernel[&hop("192.168.77.3", "v0")], Kernel::Learned);
        let wanted = BTreeSet::from([hop("2001:db8::3", "v0"), hop("2001:db8::4", "v0")]);
        let recorded = BTreeSet::from([hop("fe80::1", "v0")]);
        let plan = plan(&wanted, &recorded, &kernel);
        assert_eq!(
            plan.add,
            [hop("2001:db8::3", "v0"), hop("2001:db8::4", "v0")]
        );
        assert_eq!(plan.delete, [hop("fe80::1", "v0")]);
        assert!(plan.forget.is_empty());
    }

    #[test]
    fn recorded_ipv4_next_hops_still_load() {
        let old: Vec<NextHop> =
            serde_json::from_str(r#"[{"addr": "192.168.77.2", "dev": "v0"}]"#).unwrap();
        assert_eq!(old, [hop("192.168.77.2", "v0")]);
        let v6 = serde_json::to_string(&hop("fe80::1", "v0")).unwrap();
        assert_eq!(v6, r#"{"addr":"fe80::1","dev":"v0"}"#);
    }

    #[test]
    fn a_subnet_is_the_address_under_its_prefix_and_host_routes_have_none() {
        let subnet = |addr: [u8; 4], mask: [u8; 4]| Subnet::of(addr.into(), mask.into());
        assert_eq!(
            subnet([10, 1, 2, 3], [255, 255, 255, 0]).map(|s| s.to_string()),
            Some("10.1.2.0/24".into())
        );
        assert_eq!(
            subnet([172, 23, 200, 9], [255, 255, 240, 0]).map(|s| s.to_string()),
            Some("172.23.192.0/20".into())
        );
        assert_eq!(subnet([10, 1, 2, 3], [255, 255, 255, 255]), None, "/32");
        assert_eq!(subnet([10, 1, 2, 3], [0, 0, 0, 0]), None, "/0");
        assert_eq!(
            subnet([10, 1, 2, 3], [255, 0, 255, 0]),
            None,
            "not a prefix"
        );
    }

    #[test]
    fn bridge_ports_are_the_veth_ports_behind_which_a_bridge_reaches_a_mac() {
        let port = |index, master, veth| Link {
            index,
            name: format!("if{index}"),
            master,
            mac: None,
            mtu: Some(1500),
            veth,
        };
        let links = [
            port(2, Some(10), true),
            port(3, Some(10), false),
            port(4, Some(11), true),
            port(5, None, true),
        ];
        let entry = |bridge, port, last| FdbEntry {
            bridge,
            port,
            mac: [2, 0, 0, 0, 0, last],
        };
        let fdb = [
            entry(10, 2, 1),
            // Not a veth (a NIC, a VXLAN device): no namespace to send into.
            entry(10, 3, 2),
            entry(11, 4, 3),
            // A port listed under a bridge it is no longer a port of.
            entry(11, 2, 4),
            entry(10, 5, 5),
        ];
        assert_eq!(
            veth_ports(&links, &fdb),
            [((10, [2, 0, 0, 0, 0, 1]), 2), ((11, [2, 0, 0, 0, 0, 3]), 4)].into()
        );
    }

    #[test]
    fn the_macs_of_attached_interfaces_and_their_masters_are_the_nodes() {
        let link = |index, name: &str, master, last: Option<u8>| Link {
            index,
            name: name.to_owned(),
            master,
            mac: last.map(|last| [2, 0, 0, 0, 0, last]),
            mtu: Some(1500),
            veth: false,
        };
        let links = [
            link(1, "lo", None, Some(0)),
            link(2, "eth0", Some(3), Some(1)),
            link(3, "br0", None, Some(2)),
            link(4, "veth9", Some(5), Some(3)),
            link(5, "docker0", None, Some(4)),
            link(6, "eth1", None, Some(5)),
            link(7, "tun0", None, None),
        ];
        let macs = macs_of(&links, &["eth0", "eth1", "tun0"]);
        let mac = |last| [2, 0, 0, 0, 0, last];
        assert_eq!(macs, BTreeSet::from([mac(1), mac(2), mac(5)]));
    }

    #[test]
    fn neighbour_entries_are_classified_by_flag_and_state() {
        let names = BTreeMap::from([(4, "v0".to_owned())]);
        let entry = |addr: &str, state, managed| Neighbour {
            addr: addr.parse().unwrap(),
            ifindex: 4,
            state,
            managed,
        };
        let entries = [
            entry("192.168.77.10", NeighbourState::Permanent, false),
            entry("192.168.77.11", NeighbourState::Noarp, false),
            entry("192.168.77.2", NeighbourState::Reachable, true),
            entry("192.168.77.9", NeighbourState::Incomplete, true),
            entry("192.168.77.3", NeighbourState::Stale, false),
            Neighbour {
                ifindex: 9, // an interface gone since the links were listed
                ..entry("192.168.77.4", NeighbourState::Stale, false)
            },
        ];
        let kernel = classify(&entries, &names);
        assert_eq!(kernel[&hop("192.168.77.10", "v0")], Kernel::Static);
        assert_eq!(kernel[&hop("192.168.77.11", "v0")], Kernel::Static);
        assert_eq!(kernel[&hop("192.168.77.2", "v0")], Kernel::Managed);
        assert_eq!(kernel[&hop("192.168.77.9", "v0")], Kernel::Managed);
        assert_eq!(kernel[&hop("192.168.77.3", "v0")], Kernel::Learned);
        assert_eq!(kernel.len(), 5);
    }

    #[test]
    fn the_plan_adds_missing_entries_and_deletes_only_its_own() {
        let set = |hops: &[NextHop]| hops.iter().cloned().collect::<BTreeSet<_>>();
        let (a, b, c, d, e, f) = (
            hop("10.1.0.1", "v0"),
            hop("10.1.0.2", "v0"),
            hop("10.1.0.3", "v0"),
            hop("10.1.0.4", "v0"),
            hop("10.1.0.5", "v0"),
            hop("10.1.0.6", "v0"),
        );
        let kernel = BTreeMap::from([
            (a.clone(), Kernel::Learned), // wanted, learned: made managed
            (b.clone(), Kernel::Managed), // wanted, ours already
            (c.clone(), Kernel::Static),  // wanted, the administrator's
            (d.clone(), Kernel::Managed), // ours, no longer wanted
            (e.clone(), Kernel::Managed), // wanted, someone else's managed entry
        ]);
        // f: ours, no longer wanted, already gone.
        let plan = plan(
            &set(&[a.clone(), b.clone(), c, e, hop("10.1.0.7", "v1")]),
            &set(&[b, d.clone(), f.clone()]),
            &kernel,
        );
        assert_eq!(plan.add, [a, hop("10.1.0.7", "v1")]);
        assert_eq!(plan.delete, [d]);
        assert_eq!(plan.forget, [f]);
    }

    #[test]
    fn an_entry_made_static_by_someone_else_is_forgotten_not_touched() {
        let a = hop("10.1.0.1", "v0");
        let set = BTreeSet::from([a.clone()]);
        let plan = plan(&set, &set, &BTreeMap::from([(a.clone(), Kernel::Static)]));
        assert_eq!(plan.forget, [a]);
        assert!(plan.add.is_empty() && plan.delete.is_empty());
    }
}
