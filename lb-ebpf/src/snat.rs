//! Hairpin flows: a client whose backend would not answer it through this node, because the
//! client is the backend itself, the node that hosts the backend (a process on that node, or a
//! task it masquerades), or on the backend's subnet. The backend would answer itself, its node
//! would drop the decapsulated packet (its source is the node's own address) as martian, or the
//! reply would go straight over the link and the client would reset it. So such a flow's
//! packets also get this node's address and a port of their own as their source, as IPVS and
//! Cilium do: the replies come back here, and `REVERSE_FLOWS` holds the client they go to.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
    maps::lpm_trie::Key,
};
use lb_common::{
    Backend, FLOW_CLOSING, FLOW_IDLE_TCP_NS, FLOW_IDLE_UDP_NS, FLOW_SEEN_GRANULARITY_NS, FLOW_SNAT,
    FlowKey, FlowValue, PROTO_TCP, SNAT_PORT_COUNT, SNAT_PORT_FIRST, SnatValue, flow_hash,
};

use crate::{
    encap,
    maps::{FLOWS, ONLINK_SUBNETS, REVERSE_FLOWS, SNAT_FLOWS},
    parse::Packet,
};

/// Ports tried for a new hairpin flow, from one its 5-tuple hashes to, before it is dropped.
const PROBES: u32 = 8;

/// The source address a new flow from `pkt`'s client to `backend` must get, or 0 when the
/// backend answers the client through this node: it is neither the client, nor the client's
/// node, nor on the client's subnet (where it would answer straight over its link). Towards
/// another node, this node's underlay address (the backend's node sends the replies back to it
/// through the mesh); towards a backend this node routes to, the address the client connected
/// to, which routes back here. (An address, not an `Option`: LLVM stores the undefined payload
/// of a `None` made here, which the verifier refuses to read.)
#[inline(always)]
pub fn hairpin_source(pkt: &Packet, backend: &Backend) -> u32 {
    if backend.node_ip_be != 0 {
        // On the backend's subnet: a task's node routes the overlay subnet to its own bridge,
        // so a client with an address in it (a task of this node calling its published port)
        // would get the reply there, never through the tunnel back. Not so on the underlay's
        // subnet (0), which every node routes alike: a client there (a host-network task's
        // client on the LAN) is answered through the tunnel.
        if pkt.src_ip_be != backend.node_ip_be
            && pkt.src_ip_be != backend.ip_be
            && same_subnet(pkt.src_ip_be, backend.ip_be).is_none_or(|subnet| subnet == 0)
        {
            return 0;
        }
        // Without a mesh address the packet is dropped on its way to the node anyway.
        encap::mesh().map_or(0, |mesh| mesh.local_ip_be)
    } else if pkt.src_ip_be == backend.ip_be || same_subnet(pkt.src_ip_be, backend.ip_be).is_some()
    {
        pkt.dst_ip_be
    } else {
        0
    }
}

/// The subnet of this node's interfaces two addresses share, if they do (`ONLINK_SUBNETS`; 0 is
/// the underlay's, which the other nodes route alike).
#[inline(always)]
fn same_subnet(a_be: u32, b_be: u32) -> Option<u32> {
    let subnet = ONLINK_SUBNETS.get(Key::new(32, a_be)).copied()?;
    (ONLINK_SUBNETS.get(Key::new(32, b_be)).copied() == Some(subnet)).then_some(subnet)
}

/// The source a hairpin flow's packets get, if `flow` is one and its entry is still there.
#[inline(always)]
pub fn of_flow(key: &FlowKey, flow: &FlowValue) -> Option<SnatValue> {
    if flow.flags & FLOW_SNAT == 0 {
        return None;
    }
    // SAFETY: copied out at once.
    unsafe { SNAT_FLOWS.get(key) }.copied()
}

/// The `probe`-th port a hairpin flow whose 5-tuple hashes to `start` may take.
#[inline(always)]
fn probe(snat_ip_be: u32, start: u32, probe: u32) -> SnatValue {
    let port = SNAT_PORT_FIRST + (start.wrapping_add(probe) % u32::from(SNAT_PORT_COUNT)) as u16;
    SnatValue {
        ip_be: snat_ip_be,
        port_be: port.to_be(),
        _pad: 0,
    }
}

