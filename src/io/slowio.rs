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
//! The clock runs only while the writer is blocked: it starts at the first
//! write that returns `Pending` and stops at the next write that moves at
//! least one byte. An idle client connection (nothing to write) is never
//! timed out here; the header and idle timeouts cover that.
//!
//! Upstream connections also watch reads, the way nginx's
//! `proxy_read_timeout` does: the clock starts when a read finds nothing
//! and stops at the next byte moved in either direction. That bounds the
//! wait for a response head *and* an upstream that stalls mid-body (which a
//! per-request deadline on the head alone would not), at the cost of one
//! timer per connection instead of one per request: re-arming a registered
//! tokio timer to a later deadline is an atomic update, not a wheel insert.
//! An idle pooled connection is closed the same way after the timeout.

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
        // Whether `timer` is armed for the current blocked stretch.
        blocked: bool,
        // The waker `timer` was last polled with in this stretch: while the
        // task's waker stays the same, the timer already holds it, so the
        // repeated `Pending` polls of one stretch skip polling the timer.
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

    fn build(inner: T, timeout: Duration, watch_reads: bool) -> Self {
        StallTimeout {
            inner,
            timer: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            blocked: false,
            registered: None,
            watch_reads,
        }
    }
}

impl<T> StallTimeout<T> {
    /// Tracks one write-side poll: progress disarms the clock, `Pending`
    /// arms it (once per blocked stretch) and fails once it has expired.
    fn watch<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
        progressed: impl FnOnce(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        match polled {
            Poll::Ready(Ok(value)) => {
                if progressed(&value) {
                    *this.blocked = false;
                    *this.registered = None;
                }
                Poll::Ready(Ok(value))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                if !*this.blocked {
                    *this.blocked = true;
                    this.timer.as_mut().reset(Instant::now() + *this.timeout);
                } else if this.timer.is_elapsed() {
                    return Poll::Ready(Err(stalled(*this.timeout)));
                } else if this
                    .registered
                    .as_ref()
                    .is_some_and(|waker| waker.will_wake(cx.waker()))
                {
                    return Poll::Pending;
                }
                // Polling the timer registers the waker, so a peer that
                // never moves a byte again still gets this task woken to fail.
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(stalled(*this.timeout))),
                    Poll::Pending => {
                        *this.registered = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            }
        }
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
        self.watch(cx, polled, |_| moved)
    }
}

impl<T: AsyncWrite> AsyncWrite for StallTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write(cx, buf);
        self.watch(cx, polled, |written| *written > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.watch(cx, polled, |written| *written > 0)
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
        self.watch(cx, polled, |_| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_shutdown(cx);
        self.watch(cx, polled, |_| false)
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
}
