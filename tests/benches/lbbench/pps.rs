//! Packets per second per core through the node: lbctl's paths against the kernel paths they
//! replace, and against the floor, with one flow and with 64,512 (a source port drawn at
//! random per frame), side by side in one run.
//!
//! The method is the transmit section's: a generator namespace's veth `gen0` faces the node's
//! `uplink`; `BPF_PROG_TEST_RUN` with live frames runs a generator program that writes its
//! frame (and draws the source port) and redirects it into `gen0`, so the frames really reach
//! the node, whose path under test sends each one back out of `uplink` towards `gen0`
//! (DNATed, encapsulated or decapsulated), where an XDP program drops it: counting those drops
//! proves every frame was forwarded. Everything runs in the generator's softirq on one CPU, so
//! the call's time per frame is the pipeline's; the node's work per packet is that less the
//! floor's (the node's XDP only dropping). Paths:
//! - floor, and a bare `XDP_TX` bounce (the least any XDP forwarder can do);
//! - lbctl, a service on the node whose backend is on the uplink's other subnet (`XDP_TX`);
//! - lbctl as the ingress node of the mesh: DNAT to a task on another node and VXLAN
//!   encapsulation towards it;
//! - lbctl on the task's node, decapsulating a mesh packet for a task it hosts;
//! - the kernel: nftables `numgen inc` DNAT and forwarding (kube-proxy's nftables mode), and
//!   the same DNAT into the kernel's `vxlan` device for a task on another node;
//! - a backend behind a bridge on the node (a container on `docker0`), in its own namespace:
//!   lbctl DNATs in XDP and its TC program sends the packet into the backend's namespace
//!   (`bpf_redirect_peer`, counted `forward_redirect` and `xmit_peer`), against nftables DNAT
//!   and the kernel's forwarding into the bridge. The sink is an nftables counter that drops
//!   what reaches the backend's own interface (its `netdev` ingress hook: a frame sent into a
//!   namespace with `bpf_redirect_peer` is received past the interface's XDP);
//! - the Swarm routing mesh without IPVS (this kernel has none): DNAT to an ingress sandbox
//!   namespace behind a bridge (`docker_gwbridge`), DNAT there to the task and masquerade,
//!   then the sandbox's `vxlan` device (created in the node's namespace, as Docker does). Swarm
//!   has one more bridge between the sandbox and its VXLAN device, and IPVS instead of the
//!   sandbox's nftables DNAT: this path is, if anything, cheaper than Swarm's.
//!
//! For the kernel paths the uplink runs an XDP program that passes every frame (a veth takes
//! redirected frames only when its peer runs XDP); it is part of their node work, a few ns.
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use anyhow::{Context, Result, ensure};
use etherparse::PacketBuilder;
use lb_tests::Lbctl;
use lb_tests::bpf::{self, XDP_DROP, XDP_PASS, XDP_TX};
use lb_tests::netns::{self, NetNs, format_mac};

use crate::Options;
use crate::live::{self, PAYLOAD, on_one_cpu};
use crate::report::Measurement;
use crate::report::names::{self, NODE_WORK, PIPELINE};

