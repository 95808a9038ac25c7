//! `cargo xtask bench`: the data plane measured against the floor of its harness and against
//! the kernel path a user would otherwise take, side by side in one run so the ratios hold on a
//! noisy machine.
//!
//! Sections:
//! - `packet`: per-packet cost through `BPF_PROG_RUN` (Katran's method), against a trivial
//!   XDP_PASS program, and with the flow table at several sizes;
//! - `e2e`: connections, requests, latency, UDP and CPU through the namespace topology, lbctl's
//!   XDP path against nftables DNAT with `numgen inc`;
//! - `control`: applying a large table, the first connection after `service add`, scrape time;
//! - `transmit`: per packet on one core, with live frames through a veth, how the frames the
//!   node's XDP sends leave it: `XDP_TX` against the TC path lbctl takes on veths;
//! - `socket`: what the socket programs add to a node's own `connect` (ns per connect);
//! - `metrics`: the `/metrics` page of a large table rendered in process, lbctl's hand-written
//!   renderer against the same page encoded by the `prometheus-client` crate;
//! - `cluster`: N real `lbctl daemon --cluster` in namespaces on one underlay: how long a change
//!   and a failed node take to reach every node, from each daemon's own log, and each daemon's
//!   CPU at rest.
//!
//! Run by `cargo bench` (which passes `--bench`) it measures in full and writes the report; run
//! by `cargo test` (no `--bench`) it is a smoke run of a few seconds, so the benchmark cannot rot:
//! every case still checks that the data plane did what the case claims to measure.
//! Benchmarks never fail on a slow machine: only a broken case fails.
//!
//! Needs root (namespaces, BPF), `lbctl` and `lb-testsrv` built in the same profile; the
//! `metrics` section alone needs none of them.

mod cluster;
mod control;
mod e2e;
mod live;
mod metrics;
mod packet;
mod pps;
mod report;
mod socket;
mod transmit;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use report::{Measurement, Report};

/// What to run and how long.
pub struct Options {
    /// A quick run that checks every case but measures little (`cargo test`).
    pub smoke: bool,
    /// Where the JSON report and the plots go.
    pub out: PathBuf,
    /// Seconds each end-to-end measurement runs, per mode and round.
    pub seconds: f64,
    /// Sections to run.
    pub sections: Vec<Section>,
    /// Daemons of the `cluster` section (default: 50, 3 in a smoke run).
    pub nodes: Option<usize>,
    /// `--gossip-interval` and `--phi-threshold` for the `cluster` section's daemons, as
    /// `lbctl daemon` takes them (default: the daemon's defaults).
    pub gossip_interval: Option<String>,
    pub phi_threshold: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Packet,
    E2e,
    Control,
    Transmit,
    Socket,
    Pps,
    Metrics,
    Cluster,
}

impl Section {
    const ALL: [Section; 8] = [
        Section::Packet,
        Section::E2e,
        Section::Control,
        Section::Transmit,
        Section::Socket,
        Section::Pps,
        Section::Metrics,
        Section::Cluster,
    ];

    fn name(self) -> &'static str {
        match self {
            Section::Packet => "packet",
            Section::E2e => "e2e",
            Section::Control => "control",
            Section::Transmit => "transmit",
            Section::Socket => "socket",
            Section::Pps => "pps",
            Section::Metrics => "metrics",
            Section::Cluster => "cluster",
        }
    }

    /// Whether the section builds namespaces or loads BPF programs (all but `metrics`, which
    /// renders pages in process).
    fn needs_root(self) -> bool {
        self != Section::Metrics
    }

    fn parse(name: &str) -> Result<Section> {
        Section::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .with_context(|| {
                format!(
                    "unknown section {name:?} (packet, e2e, control, transmit, socket, pps, \
                     metrics, cluster)"
                )
            })
    }
}

const USAGE: &str = "usage: lbbench [--bench] [--smoke] [--out DIR] [--seconds S] \
                     [--only packet,e2e,control,transmit,socket,pps,metrics,cluster] \
                     [--nodes N] [--gossip-interval DURATION] [--phi-threshold PHI]";

/// libtest's own flags, which `cargo test` may pass to every test binary, this one included:
/// ignored (this is no libtest binary). The ones that take a value take it as `--flag=VALUE`
/// or as the next argument.
const LIBTEST_FLAGS: &[&str] = &[
    "--nocapture",
    "--show-output",
    "--quiet",
    "-q",
    "--exact",
    "--ignored",
    "--include-ignored",
    "--test",
    "--list",
];
const LIBTEST_FLAGS_WITH_VALUE: &[&str] = &[
    "--test-threads",
    "--color",
    "--format",
    "--skip",
    "-Z",
    "--logfile",
    "--shuffle-seed",
];

