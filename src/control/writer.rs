//! The single writer of the routing snapshot: every change to what traffic
//! goes where ends here, serialized by one async mutex, persisted to the
//! state file before it is published.
//!
//! Also the per-service busy claims (one switch, deploy or rollback of a
//! service at a time) and the background tasks the shutdown waits for. The
//! [`Controller`](super::Controller) (switch, pause, reload, status) and the
//! [`Deployer`](super::deploy::Deployer) (deploy, rollback, reconciliation,
//! retirement) both work through it; it knows neither.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::deploy::Records;
use super::report::SwapTimings;
use super::state::{now_unix, CanaryState, ServiceState, State, StateError, StateStore};
use super::ControlError;
use crate::config::{Config, Service};
use crate::routing::{Canary, ServiceSlot, Shared, Snapshot};
use crate::upstream::Upstream;

/// What [`Writer::activate`] did.
#[derive(Debug)]
pub struct Activation {
    /// The upstream that was active before.
    pub old: Option<Arc<Upstream>>,
    /// Time to write the state file (temp, fsync, rename, fsync dir).
    pub persist: Duration,
    /// Time of the swap itself: one `ArcSwap::store`.
    pub swap: Duration,
    /// When the new snapshot was stored (a bake's breach-to-switch time
    /// ends here).
    pub published: Instant,
}

impl Activation {
    /// Timings for a report.
    pub fn timings(&self) -> SwapTimings {
        SwapTimings {
            persist_us: self.persist.as_micros() as u64,
            swap_ns: self.swap.as_nanos() as u64,
        }
    }
}

/// The one writer of the routing snapshot and the state file.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    state: Option<StateStore>,
    /// Serializes snapshot writes.
    lock: tokio::sync::Mutex<()>,
    /// Services with an operation running.
    busy: Mutex<HashSet<String>>,
    /// The deploy records, written to the state file with every snapshot;
    /// only the [`Deployer`](super::deploy::Deployer) changes them.
    records: Arc<Records>,
}

