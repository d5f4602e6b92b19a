//! cutover's HTTP/1.1 client toward one upstream address: a LIFO pool of
//! idle keep-alive connections and the exchange of one request on one of
//! them, run inside the request's own task.
//!
//! Why not hyper's client: its connection task and dispatcher put a task
//! hop, two channels and their wake-ups between every request and its
//! upstream socket (measured: 11.9k of 30.6k instructions per proxied
//! request), and it keeps 16 KiB of buffers per connection. An upstream
//! here is one address spoken to in HTTP/1.1, one request at a time per
//! connection, so the request writes its head in one write, streams its
//! body, and reads the response head itself; the body then reads straight
//! from the socket ([`super::response`]). The framing rules are in
//! [`super::h1`].
//!
//! * Checkout pops the most recently released connection (warm in the
//!   upstream's caches, least likely to have hit its keep-alive timeout)
//!   after asking the kernel that the upstream has neither closed it nor
//!   written to it unasked ([`Connection::is_clean`]).
//! * A connection comes back only when its response body was read to its
//!   exact end ([`Pool::release`]), so it is never reused mid-response.
//! * A bodiless idempotent request (RFC 9110 §9.2.2) that finds its reused
//!   connection closed before any response byte arrived is sent again on a
//!   fresh connection (the upstream's keep-alive timer closed it just as we
//!   used it), as nginx's `proxy_next_upstream` does. Nothing else is
//!   retried: a POST may have had effects.
//!
//! Dropping the pool (when its upstream is retired and its last response
//! has ended) drops every idle connection, which closes the sockets.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::connection::Connection;
use super::h1::{self, FramingError, RequestFraming, ResponseHead};
use super::response::UpstreamBody;
use crate::io::body::{BoxError, ProxyBody};

/// Most idle connections kept per upstream and worker; more are closed on
/// release.
const MAX_IDLE: usize = 1024;

/// Most interim (1xx) responses accepted before the final one.
const MAX_INTERIM: usize = 16;

/// Request body chunks up to this size are framed and written in one write.
const COALESCE_CHUNK: usize = 16 * 1024;

