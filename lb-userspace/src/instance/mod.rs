//! Instances: one per network namespace, where its pins and state live and the lock that
//! serialises commands (this file), and the saved state (`state`). Used by `dataplane`,
//! `commands` and the daemon (the listing of every instance is `commands::instances`).
//!
//! One lbctl instance per network namespace: which namespace, where its pins and state live,
//! and the lock that serialises commands against it.
pub mod state;
use std::{
    fs::{self, File, OpenOptions},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// `statfs` magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs lives on a normal system; lbctl mounts it there when it is missing.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/lbctl";

#[derive(Clone, Debug)]
pub struct Instance {
    /// The network namespace's name (`host` for the initial one).
    pub name: String,
    /// Pinned maps (`maps/`) and links (`links/`).
    pub pin_dir: PathBuf,
    /// `state.json` and the lock file.
    pub state_dir: PathBuf,
}

impl Instance {
    pub fn maps_dir(&self) -> PathBuf {
        self.pin_dir.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }
}

/// Enters `netns` (if given) and works out the instance. Entering is done with `setns` on this
/// thread, keeping lbctl's mount namespace: `ip netns exec` would remount /sys and lose the pins.
pub fn resolve(
    netns: Option<&str>,
    state_dir: Option<PathBuf>,
    bpffs: Option<PathBuf>,
) -> Result<Instance> {
    let name = match netns {
        Some(name) => {
            enter_netns(name)?;
            name.to_owned()
        }
        None => current_netns_name()?,
    };
    locate(&name, state_dir, bpffs)
}

/// The instance of the namespace named `name`, without entering it (it may be gone): where its
/// pins and state are. The state folder is `state_dir` if given, else the default one.
pub fn locate(name: &str, state_dir: Option<PathBuf>, bpffs: Option<PathBuf>) -> Result<Instance> {
    validate_netns_name(name)?;
    let bpffs = bpffs.unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS));
    Ok(Instance {
        pin_dir: bpffs.join("lbctl").join(name),
        state_dir: state_dir.unwrap_or_else(|| Path::new(DEFAULT_STATE_ROOT).join(name)),
        name: name.to_owned(),
    })
}

/// [`locate`] for an instance lbctl does not enter (its namespace may be gone): without
/// `state_dir`, the state folder its pins recorded, else the default one.
pub fn locate_without_entering(
    name: &str,
    state_dir: Option<PathBuf>,
    bpffs: Option<PathBuf>,
) -> Result<Instance> {
    let given = state_dir.is_some();
    let mut instance = locate(name, state_dir, bpffs)?;
    if !given && let Some(recorded) = recorded_state_dir(&instance.pin_dir) {
        instance.state_dir = recorded;
    }
    Ok(instance)
}

/// A namespace's name becomes a folder name under bpffs and the state root.
fn validate_netns_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("invalid network namespace name '{name}'");
    }
    Ok(())
}

/// Where `ip netns` keeps its named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";
/// The instance name of the initial network namespace.
pub const HOST: &str = "host";
/// How lbctl names a namespace that `ip netns` does not know: by its inode.
const INODE_NAME_PREFIX: &str = "netns-";

fn enter_netns(name: &str) -> Result<()> {
    validate_netns_name(name)?;
    let path = netns_handle(name).unwrap_or_else(|| Path::new(NETNS_RUN_DIR).join(name));
    let file = File::open(&path)
        .with_context(|| format!("network namespace '{name}' not found ({})", path.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace '{name}'"))
}

/// A file through which the namespace of instance `name` can be entered, if the namespace
/// exists: `/run/netns/NAME`; for `host`, the initial namespace; for `netns-<inode>` (the name
/// lbctl gives a namespace `ip netns` does not know), a bind mount of the namespace with that
/// inode or a process in it.
pub fn netns_handle(name: &str) -> Option<PathBuf> {
    let named = Path::new(NETNS_RUN_DIR).join(name);
    if named.exists() {
        return Some(named);
    }
    if name == HOST {
        return Some(PathBuf::from("/proc/1/ns/net"));
    }
    let inode: u64 = name.strip_prefix(INODE_NAME_PREFIX)?.parse().ok()?;
    netns_by_inode(inode)
}

/// A file of the network namespace whose inode is `inode`: a bind mount of it (Docker's
/// `/run/docker/netns/*`, for one), else `/proc/PID/ns/net` of a process in it.
fn netns_by_inode(inode: u64) -> Option<PathBuf> {
    // Every namespace file is on the one nsfs, so the device tells them from other files.
    let nsfs = fs::metadata("/proc/self/ns/net").ok()?.dev();
    let is_it = |path: &Path| fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (nsfs, inode));
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(mount) = netns_mounts(&mountinfo, inode)
        .into_iter()
        .find(|path| is_it(path))
    {
        return Some(mount);
    }
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|entry| entry.path().join("ns/net"))
        .find(|path| is_it(path))
}

