//! The gossip socket of a cluster with a key file (`--cluster-key-file`): every datagram
//! chitchat sends is sealed (`seal`) on its way out, and every datagram that arrives is opened
//! before chitchat sees it; one that does not open, or was seen before, is dropped and counted
//! (`unauthenticated`, `replayed`), and logged once per source and reason.
//!
//! Chitchat keeps its wire format to itself (its envelope's encoder and decoder are private to
//! the crate), so each socket lends two of chitchat's own UDP sockets, bound to loopback, as its
//! codec: the encoder sends each outgoing envelope to a loopback sink, whose bytes are sealed
//! and sent; the decoder receives each opened message from a loopback socket of the message's
//! sender's own (one per peer), so that the address it reports maps back to the peer.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use chitchat::{
    ChitchatEnvelope,
    transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdpSocket},
};
use tokio::net::UdpSocket;
use tracing::warn;

use crate::cluster::{
    gossip::Rejections,
    seal::{
        Keyring, MAX_DATAGRAM, Opened, Opener, Rejection, Sealer, key_id_of, key_id_text,
        recipient_of,
    },
};

/// Sources whose dropped datagrams are logged; past this, only counted.
const MAX_REPORTED: usize = 1024;
/// A source still sending what is dropped is logged again this long after (with how many were
/// dropped in between): once per source, not once per datagram, but not once for the daemon's
/// life either.
const REPORT_EVERY_MS: u64 = 600_000;

/// Peers whose loopback socket is kept; past this, the oldest is closed (a peer that comes
/// back gets a new one).
const MAX_PEERS: usize = 4096;

/// The cluster's key file, read again when it changes.
pub struct KeyFile {
    path: PathBuf,
    ring: RwLock<Arc<Keyring>>,
    /// The file's modification time, length, mode and owner when last read.
    stamp: Mutex<Stamp>,
    /// When the keyring in force was read (Unix milliseconds): what peers' datagrams said of
    /// the keys before it is void (`PeerLink`).
    loaded_ms: AtomicU64,
    /// Why the file on disk was last refused, while it still is (the keys in force are older).
    refused: Mutex<Option<String>>,
}

impl KeyFile {
    /// Reads the key file at `path`, which only its owner may read or write (it holds the
    /// cluster's secret): refused otherwise, with what to do.
    pub fn load(path: &Path) -> Result<KeyFile> {
        let (ring, stamp) = read_key_file(path)?;
        Ok(KeyFile {
            path: path.to_owned(),
            ring: RwLock::new(Arc::new(ring)),
            stamp: Mutex::new(stamp),
            loaded_ms: AtomicU64::new(now_ms()),
            refused: Mutex::new(None),
        })
    }

    /// When the keyring in force was read (Unix milliseconds).
    pub fn loaded_ms(&self) -> u64 {
        self.loaded_ms.load(Ordering::Relaxed)
    }

    /// Why the file on disk is refused, if it is (the keys in force then come from an
    /// earlier read, and a restart would fail).
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().expect("not poisoned").clone()
    }

    /// The keyring in force.
    pub fn ring(&self) -> Arc<Keyring> {
        self.ring.read().expect("not poisoned").clone()
    }

    /// Reads the file again if it changed since (or `force`, on SIGHUP); returns the new
    /// keyring when it did. A file that cannot be read or is refused leaves the keyring in
    /// force as it was.
    pub fn reload(&self, force: bool) -> Result<Option<Arc<Keyring>>> {
        let outcome = self.try_reload(force);
        *self.refused.lock().expect("not poisoned") =
            outcome.as_ref().err().map(|err| format!("{err:#}"));
        outcome
    }

    fn try_reload(&self, force: bool) -> Result<Option<Arc<Keyring>>> {
        let meta = std::fs::metadata(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let stamp = stamp_of(&meta)?;
        if !force && *self.stamp.lock().expect("not poisoned") == stamp {
            return Ok(None);
        }
        let (ring, stamp) = read_key_file(&self.path)?;
        let ring = Arc::new(ring);
        *self.ring.write().expect("not poisoned") = ring.clone();
        *self.stamp.lock().expect("not poisoned") = stamp;
        self.loaded_ms.store(now_ms(), Ordering::Relaxed);
        Ok(Some(ring))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a change of the key file changes: its modification time, length, mode and owner.
type Stamp = (SystemTime, u64, u32, u32);

fn stamp_of(meta: &std::fs::Metadata) -> Result<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    Ok((meta.modified()?, meta.len(), meta.mode(), meta.uid()))
}

fn read_key_file(path: &Path) -> Result<(Keyring, Stamp)> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    let owner = nix::unistd::geteuid().as_raw();
    if meta.uid() != owner {
        bail!(
            "{} is owned by uid {}, not by the daemon's user (uid {owner}): it holds the \
             cluster's secret; `chown {owner} {}`",
            path.display(),
            meta.uid(),
            path.display()
        );
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} may be read or written by others (mode {:o}): it holds the cluster's secret; \
             `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ring = Keyring::parse(&text).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
    Ok((ring, stamp_of(&meta)?))
}

