//! The blue/green switch through the public API and the admin socket:
//! no request lost under keep-alive load (h1 and h2), in-flight requests
//! finish on the old upstream while the same connection's next request goes
//! to the new one, drain completion and timeout, WebSocket grace then close,
//! pause/resume, and restart from the state file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use cutover::admin::proto::{Report, StatusReport, SwitchReport};
use cutover::admin::Command;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A proxy with an admin socket and state dir in `dir`, one catch-all site
/// routed to service `web` on `upstream`.
fn config_text(dir: &Path, upstream: std::net::SocketAddr, service_extra: &str) -> String {
    format!(
        r#"
[server]
admin_socket = "{dir}/admin.sock"
state_dir = "{dir}/state"
{TLS_LOCALHOST}
[[site]]
hosts = ["*"]
service = "web"

[service.web]
upstream = "{upstream}"
{service_extra}
"#,
        dir = dir.display(),
    )
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

/// Sends an admin command, collecting progress steps. The socket is bound
/// before `run` (see `run_proxy`), so there is nothing to wait for.
async fn admin(dir: &Path, command: Command) -> (Result<Report, String>, Vec<String>) {
    let mut steps = Vec::new();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        cutover::admin::call(&socket(dir), &command, |step, message| {
            steps.push(format!("{step}: {message}"));
        }),
    )
    .await
    .expect("admin call timed out");
    (result.map_err(|e| e.to_string()), steps)
}

/// The report of a switch.
fn switched(report: Report) -> SwitchReport {
    report
        .clone()
        .into_switch()
        .unwrap_or_else(|| panic!("not a switch report: {report:?}"))
}

/// The report of a status.
fn status_of(report: Report) -> StatusReport {
    report
        .clone()
        .into_status()
        .unwrap_or_else(|| panic!("not a status report: {report:?}"))
}

fn switch(service: &str, to: std::net::SocketAddr) -> Command {
    Command::Switch {
        service: service.into(),
        to: to.to_string(),
        force: false,
    }
}

/// Which recording upstream answered.
fn served_by(resp: &Resp) -> String {
    resp.header("x-upstream").unwrap_or("none").to_string()
}

/// A keep-alive HTTP/1.1 connection that sends requests one after another.
struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
}

impl KeepAlive {
    async fn connect(addr: std::net::SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        KeepAlive { sender }
    }

