//! The control plane at size: applying a table of 10,000 services of 10 backends each
//! (`lbctl apply`), applying it again unchanged, one `service add` on top of it, the time from
//! `service add` returning to the first connection being served, and a metrics scrape of that
//! table.
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use lb_tests::Lbctl;
use lb_tests::client::http_get_new_connection;
use lb_tests::topology::{NODE_UPLINK, SingleNode, SingleNodeSpec};

use crate::Options;
use crate::report::{Measurement, names};

/// Backends of every generated service.
const BACKENDS_PER_SERVICE: usize = 10;
/// First port of the generated services (one port each).
const FIRST_PORT: u16 = 20_000;
/// Ports `service add` publishes the measured services on, above the generated ones.
const MEASURED_PORT: u16 = 40_000;
/// Times `service add` → first connection is measured (the median is kept).
const FIRST_CONNECTION_ROUNDS: u16 = 5;
/// Scrapes of /metrics (the median is kept).
const SCRAPES: usize = 5;

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let services = if opts.smoke { 50 } else { 10_000 };
    let topo = SingleNode::build(SingleNodeSpec {
        backends: 2,
        ..SingleNodeSpec::default()
    })?;
    let lbctl = Lbctl::new(topo.node())?;
    lbctl.run(&["attach", NODE_UPLINK])?;

    let file = std::env::temp_dir().join(format!("lbbench-table-{}.json", std::process::id()));
    std::fs::write(&file, generated_table(services))?;
    let file_arg = file.to_str().context("temporary path is not UTF-8")?;
    let mut found = Vec::new();
    let mut record = |case: String, value: f64, unit: &'static str| {
        found.push(Measurement::new(
            names::CONTROL,
            case,
            names::LBCTL,
            value,
            unit,
        ));
    };
    let size = format!("{services} services x {BACKENDS_PER_SERVICE} backends");

    let applied = timed(|| lbctl.run(&["apply", file_arg]))?;
    record(format!("apply {size}"), applied.as_secs_f64(), "s");
    let listed = lbctl.run(&["service", "ls", "--json"])?;
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    let count = listed
        .as_array()
        .or_else(|| listed["services"].as_array())
        .map_or(0, Vec::len);
    ensure!(
        count == services,
        "{count} services listed after applying {services}"
    );
    let table_before = lbctl.run(&["export"])?;
    let started = Instant::now();
    let out = lbctl.run(&["apply", file_arg])?;
    let again = started.elapsed();
    ensure!(
        out.contains("nothing changed") && lbctl.run(&["export"])? == table_before,
        "applying the same table again changed something: {out}"
    );
    record(
        format!("apply {size} again, unchanged"),
        again.as_secs_f64(),
        "s",
    );
    let _ = std::fs::remove_file(&file);

    // A service published with `service add` on top of the table, its first connection.
    let backends: Vec<String> = (0..topo.backend_count())
        .map(|i| topo.backend_addr(i).to_string())
        .collect();
    let mut adds = Vec::new();
    let mut firsts = Vec::new();
    for round in 0..FIRST_CONNECTION_ROUNDS {
        let port = MEASURED_PORT + round;
        let name = format!("measured{round}");
        let port_arg = port.to_string();
        let mut args = vec!["service", "add", &name, &port_arg];
        args.extend(backends.iter().map(String::as_str));
        let started = Instant::now();
        lbctl.run(&args)?;
        let returned = Instant::now();
        adds.push(returned - started);
        let vip = SocketAddrV4::new(topo.node_uplink_ip(), port);
        // Once `service add` returned, the data plane has the service: its very first
        // connection is answered, with no retry.
        let reply = topo
            .client()
            .in_netns(|| http_get_new_connection(vip))
            .with_context(|| format!("the first connection to {vip} after `service add`"))?;
        firsts.push(returned.elapsed());
        ensure!(
            reply.backend.starts_with("backend-"),
            "{vip} answered by {:?}",
            reply.backend
        );
    }
    record(
        format!("service add on top of {services} services"),
        median(&mut adds) * 1e3,
        "ms",
    );
    record(
        "service add returned -> first connection served".to_string(),
        median(&mut firsts) * 1e3,
        "ms",
    );

    let metrics_addr: SocketAddr = "127.0.0.1:9617".parse()?;
    let daemon = lbctl.start_daemon(metrics_addr, topo.node())?;
    let mut scrapes = Vec::new();
    let mut bytes = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let body = topo.node().in_netns(|| scrape(metrics_addr))?;
        scrapes.push(started.elapsed());
        // Every backend of the table has its series in each per-backend family.
        let backends = services * BACKENDS_PER_SERVICE
            + usize::from(FIRST_CONNECTION_ROUNDS) * topo.backend_count();
        // (`lbctl_backend_health` has one series per state: healthy, unhealthy, unknown.)
        for (family, per_backend) in [
            ("lbctl_backend_packets_total", 1),
            ("lbctl_backend_bytes_total", 1),
            ("lbctl_backend_connections_total", 1),
            ("lbctl_backend_drained", 1),
            ("lbctl_backend_health", 3),
        ] {
            let series = count_series(&body, family);
            ensure!(
                series == backends * per_backend,
                "/metrics has {series} {family} series for {backends} backends"
            );
        }
        bytes = body.len();
    }
    drop(daemon);
    record(
        format!("metrics scrape, {size}"),
        median(&mut scrapes) * 1e3,
        "ms",
    );
    record(format!("metrics size, {size}"), bytes as f64 / 1e6, "MB");
    Ok(found)
}

/// A table file of `services` TCP services on ports from [`FIRST_PORT`], each with
/// [`BACKENDS_PER_SERVICE`] backends of its own (10.100.0.1 onwards, port 80).
fn generated_table(services: usize) -> String {
    let mut out = String::from("{\"services\": [\n");
    for i in 0..services {
        let port = usize::from(FIRST_PORT) + i;
        let _ = write!(
            out,
            "{{\"name\": \"svc{i}\", \"port\": {port}, \"backends\": ["
        );
        for b in 0..BACKENDS_PER_SERVICE {
            let sep = if b == 0 { "" } else { ", " };
            let _ = write!(
                out,
                "{sep}\"10.{}.{}.{}:80\"",
                100 + i / 256,
                i % 256,
                b + 1
            );
        }
        let sep = if i + 1 == services { "" } else { "," };
        let _ = writeln!(out, "]}}{sep}");
    }
    out.push_str("]}\n");
    out
}

/// GETs /metrics on a new connection and returns the body, whatever its size (the harness'
/// `http_get` caps answers; a table of 100,000 backends makes a scrape of tens of MB).
fn scrape(addr: SocketAddr) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let header_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("/metrics answer has no header end")?;
    ensure!(
        answer.starts_with(b"HTTP/1.1 200"),
        "/metrics answered {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(40)])
    );
    Ok(answer.split_off(header_end + 4))
}

/// The series of `family` in a scrape: its lines that start with `family{`.
fn count_series(body: &[u8], family: &str) -> usize {
    let start = format!("{family}{{");
    body.split(|&b| b == b'\n')
        .filter(|line| line.starts_with(start.as_bytes()))
        .count()
}

/// Runs `f` and returns how long it took.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<Duration> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed())
}

/// The median, in seconds.
fn median(times: &mut [Duration]) -> f64 {
    times.sort_unstable();
    times[times.len() / 2].as_secs_f64()
}
