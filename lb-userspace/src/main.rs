//! `lbctl`: attach the XDP load balancer to an interface and manage its services.
use std::{net::SocketAddrV4, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{
    commands::{self, AttachMode},
    instance,
    model::{self, Proto},
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
    /// Attach the data plane (XDP ingress + TC egress) to an interface.
    Attach {
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        mode: AttachMode,
        /// Flows the flow table holds (only when its maps are first created).
        #[arg(long, value_name = "FLOWS")]
        flow_capacity: Option<u32>,
    },
    /// Detach the data plane from an interface; services and flows are kept.
    Detach { iface: String },
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Manage a service's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Packet, flow and per-backend counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Detach everywhere and delete this instance's maps, flows and state.
    Purge,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Publish PORT and balance new connections round-robin over the backends.
    Add {
        name: String,
        #[arg(value_parser = model::parse_port)]
        port: u16,
        #[arg(required = true, value_name = "IP:PORT", value_parser = model::parse_backend)]
        backends: Vec<SocketAddrV4>,
        #[arg(long, default_value = "tcp", value_parser = |s: &str| s.parse::<Proto>())]
        proto: Proto,
        /// Publish on this address only, instead of every local address of the node.
        #[arg(long, value_parser = model::parse_vip)]
        vip: Option<std::net::Ipv4Addr>,
    },
    /// Stop publishing a service.
    Rm { name: String },
    /// List services, their backends and counters.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add backends to a service (they join the end of the round-robin order).
    Add {
        service: String,
        #[arg(required = true, value_name = "IP:PORT", value_parser = model::parse_backend)]
        backends: Vec<SocketAddrV4>,
    },
    /// Remove backends from a service.
    Rm {
        service: String,
        #[arg(required = true, value_name = "IP:PORT", value_parser = model::parse_backend)]
        backends: Vec<SocketAddrV4>,
    },
}

fn run(cli: Cli) -> anyhow::Result<String> {
    instance::require_root()?;
    let instance = instance::resolve(cli.netns.as_deref(), cli.state_dir, cli.bpffs)?;
    match cli.command {
        Command::Attach {
            iface,
            mode,
            flow_capacity,
        } => commands::attach(&instance, &iface, mode, flow_capacity),
        Command::Detach { iface } => commands::detach(&instance, &iface),
        Command::Service(ServiceCommand::Add {
            name,
            port,
            backends,
            proto,
            vip,
        }) => commands::service_add(&instance, &name, port, &backends, proto, vip),
        Command::Service(ServiceCommand::Rm { name }) => commands::service_rm(&instance, &name),
        Command::Service(ServiceCommand::Ls { json }) => commands::service_ls(&instance, json),
        Command::Backend(BackendCommand::Add { service, backends }) => {
            commands::backend_add(&instance, &service, &backends)
        }
        Command::Backend(BackendCommand::Rm { service, backends }) => {
            commands::backend_rm(&instance, &service, &backends)
        }
        Command::Stats { json } => commands::stats(&instance, json),
        Command::Purge => commands::purge(&instance),
    }
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
            // One line naming the bad value; clap's usage hint would only repeat --help.
            let text = err.to_string();
            eprintln!(
                "lbctl: {}",
                text.lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(output) => {
            if !output.is_empty() {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("lbctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}
