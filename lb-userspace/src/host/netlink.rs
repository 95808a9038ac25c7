//! Route netlink, spoken directly: the requests `underlay` and `task_routes` make of the kernel
//! (list links, look a route up, list, add and delete neighbour entries and host routes), with
//! the kernel's own error codes.
//!
//! A socket belongs to the namespace of the thread that opens it, so one opened after lbctl
//! entered an instance's namespace (`setns`) reads and changes that namespace, as `getifaddrs`
//! does. Used by `underlay` and `task_routes`.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_MULTIPART, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric,
        RouteProtocol, RouteScope, RouteType,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An interface as `RTM_GETLINK` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The index of the interface this one is a port of (a bridge), if any.
    pub master: Option<u32>,
    /// The link-layer address, when it is an Ethernet one.
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// A veth: its other end is in some namespace, where `bpf_redirect_peer` can send.
    pub veth: bool,
}

/// A MAC address a bridge learned (or was told) behind one of its ports, as the bridge's
/// forwarding database lists it (`bridge fdb show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub bridge: u32,
    pub port: u32,
    pub mac: [u8; 6],
}

impl Link {
    fn of(message: &LinkMessage) -> Option<Link> {
        let mut link = Link {
            index: message.header.index,
            name: String::new(),
            master: None,
            mac: None,
            mtu: None,
            veth: false,
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Controller(index) => link.master = Some(*index),
                LinkAttribute::Address(address) => {
                    link.mac = <[u8; 6]>::try_from(&address[..]).ok()
                }
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::LinkInfo(infos) => {
                    link.veth = infos
                        .iter()
                        .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)))
                }
                _ => {}
            }
        }
        (!link.name.is_empty()).then_some(link)
    }
}

/// A route as `RTM_GETROUTE` for one destination answers it: the kernel's own decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub kind: RouteType,
    /// The interface it leaves by.
    pub oif: Option<u32>,
    /// An IPv4 route's IPv4 gateway, an IPv6 route's IPv6 one (often link-local).
    pub gateway: Option<IpAddr>,
    /// The route's own MTU (`mtu [lock] N`, or one path MTU discovery learnt), if it has one:
    /// otherwise its interface's applies.
    pub mtu: Option<u32>,
}

impl Route {
    pub fn of(message: &RouteMessage) -> Route {
        let mut route = Route {
            kind: message.header.kind,
            oif: None,
            gateway: None,
            mtu: None,
        };
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Oif(index) => route.oif = Some(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(gateway)) => {
                    route.gateway = Some(IpAddr::V4(*gateway))
                }
                RouteAttribute::Gateway(RouteAddress::Inet6(gateway)) => {
                    route.gateway = Some(IpAddr::V6(*gateway))
                }
                RouteAttribute::Metrics(metrics) => {
                    route.mtu = metrics.iter().find_map(|metric| match metric {
                        RouteMetric::Mtu(mtu) => Some(*mtu),
                        _ => None,
                    })
                }
                _ => {}
            }
        }
        route
    }
}

/// A host route (`/32`) of the main table, as a dump lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRoute {
    pub dst: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

/// An IPv4 or IPv6 neighbour entry as `RTM_GETNEIGH` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub ifindex: u32,
    pub state: NeighbourState,
    /// Kept resolved by the kernel (`NTF_EXT_MANAGED`).
    pub managed: bool,
}

impl Neighbour {
    pub fn of(message: &NeighbourMessage) -> Option<Neighbour> {
        let addr = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)) => {
                Some(IpAddr::V4(*addr))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(addr)) => {
                Some(IpAddr::V6(*addr))
            }
            _ => None,
        })?;
        let managed = message.attributes.iter().any(|a| {
            matches!(a, NeighbourAttribute::ExtFlags(flags) if flags.contains(NeighbourExtFlags::Managed))
        });
        Some(Neighbour {
            addr,
            ifindex: message.header.ifindex,
            state: message.header.state,
            managed,
        })
    }
}

/// A route netlink socket in the namespace of the thread that opened it.
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
}

