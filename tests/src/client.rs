//! Clients that talk to lb-testsrv, through the load balancer or directly.
//!
//! They create their sockets in the calling thread's network namespace, so
//! call them inside [`NetNs::in_netns`](crate::netns::NetNs::in_netns), e.g.
//! `topo.client().in_netns(|| http_get_new_connection(vip))`.
//!
//! Every socket operation has a timeout: a broken data plane (dropped or
//! misrouted packets) must fail the test, not hang it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Longest wait for a TCP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest wait for any read (and write) on a socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response or datagram a client accepts; lb-testsrv's are tiny, so
/// anything bigger means something else answered.
const MAX_REPLY: usize = 64 * 1024;

/// What a test server answered: its name and the address it saw the
/// request come from (which tells whether the client's address survived the
/// load balancer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The server's `--name`, e.g. `backend-1`.
    pub backend: String,
    /// The peer address of the request as the server saw it.
    pub client_seen: SocketAddrV4,
}

impl Reply {
    /// Parses lb-testsrv's body, `"<name> <ip>:<port>\n"`.
    pub fn parse(body: &str) -> Result<Reply> {
        let line = body
            .strip_suffix('\n')
            .with_context(|| format!("reply {body:?} does not end with a newline"))?;
        let (backend, seen) = line
            .split_once(' ')
            .with_context(|| format!("reply {body:?} is not `<name> <ip>:<port>`"))?;
        let client_seen = seen
            .parse()
            .with_context(|| format!("reply {body:?}: {seen:?} is not an IPv4 ip:port"))?;
        Ok(Reply {
            backend: backend.to_string(),
            client_seen,
        })
    }
}

/// Sends `GET /` on a new TCP connection with `Connection: close` and
/// returns the parsed reply. Each call is a new flow (new source port), so
/// the load balancer makes a fresh backend choice.
pub fn http_get_new_connection(addr: SocketAddrV4) -> Result<Reply> {
    get_and_close(connect(addr)?, addr)
}

/// As [`http_get_new_connection`], waiting up to `connect_timeout` for the connection, as a
/// patient client does: long enough for the kernel to retransmit its SYN a few times.
pub fn http_get_patient(addr: SocketAddrV4, connect_timeout: Duration) -> Result<Reply> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), connect_timeout)
        .with_context(|| format!("cannot connect to {addr} within {connect_timeout:?}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    get_and_close(stream, addr)
}

/// As [`http_get_new_connection`], checking first that the socket's peer
/// (`getpeername`) is `addr`: a load balancer that gives the socket another
/// address to talk to must give `addr` back to the application.
pub fn http_get_checking_peer(addr: SocketAddrV4) -> Result<Reply> {
    let stream = connect(addr)?;
    let peer = stream.peer_addr()?;
    if peer != SocketAddr::V4(addr) {
        bail!("a socket connected to {addr} has {peer} as its peer");
    }
    get_and_close(stream, addr)
}

/// As [`http_get_new_connection`], from local address `src` (bound before
/// connecting) instead of the one the routing table would pick: e.g. from an
/// address outside the overlay subnet that a host keeps for its client
/// traffic.
pub fn http_get_from(src: Ipv4Addr, addr: SocketAddrV4) -> Result<Reply> {
    get_and_close(connect_from(src, addr)?, addr)
}

/// Sends `GET /` with `Connection: close` on `stream`, connected to `addr`,
/// and returns the parsed reply.
fn get_and_close(mut stream: TcpStream, addr: SocketAddrV4) -> Result<Reply> {
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("cannot send the request to {addr}"))?;
    let mut reader = BufReader::new(stream.take(MAX_REPLY as u64 + 1));
    let reply = read_response(&mut reader).with_context(|| format!("GET http://{addr}/"))?;
    Ok(reply)
}

/// An HTTP/1.1 keep-alive connection: several requests on one TCP flow,
/// which the load balancer must keep sending to the same backend.
pub struct KeepAlive {
    addr: SocketAddrV4,
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Opens the connection (see [`connect`]).
    pub fn connect(addr: SocketAddrV4) -> Result<KeepAlive> {
        let stream = connect(addr)?;
        Ok(KeepAlive {
            addr,
            reader: BufReader::new(stream),
        })
    }

