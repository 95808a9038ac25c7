//! A LAN as users build one: a bridge in a namespace of its own, and every host (the client,
//! the node, the backends) plugged into it with a plain veth: no program on the bridge ports.
//! The node has a client-side and a backend-side subnet on its one uplink, so both a client's
//! packets (DNATed to a backend) and a backend's replies (reverse-NATed to the client) leave by
//! the interface they came in on: what XDP sends with XDP_TX on a NIC, and must not lose on a
//! veth, whose peer takes XDP_TX frames only while it runs an XDP program.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_tests::{
    Lbctl,
    client::{self, Reply},
    netns::{self, NetNs},
    topology::TestServers,
};

/// Port the backends serve on, and the node publishes.
const BACKEND_PORT: u16 = 8088;
const UDP_PORT: u16 = 5454;
const PUBLISHED: u16 = 9999;

/// Fields drop in order: lbctl purges while its namespace exists, the servers die before theirs.
struct Lan {
    lbctl: Lbctl,
    _servers: TestServers,
    backends: Vec<NetNs>,
    client: NetNs,
    node: NetNs,
    _lan: NetNs,
}

const NODE_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(172, 23, 1, 1);
const NODE_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(172, 23, 2, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 23, 1, 77);

fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 23, 2, 40 + i as u8)
}

impl Lan {
    /// The LAN with `backends` backends, lbctl attached to the node's uplink with
    /// `attach_args`, and a TCP and a UDP service over every backend.
    fn build(backends: usize, attach_args: &[&str]) -> Lan {
        lb_tests::require_root().unwrap();
        let lan = NetNs::new("lan").unwrap();
        lan.ip(["link", "add", "br0", "type", "bridge"]).unwrap();
        lan.ip(["link", "set", "br0", "up"]).unwrap();
        let plug = |host: &NetNs, port: &str, addr: String, gateway: Ipv4Addr| {
            netns::veth(host, "eth0", &lan, port).unwrap();
            lan.ip(["link", "set", port, "master", "br0"]).unwrap();
            host.ip(["addr", "add", &addr, "dev", "eth0"]).unwrap();
            if gateway != Ipv4Addr::UNSPECIFIED {
                let via = gateway.to_string();
                host.ip(["route", "add", "default", "via", &via]).unwrap();
            }
        };
        let node = NetNs::new("node").unwrap();
        plug(
            &node,
            "p-node",
            format!("{NODE_CLIENT_SIDE}/24"),
            Ipv4Addr::UNSPECIFIED,
        );
        node.ip([
            "addr",
            "add",
            &format!("{NODE_BACKEND_SIDE}/24"),
            "dev",
            "eth0",
        ])
        .unwrap();
        let client = NetNs::new("client").unwrap();
        plug(
            &client,
            "p-client",
            format!("{CLIENT}/24"),
            NODE_CLIENT_SIDE,
        );
        let backend_ns: Vec<NetNs> = (0..backends)
            .map(|i| {
                let ns = NetNs::new(&format!("b{i}")).unwrap();
                let addr = format!("{}/24", backend_ip(i));
                plug(&ns, &format!("p-b{i}"), addr, NODE_BACKEND_SIDE);
                ns
            })
            .collect();
        let mut servers = TestServers::new(backends, BACKEND_PORT, UDP_PORT);
        for (i, ns) in backend_ns.iter().enumerate() {
            servers.start(i, ns, &format!("lan-{i}")).unwrap();
        }
        let lbctl = Lbctl::new(&node).unwrap();
        lbctl
            .run(&[&["attach", "eth0"], attach_args].concat())
            .unwrap();
        let published = PUBLISHED.to_string();
        for (name, proto, port) in [("web", "tcp", BACKEND_PORT), ("dns", "udp", UDP_PORT)] {
            let targets: Vec<String> = (0..backends)
                .map(|i| format!("{}:{port}", backend_ip(i)))
                .collect();
            let mut args = vec!["service", "add", name, &published, "--proto", proto];
            args.extend(targets.iter().map(String::as_str));
            lbctl.run(&args).unwrap();
        }
        Lan {
            lbctl,
            _servers: servers,
            backends: backend_ns,
            client,
            node,
            _lan: lan,
        }
    }

    fn reason(&self, reason: &str) -> u64 {
        self.lbctl.reason_packets(reason).unwrap()
    }

    /// Each backend answered `per` of `replies` and saw the client's own address.
    fn assert_spread(&self, replies: &[Reply], per: usize) {
        for reply in replies {
            assert_eq!(*reply.client_seen.ip(), CLIENT, "client IP kept: {reply:?}");
        }
        let counts = client::per_backend(replies);
        assert_eq!(counts.len(), self.backends.len(), "{counts:?}");
        assert!(counts.values().all(|&n| n == per), "{counts:?}");
    }
}

