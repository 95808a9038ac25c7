//! A service and its backends as the table holds them: identity, ids, weights, drain and health,
//! the health check settings, and a service as a table file declares it (`ServiceSpec`).
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use super::values::*;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Slot in the data plane's backend array; stable for the backend's lifetime.
    pub id: u32,
    /// The mesh node the backend runs on; `None` for a backend reached by plain routing. Part
    /// of the backend's identity: moving it to another node is a removal and an addition, so
    /// it gets a new id and the flows pinned to it choose again.
    #[serde(default)]
    pub node: Option<String>,
    /// Drained by the operator: no new flows, existing ones continue.
    #[serde(default)]
    pub drained: bool,
    /// What the health checks last said (written by `lbctl daemon`).
    #[serde(default)]
    pub health: Health,
    /// Its share of the service's new flows, against the other backends' weights; 0 takes no
    /// new flows (like drained) and keeps its flows.
    #[serde(default = "default_weight", skip_serializing_if = "is_default_weight")]
    pub weight: u32,
}

impl Backend {
    /// Whether new flows may choose the backend: not drained, not of weight 0, and, while some
    /// backend of its service is healthy, not unhealthy.
    pub fn eligible(&self) -> bool {
        self.takes_new_flows() && self.health != Health::Unhealthy
    }

    /// Not drained and not of weight 0: the operator lets it take new flows.
    fn takes_new_flows(&self) -> bool {
        !self.drained && self.weight > 0
    }

    /// The backend as a table file or `backend add` names it.
    pub fn spec(&self) -> BackendSpec {
        BackendSpec {
            addr: self.addr,
            node: self.node.clone(),
            weight: self.weight,
        }
    }
}

/// A backend's health as the checks see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked (yet, or by this node: the backends of other mesh nodes are checked by
    /// their own node); treated as healthy.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// How a service's backends are probed. The defaults suit a web service, as HAProxy's do: a
/// TCP connect every 2 s with a 1 s timeout; 3 failures in a row mark a backend unhealthy, 2
/// successes healthy again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub enabled: bool,
    /// `None`: a TCP connect succeeds. `Some(path)`: an HTTP/1.1 GET of `path` must answer
    /// `expect_status`.
    pub http_path: Option<String>,
    pub expect_status: u16,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Successes in a row that make an unhealthy (or unknown) backend healthy.
    pub rise: u32,
    /// Failures in a row that make a healthy (or unknown) backend unhealthy.
    pub fall: u32,
    /// Connections in a row a backend may refuse or leave unanswered before the data plane
    /// ejects it (passive checking, on whether or not the probes are); 0: never. Left out
    /// when it is the default, so that a table's digest and gossiped records are those of the
    /// builds before it (a mixed cluster converges).
    #[serde(
        default = "default_eject_after",
        skip_serializing_if = "is_default_eject_after"
    )]
    pub eject_after: u32,
}

fn default_eject_after() -> u32 {
    u32::from(lb_common::DEFAULT_EJECT_AFTER)
}

fn is_default_eject_after(eject_after: &u32) -> bool {
    *eject_after == default_eject_after()
}

/// Most failures in a row `eject_after` may ask for (the data plane keeps it in a byte).
pub const MAX_EJECT_AFTER: u32 = 100;

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            http_path: None,
            expect_status: 200,
            interval_ms: 2_000,
            timeout_ms: 1_000,
            rise: 2,
            fall: 3,
            eject_after: default_eject_after(),
        }
    }
}

/// A change to a service's health-check settings: `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthUpdate {
    pub enabled: Option<bool>,
    /// `Some(None)`: TCP connect; `Some(Some(path))`: HTTP GET of path.
    pub probe: Option<Option<String>>,
    pub expect_status: Option<u16>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub eject_after: Option<u32>,
}

impl HealthUpdate {
    pub fn apply(&self, current: &HealthCheck) -> HealthCheck {
        HealthCheck {
            enabled: self.enabled.unwrap_or(current.enabled),
            http_path: self
                .probe
                .clone()
                .unwrap_or_else(|| current.http_path.clone()),
            expect_status: self.expect_status.unwrap_or(current.expect_status),
            interval_ms: self.interval_ms.unwrap_or(current.interval_ms),
            timeout_ms: self.timeout_ms.unwrap_or(current.timeout_ms),
            rise: self.rise.unwrap_or(current.rise),
            fall: self.fall.unwrap_or(current.fall),
            eject_after: self.eject_after.unwrap_or(current.eject_after),
        }
    }
}

