//! The operator's model: services, backends, nodes and the mesh settings, with the checks every
//! change passes and the parsing of every value an operator types; the table file
//! (`lbctl apply`/`export`), the diff between two tables, and what Docker's labels and tasks
//! make of the table (`docker`). Used by every other folder; uses
//! none of them.
//!
//! The service table: what the operator asked for, validated. Pure logic, no I/O.
pub mod diff;
pub mod docker;
pub mod file;
mod nodes;
mod replace;
pub mod service;
mod validate;
pub mod values;

pub use service::*;
pub use values::*;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    DEFAULT_VNI, DEFAULT_VXLAN_PORT, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_NODES,
    MAX_SERVICES, MAX_VNI,
};
use serde::{Deserialize, Serialize};
/// Every service of one node, and the mesh it belongs to. `generation` counts applied changes:
/// the table's version. Fields added after the first release default, so older state files load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub generation: u64,
    pub services: Vec<Service>,
    /// Where the search for a free id starts, so that freed ids are not reused at once (a
    /// reused backend slot would carry the old backend's counters for a moment).
    #[serde(default)]
    pub next_service_id: u32,
    #[serde(default)]
    pub next_backend_id: u32,
    /// Every node of the mesh, this one included: the same list is given to every node, and
    /// each instance finds itself in it by its own addresses.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// VXLAN network identifier of the overlay (host byte order).
    #[serde(default = "default_vni")]
    pub vni: u32,
    /// UDP port of the overlay.
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
}

fn default_vni() -> u32 {
    DEFAULT_VNI
}

fn default_vxlan_port() -> u16 {
    DEFAULT_VXLAN_PORT
}

impl Default for Table {
    fn default() -> Self {
        Self {
            generation: 0,
            services: Vec::new(),
            next_service_id: 0,
            next_backend_id: 0,
            nodes: Vec::new(),
            vni: DEFAULT_VNI,
            vxlan_port: DEFAULT_VXLAN_PORT,
        }
    }
}

/// The table's service names, frontends and used ids, gathered once: checking and numbering a
/// batch of additions (`Table::apply`) then costs one pass over the table, not one per
/// addition (which made 10,000 additions quadratic).
struct TableIndex {
    names: HashSet<String>,
    frontends: HashMap<Frontend, String>,
    service_ids: BTreeSet<u32>,
    backend_ids: BTreeSet<u32>,
}

