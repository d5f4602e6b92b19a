//! Connection serving: the accept loops, TLS handshakes, the hyper
//! connection builder with its limits, idle and shutdown handling.
//!
//! [`Server`] is the data plane's entry point: [`crate::app`] builds one
//! and gives it each listener; everything a connection needs after that
//! (the routing cell, the shutdown token) comes through [`Shared`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::config::Limits;
use crate::io::slowio::StallTimeout;
use crate::metrics::{Listener, OpenConnection, Protocol};
use crate::proxy::h1;
use crate::proxy::request::{self, ClientConn};
use crate::proxy::workers::{Accepted, Dispatch, Workers};
use crate::routing::Shared;
use crate::tls::acme::ACME_TLS_ALPN;

/// hyper's HTTP/2 connection builder with our limits applied (TLS
/// connections that chose `h2` by ALPN).
fn http2_builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// How HTTP/1.1 connections are served, plain and TLS alike.
fn http1_settings(limits: &Limits) -> h1::Settings {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper starts this timer whenever it waits for a request head, so
        // it also bounds how long an idle keep-alive connection stays open
        // (a parked one too: see `h1`).
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    h1::Settings {
        builder,
        park_after: (!limits.park_after.is_zero()).then_some(limits.park_after),
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
    }
}

/// The settings every connection task shares (one allocation per server,
/// not a copy per connection).
struct Settings {
    http2: http2::Builder<TokioExecutor>,
    http1: h1::Settings,
    limits: Limits,
}

/// What each accept loop and connection task needs.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    /// One permit per open client connection: when all are taken, the
    /// accept loop waits instead of accepting more (mini-redis's pattern).
    connections: Arc<Semaphore>,
    /// Set when connections are served on worker threads (see
    /// [`crate::proxy::workers`]): the accept loops hand them over there.
    dispatch: Option<Arc<Dispatch>>,
}

impl Server {
    pub fn new(shared: Arc<Shared>, limits: Limits) -> Server {
        Server {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            settings: Arc::new(Settings {
                http2: http2_builder(&limits),
                http1: http1_settings(&limits),
                limits,
            }),
            shared,
            dispatch: None,
        }
    }