/// Gives the new hairpin flow `key` (to the service at `orig`, pinned as `flow`) a source port
/// on `snat_ip_be`, and records the reverse-NAT entry its replies are found by. In order: the
/// port this very flow held already (a flow whose entry was evicted, found again by maglev,
/// keeps the source its backend knows), a free port, and only then one held by a flow that
/// has ended (so that ending a flow, which a spoofed RST can do, does not hand its port to
/// whoever hashes there next while free ones are left). `None` when every port tried is held
/// by a live flow.
#[inline(always)]
pub fn allocate(
    key: &FlowKey,
    flow: &FlowValue,
    snat_ip_be: u32,
    orig: (u32, u16),
) -> Option<SnatValue> {
    let start = flow_hash(key);
    // One loop of three passes over the ports (not three loops: their locals would each take
    // stack, and the XDP program's is at the verifier's limit).
    for step in 0..3 * PROBES {
        let (pass, i) = (step / PROBES, step % PROBES);
        let snat = probe(snat_ip_be, start, i);
        let (reply_key, reverse) = lb_common::reverse_entry(key, flow.chosen(), orig, Some(&snat));
        let claimed = match pass {
            OWN => {
                // SAFETY: copied out at once.
                unsafe { REVERSE_FLOWS.get(&reply_key) }.is_some_and(|held| {
                    held.client_ip_be == key.src_ip_be
                        && held.client_port_be == key.src_port_be
                        && held.orig_ip_be == orig.0
                        && held.orig_port_be == orig.1
                }) && REVERSE_FLOWS
                    .insert(&reply_key, reverse, u64::from(BPF_ANY))
                    .is_ok()
            }
            FREE => REVERSE_FLOWS
                .insert(&reply_key, reverse, u64::from(BPF_NOEXIST))
                .is_ok(),
            // Two CPUs may both find the same ended flow's port and take it; the later one's
            // replies win. It takes two new hairpin flows to one backend, hashing to the same
            // ports, within the same moment, with no free port among eight.
            _ => {
                !held_by_live_flow(&reply_key)
                    && REVERSE_FLOWS
                        .insert(&reply_key, reverse, u64::from(BPF_ANY))
                        .is_ok()
            }
        };
        if claimed {
            return Some(snat);
        }
    }
    None
}

/// The passes of [`allocate`]: the flow's own port, a free one, then an ended flow's.
const OWN: u32 = 0;
const FREE: u32 = 1;

/// Whether the reply 5-tuple `reply_key` (backend → this node's address and a hairpin port) still
/// belongs to a live flow: one whose client → service entry is there, still a hairpin flow on
/// this very port, not ended, and not idle beyond what the census counts live.
#[inline(always)]
fn held_by_live_flow(reply_key: &FlowKey) -> bool {
    // SAFETY: copied out at once.
    let Some(reverse) = (unsafe { REVERSE_FLOWS.get(reply_key) }).copied() else {
        // Evicted meanwhile: free, though the insert that follows may still lose a race.
        return false;
    };
    if reverse.client_ip_be == 0 {
        // Not a hairpin flow's: a client with this node's address, which is never given away.
        return true;
    }
    let flow_key = FlowKey::new(
        reverse.client_ip_be,
        reverse.orig_ip_be,
        reverse.client_port_be,
        reverse.orig_port_be,
        reply_key.proto,
    );
    // SAFETY: copied out at once.
    let Some(flow) = (unsafe { FLOWS.get(&flow_key) }).copied() else {
        return false;
    };
    if flow.flags & (FLOW_SNAT | FLOW_CLOSING) != FLOW_SNAT {
        return false;
    }
    match of_flow(&flow_key, &flow) {
        Some(snat)
            if snat.ip_be == reply_key.dst_ip_be && snat.port_be == reply_key.dst_port_be => {}
        // The flow moved to another port.
        Some(_) => return false,
        // Being set up on another CPU (its port claimed, its source not yet recorded), or its
        // source entry evicted: held, while not idle.
        None => {}
    }
    let idle = if reply_key.proto == PROTO_TCP {
        FLOW_IDLE_TCP_NS
    } else {
        FLOW_IDLE_UDP_NS
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    now.wrapping_sub(flow.last_seen_ns) < idle + FLOW_SEEN_GRANULARITY_NS
}
