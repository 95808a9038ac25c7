//! IPv6 through the mesh, as a user builds it: three nodes on one underlay segment (a bridge of
//! plain veths) whose node addresses are IPv4, an IPv6 client on the same segment, and IPv6
//! tasks behind n1 and n2 on plain veths at the underlay's MTU (1500, as users leave them). The
//! client reaches every task through every node's IPv6 address; packets to a task on another
//! node cross the underlay inside VXLAN over IPv4, and its replies come back the same way.
//!
//! ```text
//!                         underlay ns: br0 (no address)
//!        ┌──────────────────┬──────────┴───────┬──────────────────┐
//!     client               n1                 n2                 n3
//!  PFX::100/64       uplink PFX::10       uplink PFX::11     uplink PFX::12
//!                    10.61.0.10/24        10.61.0.11/24      10.61.0.12/24
//!                    br-tasks TASKS::1    br-tasks TASKS::1  (no task)
//!                     ├ t0 TASKS::10       ├ t2 TASKS::12
//!                     └ t1 TASKS::11       └ t3 TASKS::13
//! ```
//!
//! Every node has the same task gateway and forwards, but knows no route to the other nodes'
//! tasks: only the mesh reaches them. The tasks and the client have IPv4 addresses too
//! (TASKS4.1k, 10.61.0.100), for the second test: the same mesh over its IPv6 underlay (node
//! addresses PFX::1i), carrying clients of both families.

use lb_tests::{
    Lbctl, Processes,
    client::{curl_answers as get, spread_by_name as spread, wait_for_url},
    netns::{self, NetNs},
};

const UNDERLAY6: &str = "2001:db8:61";
const TASKS6: &str = "fd00:61";
const NODES: usize = 3;
/// The node each task runs on.
const TASK_NODES: [usize; 4] = [0, 0, 1, 1];

fn node_ip6(i: usize) -> String {
    format!("{UNDERLAY6}::1{i}")
}

fn node_ip4(i: usize) -> String {
    format!("10.61.0.1{i}")
}

fn client_ip6() -> String {
    format!("{UNDERLAY6}::100")
}

const TASKS4: &str = "10.62.0";

fn client_ip4() -> String {
    "10.61.0.100".to_owned()
}

fn task_ip4(k: usize) -> String {
    format!("{TASKS4}.1{k}")
}

fn task_ip6(k: usize) -> String {
    format!("{TASKS6}::1{k}")
}

/// The namespaces, the test server of each task (HTTP on port 80 and UDP on 5353, both
/// families) and `busybox httpd` on port 81 of task 2 (n2), serving `big`.
struct Net {
    _processes: Processes,
    client: NetNs,
    nodes: Vec<NetNs>,
    _tasks: Vec<NetNs>,
    _underlay: NetNs,
    _files: Files,
}

/// The folder `busybox httpd` serves, removed with the test.
struct Files(std::path::PathBuf);

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BIG_LEN: usize = 2 << 20;

