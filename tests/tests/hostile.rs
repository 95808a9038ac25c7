//! Hostile and malformed frames, generated systematically from a few valid ones, run through
//! the real XDP and TC programs with BPF_PROG_RUN in the node of `dataplane`: every truncation,
//! every IHL, IP options, total lengths, fragments, TCP data offsets and every combination of
//! TCP flags, UDP lengths, VXLAN flags, VNIs, nesting and truncated inner frames, martian
//! addresses, other ethertypes and VLAN tags, the smallest and the largest frames.
//!
//! Every frame is received on the node's uplink, where a well-formed packet for a service
//! leaves again with XDP_TX: so a frame that is mis-forwarded shows as XDP_TX. For every frame:
//! - the XDP action is one its kind allows: a frame that is not a well-formed packet for a
//!   service (or for this node's overlay) is passed unchanged or dropped, and changes no flow,
//!   no backend counter and no tunnel entry;
//! - exactly one reason counter counts it, once;
//! - the TC egress program, run on the same frame, leaves it unchanged and counts nothing,
//!   unless it is a reply of a flow the node balanced (then it reverse-NATs it, counted once).
mod dataplane;

use dataplane::*;
use lb_common::{BackendStats, DEFAULT_VNI, PROTO_TCP, PROTO_UDP, Reason};

/// Offset of the IPv4 header in an untagged frame.
const L3: usize = 14;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Reasons of a frame whose headers are cut short or contradict each other.
const MALFORMED: &[Reason] = &[Reason::PassTruncated, Reason::PassMalformed];
/// Reasons of a client's packet DNATed and sent on (back out of the uplink, or to the kernel
/// when it is too big for the uplink's MTU).
const FORWARDED: &[Reason] = &[Reason::ForwardTx, Reason::ForwardStack];
/// Reasons of an overlay packet decapsulated for a backend on this node.
const DECAPSULATED: &[Reason] = &[Reason::DecapTx, Reason::DecapStack];

/// What the data plane may do with a frame.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Not a well-formed packet for a service or for this node's overlay: passed to the kernel
    /// unchanged, counted under one of these reasons.
    Passed(&'static [Reason]),
    /// Overlay traffic this node refuses to decapsulate: dropped, counted under this reason.
    Dropped(Reason),
    /// A well-formed packet for a service or for this node's overlay: sent on (DNATed or
    /// decapsulated) with valid checksums, counted under one of these reasons.
    Handled(&'static [Reason]),
    /// A backend's reply of a flow the node balanced: reverse-NATed by XDP (which sends it
    /// back out of the uplink) and by TC alike.
    Reply,
}

struct Case {
    name: String,
    frame: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, frame: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        frame,
        expect,
    }
}

/// What a frame that is not sent on must leave as it was: the flow table, the flow events,
/// the tunnel entries and every backend's counters.
#[derive(Debug, PartialEq)]
struct FlowState {
    flows: usize,
    events: Vec<u64>,
    tunnel_replies: usize,
    backends: Vec<BackendStats>,
}

fn flow_state(node: &Node) -> FlowState {
    let backends = node
        .table
        .services
        .iter()
        .flat_map(|service| &service.backends)
        .map(|backend| node.maps.backend_totals(backend.id).unwrap())
        .collect();
    FlowState {
        flows: node.maps.flows.keys().count() + node.maps.flows6.keys().count(),
        events: node.maps.event_totals().unwrap(),
        tunnel_replies: node.tunnel_replies().len(),
        backends,
    }
}

fn reason_packets(node: &Node) -> Vec<u64> {
    node.maps
        .reason_totals()
        .unwrap()
        .iter()
        .map(|counter| counter.packets)
        .collect()
}

/// The largest frame BPF_PROG_RUN gives a TC program: one page less the skb's headroom and
/// `skb_shared_info`.
const LARGEST_TC_TEST_RUN_FRAME: usize = 4096 - 64 - 320;

/// BPF_PROG_RUN runs a TC program only on a frame with an Ethernet header, and with a whole
/// IPv4 or IPv6 header if it says so (as every skb on the kernel's egress path has), in one
/// page.
fn tc_test_run_takes(frame: &[u8]) -> bool {
    // The kernel pulls the IP header of an IPv4 or IPv6 frame into the skb it builds.
    let l3_header = match frame.get(12..14) {
        Some([0x08, 0x00]) => 20,
        Some([0x86, 0xdd]) => 40,
        _ => 0,
    };
    (L3..=LARGEST_TC_TEST_RUN_FRAME).contains(&frame.len()) && frame.len() >= L3 + l3_header
}

