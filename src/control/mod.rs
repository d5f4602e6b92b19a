//! The control plane: the controller, the one writer of the routing
//! snapshot, with deploys, health probes, the state file and the config
//! watcher beside it.
//!
//! May import: `routing`, `metrics`, `upstream`, `acme`, `docker`, `tls`, `config`,
//! `errors`, `sd_notify`.
//! Never the data plane (`proxy`): the two meet only in `routing`.
//!
//! Three types, each with one job:
//!
//! * [`Controller`] (this file): the entry point every admin command and
//!   the config watcher call: switch, pause, resume, reload, status,
//!   upgrade, renew; deploys and rollbacks are handed to the deployer.
//! * [`Writer`](writer::Writer): the single writer of the snapshot and the
//!   state file. Changes are serialized by one async mutex, so a new
//!   snapshot is always derived from the latest one and no compare-and-swap
//!   loop is needed; operations on one service are exclusive (busy
//!   claims), so a second switch or deploy of a busy service is refused
//!   with a clear message instead of racing the first.
//! * [`Deployer`](deploy::Deployer): the deploy state machine, owning the
//!   container engine handle and the deploy records.
//!
//! A switch is: health-check the new upstream, persist the decision, store
//! the new snapshot (the atomic cutover: new requests go to the new upstream
//! from this instant), then drain the old upstream: wait for its in-flight
//! requests, give its WebSocket tunnels a grace period, and close them
//! (`cutover.rs`, the step deploys and rollbacks share).

pub mod color;
mod cutover;
mod deploy;
pub mod health;
pub mod identity;
pub mod listening;
pub mod report;
pub mod state;
pub mod upgrade;
pub mod watch;
mod writer;

pub use deploy::{parse_share, ImageChoice};
pub use writer::Activation;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::acme::{self, CertStatus};
use crate::config::{Config, Service};
use crate::docker::DockerError;
use crate::metrics::{Metrics, Operation};
use crate::routing::{Canary, PauseGate, ServiceSlot, Shared, Snapshot};
use crate::tls::{CertStore, SniResolver};
use crate::upstream::Upstream;
use color::Color;
use deploy::{Deployer, Records};
use health::ProbeError;
use listening::{ListenChange, Listening};
use report::{
    ActiveStatus, CanaryStatus, DrainReport, ErrorKind, PauseReport, PreviousStatus, ReloadReport,
    RenewReport, ServiceStatus, StatusReport, SwitchReport, UpgradeReport,
};
use state::{now_unix, StateError, StateStore};
use upgrade::Upgrade;
use writer::Writer;

/// One progress line of a running operation, streamed to the admin client.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// Machine-readable step name ("health", "switched", "drain", ...).
    pub step: String,
    /// Human-readable line.
    pub message: String,
}

/// Where an operation sends its progress. Sending never fails the
/// operation: a client that went away must not abort a half-done switch.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    sink: Option<UnboundedSender<Event>>,
}

impl Progress {
    pub fn new(sink: UnboundedSender<Event>) -> Progress {
        Progress { sink: Some(sink) }
    }

    /// Progress that goes only to the log (reloads from the file watcher).
    pub fn log_only() -> Progress {
        Progress { sink: None }
    }

    pub fn emit(&self, step: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(step, "{message}");
        if let Some(sink) = &self.sink {
            let _ = sink.send(Event {
                step: step.to_string(),
                message,
            });
        }
    }
}

