//! End to end through the namespace topology (client — node — backends): lbctl's XDP path
//! against the kernel path a user would otherwise take, nftables DNAT with `numgen inc`
//! round-robin (kube-proxy's nftables mode; this kernel has no IPVS).
//!
//! Both paths publish the same ports on the node's uplink address in one topology, with the
//! same client, the same backends and the same load, and take turns: a round runs every load
//! in one mode, then in the other, and the next round swaps the order (A B B A) so that a
//! drift of the machine during the run weighs on both alike. Only one path is in place at a
//! time: lbctl is detached (it keeps its services and flows) while the nftables table is
//! loaded, and the table is deleted while lbctl is attached, so neither mode pays for the
//! other's hooks (a NAT table in a namespace turns conntrack on for all its traffic).
//!
//! Before measuring, each mode proves it is the path under test: new connections and UDP
//! requests spread evenly over all backends, the backends see the client's own address, and
//! the path's own flow counter (lbctl's per-backend `new_flows`, a named nftables counter in
//! the DNAT rule) moved. Every measured run checks its replies and its counter again.
//!
//! The whole load (client threads, backend servers, and so the node's path, which the kernel
//! runs in the senders' context on veths) is pinned to one CPU. Unpinned, the rates of a run
//! depended on where the scheduler happened to put the threads (keep-alive requests/s varied
//! 2x from run to run). Worse, with XDP attached a veth receives through NAPI, which runs on
//! whichever CPU scheduled it, so consecutive packets of one connection could be forwarded by
//! both CPUs at once: unpinned lbctl runs, and only those, showed duplicate ACKs in tcpdump
//! and now and then a reset in the handshake that failed the run (a NIC with RSS keeps a flow
//! on one queue and has no such problem). On one CPU both go away, the CPU time per request is
//! that CPU's busy time, and the other CPU is left to the bench itself. The data plane's own
//! share of that time is measured apart, in lbctl mode, with the kernel's BPF run-time
//! statistics.
mod load;

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aya::programs::ProgramInfo;
use lb_tests::Lbctl;
use lb_tests::client::{self, Reply, per_backend, udp_request};
use lb_tests::netns::NetNs;
use lb_tests::topology::{NODE_UPLINK, SingleNode, SingleNodeSpec};

use crate::Options;
use crate::report::{Measurement, names};
use load::{Kind, Tally, Target};

/// TCP port both paths publish (on the node's uplink address).
const TCP_PORT: u16 = 8080;
/// UDP port both paths publish.
const UDP_PORT: u16 = 5300;
/// Rounds of the full run; the smoke run does one.
const ROUNDS: usize = 2;
/// Requests of each protocol a mode's check sends, per backend.
const CHECK_PER_BACKEND: usize = 4;
/// The nftables table the bench loads into the node namespace.
const NFT_TABLE: &str = "lbbench";
/// Client threads (connections, or UDP request loops) of the loads: enough to keep the load's
/// CPU busy while one waits, few enough not to queue; the same in both modes.
const THREADS: usize = 4;

/// Which path balances the published ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Lbctl,
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Lbctl => names::LBCTL,
            Mode::Nftables => names::NFTABLES,
        }
    }
}

/// A number the section reports, with its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Case {
    name: &'static str,
    unit: &'static str,
}

const US: &str = "us";

const fn case(name: &'static str, unit: &'static str) -> Case {
    Case { name, unit }
}

