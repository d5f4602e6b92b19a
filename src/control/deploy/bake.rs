//! The bake window: after a canary starts, or after a full switch (a
//! deploy or a promote), the new colour's answers are judged against the
//! service's `bake` thresholds every [`TICK`]; on a breach traffic goes
//! back to the warm previous colour at once (a canary is aborted, a full
//! switch swapped back through the rollback path).
//!
//! The figures are the upstream's own counters ([`UpstreamStats`]): the
//! window is the difference between now and a snapshot taken when it
//! began, so judging costs the request path nothing. The operation that
//! started the window stays attached until it ends ([`Deployer::bake`]);
//! a canary that passes its window goes on being judged in the background
//! until it is promoted or aborted.
//!
//! Any other operation on the service (deploy, promote, abort, rollback,
//! switch) ends a running window first ([`Deployer::end_bake`]), so a judge
//! never rolls back something an operator already changed.
//!
//! [`UpstreamStats`]: crate::upstream::stats::UpstreamStats

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Deployer;
use crate::config::BakeSettings;
use crate::control::report::BakeReport;
use crate::control::state::{now_unix, BakePhase, BakeState};
use crate::control::{ControlError, Progress};
use crate::upstream::stats::StatsSnapshot;
use crate::upstream::Upstream;

/// How often the judge looks at the figures: a breach is acted on at most
/// this long after the answer that caused it.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// How often a progress line is sent while judging.
const REPORT_EVERY: u32 = 10;

/// What is being judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A canary, beside the active colour.
    Canary,
    /// A colour that took all traffic; the previous one is warm.
    Switch,
    /// Nothing to go back to (a first deploy): no window.
    Unjudged,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Canary => "canary",
            Phase::Switch => "switch",
            Phase::Unjudged => "unjudged",
        }
    }

    /// As the state file records it (an unjudged deploy is not recorded).
    fn persisted(self) -> Option<BakePhase> {
        match self {
            Phase::Canary => Some(BakePhase::Canary),
            Phase::Switch => Some(BakePhase::Switch),
            Phase::Unjudged => None,
        }
    }
}

impl From<BakePhase> for Phase {
    fn from(phase: BakePhase) -> Phase {
        match phase {
            BakePhase::Canary => Phase::Canary,
            BakePhase::Switch => Phase::Switch,
        }
    }
}

/// A window to judge: the new colour and its counters when it began.
pub(crate) struct Baking {
    pub upstream: Arc<Upstream>,
    pub baseline: StatsSnapshot,
    pub phase: Phase,
    pub length: Length,
}

/// How long a window runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Length {
    /// The service's `bake.window`, from now.
    Whole,
    /// Until this Unix second: what a restart left of a recorded window.
    Until(u64),
    /// One step of a stepped rollout. A step before the last ends with its
    /// verdict (the rollout goes on); the last is judged on afterwards, as
    /// any canary is.
    Step { length: Duration, last: bool },
}

/// How a judged window ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// The window ended with every threshold kept.
    Passed(StatsSnapshot),
    /// A threshold was broken at `observed`.
    Breached {
        window: StatsSnapshot,
        reason: String,
        observed: Instant,
        /// Time judged until the breach.
        elapsed: Duration,
    },
    /// Another operation or the shutdown ended the window first.
    Ended(StatsSnapshot),
}

/// Why `window` breaks `bake`, or `None` while it keeps to it (and while
/// it has fewer than `min_requests` answers, which say nothing yet).
pub(crate) fn verdict(window: &StatsSnapshot, bake: &BakeSettings) -> Option<String> {
    let requests = window.requests();
    if requests < bake.min_requests.max(1) {
        return None;
    }
    let rate = window.error_rate();
    if rate > bake.max_error_rate {
        return Some(format!(
            "error rate {:.2}% ({} of {requests} answers were 5xx) is above max_error_rate {:.2}%",
            rate * 100.0,
            window.server_errors(),
            bake.max_error_rate * 100.0
        ));
    }
    let (Some(limit), Some(p99)) = (bake.max_p99, window.latency_quantile(0.99)) else {
        return None;
    };
    (p99 > limit).then(|| {
        format!(
            "p99 latency {} over {requests} answers is above max_p99 {} ms",
            p99_text(p99),
            limit.as_millis()
        )
    })
}

