//! The values an operator types, parsed and checked: protocols, ports, backends
//! (`IP:PORT[@NODE][*WEIGHT]`), weights, node addresses, VNIs, VIPs, durations and names. Each
//! parser returns the value or a one-line error naming it; `main.rs` and the table file use them.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    str::FromStr,
};

use lb_common::{MAX_VNI, PROTO_TCP, PROTO_UDP};
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

/// Parses a backend `IPv4:PORT` or `[IPv6]:PORT`, rejecting addresses no backend can have.
pub fn parse_backend(s: &str) -> Result<SocketAddr, String> {
    backend_addr(s).map_err(|why| format!("invalid backend '{s}': {why}"))
}

/// `parse_backend` without naming the argument: why `s` is no backend address.
fn backend_addr(s: &str) -> Result<SocketAddr, String> {
    let addr = socket_addr(s)?;
    check_unicast(addr.ip())
        .map_err(|why| format!("{} cannot be a backend address: {why}", addr.ip()))?;
    Ok(addr)
}

/// `IPv4:PORT` or `[IPv6]:PORT` (brackets, as in URLs and `ss`, so that the port cannot be
/// read as part of the address), without a scope (`%eth0`): a backend is routed to, not
/// reached on one link.
fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(bracketed) = s.strip_prefix('[') {
        let (ip, port) = bracketed
            .split_once("]:")
            .ok_or_else(|| "expected [IPv6]:PORT".to_owned())?;
        if ip.contains('%') {
            return Err(format!(
                "'{ip}' has a scope: a backend is routed to, not reached on one link"
            ));
        }
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("'{ip}' is not an IPv6 address"))?;
        return Ok(SocketAddr::new(IpAddr::V6(ip), parse_port(port)?));
    }
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| "expected IPv4:PORT or [IPv6]:PORT".to_owned())?;
    if ip.contains(':') {
        return Err(format!(
            "an IPv6 address takes brackets before its port: [{ip}]:{port}"
        ));
    }
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("'{ip}' is not an IPv4 address"))?;
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, parse_port(port)?)))
}

/// Why `ip` cannot be where a service is published or balanced to, if it cannot: an address of
/// no host, a group, a link's own, or an IPv4 address written as IPv6.
fn check_unicast(ip: IpAddr) -> Result<(), &'static str> {
    match ip {
        IpAddr::V4(ip) if ip.is_unspecified() || ip.is_broadcast() => Err("not a host's"),
        IpAddr::V4(ip) if ip.is_multicast() => Err("multicast"),
        IpAddr::V4(_) => Ok(()),
        IpAddr::V6(ip) if ip.is_unspecified() => Err("not a host's"),
        // IPv4's 127.0.0.1 is served to the node's own sockets (socket load balancing), which
        // IPv6 has not yet; from the wire, the kernel drops what is addressed to ::1.
        IpAddr::V6(ip) if ip.is_loopback() => Err("IPv6 loopback, which nothing balanced reaches"),
        IpAddr::V6(ip) if ip.is_multicast() => Err("multicast"),
        IpAddr::V6(ip) if ip.is_unicast_link_local() => Err("link-local, valid on one link only"),
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some() => {
            Err("an IPv4 address in IPv6 form: write it as IPv4")
        }
        IpAddr::V6(_) => Ok(()),
    }
}

/// How new flows of a service choose their backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scheduler {
    /// In turn, each backend as many times as its weight (the default).
    #[default]
    #[serde(rename = "rr")]
    RoundRobin,
    /// By a consistent hash of the flow's 5-tuple (Maglev): a flow whose flow-table entry was
    /// evicted still reaches its backend, and a change of backends moves few flows.
    #[serde(rename = "maglev")]
    Maglev,
}

