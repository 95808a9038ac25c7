//! `hey`, the HTTP load generator, run from a test namespace: how many requests were answered,
//! how many failed and why, and the latency percentiles, read from its summary.
use std::{process::Child, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::netns::NetNs;

/// What a `hey` run reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeyRun {
    /// Responses with status 200.
    pub ok: u64,
    /// Responses with another status.
    pub other_status: u64,
    /// Requests that got no response, by error message (hey's "Error distribution").
    pub errors: Vec<(u64, String)>,
    /// Latency percentiles in seconds: 50th, 99th, and the slowest request.
    pub p50_s: f64,
    pub p99_s: f64,
    pub slowest_s: f64,
}

impl HeyRun {
    /// Requests that failed: no response, or a status other than 200.
    pub fn failed(&self) -> u64 {
        self.other_status + self.errors.iter().map(|(n, _)| n).sum::<u64>()
    }

    /// One line for the test output and the notes.
    pub fn summary(&self) -> String {
        format!(
            "{} answered, {} failed, p50 {:.1} ms, p99 {:.1} ms, slowest {:.0} ms",
            self.ok,
            self.failed(),
            self.p50_s * 1e3,
            self.p99_s * 1e3,
            self.slowest_s * 1e3
        )
    }
}

/// `hey -z DURATION -c CONCURRENCY -disable-keepalive URL` from `ns`, in the background: every
/// request on a new connection, as a load balancer's new flows.
pub fn spawn_hey(ns: &NetNs, url: &str, duration: Duration, concurrency: usize) -> Result<Child> {
    let duration = format!("{}ms", duration.as_millis());
    let concurrency = concurrency.to_string();
    ns.spawn([
        "hey",
        "-z",
        &duration,
        "-c",
        &concurrency,
        "-disable-keepalive",
        url,
    ])
}

/// Waits for a `hey` started by [`spawn_hey`] and reads its summary.
pub fn wait_hey(child: Child) -> Result<HeyRun> {
    let output = child.wait_with_output().context("waiting for hey")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("hey failed ({}): {text}", output.status);
    }
    parse_hey(&text).with_context(|| format!("reading hey's summary:\n{text}"))
}

/// Reads hey's default summary.
pub fn parse_hey(text: &str) -> Result<HeyRun> {
    let mut run = HeyRun::default();
    let mut section = "";
    let seconds = |value: &str| -> Result<f64> {
        let value = value.trim().trim_end_matches("secs").trim();
        value
            .parse()
            .with_context(|| format!("not seconds: {value:?}"))
    };
    for line in text.lines() {
        let trimmed = line.trim();
        if !line.starts_with(' ') && trimmed.ends_with(':') {
            section = trimmed;
            continue;
        }
        if let Some(value) = trimmed.strip_prefix("Slowest:") {
            run.slowest_s = seconds(value)?;
        } else if let Some(value) = trimmed.strip_prefix("50% in ") {
            run.p50_s = seconds(value)?;
        } else if let Some(value) = trimmed.strip_prefix("99% in ") {
            run.p99_s = seconds(value)?;
        } else if let Some(rest) = trimmed.strip_prefix('[') {
            let (first, rest) = rest.split_once(']').context("no ']'")?;
            let first: u64 = first.parse().context("not a number in [...]")?;
            let rest = rest.trim();
            match section {
                "Status code distribution:" => {
                    let count: u64 = rest
                        .split_whitespace()
                        .next()
                        .context("no count")?
                        .parse()?;
                    if first == 200 {
                        run.ok += count;
                    } else {
                        run.other_status += count;
                    }
                }
                "Error distribution:" => run.errors.push((first, rest.to_owned())),
                _ => {}
            }
        }
    }
    if run.ok + run.failed() == 0 {
        bail!("no request in the summary");
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heys_summary_gives_answered_failed_and_percentiles() {
        let text = "
Summary:
  Total:\t12.0093 secs
  Slowest:\t3.0412 secs
  Fastest:\t0.0004 secs
  Average:\t0.0039 secs
  Requests/sec:\t4153.4162

Response time histogram:
  0.000 [1]\t|
  0.304 [49800]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■

Latency distribution:
  10% in 0.0011 secs
  50% in 0.0021 secs
  99% in 0.0153 secs

Status code distribution:
  [200]\t49875 responses
  [503]\t2 responses

Error distribution:
  [6]\tGet \"http://192.168.141.1:9080/\": dial tcp 192.168.141.1:9080: connect: connection refused
  [2]\tGet \"http://192.168.141.1:9080/\": read: connection reset by peer
";
        let run = parse_hey(text).unwrap();
        assert_eq!((run.ok, run.other_status, run.failed()), (49875, 2, 10));
        assert_eq!(run.errors.len(), 2);
        assert!(run.errors[0].1.ends_with("connection refused"));
        assert_eq!(
            (run.p50_s, run.p99_s, run.slowest_s),
            (0.0021, 0.0153, 3.0412)
        );
        assert!(parse_hey("Summary:\n").is_err());
    }
}
