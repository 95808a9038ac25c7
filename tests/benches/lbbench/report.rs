//! The bench's results: one list of measurements, printed as a table, written as JSON with the
//! targets they are held against, and plotted (gnuplot, PNG).
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use serde::Serialize;

/// One number: `case` of `section`, measured as `variant` (e.g. `lbctl` or `nftables`, a flow
/// table size), in `unit`.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub section: &'static str,
    pub case: String,
    pub variant: String,
    pub value: f64,
    pub unit: &'static str,
}

impl Measurement {
    pub fn new(
        section: &'static str,
        case: impl Into<String>,
        variant: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Measurement {
        Measurement {
            section,
            case: case.into(),
            variant: variant.into(),
            value,
            unit,
        }
    }
}

/// A target of the issue, checked against the run's own numbers.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: &'static str,
    /// What `ratio` is: `ratio` (of two numbers of this run), or the unit of a number held
    /// against a bound of its own (the cluster's times, in ms).
    pub measure: &'static str,
    /// The measured ratio (or number), if what it needs was measured in this run.
    pub ratio: Option<f64>,
    /// `<=` or `>=`.
    pub relation: &'static str,
    pub bound: f64,
    pub met: Option<bool>,
}

/// A target: `numerator / denominator` against `bound`; `at_most` says which side is good.
struct TargetSpec {
    name: &'static str,
    numerator: (&'static str, &'static str, &'static str),
    denominator: Denominator,
    at_most: bool,
    bound: f64,
}

/// What a target divides by.
enum Denominator {
    /// Another number of the run: the target is a ratio.
    Measured((&'static str, &'static str, &'static str)),
    /// Nothing: the number itself is held against the bound, in this unit.
    Absolute(&'static str),
}

/// Names the sections use for the numbers the targets read.
pub mod names {
    pub const PACKET: &str = "packet";
    pub const PACKET_FLOWS: &str = "packet-flow-table";
    pub const E2E: &str = "e2e";
    pub const CONTROL: &str = "control";
    pub const METRICS: &str = "metrics";
    pub const CLUSTER: &str = "cluster";

    pub const FLOOR: &str = "XDP_PASS floor";
    pub const NEW_FLOW: &str = "new flow";
    pub const ESTABLISHED: &str = "established flow";
    /// The table-size section's established flows: 1,024 flows spread over the table, and
    /// every flow of it.
    pub const ESTABLISHED_FEW_ACTIVE: &str = "established flow, 1,024 flows active";
    pub const ESTABLISHED_ALL_ACTIVE: &str = "established flow, every flow active";
    pub const NS_PER_PACKET: &str = "ns/packet";
    /// The packet section's measure: each packet run once (see packet.rs).
    pub const PER_PACKET: &str = "per packet";

    pub const PPS: &str = "pps";
    /// The pps section's cases (`pps::Path::name`, flows) and variants.
    pub const PPS_BOUNCE: &str = "bare XDP_TX bounce, 1 flow";
    pub const PPS_LOCAL_ONE: &str = "lbctl, backend on the node's link, 1 flow";
    pub const PPS_LOCAL_MANY: &str = "lbctl, backend on the node's link, 64k flows";
    pub const PPS_ENCAP_ONE: &str = "lbctl, ingress: DNAT + VXLAN encap, 1 flow";
    pub const PPS_ENCAP_MANY: &str = "lbctl, ingress: DNAT + VXLAN encap, 64k flows";
    pub const NODE_WORK: &str = "node work";
    pub const PIPELINE: &str = "pipeline";

    pub const LBCTL: &str = "lbctl";
    pub const NFTABLES: &str = "nftables";
    pub const NEW_CONNECTIONS: &str = "new connections";
    pub const PER_SECOND: &str = "1/s";

    /// The cluster section's times until the last node applied a change, or dropped a killed
    /// node's tasks, in the slowest of the rounds; its variant is the node count, and the
    /// targets hold at 50 nodes with the daemon's default settings.
    pub const CLUSTER_CHANGE_EVERY_NODE: &str =
        "service add -> applied on every node, slowest round";
    pub const CLUSTER_FAILURE_EVERY_NODE: &str =
        "daemon killed -> its tasks gone from every node, slowest round";
    pub const CLUSTER_TARGET_NODES: &str = "50 nodes";
    pub const MS: &str = "ms";
}

const TARGETS: &[TargetSpec] = {
    use names::*;
    &[
        TargetSpec {
            name: "established flow within 4x the XDP_PASS floor",
            numerator: (PACKET, ESTABLISHED, PER_PACKET),
            denominator: Denominator::Measured((PACKET, FLOOR, PER_PACKET)),
            at_most: true,
            bound: 4.0,
        },
        TargetSpec {
            name: "new flow within 10x the XDP_PASS floor",
            numerator: (PACKET, NEW_FLOW, PER_PACKET),
            denominator: Denominator::Measured((PACKET, FLOOR, PER_PACKET)),
            at_most: true,
            bound: 10.0,
        },
        TargetSpec {
            name: "established flow at 1M flows within 1.5x 1k (1,024 active)",
            numerator: (PACKET_FLOWS, ESTABLISHED_FEW_ACTIVE, "1M flows"),
            denominator: Denominator::Measured((PACKET_FLOWS, ESTABLISHED_FEW_ACTIVE, "1k flows")),
            at_most: true,
            bound: 1.5,
        },
        TargetSpec {
            name: "established flow at 1M flows within 3x 1k (all active)",
            numerator: (PACKET_FLOWS, ESTABLISHED_ALL_ACTIVE, "1M flows"),
            denominator: Denominator::Measured((PACKET_FLOWS, ESTABLISHED_ALL_ACTIVE, "1k flows")),
            at_most: true,
            bound: 3.0,
        },
        TargetSpec {
            name: "pps: lbctl local node work within 2x the XDP_TX bounce's",
            numerator: (PPS, PPS_LOCAL_ONE, NODE_WORK),
            denominator: Denominator::Measured((PPS, PPS_BOUNCE, NODE_WORK)),
            at_most: true,
            bound: 2.0,
        },
        TargetSpec {
            name: "pps: lbctl mesh ingress node work within 2x the bounce's",
            numerator: (PPS, PPS_ENCAP_ONE, NODE_WORK),
            denominator: Denominator::Measured((PPS, PPS_BOUNCE, NODE_WORK)),
            at_most: true,
            bound: 2.0,
        },
        TargetSpec {
            name: "pps: lbctl local at 75% of the bounce's frames/s or more",
            numerator: (PPS, PPS_BOUNCE, PIPELINE),
            denominator: Denominator::Measured((PPS, PPS_LOCAL_ONE, PIPELINE)),
            at_most: false,
            bound: 0.75,
        },
        TargetSpec {
            name: "pps: lbctl local, 64k flows within 1.3x one flow",
            numerator: (PPS, PPS_LOCAL_MANY, NODE_WORK),
            denominator: Denominator::Measured((PPS, PPS_LOCAL_ONE, NODE_WORK)),
            at_most: true,
            bound: 1.3,
        },
        TargetSpec {
            name: "pps: lbctl mesh ingress, 64k flows within 1.3x one flow",
            numerator: (PPS, PPS_ENCAP_MANY, NODE_WORK),
            denominator: Denominator::Measured((PPS, PPS_ENCAP_ONE, NODE_WORK)),
            at_most: true,
            bound: 1.3,
        },
        TargetSpec {
            name: "at least 2x nftables' new connections per second",
            numerator: (E2E, NEW_CONNECTIONS, LBCTL),
            denominator: Denominator::Measured((E2E, NEW_CONNECTIONS, NFTABLES)),
            at_most: false,
            bound: 2.0,
        },
        TargetSpec {
            name: "50 nodes: a change on every node within 1 s (ms)",
            numerator: (CLUSTER, CLUSTER_CHANGE_EVERY_NODE, CLUSTER_TARGET_NODES),
            denominator: Denominator::Absolute(MS),
            at_most: true,
            bound: 1000.0,
        },
        TargetSpec {
            name: "50 nodes: a killed node's tasks gone from every node within 3 s (ms)",
            numerator: (CLUSTER, CLUSTER_FAILURE_EVERY_NODE, CLUSTER_TARGET_NODES),
            denominator: Denominator::Absolute(MS),
            at_most: true,
            bound: 3000.0,
        },
    ]
};

#[derive(Serialize)]
pub struct Report {
    pub smoke: bool,
    pub machine: Machine,
    pub measurements: Vec<Measurement>,
    pub targets: Vec<Target>,
}

#[derive(Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub cpu_model: String,
}

impl Machine {
    fn this() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: kernel.trim().to_string(),
            cpu_model,
        }
    }
}

impl Report {
    /// Fails when a section ran but a number a target reads is not among its measurements: a
    /// case renamed in a section and not in `names` would otherwise leave its target "not
    /// measured" for good. A smoke run measures many cases under other variants than the targets
    /// read (smaller flow tables: no "1M flows"), so there a number is looked for by case only;
    /// so is a number held against a bound of its own (`Denominator::Absolute`) in any run: its
    /// variant is the run's setting (the cluster's node count: `--nodes 20` measures the case
    /// under another).
    pub fn check_targets(&self) -> Result<()> {
        let ran = |section: &str| self.measurements.iter().any(|m| m.section == section);
        for spec in TARGETS {
            let wanted = match spec.denominator {
                Denominator::Measured(denominator) => vec![spec.numerator, denominator],
                Denominator::Absolute(_) => vec![spec.numerator],
            };
            for wanted in wanted {
                let by_case = self.smoke || matches!(spec.denominator, Denominator::Absolute(_));
                let measured = if by_case {
                    self.measurements
                        .iter()
                        .any(|m| m.section == wanted.0 && m.case == wanted.1)
                } else {
                    find(&self.measurements, wanted).is_some()
                };
                if ran(wanted.0) && !measured {
                    anyhow::bail!(
                        "target {:?}: section {} ran but measured no {:?} ({})",
                        spec.name,
                        wanted.0,
                        wanted.1,
                        wanted.2
                    );
                }
            }
        }
        Ok(())
    }

