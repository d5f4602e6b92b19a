//! Reconciliation: making the records and the engine agree. At start-up
//! (the state file against the containers this instance runs), after an
//! engine outage (a sweep that waits for the engine to answer), and for a
//! create that finished after a crash. Keeps what serves, falls back to a
//! healthy warm colour, adopts a serving container when the state file
//! was lost, and removes the rest.

use std::sync::Arc;
use std::time::Duration;

use super::retire::retire_time;
use super::{container_settings, Deployer};
use crate::config::{ContainerSettings, Service};
use crate::control::identity::{self, Named};
use crate::control::state::{ContainerState, PreviousState};
use crate::control::{check_health, health, ControlError, Progress};
use crate::docker::{ContainerInfo, ContainerRuntime};
use crate::routing::Canary;
use crate::upstream::Upstream;

/// How often, and for how long, a container left behind by an engine
/// outage is retried for removal (an hour, then reconciliation at the next
/// start or the next deploy of the service takes over).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const SWEEP_ATTEMPTS: u32 = 3600;

/// How long a restart watches for a container whose create was in flight
/// when cutover stopped (an engine finishes a create in well under this).
const LATE_CREATE_INTERVAL: Duration = Duration::from_millis(500);
const LATE_CREATE_CHECKS: u32 = 30;

