//! Metrics for Prometheus (`[server] metrics = "127.0.0.1:9100"`): what
//! the data plane and the control plane record, and the endpoint that
//! serves it (`GET /metrics`, on its own listener).
//!
//! Recording is atomics the recorder already holds: per request, a block
//! found when the route table was built ([`requests`]) and the upstream's
//! own counters (`upstream::stats`); per connection, one gauge. Everything
//! with labels that vary (services, colours, certificates) is read at
//! scrape time ([`export`]), which walks the current routing snapshot, so
//! the request path never looks a label set up or allocates one.
//!
//! May import: `upstream` (and what lies below it). Placed just below
//! `routing`: the proxy and the controller record into it, `routing`
//! builds the per-route counters and lets the scrape walk the snapshot
//! (through [`UpstreamSource`]), and the app starts the endpoint.

pub mod endpoint;
pub mod export;
pub mod requests;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use requests::RequestTally;

pub use endpoint::{bind, serve};
pub use export::UpstreamSource;

/// Labels of the control-plane series (few, recorded rarely).
type Labels = Vec<(&'static str, String)>;

/// Operation durations by service and outcome.
type Durations = Family<Labels, Histogram, fn() -> Histogram>;

/// Bounds of the operation duration histograms, in seconds: a switch
/// takes milliseconds, a deploy with image pull and health gate minutes.
const OPERATION_BUCKETS: [f64; 13] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn operation_histogram() -> Histogram {
    Histogram::new(OPERATION_BUCKETS)
}

/// Bounds of the breach-to-switch histogram, in seconds: the judge looks
/// every 100 ms and the swap back takes milliseconds.
const BREACH_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

fn breach_histogram() -> Histogram {
    Histogram::new(BREACH_BUCKETS)
}

/// The listener a client connection came in on.
#[derive(Debug, Clone, Copy)]
pub enum Listener {
    Http = 0,
    Https = 1,
}

/// The protocol a client connection speaks.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    Http1 = 0,
    Http2 = 1,
}

const LISTENERS: [&str; 2] = ["http", "https"];
const PROTOCOLS: [&str; 2] = ["http1", "http2"];

/// A control-plane operation, timed from start to outcome.
#[derive(Debug, Clone, Copy)]
pub enum Operation {
    Switch,
    Deploy,
    Rollback,
}

/// Everything recorded, for one server.
#[derive(Debug)]
pub struct Metrics {
    /// Requests by site, service, colour, method and class; `None` when
    /// the endpoint is off, so the request path records nothing.
    requests: Option<Arc<RequestTally>>,
    /// Open client connections, [listener][protocol].
    connections: [[AtomicI64; 2]; 2],
    operations: [Family<Labels, Counter>; 3],
    durations: [Durations; 3],
    health_checks: Family<Labels, Counter>,
    /// Bake windows by service, phase and how they ended.
    bakes: Family<Labels, Counter>,
    /// Automatic rollbacks by service and phase: breach seen to the
    /// previous colour taking new requests.
    breach_to_switch: Durations,
    /// Upstreams seen by scrapes, for counters that outlive them.
    seen: std::sync::Mutex<export::Seen>,
}

impl Metrics {
    /// Metrics for a server; `enabled` when the endpoint is configured.
    pub fn new(enabled: bool) -> Arc<Metrics> {
        let durations = || Family::new_with_constructor(operation_histogram as fn() -> Histogram);
        Arc::new(Metrics {
            requests: enabled.then(Arc::default),
            connections: Default::default(),
            operations: Default::default(),
            durations: [durations(), durations(), durations()],
            health_checks: Family::default(),
            bakes: Family::default(),
            breach_to_switch: Family::new_with_constructor(breach_histogram as fn() -> Histogram),
            seen: Default::default(),
        })
    }

    /// Where per-request counts go, when the endpoint is on.
    pub fn requests(&self) -> Option<&Arc<RequestTally>> {
        self.requests.as_ref()
    }

    fn enabled(&self) -> bool {
        self.requests.is_some()
    }

    /// Counts one open client connection until the guard is dropped
    /// (nothing when the endpoint is off).
    pub fn connection_open(
        self: &Arc<Self>,
        listener: Listener,
        protocol: Protocol,
    ) -> Option<OpenConnection> {
        if !self.enabled() {
            return None;
        }
        self.connections[listener as usize][protocol as usize].fetch_add(1, Ordering::Relaxed);
        Some(OpenConnection {
            metrics: Arc::clone(self),
            listener,
            protocol,
        })
    }

