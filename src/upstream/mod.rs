//! An upstream: one backend address with its connection pool and the count
//! of requests currently running on it.
//!
//! Upstreams live in `Arc`s that snapshots point to, so the in-flight count
//! survives a snapshot swap: the old upstream keeps counting the requests it
//! still serves while new requests go to the new one, and draining simply
//! waits for the old count to reach zero.

mod connection;
pub mod h1;
pub mod pool;
pub mod response;
pub mod stats;

pub use connection::Connection;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use serde::{Deserialize, Serialize};

use crate::config::Limits;
use pool::{Pool, PoolTimeouts};
use stats::UpstreamStats;

/// How long an upstream connection may sit idle in the pool before it is
/// closed rather than reused (below common app servers' own keep-alive
/// timeouts would be better, but those vary: Node 5 s, Puma 20 s, Tomcat
/// 60 s; a stale one is retried, see [`pool`]).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A container the controller started (persisted in the state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub image: String,
    pub deploy_id: String,
}

/// One backend address, its pool and its live counters.
#[derive(Debug)]
pub struct Upstream {
    /// Where requests go.
    pub addr: SocketAddr,
    /// Its colour ("blue" or "green"), for logs, status and the state file.
    pub label: String,
    /// The container behind it, when the deploy controller started one.
    pub container: Option<ContainerState>,
    /// The pool. Dropping the last `Upstream` reference drops the pool, which
    /// closes its idle keep-alive connections.
    pool: Arc<Pool>,
    /// Requests whose response body has not finished yet.
    in_flight: AtomicUsize,
    /// Upgraded (WebSocket) connections currently tunnelled.
    upgraded: AtomicUsize,
    /// Woken whenever `in_flight` or `upgraded` drops to zero.
    idle: Notify,
    /// Cancelled when the upstream is retired, to close tunnels deliberately.
    tunnels: CancellationToken,
    /// What it answered (status classes, latencies): a canary's bake
    /// judges these, the metrics endpoint exports them (an `Arc` so the
    /// exporter can keep the final counts of a retired upstream).
    stats: Arc<UpstreamStats>,
}

impl Upstream {
    pub fn new(addr: SocketAddr, label: impl Into<String>, limits: &Limits) -> Arc<Upstream> {
        Self::build(addr, label.into(), None, limits)
    }

    /// An upstream served by a container the controller started.
    pub fn for_container(
        addr: SocketAddr,
        label: impl Into<String>,
        container: ContainerState,
        limits: &Limits,
    ) -> Arc<Upstream> {
        Self::build(addr, label.into(), Some(container), limits)
    }

    fn build(
        addr: SocketAddr,
        label: String,
        container: Option<ContainerState>,
        limits: &Limits,
    ) -> Arc<Upstream> {
        Arc::new(Upstream {
            addr,
            label,
            container,
            pool: Arc::new(Pool::new(
                addr,
                PoolTimeouts {
                    connect: limits.upstream_connect_timeout,
                    stall: limits.upstream_timeout,
                    idle: POOL_IDLE_TIMEOUT,
                },
            )),
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
            idle: Notify::new(),
            tunnels: CancellationToken::new(),
            stats: Arc::default(),
        })
    }

    /// What this upstream answered so far.
    pub fn stats(&self) -> &UpstreamStats {
        &self.stats
    }

    /// The stats as a shared handle, which outlives this upstream.
    pub fn stats_handle(&self) -> &Arc<UpstreamStats> {
        &self.stats
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Counts one request as running until the returned guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            upstream: Arc::clone(self),
            counter: Counter::Request,
        }
    }

    /// Counts one upgraded tunnel until the returned guard is dropped.
    pub fn begin_tunnel(self: &Arc<Self>) -> InFlight {
        self.upgraded.fetch_add(1, Ordering::AcqRel);
        InFlight {
            upstream: Arc::clone(self),
            counter: Counter::Tunnel,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn tunnels(&self) -> usize {
        self.upgraded.load(Ordering::Acquire)
    }

    /// Cancelled when tunnels to this upstream must close.
    pub fn tunnel_token(&self) -> CancellationToken {
        self.tunnels.clone()
    }

    /// Closes every tunnel still open to this upstream.
    pub fn close_tunnels(&self) {
        self.tunnels.cancel();
    }

    /// Waits until no request is in flight, up to `timeout`. Returns whether
    /// the upstream became idle in time.
    pub async fn wait_requests_done(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.in_flight() == 0).await
    }

    /// Waits until no tunnel is open, up to `timeout`.
    pub async fn wait_tunnels_closed(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.tunnels() == 0).await
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let wait = async {
            loop {
                // Register for the wake-up before checking, so a guard
                // dropped between the check and the await is not missed.
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if done() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    Request,
    Tunnel,
}

/// Keeps one request (or tunnel) counted on its upstream until dropped.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    counter: Counter,
}

impl InFlight {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let counter = match self.counter {
            Counter::Request => &self.upstream.in_flight,
            Counter::Tunnel => &self.upstream.upgraded,
        };
        if counter.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.upstream.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_last_guard() {
        let upstream = Upstream::new(
            "127.0.0.1:1".parse().expect("addr"),
            "t",
            &Limits::default(),
        );
        let first = upstream.begin_request();
        let second = upstream.begin_request();
        assert_eq!(upstream.in_flight(), 2);
        assert!(!upstream.wait_requests_done(Duration::from_millis(20)).await);
        drop(first);
        let waiter = {
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move { upstream.wait_requests_done(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(second);
        assert!(waiter.await.expect("join"));
        assert_eq!(upstream.in_flight(), 0);
    }
}