fn build() -> Net {
    lb_tests::require_root().unwrap();
    let underlay = NetNs::new("u6m").unwrap();
    underlay
        .ip(["link", "add", "br0", "type", "bridge"])
        .unwrap();
    underlay.ip(["link", "set", "br0", "up"]).unwrap();
    let nodad = |ns: &NetNs, addr: &str, dev: &str| {
        ns.ip(["addr", "add", addr, "dev", dev, "nodad"]).unwrap();
    };
    let plug = |ns: &NetNs, ifname: &str, port: &str| {
        netns::veth(ns, ifname, &underlay, port).unwrap();
        underlay.ip(["link", "set", port, "master", "br0"]).unwrap();
    };
    let client = NetNs::new("c6m").unwrap();
    plug(&client, "eth0", "pc");
    nodad(&client, &format!("{}/64", client_ip6()), "eth0");
    client
        .ip([
            "addr",
            "add",
            &format!("{}/24", client_ip4()),
            "dev",
            "eth0",
        ])
        .unwrap();
    // One folder per build: the tests of this file run at once in one process.
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let build = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let files =
        Files(std::env::temp_dir().join(format!("lbctl-mesh6-{}-{build}", std::process::id())));
    std::fs::create_dir_all(&files.0).unwrap();
    let big: Vec<u8> = (0..BIG_LEN).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(files.0.join("big"), big).unwrap();
    let server = lb_tests::testsrv_path().unwrap();
    let mut processes = Vec::new();
    let mut nodes = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..NODES {
        let node = NetNs::new(&format!("n{}m6", i + 1)).unwrap();
        plug(&node, "uplink", &format!("pn{i}"));
        nodad(&node, &format!("{}/64", node_ip6(i)), "uplink");
        node.ip([
            "addr",
            "add",
            &format!("{}/24", node_ip4(i)),
            "dev",
            "uplink",
        ])
        .unwrap();
        node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        node.ip(["link", "add", "br-tasks", "type", "bridge"])
            .unwrap();
        node.ip(["link", "set", "br-tasks", "up"]).unwrap();
        nodad(&node, &format!("{TASKS6}::1/64"), "br-tasks");
        node.ip(["addr", "add", &format!("{TASKS4}.1/24"), "dev", "br-tasks"])
            .unwrap();
        nodes.push(node);
    }
    for (k, &i) in TASK_NODES.iter().enumerate() {
        let task = NetNs::new(&format!("t{k}m6")).unwrap();
        let port = format!("vt{k}");
        netns::veth(&task, "eth0", &nodes[i], &port).unwrap();
        nodes[i]
            .ip(["link", "set", &port, "master", "br-tasks"])
            .unwrap();
        nodad(&task, &format!("{}/64", task_ip6(k)), "eth0");
        task.ip(["addr", "add", &format!("{}/24", task_ip4(k)), "dev", "eth0"])
            .unwrap();
        task.ip(["route", "add", "default", "via", &format!("{TASKS4}.1")])
            .unwrap();
        task.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{TASKS6}::1"),
        ])
        .unwrap();
        let name = format!("task-{k}");
        processes.push(
            task.spawn([
                server.to_str().unwrap(),
                "--name",
                &name,
                "--tcp",
                "[::]:80",
                "--udp",
                "[::]:5353",
            ])
            .unwrap(),
        );
        if k == 2 {
            let dir = files.0.to_str().unwrap();
            processes.push(
                task.spawn(["busybox", "httpd", "-f", "-p", "[::]:81", "-h", dir])
                    .unwrap(),
            );
        }
        tasks.push(task);
    }
    Net {
        _processes: Processes(processes),
        client,
        nodes,
        _tasks: tasks,
        _underlay: underlay,
        _files: files,
    }
}

/// Downloads `url` with curl from `client`: the bytes it got, as curl counts them, and curl's
/// output.
fn download(client: &NetNs, url: &str) -> (String, std::process::Output) {
    let out = client
        .exec([
            "curl",
            "-s",
            "-g",
            "-m",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            url,
        ])
        .unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), out)
}

