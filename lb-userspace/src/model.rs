//! The service table: what the operator asked for, validated. Pure logic, no I/O.
use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use lb_common::{MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number, as in the IPv4 header.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("invalid protocol '{s}': expected tcp or udp")),
        }
    }
}

/// Parses a port: 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        Ok(_) => Err(format!("invalid port '{s}': must be between 1 and 65535")),
        Err(_) => Err(format!("invalid port '{s}': not a number")),
    }
}

/// Parses a backend `IPv4:PORT`, rejecting addresses no backend can have.
pub fn parse_backend(s: &str) -> Result<SocketAddrV4, String> {
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid backend '{s}': expected IPv4:PORT"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("invalid backend '{s}': '{ip}' is not an IPv4 address"))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(format!(
            "invalid backend '{s}': {ip} cannot be a backend address"
        ));
    }
    let port = parse_port(port).map_err(|err| format!("invalid backend '{s}': {err}"))?;
    Ok(SocketAddrV4::new(ip, port))
}

/// Parses a virtual IP a service may be published on instead of every local address.
pub fn parse_vip(s: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("invalid VIP '{s}': not an IPv4 address"))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(format!(
            "invalid VIP '{s}': {ip} cannot be a service address"
        ));
    }
    Ok(ip)
}

/// Service names appear in metrics labels and file names: keep them plain.
pub fn validate_name(name: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 63 || !name.chars().all(plain) {
        return Err(format!(
            "invalid service name '{name}': use 1 to 63 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddrV4,
    /// Slot in the data plane's backend array; stable for the backend's lifetime.
    pub id: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    /// Slot of the service's round-robin cursor; stable for the service's lifetime.
    pub id: u32,
    pub proto: Proto,
    pub port: u16,
    /// Published only on this address; `None` publishes on every local address of the node.
    pub vip: Option<Ipv4Addr>,
    /// In round-robin order.
    pub backends: Vec<Backend>,
}

impl Service {
    /// How the service appears to clients, e.g. `tcp/8080` or `tcp/10.1.1.1:8080`.
    pub fn frontend(&self) -> String {
        match self.vip {
            Some(vip) => format!("{}/{vip}:{}", self.proto, self.port),
            None => format!("{}/{}", self.proto, self.port),
        }
    }
}

/// Every service of one node. `generation` counts applied changes: the table's version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub generation: u64,
    pub services: Vec<Service>,
    /// Where the search for a free id starts, so that freed ids are not reused at once (a
    /// reused backend slot would carry the old backend's counters for a moment).
    #[serde(default)]
    pub next_service_id: u32,
    #[serde(default)]
    pub next_backend_id: u32,
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

    /// Adds a service. Nothing changes unless every check passes.
    pub fn add_service(
        &mut self,
        name: &str,
        proto: Proto,
        port: u16,
        vip: Option<Ipv4Addr>,
        backends: &[SocketAddrV4],
    ) -> Result<(), String> {
        validate_name(name)?;
        if self.service(name).is_some() {
            return Err(format!("service '{name}' already exists"));
        }
        if let Some(other) = self
            .services
            .iter()
            .find(|s| s.proto == proto && s.port == port && s.vip == vip)
        {
            return Err(format!(
                "port {proto}/{port}{} is already published by service '{}'",
                vip.map(|v| format!(" on {v}")).unwrap_or_default(),
                other.name
            ));
        }
        check_backend_list(name, &[], backends)?;
        if self.services.len() >= MAX_SERVICES as usize {
            return Err(format!(
                "cannot add '{name}': the node holds {MAX_SERVICES} services already"
            ));
        }
        let id = self.allocate_service_id();
        let backends = self.allocate_backends(name, backends)?;
        self.services.push(Service {
            name: name.to_owned(),
            id,
            proto,
            port,
            vip,
            backends,
        });
        self.next_service_id = (id + 1) % MAX_SERVICES;
        self.generation += 1;
        Ok(())
    }

    pub fn remove_service(&mut self, name: &str) -> Result<Service, String> {
        let index = self
            .services
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("unknown service '{name}'"))?;
        self.generation += 1;
        Ok(self.services.remove(index))
    }

    /// Appends backends to a service's round-robin order.
    pub fn add_backends(&mut self, name: &str, addrs: &[SocketAddrV4]) -> Result<(), String> {
        let existing: Vec<SocketAddrV4> = self
            .service(name)
            .ok_or_else(|| format!("unknown service '{name}'"))?
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        check_backend_list(name, &existing, addrs)?;
        let new = self.allocate_backends(name, addrs)?;
        self.service_mut(name)?.backends.extend(new);
        self.generation += 1;
        Ok(())
    }

    pub fn remove_backends(&mut self, name: &str, addrs: &[SocketAddrV4]) -> Result<(), String> {
        let service = self.service_mut(name)?;
        let mut seen = BTreeSet::new();
        for addr in addrs {
            if !seen.insert(*addr) {
                return Err(format!("backend {addr} is listed twice"));
            }
            if !service.backends.iter().any(|b| b.addr == *addr) {
                return Err(format!("service '{name}' has no backend {addr}"));
            }
        }
        service.backends.retain(|b| !seen.contains(&b.addr));
        self.generation += 1;
        Ok(())
    }

    fn allocate_service_id(&self) -> u32 {
        let used: BTreeSet<u32> = self.services.iter().map(|s| s.id).collect();
        next_free(self.next_service_id, MAX_SERVICES, &used)
            .expect("service count was checked against MAX_SERVICES")
    }

    fn allocate_backends(
        &mut self,
        service: &str,
        addrs: &[SocketAddrV4],
    ) -> Result<Vec<Backend>, String> {
        let mut used: BTreeSet<u32> = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        if used.len() + addrs.len() > MAX_BACKENDS as usize {
            return Err(format!(
                "cannot add backends to '{service}': the node holds at most {MAX_BACKENDS} backends"
            ));
        }
        let mut cursor = self.next_backend_id;
        let mut out = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let id = next_free(cursor, MAX_BACKENDS, &used).expect("capacity checked above");
            used.insert(id);
            cursor = (id + 1) % MAX_BACKENDS;
            out.push(Backend { addr: *addr, id });
        }
        self.next_backend_id = cursor;
        Ok(out)
    }
}

/// The first id at or after `start` (wrapping below `limit`) that is not in `used`.
fn next_free(start: u32, limit: u32, used: &BTreeSet<u32>) -> Option<u32> {
    (start..limit).chain(0..start).find(|id| !used.contains(id))
}

fn check_backend_list(
    service: &str,
    existing: &[SocketAddrV4],
    new: &[SocketAddrV4],
) -> Result<(), String> {
    let mut seen: BTreeSet<SocketAddrV4> = existing.iter().copied().collect();
    for addr in new {
        if !seen.insert(*addr) {
            return Err(if existing.contains(addr) {
                format!("service '{service}' already has backend {addr}")
            } else {
                format!("backend {addr} is listed twice")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
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
    fn backends_must_be_usable_ipv4_socket_addresses() {
        assert_eq!(
            addr("10.0.0.6:80"),
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 6), 80)
        );
        for bad in [
            "10.0.0.6",
            "10.0.0.256:80",
            "10.0.0.6:0",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "[::1]:80",
            "x:80",
        ] {
            let err = parse_backend(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
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
                Some(Ipv4Addr::new(10, 9, 9, 9)),
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
        assert!(validate_name("web-1.v2_x").is_ok());
        for bad in ["", "a b", "x/y", &"n".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
