//! `service ls` and `stats`: the instance's [`Snapshot`] rendered as text or JSON.
use super::{
    snapshot::{self, InterfaceReport, ServiceSnapshot, Snapshot},
    *,
};

/// A service as `service ls --json` and `stats --json` list it. Serialized as it is, without a
/// `serde_json::Value` in between (which took most of a listing's half second and 300 MB with
/// 100,000 backends); fields in alphabetical order, as `json!` objects had them.
#[derive(Serialize)]
struct ServiceListing<'a> {
    backends: Vec<BackendListing<'a>>,
    fail_open: bool,
    health_check: &'a str,
    id: u32,
    name: &'a str,
    origin: crate::table::Origin,
    port: u16,
    proto: Proto,
    scheduler: Scheduler,
    vip: Option<std::net::IpAddr>,
}

/// A backend of a [`ServiceListing`]; counters are `null` when the maps are not there.
#[derive(Serialize)]
struct BackendListing<'a> {
    address: std::net::SocketAddr,
    bytes: Option<u64>,
    drained: bool,
    /// Ejected by the data plane now (passive health checking).
    ejected: Option<bool>,
    ejections: Option<u64>,
    health: &'static str,
    id: u32,
    live_flows: Option<u64>,
    new_flows: Option<u64>,
    node: Option<&'a str>,
    packets: Option<u64>,
    /// Connections the backend refused (a RST or an ICMP unreachable answering the SYN).
    refused: Option<u64>,
    reply_bytes: Option<u64>,
    reply_packets: Option<u64>,
    /// Connections the backend left unanswered.
    unanswered: Option<u64>,
    weight: u32,
}

/// How full the flow table is (`stats --json`).
#[derive(Serialize)]
struct FlowTableListing {
    capacity: u32,
    entries: u64,
    /// The IPv6 flow table's.
    capacity6: u64,
    entries6: u64,
}

/// The top of `service ls --json` and `stats --json` (`reasons`, `events` and `interfaces`:
/// `stats` only).
#[derive(Serialize)]
struct Listing<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    attached: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flow_table: Option<FlowTableListing>,
    generation: u64,
    instance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    interfaces: Option<&'a [InterfaceReport]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasons: Option<serde_json::Map<String, serde_json::Value>>,
    services: Vec<ServiceListing<'a>>,
}

fn service_listing(service: &ServiceSnapshot) -> ServiceListing<'_> {
    let backends = service
        .backends
        .iter()
        .map(|backend| BackendListing {
            address: backend.addr,
            node: backend.node.as_deref(),
            id: backend.id,
            health: backend.health.as_str(),
            drained: backend.drained,
            live_flows: backend.live_flows,
            packets: backend.stats.map(|s| s.packets),
            bytes: backend.stats.map(|s| s.bytes),
            reply_packets: backend.stats.map(|s| s.reply_packets),
            reply_bytes: backend.stats.map(|s| s.reply_bytes),
            new_flows: backend.stats.map(|s| s.new_flows),
            ejected: backend.ejected,
            ejections: backend.passive.map(|p| p.ejections),
            refused: backend.passive.map(|p| p.refused),
            unanswered: backend.passive.map(|p| p.unanswered),
            weight: backend.weight,
        })
        .collect();
    ServiceListing {
        name: &service.name,
        id: service.id,
        proto: service.proto,
        port: service.port,
        vip: service.vip,
        health_check: &service.health_check,
        scheduler: service.scheduler,
        fail_open: service.fail_open,
        origin: service.origin,
        backends,
    }
}

fn open_maps_if_attached(instance: &Instance, state: &State) -> Option<Maps> {
    if state.attachments.is_empty() {
        return None;
    }
    Maps::open_pinned(&instance.maps_dir()).ok()
}

pub fn service_ls(instance: &Instance, as_json: bool) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = state::load(&instance.state_dir)?;
    let maps = open_maps_if_attached(instance, &state);
    let census = maps.as_ref().map(Maps::flow_census).transpose()?;
    let counters = maps
        .as_ref()
        .zip(census.as_ref())
        .map(|(maps, census)| snapshot::Counters { maps, census });
    let snapshot = snapshot::read(instance, &state, None, counters)?;
    if as_json {
        let doc = Listing {
            attached: Some(
                snapshot
                    .interfaces
                    .iter()
                    .map(|i| i.iface.as_str())
                    .collect(),
            ),
            interfaces: None,
            events: None,
            flow_table: None,
            generation: snapshot.table_generation,
            instance: &snapshot.instance,
            reasons: None,
            services: snapshot.services.iter().map(service_listing).collect(),
        };
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    Ok(services_text(&snapshot))
}

