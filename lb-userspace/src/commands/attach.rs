//! Attaching and detaching the data plane: `attach`, `upgrade`, `detach`, `purge` (of a live
//! instance or of one whose namespace is gone) and the listing of every instance.
use lb_common::map_names;

use super::*;

/// `lbctl attach IFACE`: attaches this build's programs to `iface`, or, when it is attached
/// already, replaces its programs in place; either way every other attached interface gets
/// this build's programs too (see `install`), and the maps are kept (or migrated).
pub fn attach(
    instance: &Instance,
    iface: &str,
    mode: AttachMode,
    transmit: TransmitChoice,
    flow_capacity: Option<u32>,
    flow_capacity6: Option<u32>,
    socket_lb: Option<bool>,
) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = state::load(&instance.state_dir)?;
    if let Some(on) = socket_lb {
        state.no_socket_lb = !on;
    }
    let ifindex = instance::ifindex_of(instance, iface)?;
    let current = state.flow_tables();
    if let Some(capacity) = flow_capacity {
        check_capacity(instance, "flow", map_names::FLOWS, capacity, current.ipv4)?;
        state.flow_capacity = capacity;
    }
    if let Some(capacity) = flow_capacity6 {
        check_capacity(
            instance,
            "IPv6 flow",
            map_names::FLOWS6,
            capacity,
            current.ipv6,
        )?;
        state.flow_capacity6 = Some(capacity);
    }
    if state
        .attachments
        .iter()
        .any(|a| a.iface == iface && a.ifindex != ifindex)
    {
        // The interface was recreated: its links went with the old one.
        install::remove_links(instance, iface)?;
        state.attachments.retain(|a| a.iface != iface);
    }

    // A first attach that fails leaves nothing behind (see below).
    let first = !instance.pin_dir.exists() && state.attachments.is_empty();
    instance::ensure_bpffs(instance)?;
    for dir in [
        instance.pin_dir.clone(),
        instance.maps_dir(),
        instance.links_dir(),
    ] {
        instance::create_private_dir(&dir)?;
    }
    instance::record_state_dir(instance)?;
    let forwarding_note = enable_forwarding()?;
    // An attached interface keeps its link, and so its mode.
    let recorded_mode = state
        .attachments
        .iter()
        .find(|a| a.iface == iface)
        .and_then(|a| a.xdp_mode);
    let target = install::Target {
        iface: iface.to_owned(),
        ifindex,
        mode: install::link_mode(recorded_mode, mode),
        transmit,
    };
    let installed = match install::install(instance, &state, Some(&target)) {
        Ok(installed) => installed,
        Err(err) => {
            // The kernel refused a map (too large a flow table for its memory) or a program:
            // what this attach created goes, so that nothing is left half made.
            if first {
                undo_first_attach(instance, iface);
            }
            return Err(err);
        }
    };
    if !state.attachments.iter().any(|a| a.iface == iface) {
        state.attachments.push(Attachment {
            iface: iface.to_owned(),
            ifindex,
            ..Attachment::default()
        });
    }
    record_attachments(&mut state, &installed);
    commit(instance, &mut state)?;
    Ok(format!(
        "{}{forwarding_note}",
        installed.report(state.flow_tables(), instances::maps_memory(instance))
    ))
}

/// Removes what a first attach of `instance` that failed made: its links on `iface`, socket
/// programs, pins and state folder (nothing was there before it). Best effort: the error that
/// stopped the attach is the one reported.
fn undo_first_attach(instance: &Instance, iface: &str) {
    let _ = install::remove_links(instance, iface);
    let _ = socket_lb::remove(instance);
    let _ = dataplane::remove_pins(&instance.pin_dir);
    let _ = state::remove_folder(&instance.state_dir);
}

/// Refuses a size asked for the `table` (`flow`, `IPv6 flow`), whose map is `map`, that is 0,
/// or that is not its `current` size once that map exists: its size is only chosen when it is
/// created.
fn check_capacity(
    instance: &Instance,
    table: &str,
    map: &str,
    capacity: u32,
    current: u32,
) -> Result<()> {
    if capacity == 0 {
        bail!("invalid {table} capacity '0': must be at least 1");
    }
    if capacity != current && instance.maps_dir().join(map).exists() {
        bail!(
            "the {table} table already holds {current} flows; its size cannot change while its \
             maps exist (`lbctl purge` drops them)"
        );
    }
    Ok(())
}

