//! The published ports of services on every local address, reserved from the node's own
//! ephemeral ports (`net.ipv4.ip_local_reserved_ports` of the instance's namespace), as
//! kube-proxy and Cilium reserve NodePorts. Otherwise a connection the node itself opens (a DNS
//! query, a health check, an agent) could get a published port as its source port, and its
//! replies, addressed to that port on a local address, would be taken for a service's new flows
//! and sent to a backend. Reserving leaves explicit binds alone: a server may still listen
//! there. lbctl records which entries it added, keeps the operator's, and removes its own on
//! `purge`. Called by `commands` after each change of the table.
use std::{collections::BTreeSet, fs};

use anyhow::{Context as _, Result};

use crate::table::Table;

const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The ports to reserve for `table`: those of its services published on every local address
/// (a service with a VIP takes only packets to the VIP, which is no source of the node's own
/// connections).
pub fn wanted(table: &Table) -> BTreeSet<u16> {
    table
        .services
        .iter()
        .filter(|service| service.vip.is_none())
        .map(|service| service.port)
        .collect()
}

/// The ports the sysctl's list `text` reserves. The kernel keeps a bitmap and lists runs of
/// adjacent ports as one range (`9000,9001` reads back as `9000-9001`), so a list is a set of
/// ports, whatever entries wrote it.
fn parse(text: &str) -> Result<BTreeSet<u16>> {
    let mut ports = BTreeSet::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (first, last) = item.split_once('-').unwrap_or((item, item));
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .with_context(|| format!("{SYSCTL} holds '{item}', not a port or range"))
        };
        ports.extend(port(first)?..=port(last)?);
    }
    Ok(ports)
}

/// `ports` as the kernel lists them: runs of adjacent ports as ranges.
fn render(ports: &BTreeSet<u16>) -> String {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &port in ports {
        match runs.last_mut() {
            Some((_, last)) if u32::from(*last) + 1 == u32::from(port) => *last = port,
            _ => runs.push((port, port)),
        }
    }
    runs.iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The sysctl's new value and the ports lbctl owns afterwards, from its current value
/// `current`, the ports lbctl added before (`ours`) and the ports it wants reserved now. The
/// operator's ports stay; a wanted port they reserve already is theirs, not lbctl's.
fn plan(
    current: &str,
    ours: &BTreeSet<u16>,
    wanted: &BTreeSet<u16>,
) -> Result<(String, BTreeSet<u16>)> {
    let theirs: BTreeSet<u16> = parse(current)?.difference(ours).copied().collect();
    let now: BTreeSet<u16> = wanted.difference(&theirs).copied().collect();
    let all: BTreeSet<u16> = theirs.union(&now).copied().collect();
    Ok((render(&all), now))
}

/// Reserves `wanted` in this namespace, given the ports lbctl added before (`ours`); returns
/// the ports lbctl owns now. Writes the sysctl only when its value changes.
pub fn sync(ours: &BTreeSet<u16>, wanted: &BTreeSet<u16>) -> Result<BTreeSet<u16>> {
    let current = fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
    let (value, now) = plan(&current, ours, wanted)?;
    if parse(&current)? != parse(&value)? {
        // The kernel takes an empty list as "none"; it refuses an empty write.
        let text = if value.is_empty() { "\n" } else { &value };
        fs::write(SYSCTL, text).with_context(|| format!("writing '{value}' to {SYSCTL}"))?;
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(list: &[u16]) -> BTreeSet<u16> {
        list.iter().copied().collect()
    }

    #[test]
    fn wanted_ports_are_added_and_only_lbctls_own_are_removed() {
        let (value, ours) = plan("", &ports(&[]), &ports(&[53, 8080])).unwrap();
        assert_eq!(
            (value.as_str(), ours.clone()),
            ("53,8080", ports(&[53, 8080]))
        );
        // The operator reserved 9000-9010 and 22 meanwhile; 8080 goes, 40000 comes.
        let (value, ours) = plan("22,53,8080,9000-9010", &ours, &ports(&[53, 40000])).unwrap();
        assert_eq!(value, "22,53,9000-9010,40000");
        assert_eq!(ours, ports(&[53, 40000]));
        // Nothing wanted: the operator's entries stay.
        let (value, ours) = plan(&value, &ours, &ports(&[])).unwrap();
        assert_eq!((value.as_str(), ours), ("22,9000-9010", ports(&[])));
    }

    #[test]
    fn a_port_the_operator_reserved_stays_theirs() {
        let (value, ours) = plan("8000-8100", &ports(&[]), &ports(&[8080])).unwrap();
        assert_eq!((value.as_str(), ours.clone()), ("8000-8100", ports(&[])));
        // Later unwanted by lbctl: the operator's range is untouched.
        let (value, _) = plan(&value, &ours, &ports(&[])).unwrap();
        assert_eq!(value, "8000-8100");
    }

    #[test]
    fn adjacent_ports_the_kernel_lists_as_one_range_are_still_lbctls() {
        let (value, ours) = plan("", &ports(&[]), &ports(&[9000, 9001, 9003])).unwrap();
        assert_eq!(value, "9000-9001,9003");
        // As the kernel reads them back: one range, still lbctl's own ports.
        let (value, ours) = plan("9000-9001,9003", &ours, &ports(&[9001])).unwrap();
        assert_eq!((value.as_str(), ours.clone()), ("9001", ports(&[9001])));
        let (value, ours) = plan("22,9001", &ours, &ports(&[])).unwrap();
        assert_eq!((value.as_str(), ours), ("22", ports(&[])));
        // The operator's range next to lbctl's ports keeps every port of its own.
        let (value, ours) = plan("8000-8099", &ports(&[]), &ports(&[8100])).unwrap();
        assert_eq!(value, "8000-8100");
        let (value, _) = plan(&value, &ours, &ports(&[])).unwrap();
        assert_eq!(value, "8000-8099");
    }

    #[test]
    fn a_list_lbctl_cannot_read_is_an_error() {
        assert!(plan("22,abc", &ports(&[]), &ports(&[80])).is_err());
        assert!(plan("70000", &ports(&[]), &ports(&[80])).is_err());
    }
}
