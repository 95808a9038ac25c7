//! What lbctl asks the kernel about an interface of its namespace: its driver, and the
//! counters of frames it failed to transmit. Asked with ethtool ioctls and
//! `/proc/thread-self/net/dev`, which answer for the network namespace of the calling thread
//! (lbctl enters its instance's with `setns`; `/sys/class/net` would show its mount's).
use std::{
    ffi::c_void,
    fs,
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};

/// `SIOCETHTOOL` (linux/sockios.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// ethtool commands (linux/ethtool.h).
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
/// The string set of `ETHTOOL_GSTATS`' names.
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` as `SIOCETHTOOL` reads it: a name and a pointer to the command.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut c_void,
    _pad: [u8; 16],
}

/// Runs one ethtool command on `iface`; `cmd` is the command's struct, starting with its
/// number.
fn ethtool(iface: &str, cmd: *mut c_void) -> Result<()> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: cmd,
        _pad: [0; 16],
    };
    let bytes = iface.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        bail!("invalid interface name '{iface}'");
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    let socket = udp_socket().context("opening a socket for ethtool")?;
    // SAFETY: `req` names the interface and points at a command struct of the size the kernel
    // expects for its number, which the caller made.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("ethtool request on {iface}"));
    }
    Ok(())
}

/// A UDP socket of this thread's namespace, for calls about the namespace itself (ethtool,
/// its cookie) rather than for traffic.
pub fn udp_socket() -> Result<OwnedFd> {
    Ok(nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// The name of `iface`'s driver (`veth`, `mlx5_core`, ...).
pub fn driver(iface: &str) -> Result<String> {
    // SAFETY: plain data; all-zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ethtool(iface, (&raw mut info).cast())?;
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The driver's own statistics of `iface` (`ethtool -S`), by name.
pub fn driver_stats(iface: &str) -> Result<Vec<(String, u64)>> {
    // struct ethtool_sset_info: cmd, reserved, sset_mask, then one u32 per set asked.
    let mut sset = [0u32; 5];
    sset[0] = ETHTOOL_GSSET_INFO;
    sset[2..4].copy_from_slice(&[1 << ETH_SS_STATS, 0]);
    ethtool(iface, sset.as_mut_ptr().cast())?;
    let count = if sset[2] & (1 << ETH_SS_STATS) != 0 {
        sset[4] as usize
    } else {
        0
    };
    if count == 0 {
        return Ok(Vec::new());
    }
    // struct ethtool_gstrings: cmd, string_set, len, then the names.
    let mut strings = vec![0u8; 12 + count * ETH_GSTRING_LEN];
    strings[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    strings[4..8].copy_from_slice(&ETH_SS_STATS.to_ne_bytes());
    strings[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
    ethtool(iface, strings.as_mut_ptr().cast())?;
    // struct ethtool_stats: cmd, n_stats, then the values; u64s keep the buffer 8-aligned.
    let mut values = vec![0u64; 1 + count];
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&ETHTOOL_GSTATS.to_ne_bytes());
    head[4..].copy_from_slice(&(count as u32).to_ne_bytes());
    values[0] = u64::from_ne_bytes(head);
    ethtool(iface, values.as_mut_ptr().cast())?;
    Ok(strings[12..]
        .chunks(ETH_GSTRING_LEN)
        .zip(&values[1..])
        .map(|(name, value)| {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            (String::from_utf8_lossy(&name[..end]).into_owned(), *value)
        })
        .collect())
}

/// Frames an interface failed to send: the kernel's device counters and its driver's XDP
/// transmit errors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TxFailures {
    /// Dropped on transmission (`tx_dropped`: a veth whose peer is down or whose queue is full).
    pub dropped: u64,
    /// Transmit errors (`tx_errors`).
    pub errors: u64,
    /// The driver's counters of XDP frames it could not send (XDP_TX or redirected into it:
    /// veth's `rx_queue_N_xdp_tx_errors` and `tx_queue_N_xdp_xmit_errors`; other drivers'
    /// names with `xdp` and `err`).
    pub xdp_errors: u64,
}

impl TxFailures {
    pub fn total(&self) -> u64 {
        self.dropped + self.errors + self.xdp_errors
    }
}

/// The transmit failures of `iface` (driver counters count as 0 where the driver has none).
pub fn tx_failures(iface: &str) -> Result<TxFailures> {
    let text = fs::read_to_string("/proc/thread-self/net/dev").context("reading /proc/net/dev")?;
    let (errors, dropped) = proc_net_dev_tx(&text, iface)
        .with_context(|| format!("no line for {iface} in /proc/net/dev"))?;
    let xdp_errors = driver_stats(iface)
        .unwrap_or_default()
        .iter()
        .filter(|(name, _)| is_xdp_tx_error(name))
        .map(|(_, value)| value)
        .sum();
    Ok(TxFailures {
        dropped,
        errors,
        xdp_errors,
    })
}

/// True for a driver statistic that counts XDP frames the driver could not send.
fn is_xdp_tx_error(name: &str) -> bool {
    name.contains("xdp") && name.contains("err")
}

/// The transmit errors and drops of `iface` in the text of `/proc/net/dev`.
fn proc_net_dev_tx(text: &str, iface: &str) -> Option<(u64, u64)> {
    text.lines().find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit:
        // bytes packets errs drop ...
        let fields: Vec<u64> = counters
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        Some((*fields.get(10)?, *fields.get(11)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transmit_errors_and_drops_of_one_interface() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
uplink: 5000      50    1    2    0     0          0         0     7000      70    3    4    0     0       0          0
";
        assert_eq!(proc_net_dev_tx(text, "uplink"), Some((3, 4)));
        assert_eq!(proc_net_dev_tx(text, "lo"), Some((0, 0)));
        assert_eq!(proc_net_dev_tx(text, "eth0"), None);
        assert_eq!(proc_net_dev_tx(text, "upl"), None);
    }

    #[test]
    fn xdp_transmit_errors_are_told_from_other_driver_counters() {
        for name in [
            "rx_queue_0_xdp_tx_errors",
            "tx_queue_3_xdp_xmit_errors",
            "tx_xdp_err",
        ] {
            assert!(is_xdp_tx_error(name), "{name}");
        }
        for name in [
            "rx_queue_0_xdp_tx",
            "rx_queue_0_drops",
            "tx_errors",
            "peer_ifindex",
        ] {
            assert!(!is_xdp_tx_error(name), "{name}");
        }
    }
}
