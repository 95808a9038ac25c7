//! `lbctl`: attach the XDP load balancer to an interface and manage its services.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{ArgGroup, Args, Parser, Subcommand};
use lb_userspace::{
    commands,
    dataplane::install::{AttachMode, TransmitChoice},
    instance,
    table::{self, BackendSpec, Proto, Scheduler},
};

#[derive(Parser)]
#[command(
    name = "lbctl",
    version,
    about = "XDP load balancer for published ports"
)]
struct Cli {
    /// Work in this network namespace (as named by `ip netns`); lbctl enters it itself, keeping
    /// its view of bpffs. Each namespace is an independent instance.
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    /// Folder of the instance's state (default /var/lib/lbctl/<netns>).
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// bpffs mount under which pins go (default /sys/fs/bpf, mounted if missing).
    #[arg(long, global = true, value_name = "DIR")]
    bpffs: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the data plane (XDP ingress + TC egress) to an interface
    ///
    /// On an interface that is attached already, the programs are replaced in place by this
    /// lbctl's (no packet goes unprocessed); every other attached interface gets them too. The
    /// maps (table, flows, counters) are kept.
    Attach {
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        mode: AttachMode,
        /// How the frames XDP sends (back out, redirected, encapsulated) leave the interface:
        /// auto sends them through TC on veths and in generic mode (see README)
        #[arg(long, value_enum, default_value = "auto")]
        transmit: TransmitChoice,
        /// Flows the flow table holds (only when its maps are first created).
        #[arg(long, value_name = "FLOWS")]
        flow_capacity: Option<u32>,
        /// Flows the IPv6 flow table holds (only when its maps are first created; by default an
        /// eighth of the flow capacity, at least 4096).
        #[arg(long, value_name = "FLOWS")]
        flow_capacity6: Option<u32>,
        /// Do not balance the node's own clients (127.0.0.1, the node's addresses, VIPs) with
        /// socket programs on the cgroup v2 root; kept until `--socket-lb`
        #[arg(long, conflicts_with = "socket_lb")]
        no_socket_lb: bool,
        /// Balance the node's own clients again (the default)
        #[arg(long)]
        socket_lb: bool,
    },
    /// Replace the programs on every attached interface with this lbctl's, keeping the maps
    ///
    /// Run after installing a new lbctl: each interface keeps its links, whose programs are
    /// swapped atomically; flows, counters and the table carry over (maps an older lbctl made
    /// smaller are migrated). Refused, changing nothing, when a pinned map cannot be used.
    Upgrade,
    /// Detach the data plane from an interface; services and flows are kept.
    Detach { iface: String },
    /// Make the service table exactly what a JSON file declares (services not in it are removed)
    ///
    /// In one step: services and backends that stay keep their ids, drain and health (their
    /// connections stay on their backend). The whole file is checked first: on any error
    /// nothing changes. With "nodes" in the file, the node list becomes exactly it. Format:
    /// README.md, or what `lbctl export` prints.
    Apply {
        /// The table file; `-` reads standard input.
        #[arg(value_name = "FILE")]
        file: String,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the table (services, and nodes if any) as a file `lbctl apply` takes back.
    Export,
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Manage a service's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Manage the nodes of the routing mesh (the same list on every node).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show or change the overlay settings (the same on every node).
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Run in the foreground: serve Prometheus metrics and run the health checks, until
    /// SIGTERM or SIGINT. The data plane does not need it to forward.
    Daemon(DaemonArgs),
    /// The gossiped cluster as this node's daemon sees it.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Packet, flow and per-backend counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Detach everywhere and delete this instance's maps, flows and state
    ///
    /// With --netns NAME after the namespace was deleted: removes the instance's pins (its
    /// interfaces went with the namespace) and its state folder (--state-dir, else the one its
    /// pins recorded, else the default).
    Purge,
    /// List every instance on this machine: its namespace (alive or gone), interfaces, flow
    /// capacity and the kernel memory its pinned maps hold
    ///
    /// Found from the pins under bpffs and the state folders under /var/lib/lbctl, without
    /// entering any namespace; --netns NAME lists that one only (its state in --state-dir, if
    /// given).
    Instances {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members, their state, underlay IP, gossip key, and whether their table agrees with this
    /// node's
    ///
    /// A member is listed from the first time it is heard until an hour after it died (the
    /// failure detector's grace period: a member back within the hour keeps its place). CUT
    /// OFF: datagrams still arrive, but one of the two cannot open what the other seals (key
    /// files that differ: the line says which key is missing where); the cluster is not
    /// converged until it is fixed.
    Ls {
        /// The daemon's whole view as JSON: each member's generation, digest, key and cut_off
        /// reason, the keyring in force and the gossip rejected by reason.
        #[arg(long)]
        json: bool,
    },
    /// The cluster's gossip keys (`lbctl daemon --cluster-key-file`).
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new key file with one random key (mode 600; refused if PATH exists) and print
    /// its id
    ///
    /// A new cluster: copy the file to every node (owned by the daemon's user, mode 600). A
    /// rotation: add the new key's line to every node's key file, then move it first on every
    /// node, then remove the old line (each step once every node has the one before; `cluster
    /// ls` shows every member's key). Needs no daemon or instance.
    Generate { path: std::path::PathBuf },
}

// The daemon's options (its help is the variant's doc comment above).
#[derive(Args)]
struct DaemonArgs {
    /// Address the metrics are served on (`/metrics`).
    #[arg(long, default_value = lb_userspace::daemon::DEFAULT_METRICS_ADDR, value_name = "ADDR:PORT")]
    metrics_addr: std::net::SocketAddr,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Join the gossiped cluster of this name: services and tasks then reach every member,
    /// and nodes are the live members (no `node add`). Without it, the static table.
    #[arg(long, value_name = "NAME", requires_all = ["node_name", "gossip_addr"], value_parser = parse_cluster_name)]
    cluster: Option<String>,
    /// The cluster's keyring (`lbctl cluster key generate`; only root may read it): every
    /// gossip datagram is sealed with its first key and opened with any of them. Reloaded when
    /// the file changes, or on SIGHUP.
    #[arg(long, value_name = "PATH", requires = "cluster")]
    cluster_key_file: Option<std::path::PathBuf>,
    /// Gossip in clear, without a key file: anyone who can reach the gossip port can join the
    /// cluster and steer its clients.
    #[arg(long, requires = "cluster", conflicts_with = "cluster_key_file")]
    insecure: bool,
    /// This node's name in the cluster (as in IP:PORT@NODE).
    #[arg(long, value_name = "NAME", requires = "cluster", value_parser = parse_node_name)]
    node_name: Option<String>,
    /// Where to gossip: this node's underlay IP and a UDP port (Swarm's is 7946).
    #[arg(long, value_name = "IP:PORT", requires = "cluster", value_parser = parse_gossip_addr)]
    gossip_addr: Option<std::net::SocketAddrV4>,
    /// A member to join through (repeat for several); none for the first node.
    #[arg(long = "seed", value_name = "IP:PORT", requires = "cluster", value_parser = parse_gossip_addr)]
    seeds: Vec<std::net::SocketAddrV4>,
    /// The address other nodes send VXLAN to, IPv4 or IPv6 (default: the IP of --gossip-addr).
    #[arg(long, value_name = "IP", requires = "cluster", value_parser = table::parse_node_ip)]
    underlay_ip: Option<IpAddr>,
    /// Time between gossip rounds; a silent member is dead after about --phi-threshold
    /// times the mean interval between its heartbeats.
    #[arg(long, default_value = "500ms", value_parser = table::parse_duration_ms, value_name = "DURATION")]
    gossip_interval: u64,
    /// The failure detector's threshold (chitchat's phi: silence / mean heartbeat interval).
    #[arg(long, default_value_t = lb_userspace::cluster::gossip::DEFAULT_PHI_THRESHOLD, value_name = "PHI")]
    phi_threshold: f64,
    /// Follow the Docker Engine: this node's Swarm tasks whose service has the container label
    /// `lbctl.publish=PORT:TARGET` become backends of the service it names (see the README's
    /// Docker Swarm section), with or without --cluster.
    #[arg(long)]
    docker: bool,
    /// Where the Docker Engine listens (unix:///PATH or tcp://HOST:PORT).
    #[arg(long, value_name = "URL", requires = "docker", default_value = lb_userspace::docker::DEFAULT_HOST)]
    docker_host: String,
}

fn parse_cluster_name(s: &str) -> Result<String, String> {
    table::validate_name("cluster", s).map(|()| s.to_owned())
}

fn parse_node_name(s: &str) -> Result<String, String> {
    table::validate_name("node", s).map(|()| s.to_owned())
}

/// A gossip address: a unicast IPv4 address other nodes can reach, and a port. (Gossip is
/// IPv4; on an IPv6 underlay, --underlay-ip gives the node's IPv6 address.)
fn parse_gossip_addr(s: &str) -> Result<std::net::SocketAddrV4, String> {
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid gossip address '{s}': expected IP:PORT"))?;
    let ip = match table::parse_node_ip(ip) {
        Ok(IpAddr::V4(ip)) => ip,
        Ok(IpAddr::V6(_)) => {
            return Err(format!(
                "invalid gossip address '{s}': gossip runs over IPv4 (an IPv6 underlay's \
                 address goes to --underlay-ip)"
            ));
        }
        Err(err) => return Err(format!("invalid gossip address '{s}': {err}")),
    };
    let port =
        table::parse_port(port).map_err(|err| format!("invalid gossip address '{s}': {err}"))?;
    Ok(std::net::SocketAddrV4::new(ip, port))
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Publish PORT and balance new connections over the backends (round-robin by default).
    Add {
        name: String,
        #[arg(value_parser = table::parse_port)]
        port: u16,
        /// Backends; `@NODE` for one on another node of the mesh, reached through VXLAN; `*W`
        /// for a weight (a share of the new flows, 0 to 256; default 1; 0: none).
        #[arg(required = true, value_name = "IP:PORT[@NODE][*W]", value_parser = table::parse_weighted_backend_spec)]
        backends: Vec<BackendSpec>,
        #[arg(long, default_value = "tcp", value_parser = |s: &str| s.parse::<Proto>())]
        proto: Proto,
        /// Publish on this address only, instead of every local address of the node.
        #[arg(long, value_parser = table::parse_vip)]
        vip: Option<std::net::IpAddr>,
        /// How new flows choose a backend: `rr` (round-robin; a connection whose flow-table
        /// entry was evicted is reset) or `maglev` (consistent hash of the 5-tuple; it reaches
        /// the same backend).
        #[arg(long, default_value = "rr", value_name = "rr|maglev", value_parser = |s: &str| s.parse::<Scheduler>())]
        scheduler: Scheduler,
    },
    /// Change a service's settings; its flows keep their backends.
    Set {
        name: String,
        /// `rr` (round-robin) or `maglev` (consistent hash of the 5-tuple).
        #[arg(long, required = true, value_name = "rr|maglev", value_parser = |s: &str| s.parse::<Scheduler>())]
        scheduler: Scheduler,
    },
    /// Stop publishing a service.
    Rm { name: String },
    /// List services, their backends and counters.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Change how a service's backends are health-checked (by `lbctl daemon`); flags not given
    /// keep their current value. Defaults: TCP connect every 2s, timeout 1s, rise 2, fall 3;
    /// the data plane ejects a backend after 3 refused or unanswered connections in a row.
    Health(HealthArgs),
}

// `service health`'s arguments (its help is the variant's doc comment).
#[derive(Args)]
struct HealthArgs {
    name: String,
    /// Stop checking: every backend counts as healthy.
    #[arg(long, conflicts_with_all = ["on", "http", "tcp"])]
    off: bool,
    /// Check again (after --off).
    #[arg(long)]
    on: bool,
    /// Probe with a TCP connect.
    #[arg(long, conflicts_with = "http")]
    tcp: bool,
    /// Probe with an HTTP GET of PATH, which must answer --expect-status.
    #[arg(long, value_name = "PATH")]
    http: Option<String>,
    #[arg(long, value_name = "STATUS")]
    expect_status: Option<u16>,
    /// Time between probes, e.g. 2s or 500ms.
    #[arg(long, value_parser = table::parse_duration_ms, value_name = "DURATION")]
    interval: Option<u64>,
    /// Time a probe may take, e.g. 1s.
    #[arg(long, value_parser = table::parse_duration_ms, value_name = "DURATION")]
    timeout: Option<u64>,
    /// Successes in a row that make a backend healthy.
    #[arg(long)]
    rise: Option<u32>,
    /// Failures in a row that make a backend unhealthy.
    #[arg(long)]
    fall: Option<u32>,
    /// Connections in a row a backend may refuse or leave unanswered before the data plane
    /// ejects it (0: never). Whether or not the probes are on.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u32).range(0..=i64::from(table::MAX_EJECT_AFTER))
    )]
    eject_after: Option<u32>,
}

