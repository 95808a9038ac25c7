//! Runs the `lbctl` binary as a test would: one instance per node, each with
//! its own state folder, purged when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::netns::{NetNs, describe};
use crate::{lbctl_path, unique_prefix};

/// One lbctl instance managing one namespace: every command runs as
/// `lbctl --netns NAME --state-dir DIR ARGS...` with a state folder of its
/// own, so several instances (simulated nodes, parallel tests) coexist.
///
/// Dropping it runs `lbctl purge` (detach everything, delete the pinned maps
/// and state) and removes the folder. It keeps only the namespace's name,
/// so it can sit next to the namespace in a fixture; drop it before the
/// namespace so that purge can still enter it.
#[derive(Debug)]
pub struct Lbctl {
    bin: PathBuf,
    netns: String,
    state_dir: PathBuf,
    /// Purged already ([`Lbctl::purge`]): nothing for the drop to purge.
    purged: bool,
}

impl Lbctl {
    /// Prepares an instance for `netns` with a fresh, empty state folder
    /// `/tmp/lbt-<pid>-<counter>-state`.
    pub fn new(netns: &NetNs) -> Result<Lbctl> {
        Self::named(netns.name())
    }

    /// [`Lbctl::new`] for the namespace lbctl knows as `netns`, which need not be one of the
    /// harness' (`netns-<inode>`: a namespace without a name in `ip netns`).
    pub fn named(netns: &str) -> Result<Lbctl> {
        let bin = lbctl_path()?;
        let state_dir = std::env::temp_dir().join(format!("{}-state", unique_prefix()));
        std::fs::create_dir(&state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        Ok(Lbctl {
            bin,
            netns: netns.to_owned(),
            state_dir,
            purged: false,
        })
    }

    /// The state folder given to every command.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Where the instance pins its maps (`maps/`) and links (`links/`): lbctl's default bpffs
    /// folder for the namespace.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/lbctl").join(&self.netns)
    }

    /// Packets this instance counted under `reason` (`lbctl stats --json`).
    pub fn reason_packets(&self, reason: &str) -> Result<u64> {
        Ok(self.reason(reason)?.0)
    }

    /// The packets and bytes counted under `reason` (`lbctl stats --json`).
    pub fn reason(&self, reason: &str) -> Result<(u64, u64)> {
        let stats: serde_json::Value = serde_json::from_str(&self.run(&["stats", "--json"])?)?;
        let count = |field: &str| {
            stats["reasons"][reason][field]
                .as_u64()
                .with_context(|| format!("no reason {reason} in {stats}"))
        };
        Ok((count("packets")?, count("bytes")?))
    }

