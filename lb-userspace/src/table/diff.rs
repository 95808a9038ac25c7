//! What changed between two service tables, in the operator's words: what `lbctl apply` did,
//! or with `--dry-run` would do. Pure logic.
use std::collections::{HashMap, HashSet};

use crate::table::{Backend, Service, Table};

/// The changes, one line each (`+` added, `-` removed, `~` changed), and their counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub lines: Vec<String>,
    pub services_added: usize,
    pub services_removed: usize,
    pub services_changed: usize,
    pub services_unchanged: usize,
    /// Backends that got an id (new ones, and those of replaced services or moved nodes).
    pub backends_added: usize,
    /// Backends whose id was freed: their flows choose again.
    pub backends_removed: usize,
    pub nodes_added: usize,
    pub nodes_removed: usize,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// One line of counts.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "services: {} added, {} removed, {} changed, {} unchanged; backends: {} added, {} removed",
            self.services_added,
            self.services_removed,
            self.services_changed,
            self.services_unchanged,
            self.backends_added,
            self.backends_removed
        );
        if self.nodes_added + self.nodes_removed > 0 {
            out.push_str(&format!(
                "; nodes: {} added, {} removed",
                self.nodes_added, self.nodes_removed
            ));
        }
        out
    }
}

/// A backend as it stays: same address, node and id (a new id is a new backend to the data
/// plane, whose flows choose again).
fn identity(backend: &Backend) -> (std::net::SocketAddr, Option<&str>, u32) {
    (backend.addr, backend.node.as_deref(), backend.id)
}

