//! A write-stall timeout for client connections: an IO wrapper that fails
//! a write which has made no progress for `send_timeout`.
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
//! least one byte. An idle connection (nothing to write) is never timed
//! out here; the header and idle timeouts cover that.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pin_project! {
    /// Wraps a client stream; reads pass through untouched, writes (and
    /// flushes) that stay blocked for longer than the timeout fail with
    /// [`io::ErrorKind::TimedOut`], which ends the connection.
    pub struct SendTimeout<T> {
        #[pin]
        inner: T,
        // Boxed so the wrapper stays `Unpin` when `T` is (TLS needs that).
        timer: Pin<Box<Sleep>>,
        timeout: Duration,
        // Whether `timer` is armed for the current blocked write.
        blocked: bool,
    }
}

impl<T> SendTimeout<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        SendTimeout {
            inner,
            timer: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            blocked: false,
        }
    }
}

impl<T> SendTimeout<T> {
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
                }
                Poll::Ready(Ok(value))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                if !*this.blocked {
                    *this.blocked = true;
                    this.timer.as_mut().reset(Instant::now() + *this.timeout);
                }
                // Polling the timer registers the waker, so a client that
                // never reads again still gets this task woken to fail.
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("client read nothing for {:?} (send_timeout)", this.timeout),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendTimeout<T> {
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.watch(cx, polled, |_| true)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_shutdown(cx);
        self.watch(cx, polled, |_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_reader_that_never_reads_fails_the_write() {
        let (server, _client) = tokio::io::duplex(64);
        let mut guarded = SendTimeout::new(server, Duration::from_millis(100));
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
        let mut guarded = SendTimeout::new(server, Duration::from_millis(500));
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

    #[tokio::test]
    async fn an_idle_connection_is_not_timed_out() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut guarded = SendTimeout::new(server, Duration::from_millis(20));
        // Nothing is written for far longer than the timeout...
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...and the next write still goes through.
        guarded.write_all(b"hello").await.expect("not blocked");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
    }
}