fn p99_text(p99: Duration) -> String {
    if p99 == Duration::MAX {
        "> 10 s".to_string()
    } else {
        format!("≤ {} ms", p99.as_millis())
    }
}

/// Judges `upstream`'s answers since `baseline` every [`TICK`] until
/// `until` (forever with `None`), a breach, or `stop`. `tick` sees the
/// window and the time judged, for progress lines.
pub(crate) async fn judge(
    upstream: &Upstream,
    baseline: StatsSnapshot,
    bake: &BakeSettings,
    until: Option<Instant>,
    stop: &CancellationToken,
    mut tick: impl FnMut(&StatsSnapshot, Duration, u32),
) -> Outcome {
    let began = Instant::now();
    let mut ticks = tokio::time::interval_at(began + TICK, TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut count = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                return Outcome::Ended(upstream.stats().snapshot().since(&baseline));
            }
            _ = ticks.tick() => {}
        }
        count += 1;
        let window = upstream.stats().snapshot().since(&baseline);
        if let Some(reason) = verdict(&window, bake) {
            return Outcome::Breached {
                window,
                reason,
                observed: Instant::now(),
                elapsed: began.elapsed(),
            };
        }
        tick(&window, began.elapsed(), count);
        if until.is_some_and(|until| Instant::now() >= until) {
            return Outcome::Passed(window);
        }
    }
}

/// What a judge saw when a threshold broke, and the window's record in
/// the state file.
struct Breach {
    window: StatsSnapshot,
    reason: String,
    observed: Instant,
    elapsed: Duration,
    persisted: Option<BakeState>,
}

/// The running windows (to end them) and the last verdict of each service
/// (for `status`).
#[derive(Default)]
pub(crate) struct Bakes {
    running: Mutex<HashMap<String, CancellationToken>>,
    last: Mutex<HashMap<String, BakeReport>>,
}

impl Bakes {
    fn begin(&self, service: &str, parent: &CancellationToken) -> CancellationToken {
        let stop = parent.child_token();
        if let Ok(mut running) = self.running.lock() {
            if let Some(old) = running.insert(service.to_string(), stop.clone()) {
                old.cancel();
            }
        }
        stop
    }

    fn end(&self, service: &str) {
        if let Ok(mut running) = self.running.lock() {
            if let Some(stop) = running.remove(service) {
                stop.cancel();
            }
        }
    }

    fn set(&self, service: &str, report: BakeReport) {
        if let Ok(mut last) = self.last.lock() {
            last.insert(service.to_string(), report);
        }
    }

    pub(crate) fn last(&self, service: &str) -> Option<BakeReport> {
        self.last.lock().ok()?.get(service).cloned()
    }
}

fn report(
    upstream: &Upstream,
    phase: Phase,
    state: &str,
    window: &StatsSnapshot,
    elapsed: Duration,
) -> BakeReport {
    BakeReport {
        color: upstream.label.clone(),
        phase: phase.name().to_string(),
        state: state.to_string(),
        requests: window.requests(),
        errors: window.server_errors(),
        p99_ms: window
            .latency_quantile(0.99)
            .map(|p99| u64::try_from(p99.as_millis()).unwrap_or(u64::MAX)),
        elapsed_ms: elapsed.as_millis() as u64,
        reason: None,
        breach_to_switch_ms: None,
        at: now_unix(),
    }
}

fn figures(window: &StatsSnapshot) -> String {
    format!(
        "{} answers, {} 5xx ({:.2}%), p99 {}",
        window.requests(),
        window.server_errors(),
        window.error_rate() * 100.0,
        window
            .latency_quantile(0.99)
            .map_or("-".to_string(), p99_text)
    )
}

impl Deployer {
    /// Ends the service's running bake window, if any: the caller is an
    /// operation that changes the service itself.
    pub(crate) fn end_bake(&self, service: &str) {
        self.bakes.end(service);
    }

