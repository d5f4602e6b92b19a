//! HTTP/1.1 client connections, parked while idle.
//!
//! hyper keeps an 8 KiB read buffer, a write buffer and its dispatcher
//! state for the whole life of an HTTP/1.1 connection, idle or not. A
//! keep-alive connection is idle most of the time, so cutover serves it in
//! *rounds*: a round is one hyper connection over the client's socket.
//! After `park_after` with no request in progress the round is ended with
//! hyper's `graceful_shutdown()` (which closes an idle HTTP/1 connection at
//! once, writing nothing) and `into_parts()`, which hands back the socket and
//! any bytes hyper had read ahead. The connection is then **parked**: its
//! task holds the socket, the shared per-connection state and a timer, and
//! waits for the next byte with no buffer. When it arrives the next round
//! starts, a fresh hyper connection whose first reads return the bytes read
//! while parked or left over from the last round. The client sees nothing.
//!
//! # What keeps a round from parking
//!
//! Parking must never close a connection a client is using. hyper closes
//! on `graceful_shutdown()` only when it is idle; otherwise it serves the
//! request in progress with `Connection: close`. So a round parks only when
//! [`ConnState`] says hyper *is* idle, checked on the connection's own task
//! right after hyper was polled (hyper cannot move in between):
//!
//! - no request in progress: every request started holds a count until
//!   hyper drops its response body, after the last byte is written;
//! - no write waiting on the socket (hyper's buffer is flushed);
//! - no bytes read since the last request ended, on a round that has not
//!   served one yet: a fresh hyper connection that holds part of a request
//!   head is "not idle" to hyper and would answer it with a close. (A round
//!   that has served a request is idle to hyper with part of the next head
//!   buffered; `into_parts()` returns those bytes and the next round starts
//!   at once with them.)
//!
//! # Timeouts while parked
//!
//! The limits hold exactly as for a connection hyper keeps: a parked
//! connection closes at `idle_timeout` after its last request started, and
//! is dropped (like hyper's header timeout) at `header_read_timeout` after
//! its last response ended; a round started by an unpark keeps that
//! deadline until a request head is complete, so a client trickling bytes
//! cannot restart hyper's header timer by getting parked. Shutdown and the
//! hand-off linger apply to parked connections as to active ones.
//!
//! # Upgrades
//!
//! A round is hyper's plain `http1::Connection` (not `with_upgrades()`,
//! which never gives the socket back), so an HTTP upgrade is left to its
//! caller. When a request asks for one, the service puts a
//! [`ClientUpgrade`] in the request; if the answer is `101`, the round's
//! end hands the socket and its read-ahead bytes to the tunnel through it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::io::body::ProxyBody;
use crate::proxy::request::{self, ClientConn};
use crate::routing::Shared;

/// A client's byte stream, as the tunnel of an upgraded connection gets it.
pub trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ClientStream for T {}

/// An upgraded client connection, its read-ahead bytes first.
pub type UpgradedClient = Box<dyn ClientStream>;

