//! Service table → map contents → the smallest set of map writes. Pure logic; `datapath`
//! applies the result.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    Addr6, BACKEND_ACTIVE, BACKEND_IPV6, Backend, LocalBackendKey, LocalBackendKey6,
    MAX_BACKENDS_PER_SERVICE, MaglevTable, MeshConfig, SERVICE_FAIL_OPEN,
    SERVICE_OTHER_FAMILY_ONLY, ServiceKey, ServiceKey6, ServiceValue, service_port_bit,
    service_port_slot,
};

use crate::{
    dataplane::maglev::{self, MaglevBackend},
    table::{self, Scheduler, Service, Table},
};

/// What `MESH`, `NODES`, `SERVICES`, `SERVICE_PORTS`, `BACKENDS`, `MAGLEV`, `LOCAL_BACKENDS`
/// and their IPv6 counterparts should hold (active backends only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// `MESH[0]`: `local_ip_be` is this node's key (`table::node_key`): its IPv4 address, or
    /// on an IPv6 underlay the key of its IPv6 address.
    pub mesh: MeshConfig,
    /// `MESH6[0]`: this node's IPv6 underlay address; all zero on an IPv4 underlay, or when
    /// this instance is none of the nodes.
    pub mesh6: Addr6,
    /// The keys (`table::node_key`: an IPv4 node's address in network byte order, an IPv6
    /// node's key) of every node but this one.
    pub nodes: BTreeSet<u32>,
    /// `NODES6`: every IPv6 node but this one, address → key (empty on an IPv4 underlay).
    pub nodes6: BTreeMap<Addr6, u32>,
    /// `NODE_ADDRS6`: the same nodes, key → address.
    pub node_addrs6: BTreeMap<u32, Addr6>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// The non-zero words of `SERVICE_PORTS` by index: the ports of `services`.
    pub service_ports: BTreeMap<u32, u64>,
    pub backends: BTreeMap<u32, Backend>,
    /// The lookup table of every maglev service that has a backend to choose, by service id.
    pub maglev: BTreeMap<u32, Box<MaglevTable>>,
    /// The backends this node reaches by plain routing (on this node or on none), by address,
    /// port and protocol: where decapsulated client packets may go.
    pub local_backends: BTreeSet<LocalBackendKey>,
    /// `SERVICES6`: each service published on every address or on an IPv6 VIP, with its IPv6
    /// backends.
    pub services6: BTreeMap<ServiceKey6, ServiceValue>,
    /// `MAGLEV6`: the lookup table of every maglev service's IPv6 backends, by service id.
    pub maglev6: BTreeMap<u32, Box<MaglevTable>>,
    /// `BACKEND_ADDRS6`: the address of every IPv6 backend, by id.
    pub backend_addrs6: BTreeMap<u32, Addr6>,
    /// `LOCAL_BACKENDS6`: the IPv6 backends this node reaches by plain routing.
    pub local_backends6: BTreeSet<LocalBackendKey6>,
}

/// The service's key in `SERVICES` (its IPv4 half); `None` for a service on an IPv6 VIP.
pub fn service_key(service: &Service) -> Option<ServiceKey> {
    let vip_be = match service.vip {
        None => 0,
        Some(IpAddr::V4(vip)) => u32::from_ne_bytes(vip.octets()),
        Some(IpAddr::V6(_)) => return None,
    };
    Some(ServiceKey {
        vip_be,
        port_be: service.port.to_be(),
        proto: service.proto.number(),
        _pad: 0,
    })
}

/// The map contents `table` implies on the node named `self_node` (`None`: this instance is
/// none of the table's nodes). Backends on this node, or on no node, are reached by plain
/// routing; backends on another node carry that node's key (its IPv4 address, or the key of
/// its IPv6 one), so the data plane encapsulates their packets to it.
pub fn desired(table: &Table, self_node: Option<&str>) -> MapContents {
    let be = |ip: std::net::Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let local = table
        .nodes
        .iter()
        .find(|n| Some(n.name.as_str()) == self_node);
    let mut contents = MapContents {
        mesh: MeshConfig {
            local_ip_be: local.map_or(0, table::Node::key),
            vni: table.vni,
            vxlan_port_be: table.vxlan_port.to_be(),
            _pad: 0,
        },
        mesh6: match local.map(|n| n.ip) {
            Some(IpAddr::V6(ip)) => ip.octets(),
            _ => [0; 16],
        },
        ..MapContents::default()
    };
    // Other nodes by name: where their backends' packets are encapsulated to.
    let remote: BTreeMap<&str, u32> = table
        .nodes
        .iter()
        .filter(|n| Some(n.name.as_str()) != self_node)
        .map(|n| (n.name.as_str(), n.key()))
        .collect();
    contents.nodes = remote.values().copied().collect();
    for node in table
        .nodes
        .iter()
        .filter(|n| remote.contains_key(n.name.as_str()))
    {
        if let IpAddr::V6(ip) = node.ip {
            contents.nodes6.insert(ip.octets(), node.key());
            contents.node_addrs6.insert(node.key(), ip.octets());
        }
    }
    for service in &table.services {
        assert!(
            service.backends.len() <= MAX_BACKENDS_PER_SERVICE,
            "model enforces the limit"
        );
        // Each family's half: its own backend list, cursor and maglev table.
        if let Some(key) = service_key(service) {
            let (value, maglev) = family_value(service, false);
            contents.services.insert(key, value);
            if let Some(table) = maglev {
                contents.maglev.insert(service.id, table);
            }
        }
        if let Some(key) = service_key6(service) {
            let (value, maglev) = family_value(service, true);
            contents.services6.insert(key, value);
            if let Some(table) = maglev {
                contents.maglev6.insert(service.id, table);
            }
        }
        for backend in &service.backends {
            let routed_here = backend.node.is_none() || backend.node.as_deref() == self_node;
            let node_ip_be = backend
                .node
                .as_deref()
                .and_then(|node| remote.get(node).copied())
                .unwrap_or(0);
            let addr = match backend.addr {
                SocketAddr::V4(addr) => addr,
                SocketAddr::V6(addr) => {
                    if routed_here {
                        contents.local_backends6.insert(LocalBackendKey6 {
                            addr: addr.ip().octets(),
                            port_be: addr.port().to_be(),
                            proto: service.proto.number(),
                            _pad: 0,
                        });
                    }
                    contents
                        .backend_addrs6
                        .insert(backend.id, addr.ip().octets());
                    contents.backends.insert(
                        backend.id,
                        Backend {
                            ip_be: 0,
                            port_be: addr.port().to_be(),
                            flags: BACKEND_ACTIVE | BACKEND_IPV6,
                            eject_after: u8::try_from(service.health_check.eject_after)
                                .unwrap_or(u8::MAX),
                            service_id: service.id,
                            node_ip_be,
                        },
                    );
                    continue;
                }
            };
            if routed_here {
                contents.local_backends.insert(LocalBackendKey {
                    ip_be: be(*addr.ip()),
                    port_be: addr.port().to_be(),
                    proto: service.proto.number(),
                    _pad: 0,
                });
            }
            contents.backends.insert(
                backend.id,
                Backend {
                    ip_be: be(*addr.ip()),
                    port_be: addr.port().to_be(),
                    flags: BACKEND_ACTIVE,
                    // Validated to fit (`MAX_EJECT_AFTER`).
                    eject_after: u8::try_from(service.health_check.eject_after).unwrap_or(u8::MAX),
                    service_id: service.id,
                    node_ip_be,
                },
            );
        }
    }
    contents.service_ports = service_ports(contents.services.keys().copied().chain(
        contents.services6.keys().map(|key| ServiceKey {
            // Only which bit matters: a VIP's or every address's.
            vip_be: u32::from(key.vip != [0; 16]),
            port_be: key.port_be,
            proto: key.proto,
            _pad: 0,
        }),
    ));
    contents
}

