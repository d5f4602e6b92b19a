//! Stall timeouts as IO wrappers: for client connections, a write that has
//! made no progress for `send_timeout` fails; for upstream connections,
//! reads and writes that make no progress for `upstream_timeout` fail.
//!
//! hyper has timeouts for reading a request head but none for writing: a
//! client that requests a large response and then never reads (or keeps
//! its TCP window at zero) would hold its connection, its task and its
//! buffers forever. nginx bounds this with `send_timeout`; this wrapper
//! does the same below TLS and HTTP, so it covers HTTP/1, HTTP/2 and
//! upgraded (WebSocket) connections alike without parsing anything.
//!
//! The clock runs only while the connection waits on its peer: from the
//! first poll that returns `Pending` until every direction that was waiting
//! has moved a byte again. A client connection only watches writes, so an
//! idle client connection (nothing to write) is never timed out here; the
//! header and idle timeouts cover that.
//!
//! Upstream connections also watch reads, the way nginx's
//! `proxy_read_timeout` does. That bounds the wait for a response head *and*
//! an upstream that stalls mid-body (which a per-request deadline on the
//! head alone would not), at the cost of one timer per connection instead
//! of one per request. The bound is the timeout after the **last byte
//! moved in either direction**: a read that is still waiting when the
//! request is written keeps the clock running, and the write only moves
//! the deadline. HTTP clients poll the read before writing the request and
//! then sleep until woken, so the wrapper cannot wait for the read to be
//! polled again to restart the clock: that happens only when the timer
//! fires, which would stretch the bound up to twice the timeout.
//!
//! Moving the deadline on every byte would mean a timer update per write.
//! Instead progress only notes the time (one clock read), and when the
//! timer fires early the wrapper re-arms it for the noted time plus the
//! timeout: at most one extra timer wake-up per stretch, and none at all
//! when the answer comes in time (the common case). An idle pooled
//! connection is closed the same way after the timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The error inside the `TimedOut` I/O error a stalled connection fails
/// with, so callers can tell it from other I/O errors (the proxy answers 504
/// when an upstream stalls).
#[derive(Debug, thiserror::Error)]
#[error("no progress for {0:?} (peer stalled)")]
pub struct Stalled(pub Duration);

pin_project! {
    /// Wraps a stream; writes (and flushes) that stay blocked for longer
    /// than the timeout fail with [`io::ErrorKind::TimedOut`], which ends
    /// the connection. Reads are watched the same way only when asked.
    pub struct StallTimeout<T> {
        #[pin]
        inner: T,
        // Boxed so the wrapper stays `Unpin` when `T` is (TLS needs that).
        timer: Pin<Box<Sleep>>,
        timeout: Duration,
        // Whether the last read poll returned `Pending` (reads watched only).
        read_waiting: bool,
        // Whether the last write, flush or shutdown poll returned `Pending`.
        // The clock runs while either flag is set.
        write_waiting: bool,
        // When a byte last moved while the clock ran, if that is later than
        // the time `timer` was armed from: folded in when the timer fires.
        moved_at: Option<Instant>,
        // The waker `timer` was last polled with while the clock runs: while
        // the task's waker stays the same, the timer already holds it, so
        // the repeated `Pending` polls of one stretch skip polling the timer.
        registered: Option<Waker>,
        // Whether reads count too (upstream side).
        watch_reads: bool,
    }
}

impl<T> StallTimeout<T> {
    /// A client connection: only writes are timed (`send_timeout`).
    pub fn on_writes(inner: T, timeout: Duration) -> Self {
        Self::build(inner, timeout, false)
    }

    /// An upstream connection: reads and writes are timed
    /// (`upstream_timeout`).
    pub fn on_reads_and_writes(inner: T, timeout: Duration) -> Self {
        Self::build(inner, timeout, true)
    }

    /// The wrapped stream, for socket options and peeks that bypass the
    /// clock.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn build(inner: T, timeout: Duration, watch_reads: bool) -> Self {
        StallTimeout {
            inner,
            timer: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            read_waiting: false,
            write_waiting: false,
            moved_at: None,
            registered: None,
            watch_reads,
        }
    }
}

