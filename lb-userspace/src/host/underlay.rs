//! The underlay network as the instance's namespace sees it: its own addresses (which node of
//! the mesh this is), the next hop towards each other node, and the managed neighbour entries
//! lbctl keeps for those next hops.
//!
//! XDP cannot resolve ARP: an encapsulated packet whose next hop has no resolved neighbour entry
//! is dropped (`drop_encap_no_neigh`). A *managed* entry (`ip neigh replace ADDR dev DEV
//! managed`, kernel 5.16+) is one the kernel keeps resolved by itself, probing again whenever it
//! goes stale and retrying until the peer answers, so the data plane finds it ready.
//!
//! Everything runs in the namespace lbctl has entered with `setns`: `getifaddrs` opens its
//! netlink socket there, and the `ip` commands spawned inherit the namespace. Route lookups and
//! neighbour changes go through one `ip -batch` each, whatever the number of nodes: a process
//! per node would cost seconds per command on a large mesh.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::table::Node;

/// The IPv4 addresses assigned to the namespace's interfaces (up or down).
pub fn local_addrs() -> Result<BTreeSet<Ipv4Addr>> {
    Ok(interface_addrs()?.into_iter().map(|a| a.addr).collect())
}

/// The MAC addresses a frame arriving on one of the `attached` interfaces may carry to be this
/// node's: the interface's own, and its master's (a bridge it is a port of) (`ip -j link
/// show`). Only these: a Docker host has a veth per container, and the map is bounded.
pub fn attached_macs(attached: &[&str]) -> Result<BTreeSet<[u8; 6]>> {
    let json = ip(&["-j", "link", "show"]).map_err(anyhow::Error::msg)?;
    parse_attached_macs(&json, attached)
}

fn parse_attached_macs(json: &str, attached: &[&str]) -> Result<BTreeSet<[u8; 6]>> {
    let links: Vec<serde_json::Value> =
        serde_json::from_str(json).context("unexpected `ip -j link show` output")?;
    let field = |link: &serde_json::Value, name: &str| {
        link.get(name).and_then(|v| v.as_str()).map(str::to_owned)
    };
    let masters: BTreeSet<String> = links
        .iter()
        .filter(|l| field(l, "ifname").is_some_and(|n| attached.contains(&n.as_str())))
        .filter_map(|l| field(l, "master"))
        .collect();
    let mut macs = BTreeSet::new();
    for link in &links {
        let Some(name) = field(link, "ifname") else {
            continue;
        };
        if !attached.contains(&name.as_str()) && !masters.contains(&name) {
            continue;
        }
        let Some(address) = field(link, "address") else {
            continue;
        };
        let octets: Vec<u8> = address
            .split(':')
            .map(|o| u8::from_str_radix(o, 16))
            .collect::<Result<_, _>>()
            .with_context(|| format!("unexpected address {address:?} of {name}"))?;
        if let Ok(mac) = <[u8; 6]>::try_from(octets) {
            macs.insert(mac);
        }
    }
    Ok(macs)
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

/// The subnets of the namespace's interfaces other than loopback: where a client and a backend
/// may reach each other over a link without this node.
pub fn local_subnets() -> Result<BTreeSet<Subnet>> {
    Ok(interface_addrs()?
        .into_iter()
        .filter(|a| !a.loopback)
        .filter_map(|a| Subnet::of(a.addr, a.netmask?))
        .collect())
}

/// The MTU of an interface of the namespace (`ip -j link show`).
pub fn mtu(iface: &str) -> Result<u32, String> {
    let json = ip(&["-j", "link", "show", "dev", iface])?;
    let links: serde_json::Value = serde_json::from_str(&json)
        .map_err(|err| format!("unexpected `ip link show` output: {err}"))?;
    links
        .get(0)
        .and_then(|link| link.get("mtu"))
        .and_then(|mtu| mtu.as_u64())
        .and_then(|mtu| u32::try_from(mtu).ok())
        .ok_or_else(|| format!("`ip link show dev {iface}` gives no MTU"))
}

/// A neighbour entry: the next hop towards a node (the node itself when on-link, else the
/// route's gateway) on the interface the route leaves by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NextHop {
    pub addr: Ipv4Addr,
    pub dev: String,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} dev {}", self.addr, self.dev)
    }
}

