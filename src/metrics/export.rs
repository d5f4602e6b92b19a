//! The scrape: reads every upstream the routing snapshot points to (and
//! those it pointed to before), the request blocks, the connection gauges
//! and the certificates, and writes them in the exposition format.
//!
//! An upstream leaves the snapshot when it is retired, but its counters
//! must not vanish from a Prometheus counter: every upstream a scrape has
//! seen is remembered (its stats, not the upstream, whose pool would stay
//! open), and when it is gone its final counts are folded into a carry
//! per service and colour. An upstream that came and went between two
//! scrapes is not seen at all; deploys live far longer than a scrape
//! interval.

use std::fmt;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::requests::RouteCounts;
use super::{Metrics, LISTENERS, PROTOCOLS};
use crate::upstream::stats::{StatsSnapshot, UpstreamStats, LATENCY_BUCKETS};
use crate::upstream::Upstream;

/// The upstreams that serve now, by service (routing implements it for
/// its shared cell, so this module need not know the snapshot).
pub trait UpstreamSource: Send + Sync + 'static {
    /// Every upstream taking new requests: active ones and canaries.
    fn each_upstream(&self, f: &mut dyn FnMut(&str, &Arc<Upstream>));

    /// Each running canary: service, colour, share of new clients (0 to 1).
    fn each_canary(&self, _f: &mut dyn FnMut(&str, &str, f64)) {}
}

/// Certificates' names and expiry (Unix seconds), read at each scrape.
pub type CertExpiries = Box<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

/// Upstreams seen by scrapes, and the final counts of those gone.
#[derive(Debug, Default)]
pub(super) struct Seen {
    live: Vec<SeenUpstream>,
    carry: Vec<Totals>,
}

#[derive(Debug)]
struct SeenUpstream {
    service: String,
    colour: String,
    stats: Arc<UpstreamStats>,
    upstream: Weak<Upstream>,
}

/// What the upstreams of one service and colour answered, all together.
#[derive(Debug, Clone, Default)]
struct Totals {
    service: String,
    colour: String,
    stats: StatsSnapshot,
    failures: [u64; 3],
    in_flight: usize,
}

impl Totals {
    fn add(&mut self, stats: &UpstreamStats) {
        self.stats.add(&stats.snapshot());
        for (sum, n) in self.failures.iter_mut().zip(stats.failures()) {
            *sum += n;
        }
    }
}

fn entry<'a>(list: &'a mut Vec<Totals>, service: &str, colour: &str) -> &'a mut Totals {
    let index = match list
        .iter()
        .position(|t| t.service == service && t.colour == colour)
    {
        Some(index) => index,
        None => {
            list.push(Totals {
                service: service.to_string(),
                colour: colour.to_string(),
                ..Totals::default()
            });
            list.len() - 1
        }
    };
    &mut list[index]
}

impl Seen {
    /// Notes the upstreams serving now, folds those gone into the carry,
    /// and returns the totals by service and colour, sorted.
    fn totals(&mut self, source: &dyn UpstreamSource) -> Vec<Totals> {
        source.each_upstream(&mut |service, upstream| {
            let known = self
                .live
                .iter()
                .any(|seen| Arc::ptr_eq(&seen.stats, upstream.stats_handle()));
            if !known {
                self.live.push(SeenUpstream {
                    service: service.to_string(),
                    colour: upstream.label.clone(),
                    stats: Arc::clone(upstream.stats_handle()),
                    upstream: Arc::downgrade(upstream),
                });
            }
        });
        let carry = &mut self.carry;
        // Gone: nothing records into its stats any more (requests hold
        // their upstream until their body ends).
        self.live.retain(|seen| {
            if seen.upstream.strong_count() > 0 {
                return true;
            }
            entry(carry, &seen.service, &seen.colour).add(&seen.stats);
            false
        });
        let mut totals = self.carry.clone();
        for seen in &self.live {
            let total = entry(&mut totals, &seen.service, &seen.colour);
            total.add(&seen.stats);
            if let Some(upstream) = seen.upstream.upgrade() {
                total.in_flight += upstream.in_flight();
            }
        }
        totals.sort_by(|a, b| (&a.service, &a.colour).cmp(&(&b.service, &b.colour)));
        totals
    }
}

