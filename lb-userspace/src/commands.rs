//! What each lbctl command does. Every mutating command takes the instance lock, validates
//! its input against the persisted state before touching anything, saves the new state, then
//! brings the maps in line with it (a full reconcile, so an interrupted command heals on the
//! next one).
use std::{collections::BTreeSet, ffi::CString, fs, net::Ipv4Addr, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::{Event, Reason, VXLAN_OVERHEAD};
use serde::Serialize;
use serde_json::json;

use crate::{
    cluster,
    datapath::{self, FlowCensus, Maps},
    install,
    instance::{self, Instance},
    instances,
    model::{BackendSpec, Health, HealthUpdate, Node, Proto, Scheduler, Service, Table},
    netdev, reserved_ports, socket_lb,
    state::{self, Attachment, State},
    sync, table_diff,
    table_file::TableFile,
    underlay,
};

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode where the driver has no XDP support.
    Auto,
    Native,
    Generic,
}

/// How the frames XDP sends leave an interface (`attach --transmit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransmitChoice {
    /// XDP's own transmission where the driver delivers it; through TC on veths (whose peer
    /// takes XDP-sent frames only while it runs an XDP program) and in generic mode.
    Auto,
    /// Always XDP_TX and redirects: the fast path, for a veth whose peer runs an XDP program.
    Xdp,
    /// Always handed to the TC ingress program, which sends them the ordinary way.
    Tc,
}

pub(crate) fn ifindex_of(instance: &Instance, iface: &str) -> Result<u32> {
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

/// The node of the table this instance is: the one whose underlay address is assigned to an
/// interface of the instance's namespace. Found afresh by every command, so an address added or
/// moved after `node add` is picked up by the next one.
pub(crate) fn self_node(state: &State) -> Result<Option<&Node>> {
    Ok(state.table.self_node(&underlay::local_addrs()?))
}

/// Brings the maps, then the managed neighbour entries towards the other nodes, in line with
/// the table (saving the state again when the entries lbctl made changed). Neighbour problems
/// are warnings: the kernel resolves a managed entry on its own time anyway, and the data plane
/// counts what it drops meanwhile. Returns the number of map writes.
fn reconcile(instance: &Instance, state: &mut State) -> Result<usize> {
    let self_name = self_node(state)?.map(|n| n.name.clone());
    let mut maps = Maps::open_pinned(&instance.maps_dir())?;
    let desired = sync::desired(&state.table, self_name.as_deref());
    let delta = sync::delta(&desired, &maps.read_contents()?);
    maps.apply(&delta)?;
    let attached: Vec<&str> = state.attachments.iter().map(|a| a.iface.as_str()).collect();
    let underlay = self_node(state)?.map(|node| node.ip);
    let host_writes = maps.sync_host(&attached, underlay)?;

    let others: Vec<&Node> = state
        .table
        .nodes
        .iter()
        .filter(|n| Some(&n.name) != self_name.as_ref())
        .collect();
    let backends: BTreeSet<Ipv4Addr> = desired
        .local_backends
        .iter()
        .map(|key| Ipv4Addr::from(key.ip_be.to_ne_bytes()))
        .collect();
    let (managed, warnings) =
        underlay::sync_neighbours(&others, &backends, &attached, &state.managed_neighbours);
    for warning in warnings {
        eprintln!("lbctl: warning: {warning}");
    }
    let wanted = reserved_ports::wanted(&state.table);
    let reserved = match reserved_ports::sync(&state.reserved_ports, &wanted) {
        Ok(now) => now,
        Err(err) => {
            eprintln!("lbctl: warning: published ports not reserved from ephemeral ports: {err:#}");
            state.reserved_ports.clone()
        }
    };
    if managed != state.managed_neighbours || reserved != state.reserved_ports {
        state.managed_neighbours = managed;
        state.reserved_ports = reserved;
        state::save(&instance.state_dir, state)?;
    }
    Ok(delta.writes() + host_writes)
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
fn commit(instance: &Instance, state: &mut State) -> Result<()> {
    state::save(&instance.state_dir, state)?;
    reconcile(instance, state).map(|_| ())
}

/// `lbctl attach IFACE`: attaches this build's programs to `iface`, or, when it is attached
/// already, replaces its programs in place; either way every other attached interface gets
/// this build's programs too (see `install`), and the maps are kept (or migrated).
pub fn attach(
    instance: &Instance,
    iface: &str,
    mode: AttachMode,
    transmit: TransmitChoice,
    flow_capacity: Option<u32>,
    socket_lb: Option<bool>,
) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = state::load(&instance.state_dir)?;
    if let Some(on) = socket_lb {
        state.no_socket_lb = !on;
    }
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
    if state
        .attachments
        .iter()
        .any(|a| a.iface == iface && a.ifindex != ifindex)
    {
        // The interface was recreated: its links went with the old one.
        install::remove_links(instance, iface)?;
        state.attachments.retain(|a| a.iface != iface);
    }

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
    let installed = install::install(instance, &state, Some(&target))?;
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
        installed.report(state.flow_capacity, instances::maps_memory(instance))
    ))
}