/// Runs `ip ARGS` and returns its stdout, or its stderr as a one-line error.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| format!("cannot run `ip {}`: {err}", args.join(" ")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            one_line(&stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// iproute2's error text without its netlink prefix, on one line.
fn one_line(stderr: &str) -> String {
    let text: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim().trim_start_matches("RTNETLINK answers: "))
        .filter(|l| !l.is_empty())
        .collect();
    if text.is_empty() {
        "no message".to_owned()
    } else {
        text.join("; ")
    }
}

/// Runs `ip GLOBAL -force -batch -` on `commands` (one `ip` command line each). Returns the
/// output, and the error of each command that failed by its index: `-force` goes on after a
/// failure and reports it as `Command failed -:LINE` after the error text.
fn ip_batch(
    global: &[&str],
    commands: &[String],
) -> Result<(String, BTreeMap<usize, String>), String> {
    if commands.is_empty() {
        return Ok((String::new(), BTreeMap::new()));
    }
    let mut child = Command::new("ip")
        .args(global)
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run `ip -batch`: {err}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = commands.join("\n") + "\n";
    // Written from a thread: `ip` answers as it reads, and a large answer would fill the
    // output pipe while lbctl still writes.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|err| format!("running `ip -batch`: {err}"))?;
    writer
        .join()
        .expect("the writer does not panic")
        .map_err(|err| format!("writing to `ip -batch`: {err}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors = batch_errors(&stderr);
    if !out.status.success() && errors.is_empty() {
        // Failed before running any command (an option this iproute2 lacks, ...).
        return Err(format!("`ip -batch` failed: {}", one_line(&stderr)));
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), errors))
}

