//! Network namespaces owned by the running test, deleted when dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::{require_root, unique_prefix};

/// First component of every namespace name the harness creates.
pub(crate) const PREFIX: &str = "lbt";

/// Where `ip netns` keeps the namespace handles (bind mounts of
/// `/proc/<pid>/ns/net`).
const NETNS_RUN_DIR: &str = "/run/netns";

/// Linux limit on interface names (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// A network namespace this process created, named
/// `lbt-<pid>-<counter>-<role>`; dropping it deletes it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Deleted already ([`NetNs::delete`]): nothing for the drop to do.
    deleted: bool,
}

impl NetNs {
    /// Creates a fresh namespace with `lo` up. `role` (e.g. "client",
    /// "node", "b0") only makes the name readable in `ip netns list`.
    pub fn new(role: &str) -> Result<NetNs> {
        require_root()?;
        if role.is_empty()
            || !role
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("namespace role {role:?} must be non-empty ASCII letters, digits, '-' or '_'");
        }
        let name = format!("{}-{role}", unique_prefix());
        {
            // The first `ip netns add` on a machine makes /run/netns a shared
            // mount; two running at once (parallel tests) can race on that.
            static CREATE: Mutex<()> = Mutex::new(());
            let _guard = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        }
        // From here on, Drop deletes the namespace if a later step fails.
        let ns = NetNs {
            name,
            deleted: false,
        };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name, as `ip netns` and `lbctl --netns` know it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace now (`ip netns del`), as an operator may before `lbctl purge`.
    /// Like the drop's, this only removes its name: the kernel dismantles it (and its
    /// interfaces) once nothing else holds it, a moment later.
    pub fn delete(&mut self) -> Result<()> {
        run_checked(Command::new("ip").args(["netns", "del", &self.name]))?;
        self.deleted = true;
        Ok(())
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout; fails with the
    /// command line and stderr when `ip` exits non-zero.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.iproute2("ip", args)
    }

