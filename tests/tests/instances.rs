//! Instances whose namespace is gone: `lbctl instances` lists every instance with its namespace
//! (alive or gone), interfaces, flow capacity and the kernel memory its pinned maps hold, and
//! `lbctl --netns NAME purge` removes one whose namespace was deleted first (pins and state),
//! after which the kernel frees its maps. Likewise for a namespace `ip netns` does not know,
//! which lbctl names `netns-<inode>`.
use std::{
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use lb_tests::{Lbctl, netns::NetNs};
use serde_json::Value;

/// The flow table of the test instances: small, so that the test does not hold 330 MB each.
const FLOW_CAPACITY: u64 = 4096;

/// `lbctl instances --json` of the instance `lbctl` manages: its row, or `None` when it is not
/// listed.
fn listed(lbctl: &Lbctl) -> Option<Value> {
    let out = lbctl.run(&["instances", "--json"]).unwrap();
    let listing: Value = serde_json::from_str(&out).unwrap();
    let rows = listing["instances"].as_array().unwrap();
    assert!(rows.len() <= 1, "one instance asked for: {listing:#}");
    rows.first().cloned()
}

/// `lbctl instances [--json]` with no option: every instance on the machine.
fn machine_wide(args: &[&str]) -> String {
    let out = Command::new(lb_tests::lbctl_path().unwrap())
        .arg("instances")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The row of `name` in the machine-wide JSON listing.
fn machine_wide_row(name: &str) -> Option<Value> {
    let listing: Value = serde_json::from_str(&machine_wide(&["--json"])).unwrap();
    listing["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == name)
        .cloned()
}

/// Lists the instance until `done` holds of its row (the kernel dismantles a deleted namespace
/// and its interfaces a moment after `ip netns del`, or after its last process exits).
fn wait_for_row(lbctl: &Lbctl, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = listed(lbctl).expect("the instance is listed");
        if done(&row) {
            return row;
        }
        assert!(Instant::now() < deadline, "{what}: {row:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether every link of the row's interface `iface` is `state`.
fn links_are(row: &Value, iface: &str, state: &str) -> bool {
    row["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == iface && i["xdp"] == state && i["tc"] == state)
}

/// The memory and map id of FLOWS as `bpftool` reports them for its pin: the cross-check of
/// what lbctl reads from fdinfo.
fn bpftool_flows(pin_dir: &Path) -> (u64, u64) {
    let map = lb_tests::pinned_map(&pin_dir.join("maps/FLOWS")).unwrap();
    (
        map["bytes_memlock"].as_u64().unwrap(),
        map["id"].as_u64().unwrap(),
    )
}

/// Waits until the kernel has freed the map of id `id` (a few seconds at most after its last
/// pin and descriptor go).
fn wait_until_freed(id: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Command::new("bpftool")
        .args(["map", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "map {id} is still there");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The checks of a listed, attached instance with interface `lbt0`; returns its memory.
fn check_attached_row(row: &Value, lbctl: &Lbctl, namespace: &str) -> u64 {
    assert_eq!(row["namespace"], namespace, "{row:#}");
    assert_eq!(row["flow_capacity"], FLOW_CAPACITY, "{row:#}");
    assert_eq!(row["state"], "saved", "{row:#}");
    assert_eq!(row["state_dir"], lbctl.state_dir().to_str().unwrap());
    assert_eq!(row["pin_dir"], lbctl.pin_dir().to_str().unwrap());
    let memory = row["kernel_memory_bytes"].as_u64().unwrap();
    let of_maps: u64 = row["maps"]
        .as_object()
        .unwrap()
        .values()
        .map(|map| map["memlock_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(memory, of_maps, "{row:#}");
    let (flows_memlock, _) = bpftool_flows(&lbctl.pin_dir());
    assert_eq!(row["maps"]["maps/FLOWS"]["memlock_bytes"], flows_memlock);
    assert!(flows_memlock > 0 && memory > flows_memlock, "{row:#}");
    memory
}

/// The id of the BPF link pinned at `pin` (`bpftool link show pinned`).
fn link_id(pin: &Path) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {out:?}");
    let link: Value = serde_json::from_slice(&out.stdout).unwrap();
    link["id"].as_u64().unwrap()
}

/// Whether the kernel still has BPF link `id`.
fn link_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

/// `purge` in a live namespace leaves nothing: every link (XDP, TC, the socket programs') is
/// gone from the kernel, the interface has no XDP program, and the pins and the state folder
/// are removed. (Every test's instance is purged when it ends, where a failure can only be
/// reported; this one checks what a purge leaves.)
#[test]
fn purge_detaches_every_program_and_removes_pins_and_state() {
    lb_tests::require_root().unwrap();
    let ns = NetNs::new("purge").unwrap();
    ns.add_veth_pair("lbt0", "lbt1").unwrap();
    let mut lbctl = Lbctl::new(&ns).unwrap();
    let capacity = FLOW_CAPACITY.to_string();
    lbctl
        .run(&["attach", "lbt0", "--flow-capacity", &capacity])
        .unwrap();
    lbctl
        .run(&["service", "add", "web", "8080", "10.0.0.6:80"])
        .unwrap();
    let (pin_dir, state_dir) = (lbctl.pin_dir(), lbctl.state_dir().to_owned());
    let links: Vec<u64> = std::fs::read_dir(pin_dir.join("links"))
        .unwrap()
        .map(|entry| link_id(&entry.unwrap().path()))
        .collect();
    assert_eq!(
        links.len(),
        3 + 4,
        "XDP, TC egress, TC ingress and 4 socket links"
    );
    assert!(ns.ip(["link", "show", "lbt0"]).unwrap().contains("xdp"));

    lbctl.purge().unwrap();
    for id in links {
        assert!(!link_exists(id), "link {id} outlived the purge");
    }
    assert!(!ns.ip(["link", "show", "lbt0"]).unwrap().contains("xdp"));
    assert!(!pin_dir.exists(), "{} is left", pin_dir.display());
    assert!(
        !state_dir.join("state.json").exists(),
        "{} is left",
        state_dir.display()
    );
}

#[test]
fn an_instance_whose_namespace_was_deleted_is_listed_and_purged() {
    lb_tests::require_root().unwrap();
    let mut ns = NetNs::new("gone").unwrap();
    ns.add_veth_pair("lbt0", "lbt1").unwrap();
    let mut lbctl = Lbctl::new(&ns).unwrap();
    let capacity = FLOW_CAPACITY.to_string();
    let attached = lbctl
        .run(&["attach", "lbt0", "--flow-capacity", &capacity])
        .unwrap();
    assert!(attached.contains("MB of kernel memory"), "{attached}");
    lbctl
        .run(&["service", "add", "web", "8080", "10.0.0.6:80"])
        .unwrap();
    let name = ns.name().to_owned();
    let (pin_dir, state_dir) = (lbctl.pin_dir(), lbctl.state_dir().to_owned());

    let row = listed(&lbctl).expect("the instance is listed");
    let memory = check_attached_row(&row, &lbctl, "alive");
    assert!(links_are(&row, "lbt0", "attached"), "{row:#}");
    let (_, flows_id) = bpftool_flows(&pin_dir);

    ns.delete().unwrap();
    let row = wait_for_row(&lbctl, "the interface goes with the namespace", |row| {
        links_are(row, "lbt0", "gone")
    });
    check_attached_row(&row, &lbctl, "gone");
    // Without --netns or --state-dir: found by its pins, its state folder by what they recorded.
    let everywhere = machine_wide_row(&name).expect("listed machine-wide");
    assert_eq!(everywhere["state_dir"], state_dir.to_str().unwrap());
    assert_eq!(everywhere["namespace"], "gone");
    assert!(links_are(&everywhere, "lbt0", "gone"), "{everywhere:#}");
    let text = machine_wide(&[]);
    let line = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name.as_str()))
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"));
    assert!(
        line.contains(" gone ") && line.contains("lbt0 (gone)") && line.contains(" MB"),
        "{line}"
    );
    assert!(text.contains("whose namespace is gone"), "{text}");

    // Every other command still needs the namespace.
    for args in [&["service", "ls"][..], &["attach", "lbt0"], &["stats"]] {
        let err = lbctl.run_expect_fail(args).unwrap();
        assert!(
            err.contains(&format!("network namespace '{name}' not found")),
            "{args:?}: {err}"
        );
    }

    // A damaged state stops the purge, as it does when the namespace exists.
    let state_file = state_dir.join("state.json");
    let good = std::fs::read(&state_file).unwrap();
    std::fs::write(&state_file, b"{\"format\": 1, \"flow_cap").unwrap();
    let err = lbctl.run_expect_fail(&["purge"]).unwrap();
    assert!(err.contains("is damaged"), "{err}");
    assert!(pin_dir.join("maps/FLOWS").exists());
    std::fs::write(&state_file, &good).unwrap();

    let purged = lbctl.purge().unwrap();
    assert!(
        purged.starts_with(&format!("purged '{name}', whose network namespace is gone")),
        "{purged}"
    );
    assert!(
        purged.contains(&format!(
            "({} of kernel memory",
            lb_userspace::dataplane::megabytes(memory)
        )),
        "{purged}"
    );
    assert!(!pin_dir.exists(), "{} is left", pin_dir.display());
    assert!(!state_dir.exists(), "{} is left", state_dir.display());
    wait_until_freed(flows_id);
    assert_eq!(listed(&lbctl), None);
    assert_eq!(machine_wide_row(&name), None);

    let err = lbctl.run_expect_fail(&["purge"]).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("network namespace '{name}' not found")),
        "{err}"
    );
}

/// A process holding a namespace (`sleep` run in it), killed when dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A namespace that lost its name in `ip netns` but lives on (a process is in it) is the
/// instance `netns-<inode>`: lbctl enters it through that process, lists it alive, then gone
/// once the process exits, and purges it.
#[test]
fn a_namespace_without_a_name_is_known_by_its_inode() {
    lb_tests::require_root().unwrap();
    let mut ns = NetNs::new("inode").unwrap();
    ns.add_veth_pair("lbt0", "lbt1").unwrap();
    let holder = Holder(ns.spawn(["sleep", "60"]).unwrap());
    let inode = std::fs::metadata(Path::new("/run/netns").join(ns.name()))
        .unwrap()
        .ino();
    // `ip netns exec` enters the namespace by its name before it runs `sleep`: the name must
    // stay until it has (on a loaded machine that takes a while).
    let in_it = Path::new("/proc")
        .join(holder.0.id().to_string())
        .join("ns/net");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&in_it).map(|m| m.ino()).ok() != Some(inode) {
        assert!(
            Instant::now() < deadline,
            "the holder never entered the namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ns.delete().unwrap();
    let name = format!("netns-{inode}");
    let mut lbctl = Lbctl::named(&name).unwrap();
    let capacity = FLOW_CAPACITY.to_string();
    lbctl
        .run(&["attach", "lbt0", "--flow-capacity", &capacity])
        .unwrap();
    let row = listed(&lbctl).expect("the instance is listed");
    check_attached_row(&row, &lbctl, "alive");
    assert!(links_are(&row, "lbt0", "attached"), "{row:#}");
    assert_eq!(machine_wide_row(&name).unwrap()["namespace"], "alive");

    drop(holder);
    let row = wait_for_row(&lbctl, "the namespace goes with its last process", |row| {
        row["namespace"] == "gone" && links_are(row, "lbt0", "gone")
    });
    check_attached_row(&row, &lbctl, "gone");
    let purged = lbctl.purge().unwrap();
    assert!(
        purged.starts_with(&format!("purged '{name}', whose network namespace is gone")),
        "{purged}"
    );
    assert!(!lbctl.pin_dir().exists());
    assert_eq!(listed(&lbctl), None);
}
