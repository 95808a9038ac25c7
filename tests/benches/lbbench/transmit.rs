//! How the frames the node's XDP sends leave a veth: `XDP_TX` (the fast path, which a veth
//! delivers only to a peer that runs XDP) against the TC path lbctl takes on veths by default
//! (XDP hands the frame to the kernel, its TC ingress program sends it with `bpf_redirect`),
//! per packet, on one core.
//!
//! A generator namespace's veth `gen0` faces the node's `uplink`. A `BPF_PROG_TEST_RUN` with
//! live frames on a generator program (it writes the frame, then redirects it into `gen0`)
//! sends one UDP flow to a service of the node whose backend is on the same link, so lbctl
//! DNATs every frame and sends it back out of `uplink` towards `gen0`, where an XDP program
//! drops it (a sink: counting its drops proves every frame made the round trip). The node's
//! XDP and the sink run in the generator's softirq, on its CPU, so the call's wall time per
//! frame is the whole pipeline's cost. Variants, in one run, in the order A B C D E E D C B A:
//! the node's XDP only dropping (the floor: the generator's own cost), a bare `XDP_TX` bounce,
//! lbctl with `--transmit xdp`, lbctl with `--transmit tc`, and the last again towards a peer
//! without XDP, as users plug veths into bridges (its stack drops the frames; counted by its
//! received packets). The node's work per packet is a variant's time less the floor's; with the
//! XDP sink that includes the sink turning each skb the TC path sends back into an XDP frame.
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use anyhow::{Context, Result, ensure};
use etherparse::PacketBuilder;
use lb_tests::Lbctl;
use lb_tests::bpf::{self, XDP_DROP, XDP_TX};
use lb_tests::netns::{self, NetNs};

use crate::Options;
use crate::live::{self, PAYLOAD};
use crate::report::Measurement;

const SECTION: &str = "transmit";
const UPLINK: &str = "uplink";
const GEN: &str = "gen0";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const BACKEND_SUBNET_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 10);
const SERVICE_PORT: u16 = 5300;
const BACKEND_PORT: u16 = 53;
const CLIENT_PORT: u16 = 40000;
/// Frames per measured call; the smoke run sends fewer.
const FRAMES: u32 = 2_000_000;
const SMOKE_FRAMES: u32 = 20_000;

/// What runs on the node's uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// An XDP program that drops every frame: the generator's own cost.
    Floor,
    /// An XDP program that sends every frame back with `XDP_TX`, untouched.
    Bounce,
    /// lbctl, `--transmit xdp`.
    LbctlXdp,
    /// lbctl, `--transmit tc`.
    LbctlTc,
    /// lbctl, `--transmit tc`, towards a peer without XDP (what users plug into a bridge): the
    /// frames reach its kernel stack, which drops them (no route in the generator namespace).
    LbctlTcPlainPeer,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Floor,
        Variant::Bounce,
        Variant::LbctlXdp,
        Variant::LbctlTc,
        Variant::LbctlTcPlainPeer,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Floor => "node XDP drops (floor)",
            Variant::Bounce => "bare XDP_TX bounce",
            Variant::LbctlXdp => "lbctl, XDP_TX",
            Variant::LbctlTc => "lbctl, through TC",
            Variant::LbctlTcPlainPeer => "lbctl, through TC, peer without XDP",
        }
    }
}

struct Rig {
    lbctl: Lbctl,
    generator: OwnedFd,
    /// The sink on `gen0`: `None` while the peer runs no XDP.
    sink: Option<OwnedFd>,
    node: NetNs,
    gen_ns: NetNs,
}

/// The client's UDP frame to the node's service, as the generator writes it.
fn frame(gen_mac: [u8; 6], uplink_mac: [u8; 6]) -> Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(gen_mac, uplink_mac)
        .ipv4(CLIENT_IP.octets(), NODE_IP.octets(), 64)
        .udp(CLIENT_PORT, SERVICE_PORT);
    let payload = [0x5a; PAYLOAD];
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, &payload)
        .context("building the frame")?;
    Ok(out)
}

impl Rig {
    fn build() -> Result<Rig> {
        let gen_ns = NetNs::new("gen")?;
        let node = NetNs::new("txnode")?;
        live::quiet(&[&gen_ns, &node])?;
        netns::veth(&gen_ns, GEN, &node, UPLINK)?;
        for addr in [
            format!("{NODE_IP}/24"),
            format!("{BACKEND_SUBNET_GATEWAY}/24"),
        ] {
            node.ip(["addr", "add", &addr, "dev", UPLINK])?;
        }
        node.sysctl("net.ipv4.ip_forward", "1")?;
        let gen_mac = gen_ns.mac(GEN)?;
        // The client and the backend are both behind gen0: what the node sends comes back to
        // the sink.
        live::behind_generator(&node, UPLINK, &[CLIENT_IP, BACKEND_IP], gen_mac)?;
        let sink = gen_ns.attach_xdp_action(GEN, XDP_DROP)?;
        let frame = frame(gen_mac, node.mac(UPLINK)?)?;
        let generator =
            gen_ns.in_netns(|| bpf::load_frame_generator(&frame, netns::if_index(GEN)?))?;
        let lbctl = Lbctl::new(&node)?;
        lbctl.run(&["attach", UPLINK, "--flow-capacity", "4096"])?;
        let backend = format!("{BACKEND_IP}:{BACKEND_PORT}");
        let port = SERVICE_PORT.to_string();
        lbctl.run(&["service", "add", "dns", &port, &backend, "--proto", "udp"])?;
        lbctl.run(&["detach", UPLINK])?;
        Ok(Rig {
            lbctl,
            generator,
            sink: Some(sink),
            node,
            gen_ns,
        })
    }

