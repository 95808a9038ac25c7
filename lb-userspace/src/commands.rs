//! What each lbctl command does. Every mutating command takes the instance lock, validates
//! its input against the persisted state before touching anything, saves the new state, then
//! brings the maps in line with it (a full reconcile, so an interrupted command heals on the
//! next one).
use std::{ffi::CString, fs, net::SocketAddrV4};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
};
use lb_common::{Event, Reason, program_names};
use serde_json::json;

use crate::{
    datapath::{self, Maps},
    instance::{self, Instance},
    model::{Proto, Service},
    state::{self, Attachment, State},
    sync,
};

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode where the driver has no XDP support.
    Auto,
    Native,
    Generic,
}

fn ifindex_of(instance: &Instance, iface: &str) -> Result<u32> {
    let name = CString::new(iface).map_err(|_| anyhow!("invalid interface name '{iface}'"))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!(
            "interface '{iface}' not found in network namespace '{}'",
            instance.name
        ),
        index => Ok(index),
    }
}

/// Pin paths of an interface's XDP and TC links. bpffs refuses names with a '.', which
/// interface names (VLANs: `eth0.100`) may contain, so it is escaped.
fn link_pins(instance: &Instance, iface: &str) -> [std::path::PathBuf; 2] {
    let dir = instance.links_dir();
    let name = iface.replace('%', "%25").replace('.', "%2e");
    [
        dir.join(format!("{name}_xdp")),
        dir.join(format!("{name}_tc")),
    ]
}

/// Brings the maps in line with the table. Returns the number of map writes.
fn reconcile(instance: &Instance, state: &State) -> Result<usize> {
    let mut maps = Maps::open_pinned(&instance.maps_dir())?;
    let delta = sync::delta(&sync::desired(&state.table), &maps.read_contents()?);
    maps.apply(&delta)?;
    Ok(delta.backends_to_write.len()
        + delta.services_to_write.len()
        + delta.services_to_delete.len()
        + delta.backends_to_clear.len())
}

/// Loads the state of an instance that has an interface attached (service commands need the
/// maps that attach creates).
fn attached_state(instance: &Instance) -> Result<State> {
    let state = state::load(&instance.state_dir)?;
    if state.attachments.is_empty()
        || !instance
            .maps_dir()
            .join(lb_common::map_names::SERVICES)
            .exists()
    {
        bail!(
            "no interface is attached in network namespace '{}'; run `lbctl attach <iface>` first",
            instance.name
        );
    }
    Ok(state)
}

/// Saves a changed state and applies it.
fn commit(instance: &Instance, state: &State) -> Result<()> {
    state::save(&instance.state_dir, state)?;
    reconcile(instance, state).map(|_| ())
}