const NEW_CONNECTIONS: Case = case(names::NEW_CONNECTIONS, names::PER_SECOND);
const KEPT_ALIVE: Case = case("requests, kept alive", names::PER_SECOND);
const LATENCY_P50: Case = case("latency p50 (one kept-alive connection)", US);
const LATENCY_P99: Case = case("latency p99 (one kept-alive connection)", US);
const UDP_PACKETS: Case = case("UDP packets (requests + replies)", names::PER_SECOND);
const CPU_NEW_CONNECTION: Case = case("CPU per new connection (client+node+backends)", US);
const CPU_KEPT_ALIVE: Case = case("CPU per kept-alive request (client+node+backends)", US);
const DATA_PLANE_NEW_CONNECTION: Case = case("XDP+TC run time per new connection", US);
const DATA_PLANE_SHARE: Case = case("XDP+TC share of the CPU per new connection", "%");
const XDP_PER_PACKET: Case = case("XDP run time per packet", "ns");
const TC_PER_PACKET: Case = case("TC egress run time per packet", "ns");

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let rounds = if opts.smoke { 1 } else { ROUNDS };
    let seconds = Duration::from_secs_f64(opts.seconds);
    // A short warm-up before each measured run (caches, flow tables, server threads), not
    // counted.
    let warm_up = seconds / 6;
    let threads = THREADS;

    let mut bench = Bench::build()?;
    println!(
        "e2e: {} backends, {threads} client threads, all on CPU {}, {:.1}s per run, \
         {rounds} round(s); load average before: {}",
        bench.topo.backend_count(),
        bench.cpu,
        opts.seconds,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut samples = Samples::default();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Lbctl, Mode::Nftables]
        } else {
            [Mode::Nftables, Mode::Lbctl]
        };
        for mode in order {
            bench.enter(mode)?;
            bench
                .check_path(mode)
                .with_context(|| format!("{} does not balance the ports", mode.name()))?;
            bench
                .measure(mode, threads, warm_up, seconds, &mut samples)
                .with_context(|| format!("measuring {} (round {})", mode.name(), round + 1))?;
        }
    }
    bench.enter(Mode::Lbctl)?;
    bench
        .data_plane_time(threads, seconds, &mut samples)
        .context("measuring lbctl's own run time")?;
    Ok(samples.medians())
}

/// The topology with both paths ready to take turns.
struct Bench {
    /// Declared before the topology so that it drops (purges) while the node namespace exists.
    lbctl: Lbctl,
    topo: SingleNode,
    mode: Mode,
    nft_ruleset: String,
    /// The CPU the whole load runs on.
    cpu: usize,
}

impl Bench {
    /// Builds the topology, attaches lbctl and publishes both ports over all backends.
    fn build() -> Result<Bench> {
        let topo = SingleNode::build(SingleNodeSpec::default())?;
        let lbctl = Lbctl::new(topo.node())?;
        // Tens of thousands of connections a run: give the client all the ports (the server
        // closes first, so they come back at once; see load.rs).
        topo.client()
            .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        lbctl.run(&["attach", NODE_UPLINK])?;
        for (name, proto, port, addr) in [
            (
                "web",
                "tcp",
                TCP_PORT,
                SingleNode::backend_addr as fn(&_, _) -> _,
            ),
            ("echo", "udp", UDP_PORT, SingleNode::backend_udp_addr),
        ] {
            let backends: Vec<String> = (0..topo.backend_count())
                .map(|i| addr(&topo, i).to_string())
                .collect();
            let port = port.to_string();
            let mut args = vec!["service", "add", name, &port, "--proto", proto];
            args.extend(backends.iter().map(String::as_str));
            lbctl.run(&args)?;
        }
        let nft_ruleset = nft_ruleset(&topo);
        let cpu = load::last_cpu()?;
        for i in 0..topo.backend_count() {
            pin_namespace(topo.backend_ns(i), cpu)?;
        }
        Ok(Bench {
            lbctl,
            topo,
            mode: Mode::Lbctl,
            nft_ruleset,
            cpu,
        })
    }

    /// Puts `mode`'s path in place and takes the other one away.
    fn enter(&mut self, mode: Mode) -> Result<()> {
        if self.mode == mode {
            return Ok(());
        }
        let node = self.topo.node();
        match mode {
            Mode::Lbctl => {
                run_in(node, &["nft", "delete", "table", "ip", NFT_TABLE])?;
                self.lbctl.run(&["attach", NODE_UPLINK])?;
            }
            Mode::Nftables => {
                self.lbctl.run(&["detach", NODE_UPLINK])?;
                run_in(node, &["nft", &self.nft_ruleset])?;
            }
        }
        self.mode = mode;
        Ok(())
    }

