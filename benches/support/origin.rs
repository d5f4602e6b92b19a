//! The origin server every proxy in the newer benches forwards to: the bench
//! binary re-executed with `BENCH_ROLE=origin`, a single-threaded hyper 1
//! HTTP/1.1 server in its own process (so it never shares a runtime with the
//! load generator). It exits when its stdin closes, i.e. with the bench.
//!
//! Routes, chosen so one origin serves every scenario:
//! - `GET /bytes/N`: N bytes, streamed in 64 KiB chunks (large downloads
//!   without the origin ever holding the whole body);
//! - any request with a body (`POST`): the body is read and counted chunk by
//!   chunk, the answer is `received N`;
//! - anything else: a fixed 100-byte body.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::{run_under, ChildGuard};

/// The environment variable that turns the bench binary into the origin.
pub const ROLE: &str = "origin";

/// The fixed response body: exactly 100 bytes.
pub const SMALL_BODY: &[u8; 100] =
    b"cutover bench upstream: a fixed body of exactly one hundred bytes, padded with dots................\n";

/// Chunk size of streamed downloads.
const CHUNK: usize = 64 * 1024;
static FILLER: [u8; CHUNK] = [b'x'; CHUNK];

/// Serves as the origin if this process was started as one; the bench's
/// `main` calls this first and returns when it answers true.
pub fn serve_if_origin() -> bool {
    if std::env::var("BENCH_ROLE").as_deref() != Ok(ROLE) {
        return false;
    }
    serve();
    true
}

/// The running origin child; killed when dropped.
pub struct Origin {
    pub addr: SocketAddr,
    child: ChildGuard,
}

impl Origin {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Starts the origin and reads the address it bound from its stdout.
    pub fn spawn() -> Origin {
        Origin::spawn_under(&[])
    }

    /// Starts the origin under `wrapper` (a command and its arguments that
    /// run the origin binary, such as valgrind), or directly when empty.
    pub fn spawn_under(wrapper: &[std::ffi::OsString]) -> Origin {
        let exe = std::env::current_exe().expect("locate the bench executable");
        let mut child = run_under(Command::new(exe), wrapper)
            .env("BENCH_ROLE", ROLE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the origin process");
        let stdout = child.stdout.take().expect("origin stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the origin's address");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("origin printed {line:?}, not its address"));
        Origin {
            addr,
            child: ChildGuard::new("origin", child),
        }
    }
}

/// The child's entry point: serve until stdin closes, on one thread.
fn serve() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the origin runtime");
    runtime.block_on(accept_loop());
}

async fn accept_loop() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("origin: bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("origin: local address");
    println!("listening {addr}");
    std::io::stdout().flush().expect("origin: flush stdout");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

type Answer = Response<Either<Full<Bytes>, Filler>>;

async fn answer(request: Request<Incoming>) -> Result<Answer, hyper::Error> {
    if let Some(size) = request
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let mut response = Response::new(Either::Right(Filler { remaining: size }));
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(size));
        return Ok(response);
    }
    let has_body = request.headers().contains_key(CONTENT_LENGTH)
        || request
            .headers()
            .contains_key(hyper::header::TRANSFER_ENCODING);
    let body = if has_body {
        let received = count_body(request.into_body()).await?;
        Bytes::from(format!("received {received}\n"))
    } else {
        Bytes::from_static(SMALL_BODY)
    };
    let mut response = Response::new(Either::Left(Full::new(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

/// Reads a request body frame by frame, keeping only the count.
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            received += data.len() as u64;
        }
    }
    Ok(received)
}

/// A body of `remaining` bytes produced one 64 KiB chunk at a time: the
/// origin's downloads and the benches' uploads.
pub struct Filler {
    remaining: u64,
}

impl Filler {
    pub fn new(size: u64) -> Filler {
        Filler { remaining: size }
    }
}

impl Body for Filler {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&FILLER[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}