    /// Sends `GET /` on the connection and returns the parsed reply.
    pub fn get(&mut self) -> Result<Reply> {
        let addr = self.addr;
        let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .with_context(|| format!("cannot send a request to {addr}"))?;
        read_response(&mut self.reader).with_context(|| format!("keep-alive GET http://{addr}/"))
    }

    /// The client end of the connection (source address and port), to
    /// compare with [`Reply::client_seen`].
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.reader.get_ref().local_addr()?)
    }
}

/// `count` HTTP requests to `addr`, each on a new connection, from the
/// calling thread's namespace; the first failure names the request.
pub fn new_connections(addr: SocketAddrV4, count: usize) -> Result<Vec<Reply>> {
    (0..count)
        .map(|i| http_get_new_connection(addr).with_context(|| format!("request {i} to {addr}")))
        .collect()
}

/// Checks that `result` failed because the connection was refused (a RST: nothing listens
/// there), not for any other reason (a timeout, a reset later on, a bad reply).
pub fn assert_refused<T: std::fmt::Debug>(result: Result<T>, what: &str) {
    match result {
        Ok(reply) => panic!("{what}: answered {reply:?}"),
        Err(err) => assert!(
            format!("{err:#}").contains("Connection refused"),
            "{what}: failed otherwise: {err:#}"
        ),
    }
}

/// How many of `replies` each backend answered, by backend name.
pub fn per_backend(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.backend.clone()).or_default() += 1;
    }
    counts
}

/// Sends one datagram to `addr` from a fresh socket and returns the parsed
/// reply.
///
/// The reply must come from `addr` itself: behind a load balancer that
/// means the reverse translation worked (a real client with a connected
/// socket would silently drop anything else, so it is an error here).
pub fn udp_request(addr: SocketAddrV4) -> Result<Reply> {
    udp_exchange(&udp_socket()?, addr)
}

/// `count` requests as [`udp_request`] makes them, each from a socket of
/// its own, the sockets held open together: so each datagram comes from a
/// port of its own and is a new flow. (One socket after another, the kernel
/// may give a closed socket's port to a later one, whose datagram is then the
/// same flow to a load balancer and does not take a turn.) The first failure
/// names the request.
pub fn udp_requests(addr: SocketAddrV4, count: usize) -> Result<Vec<Reply>> {
    let sockets: Vec<UdpSocket> = (0..count).map(|_| udp_socket()).collect::<Result<_>>()?;
    sockets
        .iter()
        .enumerate()
        .map(|(i, socket)| {
            udp_exchange(socket, addr).with_context(|| format!("datagram {i} to {addr}"))
        })
        .collect()
}

/// `count` requests from connected UDP sockets (`connect`, `send`, `recv`),
/// held open together; each socket's peer (`getpeername`) must be `addr`.
pub fn udp_connected_requests(addr: SocketAddrV4, count: usize) -> Result<Vec<Reply>> {
    let sockets: Vec<UdpSocket> = (0..count).map(|_| udp_socket()).collect::<Result<_>>()?;
    sockets
        .iter()
        .enumerate()
        .map(|(i, socket)| {
            socket
                .connect(addr)
                .with_context(|| format!("cannot connect a UDP socket to {addr}"))?;
            let peer = socket.peer_addr()?;
            if peer != SocketAddr::V4(addr) {
                bail!("a UDP socket connected to {addr} has {peer} as its peer");
            }
            socket
                .send(b"ping\n")
                .with_context(|| format!("cannot send datagram {i} to {addr}"))?;
            let mut buf = vec![0; MAX_REPLY];
            let len = socket
                .recv(&mut buf)
                .with_context(|| format!("no reply to datagram {i} from {addr}"))?;
            Reply::parse(std::str::from_utf8(&buf[..len]).context("UDP reply is not UTF-8")?)
        })
        .collect()
}