/// `lbctl upgrade`: replaces the programs on every attached interface with this build's, in
/// place, keeping (or migrating) the maps.
pub fn upgrade(instance: &Instance) -> Result<String> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
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
        installed.report(state.flow_capacity, instances::maps_memory(instance))
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
    datapath::remove_pins(&instance.pin_dir)?;
    for warning in underlay::delete_all(&state.managed_neighbours) {
        eprintln!("lbctl: warning: {warning}");
    }
    if let Err(err) = reserved_ports::sync(&state.reserved_ports, &BTreeSet::new()) {
        eprintln!("lbctl: warning: published ports left reserved: {err:#}");
    }
    // The state, the cluster file (a daemon still running rewrites it at its next round;
    // stopped, it would only mislead) and the lock, then the folder unless it holds anything
    // else: a purged instance leaves nothing behind.
    let folder_removed = state::remove_folder(&instance.state_dir)?;
    drop(lock);
    let mut out = format!(
        "purged '{}': programs detached, maps, managed neighbour entries and state removed",
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
    datapath::remove_pins(&instance.pin_dir)?;
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
            instances::megabytes(row.kernel_memory_bytes),
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

/// A state change: under the instance lock, on an attached instance, `edit` checks and changes
/// the state; it is then saved (unless unchanged: saving 100,000 backends takes a third of a
/// re-apply) and applied (always, which heals an interrupted command). A refused change saves
/// and applies nothing. Returns the new state and what `edit` returned.
fn change_state<T>(
    instance: &Instance,
    edit: impl FnOnce(&mut State) -> Result<T>,
) -> Result<(State, T)> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    let loaded = state.clone();
    let out = edit(&mut state)?;
    if state != loaded {
        state::save(&instance.state_dir, &state)?;
    }
    reconcile(instance, &mut state)?;
    Ok((state, out))
}

/// A table change (see `change_state`), recorded for the cluster when there is one.
fn change_table<T>(
    instance: &Instance,
    edit: impl FnOnce(&mut Table) -> Result<T, String>,
) -> Result<(State, T)> {
    change_state(instance, |state| {
        let before = state.table.clone();
        let out = edit(&mut state.table).map_err(|e| anyhow!(e))?;
        record_cluster_edit(state, &before)?;
        Ok(out)
    })
}

/// In a gossiped cluster, records what changed from `before` in what this node publishes (and
/// refuses changes to another node's tasks); the daemon publishes it at its next round.
fn record_cluster_edit(state: &mut State, before: &Table) -> Result<()> {
    if let Some(local) = &mut state.cluster {
        state.table = cluster::record_edit(local, before, state.table.clone(), now_ms())
            .map_err(|e| anyhow!(e))?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Refuses node-list changes in a gossiped cluster, whose nodes are its live members.
fn static_nodes_only(state: &State) -> Result<()> {
    if state.cluster.is_some() {
        bail!(
            "this node is in a gossiped cluster: its nodes are the cluster's live members (`lbctl cluster ls`), not a list to edit"
        );
    }
    Ok(())
}

/// `lbctl daemon --cluster`: makes the instance a member named `node`. The first time, the
/// table in force becomes what the node publishes (its services, and its backends on itself or
/// on no node). Refused when the instance joined under another name.
pub fn cluster_join(instance: &Instance, node: &str) -> Result<()> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    match &state.cluster {
        Some(local) if local.node == node => return Ok(()),
        Some(local) => bail!(
            "this instance is node '{}' of its cluster, not '{node}': run the daemon with --node-name {} (or `lbctl purge` to start afresh)",
            local.node,
            local.node
        ),
        None => {}
    }
    state.cluster = Some(cluster::Local::from_table(node, &state.table, now_ms()));
    state::save(&instance.state_dir, &state)
}

/// `lbctl daemon` without `--cluster` on an instance that was in a cluster: the table it
/// applied last becomes its static table. Returns whether it was in a cluster.
pub fn cluster_leave(instance: &Instance) -> Result<bool> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    if state.cluster.take().is_none() {
        return Ok(false);
    }
    state::save(&instance.state_dir, &state)?;
    Ok(true)
}

