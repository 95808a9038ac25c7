//! One lbctl instance per network namespace: which namespace, where its pins and state live,
//! and the lock that serialises commands against it.
use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    os::{
        fd::AsRawFd as _,
        unix::fs::{
            DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
        },
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

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
    let bpffs = bpffs.unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS));
    Ok(Instance {
        pin_dir: bpffs.join("lbctl").join(&name),
        state_dir: state_dir.unwrap_or_else(|| Path::new(DEFAULT_STATE_ROOT).join(&name)),
        name,
    })
}

fn enter_netns(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("invalid network namespace name '{name}'");
    }
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path)
        .with_context(|| format!("network namespace '{name}' not found ({})", path.display()))?;
    // SAFETY: plain syscall on a file descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering network namespace '{name}'"));
    }
    Ok(())
}

/// The name of the namespace lbctl runs in: `host`, the name `ip netns` knows it by, or
/// `netns-<inode>`.
fn current_netns_name() -> Result<String> {
    let ours = fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    let host = fs::metadata("/proc/1/ns/net").context("reading /proc/1/ns/net")?;
    if (ours.dev(), ours.ino()) == (host.dev(), host.ino()) {
        return Ok("host".to_owned());
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            if let Ok(meta) = fs::metadata(entry.path())
                && (meta.dev(), meta.ino()) == (ours.dev(), ours.ino())
                && let Some(name) = entry.file_name().to_str()
            {
                return Ok(name.to_owned());
            }
        }
    }
    Ok(format!("netns-{}", ours.ino()))
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
        let src = CString::new("bpf").expect("no NUL");
        let target = CString::new(DEFAULT_BPFFS).expect("no NUL");
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
        }
        return Ok(());
    }
    bail!(
        "{} is not on a BPF filesystem: mount one (mount -t bpf bpf DIR) or use --bpffs",
        root.display()
    )
}

fn fs_magic(path: &Path) -> Result<i64> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).context("path with NUL")?;
    // SAFETY: statfs fills the zeroed struct we pass.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type as i64)
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
pub struct Lock(#[expect(dead_code, reason = "held for its flock")] File);

/// The exclusive lock, for changes.
pub fn lock(instance: &Instance) -> Result<Lock> {
    lock_as(instance, libc::LOCK_EX)
}

/// The shared lock, for reading a consistent state and maps.
pub fn lock_shared(instance: &Instance) -> Result<Lock> {
    lock_as(instance, libc::LOCK_SH)
}

fn lock_as(instance: &Instance, operation: libc::c_int) -> Result<Lock> {
    create_private_dir(&instance.state_dir)?;
    let path = instance.state_dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    make_private(&path, 0o600)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the instance");
    }
    Ok(Lock(file))
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
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
