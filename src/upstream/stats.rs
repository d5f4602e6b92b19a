//! What one upstream answered: requests by status class and a latency
//! histogram, kept as plain atomics on the [`Upstream`](super::Upstream).
//!
//! The request path only adds to counters here (a few relaxed atomic
//! adds, no lock, no allocation); readers take a [`StatsSnapshot`] and
//! subtract an earlier one to judge a window (a canary's bake) or export
//! the totals (the metrics endpoint). Counters are cumulative for the
//! upstream's life, so a snapshot swap never resets them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds (the
/// Prometheus client libraries' defaults, which span a fast API to a slow
/// page); a last, unbounded bucket catches the rest.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets including the unbounded one.
const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// Live counters of one upstream.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Answers by status class: index 0 is 1xx … index 4 is 5xx. A failure
    /// cutover answers for the upstream (502, 504) counts as a 5xx here:
    /// to a user a version that refuses connections is failing.
    by_class: [AtomicU64; 5],
    /// Non-cumulative bucket counts (the exporter accumulates).
    latency_buckets: [AtomicU64; BUCKETS],
    /// Sum of all latencies, in microseconds.
    latency_sum_micros: AtomicU64,
    /// Failures by kind ([`Failure`]), for the metrics endpoint.
    failures: [AtomicU64; 3],
}

/// How an exchange with the upstream failed, counted apart from the
/// status it became (a 502 says "bad gateway", not which of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made.
    Connect = 0,
    /// The upstream went silent past `upstream_timeout`.
    Timeout = 1,
    /// The response body broke off before its end.
    Truncated = 2,
}

impl UpstreamStats {
    /// Counts one answer with `status` that took `elapsed` (from the
    /// request's arrival to its response body's end).
    pub fn record(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Counts one failed exchange.
    pub fn record_failure(&self, failure: Failure) {
        self.failures[failure as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Failures so far, indexed by [`Failure`].
    pub fn failures(&self) -> [u64; 3] {
        self.failures.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// The counters as they are now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            by_class: self.by_class.each_ref().map(|c| c.load(Ordering::Relaxed)),
            latency_buckets: self
                .latency_buckets
                .each_ref()
                .map(|c| c.load(Ordering::Relaxed)),
            latency_sum_micros: self.latency_sum_micros.load(Ordering::Relaxed),
        }
    }
}

/// A copy of an upstream's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Answers by status class, 1xx first.
    pub by_class: [u64; 5],
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS`], then the
    /// unbounded bucket.
    pub latency_buckets: [u64; BUCKETS],
    pub latency_sum_micros: u64,
}

impl StatsSnapshot {
    /// Adds `other`'s counts to these (totals of several upstreams).
    pub fn add(&mut self, other: &StatsSnapshot) {
        for (sum, n) in self.by_class.iter_mut().zip(other.by_class) {
            *sum += n;
        }
        for (sum, n) in self.latency_buckets.iter_mut().zip(other.latency_buckets) {
            *sum += n;
        }
        self.latency_sum_micros += other.latency_sum_micros;
    }

    /// Every answer counted.
    pub fn requests(&self) -> u64 {
        self.by_class.iter().sum()
    }

    /// Answers with a 5xx status.
    pub fn server_errors(&self) -> u64 {
        self.by_class[4]
    }

    /// The share of answers that were 5xx (0 with no answers).
    pub fn error_rate(&self) -> f64 {
        match self.requests() {
            0 => 0.0,
            n => self.server_errors() as f64 / n as f64,
        }
    }

    /// What was counted after `earlier` (a snapshot of the same
    /// upstream): the figures of one window.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            by_class: std::array::from_fn(|i| self.by_class[i].saturating_sub(earlier.by_class[i])),
            latency_buckets: std::array::from_fn(|i| {
                self.latency_buckets[i].saturating_sub(earlier.latency_buckets[i])
            }),
            latency_sum_micros: self
                .latency_sum_micros
                .saturating_sub(earlier.latency_sum_micros),
        }
    }

    /// The latency below which `quantile` (0..=1) of the answers fell, as
    /// the upper bound of the bucket it lands in (so it never
    /// understates); `None` with no answers. In the unbounded bucket the
    /// answer is "more than the last bound", reported as `Duration::MAX`.
    pub fn latency_quantile(&self, quantile: f64) -> Option<Duration> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (quantile.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, count) in self.latency_buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(
                    LATENCY_BUCKETS
                        .get(index)
                        .map_or(Duration::MAX, |bound| Duration::from_secs_f64(*bound)),
                );
            }
        }
        Some(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_and_window() {
        let stats = UpstreamStats::default();
        stats.record(200, Duration::from_millis(3));
        let before = stats.snapshot();
        stats.record(204, Duration::from_millis(3));
        stats.record(503, Duration::from_millis(30));
        stats.record(101, Duration::ZERO);
        let window = stats.snapshot().since(&before);
        assert_eq!(window.requests(), 3);
        assert_eq!(window.server_errors(), 1);
        assert_eq!(window.by_class, [1, 1, 0, 0, 1]);
        assert!((window.error_rate() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(window.latency_sum_micros, 33_000);
    }

    #[test]
    fn quantile_is_the_bucket_bound_it_lands_in() {
        let stats = UpstreamStats::default();
        assert_eq!(stats.snapshot().latency_quantile(0.99), None);
        for _ in 0..98 {
            stats.record(200, Duration::from_millis(2));
        }
        stats.record(200, Duration::from_millis(40));
        stats.record(200, Duration::from_secs(60));
        let snapshot = stats.snapshot();
        assert_eq!(
            snapshot.latency_quantile(0.5),
            Some(Duration::from_millis(5))
        );
        assert_eq!(
            snapshot.latency_quantile(0.99),
            Some(Duration::from_millis(50))
        );
        assert_eq!(snapshot.latency_quantile(1.0), Some(Duration::MAX));
    }
}
