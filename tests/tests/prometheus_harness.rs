//! Checks of the Prometheus harness itself, against a fixed metrics page
//! served from inside a namespace (no lbctl): if these fail, the metrics
//! tests of lbctl cannot be trusted.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::netns::NetNs;
use lb_tests::prometheus::{JOB, Prometheus};

/// The page the fake exporter serves.
const METRICS: &str = "# HELP t_requests_total Test.\n\
                       # TYPE t_requests_total counter\n\
                       t_requests_total{service=\"web\",backend=\"10.0.0.1:80\"} 7\n";

/// Longest wait for Prometheus' first scrape (about 5 s, see the
/// `prometheus` module).
const FIRST_SCRAPE_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn prometheus_scrapes_a_page_and_answers_queries() -> Result<()> {
    lb_tests::require_root()?;
    let ns = NetNs::new("prom")?;
    let listener = ns.in_netns(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
    let target = listener.local_addr()?;
    let exporter = Exporter::default();
    std::thread::scope(|scope| {
        let server = scope.spawn(|| exporter.serve(listener));
        let checked = scrape_and_query(&ns, target, &exporter);
        exporter.stop.store(true, Ordering::Relaxed);
        let served = server.join().expect("the exporter thread panicked");
        checked.and(served)
    })
}

/// Starts Prometheus on `target` and checks what it scraped.
fn scrape_and_query(ns: &NetNs, target: SocketAddr, exporter: &Exporter) -> Result<()> {
    let started = Instant::now();
    let prom = Prometheus::start(ns, &[target], Duration::from_secs(1))?;
    eprintln!("Prometheus ready after {:?}", started.elapsed());
    let dir = prom.dir().to_path_buf();

    let samples = prom.wait_until("t_requests_total", FIRST_SCRAPE_TIMEOUT, |s| !s.is_empty())?;
    eprintln!(
        "first scrape seen after {:?} ({} scrapes served)",
        started.elapsed(),
        exporter.scrapes.load(Ordering::Relaxed)
    );
    ensure!(samples.len() == 1, "one series expected: {samples:#?}");
    let labels: Vec<(&str, &str)> = samples[0]
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let instance = target.to_string();
    assert_eq!(
        labels,
        [
            ("__name__", "t_requests_total"),
            ("backend", "10.0.0.1:80"),
            ("instance", instance.as_str()),
            ("job", JOB),
            ("service", "web"),
        ]
    );
    assert_eq!(samples[0].value, 7.0);

    let up = prom.query(&format!("up{{job=\"{JOB}\"}}"))?;
    ensure!(
        up.len() == 1 && up[0].value == 1.0,
        "target not up: {up:#?}"
    );
    let targets = prom.targets()?;
    ensure!(
        targets.len() == 1 && targets[0].health == "up" && targets[0].last_error.is_empty(),
        "{targets:#?}"
    );
    assert_eq!(targets[0].scrape_url, format!("http://{target}/metrics"));

    // Scalars, and the errors a test would see.
    let two = prom.query("sum(t_requests_total) / 3.5")?;
    ensure!(
        two.len() == 1 && two[0].value == 2.0 && two[0].labels.is_empty(),
        "{two:#?}"
    );
    let err = prom.query("t_requests_total{").unwrap_err();
    let err = format!("{err:#}");
    ensure!(
        err.contains("parse error") && err.contains("bad_data"),
        "{err}"
    );
    let err = prom
        .wait_until("t_requests_total", Duration::from_millis(300), |s| {
            s.iter().any(|s| s.value == 8.0)
        })
        .unwrap_err();
    let err = format!("{err:#}");
    ensure!(
        err.contains("still gives") && err.contains("value: 7.0") && err.contains("health: \"up\""),
        "{err}"
    );

    drop(prom);
    assert_nothing_left(&dir)
}

/// A Prometheus dropped while its test panics is gone, with its folder.
#[test]
fn prometheus_stops_when_its_test_panics() -> Result<()> {
    lb_tests::require_root()?;
    let ns = NetNs::new("prompanic")?;
    // Nothing listens there; Prometheus starts all the same.
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    let dir = Mutex::new(None::<PathBuf>);
    let panicked = std::panic::catch_unwind(|| {
        let prom = Prometheus::start(&ns, &[target], Duration::from_secs(1)).unwrap();
        *dir.lock().unwrap() = Some(prom.dir().to_path_buf());
        panic!("deliberate panic with Prometheus running");
    });
    ensure!(panicked.is_err(), "the closure was meant to panic");
    let dir = dir
        .into_inner()
        .unwrap()
        .context("Prometheus did not start")?;
    assert_nothing_left(&dir)
}

/// No process mentions `dir` (Prometheus' command line names its config
/// and TSDB in it) and the folder is gone.
fn assert_nothing_left(dir: &std::path::Path) -> Result<()> {
    let out = Command::new("pgrep")
        .arg("-af")
        .arg(dir)
        .output()
        .context("cannot run pgrep")?;
    // pgrep exits 1 when nothing matches.
    if out.status.code() != Some(1) {
        bail!(
            "processes left running ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    ensure!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}

/// A minimal exporter: answers `GET /metrics` with [`METRICS`] and any
/// other request with 404, one connection at a time, until `stop` is set.
#[derive(Default)]
struct Exporter {
    stop: AtomicBool,
    scrapes: AtomicUsize,
}

impl Exporter {
    /// Serves `listener` until `stop`; polls a non-blocking accept so that
    /// it notices `stop` without a last connection to wake it.
    fn serve(&self, listener: TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        while !self.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                // Prometheus may hang up mid-scrape (e.g. when it is killed):
                // not the exporter's failure, so it keeps serving.
                Ok((stream, _)) => {
                    if let Err(e) = self.answer(stream) {
                        eprintln!("exporter: {e:#}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("exporter accept"),
            }
        }
        Ok(())
    }

    /// Reads one request's head and answers it, then closes the connection.
    fn answer(&self, mut stream: TcpStream) -> Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut head = Vec::new();
        let mut buf = [0; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut buf).context("exporter read")?;
            if n == 0 {
                bail!("client closed the connection mid-request");
            }
            head.extend_from_slice(&buf[..n]);
        }
        let reply = if head.starts_with(b"GET /metrics ") {
            self.scrapes.fetch_add(1, Ordering::Relaxed);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{METRICS}",
                METRICS.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        };
        stream.write_all(reply.as_bytes()).context("exporter write")
    }
}
