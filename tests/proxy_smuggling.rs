//! HTTP/1.1 request parsing and smuggling, with exact bytes over raw TCP.
//!
//! For every malformed request: the status, that the proxy closes the
//! connection, that the recording upstream received nothing, and that a
//! follow-up on a fresh connection gets its own answer. Also: the cases
//! hyper normalizes instead of refusing (documented in
//! `docs/hardening.md`), pipelining, `max_uri_bytes`, and HTTP/2 cookie joining.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "app.localhost";

fn app_config(upstream: SocketAddr, limits: &str) -> String {
    format!(
        r#"
[server.limits]
{limits}

{TLS_LOCALHOST}

[[site]]
hosts = ["{HOST}"]
service = "app"

[service.app]
upstream = "{upstream}"
"#
    )
}

/// A request from head lines (joined with CRLF) and a body.
fn req(lines: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out = lines.join(&b"\r\n"[..]);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// What came back on one raw connection.
struct Exchange {
    text: String,
    closed: bool,
}

/// Writes `bytes`, then reads until the proxy closes the connection or
/// [`IO_TIMEOUT`] passes (then `closed` is false).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    Exchange {
        text: String::from_utf8_lossy(&buf).into_owned(),
        closed,
    }
}

/// Every status line's code, in order (pipelined answers).
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

/// The upstream's request targets (path and query), in order.
fn targets(upstream: &Upstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| r.uri.to_string())
        .collect()
}

/// Asserts that a follow-up on a fresh connection is answered by the
/// upstream and that it is the only request the upstream has seen.
async fn assert_only_followup(proxy: SocketAddr, upstream: &Upstream, case: &str) {
    let follow = http_get(proxy, HOST, "/followup").await;
    assert_eq!(follow.status, 200, "{case}: follow-up status");
    assert_eq!(follow.text(), "app saw GET /followup", "{case}: follow-up");
    assert_eq!(
        targets(upstream),
        vec!["/followup"],
        "{case}: upstream saw more than the follow-up"
    );
}

