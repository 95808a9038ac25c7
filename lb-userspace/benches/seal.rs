//! What sealing gossip costs (`cluster::seal`): seal and open of one datagram at the sizes
//! gossip sends, and per gossip round of a node in a cluster of 50, printed, not asserted. Run
//! it optimised:
//!
//! ```text
//! cargo test --release -p lb-userspace --bench seal -- --nocapture
//! ```
use std::{hint::black_box, time::Instant};

use lb_userspace::cluster::seal::{Keyring, Opener, Sealer};

const NOW_MS: u64 = 1_780_000_000_000;
const RECIPIENT: std::net::SocketAddr = std::net::SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
    7946,
);

/// Seals and opens `size`-byte messages `runs` times; returns ns per seal and per open.
fn time(size: usize, runs: usize) -> (f64, f64) {
    let ring = Keyring::parse(&Keyring::generate()).unwrap();
    let message = vec![0x5au8; size];
    let mut sealer = Sealer::default();
    let started = Instant::now();
    let sealed: Vec<Vec<Vec<u8>>> = (0..runs)
        .map(|_| sealer.seal(&ring, NOW_MS, RECIPIENT, NOW_MS - 500, black_box(&message)))
        .collect();
    let seal_ns = started.elapsed().as_nanos() as f64 / runs as f64;
    let mut opener = Opener::default();
    let started = Instant::now();
    for parts in &sealed {
        for part in parts {
            black_box(opener.open(&ring, NOW_MS, RECIPIENT, part).unwrap());
        }
    }
    let open_ns = started.elapsed().as_nanos() as f64 / runs as f64;
    (seal_ns, open_ns)
}

#[test]
fn sealing_cost_per_datagram_and_per_gossip_round() {
    for (what, size, runs) in [
        ("a SYN of a 3-node cluster", 150, 20_000),
        ("a SYN of a 50-node cluster (its digest)", 3_000, 20_000),
        ("a delta of 16 KiB", 16_384, 5_000),
        ("a full 64 KiB message (two parts)", 65_507, 1_000),
    ] {
        let (seal_ns, open_ns) = time(size, runs);
        println!(
            "{what:<42} {size:>6} B: seal {:>8.0} ns, open {:>8.0} ns ({:.0} MB/s sealed)",
            seal_ns,
            open_ns,
            size as f64 / seal_ns * 1e3
        );
    }
    // Each round a node starts exchanges with 3 others (SYN, SYN-ACK back, ACK) and answers
    // about 3: 6 datagrams sealed and 6 opened, digests of ~3 KB at 50 nodes (deltas only
    // when something changed).
    let (seal_ns, open_ns) = time(3_000, 20_000);
    let per_round_us = 6.0 * (seal_ns + open_ns) / 1e3;
    println!(
        "per gossip round of one node at 50 nodes: {per_round_us:.1} us \
         ({:.3} % of a core at a 500 ms interval)",
        per_round_us / 500_000.0 * 100.0
    );
}
