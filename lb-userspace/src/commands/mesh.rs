//! The mesh's nodes and settings: `node add/rm/ls`, `mesh set/show`.
use super::*;

/// Adding a node that is already there with the same IP succeeds; it still applies the table,
/// which heals an earlier interrupted command.
pub fn node_add(instance: &Instance, name: &str, ip: IpAddr) -> Result<String> {
    static_nodes_only(&state::load(&instance.state_dir)?)?;
    let (state, added) = change_table(instance, |table| table.add_node(name, ip))?;
    let this = if state.self_node()?.is_some_and(|n| n.name == name) {
        ", this node"
    } else {
        ""
    };
    Ok(if added {
        format!("node {name} added (underlay IP {ip}{this})")
    } else {
        format!("node {name} already has underlay IP {ip}{this}; nothing changed")
    })
}

pub fn node_rm(instance: &Instance, name: &str) -> Result<String> {
    static_nodes_only(&state::load(&instance.state_dir)?)?;
    let (_, removed) = change_table(instance, |table| table.remove_node(name))?;
    Ok(format!("node {name} ({}) removed", removed.ip))
}

pub fn node_ls(instance: &Instance, as_json: bool) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = state::load(&instance.state_dir)?;
    let self_name = state.self_node()?.map(|n| n.name.as_str());
    if as_json {
        let nodes: Vec<serde_json::Value> = state
            .table
            .nodes
            .iter()
            .map(|node| {
                json!({
                    "name": node.name,
                    "underlay_ip": node.ip.to_string(),
                    "self": Some(node.name.as_str()) == self_name,
                    "services": state.table.services_on_node(&node.name),
                })
            })
            .collect();
        let doc = json!({
            "instance": instance.name,
            "self": self_name,
            "nodes": nodes,
        });
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    if state.table.nodes.is_empty() {
        return Ok("no nodes".to_owned());
    }
    let width = state
        .table
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(0);
    let ip_width = state
        .table
        .nodes
        .iter()
        .map(|n| n.ip.to_string().len())
        .max()
        .unwrap_or(0)
        .max(15);
    let mut out = String::new();
    for node in &state.table.nodes {
        let services = state.table.services_on_node(&node.name);
        let line = format!(
            "{:<width$}  {:<ip_width$}  {:<4}  {}",
            node.name,
            node.ip.to_string(),
            if Some(node.name.as_str()) == self_name {
                "self"
            } else {
                ""
            },
            if services.is_empty() {
                String::new()
            } else {
                format!("backends of {}", services.join(", "))
            }
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out.trim_end().to_owned())
}

pub fn mesh_set(instance: &Instance, vni: Option<u32>, vxlan_port: Option<u16>) -> Result<String> {
    let (state, ()) = change_table(instance, |table| table.set_mesh(vni, vxlan_port))?;
    Ok(format!(
        "mesh: VNI {}, VXLAN UDP port {} (every node of the mesh must use the same)",
        state.table.vni, state.table.vxlan_port
    ))
}

/// The smallest MTU of an IPv6 link (RFC 8200 5).
const MIN_IPV6_MTU: u32 = 1280;

/// What the mesh's MTUs follow from: the bytes encapsulation adds on its underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshMtu {
    /// Whether the underlay is IPv6 (every node's address is; one family per mesh).
    pub ipv6_underlay: bool,
}

impl MeshMtu {
    pub fn of(table: &Table) -> MeshMtu {
        MeshMtu {
            ipv6_underlay: table.nodes.iter().any(|n| n.ip.is_ipv6()),
        }
    }

    /// Outer IP, UDP, VXLAN and inner Ethernet headers: 50 bytes over IPv4, 70 over IPv6.
    pub fn overhead(self) -> u32 {
        if self.ipv6_underlay {
            VXLAN6_OVERHEAD
        } else {
            VXLAN_OVERHEAD
        }
    }

    /// The largest inner IP packet a path of `mtu` carries.
    pub fn overlay(self, mtu: u32) -> u32 {
        mtu.saturating_sub(self.overhead())
    }

    /// The largest TCP MSS of an IPv4 connection through it (20 bytes of IPv4 and 20 of TCP).
    pub fn mss(self, mtu: u32) -> u32 {
        self.overlay(mtu).saturating_sub(40)
    }

    /// The same for IPv6 (40 bytes of IPv6 header).
    pub fn mss6(self, mtu: u32) -> u32 {
        self.overlay(mtu).saturating_sub(60)
    }
}