/// Requests hyper or cutover refuse: (name, bytes, status).
fn refused_cases() -> Vec<(&'static str, Vec<u8>, u16)> {
    let h: &[u8] = b"Host: app.localhost";
    let post: &[u8] = b"POST / HTTP/1.1";
    let get: &[u8] = b"GET / HTTP/1.1";
    let chunked: &[u8] = b"Transfer-Encoding: chunked";
    let long_path = format!("GET /{} HTTP/1.1", "a".repeat(9000));
    let big_header = format!("X-Big: {}", "a".repeat(40_000));
    vec![
        (
            "cl_duplicate_different",
            req(
                &[post, h, b"Content-Length: 5", b"Content-Length: 6"],
                b"hello!",
            ),
            400,
        ),
        (
            "cl_list",
            req(&[post, h, b"Content-Length: 5, 5"], b"hello"),
            400,
        ),
        (
            "cl_not_a_number",
            req(&[post, h, b"Content-Length: abc"], b"hello"),
            400,
        ),
        (
            "cl_plus_sign",
            req(&[post, h, b"Content-Length: +5"], b"hello"),
            400,
        ),
        (
            "cl_negative",
            req(&[post, h, b"Content-Length: -1"], b"hello"),
            400,
        ),
        (
            "chunk_size_not_hex",
            req(&[post, h, chunked], b"zz\r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk_size_overflow",
            req(
                &[post, h, chunked],
                b"fffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "chunk_size_negative",
            req(&[post, h, chunked], b"-5\r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        (
            "te_not_chunked",
            req(&[post, h, b"Transfer-Encoding: gzip"], b"hello"),
            400,
        ),
        (
            "te_chunked_not_last",
            req(
                &[post, h, b"Transfer-Encoding: chunked, gzip"],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "te_in_http10",
            req(
                &[b"POST / HTTP/1.0", h, chunked],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
            400,
        ),
        ("obs_fold", req(&[get, h, b"X-A: a", b" folded"], b""), 400),
        (
            "obs_fold_hiding_te",
            req(
                &[
                    post,
                    h,
                    b"X-A: a",
                    b" Transfer-Encoding: chunked",
                    b"Content-Length: 5",
                ],
                b"hello",
            ),
            400,
        ),
        (
            "bare_cr_in_header",
            b"GET / HTTP/1.1\r\nHost: app.localhost\r\nX-A: a\rb\r\n\r\n".to_vec(),
            400,
        ),
        ("space_before_colon", req(&[get, h, b"X-A : a"], b""), 400),
        (
            "space_before_colon_te",
            req(
                &[
                    post,
                    h,
                    b"Transfer-Encoding : chunked",
                    b"Content-Length: 5",
                ],
                b"hello",
            ),
            400,
        ),
        (
            "space_before_first_header",
            req(&[get, b" Host: app.localhost"], b""),
            400,
        ),
        ("nul_in_header", req(&[get, h, b"X-A: a\x00b"], b""), 400),
        ("ctl_in_header", req(&[get, h, b"X-A: a\x01b"], b""), 400),
        ("del_in_header", req(&[get, h, b"X-A: a\x7fb"], b""), 400),
        ("ctl_in_header_name", req(&[get, h, b"X\x01A: a"], b""), 400),
        ("missing_host", req(&[get, b"X-A: a"], b""), 400),
        (
            "duplicate_host",
            req(&[get, h, b"Host: other.localhost"], b""),
            400,
        ),
        ("empty_host", req(&[get, b"Host:"], b""), 400),
        (
            "request_line_double_space",
            req(&[b"GET  / HTTP/1.1", h], b""),
            400,
        ),
        (
            "request_line_extra_token",
            req(&[b"GET / HTTP/1.1 x", h], b""),
            400,
        ),
        ("request_line_no_version", req(&[b"GET /", h], b""), 400),
        (
            "request_line_bad_method",
            req(&[b"G(T / HTTP/1.1", h], b""),
            400,
        ),
        (
            "request_line_lowercase_version",
            req(&[b"GET / http/1.1", h], b""),
            400,
        ),
        (
            "request_line_unknown_version",
            req(&[b"GET / HTTP/1.2", h], b""),
            400,
        ),
        (
            "request_line_space_in_target",
            req(&[b"GET /a b HTTP/1.1", h], b""),
            400,
        ),
        ("uri_too_long", req(&[long_path.as_bytes(), h], b""), 414),
        (
            "headers_too_large",
            req(&[get, h, big_header.as_bytes()], b""),
            431,
        ),
    ]
}

#[tokio::test]
async fn malformed_requests_are_refused_closed_and_never_forwarded() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let mut failures = Vec::new();
    for (name, bytes, status) in refused_cases() {
        upstream.records.lock().expect("lock").clear();
        let got = exchange(proxy.http_addr, &bytes).await;
        let codes = statuses(&got.text);
        if codes != vec![status] {
            failures.push(format!("{name}: statuses {codes:?}, want [{status}]"));
        }
        if !got.closed {
            failures.push(format!("{name}: connection left open"));
        }
        assert_only_followup(proxy.http_addr, &upstream, name).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
    proxy.stop().await.expect("stop");
}

/// Refusals that cutover itself makes (not hyper) carry `Connection:
/// close` as well as closing.
#[tokio::test]
async fn cutover_refusals_say_connection_close() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "duplicate_host",
            req(
                &[
                    b"GET / HTTP/1.1",
                    b"Host: a.localhost",
                    b"Host: b.localhost",
                ],
                b"",
            ),
        ),
        (
            "uri_too_long",
            req(
                &[
                    format!("GET /{} HTTP/1.1", "a".repeat(9000)).as_bytes(),
                    b"Host: app.localhost",
                ],
                b"",
            ),
        ),
        (
            "chunk_size_not_hex",
            req(
                &[
                    b"POST / HTTP/1.1",
                    b"Host: app.localhost",
                    b"Transfer-Encoding: chunked",
                ],
                b"zz\r\n",
            ),
        ),
    ];
    for (name, bytes) in cases {
        let got = exchange(proxy.http_addr, &bytes).await;
        assert!(got.closed, "{name}: connection left open");
        assert!(
            got.text.to_ascii_lowercase().contains("connection: close"),
            "{name}: {}",
            got.text
        );
    }
    assert_eq!(upstream.count(), 0, "{:#?}", upstream.requests());
    proxy.stop().await.expect("stop");
}

/// Content-Length together with Transfer-Encoding: hyper follows RFC 9112
/// §6.1's other option. Chunked framing wins, the Content-Length is
/// dropped, and the connection is closed after the response. The bytes
/// after the chunked body ("G...") are never read as a second request, and
/// the upstream sees one request framed by chunked encoding alone. hyper
/// drops the Content-Length before the request reaches cutover, so cutover
/// cannot answer 400 here without a parser of its own.
#[tokio::test]
async fn content_length_with_chunked_is_normalized_and_closed() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let orders: [(&str, &[&[u8]]); 2] = [
        (
            "cl_then_te",
            &[b"Content-Length: 6", b"Transfer-Encoding: chunked"],
        ),
        (
            "te_then_cl",
            &[b"Transfer-Encoding: chunked", b"Content-Length: 6"],
        ),
    ];
    for (name, framing) in orders {
        upstream.records.lock().expect("lock").clear();
        let mut lines: Vec<&[u8]> = vec![b"POST /echo HTTP/1.1", b"Host: app.localhost"];
        lines.extend_from_slice(framing);
        let smuggle = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.localhost\r\n\r\n";
        let got = exchange(proxy.http_addr, &req(&lines, smuggle)).await;
        assert_eq!(statuses(&got.text), vec![200], "{name}: {}", got.text);
        assert!(got.closed, "{name}: connection left open");
        let seen = upstream.single();
        assert_eq!(seen.uri, "/echo", "{name}");
        assert!(
            !seen.headers.contains_key("content-length"),
            "{name}: Content-Length forwarded: {:?}",
            seen.headers
        );
        assert_eq!(seen.body.as_deref(), Some(&b""[..]), "{name}");
        upstream.records.lock().expect("lock").clear();
        assert_only_followup(proxy.http_addr, &upstream, name).await;
    }
    proxy.stop().await.expect("stop");
}

/// Two equal Content-Length lines: hyper keeps one (RFC 9110 §8.6 allows
/// it), so the upstream sees exactly one `Content-Length: 5`.
#[tokio::test]
async fn equal_duplicate_content_length_is_collapsed() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let bytes = req(
        &[
            b"POST /echo HTTP/1.1",
            b"Host: app.localhost",
            b"Content-Length: 5",
            b"Content-Length: 5",
            b"Connection: close",
        ],
        b"hello",
    );
    let got = exchange(proxy.http_addr, &bytes).await;
    assert_eq!(statuses(&got.text), vec![200], "{}", got.text);
    assert!(got.text.ends_with("hello"), "{}", got.text);
    let seen = upstream.single();
    let lengths: Vec<_> = seen.headers.get_all("content-length").iter().collect();
    assert_eq!(lengths, vec!["5"]);
    proxy.stop().await.expect("stop");
}