    /// Runs `bridge -n NAME ARGS...` (e.g. VXLAN forwarding database
    /// entries) and returns its stdout, failing like [`NetNs::ip`].
    pub fn bridge<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.iproute2("bridge", args)
    }

    /// The MAC address of interface `ifname` of this namespace.
    ///
    /// It is parsed from `ip -o link show dev IFNAME` (the word after
    /// `link/ether`). Reading `/sys/class/net/IFNAME/address` inside
    /// [`NetNs::in_netns`] would not work: sysfs shows the interfaces of the
    /// namespace it was mounted in, and `setns` does not remount it (only
    /// `ip netns exec` does).
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let out = self.ip(["-o", "link", "show", "dev", ifname])?;
        let mut words = out.split_whitespace();
        words
            .find(|w| *w == "link/ether")
            .and_then(|_| words.next())
            .with_context(|| format!("no link/ether address for {ifname} in {out:?}"))
            .and_then(parse_mac)
            .with_context(|| format!("MAC address of {ifname} in namespace {}", self.name))
    }

    /// Runs a command inside the namespace (`ip netns exec NAME ARGS...`)
    /// and returns its output whatever its exit status, for the caller to
    /// judge.
    ///
    /// Note that `ip netns exec` gives the command a private `/sys`, so a
    /// bpffs mounted at `/sys/fs/bpf` is not visible there.
    pub fn exec<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.exec_command(args);
        cmd.output()
            .with_context(|| format!("cannot run {}", describe(&cmd)))
    }

    /// Starts a command inside the namespace in the background (for
    /// servers), with stdin closed, stdout piped to the caller and stderr
    /// inherited so its diagnostics show up in the test output.
    ///
    /// `ip netns exec` execs the command in place, so the returned child's
    /// pid is the command's own and killing it kills the command.
    pub fn spawn<I, S>(&self, args: I) -> Result<Child>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.exec_command(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd.spawn()
            .with_context(|| format!("cannot start {}", describe(&cmd)))
    }

    /// Adds a veth pair `name`/`peer` inside this namespace, both ends up: an interface to
    /// attach lbctl to when no traffic needs to cross it.
    pub fn add_veth_pair(&self, name: &str, peer: &str) -> Result<()> {
        self.ip(["link", "add", name, "type", "veth", "peer", "name", peer])?;
        self.ip(["link", "set", name, "up"])?;
        self.ip(["link", "set", peer, "up"])?;
        Ok(())
    }

    /// Sets a sysctl of this namespace (`sysctl -qw KEY=VALUE` inside it);
    /// `net.*` keys are per namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run_checked(&mut self.exec_command(["sysctl", "-qw", &format!("{key}={value}")]))?;
        Ok(())
    }

    /// Runs `f` on a fresh thread that first enters this namespace, so the
    /// sockets `f` creates live in it, and returns what `f` returns.
    ///
    /// A thread is used because `setns(CLONE_NEWNET)` changes the namespace
    /// of the calling thread only: the caller's own thread stays where it
    /// is. Panics (loudly, never running `f` elsewhere) if the namespace
    /// cannot be entered; a panic inside `f` is propagated.
    pub fn in_netns<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        in_named_netns(&self.name, f)
    }

    /// Turns TX checksum offload off on interface `ifname` of this
    /// namespace.
    ///
    /// With offload on, a veth sender hands the frame over with only a
    /// partial checksum (the pseudo-header sum, `CHECKSUM_PARTIAL`) because
    /// it trusts the "hardware" to finish it. XDP on the receiving side sees
    /// the raw bytes with that invalid checksum, and a load balancer that
    /// updates checksums incrementally would produce garbage. Real senders on
    /// a real network put full checksums on the wire, so the test senders
    /// are made to do the same.
    pub fn disable_tx_offload(&self, ifname: &str) -> Result<()> {
        let mut cmd = self.exec_command(["ethtool", "-K", ifname, "tx", "off"]);
        run_checked(&mut cmd).context("is ethtool installed? (`cargo xtask setup` installs it)")?;
        Ok(())
    }

    /// Packets interface `ifname` of this namespace received, from its sysfs statistics (read
    /// through `ip netns exec`, which mounts the namespace's own /sys: after `setns` alone,
    /// /sys still shows the caller's interfaces).
    pub fn rx_packets(&self, ifname: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{ifname}/statistics/rx_packets");
        let out = self.exec(["cat", &path])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("{path} in {}: {text:?}", self.name))
    }

    /// Attaches a two-instruction XDP program that passes every frame to interface `ifname`
    /// of this namespace, for as long as the returned link stays open.
    ///
    /// A veth takes the frames its peer sends back with `XDP_TX` only when it runs an XDP
    /// program itself: the kernel kicks the receiving queue after `XDP_TX` only then
    /// (`veth_xdp_flush`), and without it the frames sit in the queue. A real NIC needs nothing
    /// of the kind. The program is loaded with raw `bpf(2)` calls because the harness does not
    /// depend on aya (see the crate documentation).
    pub fn attach_xdp_pass(&self, ifname: &str) -> Result<OwnedFd> {
        self.attach_xdp_action(ifname, crate::bpf::XDP_PASS)
    }

    /// Attaches a two-instruction XDP program returning `action` for every frame (a sink that
    /// drops, a bare `XDP_TX` bounce) to interface `ifname` of this namespace, for as long as
    /// the returned link stays open.
    pub fn attach_xdp_action(&self, ifname: &str, action: u32) -> Result<OwnedFd> {
        let ifname = ifname.to_owned();
        self.in_netns(move || {
            let ifindex = if_index(&ifname)?;
            let prog = crate::bpf::load_xdp_action(action)?;
            crate::bpf::link_xdp(&prog, ifindex)
                .with_context(|| format!("cannot attach XDP ({action}) to {ifname}"))
        })
        .with_context(|| format!("in namespace {}", self.name))
    }

    /// Frames the XDP program of veth `ifname` dropped, over its receive queues (its driver's
    /// `rx_queue_N_xdp_drops`, read with `ethtool -S`).
    pub fn xdp_drops(&self, ifname: &str) -> Result<u64> {
        let out = self.exec(["ethtool", "-S", ifname])?;
        if !out.status.success() {
            bail!(
                "ethtool -S {ifname} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.trim().split_once(':'))
            .filter(|(name, _)| name.starts_with("rx_queue_") && name.ends_with("_xdp_drops"))
            .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
            .sum())
    }

    /// `TOOL -n NAME ARGS...` (an iproute2 tool run against this namespace),
    /// run and checked.
    fn iproute2<I, S>(&self, tool: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_checked(Command::new(tool).arg("-n").arg(&self.name).args(args))
    }

    /// `ip netns exec NAME ARGS...`, not yet run, for a caller that sets up
    /// its own stdio.
    pub(crate) fn exec_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }
}

