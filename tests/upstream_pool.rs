//! The upstream connection pool and upstream misbehaviour: keep-alive
//! reuse, stale pooled connections (retried only when safe), unsolicited
//! responses on idle connections, and upstreams that die mid-body.
//!
//! The upstream here is a raw TCP server whose behaviour per connection is
//! scripted, so each misbehaviour happens exactly, not by timing luck.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream does on each connection.
#[derive(Clone, Copy)]
enum Script {
    /// Answers every request with `200 ok`, keep-alive.
    KeepAlive,
    /// Answers the first request, then reads the next request head and
    /// closes without answering: an idle connection the upstream closed just
    /// as the proxy reused it.
    CloseOnSecondRequest,
    /// Answers the first request and immediately writes a second,
    /// unsolicited response on the same connection.
    ExtraResponse,
    /// Sends a head promising 100,000 bytes, 1,000 of them, then closes.
    DieMidBodyLength,
    /// Sends a chunked head and one chunk, then closes without the last chunk.
    DieMidBodyChunked,
    /// Sends a head promising 100,000 bytes, 1,000 of them, then goes
    /// silent with the connection open.
    StallMidBody,
    /// Reads a request and never answers it (the connection stays open).
    HangOnFirstRequest,
    /// Answers the first request, then reads the next and never answers it.
    HangOnSecondRequest,
}

struct ScriptedUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Every request head received, in order, with its connection number.
    heads: Arc<Mutex<Vec<(usize, String)>>>,
}

impl ScriptedUpstream {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<(usize, String)> {
        self.heads.lock().expect("lock").clone()
    }
}

