//! The `/metrics` page at size, in process (no root, no network): lbctl's hand-written
//! renderer (`daemon::metrics::render`, Prometheus text 0.0.4) against the same families and
//! series encoded by the `prometheus-client` crate, as an implementation inside lbctl would
//! use it: a [`Collector`] that walks the snapshot at scrape time with `ConstCounter` and
//! `ConstGauge`, registered in a [`Registry`] and encoded into a `String`, in OpenMetrics text
//! (`encoding::text`, what the crate serves by default) and in its Prometheus text 0.0.4
//! encoder (`encoding::prometheus_text`).
//!
//! The snapshot (10,000 services of 10 backends in a full run) is built once and not timed:
//! the daemon reads it from the BPF maps whichever encoder writes the page. The encoders take
//! turns, round after round, so that a noisy machine slows them alike; the median round of
//! each is recorded. Before timing, every page is checked to carry the same families (types,
//! help texts) with the same number of series each as the hand-written one, and the text 0.0.4
//! page to be the hand-written one byte for byte: a mismatch fails the section.
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_common::{BackendStats, Event, Reason};
use lb_tests::rng::SplitMix;
use lb_userspace::daemon::metrics::{
    self, BackendSnapshot, InterfaceReport, ServiceSnapshot, Snapshot,
};
use lb_userspace::host::netdev::TxFailures;
use lb_userspace::instance::state::{Transmit, XdpMode};
use lb_userspace::table::{Health, Proto, Scheduler};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::Options;
use crate::report::{Measurement, names};

/// Backends of every service of the snapshot.
const BACKENDS_PER_SERVICE: usize = 10;
/// Rounds (one page of each encoder per round), whatever the time budget says.
const MIN_ROUNDS: usize = 3;
const MAX_ROUNDS: usize = 25;

pub fn run(opts: &Options) -> Result<Vec<Measurement>> {
    let services = if opts.smoke { 100 } else { 10_000 };
    let size = format!("{services} services x {BACKENDS_PER_SERVICE} backends");
    let snapshot = Arc::new(large_snapshot(services));

    // A page of each, untimed: checked, and its size kept to size prometheus-client's next
    // buffers, as a daemon that remembers its last scrape would (the hand-written renderer
    // sizes its own from an estimate).
    let hand = metrics::render(&snapshot);
    let help = help_texts(&hand)?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector {
        snapshot: snapshot.clone(),
        help,
    }));
    let openmetrics = encode_openmetrics(&registry, 0)?;
    let text = encode_text(&registry, 0)?;
    let backends = services * BACKENDS_PER_SERVICE;
    check_pages(&hand, &openmetrics, &text, backends)?;
    let sizes = [hand.len(), openmetrics.len(), text.len()];
    drop((hand, openmetrics, text));

    // As many rounds as fit in `--seconds` per encoder, within [MIN_ROUNDS, MAX_ROUNDS].
    let budget = Duration::from_secs_f64(opts.seconds * 3.0);
    let started = Instant::now();
    let mut times: [Vec<Duration>; 3] = Default::default();
    while times[0].len() < MIN_ROUNDS || (times[0].len() < MAX_ROUNDS && started.elapsed() < budget)
    {
        times[0].push(timed(|| Ok(metrics::render(&snapshot)))?);
        times[1].push(timed(|| encode_openmetrics(&registry, sizes[1]))?);
        times[2].push(timed(|| encode_text(&registry, sizes[2]))?);
    }

    let variants = [
        "hand (text 0.0.4)",
        "prometheus-client (OpenMetrics)",
        "prometheus-client (text 0.0.4)",
    ];
    let mut found = Vec::new();
    let mut medians = [0.0; 3];
    let each = variants.iter().zip(&mut times).zip(&mut medians).zip(sizes);
    for (((variant, times), median), bytes) in each {
        times.sort_unstable();
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        *median = ms(&times[times.len() / 2]);
        println!(
            "  {variant}: {bytes} bytes; {} rounds, ms min {:.1} median {median:.1} max {:.1}",
            times.len(),
            ms(&times[0]),
            ms(&times[times.len() - 1]),
        );
        let case = format!("render /metrics, {size}");
        found.push(Measurement::new(
            names::METRICS,
            case,
            *variant,
            *median,
            "ms",
        ));
    }
    for (variant, bytes) in variants.iter().zip(sizes) {
        let case = format!("page size, {size}");
        let mb = bytes as f64 / 1e6;
        found.push(Measurement::new(names::METRICS, case, *variant, mb, "MB"));
    }
    for (variant, median) in variants.iter().zip(medians).skip(1) {
        let case = "render time against the hand renderer's";
        let ratio = median / medians[0];
        found.push(Measurement::new(names::METRICS, case, *variant, ratio, "x"));
    }
    Ok(found)
}