/// An IPv6 service whose tasks run on n1 and n2, published on every node: new connections
/// through each node take the four tasks in turn, exactly, wherever they run, and every task
/// sees the client's own IPv6 address. A UDP service answers through the node without tasks. A
/// 2 MiB download from a task on n2 through n1 completes although the task's link has the
/// underlay's MTU: the SYN-ACK's MSS is clamped to what fits the tunnel (1500 − 50 − 60).
#[test]
fn ipv6_clients_reach_every_task_through_every_node_over_an_ipv4_underlay() {
    let net = build();
    let mut lbctl = Vec::new();
    let tcp: Vec<String> = TASK_NODES
        .iter()
        .enumerate()
        .map(|(k, &i)| format!("[{}]:80@n{}", task_ip6(k), i + 1))
        .collect();
    let udp: Vec<String> = TASK_NODES
        .iter()
        .enumerate()
        .map(|(k, &i)| format!("[{}]:5353@n{}", task_ip6(k), i + 1))
        .collect();
    for node in &net.nodes {
        let l = Lbctl::new(node).unwrap();
        l.run(&["attach", "uplink"]).unwrap();
        for j in 0..NODES {
            l.run(&["node", "add", &format!("n{}", j + 1), &node_ip4(j)])
                .unwrap();
        }
        let mut args = vec!["service", "add", "web", "8080"];
        args.extend(tcp.iter().map(String::as_str));
        l.run(&args).unwrap();
        let mut args = vec!["service", "add", "dns", "5353", "--proto", "udp"];
        args.extend(udp.iter().map(String::as_str));
        l.run(&args).unwrap();
        let files = format!("[{}]:81@n2", task_ip6(2));
        l.run(&["service", "add", "files", "8081", &files]).unwrap();
        lbctl.push(l);
    }
    for i in 0..NODES {
        let url = format!("http://[{}]:8080/", node_ip6(i));
        wait_for_url(&net.client, &url);
        let answers = get(&net.client, &url, 8);
        println!("through n{}: {:?}", i + 1, spread(&answers));
        assert_eq!(
            spread(&answers),
            (0..4).map(|k| (format!("task-{k}"), 2)).collect(),
            "through n{}",
            i + 1
        );
        for (name, address) in &answers {
            assert_eq!(*address, client_ip6(), "{name} through n{}", i + 1);
        }
    }
    // Across the mesh both ways: n1 and n3 encapsulated to the tasks' nodes; n1 and n2
    // decapsulated the replies of the flows n2 and n1 balanced.
    for (i, reason) in [
        (0, "forward_encap_redirect"),
        (2, "forward_encap_redirect"),
        (1, "reply_encap"),
        (0, "reply_encap"),
    ] {
        let tx = lbctl[i]
            .reason_packets(&reason.replace("redirect", "tx"))
            .unwrap();
        let packets = lbctl[i].reason_packets(reason).unwrap() + tx;
        assert!(packets > 0, "n{}: {reason}", i + 1);
    }

    // UDP through the node without tasks.
    let to = format!("UDP6:[{}]:5353", node_ip6(2));
    let out = net
        .client
        .exec(["sh", "-c", &format!("echo hi | socat -t 2 - {to}")])
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("UDP through n3: {answer:?}");
    assert!(answer.starts_with("task-"), "{out:?}");
    assert!(
        answer.contains(&format!("{}:", client_ip6())),
        "the task saw the client's address: {answer:?}"
    );

    // A download at the tasks' full MTU, through n1 to n2's task.
    let url = format!("http://[{}]:8081/big", node_ip6(0));
    let (size, out) = download(&net.client, &url);
    println!("download through n1: {size} bytes");
    assert_eq!(size, BIG_LEN.to_string(), "{out:?}");
    for (i, l) in lbctl.iter().enumerate() {
        assert_eq!(
            l.reason_packets("drop_encap_mtu").unwrap(),
            0,
            "n{}: nothing too big to encapsulate",
            i + 1
        );
    }
    let shown = lbctl[0].run(&["mesh", "show"]).unwrap();
    let path = format!(
        "to n2 ({}): path MTU 1500, overlay MTU 1450, TCP MSS at most 1410 (IPv6 1390)",
        node_ip4(1)
    );
    assert!(shown.contains(&path), "{shown}");
    for mut l in lbctl {
        l.purge().unwrap();
    }
}