/// The kernel's answer to a request that failed: its errno, described as `strerror` does.
fn errno_text(code: i32) -> String {
    nix::errno::Errno::from_raw(code.abs()).desc().to_owned()
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, String> {
        let mut socket = Socket::new(NETLINK_ROUTE)
            .map_err(|err| format!("cannot open a route netlink socket: {err}"))?;
        socket
            .bind_auto()
            .and_then(|_| socket.connect(&SocketAddr::new(0, 0)))
            .map_err(|err| format!("cannot bind a route netlink socket: {err}"))?;
        Ok(Rtnl {
            socket,
            sequence: 0,
        })
    }

    /// Sends `message` with `flags` (besides `NLM_F_REQUEST`) and collects the answers: up to
    /// `NLMSG_DONE` for a dump, the acknowledgement for `NLM_F_ACK`, else the one answer. A
    /// netlink error is the kernel's errno text ("Network is unreachable").
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, String> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);
        self.socket
            .send(&buffer, 0)
            .map_err(|err| format!("cannot send to route netlink: {err}"))?;
        let mut answers = Vec::new();
        loop {
            let (datagram, _) = self
                .socket
                .recv_from_full()
                .map_err(|err| format!("cannot read route netlink: {err}"))?;
            let mut rest = &datagram[..];
            while !rest.is_empty() {
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                    .map_err(|err| format!("unexpected route netlink answer: {err}"))?;
                let length = (answer.header.length as usize).clamp(1, rest.len());
                rest = &rest[length..];
                if answer.header.sequence_number != self.sequence {
                    continue; // The answer to an earlier request that was given up on.
                }
                let multipart = answer.header.flags & NLM_F_MULTIPART != 0;
                match answer.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(answers), // The acknowledgement.
                            Some(code) => Err(errno_text(code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if !multipart && flags & (NLM_F_DUMP | NLM_F_ACK) == 0 {
                            return Ok(answers);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every interface of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, String> {
        let answers = self
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )
            .map_err(|err| format!("listing the interfaces: {err}"))?;
        Ok(answers
            .iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Link::of(link),
                _ => None,
            })
            .collect())
    }

    /// The interfaces' names by index.
    pub fn link_names(&mut self) -> Result<BTreeMap<u32, String>, String> {
        Ok(self
            .links()?
            .into_iter()
            .map(|link| (link.index, link.name))
            .collect())
    }

    /// The route the kernel would take to `dst` (`ip route get`, `ip -6 route get`).
    pub fn route_get(&mut self, dst: IpAddr) -> Result<Route, String> {
        let mut message = RouteMessage::default();
        let (family, prefix_len, address) = match dst {
            IpAddr::V4(dst) => (AddressFamily::Inet, 32, RouteAddress::Inet(dst)),
            IpAddr::V6(dst) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(dst)),
        };
        message.header.address_family = family;
        message.header.destination_prefix_length = prefix_len;
        message.header.flags = RouteFlags::LookupTable;
        message
            .attributes
            .push(RouteAttribute::Destination(address));
        let answers = self.request(RouteNetlinkMessage::GetRoute(message), 0)?;
        answers
            .iter()
            .find_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(route) => Some(Route::of(route)),
                _ => None,
            })
            .ok_or_else(|| "no answer".to_owned())
    }

    /// The namespace's IPv4 and IPv6 neighbour entries (`ip neigh show`, `ip -6 neigh show`).
    pub fn neighbours(&mut self) -> Result<Vec<Neighbour>, String> {
        let mut entries = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut message = NeighbourMessage::default();
            message.header.family = family;
            let answers = self.request(RouteNetlinkMessage::GetNeighbour(message), NLM_F_DUMP)?;
            entries.extend(answers.iter().filter_map(|answer| match answer {
                RouteNetlinkMessage::NewNeighbour(entry) if entry.header.family == family => {
                    Neighbour::of(entry)
                }
                _ => None,
            }));
        }
        Ok(entries)
    }

    /// The bridges' forwarding databases: every unicast MAC a bridge reaches through a port,
    /// learned or static. The bridges' own addresses (permanent, "local") are left out.
    pub fn bridge_fdb(&mut self) -> Result<Vec<FdbEntry>, String> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        let answers = self
            .request(RouteNetlinkMessage::GetNeighbour(message), NLM_F_DUMP)
            .map_err(|err| format!("listing the bridges' forwarding entries: {err}"))?;
        Ok(answers
            .iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewNeighbour(entry)
                    if entry.header.family == AddressFamily::Bridge
                        && entry.header.state != NeighbourState::Permanent =>
                {
                    let mut bridge = None;
                    let mut mac = None;
                    for attribute in &entry.attributes {
                        match attribute {
                            NeighbourAttribute::Controller(index) => bridge = Some(*index),
                            NeighbourAttribute::LinkLayerAddress(address) => {
                                mac = <[u8; 6]>::try_from(&address[..]).ok()
                            }
                            _ => {}
                        }
                    }
                    let mac = mac.filter(|mac| mac[0] & 1 == 0)?;
                    Some(FdbEntry {
                        bridge: bridge?,
                        port: entry.header.ifindex,
                        mac,
                    })
                }
                _ => None,
            })
            .collect())
    }

    fn neighbour_message(addr: IpAddr, ifindex: u32) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        let (family, address) = match addr {
            IpAddr::V4(addr) => (AddressFamily::Inet, NeighbourAddress::Inet(addr)),
            IpAddr::V6(addr) => (AddressFamily::Inet6, NeighbourAddress::Inet6(addr)),
        };
        message.header.family = family;
        message.header.ifindex = ifindex;
        message.header.state = NeighbourState::None;
        message
            .attributes
            .push(NeighbourAttribute::Destination(address));
        message
    }

    /// Makes the entry for `addr` on `ifindex` managed, creating it or turning a learned one
    /// (`ip neigh replace ADDR dev DEV managed`: the same message, checked with strace).
    pub fn neighbour_replace_managed(&mut self, addr: IpAddr, ifindex: u32) -> Result<(), String> {
        let mut message = Self::neighbour_message(addr, ifindex);
        message
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        self.request(
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// The main table's IPv4 host routes made with `protocol` (`ip route show proto P`):
    /// destination, gateway and interface index.
    pub fn host_routes_of(&mut self, protocol: u8) -> Result<Vec<HostRoute>, String> {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        let answers = self
            .request(RouteNetlinkMessage::GetRoute(message), NLM_F_DUMP)
            .map_err(|err| format!("listing the routes: {err}"))?;
        Ok(answers
            .iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(route)
                    if route.header.protocol == RouteProtocol::from(protocol)
                        && route.header.destination_prefix_length == 32
                        && route.header.table == RouteHeader::RT_TABLE_MAIN =>
                {
                    let dst = route.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(dst)) => Some(*dst),
                        _ => None,
                    })?;
                    let found = Route::of(route);
                    Some(HostRoute {
                        dst,
                        gateway: match found.gateway {
                            Some(IpAddr::V4(gateway)) => Some(gateway),
                            _ => None,
                        },
                        oif: found.oif,
                    })
                }
                _ => None,
            })
            .collect())
    }

    fn host_route_message(dst: Ipv4Addr, protocol: u8) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = 32;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::from(protocol);
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        message
    }

    /// Routes `dst` through `gateway` on `ifindex`, marked with `protocol` (`ip route replace
    /// DST/32 via GATEWAY dev DEV proto P`).
    pub fn host_route_replace(
        &mut self,
        dst: Ipv4Addr,
        gateway: Ipv4Addr,
        ifindex: u32,
        protocol: u8,
    ) -> Result<(), String> {
        let mut message = Self::host_route_message(dst, protocol);
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        message.attributes.push(RouteAttribute::Oif(ifindex));
        self.request(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Deletes the host route to `dst` made with `protocol`.
    pub fn host_route_delete(&mut self, dst: Ipv4Addr, protocol: u8) -> Result<(), String> {
        let message = Self::host_route_message(dst, protocol);
        self.request(RouteNetlinkMessage::DelRoute(message), NLM_F_ACK)
            .map(drop)
    }

    /// Deletes the entry for `addr` on `ifindex`.
    pub fn neighbour_delete(&mut self, addr: IpAddr, ifindex: u32) -> Result<(), String> {
        let message = Self::neighbour_message(addr, ifindex);
        self.request(RouteNetlinkMessage::DelNeighbour(message), NLM_F_ACK)
            .map(drop)
    }
}