pub fn attach(
    instance: &Instance,
    iface: &str,
    mode: AttachMode,
    flow_capacity: Option<u32>,
) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = state::load(&instance.state_dir)?;
    let ifindex = ifindex_of(instance, iface)?;
    let maps_exist = instance
        .maps_dir()
        .join(lb_common::map_names::FLOWS)
        .exists();
    if let Some(capacity) = flow_capacity {
        if capacity == 0 {
            bail!("invalid flow capacity '0': must be at least 1");
        }
        if maps_exist && capacity != state.flow_capacity {
            bail!(
                "the flow table already holds {} flows; its size cannot change while its maps \
                 exist (`lbctl purge` drops them)",
                state.flow_capacity
            );
        }
        state.flow_capacity = capacity;
    }
    let [xdp_pin, tc_pin] = link_pins(instance, iface);
    if let Some(existing) = state.attachments.iter().find(|a| a.iface == iface) {
        if existing.ifindex == ifindex && xdp_pin.exists() && tc_pin.exists() && maps_exist {
            reconcile(instance, &state)?;
            return Ok(format!(
                "{iface} is already attached in '{}'",
                instance.name
            ));
        }
        // The interface was recreated (or pins were removed): attach afresh.
        remove_links(instance, iface)?;
        state.attachments.retain(|a| a.iface != iface);
    }

    instance::ensure_bpffs(instance)?;
    instance::create_private_dir(&instance.maps_dir())?;
    instance::create_private_dir(&instance.links_dir())?;
    datapath::check_pinned_layout(&instance.maps_dir(), state.flow_capacity)?;
    let forwarding_note = enable_forwarding()?;

    let mut ebpf = datapath::load(Some(&instance.maps_dir()), state.flow_capacity)?;
    let xdp: &mut Xdp = ebpf
        .program_mut(program_names::XDP_INGRESS)
        .ok_or_else(|| anyhow!("object has no XDP program"))?
        .try_into()?;
    xdp.load().context("loading the XDP program (verifier)")?;
    let attempt = |xdp: &mut Xdp, mode| xdp.attach(iface, mode);
    let link_id = match mode {
        AttachMode::Native => attempt(xdp, XdpMode::Driver),
        AttachMode::Generic => attempt(xdp, XdpMode::Skb),
        AttachMode::Auto => attempt(xdp, XdpMode::Driver).or_else(|_| attempt(xdp, XdpMode::Skb)),
    }
    .with_context(|| format!("attaching XDP to {iface} (is another XDP program attached?)"))?;
    let link: FdLink = xdp.take_link(link_id)?.try_into()?;
    link.pin(&xdp_pin)
        .with_context(|| format!("pinning {}", xdp_pin.display()))?;

    let tc_result = (|| -> Result<()> {
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::TC_EGRESS)
            .ok_or_else(|| anyhow!("object has no TC program"))?
            .try_into()?;
        tc.load().context("loading the TC program (verifier)")?;
        let link_id = tc
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("attaching TC egress to {iface}"))?;
        let link: FdLink = tc.take_link(link_id)?.try_into()?;
        link.pin(&tc_pin)
            .with_context(|| format!("pinning {}", tc_pin.display()))?;
        let mut maps = Maps::take(&mut ebpf)?;
        maps.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .context("adding the interface to TX_PORTS")?;
        Ok(())
    })();
    if let Err(err) = tc_result {
        let _ = remove_links(instance, iface);
        return Err(err);
    }

    state.attachments.push(Attachment {
        iface: iface.to_owned(),
        ifindex,
    });
    commit(instance, &state)?;
    let mode_used = match mode {
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
        AttachMode::Auto => "native, or generic where the driver lacks XDP",
    };
    Ok(format!(
        "attached to {iface} in '{}' ({mode_used} XDP + TC egress; flow table of {} flows){forwarding_note}",
        instance.name, state.flow_capacity
    ))
}

/// A load balancer forwards: with IPv4 forwarding off, packets handed to the kernel after DNAT
/// would be dropped. Turned on the way Docker does; returns a note for the operator.
fn enable_forwarding() -> Result<String> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    if current.trim() == "1" {
        return Ok(String::new());
    }
    fs::write(PATH, "1").with_context(|| format!("enabling IPv4 forwarding ({PATH})"))?;
    Ok("\nnote: enabled IPv4 forwarding (net.ipv4.ip_forward=1) in this network namespace".into())
}

/// Unpins an interface's links, which detaches the programs, and removes it from TX_PORTS.
fn remove_links(instance: &Instance, iface: &str) -> Result<()> {
    for pin in link_pins(instance, iface) {
        match PinnedLink::from_pin(&pin) {
            Ok(link) => {
                link.unpin()
                    .with_context(|| format!("unpinning {}", pin.display()))?;
            }
            Err(_) if pin.exists() => {
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            }
            Err(_) => {}
        }
    }
    Ok(())
}

pub fn detach(instance: &Instance, iface: &str) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = state::load(&instance.state_dir)?;
    let Some(attachment) = state.attachments.iter().find(|a| a.iface == iface).cloned() else {
        bail!("interface '{iface}' is not attached in '{}'", instance.name);
    };
    remove_links(instance, iface)?;
    if let Ok(mut maps) = Maps::open_pinned(&instance.maps_dir()) {
        // Already gone when the interface was deleted.
        let _ = maps.tx_ports.remove(attachment.ifindex);
    }
    state.attachments.retain(|a| a.iface != iface);
    state::save(&instance.state_dir, &state)?;
    Ok(format!(
        "detached from {iface}; the service table and flows are kept"
    ))
}

pub fn purge(instance: &Instance) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let state = state::load(&instance.state_dir).unwrap_or_default();
    for attachment in &state.attachments {
        remove_links(instance, &attachment.iface)?;
    }
    datapath::remove_pins(&instance.pin_dir)?;
    state::remove(&instance.state_dir)?;
    Ok(format!(
        "purged '{}': programs detached, maps and state removed",
        instance.name
    ))
}

pub fn service_add(
    instance: &Instance,
    name: &str,
    port: u16,
    backends: &[SocketAddrV4],
    proto: Proto,
    vip: Option<std::net::Ipv4Addr>,
) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    state
        .table
        .add_service(name, proto, port, vip, backends)
        .map_err(|e| anyhow!(e))?;
    commit(instance, &state)?;
    let service = state.table.service(name).expect("just added");
    Ok(format!(
        "service {name} added: {} → {} backends",
        service.frontend(),
        backends.len()
    ))
}

