//! The deployer: runs a new image as the other colour, proves it healthy,
//! switches traffic to it, drains the old colour and keeps it warm for an
//! instant rollback, then retires it. Also rollback, and the start-up
//! reconciliation that makes a crash mid-deploy harmless.
//!
//! [`Deployer`] owns what a deploy needs beyond the routing snapshot: the
//! engine handle (behind [`ContainerRuntime`], so the state machine runs
//! against a fake in unit tests) and the per-service [`Records`], changed
//! only through [`Deployer::commit`] (change, then save). It moves traffic
//! through the [`Writer`], which it shares with the controller.
//!
//! The files: this one is one deploy (`deploy` → `deploy_claimed`: image,
//! colour, start, health, cut over; `fail_deploy` on any failure);
//! `rollback.rs`; `retire.rs` (keep warm, superseded and retired colours,
//! images); `reconcile.rs` (start-up, after an engine outage); the shared
//! cut-over step is `../cutover.rs`. The steps and their failure rules are
//! in `LIFECYCLE.md`. The one invariant every path keeps: traffic only ever
//! moves to a container that passed its health check, and a failed deploy
//! leaves the serving colour untouched.

mod bake;
mod canary;
mod engine;
mod reconcile;
mod records;
mod retire;
mod rollback;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::color::Color;
use super::cutover::{Gate, Handover, Record, Target};
use super::report::{DeployReport, DeployTimings};
use super::state::{now_unix, ContainerState, DeployRecord, State, StateError};
use super::writer::{Activation, Writer};
use super::{check_health, next_color, ControlError, Progress};
use crate::config::{Config, ContainerSettings, Service};
use crate::docker::{ContainerInfo, ContainerRuntime, ContainerSpec};
use crate::upstream::Upstream;
use bake::{Bakes, Baking, Length, Phase};
pub use canary::parse_share;
use engine::EngineHandle;
pub(crate) use engine::{docker, Connect};
pub(crate) use records::{Records, ServiceRecord};
pub(super) use retire::previous_state;

/// How often a starting container is inspected for an early exit.
const EXIT_POLL: Duration = Duration::from_millis(250);

/// Log lines of a failed container shown to the caller.
const FAILED_LOG_LINES: usize = 20;

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

/// The image trimming a deploy leaves for after its bake window: the
/// engine to remove images from and how many past ones to keep.
pub(super) struct Pruning {
    engine: Arc<dyn ContainerRuntime>,
    retain: usize,
}

/// One deploy on its way: what it deploys where, decided before its
/// container starts.
struct Attempt<'a> {
    service: &'a str,
    config: Arc<Config>,
    settings: Service,
    container: ContainerSettings,
    image: String,
    color: &'static str,
    deploy_id: String,
    /// The colour serving when the deploy began (left untouched on failure).
    current: Option<Arc<Upstream>>,
    engine: Arc<dyn ContainerRuntime>,
    progress: &'a Progress,
    began: Instant,
}

/// Deploys, rollbacks, reconciliation and retirement: the deploy state
/// machine, one per server.
pub(crate) struct Deployer {
    pub(super) writer: Arc<Writer>,
    engine: EngineHandle,
    records: Arc<Records>,
    /// This cutover's identity on the engine (see
    /// [`identity`](super::identity)): the label on every container it
    /// starts.
    instance: String,
    /// Running bake windows and their last verdicts.
    bakes: Bakes,
}

impl Deployer {
    /// `records` are the ones `writer` persists.
    pub(crate) fn new(
        writer: Arc<Writer>,
        records: Arc<Records>,
        connect: Connect,
        instance: String,
    ) -> Arc<Deployer> {
        Arc::new(Deployer {
            writer,
            engine: EngineHandle::new(connect),
            records,
            instance,
            bakes: Bakes::default(),
        })
    }

    /// The container engine, connecting on first use.
    async fn engine(&self) -> Result<Arc<dyn ContainerRuntime>, ControlError> {
        Ok(self.engine.get().await?)
    }

    /// What `status` says about the engine.
    pub(crate) fn engine_status(&self) -> String {
        self.engine.status()
    }

    /// A copy of the service's record.
    pub(crate) fn record(&self, service: &str) -> ServiceRecord {
        self.records.get(service)
    }

