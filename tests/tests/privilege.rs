//! Least privilege: what lbctl leaves on disk (pinned maps and links, the state folder) is
//! root's alone, and lbctl run by anyone else, or by root without the capabilities it needs,
//! says so in one line and does nothing.
use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use lb_tests::{Lbctl, netns::NetNs};

/// The unprivileged user the tests run lbctl and plain tools as.
const NOBODY: &str = "65534";

/// Runs `program args` as user and group nobody, with no supplementary groups.
fn as_nobody(program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs")
}

/// `path`'s owner and permission bits.
fn owner_and_mode(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.uid(), meta.permissions().mode() & 0o7777)
}

#[test]
fn pins_and_state_are_root_only_after_attach() {
    lb_tests::require_root().unwrap();
    let ns = NetNs::new("priv").unwrap();
    ns.add_veth_pair("lbt0", "lbt1").unwrap();
    let lbctl = Lbctl::new(&ns).unwrap();
    // As `mkdir` would leave a --state-dir an operator made beforehand.
    let state_dir = lbctl.state_dir();
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    lbctl.run(&["attach", "lbt0"]).unwrap();
    lbctl
        .run(&["service", "add", "web", "8080", "10.0.0.6:80"])
        .unwrap();

    let pin_dir = lbctl.pin_dir();
    let mut paths = vec![state_dir.to_path_buf(), pin_dir.clone()];
    paths.extend(lb_tests::paths_under(state_dir).unwrap());
    paths.extend(lb_tests::paths_under(&pin_dir).unwrap());
    let names: Vec<String> = paths
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
        .collect();
    for expected in [
        "state.json",
        "lock",
        "maps",
        "links",
        "SERVICES",
        "FLOWS",
        "lbt0_xdp",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} in {paths:?}"
        );
    }
    for path in &paths {
        let mode = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(owner_and_mode(path), (0, mode), "{}", path.display());
    }

    // What those modes mean: nobody else can list the pins or read the state. First the
    // control: nobody runs the tools at all (a failing setpriv would fail every check below).
    let control = as_nobody(Path::new("ls"), &["/"]);
    assert!(
        control.status.success(),
        "nobody can `ls /`: {}",
        String::from_utf8_lossy(&control.stderr)
    );
    let state_file = state_dir.join("state.json");
    for (tool, target) in [
        ("ls", &pin_dir),
        ("ls", &pin_dir.join("maps")),
        ("cat", &state_file),
        ("ls", &state_dir.to_path_buf()),
    ] {
        let out = as_nobody(Path::new(tool), &[target.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("Permission denied"),
            "nobody cannot `{tool} {}`: {stderr} {}",
            target.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// The line every lbctl command prints when not run as root.
const NEEDS_ROOT: &str =
    "lbctl needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run with sudo\n";

/// A copy of the lbctl binary that any user may run, wherever the build put the original.
struct PublicCopy {
    dir: PathBuf,
}

impl PublicCopy {
    fn new() -> PublicCopy {
        let dir = std::env::temp_dir().join(format!("lbt-priv-{}-bin", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::copy(lb_tests::lbctl_path().unwrap(), dir.join("lbctl")).unwrap();
        PublicCopy { dir }
    }

    fn lbctl(&self) -> PathBuf {
        self.dir.join("lbctl")
    }
}

impl Drop for PublicCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn lbctl_without_root_says_it_needs_root_in_one_line_and_does_nothing() {
    lb_tests::require_root().unwrap();
    let copy = PublicCopy::new();
    let state_dir = std::env::temp_dir().join(format!("lbt-priv-{}-state", std::process::id()));
    let state_arg = state_dir.to_str().unwrap();
    let commands: [&[&str]; 14] = [
        &["attach", "lo"],
        &["detach", "lo"],
        &["service", "ls"],
        &["service", "add", "web", "8080", "10.0.0.6:80"],
        &["backend", "add", "web", "10.0.0.7:80"],
        &["node", "ls"],
        &["mesh", "show"],
        &["stats", "--json"],
        &["cluster", "ls"],
        &["daemon"],
        &["purge"],
        &["--netns", "lbt-none", "service", "ls"],
        // The commands that work without entering a namespace (it may be gone).
        &["--netns", "lbt-none", "instances"],
        &["--netns", "lbt-none", "purge"],
    ];
    for args in commands {
        let mut full = vec!["--state-dir", state_arg];
        full.extend_from_slice(args);
        let out = as_nobody(&copy.lbctl(), &full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr, NEEDS_ROOT, "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(!state_dir.exists(), "a refused command created {state_arg}");

    // Root whose capabilities were taken away (a container without privileges) is told which.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-net_admin,-sys_admin,-bpf", "--"])
        .arg(copy.lbctl())
        .args(["--state-dir", state_arg, "service", "ls"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.ends_with("lacks CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF\n")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(!state_dir.exists(), "a refused command created {state_arg}");

    // Help needs no privilege.
    let out = as_nobody(&copy.lbctl(), &["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: lbctl"));
}