    /// This server, handing every accepted connection to `workers`.
    pub fn dispatching_to(mut self, workers: &Workers) -> Server {
        self.dispatch = Some(workers.dispatch());
        self
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Accepts connections on `listener` (TLS ones when `tls` is set) until
    /// shutdown, on a task the shutdown waits for. Cancelling the returned
    /// token closes this listener alone (a reload moved its address);
    /// connections it accepted are served on.
    pub fn spawn_accept_loop(
        &self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
    ) -> CancellationToken {
        if let Ok(addr) = listener.local_addr() {
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!(listen.addr = %addr, scheme, "listening");
        }
        let stop = self.shared.shutdown.child_token();
        self.shared
            .tasks
            .spawn(self.clone().accept_loop(listener, tls, stop.clone()));
        stop
    }

    async fn accept_loop(
        self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) {
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&self.connections).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            let accepted = tokio::select! {
                accepted = accept_with_backoff(&listener) => accepted,
                _ = shutdown.cancelled() => return,
            };
            let (stream, addr) = accepted;
            self.hand_off(stream, addr, tls.clone(), permit);
        }
    }

    /// Serves an accepted connection: on a task of this runtime, or on a
    /// worker thread when there are workers.
    fn hand_off(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
        permit: OwnedSemaphorePermit,
    ) {
        let Some(dispatch) = &self.dispatch else {
            let server = self.clone();
            self.shared
                .tasks
                .spawn(async move { server.serve_tcp(stream, addr, tls, permit).await });
            return;
        };
        // Out of this runtime's reactor; the worker registers it with its own.
        match stream.into_std() {
            Ok(stream) => dispatch.hand_off(
                self,
                Accepted {
                    stream,
                    addr,
                    tls,
                    permit,
                },
            ),
            Err(err) => {
                tracing::warn!(client.addr = %addr, error = %err, "cannot hand a connection to a worker")
            }
        }
    }

    pub(super) async fn serve_tcp(
        self,
        stream: TcpStream,
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
        _permit: OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        // Below TLS, so a client that stops reading is caught whatever
        // protocol runs on top (see `slowio`).
        let stream = StallTimeout::on_writes(stream, self.settings.limits.send_timeout);
        match tls {
            None => {
                let conn = ClientConn::new(addr, false);
                let _open = self.open(Listener::Http, Protocol::Http1);
                // Plain HTTP is HTTP/1.1 only (no h2c).
                self.serve_http1(stream, conn).await;
            }
            Some(acceptor) => {
                // Boxed: rustls' handshake state is large and needed briefly.
                let handshake = tokio::time::timeout(
                    self.settings.limits.tls_handshake_timeout,
                    Box::pin(acceptor.accept(stream)),
                );
                match handshake.await {
                    Ok(Ok(stream)) if is_acme_validation(&stream) => {
                        // RFC 8737: the validator only looks at the
                        // certificate; no application data follows.
                        tracing::info!(client.addr = %addr, "answered an ACME tls-alpn-01 validation");
                    }
                    Ok(Ok(stream)) if stream.get_ref().1.alpn_protocol() == Some(b"h2") => {
                        let conn = ClientConn::new(addr, true);
                        let _open = self.open(Listener::Https, Protocol::Http2);
                        Box::pin(self.serve_http2(stream, conn)).await;
                    }
                    Ok(Ok(stream)) => {
                        let conn = ClientConn::new(addr, true);
                        let _open = self.open(Listener::Https, Protocol::Http1);
                        self.serve_http1(stream, conn).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(client.addr = %addr, error = %err, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(client.addr = %addr, "TLS handshake timed out"),
                }
            }
        }
    }

    /// Counts the connection as open while the guard lives (metrics on).
    fn open(&self, listener: Listener, protocol: Protocol) -> Option<OpenConnection> {
        self.shared.metrics.connection_open(listener, protocol)
    }

    /// Serves HTTP/1.1 on one connection until it closes (see [`h1`]).
    async fn serve_http1<IO: h1::ClientStream>(&self, io: IO, conn: ClientConn) {
        // Boxed: a connection task holds only the protocol it serves.
        Box::pin(h1::serve(
            Arc::clone(&self.shared),
            &self.settings.http1,
            io,
            conn,
        ))
        .await;
    }

    /// Serves HTTP/2 on one connection until it closes, or shuts it down
    /// gracefully (GOAWAY: in-flight requests finish) when the server stops
    /// or no request has started for `idle_timeout`.
    async fn serve_http2<IO>(&self, io: IO, conn: ClientConn)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        let addr = conn.addr;
        let idle = Arc::new(IdleClock::new());
        let touched = Arc::clone(&idle);
        let service = service_fn(move |req| {
            touched.touch();
            request::handle(Arc::clone(&shared), conn.clone(), req)
        });
        let watch = Watch {
            shutdown: self.shared.shutdown.clone(),
            idle,
            idle_timeout: self.settings.limits.idle_timeout,
        };
        let connection = self
            .settings
            .http2
            .serve_connection(TokioIo::new(io), service);
        let mut connection = Box::pin(connection);
        let result = watch
            .drive(connection.as_mut(), |c| c.graceful_shutdown())
            .await;
        if let Err(err) = result {
            tracing::debug!(client.addr = %addr, error = %err, "connection ended with an error");
        }
    }
}

/// Whether the handshake was a TLS-ALPN-01 validation (ALPN `acme-tls/1`).
fn is_acme_validation<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN)
}

/// When a connection last started a request.
struct IdleClock {
    opened: tokio::time::Instant,
    /// Milliseconds after `opened` of the last request start.
    last_request_ms: AtomicU64,
    /// Whether any request has started on the connection.
    requested: AtomicBool,
}

