//! The state file under damage, end to end: an attached instance in a namespace of its own
//! whose `state.json` is cut short, garbled or made inconsistent. Every command then fails
//! with one line naming the file and changes nothing (the file, the pinned maps, the pins);
//! restored, the instance works as before. A crash between writing the temporary file and
//! renaming it leaves the old state.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use lb_tests::{Lbctl, netns::NetNs};
use lb_userspace::{dataplane::Maps, dataplane::sync::MapContents};

/// An attached instance: `lbctl` is declared first so that it is dropped (purged) while its
/// namespace still exists.
struct Attached {
    lbctl: Lbctl,
    ns: NetNs,
}

/// A namespace with a veth `lbt0` (192.168.1.1, node `n1` of a two-node mesh), lbctl attached
/// to it and a service `web` with a backend here and one on `n2`.
fn attached() -> Attached {
    lb_tests::require_root().unwrap();
    let ns = NetNs::new("state").unwrap();
    ns.add_veth_pair("lbt0", "lbt1").unwrap();
    ns.ip(["addr", "add", "192.168.1.1/24", "dev", "lbt0"])
        .unwrap();
    let lbctl = Lbctl::new(&ns).unwrap();
    for args in [
        "attach lbt0",
        "node add n1 192.168.1.1",
        "node add n2 192.168.1.2",
        "service add web 8080 10.0.0.6:80 10.0.0.7:80@n2",
    ] {
        lbctl.run(&args.split(' ').collect::<Vec<_>>()).unwrap();
    }
    Attached { lbctl, ns }
}

/// What a command could change besides the maps: the files of the state folder, which pins
/// exist, and whether XDP is still on the interface.
#[derive(Debug, PartialEq)]
struct Footprint {
    files: BTreeMap<PathBuf, Vec<u8>>,
    pins: Vec<PathBuf>,
    xdp_attached: bool,
}

fn footprint(node: &Attached) -> Footprint {
    let files = lb_tests::paths_under(node.lbctl.state_dir())
        .unwrap()
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    let pins = lb_tests::paths_under(&node.lbctl.pin_dir()).unwrap();
    let link = node.ns.ip(["link", "show", "lbt0"]).unwrap();
    Footprint {
        files,
        pins,
        xdp_attached: link.contains("xdp"),
    }
}

/// What the pinned maps hold (the services, backends, nodes and mesh settings). Reading the
/// whole backend array takes a third of a second, so the test reads it before and after.
fn map_contents(node: &Attached) -> MapContents {
    Maps::open_pinned(&node.lbctl.pin_dir().join("maps"))
        .unwrap()
        .read_contents()
        .unwrap()
}

/// Every command that reads the state, with arguments that succeed on the intact instance
/// (`cluster ls` reads the daemon's `cluster.json` instead; see the end of the first test).
const COMMANDS: &[&str] = &[
    "attach lbt0",
    "detach lbt0",
    "service add api 9090 10.0.0.8:80",
    "service rm web",
    "service ls",
    "service ls --json",
    "service health web --off",
    "backend add web 10.0.0.8:80",
    "backend rm web 10.0.0.6:80",
    "backend drain web 10.0.0.6:80",
    "backend undrain web 10.0.0.6:80",
    "node add n3 192.168.1.3",
    "node rm n2",
    "node ls",
    "mesh show",
    "mesh set --vni 5",
    "stats",
    "purge",
];

/// Puts the intact state file back when dropped, so that the instance can be purged even when
/// a check failed while the file was damaged.
struct Restore<'a> {
    file: &'a Path,
    good: Vec<u8>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.file, &self.good);
    }
}