/// How an HTTP/1.1 connection is served (from the config's limits).
#[derive(Clone)]
pub(super) struct Settings {
    pub builder: http1::Builder,
    /// `None`: never park.
    pub park_after: Option<Duration>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How long an idle HTTP/1.1 keep-alive connection stays open after a
/// hand-off to a new process, for its next request (answered with
/// `Connection: close`). Closing it at once would fail a request the
/// client is sending at that instant: HTTP/1.1 has no GOAWAY.
pub(super) const HANDOFF_LINGER: Duration = Duration::from_secs(2);

/// Serves HTTP/1.1 on `io` until the connection ends, parking it while idle.
pub(super) async fn serve<IO>(shared: Arc<Shared>, settings: &Settings, io: IO, conn: ClientConn)
where
    IO: ClientStream,
{
    let state = Arc::new(ConnState::new());
    let service = Service {
        shared: Arc::clone(&shared),
        conn,
        state: Arc::clone(&state),
    };
    let cancelled = shared.shutdown.cancelled();
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(cancelled, timer);
    let mut alarm = Alarm {
        shutdown: &shared.shutdown,
        cancelled,
        timer,
        registered: None,
        shutdown_seen: false,
        recheck: true,
    };
    let mut policy = Policy {
        shared: &shared,
        settings,
        state: &state,
        linger_until: None,
        head_deadline: None,
        requests_at_park: 0,
    };
    let mut io = io;
    let mut read_ahead = Bytes::new();
    loop {
        let round = Round {
            io: RoundIo::new(io, read_ahead, Arc::clone(&state)),
            service: service.clone(),
        };
        let unread = match round.drive(&mut alarm, &mut policy).await {
            RoundEnd::Parked(parked_io, unread) => {
                io = parked_io;
                unread
            }
            RoundEnd::Upgraded(upgraded, to) => {
                let _ = to.send(Box::new(upgraded));
                return;
            }
            RoundEnd::Finished(mut finished) => {
                let _ = finished.shutdown().await;
                return;
            }
            RoundEnd::Dropped => return,
        };
        if !unread.is_empty() {
            // hyper had read part of the next request: serve it at once.
            read_ahead = unread;
            continue;
        }
        let woke = {
            let _parked = Parked::count(&shared);
            park(&mut io, &mut alarm, &mut policy).await
        };
        match woke {
            Unparked::Data(data) => read_ahead = data,
            Unparked::Close => {
                let _ = io.shutdown().await;
                return;
            }
            Unparked::Drop => return,
        }
    }
}

/// Counts a connection as parked while it lives.
struct Parked<'a>(&'a Shared);

impl Parked<'_> {
    fn count(shared: &Shared) -> Parked<'_> {
        shared.workers.parked();
        Parked(shared)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.workers.unparked();
    }
}

/// What the service, the socket wrapper and the driver share about one
/// connection. Written by the service and [`RoundIo`] inside hyper's polls,
/// read by the driver on the same task between them.
struct ConnState {
    opened: Instant,
    /// Milliseconds after `opened` of the last request start.
    last_request_ms: AtomicU64,
    /// Milliseconds after `opened` when the last request ended (`active`
    /// dropped to 0), or 0.
    idle_since_ms: AtomicU64,
    /// Requests started and not finished (response body not yet dropped).
    active: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// Bytes were read since the last request ended (or the round began).
    read_since_request: AtomicBool,
    /// The last write or flush on the socket waited (hyper holds bytes).
    write_waiting: AtomicBool,
    /// Set when a `101` was answered: where the upgraded socket goes.
    upgrade: Mutex<Option<oneshot::Sender<UpgradedClient>>>,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            opened: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            read_since_request: AtomicBool::new(false),
            write_waiting: AtomicBool::new(false),
            upgrade: Mutex::new(None),
        }
    }

    fn since_opened(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn at(&self, ms: &AtomicU64) -> Instant {
        self.opened + Duration::from_millis(ms.load(Ordering::Relaxed))
    }

    fn request_started(self: &Arc<Self>) -> Active {
        self.last_request_ms
            .store(self.since_opened(), Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(Arc::clone(self))
    }

    /// Whether hyper is idle as far as this connection can tell (see the
    /// module docs).
    fn hyper_is_idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
            && !self.read_since_request.load(Ordering::Relaxed)
            && !self.write_waiting.load(Ordering::Relaxed)
    }

    fn take_upgrade(&self) -> Option<oneshot::Sender<UpgradedClient>> {
        self.upgrade.lock().ok()?.take()
    }
}

/// One request in progress; dropped with its response body.
struct Active(Arc<ConnState>);

impl Drop for Active {
    fn drop(&mut self) {
        let state = &self.0;
        if state.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            state
                .idle_since_ms
                .store(state.since_opened(), Ordering::Relaxed);
            state.read_since_request.store(false, Ordering::Relaxed);
        }
    }
}

