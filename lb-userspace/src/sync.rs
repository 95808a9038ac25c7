//! Service table → map contents → the smallest set of map writes. Pure logic; `datapath`
//! applies the result.
use std::collections::BTreeMap;

use lb_common::{BACKEND_ACTIVE, Backend, MAX_BACKENDS_PER_SERVICE, ServiceKey, ServiceValue};

use crate::model::{Service, Table};

/// What the `SERVICES` and `BACKENDS` maps should hold (active backends only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
}

pub fn service_key(service: &Service) -> ServiceKey {
    ServiceKey {
        vip_be: service
            .vip
            .map_or(0, |vip| u32::from_ne_bytes(vip.octets())),
        port_be: service.port.to_be(),
        proto: service.proto.number(),
        _pad: 0,
    }
}

pub fn desired(table: &Table) -> MapContents {
    let mut contents = MapContents::default();
    for service in &table.services {
        let mut value = ServiceValue {
            service_id: service.id,
            backend_count: service.backends.len() as u32,
            ..ServiceValue::default()
        };
        assert!(
            service.backends.len() <= MAX_BACKENDS_PER_SERVICE,
            "model enforces the limit"
        );
        for (slot, backend) in service.backends.iter().enumerate() {
            value.backend_ids[slot] = backend.id;
            contents.backends.insert(
                backend.id,
                Backend {
                    ip_be: u32::from_ne_bytes(backend.addr.ip().octets()),
                    port_be: backend.addr.port().to_be(),
                    flags: BACKEND_ACTIVE,
                    service_id: service.id,
                    node_ip_be: 0,
                },
            );
        }
        contents.services.insert(service_key(service), value);
    }
    contents
}

/// Map writes that turn `actual` into `desired`, in the order they must be applied so that
/// the data plane never picks a backend that is not (yet, or any more) active:
/// 1. `backends_to_write` (new backends become active before any service lists them; their
///    counters are zeroed first when `new_backend_ids` says the slot is fresh);
/// 2. `services_to_write` (new round-robin cursors start at 0 for `new_service_ids`);
/// 3. `services_to_delete`;
/// 4. `backends_to_clear` (deactivated last: flows pinned to them then choose again).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub backends_to_write: Vec<(u32, Backend)>,
    pub new_backend_ids: Vec<u32>,
    pub services_to_write: Vec<(ServiceKey, ServiceValue)>,
    pub new_service_ids: Vec<u32>,
    pub services_to_delete: Vec<ServiceKey>,
    pub backends_to_clear: Vec<u32>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.backends_to_write.is_empty()
            && self.services_to_write.is_empty()
            && self.services_to_delete.is_empty()
            && self.backends_to_clear.is_empty()
    }
}

pub fn delta(desired: &MapContents, actual: &MapContents) -> Delta {
    let mut delta = Delta::default();
    for (id, backend) in &desired.backends {
        match actual.backends.get(id) {
            Some(current) if current == backend => {}
            Some(current)
                if current.ip_be == backend.ip_be && current.port_be == backend.port_be =>
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
    delta.services_to_delete = actual
        .services
        .keys()
        .filter(|key| !desired.services.contains_key(key))
        .copied()
        .collect();
    delta.backends_to_clear = actual
        .backends
        .keys()
        .filter(|id| !desired.backends.contains_key(id))
        .copied()
        .collect();
    delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Proto, parse_backend};

    fn table(services: &[(&str, u16, &[&str])]) -> Table {
        let mut table = Table::default();
        for (name, port, backends) in services {
            let addrs: Vec<_> = backends.iter().map(|b| parse_backend(b).unwrap()).collect();
            table
                .add_service(name, Proto::Tcp, *port, None, &addrs)
                .unwrap();
        }
        table
    }

    #[test]
    fn keys_and_addresses_are_in_network_byte_order() {
        let contents = desired(&table(&[("web", 8080, &["10.0.0.6:80"])]));
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
        let want = desired(&table(&[("web", 8080, &["10.0.0.6:80", "10.0.0.7:80"])]));
        let delta = delta(&want, &MapContents::default());
        assert_eq!(delta.backends_to_write.len(), 2);
        assert_eq!(delta.new_backend_ids, vec![0, 1]);
        assert_eq!(delta.services_to_write.len(), 1);
        assert_eq!(delta.new_service_ids, vec![0]);
        assert!(delta.services_to_delete.is_empty() && delta.backends_to_clear.is_empty());
    }

    #[test]
    fn applied_state_yields_no_writes() {
        let want = desired(&table(&[
            ("web", 8080, &["10.0.0.6:80"]),
            ("api", 9090, &["10.0.0.7:80"]),
        ]));
        assert!(delta(&want, &want).is_empty());
    }

    #[test]
    fn removing_a_backend_rewrites_the_service_then_clears_the_slot() {
        let mut t = table(&[("web", 8080, &["10.0.0.6:80", "10.0.0.7:80"])]);
        let before = desired(&t);
        t.remove_backends("web", &[parse_backend("10.0.0.6:80").unwrap()])
            .unwrap();
        let delta = delta(&desired(&t), &before);
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
        let before = desired(&t);
        t.remove_service("web").unwrap();
        let delta = delta(&desired(&t), &before);
        assert_eq!(delta.services_to_delete.len(), 1);
        assert_eq!(u16::from_be(delta.services_to_delete[0].port_be), 8080);
        assert_eq!(delta.backends_to_clear, vec![0]);
        assert!(delta.services_to_write.is_empty());
    }

    #[test]
    fn a_slot_that_changed_address_counts_as_new() {
        let before = desired(&table(&[("web", 8080, &["10.0.0.6:80"])]));
        let after = desired(&table(&[("web", 8080, &["10.0.0.9:80"])]));
        let delta = delta(&after, &before);
        assert_eq!(
            delta.new_backend_ids,
            vec![0],
            "its counters must start from zero"
        );
    }
}
