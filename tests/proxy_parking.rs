//! Parked idle HTTP/1.1 connections (`park_after`): an idle keep-alive
//! connection gives up hyper's state and buffers and wakes on its next
//! byte. The client must see nothing: no byte written while parked, the
//! next request answered on the same socket, and a request that races the
//! park served, never closed. `cutover status` counts the parks, so each
//! test proves the connection really parked.

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use common::*;
use cutover::admin::Command;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n";

/// The proxy with an admin socket in `dir`, parking after `park_after`.
async fn parking_proxy(dir: &Path, upstream: std::net::SocketAddr, extra: &str) -> TestProxy {
    let socket = dir.join("admin.sock");
    let proxy = start_proxy(&format!(
        "[server]\nadmin_socket = \"{}\"\n{extra}\n{TLS_LOCALHOST}\n[[site]]\nhosts = [\"*\"]\n\
         service = \"app\"\n[service.app]\nupstream = \"{upstream}\"\n",
        socket.display()
    ))
    .await;
    wait_for_admin(&socket).await;
    proxy
}

/// `cutover status`'s parking counters: parked now, parks since start.
async fn parking(dir: &Path) -> (u64, u64) {
    let status = admin_call(
        &dir.join("admin.sock"),
        Command::Status { service: None },
        IO_TIMEOUT,
    )
    .await
    .expect("status");
    let status = serde_json::to_value(&status).expect("status as JSON");
    let parking = &status["parking"];
    let count = |name: &str| {
        parking[name]
            .as_u64()
            .unwrap_or_else(|| panic!("status has no parking.{name}: {status}"))
    };
    (count("parked"), count("parks"))
}

/// Keep-alive request, idle past `park_after`, then a second request on the
/// same socket: answered, and nothing was written while parked. On the
/// paused clock (one worker: the clock is the test runtime's).
#[tokio::test(start_paused = true)]
async fn idle_connection_parks_and_wakes_for_its_next_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = parking_proxy(
        dir.path(),
        upstream.addr,
        "workers = 1\n[server.limits]\npark_after = \"1s\"\nheader_read_timeout = \"10s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.http_addr).await.expect("connect");
    stream.write_all(GET).await.expect("write");
    let first = read_response(&mut stream).await;
    assert_eq!(raw_status(&first), 200, "{first}");
    assert_eq!(
        parking(dir.path()).await,
        (0, 0),
        "parked before park_after"
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        parking(dir.path()).await,
        (1, 1),
        "not parked after park_after"
    );
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the client saw something while parked: {other:?}"),
    }

    stream.write_all(GET).await.expect("write after park");
    let second = read_response(&mut stream).await;
    assert_eq!(raw_status(&second), 200, "{second}");
    assert!(second.contains("app saw GET /hello"), "{second}");
    assert!(!raw_has_header(&second, "connection"), "{second}");
    assert_eq!(parking(dir.path()).await, (0, 1), "still counted as parked");

    // Parked again, and a third request still works.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(parking(dir.path()).await, (1, 2));
    stream.write_all(GET).await.expect("write");
    let third = read_response(&mut stream).await;
    assert_eq!(raw_status(&third), 200, "{third}");
    proxy.stop().await.expect("stop");
}

/// A request pipelined behind another, of which only the start has
/// arrived when the connection goes idle: hyper holds those bytes, the
/// park hands them back, and the next round starts with them; the rest of
/// the head completes the request.
#[tokio::test(start_paused = true)]
async fn bytes_read_ahead_survive_the_park() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = parking_proxy(
        dir.path(),
        upstream.addr,
        "workers = 1\n[server.limits]\npark_after = \"1s\"\nheader_read_timeout = \"10s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.http_addr).await.expect("connect");
    stream.write_all(GET).await.expect("write");
    assert_eq!(raw_status(&read_response(&mut stream).await), 200);
    // The second request and the first bytes of a third, in one write.
    let mut pipelined = GET.to_vec();
    pipelined.extend_from_slice(b"GET /piped HT");
    stream.write_all(&pipelined).await.expect("write");
    let second = read_response(&mut stream).await;
    assert_eq!(raw_status(&second), 200, "{second}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    stream
        .write_all(b"TP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write the rest");
    let third = read_response(&mut stream).await;
    assert_eq!(raw_status(&third), 200, "{third}");
    assert!(third.contains("app saw GET /piped"), "{third}");
    proxy.stop().await.expect("stop");
}

/// The same over TLS (HTTP/1.1 by ALPN): the TLS session survives the park.
#[tokio::test(start_paused = true)]
async fn idle_tls_connection_parks_and_wakes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = parking_proxy(
        dir.path(),
        upstream.addr,
        "workers = 1\n[server.limits]\npark_after = \"1s\"",
    )
    .await;
    let mut tls = tls_connect(proxy.https(), "localhost", &[b"http/1.1"]).await;
    tls.write_all(GET).await.expect("write");
    let first = read_response(&mut tls).await;
    assert_eq!(raw_status(&first), 200, "{first}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(parking(dir.path()).await, (1, 1), "not parked");
    let mut byte = [0u8; 1];
    let quiet = tokio::time::timeout(Duration::from_millis(100), tls.read(&mut byte)).await;
    assert!(
        quiet.is_err(),
        "the client saw something while parked: {quiet:?}"
    );

    tls.write_all(GET).await.expect("write after park");
    let second = read_response(&mut tls).await;
    assert_eq!(raw_status(&second), 200, "{second}");
    assert!(second.contains("app saw GET /hello"), "{second}");
    proxy.stop().await.expect("stop");
}

/// A parked connection still closes at `header_read_timeout` after its
/// last response, as an unparked one would, and at shutdown.
#[tokio::test(start_paused = true)]
async fn parked_connection_keeps_the_header_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = parking_proxy(
        dir.path(),
        upstream.addr,
        "workers = 1\n[server.limits]\npark_after = \"1s\"\nheader_read_timeout = \"10s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.http_addr).await.expect("connect");
    stream.write_all(GET).await.expect("write");
    assert_eq!(raw_status(&read_response(&mut stream).await), 200);
    let answered = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(parking(dir.path()).await, (1, 1));
    // Part of a head wakes it; the rest never comes: closed at the old
    // deadline, not 10 s after the wake-up.
    stream.write_all(b"GET / HT").await.expect("write");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest))
        .await
        .expect("closed")
        .ok();
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_secs(10) && idle < Duration::from_secs(11),
        "{idle:?}"
    );

    // Shutdown closes a parked connection at once.
    let mut parked = TcpStream::connect(proxy.http_addr).await.expect("connect");
    parked.write_all(GET).await.expect("write");
    assert_eq!(raw_status(&read_response(&mut parked).await), 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(parking(dir.path()).await.0, 1);
    proxy.stop().await.expect("stop");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), parked.read_to_end(&mut rest))
        .await
        .expect("parked connection closed at shutdown");
    assert!(matches!(read, Ok(0)), "{read:?} {rest:?}");
}