pin_project! {
    /// A response body that keeps its request counted as in progress.
    pub(super) struct Counted {
        #[pin]
        body: ProxyBody,
        _active: Active,
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = crate::io::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The request handler hyper calls, one per connection (cloned per round).
#[derive(Clone)]
struct Service {
    shared: Arc<Shared>,
    conn: ClientConn,
    state: Arc<ConnState>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Counted>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Counted>;
    type Error = Infallible;
    // Boxed: the round's connection must be `Unpin` to be taken apart, and an idle
    // connection then holds no room for a request future.
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> ResponseFuture {
        let active = self.state.request_started();
        // After a hand-off, the client is told to reconnect (to the new
        // process) once this response is done.
        let close = self.shared.handed_over.load(Ordering::Relaxed);
        let upgrade_to = req
            .headers()
            .contains_key(http::header::UPGRADE)
            .then(|| ClientUpgrade::offer(&mut req));
        let state = Arc::clone(&self.state);
        let response = request::handle(Arc::clone(&self.shared), self.conn.clone(), req);
        Box::pin(async move {
            let mut response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let (Some(to), Ok(mut slot)) = (upgrade_to, state.upgrade.lock()) {
                    *slot = Some(to);
                }
            } else if close {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(response.map(|body| Counted {
                body,
                _active: active,
            }))
        })
    }
}

/// Where a request that asks for an upgrade gets the client's socket once
/// its `101` is written: from a parkable HTTP/1.1 connection, or from
/// hyper's own upgrade (any other connection).
pub enum ClientUpgrade {
    Parkable(oneshot::Receiver<UpgradedClient>),
    Hyper(hyper::upgrade::OnUpgrade),
}

/// The request extension that carries a parkable connection's upgrade.
#[derive(Clone)]
struct PendingUpgrade(Arc<Mutex<Option<oneshot::Receiver<UpgradedClient>>>>);

impl ClientUpgrade {
    /// Puts the receiving half in `req`; returns the sending half.
    fn offer(req: &mut Request<Incoming>) -> oneshot::Sender<UpgradedClient> {
        let (to, from) = oneshot::channel();
        req.extensions_mut()
            .insert(PendingUpgrade(Arc::new(Mutex::new(Some(from)))));
        to
    }

    /// The upgrade of `req`, however its connection is served.
    pub fn of(req: &mut Request<Incoming>) -> ClientUpgrade {
        let offered = req
            .extensions_mut()
            .remove::<PendingUpgrade>()
            .and_then(|pending| pending.0.lock().ok()?.take());
        match offered {
            Some(from) => ClientUpgrade::Parkable(from),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
        }
    }

    /// The upgraded socket, once the `101` is written.
    pub async fn ready(self) -> Result<UpgradedClient, String> {
        match self {
            ClientUpgrade::Parkable(from) => from
                .await
                .map_err(|_| "connection ended before the upgrade".to_string()),
            ClientUpgrade::Hyper(on) => match on.await {
                Ok(upgraded) => Ok(Box::new(TokioIo::new(upgraded))),
                Err(err) => Err(err.to_string()),
            },
        }
    }
}

pin_project! {
    /// The client's socket as one round's hyper connection sees it: bytes
    /// read before the round (while parked, or left in the last round's
    /// buffer) come first; reads and waiting writes are noted in
    /// [`ConnState`].
    struct RoundIo<IO> {
        #[pin]
        io: IO,
        prefix: Bytes,
        state: Arc<ConnState>,
        // In a round, shutting down only flushes (see `poll_shutdown`);
        // once upgraded, the tunnel's shutdown is real.
        upgraded: bool,
    }
}

impl<IO> RoundIo<IO> {
    fn new(io: IO, prefix: Bytes, state: Arc<ConnState>) -> RoundIo<IO> {
        if !prefix.is_empty() {
            state.read_since_request.store(true, Ordering::Relaxed);
        }
        RoundIo {
            io,
            prefix,
            state,
            upgraded: false,
        }
    }

    /// This socket handed to a tunnel: from now on a shutdown is real.
    fn upgraded(mut self) -> RoundIo<IO> {
        self.upgraded = true;
        self
    }

    /// The socket, and the bytes hyper read but did not use (`read_buf`)
    /// followed by those it never read.
    fn into_parts(self, read_buf: Bytes) -> (IO, Bytes) {
        // An empty `read_buf` is still a view of hyper's whole read buffer
        // (8 KiB or more): never keep it.
        let unread = match (read_buf.is_empty(), self.prefix.is_empty()) {
            (true, true) => Bytes::new(),
            (_, true) => read_buf,
            (true, false) => self.prefix,
            (false, false) => {
                let mut joined = BytesMut::with_capacity(read_buf.len() + self.prefix.len());
                joined.extend_from_slice(&read_buf);
                joined.extend_from_slice(&self.prefix);
                joined.freeze()
            }
        };
        (self.io, unread)
    }
}

impl<IO: AsyncRead> AsyncRead for RoundIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Let go of the buffer the bytes came from.
                *this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.read_since_request.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: AsyncWrite> RoundIo<IO> {
    fn note<T>(state: &ConnState, polled: Poll<T>) -> Poll<T> {
        state
            .write_waiting
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl<IO: AsyncWrite> AsyncWrite for RoundIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        Self::note(this.state, this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        Self::note(this.state, this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        Self::note(this.state, this.io.poll_flush(cx))
    }

    /// In a round, only flushes: the socket outlives the round. hyper
    /// calls this when it is done with the connection, after flushing its
    /// own buffer (which `into_parts` would otherwise drop, unsent); the
    /// driver shuts the socket down itself when the connection really ends.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.upgraded {
            return this.io.poll_shutdown(cx);
        }
        Self::note(this.state, this.io.poll_flush(cx))
    }
}

/// The shutdown signal and the one timer a connection waits on beside its
/// socket, in rounds and while parked.
///
/// A connection task wakes several times per request, and polling both
/// futures on every wake-up (as `select!` does) costs a mutex and a timer
/// registration each time. Both keep the waker they were last polled with,
/// so while the task's waker stays the same a wake-up only looks at their
/// state; they are polled again only when the waker changes or the timer
/// must be moved.
struct Alarm<'a, 'token> {
    shutdown: &'token CancellationToken,
    cancelled: Pin<&'a mut WaitForCancellationFuture<'token>>,
    timer: Pin<&'a mut Sleep>,
    /// The waker both futures hold.
    registered: Option<Waker>,
    /// Shutdown was signalled and handed to `decide` (which may defer it,
    /// to linger); from then on only the timer asks again.
    shutdown_seen: bool,
    /// Ask `decide` at the next poll whatever fired (the phase changed).
    recheck: bool,
}

/// What the driver does next, decided by [`Policy::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Nothing due; wake at this instant (always later than now).
    WaitUntil(Instant),
    /// Park the connection (rounds only).
    Park,
    /// Finish gracefully: hyper closes once the request in progress, if
    /// any, is answered.
    Close,
    /// Drop the connection: it sent no complete request head in time.
    Drop,
}

impl Alarm<'_, '_> {
    /// Ready with the first action that is not a wait. `decide` is asked
    /// when shutdown is signalled, when the timer fires, and after
    /// [`Alarm::recheck`].
    fn poll(&mut self, cx: &mut Context<'_>, mut decide: impl FnMut() -> Action) -> Poll<Action> {
        loop {
            let holds_waker = self
                .registered
                .as_ref()
                .is_some_and(|waker| waker.will_wake(cx.waker()));
            if !holds_waker {
                if !self.shutdown_seen {
                    let _ = self.cancelled.as_mut().poll(cx);
                }
                let _ = self.timer.as_mut().poll(cx);
                self.registered = Some(cx.waker().clone());
            }
            let shutdown = !self.shutdown_seen && self.shutdown.is_cancelled();
            let due = std::mem::take(&mut self.recheck) || shutdown || self.timer.is_elapsed();
            if !due {
                return Poll::Pending;
            }
            self.shutdown_seen |= shutdown;
            match decide() {
                Action::WaitUntil(at) => {
                    if at != self.timer.deadline() || self.timer.is_elapsed() {
                        self.timer.as_mut().reset(at);
                        // The reset timer must be polled to hold the waker.
                        self.registered = None;
                    }
                }
                action => return Poll::Ready(action),
            }
        }
    }

    /// Makes the next poll ask `decide` (the rules differ by phase).
    fn recheck(&mut self) {
        self.recheck = true;
    }
}

/// The rules for one connection's deadlines.
struct Policy<'a> {
    shared: &'a Shared,
    settings: &'a Settings,
    state: &'a Arc<ConnState>,
    /// Set once shutdown finds a handed-over HTTP/1.1 connection: it
    /// lingers until then for one more request.
    linger_until: Option<Instant>,
    /// After an unpark: hyper's header deadline for the head that woke it.
    head_deadline: Option<Instant>,
    /// `requests` when the connection last parked.
    requests_at_park: u64,
}

