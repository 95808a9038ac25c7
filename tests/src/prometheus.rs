//! A real Prometheus server (Debian's `prometheus`) run inside a test's
//! namespace, scraping targets there, and queried through its HTTP API.
//!
//! Everything it writes (configuration, TSDB, log) goes to a temporary
//! folder of its own, removed when it is dropped; it never touches
//! `/var/lib/prometheus` or the packaged service.
//!
//! Timing, measured with Prometheus 2.42 (Debian 12): the server is ready
//! about 0.1 s after it starts, but it scrapes a target for the first time
//! only about 5 s later, because its scrape manager applies discovered
//! targets on a fixed 5 s tick (not configurable in 2.42). Give
//! [`Prometheus::wait_until`] a timeout of 15 s or more for the first
//! scrape.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::client::{CONNECT_TIMEOUT, IO_TIMEOUT};
use crate::netns::{NetNs, describe, in_named_netns};
use crate::unique_prefix;

/// The job every target is scraped under (the `job` label).
pub const JOB: &str = "lbctl";

/// How long Prometheus may take to answer `/-/ready` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often [`Prometheus::start`] asks `/-/ready`.
const READY_POLL: Duration = Duration::from_millis(100);

/// How often [`Prometheus::wait_until`] runs its query.
const QUERY_POLL: Duration = Duration::from_millis(250);

/// The file in the folder that gets Prometheus' stdout and stderr.
const LOG_FILE: &str = "prometheus.log";

/// Lines of the Prometheus log that errors show.
const LOG_TAIL_LINES: usize = 20;

/// Largest HTTP response the client accepts.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// A Prometheus server running in a namespace. Dropping it kills the
/// server, waits for it and removes its folder.
///
/// It keeps only the namespace's name (queries enter the namespace by
/// name), so it can sit next to the namespace in a fixture; drop it before
/// the namespace.
pub struct Prometheus {
    child: Child,
    netns: String,
    /// Where the HTTP API listens, inside the namespace.
    addr: SocketAddr,
    dir: TempDir,
}

/// One sample of an instant query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' labels, `__name__` included when the result keeps it
    /// (a plain selector does; most functions and operators drop it). Empty
    /// for a scalar result.
    pub labels: BTreeMap<String, String>,
    /// The value; NaN and the infinities are possible.
    pub value: f64,
}

