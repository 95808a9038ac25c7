//! The routing-mesh topology: several nodes on one underlay segment, each
//! with tasks of its own behind it, as in the Docker Swarm whose ingress
//! mesh lbctl replaces; and hosts that speak VXLAN with the kernel's own
//! driver, to check that the mesh interoperates with it.

use std::iter;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::os::fd::OwnedFd;

use anyhow::{Context, Result, bail};

use crate::netns::{self, NetNs, format_mac};
use crate::topology::{NODE_UPLINK, TASK_BRIDGE, TestServers};

/// Name of the bridge in the underlay namespace that every node, the client
/// and the Linux VXLAN hosts are plugged into.
pub const UNDERLAY_BRIDGE: &str = "br-underlay";

/// Interface of the namespaces with a single link: the client, the tasks
/// and the Linux VXLAN hosts.
pub const HOST_IF: &str = "eth0";

/// The kernel VXLAN device of a [`LinuxVxlanHost`].
pub const VXLAN_IF: &str = "vxlan0";

/// Bytes VXLAN adds in front of an inner IPv4 packet: outer IPv4 (20), UDP
/// (8), VXLAN (8) and the inner Ethernet header (14). The same value as
/// `lb_common::VXLAN_OVERHEAD`, which the harness cannot depend on (see the
/// crate documentation).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The VNI Swarm gives its ingress overlay (it allocates from 4096 up), and
/// lbctl's default.
pub const DEFAULT_VNI: u32 = 4096;

/// The IANA VXLAN port (RFC 7348), lbctl's default.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// Smallest MTU an IPv4 link may have (RFC 791).
const MIN_IPV4_MTU: u32 = 68;

/// Largest MTU of a veth or bridge.
const MAX_MTU: u32 = 65535;

/// Largest VXLAN network identifier: the field is 24 bits wide.
const MAX_VNI: u32 = (1 << 24) - 1;

/// Underlay host octet of the gateway, the underlay bridge's own address.
const GATEWAY_HOST: u8 = 1;

/// Underlay host octet of node 0; node i is at this + i.
const FIRST_NODE_HOST: u8 = 10;

/// Underlay host octet of the client. The nodes must stay below it.
const CLIENT_HOST: u8 = 100;

/// Overlay host octet of every node's task bridge (the tasks' gateway).
const TASK_GATEWAY_HOST: u8 = 1;

/// Overlay host octet of task 0; task k is at this + k.
const FIRST_TASK_HOST: u8 = 10;

/// Last overlay host octet a task may have: from .200 up the overlay is
/// left to hosts outside the swarm (a [`LinuxVxlanHost`]'s server address,
/// its reply next hop).
const LAST_TASK_HOST: u8 = 199;

/// Overlay host octet of the next hop a [`LinuxVxlanHost`] sends its
/// replies to; no host has it, the neighbour entry is static.
const REPLY_NEXT_HOP_HOST: u8 = 254;

/// Routing table of a [`LinuxVxlanHost`]'s replies.
const REPLY_TABLE: &str = "100";

/// The MTU inside the overlay on an underlay of MTU `underlay_mtu`: small
/// enough that every encapsulated packet still fits (1450 on 1500, as
/// Swarm uses).
pub const fn overlay_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
}

/// Name of node `i`: `n1`, `n2`, ... (its namespace role too).
pub fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

/// Shape of a [`Mesh`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSpec {
    /// Number of node namespaces.
    pub nodes: usize,
    /// Tasks of each node, in node order (one count per node; 0 is a node
    /// that only routes, as a Swarm node without a replica of the service).
    pub tasks_per_node: Vec<usize>,
    /// First three octets of the underlay /24 (gateway .1, node i .10+i,
    /// client .100).
    pub underlay_subnet: [u8; 3],
    /// First three octets of the overlay /24 (every node's task bridge .1,
    /// task k .10+k).
    pub overlay_subnet: [u8; 3],
    /// TCP port the tasks serve HTTP on.
    pub http_port: u16,
    /// UDP port the tasks echo on.
    pub udp_port: u16,
    /// MTU of every underlay link; the overlay's is [`overlay_mtu`] of it.
    pub underlay_mtu: u32,
    /// Whether the far ends of the nodes' uplinks (their underlay bridge ports) run an XDP
    /// program that passes everything, as a peer that takes the frames a node sends with
    /// native XDP_TX (see [`NetNs::attach_xdp_pass`]). Off by default, as users build their
    /// bridges: only the test of that fast path turns it on.
    pub far_end_xdp: bool,
}

