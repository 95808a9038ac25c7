//! Topologies of namespaces that the tests and the demo run lbctl in.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::{self, NetNs};
use crate::testsrv_path;

/// How long a test server may take to bind its sockets and say `ready`.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Name of the bridge that joins the backends inside the node namespace.
pub const TASK_BRIDGE: &str = "br-tasks";

/// Interface of the node namespace that faces the client (where lbctl
/// attaches).
pub const NODE_UPLINK: &str = "uplink";

/// Shape of a [`SingleNode`] topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleNodeSpec {
    /// Number of backend namespaces, each running one test server.
    pub backends: usize,
    /// First three octets of the client–node /24 (node .1, client .2).
    pub uplink_subnet: [u8; 3],
    /// First three octets of the node–backends /24 (bridge .1, backend i
    /// .10+i).
    pub task_subnet: [u8; 3],
    /// TCP port the backends serve HTTP on.
    pub http_port: u16,
    /// UDP port the backends echo on.
    pub udp_port: u16,
}

impl Default for SingleNodeSpec {
    fn default() -> Self {
        SingleNodeSpec {
            backends: 3,
            uplink_subnet: [192, 168, 100],
            task_subnet: [10, 0, 0],
            http_port: 80,
            udp_port: 5353,
        }
    }
}

/// One load-balancer node between a client and its backends:
///
/// ```text
///  client ns            node ns                         b{i} ns
///  eth0 X.2/24 ──veth── uplink X.1/24
///                        br-tasks T.1/24 ── vb{i} ──veth── eth0 T.(10+i)/24
/// ```
///
/// The node forwards between its interfaces (`ip_forward=1`), so without
/// any load balancer the client can already reach a backend's own address;
/// lbctl attaches to `uplink` and serves virtual ports on X.1.
/// Each backend runs `lb-testsrv` named `backend-{i}`.
pub struct SingleNode {
    spec: SingleNodeSpec,
    /// Test server of each backend. Declared before the namespaces so that
    /// it drops (kills the servers) first: a namespace only really goes away
    /// once no process is left in it.
    servers: TestServers,
    client: NetNs,
    node: NetNs,
    backends: Vec<NetNs>,
}

impl SingleNode {
    /// Creates the namespaces, links and addresses, starts a test server in
    /// each backend and waits until all of them are ready.
    pub fn build(spec: SingleNodeSpec) -> Result<SingleNode> {
        if spec.backends > 245 {
            bail!("at most 245 backends fit in the task /24 (addresses .10 to .254)");
        }
        let client = NetNs::new("client")?;
        let node = NetNs::new("node")?;
        let mut backends = Vec::with_capacity(spec.backends);
        for i in 0..spec.backends {
            backends.push(NetNs::new(&format!("b{i}"))?);
        }
        // Owned from here on so that a failure below still cleans up.
        let mut topo = SingleNode {
            servers: TestServers::new(spec.backends, spec.http_port, spec.udp_port),
            spec,
            client,
            node,
            backends,
        };
        topo.wire()?;
        for i in 0..topo.spec.backends {
            topo.start_backend(i)?;
        }
        Ok(topo)
    }

    /// Creates links, addresses and routes.
    fn wire(&self) -> Result<()> {
        let uplink_prefix = |host: u8| {
            let [a, b, c] = self.spec.uplink_subnet;
            format!("{a}.{b}.{c}.{host}/24")
        };
        let task_prefix = |host: u8| {
            let [a, b, c] = self.spec.task_subnet;
            format!("{a}.{b}.{c}.{host}/24")
        };

        netns::veth(&self.client, "eth0", &self.node, NODE_UPLINK)?;
        self.client
            .ip(["addr", "add", &uplink_prefix(2), "dev", "eth0"])?;
        self.client.ip([
            "route",
            "add",
            "default",
            "via",
            &self.node_uplink_ip().to_string(),
        ])?;
        // The client's frames reach the node's XDP as the client sent them: XDP cannot tell a
        // partial checksum (offload) from a whole one, so the client sends whole ones, as a
        // host on a real network does. The node's uplink finishes the partial checksums of
        // what the node sends (its backends' replies, NATed by TC) as a NIC would, so that the
        // client's kernel checks them: a veth would hand the unfinished sum to its peer, which
        // trusts it.
        self.client.disable_tx_offload("eth0")?;

        self.node
            .ip(["addr", "add", &uplink_prefix(1), "dev", NODE_UPLINK])?;
        self.node.disable_tx_offload(NODE_UPLINK)?;
        self.node
            .ip(["link", "add", TASK_BRIDGE, "type", "bridge"])?;
        self.node
            .ip(["addr", "add", &task_prefix(1), "dev", TASK_BRIDGE])?;
        self.node.ip(["link", "set", TASK_BRIDGE, "up"])?;
        self.node.sysctl("net.ipv4.ip_forward", "1")?;

        let gateway = self.task_ip(1).to_string();
        for (i, backend) in self.backends.iter().enumerate() {
            let port = format!("vb{i}");
            netns::veth(backend, "eth0", &self.node, &port)?;
            self.node
                .ip(["link", "set", &port, "master", TASK_BRIDGE])?;
            backend.ip(["addr", "add", &task_prefix(backend_host(i)), "dev", "eth0"])?;
            backend.ip(["route", "add", "default", "via", &gateway])?;
            // The backends keep their offload, as containers do; their bridge port finishes
            // the checksums of what reaches them.
            self.node.disable_tx_offload(&port)?;
        }
        Ok(())
    }

