//! Lean load generators for the end-to-end section: a few threads in the client namespace, each
//! looping over one kind of exchange with lb-testsrv until a deadline.
//!
//! They are leaner than the harness' own clients (`lb_tests::client`: a `BufReader`, `String`s
//! and a `format!` per request) because client and backends share the machine's CPUs with the
//! node: every microsecond the client spends is one the node's path cannot show. Every reply
//! is still checked (status, which backend, the client address the backend saw), so a broken
//! path fails the run instead of being measured.
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::client::connect;

/// One HTTP request on a new connection: the server answers and closes, so the client is the
/// passive closer and leaves no TIME_WAIT behind that would exhaust its ports.
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: lbbench\r\nConnection: close\r\n\r\n";

/// One HTTP request on a kept-alive connection.
const GET_KEEP_ALIVE: &[u8] = b"GET / HTTP/1.1\r\nHost: lbbench\r\n\r\n";

/// How long a UDP request waits for its reply before it counts as lost. Short, so that a lost
/// datagram costs little of the measurement.
const UDP_REPLY_TIMEOUT: Duration = Duration::from_millis(200);

/// Largest share of UDP requests that may go unanswered before the run counts as broken: a
/// request/response loop with a handful of datagrams in flight loses none on a working path.
const UDP_MAX_LOST: f64 = 0.01;

/// What the load is aimed at and what a correct reply looks like.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The published address (the node's uplink IP and the service port).
    pub addr: SocketAddrV4,
    /// The client's own address, which the backends must see (no SNAT on either path).
    pub client_ip: Ipv4Addr,
    /// Backends `backend-0` .. `backend-{n-1}`.
    pub backends: usize,
}

/// The kinds of load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// connect → GET → read to the server's close → close, again and again.
    NewConnections,
    /// GET after GET on one connection per thread; records each request's latency.
    KeptAlive,
    /// A datagram and its reply, again and again, on as many sockets (flows) per thread as
    /// there are backends so that the flows spread over all of them.
    Udp,
}

/// What one run of a load did.
#[derive(Debug, Default)]
pub struct Tally {
    /// Completed exchanges (connections, requests, or UDP replies).
    pub done: u64,
    /// Completed exchanges per backend index.
    pub per_backend: Vec<u64>,
    /// UDP requests that got no reply in time.
    pub lost: u64,
    /// Latency of every kept-alive request, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Wall time from the start signal until the last thread finished.
    pub elapsed: Duration,
    /// CPU time the load's CPU was busy over `elapsed` (/proc/stat): the client, the node's
    /// path and the backends together.
    pub busy: Duration,
}

/// Runs `threads` threads of `kind` load against `target` for `duration` on CPU `cpu`, from the
/// calling thread's network namespace (call it inside `NetNs::in_netns`: threads spawned there
/// inherit the namespace, and the CPU this pins the calling thread to). Connections and
/// sockets are opened before the clock starts; the first failed or wrong exchange fails the
/// run.
pub fn run(
    kind: Kind,
    target: Target,
    threads: usize,
    duration: Duration,
    cpu: usize,
) -> Result<Tally> {
    pin(0, cpu)?;
    // Every worker and this thread meet at the barrier: the clock and the CPU counters start
    // once all workers are ready.
    let start = Barrier::new(threads + 1);
    let (results, elapsed, busy) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let start = &start;
                scope.spawn(move || worker(kind, target, start, duration))
            })
            .collect();
        start.wait();
        let began = Instant::now();
        let busy_before = busy_time(cpu);
        let results: Vec<Result<Tally>> = workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| bail!("a load thread panicked")))
            .collect();
        let elapsed = began.elapsed();
        let busy = busy_time(cpu).and_then(|after| Ok(after.saturating_sub(busy_before?)));
        (results, elapsed, busy)
    });
    let mut total = Tally {
        per_backend: vec![0; target.backends],
        elapsed,
        busy: busy?,
        ..Tally::default()
    };
    for result in results {
        let tally = result?;
        total.done += tally.done;
        total.lost += tally.lost;
        for (sum, n) in total.per_backend.iter_mut().zip(&tally.per_backend) {
            *sum += n;
        }
        total.latencies_ns.extend(tally.latencies_ns);
    }
    let sent = total.done + total.lost;
    if kind == Kind::Udp && sent > 0 && total.lost as f64 > UDP_MAX_LOST * sent as f64 {
        bail!(
            "{} of {sent} UDP requests to {} got no reply within {UDP_REPLY_TIMEOUT:?}",
            total.lost,
            target.addr
        );
    }
    Ok(total)
}