impl Default for MeshSpec {
    /// The "three-node swarm": two tasks on each of n1 and n2, none on n3.
    fn default() -> Self {
        MeshSpec {
            nodes: 3,
            tasks_per_node: vec![2, 2, 0],
            underlay_subnet: [192, 168, 200],
            overlay_subnet: [10, 0, 0],
            http_port: 80,
            udp_port: 5353,
            underlay_mtu: 1500,
            far_end_xdp: false,
        }
    }
}

impl MeshSpec {
    /// Checks that the nodes and tasks fit the address plan and that the
    /// values make sense; [`Mesh::build`] calls it first.
    pub fn validate(&self) -> Result<()> {
        let max_nodes = usize::from(CLIENT_HOST - FIRST_NODE_HOST);
        if self.nodes == 0 || self.nodes > max_nodes {
            bail!(
                "a mesh has 1 to {max_nodes} nodes (underlay .{FIRST_NODE_HOST} up to below \
                 the client at .{CLIENT_HOST}), not {}",
                self.nodes
            );
        }
        if self.tasks_per_node.len() != self.nodes {
            bail!(
                "tasks_per_node {:?} gives {} task counts for {} nodes: give one per node",
                self.tasks_per_node,
                self.tasks_per_node.len(),
                self.nodes
            );
        }
        let tasks: usize = self.tasks_per_node.iter().sum();
        let max_tasks = usize::from(LAST_TASK_HOST - FIRST_TASK_HOST) + 1;
        if tasks > max_tasks {
            bail!(
                "{tasks} tasks in all, but at most {max_tasks} fit in the overlay \
                 (.{FIRST_TASK_HOST} to .{LAST_TASK_HOST}; from .{} up it is left to hosts \
                 outside the swarm)",
                LAST_TASK_HOST + 1
            );
        }
        if self.underlay_subnet == self.overlay_subnet {
            let [a, b, c] = self.overlay_subnet;
            bail!("the underlay and the overlay are both {a}.{b}.{c}.0/24: they must differ");
        }
        if self.http_port == 0 || self.udp_port == 0 {
            bail!(
                "the tasks' ports must not be 0 (http_port {}, udp_port {})",
                self.http_port,
                self.udp_port
            );
        }
        let min_mtu = MIN_IPV4_MTU + VXLAN_OVERHEAD;
        if !(min_mtu..=MAX_MTU).contains(&self.underlay_mtu) {
            bail!(
                "underlay_mtu {} is outside {min_mtu}..={MAX_MTU} (the overlay, \
                 {VXLAN_OVERHEAD} bytes smaller, must still carry IPv4)",
                self.underlay_mtu
            );
        }
        Ok(())
    }

    /// The MTU of the task links and bridges: [`overlay_mtu`] of
    /// `underlay_mtu`.
    pub fn overlay_mtu(&self) -> u32 {
        overlay_mtu(self.underlay_mtu)
    }
}