/// How long `f` took; what it returned is dropped after the clock stopped.
fn timed(f: impl FnOnce() -> Result<String>) -> Result<Duration> {
    let started = Instant::now();
    let page = f()?;
    let elapsed = started.elapsed();
    drop(page);
    Ok(elapsed)
}

/// A scrape through prometheus-client's default encoder: OpenMetrics text, `# EOF` included.
fn encode_openmetrics(registry: &Registry, capacity: usize) -> Result<String> {
    let mut page = String::with_capacity(capacity);
    prometheus_client::encoding::text::encode(&mut page, registry)
        .context("prometheus-client: OpenMetrics encoding failed")?;
    Ok(page)
}

/// A scrape through prometheus-client's Prometheus text 0.0.4 encoder.
fn encode_text(registry: &Registry, capacity: usize) -> Result<String> {
    let mut page = String::with_capacity(capacity);
    prometheus_client::encoding::prometheus_text::encode(&mut page, registry)
        .context("prometheus-client: text 0.0.4 encoding failed")?;
    Ok(page)
}

/// A snapshot of `services` services of [`BACKENDS_PER_SERVICE`] backends, filled as the
/// daemon fills it (`daemon::snapshot`), with varied values from a fixed seed: names
/// `svc-0042`, TCP frontends and some UDP ones on a VIP, backends `10.x.y.z:80`, half of the
/// backends of two services in three on another node of the mesh; health mixed, every
/// fiftieth service with every backend unhealthy and failing open, some backends drained or
/// of weight 0; counters spread over many orders of magnitude.
fn large_snapshot(services: usize) -> Snapshot {
    let mut rng = SplitMix(0x6c62_6374_6c5f_6d65);
    let services = (0..services)
        .map(|i| {
            let failing = i % 50 == 7;
            let backends = (0..BACKENDS_PER_SERVICE)
                .map(|j| {
                    let n = i * BACKENDS_PER_SERVICE + j + 1;
                    let health = match rng.below(10) {
                        _ if failing => Health::Unhealthy,
                        0 => Health::Unhealthy,
                        1 | 2 => Health::Unknown,
                        _ => Health::Healthy,
                    };
                    // Up to 10^11 packets, bytes of 64 to 1,500-byte frames.
                    let packets = magnitude(&mut rng, 1, 11);
                    let reply_packets = 1 + packets / (1 + rng.below(4));
                    let stats = BackendStats {
                        packets,
                        bytes: packets * (64 + rng.below(1437)),
                        reply_packets,
                        reply_bytes: reply_packets * (64 + rng.below(1437)),
                        new_flows: 1 + packets / (1 + rng.below(1000)),
                    };
                    BackendSnapshot {
                        addr: std::net::SocketAddr::from((
                            std::net::Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8),
                            80,
                        )),
                        id: n as u32,
                        node: (i % 3 != 0 && j % 2 == 1).then(|| format!("node-{}", (i + j) % 8)),
                        health,
                        drained: j == BACKENDS_PER_SERVICE - 1 && i % 7 == 0,
                        weight: if j == 0 && i % 11 == 0 { 0 } else { 1 },
                        stats: Some(stats),
                        live_flows: Some(rng.below(5000)),
                        passive: Some(lb_common::PassiveHealth {
                            refused: rng.below(50),
                            unanswered: rng.below(10),
                            ejections: rng.below(3),
                            ..Default::default()
                        }),
                        ejected: Some(j == 1 && i % 13 == 0),
                    }
                })
                .collect();
            let (proto, port, vip) = if i % 10 == 3 {
                let vip = std::net::Ipv4Addr::new(10, 96, (i / 256) as u8, (i % 256) as u8);
                (Proto::Udp, 53, Some(vip))
            } else {
                (Proto::Tcp, 20_000 + i as u16, None)
            };
            let frontend = match vip {
                Some(vip) => format!("udp/{vip}:{port}"),
                None => format!("tcp/{port}"),
            };
            ServiceSnapshot {
                name: format!("svc-{i:04}"),
                id: i as u32 + 1,
                proto,
                port,
                vip: vip.map(std::net::IpAddr::V4),
                frontend,
                scheduler: Scheduler::default(),
                health_check: "tcp every 2000 ms".to_owned(),
                fail_open: failing,
                origin: Default::default(),
                backends,
            }
        })
        .collect();
    let reasons = Reason::ALL.iter().map(|r| {
        let packets = magnitude(&mut rng, 2, 12);
        (r.name(), packets, packets * (64 + rng.below(1437)))
    });
    let reasons = reasons.collect();
    let events = Event::ALL.iter().map(|e| {
        let count = magnitude(&mut rng, 1, 10);
        (e.name(), count)
    });
    let events = events.collect();
    Snapshot {
        instance: "lb-node-1".to_owned(),
        node: Some("node-1".to_owned()),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        table_generation: 12_345,
        flow_entries: 312_456,
        flow_capacity: u64::from(lb_common::DEFAULT_FLOW_CAPACITY),
        flow_entries6: 31_245,
        flow_capacity6: u64::from(lb_common::DEFAULT_FLOW_CAPACITY / 8),
        reasons,
        events,
        services,
        interfaces: vec![
            InterfaceReport {
                iface: "eth0".to_owned(),
                xdp_mode: Some(XdpMode::Native),
                transmit: Some(Transmit::Xdp),
                tx_failures: Some(TxFailures {
                    dropped: 17,
                    errors: 2,
                    xdp_errors: 431,
                }),
            },
            InterfaceReport {
                iface: "veth-uplink".to_owned(),
                xdp_mode: Some(XdpMode::Generic),
                transmit: Some(Transmit::Tc),
                tx_failures: None,
            },
        ],
    }
}

