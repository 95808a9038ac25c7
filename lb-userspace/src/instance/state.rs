//! The persisted state of an instance: the service table, the attached interfaces and the
//! neighbour entries lbctl made. Written
//! atomically (temporary file, fsync, rename), so a crash leaves the old or the new state.
use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions, Permissions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{dataplane::FlowCapacity, host::underlay::NextHop, table::Table};

pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub iface: String,
    /// The interface's index when attached: a different index means the interface was
    /// recreated and its old attachment is gone.
    pub ifindex: u32,
    /// The XDP mode its link was made with (`None`: attached by an lbctl that did not record
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<XdpMode>,
    /// How the frames XDP sends leave it (`None`: as above; decided again at each install).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmit: Option<Transmit>,
    /// `transmit` is lbctl's choice (`attach --transmit auto`), made again at each install;
    /// false: the operator asked for it (or an lbctl that did not record which wrote it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transmit_auto: bool,
}

/// The XDP mode of an interface's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver, before the kernel allocates anything for the frame.
    Native,
    /// In the kernel's receive path, after the frame became an skb (any driver).
    Generic,
}

impl XdpMode {
    /// `native` or `generic`, as the state file and the metrics say it.
    pub const fn name(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

/// How the frames XDP sends (back out, redirected, encapsulated) leave an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transmit {
    /// XDP_TX and redirects, by the driver: the fast path.
    Xdp,
    /// Handed to the TC ingress program, which sends them through the interface's ordinary
    /// transmit path: for interfaces where the driver's XDP transmission cannot deliver.
    Tc,
}

impl Transmit {
    /// `xdp` or `tc`, as the state file and the metrics say it.
    pub const fn name(self) -> &'static str {
        match self {
            Transmit::Xdp => "xdp",
            Transmit::Tc => "tc",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// Size of the flow table the maps were created with.
    pub flow_capacity: u32,
    /// Size of the IPv6 flow tables the maps were created with (`attach --flow-capacity6`);
    /// `None`: their share of `flow_capacity` (see `dataplane::FlowCapacity::new`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_capacity6: Option<u32>,
    pub attachments: Vec<Attachment>,
    pub table: Table,
    /// The managed neighbour entries lbctl made for the next hops towards the other nodes,
    /// so that it deletes those (and only those) when no node needs them any more.
    #[serde(default)]
    pub managed_neighbours: Vec<NextHop>,
    /// The ports lbctl reserved in the namespace's `net.ipv4.ip_local_reserved_ports` (see
    /// `reserved_ports`), so that it removes those (and only those) when no service needs them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub reserved_ports: BTreeSet<u16>,
    /// In a gossiped cluster (`lbctl daemon --cluster`), what this node publishes; `table` is
    /// then the merged table the node applied. `None`: the static table of `lbctl` commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::Local>,
    /// `attach --no-socket-lb`: the node's own clients are not balanced by socket programs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_socket_lb: bool,
}

impl State {
    /// The sizes of the flow tables its maps were created with.
    pub fn flow_tables(&self) -> FlowCapacity {
        FlowCapacity::new(self.flow_capacity, self.flow_capacity6)
    }

    /// The node of the table this instance is: the one whose underlay address is assigned to
    /// an interface of the instance's namespace. Found afresh by every command, so an address
    /// added or moved after `node add` is picked up by the next one.
    pub fn self_node(&self) -> anyhow::Result<Option<&crate::table::Node>> {
        Ok(self
            .table
            .self_node(&crate::host::underlay::local_underlay_addrs()?))
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            format: FORMAT,
            flow_capacity: lb_common::DEFAULT_FLOW_CAPACITY,
            flow_capacity6: None,
            attachments: Vec::new(),
            table: Table::default(),
            managed_neighbours: Vec::new(),
            reserved_ports: BTreeSet::new(),
            cluster: None,
            no_socket_lb: false,
        }
    }
}

/// Reads the state; a missing file is an empty state, a damaged one an error that changes
/// nothing (the operator decides what to do with it).
pub fn load(dir: &Path) -> Result<State> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    // Bytes, not a string: text that is not UTF-8 is a damaged file like any other.
    let state: State = serde_json::from_slice(&text).with_context(|| {
        format!(
            "state file {} is damaged; restore or remove it",
            path.display()
        )
    })?;
    if state.format != FORMAT {
        bail!(
            "state file {} has format {}, this lbctl reads {FORMAT}",
            path.display(),
            state.format
        );
    }
    if let Err(err) = state.table.validate() {
        bail!(
            "state file {} is damaged: {err}; restore or remove it",
            path.display()
        );
    }
    Ok(state)
}

pub fn save(dir: &Path, state: &State) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(state).context("encoding state")?;
    text.push(b'\n');
    write_atomic(dir, STATE_FILE, &text)
}

/// Where `lbctl daemon --cluster` keeps its view of the cluster for `lbctl cluster ls`.
pub const CLUSTER_FILE: &str = "cluster.json";