/// Writes a new key file at `path` (mode 600), which must not exist yet.
pub fn generate_key_file(path: &Path) -> Result<String> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let text = Keyring::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "{} exists: lbctl never overwrites a key file (remove it first, or choose \
                 another path)",
                path.display()
            ),
            _ => anyhow::Error::new(err).context(format!("creating {}", path.display())),
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    let ring = Keyring::parse(&text).map_err(anyhow::Error::msg)?;
    Ok(key_id_text(ring.sealing_id()))
}

/// When each (source address, reason) of dropped datagrams was last logged, and how many were
/// dropped since; at most [`MAX_REPORTED`] of them.
#[derive(Default)]
struct Reported {
    last: HashMap<(IpAddr, Rejection), (u64, u64)>,
    overflow_logged: bool,
}

/// Why a dropped datagram is logged.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// The first from its source for its reason.
    First,
    /// [`REPORT_EVERY_MS`] after the last logged; this many were dropped in between.
    Again(u64),
    /// The first from a source past [`MAX_REPORTED`]: said once, then nothing more is.
    TooManySources,
}

impl Reported {
    /// Whether a datagram dropped at `now_ms` for `key` is logged.
    fn due(&mut self, key: (IpAddr, Rejection), now_ms: u64) -> Option<Due> {
        if let Some((at, dropped)) = self.last.get_mut(&key) {
            if now_ms.saturating_sub(*at) < REPORT_EVERY_MS {
                *dropped += 1;
                return None;
            }
            let between = *dropped;
            (*at, *dropped) = (now_ms, 0);
            return Some(Due::Again(between));
        }
        if self.last.len() >= MAX_REPORTED {
            return (!std::mem::replace(&mut self.overflow_logged, true))
                .then_some(Due::TooManySources);
        }
        self.last.insert(key, (now_ms, 0));
        Some(Due::First)
    }
}

/// Opens sealed gossip sockets.
pub struct SealedTransport {
    pub keys: Arc<KeyFile>,
    pub rejections: Arc<Rejections>,
    /// What each peer's datagrams said, by the peer's gossip address.
    pub links: PeerLinks,
}

/// Each peer's [`PeerLink`], by its gossip address (`cluster ls`).
pub type PeerLinks = Arc<Mutex<HashMap<SocketAddr, PeerLink>>>;

/// A peer whose datagrams keep arriving without echoing one of this node's sent at least this
/// long before does not open them (a LAN delivers in milliseconds; chitchat answers at once).
const ECHO_SLACK_MS: u64 = 1_000;
/// ... this many times in a row: a datagram lost now and then is not a broken link.
const MISSES_CUT_OFF: u32 = 3;
/// What a peer's datagrams said is taken as current for this long; after that a silent peer is
/// the failure detector's business (dead), not the keys'.
const LINK_CURRENT_MS: u64 = 30_000;

