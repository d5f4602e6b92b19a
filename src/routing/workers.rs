//! Connection counts per data-plane worker thread (`workers = N`).
//!
//! The acceptor hands each new connection to the worker with the fewest
//! open ones, and `cutover status` reports them, so an operator (and the
//! tests) can see that every worker serves. They live here, beside the
//! snapshot, because both the data plane (which counts) and the control
//! plane (which reports) read them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Client connections the worker serves now.
    open: AtomicUsize,
    /// Client connections handed to the worker since start.
    accepted: AtomicU64,
}

/// The counters of every worker thread; empty when connections are served
/// on the caller's runtime (`workers = 1`, or the work-stealing runtime).
#[derive(Debug, Default)]
pub struct WorkerLoad {
    workers: Box<[WorkerCounters]>,
    /// HTTP/1.1 connections parked now (idle, holding no hyper state; see
    /// `proxy::h1`), on every worker.
    parked: AtomicUsize,
    /// Times a connection was parked since start.
    parks: AtomicU64,
}

impl WorkerLoad {
    pub fn new(workers: usize) -> WorkerLoad {
        WorkerLoad {
            workers: (0..workers).map(|_| WorkerCounters::default()).collect(),
            ..WorkerLoad::default()
        }
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The worker with the fewest open connections, looking from `start`
    /// on so that ties go round-robin when the caller moves `start`.
    pub fn least_loaded(&self, start: usize) -> usize {
        let count = self.workers.len().max(1);
        (0..count)
            .map(|offset| (start + offset) % count)
            .min_by_key(|&index| {
                self.workers
                    .get(index)
                    .map_or(usize::MAX, |w| w.open.load(Ordering::Relaxed))
            })
            .unwrap_or(0)
    }

    /// Counts a connection handed to `worker`.
    pub fn opened(&self, worker: usize) {
        if let Some(counters) = self.workers.get(worker) {
            counters.open.fetch_add(1, Ordering::Relaxed);
            counters.accepted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection of `worker` that ended (or never reached it).
    pub fn closed(&self, worker: usize) {
        if let Some(counters) = self.workers.get(worker) {
            counters.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection that parked; [`WorkerLoad::unparked`] when it
    /// wakes or closes.
    pub fn parked(&self) {
        self.parked.fetch_add(1, Ordering::Relaxed);
        self.parks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unparked(&self) {
        self.parked.fetch_sub(1, Ordering::Relaxed);
    }

    /// Parked connections now and parks since start, for `cutover status`.
    pub fn parking(&self) -> ParkingStatus {
        ParkingStatus {
            parked: self.parked.load(Ordering::Relaxed),
            parks: self.parks.load(Ordering::Relaxed),
        }
    }

    /// Each worker's connection counts, for `cutover status`.
    pub fn report(&self) -> Vec<WorkerStatus> {
        self.workers
            .iter()
            .enumerate()
            .map(|(index, counters)| WorkerStatus {
                worker: index,
                open: counters.open.load(Ordering::Relaxed),
                accepted: counters.accepted.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Idle HTTP/1.1 connections parked, in the status report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParkingStatus {
    /// Connections parked now.
    pub parked: usize,
    /// Times a connection was parked since start.
    pub parks: u64,
}

/// One worker's connections in the status report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerStatus {
    pub worker: usize,
    /// Client connections open now.
    pub open: usize,
    /// Client connections accepted since start.
    pub accepted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_prefers_fewest_open_then_start() {
        let load = WorkerLoad::new(3);
        assert_eq!(load.least_loaded(1), 1, "a tie goes to the start");
        load.opened(1);
        assert_eq!(load.least_loaded(1), 2);
        load.opened(2);
        load.opened(0);
        load.opened(0);
        assert_eq!(load.least_loaded(0), 1);
        load.closed(0);
        load.closed(0);
        assert_eq!(load.least_loaded(0), 0);
        assert_eq!(load.report()[0].accepted, 2);
    }

    #[test]
    fn no_workers_is_harmless() {
        let load = WorkerLoad::new(0);
        assert_eq!(load.least_loaded(5), 0);
        load.opened(0);
        load.closed(0);
        assert!(load.report().is_empty());
    }
}