impl Drop for NetNs {
    /// Deletes the namespace; a failure is reported on stderr but never
    /// panics, since drop may run while a failed test is already unwinding.
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: cannot run `ip netns del {}`: {e}", self.name),
        }
    }
}

/// Creates a veth pair with end `a_if` directly in namespace `a` and end
/// `b_if` in `b`, and sets both up.
///
/// Creating the ends in their namespaces (instead of moving them after)
/// means no interface ever appears in the caller's own namespace.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    for ifname in [a_if, b_if] {
        if ifname.is_empty() || ifname.len() > MAX_IFNAME_LEN {
            bail!("interface name {ifname:?} must be 1 to {MAX_IFNAME_LEN} bytes");
        }
    }
    run_checked(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]))?;
    a.ip(["link", "set", a_if, "up"])?;
    b.ip(["link", "set", b_if, "up"])?;
    Ok(())
}

/// Parses a MAC address written `aa:bb:cc:dd:ee:ff` (as `ip` prints it).
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .with_context(|| format!("MAC address {text:?} has fewer than 6 bytes"))?;
        // from_str_radix alone would also take "+f".
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("MAC address {text:?}: {part:?} is not two hex digits");
        }
        *byte = u8::from_str_radix(part, 16)?;
    }
    if parts.next().is_some() {
        bail!("MAC address {text:?} has more than 6 bytes");
    }
    Ok(mac)
}

/// Writes a MAC address as `aa:bb:cc:dd:ee:ff`, the form `ip` and `bridge`
/// take.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Where lbctl pins each instance's maps and links, by namespace name (see
/// [`Lbctl::pin_dir`](crate::Lbctl::pin_dir)).
const LBCTL_PIN_ROOT: &str = "/sys/fs/bpf/lbctl";

/// Deletes what test runs that were killed before their Drop ran left behind:
/// the namespaces named `lbt-<pid>-*` whose process is gone, then the lbctl
/// instances pinned for such namespaces (`lbctl purge`: their maps, links and
/// state folder; a killed mesh test leaves about 400 MB of kernel memory per
/// node). Returns how many namespaces and instances it removed. Those of live
/// processes, including this one, are left alone.
pub fn sweep_stale() -> Result<usize> {
    let stale = stale_names(NETNS_RUN_DIR)?;
    let instances = stale_names(LBCTL_PIN_ROOT)?;
    if !stale.is_empty() || !instances.is_empty() {
        require_root()?;
    }
    for name in &stale {
        // A server a killed test left running there (a dockerd) would outlive the name.
        if let Ok(pids) = run_checked(Command::new("ip").args(["netns", "pids", name])) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok())
            {
                // SAFETY: a plain kill(2) of a process in a namespace only the tests make.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        run_checked(Command::new("ip").args(["netns", "del", name]))?;
    }
    for name in &instances {
        let lbctl = crate::lbctl_path()?;
        run_checked(Command::new(lbctl).args(["--netns", name, "purge"]))?;
    }
    Ok(stale.len() + instances.len())
}

/// The entries of folder `dir` named for a harness process that is gone
/// (`lbt-<pid>-*`, see [`owner_pid`]); none if the folder does not exist.
fn stale_names(dir: &str) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Nothing of the kind was ever created on this machine.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("cannot list {dir}")),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {dir}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = owner_pid(&name)
            && !process_alive(pid)
        {
            stale.push(name);
        }
    }
    Ok(stale)
}

/// The pid in a harness namespace name `lbt-<pid>-<counter>-<role>`, or
/// `None` for any other name.
fn owner_pid(name: &str) -> Option<libc::pid_t> {
    let mut parts = name.splitn(4, '-');
    if parts.next()? != PREFIX {
        return None;
    }
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next()?;
    Some(pid)
}