    /// The spec this topology was built from.
    pub fn spec(&self) -> &SingleNodeSpec {
        &self.spec
    }

    /// The client namespace (interface `eth0`).
    pub fn client(&self) -> &NetNs {
        &self.client
    }

    /// The load-balancer node namespace (interfaces `uplink` and
    /// `br-tasks`).
    pub fn node(&self) -> &NetNs {
        &self.node
    }

    /// The namespace of backend `i`.
    pub fn backend_ns(&self, i: usize) -> &NetNs {
        &self.backends[i]
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The node's address on the client side (X.1), where services listen.
    pub fn node_uplink_ip(&self) -> Ipv4Addr {
        let [a, b, c] = self.spec.uplink_subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The client's address (X.2).
    pub fn client_ip(&self) -> Ipv4Addr {
        let [a, b, c] = self.spec.uplink_subnet;
        Ipv4Addr::new(a, b, c, 2)
    }

    /// Backend `i`'s HTTP address, T.(10+i):http_port.
    pub fn backend_addr(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.task_ip(backend_host(i)), self.spec.http_port)
    }

    /// Backend `i`'s UDP address, T.(10+i):udp_port.
    pub fn backend_udp_addr(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.task_ip(backend_host(i)), self.spec.udp_port)
    }

    /// The name backend `i`'s server puts in its replies: `backend-{i}`.
    pub fn backend_name(&self, i: usize) -> String {
        format!("backend-{i}")
    }

    /// Kills backend `i`'s server (does nothing if it is already stopped),
    /// e.g. to test what the load balancer does with a dead backend.
    pub fn stop_backend(&mut self, i: usize) -> Result<()> {
        self.servers.stop(i)
    }

    /// Starts backend `i`'s server and waits until it is ready (does nothing
    /// if it is already running).
    pub fn start_backend(&mut self, i: usize) -> Result<()> {
        let name = self.backend_name(i);
        self.servers.start(i, &self.backends[i], &name)
    }

    /// T.`host` in the task subnet.
    fn task_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.spec.task_subnet;
        Ipv4Addr::new(a, b, c, host)
    }
}

/// Host octet of backend `i` in the task subnet.
fn backend_host(i: usize) -> u8 {
    u8::try_from(10 + i).expect("backend count is checked in SingleNode::build")
}

/// The `lb-testsrv` processes of a topology, one slot each; a slot is empty
/// while its server is stopped. Dropping it kills them all.
pub struct TestServers {
    slots: Vec<Option<Running>>,
    http_port: u16,
    udp_port: u16,
}

/// A started server and the name it answers with.
struct Running {
    name: String,
    child: Child,
}

impl TestServers {
    /// `count` slots, all stopped, for servers that serve HTTP on TCP
    /// `http_port` and echo on UDP `udp_port` of every address.
    pub fn new(count: usize, http_port: u16, udp_port: u16) -> TestServers {
        TestServers {
            slots: (0..count).map(|_| None).collect(),
            http_port,
            udp_port,
        }
    }

    /// Starts `lb-testsrv --name NAME` in `ns` in slot `i` and waits until
    /// it is ready. Does nothing if slot `i` already runs.
    pub fn start(&mut self, i: usize, ns: &NetNs, name: &str) -> Result<()> {
        if self.slots[i].is_some() {
            return Ok(());
        }
        let server = testsrv_path()?;
        let tcp = format!("0.0.0.0:{}", self.http_port);
        let udp = format!("0.0.0.0:{}", self.udp_port);
        let mut child = ns.spawn([
            server.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--tcp".as_ref(),
            tcp.as_ref(),
            "--udp".as_ref(),
            udp.as_ref(),
        ])?;
        if let Err(e) = wait_ready(&mut child) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context(format!("{name} did not start")));
        }
        self.slots[i] = Some(Running {
            name: name.to_string(),
            child,
        });
        Ok(())
    }

    /// Kills the server of slot `i` (does nothing if it is stopped).
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(Running { name, mut child }) = self.slots[i].take() {
            child
                .kill()
                .with_context(|| format!("cannot kill {name}"))?;
            child
                .wait()
                .with_context(|| format!("cannot reap {name}"))?;
        }
        Ok(())
    }
}

impl Drop for TestServers {
    /// Kills every server; a failure is reported on stderr but never
    /// panics, since drop may run while a failed test is already unwinding.
    fn drop(&mut self) {
        for i in 0..self.slots.len() {
            if let Err(e) = self.stop(i) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// Waits until `child` prints the line `ready`, which lb-testsrv does once
/// its sockets are bound.
///
/// The line is read on a helper thread so that a server that hangs without
/// printing fails the test after [`SERVER_READY_TIMEOUT`] instead of hanging
/// it; killing the child then closes the pipe and ends that thread.
fn wait_ready(child: &mut Child) -> Result<()> {
    let stdout = child.stdout.take().context("server stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let res = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        // The receiver is gone only if wait_ready already gave up.
        let _ = tx.send(res);
    });
    match rx.recv_timeout(SERVER_READY_TIMEOUT) {
        Ok(Ok(line)) if line.trim() == "ready" => Ok(()),
        Ok(Ok(line)) if line.is_empty() => {
            let status = child.wait().context("cannot reap the server")?;
            bail!("server exited before it was ready ({status}); see its stderr above")
        }
        Ok(Ok(line)) => bail!("server printed {line:?} instead of `ready`"),
        Ok(Err(e)) => Err(e).context("cannot read the server's stdout"),
        Err(_) => bail!("server not ready after {SERVER_READY_TIMEOUT:?}"),
    }
}