/// What the arguments ask for: a run, or nothing (a libtest name filter this bench does not
/// match: `cargo test -- some_test` should not run every section as root).
enum Parsed {
    Run(Options),
    FilteredOut,
}

/// Parses the arguments. An unknown flag is an error (a misspelt `--only` must not run every
/// section); libtest's flags are ignored; a bare word is a libtest name filter, which selects
/// this bench only if it is part of `lbbench` or a section's name.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Parsed> {
    let mut bench = false;
    let mut smoke = false;
    let mut out = None;
    let mut seconds = None;
    let mut sections = Section::ALL.to_vec();
    let mut nodes = None;
    let mut gossip_interval = None;
    let mut phi_threshold = None;
    let mut filters = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--bench" => bench = true,
            "--smoke" => smoke = true,
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--seconds" => {
                let text = value("--seconds")?;
                let s: f64 = text
                    .parse()
                    .with_context(|| format!("--seconds {text:?} is not a number"))?;
                if !(s > 0.0 && s <= 600.0) {
                    bail!("--seconds must be above 0 and at most 600, not {s}");
                }
                seconds = Some(s);
            }
            "--nodes" => {
                let text = value("--nodes")?;
                let n: usize = text
                    .parse()
                    .with_context(|| format!("--nodes {text:?} is not a number"))?;
                if !(cluster::MIN_NODES..=cluster::MAX_NODES).contains(&n) {
                    bail!(
                        "--nodes must be {} to {}, not {n}",
                        cluster::MIN_NODES,
                        cluster::MAX_NODES
                    );
                }
                nodes = Some(n);
            }
            "--gossip-interval" => gossip_interval = Some(value("--gossip-interval")?),
            "--phi-threshold" => phi_threshold = Some(value("--phi-threshold")?),
            "--only" => {
                sections = value("--only")?
                    .split(',')
                    .map(Section::parse)
                    .collect::<Result<_>>()?;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            flag if LIBTEST_FLAGS.contains(&flag) => {}
            flag if LIBTEST_FLAGS_WITH_VALUE.contains(&flag) => {
                value(flag)?;
            }
            flag if LIBTEST_FLAGS_WITH_VALUE
                .iter()
                .any(|known| flag.starts_with(&format!("{known}="))) => {}
            flag if flag.starts_with('-') => bail!("unknown argument {flag:?}\n{USAGE}"),
            filter => filters.push(filter.to_owned()),
        }
    }
    let selected = filters.is_empty()
        || filters.iter().any(|filter| {
            "lbbench".contains(filter.as_str())
                || Section::ALL
                    .iter()
                    .any(|s| s.name().contains(filter.as_str()))
        });
    if !selected {
        return Ok(Parsed::FilteredOut);
    }
    let smoke = smoke || !bench;
    Ok(Parsed::Run(Options {
        smoke,
        out: out.unwrap_or_else(default_out),
        seconds: seconds.unwrap_or(if smoke { 0.3 } else { 3.0 }),
        sections,
        nodes,
        gossip_interval,
        phi_threshold,
    }))
}

/// `<target dir>/bench`: beside the profile folder the bench runs from.
fn default_out() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/lbbench-<hash> → target/bench
    exe.ancestors()
        .nth(3)
        .map(|target| target.join("bench"))
        .unwrap_or_else(|| PathBuf::from("target/bench"))
}

fn main() -> Result<()> {
    let opts = match parse_args(std::env::args().skip(1))? {
        Parsed::Run(opts) => opts,
        Parsed::FilteredOut => {
            println!("lbbench: not selected by the name filter; nothing run");
            return Ok(());
        }
    };
    if opts.sections.iter().any(|s| s.needs_root()) {
        lb_tests::require_root()?;
    }
    let started = Instant::now();
    let mut measurements: Vec<Measurement> = Vec::new();
    for section in &opts.sections {
        println!(
            "==> lbbench {} ({})",
            section.name(),
            if opts.smoke { "smoke" } else { "full" }
        );
        let found = match section {
            Section::Packet => packet::run(&opts),
            Section::E2e => e2e::run(&opts),
            Section::Control => control::run(&opts),
            Section::Transmit => transmit::run(&opts),
            Section::Socket => socket::run(&opts),
            Section::Pps => pps::run(&opts),
            Section::Metrics => metrics::run(&opts),
            Section::Cluster => cluster::run(&opts),
        }
        .with_context(|| format!("bench section {}", section.name()))?;
        measurements.extend(found);
    }
    let report = Report::new(opts.smoke, measurements);
    report.print();
    report.write(&opts.out)?;
    report.check_targets()?;
    println!(
        "lbbench: {} measurements in {:.1}s; report in {}",
        report.measurements.len(),
        started.elapsed().as_secs_f64(),
        opts.out.display()
    );
    Ok(())
}