/// Where the driver is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Round,
    Parked,
}

impl Policy<'_> {
    fn decide(&mut self, phase: Phase) -> Action {
        let now = Instant::now();
        let mut next = self.state.at(&self.state.last_request_ms) + self.settings.idle_timeout;
        if self.shared.shutdown.is_cancelled() {
            let handed_over = self.shared.handed_over.load(Ordering::Relaxed);
            if !handed_over {
                return Action::Close;
            }
            let until = *self.linger_until.get_or_insert(now + HANDOFF_LINGER);
            if now >= until {
                return Action::Close;
            }
            next = next.min(until);
        }
        if next <= now {
            return Action::Close;
        }
        if let Some(deadline) = self.head_deadline {
            if self.state.requests.load(Ordering::Relaxed) != self.requests_at_park {
                self.head_deadline = None;
            } else if deadline <= now {
                return Action::Drop;
            } else {
                next = next.min(deadline);
            }
        }
        if phase == Phase::Parked {
            let head = self.state.at(&self.state.idle_since_ms) + self.settings.header_read_timeout;
            if head <= now {
                return Action::Drop;
            }
            return Action::WaitUntil(next.min(head));
        }
        let Some(park_after) = self.settings.park_after else {
            return Action::WaitUntil(next);
        };
        if self.shared.shutdown.is_cancelled() {
            // Lingering: keep the round for its last request.
            return Action::WaitUntil(next);
        }
        let park_at = self.state.at(&self.state.idle_since_ms) + park_after;
        if park_at > now {
            return Action::WaitUntil(next.min(park_at));
        }
        if self.state.hyper_is_idle() {
            return Action::Park;
        }
        // Busy (or a head is arriving): look again later.
        Action::WaitUntil(next.min(now + park_after))
    }

    /// Notes that the connection parks now.
    fn parked(&mut self) {
        let requests = self.state.requests.load(Ordering::Relaxed);
        if self.head_deadline.is_none() || requests != self.requests_at_park {
            self.head_deadline =
                Some(self.state.at(&self.state.idle_since_ms) + self.settings.header_read_timeout);
        }
        self.requests_at_park = requests;
    }
}

