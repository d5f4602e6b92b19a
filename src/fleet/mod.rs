//! Fleets: `cutover rollout` and `cutover status --hosts`, several hosts
//! each running its own cutover, driven from one place (a CI job).
//!
//! The channel is ssh to each host, running the `cutover` CLI there
//! against its local admin socket ([`ssh`]): the user's existing access,
//! no new port, and both ends authenticated by ssh before any command
//! runs. Nothing is shared between hosts; this module only sequences
//! them ([`rollout`]) and reports ([`status`]).
//!
//! It may import the admin protocol's types (`admin::proto`) and
//! `config::parse_duration`; nothing of the server (control, proxy,
//! routing) — it is a client.

mod check;
pub mod hosts;
mod rollout;
pub mod ssh;
mod status;
mod table;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

pub use hosts::{Fleet, Host};
pub use rollout::{Plan, Target};

use crate::admin::proto::exit;
use crate::config::parse_duration;

/// Which hosts, and how to reach them: shared by `rollout` and `status`.
#[derive(Args, Debug, Clone, Default)]
pub struct FleetArgs {
    /// The hosts, in rollout order: ssh destinations (`host`,
    /// `user@host`), or with `--fleet` the names of its hosts to use.
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// A TOML file with a `[fleet]` table listing the hosts (proxy.toml
    /// works too).
    #[arg(long, value_name = "FILE")]
    pub fleet: Option<PathBuf>,
    /// The command that runs cutover on each host [default: cutover].
    #[arg(long, conflicts_with = "fleet")]
    pub remote_command: Option<String>,
    /// The admin socket on each host.
    #[arg(long, conflicts_with = "fleet")]
    pub remote_socket: Option<String>,
    /// The proxy.toml on each host (to find its admin socket).
    #[arg(long, conflicts_with_all = ["fleet", "remote_socket"])]
    pub remote_config: Option<String>,
    /// The ssh private key to log in with (`ssh -i`).
    #[arg(long, conflicts_with = "fleet")]
    pub identity: Option<PathBuf>,
    /// The ssh port of every host.
    #[arg(long, conflicts_with = "fleet")]
    pub ssh_port: Option<u16>,
    /// More ssh options, KEY=VALUE (`ssh -o`); repeatable.
    #[arg(
        long = "ssh-option",
        value_name = "KEY=VALUE",
        conflicts_with = "fleet"
    )]
    pub ssh_options: Vec<String>,
    /// A response header that must carry the deployed tag in the public
    /// check (e.g. `x-app-version`).
    #[arg(long)]
    pub version_header: Option<String>,
}

impl FleetArgs {
    /// Whether any host was named: the command is then a fleet command.
    pub fn given(&self) -> bool {
        !self.hosts.is_empty() || self.fleet.is_some()
    }

    /// The hosts, from the file or the list.
    pub fn load(&self) -> Result<Fleet, String> {
        let mut fleet = match &self.fleet {
            Some(file) => Fleet::from_file(file, &self.hosts)?,
            None if self.hosts.is_empty() => {
                return Err("no hosts: pass --hosts a,b,c or --fleet FILE".into())
            }
            None => Fleet::from_list(
                &self.hosts,
                &hosts::Defaults {
                    port: self.ssh_port,
                    identity: self.identity.clone(),
                    ssh_options: self.ssh_options.clone(),
                    command: self.remote_command.clone(),
                    socket: self.remote_socket.clone(),
                    config: self.remote_config.clone(),
                    connect_timeout: None,
                    version_header: None,
                },
            )?,
        };
        if self.version_header.is_some() {
            fleet.version_header = self.version_header.clone();
        }
        Ok(fleet)
    }
}

/// `cutover rollout`'s arguments.
#[derive(Args, Debug, Clone)]
pub struct RolloutArgs {
    pub service: String,
    /// A tag of the service's configured `image` (on each host).
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    pub tag: Option<String>,
    /// The image to deploy, REPO:TAG.
    #[arg(long)]
    pub image: Option<String>,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Hosts deployed at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub parallel: u16,
    /// Deploy this host alone first, then wait `--bake` and check it again.
    #[arg(long)]
    pub canary_host: Option<String>,
    /// How long the canary serves alone before the rest.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub bake: Duration,
    /// Longest one host's deploy or rollback may take.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub deploy_timeout: Duration,
    /// How long the public check of a host retries before it fails.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub check_timeout: Duration,
}

/// Runs `cutover rollout`; returns its exit code.
pub fn rollout(args: RolloutArgs) -> u8 {
    let fleet = match args.fleet.load() {
        Ok(fleet) => fleet,
        Err(err) => return refuse(&err),
    };
    if let Some(canary) = &args.canary_host {
        if !fleet.hosts.iter().any(|host| &host.name == canary) {
            return refuse(&format!("--canary-host {canary:?} is not one of the hosts"));
        }
    }
    let target = match (args.tag, args.image) {
        (Some(tag), _) => Target::Tag(tag),
        (None, Some(image)) => Target::Image(image),
        (None, None) => return refuse("pass --tag or --image"),
    };
    let plan = Plan {
        service: args.service,
        target,
        parallel: usize::from(args.parallel),
        canary: args.canary_host,
        bake: args.bake,
        deploy_timeout: args.deploy_timeout,
        check_timeout: args.check_timeout,
    };
    block_on(rollout::run(fleet, plan))
}

/// Runs `cutover status --hosts …`; returns its exit code.
pub fn status(service: Option<String>, args: &FleetArgs) -> u8 {
    match args.load() {
        Ok(fleet) => block_on(async { status::run(&fleet, service.as_deref()).await }),
        Err(err) => refuse(&err),
    }
}

fn refuse(message: &str) -> u8 {
    eprintln!("cutover: {message}");
    exit::REFUSED
}

fn block_on(work: impl std::future::Future<Output = u8>) -> u8 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(work),
        Err(err) => {
            eprintln!("cutover: cannot start runtime: {err}");
            exit::FAILED
        }
    }
}