/// A UDP socket on an ephemeral port, with [`IO_TIMEOUT`] on reads and
/// writes.
fn udp_socket() -> Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("cannot bind a UDP socket")?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(socket)
}

/// Sends one datagram to `addr` from `socket` and returns the parsed reply,
/// which must come from `addr`.
fn udp_exchange(socket: &UdpSocket, addr: SocketAddrV4) -> Result<Reply> {
    socket
        .send_to(b"ping\n", addr)
        .with_context(|| format!("cannot send a datagram to {addr}"))?;
    let mut buf = vec![0; MAX_REPLY];
    let (len, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP reply from {addr} within {IO_TIMEOUT:?}"))?;
    if from != SocketAddr::V4(addr) {
        bail!("UDP reply to {addr} came from {from} instead");
    }
    let body = std::str::from_utf8(&buf[..len]).context("UDP reply is not UTF-8")?;
    Reply::parse(body)
}

/// Connects with [`CONNECT_TIMEOUT`] and the kernel's own handshake (the last ACK at once,
/// on its own, from whatever CPU the client runs on, as every client does), and sets
/// [`IO_TIMEOUT`] on reads and writes.
pub fn connect(addr: SocketAddrV4) -> Result<TcpStream> {
    open(None, addr)
}

/// As [`connect`], from local address `src`.
fn connect_from(src: Ipv4Addr, addr: SocketAddrV4) -> Result<TcpStream> {
    open(Some(src), addr)
}

/// Opens a TCP connection to `addr`, from `src` if given.
///
/// std's `TcpStream` can neither bind nor set options before connecting, so
/// the socket is made with libc and handed to a `TcpStream` before anything
/// else: from then on it owns (and closes) the fd, and its timeout setters
/// apply. Linux bounds a blocking `connect` by the send timeout, which gives
/// the [`CONNECT_TIMEOUT`].
fn open(src: Option<Ipv4Addr>, addr: SocketAddrV4) -> Result<TcpStream> {
    let from = src.map(|src| format!(" from {src}")).unwrap_or_default();
    // SAFETY: socket has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a TCP socket");
    }
    // SAFETY: fd is a socket this function just created and nothing else
    // owns or closes.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    if let Some(src) = src {
        sockaddr_call(&stream, libc::bind, SocketAddrV4::new(src, 0))
            .with_context(|| format!("cannot bind a TCP socket to {src}"))?;
    }
    if let Err(err) = sockaddr_call(&stream, libc::connect, addr) {
        // A blocking connect cut short by the send timeout says EINPROGRESS.
        if err.raw_os_error() == Some(libc::EINPROGRESS) {
            bail!("cannot connect{from} to {addr}: no answer within {CONNECT_TIMEOUT:?}");
        }
        return Err(err).with_context(|| format!("cannot connect{from} to {addr}"));
    }
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// The signature `bind` and `connect` share.
type SockaddrCall =
    unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int;