/// One hyper connection over the client's socket.
struct Round<IO> {
    io: RoundIo<IO>,
    service: Service,
}

/// How a round ended.
enum RoundEnd<IO> {
    /// Parked: the socket and the bytes read but not yet served.
    Parked(IO, Bytes),
    /// A `101` was answered: the socket (read-ahead first) and where it goes.
    Upgraded(RoundIo<IO>, oneshot::Sender<UpgradedClient>),
    /// hyper is done (the client closed, `Connection: close`, a graceful
    /// finish): shut the socket down, as hyper would.
    Finished(IO),
    /// Dropped on an error or a header timeout.
    Dropped,
}

type Connection<IO> = http1::Connection<TokioIo<RoundIo<IO>>, Service>;

impl<IO: ClientStream> Round<IO> {
    async fn drive(self, alarm: &mut Alarm<'_, '_>, policy: &mut Policy<'_>) -> RoundEnd<IO> {
        let settings = policy.settings;
        // Boxed: the connection (hyper's buffers and state) is dropped when
        // the round ends, and the parked task must not keep room for it.
        let mut connection: Box<Connection<IO>> = Box::new(
            settings
                .builder
                .serve_connection(TokioIo::new(self.io), self.service),
        );
        let mut parking = false;
        let mut closing = false;
        alarm.recheck();
        let outcome = std::future::poll_fn(|cx| loop {
            // Polled as a future, not with `poll_without_shutdown`: only
            // this path flushes hyper's write buffer before it is done.
            if let Poll::Ready(result) = Pin::new(connection.as_mut()).poll(cx) {
                return Poll::Ready(Some(result));
            }
            if closing {
                return Poll::Pending;
            }
            match std::task::ready!(alarm.poll(cx, || policy.decide(Phase::Round))) {
                Action::Park => {
                    policy.parked();
                    parking = true;
                    closing = true;
                    Pin::new(connection.as_mut()).graceful_shutdown();
                }
                // Nothing in progress or read (hyper was just polled, on
                // this task): end the round here. hyper's graceful
                // shutdown would keep a connection that never sent a
                // request open until its header deadline.
                Action::Close if policy.state.hyper_is_idle() => return Poll::Ready(Some(Ok(()))),
                Action::Close => {
                    closing = true;
                    Pin::new(connection.as_mut()).graceful_shutdown();
                }
                Action::Drop | Action::WaitUntil(_) => return Poll::Ready(None),
            }
        })
        .await;
        match outcome {
            None => RoundEnd::Dropped,
            Some(Err(err)) => {
                tracing::debug!(error = %err, "connection ended with an error");
                RoundEnd::Dropped
            }
            Some(Ok(())) => {
                let state = Arc::clone(policy.state);
                let parts = (*connection).into_parts();
                let (io, unread) = parts.io.into_inner().into_parts(parts.read_buf);
                if let Some(to) = state.take_upgrade() {
                    return RoundEnd::Upgraded(RoundIo::new(io, unread, state).upgraded(), to);
                }
                let served_since_park =
                    state.requests.load(Ordering::Relaxed) != policy.requests_at_park;
                if parking && !served_since_park {
                    RoundEnd::Parked(io, unread)
                } else {
                    RoundEnd::Finished(io)
                }
            }
        }
    }
}

