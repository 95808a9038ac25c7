//! IPv6 end to end, as a user builds it: a client, a node and three backends in namespaces of
//! their own, joined by veths, with IPv6 addresses only where IPv6 is said; real servers
//! (`lb-testsrv`, answering with its name and the client address it saw), real clients (`curl
//! -6`). A dual-stack service is used from both families at once.
//!
//! ```text
//!  client ──────────────── node ─────────────── backend b0/b1/b2
//!  2001:db8:a::2      2001:db8:a::1  2001:db8:b::1     2001:db8:b::10/11/12 (a bridge)
//!  172.20.1.2         172.20.1.1     172.20.2.1        172.20.2.10/11/12
//!                     (lbctl on "uplink")
//! ```
use std::collections::BTreeMap;

use lb_tests::{
    Lbctl, Processes,
    client::{curl_answers as get, spread_by_name as spread, wait_for_url},
    netns::{self, NetNs},
};

const NODE6: &str = "2001:db8:a::1";
const CLIENT6: &str = "2001:db8:a::2";
const NODE4: &str = "172.20.1.1";

struct Net {
    client: NetNs,
    node: NetNs,
    backends: Vec<NetNs>,
    _bridge: NetNs,
}

/// Builds the namespaces and starts a server on every backend, on both families.
fn build() -> (Net, Processes) {
    lb_tests::require_root().unwrap();
    let client = NetNs::new("c6").unwrap();
    let node = NetNs::new("n6").unwrap();
    let bridge = NetNs::new("sw6").unwrap();
    netns::veth(&client, "eth0", &node, "uplink").unwrap();
    netns::veth(&node, "down0", &bridge, "pnode").unwrap();
    bridge.ip(["link", "add", "br0", "type", "bridge"]).unwrap();
    bridge.ip(["link", "set", "br0", "up"]).unwrap();
    bridge
        .ip(["link", "set", "pnode", "master", "br0"])
        .unwrap();
    let nodad = |ns: &NetNs, addr: &str, dev: &str| {
        ns.ip(["addr", "add", addr, "dev", dev, "nodad"]).unwrap();
    };
    nodad(&client, "2001:db8:a::2/64", "eth0");
    client
        .ip(["addr", "add", "172.20.1.2/24", "dev", "eth0"])
        .unwrap();
    client
        .ip(["-6", "route", "add", "default", "via", NODE6])
        .unwrap();
    client
        .ip(["route", "add", "default", "via", NODE4])
        .unwrap();
    nodad(&node, "2001:db8:a::1/64", "uplink");
    nodad(&node, "2001:db8:b::1/64", "down0");
    node.ip(["addr", "add", "172.20.1.1/24", "dev", "uplink"])
        .unwrap();
    node.ip(["addr", "add", "172.20.2.1/24", "dev", "down0"])
        .unwrap();
    node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    node.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let server = lb_tests::testsrv_path().unwrap();
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for i in 0..3 {
        let backend = NetNs::new(&format!("b6{i}")).unwrap();
        let port = format!("p{i}");
        netns::veth(&backend, "eth0", &bridge, &port).unwrap();
        bridge.ip(["link", "set", &port, "master", "br0"]).unwrap();
        nodad(&backend, &format!("2001:db8:b::1{i}/64"), "eth0");
        backend
            .ip(["addr", "add", &format!("172.20.2.1{i}/24"), "dev", "eth0"])
            .unwrap();
        backend
            .ip(["-6", "route", "add", "default", "via", "2001:db8:b::1"])
            .unwrap();
        backend
            .ip(["route", "add", "default", "via", "172.20.2.1"])
            .unwrap();
        let name = format!("b{i}");
        // One socket for both families: an IPv4 client is seen as ::ffff:A.B.C.D, which the
        // server prints canonically (A.B.C.D).
        servers.push(
            backend
                .spawn([
                    server.to_str().unwrap(),
                    "--name",
                    &name,
                    "--tcp",
                    "[::]:80",
                ])
                .unwrap(),
        );
        backends.push(backend);
    }
    let net = Net {
        client,
        node,
        backends,
        _bridge: bridge,
    };
    (net, Processes(servers))
}