/// One scrape target as Prometheus sees it (`/api/v1/targets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL Prometheus scrapes, e.g. `http://127.0.0.1:9617/metrics`.
    pub scrape_url: String,
    /// `up`, `down` or `unknown` (not scraped yet).
    pub health: String,
    /// Why the last scrape failed; empty if it succeeded.
    pub last_error: String,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, scraping `targets` (addresses as seen
    /// from inside `ns`, path `/metrics`) every `scrape_interval` under job
    /// [`JOB`], and waits until it is ready.
    ///
    /// It listens on a free port of 127.0.0.1 in `ns` and keeps its
    /// configuration, TSDB and log in a fresh folder
    /// `/tmp/lbt-<pid>-<counter>-prometheus`. The scrape timeout is the
    /// interval, or 10 s if the interval is longer.
    pub fn start(
        ns: &NetNs,
        targets: &[SocketAddr],
        scrape_interval: Duration,
    ) -> Result<Prometheus> {
        if targets.is_empty() {
            bail!("Prometheus needs at least one target to scrape");
        }
        let interval_ms = scrape_interval.as_millis();
        if interval_ms == 0 || Duration::from_millis(interval_ms as u64) != scrape_interval {
            bail!("scrape interval {scrape_interval:?} must be a positive whole number of ms");
        }
        let dir = TempDir::new("prometheus")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml(targets, interval_ms))
            .with_context(|| format!("cannot write {}", config.display()))?;
        let tsdb = dir.path().join("tsdb");
        let log_path = dir.path().join(LOG_FILE);
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;

        let addr = ns
            .in_netns(free_local_port)
            .with_context(|| format!("cannot find a free port in namespace {}", ns.name()))?;
        let bin = prometheus_bin();
        let mut cmd = ns.exec_command([
            bin.clone(),
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", tsdb.display()),
            format!("--web.listen-address={addr}"),
        ]);
        // Relative paths Prometheus might use resolve inside the folder.
        cmd.current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", describe(&cmd)))?;
        // From here on, Drop kills the server if it does not get ready.
        let mut prom = Prometheus {
            child,
            netns: ns.name().to_string(),
            addr,
            dir,
        };
        prom.wait_ready().with_context(|| {
            format!(
                "{} did not get ready (is {bin} installed? `cargo xtask setup` installs it)",
                describe(&cmd)
            )
        })?;
        Ok(prom)
    }

    /// Where the HTTP API listens, inside the namespace.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The folder with the configuration, TSDB and log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file that gets Prometheus' stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Runs the instant query `promql` (`/api/v1/query`, evaluated now)
    /// and returns its samples: one per series of a vector result, or one
    /// without labels for a scalar. A range vector or string result is an
    /// error.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let (status, body) = self
            .get(&format!("/api/v1/query?query={}", url_encode(promql)))
            .with_context(|| format!("query `{promql}`"))?;
        parse_query_response(status, &body).with_context(|| format!("query `{promql}`"))
    }

    /// Runs `promql` every 250 ms until `predicate` holds for its samples
    /// and returns them; after `timeout`, fails with the last samples and
    /// the state of every target (health, last scrape error). A failing
    /// query fails at once.
    pub fn wait_until(
        &self,
        promql: &str,
        timeout: Duration,
        predicate: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let samples = self.query(promql)?;
            if predicate(&samples) {
                return Ok(samples);
            }
            if Instant::now() >= deadline {
                let targets = match self.targets() {
                    Ok(targets) => format!("{targets:#?}"),
                    Err(e) => format!("unknown ({e:#})"),
                };
                bail!("after {timeout:?}, `{promql}` still gives {samples:#?}\ntargets: {targets}");
            }
            std::thread::sleep(QUERY_POLL);
        }
    }

    /// The scrape targets and their health (`/api/v1/targets`).
    pub fn targets(&self) -> Result<Vec<Target>> {
        let (status, body) = self.get("/api/v1/targets")?;
        parse_targets_response(status, &body).context("GET /api/v1/targets")
    }

    /// `GET target` on the API from inside the namespace.
    fn get(&self, target: &str) -> Result<(u16, String)> {
        let addr = self.addr;
        in_named_netns(&self.netns, || http_get(addr, target))
    }

    /// Polls `/-/ready` until it answers 200; fails early if the server
    /// exits, and shows the log tail either way.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Prometheus exited ({status}); its log ends with:\n{}",
                    self.log_tail()
                );
            }
            let last = match self.get("/-/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "not ready after {READY_TIMEOUT:?} (last answer: {last}); its log ends \
                     with:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// The last lines of the log, for error messages.
    fn log_tail(&self) -> String {
        let path = self.log_path();
        match std::fs::read_to_string(&path) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", path.display()),
        }
    }
}

impl Drop for Prometheus {
    /// Kills the server and waits for it (before the folder goes); a
    /// failure is reported on stderr but never panics, since drop may run
    /// while a failed test is already unwinding.
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("warning: cannot kill Prometheus: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("warning: cannot reap Prometheus: {e}");
        }
    }
}

/// A fresh folder `/tmp/lbt-<pid>-<counter>-<role>`, removed with its
/// contents when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(role: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{}-{role}", unique_prefix()));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// The Prometheus binary: `$PROMETHEUS_BIN` if set, else `prometheus` from
/// the PATH (Debian installs `/usr/bin/prometheus`).
fn prometheus_bin() -> String {
    std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".to_string())
}

/// The configuration: one job, [`JOB`], scraping `targets` every
/// `interval_ms` (Prometheus makes the scrape timeout the interval when that
/// is below its 10 s default).
fn config_yaml(targets: &[SocketAddr], interval_ms: u128) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "global:\n  scrape_interval: {interval_ms}ms\n  evaluation_interval: {interval_ms}ms\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

/// A port of 127.0.0.1 that nothing listens on in the calling thread's
/// namespace: bound with port 0, then released for Prometheus to take.
/// Nothing else runs in a test's namespace that could grab it in between.
fn free_local_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}

