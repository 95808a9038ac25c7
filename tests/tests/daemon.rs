//! End to end: `lbctl daemon` (health checks, metrics) and `backend drain`, on the single-node
//! topology with real TCP through the attached programs.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::{
    Lbctl,
    client::{self, KeepAlive, Reply, http_get_new_connection, per_backend},
    prometheus::{Prometheus, Sample, http_get},
    topology::{SingleNode, SingleNodeSpec},
};

mod single_node;

use single_node::*;

/// Probes `service`'s backends every 300 ms (timeout 250 ms, fall 2, rise 2), so that the
/// tests see health flip within seconds; returns what `service health` said.
fn fast_checks(lbctl: &Lbctl, service: &str) -> String {
    lbctl
        .run(&[
            "service",
            "health",
            service,
            "--interval",
            "300ms",
            "--timeout",
            "250ms",
            "--fall",
            "2",
            "--rise",
            "2",
        ])
        .unwrap()
}

#[test]
fn an_unhealthy_backend_gets_no_new_connections_and_returns_once_healthy() {
    let (mut topo, lbctl) = published(SingleNodeSpec::default());
    let (interval_ms, timeout_ms, fall) = (300, 250, 2);
    fast_checks(&lbctl, "web");
    let metrics: SocketAddr = "127.0.0.1:9617".parse().unwrap();
    let daemon = lbctl.start_daemon(metrics, topo.node()).unwrap();
    for i in 0..topo.backend_count() {
        wait_for_health(&lbctl, &topo, i, "healthy");
    }

    let down = 1;
    topo.stop_backend(down).unwrap();
    let took = wait_for_health(&lbctl, &topo, down, "unhealthy");
    // The detection window: `fall` failed probes, one interval apart, plus a probe timeout and
    // the polling of this test.
    let window = Duration::from_millis(interval_ms * (fall + 1) + timeout_ms + 500);
    println!("backend {down} stopped: unhealthy after {took:?} (window {window:?})");
    // Reported, and bounded generously only: a loaded 2-core machine delays probes.
    assert!(
        took <= window * 8,
        "detected after {took:?}, window {window:?}"
    );
    // From then on no new connection goes to it, and none fails.
    let replies = new_connections(&topo, 20);
    assert_eq!(per_backend(&replies), expected(&topo, &[0, 2], 10));

    topo.start_backend(down).unwrap();
    wait_for_health(&lbctl, &topo, down, "healthy");
    let replies = new_connections(&topo, 30);
    assert_eq!(per_backend(&replies), expected(&topo, &[0, 1, 2], 10));

    // Both flips of that backend are logged, each on its own line.
    let log = daemon.log_text();
    let addr = topo.backend_addr(down).to_string();
    let flips: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("backend health changed") && line.contains(&addr))
        .collect();
    for health in ["unhealthy", "healthy"] {
        let field = [format!("health={health}"), format!("health=\"{health}\"")];
        assert!(
            flips
                .iter()
                .any(|line| field.iter().any(|f| line.contains(f.as_str()))),
            "the flip to {health} of {addr} is logged: {log}"
        );
    }
}