    /// Runs `lbctl ... ARGS` and returns its stdout; fails with the command
    /// line, stderr and stdout if it exits non-zero.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(args);
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", describe(&cmd)))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}):\nstderr: {}\nstdout: {}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `lbctl ... ARGS`, which must succeed, and returns its stdout and stderr (where
    /// warnings go).
    pub fn run_with_stderr(&self, args: &[&str]) -> Result<(String, String)> {
        let mut cmd = self.command(args);
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", describe(&cmd)))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                describe(&cmd),
                out.status,
                stderr.trim()
            );
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), stderr))
    }

    /// Backend `addr` (`IP:PORT`) of service `service` as `service ls --json` lists it.
    pub fn listed_backend(&self, service: &str, addr: &str) -> Result<serde_json::Value> {
        let doc: serde_json::Value =
            serde_json::from_str(&self.run(&["service", "ls", "--json"])?)?;
        let listed = doc["services"]
            .as_array()
            .and_then(|services| services.iter().find(|s| s["name"] == service))
            .and_then(|s| s["backends"].as_array())
            .and_then(|backends| backends.iter().find(|b| b["address"] == addr));
        listed
            .cloned()
            .with_context(|| format!("no backend {addr} of {service} in {doc}"))
    }

    /// Runs `lbctl ... purge`, which must succeed, and returns its stdout; the drop then
    /// purges nothing more.
    pub fn purge(&mut self) -> Result<String> {
        let out = self.run(&["purge"])?;
        self.purged = true;
        Ok(out)
    }

    /// Runs `lbctl ... ARGS`, which must be refused with exit code 1 (what the README promises
    /// for every refusal but a malformed argument); returns its stderr.
    pub fn run_expect_fail(&self, args: &[&str]) -> Result<String> {
        self.run_expect_exit(args, 1)
    }

    /// Runs `lbctl ... ARGS`, which must fail with exit code `code` (1: refused; 2: a malformed
    /// argument, as the argument parser says); returns its stderr.
    pub fn run_expect_exit(&self, args: &[&str], code: i32) -> Result<String> {
        let mut cmd = self.command(args);
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", describe(&cmd)))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() != Some(code) {
            bail!(
                "{} exited with {} where {code} was expected; stdout: {}; stderr: {}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                stderr.trim()
            );
        }
        Ok(stderr)
    }

    /// Starts `lbctl ... daemon --metrics-addr ADDR` in the background and waits until it
    /// serves metrics (its namespace's loopback). Stopped with SIGTERM when dropped.
    pub fn start_daemon(
        &self,
        metrics_addr: std::net::SocketAddr,
        netns: &NetNs,
    ) -> Result<Daemon> {
        self.start_daemon_with(metrics_addr, netns, &[])
    }

    /// [`start_daemon`](Lbctl::start_daemon) with more daemon arguments (e.g. `--cluster`).
    pub fn start_daemon_with(
        &self,
        metrics_addr: std::net::SocketAddr,
        netns: &NetNs,
        extra: &[&str],
    ) -> Result<Daemon> {
        let addr = metrics_addr.to_string();
        let mut args = vec!["daemon", "--metrics-addr", &addr];
        args.extend_from_slice(extra);
        let mut cmd = self.command(&args);
        let log = std::env::temp_dir().join(format!("{}-daemon.log", unique_prefix()));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdout(std::process::Stdio::null())
            .stderr(log_file.try_clone()?);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", describe(&cmd)))?;
        let mut daemon = Daemon {
            child: Some(child),
            metrics_addr,
            log,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if netns
                .in_netns(|| std::net::TcpStream::connect(metrics_addr))
                .is_ok()
            {
                return Ok(daemon);
            }
            if let Some(child) = daemon.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("lbctl daemon exited ({status}): {}", daemon.log_text());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "lbctl daemon does not listen on {addr}: {}",
                    daemon.log_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `lbctl --netns NAME --state-dir DIR ARGS...`, not yet run.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--netns")
            .arg(&self.netns)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .stdin(std::process::Stdio::null());
        cmd
    }
}

impl Drop for Lbctl {
    /// Purges the instance so no XDP program or pinned map outlives the
    /// test; failures are reported, never panicked on (drop may run while a
    /// failed test unwinds).
    fn drop(&mut self) {
        if !self.purged
            && let Err(e) = self.run(&["purge"])
        {
            eprintln!("warning: {e:#}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.state_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: cannot remove {}: {e}", self.state_dir.display());
        }
    }
}

/// A running `lbctl daemon`; SIGTERM and a wait when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<std::process::Child>,
    metrics_addr: std::net::SocketAddr,
    log: PathBuf,
}

impl Daemon {
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics_addr
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's process id (`/proc/PID` for its CPU time), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Waits up to `timeout` for the daemon to exit on its own; its exit status if it did.
    pub fn wait_exit(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<std::process::ExitStatus>> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            let child = self.child.as_mut().context("daemon already stopped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(None)
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM)
    }

    /// Kills the daemon with SIGKILL, as a crash would (it says goodbye to nobody), and returns
    /// its exit status.
    pub fn kill(&mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGKILL)
    }

    fn signal(&mut self, signal: libc::c_int) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("daemon already stopped")?;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        Ok(child.wait()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("warning: stopping lbctl daemon: {e:#}");
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
