//! Start-up wiring: [`run`] builds the routing cell, restores the state
//! file, reconciles with Docker, opens the admin socket, starts the file
//! watcher and the accept loops, and on shutdown waits for everything to
//! drain.
//!
//! It is the one place that knows every part; the parts know only what lies
//! below them (see `docs/architecture.md`).

use std::future::Future;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acme;
use crate::admin;
use crate::config::Config;
use crate::control::state::{StateError, StateStore};
use crate::control::{identity, watch, Controller, Progress};
use crate::handoff::Upgrader;
use crate::metrics::Metrics;
use crate::proxy::{Listeners, RuntimeMode, Server, Workers};
use crate::rebind::{Kind, LiveListeners};
use crate::routing::{RedirectPort, Shared, Snapshot, WorkerLoad};
use crate::tls::acme::AcmeCerts;
use crate::tls::{self, CertStore, SniResolver};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "an HTTPS listener needs at least one [[tls]] certificate or a site with tls = \"acme\""
    )]
    NoCertificates,
    #[error("{0}")]
    Certificates(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no listener to serve on")]
    NoListeners,
    #[error("admin socket: {0}")]
    Admin(#[from] admin::AdminError),
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Acme(#[from] acme::SetupError),
    #[error("{0}")]
    Runtime(String),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error("metrics endpoint: cannot listen on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// What `cutover serve` adds to [`run`]: an admin socket handed over by
/// an upgrade, a call when the server is ready, and `cutover upgrade`
/// itself (off for servers run in-process, whose executable is not
/// `cutover`).
#[derive(Default)]
pub struct Startup {
    /// An admin socket already listening: used instead of binding
    /// `admin_socket` (an upgrade's predecessor handed it over).
    pub admin: Option<std::os::unix::net::UnixListener>,
    /// Called once, when the server serves.
    pub on_ready: Option<Box<dyn FnOnce() + Send>>,
    /// Whether `cutover upgrade` may start a new process (see `handoff`).
    pub upgradable: bool,
}

/// Serves until `shutdown` completes, then drains: stops accepting, lets
/// in-flight requests finish (bounded by `server.shutdown_timeout`), closes
/// keep-alive connections, and returns.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with(listeners, config, shutdown, Startup::default()).await
}

/// [`run`], with what `cutover serve` adds ([`Startup`]). After a
/// successful `cutover upgrade` it drains and returns as on `shutdown`.
pub async fn run_with(
    mut listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
    startup: Startup,
) -> Result<(), ServerError> {
    if listeners.http.is_none() && listeners.https.is_none() {
        return Err(ServerError::NoListeners);
    }
    let config = Arc::new(config);
    let worker_threads = RuntimeMode::from_env()
        .map_err(ServerError::Runtime)?
        .worker_threads(config.server.workers);
    let acme_certs = AcmeCerts::new();
    let (acceptor, resolver) = match &listeners.https {
        Some(_) => {
            let (acceptor, resolver) = tls_acceptor(&config, &acme_certs)?;
            (Some(acceptor), Some(resolver))
        }
        None => (None, None),
    };
    let https_port = listeners
        .https
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port());
    let metrics = Metrics::new(config.server.metrics.is_some());
    let mut snapshot = Snapshot::build(Arc::clone(&config), None);
    if let Some(tally) = metrics.requests() {
        snapshot = snapshot.counted(Arc::clone(tally));
    }
    let metrics_listener = match config.server.metrics {
        Some(addr) => Some(
            crate::metrics::bind(addr)
                .await
                .map_err(|err| ServerError::Metrics(addr, err))?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        https_port: RedirectPort::new(https_port),
        shutdown: CancellationToken::new(),
        handed_over: AtomicBool::new(false),
        tasks: TaskTracker::new(),
        acme: Arc::clone(&acme_certs),
        workers: WorkerLoad::new(worker_threads),
        metrics: Arc::clone(&metrics),
    });
    let acme = match &config.acme {
        Some(_) => Some(acme::Manager::new(
            &config,
            acme_certs,
            listeners.http.is_some(),
            listeners.https.is_some(),
            shared.shutdown.clone(),
            shared.tasks.clone(),
        )?),
        None => None,
    };
    let state = config.server.state_dir.as_ref().map(StateStore::new);
    let instance = identity::instance_id(&config.server);
    if !instance.is_empty() {
        tracing::info!(
            instance,
            "containers are labelled cutover.instance={instance}"
        );
    }
    let resolver_for_metrics = resolver.clone();
    let controller = Controller::new(Arc::clone(&shared), state, resolver, acme.clone(), instance);
    let upgraded = CancellationToken::new();
    if startup.upgradable && config.source.is_some() {
        // Early: until a handler is installed, SIGUSR2 kills the process.
        upgrade_on_sigusr2(Arc::clone(&controller), upgraded.clone());
    }
    controller.restore().await?;
    controller.reconcile().await;
    let mut admin_socket = None;
    if let Some(path) = &config.server.admin_socket {
        let listener = match (listeners.admin.take(), startup.admin) {
            (Some(listener), _) => listener,
            (None, Some(handed_over)) => handed_over
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(handed_over))
                .map_err(|source| admin::AdminError::Io {
                    path: path.clone(),
                    source,
                })?,
            (None, None) => admin::bind(path, config.server.admin_group.as_deref()).await?,
        };
        if startup.upgradable {
            admin_socket = listener.as_fd().try_clone_to_owned().ok();
        }
        shared.tasks.spawn(admin::serve(
            listener,
            path.clone(),
            Arc::clone(&controller),
            shared.shutdown.clone(),
            shared.tasks.clone(),
        ));
    }
    if config.source.is_some() {
        if let Err(err) = watch::spawn(
            Arc::clone(&controller),
            &config,
            shared.shutdown.clone(),
            &shared.tasks,
        ) {
            tracing::warn!(error = %err, "cannot watch config files; use `cutover reload`");
        }
    }

    let mut server = Server::new(Arc::clone(&shared), config.server.limits.clone());
    // Dropped (threads ended) whenever `run` ends, even if aborted.
    let workers = match worker_threads {
        0 => None,
        count => Some(Workers::start(count, &server).map_err(ServerError::Workers)?),
    };
    if let Some(workers) = &workers {
        server = server.dispatching_to(workers);
    }
    let live = Arc::new(LiveListeners::new(server, acceptor, Arc::clone(&shared)));
    if let Some(listener) = listeners.http {
        live.start(Kind::Http, config.server.http, listener);
    }
    if let Some(listener) = listeners.https {
        live.start(Kind::Https, config.server.https, listener);
    }
    controller.set_listening(Arc::clone(&live) as _);
    let upgrader = match (&config.source, startup.upgradable) {
        (Some(source), true) => {
            let upgrader = Arc::new(Upgrader::new(
                Arc::clone(&live),
                admin_socket,
                source.clone(),
                upgraded.clone(),
            ));
            controller.set_upgrader(Arc::clone(&upgrader) as _);
            Some(upgrader)
        }
        _ => None,
    };
    if let Some(acme) = &acme {
        acme.start(&config);
    }
    if let (Some(addr), Some(listener)) = (config.server.metrics, metrics_listener) {
        let certificates = certificate_expiries(acme.clone(), resolver_for_metrics);
        let scrape = crate::metrics::endpoint::scrape(
            &metrics,
            Arc::clone(&shared) as _,
            Some(certificates),
        );
        shared.tasks.spawn(crate::metrics::serve(
            addr,
            listener,
            scrape,
            shared.shutdown.clone(),
            shared.tasks.clone(),
        ));
    }
    crate::sd_notify::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    if let Some(on_ready) = startup.on_ready {
        on_ready();
    }

    tokio::select! {
        () = shutdown => {}
        () = upgraded.cancelled() => {}
    }
    // The sockets close with their accept loops, as without an upgrader.
    live.release();
    if let Some(upgrader) = &upgrader {
        upgrader.release();
    }
    if upgraded.is_cancelled() {
        shared.handed_over.store(true, Ordering::Relaxed);
        // The new process is the service now (it sent READY=1 and its
        // MAINPID): a STOPPING=1 from here would stop the unit.
        tracing::info!("handed over to the new process: draining in-flight requests");
    } else {
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        crate::sd_notify::notify("STOPPING=1");
    }
    shared.shutdown.cancel();
    shared.tasks.close();
    let deadline = config.server.shutdown_timeout;
    if tokio::time::timeout(deadline, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?deadline,
            "shutdown deadline passed; closing remaining connections"
        );
    }
    if let Some(workers) = workers {
        workers.stop().await;
    }
    Ok(())
}