/// Above 0 and below 10^d, d drawn from `min..=max`: counters of every magnitude.
fn magnitude(rng: &mut SplitMix, min: u32, max: u32) -> u64 {
    let digits = min + rng.below(u64::from(max - min + 1)) as u32;
    1 + rng.below(10u64.pow(digits))
}

/// The families of a page as `# HELP` gives them: name → help text. The collector takes its
/// help texts from the hand-written page, so both pages say the same words.
fn help_texts(page: &str) -> Result<BTreeMap<String, String>> {
    page.lines()
        .filter_map(|line| line.strip_prefix("# HELP "))
        .map(|help| {
            let (name, text) = help.split_once(' ').context("a # HELP line without text")?;
            Ok((name.to_owned(), text.to_owned()))
        })
        .collect()
}

/// The snapshot as prometheus-client sees it: read at every scrape (`Collector::encode`),
/// every family `render` writes, in the same order, with the same names, labels and values.
/// A counter's descriptor is named without `_total`: the encoders add it to its series (and,
/// in text 0.0.4, to its `# HELP` and `# TYPE` lines).
#[derive(Debug)]
struct SnapshotCollector {
    snapshot: Arc<Snapshot>,
    /// The hand-written page's help texts, by the hand-written page's family names.
    help: BTreeMap<String, String>,
}

/// A family of the page, its series written by the caller through [`Family::series`].
struct Family<'a> {
    encoder: prometheus_client::encoding::MetricEncoder<'a>,
    counter: bool,
}

