//! End to end: schedulers and weights through the command line, and what becomes of a
//! kept-alive connection when the flow table forgets it. For the latter the node's flow table
//! is shrunk to 64 flows (`lbctl attach --flow-capacity 64`) and churned by hundreds of other
//! connections, so the LRU evicts the kept connection's entries, as a busy table evicts its idle
//! flows: on a maglev service the connection goes on with its backend; on a round-robin service
//! it is reset at once. Either way new connections keep being served, the table never holds
//! more than its capacity, and the evictions are counted.
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use lb_tests::{
    Lbctl,
    client::{self, KeepAlive, Reply},
    topology::{NODE_UPLINK, SingleNode, SingleNodeSpec},
};
use lb_userspace::{dataplane::Maps, instance};

/// Flows the shrunk table holds.
const CAPACITY: u64 = 64;
/// New connections that churn the table: several times its capacity.
const CHURN: usize = 300;
/// Rounds of `CHURN` connections at most before the test gives up waiting for the eviction.
const CHURN_ROUNDS: usize = 5;

/// The default topology (three backends), lbctl attached with `attach_args` and `web` on port
/// 8080 added with `add_args`, over the backends each followed by its `weights` suffix.
fn published(
    attach_args: &[&str],
    add_args: &[&str],
    weights: [&str; 3],
) -> (SingleNode, Lbctl, SocketAddrV4) {
    lb_tests::require_root().unwrap();
    let topo = SingleNode::build(SingleNodeSpec::default()).unwrap();
    let lbctl = Lbctl::new(topo.node()).unwrap();
    lbctl
        .run(&[&["attach", NODE_UPLINK], attach_args].concat())
        .unwrap();
    let backends: Vec<String> = (0..topo.backend_count())
        .map(|i| format!("{}{}", topo.backend_addr(i), weights[i]))
        .collect();
    let mut args = [&["service", "add", "web", "8080"], add_args].concat();
    args.extend(backends.iter().map(String::as_str));
    lbctl.run(&args).unwrap();
    let addr = SocketAddrV4::new(topo.node_uplink_ip(), 8080);
    (topo, lbctl, addr)
}

/// [`published`] with a flow table of `CAPACITY` flows and `scheduler`.
fn shrunk(scheduler: &str) -> (SingleNode, Lbctl, SocketAddrV4) {
    let capacity = CAPACITY.to_string();
    published(
        &["--flow-capacity", &capacity],
        &["--scheduler", scheduler],
        ["", "", ""],
    )
}

/// What became of a kept-alive connection whose entry the churn evicted.
struct Churned {
    /// The reply to its request before the churn.
    first: Reply,
    /// The replies on the new connections of the churn.
    churn: Vec<Reply>,
    /// Its request after the churn.
    again: anyhow::Result<Reply>,
    /// Whether the flow table holds its flow again after that request.
    recorded_again: bool,
}

/// Opens a kept-alive connection and makes a request on it, churns the table with `CHURN` new
/// connections (each must be served) until the kept connection's entry is gone, lets it idle a
/// little longer than the data plane's one-second refresh granularity, then makes a second
/// request on it.
///
/// The client runs on one CPU: the kernel's LRU keeps the entries a CPU inserted on that CPU's
/// own list until that CPU needs room, so churn from another CPU might never evict the kept
/// connection's entry.
fn churn_around_a_kept_connection(topo: &SingleNode, addr: SocketAddrV4) -> Churned {
    // Where the instance pins its maps: lbctl's default bpffs, as the harness runs it.
    let maps_dir = Path::new(instance::DEFAULT_BPFFS)
        .join("lbctl")
        .join(topo.node().name())
        .join("maps");
    topo.client().in_netns(|| {
        run_on_one_cpu();
        let mut kept = KeepAlive::connect(addr).unwrap();
        let first = kept.get().unwrap();
        let local = kept.local_addr().unwrap();
        let maps = Maps::open_pinned(&maps_dir).unwrap();
        let mut churn = Vec::new();
        while has_flow(&maps, local) {
            assert!(
                churn.len() < CHURN * CHURN_ROUNDS,
                "the LRU kept the entry of {local} through {} new connections",
                churn.len()
            );
            churn.extend(client::new_connections(addr, CHURN).unwrap());
        }
        std::thread::sleep(Duration::from_millis(1100));
        let again = kept.get();
        Churned {
            first,
            churn,
            again,
            recorded_again: has_flow(&maps, local),
        }
    })
}