    /// Sends a few new connections and UDP requests one by one and checks that `mode`'s path,
    /// and only it, balanced them: each backend got the same share, saw the client's address,
    /// and the path's flow counters moved.
    fn check_path(&self, mode: Mode) -> Result<()> {
        let n = CHECK_PER_BACKEND * self.topo.backend_count();
        let (tcp, udp) = (self.tcp_addr(), self.udp_addr());
        let uplink_has_xdp = self.uplink_xdp()?.is_some();
        ensure!(
            uplink_has_xdp == (mode == Mode::Lbctl),
            "in {} mode, XDP on {NODE_UPLINK} is {}",
            mode.name(),
            if uplink_has_xdp {
                "attached"
            } else {
                "missing"
            }
        );
        let conntrack_before = self.conntrack_entries()?;
        let before = self.flow_counters(mode)?;
        let (tcp_replies, udp_replies) = self.topo.client().in_netns(|| -> Result<_> {
            load::pin(0, self.cpu)?;
            let tcp = client::new_connections(tcp, n)?;
            let udp = (0..n)
                .map(|i| udp_request(udp).with_context(|| format!("UDP request {i} to {udp}")))
                .collect::<Result<Vec<_>>>()?;
            Ok((tcp, udp))
        })?;
        self.check_spread(&tcp_replies, "TCP", true)?;
        // A UDP flow has no end the path could see: a fresh socket that gets the port of one
        // an earlier run used rides that flow's backend (both paths keep UDP flows for a
        // while), so the share can be off by such a flow.
        self.check_spread(&udp_replies, "UDP", false)?;
        let after = self.flow_counters(mode)?;
        check_counted(mode, before, after, (n as u64, n as u64))?;
        if mode == Mode::Lbctl {
            // With the NAT table gone conntrack must be off in the node: lbctl mode must not
            // pay for nftables' machinery.
            let conntrack_after = self.conntrack_entries()?;
            let tracked: Vec<&String> = conntrack_after.difference(&conntrack_before).collect();
            ensure!(
                tracked.is_empty(),
                "conntrack still tracks connections in lbctl mode: {} new entries, such as {:?}",
                tracked.len(),
                tracked.first()
            );
        }
        println!(
            "  {:<8} balances: TCP {:?}, UDP {:?}",
            mode.name(),
            per_backend(&tcp_replies),
            per_backend(&udp_replies)
        );
        Ok(())
    }

    /// Every backend answered some of `replies` (`exact`: the same number, as round-robin
    /// over new flows does), and saw the client's own address.
    fn check_spread(&self, replies: &[Reply], what: &str, exact: bool) -> Result<()> {
        let counts = per_backend(replies);
        let per = replies.len() / self.topo.backend_count();
        let spread = (0..self.topo.backend_count()).all(|i| {
            let n = counts.get(&self.topo.backend_name(i)).copied().unwrap_or(0);
            if exact { n == per } else { n > 0 }
        });
        ensure!(
            spread,
            "{what} requests are not spread round-robin: {counts:?}"
        );
        if let Some(reply) = replies
            .iter()
            .find(|r| *r.client_seen.ip() != self.topo.client_ip())
        {
            bail!(
                "a backend saw the client as {}: {reply:?}",
                reply.client_seen
            );
        }
        Ok(())
    }

