//! Every lbctl instance on the machine (`lbctl instances`), found from its pins and state
//! folder without entering its namespace, which may be gone: whether the namespace exists, the
//! interfaces and whether their links still hold a device, the flow table's size and the kernel
//! memory the pinned maps hold. It only reads, and takes no instance's lock: each pin is opened
//! on its own (one a purge removes meanwhile is left out), and the state file is replaced by a
//! rename, so it is read whole, old or new.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use lb_common::map_names;
use serde::Serialize;

use crate::{
    dataplane::install::{self, LinkHook},
    dataplane::map_ops,
    instance::state::{self, State},
    instance::{self, Instance},
};

/// Whether an instance's network namespace exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Namespace {
    Alive,
    Gone,
}

/// A pinned map, as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedMap {
    /// Its pin's path under the pin folder (`maps/FLOWS`).
    pub name: String,
    pub max_entries: u32,
    /// Bytes of kernel memory the map takes.
    pub memlock: u64,
}

/// A pinned link of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLink {
    pub iface: String,
    pub hook: LinkHook,
    /// The device the link holds; 0 once that device is gone (deleted, or gone with its
    /// namespace): the link then holds only its program.
    pub ifindex: u32,
}

/// What an instance's state folder holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Saved {
    State(Box<State>),
    Nothing,
    /// Why the state file cannot be read.
    Damaged(String),
}

/// What was found of one instance.
#[derive(Clone, Debug)]
pub struct Found {
    pub name: String,
    pub namespace: Namespace,
    /// `None` when nothing is pinned.
    pub pin_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub saved: Saved,
    pub maps: Vec<PinnedMap>,
    pub links: Vec<PinnedLink>,
    /// Pins that could not be read, and why.
    pub unreadable: Vec<String>,
}

impl Found {
    /// The kernel memory the pinned maps hold, in bytes.
    pub fn maps_memory(&self) -> u64 {
        self.maps.iter().map(|map| map.memlock).sum()
    }
}

/// Finds every instance with pins under `bpffs` or a state file in the default state root. A
/// pinned instance's state folder is the one its pins recorded, else the default one.
pub fn discover(bpffs: &Path) -> Result<Vec<Found>> {
    let state_root = Path::new(instance::DEFAULT_STATE_ROOT);
    let pinned = subfolders(&bpffs.join("lbctl"))?;
    let saved = subfolders(state_root)?
        .into_iter()
        .filter(|name| state_root.join(name).join(state::STATE_FILE).exists());
    let names: BTreeSet<String> = pinned.into_iter().chain(saved).collect();
    let mut found = Vec::new();
    for name in &names {
        let instance = instance::locate_without_entering(name, None, Some(bpffs.to_path_buf()))?;
        found.extend(find(&instance));
    }
    Ok(found)
}

/// What is pinned and saved for `instance`, if anything is.
pub fn find(instance: &Instance) -> Option<Found> {
    let found = inspect(instance);
    (found.pin_dir.is_some() || found.saved != Saved::Nothing).then_some(found)
}

/// The names of the folders in `dir` (none if it does not exist).
fn subfolders(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("listing {}", dir.display())),
    };
    Ok(entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect())
}

/// What is pinned and saved for `instance`, and whether its namespace exists.
pub fn inspect(instance: &Instance) -> Found {
    let namespace = match instance::netns_handle(&instance.name) {
        Some(_) => Namespace::Alive,
        None => Namespace::Gone,
    };
    let mut unreadable = Vec::new();
    let mut maps = Vec::new();
    for (dir, prefix) in [
        (instance.maps_dir(), "maps"),
        (
            instance.pin_dir.join(install::STAGING_DIR),
            install::STAGING_DIR,
        ),
    ] {
        for (name, fdinfo) in pins_in(&dir, &mut unreadable) {
            match (
                fdinfo_field(&fdinfo, "max_entries"),
                fdinfo_field(&fdinfo, "memlock"),
            ) {
                (Some(max_entries), Some(memlock)) => maps.push(PinnedMap {
                    name: format!("{prefix}/{name}"),
                    max_entries: max_entries as u32,
                    memlock,
                }),
                _ => unreadable.push(format!("{}: not a map", dir.join(&name).display())),
            }
        }
    }
    let mut links = Vec::new();
    for (name, fdinfo) in pins_in(&instance.links_dir(), &mut unreadable) {
        if let Some((iface, hook)) = install::link_pin_of(&name) {
            links.push(PinnedLink {
                iface,
                hook,
                ifindex: fdinfo_field(&fdinfo, "ifindex").unwrap_or(0) as u32,
            });
        }
    }
    let saved = if !instance.state_dir.join(state::STATE_FILE).exists() {
        Saved::Nothing
    } else {
        match state::load(&instance.state_dir) {
            Ok(state) => Saved::State(Box::new(state)),
            Err(err) => Saved::Damaged(format!("{err:#}")),
        }
    };
    Found {
        name: instance.name.clone(),
        namespace,
        pin_dir: instance.pin_dir.is_dir().then(|| instance.pin_dir.clone()),
        state_dir: instance.state_dir.clone(),
        saved,
        maps,
        links,
        unreadable,
    }
}

