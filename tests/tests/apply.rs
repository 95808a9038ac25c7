//! `lbctl apply`: a whole table from a file, end to end. A file is applied and balances real
//! connections; a changed file (a backend removed, a service added, one removed) is applied
//! while a kept-alive connection stays on its backend; a bad file exits non-zero and changes
//! nothing; the exported table applies back to itself.
use std::net::SocketAddrV4;

use lb_tests::{
    Lbctl,
    client::{self, KeepAlive, http_get_new_connection, per_backend},
    topology::{NODE_UPLINK, SingleNode, SingleNodeSpec},
};
use serde_json::json;

/// Writes `table` to a file in the instance's state folder and returns its path.
fn table_file(lbctl: &Lbctl, name: &str, table: &serde_json::Value) -> String {
    let path = lbctl.state_dir().join(name);
    std::fs::write(&path, serde_json::to_string_pretty(table).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// What `lbctl` reports of the table and its maps' state, to compare before and after.
fn snapshot(lbctl: &Lbctl) -> (String, String) {
    (
        lbctl.run(&["service", "ls", "--json"]).unwrap(),
        lbctl.run(&["export"]).unwrap(),
    )
}

#[test]
fn a_table_file_is_applied_whole_and_changes_keep_established_flows() {
    lb_tests::require_root().unwrap();
    let topo = SingleNode::build(SingleNodeSpec::default()).unwrap();
    let lbctl = Lbctl::new(topo.node()).unwrap();
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    let b: Vec<String> = (0..3).map(|i| topo.backend_addr(i).to_string()).collect();
    let at = |port: u16| SocketAddrV4::new(topo.node_uplink_ip(), port);
    let counts = |port: u16, n: usize| {
        per_backend(
            &topo
                .client()
                .in_netns(|| client::new_connections(at(port), n))
                .unwrap(),
        )
    };
    let name = |i: usize| topo.backend_name(i);

    let first = table_file(
        &lbctl,
        "first.json",
        &json!({"services": [
            {"name": "web", "port": 8080, "backends": [b[0], b[1], b[2]]},
            {"name": "api", "port": 9090, "backends": [b[0], b[1]], "health": {"http": "/"}},
        ]}),
    );
    let dry = lbctl.run(&["apply", "--dry-run", &first]).unwrap();
    assert!(dry.contains("+ service web tcp/8080"), "{dry}");
    assert!(dry.contains("dry run, nothing changed"), "{dry}");
    client::assert_refused(
        http_get_result(&topo, at(8080)),
        "a dry run publishes nothing",
    );
    let out = lbctl.run(&["apply", &first]).unwrap();
    assert!(
        out.contains("services: 2 added, 0 removed, 0 changed, 0 unchanged; backends: 5 added"),
        "{out}"
    );
    let web = counts(8080, 30);
    assert_eq!(web, [(name(0), 10), (name(1), 10), (name(2), 10)].into());
    assert_eq!(counts(9090, 10), [(name(0), 5), (name(1), 5)].into());

    // A connection kept alive on web; the changed file removes another backend of web, adds
    // a service and removes api.
    topo.client().in_netns(|| {
        let mut kept = KeepAlive::connect(at(8080)).unwrap();
        let pinned = kept.get().unwrap().backend;
        let removed = (0..3).find(|&i| name(i) != pinned).unwrap();
        let staying: Vec<&String> = (0..3).filter(|&i| i != removed).map(|i| &b[i]).collect();
        let second = table_file(
            &lbctl,
            "second.json",
            &json!({"services": [
                {"name": "web", "port": 8080, "backends": staying},
                {"name": "admin", "port": 7070, "backends": [b[2]]},
            ]}),
        );
        let out = lbctl.run(&["apply", &second]).unwrap();
        assert!(out.contains(&format!("- {}", b[removed])), "{out}");
        assert!(out.contains("+ service admin tcp/7070"), "{out}");
        assert!(out.contains("- service api tcp/9090"), "{out}");
        // The backends that stay kept their ids: their counters go on.
        let listed: serde_json::Value =
            serde_json::from_str(&lbctl.run(&["service", "ls", "--json"]).unwrap()).unwrap();
        let web = &listed["services"][0];
        assert_eq!(web["name"], "web");
        for backend in web["backends"].as_array().unwrap() {
            assert!(backend["new_flows"].as_u64().unwrap() >= 10, "{backend}");
        }
        for _ in 0..5 {
            assert_eq!(kept.get().unwrap().backend, pinned, "the kept flow moved");
        }
        let web = per_backend(&client::new_connections(at(8080), 10).unwrap());
        assert_eq!(web.get(&name(removed)), None, "{web:?}");
        assert_eq!(web.values().sum::<usize>(), 10);
        assert!(web.values().all(|&n| n == 5), "{web:?}");
        client::assert_refused(http_get_new_connection(at(9090)), "api is gone");
        assert_eq!(http_get_new_connection(at(7070)).unwrap().backend, name(2));
        assert_eq!(kept.get().unwrap().backend, pinned);
    });

    // The exported table applies back to itself; a bad file changes nothing and exits 1.
    // (After the kept connection's FIN has crossed, so its live flow count is final.)
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = snapshot(&lbctl);
    let exported = lbctl.state_dir().join("exported.json");
    std::fs::write(&exported, &before.1).unwrap();
    let out = lbctl.run(&["apply", exported.to_str().unwrap()]).unwrap();
    assert!(out.contains("nothing changed"), "{out}");
    let truncated = lbctl.state_dir().join("truncated.json");
    std::fs::write(&truncated, &before.1[..before.1.len() / 2]).unwrap();
    let bad_backend = table_file(
        &lbctl,
        "bad-backend.json",
        &json!({"services": [{"name": "web", "port": 8080, "backends": [b[0], "10.0.0.300:80"]}]}),
    );
    let same_port = table_file(
        &lbctl,
        "same-port.json",
        &json!({"services": [
            {"name": "web", "port": 8080, "backends": [b[0]]},
            {"name": "www", "port": 8080, "backends": [b[1]]},
        ]}),
    );
    for (file, named) in [
        (truncated.to_str().unwrap(), "line"),
        (&bad_backend, "invalid backend '10.0.0.300:80'"),
        (
            &same_port,
            "port tcp/8080 is already published by service 'web'",
        ),
        ("/nonexistent/table.json", "/nonexistent/table.json"),
    ] {
        let err = lbctl.run_expect_fail(&["apply", file]).unwrap();
        assert!(err.contains(named), "{file}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert_eq!(snapshot(&lbctl), before, "{file} changed something");
    }
    assert_eq!(
        http_get_new_connection_in(&topo, at(7070)).backend,
        name(2),
        "still balanced"
    );
}

fn http_get_result(topo: &SingleNode, addr: SocketAddrV4) -> anyhow::Result<client::Reply> {
    topo.client().in_netns(|| http_get_new_connection(addr))
}

fn http_get_new_connection_in(topo: &SingleNode, addr: SocketAddrV4) -> client::Reply {
    http_get_result(topo, addr).unwrap()
}
