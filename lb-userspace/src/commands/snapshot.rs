//! What the instance looks like at one moment, read once from the state and the pinned maps:
//! the one type that `service ls` and `stats` (text and JSON, in `show`) and the daemon's
//! metrics page (`daemon::metrics`) each render at their edge.
use std::net::SocketAddr;

use anyhow::Result;
use lb_common::{BackendStats, Event, PassiveHealth, Reason};
use serde::Serialize;

use crate::{
    dataplane::{FlowCensus, Maps},
    host::netdev,
    instance::{
        Instance,
        state::{self, State},
    },
    table::{Health, Proto, Scheduler, Service},
};

/// The instance, its table and, when the maps were read, its counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The lbctl instance (its network namespace name).
    pub instance: String,
    /// This node's name in the mesh; `None` outside a mesh.
    pub node: Option<String>,
    /// lbctl's version.
    pub version: String,
    /// Generation of the service table applied to the data plane.
    pub table_generation: u64,
    /// Entries in the flow table at its last scan (0 when the maps were not read).
    pub flow_entries: u64,
    /// Size of the flow table, in flows.
    pub flow_capacity: u64,
    /// The same of the IPv6 flow table (`FLOWS6`: `attach --flow-capacity6`, or an eighth of
    /// `flow_capacity`, at least 4,096).
    pub flow_entries6: u64,
    pub flow_capacity6: u64,
    /// `(Reason::name(), packets, bytes)` for every `lb_common::Reason`, summed over CPUs, in
    /// `Reason::ALL` order; empty when the maps were not read.
    pub reasons: Vec<(&'static str, u64, u64)>,
    /// `(Event::name(), count)` for every `lb_common::Event`, summed over CPUs, in `Event::ALL`
    /// order; empty when the maps were not read.
    pub events: Vec<(&'static str, u64)>,
    /// The services of the applied table, in table order. Names are unique.
    pub services: Vec<ServiceSnapshot>,
    /// The attached interfaces, in attach order.
    pub interfaces: Vec<InterfaceReport>,
}

/// One service of the applied table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSnapshot {
    pub name: String,
    pub id: u32,
    pub proto: Proto,
    pub port: u16,
    pub vip: Option<std::net::IpAddr>,
    /// How clients reach it, as `Service::frontend` prints it: `tcp/8080`, `udp/10.1.1.1:53`.
    pub frontend: String,
    pub scheduler: Scheduler,
    /// The health check, as `HealthCheck::describe` says it.
    pub health_check: String,
    /// No backend is eligible (see [`BackendSnapshot::eligible`]) because they are all
    /// unhealthy, and new flows go to all of them anyway rather than being dropped.
    pub fail_open: bool,
    /// Who defines it: the operator, or Docker (`lbctl daemon --docker`).
    pub origin: crate::table::Origin,
    /// In the service's round-robin order. Addresses are unique within the service.
    pub backends: Vec<BackendSnapshot>,
}

/// One backend of a service, with its counters summed over CPUs when the maps were read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSnapshot {
    pub addr: SocketAddr,
    pub id: u32,
    /// The mesh node hosting the backend; `None` for a backend on this node or reached by plain
    /// routing.
    pub node: Option<String>,
    pub health: Health,
    /// Drained: the backend keeps the flows pinned to it but gets no new ones.
    pub drained: bool,
    /// Its share of new flows; 0: like drained, no new flows.
    pub weight: u32,
    /// Its counters; `None` when the maps were not read.
    pub stats: Option<BackendStats>,
    /// Flows in the flow table pinned to this backend and still open (last scan); `None` when
    /// the maps were not read.
    pub live_flows: Option<u64>,
    /// What the data plane saw of its connections (`PASSIVE_HEALTH`); `None` when the maps
    /// were not read.
    pub passive: Option<PassiveHealth>,
    /// Whether the data plane has it ejected now; `None` when the maps were not read.
    pub ejected: Option<bool>,
}

impl BackendSnapshot {
    /// Whether new flows may choose the backend: not drained, not of weight 0 and not known to
    /// be unhealthy (healthy, or not checked here). The rule of `lbctl_service_healthy_backends`.
    pub fn eligible(&self) -> bool {
        !self.drained && self.weight != 0 && self.health != Health::Unhealthy
    }

