//! Request limits and malformed requests: 431, 413, 400, and the slow
//! request-head timeout. Rejected requests must never reach the upstream.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn limited_config(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
[server.limits]
max_header_bytes = 8192
max_body_bytes = 1024
header_read_timeout = "500ms"

[[site]]
hosts = ["*"]
service = "app"

[service.app]
upstream = "{upstream}"
"#
    )
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&limited_config(upstream.addr)).await;
    let big = "a".repeat(12_000);
    let request = format!("GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Big: {big}\r\n\r\n");
    let raw = raw_exchange(proxy.http_addr, request.as_bytes()).await;
    assert_eq!(raw_status(&raw), 431, "{raw:?}");

    // A head just under the limit is still served.
    let ok = "b".repeat(4_000);
    let request = format!("GET /ok HTTP/1.1\r\nHost: app.localhost\r\nX-Ok: {ok}\r\n\r\n");
    let raw = raw_exchange(proxy.http_addr, request.as_bytes()).await;
    assert_eq!(raw_status(&raw), 200, "{raw:?}");
    let seen = upstream.single();
    assert_eq!(
        seen.uri, "/ok",
        "only the small request reached the upstream"
    );
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn body_over_limit_is_413() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&limited_config(upstream.addr)).await;

    // Declared length over the limit: refused before anything is forwarded.
    let mut request =
        b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 2048\r\n\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'x', 2048));
    let raw = raw_exchange(proxy.http_addr, &request).await;
    assert_eq!(raw_status(&raw), 413, "{raw:?}");
    assert_eq!(
        upstream.count(),
        0,
        "declared-too-large request was forwarded"
    );

    // Chunked body that grows past the limit while streaming.
    let mut request =
        b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        request.extend_from_slice(b"200\r\n");
        request.extend(std::iter::repeat_n(b'y', 0x200));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let raw = raw_exchange(proxy.http_addr, &request).await;
    assert_eq!(raw_status(&raw), 413, "{raw:?}");
    // The head may have been streamed to the upstream, but never a whole body.
    for seen in upstream.requests() {
        assert!(
            seen.body.as_ref().is_none_or(|b| b.len() <= 1024),
            "upstream received the oversized body: {} bytes",
            seen.body.as_ref().map_or(0, |b| b.len())
        );
    }

    // A body within the limit passes.
    let resp = http_request(
        proxy.http_addr,
        request_with_body("POST", "/echo", vec![b'z'; 1000]),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), 1000);
    proxy.stop().await.expect("clean stop");
}

fn request_with_body(
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    request(method, path, "app.localhost", body)
}

#[tokio::test]
async fn malformed_requests_are_400_and_never_forwarded() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&limited_config(upstream.addr)).await;
    let cases: [(&str, &[u8]); 4] = [
        ("garbage request line", b"GARBAGE\r\n\r\n"),
        (
            "bad request line",
            b"GET /a b c HTTP/1.1\r\nHost: app.localhost\r\n\r\n",
        ),
        ("HTTP/1.1 without Host", b"GET /nohost HTTP/1.1\r\n\r\n"),
        (
            "two Host headers",
            b"GET /twohosts HTTP/1.1\r\nHost: app.localhost\r\nHost: evil.test\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let raw = raw_exchange(proxy.http_addr, bytes).await;
        assert_eq!(raw_status(&raw), 400, "{what}: {raw:?}");
    }
    assert_eq!(
        upstream.count(),
        0,
        "a rejected request reached the upstream: {:#?}",
        upstream.requests()
    );
    // HTTP/1.0 without Host is legal and lands on the catch-all site.
    let raw = raw_exchange(proxy.http_addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&raw), 200, "{raw:?}");
    assert_eq!(upstream.count(), 1);
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&limited_config(upstream.addr)).await;
    let mut stream = TcpStream::connect(proxy.http_addr).await.unwrap();
    stream
        .write_all(b"GET /slowloris HTTP/1.1\r\nHost: app.localhost\r\n")
        .await
        .unwrap();
    // Stall: never finish the head. The proxy must close (optionally after
    // a 408) well before this bound.
    let mut received = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(err) => return Err(err),
            }
        }
    })
    .await;
    assert!(
        outcome.is_ok(),
        "connection still open 5s after a partial head (header_read_timeout = 500ms)"
    );
    let text = String::from_utf8_lossy(&received);
    assert!(
        received.is_empty() || raw_status(&text) == 408,
        "unexpected answer to a stalled head: {text:?}"
    );
    assert_eq!(upstream.count(), 0);
    proxy.stop().await.expect("clean stop");
}