/// One round of the cluster on this instance: under the lock, merges its records with the
/// other members', applies the merged table to the maps when it changed, and saves the records
/// it adopted. Returns the round's outcome (its `local` is what to publish) and whether the
/// table changed.
///
/// While `warming_up` (a daemon that just started), nothing is merged until every node of the
/// table in force is seen alive: the round then returns the table as it is, for publishing.
pub fn cluster_step(
    instance: &Instance,
    vtep: Ipv4Addr,
    others: &[cluster::MemberView],
    warming_up: bool,
) -> Result<(cluster::Step, bool)> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    let Some(local) = &state.cluster else {
        bail!("this instance is not in a cluster");
    };
    if warming_up && !cluster::not_yet_alive(&state.table, &local.node, others).is_empty() {
        let step = cluster::Step {
            digest: cluster::table_digest(&state.table),
            table: state.table,
            local: local.clone(),
            warnings: Vec::new(),
        };
        return Ok((step, false));
    }
    let step = cluster::step(&state.table, local, vtep, others);
    let changed = step.table != state.table;
    if changed || Some(&step.local) != state.cluster.as_ref() {
        state.table = step.table.clone();
        state.cluster = Some(step.local.clone());
        commit(instance, &mut state)?;
    }
    Ok((step, changed))
}

pub fn service_add(
    instance: &Instance,
    name: &str,
    port: u16,
    backends: &[BackendSpec],
    proto: Proto,
    vip: Option<std::net::Ipv4Addr>,
    scheduler: Scheduler,
) -> Result<String> {
    let (state, _) = change_table(instance, |table| {
        table.add_service(name, proto, port, vip, backends)?;
        table.set_scheduler(name, scheduler)
    })?;
    let service = state.table.service(name).expect("just added");
    Ok(format!(
        "service {name} added: {} → {} backends ({})",
        service.frontend(),
        backends.len(),
        describe_scheduler(scheduler)
    ))
}

/// What a scheduler does, in a few words.
fn describe_scheduler(scheduler: Scheduler) -> &'static str {
    match scheduler {
        Scheduler::RoundRobin => "round-robin",
        Scheduler::Maglev => {
            "maglev: a flow whose flow-table entry is evicted still reaches its backend"
        }
    }
}

/// `lbctl service set`: changes how a service's new flows choose their backend. Existing flows
/// keep theirs.
pub fn service_set(instance: &Instance, name: &str, scheduler: Scheduler) -> Result<String> {
    let (_, changed) = change_table(instance, |table| table.set_scheduler(name, scheduler))?;
    Ok(if changed {
        format!(
            "{name}: new flows choose by {}; existing flows keep their backend",
            describe_scheduler(scheduler)
        )
    } else {
        format!("{name} already chooses by {scheduler}; nothing changed")
    })
}

/// `lbctl backend weight`: changes a backend's share of its service's new flows.
pub fn backend_weight(
    instance: &Instance,
    service: &str,
    backend: &BackendSpec,
    weight: u32,
) -> Result<String> {
    let (_, changed) = change_table(instance, |table| {
        table.set_weight(service, backend.clone(), weight)
    })?;
    Ok(match (changed, weight) {
        (false, _) => format!("{backend} of {service} already has weight {weight}"),
        (true, 0) => format!(
            "{backend} of {service} has weight 0: no new flows; its open connections continue"
        ),
        (true, _) => format!("{backend} of {service} has weight {weight}"),
    })
}

