//! Path MTU discovery through the load balancer, end to end: a narrower hop behind the node
//! (towards the backend) and one in front of it (towards the client), each answering a
//! full-size segment with the kernel's own ICMP "fragmentation needed". The node translates
//! the error for the socket it is about, so a large upload and a large download both complete;
//! with the routers' errors dropped (the black hole an untranslated error is to the socket it
//! does not match), the same transfers hang.
//!
//! ```text
//!  client ── rc ──────────── node ───────── rb ──────────── backend
//!  .1.2   .1.1  .2.1      .2.2  .3.1     .3.2  .4.1         .4.10
//!         (route to the        (lbctl on     (route to the backend:
//!          client: mtu 1400)    uplink)       mtu 1300)
//! ```
//! Every interface has an MTU of 1500, so each end advertises an MSS of 1460 and sends
//! full-size segments: only path MTU discovery can make them fit.
use std::time::Duration;

use lb_tests::{
    Lbctl,
    netns::{self, NetNs},
};

const CLIENT: &str = "172.16.1.2";
const NODE: &str = "172.16.2.2";
const BACKEND: &str = "172.16.4.10";
/// The route MTUs of the narrow hops.
const CLIENT_SIDE_MTU: &str = "1400";
const BACKEND_SIDE_MTU: &str = "1300";
const FILE_LEN: usize = 2 << 20;

struct Path {
    client: NetNs,
    rc: NetNs,
    node: NetNs,
    rb: NetNs,
    backend: NetNs,
    dir: std::path::PathBuf,
}

impl Path {
    fn build() -> Path {
        lb_tests::require_root().unwrap();
        let path = Path {
            client: NetNs::new("client").unwrap(),
            rc: NetNs::new("rc").unwrap(),
            node: NetNs::new("node").unwrap(),
            rb: NetNs::new("rb").unwrap(),
            backend: NetNs::new("backend").unwrap(),
            dir: std::env::temp_dir().join(format!("lbt-pmtu-{}", std::process::id())),
        };
        let link = |a: &NetNs, a_if: &str, a_ip: &str, b: &NetNs, b_if: &str, b_ip: &str| {
            netns::veth(a, a_if, b, b_if).unwrap();
            a.ip(["addr", "add", a_ip, "dev", a_if]).unwrap();
            b.ip(["addr", "add", b_ip, "dev", b_if]).unwrap();
            // Whole checksums on the wire, as real hosts send them (see `disable_tx_offload`).
            a.disable_tx_offload(a_if).unwrap();
            b.disable_tx_offload(b_if).unwrap();
        };
        link(
            &path.client,
            "eth0",
            "172.16.1.2/24",
            &path.rc,
            "rc0",
            "172.16.1.1/24",
        );
        link(
            &path.rc,
            "rc1",
            "172.16.2.1/24",
            &path.node,
            "uplink",
            "172.16.2.2/24",
        );
        link(
            &path.node,
            "tasks",
            "172.16.3.1/24",
            &path.rb,
            "rb0",
            "172.16.3.2/24",
        );
        link(
            &path.rb,
            "rb1",
            "172.16.4.1/24",
            &path.backend,
            "eth0",
            "172.16.4.10/24",
        );
        let route = |ns: &NetNs, args: &[&str]| {
            let mut all = vec!["route", "add"];
            all.extend_from_slice(args);
            ns.ip(all).unwrap();
        };
        route(&path.client, &["default", "via", "172.16.1.1"]);
        route(&path.rc, &["default", "via", "172.16.2.2"]);
        route(&path.node, &["172.16.1.0/24", "via", "172.16.2.1"]);
        route(&path.node, &["172.16.4.0/24", "via", "172.16.3.2"]);
        route(&path.rb, &["default", "via", "172.16.3.1"]);
        route(&path.backend, &["default", "via", "172.16.4.1"]);
        // The narrow hops: each router's route to the far end takes no more.
        let narrow = |ns: &NetNs, to: &str, dev: &str, mtu: &str| {
            ns.ip([
                "route",
                "add",
                &format!("{to}/32"),
                "dev",
                dev,
                "mtu",
                "lock",
                mtu,
            ])
            .unwrap();
        };
        narrow(&path.rc, CLIENT, "rc0", CLIENT_SIDE_MTU);
        narrow(&path.rb, BACKEND, "rb1", BACKEND_SIDE_MTU);
        for ns in [&path.rc, &path.node, &path.rb] {
            ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        }
        std::fs::create_dir_all(&path.dir).unwrap();
        write_file(&path.dir.join("big"));
        path
    }