/// Runs `case` through XDP, then TC, and checks what each did with it.
fn check(node: &Node, case: &Case) {
    let name = &case.name;
    let state = flow_state(node);
    let before = reason_packets(node);
    let (action, out) = node.xdp(&case.frame, Some(node.ifindex));
    let counts = counted(&before, &reason_packets(node));
    let [(reason, 1)] = counts[..] else {
        panic!("{name}: counted as {counts:?}, not once under one reason");
    };
    let allowed: &[Reason] = match case.expect {
        Expect::Passed(reasons) | Expect::Handled(reasons) => reasons,
        Expect::Dropped(ref reason) => std::slice::from_ref(reason),
        Expect::Reply => &[Reason::ReplyTx],
    };
    assert!(
        allowed.contains(&reason),
        "{name}: counted as {}, expected one of {allowed:?}",
        reason.name()
    );
    match case.expect {
        Expect::Passed(_) | Expect::Dropped(_) => {
            let expected = match case.expect {
                Expect::Passed(_) => XDP_PASS,
                _ => XDP_DROP,
            };
            assert_eq!(action, expected, "{name}: action");
            if action == XDP_PASS {
                assert!(out == case.frame, "{name}: passed, but changed");
            }
            assert_eq!(flow_state(node), state, "{name}: changed the flow state");
        }
        Expect::Handled(_) | Expect::Reply => {
            // The reason says how the frame left: sent back out (XDP_TX) or to the kernel.
            let expected = match reason {
                Reason::ForwardTx | Reason::DecapTx | Reason::ReplyTx => XDP_TX,
                _ => XDP_PASS,
            };
            assert_eq!(action, expected, "{name}: action of {}", reason.name());
            assert!(out != case.frame, "{name}: handled, but unchanged");
            assert_checksums_valid(&out);
            if FORWARDED.contains(&reason) {
                let dst = destination(&out);
                assert!(
                    backends(node).contains(&dst),
                    "{name}: DNATed to {dst}, which is no backend"
                );
            }
            if DECAPSULATED.contains(&reason) {
                assert_is_decapsulated(name, &case.frame, &out, reason == Reason::DecapTx);
            }
        }
    }

    if !tc_test_run_takes(&case.frame) {
        return;
    }
    let before = reason_packets(node);
    let (action, out) = node
        .try_tc_on(&case.frame, Some(node.ifindex))
        .unwrap_or_else(|err| panic!("{name}: TC refused: {err}"));
    assert_eq!(action, TC_ACT_UNSPEC, "{name}: TC lets every frame go on");
    let counts = counted(&before, &reason_packets(node));
    if let Expect::Reply = case.expect {
        assert_eq!(counts, [(Reason::ReplyEgress, 1)], "{name}: TC counts");
        assert_checksums_valid(&out);
    } else {
        assert!(out == case.frame, "{name}: changed by TC");
        assert_eq!(counts, [], "{name}: counted by TC");
    }
}

/// The destination address and port of an IPv4 TCP or UDP frame.
fn destination(frame: &[u8]) -> std::net::SocketAddrV4 {
    let ip = std::net::Ipv4Addr::new(
        frame[L3 + 16],
        frame[L3 + 17],
        frame[L3 + 18],
        frame[L3 + 19],
    );
    std::net::SocketAddrV4::new(ip, get_u16(frame, l4_off(frame) + 2))
}

/// Every backend of the node's table.
fn backends(node: &Node) -> Vec<std::net::SocketAddrV4> {
    node.table
        .services
        .iter()
        .flat_map(|service| &service.backends)
        .filter_map(|backend| match backend.addr {
            std::net::SocketAddr::V4(addr) => Some(addr),
            std::net::SocketAddr::V6(_) => None,
        })
        .collect()
}

/// `out` is the inner frame of the VXLAN frame `frame` from its IPv4 header on (the MACs are
/// the node's to set), its TTL one less when the node sent it on itself (`tx`, with the header
/// checksum updated: checked by the caller).
fn assert_is_decapsulated(name: &str, frame: &[u8], out: &[u8], tx: bool) {
    let outer_ihl = usize::from(frame[L3] & 0x0f) * 4;
    let inner = &frame[L3 + outer_ihl + 8 + 8..];
    assert_eq!(out.len(), inner.len(), "{name}: decapsulated length");
    let ttl = L3 + 8;
    let check = L3 + 10..L3 + 12;
    for i in L3..out.len() {
        if i == ttl || check.contains(&i) {
            continue;
        }
        assert_eq!(out[i], inner[i], "{name}: decapsulated byte {i}");
    }
    let expected_ttl = if tx { inner[ttl] - 1 } else { inner[ttl] };
    assert_eq!(out[ttl], expected_ttl, "{name}: TTL");
}

/// Checks every case, and fails naming every case that failed (each one's panic message says
/// why).
fn check_all(node: &Node, cases: &[Case]) {
    let failed: Vec<&str> = cases
        .iter()
        .filter(|case| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(node, case))).is_err()
        })
        .map(|case| case.name.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed: {failed:#?}",
        failed.len(),
        cases.len()
    );
}