pub fn service_rm(instance: &Instance, name: &str) -> Result<String> {
    let (_, removed) = change_table(instance, |table| table.remove_service(name))?;
    Ok(format!(
        "service {name} removed ({} is no longer balanced)",
        removed.frontend()
    ))
}

/// Where `lbctl apply` reads its table: a file, or standard input for `-`.
pub fn read_table_file(source: &str) -> Result<TableFile> {
    let text = if source == "-" {
        std::io::read_to_string(std::io::stdin())
            .context("reading the table from standard input")?
    } else {
        fs::read_to_string(source).with_context(|| format!("reading {source}"))?
    };
    TableFile::parse(&text).map_err(|err| anyhow!("{}: {err}", source_label(source)))
}

fn source_label(source: &str) -> &str {
    if source == "-" { "<stdin>" } else { source }
}

/// `lbctl apply`: makes the table what `file` (read from `source`) declares, and says what
/// changed. With `dry_run`, says what would change and changes nothing (it needs no attached
/// interface, so a file can be checked anywhere).
pub fn apply(instance: &Instance, source: &str, file: &TableFile, dry_run: bool) -> Result<String> {
    let label = source_label(source);
    if dry_run {
        let _lock = instance::lock_shared(instance)?;
        let mut state = state::load(&instance.state_dir)?;
        let diff = apply_file(&mut state, label, file)?;
        if diff.is_empty() {
            return Ok(format!(
                "dry run: the table already is what {label} declares"
            ));
        }
        return Ok(format!(
            "{}\ndry run, nothing changed: {}",
            diff.lines.join("\n"),
            diff.summary()
        ));
    }
    let (state, diff) = change_state(instance, |state| apply_file(state, label, file))?;
    if diff.is_empty() {
        return Ok(format!(
            "the table already is what {label} declares; nothing changed"
        ));
    }
    Ok(format!(
        "{}\napplied {label} (table generation {}): {}",
        diff.lines.join("\n"),
        state.table.generation,
        diff.summary()
    ))
}

/// Applies a table file to `state` (see `Table::apply`); in a gossiped cluster, as this node's
/// declaration (see `cluster::own_declaration`), recorded for publishing. Errors in the file
/// name `label`.
fn apply_file(state: &mut State, label: &str, file: &TableFile) -> Result<table_diff::TableDiff> {
    let before = state.table.clone();
    let mut services = file.services();
    if let Some(local) = &state.cluster {
        if file.nodes.is_some() {
            static_nodes_only(state).with_context(|| format!("{label} declares nodes"))?;
        }
        services = cluster::own_declaration(local, &state.table, services);
    }
    state
        .table
        .apply(file.nodes().as_deref(), &services)
        .map_err(|err| anyhow!("{label}: {err}"))?;
    record_cluster_edit(state, &before)?;
    Ok(table_diff::diff(&before, &state.table))
}

/// `lbctl export`: the table as a file `lbctl apply` takes back. Nodes are included when the
/// static table has any (in a gossiped cluster they are the live members, not a list to apply).
pub fn export(instance: &Instance) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = state::load(&instance.state_dir)?;
    let with_nodes = state.cluster.is_none() && !state.table.nodes.is_empty();
    let text = TableFile::of(&state.table, with_nodes).to_json();
    Ok(text.trim_end().to_owned())
}

pub fn backend_add(instance: &Instance, service: &str, addrs: &[BackendSpec]) -> Result<String> {
    change_table(instance, |table| table.add_backends(service, addrs))?;
    Ok(format!("{} backend(s) added to {service}", addrs.len()))
}

/// Records health-check results (service, backend id, new health) and applies them: under the
/// lock, on the state as it is now (the table may have changed since the probes started).
/// Returns how many backends changed.
pub fn record_health(instance: &Instance, flips: &[(String, u32, Health)]) -> Result<usize> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    let before = state.table.clone();
    let changed = flips
        .iter()
        .filter(|(service, id, health)| state.table.set_health(service, *id, *health))
        .count();
    if changed > 0 {
        record_cluster_edit(&mut state, &before)?;
        commit(instance, &mut state)?;
    }
    Ok(changed)
}

/// The state of an attached instance and the name of its node in the mesh, if any.
pub fn attached_state_and_node(instance: &Instance) -> Result<(State, Option<String>)> {
    let state = attached_state(instance)?;
    let node = self_node(&state)?.map(|n| n.name.clone());
    Ok((state, node))
}