    pub fn new(smoke: bool, measurements: Vec<Measurement>) -> Report {
        let targets = TARGETS
            .iter()
            .map(|spec| {
                let numerator = find(&measurements, spec.numerator);
                let (measure, ratio) = match spec.denominator {
                    Denominator::Measured(denominator) => (
                        "ratio",
                        match (numerator, find(&measurements, denominator)) {
                            (Some(n), Some(d)) if d > 0.0 => Some(n / d),
                            _ => None,
                        },
                    ),
                    Denominator::Absolute(unit) => (unit, numerator),
                };
                Target {
                    name: spec.name,
                    measure,
                    ratio,
                    relation: if spec.at_most { "<=" } else { ">=" },
                    bound: spec.bound,
                    met: ratio.map(|r| {
                        if spec.at_most {
                            r <= spec.bound
                        } else {
                            r >= spec.bound
                        }
                    }),
                }
            })
            .collect();
        Report {
            smoke,
            machine: Machine::this(),
            measurements,
            targets,
        }
    }

    /// The table on stdout: each section's cases and variants, then the targets.
    pub fn print(&self) {
        print!("{}", self.table());
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let case_width = self
            .measurements
            .iter()
            .map(|m| m.case.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let variant_width = self
            .measurements
            .iter()
            .map(|m| m.variant.len())
            .max()
            .unwrap_or(7)
            .max(7);
        let mut section = "";
        for m in &self.measurements {
            if m.section != section {
                section = m.section;
                let _ = writeln!(out, "\n[{section}]");
                let _ = writeln!(
                    out,
                    "{:<case_width$}  {:<variant_width$}  {:>14}  unit",
                    "case", "variant", "value"
                );
            }
            let _ = writeln!(
                out,
                "{:<case_width$}  {:<variant_width$}  {:>14}  {}",
                m.case,
                m.variant,
                format_value(m.value),
                m.unit
            );
        }
        let _ = writeln!(
            out,
            "\n[targets{}]",
            if self.smoke {
                ", smoke run: not meaningful"
            } else {
                ""
            }
        );
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            let ratio = t.ratio.map_or("-".to_string(), |r| format!("{r:.2}"));
            let _ = writeln!(
                out,
                "{:<70} {:<5} {ratio:>7} {} {:<5} {verdict}",
                t.name, t.measure, t.relation, t.bound
            );
        }
        out
    }