    /// Runs every load in `mode` and records what it measured.
    fn measure(
        &self,
        mode: Mode,
        threads: usize,
        warm_up: Duration,
        seconds: Duration,
        samples: &mut Samples,
    ) -> Result<()> {
        // Each load and its threads: kept alive, many threads for the rate and one for the
        // latency of the path itself rather than of a queue.
        let loads = [
            (Kind::NewConnections, threads),
            (Kind::KeptAlive, threads),
            (Kind::KeptAlive, 1),
            (Kind::Udp, threads),
        ];
        for (kind, threads) in loads {
            self.load(kind, threads, warm_up)?;
            let before = self.flow_counters(mode)?;
            let tally = self.load(kind, threads, seconds)?;
            let after = self.flow_counters(mode)?;
            let opened = flows_opened(kind, threads, self.topo.backend_count(), &tally);
            check_counted(mode, before, after, opened)?;
            if threads >= self.topo.backend_count() {
                ensure!(
                    tally.per_backend.iter().all(|&n| n > 0),
                    "{kind:?}: not every backend answered: {:?}",
                    tally.per_backend
                );
            }
            let rate = tally.done as f64 / tally.elapsed.as_secs_f64();
            let cpu_per_op = tally.busy.as_secs_f64() * 1e6 / tally.done.max(1) as f64;
            let mut record = |case: Case, value: f64| samples.add(case, mode, value);
            match (kind, threads) {
                (Kind::NewConnections, _) => {
                    record(NEW_CONNECTIONS, rate);
                    record(CPU_NEW_CONNECTION, cpu_per_op);
                }
                (Kind::KeptAlive, 1) => {
                    let mut latencies = tally.latencies_ns.clone();
                    record(LATENCY_P50, percentile(&mut latencies, 0.50) / 1e3);
                    record(LATENCY_P99, percentile(&mut latencies, 0.99) / 1e3);
                }
                (Kind::KeptAlive, _) => {
                    record(KEPT_ALIVE, rate);
                    record(CPU_KEPT_ALIVE, cpu_per_op);
                }
                // Each reply is a request and a reply through the node.
                (Kind::Udp, _) => record(UDP_PACKETS, 2.0 * rate),
            }
            println!(
                "  {:<8} {kind:?} x{threads}: {:>8.0}/s, CPU {} busy {:>3.0}%, per backend {:?}",
                mode.name(),
                rate,
                self.cpu,
                100.0 * tally.busy.as_secs_f64() / tally.elapsed.as_secs_f64(),
                tally.per_backend
            );
        }
        Ok(())
    }

    /// Runs `threads` threads of `kind` load for `duration` from the client namespace.
    fn load(&self, kind: Kind, threads: usize, duration: Duration) -> Result<Tally> {
        let target = Target {
            addr: match kind {
                Kind::Udp => self.udp_addr(),
                _ => self.tcp_addr(),
            },
            client_ip: self.topo.client_ip(),
            backends: self.topo.backend_count(),
        };
        self.topo
            .client()
            .in_netns(|| load::run(kind, target, threads, duration, self.cpu))
            .with_context(|| format!("{kind:?} load on {}", target.addr))
    }

    /// lbctl's own cost: the run time of its XDP and TC programs while new connections run,
    /// against the whole machine's CPU time. Measured apart from the comparison because the
    /// kernel's BPF statistics add two clock reads to every program run, which nftables would
    /// not pay; they are on only while the returned descriptor is open (BPF_ENABLE_STATS),
    /// so nothing is left switched on if the bench dies.
    fn data_plane_time(
        &self,
        threads: usize,
        seconds: Duration,
        samples: &mut Samples,
    ) -> Result<()> {
        let programs = self.data_plane_programs()?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("cannot turn on BPF run-time statistics")?;
        let before = programs.run_times()?;
        let tally = self.load(Kind::NewConnections, threads, seconds)?;
        let after = programs.run_times()?;
        drop(stats);
        let (xdp_ns, xdp_runs) = (after.0.0 - before.0.0, after.0.1 - before.0.1);
        let (tc_ns, tc_runs) = (after.1.0 - before.1.0, after.1.1 - before.1.1);
        ensure!(
            xdp_runs >= tally.done && tc_runs >= tally.done,
            "lbctl's programs ran {xdp_runs} (XDP) and {tc_runs} (TC) times for {} connections",
            tally.done
        );
        let per_connection_us = (xdp_ns + tc_ns) as f64 / 1e3 / tally.done.max(1) as f64;
        let load_cpu_us = tally.busy.as_secs_f64() * 1e6 / tally.done.max(1) as f64;
        samples.add(DATA_PLANE_NEW_CONNECTION, Mode::Lbctl, per_connection_us);
        samples.add(
            DATA_PLANE_SHARE,
            Mode::Lbctl,
            100.0 * per_connection_us / load_cpu_us,
        );
        samples.add(
            XDP_PER_PACKET,
            Mode::Lbctl,
            xdp_ns as f64 / xdp_runs.max(1) as f64,
        );
        samples.add(
            TC_PER_PACKET,
            Mode::Lbctl,
            tc_ns as f64 / tc_runs.max(1) as f64,
        );
        println!(
            "  lbctl    data plane per new connection: {per_connection_us:.2}us of \
             {load_cpu_us:.1}us of CPU {} ({:.1} XDP + {:.1} TC runs)",
            self.cpu,
            xdp_runs as f64 / tally.done.max(1) as f64,
            tc_runs as f64 / tally.done.max(1) as f64
        );
        Ok(())
    }