/// Drains a backend (no new flows; its flows continue) or brings it back.
pub fn backend_drain(
    instance: &Instance,
    service: &str,
    backend: &BackendSpec,
    drained: bool,
) -> Result<String> {
    let (_, changed) = change_table(instance, |table| {
        table.set_drained(service, backend.clone(), drained)
    })?;
    Ok(match (drained, changed) {
        (true, true) => format!(
            "{backend} of {service} drained: no new flows; `lbctl service ls` shows its live flows"
        ),
        (true, false) => format!("{backend} of {service} was already drained"),
        (false, true) => format!("{backend} of {service} takes new flows again"),
        (false, false) => format!("{backend} of {service} was not drained"),
    })
}

/// Changes a service's health-check settings.
pub fn service_health(instance: &Instance, service: &str, update: &HealthUpdate) -> Result<String> {
    let (_, check) = change_table(instance, |table| table.update_health_check(service, update))?;
    Ok(format!("{service}: {}", check.describe()))
}

pub fn backend_rm(instance: &Instance, service: &str, addrs: &[BackendSpec]) -> Result<String> {
    change_table(instance, |table| table.remove_backends(service, addrs))?;
    Ok(format!(
        "{} backend(s) removed from {service}; their flows move to the remaining backends",
        addrs.len()
    ))
}

/// Adding a node that is already there with the same IP succeeds; it still applies the table,
/// which heals an earlier interrupted command.
pub fn node_add(instance: &Instance, name: &str, ip: Ipv4Addr) -> Result<String> {
    static_nodes_only(&state::load(&instance.state_dir)?)?;
    let (state, added) = change_table(instance, |table| table.add_node(name, ip))?;
    let this = if self_node(&state)?.is_some_and(|n| n.name == name) {
        ", this node"
    } else {
        ""
    };
    Ok(if added {
        format!("node {name} added (underlay IP {ip}{this})")
    } else {
        format!("node {name} already has underlay IP {ip}{this}; nothing changed")
    })
}

pub fn node_rm(instance: &Instance, name: &str) -> Result<String> {
    static_nodes_only(&state::load(&instance.state_dir)?)?;
    let (_, removed) = change_table(instance, |table| table.remove_node(name))?;
    Ok(format!("node {name} ({}) removed", removed.ip))
}