/// Nodes on one underlay segment, each routing for tasks behind it, as in
/// a Docker Swarm (U: underlay /24, O: overlay /24):
///
/// ```text
///                       underlay ns: br-underlay U.1/24
///        ┌───────────────────┬────────┴──────────┬──────────────────┐
///     u-client             u-n1                u-n2               u-n3
///        │ veth              │                   │                  │
///  client ns            n1 ns               n2 ns              n3 ns
///  eth0 U.100/24        uplink U.10/24      uplink U.11/24     uplink U.12/24
///                       br-tasks O.1/24     br-tasks O.1/24    br-tasks O.1/24
///                        ├ vt0 ── t0 ns      ├ vt2 ── t2 ns     (no task)
///                        │   eth0 O.10/24    │   eth0 O.12/24
///                        └ vt1 ── t1 ns      └ vt3 ── t3 ns
///                            eth0 O.11/24        eth0 O.13/24
/// ```
///
/// Tasks are numbered across the mesh in node order; task k runs
/// `lb-testsrv` named `task-{k}`. Every node has the same gateway address
/// O.1 on its own bridge and forwards (`ip_forward=1`), but knows no route
/// to the tasks of the others: a packet reaches a task on another node only
/// through the mesh data plane (VXLAN over the underlay), never by plain
/// routing that would hide a broken data plane.
///
/// The client has a host route to each task through the task's node, so
/// that without lbctl the client and the tasks already reach each other
/// (replies to a task's own connection come back that way). The underlay
/// namespace does not forward: U.1 is only the segment's gateway address.
///
/// Underlay links have MTU `underlay_mtu`, task links and bridges its
/// [`overlay_mtu`]. Every host keeps its checksum offload; the bridges'
/// ports put whole checksums on the "wire" (see `Segment::plug`). The
/// nodes' underlay
/// ports are plain bridge ports unless the spec asks for an XDP program on
/// them ([`MeshSpec::far_end_xdp`]).
pub struct Mesh {
    spec: MeshSpec,
    /// Test server of each task. Declared before the namespaces so that it
    /// drops (kills the servers) first: a namespace only really goes away
    /// once no process is left in it.
    servers: TestServers,
    /// XDP_PASS links on the nodes' underlay ports, if the spec asks for them.
    underlay_xdp: Vec<OwnedFd>,
    /// Index of the node of each task.
    task_nodes: Vec<usize>,
    underlay: NetNs,
    client: NetNs,
    nodes: Vec<NetNs>,
    tasks: Vec<NetNs>,
}

impl Mesh {
    /// Checks the spec, creates the namespaces, links, addresses and routes,
    /// starts a test server in each task and waits until all are ready.
    pub fn build(spec: MeshSpec) -> Result<Mesh> {
        spec.validate()?;
        let underlay = NetNs::new("underlay")?;
        let client = NetNs::new("client")?;
        let nodes = (0..spec.nodes)
            .map(|i| NetNs::new(&node_name(i)))
            .collect::<Result<Vec<_>>>()?;
        let task_nodes: Vec<usize> = spec
            .tasks_per_node
            .iter()
            .enumerate()
            .flat_map(|(i, &count)| iter::repeat_n(i, count))
            .collect();
        let tasks = (0..task_nodes.len())
            .map(|k| NetNs::new(&format!("t{k}")))
            .collect::<Result<Vec<_>>>()?;
        // Owned from here on so that a failure below still cleans up.
        let mut mesh = Mesh {
            servers: TestServers::new(tasks.len(), spec.http_port, spec.udp_port),
            spec,
            underlay_xdp: Vec::new(),
            task_nodes,
            underlay,
            client,
            nodes,
            tasks,
        };
        mesh.wire()?;
        for k in 0..mesh.task_count() {
            mesh.start_task(k)?;
        }
        Ok(mesh)
    }

    /// Creates links, addresses and routes.
    fn wire(&mut self) -> Result<()> {
        let mut underlay_xdp = Vec::new();
        let underlay = self.underlay_segment();
        underlay.create()?;

        underlay.plug(&self.client, HOST_IF, self.client_ip(), "u-client")?;

        for (i, node) in self.nodes.iter().enumerate() {
            let port = format!("u-{}", node_name(i));
            underlay.plug(node, NODE_UPLINK, self.node_ip(i), &port)?;
            if self.spec.far_end_xdp {
                underlay_xdp.push(self.underlay.attach_xdp_pass(&port)?);
            }
            node.sysctl("net.ipv4.ip_forward", "1")?;
            let tasks = self.task_segment(i);
            tasks.create()?;
            for k in self.tasks_on(i) {
                let task = &self.tasks[k];
                tasks.plug(task, HOST_IF, self.task_ip(k), &format!("vt{k}"))?;
                let node_ip = self.node_ip(i).to_string();
                let task_route = format!("{}/32", self.task_ip(k));
                self.client
                    .ip(["route", "add", &task_route, "via", &node_ip])?;
            }
        }
        self.underlay_xdp = underlay_xdp;
        Ok(())
    }