const SECTION: &str = names::PPS;
const UPLINK: &str = "uplink";
const GEN: &str = "gen0";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// The other node of the mesh, behind `gen0` like the client.
const PEER_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 3);
const LOCAL_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 1);
/// The backend on the node's other subnet (the local paths, and the decapsulated one).
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 10);
/// The bridge on the node with the backend behind it, in namespace `ppsback` (interface
/// `eth0`, port `vback` on the bridge).
const BRIDGE: &str = "brtasks";
const BRIDGE_ADDR: &str = "10.78.2.1/24";
const BRIDGED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 78, 2, 10);
const BRIDGED_IFACE: &str = "eth0";
/// The task on the other node, in the overlay subnet.
const TASK_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 5);
const TASK_MAC: [u8; 6] = [0x02, 0, 10, 0, 9, 5];
const OVERLAY_NODE_ADDR: &str = "10.0.9.1/24";
const OVERLAY_SANDBOX_ADDR: &str = "10.0.9.2/24";
const GWBRIDGE: &str = "gwbridge";
const GWBRIDGE_ADDR: &str = "172.18.0.1/16";
const SANDBOX_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const BACKEND_PORT: u16 = 53;
const CLIENT_PORT: u16 = 40000;
/// lbctl's mesh VNI (its default) and the kernel devices' own.
const LBCTL_VNI: u32 = 4096;
const NODE_VXLAN: (&str, u32) = ("kvx0", 4097);
const SANDBOX_VXLAN: (&str, u32) = ("svx0", 4098);
const VXLAN_PORT: u16 = 4789;
/// Offsets of the client's source port: in the plain frame, and in the encapsulated one.
const PORT_AT: usize = 14 + 20;
const INNER_PORT_AT: usize = 14 + 20 + 8 + 8 + 14 + 20;
/// Frames per measured call, and per warm-up of a path with many flows (enough to draw every
/// one of the 64,512 source ports: 64,512 × ln 64,512 ≈ 715k); the smoke run sends fewer.
const FRAMES: u32 = 1_000_000;
const WARM_FRAMES: u32 = 1_000_000;
const SMOKE_FRAMES: u32 = 5_000;

/// What the node does with the generator's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Floor,
    Bounce,
    LbctlLocal,
    LbctlEncap,
    LbctlDecap,
    NftLocal,
    NftVxlan,
    SwarmIngress,
    LbctlBridge,
    NftBridge,
}

impl Path {
    const ALL: [Path; 10] = [
        Path::Floor,
        Path::Bounce,
        Path::LbctlLocal,
        Path::LbctlEncap,
        Path::LbctlDecap,
        Path::NftLocal,
        Path::NftVxlan,
        Path::SwarmIngress,
        Path::LbctlBridge,
        Path::NftBridge,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Floor => "node XDP drops (floor)",
            Path::Bounce => "bare XDP_TX bounce",
            Path::LbctlLocal => "lbctl, backend on the node's link",
            Path::LbctlEncap => "lbctl, ingress: DNAT + VXLAN encap",
            Path::LbctlDecap => "lbctl, task's node: VXLAN decap",
            Path::NftLocal => "nftables numgen DNAT + forward",
            Path::NftVxlan => "nftables DNAT + kernel vxlan",
            Path::SwarmIngress => "Swarm mesh: sandbox DNAT+SNAT, vxlan",
            Path::LbctlBridge => "lbctl, backend behind a bridge (peer)",
            Path::NftBridge => "nftables DNAT, backend behind a bridge",
        }
    }

    /// The service port the client's frames go to (each path its own, so that the kernel's
    /// connection tracking entries of one path never serve another); `None` for the
    /// encapsulated frames of the decap path.
    fn port(self) -> Option<u16> {
        match self {
            Path::Floor | Path::Bounce | Path::LbctlLocal => Some(5300),
            Path::LbctlEncap => Some(5310),
            Path::LbctlDecap => None,
            Path::NftLocal => Some(5320),
            Path::NftVxlan => Some(5330),
            Path::SwarmIngress => Some(5340),
            Path::LbctlBridge => Some(5350),
            Path::NftBridge => Some(5360),
        }
    }

    /// The lbctl reason every frame must be counted under.
    fn lbctl_reason(self) -> Option<&'static str> {
        match self {
            Path::LbctlLocal => Some("forward_tx"),
            Path::LbctlEncap => Some("forward_encap_tx"),
            Path::LbctlDecap => Some("decap_tx"),
            Path::LbctlBridge => Some("forward_redirect"),
            _ => None,
        }
    }

    /// Whether many flows mean anything on it (the floor and the bounce keep no state).
    fn has_flows(self) -> bool {
        !matches!(self, Path::Floor | Path::Bounce)
    }

    /// Whether its frames end at the bridged backend's sink rather than the generator's.
    fn bridged(self) -> bool {
        matches!(self, Path::LbctlBridge | Path::NftBridge)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flows {
    One,
    Many,
}

impl Flows {
    fn name(self) -> &'static str {
        match self {
            Flows::One => "1 flow",
            Flows::Many => "64k flows",
        }
    }
}