    async fn get(&mut self, path: &str) -> Result<Resp, String> {
        use http_body_util::BodyExt;
        let req = request("GET", path, "localhost", Bytes::new());
        let response = tokio::time::timeout(IO_TIMEOUT, self.sender.send_request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_under_keepalive_load_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blue = start_upstream("blue").await;
    let green = start_upstream("green").await;
    let health = "health = { path = \"/health\" }";
    let proxy = start_proxy(&config_text(dir.path(), blue.addr, health)).await;
    let http = proxy.http_addr;
    let https = proxy.https();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    // 8 HTTP/1.1 keep-alive connections, each sending requests back to back.
    for _ in 0..8 {
        let (stop, failures, ok) = (stop.clone(), failures.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = KeepAlive::connect(http).await;
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match conn.get("/").await {
                    Ok(resp) if resp.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(resp) => {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("h1 status {}", resp.status));
                        0
                    }
                    Err(err) => {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("h1 error {err}"));
                        return;
                    }
                };
            }
        }));
    }
    // One HTTP/2 connection over TLS with 8 concurrent streams.
    let tls = tls_connect(https, "localhost", &[b"h2"]).await;
    let (h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    for _ in 0..8 {
        let (stop, failures, ok) = (stop.clone(), failures.clone(), ok.clone());
        let mut h2 = h2.clone();
        clients.push(tokio::spawn(async move {
            use http_body_util::BodyExt;
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = request(
                    "GET",
                    &format!("https://localhost:{}/", https.port()),
                    "localhost",
                    Bytes::new(),
                );
                let result = async {
                    let resp = h2.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    resp.into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(status)
                };
                match tokio::time::timeout(IO_TIMEOUT, result).await {
                    Ok(Ok(status)) if status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(status)) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("h2 status {status}")),
                    Ok(Err(err)) => {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("h2 error {err}"));
                        return;
                    }
                    Err(_) => {
                        failures.lock().expect("lock").push("h2 timeout".into());
                        return;
                    }
                }
            }
        }));
    }

    // Flip six times while the load runs.
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let target = if round % 2 == 0 {
            green.addr
        } else {
            blue.addr
        };
        let (result, steps) = admin(dir.path(), switch("web", target)).await;
        let result = result.unwrap_or_else(|e| panic!("switch {round} failed: {e}\n{steps:#?}"));
        assert_eq!(switched(result).upstream, target.to_string());
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("client finished")
            .expect("client task");
    }
    let failures = failures.lock().expect("lock").clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let total = ok.load(Ordering::Relaxed);
    assert!(total > 100, "only {total} requests completed");
    let load_requests = |upstream: &Upstream| {
        upstream
            .requests()
            .iter()
            .filter(|r| r.uri.path() == "/")
            .count()
    };
    let (on_blue, on_green) = (load_requests(&blue), load_requests(&green));
    assert!(
        on_blue > 0 && on_green > 0,
        "both colours served: {on_blue} / {on_green}"
    );
    assert_eq!(
        on_blue + on_green,
        total,
        "every request reached exactly one upstream"
    );
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn inflight_request_finishes_on_old_upstream_and_next_goes_to_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blue = start_upstream("blue").await;
    let green = start_upstream("green").await;
    let proxy = start_proxy(&config_text(dir.path(), blue.addr, "")).await;
    let mut conn = KeepAlive::connect(proxy.http_addr).await;
    assert_eq!(served_by(&conn.get("/").await.expect("first")), "blue");

    let slow = tokio::spawn(async move {
        let resp = conn.get("/slow?ms=1200").await.expect("slow request");
        (conn, resp)
    });
    blue.wait_for(2).await; // the slow request reached blue
    let (result, steps) = admin(dir.path(), switch("web", green.addr)).await;
    let result = switched(result.expect("switch"));
    let (mut conn, slow_resp) = slow.await.expect("join");
    assert_eq!(slow_resp.status, 200);
    assert_eq!(
        served_by(&slow_resp),
        "blue",
        "in-flight request finished on the old upstream"
    );
    let drain = result.drain.expect("blue was drained");
    assert!(drain.drained, "{steps:#?}");
    assert!(
        drain.drain_ms >= 500,
        "the drain waited for the slow request: {result:?}"
    );
    assert!(
        steps.iter().any(|s| s.starts_with("drain: draining blue")),
        "{steps:#?}"
    );
    // Same client connection, next request: the new colour.
    let next = conn.get("/").await.expect("next on same connection");
    assert_eq!(served_by(&next), "green");
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn drain_times_out_and_the_request_still_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blue = start_upstream("blue").await;
    let green = start_upstream("green").await;
    let proxy = start_proxy(&config_text(
        dir.path(),
        blue.addr,
        "drain_timeout = \"300ms\"",
    ))
    .await;
    let http = proxy.http_addr;
    let slow = tokio::spawn(async move { http_get(http, "localhost", "/slow?ms=2000").await });
    blue.wait_for(1).await;
    let (result, _) = admin(dir.path(), switch("web", green.addr)).await;
    let result = switched(result.expect("switch"));
    let drain = result.drain.expect("blue was drained");
    assert!(!drain.drained, "{result:?}");
    assert_eq!(drain.still_in_flight, 1, "{result:?}");
    let slow = slow.await.expect("join");
    assert_eq!(
        (slow.status.as_u16(), served_by(&slow).as_str()),
        (200, "blue")
    );
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn unhealthy_target_is_refused_and_traffic_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blue = start_upstream("blue").await;
    let dead = closed_port().await;
    let extra = "health = { path = \"/\", interval = \"50ms\", deadline = \"400ms\" }";
    let proxy = start_proxy(&config_text(dir.path(), blue.addr, extra)).await;
    let (result, _) = admin(dir.path(), switch("web", dead)).await;
    let err = result.expect_err("unhealthy target must be refused");
    assert!(
        err.contains("not healthy") && err.contains("not switched"),
        "{err}"
    );
    let resp = http_get(proxy.http_addr, "localhost", "/").await;
    assert_eq!(served_by(&resp), "blue");
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn websocket_gets_grace_then_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ws_upstream, _) = start_ws_upstream().await;
    let green = start_upstream("green").await;
    // The WebSocket upstream cannot answer health probes; the first
    // colour is the config's, so no probe runs for it.
    let proxy = start_proxy(&config_text(
        dir.path(),
        ws_upstream,
        "websocket_grace = \"700ms\"",
    ))
    .await;
    let url = format!("ws://localhost:{}/socket", proxy.http_addr.port());
    let (mut ws, _) = tokio::time::timeout(IO_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .expect("ws connect timed out")
        .expect("ws connect");
    ws.send(Message::text("before")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("echo"),
        Message::text("before")
    );

    // The switch reports each step as it happens: once it says it gives
    // the WebSocket its grace, the grace period has begun.
    let (steps_tx, mut steps_rx) = tokio::sync::mpsc::unbounded_channel();
    let socket_path = socket(dir.path());
    let command = switch("web", green.addr);
    let switching = tokio::spawn(async move {
        let mut steps = Vec::new();
        let result = cutover::admin::call(&socket_path, &command, |step, message| {
            let _ = steps_tx.send(step.to_string());
            steps.push(format!("{step}: {message}"));
        })
        .await
        .map_err(|e| e.to_string());
        (result, steps)
    });
    tokio::time::timeout(IO_TIMEOUT, async {
        while let Some(step) = steps_rx.recv().await {
            if step == "websockets" {
                return;
            }
        }
        panic!("the switch ended without a websockets step");
    })
    .await
    .expect("the switch reached the WebSocket grace period");
    assert!(
        !switching.is_finished(),
        "the switch waits out the grace period"
    );
    ws.send(Message::text("during grace"))
        .await
        .expect("send during grace");
    assert_eq!(
        ws.next().await.expect("echo").expect("echo"),
        Message::text("during grace")
    );

    let (result, steps) = switching.await.expect("join");
    let result = switched(result.expect("switch"));
    let drain = result.drain.expect("blue was drained");
    assert_eq!(drain.websockets_at_switch, 1, "{result:?}");
    assert!(
        steps.iter().any(|s| s.contains("closed 1 WebSocket")),
        "{steps:#?}"
    );
    // The tunnel is gone: the next read ends (EOF or error), bounded.
    let next = tokio::time::timeout(IO_TIMEOUT, ws.next())
        .await
        .expect("closed in time");
    assert!(
        !matches!(next, Some(Ok(Message::Text(_)))),
        "tunnel should be closed, got {next:?}"
    );
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn pause_holds_requests_until_resume_and_times_out_to_503() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blue = start_upstream("blue").await;
    let proxy = start_proxy(&config_text(
        dir.path(),
        blue.addr,
        "pause_timeout = \"5s\"",
    ))
    .await;
    let (paused, _) = admin(
        dir.path(),
        Command::Pause {
            service: "web".into(),
        },
    )
    .await;
    paused.expect("pause");
    let (again, _) = admin(
        dir.path(),
        Command::Pause {
            service: "web".into(),
        },
    )
    .await;
    assert!(again.expect_err("double pause").contains("already paused"));

    let http = proxy.http_addr;
    let (sent, request_sent) = tokio::sync::oneshot::channel();
    let held = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(http).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("send the request");
        let _ = sent.send(());
        read_response(&mut stream).await
    });
    tokio::time::timeout(IO_TIMEOUT, request_sent)
        .await
        .expect("the request was sent")
        .expect("signal");
    // Sent, so now being held: it stays held (not answered) for a while.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "request is held while paused");
    assert_eq!(blue.count(), 0, "nothing reached the upstream while paused");
    let (resumed, _) = admin(
        dir.path(),
        Command::Resume {
            service: "web".into(),
        },
    )
    .await;
    resumed.expect("resume");
    let resp = tokio::time::timeout(IO_TIMEOUT, held)
        .await
        .expect("released")
        .expect("join");
    assert_eq!(raw_status(&resp), 200, "{resp}");
    proxy.stop().await.expect("stop");

    // With a short pause_timeout, a held request gets 503.
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = start_proxy(&config_text(
        dir.path(),
        blue.addr,
        "pause_timeout = \"200ms\"",
    ))
    .await;
    admin(
        dir.path(),
        Command::Pause {
            service: "web".into(),
        },
    )
    .await
    .0
    .expect("pause");
    let resp = http_get(proxy.http_addr, "localhost", "/").await;
    assert_eq!(resp.status, 503);
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn restart_resumes_the_active_colour_from_the_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blue = start_upstream("blue").await;
    let green = start_upstream("green").await;
    let text = config_text(dir.path(), blue.addr, "");
    let proxy = start_proxy(&text).await;
    admin(dir.path(), switch("web", green.addr))
        .await
        .0
        .expect("switch");
    proxy.stop().await.expect("stop");
    assert!(
        !socket(dir.path()).exists(),
        "admin socket removed at shutdown"
    );

    let proxy = start_proxy(&text).await;
    let resp = http_get(proxy.http_addr, "localhost", "/").await;
    assert_eq!(
        served_by(&resp),
        "green",
        "restart kept the switched colour"
    );
    let (status, _) = admin(dir.path(), Command::Status { service: None }).await;
    let status = status_of(status.expect("status"));
    let active = status.services["web"].active.clone().expect("active");
    assert_eq!(active.color, "green", "{status:?}");
    assert_eq!(active.health.as_deref(), Some("healthy"), "{status:?}");
    // Status probes live: a dead active upstream shows as unhealthy.
    let dead = closed_port().await;
    let forced = Command::Switch {
        service: "web".into(),
        to: dead.to_string(),
        force: true,
    };
    admin(dir.path(), forced).await.0.expect("forced switch");
    let (status, _) = admin(dir.path(), Command::Status { service: None }).await;
    let status = status_of(status.expect("status"));
    let health = status.services["web"].active.clone().and_then(|a| a.health);
    assert!(
        health
            .as_deref()
            .is_some_and(|h| h.starts_with("unhealthy")),
        "{health:?}"
    );
    proxy.stop().await.expect("stop");
}

/// An HTTP/1.1 upstream that counts its open TCP connections.
async fn counting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let open = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&open);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

#[tokio::test]
async fn idle_pooled_connections_to_the_old_upstream_close_after_the_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_addr, old_open) = counting_upstream().await;
    let (new_addr, _) = counting_upstream().await;
    let proxy = start_proxy(&config_text(dir.path(), old_addr, "")).await;
    // Concurrent requests leave several pooled keep-alive connections.
    let requests = (0..4).map(|_| http_get(proxy.http_addr, "localhost", "/slow"));
    for resp in futures_util::future::join_all(requests).await {
        assert_eq!(resp.status, 200);
    }
    assert!(
        old_open.load(Ordering::SeqCst) >= 1,
        "the proxy pools connections to the old upstream"
    );

    admin(dir.path(), switch("web", new_addr))
        .await
        .0
        .expect("switch");
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    while old_open.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} pooled connection(s) to the old upstream still open after the drain",
            old_open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.stop().await.expect("stop");
}
