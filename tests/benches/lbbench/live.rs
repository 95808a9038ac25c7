//! What the live-frames sections (`transmit`, `pps`) share: a generator namespace's veth facing
//! the node's uplink, an XDP sink at the far end, and one CPU for the whole pipeline.
use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use lb_tests::netns::{NetNs, format_mac};

/// Bytes of UDP payload: the client's frame is 60 bytes, the smallest Ethernet frame without
/// its FCS.
pub const PAYLOAD: usize = 18;
/// Frames the sink may get besides the generator's: the nodes' own (IPv6 is off in the
/// namespaces, but the kernel may still send the odd frame while links settle).
pub const STRAY_FRAMES: u64 = 8;

/// Turns IPv6 off in `namespaces`, so that no neighbour discovery crosses the measured link.
pub fn quiet(namespaces: &[&NetNs]) -> Result<()> {
    for ns in namespaces {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    }
    Ok(())
}

/// Puts `addrs` behind the generator: permanent neighbour entries on the node's `dev` with the
/// generator's MAC, so that whatever the node sends to them comes back to the sink.
pub fn behind_generator(
    node: &NetNs,
    dev: &str,
    addrs: &[Ipv4Addr],
    gen_mac: [u8; 6],
) -> Result<()> {
    for ip in addrs {
        node.ip([
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &format_mac(gen_mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// Checks that the sink got every one of `frames` (give or take stray frames), or for the
/// floor none.
pub fn check_sunk(name: &str, floor: bool, sunk: u64, frames: u64) -> Result<()> {
    if floor {
        ensure!(sunk <= STRAY_FRAMES, "the floor forwarded {sunk} frames");
    } else {
        ensure!(
            (frames..=frames + STRAY_FRAMES).contains(&sunk),
            "{name}: the sink got {sunk} of {frames} frames"
        );
    }
    Ok(())
}

/// Runs `f` on one CPU only, the first this thread may use (the softirqs its frames raise run
/// there too), then lets the thread run where it could before.
pub fn on_one_cpu<R>(f: impl FnOnce() -> R) -> Result<R> {
    // SAFETY: a zeroed cpu_set_t is empty; the calls only read and write it.
    let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: as above; pid 0 is this thread.
    unsafe {
        ensure!(
            libc::sched_getaffinity(0, size, &mut before) == 0,
            "sched_getaffinity"
        );
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| libc::CPU_ISSET(cpu, &before))
            .context("this thread may run on no CPU")?;
        libc::CPU_SET(cpu, &mut only);
        ensure!(
            libc::sched_setaffinity(0, size, &only) == 0,
            "sched_setaffinity"
        );
    }
    let result = f();
    // SAFETY: as above.
    unsafe { libc::sched_setaffinity(0, size, &before) };
    Ok(result)
}
