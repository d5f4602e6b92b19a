//! Canary deploys: `deploy --canary 10%` starts the new colour and, once it
//! is healthy, gives it a share of the clients (sticky by cookie, see
//! `routing::canary`) while the old colour stays active; `promote` then
//! switches everything to it through the shared cut-over step (drain, keep
//! the old colour warm), and `abort` (or `rollback`, or a breached bake)
//! sends every client back and removes the canary's container, as a failed
//! deploy's would be.
//!
//! The split is one field of the service's snapshot slot, persisted with
//! every state write, so a restart keeps serving it and reconciliation
//! keeps the canary's container.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::bake::{Baking, Length, Phase};
use super::{container_settings, deploy_record, short, Attempt, Deployer, Pruning};
use crate::config::Steps;
use crate::control::cutover::{Gate, Record, Target};
use crate::control::report::{AbortReport, BakeReport, PromoteReport};
use crate::control::state::ContainerState;
use crate::control::writer::Activation;
use crate::control::{drain, ControlError, Progress};
use crate::docker::ContainerInfo;
use crate::routing::canary::FULL_SHARE;
use crate::routing::Canary;
use crate::upstream::Upstream;

/// Parses a canary share written `"10%"`, `"10"` or `"2.5%"` into basis
/// points; it must leave both colours some traffic (0 < share < 100%).
pub fn parse_share(text: &str) -> Result<u32, String> {
    let fraction =
        crate::config::parse_percent(text).map_err(|err| format!("canary share: {err}"))?;
    let bp = (fraction * f64::from(FULL_SHARE)).round() as u32;
    if bp == 0 || bp >= FULL_SHARE {
        return Err(format!(
            "canary share {text:?} must be above 0% and below 100% (a full switch is a plain deploy)"
        ));
    }
    Ok(bp)
}

/// A share in basis points, for people: `10%`, `2.5%`.
pub(crate) fn share_text(bp: u32) -> String {
    let percent = f64::from(bp) / 100.0;
    format!("{percent}%")
}

impl Deployer {
    /// Refuses to start a deploy while a canary runs: it would have to
    /// replace one of the two serving colours.
    pub(super) fn refuse_during_canary(&self, service: &str) -> Result<(), ControlError> {
        match self.writer.canary(service) {
            Some(canary) => Err(ControlError::Refused(format!(
                "{service} has a canary running ({} at {}): `promote` or `abort` it first",
                canary.upstream.label,
                share_text(canary.share_bp)
            ))),
            None => Ok(()),
        }
    }