/// Pins the calling thread to one CPU (the first this process may run on): the LRU flow table
/// keeps free entries per CPU, so churn from one CPU evicts in a predictable order.
fn run_on_one_cpu() {
    lb_tests::cpu::pin(0, lb_tests::cpu::first().unwrap()).unwrap();
}

/// Whether the flow table holds the flow of the client socket `local`.
fn has_flow(maps: &Maps, local: SocketAddr) -> bool {
    maps.flows.iter().filter_map(Result::ok).any(|(key, _)| {
        u16::from_be(key.src_port_be) == local.port() && u16::from_be(key.dst_port_be) == 8080
    })
}

fn stats_json(lbctl: &Lbctl) -> serde_json::Value {
    serde_json::from_str(&lbctl.run(&["stats", "--json"]).unwrap()).unwrap()
}

/// The flow table never holds more than its capacity, and no new flow was refused.
fn assert_full_but_serving(stats: &serde_json::Value) {
    let table = &stats["flow_table"];
    assert_eq!(table["capacity"], CAPACITY, "{table}");
    assert!(table["entries"].as_u64().unwrap() <= CAPACITY, "{table}");
    assert_eq!(stats["reasons"]["drop_flow_table_full"]["packets"], 0);
    let created = stats["events"]["flow_created"].as_u64().unwrap();
    assert!(created > CHURN as u64, "{created} flows created");
}

#[test]
fn a_kept_alive_connection_on_a_maglev_service_survives_eviction() {
    let (topo, lbctl, addr) = shrunk("maglev");
    let churned = churn_around_a_kept_connection(&topo, addr);
    let (first, again) = (churned.first, churned.again);
    let again = again.expect("the evicted connection goes on");
    assert_eq!(again.backend, first.backend, "the same backend");
    assert_eq!(again.client_seen, first.client_seen, "the same connection");
    assert!(churned.recorded_again, "its flow is in the table again");
    let counts = client::per_backend(&churned.churn);
    assert_eq!(counts.len(), topo.backend_count(), "{counts:?}");

    let stats = stats_json(&lbctl);
    assert_full_but_serving(&stats);
    let recovered = stats["events"]["flow_recovered"].as_u64().unwrap();
    assert!(
        recovered >= 1,
        "the kept connection's entry was evicted and recovered"
    );
    assert_eq!(stats["reasons"]["pass_flow_unknown"]["packets"], 0);
}

#[test]
fn a_kept_alive_connection_on_a_round_robin_service_is_reset_once_evicted() {
    let (topo, lbctl, addr) = shrunk("rr");
    let Churned {
        churn,
        again,
        recorded_again,
        ..
    } = churn_around_a_kept_connection(&topo, addr);
    assert!(!recorded_again, "no entry made up for it");
    let err = format!(
        "{:#}",
        again.expect_err("not sent to a backend that never saw it")
    );
    assert!(err.contains("reset"), "the client learns at once: {err}");
    // Round-robin went on: 300 connections a round over 3 backends, evenly.
    let counts = client::per_backend(&churn);
    assert!(counts.values().all(|n| *n == churn.len() / 3), "{counts:?}");

    let stats = stats_json(&lbctl);
    assert_full_but_serving(&stats);
    let unknown = stats["reasons"]["pass_flow_unknown"]["packets"]
        .as_u64()
        .unwrap();
    assert!(unknown >= 1, "the kept connection's packet is counted");
    assert_eq!(stats["events"]["flow_recovered"], 0);
    // New connections are served as ever.
    let replies = topo
        .client()
        .in_netns(|| client::new_connections(addr, 3))
        .unwrap();
    assert_eq!(client::per_backend(&replies).len(), 3);
}