fn set_u16(frame: &mut [u8], offset: usize, value: u16) {
    frame[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
}

fn get_u16(frame: &[u8], offset: usize) -> u16 {
    u16::from_be_bytes([frame[offset], frame[offset + 1]])
}

/// Offset of the TCP or UDP header, from the IPv4 header's IHL.
fn l4_off(frame: &[u8]) -> usize {
    L3 + usize::from(frame[L3] & 0x0f) * 4
}

/// Recomputes the IPv4 header checksum of a frame whose IPv4 header was edited.
fn refresh_ip_checksum(frame: &mut [u8]) {
    let l4 = l4_off(frame);
    set_u16(frame, L3 + 10, 0);
    let header = internet_checksum(&[&frame[L3..l4]]);
    set_u16(frame, L3 + 10, header);
}

/// Recomputes the IPv4 header checksum and the TCP or UDP checksum of a frame whose headers
/// were edited, so that the edit is the frame's only defect. The IPv4 header's lengths must
/// be consistent, and the TCP or UDP segment must fill the IPv4 packet.
fn refresh_checksums(frame: &mut [u8]) {
    refresh_ip_checksum(frame);
    let l4 = l4_off(frame);
    let proto = frame[L3 + 9];
    let check_off = match proto {
        PROTO_TCP => l4 + 16,
        PROTO_UDP => l4 + 6,
        _ => return,
    };
    let end = L3 + usize::from(get_u16(frame, L3 + 2));
    set_u16(frame, check_off, 0);
    let l4_len = ((end - l4) as u16).to_be_bytes();
    let pseudo = [&frame[L3 + 12..L3 + 20], &[0, proto], &l4_len[..]].concat();
    let check = match internet_checksum(&[&pseudo, &frame[l4..end]]) {
        // A computed UDP checksum of 0 is sent as all ones: 0 means "none".
        0 if proto == PROTO_UDP => 0xffff,
        check => check,
    };
    set_u16(frame, check_off, check);
}

/// `frame` with `edit` applied and nothing else.
fn edited(frame: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut frame = frame.to_vec();
    edit(&mut frame);
    frame
}

/// `frame` with `edit` applied, lengths and checksums kept consistent.
fn rewritten(frame: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut frame = edited(frame, edit);
    refresh_checksums(&mut frame);
    frame
}

/// Adds `len` bytes to the IPv4 total length.
fn grow_total_length(frame: &mut [u8], len: usize) {
    let total = get_u16(frame, L3 + 2) + len as u16;
    set_u16(frame, L3 + 2, total);
}

/// `frame` with IPv4 options `options` (a multiple of 4 bytes) after its IPv4 header.
fn with_ip_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    rewritten(frame, |f| {
        let at = l4_off(f);
        f.splice(at..at, options.iter().copied());
        f[L3] += (options.len() / 4) as u8;
        grow_total_length(f, options.len());
    })
}

/// A TCP `frame` (without TCP options) with TCP options `options` (a multiple of 4 bytes).
fn with_tcp_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    rewritten(frame, |f| {
        let l4 = l4_off(f);
        f.splice(l4 + 20..l4 + 20, options.iter().copied());
        f[l4 + 12] += ((options.len() / 4) as u8) << 4;
        grow_total_length(f, options.len());
    })
}

/// Every truncation of `frame` from an Ethernet header to one byte short: passed untouched.
fn truncations(name: &str, frame: &[u8]) -> Vec<Case> {
    (L3..frame.len())
        .map(|len| {
            let expect = if len < L3 + 20 {
                Expect::Passed(&[Reason::PassTruncated])
            } else {
                Expect::Passed(MALFORMED)
            };
            case(
                format!("{name} cut to {len} bytes"),
                frame[..len].to_vec(),
                expect,
            )
        })
        .collect()
}

/// A TCP segment with `flags` can open or belong to a connection: it carries SYN, ACK or RST,
/// and a SYN carries neither FIN nor RST (RFC 9293; netfilter's conntrack calls the others
/// invalid, and no TCP stack accepts them in any state).
fn tcp_flags_valid(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST) != 0
        && (flags & TCP_SYN == 0 || flags & (TCP_FIN | TCP_RST) == 0)
}

/// A client's TCP segment to `web` with `flags` set as they are (no other change).
fn client_tcp_with_flags(port: u16, flags: u8) -> Vec<u8> {
    rewritten(&client_syn(port), |f| f[L3 + 20 + 13] = flags)
}

