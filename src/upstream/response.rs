//! The body of an upstream response, read straight from the upstream
//! connection by whoever polls it (hyper, writing to the client).
//!
//! No task or channel stands between the upstream socket and the client:
//! each poll decodes what is buffered or reads more. When the body ends
//! cleanly the connection goes back to its pool at once, before the client
//! has even been written to; on any doubt (an error, bytes past the end, a
//! close-delimited body, `Connection: close`) it is dropped, which closes it.
//! A body that ends early is an error, so hyper shows the client a
//! truncation it can see (no final chunk, a short close, or an HTTP/2
//! `RST_STREAM`), never a clean end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::connection::Connection;
use super::h1::{decode_chunked, BodyFraming, ChunkState, ChunkStep};
use super::pool::Pool;
use crate::io::body::BoxError;

/// The upstream closed its connection before the body's declared end.
#[derive(Debug, thiserror::Error)]
#[error("upstream closed the connection before the end of the response body")]
pub struct Truncated;

/// What is left to read.
#[derive(Debug, Clone, Copy)]
enum Remaining {
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
    Done,
}

/// A response body streaming from an upstream connection.
#[derive(Debug)]
pub struct UpstreamBody {
    /// `None` once the body has ended (the connection released or closed).
    conn: Option<Connection>,
    remaining: Remaining,
    /// Where the connection goes when the body ends cleanly; `None` when it
    /// must not be reused.
    pool: Option<Arc<Pool>>,
    /// An error held back for one poll (see [`UpstreamBody::fail`]).
    failed: Option<BoxError>,
}

impl UpstreamBody {
    /// A body framed by `framing` on `conn`, whose head has been read.
    pub fn new(conn: Connection, framing: BodyFraming, pool: Option<Arc<Pool>>) -> UpstreamBody {
        let remaining = match framing {
            BodyFraming::Empty => Remaining::Done,
            BodyFraming::Length(length) => Remaining::Length(length),
            BodyFraming::Chunked => Remaining::Chunked(ChunkState::Size),
            BodyFraming::UntilClose => Remaining::UntilClose,
        };
        let pool = pool.filter(|_| framing != BodyFraming::UntilClose);
        let mut body = UpstreamBody {
            conn: Some(conn),
            remaining,
            pool,
            failed: None,
        };
        if matches!(body.remaining, Remaining::Done) {
            body.end();
        }
        body
    }

    /// The body has ended cleanly: a connection with nothing read past the
    /// end goes back to the pool.
    fn end(&mut self) {
        self.remaining = Remaining::Done;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take()) {
            if conn.buf.is_empty() {
                pool.release(conn);
            } else {
                tracing::debug!(upstream.addr = %pool.addr(),
                    "upstream sent bytes past the end of a response; closing");
            }
        }
    }

    /// Stops reading after an error; the connection is closed. The error
    /// is reported on the next poll, not this one: hyper aborts a client
    /// connection the moment its body fails and discards what it has not
    /// flushed yet, so the bytes that did arrive (often read together with
    /// the close) are first given the chance to reach the client, which
    /// then sees the truncation rather than nothing.
    fn fail(
        &mut self,
        err: impl Into<BoxError>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.pool = None;
        self.failed = Some(err.into());
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn data(bytes: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(err) = this.failed.take() {
            this.remaining = Remaining::Done;
            return Poll::Ready(Some(Err(err)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.remaining {
                Remaining::Done => return Poll::Ready(None),
                Remaining::Length(left) if !conn.buf.is_empty() => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.buf.len());
                    let bytes = conn.buf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        this.end();
                    }
                    return Self::data(bytes);
                }
                Remaining::Chunked(state) => match decode_chunked(state, &mut conn.buf) {
                    Err(err) => return this.fail(err, cx),
                    Ok(ChunkStep::Data(bytes)) => return Self::data(bytes),
                    Ok(ChunkStep::Trailers(trailers)) => {
                        this.end();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(ChunkStep::End) => {
                        this.end();
                        return Poll::Ready(None);
                    }
                    Ok(ChunkStep::NeedMore) => {}
                },
                Remaining::UntilClose if !conn.buf.is_empty() => {
                    return Self::data(conn.buf.split().freeze());
                }
                Remaining::Length(_) | Remaining::UntilClose => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Err(err) => return this.fail(err, cx),
                Ok(0) if matches!(this.remaining, Remaining::UntilClose) => {
                    this.remaining = Remaining::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Truncated, cx),
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.remaining, Remaining::Done) && self.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Remaining::Done => SizeHint::with_exact(0),
            Remaining::Length(left) => SizeHint::with_exact(left),
            Remaining::Chunked(_) | Remaining::UntilClose => SizeHint::default(),
        }
    }
}
