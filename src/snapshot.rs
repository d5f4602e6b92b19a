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

use crate::config::Config;
use crate::routes::RouteTable;
use crate::upstream::Upstream;

/// One consistent view of config, routes and active upstreams.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub services: HashMap<String, ServiceSlot>,
}

/// What a service currently forwards to.
#[derive(Debug, Clone, Default)]
pub struct ServiceSlot {
    /// The upstream new requests go to; `None` answers 503.
    pub active: Option<Arc<Upstream>>,
}

impl Snapshot {
    /// A snapshot for a freshly loaded config. Services keep the upstream
    /// they had in `previous` (same address → same `Arc`, so in-flight
    /// counts and pools survive a reload); new services start on the
    /// upstream their config names.
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let routes = RouteTable::new(&config);
        let services = config
            .services
            .values()
            .map(|service| {
                let kept = previous
                    .and_then(|p| p.services.get(&service.name))
                    .and_then(|slot| slot.active.clone());
                let active = kept.or_else(|| {
                    service
                        .upstream
                        .map(|addr| Upstream::new(addr, "static", &config.server.limits))
                });
                (service.name.clone(), ServiceSlot { active })
            })
            .collect();
        Snapshot {
            config,
            routes,
            services,
        }
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSlot> {
        self.services.get(name)
    }
}