impl Family<'_> {
    fn series(&mut self, labels: &impl EncodeLabelSet, value: u64) -> fmt::Result {
        let encoder = self.encoder.encode_family(labels)?;
        if self.counter {
            ConstCounter::new(value).encode(encoder)
        } else {
            ConstGauge::new(value).encode(encoder)
        }
    }

    /// The family's one series, without labels.
    fn single(mut self, value: u64) -> fmt::Result {
        let no_labels: [(&str, &str); 0] = [];
        self.series(&no_labels, value)
    }
}

impl SnapshotCollector {
    /// Starts the family `name` (as the hand-written page names it: counters end in `_total`).
    fn family<'a>(
        &self,
        encoder: &'a mut DescriptorEncoder<'_>,
        name: &'a str,
    ) -> Result<Family<'a>, fmt::Error> {
        // The hand-written page has every family (an empty help would be a bug here, which
        // the check of the pages' families does not see).
        let help = self.help.get(name).map_or("", String::as_str);
        let (name, kind) = match name.strip_suffix("_total") {
            Some(counter) => (counter, MetricType::Counter),
            None => (name, MetricType::Gauge),
        };
        let encoder = encoder.encode_descriptor(name, help, None, kind)?;
        Ok(Family {
            encoder,
            counter: kind == MetricType::Counter,
        })
    }
}

/// Per-backend families with a per-service sum: (backend family, service family, value).
type Summed = (&'static str, &'static str, fn(&BackendSnapshot) -> u64);
const SUMMED: [Summed; 11] = [
    (
        "lbctl_backend_packets_total",
        "lbctl_service_packets_total",
        |b| b.totals().packets,
    ),
    (
        "lbctl_backend_bytes_total",
        "lbctl_service_bytes_total",
        |b| b.totals().bytes,
    ),
    (
        "lbctl_backend_reply_packets_total",
        "lbctl_service_reply_packets_total",
        |b| b.totals().reply_packets,
    ),
    (
        "lbctl_backend_reply_bytes_total",
        "lbctl_service_reply_bytes_total",
        |b| b.totals().reply_bytes,
    ),
    (
        "lbctl_backend_connections_total",
        "lbctl_service_connections_total",
        |b| b.totals().new_flows,
    ),
    (
        "lbctl_backend_refused_connections_total",
        "lbctl_service_refused_connections_total",
        |b| b.passive_totals().refused,
    ),
    (
        "lbctl_backend_unanswered_connections_total",
        "lbctl_service_unanswered_connections_total",
        |b| b.passive_totals().unanswered,
    ),
    (
        "lbctl_backend_ejections_total",
        "lbctl_service_ejections_total",
        |b| b.passive_totals().ejections,
    ),
    (
        "lbctl_backend_ejection_returns_total",
        "lbctl_service_ejection_returns_total",
        |b| b.passive_totals().returns,
    ),
    ("lbctl_backend_ejected", "lbctl_service_ejected", |b| {
        u64::from(b.ejected == Some(true))
    }),
    ("lbctl_backend_flows", "lbctl_service_flows", |b| {
        b.live_flows.unwrap_or(0)
    }),
];