/// `lbctl upgrade`: replaces the programs on every attached interface with this build's, in
/// place, keeping (or migrating) the maps.
pub fn upgrade(instance: &Instance) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state_of_any_build(instance)?;
    // Pins an earlier lbctl made do not record the state folder yet.
    instance::record_state_dir(instance)?;
    let installed = install::install(instance, &state, None)?;
    record_attachments(&mut state, &installed);
    // Normally writes nothing; heals a table the maps do not hold yet (new maps).
    commit(instance, &mut state)?;
    Ok(format!(
        "upgraded '{}' to the programs of lbctl {}\n{}",
        instance.name,
        env!("CARGO_PKG_VERSION"),
        installed.report(state.flow_tables(), instances::maps_memory(instance))
    ))
}

/// Records how each interface the install reached is attached (a mode an earlier lbctl did not
/// record stays unknown).
fn record_attachments(state: &mut State, installed: &install::Installed) {
    for done in &installed.attached {
        if let Some(attachment) = state.attachments.iter_mut().find(|a| a.iface == done.iface) {
            attachment.xdp_mode = done.xdp_mode.or(attachment.xdp_mode);
            attachment.transmit = Some(done.transmit);
            attachment.transmit_auto = done.transmit_auto;
        }
    }
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

pub fn detach(instance: &Instance, iface: &str) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = state::load(&instance.state_dir)?;
    let Some(attachment) = state.attachments.iter().find(|a| a.iface == iface).cloned() else {
        bail!("interface '{iface}' is not attached in '{}'", instance.name);
    };
    install::remove_links(instance, iface)?;
    if let Ok(mut maps) = Maps::open_pinned(&instance.maps_dir()) {
        // Already gone when the interface was deleted.
        let _ = maps.tx_ports.remove(attachment.ifindex);
        let _ = maps.tx_via_tc.remove(&attachment.ifindex);
    }
    state.attachments.retain(|a| a.iface != iface);
    let mut socket_note = "";
    if state.attachments.is_empty() && socket_lb::is_installed(instance) {
        // The last interface: the instance no longer balances, its own clients included.
        socket_lb::remove(instance)?;
        if let Ok(mut maps) = Maps::open_pinned(&instance.maps_dir()) {
            maps.set_socket_lb(0)?;
        }
        socket_note = "; socket load balancing removed with the last interface";
    }
    state::save(&instance.state_dir, &state)?;
    Ok(format!(
        "detached from {iface}; the service table and flows are kept{socket_note}"
    ))
}

pub fn purge(instance: &Instance) -> Result<String> {
    let lock = instance::lock(instance)?;
    // A damaged state stops purge too: the neighbour entries it lists would be left behind.
    // Once the file is removed, purge removes what the pins and the state folder hold.
    let state = state::load(&instance.state_dir)?;
    for attachment in &state.attachments {
        install::remove_links(instance, &attachment.iface)?;
    }
    socket_lb::remove(instance)?;
    dataplane::remove_pins(&instance.pin_dir)?;
    for warning in underlay::delete_all(&state.managed_neighbours) {
        eprintln!("lbctl: warning: {warning}");
    }
    if let Err(err) = reserved_ports::sync(&state.reserved_ports, &BTreeSet::new()) {
        eprintln!("lbctl: warning: published ports left reserved: {err:#}");
    }
    // The routes to Docker tasks (`daemon --docker`), found by their protocol number.
    if let Err(err) = crate::host::task_routes::remove_others(&[]) {
        eprintln!("lbctl: warning: routes to Docker tasks left behind: {err}");
    }
    // The state, the cluster file (a daemon still running rewrites it at its next round;
    // stopped, it would only mislead) and the lock, then the folder unless it holds anything
    // else: a purged instance leaves nothing behind.
    let folder_removed = state::remove_folder(&instance.state_dir)?;
    drop(lock);
    let mut out = format!(
        "purged '{}': programs detached, maps, managed neighbour entries, routes to Docker tasks \
         and state removed",
        instance.name
    );
    if !folder_removed {
        out.push_str(&format!(
            "
{} keeps other files, and stays",
            instance.state_dir.display()
        ));
    }
    Ok(out)
}