#[test]
fn every_truncation_and_header_defect_of_a_syn_is_passed_untouched_and_counted_once() {
    with_node(|node| {
        let syn = client_syn(40000);
        let mut cases = vec![case("the SYN", syn.clone(), Expect::Handled(FORWARDED))];
        cases.extend(truncations("the SYN", &syn));
        cases.push(case(
            "the SYN padded to Ethernet's 60-byte minimum",
            edited(&syn, |f| f.resize(60, 0)),
            Expect::Handled(FORWARDED),
        ));
        for ihl in (0..=15u8).filter(|ihl| *ihl != 5) {
            cases.push(case(
                format!("IHL {ihl}, no options"),
                edited(&syn, |f| f[L3] = 0x40 | ihl),
                Expect::Passed(MALFORMED),
            ));
        }
        for version in [0u8, 6, 15] {
            cases.push(case(
                format!("IP version {version}"),
                rewritten(&syn, |f| f[L3] = version << 4 | 5),
                Expect::Passed(&[Reason::PassMalformed]),
            ));
        }
        for words in 1..=10 {
            // NOPs, then End of Options: IHL 6 to 15.
            let mut options = vec![1u8; words * 4];
            options[words * 4 - 1] = 0;
            cases.push(case(
                format!("{} bytes of IP options", words * 4),
                with_ip_options(&client_syn(40001 + words as u16), &options),
                Expect::Handled(FORWARDED),
            ));
        }
        cases.push(case(
            "a Record Route option",
            with_ip_options(&client_syn(40020), &[7, 7, 4, 0, 0, 0, 0, 0]),
            Expect::Handled(FORWARDED),
        ));
        let frame_l3 = (syn.len() - L3) as u16;
        for (what, total) in [
            ("0", 0),
            ("below the IPv4 header", 19),
            ("the IPv4 header alone", 20),
            ("one byte short of the TCP header", 39),
            ("one byte beyond the frame", frame_l3 + 1),
            ("65535", u16::MAX),
        ] {
            cases.push(case(
                format!("total length {what}"),
                edited(&syn, |f| set_u16(f, L3 + 2, total)),
                Expect::Passed(MALFORMED),
            ));
        }
        for (what, frags) in [
            ("more fragments", 0x2000),
            ("offset 8", 0x0001),
            ("the largest offset", 0x1fff),
            ("more fragments at offset 8", 0x2001),
            ("don't fragment and offset 8", 0x4001),
        ] {
            cases.push(case(
                format!("a fragment: {what}"),
                rewritten(&syn, |f| set_u16(f, L3 + 6, frags)),
                Expect::Passed(&[Reason::PassFragment]),
            ));
        }
        cases.push(case(
            "don't fragment",
            rewritten(&client_syn(40021), |f| set_u16(f, L3 + 6, 0x4000)),
            Expect::Handled(FORWARDED),
        ));
        for doff in (0..=15u8).filter(|doff| *doff != 5) {
            cases.push(case(
                format!("TCP data offset {doff}, no options"),
                rewritten(&syn, |f| f[L3 + 20 + 12] = doff << 4),
                Expect::Passed(&[Reason::PassMalformed]),
            ));
        }
        cases.push(case(
            "TCP options (MSS, NOPs, window scale)",
            with_tcp_options(
                &client_syn(40022),
                &[2, 4, 0x05, 0xb4, 1, 1, 1, 0, 1, 3, 3, 7],
            ),
            Expect::Handled(FORWARDED),
        ));
        for proto in [1u8, 47, 132, 255] {
            cases.push(case(
                format!("IP protocol {proto} with a TCP header's bytes"),
                edited(&syn, |f| f[L3 + 9] = proto),
                Expect::Passed(&[Reason::PassNotTcpUdp]),
            ));
        }
        check_all(node, &cases);
    });
}

#[test]
fn every_combination_of_tcp_flags_is_forwarded_only_when_a_connection_may_carry_it() {
    with_node(|node| {
        let cases: Vec<Case> = (0..=u8::MAX)
            .map(|flags| {
                // No flow has this 5-tuple: only a SYN starts one; any other segment of a
                // connection the table does not know goes to the kernel (round-robin policy).
                let expect = if tcp_flags_valid(flags) && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    Expect::Handled(FORWARDED)
                } else if tcp_flags_valid(flags) {
                    Expect::Passed(&[Reason::PassFlowUnknown])
                } else {
                    Expect::Passed(&[Reason::PassMalformed])
                };
                let frame = client_tcp_with_flags(41000 + u16::from(flags), flags);
                case(format!("TCP flags {flags:#04x}"), frame, expect)
            })
            .collect();
        check_all(node, &cases);
        // The invalid ones again, on the 5-tuple of a flow that exists: still not forwarded.
        let cases: Vec<Case> = (0..=u8::MAX)
            .filter(|flags| !tcp_flags_valid(*flags))
            .map(|flags| {
                let frame = client_tcp_with_flags(41000 + u16::from(TCP_SYN), flags);
                let expect = Expect::Passed(&[Reason::PassMalformed]);
                case(format!("TCP flags {flags:#04x} on a flow"), frame, expect)
            })
            .collect();
        check_all(node, &cases);
    });
}