    /// Writes `bench.json` and the plots into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = dir.join("bench.json");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&json, text + "\n")
            .with_context(|| format!("cannot write {}", json.display()))?;
        std::fs::write(dir.join("bench.txt"), self.table())?;
        self.plot(dir)
    }

    /// One PNG per section with a picture to show: packet cost by case (bars, with the floor),
    /// cost against the flow table's size, and the end-to-end comparison. Needs gnuplot
    /// (installed by `cargo xtask setup`); without it, says so and writes the JSON only.
    fn plot(&self, dir: &Path) -> Result<()> {
        let mut script =
            String::from("set terminal png size 1000,560 font ',11'\nset grid ytics\n");
        let mut plots = 0;
        for (section, title, ylabel) in [
            (
                names::PACKET,
                "Per-packet cost through BPF_PROG_RUN",
                "ns/packet",
            ),
            (
                names::PACKET_FLOWS,
                "Per-packet cost against flow table size",
                "ns/packet",
            ),
            (
                names::E2E,
                "End to end: lbctl (XDP) and nftables DNAT",
                "value relative to nftables",
            ),
        ] {
            let data = self.plot_data(section);
            if data.is_empty() {
                continue;
            }
            let data_file = dir.join(format!("{section}.dat"));
            std::fs::write(&data_file, &data)?;
            let png = dir.join(format!("{section}.png"));
            let _ = write!(
                script,
                "set output '{}'\nset title '{title}'\nset ylabel '{ylabel}'\n\
                 set style data histograms\nset style histogram clustered gap 1\n\
                 set style fill solid 0.8 border -1\nset boxwidth 0.9\nset xtics rotate by -20\n\
                 set key outside top right\nset yrange [0:*]\n\
                 plot for [col=2:*] '{}' using col:xtic(1) title columnheader\n",
                png.display(),
                data_file.display()
            );
            plots += 1;
        }
        if plots == 0 {
            return Ok(());
        }
        let script_file = dir.join("plots.gp");
        std::fs::write(&script_file, &script)?;
        match Command::new("gnuplot")
            .arg(&script_file)
            .stdin(Stdio::null())
            .status()
        {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => anyhow::bail!("gnuplot {} failed ({status})", script_file.display()),
            Err(e) => {
                eprintln!("lbbench: no plots ({e}: run `cargo xtask setup` for gnuplot)");
                Ok(())
            }
        }
    }