/// The service's key in `SERVICES6` (its IPv6 half); `None` for a service on an IPv4 VIP.
pub fn service_key6(service: &Service) -> Option<ServiceKey6> {
    let vip = match service.vip {
        None => [0; 16],
        Some(IpAddr::V6(vip)) => vip.octets(),
        Some(IpAddr::V4(_)) => return None,
    };
    Some(ServiceKey6 {
        vip,
        port_be: service.port.to_be(),
        proto: service.proto.number(),
        _pad: 0,
    })
}

/// The value of one family's half of `service` (`ipv6`), and its maglev table: the family's
/// backends new flows may choose. Drained and unhealthy backends stay active in BACKENDS (their
/// flows continue) but leave the list. A service whose backends are all of the other family
/// says so, for its own drop reason.
fn family_value(service: &Service, ipv6: bool) -> (ServiceValue, Option<Box<MaglevTable>>) {
    let (selectable, fail_open) = service.selectable_in(ipv6);
    let turns = round_robin_turns(&selectable);
    let other_family_only =
        !service.backends.is_empty() && service.backends.iter().all(|b| b.addr.is_ipv6() != ipv6);
    let mut value = ServiceValue {
        service_id: service.id,
        backend_count: turns.len() as u32,
        flags: if fail_open { SERVICE_FAIL_OPEN } else { 0 }
            | if other_family_only {
                SERVICE_OTHER_FAMILY_ONLY
            } else {
                0
            },
        scheduler: service.scheduler.number(),
        ..ServiceValue::default()
    };
    value.backend_ids[..turns.len()].copy_from_slice(&turns);
    let maglev = (service.scheduler == Scheduler::Maglev)
        .then(|| {
            let backends: Vec<MaglevBackend> = selectable
                .iter()
                .map(|b| MaglevBackend {
                    identity: b.to_string(),
                    id: b.id,
                    weight: b.weight,
                })
                .collect();
            maglev::build(&backends)
        })
        .flatten();
    (value, maglev)
}

/// The non-zero words of `SERVICE_PORTS` that publish the services of `keys`.
pub fn service_ports(keys: impl Iterator<Item = ServiceKey>) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for key in keys {
        let (word, shift) =
            service_port_slot(key.proto, key.port_be).expect("services are TCP or UDP");
        *words.entry(word).or_default() |= service_port_bit(&key) << shift;
    }
    words
}

