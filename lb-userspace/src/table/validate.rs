//! The checks a whole table passes (a state file or a merged cluster table), the same as those
//! each command's change passes one at a time.
use super::*;

impl Table {
    /// Checks a table read from a file: what every edit above keeps true. Names plain and
    /// unique; ids in range and unique (they index the data plane's arrays); one service per
    /// frontend; backend addresses a backend can have, once per service, on known nodes; nodes
    /// unique by name, address and key, of one family; mesh settings and health checks in range.
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.len() > MAX_NODES as usize {
            return Err(format!("{} nodes, at most {MAX_NODES}", self.nodes.len()));
        }
        let mut node_names = BTreeSet::new();
        let mut node_ips = BTreeSet::new();
        let mut node_keys = BTreeMap::new();
        for node in &self.nodes {
            validate_name("node", &node.name)?;
            parse_node_ip(&node.ip.to_string())?;
            if !node_names.insert(node.name.as_str()) {
                return Err(format!("node '{}' is listed twice", node.name));
            }
            if !node_ips.insert(node.ip) {
                return Err(format!("underlay IP {} belongs to two nodes", node.ip));
            }
            // One family, keys unique: what `add_node` checks, in one pass over the nodes.
            let first = &self.nodes[0];
            if first.ip.is_ipv4() != node.ip.is_ipv4() {
                return Err(format!(
                    "nodes '{}' ({}) and '{}' ({}) have underlay addresses of two families",
                    first.name, first.ip, node.name, node.ip
                ));
            }
            if let Some(other) = node_keys.insert(node.key(), node) {
                return Err(format!(
                    "nodes '{}' ({}) and '{}' ({}) have the same node key {}",
                    other.name,
                    other.ip,
                    node.name,
                    node.ip,
                    show_node_key(node.key())
                ));
            }
        }
        if self.vni > MAX_VNI || self.vxlan_port == 0 {
            return Err(format!(
                "invalid mesh settings: VNI {} (at most {MAX_VNI}), VXLAN port {} (not 0)",
                self.vni, self.vxlan_port
            ));
        }
        if self.services.len() > MAX_SERVICES as usize {
            return Err(format!(
                "{} services, at most {MAX_SERVICES}",
                self.services.len()
            ));
        }
        let mut service_names = BTreeSet::new();
        let mut service_ids = BTreeSet::new();
        let mut frontends = BTreeSet::new();
        let mut backend_ids = BTreeSet::new();
        for service in &self.services {
            let name = &service.name;
            validate_name("service", name)?;
            if !service_names.insert(name.as_str()) {
                return Err(format!("service '{name}' is listed twice"));
            }
            if service.id >= MAX_SERVICES || !service_ids.insert(service.id) {
                return Err(format!(
                    "service '{name}' has id {}, out of range or taken",
                    service.id
                ));
            }
            parse_port(&service.port.to_string())
                .map_err(|err| format!("service '{name}': {err}"))?;
            if let Some(vip) = service.vip {
                parse_vip(&vip.to_string()).map_err(|err| format!("service '{name}': {err}"))?;
            }
            if !frontends.insert((service.proto, service.port, service.vip)) {
                return Err(format!("{} is published twice", service.frontend()));
            }
            service
                .health_check
                .validate()
                .map_err(|err| format!("service '{name}': {err}"))?;
            let specs: Vec<BackendSpec> = service
                .backends
                .iter()
                .map(|b| BackendSpec {
                    addr: b.addr,
                    node: b.node.clone(),
                    weight: b.weight,
                })
                .collect();
            check_backend_list(name, service.vip, &[], &specs)?;
            self.check_nodes_known(&specs)?;
            for backend in &service.backends {
                parse_backend(&backend.addr.to_string())?;
                if backend.id >= MAX_BACKENDS || !backend_ids.insert(backend.id) {
                    return Err(format!(
                        "backend {backend} of service '{name}' has id {}, out of range or taken",
                        backend.id
                    ));
                }
            }
        }
        Ok(())
    }
}