impl Table {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service, String> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("unknown service '{name}'"))
    }

    fn service_position(&self, name: &str) -> Result<usize, String> {
        self.services
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("unknown service '{name}'"))
    }

    fn index(&self) -> TableIndex {
        TableIndex {
            names: self.services.iter().map(|s| s.name.clone()).collect(),
            frontends: self
                .services
                .iter()
                .map(|s| (s.frontend_key(), s.name.clone()))
                .collect(),
            service_ids: self.services.iter().map(|s| s.id).collect(),
            backend_ids: self
                .services
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| b.id))
                .collect(),
        }
    }

    /// Adds a service. Nothing changes unless every check passes.
    pub fn add_service(
        &mut self,
        name: &str,
        proto: Proto,
        port: u16,
        vip: Option<IpAddr>,
        backends: &[impl Clone + Into<BackendSpec>],
    ) -> Result<(), String> {
        let mut index = self.index();
        self.add_service_indexed(&mut index, name, (proto, port, vip), &specs(backends))
    }

    fn add_service_indexed(
        &mut self,
        index: &mut TableIndex,
        name: &str,
        frontend: Frontend,
        backends: &[BackendSpec],
    ) -> Result<(), String> {
        let (proto, port, vip) = frontend;
        validate_name("service", name)?;
        if index.names.contains(name) {
            return Err(format!("service '{name}' already exists"));
        }
        if let Some(other) = index.frontends.get(&frontend) {
            return Err(format!(
                "port {proto}/{port}{} is already published by service '{other}'",
                vip.map(|v| format!(" on {v}")).unwrap_or_default(),
            ));
        }
        check_backend_list(name, vip, &[], backends)?;
        self.check_nodes_known(backends)?;
        if index.service_ids.len() >= MAX_SERVICES as usize {
            return Err(format!(
                "cannot add '{name}': the node holds {MAX_SERVICES} services already"
            ));
        }
        let id = next_free(self.next_service_id, MAX_SERVICES, &index.service_ids)
            .expect("service count was checked against MAX_SERVICES");
        let backends = self.allocate_backends(index, name, backends)?;
        index.names.insert(name.to_owned());
        index.frontends.insert(frontend, name.to_owned());
        index.service_ids.insert(id);
        self.services.push(Service {
            name: name.to_owned(),
            id,
            proto,
            port,
            vip,
            backends,
            health_check: HealthCheck::default(),
            scheduler: Scheduler::default(),
            origin: Origin::default(),
            defined_at: String::new(),
        });
        self.next_service_id = (id + 1) % MAX_SERVICES;
        self.generation += 1;
        Ok(())
    }

    pub fn remove_service(&mut self, name: &str) -> Result<Service, String> {
        let index = self.service_position(name)?;
        self.generation += 1;
        Ok(self.services.remove(index))
    }

    /// Appends backends to a service's round-robin order.
    pub fn add_backends(
        &mut self,
        name: &str,
        backends: &[impl Clone + Into<BackendSpec>],
    ) -> Result<(), String> {
        let position = self.service_position(name)?;
        let mut index = self.index();
        self.add_backends_indexed(&mut index, position, &specs(backends))
    }

    /// `add_backends` to the service at `position`.
    fn add_backends_indexed(
        &mut self,
        index: &mut TableIndex,
        position: usize,
        backends: &[BackendSpec],
    ) -> Result<(), String> {
        let service = &self.services[position];
        let name = service.name.clone();
        check_backend_list(&name, service.vip, &service.backends, backends)?;
        self.check_nodes_known(backends)?;
        let new = self.allocate_backends(index, &name, backends)?;
        self.services[position].backends.extend(new);
        self.generation += 1;
        Ok(())
    }

    /// Removes backends from a service. A backend is named by its `IP:PORT` whatever its node;
    /// an `@NODE` given with it must match the backend's node.
    pub fn remove_backends(
        &mut self,
        name: &str,
        backends: &[impl Clone + Into<BackendSpec>],
    ) -> Result<(), String> {
        let backends = specs(backends);
        let service = self.service_mut(name)?;
        let mut seen = BTreeSet::new();
        for spec in &backends {
            let addr = spec.addr;
            if !seen.insert(addr) {
                return Err(format!("backend {addr} is listed twice"));
            }
            service.named_backend(spec)?;
        }
        service.backends.retain(|b| !seen.contains(&b.addr));
        self.generation += 1;
        Ok(())
    }

    /// Drains (or undrains) a backend named by `IP:PORT` (an `@NODE` must match). Returns
    /// whether anything changed.
    pub fn set_drained(
        &mut self,
        name: &str,
        spec: impl Into<BackendSpec>,
        drained: bool,
    ) -> Result<bool, String> {
        self.update_backend(name, spec.into(), drained, |b| &mut b.drained)
    }

    /// Changes how a service's new flows choose their backend. Flows keep their backend either
    /// way. Returns whether anything changed.
    pub fn set_scheduler(&mut self, name: &str, scheduler: Scheduler) -> Result<bool, String> {
        let service = self.service_mut(name)?;
        if service.scheduler == scheduler {
            return Ok(false);
        }
        service.scheduler = scheduler;
        self.generation += 1;
        Ok(true)
    }

    /// Says who defines a service (see `Origin`), and for Docker's since when (see
    /// `Service::defined_at`). Returns whether anything changed.
    pub fn set_origin(
        &mut self,
        name: &str,
        origin: Origin,
        defined_at: &str,
    ) -> Result<bool, String> {
        let service = self.service_mut(name)?;
        if (service.origin, service.defined_at.as_str()) == (origin, defined_at) {
            return Ok(false);
        }
        service.origin = origin;
        service.defined_at = defined_at.to_owned();
        self.generation += 1;
        Ok(true)
    }

    /// Changes a backend's weight (named as in `set_drained`); its flows stay. Returns whether
    /// anything changed.
    pub fn set_weight(
        &mut self,
        name: &str,
        spec: impl Into<BackendSpec>,
        weight: u32,
    ) -> Result<bool, String> {
        parse_weight(&weight.to_string())?;
        self.update_backend(name, spec.into(), weight, |b| &mut b.weight)
    }

    /// Sets `field` of a backend named as in `set_drained` to `value`; returns whether it
    /// changed (the table's generation then grows by one).
    fn update_backend<T: PartialEq>(
        &mut self,
        name: &str,
        spec: BackendSpec,
        value: T,
        field: fn(&mut Backend) -> &mut T,
    ) -> Result<bool, String> {
        let service = self.service_mut(name)?;
        let index = service.named_backend(&spec)?;
        let current = field(&mut service.backends[index]);
        if *current == value {
            return Ok(false);
        }
        *current = value;
        self.generation += 1;
        Ok(true)
    }

    /// Changes a service's health-check settings; returns the new ones. Turning checks off
    /// forgets what they found (every backend is then unknown, hence eligible).
    pub fn update_health_check(
        &mut self,
        name: &str,
        update: &HealthUpdate,
    ) -> Result<HealthCheck, String> {
        let service = self.service_mut(name)?;
        let check = update.apply(&service.health_check);
        if service.set_health_check(&check)? {
            self.generation += 1;
        }
        Ok(check)
    }

    /// Records a backend's health, found by service name and backend id. Health is runtime
    /// state, not configuration: the table's generation does not change. Returns whether the
    /// state changed (false also when the backend is gone meanwhile).
    pub fn set_health(&mut self, name: &str, backend_id: u32, health: Health) -> bool {
        let Some(backend) = self
            .services
            .iter_mut()
            .find(|s| s.name == name)
            .and_then(|s| s.backends.iter_mut().find(|b| b.id == backend_id))
        else {
            return false;
        };
        let changed = backend.health != health;
        backend.health = health;
        changed
    }

    /// Backends for `service` with fresh ids, taken from `index` (which is updated).
    fn allocate_backends(
        &mut self,
        index: &mut TableIndex,
        service: &str,
        backends: &[BackendSpec],
    ) -> Result<Vec<Backend>, String> {
        if index.backend_ids.len() + backends.len() > MAX_BACKENDS as usize {
            return Err(format!(
                "cannot add backends to '{service}': the node holds at most {MAX_BACKENDS} backends"
            ));
        }
        let mut cursor = self.next_backend_id;
        let mut out = Vec::with_capacity(backends.len());
        for spec in backends {
            let id = next_free(cursor, MAX_BACKENDS, &index.backend_ids)
                .expect("capacity checked above");
            index.backend_ids.insert(id);
            cursor = (id + 1) % MAX_BACKENDS;
            out.push(Backend {
                addr: spec.addr,
                id,
                node: spec.node.clone(),
                drained: false,
                health: Health::Unknown,
                weight: spec.weight,
            });
        }
        self.next_backend_id = cursor;
        Ok(out)
    }
}

/// Declared nodes by name, once each, and every node a declared backend names among them.
fn declared_nodes<'a>(
    nodes: &'a [Node],
    services: &[ServiceSpec],
) -> Result<HashMap<&'a str, IpAddr>, String> {
    let mut declared = HashMap::with_capacity(nodes.len());
    for node in nodes {
        if declared.insert(node.name.as_str(), node.ip).is_some() {
            return Err(format!("node '{}' is declared twice", node.name));
        }
    }
    for spec in services {
        for backend in &spec.backends {
            if let Some(node) = backend
                .node
                .as_deref()
                .filter(|n| !declared.contains_key(n))
            {
                return Err(format!(
                    "unknown node '{node}' (backend {backend} of service '{}'): declare it among \
                     the nodes",
                    spec.name
                ));
            }
        }
    }
    Ok(declared)
}

/// Where each key stands in `keys`: to put things in their declared order.
fn positions_of<K: Eq + std::hash::Hash>(keys: impl Iterator<Item = K>) -> HashMap<K, usize> {
    keys.enumerate().map(|(i, key)| (key, i)).collect()
}

/// An error about a service, saying which unless it already does.
fn naming_service(name: &str, err: String) -> String {
    if err.contains(&format!("'{name}'")) {
        err
    } else {
        format!("service '{name}': {err}")
    }
}

/// Backend arguments as `BackendSpec`s: callers may pass plain `SocketAddrV4`s (backends on no
/// node) or specs.
fn specs(backends: &[impl Clone + Into<BackendSpec>]) -> Vec<BackendSpec> {
    backends.iter().cloned().map(Into::into).collect()
}

/// The first id at or after `start` (wrapping below `limit`) that is not in `used`.
fn next_free(start: u32, limit: u32, used: &BTreeSet<u32>) -> Option<u32> {
    (start..limit).chain(0..start).find(|id| !used.contains(id))
}

