//! One HTTP/1.1 connection to an upstream: the socket (under its stall
//! clock) and the bytes read ahead of what has been parsed.
//!
//! A connection has no task of its own. The request that holds it writes
//! and reads it directly, and the response body reads from it until the
//! body ends; then it goes back to the pool, idle, with nothing polling it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::io::slowio::StallTimeout;

/// Bytes read from an upstream at a time (grown when a read fills it).
const READ_SIZE: usize = 16 * 1024;

/// A keep-alive HTTP/1.1 connection to one upstream.
pub struct Connection {
    io: StallTimeout<TcpStream>,
    /// Read but not yet parsed.
    pub(super) buf: BytesMut,
    /// Whether it has carried a request before (a reused connection may
    /// have been closed by the upstream while idle).
    pub(super) reused: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.io.get_ref().peer_addr().ok())
            .field("buffered", &self.buf.len())
            .field("reused", &self.reused)
            .finish()
    }
}

impl Connection {
    /// Wraps a connected stream; reads and writes stall out after
    /// `stall_timeout` without progress.
    pub fn new(stream: TcpStream, stall_timeout: Duration) -> Connection {
        Connection {
            io: StallTimeout::on_reads_and_writes(stream, stall_timeout),
            buf: BytesMut::new(),
            reused: false,
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await
    }

    /// Reads more bytes into the buffer. `Ok(0)`: the upstream closed.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Reads more bytes into the buffer. `Ok(0)`: the upstream closed.
    pub async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Whether an idle connection is still fit for a request: the
    /// upstream has neither closed it nor sent anything unasked. Asks the
    /// kernel (one non-blocking peek) rather than the runtime's cached
    /// readiness, which may not have seen the latest event yet.
    pub fn is_clean(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(self.io.get_ref()).peek(&mut probe) {
            Err(err) => err.kind() == io::ErrorKind::WouldBlock,
            // Ok(0) is the upstream's close; Ok(n) is unsolicited data.
            Ok(_) => false,
        }
    }

    /// The socket and its read-ahead, for a protocol switch (WebSocket).
    pub fn into_parts(self) -> (StallTimeout<TcpStream>, BytesMut) {
        (self.io, self.buf)
    }
}