    /// Forgets every path MTU the ends learned, so that each transfer discovers it again.
    fn forget_path_mtus(&self) {
        for ns in [&self.client, &self.backend] {
            ns.ip(["route", "flush", "cache"]).unwrap();
        }
    }

    /// Drops (or lets through again) the routers' own ICMP errors.
    fn drop_router_errors(&self, drop: bool) {
        let commands: &[&str] = if drop {
            &[
                "add table ip pmtu",
                "add chain ip pmtu out { type filter hook output priority 0; }",
                "add rule ip pmtu out icmp type destination-unreachable drop",
            ]
        } else {
            &["delete table ip pmtu"]
        };
        for router in [&self.rc, &self.rb] {
            for command in commands {
                let out = router.exec(["nft", command]).unwrap();
                assert!(out.status.success(), "{out:?}");
            }
        }
    }

    /// Downloads the file from the backend through the node; its length if it came whole
    /// within `within`.
    fn download(&self, within: Duration) -> Option<usize> {
        download(&self.client, NODE, within)
    }

    /// Uploads the file to the backend through the node (which counts what it receives and
    /// answers the count); the count if it came whole within `within`.
    fn upload(&self, within: Duration) -> Option<usize> {
        upload(
            &self.client,
            &format!("{NODE}:8081"),
            &self.dir.join("big"),
            within,
        )
    }
}

/// A UDP answer larger than the overlay MTU (1450), within the task's link MTU (1500).
const UDP_ANSWER_LEN: usize = 1472;

/// Answers every datagram to `port` in `ns` with `len` bytes, from a thread, until dropped.
struct UdpAnswers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn udp_answers(ns: &NetNs, port: u16, len: usize) -> UdpAnswers {
    let socket = ns
        .in_netns(|| std::net::UdpSocket::bind(("0.0.0.0", port)))
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&vec![b'a'; len], from);
            }
        }
    });
    UdpAnswers {
        stop,
        thread: Some(thread),
    }
}

impl Drop for UdpAnswers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Asks `service` up to `attempts` times, a second apart, from one socket; the attempt that
/// was answered, the answer's length and source.
fn ask_until_answered(
    service: std::net::SocketAddr,
    attempts: usize,
) -> anyhow::Result<Option<(usize, usize, std::net::SocketAddr)>> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 4096];
    for attempt in 1..=attempts {
        socket.send_to(b"big?", service)?;
        if let Ok((len, from)) = socket.recv_from(&mut buf) {
            return Ok(Some((attempt, len, from)));
        }
    }
    Ok(None)
}

/// Downloads the file from `from` through `host`:8080 (a service whose backend serves it);
/// its length if it came whole within `within`.
fn download(from: &NetNs, host: &str, within: Duration) -> Option<usize> {
    let url = format!("http://{host}:8080/big");
    let out = from
        .exec([
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            &within.as_secs().to_string(),
            "-w",
            "%{size_download}",
            &url,
        ])
        .unwrap();
    whole_file(&out)
}

/// Uploads `file` from `client` to `to` (`IP:PORT`, a service whose backend counts what it
/// receives and answers the count); the count if it came whole within `within`.
fn upload(client: &NetNs, to: &str, file: &std::path::Path, within: Duration) -> Option<usize> {
    // The file on socat's standard input, the count it gets back on its standard output.
    let command = format!("socat -t 30 - TCP:{to} < {}", file.display());
    let out = client
        .exec([
            "timeout",
            &within.as_secs().to_string(),
            "sh",
            "-c",
            &command,
        ])
        .unwrap();
    whole_file(&out)
}

/// The length a transfer printed, if it succeeded with the whole file.
fn whole_file(out: &std::process::Output) -> Option<usize> {
    let got: usize = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (out.status.success() && got == FILE_LEN).then_some(got)
}

/// Writes the file the transfers carry at `path`.
fn write_file(path: &std::path::Path) {
    let content: Vec<u8> = (0..FILE_LEN).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(path, content).unwrap();
}

/// A server process, killed when dropped (a failed assertion included: it holds the test's
/// output open).
struct Server(std::process::Child);

/// The byte counter the uploads go to: a socat process per connection, each ending after 10 s
/// without data (the black-holed uploads leave theirs waiting).
const COUNTER: [&str; 5] = [
    "socat",
    "-T",
    "10",
    "TCP-LISTEN:81,reuseaddr,fork",
    "SYSTEM:wc -c",
];