/// The errors of an `ip -force -batch` run by the index of their command: each is the text
/// printed since the previous failure, followed by `Command failed -:LINE`.
fn batch_errors(stderr: &str) -> BTreeMap<usize, String> {
    let mut errors = BTreeMap::new();
    let mut text = String::new();
    for line in stderr.lines() {
        match line
            .strip_prefix("Command failed -:")
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            Some(number) => {
                errors.insert(number.saturating_sub(1), one_line(&text));
                text.clear();
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    errors
}

/// The next hop towards each address, by the kernel's own routing decision (`ip route get`),
/// or why there is none.
pub fn next_hops(dsts: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, Result<NextHop, String>>, String> {
    let commands: Vec<String> = dsts.iter().map(|ip| format!("route get {ip}")).collect();
    let (out, errors) = ip_batch(&["-4", "-j"], &commands)?;
    let mut hops = BTreeMap::new();
    for answer in serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>() {
        let answer = answer.map_err(|err| format!("unexpected `ip route get` output: {err}"))?;
        let Some(route) = answer.get(0) else { continue };
        let dst = route
            .get("dst")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| format!("unexpected `ip route get` output: {route}"))?;
        hops.insert(dst, parse_route(route, dst));
    }
    for (index, dst) in dsts.iter().enumerate() {
        if !hops.contains_key(dst) {
            let why = errors.get(&index).map_or("no answer", String::as_str);
            hops.insert(*dst, Err(format!("`ip route get {dst}`: {why}")));
        }
    }
    Ok(hops)
}

/// The next hop a route (an object of `ip -j route get`) leads to.
fn parse_route(route: &serde_json::Value, dst: Ipv4Addr) -> Result<NextHop, String> {
    match route.get("type").and_then(|t| t.as_str()) {
        None | Some("unicast") => {}
        Some("local") => return Err(format!("{dst} is an address of this namespace")),
        Some(other) => return Err(format!("the route to {dst} is of type {other}")),
    }
    let dev = route
        .get("dev")
        .and_then(|d| d.as_str())
        .ok_or_else(|| format!("the route to {dst} names no interface"))?;
    let addr = match route.get("gateway").and_then(|g| g.as_str()) {
        Some(gateway) => gateway
            .parse()
            .map_err(|_| format!("the route to {dst} has gateway '{gateway}', not IPv4"))?,
        None => dst,
    };
    Ok(NextHop {
        addr,
        dev: dev.to_owned(),
    })
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

/// The kernel's IPv4 neighbour entries (`ip -j neigh show`).
pub fn neighbours() -> Result<BTreeMap<NextHop, Kernel>, String> {
    parse_neighbours(&ip(&["-4", "-j", "neigh", "show"])?)
}

fn parse_neighbours(json: &str) -> Result<BTreeMap<NextHop, Kernel>, String> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(json)
        .map_err(|err| format!("unexpected `ip neigh show` output: {err}"))?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let (Some(addr), Some(dev)) = (
            entry.get("dst").and_then(|d| d.as_str()),
            entry.get("dev").and_then(|d| d.as_str()),
        ) else {
            continue;
        };
        let Ok(addr) = addr.parse() else { continue };
        let states: Vec<&str> = entry
            .get("state")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        // iproute2 prints the flag as a key with a null value: `"managed": null`.
        let kind = if entry.get("managed").is_some() {
            Kernel::Managed
        } else if states.iter().any(|s| matches!(*s, "PERMANENT" | "NOARP")) {
            Kernel::Static
        } else {
            Kernel::Learned
        };
        out.insert(
            NextHop {
                addr,
                dev: dev.to_owned(),
            },
            kind,
        );
    }
    Ok(out)
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

/// Runs one neighbour command per hop; returns the hops it failed for, with why.
fn neigh_batch(verb: &str, hops: &[NextHop], extra: &str) -> Vec<(NextHop, String)> {
    let commands: Vec<String> = hops
        .iter()
        .map(|hop| format!("neigh {verb} {} dev {}{extra}", hop.addr, hop.dev))
        .collect();
    match ip_batch(&[], &commands) {
        Ok((_, errors)) => errors
            .into_iter()
            .filter_map(|(index, err)| hops.get(index).map(|hop| (hop.clone(), err)))
            .collect(),
        Err(err) => hops.iter().map(|hop| (hop.clone(), err.clone())).collect(),
    }
}

/// Makes (or turns) the entries for `hops` managed; returns the failures. `replace` turns an
/// existing learned entry, even a REACHABLE one, into a managed one and keeps its address
/// (checked with iproute2 6.1 on kernel 6.18).
pub fn add_managed(hops: &[NextHop]) -> Vec<(NextHop, String)> {
    neigh_batch("replace", hops, " managed")
}

/// Deletes the entries for `hops`; returns the failures.
pub fn delete(hops: &[NextHop]) -> Vec<(NextHop, String)> {
    neigh_batch("del", hops, "")
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
    backends: &BTreeSet<Ipv4Addr>,
    attached: &[&str],
    recorded: &[NextHop],
) -> (Vec<NextHop>, Vec<String>) {
    let mut warnings = Vec::new();
    if nodes.is_empty() && backends.is_empty() && recorded.is_empty() {
        return (Vec::new(), warnings);
    }
    let mut record: BTreeSet<NextHop> = recorded.iter().cloned().collect();
    let dsts: BTreeSet<Ipv4Addr> = nodes
        .iter()
        .map(|n| n.ip)
        .chain(backends.iter().copied())
        .collect();
    let listed =
        next_hops(&dsts.into_iter().collect::<Vec<_>>()).and_then(|hops| Ok((hops, neighbours()?)));
    let (hops, kernel) = match listed {
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
    let failed = add_managed(&plan.add);
    for hop in &plan.add {
        if !failed.iter().any(|(f, _)| f == hop) {
            record.insert(hop.clone());
        }
    }
    for (hop, err) in failed {
        warnings.push(format!("cannot add a managed neighbour {hop}: {err}"));
    }
    let failed = delete(&plan.delete);
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
    let kernel = match neighbours() {
        Ok(kernel) => kernel,
        Err(err) => return vec![format!("cannot list neighbour entries: {err}")],
    };
    let ours: Vec<NextHop> = recorded
        .iter()
        .filter(|hop| kernel.get(*hop) == Some(&Kernel::Managed))
        .cloned()
        .collect();
    delete(&ours)
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
    fn the_next_hop_is_the_gateway_or_the_node_itself() {
        let dst: Ipv4Addr = "172.30.5.5".parse().unwrap();
        let route = |json: &str| parse_route(&serde_json::from_str(json).unwrap(), dst);
        // Output of iproute2 6.1.
        let via = r#"{"dst":"172.30.5.5","gateway":"192.168.77.2","dev":"v0","prefsrc":"192.168.77.1","flags":[],"uid":0,"cache":[]}"#;
        assert_eq!(route(via), Ok(hop("192.168.77.2", "v0")));
        let on_link = r#"{"dst":"172.30.5.5","dev":"eth1","prefsrc":"172.30.0.1","flags":[],"uid":0,"cache":[]}"#;
        assert_eq!(route(on_link), Ok(hop("172.30.5.5", "eth1")));
        let local = r#"{"type":"local","dst":"172.30.5.5","dev":"lo","prefsrc":"172.30.5.5","flags":[],"uid":0,"cache":["local"]}"#;
        assert!(
            route(local)
                .unwrap_err()
                .contains("address of this namespace")
        );
        assert!(
            route(r#"{"dst":"172.30.5.5"}"#)
                .unwrap_err()
                .contains("no interface")
        );
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
    fn the_macs_of_attached_interfaces_and_their_masters_are_the_nodes() {
        let json = r#"[
            {"ifindex":1,"ifname":"lo","address":"00:00:00:00:00:00"},
            {"ifindex":2,"ifname":"eth0","master":"br0","address":"02:00:00:00:00:01"},
            {"ifindex":3,"ifname":"br0","address":"02:00:00:00:00:02"},
            {"ifindex":4,"ifname":"veth9","master":"docker0","address":"02:00:00:00:00:03"},
            {"ifindex":5,"ifname":"docker0","address":"02:00:00:00:00:04"},
            {"ifindex":6,"ifname":"eth1","address":"02:00:00:00:00:05"}
        ]"#;
        let macs = parse_attached_macs(json, &["eth0", "eth1"]).unwrap();
        let mac = |last| [2, 0, 0, 0, 0, last];
        assert_eq!(macs, BTreeSet::from([mac(1), mac(2), mac(5)]));
        assert!(parse_attached_macs("[", &["eth0"]).is_err());
    }

    #[test]
    fn batch_errors_are_matched_to_their_commands() {
        // `ip -force -batch -` of iproute2 6.1, commands 2 and 4 failing.
        let stderr = "RTNETLINK answers: Network is unreachable\nCommand failed -:2\n\
                      Cannot find device \"nosuch\"\nCommand failed -:4\n";
        assert_eq!(
            batch_errors(stderr),
            BTreeMap::from([
                (1, "Network is unreachable".to_owned()),
                (3, "Cannot find device \"nosuch\"".to_owned()),
            ])
        );
        assert!(batch_errors("").is_empty());
    }

    #[test]
    fn neighbour_entries_are_classified_by_flag_and_state() {
        // Output of iproute2 6.1.
        let json = r#"[{"dst":"192.168.77.10","dev":"v0","lladdr":"02:00:00:00:00:10","state":["PERMANENT"]},
            {"dst":"192.168.77.2","dev":"v0","lladdr":"0e:ec:a8:e0:9a:1e","managed":null,"state":["REACHABLE"]},
            {"dst":"192.168.77.9","dev":"v0","managed":null,"state":["INCOMPLETE"]},
            {"dst":"192.168.77.3","dev":"v0","lladdr":"0e:ec:a8:e0:9a:1f","state":["STALE"]}]"#;
        let kernel = parse_neighbours(json).unwrap();
        assert_eq!(kernel[&hop("192.168.77.10", "v0")], Kernel::Static);
        assert_eq!(kernel[&hop("192.168.77.2", "v0")], Kernel::Managed);
        assert_eq!(kernel[&hop("192.168.77.9", "v0")], Kernel::Managed);
        assert_eq!(kernel[&hop("192.168.77.3", "v0")], Kernel::Learned);
        assert!(parse_neighbours("[]").unwrap().is_empty());
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