#[test]
fn udp_with_lengths_that_disagree_is_passed_untouched_and_counted_once() {
    with_node(|node| {
        let query = client_query(50000);
        let mut cases = vec![case("the query", query.clone(), Expect::Handled(FORWARDED))];
        cases.extend(truncations("the query", &query));
        let payload_len = (query.len() - L3 - 20) as u16;
        for (what, len) in [
            ("0", 0),
            ("below the UDP header", 7),
            ("one byte beyond the IPv4 packet", payload_len + 1),
            ("65535", u16::MAX),
        ] {
            cases.push(case(
                format!("UDP length {what}"),
                rewritten(&query, |f| set_u16(f, L3 + 20 + 4, len)),
                Expect::Passed(&[Reason::PassMalformed]),
            ));
        }
        // The IPv4 packet ends before the UDP header does; the frame carries it anyway.
        for total in [20, 24, 27] {
            cases.push(case(
                format!("total length {total}: the UDP header outside the IPv4 packet"),
                edited(&query, |f| set_u16(f, L3 + 2, total)),
                Expect::Passed(&[Reason::PassMalformed]),
            ));
        }
        cases.push(case(
            "UDP length short of the IPv4 packet (the kernel trims the rest)",
            edited(&client_query(50001), |f| {
                f.extend_from_slice(b"trailer");
                grow_total_length(f, 7);
                refresh_ip_checksum(f);
            }),
            Expect::Handled(FORWARDED),
        ));
        cases.push(case(
            "a first fragment (more to come): DNATed as its datagram",
            rewritten(&query, |f| set_u16(f, L3 + 6, 0x2000)),
            Expect::Handled(FORWARDED),
        ));
        cases.push(case(
            "a later fragment whose first was never seen",
            rewritten(&query, |f| {
                set_u16(f, L3 + 4, 0x7e57);
                set_u16(f, L3 + 6, 0x0001);
            }),
            Expect::Passed(&[Reason::PassFragment]),
        ));
        check_all(node, &cases);
    });
}

#[test]
fn martian_and_broadcast_addresses_are_never_forwarded() {
    with_node(|node| {
        let mut cases = Vec::new();
        for source in [
            [0, 0, 0, 0],
            [0, 1, 2, 3],
            [127, 0, 0, 1],
            [127, 9, 9, 9],
            [224, 0, 0, 1],
            [239, 255, 255, 250],
            [255, 255, 255, 255],
        ] {
            let syn = tcp(
                (CLIENT_MAC, INGRESS_MAC),
                (source, 40000),
                (NODE_IP, WEB_PORT),
                64,
                "S",
                b"",
            );
            let expect = Expect::Passed(&[Reason::PassMalformed]);
            cases.push(case(format!("a SYN from {source:?}"), syn, expect));
        }
        for (destination, expect) in [
            ([0, 0, 0, 0], Expect::Passed(&[Reason::PassMalformed])),
            ([127, 0, 0, 1], Expect::Passed(&[Reason::PassMalformed])),
            ([224, 0, 0, 1], Expect::Passed(&[Reason::PassNotLocal])),
            (
                [255, 255, 255, 255],
                Expect::Passed(&[Reason::PassNotLocal]),
            ),
            // The broadcast addresses of the node's subnets, which the FIB answers for as it
            // does for its own addresses (found by `cargo xtask fuzz`).
            (
                [192, 168, 100, 255],
                Expect::Passed(&[Reason::PassNotLocal]),
            ),
            ([10, 0, 0, 255], Expect::Passed(&[Reason::PassNotLocal])),
        ] {
            let syn = tcp(
                (CLIENT_MAC, INGRESS_MAC),
                (CLIENT_IP, 40000),
                (destination, WEB_PORT),
                64,
                "S",
                b"",
            );
            cases.push(case(format!("a SYN to {destination:?}"), syn, expect));
            let query = udp(
                (CLIENT_MAC, INGRESS_MAC),
                (CLIENT_IP, 40001),
                (destination, DNS_PORT),
                64,
                b"query",
            );
            cases.push(case(
                format!("a datagram to {destination:?}"),
                query,
                expect,
            ));
        }
        // The frame the fuzzer found (seed 1, frame 2974): a DNS answer whose reverse-NAT entry
        // a datagram to 192.168.100.255:5353 had made, reverse-NATed to come from the broadcast
        // address. Now that datagram starts no flow, and the answer passes.
        let found = "0200000000010200000000070800450000340000400040110c080a000007c0a864020035a0290020a338616e2061ee73776572206f6620736f6d65206c656e677468";
        let found: Vec<u8> = (0..found.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&found[i..i + 2], 16).unwrap())
            .collect();
        cases.push(case(
            "a DNS answer from 10.0.0.7:53 to a client port with no flow",
            found,
            Expect::Passed(&[Reason::PassNotService]),
        ));
        check_all(node, &cases);
    });
}

