//! Rollback: back to the warm previous colour when it still runs (an
//! instant swap after a health check, through the shared cut-over step),
//! else a deploy of the previous image.

use std::path::PathBuf;
use std::sync::Arc;

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
        let (config, settings) = self.writer.service_config(service)?;
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
                    .swap_back(service, warm, &config, &settings, &container, progress)
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
    async fn swap_back(
        self: &Arc<Self>,
        service: &str,
        Warm { previous, addr }: Warm,
        config: &crate::config::Config,
        settings: &Service,
        container: &ContainerSettings,
        progress: &Progress,
    ) -> Result<SwapBackReport, ControlError> {
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
        if let Err(err) = self.writer.save_state().await {
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
