//! Every response-framing rule of cutover's own upstream HTTP/1.1 client,
//! one table row each: a raw TCP upstream sends exactly the bytes of the
//! case, and the test asserts what the client receives and whether the
//! upstream connection was used again for the next request.
//!
//! Rules that need more than one exchange (stale connections retried only
//! for idempotent requests, unsolicited bytes on an idle connection, HTTP/2
//! resets on truncation) are in `tests/upstream_pool.rs`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The probe answer every later request on any connection gets.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// One framing case.
struct Case {
    name: &'static str,
    /// The client's request, sent raw to the proxy.
    request: &'static str,
    /// The bytes the upstream answers the first request with.
    response: &'static [u8],
    /// Whether the upstream closes the connection after them.
    close: bool,
    /// What the client must see.
    expect: Seen,
    /// Whether the next request may travel on the same upstream connection.
    reused: bool,
}

/// What the client saw.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    body: Vec<u8>,
    /// The body's framing says it is whole (length reached, last chunk).
    complete: bool,
}

fn seen(status: u16, body: &str, complete: bool) -> Seen {
    Seen {
        status,
        body: body.as_bytes().to_vec(),
        complete,
    }
}

const GET: &str = "GET /case HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n";
const HEAD: &str = "HEAD /case HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n";
const POST_EXPECT: &str = "POST /case HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\
                           Expect: 100-continue\r\nContent-Length: 4\r\n\r\nbody";

fn refused() -> Seen {
    seen(502, "502 Bad Gateway\n", true)
}

fn cases() -> Vec<Case> {
    let huge_head: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\nContent-Length: 2\r\n\r\nok",
            "a".repeat(70 * 1024)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    vec![
        Case {
            name: "content-length",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            close: false,
            expect: seen(200, "hello", true),
            reused: true,
        },
        Case {
            name: "identical duplicate content-length",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            close: false,
            expect: seen(200, "hello", true),
            reused: true,
        },
        Case {
            name: "chunked with extensions and trailers",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                        5;ext=1\r\nhello\r\n6 ; name=\"v\"\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
            close: false,
            expect: seen(200, "hello world", true),
            reused: true,
        },
        Case {
            name: "bad chunk size mid-body: visible truncation",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            close: false,
            expect: seen(200, "hello", false),
            reused: false,
        },
        Case {
            name: "close-delimited body",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
            close: true,
            expect: seen(200, "until the close", true),
            reused: false,
        },
        Case {
            name: "HEAD has no body whatever the length says",
            request: HEAD,
            response: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            close: false,
            expect: seen(200, "", true),
            reused: true,
        },
        Case {
            name: "204 has no body",
            request: GET,
            response: b"HTTP/1.1 204 No Content\r\n\r\n",
            close: false,
            expect: seen(204, "", true),
            reused: true,
        },
        Case {
            name: "304 has no body",
            request: GET,
            response: b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n",
            close: false,
            expect: seen(304, "", true),
            reused: true,
        },
        Case {
            name: "interim 100 and 103 are skipped",
            request: GET,
            response: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\
                        Link: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            close: false,
            expect: seen(200, "ok", true),
            reused: true,
        },
        Case {
            name: "100 Continue to a request body",
            request: POST_EXPECT,
            response:
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            close: false,
            expect: seen(201, "", true),
            reused: true,
        },
        Case {
            name: "101 nobody asked for",
            request: GET,
            response: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "content-length and transfer-encoding",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                        5\r\nhello\r\n0\r\n\r\n",
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "two different content-lengths",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "transfer coding other than chunked",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "obs-fold",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nok",
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "NUL in a field",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 2\r\n\r\nok",
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "bare CR in a field",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "oversized head",
            request: GET,
            response: huge_head,
            close: false,
            expect: refused(),
            reused: false,
        },
        Case {
            name: "unsolicited bytes after a complete response",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\
                        HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
            close: false,
            expect: seen(200, "hello", true),
            reused: false,
        },
        Case {
            name: "short body then close: visible truncation",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
            close: true,
            expect: seen(200, "hello", false),
            reused: false,
        },
        Case {
            name: "no last chunk then close: visible truncation",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            close: true,
            expect: seen(200, "hello", false),
            reused: false,
        },
        Case {
            name: "Connection: close from the upstream",
            request: GET,
            response: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            close: false,
            expect: seen(200, "ok", true),
            reused: false,
        },
        Case {
            name: "HTTP/1.0 response",
            request: GET,
            response: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            close: false,
            expect: seen(200, "ok", true),
            reused: false,
        },
    ]
}

