//! Sealing of gossip datagrams (`lbctl daemon --cluster-key-file`): every datagram a node sends
//! is encrypted and authenticated with XChaCha20-Poly1305 under the first key of the cluster's
//! keyring, its header bound as associated data; a datagram that no key of the keyring opens,
//! or that was seen before, is dropped before chitchat sees it. Pure: no socket here (the
//! transport is `cluster::transport`).
//!
//! Why XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`): constant-time in software on any
//! CPU (no AES-NI needed), and its 24-byte nonce can be drawn at random for every datagram with
//! no risk of reuse, so no nonce state has to survive a restart.
//!
//! A sealed datagram: `LBG3` (magic), key id (4 bytes: the start of the key's SHA-256), sender
//! (8: random for each daemon run), counter (8: from 1, per sender), time (8: Unix
//! milliseconds at sealing), echo (8: the time of the newest datagram the sender opened from
//! the recipient, as the recipient sealed it; 0 if none), recipient (18: the gossip address it
//! is sent to, IPv6 or IPv4-mapped, then the port), part (1: index << 4 | count, a chitchat
//! message too large for one datagram once sealed travels in two or more), nonce (24), then the
//! ciphertext and its 16-byte tag.
//!
//! The echo tells a node that a peer opens what it sends: a peer that keeps sending without
//! ever echoing a datagram of this node's newer than a second cannot open them (its keyring
//! lacks this node's sealing key), which chitchat alone cannot see (the peer's own datagrams
//! still arrive, so it looks alive, with the table it had before it was cut off). Replays are refused in three steps: a datagram sealed for another node's
//! address is refused by every other node (a capture of what n2 sent n3, replayed to n1); a
//! datagram whose time is more than [`MAX_SKEW_MS`] from the receiver's clock is stale (a
//! capture replayed minutes or days later); and within that window each sender's counters are
//! remembered (the highest, and a bitmap of the 128 before it) so that a datagram is taken
//! once. A sender silent for twice the window is forgotten: anything it sent is stale by then.
use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use chacha20poly1305::{
    AeadCore, KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, OsRng, Payload, rand_core::RngCore},
};
use sha2::{Digest as _, Sha256};

const MAGIC: &[u8; 4] = b"LBG3";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes before the ciphertext, all of them authenticated.
pub const HEADER_LEN: usize = 4 + 4 + 8 + 8 + 8 + 8 + RECIPIENT_LEN + 1 + NONCE_LEN;
/// The recipient's address in the header: 16 bytes of IPv6 (IPv4-mapped for IPv4), the port.
const RECIPIENT_LEN: usize = 16 + 2;
/// Where the header's fields start: the sender's, its counter, time, echo, the recipient's
/// address, the part.
const SENDER_AT: usize = 8;
const COUNTER_AT: usize = 16;
const TIME_AT: usize = 24;
const ECHO_AT: usize = 32;
const RECIPIENT_AT: usize = 40;
const PART_AT: usize = RECIPIENT_AT + RECIPIENT_LEN;
const NONCE_AT: usize = PART_AT + 1;
/// Bytes sealing adds to each datagram.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// How far a datagram's time may be from the receiver's clock: the nodes' clocks must agree
/// within this (NTP does far better).
pub const MAX_SKEW_MS: u64 = 30_000;
/// Counters remembered below each sender's highest: datagrams reordered by more are refused.
const WINDOW: u64 = 128;
/// Most parts a message is cut into, and most messages waiting for their other parts.
const MAX_PARTS: usize = 15;
const MAX_PENDING: usize = 16;

/// A key of the keyring: its id (shown by `cluster ls`) and its cipher.
#[derive(Clone)]
struct Key {
    id: [u8; 4],
    cipher: XChaCha20Poly1305,
}

/// The cluster's keys, as the key file lists them: the first seals, every one opens.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| key_id_text(k.id)))
            .finish()
    }
}

