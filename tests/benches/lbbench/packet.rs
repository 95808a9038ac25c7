//! Per-packet cost of the data plane through `BPF_PROG_RUN`, the method of Katran's performance
//! tester, against a trivial XDP_PASS program timed the same way in the same run.
//!
//! Why one packet per run: the kernel's test loop (`repeat`) runs every repetition on the same
//! buffer, so a program that rewrites the frame (DNAT, encapsulation) sees its own output from
//! the second run on: a 1,000,000-times loop over a SYN times one new flow and 999,999 packets
//! addressed to a backend, which are not for a service. So every case here runs each packet
//! once, on a fresh copy, and takes the kernel's own timing of that one run; the floor is timed
//! the same way, so the ratios compare like with like. The kernel loop is still reported for the
//! two cases that leave the frame alone, which shows the harness' fixed cost per call (the
//! clock reads around a single run).
//!
//! Every case checks what it claims to measure: the action of every run, the output frame of
//! the first, and that the counter of the expected `Reason` moved once per packet.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result, bail, ensure};
use aya::{Ebpf, programs::Xdp};
use etherparse::PacketBuilder;
use lb_common::{
    DEFAULT_VNI, DEFAULT_VXLAN_PORT, FlowValue, Reason, ReverseValue, VXLAN_OVERHEAD,
    VXLAN6_OVERHEAD, program_names,
};
use lb_tests::bpf::{load_xdp_pass, test_run_xdp};
use lb_tests::netns::NetNs;
use lb_userspace::dataplane::sync;
use lb_userspace::dataplane::{self as lb_dataplane, Maps};
use lb_userspace::table::{Proto, Scheduler, Table, parse_backend_spec};

#[path = "../../tests/dataplane/mod.rs"]
mod dataplane;