/// Connections and datagrams to the published port go to backends on the same link and back,
/// each frame sent out through TC (XDP's own transmission would leave it in the bridge port's
/// queue), exactly evenly, with the client's address kept, and no transmit failure.
fn serves_on_the_same_link(backends: usize, attach_args: &[&str]) {
    let lan = Lan::build(backends, attach_args);
    // Resolve the backends' and the client's neighbours, as any traffic would: XDP cannot.
    for i in 0..backends {
        lan.node
            .exec(["ping", "-c1", "-W1", &backend_ip(i).to_string()])
            .unwrap();
    }
    lan.node
        .exec(["ping", "-c1", "-W1", &CLIENT.to_string()])
        .unwrap();
    let per = 6;
    let addr = SocketAddrV4::new(NODE_CLIENT_SIDE, PUBLISHED);
    let replies = lan
        .client
        .in_netns(|| client::new_connections(addr, per * backends))
        .unwrap();
    lan.assert_spread(&replies, per);
    let datagrams = lan
        .client
        .in_netns(|| client::udp_requests(addr, per * backends))
        .unwrap();
    lan.assert_spread(&datagrams, per);

    let forwarded = lan.reason("forward_tx");
    let replied = lan.reason("reply_tx");
    assert!(
        forwarded > 0 && replied > 0,
        "{forwarded} forwarded, {replied} replies"
    );
    assert_eq!(
        lan.reason("xmit_tc"),
        forwarded + replied,
        "every frame through TC"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&lan.lbctl.run(&["stats", "--json"]).unwrap()).unwrap();
    let uplink = &stats["interfaces"][0];
    assert_eq!(uplink["iface"], "eth0", "{stats}");
    assert_eq!(uplink["transmit"], "tc", "{stats}");
    for kind in ["dropped", "errors", "xdp_errors"] {
        assert_eq!(uplink["tx_failures"][kind], 0, "{kind}: {stats}");
    }
}

#[test]
fn native_xdp_on_a_veth_serves_backends_on_the_same_link() {
    serves_on_the_same_link(3, &[]);
}

#[test]
fn generic_xdp_serves_backends_on_the_same_link_too() {
    serves_on_the_same_link(2, &["--mode", "generic"]);
}

/// A backend that is itself a client of the service (a task calling its own service through the
/// node) reaches every backend, itself included, exactly evenly, over TCP and UDP: given
/// itself it would answer its own address, and given another backend on its subnet that one
/// would answer it straight over the link, never through the node's reverse NAT. Both are
/// hairpin flows: they reach the backend from the node's address (the one connected to) and a
/// hairpin port, and the replies come back through the node.
#[test]
fn a_backend_calling_the_service_reaches_every_backend_itself_included() {
    let backends = 3;
    let lan = Lan::build(backends, &[]);
    let addr = SocketAddrV4::new(NODE_BACKEND_SIDE, PUBLISHED);
    let per = 4;
    let caller = &lan.backends[0];
    let check = |replies: &[Reply], what: &str| {
        for reply in replies {
            assert_eq!(
                *reply.client_seen.ip(),
                NODE_BACKEND_SIDE,
                "{what}: {reply:?}"
            );
            assert!(
                reply.client_seen.port() >= lb_common::SNAT_PORT_FIRST,
                "{what}: a hairpin port: {reply:?}"
            );
        }
        let counts = client::per_backend(replies);
        assert_eq!(counts.len(), backends, "{what}: {counts:?}");
        assert!(counts.values().all(|&n| n == per), "{what}: {counts:?}");
    };
    let replies = caller.in_netns(|| client::new_connections(addr, per * backends));
    if replies.is_err() {
        eprintln!("DEBUG {}", lan.lbctl.run(&["stats"]).unwrap());
        eprintln!("DEBUG {}", lan.lbctl.run(&["flows"]).unwrap_or_default());
        let out = lan
            .node
            .exec(["bpftool", "map", "dump", "pinned", "/sys/fs/bpf/lbctl"]);
        eprintln!("DEBUG {out:?}");
    }
    let replies = replies.unwrap();
    check(&replies, "TCP");
    let datagrams = caller
        .in_netns(|| client::udp_requests(addr, per * backends))
        .unwrap();
    check(&datagrams, "UDP");
    let stats: serde_json::Value =
        serde_json::from_str(&lan.lbctl.run(&["stats", "--json"]).unwrap()).unwrap();
    assert_eq!(
        stats["events"]["flow_hairpin"],
        2 * per * backends,
        "every flow a hairpin flow: {stats}"
    );
    // The client on the node's other subnet still reaches them with its own address.
    let replies = lan
        .client
        .in_netns(|| client::new_connections(SocketAddrV4::new(NODE_CLIENT_SIDE, PUBLISHED), 3))
        .unwrap();
    for reply in &replies {
        assert_eq!(*reply.client_seen.ip(), CLIENT, "client IP kept: {reply:?}");
    }
}