/// What this node knows of its gossip with one peer, from the datagrams each way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerLink {
    /// The key the peer's last opened datagram was sealed with.
    pub key: Option<[u8; 4]>,
    /// The time of the newest datagram opened from the peer, on the peer's clock: echoed back
    /// to it in what this node sends it.
    pub newest_opened_ms: u64,
    /// When this node last opened a datagram from the peer (this node's clock).
    opened_at_ms: u64,
    /// The first datagram sent to the peer (this node's clock) since its last echo covered
    /// what this node had sent.
    unechoed_since_ms: Option<u64>,
    /// Datagrams opened from the peer, in a row, that still echo something older than
    /// `unechoed_since_ms` though they arrived more than [`ECHO_SLACK_MS`] after it.
    misses: u32,
    /// When a datagram from the peer's address last failed to open, and the key it named.
    refused: Option<(u64, Option<[u8; 4]>)>,
    /// Datagrams sent to the peer since the last one opened from it, the first and the last
    /// of them (this node's clock).
    unanswered: u32,
    unanswered_since_ms: u64,
    last_sent_ms: u64,
}

/// Why gossip with a peer is broken, though both may still be sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutOff {
    /// Its datagrams open here, but it never echoes this node's: it cannot open them (its
    /// keyring lacks this node's sealing key).
    CannotOpenOurs,
    /// Its datagrams do not open here: sealed with this key (`None`: not sealed at all).
    UnknownKey(Option<[u8; 4]>),
    /// It is alive (others hear it) but answers nothing this node sends it: it cannot open
    /// this node's datagrams, and talks only to members that it can (or sends nothing here).
    NoAnswer,
}

impl CutOff {
    /// For `cluster ls` and the logs; `sealing`: this node's sealing key.
    pub fn describe(self, sealing: [u8; 4]) -> String {
        match self {
            CutOff::CannotOpenOurs => format!(
                "cannot open this node's gossip (sealed with key {}): add it to its key file",
                key_id_text(sealing)
            ),
            CutOff::UnknownKey(Some(key)) => format!(
                "seals with key {}, which this node's key file lacks",
                key_id_text(key)
            ),
            CutOff::UnknownKey(None) => {
                "sends gossip this node cannot open (not sealed: --insecure?)".to_owned()
            }
            CutOff::NoAnswer => format!(
                "alive, but answers none of this node's gossip (sealed with key {}): its key file \
                 lacks it?",
                key_id_text(sealing)
            ),
        }
    }
}

impl PeerLink {
    /// A datagram sealed at `now_ms` was sent to the peer, under a keyring read at
    /// `keys_loaded_ms`: what its echoes said of the keys before is void (a rotation step just
    /// taken starts a new count).
    fn sent(&mut self, now_ms: u64, keys_loaded_ms: u64) {
        if self
            .unechoed_since_ms
            .is_some_and(|since| since < keys_loaded_ms)
        {
            (self.unechoed_since_ms, self.misses) = (None, 0);
        }
        self.unechoed_since_ms.get_or_insert(now_ms);
        if self.unanswered == 0 || self.unanswered_since_ms < keys_loaded_ms {
            (self.unanswered, self.unanswered_since_ms) = (0, now_ms);
        }
        self.unanswered = self.unanswered.saturating_add(1);
        self.last_sent_ms = now_ms;
    }

    /// A datagram from the peer opened at `now_ms`.
    fn opened(&mut self, now_ms: u64, opened: &Opened) {
        self.key = Some(opened.key_id);
        self.opened_at_ms = now_ms;
        self.unanswered = 0;
        self.newest_opened_ms = self.newest_opened_ms.max(opened.sent_ms);
        match self.unechoed_since_ms {
            Some(since) if opened.echo_ms >= since => {
                self.unechoed_since_ms = None;
                self.misses = 0;
            }
            Some(since) if now_ms >= since + ECHO_SLACK_MS => {
                self.misses = self.misses.saturating_add(1);
            }
            _ => {}
        }
    }

    /// A datagram from the peer's address that did not open, at `now_ms`.
    fn refused(&mut self, now_ms: u64, key: Option<[u8; 4]>) {
        self.refused = Some((now_ms, key));
    }