    /// The underlay: `br-underlay` in the underlay namespace.
    fn underlay_segment(&self) -> Segment<'_> {
        Segment {
            ns: &self.underlay,
            bridge: UNDERLAY_BRIDGE,
            gateway: self.underlay_gateway(),
            mtu: self.spec.underlay_mtu,
        }
    }

    /// Node `i`'s task network: `br-tasks` in its namespace.
    fn task_segment(&self, i: usize) -> Segment<'_> {
        Segment {
            ns: &self.nodes[i],
            bridge: TASK_BRIDGE,
            gateway: self.overlay_gateway(),
            mtu: self.spec.overlay_mtu(),
        }
    }

    /// The spec this mesh was built from.
    pub fn spec(&self) -> &MeshSpec {
        &self.spec
    }

    /// Every namespace of the mesh (not those of the Linux VXLAN hosts,
    /// which own theirs).
    pub fn namespaces(&self) -> impl Iterator<Item = &NetNs> {
        [&self.underlay, &self.client]
            .into_iter()
            .chain(&self.nodes)
            .chain(&self.tasks)
    }

    /// The namespace of the underlay bridge (`br-underlay`).
    pub fn underlay(&self) -> &NetNs {
        &self.underlay
    }

    /// The underlay gateway, `br-underlay`'s own address (U.1): every
    /// underlay host's default route.
    pub fn underlay_gateway(&self) -> Ipv4Addr {
        self.underlay_ip(GATEWAY_HOST)
    }

    /// The client namespace (interface `eth0`).
    pub fn client(&self) -> &NetNs {
        &self.client
    }

    /// `count` HTTP requests from the client to `port` of node `node`, each on a new
    /// connection.
    pub fn new_connections(
        &self,
        node: usize,
        port: u16,
        count: usize,
    ) -> Result<Vec<crate::client::Reply>> {
        let addr = SocketAddrV4::new(self.node_ip(node), port);
        self.client
            .in_netns(|| crate::client::new_connections(addr, count))
    }

    /// The client's address (U.100).
    pub fn client_ip(&self) -> Ipv4Addr {
        self.underlay_ip(CLIENT_HOST)
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The namespace of node `i` (interfaces `uplink` and `br-tasks`).
    pub fn node(&self, i: usize) -> &NetNs {
        &self.nodes[i]
    }

    /// Name of node `i`, `n{i+1}`.
    pub fn node_name(&self, i: usize) -> String {
        node_name(i)
    }

    /// Node `i`'s underlay address, U.(10+i), on its `uplink`: where the
    /// mesh publishes services and where VXLAN to the node goes.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.underlay_ip(host_range(FIRST_NODE_HOST, i).end)
    }

    /// Node `i`'s `uplink` MAC address, e.g. for a [`LinuxVxlanHost`]'s
    /// static neighbour entries (see [`NetNs::mac`] for how it is read).
    pub fn node_mac(&self, i: usize) -> Result<[u8; 6]> {
        self.nodes[i].mac(NODE_UPLINK)
    }

    /// The tasks' gateway, O.1: every node's `br-tasks` has it.
    pub fn overlay_gateway(&self) -> Ipv4Addr {
        self.overlay_ip(TASK_GATEWAY_HOST)
    }

    /// Turns TX checksum offload off on the tasks of node `i`, for tests that attach lbctl
    /// to that node's task bridge: XDP there receives the tasks' frames as they sent them,
    /// before any link finished their checksums, and XDP cannot tell a partial checksum from
    /// a whole one (the README's known limits).
    pub fn disable_task_tx_offload(&self, i: usize) -> Result<()> {
        for k in self.tasks_on(i) {
            self.tasks[k].disable_tx_offload(HOST_IF)?;
        }
        Ok(())
    }

    /// Number of tasks, all nodes together.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The tasks of node `i` (numbers of consecutive tasks, maybe none).
    pub fn tasks_on(&self, i: usize) -> Range<usize> {
        let start = self.spec.tasks_per_node[..i].iter().sum();
        start..start + self.spec.tasks_per_node[i]
    }

    /// The namespace of task `k`.
    pub fn task_ns(&self, k: usize) -> &NetNs {
        &self.tasks[k]
    }

    /// Index of the node task `k` runs on.
    pub fn task_node(&self, k: usize) -> usize {
        self.task_nodes[k]
    }

    /// Task `k`'s overlay address, O.(10+k).
    pub fn task_ip(&self, k: usize) -> Ipv4Addr {
        self.overlay_ip(host_range(FIRST_TASK_HOST, k).end)
    }

    /// Task `k` as `service add` takes a backend on another node: `IP:PORT@NODE`, its HTTP
    /// address or (`udp`) its UDP one.
    pub fn task_backend(&self, k: usize, udp: bool) -> String {
        let addr = if udp {
            self.task_udp_addr(k)
        } else {
            self.task_addr(k)
        };
        format!("{addr}@{}", self.node_name(self.task_node(k)))
    }

    /// Task `k`'s HTTP address, O.(10+k):http_port.
    pub fn task_addr(&self, k: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.task_ip(k), self.spec.http_port)
    }

    /// Task `k`'s UDP address, O.(10+k):udp_port.
    pub fn task_udp_addr(&self, k: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.task_ip(k), self.spec.udp_port)
    }

    /// The name task `k`'s server puts in its replies: `task-{k}`.
    pub fn task_name(&self, k: usize) -> String {
        format!("task-{k}")
    }

    /// Kills task `k`'s server (does nothing if it is already stopped).
    pub fn stop_task(&mut self, k: usize) -> Result<()> {
        self.servers.stop(k)
    }

    /// Starts task `k`'s server and waits until it is ready (does nothing
    /// if it is already running).
    pub fn start_task(&mut self, k: usize) -> Result<()> {
        let name = self.task_name(k);
        self.servers.start(k, &self.tasks[k], &name)
    }

    /// Adds a host to the underlay that speaks VXLAN through a kernel
    /// device, and starts its test server; see [`LinuxVxlanHost`]. The
    /// returned value owns the host: dropping it (before or after the mesh)
    /// removes it.
    pub fn add_linux_vxlan_host(&self, spec: LinuxVxlanSpec) -> Result<LinuxVxlanHost> {
        self.check_linux_vxlan_spec(&spec)?;
        let role = format!("vx{}", spec.host);
        let mut host = LinuxVxlanHost {
            server: TestServers::new(1, self.spec.http_port, self.spec.udp_port),
            ns: NetNs::new(&role)?,
            underlay_ip: self.underlay_ip(spec.host),
            server_ip: self.overlay_ip(spec.server_host),
            reply_next_hop: self.overlay_ip(REPLY_NEXT_HOP_HOST),
            mac: [0; 6],
            http_port: self.spec.http_port,
            udp_port: self.spec.udp_port,
            spec,
        };
        let port = format!("u-h{}", host.spec.host);
        self.underlay_segment()
            .plug(&host.ns, HOST_IF, host.underlay_ip, &port)?;
        host.mac = host.ns.mac(HOST_IF)?;
        host.create_vxlan(self.spec.overlay_mtu())?;
        host.server.start(0, &host.ns, &host.spec.name)?;
        Ok(host)
    }

    /// Refuses a Linux VXLAN host whose addresses clash with the mesh's.
    fn check_linux_vxlan_spec(&self, spec: &LinuxVxlanSpec) -> Result<()> {
        let nodes = host_range(FIRST_NODE_HOST, self.nodes.len());
        if matches!(spec.host, 0 | GATEWAY_HOST | CLIENT_HOST | 255) || nodes.contains(&spec.host) {
            bail!(
                "Linux VXLAN host {:?}: underlay host .{} is taken (gateway .{GATEWAY_HOST}, \
                 nodes .{} to .{}, client .{CLIENT_HOST}) or not a host address",
                spec.name,
                spec.host,
                nodes.start,
                nodes.end - 1
            );
        }
        let tasks = host_range(FIRST_TASK_HOST, self.tasks.len());
        if matches!(
            spec.server_host,
            0 | TASK_GATEWAY_HOST | REPLY_NEXT_HOP_HOST | 255
        ) || tasks.contains(&spec.server_host)
        {
            bail!(
                "Linux VXLAN host {:?}: overlay host .{} is taken (gateway .{TASK_GATEWAY_HOST}, \
                 tasks .{FIRST_TASK_HOST} up, reply next hop .{REPLY_NEXT_HOP_HOST}) or not a \
                 host address: pick one from .{} to .{}",
                spec.name,
                spec.server_host,
                LAST_TASK_HOST + 1,
                REPLY_NEXT_HOP_HOST - 1
            );
        }
        let subnet = |ip: Ipv4Addr| [ip.octets()[0], ip.octets()[1], ip.octets()[2]];
        let client = spec.client_ip;
        if subnet(client) == self.spec.overlay_subnet
            || subnet(client) == self.spec.underlay_subnet
            || client.is_unspecified()
            || client.is_loopback()
            || client.is_multicast()
            || client.is_broadcast()
        {
            bail!(
                "Linux VXLAN host {:?}: client_ip {client} must be a unicast address outside \
                 the overlay and the underlay",
                spec.name
            );
        }
        if spec.vni > MAX_VNI || spec.port == 0 || spec.name.is_empty() {
            bail!(
                "Linux VXLAN host {:?}: needs a name, a VNI up to {MAX_VNI} (not {}) and a \
                 port other than 0",
                spec.name,
                spec.vni
            );
        }
        Ok(())
    }

    /// U.`host` in the underlay subnet.
    fn underlay_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.spec.underlay_subnet;
        Ipv4Addr::new(a, b, c, host)
    }

    /// O.`host` in the overlay subnet.
    fn overlay_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.spec.overlay_subnet;
        Ipv4Addr::new(a, b, c, host)
    }
}