/// A UDP service's backends are probed with a datagram, not a TCP connect to their port (which
/// marked every UDP backend unhealthy, and the service failed open): one whose host refuses it
/// (nothing listens there: ICMP port unreachable) turns unhealthy and gets no new flows, one
/// whose server takes it stays healthy.
#[test]
fn a_udp_service_is_probed_with_datagrams() {
    let (topo, lbctl) = published(SingleNodeSpec {
        backends: 2,
        ..SingleNodeSpec::default()
    });
    let live = topo.backend_udp_addr(0);
    let dead = SocketAddrV4::new(*topo.backend_udp_addr(1).ip(), live.port() + 1);
    let (live_text, dead_text) = (live.to_string(), dead.to_string());
    lbctl
        .run(&[
            "service", "add", "dns", "5400", &live_text, &dead_text, "--proto", "udp",
        ])
        .unwrap();
    let set = fast_checks(&lbctl, "dns");
    assert!(set.contains("UDP datagram"), "{set}");
    let metrics: SocketAddr = "127.0.0.1:9617".parse().unwrap();
    let _daemon = lbctl.start_daemon(metrics, topo.node()).unwrap();
    let health_of = |addr: &str| {
        let doc: serde_json::Value =
            serde_json::from_str(&lbctl.run(&["service", "ls", "--json"]).unwrap()).unwrap();
        let services = doc["services"].as_array().unwrap();
        let dns = services.iter().find(|s| s["name"] == "dns").unwrap();
        let backend = dns["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == addr);
        backend.unwrap()["health"].as_str().unwrap().to_owned()
    };
    let start = Instant::now();
    while (health_of(&live_text), health_of(&dead_text))
        != ("healthy".to_owned(), "unhealthy".to_owned())
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{live_text} {}, {dead_text} {}",
            health_of(&live_text),
            health_of(&dead_text)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let service = SocketAddrV4::new(topo.node_uplink_ip(), 5400);
    for _ in 0..6 {
        let reply = topo
            .client()
            .in_netns(|| client::udp_request(service))
            .unwrap();
        assert_eq!(reply.backend, topo.backend_name(0));
    }
}

/// `purge` takes the instance away from under a running daemon: the daemon sees it and stops
/// (exit 0, one log line) instead of warning every second until someone stops it.
#[test]
fn a_daemon_stops_once_its_instance_is_purged() {
    let (topo, mut lbctl) = published(SingleNodeSpec {
        backends: 1,
        ..SingleNodeSpec::default()
    });
    let metrics: SocketAddr = "127.0.0.1:9617".parse().unwrap();
    let mut daemon = lbctl.start_daemon(metrics, topo.node()).unwrap();
    lbctl.purge().unwrap();
    let status = daemon.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("the instance was purged"));
}

#[test]
fn every_backend_unhealthy_fails_open_and_is_counted() {
    let (topo, lbctl) = published(SingleNodeSpec {
        backends: 2,
        ..SingleNodeSpec::default()
    });
    // Only the probes fail: the servers are up, but the checks expect another status.
    lbctl
        .run(&[
            "service",
            "health",
            "web",
            "--http",
            "/",
            "--expect-status",
            "418",
            "--interval",
            "200ms",
            "--timeout",
            "150ms",
            "--fall",
            "1",
        ])
        .unwrap();
    let _daemon = lbctl
        .start_daemon("127.0.0.1:9617".parse().unwrap(), topo.node())
        .unwrap();
    for i in 0..2 {
        wait_for_health(&lbctl, &topo, i, "unhealthy");
    }
    let ls = lbctl.run(&["service", "ls"]).unwrap();
    assert!(ls.contains("FAILING OPEN"), "{ls}");
    let replies = new_connections(&topo, 4);
    assert_eq!(per_backend(&replies), expected(&topo, &[0, 1], 2));
    let stats: serde_json::Value =
        serde_json::from_str(&lbctl.run(&["stats", "--json"]).unwrap()).unwrap();
    assert_eq!(stats["events"]["flow_fail_open"], 4, "{stats}");
}

#[test]
fn a_drained_backend_keeps_its_connection_while_new_ones_avoid_it() {
    let (topo, lbctl) = published(SingleNodeSpec::default());
    let addr = SocketAddrV4::new(topo.node_uplink_ip(), WEB_PORT);
    topo.client().in_netns(|| {
        let mut kept = KeepAlive::connect(addr).unwrap();
        let first = kept.get().unwrap();
        let drained = (0..topo.backend_count())
            .find(|&i| topo.backend_name(i) == first.backend)
            .unwrap();
        let backend = topo.backend_addr(drained).to_string();
        lbctl.run(&["backend", "drain", "web", &backend]).unwrap();
        let view = backend_json(&lbctl, &topo, drained);
        assert_eq!(view["drained"], true);
        assert_eq!(view["live_flows"], 1, "the kept connection: {view}");

        let others: Vec<usize> = (0..topo.backend_count())
            .filter(|&i| i != drained)
            .collect();
        let replies: Vec<Reply> = (0..10)
            .map(|_| http_get_new_connection(addr).unwrap())
            .collect();
        assert_eq!(per_backend(&replies), expected(&topo, &others, 5));
        for _ in 0..3 {
            assert_eq!(kept.get().unwrap().backend, first.backend);
        }
        // The connection ends (FIN): the drained backend has no live flow left.
        drop(kept);
        let start = Instant::now();
        while backend_json(&lbctl, &topo, drained)["live_flows"] != 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "live flows stay");
            std::thread::sleep(Duration::from_millis(50));
        }
        lbctl.run(&["backend", "undrain", "web", &backend]).unwrap();
    });
    let replies = new_connections(&topo, 30);
    assert_eq!(per_backend(&replies), expected(&topo, &[0, 1, 2], 10));
}