#[test]
fn vxlan_truncated_flagged_nested_or_from_strangers_is_never_decapsulated() {
    with_node(|node| {
        let inner = syn_from_n2_for_a_local_backend();
        let ours = Tunnel::from_n2();
        let frame = ours.wrap(&inner);
        let mut cases = vec![case(
            "the VXLAN frame",
            frame.clone(),
            Expect::Handled(DECAPSULATED),
        )];
        cases.extend(truncations("the VXLAN frame", &frame));
        let malformed = Expect::Dropped(Reason::DropVxlanMalformed);
        for len in 0..inner.len() {
            let name = format!("inner frame cut to {len} bytes");
            cases.push(case(name, ours.wrap(&inner[..len]), malformed));
        }
        for len in 0..8 {
            // The outer UDP length covers what is there: the VXLAN header itself is cut.
            let cut = edited(&frame, |f| {
                f.truncate(L3 + 20 + 8 + len);
                set_u16(f, L3 + 2, (20 + 8 + len) as u16);
                set_u16(f, L3 + 20 + 4, (8 + len) as u16);
            });
            cases.push(case(
                format!("VXLAN header cut to {len} bytes"),
                cut,
                malformed,
            ));
        }
        for flags in 0..=u8::MAX {
            let expect = if flags & 0x08 == 0 {
                Expect::Dropped(Reason::DropVxlanBadFlags)
            } else {
                // RFC 7348: the other bits are reserved, ignored on receipt.
                Expect::Handled(DECAPSULATED)
            };
            let frame = Tunnel { flags, ..ours }.wrap(&inner);
            cases.push(case(format!("VXLAN flags {flags:#04x}"), frame, expect));
        }
        for vni in [0, DEFAULT_VNI - 1, DEFAULT_VNI + 1, 0xff_ffff] {
            let frame = Tunnel { vni, ..ours }.wrap(&inner);
            let expect = Expect::Passed(&[Reason::PassVxlanOtherVni]);
            cases.push(case(format!("VNI {vni}"), frame, expect));
        }
        cases.push(case(
            "VXLAN inside VXLAN",
            ours.wrap(&ours.wrap(&inner)),
            malformed,
        ));
        cases.push(case(
            "VXLAN of another VNI inside VXLAN",
            ours.wrap(&Tunnel { vni: 7, ..ours }.wrap(&inner)),
            malformed,
        ));
        cases.push(case(
            "from an address that is no node",
            Tunnel {
                src: (OTHER_IP, N2_SOURCE_PORT),
                ..ours
            }
            .wrap(&inner),
            Expect::Dropped(Reason::DropVxlanUnknownSource),
        ));
        cases.push(case(
            "another VNI from an address that is no node",
            Tunnel {
                src: (OTHER_IP, N2_SOURCE_PORT),
                vni: DEFAULT_VNI + 1,
                ..ours
            }
            .wrap(&inner),
            Expect::Passed(&[Reason::PassVxlanOtherVni]),
        ));
        let inner_defects = [
            (
                "a fragment",
                rewritten(&inner, |f| set_u16(f, L3 + 6, 0x2000)),
            ),
            ("SYN+FIN", rewritten(&inner, |f| f[L3 + 20 + 13] = 0x03)),
            ("IHL 4", edited(&inner, |f| f[L3] = 0x44)),
            (
                "from 127.0.0.1",
                rewritten(&inner, |f| {
                    f[L3 + 12..L3 + 16].copy_from_slice(&[127, 0, 0, 1])
                }),
            ),
            (
                "VLAN-tagged",
                edited(&inner, |f| {
                    f.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
                }),
            ),
            (
                "total length beyond it",
                edited(&inner, |f| set_u16(f, L3 + 2, 1000)),
            ),
        ];
        for (what, defect) in inner_defects {
            cases.push(case(
                format!("inner frame {what}"),
                ours.wrap(&defect),
                malformed,
            ));
        }
        cases.push(case(
            "outer fragment",
            rewritten(&frame, |f| set_u16(f, L3 + 6, 0x2000)),
            Expect::Passed(&[Reason::PassFragment]),
        ));
        cases.push(case(
            "outer UDP length beyond the packet",
            edited(&frame, |f| {
                let beyond = (f.len() - L3 - 20 + 1) as u16;
                set_u16(f, L3 + 20 + 4, beyond);
            }),
            Expect::Passed(&[Reason::PassMalformed]),
        ));
        cases.push(case(
            "outer IP options",
            with_ip_options(&frame, &[1, 1, 1, 0]),
            Expect::Handled(DECAPSULATED),
        ));
        check_all(node, &cases);
    });
}