/// The round-robin order of a service's selectable backends: each backend's id as many times
/// as its share of the `MAX_BACKENDS_PER_SERVICE` slots ([`slot_counts`]), spread out as
/// nginx's smooth weighted round-robin does (weights 3 and 1 give A A B A, not A A A B).
/// Backends of equal weight keep their order, once each.
fn round_robin_turns(backends: &[&table::Backend]) -> Vec<u32> {
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    let slots = slot_counts(&weights);
    let total: i64 = slots.iter().map(|s| i64::from(*s)).sum();
    let mut current = vec![0i64; slots.len()];
    (0..total)
        .map(|_| {
            for (current, slots) in current.iter_mut().zip(&slots) {
                *current += i64::from(*slots);
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .rev()
                .max_by_key(|(_, c)| **c)
                .expect("a turn is taken only when there are backends");
            current[best] -= total;
            backends[best].id
        })
        .collect()
}

/// How many of the `MAX_BACKENDS_PER_SERVICE` round-robin slots each weight gets: the weights
/// divided by their greatest common divisor when they fit (exact); otherwise every slot, shared
/// in proportion to the weights with at least one each (the closest the slots allow: weights 2
/// and 1 among 128 backends cannot be told apart). Weights are above 0.
fn slot_counts(weights: &[u32]) -> Vec<u32> {
    const SLOTS: u64 = MAX_BACKENDS_PER_SERVICE as u64;
    let divisor = weights.iter().fold(0, |g, w| gcd(g, *w)).max(1);
    let reduced: Vec<u32> = weights.iter().map(|w| w / divisor).collect();
    let total: u64 = reduced.iter().map(|w| u64::from(*w)).sum();
    if total <= SLOTS {
        return reduced;
    }
    let weight = |i: usize| u64::from(reduced[i]);
    let mut slots: Vec<u64> = (0..reduced.len())
        .map(|i| (weight(i) * SLOTS / total).max(1))
        .collect();
    // slots[i] / weight(i), compared without division.
    let served =
        |slots: &[u64], i: usize, j: usize| (slots[i] * weight(j)).cmp(&(slots[j] * weight(i)));
    while slots.iter().sum::<u64>() > SLOTS {
        let most = (0..slots.len())
            .filter(|i| slots[*i] > 1)
            .max_by(|i, j| served(&slots, *i, *j))
            .expect("at most SLOTS backends, so some have more than one slot");
        slots[most] -= 1;
    }
    while slots.iter().sum::<u64>() < SLOTS {
        let least = (0..slots.len())
            .min_by(|i, j| served(&slots, *i, *j))
            .expect("backends");
        slots[least] += 1;
    }
    slots.iter().map(|s| *s as u32).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Map writes that turn `actual` into `desired`, in the order they must be applied so that
/// the data plane never picks a backend that is not (yet, or any more) active, nor one on a
/// node it does not (yet, or any more) know:
/// 1. `mesh` (this node's underlay address, VNI and port: what every encapsulation uses), with
///    `mesh6` (this node's IPv6 address) written before it when the node has one, after it
///    when not: `MESH` never names an IPv6 node whose address `MESH6` lacks;
/// 2. `nodes_to_add` with `node_addrs6_to_write` and `nodes6_to_write` (a node's VXLAN is
///    accepted, and its address known, before any of its backends can be chosen), then
///    `local_backends_to_add` (before the other nodes can send flows to them);
/// 3. `backends_to_write` (new backends become active before any service lists them; their
///    counters are zeroed first when `new_backend_ids` says the slot is fresh);
/// 4. `maglev_to_write` (the tables name active backends only, and a service that becomes a
///    maglev service finds its table);
/// 5. `services_to_write` (new round-robin cursors start at 0 for `new_service_ids`);
/// 6. `service_ports_to_write` (a port's bit is set once its service is there to be found,
///    and cleared before the service goes: a bit without its service, or a service without
///    its bit, both mean "no service here");
/// 7. `services_to_delete`;
/// 8. `maglev_to_delete` (tables no service reads any more);
/// 9. `backends_to_clear` (deactivated after the services stop listing them: flows pinned to
///    them then choose again);
/// 10. `local_backends_to_remove`, then `nodes_to_remove`, `nodes6_to_remove` and
///     `node_addrs6_to_remove` (last: once no backend sends there).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub mesh: Option<MeshConfig>,
    pub mesh6: Option<Addr6>,
    pub nodes_to_add: Vec<u32>,
    /// `NODES6` and `NODE_ADDRS6` entries that are new or changed, and those no node has.
    pub nodes6_to_write: Vec<(Addr6, u32)>,
    pub node_addrs6_to_write: Vec<(u32, Addr6)>,
    pub nodes6_to_remove: Vec<Addr6>,
    pub node_addrs6_to_remove: Vec<u32>,
    pub local_backends_to_add: Vec<LocalBackendKey>,
    pub backends_to_write: Vec<(u32, Backend)>,
    pub new_backend_ids: Vec<u32>,
    /// Maglev tables by service id.
    pub maglev_to_write: Vec<(u32, Box<MaglevTable>)>,
    pub services_to_write: Vec<(ServiceKey, ServiceValue)>,
    pub new_service_ids: Vec<u32>,
    /// Words of `SERVICE_PORTS` by index, with their new value (0 for a word no longer used).
    pub service_ports_to_write: Vec<(u32, u64)>,
    pub services_to_delete: Vec<ServiceKey>,
    pub maglev_to_delete: Vec<u32>,
    pub backends_to_clear: Vec<u32>,
    pub local_backends_to_remove: Vec<LocalBackendKey>,
    pub nodes_to_remove: Vec<u32>,
    /// `LOCAL_BACKENDS6`, added and removed with `LOCAL_BACKENDS`.
    pub local_backends6_to_add: Vec<LocalBackendKey6>,
    pub local_backends6_to_remove: Vec<LocalBackendKey6>,
    /// The IPv6 halves, written and deleted with their IPv4 counterparts: addresses before the
    /// backends that use them, tables before the services.
    pub backend_addrs6_to_write: Vec<(u32, Addr6)>,
    pub maglev6_to_write: Vec<(u32, Box<MaglevTable>)>,
    pub services6_to_write: Vec<(ServiceKey6, ServiceValue)>,
    pub new_service_ids6: Vec<u32>,
    pub services6_to_delete: Vec<ServiceKey6>,
    pub maglev6_to_delete: Vec<u32>,
}

impl Delta {
    /// How many map entries the delta writes or deletes (counter and cursor resets aside).
    pub fn writes(&self) -> usize {
        usize::from(self.mesh.is_some())
            + usize::from(self.mesh6.is_some())
            + self.nodes_to_add.len()
            + self.nodes6_to_write.len()
            + self.node_addrs6_to_write.len()
            + self.nodes6_to_remove.len()
            + self.node_addrs6_to_remove.len()
            + self.local_backends_to_add.len()
            + self.backends_to_write.len()
            + self.maglev_to_write.len()
            + self.services_to_write.len()
            + self.service_ports_to_write.len()
            + self.services_to_delete.len()
            + self.maglev_to_delete.len()
            + self.backends_to_clear.len()
            + self.local_backends_to_remove.len()
            + self.nodes_to_remove.len()
            + self.local_backends6_to_add.len()
            + self.local_backends6_to_remove.len()
            + self.backend_addrs6_to_write.len()
            + self.maglev6_to_write.len()
            + self.services6_to_write.len()
            + self.services6_to_delete.len()
            + self.maglev6_to_delete.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes() == 0
    }
}

/// The entries of `desired` that `actual` lacks or holds with another value.
fn changed_entries<K: Ord + Copy, V: PartialEq + Copy>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    desired
        .iter()
        .filter(|(key, value)| actual.get(key) != Some(value))
        .map(|(key, value)| (*key, *value))
        .collect()
}

/// The keys of `actual` that `desired` has not.
fn missing_keys<K: Ord + Copy, V>(desired: &BTreeMap<K, V>, actual: &BTreeMap<K, V>) -> Vec<K> {
    actual
        .keys()
        .filter(|key| !desired.contains_key(key))
        .copied()
        .collect()
}