/// How long the purge of an instance whose namespace is gone waits for the kernel to dismantle
/// the namespace's devices before it warns that an interface is still there.
const DISMANTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `lbctl --netns NAME purge` once the namespace is gone (`ip netns del` came first): removes
/// the instance's pins and state folder. There is nothing to detach: the interfaces went with
/// the namespace, and their links, holding no device any more, only hold the programs, which
/// hold the maps, until unpinned. The managed neighbour entries went with the namespace too.
pub fn purge_gone(instance: &Instance) -> Result<String> {
    if !instance.pin_dir.exists() && !instance.state_dir.exists() {
        bail!(
            "network namespace '{}' not found, and no lbctl instance of it is left (nothing in {} \
             or {})",
            instance.name,
            instance.pin_dir.display(),
            instance.state_dir.display()
        );
    }
    let had_state_folder = instance.state_dir.exists();
    let lock = instance::lock(instance)?;
    // A damaged state stops this purge too: the operator decides what to do with the file.
    let state = state::load(&instance.state_dir)?;
    // `ip netns del` returns before the kernel dismantles the namespace and its devices.
    let deadline = std::time::Instant::now() + DISMANTLE_WAIT;
    let mut found = instances::inspect(instance);
    while found.links.iter().any(|link| link.ifindex != 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        found = instances::inspect(instance);
    }
    let row = instances::row(&found);
    for interface in &row.interfaces {
        if [interface.xdp, interface.tc, interface.tc_ingress]
            .contains(&instances::LinkState::Attached)
        {
            eprintln!(
                "lbctl: warning: {} is still there: its namespace lives on without its name, \
                 held by a process (an `lbctl daemon`?); unpinning detaches the programs, but \
                 neighbour entries lbctl made there stay",
                interface.name
            );
        }
    }
    let socket_links = socket_lb::link_pins(instance)
        .iter()
        .filter(|pin| pin.exists())
        .count();
    dataplane::remove_pins(&instance.pin_dir)?;
    let folder_removed = state::remove_folder(&instance.state_dir)?;
    drop(lock);

    let mut out = format!(
        "purged '{}', whose network namespace is gone (nothing to detach)",
        instance.name
    );
    if let Some(pin_dir) = &found.pin_dir {
        out.push_str(&format!(
            "\nunpinned {} links and {} maps ({} of kernel memory, freed once nothing holds \
             them): removed {}",
            found.links.len() + socket_links,
            found.maps.len(),
            dataplane::megabytes(row.kernel_memory_bytes),
            pin_dir.display()
        ));
    }
    if !folder_removed {
        out.push_str(&format!(
            "\nremoved the state from {}, which keeps other files",
            instance.state_dir.display()
        ));
    } else if had_state_folder {
        out.push_str(&format!(
            "\nremoved the state folder {}",
            instance.state_dir.display()
        ));
    }
    if !state.managed_neighbours.is_empty() {
        out.push_str(&format!(
            "\nits {} managed neighbour entries went with the namespace",
            state.managed_neighbours.len()
        ));
    }
    Ok(out)
}

/// `lbctl instances`: every instance on the machine, or the one of `netns` (its state in
/// `state_dir` if given), without entering any namespace.
pub fn instances(
    netns: Option<&str>,
    state_dir: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    json: bool,
) -> Result<String> {
    let bpffs = bpffs.unwrap_or_else(|| PathBuf::from(instance::DEFAULT_BPFFS));
    let found = match netns {
        Some(name) => {
            let instance = instance::locate_without_entering(name, state_dir, Some(bpffs))?;
            instances::find(&instance).into_iter().collect()
        }
        None if state_dir.is_some() => bail!(
            "--state-dir is one instance's state folder: give its --netns NAME too, or neither \
             to list every instance"
        ),
        None => instances::discover(&bpffs)?,
    };
    let rows: Vec<instances::Row> = found.iter().map(instances::row).collect();
    if json {
        return Ok(serde_json::to_string_pretty(&instances::Listing::new(
            &rows,
        ))?);
    }
    Ok(instances::render(&rows))
}