/// TCP keep-alive probes on upstream connections, so a peer that vanished
/// without closing is noticed even while the connection sits idle.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why a request got no usable response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (refused, unreachable, timed out).
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The connection failed while writing or reading (a stall included:
    /// see [`crate::io::slowio::Stalled`]).
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before a complete response head.
    #[error("upstream closed the connection before answering")]
    Closed,
    /// The upstream answered with framing cutover refuses to relay.
    #[error(transparent)]
    Protocol(#[from] FramingError),
    /// The client's request body failed (a limit, or the client went away).
    #[error("request body: {0}")]
    Body(BoxError),
}

/// The upstream's final answer.
#[derive(Debug)]
pub enum Answer {
    /// A response whose body streams from the connection.
    Response(ResponseHead, UpstreamBody),
    /// `101 Switching Protocols` to a request that asked for it: the
    /// connection now carries the new protocol (bytes already read after
    /// the head are in its buffer).
    Switched(ResponseHead, Connection),
}

thread_local! {
    /// The worker this thread serves as (see [`set_worker`]).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Declares the calling thread to be worker `index`: connections it
/// releases go to that worker's own idle stack and it takes from there, so
/// with one runtime per worker a connection is used by the runtime whose
/// reactor it is registered with, and workers never contend on one lock.
pub fn set_worker(index: usize) {
    WORKER.with(|worker| worker.set(index));
}

/// The idle connections to one upstream.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    timeouts: PoolTimeouts,
    /// One LIFO stack per worker (by [`set_worker`] index, modulo their
    /// count): oldest at the front, most recently released at the back.
    shards: Box<[Mutex<Vec<Idle>>]>,
}

#[derive(Debug)]
struct Idle {
    conn: Connection,
    since: Instant,
}

/// The pool's clocks.
#[derive(Debug, Clone, Copy)]
pub struct PoolTimeouts {
    /// Opening a connection.
    pub connect: Duration,
    /// No byte moved on an open connection while waiting to read or write
    /// (`upstream_timeout`): a slow response head or a stalled body.
    pub stall: Duration,
    /// Idle in the pool before it is closed rather than reused.
    pub idle: Duration,
}

/// One request, serialised and ready to go.
struct Outgoing {
    method: Method,
    /// The head, and the body's first frame when it has one: written in
    /// one write.
    head: Vec<u8>,
    framing: RequestFraming,
    body: ProxyBody,
    /// Body bytes taken from `body` so far.
    sent: u64,
    /// Whether `body` has ended (its end is in `head` when chunked).
    body_done: bool,
    upgrade: bool,
}

/// A failed exchange, and whether sending the request again is safe.
struct Failure {
    error: SendError,
    /// Nothing of a response arrived and the connection was found closed
    /// or reset (not stalled): the upstream never processed the request,
    /// or the request is one that may be repeated.
    connection_lost: bool,
}

impl From<SendError> for Failure {
    fn from(error: SendError) -> Failure {
        Failure {
            error,
            connection_lost: false,
        }
    }
}

impl Pool {
    pub fn new(addr: SocketAddr, timeouts: PoolTimeouts) -> Pool {
        let workers = std::thread::available_parallelism().map_or(1, usize::from);
        Pool {
            addr,
            timeouts,
            shards: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request, its head already serialised by
    /// [`h1::encode_request_head`] with `framing`, and returns the
    /// upstream's final answer. `upgrade`: the request asks for a protocol
    /// switch, so a `101` is accepted.
    pub async fn send(
        self: &Arc<Self>,
        method: Method,
        head: Vec<u8>,
        framing: RequestFraming,
        body: ProxyBody,
        upgrade: bool,
    ) -> Result<Answer, SendError> {
        let mut out = Outgoing {
            head,
            method,
            framing,
            body,
            sent: 0,
            body_done: framing == RequestFraming::Empty,
            upgrade,
        };
        // The upstream is contacted only once the body has started well: a
        // body that fails at once (malformed chunks, over the limit) never
        // reaches it, not even its head.
        if !out.body_done {
            let mut first = Vec::new();
            let large = take_frame(&mut out, &mut first)
                .await
                .map_err(|f| f.error)?;
            out.head.extend_from_slice(&first);
            if let Some(data) = large {
                out.head.extend_from_slice(&data);
                if framing == RequestFraming::Chunked {
                    out.head.extend_from_slice(b"\r\n");
                }
            }
        }
        let replayable = framing == RequestFraming::Empty && is_idempotent(&out.method);
        let mut fresh_only = false;
        loop {
            let mut conn = match self.checkout(fresh_only) {
                Some(conn) => conn,
                // Boxed: connecting is the rare path, and keeping its future
                // out of line keeps every request's future small.
                None => Box::pin(self.connect()).await?,
            };
            let reused = conn.reused;
            let failure = match exchange(&mut conn, &mut out).await {
                Ok(head) => return self.answer(head, conn, &out),
                Err(failure) => failure,
            };
            if !(reused && replayable && failure.connection_lost) || fresh_only {
                return Err(failure.error);
            }
            tracing::debug!(upstream.addr = %self.addr, error = %failure.error,
                "reused connection was closed; retrying on a fresh one");
            fresh_only = true;
        }
    }

    /// Turns a final response head into the answer the proxy relays.
    fn answer(
        self: &Arc<Self>,
        head: ResponseHead,
        conn: Connection,
        out: &Outgoing,
    ) -> Result<Answer, SendError> {
        if head.status == StatusCode::SWITCHING_PROTOCOLS && out.upgrade {
            return Ok(Answer::Switched(head, conn));
        }
        let framing = h1::response_framing(&out.method, &head)?;
        let pool = head.keep_alive.then(|| Arc::clone(self));
        Ok(Answer::Response(
            head,
            UpstreamBody::new(conn, framing, pool),
        ))
    }

    /// Keeps a connection whose response has been fully read, for the next
    /// request. Also closes connections that sat idle too long.
    pub fn release(&self, mut conn: Connection) {
        conn.reused = true;
        if conn.buf.capacity() > 0 && conn.buf.is_empty() {
            // An idle connection holds no buffer.
            conn.buf = BytesMut::new();
        }
        let now = Instant::now();
        let mut idle = self.lock_idle();
        let expired = idle
            .iter()
            .take_while(|oldest| now.duration_since(oldest.since) > self.timeouts.idle)
            .count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since: now });
        }
    }

    /// This worker's idle stack.
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        let shard = WORKER.with(Cell::get) % self.shards.len();
        // A panic while holding this lock cannot leave the stack invalid.
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently released connection that is still clean.
    fn checkout(&self, fresh_only: bool) -> Option<Connection> {
        if fresh_only {
            return None;
        }
        loop {
            let Idle { conn, since } = self.lock_idle().pop()?;
            if since.elapsed() > self.timeouts.idle {
                // The rest are older still.
                self.lock_idle().clear();
                return None;
            }
            if conn.is_clean() {
                return Some(conn);
            }
        }
    }

    /// Opens a new connection.
    async fn connect(&self) -> Result<Connection, SendError> {
        let connect_error = |source| SendError::Connect {
            addr: self.addr,
            source,
        };
        let stream = tokio::time::timeout(self.timeouts.connect, TcpStream::connect(self.addr))
            .await
            .map_err(|_| connect_error(io::Error::from(io::ErrorKind::TimedOut)))?
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&keepalive)
            .map_err(connect_error)?;
        Ok(Connection::new(stream, self.timeouts.stall))
    }
}