/// Sends `count` TCP SYNs to `dst` from spoofed sources (random addresses in 10.250.0.0/16,
/// random ports), as a SYN flood does, through a raw socket (the kernel routes them like the
/// host's own packets). The IPv4 and TCP checksums are left 0: lbctl does not check them, and
/// the backends' kernels drop the flood after lbctl has made its flows.
fn syn_flood(dst: SocketAddrV4, count: usize) {
    // SAFETY: plain socket call; IPPROTO_RAW implies IP_HDRINCL.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor this function owns from here.
    let _socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..count {
        // xorshift64: a different source for every SYN.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let [a, b, p0, p1, ..] = state.to_be_bytes();
        let mut packet = [0u8; 40];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&40u16.to_be_bytes());
        packet[8] = 64;
        packet[9] = 6;
        packet[12..16].copy_from_slice(&[10, 250, a, b]);
        packet[16..20].copy_from_slice(&dst.ip().octets());
        packet[20..22].copy_from_slice(&u16::from_be_bytes([p0 | 0x80, p1]).to_be_bytes());
        packet[22..24].copy_from_slice(&dst.port().to_be_bytes());
        packet[32] = 5 << 4;
        packet[33] = 0x02;
        packet[34..36].copy_from_slice(&64240u16.to_be_bytes());
        // SAFETY: a valid socket, buffer and address of the sizes given.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(sent, 40, "sendto: {}", std::io::Error::last_os_error());
    }
}