/// `GET /metrics` from inside `topo`'s node namespace.
fn scrape(topo: &SingleNode, addr: SocketAddr) -> String {
    let (status, body) = topo.node().in_netns(|| http_get(addr, "/metrics")).unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one series (`name{labels}` exactly as exposed).
fn series(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[test]
fn metrics_survive_a_daemon_restart_and_the_daemon_stops_cleanly() {
    let (topo, lbctl) = published(SingleNodeSpec::default());
    let addr: SocketAddr = "127.0.0.1:9618".parse().unwrap();
    let mut daemon = lbctl.start_daemon(addr, topo.node()).unwrap();
    let replies = new_connections(&topo, 6);
    let page = scrape(&topo, addr);
    for line in [
        "# HELP lbctl_backend_connections_total",
        "# TYPE lbctl_build_info gauge",
    ] {
        assert!(page.contains(line), "{line} missing from\n{page}");
    }
    let status = daemon.stop().unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    // The data plane keeps forwarding without the daemon.
    let more = new_connections(&topo, 3);
    let _daemon = lbctl.start_daemon(addr, topo.node()).unwrap();
    let after = scrape(&topo, addr);
    for i in 0..topo.backend_count() {
        let sent = replies
            .iter()
            .chain(&more)
            .filter(|r| r.backend == topo.backend_name(i))
            .count();
        let name = format!(
            "lbctl_backend_connections_total{{service=\"web\",backend=\"{}\",node=\"\"}}",
            topo.backend_addr(i)
        );
        assert_eq!(
            series(&after, &name),
            Some(sent as f64),
            "{name} in\n{after}"
        );
    }
}

/// A real Prometheus scrapes the daemon; through its query API, each backend's new-connection
/// counter equals the connections the test sent to it (uneven on purpose: one backend is
/// drained half-way).
#[test]
fn prometheus_sees_each_backends_connections() {
    let (topo, lbctl) = published(SingleNodeSpec {
        backends: 4,
        ..SingleNodeSpec::default()
    });
    let addr: SocketAddr = "127.0.0.1:9619".parse().unwrap();
    let _daemon = lbctl.start_daemon(addr, topo.node()).unwrap();
    let mut replies = new_connections(&topo, 8);
    let drained = topo.backend_addr(3).to_string();
    lbctl.run(&["backend", "drain", "web", &drained]).unwrap();
    replies.extend(new_connections(&topo, 9));
    let sent = per_backend(&replies);
    assert_eq!(sent[&topo.backend_name(3)], 2, "{sent:?}");

    let prometheus = Prometheus::start(topo.node(), &[addr], Duration::from_secs(1)).unwrap();
    let expected: BTreeMap<String, f64> = (0..topo.backend_count())
        .map(|i| {
            let count = sent.get(&topo.backend_name(i)).copied().unwrap_or(0);
            (topo.backend_addr(i).to_string(), count as f64)
        })
        .collect();
    let matches = |samples: &[Sample]| {
        let seen: BTreeMap<String, f64> = samples
            .iter()
            .map(|s| (s.labels["backend"].clone(), s.value))
            .collect();
        seen == expected
    };
    prometheus
        .wait_until(
            "lbctl_backend_connections_total{service=\"web\"}",
            Duration::from_secs(30),
            matches,
        )
        .unwrap();
    let drained_now = prometheus
        .query(&format!("lbctl_backend_drained{{backend=\"{drained}\"}}"))
        .unwrap();
    assert_eq!(drained_now.len(), 1);
    assert_eq!(drained_now[0].value, 1.0);
}