/// The kernel memory the instance's pinned maps hold, in bytes.
pub fn maps_memory(instance: &Instance) -> u64 {
    inspect(instance).maps_memory()
}

/// The pins in `dir` (none if it does not exist), by name, with what the kernel says of each
/// in fdinfo. A pin removed meanwhile is left out; one that cannot be opened is recorded in
/// `unreadable`.
fn pins_in(dir: &Path, unreadable: &mut Vec<String>) -> Vec<(String, String)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut pins = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        match map_ops::open_pin(&entry.path()).and_then(|fd| fdinfo(&fd)) {
            Ok(text) => pins.push((name, text)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => unreadable.push(format!("{}: {err}", entry.path().display())),
        }
    }
    pins.sort();
    pins
}

/// What the kernel says of a BPF object through its descriptor.
fn fdinfo(fd: &OwnedFd) -> std::io::Result<String> {
    fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
}

/// The number of a `key:\tNUMBER` line of fdinfo text (`memlock:\t109051904`).
pub fn fdinfo_field(fdinfo: &str, key: &str) -> Option<u64> {
    fdinfo.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim() != key {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Where a link is, as `lbctl instances` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Pinned, on its device.
    Attached,
    /// Pinned, its device gone (the interface was deleted, or went with its namespace).
    Gone,
    /// Not pinned.
    Missing,
}

/// An interface of an instance: attached by the state, or with links pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceRow {
    pub name: String,
    /// Its index when attached, as the state recorded it.
    pub ifindex: Option<u32>,
    pub xdp: LinkState,
    /// TC egress.
    pub tc: LinkState,
    pub tc_ingress: LinkState,
}