/// Calls `call` (`libc::bind` or `libc::connect`) on `stream`'s socket with
/// `addr`.
fn sockaddr_call(
    stream: &TcpStream,
    call: SockaddrCall,
    addr: SocketAddrV4,
) -> std::io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        // Both fields are in network byte order.
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in that outlives the call and the
    // length given is its size; the fd is open, owned by `stream`.
    let rc = unsafe {
        call(
            stream.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads one HTTP response (status line, headers, `Content-Length` bytes of
/// body), checks it is `200`, and parses the body as a [`Reply`].
fn read_response<R: BufRead>(reader: &mut R) -> Result<Reply> {
    let status = read_line(reader).context("cannot read the status line")?;
    let mut words = status.split_whitespace();
    let version = words.next().unwrap_or_default();
    let code = words.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code != "200" {
        bail!("unexpected status line {status:?}");
    }
    let mut content_length = None;
    loop {
        let line = read_line(reader).context("cannot read the headers")?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("malformed header {line:?}"))?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .trim()
                .parse()
                .with_context(|| format!("bad Content-Length {value:?}"))?;
            if len > MAX_REPLY {
                bail!("Content-Length {len} is larger than any test server reply");
            }
            content_length = Some(len);
        }
    }
    let len = content_length.context("response has no Content-Length")?;
    let mut body = vec![0; len];
    reader
        .read_exact(&mut body)
        .context("cannot read the body")?;
    let body = String::from_utf8(body).context("body is not UTF-8")?;
    Reply::parse(&body)
}

/// Reads a CRLF-terminated line and returns it without the line end; fails
/// at end of stream, since a response must not stop mid-header.
fn read_line<R: BufRead>(reader: &mut R) -> Result<String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    if n == 0 {
        bail!("connection closed early");
    }
    if line.len() > MAX_REPLY {
        bail!("line longer than {MAX_REPLY} bytes");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Answers the first datagram `server` receives (up to `max` bytes) with each of its bytes plus
/// one, on a thread; the thread returns the datagram's length and sender.
pub fn answer_once_plus_one(
    server: UdpSocket,
    max: usize,
) -> std::thread::JoinHandle<(usize, SocketAddr)> {
    std::thread::spawn(move || {
        server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut buf = vec![0u8; max];
        let (len, client) = server.recv_from(&mut buf).unwrap();
        let answer: Vec<u8> = buf[..len].iter().map(|b| b.wrapping_add(1)).collect();
        server.send_to(&answer, client).unwrap();
        (len, client)
    })
}

/// Sends `query` to `service` from a new socket and waits for one answer of up to `max` bytes:
/// its bytes and where it came from.
pub fn udp_query(service: SocketAddrV4, query: &[u8], max: usize) -> Result<(Vec<u8>, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    socket.send_to(query, service)?;
    let mut buf = vec![0u8; max];
    let (len, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no answer from {service}"))?;
    Ok((buf[..len].to_vec(), from))
}

/// `count` HTTP requests to `url` (IPv6 addresses in brackets) from namespace `ns`, each on a
/// new connection, by `curl`: each lb-testsrv answer as (server name, the client address it
/// saw, without its port). A failed request fails the caller.
pub fn curl_answers(ns: &crate::netns::NetNs, url: &str, count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|_| {
            let out = ns.exec(["curl", "-s", "-g", "-m", "5", url]).unwrap();
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "curl {url}: {out:?}");
            let (name, peer) = body
                .trim()
                .split_once(' ')
                .unwrap_or_else(|| panic!("{body:?}"));
            let (address, _port) = peer.rsplit_once(':').unwrap();
            (name.to_owned(), address.to_owned())
        })
        .collect()
}

/// Waits until `url` answers a `curl` from namespace `ns` (servers up, neighbours known), for
/// up to 10 seconds; panics if it never does.
pub fn wait_for_url(ns: &crate::netns::NetNs, url: &str) {
    for _ in 0..50 {
        let out = ns
            .exec(["curl", "-s", "-g", "-m", "1", "-o", "/dev/null", url])
            .unwrap();
        if out.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{url} never answered");
}

/// How many of `answers` ([`curl_answers`]) each server gave.
pub fn spread_by_name(answers: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (name, _) in answers {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_reply_body() {
        let reply = Reply::parse("backend-2 192.168.100.2:40000\n").unwrap();
        assert_eq!(reply.backend, "backend-2");
        assert_eq!(reply.client_seen, "192.168.100.2:40000".parse().unwrap());
        assert!(Reply::parse("backend-2 192.168.100.2:40000").is_err());
        assert!(Reply::parse("backend-2\n").is_err());
    }

    #[test]
    fn reads_a_response_with_content_length() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n\r\nb0 10.0.0.2:1234\nEXTRA";
        let mut reader = BufReader::new(raw.as_bytes());
        let reply = read_response(&mut reader).unwrap();
        assert_eq!(reply.backend, "b0");
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "EXTRA");
    }

    #[test]
    fn rejects_non_200() {
        let raw = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert!(read_response(&mut BufReader::new(raw.as_bytes())).is_err());
    }
}
