//! Body types shared by the proxy: the boxed body every response uses, the
//! request-body wrapper that enforces size and time limits while streaming,
//! and the response-body wrapper that keeps an upstream's in-flight count
//! and writes the access log line when the body really ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::errors;

/// Errors that cross body and client boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type of every response and every upstream request: boxing
/// lets files, redirects and streamed upstream bodies share a signature.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Why a request body was cut off. The proxy finds these in the client
/// error's source chain to answer 413 or 408 instead of a generic 502.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyLimitError {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("request body stalled for longer than {0:?}")]
    Stalled(Duration),
    /// The client's body itself failed: hyper's decoder refused its framing
    /// (an invalid chunk size, a bad chunk extension) or the client went
    /// away mid-body. It is the client's fault, so 400, never a 502.
    #[error("request body unreadable: {0}")]
    Unreadable(String),
    #[error("request body slower than {0} bytes/s")]
    TooSlow(u64),
}

/// The slowest request body accepted: after `grace`, the body must have
/// averaged `bytes_per_sec`. Put differently, a body of `n` bytes may take
/// `grace + n / bytes_per_sec` (Apache mod_reqtimeout's MinRate), which
/// stops a client that trickles one byte just before each stall timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    pub bytes_per_sec: u64,
    pub grace: Duration,
}

impl MinRate {
    /// When a body that started at `start` and has delivered `seen` bytes
    /// is too slow; `None` when the check is off.
    fn deadline(&self, start: Instant, seen: u64) -> Option<Instant> {
        if self.bytes_per_sec == 0 {
            return None;
        }
        let earned_ms = u128::from(seen) * 1000 / u128::from(self.bytes_per_sec);
        let earned = Duration::from_millis(u64::try_from(earned_ms).unwrap_or(u64::MAX));
        start.checked_add(self.grace)?.checked_add(earned)
    }
}

pin_project! {
    /// Streams a client's request body to the upstream while enforcing the
    /// size limit (for chunked bodies, whose size is unknown up front), the
    /// longest allowed gap between two chunks, and the minimum average rate
    /// (slow-body clients). One timer serves both time limits: it is set to
    /// whichever deadline comes first.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        #[pin]
        timer: Sleep,
        stall_timeout: Duration,
        stall_deadline: Instant,
        min_rate: Option<MinRate>,
        started: Instant,
        max_bytes: u64,
        seen: u64,
    }
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, max_bytes: u64, stall_timeout: Duration) -> Self {
        let now = Instant::now();
        let stall_deadline = now + stall_timeout;
        LimitedBody {
            inner,
            timer: tokio::time::sleep_until(stall_deadline),
            stall_timeout,
            stall_deadline,
            min_rate: None,
            started: now,
            max_bytes,
            seen: 0,
        }
    }

    /// Also fails the body with [`BodyLimitError::TooSlow`] when it falls
    /// below `min_rate` (a zero rate turns the check off).
    pub fn with_min_rate(mut self, min_rate: MinRate) -> Self {
        if min_rate.bytes_per_sec > 0 {
            self.min_rate = Some(min_rate);
            let deadline = self.next_deadline();
            self.timer = tokio::time::sleep_until(deadline);
        }
        self
    }

    fn rate_deadline(&self) -> Option<Instant> {
        self.min_rate
            .and_then(|rate| rate.deadline(self.started, self.seen))
    }

    fn next_deadline(&self) -> Instant {
        match self.rate_deadline() {
            Some(rate) => rate.min(self.stall_deadline),
            None => self.stall_deadline,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.as_mut().project().inner.poll_frame(cx);
        match polled {
            Poll::Pending => {
                if self.as_mut().project().timer.poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(self.expired()))));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let this = self.as_mut().project();
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.max_bytes {
                        return Poll::Ready(Some(Err(Box::new(BodyLimitError::TooLarge(
                            *this.max_bytes,
                        )))));
                    }
                }
                let this = self.as_mut().project();
                *this.stall_deadline = Instant::now() + *this.stall_timeout;
                let deadline = self.next_deadline();
                self.as_mut().project().timer.reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                let err: BoxError = err.into();
                let unreadable = BodyLimitError::Unreadable(errors::chain(&*err));
                Poll::Ready(Some(Err(Box::new(unreadable))))
            }
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> LimitedBody<B> {
    /// Which limit the fired timer stands for.
    fn expired(&self) -> BodyLimitError {
        match (self.min_rate, self.rate_deadline()) {
            (Some(rate), Some(deadline)) if deadline <= self.stall_deadline => {
                BodyLimitError::TooSlow(rate.bytes_per_sec)
            }
            _ => BodyLimitError::Stalled(self.stall_timeout),
        }
    }
}

/// Something to run once when a response body is finished or dropped:
/// releasing an in-flight count, writing the access log.
pub trait OnBodyEnd: Send + 'static {
    fn on_end(&mut self, bytes_sent: u64, completed: bool);
}

pin_project! {
    /// Wraps a response body, counts its bytes, and calls its [`OnBodyEnd`]
    /// exactly once: at the end of the stream, on error, or when hyper drops
    /// the body because the client went away. In-flight accounting therefore
    /// covers the whole body, not just the headers.
    pub struct TrackedBody<B: Body, E: OnBodyEnd> {
        #[pin]
        inner: B,
        end: Option<E>,
        sent: u64,
    }

    impl<B: Body, E: OnBodyEnd> PinnedDrop for TrackedBody<B, E> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut end) = this.end.take() {
                // hyper drops a body whose last frame it has written without
                // polling it to `None`; that still counts as complete.
                let completed = this.inner.is_end_stream();
                end.on_end(*this.sent, completed);
            }
        }
    }
}

