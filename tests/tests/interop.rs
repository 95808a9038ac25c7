//! Interoperability with the kernel's own VXLAN driver: the frames lbctl builds are real VXLAN.
//!
//! A host on the mesh's underlay reaches the overlay through a Linux `vxlan` device with the
//! same VNI and port, and is declared to lbctl as a node. In one direction the ingress node's
//! XDP encapsulates a client's connection to a backend behind that device, which decodes it;
//! in the other the device encapsulates a connection to a task, which the task's node
//! decapsulates in XDP. Both directions' replies take the opposite path, so a completed HTTP
//! exchange proves both encodings are understood.
use anyhow::Result;
use lb_tests::{
    Lbctl,
    client::{http_get_from, http_get_new_connection},
    mesh::{LinuxVxlanSpec, Mesh, MeshSpec, VXLAN_IF},
    topology::NODE_UPLINK,
};
use std::net::SocketAddrV4;

/// The name the Linux host has in lbctl's node table.
const HOST_NODE: &str = "lx";
const WEB_PORT: u16 = 8080;
/// Port of the service of n1's first task.
const TASKS_PORT: u16 = 8081;

fn reason(lbctl: &Lbctl, reason: &str) -> u64 {
    lbctl.reason_packets(reason).unwrap()
}

#[test]
fn a_linux_vxlan_device_and_the_data_plane_understand_each_others_frames() -> Result<()> {
    lb_tests::require_root()?;
    let mesh = Mesh::build(MeshSpec::default())?;
    let spec = LinuxVxlanSpec {
        vni: 7001,
        port: 4790,
        ..LinuxVxlanSpec::default()
    };
    let host = mesh.add_linux_vxlan_host(spec.clone())?;
    let backend = format!("{}@{HOST_NODE}", host.server_addr());
    let mut lbctl = Vec::new();
    for i in 0..mesh.node_count() {
        let node = Lbctl::new(mesh.node(i))?;
        node.run(&["attach", NODE_UPLINK])?;
        node.run(&[
            "mesh",
            "set",
            "--vni",
            &spec.vni.to_string(),
            "--vxlan-port",
            &spec.port.to_string(),
        ])?;
        for j in 0..mesh.node_count() {
            node.run(&[
                "node",
                "add",
                &mesh.node_name(j),
                &mesh.node_ip(j).to_string(),
            ])?;
        }
        node.run(&["node", "add", HOST_NODE, &host.underlay_ip().to_string()])?;
        node.run(&["service", "add", "web", &WEB_PORT.to_string(), &backend])?;
        // n1's first task is a backend too: a node delivers decapsulated packets only to the
        // backends it hosts.
        let task = mesh.tasks_on(0).start;
        let task_backend = format!("{}@{}", mesh.task_addr(task), mesh.node_name(0));
        node.run(&[
            "service",
            "add",
            "tasks",
            &TASKS_PORT.to_string(),
            &task_backend,
        ])?;
        lbctl.push(node);
    }

    // Ingress node's XDP → Linux vxlan0: a client connects to the node without tasks, whose
    // only backend is the server behind the Linux device; the server replies through vxlan0
    // to that node, which decapsulates and reverse-NATs the reply.
    let ingress = mesh.node_count() - 1;
    host.reply_via(mesh.node_ip(ingress), mesh.node_mac(ingress)?)?;
    let decoded_before = host.ns().rx_packets(VXLAN_IF)?;
    let addr = SocketAddrV4::new(mesh.node_ip(ingress), WEB_PORT);
    for _ in 0..3 {
        let reply = mesh.client().in_netns(|| http_get_new_connection(addr))?;
        assert_eq!(reply.backend, spec.name);
        assert_eq!(*reply.client_seen.ip(), mesh.client_ip());
    }
    assert!(host.ns().rx_packets(VXLAN_IF)? > decoded_before);
    assert!(reason(&lbctl[ingress], "forward_encap_tx") > 0);
    assert!(reason(&lbctl[ingress], "reply_tx") > 0);

    // Linux vxlan0 → task node's XDP: the host connects from its own client address to a task
    // of n1 (a backend of n1) through vxlan0, as a node that balanced a flow to it would; n1
    // decapsulates, the task answers, n1's TC encapsulates the reply back to the host, whose
    // vxlan0 decodes it.
    let task = mesh.tasks_on(0).start;
    host.route_via(mesh.task_ip(task), mesh.node_ip(0), mesh.node_mac(0)?)?;
    let decoded_before = host.ns().rx_packets(VXLAN_IF)?;
    for _ in 0..3 {
        let reply = host
            .ns()
            .in_netns(|| http_get_from(host.client_ip(), mesh.task_addr(task)))?;
        assert_eq!(reply.backend, mesh.task_name(task));
        assert_eq!(*reply.client_seen.ip(), host.client_ip());
    }
    assert!(host.ns().rx_packets(VXLAN_IF)? > decoded_before);
    // Delivered to the task behind the node's bridge by TC, into its namespace (or, before the
    // node resolved the task's address, through the kernel).
    assert!(reason(&lbctl[0], "decap_redirect") + reason(&lbctl[0], "decap_stack") > 0);
    assert!(reason(&lbctl[0], "reply_encap") > 0);
    drop(lbctl);
    Ok(())
}