#[test]
fn a_damaged_state_file_stops_every_command_with_one_line_naming_it_and_changes_nothing() {
    let node = attached();
    let file = node.lbctl.state_dir().join("state.json");
    let good = std::fs::read(&file).unwrap();
    let _restore = Restore {
        file: &file,
        good: good.clone(),
    };
    let mut json: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let first_id = json["table"]["services"][0]["backends"][0]["id"].clone();
    json["table"]["services"][0]["backends"][1]["id"] = first_id;
    let shared_backend_id = serde_json::to_vec_pretty(&json).unwrap();
    let maps = map_contents(&node);
    let whole = good.trim_ascii_end();
    let damages: [(&str, Vec<u8>); 7] = [
        ("empty", Vec::new()),
        ("cut in half", good[..good.len() / 2].to_vec()),
        (
            "cut before its last brace",
            whole[..whole.len() - 1].to_vec(),
        ),
        ("not UTF-8", vec![0xff, 0xfe, b'{', 0x80]),
        ("JSON, but no state", b"[1, 2, 3]\n".to_vec()),
        ("two backends on one id", shared_backend_id),
        (
            "of another format",
            String::from_utf8(good.clone())
                .unwrap()
                .replacen("\"format\": 1", "\"format\": 2", 1)
                .into_bytes(),
        ),
    ];
    for (damage, text) in damages {
        std::fs::write(&file, &text).unwrap();
        let before = footprint(&node);
        for command in COMMANDS {
            let args: Vec<&str> = command.split(' ').collect();
            let err = node
                .lbctl
                .run_expect_fail(&args)
                .unwrap_or_else(|e| panic!("state file {damage}: {e:#}"));
            assert!(
                err.contains(&file.display().to_string()),
                "state file {damage}, `lbctl {command}`: the error does not name the file: {err}"
            );
            assert_eq!(
                err.trim().lines().count(),
                1,
                "state file {damage}, `lbctl {command}`: one line: {err}"
            );
            assert!(
                footprint(&node) == before,
                "state file {damage}: `lbctl {command}` changed something"
            );
        }
        let daemon = node
            .lbctl
            .start_daemon("127.0.0.1:9617".parse().unwrap(), &node.ns);
        let err = format!("{:#}", daemon.expect_err("the daemon started"));
        assert!(err.contains(&file.display().to_string()), "{damage}: {err}");
        assert!(
            footprint(&node) == before,
            "state file {damage}: the daemon changed something"
        );
    }

    assert!(
        map_contents(&node) == maps,
        "a command changed the maps while the state file was damaged"
    );

    std::fs::write(&file, &good).unwrap();
    let listed = node.lbctl.run(&["service", "ls"]).unwrap();
    assert!(
        listed.contains("web") && listed.contains("10.0.0.7:80@n2"),
        "{listed}"
    );
    node.lbctl
        .run(&["backend", "add", "web", "10.0.0.8:80"])
        .unwrap();

    let cluster_file = node.lbctl.state_dir().join("cluster.json");
    std::fs::write(&cluster_file, b"{\"cluster\": ").unwrap();
    let err = node.lbctl.run_expect_fail(&["cluster", "ls"]).unwrap();
    assert!(
        err.contains(&cluster_file.display().to_string()) && err.contains("damaged"),
        "{err}"
    );
}

#[test]
fn a_crash_between_writing_and_renaming_leaves_the_old_state() {
    let node = attached();
    let dir = node.lbctl.state_dir();
    let good = std::fs::read(dir.join("state.json")).unwrap();
    // What a save that died before its rename leaves: half of the next state in the
    // temporary file.
    let leftover = dir.join(".state.json.tmp");
    std::fs::write(&leftover, &good[..good.len() / 2]).unwrap();
    let before = footprint(&node);
    let listed = node.lbctl.run(&["service", "ls"]).unwrap();
    assert!(listed.contains("10.0.0.7:80@n2"), "{listed}");
    assert!(footprint(&node) == before, "a listing changed something");

    node.lbctl
        .run(&["service", "add", "api", "9090", "10.0.0.8:80"])
        .unwrap();
    assert!(!leftover.exists(), "the next save replaces the leftover");
    let listed = node.lbctl.run(&["service", "ls"]).unwrap();
    assert!(listed.contains("web") && listed.contains("api"), "{listed}");
}
