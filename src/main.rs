//! The `cutover` binary: `serve` runs the proxy; `check` validates a config;
//! the other subcommands are clients of a running server's admin socket.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cutover::admin::proto::{
    exit, ActiveStatus, CertStatus, ErrorKind, ErrorReply, ProgressEvent, Reply, Report,
    StatusReport,
};
use cutover::admin::{ClientError, Command as AdminCommand};
use cutover::handoff::{self, Predecessor};
use cutover::{Config, Inherited, ListenError, Listeners, Startup};

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Reverse proxy with zero-downtime blue/green deploys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground (SIGTERM/SIGINT drain and exit 0).
    Serve {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Validate the config and its certificates; list every problem.
    Check {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Show services: active colour, upstream, in-flight requests.
    Status {
        service: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
        /// With `--hosts` or `--fleet`: every host's status in one table.
        #[command(flatten)]
        fleet: cutover::fleet::FleetArgs,
    },
    /// Health-check an upstream, switch traffic to it, drain the old one.
    Switch {
        service: String,
        /// The new upstream, IP:PORT.
        #[arg(long)]
        to: String,
        /// Skip the health check.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Hold new requests for a service (maintenance) until `resume`.
    Pause {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Release requests held by `pause`.
    Resume {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Start IMAGE as the other colour, health-check, switch, drain; exit 0
    /// only when traffic switched.
    #[command(group = clap::ArgGroup::new("what").required(true).args(["image", "tag"]))]
    Deploy {
        service: String,
        /// The image to deploy, REPO:TAG.
        #[arg(long, conflicts_with = "tag")]
        image: Option<String>,
        /// A tag of the service's configured `image`.
        #[arg(long)]
        tag: Option<String>,
        /// Give the new colour this share of the clients (e.g. `10%`),
        /// sticky per client by cookie, and keep the old colour active
        /// until `promote` or `abort`.
        #[arg(long, value_name = "SHARE")]
        canary: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Switch everything to the service's canary (with the usual drain; the
    /// old colour stays warm), then judge it for the bake window.
    Promote {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End the service's canary: every client back on the active colour,
    /// the canary's container removed.
    Abort {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deploy to several hosts over ssh, one after another; on a failure
    /// or an interrupt, roll back the hosts already switched.
    Rollout(cutover::fleet::RolloutArgs),
    /// Swap back to the warm previous colour, or start the previous image.
    Rollback {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-read proxy.toml and certificates (also automatic on change).
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replace the running server by a new process (a new binary) without
    /// closing its sockets: the new one serves, then the old one drains and
    /// exits. Exit 0 only when the new process serves.
    Upgrade {
        /// The new executable (default: the running server's own path,
        /// which is the new binary once it has been replaced on disk).
        #[arg(long)]
        binary: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Order a new certificate for a `tls = "acme"` name now; the current
    /// one serves until the new one is in place (and stays if it fails).
    Renew {
        /// The host name, as listed in a site's `hosts`.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How a client command finds the server, and how it prints.
#[derive(Args)]
struct AdminArgs {
    /// The admin socket path.
    #[arg(long, conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Read `admin_socket` from this config instead.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print JSON lines (the protocol's replies) instead of text.
    #[arg(long)]
    json: bool,
}

/// mimalloc: the profile showed glibc malloc/free at ~5% of the proxy's
/// CPU; hyper allocates per request and per connection. Its v2 line
/// (Cargo feature `v2`): v3's aligned path, which Rust's allocator calls
/// always take, made hyper's per-request 8 KiB read-buffer allocations
/// 1.6× dearer (callgrind: 375 against 231 instructions each).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts (the log writer is one): taking inherited
    // sockets edits the environment.
    let inherited = matches!(cli.command, Command::Serve { .. }).then(inherited_sockets);
    let _log_writer = init_logging();
    match cli.command {
        Command::Serve { config } => {
            serve(&config, inherited.unwrap_or_else(|| Ok(Sockets::default())))
        }
        Command::Check { config } => cutover::check::run(&config),
        Command::Status {
            service,
            fleet,
            admin,
        } if fleet.given() => fleet_status(service, &fleet, &admin),
        Command::Status { service, admin, .. } => client(&admin, AdminCommand::Status { service }),
        Command::Rollout(args) => ExitCode::from(cutover::fleet::rollout(args)),
        Command::Switch {
            service,
            to,
            force,
            admin,
        } => client(&admin, AdminCommand::Switch { service, to, force }),
        Command::Pause { service, admin } => client(&admin, AdminCommand::Pause { service }),
        Command::Resume { service, admin } => client(&admin, AdminCommand::Resume { service }),
        Command::Reload { admin } => client(&admin, AdminCommand::Reload {}),
        Command::Renew { name, admin } => client(&admin, AdminCommand::Renew { name }),
        Command::Upgrade { binary, admin } => client(
            &admin,
            AdminCommand::Upgrade {
                binary: binary.map(|path| {
                    std::path::absolute(&path)
                        .unwrap_or(path)
                        .display()
                        .to_string()
                }),
            },
        ),
        Command::Deploy {
            service,
            image,
            tag,
            canary,
            admin,
        } => client(
            &admin,
            AdminCommand::Deploy {
                service,
                image,
                tag,
                docker_config: callers_docker_config(),
                canary,
            },
        ),
        Command::Promote { service, admin } => client(&admin, AdminCommand::Promote { service }),
        Command::Abort { service, admin } => client(&admin, AdminCommand::Abort { service }),
        Command::Rollback { service, admin } => client(
            &admin,
            AdminCommand::Rollback {
                service,
                docker_config: callers_docker_config(),
            },
        ),
    }
}

/// Runs one admin command and prints its progress and result. The exit
/// code says how it ended (`cutover::admin::proto::exit`): 0 success,
/// 1 failed, 2 refused, 3 busy, 4 server unreachable.
fn client(args: &AdminArgs, command: AdminCommand) -> ExitCode {
    let socket = match admin_socket(args) {
        Ok(socket) => socket,
        Err(err) => {
            eprintln!("cutover: {err}");
            return ExitCode::from(exit::REFUSED);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cutover: cannot start runtime: {err}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let json = args.json;
    let result = runtime.block_on(cutover::admin::call(&socket, &command, |step, message| {
        if json {
            let event = Reply::Progress(ProgressEvent {
                step: step.to_string(),
                message: message.to_string(),
            });
            println!("{}", to_line(&event));
        } else {
            println!("{step:>9}  {message}");
        }
    }));
    match result {
        Ok(report) if json => {
            let result = serde_json::to_value(&report).unwrap_or_default();
            println!("{}", to_line(&Reply::Ok { result }));
            ExitCode::SUCCESS
        }
        Ok(Report::Status(status)) => {
            print_status(&status);
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!(
                "       ok  {}",
                serde_json::to_value(&report).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            if json {
                let error = match &err {
                    ClientError::Server(error) => error.clone(),
                    other => ErrorReply::new(ErrorKind::Failed, other.to_string()),
                };
                println!("{}", to_line(&Reply::Error { error }));
            } else {
                eprintln!("cutover: {err}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}

/// `status --hosts`/`--fleet`: every host in one table (over ssh, so
/// the local admin flags mean nothing there).
fn fleet_status(
    service: Option<String>,
    fleet: &cutover::fleet::FleetArgs,
    admin: &AdminArgs,
) -> ExitCode {
    if admin.socket.is_some() || admin.config.is_some() || admin.json {
        eprintln!("cutover: --hosts/--fleet do not combine with --socket, --config or --json");
        return ExitCode::from(exit::REFUSED);
    }
    ExitCode::from(cutover::fleet::status(service, fleet))
}

/// One protocol line, for `--json`.
fn to_line(reply: &Reply) -> String {
    serde_json::to_string(reply).unwrap_or_default()
}

/// The invoking user's docker config.json (registry credentials), so the
/// server pulls with the CI user's login, not root's: no sudo tricks.
fn callers_docker_config() -> Option<String> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))?;
    let file = dir.join("config.json");
    file.is_file()
        .then(|| std::path::absolute(&file).unwrap_or(file))
        .map(|path| path.display().to_string())
}

fn admin_socket(args: &AdminArgs) -> Result<PathBuf, String> {
    if let Some(socket) = &args.socket {
        return Ok(socket.clone());
    }
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("proxy.toml"));
    let config = Config::load(&path).map_err(|err| err.to_string())?;
    config.server.admin_socket.ok_or_else(|| {
        format!(
            "{}: [server] admin_socket is not set; pass --socket",
            path.display()
        )
    })
}

/// One block per service, for people.
fn print_status(status: &StatusReport) {
    for (name, service) in &status.services {
        let flags: Vec<&str> = [("paused", service.paused), ("busy", service.busy)]
            .into_iter()
            .filter_map(|(flag, set)| set.then_some(flag))
            .collect();
        println!(
            "{name}{}",
            if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(", "))
            }
        );
        match &service.active {
            None => println!("  active:    none (requests get 503)"),
            Some(active) => println!("  active:    {}", active_line(active)),
        }
        if let Some(canary) = &service.canary {
            println!(
                "  canary:    {} {}  share {}%  image {}  requests {}  5xx {}  in-flight {}",
                canary.color,
                canary.upstream,
                f64::from(canary.share_bp) / 100.0,
                canary.image.as_deref().unwrap_or("-"),
                canary.requests,
                canary.errors,
                canary.in_flight,
            );
        }
        if let Some(bake) = &service.bake {
            let p99 = bake
                .p99_ms
                .map_or("-".to_string(), |ms| format!("<= {ms} ms"));
            println!(
                "  bake:      {} ({}) {}  {} requests  {} 5xx  p99 {p99}  after {} ms{}{}",
                bake.color,
                bake.phase,
                bake.state,
                bake.requests,
                bake.errors,
                bake.elapsed_ms,
                bake.reason
                    .as_ref()
                    .map(|r| format!("  reason: {r}"))
                    .unwrap_or_default(),
                bake.breach_to_switch_ms
                    .map(|ms| format!("  breach to switch {ms} ms"))
                    .unwrap_or_default(),
            );
        }
        if let Some(previous) = &service.previous {
            println!(
                "  previous:  {} {}  image {}  warm for {}s more",
                previous.color,
                previous.upstream,
                previous.image.as_deref().unwrap_or("-"),
                previous.warm_for_s,
            );
        }
        if let Some(last) = &service.last_deploy {
            let outcome = if last.ok { "ok" } else { "FAILED" };
            println!("  last deploy: {} {outcome}: {}", last.image, last.message);
        }
    }
    println!("docker: {}", status.docker);
    print_workers(&status.workers);
    if status.parking.parks > 0 {
        println!(
            "parked: {} idle connections ({} parks since start)",
            status.parking.parked, status.parking.parks
        );
    }
    print_certificates(status.certificates.as_deref().unwrap_or_default());
}

/// One line for the worker threads: each one's open connections (and
/// accepted since start), so an uneven spread shows.
fn print_workers(workers: &[cutover::WorkerStatus]) {
    if workers.is_empty() {
        return;
    }
    let each: Vec<String> = workers
        .iter()
        .map(|worker| {
            format!(
                "#{} {} open ({} accepted)",
                worker.worker, worker.open, worker.accepted
            )
        })
        .collect();
    println!("workers: {}", each.join(", "));
}

/// One line per certificate: name, source, state, issuer, expiry, next
/// renewal, and the last error while one stands.
fn print_certificates(certificates: &[CertStatus]) {
    if certificates.is_empty() {
        return;
    }
    let date = |secs: Option<u64>| {
        secs.map(|secs| {
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        })
        .unwrap_or_else(|| "-".to_string())
    };
    println!("certificates:");
    for cert in certificates {
        let renewal = if cert.source == "file" {
            "renewal: not managed by cutover".to_string()
        } else if cert.not_after.is_none() {
            format!("next attempt {}", date(cert.next_renewal))
        } else {
            format!("next renewal {}", date(cert.next_renewal))
        };
        println!(
            "  {}  [{} {}]  issuer {}  expires {}  {renewal}",
            cert.name,
            cert.source,
            cert.state,
            cert.issuer.as_deref().unwrap_or("-"),
            date(cert.not_after),
        );
        if let Some(error) = &cert.last_error {
            println!(
                "    last attempt failed ({} in a row): {error}",
                cert.failures
            );
        }
    }
}

/// The active upstream in one line, with only the facts it has: a plain
/// upstream has no image or container, and one the config chose (no switch
/// or deploy yet) has no "active since".
fn active_line(active: &ActiveStatus) -> String {
    let mut parts = vec![format!("{} {}", active.color, active.upstream)];
    parts.extend(active.health.clone());
    parts.extend(active.active_for_s.map(|s| format!("active {s}s")));
    parts.extend(active.image.as_ref().map(|image| format!("image {image}")));
    parts.extend(
        active
            .container
            .as_ref()
            .map(|id| format!("container {}", id.get(..12).unwrap_or(id))),
    );
    parts.push(format!("requests {}", active.requests));
    parts.push(format!("5xx {}", active.errors));
    parts.push(format!("in-flight {}", active.in_flight));
    parts.push(format!("websockets {}", active.websockets));
    parts.join("  ")
}

/// Log lines queued for the writer thread before a request waits for it.
const LOG_QUEUE_LINES: usize = 8_192;

/// Logs go to stderr through a writer thread, so a request never waits on
/// a terminal or journald write (it still waits, rather than dropping lines,
/// if that thread falls far behind). The returned guard flushes at exit.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The queue is allocated whole up front (32 bytes a line): the default
    // 128,000 lines cost 4 MiB of resident memory for nothing while idle.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    guard
}

/// What `serve` starts from besides the config: sockets passed by systemd
/// (`LISTEN_FDS`) or by an upgrading predecessor, which then waits for
/// this process's report.
#[derive(Default)]
struct Sockets {
    inherited: Inherited,
    admin: Option<std::os::unix::net::UnixListener>,
    predecessor: Option<Predecessor>,
}

/// Takes the sockets this process was given, from an upgrade's hand-off
/// or `LISTEN_FDS`. Edits the environment: call before threads start.
fn inherited_sockets() -> Result<Sockets, ListenError> {
    match handoff::from_env() {
        Some(handed_over) => handed_over.map(|h| Sockets {
            inherited: h.inherited,
            admin: h.admin,
            predecessor: Some(h.predecessor),
        }),
        None => Inherited::from_env().map(|inherited| Sockets {
            inherited,
            ..Sockets::default()
        }),
    }
}

/// Serves `path`'s config on the inherited sockets (see [`Inherited`]),
/// binding the addresses none was inherited for. Started by an upgrade,
/// it reports ready or its error to the old process.
fn serve(path: &std::path::Path, sockets: Result<Sockets, ListenError>) -> ExitCode {
    let sockets = match sockets {
        Ok(sockets) => sockets,
        Err(err) => {
            eprintln!("cutover: {err}");
            return ExitCode::FAILURE;
        }
    };
    let predecessor = sockets.predecessor.map(std::sync::Arc::new);
    let fail = |message: &str, code: u8| {
        eprintln!("{message}");
        if let Some(predecessor) = &predecessor {
            predecessor.failed(message);
        }
        ExitCode::from(code)
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => return fail(&err.to_string(), 2),
    };
    let mode = match cutover::RuntimeMode::from_env() {
        Ok(mode) => mode,
        Err(err) => {
            eprintln!("cutover: {err}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = match (mode, config.server.workers) {
        // Per core, `run` starts a thread with a runtime of its own per
        // worker; this one keeps the controller, the admin socket and the
        // accept loops (with one worker, the connections too: a
        // current-thread runtime has no cross-thread wake-ups to pay for).
        (cutover::RuntimeMode::PerCore, _) | (_, 1) => {
            tokio::runtime::Builder::new_current_thread()
        }
        (cutover::RuntimeMode::WorkStealing, 0) => tokio::runtime::Builder::new_multi_thread(),
        (cutover::RuntimeMode::WorkStealing, workers) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(workers);
            runtime
        }
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start runtime: {err}"), 1),
    };
    let ready = predecessor.clone();
    let startup = Startup {
        admin: sockets.admin,
        on_ready: Some(Box::new(move || {
            if let Some(predecessor) = ready {
                predecessor.ready();
            }
        })),
        upgradable: true,
    };
    let result = runtime.block_on(async {
        let listeners = Listeners::open(&config, sockets.inherited).await?;
        cutover::run_with(listeners, config, shutdown_signal(), startup).await?;
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&format!("cutover: {err:#}"), 1),
    }
}

/// Completes on SIGTERM (systemd, docker stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