    /// Whether gossip with the peer is broken at `now_ms`, by what its recent datagrams said
    /// since the keyring in force was read (at `keys_loaded_ms`: a datagram refused before
    /// might open now).
    pub fn cut_off(&self, now_ms: u64, keys_loaded_ms: u64) -> Option<CutOff> {
        let current = |at: u64| now_ms.saturating_sub(at) <= LINK_CURRENT_MS;
        match self.refused {
            Some((at, key)) if at > self.opened_at_ms && at >= keys_loaded_ms && current(at) => {
                return Some(CutOff::UnknownKey(key));
            }
            _ => {}
        }
        (self.misses >= MISSES_CUT_OFF && current(self.opened_at_ms))
            .then_some(CutOff::CannotOpenOurs)
    }

    /// [`PeerLink::cut_off`] of a peer the failure detector says is alive: one that answered
    /// nothing of the last [`MISSES_CUT_OFF`] datagrams or more sent to it over more than two
    /// [`ECHO_SLACK_MS`] is cut off too. (A dead one answers nothing either: it is just dead.)
    pub fn cut_off_alive(&self, now_ms: u64, keys_loaded_ms: u64) -> Option<CutOff> {
        self.cut_off(now_ms, keys_loaded_ms).or_else(|| {
            (self.unanswered >= MISSES_CUT_OFF
                && self.last_sent_ms.saturating_sub(self.unanswered_since_ms) >= 2 * ECHO_SLACK_MS
                && now_ms.saturating_sub(self.last_sent_ms) <= LINK_CURRENT_MS)
                .then_some(CutOff::NoAnswer)
        })
    }

    /// Whether anything came from the peer's address (opened or not) within `window_ms` of
    /// `now_ms`.
    pub fn heard_within(&self, now_ms: u64, window_ms: u64) -> bool {
        let last = self
            .refused
            .map_or(self.opened_at_ms, |(at, _)| at.max(self.opened_at_ms));
        last != 0 && now_ms.saturating_sub(last) <= window_ms
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> Result<Box<dyn Socket>> {
        Ok(Box::new(self.open_sealed(listen_addr).await?))
    }
}

impl SealedTransport {
    async fn open_sealed(&self, listen_addr: SocketAddr) -> Result<SealedSocket> {
        let wire = UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let encoder = ChitchatUdpSocket::open(loopback).await?;
        let sink = UdpSocket::bind(loopback).await?;
        // Connected: the sink takes datagrams from the encoder only. Any process on the node
        // can send to a loopback port; what reached the sink from another would be sealed with
        // the cluster's key.
        sink.connect(encoder.local_addr()?).await?;
        let decoder = ChitchatUdpSocket::open(loopback).await?;
        let decoder_addr = decoder.local_addr()?;
        let local = wire.local_addr()?;
        Ok(SealedSocket {
            wire,
            local,
            encoder,
            sink,
            decoder,
            decoder_addr,
            peers: HashMap::new(),
            by_loopback: HashMap::new(),
            keys: self.keys.clone(),
            sealer: Sealer::default(),
            opener: Opener::default(),
            rejections: self.rejections.clone(),
            links: self.links.clone(),
            reported: Reported::default(),
            buf: vec![0u8; MAX_DATAGRAM + 1].into_boxed_slice(),
        })
    }
}

struct SealedSocket {
    wire: UdpSocket,
    /// The wire's address, which every datagram received must be sealed for.
    local: SocketAddr,
    /// Chitchat's encoder, and where it sends what it encodes.
    encoder: ChitchatUdpSocket,
    sink: UdpSocket,
    /// Chitchat's decoder, and the loopback socket of each peer that feeds it.
    decoder: ChitchatUdpSocket,
    decoder_addr: SocketAddr,
    peers: HashMap<SocketAddr, UdpSocket>,
    by_loopback: HashMap<SocketAddr, SocketAddr>,
    keys: Arc<KeyFile>,
    sealer: Sealer,
    opener: Opener,
    rejections: Arc<Rejections>,
    links: PeerLinks,
    reported: Reported,
    buf: Box<[u8]>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SealedSocket {
    /// The loopback socket that hands `peer`'s messages to the decoder.
    async fn peer_socket(&mut self, peer: SocketAddr) -> Result<&UdpSocket> {
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= MAX_PEERS {
                self.peers.clear();
                self.by_loopback.clear();
            }
            let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
            self.by_loopback.insert(socket.local_addr()?, peer);
            self.peers.insert(peer, socket);
        }
        Ok(&self.peers[&peer])
    }