/// Per-service gauges of their own: (family, value).
type PerService = (&'static str, fn(&ServiceSnapshot) -> u64);
const PER_SERVICE: [PerService; 3] = [
    ("lbctl_service_backends", |s| s.backends.len() as u64),
    ("lbctl_service_healthy_backends", |s| {
        s.backends.iter().filter(|b| b.eligible()).count() as u64
    }),
    ("lbctl_service_fail_open", |s| u64::from(s.fail_open)),
];

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = &*self.snapshot;
        let encoder = &mut encoder;
        let this_node = s.node.as_deref().unwrap_or("");
        let build = [
            ("version", s.version.as_str()),
            ("instance", &s.instance),
            ("node", this_node),
        ];
        self.family(encoder, "lbctl_build_info")?
            .series(&build, 1)?;
        self.family(encoder, "lbctl_table_generation")?
            .single(s.table_generation)?;
        self.family(encoder, "lbctl_flow_table_entries")?
            .single(s.flow_entries)?;
        self.family(encoder, "lbctl_flow_table_capacity")?
            .single(s.flow_capacity)?;
        self.family(encoder, "lbctl_flow_table_ipv6_entries")?
            .single(s.flow_entries6)?;
        self.family(encoder, "lbctl_flow_table_ipv6_capacity")?
            .single(s.flow_capacity6)?;

        let mut packets = self.family(encoder, "lbctl_packets_total")?;
        for &(reason, count, _) in &s.reasons {
            packets.series(&[("reason", reason)], count)?;
        }
        let mut bytes = self.family(encoder, "lbctl_packet_bytes_total")?;
        for &(reason, _, count) in &s.reasons {
            bytes.series(&[("reason", reason)], count)?;
        }
        let sum = |keep: &dyn Fn(&str) -> bool| -> u64 {
            let kept = s.reasons.iter().filter(|(name, ..)| keep(name));
            kept.map(|&(_, packets, _)| packets).sum()
        };
        let one_of =
            |reasons: [Reason; 3]| move |name: &str| reasons.iter().any(|r| r.name() == name);
        let encap = one_of([
            Reason::ForwardEncapTx,
            Reason::ForwardEncapRedirect,
            Reason::ReplyEncap,
        ]);
        let decap = one_of([Reason::DecapTx, Reason::DecapRedirect, Reason::DecapStack]);
        for (name, value) in [
            (
                "lbctl_dropped_packets_total",
                sum(&|r| r.starts_with("drop_")),
            ),
            (
                "lbctl_passed_packets_total",
                sum(&|r| r.starts_with("pass_")),
            ),
            ("lbctl_vxlan_encapsulated_packets_total", sum(&encap)),
            ("lbctl_vxlan_decapsulated_packets_total", sum(&decap)),
        ] {
            self.family(encoder, name)?.single(value)?;
        }
        let mut events = self.family(encoder, "lbctl_flow_events_total")?;
        for &(event, count) in &s.events {
            events.series(&[("event", event)], count)?;
        }

        let mut info = self.family(encoder, "lbctl_service_info")?;
        for service in &s.services {
            let labels = [("service", &service.name), ("frontend", &service.frontend)];
            info.series(&labels, 1)?;
        }
        for (_, name, value) in SUMMED {
            let mut family = self.family(encoder, name)?;
            for service in &s.services {
                let sum = service.backends.iter().map(value).sum();
                family.series(&[("service", &service.name)], sum)?;
            }
        }
        for (name, value) in PER_SERVICE {
            let mut family = self.family(encoder, name)?;
            for service in &s.services {
                family.series(&[("service", &service.name)], value(service))?;
            }
        }

        let series = metrics::BackendSeries::new(s);
        let backends = || series.iter();
        for (name, _, value) in SUMMED {
            let mut family = self.family(encoder, name)?;
            for (labels, backend) in backends() {
                family.series(&labels, value(backend))?;
            }
        }
        let mut drained = self.family(encoder, "lbctl_backend_drained")?;
        for (labels, backend) in backends() {
            drained.series(&labels, u64::from(backend.drained))?;
        }
        let mut health = self.family(encoder, "lbctl_backend_health")?;
        for ([service, addr, node], backend) in backends() {
            for state in [Health::Healthy, Health::Unhealthy, Health::Unknown] {
                let labels = [service, addr, node, ("state", state.as_str())];
                health.series(&labels, u64::from(backend.health == state))?;
            }
        }

        let mut interfaces = self.family(encoder, "lbctl_interface_info")?;
        for interface in &s.interfaces {
            let labels = [
                ("iface", interface.iface.as_str()),
                ("xdp_mode", interface.xdp_mode.map_or("", |m| m.name())),
                ("transmit", interface.transmit.map_or("", |t| t.name())),
            ];
            interfaces.series(&labels, 1)?;
        }
        let mut failures = self.family(encoder, "lbctl_interface_transmit_failures_total")?;
        for interface in &s.interfaces {
            let Some(f) = interface.tx_failures else {
                continue;
            };
            for (kind, count) in [
                ("dropped", f.dropped),
                ("errors", f.errors),
                ("xdp_errors", f.xdp_errors),
            ] {
                let labels = [("iface", interface.iface.as_str()), ("kind", kind)];
                failures.series(&labels, count)?;
            }
        }
        Ok(())
    }
}

