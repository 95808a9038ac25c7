//! Services and backends: add, remove, set the scheduler, weights, drain, health checks and
//! their results, and the whole table at once (`apply`, `export`).
use super::*;

pub fn service_add(
    instance: &Instance,
    name: &str,
    port: u16,
    backends: &[BackendSpec],
    proto: Proto,
    vip: Option<std::net::IpAddr>,
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
    let (_, changed) = change_table(instance, |table| {
        docker::operators_only(table, name)?;
        table.set_scheduler(name, scheduler)
    })?;
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
    let (_, removed) = change_table(instance, |table| {
        docker::operators_only(table, name)?;
        table.remove_service(name)
    })?;
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
fn apply_file(state: &mut State, label: &str, file: &TableFile) -> Result<diff::TableDiff> {
    let before = state.table.clone();
    let mut services = file.services();
    // Docker's services stay as they are: a file may not declare one.
    for service in &services {
        docker::operators_only(&state.table, &service.name)
            .map_err(|err| anyhow!("{label}: {err}"))?;
    }
    services.extend(
        state
            .table
            .services
            .iter()
            .filter(|s| !s.origin.is_operator())
            .map(|s| s.spec()),
    );
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
    Ok(diff::diff(&before, &state.table))
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
    change_table(instance, |table| {
        docker::operators_only(table, service)?;
        table.add_backends(service, addrs)
    })?;
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
    let (state, check) = change_table(instance, |table| {
        docker::operators_only(table, service)?;
        table.update_health_check(service, update)
    })?;
    let proto = state
        .table
        .services
        .iter()
        .find(|s| s.name == service)
        .map_or(Proto::Tcp, |s| s.proto);
    Ok(format!("{service}: {}", check.describe(proto)))
}

pub fn backend_rm(instance: &Instance, service: &str, addrs: &[BackendSpec]) -> Result<String> {
    change_table(instance, |table| {
        docker::operators_only(table, service)?;
        table.remove_backends(service, addrs)
    })?;
    Ok(format!(
        "{} backend(s) removed from {service}; their flows move to the remaining backends",
        addrs.len()
    ))
}
