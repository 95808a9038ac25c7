//! Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
//!
//! Values are 16-bit words exactly as they sit in the packet, read as native integers: the
//! one's-complement sum does not depend on byte order as long as every operand uses the same.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `check` after one 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// `check` after a 32-bit field (an IPv4 address) changed from `old` to `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check) + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// `check` after a 16-byte field (an IPv6 address) changed from `old` to `new`.
#[inline(always)]
pub fn replace128(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut sum = u32::from(!check);
    let mut i = 0;
    while i < 16 {
        sum += u32::from(!u16::from_ne_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_ne_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    !fold(sum)
}

/// Applies `update` to a TCP or UDP checksum. A UDP checksum of zero means "none" and stays
/// zero; a computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn update_l4(check: u16, is_udp: bool, update: impl FnOnce(u16) -> u16) -> u16 {
    if is_udp && check == 0 {
        return 0;
    }
    let new = update(check);
    if is_udp && new == 0 { 0xffff } else { new }
}

/// Checksum of an IPv4 header without options whose `check` field is zero.
#[inline(always)]
pub fn ipv4_header(header: &network_types::ip::Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 bytes of plain data with alignment 1.
    let bytes: &[u8; 20] = unsafe { &*(header as *const network_types::ip::Ipv4Hdr).cast() };
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    !fold(sum)
}