/// One load thread: sets up, waits for the start, loops until `duration` has passed.
fn worker(kind: Kind, target: Target, start: &Barrier, duration: Duration) -> Result<Tally> {
    let mut tally = Tally {
        per_backend: vec![0; target.backends],
        ..Tally::default()
    };
    // Set up before the barrier, but always reach it: a thread that failed must not leave the
    // others waiting forever.
    let setup = match kind {
        Kind::NewConnections => Ok(Setup::None),
        Kind::KeptAlive => connect(target.addr).map(Setup::Tcp),
        Kind::Udp => udp_sockets(target).map(Setup::Udp),
    };
    start.wait();
    let deadline = Instant::now() + duration;
    let mut buf = Vec::with_capacity(1024);
    match setup? {
        Setup::None => {
            while Instant::now() < deadline {
                let backend = new_connection(target, &mut buf)?;
                tally.count(backend);
            }
        }
        Setup::Tcp(mut stream) => {
            while Instant::now() < deadline {
                let sent = Instant::now();
                let backend = kept_alive_request(&mut stream, target, &mut buf)?;
                tally.latencies_ns.push(sent.elapsed().as_nanos() as u64);
                tally.count(backend);
            }
        }
        Setup::Udp(sockets) => {
            let mut buf = [0u8; 512];
            'outer: loop {
                for socket in &sockets {
                    if Instant::now() >= deadline {
                        break 'outer;
                    }
                    match udp_exchange(socket, target, &mut buf)? {
                        Some(backend) => tally.count(backend),
                        None => tally.lost += 1,
                    }
                }
            }
        }
    }
    Ok(tally)
}

/// What a worker opened before the clock started.
enum Setup {
    None,
    Tcp(TcpStream),
    Udp(Vec<UdpSocket>),
}

impl Tally {
    fn count(&mut self, backend: usize) {
        self.done += 1;
        self.per_backend[backend] += 1;
    }
}

/// One connection, one request, the server's close; returns the backend that answered.
fn new_connection(target: Target, buf: &mut Vec<u8>) -> Result<usize> {
    let mut stream = connect(target.addr)?;
    stream
        .write_all(GET_CLOSE)
        .with_context(|| format!("cannot send a request to {}", target.addr))?;
    buf.clear();
    stream
        .read_to_end(buf)
        .with_context(|| format!("reading the response of {}", target.addr))?;
    match parse_response(buf, target)? {
        Some((len, backend)) if len == buf.len() => Ok(backend),
        Some(_) => bail!("{} sent bytes after its response", target.addr),
        None => bail!("{} closed mid-response: {:?}", target.addr, lossy(buf)),
    }
}

/// One request on a kept-alive connection; returns the backend that answered.
fn kept_alive_request(stream: &mut TcpStream, target: Target, buf: &mut Vec<u8>) -> Result<usize> {
    stream
        .write_all(GET_KEEP_ALIVE)
        .with_context(|| format!("cannot send a request to {}", target.addr))?;
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("reading a response of {}", target.addr))?;
        if n == 0 {
            bail!("{} closed a kept-alive connection", target.addr);
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_response(buf, target)? {
            Some((len, backend)) if len == buf.len() => return Ok(backend),
            Some(_) => bail!("{} sent bytes after its response", target.addr),
            None => {}
        }
    }
}