/// Writes one request on `conn` and reads its final response head.
async fn exchange(conn: &mut Connection, out: &mut Outgoing) -> Result<ResponseHead, Failure> {
    conn.write_all(&out.head).await.map_err(lost_or_io)?;
    if !out.body_done {
        if let Err(failure) = write_body(conn, out).await {
            // An upstream that answers early (a 413, say) and closes before
            // reading the rest has its answer relayed, not a 502.
            if matches!(failure.error, SendError::Io(_)) {
                if let Ok(head) = read_head(conn).await {
                    return Ok(head);
                }
            }
            return Err(failure);
        }
    }
    read_head(conn).await
}

/// Streams the rest of the request body in its framing.
async fn write_body(conn: &mut Connection, out: &mut Outgoing) -> Result<(), Failure> {
    let mut framed = Vec::new();
    while !out.body_done {
        framed.clear();
        let data = take_frame(out, &mut framed).await?;
        if !framed.is_empty() {
            conn.write_all(&framed).await.map_err(SendError::Io)?;
        }
        if let Some(data) = data {
            // Too big to copy: written as it is, between its framing.
            conn.write_all(&data).await.map_err(SendError::Io)?;
            if out.framing == RequestFraming::Chunked {
                conn.write_all(b"\r\n").await.map_err(SendError::Io)?;
            }
        }
    }
    Ok(())
}

/// Takes the body's next data frame and appends it, framed, to `framed`
/// (the end of a chunked body included). A frame too large to copy is
/// returned instead, with only its chunk prefix appended. Trailers are not
/// forwarded.
async fn take_frame(out: &mut Outgoing, framed: &mut Vec<u8>) -> Result<Option<Bytes>, Failure> {
    loop {
        let Some(frame) = out.body.frame().await else {
            out.body_done = true;
            return match out.framing {
                RequestFraming::Length(declared) if out.sent < declared => {
                    Err(body_error("request body shorter than its Content-Length"))
                }
                RequestFraming::Chunked => {
                    framed.extend_from_slice(b"0\r\n\r\n");
                    Ok(None)
                }
                _ => Ok(None),
            };
        };
        let Ok(data) = frame.map_err(SendError::Body)?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        out.sent += data.len() as u64;
        if let RequestFraming::Length(declared) = out.framing {
            if out.sent > declared {
                return Err(body_error("request body longer than its Content-Length"));
            }
        }
        if out.framing == RequestFraming::Chunked {
            h1::push_chunk_prefix(framed, data.len());
        }
        if data.len() > COALESCE_CHUNK {
            return Ok(Some(data));
        }
        framed.extend_from_slice(&data);
        if out.framing == RequestFraming::Chunked {
            framed.extend_from_slice(b"\r\n");
        }
        return Ok(None);
    }
}

