//! Routing: the immutable [`Snapshot`] a request is routed by, and the one
//! cell ([`Shared`]) that holds the current snapshot.
//!
//! This is where the data plane and the control plane meet: the proxy
//! reads the cell once per request, the controller is its only writer.
//! Neither imports the other. May import: `upstream`, `tls`, `config`.

pub mod snapshot;
pub mod table;
pub mod workers;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::acme::AcmeCerts;

pub use snapshot::{PauseGate, ServiceSlot, Snapshot};
pub use workers::WorkerLoad;

/// State every connection and the controller share.
pub struct Shared {
    /// The current routing snapshot; replaced whole by reloads and switches.
    pub snapshot: ArcSwap<Snapshot>,
    /// Port of the HTTPS listener, for building redirect URLs.
    pub https_port: Option<u16>,
    /// Cancelled at shutdown; tunnels watch it.
    pub shutdown: CancellationToken,
    /// Tracks spawned tunnel tasks so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// ACME challenge answers (HTTP-01 is answered on the request path).
    pub acme: Arc<AcmeCerts>,
    /// Connections per data-plane worker thread: the acceptor's choice of
    /// worker and `cutover status` read it.
    pub workers: WorkerLoad,
}
