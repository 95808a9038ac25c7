//! Time of `metrics::render` for 1,000 services of 10 backends (110,000 series), printed, not
//! asserted. Run it optimised:
//!
//! ```text
//! cargo test --release -p lb-userspace --bench render -- --nocapture
//! ```
use std::{hint::black_box, time::Instant};

use lb_common::BackendStats;
use lb_userspace::{
    daemon::metrics::{BackendSnapshot, ServiceSnapshot, Snapshot, render},
    table::{Health, Proto, Scheduler},
};

const RUNS: usize = 50;

#[test]
fn render_1000_services_of_10_backends() {
    let snapshot = Snapshot {
        instance: "lb-node-1".into(),
        node: Some("node-1".into()),
        version: env!("CARGO_PKG_VERSION").into(),
        reasons: (lb_common::Reason::ALL.iter())
            .map(|r| (r.name(), u64::MAX / 3, u64::MAX / 2))
            .collect(),
        services: (0..1000u32)
            .map(|s| ServiceSnapshot {
                name: format!("svc-{s:04}"),
                id: s + 1,
                proto: Proto::Tcp,
                port: 10_000 + s as u16,
                vip: None,
                frontend: format!("tcp/{}", 10_000 + s),
                scheduler: Scheduler::default(),
                health_check: String::new(),
                fail_open: false,
                origin: Default::default(),
                backends: (0..10u32)
                    .map(|b| BackendSnapshot {
                        addr: format!("10.{}.{}.{b}:8080", s / 256, s % 256)
                            .parse()
                            .unwrap(),
                        id: s * 10 + b + 1,
                        node: (b % 2 == 1).then(|| format!("node-{b}")),
                        health: [Health::Healthy, Health::Unhealthy, Health::Unknown]
                            [b as usize % 3],
                        drained: false,
                        weight: 1,
                        stats: Some(BackendStats {
                            packets: 123_456_789_012,
                            bytes: 98_765_432_109_876,
                            reply_packets: 123_456_789,
                            reply_bytes: 98_765_432_109,
                            new_flows: 1_234_567,
                        }),
                        live_flows: Some(1234),
                        passive: Some(lb_common::PassiveHealth {
                            refused: 12_345,
                            unanswered: 678,
                            ejections: 9,
                            returns: 8,
                            ..Default::default()
                        }),
                        ejected: Some(b == 3),
                    })
                    .collect(),
            })
            .collect(),
        ..Snapshot::default()
    };
    let page = render(&snapshot);
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            black_box(render(black_box(&snapshot)));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "render: {} lines, {} bytes (buffer of {}); over {RUNS} runs min {:.2} ms, median {:.2} ms, max {:.2} ms",
        page.lines().count(),
        page.len(),
        page.capacity(),
        times[0],
        times[RUNS / 2],
        times[RUNS - 1],
    );
}