    fn frame_len() -> usize {
        14 + 20 + 8 + PAYLOAD
    }

    /// Puts `variant` on the uplink, sends `frames` and checks they all took its path; returns
    /// nanoseconds per frame.
    fn measure(&mut self, variant: Variant, frames: u32) -> Result<f64> {
        let lbctl = matches!(
            variant,
            Variant::LbctlXdp | Variant::LbctlTc | Variant::LbctlTcPlainPeer
        );
        let plain_peer = variant == Variant::LbctlTcPlainPeer;
        if plain_peer {
            self.sink = None;
        }
        let node_program = match variant {
            Variant::Floor => Some(self.node.attach_xdp_action(UPLINK, XDP_DROP)?),
            Variant::Bounce => Some(self.node.attach_xdp_action(UPLINK, XDP_TX)?),
            Variant::LbctlXdp | Variant::LbctlTc | Variant::LbctlTcPlainPeer => {
                let transmit = if variant == Variant::LbctlXdp {
                    "xdp"
                } else {
                    "tc"
                };
                self.lbctl
                    .run(&["attach", UPLINK, "--transmit", transmit])?;
                None
            }
        };
        let lbctl_counts = |rig: &Rig| -> Result<(u64, u64)> {
            match node_program {
                Some(_) => Ok((0, 0)),
                None => Ok((
                    rig.lbctl.reason_packets("forward_tx")?,
                    rig.lbctl.reason_packets("xmit_tc")?,
                )),
            }
        };
        // What reached the peer: its XDP sink's drops, or without it, what its stack received.
        let received = |rig: &Rig| match plain_peer {
            false => rig.gen_ns.xdp_drops(GEN),
            true => rig.gen_ns.rx_packets(GEN),
        };
        let sink_before = received(self)?;
        let (forwarded_before, tc_before) = lbctl_counts(self)?;
        let elapsed = self.gen_ns.in_netns(|| {
            live::on_one_cpu(|| bpf::live_frames(&self.generator, Rig::frame_len(), frames))
        })??;
        let sunk = received(self)? - sink_before;
        let (forwarded, through_tc) = lbctl_counts(self)?;
        let (forwarded, through_tc) = (forwarded - forwarded_before, through_tc - tc_before);
        drop(node_program);
        if lbctl {
            self.lbctl.run(&["detach", UPLINK])?;
        }
        if plain_peer {
            self.sink = Some(self.gen_ns.attach_xdp_action(GEN, XDP_DROP)?);
        }
        let frames = u64::from(frames);
        live::check_sunk(variant.name(), variant == Variant::Floor, sunk, frames)?;
        match variant {
            Variant::LbctlXdp => ensure!(
                (forwarded, through_tc) == (frames, 0),
                "XDP_TX: {forwarded} forward_tx, {through_tc} xmit_tc of {frames}"
            ),
            Variant::LbctlTc | Variant::LbctlTcPlainPeer => ensure!(
                (forwarded, through_tc) == (frames, frames),
                "through TC: {forwarded} forward_tx, {through_tc} xmit_tc of {frames}"
            ),
            Variant::Floor | Variant::Bounce => {}
        }
        Ok(elapsed as f64 / frames as f64)
    }
}

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let mut rig = Rig::build()?;
    let frames = if opts.smoke { SMOKE_FRAMES } else { FRAMES };
    // A first flow-creating frame, and a warm-up of every path.
    for variant in Variant::ALL {
        rig.measure(variant, 1000)?;
    }
    let mut times: Vec<(Variant, Vec<f64>)> =
        Variant::ALL.iter().map(|&v| (v, Vec::new())).collect();
    let order: Vec<Variant> = Variant::ALL
        .iter()
        .chain(Variant::ALL.iter().rev())
        .copied()
        .collect();
    for variant in order {
        let ns = rig.measure(variant, frames)?;
        times
            .iter_mut()
            .find(|(v, _)| *v == variant)
            .expect("every variant")
            .1
            .push(ns);
    }
    let best = |variant: Variant| -> f64 {
        times
            .iter()
            .find(|(v, _)| *v == variant)
            .map(|(_, t)| t.iter().copied().fold(f64::INFINITY, f64::min))
            .expect("every variant")
    };
    let floor = best(Variant::Floor);
    let mut out = Vec::new();
    println!("transmit: {frames} frames of 60 bytes per run, one UDP flow, one core (best of 2)");
    for variant in Variant::ALL {
        let total = best(variant);
        let rate = 1e3 / total;
        out.push(Measurement::new(
            SECTION,
            variant.name(),
            "pipeline",
            total,
            "ns/frame",
        ));
        // Without the sink, the peer's own stack receiving each frame weighs on the time: no
        // node work to tell apart.
        if matches!(variant, Variant::Floor | Variant::LbctlTcPlainPeer) {
            println!(
                "  {:<36} {total:7.1} ns/frame, {rate:5.2} Mpps",
                variant.name()
            );
            continue;
        }
        let node_work = total - floor;
        println!(
            "  {:<36} {total:7.1} ns/frame, node work {node_work:6.1} ns, {rate:5.2} Mpps",
            variant.name()
        );
        out.push(Measurement::new(
            SECTION,
            variant.name(),
            "node work",
            node_work,
            "ns/frame",
        ));
    }
    // Both towards the XDP sink, so that only the node's path differs.
    let ratio = (best(Variant::LbctlTc) - floor) / (best(Variant::LbctlXdp) - floor);
    println!("  node work through TC / with XDP_TX: {ratio:.2}x");
    out.push(Measurement::new(
        SECTION,
        "TC path / XDP_TX",
        "node work",
        ratio,
        "x",
    ));
    Ok(out)
}