pub fn delta(desired: &MapContents, actual: &MapContents) -> Delta {
    let mut delta = Delta {
        mesh: (desired.mesh != actual.mesh).then_some(desired.mesh),
        mesh6: (desired.mesh6 != actual.mesh6).then_some(desired.mesh6),
        nodes_to_add: desired.nodes.difference(&actual.nodes).copied().collect(),
        nodes_to_remove: actual.nodes.difference(&desired.nodes).copied().collect(),
        nodes6_to_write: changed_entries(&desired.nodes6, &actual.nodes6),
        nodes6_to_remove: missing_keys(&desired.nodes6, &actual.nodes6),
        node_addrs6_to_write: changed_entries(&desired.node_addrs6, &actual.node_addrs6),
        node_addrs6_to_remove: missing_keys(&desired.node_addrs6, &actual.node_addrs6),
        local_backends_to_add: desired
            .local_backends
            .difference(&actual.local_backends)
            .copied()
            .collect(),
        local_backends_to_remove: actual
            .local_backends
            .difference(&desired.local_backends)
            .copied()
            .collect(),
        local_backends6_to_add: desired
            .local_backends6
            .difference(&actual.local_backends6)
            .copied()
            .collect(),
        local_backends6_to_remove: actual
            .local_backends6
            .difference(&desired.local_backends6)
            .copied()
            .collect(),
        ..Delta::default()
    };
    for (id, backend) in &desired.backends {
        match actual.backends.get(id) {
            Some(current) if current == backend => {}
            // Same backend reached another way (this instance became, or stopped being, its
            // node): rewritten in place, its counters kept.
            Some(current)
                if current.ip_be == backend.ip_be
                    && current.port_be == backend.port_be
                    && actual.backend_addrs6.get(id) == desired.backend_addrs6.get(id) =>
            {
                delta.backends_to_write.push((*id, *backend));
            }
            _ => {
                delta.backends_to_write.push((*id, *backend));
                delta.new_backend_ids.push(*id);
            }
        }
    }
    let actual_service_ids: BTreeMap<u32, &ServiceKey> = actual
        .services
        .iter()
        .map(|(key, value)| (value.service_id, key))
        .collect();
    for (key, value) in &desired.services {
        if actual.services.get(key) != Some(value) {
            delta.services_to_write.push((*key, *value));
        }
        if actual_service_ids.get(&value.service_id) != Some(&key) {
            delta.new_service_ids.push(value.service_id);
        }
    }
    for (word, bits) in &desired.service_ports {
        if actual.service_ports.get(word) != Some(bits) {
            delta.service_ports_to_write.push((*word, *bits));
        }
    }
    for word in actual.service_ports.keys() {
        if !desired.service_ports.contains_key(word) {
            delta.service_ports_to_write.push((*word, 0));
        }
    }
    delta.services_to_delete = actual
        .services
        .keys()
        .filter(|key| !desired.services.contains_key(key))
        .copied()
        .collect();
    for (id, table) in &desired.maglev {
        if actual.maglev.get(id) != Some(table) {
            delta.maglev_to_write.push((*id, table.clone()));
        }
    }
    delta.maglev_to_delete = actual
        .maglev
        .keys()
        .filter(|id| !desired.maglev.contains_key(id))
        .copied()
        .collect();
    delta.backends_to_clear = actual
        .backends
        .keys()
        .filter(|id| !desired.backends.contains_key(id))
        .copied()
        .collect();
    for (id, addr) in &desired.backend_addrs6 {
        if actual.backend_addrs6.get(id) != Some(addr) {
            delta.backend_addrs6_to_write.push((*id, *addr));
        }
    }
    let actual_service_ids6: BTreeMap<u32, &ServiceKey6> = actual
        .services6
        .iter()
        .map(|(key, value)| (value.service_id, key))
        .collect();
    for (key, value) in &desired.services6 {
        if actual.services6.get(key) != Some(value) {
            delta.services6_to_write.push((*key, *value));
        }
        if actual_service_ids6.get(&value.service_id) != Some(&key) {
            delta.new_service_ids6.push(value.service_id);
        }
    }
    delta.services6_to_delete = actual
        .services6
        .keys()
        .filter(|key| !desired.services6.contains_key(key))
        .copied()
        .collect();
    for (id, table) in &desired.maglev6 {
        if actual.maglev6.get(id) != Some(table) {
            delta.maglev6_to_write.push((*id, table.clone()));
        }
    }
    delta.maglev6_to_delete = actual
        .maglev6
        .keys()
        .filter(|id| !desired.maglev6.contains_key(id))
        .copied()
        .collect();
    delta
}

#[cfg(test)]
mod tests {
    use super::*;
    const MAGLEV_SIZE: usize = lb_common::MAGLEV_TABLE_SIZE as usize;
    use crate::table::{Proto, parse_backend, parse_backend_spec, parse_weighted_backend_spec};
    use lb_common::{PROTO_TCP, PROTO_UDP, SERVICE_PORT_ANY, SERVICE_PORT_VIP};
    use std::net::Ipv4Addr;

    /// A table of services whose backends are `IP:PORT` or `IP:PORT@NODE`.
    fn table(services: &[(&str, u16, &[&str])]) -> Table {
        mesh_table(&[], services)
    }

    /// Nodes `(name, underlay IP)` first, then services.
    fn mesh_table(nodes: &[(&str, &str)], services: &[(&str, u16, &[&str])]) -> Table {
        let mut table = Table::default();
        for (name, ip) in nodes {
            table.add_node(name, ip.parse().unwrap()).unwrap();
        }
        for (name, port, backends) in services {
            let specs: Vec<_> = backends
                .iter()
                .map(|b| parse_weighted_backend_spec(b).unwrap())
                .collect();
            table
                .add_service(name, Proto::Tcp, *port, None, &specs)
                .unwrap();
        }
        table
    }

    const NODES: &[(&str, &str)] = &[("n1", "192.168.1.1"), ("n2", "192.168.1.2")];
    const N1: u32 = u32::from_ne_bytes([192, 168, 1, 1]);
    const N2: u32 = u32::from_ne_bytes([192, 168, 1, 2]);
    const N3: u32 = u32::from_ne_bytes([192, 168, 1, 3]);

    /// `web` with a plain backend (id 0), one on n1 (id 1) and one on n2 (id 2).
    fn web_on_two_nodes() -> Table {
        mesh_table(
            NODES,
            &[(
                "web",
                8080,
                &["10.0.0.6:80", "10.0.0.7:80@n1", "10.0.0.8:80@n2"],
            )],
        )
    }

    fn node_ips(contents: &MapContents) -> Vec<u32> {
        (0..3).map(|id| contents.backends[&id].node_ip_be).collect()
    }

    #[test]
    fn service_ports_follow_the_services_and_clear_what_they_no_longer_use() {
        let mut both = table(&[("web", 8080, &["10.0.0.6:80"])]);
        let vip = Some(Ipv4Addr::new(10, 9, 0, 1).into());
        both.add_service(
            "dns",
            Proto::Udp,
            8080,
            vip,
            &[parse_backend_spec("10.0.0.7:53").unwrap()],
        )
        .unwrap();
        both.add_service(
            "api",
            Proto::Tcp,
            8081,
            vip,
            &[parse_backend_spec("10.0.0.8:80").unwrap()],
        )
        .unwrap();
        let contents = desired(&both, None);
        let bits = |proto, port: u16| {
            let (word, shift) = service_port_slot(proto, port.to_be()).unwrap();
            contents
                .service_ports
                .get(&word)
                .map_or(0, |w| w >> shift & 3)
        };
        assert_eq!(bits(PROTO_TCP, 8080), SERVICE_PORT_ANY);
        assert_eq!(bits(PROTO_UDP, 8080), SERVICE_PORT_VIP);
        assert_eq!(bits(PROTO_TCP, 8081), SERVICE_PORT_VIP);
        assert_eq!(bits(PROTO_TCP, 8082) | bits(PROTO_UDP, 8081), 0);
        // 8080/tcp and 8081/tcp share a word, 8080/udp has its own.
        assert_eq!(contents.service_ports.len(), 2);

        let web_only = desired(&table(&[("web", 8080, &["10.0.0.6:80"])]), None);
        let delta = delta(&web_only, &contents);
        let (tcp_word, _) = service_port_slot(PROTO_TCP, 8080u16.to_be()).unwrap();
        let (udp_word, _) = service_port_slot(PROTO_UDP, 8080u16.to_be()).unwrap();
        assert_eq!(
            delta.service_ports_to_write,
            [(tcp_word, web_only.service_ports[&tcp_word]), (udp_word, 0)]
        );
        assert_eq!(delta.services_to_delete.len(), 2);
    }

