//! The table's nodes and mesh settings: adding and removing nodes (never one that still hosts
//! backends), finding this node by its addresses, the VNI and VXLAN port.
use super::*;

impl Table {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Adds a node. Adding a node that exists with the same address changes nothing and
    /// succeeds (the same `node add` lines are run on every node, and again after changes):
    /// returns whether the table changed.
    pub fn add_node(&mut self, name: &str, ip: IpAddr) -> Result<bool, String> {
        validate_name("node", name)?;
        if let Some(node) = self.node(name) {
            if node.ip == ip {
                return Ok(false);
            }
            return Err(format!(
                "node '{name}' already exists with underlay IP {}; `lbctl node rm {name}` first \
                 to change it",
                node.ip
            ));
        }
        if let Some(other) = self.nodes.iter().find(|n| n.ip == ip) {
            return Err(format!(
                "underlay IP {ip} already belongs to node '{}'",
                other.name
            ));
        }
        self.check_node_fits(name, ip)?;
        if self.nodes.len() >= MAX_NODES as usize {
            return Err(format!(
                "cannot add node '{name}': the mesh holds {MAX_NODES} nodes already"
            ));
        }
        self.nodes.push(Node {
            name: name.to_owned(),
            ip,
        });
        self.generation += 1;
        Ok(true)
    }

    /// Whether node `name` at `ip` can join the table's other nodes: an underlay address of the
    /// same family as theirs (the data plane speaks one per mesh), and, for IPv6, a key
    /// ([`node_key`]) no other node has: the data plane could not tell the two apart.
    pub(super) fn check_node_fits(&self, name: &str, ip: IpAddr) -> Result<(), String> {
        let others = || self.nodes.iter().filter(|n| n.name != name);
        if let Some(other) = others().find(|n| n.ip.is_ipv4() != ip.is_ipv4()) {
            return Err(format!(
                "cannot add node '{name}' ({ip}): the mesh's underlay is {} (node '{}' is {}), \
                 and all its nodes' addresses must be of one family",
                family_name(other.ip),
                other.name,
                other.ip
            ));
        }
        let key = node_key(ip);
        if let Some(other) = others().find(|n| n.key() == key && n.ip != ip) {
            return Err(format!(
                "cannot add node '{name}' ({ip}): its node key {} is node '{}''s ({}) too, \
                 and the data plane names a node by its key; give one of them another address",
                show_node_key(key),
                other.name,
                other.ip
            ));
        }
        Ok(())
    }

    /// Removes a node that hosts no backend: its backends' traffic would have nowhere to go.
    pub fn remove_node(&mut self, name: &str) -> Result<Node, String> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| format!("unknown node '{name}'"))?;
        let users = self.services_on_node(name);
        if !users.is_empty() {
            return Err(format!(
                "node '{name}' still hosts backends of {} {}: remove them first \
                 (`lbctl backend rm SERVICE IP:PORT@{name}`)",
                if users.len() == 1 {
                    "service"
                } else {
                    "services"
                },
                users.join(", ")
            ));
        }
        self.generation += 1;
        Ok(self.nodes.remove(index))
    }

    /// Names of the services with a backend on `node`, in table order.
    pub fn services_on_node(&self, node: &str) -> Vec<&str> {
        self.services
            .iter()
            .filter(|s| s.backends.iter().any(|b| b.node.as_deref() == Some(node)))
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The node this instance is: the first whose underlay address is one of `local_addrs`
    /// (the IPv4 and IPv6 addresses of the instance's network namespace). `None` when no node matches: the
    /// instance then encapsulates nothing.
    pub fn self_node(&self, local_addrs: &BTreeSet<IpAddr>) -> Option<&Node> {
        self.nodes.iter().find(|n| local_addrs.contains(&n.ip))
    }

    /// Changes the overlay's VNI and/or UDP port. At least one must be given.
    pub fn set_mesh(&mut self, vni: Option<u32>, vxlan_port: Option<u16>) -> Result<(), String> {
        if vni.is_none() && vxlan_port.is_none() {
            return Err("nothing to set: give --vni and/or --vxlan-port".to_owned());
        }
        if let Some(vni) = vni.filter(|vni| *vni > MAX_VNI) {
            return Err(format!(
                "invalid VNI '{vni}': must be between 0 and {MAX_VNI}"
            ));
        }
        if vxlan_port == Some(0) {
            return Err("invalid port '0': must be between 1 and 65535".to_owned());
        }
        self.vni = vni.unwrap_or(self.vni);
        self.vxlan_port = vxlan_port.unwrap_or(self.vxlan_port);
        self.generation += 1;
        Ok(())
    }

    /// Every backend argument names a node of the table (or none).
    pub(super) fn check_nodes_known(&self, backends: &[BackendSpec]) -> Result<(), String> {
        for node in backends.iter().filter_map(|b| b.node.as_deref()) {
            if self.node(node).is_none() {
                return Err(format!(
                    "unknown node '{node}': add it with `lbctl node add {node} <underlay-ip>`"
                ));
            }
        }
        Ok(())
    }
}
