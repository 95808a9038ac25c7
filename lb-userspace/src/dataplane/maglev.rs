//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Katran and Cilium use it: the
//! lookup table of a maglev service, built here and written whole to the data plane's `MAGLEV`
//! map, where a new flow takes `table[flow_hash(5-tuple) % M]`. Pure logic.
//!
//! Each backend has a permutation of the M slots, fixed by its identity (`IP:PORT@NODE`, not
//! its id, which each node numbers for itself): an offset and a skip from two hashes of it.
//! The backends take turns claiming the next free slot of their permutation until the table is
//! full; a backend of weight w takes w turns for every `w_max` of the heaviest. So:
//! - the table depends only on the set of (identity, weight): every node of the mesh, and every
//!   rebuild, gives a flow the same backend, even one whose flow-table entry was evicted;
//! - each backend holds about `M × w / Σw` slots;
//! - removing a backend frees its slots, which the others claim along their permutations, and
//!   moves few other slots: about 1/N of the flows move when one of N backends goes.
use lb_common::{FlowKey, MAGLEV_TABLE_SIZE, MaglevTable, flow_hash};

use crate::table::fnv1a;

/// M, as an index bound.
const SIZE: usize = MAGLEV_TABLE_SIZE as usize;
/// Not a backend id (ids are below `lb_common::MAX_BACKENDS`): a slot not claimed yet.
const FREE: u32 = u32::MAX;
/// Seeds of the two hashes of a backend's identity (arbitrary, fixed forever: changing them
/// would move every flow of every maglev service).
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66;
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b;

/// A backend as its service's maglev table sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// `IP:PORT` or `IP:PORT@NODE`: the same on every node.
    pub identity: String,
    /// What the table holds for it: its id on this node.
    pub id: u32,
    pub weight: u32,
}

/// The maglev table of a service whose new flows may choose `backends`; `None` when none has a
/// weight above 0. The order of `backends` does not matter.
pub fn build(backends: &[MaglevBackend]) -> Option<Box<MaglevTable>> {
    let mut turns: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    // Ties in the race for a slot go to the first in turn: order by identity, so that the
    // table does not depend on the order the backends were listed in.
    turns.sort_by(|a, b| a.identity.cmp(&b.identity));
    let heaviest = turns.iter().map(|b| b.weight).max()?;
    let permutations: Vec<(u64, u64)> = turns.iter().map(|b| permutation(&b.identity)).collect();
    let mut next = vec![0u64; turns.len()];
    let mut credit = vec![0u32; turns.len()];
    let mut table = Box::new(MaglevTable {
        backend_ids: [FREE; SIZE],
    });
    let mut filled = 0;
    while filled < SIZE {
        for (i, backend) in turns.iter().enumerate() {
            // At most one turn a round, since no weight exceeds the heaviest.
            credit[i] += backend.weight;
            if credit[i] < heaviest {
                continue;
            }
            credit[i] -= heaviest;
            let (offset, skip) = permutations[i];
            // M is prime and 0 < skip < M: the permutation visits every slot within M steps.
            let slot = loop {
                let slot = ((offset + next[i] * skip) % SIZE as u64) as usize;
                next[i] += 1;
                if table.backend_ids[slot] == FREE {
                    break slot;
                }
            };
            table.backend_ids[slot] = backend.id;
            filled += 1;
            if filled == SIZE {
                break;
            }
        }
    }
    Some(table)
}

/// The backend id the data plane gives the flow `key` with `table`.
pub fn backend_of(table: &MaglevTable, key: &FlowKey) -> u32 {
    table.backend_ids[(flow_hash(key) % MAGLEV_TABLE_SIZE) as usize]
}

/// A backend's permutation of the slots: where it starts and how far it steps.
fn permutation(identity: &str) -> (u64, u64) {
    let hash = fnv1a(identity.as_bytes());
    let offset = mix(hash ^ OFFSET_SEED) % SIZE as u64;
    let skip = mix(hash ^ SKIP_SEED) % (SIZE as u64 - 1) + 1;
    (offset, skip)
}