/// One measured case: a path with one or many flows.
type Case = (Path, Flows);

struct Rig {
    lbctl: Lbctl,
    /// Generators by case, with the length of the frame each writes.
    generators: Vec<(Case, OwnedFd, usize)>,
    _sink: OwnedFd,
    node: NetNs,
    gen_ns: NetNs,
    _sandbox: NetNs,
    backend: NetNs,
}

/// `ethernet / IPv4 src → dst / UDP sport → dport / payload`, its UDP checksum 0 (none).
fn udp_frame(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    (sport, dport): (u16, u16),
    payload: &[u8],
) -> Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .context("building a frame")?;
    out[40..42].fill(0);
    Ok(out)
}

/// The frame the generator writes for `path`: the client's datagram to the path's port, or for
/// the decap path the other node's VXLAN packet carrying it (already DNATed to the local
/// backend, as the ingress node sends it).
fn frame_for(path: Path, gen_mac: [u8; 6], uplink_mac: [u8; 6]) -> Result<Vec<u8>> {
    let macs = (gen_mac, uplink_mac);
    match path.port() {
        Some(port) => udp_frame(
            macs,
            (CLIENT_IP, NODE_IP),
            (CLIENT_PORT, port),
            &[0x5a; PAYLOAD],
        ),
        None => {
            let inner = udp_frame(
                ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
                (CLIENT_IP, LOCAL_BACKEND),
                (CLIENT_PORT, BACKEND_PORT),
                &[0x5a; PAYLOAD + 2],
            )?;
            let mut vxlan = vec![0x08, 0, 0, 0];
            vxlan.extend_from_slice(&(LBCTL_VNI << 8).to_be_bytes());
            vxlan.extend(inner);
            udp_frame(
                macs,
                (PEER_NODE_IP, NODE_IP),
                (CLIENT_PORT + 1, VXLAN_PORT),
                &vxlan,
            )
        }
    }
}

