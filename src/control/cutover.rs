//! The one cut-over step that switch, deploy and rollback share:
//! health gate → (record) → persist → swap → drain → keep warm.
//!
//! Each operation prepares its new upstream its own way (a switch names an
//! address, a deploy starts a container, a rollback finds the warm previous
//! one), then hands it to [`Deployer::cut_over`]: the deployer owns the
//! records a cut-over to a container writes, and the warm colour it keeps. The rules every cut-over
//! keeps live here once: traffic moves only to an upstream that passed its
//! health gate, the state file is written before the swap (so a failed
//! write moves nothing and the records are put back), and the old upstream
//! is drained before its container is scheduled for retirement.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::deploy::{deploy_record, previous_state, Deployer};
use super::report::DrainReport;
use super::writer::Activation;
use super::{check_health, drain, ControlError, Progress};
use crate::config::{ContainerSettings, Service};
use crate::docker::ContainerRuntime;
use crate::upstream::Upstream;

/// How the new upstream proves it is healthy before traffic moves.
pub(crate) enum Gate {
    /// Probe it now with the service's health check.
    Probe,
    /// The operator skipped the check (`switch --force`).
    Skipped,
    /// The caller already proved it (a deploy watches its container while
    /// probing).
    Passed,
    /// One probe, not `healthy_after` in a row: the automatic rollback of
    /// a breached bake, to a warm colour that was serving moments ago and
    /// must take the traffic back now.
    Once,
}

/// What a cut-over to a container records: the outgoing upstream becomes
/// the warm previous colour, `image` the newest in the history, with
/// `message` as the last deploy's outcome.
pub(crate) struct Record<'a> {
    pub container: &'a ContainerSettings,
    pub image: &'a str,
    pub message: &'a str,
    /// A deploy: the warm previous colour from before it is superseded by
    /// the one that just stopped serving, and is stopped right after the
    /// swap, through this engine. `None` for a rollback, whose swap makes
    /// that warm colour the active one.
    pub supersede: Option<&'a dyn ContainerRuntime>,
}

/// What to cut over to, and how.
pub(crate) struct Target<'a> {
    pub service: &'a str,
    pub upstream: Arc<Upstream>,
    pub settings: &'a Service,
    pub gate: Gate,
    /// `None` for a plain switch, which keeps no deploy records.
    pub record: Option<Record<'a>>,
}

/// What [`Deployer::cut_over`] did.
pub(crate) struct Handover {
    pub activation: Activation,
    /// The upstream that took the traffic.
    pub upstream: Arc<Upstream>,
    /// `None` when nothing was active before.
    pub drain: Option<DrainReport>,
    /// Time spent draining.
    pub drain_time: Duration,
}

impl Deployer {
    /// Moves the target's service to its upstream: health gate, then (with a `record`)
    /// the records, persist and swap, the `switched` line that
    /// `announce` words, the drain of the old upstream and, for a
    /// container, keeping it warm for `keep_previous`.
    ///
    /// Fails only before the swap; the records are then as they were.
    pub(crate) async fn cut_over(
        self: &Arc<Self>,
        target: Target<'_>,
        progress: &Progress,
        announce: impl FnOnce(&Activation) -> String,
    ) -> Result<Handover, ControlError> {
        let Target {
            service,
            upstream,
            settings,
            gate,
            record,
        } = target;
        match gate {
            Gate::Probe => {
                check_health(
                    upstream.addr,
                    settings,
                    progress,
                    &self.writer.shared().metrics,
                )
                .await?
            }
            Gate::Skipped => progress.emit(
                "health",
                format!("skipping health check of {} (--force)", upstream.addr),
            ),
            Gate::Passed => {}
            Gate::Once => super::health::probe(upstream.addr, &settings.health)
                .await
                .map_err(|reason| ControlError::Unhealthy {
                    addr: upstream.addr,
                    reason,
                })?,
        }
        let outgoing = self.writer.active(service);
        let incoming = Arc::clone(&upstream);
        let saved_record = self.record(service);
        let activation = match &record {
            // The outgoing upstream becomes the warm previous colour, the
            // image the newest in the history; written with the swap.
            Some(record) => {
                let change = |saved: &mut super::deploy::ServiceRecord| {
                    saved.previous = outgoing
                        .as_deref()
                        .map(|old| previous_state(old, record.container.keep_previous));
                    saved.history.retain(|known| known != record.image);
                    saved.history.insert(0, record.image.to_string());
                    saved.last_deploy = Some(deploy_record(record.image, true, record.message));
                    saved.starting = None;
                };
                self.commit_and_activate(service, change, upstream).await?
            }
            None => self.writer.activate(service, upstream).await?,
        };
        progress.emit("switched", announce(&activation));
        if let Some((engine, record)) = record.as_ref().and_then(|r| Some((r.supersede?, r))) {
            if let Some(superseded) = &saved_record.previous {
                self.retire_superseded(engine, superseded, record.container, progress)
                    .await;
            }
        }
        let drain_started = Instant::now();
        let drain_report = match &activation.old {
            Some(old) => Some(drain(old, settings, progress).await),
            None => None,
        };
        let drain_time = drain_started.elapsed();
        if let (Some(old), Some(record)) = (&activation.old, &record) {
            self.keep_warm(service, old, record.container, progress);
        }
        Ok(Handover {
            activation,
            upstream: incoming,
            drain: drain_report,
            drain_time,
        })
    }
}