/// One family of a page as read back.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    kind: String,
    help: String,
    series: usize,
}

/// A page's families, each with its type, help and number of series, by the name of its
/// series (a counter's family by its `_total` name, whether the format names the family with
/// it or not). Refuses a family without `# HELP` and `# TYPE`, and a series outside the family
/// declared last.
fn families(page: &str) -> Result<BTreeMap<String, Shape>> {
    let mut families: BTreeMap<String, Shape> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut help: Option<(&str, &str)> = None;
    for line in page.lines() {
        if let Some(described) = line.strip_prefix("# HELP ") {
            help = Some(described.split_once(' ').context("a # HELP without text")?);
            continue;
        }
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declared
                .split_once(' ')
                .context("a # TYPE without a type")?;
            let help = match help.take() {
                Some((described, text)) if described == name => text.to_owned(),
                _ => bail!("family {name} has no # HELP right before its # TYPE"),
            };
            let name = match kind {
                "counter" if !name.ends_with("_total") => format!("{name}_total"),
                _ => name.to_owned(),
            };
            let kind = kind.to_owned();
            let before = families.insert(
                name.clone(),
                Shape {
                    kind,
                    help,
                    series: 0,
                },
            );
            ensure!(before.is_none(), "family {name} declared twice");
            current = Some(name);
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        match current.as_deref() {
            Some(family) if family == name => families.get_mut(family).unwrap().series += 1,
            _ => bail!("series {line:?} outside its family ({current:?} declared last)"),
        }
    }
    Ok(families)
}

/// The three pages carry the same families, of the same types and help texts, with as many
/// series each, and the per-backend families have every backend; the text 0.0.4 pages are the
/// same bytes (the same labels and values, so the same work).
fn check_pages(hand: &str, openmetrics: &str, text: &str, backends: usize) -> Result<()> {
    let expected = families(hand).context("the hand-written page")?;
    ensure!(
        expected.len() == 43,
        "the hand-written page has {} families",
        expected.len()
    );
    let health = expected.get("lbctl_backend_health").map(|f| f.series);
    ensure!(
        health == Some(3 * backends),
        "{health:?} lbctl_backend_health series for {backends} backends"
    );
    ensure!(
        openmetrics.ends_with("\n# EOF\n"),
        "the OpenMetrics page does not end with # EOF"
    );
    for (what, page) in [("OpenMetrics", openmetrics), ("text 0.0.4", text)] {
        let got = families(page).with_context(|| format!("prometheus-client's {what} page"))?;
        for (name, shape) in &expected {
            let found = got.get(name);
            ensure!(
                found == Some(shape),
                "prometheus-client's {what} page has {found:?} for {name}, the hand-written \
                 one {shape:?}"
            );
        }
        if let Some(extra) = got.keys().find(|name| !expected.contains_key(*name)) {
            bail!(
                "prometheus-client's {what} page has a family {extra} the hand-written one has not"
            );
        }
    }
    if let Some(at) = hand.bytes().zip(text.bytes()).position(|(a, b)| a != b) {
        let line = |page: &str| page[at..].lines().next().unwrap_or_default().to_owned();
        bail!(
            "prometheus-client's text 0.0.4 page differs from the hand-written one at byte {at}: \
             {:?} for {:?}",
            line(text),
            line(hand)
        );
    }
    ensure!(
        text.len() == hand.len(),
        "prometheus-client's text 0.0.4 page is {} bytes, the hand-written one {}",
        text.len(),
        hand.len()
    );
    Ok(())
}