/// A raw upstream: the first request on the first connection gets
/// `response` (then a close when asked); every other request gets [`OK`].
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn start_raw(response: &'static [u8], close: bool) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let mut answer = if first { response } else { OK };
                // Bounded: no connection here carries more than 10 requests.
                for _ in 0..10 {
                    if !read_request(&mut stream).await {
                        return;
                    }
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    if answer != OK && close {
                        return;
                    }
                    answer = OK;
                }
            });
        }
    });
    RawUpstream { addr, connections }
}

/// Reads one request head and its Content-Length body; false at EOF.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return false,
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length = header_value(&text, "content-length").map_or(0, |v| v.parse().unwrap_or(0));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.is_ok()
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim())
    })
}

/// Sends the raw request and reads until the proxy closes (bounded).
async fn exchange(proxy: SocketAddr, request: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "the proxy kept the client connection open");
    raw
}

/// Parses what the proxy sent: interim heads skipped, the final head, and
/// its body decoded by the framing the proxy chose.
fn parse_client_view(raw: &[u8], head_request: bool) -> Seen {
    let mut rest = raw;
    loop {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let status: u16 = head[9..12].parse().expect("status");
        if (100..200).contains(&status) {
            continue;
        }
        let bodiless = head_request || status == 204 || status == 304;
        let chunked = header_value(&head, "transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let (body, complete) = if bodiless {
            (Vec::new(), rest.is_empty())
        } else if chunked {
            decode_chunked(rest)
        } else if let Some(length) = header_value(&head, "content-length") {
            let length: usize = length.parse().expect("length");
            (rest.to_vec(), rest.len() == length)
        } else {
            (rest.to_vec(), true)
        };
        return Seen {
            status,
            body,
            complete,
        };
    }
}

/// The data of a chunked body, and whether its last chunk arrived.
fn decode_chunked(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (body, false);
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (body, true);
        }
        let take = size.min(rest.len());
        body.extend_from_slice(&rest[..take]);
        if rest.len() < size + 2 {
            return (body, false);
        }
        rest = &rest[size + 2..];
    }
}

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
async fn every_framing_case_relays_what_it_must_and_reuses_only_clean_connections() {
    let mut failures = Vec::new();
    for case in cases() {
        let upstream = start_raw(case.response, case.close).await;
        let proxy = start_proxy(&config(upstream.addr)).await;
        let raw = exchange(proxy.http_addr, case.request).await;
        let got = parse_client_view(&raw, case.request.starts_with("HEAD"));
        // The next request: same upstream connection only if it was clean.
        let probe = http_get(proxy.http_addr, "app.localhost", "/probe").await;
        let reused = upstream.connections.load(Ordering::SeqCst) == 1;
        if got != case.expect {
            failures.push(format!(
                "{}: client saw {:?} (raw {:?}), expected {:?}",
                case.name,
                got,
                String::from_utf8_lossy(&raw),
                case.expect
            ));
        }
        if (probe.status.as_u16(), probe.text().as_str()) != (200, "ok") {
            failures.push(format!(
                "{}: the next request got {}",
                case.name, probe.status
            ));
        }
        if reused != case.reused {
            failures.push(format!(
                "{}: connection reused = {reused}, expected {}",
                case.name, case.reused
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn switching_protocols_relays_the_bytes_behind_the_101_head() {
    let upstream = start_raw(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\
          first-frame",
        false,
    )
    .await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let mut stream = TcpStream::connect(proxy.http_addr).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("write");
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !raw.ends_with(b"first-frame") {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the bytes behind the 101 head never arrived")
            .expect("read");
        assert!(
            read > 0,
            "closed early: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..read]);
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 101"), "got {text:?}");
    // The tunnel's connection never goes back to the pool.
    let probe = http_get(proxy.http_addr, "app.localhost", "/probe").await;
    assert_eq!(probe.status.as_u16(), 200);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}
