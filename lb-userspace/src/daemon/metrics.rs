//! The `/metrics` page: a [`Snapshot`] of the load balancer rendered in the Prometheus text
//! exposition format, version 0.0.4. Pure logic, no I/O: the daemon reads the snapshot
//! (`commands::snapshot`, the one `service ls` and `stats` render too) and serves [`render`]'s
//! output.
//!
//! Conventions of the output:
//! - Every family is prefixed `lbctl_`, has one `# HELP` and one `# TYPE` line and all its
//!   series right below them, even when it has none (an instance without services still lists
//!   the per-service families, empty). Counters end in `_total`, sizes are in bytes.
//! - Order is the snapshot's: families in a fixed order, their series in the order of
//!   `services`, their `backends`, `reasons` and `events`. The same snapshot renders to the
//!   same bytes.
//! - The `node` label is always present where it applies, empty when there is no node (a
//!   backend reached by plain routing, an instance outside a mesh): Prometheus treats an empty
//!   label as an absent one, so `{node=""}` selects those series and every series of a family
//!   has the same label names.
//! - `instance` is not a label of every series (Prometheus adds its own `instance` label to
//!   what it scrapes); lbctl's instance name is in `lbctl_build_info`.
//! - A per-service counter is the sum of its backends' counters as they are now, so it goes
//!   down when a backend is removed, which `rate()` reads as a counter reset. For rates over
//!   a changing backend set, sum the backend rates instead:
//!   `sum by (service) (rate(lbctl_backend_packets_total[5m]))`.
//!
//! Families (labels in braces):
//! - `lbctl_build_info{version,instance,node}` (always 1), `lbctl_table_generation`,
//!   `lbctl_flow_table_entries`, `lbctl_flow_table_capacity`, `lbctl_flow_table_ipv6_entries`,
//!   `lbctl_flow_table_ipv6_capacity`.
//! - `lbctl_packets_total{reason}`, `lbctl_packet_bytes_total{reason}`,
//!   `lbctl_dropped_packets_total` (the `drop_*` reasons), `lbctl_passed_packets_total` (the
//!   `pass_*` reasons), `lbctl_vxlan_encapsulated_packets_total`,
//!   `lbctl_vxlan_decapsulated_packets_total`, `lbctl_flow_events_total{event}`.
//! - `lbctl_service_info{service,frontend}` (always 1), and with label `service`:
//!   `lbctl_service_{packets,bytes,reply_packets,reply_bytes,connections}_total`,
//!   `lbctl_service_flows`, `lbctl_service_backends`, `lbctl_service_healthy_backends`,
//!   `lbctl_service_fail_open`.
//! - With labels `service,backend,node`:
//!   `lbctl_backend_{packets,bytes,reply_packets,reply_bytes,connections}_total`,
//!   `lbctl_backend_flows`, `lbctl_backend_drained`, passive health checking's
//!   `lbctl_backend_{refused,unanswered}_connections_total`, `lbctl_backend_ejections_total`,
//!   `lbctl_backend_ejection_returns_total` and `lbctl_backend_ejected` (each with its
//!   `lbctl_service_*` sum), and `lbctl_backend_health` with one more
//!   label `state` (`healthy`, `unhealthy`, `unknown`): the current state is 1, the others 0.
use std::fmt::Write as _;

use lb_common::Reason;

pub use crate::commands::snapshot::{BackendSnapshot, InterfaceReport, ServiceSnapshot, Snapshot};
use crate::table::Health;

/// Every health state, in the order `lbctl_backend_health` lists them.
const HEALTH_STATES: [Health; 3] = [Health::Healthy, Health::Unhealthy, Health::Unknown];

/// Reasons whose packets left this node VXLAN-encapsulated.
const ENCAP_REASONS: [&str; 3] = [
    Reason::ForwardEncapTx.name(),
    Reason::ForwardEncapRedirect.name(),
    Reason::ReplyEncap.name(),
];
/// Reasons whose packets were decapsulated for a backend on this node. Encapsulated replies
/// decapsulated on their way back to the client count under a `reply_*` reason, together with
/// plain replies: they cannot be told apart, so they are not included.
const DECAP_REASONS: [&str; 3] = [
    Reason::DecapTx.name(),
    Reason::DecapRedirect.name(),
    Reason::DecapStack.name(),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// A family with one series per backend, whose per-service sum is a family too.
struct Summed {
    backend: &'static str,
    backend_help: &'static str,
    service: &'static str,
    service_help: &'static str,
    kind: Kind,
    value: fn(&BackendSnapshot) -> u64,
}

const SUMMED: &[Summed] = &[
    Summed {
        backend: "lbctl_backend_packets_total",
        backend_help: "Packets from clients forwarded to the backend.",
        service: "lbctl_service_packets_total",
        service_help: "Packets from clients forwarded to the service's current backends (sum).",
        kind: Kind::Counter,
        value: |b| b.totals().packets,
    },
    Summed {
        backend: "lbctl_backend_bytes_total",
        backend_help: "Bytes (whole frames as received) from clients forwarded to the backend.",
        service: "lbctl_service_bytes_total",
        service_help: "Bytes from clients forwarded to the service's current backends (sum).",
        kind: Kind::Counter,
        value: |b| b.totals().bytes,
    },
    Summed {
        backend: "lbctl_backend_reply_packets_total",
        backend_help: "Reply packets from the backend reverse-NATed to clients.",
        service: "lbctl_service_reply_packets_total",
        service_help: "Reply packets from the service's current backends to clients (sum).",
        kind: Kind::Counter,
        value: |b| b.totals().reply_packets,
    },
    Summed {
        backend: "lbctl_backend_reply_bytes_total",
        backend_help: "Bytes of the replies from the backend reverse-NATed to clients.",
        service: "lbctl_service_reply_bytes_total",
        service_help: "Bytes of the replies from the service's current backends (sum).",
        kind: Kind::Counter,
        value: |b| b.totals().reply_bytes,
    },
    Summed {
        backend: "lbctl_backend_connections_total",
        backend_help: "New flows (connections) that chose the backend.",
        service: "lbctl_service_connections_total",
        service_help: "New flows that chose one of the service's current backends (sum).",
        kind: Kind::Counter,
        value: |b| b.totals().new_flows,
    },
    Summed {
        backend: "lbctl_backend_refused_connections_total",
        backend_help: "Connections the backend refused: a RST or an ICMP destination unreachable answering a SYN the data plane forwarded.",
        service: "lbctl_service_refused_connections_total",
        service_help: "Connections the service's current backends refused (sum).",
        kind: Kind::Counter,
        value: |b| b.passive_totals().refused,
    },
    Summed {
        backend: "lbctl_backend_unanswered_connections_total",
        backend_help: "Connections the backend left unanswered: the client sent its SYN again with no SYN-ACK between.",
        service: "lbctl_service_unanswered_connections_total",
        service_help: "Connections the service's current backends left unanswered (sum).",
        kind: Kind::Counter,
        value: |b| b.passive_totals().unanswered,
    },
    Summed {
        backend: "lbctl_backend_ejections_total",
        backend_help: "Times the data plane ejected the backend after connections in a row failed.",
        service: "lbctl_service_ejections_total",
        service_help: "Ejections of the service's current backends (sum).",
        kind: Kind::Counter,
        value: |b| b.passive_totals().ejections,
    },
    Summed {
        backend: "lbctl_backend_ejection_returns_total",
        backend_help: "Ejections of the backend ended by the active checks finding it healthy.",
        service: "lbctl_service_ejection_returns_total",
        service_help: "Ejections of the service's current backends ended by the active checks (sum).",
        kind: Kind::Counter,
        value: |b| b.passive_totals().returns,
    },
    Summed {
        backend: "lbctl_backend_ejected",
        backend_help: "1 while the data plane has the backend ejected (new flows pass it by).",
        service: "lbctl_service_ejected",
        service_help: "The service's backends the data plane has ejected now.",
        kind: Kind::Gauge,
        value: |b| u64::from(b.ejected == Some(true)),
    },
    Summed {
        backend: "lbctl_backend_flows",
        backend_help: "Open flows pinned to the backend in the flow table (last scan).",
        service: "lbctl_service_flows",
        service_help: "Open flows pinned to the service's backends in the flow table (last scan).",
        kind: Kind::Gauge,
        value: |b| b.live_flows.unwrap_or(0),
    },
];

/// A gauge with one series per service, labelled `service`.
struct PerService {
    name: &'static str,
    help: &'static str,
    value: fn(&ServiceSnapshot) -> u64,
}

const PER_SERVICE: &[PerService] = &[
    PerService {
        name: "lbctl_service_backends",
        help: "Backends configured for the service, drained and unhealthy ones included.",
        value: |s| s.backends.len() as u64,
    },
    PerService {
        name: "lbctl_service_healthy_backends",
        help: "Backends eligible for new flows: not drained, not of weight 0 and not unhealthy \
               (healthy, or not checked here).",
        value: |s| s.backends.iter().filter(|b| b.eligible()).count() as u64,
    },
    PerService {
        name: "lbctl_service_fail_open",
        help: "1 when every backend is unhealthy and new flows go to all of them anyway, else 0.",
        value: |s| u64::from(s.fail_open),
    },
];

/// Renders the snapshot as a Prometheus text exposition (format 0.0.4, content type
/// `text/plain; version=0.0.4`).
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = Exposition(String::with_capacity(estimated_len(snapshot)));
    render_instance(&mut out, snapshot);
    render_packets(&mut out, snapshot);
    render_services(&mut out, snapshot);
    render_backends(&mut out, snapshot);
    render_interfaces(&mut out, snapshot);
    out.0
}