/// Requests sent just before, at and just after the moment the connection
/// parks, whole or in two pieces around it, on real time with the proxy on
/// two worker threads: every one is answered and the connection stays
/// open. Each client thread works through its own offsets; the parks are
/// counted so the test cannot pass without racing any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_racing_the_park_is_served() {
    const PARK_AFTER_MS: u64 = 20;
    const THREADS: u64 = 6;
    const ROUNDS: u64 = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = parking_proxy(
        dir.path(),
        upstream.addr,
        &format!("workers = 2\n[server.limits]\npark_after = \"{PARK_AFTER_MS}ms\""),
    )
    .await;
    let addr = proxy.http_addr;
    let clients: Vec<_> = (0..THREADS)
        .map(|thread| {
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for round in 0..ROUNDS {
                    // Offsets from 4 ms before to 8 ms after the park, in
                    // 50 µs steps spread over the threads.
                    let step = round * THREADS + thread;
                    let micros = (PARK_AFTER_MS * 1000 - 4000) + (step * 50) % 12_000;
                    let split = step % 3;
                    if let Err(err) = race_once(addr, Duration::from_micros(micros), split) {
                        failures.push(format!("offset {micros} µs, split {split}: {err}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = tokio::task::spawn_blocking(move || {
        clients
            .into_iter()
            .flat_map(|client| client.join().expect("client thread"))
            .collect()
    })
    .await
    .expect("join");
    let (_, parks) = parking(dir.path()).await;
    proxy.stop().await.expect("stop");
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
    eprintln!("{parks} parks in {} races", THREADS * ROUNDS);
    // A loaded host shifts both clocks; a tenth still proves the races.
    assert!(
        parks >= THREADS * ROUNDS / 10,
        "only {parks} parks in {} races",
        THREADS * ROUNDS
    );
}

/// One connection: a request, `wait`, then a second request (whole, or
/// split after its first line, or split into single writes 1 ms apart),
/// then a third straight after; every answer must be a 200.
fn race_once(addr: std::net::SocketAddr, wait: Duration, split: u64) -> Result<(), String> {
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    exchange(&mut stream, &[GET], Duration::ZERO).map_err(|e| format!("first: {e}"))?;
    std::thread::sleep(wait);
    let pieces: &[&[u8]] = match split {
        0 => &[GET],
        1 => &[&GET[..20], &GET[20..]],
        _ => &[&GET[..4], &GET[4..30], &GET[30..]],
    };
    exchange(&mut stream, pieces, Duration::from_millis(1)).map_err(|e| format!("racing: {e}"))?;
    exchange(&mut stream, &[GET], Duration::ZERO).map_err(|e| format!("after: {e}"))
}

/// Writes `pieces` (`gap` apart) and reads one 200 response.
fn exchange(
    stream: &mut std::net::TcpStream,
    pieces: &[&[u8]],
    gap: Duration,
) -> Result<(), String> {
    for (index, piece) in pieces.iter().enumerate() {
        if index > 0 {
            std::thread::sleep(gap);
        }
        stream.write_all(piece).map_err(|e| format!("write: {e}"))?;
    }
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("read: {e} after {:?}", String::from_utf8_lossy(&response)))?;
        if n == 0 {
            return Err(format!(
                "closed after {:?}",
                String::from_utf8_lossy(&response)
            ));
        }
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| format!("no content-length: {text}"))?;
            if response.len() >= end + 4 + length {
                if raw_status(&text) != 200 || raw_has_header(&text, "connection") {
                    return Err(format!("unexpected answer: {text}"));
                }
                return Ok(());
            }
        }
    }
}