/// Within a service an `IP:PORT` appears once, whatever its node. A service on a VIP has
/// backends of its VIP's family only (lbctl does not translate between families); an IPv6
/// backend is on no node (the mesh carries IPv4 only).
fn check_backend_list(
    service: &str,
    vip: Option<IpAddr>,
    existing: &[Backend],
    new: &[BackendSpec],
) -> Result<(), String> {
    for spec in new {
        if let Some(vip) = vip
            && vip.is_ipv6() != spec.addr.is_ipv6()
        {
            return Err(format!(
                "service '{service}' is on {vip}: backend {} is of the other address family \
                 (lbctl does not translate between IPv4 and IPv6)",
                spec.addr
            ));
        }
    }
    let mut seen: BTreeSet<SocketAddr> = existing.iter().map(|b| b.addr).collect();
    for spec in new {
        if !seen.insert(spec.addr) {
            return Err(match existing.iter().find(|b| b.addr == spec.addr) {
                Some(backend) => format!("service '{service}' already has backend {backend}"),
                None => format!("backend {} is listed twice", spec.addr),
            });
        }
    }
    if seen.len() > MAX_BACKENDS_PER_SERVICE {
        return Err(format!(
            "service '{service}' would have {} backends; at most {MAX_BACKENDS_PER_SERVICE} are allowed",
            seen.len()
        ));
    }
    Ok(())
}