    /// The XDP and TC egress programs lbctl attached to the uplink. The XDP one is the
    /// uplink's (`ip link`); Debian 12's bpftool does not list TCX programs, so the TC one is
    /// the `lb_tc_egress` program that shares the XDP program's (pinned, per instance) maps.
    fn data_plane_programs(&self) -> Result<Programs> {
        let xdp = self
            .uplink_xdp()?
            .with_context(|| format!("no XDP program on {NODE_UPLINK}"))?;
        let maps = program(xdp)?.map_ids()?.unwrap_or_default();
        let tc = loaded_programs()
            .filter(|p| {
                p.name_as_str() == Some("lb_tc_egress")
                    && p.map_ids()
                        .ok()
                        .flatten()
                        .is_some_and(|ids| ids.iter().any(|id| maps.contains(id)))
            })
            // A program detached a moment ago may still be listed: take the newest.
            .map(|p| p.id())
            .max()
            .context("no lb_tc_egress program shares the maps of the uplink's XDP program")?;
        Ok(Programs { xdp, tc })
    }

    /// The published TCP service.
    fn tcp_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.node_uplink_ip(), TCP_PORT)
    }

    /// The published UDP service.
    fn udp_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.node_uplink_ip(), UDP_PORT)
    }

    /// The id of the XDP program attached to the node's uplink, if any.
    fn uplink_xdp(&self) -> Result<Option<u32>> {
        let text = self
            .topo
            .node()
            .ip(["-j", "link", "show", "dev", NODE_UPLINK])?;
        let doc: serde_json::Value = serde_json::from_str(&text)?;
        match doc[0].get("xdp") {
            None => Ok(None),
            Some(xdp) => xdp["prog"]["id"]
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(Some)
                .with_context(|| format!("XDP on {NODE_UPLINK} without a program id: {text}")),
        }
    }

    /// The connections conntrack tracks in the node namespace, each as its protocol and
    /// original tuple (none while its module is not loaded): an entry the lbctl round adds
    /// means conntrack saw its traffic.
    fn conntrack_entries(&self) -> Result<std::collections::BTreeSet<String>> {
        let path = "/proc/net/nf_conntrack";
        // Read through `ip netns exec`, which mounts the namespace's own /proc/net view.
        let out = self.topo.node().exec(["cat", path])?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("No such file") {
                return Ok(std::collections::BTreeSet::new());
            }
            anyhow::bail!("cat {path}: {err}");
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let proto = fields.get(2).copied().unwrap_or_default();
                let tuple: Vec<&str> = fields
                    .iter()
                    .copied()
                    .filter(|f| {
                        ["src=", "dst=", "sport=", "dport="]
                            .iter()
                            .any(|k| f.starts_with(k))
                    })
                    .take(4)
                    .collect();
                format!("{proto} {}", tuple.join(" "))
            })
            .collect())
    }

    /// New flows `mode`'s path has balanced so far, (TCP, UDP): lbctl's per-backend
    /// `new_flows` of each service, or the packets of the counters in the DNAT rules (a NAT
    /// chain sees the first packet of each connection only).
    fn flow_counters(&self, mode: Mode) -> Result<(u64, u64)> {
        match mode {
            Mode::Lbctl => {
                let stats: serde_json::Value =
                    serde_json::from_str(&self.lbctl.run(&["stats", "--json"])?)?;
                let new_flows = |name: &str| -> Result<u64> {
                    let service = stats["services"]
                        .as_array()
                        .and_then(|s| s.iter().find(|s| s["name"] == name))
                        .with_context(|| format!("no service {name} in lbctl stats"))?;
                    service["backends"]
                        .as_array()
                        .context("lbctl stats: no backends")?
                        .iter()
                        .map(|b| b["new_flows"].as_u64().context("lbctl stats: no new_flows"))
                        .sum()
                };
                Ok((new_flows("web")?, new_flows("echo")?))
            }
            Mode::Nftables => {
                let packets = |counter: &str| -> Result<u64> {
                    let text = run_in(
                        self.topo.node(),
                        &["nft", "-j", "list", "counter", "ip", NFT_TABLE, counter],
                    )?;
                    let doc: serde_json::Value = serde_json::from_str(&text)?;
                    doc["nftables"]
                        .as_array()
                        .and_then(|items| {
                            items.iter().find_map(|i| i["counter"]["packets"].as_u64())
                        })
                        .with_context(|| format!("no counter {counter} in {text}"))
                };
                Ok((packets("tcp_flows")?, packets("udp_flows")?))
            }
        }
    }
}

