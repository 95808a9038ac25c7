//! The single-node topology with `web` published over every backend, and what the daemon
//! and failover tests read of it: shared by `daemon.rs` and `failover.rs`.
#![allow(
    dead_code,
    reason = "each test file that includes this module uses a part of it"
)]
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use lb_tests::{
    Lbctl,
    client::{self, Reply},
    topology::{NODE_UPLINK, SingleNode, SingleNodeSpec},
};

pub const WEB_PORT: u16 = 8080;

pub fn published(spec: SingleNodeSpec) -> (SingleNode, Lbctl) {
    lb_tests::require_root().unwrap();
    let topo = SingleNode::build(spec).unwrap();
    let lbctl = Lbctl::new(topo.node()).unwrap();
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    let backends: Vec<String> = (0..topo.backend_count())
        .map(|i| topo.backend_addr(i).to_string())
        .collect();
    let port = WEB_PORT.to_string();
    let mut args = vec!["service", "add", "web", port.as_str()];
    args.extend(backends.iter().map(String::as_str));
    lbctl.run(&args).unwrap();
    (topo, lbctl)
}

pub fn new_connections(topo: &SingleNode, count: usize) -> Vec<Reply> {
    let addr = SocketAddrV4::new(topo.node_uplink_ip(), WEB_PORT);
    topo.client()
        .in_netns(|| client::new_connections(addr, count))
        .unwrap()
}

/// `service ls --json`'s view of backend `i` of `web`.
pub fn backend_json(lbctl: &Lbctl, topo: &SingleNode, i: usize) -> serde_json::Value {
    let addr = topo.backend_addr(i).to_string();
    lbctl.listed_backend("web", &addr).unwrap()
}

/// Polls `service ls` until backend `i` has `health`; returns how long it took.
pub fn wait_for_health(lbctl: &Lbctl, topo: &SingleNode, i: usize, health: &str) -> Duration {
    let start = Instant::now();
    loop {
        let backend = backend_json(lbctl, topo, i);
        if backend["health"] == health {
            return start.elapsed();
        }
        // Generous: a loaded 2-core machine slows probes down; the time taken is reported.
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "backend {i} is still {} instead of {health}",
            backend["health"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn expected(topo: &SingleNode, served: &[usize], per: usize) -> BTreeMap<String, usize> {
    served
        .iter()
        .map(|&i| (topo.backend_name(i), per))
        .collect()
}