fn body_error(reason: &'static str) -> Failure {
    SendError::Body(reason.into()).into()
}

/// Reads until a final response head, skipping interim ones (`100
/// Continue`, `103 Early Hints`); a `101` is final.
async fn read_head(conn: &mut Connection) -> Result<ResponseHead, Failure> {
    let mut interim = 0;
    let mut received = !conn.buf.is_empty();
    loop {
        if let Some(head) = h1::parse_response_head(&mut conn.buf).map_err(SendError::from)? {
            if !head.status.is_informational() || head.status == StatusCode::SWITCHING_PROTOCOLS {
                return Ok(head);
            }
            interim += 1;
            if interim > MAX_INTERIM {
                return Err(
                    SendError::from(FramingError::Head("too many interim responses")).into(),
                );
            }
            continue;
        }
        match conn.fill().await {
            Ok(0) => {
                return Err(Failure {
                    error: SendError::Closed,
                    connection_lost: !received,
                })
            }
            Ok(_) => received = true,
            Err(err) if received => return Err(SendError::Io(err).into()),
            Err(err) => return Err(lost_or_io(err)),
        }
    }
}

/// An I/O error before any response byte: a reset or broken connection
/// counts as lost (retry may be safe), a stall never does.
fn lost_or_io(err: io::Error) -> Failure {
    let connection_lost = matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    );
    Failure {
        error: SendError::Io(err),
        connection_lost,
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    const TIMEOUTS: PoolTimeouts = PoolTimeouts {
        connect: Duration::from_secs(1),
        stall: Duration::from_secs(60),
        idle: Duration::from_secs(30),
    };

    /// A pool holding one idle connection, and the upstream's end of it.
    async fn pool_with_one_idle() -> (Arc<Pool>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = Arc::new(Pool::new(addr, TIMEOUTS));
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        pool.release(Connection::new(client, TIMEOUTS.stall));
        (pool, server)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_reused_until_the_idle_timeout() {
        let (pool, _server) = pool_with_one_idle().await;
        tokio::time::advance(Duration::from_secs(29)).await;
        let conn = pool.checkout(false).expect("still fresh at 29 s");
        assert!(conn.reused);
        pool.release(conn);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(pool.checkout(false).is_none(), "stale after 31 s idle");
        assert!(
            pool.lock_idle().is_empty(),
            "expired connections are closed"
        );
    }

    /// Waits (bounded) until the idle connection's peek sees what the
    /// upstream did: on loopback it reaches the kernel at once, whatever
    /// the runtime has noticed.
    async fn wait_until_idle_is_unclean(pool: &Pool, never: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool
            .lock_idle()
            .first()
            .is_some_and(|idle| idle.conn.is_clean())
        {
            assert!(Instant::now() < deadline, "{never}");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_checked_out() {
        let (pool, server) = pool_with_one_idle().await;
        drop(server);
        wait_until_idle_is_unclean(&pool, "close never seen").await;
        assert!(pool.checkout(false).is_none());
    }

    #[tokio::test]
    async fn a_connection_with_unsolicited_bytes_is_not_checked_out() {
        let (pool, mut server) = pool_with_one_idle().await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        wait_until_idle_is_unclean(&pool, "bytes never seen").await;
        assert!(pool.checkout(false).is_none());
    }
}