#[test]
fn frames_that_are_not_untagged_ipv4_are_passed_untouched() {
    with_node(|node| {
        let syn = client_syn(40000);
        let mut cases = Vec::new();
        for ether_type in [0x0000u16, 0x002e, 0x0806, 0x8847, 0x88cc, 0xffff] {
            let frame = edited(&syn, |f| set_u16(f, 12, ether_type));
            let expect = Expect::Passed(&[Reason::PassNotIpv4]);
            cases.push(case(format!("ethertype {ether_type:#06x}"), frame, expect));
        }
        // An IPv4 packet labelled IPv6: the IPv6 parser finds version 4.
        let frame = edited(&syn, |f| set_u16(f, 12, 0x86dd));
        let expect = Expect::Passed(&[Reason::PassMalformed]);
        cases.push(case("ethertype 0x86dd over IPv4".to_owned(), frame, expect));
        for (what, tags) in [
            ("802.1Q VLAN 100", &[0x81, 0x00, 0x00, 0x64][..]),
            (
                "802.1ad outer and 802.1Q inner tags",
                &[0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x64][..],
            ),
        ] {
            let frame = edited(&syn, |f| {
                f.splice(12..12, tags.iter().copied());
            });
            let expect = Expect::Passed(&[Reason::PassNotIpv4]);
            cases.push(case(format!("a SYN tagged {what}"), frame, expect));
        }
        check_all(node, &cases);
    });
}

/// IPv6 frames that are no well-formed packet for a service pass untouched, counted once, with
/// no flow made: every truncation of a SYN that carries a hop-by-hop header, and a wrong
/// version, payload lengths past the frame and of zero, a second hop-by-hop header, martian
/// addresses, a TCP header shorter than 20 bytes, flags no connection takes.
#[test]
fn malformed_ipv6_frames_are_passed_untouched() {
    with_node(|node| {
        const PORT: u16 = 8086;
        let backend = "[2001:db8:10::6]:80"
            .parse::<std::net::SocketAddr>()
            .unwrap();
        node.table
            .add_service(
                "web6",
                lb_userspace::table::Proto::Tcp,
                PORT,
                None,
                &[backend],
            )
            .unwrap();
        node.apply();
        let mut plain = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, INGRESS_MAC)
            .ipv6(CLIENT_IP6, NODE_IP6, 64)
            .tcp(40000, PORT, 1000, 64240)
            .syn()
            .write(&mut plain, b"")
            .unwrap();
        // A hop-by-hop header (PadN) before the TCP header.
        let mut syn = plain[..54].to_vec();
        syn[14 + 6] = 0;
        syn[14 + 5] += 8;
        syn.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        syn.extend_from_slice(&plain[54..]);
        let malformed = Expect::Passed(&[Reason::PassMalformed]);
        let mut cases = Vec::new();
        for len in L3..syn.len() {
            let expect = Expect::Passed(&[Reason::PassTruncated, Reason::PassMalformed]);
            cases.push(case(
                format!("cut to {len} bytes"),
                syn[..len].to_vec(),
                expect,
            ));
        }
        type Edit = fn(&mut Vec<u8>);
        let edits: [(&str, Edit); 8] = [
            ("version 4", |f| f[14] = 0x40),
            ("payload length past the frame", |f| f[14 + 5] += 1),
            ("payload length 0", |f| {
                f[14 + 4..14 + 6].copy_from_slice(&[0, 0])
            }),
            ("a second hop-by-hop header", |f| f[14 + 40] = 0),
            ("multicast source", |f| f[14 + 8] = 0xff),
            ("loopback destination", |f| {
                f[14 + 24..14 + 40]
                    .copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
            }),
            ("TCP header of 16 bytes", |f| f[14 + 48 + 12] = 0x40),
            ("SYN and FIN", |f| f[14 + 48 + 13] = 0x03),
        ];
        for (what, edit) in edits {
            cases.push(case(what, edited(&syn, edit), malformed));
        }
        check_all(node, &cases);
        assert_eq!(node.maps.flows6.keys().count(), 0);
        // The frame itself is a service's.
        let (action, _) = node.xdp(&syn, Some(node.ifindex));
        assert_eq!(action, XDP_TX);
    });
}

/// The largest frame BPF_PROG_RUN gives an XDP program in one buffer: a page less the XDP
/// headroom and the room the kernel keeps for `skb_shared_info`. The rest of a longer frame
/// goes into fragments, which a program without multi-buffer support does not see (and a
/// driver does not attach such a program to an interface whose MTU needs them).
const LARGEST_LINEAR_FRAME: usize = 4096 - 256 - 320;

