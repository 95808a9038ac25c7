//! Socket load balancing from userspace: the socket programs (`lb-ebpf/src/socklb.rs`) on the
//! cgroup v2 root, as links pinned beside the instance's interface links; the namespace they
//! act on (its cookie, in `SOCKET_LB`); and their removal. Called by `install` (attach,
//! upgrade) and by the commands that detach the last interface or purge.
use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use lb_common::program_names;

use crate::instance::{self, Instance};

/// `SO_NETNS_COOKIE` (asm-generic/socket.h, Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The pin name of the link of each socket program.
const PINS: [(&str, &str); 4] = [
    (program_names::SOCK_CONNECT, "socket_connect4"),
    (program_names::SOCK_SENDMSG, "socket_sendmsg4"),
    (program_names::SOCK_RECVMSG, "socket_recvmsg4"),
    (program_names::SOCK_GETPEERNAME, "socket_getpeername4"),
];

/// Where a new link is pinned before it replaces the old one (bpffs refuses a '.').
const NEW_SUFFIX: &str = "_new";

/// The pin paths of the instance's socket links.
pub fn link_pins(instance: &Instance) -> [PathBuf; 4] {
    let dir = instance.links_dir();
    PINS.map(|(_, pin)| dir.join(pin))
}

/// Whether `file_name` is the pin of a socket link.
pub fn is_link_pin(file_name: &str) -> bool {
    PINS.iter().any(|(_, pin)| *pin == file_name)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("object has no socket program {name}"))?
        .try_into()?)
}

/// Loads this object's socket programs (the kernel verifies them) and attaches them to the
/// cgroup v2 root, each link pinned in place of the instance's earlier one. All four are
/// attached before any is pinned: a failure leaves the earlier links (or none) as they were.
/// The new links run before the old ones go: for that instant a call may meet both programs,
/// and the second sees a backend's address, which it leaves alone.
pub fn install(ebpf: &mut Ebpf, instance: &Instance) -> Result<()> {
    let root = cgroup_root()?;
    let mut links = Vec::new();
    for (name, _) in PINS {
        let program = program(ebpf, name)?;
        program
            .load()
            .with_context(|| format!("loading the socket program {name} (verifier)"))?;
        // A link (the kernel has had them for cgroups since 5.7) takes no attach flags: its
        // programs always run beside every other program on the cgroup.
        let id = program
            .attach(&root, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to the cgroup v2 root"))?;
        let link: FdLink = program.take_link(id)?.try_into()?;
        links.push(link);
    }
    for (link, pin) in links.into_iter().zip(link_pins(instance)) {
        let staged = staged_pin(&pin);
        let _ = fs::remove_file(&staged);
        link.pin(&staged)
            .with_context(|| format!("pinning {}", staged.display()))?;
        fs::rename(&staged, &pin)
            .with_context(|| format!("moving {} to {}", staged.display(), pin.display()))?;
    }
    Ok(())
}

/// Where a new link is pinned before it replaces `pin`.
fn staged_pin(pin: &Path) -> PathBuf {
    pin.with_file_name(format!(
        "{}{NEW_SUFFIX}",
        pin.file_name().and_then(|n| n.to_str()).unwrap_or_default()
    ))
}

/// Unpins the instance's socket links, which detaches the programs. Nothing to do when there
/// are none.
pub fn remove(instance: &Instance) -> Result<()> {
    for pin in link_pins(instance) {
        let staged = staged_pin(&pin);
        for path in [pin, staged] {
            match PinnedLink::from_pin(&path) {
                Ok(link) => {
                    link.unpin()
                        .with_context(|| format!("unpinning {}", path.display()))?;
                }
                Err(_) if path.exists() => {
                    fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
                Err(_) => {}
            }
        }
    }
    Ok(())
}

/// Whether the instance has any of its socket links.
pub fn is_installed(instance: &Instance) -> bool {
    link_pins(instance).iter().any(|pin| pin.exists())
}

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE` of a socket made in it):
/// what the socket programs compare a socket's namespace with.
pub fn netns_cookie() -> Result<u64> {
    let fd = crate::host::netdev::udp_socket()?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: writes at most `len` bytes to `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+)");
    }
    Ok(cookie)
}

/// A descriptor of the cgroup v2 root: of a cgroup2 mount of the root (systemd's
/// `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`), else of a mount made for the moment and
/// undone at once (a cgroup v1 host: every process is in the v2 root all the same).
fn cgroup_root() -> Result<fs::File> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if let Some(mount) = cgroup2_root_mount(&mountinfo) {
        return fs::File::open(&mount).with_context(|| format!("opening {mount}"));
    }
    let dir = std::env::temp_dir().join(format!("lbctl-cgroup2-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let opened = mount_and_open(&dir);
    let _ = fs::remove_dir(&dir);
    opened
}

fn mount_and_open(dir: &Path) -> Result<fs::File> {
    instance::mount_fs("cgroup2", dir).with_context(|| {
        format!(
            "mounting cgroup2 at {} for the socket programs (use --no-socket-lb to go without)",
            dir.display()
        )
    })?;
    let opened = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()));
    // Lazily: the descriptor keeps what it needs.
    let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
    opened
}

/// The mount point of a cgroup2 filesystem mounted at its root, from `/proc/self/mountinfo`.
fn cgroup2_root_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split(' ').collect();
        let fstype = fs.split(' ').next()?;
        (fstype == "cgroup2" && fields.get(3) == Some(&"/")).then(|| {
            // mountinfo escapes spaces and the like as octal.
            fields.get(4).map(|p| p.replace("\\040", " "))
        })?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_root_mount_is_found_and_a_subtree_mount_is_not() {
        let hybrid = "\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_root_mount(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let container = "40 1 0:30 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root_mount(container), None);
        let v1 = "32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_root_mount(v1), None);
    }

    #[test]
    fn socket_link_pins_are_told_from_interface_link_pins() {
        for (_, pin) in PINS {
            assert!(is_link_pin(pin));
            assert_eq!(crate::dataplane::install::link_pin_of(pin), None, "{pin}");
        }
        assert!(!is_link_pin("eth0_xdp"));
    }
}
