//! What the instance looks like: `service ls` and `stats`, as text or JSON, and the
//! interfaces' reports shared with the daemon's metrics.
use super::*;

/// A service as `service ls --json` and `stats --json` list it. Serialized as it is, without a
/// `serde_json::Value` in between (which took most of a listing's half second and 300 MB with
/// 100,000 backends); fields in alphabetical order, as `json!` objects had them.
#[derive(Serialize)]
struct ServiceListing<'a> {
    backends: Vec<BackendListing<'a>>,
    fail_open: bool,
    health_check: String,
    id: u32,
    name: &'a str,
    port: u16,
    proto: Proto,
    scheduler: Scheduler,
    vip: Option<std::net::Ipv4Addr>,
}

/// A backend of a [`ServiceListing`]; counters are `null` when the maps are not there.
#[derive(Serialize)]
struct BackendListing<'a> {
    address: std::net::SocketAddrV4,
    bytes: Option<u64>,
    drained: bool,
    health: &'static str,
    id: u32,
    live_flows: Option<u64>,
    new_flows: Option<u64>,
    node: Option<&'a str>,
    packets: Option<u64>,
    reply_bytes: Option<u64>,
    reply_packets: Option<u64>,
    weight: u32,
}

/// How full the flow table is (`stats --json`).
#[derive(Serialize)]
struct FlowTableListing {
    capacity: u32,
    entries: u64,
}

/// An attached interface as `stats` and the metrics show it: how XDP runs and sends there, and
/// what the kernel failed to transmit.
#[derive(Clone, Debug, Serialize)]
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
    interfaces: Option<Vec<InterfaceReport>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasons: Option<serde_json::Map<String, serde_json::Value>>,
    services: Vec<ServiceListing<'a>>,
}