/// The `count` host octets from `first` on. Panics past .255, which
/// [`MeshSpec::validate`] rules out for nodes and tasks.
fn host_range(first: u8, count: usize) -> Range<u8> {
    let last = u8::try_from(count)
        .ok()
        .and_then(|count| first.checked_add(count))
        .expect("host numbers are checked by MeshSpec::validate");
    first..last
}

/// A bridge that hosts plug into: the far end of each host's veth becomes a
/// port of it, and its own address is their default gateway.
struct Segment<'a> {
    ns: &'a NetNs,
    bridge: &'static str,
    gateway: Ipv4Addr,
    mtu: u32,
}

impl Segment<'_> {
    /// Creates the bridge, with address `gateway`/24, and sets it up.
    fn create(&self) -> Result<()> {
        let mtu = self.mtu.to_string();
        self.ns
            .ip(["link", "add", self.bridge, "mtu", &mtu, "type", "bridge"])?;
        let prefix = format!("{}/24", self.gateway);
        self.ns.ip(["addr", "add", &prefix, "dev", self.bridge])?;
        self.ns.ip(["link", "set", self.bridge, "up"])?;
        Ok(())
    }

    /// Gives `host` interface `ifname` with address `addr`/24 and a default
    /// route via the gateway, through a veth whose other end, `port`, joins
    /// the bridge. Both ends get the segment's MTU.
    ///
    /// The hosts keep their checksum offload, as containers and VMs do: what
    /// they send may carry a partial checksum (`CHECKSUM_PARTIAL`), left for
    /// "hardware" to finish. The bridge's ports finish it on their way out
    /// (TX offload off on `port`), as a physical link carries whole
    /// checksums: every host receives full checksums, and its kernel drops a
    /// wrong one. Without that, a veth hands its peer the unfinished sum,
    /// which the peer trusts, and nothing would check that lbctl's TC
    /// programs updated a partial checksum right.
    fn plug(&self, host: &NetNs, ifname: &str, addr: Ipv4Addr, port: &str) -> Result<()> {
        netns::veth(host, ifname, self.ns, port)
            .with_context(|| format!("cannot plug {} into {}", host.name(), self.bridge))?;
        let mtu = self.mtu.to_string();
        host.ip(["link", "set", ifname, "mtu", &mtu])?;
        self.ns
            .ip(["link", "set", port, "mtu", &mtu, "master", self.bridge])?;
        self.ns.disable_tx_offload(port)?;
        host.ip(["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
        host.ip(["route", "add", "default", "via", &self.gateway.to_string()])?;
        Ok(())
    }
}

/// Shape of a [`LinuxVxlanHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxVxlanSpec {
    /// Name of its test server, in replies.
    pub name: String,
    /// Its underlay host octet (U.host on `eth0`).
    pub host: u8,
    /// Its overlay host octet: the server address O.server_host/24 on
    /// `vxlan0`. Tasks take .10 to .199, so pick .200 to .253.
    pub server_host: u8,
    /// An address outside the overlay (and the underlay), as a /32 on
    /// `vxlan0`, to send client traffic from (see
    /// [`http_get_from`](crate::client::http_get_from)).
    pub client_ip: Ipv4Addr,
    /// VXLAN network identifier.
    pub vni: u32,
    /// VXLAN UDP destination port.
    pub port: u16,
    /// Whether outer UDP checksums are computed (`udpcsum`); off by default
    /// (`noudpcsum`, a zero checksum), as Linux and Swarm send.
    pub udp_csum: bool,
}

