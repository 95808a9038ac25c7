//! Test harness for lbctl: network namespaces wired into small topologies, a
//! test server to run in them, clients to send traffic from them, a wrapper
//! around the `lbctl` binary, and a Prometheus server to scrape its metrics.
//!
//! It is shared by the integration tests (`tests/tests/`) and by `xtask`
//! (`cargo xtask demo`), so it depends only on std, anyhow, libc and
//! serde_json (for Prometheus' API): never on lb-userspace or aya, whose
//! build needs the eBPF toolchain.
//!
//! Everything that touches namespaces needs root and fails loudly without it
//! (see [`require_root`]): a privileged test that silently skipped would look
//! green while testing nothing.

pub mod bpf;
pub mod client;
pub mod cpu;
pub mod dist;
pub mod docker;
mod lbctl;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod prometheus;
pub mod rng;
pub mod topology;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use lbctl::{Daemon, Lbctl};

/// Processes a test started (servers in its namespaces), killed and reaped when it ends,
/// however it ends: a namespace only really goes away once no process is left in it.
pub struct Processes(pub Vec<std::process::Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Fails with an explanation unless this process runs as root.
///
/// Creating network namespaces, veths and bridges and loading XDP programs
/// needs `CAP_SYS_ADMIN`/`CAP_NET_ADMIN`; without them the first `ip` command
/// would fail with a less helpful "Operation not permitted".
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the lbctl test harness must run as root (it creates network namespaces \
             and loads XDP programs); this process runs as uid {euid}: rerun with sudo"
        );
    }
    Ok(())
}

/// Path of the `lbctl` binary: `$LBCTL_BIN` if set, else the one cargo built
/// into the same target profile folder as the running executable.
pub fn lbctl_path() -> Result<PathBuf> {
    sibling_binary("lbctl", "LBCTL_BIN", "lb-userspace")
}

/// Path of the `lb-testsrv` binary: `$LB_TESTSRV_BIN` if set, else the one
/// cargo built into the same target profile folder as the running executable.
pub fn testsrv_path() -> Result<PathBuf> {
    sibling_binary("lb-testsrv", "LB_TESTSRV_BIN", "lb-tests")
}

/// Finds binary `name` of workspace package `package`.
///
/// Integration tests run as `target/<profile>/deps/<test>-<hash>` and xtask
/// as `target/<profile>/xtask`, while cargo puts binaries in
/// `target/<profile>/`: so look beside the running executable and in its
/// parent folder. The environment variable wins so a test can be pointed at
/// another build.
fn sibling_binary(name: &str, env_var: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("${env_var} is {}, which is not a file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no parent folder", exe.display()))?;
    let candidates: Vec<PathBuf> = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d: &Path| d.join(name))
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    bail!(
        "binary `{name}` not found (looked at {}): run `cargo build -p {package} --bins` \
         with the same profile and target dir first, or set ${env_var}",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Every file and folder below `dir` (not `dir` itself), depth first, in name order.
pub fn paths_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort();
    let mut out = Vec::new();
    for path in entries {
        if path.is_dir() {
            out.extend(paths_under(&path)?);
        }
        out.push(path);
    }
    Ok(out)
}

/// What `bpftool --json map show pinned PIN` says of the map pinned at `pin` (`id`,
/// `max_entries`, `bytes_memlock`, ...): the kernel's view, not lbctl's.
pub fn pinned_map(pin: &Path) -> Result<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["--json", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .context("cannot run bpftool (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool map show pinned {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("bpftool's JSON")
}

/// Returns a `lbt-<pid>-<counter>` prefix unique on this machine while this
/// process lives: namespaces and state folders of parallel tests (threads)
/// and of concurrent runs (processes) never collide, and the pid lets
/// [`netns::sweep_stale`] recognise leftovers of runs that were killed.
fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}-{n}", netns::PREFIX, std::process::id())
}

/// Checks of the harness itself against plain kernel routing (no load
/// balancer): if these fail, the end-to-end tests cannot be trusted.
/// They need root and `lb-testsrv` built (`cargo build -p lb-tests --bins`).
#[cfg(test)]
mod harness_tests {
    use crate::client::{KeepAlive, http_get_new_connection, udp_request};
    use crate::topology::{SingleNode, SingleNodeSpec};

    /// Names of the namespaces that currently exist.
    fn netns_names() -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn single_node_routes_client_to_backends_and_cleans_up() {
        let spec = SingleNodeSpec {
            backends: 2,
            ..SingleNodeSpec::default()
        };
        let mut topo = SingleNode::build(spec).unwrap();
        let names: Vec<String> = [topo.client(), topo.node(), topo.backend_ns(0)]
            .iter()
            .map(|ns| ns.name().to_string())
            .collect();
        assert!(names.iter().all(|n| netns_names().contains(n)));

        for i in 0..2 {
            let addr = topo.backend_addr(i);
            let reply = topo
                .client()
                .in_netns(|| http_get_new_connection(addr))
                .unwrap();
            assert_eq!(reply.backend, topo.backend_name(i));
            assert_eq!(*reply.client_seen.ip(), topo.client_ip());

            let udp_addr = topo.backend_udp_addr(i);
            let reply = topo.client().in_netns(|| udp_request(udp_addr)).unwrap();
            assert_eq!(reply.backend, topo.backend_name(i));
            assert_eq!(*reply.client_seen.ip(), topo.client_ip());
        }

        // Several requests on one connection all see the same client port.
        let addr = topo.backend_addr(1);
        let (local, replies) = topo
            .client()
            .in_netns(|| -> anyhow::Result<_> {
                let mut conn = KeepAlive::connect(addr)?;
                let replies = (0..3).map(|_| conn.get()).collect::<Result<Vec<_>, _>>()?;
                Ok((conn.local_addr()?, replies))
            })
            .unwrap();
        for reply in replies {
            assert_eq!(reply.backend, "backend-1");
            assert_eq!(std::net::SocketAddr::V4(reply.client_seen), local);
        }

        topo.stop_backend(0).unwrap();
        let addr = topo.backend_addr(0);
        assert!(
            topo.client()
                .in_netns(|| http_get_new_connection(addr))
                .is_err()
        );
        topo.start_backend(0).unwrap();
        let reply = topo
            .client()
            .in_netns(|| http_get_new_connection(addr))
            .unwrap();
        assert_eq!(reply.backend, "backend-0");

        drop(topo);
        let left = netns_names();
        assert!(names.iter().all(|n| !left.contains(n)), "left: {left:?}");
    }
}