/// Which way a poll tried to move bytes.
#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl<T> StallTimeout<T> {
    /// Tracks one poll: progress stops the clock unless the other direction
    /// still waits (then it only moves the deadline), `Pending` starts it
    /// (once per stretch) and fails once it has run out.
    fn watch<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        direction: Direction,
        polled: Poll<io::Result<R>>,
        progressed: impl FnOnce(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(Ok(value)) => {
                if progressed(&value) {
                    self.moved(cx, direction);
                }
                Poll::Ready(Ok(value))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => self.waiting(cx, direction),
        }
    }

    /// A byte moved in `direction`.
    fn moved(self: Pin<&mut Self>, cx: &mut Context<'_>, direction: Direction) {
        let this = self.project();
        let other_waits = match direction {
            Direction::Read => {
                *this.read_waiting = false;
                *this.write_waiting
            }
            Direction::Write => {
                *this.write_waiting = false;
                *this.read_waiting
            }
        };
        if !other_waits {
            *this.moved_at = None;
            *this.registered = None;
        } else if !this.timer.is_elapsed() {
            // The clock keeps running for the other direction, from now.
            *this.moved_at = Some(Instant::now());
        } else {
            // The timer fired while nobody polled the waiting direction, so
            // its wake-up is spent: re-arm it here, or a peer that now goes
            // silent would never get the task woken to fail.
            this.timer.as_mut().reset(Instant::now() + *this.timeout);
            *this.moved_at = None;
            *this.registered = match this.timer.as_mut().poll(cx) {
                Poll::Pending => Some(cx.waker().clone()),
                Poll::Ready(()) => None,
            };
        }
    }

    /// A poll in `direction` found the peer not ready.
    fn waiting<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        direction: Direction,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        let running = *this.read_waiting || *this.write_waiting;
        match direction {
            Direction::Read => *this.read_waiting = true,
            Direction::Write => *this.write_waiting = true,
        }
        if !running {
            this.timer.as_mut().reset(Instant::now() + *this.timeout);
            *this.moved_at = None;
            *this.registered = None;
        } else if !this.timer.is_elapsed()
            && this
                .registered
                .as_ref()
                .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        // Polling the timer registers the waker, so a peer that never moves
        // a byte again still gets this task woken to fail.
        while this.timer.as_mut().poll(cx).is_ready() {
            // The timer fired: unless a byte moved since it was armed, the
            // peer has stalled for a whole timeout.
            let deadline = this.moved_at.take().map(|at| at + *this.timeout);
            match deadline {
                Some(deadline) if deadline > Instant::now() => {
                    this.timer.as_mut().reset(deadline);
                }
                _ => return Poll::Ready(Err(stalled(*this.timeout))),
            }
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

fn stalled(timeout: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, Stalled(timeout))
}

impl<T: AsyncRead> AsyncRead for StallTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.watch_reads {
            return self.project().inner.poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let polled = self.as_mut().project().inner.poll_read(cx, buf);
        // EOF (nothing filled) is not progress, but it is not `Pending`
        // either, so it never arms the clock.
        let moved = buf.filled().len() > before;
        self.watch(cx, Direction::Read, polled, |_| moved)
    }
}