impl Scheduler {
    pub const fn as_str(self) -> &'static str {
        match self {
            Scheduler::RoundRobin => "rr",
            Scheduler::Maglev => "maglev",
        }
    }

    /// `ServiceValue::scheduler`.
    pub const fn number(self) -> u32 {
        match self {
            Scheduler::RoundRobin => lb_common::SCHEDULER_ROUND_ROBIN,
            Scheduler::Maglev => lb_common::SCHEDULER_MAGLEV,
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Scheduler::default()
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rr" => Ok(Scheduler::RoundRobin),
            "maglev" => Ok(Scheduler::Maglev),
            _ => Err(format!(
                "invalid scheduler '{s}': expected rr (round-robin) or maglev"
            )),
        }
    }
}

/// Largest backend weight (HAProxy's range): weights are shares, so 0 to 256 says all there
/// is to say, and keeps the maglev population and the round-robin slots cheap to compute.
pub const MAX_WEIGHT: u32 = 256;
/// The weight of a backend given without one.
pub const DEFAULT_WEIGHT: u32 = 1;

pub(crate) fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

pub(crate) fn is_default_weight(weight: &u32) -> bool {
    *weight == DEFAULT_WEIGHT
}

/// Parses a weight: a whole number from 0 (no new flows, like drained) to `MAX_WEIGHT`.
pub fn parse_weight(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .ok()
        .filter(|weight| *weight <= MAX_WEIGHT)
        .ok_or_else(|| {
            format!("invalid weight '{s}': a whole number from 0 (no new flows) to {MAX_WEIGHT}")
        })
}

/// A backend as the operator names it: `IP:PORT`, or `IP:PORT@NODE` for a task on a node of the
/// mesh, with its weight (`*W` where a backend is added). A plain `SocketAddr` converts to a
/// backend on no node (local or plainly routed) of the default weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub node: Option<String>,
    pub weight: u32,
}

impl From<SocketAddr> for BackendSpec {
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            node: None,
            weight: DEFAULT_WEIGHT,
        }
    }
}

impl From<SocketAddrV4> for BackendSpec {
    fn from(addr: SocketAddrV4) -> Self {
        SocketAddr::V4(addr).into()
    }
}

impl fmt::Display for BackendSpec {
    /// `IP:PORT[@NODE]`, then `*W` unless the weight is the default: what
    /// [`parse_weighted_backend_spec`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_backend(f, &self.addr, self.node.as_deref())?;
        if self.weight != DEFAULT_WEIGHT {
            write!(f, "*{}", self.weight)?;
        }
        Ok(())
    }
}

pub(super) fn fmt_backend(
    f: &mut fmt::Formatter<'_>,
    addr: &SocketAddr,
    node: Option<&str>,
) -> fmt::Result {
    match node {
        Some(node) => write!(f, "{addr}@{node}"),
        None => write!(f, "{addr}"),
    }
}

/// Parses a backend as it is added: `IP:PORT[@NODE]`, optionally followed by `*WEIGHT` (a share
/// of the new flows; 1 when left out, 0 for none).
pub fn parse_weighted_backend_spec(s: &str) -> Result<BackendSpec, String> {
    let Some((backend, weight)) = s.rsplit_once('*') else {
        return parse_backend_spec(s);
    };
    let weight = parse_weight(weight).map_err(|err| format!("invalid backend '{s}': {err}"))?;
    Ok(BackendSpec {
        weight,
        ..parse_backend_spec(backend)?
    })
}

/// Parses a backend argument, `IP:PORT` or `IP:PORT@NODE` (of the default weight). Whether the
/// node exists is the table's business.
pub fn parse_backend_spec(s: &str) -> Result<BackendSpec, String> {
    let (addr, node) = match s.split_once('@') {
        Some((addr, node)) => {
            validate_name("node", node).map_err(|err| format!("invalid backend '{s}': {err}"))?;
            (addr, Some(node.to_owned()))
        }
        None => (s, None),
    };
    let addr = backend_addr(addr).map_err(|why| format!("invalid backend '{s}': {why}"))?;
    Ok(BackendSpec {
        addr,
        node,
        weight: DEFAULT_WEIGHT,
    })
}