pub fn service_rm(instance: &Instance, name: &str) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    let removed = state.table.remove_service(name).map_err(|e| anyhow!(e))?;
    commit(instance, &state)?;
    Ok(format!(
        "service {name} removed ({} is no longer balanced)",
        removed.frontend()
    ))
}

pub fn backend_add(instance: &Instance, service: &str, addrs: &[SocketAddrV4]) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    state
        .table
        .add_backends(service, addrs)
        .map_err(|e| anyhow!(e))?;
    commit(instance, &state)?;
    Ok(format!("{} backend(s) added to {service}", addrs.len()))
}

pub fn backend_rm(instance: &Instance, service: &str, addrs: &[SocketAddrV4]) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    state
        .table
        .remove_backends(service, addrs)
        .map_err(|e| anyhow!(e))?;
    commit(instance, &state)?;
    Ok(format!(
        "{} backend(s) removed from {service}; their flows move to the remaining backends",
        addrs.len()
    ))
}

fn service_json(service: &Service, maps: Option<&Maps>) -> Result<serde_json::Value> {
    let backends = service
        .backends
        .iter()
        .map(|backend| {
            let stats = match maps {
                Some(maps) => Some(maps.backend_totals(backend.id)?),
                None => None,
            };
            Ok(json!({
                "address": backend.addr.to_string(),
                "id": backend.id,
                "packets": stats.map(|s| s.packets),
                "bytes": stats.map(|s| s.bytes),
                "reply_packets": stats.map(|s| s.reply_packets),
                "reply_bytes": stats.map(|s| s.reply_bytes),
                "new_flows": stats.map(|s| s.new_flows),
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "name": service.name,
        "id": service.id,
        "proto": service.proto,
        "port": service.port,
        "vip": service.vip.map(|v| v.to_string()),
        "backends": backends,
    }))
}

fn open_maps_if_attached(instance: &Instance, state: &State) -> Option<Maps> {
    if state.attachments.is_empty() {
        return None;
    }
    Maps::open_pinned(&instance.maps_dir()).ok()
}

pub fn service_ls(instance: &Instance, as_json: bool) -> Result<String> {
    let state = state::load(&instance.state_dir)?;
    let maps = open_maps_if_attached(instance, &state);
    if as_json {
        let services = state
            .table
            .services
            .iter()
            .map(|s| service_json(s, maps.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let doc = json!({
            "instance": instance.name,
            "generation": state.table.generation,
            "attached": state.attachments.iter().map(|a| &a.iface).collect::<Vec<_>>(),
            "services": services,
        });
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    let mut out = String::new();
    if state.table.services.is_empty() {
        out.push_str("no services\n");
    }
    for service in &state.table.services {
        out.push_str(&format!(
            "{} {} ({} backends)\n",
            service.name,
            service.frontend(),
            service.backends.len()
        ));
        for backend in &service.backends {
            match maps
                .as_ref()
                .map(|m| m.backend_totals(backend.id))
                .transpose()?
            {
                Some(s) => out.push_str(&format!(
                    "  {:<21} new_flows={} packets={} bytes={} reply_packets={} reply_bytes={}\n",
                    backend.addr, s.new_flows, s.packets, s.bytes, s.reply_packets, s.reply_bytes
                )),
                None => out.push_str(&format!("  {}\n", backend.addr)),
            }
        }
    }
    Ok(out.trim_end().to_owned())
}

pub fn stats(instance: &Instance, as_json: bool) -> Result<String> {
    let state = attached_state(instance)?;
    let maps = Maps::open_pinned(&instance.maps_dir())?;
    let reasons = maps.reason_totals()?;
    let events = maps.event_totals()?;
    if as_json {
        let services = state
            .table
            .services
            .iter()
            .map(|s| service_json(s, Some(&maps)))
            .collect::<Result<Vec<_>>>()?;
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
        let doc = json!({
            "instance": instance.name,
            "generation": state.table.generation,
            "reasons": reasons,
            "events": events,
            "services": services,
        });
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    let mut out = format!(
        "instance {} (table generation {})\n",
        instance.name, state.table.generation
    );
    out.push_str("packets by reason:\n");
    for (reason, counter) in Reason::ALL.iter().zip(&reasons) {
        out.push_str(&format!(
            "  {:<22} {:>12} packets {:>14} bytes\n",
            reason.name(),
            counter.packets,
            counter.bytes
        ));
    }
    out.push_str("flow table events:\n");
    for (event, count) in Event::ALL.iter().zip(&events) {
        out.push_str(&format!("  {:<22} {:>12}\n", event.name(), count));
    }
    out.push_str(&service_ls(instance, false)?);
    Ok(out)
}
