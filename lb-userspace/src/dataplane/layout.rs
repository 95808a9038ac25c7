//! The layout of the pinned maps: what this build's object declares for each one, what the
//! pins hold, and what attaching this build may do with each pinned map: reuse it, create it,
//! migrate its contents into a larger one, or refuse. Each map's layout version is recorded with
//! the pins (the `LAYOUT_VERSIONS` map), so that a later build can tell which layouts it finds.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, MapData, MapInfo};
use lb_common::map_names;

use crate::dataplane::{self, FlowCapacity};

/// The pinned map, beside the others, that records each map's layout version by name.
pub const VERSIONS_MAP: &str = "LAYOUT_VERSIONS";
/// Key of `VERSIONS_MAP`: a map's name, NUL-padded.
type NameKey = [u8; 32];

/// Maps whose bytes changed meaning since they were first pinned, with their current layout
/// version; every other map is at version 1.
///
/// Bump a map's version here when the bytes already in its key or value change meaning (a
/// field moved, retyped or put to another use): pinned maps of another version are then
/// refused, since no copy can reinterpret them. Fields appended to a value (whose zero means
/// "not known yet", as in a fresh entry), more entries and new maps keep the versions: an
/// attach migrates those (see [`step`]).
const CHANGED_VERSIONS: &[(&str, u32)] = &[];

/// A map's layout version (see [`CHANGED_VERSIONS`]).
pub fn version_of(name: &str) -> u32 {
    CHANGED_VERSIONS
        .iter()
        .find(|(changed, _)| *changed == name)
        .map_or(1, |(_, version)| *version)
}

/// What a map is: declared by a build, or found pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub version: u32,
}

/// `enum bpf_map_type` values the migration handles (linux/bpf.h).
mod map_type {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PERCPU_HASH: u32 = 5;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const LRU_HASH: u32 = 9;
    pub const LRU_PERCPU_HASH: u32 = 10;
    pub const LPM_TRIE: u32 = 11;
    pub const DEVMAP_HASH: u32 = 25;
}

impl Layout {
    /// Arrays hold every index from the start (zeroed); hashes only the keys written.
    pub fn is_array(&self) -> bool {
        matches!(self.map_type, map_type::ARRAY | map_type::PERCPU_ARRAY)
    }

    /// A per-CPU map's value is one per possible CPU, each padded to 8 bytes.
    pub fn is_per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            map_type::PERCPU_ARRAY | map_type::PERCPU_HASH | map_type::LRU_PERCPU_HASH
        )
    }

    /// Whether entries can be copied into a map of this type with `map_ops` (a hash or an
    /// array; not a program array, whose values are descriptors).
    fn is_copyable(&self) -> bool {
        self.is_array()
            || matches!(
                self.map_type,
                map_type::HASH
                    | map_type::PERCPU_HASH
                    | map_type::LRU_HASH
                    | map_type::LRU_PERCPU_HASH
                    | map_type::DEVMAP_HASH
            )
    }

    /// Bytes of one value as the kernel reads and writes it from userspace: `value_size`, or
    /// `cpus` values of `value_size` rounded up to 8 bytes for a per-CPU map.
    pub fn value_len(&self, cpus: usize) -> usize {
        if self.is_per_cpu() {
            (self.value_size as usize).next_multiple_of(8) * cpus
        } else {
            self.value_size as usize
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}, key {} B, value {} B, {} entries, layout version {}",
            type_name(self.map_type),
            self.key_size,
            self.value_size,
            self.max_entries,
            self.version
        )
    }
}

fn type_name(map_type: u32) -> String {
    match map_type {
        map_type::HASH => "hash".into(),
        map_type::ARRAY => "array".into(),
        map_type::PERCPU_HASH => "per-CPU hash".into(),
        map_type::PERCPU_ARRAY => "per-CPU array".into(),
        map_type::LRU_HASH => "LRU hash".into(),
        map_type::LRU_PERCPU_HASH => "LRU per-CPU hash".into(),
        map_type::LPM_TRIE => "LPM trie".into(),
        map_type::DEVMAP_HASH => "devmap hash".into(),
        other => format!("map type {other}"),
    }
}