/// One datagram and its reply; `None` if the reply did not come in time.
fn udp_exchange(socket: &UdpSocket, target: Target, buf: &mut [u8]) -> Result<Option<usize>> {
    socket
        .send(b"ping\n")
        .with_context(|| format!("cannot send a datagram to {}", target.addr))?;
    match socket.recv(buf) {
        Ok(len) => parse_body(&buf[..len], target).map(Some),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("receiving from {}", target.addr)),
    }
}

/// One connected UDP socket per backend: connected, so the kernel only delivers replies that
/// come from the published address (a reply that missed its reverse NAT is dropped, and shows
/// as lost).
fn udp_sockets(target: Target) -> Result<Vec<UdpSocket>> {
    (0..target.backends)
        .map(|_| {
            let socket = UdpSocket::bind("0.0.0.0:0").context("cannot bind a UDP socket")?;
            socket.connect(target.addr)?;
            socket.set_read_timeout(Some(UDP_REPLY_TIMEOUT))?;
            Ok(socket)
        })
        .collect()
}

/// Parses one HTTP response at the start of `buf`: `None` while it is incomplete, else its
/// length and the backend its body names. Fails on anything but a `200` whose body is a
/// correct reply (see [`parse_body`]).
fn parse_response(buf: &[u8], target: Target) -> Result<Option<(usize, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = &buf[..head_end];
    if !head.starts_with(b"HTTP/1.1 200 ") {
        bail!("unexpected response from {}: {:?}", target.addr, lossy(buf));
    }
    let content_length = head
        .split(|&b| b == b'\n')
        .find_map(|line| {
            let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
            name.eq_ignore_ascii_case(b"content-length")
                .then(|| {
                    std::str::from_utf8(&value[1..])
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .flatten()
        })
        .with_context(|| format!("no Content-Length from {}: {:?}", target.addr, lossy(buf)))?;
    let end = head_end + 4 + content_length;
    if buf.len() < end {
        return Ok(None);
    }
    let backend = parse_body(&buf[head_end + 4..end], target)?;
    Ok(Some((end, backend)))
}

/// Checks a reply body, `"backend-<i> <client ip>:<port>\n"`, and returns `i`.
fn parse_body(body: &[u8], target: Target) -> Result<usize> {
    let wrong = || anyhow::anyhow!("wrong reply from {}: {:?}", target.addr, lossy(body));
    let text = std::str::from_utf8(body).map_err(|_| wrong())?;
    let (name, seen) = text.split_once(' ').ok_or_else(wrong)?;
    let backend: usize = name
        .strip_prefix("backend-")
        .and_then(|i| i.parse().ok())
        .filter(|&i| i < target.backends)
        .ok_or_else(wrong)?;
    let seen_ip = seen.split_once(':').map(|(ip, _)| ip).ok_or_else(wrong)?;
    if seen_ip.parse() != Ok(target.client_ip) {
        bail!(
            "backend-{backend} saw the client as {seen_ip}, not {}: the path rewrote the source",
            target.client_ip
        );
    }
    Ok(backend)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// CPU time CPU `cpu` spent busy since boot: user, nice, system, irq, softirq and steal from
/// its line of /proc/stat (guest time is already part of user time).
fn busy_time(cpu: usize) -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .with_context(|| format!("no {name} in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    if ticks.len() < 8 {
        bail!("unexpected line of /proc/stat: {line:?}");
    }
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().map(|&i| ticks[i]).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Ok(Duration::from_nanos(busy * 1_000_000_000 / hz))
}

/// The highest-numbered CPU this process may run on: the load's, leaving the first (which
/// usually takes more of the machine's housekeeping) to the rest.
pub fn last_cpu() -> Result<usize> {
    lb_tests::cpu::last()
}

/// Pins thread `tid` (0: the calling thread) to CPU `cpu`. Threads it starts afterwards
/// inherit the pinning.
pub fn pin(tid: libc::pid_t, cpu: usize) -> Result<()> {
    lb_tests::cpu::pin(tid, cpu)
}
