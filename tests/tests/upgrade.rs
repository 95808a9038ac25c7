//! Upgrades and restarts lose nothing: the programs are replaced in place (`lbctl attach` again,
//! `lbctl upgrade`) and the daemon restarts while a client keeps connections open and opens new
//! ones; maps an older lbctl pinned smaller are migrated; maps an incompatible lbctl pinned are
//! refused, changing nothing.
use std::{
    collections::{BTreeSet, HashMap},
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use lb_common::{BackendStats, Counter, FlowKey, REASON_COUNT, map_names};
use lb_tests::{
    Lbctl,
    client::{self, KeepAlive, http_get_new_connection, per_backend},
    topology::{NODE_UPLINK, SingleNode, SingleNodeSpec},
};
use lb_userspace::{dataplane::Maps, dataplane::layout::Layout, dataplane::migrate::Migration};

const WEB_PORT: u16 = 8080;

/// Three backends behind `web` on port 8080.
fn published() -> (SingleNode, Lbctl) {
    lb_tests::require_root().unwrap();
    let topo = SingleNode::build(SingleNodeSpec::default()).unwrap();
    let lbctl = Lbctl::new(topo.node()).unwrap();
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    let backends: Vec<String> = (0..3).map(|i| topo.backend_addr(i).to_string()).collect();
    let mut args = vec!["service", "add", "web", "8080"];
    args.extend(backends.iter().map(String::as_str));
    lbctl.run(&args).unwrap();
    (topo, lbctl)
}

fn web(topo: &SingleNode) -> SocketAddrV4 {
    SocketAddrV4::new(topo.node_uplink_ip(), WEB_PORT)
}

fn maps_dir(lbctl: &Lbctl) -> PathBuf {
    lbctl.pin_dir().join("maps")
}

/// The flow table: each flow's backend id.
fn flows(lbctl: &Lbctl) -> HashMap<FlowKey, u32> {
    let maps = Maps::open_pinned(&maps_dir(lbctl)).unwrap();
    maps.flows
        .iter()
        .map(|entry| entry.map(|(key, flow)| (key, flow.backend_id)))
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Fails unless every flow of `before` is still in the table. (Ended connections' entries may
/// have chosen another backend since: a client reuses a source port soon after a close, and a
/// SYN on an ended flow's 5-tuple is a new flow. The kept-alive connections' replies show that
/// open connections keep theirs.)
fn assert_flows_kept(lbctl: &Lbctl, before: &HashMap<FlowKey, u32>, after_what: &str) {
    let now = flows(lbctl);
    let lost = before.keys().filter(|key| !now.contains_key(key)).count();
    assert_eq!(
        lost,
        0,
        "{lost} of {} flows lost by {after_what}",
        before.len()
    );
}

/// (link id, program id) of the interface's XDP and TC links.
fn links(lbctl: &Lbctl) -> [(u32, u32); 2] {
    ["xdp", "tc"].map(|kind| {
        let pin = lbctl
            .pin_dir()
            .join("links")
            .join(format!("{NODE_UPLINK}_{kind}"));
        let info = FdLink::from(PinnedLink::from_pin(&pin).unwrap())
            .info()
            .unwrap();
        (info.id(), info.program_id())
    })
}

/// The new-flow counter of each backend (ids 0 to 2).
fn new_flow_counters(lbctl: &Lbctl) -> Vec<u64> {
    let maps = Maps::open_pinned(&maps_dir(lbctl)).unwrap();
    (0..3)
        .map(|id| maps.backend_totals(id).unwrap().new_flows)
        .collect()
}

/// Raises its flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the client threads saw.
#[derive(Debug, Default)]
struct Traffic {
    requests: usize,
    failures: Vec<String>,
}

#[test]
fn programs_are_replaced_in_place_and_the_daemon_restarts_without_losing_a_request() {
    let (topo, lbctl) = published();
    let addr = web(&topo);
    let metrics: SocketAddr = "127.0.0.1:9617".parse().unwrap();
    let mut daemon = lbctl.start_daemon(metrics, topo.node()).unwrap();
    // Two kept-alive connections per backend, each remembering the backend it started on.
    let mut kept: Vec<(KeepAlive, String)> = topo
        .client()
        .in_netns(|| {
            (0..6)
                .map(|_| {
                    let mut conn = KeepAlive::connect(addr)?;
                    let backend = conn.get()?.backend;
                    Ok((conn, backend))
                })
                .collect::<anyhow::Result<_>>()
        })
        .unwrap();
    let started_on: BTreeSet<&str> = kept.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(started_on.len(), 3, "{started_on:?}");

    let stop = AtomicBool::new(false);
    let (kept_traffic, new_traffic) = std::thread::scope(|scope| {
        // A failed assertion below must stop the client threads too, or the scope would wait
        // for them for ever.
        let _stop_when_done = StopOnDrop(&stop);
        let kept_alive = scope.spawn(|| {
            let mut seen = Traffic::default();
            while !stop.load(Ordering::Relaxed) {
                for (conn, backend) in kept.iter_mut() {
                    match conn.get() {
                        Ok(reply) if reply.backend == *backend => seen.requests += 1,
                        Ok(reply) => seen.failures.push(format!(
                            "a kept-alive connection moved from {backend} to {}",
                            reply.backend
                        )),
                        Err(err) => seen.failures.push(format!("{err:#}")),
                    }
                }
            }
            seen
        });
        let new_ones = scope.spawn(|| {
            topo.client().in_netns(|| {
                let mut seen = Traffic::default();
                while !stop.load(Ordering::Relaxed) {
                    match http_get_new_connection(addr) {
                        Ok(_) => seen.requests += 1,
                        Err(err) => seen.failures.push(format!("{err:#}")),
                    }
                }
                seen
            })
        });

        let mut counters = new_flow_counters(&lbctl);
        let mut check_counters = |after_what: &str| {
            let now = new_flow_counters(&lbctl);
            for (id, (then, now)) in counters.iter().zip(&now).enumerate() {
                assert!(
                    now >= then,
                    "backend {id}'s new-flow counter went back from {then} to {now} after {after_what}"
                );
            }
            counters = now;
        };
        for round in 0..4 {
            std::thread::sleep(Duration::from_millis(300));
            let (flows_before, links_before) = (flows(&lbctl), links(&lbctl));
            let command: &[&str] = if round % 2 == 0 {
                &["attach", NODE_UPLINK]
            } else {
                &["upgrade"]
            };
            let out = lbctl.run(command).unwrap();
            assert!(out.contains("replaced in place"), "{out}");
            assert!(out.contains("kept as they were"), "{out}");
            let links_after = links(&lbctl);
            for ((link, program), (link_after, program_after)) in
                links_before.iter().zip(&links_after)
            {
                assert_eq!(link, link_after, "the same link, updated in place");
                assert_ne!(program, program_after, "a new program on link {link}");
            }
            assert_flows_kept(&lbctl, &flows_before, command[0]);
            check_counters(command[0]);

            if round % 2 == 1 {
                let flows_before = flows(&lbctl);
                daemon.stop().unwrap();
                daemon = lbctl.start_daemon(metrics, topo.node()).unwrap();
                assert_flows_kept(&lbctl, &flows_before, "a daemon restart");
                check_counters("a daemon restart");
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (kept_alive.join().unwrap(), new_ones.join().unwrap())
    });
    assert!(
        kept_traffic.failures.is_empty() && new_traffic.failures.is_empty(),
        "kept-alive: {:?}\nnew connections: {:?}",
        kept_traffic.failures,
        new_traffic.failures
    );
    // Enough traffic that a gap in the data plane would have been hit.
    assert!(
        kept_traffic.requests >= 200 && new_traffic.requests >= 100,
        "only {kept_traffic:?} kept-alive and {new_traffic:?} new-connection requests"
    );
    let log = daemon.log_text();
    assert!(!log.contains("ERROR"), "{log}");
}

/// Writes a layout version into the record pinned with the maps, as a later lbctl would.
fn record_version(lbctl: &Lbctl, map: &str, version: u32) {
    let path = maps_dir(lbctl).join(lb_userspace::dataplane::layout::VERSIONS_MAP);
    let mut versions: BpfHashMap<MapData, [u8; 32], u32> =
        aya::maps::Map::from_map_data(MapData::from_pin(&path).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    let mut key = [0u8; 32];
    key[..map.len()].copy_from_slice(map.as_bytes());
    versions.insert(key, version, 0).unwrap();
}

#[test]
fn maps_an_incompatible_lbctl_pinned_are_refused_and_nothing_changes() {
    let (topo, lbctl) = published();
    let addr = web(&topo);
    let mut conn = topo.client().in_netns(|| KeepAlive::connect(addr)).unwrap();
    let backend = conn.get().unwrap().backend;
    // A later lbctl changed the meaning of the flow table's bytes and said so with the pins.
    record_version(&lbctl, map_names::FLOWS, 2);
    let (flows_before, links_before) = (flows(&lbctl), links(&lbctl));

    for command in [&["attach", NODE_UPLINK][..], &["upgrade"]] {
        let err = lbctl.run_expect_fail(command).unwrap();
        for expected in [
            "FLOWS: pinned as LRU hash, key 16 B, value 24 B",
            "layout version 2; this lbctl's is",
            "layout version 1: made by a later lbctl",
            "Nothing was changed",
            "lbctl export > table.json && lbctl purge && lbctl attach IFACE && lbctl apply table.json",
        ] {
            assert!(err.contains(expected), "{expected:?} not in {err}");
        }
        assert_eq!(
            links(&lbctl),
            links_before,
            "{command:?} changed the programs"
        );
        assert_flows_kept(&lbctl, &flows_before, command[0]);
        assert_eq!(conn.get().unwrap().backend, backend);
    }

    // The way out the message gives: the table survives it, flows and counters do not.
    let table = lbctl.run(&["export"]).unwrap();
    let file = lbctl.state_dir().with_extension("table.json");
    std::fs::write(&file, table).unwrap();
    lbctl.run(&["purge"]).unwrap();
    lbctl.run(&["attach", NODE_UPLINK]).unwrap();
    lbctl.run(&["apply", file.to_str().unwrap()]).unwrap();
    std::fs::remove_file(&file).unwrap();
    let replies = topo
        .client()
        .in_netns(|| client::new_connections(addr, 9))
        .unwrap();
    assert_eq!(per_backend(&replies).values().collect::<Vec<_>>(), [&3; 3]);
}

/// A map at `path`, replaced by `older` (pinned in its place): what the pins of an older lbctl
/// look like to this one. The programs attached keep the map they have.
fn pin_in_place_of(path: &Path, older: &MapData) {
    std::fs::remove_file(path).unwrap();
    older.pin(path).unwrap();
}

#[test]
fn maps_an_older_lbctl_pinned_with_fewer_entries_or_a_shorter_value_are_migrated() {
    let (topo, lbctl) = published();
    let addr = web(&topo);
    let mut conn = topo.client().in_netns(|| KeepAlive::connect(addr)).unwrap();
    let backend = conn.get().unwrap().backend;
    topo.client()
        .in_netns(|| client::new_connections(addr, 9))
        .unwrap();
    let dir = maps_dir(&lbctl);
    let maps = Maps::open_pinned(&dir).unwrap();
    let reasons = maps.reason_totals().unwrap();
    let backends: Vec<BackendStats> = (0..3).map(|id| maps.backend_totals(id).unwrap()).collect();
    let flows_before = flows(&lbctl);
    let cpus = aya::util::nr_cpus().unwrap();

    // An older lbctl knew two reasons fewer, and counted no new flows per backend: its
    // BACKEND_STATS values end before `new_flows`. Its counts are this run's, on CPU 0.
    let mut older_reasons = PerCpuArray::<MapData, Counter>::create(REASON_COUNT - 2, 0).unwrap();
    for (reason, total) in reasons.iter().enumerate().take(REASON_COUNT as usize - 2) {
        let mut values = vec![Counter::default(); cpus];
        values[0] = *total;
        older_reasons
            .set(reason as u32, PerCpuValues::try_from(values).unwrap(), 0)
            .unwrap();
    }
    let mut older_backends =
        PerCpuArray::<MapData, [u64; 4]>::create(lb_common::MAX_BACKENDS, 0).unwrap();
    for (id, totals) in backends.iter().enumerate() {
        let mut values = vec![[0u64; 4]; cpus];
        values[0] = [
            totals.packets,
            totals.bytes,
            totals.reply_packets,
            totals.reply_bytes,
        ];
        older_backends
            .set(id as u32, PerCpuValues::try_from(values).unwrap(), 0)
            .unwrap();
    }
    pin_in_place_of(&dir.join(map_names::REASON_STATS), older_reasons.map());
    pin_in_place_of(&dir.join(map_names::BACKEND_STATS), older_backends.map());
    // And it had no SERVICE_PORTS: without it filled, no packet would find a service.
    std::fs::remove_file(dir.join(map_names::SERVICE_PORTS)).unwrap();
    // This lbctl refuses to change such an instance's table before `upgrade`, and saves nothing.
    let api = topo.backend_addr(0).to_string();
    let refused = lbctl
        .run(&["service", "add", "api", "8081", &api])
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("have no SERVICE_PORTS") && refused.contains("run `lbctl upgrade`"),
        "{refused}"
    );

    let out = lbctl.run(&["upgrade"]).unwrap();
    let reason_entries = format!("{} → {REASON_COUNT} entries", REASON_COUNT - 2);
    // Every map but the two migrated ones and the created one.
    let kept = format!("{} kept as they were", map_names::ALL.len() - 3);
    for expected in [
        kept.as_str(),
        "created SERVICE_PORTS",
        "migrated BACKEND_STATS (value 32 → 40 B",
        &reason_entries,
    ] {
        assert!(out.contains(expected), "{expected:?} not in {out}");
    }
    let maps = Maps::open_pinned(&dir).unwrap();
    let migrated = maps.reason_totals().unwrap();
    let older = REASON_COUNT as usize - 2;
    for (reason, (now, then)) in migrated.iter().zip(&reasons).take(older).enumerate() {
        // Stray packets (IPv6 neighbour discovery) may be counted since the swap.
        assert!(
            (then.packets..then.packets + 10).contains(&now.packets),
            "reason {reason}: {then:?} became {now:?}"
        );
    }
    // Mesh drops, which a single node never counts.
    assert_eq!(migrated[older..], [Counter::default(); 2]);
    for (id, totals) in backends.iter().enumerate() {
        // The appended field starts at zero; the others are the older map's.
        let expected = BackendStats {
            new_flows: 0,
            ..*totals
        };
        assert_eq!(
            maps.backend_totals(id as u32).unwrap(),
            expected,
            "backend {id}"
        );
    }
    assert_flows_kept(&lbctl, &flows_before, "the migration");

    // The new programs count on from the migrated counts, and the flows stayed.
    assert_eq!(conn.get().unwrap().backend, backend);
    let replies = topo
        .client()
        .in_netns(|| client::new_connections(addr, 9))
        .unwrap();
    assert_eq!(per_backend(&replies).values().collect::<Vec<_>>(), [&3; 3]);
    for (id, totals) in backends.iter().enumerate() {
        let now = maps.backend_totals(id as u32).unwrap();
        assert_eq!(now.new_flows, 3, "backend {id}");
        assert!(now.packets > totals.packets, "backend {id}: {now:?}");
    }
    assert!(!lbctl.run(&["service", "ls"]).unwrap().contains("api"));
    // Recorded: the next upgrade keeps every map.
    let out = lbctl.run(&["upgrade"]).unwrap();
    let all = format!("{} kept as they were", map_names::ALL.len());
    assert!(out.contains(&all), "{out}");
}

/// A second handle on the same map, for the migration to own.
fn handle(map: &MapData) -> MapData {
    MapData::from_fd(map.fd().as_fd().try_clone_to_owned().unwrap()).unwrap()
}

#[test]
fn a_migration_catches_up_with_what_the_old_programs_wrote_during_the_copy() {
    lb_tests::require_root().unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let per_cpu = |first: [u64; 2]| {
        let mut values = vec![[0u64; 2]; cpus];
        values[0] = first;
        PerCpuValues::try_from(values).unwrap()
    };
    // Per-CPU counters: 2 of them in 4 slots, then 3 in 6.
    let (percpu_array, hash) = (6, 1);
    let mut old_counters = PerCpuArray::<MapData, [u64; 2]>::create(4, 0).unwrap();
    let new_counters = PerCpuArray::<MapData, [u64; 3]>::create(6, 0).unwrap();
    old_counters.set(1, per_cpu([1, 2]), 0).unwrap();
    let layout = |map_type, value_size, max_entries| Layout {
        map_type,
        key_size: 4,
        value_size,
        max_entries,
        version: 1,
    };
    let counters = Migration::copy(
        "COUNTERS",
        handle(old_counters.map()),
        handle(new_counters.map()),
        layout(percpu_array, 16, 4),
        layout(percpu_array, 24, 6),
    )
    .unwrap();
    // Old programs count on before the swap, the new ones after it.
    old_counters.set(1, per_cpu([11, 22]), 0).unwrap();
    old_counters.set(3, per_cpu([5, 0]), 0).unwrap();
    let mut new_counters = new_counters;
    let mut counted = vec![[0u64; 3]; cpus];
    counted[0] = [1 + 100, 2, 7];
    new_counters
        .set(1, PerCpuValues::try_from(counted).unwrap(), 0)
        .unwrap();

    // A hash whose value grew from 4 to 8 bytes: a key the copy saw, one added after it.
    let mut old_flows = BpfHashMap::<MapData, u32, u32>::create(16, 0).unwrap();
    let new_flows = BpfHashMap::<MapData, u32, [u32; 2]>::create(16, 0).unwrap();
    old_flows.insert(1, 10, 0).unwrap();
    let flows = Migration::copy(
        "FLOWS",
        handle(old_flows.map()),
        handle(new_flows.map()),
        layout(hash, 4, 16),
        layout(hash, 8, 16),
    )
    .unwrap();
    assert_eq!(new_flows.get(&1, 0).unwrap(), [10, 0]);
    old_flows.insert(2, 20, 0).unwrap();
    // Refreshed by an old program after the copy: the new programs' entry stays.
    old_flows.insert(1, 11, 0).unwrap();

    assert_eq!(counters.catch_up().unwrap(), 2);
    assert_eq!(flows.catch_up().unwrap(), 1);
    let slot = |index: u32| new_counters.get(&index, 0).unwrap()[0];
    assert_eq!(slot(1), [1 + 100 + 10, 2 + 20, 7]);
    assert_eq!(slot(3), [5, 0, 0]);
    assert_eq!(slot(0), [0, 0, 0]);
    assert_eq!(new_flows.get(&1, 0).unwrap(), [10, 0]);
    assert_eq!(new_flows.get(&2, 0).unwrap(), [20, 0]);
}