fn service_listing<'a>(
    service: &'a Service,
    maps: Option<&Maps>,
    census: Option<&FlowCensus>,
) -> Result<ServiceListing<'a>> {
    let (_, fail_open) = service.selectable();
    let backends = service
        .backends
        .iter()
        .map(|backend| {
            let stats = maps.map(|m| m.backend_totals(backend.id)).transpose()?;
            Ok(BackendListing {
                address: backend.addr,
                node: backend.node.as_deref(),
                id: backend.id,
                health: backend.health.as_str(),
                drained: backend.drained,
                live_flows: census.map(|c| c.live.get(&backend.id).copied().unwrap_or(0)),
                packets: stats.map(|s| s.packets),
                bytes: stats.map(|s| s.bytes),
                reply_packets: stats.map(|s| s.reply_packets),
                reply_bytes: stats.map(|s| s.reply_bytes),
                new_flows: stats.map(|s| s.new_flows),
                weight: backend.weight,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ServiceListing {
        name: &service.name,
        id: service.id,
        proto: service.proto,
        port: service.port,
        vip: service.vip,
        health_check: service.health_check.describe(),
        scheduler: service.scheduler,
        fail_open,
        backends,
    })
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
    if as_json {
        let doc = Listing {
            attached: Some(state.attachments.iter().map(|a| a.iface.as_str()).collect()),
            interfaces: None,
            events: None,
            flow_table: None,
            generation: state.table.generation,
            instance: &instance.name,
            reasons: None,
            services: state
                .table
                .services
                .iter()
                .map(|s| service_listing(s, maps.as_ref(), census.as_ref()))
                .collect::<Result<_>>()?,
        };
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    services_text(&state.table, maps.as_ref(), census.as_ref())
}

/// The services of `table`, a line each, and their backends, a line each (with counters and
/// live flows when the maps are there).
fn services_text(
    table: &Table,
    maps: Option<&Maps>,
    census: Option<&FlowCensus>,
) -> Result<String> {
    let mut out = String::new();
    if table.services.is_empty() {
        out.push_str("no services\n");
    }
    for service in &table.services {
        let (_, fail_open) = service.selectable();
        out.push_str(&format!(
            "{} {} ({} backends, {}; {}){}\n",
            service.name,
            service.frontend(),
            service.backends.len(),
            service.scheduler,
            service.health_check.describe(),
            if fail_open {
                " FAILING OPEN: every backend is unhealthy, new flows go to all of them"
            } else {
                ""
            }
        ));
        for backend in &service.backends {
            let status = format!(
                "{}{}",
                backend.health.as_str(),
                if backend.drained { ",drained" } else { "" }
            );
            let weight = backend.weight;
            match maps.map(|m| m.backend_totals(backend.id)).transpose()? {
                Some(s) => out.push_str(&format!(
                    "  {:<21} {status:<17} weight={weight} live_flows={} new_flows={} packets={} bytes={} reply_packets={} reply_bytes={}\n",
                    backend.to_string(),
                    census
                        .and_then(|c| c.live.get(&backend.id).copied())
                        .unwrap_or(0),
                    s.new_flows,
                    s.packets,
                    s.bytes,
                    s.reply_packets,
                    s.reply_bytes
                )),
                None => out.push_str(&format!(
                    "  {:<21} {status:<17} weight={weight}\n",
                    backend.to_string()
                )),
            }
        }
    }
    Ok(out.trim_end().to_owned())
}

pub fn stats(instance: &Instance, as_json: bool) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = attached_state(instance)?;
    let maps = Maps::open_pinned(&instance.maps_dir())?;
    let reasons = maps.reason_totals()?;
    let events = maps.event_totals()?;
    let census = maps.flow_census()?;
    if as_json {
        let reasons: serde_json::Map<String, serde_json::Value> = Reason::ALL
            .iter()
            .zip(&reasons)
            .map(|(r, c)| {
                (
                    r.name().to_owned(),
                    json!({"packets": c.packets, "bytes": c.bytes}),
                )
            })
            .collect();
        let events: serde_json::Map<String, serde_json::Value> = Event::ALL
            .iter()
            .zip(&events)
            .map(|(e, n)| (e.name().to_owned(), json!(n)))
            .collect();
        let doc = Listing {
            attached: None,
            events: Some(events),
            flow_table: Some(FlowTableListing {
                capacity: state.flow_capacity,
                entries: census.entries,
            }),
            generation: state.table.generation,
            instance: &instance.name,
            interfaces: Some(interface_reports(&state)),
            reasons: Some(reasons),
            services: state
                .table
                .services
                .iter()
                .map(|s| service_listing(s, Some(&maps), Some(&census)))
                .collect::<Result<_>>()?,
        };
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    let mut out = format!(
        "instance {} (table generation {})\n",
        instance.name, state.table.generation
    );
    out.push_str("packets by reason:\n");
    let width = Reason::ALL
        .iter()
        .map(|r| r.name().len())
        .max()
        .unwrap_or(0);
    for (reason, counter) in Reason::ALL.iter().zip(&reasons) {
        out.push_str(&format!(
            "  {:<width$} {:>12} packets {:>14} bytes\n",
            reason.name(),
            counter.packets,
            counter.bytes
        ));
    }
    out.push_str("flow table events:\n");
    for (event, count) in Event::ALL.iter().zip(&events) {
        out.push_str(&format!("  {:<width$} {:>12}\n", event.name(), count));
    }
    out.push_str(&format!(
        "flow table: {} of {} entries ({:.0}%); when full, the least recently used flows are \
         evicted: an evicted TCP connection that speaks again is counted as pass_flow_unknown \
         (round-robin: reset) or flow_recovered (maglev: same backend)\n",
        census.entries,
        state.flow_capacity,
        census.entries as f64 * 100.0 / f64::from(state.flow_capacity.max(1))
    ));
    out.push_str("interfaces (transmit failures: kernel drops and errors, driver XDP errors):\n");
    for report in interface_reports(&state) {
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
    out.push_str(&services_text(&state.table, Some(&maps), Some(&census))?);
    Ok(out)
}
