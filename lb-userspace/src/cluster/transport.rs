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
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
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
    seal::{Keyring, MAX_DATAGRAM, Opener, Rejection, Sealer, key_id_text, recipient_of},
};

/// Sources whose dropped datagrams are logged (once each); past this, only counted.
const MAX_REPORTED: usize = 1024;

/// Peers whose loopback socket is kept; past this, the oldest is closed (a peer that comes
/// back gets a new one).
const MAX_PEERS: usize = 4096;

/// The cluster's key file, read again when it changes.
pub struct KeyFile {
    path: PathBuf,
    ring: RwLock<Arc<Keyring>>,
    /// The file's modification time, length, mode and owner when last read.
    stamp: Mutex<Stamp>,
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
        })
    }

    /// The keyring in force.
    pub fn ring(&self) -> Arc<Keyring> {
        self.ring.read().expect("not poisoned").clone()
    }

    /// Reads the file again if it changed since (or `force`, on SIGHUP); returns the new
    /// keyring when it did. A file that cannot be read or is refused leaves the keyring in
    /// force as it was.
    pub fn reload(&self, force: bool) -> Result<Option<Arc<Keyring>>> {
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

/// Opens sealed gossip sockets.
pub struct SealedTransport {
    pub keys: Arc<KeyFile>,
    pub rejections: Arc<Rejections>,
    /// The key that opened each peer's last datagram, by the peer's gossip address.
    pub peer_keys: PeerKeys,
}

/// The key id each peer seals with, by its address, as its datagrams say (`cluster ls`).
pub type PeerKeys = Arc<Mutex<HashMap<SocketAddr, [u8; 4]>>>;

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
            peer_keys: self.peer_keys.clone(),
            reported: HashSet::new(),
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
    peer_keys: PeerKeys,
    /// (source address, reason) pairs already logged; at most [`MAX_REPORTED`].
    reported: HashSet<(IpAddr, Rejection)>,
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

    /// `peer` sealed with the key `key_id`.
    fn note_key(&self, peer: SocketAddr, key_id: [u8; 4]) {
        let mut peer_keys = self.peer_keys.lock().expect("not poisoned");
        if peer_keys.len() < MAX_PEERS || peer_keys.contains_key(&peer) {
            peer_keys.insert(peer, key_id);
        }
    }

    /// Counts a datagram from `from` dropped at `local`, sealed for `recipient`, and logs the
    /// first from each source for each reason.
    fn reject(
        &mut self,
        from: SocketAddr,
        rejection: Rejection,
        local: SocketAddr,
        recipient: Option<SocketAddr>,
    ) {
        self.rejections.count_sealing(rejection);
        if self.reported.len() >= MAX_REPORTED {
            if self
                .reported
                .insert((IpAddr::from(Ipv4Addr::UNSPECIFIED), rejection))
            {
                warn!(
                    "gossip datagrams from more than {MAX_REPORTED} sources dropped: further sources are counted, not logged"
                );
            }
            return;
        }
        if self.reported.insert((from.ip(), rejection)) {
            let ring = self.keys.ring();
            let ids: Vec<String> = ring.ids().into_iter().map(key_id_text).collect();
            match rejection {
                Rejection::Unauthenticated => warn!(
                    from = %from,
                    keys = ?ids,
                    "gossip datagram that no key of this node's keyring opens dropped: a node with another or no key, or forged (counted; logged once per source)"
                ),
                Rejection::Replayed => warn!(
                    from = %from,
                    "gossip datagram seen before, or sealed too long ago, dropped: a replay, or clocks more than 30 s apart (counted; logged once per source)"
                ),
                Rejection::Misdirected => warn!(
                    from = %from,
                    sealed_for = %recipient.map_or_else(|| "?".to_owned(), |r| r.to_string()),
                    here = %local,
                    "gossip datagram sealed for another address dropped: another node's traffic replayed here, or a peer that reaches this node at an address that is not its --gossip-addr (through NAT: not supported) (counted as replayed; logged once per source)"
                ),
            }
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
        let mut sent = 0;
        for datagram in self.sealer.seal(&ring, now_ms(), to, &self.buf[..len]) {
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
                    match self.opener.open(&ring, now_ms(), local, &self.buf[..len]) {
                        Err(rejection) => {
                            let recipient = recipient_of(&self.buf[..len]);
                            self.reject(from, rejection, local, recipient);
                        }
                        Ok(opened) => {
                            self.note_key(from, opened.key_id);
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
            peer_keys: PeerKeys::default(),
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