    #[test]
    fn each_family_has_its_half_of_a_service() {
        let t = table(&[(
            "web",
            8080,
            &["10.0.0.6:80", "[2001:db8::6]:80", "[2001:db8::7]:80"],
        )]);
        let contents = desired(&t, None);
        let (_, v4) = contents.services.iter().next().unwrap();
        let (key6, v6) = contents.services6.iter().next().unwrap();
        assert_eq!((v4.backend_count, v4.backend_ids[0]), (1, 0));
        assert_eq!(
            (v6.backend_count, &v6.backend_ids[..2]),
            (2, &[1u32, 2][..])
        );
        assert_eq!((key6.vip, u16::from_be(key6.port_be)), ([0; 16], 8080));
        assert_eq!(v4.flags | v6.flags, 0);
        let addr6: [u8; 16] = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        assert_eq!(contents.backend_addrs6[&2], addr6);
        assert_eq!(contents.backends[&2].flags, BACKEND_ACTIVE | BACKEND_IPV6);
        assert_eq!(contents.backends[&2].ip_be, 0);
        // One service port word, whatever the families.
        assert_eq!(contents.service_ports.len(), 1);

        // A family without backends says the service has the other's only.
        let v4_only = desired(&table(&[("web", 8080, &["10.0.0.6:80"])]), None);
        let (_, v6) = v4_only.services6.iter().next().unwrap();
        assert_eq!((v6.backend_count, v6.flags), (0, SERVICE_OTHER_FAMILY_ONLY));
        let empty = desired(&table(&[("web", 8080, &[])]), None);
        assert_eq!(empty.services6.values().next().unwrap().flags, 0);
        // The IPv6 half's writes: addresses, then the service.
        let delta = delta(&contents, &v4_only);
        assert_eq!(delta.backend_addrs6_to_write.len(), 2);
        assert_eq!(delta.services6_to_write.len(), 1);
        assert!(super::delta(&contents, &contents).is_empty());
    }

