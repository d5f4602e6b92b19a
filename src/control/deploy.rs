//! The deploy controller: run a new image as the other colour, prove it
//! healthy, switch traffic to it, drain the old colour and keep it warm for
//! an instant rollback, then retire it. Also rollback, and the start-up
//! reconciliation that makes a crash mid-deploy harmless.
//!
//! The steps and their failure rules are in `src/LIFECYCLE.md`. The one
//! invariant every path keeps: traffic only ever moves to a container that
//! passed its health check, and a failed deploy leaves the serving colour
//! untouched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::color::Color;
use super::cutover::{Gate, Record, Target};
use super::health;
use super::identity::{self, Named};
use super::report::{DeployReport, DeployTimings, RollbackReport, SwapBackReport};
use super::state::{now_unix, ContainerState, DeployRecord, PreviousState};
use super::{check_health, next_color, Activation, ControlError, Controller, Progress};
use crate::config::{ContainerSettings, Service};
use crate::docker::{ContainerInfo, ContainerSpec, Engine};
use crate::upstream::Upstream;

/// How often a starting container is inspected for an early exit.
const EXIT_POLL: Duration = Duration::from_millis(250);

/// Log lines of a failed container shown to the caller.
const FAILED_LOG_LINES: usize = 20;

/// How often, and for how long, a container left behind by an engine
/// outage is retried for removal (an hour, then reconciliation at the next
/// start or the next deploy of the service takes over).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const SWEEP_ATTEMPTS: u32 = 3600;

/// How long a restart watches for a container whose create was in flight
/// when cutover stopped (an engine finishes a create in well under this).
const LATE_CREATE_INTERVAL: Duration = Duration::from_millis(500);
const LATE_CREATE_CHECKS: u32 = 30;

/// What to deploy: a full image reference, or a tag of the configured image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageChoice {
    Image(String),
    Tag(String),
}

impl ImageChoice {
    fn resolve(self, settings: &ContainerSettings) -> String {
        match self {
            ImageChoice::Image(image) => image,
            ImageChoice::Tag(tag) => format!("{}:{tag}", settings.image),
        }
    }
}

