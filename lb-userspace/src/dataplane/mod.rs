//! The data plane from userspace: the embedded eBPF object and its maps pinned per instance
//! (this file), raw map operations (`map_ops`), the table's desired map contents and their
//! delta (`sync`, with `maglev`'s lookup tables), the pinned maps' layouts and migration
//! (`layout`, `migrate`), and installing the programs on interfaces and on the cgroup root
//! (`install`, `socket_lb`). Used by `commands` and the daemon; uses `table` and `host`.
//!
//! The data plane from userspace: the embedded eBPF object, its maps (pinned per instance),
//! and the thin layer that writes `sync::Delta`s and reads counters.
pub mod install;
pub mod layout;
pub mod maglev;
pub mod map_ops;
pub mod migrate;
pub mod socket_lb;
pub mod sync;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as PrefixKey, LpmTrie},
        xdp::DevMapHash,
    },
    util::nr_cpus,
};
use lb_common::{
    Addr6, BACKEND_ACTIVE, BACKEND_IPV6, Backend, BackendStats, BridgePortKey, Counter, FlowKey,
    FlowKey6, FlowValue, FlowValue6, LocalBackendKey, LocalBackendKey6, MacKey, MaglevTable,
    MeshConfig, PassiveHealth, ReverseValue, ReverseValue6, RrCursor, ServiceKey, ServiceKey6,
    ServiceValue, SnatValue, SocketLbConfig, TunnelValue, map_names, program_names,
};

use crate::{
    dataplane::sync::{Delta, MapContents},
    host::underlay::Subnet,
};

/// The compiled data plane (lb-ebpf), built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The maps sized like the flow table, whose capacity the operator chooses (`--flow-capacity`,
/// `--flow-capacity6`) instead of the object.
pub const FLOW_SIZED: &[&str] = &[
    map_names::FLOWS,
    map_names::REVERSE_FLOWS,
    map_names::TUNNEL_REPLIES,
    map_names::FLOWS6,
    map_names::REVERSE_FLOWS6,
    map_names::TUNNEL_REPLIES6,
];

/// Unless the operator sizes them (`--flow-capacity6`), the IPv6 flow tables hold this fraction
/// of `--flow-capacity` (at least [`MIN_IPV6_FLOWS`]): their 40-byte keys would otherwise double
/// the memory an instance takes for the flow table, on every node, whether it serves IPv6 or
/// not.
pub const IPV6_FLOW_SHARE: u32 = 8;
pub const MIN_IPV6_FLOWS: u32 = 4096;

/// The sizes of the flow tables, in flows: `ipv4` of `FLOWS`, `REVERSE_FLOWS` and
/// `TUNNEL_REPLIES`, `ipv6` of `FLOWS6`, `REVERSE_FLOWS6` and `TUNNEL_REPLIES6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowCapacity {
    pub ipv4: u32,
    pub ipv6: u32,
}

impl FlowCapacity {
    /// `ipv4` flows, and `ipv6` (`None`: the IPv6 tables' share of `ipv4`, see
    /// [`IPV6_FLOW_SHARE`]).
    pub fn new(ipv4: u32, ipv6: Option<u32>) -> Self {
        Self {
            ipv4,
            ipv6: ipv6.unwrap_or_else(|| (ipv4 / IPV6_FLOW_SHARE).max(MIN_IPV6_FLOWS)),
        }
    }

    /// The entries of the flow-sized map `name`.
    pub fn entries(self, name: &str) -> u32 {
        if name == map_names::FLOWS6
            || name == map_names::REVERSE_FLOWS6
            || name == map_names::TUNNEL_REPLIES6
        {
            self.ipv6
        } else {
            self.ipv4
        }
    }
}

impl Default for FlowCapacity {
    fn default() -> Self {
        Self::new(lb_common::DEFAULT_FLOW_CAPACITY, None)
    }
}

/// Loads the object. With `pin_dir`, every map is reused from (or created and pinned at)
/// `pin_dir/<MAP>`, so that all programs of an instance share them and they outlive `lbctl`.
pub fn load(pin_dir: Option<&Path>, capacity: FlowCapacity) -> Result<Ebpf> {
    let pins: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => map_names::ALL
            .iter()
            .map(|name| (*name, dir.join(name)))
            .collect(),
        None => Vec::new(),
    };
    load_pinned(&pins, capacity)
}

/// Loads the object with each map of `pins` reused from (or created and pinned at) its path;
/// the other maps are the object's own.
pub fn load_pinned(pins: &[(&str, PathBuf)], capacity: FlowCapacity) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for name in FLOW_SIZED {
        loader.map_max_entries(name, capacity.entries(name));
    }
    for (name, path) in pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(OBJECT).context("loading the eBPF object")
}