impl Deployer {
    /// Start-up reconciliation against Docker: keep the active container if
    /// it is running and healthy (else fall back to a healthy previous
    /// colour, else serve nothing for that service rather than something
    /// unhealthy), keep a warm previous colour with its retirement time,
    /// and remove every other managed container of the service (half-started
    /// deploys). With the engine unreachable, the last known upstreams keep
    /// serving and `status` says so.
    pub async fn reconcile(self: &Arc<Self>) {
        let config = self.writer.current_config();
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
            if let Err(err) = self.reconcile_service(&*engine, &name, &settings).await {
                tracing::error!(service = %name, error = %err, "reconciliation failed");
            }
        }
        if let Err(err) = self.writer.save_state().await {
            tracing::error!(error = %err, "could not write the reconciled state");
        }
    }

    async fn reconcile_service(
        self: &Arc<Self>,
        engine: &dyn ContainerRuntime,
        service: &str,
        settings: &Service,
    ) -> Result<(), ControlError> {
        let container = container_settings(service, settings)?;
        let own = self.own_containers(engine, service, container.port).await?;
        let active = self.writer.active(service);
        let active_id = active
            .as_ref()
            .and_then(|u| u.container.as_ref().map(|c| c.id.clone()));
        let record = self.records.get(service);
        let previous_id = record
            .previous
            .as_ref()
            .and_then(|p| p.container.as_ref().map(|c| c.id.clone()));
        let starting = record.starting.clone();
        let canary = self.writer.canary(service);
        let canary_id = canary
            .as_ref()
            .and_then(|c| c.upstream.container.as_ref().map(|c| c.id.clone()));
        let mut canary_info = None;
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
            } else if Some(&info.id) == canary_id.as_ref() && info.running {
                canary_info = Some(info);
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
            self.keep_recorded_previous(service, record.previous, previous_info.is_some())
                .await;
            if let Some(canary) = canary {
                others.extend(
                    self.keep_canary(service, settings, &canary, canary_info)
                        .await?,
                );
            }
        } else if !{
            // No split without its active colour: the canary goes too.
            others.extend(canary_info.take());
            self.previous_takes_over(service, settings, record.previous, previous_info)
                .await?
        } {
            if active.is_none() {
                // The state file names no active colour (first start, or
                // the file was lost): a container of this instance that
                // serves is adopted rather than removed.
                others = self
                    .adopt(service, settings, &container, others, starting.as_deref())
                    .await?;
            } else {
                self.writer.deactivate(service).await?;
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

    /// The recorded canary's container runs and answers a probe: the split
    /// goes on (re-pointed if its published port changed). Otherwise the
    /// split ends and its container, if any, is returned for removal. An
    /// interrupted bake is not resumed: the split stays as it was.
    async fn keep_canary(
        &self,
        service: &str,
        settings: &Service,
        canary: &Canary,
        info: Option<ContainerInfo>,
    ) -> Result<Option<ContainerInfo>, ControlError> {
        let addr = info
            .as_ref()
            .map(|i| i.host_addr.unwrap_or(canary.upstream.addr));
        match (info, addr) {
            (Some(_), Some(addr)) if probe_a_few(addr, settings).await => {
                if addr != canary.upstream.addr {
                    let (Some(active), Some(state)) = (
                        self.writer.active(service),
                        canary.upstream.container.clone(),
                    ) else {
                        return Ok(None);
                    };
                    let limits = self.writer.current_config().server.limits.clone();
                    let upstream = Upstream::for_container(
                        addr,
                        canary.upstream.label.clone(),
                        state,
                        &limits,
                    );
                    let moved = Canary::new(service, &active, upstream, canary.share_bp);
                    self.writer.set_canary(service, Some(moved)).await?;
                }
                tracing::info!(service, color = %canary.upstream.label, "kept the canary split");
                Ok(None)
            }
            (info, _) => {
                tracing::error!(service, color = %canary.upstream.label, "the canary is gone or unhealthy: every client back on the active colour");
                self.writer.set_canary(service, None).await?;
                Ok(info)
            }
        }
    }

    /// This instance's containers of `service` (see [`identity`]). The
    /// others are logged and left alone.
    pub(super) async fn own_containers(
        &self,
        engine: &dyn ContainerRuntime,
        service: &str,
        port: u16,
    ) -> Result<Vec<ContainerInfo>, ControlError> {
        let listed = engine.list_service(service, port).await?;
        let active = self.writer.active(service);
        let record = self.records.get(service);
        let canary = self.writer.canary(service);
        let ids = [
            active.as_ref().and_then(|u| u.container.as_ref()),
            record.previous.as_ref().and_then(|p| p.container.as_ref()),
            canary.as_ref().and_then(|c| c.upstream.container.as_ref()),
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
    async fn keep_recorded_previous(
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
            Some(_) => self.forget_previous(service).await,
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
            self.forget_previous(service).await;
            return Ok(false);
        };
        let addr = info.host_addr.unwrap_or(previous.addr);
        let (true, Some(state)) = (probe_a_few(addr, settings).await, previous.container) else {
            return Ok(false);
        };
        let limits = self.writer.current_config().server.limits.clone();
        let upstream = Upstream::for_container(addr, previous.color.clone(), state, &limits);
        self.commit_and_activate(service, |r| r.previous = None, upstream)
            .await?;
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
        let limits = self.writer.current_config().server.limits.clone();
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
        let adopted = |record: &mut super::ServiceRecord| {
            record.history = history;
            record.previous = warm.clone();
        };
        self.commit_and_activate(service, adopted, upstream).await?;
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
        engine: &dyn ContainerRuntime,
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
            if let Err(err) = check_health(
                addr,
                settings,
                &Progress::log_only(),
                &self.writer.shared().metrics,
            )
            .await
            {
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
        let deployer = Arc::clone(self);
        let shutdown = self.writer.shutdown_token();
        let service = service.to_string();
        self.writer.spawn(async move {
            for _ in 0..LATE_CREATE_CHECKS {
                if let Ok(engine) = deployer.engine().await {
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
            let recorded = deployer
                .commit(&service, |record| {
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

    /// The warm previous colour is gone: it is no rollback target any more.
    async fn forget_previous(&self, service: &str) {
        if let Err(err) = self.commit(service, |r| r.previous = None).await {
            tracing::error!(service, error = %err, "could not update the state file");
        }
    }

    /// Re-points the active upstream at a new published address (the
    /// engine may have re-published an ephemeral port).
    async fn reactivate_at(
        &self,
        service: &str,
        active: &Upstream,
        addr: std::net::SocketAddr,
    ) -> Result<(), ControlError> {
        let limits = self.writer.current_config().server.limits.clone();
        let upstream = match &active.container {
            Some(c) => Upstream::for_container(addr, active.label.clone(), c.clone(), &limits),
            None => Upstream::new(addr, active.label.clone(), &limits),
        };
        self.writer.activate(service, upstream).await.map(|_| ())
    }

    /// The engine went away while a deploy had (or may have had) a new
    /// container, or before start-up reconciliation could run. Once it
    /// answers again (checked every second, for at most an hour), runs the
    /// service's start-up reconciliation: containers that are neither active
    /// nor the warm previous colour are removed, the active one is probed,
    /// the previous one's retirement scheduled. No restart needed.
    pub(crate) fn sweep_when_engine_returns(self: &Arc<Self>, service: &str) {
        let deployer = Arc::clone(self);
        let shutdown = self.writer.shutdown_token();
        let service = service.to_string();
        self.writer.spawn(async move {
            for _ in 0..SWEEP_ATTEMPTS {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                    _ = shutdown.cancelled() => return,
                }
                if !deployer.engine.answers().await {
                    continue;
                }
                // A running deploy or rollback owns the service's
                // containers now; look again when it ends.
                let Ok(_busy) = deployer.writer.claim(&service) else {
                    continue;
                };
                match deployer.resync(&service).await {
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
        let (_, settings) = self.writer.service_config(service)?;
        let engine = self.engine().await?;
        self.reconcile_service(&*engine, service, &settings).await?;
        self.writer.save_state().await?;
        Ok(())
    }
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