impl Controller {
    /// Deploys `choice` to `service`; Ok only when traffic switched to it.
    /// `cancel` (the server's shutdown, through the caller's token) stops a
    /// deploy in its health check and removes its new container.
    pub async fn deploy(
        self: &Arc<Self>,
        service: &str,
        choice: ImageChoice,
        docker_config: Option<PathBuf>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<DeployReport, ControlError> {
        let _busy = self.claim(service)?;
        let result = self
            .deploy_claimed(service, choice, docker_config, progress, cancel)
            .await;
        self.note_engine_outcome(&result);
        result
    }

    /// Keeps `status`'s docker line current: an operation that reached the
    /// engine shows it answers; one that lost it says so.
    fn note_engine_outcome<T>(&self, result: &Result<T, ControlError>) {
        match result {
            Ok(_) => self.set_docker_status("ok".into()),
            Err(ControlError::Docker(err)) if err.is_unreachable() => {
                self.set_docker_status(format!("unreachable: {err}"))
            }
            Err(_) => {}
        }
    }

    /// The deploy itself; the caller holds the service's busy claim.
    async fn deploy_claimed(
        self: &Arc<Self>,
        service: &str,
        choice: ImageChoice,
        docker_config: Option<PathBuf>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<DeployReport, ControlError> {
        let (config, settings) = self.service_config(service)?;
        let container = container_settings(service, &settings)?;
        let image = choice.resolve(&container);
        self.check_state_writable().await?;
        let engine = self.engine().await?;
        let began = Instant::now();

        let docker_config = container.docker_config.clone().or(docker_config);
        ensure_image(&engine, &image, docker_config.as_deref(), progress).await?;
        let current = self.active(service);
        let color = next_color(current.as_deref());
        self.clear_color(service, color, &engine, &container, progress)
            .await?;

        let deploy_id = new_deploy_id();
        let spec = container_spec(
            service,
            color,
            &image,
            &deploy_id,
            &self.instance,
            &container,
        )?;
        // Recorded before the create: a crash from here on may leave a
        // container the engine finishes creating after the restart's
        // reconciliation looked (see `State::starting`).
        self.commit_record(service, |record| record.starting = Some(spec.name.clone()))
            .await?;
        progress.emit(
            "starting",
            format!("starting {image} as {color} ({})", spec.name),
        );
        let started = match engine.create_and_start(&spec).await {
            Ok(started) => started,
            Err(err) => {
                if err.is_unreachable() {
                    // The create may have reached the engine before it went
                    // away; docker.rs could not remove what it made. The
                    // `starting` record stays for the reconciliation.
                    self.sweep_when_engine_returns(service);
                } else {
                    self.forget_starting(service).await;
                }
                return Err(start_error(err, &spec));
            }
        };
        let start_ms = began.elapsed().as_millis() as u64;
        let Some(addr) = started.host_addr else {
            let cleanup = self
                .remove_new_container(service, &engine, &started.id, progress)
                .await;
            if cleanup.is_ok() {
                self.forget_starting(service).await;
            }
            let cleanup = cleanup.unwrap_or_else(|left| left);
            return Err(ControlError::Failed(format!(
                "container {} published no port for {}/tcp; {cleanup}",
                short(&started.id),
                container.port
            )));
        };
        progress.emit(
            "started",
            format!("started {color} container {} on {addr}", short(&started.id)),
        );

        if let Err(reason) = self
            .await_healthy(&engine, &started, addr, &settings, progress, cancel)
            .await
        {
            return Err(self
                .fail_deploy(
                    service,
                    &engine,
                    &started,
                    &image,
                    reason,
                    current.as_deref(),
                    progress,
                )
                .await);
        }
        let healthy_ms = began.elapsed().as_millis() as u64 - start_ms;

        let upstream = Upstream::for_container(
            addr,
            color,
            ContainerState {
                id: started.id.clone(),
                image: image.clone(),
                deploy_id: deploy_id.clone(),
            },
            &config.server.limits,
        );
        let target = Target {
            service,
            upstream,
            settings: &settings,
            gate: Gate::Passed,
            record: Some(Record {
                container: &container,
                image: &image,
                message: "switched",
                supersede: Some(&engine),
            }),
        };
        let announce = |activation: &Activation| {
            format!(
                "switched {service} to {color} ({image}): swap {} ns after a {} µs state write{}",
                activation.swap.as_nanos(),
                activation.persist.as_micros(),
                activation
                    .old
                    .as_ref()
                    .map(|o| format!(", was {}", o.label))
                    .unwrap_or_default()
            )
        };
        let handover = match self.cut_over(target, progress, announce).await {
            Ok(handover) => handover,
            Err(err) => {
                // Nothing switched and the records are as they were: leave
                // no container.
                let reason =
                    format!("the switch could not be recorded, so traffic was not moved: {err}");
                return Err(self
                    .fail_deploy(
                        service,
                        &engine,
                        &started,
                        &image,
                        reason,
                        current.as_deref(),
                        progress,
                    )
                    .await);
            }
        };
        let (activation, drain_report) = (&handover.activation, handover.drain);
        let drain_ms = handover.drain_time.as_millis() as u64;
        self.prune_images(service, &engine, container.retain).await;
        if let Err(err) = self.save_state().await {
            tracing::error!(service, error = %err, "could not record the deploy in the state file");
        }
        progress.emit("done", format!("deployed {image} to {service} as {color}"));
        Ok(DeployReport {
            service: service.to_string(),
            color: color.to_string(),
            image,
            container: started.id,
            upstream: addr.to_string(),
            deploy_id,
            timings: DeployTimings {
                start_ms,
                healthy_ms,
                persist_us: activation.persist.as_micros() as u64,
                swap_ns: activation.swap.as_nanos() as u64,
                drain_ms,
                total_ms: began.elapsed().as_millis() as u64,
            },
            drain: drain_report,
        })
    }

    /// Records a switch to `image` that is about to be published: the
    /// outgoing upstream becomes the warm previous colour, the image goes to
    /// the front of the history.
    pub(super) fn record_switch(
        &self,
        service: &str,
        outgoing: Option<&Upstream>,
        container: &ContainerSettings,
        image: &str,
        message: &str,
    ) {
        self.update_record(service, |record| {
            record.previous = outgoing.map(|old| previous_state(old, container.keep_previous));
            record.history.retain(|known| known != image);
            record.history.insert(0, image.to_string());
            record.last_deploy = Some(deploy_record(image, true, message));
            record.starting = None;
        });
    }

    /// The container a deploy was creating is now known to the engine
    /// listing (or gone): stop watching for it.
    async fn forget_starting(&self, service: &str) {
        if let Err(err) = self
            .commit_record(service, |record| record.starting = None)
            .await
        {
            tracing::error!(service, error = %err, "could not update the state file");
        }
    }

    /// Probes the new container until healthy, giving up as soon as it exits.
    async fn await_healthy(
        &self,
        engine: &Engine,
        started: &ContainerInfo,
        addr: std::net::SocketAddr,
        settings: &Service,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let port = settings.container.as_ref().map_or(0, |c| c.port);
        let exited = async {
            loop {
                tokio::time::sleep(EXIT_POLL).await;
                match engine.inspect(&started.id, port).await {
                    Ok(info) if info.running => continue,
                    Ok(info) => {
                        return format!(
                            "container exited during the health check (exit code {})",
                            info.exit_code.map_or("unknown".into(), |c| c.to_string())
                        )
                    }
                    Err(err) if err.is_not_found() => return "container disappeared".to_string(),
                    // Without the engine the new container can be neither
                    // watched nor cleaned up later: do not switch to it.
                    Err(err) if err.is_unreachable() => {
                        return format!("lost the docker engine during the health check ({err})")
                    }
                    Err(err) => tracing::warn!(error = %err, "inspect failed during health check"),
                }
            }
        };
        tokio::select! {
            biased;
            // A graceful shutdown cancels the deploy, so the half-started
            // container is removed now instead of at the next start.
            _ = cancel.cancelled() => Err("cutover is shutting down; the deploy was cancelled".to_string()),
            healthy = check_health(addr, settings, progress) => healthy.map_err(|err| err.to_string()),
            reason = exited => Err(reason),
        }
    }

    /// Cleans up after a failed deploy and builds the caller's error: the
    /// reason, the serving colour left untouched, what became of the new
    /// container, its last logs.
    #[allow(clippy::too_many_arguments)]
    async fn fail_deploy(
        self: &Arc<Self>,
        service: &str,
        engine: &Engine,
        started: &ContainerInfo,
        image: &str,
        reason: String,
        current: Option<&Upstream>,
        progress: &Progress,
    ) -> ControlError {
        progress.emit("failed", format!("deploy failed: {reason}"));
        let logs = match engine.logs_tail(&started.id, FAILED_LOG_LINES).await {
            Ok(lines) if lines.is_empty() => "(no output)".to_string(),
            Ok(lines) => lines.join("\n"),
            Err(err) => format!("(logs unavailable: {err})"),
        };
        let cleanup = self
            .remove_new_container(service, engine, &started.id, progress)
            .await;
        // A container that could not be removed stays named as `starting`:
        // it never passed this deploy, so reconciliation removes it and
        // never adopts it.
        let removed = cleanup.is_ok();
        let cleanup = cleanup.unwrap_or_else(|left| left);
        let old = match current {
            Some(old) => format!("{} ({}) keeps serving, untouched", old.label, old.addr),
            None => "no colour was serving before".to_string(),
        };
        let recorded = self
            .commit_record(service, |record| {
                record.last_deploy = Some(deploy_record(image, false, &reason));
                if removed {
                    record.starting = None;
                }
            })
            .await;
        if let Err(err) = recorded {
            tracing::error!(service, error = %err, "could not record the failed deploy");
        }
        ControlError::DeployFailed {
            reason,
            old,
            cleanup,
            logs,
        }
    }

    /// Removes the container a failed deploy started and says what became
    /// of it: Ok when it is gone, Err when it is left behind. If the engine
    /// is gone, a background sweep removes it as soon as the engine answers
    /// again.
    async fn remove_new_container(
        self: &Arc<Self>,
        service: &str,
        engine: &Engine,
        id: &str,
        progress: &Progress,
    ) -> Result<String, String> {
        match engine.remove_force(id).await {
            Ok(()) => {
                let done = format!("the new container {} was removed", short(id));
                progress.emit("removed", done.clone());
                Ok(done)
            }
            Err(err) if err.is_unreachable() => {
                tracing::error!(container = %id, error = %err, "could not remove the new container");
                self.sweep_when_engine_returns(service);
                Err(format!(
                    "the new container {} could not be removed ({err}); cutover removes it as soon as the engine answers again",
                    short(id)
                ))
            }
            Err(err) => {
                tracing::error!(container = %id, error = %err, "could not remove the new container");
                Err(format!(
                    "the new container {} could not be removed ({err}); the next deploy or restart removes it",
                    short(id)
                ))
            }
        }
    }

    /// The engine went away while a deploy had (or may have had) a new
    /// container, or before start-up reconciliation could run. Once it
    /// answers again (checked every second, for at most an hour), runs the
    /// service's start-up reconciliation: containers that are neither active
    /// nor the warm previous colour are removed, the active one is probed,
    /// the previous one's retirement scheduled. No restart needed.
    pub(crate) fn sweep_when_engine_returns(self: &Arc<Self>, service: &str) {
        let controller = Arc::clone(self);
        let shutdown = self.shutdown_token();
        let service = service.to_string();
        self.spawn(async move {
            for _ in 0..SWEEP_ATTEMPTS {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                    _ = shutdown.cancelled() => return,
                }
                if !controller.engine_answers().await {
                    continue;
                }
                // A running deploy or rollback owns the service's
                // containers now; look again when it ends.
                let Ok(_busy) = controller.claim(&service) else {
                    continue;
                };
                match controller.resync(&service).await {
                    Ok(()) => {
                        tracing::info!(service, "docker engine answers again: reconciled");
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(service, error = %err, "reconciliation after the engine outage failed; retrying")
                    }
                }
            }
            tracing::warn!(service, "docker engine still unreachable; the next deploy or restart reconciles");
        });
    }

    /// One service's start-up reconciliation, at any time; the caller holds
    /// the service's busy claim.
    async fn resync(self: &Arc<Self>, service: &str) -> Result<(), ControlError> {
        let (_, settings) = self.service_config(service)?;
        let engine = self.engine().await?;
        self.reconcile_service(&engine, service, &settings).await?;
        self.save_state().await?;
        Ok(())
    }

    /// Makes room for a new container in `color`: removes this instance's
    /// strays there (neither active nor the warm previous colour). With
    /// ephemeral host ports the warm previous colour stays until the new
    /// container has passed its health check, so a failed deploy keeps the
    /// instant rollback; with fixed `host_ports` it holds the port the new
    /// container needs and is given up now, and the caller is told so.
    async fn clear_color(
        &self,
        service: &str,
        color: &str,
        engine: &Engine,
        container: &ContainerSettings,
        progress: &Progress,
    ) -> Result<(), ControlError> {
        let active_id = self
            .active(service)
            .and_then(|u| u.container.as_ref().map(|c| c.id.clone()));
        let warm_id = self
            .record(service)
            .previous
            .and_then(|p| p.container.map(|c| c.id));
        let occupants = self.own_containers(engine, service, container.port).await?;
        for occupant in occupants {
            if Some(&occupant.id) == active_id.as_ref() || occupant.color.as_deref() != Some(color)
            {
                continue;
            }
            let message = match (Some(&occupant.id) == warm_id.as_ref(), container.host_ports) {
                (true, None) => continue,
                (true, Some(_)) => format!(
                    "host_ports are fixed: giving up the warm previous {color} container {} to free its port; \
                     if this deploy fails, `rollback` redeploys the previous image",
                    short(&occupant.id)
                ),
                (false, _) => format!(
                    "removing a stray {color} container {}",
                    short(&occupant.id)
                ),
            };
            progress.emit("retire", message);
            engine
                .stop_and_remove(&occupant.id, container.stop_timeout)
                .await?;
        }
        if container.host_ports.is_some() {
            self.update_record(service, |record| record.previous = None);
        }
        Ok(())
    }

    /// After a switch, the warm previous colour from before the deploy is
    /// superseded by the colour that just stopped serving: stops and
    /// removes it. A failure is logged; the container is no longer named
    /// anywhere, so the next reconciliation removes it.
    pub(super) async fn retire_superseded(
        &self,
        engine: &Engine,
        superseded: &PreviousState,
        container: &ContainerSettings,
        progress: &Progress,
    ) {
        let Some(state) = &superseded.container else {
            return;
        };
        progress.emit(
            "retire",
            format!(
                "stopping the superseded warm {} container {}",
                superseded.color,
                short(&state.id)
            ),
        );
        if let Err(err) = engine
            .stop_and_remove(&state.id, container.stop_timeout)
            .await
        {
            tracing::warn!(container = %state.id, error = %err, "could not retire the superseded warm colour");
        }
    }

    /// Keeps the old colour's container running for `keep_previous`, then
    /// retires it (unless a rollback made it active again by then).
    pub(super) fn keep_warm(
        self: &Arc<Self>,
        service: &str,
        old: &Upstream,
        container: &ContainerSettings,
        progress: &Progress,
    ) {
        let Some(old_container) = &old.container else {
            return; // a static upstream: nothing of ours to stop
        };
        progress.emit(
            "warm",
            format!(
                "{} ({}) stays running for {:?} for an instant rollback",
                old.label,
                short(&old_container.id),
                container.keep_previous
            ),
        );
        let retire_at = retire_time(container.keep_previous);
        self.schedule_retirement(service.to_string(), old_container.id.clone(), retire_at);
    }

    /// Stops and removes the previous colour's container at `retire_at`.
    pub(crate) fn schedule_retirement(
        self: &Arc<Self>,
        service: String,
        container_id: String,
        retire_at: u64,
    ) {
        let controller = Arc::clone(self);
        let shutdown = self.shutdown_token();
        self.spawn(async move {
            let wait = Duration::from_secs(retire_at.saturating_sub(now_unix()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            loop {
                match controller.claim(&service) {
                    Ok(_busy) => {
                        controller.retire_previous(&service, &container_id).await;
                        return;
                    }
                    // A deploy or rollback is running; it handles the
                    // previous colour itself. Check again shortly.
                    Err(_) => tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    },
                }
            }
        });
    }

    async fn retire_previous(&self, service: &str, container_id: &str) {
        let record = self.record(service);
        // A rollback can make a container the previous colour again with a
        // new window; the timer of its first window must then do nothing.
        let due = record.previous.as_ref().is_some_and(|previous| {
            previous.retire_at <= now_unix()
                && previous
                    .container
                    .as_ref()
                    .is_some_and(|c| c.id == container_id)
        });
        if !due {
            return;
        }
        let stop_timeout = self
            .service_config(service)
            .ok()
            .and_then(|(_, s)| s.container.map(|c| c.stop_timeout))
            .unwrap_or(Duration::from_secs(10));
        let result = match self.engine().await {
            Ok(engine) => engine.stop_and_remove(container_id, stop_timeout).await,
            Err(err) => {
                tracing::warn!(service, error = %err, "cannot retire previous colour now");
                return;
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(service, container = %short(container_id), "retired previous colour");
                if let Err(err) = self
                    .commit_record(service, |record| record.previous = None)
                    .await
                {
                    tracing::error!(service, error = %err, "could not record the retirement");
                }
            }
            Err(err) => tracing::warn!(service, error = %err, "retiring previous colour failed"),
        }
    }

    /// Removes deployed images beyond the newest `retain` + 1 (the active
    /// one plus `retain` rollback targets). Images still in use are kept.
    async fn prune_images(&self, service: &str, engine: &Engine, retain: usize) {
        let mut removed = Vec::new();
        self.update_record(service, |record| {
            if record.history.len() > retain + 1 {
                removed = record.history.split_off(retain + 1);
            }
        });
        for image in removed {
            match engine.remove_image(&image).await {
                Ok(()) => tracing::info!(service, image, "removed old image (retain)"),
                Err(err) => tracing::debug!(service, image, error = %err, "old image kept"),
            }
        }
    }

    /// Swaps back to the warm previous colour (after a health check), or,
    /// when it was retired, deploys the previous image again.
    pub async fn rollback(
        self: &Arc<Self>,
        service: &str,
        docker_config: Option<PathBuf>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<RollbackReport, ControlError> {
        let _busy = self.claim(service)?;
        let result = self
            .rollback_claimed(service, docker_config, progress, cancel)
            .await;
        self.note_engine_outcome(&result);
        result
    }

    /// The rollback itself; the caller holds the service's busy claim.
    async fn rollback_claimed(
        self: &Arc<Self>,
        service: &str,
        docker_config: Option<PathBuf>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<RollbackReport, ControlError> {
        let (config, settings) = self.service_config(service)?;
        let container = container_settings(service, &settings)?;
        let engine = self.engine().await?;
        let record = self.record(service);
        let current = self.active(service);
        let current_image = current
            .as_ref()
            .and_then(|u| u.container.as_ref().map(|c| c.image.clone()));

        if let Some(previous) = record.previous.clone() {
            if let Some(warm) = warm_container(&engine, &previous, container.port).await {
                return self
                    .swap_back(
                        service, previous, warm, &config, &settings, &container, progress,
                    )
                    .await
                    .map(RollbackReport::Instant);
            }
            progress.emit(
                "rollback",
                "the previous colour is no longer running; starting its image again",
            );
        }
        let target = record
            .previous
            .and_then(|p| p.container.map(|c| c.image))
            .or_else(|| {
                record
                    .history
                    .iter()
                    .find(|image| Some(*image) != current_image.as_ref())
                    .cloned()
            })
            .ok_or_else(|| {
                ControlError::Refused(format!(
                    "nothing to roll back to: {service} has no previous colour or image"
                ))
            })?;
        progress.emit("rollback", format!("redeploying previous image {target}"));
        self.deploy_claimed(
            service,
            ImageChoice::Image(target),
            docker_config,
            progress,
            cancel,
        )
        .await
        .map(RollbackReport::Redeploy)
    }

    /// The instant rollback: the previous container is still running.
    #[allow(clippy::too_many_arguments)]
    async fn swap_back(
        self: &Arc<Self>,
        service: &str,
        previous: PreviousState,
        warm: ContainerInfo,
        config: &crate::config::Config,
        settings: &Service,
        container: &ContainerSettings,
        progress: &Progress,
    ) -> Result<SwapBackReport, ControlError> {
        let addr = warm.host_addr.unwrap_or(previous.addr);
        progress.emit(
            "rollback",
            format!(
                "previous colour {} is still running on {addr}; checking health",
                previous.color
            ),
        );
        let Some(state) = previous.container.clone() else {
            return Err(ControlError::Failed(
                "previous colour has no container".into(),
            ));
        };
        let image = state.image.clone();
        let upstream =
            Upstream::for_container(addr, previous.color.clone(), state, &config.server.limits);
        let target = Target {
            service,
            upstream,
            settings,
            gate: Gate::Probe,
            // On failure the warm colour stays the rollback target.
            record: Some(Record {
                container,
                image: &image,
                message: "rolled back",
                supersede: None,
            }),
        };
        let announce = |activation: &Activation| {
            format!(
                "rolled {service} back to {} ({image}): swap {} ns",
                previous.color,
                activation.swap.as_nanos()
            )
        };
        let handover = self.cut_over(target, progress, announce).await?;
        if let Err(err) = self.save_state().await {
            tracing::error!(service, error = %err, "could not record the rollback");
        }
        Ok(SwapBackReport {
            service: service.to_string(),
            color: previous.color,
            image,
            instant: true,
            upstream: addr.to_string(),
            timings: handover.activation.timings(),
            drain: handover.drain,
        })
    }

    /// Start-up reconciliation against Docker: keep the active container if
    /// it is running and healthy (else fall back to a healthy previous
    /// colour, else serve nothing for that service rather than something
    /// unhealthy), keep a warm previous colour with its retirement time,
    /// and remove every other managed container of the service (half-started
    /// deploys). With the engine unreachable, the last known upstreams keep
    /// serving and `status` says so.
    pub async fn reconcile(self: &Arc<Self>) {
        let config = self.current_config();
        let managed: Vec<(String, Service)> = config
            .services
            .iter()
            .filter(|(_, s)| s.container.is_some())
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect();
        if managed.is_empty() {
            return;
        }
        let engine = match self.engine().await {
            Ok(engine) => engine,
            Err(err) => {
                tracing::error!(error = %err, "docker engine unreachable at start-up: serving the last known upstreams unchecked until it answers");
                for (name, _) in &managed {
                    self.sweep_when_engine_returns(name);
                }
                return;
            }
        };
        for (name, settings) in managed {
            if let Err(err) = self.reconcile_service(&engine, &name, &settings).await {
                tracing::error!(service = %name, error = %err, "reconciliation failed");
            }
        }
        if let Err(err) = self.save_state().await {
            tracing::error!(error = %err, "could not write the reconciled state");
        }
    }

    async fn reconcile_service(
        self: &Arc<Self>,
        engine: &Engine,
        service: &str,
        settings: &Service,
    ) -> Result<(), ControlError> {
        let container = container_settings(service, settings)?;
        let own = self.own_containers(engine, service, container.port).await?;
        let active = self.active(service);
        let active_id = active
            .as_ref()
            .and_then(|u| u.container.as_ref().map(|c| c.id.clone()));
        let record = self.record(service);
        let previous_id = record
            .previous
            .as_ref()
            .and_then(|p| p.container.as_ref().map(|c| c.id.clone()));
        let starting = record.starting.clone();
        let mut starting_seen = false;
        let (mut active_info, mut previous_info, mut others) = (None, None, Vec::new());
        for info in own {
            starting_seen |= starting.as_deref() == Some(info.name.as_str());
            let info = if Some(&info.id) == active_id.as_ref() && !info.running {
                self.restart_stopped_active(engine, service, info, container.port, settings)
                    .await
            } else {
                info
            };
            if Some(&info.id) == active_id.as_ref() && info.running {
                active_info = Some(info);
            } else if Some(&info.id) == previous_id.as_ref() && info.running {
                previous_info = Some(info);
            } else {
                others.push(info);
            }
        }

        match &starting {
            Some(name) if !starting_seen => {
                self.remove_late_container(service, name.clone(), container.port)
            }
            Some(_) => self.forget_starting(service).await,
            None => {}
        }

        let active_serves = self
            .recorded_active_serves(service, settings, active.as_deref(), active_info.as_ref())
            .await?;
        if active_serves {
            self.keep_recorded_previous(service, record.previous, previous_info.is_some());
        } else if !self
            .previous_takes_over(service, settings, record.previous, previous_info)
            .await?
        {
            if active.is_none() {
                // The state file names no active colour (first start, or
                // the file was lost): a container of this instance that
                // serves is adopted rather than removed.
                others = self
                    .adopt(service, settings, &container, others, starting.as_deref())
                    .await?;
            } else {
                self.deactivate(service).await?;
                tracing::error!(
                    service,
                    "no healthy container: the service answers 503 until the next deploy"
                );
            }
        }
        for info in others {
            tracing::warn!(service, container = %info.name, deploy = ?info.deploy_id, "removing orphan container (unfinished deploy or stopped colour)");
            engine.remove_force(&info.id).await?;
        }
        Ok(())
    }

    /// This instance's containers of `service` (see [`identity`]). The
    /// others are logged and left alone.
    async fn own_containers(
        &self,
        engine: &Engine,
        service: &str,
        port: u16,
    ) -> Result<Vec<ContainerInfo>, ControlError> {
        let listed = engine.list_managed(Some(service), &|_| Some(port)).await?;
        let active = self.active(service);
        let record = self.record(service);
        let ids = [
            active.as_ref().and_then(|u| u.container.as_ref()),
            record.previous.as_ref().and_then(|p| p.container.as_ref()),
        ];
        let named = Named {
            ids: ids.iter().flatten().map(|c| c.id.as_str()).collect(),
            starting: record.starting.as_deref(),
        };
        let (own, foreign) = identity::split_own(listed, &self.instance, &named);
        for info in foreign {
            tracing::debug!(service, container = %info.name, instance = ?info.instance, "not this instance's container: left alone");
        }
        Ok(own)
    }

    /// Whether the active colour the state file names still serves: its
    /// container runs and answers its health check (re-pointed if its
    /// published port changed), or it is a static upstream.
    async fn recorded_active_serves(
        &self,
        service: &str,
        settings: &Service,
        active: Option<&Upstream>,
        info: Option<&ContainerInfo>,
    ) -> Result<bool, ControlError> {
        match (active, info) {
            (Some(active), Some(info)) => {
                let addr = info.host_addr.unwrap_or(active.addr);
                if !probe_a_few(addr, settings).await {
                    tracing::error!(service, container = %info.name, "active container is not healthy");
                    return Ok(false);
                }
                if addr != active.addr {
                    self.reactivate_at(service, active, addr).await?;
                }
                Ok(true)
            }
            // A static upstream (no container) stays as the state file says.
            (Some(active), None) => Ok(active.container.is_none()),
            (None, _) => Ok(false),
        }
    }

    /// The active colour serves: the recorded previous colour stays warm
    /// until its retirement time if it still runs, else it is forgotten.
    fn keep_recorded_previous(
        self: &Arc<Self>,
        service: &str,
        previous: Option<PreviousState>,
        running: bool,
    ) {
        match previous {
            Some(previous) if running => {
                if let Some(c) = &previous.container {
                    self.schedule_retirement(service.to_string(), c.id.clone(), previous.retire_at);
                }
            }
            Some(_) => self.update_record(service, |r| r.previous = None),
            None => {}
        }
    }

    /// The active colour is gone or unhealthy: the warm previous colour, if
    /// it runs and is healthy, takes over. Returns whether it did.
    async fn previous_takes_over(
        &self,
        service: &str,
        settings: &Service,
        previous: Option<PreviousState>,
        info: Option<ContainerInfo>,
    ) -> Result<bool, ControlError> {
        let (Some(previous), Some(info)) = (previous, info) else {
            // Removed, or gone already: no rollback target to name.
            self.update_record(service, |r| r.previous = None);
            return Ok(false);
        };
        let addr = info.host_addr.unwrap_or(previous.addr);
        let (true, Some(state)) = (probe_a_few(addr, settings).await, previous.container) else {
            return Ok(false);
        };
        let limits = self.current_config().server.limits.clone();
        let upstream = Upstream::for_container(addr, previous.color.clone(), state, &limits);
        self.update_record(service, |r| r.previous = None);
        self.activate(service, upstream).await?;
        tracing::warn!(service, color = %previous.color, "active colour was gone or unhealthy: serving the previous colour");
        Ok(true)
    }

    /// The state file names no active colour, yet containers of this
    /// instance may run: the state file was lost or deleted, or a restart
    /// followed a deploy whose state write never happened. The newest
    /// running container that passes its health check becomes active, and
    /// the newest healthy one of the other colour the warm previous colour
    /// (retired after `keep_previous`). The container an interrupted deploy
    /// was creating (`starting`) never passed its deploy's health check and
    /// is never adopted. Returns the containers to remove: the stopped ones
    /// and the interrupted create; running containers that are not healthy
    /// now are left running (logged), since nothing says they did not serve.
    async fn adopt(
        self: &Arc<Self>,
        service: &str,
        settings: &Service,
        container: &ContainerSettings,
        mut candidates: Vec<ContainerInfo>,
        starting: Option<&str>,
    ) -> Result<Vec<ContainerInfo>, ControlError> {
        // RFC 3339 times from one engine sort as text; newest first.
        candidates.sort_by(|a, b| b.started_at.cmp(&a.started_at));
        let mut active: Option<(ContainerInfo, std::net::SocketAddr)> = None;
        let mut previous = None;
        let mut remove = Vec::new();
        for info in candidates {
            if !info.running || starting == Some(info.name.as_str()) {
                remove.push(info);
                continue;
            }
            let wanted = match &active {
                None => true,
                Some((chosen, _)) => previous.is_none() && chosen.color != info.color,
            };
            let healthy = match info.host_addr {
                Some(addr) if wanted => probe_a_few(addr, settings).await.then_some(addr),
                _ => None,
            };
            match healthy {
                Some(addr) if active.is_none() => active = Some((info, addr)),
                Some(addr) => previous = Some((info, addr)),
                None => {
                    tracing::warn!(service, container = %info.name, "a running container of this instance is not adopted (not healthy now, or a third one) and left running; remove it with `docker rm -f` if it is not needed")
                }
            }
        }
        let Some((info, addr)) = active else {
            return Ok(remove);
        };
        let limits = self.current_config().server.limits.clone();
        let color = info.color.clone().unwrap_or_else(|| "blue".into());
        let upstream = Upstream::for_container(addr, color.clone(), adopted_state(&info), &limits);
        let warm = previous.map(|(info, addr)| PreviousState {
            color: info.color.clone().unwrap_or_else(|| "green".into()),
            addr,
            container: Some(adopted_state(&info)),
            retire_at: retire_time(container.keep_previous),
        });
        let mut history = vec![info.image.clone()];
        history.extend(
            warm.iter()
                .filter_map(|p| Some(p.container.as_ref()?.image.clone())),
        );
        history.dedup();
        let before = self.record(service);
        self.update_record(service, |record| {
            record.history = history;
            record.previous = warm.clone();
        });
        if let Err(err) = self.activate(service, upstream).await {
            self.update_record(service, |record| *record = before);
            return Err(err);
        }
        tracing::warn!(service, container = %info.name, color, image = %info.image, "the state file names no active container: adopted a running, healthy container of this instance");
        if let Some(warm) = warm {
            if let Some(c) = &warm.container {
                tracing::warn!(service, container = %c.id, color = %warm.color, "adopted as the warm previous colour");
                self.schedule_retirement(service.to_string(), c.id.clone(), warm.retire_at);
            }
        }
        Ok(remove)
    }

    /// The active container stopped without cutover stopping it: an engine
    /// restart or a host reboot (the containers have no restart policy:
    /// cutover decides), or an OOM kill. Starts it again and gives it the
    /// health deadline, so the service comes back without a deploy.
    /// Returns its fresh state (still stopped if it would not start).
    async fn restart_stopped_active(
        &self,
        engine: &Engine,
        service: &str,
        info: ContainerInfo,
        port: u16,
        settings: &Service,
    ) -> ContainerInfo {
        tracing::warn!(service, container = %info.name, "the active container is stopped (engine restart or reboot?): starting it again");
        let started = match engine.start(&info.id, port).await {
            Ok(started) => started,
            Err(err) => {
                tracing::error!(service, container = %info.name, error = %err, "could not start the active container again");
                return info;
            }
        };
        if let Some(addr) = started.host_addr {
            if let Err(err) = check_health(addr, settings, &Progress::log_only()).await {
                tracing::error!(service, container = %info.name, error = %err, "the restarted active container is not healthy");
            }
        }
        started
    }

    /// A deploy was creating container `name` when cutover stopped, and the
    /// engine did not list it. The engine finishes a create (and a start)
    /// even when its client died, so it may still appear: watch for it for
    /// a while and remove it when it does.
    fn remove_late_container(self: &Arc<Self>, service: &str, name: String, port: u16) {
        let controller = Arc::clone(self);
        let shutdown = self.shutdown_token();
        let service = service.to_string();
        self.spawn(async move {
            for _ in 0..LATE_CREATE_CHECKS {
                if let Ok(engine) = controller.engine().await {
                    match engine.inspect(&name, port).await {
                        Ok(_) => {
                            tracing::warn!(service, container = %name, "removing a container whose create finished after the restart");
                            if let Err(err) = engine.remove_force(&name).await {
                                tracing::warn!(service, container = %name, error = %err, "could not remove it; retrying");
                            } else {
                                break;
                            }
                        }
                        Err(err) if err.is_not_found() => {}
                        Err(err) => tracing::debug!(service, error = %err, "inspect failed"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(LATE_CREATE_INTERVAL) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            // Unless a new deploy has recorded its own container since.
            let recorded = controller
                .commit_record(&service, |record| {
                    if record.starting.as_ref() == Some(&name) {
                        record.starting = None;
                    }
                })
                .await;
            if let Err(err) = recorded {
                tracing::error!(service, error = %err, "could not update the state file");
            }
        });
    }

    /// Re-points the active upstream at a new published address (the
    /// engine may have re-published an ephemeral port).
    async fn reactivate_at(
        &self,
        service: &str,
        active: &Upstream,
        addr: std::net::SocketAddr,
    ) -> Result<(), ControlError> {
        let limits = self.current_config().server.limits.clone();
        let upstream = match &active.container {
            Some(c) => Upstream::for_container(addr, active.label.clone(), c.clone(), &limits),
            None => Upstream::new(addr, active.label.clone(), &limits),
        };
        self.activate(service, upstream).await.map(|_| ())
    }
}

fn container_settings(
    service: &str,
    settings: &Service,
) -> Result<ContainerSettings, ControlError> {
    settings
        .container
        .clone()
        .ok_or_else(|| ControlError::NotAContainerService(service.to_string()))
}

/// Pulls `image` unless the engine already has it.
async fn ensure_image(
    engine: &Engine,
    image: &str,
    docker_config: Option<&std::path::Path>,
    progress: &Progress,
) -> Result<(), ControlError> {
    if engine.image_exists(image).await? {
        progress.emit("image", format!("{image} is present locally"));
        return Ok(());
    }
    progress.emit("pulling", format!("pulling {image}"));
    let mut last = String::new();
    engine
        .pull(image, docker_config, &mut |line| last = line)
        .await
        .map_err(|err| ControlError::Failed(format!("cannot pull {image}: {err}")))?;
    progress.emit("pulled", format!("pulled {image} {last}"));
    Ok(())
}

/// The container to create for this deploy. `env_file` is read now, so an
/// edited secret applies to the next deploy without touching proxy.toml.
fn container_spec(
    service: &str,
    color: &str,
    image: &str,
    deploy_id: &str,
    instance: &str,
    settings: &ContainerSettings,
) -> Result<ContainerSpec, ControlError> {
    let mut env = Vec::new();
    if let Some(path) = &settings.env_file {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ControlError::Failed(format!("env_file {}: {err}", path.display())))?;
        env.extend(parse_env_file(&text));
    }
    env.extend(settings.env.iter().map(|(k, v)| format!("{k}={v}")));
    let host_port = settings
        .host_ports
        .map(|[blue, green]| match Color::parse(color) {
            Some(Color::Blue) => blue,
            _ => green,
        });
    Ok(ContainerSpec {
        name: format!("cutover-{service}-{color}-{deploy_id}"),
        image: image.to_string(),
        service: service.to_string(),
        color: color.to_string(),
        deploy_id: deploy_id.to_string(),
        instance: instance.to_string(),
        container_port: settings.port,
        host_port,
        env,
        volumes: settings.volumes.clone(),
        extra_hosts: settings.extra_hosts.clone(),
    })
}

/// `KEY=VALUE` lines; blank lines and `#` comments skipped, as docker's
/// `--env-file` reads them.
fn parse_env_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && line.contains('='))
        .map(str::to_string)
        .collect()
}

/// Explains a start failure; a taken fixed host port gets its own message.
fn start_error(err: crate::docker::DockerError, spec: &ContainerSpec) -> ControlError {
    if err.is_port_in_use() {
        let port = spec.host_port.map_or("?".into(), |p| p.to_string());
        return ControlError::Failed(format!(
            "cannot start {} container: host port 127.0.0.1:{port} is already in use by another process (see host_ports); nothing was left behind",
            spec.color
        ));
    }
    if err.is_unreachable() {
        return ControlError::Failed(format!(
            "cannot start {} container: {err}; traffic was not moved; whatever the create left behind is removed as soon as the engine answers again",
            spec.color
        ));
    }
    ControlError::Docker(err)
}

/// The previous container if it is still running.
async fn warm_container(
    engine: &Engine,
    previous: &PreviousState,
    port: u16,
) -> Option<ContainerInfo> {
    let id = &previous.container.as_ref()?.id;
    engine
        .inspect(id, port)
        .await
        .ok()
        .filter(|info| info.running)
}

/// What the state file records about an adopted container.
fn adopted_state(info: &ContainerInfo) -> ContainerState {
    ContainerState {
        id: info.id.clone(),
        image: info.image.clone(),
        deploy_id: info.deploy_id.clone().unwrap_or_default(),
    }
}

/// One healthy probe out of a few tries, for start-up reconciliation.
async fn probe_a_few(addr: std::net::SocketAddr, settings: &Service) -> bool {
    for _ in 0..3 {
        if health::probe(addr, &settings.health).await.is_ok() {
            return true;
        }
        tokio::time::sleep(settings.health.interval).await;
    }
    false
}

fn previous_state(old: &Upstream, keep: Duration) -> PreviousState {
    PreviousState {
        color: old.label.clone(),
        addr: old.addr,
        container: old.container.clone(),
        retire_at: retire_time(keep),
    }
}

/// When a colour kept warm for `keep` is retired, in whole seconds rounded
/// up (so "500ms" still keeps it briefly instead of retiring it at once).
fn retire_time(keep: Duration) -> u64 {
    let seconds = u64::try_from(keep.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
    now_unix().saturating_add(seconds)
}

fn deploy_record(image: &str, ok: bool, message: &str) -> DeployRecord {
    DeployRecord {
        image: image.to_string(),
        ok,
        message: message.to_string(),
        at: now_unix(),
    }
}

/// Short, sortable and unique enough for one host: milliseconds since the
/// epoch in hex plus the process id.
fn new_deploy_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{millis:x}{:x}", std::process::id() & 0xfff)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines() {
        let text = "# secrets\nDB_PASSWORD=s3cret\n\n  TZ=Asia/Seoul  \nnot a pair\n";
        assert_eq!(
            parse_env_file(text),
            vec!["DB_PASSWORD=s3cret", "TZ=Asia/Seoul"]
        );
    }

    #[test]
    fn tag_uses_the_configured_repository() {
        let settings = ContainerSettings {
            image: "registry.example/team/web".into(),
            port: 8080,
            host_ports: Some([8080, 8081]),
            env: Default::default(),
            env_file: None,
            volumes: vec![],
            extra_hosts: vec![],
            stop_timeout: Duration::from_secs(1),
            keep_previous: Duration::from_secs(1),
            retain: 1,
            docker_config: None,
        };
        assert_eq!(
            ImageChoice::Tag("abc123".into()).resolve(&settings),
            "registry.example/team/web:abc123"
        );
        let spec = container_spec("web", "green", "img:1", "d1", "prod", &settings).expect("spec");
        assert_eq!(spec.host_port, Some(8081));
        assert_eq!(spec.instance, "prod");
        assert_eq!(spec.name, "cutover-web-green-d1");
    }
}