    /// The healthy new container takes `share_bp` of the clients beside the
    /// active colour; if that cannot be recorded, the deploy fails and the
    /// container goes.
    pub(super) async fn start_canary(
        self: &Arc<Self>,
        attempt: &Attempt<'_>,
        started: &ContainerInfo,
        addr: std::net::SocketAddr,
        share_bp: u32,
    ) -> Result<(Arc<Upstream>, std::time::Duration), ControlError> {
        let Attempt {
            service,
            image,
            color,
            progress,
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
        let Some(active) = self.writer.active(service) else {
            let reason = "no colour is active any more to run a canary beside".to_string();
            return Err(self.fail_deploy(attempt, started, reason).await);
        };
        let canary = Canary::new(service, &active, Arc::clone(&upstream), share_bp);
        let before = self.records.get(service);
        let message = format!("canary at {}", share_text(share_bp));
        self.records.update(service, |record| {
            record.starting = None;
            record.last_deploy = Some(deploy_record(image, true, &message));
        });
        let write_started = Instant::now();
        if let Err(err) = self.writer.set_canary(service, Some(canary)).await {
            self.records.update(service, |record| *record = before);
            let reason = format!("the canary could not be recorded, so no traffic moved: {err}");
            return Err(self.fail_deploy(attempt, started, reason).await);
        }
        let took = write_started.elapsed();
        progress.emit(
            "canary",
            format!(
                "{color} ({image}) takes {} of new clients beside {} (sticky cookie {}); `cutover promote {service}` or `cutover abort {service}`",
                share_text(share_bp),
                active.label,
                crate::routing::canary::cookie_name(service)
            ),
        );
        Ok((upstream, took))
    }

    /// The shares a plain deploy of `service` steps through, when its bake
    /// lists `steps` and there is an active colour to step away from (a
    /// first deploy, and `--canary`, do not step).
    pub(super) fn planned_steps(&self, service: &str, canary: Option<u32>) -> Option<Steps> {
        if canary.is_some() || self.writer.active(service).is_none() {
            return None;
        }
        let (_, settings) = self.writer.service_config(service).ok()?;
        settings.bake?;
        settings.steps.filter(|steps| {
            steps
                .shares
                .first()
                .is_some_and(|&first| first < FULL_SHARE)
        })
    }

    /// A stepped rollout: the canary started at the first share; each step
    /// is judged for `steps.interval`, then the share rises; a last step of
    /// 100% is a promote (judged for the service's window). A breach at any
    /// step aborts the canary and is the error the deploy fails with; an
    /// operator's promote, abort or rollback, or the shutdown, ends the
    /// rollout where it is.
    pub(super) async fn step_through(
        self: &Arc<Self>,
        service: &str,
        first: Baking,
        steps: &Steps,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Option<BakeReport>, ControlError> {
        let upstream = Arc::clone(&first.upstream);
        let count = steps.shares.len();
        let mut baking = Some(first);
        let mut verdict = None;
        for (index, &share) in steps.shares.iter().enumerate() {
            let step = format!("step {}/{count}", index + 1);
            if share == FULL_SHARE {
                progress.emit(
                    "step",
                    format!("{step}: 100%: promoting {}", upstream.label),
                );
                return Ok(self.promote(service, progress, cancel).await?.bake);
            }
            let judged = match baking.take() {
                Some(first) => first,
                None => {
                    self.set_share(service, &upstream, share, progress, &step)
                        .await?;
                    Baking {
                        baseline: upstream.stats().snapshot(),
                        upstream: Arc::clone(&upstream),
                        phase: Phase::Canary,
                        length: Length::Whole,
                    }
                }
            };
            let last = index + 1 == count;
            let judged = Baking {
                length: Length::Step {
                    length: steps.interval,
                    last,
                },
                ..judged
            };
            verdict = self.bake(service, judged, progress, cancel).await?;
            if verdict
                .as_ref()
                .is_none_or(|report| report.state != "passed")
            {
                // Ended by an operator or the shutdown (or the bake was
                // taken out of the config): the rollout stops here.
                break;
            }
        }
        Ok(verdict)
    }

    /// Raises the running canary to `share_bp` for the next step; refused
    /// when the canary is no longer `upstream` (an operator promoted,
    /// aborted or rolled back meanwhile).
    async fn set_share(
        self: &Arc<Self>,
        service: &str,
        upstream: &Arc<Upstream>,
        share_bp: u32,
        progress: &Progress,
        step: &str,
    ) -> Result<(), ControlError> {
        let _busy = self.writer.claim(service)?;
        let running = self
            .writer
            .canary(service)
            .is_some_and(|canary| Arc::ptr_eq(&canary.upstream, upstream));
        let (true, Some(active)) = (running, self.writer.active(service)) else {
            return Err(ControlError::Refused(format!(
                "the canary of {service} changed during its rollout (promoted, aborted or rolled back): its steps stop"
            )));
        };
        let canary = Canary::new(service, &active, Arc::clone(upstream), share_bp);
        let before = self.records.get(service);
        let image = upstream
            .container
            .as_ref()
            .map_or_else(|| upstream.label.clone(), |c| c.image.clone());
        let message = format!("canary at {} ({step})", share_text(share_bp));
        self.records.update(service, |record| {
            record.last_deploy = Some(deploy_record(&image, true, &message));
        });
        if let Err(err) = self.writer.set_canary(service, Some(canary)).await {
            self.records.update(service, |record| *record = before);
            return Err(err);
        }
        progress.emit(
            "step",
            format!(
                "{step}: {} takes {} of new clients beside {}",
                upstream.label,
                share_text(share_bp),
                active.label
            ),
        );
        Ok(())
    }

    /// Switches everything to the service's canary (drain, keep the old
    /// colour warm), then judges it for the bake window.
    pub async fn promote(
        self: &Arc<Self>,
        service: &str,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<PromoteReport, ControlError> {
        let (mut report, baking, pruning) = {
            let _busy = self.writer.claim(service)?;
            self.end_bake(service);
            self.promote_claimed(service, progress).await?
        };
        let baked = self.bake(service, baking, progress, cancel).await;
        self.prune(service, pruning).await;
        report.bake = baked?;
        Ok(report)
    }

    async fn promote_claimed(
        self: &Arc<Self>,
        service: &str,
        progress: &Progress,
    ) -> Result<(PromoteReport, Baking, Pruning), ControlError> {
        let (_, settings) = self.writer.service_config(service)?;
        let container = container_settings(service, &settings)?;
        let canary = self
            .writer
            .canary(service)
            .ok_or_else(|| ControlError::Refused(format!("{service} has no canary to promote")))?;
        let engine = self.engine().await?;
        let upstream = Arc::clone(&canary.upstream);
        let image = upstream
            .container
            .as_ref()
            .map_or_else(|| upstream.label.clone(), |c| c.image.clone());
        let baseline = upstream.stats().snapshot();
        let target = Target {
            service,
            upstream: Arc::clone(&upstream),
            settings: &settings,
            // It has served its share since its health gate.
            gate: Gate::Passed,
            record: Some(Record {
                container: &container,
                image: &image,
                message: "promoted",
                supersede: Some(&*engine),
            }),
        };
        let color = upstream.label.clone();
        let announce = |activation: &Activation| {
            format!(
                "promoted {service}: every client on {color} ({image}): swap {} ns{}",
                activation.swap.as_nanos(),
                activation
                    .old
                    .as_ref()
                    .map(|o| format!(", was {}", o.label))
                    .unwrap_or_default()
            )
        };
        let handover = self.cut_over(target, progress, announce).await?;
        let pruning = Pruning {
            engine,
            retain: container.retain,
        };
        let report = PromoteReport {
            service: service.to_string(),
            color: upstream.label.clone(),
            image: upstream.container.as_ref().map(|c| c.image.clone()),
            upstream: upstream.addr.to_string(),
            promoted: true,
            timings: handover.activation.timings(),
            drain: handover.drain,
            bake: None,
        };
        let baking = Baking {
            upstream,
            baseline,
            phase: Phase::Switch,
            length: Length::Whole,
        };
        Ok((report, baking, pruning))
    }

    /// Ends the service's canary: every client back on the active colour.
    pub async fn abort(
        self: &Arc<Self>,
        service: &str,
        progress: &Progress,
    ) -> Result<AbortReport, ControlError> {
        let _busy = self.writer.claim(service)?;
        self.end_bake(service);
        self.abort_claimed(service, "canary aborted", progress)
            .await
            .map(|(report, _)| report)
    }

    /// The abort itself (the caller holds the claim): persist and publish
    /// the slot without the canary, drain the canary, stop and remove its
    /// container. Returns when the snapshot was stored, too.
    pub(super) async fn abort_claimed(
        self: &Arc<Self>,
        service: &str,
        why: &str,
        progress: &Progress,
    ) -> Result<(AbortReport, Instant), ControlError> {
        let (_, settings) = self.writer.service_config(service)?;
        let canary = self
            .writer
            .canary(service)
            .ok_or_else(|| ControlError::Refused(format!("{service} has no canary to abort")))?;
        let upstream = Arc::clone(&canary.upstream);
        let image = upstream.container.as_ref().map(|c| c.image.clone());
        let before = self.records.get(service);
        let label = image.clone().unwrap_or_else(|| upstream.label.clone());
        self.records.update(service, |record| {
            record.last_deploy = Some(deploy_record(&label, false, why));
        });
        let published = match self.writer.set_canary(service, None).await {
            Ok((_, published)) => published,
            Err(err) => {
                self.records.update(service, |record| *record = before);
                return Err(err);
            }
        };
        let active = self
            .writer
            .active(service)
            .map_or_else(|| "none".to_string(), |a| a.label.clone());
        progress.emit(
            "aborted",
            format!(
                "{why}: every client back on {active}; draining {}",
                upstream.label
            ),
        );
        let drained = drain(&upstream, &settings, progress).await;
        let removed = match (&upstream.container, settings.container.as_ref()) {
            (Some(state), Some(container)) => match self.engine().await {
                Ok(engine) => match engine
                    .stop_and_remove(&state.id, container.stop_timeout)
                    .await
                {
                    Ok(()) => {
                        progress.emit(
                            "removed",
                            format!("the canary container {} was removed", short(&state.id)),
                        );
                        true
                    }
                    Err(err) => {
                        tracing::warn!(service, container = %state.id, error = %err, "could not remove the aborted canary; the next reconciliation does");
                        false
                    }
                },
                Err(err) => {
                    tracing::warn!(service, error = %err, "could not remove the aborted canary; the next reconciliation does");
                    false
                }
            },
            _ => false,
        };
        let report = AbortReport {
            service: service.to_string(),
            color: active,
            aborted_canary: upstream.label.clone(),
            canary_image: image,
            removed,
            drain: drained,
        };
        Ok((report, published))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_to_basis_points() {
        assert_eq!(parse_share("10%"), Ok(1_000));
        assert_eq!(parse_share("10"), Ok(1_000));
        assert_eq!(parse_share(" 2.5 % "), Ok(250));
        for bad in ["0%", "100%", "120%", "-5%", "ten", ""] {
            assert!(parse_share(bad).is_err(), "{bad}");
        }
        assert_eq!(share_text(250), "2.5%");
    }
}