impl InterfaceRow {
    /// The name, with what is amiss: `eth0`, `eth0 (gone)`, `eth0 (xdp attached, tc missing,
    /// tc ingress missing)`.
    fn describe(&self) -> String {
        let word = |state: LinkState| match state {
            LinkState::Attached => "attached",
            LinkState::Gone => "gone",
            LinkState::Missing => "missing",
        };
        let links = [self.xdp, self.tc, self.tc_ingress];
        match links {
            _ if links.iter().all(|&l| l == LinkState::Attached) => self.name.clone(),
            _ if links.iter().all(|&l| l == LinkState::Gone) => format!("{} (gone)", self.name),
            _ if links.iter().all(|&l| l == LinkState::Missing) => {
                format!("{} (no links)", self.name)
            }
            [xdp, tc, tc_ingress] => format!(
                "{} (xdp {}, tc {}, tc ingress {})",
                self.name,
                word(xdp),
                word(tc),
                word(tc_ingress)
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapRow {
    pub max_entries: u32,
    pub memlock_bytes: u64,
}

/// One instance, as `lbctl instances` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub name: String,
    pub namespace: Namespace,
    pub pin_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// `saved`, `none` or `damaged`.
    pub state: &'static str,
    pub interfaces: Vec<InterfaceRow>,
    /// The pinned flow table's size.
    pub flow_capacity: Option<u32>,
    /// The pinned IPv6 flow table's size.
    pub flow_capacity6: Option<u32>,
    /// The pinned maps' memory, in bytes.
    pub kernel_memory_bytes: u64,
    pub maps: BTreeMap<String, MapRow>,
    /// What could not be read.
    pub problems: Vec<String>,
}

/// The row of what was found of an instance: the interfaces the state attached, in its order,
/// then those with links pinned but not in the state (a damaged or missing state).
pub fn row(found: &Found) -> Row {
    let attachments = match &found.saved {
        Saved::State(state) => state.attachments.as_slice(),
        Saved::Nothing | Saved::Damaged(_) => &[],
    };
    let link_state = |iface: &str, hook: LinkHook| match found
        .links
        .iter()
        .find(|link| link.iface == iface && link.hook == hook)
    {
        Some(link) if link.ifindex != 0 => LinkState::Attached,
        Some(_) => LinkState::Gone,
        None => LinkState::Missing,
    };
    let unrecorded: BTreeSet<&str> = found
        .links
        .iter()
        .map(|link| link.iface.as_str())
        .filter(|iface| !attachments.iter().any(|a| a.iface == *iface))
        .collect();
    let interfaces = attachments
        .iter()
        .map(|a| (a.iface.as_str(), Some(a.ifindex)))
        .chain(unrecorded.into_iter().map(|iface| (iface, None)))
        .map(|(iface, ifindex)| InterfaceRow {
            name: iface.to_owned(),
            ifindex,
            xdp: link_state(iface, LinkHook::Xdp),
            tc: link_state(iface, LinkHook::Tc),
            tc_ingress: link_state(iface, LinkHook::TcIngress),
        })
        .collect();
    let pinned_entries = |name: &str| {
        let pin = format!("maps/{name}");
        found
            .maps
            .iter()
            .find(|map| map.name == pin)
            .map(|map| map.max_entries)
    };
    let mut problems = found.unreadable.clone();
    if let Saved::Damaged(why) = &found.saved {
        problems.insert(0, why.clone());
    }
    Row {
        name: found.name.clone(),
        namespace: found.namespace,
        pin_dir: found.pin_dir.clone(),
        state_dir: found.state_dir.clone(),
        state: match found.saved {
            Saved::State(_) => "saved",
            Saved::Nothing => "none",
            Saved::Damaged(_) => "damaged",
        },
        interfaces,
        flow_capacity: pinned_entries(map_names::FLOWS),
        flow_capacity6: pinned_entries(map_names::FLOWS6),
        kernel_memory_bytes: found.maps_memory(),
        maps: found
            .maps
            .iter()
            .map(|map| {
                (
                    map.name.clone(),
                    MapRow {
                        max_entries: map.max_entries,
                        memlock_bytes: map.memlock,
                    },
                )
            })
            .collect(),
        problems,
    }
}

/// `lbctl instances --json`.
#[derive(Serialize)]
pub struct Listing<'a> {
    pub instances: &'a [Row],
    /// Of every instance listed.
    pub kernel_memory_bytes: u64,
}

impl<'a> Listing<'a> {
    pub fn new(instances: &'a [Row]) -> Self {
        Self {
            instances,
            kernel_memory_bytes: instances.iter().map(|r| r.kernel_memory_bytes).sum(),
        }
    }
}

/// `lbctl instances`: a table, a line of totals, and a line per problem.
pub fn render(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "no instances".to_owned();
    }
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|row| {
            let interfaces: Vec<String> = row.interfaces.iter().map(|i| i.describe()).collect();
            [
                row.name.clone(),
                match row.namespace {
                    Namespace::Alive => "alive",
                    Namespace::Gone => "gone",
                }
                .to_owned(),
                if interfaces.is_empty() {
                    "-".to_owned()
                } else {
                    interfaces.join(", ")
                },
                row.flow_capacity
                    .map_or_else(|| "-".to_owned(), |flows| flows.to_string()),
                row.flow_capacity6
                    .map_or_else(|| "-".to_owned(), |flows| flows.to_string()),
                crate::dataplane::megabytes(row.kernel_memory_bytes),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "NAMESPACE",
        "INTERFACES",
        "FLOWS",
        "FLOWS6",
        "KERNEL MEMORY",
    ]
    .map(str::to_owned);
    let widths: Vec<usize> = (0..6)
        .map(|column| {
            cells
                .iter()
                .chain([&header])
                .map(|line| line[column].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in [&header].into_iter().chain(&cells) {
        let text = format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}  {:>w5$}",
            line[0],
            line[1],
            line[2],
            line[3],
            line[4],
            line[5],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
            w5 = widths[5],
        );
        out.push_str(text.trim_end());
        out.push('\n');
    }
    let total: u64 = rows.iter().map(|r| r.kernel_memory_bytes).sum();
    let gone: Vec<&Row> = rows
        .iter()
        .filter(|r| r.namespace == Namespace::Gone)
        .collect();
    out.push_str(&format!(
        "{} instance{}, {} of kernel memory in pinned maps",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        crate::dataplane::megabytes(total)
    ));
    if !gone.is_empty() {
        out.push_str(&format!(
            "; {} in {} whose namespace is gone (`lbctl --netns NAME purge` removes one)",
            crate::dataplane::megabytes(gone.iter().map(|r| r.kernel_memory_bytes).sum()),
            if gone.len() == 1 {
                "1 instance".to_owned()
            } else {
                format!("{} instances", gone.len())
            },
        ));
    }
    for row in rows {
        for problem in &row.problems {
            out.push_str(&format!("\n{}: {problem}", row.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::state::Attachment;

    /// fdinfo of a pinned LRU hash (kernel 6.18), and of an XDP link whose device is gone.
    const MAP_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2065\n\
        map_type:\t9\nkey_size:\t16\nvalue_size:\t40\nmax_entries:\t1048576\n\
        map_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t109051904\nmap_id:\t42\nfrozen:\t0\n";
    const LINK_FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2066\n\
        link_type:\txdp\nlink_id:\t7\nprog_tag:\t0123456789abcdef\nprog_id:\t51\nifindex:\t0\n";

    #[test]
    fn fdinfo_fields_are_read_by_name() {
        assert_eq!(fdinfo_field(MAP_FDINFO, "memlock"), Some(109_051_904));
        assert_eq!(fdinfo_field(MAP_FDINFO, "max_entries"), Some(1 << 20));
        assert_eq!(fdinfo_field(MAP_FDINFO, "map_id"), Some(42));
        assert_eq!(fdinfo_field(LINK_FDINFO, "ifindex"), Some(0));
        assert_eq!(fdinfo_field(LINK_FDINFO, "memlock"), None);
        // A prefix of a name is not the name; a value that is not a number is no value.
        assert_eq!(fdinfo_field(MAP_FDINFO, "map"), None);
        assert_eq!(fdinfo_field(LINK_FDINFO, "link_type"), None);
    }

    fn map(name: &str, max_entries: u32, memlock: u64) -> PinnedMap {
        PinnedMap {
            name: name.to_owned(),
            max_entries,
            memlock,
        }
    }

    fn link(iface: &str, hook: LinkHook, ifindex: u32) -> PinnedLink {
        PinnedLink {
            iface: iface.to_owned(),
            hook,
            ifindex,
        }
    }

    fn found(saved: Saved, maps: Vec<PinnedMap>, links: Vec<PinnedLink>) -> Found {
        Found {
            name: "n1".to_owned(),
            namespace: Namespace::Gone,
            pin_dir: Some(PathBuf::from("/sys/fs/bpf/lbctl/n1")),
            state_dir: PathBuf::from("/var/lib/lbctl/n1"),
            saved,
            maps,
            links,
            unreadable: Vec::new(),
        }
    }

    fn attached(ifaces: &[(&str, u32)]) -> Saved {
        Saved::State(Box::new(State {
            attachments: ifaces
                .iter()
                .map(|(iface, ifindex)| Attachment {
                    iface: (*iface).to_owned(),
                    ifindex: *ifindex,
                    ..Attachment::default()
                })
                .collect(),
            ..State::default()
        }))
    }

    #[test]
    fn a_row_sums_the_maps_and_takes_the_flow_tables_size() {
        let row = row(&found(
            Saved::Nothing,
            vec![
                map("maps/FLOWS", 4096, 1_000_000),
                map("maps/FLOWS6", 16384, 500_000),
                map("maps/SERVICES", 16384, 250_000),
                map("migrating/FLOWS", 8192, 2_000_000),
            ],
            Vec::new(),
        ));
        assert_eq!(row.flow_capacity, Some(4096));
        assert_eq!(row.flow_capacity6, Some(16384));
        assert_eq!(row.kernel_memory_bytes, 3_750_000);
        assert_eq!(row.maps.len(), 4);
        assert_eq!(row.maps["migrating/FLOWS"].memlock_bytes, 2_000_000);
        assert_eq!(row.state, "none");
        assert!(row.interfaces.is_empty());
        let empty = super::row(&found(Saved::Nothing, Vec::new(), Vec::new()));
        assert_eq!(
            (
                empty.flow_capacity,
                empty.flow_capacity6,
                empty.kernel_memory_bytes
            ),
            (None, None, 0)
        );
    }

    /// Each interface of the state in its order, then links the state does not know; a link
    /// holding a device is attached, one whose device went is gone, an absent one missing.
    #[test]
    fn a_rows_interfaces_come_from_the_state_and_the_links() {
        let row = row(&found(
            attached(&[("veth1", 5), ("eth0.100", 3), ("veth0", 4)]),
            Vec::new(),
            vec![
                link("veth1", LinkHook::Xdp, 0),
                link("veth1", LinkHook::Tc, 0),
                link("veth1", LinkHook::TcIngress, 0),
                link("eth0.100", LinkHook::Xdp, 3),
                link("eth0.100", LinkHook::Tc, 3),
                link("eth0.100", LinkHook::TcIngress, 3),
                link("veth0", LinkHook::Xdp, 4),
                link("old", LinkHook::Tc, 0),
            ],
        ));
        let seen: Vec<(&str, Option<u32>, [LinkState; 3])> = row
            .interfaces
            .iter()
            .map(|i| (i.name.as_str(), i.ifindex, [i.xdp, i.tc, i.tc_ingress]))
            .collect();
        use LinkState::{Attached, Gone, Missing};
        assert_eq!(
            seen,
            [
                ("veth1", Some(5), [Gone, Gone, Gone]),
                ("eth0.100", Some(3), [Attached, Attached, Attached]),
                ("veth0", Some(4), [Attached, Missing, Missing]),
                ("old", None, [Missing, Gone, Missing]),
            ]
        );
        let described: Vec<String> = row.interfaces.iter().map(|i| i.describe()).collect();
        assert_eq!(
            described,
            [
                "veth1 (gone)",
                "eth0.100",
                "veth0 (xdp attached, tc missing, tc ingress missing)",
                "old (xdp missing, tc gone, tc ingress missing)"
            ]
        );
        assert_eq!(row.state, "saved");
    }

    #[test]
    fn a_damaged_state_is_a_problem_and_its_links_still_show() {
        let mut found = found(
            Saved::Damaged("state file /x/state.json is damaged".to_owned()),
            Vec::new(),
            vec![
                link("veth0", LinkHook::Xdp, 4),
                link("veth0", LinkHook::Tc, 4),
            ],
        );
        found
            .unreadable
            .push("/p/maps/FLOWS: Permission denied".to_owned());
        let row = row(&found);
        assert_eq!(row.state, "damaged");
        assert_eq!(row.interfaces.len(), 1);
        assert_eq!(row.interfaces[0].ifindex, None);
        assert_eq!(
            row.problems,
            [
                "state file /x/state.json is damaged",
                "/p/maps/FLOWS: Permission denied"
            ]
        );
        let text = render(std::slice::from_ref(&row));
        assert!(
            text.ends_with(
                "\nn1: state file /x/state.json is damaged\nn1: /p/maps/FLOWS: Permission denied"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_listing_totals_memory_and_what_gone_namespaces_hold() {
        assert_eq!(render(&[]), "no instances");
        let mut alive = row(&found(
            attached(&[("eth0", 2)]),
            vec![
                map("maps/FLOWS", 1 << 20, 300_200_000),
                map("maps/FLOWS6", 1 << 17, 30_000_000),
            ],
            vec![
                link("eth0", LinkHook::Xdp, 2),
                link("eth0", LinkHook::Tc, 2),
                link("eth0", LinkHook::TcIngress, 2),
            ],
        ));
        alive.name = "host".to_owned();
        alive.namespace = Namespace::Alive;
        let gone = row(&found(
            attached(&[("veth0", 4)]),
            vec![map("maps/FLOWS", 4096, 29_700_000)],
            vec![
                link("veth0", LinkHook::Xdp, 0),
                link("veth0", LinkHook::Tc, 0),
                link("veth0", LinkHook::TcIngress, 0),
            ],
        ));
        let text = render(&[alive.clone(), gone.clone()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME  NAMESPACE  INTERFACES      FLOWS  FLOWS6  KERNEL MEMORY",
                "host  alive      eth0          1048576  131072       330.2 MB",
                "n1    gone       veth0 (gone)     4096       -        29.7 MB",
                "2 instances, 359.9 MB of kernel memory in pinned maps; 29.7 MB in 1 instance \
                 whose namespace is gone (`lbctl --netns NAME purge` removes one)",
            ]
        );
        let json = serde_json::to_value(Listing::new(&[alive, gone])).unwrap();
        assert_eq!(json["kernel_memory_bytes"], 359_900_000);
        assert_eq!(json["instances"][1]["namespace"], "gone");
        assert_eq!(json["instances"][1]["interfaces"][0]["xdp"], "gone");
        assert_eq!(json["instances"][1]["flow_capacity"], 4096);
        assert_eq!(json["instances"][0]["flow_capacity6"], 1 << 17);
        assert_eq!(
            json["instances"][1]["maps"]["maps/FLOWS"]["memlock_bytes"],
            29_700_000
        );
    }
}