    /// Its counters, zero when the maps were not read.
    pub fn totals(&self) -> BackendStats {
        self.stats.unwrap_or_default()
    }

    /// What the data plane saw of its connections, zero when the maps were not read.
    pub fn passive_totals(&self) -> PassiveHealth {
        self.passive.unwrap_or_default()
    }
}

/// An attached interface as `stats` and the metrics show it: how XDP runs and sends there, and
/// what the kernel failed to transmit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceReport {
    pub iface: String,
    /// `null`: attached by an lbctl that did not record it.
    pub xdp_mode: Option<state::XdpMode>,
    pub transmit: Option<state::Transmit>,
    /// `null` when the interface cannot be read (gone).
    pub tx_failures: Option<netdev::TxFailures>,
}

/// The [`InterfaceReport`] of every attached interface, in attach order.
pub fn interface_reports(state: &State) -> Vec<InterfaceReport> {
    state
        .attachments
        .iter()
        .map(|a| InterfaceReport {
            iface: a.iface.clone(),
            xdp_mode: a.xdp_mode,
            transmit: a.transmit,
            tx_failures: netdev::tx_failures(&a.iface).ok(),
        })
        .collect()
}

/// What a reader gets from the maps: the maps themselves and the flow census to use (the
/// daemon keeps a recent one so that a scrape does not walk the flow table).
pub struct Counters<'a> {
    pub maps: &'a Maps,
    pub census: &'a FlowCensus,
}

/// Reads the snapshot of `instance` in `state` (this node being `node` in the mesh); the
/// counters only when `counters` gives the maps.
pub fn read(
    instance: &Instance,
    state: &State,
    node: Option<String>,
    counters: Option<Counters<'_>>,
) -> Result<Snapshot> {
    let services = state
        .table
        .services
        .iter()
        .map(|service| service_snapshot(service, counters.as_ref()))
        .collect::<Result<_>>()?;
    let (flow_entries, flow_entries6, reasons, events) = match &counters {
        Some(counters) => {
            let reasons = counters.maps.reason_totals()?;
            let events = counters.maps.event_totals()?;
            (
                counters.census.entries,
                counters.census.entries6,
                Reason::ALL
                    .iter()
                    .zip(&reasons)
                    .map(|(reason, c)| (reason.name(), c.packets, c.bytes))
                    .collect(),
                Event::ALL
                    .iter()
                    .zip(&events)
                    .map(|(event, n)| (event.name(), *n))
                    .collect(),
            )
        }
        None => (0, 0, Vec::new(), Vec::new()),
    };
    Ok(Snapshot {
        instance: instance.name.clone(),
        node,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        table_generation: state.table.generation,
        flow_entries,
        flow_capacity: u64::from(state.flow_capacity),
        flow_entries6,
        flow_capacity6: u64::from(state.flow_tables().ipv6),
        reasons,
        events,
        services,
        interfaces: interface_reports(state),
    })
}

fn service_snapshot(service: &Service, counters: Option<&Counters<'_>>) -> Result<ServiceSnapshot> {
    let (_, fail_open) = service.selectable();
    let now_ns = crate::dataplane::monotonic_ns();
    let backends = service
        .backends
        .iter()
        .map(|backend| {
            let passive = counters
                .map(|c| c.maps.passive_health(backend.id))
                .transpose()?;
            Ok(BackendSnapshot {
                addr: backend.addr,
                id: backend.id,
                node: backend.node.clone(),
                health: backend.health,
                drained: backend.drained,
                weight: backend.weight,
                stats: counters
                    .map(|c| c.maps.backend_totals(backend.id))
                    .transpose()?,
                live_flows: counters.map(|c| c.census.live.get(&backend.id).copied().unwrap_or(0)),
                passive,
                ejected: passive.map(|p| crate::dataplane::is_ejected(&p, now_ns)),
            })
        })
        .collect::<Result<_>>()?;
    Ok(ServiceSnapshot {
        name: service.name.clone(),
        id: service.id,
        proto: service.proto,
        port: service.port,
        vip: service.vip,
        frontend: service.frontend(),
        scheduler: service.scheduler,
        health_check: service.health_check.describe(service.proto),
        fail_open,
        origin: service.origin,
        backends,
    })
}
