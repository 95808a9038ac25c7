//! The mesh topology itself, without lbctl: the namespaces, links, addresses and routes of a
//! `Mesh` and of a Linux VXLAN host carry traffic with plain kernel routing and the kernel's
//! VXLAN driver, and all of it goes away on drop. If this fails, the mesh end-to-end tests
//! cannot be trusted. Needs root and `lb-testsrv` built (`cargo build -p lb-tests --bins`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use lb_tests::client::{CONNECT_TIMEOUT, http_get_from, http_get_new_connection, udp_request};
use lb_tests::mesh::{
    HOST_IF, LinuxVxlanHost, LinuxVxlanSpec, Mesh, MeshSpec, UNDERLAY_BRIDGE, VXLAN_IF,
};
use lb_tests::netns::{NetNs, format_mac};
use lb_tests::topology::{NODE_UPLINK, TASK_BRIDGE};

#[test]
fn the_three_node_swarm_and_a_linux_vxlan_host_carry_traffic_and_leave_nothing_behind() -> Result<()>
{
    lb_tests::require_root()?;
    let started = Instant::now();
    let mesh = Mesh::build(MeshSpec::default())?;
    let host = mesh.add_linux_vxlan_host(LinuxVxlanSpec::default())?;
    let created: Vec<String> = mesh
        .namespaces()
        .chain([host.ns()])
        .map(|ns| ns.name().to_string())
        .collect();
    let listed = netns_names()?;
    ensure!(
        created.iter().all(|name| listed.contains(name)),
        "created {created:?}, listed {listed:?}"
    );
    ensure!(mesh.task_count() == 4 && mesh.tasks_on(2).is_empty());
    ensure!(mesh.task_node(2) == 1 && mesh.tasks_on(1) == (2..4));

    a_clashing_linux_vxlan_host_is_refused_and_cleaned_up(&mesh)?;
    links_have_the_planned_mtus_and_macs(&mesh, &host)?;
    client_reaches_every_node_and_task(&mesh)?;
    nodes_reach_their_own_tasks_only(&mesh)?;
    tasks_reach_the_client_through_their_node(&mesh)?;
    linux_vxlan_host_talks_to_a_node_with_a_kernel_vxlan_device(&mesh, &host)?;

    drop(host);
    drop(mesh);
    let left = netns_names()?;
    let leaked: Vec<&String> = created.iter().filter(|name| left.contains(name)).collect();
    ensure!(leaked.is_empty(), "namespaces left behind: {leaked:?}");
    eprintln!("mesh built, checked and removed in {:?}", started.elapsed());
    Ok(())
}

/// The harness cannot depend on lb-common, so it keeps its own copy of the overhead.
#[test]
fn the_overlay_mtu_matches_the_data_plane() {
    assert_eq!(lb_tests::mesh::VXLAN_OVERHEAD, lb_common::VXLAN_OVERHEAD);
    assert_eq!(lb_tests::mesh::DEFAULT_VNI, lb_common::DEFAULT_VNI);
    assert_eq!(
        lb_tests::mesh::DEFAULT_VXLAN_PORT,
        lb_common::DEFAULT_VXLAN_PORT
    );
    assert_eq!(MeshSpec::default().overlay_mtu(), 1450);
}

/// Names in `ip netns list` (which prints `NAME` or `NAME (id: N)` per line).
fn netns_names() -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(out.status.success(), "`ip netns list` failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Namespaces of this process (`lbt-<pid>-...`).
fn own_netns_count() -> Result<usize> {
    let prefix = format!("lbt-{}-", std::process::id());
    Ok(netns_names()?
        .iter()
        .filter(|name| name.starts_with(&prefix))
        .count())
}

/// An address taken by a node is refused up front; a second host on the same underlay
/// address fails half-way (its bridge port exists) and its namespace goes with the error.
fn a_clashing_linux_vxlan_host_is_refused_and_cleaned_up(mesh: &Mesh) -> Result<()> {
    let before = own_netns_count()?;
    let on_a_node = LinuxVxlanSpec {
        host: 11,
        ..LinuxVxlanSpec::default()
    };
    let err = format!(
        "{:#}",
        mesh.add_linux_vxlan_host(on_a_node)
            .err()
            .context("host .11")?
    );
    ensure!(err.contains(".11 is taken"), "{err}");
    let err = mesh.add_linux_vxlan_host(LinuxVxlanSpec::default()).err();
    let err = format!("{:#}", err.context("a second host at .20")?);
    ensure!(err.contains("u-h20"), "{err}");
    ensure!(
        own_netns_count()? == before,
        "a failed host left its namespace"
    );
    Ok(())
}

/// The MTU of `ifname` in `ns`, from `ip -o link show`.
fn mtu(ns: &NetNs, ifname: &str) -> Result<u32> {
    let out = ns.ip(["-o", "link", "show", "dev", ifname])?;
    let mut words = out.split_whitespace();
    words
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|mtu| mtu.parse().ok())
        .with_context(|| format!("no mtu in {out:?}"))
}

