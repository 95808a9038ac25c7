//! The flow tables' sizes, end to end: `attach --flow-capacity N --flow-capacity6 M` creates
//! the IPv4 flow maps with N entries and the IPv6 ones with M, which `stats`, `stats --json`,
//! `instances --json` and the attach report show; the sizes hold while the maps exist
//! (another size is refused with one line, changing nothing; `upgrade` keeps them), and
//! without `--flow-capacity6` the IPv6 tables take an eighth of N, at least 4,096.
use std::path::Path;

use lb_tests::{Lbctl, netns::NetNs};
use serde_json::Value;

const IPV4_MAPS: [&str; 3] = ["FLOWS", "REVERSE_FLOWS", "TUNNEL_REPLIES"];
const IPV6_MAPS: [&str; 3] = ["FLOWS6", "REVERSE_FLOWS6", "TUNNEL_REPLIES6"];

/// `(id, max_entries)` of the map pinned at `maps/NAME` (`bpftool map show pinned`).
fn flow_map(lbctl: &Lbctl, name: &str) -> (u64, u64) {
    let map = lb_tests::pinned_map(&lbctl.pin_dir().join("maps").join(name)).unwrap();
    (
        map["id"].as_u64().unwrap(),
        map["max_entries"].as_u64().unwrap(),
    )
}

/// Checks that the pinned IPv4 flow maps hold `ipv4` entries and the IPv6 ones `ipv6`, and
/// returns every flow map's `(id, max_entries)`.
fn check_pinned(lbctl: &Lbctl, ipv4: u64, ipv6: u64) -> Vec<(u64, u64)> {
    let sized = IPV4_MAPS
        .iter()
        .map(|name| (name, ipv4))
        .chain(IPV6_MAPS.iter().map(|name| (name, ipv6)));
    sized
        .map(|(name, entries)| {
            let map = flow_map(lbctl, name);
            assert_eq!(map.1, entries, "max_entries of {name}");
            map
        })
        .collect()
}

/// `(capacity, capacity6)` of `stats --json`'s flow table.
fn stats_capacities(lbctl: &Lbctl) -> (u64, u64) {
    let stats: Value = serde_json::from_str(&lbctl.run(&["stats", "--json"]).unwrap()).unwrap();
    let table = &stats["flow_table"];
    (
        table["capacity"].as_u64().unwrap(),
        table["capacity6"].as_u64().unwrap(),
    )
}

/// Runs `lbctl ARGS`, which must be refused with one line containing `why`.
fn refused(lbctl: &Lbctl, args: &[&str], why: &str) {
    let err = lbctl.run_expect_fail(args).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(why), "{args:?}: {err}");
}

fn state_file(lbctl: &Lbctl) -> Vec<u8> {
    std::fs::read(lbctl.state_dir().join("state.json")).unwrap()
}

#[test]
fn the_ipv6_flow_tables_take_the_size_chosen_when_their_maps_are_created() {
    lb_tests::require_root().unwrap();
    let ns = NetNs::new("flowcap6").unwrap();
    ns.add_veth_pair("lbt0", "lbt1").unwrap();
    let lbctl = Lbctl::new(&ns).unwrap();

    // Refused before anything exists: nothing is created.
    refused(
        &lbctl,
        &["attach", "lbt0", "--flow-capacity6", "0"],
        "invalid IPv6 flow capacity '0': must be at least 1",
    );
    refused(
        &lbctl,
        &["attach", "lbt0", "--flow-capacity", "0"],
        "invalid flow capacity '0': must be at least 1",
    );
    for bad in ["4294967296", "many"] {
        let err = lbctl
            .run_expect_exit(&["attach", "lbt0", "--flow-capacity6", bad], 2)
            .unwrap();
        assert!(err.contains("--flow-capacity6"), "{bad}: {err}");
    }
    assert!(!lbctl.state_dir().join("state.json").exists());
    assert!(!Path::new(&lbctl.pin_dir()).join("maps").exists());
    // A size the kernel refuses (its memory): the first attach fails, leaving no instance.
    let err = lbctl
        .run_expect_fail(&["attach", "lbt0", "--flow-capacity6", "4294967295"])
        .unwrap();
    assert!(
        err.contains("TUNNEL_REPLIES6") || err.contains("FLOWS6"),
        "{err}"
    );
    assert!(!lbctl.state_dir().join("state.json").exists());
    assert!(!Path::new(&lbctl.pin_dir()).exists(), "pins left behind");
    let listing = lbctl.run(&["instances"]).unwrap();
    assert!(!listing.contains(ns.name()), "{listing}");

    let attached = lbctl
        .run(&[
            "attach",
            "lbt0",
            "--flow-capacity",
            "8192",
            "--flow-capacity6",
            "16384",
        ])
        .unwrap();
    assert!(
        attached.contains("(flow table of 8192 flows, IPv6 16384; the maps hold"),
        "{attached}"
    );
    let maps = check_pinned(&lbctl, 8192, 16384);
    assert_eq!(stats_capacities(&lbctl), (8192, 16384));
    let stats = lbctl.run(&["stats"]).unwrap();
    assert!(stats.contains("IPv6 0 of 16384 (0%)"), "{stats}");
    let listing: Value =
        serde_json::from_str(&lbctl.run(&["instances", "--json"]).unwrap()).unwrap();
    let row = &listing["instances"][0];
    assert_eq!(
        (&row["flow_capacity"], &row["flow_capacity6"]),
        (&Value::from(8192), &Value::from(16384)),
        "{row:#}"
    );
    let state = state_file(&lbctl);

    // Another size while the maps exist: refused, nothing changes.
    refused(
        &lbctl,
        &["attach", "lbt0", "--flow-capacity6", "32768"],
        "the IPv6 flow table already holds 16384 flows; its size cannot change while its maps \
         exist (`lbctl purge` drops them)",
    );
    refused(
        &lbctl,
        &[
            "attach",
            "lbt0",
            "--flow-capacity",
            "8192",
            "--flow-capacity6",
            "0",
        ],
        "invalid IPv6 flow capacity '0'",
    );
    assert_eq!(state_file(&lbctl), state);
    assert_eq!(check_pinned(&lbctl, 8192, 16384), maps);

    // The same size, no size, and an upgrade keep the maps as they are.
    for args in [
        &["attach", "lbt0", "--flow-capacity6", "16384"][..],
        &["attach", "lbt0"],
        &["upgrade"],
    ] {
        let out = lbctl.run(args).unwrap();
        assert!(
            out.contains("flow table of 8192 flows, IPv6 16384"),
            "{args:?}: {out}"
        );
        assert_eq!(check_pinned(&lbctl, 8192, 16384), maps, "{args:?}");
        assert_eq!(stats_capacities(&lbctl), (8192, 16384), "{args:?}");
    }
    assert_eq!(state_file(&lbctl), state);

    // Once purged, the choice goes with the maps: the IPv6 tables take an eighth again. (Not
    // `Lbctl::purge`: the drop purges what is attached next.)
    lbctl.run(&["purge"]).unwrap();
    let attached = lbctl
        .run(&["attach", "lbt0", "--flow-capacity", "65536"])
        .unwrap();
    assert!(
        attached.contains("flow table of 65536 flows, IPv6 8192;"),
        "{attached}"
    );
    check_pinned(&lbctl, 65536, 8192);
    assert_eq!(stats_capacities(&lbctl), (65536, 8192));
    let state = String::from_utf8(state_file(&lbctl)).unwrap();
    assert!(!state.contains("flow_capacity6"), "{state}");
}