impl Drop for Server {
    /// Kills the server and the processes it forked (one per connection), which would outlive
    /// the namespace.
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-P", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_large_upload_and_download_complete_through_path_mtu_discovery() {
    let path = Path::build();
    let dir = path.dir.to_str().unwrap().to_owned();
    let _httpd = Server(
        path.backend
            .spawn(["busybox", "httpd", "-f", "-p", "80", "-h", &dir])
            .unwrap(),
    );
    let _counter = Server(path.backend.spawn(COUNTER).unwrap());
    let mut lbctl = Lbctl::new(&path.node).unwrap();
    lbctl.run(&["attach", "uplink"]).unwrap();
    lbctl
        .run(&["service", "add", "web", "8080", &format!("{BACKEND}:80")])
        .unwrap();
    lbctl
        .run(&["service", "add", "upload", "8081", &format!("{BACKEND}:81")])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // The black hole first: the routers' errors dropped, full-size segments never arrive.
    path.drop_router_errors(true);
    assert_eq!(
        path.download(Duration::from_secs(4)),
        None,
        "the download completed without path MTU discovery: the topology does not test it"
    );
    assert_eq!(
        path.upload(Duration::from_secs(4)),
        None,
        "the upload completed"
    );
    path.drop_router_errors(false);
    path.forget_path_mtus();

    // Through the node: each error translated for the end that must hear it.
    let to_backend = lbctl.reason_packets("icmp_to_backend").unwrap();
    let download = path.download(Duration::from_secs(30));
    println!(
        "download: {download:?} bytes; icmp_to_backend +{}",
        lbctl.reason_packets("icmp_to_backend").unwrap() - to_backend
    );
    assert_eq!(download, Some(FILE_LEN));
    assert!(lbctl.reason_packets("icmp_to_backend").unwrap() > to_backend);

    let to_client = lbctl.reason_packets("icmp_egress").unwrap()
        + lbctl.reason_packets("icmp_to_client").unwrap();
    let upload = path.upload(Duration::from_secs(30));
    let translated = lbctl.reason_packets("icmp_egress").unwrap()
        + lbctl.reason_packets("icmp_to_client").unwrap()
        - to_client;
    println!("upload: {upload:?} bytes; errors translated for the client +{translated}");
    assert_eq!(upload, Some(FILE_LEN));
    assert!(translated > 0);

    lbctl.purge().unwrap();
}

