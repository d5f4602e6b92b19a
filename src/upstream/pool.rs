//! Keep-alive HTTP/1.1 connections to one upstream address.
//!
//! Why not hyper-util's pooled client: it is built for many hosts and
//! HTTP/2 multiplexing, so every request pays for a pool keyed by scheme and
//! authority, a checkout future, and a background task hop to hand the
//! connection back. An upstream here is one address spoken to in HTTP/1.1,
//! so the pool is a plain LIFO stack of idle [`SendRequest`] handles:
//!
//! * checkout pops the most recently used connection (warm in the upstream's
//!   caches, least likely to have hit the upstream's own keep-alive timeout);
//! * the proxy hands a connection back with [`Pool::release`] only when the
//!   response body has been read to its end, so a connection is never reused
//!   while its previous response is still streaming, and a client that went
//!   away mid-body takes the connection down with it;
//! * a request that hyper gives back unsent (the connection closed before it
//!   was written) is retried on a fresh connection, whatever its method; a
//!   bodiless idempotent request that failed before any response byte on a
//!   connection that had sat idle for over [`STALE_AFTER`] is retried once
//!   too (the upstream's keep-alive timer closed it just as we used it), as
//!   nginx's `proxy_next_upstream` does for idempotent requests. Nothing
//!   else is retried: a POST may have had effects. The idle threshold keeps
//!   the copy a replay needs off the hot path: under load a connection is
//!   reused within milliseconds, long before any upstream's keep-alive
//!   timeout (Node 5 s, gunicorn 2 s, nginx 75 s).
//!
//! Dropping the pool (when its upstream is retired) drops every idle
//! connection, which closes the sockets.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::io::body::{self, ProxyBody};
use crate::io::slowio::StallTimeout;

/// Most idle connections kept per upstream; more are closed on release.
const MAX_IDLE: usize = 1024;

/// A reused connection idle for longer than this may have been closed by
/// the upstream's keep-alive timer while we were not looking.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// TCP keep-alive probes on upstream connections, so a peer that vanished
/// without closing is noticed even while the connection sits idle.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A connection handle that can carry one request at a time.
pub type Sender = SendRequest<ProxyBody>;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (refused, unreachable, timed out).
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The connection failed while sending or awaiting the response.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The idle connections to one upstream.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    /// Longest an open connection may go without moving a byte while
    /// waiting to read or write (see [`crate::io::slowio`]).
    stall_timeout: Duration,
    idle_timeout: Duration,
    /// Oldest at the front, most recently released at the back.
    idle: Mutex<VecDeque<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// The pool's clocks.
#[derive(Debug, Clone, Copy)]
pub struct PoolTimeouts {
    /// Opening a connection.
    pub connect: Duration,
    /// No byte moved on an open connection while waiting to read or write
    /// (`upstream_timeout`): a slow response head, a stalled body, or a
    /// connection idle in the pool.
    pub stall: Duration,
    /// Idle in the pool before it is closed rather than reused.
    pub idle: Duration,
}

/// A connection taken for one request.
struct Checkout {
    sender: Sender,
    /// Whether it had sat idle in the pool long enough to have gone stale.
    maybe_stale: bool,
}

impl Pool {
    pub fn new(addr: SocketAddr, timeouts: PoolTimeouts) -> Pool {
        Pool {
            addr,
            connect_timeout: timeouts.connect,
            stall_timeout: timeouts.stall,
            idle_timeout: timeouts.idle,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends `req` and returns the response head with the connection that
    /// carries its body. Hand the connection back with [`Pool::release`]
    /// once the body has ended; drop it otherwise.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Sender), SendError> {
        let mut fresh_only = false;
        loop {
            let mut conn = match self.checkout(fresh_only).await {
                Some(conn) => conn,
                // Boxed: connecting is the rare path, and keeping its large
                // future out of line keeps every request's future small.
                None => Checkout {
                    sender: Box::pin(self.connect()).await?,
                    maybe_stale: false,
                },
            };
            let replay = conn.maybe_stale.then(|| replayable(&req)).flatten();
            match conn.sender.try_send_request(req).await {
                Ok(response) => return Ok((response, conn.sender)),
                Err(mut failed) => {
                    let unsent = failed.take_message();
                    let error = failed.into_error();
                    req = match (unsent, replay) {
                        // Never written: safe to send again, any method.
                        (Some(unsent), _) if !fresh_only => unsent,
                        (None, Some(replay)) if error.is_incomplete_message() => replay,
                        _ => return Err(SendError::Http(error)),
                    };
                    tracing::debug!(upstream.addr = %self.addr, error = %error,
                        "retrying on a fresh connection");
                    fresh_only = true;
                }
            }
        }
    }

    /// Keeps a connection whose response has been fully read, for the next
    /// request. Also closes connections that sat idle too long.
    pub fn release(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock_idle();
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { sender, since: now });
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // A panic while holding this lock cannot leave the deque invalid.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently released live connection, if any.
    async fn checkout(&self, fresh_only: bool) -> Option<Checkout> {
        if fresh_only {
            return None;
        }
        loop {
            let Idle { mut sender, since } = self.lock_idle().pop_back()?;
            let idle_for = since.elapsed();
            if idle_for > self.idle_timeout || sender.is_closed() {
                continue;
            }
            let maybe_stale = idle_for > STALE_AFTER;
            if sender.is_ready() {
                return Some(Checkout {
                    sender,
                    maybe_stale,
                });
            }
            // A connection released at the end of its response body becomes
            // ready one wake-up of its task later; it either does or closes
            // (at the latest when its stall clock runs out).
            if sender.ready().await.is_ok() {
                return Some(Checkout {
                    sender,
                    maybe_stale,
                });
            }
        }
    }

    /// Opens a new connection and spawns the task that drives it.
    async fn connect(&self) -> Result<Sender, SendError> {
        let connect_error = |source| SendError::Connect {
            addr: self.addr,
            source,
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| connect_error(io::Error::from(io::ErrorKind::TimedOut)))?
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&keepalive)
            .map_err(connect_error)?;
        let io = StallTimeout::on_reads_and_writes(stream, self.stall_timeout);
        // Flattened writes: an upstream request is usually a head alone, and
        // one copied buffer costs fewer instructions than hyper's writev
        // queue (measured: 1% of a proxied request). Client connections keep
        // writev, so a large response body is never copied or kept there.
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(io))
            .await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(upstream.addr = %addr, error = %err, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// A copy of a bodiless request with an idempotent method (RFC 9110
/// §9.2.2), which may safely be sent a second time.
fn replayable(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    use http_body::Body as _;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}
