//! The gossiped cluster's operations: joining and leaving it, one round of merging what the
//! members publish into the table (the daemon's cluster loop), and `cluster ls`.
use super::*;

/// `lbctl daemon --cluster`: makes the instance a member named `node`. The first time, the
/// table in force becomes what the node publishes (its services, and its backends on itself or
/// on no node). Refused when the instance joined under another name.
///
/// `sealed`: the daemon gossips with a key file. Records this instance adopted while a daemon
/// gossiped in clear (`--insecure`) are then dropped: anyone could have written them (a
/// tombstone of a service, a service pointing elsewhere), and the sealed cluster would take
/// them from this node. Returns the names of the services whose records were dropped.
pub fn cluster_join(instance: &Instance, node: &str, sealed: bool) -> Result<Vec<String>> {
    let _lock = instance::lock(instance)?;
    let mut state = attached_state(instance)?;
    match &mut state.cluster {
        Some(local) if local.node == node => {
            let dropped = match (sealed, local.learned_in_clear) {
                (true, true) => local.forget_clear_records(),
                (false, false) => {
                    local.learned_in_clear = true;
                    Vec::new()
                }
                _ => return Ok(Vec::new()),
            };
            state::save(&instance.state_dir, &state)?;
            return Ok(dropped);
        }
        Some(local) => bail!(
            "this instance is node '{}' of its cluster, not '{node}': run the daemon with --node-name {} (or `lbctl purge` to start afresh)",
            local.node,
            local.node
        ),
        None => {}
    }
    let mut local = cluster::Local::from_table(node, &state.table, now_ms());
    local.learned_in_clear = !sealed;
    state.cluster = Some(local);
    state::save(&instance.state_dir, &state)?;
    Ok(Vec::new())
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
/// it adopted. Returns the round's outcome (its `local` is what to publish) and, when the table
/// changed, what changed (for the daemon's log).
///
/// While `warming_up` (a daemon that just started), nothing is merged until every node of the
/// table in force is seen alive: the round then returns the table as it is, for publishing.
pub fn cluster_step(
    instance: &Instance,
    vtep: IpAddr,
    others: &[cluster::MemberView],
    warming_up: bool,
) -> Result<(cluster::Step, Option<diff::TableDiff>)> {
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
        return Ok((step, None));
    }
    let step = cluster::step(&state.table, local, vtep, others);
    let changes = (step.table != state.table).then(|| diff::diff(&state.table, &step.table));
    if changes.is_some() || Some(&step.local) != state.cluster.as_ref() {
        state.table = step.table.clone();
        state.cluster = Some(step.local.clone());
        commit(instance, &mut state)?;
    }
    Ok((step, changes))
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
            "converged: every live member has this table".to_owned()
        } else if status.cut_off() > 0 {
            format!(
                "NOT converged: {} member(s) CUT OFF, gossip with them broken by key files \
                 that do not match (see below); {} of {alive} live member(s) have this table",
                status.cut_off(),
                status.agreeing()
            )
        } else {
            format!(
                "NOT converged: {} of {alive} live member(s) have this table: a change is \
                 still spreading, a member was not heard from yet, or a member cannot apply it \
                 (see its log)",
                status.agreeing()
            )
        }
    );
    out.push_str(&match &status.keys {
        Some(keys) => format!(
            "gossip sealed with the cluster's keyring: {} (the first seals)\n",
            keys.join(", ")
        ),
        None => "gossip IN CLEAR (--insecure): anyone who can reach the gossip port can join \
                 and steer the cluster\n"
            .to_owned(),
    });
    let width = status
        .members
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    // An IPv6 underlay's addresses are wider than IPv4's 15 characters.
    let underlay_width = status
        .members
        .iter()
        .filter_map(|m| m.vtep.map(|ip| ip.to_string().len()))
        .max()
        .unwrap_or(0)
        .max(15);
    out.push_str(&format!(
        "{:<width$}  {:<5}  {:<underlay_width$}  {:<21}  {:<16}  {:<8}  TABLE\n",
        "NODE", "STATE", "UNDERLAY", "GOSSIP", "DIGEST", "KEY"
    ));
    for m in &status.members {
        let table = if m.this {
            "self"
        } else if m.cut_off.is_some() {
            "cut-off"
        } else if m.agrees {
            "agrees"
        } else if m.alive {
            "differs"
        } else {
            "-"
        };
        out.push_str(&format!(
            "{:<width$}  {:<5}  {:<underlay_width$}  {:<21}  {:<16}  {:<8}  {table}\n",
            m.name,
            if m.alive { "alive" } else { "dead" },
            m.vtep
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "?".into()),
            m.gossip_addr,
            m.digest.as_deref().unwrap_or("?"),
            m.key.as_deref().unwrap_or("-"),
        ));
    }
    for m in &status.members {
        if let Some(why) = &m.cut_off {
            out.push_str(&format!("{}: CUT OFF: {why}\n", m.name));
        }
    }
    for peer in &status.cut_off_peers {
        out.push_str(&format!(
            "{} (not a member here): CUT OFF: {}\n",
            peer.gossip_addr, peer.why
        ));
    }
    if let Some(refused) = &status.key_file_refused {
        out.push_str(&format!(
            "KEY FILE REFUSED (the keys in force were read before; a restart would fail): \
             {refused}\n"
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