impl IdleClock {
    fn new() -> IdleClock {
        IdleClock {
            opened: tokio::time::Instant::now(),
            last_request_ms: AtomicU64::new(0),
            requested: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_request_ms.store(ms, Ordering::Relaxed);
        self.requested.store(true, Ordering::Relaxed);
    }

    fn last_request(&self) -> tokio::time::Instant {
        self.opened + Duration::from_millis(self.last_request_ms.load(Ordering::Relaxed))
    }
}

/// What ends a connection gracefully: server shutdown, or idleness.
struct Watch {
    shutdown: CancellationToken,
    idle: Arc<IdleClock>,
    idle_timeout: Duration,
}

impl Watch {
    /// Drives `connection` to completion, asking it to finish gracefully
    /// (hyper's two connection types share no trait for this, hence the
    /// `begin_shutdown` function) on shutdown or after `idle_timeout`
    /// without a new request. Graceful means an HTTP/2 GOAWAY or an HTTP/1
    /// close after the current response: no request in progress is cut.
    async fn drive<C, E>(
        &self,
        mut connection: std::pin::Pin<&mut C>,
        begin_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
    ) -> Result<(), E>
    where
        C: Future<Output = Result<(), E>>,
    {
        let cancelled = self.shutdown.cancelled();
        let idle = tokio::time::sleep_until(self.idle_deadline());
        tokio::pin!(cancelled, idle);
        let mut signals = Signals {
            shutdown: &self.shutdown,
            cancelled,
            idle,
            registered: None,
        };
        let finished = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(Some(result));
            }
            signals
                .poll_stop(cx, || self.idle_deadline())
                .map(|()| None)
        })
        .await;
        if let Some(result) = finished {
            return result;
        }
        begin_shutdown(connection.as_mut());
        if !self.idle.requested.load(Ordering::Relaxed) {
            // No request ever started: hyper's HTTP/2 graceful shutdown
            // waits for a client preface that may never come, so the
            // GOAWAY gets a bounded wait.
            return tokio::time::timeout(Duration::from_secs(1), connection)
                .await
                .unwrap_or(Ok(()));
        }
        connection.await
    }

    fn idle_deadline(&self) -> tokio::time::Instant {
        self.idle.last_request() + self.idle_timeout
    }
}

/// The two signals [`Watch::drive`] waits for beside the connection.
///
/// A connection task wakes several times per request, and polling both
/// signals' futures on every wake-up (as `select!` does) costs a mutex and
/// a timer registration each time. Both futures keep the waker they were
/// last polled with, so while the task's waker stays the same, a wake-up
/// only needs to look at their state; they are polled again only when the
/// waker changes or the idle timer must be moved.
struct Signals<'a, 'token> {
    shutdown: &'token CancellationToken,
    cancelled: std::pin::Pin<&'a mut WaitForCancellationFuture<'token>>,
    idle: std::pin::Pin<&'a mut tokio::time::Sleep>,
    /// The waker both futures hold.
    registered: Option<Waker>,
}

impl Signals<'_, '_> {
    /// Ready when the connection should be asked to finish: the server is
    /// shutting down, or `idle_deadline()` (re-read when the timer fires,
    /// since requests move it) has passed.
    fn poll_stop(
        &mut self,
        cx: &mut Context<'_>,
        idle_deadline: impl Fn() -> tokio::time::Instant,
    ) -> Poll<()> {
        loop {
            let holds_waker = self
                .registered
                .as_ref()
                .is_some_and(|waker| waker.will_wake(cx.waker()));
            if holds_waker {
                if self.shutdown.is_cancelled() {
                    return Poll::Ready(());
                }
                if !self.idle.is_elapsed() {
                    return Poll::Pending;
                }
            } else {
                if self.cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                let idle = self.idle.as_mut().poll(cx);
                self.registered = Some(cx.waker().clone());
                if idle.is_pending() {
                    return Poll::Pending;
                }
            }
            // The timer fired at an old deadline; a request since may have
            // moved it.
            let deadline = idle_deadline();
            if deadline <= tokio::time::Instant::now() {
                return Poll::Ready(());
            }
            self.idle.as_mut().reset(deadline);
            // The reset timer must be polled to hold the waker again.
            self.registered = None;
        }
    }
}

/// Accepts one connection, backing off on errors such as EMFILE instead of
/// spinning (mini-redis's accept loop).
async fn accept_with_backoff(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(err) => {
                tracing::warn!(error = %err, ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