    #[test]
    fn keys_and_addresses_are_in_network_byte_order() {
        let contents = desired(&table(&[("web", 8080, &["10.0.0.6:80"])]), None);
        let (key, value) = contents.services.iter().next().unwrap();
        assert_eq!(key.port_be.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(key.vip_be, 0);
        assert_eq!(key.proto, 6);
        assert_eq!(value.backend_count, 1);
        let backend = contents.backends[&value.backend_ids[0]];
        assert_eq!(backend.ip_be.to_ne_bytes(), [10, 0, 0, 6]);
        assert_eq!(backend.port_be.to_ne_bytes(), [0, 80]);
        assert_eq!(backend.flags, BACKEND_ACTIVE);
    }

    #[test]
    fn from_empty_everything_is_new_and_nothing_is_removed() {
        let want = desired(
            &table(&[("web", 8080, &["10.0.0.6:80", "10.0.0.7:80"])]),
            None,
        );
        let delta = delta(&want, &MapContents::default());
        assert_eq!(delta.backends_to_write.len(), 2);
        assert_eq!(delta.new_backend_ids, vec![0, 1]);
        assert_eq!(delta.services_to_write.len(), 1);
        assert_eq!(delta.new_service_ids, vec![0]);
        assert!(delta.services_to_delete.is_empty() && delta.backends_to_clear.is_empty());
    }

    /// The backend ids new flows may choose in `web`, and its flags.
    fn choosable(table: &Table) -> (Vec<u32>, u32) {
        let contents = desired(table, None);
        let value = contents.services.values().next().unwrap();
        let ids = value.backend_ids[..value.backend_count as usize].to_vec();
        // Every backend stays active for its existing flows, chosen or not.
        assert!(
            contents
                .backends
                .values()
                .all(|b| b.flags == BACKEND_ACTIVE)
        );
        (ids, value.flags)
    }

    #[test]
    fn drained_and_unhealthy_backends_leave_the_choice_but_stay_active() {
        let mut t = table(&[("web", 8080, &["10.0.0.6:80", "10.0.0.7:80", "10.0.0.8:80"])]);
        assert_eq!(choosable(&t), (vec![0, 1, 2], 0));
        t.set_drained("web", parse_backend("10.0.0.7:80").unwrap(), true)
            .unwrap();
        assert_eq!(choosable(&t), (vec![0, 2], 0));
        assert!(t.set_health("web", 2, crate::table::Health::Unhealthy));
        assert_eq!(choosable(&t), (vec![0], 0));
        // Unhealthy too: every undrained backend is unhealthy, the service fails open.
        assert!(t.set_health("web", 0, crate::table::Health::Unhealthy));
        assert_eq!(choosable(&t), (vec![0, 2], SERVICE_FAIL_OPEN));
        assert!(t.set_health("web", 2, crate::table::Health::Healthy));
        assert_eq!(choosable(&t), (vec![2], 0));
        // Everything drained: nothing to choose, and no failing open onto drained backends.
        for addr in ["10.0.0.6:80", "10.0.0.8:80"] {
            t.set_drained("web", parse_backend(addr).unwrap(), true)
                .unwrap();
        }
        assert_eq!(choosable(&t), (vec![], 0));
    }

    #[test]
    fn weights_repeat_backends_in_the_round_robin_order_spread_out() {
        let t = table(&[(
            "web",
            8080,
            &["10.0.0.6:80*3", "10.0.0.7:80", "10.0.0.8:80*0"],
        )]);
        assert_eq!(
            choosable(&t),
            (vec![0, 0, 1, 0], 0),
            "weight 0 gets no turn"
        );
        let t = table(&[(
            "web",
            8080,
            &["10.0.0.6:80*4", "10.0.0.7:80*4", "10.0.0.8:80*2"],
        )]);
        assert_eq!(choosable(&t), (vec![0, 1, 2, 0, 1], 0), "reduced to 2:2:1");
        // What fits in the 128 slots is exact; beyond, shares of every slot.
        assert_eq!(slot_counts(&[1, 1, 1]), [1, 1, 1]);
        assert_eq!(slot_counts(&[200, 100, 50]), [4, 2, 1]);
        assert_eq!(slot_counts(&[97, 89]), [67, 61]);
        assert_eq!(slot_counts(&[256, 1]), [127, 1]);
        let mut many = vec![1; 128];
        many[0] = 2;
        assert_eq!(
            slot_counts(&many),
            vec![1; 128],
            "the slots cannot tell 2 from 1"
        );
        let mut heavy_and_light = vec![1; 64];
        heavy_and_light[0] = 256;
        let slots = slot_counts(&heavy_and_light);
        assert_eq!(slots.iter().sum::<u32>(), 128);
        assert_eq!((slots[0], slots[1]), (65, 1));
    }

    #[test]
    fn a_maglev_service_has_a_table_of_its_selectable_backends() {
        let mut t = table(&[("web", 8080, &["10.0.0.6:80", "10.0.0.7:80*3"])]);
        let round_robin = desired(&t, None);
        assert!(round_robin.maglev.is_empty());
        t.set_scheduler("web", Scheduler::Maglev).unwrap();
        let maglev = desired(&t, None);
        let value = maglev.services.values().next().unwrap();
        assert_eq!(value.scheduler, lb_common::SCHEDULER_MAGLEV);
        assert_eq!(
            value.backend_count, 4,
            "still says there is a backend to choose"
        );
        let slots = |contents: &MapContents, id: u32| {
            contents.maglev[&0]
                .backend_ids
                .iter()
                .filter(|b| **b == id)
                .count()
        };
        assert_eq!(slots(&maglev, 0) + slots(&maglev, 1), MAGLEV_SIZE);
        assert!(
            (4000..4200).contains(&slots(&maglev, 0)),
            "a quarter: weight 1 of 4"
        );

        // Written before the service that reads it, deleted after it stops reading it.
        let delta = delta(&maglev, &round_robin);
        assert_eq!(delta.maglev_to_write.len(), 1);
        assert_eq!(delta.services_to_write.len(), 1);
        // The IPv6 half (no IPv6 backend: no table) changes its scheduler too.
        assert_eq!(delta.services6_to_write.len(), 1);
        assert_eq!(delta.writes(), 3);
        t.set_drained("web", parse_backend("10.0.0.7:80").unwrap(), true)
            .unwrap();
        let drained = desired(&t, None);
        assert_eq!(
            slots(&drained, 0),
            MAGLEV_SIZE,
            "a drained backend leaves the table"
        );
        t.set_drained("web", parse_backend("10.0.0.6:80").unwrap(), true)
            .unwrap();
        assert!(
            desired(&t, None).maglev.is_empty(),
            "nothing to choose: no table"
        );
        t.set_scheduler("web", Scheduler::RoundRobin).unwrap();
        let back = super::delta(&desired(&t, None), &maglev);
        assert_eq!(back.maglev_to_delete, [0]);
        assert!(super::delta(&maglev, &maglev).is_empty());
    }

    #[test]
    fn every_node_builds_the_same_maglev_table_whatever_its_ids() {
        // Two nodes that numbered the same backends differently (they were added in another
        // order): the tables hold other ids, for the same backends in the same slots.
        let backends = ["10.0.0.6:80@n1", "10.0.0.7:80@n2*2", "10.0.0.8:80"];
        let mut one = mesh_table(NODES, &[("web", 8080, &backends)]);
        let mut reversed = backends;
        reversed.reverse();
        let mut other = mesh_table(NODES, &[("web", 8080, &reversed)]);
        for t in [&mut one, &mut other] {
            t.set_scheduler("web", Scheduler::Maglev).unwrap();
        }
        let by_identity = |t: &Table, self_node| -> Vec<String> {
            let web = t.service("web").unwrap();
            desired(t, self_node).maglev[&web.id]
                .backend_ids
                .iter()
                .map(|id| {
                    web.backends
                        .iter()
                        .find(|b| b.id == *id)
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_ne!(
            one.service("web").unwrap().backends[0].id,
            other.service("web").unwrap().backends[2].id
        );
        assert_eq!(
            by_identity(&one, Some("n1")),
            by_identity(&other, Some("n2"))
        );
    }

    #[test]
    fn applied_state_yields_no_writes() {
        let want = desired(
            &table(&[
                ("web", 8080, &["10.0.0.6:80"]),
                ("api", 9090, &["10.0.0.7:80"]),
            ]),
            None,
        );
        assert!(delta(&want, &want).is_empty());
    }

    #[test]
    fn removing_a_backend_rewrites_the_service_then_clears_the_slot() {
        let mut t = table(&[("web", 8080, &["10.0.0.6:80", "10.0.0.7:80"])]);
        let before = desired(&t, None);
        t.remove_backends("web", &[parse_backend("10.0.0.6:80").unwrap()])
            .unwrap();
        let delta = delta(&desired(&t, None), &before);
        assert!(delta.backends_to_write.is_empty());
        assert_eq!(delta.services_to_write.len(), 1);
        assert_eq!(delta.services_to_write[0].1.backend_count, 1);
        assert_eq!(delta.services_to_write[0].1.backend_ids[0], 1);
        assert!(
            delta.new_service_ids.is_empty(),
            "the cursor of a kept service keeps turning"
        );
        assert_eq!(delta.backends_to_clear, vec![0]);
    }

    #[test]
    fn removing_a_service_deletes_its_key_and_clears_its_backends() {
        let mut t = table(&[
            ("web", 8080, &["10.0.0.6:80"]),
            ("api", 9090, &["10.0.0.7:80"]),
        ]);
        let before = desired(&t, None);
        t.remove_service("web").unwrap();
        let delta = delta(&desired(&t, None), &before);
        assert_eq!(delta.services_to_delete.len(), 1);
        assert_eq!(u16::from_be(delta.services_to_delete[0].port_be), 8080);
        assert_eq!(delta.backends_to_clear, vec![0]);
        assert!(delta.services_to_write.is_empty());
    }

    #[test]
    fn a_slot_that_changed_address_counts_as_new() {
        let before = desired(&table(&[("web", 8080, &["10.0.0.6:80"])]), None);
        let after = desired(&table(&[("web", 8080, &["10.0.0.9:80"])]), None);
        let delta = delta(&after, &before);
        assert_eq!(
            delta.new_backend_ids,
            vec![0],
            "its counters must start from zero"
        );
    }

    #[test]
    fn without_a_self_node_every_node_is_remote_and_nothing_is_local() {
        let contents = desired(&web_on_two_nodes(), None);
        assert_eq!(
            contents.mesh,
            MeshConfig {
                local_ip_be: 0,
                vni: 4096,
                vxlan_port_be: 4789u16.to_be(),
                _pad: 0
            }
        );
        assert_eq!(contents.mesh.vxlan_port_be.to_ne_bytes(), [0x12, 0xb5]);
        assert_eq!(contents.nodes, [N1, N2].into());
        assert_eq!(node_ips(&contents), [0, N1, N2]);
    }

    #[test]
    fn the_self_node_is_local_and_not_in_nodes() {
        let mut table = web_on_two_nodes();
        table.set_mesh(Some(77), Some(8472)).unwrap();
        let contents = desired(&table, Some("n1"));
        assert_eq!(contents.mesh.local_ip_be, N1);
        assert_eq!(contents.mesh.local_ip_be.to_ne_bytes(), [192, 168, 1, 1]);
        assert_eq!(contents.mesh.vni, 77);
        assert_eq!(u16::from_be(contents.mesh.vxlan_port_be), 8472);
        assert_eq!(contents.nodes, [N2].into());
        assert_eq!(
            node_ips(&contents),
            [0, 0, N2],
            "a backend on this node is reached by plain routing"
        );
    }

    #[test]
    fn an_applied_mesh_yields_no_writes() {
        let want = desired(&web_on_two_nodes(), Some("n2"));
        assert!(delta(&want, &want).is_empty());
        // The mesh, n1, three backends, the service (both halves: the IPv6 one says it has
        // none of its family) and its port, and the two backends n2 routes itself.
        assert_eq!(
            delta(&want, &MapContents::default()).writes(),
            1 + 1 + 3 + 2 + 1 + 2
        );
    }

    /// Decapsulated packets may go only to the backends a node reaches itself: those on it and
    /// those on no node, by address, port and protocol.
    #[test]
    fn local_backends_are_the_ones_this_node_routes_itself() {
        let local = |ip: [u8; 4], port: u16| LocalBackendKey {
            ip_be: u32::from_ne_bytes(ip),
            port_be: port.to_be(),
            proto: lb_common::PROTO_TCP,
            _pad: 0,
        };
        let table = web_on_two_nodes();
        assert_eq!(
            desired(&table, Some("n1")).local_backends,
            [local([10, 0, 0, 6], 80), local([10, 0, 0, 7], 80)].into()
        );
        assert_eq!(
            desired(&table, Some("n2")).local_backends,
            [local([10, 0, 0, 6], 80), local([10, 0, 0, 8], 80)].into()
        );
        let mut moved = table.clone();
        moved
            .remove_backends("web", &[parse_backend("10.0.0.7:80").unwrap()])
            .unwrap();
        let delta = delta(&desired(&moved, Some("n1")), &desired(&table, Some("n1")));
        assert_eq!(delta.local_backends_to_remove, [local([10, 0, 0, 7], 80)]);
        assert!(delta.local_backends_to_add.is_empty());
    }

    /// IPv6 backends on another node carry its underlay address (the data plane encapsulates
    /// to it over the IPv4 underlay); those on this node, or on none, are in `LOCAL_BACKENDS6`.
    #[test]
    fn ipv6_backends_are_placed_on_their_nodes_as_ipv4_ones() {
        let table = mesh_table(
            &[("n1", "192.168.1.1"), ("n2", "192.168.1.2")],
            &[(
                "web",
                8080,
                &[
                    "[2001:db8::6]:80@n1",
                    "[2001:db8::7]:80@n2",
                    "[2001:db8::8]:80",
                ],
            )],
        );
        let local = |last: u8| {
            let mut addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            addr[15] = last;
            LocalBackendKey6 {
                addr,
                port_be: 80u16.to_be(),
                proto: lb_common::PROTO_TCP,
                _pad: 0,
            }
        };
        let n1 = desired(&table, Some("n1"));
        assert_eq!(n1.local_backends6, [local(6), local(8)].into());
        assert!(n1.local_backends.is_empty());
        let nodes: Vec<u32> = n1.backends.values().map(|b| b.node_ip_be).collect();
        assert_eq!(nodes, [0, u32::from_ne_bytes([192, 168, 1, 2]), 0]);
        let n2 = desired(&table, Some("n2"));
        assert_eq!(n2.local_backends6, [local(7), local(8)].into());
        let delta = delta(&n2, &n1);
        assert_eq!(delta.local_backends6_to_add, [local(7)]);
        assert_eq!(delta.local_backends6_to_remove, [local(6)]);
    }

    #[test]
    fn from_empty_the_mesh_and_nodes_come_with_everything_else() {
        let delta = delta(
            &desired(&web_on_two_nodes(), Some("n1")),
            &MapContents::default(),
        );
        assert_eq!(delta.mesh.unwrap().local_ip_be, N1);
        assert_eq!(delta.nodes_to_add, [N2]);
        assert_eq!(delta.new_backend_ids, [0, 1, 2]);
        assert!(delta.nodes_to_remove.is_empty());
    }

    #[test]
    fn nodes_come_and_go_around_their_backends() {
        let mut t = mesh_table(
            &[("n1", "192.168.1.1"), ("n3", "192.168.1.3")],
            &[("web", 8080, &["10.0.0.7:80@n1", "10.0.0.9:80@n3"])],
        );
        let before = desired(&t, Some("n1"));
        t.remove_backends("web", &[parse_backend_spec("10.0.0.9:80@n3").unwrap()])
            .unwrap();
        t.remove_node("n3").unwrap();
        t.add_node("n2", "192.168.1.2".parse().unwrap()).unwrap();
        t.add_backends("web", &[parse_backend_spec("10.0.0.8:80@n2").unwrap()])
            .unwrap();
        let delta = delta(&desired(&t, Some("n1")), &before);
        assert_eq!(delta.mesh, None, "the mesh settings did not change");
        assert_eq!(delta.nodes_to_add, [N2]);
        assert_eq!(
            delta.backends_to_write,
            [(2, desired(&t, Some("n1")).backends[&2])]
        );
        assert_eq!(delta.backends_to_write[0].1.node_ip_be, N2);
        assert_eq!(delta.new_backend_ids, [2]);
        assert_eq!(delta.services_to_write[0].1.backend_ids[..2], [0, 2]);
        assert_eq!(delta.backends_to_clear, [1]);
        assert_eq!(delta.nodes_to_remove, [N3]);
    }

    #[test]
    fn a_backend_moved_to_another_node_is_a_new_backend() {
        let mut t = web_on_two_nodes();
        let before = desired(&t, None);
        t.remove_backends("web", &[parse_backend_spec("10.0.0.7:80").unwrap()])
            .unwrap();
        t.add_backends("web", &[parse_backend_spec("10.0.0.7:80@n2").unwrap()])
            .unwrap();
        let delta = delta(&desired(&t, None), &before);
        assert_eq!(delta.new_backend_ids, [3]);
        assert_eq!(delta.backends_to_write[0].1.node_ip_be, N2);
        assert_eq!(
            delta.backends_to_clear,
            [1],
            "flows pinned to the old one choose again"
        );
        assert!(delta.nodes_to_add.is_empty() && delta.nodes_to_remove.is_empty());
    }

    #[test]
    fn becoming_a_node_rewrites_its_backends_in_place() {
        let t = web_on_two_nodes();
        let delta = delta(&desired(&t, Some("n2")), &desired(&t, None));
        assert_eq!(delta.mesh.unwrap().local_ip_be, N2);
        assert_eq!(delta.backends_to_write.len(), 1);
        assert_eq!(delta.backends_to_write[0].0, 2);
        assert_eq!(delta.backends_to_write[0].1.node_ip_be, 0);
        assert!(
            delta.new_backend_ids.is_empty(),
            "same backend, same counters"
        );
        assert!(delta.services_to_write.is_empty());
        assert_eq!(delta.nodes_to_remove, [N2]);
        assert!(delta.nodes_to_add.is_empty());
    }

    #[test]
    fn changing_the_vni_rewrites_only_the_mesh() {
        let mut t = web_on_two_nodes();
        let before = desired(&t, Some("n1"));
        t.set_mesh(Some(5000), None).unwrap();
        let delta = delta(&desired(&t, Some("n1")), &before);
        assert_eq!(delta.mesh.unwrap().vni, 5000);
        assert_eq!(delta.writes(), 1);
    }

    const V6_NODES: &[(&str, &str)] = &[
        ("n1", "2001:db8::1"),
        ("n2", "2001:db8::2"),
        ("n3", "2001:db8::3"),
    ];

    fn v6(s: &str) -> Addr6 {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    fn key6(s: &str) -> u32 {
        lb_common::ipv6_node_key(&v6(s))
    }

    #[test]
    fn an_ipv6_underlays_nodes_are_keys_everywhere_and_addresses_in_their_own_maps() {
        let t = mesh_table(
            V6_NODES,
            &[(
                "web",
                8080,
                &["10.0.0.6:80", "10.0.0.7:80@n2", "[2001:db8:5::8]:80@n3"],
            )],
        );
        let contents = desired(&t, Some("n1"));
        let (k1, k2, k3) = (
            key6("2001:db8::1"),
            key6("2001:db8::2"),
            key6("2001:db8::3"),
        );
        assert!([k1, k2, k3].iter().all(|k| lb_common::is_ipv6_node_key(*k)));
        assert_eq!(contents.mesh.local_ip_be, k1, "this node by its key, not 0");
        assert_eq!(contents.mesh6, v6("2001:db8::1"));
        assert_eq!(contents.nodes, BTreeSet::from([k2, k3]));
        assert_eq!(
            contents.nodes6,
            BTreeMap::from([(v6("2001:db8::2"), k2), (v6("2001:db8::3"), k3)])
        );
        assert_eq!(
            contents.node_addrs6,
            BTreeMap::from([(k2, v6("2001:db8::2")), (k3, v6("2001:db8::3"))])
        );
        // The backends' family is the tasks', not the underlay's.
        assert_eq!(contents.backends[&0].node_ip_be, 0, "routed, on no node");
        assert_eq!(contents.backends[&1].node_ip_be, k2);
        assert_eq!(contents.backends[&1].flags, BACKEND_ACTIVE);
        assert_eq!(contents.backends[&2].node_ip_be, k3);
        assert_eq!(contents.backends[&2].flags, BACKEND_ACTIVE | BACKEND_IPV6);
        assert_eq!(contents.local_backends.len(), 1, "10.0.0.6 only");

        // An instance that is none of the nodes: every node is remote, nothing is local.
        let outside = desired(&t, None);
        assert_eq!((outside.mesh.local_ip_be, outside.mesh6), (0, [0; 16]));
        assert_eq!(outside.nodes6.len(), 3);
        assert_eq!(outside.node_addrs6.len(), 3);
    }

    #[test]
    fn an_ipv4_underlay_leaves_the_ipv6_node_maps_empty() {
        let contents = desired(&web_on_two_nodes(), Some("n1"));
        assert_eq!(contents.mesh.local_ip_be, N1);
        assert_eq!(contents.mesh6, [0; 16]);
        assert!(contents.nodes6.is_empty() && contents.node_addrs6.is_empty());
        assert_eq!(contents.nodes, BTreeSet::from([N2]));
    }

    #[test]
    fn ipv6_nodes_come_and_go_in_every_node_map() {
        let mut t = mesh_table(&V6_NODES[..2], &[("web", 8080, &["10.0.0.7:80@n2"])]);
        let applied = desired(&t, Some("n1"));
        let first = delta(&applied, &MapContents::default());
        assert_eq!(first.mesh6, Some(v6("2001:db8::1")));
        assert_eq!(first.mesh.unwrap().local_ip_be, key6("2001:db8::1"));
        assert_eq!(first.nodes_to_add, [key6("2001:db8::2")]);
        assert_eq!(
            first.nodes6_to_write,
            [(v6("2001:db8::2"), key6("2001:db8::2"))]
        );
        assert_eq!(
            first.node_addrs6_to_write,
            [(key6("2001:db8::2"), v6("2001:db8::2"))]
        );
        assert!(
            delta(&applied, &applied).is_empty(),
            "applied: nothing to write"
        );

        // n2 leaves with its backend, n3 comes.
        t.remove_backends("web", &[parse_backend_spec("10.0.0.7:80@n2").unwrap()])
            .unwrap();
        t.remove_node("n2").unwrap();
        t.add_node("n3", "2001:db8::3".parse().unwrap()).unwrap();
        let change = delta(&desired(&t, Some("n1")), &applied);
        assert_eq!((change.mesh, change.mesh6), (None, None));
        assert_eq!(change.nodes_to_add, [key6("2001:db8::3")]);
        assert_eq!(
            change.nodes6_to_write,
            [(v6("2001:db8::3"), key6("2001:db8::3"))]
        );
        assert_eq!(
            change.node_addrs6_to_write,
            [(key6("2001:db8::3"), v6("2001:db8::3"))]
        );
        assert_eq!(change.nodes_to_remove, [key6("2001:db8::2")]);
        assert_eq!(change.nodes6_to_remove, [v6("2001:db8::2")]);
        assert_eq!(change.node_addrs6_to_remove, [key6("2001:db8::2")]);
        assert_eq!(change.backends_to_clear, [0]);
        assert_eq!(change.writes(), 8 + change.services_to_write.len());

        // This instance stops being a node (its address gone): MESH and MESH6 are cleared.
        let outside = delta(&desired(&t, None), &desired(&t, Some("n1")));
        assert_eq!(outside.mesh.unwrap().local_ip_be, 0);
        assert_eq!(outside.mesh6, Some([0; 16]));
        assert_eq!(
            outside.nodes6_to_write,
            [(v6("2001:db8::1"), key6("2001:db8::1"))]
        );
    }

    #[test]
    fn a_key_that_changes_address_is_rewritten() {
        let mut actual = MapContents::default();
        actual.node_addrs6.insert(7, v6("2001:db8::a"));
        actual.nodes6.insert(v6("2001:db8::a"), 7);
        let mut wanted = MapContents::default();
        wanted.node_addrs6.insert(7, v6("2001:db8::b"));
        wanted.nodes6.insert(v6("2001:db8::b"), 7);
        let change = delta(&wanted, &actual);
        assert_eq!(change.node_addrs6_to_write, [(7, v6("2001:db8::b"))]);
        assert!(
            change.node_addrs6_to_remove.is_empty(),
            "written over, not removed"
        );
        assert_eq!(change.nodes6_to_write, [(v6("2001:db8::b"), 7)]);
        assert_eq!(change.nodes6_to_remove, [v6("2001:db8::a")]);
    }
}