impl<B: Body, E: OnBodyEnd> TrackedBody<B, E> {
    pub fn new(inner: B, end: E) -> Self {
        TrackedBody {
            inner,
            end: Some(end),
            sent: 0,
        }
    }
}

impl<B, E> Body for TrackedBody<B, E>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    E: OnBodyEnd,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.sent += data.len() as u64;
                }
            }
            Some(Err(_)) => {
                if let Some(mut end) = this.end.take() {
                    end.on_end(*this.sent, false);
                }
            }
            None => {
                if let Some(mut end) = this.end.take() {
                    end.on_end(*this.sent, true);
                }
            }
        }
        Poll::Ready(polled.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Record(Arc<Mutex<Vec<(u64, bool)>>>);

    impl OnBodyEnd for Record {
        fn on_end(&mut self, bytes_sent: u64, completed: bool) {
            self.0.lock().expect("lock").push((bytes_sent, completed));
        }
    }

    #[tokio::test]
    async fn tracked_body_reports_once_at_end() {
        let record = Record::default();
        let body = TrackedBody::new(Full::new(Bytes::from_static(b"hello")), record.clone());
        let collected = body.collect().await.expect("body").to_bytes();
        assert_eq!(collected, "hello");
        assert_eq!(*record.0.lock().expect("lock"), vec![(5, true)]);
    }

    #[tokio::test]
    async fn tracked_body_reports_when_dropped_early() {
        let record = Record::default();
        let mut body = TrackedBody::new(
            http_body_util::StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, std::convert::Infallible>,
            >()),
            record.clone(),
        );
        let poll = futures_util::poll!(std::pin::pin!(&mut body).frame());
        assert!(poll.is_pending());
        drop(body);
        assert_eq!(*record.0.lock().expect("lock"), vec![(0, false)]);
    }

    #[tokio::test]
    async fn limited_body_rejects_oversize() {
        let body = LimitedBody::new(
            Full::new(Bytes::from_static(b"0123456789")),
            4,
            Duration::from_secs(5),
        );
        let err = body.collect().await.expect_err("too large");
        assert_eq!(
            err.downcast_ref::<BodyLimitError>(),
            Some(&BodyLimitError::TooLarge(4))
        );
    }

    /// A body that yields one byte every `gap`, `count` times.
    fn trickle(
        gap: Duration,
        count: usize,
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let stream = futures_util::stream::unfold(0usize, move |sent| async move {
            if sent == count {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((Ok(Frame::data(Bytes::from_static(b"x"))), sent + 1))
        });
        http_body_util::StreamBody::new(stream)
    }

    #[tokio::test]
    async fn min_rate_stops_a_trickle_that_never_stalls() {
        // One byte every 20 ms never trips the 5 s gap limit, but averages
        // 50 B/s, far under 1000 B/s once the 100 ms grace is over.
        let body = LimitedBody::new(trickle(Duration::from_millis(20), 10_000), 1 << 20, {
            Duration::from_secs(5)
        })
        .with_min_rate(MinRate {
            bytes_per_sec: 1000,
            grace: Duration::from_millis(100),
        });
        let err = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .expect("the rate limit must end the body")
            .expect_err("too slow");
        assert_eq!(
            err.downcast_ref::<BodyLimitError>(),
            Some(&BodyLimitError::TooSlow(1000))
        );
    }

    #[tokio::test]
    async fn min_rate_lets_a_fast_enough_body_finish() {
        // 20 bytes, one every 5 ms: about 200 B/s against a 10 B/s minimum.
        let body = LimitedBody::new(trickle(Duration::from_millis(5), 20), 1 << 20, {
            Duration::from_secs(5)
        })
        .with_min_rate(MinRate {
            bytes_per_sec: 10,
            grace: Duration::from_millis(200),
        });
        let collected = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .expect("bounded")
            .expect("fast enough")
            .to_bytes();
        assert_eq!(collected.len(), 20);
    }

    #[tokio::test]
    async fn stall_is_reported_as_a_stall_when_it_comes_first() {
        let body = LimitedBody::new(
            http_body_util::StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, std::convert::Infallible>,
            >()),
            1 << 20,
            Duration::from_millis(50),
        )
        .with_min_rate(MinRate {
            bytes_per_sec: 10,
            grace: Duration::from_secs(30),
        });
        let err = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .expect("bounded")
            .expect_err("stalled");
        assert_eq!(
            err.downcast_ref::<BodyLimitError>(),
            Some(&BodyLimitError::Stalled(Duration::from_millis(50)))
        );
    }

    #[test]
    fn min_rate_deadline_grows_with_bytes_seen() {
        let rate = MinRate {
            bytes_per_sec: 1000,
            grace: Duration::from_secs(2),
        };
        let start = Instant::now();
        assert_eq!(
            rate.deadline(start, 0),
            Some(start + Duration::from_secs(2))
        );
        assert_eq!(
            rate.deadline(start, 500),
            Some(start + Duration::from_millis(2500))
        );
        let off = MinRate {
            bytes_per_sec: 0,
            ..rate
        };
        assert_eq!(off.deadline(start, 10), None);
    }
}