impl Default for LinuxVxlanSpec {
    fn default() -> Self {
        LinuxVxlanSpec {
            name: "linux-vxlan".to_string(),
            host: 20,
            server_host: 200,
            client_ip: Ipv4Addr::new(10, 99, 0, 1),
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            udp_csum: false,
        }
    }
}

/// A host on the mesh's underlay that reaches the overlay through the
/// kernel's VXLAN driver instead of lbctl, to check both interoperate:
///
/// ```text
///  vx{host} ns
///  eth0 U.host/24 ──veth── u-h{host} (port of br-underlay)
///  vxlan0 id VNI local U.host dstport PORT nolearning, MAC = eth0's MAC
///         O.server_host/24 (test server) + client_ip/32 (client source)
/// ```
///
/// `vxlan0` carries `eth0`'s MAC because the mesh data plane writes the
/// inner destination MAC equal to the outer one, the receiving host's
/// underlay MAC: a VXLAN device with that MAC takes such frames as its own
/// (`PACKET_HOST`) and routes them up. With `nolearning` and no default
/// forwarding entry, `vxlan0` sends nothing until [`route_via`] or
/// [`reply_via`] says which node a destination is behind. TX checksum
/// offload is off on both interfaces: otherwise the inner TCP checksums
/// of what `vxlan0` sends stay partial inside the encapsulation.
///
/// Its `lb-testsrv`, named `spec.name`, serves the mesh's HTTP and UDP
/// ports. Dropping the host kills it and deletes the namespace.
///
/// [`route_via`]: LinuxVxlanHost::route_via
/// [`reply_via`]: LinuxVxlanHost::reply_via
pub struct LinuxVxlanHost {
    spec: LinuxVxlanSpec,
    /// Declared before the namespace so that the server is killed first.
    server: TestServers,
    ns: NetNs,
    underlay_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    reply_next_hop: Ipv4Addr,
    mac: [u8; 6],
    http_port: u16,
    udp_port: u16,
}