/// The instance: build, table generation, flow table.
fn render_instance(out: &mut Exposition, snapshot: &Snapshot) {
    let this_node = snapshot.node.as_deref().unwrap_or("");

    out.family(
        "lbctl_build_info",
        Kind::Gauge,
        "lbctl's version, instance (network namespace) and node in the mesh (empty outside a \
         mesh); always 1.",
    );
    out.sample(
        "lbctl_build_info",
        &[
            ("version", snapshot.version.as_str()),
            ("instance", snapshot.instance.as_str()),
            ("node", this_node),
        ],
        1,
    );
    for (name, kind, help, value) in [
        (
            "lbctl_table_generation",
            Kind::Gauge,
            "Generation of the service table applied to the data plane.",
            snapshot.table_generation,
        ),
        (
            "lbctl_flow_table_entries",
            Kind::Gauge,
            "Entries in the flow table at its last scan.",
            snapshot.flow_entries,
        ),
        (
            "lbctl_flow_table_capacity",
            Kind::Gauge,
            "Size of the flow table, in flows.",
            snapshot.flow_capacity,
        ),
        (
            "lbctl_flow_table_ipv6_entries",
            Kind::Gauge,
            "Entries in the IPv6 flow table at its last scan.",
            snapshot.flow_entries6,
        ),
        (
            "lbctl_flow_table_ipv6_capacity",
            Kind::Gauge,
            "Size of the IPv6 flow table, in flows.",
            snapshot.flow_capacity6,
        ),
    ] {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
}

/// Packets by reason, their sums, and flow events.
fn render_packets(out: &mut Exposition, snapshot: &Snapshot) {
    out.family(
        "lbctl_packets_total",
        Kind::Counter,
        "Packets the data plane handled, by what it did with them; each packet counts under \
         exactly one reason, and xmit_tc on top when TC sent it for XDP.",
    );
    for &(reason, packets, _) in &snapshot.reasons {
        out.sample("lbctl_packets_total", &[("reason", reason)], packets);
    }
    out.family(
        "lbctl_packet_bytes_total",
        Kind::Counter,
        "Bytes (whole frames as received) of the packets the data plane handled, by reason.",
    );
    for &(reason, _, bytes) in &snapshot.reasons {
        out.sample("lbctl_packet_bytes_total", &[("reason", reason)], bytes);
    }
    let reason_sum = |keep: &dyn Fn(&str) -> bool| -> u64 {
        snapshot
            .reasons
            .iter()
            .filter(|(name, ..)| keep(name))
            .map(|&(_, packets, _)| packets)
            .sum()
    };
    for (name, help, value) in [
        (
            "lbctl_dropped_packets_total",
            "Packets dropped: lbctl_packets_total summed over the drop_* reasons.",
            reason_sum(&|r| r.starts_with("drop_")),
        ),
        (
            "lbctl_passed_packets_total",
            "Packets passed to the kernel untouched: lbctl_packets_total summed over the pass_* \
             reasons.",
            reason_sum(&|r| r.starts_with("pass_")),
        ),
        (
            "lbctl_vxlan_encapsulated_packets_total",
            "Packets sent VXLAN-encapsulated to another node: forward_encap_tx, \
             forward_encap_redirect and reply_encap.",
            reason_sum(&|r| ENCAP_REASONS.contains(&r)),
        ),
        (
            "lbctl_vxlan_decapsulated_packets_total",
            "Overlay packets decapsulated for a backend on this node: decap_tx, decap_redirect \
             and decap_stack. Encapsulated replies count under reply_* with plain replies and \
             are not included.",
            reason_sum(&|r| DECAP_REASONS.contains(&r)),
        ),
    ] {
        out.family(name, Kind::Counter, help);
        out.sample(name, &[], value);
    }
    out.family(
        "lbctl_flow_events_total",
        Kind::Counter,
        "Flow table events: flows created, flows that chose again because their backend was \
         removed, creation races lost to another CPU, new flows sent to unhealthy backends \
         (failing open), evicted TCP connections found again by maglev.",
    );
    for &(event, count) in &snapshot.events {
        out.sample("lbctl_flow_events_total", &[("event", event)], count);
    }
}

/// Per service: its frontend, its backends' counters summed, its own gauges.
fn render_services(out: &mut Exposition, snapshot: &Snapshot) {
    out.family(
        "lbctl_service_info",
        Kind::Gauge,
        "A service and its frontend (protocol/[VIP:]port); always 1.",
    );
    for service in &snapshot.services {
        let labels = [
            ("service", service.name.as_str()),
            ("frontend", &service.frontend),
        ];
        out.sample("lbctl_service_info", &labels, 1);
    }
    for family in SUMMED {
        out.family(family.service, family.kind, family.service_help);
        for service in &snapshot.services {
            let sum = service.backends.iter().map(family.value).sum();
            out.sample(family.service, &[("service", &service.name)], sum);
        }
    }
    for family in PER_SERVICE {
        out.family(family.name, Kind::Gauge, family.help);
        for service in &snapshot.services {
            let value = (family.value)(service);
            out.sample(family.name, &[("service", &service.name)], value);
        }
    }
}

/// The per-backend series of a snapshot: each backend, in page order, with its labels
/// `service`, `backend` and `node` (empty when there is none). The addresses are formatted
/// once, here, not once per family.
pub struct BackendSeries<'a> {
    snapshot: &'a Snapshot,
    addrs: Vec<String>,
}