use crate::Options;
use crate::report::{Measurement, names};
use dataplane::{tcp, tcp_key};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The node's uplink `lbt0`: its MAC and address; the client and the other node `n2` are on
/// its segment, the node's own tasks in the task subnet behind the same link.
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_IP: [u8; 4] = [192, 168, 100, 1];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_IP: [u8; 4] = [192, 168, 100, 2];
const N2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const N2_IP: [u8; 4] = [192, 168, 100, 11];
/// `web tcp/8080` is balanced over `LOCAL_BACKENDS` tasks 10.0.0.10.. on this node.
const WEB_PORT: u16 = 8080;
const LOCAL_BACKENDS: u8 = 8;
/// `hashed tcp/8081` is balanced over the same tasks by maglev.
const HASHED_PORT: u16 = 8081;
/// The case of new flows to `hashed`.
const NEW_FLOW_MAGLEV: &str = "new flow (maglev)";
/// `mesh tcp/9090` is balanced over tasks 10.0.1.10.. on n2, reached through VXLAN.
const MESH_PORT: u16 = 9090;
const REMOTE_BACKENDS: u8 = 4;
const BACKEND_PORT: u16 = 80;
/// The payload of a backend's reply.
const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
/// The reply case's name.
const REVERSE_NAT: &str = "reverse NAT of a reply";
/// ... in the table-size section, replies of every flow of the table.
const REVERSE_NAT_ALL_ACTIVE: &str = "reverse NAT, every flow active";
/// The payload of data packets: a small HTTP request, as on a kept-alive connection.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// The IPv6 service `web6 tcp/8086`, balanced over `LOCAL_BACKENDS` IPv6 tasks
/// fd00:10::10.. on this node, reached at the node's IPv6 address from the client's.
const WEB6_PORT: u16 = 8086;
const NODE_IP6: [u8; 16] = [0xfd, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT_IP6: [u8; 16] = [0xfd, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// n2's address on the IPv6 underlay of the last cases, on lbt0's link.
const N2_IP6: [u8; 16] = [0xfd, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
/// The IPv6 cases, beside their IPv4 counterparts.
const NEW_FLOW6: &str = "new flow (IPv6)";
const ESTABLISHED6: &str = "established (IPv6)";
const REVERSE_NAT6: &str = "reverse NAT of a reply (IPv6)";

/// Distinct flows the established cases cycle over, so that their table entries are spread
/// over the table as a real mix of connections would be, not one hot entry.
const FLOWS_CYCLED: usize = 1024;

/// Flow table capacity of the per-case section.
const MAIN_TABLE_CAPACITY: usize = 16 * FLOWS_CYCLED;

/// Flow table sizes the table-size section fills the table to (full run).
const TABLE_SIZES: [(usize, &str); 3] = [(1_000, "1k"), (100_000, "100k"), (1_000_000, "1M")];
/// ... and in a smoke run, which must take seconds.
const SMOKE_TABLE_SIZES: [(usize, &str); 2] = [(1_000, "1k"), (20_000, "20k")];

/// Variants of the packet section: one packet per run (the measure), the kernel's loop.
const PER_PACKET: &str = names::PER_PACKET;
const KERNEL_LOOP: &str = "kernel loop";

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let samples = if opts.smoke { 2_000 } else { 200_000 };
    let mut found = Vec::new();

    // A table that the new flows fill and keep full: they are measured at steady state, the
    // LRU evicting the oldest entries, in memory that stays in cache. The established flows
    // (re-created before they are measured) stay the most recent, never evicted.
    let node = Node::build(MAIN_TABLE_CAPACITY)?;
    found.extend(node.in_netns(|node| node.cases(samples))?);
    drop(node);

    let sizes: &[(usize, &str)] = if opts.smoke {
        &SMOKE_TABLE_SIZES
    } else {
        &TABLE_SIZES
    };
    for &(size, label) in sizes {
        // Twice the entries: the LRU table must not evict the flows being measured.
        let node = Node::build(2 * (size + samples))?;
        found.extend(node.in_netns(|node| node.table_size_cases(size, label, samples))?);
    }
    Ok(found)
}

/// The node namespace: `lbt0` with the node's addresses and permanent neighbours for the
/// client, every task and n2, so that the program's FIB lookups resolve.
struct Node {
    ns: NetNs,
    flow_capacity: u32,
}

/// The loaded data plane inside the node namespace.
struct Loaded {
    ebpf: Ebpf,
    maps: Maps,
    /// The table applied: its backend ids are the ones flows refer to.
    table: Table,
    floor: OwnedFd,
    ifindex: u32,
}

/// An address and port, as they are in a frame's headers.
type Endpoint = ([u8; 4], u16);

/// A check of a case's first input and output frames.
type FrameCheck = dyn Fn(&[u8], &[u8]) -> Result<()>;

/// One measured case: `frame(i)` is the i-th packet; every run must return `action` and count
/// once under `reason`; `check` looks at the first input and output.
struct Case<'a> {
    name: &'a str,
    frame: &'a dyn Fn(usize) -> Vec<u8>,
    action: u32,
    reason: Option<Reason>,
    check: &'a FrameCheck,
}

impl Node {
    fn build(flow_capacity: usize) -> Result<Node> {
        let ns = NetNs::new("bench")?;
        let mut commands = vec![
            "link add lbt0 type veth peer name lbt1".to_string(),
            format!(
                "link set lbt0 address {}",
                lb_tests::netns::format_mac(NODE_MAC)
            ),
            "link set lbt0 up".into(),
            "link set lbt1 up".into(),
            format!("addr add {}/24 dev lbt0", Ipv4Addr::from(NODE_IP)),
            "addr add 10.0.0.1/24 dev lbt0".into(),
            "route add 10.0.1.0/24 via 192.168.100.11".into(),
            // The other clients (new flows, table fillers) are reached through the client.
            "route add 198.18.0.0/15 via 192.168.100.2".into(),
            "route add 100.64.0.0/10 via 192.168.100.2".into(),
            "addr add fd00:100::1/64 dev lbt0 nodad".into(),
            "addr add fd00:10::1/64 dev lbt0 nodad".into(),
            // New IPv6 flows come from all over fd00:c000::/34, through the client.
            "-6 route add fd00:c000::/34 via fd00:100::2".into(),
        ];
        let neighbours = [(CLIENT_IP, CLIENT_MAC), (N2_IP, N2_MAC)]
            .into_iter()
            .chain((0..LOCAL_BACKENDS).map(|i| (local_backend(i), backend_mac(i))));
        for (ip, mac) in neighbours {
            commands.push(format!(
                "neigh add {} lladdr {} dev lbt0 nud permanent",
                Ipv4Addr::from(ip),
                lb_tests::netns::format_mac(mac)
            ));
        }
        let neighbours6 = [(CLIENT_IP6, CLIENT_MAC), (N2_IP6, N2_MAC)]
            .into_iter()
            .chain((0..LOCAL_BACKENDS).map(|i| (local_backend6(i), backend_mac(i))));
        for (ip, mac) in neighbours6 {
            commands.push(format!(
                "neigh add {} lladdr {} dev lbt0 nud permanent",
                std::net::Ipv6Addr::from(ip),
                lb_tests::netns::format_mac(mac)
            ));
        }
        for args in &commands {
            ns.ip(args.split(' '))?;
        }
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(Node {
            ns,
            flow_capacity: u32::try_from(flow_capacity).context("flow capacity")?,
        })
    }

    /// Loads the programs and the table inside the namespace and runs `body` there.
    fn in_netns<R: Send>(&self, body: impl FnOnce(&mut Loaded) -> Result<R> + Send) -> Result<R> {
        let capacity = self.flow_capacity;
        self.ns.in_netns(move || {
            pin_to_one_cpu()?;
            let mut loaded = Loaded::load(capacity)?;
            body(&mut loaded)
        })
    }
}

impl Loaded {
    fn load(flow_capacity: u32) -> Result<Loaded> {
        let mut ebpf =
            lb_dataplane::load(None, lb_dataplane::FlowCapacity::new(flow_capacity, None))?;
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::XDP_INGRESS)
            .context("no XDP program")?
            .try_into()?;
        xdp.load()?;
        lb_dataplane::load_ipv6_programs(&mut ebpf)?;
        let mut maps = Maps::take(&mut ebpf)?;
        // The frames are addressed to lbt0, this node's.
        maps.sync_host_macs(&[NODE_MAC].into())?;
        maps.sync_host_addrs(&[Ipv4Addr::from(NODE_IP)].into())?;
        maps.sync_host_addrs6(&[NODE_IP6].into())?;
        let mut table = Table::default();
        for (name, ip) in [("n1", NODE_IP), ("n2", N2_IP)] {
            table
                .add_node(name, Ipv4Addr::from(ip).into())
                .map_err(anyhow::Error::msg)?;
        }
        let web: Vec<_> = (0..LOCAL_BACKENDS)
            .map(|i| SocketAddrV4::new(local_backend(i).into(), BACKEND_PORT))
            .collect();
        table
            .add_service("web", Proto::Tcp, WEB_PORT, None, &web)
            .map_err(anyhow::Error::msg)?;
        let web6: Vec<std::net::SocketAddr> = (0..LOCAL_BACKENDS)
            .map(|i| (std::net::Ipv6Addr::from(local_backend6(i)), BACKEND_PORT).into())
            .collect();
        table
            .add_service("web6", Proto::Tcp, WEB6_PORT, None, &web6)
            .map_err(anyhow::Error::msg)?;
        table
            .add_service("hashed", Proto::Tcp, HASHED_PORT, None, &web)
            .and_then(|()| table.set_scheduler("hashed", Scheduler::Maglev))
            .map_err(anyhow::Error::msg)?;
        table
            .add_service("mesh", Proto::Tcp, MESH_PORT, None, &mesh_backends()?)
            .map_err(anyhow::Error::msg)?;
        let delta = sync::delta(&sync::desired(&table, Some("n1")), &maps.read_contents()?);
        maps.apply(&delta)?;
        Ok(Loaded {
            ebpf,
            maps,
            table,
            floor: load_xdp_pass()?,
            ifindex: if_index("lbt0")?,
        })
    }

    fn program(&self) -> Result<BorrowedFd<'_>> {
        let xdp: &Xdp = self
            .ebpf
            .program(program_names::XDP_INGRESS)
            .context("no XDP program")?
            .try_into()?;
        Ok(xdp.fd()?.as_fd())
    }

    fn reason_packets(&self, reason: Reason) -> Result<u64> {
        Ok(self.maps.reason_totals()?[reason as usize].packets)
    }

    /// [`Loaded::established_flows`] over IPv6, to `web6`.
    fn established_flows6(&self) -> Result<Vec<Vec<u8>>> {
        let prog = self.program()?;
        for i in 0..FLOWS_CYCLED {
            let syn = client_tcp6((CLIENT_IP6, 10_000 + i as u16), WEB6_PORT, "S", b"");
            let run = test_run_xdp(prog, &syn, Some(self.ifindex), 1)?;
            ensure!(
                run.action == XDP_TX,
                "priming IPv6: action {} instead of XDP_TX",
                run.action
            );
        }
        Ok((0..FLOWS_CYCLED)
            .map(|i| client_tcp6((CLIENT_IP6, 10_000 + i as u16), WEB6_PORT, "PA", REQUEST))
            .collect())
    }

    /// Creates [`FLOWS_CYCLED`] flows of the client to `port` (their SYNs run once each,
    /// unmeasured, each answered with XDP_TX) and returns a data packet of each.
    fn established_flows(&self, port: u16) -> Result<Vec<Vec<u8>>> {
        let prog = self.program()?;
        for i in 0..FLOWS_CYCLED {
            let syn = client_tcp(flow_client(i), port, "S", b"");
            let run = test_run_xdp(prog, &syn, Some(self.ifindex), 1)?;
            ensure!(
                run.action == XDP_TX,
                "priming: action {} instead of XDP_TX",
                run.action
            );
        }
        Ok((0..FLOWS_CYCLED)
            .map(|i| client_tcp(flow_client(i), port, "PA", REQUEST))
            .collect())
    }

    /// Times `case` over `samples` packets, one run each, on `prog`; returns the median of the
    /// kernel's per-run times in ns. Medians, not means: a run the hypervisor or an interrupt
    /// stretched says nothing about the program.
    fn time(&self, prog: BorrowedFd<'_>, case: &Case, samples: usize) -> Result<f64> {
        let before = case.reason.map(|r| self.reason_packets(r)).transpose()?;
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples {
            let frame = (case.frame)(i);
            let run = test_run_xdp(prog, &frame, Some(self.ifindex), 1)?;
            if run.action != case.action {
                bail!(
                    "{}: packet {i} got action {} instead of {}",
                    case.name,
                    run.action,
                    case.action
                );
            }
            if i == 0 {
                (case.check)(&frame, &run.frame).with_context(|| case.name.to_string())?;
            }
            times.push(run.duration_ns);
        }
        if let (Some(reason), Some(before)) = (case.reason, before) {
            let counted = self.reason_packets(reason)? - before;
            ensure!(
                counted == samples as u64,
                "{}: {counted} packets counted as {} instead of {samples}",
                case.name,
                reason.name()
            );
        }
        Ok(median(&mut times))
    }

    /// Times `frame` in the kernel's own loop of `repeat` runs (only for frames the program
    /// leaves unchanged, see the module documentation).
    fn time_loop(&self, prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> Result<f64> {
        let run = test_run_xdp(prog, frame, Some(self.ifindex), repeat)?;
        ensure!(run.action == XDP_PASS, "kernel loop: action {}", run.action);
        ensure!(run.frame == frame, "kernel loop: the frame changed");
        Ok(f64::from(run.duration_ns))
    }

    /// Every per-packet case, on a table of the flows the cases create.
    fn cases(&mut self, samples: usize) -> Result<Vec<Measurement>> {
        let prog = self.program()?;
        let floor = self.floor.as_fd();
        let mut found = Vec::new();
        let mut record = |case: &str, variant: &str, ns: f64| {
            found.push(Measurement::new(
                names::PACKET,
                case,
                variant,
                ns,
                names::NS_PER_PACKET,
            ));
            if variant == PER_PACKET {
                found.push(Measurement::new(
                    names::PACKET,
                    case,
                    variant,
                    1000.0 / ns,
                    "Mpps",
                ));
            }
        };

        let not_for_a_service = client_tcp(flow_client(0), 22, "A", b"");
        let unchanged = |input: &[u8], output: &[u8]| {
            ensure!(input == output, "frame changed");
            Ok(())
        };
        let floor_case = Case {
            name: names::FLOOR,
            frame: &|_| not_for_a_service.clone(),
            action: XDP_PASS,
            reason: None,
            check: &unchanged,
        };
        record(
            names::FLOOR,
            PER_PACKET,
            self.time(floor, &floor_case, samples)?,
        );
        let repeat = u32::try_from(samples * 10).unwrap_or(u32::MAX);
        record(
            names::FLOOR,
            KERNEL_LOOP,
            self.time_loop(floor, &not_for_a_service, repeat)?,
        );

        let name = "not for a service";
        let case = Case {
            name,
            frame: &|_| not_for_a_service.clone(),
            action: XDP_PASS,
            reason: Some(Reason::PassNotService),
            check: &unchanged,
        };
        record(name, PER_PACKET, self.time(prog, &case, samples)?);
        record(
            name,
            KERNEL_LOOP,
            self.time_loop(prog, &not_for_a_service, repeat)?,
        );

        // New flows: every SYN from another client port (and address), so every one misses.
        let new_flow = |i: usize| client_tcp(new_flow_client(i), WEB_PORT, "S", b"");
        let case = Case {
            name: names::NEW_FLOW,
            frame: &new_flow,
            action: XDP_TX,
            reason: Some(Reason::ForwardTx),
            check: &check_dnat_to_local_backend,
        };
        record(
            names::NEW_FLOW,
            PER_PACKET,
            self.time(prog, &case, samples)?,
        );
        // The same through a maglev table lookup instead of the round-robin cursor, from other
        // clients again.
        let new_hashed_flow =
            |i: usize| client_tcp(new_flow_client(samples + i), HASHED_PORT, "S", b"");
        let case = Case {
            name: NEW_FLOW_MAGLEV,
            frame: &new_hashed_flow,
            action: XDP_TX,
            reason: Some(Reason::ForwardTx),
            check: &check_dnat_to_local_backend,
        };
        record(
            NEW_FLOW_MAGLEV,
            PER_PACKET,
            self.time(prog, &case, samples)?,
        );

        // New IPv6 flows, from clients never seen.
        let new_flow6 = |i: usize| client_tcp6(new_flow_client6(i), WEB6_PORT, "S", b"");
        let case = Case {
            name: NEW_FLOW6,
            frame: &new_flow6,
            action: XDP_TX,
            reason: Some(Reason::ForwardTx),
            check: &check_dnat6,
        };
        record(NEW_FLOW6, PER_PACKET, self.time(prog, &case, samples)?);

        for (name, ns) in self.established_cases(samples)? {
            record(name, PER_PACKET, ns);
        }
        for (name, ns) in self.underlay6_cases(samples)? {
            record(name, PER_PACKET, ns);
        }
        Ok(found)
    }

    /// The mesh moved to an IPv6 underlay (n1 and n2 by their IPv6 addresses): VXLAN over IPv6
    /// of an established IPv4 flow to n2 (`lb_xdp` hands it to `lb_xdp6_encap`), and
    /// decapsulation of a flow n2 balanced to this node (`lb_xdp6` hands it to
    /// `lb_xdp6_overlay`), next to the IPv4 underlay's cases.
    fn underlay6_cases(&mut self, samples: usize) -> Result<Vec<(&'static str, f64)>> {
        let table = &mut self.table;
        table.remove_service("mesh").map_err(anyhow::Error::msg)?;
        for name in ["n1", "n2"] {
            table.remove_node(name).map_err(anyhow::Error::msg)?;
        }
        for (name, ip) in [("n1", NODE_IP6), ("n2", N2_IP6)] {
            table
                .add_node(name, std::net::Ipv6Addr::from(ip).into())
                .map_err(anyhow::Error::msg)?;
        }
        table
            .add_service("mesh", Proto::Tcp, MESH_PORT, None, &mesh_backends()?)
            .map_err(anyhow::Error::msg)?;
        let delta = sync::delta(
            &sync::desired(&self.table, Some("n1")),
            &self.maps.read_contents()?,
        );
        self.maps.apply(&delta)?;
        let prog = self.program()?;
        let mut found = Vec::new();

        let mesh_requests = self.established_flows(MESH_PORT)?;
        let name = "VXLAN encapsulation (IPv6 underlay)";
        let case = Case {
            name,
            frame: &|i| mesh_requests[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::ForwardEncapTx),
            check: &|input, out| {
                ensure!(
                    out.len() == input.len() + VXLAN6_OVERHEAD as usize,
                    "not encapsulated over IPv6"
                );
                ensure!(out[38..54] == N2_IP6, "outer destination is not n2");
                ensure!(
                    u16::from_be_bytes([out[56], out[57]]) == DEFAULT_VXLAN_PORT,
                    "not to the VXLAN port"
                );
                Ok(())
            },
        };
        found.push((name, self.time(prog, &case, samples)?));

        let decap: Vec<_> = (0..FLOWS_CYCLED)
            .map(|i| {
                let backend = local_backend((i % usize::from(LOCAL_BACKENDS)) as u8);
                let inner = tcp(
                    (N2_MAC, NODE_MAC),
                    flow_client(i),
                    (backend, BACKEND_PORT),
                    63,
                    "PA",
                    REQUEST,
                );
                vxlan6_from_n2(&inner)
            })
            .collect();
        let name = "VXLAN decapsulation (IPv6 underlay)";
        let case = Case {
            name,
            frame: &|i| decap[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::DecapTx),
            check: &|input, out| {
                ensure!(
                    out.len() + VXLAN6_OVERHEAD as usize == input.len(),
                    "not decapsulated"
                );
                let (_, dst) = addresses(out)?;
                ensure!(dst.0[..3] == [10, 0, 0], "inner packet not to a local task");
                Ok(())
            },
        };
        found.push((name, self.time(prog, &case, samples)?));
        Ok(found)
    }

    /// The cases on flows that exist: established (hit and DNAT), VXLAN encapsulation of an
    /// established flow to n2, decapsulation of a flow n2 balanced to this node, reverse NAT of
    /// a reply. Each cycles over [`FLOWS_CYCLED`] flows it first creates.
    fn established_cases(&self, samples: usize) -> Result<Vec<(&'static str, f64)>> {
        let prog = self.program()?;
        let mut found = Vec::new();

        let requests = self.established_flows(WEB_PORT)?;
        let case = Case {
            name: names::ESTABLISHED,
            frame: &|i| requests[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::ForwardTx),
            check: &check_dnat_to_local_backend,
        };
        found.push((names::ESTABLISHED, self.time(prog, &case, samples)?));

        // The replies of those flows: backend `i % LOCAL_BACKENDS` is the one round-robin gave
        // flow `i` only if the cursor started at 0, so read each flow's backend back instead.
        let replies = (0..FLOWS_CYCLED)
            .map(|i| {
                let client = flow_client(i);
                let key = tcp_key(client, (NODE_IP, WEB_PORT));
                let flow = self
                    .maps
                    .flows
                    .get(&key, 0)
                    .context("primed flow missing")?;
                let backend = (
                    flow.backend_ip_be.to_ne_bytes(),
                    u16::from_be(flow.backend_port_be),
                );
                Ok(tcp(
                    (backend_mac_of(backend.0), NODE_MAC),
                    backend,
                    client,
                    64,
                    "PA",
                    REPLY,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let name = REVERSE_NAT;
        let case = Case {
            name,
            frame: &|i| replies[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::ReplyTx),
            check: &check_reverse_nat,
        };
        found.push((name, self.time(prog, &case, samples)?));

        // The same over IPv6: established packets, and the replies of those flows.
        let requests6 = self.established_flows6()?;
        let case = Case {
            name: ESTABLISHED6,
            frame: &|i| requests6[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::ForwardTx),
            check: &check_dnat6,
        };
        found.push((ESTABLISHED6, self.time(prog, &case, samples)?));
        let replies6 = (0..FLOWS_CYCLED)
            .map(|i| {
                let client = (CLIENT_IP6, 10_000 + i as u16);
                let key = lb_common::FlowKey6::new(
                    client.0,
                    NODE_IP6,
                    client.1.to_be(),
                    WEB6_PORT.to_be(),
                    lb_common::PROTO_TCP,
                );
                let flow = self
                    .maps
                    .flows6
                    .get(&key, 0)
                    .context("primed IPv6 flow missing")?;
                let backend = flow.backend_ip;
                Ok(tcp6(
                    (backend_mac(backend[15] - 0x10), NODE_MAC),
                    (backend, BACKEND_PORT),
                    client,
                    "PA",
                    REPLY,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let case = Case {
            name: REVERSE_NAT6,
            frame: &|i| replies6[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::ReplyTx),
            check: &|input: &[u8], out: &[u8]| {
                ensure!(
                    out[14 + 8..14 + 24] == NODE_IP6,
                    "reply source not the service's"
                );
                ensure!(
                    out[54..56] == WEB6_PORT.to_be_bytes(),
                    "reply port not the service's"
                );
                ensure!(
                    out[14 + 24..14 + 40] == input[14 + 24..14 + 40],
                    "not to the client"
                );
                ensure!(out[0..6] == CLIENT_MAC, "not to the client's MAC");
                Ok(())
            },
        };
        found.push((REVERSE_NAT6, self.time(prog, &case, samples)?));

        let mesh_requests = self.established_flows(MESH_PORT)?;
        let name = "VXLAN encapsulation";
        let case = Case {
            name,
            frame: &|i| mesh_requests[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::ForwardEncapTx),
            check: &|input, out| {
                ensure!(
                    out.len() == input.len() + VXLAN_OVERHEAD as usize,
                    "not encapsulated"
                );
                ensure!(out[30..34] == N2_IP, "outer destination is not n2");
                ensure!(
                    u16::from_be_bytes([out[36], out[37]]) == DEFAULT_VXLAN_PORT,
                    "not to the VXLAN port"
                );
                Ok(())
            },
        };
        found.push((name, self.time(prog, &case, samples)?));

        // n2 balanced these flows to a task of this node and sends them over VXLAN.
        let decap: Vec<_> = (0..FLOWS_CYCLED)
            .map(|i| {
                let backend = local_backend((i % usize::from(LOCAL_BACKENDS)) as u8);
                let inner = tcp(
                    (N2_MAC, NODE_MAC),
                    flow_client(i),
                    (backend, BACKEND_PORT),
                    63,
                    "PA",
                    REQUEST,
                );
                vxlan_from_n2(&inner)
            })
            .collect();
        let name = "VXLAN decapsulation";
        let case = Case {
            name,
            frame: &|i| decap[i % FLOWS_CYCLED].clone(),
            action: XDP_TX,
            reason: Some(Reason::DecapTx),
            check: &|input, out| {
                ensure!(
                    out.len() + VXLAN_OVERHEAD as usize == input.len(),
                    "not decapsulated"
                );
                let (_, dst) = addresses(out)?;
                ensure!(dst.0[..3] == [10, 0, 0], "inner packet not to a local task");
                Ok(())
            },
        };
        found.push((name, self.time(prog, &case, samples)?));
        Ok(found)
    }

    /// The flow table filled to `size` entries (and the reverse table alike), then the cost of
    /// an established flow's packet and of a reply's reverse NAT, each packet of a flow drawn
    /// from the whole table (so that at 1M flows the table is as cold as 1M live connections
    /// make it), then of new flows added to a table of that size.
    fn table_size_cases(
        &mut self,
        size: usize,
        label: &str,
        samples: usize,
    ) -> Result<Vec<Measurement>> {
        let web_backend = self.fill_tables(size)?;
        let entries = self.maps.flows.keys().count();
        ensure!(
            entries >= size,
            "flow table holds {entries} entries after filling {size}"
        );
        let variant = format!("{label} flows");
        let prog = self.program()?;
        // A stride through the fillers: consecutive samples land far apart in memory (entries
        // are allocated in insertion order).
        let filler = |i: usize| i.wrapping_mul(2_654_435_761) % size;
        let mut found = Vec::new();
        let mut record = |case: &str, ns: f64| {
            found.push(Measurement::new(
                names::PACKET_FLOWS,
                case,
                &variant,
                ns,
                names::NS_PER_PACKET,
            ));
        };

        // The same table, two working sets: FLOWS_CYCLED flows spread over it (what Katran's
        // method sees: how the lookup itself grows with the table) and every flow of it (what
        // a table of that many live connections costs, cache and TLB misses included).
        let spread = (size / FLOWS_CYCLED).max(1);
        let hot = |i: usize| {
            client_tcp(
                filler_client((i % FLOWS_CYCLED) * spread % size),
                WEB_PORT,
                "PA",
                REQUEST,
            )
        };
        let every = |i: usize| client_tcp(filler_client(filler(i)), WEB_PORT, "PA", REQUEST);
        let before = self.maps.event_totals()?;
        for (name, frame) in [
            (
                names::ESTABLISHED_FEW_ACTIVE,
                &hot as &dyn Fn(usize) -> Vec<u8>,
            ),
            (names::ESTABLISHED_ALL_ACTIVE, &every),
        ] {
            let case = Case {
                name,
                frame,
                action: XDP_TX,
                reason: Some(Reason::ForwardTx),
                check: &check_dnat_to_local_backend,
            };
            record(name, self.time(prog, &case, samples)?);
        }
        ensure!(
            self.maps.event_totals()? == before,
            "established packets created or changed flows: the table lost entries"
        );

        let reply = |i: usize| {
            tcp(
                (backend_mac(0), NODE_MAC),
                (web_backend, BACKEND_PORT),
                filler_client(filler(i)),
                64,
                "PA",
                REPLY,
            )
        };
        let name = REVERSE_NAT_ALL_ACTIVE;
        let case = Case {
            name,
            frame: &reply,
            action: XDP_TX,
            reason: Some(Reason::ReplyTx),
            check: &check_reverse_nat,
        };
        record(name, self.time(prog, &case, samples)?);

        let new_flow = |i: usize| client_tcp(new_flow_client(i), WEB_PORT, "S", b"");
        let case = Case {
            name: names::NEW_FLOW,
            frame: &new_flow,
            action: XDP_TX,
            reason: Some(Reason::ForwardTx),
            check: &check_dnat_to_local_backend,
        };
        record(names::NEW_FLOW, self.time(prog, &case, samples)?);
        Ok(found)
    }

    /// Inserts `size` flows of other clients (100.64.0.0/10) to `web`'s first backend into the
    /// flow and reverse tables, as the data plane would have created them. Returns that
    /// backend's address.
    fn fill_tables(&mut self, size: usize) -> Result<[u8; 4]> {
        let backend = self
            .table
            .service("web")
            .context("no web service")?
            .backends
            .first()
            .context("web has no backend")?
            .clone();
        let std::net::SocketAddr::V4(addr) = backend.addr else {
            bail!("web's backend {backend} is not IPv4");
        };
        let (backend_ip, backend_port) = (addr.ip().octets(), addr.port());
        for i in 0..size {
            let client = filler_client(i);
            let key = tcp_key(client, (NODE_IP, WEB_PORT));
            let flow = FlowValue {
                backend_id: backend.id,
                backend_ip_be: u32::from_ne_bytes(backend_ip),
                node_ip_be: 0,
                backend_port_be: backend_port.to_be(),
                flags: 0,
                _pad: 0,
                last_seen_ns: 0,
            };
            self.maps.flows.insert(key, flow, 0)?;
            let reply_key = tcp_key((backend_ip, backend_port), client);
            let reverse = ReverseValue {
                orig_ip_be: u32::from_ne_bytes(NODE_IP),
                orig_port_be: WEB_PORT.to_be(),
                backend_id: backend.id,
                ..ReverseValue::default()
            };
            self.maps.reverse_flows.insert(reply_key, reverse, 0)?;
        }
        Ok(backend_ip)
    }
}

/// Keeps the calling thread on one CPU (the last this process may run on), so that the
/// per-packet times are one core's and no run migrates.
fn pin_to_one_cpu() -> Result<()> {
    lb_tests::cpu::pin(0, lb_tests::cpu::last()?)
}

fn if_index(name: &str) -> Result<u32> {
    let c_name = std::ffi::CString::new(name)?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => bail!("no interface {name}"),
        index => Ok(index),
    }
}

fn median(times: &mut [u32]) -> f64 {
    times.sort_unstable();
    f64::from(times[times.len() / 2])
}

fn local_backend(i: u8) -> [u8; 4] {
    [10, 0, 0, 10 + i]
}

fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, 10 + i]
}

fn backend_mac_of(ip: [u8; 4]) -> [u8; 6] {
    backend_mac(ip[3] - 10)
}

/// The client end of cycled flow `i`: the client's address, ports from 10000.
fn flow_client(i: usize) -> ([u8; 4], u16) {
    (CLIENT_IP, 10_000 + i as u16)
}

/// The client end of the i-th new flow: never one of [`flow_client`]'s, never repeated within
/// a run (198.18.0.0/15, the benchmarking range, and every port from 1024).
fn new_flow_client(i: usize) -> ([u8; 4], u16) {
    let ports = 65_536 - 1024;
    let host = (i / ports) as u32;
    let [_, _, c, d] = host.to_be_bytes();
    ([198, 18 + (c >> 7), c & 0x7f, d], 1024 + (i % ports) as u16)
}

/// The client end of the i-th flow the table is filled with (100.64.0.0/10).
fn filler_client(i: usize) -> ([u8; 4], u16) {
    let host = (i / 50_000) as u32;
    let [_, b, c, d] = host.to_be_bytes();
    ([100, 64 | (b & 0x3f), c, d], 10_000 + (i % 50_000) as u16)
}

/// The client's frame to the node's published port `port`.
fn client_tcp(client: ([u8; 4], u16), port: u16, flags: &str, payload: &[u8]) -> Vec<u8> {
    tcp(
        (CLIENT_MAC, NODE_MAC),
        client,
        (NODE_IP, port),
        64,
        flags,
        payload,
    )
}

/// IPv6 task `i` of this node (fd00:10::10 + i).
fn local_backend6(i: u8) -> [u8; 16] {
    [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10 + i]
}

/// The client end of the i-th new IPv6 flow: addresses of fd00:c000::/34, every port from 1024.
fn new_flow_client6(i: usize) -> ([u8; 16], u16) {
    let ports = 65_536 - 1024;
    let host = (i / ports) as u32;
    let mut ip = [0xfd, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    ip[12..16].copy_from_slice(&host.to_be_bytes());
    (ip, 1024 + (i % ports) as u16)
}

/// An IPv6 TCP frame.
fn tcp6(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 64240);
    let builder = match flags {
        "S" => builder.syn(),
        _ => builder.psh().ack(1),
    };
    let mut frame = Vec::new();
    builder
        .write(&mut frame, payload)
        .expect("writing to a Vec cannot fail");
    frame
}

/// The client's IPv6 frame to the node's `port`.
fn client_tcp6(client: ([u8; 16], u16), port: u16, flags: &str, payload: &[u8]) -> Vec<u8> {
    tcp6(
        (CLIENT_MAC, NODE_MAC),
        client,
        (NODE_IP6, port),
        flags,
        payload,
    )
}

/// The output went to one of the node's IPv6 tasks, port 80, from the client.
fn check_dnat6(input: &[u8], out: &[u8]) -> Result<()> {
    ensure!(out.len() >= 58, "frame of {} bytes", out.len());
    ensure!(
        out[14 + 8..14 + 24] == input[14 + 8..14 + 24],
        "source changed"
    );
    let dst = &out[14 + 24..14 + 40];
    ensure!(
        dst[..15] == local_backend6(0)[..15] && (0x10..0x10 + LOCAL_BACKENDS).contains(&dst[15]),
        "not DNATed to an IPv6 task: {dst:?}"
    );
    ensure!(
        out[56..58] == BACKEND_PORT.to_be_bytes(),
        "not to the backend port"
    );
    ensure!(
        out[0..6] == backend_mac(dst[15] - 0x10),
        "not to the task's MAC"
    );
    Ok(())
}

/// The `mesh` service's backends, on n2.
fn mesh_backends() -> Result<Vec<lb_userspace::table::BackendSpec>> {
    (0..REMOTE_BACKENDS)
        .map(|i| parse_backend_spec(&format!("10.0.1.{}:{BACKEND_PORT}@n2", 10 + i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)
}

/// `inner` in VXLAN over IPv6 from n2 to this node, UDP checksum 0 as lbctl sends it.
fn vxlan6_from_n2(inner: &[u8]) -> Vec<u8> {
    let vni = DEFAULT_VNI.to_be_bytes();
    let mut payload = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    payload.extend_from_slice(inner);
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(N2_MAC, NODE_MAC)
        .ipv6(N2_IP6, NODE_IP6, 64)
        .udp(0xc123, DEFAULT_VXLAN_PORT)
        .write(&mut frame, &payload)
        .expect("writing to a Vec cannot fail");
    frame[60..62].copy_from_slice(&[0, 0]);
    frame
}

/// `inner` in VXLAN from n2 to this node (VNI and port the defaults).
fn vxlan_from_n2(inner: &[u8]) -> Vec<u8> {
    let vni = DEFAULT_VNI.to_be_bytes();
    let mut payload = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    payload.extend_from_slice(inner);
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(N2_MAC, NODE_MAC)
        .ipv4(N2_IP, NODE_IP, 64)
        .udp(0xc123, DEFAULT_VXLAN_PORT)
        .write(&mut frame, &payload)
        .expect("writing to a Vec cannot fail");
    frame
}

/// Source and destination (address, port) of an Ethernet + IPv4 (no options) + TCP/UDP frame.
fn addresses(frame: &[u8]) -> Result<(Endpoint, Endpoint)> {
    ensure!(frame.len() >= 38, "frame of {} bytes", frame.len());
    let field = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Ok((
        (frame[26..30].try_into()?, field(34)),
        (frame[30..34].try_into()?, field(36)),
    ))
}

/// The output went to one of the node's tasks, port 80, from the client, through this link.
fn check_dnat_to_local_backend(input: &[u8], out: &[u8]) -> Result<()> {
    let (src, dst) = addresses(out)?;
    let (client, _) = addresses(input)?;
    ensure!(src == client, "source changed: {src:?}");
    ensure!(
        dst.0[..3] == [10, 0, 0] && (10..10 + LOCAL_BACKENDS).contains(&dst.0[3]),
        "not DNATed to a task: {dst:?}"
    );
    ensure!(dst.1 == BACKEND_PORT, "not to the backend port");
    ensure!(out[0..6] == backend_mac_of(dst.0), "not to the task's MAC");
    Ok(())
}

/// The output is the reply as the client expects it: from the service's address and port, to
/// the client.
fn check_reverse_nat(input: &[u8], out: &[u8]) -> Result<()> {
    let (src, dst) = addresses(out)?;
    ensure!(
        src == (NODE_IP, WEB_PORT),
        "reply source {src:?} is not the service's"
    );
    ensure!(dst == addresses(input)?.1, "reply not to the client");
    ensure!(out[0..6] == CLIENT_MAC, "not to the client's MAC");
    Ok(())
}
