//! What socket load balancing adds to a node's own `connect`: the nanoseconds of one UDP
//! `socket()` + `connect()` + `close()` on the node (no packet is sent, so the figure is the
//! system calls and the programs on the cgroup root, nothing else), in one run, in the order
//! A B C C B A:
//! - A, no socket programs (`attach --no-socket-lb`): a connect to the backend's address;
//! - B, with the socket programs, the same connect: an address that is no service, which the
//!   programs look at and leave (every connect on the machine pays this);
//! - C, with the socket programs, a connect to the service at 127.0.0.1: the programs give the
//!   socket its backend (a round-robin turn, two LRU entries).
//!
//! C is checked to have been balanced (`socket_balanced` moved by every connect, and a
//! balanced socket still has the service address as its peer), A and B not to.
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use lb_tests::Lbctl;
use lb_tests::netns::{self, NetNs};

use crate::Options;
use crate::report::Measurement;

const SECTION: &str = "socket";
const UPLINK: &str = "uplink";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);
const SERVICE_PORT: u16 = 5301;
const BACKEND_PORT: u16 = 53;
/// Connects per measured batch; the smoke run makes fewer.
const CONNECTS: u32 = 200_000;
const SMOKE_CONNECTS: u32 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    NoPrograms,
    NotAService,
    Service,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::NoPrograms => "connect, no socket programs",
            Variant::NotAService => "connect to a non-service address, socket programs on",
            Variant::Service => "connect to 127.0.0.1:PORT, balanced by the socket programs",
        }
    }
}

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let connects = if opts.smoke { SMOKE_CONNECTS } else { CONNECTS };
    let node = NetNs::new("socknode")?;
    let backend = NetNs::new("sockback")?;
    netns::veth(&node, UPLINK, &backend, "eth0")?;
    node.ip(["addr", "add", &format!("{NODE_IP}/24"), "dev", UPLINK])?;
    backend.ip(["addr", "add", &format!("{BACKEND_IP}/24"), "dev", "eth0"])?;
    let lbctl = Lbctl::new(&node)?;
    lbctl.run(&[
        "attach",
        UPLINK,
        "--flow-capacity",
        "4096",
        "--no-socket-lb",
    ])?;
    let target = format!("{BACKEND_IP}:{BACKEND_PORT}");
    let port = SERVICE_PORT.to_string();
    lbctl.run(&["service", "add", "dns", &port, &target, "--proto", "udp"])?;

    let order = [
        Variant::NoPrograms,
        Variant::NotAService,
        Variant::Service,
        Variant::Service,
        Variant::NotAService,
        Variant::NoPrograms,
    ];
    let mut times: Vec<(Variant, f64)> = Vec::new();
    for variant in order {
        let on = variant != Variant::NoPrograms;
        lbctl.run(&[
            "attach",
            UPLINK,
            if on { "--socket-lb" } else { "--no-socket-lb" },
        ])?;
        let addr = match variant {
            Variant::Service => SocketAddrV4::new(Ipv4Addr::LOCALHOST, SERVICE_PORT),
            _ => SocketAddrV4::new(BACKEND_IP, BACKEND_PORT),
        };
        let before = balanced(&lbctl)?;
        let ns = node.in_netns(|| connect_loop(addr, connects))?;
        let moved = balanced(&lbctl)? - before;
        let expected = if variant == Variant::Service {
            u64::from(connects)
        } else {
            0
        };
        ensure!(
            moved == expected,
            "{}: {moved} sockets balanced, expected {expected}",
            variant.name()
        );
        if variant == Variant::Service {
            node.in_netns(|| check_balanced(addr))?;
        }
        times.push((variant, ns));
    }
    let mean = |variant: Variant| {
        let picked: Vec<f64> = times
            .iter()
            .filter(|(v, _)| *v == variant)
            .map(|(_, t)| *t)
            .collect();
        picked.iter().sum::<f64>() / picked.len() as f64
    };
    let (none, other, service) = (
        mean(Variant::NoPrograms),
        mean(Variant::NotAService),
        mean(Variant::Service),
    );
    let mut out = Vec::new();
    for (variant, value) in [
        (Variant::NoPrograms, none),
        (Variant::NotAService, other),
        (Variant::Service, service),
    ] {
        out.push(Measurement::new(
            SECTION,
            "UDP socket + connect + close",
            variant.name(),
            value,
            "ns",
        ));
    }
    out.push(Measurement::new(
        SECTION,
        "added by the socket programs",
        "to a non-service address",
        other - none,
        "ns",
    ));
    out.push(Measurement::new(
        SECTION,
        "added by the socket programs",
        "to a service (balanced)",
        service - none,
        "ns",
    ));
    Ok(out)
}

/// The instance's `socket_balanced` counter.
fn balanced(lbctl: &Lbctl) -> Result<u64> {
    let stats: serde_json::Value = serde_json::from_str(&lbctl.run(&["stats", "--json"])?)?;
    stats["events"]["socket_balanced"]
        .as_u64()
        .context("no socket_balanced event in lbctl stats")
}

/// Nanoseconds per `socket()` + `connect()` + `close()` of a UDP socket to `addr`, over
/// `count` of them.
fn connect_loop(addr: SocketAddrV4, count: u32) -> Result<f64> {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let started = Instant::now();
    for _ in 0..count {
        // SAFETY: plain system calls on a descriptor this loop owns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let rc = libc::connect(
                fd,
                (&sin as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                bail!("connect to {addr}: {err}");
            }
        }
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(count))
}

/// A balanced socket still has the service as its peer (`getpeername`).
fn check_balanced(addr: SocketAddrV4) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(addr)?;
    ensure!(
        socket.peer_addr()? == std::net::SocketAddr::V4(addr),
        "the balanced socket's peer is {}, not {addr}",
        socket.peer_addr()?
    );
    Ok(())
}
