//! An IPv6 underlay, end to end through the `lbctl` binary: a node namespace whose uplink has
//! an IPv6 address, the other nodes routed through a peer namespace over a 1400-byte link.
//! Nodes of the mesh are IPv6; a node of the other family and a link-local address are refused
//! without change; `mesh show` computes the overlay with VXLAN over IPv6's 70 bytes; the pinned
//! maps name every node by its key, with `NODES6`, `NODE_ADDRS6` and `MESH6` holding the
//! addresses; and the next hop gets its managed IPv6 neighbour entry.
use std::{collections::BTreeMap, net::Ipv6Addr};

use lb_common::{BACKEND_ACTIVE, BACKEND_IPV6, ipv6_node_key};
use lb_tests::{
    Lbctl,
    netns::{self, NetNs},
};
use lb_userspace::dataplane::{Maps, sync::MapContents};

const N1: &str = "2001:db8:6::1";
const PEER: &str = "2001:db8:6::fe";
const N2: &str = "2001:db8:7::2";
const N3: &str = "2001:db8:7::3";

/// The instance first, so that it is purged while its namespace still exists.
struct Mesh {
    lbctl: Lbctl,
    node: NetNs,
    _peer: NetNs,
}

/// Node `n1` (`lbt0`, 2001:db8:6::1/64, MTU 1400) whose other nodes n2 and n3 are reached
/// through the peer namespace's 2001:db8:6::fe; lbctl attached to `lbt0`, the three nodes
/// added, and `web` with an IPv4 task on n2 and an IPv6 one on n3.
fn mesh() -> Mesh {
    lb_tests::require_root().unwrap();
    let node = NetNs::new("u6node").unwrap();
    let peer = NetNs::new("u6peer").unwrap();
    netns::veth(&node, "lbt0", &peer, "lbt1").unwrap();
    for (ns, dev, addr) in [(&node, "lbt0", N1), (&peer, "lbt1", PEER)] {
        ns.ip(["link", "set", dev, "mtu", "1400"]).unwrap();
        ns.ip([
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            dev,
            "nodad",
        ])
        .unwrap();
    }
    node.ip([
        "-6",
        "route",
        "add",
        "2001:db8:7::/64",
        "via",
        PEER,
        "dev",
        "lbt0",
    ])
    .unwrap();
    let lbctl = Lbctl::new(&node).unwrap();
    for args in [
        "attach lbt0".to_owned(),
        format!("node add n1 {N1}"),
        format!("node add n2 {N2}"),
        format!("node add n3 {N3}"),
        "service add web 8080 10.0.0.7:80@n2 [2001:db8:5::8]:80@n3".to_owned(),
    ] {
        lbctl
            .run(&args.split(' ').collect::<Vec<_>>())
            .unwrap_or_else(|err| panic!("{args}: {err:#}"));
    }
    Mesh {
        lbctl,
        node,
        _peer: peer,
    }
}

fn state_json(mesh: &Mesh) -> Vec<u8> {
    std::fs::read(mesh.lbctl.state_dir().join("state.json")).unwrap()
}

fn maps(mesh: &Mesh) -> MapContents {
    Maps::open_pinned(&mesh.lbctl.pin_dir().join("maps"))
        .unwrap()
        .read_contents()
        .unwrap()
}

fn octets(addr: &str) -> [u8; 16] {
    addr.parse::<Ipv6Addr>().unwrap().octets()
}

fn key(addr: &str) -> u32 {
    ipv6_node_key(&octets(addr))
}

#[test]
fn a_node_of_the_other_family_or_a_link_local_one_is_refused_without_change() {
    let mesh = mesh();
    let before = state_json(&mesh);
    let err = mesh
        .lbctl
        .run_expect_fail(&["node", "add", "n4", "10.0.0.4"])
        .unwrap();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("'n4'") && err.contains("IPv6") && err.contains("one family"),
        "{err}"
    );
    assert_eq!(state_json(&mesh), before, "state.json unchanged");

    // A malformed argument: the argument parser's exit code 2, its error on the first line.
    for (addr, why) in [
        ("fe80::1", "link-local"),
        ("fe80::1%lbt0", "scope id"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.9", "IPv4 address in IPv6 form"),
    ] {
        let err = mesh
            .lbctl
            .run_expect_exit(&["node", "add", "nX", addr], 2)
            .unwrap();
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains(&format!("invalid underlay IP '{addr}'")) && first.contains(why),
            "{addr}: {err}"
        );
        assert_eq!(
            state_json(&mesh),
            before,
            "state.json unchanged after {addr}"
        );
    }
    let ls = mesh.lbctl.run(&["node", "ls"]).unwrap();
    assert_eq!(ls.lines().count(), 3, "{ls}");
    assert!(
        ls.lines().next().unwrap().contains(N1) && ls.contains("self"),
        "{ls}"
    );
}