/// Loads the IPv6 programs (the kernel verifies them) and puts them where the IPv4 programs
/// tail-call them for IPv6 frames (`IPV6_XDP_PROGRAM`, `IPV6_TC_PROGRAM`), and the mesh
/// programs where they are tail-called (`IPV6_ENCAP_PROGRAM`, `IPV6_DECAP_PROGRAM`,
/// `OVERLAY6_PROGRAM`: encapsulation, and decapsulation of inner IPv6 and of VXLAN over an
/// IPv6 underlay). Until this runs, IPv6 passes untouched.
pub fn load_ipv6_programs(ebpf: &mut Ebpf) -> Result<()> {
    let xdp: &mut aya::programs::Xdp = ebpf
        .program_mut(program_names::XDP_INGRESS6)
        .ok_or_else(|| anyhow!("object has no IPv6 XDP program"))?
        .try_into()?;
    xdp.load()
        .context("loading the IPv6 XDP program (verifier)")?;
    let xdp = xdp.fd()?.try_clone()?;
    let mut mesh_programs = Vec::new();
    for name in [
        program_names::XDP_ENCAP6,
        program_names::XDP_DECAP6,
        program_names::XDP_OVERLAY6,
        program_names::XDP_ICMP6,
    ] {
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("object has no program {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading the IPv6 mesh program {name} (verifier)"))?;
        mesh_programs.push(program.fd()?.try_clone()?);
    }
    let tc: &mut aya::programs::SchedClassifier = ebpf
        .program_mut(program_names::TC_EGRESS6)
        .ok_or_else(|| anyhow!("object has no IPv6 TC program"))?
        .try_into()?;
    tc.load()
        .context("loading the IPv6 TC egress program (verifier)")?;
    let tc = tc.fd()?.try_clone()?;
    let icmp: &mut aya::programs::SchedClassifier = ebpf
        .program_mut(program_names::TC_ICMP6)
        .ok_or_else(|| anyhow!("object has no ICMPv6 TC program"))?
        .try_into()?;
    icmp.load()
        .context("loading the ICMPv6 TC program (verifier)")?;
    let icmp = icmp.fd()?.try_clone()?;
    let tc_encap: &mut aya::programs::SchedClassifier = ebpf
        .program_mut(program_names::TC_ENCAP6)
        .ok_or_else(|| anyhow!("object has no TC encapsulation program over IPv6"))?
        .try_into()?;
    tc_encap
        .load()
        .context("loading the TC encapsulation program over IPv6 (verifier)")?;
    let tc_encap = tc_encap.fd()?.try_clone()?;
    for (name, program) in [
        (map_names::IPV6_XDP_PROGRAM, &xdp),
        (map_names::IPV6_TC_PROGRAM, &tc),
        (map_names::IPV6_ENCAP_PROGRAM, &mesh_programs[0]),
        (map_names::IPV6_DECAP_PROGRAM, &mesh_programs[1]),
        (map_names::OVERLAY6_PROGRAM, &mesh_programs[2]),
        (map_names::ICMP6_XDP_PROGRAM, &mesh_programs[3]),
        (map_names::IPV6_TC_ICMP_PROGRAM, &icmp),
        (map_names::TC_ENCAP6_PROGRAM, &tc_encap),
    ] {
        let mut slot: aya::maps::ProgramArray<&mut MapData> = ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("object has no map {name}"))?
            .try_into()?;
        slot.set(0, program, 0)
            .with_context(|| format!("putting its IPv6 program in {name}"))?;
    }
    Ok(())
}

/// Typed handles on the maps userspace reads and writes.
pub struct Maps {
    /// The IPv6 halves of `services`, `rr_cursors`, `maglev`; IPv6 backends' addresses; the
    /// node's IPv6 addresses (a set); and the IPv6 flow table (for inspection).
    pub services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub rr_cursors6: Array<MapData, RrCursor>,
    pub maglev6: HashMap<MapData, u32, MaglevTable>,
    pub backend_addrs6: Array<MapData, Addr6>,
    pub host_addrs6: HashMap<MapData, Addr6, u32>,
    pub flows6: HashMap<MapData, FlowKey6, FlowValue6>,
    /// IPv6 backends this node reaches by plain routing; the value is unused (0).
    pub local_backends6: HashMap<MapData, LocalBackendKey6, u32>,
    /// Filled by the data plane only; opened for inspection (and tests).
    pub reverse_flows6: HashMap<MapData, FlowKey6, ReverseValue6>,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub service_ports: Array<MapData, u64>,
    pub backends: Array<MapData, Backend>,
    pub rr_cursors: Array<MapData, RrCursor>,
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    /// Filled by the data plane only; opened for inspection (and tests).
    pub reverse_flows: HashMap<MapData, FlowKey, ReverseValue>,
    pub backend_stats: PerCpuArray<MapData, BackendStats>,
    pub reason_stats: PerCpuArray<MapData, Counter>,
    pub event_stats: PerCpuArray<MapData, u64>,
    pub tx_ports: DevMapHash<MapData>,
    /// Underlay addresses (network byte order) of the other nodes; the value is unused (0).
    pub nodes: HashMap<MapData, u32, u32>,
    /// `MeshConfig` in slot 0.
    pub mesh: Array<MapData, MeshConfig>,
    /// An IPv6 underlay's other nodes: address → key, and key → address.
    pub nodes6: HashMap<MapData, Addr6, u32>,
    pub node_addrs6: HashMap<MapData, u32, Addr6>,
    /// This node's IPv6 underlay address in slot 0 (all zero on an IPv4 underlay).
    pub mesh6: Array<MapData, Addr6>,
    /// Filled by the data plane only (an LRU hash, which aya's `HashMap` also handles); opened so
    /// that its type is checked with the others, and for inspection.
    pub tunnel_replies: HashMap<MapData, FlowKey, TunnelValue>,
    /// Maglev lookup tables by service id (maglev services only).
    pub maglev: HashMap<MapData, u32, MaglevTable>,
    /// Interfaces whose frames XDP hands to TC to send (by ifindex), with the cookie the
    /// hand-over note must carry.
    pub tx_via_tc: HashMap<MapData, u32, u32>,
    /// Backends this node reaches by plain routing; the value is unused (0).
    pub local_backends: HashMap<MapData, LocalBackendKey, u32>,
    /// Filled by the data plane only (hairpin flows' sources); opened for inspection.
    pub snat_flows: HashMap<MapData, FlowKey, SnatValue>,
    /// The subnets of the namespace's interfaces (see [`Maps::sync_subnets`]).
    pub onlink_subnets: LpmTrie<MapData, u32, u32>,
    /// The MAC addresses of the namespace's interfaces (see [`Maps::sync_host_macs`]).
    pub host_macs: HashMap<MapData, MacKey, u32>,
    pub bridge_ports: HashMap<MapData, BridgePortKey, u32>,
    pub peer_ports: DevMapHash<MapData>,
    /// The IPv4 addresses of the namespace's interfaces (see [`Maps::sync_host_addrs`]).
    pub host_addrs: HashMap<MapData, u32, u32>,
    /// `SocketLbConfig` in slot 0: whose sockets the socket programs act on.
    pub socket_lb: Array<MapData, SocketLbConfig>,
    /// What the data plane saw of each backend's connections, and its ejections (`passive`).
    pub passive_health: Array<MapData, PassiveHealth>,
}