/// The mount points of network namespace `inode` in a `/proc/PID/mountinfo` text: nsfs mounts
/// whose root is `net:[INODE]`.
fn netns_mounts(mountinfo: &str, inode: u64) -> Vec<PathBuf> {
    let root = format!("net:[{inode}]");
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fields: Vec<&str> = mount.split(' ').collect();
            let point = fields.get(4)?;
            (fs.split(' ').next() == Some("nsfs") && fields.get(3) == Some(&root.as_str()))
                .then(|| PathBuf::from(unescape_mountinfo(point)))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes of space, tab, newline and backslash (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Where an instance's pin folder records its state folder (a symlink: bpffs takes no files),
/// so that `lbctl instances` and the purge of an instance whose namespace is gone find a state
/// kept elsewhere than the default (`--state-dir`) without being told.
const STATE_LINK: &str = "state";

/// Records the instance's state folder in its pin folder (see [`STATE_LINK`]).
pub fn record_state_dir(instance: &Instance) -> Result<()> {
    let target = fs::canonicalize(&instance.state_dir)
        .with_context(|| format!("reading {}", instance.state_dir.display()))?;
    let link = instance.pin_dir.join(STATE_LINK);
    if fs::read_link(&link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    match fs::remove_file(&link) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("replacing {}", link.display()));
        }
        _ => {}
    }
    std::os::unix::fs::symlink(&target, &link)
        .with_context(|| format!("recording the state folder in {}", link.display()))
}

/// The state folder recorded in `pin_dir` (see [`STATE_LINK`]), if any.
pub fn recorded_state_dir(pin_dir: &Path) -> Option<PathBuf> {
    fs::read_link(pin_dir.join(STATE_LINK)).ok()
}

/// The name of the namespace lbctl runs in: `host`, the name `ip netns` knows it by, or
/// `netns-<inode>`.
fn current_netns_name() -> Result<String> {
    let ours = fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    let host = fs::metadata("/proc/1/ns/net").context(
        "reading /proc/1/ns/net (to tell the host's namespace from others): run lbctl as root \
         in the host's namespaces and name the instance with --netns NAME, not under \
         `ip netns exec`, which also hides the pins by remounting /sys",
    )?;
    if (ours.dev(), ours.ino()) == (host.dev(), host.ino()) {
        return Ok(HOST.to_owned());
    }
    if let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) {
        for entry in entries.flatten() {
            if let Ok(meta) = fs::metadata(entry.path())
                && (meta.dev(), meta.ino()) == (ours.dev(), ours.ino())
                && let Some(name) = entry.file_name().to_str()
            {
                return Ok(name.to_owned());
            }
        }
    }
    Ok(format!("{INODE_NAME_PREFIX}{}", ours.ino()))
}

/// Makes sure `pin_dir` sits on a BPF filesystem, mounting bpffs at /sys/fs/bpf if that is
/// where it belongs and nothing is mounted yet (a fresh machine).
pub fn ensure_bpffs(instance: &Instance) -> Result<()> {
    let root = instance
        .pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    if fs_magic(&root)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if instance.pin_dir.starts_with(DEFAULT_BPFFS)
        && fs_magic(Path::new(DEFAULT_BPFFS))? != BPF_FS_MAGIC
    {
        return mount_fs("bpf", Path::new(DEFAULT_BPFFS)).context("mounting bpffs at /sys/fs/bpf");
    }
    bail!(
        "{} is not on a BPF filesystem: mount one (mount -t bpf bpf DIR) or use --bpffs",
        root.display()
    )
}

/// Mounts a filesystem of type `fstype` (its source named alike) at `target`, no options.
pub fn mount_fs(fstype: &str, target: &Path) -> Result<()> {
    nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )?;
    Ok(())
}

fn fs_magic(path: &Path) -> Result<i64> {
    let stat =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stat.filesystem_type().0 as i64)
}

/// Creates a folder (and its missing parents) readable by root only. A folder that already
/// exists is made so too: `--state-dir` may name one made with the usual 0755.
pub fn create_private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))?;
    make_private(path, 0o700)
}

/// Takes group and other permissions off `path`, leaving the owner's as `mode` says.
fn make_private(path: &Path, mode: u32) -> Result<()> {
    let current = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions();
    if current.mode() & 0o777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("making {} root's alone", path.display()))?;
    }
    Ok(())
}