/// Parses a node's underlay address: the unicast address VXLAN packets are sent to, IPv4 or
/// IPv6 (one family per mesh: the table's business). An IPv6 one must be global: a link-local
/// address (or one with a scope, `fe80::1%eth0`) names a host on one link only.
pub fn parse_node_ip(s: &str) -> Result<IpAddr, String> {
    if s.contains('%') {
        return Err(format!(
            "invalid underlay IP '{s}': an address with a scope id is link-local; give the \
             node's global address"
        ));
    }
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("invalid underlay IP '{s}': not an IPv4 or IPv6 address"))?;
    let why = match ip {
        IpAddr::V4(ip)
            if ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_multicast()
                || ip.is_loopback() =>
        {
            Some("not a unicast address another node can reach")
        }
        // 0.0.0.0/8 ("this network") names no host, and holds the IPv6 nodes' keys.
        IpAddr::V4(ip) if ip.octets()[0] == 0 => Some("in 0.0.0.0/8, which names no host"),
        IpAddr::V4(_) => None,
        IpAddr::V6(ip) if ip.is_unspecified() => Some("unspecified, not a host's"),
        IpAddr::V6(ip) if ip.is_loopback() => Some("loopback, which no other node reaches"),
        IpAddr::V6(ip) if ip.is_multicast() => Some("multicast"),
        IpAddr::V6(ip) if ip.is_unicast_link_local() => {
            Some("link-local (fe80::/10), valid on one link only")
        }
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some() => {
            Some("an IPv4 address in IPv6 form: write it as IPv4")
        }
        IpAddr::V6(_) => None,
    };
    match why {
        Some(why) => Err(format!("invalid underlay IP '{s}': {why}")),
        None => Ok(ip),
    }
}

/// The 32 bits every data plane table names a node by (`Backend::node_ip_be`, `NODES`,
/// `MeshConfig::local_ip_be`): an IPv4 node's address in network byte order, an IPv6 node's
/// key (`lb_common::ipv6_node_key`, in 0.0.0.0/8).
pub fn node_key(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
        IpAddr::V6(ip) => lb_common::ipv6_node_key(&ip.octets()),
    }
}

/// A node key written as an IPv4 address (an IPv6 node's is in 0.0.0.0/8), as the maps hold it.
pub fn show_node_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// The address family of an underlay address, in words.
pub fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Parses a VXLAN network identifier: 0 to 2^24 − 1.
pub fn parse_vni(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(vni @ 0..=MAX_VNI) => Ok(vni),
        Ok(_) => Err(format!(
            "invalid VNI '{s}': must be between 0 and {MAX_VNI}"
        )),
        Err(_) => Err(format!("invalid VNI '{s}': not a number")),
    }
}

/// Parses a virtual IP a service may be published on instead of every local address.
pub fn parse_vip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("invalid VIP '{s}': not an IPv4 or IPv6 address"))?;
    check_unicast(ip)
        .map_err(|why| format!("invalid VIP '{s}': {ip} cannot be a service address: {why}"))?;
    Ok(ip)
}

/// The longest duration lbctl takes: a day, in milliseconds.
pub const MAX_DURATION_MS: u64 = 86_400_000;

/// Parses a duration, `2s`, `500ms` or `1.5s`, as milliseconds: from 1 ms to a day.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration '{s}': use e.g. 2s or 500ms, from 1ms to 1 day");
    let (number, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 1.0)
    } else if let Some(secs) = s.strip_suffix('s') {
        (secs, 1000.0)
    } else {
        return Err(bad());
    };
    // Plain decimals only: f64's parser also takes "1e3", "+2", "inf" and "NaN".
    if !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    // Rounded first: less than half a millisecond would be an interval of 0.
    let ms = (value * scale).round();
    if !(1.0..=MAX_DURATION_MS as f64).contains(&ms) {
        return Err(bad());
    }
    Ok(ms as u64)
}

/// Writes milliseconds as `parse_duration_ms` reads them: `2s`, or `1500ms`.
pub fn format_duration_ms(ms: u64) -> String {
    if ms > 0 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Service and node names appear in metrics labels, file names and `IP:PORT@NODE`: keep them
/// plain. `what` names the kind of name in the error.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 63 || !name.chars().all(plain) {
        return Err(format!(
            "invalid {what} name '{name}': use 1 to 63 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}
