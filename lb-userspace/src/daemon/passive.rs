//! The daemon's side of passive health checking: it reads what the data plane saw of each
//! backend's connections (`PASSIVE_HEALTH`), tells of every ejection the data plane made on its
//! own, and hands an ejected backend this node probes to its active checks, which keep it
//! unhealthy until `rise` probes in a row pass; the ejection then ends (`end_ejection`). Until
//! then the daemon holds the ejection (the data plane's would run out after
//! `PASSIVE_EJECTION_NS`), so that `service ls` and the metrics say the backend is ejected for as
//! long as it is out.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{
    PASSIVE_EJECTION_NS, PASSIVE_REFUSED, PASSIVE_UNANSWERED, PassiveHealth, map_names,
};

use crate::dataplane;

/// A backend whose ejections are watched: its service, and its address for the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub service: String,
    pub addr: SocketAddr,
}

/// An ejection the data plane made since the last look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub id: u32,
    pub backend: Watched,
    pub health: PassiveHealth,
}

impl Ejection {
    /// Why, in words: "3 connections in a row refused" and the totals.
    pub fn reason(&self) -> String {
        let last = match self.health.last_failure {
            PASSIVE_REFUSED => "refused",
            PASSIVE_UNANSWERED => "unanswered",
            _ => "failed",
        };
        format!(
            "ejected by the data plane: {} connections in a row failed, the last {last} \
             ({} refused, {} unanswered in all)",
            self.health.failures, self.health.refused, self.health.unanswered
        )
    }
}

/// The ejections seen so far, by backend id.
#[derive(Default)]
pub struct Watcher {
    map: Option<Array<MapData, PassiveHealth>>,
    backends: HashMap<u32, Watched>,
    /// Each watched backend's ejection count when last looked at.
    seen: HashMap<u32, u64>,
    /// Ejections handed to the active checks, held until they end them.
    held: HashSet<u32>,
}

impl Watcher {
    /// Watches `backends` (by id) of the instance whose maps are pinned in `maps_dir`; opened
    /// again each time, since an upgrade may have replaced the map.
    pub fn reload(&mut self, maps_dir: &Path, backends: HashMap<u32, Watched>) -> Result<()> {
        let path = maps_dir.join(map_names::PASSIVE_HEALTH);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        self.map = Some(Array::try_from(Map::Array(data))?);
        // A backend whose slot went to another is a new one.
        self.seen.retain(|id, _| {
            backends
                .get(id)
                .is_some_and(|b| self.backends.get(id) == Some(b))
        });
        self.held.retain(|id| self.seen.contains_key(id));
        self.backends = backends;
        Ok(())
    }

    /// The ejections made since the last look. A backend seen for the first time counts only
    /// if it is ejected now (a restarted daemon takes over an ejection in force).
    pub fn ejections(&mut self) -> Vec<Ejection> {
        let now_ns = dataplane::monotonic_ns();
        self.renew_held();
        let Some(map) = &self.map else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for (&id, backend) in &self.backends {
            let Ok(health) = map.get(&id, 0) else {
                continue;
            };
            let new = match self.seen.insert(id, health.ejections) {
                Some(seen) => health.ejections > seen,
                None => dataplane::is_ejected(&health, now_ns),
            };
            if new {
                found.push(Ejection {
                    id,
                    backend: backend.clone(),
                    health,
                });
            }
        }
        found.sort_by_key(|ejection| ejection.id);
        found
    }

    /// Holds backend `id`'s ejection until [`Watcher::end`].
    pub fn hold(&mut self, id: u32) {
        self.held.insert(id);
    }

    /// Renews the held ejections that have run half their course: the data plane's time of
    /// ejection becomes now (on its own clock). One that ended meanwhile is let go.
    fn renew_held(&mut self) {
        let Some(map) = &mut self.map else {
            return;
        };
        let now_ns = dataplane::monotonic_coarse_ns();
        self.held.retain(|&id| {
            let Ok(health) = map.get(&id, 0) else {
                return false;
            };
            if health.ejected_ns == 0 {
                return false;
            }
            if now_ns.wrapping_sub(health.ejected_ns) >= PASSIVE_EJECTION_NS / 2 {
                let renewed = PassiveHealth {
                    ejected_ns: now_ns,
                    ..health
                };
                let _ = map.set(id, renewed, 0);
            }
            true
        });
    }

    /// Ends backend `id`'s ejection if it has one; returns whether it had.
    pub fn end(&mut self, id: u32) -> Result<bool> {
        self.held.remove(&id);
        let Some(map) = &mut self.map else {
            return Ok(false);
        };
        if map.get(&id, 0)?.ejected_ns == 0 {
            return Ok(false);
        }
        dataplane::end_ejection(map, id)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_says_how_many_failed_and_how_the_last_did() {
        let ejection = Ejection {
            id: 4,
            backend: Watched {
                service: "web".to_owned(),
                addr: "10.0.0.6:80".parse().unwrap(),
            },
            health: PassiveHealth {
                failures: 3,
                last_failure: PASSIVE_UNANSWERED,
                refused: 2,
                unanswered: 1,
                ..PassiveHealth::default()
            },
        };
        assert_eq!(
            ejection.reason(),
            "ejected by the data plane: 3 connections in a row failed, the last unanswered \
             (2 refused, 1 unanswered in all)"
        );
    }
}