    /// gnuplot's histogram data for `section`: a header of variants, then a row per case. The
    /// end-to-end rows are relative to nftables, since their units differ.
    fn plot_data(&self, section: &str) -> String {
        let rows: Vec<&Measurement> = self
            .measurements
            .iter()
            .filter(|m| {
                m.section == section && (section == names::E2E || m.unit == names::NS_PER_PACKET)
            })
            .collect();
        let mut variants: Vec<&str> = Vec::new();
        let mut cases: Vec<&str> = Vec::new();
        for m in &rows {
            if !variants.contains(&m.variant.as_str()) {
                variants.push(&m.variant);
            }
            if !cases.contains(&m.case.as_str()) {
                cases.push(&m.case);
            }
        }
        if rows.is_empty() {
            return String::new();
        }
        let mut out = String::from("case");
        for v in &variants {
            let _ = write!(out, "\t\"{v}\"");
        }
        out.push('\n');
        for case in &cases {
            let reference = (section == names::E2E)
                .then(|| find_in(&rows, case, names::NFTABLES))
                .flatten();
            let _ = write!(out, "\"{case}\"");
            for v in &variants {
                let value = find_in(&rows, case, v).map(|x| match reference {
                    Some(r) if r > 0.0 => x / r,
                    _ => x,
                });
                match value {
                    Some(x) => {
                        let _ = write!(out, "\t{x}");
                    }
                    None => out.push_str("\t-"),
                }
            }
            out.push('\n');
        }
        out
    }
}

fn find(all: &[Measurement], (section, case, variant): (&str, &str, &str)) -> Option<f64> {
    all.iter()
        .find(|m| m.section == section && m.case == case && m.variant == variant)
        .map(|m| m.value)
}

fn find_in(rows: &[&Measurement], case: &str, variant: &str) -> Option<f64> {
    rows.iter()
        .find(|m| m.case == case && m.variant == variant)
        .map(|m| m.value)
}

/// Three significant digits or so, without scientific notation for the usual ranges.
fn format_value(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}