/// `kill -USR2` does what `cutover upgrade` (without `--binary`) does:
/// the executable at this server's path takes over. The outcome goes to
/// the log only; a failed upgrade leaves this process serving.
fn upgrade_on_sigusr2(controller: Arc<Controller>, upgraded: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = match signal(SignalKind::user_defined2()) {
        Ok(usr2) => usr2,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGUSR2; use `cutover upgrade`");
            return;
        }
    };
    let shutdown = controller.shutdown_token();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = usr2.recv() => {}
                () = shutdown.cancelled() => return,
                () = upgraded.cancelled() => return,
            }
            tracing::info!("SIGUSR2: handing over to a new process");
            if let Err(err) = controller.upgrade(None, &Progress::log_only()).await {
                tracing::error!(error = %err, "upgrade on SIGUSR2 failed");
            }
        }
    });
}

/// The certificates' names and expiry for the metrics endpoint: the
/// automatic ones, then the `[[tls]]` files (each by its first name).
fn certificate_expiries(
    acme: Option<Arc<acme::Manager>>,
    resolver: Option<Arc<SniResolver>>,
) -> crate::metrics::export::CertExpiries {
    Box::new(move || {
        let mut certificates = acme.as_ref().map(|a| a.status()).unwrap_or_default();
        if let Some(resolver) = &resolver {
            certificates.extend(
                resolver
                    .describe_static()
                    .iter()
                    .map(acme::CertStatus::of_file),
            );
        }
        certificates
            .into_iter()
            .filter_map(|c| Some((c.name, c.not_after?)))
            .collect()
    })
}

fn tls_acceptor(
    config: &Config,
    acme_certs: &Arc<AcmeCerts>,
) -> Result<(TlsAcceptor, Arc<SniResolver>), ServerError> {
    let store = CertStore::load(&config.tls).map_err(|errors| {
        ServerError::Certificates(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })?;
    if store.is_empty() && config.acme.is_none() {
        return Err(ServerError::NoCertificates);
    }
    let resolver = SniResolver::new(store, Arc::clone(acme_certs));
    let acceptor = TlsAcceptor::from(tls::server_config(Arc::clone(&resolver))?);
    Ok((acceptor, resolver))
}