/// Whether process `pid` exists (signal 0 checks without sending anything;
/// EPERM means it exists but belongs to someone else).
fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: kill with signal 0 only performs the existence and permission
    // checks.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// [`NetNs::in_netns`] for a namespace known by name only, for harness
/// pieces that keep the name rather than a borrow of the [`NetNs`] (like
/// [`Lbctl`](crate::Lbctl), so they can sit next to it in a fixture).
pub(crate) fn in_named_netns<F, R>(name: &str, f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let path = format!("{NETNS_RUN_DIR}/{name}");
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            if let Err(e) = enter_netns(&path) {
                panic!("cannot enter network namespace {path}: {e:#}");
            }
            f()
        });
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &str) -> Result<()> {
    let file = File::open(path)?;
    // SAFETY: the fd is valid for the duration of the call; setns only
    // changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails with the command line, exit
/// status and stderr if it does not exit 0.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line of `cmd` for error messages, e.g. `` `ip -n x link` ``.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    format!("`{}`", words.join(" "))
}

/// The index of interface `ifname` in the calling thread's namespace.
pub fn if_index(ifname: &str) -> Result<u32> {
    let name = std::ffi::CString::new(ifname).context("interface name contains NUL")?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!("no interface {ifname}"),
        index => Ok(index),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_harness_names_only() {
        assert_eq!(owner_pid("lbt-1234-0-client"), Some(1234));
        assert_eq!(owner_pid("lbt-1234-17-b-0"), Some(1234));
        assert_eq!(owner_pid("lbt-1234-17"), None);
        assert_eq!(owner_pid("lbt-x-0-client"), None);
        assert_eq!(owner_pid("other-1234-0-client"), None);
    }

    #[test]
    fn macs_parse_and_format() {
        let mac = [0x02, 0x42, 0xac, 0x11, 0x00, 0xff];
        assert_eq!(parse_mac("02:42:ac:11:00:ff").unwrap(), mac);
        assert_eq!(parse_mac("02:42:AC:11:00:FF").unwrap(), mac);
        assert_eq!(format_mac(mac), "02:42:ac:11:00:ff");
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:ff:01",
            "2:42:ac:11:00:ff",
            "0g:42:ac:11:00:ff",
            "+2:42:ac:11:00:ff",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    /// A namespace left by a dead process goes, and so does the lbctl
    /// instance attached in it (pinned maps and state folder); this
    /// process's stay. Needs root and the built lbctl.
    #[test]
    fn sweep_stale_deletes_only_namespaces_and_instances_of_dead_processes() {
        let mine = NetNs::new("sweep").unwrap();
        // A pid that was alive a moment ago and is not any more.
        let mut child = Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let stale = format!("{PREFIX}-{dead_pid}-0-sweep");
        run_checked(Command::new("ip").args(["netns", "add", &stale])).unwrap();
        run_checked(Command::new("ip").args([
            "-n", &stale, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]))
        .unwrap();
        run_checked(Command::new("ip").args(["-n", &stale, "link", "set", "v0", "up"])).unwrap();
        let state_dir = std::env::temp_dir().join(format!("{PREFIX}-{dead_pid}-1-state"));
        run_checked(Command::new(crate::lbctl_path().unwrap()).args([
            "--netns",
            &stale,
            "--state-dir",
            state_dir.to_str().unwrap(),
            "attach",
            "v0",
            "--flow-capacity",
            "4096",
        ]))
        .unwrap();
        let pins = std::path::Path::new(LBCTL_PIN_ROOT).join(&stale);
        assert!(pins.exists());

        assert!(sweep_stale().unwrap() >= 2);
        let left: Vec<String> = std::fs::read_dir(NETNS_RUN_DIR)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.contains(&stale), "{stale} survived: {left:?}");
        assert!(left.iter().any(|n| n == mine.name()), "{left:?}");
        assert!(!pins.exists(), "{} survived", pins.display());
        assert!(!state_dir.exists(), "{} survived", state_dir.display());
    }
}
