//! Keeping the old colour warm and retiring it: after a switch the colour
//! that stopped serving runs on for `keep_previous` (an instant rollback
//! target), then is stopped and removed unless a rollback made it active
//! again; the warm colour a deploy supersedes goes at once; deployed
//! images beyond `retain` are removed.
//!
//! Retirement times are Unix seconds in the state file (they survive a
//! restart); the timers waiting for them run on tokio's clock.

use std::sync::Arc;
use std::time::Duration;

use super::{short, Deployer};
use crate::config::ContainerSettings;
use crate::control::state::{now_unix, PreviousState};
use crate::control::Progress;
use crate::docker::ContainerRuntime;
use crate::upstream::Upstream;

impl Deployer {
    /// After a switch, the warm previous colour from before the deploy is
    /// superseded by the colour that just stopped serving: stops and
    /// removes it. A failure is logged; the container is no longer named
    /// anywhere, so the next reconciliation removes it.
    pub(crate) async fn retire_superseded(
        &self,
        engine: &dyn ContainerRuntime,
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
    pub(crate) fn keep_warm(
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
        let deployer = Arc::clone(self);
        let shutdown = self.writer.shutdown_token();
        self.writer.spawn(async move {
            let wait = Duration::from_secs(retire_at.saturating_sub(now_unix()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            loop {
                match deployer.writer.claim(&service) {
                    Ok(_busy) => {
                        deployer
                            .retire_previous(&service, &container_id, retire_at)
                            .await;
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

    /// The timer for `retire_at` fired: retires `container_id` if it is
    /// still the previous colour and its window ends by then.
    async fn retire_previous(&self, service: &str, container_id: &str, retire_at: u64) {
        let record = self.records.get(service);
        // A rollback can make a container the previous colour again with a
        // new window; the timer of its first window must then do nothing.
        // Compared with the time this timer was set for, not the wall
        // clock's now: the timer runs on tokio's clock (paused in tests),
        // and it fires at `retire_at`.
        let due = record.previous.as_ref().is_some_and(|previous| {
            previous.retire_at <= retire_at
                && previous
                    .container
                    .as_ref()
                    .is_some_and(|c| c.id == container_id)
        });
        if !due {
            return;
        }
        let stop_timeout = self
            .writer
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
                if let Err(err) = self.commit(service, |record| record.previous = None).await {
                    tracing::error!(service, error = %err, "could not record the retirement");
                }
            }
            Err(err) => tracing::warn!(service, error = %err, "retiring previous colour failed"),
        }
    }

    /// Removes deployed images beyond the newest `retain` + 1 (the active
    /// one plus `retain` rollback targets). Images still in use are kept.
    /// Trims the images a deploy left for after its bake window.
    pub(super) async fn prune(&self, service: &str, pruning: super::Pruning) {
        self.prune_images(service, &*pruning.engine, pruning.retain)
            .await;
    }

    pub(super) async fn prune_images(
        &self,
        service: &str,
        engine: &dyn ContainerRuntime,
        retain: usize,
    ) {
        let mut removed = Vec::new();
        let trimmed = self
            .commit(service, |record| {
                if record.history.len() > retain + 1 {
                    removed = record.history.split_off(retain + 1);
                }
            })
            .await;
        if let Err(err) = trimmed {
            tracing::error!(service, error = %err, "could not record the deploy in the state file");
        }
        for image in removed {
            match engine.remove_image(&image).await {
                Ok(()) => tracing::info!(service, image, "removed old image (retain)"),
                Err(err) => tracing::debug!(service, image, error = %err, "old image kept"),
            }
        }
    }
}

pub(crate) fn previous_state(old: &Upstream, keep: Duration) -> PreviousState {
    PreviousState {
        color: old.label.clone(),
        addr: old.addr,
        container: old.container.clone(),
        retire_at: retire_time(keep),
    }
}

/// When a colour kept warm for `keep` is retired, in whole seconds rounded
/// up (so "500ms" still keeps it briefly instead of retiring it at once).
pub(super) fn retire_time(keep: Duration) -> u64 {
    let seconds = u64::try_from(keep.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
    now_unix().saturating_add(seconds)
}
