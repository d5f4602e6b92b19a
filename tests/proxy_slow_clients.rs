//! Slow and idle clients: many slowloris heads, trickled request bodies,
//! clients that never read their response, and thousands of idle
//! connections. Each must be cut off by a timeout or limit while a normal
//! request through the proxy keeps succeeding.
//!
//! Limits are tiny so the tests run fast; every wait is bounded, and the
//! waits that must outlast a timeout are lower bounds only.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// The tiny limits every test here runs with, plus a catch-all site that
/// forwards to `upstream` and serves `big_file` at `/big`.
fn slow_config(upstream: SocketAddr, big_file: &std::path::Path, extra_limits: &str) -> String {
    format!(
        r#"
[server.limits]
header_read_timeout = "1s"
idle_timeout = "1s"
body_timeout = "5s"
body_min_rate = 200
body_rate_grace = "500ms"
send_timeout = "500ms"
{extra_limits}

[[site]]
hosts = ["*"]
service = "app"

[[site.route]]
path = "/big"
file = "{big}"

[service.app]
upstream = "{upstream}"
"#,
        big = big_file.display()
    )
}

/// A file large enough that it cannot sit in socket buffers: loopback
/// send buffers grow to a few MiB at most.
const BIG_BYTES: usize = 24 << 20;

fn big_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), vec![b'z'; BIG_BYTES]).expect("write big file");
    file
}

/// A plain GET through the proxy to the upstream; panics unless it is 200.
async fn probe(proxy: SocketAddr) {
    let resp = tokio::time::timeout(IO_TIMEOUT, http_get(proxy, "app.localhost", "/probe"))
        .await
        .expect("probe through the proxy did not finish within 10s");
    assert_eq!(resp.status, StatusCode::OK, "probe: {}", resp.text());
}

/// Reads until EOF or a reset; returns the bytes read. Bounded.
async fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let read_all = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(bound, read_all).await.ok()?;
    Some(got)
}

#[tokio::test]
async fn many_slowloris_heads_are_cut_off_while_others_are_served() {
    let upstream = start_upstream("app").await;
    let big = big_file();
    let proxy = start_proxy(&slow_config(upstream.addr, big.path(), "")).await;
    let addr = proxy.http_addr;

    const CLIENTS: usize = 200;
    let (started, mut trickling) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = JoinSet::new();
    for i in 0..CLIENTS {
        let started = started.clone();
        clients.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(format!("GET /loris{i} HTTP/1.1\r\nHost: app.localhost\r\n").as_bytes())
                .await
                .expect("first bytes");
            let _ = started.send(());
            // One header byte every 100 ms, never finishing the head; stop
            // when the proxy closes the connection (bounded at 100 bytes).
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if stream.write_all(b"X").await.is_err() {
                    return true;
                }
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => {
                        // A 408 or any answer: the proxy gave up on it.
                        return true;
                    }
                    Err(_) => {}
                }
            }
            false
        });
    }
    // While all of them trickle, normal requests are served.
    all_started(&mut trickling, CLIENTS).await;
    for _ in 0..3 {
        probe(addr).await;
    }
    let mut cut = 0;
    while let Some(result) = clients.join_next().await {
        if result.expect("client task") {
            cut += 1;
        }
    }
    assert_eq!(
        cut, CLIENTS,
        "every slowloris connection must be closed by header_read_timeout (1s), \
         well before 100 trickled bytes (10s)"
    );
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| !r.uri.path().starts_with("/loris")),
        "an incomplete head reached the upstream"
    );
    probe(addr).await;
    proxy.stop().await.expect("clean stop");
}

/// A slow client's "my request has started" signal.
type Started = tokio::sync::mpsc::UnboundedSender<()>;

/// Waits (bounded) for `n` slow clients' "started" signals: the load the
/// probes must get through exists.
async fn all_started(signals: &mut tokio::sync::mpsc::UnboundedReceiver<()>, n: usize) {
    for started in 0..n {
        tokio::time::timeout(IO_TIMEOUT, signals.recv())
            .await
            .unwrap_or_else(|_| panic!("only {started} of {n} slow clients started"))
            .expect("a client's signal");
    }
}

/// Sends a POST head declaring `length` bytes, then one byte per `gap`
/// until the proxy answers; returns the raw answer and how many body
/// bytes were sent.
async fn trickle_body(
    addr: SocketAddr,
    length: usize,
    gap: Duration,
    started: Started,
) -> (String, usize) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!(
                "POST /echo HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: {length}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("head");
    let _ = started.send(());
    let mut sent = 0;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while sent < length {
        tokio::time::sleep(gap).await;
        if stream.write_all(b"a").await.is_err() {
            break;
        }
        sent += 1;
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await
        {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || !answer.is_empty() {
                break;
            }
        }
    }
    // Whatever is left of the answer, then EOF (the proxy closes).
    if let Some(rest) = read_until_closed(&mut stream, IO_TIMEOUT).await {
        answer.extend(rest);
    }
    (String::from_utf8_lossy(&answer).into_owned(), sent)
}

