//! Body types shared by the proxy: the boxed body every response uses, the
//! request-body wrappers that enforce size and time limits while streaming
//! and hold an HTTP/2 body's last byte until its length is confirmed, and
//! the response-body wrapper that keeps an upstream's in-flight count and
//! writes the access log line when the body really ends.

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

pin_project! {
    /// An HTTP/2 request body that declares its length (`content-length`)
    /// and is forwarded to an HTTP/1.1 upstream with that length.
    ///
    /// HTTP/2 frames the body by END_STREAM, not by the length: a stream
    /// can carry more DATA than it declared, or end short, and is then
    /// malformed (RFC 9113 §8.1.1), which may become known only after the
    /// declared bytes have arrived. The upstream's HTTP/1.1 framing ends
    /// the request at the declared length, so relaying those bytes as they
    /// come would hand the app a complete request that an intermediary must
    /// not forward. This wrapper therefore holds back the last byte until
    /// the stream's end confirms the length, and fails the body when it
    /// does not: the upstream request is then aborted one byte short, so
    /// the app sees an incomplete message and the connection is not reused.
    ///
    /// A final DATA frame that carries END_STREAM (what clients send)
    /// confirms the length at once, so nothing is held back then.
    pub struct ExactLength<B> {
        #[pin]
        inner: B,
        // Declared bytes not yet received.
        remaining: u64,
        // The last declared byte, held until the stream's end confirms it.
        held: Option<Bytes>,
        // Trailers that confirmed the end, after `held` is released.
        trailers: Option<Frame<Bytes>>,
    }
}

impl<B> ExactLength<B> {
    pub fn new(inner: B, declared: u64) -> Self {
        ExactLength {
            inner,
            remaining: declared,
            held: None,
            trailers: None,
        }
    }
}

/// Why a declared-length body was refused.
fn wrong_length(what: &str) -> BoxError {
    Box::new(BodyLimitError::Unreadable(format!(
        "request body {what} its content-length"
    )))
}

impl<B> Body for ExactLength<B>
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
        loop {
            let this = self.as_mut().project();
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(trailers)));
            }
            let frame = match ready!(this.inner.poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
                // The end: the length is confirmed if nothing is missing.
                None if *this.remaining > 0 => {
                    return Poll::Ready(Some(Err(wrong_length("ends short of"))))
                }
                None => return Poll::Ready(this.held.take().map(|held| Ok(Frame::data(held)))),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) if *this.remaining > 0 => {
                    drop(trailers);
                    return Poll::Ready(Some(Err(wrong_length("ends short of"))));
                }
                Err(trailers) => match this.held.take() {
                    Some(held) => {
                        *this.trailers = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(held))));
                    }
                    None => return Poll::Ready(Some(Ok(trailers))),
                },
            };
            if data.is_empty() {
                continue;
            }
            let length = data.len() as u64;
            if length > *this.remaining {
                return Poll::Ready(Some(Err(wrong_length("goes on past"))));
            }
            *this.remaining -= length;
            if *this.remaining > 0 || self.inner.is_end_stream() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            // The declared length is complete but the stream has not ended:
            // pass all but the last byte, and keep that for the end.
            let mut data = data;
            let last = data.split_off(data.len() - 1);
            *self.as_mut().project().held = Some(last);
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.trailers.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.as_ref().map_or(0, |held| held.len() as u64);
        SizeHint::with_exact(self.remaining + held)
    }
}

/// Waits for the end of a body that declared no content (`content-length:
/// 0`) but whose HTTP/2 stream is still open. The upstream request would be
/// complete with its head, so the head waits for this: DATA makes the
/// request malformed and fails it here, before anything is forwarded.
pub async fn expect_no_data<B>(body: &mut B) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        match body.frame().await {
            None => return Ok(()),
            Some(Err(err)) => return Err(err.into()),
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) if data.is_empty() => continue,
                Some(_) => return Err(wrong_length("goes on past")),
                // Trailers end the stream; a length-framed HTTP/1.1
                // request cannot carry them.
                None => return Ok(()),
            },
        }
    }
}