/// Backends as a table file names them (with their weight unless 1).
fn list(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| b.spec().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn diff(before: &Table, after: &Table) -> TableDiff {
    let mut diff = TableDiff::default();
    for node in &after.nodes {
        if !before.nodes.contains(node) {
            diff.lines.push(format!("+ node {} {}", node.name, node.ip));
            diff.nodes_added += 1;
        }
    }
    for node in &before.nodes {
        if !after.nodes.contains(node) {
            diff.lines.push(format!("- node {} {}", node.name, node.ip));
            diff.nodes_removed += 1;
        }
    }
    let old: HashMap<&str, &Service> = before
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    for service in &after.services {
        match old.get(service.name.as_str()) {
            None => {
                let backends: Vec<&Backend> = service.backends.iter().collect();
                diff.lines.push(format!(
                    "+ service {} {}: {}",
                    service.name,
                    service.frontend(),
                    list(&backends)
                ));
                diff.services_added += 1;
                diff.backends_added += backends.len();
            }
            Some(was) => match service_changes(&mut diff, was, service) {
                Some(line) => {
                    diff.lines.push(line);
                    diff.services_changed += 1;
                }
                None => diff.services_unchanged += 1,
            },
        }
    }
    let new: HashSet<&str> = after.services.iter().map(|s| s.name.as_str()).collect();
    for service in before
        .services
        .iter()
        .filter(|s| !new.contains(s.name.as_str()))
    {
        diff.lines.push(format!(
            "- service {} {} ({} backends)",
            service.name,
            service.frontend(),
            service.backends.len()
        ));
        diff.services_removed += 1;
        diff.backends_removed += service.backends.len();
    }
    if common_order(&before.services, &after.services, |s| &s.name) {
        diff.lines.push("~ order of the services".to_owned());
    }
    if common_order(&before.nodes, &after.nodes, |n| &n.name) {
        diff.lines.push("~ order of the nodes".to_owned());
    }
    diff
}

/// Whether the things named in both lists come in another order in `after`.
fn common_order<T>(before: &[T], after: &[T], name: impl Fn(&T) -> &String) -> bool {
    let was: HashSet<&String> = before.iter().map(&name).collect();
    let is: HashSet<&String> = after.iter().map(&name).collect();
    let kept_was = before.iter().map(&name).filter(|n| is.contains(n));
    let kept_is = after.iter().map(&name).filter(|n| was.contains(n));
    !kept_was.eq(kept_is)
}

/// The line of a service that stays by name, if anything about it changed; counts its
/// backends' changes in `diff`.
fn service_changes(diff: &mut TableDiff, was: &Service, is: &Service) -> Option<String> {
    let ids = |s: &Service| -> Vec<u32> { s.backends.iter().map(|b| b.id).collect() };
    let kept: HashSet<_> = was.backends.iter().map(identity).collect();
    let stays: HashSet<_> = is.backends.iter().map(identity).collect();
    let added: Vec<&Backend> = is
        .backends
        .iter()
        .filter(|b| !kept.contains(&identity(b)))
        .collect();
    let removed: Vec<&Backend> = was
        .backends
        .iter()
        .filter(|b| !stays.contains(&identity(b)))
        .collect();
    diff.backends_added += added.len();
    diff.backends_removed += removed.len();
    let mut parts = Vec::new();
    if was.frontend() != is.frontend() || was.id != is.id {
        parts.push(format!(
            "replaced ({} → {}): its flows start afresh",
            was.frontend(),
            is.frontend()
        ));
    }
    if !added.is_empty() {
        parts.push(format!("+ {}", list(&added)));
    }
    if !removed.is_empty() {
        parts.push(format!("- {}", list(&removed)));
    }
    let mut order_was = ids(was);
    order_was.retain(|id| is.backends.iter().any(|b| b.id == *id));
    let mut order_is = ids(is);
    order_is.retain(|id| was.backends.iter().any(|b| b.id == *id));
    if order_was != order_is {
        parts.push("backend order".to_owned());
    }
    let reweighted: Vec<String> = is
        .backends
        .iter()
        .filter_map(|b| {
            let old = was.backends.iter().find(|w| identity(w) == identity(b))?;
            (old.weight != b.weight).then(|| format!("{b} {} → {}", old.weight, b.weight))
        })
        .collect();
    if !reweighted.is_empty() {
        parts.push(format!("weight {}", reweighted.join(", ")));
    }
    if was.scheduler != is.scheduler {
        parts.push(format!("scheduler {} → {}", was.scheduler, is.scheduler));
    }
    if was.health_check != is.health_check {
        parts.push(format!("health: {}", is.health_check.describe(is.proto)));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "~ service {} {}: {}",
            is.name,
            is.frontend(),
            parts.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{
        HealthCheck, Node, Proto, Scheduler, ServiceSpec, parse_weighted_backend_spec,
    };

    fn declared(name: &str, port: u16, backends: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            proto: Proto::Tcp,
            port,
            vip: None,
            backends: backends
                .iter()
                .map(|b| parse_weighted_backend_spec(b).unwrap())
                .collect(),
            health_check: HealthCheck::default(),
            scheduler: Scheduler::default(),
        }
    }

    #[test]
    fn every_kind_of_change_has_its_line_and_count() {
        let n1 = Node {
            name: "n1".into(),
            ip: "192.168.1.1".parse().unwrap(),
        };
        let mut before = Table::default();
        before
            .apply(
                Some(std::slice::from_ref(&n1)),
                &[
                    declared("web", 8080, &["10.0.0.6:80", "10.0.0.7:80", "10.0.0.8:80"]),
                    declared("api", 9090, &["10.0.0.9:80"]),
                    declared("dns", 53, &["10.0.0.6:53"]),
                    declared("same", 7000, &["10.0.0.6:7000"]),
                    declared("gone", 6000, &["10.0.0.6:6000", "10.0.0.7:6000"]),
                ],
            )
            .unwrap();
        let mut checked = declared("dns", 53, &["10.0.0.6:53"]);
        checked.health_check.rise = 5;
        let mut after = before.clone();
        after
            .apply(
                Some(&[]),
                &[
                    declared(
                        "web",
                        8080,
                        &["10.0.0.8:80*2", "10.0.0.6:80", "10.0.0.5:80*0"],
                    ),
                    declared("api", 9091, &["10.0.0.9:80"]),
                    checked,
                    declared("same", 7000, &["10.0.0.6:7000"]),
                    declared("new", 5000, &["10.0.0.4:80", "10.0.0.3:80"]),
                ],
            )
            .unwrap();
        let diff = diff(&before, &after);
        assert_eq!(
            diff.lines,
            [
                "- node n1 192.168.1.1",
                "~ service web tcp/8080: + 10.0.0.5:80*0; - 10.0.0.7:80; backend order; \
                 weight 10.0.0.8:80 1 → 2",
                "~ service api tcp/9091: replaced (tcp/9090 → tcp/9091): its flows start afresh; \
                 + 10.0.0.9:80; - 10.0.0.9:80",
                "~ service dns tcp/53: health: TCP connect every 2s, timeout 1s, \
                 unhealthy after 3 failures, healthy after 5 successes; ejected after 3 refused or unanswered connections in a row",
                "+ service new tcp/5000: 10.0.0.4:80, 10.0.0.3:80",
                "- service gone tcp/6000 (2 backends)",
            ]
        );
        assert_eq!(
            diff.summary(),
            "services: 1 added, 1 removed, 3 changed, 1 unchanged; backends: 4 added, 4 removed; \
             nodes: 0 added, 1 removed"
        );
        assert!(super::diff(&after, &after).is_empty());
        let mut reordered = after.clone();
        reordered.services.swap(0, 1);
        assert_eq!(
            super::diff(&after, &reordered).lines,
            ["~ order of the services"]
        );
        let mut hashed = after.clone();
        hashed.set_scheduler("same", Scheduler::Maglev).unwrap();
        assert_eq!(
            super::diff(&after, &hashed).lines,
            ["~ service same tcp/7000: scheduler rr → maglev"]
        );
    }
}