impl LinuxVxlanHost {
    /// Creates `vxlan0` with `eth0`'s MAC and MTU `mtu`, sets it up and
    /// gives it the server and client addresses.
    fn create_vxlan(&self, mtu: u32) -> Result<()> {
        let csum = if self.spec.udp_csum {
            "udpcsum"
        } else {
            "noudpcsum"
        };
        self.ns.ip([
            "link",
            "add",
            VXLAN_IF,
            "address",
            &format_mac(self.mac),
            "mtu",
            &mtu.to_string(),
            "type",
            "vxlan",
            "id",
            &self.spec.vni.to_string(),
            "local",
            &self.underlay_ip.to_string(),
            "dstport",
            &self.spec.port.to_string(),
            "nolearning",
            csum,
        ])?;
        self.ns.ip(["link", "set", VXLAN_IF, "up"])?;
        let server = format!("{}/24", self.server_ip);
        self.ns.ip(["addr", "add", &server, "dev", VXLAN_IF])?;
        let client = format!("{}/32", self.spec.client_ip);
        self.ns.ip(["addr", "add", &client, "dev", VXLAN_IF])?;
        Ok(())
    }

    /// Sends everything from the server address back through the overlay
    /// to the node at underlay address `node_ip` with uplink MAC
    /// `node_mac`, whatever its destination: a policy rule sends traffic
    /// from the server address to a table whose default route is the
    /// static next hop O.254 on `vxlan0`, whose neighbour entry is
    /// `node_mac`, which the forwarding database sends to `node_ip`.
    ///
    /// Run again with another node, it replaces the previous one.
    pub fn reply_via(&self, node_ip: Ipv4Addr, node_mac: [u8; 6]) -> Result<()> {
        let server = self.server_ip.to_string();
        let rule = ["from", server.as_str(), "lookup", REPLY_TABLE];
        // `ip rule add` would add a duplicate rather than fail.
        let existing = self.ns.ip([["rule", "list"].as_slice(), &rule].concat())?;
        if existing.trim().is_empty() {
            self.ns.ip([["rule", "add"].as_slice(), &rule].concat())?;
        }
        let next_hop = self.reply_next_hop.to_string();
        self.ns.ip([
            "route",
            "replace",
            "default",
            "via",
            &next_hop,
            "dev",
            VXLAN_IF,
            "onlink",
            "table",
            REPLY_TABLE,
        ])?;
        self.tunnel_neighbour(self.reply_next_hop, node_ip, node_mac)
    }