/// Percent-encodes `text` for a URL query value: everything but RFC 3986's
/// unreserved characters.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `GET target` (path and query) from `addr` over HTTP/1.1 with
/// `Connection: close`, in the calling thread's namespace; returns the
/// status code and the body, whatever the status.
///
/// Useful beyond Prometheus, e.g. to fetch a `/metrics` page directly.
pub fn http_get(addr: SocketAddr, target: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("cannot send GET {target} to {addr}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("cannot read the answer to GET http://{addr}{target}"))?;
    if raw.len() as u64 > MAX_RESPONSE {
        bail!("GET http://{addr}{target}: answer larger than {MAX_RESPONSE} bytes");
    }
    let (status, body) =
        parse_response(&raw).with_context(|| format!("GET http://{addr}{target}"))?;
    let body = String::from_utf8(body)
        .with_context(|| format!("GET http://{addr}{target}: body is not UTF-8"))?;
    Ok((status, body))
}

/// Splits a complete HTTP/1.x response (the server closed the connection
/// after it) into the status code and the body, which is delimited by
/// `Content-Length`, chunked (Go's server chunks bodies over 2 KiB), or the
/// end of the stream.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let head_end = find(raw, b"\r\n\r\n").context("response ends inside its headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).context("headers are not UTF-8")?;
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let version = words.next().unwrap_or_default();
    let status = words.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("unexpected status line {status_line:?}");
    }
    let status: u16 = status
        .parse()
        .with_context(|| format!("unexpected status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("malformed header {line:?}"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .parse()
                .with_context(|| format!("bad Content-Length {value:?}"))?;
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
            if !chunked {
                bail!("unsupported Transfer-Encoding {value:?}");
            }
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = content_length {
        rest.get(..len)
            .with_context(|| format!("body is {} bytes, Content-Length says {len}", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

/// Decodes a chunked body: `<hex size>[;ext]\r\n<data>\r\n`... up to the
/// zero-size chunk (trailers after it are ignored).
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").context("chunked body ends inside a chunk size")?;
        let line = std::str::from_utf8(&raw[..line_end]).context("chunk size is not UTF-8")?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let data = raw
            .get(..size)
            .context("chunked body ends inside a chunk")?;
        body.extend_from_slice(data);
        raw = raw
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .context("chunk is not followed by CRLF")?;
    }
}

/// Offset of the first `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `data` of an API answer, or an error with Prometheus' own
/// explanation (`errorType`, `error`) if the status is not 200 or the
/// answer is not `"status": "success"`.
fn api_data(status: u16, body: &str) -> Result<Value> {
    let json: Value = serde_json::from_str(body)
        .with_context(|| format!("HTTP {status}, body is not JSON: {body:?}"))?;
    if status != 200 || json["status"] != "success" {
        bail!(
            "HTTP {status}, Prometheus says {}: {}",
            json["errorType"].as_str().unwrap_or("?"),
            json["error"].as_str().unwrap_or(body)
        );
    }
    Ok(json["data"].clone())
}

/// The samples of an `/api/v1/query` answer.
fn parse_query_response(status: u16, body: &str) -> Result<Vec<Sample>> {
    let data = api_data(status, body)?;
    let result = &data["result"];
    match data["resultType"].as_str() {
        Some("vector") => result
            .as_array()
            .with_context(|| format!("vector result is not an array: {result}"))?
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .with_context(|| format!("series without labels: {series}"))?
                    .iter()
                    .map(|(name, value)| {
                        let value = value
                            .as_str()
                            .with_context(|| format!("label {name} is not a string: {value}"))?;
                        Ok((name.clone(), value.to_string()))
                    })
                    .collect::<Result<_>>()?;
                let value = sample_value(&series["value"])?;
                Ok(Sample { labels, value })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: sample_value(result)?,
        }]),
        other => bail!(
            "result type {other:?} is not an instant vector or a scalar (a range selector \
             like `x[1m]` needs a function around it)"
        ),
    }
}

/// The value of a `[<unix time>, "<value>"]` pair; Prometheus writes NaN
/// and the infinities as `NaN`, `+Inf` and `-Inf`, which Rust parses too.
fn sample_value(pair: &Value) -> Result<f64> {
    let text = pair[1]
        .as_str()
        .with_context(|| format!("sample {pair} is not [time, \"value\"]"))?;
    text.parse()
        .with_context(|| format!("sample value {text:?} is not a number"))
}

