//! Health checks: the probe (a TCP connect, for a UDP service a datagram that must not be
//! refused, or an HTTP GET with an expected status) and the rise/fall state machine that turns
//! probe results into a backend's health.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

use crate::table::{Health, HealthCheck, Proto};

/// Consecutive results of one backend's probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    pub health: Health,
    successes: u32,
    failures: u32,
}

impl Tracker {
    /// Starts from the health recorded before (a restarted daemon goes on where it was).
    pub fn new(health: Health) -> Self {
        Self {
            health,
            successes: 0,
            failures: 0,
        }
    }

    /// The data plane ejected the backend (`passive`): unhealthy now, and healthy again only
    /// after `rise` probes in a row pass. Returns the new health when it flips.
    pub fn eject(&mut self) -> Option<Health> {
        self.successes = 0;
        self.failures = 0;
        (self.health != Health::Unhealthy).then(|| {
            self.health = Health::Unhealthy;
            Health::Unhealthy
        })
    }

    /// Takes a probe result; returns the new health when it flips: `rise` successes in a row
    /// make a backend healthy, `fall` failures in a row unhealthy.
    pub fn observe(&mut self, ok: bool, check: &HealthCheck) -> Option<Health> {
        let next = if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            (self.successes >= check.rise).then_some(Health::Healthy)
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            (self.failures >= check.fall).then_some(Health::Unhealthy)
        };
        match next {
            Some(health) if health != self.health => {
                self.health = health;
                Some(health)
            }
            _ => None,
        }
    }
}

/// Why a probe failed, for the logs.
pub type ProbeError = String;

/// Probes `addr`, a backend of a `proto` service, once as `check` says, within its timeout.
pub async fn probe(addr: SocketAddr, proto: Proto, check: &HealthCheck) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(check.timeout_ms);
    if proto == Proto::Udp && check.http_path.is_none() {
        return probe_udp(addr, timeout).await;
    }
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        let Some(path) = &check.http_path else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lbctl-health\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| format!("send: {err}"))?;
        // The status line is all that matters: "HTTP/1.x NNN ...".
        let mut head = [0u8; 64];
        let mut len = 0;
        while len < 12 {
            let n = stream
                .read(&mut head[len..])
                .await
                .map_err(|err| format!("receive: {err}"))?;
            if n == 0 {
                return Err("connection closed before a status line".to_owned());
            }
            len += n;
        }
        let line = String::from_utf8_lossy(&head[..len]);
        let status = parse_status(&line).ok_or_else(|| format!("not HTTP: {line:?}"))?;
        if status == check.expect_status {
            Ok(())
        } else {
            Err(format!("status {status}, expected {}", check.expect_status))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", check.timeout_ms)))
}

/// A UDP backend has no connection to open: an empty datagram is sent to it, and the probe
/// fails if the backend's host refuses it (an ICMP port unreachable, `ECONNREFUSED`: nothing
/// listens there) or cannot be reached; a reply, or silence for the whole timeout (the
/// datagram was taken), passes. Keepalived's `UDP_CHECK` without a payload does the same. A TCP
/// connect to the same port number, the probe of a TCP service, would test another server.
async fn probe_udp(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(any)
        .await
        .map_err(|err| format!("bind: {err}"))?;
    socket
        .connect(addr)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    socket
        .send(&[])
        .await
        .map_err(|err| format!("send: {err}"))?;
    let mut reply = [0u8; 1];
    match tokio::time::timeout(timeout, socket.recv(&mut reply)).await {
        Err(_) | Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("datagram refused: {err}")),
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("HTTP/1.")?;
    let code = rest.get(2..5)?;
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_flips_after_rise_successes_or_fall_failures_in_a_row() {
        let check = HealthCheck {
            rise: 2,
            fall: 3,
            ..HealthCheck::default()
        };
        let mut tracker = Tracker::new(Health::Unknown);
        assert_eq!(tracker.observe(true, &check), None);
        assert_eq!(tracker.observe(true, &check), Some(Health::Healthy));
        assert_eq!(tracker.observe(true, &check), None);
        // Failures must come in a row: a success in between starts over.
        assert_eq!(tracker.observe(false, &check), None);
        assert_eq!(tracker.observe(false, &check), None);
        assert_eq!(tracker.observe(true, &check), None);
        assert_eq!(tracker.observe(false, &check), None);
        assert_eq!(tracker.observe(false, &check), None);
        assert_eq!(tracker.observe(false, &check), Some(Health::Unhealthy));
        assert_eq!(tracker.observe(false, &check), None);
        assert_eq!(tracker.observe(true, &check), None);
        assert_eq!(tracker.observe(true, &check), Some(Health::Healthy));
    }

    #[test]
    fn an_ejected_backend_needs_rise_successes_to_be_healthy_again() {
        let check = HealthCheck {
            rise: 2,
            ..HealthCheck::default()
        };
        let mut tracker = Tracker::new(Health::Healthy);
        assert_eq!(tracker.observe(true, &check), None);
        assert_eq!(tracker.eject(), Some(Health::Unhealthy));
        assert_eq!(tracker.eject(), None, "already unhealthy");
        assert_eq!(tracker.observe(true, &check), None);
        assert_eq!(tracker.eject(), None);
        // The success before the second ejection does not count.
        assert_eq!(tracker.observe(true, &check), None);
        assert_eq!(tracker.observe(true, &check), Some(Health::Healthy));
    }

    #[test]
    fn a_restarted_tracker_keeps_the_recorded_health() {
        let check = HealthCheck::default();
        let mut tracker = Tracker::new(Health::Unhealthy);
        assert_eq!(tracker.observe(false, &check), None);
        assert_eq!(tracker.health, Health::Unhealthy);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status("HTTP/1.0 503 Service"), Some(503));
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status("HTTP/1.1 2"), None);
    }
}