    /// Takes the records of the state file read at start-up.
    pub(crate) fn restore(&self, state: &State) {
        let config = self.writer.current_config();
        self.records
            .restore(state, |name| config.services.contains_key(name));
    }

    /// Changes a service's record and writes the state file: the one way
    /// an operation records a fact that must survive a crash. A failed
    /// write is returned; the change stays in memory (status shows it, the
    /// next write records it).
    pub(crate) async fn commit(
        &self,
        service: &str,
        change: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(), StateError> {
        self.records.update(service, change);
        self.writer.save_state().await
    }

    /// [`commit`](Self::commit) whose state write is the one that
    /// publishes `upstream`: the file names the new records and the new
    /// active upstream together, or neither. If the write fails nothing
    /// switched, and the record is put back as it was.
    pub(super) async fn commit_and_activate(
        &self,
        service: &str,
        change: impl FnOnce(&mut ServiceRecord),
        upstream: Arc<Upstream>,
    ) -> Result<Activation, ControlError> {
        let before = self.records.get(service);
        self.records.update(service, change);
        let activation = self.writer.activate(service, upstream).await;
        if activation.is_err() {
            self.records.update(service, |record| *record = before);
        }
        activation
    }

    /// Deploys `choice` to `service`; Ok only when traffic switched to it.
    /// `cancel` (the server's shutdown, through the caller's token) stops a
    /// deploy in its health check and removes its new container.
    /// With `canary` (basis points) the new colour takes that share of the
    /// clients instead of all of them. With the service's `bake`, the
    /// command then stays attached for the bake window and fails (after
    /// rolling back) on a breach.
    pub async fn deploy(
        self: &Arc<Self>,
        service: &str,
        choice: ImageChoice,
        canary: Option<u32>,
        docker_config: Option<PathBuf>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<DeployReport, ControlError> {
        let steps = self.planned_steps(service, canary);
        let canary = canary.or_else(|| steps.as_ref().map(|steps| steps.shares[0]));
        let (mut report, baking, pruning) = {
            let _busy = self.writer.claim(service)?;
            self.end_bake(service);
            let result = self
                .deploy_claimed(service, choice, canary, docker_config, progress, cancel)
                .await;
            self.note_engine_outcome(&result);
            result?
        };
        // The claim is released: `abort`, `promote` and `rollback` may end
        // the window.
        let baked = match &steps {
            Some(steps) if baking.phase == Phase::Canary => {
                self.step_through(service, baking, steps, progress, cancel)
                    .await
            }
            _ => self.bake(service, baking, progress, cancel).await,
        };
        // Trimming old images waits for the engine (a few hundred ms per
        // image removed): after the window, so judging starts at the swap.
        if let Some(pruning) = pruning {
            self.prune(service, pruning).await;
        }
        report.bake = baked?;
        Ok(report)
    }

    /// Keeps `status`'s docker line current: an operation that reached the
    /// engine shows it answers; one that lost it says so.
    fn note_engine_outcome<T>(&self, result: &Result<T, ControlError>) {
        match result {
            Ok(_) => self.engine.set_status("ok".into()),
            Err(ControlError::Docker(err)) if err.is_unreachable() => {
                self.engine.set_status(format!("unreachable: {err}"))
            }
            Err(_) => {}
        }
    }

    /// The deploy itself; the caller holds the service's busy claim.
    async fn deploy_claimed(
        self: &Arc<Self>,
        service: &str,
        choice: ImageChoice,
        canary: Option<u32>,
        docker_config: Option<PathBuf>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<(DeployReport, Baking, Option<Pruning>), ControlError> {
        self.refuse_during_canary(service)?;
        if canary.is_some() && self.writer.active(service).is_none() {
            return Err(ControlError::Refused(format!(
                "{service} has no active colour to run a canary beside: deploy without --canary first"
            )));
        }
        let attempt = self
            .prepare(service, choice, docker_config, progress)
            .await?;
        let (started, addr) = self.start_container(&attempt).await?;
        let start_ms = attempt.began.elapsed().as_millis() as u64;
        if let Err(reason) = self.await_healthy(&attempt, &started, addr, cancel).await {
            return Err(self.fail_deploy(&attempt, &started, reason).await);
        }
        let healthy_ms = attempt.began.elapsed().as_millis() as u64 - start_ms;
        if let Some(share_bp) = canary {
            let (upstream, persist) = self
                .start_canary(&attempt, &started, addr, share_bp)
                .await?;
            let report = DeployReport {
                service: service.to_string(),
                color: attempt.color.to_string(),
                image: attempt.image.clone(),
                container: started.id.clone(),
                upstream: addr.to_string(),
                deploy_id: attempt.deploy_id.clone(),
                timings: DeployTimings {
                    start_ms,
                    healthy_ms,
                    persist_us: persist.as_micros() as u64,
                    swap_ns: 0,
                    drain_ms: 0,
                    total_ms: attempt.began.elapsed().as_millis() as u64,
                },
                drain: None,
                canary_share_bp: Some(share_bp),
                bake: None,
            };
            let baseline = upstream.stats().snapshot();
            let baking = Baking {
                upstream,
                baseline,
                phase: Phase::Canary,
                length: Length::Whole,
            };
            return Ok((report, baking, None));
        }
        let handover = self.switch_to(&attempt, &started, addr).await?;
        let first = handover.activation.old.is_none();
        let baking = Baking {
            // A fresh upstream: its counters start at zero with the swap.
            baseline: crate::upstream::stats::StatsSnapshot::default(),
            upstream: Arc::clone(&handover.upstream),
            // A first deploy has no previous colour to go back to: it is
            // not judged.
            phase: if first {
                Phase::Unjudged
            } else {
                Phase::Switch
            },
            length: Length::Whole,
        };
        let drain_ms = handover.drain_time.as_millis() as u64;
        let pruning = Pruning {
            engine: Arc::clone(&attempt.engine),
            retain: attempt.container.retain,
        };
        let Attempt {
            image,
            color,
            deploy_id,
            began,
            ..
        } = attempt;
        progress.emit("done", format!("deployed {image} to {service} as {color}"));
        let report = DeployReport {
            service: service.to_string(),
            color: color.to_string(),
            image,
            container: started.id,
            upstream: addr.to_string(),
            deploy_id,
            timings: DeployTimings {
                start_ms,
                healthy_ms,
                persist_us: handover.activation.persist.as_micros() as u64,
                swap_ns: handover.activation.swap.as_nanos() as u64,
                drain_ms,
                total_ms: began.elapsed().as_millis() as u64,
            },
            drain: handover.drain,
            canary_share_bp: None,
            bake: None,
        };
        Ok((report, baking, Some(pruning)))
    }

    /// Everything checked before a container starts: the service runs
    /// containers, the state directory takes a write, the engine answers
    /// and has the image; the other colour is picked and cleared.
    async fn prepare<'a>(
        &self,
        service: &'a str,
        choice: ImageChoice,
        docker_config: Option<PathBuf>,
        progress: &'a Progress,
    ) -> Result<Attempt<'a>, ControlError> {
        let (config, settings) = self.writer.service_config(service)?;
        let container = container_settings(service, &settings)?;
        let image = choice.resolve(&container);
        self.writer.check_state_writable().await?;
        let engine = self.engine().await?;
        let began = Instant::now();

        let docker_config = container.docker_config.clone().or(docker_config);
        ensure_image(&*engine, &image, docker_config.as_deref(), progress).await?;
        let current = self.writer.active(service);
        let color = next_color(current.as_deref());
        self.clear_color(service, color, &*engine, &container, progress)
            .await?;
        Ok(Attempt {
            service,
            config,
            settings,
            container,
            image,
            color,
            deploy_id: new_deploy_id(),
            current,
            engine,
            progress,
            began,
        })
    }

    /// Records the new container as `starting`, then creates and starts it;
    /// returns it with its published address. On failure nothing of it is
    /// left (or a sweep removes it once the engine answers again).
    async fn start_container(
        self: &Arc<Self>,
        attempt: &Attempt<'_>,
    ) -> Result<(ContainerInfo, std::net::SocketAddr), ControlError> {
        let Attempt {
            service,
            image,
            color,
            progress,
            ..
        } = attempt;
        let spec = container_spec(
            service,
            color,
            image,
            &attempt.deploy_id,
            &self.instance,
            &attempt.container,
        )?;
        // Recorded before the create: a crash from here on may leave a
        // container the engine finishes creating after the restart's
        // reconciliation looked (see `State::starting`).
        self.commit(service, |record| record.starting = Some(spec.name.clone()))
            .await?;
        progress.emit(
            "starting",
            format!("starting {image} as {color} ({})", spec.name),
        );
        let started = match attempt.engine.create_and_start(&spec).await {
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
        let Some(addr) = started.host_addr else {
            let cleanup = self
                .remove_new_container(service, &*attempt.engine, &started.id, progress)
                .await;
            if cleanup.is_ok() {
                self.forget_starting(service).await;
            }
            let cleanup = cleanup.unwrap_or_else(|left| left);
            return Err(ControlError::Failed(format!(
                "container {} published no port for {}/tcp; {cleanup}",
                short(&started.id),
                attempt.container.port
            )));
        };
        progress.emit(
            "started",
            format!("started {color} container {} on {addr}", short(&started.id)),
        );
        Ok((started, addr))
    }

    /// The healthy new container takes the traffic (the shared cut-over
    /// step); if the switch cannot be recorded, the deploy fails and the
    /// container goes.
    async fn switch_to(
        self: &Arc<Self>,
        attempt: &Attempt<'_>,
        started: &ContainerInfo,
        addr: std::net::SocketAddr,
    ) -> Result<Handover, ControlError> {
        let Attempt {
            service,
            image,
            color,
            ..
        } = attempt;
        let upstream = Upstream::for_container(
            addr,
            *color,
            ContainerState {
                id: started.id.clone(),
                image: image.clone(),
                deploy_id: attempt.deploy_id.clone(),
            },
            &attempt.config.server.limits,
        );
        let target = Target {
            service,
            upstream,
            settings: &attempt.settings,
            gate: Gate::Passed,
            record: Some(Record {
                container: &attempt.container,
                image,
                message: "switched",
                supersede: Some(&*attempt.engine),
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
        match self.cut_over(target, attempt.progress, announce).await {
            Ok(handover) => Ok(handover),
            Err(err) => {
                // Nothing switched and the records are as they were: leave
                // no container.
                let reason =
                    format!("the switch could not be recorded, so traffic was not moved: {err}");
                Err(self.fail_deploy(attempt, started, reason).await)
            }
        }
    }

    /// The container a deploy was creating is now known to the engine
    /// listing (or gone): stop watching for it.
    async fn forget_starting(&self, service: &str) {
        if let Err(err) = self.commit(service, |record| record.starting = None).await {
            tracing::error!(service, error = %err, "could not update the state file");
        }
    }

    /// Probes the new container until healthy, giving up as soon as it exits.
    async fn await_healthy(
        &self,
        attempt: &Attempt<'_>,
        started: &ContainerInfo,
        addr: std::net::SocketAddr,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let (engine, settings) = (&attempt.engine, &attempt.settings);
        let port = attempt.container.port;
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
            healthy = check_health(addr, settings, attempt.progress, &self.writer.shared().metrics) => healthy.map_err(|err| err.to_string()),
            reason = exited => Err(reason),
        }
    }

    /// Cleans up after a failed deploy and builds the caller's error: the
    /// reason, the serving colour left untouched, what became of the new
    /// container, its last logs.
    async fn fail_deploy(
        self: &Arc<Self>,
        attempt: &Attempt<'_>,
        started: &ContainerInfo,
        reason: String,
    ) -> ControlError {
        let Attempt {
            service,
            image,
            current,
            progress,
            ..
        } = attempt;
        let engine = &*attempt.engine;
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
            .commit(service, |record| {
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
        engine: &dyn ContainerRuntime,
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
        engine: &dyn ContainerRuntime,
        container: &ContainerSettings,
        progress: &Progress,
    ) -> Result<(), ControlError> {
        let active_id = self
            .writer
            .active(service)
            .and_then(|u| u.container.as_ref().map(|c| c.id.clone()));
        let warm_id = self
            .records
            .get(service)
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
            self.commit(service, |record| record.previous = None)
                .await?;
        }
        Ok(())
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
    engine: &dyn ContainerRuntime,
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

pub(super) fn deploy_record(image: &str, ok: bool, message: &str) -> DeployRecord {
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