/// The layout of every pinned map as this build's object declares it (the flow-sized maps
/// sized by `capacity`), by name.
pub fn expected(capacity: FlowCapacity) -> Result<BTreeMap<&'static str, Layout>> {
    let object = aya_obj::Object::parse(dataplane::OBJECT).context("parsing the eBPF object")?;
    map_names::ALL
        .iter()
        .map(|name| {
            // Checked here, before anything changes, rather than when the versions are recorded.
            name_key(name)?;
            let map = object
                .maps
                .get(*name)
                .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
            let max_entries = if dataplane::FLOW_SIZED.contains(name) {
                capacity.entries(name)
            } else {
                map.max_entries()
            };
            let layout = Layout {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                version: version_of(name),
            };
            Ok((*name, layout))
        })
        .collect()
}

/// What attaching this build does with one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Pinned with this build's layout: used as it is.
    Reuse,
    /// Not pinned yet: created empty and pinned.
    Create,
    /// Pinned with a layout this build only extends (more entries, a longer value): its
    /// contents are copied into a new map of this build's layout, which replaces its pin.
    Migrate { from: Layout },
}

/// What to do with a map pinned as `pinned` (`None`: not pinned) that this build declares as
/// `wanted`; `Err` says why it cannot be used, for the operator.
pub fn step(pinned: Option<Layout>, wanted: &Layout) -> Result<Step, String> {
    let Some(pinned) = pinned else {
        return Ok(Step::Create);
    };
    if pinned == *wanted {
        return Ok(Step::Reuse);
    }
    let refused = |why: String| {
        Err(format!(
            "pinned as {}; this lbctl's is {}: {why}",
            pinned.describe(),
            wanted.describe()
        ))
    };
    if pinned.version > wanted.version {
        return refused("made by a later lbctl".into());
    }
    if pinned.version < wanted.version {
        return refused("the meaning of its bytes changed since".into());
    }
    if pinned.map_type != wanted.map_type || pinned.key_size != wanted.key_size {
        return refused("its type or key changed".into());
    }
    if pinned.value_size > wanted.value_size || pinned.max_entries > wanted.max_entries {
        return refused(
            "it is larger: made by a later lbctl, or with a larger --flow-capacity or \
             --flow-capacity6"
                .into(),
        );
    }
    if !wanted.is_copyable() {
        return refused(format!(
            "a {} cannot be migrated",
            type_name(wanted.map_type)
        ));
    }
    Ok(Step::Migrate { from: pinned })
}

/// What attaching this build does with the pinned maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: BTreeMap<&'static str, Step>,
    /// Maps pinned by another build that this one does not have: removed once this build's
    /// programs run (nothing uses them then).
    pub dropped: Vec<String>,
}