    /// Updates what this node knows of its link with `peer` (at most [`MAX_PEERS`] of them:
    /// past that, a new address is not followed, and `None` is returned).
    fn note<R>(&self, peer: SocketAddr, update: impl FnOnce(&mut PeerLink) -> R) -> Option<R> {
        let mut links = self.links.lock().expect("not poisoned");
        (links.len() < MAX_PEERS || links.contains_key(&peer))
            .then(|| update(links.entry(peer).or_default()))
    }

    /// Counts a datagram from `from` dropped at `local` at `now_ms`, sealed for `recipient`,
    /// and logs it when [`Reported::due`] says so.
    fn reject(
        &mut self,
        from: SocketAddr,
        rejection: Rejection,
        local: SocketAddr,
        recipient: Option<SocketAddr>,
        now_ms: u64,
    ) {
        self.rejections.count_sealing(rejection);
        let Some(due) = self.reported.due((from.ip(), rejection), now_ms) else {
            return;
        };
        let since = match due {
            Due::First => "first".to_owned(),
            Due::Again(dropped) => format!("{dropped} more dropped since last logged"),
            Due::TooManySources => {
                warn!(
                    "gossip datagrams from more than {MAX_REPORTED} sources dropped: further sources are counted, not logged"
                );
                return;
            }
        };
        let ring = self.keys.ring();
        let ids: Vec<String> = ring.ids().into_iter().map(key_id_text).collect();
        match rejection {
            Rejection::Unauthenticated => warn!(
                from = %from,
                keys = ?ids,
                since,
                "gossip datagram that no key of this node's keyring opens dropped: a node with another or no key, or forged (counted; logged once per source every 10 minutes)"
            ),
            Rejection::Replayed => warn!(
                from = %from,
                since,
                "gossip datagram seen before, or sealed too long ago, dropped: a replay, or clocks more than 30 s apart (counted; logged once per source every 10 minutes)"
            ),
            Rejection::Misdirected => warn!(
                from = %from,
                sealed_for = %recipient.map_or_else(|| "?".to_owned(), |r| r.to_string()),
                here = %local,
                since,
                "gossip datagram sealed for another address dropped: another node's traffic replayed here, or a peer that reaches this node at an address that is not its --gossip-addr (through NAT: not supported) (counted as replayed; logged once per source every 10 minutes)"
            ),
        }
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> Result<SocketAddr> {
        self.wire
            .local_addr()
            .context("failed to get UDP socket address")
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> Result<SendOutcome> {
        // Whatever an interrupted send left in the sink is stale.
        while self.sink.try_recv(&mut self.buf).is_ok() {}
        let sink_addr = self.sink.local_addr()?;
        self.encoder.send(sink_addr, envelope).await?;
        let len = self.sink.recv(&mut self.buf).await?;
        let ring = self.keys.ring();
        let now = now_ms();
        let loaded = self.keys.loaded_ms();
        // What to echo to it: the newest of its datagrams opened here (0: none).
        let echo = self
            .note(to, |link| {
                link.sent(now, loaded);
                link.newest_opened_ms
            })
            .unwrap_or(0);
        let mut sent = 0;
        for datagram in self.sealer.seal(&ring, now, to, echo, &self.buf[..len]) {
            sent += self
                .wire
                .send_to(&datagram, to)
                .await
                .context("failed to send chitchat message to peer")?;
        }
        Ok(SendOutcome {
            num_bytes_sent: sent,
        })
    }

    async fn recv(&mut self) -> Result<RecvOutcome> {
        loop {
            let SealedSocket {
                wire, decoder, buf, ..
            } = self;
            tokio::select! {
                decoded = decoder.recv() => {
                    let decoded = decoded?;
                    let Some(&peer) = self.by_loopback.get(&decoded.from_addr) else {
                        continue;
                    };
                    return Ok(RecvOutcome { from_addr: peer, ..decoded });
                }
                received = wire.recv_from(buf) => {
                    let (len, from) = match received {
                        Ok(received) => received,
                        Err(err) if matches!(
                            err.kind(),
                            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                        ) => continue,
                        Err(err) => return Err(err).context("fatal UDP recv error"),
                    };
                    let ring = self.keys.ring();
                    let local = self.local;
                    let now = now_ms();
                    match self.opener.open(&ring, now, local, &self.buf[..len]) {
                        Err(rejection) => {
                            let datagram = &self.buf[..len];
                            let recipient = recipient_of(datagram);
                            if rejection == Rejection::Unauthenticated {
                                let key = key_id_of(datagram);
                                self.note(from, |link| link.refused(now, key));
                            }
                            self.reject(from, rejection, local, recipient, now);
                        }
                        Ok(opened) => {
                            self.note(from, |link| link.opened(now, &opened));
                            if let Some(message) = opened.message {
                                let decoder_addr = self.decoder_addr;
                                let socket = self.peer_socket(from).await?;
                                socket.send_to(&message, decoder_addr).await?;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chitchat::{ChitchatMessage, ProtocolVersion};

    use super::*;

    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        }
    }

    const NOW: u64 = 1_780_000_000_000;

    /// A datagram from the peer, sealed at `sent_ms` (the peer's clock), echoing `echo_ms`.
    fn from_peer(sent_ms: u64, echo_ms: u64) -> Opened {
        Opened {
            message: None,
            key_id: [1, 2, 3, 4],
            sent_ms,
            echo_ms,
        }
    }

    #[test]
    fn dropped_datagrams_are_logged_once_per_source_and_reason_every_ten_minutes() {
        let mut reported = Reported::default();
        let a = (IpAddr::from([10, 0, 0, 1]), Rejection::Unauthenticated);
        let b = (IpAddr::from([10, 0, 0, 1]), Rejection::Replayed);
        assert_eq!(reported.due(a, NOW), Some(Due::First));
        assert_eq!(reported.due(b, NOW), Some(Due::First), "another reason");
        for i in 1..=500 {
            assert_eq!(reported.due(a, NOW + i), None);
        }
        assert_eq!(reported.due(a, NOW + REPORT_EVERY_MS - 1), None);
        assert_eq!(
            reported.due(a, NOW + REPORT_EVERY_MS),
            Some(Due::Again(501))
        );
        assert_eq!(reported.due(a, NOW + REPORT_EVERY_MS + 1), None);
        // Past MAX_REPORTED sources: said once, then only counted.
        for i in 0..MAX_REPORTED as u32 - 2 {
            let source = (
                IpAddr::from(((i + 1) << 8).to_be_bytes()),
                Rejection::Replayed,
            );
            assert_eq!(reported.due(source, NOW), Some(Due::First));
        }
        let more = |i: u8| (IpAddr::from([192, 0, 2, i]), Rejection::Replayed);
        assert_eq!(reported.due(more(1), NOW), Some(Due::TooManySources));
        assert_eq!(reported.due(more(2), NOW), None);
        assert_eq!(
            reported.due(a, NOW + 2 * REPORT_EVERY_MS),
            Some(Due::Again(1))
        );
    }

    /// A healthy exchange: each datagram from the peer echoes the newest of this node's it
    /// opened; a loss now and then, and the datagrams that cross in flight, cut nothing off.
    #[test]
    fn a_peer_that_echoes_what_this_node_sends_is_not_cut_off() {
        let mut link = PeerLink::default();
        assert_eq!(link.cut_off(NOW, 0), None, "never heard from");
        for round in 0..20u64 {
            let at = NOW + round * 500;
            link.sent(at, 0);
            // Round 7's datagram is lost: the answer echoes round 6's; the peer's next one
            // echoes round 8's.
            let echo = if round == 7 { at - 500 } else { at };
            link.opened(at + 2, &from_peer(at + 1, echo));
            assert_eq!(link.cut_off(at + 2, 0), None, "round {round}");
        }
        assert_eq!(link.key, Some([1, 2, 3, 4]));
        assert_eq!(
            link.newest_opened_ms,
            NOW + 19 * 500 + 1,
            "echoed back to it"
        );
        // Its datagram crossed this node's in flight (sent before ours arrived): no miss.
        link.sent(NOW + 20_000, 0);
        link.opened(NOW + 20_001, &from_peer(NOW + 20_000, NOW + 19_500));
        assert_eq!(link.misses, 0);
    }

    /// A peer whose keyring lacks this node's sealing key keeps sending (its datagrams open
    /// here) but never echoes anything newer: cut off after three such datagrams, and no
    /// longer once it echoes again. One that goes silent is the failure detector's business.
    #[test]
    fn a_peer_that_never_echoes_this_nodes_datagrams_is_cut_off() {
        let mut link = PeerLink::default();
        link.sent(NOW, 0);
        link.opened(NOW + 2, &from_peer(NOW + 1, NOW));
        let mut at = NOW + 1_000;
        for miss in 1..=3 {
            link.sent(at, 0);
            at += 1_500;
            // It still echoes NOW: it opened nothing sent since.
            link.opened(at, &from_peer(at, NOW));
            let expected = (miss == 3).then_some(CutOff::CannotOpenOurs);
            assert_eq!(link.cut_off(at, 0), expected, "miss {miss}");
        }
        assert_eq!(
            link.cut_off(at + LINK_CURRENT_MS + 1, 0),
            None,
            "silent for longer than a link is current"
        );
        // A new keyring here: the count starts again with what is sent under it.
        let mut reloaded = link.clone();
        reloaded.sent(at + 50, at + 40);
        assert_eq!(reloaded.misses, 0);
        assert_eq!(reloaded.unechoed_since_ms, Some(at + 50));
        link.sent(at + 100, 0);
        link.opened(at + 200, &from_peer(at + 200, at + 100));
        assert_eq!(link.cut_off(at + 200, 0), None, "it opens ours again");
    }

    /// A peer whose datagrams do not open here (another key, or none) is cut off until one
    /// opens again.
    #[test]
    fn a_peer_whose_datagrams_do_not_open_is_cut_off_until_one_does() {
        let mut link = PeerLink::default();
        link.opened(NOW, &from_peer(NOW, 0));
        link.refused(NOW + 10, Some([9, 9, 9, 9]));
        assert_eq!(
            link.cut_off(NOW + 10, 0),
            Some(CutOff::UnknownKey(Some([9, 9, 9, 9])))
        );
        assert!(
            CutOff::UnknownKey(Some([9, 9, 9, 9]))
                .describe([1, 2, 3, 4])
                .contains("09090909")
        );
        assert!(
            CutOff::CannotOpenOurs
                .describe([1, 2, 3, 4])
                .contains("01020304")
        );
        link.opened(NOW + 20, &from_peer(NOW + 20, 0));
        assert_eq!(link.cut_off(NOW + 20, 0), None);
        link.refused(NOW + 30, None);
        assert_eq!(link.cut_off(NOW + 30, 0), Some(CutOff::UnknownKey(None)));
        assert_eq!(link.cut_off(NOW + 30 + LINK_CURRENT_MS + 1, 0), None);
        // Refused under a keyring since replaced: it may open now.
        assert_eq!(link.cut_off(NOW + 40, NOW + 35), None);
        assert!(link.heard_within(NOW + 40, 1_000));
        assert!(!link.heard_within(NOW + 5_000, 1_000));
    }

    /// A peer others hear (alive) that answers nothing this node sends it is cut off; a dead
    /// one is just dead; one answer clears it.
    #[test]
    fn a_live_peer_that_answers_nothing_is_cut_off() {
        let mut link = PeerLink::default();
        for i in 0..3 {
            link.sent(NOW + i * 1_000, 0);
        }
        assert_eq!(link.cut_off_alive(NOW + 2_000, 0), Some(CutOff::NoAnswer));
        assert_eq!(link.cut_off(NOW + 2_000, 0), None, "dead: just dead");
        assert_eq!(link.cut_off_alive(NOW + 40_000, 0), None, "not current");
        link.opened(NOW + 2_100, &from_peer(NOW + 2_100, NOW + 2_000));
        assert_eq!(link.cut_off_alive(NOW + 2_100, 0), None);
        // Two sends, or three within two seconds: not yet.
        link.sent(NOW + 3_000, 0);
        link.sent(NOW + 3_500, 0);
        link.sent(NOW + 4_000, 0);
        assert_eq!(link.cut_off_alive(NOW + 4_000, 0), None);
    }

    async fn open(transport: &SealedTransport) -> (SealedSocket, SocketAddr) {
        let socket = transport
            .open_sealed(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    }

    /// The loopback sockets that lend chitchat's codec take nothing from another process on
    /// the node: what reaches the encoder's sink from elsewhere would otherwise be sealed with
    /// the cluster's key and sent (a rogue node or backend injected by any local user), and what
    /// reaches the decoder from elsewhere would be taken as a peer's message.
    #[tokio::test]
    async fn local_processes_cannot_get_messages_sealed_or_delivered() {
        let dir = std::env::temp_dir().join(format!("lbctl-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_path = dir.join("cluster.key");
        let _ = std::fs::remove_file(&key_path);
        generate_key_file(&key_path).unwrap();
        let transport = SealedTransport {
            keys: Arc::new(KeyFile::load(&key_path).unwrap()),
            rejections: Arc::new(Rejections::default()),
            links: PeerLinks::default(),
        };
        let (mut a, a_addr) = open(&transport).await;
        let (mut b, b_addr) = open(&transport).await;
        // A legitimate message first, so that b has a's loopback socket and a decoder to find.
        a.send(b_addr, bad_cluster()).await.unwrap();
        let received = b.recv().await.unwrap();
        assert_eq!(received.from_addr, a_addr);

        // Every loopback UDP port of the two sockets, as `ss` would list them to a local user.
        let lent = |sealed: &SealedSocket| -> Vec<SocketAddr> {
            let mut ports = vec![
                sealed.encoder.local_addr().unwrap(),
                sealed.sink.local_addr().unwrap(),
                sealed.decoder_addr,
            ];
            ports.extend(
                sealed
                    .peers
                    .keys()
                    .map(|p| sealed.peers[p].local_addr().unwrap()),
            );
            ports
        };
        let targets: Vec<SocketAddr> = lent(&a).into_iter().chain(lent(&b)).collect();
        assert!(targets.len() >= 7, "{targets:?}");
        let mut local = ChitchatUdpSocket::open(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        for target in &targets {
            for _ in 0..50 {
                local.send(*target, bad_cluster()).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The sink was sent 50 messages by another socket: the kernel kept none.
        let mut buf = [0u8; 2048];
        assert!(
            a.sink.try_recv(&mut buf).is_err(),
            "the sink took a local process's datagram"
        );
        // What a sends now is its own message only, once.
        a.send(b_addr, bad_cluster()).await.unwrap();
        let received = b.recv().await.unwrap();
        assert_eq!(received.from_addr, a_addr);
        // Nothing else reaches b's chitchat: not what the decoder was sent by the local socket.
        let more = tokio::time::timeout(Duration::from_millis(300), b.recv()).await;
        assert!(
            more.is_err(),
            "b delivered a local process's message: {more:?}"
        );
        let more = tokio::time::timeout(Duration::from_millis(300), a.recv()).await;
        assert!(
            more.is_err(),
            "a delivered a local process's message: {more:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