impl HealthCheck {
    /// Checks the settings hang together.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms < 100 {
            return Err(format!(
                "invalid health-check interval {} ms: at least 100 ms",
                self.interval_ms
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "invalid health-check timeout {} ms: above 0 and at most the interval ({} ms)",
                self.timeout_ms, self.interval_ms
            ));
        }
        if !(1..=100).contains(&self.rise) || !(1..=100).contains(&self.fall) {
            return Err(format!(
                "invalid rise/fall {}/{}: each between 1 and 100",
                self.rise, self.fall
            ));
        }
        if self.eject_after > MAX_EJECT_AFTER {
            return Err(format!(
                "invalid eject-after {}: between 0 (never) and {MAX_EJECT_AFTER}",
                self.eject_after
            ));
        }
        if !(100..=599).contains(&self.expect_status) {
            return Err(format!(
                "invalid expected status {}: an HTTP status between 100 and 599",
                self.expect_status
            ));
        }
        if let Some(path) = &self.http_path
            && (!path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(format!(
                "invalid HTTP path '{path}': must start with '/' and contain no spaces"
            ));
        }
        Ok(())
    }

    /// One line saying how the backends are checked.
    /// The settings in words, for a service of `proto`.
    pub fn describe(&self, proto: Proto) -> String {
        let passive = match (proto, self.eject_after) {
            // Passive checks watch TCP handshakes.
            (Proto::Udp, _) => "no passive checks (UDP)".to_owned(),
            (Proto::Tcp, 0) => "no passive ejection".to_owned(),
            (Proto::Tcp, n) => {
                format!("ejected after {n} refused or unanswered connections in a row")
            }
        };
        if !self.enabled {
            return format!("health checks off; {passive}");
        }
        let probe = match (&self.http_path, proto) {
            (Some(path), _) => format!("HTTP GET {path} expecting {}", self.expect_status),
            (None, Proto::Tcp) => "TCP connect".to_owned(),
            (None, Proto::Udp) => "UDP datagram (port unreachable fails it)".to_owned(),
        };
        format!(
            "{probe} every {}, timeout {}, unhealthy after {} failures, healthy after {} successes; {passive}",
            format_duration_ms(self.interval_ms),
            format_duration_ms(self.timeout_ms),
            self.fall,
            self.rise
        )
    }

    /// How long a failing backend may still get new flows: `fall` intervals.
    pub fn detection_window_ms(&self) -> u64 {
        self.interval_ms * u64::from(self.fall)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_backend(f, &self.addr, self.node.as_deref())
    }
}

/// A node of the routing mesh: a host running lbctl, reached over the underlay network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// The address VXLAN packets to the node's backends are sent to, and come from: IPv4 or
    /// IPv6, the same family for every node of a table.
    pub ip: IpAddr,
}

impl Node {
    /// What the data plane's tables name the node by ([`node_key`]).
    pub fn key(&self) -> u32 {
        node_key(self.ip)
    }

    /// The node's address on an IPv4 underlay; `None` on an IPv6 one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        match self.ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    /// Slot of the service's round-robin cursor; stable for the service's lifetime.
    pub id: u32,
    pub proto: Proto,
    pub port: u16,
    /// Published only on this address; `None` publishes on every local address of the node.
    pub vip: Option<IpAddr>,
    /// In round-robin order.
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub health_check: HealthCheck,
    #[serde(default, skip_serializing_if = "Scheduler::is_default")]
    pub scheduler: Scheduler,
    /// Who defines the service: the operator's commands, or Docker (`lbctl daemon --docker`),
    /// whose services only the Docker watcher changes.
    #[serde(default, skip_serializing_if = "Origin::is_operator")]
    pub origin: Origin,
    /// For a Docker service: when the task whose labels define it was created (RFC 3339 with
    /// nine fractional digits, so that it sorts as text). A node whose tasks are older (a
    /// rolling update has not reached them) leaves the definition to the newer one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub defined_at: String,
}

/// Who defines a service and its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `lbctl service add`, `apply`, or a cluster member's.
    #[default]
    Operator,
    /// A Docker Swarm service's `lbctl.publish` label: the Docker watcher adds, changes and
    /// removes it, and gives it this node's tasks as backends.
    Docker,
}