    /// Records one switch, deploy or rollback of `service`, its outcome
    /// (`"ok"`, `"failed"`) and how long it took.
    pub fn operation(&self, op: Operation, service: &str, outcome: &str, took: Duration) {
        let labels = vec![
            ("service", service.to_string()),
            ("outcome", outcome.to_string()),
        ];
        self.operations[op as usize].get_or_create(&labels).inc();
        self.durations[op as usize]
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// How many operations ended with `outcome` (for tests).
    #[cfg(test)]
    pub fn operations_counted(&self, op: Operation, service: &str, outcome: &str) -> u64 {
        let labels = vec![
            ("service", service.to_string()),
            ("outcome", outcome.to_string()),
        ];
        self.operations[op as usize]
            .get(&labels)
            .map_or(0, |counter| counter.get())
    }

    /// Records one health-check probe of `service`'s new upstream.
    pub fn health_check(&self, service: &str, passed: bool) {
        let outcome = if passed { "pass" } else { "fail" };
        let labels = vec![
            ("service", service.to_string()),
            ("outcome", outcome.to_string()),
        ];
        self.health_checks.get_or_create(&labels).inc();
    }

    /// Records how a bake window of `service` ended: `phase` is `canary`
    /// or `switch`, `outcome` `passed`, `breached` or `interrupted`.
    pub fn bake(&self, service: &str, phase: &str, outcome: &str) {
        let labels = vec![
            ("service", service.to_string()),
            ("phase", phase.to_string()),
            ("outcome", outcome.to_string()),
        ];
        self.bakes.get_or_create(&labels).inc();
    }

    /// Records an automatic rollback after a bake breach: the time from
    /// the breach being seen to the previous colour taking new requests.
    pub fn automatic_rollback(&self, service: &str, phase: &str, breach_to_switch: Duration) {
        let labels = vec![
            ("service", service.to_string()),
            ("phase", phase.to_string()),
        ];
        self.breach_to_switch
            .get_or_create(&labels)
            .observe(breach_to_switch.as_secs_f64());
    }

    /// How many bake windows ended with `outcome` (for tests).
    #[cfg(test)]
    pub fn bakes_counted(&self, service: &str, phase: &str, outcome: &str) -> u64 {
        let labels = vec![
            ("service", service.to_string()),
            ("phase", phase.to_string()),
            ("outcome", outcome.to_string()),
        ];
        self.bakes.get(&labels).map_or(0, |counter| counter.get())
    }

    /// Registers the control-plane families (the rest is the collector's).
    fn register_events(&self, registry: &mut Registry) {
        let names = [
            ("cutover_switches", "cutover_switch_duration", "switches"),
            ("cutover_deploys", "cutover_deploy_duration", "deploys"),
            (
                "cutover_rollbacks",
                "cutover_rollback_duration",
                "rollbacks",
            ),
        ];
        for (index, (count, duration, what)) in names.into_iter().enumerate() {
            registry.register(
                count,
                format!("Completed {what} by service and outcome"),
                self.operations[index].clone(),
            );
            registry.register_with_unit(
                duration,
                format!("Duration of {what} by service and outcome"),
                Unit::Seconds,
                self.durations[index].clone(),
            );
        }
        registry.register(
            "cutover_health_checks",
            "Health-check probes of new upstreams by service and outcome",
            self.health_checks.clone(),
        );
        registry.register(
            "cutover_bakes",
            "Bake windows by service, phase (canary, switch) and outcome (passed, breached, interrupted)",
            self.bakes.clone(),
        );
        registry.register_with_unit(
            "cutover_bake_breach_to_switch",
            "Automatic rollbacks by service and phase: time from a bake breach being seen to new requests going to the previous colour",
            Unit::Seconds,
            self.breach_to_switch.clone(),
        );
    }
}

/// Keeps one client connection counted as open.
#[derive(Debug)]
pub struct OpenConnection {
    metrics: Arc<Metrics>,
    listener: Listener,
    protocol: Protocol,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connections[self.listener as usize][self.protocol as usize]
            .fetch_sub(1, Ordering::Relaxed);
    }
}