/// A key id as `cluster ls` and the logs show it.
pub fn key_id_text(id: [u8; 4]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Keyring {
    /// Reads a key file: one key per line, 64 hex digits (32 bytes); blank lines and lines
    /// starting with `#` are ignored. At least one key, and no key twice.
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let mut keys: Vec<Key> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = hex_key(line)
                .ok_or_else(|| format!("line {}: not a key of 64 hex digits", n + 1))?;
            let digest = Sha256::digest(bytes);
            let id = [digest[0], digest[1], digest[2], digest[3]];
            if keys.iter().any(|k| k.id == id) {
                return Err(format!("line {}: the same key twice", n + 1));
            }
            keys.push(Key {
                id,
                cipher: XChaCha20Poly1305::new(&bytes.into()),
            });
        }
        if keys.is_empty() {
            return Err("no key in the file".to_owned());
        }
        Ok(Keyring { keys })
    }

    /// The text of a new key file with one fresh random key.
    pub fn generate() -> String {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "# lbctl gossip keyring: one key per line; the first seals, every key opens.\n\
             # To rotate: add the new key on every node, then make it first on every node, then\n\
             # remove the old one (each daemon reloads this file when it changes).\n{hex}\n"
        )
    }

    /// The id of the key that seals.
    pub fn sealing_id(&self) -> [u8; 4] {
        self.keys[0].id
    }

    /// The ids of every key, the sealing one first.
    pub fn ids(&self) -> Vec<[u8; 4]> {
        self.keys.iter().map(|k| k.id).collect()
    }
}

fn hex_key(text: &str) -> Option<[u8; KEY_LEN]> {
    if text.len() != 2 * KEY_LEN || !text.is_ascii() {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Not a sealed datagram, a key this node does not have, or one that does not open under
    /// its key (forged or altered): `unauthenticated`.
    Unauthenticated,
    /// Opened, but seen before, or sealed too long ago (or too far ahead): `replayed`.
    Replayed,
    /// Opened, but sealed for another recipient: what a node sent another node, replayed
    /// here, or a peer that reaches this node through an address translation (its gossip
    /// address is not the one it is reached at). Counted as `replayed`.
    Misdirected,
}

impl Rejection {
    pub const fn name(self) -> &'static str {
        match self {
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::Replayed | Rejection::Misdirected => "replayed",
        }
    }
}

/// Seals what one daemon run sends.
pub struct Sealer {
    sender: u64,
    counter: u64,
}

impl Default for Sealer {
    fn default() -> Self {
        Sealer {
            sender: OsRng.next_u64(),
            counter: 0,
        }
    }
}

impl Sealer {
    /// Seals `message` for `recipient` (the gossip address it is sent to) with `keyring`'s
    /// first key at `now_ms`, echoing `echo_ms` (the time of the newest datagram opened from
    /// the recipient): one datagram, or several (parts) when it would not fit in one once
    /// sealed.
    pub fn seal(
        &mut self,
        keyring: &Keyring,
        now_ms: u64,
        recipient: SocketAddr,
        echo_ms: u64,
        message: &[u8],
    ) -> Vec<Vec<u8>> {
        let room = MAX_DATAGRAM - OVERHEAD;
        let count = message.len().div_ceil(room).max(1);
        assert!(
            count <= MAX_PARTS,
            "a gossip message of {} bytes",
            message.len()
        );
        let per_part = message.len().div_ceil(count);
        let key = &keyring.keys[0];
        (0..count)
            .map(|index| {
                let chunk = &message[(index * per_part).min(message.len())
                    ..((index + 1) * per_part).min(message.len())];
                self.counter += 1;
                let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
                let mut datagram = Vec::with_capacity(OVERHEAD + chunk.len());
                datagram.extend_from_slice(MAGIC);
                datagram.extend_from_slice(&key.id);
                datagram.extend_from_slice(&self.sender.to_be_bytes());
                datagram.extend_from_slice(&self.counter.to_be_bytes());
                datagram.extend_from_slice(&now_ms.to_be_bytes());
                datagram.extend_from_slice(&echo_ms.to_be_bytes());
                datagram.extend_from_slice(&recipient_bytes(recipient));
                datagram.push(((index as u8) << 4) | count as u8);
                datagram.extend_from_slice(&nonce);
                let sealed = key
                    .cipher
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: chunk,
                            aad: &datagram,
                        },
                    )
                    .expect("encryption of a bounded buffer cannot fail");
                datagram.extend_from_slice(&sealed);
                datagram
            })
            .collect()
    }
}