/// The same mesh over its IPv6 underlay: every node is added by its IPv6 address, and a
/// dual-stack service (IPv4 and IPv6 tasks on n1 and n2) is used by an IPv4 and an IPv6
/// client through each node. Each family's new connections take that family's four tasks in
/// turn, exactly, every task sees its client's own address, and the packets to and from the
/// other nodes cross the underlay as VXLAN over IPv6 (70 bytes: the SYN-ACK's MSS is clamped
/// to 1500 − 70 − 40 for IPv4, − 60 for IPv6, and 2 MiB downloads of both families complete).
#[test]
fn clients_of_both_families_reach_every_task_over_an_ipv6_underlay() {
    let net = build();
    let mut lbctl = Vec::new();
    let mut web: Vec<String> = Vec::new();
    let mut dns: Vec<String> = Vec::new();
    for (k, &i) in TASK_NODES.iter().enumerate() {
        web.push(format!("{}:80@n{}", task_ip4(k), i + 1));
        web.push(format!("[{}]:80@n{}", task_ip6(k), i + 1));
        dns.push(format!("{}:5353@n{}", task_ip4(k), i + 1));
    }
    for node in &net.nodes {
        let l = Lbctl::new(node).unwrap();
        l.run(&["attach", "uplink"]).unwrap();
        for j in 0..NODES {
            l.run(&["node", "add", &format!("n{}", j + 1), &node_ip6(j)])
                .unwrap();
        }
        let mut args = vec!["service", "add", "web", "8080"];
        args.extend(web.iter().map(String::as_str));
        l.run(&args).unwrap();
        let mut args = vec!["service", "add", "dns", "5353", "--proto", "udp"];
        args.extend(dns.iter().map(String::as_str));
        l.run(&args).unwrap();
        let files = [
            format!("{}:81@n2", task_ip4(2)),
            format!("[{}]:81@n2", task_ip6(2)),
        ];
        l.run(&["service", "add", "files", "8081", &files[0], &files[1]])
            .unwrap();
        lbctl.push(l);
    }
    for i in 0..NODES {
        for (node_url, client) in [
            (format!("http://{}:8080/", node_ip4(i)), client_ip4()),
            (format!("http://[{}]:8080/", node_ip6(i)), client_ip6()),
        ] {
            wait_for_url(&net.client, &node_url);
            let answers = get(&net.client, &node_url, 8);
            println!("{node_url}: {:?}", spread(&answers));
            assert_eq!(
                spread(&answers),
                (0..4).map(|k| (format!("task-{k}"), 2)).collect(),
                "{node_url}"
            );
            for (name, address) in &answers {
                assert_eq!(*address, client, "{name} through {node_url}");
            }
        }
    }
    for (i, reason) in [
        (0, "forward_encap_redirect"),
        (2, "forward_encap_redirect"),
        (1, "reply_encap"),
        (0, "reply_encap"),
    ] {
        let tx = lbctl[i]
            .reason_packets(&reason.replace("redirect", "tx"))
            .unwrap();
        let packets = lbctl[i].reason_packets(reason).unwrap() + tx;
        assert!(packets > 0, "n{}: {reason}", i + 1);
    }
    // IPv4 UDP through the node without tasks.
    let to = format!("UDP4:{}:5353", node_ip4(2));
    let out = net
        .client
        .exec(["sh", "-c", &format!("echo hi | socat -t 2 - {to}")])
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("UDP through n3: {answer:?}");
    assert!(answer.starts_with("task-"), "{out:?}");
    assert!(
        answer.contains(&format!("{}:", client_ip4())),
        "the task saw the client's address: {answer:?}"
    );
    for url in [
        format!("http://{}:8081/big", node_ip4(0)),
        format!("http://[{}]:8081/big", node_ip6(0)),
    ] {
        let (size, out) = download(&net.client, &url);
        println!("download {url}: {size} bytes");
        assert_eq!(size, BIG_LEN.to_string(), "{url}: {out:?}");
    }
    for (i, l) in lbctl.iter().enumerate() {
        assert_eq!(
            l.reason_packets("drop_encap_mtu").unwrap(),
            0,
            "n{}: nothing too big to encapsulate",
            i + 1
        );
        assert_eq!(
            l.reason_packets("drop_vxlan_unknown_source").unwrap(),
            0,
            "n{}: every node known by its IPv6 address",
            i + 1
        );
    }
    let shown = lbctl[0].run(&["mesh", "show"]).unwrap();
    println!("{shown}");
    let path = format!(
        "to n2 ({}): path MTU 1500, overlay MTU 1430, TCP MSS at most 1390 (IPv6 1370)",
        node_ip6(1)
    );
    assert!(shown.contains(&path), "{shown}");
    for mut l in lbctl {
        l.purge().unwrap();
    }
}