/// Asked for XDP's own transmission on a veth, `attach` says why that may lose frames and what
/// to do, and still does what it was told.
#[test]
fn transmit_xdp_on_a_veth_warns_with_the_reason_and_the_way_out() {
    let lan = Lan::build(1, &[]);
    // Chosen by lbctl, the transmit path is chosen again, for the same reason, by an upgrade.
    let veth_reason = "XDP hands its frames to TC ingress to send: a veth";
    let out = lan.lbctl.run(&["upgrade"]).unwrap();
    assert!(out.contains(veth_reason), "{out}");
    let out = lan
        .lbctl
        .run(&["attach", "eth0", "--transmit", "xdp"])
        .unwrap();
    assert!(
        out.contains("warning: eth0 is a veth")
            && out.contains("XDP program")
            && out.contains("Leave out --transmit xdp"),
        "{out}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&lan.lbctl.run(&["stats", "--json"]).unwrap()).unwrap();
    assert_eq!(stats["interfaces"][0]["transmit"], "xdp", "{stats}");
    assert_eq!(stats["interfaces"][0]["xdp_mode"], "native", "{stats}");
    // Asked for, it is kept as asked.
    let out = lan.lbctl.run(&["upgrade"]).unwrap();
    assert!(
        out.contains("XDP sends its frames itself: as asked"),
        "{out}"
    );
}

/// Frames XDP counted as sent but the driver could not send are counted as the interface's
/// transmit failures: with `--transmit xdp`, a veth whose peer runs no XDP (and so has no
/// NAPI to take them) refuses every frame XDP_TX gives it, and `stats` says so.
#[test]
fn frames_the_driver_refuses_are_counted_as_transmit_failures() {
    let lan = Lan::build(1, &["--transmit", "xdp"]);
    lan.node
        .exec(["ping", "-c1", "-W1", &backend_ip(0).to_string()])
        .unwrap();
    let sent = 50;
    let addr = SocketAddrV4::new(NODE_CLIENT_SIDE, PUBLISHED);
    lan.client.in_netns(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..sent {
            socket.send_to(b"lost?", addr).unwrap();
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let forwarded = lan.reason("forward_tx");
    assert_eq!(forwarded, sent, "counted as sent by XDP_TX");
    let stats: serde_json::Value =
        serde_json::from_str(&lan.lbctl.run(&["stats", "--json"]).unwrap()).unwrap();
    let failures = &stats["interfaces"][0]["tx_failures"];
    assert_eq!(failures["xdp_errors"], sent, "{stats}");
    let text = lan.lbctl.run(&["stats"]).unwrap();
    assert!(
        text.contains("eth0: native XDP, XDP sends; transmit failures:")
            && text.contains(&format!("{sent} XDP errors")),
        "{text}"
    );
}

/// The node's own connections never take a published port as their source port (it is
/// reserved from the ephemeral ports, `net.ipv4.ip_local_reserved_ports`): their replies would
/// otherwise be taken for the service's new flows and sent to a backend. With the node's
/// ephemeral range narrowed to the published port and the next one, every exchange the node
/// makes itself gets its reply; `purge` gives the reservation back.
#[test]
fn the_nodes_own_connections_never_take_a_published_port() {
    let lan = Lan::build(1, &[]);
    let reserved = |lan: &Lan| {
        let out = lan
            .node
            .exec(["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(reserved(&lan), PUBLISHED.to_string());
    let next = (PUBLISHED + 1).to_string();
    lan.node
        .sysctl(
            "net.ipv4.ip_local_port_range",
            &format!("{PUBLISHED} {next}"),
        )
        .unwrap();
    let echo = SocketAddrV4::new(backend_ip(0), UDP_PORT);
    for i in 0..6 {
        let reply = lan
            .node
            .in_netns(|| client::udp_request(echo))
            .unwrap_or_else(|err| panic!("exchange {i}: {err:#}"));
        assert_ne!(reply.client_seen.port(), PUBLISHED, "exchange {i}");
    }
    lan.lbctl.run(&["service", "rm", "web"]).unwrap();
    assert_eq!(reserved(&lan), PUBLISHED.to_string(), "dns still needs it");
    // The next port too: the kernel lists the two as one range, which stays lbctl's.
    let echo_text = echo.to_string();
    lan.lbctl
        .run(&[
            "service", "add", "near", &next, &echo_text, "--proto", "udp",
        ])
        .unwrap();
    assert_eq!(reserved(&lan), format!("{PUBLISHED}-{next}"));
    lan.lbctl.run(&["purge"]).unwrap();
    assert_eq!(reserved(&lan), "");
    let state_dir = lan.lbctl.state_dir();
    assert!(!state_dir.exists(), "purge left {}", state_dir.display());
}