/// Brings the set `map` (named `name`; its values are unused, 0) in line with `wanted`: removes
/// the keys it holds that are not wanted and adds the wanted ones it lacks. Returns the number
/// of writes.
fn sync_set<K: Pod + Ord>(
    map: &mut HashMap<MapData, K, u32>,
    wanted: &BTreeSet<K>,
    name: &str,
) -> Result<usize> {
    let mut present = BTreeSet::new();
    for key in map.keys() {
        present.insert(key.with_context(|| format!("reading {name}"))?);
    }
    for stale in present.difference(wanted) {
        map.remove(stale)
            .with_context(|| format!("removing an entry from {name}"))?;
    }
    for new in wanted.difference(&present) {
        map.insert(new, 0, 0)
            .with_context(|| format!("adding an entry to {name}"))?;
    }
    Ok(present.symmetric_difference(wanted).count())
}

/// The `ONLINK_SUBNETS` value of `subnet`: 0 for the subnet of this node's `underlay` address,
/// `lb_common::subnet_id` for every other.
pub fn subnet_value(subnet: &Subnet, underlay: Option<Ipv4Addr>) -> u32 {
    match underlay {
        Some(ip) if subnet.contains(ip) => 0,
        _ => lb_common::subnet_id(
            u32::from_ne_bytes(subnet.network.octets()),
            subnet.prefix_len,
        ),
    }
}

/// Fails, naming them, when the pinned maps in `pin_dir` lack maps this lbctl declares: an
/// instance whose programs an older lbctl installed, until `lbctl upgrade` installs this one's
/// (and creates them).
pub fn require_this_builds_maps(pin_dir: &Path) -> Result<()> {
    let missing: Vec<&str> = map_names::ALL
        .iter()
        .copied()
        .filter(|name| !pin_dir.join(name).exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "the instance's maps have no {}, which this lbctl adds: its programs were installed \
             by an older lbctl; run `lbctl upgrade` to install this one's",
            missing.join(", ")
        );
    }
    Ok(())
}

fn open(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    if !path.exists() && pin_dir.join(map_names::SERVICES).exists() {
        require_this_builds_maps(pin_dir)?;
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("{name} has an unexpected map type"))
}