/// `addr` as the header carries it.
fn recipient_bytes(addr: SocketAddr) -> [u8; RECIPIENT_LEN] {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut bytes = [0u8; RECIPIENT_LEN];
    bytes[..16].copy_from_slice(&ip.octets());
    bytes[16..].copy_from_slice(&addr.port().to_be_bytes());
    bytes
}

/// The recipient a sealed datagram names (whether or not it opens), for the logs.
pub fn recipient_of(datagram: &[u8]) -> Option<SocketAddr> {
    let bytes = datagram.get(RECIPIENT_AT..PART_AT)?;
    let octets: [u8; 16] = bytes[..16].try_into().expect("16");
    let ip = Ipv6Addr::from(octets);
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::from((v4, port)),
        None => SocketAddr::from((ip, port)),
    })
}

/// The key a sealed datagram names (whether or not this node has it): what a peer that this
/// node cannot open seals with.
pub fn key_id_of(datagram: &[u8]) -> Option<[u8; 4]> {
    if datagram.len() < OVERHEAD || &datagram[..4] != MAGIC {
        return None;
    }
    Some([datagram[4], datagram[5], datagram[6], datagram[7]])
}

/// What a sender has been seen to send: its highest counter, the counters below it already
/// taken (bit `i`: `highest - 1 - i`), and when it was last heard.
struct Seen {
    highest: u64,
    below: u128,
    heard_ms: u64,
}

impl Seen {
    /// Takes `counter` if it was not taken before and is not too far below the highest.
    fn take(&mut self, counter: u64) -> bool {
        if counter > self.highest {
            let shift = counter - self.highest;
            // The old highest becomes bit `shift - 1`.
            self.below = match shift {
                1..=127 => (self.below << shift) | (1u128 << (shift - 1)),
                128 => 1u128 << 127,
                _ => 0,
            };
            self.highest = counter;
            return true;
        }
        let distance = self.highest - counter;
        if distance == 0 || distance > WINDOW {
            return false;
        }
        let bit = 1u128 << (distance - 1);
        let fresh = self.below & bit == 0;
        self.below |= bit;
        fresh
    }
}

/// A message whose parts are arriving.
struct Pending {
    sender: u64,
    /// The counter of its first part, and how many parts it has.
    first: u64,
    parts: Vec<Option<Vec<u8>>>,
}

/// Opens what the other nodes send: the keyring's keys, the counters each sender used, and
/// messages waiting for their other parts.
#[derive(Default)]
pub struct Opener {
    senders: HashMap<u64, Seen>,
    pending: VecDeque<Pending>,
}

/// An opened datagram: the message, once whole, the id of the key that opened it, when its
/// sender sealed it (the sender's clock) and what it echoes (this node's clock).
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub message: Option<Vec<u8>>,
    pub key_id: [u8; 4],
    pub sent_ms: u64,
    pub echo_ms: u64,
}

