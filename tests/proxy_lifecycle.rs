//! Lifecycle: graceful shutdown with a request in flight, and config
//! validation errors with `file:line:` locations (library and `cutover check`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::net::TcpStream;

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_request() {
    let upstream = start_upstream("app").await;
    let mut proxy = start_proxy(&format!(
        r#"
{TLS_LOCALHOST}
[server]
shutdown_timeout = "10s"
[[site]]
hosts = ["app.localhost"]
service = "app"
[service.app]
upstream = "{}"
"#,
        upstream.addr
    ))
    .await;
    let http_addr = proxy.http_addr;
    let https_addr = proxy.https();

    // An idle keep-alive connection opened before shutdown must not hold
    // the drain open.
    let idle = TcpStream::connect(http_addr).await.unwrap();

    let in_flight =
        tokio::spawn(async move { http_get(http_addr, "app.localhost", "/slow?ms=800").await });
    upstream.wait_for(1).await;
    proxy.trigger_shutdown();

    let resp = tokio::time::timeout(IO_TIMEOUT, in_flight)
        .await
        .expect("in-flight request never finished")
        .expect("client task panicked");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "slow done");

    let result = proxy.join().await;
    assert!(result.is_ok(), "run returned an error: {result:?}");

    for addr in [http_addr, https_addr] {
        let attempt = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await;
        assert!(
            matches!(attempt, Ok(Err(_))),
            "new connection to {addr} after shutdown was not refused"
        );
    }
    drop(idle);
}