/// Bare LF line endings: httparse accepts them (RFC 9112 §2.2 allows a
/// recipient to) and hyper has no switch to refuse them. What reaches the
/// upstream is hyper's re-serialization with CRLF, so the upstream never
/// parses the client's line endings; the request is answered normally.
#[tokio::test]
async fn bare_lf_is_accepted_and_reserialized() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let raw = start_raw_upstream(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
    let raw_proxy = start_proxy(&app_config(raw.addr, "")).await;

    let bytes = b"GET /lf HTTP/1.1\nHost: app.localhost\nX-A: a\nConnection: close\n\n";
    let got = exchange(proxy.http_addr, bytes).await;
    assert_eq!(statuses(&got.text), vec![200], "{}", got.text);
    assert_eq!(upstream.single().uri, "/lf");

    let got = exchange(raw_proxy.http_addr, bytes).await;
    assert_eq!(statuses(&got.text), vec![200], "{}", got.text);
    let heads = raw.heads.lock().expect("lock").clone();
    let head = heads.first().expect("raw upstream saw the request");
    assert!(head.starts_with("GET /lf HTTP/1.1\r\n"), "{head:?}");
    assert!(
        !head.replace("\r\n", "").contains('\n'),
        "bare LF reached the upstream: {head:?}"
    );
    proxy.stop().await.expect("stop");
    raw_proxy.stop().await.expect("stop");
}