async fn start_scripted(script: Script) -> ScriptedUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (counter, recorded) = (Arc::clone(&connections), Arc::clone(&heads));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let _ = serve_scripted(stream, script, number, recorded).await;
            });
        }
    });
    ScriptedUpstream {
        addr,
        connections,
        heads,
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

async fn serve_scripted(
    mut stream: TcpStream,
    script: Script,
    number: usize,
    recorded: Arc<Mutex<Vec<(usize, String)>>>,
) -> std::io::Result<()> {
    let mut served = 0;
    // Bounded: no connection in these tests carries more than 50 requests.
    while served < 50 {
        let Some(head) = read_request(&mut stream).await else {
            return Ok(());
        };
        recorded.lock().expect("lock").push((number, head));
        served += 1;
        match (script, served) {
            (Script::KeepAlive, _)
            | (Script::CloseOnSecondRequest, 1)
            | (Script::HangOnSecondRequest, 1) => stream.write_all(OK).await?,
            (Script::HangOnFirstRequest, _) | (Script::HangOnSecondRequest, _) => {
                // Silent, but bounded so the task cannot outlive the run.
                tokio::time::sleep(Duration::from_secs(30)).await;
                return Ok(());
            }
            (Script::CloseOnSecondRequest, _) => return Ok(()),
            (Script::ExtraResponse, _) => {
                stream.write_all(OK).await?;
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
                    .await?;
            }
            (Script::DieMidBodyLength, _) => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    .await?;
                stream.write_all(&[b'x'; 1000]).await?;
                return Ok(());
            }
            (Script::StallMidBody, _) => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    .await?;
                stream.write_all(&[b'x'; 1000]).await?;
                // Silent, but bounded so the task cannot outlive the run.
                tokio::time::sleep(Duration::from_secs(30)).await;
                return Ok(());
            }
            (Script::DieMidBodyChunked, _) => {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Reads one request head and, when it declares a Content-Length, its body.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await {
            Ok(Ok(1)) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(head)
}

/// Longer than the pool's `STALE_AFTER`: a connection idle this long may
/// have been closed by the upstream, so idempotent requests on it are kept
/// for one replay.
const STALE: Duration = Duration::from_millis(1200);

fn config(upstream: SocketAddr) -> String {
    format!(
        r#"
[server]
# One worker: these tests count upstream connections, and each
# worker keeps its own idle stack.
workers = 1

[[site]]
hosts = ["*"]
service = "app"

[service.app]
upstream = "{upstream}"
"#
    )
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = start_scripted(Script::KeepAlive).await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    for _ in 0..20 {
        let resp = http_get(proxy.http_addr, "app.localhost", "/").await;
        assert_eq!((resp.status.as_u16(), resp.text().as_str()), (200, "ok"));
    }
    assert_eq!(upstream.heads().len(), 20);
    assert_eq!(
        upstream.connections(),
        1,
        "keep-alive connection not reused"
    );
}

/// How long after it was sent a GET got its 504 for an upstream that read
/// it and never answered.
async fn time_to_gateway_timeout(proxy: SocketAddr, path: &str) -> Duration {
    let started = tokio::time::Instant::now();
    let resp = http_get(proxy, "app.localhost", path).await;
    assert_eq!(resp.status, 504, "{path}: {}", resp.text());
    started.elapsed()
}

/// A proxy with a 1 s `upstream_timeout` in front of `upstream`.
async fn proxy_with_upstream_timeout(upstream: SocketAddr) -> TestProxy {
    let config = config(upstream).replace(
        "workers = 1\n",
        "workers = 1\n[server.limits]\nupstream_timeout = \"1s\"",
    );
    start_proxy(&config).await
}

#[tokio::test]
async fn upstream_timeout_counts_from_the_request_on_fresh_and_pooled_connections() {
    // A 1 s timeout used to become up to 2 s: the request write stopped the
    // connection's stall clock, and it restarted only when its old timer
    // fired. The bounds leave 0.7 s for a loaded machine either way; the
    // exact bound is proven in `slowio`'s paused-clock tests.
    const TIMEOUT: Duration = Duration::from_secs(1);
    let hangs = start_scripted(Script::HangOnFirstRequest).await;
    let proxy = proxy_with_upstream_timeout(hangs.addr).await;
    let fresh = time_to_gateway_timeout(proxy.http_addr, "/fresh").await;

    let second_hangs = start_scripted(Script::HangOnSecondRequest).await;
    let proxy = proxy_with_upstream_timeout(second_hangs.addr).await;
    let first = http_get(proxy.http_addr, "app.localhost", "/answered").await;
    assert_eq!(first.status, 200);
    // Straight away, so the pooled connection's read has just started to
    // wait: the old clock then ran for nearly two timeouts.
    let pooled = time_to_gateway_timeout(proxy.http_addr, "/pooled").await;
    assert_eq!(
        second_hangs.connections(),
        1,
        "the connection was not reused"
    );

    for (case, elapsed) in [("fresh", fresh), ("pooled", pooled)] {
        assert!(
            elapsed >= TIMEOUT && elapsed < TIMEOUT + Duration::from_millis(700),
            "{case} connection: 504 after {elapsed:?}, upstream_timeout is {TIMEOUT:?}"
        );
    }
}

/// A proxy whose pool holds one connection to an upstream that will close
/// it on the next request, idle long enough (the pool's `STALE_AFTER`) to
/// count as possibly stale.
async fn proxy_with_a_stale_pooled_connection() -> (ScriptedUpstream, TestProxy) {
    let upstream = start_scripted(Script::CloseOnSecondRequest).await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let first = http_get(proxy.http_addr, "app.localhost", "/one").await;
    assert_eq!(first.status, 200);
    tokio::time::sleep(STALE).await;
    (upstream, proxy)
}

#[tokio::test]
async fn stale_pooled_connection_is_retried_for_idempotent_request() {
    let (upstream, proxy) = proxy_with_a_stale_pooled_connection().await;
    // The pooled connection takes this GET and dies without answering; the
    // proxy sends it again on a fresh connection.
    let second = http_get(proxy.http_addr, "app.localhost", "/two").await;
    assert_eq!(
        (second.status.as_u16(), second.text().as_str()),
        (200, "ok")
    );
    let heads = upstream.heads();
    let paths: Vec<(usize, bool)> = heads
        .iter()
        .map(|(conn, head)| (*conn, head.starts_with("GET /two ")))
        .collect();
    assert_eq!(
        paths,
        vec![(1, false), (1, true), (2, true)],
        "expected /two on the stale connection, then again on a new one"
    );
}

#[tokio::test]
async fn stale_pooled_connection_is_not_retried_for_post() {
    let (upstream, proxy) = proxy_with_a_stale_pooled_connection().await;

    let post = http_request(
        proxy.http_addr,
        request("POST", "/pay", "app.localhost", b"amount=5".to_vec()),
    )
    .await;
    assert_eq!(
        post.status, 502,
        "a POST that may have had effects is not replayed"
    );
    let posts = upstream
        .heads()
        .iter()
        .filter(|(_, head)| head.starts_with("POST /pay "))
        .count();
    assert_eq!(posts, 1, "the POST reached the upstream more than once");
}

#[tokio::test]
async fn unsolicited_response_is_never_served_to_a_later_request() {
    let upstream = start_scripted(Script::ExtraResponse).await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    for round in 0..10 {
        let resp = http_get(proxy.http_addr, "app.localhost", "/").await;
        assert_eq!(
            (resp.status.as_u16(), resp.text().as_str()),
            (200, "ok"),
            "round {round}: a response the upstream sent unasked was relayed"
        );
        // Half the rounds give the proxy time to notice the stray bytes on
        // the idle connection first; the others race it.
        if round % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sends one raw GET and reads until the proxy closes the connection
/// (bounded); the response must have started as a 200.
async fn get_until_closed(proxy: SocketAddr) -> (Vec<u8>, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await
        .expect("write");
    let response = read_to_eof(&mut stream).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "got {text:?}");
    (response, text)
}

/// Reads a raw response until EOF (bounded).
async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "proxy kept the connection open after a truncated body"
    );
    out
}

#[tokio::test]
async fn upstream_dying_mid_body_stays_visible_as_truncation() {
    let upstream = start_scripted(Script::DieMidBodyLength).await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let (response, text) = get_until_closed(proxy.http_addr).await;
    assert!(
        text.to_ascii_lowercase().contains("content-length: 100000"),
        "the promised length is forwarded, so the client can see the cut"
    );
    let body_len = response.len() - (text.find("\r\n\r\n").expect("head end") + 4);
    assert!(
        body_len < 100_000,
        "body cannot be complete: {body_len} bytes"
    );
}

#[tokio::test]
async fn upstream_dying_mid_chunked_body_never_sends_the_last_chunk() {
    let upstream = start_scripted(Script::DieMidBodyChunked).await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let (_, text) = get_until_closed(proxy.http_addr).await;
    assert!(text.contains("hello"), "the chunk that arrived is relayed");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a truncated body was terminated as if complete: {text:?}"
    );
}

#[tokio::test]
async fn upstream_dying_mid_body_resets_the_http2_stream() {
    let upstream = start_scripted(Script::DieMidBodyLength).await;
    let config = format!("{TLS_LOCALHOST}\n{}", config(upstream.addr));
    let proxy = start_proxy(&config).await;
    let tls = tls_connect(proxy.https(), "app.localhost", &[b"h2"]).await;
    let req = request("GET", "/", "app.localhost", Vec::new());
    let outcome = tokio::time::timeout(Duration::from_secs(10), send_h2(tls, req))
        .await
        .expect("HTTP/2 request hung after the upstream died");
    assert!(
        outcome.is_err(),
        "a truncated body was delivered as a complete HTTP/2 response"
    );
}

#[tokio::test]
async fn upstream_stalling_mid_body_is_cut_at_the_upstream_timeout() {
    let upstream = start_scripted(Script::StallMidBody).await;
    let config = config(upstream.addr).replace(
        "workers = 1\n",
        "workers = 1\n[server.limits]\nupstream_timeout = \"300ms\"",
    );
    let proxy = start_proxy(&config).await;
    // Without a stall clock on the upstream connection this read would wait
    // for the upstream's 30 s sleep; read_to_eof gives up after 10 s.
    let (response, text) = get_until_closed(proxy.http_addr).await;
    let body_len = response.len() - (text.find("\r\n\r\n").expect("head end") + 4);
    assert!(
        body_len < 100_000,
        "body cannot be complete: {body_len} bytes"
    );
}