    /// Sends traffic for `task_ip` through the overlay to the node at
    /// underlay address `node_ip` with uplink MAC `node_mac`: a host route
    /// on `vxlan0`, a static neighbour entry and a forwarding database
    /// entry. Connect from [`client_ip`](LinuxVxlanHost::client_ip): after
    /// [`reply_via`](LinuxVxlanHost::reply_via), traffic from the server
    /// address would follow the reply route instead.
    pub fn route_via(&self, task_ip: Ipv4Addr, node_ip: Ipv4Addr, node_mac: [u8; 6]) -> Result<()> {
        let route = format!("{task_ip}/32");
        self.ns.ip(["route", "replace", &route, "dev", VXLAN_IF])?;
        self.tunnel_neighbour(task_ip, node_ip, node_mac)
    }

    /// Resolves overlay address `ip` on `vxlan0` to `node_mac` for good, and
    /// sends frames for `node_mac` to underlay address `node_ip`.
    fn tunnel_neighbour(&self, ip: Ipv4Addr, node_ip: Ipv4Addr, node_mac: [u8; 6]) -> Result<()> {
        let mac = format_mac(node_mac);
        self.ns.ip([
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            VXLAN_IF,
            "nud",
            "permanent",
        ])?;
        self.ns.bridge([
            "fdb",
            "replace",
            &mac,
            "dev",
            VXLAN_IF,
            "dst",
            &node_ip.to_string(),
        ])?;
        Ok(())
    }

    /// The spec this host was built from.
    pub fn spec(&self) -> &LinuxVxlanSpec {
        &self.spec
    }

    /// Its namespace (interfaces `eth0` and `vxlan0`).
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The name its server puts in its replies.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Its underlay address, U.host, on `eth0`: the outer source of what it
    /// sends and the outer destination to reach it.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }

    /// The MAC of `eth0`, which `vxlan0` shares.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Its server's overlay address, O.server_host.
    pub fn server_ip(&self) -> Ipv4Addr {
        self.server_ip
    }

    /// Its server's HTTP address, O.server_host:http_port.
    pub fn server_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.server_ip, self.http_port)
    }

    /// Its server's UDP address, O.server_host:udp_port.
    pub fn server_udp_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.server_ip, self.udp_port)
    }

    /// The address outside the overlay it sends client traffic from.
    pub fn client_ip(&self) -> Ipv4Addr {
        self.spec.client_ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spec` with `change` applied fails validation with a message that
    /// contains `says`.
    fn refused(change: impl FnOnce(&mut MeshSpec), says: &str) {
        let mut spec = MeshSpec::default();
        change(&mut spec);
        let err = format!("{:#}", spec.validate().unwrap_err());
        assert!(
            err.contains(says),
            "{spec:?}: {err:?} does not say {says:?}"
        );
    }

    #[test]
    fn the_default_spec_is_the_three_node_swarm() {
        let spec = MeshSpec::default();
        spec.validate().unwrap();
        assert_eq!(spec.nodes, 3);
        assert_eq!(spec.tasks_per_node, [2, 2, 0]);
        assert_eq!(spec.overlay_mtu(), 1450);
    }

    #[test]
    fn specs_that_do_not_fit_the_address_plan_are_refused() {
        refused(|s| s.nodes = 2, "3 task counts for 2 nodes");
        refused(
            |s| {
                s.nodes = 0;
                s.tasks_per_node.clear();
            },
            "1 to 90 nodes",
        );
        refused(
            |s| {
                s.nodes = 91;
                s.tasks_per_node = vec![0; 91];
            },
            "not 91",
        );
        refused(|s| s.tasks_per_node = vec![100, 90, 1], "191 tasks");
        refused(|s| s.overlay_subnet = s.underlay_subnet, "must differ");
        refused(|s| s.udp_port = 0, "must not be 0");
        refused(|s| s.underlay_mtu = 117, "outside 118..=65535");

        let mut largest = MeshSpec {
            nodes: 90,
            tasks_per_node: vec![2; 90],
            ..MeshSpec::default()
        };
        largest.tasks_per_node[0] = 12;
        largest.validate().unwrap();
    }
}