/// The services of `snapshot`, a line each, and their backends, a line each (with counters and
/// live flows when the maps were read).
fn services_text(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    if snapshot.services.is_empty() {
        out.push_str("no services\n");
    }
    for service in &snapshot.services {
        out.push_str(&format!(
            "{} {}{} ({} backends, {}; {}){}\n",
            service.name,
            service.frontend,
            match service.origin {
                crate::table::Origin::Docker => " from Docker",
                crate::table::Origin::Operator => "",
            },
            service.backends.len(),
            service.scheduler,
            service.health_check,
            if service.fail_open {
                " FAILING OPEN: every backend is unhealthy, new flows go to all of them"
            } else {
                ""
            }
        ));
        for backend in &service.backends {
            let status = format!(
                "{}{}{}",
                backend.health.as_str(),
                if backend.drained { ",drained" } else { "" },
                if backend.ejected == Some(true) {
                    ",ejected"
                } else {
                    ""
                }
            );
            let weight = backend.weight;
            let name = match &backend.node {
                Some(node) => format!("{}@{node}", backend.addr),
                None => backend.addr.to_string(),
            };
            match backend.stats {
                Some(s) => {
                    let p = backend.passive_totals();
                    out.push_str(&format!(
                        "  {name:<21} {status:<17} weight={weight} live_flows={} new_flows={} packets={} bytes={} reply_packets={} reply_bytes={} refused={} unanswered={} ejections={}\n",
                        backend.live_flows.unwrap_or(0),
                        s.new_flows,
                        s.packets,
                        s.bytes,
                        s.reply_packets,
                        s.reply_bytes,
                        p.refused,
                        p.unanswered,
                        p.ejections
                    ));
                }
                None => out.push_str(&format!("  {name:<21} {status:<17} weight={weight}\n")),
            }
        }
    }
    out.trim_end().to_owned()
}

pub fn stats(instance: &Instance, as_json: bool) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = attached_state(instance)?;
    let maps = Maps::open_pinned(&instance.maps_dir())?;
    let census = maps.flow_census()?;
    let counters = snapshot::Counters {
        maps: &maps,
        census: &census,
    };
    let snapshot = snapshot::read(instance, &state, None, Some(counters))?;
    if as_json {
        let reasons: serde_json::Map<String, serde_json::Value> = snapshot
            .reasons
            .iter()
            .map(|&(name, packets, bytes)| {
                (name.to_owned(), json!({"packets": packets, "bytes": bytes}))
            })
            .collect();
        let events: serde_json::Map<String, serde_json::Value> = snapshot
            .events
            .iter()
            .map(|&(name, count)| (name.to_owned(), json!(count)))
            .collect();
        let doc = Listing {
            attached: None,
            events: Some(events),
            flow_table: Some(FlowTableListing {
                capacity: state.flow_capacity,
                entries: snapshot.flow_entries,
                capacity6: snapshot.flow_capacity6,
                entries6: snapshot.flow_entries6,
            }),
            generation: snapshot.table_generation,
            instance: &snapshot.instance,
            interfaces: Some(&snapshot.interfaces),
            reasons: Some(reasons),
            services: snapshot.services.iter().map(service_listing).collect(),
        };
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    Ok(stats_text(&snapshot))
}

/// `stats` as text: counters by reason and event, the flow table, the interfaces, the services.
fn stats_text(snapshot: &Snapshot) -> String {
    let mut out = format!(
        "instance {} (table generation {})\n",
        snapshot.instance, snapshot.table_generation
    );
    out.push_str("packets by reason:\n");
    let width = snapshot
        .reasons
        .iter()
        .map(|(name, ..)| name.len())
        .max()
        .unwrap_or(0);
    for (name, packets, bytes) in &snapshot.reasons {
        out.push_str(&format!(
            "  {name:<width$} {packets:>12} packets {bytes:>14} bytes\n"
        ));
    }
    out.push_str("flow table events:\n");
    for (name, count) in &snapshot.events {
        out.push_str(&format!("  {name:<width$} {count:>12}\n"));
    }
    out.push_str(&format!(
        "flow table: {} of {} entries ({:.0}%), IPv6 {} of {} ({:.0}%); when full, the least \
         recently used flows are evicted: an evicted TCP connection that speaks again is counted \
         as pass_flow_unknown (round-robin: reset) or flow_recovered (maglev: same backend)\n",
        snapshot.flow_entries,
        snapshot.flow_capacity,
        snapshot.flow_entries as f64 * 100.0 / snapshot.flow_capacity.max(1) as f64,
        snapshot.flow_entries6,
        snapshot.flow_capacity6,
        snapshot.flow_entries6 as f64 * 100.0 / snapshot.flow_capacity6.max(1) as f64
    ));
    out.push_str("interfaces (transmit failures: kernel drops and errors, driver XDP errors):\n");
    for report in &snapshot.interfaces {
        let mode = match report.xdp_mode {
            Some(mode) => format!("{} XDP", mode.name()),
            None => "XDP (mode not recorded)".to_owned(),
        };
        let sends = match report.transmit {
            Some(state::Transmit::Xdp) => "XDP sends",
            Some(state::Transmit::Tc) => "sent through TC",
            None => "transmit not recorded",
        };
        let failures = match report.tx_failures {
            Some(f) => format!(
                "{} dropped, {} errors, {} XDP errors",
                f.dropped, f.errors, f.xdp_errors
            ),
            None => "cannot be read (interface gone?)".to_owned(),
        };
        out.push_str(&format!(
            "  {}: {mode}, {sends}; transmit failures: {failures}\n",
            report.iface
        ));
    }
    out.push_str(&services_text(snapshot));
    out
}