#[test]
fn the_smallest_and_the_largest_frames_are_counted_once_or_refused_by_the_kernel() {
    with_node(|node| {
        // The kernel never runs XDP on less than an Ethernet header, nor TC on less than
        // what `tc_test_run_takes`: BPF_PROG_RUN refuses such frames, so nothing is counted.
        let before = reason_packets(node);
        let syn = client_syn(40000);
        let arp = edited(&syn, |f| set_u16(f, 12, 0x0806));
        for frame in [&syn, &arp] {
            for len in 0..frame.len() {
                let cut = &frame[..len];
                if len < L3 {
                    assert!(
                        node.try_xdp(cut, Some(node.ifindex)).is_err(),
                        "{len} bytes"
                    );
                }
                let refused = node.try_tc_on(cut, Some(node.ifindex)).is_err();
                assert_eq!(refused, !tc_test_run_takes(cut), "{len} bytes");
            }
        }
        assert_eq!(reason_packets(node), before);

        let largest = |port, len: usize| {
            let payload = vec![0x5a; len - L3 - 20 - 20];
            tcp(
                (CLIENT_MAC, INGRESS_MAC),
                (CLIENT_IP, port),
                (NODE_IP, WEB_PORT),
                64,
                "PA",
                &payload,
            )
        };
        // The data segments below belong to connections the table knows.
        for port in [40000, 40001] {
            assert_eq!(node.xdp(&client_syn(port), Some(node.ifindex)).0, XDP_TX);
        }
        let cases = vec![
            case(
                "an Ethernet header alone",
                client_syn(40000)[..L3].to_vec(),
                Expect::Passed(&[Reason::PassTruncated]),
            ),
            case(
                "a 1514-byte frame (the uplink's MTU)",
                largest(40000, L3 + UNDERLAY_MTU),
                Expect::Handled(&[Reason::ForwardTx]),
            ),
            case(
                "the largest frame in one buffer",
                largest(40001, LARGEST_LINEAR_FRAME),
                // Over the uplink's MTU: the kernel fragments it or answers ICMP.
                Expect::Handled(&[Reason::ForwardStack]),
            ),
            case(
                "a 9014-byte jumbo frame, of which XDP sees the first buffer",
                largest(40003, 9014),
                Expect::Passed(&[Reason::PassMalformed]),
            ),
            case(
                "the largest frame claiming 65535 bytes",
                edited(&largest(40002, LARGEST_LINEAR_FRAME), |f| {
                    set_u16(f, L3 + 2, u16::MAX)
                }),
                Expect::Passed(&[Reason::PassMalformed]),
            ),
        ];
        check_all(node, &cases);
    });
}

#[test]
fn truncated_or_malformed_replies_are_never_reverse_nated_by_xdp_or_tc() {
    with_node(|node| {
        let port = 42000;
        let (action, out) = node.xdp(&client_syn(port), Some(node.ifindex));
        assert_eq!(action, XDP_TX);
        let backend: [u8; 4] = out[L3 + 16..L3 + 20].try_into().unwrap();
        let reply = tcp(
            (backend_mac(0), INGRESS_MAC),
            (backend, BACKEND_PORT),
            (CLIENT_IP, port),
            64,
            "PA",
            b"HTTP/1.1 200 OK\r\n\r\n",
        );
        let mut cases = vec![case("the reply", reply.clone(), Expect::Reply)];
        cases.extend(truncations("the reply", &reply));
        cases.extend([
            case(
                "the reply as a fragment",
                rewritten(&reply, |f| set_u16(f, L3 + 6, 0x2000)),
                Expect::Passed(&[Reason::PassFragment]),
            ),
            case(
                "the reply with SYN+RST",
                rewritten(&reply, |f| f[L3 + 20 + 13] = TCP_SYN | TCP_RST),
                Expect::Passed(&[Reason::PassMalformed]),
            ),
            case(
                "the reply with TCP data offset 15",
                rewritten(&reply, |f| f[L3 + 20 + 12] = 0xf0),
                Expect::Passed(&[Reason::PassMalformed]),
            ),
            case(
                "the reply with IHL 15",
                edited(&reply, |f| f[L3] = 0x4f),
                Expect::Passed(MALFORMED),
            ),
        ]);
        check_all(node, &cases);
    });
}

/// The data plane does not verify checksums; the kernel that receives the packet does. A
/// corrupted packet to a service is forwarded, and the incremental updates keep its checksum
/// exactly as wrong, so the backend's kernel drops it (README, Known limits).
#[test]
fn corrupt_checksums_are_forwarded_still_corrupt() {
    with_node(|node| {
        let ip_checksum_valid = |frame: &[u8]| internet_checksum(&[&frame[L3..L3 + 20]]) == 0;
        let tcp_checksum_valid = |frame: &[u8]| {
            let l4_len = ((frame.len() - L3 - 20) as u16).to_be_bytes();
            let pseudo = [&frame[L3 + 12..L3 + 20], &[0, PROTO_TCP], &l4_len[..]].concat();
            internet_checksum(&[&pseudo, &frame[L3 + 20..]]) == 0
        };
        let syn = client_syn(43000);
        assert!(ip_checksum_valid(&syn) && tcp_checksum_valid(&syn));
        let bad_ip = edited(&syn, |f| f[L3 + 10] ^= 0x5a);
        let (action, out) = node.xdp(&bad_ip, Some(node.ifindex));
        assert_eq!(action, XDP_TX);
        assert!(!ip_checksum_valid(&out) && tcp_checksum_valid(&out));

        let bad_tcp = edited(&client_syn(43001), |f| f[L3 + 20 + 16] ^= 0x5a);
        let (action, out) = node.xdp(&bad_tcp, Some(node.ifindex));
        assert_eq!(action, XDP_TX);
        assert!(ip_checksum_valid(&out) && !tcp_checksum_valid(&out));
    });
}