#[test]
fn mesh_show_uses_the_ipv6_overhead_on_a_1400_byte_path() {
    let mesh = mesh();
    let text = mesh.lbctl.run(&["mesh", "show"]).unwrap();
    assert!(text.contains(&format!("this node: n1 ({N1})")), "{text}");
    // 1400 - 70 = 1330; MSS 1330 - 40 = 1290, IPv6 1330 - 60 = 1270.
    for node in [("n2", N2), ("n3", N3)] {
        let line = format!(
            "to {} ({}): path MTU 1400, overlay MTU 1330, TCP MSS at most 1290 (IPv6 1270)",
            node.0, node.1
        );
        assert!(text.contains(&line), "no '{line}' in:\n{text}");
    }
    assert!(text.contains("lbt0: MTU 1400, overlay MTU 1330"), "{text}");
    assert!(
        !text.contains("below IPv6's minimum"),
        "1330 is not: {text}"
    );

    let doc: serde_json::Value =
        serde_json::from_str(&mesh.lbctl.run(&["mesh", "show", "--json"]).unwrap()).unwrap();
    assert_eq!(doc["underlay"], "ipv6", "{doc}");
    assert_eq!(doc["vxlan_overhead"], 70, "{doc}");
    assert_eq!(doc["self"]["underlay_ip"], N1, "{doc}");
    let paths = doc["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2, "{doc}");
    for path in paths {
        assert_eq!(
            (
                &path["mtu"],
                &path["overlay_mtu"],
                &path["tcp_mss"],
                &path["tcp_mss6"]
            ),
            (&1400.into(), &1330.into(), &1290.into(), &1270.into()),
            "{path}"
        );
    }
    assert_eq!(paths[0]["underlay_ip"], N2, "{doc}");

    // A path of 1349 bytes leaves 1279 for the overlay: below IPv6's minimum, said so.
    mesh.node
        .ip([
            "-6",
            "route",
            "replace",
            "2001:db8:7::/64",
            "via",
            PEER,
            "dev",
            "lbt0",
            "mtu",
            "1349",
        ])
        .unwrap();
    let text = mesh.lbctl.run(&["mesh", "show"]).unwrap();
    assert!(
        text.contains("path MTU 1349, overlay MTU 1279 (below IPv6's minimum of 1280"),
        "{text}"
    );
}

#[test]
fn the_maps_name_ipv6_nodes_by_key_and_hold_their_addresses() {
    let mesh = mesh();
    let contents = maps(&mesh);
    assert_eq!(contents.mesh.local_ip_be, key(N1), "this node's key, not 0");
    assert_eq!(contents.mesh6, octets(N1));
    assert_eq!(
        contents.nodes,
        [key(N2), key(N3)].into(),
        "NODES: the keys of the other nodes"
    );
    assert_eq!(
        contents.nodes6,
        BTreeMap::from([(octets(N2), key(N2)), (octets(N3), key(N3))])
    );
    assert_eq!(
        contents.node_addrs6,
        BTreeMap::from([(key(N2), octets(N2)), (key(N3), octets(N3))])
    );
    let backends: Vec<(u32, u8)> = contents
        .backends
        .values()
        .map(|b| (b.node_ip_be, b.flags))
        .collect();
    assert_eq!(
        backends,
        [
            (key(N2), BACKEND_ACTIVE),
            (key(N3), BACKEND_ACTIVE | BACKEND_IPV6)
        ]
    );

    // The next hop towards n2 and n3 has a managed IPv6 neighbour entry.
    let neigh = mesh
        .node
        .ip(["-6", "neigh", "show", PEER, "dev", "lbt0"])
        .unwrap();
    assert!(neigh.contains("managed"), "{neigh}");

    // n3 leaves (its backend first): out of NODES, NODES6 and NODE_ADDRS6.
    mesh.lbctl
        .run(&["backend", "rm", "web", "[2001:db8:5::8]:80@n3"])
        .unwrap();
    mesh.lbctl.run(&["node", "rm", "n3"]).unwrap();
    let contents = maps(&mesh);
    assert_eq!(contents.nodes, [key(N2)].into());
    assert_eq!(contents.nodes6, BTreeMap::from([(octets(N2), key(N2))]));
    assert_eq!(
        contents.node_addrs6,
        BTreeMap::from([(key(N2), octets(N2))])
    );

    // The pin as bpftool reads it (from here: `ip netns exec` mounts a /sys without the
    // bpffs): MESH6's slot 0 is n1's address.
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(mesh.lbctl.pin_dir().join("maps/MESH6"))
        .output()
        .expect("bpftool runs (`cargo xtask setup` installs it)");
    assert!(out.status.success(), "{out:?}");
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let value: Vec<u8> = dump[0]["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let text = b.as_str().unwrap();
            u8::from_str_radix(text.trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    assert_eq!(value, octets(N1), "{dump}");
}
