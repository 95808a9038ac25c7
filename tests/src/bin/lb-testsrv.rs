//! `lb-testsrv --name NAME [--tcp ADDR:PORT] [--udp ADDR:PORT]`: the backend
//! server of the lbctl tests and demo.
//!
//! Every HTTP request and every UDP datagram is answered with
//! `"{NAME} {peer_ip}:{peer_port}\n"`, which tells the client which backend
//! the load balancer picked and which source address reached the backend.
//! HTTP/1.1 keep-alive is supported so tests can check that one connection
//! sticks to one backend.
//!
//! It prints `ready` on stdout once its sockets are bound, and nothing else
//! there (the harness stops reading after that line); diagnostics go to
//! stderr. SIGTERM's default action ends it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Idle time after which a keep-alive connection is closed, so clients that
/// vanish (e.g. their namespace was deleted) do not pin threads forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest request line or header line accepted.
const MAX_LINE: usize = 8 * 1024;

/// Command-line options.
struct Args {
    name: String,
    tcp: Option<SocketAddr>,
    udp: Option<SocketAddr>,
}

fn main() -> Result<()> {
    let args = parse_args(std::env::args().skip(1))?;
    let name: Arc<str> = args.name.into();

    let tcp = args
        .tcp
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("cannot bind TCP {addr}")))
        .transpose()?;
    let udp = args
        .udp
        .map(|addr| UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}")))
        .transpose()?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    drop(stdout);

    let udp_thread = udp.map(|socket| {
        let name = Arc::clone(&name);
        std::thread::spawn(move || serve_udp(&socket, &name))
    });
    if let Some(listener) = tcp {
        serve_tcp(listener, Arc::clone(&name));
    }
    if let Some(thread) = udp_thread {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("UDP thread panicked"))?;
    }
    Ok(())
}

/// Parses `--name NAME [--tcp ADDR:PORT] [--udp ADDR:PORT]`; at least one
/// of the sockets is required.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args> {
    const USAGE: &str = "usage: lb-testsrv --name NAME [--tcp ADDR:PORT] [--udp ADDR:PORT]";
    let mut name = None;
    let mut tcp = None;
    let mut udp = None;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--name" => name = Some(value),
            "--tcp" => {
                tcp = Some(
                    value
                        .parse()
                        .with_context(|| format!("bad --tcp {value}"))?,
                )
            }
            "--udp" => {
                udp = Some(
                    value
                        .parse()
                        .with_context(|| format!("bad --udp {value}"))?,
                )
            }
            _ => bail!("unknown argument {flag}\n{USAGE}"),
        }
    }
    let name = name.with_context(|| format!("--name is required\n{USAGE}"))?;
    if tcp.is_none() && udp.is_none() {
        bail!("give --tcp, --udp or both\n{USAGE}");
    }
    Ok(Args { name, tcp, udp })
}

/// Replies to every datagram with the reply line, forever.
fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(reply_body(name, peer).as_bytes(), peer) {
                    eprintln!("lb-testsrv {name}: cannot reply to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("lb-testsrv {name}: UDP receive failed: {e}"),
        }
    }
}

/// Threads that may wait in `accept` at once; a thread that finishes its connection while this
/// many are already waiting ends instead of joining them.
const MAX_IDLE_THREADS: usize = 16;

/// The listening socket and the threads that serve it.
struct Acceptors {
    listener: TcpListener,
    name: Arc<str>,
    /// Threads blocked in (or about to enter) `accept`.
    idle: AtomicUsize,
}

/// Accepts connections forever, each served by a thread of its own for as long as it lasts
/// (keep-alive connections may stay open for long), like one thread per connection; but the
/// threads are reused: a thread that is done goes back to accepting. Spawning a thread per
/// connection cost more than everything else the server does, and the end-to-end bench
/// measures connection rates through the load balancer, not thread creation.
fn serve_tcp(listener: TcpListener, name: Arc<str>) {
    let acceptors = Arc::new(Acceptors {
        listener,
        name,
        idle: AtomicUsize::new(0),
    });
    // This thread is the one that never ends, so the process keeps serving.
    accept_and_serve(&acceptors, true);
}

/// One serving thread: accept, serve that connection, again. Before serving, it makes sure
/// another thread is accepting, so a long connection never holds new ones up. Unless
/// `permanent`, it ends when enough others are idle.
fn accept_and_serve(acceptors: &Arc<Acceptors>, permanent: bool) {
    let name = &acceptors.name;
    loop {
        acceptors.idle.fetch_add(1, Ordering::SeqCst);
        let accepted = acceptors.listener.accept();
        if acceptors.idle.fetch_sub(1, Ordering::SeqCst) == 1 {
            let more = Arc::clone(acceptors);
            if let Err(e) =
                std::thread::Builder::new().spawn(move || accept_and_serve(&more, false))
            {
                // This thread accepts again once its connection is done.
                eprintln!("lb-testsrv {name}: cannot start a thread: {e}");
            }
        }
        match accepted {
            Ok((stream, _)) => {
                if let Err(e) = serve_connection(stream, name) {
                    eprintln!("lb-testsrv {name}: {e:#}");
                }
            }
            Err(e) => eprintln!("lb-testsrv {name}: accept failed: {e}"),
        }
        if !permanent && acceptors.idle.load(Ordering::SeqCst) >= MAX_IDLE_THREADS {
            return;
        }
    }
}

/// Answers the requests of one connection until the client closes it, asks
/// for `Connection: close`, or idles past [`IDLE_TIMEOUT`].
fn serve_connection(stream: TcpStream, name: &str) -> Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(request_line) = read_line(&mut reader)? else {
            return Ok(()); // The client closed the connection.
        };
        let mut words = request_line.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let _path = words.next();
        let version = words.next().unwrap_or_default().to_string();

        let mut keep_alive = version == "HTTP/1.1";
        let mut body_len = 0u64;
        loop {
            let line = read_line(&mut reader)?.context("connection closed mid-headers")?;
            if line.is_empty() {
                break;
            }
            let Some((key, value)) = line.split_once(':') else {
                bail!("malformed header {line:?} from {peer}");
            };
            let (key, value) = (key.trim(), value.trim());
            if key.eq_ignore_ascii_case("connection") {
                if value.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            } else if key.eq_ignore_ascii_case("content-length") {
                body_len = value
                    .parse()
                    .with_context(|| format!("bad Content-Length {value:?} from {peer}"))?;
            }
        }
        // A GET has no body, but skip one if sent so the next request
        // starts at the right byte.
        std::io::copy(&mut (&mut reader).take(body_len), &mut std::io::sink())?;

        let (status, body) = if method == "GET" {
            ("200 OK", reply_body(name, peer))
        } else {
            keep_alive = false;
            ("405 Method Not Allowed", "only GET is served\n".to_string())
        };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(response.as_bytes())?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Reads a line without its CRLF; `None` at end of stream. Lines are capped
/// at [`MAX_LINE`] so a broken client cannot make the server buffer without
/// bound.
fn read_line(reader: &mut BufReader<TcpStream>) -> Result<Option<String>> {
    let mut line = String::new();
    let n = reader.take(MAX_LINE as u64).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        bail!("request line longer than {MAX_LINE} bytes or cut short");
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

/// `"{name} {peer_ip}:{peer_port}\n"`: what every reply says.
fn reply_body(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}:{}\n", peer.ip().to_canonical(), peer.port())
}