/// Between nodes: a task on a plain veth at the client's MTU (1500) behind n2, a client
/// reaching it through n1, whose underlay (MTU 1500) cannot carry a full-size segment once
/// encapsulated. The SYN and the SYN-ACK crossing the tunnel announce the segment that fits
/// (1410), so neither end sends one too big: a 2 MiB download and a 2 MiB upload complete with
/// every "destination unreachable" to the client dropped, and neither node has a packet too big
/// to encapsulate. So does a download by n1's own `curl 127.0.0.1:8080` (its socket is
/// balanced and its SYN encapsulated by TC). Before the clamp, the task's full-size segments
/// were dropped on n2 (`drop_encap_mtu`) and downloads hung. UDP has no MSS: the task's first
/// answer too big once encapsulated is answered by n2's "fragmentation needed", after which its
/// kernel fragments its answers and they come through (before, each was dropped).
#[test]
fn large_transfers_through_the_mesh_complete_at_the_size_the_tunnel_fits() {
    use lb_tests::{
        mesh::{HOST_IF, Mesh, MeshSpec},
        topology::{NODE_UPLINK, TASK_BRIDGE},
    };
    lb_tests::require_root().unwrap();
    let mesh = Mesh::build(MeshSpec {
        nodes: 2,
        tasks_per_node: vec![0, 1],
        ..MeshSpec::default()
    })
    .unwrap();
    let task = mesh.tasks_on(1).start;
    // The task's link at the client's MTU: it advertises a full-size MSS.
    let n2 = mesh.node(1);
    n2.ip(["link", "set", TASK_BRIDGE, "mtu", "1500"]).unwrap();
    n2.ip(["link", "set", &format!("vt{task}"), "mtu", "1500"])
        .unwrap();
    mesh.task_ns(task)
        .ip(["link", "set", HOST_IF, "mtu", "1500"])
        .unwrap();
    let dir = std::env::temp_dir().join(format!("lbt-pmtu-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("big");
    write_file(&file);
    // The task's own server is on port 80: the file is served on 82.
    let _httpd = Server(
        mesh.task_ns(task)
            .spawn([
                "busybox",
                "httpd",
                "-f",
                "-p",
                "82",
                "-h",
                dir.to_str().unwrap(),
            ])
            .unwrap(),
    );
    let _counter = Server(mesh.task_ns(task).spawn(COUNTER).unwrap());
    let task_ip = mesh.task_ip(task);
    let n2_name = mesh.node_name(1);
    let mut nodes: Vec<Lbctl> = (0..2)
        .map(|i| {
            let lbctl = Lbctl::new(mesh.node(i)).unwrap();
            lbctl.run(&["attach", NODE_UPLINK]).unwrap();
            for j in 0..2 {
                let ip = mesh.node_ip(j).to_string();
                lbctl
                    .run(&["node", "add", &mesh.node_name(j), &ip])
                    .unwrap();
            }
            for (name, port, backend_port, proto) in [
                ("web", "8080", 82, "tcp"),
                ("upload", "8081", 81, "tcp"),
                ("big-answers", "7000", 7000, "udp"),
            ] {
                let backend = format!("{task_ip}:{backend_port}@{n2_name}");
                lbctl
                    .run(&["service", "add", name, port, "--proto", proto, &backend])
                    .unwrap();
            }
            lbctl
        })
        .collect();
    let client = mesh.client();
    client.disable_tx_offload(HOST_IF).unwrap();
    let nft = |command: &str| {
        let out = client.exec(["nft", command]).unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    // No path MTU discovery to lean on: the client hears no "destination unreachable".
    nft("add table ip pmtu");
    nft("add chain ip pmtu in { type filter hook input priority 0; }");
    nft("add rule ip pmtu in icmp type destination-unreachable drop");
    let too_big = |nodes: &[Lbctl]| -> u64 {
        nodes
            .iter()
            .map(|node| {
                node.reason_packets("frag_needed_sent").unwrap()
                    + node.reason_packets("drop_encap_mtu").unwrap()
            })
            .sum()
    };
    let before = too_big(&nodes);

    let n1 = mesh.node_ip(0).to_string();
    let shown = nodes[0].run(&["mesh", "show"]).unwrap();
    let path = format!(
        "to {} ({}): path MTU 1500, overlay MTU 1450, TCP MSS at most 1410",
        n2_name,
        mesh.node_ip(1)
    );
    assert!(shown.contains(&path), "{shown}");
    // Segments of the largest size the tunnel carries (IPv4 length 1450) that reach the
    // client: the task's GSO segments keep their clamped size when encapsulated, rather than
    // lose another 50 bytes.
    nft("add rule ip pmtu in tcp sport 8080 ip length 1450 counter");
    let got = download(client, &n1, Duration::from_secs(30));
    println!("download through the mesh: {got:?} bytes");
    assert_eq!(got, Some(FILE_LEN));
    let rules = client
        .exec(["nft", "list", "chain", "ip", "pmtu", "in"])
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    let full_size: u64 = rules
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {rules}"));
    println!("segments of 1450 bytes: {full_size}");
    assert!(
        full_size > (FILE_LEN / 1398 / 2) as u64,
        "segments smaller than the tunnel carries: {rules}"
    );
    let got = upload(
        client,
        &format!("{n1}:8081"),
        &file,
        Duration::from_secs(30),
    );
    println!("upload through the mesh: {got:?} bytes");
    assert_eq!(got, Some(FILE_LEN));
    let got = download(mesh.node(0), "127.0.0.1", Duration::from_secs(30));
    println!("download by n1's own socket: {got:?} bytes");
    assert_eq!(got, Some(FILE_LEN));
    assert_eq!(
        too_big(&nodes),
        before,
        "a packet too big to encapsulate: the MSS was not clamped"
    );
    let route = client.ip(["route", "get", &n1]).unwrap();
    assert!(
        !route.contains("mtu"),
        "the client learnt a path MTU: {route}"
    );

    // UDP has no MSS: the task's first answer too big to encapsulate draws n2's "fragmentation
    // needed", and its kernel fragments the next ones to the overlay MTU.
    let answers = udp_answers(mesh.task_ns(task), 7000, UDP_ANSWER_LEN);
    let sent = nodes[1].reason_packets("frag_needed_sent").unwrap();
    let service: std::net::SocketAddr = format!("{n1}:7000").parse().unwrap();
    let got = client.in_netns(|| ask_until_answered(service, 5)).unwrap();
    let errors = nodes[1].reason_packets("frag_needed_sent").unwrap() - sent;
    println!(
        "UDP answer of {UDP_ANSWER_LEN} bytes: {got:?}; fragmentation needed sent by n2: {errors}"
    );
    let (attempts, len, from) = got.expect("a large UDP answer came through the mesh");
    assert_eq!((len, from), (UDP_ANSWER_LEN, service));
    assert!(
        attempts >= 2,
        "the first answer fitted: the topology does not test this"
    );
    assert!(errors >= 1);
    drop(answers);

    nft("delete table ip pmtu");
    let _ = std::fs::remove_dir_all(&dir);
    for node in &mut nodes {
        node.purge().unwrap();
    }
}