/// A bad chunk size after a good chunk: the body is streamed, so the
/// upstream has already been sent the head and the first chunk. The
/// request is aborted (the upstream never sees a complete request), the
/// client gets 400 and the connection is closed.
#[tokio::test]
async fn bad_later_chunk_aborts_the_forwarded_request() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let bytes = req(
        &[
            b"POST /echo HTTP/1.1",
            b"Host: app.localhost",
            b"Transfer-Encoding: chunked",
        ],
        b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
    );
    let got = exchange(proxy.http_addr, &bytes).await;
    assert_eq!(statuses(&got.text), vec![400], "{}", got.text);
    assert!(got.closed, "connection left open");
    for seen in upstream.requests() {
        assert_eq!(seen.body, None, "a complete request reached the upstream");
    }
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let h: &[u8] = b"Host: app.localhost";
    let mut bytes = req(&[b"GET /one HTTP/1.1", h], b"");
    bytes.extend(req(&[b"GET /two HTTP/1.1", h], b""));
    bytes.extend(req(&[b"GET /three HTTP/1.1", h, b"Connection: close"], b""));
    let got = exchange(proxy.http_addr, &bytes).await;
    assert_eq!(statuses(&got.text), vec![200, 200, 200], "{}", got.text);
    let positions: Vec<usize> = ["/one", "/two", "/three"]
        .iter()
        .map(|path| {
            got.text
                .find(&format!("app saw GET {path}"))
                .unwrap_or_else(|| panic!("no answer for {path}: {}", got.text))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "answers out of order: {}",
        got.text
    );
    assert_eq!(targets(&upstream), vec!["/one", "/two", "/three"]);
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn max_uri_bytes_is_configurable() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, r#"max_uri_bytes = "1KiB""#)).await;
    let fits = format!("/{}", "a".repeat(1023));
    assert_eq!(http_get(proxy.http_addr, HOST, &fits).await.status, 200);
    let too_long = format!("/{}", "a".repeat(1024));
    let got = exchange(
        proxy.http_addr,
        &req(
            &[
                format!("GET {too_long} HTTP/1.1").as_bytes(),
                b"Host: app.localhost",
            ],
            b"",
        ),
    )
    .await;
    assert_eq!(statuses(&got.text), vec![414], "{}", got.text);
    assert!(got.closed);
    assert_eq!(upstream.count(), 1, "only the request that fits");
    proxy.stop().await.expect("stop");
}

/// HTTP/2 clients may send `cookie` as several fields (RFC 9113 §8.2.3);
/// an HTTP/1.1 upstream must get one `Cookie` joined with "; ".
#[tokio::test]
async fn h2_cookies_are_joined_for_http1_upstreams() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let mut req = request(
        "GET",
        &format!("https://{HOST}/cookies"),
        HOST,
        Bytes::new(),
    );
    req.headers_mut().remove("host");
    req.headers_mut()
        .append("cookie", "a=1".parse().expect("value"));
    req.headers_mut()
        .append("cookie", "b=2".parse().expect("value"));
    let resp = https_h2(proxy.https(), HOST, req).await;
    assert_eq!(resp.status, 200);
    let seen = upstream.single();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, vec!["a=1; b=2"]);
    proxy.stop().await.expect("stop");
}

/// Two equal `content-length` fields pass the h2 crate; forwarded as they
/// are, the HTTP/1.1 upstream would get two `Content-Length` lines. cutover
/// refuses the request instead (src/proxy/strict.rs).
#[tokio::test]
async fn h2_duplicate_content_length_is_refused() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let mut req = request("POST", &format!("https://{HOST}/echo"), HOST, "hello");
    req.headers_mut().remove("host");
    for _ in 0..2 {
        req.headers_mut()
            .append("content-length", "5".parse().expect("value"));
    }
    let resp = https_h2(proxy.https(), HOST, req).await;
    assert_eq!(resp.status, 400);
    assert_eq!(upstream.count(), 0, "{:#?}", upstream.requests());
    proxy.stop().await.expect("stop");
}