/// Something to run once when a response body is finished or dropped:
/// releasing an in-flight count, writing the access log.
pub trait OnBodyEnd: Send + 'static {
    fn on_end(&mut self, bytes_sent: u64, completed: bool);

    /// Called just before `on_end` when the body itself failed (rather
    /// than the client going away): an upstream's response cut off.
    fn on_error(&mut self) {}
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
                    end.on_error();
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

    /// The min-rate limit fires at its exact deadline, on tokio's paused
    /// clock: one byte every 20 ms against 1000 B/s with a 100 ms grace.
    /// After 5 bytes (t = 100 ms) the deadline is 100 + 5 = 105 ms, before
    /// the sixth byte at 120 ms.
    #[tokio::test(start_paused = true)]
    async fn min_rate_fires_at_its_deadline() {
        let body = LimitedBody::new(trickle(Duration::from_millis(20), 10_000), 1 << 20, {
            Duration::from_secs(5)
        })
        .with_min_rate(MinRate {
            bytes_per_sec: 1000,
            grace: Duration::from_millis(100),
        });
        let started = Instant::now();
        let err = body.collect().await.expect_err("too slow");
        assert_eq!(started.elapsed(), Duration::from_millis(105));
        assert_eq!(
            err.downcast_ref::<BodyLimitError>(),
            Some(&BodyLimitError::TooSlow(1000))
        );
    }

    /// A body exactly at the minimum rate is never cut: 10 bytes, one
    /// every 100 ms, against 10 B/s after a 100 ms grace, each byte lands
    /// at its deadline minus the grace.
    #[tokio::test(start_paused = true)]
    async fn min_rate_spares_a_body_at_the_rate() {
        let body = LimitedBody::new(trickle(Duration::from_millis(100), 10), 1 << 20, {
            Duration::from_secs(5)
        })
        .with_min_rate(MinRate {
            bytes_per_sec: 10,
            grace: Duration::from_millis(100),
        });
        let started = Instant::now();
        let collected = body.collect().await.expect("at the rate").to_bytes();
        assert_eq!(collected.len(), 10);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    /// The gap limit restarts with every chunk: a body that pauses 40 ms
    /// between chunks under a 50 ms stall timeout is fine; its end counts
    /// from the last chunk.
    #[tokio::test(start_paused = true)]
    async fn stall_timer_restarts_with_every_chunk() {
        let then_stall = futures_util::stream::unfold(0usize, |sent| async move {
            if sent == 3 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
            let frame = Frame::data(Bytes::from_static(b"x"));
            Some((Ok::<_, std::convert::Infallible>(frame), sent + 1))
        });
        let body = LimitedBody::new(
            http_body_util::StreamBody::new(then_stall),
            1 << 20,
            Duration::from_millis(50),
        );
        let started = Instant::now();
        let err = body.collect().await.expect_err("stalled after 3 bytes");
        assert_eq!(started.elapsed(), Duration::from_millis(120 + 50));
        assert_eq!(
            err.downcast_ref::<BodyLimitError>(),
            Some(&BodyLimitError::Stalled(Duration::from_millis(50)))
        );
    }

    /// One step of a scripted HTTP/2 request body.
    #[derive(Clone, Copy)]
    enum Step {
        Data(&'static str),
        /// Nothing yet (the client has not sent the next frame).
        Wait,
        /// The stream failed (the h2 crate reset it).
        Fail,
    }

    /// A request body that plays `steps` and then ends; like the h2 crate's,
    /// it reports its end as soon as only the end is left.
    struct Scripted(std::collections::VecDeque<Step>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.0.pop_front() {
                None => Poll::Ready(None),
                Some(Step::Data(text)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(text))))),
                Some(Step::Fail) => Poll::Ready(Some(Err("stream reset".into()))),
                Some(Step::Wait) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// What the upstream would be handed, poll by poll: the data frames, and
    /// `Err` when the body failed.
    async fn relayed(declared: u64, steps: &[Step]) -> Vec<Result<String, ()>> {
        let mut body = ExactLength::new(Scripted(steps.iter().copied().collect()), declared);
        let mut out = Vec::new();
        while let Some(frame) = std::pin::pin!(&mut body).frame().await {
            match frame {
                Ok(frame) => {
                    let data = frame.into_data().expect("data");
                    out.push(Ok(String::from_utf8_lossy(&data).into_owned()));
                }
                Err(err) => {
                    let limit = err.downcast_ref::<BodyLimitError>();
                    assert!(
                        matches!(limit, Some(BodyLimitError::Unreadable(_))) || limit.is_none(),
                        "{err}"
                    );
                    out.push(Err(()));
                    break;
                }
            }
        }
        out
    }

    fn ok(text: &str) -> Result<String, ()> {
        Ok(text.to_string())
    }

    #[tokio::test]
    async fn exact_length_relays_a_body_ended_with_its_last_frame_as_is() {
        use Step::*;
        assert_eq!(
            relayed(5, &[Data("hel"), Wait, Data("lo")]).await,
            [ok("hel"), ok("lo")]
        );
    }

    #[tokio::test]
    async fn exact_length_holds_the_last_byte_until_the_stream_ends() {
        use Step::*;
        assert_eq!(
            relayed(5, &[Data("hello"), Wait]).await,
            [ok("hell"), ok("o")]
        );
        assert_eq!(relayed(1, &[Data("x"), Wait, Wait]).await, [ok("x")]);
        assert_eq!(
            relayed(2, &[Data("a"), Wait, Data("b"), Wait, Data("")]).await,
            [ok("a"), ok("b")]
        );
    }

    #[tokio::test]
    async fn exact_length_never_releases_the_last_byte_of_a_malformed_body() {
        use Step::*;
        // More DATA after the declared length, in a later frame.
        assert_eq!(
            relayed(5, &[Data("hello"), Wait, Data("!")]).await,
            [ok("hell"), Err(())]
        );
        // The stream reset after the declared length (how the h2 crate
        // reports the excess).
        assert_eq!(
            relayed(5, &[Data("hello"), Wait, Fail]).await,
            [ok("hell"), Err(())]
        );
        // More in the same frame.
        assert_eq!(relayed(3, &[Data("hello")]).await, [Err(())]);
        // Short of the declared length.
        assert_eq!(relayed(5, &[Data("hel"), Wait]).await, [ok("hel"), Err(())]);
        assert_eq!(relayed(1, &[Data("x"), Wait, Fail]).await, [Err(())]);
    }

    #[tokio::test]
    async fn expect_no_data_refuses_data_on_a_zero_length_body() {
        use Step::*;
        let mut empty = Scripted([Wait, Data("")].into_iter().collect());
        expect_no_data(&mut empty).await.expect("no data");
        let mut data = Scripted([Wait, Data("x")].into_iter().collect());
        let err = expect_no_data(&mut data).await.expect_err("data");
        assert!(matches!(
            err.downcast_ref::<BodyLimitError>(),
            Some(BodyLimitError::Unreadable(_))
        ));
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