/// SplitMix64's finaliser: spreads FNV's output over all 64 bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lb_common::PROTO_TCP;

    use super::*;

    /// The most flows of backends that stay which may move when one backend is removed
    /// (measured: 0.02% at N=3, 0.6% at 10, 1.0% at 64, 1.2% at 128, as the maglev paper finds).
    const COLLATERAL_MAX: f64 = 0.015;

    /// SplitMix64: a reproducible stream of random numbers, so the measurements are the same on
    /// every run.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix(self.0)
        }
    }

    /// `count` client → service 5-tuples: random client addresses and ports, to one service.
    fn random_flows(count: usize, seed: u64) -> Vec<FlowKey> {
        let mut random = Random(seed);
        (0..count)
            .map(|_| {
                let r = random.next();
                FlowKey {
                    src_ip_be: (r as u32).to_be(),
                    dst_ip_be: u32::from_ne_bytes([192, 168, 1, 11]),
                    src_port_be: ((r >> 32) as u16 | 1024).to_be(),
                    dst_port_be: 8080u16.to_be(),
                    proto: PROTO_TCP,
                    _pad: [0; 3],
                }
            })
            .collect()
    }

    /// Every source port of one client: a NATed office, the hash's hardest case.
    fn one_client_flows() -> Vec<FlowKey> {
        (1024..=u16::MAX)
            .map(|port| FlowKey {
                src_ip_be: u32::from_ne_bytes([203, 0, 113, 7]),
                dst_ip_be: u32::from_ne_bytes([192, 168, 1, 11]),
                src_port_be: port.to_be(),
                dst_port_be: 8080u16.to_be(),
                proto: PROTO_TCP,
                _pad: [0; 3],
            })
            .collect()
    }

    /// `n` backends spread over three nodes, ids 0.., of weight `weight(i)`.
    fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                identity: format!("10.0.{}.{}:80@n{}", i / 200, i % 200 + 1, i % 3),
                id: i,
                weight: weight(i),
            })
            .collect()
    }

    fn choices(table: &MaglevTable, flows: &[FlowKey]) -> Vec<u32> {
        flows.iter().map(|key| backend_of(table, key)).collect()
    }

    /// The share of `flows` whose backend differs between `before` and `after`.
    fn moved(before: &[u32], after: &[u32]) -> f64 {
        let moved = before.iter().zip(after).filter(|(a, b)| a != b).count();
        moved as f64 / before.len() as f64
    }

    /// Each backend's share of `ids` (table slots or chosen backends), by id.
    fn shares(ids: &[u32]) -> BTreeMap<u32, f64> {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for id in ids {
            *counts.entry(*id).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(id, n)| (id, n as f64 / ids.len() as f64))
            .collect()
    }

    /// How far a share of `flows` random flows may stray from the share of the slots by chance
    /// alone, relative: five standard deviations of the lightest backend's count (a count of n
    /// expected flows varies by about √n).
    fn sampling_tolerance(flows: usize, backends: &[MaglevBackend]) -> f64 {
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        let lightest = backends.iter().map(|b| b.weight).min().unwrap();
        let expected = flows as f64 * f64::from(lightest) / f64::from(total);
        5.0 / expected.sqrt()
    }

    /// The largest relative gap between each backend's share and its weight's share.
    fn worst_gap(shares: &BTreeMap<u32, f64>, backends: &[MaglevBackend]) -> f64 {
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        backends
            .iter()
            .map(|b| {
                let want = f64::from(b.weight) / f64::from(total);
                (shares.get(&b.id).copied().unwrap_or(0.0) - want).abs() / want
            })
            .fold(0.0, f64::max)
    }

    /// Measures what maglev promises, for services of 3 to 128 backends (the most a service may
    /// have), and prints the numbers (`cargo test -p lb-userspace --lib maglev -- --nocapture`):
    /// (a) a rebuild from the same backends, listed in another order, gives every flow the
    /// same backend: a flow whose flow-table entry was evicted comes back to its backend;
    /// (b) removing one of N backends moves its flows and few others: at most 1/N + 2% of all;
    /// (c) adding one moves about 1/(N+1) to it, and few others;
    /// (d) each backend's share of the slots is within 1% of 1/N, its share of a million random
    ///     flows as close as chance allows (see `sampling_tolerance`: 1.8% to 5.7%).
    #[test]
    fn maglev_recovers_evicted_flows_moves_few_and_balances() {
        let flows = random_flows(100_000, 1);
        let many_flows = random_flows(1_000_000, 2);
        // Printed whole at the end, so that other tests' output does not interleave.
        let mut report = format!(
            "maglev, M = {SIZE}; 100,000 random flows (moves), 1,000,000 (balance)\n\
             {:>4} {:>9} {:>16} {:>10} {:>14} {:>10} {:>12} {:>12}\n",
            "N",
            "same set",
            "remove 1: moved",
            "ideal 1/N",
            "add 1: moved",
            "1/(N+1)",
            "slot share",
            "flow share"
        );
        for n in [3, 10, 64, 128] {
            let set = backends(n, |_| 1);
            let table = build(&set).unwrap();
            let before = choices(&table, &flows);

            let mut reordered = set.clone();
            reordered.reverse();
            reordered.rotate_left(n as usize / 3);
            let rebuilt = build(&reordered).unwrap();
            assert!(table == rebuilt, "N={n}: the same set gives the same table");
            let same = 1.0 - moved(&before, &choices(&rebuilt, &flows));

            let gone = n / 2;
            let without: Vec<MaglevBackend> =
                set.iter().filter(|b| b.id != gone).cloned().collect();
            let after_remove = choices(&build(&without).unwrap(), &flows);
            // Every flow of the removed backend moves; of the others' flows, only the few whose
            // slots maglev's permutations hand out anew (not zero: maglev trades a little
            // disruption for balance).
            let collateral = before
                .iter()
                .zip(&after_remove)
                .filter(|(was, is)| **was != gone && was != is)
                .count() as f64
                / flows.len() as f64;
            assert!(
                after_remove.iter().all(|is| *is != gone),
                "N={n}: no flow keeps the removed backend"
            );
            assert!(
                collateral <= COLLATERAL_MAX,
                "N={n}: {:.3}% of the flows of backends that stayed moved",
                collateral * 100.0
            );
            let removed_moved = moved(&before, &after_remove);

            let mut with = set.clone();
            with.push(MaglevBackend {
                identity: "10.0.9.9:80@n1".into(),
                id: n,
                weight: 1,
            });
            let after_add = choices(&build(&with).unwrap(), &flows);
            let added_moved = moved(&before, &after_add);
            let to_new =
                after_add.iter().filter(|id| **id == n).count() as f64 / flows.len() as f64;

            let slot_gap = worst_gap(&shares(&table.backend_ids), &set);
            let flow_gap = worst_gap(&shares(&choices(&table, &many_flows)), &set);
            let (ideal_remove, ideal_add) = (1.0 / f64::from(n), 1.0 / f64::from(n + 1));
            report.push_str(&format!(
                "{n:>4} {:>8.2}% {:>15.2}% {:>9.2}% {:>13.2}% {:>9.2}% {:>11.2}% {:>11.2}%\n",
                same * 100.0,
                removed_moved * 100.0,
                ideal_remove * 100.0,
                added_moved * 100.0,
                ideal_add * 100.0,
                slot_gap * 100.0,
                flow_gap * 100.0
            ));
            assert_eq!(same, 1.0, "N={n}");
            assert!(
                removed_moved <= ideal_remove + 0.02,
                "N={n}: {removed_moved}"
            );
            assert!(added_moved <= ideal_add + 0.02, "N={n}: {added_moved}");
            assert!((to_new - ideal_add).abs() <= 0.01 * 2.0, "N={n}: {to_new}");
            assert!(slot_gap <= 0.01, "N={n}: {slot_gap}");
            let tolerance = slot_gap + sampling_tolerance(many_flows.len(), &set);
            assert!(flow_gap <= tolerance, "N={n}: {flow_gap} > {tolerance}");
        }
        print!("{report}");
    }

    /// Weights: a backend of weight w holds w/Σw of the slots (within 1%) and of the flows (as
    /// close as chance allows), for weights 1 to 10 and for one heavy backend among light ones;
    /// weight 0 holds nothing. The flows of every source port of one client spread the same way.
    #[test]
    fn weighted_backends_get_their_share() {
        let flows = random_flows(1_000_000, 3);
        let one_client = one_client_flows();
        for (what, set) in [
            ("weights 1..=10", backends(10, |i| i + 1)),
            (
                "one of 256 among 1s",
                backends(20, |i| if i == 0 { 256 } else { 1 }),
            ),
            (
                "weight 0 and 3",
                backends(4, |i| if i == 1 { 0 } else { 3 }),
            ),
        ] {
            let table = build(&set).unwrap();
            let weighted: Vec<MaglevBackend> =
                set.iter().filter(|b| b.weight > 0).cloned().collect();
            let slot_gap = worst_gap(&shares(&table.backend_ids), &weighted);
            let flow_gap = worst_gap(&shares(&choices(&table, &flows)), &weighted);
            let client_gap = worst_gap(&shares(&choices(&table, &one_client)), &weighted);
            let flow_tolerance = slot_gap + sampling_tolerance(flows.len(), &weighted);
            let client_tolerance = slot_gap + sampling_tolerance(one_client.len(), &weighted);
            println!(
                "{what}: slots within {:.2}% of their weight's share; 1,000,000 random flows \
                 within {:.2}% (chance allows {:.2}%); the 64,512 ports of one client within \
                 {:.2}% (chance allows {:.2}%)",
                slot_gap * 100.0,
                flow_gap * 100.0,
                flow_tolerance * 100.0,
                client_gap * 100.0,
                client_tolerance * 100.0
            );
            assert!(slot_gap <= 0.01, "{what}: {slot_gap}");
            assert!(flow_gap <= flow_tolerance, "{what}: {flow_gap}");
            assert!(client_gap <= client_tolerance, "{what}: {client_gap}");
            assert!(!table.backend_ids.contains(&FREE));
            for zero in set.iter().filter(|b| b.weight == 0) {
                assert!(
                    !table.backend_ids.contains(&zero.id),
                    "{what}: weight 0 holds no slot"
                );
            }
        }
        assert!(build(&backends(3, |_| 0)).is_none());
        assert!(build(&[]).is_none());
    }
}
