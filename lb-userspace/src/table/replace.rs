//! Replacing the whole table with a declared one (`lbctl apply`): services and backends that
//! stay keep their ids, drain and health; the rest is added or removed in one step.
use super::*;

impl Table {
    /// Makes the table what an operator declares (`lbctl apply`): exactly `services`, and
    /// exactly `nodes` when they are given (`None` leaves the nodes as they are). What stays
    /// keeps its id, drain and health, so the flows pinned to a backend that stays stay on it:
    /// a service stays when its name and frontend do (a new frontend replaces it: it is removed
    /// and added again), a backend when its `IP:PORT@NODE` does and its node keeps its underlay
    /// address. Services and their backends take the declared order. The checks are those of
    /// `service add`, `backend add`, `service health` and `node add`; on any error the table is
    /// unchanged. Returns whether it changed (its generation then grows by one).
    pub fn apply(
        &mut self,
        nodes: Option<&[Node]>,
        services: &[ServiceSpec],
    ) -> Result<bool, String> {
        let mut next = self.clone();
        next.replace_with(nodes, services)?;
        next.generation = self.generation;
        if next == *self {
            return Ok(false);
        }
        next.generation += 1;
        *self = next;
        Ok(true)
    }

    /// `apply`, leaving the table half-changed on error (`apply` works on a copy).
    fn replace_with(
        &mut self,
        nodes: Option<&[Node]>,
        services: &[ServiceSpec],
    ) -> Result<(), String> {
        // The declaration on its own first.
        let mut wanted: HashMap<&str, &ServiceSpec> = HashMap::with_capacity(services.len());
        for spec in services {
            validate_name("service", &spec.name)?;
            if wanted.insert(&spec.name, spec).is_some() {
                return Err(format!("service '{}' is declared twice", spec.name));
            }
            check_backend_list(&spec.name, spec.vip, &[], &spec.backends)
                .map_err(|err| naming_service(&spec.name, err))?;
            spec.health_check
                .validate()
                .map_err(|err| naming_service(&spec.name, err))?;
        }
        let declared_nodes = match nodes {
            Some(nodes) => Some(declared_nodes(nodes, services)?),
            None => None,
        };
        // Nodes that leave or move to another underlay address: backends on them leave too
        // (flows pinned to them were encapsulated to the old address).
        let moving: HashSet<String> = match &declared_nodes {
            Some(declared) => self
                .nodes
                .iter()
                .filter(|n| declared.get(n.name.as_str()) != Some(&n.ip))
                .map(|n| n.name.clone())
                .collect(),
            None => HashSet::new(),
        };

        // Removals: services that leave or change frontend, then backends that leave the
        // services that stay, then nodes.
        self.services.retain(|s| {
            wanted
                .get(s.name.as_str())
                .is_some_and(|w| w.frontend() == s.frontend_key())
        });
        for service in &mut self.services {
            let declared: HashSet<(SocketAddr, Option<&str>)> = wanted[service.name.as_str()]
                .backends
                .iter()
                .map(|b| (b.addr, b.node.as_deref()))
                .collect();
            service.backends.retain(|b| {
                declared.contains(&(b.addr, b.node.as_deref()))
                    && b.node.as_ref().is_none_or(|n| !moving.contains(n))
            });
        }
        if let Some(nodes) = nodes {
            for name in &moving {
                self.remove_node(name)?;
            }
            for node in nodes {
                self.add_node(&node.name, node.ip)?;
            }
            let order = positions_of(nodes.iter().map(|n| n.name.as_str()));
            self.nodes.sort_by_key(|n| order[n.name.as_str()]);
        }

        // Additions, numbered from one index of the table.
        let mut index = self.index();
        let positions = positions_of(self.services.iter().map(|s| s.name.clone()));
        for spec in services {
            let position = match positions.get(&spec.name) {
                Some(&position) => {
                    let present: HashSet<SocketAddr> = self.services[position]
                        .backends
                        .iter()
                        .map(|b| b.addr)
                        .collect();
                    let new: Vec<BackendSpec> = spec
                        .backends
                        .iter()
                        .filter(|b| !present.contains(&b.addr))
                        .cloned()
                        .collect();
                    if !new.is_empty() {
                        self.add_backends_indexed(&mut index, position, &new)
                            .map_err(|err| naming_service(&spec.name, err))?;
                    }
                    position
                }
                None => {
                    self.add_service_indexed(
                        &mut index,
                        &spec.name,
                        spec.frontend(),
                        &spec.backends,
                    )
                    .map_err(|err| naming_service(&spec.name, err))?;
                    self.services.len() - 1
                }
            };
            let service = &mut self.services[position];
            service.set_health_check(&spec.health_check)?;
            service.scheduler = spec.scheduler;
            let declared: HashMap<SocketAddr, (usize, u32)> = spec
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.addr, (i, b.weight)))
                .collect();
            for backend in &mut service.backends {
                backend.weight = declared[&backend.addr].1;
            }
            service.backends.sort_by_key(|b| declared[&b.addr].0);
        }
        let order = positions_of(services.iter().map(|s| s.name.as_str()));
        self.services.sort_by_key(|s| order[s.name.as_str()]);
        Ok(())
    }
}