fn links_have_the_planned_mtus_and_macs(mesh: &Mesh, host: &LinuxVxlanHost) -> Result<()> {
    let (underlay, overlay) = (1500, 1450);
    let mut expected = vec![
        (mesh.underlay(), UNDERLAY_BRIDGE, underlay),
        (mesh.client(), HOST_IF, underlay),
        (host.ns(), HOST_IF, underlay),
        (host.ns(), VXLAN_IF, overlay),
    ];
    for i in 0..mesh.node_count() {
        expected.push((mesh.node(i), NODE_UPLINK, underlay));
        expected.push((mesh.node(i), TASK_BRIDGE, overlay));
    }
    for k in 0..mesh.task_count() {
        expected.push((mesh.task_ns(k), HOST_IF, overlay));
    }
    for (ns, ifname, want) in expected {
        let got = mtu(ns, ifname)?;
        ensure!(got == want, "{} {ifname}: MTU {got}, not {want}", ns.name());
    }
    ensure!(
        host.ns().mac(VXLAN_IF)? == host.mac(),
        "vxlan0 has eth0's MAC"
    );
    ensure!(mesh.node_mac(0)? != mesh.node_mac(1)?);
    Ok(())
}

/// Pings `to` once from `from`.
fn ping(from: &NetNs, to: Ipv4Addr) -> Result<()> {
    let out = from.exec(["ping", "-c1", "-W1", "-q", &to.to_string()])?;
    ensure!(
        out.status.success(),
        "{} cannot ping {to}: {}",
        from.name(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

/// The client is on the underlay with every node, and reaches each task through its node.
fn client_reaches_every_node_and_task(mesh: &Mesh) -> Result<()> {
    ping(mesh.client(), mesh.underlay_gateway())?;
    for i in 0..mesh.node_count() {
        ping(mesh.client(), mesh.node_ip(i))?;
    }
    for k in 0..mesh.task_count() {
        let (addr, udp_addr) = (mesh.task_addr(k), mesh.task_udp_addr(k));
        for reply in mesh
            .client()
            .in_netns(|| [http_get_new_connection(addr), udp_request(udp_addr)])
        {
            let reply = reply?;
            ensure!(reply.backend == mesh.task_name(k), "{reply:?}");
            ensure!(*reply.client_seen.ip() == mesh.client_ip(), "{reply:?}");
        }
    }
    Ok(())
}

/// A node reaches its tasks on its bridge (from the gateway address), and has no route to
/// the tasks of other nodes but its own bridge: only the mesh data plane can get there.
fn nodes_reach_their_own_tasks_only(mesh: &Mesh) -> Result<()> {
    for k in 0..mesh.task_count() {
        let node = mesh.node(mesh.task_node(k));
        let addr = mesh.task_addr(k);
        let reply = node.in_netns(|| http_get_new_connection(addr))?;
        ensure!(reply.backend == mesh.task_name(k), "{reply:?}");
        ensure!(
            *reply.client_seen.ip() == mesh.overlay_gateway(),
            "{reply:?}"
        );
    }
    let route = mesh
        .node(2)
        .ip(["route", "get", &mesh.task_ip(0).to_string()])?;
    ensure!(
        route.contains(&format!("dev {TASK_BRIDGE}")),
        "n3 routes task 0 by its own bridge: {route}"
    );
    Ok(())
}

/// A task connects to a listener in the client namespace, which sees the task's own address.
fn tasks_reach_the_client_through_their_node(mesh: &Mesh) -> Result<()> {
    let client_ip = mesh.client_ip();
    let listener = mesh
        .client()
        .in_netns(|| TcpListener::bind((client_ip, 0)))?;
    let listening = listener.local_addr()?;
    for k in 0..mesh.task_count() {
        mesh.task_ns(k).in_netns(|| -> Result<()> {
            let mut stream = TcpStream::connect_timeout(&listening, CONNECT_TIMEOUT)
                .with_context(|| format!("task {k} cannot connect to {listening}"))?;
            stream.write_all(format!("task-{k}").as_bytes())?;
            Ok(())
        })?;
        // The connection is established, so accept does not block.
        let (mut conn, peer) = listener.accept()?;
        let mut said = String::new();
        conn.read_to_string(&mut said)?;
        ensure!(said == mesh.task_name(k), "{said:?}");
        ensure!(peer.ip() == mesh.task_ip(k), "task {k} seen as {peer}");
    }
    Ok(())
}

/// Node n1 gets a kernel VXLAN device of its own, set up as `LinuxVxlanHost` sets up its
/// side (same VNI and port, the uplink's MAC, static neighbours and forwarding entries):
/// the host's client address then reaches task 0 through the overlay (`route_via`), and n1
/// reaches the host's server, whose reply comes back through the overlay (`reply_via`).
fn linux_vxlan_host_talks_to_a_node_with_a_kernel_vxlan_device(
    mesh: &Mesh,
    host: &LinuxVxlanHost,
) -> Result<()> {
    let (n1, n1_ip, n1_mac) = (mesh.node(0), mesh.node_ip(0), mesh.node_mac(0)?);
    let spec = host.spec();
    let (host_mac, underlay_ip) = (format_mac(host.mac()), n1_ip.to_string());
    n1.ip([
        "link",
        "add",
        VXLAN_IF,
        "address",
        &format_mac(n1_mac),
        "mtu",
        &mesh.spec().overlay_mtu().to_string(),
        "type",
        "vxlan",
        "id",
        &spec.vni.to_string(),
        "local",
        &underlay_ip,
        "dstport",
        &spec.port.to_string(),
        "nolearning",
        "noudpcsum",
    ])?;
    n1.disable_tx_offload(VXLAN_IF)?;
    n1.ip(["link", "set", VXLAN_IF, "up"])?;
    for (ip, src) in [
        (host.client_ip(), None),
        (host.server_ip(), Some(&underlay_ip)),
    ] {
        let route = format!("{ip}/32");
        let mut args = vec!["route", "add", route.as_str(), "dev", VXLAN_IF];
        args.extend(src.into_iter().flat_map(|src| ["src", src.as_str()]));
        n1.ip(args)?;
        let ip = ip.to_string();
        n1.ip([
            "neigh",
            "add",
            &ip,
            "lladdr",
            &host_mac,
            "dev",
            VXLAN_IF,
            "nud",
            "permanent",
        ])?;
    }
    let host_ip = host.underlay_ip().to_string();
    n1.bridge(["fdb", "add", &host_mac, "dev", VXLAN_IF, "dst", &host_ip])?;

    host.route_via(mesh.task_ip(0), n1_ip, n1_mac)?;
    host.reply_via(n1_ip, n1_mac)?;
    // Both are idempotent.
    host.reply_via(n1_ip, n1_mac)?;

    let (from, task) = (host.client_ip(), mesh.task_addr(0));
    let reply = host.ns().in_netns(|| http_get_from(from, task))?;
    ensure!(reply.backend == mesh.task_name(0), "{reply:?}");
    ensure!(*reply.client_seen.ip() == from, "{reply:?}");

    let server = host.server_addr();
    let reply = n1.in_netns(|| http_get_new_connection(server))?;
    ensure!(reply.backend == host.name(), "{reply:?}");
    ensure!(*reply.client_seen.ip() == n1_ip, "{reply:?}");

    // Both ways went through the VXLAN devices, not some other route.
    for ns in [n1, host.ns()] {
        let received = ns.rx_packets(VXLAN_IF)?;
        ensure!(
            received >= 4,
            "{} {VXLAN_IF} received {received}",
            ns.name()
        );
    }
    Ok(())
}