impl HealthArgs {
    /// The change the flags ask for; a flag not given keeps the current value.
    fn update(&self) -> table::HealthUpdate {
        table::HealthUpdate {
            enabled: if self.off {
                Some(false)
            } else if self.on || self.tcp || self.http.is_some() {
                Some(true)
            } else {
                None
            },
            probe: if self.tcp {
                Some(None)
            } else {
                self.http.clone().map(Some)
            },
            expect_status: self.expect_status,
            interval_ms: self.interval,
            timeout_ms: self.timeout,
            rise: self.rise,
            fall: self.fall,
            eject_after: self.eject_after,
        }
    }
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add backends to a service (they join the end of the round-robin order).
    Add {
        service: String,
        /// `@NODE` for a backend on another node of the mesh; `*W` for a weight (0 to 256).
        #[arg(required = true, value_name = "IP:PORT[@NODE][*W]", value_parser = table::parse_weighted_backend_spec)]
        backends: Vec<BackendSpec>,
    },
    /// Change a backend's weight: its share of the service's new flows against the others'
    /// (0 to 256; 0 takes no new flows, like drain). Its flows stay.
    Weight {
        service: String,
        #[arg(value_name = "IP:PORT[@NODE]", value_parser = table::parse_backend_spec)]
        backend: BackendSpec,
        #[arg(value_parser = table::parse_weight)]
        weight: u32,
    },
    /// Remove backends from a service (`IP:PORT` whatever its node; with `@NODE`, it must match).
    Rm {
        service: String,
        #[arg(required = true, value_name = "IP:PORT[@NODE]", value_parser = table::parse_backend_spec)]
        backends: Vec<BackendSpec>,
    },
    /// Stop sending new flows to a backend; its existing flows continue (`service ls` shows how
    /// many are still live).
    Drain {
        service: String,
        #[arg(value_name = "IP:PORT[@NODE]", value_parser = table::parse_backend_spec)]
        backend: BackendSpec,
    },
    /// Let a drained backend take new flows again.
    Undrain {
        service: String,
        #[arg(value_name = "IP:PORT[@NODE]", value_parser = table::parse_backend_spec)]
        backend: BackendSpec,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Add a node; adding it again with the same address changes nothing.
    Add {
        name: String,
        /// The address other nodes send its VXLAN packets to.
        #[arg(value_parser = table::parse_node_ip)]
        underlay_ip: IpAddr,
    },
    /// Remove a node that hosts no backend.
    Rm { name: String },
    /// List the nodes, marking the one this instance is.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MeshCommand {
    /// VNI, VXLAN port, which node this is, and the overlay MTU.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Change the VNI and/or the VXLAN UDP port.
    #[command(group(ArgGroup::new("setting").required(true).multiple(true)))]
    Set {
        /// VXLAN network identifier, 0 to 16777215 (default 4096).
        #[arg(long, group = "setting", value_parser = table::parse_vni)]
        vni: Option<u32>,
        /// UDP port of the overlay (default 4789).
        #[arg(long, group = "setting", value_parser = table::parse_port)]
        vxlan_port: Option<u16>,
    },
}

fn run(cli: Cli) -> anyhow::Result<String> {
    // The commands that work without entering a namespace, which may be gone.
    if let Command::Instances { json } = cli.command {
        return commands::instances(cli.netns.as_deref(), cli.state_dir, cli.bpffs, json);
    }
    if let (Command::Purge, Some(name)) = (&cli.command, cli.netns.as_deref())
        && instance::netns_handle(name).is_none()
    {
        let instance = instance::locate_without_entering(name, cli.state_dir, cli.bpffs)?;
        return commands::purge_gone(&instance);
    }
    // A key file is a file of the operator's: no instance, no namespace, no bpffs.
    if let Command::Cluster(ClusterCommand::Key(KeyCommand::Generate { path })) = &cli.command {
        let id = lb_userspace::cluster::transport::generate_key_file(path)?;
        return Ok(format!(
            "wrote {} (key {id}, mode 600): copy it to every node, and start each daemon with \
             --cluster-key-file {}",
            path.display(),
            path.display()
        ));
    }
    let instance = instance::resolve(cli.netns.as_deref(), cli.state_dir, cli.bpffs)?;
    match cli.command {
        Command::Attach {
            iface,
            mode,
            transmit,
            flow_capacity,
            flow_capacity6,
            no_socket_lb,
            socket_lb,
        } => {
            let socket_lb = match (socket_lb, no_socket_lb) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            commands::attach(
                &instance,
                &iface,
                mode,
                transmit,
                flow_capacity,
                flow_capacity6,
                socket_lb,
            )
        }
        Command::Upgrade => commands::upgrade(&instance),
        Command::Detach { iface } => commands::detach(&instance, &iface),
        Command::Apply { file, dry_run } => {
            // Read (and checked) before taking the instance's lock.
            let table = commands::read_table_file(&file)?;
            commands::apply(&instance, &file, &table, dry_run)
        }
        Command::Export => commands::export(&instance),
        Command::Service(command) => service(&instance, command),
        Command::Backend(command) => backend(&instance, command),
        Command::Node(command) => node(&instance, command),
        Command::Mesh(command) => mesh(&instance, command),
        Command::Stats { json } => commands::stats(&instance, json),
        Command::Daemon(args) => daemon(instance, args).map(|()| String::new()),
        Command::Cluster(ClusterCommand::Ls { json }) => commands::cluster_ls(&instance, json),
        Command::Cluster(ClusterCommand::Key(KeyCommand::Generate { .. })) => {
            unreachable!("written above, without an instance")
        }
        Command::Purge => commands::purge(&instance),
        Command::Instances { .. } => unreachable!("listed above, without an instance"),
    }
}

fn service(instance: &instance::Instance, command: ServiceCommand) -> anyhow::Result<String> {
    match command {
        ServiceCommand::Add {
            name,
            port,
            backends,
            proto,
            vip,
            scheduler,
        } => commands::service_add(instance, &name, port, &backends, proto, vip, scheduler),
        ServiceCommand::Set { name, scheduler } => {
            commands::service_set(instance, &name, scheduler)
        }
        ServiceCommand::Rm { name } => commands::service_rm(instance, &name),
        ServiceCommand::Ls { json } => commands::service_ls(instance, json),
        ServiceCommand::Health(args) => {
            commands::service_health(instance, &args.name, &args.update())
        }
    }
}

fn backend(instance: &instance::Instance, command: BackendCommand) -> anyhow::Result<String> {
    match command {
        BackendCommand::Add { service, backends } => {
            commands::backend_add(instance, &service, &backends)
        }
        BackendCommand::Rm { service, backends } => {
            commands::backend_rm(instance, &service, &backends)
        }
        BackendCommand::Weight {
            service,
            backend,
            weight,
        } => commands::backend_weight(instance, &service, &backend, weight),
        BackendCommand::Drain { service, backend } => {
            commands::backend_drain(instance, &service, &backend, true)
        }
        BackendCommand::Undrain { service, backend } => {
            commands::backend_drain(instance, &service, &backend, false)
        }
    }
}

fn node(instance: &instance::Instance, command: NodeCommand) -> anyhow::Result<String> {
    match command {
        NodeCommand::Add { name, underlay_ip } => commands::node_add(instance, &name, underlay_ip),
        NodeCommand::Rm { name } => commands::node_rm(instance, &name),
        NodeCommand::Ls { json } => commands::node_ls(instance, json),
    }
}

fn mesh(instance: &instance::Instance, command: MeshCommand) -> anyhow::Result<String> {
    match command {
        MeshCommand::Show { json } => commands::mesh_show(instance, json),
        MeshCommand::Set { vni, vxlan_port } => commands::mesh_set(instance, vni, vxlan_port),
    }
}

/// Runs the daemon in the foreground, in the gossiped cluster when `--cluster` is given.
fn daemon(instance: instance::Instance, args: DaemonArgs) -> anyhow::Result<()> {
    let phi_threshold = args.phi_threshold;
    if !(phi_threshold.is_finite() && phi_threshold > 0.0) {
        anyhow::bail!("invalid --phi-threshold {phi_threshold}: a number above 0");
    }
    let cluster = match (args.cluster, args.node_name, args.gossip_addr) {
        (Some(cluster), Some(node), Some(gossip_addr)) => {
            let keys = match (&args.cluster_key_file, args.insecure) {
                (Some(path), _) => Some(std::sync::Arc::new(
                    lb_userspace::cluster::transport::KeyFile::load(path)?,
                )),
                (None, true) => None,
                (None, false) => anyhow::bail!(
                    "--cluster needs --cluster-key-file PATH (make one with `lbctl cluster key \
                     generate PATH` and copy it to every node), or --insecure to gossip in clear"
                ),
            };
            Some(lb_userspace::daemon::ClusterOptions {
                keys,
                vtep: args.underlay_ip.unwrap_or(IpAddr::V4(*gossip_addr.ip())),
                gossip: lb_userspace::cluster::gossip::Config {
                    cluster,
                    node,
                    gossip_addr: gossip_addr.into(),
                    seeds: args.seeds.into_iter().map(Into::into).collect(),
                    generation: commands::now_ms(),
                    gossip_interval: std::time::Duration::from_millis(args.gossip_interval),
                    phi_threshold,
                },
            })
        }
        _ => None,
    };
    lb_userspace::daemon::run(
        instance,
        lb_userspace::daemon::Options {
            metrics_addr: args.metrics_addr,
            log_json: args.log_json,
            cluster,
            docker_host: args.docker.then_some(args.docker_host),
        },
    )
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // One line naming the bad value: clap's first paragraph (the missing arguments
            // follow its first line), without the usage hint, which would only repeat --help.
            let text = err.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = first.join(" ");
            eprintln!(
                "lbctl: {}",
                match line.trim_start_matches("error: ") {
                    "" => "invalid arguments",
                    line => line,
                }
            );
            return ExitCode::from(2);
        }
    };
    // Before anything touches the system; the message starts with "lbctl" already.
    if let Err(err) = instance::require_root() {
        eprintln!("{err}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(output) => {
            // A reader that closed its end (`lbctl service ls | grep -q web`) has what it
            // wanted: not an error, and no panic.
            use std::io::Write as _;
            if !output.is_empty() {
                let _ = writeln!(std::io::stdout(), "{output}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("lbctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}