/// The active targets of an `/api/v1/targets` answer.
fn parse_targets_response(status: u16, body: &str) -> Result<Vec<Target>> {
    let data = api_data(status, body)?;
    let text = |target: &Value, field: &str| target[field].as_str().unwrap_or_default().to_string();
    Ok(data["activeTargets"]
        .as_array()
        .with_context(|| format!("no activeTargets array in {data}"))?
        .iter()
        .map(|target| Target {
            scrape_url: text(target, "scrapeUrl"),
            health: text(target, "health"),
            last_error: text(target, "lastError"),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_promql_for_a_url() {
        assert_eq!(
            url_encode(r#"sum by (backend) (x_total{service="web"}) / 2"#),
            "sum%20by%20%28backend%29%20%28x_total%7Bservice%3D%22web%22%7D%29%20%2F%202"
        );
        assert_eq!(url_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(url_encode("é+&"), "%C3%A9%2B%26");
    }

    #[test]
    fn writes_one_job_with_the_targets() {
        let targets = [
            "127.0.0.1:9617".parse().unwrap(),
            "[::1]:80".parse().unwrap(),
        ];
        assert_eq!(
            config_yaml(&targets, 1000),
            "global:\n  scrape_interval: 1000ms\n  evaluation_interval: 1000ms\n\
             scrape_configs:\n  - job_name: lbctl\n    static_configs:\n      \
             - targets: [\"127.0.0.1:9617\", \"[::1]:80\"]\n"
        );
    }

    #[test]
    fn reads_content_length_chunked_and_close_delimited_bodies() {
        let raw =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\nbody";
        assert_eq!(parse_response(raw).unwrap(), (200, b"body".to_vec()));

        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(
            parse_response(raw).unwrap(),
            (200, b"Wikipedia in \r\n\r\nchunks.".to_vec())
        );

        let raw = b"HTTP/1.0 503 Service Unavailable\r\n\r\nnot ready";
        assert_eq!(parse_response(raw).unwrap(), (503, b"not ready".to_vec()));
    }

    #[test]
    fn rejects_truncated_responses() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nbody",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbod",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                parse_response(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn parses_vector_and_scalar_results() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","instance":"127.0.0.1:9999","job":"lbctl"},
             "value":[1795255101.175,"1"]},
            {"metric":{},"value":[1795255101.175,"+Inf"]},
            {"metric":{"a":"b"},"value":[1795255101.175,"NaN"]}]}}"#;
        let samples = parse_query_response(200, body).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].labels["job"], "lbctl");
        assert_eq!(samples[0].labels["__name__"], "up");
        assert_eq!(samples[0].value, 1.0);
        assert_eq!(samples[1].value, f64::INFINITY);
        assert!(samples[2].value.is_nan());
        assert_eq!("-Inf".parse::<f64>().unwrap(), f64::NEG_INFINITY);

        let body = r#"{"status":"success","data":{"resultType":"scalar","result":[1795255101.193,"2.5"]}}"#;
        let samples = parse_query_response(200, body).unwrap();
        assert_eq!(
            samples,
            [Sample {
                labels: BTreeMap::new(),
                value: 2.5
            }]
        );

        let body = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_query_response(200, body).is_err());
    }

    #[test]
    fn reports_prometheus_errors() {
        let body = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:4: parse error: unexpected end of input inside braces"}"#;
        let err = parse_query_response(400, body).unwrap_err().to_string();
        assert!(err.contains("HTTP 400"), "{err}");
        assert!(err.contains("bad_data"), "{err}");
        assert!(err.contains("unexpected end of input"), "{err}");
        assert!(parse_query_response(502, "Bad Gateway").is_err());
    }

    #[test]
    fn parses_targets() {
        let body = r#"{"status":"success","data":{"activeTargets":[{"discoveredLabels":{},
            "labels":{"instance":"127.0.0.1:9999","job":"lbctl"},"scrapePool":"lbctl",
            "scrapeUrl":"http://127.0.0.1:9999/metrics","lastError":"connection refused",
            "health":"down"}],"droppedTargets":[]}}"#;
        assert_eq!(
            parse_targets_response(200, body).unwrap(),
            [Target {
                scrape_url: "http://127.0.0.1:9999/metrics".to_string(),
                health: "down".to_string(),
                last_error: "connection refused".to_string(),
            }]
        );
    }
}