#[tokio::test]
async fn graceful_shutdown_with_nothing_in_flight_returns_promptly() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&format!(
        "[[site]]\nhosts = [\"*\"]\nservice = \"app\"\n[service.app]\nupstream = \"{}\"\n",
        upstream.addr
    ))
    .await;
    // Leave a used keep-alive connection open across the shutdown.
    let stream = TcpStream::connect(proxy.http_addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", "/", "x.test", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let started = tokio::time::Instant::now();
    proxy.stop().await.expect("clean stop");
    // Loose bound: the idle connection is closed instead of waited on
    // until shutdown_timeout (30s by default).
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

fn parse_err(text: &str) -> String {
    match cutover::Config::parse(text, "bad.toml", root()) {
        Ok(_) => panic!("config unexpectedly valid:\n{text}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn unknown_key_is_reported_with_its_line() {
    let text =
        "[server]\nworkers = 2\n\n[server.limits]\nmax_body_bytes = \"1MiB\"\nmax_body = 3\n";
    let err = parse_err(text);
    assert!(err.starts_with("bad.toml:6:"), "{err}");
    assert!(err.contains("max_body"), "{err}");
}

#[test]
fn bad_duration_is_reported_with_its_line() {
    let text = "[server]\n\n[server.limits]\nupstream_timeout = \"5 seconds\"\n";
    let err = parse_err(text);
    assert!(err.starts_with("bad.toml:4:"), "{err}");
    assert!(err.contains("duration"), "{err}");
}

#[test]
fn unknown_service_reference_is_reported_with_its_line() {
    let text = r#"[[site]]
hosts = ["example.test"]

[[site.route]]
path = "/api"
service = "missing"

[service.web]
upstream = "127.0.0.1:9000"
"#;
    let err = parse_err(text);
    assert!(err.contains("bad.toml:6:"), "{err}");
    assert!(err.contains("unknown service \"missing\""), "{err}");
}

#[test]
fn cutover_check_rejects_invalid_config_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[server]\nhttp = \"127.0.0.1:8080\"\n[[site]]\nhosts = [\"a.test\"]\nservice = \"nope\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run cutover check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "check accepted a bad config: {stdout}{stderr}"
    );
    let expected = format!("{}:5:", path.display());
    assert!(
        stderr.contains(&expected) || stdout.contains(&expected),
        "no `{expected}` location in output:\n{stdout}{stderr}"
    );

    // And a valid config passes.
    std::fs::write(
        &path,
        "[[site]]\nhosts = [\"a.test\"]\nservice = \"web\"\n[service.web]\nupstream = \"127.0.0.1:9000\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run cutover check");
    assert!(
        output.status.success(),
        "check rejected a valid config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An HTTP/2 connection with no new request for `idle_timeout` is closed
/// gracefully; one that keeps sending stays open, and a request that runs
/// longer than the idle timeout is not cut.
#[tokio::test]
async fn idle_h2_connection_is_closed_busy_one_is_not() {
    let upstream = start_upstream("idle").await;
    let config = format!(
        r#"
[server.limits]
idle_timeout = "400ms"
{TLS_LOCALHOST}
[[site]]
hosts = ["*"]
service = "app"
[service.app]
upstream = "{}"
"#,
        upstream.addr
    );
    let proxy = start_proxy(&config).await;
    let https = proxy.https();
    let open_h2 = || async {
        let tls = tls_connect(https, "localhost", &[b"h2"]).await;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        (sender, tokio::spawn(conn))
    };
    let get = |path: &str| {
        request(
            "GET",
            &format!("https://localhost:{}{path}", https.port()),
            "localhost",
            bytes::Bytes::new(),
        )
    };

    // Busy: a request every 100 ms for 1.2 s keeps the connection open, and
    // a 900 ms request (longer than the idle timeout) completes.
    let (mut busy, busy_conn) = open_h2().await;
    let slow = {
        let mut sender = busy.clone();
        let req = get("/slow?ms=900");
        tokio::spawn(async move { sender.send_request(req).await.map(|r| r.status()) })
    };
    for _ in 0..12 {
        let response = busy
            .send_request(get("/"))
            .await
            .expect("busy connection stays open");
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        slow.await.expect("join").expect("slow request not cut"),
        200
    );
    assert!(!busy_conn.is_finished(), "busy connection was closed");

    // Idle: the connection ends on its own, well within a bounded wait.
    let (_idle, idle_conn) = open_h2().await;
    tokio::time::timeout(Duration::from_secs(5), idle_conn)
        .await
        .expect("idle connection closed by the proxy")
        .expect("join")
        .expect("closed cleanly (GOAWAY), not reset");
    proxy.stop().await.expect("stop");
}

/// The proxy under a paused clock: one catch-all site to `upstream`, with
/// `limits` in `[server.limits]` (and TLS, for HTTP/2).
/// One worker: tokio's paused clock belongs to the test's runtime, and
/// connections served on worker threads would run on real time.
async fn paused_proxy(upstream: std::net::SocketAddr, limits: &str) -> TestProxy {
    start_proxy(&format!(
        "[server]\nworkers = 1\n[server.limits]\n{limits}\n{TLS_LOCALHOST}\n[[site]]\nhosts = [\"*\"]\n\
         service = \"app\"\n[service.app]\nupstream = \"{upstream}\"\n"
    ))
    .await
}

/// An idle HTTP/2 connection is closed at `idle_timeout`, not before, on
/// tokio's paused clock: the test takes no wall-clock time and needs no
/// margin for a slow host.
#[tokio::test(start_paused = true)]
async fn idle_h2_connection_closes_at_the_idle_timeout() {
    let upstream = start_upstream("idle").await;
    let proxy = paused_proxy(upstream.addr, "idle_timeout = \"30s\"").await;
    let tls = tls_connect(proxy.https(), "localhost", &[b"h2"]).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    let mut conn = tokio::spawn(conn);
    let url = format!("https://localhost:{}/", proxy.https().port());
    let response = sender
        .send_request(request("GET", &url, "localhost", Bytes::new()))
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let last_request = tokio::time::Instant::now();

    let early = tokio::time::timeout(Duration::from_secs(29), &mut conn).await;
    assert!(early.is_err(), "closed before the idle timeout: {early:?}");
    tokio::time::timeout(Duration::from_secs(2), conn)
        .await
        .expect("closed at the idle timeout")
        .expect("join")
        .expect("closed cleanly (GOAWAY), not reset");
    let idle = last_request.elapsed();
    assert!(
        idle >= Duration::from_secs(30) && idle < Duration::from_secs(31),
        "{idle:?}"
    );
    proxy.stop().await.expect("stop");
}

/// An idle HTTP/1.1 keep-alive connection is closed when hyper's
/// `header_read_timeout` (waiting for the next request head) runs out,
/// and not before, on the paused clock.
#[tokio::test(start_paused = true)]
async fn idle_h1_keep_alive_closes_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = start_upstream("idle").await;
    let proxy = paused_proxy(
        upstream.addr,
        "header_read_timeout = \"10s\"\nidle_timeout = \"60s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.http_addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let response = read_response(&mut stream).await;
    assert_eq!(raw_status(&response), 200, "{response}");
    let answered = tokio::time::Instant::now();

    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(9), stream.read(&mut byte)).await;
    assert!(early.is_err(), "closed before the timeout: {early:?}");
    // Read to the end (hyper may say 408 first): the connection closes.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
        .await
        .expect("closed at the header read timeout");
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_secs(10) && idle < Duration::from_secs(11),
        "{idle:?}"
    );
    proxy.stop().await.expect("stop");
}