/// Why an operation was refused or failed. Every variant leaves the
/// routing exactly as it was.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("service {0:?} is busy: a deploy, rollback or switch of it is already running; try again when it ends")]
    Busy(String),
    #[error("{addr} is not healthy: {reason}; traffic was not switched")]
    Unhealthy {
        addr: SocketAddr,
        reason: ProbeError,
    },
    #[error("service {0:?} is already paused")]
    AlreadyPaused(String),
    #[error("service {0:?} is not paused")]
    NotPaused(String),
    #[error("config rejected, old config keeps serving:\n{0}")]
    Config(String),
    #[error("this server was not started from a config file; nothing to reload")]
    NoConfigFile,
    #[error("state file: {0}; nothing was changed")]
    State(#[from] StateError),
    #[error("service {0:?} has no `image`: it is a static upstream; use `switch` instead")]
    NotAContainerService(String),
    #[error("docker: {0}")]
    Docker(#[from] DockerError),
    #[error("deploy failed: {reason}; {old}; {cleanup}\n--- last log lines of the new container ---\n{logs}")]
    DeployFailed {
        reason: String,
        old: String,
        cleanup: String,
        logs: String,
    },
    /// The operation was tried and failed.
    #[error("{0}")]
    Failed(String),
    /// The new colour broke its bake thresholds; traffic went back.
    #[error("{0}")]
    BakeFailed(String),
    /// The request cannot be done as asked (nothing to roll back to, no
    /// automatic certificate to renew, a malformed argument).
    #[error("{0}")]
    Refused(String),
}

impl ControlError {
    /// Which kind of failure this is, for the admin reply and the CLI's
    /// exit code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::Busy(_) => ErrorKind::Busy,
            ControlError::UnknownService(_)
            | ControlError::AlreadyPaused(_)
            | ControlError::NotPaused(_)
            | ControlError::Config(_)
            | ControlError::NoConfigFile
            | ControlError::NotAContainerService(_)
            | ControlError::Refused(_) => ErrorKind::Refused,
            ControlError::Unhealthy { .. }
            | ControlError::State(_)
            | ControlError::Docker(_)
            | ControlError::DeployFailed { .. }
            | ControlError::BakeFailed(_)
            | ControlError::Failed(_) => ErrorKind::Failed,
        }
    }
}

/// The control plane's entry point: every admin command and the config
/// watcher call it. Snapshot writes go through its [`Writer`]; deploys,
/// rollbacks and reconciliation through its [`Deployer`].
pub struct Controller {
    writer: Arc<Writer>,
    deployer: Arc<Deployer>,
    tls: Option<Arc<SniResolver>>,
    /// Automatic certificates, when some site has `tls = "acme"`.
    acme: Option<Arc<acme::Manager>>,
    /// The listening sockets, for reloads that move them; set once they
    /// serve (see [`Controller::set_listening`]).
    listening: std::sync::OnceLock<Arc<dyn Listening>>,
    /// The hand-off to a new process, for `cutover upgrade`.
    upgrader: std::sync::OnceLock<Arc<dyn Upgrade>>,
    /// One reload at a time (the watcher and `cutover reload` can race):
    /// each compares against the config the previous one published.
    reloading: tokio::sync::Mutex<()>,
}

impl Controller {
    pub fn new(
        shared: Arc<Shared>,
        state: Option<StateStore>,
        tls: Option<Arc<SniResolver>>,
        acme: Option<Arc<acme::Manager>>,
        instance: String,
    ) -> Arc<Controller> {
        Controller::with_engine(shared, state, tls, acme, deploy::docker(), instance)
    }