impl Opener {
    /// Opens `datagram`, received at `local` (this node's gossip address), at `now_ms`.
    pub fn open(
        &mut self,
        keyring: &Keyring,
        now_ms: u64,
        local: SocketAddr,
        datagram: &[u8],
    ) -> Result<Opened, Rejection> {
        if datagram.len() < OVERHEAD || &datagram[..4] != MAGIC {
            return Err(Rejection::Unauthenticated);
        }
        let (header, sealed) = datagram.split_at(HEADER_LEN);
        let key_id = [header[4], header[5], header[6], header[7]];
        let key = keyring
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or(Rejection::Unauthenticated)?;
        let field = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8"));
        let (sender, counter, sent_ms, echo_ms) = (
            field(SENDER_AT),
            field(COUNTER_AT),
            field(TIME_AT),
            field(ECHO_AT),
        );
        let part = header[PART_AT];
        let nonce = XNonce::from_slice(&header[NONCE_AT..NONCE_AT + NONCE_LEN]);
        let chunk = key
            .cipher
            .decrypt(
                nonce,
                Payload {
                    msg: sealed,
                    aad: header,
                },
            )
            .map_err(|_| Rejection::Unauthenticated)?;
        // Authentic from here on: the sender holds the key. Checked before the counters, so
        // that a datagram meant for another node takes nothing of its sender's window here.
        if header[RECIPIENT_AT..PART_AT] != recipient_bytes(local) {
            return Err(Rejection::Misdirected);
        }
        self.senders
            .retain(|_, seen| now_ms.saturating_sub(seen.heard_ms) <= 2 * MAX_SKEW_MS);
        if now_ms.abs_diff(sent_ms) > MAX_SKEW_MS || counter == 0 {
            return Err(Rejection::Replayed);
        }
        match self.senders.get_mut(&sender) {
            Some(seen) => {
                if !seen.take(counter) {
                    return Err(Rejection::Replayed);
                }
                seen.heard_ms = now_ms;
            }
            // First heard: its earlier datagrams within the window may still come (reordered).
            None => {
                let seen = Seen {
                    highest: counter,
                    below: 0,
                    heard_ms: now_ms,
                };
                self.senders.insert(sender, seen);
            }
        }
        let (index, count) = (usize::from(part >> 4), usize::from(part & 0x0f));
        if count == 0 || index >= count {
            return Err(Rejection::Unauthenticated);
        }
        let message = if count == 1 {
            Some(chunk)
        } else {
            self.add_part(sender, counter - index as u64, index, count, chunk)
        };
        Ok(Opened {
            message,
            key_id,
            sent_ms,
            echo_ms,
        })
    }