impl Plan {
    pub fn migrations(&self) -> impl Iterator<Item = (&'static str, Layout)> + '_ {
        self.steps.iter().filter_map(|(name, step)| match step {
            Step::Migrate { from } => Some((*name, *from)),
            _ => None,
        })
    }

    /// One line for the operator: what was kept, created, migrated and dropped.
    pub fn summary(&self, wanted: &BTreeMap<&'static str, Layout>) -> String {
        let count = |kind: fn(&Step) -> bool| self.steps.values().filter(|s| kind(s)).count();
        let mut parts = vec![format!(
            "{} kept as they were",
            count(|s| *s == Step::Reuse)
        )];
        let created: Vec<&str> = self
            .steps
            .iter()
            .filter(|(_, s)| **s == Step::Create)
            .map(|(name, _)| *name)
            .collect();
        if !created.is_empty() && created.len() < self.steps.len() {
            parts.push(format!("created {}", created.join(", ")));
        }
        for (name, from) in self.migrations() {
            let to = wanted[name];
            parts.push(format!(
                "migrated {name} (value {} → {} B, {} → {} entries)",
                from.value_size, to.value_size, from.max_entries, to.max_entries
            ));
        }
        if !self.dropped.is_empty() {
            parts.push(format!(
                "dropped {} (not in this lbctl)",
                self.dropped.join(", ")
            ));
        }
        if created.len() == self.steps.len() {
            return "maps created".into();
        }
        format!("maps: {}", parts.join("; "))
    }
}

/// Works out what to do with every map pinned in `maps_dir` for `wanted` (see [`expected`]).
/// An error, naming every map that cannot be used and why, when any cannot: nothing has
/// changed then.
pub fn plan(maps_dir: &Path, wanted: &BTreeMap<&'static str, Layout>) -> Result<Plan> {
    let versions = recorded_versions(maps_dir)?;
    let mut plan = Plan::default();
    let mut refusals = Vec::new();
    for (name, layout) in wanted {
        let pinned = pinned_layout(maps_dir, name, &versions)?;
        match step(pinned, layout) {
            Ok(step) => {
                plan.steps.insert(name, step);
            }
            Err(why) => refusals.push(format!("  {name}: {why}")),
        }
    }
    if !refusals.is_empty() {
        return Err(anyhow!(
            "the maps pinned in {} cannot be used by this lbctl:\n{}\nNothing was changed: \
             the programs attached keep running on them. Either keep the lbctl that made them, \
             or start afresh, which loses the open connections' flows and the counters but \
             keeps the service table:\n  lbctl export > table.json && lbctl purge && lbctl \
             attach IFACE && lbctl apply table.json",
            maps_dir.display(),
            refusals.join("\n")
        ));
    }
    if maps_dir.exists() {
        let known: BTreeSet<&str> = wanted.keys().copied().chain([VERSIONS_MAP]).collect();
        for entry in fs::read_dir(maps_dir).with_context(|| format!("{}", maps_dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !known.contains(name.as_str()) {
                plan.dropped.push(name);
            }
        }
        plan.dropped.sort();
    }
    Ok(plan)
}

/// The layout of the map pinned as `maps_dir/name`, if any. Its version is the recorded one;
/// maps pinned before versions were recorded have the version-1 layouts.
fn pinned_layout(
    maps_dir: &Path,
    name: &str,
    versions: &BTreeMap<String, u32>,
) -> Result<Option<Layout>> {
    let path = maps_dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
    let map_type = info
        .map_type()
        .with_context(|| format!("reading the type of {}", path.display()))?;
    Ok(Some(Layout {
        map_type: map_type as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        version: versions.get(name).copied().unwrap_or(1),
    }))
}

fn name_key(name: &str) -> Result<NameKey> {
    let mut key = NameKey::default();
    key.get_mut(..name.len())
        .ok_or_else(|| {
            anyhow!(
                "map name {name} is longer than {} bytes",
                size_of::<NameKey>()
            )
        })?
        .copy_from_slice(name.as_bytes());
    Ok(key)
}

fn open_versions(maps_dir: &Path) -> Result<Option<HashMap<MapData, NameKey, u32>>> {
    let path = maps_dir.join(VERSIONS_MAP);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = aya::maps::Map::from_map_data(data)?
        .try_into()
        .with_context(|| format!("{} is not a map of versions", path.display()))?;
    Ok(Some(map))
}

/// The layout versions recorded with the pins, by map name (empty before any was recorded).
pub fn recorded_versions(maps_dir: &Path) -> Result<BTreeMap<String, u32>> {
    let Some(map) = open_versions(maps_dir)? else {
        return Ok(BTreeMap::new());
    };
    let mut versions = BTreeMap::new();
    for entry in map.iter() {
        let (key, version) = entry.context("reading LAYOUT_VERSIONS")?;
        let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
        versions.insert(String::from_utf8_lossy(&key[..end]).into_owned(), version);
    }
    Ok(versions)
}

/// Records the versions of `layouts` with the pins (the maps then pinned are these), forgetting
/// any other map.
pub fn record_versions(maps_dir: &Path, layouts: &BTreeMap<&'static str, Layout>) -> Result<()> {
    let mut map = match open_versions(maps_dir)? {
        Some(map) => map,
        None => {
            let map = HashMap::<MapData, NameKey, u32>::create(256, 0)
                .context("creating LAYOUT_VERSIONS")?;
            let path = maps_dir.join(VERSIONS_MAP);
            aya::maps::IterableMap::map(&map)
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            map
        }
    };
    let stale: Vec<NameKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| {
            !layouts
                .keys()
                .any(|name| name_key(name).is_ok_and(|k| k == *key))
        })
        .collect();
    for key in stale {
        map.remove(&key).context("updating LAYOUT_VERSIONS")?;
    }
    for (name, layout) in layouts {
        map.insert(name_key(name)?, layout.version, 0)
            .context("updating LAYOUT_VERSIONS")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOWS: Layout = Layout {
        map_type: map_type::LRU_HASH,
        key_size: 16,
        value_size: 24,
        max_entries: 1 << 20,
        version: 1,
    };
    const COUNTERS: Layout = Layout {
        map_type: map_type::PERCPU_ARRAY,
        key_size: 4,
        value_size: 16,
        max_entries: 40,
        version: 1,
    };

    #[test]
    fn each_pinned_map_is_reused_created_migrated_or_refused() {
        let with = |base: Layout, edit: fn(&mut Layout)| {
            let mut layout = base;
            edit(&mut layout);
            layout
        };
        let migrate = |from| Ok(Step::Migrate { from });
        let refused = |pinned: Layout, wanted: Layout, why: &str| {
            let err = step(Some(pinned), &wanted).unwrap_err();
            assert!(err.contains(why), "{err}");
        };
        assert_eq!(step(None, &FLOWS), Ok(Step::Create));
        assert_eq!(step(Some(FLOWS), &FLOWS), Ok(Step::Reuse));
        // Growth: a value with fields appended, more entries, or both.
        let shorter = with(FLOWS, |l| l.value_size = 16);
        assert_eq!(step(Some(shorter), &FLOWS), migrate(shorter));
        let fewer = with(COUNTERS, |l| l.max_entries = 38);
        assert_eq!(step(Some(fewer), &COUNTERS), migrate(fewer));
        let both = with(COUNTERS, |l| (l.max_entries, l.value_size) = (30, 8));
        assert_eq!(step(Some(both), &COUNTERS), migrate(both));
        // Anything else is refused.
        refused(with(FLOWS, |l| l.version = 2), FLOWS, "later lbctl");
        refused(
            FLOWS,
            with(FLOWS, |l| l.version = 2),
            "meaning of its bytes",
        );
        refused(
            with(shorter, |l| l.version = 0),
            FLOWS,
            "meaning of its bytes",
        );
        refused(with(FLOWS, |l| l.map_type = map_type::HASH), FLOWS, "type");
        refused(with(FLOWS, |l| l.key_size = 12), FLOWS, "key changed");
        refused(with(FLOWS, |l| l.value_size = 32), FLOWS, "larger");
        refused(with(FLOWS, |l| l.max_entries = 1 << 21), FLOWS, "larger");
        let program_array = Layout {
            map_type: 3,
            ..COUNTERS
        };
        refused(
            with(program_array, |l| l.max_entries = 8),
            program_array,
            "cannot be migrated",
        );
    }

    #[test]
    fn the_object_declares_every_pinned_map_and_the_flow_capacity_sizes_the_flow_maps() {
        let layouts = expected(FlowCapacity::new(4096, None)).unwrap();
        assert_eq!(layouts.len(), map_names::ALL.len());
        for name in dataplane::FLOW_SIZED {
            assert_eq!(layouts[name].max_entries, 4096, "{name}");
        }
        // The IPv6 tables take an eighth of a larger flow table.
        let layouts = expected(FlowCapacity::new(1 << 20, None)).unwrap();
        assert_eq!(layouts[map_names::FLOWS].max_entries, 1 << 20);
        assert_eq!(layouts[map_names::FLOWS6].max_entries, 1 << 17);
        assert_eq!(layouts[map_names::REVERSE_FLOWS6].max_entries, 1 << 17);
        assert_eq!(layouts[map_names::TUNNEL_REPLIES6].max_entries, 1 << 17);
        // Or the size the operator chose (`--flow-capacity6`).
        let layouts = expected(FlowCapacity::new(8192, Some(16_384))).unwrap();
        for (name, entries) in [
            (map_names::FLOWS, 8192),
            (map_names::REVERSE_FLOWS, 8192),
            (map_names::TUNNEL_REPLIES, 8192),
            (map_names::FLOWS6, 16_384),
            (map_names::REVERSE_FLOWS6, 16_384),
            (map_names::TUNNEL_REPLIES6, 16_384),
        ] {
            assert_eq!(layouts[name].max_entries, entries, "{name}");
        }
        assert_eq!(layouts[map_names::FLOWS].map_type, map_type::LRU_HASH);
        assert_eq!(
            layouts[map_names::FLOWS].value_size as usize,
            size_of::<lb_common::FlowValue>()
        );
        assert_eq!(
            layouts[map_names::REASON_STATS].max_entries,
            lb_common::REASON_COUNT
        );
    }

    #[test]
    fn a_per_cpu_value_is_padded_to_8_bytes_per_cpu() {
        assert_eq!(COUNTERS.value_len(3), 48);
        let odd = Layout {
            value_size: 12,
            ..COUNTERS
        };
        assert_eq!(odd.value_len(2), 32);
        assert_eq!(
            Layout {
                value_size: 12,
                ..FLOWS
            }
            .value_len(2),
            12
        );
    }
}
