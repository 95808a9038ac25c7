//! The Debian package operators install lbctl from (`cargo xtask dist`, and the suite's check of
//! it): the binary, the two systemd units and the configuration file of
//! `lb-userspace/packaging/`, built with `dpkg-deb` (no other packaging tool to install).
//!
//! | installed as | from |
//! | --- | --- |
//! | `/usr/sbin/lbctl` | the binary given |
//! | `/lib/systemd/system/lbctl-attach.service` | attaches the data plane at boot to the interfaces of the configuration |
//! | `/lib/systemd/system/lbctl-daemon.service` | `lbctl daemon` with the configuration's options |
//! | `/etc/lbctl/lbctl.conf` | the configuration (a conffile: an upgrade keeps the operator's) |

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The package's name.
pub const PACKAGE: &str = "lbctl";
/// The systemd units it installs.
pub const UNITS: [&str; 2] = ["lbctl-attach.service", "lbctl-daemon.service"];
/// Its configuration file, as installed.
pub const CONFIG: &str = "/etc/lbctl/lbctl.conf";

/// `lb-userspace/packaging/`, where the units and the configuration are kept.
pub fn packaging_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("lb-userspace")
        .join("packaging")
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds `lbctl_VERSION_ARCH.deb` in `out` from the binary `lbctl`; returns its path.
pub fn build_deb(lbctl: &Path, version: &str, out: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let arch = run(Command::new("dpkg").arg("--print-architecture"))?;
    let stage = out.join(format!("{PACKAGE}-stage"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let install = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let dest = stage.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("a file path"))?;
        std::fs::copy(from, &dest)
            .with_context(|| format!("cannot copy {} to {}", from.display(), dest.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let packaging = packaging_dir();
    install(lbctl, "/usr/sbin/lbctl", 0o755)?;
    for unit in UNITS {
        install(
            &packaging.join(unit),
            &format!("/lib/systemd/system/{unit}"),
            0o644,
        )?;
    }
    install(&packaging.join("lbctl.conf"), CONFIG, 0o644)?;
    let control = stage.join("DEBIAN");
    std::fs::create_dir_all(&control)?;
    let installed_kb = std::fs::metadata(lbctl)?.len() / 1024 + 8;
    std::fs::write(
        control.join("control"),
        format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: lbctl developers <lbctl@users.noreply.github.com>\n\
             Depends: libc6 (>= 2.36)\n\
             Recommends: iproute2\n\
             Suggests: docker.io\n\
             Section: net\n\
             Priority: optional\n\
             Installed-Size: {installed_kb}\n\
             Homepage: https://github.com/lbctl/lbctl\n\
             Description: XDP load balancer for published ports, a Docker Swarm routing mesh\n \
             lbctl balances connections to a node's published ports over a service's\n \
             backends in the kernel's XDP hook, keeps the client's address, and carries\n \
             flows to tasks on other nodes over VXLAN. lbctl-attach.service attaches it\n \
             at boot to the interfaces of /etc/lbctl/lbctl.conf; lbctl-daemon.service runs\n \
             its health checks, metrics, gossiped cluster and Docker Swarm watcher.\n"
        ),
    )?;
    std::fs::write(control.join("conffiles"), format!("{CONFIG}\n"))?;
    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    // Fast gzip: a debug build is 100+ MB, xz takes a minute on it, and every dpkg reads it.
    run(Command::new("dpkg-deb")
        .arg("-Zgzip")
        .arg("-z1")
        .arg("--root-owner-group")
        .arg("--build")
        .arg(&stage)
        .arg(&deb))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(deb)
}
