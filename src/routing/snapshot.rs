//! The snapshot: everything a request needs to be routed, in one immutable
//! value behind one `ArcSwap`.
//!
//! Routing and each service's active upstream change together (a reload, a
//! switch), so they live in one value: a request that loads the snapshot
//! sees a table and upstreams that belong together, and a change is one
//! atomic `store`. Counters that change per request live in the `Arc`ed
//! [`Upstream`]s the snapshot points to, so a swap never resets them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use super::canary::Canary;

use crate::config::Config;
use crate::metrics::requests::RequestTally;
use crate::routing::table::RouteTable;
use crate::upstream::Upstream;

/// One consistent view of config, routes and active upstreams.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: Arc<RouteTable>,
    pub services: HashMap<String, ServiceSlot>,
}

/// What a service currently forwards to.
#[derive(Debug, Clone, Default)]
pub struct ServiceSlot {
    /// The upstream new requests go to; `None` answers 503.
    pub active: Option<Arc<Upstream>>,
    /// Set by a switch, a deploy or the state file: a reload keeps this
    /// upstream even if the config's `upstream` differs, because runtime
    /// decisions outrank the file's starting point.
    pub pinned: bool,
    /// Present while the service is paused.
    pub pause: Option<Arc<PauseGate>>,
    /// Present while a canary takes a share of the service's clients
    /// (`deploy --canary`); `active` keeps the rest.
    pub canary: Option<Arc<Canary>>,
}

/// Holds requests of a paused service until it is resumed.
#[derive(Debug, Default)]
pub struct PauseGate {
    released: CancellationToken,
}

impl PauseGate {
    /// Waits until released; false if `limit` passed first.
    pub async fn wait(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.released.cancelled())
            .await
            .is_ok()
    }

    /// Lets every held request continue.
    pub fn release(&self) {
        self.released.cancel();
    }
}

impl Snapshot {
    /// A snapshot for a freshly loaded config. A service keeps the upstream
    /// it had in `previous` (the same `Arc`, so in-flight counts and pools
    /// survive a reload) when that upstream was pinned at runtime or the
    /// config still names the same address; otherwise it starts on the
    /// config's `upstream`, labelled blue.
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let tally = previous.and_then(|p| p.routes.tally().cloned());
        let routes = Arc::new(RouteTable::counted(&config, tally));
        let services = config
            .services
            .values()
            .map(|service| {
                let kept = previous
                    .and_then(|p| p.services.get(&service.name))
                    .filter(|slot| {
                        slot.pinned || slot.active.as_ref().map(|u| u.addr) == service.upstream
                    })
                    .cloned();
                let slot = kept.unwrap_or_else(|| ServiceSlot {
                    active: service
                        .upstream
                        .map(|addr| Upstream::new(addr, "blue", &config.server.limits)),
                    pinned: false,
                    pause: None,
                    canary: None,
                });
                (service.name.clone(), slot)
            })
            .collect();
        Snapshot {
            config,
            routes,
            services,
        }
    }

    /// This snapshot with its routes counting requests into `tally` (the
    /// metrics endpoint is on); snapshots built from it keep counting there.
    pub fn counted(mut self, tally: Arc<RequestTally>) -> Snapshot {
        self.routes = Arc::new(RouteTable::counted(&self.config, Some(tally)));
        self
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSlot> {
        self.services.get(name)
    }

    /// This snapshot with one service's slot replaced.
    pub fn with_slot(&self, name: &str, slot: ServiceSlot) -> Snapshot {
        let mut next = self.clone();
        next.services.insert(name.to_string(), slot);
        next
    }
}