    /// A controller whose deployer reaches its container engine through
    /// `connect` (the unit tests' fake engine).
    pub(crate) fn with_engine(
        shared: Arc<Shared>,
        state: Option<StateStore>,
        tls: Option<Arc<SniResolver>>,
        acme: Option<Arc<acme::Manager>>,
        connect: deploy::Connect,
        instance: String,
    ) -> Arc<Controller> {
        let records = Arc::new(Records::default());
        let writer = Arc::new(Writer::new(shared, state, Arc::clone(&records)));
        let deployer = Deployer::new(Arc::clone(&writer), records, connect, instance);
        Arc::new(Controller {
            writer,
            deployer,
            tls,
            acme,
            listening: std::sync::OnceLock::new(),
            upgrader: std::sync::OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Lets reloads move the listeners; until this is called (and in
    /// servers that never call it) a changed address waits for a restart.
    pub fn set_listening(&self, listening: Arc<dyn Listening>) {
        if self.listening.set(listening).is_err() {
            tracing::warn!("listeners were already set; keeping the first");
        }
    }

    /// Cancelled when the server shuts down.
    pub(crate) fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.writer.shutdown_token()
    }

    /// Deploys `choice` to `service` (see [`Deployer`]); Ok only when
    /// traffic switched to it.
    /// With `canary` (basis points, see [`parse_share`]) the new colour
    /// takes that share of the clients and the old one stays active.
    pub async fn deploy(
        &self,
        service: &str,
        choice: ImageChoice,
        canary: Option<u32>,
        docker_config: Option<std::path::PathBuf>,
        progress: &Progress,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<report::DeployReport, ControlError> {
        let started = Instant::now();
        let result = self
            .deployer
            .deploy(service, choice, canary, docker_config, progress, cancel)
            .await;
        self.measure(Operation::Deploy, service, started, result)
    }

    /// Switches everything to the service's canary, then bakes it.
    pub async fn promote(
        &self,
        service: &str,
        progress: &Progress,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<report::PromoteReport, ControlError> {
        self.deployer.promote(service, progress, cancel).await
    }

    /// Ends the service's canary: every client back on the active colour.
    pub async fn abort(
        &self,
        service: &str,
        progress: &Progress,
    ) -> Result<report::AbortReport, ControlError> {
        self.deployer.abort(service, progress).await
    }

    /// Back to the warm previous colour, or the previous image.
    pub async fn rollback(
        &self,
        service: &str,
        docker_config: Option<std::path::PathBuf>,
        progress: &Progress,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<report::RollbackReport, ControlError> {
        let started = Instant::now();
        let result = self
            .deployer
            .rollback(service, docker_config, progress, cancel)
            .await;
        self.measure(Operation::Rollback, service, started, result)
    }

    /// Records an operation's outcome and duration for the metrics
    /// endpoint, and hands its result on. A refusal before any work (the
    /// service busy or unknown) is an outcome too: `refused`; a deploy
    /// whose bake window broke and was rolled back is `rolled_back`.
    fn measure<T>(
        &self,
        operation: Operation,
        service: &str,
        started: Instant,
        result: Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ControlError::Busy(_) | ControlError::UnknownService(_)) => "refused",
            Err(ControlError::BakeFailed(_)) => "rolled_back",
            Err(_) => "failed",
        };
        self.writer
            .shared()
            .metrics
            .operation(operation, service, outcome, started.elapsed());
        result
    }

    /// Start-up reconciliation of the container services with the engine,
    /// then the bake windows the restart cut short are resumed.
    pub async fn reconcile(&self) {
        self.deployer.reconcile().await;
        self.deployer.resume_bakes();
    }

    /// Applies the state file at start-up: each service it names resumes
    /// the colour and address it had before the restart.
    pub async fn restore(&self) -> Result<(), StateError> {
        let Some(store) = self.writer.store() else {
            return Ok(());
        };
        let state = store.load()?;
        let _writer = self.writer.lock().await;
        let mut snapshot = Snapshot::clone(&self.writer.shared().snapshot.load());
        self.deployer.restore(&state);
        for (name, saved) in state.services {
            let Some(slot) = snapshot.services.get_mut(&name) else {
                tracing::warn!(service = %name, "state file names a service the config no longer has; ignored");
                continue;
            };
            let limits = &snapshot.config.server.limits;
            slot.active = Some(match saved.container.clone() {
                Some(container) => {
                    Upstream::for_container(saved.addr, saved.color.clone(), container, limits)
                }
                None => Upstream::new(saved.addr, saved.color.clone(), limits),
            });
            slot.pinned = true;
            tracing::info!(service = %name, color = %saved.color, upstream.addr = %saved.addr, "restored active upstream from state file");
            slot.canary = match (&saved.canary, &slot.active) {
                (Some(canary), Some(active)) => {
                    let upstream = match canary.container.clone() {
                        Some(container) => Upstream::for_container(
                            canary.addr,
                            canary.color.clone(),
                            container,
                            limits,
                        ),
                        None => Upstream::new(canary.addr, canary.color.clone(), limits),
                    };
                    tracing::info!(service = %name, color = %canary.color, share_bp = canary.share_bp, "restored the canary split from state file");
                    Some(Canary::new(&name, active, upstream, canary.share_bp))
                }
                _ => None,
            };
        }
        self.writer.publish(snapshot);
        Ok(())
    }

    /// Moves `service` to the upstream at `to`: health check (unless
    /// `force`), persist, swap, drain. Returns a summary for the caller.
    pub async fn switch(
        self: &Arc<Self>,
        service: &str,
        to: SocketAddr,
        force: bool,
        progress: &Progress,
    ) -> Result<SwitchReport, ControlError> {
        let started = Instant::now();
        let result = self.switch_now(service, to, force, progress).await;
        self.measure(Operation::Switch, service, started, result)
    }

    async fn switch_now(
        self: &Arc<Self>,
        service: &str,
        to: SocketAddr,
        force: bool,
        progress: &Progress,
    ) -> Result<SwitchReport, ControlError> {
        let _busy = self.writer.claim(service)?;
        if let Some(canary) = self.writer.canary(service) {
            return Err(ControlError::Refused(format!(
                "{service} has a canary running ({}): `promote` or `abort` it first",
                canary.upstream.label
            )));
        }
        self.deployer.end_bake(service);
        let (config, settings) = self.writer.service_config(service)?;
        let color = next_color(self.active(service).as_deref());
        let target = cutover::Target {
            service,
            upstream: Upstream::new(to, color, &config.server.limits),
            settings: &settings,
            gate: if force {
                cutover::Gate::Skipped
            } else {
                cutover::Gate::Probe
            },
            record: None,
        };
        let announce = |activation: &Activation| {
            format!(
                "switched {service} to {color} ({to}){}",
                activation
                    .old
                    .as_ref()
                    .map(|o| format!(", was {} ({})", o.label, o.addr))
                    .unwrap_or_default()
            )
        };
        let handover = self.deployer.cut_over(target, progress, announce).await?;
        Ok(SwitchReport {
            service: service.to_string(),
            color: color.to_string(),
            upstream: to.to_string(),
            timings: handover.activation.timings(),
            drain: handover.drain,
        })
    }

    /// The service's active upstream right now.
    pub fn active(&self, service: &str) -> Option<Arc<Upstream>> {
        self.writer.active(service)
    }

    /// Persists and then publishes `upstream` as the service's active one
    /// (see [`Writer::activate`]).
    pub async fn activate(
        &self,
        service: &str,
        upstream: Arc<Upstream>,
    ) -> Result<Activation, ControlError> {
        self.writer.activate(service, upstream).await
    }

    /// Holds new requests for `service` until [`resume`](Self::resume)
    /// (or each request's `pause_timeout`, then 503).
    pub async fn pause(&self, service: &str) -> Result<PauseReport, ControlError> {
        let _writer = self.writer.lock().await;
        let (current, slot) = self.writer.current_slot(service)?;
        if slot.pause.is_some() {
            return Err(ControlError::AlreadyPaused(service.to_string()));
        }
        let next = current.with_slot(
            service,
            ServiceSlot {
                pause: Some(Arc::new(PauseGate::default())),
                ..slot
            },
        );
        self.writer.publish(next);
        tracing::info!(service, "paused");
        Ok(PauseReport {
            service: service.to_string(),
            paused: true,
        })
    }

    /// Releases every request held by [`pause`](Self::pause).
    pub async fn resume(&self, service: &str) -> Result<PauseReport, ControlError> {
        let _writer = self.writer.lock().await;
        let (current, slot) = self.writer.current_slot(service)?;
        let Some(gate) = slot.pause.clone() else {
            return Err(ControlError::NotPaused(service.to_string()));
        };
        let next = current.with_slot(
            service,
            ServiceSlot {
                pause: None,
                ..slot
            },
        );
        // Publish the unpaused snapshot first, so released requests that
        // reload it find the service open.
        self.writer.publish(next);
        gate.release();
        tracing::info!(service, "resumed");
        Ok(PauseReport {
            service: service.to_string(),
            paused: false,
        })
    }

    /// Re-reads the config file (and certificates). An invalid file or
    /// certificate changes nothing and the error names file:line.
    pub async fn reload(&self, progress: &Progress) -> Result<ReloadReport, ControlError> {
        // systemd shows the unit as reloading until READY=1 comes back,
        // which it does whether or not the new config was taken.
        let _one_at_a_time = self.reloading.lock().await;
        crate::sd_notify::notify("RELOADING=1");
        let result = self.reload_config(progress).await;
        crate::sd_notify::notify("READY=1");
        result
    }

    async fn reload_config(&self, progress: &Progress) -> Result<ReloadReport, ControlError> {
        let current = self.writer.shared().snapshot.load_full();
        let path = current
            .config
            .source
            .clone()
            .ok_or(ControlError::NoConfigFile)?;
        let config = Config::load(&path).map_err(|err| {
            tracing::error!("reload rejected, old config keeps serving:\n{err}");
            ControlError::Config(err.to_string())
        })?;
        let certs = match &self.tls {
            Some(_) => Some(load_certs(&config)?),
            None => None,
        };
        warn_on_restart_only_changes(&current.config, &config);
        let listen_change = self.prepare_listeners(&current.config, &config)?;
        self.reconfigure_acme(&config)?;
        let _writer = self.writer.lock().await;
        let latest = self.writer.shared().snapshot.load_full();
        let next = Snapshot::build(Arc::new(config), Some(&latest));
        self.writer.persist(&next).await?;
        self.writer.publish(next);
        if let (Some(resolver), Some(certs)) = (&self.tls, certs) {
            resolver.replace(certs);
        }
        for change in listen_change
            .map(|change| change.commit())
            .unwrap_or_default()
        {
            progress.emit("listen", change);
        }
        progress.emit("reloaded", format!("reloaded {}", path.display()));
        Ok(ReloadReport {
            config: path.display().to_string(),
        })
    }

    /// Lets `cutover upgrade` hand this process's sockets to a new one.
    pub fn set_upgrader(&self, upgrader: Arc<dyn Upgrade>) {
        if self.upgrader.set(upgrader).is_err() {
            tracing::warn!("upgrader was already set; keeping the first");
        }
    }

    /// Hands the sockets to a new process (see [`upgrade`]). Refused while
    /// a deploy, rollback or switch runs; while it runs, those and reloads
    /// wait or are refused, so the new process starts from the state file
    /// as it stands.
    pub async fn upgrade(
        &self,
        binary: Option<std::path::PathBuf>,
        progress: &Progress,
    ) -> Result<UpgradeReport, ControlError> {
        let upgrader = self.upgrader.get().ok_or_else(|| {
            ControlError::Failed(
                "this server cannot hand over: it was not started by `cutover serve`".into(),
            )
        })?;
        let _no_reloads = self.reloading.lock().await;
        let names: Vec<String> = self.current_config().services.keys().cloned().collect();
        // A running deploy, rollback or switch makes this busy (exit 3).
        let _claims = names
            .iter()
            .map(|name| self.writer.claim(name))
            .collect::<Result<Vec<_>, _>>()?;
        upgrader
            .upgrade(binary, progress)
            .await
            .map_err(ControlError::Failed)
    }

    /// Binds the listener addresses a reloaded config changes (see
    /// [`listening`]); a bind failure rejects the reload.
    fn prepare_listeners(
        &self,
        old: &Config,
        new: &Config,
    ) -> Result<Option<Box<dyn ListenChange>>, ControlError> {
        if old.server.http == new.server.http && old.server.https == new.server.https {
            return Ok(None);
        }
        let Some(listening) = self.listening.get() else {
            tracing::warn!("listener addresses changed; they take effect on restart");
            return Ok(None);
        };
        listening
            .prepare(new.server.http, new.server.https)
            .map(Some)
            .map_err(|err| {
                tracing::error!("reload rejected, old listeners keep serving: {err}");
                ControlError::Config(format!("{err}; the old listeners keep serving"))
            })
    }

    /// Follows a reloaded config's automatic names and `[acme]` settings.
    fn reconfigure_acme(&self, config: &Config) -> Result<(), ControlError> {
        match &self.acme {
            Some(acme) => acme
                .reconfigure(config)
                .map_err(|err| ControlError::Config(err.to_string())),
            None => {
                if config.acme.is_some() {
                    tracing::warn!("tls = \"acme\" was added; automatic certificates start on the next restart");
                }
                Ok(())
            }
        }
    }

    /// Orders a new certificate for an automatic name now (`cutover renew`).
    pub async fn renew(
        &self,
        name: &str,
        progress: &Progress,
    ) -> Result<RenewReport, ControlError> {
        let acme = self.acme.as_ref().ok_or_else(|| {
            ControlError::Refused("no site has tls = \"acme\": there is nothing to renew".into())
        })?;
        let status = acme
            .renew(name, || {
                progress.emit("renew", format!("ordering a new certificate for {name}"))
            })
            .await
            .map_err(ControlError::Failed)?;
        progress.emit(
            "renewed",
            format!(
                "{name}: new certificate from {}",
                status.issuer.as_deref().unwrap_or("-")
            ),
        );
        Ok(RenewReport {
            certificate: status,
        })
    }

    /// Every certificate: the automatic ones, then the `[[tls]]` files.
    fn certificates(&self) -> Vec<CertStatus> {
        let mut certificates = self
            .acme
            .as_ref()
            .map(|acme| acme.status())
            .unwrap_or_default();
        if let Some(resolver) = &self.tls {
            certificates.extend(resolver.describe_static().iter().map(CertStatus::of_file));
        }
        certificates
    }

    /// The config currently serving.
    pub fn current_config(&self) -> Arc<Config> {
        self.writer.current_config()
    }

    /// Per-service facts for `cutover status`, with one live health probe
    /// of each active upstream (so "health" is now, not remembered).
    pub async fn status(&self, only: Option<&str>) -> Result<StatusReport, ControlError> {
        let saved = match self.writer.store() {
            Some(store) => store.read().await.ok(),
            None => None,
        };
        let since = saved
            .map(|state| {
                state
                    .services
                    .into_iter()
                    .map(|(name, s)| (name, s.since))
                    .collect()
            })
            .unwrap_or_default();
        let mut report = self.status_facts(only, &since)?;
        let snapshot = self.writer.shared().snapshot.load_full();
        let probes = snapshot
            .config
            .services
            .values()
            .filter(|service| only.is_none_or(|only| only == service.name))
            .filter_map(|service| {
                let upstream = snapshot.service(&service.name)?.active.clone()?;
                let check = service.health.clone();
                Some(async move {
                    let health = match health::probe(upstream.addr, &check).await {
                        Ok(()) => "healthy".to_string(),
                        Err(err) => format!("unhealthy: {err}"),
                    };
                    (service.name.clone(), health)
                })
            });
        for (name, health) in futures_util::future::join_all(probes).await {
            if let Some(active) = report
                .services
                .get_mut(&name)
                .and_then(|service| service.active.as_mut())
            {
                active.health = Some(health);
            }
        }
        Ok(report)
    }

    /// `since`: per service, when its active upstream became active (from
    /// the state file).
    fn status_facts(
        &self,
        only: Option<&str>,
        since: &HashMap<String, u64>,
    ) -> Result<StatusReport, ControlError> {
        let snapshot = self.writer.shared().snapshot.load_full();
        if let Some(name) = only {
            if snapshot.service(name).is_none() {
                return Err(ControlError::UnknownService(name.to_string()));
            }
        }
        let busy = self.writer.busy();
        let mut services = std::collections::BTreeMap::new();
        for name in snapshot.config.services.keys() {
            if only.is_some_and(|only| only != name) {
                continue;
            }
            let Some(slot) = snapshot.service(name) else {
                continue;
            };
            let active = slot.active.as_ref().map(|upstream| ActiveStatus {
                color: upstream.label.clone(),
                upstream: upstream.addr.to_string(),
                in_flight: upstream.in_flight(),
                websockets: upstream.tunnels(),
                container: upstream.container.as_ref().map(|c| c.id.clone()),
                image: upstream.container.as_ref().map(|c| c.image.clone()),
                since: since.get(name).copied(),
                active_for_s: since
                    .get(name)
                    .map(|since| now_unix().saturating_sub(*since)),
                health: None,
                requests: upstream.stats().snapshot().requests(),
                errors: upstream.stats().snapshot().server_errors(),
            });
            let canary = slot.canary.as_ref().map(|canary| {
                let upstream = &canary.upstream;
                let figures = upstream.stats().snapshot();
                CanaryStatus {
                    color: upstream.label.clone(),
                    upstream: upstream.addr.to_string(),
                    container: upstream.container.as_ref().map(|c| c.id.clone()),
                    image: upstream.container.as_ref().map(|c| c.image.clone()),
                    share_bp: canary.share_bp,
                    requests: figures.requests(),
                    errors: figures.server_errors(),
                    in_flight: upstream.in_flight(),
                }
            });
            let record = self.deployer.record(name);
            let now = now_unix();
            let previous = record.previous.as_ref().map(|previous| PreviousStatus {
                color: previous.color.clone(),
                upstream: previous.addr.to_string(),
                container: previous.container.as_ref().map(|c| c.id.clone()),
                image: previous.container.as_ref().map(|c| c.image.clone()),
                warm_for_s: previous.retire_at.saturating_sub(now),
            });
            let managed = snapshot
                .config
                .services
                .get(name)
                .is_some_and(|s| s.container.is_some());
            services.insert(
                name.clone(),
                ServiceStatus {
                    active,
                    previous,
                    last_deploy: record.last_deploy,
                    starting: record.starting,
                    paused: slot.pause.is_some(),
                    pinned: slot.pinned,
                    busy: busy.contains(name),
                    managed,
                    canary,
                    bake: self.deployer.last_bake(name),
                },
            );
        }
        let docker = self.deployer.engine_status();
        Ok(StatusReport {
            services,
            docker,
            certificates: only.is_none().then(|| self.certificates()),
            workers: if only.is_none() {
                self.writer.shared().workers.report()
            } else {
                Vec::new()
            },
            parking: self.writer.shared().workers.parking(),
        })
    }
}

fn load_certs(config: &Config) -> Result<CertStore, ControlError> {
    CertStore::load(&config.tls).map_err(|errors| {
        let text = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        tracing::error!("reload rejected, old certificates keep serving:\n{text}");
        ControlError::Config(text)
    })
}

fn warn_on_restart_only_changes(old: &Config, new: &Config) {
    let admin_changed = old.server.admin_socket != new.server.admin_socket
        || old.server.admin_group != new.server.admin_group;
    if admin_changed {
        tracing::warn!("admin socket or group changed; they take effect on restart");
    }
    if old.server.state_dir != new.server.state_dir || old.server.instance != new.server.instance {
        tracing::warn!("state_dir or instance changed; they take effect on restart");
    }
    if old.server.metrics != new.server.metrics {
        tracing::warn!("the metrics address changed; it takes effect on restart");
    }
}

/// The colour a new upstream gets: the other one (see [`Color::after`]).
pub(crate) fn next_color(current: Option<&Upstream>) -> &'static str {
    Color::after(current.map(|u| u.label.as_str())).as_str()
}

pub(crate) async fn check_health(
    addr: SocketAddr,
    settings: &Service,
    progress: &Progress,
    metrics: &Metrics,
) -> Result<(), ControlError> {
    let check = &settings.health;
    progress.emit(
        "health",
        format!(
            "checking http://{addr}{} (needs {} consecutive)",
            check.path, check.healthy_after
        ),
    );
    // One line per success, but a repeated failure only every tenth
    // attempt: CI logs stay readable through a slow start.
    let mut last_failure = String::new();
    health::wait_healthy(addr, check, |report| {
        metrics.health_check(&settings.name, report.result.is_ok());
        let outcome = match &report.result {
            Ok(()) => "ok".to_string(),
            Err(err) => err.to_string(),
        };
        let repeated = report.result.is_err() && outcome == last_failure;
        if report.result.is_err() {
            last_failure.clone_from(&outcome);
        }
        if !repeated || report.attempt % 10 == 0 {
            progress.emit(
                "health",
                format!(
                    "health {}/{} (attempt {}): {outcome}",
                    report.consecutive_ok, report.needed, report.attempt
                ),
            );
        }
    })
    .await
    .map_err(|reason| ControlError::Unhealthy { addr, reason })
}

/// Waits for the old upstream's requests, then its tunnels; reports what
/// happened. Requests still running at the drain timeout are left to
/// finish on the old upstream (cutover never cuts a request itself); the
/// old upstream's connections are no longer pooled, so each closes when
/// its request ends.
pub async fn drain(old: &Arc<Upstream>, settings: &Service, progress: &Progress) -> DrainReport {
    let started = Instant::now();
    let deadline = started + settings.drain_timeout;
    let mut drained = old.in_flight() == 0;
    while !drained {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        progress.emit(
            "drain",
            format!(
                "draining {} ({}): {} in flight",
                old.label,
                old.addr,
                old.in_flight()
            ),
        );
        let step = (deadline - now).min(Duration::from_secs(1));
        drained = old.wait_requests_done(step).await;
    }
    let drain_ms = started.elapsed().as_millis() as u64;
    let left = old.in_flight();
    if drained {
        progress.emit("drained", format!("drained {} in {drain_ms} ms", old.label));
    } else {
        progress.emit(
            "drain",
            format!(
                "drain timeout ({:?}) with {left} request(s) still running on {}; they finish there",
                settings.drain_timeout, old.label
            ),
        );
    }
    let tunnels = old.tunnels();
    if tunnels > 0 {
        progress.emit(
            "websockets",
            format!(
                "{tunnels} WebSocket(s) on {}: grace {:?} before closing",
                old.label, settings.websocket_grace
            ),
        );
        if !old.wait_tunnels_closed(settings.websocket_grace).await {
            let open = old.tunnels();
            old.close_tunnels();
            progress.emit(
                "websockets",
                format!("closed {open} WebSocket(s) after the grace period"),
            );
        }
    }
    DrainReport {
        drained,
        drain_ms,
        still_in_flight: left,
        websockets_at_switch: tunnels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arc_swap::ArcSwap;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// A state write (temp file, fsync, rename, fsync) must not hold the
    /// runtime: with `workers = 1` every connection would wait for it. The
    /// write is held up here as a slow disk would hold it (another thread
    /// owns the store's write lock, and lets go only once a task on the
    /// runtime has run); the swap must still wait for the write.
    #[test]
    fn state_write_does_not_stall_the_runtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "[service.web]\nupstream = \"127.0.0.1:9000\"\n";
        let config = Arc::new(Config::parse(text, "proxy.toml", dir.path()).expect("config"));
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(Arc::clone(&config), None)),
            https_port: crate::routing::RedirectPort::new(None),
            shutdown: CancellationToken::new(),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            tasks: TaskTracker::new(),
            acme: crate::tls::acme::AcmeCerts::new(),
            workers: crate::routing::WorkerLoad::new(0),
            access_log: crate::access_log::Sink::new(),
            metrics: crate::metrics::Metrics::new(false),
        });
        let store = StateStore::new(dir.path());
        let write_lock = store.write_lock();
        let controller = Controller::new(shared, Some(store.clone()), None, None, String::new());

        let (held, is_held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let disk = std::thread::spawn(move || {
            let _slow_disk = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let _ = held.send(());
            // The bound only matters when the runtime is stuck.
            released.recv_timeout(Duration::from_secs(10)).is_ok()
        });
        is_held.recv().expect("lock held");

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let green: SocketAddr = "127.0.0.1:9001".parse().expect("addr");
        let upstream = Upstream::new(green, "green", &config.server.limits);
        let (activation, during_write) = runtime.block_on(async {
            let another_task = async {
                tokio::task::yield_now().await;
                let active = controller.active("web").map(|u| u.addr);
                let _ = release.send(());
                active
            };
            tokio::join!(controller.activate("web", upstream), another_task)
        });
        assert!(
            disk.join().expect("disk thread"),
            "no other task ran while the state file was being written"
        );
        activation.expect("activate");
        assert_eq!(
            during_write,
            Some("127.0.0.1:9000".parse().expect("addr")),
            "the swap waits for the write"
        );
        assert_eq!(controller.active("web").map(|u| u.addr), Some(green));
        let saved = store.load().expect("state file");
        assert_eq!(saved.services["web"].addr, green);
    }

    /// A service `web` with the given extra settings, and an upstream for it.
    fn drain_fixture(extra: &str) -> (Service, Arc<Upstream>) {
        let text = format!("[service.web]\nupstream = \"127.0.0.1:9000\"\n{extra}\n");
        let dir = std::env::temp_dir();
        let config = Config::parse(&text, "proxy.toml", &dir).expect("config");
        let settings = config.services["web"].clone();
        let addr = "127.0.0.1:9000".parse().expect("addr");
        let old = Upstream::new(addr, "blue", &config.server.limits);
        (settings, old)
    }

    /// The messages a drain emitted for `step`.
    fn steps(events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>, step: &str) -> usize {
        let mut count = 0;
        while let Ok(event) = events.try_recv() {
            count += usize::from(event.step == step);
        }
        count
    }

    /// A request that outlives the drain timeout is left running, and the
    /// drain gives up at exactly the timeout (tokio's clock, paused: no
    /// wall-clock wait, no margin).
    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_the_drain_timeout() {
        let (settings, old) = drain_fixture("drain_timeout = \"30s\"");
        let request = old.begin_request();
        let (sink, mut events) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        let report = drain(&old, &settings, &Progress::new(sink)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(
            report,
            DrainReport {
                drained: false,
                drain_ms: 30_000,
                still_in_flight: 1,
                websockets_at_switch: 0,
            }
        );
        // One "draining" line a second, then the timeout line.
        assert_eq!(steps(&mut events, "drain"), 31);
        drop(request);
    }

    /// A drain ends the moment the last request does, not at a poll tick.
    #[tokio::test(start_paused = true)]
    async fn drain_ends_when_the_last_request_ends() {
        let (settings, old) = drain_fixture("drain_timeout = \"30s\"");
        let request = old.begin_request();
        let started = Instant::now();
        let finish = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            drop(request);
        });
        let report = drain(&old, &settings, &Progress::log_only()).await;
        assert_eq!(started.elapsed(), Duration::from_millis(2_500));
        assert!(report.drained, "{report:?}");
        assert_eq!((report.drain_ms, report.still_in_flight), (2_500, 0));
        finish.await.expect("request task");
    }

    /// WebSockets still open after the drain get `websocket_grace`, then
    /// are closed.
    #[tokio::test(start_paused = true)]
    async fn drain_closes_websockets_after_the_grace() {
        let (settings, old) = drain_fixture("websocket_grace = \"10s\"");
        let tunnel = old.begin_tunnel();
        let closed = old.tunnel_token();
        let started = Instant::now();
        let report = drain(&old, &settings, &Progress::log_only()).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(report.drained, "no request was in flight: {report:?}");
        assert_eq!(report.websockets_at_switch, 1);
        assert!(closed.is_cancelled(), "the tunnel was told to close");
        drop(tunnel);
    }
}