impl<'a> BackendSeries<'a> {
    pub fn new(snapshot: &'a Snapshot) -> BackendSeries<'a> {
        let addrs = snapshot
            .services
            .iter()
            .flat_map(|service| service.backends.iter().map(|b| b.addr.to_string()))
            .collect();
        BackendSeries { snapshot, addrs }
    }

    pub fn iter(&self) -> impl Iterator<Item = ([(&'static str, &str); 3], &'a BackendSnapshot)> {
        let each = self.snapshot.services.iter().flat_map(|service| {
            service
                .backends
                .iter()
                .map(move |backend| (service, backend))
        });
        each.zip(&self.addrs).map(|((service, backend), addr)| {
            let labels = [
                ("service", service.name.as_str()),
                ("backend", addr.as_str()),
                ("node", backend.node.as_deref().unwrap_or("")),
            ];
            (labels, backend)
        })
    }
}

/// Per backend: its counters, drain and health.
fn render_backends(out: &mut Exposition, snapshot: &Snapshot) {
    let series = BackendSeries::new(snapshot);
    let backends = || series.iter();
    for family in SUMMED {
        out.family(family.backend, family.kind, family.backend_help);
        for (labels, backend) in backends() {
            out.sample(family.backend, &labels, (family.value)(backend));
        }
    }
    out.family(
        "lbctl_backend_drained",
        Kind::Gauge,
        "1 when the backend is drained (keeps its flows, gets no new ones), else 0.",
    );
    for (labels, backend) in backends() {
        let drained = u64::from(backend.drained);
        out.sample("lbctl_backend_drained", &labels, drained);
    }
    out.family(
        "lbctl_backend_health",
        Kind::Gauge,
        "The backend's health: 1 for its current state, 0 for the others (unknown: not checked \
         here).",
    );
    for ([service, backend_label, node], backend) in backends() {
        for state in HEALTH_STATES {
            let labels = [service, backend_label, node, ("state", state.as_str())];
            let current = u64::from(backend.health == state);
            out.sample("lbctl_backend_health", &labels, current);
        }
    }
}

/// The attached interfaces and their transmit failures.
fn render_interfaces(out: &mut Exposition, snapshot: &Snapshot) {
    out.family(
        "lbctl_interface_info",
        Kind::Gauge,
        "An attached interface, its XDP mode (native, generic) and how the frames XDP sends \
         leave it (xdp: XDP_TX and redirects; tc: through the TC ingress program); always 1.",
    );
    for interface in &snapshot.interfaces {
        let labels = [
            ("iface", interface.iface.as_str()),
            ("xdp_mode", interface.xdp_mode.map_or("", |m| m.name())),
            ("transmit", interface.transmit.map_or("", |t| t.name())),
        ];
        out.sample("lbctl_interface_info", &labels, 1);
    }
    out.family(
        "lbctl_interface_transmit_failures_total",
        Kind::Counter,
        "Frames an attached interface failed to send, by kind: dropped and errors (the \
         kernel's device counters), xdp_errors (the driver's XDP transmit errors).",
    );
    for interface in &snapshot.interfaces {
        let Some(failures) = interface.tx_failures else {
            continue; // The interface could not be read.
        };
        for (kind, count) in [
            ("dropped", failures.dropped),
            ("errors", failures.errors),
            ("xdp_errors", failures.xdp_errors),
        ] {
            let labels = [("iface", interface.iface.as_str()), ("kind", kind)];
            out.sample("lbctl_interface_transmit_failures_total", &labels, count);
        }
    }
}

/// About the rendered size, a little over for plain names, so that `render` does not grow its
/// buffer: the fixed families, plus per service and per backend their series' names, label
/// syntax and values (20 digits at most).
fn estimated_len(snapshot: &Snapshot) -> usize {
    const FIXED: usize = 6 * 1024;
    const PER_REASON: usize = 2 * 80;
    const PER_EVENT: usize = 80;
    const PER_SERVICE_SERIES: usize = 1 + SUMMED.len() + PER_SERVICE.len();
    const PER_BACKEND_SERIES: usize = SUMMED.len() + 1 + HEALTH_STATES.len();
    /// `255.255.255.255:65535`.
    const ADDR_LEN: usize = 21;
    const SERIES_OVERHEAD: usize = 70;
    let mut len = FIXED
        + snapshot.instance.len()
        + snapshot.version.len()
        + snapshot.node.as_ref().map_or(0, String::len)
        + PER_REASON * snapshot.reasons.len()
        + PER_EVENT * snapshot.events.len();
    for service in &snapshot.services {
        len += PER_SERVICE_SERIES * (SERIES_OVERHEAD + service.name.len()) + service.frontend.len();
        for backend in &service.backends {
            let labels =
                service.name.len() + ADDR_LEN + backend.node.as_ref().map_or(0, String::len);
            len += PER_BACKEND_SERIES * (SERIES_OVERHEAD + labels);
        }
    }
    len
}

/// The page being written: families and their series, appended to one buffer.
/// The families of a node in a gossiped cluster (`lbctl daemon --cluster`), appended to
/// [`render`]'s page:
/// - `lbctl_cluster_info{cluster,node,digest}` (always 1): `digest` is that of the table this
///   node applied;
/// - `lbctl_cluster_members{state}` (`alive`, `dead`): members by name, this node included;
/// - `lbctl_cluster_members_agreeing`: live members that published this node's digest (this
///   node included) and are not cut off; `lbctl_cluster_members_cut_off`: members whose gossip
///   with this node is broken by keys that do not match; `lbctl_cluster_converged`: 1 when
///   every live member agrees and none is cut off;
/// - `lbctl_cluster_table_changes_total`: merged tables applied since the daemon started;
/// - `lbctl_gossip_rejected_messages_total{reason}`: see `gossip` for the reasons;
/// - `lbctl_gossip_key_file_refused`: 1 while the key file on disk is refused (the keys in
///   force were read before; a restart would fail);
/// - `lbctl_gossip_sealed`: 1 when gossip is sealed with a key file, 0 in clear (`--insecure`);
///   `lbctl_gossip_key_info{key,seals}` (always 1): each key of the keyring in force.
pub fn render_cluster(status: &crate::cluster::Status) -> String {
    let mut out = Exposition(String::new());
    out.family(
        "lbctl_cluster_info",
        Kind::Gauge,
        "The gossiped cluster this node is in, its name, and the digest of the table it applied; \
         always 1.",
    );
    out.sample(
        "lbctl_cluster_info",
        &[
            ("cluster", &status.cluster),
            ("node", &status.node),
            ("digest", &status.digest),
        ],
        1,
    );
    out.family(
        "lbctl_cluster_members",
        Kind::Gauge,
        "Members of the cluster by state (failure detector), this node included.",
    );
    let alive = status.alive() as u64;
    out.sample("lbctl_cluster_members", &[("state", "alive")], alive);
    out.sample(
        "lbctl_cluster_members",
        &[("state", "dead")],
        status.members.len() as u64 - alive,
    );
    for (name, kind, help, value) in [
        (
            "lbctl_cluster_members_agreeing",
            Kind::Gauge,
            "Live members whose published table digest is this node's, this node included, \
             and that are not cut off.",
            status.agreeing() as u64,
        ),
        (
            "lbctl_cluster_members_cut_off",
            Kind::Gauge,
            "Members whose gossip with this node is broken though datagrams arrive: one of the \
             two cannot open what the other seals (key files that do not match).",
            status.cut_off() as u64,
        ),
        (
            "lbctl_cluster_converged",
            Kind::Gauge,
            "1 when every live member published this node's table digest and none is cut off, \
             else 0.",
            u64::from(status.converged),
        ),
        (
            "lbctl_cluster_table_changes_total",
            Kind::Counter,
            "Merged tables applied to the data plane since the daemon started.",
            status.table_changes,
        ),
    ] {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    out.family(
        "lbctl_gossip_rejected_messages_total",
        Kind::Counter,
        "Gossip messages rejected, by reason: wrong_cluster, rejected_by_peer, malformed, \
         malformed_value, unauthenticated (no key of the keyring opens it), replayed (seen \
         before, sealed too long ago, or sealed for another node).",
    );
    for (reason, count) in &status.rejected {
        out.sample(
            "lbctl_gossip_rejected_messages_total",
            &[("reason", reason)],
            *count,
        );
    }
    out.family(
        "lbctl_gossip_sealed",
        Kind::Gauge,
        "1 when gossip is sealed with the cluster's keyring, 0 when it goes in clear (--insecure).",
    );
    out.sample("lbctl_gossip_sealed", &[], u64::from(status.keys.is_some()));
    out.family(
        "lbctl_gossip_key_file_refused",
        Kind::Gauge,
        "1 while the key file on disk is refused (the keys in force were read before it; a \
         restart would fail), else 0.",
    );
    out.sample(
        "lbctl_gossip_key_file_refused",
        &[],
        u64::from(status.key_file_refused.is_some()),
    );
    out.family(
        "lbctl_gossip_key_info",
        Kind::Gauge,
        "Each key of the keyring in force, by id; seals=true for the one that seals; always 1.",
    );
    for (i, key) in status.keys.iter().flatten().enumerate() {
        let seals = if i == 0 { "true" } else { "false" };
        out.sample(
            "lbctl_gossip_key_info",
            &[("key", key), ("seals", seals)],
            1,
        );
    }
    out.0
}

/// The families of the Docker watcher (`lbctl daemon --docker`), appended to [`render`]'s page:
/// - `lbctl_docker_engine_up`: 1 while the Docker Engine's event stream is followed;
/// - `lbctl_docker_reads_total`: reads of the Engine's tasks (one per burst of events, and
///   every 30 s);
/// - `lbctl_docker_table_changes_total`: reads that changed the table.
pub fn render_docker(link: &crate::docker::Link) -> String {
    let mut out = Exposition(String::new());
    for (name, kind, help, value) in [
        (
            "lbctl_docker_engine_up",
            Kind::Gauge,
            "1 while the daemon follows the Docker Engine's events, else 0.",
            u64::from(link.connected),
        ),
        (
            "lbctl_docker_reads_total",
            Kind::Counter,
            "Reads of this node's Docker tasks since the daemon started.",
            link.reads,
        ),
        (
            "lbctl_docker_table_changes_total",
            Kind::Counter,
            "Reads of the Docker Engine that changed the table since the daemon started.",
            link.changes,
        ),
    ] {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    out.0
}

struct Exposition(String);

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines. `help` needs no escaping (no `\\`,
    /// no newline).
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert_eq!(name.ends_with("_total"), kind == Kind::Counter, "{name}");
        debug_assert!(!help.contains(['\\', '\n']), "{name}");
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}")
            .expect("writing to a String cannot fail");
    }

    /// One series of the family begun last: `name{label="value",...} value`.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let out = &mut self.0;
        out.push_str(name);
        for (i, (label, label_value)) in labels.iter().enumerate() {
            out.push(if i == 0 { '{' } else { ',' });
            out.push_str(label);
            out.push_str("=\"");
            push_escaped(out, label_value);
            out.push('"');
        }
        if !labels.is_empty() {
            out.push('}');
        }
        writeln!(out, " {value}").expect("writing to a String cannot fail");
    }
}

/// Appends a label value escaped as the format wants: `\\`, `\"` and `\n`.
fn push_escaped(out: &mut String, value: &str) {
    let mut rest = value;
    while let Some(at) = rest.find(['\\', '"', '\n']) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use lb_common::{BackendStats, Event, Reason};

    use super::*;
    use crate::{
        host::netdev::TxFailures,
        instance::state::{Transmit, XdpMode},
        table::{Proto, Scheduler},
    };

    /// Counters of a backend whose live flows are `live`.
    fn counted(stats: BackendStats, live: u64, backend: BackendSnapshot) -> BackendSnapshot {
        BackendSnapshot {
            stats: Some(stats),
            live_flows: Some(live),
            ..backend
        }
    }

    /// One series as read back from the page, label values unescaped.
    #[derive(Debug)]
    struct Sample {
        labels: Vec<(String, String)>,
        value: u64,
    }

    impl Sample {
        fn label(&self, name: &str) -> &str {
            let found = self.labels.iter().find(|(label, _)| label == name);
            &found
                .unwrap_or_else(|| panic!("no label {name} in {self:?}"))
                .1
        }
    }

    /// Parses a page, asserting the structure the format and our conventions want: every
    /// family opens with one `# HELP` and one `# TYPE` line and appears once, its series right
    /// below with its name, the same label names and no two with the same labels; counters
    /// and only counters end in `_total`. Returns the families in page order.
    fn parse(text: &str) -> Vec<(String, Vec<Sample>)> {
        assert!(text.ends_with('\n'), "the page ends with a newline");
        let mut families: Vec<(String, Vec<Sample>)> = Vec::new();
        let mut lines = text.lines();
        let mut seen = BTreeSet::new();
        let mut series = BTreeSet::new();
        while let Some(line) = lines.next() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, help) = help.split_once(' ').expect("HELP has a text");
                assert!(!help.is_empty(), "{name} has an empty HELP");
                assert!(name.starts_with("lbctl_"), "{name}");
                assert!(seen.insert(name.to_owned()), "{name} appears twice");
                let kind = lines.next().and_then(|l| l.strip_prefix("# TYPE "));
                let kind = kind.unwrap_or_else(|| panic!("{name}: no TYPE after HELP"));
                let expected = if name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                };
                assert_eq!(kind, format!("{name} {expected}"));
                families.push((name.to_owned(), Vec::new()));
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment {line:?}");
            let (family, samples) = families.last_mut().expect("a series before any HELP");
            let (name, labels, value) = parse_sample(line);
            assert_eq!(&name, family, "series of another family in {family}");
            if let Some(first) = samples.first() {
                let names = |labels: &[(String, String)]| -> Vec<String> {
                    labels.iter().map(|(label, _)| label.clone()).collect()
                };
                assert_eq!(names(&first.labels), names(&labels), "{line}");
            }
            assert!(
                series.insert((name, labels.clone())),
                "duplicate series {line}"
            );
            samples.push(Sample { labels, value });
        }
        families
    }

    /// `name{label="value",...} value`, label values unescaped.
    fn parse_sample(line: &str) -> (String, Vec<(String, String)>, u64) {
        let end = line.find(['{', ' ']).expect("a name");
        let (name, mut rest) = line.split_at(end);
        let mut labels = Vec::new();
        if let Some(mut inner) = rest.strip_prefix('{') {
            loop {
                let (label, after) = inner.split_once("=\"").expect("label=\"");
                let mut value = String::new();
                let mut chars = after.char_indices();
                let close = loop {
                    match chars.next().expect("a closing quote") {
                        (at, '"') => break at,
                        (_, '\\') => value.push(match chars.next().expect("an escape").1 {
                            'n' => '\n',
                            c @ ('\\' | '"') => c,
                            c => panic!("bad escape \\{c} in {line}"),
                        }),
                        (_, c) => value.push(c),
                    }
                };
                labels.push((label.to_owned(), value));
                let after = &after[close + 1..];
                match after.split_at(1) {
                    (",", more) => inner = more,
                    ("}", more) => {
                        rest = more;
                        break;
                    }
                    _ => panic!("bad label list in {line}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect("a space before the value");
        let value = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        (name.to_owned(), labels, value)
    }

    /// The series of the family `name`.
    fn family<'a>(families: &'a [(String, Vec<Sample>)], name: &str) -> &'a [Sample] {
        let found = families.iter().find(|(family, _)| family == name);
        &found.unwrap_or_else(|| panic!("no family {name}")).1
    }

    /// A per-service family's values by service.
    fn per_service(samples: &[Sample]) -> BTreeMap<&str, u64> {
        samples
            .iter()
            .map(|s| (s.label("service"), s.value))
            .collect()
    }

    /// `(series, value)` added up by the series' `service` label.
    fn sum_by_service<'a>(
        samples: impl Iterator<Item = (&'a Sample, u64)>,
    ) -> BTreeMap<&'a str, u64> {
        let mut sums = BTreeMap::new();
        for (sample, value) in samples {
            *sums.entry(sample.label("service")).or_default() += value;
        }
        sums
    }

    fn backend(addr: &str, node: Option<&str>, health: Health, drained: bool) -> BackendSnapshot {
        BackendSnapshot {
            addr: addr.parse().unwrap(),
            id: 1,
            node: node.map(str::to_owned),
            health,
            drained,
            weight: 1,
            stats: None,
            live_flows: None,
            passive: None,
            ejected: None,
        }
    }

    fn service(name: &str, fail_open: bool, backends: Vec<BackendSnapshot>) -> ServiceSnapshot {
        ServiceSnapshot {
            name: name.to_owned(),
            id: 1,
            proto: Proto::Tcp,
            port: 8080,
            vip: None,
            frontend: "tcp/8080".to_owned(),
            scheduler: Scheduler::default(),
            health_check: "no health check".to_owned(),
            fail_open,
            origin: Default::default(),
            backends,
        }
    }

    /// Every reason and event with the given counts, as the daemon passes them.
    fn all_reasons(count: impl Fn(Reason) -> (u64, u64)) -> Vec<(&'static str, u64, u64)> {
        let with_counts = |&r: &Reason| (r.name(), count(r).0, count(r).1);
        Reason::ALL.iter().map(with_counts).collect()
    }

    fn all_events() -> Vec<(&'static str, u64)> {
        Event::ALL
            .iter()
            .map(|&e| (e.name(), e as u64 + 1))
            .collect()
    }

    /// One service, two backends: a local unhealthy one, and a drained one on another node
    /// that was never checked. The instance name needs escaping.
    fn small_snapshot() -> Snapshot {
        let local = counted(
            BackendStats {
                packets: 10,
                bytes: 1000,
                reply_packets: 8,
                reply_bytes: 640,
                new_flows: 3,
            },
            2,
            backend("10.0.0.5:80", None, Health::Unhealthy, false),
        );
        let remote = counted(
            BackendStats {
                packets: 4,
                bytes: 600,
                reply_packets: 2,
                reply_bytes: 300,
                new_flows: 1,
            },
            1,
            backend("10.0.1.6:80", Some("node-2"), Health::Unknown, true),
        );
        let local = BackendSnapshot {
            passive: Some(lb_common::PassiveHealth {
                refused: 5,
                unanswered: 2,
                ejections: 2,
                returns: 1,
                ..Default::default()
            }),
            ejected: Some(true),
            ..local
        };
        Snapshot {
            instance: "ns \"a\"\\b\nc".to_owned(),
            node: Some("node-1".to_owned()),
            version: "0.1.0".to_owned(),
            table_generation: 7,
            flow_entries: 3,
            flow_capacity: 1024,
            flow_entries6: 2,
            flow_capacity6: 4096,
            reasons: vec![
                ("forward_tx", 10, 1000),
                ("forward_encap_tx", 4, 600),
                ("reply_encap", 2, 300),
                ("decap_stack", 3, 450),
                ("drop_no_backend", 1, 60),
                ("pass_not_service", 5, 300),
            ],
            events: vec![("flow_created", 4), ("flow_reselected", 1)],
            services: vec![service("web", false, vec![local, remote])],
            interfaces: vec![InterfaceReport {
                iface: "uplink".to_owned(),
                xdp_mode: Some(XdpMode::Native),
                transmit: Some(Transmit::Tc),
                tx_failures: Some(TxFailures {
                    dropped: 2,
                    errors: 0,
                    xdp_errors: 1,
                }),
            }],
        }
    }

    #[test]
    fn small_snapshot_renders_exactly() {
        let got = render(&small_snapshot());
        for (got, want) in got.lines().zip(SMALL_PAGE.lines()) {
            assert_eq!(got, want);
        }
        assert_eq!(got, SMALL_PAGE);
    }

    const SMALL_PAGE: &str = r#"# HELP lbctl_build_info lbctl's version, instance (network namespace) and node in the mesh (empty outside a mesh); always 1.
# TYPE lbctl_build_info gauge
lbctl_build_info{version="0.1.0",instance="ns \"a\"\\b\nc",node="node-1"} 1
# HELP lbctl_table_generation Generation of the service table applied to the data plane.
# TYPE lbctl_table_generation gauge
lbctl_table_generation 7
# HELP lbctl_flow_table_entries Entries in the flow table at its last scan.
# TYPE lbctl_flow_table_entries gauge
lbctl_flow_table_entries 3
# HELP lbctl_flow_table_capacity Size of the flow table, in flows.
# TYPE lbctl_flow_table_capacity gauge
lbctl_flow_table_capacity 1024
# HELP lbctl_flow_table_ipv6_entries Entries in the IPv6 flow table at its last scan.
# TYPE lbctl_flow_table_ipv6_entries gauge
lbctl_flow_table_ipv6_entries 2
# HELP lbctl_flow_table_ipv6_capacity Size of the IPv6 flow table, in flows.
# TYPE lbctl_flow_table_ipv6_capacity gauge
lbctl_flow_table_ipv6_capacity 4096
# HELP lbctl_packets_total Packets the data plane handled, by what it did with them; each packet counts under exactly one reason, and xmit_tc on top when TC sent it for XDP.
# TYPE lbctl_packets_total counter
lbctl_packets_total{reason="forward_tx"} 10
lbctl_packets_total{reason="forward_encap_tx"} 4
lbctl_packets_total{reason="reply_encap"} 2
lbctl_packets_total{reason="decap_stack"} 3
lbctl_packets_total{reason="drop_no_backend"} 1
lbctl_packets_total{reason="pass_not_service"} 5
# HELP lbctl_packet_bytes_total Bytes (whole frames as received) of the packets the data plane handled, by reason.
# TYPE lbctl_packet_bytes_total counter
lbctl_packet_bytes_total{reason="forward_tx"} 1000
lbctl_packet_bytes_total{reason="forward_encap_tx"} 600
lbctl_packet_bytes_total{reason="reply_encap"} 300
lbctl_packet_bytes_total{reason="decap_stack"} 450
lbctl_packet_bytes_total{reason="drop_no_backend"} 60
lbctl_packet_bytes_total{reason="pass_not_service"} 300
# HELP lbctl_dropped_packets_total Packets dropped: lbctl_packets_total summed over the drop_* reasons.
# TYPE lbctl_dropped_packets_total counter
lbctl_dropped_packets_total 1
# HELP lbctl_passed_packets_total Packets passed to the kernel untouched: lbctl_packets_total summed over the pass_* reasons.
# TYPE lbctl_passed_packets_total counter
lbctl_passed_packets_total 5
# HELP lbctl_vxlan_encapsulated_packets_total Packets sent VXLAN-encapsulated to another node: forward_encap_tx, forward_encap_redirect and reply_encap.
# TYPE lbctl_vxlan_encapsulated_packets_total counter
lbctl_vxlan_encapsulated_packets_total 6
# HELP lbctl_vxlan_decapsulated_packets_total Overlay packets decapsulated for a backend on this node: decap_tx, decap_redirect and decap_stack. Encapsulated replies count under reply_* with plain replies and are not included.
# TYPE lbctl_vxlan_decapsulated_packets_total counter
lbctl_vxlan_decapsulated_packets_total 3
# HELP lbctl_flow_events_total Flow table events: flows created, flows that chose again because their backend was removed, creation races lost to another CPU, new flows sent to unhealthy backends (failing open), evicted TCP connections found again by maglev.
# TYPE lbctl_flow_events_total counter
lbctl_flow_events_total{event="flow_created"} 4
lbctl_flow_events_total{event="flow_reselected"} 1
# HELP lbctl_service_info A service and its frontend (protocol/[VIP:]port); always 1.
# TYPE lbctl_service_info gauge
lbctl_service_info{service="web",frontend="tcp/8080"} 1
# HELP lbctl_service_packets_total Packets from clients forwarded to the service's current backends (sum).
# TYPE lbctl_service_packets_total counter
lbctl_service_packets_total{service="web"} 14
# HELP lbctl_service_bytes_total Bytes from clients forwarded to the service's current backends (sum).
# TYPE lbctl_service_bytes_total counter
lbctl_service_bytes_total{service="web"} 1600
# HELP lbctl_service_reply_packets_total Reply packets from the service's current backends to clients (sum).
# TYPE lbctl_service_reply_packets_total counter
lbctl_service_reply_packets_total{service="web"} 10
# HELP lbctl_service_reply_bytes_total Bytes of the replies from the service's current backends (sum).
# TYPE lbctl_service_reply_bytes_total counter
lbctl_service_reply_bytes_total{service="web"} 940
# HELP lbctl_service_connections_total New flows that chose one of the service's current backends (sum).
# TYPE lbctl_service_connections_total counter
lbctl_service_connections_total{service="web"} 4
# HELP lbctl_service_refused_connections_total Connections the service's current backends refused (sum).
# TYPE lbctl_service_refused_connections_total counter
lbctl_service_refused_connections_total{service="web"} 5
# HELP lbctl_service_unanswered_connections_total Connections the service's current backends left unanswered (sum).
# TYPE lbctl_service_unanswered_connections_total counter
lbctl_service_unanswered_connections_total{service="web"} 2
# HELP lbctl_service_ejections_total Ejections of the service's current backends (sum).
# TYPE lbctl_service_ejections_total counter
lbctl_service_ejections_total{service="web"} 2
# HELP lbctl_service_ejection_returns_total Ejections of the service's current backends ended by the active checks (sum).
# TYPE lbctl_service_ejection_returns_total counter
lbctl_service_ejection_returns_total{service="web"} 1
# HELP lbctl_service_ejected The service's backends the data plane has ejected now.
# TYPE lbctl_service_ejected gauge
lbctl_service_ejected{service="web"} 1
# HELP lbctl_service_flows Open flows pinned to the service's backends in the flow table (last scan).
# TYPE lbctl_service_flows gauge
lbctl_service_flows{service="web"} 3
# HELP lbctl_service_backends Backends configured for the service, drained and unhealthy ones included.
# TYPE lbctl_service_backends gauge
lbctl_service_backends{service="web"} 2
# HELP lbctl_service_healthy_backends Backends eligible for new flows: not drained, not of weight 0 and not unhealthy (healthy, or not checked here).
# TYPE lbctl_service_healthy_backends gauge
lbctl_service_healthy_backends{service="web"} 0
# HELP lbctl_service_fail_open 1 when every backend is unhealthy and new flows go to all of them anyway, else 0.
# TYPE lbctl_service_fail_open gauge
lbctl_service_fail_open{service="web"} 0
# HELP lbctl_backend_packets_total Packets from clients forwarded to the backend.
# TYPE lbctl_backend_packets_total counter
lbctl_backend_packets_total{service="web",backend="10.0.0.5:80",node=""} 10
lbctl_backend_packets_total{service="web",backend="10.0.1.6:80",node="node-2"} 4
# HELP lbctl_backend_bytes_total Bytes (whole frames as received) from clients forwarded to the backend.
# TYPE lbctl_backend_bytes_total counter
lbctl_backend_bytes_total{service="web",backend="10.0.0.5:80",node=""} 1000
lbctl_backend_bytes_total{service="web",backend="10.0.1.6:80",node="node-2"} 600
# HELP lbctl_backend_reply_packets_total Reply packets from the backend reverse-NATed to clients.
# TYPE lbctl_backend_reply_packets_total counter
lbctl_backend_reply_packets_total{service="web",backend="10.0.0.5:80",node=""} 8
lbctl_backend_reply_packets_total{service="web",backend="10.0.1.6:80",node="node-2"} 2
# HELP lbctl_backend_reply_bytes_total Bytes of the replies from the backend reverse-NATed to clients.
# TYPE lbctl_backend_reply_bytes_total counter
lbctl_backend_reply_bytes_total{service="web",backend="10.0.0.5:80",node=""} 640
lbctl_backend_reply_bytes_total{service="web",backend="10.0.1.6:80",node="node-2"} 300
# HELP lbctl_backend_connections_total New flows (connections) that chose the backend.
# TYPE lbctl_backend_connections_total counter
lbctl_backend_connections_total{service="web",backend="10.0.0.5:80",node=""} 3
lbctl_backend_connections_total{service="web",backend="10.0.1.6:80",node="node-2"} 1
# HELP lbctl_backend_refused_connections_total Connections the backend refused: a RST or an ICMP destination unreachable answering a SYN the data plane forwarded.
# TYPE lbctl_backend_refused_connections_total counter
lbctl_backend_refused_connections_total{service="web",backend="10.0.0.5:80",node=""} 5
lbctl_backend_refused_connections_total{service="web",backend="10.0.1.6:80",node="node-2"} 0
# HELP lbctl_backend_unanswered_connections_total Connections the backend left unanswered: the client sent its SYN again with no SYN-ACK between.
# TYPE lbctl_backend_unanswered_connections_total counter
lbctl_backend_unanswered_connections_total{service="web",backend="10.0.0.5:80",node=""} 2
lbctl_backend_unanswered_connections_total{service="web",backend="10.0.1.6:80",node="node-2"} 0
# HELP lbctl_backend_ejections_total Times the data plane ejected the backend after connections in a row failed.
# TYPE lbctl_backend_ejections_total counter
lbctl_backend_ejections_total{service="web",backend="10.0.0.5:80",node=""} 2
lbctl_backend_ejections_total{service="web",backend="10.0.1.6:80",node="node-2"} 0
# HELP lbctl_backend_ejection_returns_total Ejections of the backend ended by the active checks finding it healthy.
# TYPE lbctl_backend_ejection_returns_total counter
lbctl_backend_ejection_returns_total{service="web",backend="10.0.0.5:80",node=""} 1
lbctl_backend_ejection_returns_total{service="web",backend="10.0.1.6:80",node="node-2"} 0
# HELP lbctl_backend_ejected 1 while the data plane has the backend ejected (new flows pass it by).
# TYPE lbctl_backend_ejected gauge
lbctl_backend_ejected{service="web",backend="10.0.0.5:80",node=""} 1
lbctl_backend_ejected{service="web",backend="10.0.1.6:80",node="node-2"} 0
# HELP lbctl_backend_flows Open flows pinned to the backend in the flow table (last scan).
# TYPE lbctl_backend_flows gauge
lbctl_backend_flows{service="web",backend="10.0.0.5:80",node=""} 2
lbctl_backend_flows{service="web",backend="10.0.1.6:80",node="node-2"} 1
# HELP lbctl_backend_drained 1 when the backend is drained (keeps its flows, gets no new ones), else 0.
# TYPE lbctl_backend_drained gauge
lbctl_backend_drained{service="web",backend="10.0.0.5:80",node=""} 0
lbctl_backend_drained{service="web",backend="10.0.1.6:80",node="node-2"} 1
# HELP lbctl_backend_health The backend's health: 1 for its current state, 0 for the others (unknown: not checked here).
# TYPE lbctl_backend_health gauge
lbctl_backend_health{service="web",backend="10.0.0.5:80",node="",state="healthy"} 0
lbctl_backend_health{service="web",backend="10.0.0.5:80",node="",state="unhealthy"} 1
lbctl_backend_health{service="web",backend="10.0.0.5:80",node="",state="unknown"} 0
lbctl_backend_health{service="web",backend="10.0.1.6:80",node="node-2",state="healthy"} 0
lbctl_backend_health{service="web",backend="10.0.1.6:80",node="node-2",state="unhealthy"} 0
lbctl_backend_health{service="web",backend="10.0.1.6:80",node="node-2",state="unknown"} 1
# HELP lbctl_interface_info An attached interface, its XDP mode (native, generic) and how the frames XDP sends leave it (xdp: XDP_TX and redirects; tc: through the TC ingress program); always 1.
# TYPE lbctl_interface_info gauge
lbctl_interface_info{iface="uplink",xdp_mode="native",transmit="tc"} 1
# HELP lbctl_interface_transmit_failures_total Frames an attached interface failed to send, by kind: dropped and errors (the kernel's device counters), xdp_errors (the driver's XDP transmit errors).
# TYPE lbctl_interface_transmit_failures_total counter
lbctl_interface_transmit_failures_total{iface="uplink",kind="dropped"} 2
lbctl_interface_transmit_failures_total{iface="uplink",kind="errors"} 0
lbctl_interface_transmit_failures_total{iface="uplink",kind="xdp_errors"} 1
"#;

    /// 1,000 services of 10 backends: every fourth service has every backend unhealthy and
    /// fails open, the others mix health states; odd backends are on another node, the last
    /// of each service is drained.
    fn large_snapshot() -> Snapshot {
        let services = (0..1000u64)
            .map(|i| {
                let backends = (0..10u64)
                    .map(|j| {
                        let health = match (i % 4, j % 3) {
                            (0, _) => Health::Unhealthy,
                            (_, 0) => Health::Healthy,
                            (_, 1) => Health::Unknown,
                            _ => Health::Unhealthy,
                        };
                        let node = format!("node-{}", j % 5);
                        let addr = format!("10.{}.{}.{j}:8080", i / 256, i % 256);
                        let n = i * 10 + j;
                        let stats = BackendStats {
                            packets: n * 1000,
                            bytes: n * 1_500_000,
                            reply_packets: n * 900,
                            reply_bytes: n * 1_000_000,
                            new_flows: n * 10,
                        };
                        let node = (j % 2 == 1).then_some(node.as_str());
                        counted(stats, n % 7, backend(&addr, node, health, j == 9))
                    })
                    .collect();
                service(&format!("service-{i:04}"), i % 4 == 0, backends)
            })
            .collect();
        Snapshot {
            instance: "lb-node-1".to_owned(),
            node: Some("node-1".to_owned()),
            version: "0.1.0".to_owned(),
            table_generation: 12_345,
            flow_entries: 300_000,
            flow_capacity: u64::from(lb_common::DEFAULT_FLOW_CAPACITY),
            flow_entries6: 30_000,
            flow_capacity6: u64::from(lb_common::DEFAULT_FLOW_CAPACITY / 8),
            reasons: all_reasons(|r| (r as u64 * 1_000_003, r as u64 * 90_000_000)),
            events: all_events(),
            services,
            interfaces: Vec::new(),
        }
    }

    const FAMILIES: usize = 43;

    #[test]
    fn thousand_services_of_ten_backends_render_every_family_once_and_every_series_once() {
        let snapshot = large_snapshot();
        let page = render(&snapshot);
        // `parse` checks one HELP and one TYPE per family, series together and no duplicates.
        let families = parse(&page);
        assert_eq!(families.len(), FAMILIES);
        let series = |prefix: &str| -> usize {
            let of_prefix = families.iter().filter(|(name, _)| name.starts_with(prefix));
            of_prefix.map(|(_, samples)| samples.len()).sum()
        };
        // 12 families with a series per backend, and the health with 3.
        assert_eq!(series("lbctl_backend_"), 10_000 * (12 + 3));
        // Info, 11 sums, backends, healthy backends, fail open.
        assert_eq!(series("lbctl_service_"), 1000 * 15);
        let data_plane = 6 + 2 * Reason::ALL.len() + 4 + Event::ALL.len();
        let all = series("");
        assert_eq!(all, 10_000 * 15 + 1000 * 15 + data_plane);
        assert_eq!(page.lines().count(), 2 * FAMILIES + all);
        // Pre-sized: the buffer never grew, and was not much too large.
        let estimate = estimated_len(&snapshot);
        assert!(page.len() <= estimate, "{} > {estimate}", page.len());
        assert!(
            estimate <= page.len() / 4 * 5,
            "{estimate} for {}",
            page.len()
        );
    }

    #[test]
    fn an_empty_snapshot_still_lists_every_family() {
        let families = parse(&render(&Snapshot::default()));
        assert_eq!(families.len(), FAMILIES);
        let series: usize = families.iter().map(|(_, samples)| samples.len()).sum();
        // build info, generation, both flow tables' entries and capacity, the 4 data plane
        // sums.
        assert_eq!(series, 10);
    }

    /// For every backend family with a per-service sum, the service's value is the sum of its
    /// backends' series; the service's backend counts follow the drained and health series.
    #[test]
    fn service_families_sum_their_backends() {
        let families = parse(&render(&large_snapshot()));
        let series = |name: &str| family(&families, name);
        let by_service = |name: &str| per_service(series(name));
        let mut summed = 0;
        for (name, samples) in &families {
            let Some(quantity) = name.strip_prefix("lbctl_backend_") else {
                continue;
            };
            if matches!(quantity, "drained" | "health") {
                continue;
            }
            let sums = sum_by_service(samples.iter().map(|s| (s, s.value)));
            assert_eq!(
                by_service(&format!("lbctl_service_{quantity}")),
                sums,
                "{name}"
            );
            summed += 1;
        }
        assert_eq!(summed, 11);

        let backends = series("lbctl_backend_drained");
        let counts = sum_by_service(backends.iter().map(|s| (s, 1)));
        assert_eq!(by_service("lbctl_service_backends"), counts);
        let drained: BTreeSet<(&str, &str)> = backends
            .iter()
            .filter(|s| s.value == 1)
            .map(|s| (s.label("service"), s.label("backend")))
            .collect();
        let eligible = series("lbctl_backend_health").iter().filter_map(|s| {
            let key = (s.label("service"), s.label("backend"));
            let counted = s.label("state") == "unhealthy" && !drained.contains(&key);
            counted.then_some((s, 1 - s.value))
        });
        let eligible_counts = sum_by_service(eligible);
        assert_eq!(
            by_service("lbctl_service_healthy_backends"),
            eligible_counts
        );
        assert!(eligible_counts.values().any(|&n| n > 0));
        assert!(eligible_counts.values().any(|&n| n == 0));
    }

    #[test]
    fn label_values_are_escaped_and_read_back_unchanged() {
        let odd = "a \"b\" \\c\\\nd\"";
        let mut snapshot = small_snapshot();
        snapshot.node = Some(odd.to_owned());
        let service = &mut snapshot.services[0];
        service.name = odd.to_owned();
        service.frontend = odd.to_owned();
        service.backends[1].node = Some(odd.to_owned());
        let page = render(&snapshot);
        // No raw newline slipped into a series: as many lines as the plain page.
        assert_eq!(page.lines().count(), SMALL_PAGE.lines().count());
        let families = parse(&page);
        let mut checked = 0;
        for sample in families.iter().flat_map(|(_, samples)| samples) {
            for (label, value) in &sample.labels {
                let plain = ["10.0.0.5:80", "10.0.1.6:80", ""].contains(&value.as_str());
                if ["service", "frontend", "backend", "node"].contains(&label.as_str()) && !plain {
                    assert_eq!(value, odd, "{label} of {sample:?}");
                    checked += 1;
                }
            }
        }
        // build_info's node, service info's 2, the 14 other service families, and on each of the
        // 15 series of the 2 backends the service, and the node of the second.
        assert_eq!(checked, 1 + 2 + 14 + 15 * 2 + 15);
        let build_info = &families[0].1[0];
        assert_eq!(build_info.label("instance"), "ns \"a\"\\b\nc");
    }

    /// The rule of `lbctl_service_healthy_backends` (not drained, not unhealthy) and
    /// `lbctl_service_fail_open`, table-driven.
    #[test]
    fn healthy_backends_and_fail_open() {
        use Health::*;
        /// Each backend's health and whether it is drained.
        type Backends = &'static [(Health, bool)];
        let cases: &[(&str, bool, Backends, u64)] = &[
            ("no-backends", false, &[], 0),
            (
                "all-healthy",
                false,
                &[(Healthy, false), (Healthy, false)],
                2,
            ),
            (
                "unknown-counts",
                false,
                &[(Unknown, false), (Healthy, false)],
                2,
            ),
            (
                "unhealthy-not",
                false,
                &[(Unhealthy, false), (Healthy, false)],
                1,
            ),
            (
                "drained-not",
                false,
                &[(Healthy, true), (Unknown, true), (Healthy, false)],
                1,
            ),
            (
                "fail-open",
                true,
                &[(Unhealthy, false), (Unhealthy, false)],
                0,
            ),
            ("all-drained", false, &[(Healthy, true)], 0),
        ];
        let services = cases.iter().map(|&(name, fail_open, backends, _)| {
            let backends = backends.iter().enumerate().map(|(i, &(health, drained))| {
                backend(&format!("10.0.0.{i}:80"), None, health, drained)
            });
            service(name, fail_open, backends.collect())
        });
        let snapshot = Snapshot {
            services: services.collect(),
            ..Snapshot::default()
        };
        let families = parse(&render(&snapshot));
        let by_service = |name: &str| per_service(family(&families, name));
        let (healthy, fail_open) = (
            by_service("lbctl_service_healthy_backends"),
            by_service("lbctl_service_fail_open"),
        );
        let weightless = BackendSnapshot {
            weight: 0,
            ..backend("10.0.0.9:80", None, Healthy, false)
        };
        assert!(!weightless.eligible(), "weight 0 takes no new flows");
        for &(name, open, backends, eligible) in cases {
            assert_eq!(healthy[name], eligible, "{name}: healthy backends");
            assert_eq!(fail_open[name], u64::from(open), "{name}: fail open");
            assert_eq!(
                by_service("lbctl_service_backends")[name],
                backends.len() as u64
            );
        }
    }

    #[test]
    fn data_plane_totals_sum_their_reasons() {
        // Reason slot n counts 2^n packets, so each total shows which slots it added.
        let snapshot = Snapshot {
            reasons: all_reasons(|r| (1 << r as u32, 1)),
            events: all_events(),
            ..Snapshot::default()
        };
        let families = parse(&render(&snapshot));
        let total = |name: &str| family(&families, name).iter().map(|s| s.value).sum::<u64>();
        let slots = |slots: &[u32]| slots.iter().map(|n| 1u64 << n).sum::<u64>();
        // drop_no_backend, drop_flow_table_full, drop_vxlan_*, drop_encap_*, drop_mesh_*,
        // drop_snat_*, drop_backend_refused, drop_backend_unreachable, drop_no_backend_of_family,
        // drop_ipv6_hairpin.
        let dropped = slots(&[
            15, 16, 24, 25, 26, 27, 28, 29, 30, 31, 34, 35, 36, 41, 42, 49, 51,
        ]);
        assert_eq!(total("lbctl_dropped_packets_total"), dropped);
        // pass_not_ipv4 ... pass_not_local, pass_vxlan_other_vni, pass_flow_unknown,
        // pass_other_host, pass_ipv6_extension.
        let passed = slots(&[0, 1, 2, 3, 4, 5, 6, 23, 32, 37, 50]);
        assert_eq!(total("lbctl_passed_packets_total"), passed);
        // forward_encap_tx, forward_encap_redirect, reply_encap.
        let encapsulated = slots(&[17, 18, 22]);
        assert_eq!(
            total("lbctl_vxlan_encapsulated_packets_total"),
            encapsulated
        );
        // decap_tx, decap_redirect, decap_stack.
        let decapsulated = slots(&[19, 20, 21]);
        assert_eq!(
            total("lbctl_vxlan_decapsulated_packets_total"),
            decapsulated
        );
        let every_reason = (1u64 << Reason::ALL.len()) - 1;
        assert_eq!(total("lbctl_packets_total"), every_reason);
        let bytes = Reason::ALL.len() as u64;
        assert_eq!(total("lbctl_packet_bytes_total"), bytes);
        let events = (1..=Event::ALL.len() as u64).sum::<u64>();
        assert_eq!(total("lbctl_flow_events_total"), events);
    }

    /// `parse` is what the structure tests rely on: it must refuse what they check for.
    #[test]
    fn the_structure_check_refuses_malformed_pages() {
        let ok =
            "# HELP lbctl_x_total X.\n# TYPE lbctl_x_total counter\nlbctl_x_total{a=\"1\"} 1\n";
        assert_eq!(parse(ok).len(), 1);
        let bad = [
            ("no TYPE", "# HELP lbctl_x_total X.\nlbctl_x_total 1\n"),
            ("no HELP", "# TYPE lbctl_x_total counter\nlbctl_x_total 1\n"),
            ("twice", &format!("{ok}{ok}")),
            ("duplicate", &format!("{ok}lbctl_x_total{{a=\"1\"}} 2\n")),
            ("other labels", &format!("{ok}lbctl_x_total{{b=\"1\"}} 2\n")),
            ("other family", &format!("{ok}lbctl_y_total 2\n")),
            (
                "gauge _total",
                "# HELP lbctl_x_total X.\n# TYPE lbctl_x_total gauge\n",
            ),
            ("counter", "# HELP lbctl_x X.\n# TYPE lbctl_x counter\n"),
            (
                "bad escape",
                "# HELP lbctl_x X.\n# TYPE lbctl_x gauge\nlbctl_x{a=\"\\t\"} 1\n",
            ),
            (
                "no newline",
                "# HELP lbctl_x X.\n# TYPE lbctl_x gauge\nlbctl_x 1",
            ),
        ];
        for (what, page) in bad {
            let refused = std::panic::catch_unwind(|| parse(page)).is_err();
            assert!(refused, "{what} was accepted");
        }
    }

    #[test]
    fn the_cluster_families_render_every_member_state_and_reason() {
        use crate::cluster::{MemberStatus, Status};
        let member = |name: &str, alive: bool, agrees: bool| MemberStatus {
            name: name.into(),
            generation: 1,
            gossip_addr: "192.168.1.1:7946".into(),
            vtep: None,
            alive,
            digest: None,
            agrees,
            this: name == "n1",
            key: None,
            cut_off: (name == "n3").then(|| "cannot open this node's gossip".to_owned()),
        };
        let status = Status {
            cluster: "prod".into(),
            node: "n1".into(),
            gossip_addr: "192.168.1.1:7946".into(),
            vtep: "192.168.1.1".parse().unwrap(),
            generation: 1,
            digest: "00112233aabbccdd".into(),
            table_generation: 3,
            table_changes: 2,
            converged: false,
            members: vec![
                member("n1", true, true),
                member("n2", true, false),
                member("n3", false, false),
            ],
            rejected: [("malformed".to_owned(), 4), ("wrong_cluster".to_owned(), 0)]
                .into_iter()
                .collect(),
            keys: Some(vec!["1a2b3c4d".into(), "5e6f7a8b".into()]),
            cut_off_peers: vec![crate::cluster::PeerCutOff {
                gossip_addr: "192.168.1.9:7946".into(),
                why: "seals with key 09090909, which this node's key file lacks".into(),
            }],
            key_file_refused: Some("mode 644".into()),
        };
        let page = render_cluster(&status);
        let insecure = render_cluster(&Status {
            keys: None,
            ..status.clone()
        });
        assert!(
            insecure.lines().any(|l| l == "lbctl_gossip_sealed 0"),
            "{insecure}"
        );
        assert!(!insecure.contains("lbctl_gossip_key_info{"), "{insecure}");
        for line in [
            "lbctl_cluster_info{cluster=\"prod\",node=\"n1\",digest=\"00112233aabbccdd\"} 1",
            "lbctl_cluster_members{state=\"alive\"} 2",
            "lbctl_cluster_members{state=\"dead\"} 1",
            "lbctl_cluster_members_agreeing 1",
            "lbctl_cluster_members_cut_off 2",
            "lbctl_gossip_key_file_refused 1",
            "lbctl_cluster_converged 0",
            "lbctl_cluster_table_changes_total 2",
            "# TYPE lbctl_gossip_rejected_messages_total counter",
            "lbctl_gossip_rejected_messages_total{reason=\"malformed\"} 4",
            "lbctl_gossip_rejected_messages_total{reason=\"wrong_cluster\"} 0",
            "lbctl_gossip_sealed 1",
            "lbctl_gossip_key_info{key=\"1a2b3c4d\",seals=\"true\"} 1",
            "lbctl_gossip_key_info{key=\"5e6f7a8b\",seals=\"false\"} 1",
        ] {
            assert!(page.lines().any(|l| l == line), "no {line:?} in\n{page}");
        }
    }
}