/// Writes `dir/name` atomically: a temporary file, fsynced, renamed over it.
pub fn write_atomic(dir: &Path, name: &str, text: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    // The mode above applies to a new file only: a temporary file left by a crash keeps its
    // own, and the renamed file takes it. Root's alone, whatever the umask or the leftover.
    file.set_permissions(Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(text))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Removes the state file (purge).
pub fn remove(dir: &Path) -> Result<()> {
    remove_if_present(&dir.join(STATE_FILE))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes the state folder of an instance that is gone for good (its namespace is): the files
/// lbctl keeps there, then the folder itself unless it holds anything else (a `--state-dir`
/// may name a folder of the operator's). Returns whether the folder went.
pub fn remove_folder(dir: &Path) -> Result<bool> {
    for name in [STATE_FILE, CLUSTER_FILE] {
        remove_if_present(&dir.join(name))?;
        remove_if_present(&dir.join(format!(".{name}.tmp")))?;
    }
    remove_if_present(&dir.join(crate::instance::LOCK_FILE))?;
    match fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(false),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Proto, parse_backend};

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lbctl-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A state whose table has a service per `(name, port)`, each with backend 10.0.0.6:80.
    fn state_with(services: &[(&str, u16)]) -> State {
        let mut state = State::default();
        for (name, port) in services {
            state
                .table
                .add_service(
                    name,
                    Proto::Tcp,
                    *port,
                    None,
                    &[parse_backend("10.0.0.6:80").unwrap()],
                )
                .unwrap();
        }
        state
    }

    #[test]
    fn state_round_trips_and_missing_means_empty() {
        let dir = temp_dir("roundtrip");
        assert_eq!(load(&dir).unwrap(), State::default());
        let mut state = state_with(&[("web", 8080)]);
        state.attachments.push(Attachment {
            iface: "eth0".into(),
            ifindex: 7,
            xdp_mode: Some(XdpMode::Native),
            transmit: Some(Transmit::Tc),
            transmit_auto: true,
        });
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_file_is_an_error_and_is_left_alone() {
        let dir = temp_dir("damaged");
        fs::write(dir.join(STATE_FILE), b"{\"format\": 1, \"flow_cap").unwrap();
        let err = format!("{:#}", load(&dir).unwrap_err());
        assert!(err.contains("damaged"), "{err}");
        assert_eq!(
            fs::read(dir.join(STATE_FILE)).unwrap(),
            b"{\"format\": 1, \"flow_cap"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A crash between writing the temporary file and renaming it leaves the old state in
    /// force; the next save replaces the leftover, and the file is root's alone.
    #[test]
    fn a_crash_before_the_rename_leaves_the_old_state() {
        let dir = temp_dir("crash");
        let old = state_with(&[("web", 8080)]);
        save(&dir, &old).unwrap();
        let mut new = old.clone();
        new.table.remove_service("web").unwrap();
        let new_text = serde_json::to_vec_pretty(&new).unwrap();
        let leftover = dir.join(format!(".{STATE_FILE}.tmp"));
        fs::write(&leftover, &new_text[..new_text.len() / 2]).unwrap();
        fs::set_permissions(&leftover, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(&dir).unwrap(), old);

        save(&dir, &new).unwrap();
        assert_eq!(load(&dir).unwrap(), new);
        assert!(!leftover.exists());
        let mode = fs::metadata(dir.join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A file that parses but breaks what the commands keep true (here, two services on one
    /// id, so one slot of the data plane's arrays) is as damaged as a cut one.
    #[test]
    fn a_table_no_command_could_make_is_refused() {
        let dir = temp_dir("inconsistent");
        let mut state = state_with(&[("web", 8080), ("api", 9090)]);
        state.table.services[1].id = state.table.services[0].id;
        let text = serde_json::to_vec(&state).unwrap();
        fs::write(dir.join(STATE_FILE), &text).unwrap();
        let err = format!("{:#}", load(&dir).unwrap_err());
        assert!(err.contains("damaged") && err.contains("id 0"), "{err}");
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), text);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_saved_before_the_mesh_loads_with_mesh_defaults() {
        let dir = temp_dir("premesh");
        fs::write(
            dir.join(STATE_FILE),
            r#"{"format": 1, "flow_capacity": 4096,
                "attachments": [{"iface": "eth0", "ifindex": 7}],
                "table": {"generation": 1, "services": [{"name": "web", "id": 0,
                    "proto": "tcp", "port": 8080, "vip": null,
                    "backends": [{"addr": "10.0.0.6:80", "id": 0}]}],
                    "next_service_id": 1, "next_backend_id": 1}}"#,
        )
        .unwrap();
        let state = load(&dir).unwrap();
        assert!(state.managed_neighbours.is_empty());
        assert!(state.table.nodes.is_empty());
        assert_eq!(state.table.vni, lb_common::DEFAULT_VNI);
        assert_eq!(state.table.vxlan_port, lb_common::DEFAULT_VXLAN_PORT);
        assert_eq!(state.table.services[0].backends[0].node, None);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A state saved before `--flow-capacity6` loads with the IPv6 tables at their share of
    /// the flow capacity, and is saved again without the new field (an older lbctl reads it);
    /// a chosen size is saved and loaded.
    #[test]
    fn a_state_saved_before_flow_capacity6_keeps_the_ipv6_share() {
        let dir = temp_dir("preflowcap6");
        fs::write(
            dir.join(STATE_FILE),
            r#"{"format": 1, "flow_capacity": 65536, "attachments": [],
                "table": {"generation": 1, "services": [],
                    "next_service_id": 0, "next_backend_id": 0}}"#,
        )
        .unwrap();
        let mut state = load(&dir).unwrap();
        assert_eq!(state.flow_capacity6, None);
        assert_eq!(
            state.flow_tables(),
            FlowCapacity {
                ipv4: 65_536,
                ipv6: 8192
            }
        );
        save(&dir, &state).unwrap();
        let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(!text.contains("flow_capacity6"), "{text}");
        assert_eq!(load(&dir).unwrap(), state);

        state.flow_capacity6 = Some(16_384);
        save(&dir, &state).unwrap();
        let loaded = load(&dir).unwrap();
        assert_eq!(loaded, state);
        assert_eq!(
            loaded.flow_tables(),
            FlowCapacity {
                ipv4: 65_536,
                ipv6: 16_384
            }
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