impl Origin {
    pub fn is_operator(&self) -> bool {
        *self == Origin::Operator
    }
}

impl Service {
    /// The service as a table file declares it.
    pub fn spec(&self) -> ServiceSpec {
        ServiceSpec {
            name: self.name.clone(),
            proto: self.proto,
            port: self.port,
            vip: self.vip,
            backends: self.backends.iter().map(Backend::spec).collect(),
            health_check: self.health_check.clone(),
            scheduler: self.scheduler,
        }
    }

    /// The index of the backend an operator names: by its `IP:PORT` whatever its node; an
    /// `@NODE` given with it must match the backend's node.
    pub(super) fn named_backend(&self, spec: &BackendSpec) -> Result<usize, String> {
        let name = &self.name;
        let index = self
            .backends
            .iter()
            .position(|b| b.addr == spec.addr)
            .ok_or_else(|| format!("service '{name}' has no backend {}", spec.addr))?;
        let backend = &self.backends[index];
        if spec.node.is_some() && spec.node != backend.node {
            return Err(format!(
                "service '{name}' has backend {backend}, not {spec}{}",
                if backend.node.is_none() {
                    " (it is on no node)"
                } else {
                    ""
                }
            ));
        }
        Ok(index)
    }

    /// The backends new flows may choose, and whether the service fails open: when every
    /// undrained backend (of a weight above 0) is unhealthy, new flows go to all of them rather
    /// than nowhere (the checks themselves may be what is broken).
    pub fn selectable(&self) -> (Vec<&Backend>, bool) {
        self.selectable_of(|_| true)
    }

    /// [`Service::selectable`] among the backends of one address family (`ipv6`): each family's
    /// clients are balanced over that family's backends, and fail open on their own.
    pub fn selectable_in(&self, ipv6: bool) -> (Vec<&Backend>, bool) {
        self.selectable_of(|b| b.addr.is_ipv6() == ipv6)
    }

    fn selectable_of(&self, of: impl Fn(&Backend) -> bool) -> (Vec<&Backend>, bool) {
        let eligible: Vec<&Backend> = self
            .backends
            .iter()
            .filter(|b| of(b) && b.eligible())
            .collect();
        if !eligible.is_empty() {
            return (eligible, false);
        }
        let undrained: Vec<&Backend> = self
            .backends
            .iter()
            .filter(|b| of(b) && b.takes_new_flows())
            .collect();
        let fail_open = !undrained.is_empty();
        (undrained, fail_open)
    }

    pub(crate) fn frontend_key(&self) -> Frontend {
        (self.proto, self.port, self.vip)
    }

    /// Sets the health-check settings once they hang together; returns whether they changed.
    /// Turning checks off forgets what they found (every backend is then unknown, hence
    /// eligible).
    pub(super) fn set_health_check(&mut self, check: &HealthCheck) -> Result<bool, String> {
        check.validate()?;
        if self.health_check == *check {
            return Ok(false);
        }
        if !check.enabled {
            for backend in &mut self.backends {
                backend.health = Health::Unknown;
            }
        }
        self.health_check = check.clone();
        Ok(true)
    }

    /// How the service appears to clients, e.g. `tcp/8080` or `tcp/10.1.1.1:8080`.
    pub fn frontend(&self) -> String {
        match self.vip {
            // `[2001:db8::1]:80`, as a backend is written.
            Some(vip) => format!("{}/{}", self.proto, SocketAddr::new(vip, self.port)),
            None => format!("{}/{}", self.proto, self.port),
        }
    }
}

/// A service's frontend, what clients reach it by: protocol, port and VIP. Two services cannot
/// share one.
pub(super) type Frontend = (Proto, u16, Option<IpAddr>);

/// A service as the operator declares it in a table file (`lbctl apply`): its identity is its
/// name; ids, drain and health are the table's business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub proto: Proto,
    pub port: u16,
    pub vip: Option<IpAddr>,
    /// In round-robin order.
    pub backends: Vec<BackendSpec>,
    pub health_check: HealthCheck,
    pub scheduler: Scheduler,
}

impl ServiceSpec {
    pub(super) fn frontend(&self) -> Frontend {
        (self.proto, self.port, self.vip)
    }
}