impl<T: AsyncWrite> AsyncWrite for StallTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write(cx, buf);
        self.watch(cx, Direction::Write, polled, |written| *written > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.watch(cx, Direction::Write, polled, |written| *written > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    // A finished flush or shutdown moved no byte of its own (on TCP they
    // are no-ops), so it never disarms the clock: hyper flushes on every
    // pass of its loop, and counting that as progress would re-arm the
    // clock on every wake-up, including the timer's own.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.watch(cx, Direction::Write, polled, |_| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_shutdown(cx);
        self.watch(cx, Direction::Write, polled, |_| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_reader_that_never_reads_fails_the_write() {
        let (server, _client) = tokio::io::duplex(64);
        let mut guarded = StallTimeout::on_writes(server, Duration::from_millis(100));
        let payload = vec![b'x'; 4096];
        let result = tokio::time::timeout(Duration::from_secs(10), guarded.write_all(&payload))
            .await
            .expect("the send timeout must end the write");
        let err = result.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_slow_but_steady_reader_gets_everything() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut guarded = StallTimeout::on_writes(server, Duration::from_millis(500));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                match client.read(&mut chunk).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let payload = vec![b'y'; 2048];
        tokio::time::timeout(Duration::from_secs(10), async {
            guarded.write_all(&payload).await?;
            guarded.shutdown().await
        })
        .await
        .expect("bounded")
        .expect("a reader that keeps reading is never timed out");
        drop(guarded);
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("bounded")
            .expect("reader task");
        assert_eq!(got, payload);
    }

    /// A waker that records whether it was woken.
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn flag() -> (std::sync::Arc<Flag>, Waker) {
        let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        (std::sync::Arc::clone(&flag), Waker::from(flag))
    }

    #[tokio::test]
    async fn a_blocked_write_polled_with_a_new_waker_wakes_that_one() {
        // The first `Pending` of a stretch registers the timer; later ones
        // skip it while the waker stays the same. A different waker must
        // be registered, or its task would never learn of the timeout.
        let (server, _client) = tokio::io::duplex(16);
        let mut guarded = StallTimeout::on_writes(server, Duration::from_millis(50));
        let payload = [b'z'; 64];
        let (_first, first_waker) = flag();
        let (second, second_waker) = flag();
        let mut poll_with = |waker: &Waker| {
            let mut cx = Context::from_waker(waker);
            Pin::new(&mut guarded).poll_write(&mut cx, &payload)
        };
        assert!(matches!(poll_with(&first_waker), Poll::Ready(Ok(16))));
        assert!(poll_with(&first_waker).is_pending());
        assert!(poll_with(&first_waker).is_pending());
        assert!(poll_with(&second_waker).is_pending());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            second.0.load(std::sync::atomic::Ordering::SeqCst),
            "the waker of the latest poll must be woken at the timeout"
        );
        match poll_with(&second_waker) {
            Poll::Ready(Err(err)) => assert_eq!(err.kind(), io::ErrorKind::TimedOut),
            other => panic!("expected the stall error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_idle_connection_is_not_timed_out() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut guarded = StallTimeout::on_writes(server, Duration::from_millis(20));
        // Nothing is written for far longer than the timeout...
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...and the next write still goes through.
        guarded.write_all(b"hello").await.expect("not blocked");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
    }

    /// The upstream timeout in the paused-clock tests below.
    const TIMEOUT: Duration = Duration::from_secs(1);

    /// Polls the read once: nothing has arrived.
    async fn read_finds_nothing<T: AsyncRead + Unpin>(guarded: &mut StallTimeout<T>) {
        std::future::poll_fn(|cx| {
            let mut buf = [0u8; 64];
            let polled = Pin::new(&mut *guarded).poll_read(cx, &mut ReadBuf::new(&mut buf));
            assert!(polled.is_pending(), "nothing was sent: {polled:?}");
            Poll::Ready(())
        })
        .await;
    }

    /// Writes one request and then, like hyper's client, sleeps until woken
    /// and polls only the read (which is still waiting from before). Returns
    /// how long after the write the read failed with the stall error.
    async fn stall_after_request<T: AsyncRead + AsyncWrite + Unpin>(
        guarded: &mut StallTimeout<T>,
    ) -> Duration {
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut written = false;
        let written_at = Instant::now();
        let waited = std::future::poll_fn(|cx| {
            if !written {
                written = true;
                let polled = Pin::new(&mut *guarded).poll_write(cx, request);
                assert!(matches!(polled, Poll::Ready(Ok(n)) if n == request.len()));
                return Poll::Pending;
            }
            let mut buf = [0u8; 64];
            match Pin::new(&mut *guarded).poll_read(cx, &mut ReadBuf::new(&mut buf)) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(result) => Poll::Ready(result.expect_err("the peer never answers")),
            }
        });
        let err = tokio::time::timeout(10 * TIMEOUT, waited)
            .await
            .expect("the stall clock must end the wait");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        written_at.elapsed()
    }

    /// Within the timer's millisecond resolution.
    fn assert_about(elapsed: Duration, expected: Duration, case: &str) {
        assert!(
            elapsed >= expected && elapsed <= expected + Duration::from_millis(3),
            "{case}: timed out {elapsed:?} after the request, expected {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstream_timeout_counts_from_the_request_write() {
        // The read waits from the moment the connection is open (fresh:
        // gap 0) or since the connection went idle in the pool (a gap of up
        // to and past a whole timeout). Whatever the gap, the stall error
        // comes one timeout after the last byte moved: the request.
        for gap_ms in [0, 1, 400, 700, 999, 1000, 1500, 3000] {
            let (upstream, _peer) = tokio::io::duplex(1024);
            let mut guarded = StallTimeout::on_reads_and_writes(upstream, TIMEOUT);
            read_finds_nothing(&mut guarded).await;
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
            let elapsed = stall_after_request(&mut guarded).await;
            assert_about(elapsed, TIMEOUT, &format!("read waiting {gap_ms} ms"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_connection_counts_from_its_own_request() {
        // One answered exchange, then the connection idles with its read
        // waiting (as in the pool), then a request the peer never answers.
        let (upstream, mut peer) = tokio::io::duplex(1024);
        let mut guarded = StallTimeout::on_reads_and_writes(upstream, TIMEOUT);
        guarded.write_all(b"first").await.expect("write");
        peer.write_all(b"answer").await.expect("answer");
        let mut buf = [0u8; 6];
        guarded.read_exact(&mut buf).await.expect("read the answer");
        read_finds_nothing(&mut guarded).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let elapsed = stall_after_request(&mut guarded).await;
        assert_about(elapsed, TIMEOUT, "pooled");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_arriving_within_the_timeout_keep_the_connection() {
        let (upstream, mut peer) = tokio::io::duplex(1024);
        let mut guarded = StallTimeout::on_reads_and_writes(upstream, TIMEOUT);
        let answer = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(TIMEOUT - Duration::from_millis(10)).await;
                peer.write_all(b"x").await.expect("write");
            }
            peer
        });
        let mut buf = [0u8; 5];
        guarded
            .read_exact(&mut buf)
            .await
            .expect("a slow but steady peer");
        drop(answer.await.expect("peer"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_not_polled_again_is_not_waiting() {
        // After a read moved bytes, a pause with no read polled (the client
        // downstream is slow) is not the upstream's stall: the next read
        // that finds nothing gets a whole timeout.
        let (upstream, mut peer) = tokio::io::duplex(1024);
        let mut guarded = StallTimeout::on_reads_and_writes(upstream, TIMEOUT);
        peer.write_all(b"x").await.expect("write");
        let mut buf = [0u8; 1];
        guarded.read_exact(&mut buf).await.expect("read");
        tokio::time::sleep(3 * TIMEOUT).await;
        let started = Instant::now();
        let err = guarded
            .read(&mut buf)
            .await
            .expect_err("the peer is silent");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_about(started.elapsed(), TIMEOUT, "after a pause");
    }
}
