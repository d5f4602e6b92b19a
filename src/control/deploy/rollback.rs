//! Rollback: back to the warm previous colour when it still runs (an
//! instant swap after a health check, through the shared cut-over step),
//! else a deploy of the previous image.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{container_settings, Deployer, ImageChoice};
use crate::config::{ContainerSettings, Service};
use crate::control::cutover::{Gate, Record, Target};
use crate::control::report::{RollbackReport, SwapBackReport};
use crate::control::state::PreviousState;
use crate::control::writer::Activation;
use crate::control::{ControlError, Progress};
use crate::docker::{ContainerInfo, ContainerRuntime};
use crate::upstream::Upstream;

impl Deployer {
    /// Swaps back to the warm previous colour (after a health check), or,
    /// when it was retired, deploys the previous image again.
    pub async fn rollback(
        self: &Arc<Self>,
        service: &str,
        docker_config: Option<PathBuf>,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<RollbackReport, ControlError> {
        let _busy = self.writer.claim(service)?;
        self.end_bake(service);
        if self.writer.canary(service).is_some() {
            // During a canary the previous colour is the active one: a
            // rollback ends the canary.
            progress.emit("rollback", "a canary is running: aborting it");
            return self
                .abort_claimed(service, "rolled back (canary aborted)", progress)
                .await
                .map(|(report, _)| RollbackReport::Abort(report));
        }
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
        let (_, settings) = self.writer.service_config(service)?;
        let container = container_settings(service, &settings)?;
        let engine = self.engine().await?;
        let record = self.records.get(service);
        let current = self.writer.active(service);
        let current_image = current
            .as_ref()
            .and_then(|u| u.container.as_ref().map(|c| c.image.clone()));

        if let Some(previous) = record.previous.clone() {
            if let Some(warm) = warm_container(&*engine, &previous, container.port).await {
                let warm = Warm {
                    addr: warm.host_addr.unwrap_or(previous.addr),
                    previous,
                };
                return self
                    .swap_back(service, warm, Gate::Probe, &settings, &container, progress)
                    .await
                    .map(|(report, _)| RollbackReport::Instant(report));
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
        let (report, _, pruning) = self
            .deploy_claimed(
                service,
                ImageChoice::Image(target),
                None,
                docker_config,
                progress,
                cancel,
            )
            .await?;
        if let Some(pruning) = pruning {
            self.prune(service, pruning).await;
        }
        Ok(RollbackReport::Redeploy(Box::new(report)))
    }

    /// After a breached bake of a full switch: straight back to the warm
    /// previous colour (one probe, no history walk, no redeploy: if it is
    /// gone, nothing is rolled back and the caller says so). Returns when
    /// the snapshot was stored. The caller holds the busy claim.
    pub(super) async fn swap_back_after_breach(
        self: &Arc<Self>,
        service: &str,
        progress: &Progress,
    ) -> Result<Instant, ControlError> {
        let (_, settings) = self.writer.service_config(service)?;
        let container = container_settings(service, &settings)?;
        let previous = self.records.get(service).previous.ok_or_else(|| {
            ControlError::Refused(format!(
                "{service} has no warm previous colour to go back to"
            ))
        })?;
        // The warm colour served until the switch; its record names where
        // (its container, still running, keeps its published port across a
        // restart of cutover; the single probe below checks it answers).
        let addr = previous.addr;
        let warm = Warm { previous, addr };
        self.swap_back(service, warm, Gate::Once, &settings, &container, progress)
            .await
            .map(|(_, published)| published)
    }

    /// The instant rollback: the previous container is still running.
    async fn swap_back(
        self: &Arc<Self>,
        service: &str,
        Warm { previous, addr }: Warm,
        gate: Gate,
        settings: &Service,
        container: &ContainerSettings,
        progress: &Progress,
    ) -> Result<(SwapBackReport, Instant), ControlError> {
        let config = self.writer.current_config();
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
            gate,
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
        if let Err(err) = self.writer.save_state().await {
            tracing::error!(service, error = %err, "could not record the rollback");
        }
        let report = SwapBackReport {
            service: service.to_string(),
            color: previous.color,
            image,
            instant: true,
            upstream: addr.to_string(),
            timings: handover.activation.timings(),
            drain: handover.drain,
        };
        Ok((report, handover.activation.published))
    }
}

/// The warm previous colour, running, and where it listens now.
struct Warm {
    previous: PreviousState,
    addr: std::net::SocketAddr,
}

/// The previous container if it is still running.
async fn warm_container(
    engine: &dyn ContainerRuntime,
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