pub fn node_ls(instance: &Instance, as_json: bool) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = state::load(&instance.state_dir)?;
    let self_name = self_node(&state)?.map(|n| n.name.as_str());
    if as_json {
        let nodes: Vec<serde_json::Value> = state
            .table
            .nodes
            .iter()
            .map(|node| {
                json!({
                    "name": node.name,
                    "underlay_ip": node.ip.to_string(),
                    "self": Some(node.name.as_str()) == self_name,
                    "services": state.table.services_on_node(&node.name),
                })
            })
            .collect();
        let doc = json!({
            "instance": instance.name,
            "self": self_name,
            "nodes": nodes,
        });
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    if state.table.nodes.is_empty() {
        return Ok("no nodes".to_owned());
    }
    let width = state
        .table
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for node in &state.table.nodes {
        let services = state.table.services_on_node(&node.name);
        let line = format!(
            "{:<width$}  {:<15}  {:<4}  {}",
            node.name,
            node.ip.to_string(),
            if Some(node.name.as_str()) == self_name {
                "self"
            } else {
                ""
            },
            if services.is_empty() {
                String::new()
            } else {
                format!("backends of {}", services.join(", "))
            }
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out.trim_end().to_owned())
}

pub fn mesh_set(instance: &Instance, vni: Option<u32>, vxlan_port: Option<u16>) -> Result<String> {
    let (state, ()) = change_table(instance, |table| table.set_mesh(vni, vxlan_port))?;
    Ok(format!(
        "mesh: VNI {}, VXLAN UDP port {} (every node of the mesh must use the same)",
        state.table.vni, state.table.vxlan_port
    ))
}

pub fn mesh_show(instance: &Instance, as_json: bool) -> Result<String> {
    let _lock = instance::lock_shared(instance)?;
    let state = state::load(&instance.state_dir)?;
    let this = self_node(&state)?;
    // The overlay's MTU follows from each underlay interface's: encapsulation adds
    // VXLAN_OVERHEAD bytes, and the data plane drops (never fragments) what would not fit.
    let interfaces: Vec<(&str, Option<u32>)> = state
        .attachments
        .iter()
        .map(|a| (a.iface.as_str(), underlay::mtu(&a.iface).ok()))
        .collect();
    if as_json {
        let doc = json!({
            "instance": instance.name,
            "vni": state.table.vni,
            "vxlan_port": state.table.vxlan_port,
            "self": this.map(|n| json!({"name": n.name, "underlay_ip": n.ip.to_string()})),
            "nodes": state.table.nodes.len(),
            "vxlan_overhead": VXLAN_OVERHEAD,
            "interfaces": interfaces
                .iter()
                .map(|(iface, mtu)| json!({
                    "iface": iface,
                    "mtu": mtu,
                    "overlay_mtu": mtu.map(|m| m.saturating_sub(VXLAN_OVERHEAD)),
                }))
                .collect::<Vec<_>>(),
        });
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    let mut out = format!(
        "VNI {}, VXLAN UDP port {}; {} node(s)\n",
        state.table.vni,
        state.table.vxlan_port,
        state.table.nodes.len()
    );
    match this {
        Some(node) => out.push_str(&format!("this node: {} ({})\n", node.name, node.ip)),
        None => out.push_str(&format!(
            "this node: none (no address of network namespace '{}' is a node's underlay IP): \
             nothing is encapsulated or decapsulated\n",
            instance.name
        )),
    }
    out.push_str(&format!(
        "overlay MTU = underlay MTU - {VXLAN_OVERHEAD} (VXLAN headers): give the tasks' interfaces \
         at most this MTU, so that their TCP MSS keeps clients' packets small enough; larger \
         packets to other nodes are dropped (drop_encap_mtu)\n"
    ));
    for (iface, mtu) in &interfaces {
        match mtu {
            Some(mtu) => out.push_str(&format!(
                "  {iface}: MTU {mtu}, overlay MTU {}\n",
                mtu.saturating_sub(VXLAN_OVERHEAD)
            )),
            None => out.push_str(&format!("  {iface}: MTU unknown (interface missing)\n")),
        }
    }
    Ok(out.trim_end().to_owned())
}

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

/// `lbctl cluster ls`: what the daemon last wrote in `cluster.json`.
pub fn cluster_ls(instance: &Instance, as_json: bool) -> Result<String> {
    let path = instance.state_dir.join(state::CLUSTER_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "no cluster: no `lbctl daemon --cluster` runs for network namespace '{}'",
            instance.name
        ),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let status: cluster::Status =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&status)?);
    }
    let alive = status.alive();
    let mut out = format!(
        "cluster '{}': this node {} (gossip {}, underlay {}), table digest {} (generation {})\n\
         {} of {} member(s) alive; {}\n",
        status.cluster,
        status.node,
        status.gossip_addr,
        status.vtep,
        status.digest,
        status.table_generation,
        alive,
        status.members.len(),
        if status.converged {
            "every live member has this table".to_owned()
        } else {
            format!(
                "{} of {alive} live member(s) have this table: a change is still spreading, or \
                 a member cannot apply it (see its log)",
                status.agreeing()
            )
        }
    );
    let width = status
        .members
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    out.push_str(&format!(
        "{:<width$}  {:<5}  {:<15}  {:<21}  {:<16}  TABLE\n",
        "NODE", "STATE", "UNDERLAY", "GOSSIP", "DIGEST"
    ));
    for m in &status.members {
        let table = if m.this {
            "self"
        } else if m.agrees {
            "agrees"
        } else if m.alive {
            "differs"
        } else {
            "-"
        };
        out.push_str(&format!(
            "{:<width$}  {:<5}  {:<15}  {:<21}  {:<16}  {table}\n",
            m.name,
            if m.alive { "alive" } else { "dead" },
            m.vtep
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "?".into()),
            m.gossip_addr,
            m.digest.as_deref().unwrap_or("?"),
        ));
    }
    let rejected: Vec<String> = status
        .rejected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    if !rejected.is_empty() {
        out.push_str(&format!("rejected gossip: {}\n", rejected.join(", ")));
    }
    Ok(out.trim_end().to_owned())
}