    /// Adds part `index` of `count` of the message whose first part has counter `first`;
    /// returns the message once every part is in.
    fn add_part(
        &mut self,
        sender: u64,
        first: u64,
        index: usize,
        count: usize,
        chunk: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let at = match self
            .pending
            .iter()
            .position(|p| p.sender == sender && p.first == first && p.parts.len() == count)
        {
            Some(at) => at,
            None => {
                if self.pending.len() == MAX_PENDING {
                    self.pending.pop_front();
                }
                self.pending.push_back(Pending {
                    sender,
                    first,
                    parts: vec![None; count],
                });
                self.pending.len() - 1
            }
        };
        self.pending[at].parts[index] = Some(chunk);
        if self.pending[at].parts.iter().any(Option::is_none) {
            return None;
        }
        let done = self.pending.remove(at).expect("present");
        Some(done.parts.into_iter().flatten().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_780_000_000_000;
    /// The gossip addresses of two nodes.
    const N1: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 1)), 7946);
    const N3: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 0, 3)), 7946);

    fn ring(keys: &[&str]) -> Keyring {
        Keyring::parse(&keys.join("\n")).unwrap()
    }

    fn key(fill: char) -> String {
        std::iter::repeat_n(fill, 64).collect()
    }

    #[test]
    fn a_sealed_message_opens_once_with_any_key_of_the_ring() {
        let (a, b) = (key('a'), key('b'));
        let old = ring(&[&a]);
        let both = ring(&[&b, &a]);
        let mut sealer = Sealer::default();
        let sealed = sealer.seal(&old, NOW, N1, NOW - 700, b"a chitchat message");
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].len(), OVERHEAD + 18);
        let mut opener = Opener::default();
        let opened = opener.open(&both, NOW + 5, N1, &sealed[0]).unwrap();
        assert_eq!(opened.message.as_deref(), Some(&b"a chitchat message"[..]));
        assert_eq!(opened.key_id, old.sealing_id());
        assert_eq!((opened.sent_ms, opened.echo_ms), (NOW, NOW - 700));
        assert_eq!(key_id_of(&sealed[0]), Some(old.sealing_id()));
        assert_eq!(key_id_of(b"\x00\x01plain"), None);
        assert_eq!(
            opener.open(&both, NOW + 6, N1, &sealed[0]),
            Err(Rejection::Replayed),
            "the same datagram again"
        );
        // Sealed with the new first key, opened by a node that has only the old one: refused.
        let newer = sealer.seal(&both, NOW, N1, 0, b"x");
        let mut stale_node = Opener::default();
        assert_eq!(
            stale_node.open(&old, NOW, N1, &newer[0]),
            Err(Rejection::Unauthenticated)
        );
    }

    #[test]
    fn forged_altered_or_foreign_datagrams_are_unauthenticated() {
        let ring_a = ring(&[&key('a')]);
        let mut sealer = Sealer::default();
        let sealed = sealer.seal(&ring_a, NOW, N1, 0, b"records").remove(0);
        let mut opener = Opener::default();
        // Every byte flipped in turn: header (bound as associated data), nonce, text, tag.
        for at in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[at] ^= 0x01;
            assert_eq!(
                opener.open(&ring_a, NOW, N1, &altered),
                Err(Rejection::Unauthenticated),
                "byte {at}"
            );
        }
        // Another cluster's key, a plain chitchat datagram, truncations.
        let other = Sealer::default()
            .seal(&ring(&[&key('c')]), NOW, N1, 0, b"records")
            .remove(0);
        assert_eq!(
            opener.open(&ring_a, NOW, N1, &other),
            Err(Rejection::Unauthenticated)
        );
        assert_eq!(
            opener.open(&ring_a, NOW, N1, b"\x00\x01plain"),
            Err(Rejection::Unauthenticated)
        );
        for len in 0..sealed.len() {
            assert_eq!(
                opener.open(&ring_a, NOW, N1, &sealed[..len]),
                Err(Rejection::Unauthenticated),
                "{len} bytes"
            );
        }
        // The untouched datagram still opens: nothing above was taken.
        assert!(opener.open(&ring_a, NOW, N1, &sealed).is_ok());
    }

    #[test]
    fn datagrams_replayed_later_or_sealed_far_from_now_are_refused() {
        let ring_a = ring(&[&key('a')]);
        let mut sealer = Sealer::default();
        let sealed: Vec<Vec<u8>> = (0..200)
            .map(|i| sealer.seal(&ring_a, NOW, N1, 0, &[i as u8]).remove(0))
            .collect();
        let mut opener = Opener::default();
        // Out of order within the window: each taken once.
        for i in [5, 3, 4, 0, 1, 2] {
            assert!(opener.open(&ring_a, NOW, N1, &sealed[i]).is_ok(), "{i}");
        }
        for i in [3, 5, 0] {
            assert_eq!(
                opener.open(&ring_a, NOW, N1, &sealed[i]),
                Err(Rejection::Replayed)
            );
        }
        assert!(opener.open(&ring_a, NOW, N1, &sealed[199]).is_ok());
        // Counters start at 1: the highest is 200, and 71 (`sealed[70]`) is 129 below it.
        assert_eq!(
            opener.open(&ring_a, NOW, N1, &sealed[70]),
            Err(Rejection::Replayed)
        );
        assert!(opener.open(&ring_a, NOW, N1, &sealed[72]).is_ok());
        // A capture replayed to a node that never saw it (or forgot its sender): by time.
        let mut fresh = Opener::default();
        let later = NOW + MAX_SKEW_MS + 1;
        assert_eq!(
            fresh.open(&ring_a, later, N1, &sealed[10]),
            Err(Rejection::Replayed)
        );
        let earlier = NOW - MAX_SKEW_MS - 1;
        assert_eq!(
            fresh.open(&ring_a, earlier, N1, &sealed[10]),
            Err(Rejection::Replayed)
        );
        assert!(
            fresh
                .open(&ring_a, NOW + MAX_SKEW_MS, N1, &sealed[10])
                .is_ok()
        );
        // A day later, to the node that saw it: stale, and its sender forgotten.
        let day = NOW + 86_400_000;
        assert_eq!(
            opener.open(&ring_a, day, N1, &sealed[150]),
            Err(Rejection::Replayed)
        );
        assert!(opener.senders.is_empty());
    }

    #[test]
    fn a_datagram_sealed_for_another_node_is_refused_and_takes_nothing() {
        let ring_a = ring(&[&key('a')]);
        let mut sealer = Sealer::default();
        // What n2 sent n3, and then n1 (counters 1 and 2).
        let to_n3 = sealer.seal(&ring_a, NOW, N3, 0, b"to n3").remove(0);
        let to_n1 = sealer.seal(&ring_a, NOW, N1, 0, b"to n1").remove(0);
        assert_eq!(recipient_of(&to_n3), Some(N3));
        let mut n1 = Opener::default();
        assert!(n1.open(&ring_a, NOW, N1, &to_n1).is_ok());
        // n3's datagram replayed to n1: its counter was never taken at n1, but it is not for n1.
        assert_eq!(
            n1.open(&ring_a, NOW, N1, &to_n3),
            Err(Rejection::Misdirected)
        );
        assert_eq!(Rejection::Misdirected.name(), "replayed");
        // Another port on the same address is another recipient; so is the same address over
        // IPv6.
        let other_port = SocketAddr::new(N1.ip(), 7947);
        let to_port = sealer.seal(&ring_a, NOW, other_port, 0, b"x").remove(0);
        assert_eq!(
            n1.open(&ring_a, NOW, N1, &to_port),
            Err(Rejection::Misdirected)
        );
        let v6: SocketAddr = "[2001:db8::1]:7946".parse().unwrap();
        let to_v6 = sealer.seal(&ring_a, NOW, v6, 0, b"x").remove(0);
        assert_eq!(recipient_of(&to_v6), Some(v6));
        assert_eq!(
            n1.open(&ring_a, NOW, N1, &to_v6),
            Err(Rejection::Misdirected)
        );
        // It took nothing of the sender's window at n1, and opens at n3 once.
        let mut n3 = Opener::default();
        assert!(n3.open(&ring_a, NOW, N3, &to_n3).is_ok());
        assert_eq!(n3.open(&ring_a, NOW, N3, &to_n3), Err(Rejection::Replayed));
        assert_eq!(n1.senders.values().next().map(|s| s.highest), Some(2));
        // The recipient is authenticated: rewriting it to n1 breaks the seal.
        let mut rewritten = to_n3.clone();
        rewritten[RECIPIENT_AT..PART_AT].copy_from_slice(&recipient_bytes(N1));
        assert_eq!(
            n1.open(&ring_a, NOW, N1, &rewritten),
            Err(Rejection::Unauthenticated)
        );
    }

    #[test]
    fn a_message_too_large_for_one_datagram_travels_in_parts() {
        let ring_a = ring(&[&key('a')]);
        let message: Vec<u8> = (0..65_507u32).map(|i| (i * 7) as u8).collect();
        let mut sealer = Sealer::default();
        let parts = sealer.seal(&ring_a, NOW, N1, 0, &message);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= MAX_DATAGRAM));
        let mut opener = Opener::default();
        // In reverse order, with another sender's message in between.
        assert_eq!(
            opener.open(&ring_a, NOW, N1, &parts[1]).unwrap().message,
            None
        );
        let small = Sealer::default()
            .seal(&ring_a, NOW, N1, 0, b"between")
            .remove(0);
        assert!(
            opener
                .open(&ring_a, NOW, N1, &small)
                .unwrap()
                .message
                .is_some()
        );
        let whole = opener.open(&ring_a, NOW, N1, &parts[0]).unwrap().message;
        assert_eq!(whole.as_deref(), Some(&message[..]));
        assert!(opener.pending.is_empty());
        // A part replayed does not start the message again.
        assert_eq!(
            opener.open(&ring_a, NOW, N1, &parts[1]),
            Err(Rejection::Replayed)
        );
    }

    #[test]
    fn key_files_are_checked() {
        assert!(Keyring::parse(&Keyring::generate()).is_ok());
        assert_ne!(Keyring::generate(), Keyring::generate());
        for (text, error) in [
            ("", "no key"),
            ("# only a comment\n", "no key"),
            ("abc\n", "line 1: not a key"),
            (
                &format!("{}\n{}\n", key('a'), key('a')),
                "line 2: the same key twice",
            ),
            (&format!("{}g\n", &key('a')[..63]), "line 1: not a key"),
        ] {
            let err = Keyring::parse(text).unwrap_err();
            assert!(err.contains(error), "{text:?}: {err}");
        }
        let ring = ring(&[&key('b'), &key('a')]);
        assert_eq!(ring.ids().len(), 2);
        assert_eq!(ring.ids()[0], ring.sealing_id());
        assert_eq!(key_id_text(ring.sealing_id()).len(), 8);
    }
}