/// How a parked connection woke.
enum Unparked {
    /// The first bytes of the next request (at most one read's worth).
    Data(Bytes),
    /// Close it gracefully (end of stream, idle timeout, shutdown).
    Close,
    /// Drop it (header timeout, a read error).
    Drop,
}

/// Bytes read per wake-up of a parked connection: on the stack, only
/// while it is polled.
const UNPARK_READ: usize = 2048;

/// Waits for the next byte on a parked connection, holding no buffer.
async fn park<IO: ClientStream>(
    io: &mut IO,
    alarm: &mut Alarm<'_, '_>,
    policy: &mut Policy<'_>,
) -> Unparked {
    alarm.recheck();
    std::future::poll_fn(|cx| {
        let mut space = [0u8; UNPARK_READ];
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Unparked::Close),
            Poll::Ready(Ok(())) => {
                return Poll::Ready(Unparked::Data(Bytes::copy_from_slice(buf.filled())))
            }
            Poll::Ready(Err(err)) => {
                tracing::debug!(error = %err, "parked connection failed");
                return Poll::Ready(Unparked::Drop);
            }
            Poll::Pending => {}
        }
        alarm
            .poll(cx, || policy.decide(Phase::Parked))
            .map(|action| match action {
                Action::Drop => Unparked::Drop,
                _ => Unparked::Close,
            })
    })
    .await
}