/// Runs `nft -f -` with `rules`, in the calling thread's namespace.
fn nft(rules: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft (cargo xtask setup installs nftables)")?;
    let mut stdin = child.stdin.take().context("nft's stdin")?;
    stdin.write_all(rules.as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Rig {
    fn build() -> Result<Rig> {
        let gen_ns = NetNs::new("ppsgen")?;
        let node = NetNs::new("ppsnode")?;
        let sandbox = NetNs::new("ppssbox")?;
        let backend = NetNs::new("ppsback")?;
        live::quiet(&[&gen_ns, &node, &sandbox, &backend])?;
        netns::veth(&gen_ns, GEN, &node, UPLINK)?;
        for addr in [format!("{NODE_IP}/24"), format!("{LOCAL_GATEWAY}/24")] {
            node.ip(["addr", "add", &addr, "dev", UPLINK])?;
        }
        node.sysctl("net.ipv4.ip_forward", "1")?;
        let gen_mac = gen_ns.mac(GEN)?;
        // The client, the other node and the local backend are all behind gen0: whatever the
        // node sends comes back to the sink.
        live::behind_generator(
            &node,
            UPLINK,
            &[CLIENT_IP, PEER_NODE_IP, LOCAL_BACKEND],
            gen_mac,
        )?;
        Rig::kernel_paths(&node, &sandbox).context("the kernel's paths")?;
        Rig::bridged_backend(&node, &backend).context("the bridged backend")?;
        let sink = gen_ns.attach_xdp_action(GEN, XDP_DROP)?;
        let uplink_mac = node.mac(UPLINK)?;
        let gen_index = gen_ns.in_netns(|| netns::if_index(GEN))?;
        let mut generators = Vec::new();
        for path in Path::ALL {
            let frame = frame_for(path, gen_mac, uplink_mac)?;
            let port_at = if path.port().is_some() {
                PORT_AT
            } else {
                INNER_PORT_AT
            };
            for flows in [Flows::One, Flows::Many] {
                if flows == Flows::Many && !path.has_flows() {
                    continue;
                }
                let vary = (flows == Flows::Many).then_some(port_at);
                let generator =
                    gen_ns.in_netns(|| bpf::load_flows_generator(&frame, gen_index, vary))?;
                generators.push(((path, flows), generator, frame.len()));
            }
        }
        let lbctl = Lbctl::new(&node)?;
        lbctl.run(&["attach", UPLINK, "--flow-capacity", "262144"])?;
        lbctl.run(&["node", "add", "n1", &NODE_IP.to_string()])?;
        lbctl.run(&["node", "add", "n2", &PEER_NODE_IP.to_string()])?;
        for (name, path, backend) in [
            (
                "local",
                Path::LbctlLocal,
                format!("{LOCAL_BACKEND}:{BACKEND_PORT}"),
            ),
            (
                "mesh",
                Path::LbctlEncap,
                format!("{TASK_IP}:{BACKEND_PORT}@n2"),
            ),
            (
                "bridged",
                Path::LbctlBridge,
                format!("{BRIDGED_BACKEND}:{BACKEND_PORT}"),
            ),
        ] {
            let port = path.port().expect("a service port").to_string();
            lbctl.run(&["service", "add", name, &port, &backend, "--proto", "udp"])?;
        }
        lbctl.run(&["detach", UPLINK])?;
        Ok(Rig {
            lbctl,
            generators,
            _sink: sink,
            node,
            gen_ns,
            _sandbox: sandbox,
            backend,
        })
    }

    /// The backend behind a bridge: namespace `backend`'s `eth0`, a veth whose other end is a
    /// port of the node's bridge, its MAC known to the node and to the bridge (as after its
    /// first reply; static entries, so that they do not age out during the run).
    fn bridged_backend(node: &NetNs, backend: &NetNs) -> Result<()> {
        node.ip(["link", "add", BRIDGE, "type", "bridge"])?;
        node.ip(["addr", "add", BRIDGE_ADDR, "dev", BRIDGE])?;
        node.ip(["link", "set", BRIDGE, "up"])?;
        netns::veth(node, "vback", backend, BRIDGED_IFACE)?;
        node.ip(["link", "set", "vback", "master", BRIDGE])?;
        backend.ip([
            "addr",
            "add",
            &format!("{BRIDGED_BACKEND}/24"),
            "dev",
            BRIDGED_IFACE,
        ])?;
        let backend_mac = format_mac(backend.mac(BRIDGED_IFACE)?);
        node.ip([
            "neigh",
            "replace",
            &BRIDGED_BACKEND.to_string(),
            "lladdr",
            &backend_mac,
            "dev",
            BRIDGE,
            "nud",
            "permanent",
        ])?;
        node.bridge([
            "fdb",
            "replace",
            &backend_mac,
            "dev",
            "vback",
            "master",
            "static",
        ])?;
        backend.in_netns(|| {
            nft(&format!(
                "table netdev ppssink {{ counter seen {{ }} ; chain in {{ type filter hook \
                 ingress device {BRIDGED_IFACE} priority 0 ; counter name seen drop ; }} ; }}"
            ))
        })?;
        Ok(())
    }

    /// The frames the bridged backend's sink dropped.
    fn bridged_sunk(&self) -> Result<u64> {
        let out = self
            .backend
            .exec(["nft", "-j", "list", "counter", "netdev", "ppssink", "seen"])?;
        ensure!(
            out.status.success(),
            "nft list counter: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        listed["nftables"]
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .find_map(|item| item["counter"]["packets"].as_u64())
            })
            .context("no packet count in nft's listing of the sink's counter")
    }

    /// The kernel's paths: nftables DNAT on the node to the local backend and to the task
    /// through the node's `vxlan` device, and the Swarm-like ingress sandbox.
    fn kernel_paths(node: &NetNs, sandbox: &NetNs) -> Result<()> {
        let task = TASK_IP.to_string();
        let task_mac = format_mac(TASK_MAC);
        let peer = PEER_NODE_IP.to_string();
        let local = NODE_IP.to_string();
        // Both VXLAN devices are made in the node's namespace, so their UDP socket and their
        // underlay routes are the node's; the sandbox's is then moved into the sandbox.
        for (ns, (device, vni), addr) in [
            (node, NODE_VXLAN, OVERLAY_NODE_ADDR),
            (sandbox, SANDBOX_VXLAN, OVERLAY_SANDBOX_ADDR),
        ] {
            let vni = vni.to_string();
            let port = VXLAN_PORT.to_string();
            node.ip([
                "link",
                "add",
                device,
                "type",
                "vxlan",
                "id",
                &vni,
                "dstport",
                &port,
                "local",
                &local,
                "dev",
                UPLINK,
                "nolearning",
            ])?;
            if ns.name() != node.name() {
                node.ip(["link", "set", device, "netns", ns.name()])?;
            }
            ns.ip(["addr", "add", addr, "dev", device])?;
            ns.ip(["link", "set", device, "up"])?;
            ns.ip([
                "neigh",
                "replace",
                &task,
                "lladdr",
                &task_mac,
                "dev",
                device,
                "nud",
                "permanent",
            ])?;
            ns.bridge(["fdb", "append", &task_mac, "dev", device, "dst", &peer])?;
        }
        node.ip(["link", "add", GWBRIDGE, "type", "bridge"])?;
        node.ip(["addr", "add", GWBRIDGE_ADDR, "dev", GWBRIDGE])?;
        node.ip(["link", "set", GWBRIDGE, "up"])?;
        netns::veth(node, "gwport", sandbox, "eth1")?;
        node.ip(["link", "set", "gwport", "master", GWBRIDGE])?;
        sandbox.ip(["addr", "add", &format!("{SANDBOX_IP}/16"), "dev", "eth1"])?;
        sandbox.ip(["route", "add", "default", "via", "172.18.0.1"])?;
        // Resolved beforehand, as it is on a node that has carried traffic: frames that wait
        // for ARP in the middle of a run would be lost or late.
        let sandbox_mac = format_mac(sandbox.mac("eth1")?);
        node.ip([
            "neigh",
            "replace",
            &SANDBOX_IP.to_string(),
            "lladdr",
            &sandbox_mac,
            "dev",
            GWBRIDGE,
            "nud",
            "permanent",
        ])?;
        sandbox.sysctl("net.ipv4.ip_forward", "1")?;
        let port = |path: Path| path.port().expect("a service port");
        node.in_netns(|| {
            nft(
                &format!(
                    "table ip ppsbench {{ chain pre {{ type nat hook prerouting priority dstnat; \
                     policy accept; \
                     ip daddr {NODE_IP} udp dport {} dnat to numgen inc mod 1 map {{ 0 : {LOCAL_BACKEND} }} : {BACKEND_PORT} ; \
                     ip daddr {NODE_IP} udp dport {} dnat to numgen inc mod 1 map {{ 0 : {TASK_IP} }} : {BACKEND_PORT} ; \
                     ip daddr {NODE_IP} udp dport {} dnat to {SANDBOX_IP} ; \
                     ip daddr {NODE_IP} udp dport {} dnat to numgen inc mod 1 map {{ 0 : {BRIDGED_BACKEND} }} : {BACKEND_PORT} ; }} ; }}",
                    port(Path::NftLocal),
                    port(Path::NftVxlan),
                    port(Path::SwarmIngress),
                    port(Path::NftBridge),
                ),
            )
        })?;
        sandbox.in_netns(|| {
            nft(
                &format!(
                    "table ip ppsbench {{ chain pre {{ type nat hook prerouting priority dstnat; \
                     policy accept; \
                     udp dport {} dnat to numgen inc mod 1 map {{ 0 : {TASK_IP} }} : {BACKEND_PORT} ; }} ; \
                     chain post {{ type nat hook postrouting priority srcnat; policy accept; \
                     oifname \"{}\" masquerade ; }} ; }}",
                    port(Path::SwarmIngress),
                    SANDBOX_VXLAN.0,
                ),
            )
        })?;
        Ok(())
    }

    /// The generator of `case` and the length of its frame.
    fn generator(&self, case: Case) -> (&OwnedFd, usize) {
        let (_, generator, frame_len) = self
            .generators
            .iter()
            .find(|(c, ..)| *c == case)
            .expect("a generator for every case");
        (generator, *frame_len)
    }

    /// Puts `path` on the uplink, sends `frames` (after `warm` more when they are many flows)
    /// and checks they all took it; returns nanoseconds per frame.
    fn measure(&mut self, (path, flows): Case, warm: u32, frames: u32) -> Result<f64> {
        let node_program = match path {
            Path::Floor => Some(self.node.attach_xdp_action(UPLINK, XDP_DROP)?),
            Path::Bounce => Some(self.node.attach_xdp_action(UPLINK, XDP_TX)?),
            Path::LbctlLocal | Path::LbctlEncap | Path::LbctlDecap | Path::LbctlBridge => {
                self.lbctl.run(&["attach", UPLINK, "--transmit", "xdp"])?;
                None
            }
            Path::NftLocal | Path::NftVxlan | Path::SwarmIngress | Path::NftBridge => {
                Some(self.node.attach_xdp_action(UPLINK, XDP_PASS)?)
            }
        };
        let (generator, frame_len) = self.generator((path, flows));
        let send = |count: u32| {
            self.gen_ns
                .in_netns(|| on_one_cpu(|| bpf::live_frames(generator, frame_len, count)))
        };
        if flows == Flows::Many {
            send(warm)??;
        }
        let counted = |rig: &Rig| match path.lbctl_reason() {
            Some(reason) => rig.lbctl.reason_packets(reason),
            None => Ok(0),
        };
        let sunk = |rig: &Rig| {
            if path.bridged() {
                rig.bridged_sunk()
            } else {
                rig.gen_ns.xdp_drops(GEN)
            }
        };
        let sunk_before = sunk(self)?;
        let counted_before = counted(self)?;
        let elapsed = send(frames)??;
        let sunk = sunk(self)? - sunk_before;
        let counted = counted(self)? - counted_before;
        drop(node_program);
        if path.lbctl_reason().is_some() {
            self.lbctl.run(&["detach", UPLINK])?;
        }
        let frames = u64::from(frames);
        let name = format!("{}, {}", path.name(), flows.name());
        live::check_sunk(&name, path == Path::Floor, sunk, frames)?;
        if let Some(reason) = path.lbctl_reason() {
            ensure!(
                counted == frames,
                "{name}: lbctl counted {counted} {reason} of {frames} frames"
            );
        }
        Ok(elapsed as f64 / frames as f64)
    }
}

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let mut rig = Rig::build().context("building the namespaces")?;
    let (frames, warm) = if opts.smoke {
        (SMOKE_FRAMES, SMOKE_FRAMES)
    } else {
        (FRAMES, WARM_FRAMES)
    };
    let cases: Vec<Case> = Path::ALL
        .iter()
        .flat_map(|&path| {
            let many = path.has_flows().then_some((path, Flows::Many));
            [Some((path, Flows::One)), many].into_iter().flatten()
        })
        .collect();
    // A first flow-creating frame, and a warm-up of every path; then A B .. B A. The smoke run
    // only checks that every path forwards, once.
    let rounds: Vec<Case> = if opts.smoke {
        cases.clone()
    } else {
        for &case in &cases {
            rig.measure(case, 1000, 1000)
                .with_context(|| format!("warming up {case:?}"))?;
        }
        cases.iter().chain(cases.iter().rev()).copied().collect()
    };
    let mut times: Vec<(Case, f64)> = cases.iter().map(|&c| (c, f64::INFINITY)).collect();
    for case in rounds {
        let ns = rig
            .measure(case, warm, frames)
            .with_context(|| format!("{case:?}"))?;
        let best = &mut times
            .iter_mut()
            .find(|(c, _)| *c == case)
            .expect("a case")
            .1;
        *best = best.min(ns);
    }
    let best = |case: Case| times.iter().find(|(c, _)| *c == case).expect("a case").1;
    let floor = best((Path::Floor, Flows::One));
    let work = |case: Case| best(case) - floor;
    println!(
        "pps: {frames} frames of 60 bytes (112 encapsulated) per run, one core, best of 2; node \
         work = time per frame less the floor's"
    );
    let mut out = Vec::new();
    for &case in &cases {
        let (path, flows) = case;
        let name = format!("{}, {}", path.name(), flows.name());
        let total = best(case);
        out.push(Measurement::new(
            SECTION, &name, PIPELINE, total, "ns/frame",
        ));
        if path == Path::Floor {
            println!(
                "  {name:<50} {total:7.1} ns/frame, {:5.2} Mpps",
                1e3 / total
            );
            continue;
        }
        let node_work = work(case);
        println!(
            "  {name:<50} {total:7.1} ns/frame, node work {node_work:6.1} ns = {:6.2} Mpps per core",
            1e3 / node_work
        );
        out.push(Measurement::new(
            SECTION, &name, NODE_WORK, node_work, "ns/frame",
        ));
        out.push(Measurement::new(
            SECTION,
            &name,
            "node Mpps per core",
            1e3 / node_work,
            "Mpps",
        ));
    }
    let bounce = work((Path::Bounce, Flows::One));
    for flows in [Flows::One, Flows::Many] {
        for (kernel, lbctl) in [
            (Path::NftLocal, Path::LbctlLocal),
            (Path::NftVxlan, Path::LbctlEncap),
            (Path::SwarmIngress, Path::LbctlEncap),
            (Path::NftBridge, Path::LbctlBridge),
        ] {
            let ratio = work((kernel, flows)) / work((lbctl, flows));
            let name = format!("{} / {}, {}", kernel.name(), lbctl.name(), flows.name());
            println!("  {name:<80} {ratio:5.2}x");
            out.push(Measurement::new(SECTION, name, NODE_WORK, ratio, "x"));
        }
        for lbctl in [Path::LbctlLocal, Path::LbctlEncap, Path::LbctlDecap] {
            let ratio = work((lbctl, flows)) / bounce;
            let name = format!("{} / bounce, {}", lbctl.name(), flows.name());
            println!("  {name:<80} {ratio:5.2}x");
            out.push(Measurement::new(SECTION, name, NODE_WORK, ratio, "x"));
        }
    }
    for lbctl in [
        Path::LbctlLocal,
        Path::LbctlEncap,
        Path::LbctlDecap,
        Path::LbctlBridge,
    ] {
        let ratio = work((lbctl, Flows::Many)) / work((lbctl, Flows::One));
        let name = format!("{}: 64k flows / 1 flow", lbctl.name());
        println!("  {name:<80} {ratio:5.2}x");
        out.push(Measurement::new(SECTION, name, NODE_WORK, ratio, "x"));
    }
    Ok(out)
}