/// An IPv6 service on every address of the node: new connections take the three IPv6
/// backends in turn, exactly, and each backend sees the client's own IPv6 address. A
/// dual-stack service used from both families at once keeps each family on its own backends
/// and rotation. An IPv4-only service refuses IPv6 clients with its own reason.
#[test]
fn ipv6_clients_are_balanced_over_ipv6_backends_and_keep_their_address() {
    let (net, _servers) = build();
    let lbctl = Lbctl::new(&net.node).unwrap();
    lbctl.run(&["attach", "uplink"]).unwrap();
    let v6: Vec<String> = (0..3).map(|i| format!("[2001:db8:b::1{i}]:80")).collect();
    let mut args = vec!["service", "add", "web6", "8080"];
    args.extend(v6.iter().map(String::as_str));
    lbctl.run(&args).unwrap();
    // Wait for the servers.
    let url6 = format!("http://[{NODE6}]:8080/");
    wait_for_url(&net.client, &url6);
    let answers = get(&net.client, &url6, 9);
    println!("IPv6 spread: {:?}", spread(&answers));
    // The warm-up request took a turn: the spread is exact either way.
    assert_eq!(spread(&answers).values().collect::<Vec<_>>(), [&3, &3, &3]);
    for (name, address) in &answers {
        assert_eq!(address, CLIENT6, "{name} saw {address}");
    }
    let listed = lbctl.run(&["service", "ls"]).unwrap();
    assert!(listed.contains("[2001:db8:b::10]:80"), "{listed}");

    // Dual stack: the same service name space, one service with both families' backends.
    let mut args = vec!["service", "add", "both", "8081"];
    args.extend(v6[..2].iter().map(String::as_str));
    args.extend(["172.20.2.10:80", "172.20.2.12:80"]);
    lbctl.run(&args).unwrap();
    let url4 = format!("http://{NODE4}:8081/");
    let url6 = format!("http://[{NODE6}]:8081/");
    let (four, six) = std::thread::scope(|scope| {
        let four = scope.spawn(|| get(&net.client, &url4, 8));
        let six = scope.spawn(|| get(&net.client, &url6, 8));
        (four.join().unwrap(), six.join().unwrap())
    });
    println!(
        "dual stack: IPv4 {:?}, IPv6 {:?}",
        spread(&four),
        spread(&six)
    );
    assert_eq!(
        spread(&four),
        BTreeMap::from([("b0".into(), 4), ("b2".into(), 4)])
    );
    assert_eq!(
        spread(&six),
        BTreeMap::from([("b0".into(), 4), ("b1".into(), 4)])
    );
    assert!(four.iter().all(|(_, a)| a == "172.20.1.2"), "{four:?}");
    assert!(six.iter().all(|(_, a)| a == CLIENT6), "{six:?}");

    // A service with IPv4 backends only: IPv6 clients are dropped, counted as such.
    lbctl
        .run(&["service", "add", "v4only", "8082", "172.20.2.11:80"])
        .unwrap();
    let out = net
        .client
        .exec([
            "curl",
            "-s",
            "-g",
            "-m",
            "1",
            &format!("http://[{NODE6}]:8082/"),
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(lbctl.reason_packets("drop_no_backend_of_family").unwrap() >= 1);
    assert_eq!(
        get(&net.client, &format!("http://{NODE4}:8082/"), 1)[0].0,
        "b1"
    );
    drop(net.backends);
    let mut lbctl = lbctl;
    lbctl.purge().unwrap();
}

/// A path to the backends narrower than the client's (a route with a locked MTU of 1,400 on the
/// node): the kernel's "packet too big" about the client's forwarded segments is translated on
/// its way out (TC), so the client's stack matches it to its connection, lowers its path MTU
/// and a 2 MiB upload arrives whole. Untranslated, it quotes a packet to the backend, which the
/// client never sent, and the upload stalls on full-size segments.
#[test]
fn an_ipv6_client_learns_a_narrower_path_to_its_backend_and_its_upload_arrives() {
    let (net, _servers) = build();
    let lbctl = Lbctl::new(&net.node).unwrap();
    lbctl.run(&["attach", "uplink"]).unwrap();
    lbctl
        .run(&["service", "add", "up6", "8080", "[2001:db8:b::10]:80"])
        .unwrap();
    net.node
        .ip([
            "-6",
            "route",
            "add",
            "2001:db8:b::10/128",
            "dev",
            "down0",
            "mtu",
            "lock",
            "1400",
        ])
        .unwrap();
    let url = format!("http://[{NODE6}]:8080/");
    wait_for_url(&net.client, &url);
    let file = std::env::temp_dir().join(format!("lbctl-ipv6-upload-{}", std::process::id()));
    std::fs::write(&file, vec![0x5a; 2 << 20]).unwrap();
    let out = net
        .client
        .exec([
            "curl",
            "-s",
            "-g",
            "-m",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload}",
            "--data-binary",
            &format!("@{}", file.display()),
            &url,
        ])
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("upload: {answer}");
    // lb-testsrv reads the whole body, then refuses anything but GET.
    assert_eq!(answer, format!("405 {}", 2 << 20), "{out:?}");
    let translated = lbctl.reason_packets("icmp_egress").unwrap();
    println!("ICMPv6 errors translated: {translated}");
    assert!(translated >= 1);
    let mut lbctl = lbctl;
    lbctl.purge().unwrap();
}