#[tokio::test]
async fn trickled_bodies_below_the_minimum_rate_get_408() {
    let upstream = start_upstream("app").await;
    let big = big_file();
    let proxy = start_proxy(&slow_config(upstream.addr, big.path(), "")).await;
    let addr = proxy.http_addr;

    // 20 clients at ~20 bytes/s: each gap (50 ms) is far below body_timeout
    // (5 s), so only the 200 B/s minimum rate can stop them. At 1 byte per
    // 50 ms the 2,000-byte bodies would take 100 s to finish.
    let (started, mut trickling) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = JoinSet::new();
    for _ in 0..20 {
        let gap = Duration::from_millis(50);
        clients.spawn(trickle_body(addr, 2_000, gap, started.clone()));
    }
    all_started(&mut trickling, 20).await;
    probe(addr).await;
    while let Some(result) = clients.join_next().await {
        let (answer, sent) = result.expect("client task");
        assert_eq!(raw_status(&answer), 408, "{answer:?}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "408 must close the connection: {answer:?}"
        );
        assert!(sent < 2_000, "the whole body was accepted at 20 B/s");
    }
    probe(addr).await;
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_body_above_the_minimum_rate_is_forwarded() {
    let upstream = start_upstream("app").await;
    let big = big_file();
    let proxy = start_proxy(&slow_config(upstream.addr, big.path(), "")).await;

    // 2,000 bytes in 100-byte pieces every 20 ms: ~5,000 B/s, above 200 B/s.
    let mut stream = TcpStream::connect(proxy.http_addr).await.expect("connect");
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 2000\r\n\r\n")
        .await
        .expect("head");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        stream.write_all(&[b'b'; 100]).await.expect("body piece");
    }
    let answer = read_response(&mut stream).await;
    assert_eq!(raw_status(&answer), 200, "{answer:?}");
    assert!(answer.ends_with(&"b".repeat(2_000)), "echo: {answer:?}");
    proxy.stop().await.expect("clean stop");
}

/// Connects with a tiny receive buffer so the proxy's writes block soon.
async fn connect_small_window(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

#[tokio::test]
async fn clients_that_never_read_are_disconnected_by_send_timeout() {
    let upstream = start_upstream("app").await;
    let big = big_file();
    let proxy = start_proxy(&slow_config(upstream.addr, big.path(), "")).await;
    let addr = proxy.http_addr;

    // Ten clients ask for 24 MiB each and then read nothing.
    let mut stuck = Vec::new();
    for _ in 0..10 {
        let mut stream = connect_small_window(addr).await;
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            .await
            .expect("request");
        stuck.push(stream);
    }
    // The proxy keeps serving others while their writes are blocked...
    probe(addr).await;
    // ...and gives up on them once no write has progressed for 500 ms.
    // (A lower bound only: if the proxy had not closed them, reading now
    // would drain the whole 24 MiB and the assertion below would fail.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    for mut stream in stuck {
        let got = read_until_closed(&mut stream, Duration::from_secs(30))
            .await
            .expect("connection neither closed nor drained within 30s");
        assert!(
            got.len() < BIG_BYTES,
            "a client that did not read for 3s still got the whole {} bytes",
            got.len()
        );
    }
    probe(addr).await;
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_gets_the_whole_response() {
    let upstream = start_upstream("app").await;
    let big = big_file();
    let proxy = start_proxy(&slow_config(upstream.addr, big.path(), "")).await;

    let mut stream = connect_small_window(proxy.http_addr).await;
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    // Pauses 100 ms after every 2 MiB: each pause is below send_timeout
    // (500 ms), so the connection must survive to the end. (The clock runs
    // between two successful writes, as nginx's send_timeout does: the
    // kernel wakes a blocked writer only once a third of its send buffer is
    // free, so a reader must drain that much within send_timeout.)
    let mut got = 0usize;
    let mut next_pause = 2 << 20;
    let mut chunk = vec![0u8; 256 * 1024];
    let read_all = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
            if got >= next_pause {
                next_pause += 2 << 20;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("24 MiB within 60s");
    assert!(
        got > BIG_BYTES,
        "got {got} bytes of a {BIG_BYTES}-byte body"
    );
    proxy.stop().await.expect("clean stop");
}

/// How many connections the idle test can open: the client and the proxy
/// share this process, so each costs two descriptors.
fn idle_connection_budget(wanted: usize) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|soft| soft.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    wanted.min(limit.saturating_sub(200) / 2)
}

#[tokio::test]
async fn thousands_of_idle_connections_are_closed_and_do_not_block_service() {
    let upstream = start_upstream("app").await;
    let big = big_file();
    let proxy = start_proxy(&slow_config(upstream.addr, big.path(), "")).await;
    let addr = proxy.http_addr;

    let count = idle_connection_budget(2_000);
    assert!(count >= 400, "fd limit too low for this test ({count})");
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect within 10s")
            .expect("connect");
        idle.push(stream);
    }
    probe(addr).await;

    // Every idle connection is closed by the proxy (header_read_timeout and
    // idle_timeout are 1s); bounded at 20s for all of them.
    let mut closed = JoinSet::new();
    for mut stream in idle {
        closed.spawn(async move {
            read_until_closed(&mut stream, Duration::from_secs(20))
                .await
                .is_some()
        });
    }
    let mut still_open = 0;
    while let Some(result) = closed.join_next().await {
        if !result.expect("task") {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle connections left open after 20s");
    probe(addr).await;
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn max_connections_full_of_idle_clients_recovers_through_timeouts() {
    let upstream = start_upstream("app").await;
    let big = big_file();
    let proxy = start_proxy(&slow_config(
        upstream.addr,
        big.path(),
        "max_connections = 20",
    ))
    .await;
    let addr = proxy.http_addr;

    // Take every connection slot with clients that send nothing.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // The probe waits in the accept backlog (the limit holds) and is served
    // once the 1s header timeout frees the slots: bounded by IO_TIMEOUT.
    probe(addr).await;
    for mut stream in idle {
        assert!(
            read_until_closed(&mut stream, Duration::from_secs(20))
                .await
                .is_some(),
            "idle connection not closed"
        );
    }
    proxy.stop().await.expect("clean stop");
}