/// The nftables equivalent of the two services: DNAT in prerouting with `numgen inc`
/// round-robin, as kube-proxy's nftables mode does (it draws `numgen random mod N` into a
/// verdict map of per-endpoint chains that DNAT; one rule with a map of addresses is the
/// cheaper form of the same). No masquerade: the backends route back through the node, whose
/// conntrack un-NATs the replies, so they see the client's address as with lbctl. The named
/// counters count each new flow once (a NAT chain sees only a connection's first packet), so
/// they cost nothing per packet and prove the rules did the balancing.
fn nft_ruleset(topo: &SingleNode) -> String {
    let map = |addr: fn(&SingleNode, usize) -> SocketAddrV4| {
        (0..topo.backend_count())
            .map(|i| {
                let a = addr(topo, i);
                format!("{i} : {} . {}", a.ip(), a.port())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let n = topo.backend_count();
    let vip = topo.node_uplink_ip();
    format!(
        "table ip {NFT_TABLE} {{
            counter tcp_flows {{ }}
            counter udp_flows {{ }}
            chain prerouting {{
                type nat hook prerouting priority dstnat; policy accept;
                ip daddr {vip} tcp dport {TCP_PORT} counter name \"tcp_flows\" \
                    dnat to numgen inc mod {n} map {{ {} }}
                ip daddr {vip} udp dport {UDP_PORT} counter name \"udp_flows\" \
                    dnat to numgen inc mod {n} map {{ {} }}
            }}
        }}",
        map(SingleNode::backend_addr),
        map(SingleNode::backend_udp_addr)
    )
}

/// The path's flow counters moved by at least half the flows the client opened, per
/// protocol. Half, not all: a client port reused within a flow's lifetime in the path's table
/// rides the old entry without counting a new flow, and the point is to catch traffic that
/// went by another path (which moves them by nothing).
fn check_counted(
    mode: Mode,
    before: (u64, u64),
    after: (u64, u64),
    opened: (u64, u64),
) -> Result<()> {
    for (proto, before, after, opened) in [
        ("TCP", before.0, after.0, opened.0),
        ("UDP", before.1, after.1, opened.1),
    ] {
        let counted = after.saturating_sub(before);
        ensure!(
            counted >= opened.div_ceil(2),
            "{}'s {proto} flow counter moved by {counted} for {opened} new flows: the traffic \
             did not take its path",
            mode.name()
        );
    }
    Ok(())
}

/// The new flows a load opened at least, (TCP, UDP): one per connection, or per UDP socket.
fn flows_opened(kind: Kind, threads: usize, backends: usize, tally: &Tally) -> (u64, u64) {
    match kind {
        Kind::NewConnections => (tally.done, 0),
        Kind::KeptAlive => (threads as u64, 0),
        Kind::Udp => (0, (threads * backends) as u64),
    }
}

/// The XDP and TC program ids of the data plane.
struct Programs {
    xdp: u32,
    tc: u32,
}

/// (run time in ns, run count) of a program.
type RunTime = (u64, u64);

impl Programs {
    /// The run times of both programs so far (counted only while statistics are on).
    fn run_times(&self) -> Result<(RunTime, RunTime)> {
        let one = |id| -> Result<RunTime> {
            let info = program(id)?;
            Ok((info.run_time().as_nanos() as u64, info.run_count()))
        };
        Ok((one(self.xdp)?, one(self.tc)?))
    }
}

/// The BPF programs loaded on the machine (those that cannot be read are skipped).
fn loaded_programs() -> impl Iterator<Item = ProgramInfo> {
    aya::programs::loaded_programs().filter_map(Result::ok)
}

/// The loaded BPF program `id`.
fn program(id: u32) -> Result<ProgramInfo> {
    loaded_programs()
        .find(|p| p.id() == id)
        .with_context(|| format!("no BPF program {id} is loaded"))
}

/// The samples of every case and mode, over the rounds.
#[derive(Default)]
struct Samples(BTreeMap<(Case, Mode), Vec<f64>>, Vec<Case>);

impl Samples {
    fn add(&mut self, case: Case, mode: Mode, value: f64) {
        if !self.1.contains(&case) {
            self.1.push(case);
        }
        self.0.entry((case, mode)).or_default().push(value);
    }

    /// The median over the rounds of each case and mode, cases in the order they were first
    /// measured, lbctl before nftables.
    fn medians(mut self) -> Vec<Measurement> {
        let mut out = Vec::new();
        for case in &self.1 {
            for mode in [Mode::Lbctl, Mode::Nftables] {
                if let Some(values) = self.0.get_mut(&(*case, mode)) {
                    values.sort_by(f64::total_cmp);
                    let mid = values.len() / 2;
                    let median = if values.len() % 2 == 0 {
                        (values[mid - 1] + values[mid]) / 2.0
                    } else {
                        values[mid]
                    };
                    out.push(Measurement::new(
                        names::E2E,
                        case.name,
                        mode.name(),
                        median,
                        case.unit,
                    ));
                }
            }
        }
        out
    }
}

/// The `q` quantile (nearest rank) of `values`, sorting them; 0 if empty.
fn percentile(values: &mut [u64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1] as f64
}

/// Pins every thread of every process in `ns` to CPU `cpu` (the threads they start later
/// inherit it).
fn pin_namespace(ns: &NetNs, cpu: usize) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .context("cannot run `ip netns pids`")?;
    ensure!(
        out.status.success(),
        "`ip netns pids {}` failed: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let pids = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(!pids.trim().is_empty(), "no process runs in {}", ns.name());
    for pid in pids.split_whitespace() {
        let tasks = format!("/proc/{pid}/task");
        for task in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
            let tid = task?.file_name().to_string_lossy().parse()?;
            load::pin(tid, cpu)?;
        }
    }
    Ok(())
}

/// Runs `args` in `ns` (`ip netns exec`) and returns its stdout; fails with its stderr.
fn run_in(ns: &NetNs, args: &[&str]) -> Result<String> {
    let out = ns.exec(args)?;
    if !out.status.success() {
        bail!(
            "`{}` in {} failed ({}): {}",
            args.join(" "),
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
