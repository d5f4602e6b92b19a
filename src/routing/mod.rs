//! Routing: the immutable [`Snapshot`] a request is routed by, and the one
//! cell ([`Shared`]) that holds the current snapshot.
//!
//! This is where the data plane and the control plane meet: the proxy
//! reads the cell once per request, the controller is its only writer.
//! Neither imports the other. May import: `access_log`, `metrics`,
//! `upstream`, `tls`, `config`.

pub mod canary;
pub mod snapshot;
pub mod table;
pub mod workers;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, UpstreamSource};
use crate::tls::acme::AcmeCerts;
use crate::upstream::Upstream;

pub use snapshot::{Canary, PauseGate, ServiceSlot, Snapshot};
pub use workers::WorkerLoad;

/// State every connection and the controller share.
pub struct Shared {
    /// The current routing snapshot; replaced whole by reloads and switches.
    pub snapshot: ArcSwap<Snapshot>,
    /// Port of the HTTPS listener, for building redirect URLs.
    pub https_port: RedirectPort,
    /// Cancelled at shutdown; tunnels watch it.
    pub shutdown: CancellationToken,
    /// Set before `shutdown` when a new process took over the sockets
    /// (`cutover upgrade`): HTTP/1.1 connections then linger for their
    /// next request and close after it, instead of closing while idle.
    pub handed_over: AtomicBool,
    /// Tracks spawned tunnel tasks so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// ACME challenge answers (HTTP-01 is answered on the request path).
    pub acme: Arc<AcmeCerts>,
    /// Connections per data-plane worker thread: the acceptor's choice of
    /// worker and `cutover status` read it.
    pub workers: WorkerLoad,
    /// Where the request path hands JSON access-log records.
    pub access_log: crate::access_log::Sink,
    /// What both planes record for the metrics endpoint.
    pub metrics: Arc<Metrics>,
}

/// The metrics endpoint reads the upstreams serving now from the cell:
/// each service's active upstream and its canary, if any.
impl UpstreamSource for Shared {
    fn each_upstream(&self, f: &mut dyn FnMut(&str, &Arc<Upstream>)) {
        let snapshot = self.snapshot.load();
        for (name, slot) in &snapshot.services {
            let canary = slot.canary.as_ref().map(|canary| &canary.upstream);
            for upstream in slot.active.iter().chain(canary) {
                f(name, upstream);
            }
        }
    }

    fn each_canary(&self, f: &mut dyn FnMut(&str, &str, f64)) {
        let snapshot = self.snapshot.load();
        for (name, slot) in &snapshot.services {
            if let Some(canary) = &slot.canary {
                let share = f64::from(canary.share_bp) / f64::from(canary::FULL_SHARE);
                f(name, &canary.upstream.label, share);
            }
        }
    }
}

/// The HTTPS listener's port, read per redirect and changed when a reload
/// moves the listener.
#[derive(Debug)]
pub struct RedirectPort(AtomicU32);

/// Stored for "no HTTPS listener": outside the `u16` range.
const NO_PORT: u32 = u32::MAX;

impl RedirectPort {
    pub fn new(port: Option<u16>) -> RedirectPort {
        RedirectPort(AtomicU32::new(port.map_or(NO_PORT, u32::from)))
    }

    pub fn get(&self) -> Option<u16> {
        u16::try_from(self.0.load(Ordering::Relaxed)).ok()
    }

    pub fn set(&self, port: Option<u16>) {
        self.0
            .store(port.map_or(NO_PORT, u32::from), Ordering::Relaxed);
    }
}
