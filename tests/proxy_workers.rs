//! Thread-per-core workers (`workers = 2`): many keep-alive connections are
//! all served and spread over both worker threads (as `cutover status`
//! counts them), a graceful shutdown drains the requests in flight on every
//! worker, and a reload reaches connections already open on every worker.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use cutover::admin::proto::Report;
use cutover::admin::Command;
use cutover::WorkerStatus;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const WORKERS: usize = 2;

/// A config file in `dir`: two workers, an admin socket, `[service.app]` at
/// `upstream` for `app.localhost`, and a fixed-status route for every
/// other host.
fn write_config(dir: &Path, upstream: std::net::SocketAddr, status: u16) -> PathBuf {
    let path = dir.join("proxy.toml");
    let text = format!(
        r#"[server]
workers = {WORKERS}
admin_socket = "admin.sock"
shutdown_timeout = "10s"

[[site]]
hosts = ["app.localhost"]
service = "app"

[[site]]
hosts = ["*"]
[[site.route]]
path = "/"
status = {status}

[service.app]
upstream = "{upstream}"
"#
    );
    std::fs::write(&path, text).expect("write config");
    path
}

async fn start_from_file(path: &Path) -> TestProxy {
    init_tracing();
    let config = cutover::Config::load(path).unwrap_or_else(|e| panic!("config: {e}"));
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = run_proxy(http, None, config).await;
    wait_for_admin(&admin_socket(path)).await;
    proxy
}

fn admin_socket(config: &Path) -> PathBuf {
    config.parent().expect("config dir").join("admin.sock")
}

/// The `workers` of `cutover status`: one per worker thread.
async fn worker_report(config: &Path) -> Vec<WorkerStatus> {
    let status = admin_call(
        &admin_socket(config),
        Command::Status { service: None },
        IO_TIMEOUT,
    )
    .await
    .expect("status");
    let Report::Status(status) = status else {
        panic!("status answered with another report: {status:?}");
    };
    status.workers
}

/// Connections open on `worker` now.
fn open(worker: &WorkerStatus) -> u64 {
    worker.open as u64
}

/// Waits (bounded) until the workers count `open` connections in all, and
/// returns the report.
async fn wait_for_open(config: &Path, wanted: u64) -> Vec<WorkerStatus> {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        let report = worker_report(config).await;
        if report.iter().map(open).sum::<u64>() == wanted {
            return report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workers never counted {wanted} open connections: {report:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A keep-alive HTTP/1.1 client connection.
async fn connect(addr: std::net::SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// One request on an open connection, bounded in time.
async fn get(sender: &mut SendRequest<Full<Bytes>>, host: &str, path: &str) -> Resp {
    let req = request("GET", path, host, Bytes::new());
    let response = tokio::time::timeout(IO_TIMEOUT, async {
        sender.ready().await?;
        let response = sender.send_request(req).await?;
        let status = response.status();
        let version = response.version();
        let headers = response.headers().clone();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        Ok::<_, hyper::Error>(Resp {
            status,
            version,
            headers,
            body,
        })
    })
    .await
    .expect("request timed out");
    response.expect("request on a keep-alive connection failed")
}

#[tokio::test]
async fn keep_alive_connections_are_all_served_across_workers() {
    const CONNECTIONS: usize = 32;
    const REQUESTS: usize = 5;
    let upstream = start_upstream("app").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), upstream.addr, 204);
    let proxy = start_from_file(&path).await;
    let addr = proxy.http_addr;

    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            tokio::spawn(async move {
                let mut sender = connect(addr).await;
                for _ in 0..REQUESTS {
                    let resp = get(&mut sender, "app.localhost", "/hello").await;
                    assert_eq!(resp.status, 200);
                    assert_eq!(resp.header("x-upstream"), Some("app"));
                }
                sender
            })
        })
        .collect();
    let mut senders = Vec::new();
    for client in clients {
        senders.push(client.await.expect("client task"));
    }
    // (The upstream also sees the controller's health probes.)
    let proxied = upstream
        .requests()
        .iter()
        .filter(|r| r.uri.path() == "/hello")
        .count();
    assert_eq!(proxied, CONNECTIONS * REQUESTS);

    // Still open: every connection is counted on the worker serving it.
    let report = wait_for_open(&path, CONNECTIONS as u64).await;
    assert_eq!(report.len(), WORKERS, "{report:?}");
    let accepted: Vec<u64> = report.iter().map(|w| w.accepted).collect();
    assert_eq!(accepted.iter().sum::<u64>(), CONNECTIONS as u64);
    assert!(
        accepted.iter().all(|&n| n > 0),
        "a worker served no connection: {report:?}"
    );

    drop(senders);
    wait_for_open(&path, 0).await;
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests_on_every_worker() {
    const IN_FLIGHT: usize = 4;
    let upstream = start_upstream("app").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), upstream.addr, 204);
    let mut proxy = start_from_file(&path).await;
    let addr = proxy.http_addr;

    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|_| tokio::spawn(async move { http_get(addr, "app.localhost", "/slow?ms=800").await }))
        .collect();
    upstream.wait_for(IN_FLIGHT).await;
    let report = wait_for_open(&path, IN_FLIGHT as u64).await;
    assert!(
        report.iter().all(|w| open(w) > 0),
        "the in-flight requests are not on every worker: {report:?}"
    );

    proxy.trigger_shutdown();
    for request in requests {
        let resp = request.await.expect("client task");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "slow done");
    }
    let result = proxy.join().await;
    assert!(result.is_ok(), "run returned an error: {result:?}");
    let attempt = TcpStream::connect(addr).await;
    assert!(attempt.is_err(), "a connection was accepted after shutdown");
}

#[tokio::test]
async fn reload_reaches_open_connections_on_every_worker() {
    const CONNECTIONS: usize = 4;
    let upstream = start_upstream("app").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), upstream.addr, 204);
    let proxy = start_from_file(&path).await;

    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut sender = connect(proxy.http_addr).await;
        assert_eq!(get(&mut sender, "other.localhost", "/").await.status, 204);
        senders.push(sender);
    }
    let report = wait_for_open(&path, CONNECTIONS as u64).await;
    assert!(
        report.iter().all(|w| open(w) > 0),
        "the connections are not on every worker: {report:?}"
    );

    write_config(dir.path(), upstream.addr, 202);
    admin_call(&admin_socket(&path), Command::Reload {}, IO_TIMEOUT)
        .await
        .expect("reload");
    for sender in &mut senders {
        let resp = get(sender, "other.localhost", "/").await;
        assert_eq!(resp.status, 202, "a connection still sees the old config");
    }
    let report = worker_report(&path).await;
    let accepted: u64 = report.iter().map(|w| w.accepted).sum();
    assert_eq!(accepted, CONNECTIONS as u64, "a connection was reopened");

    drop(senders);
    proxy.stop().await.expect("stop");
}