/// A SYN flood from spoofed sources, 40 times the flow table, while kept-alive connections make
/// requests back to back on a round-robin and a maglev service, and others sit idle: the flood
/// fills the table with its flows and the LRU evicts the idle connections' entries. Measured
/// (printed): what each kind of connection went through. Asserted: a maglev connection, busy
/// or idle, loses no request (its backend is found again); a busy round-robin connection keeps
/// its entries (the LRU keeps what is used) and loses no request either; new connections are
/// served right after the flood. An idle round-robin connection is reset once evicted (see
/// the churn test above): the README's advice for services open to untrusted clients is
/// maglev.
#[test]
fn under_a_syn_flood_that_fills_the_table_busy_and_maglev_connections_keep_working() {
    let (topo, lbctl, rr) = shrunk("rr");
    let backends: Vec<String> = (0..topo.backend_count())
        .map(|i| topo.backend_addr(i).to_string())
        .collect();
    let mut args = vec!["service", "add", "mg", "8081", "--scheduler", "maglev"];
    args.extend(backends.iter().map(String::as_str));
    lbctl.run(&args).unwrap();
    let mg = SocketAddrV4::new(*rr.ip(), 8081);
    let flood = 200 * CAPACITY as usize;
    let outcome = topo.client().in_netns(|| {
        run_on_one_cpu();
        let mut idle: Vec<(&str, KeepAlive, Reply)> = [("rr", rr), ("maglev", mg)]
            .into_iter()
            .map(|(name, addr)| {
                let mut kept = KeepAlive::connect(addr).unwrap();
                let first = kept.get().unwrap();
                (name, kept, first)
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy: Vec<_> = [("rr", rr), ("maglev", mg)]
            .into_iter()
            .map(|(name, addr)| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    run_on_one_cpu();
                    let mut kept = KeepAlive::connect(addr).unwrap();
                    let first = kept.get().unwrap();
                    let (mut ok, mut failed) = (0usize, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match kept.get() {
                            Ok(reply) if reply.backend == first.backend => ok += 1,
                            Ok(reply) => failed.push(format!("moved to {}", reply.backend)),
                            Err(err) => {
                                failed.push(format!("{err:#}"));
                                break;
                            }
                        }
                    }
                    (name, ok, failed)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let started = std::time::Instant::now();
        for _ in 0..4 {
            syn_flood(rr, flood / 8);
            syn_flood(mg, flood / 8);
        }
        let flood_ms = started.elapsed().as_millis();
        std::thread::sleep(Duration::from_millis(1100));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let busy: Vec<_> = busy.into_iter().map(|t| t.join().unwrap()).collect();
        let idle: Vec<(&str, Result<bool, String>)> = idle
            .iter_mut()
            .map(|(name, kept, first)| {
                (
                    *name,
                    kept.get()
                        .map(|again| again.backend == first.backend)
                        .map_err(|err| format!("{err:#}")),
                )
            })
            .collect();
        let fresh = client::new_connections(rr, 3).map(|r| r.len());
        (flood_ms, busy, idle, fresh)
    });
    let (flood_ms, busy, idle, fresh) = outcome;
    let stats = stats_json(&lbctl);
    eprintln!(
        "SYN flood: {flood} spoofed SYNs in {flood_ms} ms into a {CAPACITY}-flow table; \
         flows created {}, table {}/{}",
        stats["events"]["flow_created"], stats["flow_table"]["entries"], CAPACITY
    );
    for (name, ok, failed) in &busy {
        eprintln!("  busy {name}: {ok} requests answered during it, failures: {failed:?}");
    }
    for (name, outcome) in &idle {
        eprintln!("  idle {name}: next request after it: {outcome:?}");
    }
    let created = stats["events"]["flow_created"].as_u64().unwrap();
    assert!(
        created > 10 * CAPACITY,
        "the flood made its flows: {created}"
    );
    for (name, ok, failed) in &busy {
        assert!(
            *ok > 0 && failed.is_empty(),
            "busy {name}: {ok} answered, {failed:?}"
        );
    }
    let maglev_idle = idle.iter().find(|(name, _)| *name == "maglev").unwrap();
    assert_eq!(maglev_idle.1, Ok(true), "idle maglev: the same backend");
    assert_eq!(fresh.unwrap(), 3, "new connections served");
}

/// Weights and the scheduler are set by `service add`, `backend weight` and `service set`,
/// shown by `service ls --json`, exported, and obeyed by real connections; bad values are
/// refused with a line naming them and change nothing.
#[test]
fn weights_and_schedulers_are_set_shown_exported_and_obeyed() {
    let (topo, lbctl, addr) = published(&[], &[], ["*2", "", "*0"]);
    let new_connections = |count| {
        topo.client()
            .in_netns(|| client::new_connections(addr, count))
            .unwrap()
    };
    let counts = client::per_backend(&new_connections(30));
    assert_eq!(counts.get(&topo.backend_name(0)), Some(&20), "{counts:?}");
    assert_eq!(counts.get(&topo.backend_name(1)), Some(&10), "{counts:?}");
    assert_eq!(
        counts.get(&topo.backend_name(2)),
        None,
        "weight 0: {counts:?}"
    );

    let b2 = topo.backend_addr(2).to_string();
    lbctl.run(&["backend", "weight", "web", &b2, "1"]).unwrap();
    lbctl
        .run(&["service", "set", "web", "--scheduler", "maglev"])
        .unwrap();
    let listed: serde_json::Value =
        serde_json::from_str(&lbctl.run(&["service", "ls", "--json"]).unwrap()).unwrap();
    let web = &listed["services"][0];
    assert_eq!(web["scheduler"], "maglev");
    let weights: Vec<u64> = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [2, 1, 1]);
    let exported: serde_json::Value =
        serde_json::from_str(&lbctl.run(&["export"]).unwrap()).unwrap();
    assert_eq!(exported["services"][0]["scheduler"], "maglev");
    assert_eq!(
        exported["services"][0]["backends"][0],
        format!("{}*2", topo.backend_addr(0))
    );
    // Maglev spreads connections from one client's ports by weight, 2:1:1 (500 connections:
    // about 250, 125, 125; well within a third of that by chance alone).
    let counts = client::per_backend(&new_connections(500));
    for (i, share) in [(0, 250.0), (1, 125.0), (2, 125.0)] {
        let got = counts[&topo.backend_name(i)] as f64;
        assert!((got - share).abs() < share / 3.0, "{counts:?}");
    }

    let before = lbctl.run(&["service", "ls", "--json"]).unwrap();
    let b0 = topo.backend_addr(0).to_string();
    let weighted = format!("{b0}*257");
    // Exit 2 for a malformed argument (the parser's), 1 for a refused change.
    for (args, named, code) in [
        (vec!["backend", "weight", "web", &b0, "257"], "'257'", 2),
        (vec!["backend", "add", "web", &weighted], "'257'", 2),
        (
            vec!["backend", "weight", "web", "10.9.9.9:80", "1"],
            "10.9.9.9:80",
            1,
        ),
        (
            vec!["service", "set", "web", "--scheduler", "wrr"],
            "'wrr'",
            2,
        ),
        (
            vec!["service", "set", "nosuch", "--scheduler", "rr"],
            "nosuch",
            1,
        ),
    ] {
        let err = lbctl.run_expect_exit(&args, code).unwrap();
        assert!(err.contains(named), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert_eq!(lbctl.run(&["service", "ls", "--json"]).unwrap(), before);
    }
}
