//! Requests by site, service, colour, method and status class: one block
//! of atomics per route to a service, found when the route table is built,
//! so a request adds to a counter it already holds (no label lookup, no
//! allocation on the request path).
//!
//! Blocks are kept for the life of the process ([`RequestTally`]), so a
//! reload that drops and restores a route, or a switch of colour, never
//! makes a Prometheus counter go backwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::Method;

/// The `method` label's values: the common methods, then `OTHER` for the
/// rest (an unbounded label would let any client add series).
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "OTHER",
];

/// The `colour` label's values; `other` for an upstream labelled neither.
pub const COLOURS: [&str; 3] = ["blue", "green", "other"];

/// The `status_class` label's values.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into [`METHODS`].
pub fn method_index(method: &Method) -> u8 {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        _ => 8,
    }
}

fn colour_index(colour: &str) -> usize {
    match colour {
        "blue" => 0,
        "green" => 1,
        _ => 2,
    }
}

fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// The counters of one (site, service): [colour][method][class].
#[derive(Debug, Default)]
pub struct RouteCounts {
    counts: [[[AtomicU64; CLASSES.len()]; METHODS.len()]; COLOURS.len()],
}

impl RouteCounts {
    /// Counts one answer with `status` from the upstream coloured `colour`.
    pub fn record(&self, colour: &str, method: u8, status: u16) {
        let method = usize::from(method).min(METHODS.len() - 1);
        self.counts[colour_index(colour)][method][class_index(status)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Every non-zero counter as (colour, method, class, count).
    pub fn each(&self, mut f: impl FnMut(&'static str, &'static str, &'static str, u64)) {
        for (colour, methods) in COLOURS.iter().zip(&self.counts) {
            for (method, classes) in METHODS.iter().zip(methods) {
                for (class, count) in CLASSES.iter().zip(classes) {
                    let count = count.load(Ordering::Relaxed);
                    if count > 0 {
                        f(colour, method, class, count);
                    }
                }
            }
        }
    }
}

/// What one request counts into: its route's block and its method,
/// carried to the end of its response body.
#[derive(Debug, Clone)]
pub struct Tally {
    counts: Arc<RouteCounts>,
    method: u8,
}

impl Tally {
    pub fn new(counts: &Arc<RouteCounts>, method: &Method) -> Tally {
        Tally {
            counts: Arc::clone(counts),
            method: method_index(method),
        }
    }

    /// Counts the answer (`status`) the upstream coloured `colour` gave.
    pub fn record(&self, colour: &str, status: u16) {
        self.counts.record(colour, self.method, status);
    }
}

/// One route block and its labels.
#[derive(Debug)]
pub struct RouteEntry {
    pub site: String,
    pub service: String,
    pub counts: Arc<RouteCounts>,
}

/// Every (site, service) block made so far. Locked only when a route
/// table is built and at a scrape.
#[derive(Debug, Default)]
pub struct RequestTally {
    routes: Mutex<Vec<RouteEntry>>,
}

impl RequestTally {
    /// The block for `site` and `service`, made on first use.
    pub fn counts_for(&self, site: &str, service: &str) -> Arc<RouteCounts> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = routes
            .iter()
            .find(|e| e.site == site && e.service == service)
        {
            return Arc::clone(&entry.counts);
        }
        let counts = Arc::new(RouteCounts::default());
        routes.push(RouteEntry {
            site: site.to_string(),
            service: service.to_string(),
            counts: Arc::clone(&counts),
        });
        counts
    }

    /// Calls `f` with every block, in the order they were made.
    pub fn each(&self, mut f: impl FnMut(&RouteEntry)) {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.iter().for_each(&mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_colour_method_and_class() {
        let tally = RequestTally::default();
        let counts = tally.counts_for("example.com", "web");
        assert!(Arc::ptr_eq(
            &counts,
            &tally.counts_for("example.com", "web")
        ));
        Tally::new(&counts, &Method::GET).record("blue", 200);
        Tally::new(&counts, &Method::GET).record("blue", 204);
        Tally::new(&counts, &Method::from_bytes(b"PROPFIND").expect("method")).record("green", 503);
        let mut seen = Vec::new();
        counts.each(|colour, method, class, n| seen.push((colour, method, class, n)));
        assert_eq!(
            seen,
            [("blue", "GET", "2xx", 2), ("green", "OTHER", "5xx", 1)]
        );
    }
}
