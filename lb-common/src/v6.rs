//! The IPv6 half of the data plane's tables: keys and values of the maps that hold IPv6
//! services, flows and replies beside the IPv4 ones, so that an IPv4 entry does not grow by the
//! 24 bytes an IPv6 address would add to each of its addresses. Addresses are the wire's 16
//! bytes; ports are in network byte order, as in the IPv4 types.

/// An IPv6 address as the packet carries it.
pub type Addr6 = [u8; 16];

/// Key of `SERVICES6`: an IPv6 VIP (all zero: published on every local address), port and
/// protocol. Its value is a `ServiceValue` listing the service's IPv6 backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    pub vip: Addr6,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(ServiceKey6, 20);

/// An IPv6 connection's 5-tuple as seen on the wire: the key of `FLOWS6` (client → service) and
/// of `REVERSE_FLOWS6` (backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src: Addr6,
    pub dst: Addr6,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
assert_size!(FlowKey6, 40);

/// Value of `FLOWS6`: the backend an IPv6 connection is pinned to (its address kept, as in
/// `FlowValue`, so that a reused backend slot is seen as stale).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue6 {
    pub backend_id: u32,
    pub backend_port_be: u16,
    /// `FLOW_*` flags.
    pub flags: u8,
    pub _pad: u8,
    pub backend_ip: Addr6,
    /// When the client last sent a packet of the flow, as `FlowValue::last_seen_ns`.
    pub last_seen_ns: u64,
}
assert_size!(FlowValue6, 32);

/// Value of `REVERSE_FLOWS6`: what a backend's IPv6 reply must look like to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseValue6 {
    /// The address and port the client connected to.
    pub orig_ip: Addr6,
    pub orig_port_be: u16,
    pub _pad: u16,
    pub backend_id: u32,
}
assert_size!(ReverseValue6, 24);

/// Key of `LOCAL_BACKENDS6`: an IPv6 backend this node reaches by plain routing (hosted here, or
/// on no node), as a decapsulated packet addresses it (`LocalBackendKey` for IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalBackendKey6 {
    pub addr: Addr6,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(LocalBackendKey6, 20);

impl FlowKey6 {
    /// The key of this 5-tuple, its padding zero.
    #[inline(always)]
    pub fn new(src: Addr6, dst: Addr6, src_port_be: u16, dst_port_be: u16, proto: u8) -> Self {
        FlowKey6 {
            src,
            dst,
            src_port_be,
            dst_port_be,
            proto,
            _pad: [0; 3],
        }
    }

    /// The reply's 5-tuple of this client → service flow pinned to `backend`:`port_be`.
    #[inline(always)]
    pub fn reply_of(&self, backend: Addr6, port_be: u16) -> Self {
        FlowKey6::new(backend, self.src, port_be, self.src_port_be, self.proto)
    }
}

/// The 32-bit words of an address, as numbers (the same on every host).
#[inline(always)]
fn words(addr: &Addr6) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = u32::from_be_bytes([
            addr[4 * i],
            addr[4 * i + 1],
            addr[4 * i + 2],
            addr[4 * i + 3],
        ]);
        i += 1;
    }
    out
}

/// Bob Jenkins' mix of three words (the kernel's `__jhash_mix`).
#[inline(always)]
fn mix(mut a: u32, mut b: u32, mut c: u32) -> (u32, u32, u32) {
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(4);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(6);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(8);
    b = b.wrapping_add(a);
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(16);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(19);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(4);
    b = b.wrapping_add(a);
    (a, b, c)
}

/// Bob Jenkins' final mix (the kernel's `__jhash_final`), shared with `flow_hash`.
#[inline(always)]
pub(crate) fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

/// The hash of an IPv6 flow's client-side 5-tuple that chooses its maglev slot: the kernel's
/// `jhash2` over the nine words of both whole addresses and the ports, seeded with the protocol,
/// computed on numeric values so that every node (and userspace) gets the same.
#[inline(always)]
pub fn flow_hash6(key: &FlowKey6) -> u32 {
    const JHASH_INITVAL: u32 = 0xdead_beef;
    let (s, d) = (words(&key.src), words(&key.dst));
    let ports =
        (u32::from(u16::from_be(key.src_port_be)) << 16) | u32::from(u16::from_be(key.dst_port_be));
    let init = JHASH_INITVAL
        .wrapping_add(u32::from(key.proto))
        .wrapping_add(9 << 2);
    let (a, b, c) = mix(
        init.wrapping_add(s[0]),
        init.wrapping_add(s[1]),
        init.wrapping_add(s[2]),
    );
    let (a, b, c) = mix(
        a.wrapping_add(s[3]),
        b.wrapping_add(d[0]),
        c.wrapping_add(d[1]),
    );
    jhash_final(
        a.wrapping_add(d[2]),
        b.wrapping_add(d[3]),
        c.wrapping_add(ports),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src_last: u8, dst_last: u8, sport: u16) -> FlowKey6 {
        let mut src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut dst = src;
        src[15] = src_last;
        dst[15] = dst_last;
        FlowKey6::new(src, dst, sport.to_be(), 80u16.to_be(), 6)
    }

    #[test]
    fn the_hash_covers_every_part_of_the_tuple() {
        let base = flow_hash6(&key(1, 2, 40000));
        assert_eq!(base, flow_hash6(&key(1, 2, 40000)), "deterministic");
        assert_ne!(base, flow_hash6(&key(3, 2, 40000)), "source address");
        assert_ne!(base, flow_hash6(&key(1, 4, 40000)), "destination address");
        assert_ne!(base, flow_hash6(&key(1, 2, 40001)), "source port");
        let mut high = key(1, 2, 40000);
        high.src[0] = 0x30;
        assert_ne!(
            base,
            flow_hash6(&high),
            "the address's first bytes count too"
        );
        let mut udp = key(1, 2, 40000);
        udp.proto = 17;
        assert_ne!(base, flow_hash6(&udp), "protocol");
    }

    #[test]
    fn the_hash_spreads_sequential_clients_evenly() {
        let mut buckets = [0u32; 16];
        for i in 0..16_000u32 {
            let mut k = key(0, 2, 40000 + (i % 1000) as u16);
            k.src[13] = (i / 1000) as u8;
            k.src[14] = (i >> 8) as u8;
            k.src[15] = i as u8;
            buckets[(flow_hash6(&k) % 16) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (850..1150).contains(&n)),
            "{buckets:?}"
        );
    }
}
