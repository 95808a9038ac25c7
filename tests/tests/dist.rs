//! The Debian package (`cargo xtask dist`), built here from the test build of lbctl: installed
//! with `dpkg` into a clean root (an empty dpkg database; `--force-depends` since that root has
//! no libc6 of its own: the binary is run with the host's), its units checked by
//! `systemd-analyze verify` in that root, the attach unit's own command run against a test
//! namespace, the operator's configuration kept across a reinstall and a removal, gone on purge.
use std::path::Path;
use std::process::Command;

use lb_tests::{
    dist::{self, CONFIG, PACKAGE, UNITS},
    netns::NetNs,
};

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dpkg(root: &Path, args: &[&str]) {
    let (ok, out, err) = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends", "--force-confold"])
        .args(args));
    assert!(ok, "dpkg {args:?}: {out}{err}");
}

/// `systemd-analyze verify` of the package's units in `root`: its output (empty when clean).
fn verify(root: &Path, units: &[&str]) -> (bool, String) {
    let (ok, out, err) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units));
    (ok, format!("{out}{err}"))
}

/// The value of `NAME="value"` in the configuration text.
fn setting(config: &str, name: &str) -> String {
    config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

#[test]
fn the_debian_package_installs_into_a_clean_root_with_units_systemd_accepts() {
    lb_tests::require_root().unwrap();
    let work = std::env::temp_dir().join(format!("lbt-{}-dist", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let deb = dist::build_deb(&lb_tests::lbctl_path().unwrap(), "0.1.0", &work).unwrap();

    // A clean root: an empty dpkg database and nothing else.
    let root = work.join("root");
    for dir in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(file), "").unwrap();
    }
    dpkg(&root, &["-i", deb.to_str().unwrap()]);
    let lbctl = root.join("usr/sbin/lbctl");
    let (ok, version, _) = run(Command::new(&lbctl).arg("--version"));
    assert!(ok && version.starts_with("lbctl "), "{version}");
    let (_, conffiles, _) = run(Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${Conffiles}", PACKAGE]));
    assert!(conffiles.contains(CONFIG), "{conffiles}");

    // systemd-analyze verify in that root, given what every system has: /bin/sh and the
    // standard targets. It must fail on a broken unit, or its silence would prove nothing.
    let units = root.join("lib/systemd/system");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/sh", root.join("bin/sh")).unwrap();
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "target") && path.is_file() {
            std::fs::copy(&path, units.join(path.file_name().unwrap())).unwrap();
        }
    }
    let (ok, said) = verify(&root, &UNITS);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    let daemon_unit = std::fs::read_to_string(units.join("lbctl-daemon.service")).unwrap();
    std::fs::write(
        units.join("lbctl-broken.service"),
        daemon_unit.replace("/usr/sbin/lbctl", "/usr/sbin/lbctl-missing"),
    )
    .unwrap();
    let (ok, said) = verify(&root, &["lbctl-broken.service"]);
    assert!(!ok && said.contains("lbctl-missing"), "{said}");
    std::fs::remove_file(units.join("lbctl-broken.service")).unwrap();

    // The attach unit's own command, with the configuration's settings (the interface set to a
    // test namespace's, and the instance that namespace's), run by the shell as systemd would
    // (`$$` is systemd's escape of `$`): it attaches lbctl there; its stop detaches.
    let config = std::fs::read_to_string(root.join(CONFIG.trim_start_matches('/'))).unwrap();
    let attach_unit = std::fs::read_to_string(units.join("lbctl-attach.service")).unwrap();
    let ns = NetNs::new("dist").unwrap();
    ns.add_veth_pair("lbt-up0", "lbt-up0p").unwrap();
    let state = work.join("state");
    let instance = format!(
        "{} --netns {} --state-dir {}",
        lbctl.display(),
        ns.name(),
        state.display()
    );
    let run_unit_command = |key: &str| {
        let line = attach_unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .replace("$$", "$")
            .replace("/usr/sbin/lbctl", &instance);
        let (shell, script) = line.split_once(' ').unwrap();
        let (flags, script) = script.split_once(' ').unwrap();
        run(Command::new(shell)
            .arg(flags)
            .arg(script.trim_matches('\''))
            .env("LBCTL_INTERFACES", "lbt-up0")
            .env(
                "LBCTL_ATTACH_OPTIONS",
                setting(&config, "LBCTL_ATTACH_OPTIONS"),
            ))
    };
    let (ok, out, err) = run_unit_command("ExecStart=");
    assert!(ok, "the attach unit's start: {out}{err}");
    assert!(out.contains("attached to lbt-up0"), "{out}");
    let (ok, out, err) = run_unit_command("ExecStop=");
    assert!(
        ok && out.contains("detached"),
        "the attach unit's stop: {out}{err}"
    );
    let (ok, out, err) = run(Command::new(&lbctl)
        .args(["--netns", ns.name(), "--state-dir"])
        .arg(&state)
        .arg("purge"));
    assert!(ok, "{out}{err}");

    // The operator's configuration survives a reinstall and a removal; purge takes it.
    let edited = config.replace("LBCTL_INTERFACES=\"eth0\"", "LBCTL_INTERFACES=\"ens5\"");
    assert_ne!(edited, config);
    let installed_config = root.join(CONFIG.trim_start_matches('/'));
    std::fs::write(&installed_config, &edited).unwrap();
    dpkg(&root, &["-i", deb.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&installed_config).unwrap(), edited);
    dpkg(&root, &["-r", PACKAGE]);
    assert!(!lbctl.exists() && !units.join(UNITS[0]).exists());
    assert_eq!(std::fs::read_to_string(&installed_config).unwrap(), edited);
    dpkg(&root, &["--purge", PACKAGE]);
    assert!(!installed_config.exists());
    std::fs::remove_dir_all(&work).unwrap();
}
