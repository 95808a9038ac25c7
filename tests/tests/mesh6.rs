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
//! tasks: only the mesh reaches them.

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
    let files = Files(std::env::temp_dir().join(format!("lbctl-mesh6-{}", std::process::id())));
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
            "%{size_download}",
            &url,
        ])
        .unwrap();
    let size = String::from_utf8_lossy(&out.stdout).into_owned();
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