/// The collector registered with the endpoint's registry.
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub source: Arc<dyn UpstreamSource>,
    pub certificates: Option<CertExpiries>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let totals = self
            .metrics
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .totals(&*self.source);
        self.encode_requests(&mut encoder)?;
        encode_latency(&mut encoder, &totals)?;
        encode_in_flight(&mut encoder, &totals)?;
        encode_failures(&mut encoder, &totals)?;
        self.encode_connections(&mut encoder)?;
        self.encode_canaries(&mut encoder)?;
        self.encode_certificates(&mut encoder)
    }
}

/// The rows of one request block, labels borrowed from it.
fn rows(counts: &RouteCounts) -> Vec<(&'static str, &'static str, &'static str, u64)> {
    let mut rows = Vec::new();
    counts.each(|colour, method, class, n| rows.push((colour, method, class, n)));
    rows
}

impl Scrape {
    fn encode_requests(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(tally) = self.metrics.requests() else {
            return Ok(());
        };
        let mut blocks = Vec::new();
        tally.each(|route| {
            blocks.push((
                route.site.clone(),
                route.service.clone(),
                rows(&route.counts),
            ))
        });
        if blocks.iter().all(|(_, _, rows)| rows.is_empty()) {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(
            "cutover_http_requests",
            "Requests forwarded to a service, by site, service, colour, method and status class",
            None,
            MetricType::Counter,
        )?;
        for (site, service, rows) in &blocks {
            for (colour, method, class, n) in rows {
                let labels = [
                    ("site", site.as_str()),
                    ("service", service.as_str()),
                    ("colour", colour),
                    ("method", method),
                    ("status_class", class),
                ];
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        Ok(())
    }

    fn encode_connections(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut metric = encoder.encode_descriptor(
            "cutover_client_connections_open",
            "Client connections open, by listener and protocol",
            None,
            MetricType::Gauge,
        )?;
        for (listener, protocols) in LISTENERS.iter().zip(&self.metrics.connections) {
            for (protocol, open) in PROTOCOLS.iter().zip(protocols) {
                let labels = [("listener", *listener), ("protocol", *protocol)];
                let open = open.load(std::sync::atomic::Ordering::Relaxed);
                metric.encode_family(&labels)?.encode_gauge(&open)?;
            }
        }
        Ok(())
    }

    /// The canary split, while one runs (absent otherwise, so a finished
    /// canary leaves no stale share behind).
    fn encode_canaries(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut canaries = Vec::new();
        self.source.each_canary(&mut |service, colour, share| {
            canaries.push((service.to_string(), colour.to_string(), share))
        });
        if canaries.is_empty() {
            return Ok(());
        }
        canaries.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut metric = encoder.encode_descriptor(
            "cutover_canary_share_ratio",
            "Share of newly assigned clients a running canary gets (0 to 1), by service and the canary's colour",
            None,
            MetricType::Gauge,
        )?;
        for (service, colour, share) in &canaries {
            let labels = [("service", service.as_str()), ("colour", colour.as_str())];
            metric.encode_family(&labels)?.encode_gauge(share)?;
        }
        Ok(())
    }

    fn encode_certificates(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(certificates) = &self.certificates else {
            return Ok(());
        };
        let mut certificates = certificates();
        if certificates.is_empty() {
            return Ok(());
        }
        certificates.sort();
        certificates.dedup_by(|a, b| a.0 == b.0);
        let mut metric = encoder.encode_descriptor(
            "cutover_certificate_expiry_timestamp_seconds",
            "When each certificate expires, in Unix seconds",
            None,
            MetricType::Gauge,
        )?;
        for (name, not_after) in &certificates {
            let labels = [("name", name.as_str())];
            let not_after = i64::try_from(*not_after).unwrap_or(i64::MAX);
            metric.encode_family(&labels)?.encode_gauge(&not_after)?;
        }
        Ok(())
    }
}

fn encode_latency(encoder: &mut DescriptorEncoder, totals: &[Totals]) -> fmt::Result {
    if totals.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(
        "cutover_http_request_duration_seconds",
        "Time from a request's arrival to its response body's end, by service and colour",
        None,
        MetricType::Histogram,
    )?;
    for total in totals {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(total.stats.latency_buckets)
            .collect();
        let count = total.stats.latency_buckets.iter().sum();
        let sum = total.stats.latency_sum_micros as f64 / 1e6;
        let labels = [
            ("service", total.service.as_str()),
            ("colour", total.colour.as_str()),
        ];
        metric
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

fn encode_in_flight(encoder: &mut DescriptorEncoder, totals: &[Totals]) -> fmt::Result {
    if totals.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(
        "cutover_http_requests_in_flight",
        "Requests whose response body has not ended, by service and colour",
        None,
        MetricType::Gauge,
    )?;
    for total in totals {
        let labels = [
            ("service", total.service.as_str()),
            ("colour", total.colour.as_str()),
        ];
        let in_flight = total.in_flight as u64;
        metric.encode_family(&labels)?.encode_gauge(&in_flight)?;
    }
    Ok(())
}

/// Upstream failures by service (all colours together).
fn encode_failures(encoder: &mut DescriptorEncoder, totals: &[Totals]) -> fmt::Result {
    let mut by_service: Vec<(&str, [u64; 3])> = Vec::new();
    for total in totals {
        match by_service.iter_mut().find(|(s, _)| *s == total.service) {
            Some((_, sums)) => sums
                .iter_mut()
                .zip(total.failures)
                .for_each(|(sum, n)| *sum += n),
            None => by_service.push((&total.service, total.failures)),
        }
    }
    if by_service.is_empty() {
        return Ok(());
    }
    let families = [
        (
            "cutover_upstream_connect_errors",
            "Requests whose upstream connection could not be made, by service",
        ),
        (
            "cutover_upstream_timeouts",
            "Requests whose upstream went silent past upstream_timeout, by service",
        ),
        (
            "cutover_upstream_truncated_responses",
            "Upstream response bodies that broke off before their end, by service",
        ),
    ];
    for (index, (name, help)) in families.into_iter().enumerate() {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (service, failures) in &by_service {
            let labels = [("service", *service)];
            metric
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&failures[index], None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::config::Limits;
    use crate::upstream::stats::Failure;

    /// A snapshot stand-in: the upstreams listed serve now.
    #[derive(Default)]
    struct Serving(Mutex<Vec<(String, Arc<Upstream>)>>);

    impl UpstreamSource for Serving {
        fn each_upstream(&self, f: &mut dyn FnMut(&str, &Arc<Upstream>)) {
            for (service, upstream) in self.0.lock().expect("lock").iter() {
                f(service, upstream);
            }
        }
    }

    fn upstream(port: u16, colour: &str) -> Arc<Upstream> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        Upstream::new(addr, colour, &Limits::default())
    }

    fn requests(totals: &[Totals], colour: &str) -> u64 {
        totals
            .iter()
            .find(|t| t.service == "web" && t.colour == colour)
            .map_or(0, |t| t.stats.requests())
    }

    #[test]
    fn a_retired_upstreams_counts_stay_in_the_totals() {
        let serving = Serving::default();
        let mut seen = Seen::default();
        let blue = upstream(1, "blue");
        serving
            .0
            .lock()
            .expect("lock")
            .push(("web".into(), Arc::clone(&blue)));
        blue.stats().record(200, Duration::from_millis(1));
        assert_eq!(requests(&seen.totals(&serving), "blue"), 1);

        // Switched to green: blue is out of the snapshot but still alive
        // (draining, or kept warm), and still counts.
        let green = upstream(2, "green");
        *serving.0.lock().expect("lock") = vec![("web".into(), Arc::clone(&green))];
        blue.stats().record(503, Duration::from_millis(1));
        blue.stats().record_failure(Failure::Connect);
        green.stats().record(200, Duration::from_millis(1));
        let totals = seen.totals(&serving);
        assert_eq!(
            (requests(&totals, "blue"), requests(&totals, "green")),
            (2, 1)
        );

        // Blue retired (dropped): its final counts are carried.
        drop(blue);
        let totals = seen.totals(&serving);
        assert_eq!(
            (requests(&totals, "blue"), requests(&totals, "green")),
            (2, 1)
        );
        assert_eq!(seen.live.len(), 1);
        let blue_totals = totals.iter().find(|t| t.colour == "blue").expect("blue");
        assert_eq!(blue_totals.failures, [1, 0, 0]);
        assert_eq!(blue_totals.in_flight, 0);

        // A later blue adds to the same series.
        let blue_again = upstream(3, "blue");
        *serving.0.lock().expect("lock") = vec![("web".into(), Arc::clone(&blue_again))];
        blue_again.stats().record(200, Duration::from_millis(1));
        let _guard = blue_again.begin_request();
        let totals = seen.totals(&serving);
        assert_eq!(requests(&totals, "blue"), 3);
        let blue_totals = totals.iter().find(|t| t.colour == "blue").expect("blue");
        assert_eq!(blue_totals.in_flight, 1);
    }
}