    /// Counts a bake window's end for the metrics endpoint.
    fn count_bake(&self, service: &str, phase: Phase, outcome: &str) {
        self.writer
            .shared()
            .metrics
            .bake(service, phase.name(), outcome);
    }

    /// The last bake verdict of `service`, for status.
    pub(crate) fn last_bake(&self, service: &str) -> Option<BakeReport> {
        self.bakes.last(service)
    }

    /// Judges `baking` for the service's bake window (nothing without
    /// `bake`), streaming progress; rolls back on a breach and fails with
    /// the figures. A canary that passes is judged on in the background.
    /// `cancel` (the server's shutdown) ends the window, leaving the
    /// split or switch as it is.
    pub(crate) async fn bake(
        self: &Arc<Self>,
        service: &str,
        baking: Baking,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Option<BakeReport>, ControlError> {
        let Ok((_, settings)) = self.writer.service_config(service) else {
            return Ok(None);
        };
        let Some(bake) = settings.bake else {
            return Ok(None);
        };
        if baking.phase == Phase::Unjudged {
            progress.emit(
                "bake",
                "first deploy: no previous colour to roll back to, so no bake window",
            );
            return Ok(None);
        }
        let Baking {
            upstream,
            baseline,
            phase,
            length,
        } = baking;
        let window = match length {
            Length::Whole => bake.window,
            Length::Until(until) => Duration::from_secs(until.saturating_sub(now_unix())),
            Length::Step { length, .. } => length,
        };
        let stop = self.bakes.begin(service, cancel);
        let persisted = phase.persisted().map(|phase| BakeState {
            color: upstream.label.clone(),
            phase,
            until: match length {
                Length::Until(until) => until,
                _ => now_unix() + window.as_secs_f64().ceil() as u64,
            },
        });
        if !matches!(length, Length::Until(_)) {
            self.remember_bake(service, persisted.clone()).await;
        }
        let started = report(
            &upstream,
            phase,
            "running",
            &StatsSnapshot::default(),
            Duration::ZERO,
        );
        self.bakes.set(service, started);
        progress.emit(
            "bake",
            format!(
                "judging {} ({}) for {:?}{}: at most {:.2}% 5xx{} once {} answers are in",
                upstream.label,
                phase.name(),
                window,
                match length {
                    Length::Until(_) => " (what is left of its window after a restart)",
                    Length::Step { .. } => " (this step)",
                    Length::Whole => "",
                },
                bake.max_error_rate * 100.0,
                bake.max_p99
                    .map(|p| format!(", p99 at most {} ms", p.as_millis()))
                    .unwrap_or_default(),
                bake.min_requests
            ),
        );
        let began = Instant::now();
        let until = began + window;
        let outcome = judge(
            &upstream,
            baseline,
            &bake,
            Some(until),
            &stop,
            |figures_now, elapsed, n| {
                if n % REPORT_EVERY == 0 {
                    progress.emit(
                        "bake",
                        format!(
                            "{} {:.1}s of {:?}: {}",
                            upstream.label,
                            elapsed.as_secs_f64(),
                            window,
                            figures(figures_now)
                        ),
                    );
                }
            },
        )
        .await;
        let elapsed = began.elapsed();
        match outcome {
            Outcome::Passed(window) => {
                self.count_bake(service, phase, "passed");
                let passed = report(&upstream, phase, "passed", &window, elapsed);
                self.bakes.set(service, passed.clone());
                progress.emit(
                    "baked",
                    format!(
                        "{} passed its bake window: {}",
                        upstream.label,
                        figures(&window)
                    ),
                );
                let step_before_last = matches!(length, Length::Step { last: false, .. });
                if phase == Phase::Canary && !step_before_last {
                    self.judge_canary_on(service, upstream, baseline, bake, stop, persisted);
                } else {
                    self.forget_bake(service, persisted.as_ref()).await;
                }
                Ok(Some(passed))
            }
            Outcome::Ended(window) => {
                self.count_bake(service, phase, "interrupted");
                self.ended_bake(service, persisted.as_ref()).await;
                let ended = report(&upstream, phase, "interrupted", &window, elapsed);
                self.bakes.set(service, ended.clone());
                progress.emit(
                    "bake",
                    format!(
                        "bake window of {} ended early (another operation or shutdown): {}",
                        upstream.label,
                        figures(&window)
                    ),
                );
                Ok(Some(ended))
            }
            Outcome::Breached {
                window,
                reason,
                observed,
                elapsed,
            } => {
                let breach = Breach {
                    window,
                    reason,
                    observed,
                    elapsed,
                    persisted,
                };
                Err(self
                    .breached(service, &upstream, phase, breach, &stop, progress)
                    .await)
            }
        }
    }

    /// A canary that passed its window stays judged until it is promoted
    /// or aborted (which end the window) or the server stops.
    fn judge_canary_on(
        self: &Arc<Self>,
        service: &str,
        upstream: Arc<Upstream>,
        baseline: StatsSnapshot,
        bake: BakeSettings,
        stop: CancellationToken,
        persisted: Option<BakeState>,
    ) {
        let deployer = Arc::clone(self);
        let service = service.to_string();
        self.writer.spawn(async move {
            let outcome = judge(&upstream, baseline, &bake, None, &stop, |_, _, _| {}).await;
            match outcome {
                Outcome::Breached {
                    window,
                    reason,
                    observed,
                    elapsed,
                } => {
                    let progress = Progress::log_only();
                    let breach = Breach {
                        window,
                        reason,
                        observed,
                        elapsed,
                        persisted,
                    };
                    let err = deployer
                        .breached(&service, &upstream, Phase::Canary, breach, &stop, &progress)
                        .await;
                    tracing::error!(service, error = %err, "canary breached its bake thresholds");
                }
                Outcome::Ended(_) => deployer.ended_bake(&service, persisted.as_ref()).await,
                Outcome::Passed(_) => {}
            }
        });
    }

    /// Records the running window in the state file, so a restart resumes
    /// it. A failed write is logged: the window is judged all the same,
    /// only a crash would end it.
    async fn remember_bake(&self, service: &str, bake: Option<BakeState>) {
        if bake.is_none() {
            return;
        }
        if let Err(err) = self.commit(service, |record| record.bake = bake).await {
            tracing::warn!(service, error = %err, "the bake window could not be recorded: a restart would not resume it");
        }
    }

    /// Takes the window out of the state file, if it is still the one
    /// recorded (a later operation may have recorded its own).
    async fn forget_bake(&self, service: &str, bake: Option<&BakeState>) {
        let Some(bake) = bake else {
            return;
        };
        if self.records.get(service).bake.as_ref() != Some(bake) {
            return;
        }
        let forgotten = self
            .commit(service, |record| {
                if record.bake.as_ref() == Some(bake) {
                    record.bake = None;
                }
            })
            .await;
        if let Err(err) = forgotten {
            tracing::warn!(service, error = %err, "the ended bake window could not be taken out of the state file");
        }
    }

    /// A window ended before its verdict: by the shutdown (an upgrade or a
    /// restart, which resumes it: it stays recorded) or by an operator's
    /// operation (which decided instead: it is forgotten).
    async fn ended_bake(&self, service: &str, bake: Option<&BakeState>) {
        if !self.writer.shutdown_token().is_cancelled() {
            self.forget_bake(service, bake).await;
        }
    }

    /// At start-up, after reconciliation: resumes each bake window the
    /// state file names whose colour still serves (the active one after a
    /// switch, with its previous colour still warm; the canary). The rest
    /// of the window is judged on the answers from now on, in the
    /// background; a breach rolls back as it would have before the
    /// restart, and is logged and shown in `status`.
    pub(crate) fn resume_bakes(self: &Arc<Self>) {
        for (service, saved) in self.records.bakes() {
            let Some(upstream) = self.baked_upstream(&service, &saved) else {
                tracing::info!(service, color = %saved.color, "the bake window the state file names no longer applies; dropped");
                let deployer = Arc::clone(self);
                self.writer.spawn(async move {
                    deployer.forget_bake(&service, Some(&saved)).await;
                });
                continue;
            };
            tracing::info!(service, color = %saved.color, phase = ?saved.phase, "resuming the bake window cut short by the restart");
            let deployer = Arc::clone(self);
            let cancel = self.writer.shutdown_token();
            self.writer.spawn(async move {
                let baking = Baking {
                    baseline: upstream.stats().snapshot(),
                    upstream,
                    phase: saved.phase.into(),
                    length: Length::Until(saved.until),
                };
                let progress = Progress::log_only();
                if let Err(err) = deployer.bake(&service, baking, &progress, &cancel).await {
                    tracing::error!(service, error = %err, "the resumed bake window failed");
                }
            });
        }
    }

    /// The upstream a saved window judges, if it still serves in its role.
    fn baked_upstream(&self, service: &str, saved: &BakeState) -> Option<Arc<Upstream>> {
        let upstream = match saved.phase {
            BakePhase::Switch => {
                self.records.get(service).previous.as_ref()?;
                self.writer.active(service)?
            }
            BakePhase::Canary => Arc::clone(&self.writer.canary(service)?.upstream),
        };
        (upstream.label == saved.color).then_some(upstream)
    }

    /// A breach: traffic back to the previous colour now, then the error
    /// the attached command exits with (the figures, the reason, the time
    /// from the breach to the switch).
    async fn breached(
        self: &Arc<Self>,
        service: &str,
        upstream: &Upstream,
        phase: Phase,
        breach: Breach,
        stop: &CancellationToken,
        progress: &Progress,
    ) -> ControlError {
        let Breach {
            window,
            reason,
            observed,
            elapsed,
            persisted,
        } = breach;
        let window = &window;
        progress.emit(
            "breach",
            format!(
                "{} breached its bake thresholds: {reason}; rolling back",
                upstream.label
            ),
        );
        tracing::warn!(service, color = %upstream.label, phase = phase.name(), requests = window.requests(), errors = window.server_errors(), "bake breached: {reason}");
        self.count_bake(service, phase, "breached");
        let mut breached = report(upstream, phase, "breached", window, elapsed);
        breached.reason = Some(reason.clone());
        let rolled_back = self
            .roll_back_breach(service, phase, &reason, stop, progress)
            .await;
        let outcome = match rolled_back {
            Ok(published) => {
                let took = published.saturating_duration_since(observed);
                self.writer
                    .shared()
                    .metrics
                    .automatic_rollback(service, phase.name(), took);
                // Decided: a restart has nothing to resume. A rollback that
                // did not happen (the service claimed by an operator's
                // operation or an upgrade's hand-off) leaves the window
                // recorded, for whoever serves next to judge.
                self.forget_bake(service, persisted.as_ref()).await;
                let ms = took.as_millis() as u64;
                breached.breach_to_switch_ms = Some(ms);
                format!("traffic went back to the previous colour {ms} ms after the breach was seen (breach_to_switch_ms={ms})")
            }
            Err(err) => format!("the rollback did not happen: {err}"),
        };
        self.bakes.set(service, breached);
        let message = format!(
            "bake failed: {} {reason} ({}); {outcome}",
            upstream.label,
            figures(window)
        );
        progress.emit("rolled_back", message.clone());
        ControlError::BakeFailed(message)
    }

    /// Sends every new request back to the warm previous colour: the canary
    /// is aborted, a full switch swapped back. Returns when the snapshot
    /// that did it was stored.
    async fn roll_back_breach(
        self: &Arc<Self>,
        service: &str,
        phase: Phase,
        reason: &str,
        stop: &CancellationToken,
        progress: &Progress,
    ) -> Result<Instant, ControlError> {
        // An operator's operation that claimed the service first decides:
        // it ends this window (`stop`). An upgrade's hand-off claims every
        // service without deciding anything: wait for it, a tick at a
        // time, until it gives the claim back (it failed) or this process
        // stops (the new one resumes the window from the state file).
        let _busy = loop {
            match self.writer.claim(service) {
                Ok(busy) => break busy,
                Err(ControlError::Busy(_)) if !stop.is_cancelled() => {
                    tokio::time::sleep(TICK).await
                }
                Err(err) => return Err(err),
            }
        };
        if stop.is_cancelled() {
            return Err(ControlError::Failed(
                "another operation changed the service first".into(),
            ));
        }
        self.bakes.end(service);
        match phase {
            Phase::Canary => {
                let why = format!("canary aborted by its bake: {reason}");
                self.abort_claimed(service, &why, progress)
                    .await
                    .map(|(_, published)| published)
            }
            Phase::Switch | Phase::Unjudged => self.swap_back_after_breach(service, progress).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn bake(min_requests: u64, max_p99: Option<Duration>) -> BakeSettings {
        BakeSettings {
            window: Duration::from_secs(2),
            max_error_rate: 0.01,
            min_requests,
            max_p99,
        }
    }

    fn upstream() -> Arc<Upstream> {
        Upstream::new(
            "127.0.0.1:9".parse().expect("addr"),
            "green",
            &Limits::default(),
        )
    }

    #[test]
    fn verdict_waits_for_min_requests_then_judges_rate_and_p99() {
        let up = upstream();
        let stats = up.stats();
        for _ in 0..98 {
            stats.record(200, Duration::from_millis(2));
        }
        stats.record(500, Duration::from_millis(2));
        stats.record(500, Duration::from_millis(2));
        let window = stats.snapshot();
        assert_eq!(
            verdict(&window, &bake(101, None)),
            None,
            "too few answers yet"
        );
        let reason = verdict(&window, &bake(100, None)).expect("2% > 1%");
        assert!(reason.contains("error rate 2.00% (2 of 100"), "{reason}");
        let healthy = Upstream::new(
            "127.0.0.1:9".parse().expect("addr"),
            "g",
            &Limits::default(),
        );
        for _ in 0..100 {
            healthy.stats().record(200, Duration::from_millis(900));
        }
        let slow = verdict(
            &healthy.stats().snapshot(),
            &bake(100, Some(Duration::from_millis(800))),
        );
        assert!(slow.is_some_and(|r| r.contains("p99")));
        assert_eq!(verdict(&healthy.stats().snapshot(), &bake(100, None)), None);
    }

    /// On tokio's paused clock: a breach is seen at the first tick after
    /// the answers that cause it, and a clean window passes exactly at its
    /// end.
    #[tokio::test(start_paused = true)]
    async fn judge_breaks_at_the_next_tick_and_passes_at_the_window_end() {
        let up = upstream();
        let baseline = up.stats().snapshot();
        let stop = CancellationToken::new();
        let feeder = {
            let up = Arc::clone(&up);
            tokio::spawn(async move {
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    for _ in 0..10 {
                        up.stats().record(200, Duration::from_millis(1));
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
                for _ in 0..10 {
                    up.stats().record(503, Duration::from_millis(1));
                }
            })
        };
        let began = Instant::now();
        let until = Some(began + Duration::from_secs(5));
        let outcome = judge(&up, baseline, &bake(100, None), until, &stop, |_, _, _| {}).await;
        let Outcome::Breached {
            window,
            observed,
            elapsed,
            ..
        } = outcome
        else {
            panic!("no breach: {outcome:?}");
        };
        // 200 ok by 1.0 s, 10 errors at 1.025 s: seen at the 1.1 s tick.
        assert_eq!(observed - began, Duration::from_millis(1_100));
        assert_eq!(elapsed, Duration::from_millis(1_100));
        assert_eq!((window.requests(), window.server_errors()), (210, 10));
        feeder.await.expect("feeder");

        let clean = upstream();
        let baseline = clean.stats().snapshot();
        let began = Instant::now();
        let until = Some(began + Duration::from_secs(2));
        let outcome = judge(&clean, baseline, &bake(1, None), until, &stop, |_, _, _| {}).await;
        assert_eq!(outcome, Outcome::Passed(StatsSnapshot::default()));
        assert_eq!(began.elapsed(), Duration::from_secs(2));

        stop.cancel();
        let outcome = judge(&clean, baseline, &bake(1, None), None, &stop, |_, _, _| {}).await;
        assert!(matches!(outcome, Outcome::Ended(_)), "{outcome:?}");
    }
}