/// Marks a service busy until dropped.
pub(crate) struct BusyGuard<'a> {
    writer: &'a Writer,
    service: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.writer.busy.lock() {
            busy.remove(&self.service);
        }
    }
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        state: Option<StateStore>,
        records: Arc<Records>,
    ) -> Writer {
        Writer {
            shared,
            state,
            lock: tokio::sync::Mutex::new(()),
            busy: Mutex::new(HashSet::new()),
            records,
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(crate) fn store(&self) -> Option<&StateStore> {
        self.state.as_ref()
    }

    /// Holds off every other snapshot write until dropped.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Cancelled when the server shuts down.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Runs a background task the shutdown waits for.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.shared.tasks.spawn(task);
    }

    /// Claims `service` for one operation; a second is refused as busy.
    pub(crate) fn claim(&self, service: &str) -> Result<BusyGuard<'_>, ControlError> {
        let mut busy = self
            .busy
            .lock()
            .map_err(|_| ControlError::Busy(service.to_string()))?;
        if !busy.insert(service.to_string()) {
            return Err(ControlError::Busy(service.to_string()));
        }
        Ok(BusyGuard {
            writer: self,
            service: service.to_string(),
        })
    }

    /// The services with an operation running, for status.
    pub(crate) fn busy(&self) -> HashSet<String> {
        self.busy.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// The config currently serving.
    pub(crate) fn current_config(&self) -> Arc<Config> {
        Arc::clone(&self.shared.snapshot.load().config)
    }

    pub(crate) fn service_config(
        &self,
        name: &str,
    ) -> Result<(Arc<Config>, Service), ControlError> {
        let snapshot = self.shared.snapshot.load();
        let service = snapshot
            .config
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownService(name.to_string()))?;
        Ok((Arc::clone(&snapshot.config), service))
    }

    /// The service's active upstream right now.
    pub(crate) fn active(&self, service: &str) -> Option<Arc<Upstream>> {
        self.shared
            .snapshot
            .load()
            .service(service)
            .and_then(|slot| slot.active.clone())
    }

    /// Persists and then publishes `upstream` as the service's active one;
    /// returns the upstream it replaced. Persisting first means a crash
    /// right after never resumes an upstream traffic had already left.
    pub(crate) async fn activate(
        &self,
        service: &str,
        upstream: Arc<Upstream>,
    ) -> Result<Activation, ControlError> {
        let _writer = self.lock.lock().await;
        let (current, slot) = self.current_slot(service)?;
        let old = slot.active.clone();
        let next = current.with_slot(
            service,
            ServiceSlot {
                active: Some(upstream),
                pinned: true,
                pause: slot.pause,
                // A full switch ends any canary.
                canary: None,
            },
        );
        let persist_started = Instant::now();
        self.persist(&next).await?;
        let persist = persist_started.elapsed();
        let next = Arc::new(next);
        let swap_started = Instant::now();
        self.shared.snapshot.store(next);
        let published = Instant::now();
        let swap = published - swap_started;
        Ok(Activation {
            old,
            persist,
            swap,
            published,
        })
    }

    /// Persists and then publishes the service's canary (`None` ends it:
    /// every client back on the active colour); returns the canary it
    /// replaced and when the new snapshot was stored.
    pub(crate) async fn set_canary(
        &self,
        service: &str,
        canary: Option<Arc<Canary>>,
    ) -> Result<(Option<Arc<Canary>>, Instant), ControlError> {
        let _writer = self.lock.lock().await;
        let (current, slot) = self.current_slot(service)?;
        if canary.is_some() && slot.active.is_none() {
            return Err(ControlError::Refused(format!(
                "service {service:?} has no active colour to run a canary beside"
            )));
        }
        let old = slot.canary.clone();
        let next = current.with_slot(service, ServiceSlot { canary, ..slot });
        self.persist(&next).await?;
        self.shared.snapshot.store(Arc::new(next));
        Ok((old, Instant::now()))
    }

    /// The service's canary right now.
    pub(crate) fn canary(&self, service: &str) -> Option<Arc<Canary>> {
        self.shared
            .snapshot
            .load()
            .service(service)
            .and_then(|slot| slot.canary.clone())
    }

    /// Stops routing to the service (503) and persists that.
    pub(crate) async fn deactivate(&self, service: &str) -> Result<(), ControlError> {
        let _writer = self.lock.lock().await;
        let (current, slot) = self.current_slot(service)?;
        let next = current.with_slot(
            service,
            ServiceSlot {
                active: None,
                ..slot
            },
        );
        self.persist(&next).await?;
        self.shared.snapshot.store(Arc::new(next));
        Ok(())
    }

    /// Refuses early when the state directory cannot take a write (read-only,
    /// full): a deploy must not start or stop containers it cannot record.
    pub(crate) async fn check_state_writable(&self) -> Result<(), ControlError> {
        match &self.state {
            Some(store) => Ok(store.probe().await?),
            None => Ok(()),
        }
    }

    /// Writes the current snapshot and records to the state file.
    pub(crate) async fn save_state(&self) -> Result<(), StateError> {
        let _writer = self.lock.lock().await;
        self.persist(&self.shared.snapshot.load_full()).await
    }

    /// Writes what `snapshot` and the records say to the state file, off
    /// the runtime; done before the snapshot is stored, so a failed write
    /// leaves routing unchanged. Callers hold the writer lock.
    pub(crate) async fn persist(&self, snapshot: &Snapshot) -> Result<(), StateError> {
        let Some(store) = &self.state else {
            return Ok(());
        };
        let mut state = State {
            starting: self.records.starting(),
            ..State::default()
        };
        for (name, slot) in &snapshot.services {
            let Some(active) = slot.active.as_ref().filter(|_| slot.pinned) else {
                continue;
            };
            let record = self.records.get(name);
            state.services.insert(
                name.clone(),
                ServiceState {
                    color: active.label.clone(),
                    addr: active.addr,
                    // The store keeps the file's value if nothing changed.
                    since: now_unix(),
                    container: active.container.clone(),
                    previous: record.previous,
                    history: record.history,
                    last_deploy: record.last_deploy,
                    bake: record.bake,
                    canary: slot.canary.as_ref().map(|canary| CanaryState {
                        color: canary.upstream.label.clone(),
                        addr: canary.upstream.addr,
                        container: canary.upstream.container.clone(),
                        share_bp: canary.share_bp,
                    }),
                },
            );
        }
        store.write(state).await
    }

    /// The latest snapshot and a copy of the service's slot in it. Callers
    /// hold the writer lock, so the slot stays current until they store.
    pub(crate) fn current_slot(
        &self,
        service: &str,
    ) -> Result<(Arc<Snapshot>, ServiceSlot), ControlError> {
        let current = self.shared.snapshot.load_full();
        let slot = current
            .service(service)
            .cloned()
            .ok_or_else(|| ControlError::UnknownService(service.to_string()))?;
        Ok((current, slot))
    }

    /// Publishes `next` without a state write (pause and resume, which the
    /// state file does not record). Callers hold the writer lock.
    pub(crate) fn publish(&self, next: Snapshot) {
        self.shared.snapshot.store(Arc::new(next));
    }
}