pub fn mesh_show(instance: &Instance, as_json: bool) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = state::load(&instance.state_dir)?;
    let this = state.self_node()?;
    // The overlay's MTU follows from each underlay interface's: encapsulation adds
    // VXLAN_OVERHEAD bytes (VXLAN6_OVERHEAD over IPv6), and the data plane drops (never
    // fragments) what would not fit.
    let sizes = MeshMtu::of(&state.table);
    let interfaces: Vec<(&str, Option<u32>)> = state
        .attachments
        .iter()
        .map(|a| (a.iface.as_str(), underlay::mtu(&a.iface).ok()))
        .collect();
    // Each other node's path, as the data plane's FIB lookups see it: its MTU bounds what is
    // encapsulated to that node and the MSS of connections through it.
    let paths: Vec<(&Node, Option<u32>)> = state
        .table
        .nodes
        .iter()
        .filter(|node| this.is_none_or(|me| me.name != node.name))
        .map(|node| (node, underlay::path_mtu(node.ip).ok().flatten()))
        .collect();
    let overlay = |mtu: u32| sizes.overlay(mtu);
    let mss = |mtu: u32| sizes.mss(mtu);
    // An IPv6 packet crosses the same underlay with the same overhead; its MSS leaves out 20
    // more bytes of header. IPv6 needs links of 1280 bytes at least (RFC 8200).
    let mss6 = |mtu: u32| sizes.mss6(mtu);
    let ipv6_note = |mtu: u32| {
        if overlay(mtu) < MIN_IPV6_MTU {
            format!(" (below IPv6's minimum of {MIN_IPV6_MTU}: large IPv6 packets are dropped)")
        } else {
            String::new()
        }
    };
    if as_json {
        let doc = json!({
            "instance": instance.name,
            "vni": state.table.vni,
            "vxlan_port": state.table.vxlan_port,
            "self": this.map(|n| json!({"name": n.name, "underlay_ip": n.ip.to_string()})),
            "nodes": state.table.nodes.len(),
            "underlay": if sizes.ipv6_underlay { "ipv6" } else { "ipv4" },
            "vxlan_overhead": sizes.overhead(),
            "interfaces": interfaces
                .iter()
                .map(|(iface, mtu)| json!({
                    "iface": iface,
                    "mtu": mtu,
                    "overlay_mtu": mtu.map(overlay),
                }))
                .collect::<Vec<_>>(),
            "paths": paths
                .iter()
                .map(|(node, mtu)| json!({
                    "node": node.name,
                    "underlay_ip": node.ip.to_string(),
                    "mtu": mtu,
                    "overlay_mtu": mtu.map(overlay),
                    "tcp_mss": mtu.map(mss),
                    "tcp_mss6": mtu.map(mss6),
                }))
                .collect::<Vec<_>>(),
        });
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    let mut out = format!(
        "VNI {}, VXLAN UDP port {}; {} node(s)\n",
        state.table.vni,
        state.table.vxlan_port,
        state.table.nodes.len()
    );
    match this {
        Some(node) => out.push_str(&format!("this node: {} ({})\n", node.name, node.ip)),
        None => out.push_str(&format!(
            "this node: none (no address of network namespace '{}' is a node's underlay IP): \
             nothing is encapsulated or decapsulated\n",
            instance.name
        )),
    }
    if sizes.ipv6_underlay {
        out.push_str(&format!(
            "IPv6 underlay: overlay MTU = path MTU to the other node - {} (outer IPv6, UDP, VXLAN \
             and inner Ethernet headers); TCP connections through it fit an MSS of the path MTU \
             - {} (IPv6: - {}); a client's larger packet is answered with ICMP fragmentation \
             needed (IPv4 with DF) or ICMPv6 packet too big (frag_needed_sent), else dropped \
             (drop_encap_mtu)\n",
            sizes.overhead(),
            sizes.overhead() + 40,
            sizes.overhead() + 60
        ));
    } else {
        out.push_str(&format!(
            "overlay MTU = path MTU to the other node - {VXLAN_OVERHEAD} (VXLAN headers); the MSS \
             of TCP connections through it is clamped to the path MTU - {}; a larger packet with \
             DF is answered with ICMP fragmentation needed (frag_needed_sent), one without DF is \
             dropped (drop_encap_mtu); IPv6 crosses the same IPv4 underlay, its MSS clamped to the \
             path MTU - {}, a client's larger IPv6 packet answered with ICMPv6 packet too big \
             (frag_needed_sent)\n",
            VXLAN_OVERHEAD + 40,
            VXLAN_OVERHEAD + 60
        ));
    }
    for (iface, mtu) in &interfaces {
        match mtu {
            Some(mtu) => out.push_str(&format!(
                "  {iface}: MTU {mtu}, overlay MTU {}\n",
                overlay(*mtu)
            )),
            None => out.push_str(&format!("  {iface}: MTU unknown (interface missing)\n")),
        }
    }
    for (node, mtu) in &paths {
        match mtu {
            Some(mtu) => out.push_str(&format!(
                "  to {} ({}): path MTU {mtu}, overlay MTU {}{}, TCP MSS at most {} (IPv6 {})\n",
                node.name,
                node.ip,
                overlay(*mtu),
                ipv6_note(*mtu),
                mss(*mtu),
                mss6(*mtu)
            )),
            None => out.push_str(&format!(
                "  to {} ({}): no route (its packets are dropped: drop_encap_no_route)\n",
                node.name, node.ip
            )),
        }
    }
    Ok(out.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_and_mss_follow_the_underlays_overhead() {
        let mut table = Table::default();
        let v4 = MeshMtu::of(&table);
        assert_eq!((v4.overhead(), v4.overlay(1500)), (50, 1450));
        assert_eq!((v4.mss(1500), v4.mss6(1500)), (1410, 1390));
        table
            .add_node("n1", "2001:db8::1".parse().unwrap())
            .unwrap();
        let v6 = MeshMtu::of(&table);
        assert!(v6.ipv6_underlay);
        assert_eq!((v6.overhead(), v6.overlay(1400)), (70, 1330));
        assert_eq!((v6.mss(1400), v6.mss6(1400)), (1290, 1270));
        assert_eq!(v6.overlay(1349), 1279, "below IPv6's 1280");
        assert_eq!(v6.mss(60), 0, "never below zero");
    }
}