/// FNV-1a, 64 bits: a hash that is the same on every build and platform.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn addr(s: &str) -> SocketAddr {
        parse_backend(s).unwrap()
    }

    fn table_with_web() -> Table {
        let mut table = Table::default();
        table
            .add_service(
                "web",
                Proto::Tcp,
                8080,
                None,
                &[addr("10.0.0.6:80"), addr("10.0.0.7:80")],
            )
            .unwrap();
        table
    }

    #[test]
    fn ports_outside_1_to_65535_are_rejected_by_value() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in ["0", "65536", "-1", "http", ""] {
            let err = parse_port(bad).unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn backends_must_be_usable_socket_addresses() {
        assert_eq!(
            addr("10.0.0.6:80"),
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 6), 80))
        );
        for (bad, why) in [
            ("10.0.0.6", "expected IPv4:PORT or [IPv6]:PORT"),
            ("10.0.0.256:80", "not an IPv4 address"),
            ("10.0.0.6:0", "between 1 and 65535"),
            ("0.0.0.0:80", "not a host's"),
            ("255.255.255.255:80", "not a host's"),
            ("224.0.0.1:80", "multicast"),
            ("x:80", "not an IPv4 address"),
            (
                "2001:db8::6:80",
                "brackets before its port: [2001:db8::6]:80",
            ),
            ("[2001:db8::6]", "expected [IPv6]:PORT"),
            ("[2001:db8::6]:x", "not a number"),
            ("[fe80::1%eth0]:80", "scope"),
            ("[fe80::1]:80", "link-local"),
            ("[ff02::1]:80", "multicast"),
            ("[::]:80", "not a host's"),
            ("[::1]:80", "loopback"),
            ("[::ffff:10.0.0.6]:80", "write it as IPv4"),
            ("[2001:db8::zz]:80", "not an IPv6 address"),
        ] {
            let err = parse_backend(bad).unwrap_err();
            assert!(err.contains(bad) && err.contains(why), "{bad}: {err}");
        }
        for (bad, why) in [
            ("::", "not a host's"),
            ("ff02::1", "multicast"),
            ("fe80::1", "link-local"),
            ("10.0.0.300", "not an IPv4 or IPv6 address"),
        ] {
            let err = parse_vip(bad).unwrap_err();
            assert!(err.contains(bad) && err.contains(why), "{bad}: {err}");
        }
        assert_eq!(
            addr("[2001:db8::6]:80"),
            "[2001:db8::6]:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_vip("2001:db8::6"),
            Ok("2001:db8::6".parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn a_vip_takes_backends_of_its_family_only() {
        let mut table = table_with_web();
        table.add_node("n2", ip("192.168.1.2")).unwrap();
        let before = table.clone();
        let v6 = addr("[2001:db8::6]:80");
        let vip4 = Some(ip("10.9.9.9"));
        let vip6 = Some("2001:db8::99".parse::<IpAddr>().unwrap());
        for (vip, backend, why) in [
            (vip4, v6, "other address family"),
            (vip6, addr("10.0.0.8:80"), "other address family"),
        ] {
            let err = table
                .add_service("api", Proto::Tcp, 9090, vip, &[backend])
                .unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        assert_eq!(table, before);
        // Both families behind one published port (one IPv6 backend on another node), and an
        // IPv6 VIP with IPv6 backends.
        table
            .add_backends(
                "web",
                &[
                    BackendSpec::from(v6),
                    parse_backend_spec("[2001:db8::7]:80@n2").unwrap(),
                ],
            )
            .unwrap();
        table
            .add_service("api", Proto::Tcp, 9090, vip6, &[v6])
            .unwrap();
        table.validate().unwrap();
    }

    #[test]
    fn duplicate_names_and_ports_are_refused_without_change() {
        let mut table = table_with_web();
        let before = table.clone();
        assert!(
            table
                .add_service("web", Proto::Tcp, 9090, None, &[addr("10.0.0.8:80")])
                .unwrap_err()
                .contains("already exists")
        );
        assert!(
            table
                .add_service("api", Proto::Tcp, 8080, None, &[addr("10.0.0.8:80")])
                .unwrap_err()
                .contains("already published")
        );
        assert!(
            table
                .add_service(
                    "dup",
                    Proto::Tcp,
                    9090,
                    None,
                    &[addr("10.0.0.8:80"), addr("10.0.0.8:80")]
                )
                .unwrap_err()
                .contains("twice")
        );
        assert_eq!(table, before);
        // The same port on another protocol or on a VIP is another service.
        table
            .add_service("dns", Proto::Udp, 8080, None, &[addr("10.0.0.8:53")])
            .unwrap();
        table
            .add_service(
                "vip",
                Proto::Tcp,
                8080,
                Some(Ipv4Addr::new(10, 9, 9, 9).into()),
                &[addr("10.0.0.8:80")],
            )
            .unwrap();
        assert_eq!(table.generation, before.generation + 2);
    }

    #[test]
    fn backend_changes_check_everything_first() {
        let mut table = table_with_web();
        let before = table.clone();
        assert!(
            table
                .add_backends("web", &[addr("10.0.0.8:80"), addr("10.0.0.6:80")])
                .unwrap_err()
                .contains("already has")
        );
        assert!(
            table
                .add_backends("nope", &[addr("10.0.0.8:80")])
                .unwrap_err()
                .contains("unknown service")
        );
        assert!(
            table
                .remove_backends("web", &[addr("10.0.0.6:80"), addr("10.0.0.9:80")])
                .unwrap_err()
                .contains("no backend 10.0.0.9:80")
        );
        assert_eq!(table, before);
        table
            .remove_backends("web", &[addr("10.0.0.6:80")])
            .unwrap();
        assert_eq!(table.service("web").unwrap().backends.len(), 1);
    }

    #[test]
    fn ids_are_unique_and_not_reused_at_once() {
        let mut table = table_with_web();
        let first: Vec<u32> = table
            .service("web")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(first, vec![0, 1]);
        table
            .remove_backends("web", &[addr("10.0.0.6:80")])
            .unwrap();
        table.add_backends("web", &[addr("10.0.0.6:80")]).unwrap();
        let ids: Vec<u32> = table
            .service("web")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(
            ids,
            vec![1, 2],
            "freed id 0 is not handed out again straight away"
        );
        table.remove_service("web").unwrap();
        table
            .add_service("web2", Proto::Tcp, 8080, None, &[addr("10.0.0.6:80")])
            .unwrap();
        assert_eq!(table.service("web2").unwrap().id, 1);
    }

    #[test]
    fn ids_wrap_around_to_free_slots() {
        let used: BTreeSet<u32> = [3, 4].into_iter().collect();
        assert_eq!(next_free(3, 5, &used), Some(0));
        assert_eq!(next_free(0, 2, &[0, 1].into_iter().collect()), None);
    }

    #[test]
    fn per_service_backend_limit_is_enforced() {
        let mut table = Table::default();
        let many: Vec<SocketAddrV4> = (0..=MAX_BACKENDS_PER_SERVICE as u32)
            .map(|i| SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i + 1), 80))
            .collect();
        let err = table
            .add_service("big", Proto::Tcp, 80, None, &many)
            .unwrap_err();
        assert!(err.contains("at most"), "{err}");
        table
            .add_service(
                "big",
                Proto::Tcp,
                80,
                None,
                &many[..MAX_BACKENDS_PER_SERVICE],
            )
            .unwrap();
    }

    #[test]
    fn names_are_plain() {
        assert!(validate_name("service", "web-1.v2_x").is_ok());
        for bad in ["", "a b", "x/y", "n@2", &"n".repeat(64)] {
            assert!(validate_name("service", bad).is_err(), "{bad}");
        }
    }

    /// `IP:PORT[@NODE][*WEIGHT]`.
    fn spec(s: &str) -> BackendSpec {
        parse_weighted_backend_spec(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Nodes n1 (192.168.1.1) and n2 (192.168.1.2), no service.
    fn mesh() -> Table {
        let mut table = Table::default();
        table.add_node("n1", ip("192.168.1.1")).unwrap();
        table.add_node("n2", ip("192.168.1.2")).unwrap();
        table
    }

    /// `mesh()` with service `web` (tcp/8080) on `backends` (`IP:PORT[@NODE]`).
    fn mesh_with_web(backends: &[&str]) -> Table {
        let mut table = mesh();
        let specs: Vec<BackendSpec> = backends.iter().map(|b| spec(b)).collect();
        table
            .add_service("web", Proto::Tcp, 8080, None, &specs)
            .unwrap();
        table
    }

    #[test]
    fn backend_arguments_may_name_a_node() {
        assert_eq!(
            spec("10.0.0.8:80@n2"),
            BackendSpec {
                addr: addr("10.0.0.8:80"),
                node: Some("n2".into()),
                weight: 1,
            }
        );
        assert_eq!(spec("10.0.0.8:80"), BackendSpec::from(addr("10.0.0.8:80")));
        assert_eq!(spec("10.0.0.8:80@n2").to_string(), "10.0.0.8:80@n2");
        assert_eq!(spec("10.0.0.8:80").to_string(), "10.0.0.8:80");
        for (bad, names) in [
            ("10.0.0.8:80@", "invalid node name ''"),
            ("10.0.0.8:80@n 2", "invalid node name 'n 2'"),
            ("10.0.0.8:80@n2@n3", "invalid node name 'n2@n3'"),
            ("10.0.0.8@n2", "'10.0.0.8@n2': expected IPv4:PORT"),
            ("10.0.0.8:0@n2", "'10.0.0.8:0@n2': invalid port '0'"),
            ("@n2", "invalid backend '@n2'"),
        ] {
            let err = parse_backend_spec(bad).unwrap_err();
            assert!(err.contains(names), "{bad}: {err}");
        }
    }

    #[test]
    fn added_backends_may_carry_a_weight() {
        let weighted = spec("10.0.0.8:80@n2*3");
        assert_eq!((weighted.node.as_deref(), weighted.weight), (Some("n2"), 3));
        assert_eq!(weighted.to_string(), "10.0.0.8:80@n2*3");
        assert_eq!(spec("10.0.0.8:80*0").weight, 0);
        assert_eq!(spec("10.0.0.8:80*1").to_string(), "10.0.0.8:80");
        assert_eq!(spec("10.0.0.8:80*256").weight, MAX_WEIGHT);
        for (bad, names) in [
            ("10.0.0.8:80*257", "invalid weight '257'"),
            ("10.0.0.8:80*", "invalid weight ''"),
            ("10.0.0.8:80*-1", "invalid weight '-1'"),
            (
                "10.0.0.8:80@n2*x",
                "invalid backend '10.0.0.8:80@n2*x': invalid weight 'x'",
            ),
            ("10.0.0.8*2", "'10.0.0.8'"),
        ] {
            let err = parse_weighted_backend_spec(bad).unwrap_err();
            assert!(err.contains(names), "{bad}: {err}");
        }
        // Where a backend is named, not added, a weight is no part of its name.
        assert!(
            parse_backend_spec("10.0.0.8:80*2")
                .unwrap_err()
                .contains("invalid port '80*2'")
        );
    }

    #[test]
    fn weights_and_schedulers_change_in_place_and_weight_zero_takes_no_new_flows() {
        let mut table = Table::default();
        table
            .add_service(
                "web",
                Proto::Tcp,
                8080,
                None,
                &[spec("10.0.0.6:80*2"), spec("10.0.0.7:80*0")],
            )
            .unwrap();
        let web = table.service("web").unwrap();
        assert_eq!(web.scheduler, Scheduler::RoundRobin);
        let weights: Vec<u32> = web.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [2, 0]);
        let (selectable, fail_open) = web.selectable();
        assert_eq!(
            (selectable.len(), selectable[0].weight, fail_open),
            (1, 2, false)
        );

        let generation = table.generation;
        assert_eq!(table.set_scheduler("web", Scheduler::Maglev), Ok(true));
        assert_eq!(table.set_scheduler("web", Scheduler::Maglev), Ok(false));
        assert_eq!(table.set_weight("web", addr("10.0.0.7:80"), 5), Ok(true));
        assert_eq!(table.set_weight("web", addr("10.0.0.7:80"), 5), Ok(false));
        assert_eq!(table.generation, generation + 2);
        let before = table.clone();
        assert!(
            table
                .set_weight("web", addr("10.0.0.7:80"), 257)
                .unwrap_err()
                .contains("invalid weight '257'")
        );
        assert!(table.set_scheduler("api", Scheduler::Maglev).is_err());
        assert_eq!(table, before);
        let web = table.service("web").unwrap();
        assert_eq!(
            (web.scheduler, web.backends[1].weight),
            (Scheduler::Maglev, 5)
        );
        assert_eq!(
            web.backends.iter().map(|b| b.id).collect::<Vec<_>>(),
            [0, 1],
            "same backends"
        );

        // Every backend of weight 0 or unhealthy: failing open skips weight 0, like drained.
        table.set_weight("web", addr("10.0.0.7:80"), 0).unwrap();
        assert!(table.set_health("web", 0, Health::Unhealthy));
        let (selectable, fail_open) = table.service("web").unwrap().selectable();
        assert_eq!(
            (
                selectable.iter().map(|b| b.id).collect::<Vec<_>>(),
                fail_open
            ),
            (vec![0], true)
        );
        assert_eq!("maglev".parse(), Ok(Scheduler::Maglev));
        assert!(
            "wrr"
                .parse::<Scheduler>()
                .unwrap_err()
                .contains("expected rr (round-robin) or maglev")
        );
    }

    #[test]
    fn underlay_addresses_and_vnis_are_checked_by_value() {
        assert_eq!(parse_node_ip("192.168.1.1"), Ok(ip("192.168.1.1")));
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.5",
            "127.0.0.1",
            "10.0.0",
            "::1",
            "n2",
        ] {
            let err = parse_node_ip(bad).unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
        assert_eq!(parse_vni("0"), Ok(0));
        assert_eq!(parse_vni("16777215"), Ok(MAX_VNI));
        for bad in ["16777216", "-1", "x", ""] {
            let err = parse_vni(bad).unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn node_add_is_idempotent_and_refuses_conflicts_without_change() {
        let mut table = mesh();
        let before = table.clone();
        assert_eq!(table.add_node("n2", ip("192.168.1.2")), Ok(false));
        assert_eq!(table, before, "re-adding the same node is a no-op");
        for (name, addr, wanted) in [
            (
                "n2",
                "192.168.1.9",
                "already exists with underlay IP 192.168.1.2",
            ),
            ("n3", "192.168.1.1", "already belongs to node 'n1'"),
            ("n 3", "192.168.1.3", "invalid node name"),
        ] {
            let err = table.add_node(name, ip(addr)).unwrap_err();
            assert!(err.contains(wanted), "{err}");
        }
        assert_eq!(table, before);
        assert_eq!(table.add_node("n3", ip("192.168.1.3")), Ok(true));
        assert_eq!(table.generation, before.generation + 1);
    }

    #[test]
    fn an_ipv6_underlay_address_must_be_global_unicast() {
        assert_eq!(parse_node_ip("2001:db8::1"), Ok(ip("2001:db8::1")));
        assert_eq!(parse_node_ip("fd00:1::7"), Ok(ip("fd00:1::7")));
        for (bad, why) in [
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fe80::1%eth0", "scope id"),
            ("2001:db8::1%2", "scope id"),
            ("ff02::1", "multicast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:10.0.0.1", "IPv4 address in IPv6 form"),
            ("2001:db8::g", "not an IPv4 or IPv6 address"),
            ("0.1.2.3", "0.0.0.0/8"),
        ] {
            let err = parse_node_ip(bad).unwrap_err();
            assert!(
                err.contains(&format!("'{bad}'")) && err.contains(why),
                "{bad}: {err}"
            );
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    /// Two IPv6 addresses whose node keys are the same (24 bits: found within a few thousand).
    fn colliding_ipv6_pair() -> (IpAddr, IpAddr) {
        let mut seen = HashMap::new();
        for i in 1..=u16::MAX {
            let addr = IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 7, i));
            if let Some(other) = seen.insert(node_key(addr), addr) {
                return (other, addr);
            }
        }
        panic!("no two keys alike among 65,535 addresses");
    }

    #[test]
    fn a_mesh_is_of_one_family_and_its_ipv6_keys_unique() {
        let mut table = Table::default();
        table.add_node("n1", ip("2001:db8::1")).unwrap();
        table.add_node("n2", ip("2001:db8::2")).unwrap();
        let before = table.clone();
        let err = table.add_node("n4", ip("10.0.0.4")).unwrap_err();
        assert!(
            err.contains("'n4'") && err.contains("IPv6") && err.contains("one family"),
            "{err}"
        );
        let (a, b) = colliding_ipv6_pair();
        assert_eq!(node_key(a), node_key(b));
        assert!(lb_common::is_ipv6_node_key(node_key(a)));
        table.add_node("na", a).unwrap();
        let with_a = table.clone();
        let err = table.add_node("nb", b).unwrap_err();
        assert!(
            err.contains("'nb'") && err.contains("'na'") && err.contains("node key"),
            "{err}"
        );
        assert_eq!(table, with_a);
        table.remove_node("na").unwrap();
        assert_eq!(table.nodes, before.nodes);

        let mut v4 = mesh();
        let before = v4.clone();
        let err = v4.add_node("n9", ip("2001:db8::9")).unwrap_err();
        assert!(err.contains("IPv4") && err.contains("one family"), "{err}");
        assert_eq!(v4, before);
        // The last node gone, the other family may start a mesh.
        let mut alone = Table::default();
        alone.add_node("n1", ip("192.168.1.1")).unwrap();
        alone.remove_node("n1").unwrap();
        assert_eq!(alone.add_node("n1", ip("2001:db8::1")), Ok(true));
    }

    #[test]
    fn a_table_of_two_families_or_shared_keys_does_not_validate() {
        let mut mixed = mesh();
        mixed.nodes.push(Node {
            name: "n9".into(),
            ip: ip("2001:db8::9"),
        });
        let err = mixed.validate().unwrap_err();
        assert!(err.contains("two families"), "{err}");
        let (a, b) = colliding_ipv6_pair();
        let mut shared = Table::default();
        for (name, ip) in [("na", a), ("nb", b)] {
            shared.nodes.push(Node {
                name: name.into(),
                ip,
            });
        }
        let err = shared.validate().unwrap_err();
        assert!(err.contains("same node key"), "{err}");
        shared.nodes.pop();
        assert_eq!(shared.validate(), Ok(()));
    }

    #[test]
    fn an_ipv6_node_finds_itself_and_takes_backends_of_either_family() {
        let mut table = Table::default();
        table.add_node("n1", ip("2001:db8::1")).unwrap();
        table.add_node("n2", ip("2001:db8::2")).unwrap();
        table
            .add_service(
                "web",
                Proto::Tcp,
                8080,
                None,
                &[spec("10.0.0.8:80@n2"), spec("[2001:db8:5::8]:80@n2")],
            )
            .unwrap();
        let local: BTreeSet<IpAddr> = [ip("10.0.0.1"), ip("2001:db8::2")].into();
        assert_eq!(table.self_node(&local).unwrap().name, "n2");
        assert!(table.self_node(&[ip("10.0.0.2")].into()).is_none());
        assert_eq!(table.validate(), Ok(()));
    }

    #[test]
    fn a_state_file_of_ipv4_nodes_still_loads_and_ipv6_ones_round_trip() {
        // A table as an lbctl of IPv4 nodes only wrote it.
        let old = r#"{"generation": 3, "services": [], "nodes": [
            {"name": "n1", "ip": "10.0.0.1"}, {"name": "n2", "ip": "10.0.0.2"}]}"#;
        let table: Table = serde_json::from_str(old).unwrap();
        assert_eq!(table.nodes[1].ip, ip("10.0.0.2"));
        assert_eq!(table.nodes[1].key(), u32::from_ne_bytes([10, 0, 0, 2]));
        let written = serde_json::to_string(&table).unwrap();
        assert!(written.contains(r#""ip":"10.0.0.1""#), "{written}");
        let mut v6 = Table::default();
        v6.add_node("n1", ip("2001:db8::1")).unwrap();
        let written = serde_json::to_string(&v6).unwrap();
        assert!(written.contains(r#""ip":"2001:db8::1""#), "{written}");
        assert_eq!(serde_json::from_str::<Table>(&written).unwrap(), v6);
    }

    #[test]
    fn node_count_is_limited() {
        let mut table = Table::default();
        for i in 0..MAX_NODES {
            table
                .add_node(&format!("n{i}"), Ipv4Addr::from(0x0a01_0000 + i).into())
                .unwrap();
        }
        let err = table.add_node("one-more", ip("192.168.1.1")).unwrap_err();
        assert!(err.contains("4096 nodes"), "{err}");
    }

    #[test]
    fn a_node_hosting_backends_cannot_be_removed() {
        let mut table = mesh_with_web(&["10.0.0.8:80@n2"]);
        table
            .add_service("api", Proto::Tcp, 9090, None, &[spec("10.0.0.9:80@n2")])
            .unwrap();
        let before = table.clone();
        let err = table.remove_node("n2").unwrap_err();
        assert!(
            err.contains("node 'n2' still hosts backends of services web, api"),
            "{err}"
        );
        assert!(
            table
                .remove_node("n9")
                .unwrap_err()
                .contains("unknown node 'n9'")
        );
        assert_eq!(table, before);
        assert_eq!(table.remove_node("n1").unwrap().name, "n1");
        table.remove_service("web").unwrap();
        table.remove_service("api").unwrap();
        table.remove_node("n2").unwrap();
        assert!(table.nodes.is_empty());
    }

    #[test]
    fn backends_on_unknown_nodes_are_refused() {
        let err = mesh()
            .add_service("web", Proto::Tcp, 8080, None, &[spec("10.0.0.8:80@n9")])
            .unwrap_err();
        assert_eq!(
            err,
            "unknown node 'n9': add it with `lbctl node add n9 <underlay-ip>`"
        );
        let mut table = mesh_with_web(&["10.0.0.8:80@n2"]);
        let before = table.clone();
        let err = table
            .add_backends("web", &[spec("10.0.0.9:80"), spec("10.0.0.10:80@n9")])
            .unwrap_err();
        assert!(err.starts_with("unknown node 'n9'"), "{err}");
        assert_eq!(table, before);
    }

    #[test]
    fn an_address_appears_once_per_service_whatever_its_node() {
        let mut table = mesh_with_web(&["10.0.0.8:80@n2"]);
        let before = table.clone();
        for (backends, wanted) in [
            (
                vec![spec("10.0.0.8:80@n1")],
                "service 'web' already has backend 10.0.0.8:80@n2",
            ),
            (
                vec![spec("10.0.0.8:80")],
                "service 'web' already has backend 10.0.0.8:80@n2",
            ),
            (
                vec![spec("10.0.0.9:80@n1"), spec("10.0.0.9:80")],
                "backend 10.0.0.9:80 is listed twice",
            ),
        ] {
            assert_eq!(table.add_backends("web", &backends).unwrap_err(), wanted);
        }
        assert_eq!(table, before);
        table.add_backends("web", &[spec("10.0.0.9:80")]).unwrap();
        let web = table.service("web").unwrap();
        assert_eq!(web.backends[0].node.as_deref(), Some("n2"));
        assert_eq!(web.backends[1].node, None);
    }

    #[test]
    fn backend_rm_matches_the_node_only_when_one_is_given() {
        let mut table = mesh_with_web(&["10.0.0.7:80", "10.0.0.8:80@n2", "10.0.0.9:80@n1"]);
        let before = table.clone();
        for (backend, wanted) in [
            (
                "10.0.0.8:80@n1",
                "service 'web' has backend 10.0.0.8:80@n2, not 10.0.0.8:80@n1",
            ),
            (
                "10.0.0.7:80@n1",
                "service 'web' has backend 10.0.0.7:80, not 10.0.0.7:80@n1 (it is on no node)",
            ),
            ("10.0.0.6:80@n1", "service 'web' has no backend 10.0.0.6:80"),
        ] {
            assert_eq!(
                table.remove_backends("web", &[spec(backend)]).unwrap_err(),
                wanted
            );
        }
        assert_eq!(table, before);
        table
            .remove_backends("web", &[spec("10.0.0.8:80@n2"), spec("10.0.0.9:80")])
            .unwrap();
        let left: Vec<String> = table
            .service("web")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.to_string())
            .collect();
        assert_eq!(left, ["10.0.0.7:80"]);
    }

    #[test]
    fn moving_a_backend_to_another_node_gives_it_a_new_id() {
        let mut table = mesh_with_web(&["10.0.0.8:80@n1"]);
        table
            .remove_backends("web", &[spec("10.0.0.8:80")])
            .unwrap();
        table
            .add_backends("web", &[spec("10.0.0.8:80@n2")])
            .unwrap();
        let backend = &table.service("web").unwrap().backends[0];
        assert_eq!((backend.id, backend.node.as_deref()), (1, Some("n2")));
    }

    #[test]
    fn self_is_the_first_node_whose_address_is_local() {
        let table = mesh();
        let local: BTreeSet<IpAddr> = [ip("127.0.0.1"), ip("192.168.1.2")].into();
        assert_eq!(table.self_node(&local).unwrap().name, "n2");
        assert!(table.self_node(&[ip("192.168.1.3")].into()).is_none());
    }

    #[test]
    fn mesh_settings_default_and_change_only_when_valid() {
        let mut table = Table::default();
        assert_eq!((table.vni, table.vxlan_port), (4096, 4789));
        let before = table.clone();
        assert!(table.set_mesh(None, None).unwrap_err().contains("--vni"));
        assert!(
            table
                .set_mesh(Some(MAX_VNI + 1), Some(4790))
                .unwrap_err()
                .contains("VNI")
        );
        assert!(
            table
                .set_mesh(Some(1), Some(0))
                .unwrap_err()
                .contains("port '0'")
        );
        assert_eq!(table, before);
        table.set_mesh(Some(MAX_VNI), None).unwrap();
        assert_eq!((table.vni, table.vxlan_port), (MAX_VNI, 4789));
        table.set_mesh(None, Some(8472)).unwrap();
        assert_eq!((table.vni, table.vxlan_port), (MAX_VNI, 8472));
    }

    /// A declared service on tcp/`port` with `backends` (`IP:PORT[@NODE]`) and default checks.
    fn declared(name: &str, port: u16, backends: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            proto: Proto::Tcp,
            port,
            vip: None,
            backends: backends.iter().map(|b| spec(b)).collect(),
            health_check: HealthCheck::default(),
            scheduler: Scheduler::default(),
        }
    }

    /// `(IP:PORT[@NODE][*WEIGHT], id)` of a service's backends, in order.
    fn backend_ids(table: &Table, service: &str) -> Vec<(String, u32)> {
        table
            .service(service)
            .unwrap()
            .backends
            .iter()
            .map(|b| (b.spec().to_string(), b.id))
            .collect()
    }

    #[test]
    fn apply_keeps_the_ids_drain_and_health_of_what_stays() {
        // web: 10.0.0.6:80 (id 0), 10.0.0.7:80 (1), 10.0.0.8:80 (2); old: 10.0.0.9:80 (3).
        let mut table = table_with_web();
        table.add_backends("web", &[addr("10.0.0.8:80")]).unwrap();
        table
            .add_service("old", Proto::Tcp, 9000, None, &[addr("10.0.0.9:80")])
            .unwrap();
        table.set_drained("web", addr("10.0.0.7:80"), true).unwrap();
        assert!(table.set_health("web", 2, Health::Unhealthy));
        let web_id = table.service("web").unwrap().id;
        let generation = table.generation;

        let changed = table
            .apply(
                None,
                &[
                    declared("web", 8080, &["10.0.0.7:80", "10.0.0.8:80", "10.0.0.5:80"]),
                    declared("api", 9090, &["10.0.0.4:80"]),
                ],
            )
            .unwrap();
        assert!(changed);
        assert_eq!(
            table.generation,
            generation + 1,
            "one apply, one generation"
        );
        let web = table.service("web").unwrap();
        assert_eq!(web.id, web_id);
        assert_eq!(
            backend_ids(&table, "web"),
            [
                ("10.0.0.7:80".into(), 1),
                ("10.0.0.8:80".into(), 2),
                ("10.0.0.5:80".into(), 4)
            ],
            "kept backends keep their ids, the new one gets a fresh id, in declared order"
        );
        assert!(web.backends[0].drained);
        assert_eq!(web.backends[1].health, Health::Unhealthy);
        assert!(table.service("old").is_none());
        assert_eq!(backend_ids(&table, "api"), [("10.0.0.4:80".into(), 5)]);
        let names: Vec<&str> = table.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "api"], "the declared order");
    }

    #[test]
    fn apply_sets_weights_and_the_scheduler_keeping_ids() {
        let mut table = table_with_web();
        let mut web = declared("web", 8080, &["10.0.0.7:80*3", "10.0.0.6:80"]);
        web.scheduler = Scheduler::Maglev;
        assert_eq!(table.apply(None, std::slice::from_ref(&web)), Ok(true));
        assert_eq!(table.service("web").unwrap().scheduler, Scheduler::Maglev);
        assert_eq!(
            backend_ids(&table, "web"),
            [("10.0.0.7:80*3".into(), 1), ("10.0.0.6:80".into(), 0)]
        );
        assert_eq!(table.apply(None, &[web]), Ok(false));
    }

    #[test]
    fn applying_the_table_in_force_changes_nothing() {
        let mut table = mesh_with_web(&["10.0.0.6:80", "10.0.0.7:80@n2"]);
        let before = table.clone();
        let same = [declared("web", 8080, &["10.0.0.6:80", "10.0.0.7:80@n2"])];
        assert_eq!(table.apply(None, &same), Ok(false));
        let nodes = table.nodes.clone();
        assert_eq!(table.apply(Some(&nodes), &same), Ok(false));
        assert_eq!(table, before);
    }

    #[test]
    fn a_new_frontend_or_node_gives_new_ids() {
        let mut table = mesh_with_web(&["10.0.0.6:80", "10.0.0.7:80@n2"]);
        // web moves to port 8081: it is replaced, with new ids.
        table
            .apply(
                None,
                &[declared("web", 8081, &["10.0.0.6:80", "10.0.0.7:80@n2"])],
            )
            .unwrap();
        let web = table.service("web").unwrap();
        assert_eq!((web.id, web.port), (1, 8081));
        assert_eq!(
            backend_ids(&table, "web"),
            [("10.0.0.6:80".into(), 2), ("10.0.0.7:80@n2".into(), 3)]
        );
        // A backend declared on another node is another backend.
        table
            .apply(
                None,
                &[declared("web", 8081, &["10.0.0.6:80", "10.0.0.7:80@n1"])],
            )
            .unwrap();
        assert_eq!(
            backend_ids(&table, "web"),
            [("10.0.0.6:80".into(), 2), ("10.0.0.7:80@n1".into(), 4)]
        );
        // n1 moves to another underlay address: its backends start afresh; n2 is dropped.
        let nodes = [Node {
            name: "n1".into(),
            ip: ip("192.168.1.9"),
        }];
        table
            .apply(
                Some(&nodes),
                &[declared("web", 8081, &["10.0.0.6:80", "10.0.0.7:80@n1"])],
            )
            .unwrap();
        assert_eq!(table.nodes, nodes);
        assert_eq!(
            backend_ids(&table, "web"),
            [("10.0.0.6:80".into(), 2), ("10.0.0.7:80@n1".into(), 5)]
        );
    }

    #[test]
    fn a_refused_declaration_changes_nothing() {
        let mut table = mesh_with_web(&["10.0.0.6:80", "10.0.0.7:80@n2"]);
        let before = table.clone();
        let web = declared("web", 8080, &["10.0.0.6:80"]);
        let n1_only = [Node {
            name: "n1".into(),
            ip: ip("192.168.1.1"),
        }];
        let too_many: Vec<String> = (0..=MAX_BACKENDS_PER_SERVICE as u32)
            .map(|i| SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i + 1), 80).to_string())
            .collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        let mut bad_check = declared("api", 9090, &[]);
        bad_check.health_check.rise = 0;
        /// Declared nodes, declared services, the start of the error.
        type Case<'a> = (Option<&'a [Node]>, Vec<ServiceSpec>, &'a str);
        let cases: Vec<Case> = vec![
            (
                None,
                vec![web.clone(), web.clone()],
                "service 'web' is declared twice",
            ),
            (
                None,
                vec![web.clone(), declared("api", 8080, &["10.0.0.8:80"])],
                "service 'api': port tcp/8080 is already published by service 'web'",
            ),
            (
                None,
                vec![declared("web", 8080, &["10.0.0.8:80@n9"])],
                "service 'web': unknown node 'n9'",
            ),
            (
                Some(&n1_only),
                vec![declared("web", 8080, &["10.0.0.8:80@n2"])],
                "unknown node 'n2' (backend 10.0.0.8:80@n2 of service 'web')",
            ),
            (
                None,
                vec![declared("web", 8080, &["10.0.0.8:80", "10.0.0.8:80@n1"])],
                "service 'web': backend 10.0.0.8:80 is listed twice",
            ),
            (
                None,
                vec![declared("big", 80, &too_many)],
                "service 'big' would have 129 backends",
            ),
            (
                None,
                vec![bad_check],
                "service 'api': invalid rise/fall 0/3",
            ),
            (
                None,
                vec![declared("a b", 80, &[])],
                "invalid service name 'a b'",
            ),
        ];
        for (nodes, services, wanted) in cases {
            let err = table.apply(nodes, &services).unwrap_err();
            assert!(err.starts_with(wanted), "{err}");
            assert_eq!(table, before);
        }
    }

    #[test]
    fn ten_thousand_services_of_ten_backends_fit_and_apply_in_one_pass() {
        let services: Vec<ServiceSpec> = (0..10_000u32)
            .map(|i| ServiceSpec {
                name: format!("svc-{i}"),
                proto: Proto::Tcp,
                port: 10_000 + i as u16,
                vip: None,
                backends: (0..10)
                    .map(|j| SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i * 16 + j), 80).into())
                    .collect(),
                health_check: HealthCheck::default(),
                scheduler: Scheduler::default(),
            })
            .collect();
        let mut table = Table::default();
        let start = std::time::Instant::now();
        assert_eq!(table.apply(None, &services), Ok(true));
        let elapsed = start.elapsed();
        let ids: BTreeSet<u32> = table
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        assert_eq!(ids.len(), 100_000);
        assert_eq!(table.apply(None, &services), Ok(false));
        // Checking and numbering each addition against the whole table took minutes.
        assert!(elapsed.as_secs() < 10, "{elapsed:?}");
    }

    /// Each way a hand-edited or damaged file can break what the commands keep true is refused,
    /// naming what is wrong.
    #[test]
    fn tables_no_command_could_make_are_refused_by_validate() {
        let mut base = table_with_web();
        base.add_node("n1", ip("192.168.1.1")).unwrap();
        base.add_service("dns", Proto::Udp, 53, None, &[addr("10.0.0.6:53")])
            .unwrap();
        assert_eq!(base.validate(), Ok(()));
        type Break = fn(&mut Table);
        let broken: [(&str, Break, &str); 10] = [
            (
                "a service twice",
                |t| t.services[1].name = "web".into(),
                "'web' is listed twice",
            ),
            ("a shared service id", |t| t.services[1].id = 0, "id 0"),
            (
                "a service id out of range",
                |t| t.services[0].id = MAX_SERVICES,
                "id 16384",
            ),
            (
                "a frontend twice",
                |t| {
                    t.services[1].proto = Proto::Tcp;
                    t.services[1].port = 8080;
                },
                "tcp/8080 is published twice",
            ),
            ("port 0", |t| t.services[0].port = 0, "'0'"),
            (
                "a shared backend id",
                |t| t.services[1].backends[0].id = 0,
                "id 0",
            ),
            (
                "a backend twice",
                |t| t.services[0].backends[1].addr = addr("10.0.0.6:80"),
                "10.0.0.6:80",
            ),
            (
                "a backend on an unknown node",
                |t| t.services[0].backends[0].node = Some("n9".into()),
                "'n9'",
            ),
            (
                "a node twice",
                |t| t.nodes.push(t.nodes[0].clone()),
                "'n1' is listed twice",
            ),
            (
                "a health check out of range",
                |t| t.services[0].health_check.rise = 0,
                "rise",
            ),
        ];
        for (what, break_it, named) in broken {
            let mut table = base.clone();
            break_it(&mut table);
            let err = table.validate().expect_err(what);
            assert!(err.contains(named), "{what}: {err}");
        }
    }
}