/// A lock on the instance, held until dropped. Changes take it exclusively, so that two lbctl
/// commands never interleave their read-modify-write of the state and maps; listings take it
/// shared, so that they never show a state that is saved but not yet applied to the maps.
pub struct Lock(#[expect(dead_code, reason = "held for its flock")] nix::fcntl::Flock<File>);

/// The exclusive lock, for changes.
pub fn lock(instance: &Instance) -> Result<Lock> {
    lock_as(instance, nix::fcntl::FlockArg::LockExclusive)
}

/// The shared lock, for reading a consistent state and maps.
pub fn lock_shared(instance: &Instance) -> Result<Lock> {
    lock_as(instance, nix::fcntl::FlockArg::LockShared)
}

/// The lock file, in the state folder.
pub const LOCK_FILE: &str = "lock";

fn lock_as(instance: &Instance, operation: nix::fcntl::FlockArg) -> Result<Lock> {
    create_private_dir(&instance.state_dir)?;
    let path = instance.state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    make_private(&path, 0o600)?;
    let locked = nix::fcntl::Flock::lock(file, operation)
        .map_err(|(_, errno)| errno)
        .context("locking the instance")?;
    Ok(Lock(locked))
}

/// Capabilities lbctl uses (`include/uapi/linux/capability.h`): interfaces, XDP, TC and
/// neighbours; setns, mounting bpffs and BPF without CAP_BPF; BPF itself.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// lbctl changes kernel state and keeps root-only files: say so plainly, before anything else,
/// rather than fail deep inside a syscall. Root without the capabilities (a container without
/// privileges, a bounding set that dropped them) is told apart.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("lbctl needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run with sudo");
    }
    // The kernel takes CAP_SYS_ADMIN for CAP_BPF (before 5.8 there was no CAP_BPF).
    let missing: Vec<&str> = match effective_capabilities() {
        Some(caps) => {
            let has = |cap: u32| caps & (1 << cap) != 0;
            [
                (has(CAP_NET_ADMIN), "CAP_NET_ADMIN"),
                (has(CAP_SYS_ADMIN), "CAP_SYS_ADMIN"),
                (has(CAP_BPF) || has(CAP_SYS_ADMIN), "CAP_BPF"),
            ]
            .into_iter()
            .filter(|(held, _)| !held)
            .map(|(_, name)| name)
            .collect()
        }
        None => Vec::new(),
    };
    if !missing.is_empty() {
        bail!(
            "lbctl needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): this root process lacks {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The effective capability set (`CapEff` of /proc/self/status), if it can be read.
fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The index of interface `iface` in this thread's namespace, the instance's.
pub fn ifindex_of(instance: &Instance, iface: &str) -> Result<u32> {
    if iface.contains('\0') {
        bail!("invalid interface name '{iface}'");
    }
    nix::net::if_::if_nametoindex(iface).map_err(|_| {
        anyhow!(
            "interface '{iface}' not found in network namespace '{}'",
            instance.name
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_mounts_are_found_by_inode() {
        let mountinfo = "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
            47 46 0:4 net:[4026532178] /run/netns/n1 rw shared:2 - nsfs nsfs rw\n\
            48 46 0:4 net:[4026532179] /run/netns/n2 rw shared:2 - nsfs nsfs rw\n\
            49 25 0:4 net:[4026532178] /run/docker/netns/with\\040space rw - nsfs nsfs rw\n\
            50 25 0:4 mnt:[4026532178] /run/other rw - nsfs nsfs rw\n\
            51 25 0:30 net:[4026532178] /mnt/not-nsfs rw - tmpfs tmpfs rw\n";
        assert_eq!(
            netns_mounts(mountinfo, 4_026_532_178),
            [
                PathBuf::from("/run/netns/n1"),
                PathBuf::from("/run/docker/netns/with space")
            ]
        );
        assert!(netns_mounts(mountinfo, 4_026_532_180).is_empty());
        assert!(netns_mounts("garbage\n - \n", 1).is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mountinfo("/a\\040b\\011c\\012d\\134e"),
            "/a b\tc\nd\\e"
        );
        // A backslash that starts no escape stays.
        assert_eq!(unescape_mountinfo("/a\\9x\\"), "/a\\9x\\");
    }

    #[test]
    fn a_namespace_name_is_one_folder_name() {
        for bad in ["", ".", "..", "a/b", "/"] {
            assert!(locate(bad, None, None).is_err(), "{bad:?}");
        }
        let instance = locate("n1", None, Some(PathBuf::from("/b"))).unwrap();
        assert_eq!(instance.pin_dir, Path::new("/b/lbctl/n1"));
        assert_eq!(instance.state_dir, Path::new(DEFAULT_STATE_ROOT).join("n1"));
    }

    /// A name lbctl never gives and `ip netns` does not know has no namespace; `host` always
    /// has one.
    #[test]
    fn only_existing_namespaces_have_a_handle() {
        assert!(netns_handle(HOST).is_some());
        assert_eq!(netns_handle("netns-1"), None);
        assert_eq!(netns_handle("netns-x"), None);
        assert_eq!(netns_handle("lbctl-no-such-namespace"), None);
        let ours = fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(netns_handle(&format!("{INODE_NAME_PREFIX}{ours}")).is_some());
    }
}