impl Maps {
    /// Opens the maps an attached instance pinned.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::from_maps(|name| open(pin_dir, name))
    }

    /// Takes the maps out of a freshly loaded object (tests and benchmarks, no pinning).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_maps(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("object has no map {name}"))
        })
    }

    fn from_maps(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            services: get(map_names::SERVICES)?.try_into()?,
            service_ports: get(map_names::SERVICE_PORTS)?.try_into()?,
            backends: get(map_names::BACKENDS)?.try_into()?,
            rr_cursors: get(map_names::RR_CURSORS)?.try_into()?,
            flows: get(map_names::FLOWS)?.try_into()?,
            reverse_flows: get(map_names::REVERSE_FLOWS)?.try_into()?,
            backend_stats: get(map_names::BACKEND_STATS)?.try_into()?,
            reason_stats: get(map_names::REASON_STATS)?.try_into()?,
            event_stats: get(map_names::EVENT_STATS)?.try_into()?,
            tx_ports: get(map_names::TX_PORTS)?.try_into()?,
            nodes: get(map_names::NODES)?.try_into()?,
            mesh: get(map_names::MESH)?.try_into()?,
            nodes6: get(map_names::NODES6)?.try_into()?,
            node_addrs6: get(map_names::NODE_ADDRS6)?.try_into()?,
            mesh6: get(map_names::MESH6)?.try_into()?,
            tunnel_replies: get(map_names::TUNNEL_REPLIES)?.try_into()?,
            maglev: get(map_names::MAGLEV)?.try_into()?,
            tx_via_tc: get(map_names::TX_VIA_TC)?.try_into()?,
            local_backends: get(map_names::LOCAL_BACKENDS)?.try_into()?,
            snat_flows: get(map_names::SNAT_FLOWS)?.try_into()?,
            onlink_subnets: get(map_names::ONLINK_SUBNETS)?.try_into()?,
            host_macs: get(map_names::HOST_MACS)?.try_into()?,
            bridge_ports: get(map_names::BRIDGE_PORTS)?.try_into()?,
            peer_ports: get(map_names::PEER_PORTS)?.try_into()?,
            host_addrs: get(map_names::HOST_ADDRS)?.try_into()?,
            socket_lb: get(map_names::SOCKET_LB)?.try_into()?,
            passive_health: get(map_names::PASSIVE_HEALTH)?.try_into()?,
            services6: get(map_names::SERVICES6)?.try_into()?,
            rr_cursors6: get(map_names::RR_CURSORS6)?.try_into()?,
            maglev6: get(map_names::MAGLEV6)?.try_into()?,
            backend_addrs6: get(map_names::BACKEND_ADDRS6)?.try_into()?,
            host_addrs6: get(map_names::HOST_ADDRS6)?.try_into()?,
            flows6: get(map_names::FLOWS6)?.try_into()?,
            local_backends6: get(map_names::LOCAL_BACKENDS6)?.try_into()?,
            reverse_flows6: get(map_names::REVERSE_FLOWS6)?.try_into()?,
        })
    }

    /// Brings what the data plane takes for this node's own (`ONLINK_SUBNETS`, `HOST_MACS`,
    /// `HOST_ADDRS`, `BRIDGE_PORTS`) in line with the namespace's interfaces now
    /// (`underlay::host_view`, read once), `attached` the interfaces lbctl is on and `underlay`
    /// this node's address in the mesh. Returns the number of writes.
    pub fn sync_host(&mut self, attached: &[&str], underlay: Option<Ipv4Addr>) -> Result<usize> {
        let host = crate::host::underlay::host_view(attached)?;
        Ok(self.sync_subnets(&host.subnets, underlay)?
            + self.sync_host_macs(&host.attached_macs)?
            + self.sync_host_addrs(&host.addrs)?
            + self.sync_host_addrs6(&crate::host::underlay::local_addrs6()?)?
            + self.sync_bridge_ports(&host.bridge_ports)?)
    }

    /// Brings `BRIDGE_PORTS` in line with `ports` (`underlay::bridge_ports`: (bridge, MAC) →
    /// port), and gives each port its `PEER_PORTS` entry and its `TX_VIA_TC` cookie, which
    /// XDP's note to TC must carry. A port's entry and cookie are added before its
    /// `BRIDGE_PORTS` entries and dropped after them, and `TX_VIA_TC`'s entries of attached
    /// interfaces (`TX_PORTS`) are left to `install`. Returns the number of writes.
    pub fn sync_bridge_ports(&mut self, ports: &BTreeMap<(u32, [u8; 6]), u32>) -> Result<usize> {
        let wanted: BTreeMap<BridgePortKey, u32> = ports
            .iter()
            .map(|(&(bridge_ifindex, mac), &port)| {
                let key = BridgePortKey {
                    bridge_ifindex,
                    mac,
                    _pad: [0; 2],
                };
                (key, port)
            })
            .collect();
        let wanted_ports: BTreeSet<u32> = wanted.values().copied().collect();
        let attached: BTreeSet<u32> = self
            .tx_ports
            .keys()
            .collect::<Result<_, _>>()
            .context("reading TX_PORTS")?;
        let cookies: BTreeSet<u32> = self
            .tx_via_tc
            .keys()
            .collect::<Result<_, _>>()
            .context("reading TX_VIA_TC")?;
        let present: BTreeMap<BridgePortKey, u32> = self
            .bridge_ports
            .iter()
            .collect::<Result<_, _>>()
            .context("reading BRIDGE_PORTS")?;
        let devices: BTreeSet<u32> = self
            .peer_ports
            .keys()
            .collect::<Result<_, _>>()
            .context("reading PEER_PORTS")?;
        let mut writes = 0;
        for port in wanted_ports.difference(&devices) {
            // A port that went away since it was listed: left out until the next sync.
            if self.peer_ports.insert(*port, *port, None, 0).is_ok() {
                writes += 1;
            }
        }
        for port in wanted_ports.difference(&cookies) {
            self.tx_via_tc
                .insert(port, random_cookie()?, 0)
                .with_context(|| format!("adding bridge port {port} to TX_VIA_TC"))?;
            writes += 1;
        }
        for (key, port) in &wanted {
            if present.get(key) != Some(port) {
                self.bridge_ports
                    .insert(key, port, 0)
                    .context("writing BRIDGE_PORTS")?;
                writes += 1;
            }
        }
        for key in present.keys().filter(|key| !wanted.contains_key(key)) {
            self.bridge_ports
                .remove(key)
                .context("removing an entry from BRIDGE_PORTS")?;
            writes += 1;
        }
        for gone in devices.difference(&wanted_ports) {
            // Gone already if the device was deleted (the kernel removes it).
            let _ = self.peer_ports.remove(*gone);
            writes += 1;
        }
        for gone in cookies
            .iter()
            .filter(|index| !wanted_ports.contains(index) && !attached.contains(index))
        {
            self.tx_via_tc
                .remove(gone)
                .with_context(|| format!("removing bridge port {gone} from TX_VIA_TC"))?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Brings `HOST_ADDRS` in line with `addrs` (the namespace's): a node's own socket that
    /// connects to one of them on a published port is balanced. Returns the number of writes.
    pub fn sync_host_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<usize> {
        let wanted: BTreeSet<u32> = addrs
            .iter()
            .map(|addr| u32::from_ne_bytes(addr.octets()))
            .collect();
        sync_set(&mut self.host_addrs, &wanted, map_names::HOST_ADDRS)
    }

    /// Brings `HOST_ADDRS6` in line with `addrs` (`underlay::local_addrs6`): a new IPv6 flow
    /// to a service on every address must be addressed to one of them.
    pub fn sync_host_addrs6(&mut self, addrs: &BTreeSet<Addr6>) -> Result<usize> {
        sync_set(&mut self.host_addrs6, addrs, map_names::HOST_ADDRS6)
    }

    /// Turns socket load balancing on for the sockets of the namespace whose cookie is
    /// `netns_cookie`, or off (0).
    pub fn set_socket_lb(&mut self, netns_cookie: u64) -> Result<()> {
        self.socket_lb
            .set(0, SocketLbConfig { netns_cookie }, 0)
            .context("writing SOCKET_LB")
    }

    /// Brings `HOST_MACS` in line with `macs` (`underlay::HostView::attached_macs`): a
    /// flow starts only from a frame addressed to one of them (or to every host). Returns the
    /// number of writes.
    pub fn sync_host_macs(&mut self, macs: &BTreeSet<[u8; 6]>) -> Result<usize> {
        let wanted: BTreeSet<MacKey> = macs
            .iter()
            .map(|mac| MacKey {
                mac: *mac,
                _pad: [0; 2],
            })
            .collect();
        sync_set(&mut self.host_macs, &wanted, map_names::HOST_MACS)
    }

    /// Brings `ONLINK_SUBNETS` in line with `subnets` (the namespace's, see
    /// `underlay::HostView::subnets`): a flow whose client is in its backend's subnet is a hairpin
    /// flow. The subnet of this node's `underlay` address (in a mesh) is marked 0: the other
    /// nodes route it alike, so its clients are answered through the tunnel. Returns the number
    /// of writes.
    pub fn sync_subnets(
        &mut self,
        subnets: &BTreeSet<Subnet>,
        underlay: Option<Ipv4Addr>,
    ) -> Result<usize> {
        let wanted: BTreeMap<Subnet, u32> = subnets
            .iter()
            .map(|subnet| (*subnet, subnet_value(subnet, underlay)))
            .collect();
        let mut present = BTreeMap::new();
        for entry in self.onlink_subnets.iter() {
            let (key, value) = entry.context("reading ONLINK_SUBNETS")?;
            let subnet = Subnet {
                network: Ipv4Addr::from(key.data().to_ne_bytes()),
                prefix_len: key.prefix_len() as u8,
            };
            present.insert(subnet, value);
        }
        let key = |subnet: &Subnet| {
            PrefixKey::new(
                u32::from(subnet.prefix_len),
                u32::from_ne_bytes(subnet.network.octets()),
            )
        };
        let mut writes = 0;
        for stale in present.keys().filter(|s| !wanted.contains_key(s)) {
            self.onlink_subnets
                .remove(&key(stale))
                .with_context(|| format!("removing {stale} from ONLINK_SUBNETS"))?;
            writes += 1;
        }
        for (subnet, value) in &wanted {
            if present.get(subnet) != Some(value) {
                self.onlink_subnets
                    .insert(&key(subnet), value, 0)
                    .with_context(|| format!("adding {subnet} to ONLINK_SUBNETS"))?;
                writes += 1;
            }
        }
        Ok(writes)
    }

    /// What `MESH`, `NODES`, `SERVICES`, `BACKENDS` and `MAGLEV` hold now (active backends
    /// only). Every
    /// slot of `BACKENDS` is read, not only those the state names, so that a slot left active
    /// by an interrupted command is found and cleared; in batches, which takes a few
    /// milliseconds where one lookup per slot took a tenth of a second.
    pub fn read_contents(&self) -> Result<MapContents> {
        let mut contents = MapContents {
            mesh: self.mesh.get(&0, 0).context("reading MESH")?,
            mesh6: self.mesh6.get(&0, 0).context("reading MESH6")?,
            ..MapContents::default()
        };
        for_each_entry(self.nodes.map(), |ip: u32, _: u32| {
            contents.nodes.insert(ip);
        })
        .context("reading NODES")?;
        for_each_entry(self.nodes6.map(), |addr: Addr6, key: u32| {
            contents.nodes6.insert(addr, key);
        })
        .context("reading NODES6")?;
        for_each_entry(self.node_addrs6.map(), |key: u32, addr: Addr6| {
            contents.node_addrs6.insert(key, addr);
        })
        .context("reading NODE_ADDRS6")?;
        for_each_entry(self.services.map(), |key, value| {
            contents.services.insert(key, value);
        })
        .context("reading SERVICES")?;
        for_each_entry(self.service_ports.map(), |word: u32, bits: u64| {
            if bits != 0 {
                contents.service_ports.insert(word, bits);
            }
        })
        .context("reading SERVICE_PORTS")?;
        for_each_entry(self.local_backends.map(), |key, _: u32| {
            contents.local_backends.insert(key);
        })
        .context("reading LOCAL_BACKENDS")?;
        for_each_entry(self.local_backends6.map(), |key, _: u32| {
            contents.local_backends6.insert(key);
        })
        .context("reading LOCAL_BACKENDS6")?;
        for_each_entry(self.backends.map(), |id, backend: Backend| {
            if backend.flags & BACKEND_ACTIVE != 0 {
                contents.backends.insert(id, backend);
            }
        })
        .context("reading BACKENDS")?;
        for_each_entry(self.maglev.map(), |id, table: MaglevTable| {
            contents.maglev.insert(id, Box::new(table));
        })
        .context("reading MAGLEV")?;
        for_each_entry(self.services6.map(), |key, value| {
            contents.services6.insert(key, value);
        })
        .context("reading SERVICES6")?;
        for_each_entry(self.maglev6.map(), |id, table: MaglevTable| {
            contents.maglev6.insert(id, Box::new(table));
        })
        .context("reading MAGLEV6")?;
        for (id, backend) in &contents.backends {
            if backend.flags & BACKEND_IPV6 != 0 {
                let addr = self
                    .backend_addrs6
                    .get(id, 0)
                    .with_context(|| format!("reading BACKEND_ADDRS6 slot {id}"))?;
                contents.backend_addrs6.insert(*id, addr);
            }
        }
        Ok(contents)
    }

    /// Writes a delta in the order `Delta` documents.
    pub fn apply(&mut self, delta: &Delta) -> Result<()> {
        // This node's IPv6 address is there before `MESH` names the node by its key, and
        // stays until `MESH` no longer does.
        let mesh6_first = delta.mesh6.is_some_and(|addr| addr != [0; 16]);
        if mesh6_first {
            self.write_mesh6(delta)?;
        }
        if let Some(mesh) = &delta.mesh {
            self.mesh.set(0, mesh, 0).context("writing MESH")?;
        }
        if !mesh6_first {
            self.write_mesh6(delta)?;
        }
        for (key, addr) in &delta.node_addrs6_to_write {
            self.node_addrs6
                .insert(key, addr, 0)
                .with_context(|| format!("adding node {} to NODE_ADDRS6", Ipv6Addr::from(*addr)))?;
        }
        for (addr, key) in &delta.nodes6_to_write {
            self.nodes6
                .insert(addr, key, 0)
                .with_context(|| format!("adding node {} to NODES6", Ipv6Addr::from(*addr)))?;
        }
        for ip in &delta.nodes_to_add {
            self.nodes
                .insert(ip, 0, 0)
                .with_context(|| format!("adding node {} to NODES", show_ip(*ip)))?;
        }
        for key in &delta.local_backends_to_add {
            self.local_backends
                .insert(key, 0, 0)
                .with_context(|| format!("adding {} to LOCAL_BACKENDS", show_local(key)))?;
        }
        for key in &delta.local_backends6_to_add {
            self.local_backends6
                .insert(key, 0, 0)
                .with_context(|| format!("adding {} to LOCAL_BACKENDS6", show_local6(key)))?;
        }
        for id in &delta.new_backend_ids {
            self.backend_stats
                .set(*id, per_cpu(BackendStats::default())?, 0)
                .with_context(|| format!("resetting counters of backend slot {id}"))?;
            // A slot's new backend inherits neither the failures nor the ejection of the old.
            self.passive_health
                .set(*id, PassiveHealth::default(), 0)
                .with_context(|| format!("resetting passive health of backend slot {id}"))?;
        }
        for (id, addr) in &delta.backend_addrs6_to_write {
            self.backend_addrs6
                .set(*id, addr, 0)
                .with_context(|| format!("writing BACKEND_ADDRS6 slot {id}"))?;
        }
        for (id, backend) in &delta.backends_to_write {
            self.backends
                .set(*id, backend, 0)
                .with_context(|| format!("writing backend slot {id}"))?;
        }
        for id in &delta.new_service_ids {
            self.rr_cursors
                .set(*id, RrCursor::default(), 0)
                .with_context(|| format!("resetting round-robin cursor {id}"))?;
        }
        for (id, table) in &delta.maglev_to_write {
            self.maglev
                .insert(id, table.as_ref(), 0)
                .with_context(|| format!("writing the maglev table of service {id}"))?;
        }
        for (key, value) in &delta.services_to_write {
            self.services
                .insert(key, value, 0)
                .context("writing a service")?;
        }
        for id in &delta.new_service_ids6 {
            self.rr_cursors6
                .set(*id, RrCursor::default(), 0)
                .with_context(|| format!("resetting IPv6 round-robin cursor {id}"))?;
        }
        for (id, table) in &delta.maglev6_to_write {
            self.maglev6
                .insert(id, table.as_ref(), 0)
                .with_context(|| format!("writing the IPv6 maglev table of service {id}"))?;
        }
        for (key, value) in &delta.services6_to_write {
            self.services6
                .insert(key, value, 0)
                .context("writing an IPv6 service")?;
        }
        for (word, bits) in &delta.service_ports_to_write {
            self.service_ports
                .set(*word, bits, 0)
                .with_context(|| format!("writing word {word} of SERVICE_PORTS"))?;
        }
        for key in &delta.services_to_delete {
            self.services.remove(key).context("deleting a service")?;
        }
        for key in &delta.services6_to_delete {
            self.services6
                .remove(key)
                .context("deleting an IPv6 service")?;
        }
        for id in &delta.maglev6_to_delete {
            self.maglev6
                .remove(id)
                .with_context(|| format!("deleting the IPv6 maglev table of service {id}"))?;
        }
        for id in &delta.maglev_to_delete {
            self.maglev
                .remove(id)
                .with_context(|| format!("deleting the maglev table of service {id}"))?;
        }
        for id in &delta.backends_to_clear {
            self.backends
                .set(*id, Backend::default(), 0)
                .with_context(|| format!("clearing backend slot {id}"))?;
        }
        for key in &delta.local_backends_to_remove {
            self.local_backends
                .remove(key)
                .with_context(|| format!("removing {} from LOCAL_BACKENDS", show_local(key)))?;
        }
        for key in &delta.local_backends6_to_remove {
            self.local_backends6
                .remove(key)
                .with_context(|| format!("removing {} from LOCAL_BACKENDS6", show_local6(key)))?;
        }
        for ip in &delta.nodes_to_remove {
            self.nodes
                .remove(ip)
                .with_context(|| format!("removing node {} from NODES", show_ip(*ip)))?;
        }
        for addr in &delta.nodes6_to_remove {
            self.nodes6
                .remove(addr)
                .with_context(|| format!("removing node {} from NODES6", Ipv6Addr::from(*addr)))?;
        }
        for key in &delta.node_addrs6_to_remove {
            self.node_addrs6
                .remove(key)
                .with_context(|| format!("removing node key {} from NODE_ADDRS6", show_ip(*key)))?;
        }
        Ok(())
    }

    fn write_mesh6(&mut self, delta: &Delta) -> Result<()> {
        if let Some(addr) = &delta.mesh6 {
            self.mesh6.set(0, addr, 0).context("writing MESH6")?;
        }
        Ok(())
    }

    /// Reason counters summed over CPUs, in `Reason::ALL` order.
    pub fn reason_totals(&self) -> Result<Vec<Counter>> {
        lb_common::Reason::ALL
            .iter()
            .map(|reason| {
                let values = self.reason_stats.get(&(*reason as u32), 0)?;
                Ok(values.iter().fold(Counter::default(), |sum, c| Counter {
                    packets: sum.packets + c.packets,
                    bytes: sum.bytes + c.bytes,
                }))
            })
            .collect()
    }

    /// Event counters summed over CPUs, in `Event::ALL` order.
    pub fn event_totals(&self) -> Result<Vec<u64>> {
        lb_common::Event::ALL
            .iter()
            .map(|event| Ok(self.event_stats.get(&(*event as u32), 0)?.iter().sum()))
            .collect()
    }

    /// Scans the flow table: how many entries it holds, and how many live flows each backend
    /// has now (see [`flow_is_live`]).
    pub fn flow_census(&self) -> Result<FlowCensus> {
        self.flow_census_at(monotonic_ns())
    }

    /// [`Maps::flow_census`] as it would be at `now` (CLOCK_MONOTONIC, ns). A test cannot put
    /// a flow's last packet before boot, so it looks from the future instead: on a machine up
    /// for ten minutes, "idle for two hours" is a census two hours after the flow's last packet.
    pub fn flow_census_at(&self, now: u64) -> Result<FlowCensus> {
        let mut census = FlowCensus::default();
        for entry in self.flows.iter() {
            // An entry evicted between the key walk and its lookup is simply not counted.
            let Ok((key, flow)) = entry else { continue };
            census.entries += 1;
            if flow_is_live(&key, &flow, now) {
                *census.live.entry(flow.backend_id).or_default() += 1;
            }
        }
        for entry in self.flows6.iter() {
            let Ok((key, flow)) = entry else { continue };
            census.entries6 += 1;
            // The IPv6 flow's state as an IPv4 one's: the same flags and clock.
            let as_ipv4 = (
                FlowKey {
                    proto: key.proto,
                    ..FlowKey::default()
                },
                FlowValue {
                    flags: flow.flags,
                    last_seen_ns: flow.last_seen_ns,
                    ..FlowValue::default()
                },
            );
            if flow_is_live(&as_ipv4.0, &as_ipv4.1, now) {
                *census.live.entry(flow.backend_id).or_default() += 1;
            }
        }
        Ok(census)
    }

    /// One backend's counters summed over CPUs.
    /// What the data plane saw of backend `id`'s connections (`PASSIVE_HEALTH`).
    pub fn passive_health(&self, id: u32) -> Result<PassiveHealth> {
        self.passive_health
            .get(&id, 0)
            .with_context(|| format!("reading passive health of backend slot {id}"))
    }

    pub fn backend_totals(&self, id: u32) -> Result<BackendStats> {
        let values = self.backend_stats.get(&id, 0)?;
        Ok(values
            .iter()
            .fold(BackendStats::default(), |s, v| BackendStats {
                packets: s.packets + v.packets,
                bytes: s.bytes + v.bytes,
                reply_packets: s.reply_packets + v.reply_packets,
                reply_bytes: s.reply_bytes + v.reply_bytes,
                new_flows: s.new_flows + v.new_flows,
            }))
    }
}

/// Whether the data plane has a backend whose `PASSIVE_HEALTH` entry is `health` ejected at
/// `now_ns` ([`monotonic_ns`]), as `passive::is_ejected` decides it.
pub fn is_ejected(health: &PassiveHealth, now_ns: u64) -> bool {
    health.ejected_ns != 0
        && now_ns.wrapping_sub(health.ejected_ns) < lb_common::PASSIVE_EJECTION_NS
}

/// Ends the data plane's ejection of backend `id` in `PASSIVE_HEALTH` (`map`): its failures
/// start over, and a return is counted. A failure the data plane counts between the read and
/// the write is lost, as a probe result between two probes would be.
pub fn end_ejection(map: &mut Array<MapData, PassiveHealth>, id: u32) -> Result<()> {
    let health = map
        .get(&id, 0)
        .with_context(|| format!("reading passive health of backend slot {id}"))?;
    let ended = PassiveHealth {
        failures: 0,
        ejected_ns: 0,
        returns: health.returns + 1,
        ..health
    };
    map.set(id, ended, 0)
        .with_context(|| format!("ending the ejection of backend slot {id}"))
}

/// Calls `f` with every entry of `map` (an array or a hash whose keys and values are `K` and
/// `V`), read in batches (see `map_ops::for_each_raw`).
fn for_each_entry<K: Pod, V: Pod>(map: &MapData, mut f: impl FnMut(K, V)) -> Result<()> {
    let info = map.info()?;
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    if (key_size, value_size) != (size_of::<K>(), size_of::<V>()) {
        bail!("unexpected key/value sizes {key_size}/{value_size}");
    }
    map_ops::for_each_raw(map.fd().as_fd(), key_size, value_size, |key, value| {
        // SAFETY: `key` and `value` hold `size_of::<K>()` and `size_of::<V>()` bytes, and `K`
        // and `V` are `Pod`: any bytes are a valid value.
        let (key, value) = unsafe {
            (
                std::ptr::read_unaligned(key.as_ptr().cast::<K>()),
                std::ptr::read_unaligned(value.as_ptr().cast::<V>()),
            )
        };
        f(key, value);
    })
}

/// A random non-zero cookie, from the kernel's generator.
pub(crate) fn random_cookie() -> Result<u32> {
    loop {
        let mut bytes = [0u8; 4];
        // SAFETY: writes at most the 4 bytes it is given.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != 4 {
            return Err(std::io::Error::last_os_error()).context("getrandom");
        }
        let cookie = u32::from_ne_bytes(bytes);
        if cookie != 0 {
            return Ok(cookie);
        }
    }
}

/// An address kept in network byte order, for messages.
fn show_ip(ip_be: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(ip_be.to_ne_bytes())
}

/// A `LOCAL_BACKENDS` key, for messages: `IP:PORT/PROTO`.
fn show_local6(key: &LocalBackendKey6) -> String {
    format!(
        "[{}]:{}/{}",
        std::net::Ipv6Addr::from(key.addr),
        u16::from_be(key.port_be),
        key.proto
    )
}

fn show_local(key: &LocalBackendKey) -> String {
    format!(
        "{}:{}/{}",
        show_ip(key.ip_be),
        u16::from_be(key.port_be),
        key.proto
    )
}

fn per_cpu<T: aya::Pod>(value: T) -> Result<PerCpuValues<T>> {
    let cpus = nr_cpus().map_err(|(what, err)| anyhow!("{what}: {err}"))?;
    Ok(PerCpuValues::try_from(vec![value; cpus])?)
}

/// Removes a folder of pins (maps or links). Unpinning drops the kernel's reference: maps go
/// once no program uses them, links detach their program.
pub fn remove_pins(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// What a scan of the flow table found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCensus {
    /// Entries of the IPv4 flow table (`FLOWS`) and of the IPv6 one (`FLOWS6`).
    pub entries: u64,
    pub entries6: u64,
    /// Live flows by backend id.
    pub live: BTreeMap<u32, u64>,
}

/// A TCP flow idle this long without a FIN or RST is taken for abandoned (its client vanished).
/// The data plane gives such a flow's hairpin port away by the same rule.
pub const TCP_IDLE_NS: u64 = lb_common::FLOW_IDLE_TCP_NS;
/// UDP has no end: a flow idle this long is over.
pub const UDP_IDLE_NS: u64 = lb_common::FLOW_IDLE_UDP_NS;

/// A flow is live while its connection has not ended (`FLOW_CLOSING` unset) and its client has
/// sent a packet within the idle limit of its protocol. Entries stay in the table after that
/// (so late packets still reach the same backend) until the LRU evicts them.
pub fn flow_is_live(key: &FlowKey, flow: &FlowValue, now_ns: u64) -> bool {
    let idle = if key.proto == lb_common::PROTO_TCP {
        TCP_IDLE_NS
    } else {
        UDP_IDLE_NS
    };
    let age = now_ns.saturating_sub(flow.last_seen_ns);
    // A handshake its backend never answered keeps the time of its first SYN.
    let abandoned =
        flow.flags & lb_common::FLOW_AWAITING_REPLY != 0 && age >= lb_common::FLOW_ABANDONED_NS;
    flow.flags & lb_common::FLOW_CLOSING == 0
        && !abandoned
        && age < idle + lb_common::FLOW_SEEN_GRANULARITY_NS
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_coarse_ns` reads (at tick
/// granularity, so a flow's `last_seen_ns` is never ahead of this).
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC always exists");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: exactly what `bpf_ktime_get_coarse_ns` reads, so a
/// time written for the data plane to compare with its own clock is never ahead of it.
pub fn monotonic_coarse_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE always exists");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Bytes in megabytes (10^6, as `bpftool` users count them), to a tenth.
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv6 tables take an eighth of the IPv4 size, at least 4,096, unless chosen; the
    /// chosen size is taken as it is, smaller or larger than the IPv4 tables.
    #[test]
    fn the_ipv6_flow_tables_take_their_share_unless_sized() {
        for (ipv4, ipv6, want) in [
            (1 << 20, None, 1 << 17),
            (65_536, None, 8192),
            (8192, None, 4096),
            (64, None, 4096),
            (8192, Some(16_384), 16_384),
            (1 << 20, Some(64), 64),
        ] {
            let capacity = FlowCapacity::new(ipv4, ipv6);
            assert_eq!(
                capacity,
                FlowCapacity { ipv4, ipv6: want },
                "{ipv4} {ipv6:?}"
            );
            for name in [
                map_names::FLOWS,
                map_names::REVERSE_FLOWS,
                map_names::TUNNEL_REPLIES,
            ] {
                assert_eq!(capacity.entries(name), ipv4, "{name}");
            }
            for name in [
                map_names::FLOWS6,
                map_names::REVERSE_FLOWS6,
                map_names::TUNNEL_REPLIES6,
            ] {
                assert_eq!(capacity.entries(name), want, "{name}");
            }
        }
        assert_eq!(
            FlowCapacity::default(),
            FlowCapacity::new(lb_common::DEFAULT_FLOW_CAPACITY, None)
        );
    }

    #[test]
    fn flows_end_with_fin_or_rst_or_idleness() {
        let tcp = FlowKey {
            proto: lb_common::PROTO_TCP,
            ..FlowKey::default()
        };
        let udp = FlowKey {
            proto: lb_common::PROTO_UDP,
            ..FlowKey::default()
        };
        let now = 10 * TCP_IDLE_NS;
        let seen = |ago: u64, flags: u8| FlowValue {
            last_seen_ns: now - ago,
            flags,
            ..FlowValue::default()
        };
        assert!(flow_is_live(&tcp, &seen(0, 0), now));
        assert!(!flow_is_live(&tcp, &seen(0, lb_common::FLOW_CLOSING), now));
        assert!(flow_is_live(&tcp, &seen(TCP_IDLE_NS / 2, 0), now));
        assert!(!flow_is_live(&tcp, &seen(2 * TCP_IDLE_NS, 0), now));
        assert!(flow_is_live(&udp, &seen(UDP_IDLE_NS / 2, 0), now));
        assert!(!flow_is_live(&udp, &seen(2 * UDP_IDLE_NS, 0), now));
        // A handshake its backend never answered, given up by its client.
        let awaiting = lb_common::FLOW_AWAITING_REPLY;
        assert!(flow_is_live(&tcp, &seen(60 * 1_000_000_000, awaiting), now));
        assert!(!flow_is_live(
            &tcp,
            &seen(lb_common::FLOW_ABANDONED_NS, awaiting),
            now
        ));
    }

    /// The clock starts at boot, so the oldest time a flow can hold is 0, and a census may read
    /// the clock before the packet it then finds: neither depends on how long the machine is up.
    #[test]
    fn liveness_holds_at_any_uptime() {
        let tcp = FlowKey {
            proto: lb_common::PROTO_TCP,
            ..FlowKey::default()
        };
        let at_boot = FlowValue::default();
        let ten_minutes = 600 * 1_000_000_000;
        assert!(flow_is_live(&tcp, &at_boot, ten_minutes), "up 10 min");
        assert!(!flow_is_live(&tcp, &at_boot, 2 * TCP_IDLE_NS), "up 2 h");
        let ahead = FlowValue {
            last_seen_ns: ten_minutes + 5,
            ..FlowValue::default()
        };
        assert!(
            flow_is_live(&tcp, &ahead, ten_minutes),
            "seen after the clock was read"
        );
    }
}
