//! The Prometheus endpoint (`[server] metrics`): a proxy run through the
//! public API answers requests of every status class on two colours, and
//! a scrape of its own listener shows the counts by site, service,
//! colour, method and class, the latency histogram, in-flight requests
//! going back to zero, open connections by listener and protocol, the
//! switch and its health checks, and the certificate's expiry; the output
//! passes `promtool check metrics` (Debian's `prometheus` package: the
//! test fails without it, it never skips). The endpoint is off by default
//! and `/metrics` on a proxy listener is only ever routed.

mod common;
/// The scrape helpers `tests/canary.rs` uses too (this file scrapes
/// through `common`, checking headers as well).
#[path = "support/metrics.rs"]
#[allow(dead_code)]
mod prom;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use cutover::admin::Command;
use prom::{promtool_check, sample};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// An address for the metrics endpoint: free now, bound by `run`.
fn metrics_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

fn config(metrics: SocketAddr, app: SocketAddr, down: SocketAddr, admin: &Path) -> String {
    format!(
        r#"[server]
metrics = "{metrics}"
admin_socket = "{admin}"
shutdown_timeout = "5s"
{TLS_LOCALHOST}
[[site]]
hosts = ["app.localhost", "localhost"]
service = "app"
[[site.route]]
path = "/down"
service = "down"

[service.app]
upstream = "{app}"
[service.app.health]
path = "/"
interval = "50ms"
healthy_after = 1
deadline = "500ms"

[service.down]
upstream = "{down}"
"#,
        admin = admin.display()
    )
}

/// One scrape of `GET path` on the metrics endpoint.
async fn scrape_path(metrics: SocketAddr, path: &str, accept: Option<&str>) -> Resp {
    let mut req = request("GET", path, "metrics", Bytes::new());
    if let Some(accept) = accept {
        req.headers_mut()
            .insert("accept", accept.parse().expect("header"));
    }
    http_request(metrics, req).await
}

/// The metrics in the Prometheus text format.
async fn scrape(metrics: SocketAddr) -> String {
    let resp = scrape_path(metrics, "/metrics", None).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    resp.text()
}

/// Scrapes until `name{labels}` equals `want` (bounded), and returns the
/// last scrape.
async fn wait_for_sample(
    metrics: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> String {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        let text = scrape(metrics).await;
        if sample(&text, name, labels) == Some(want) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} never became {want}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn requests(
    colour: &'static str,
    method: &'static str,
    class: &'static str,
) -> Vec<(&'static str, &'static str)> {
    vec![
        ("site", "app.localhost"),
        ("service", "app"),
        ("colour", colour),
        ("method", method),
        ("status_class", class),
    ]
}

#[tokio::test]
async fn scrape_counts_requests_connections_and_switches_and_passes_promtool() {
    let blue = start_upstream("blue").await;
    let green = start_upstream("green").await;
    let down = closed_port().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = dir.path().join("admin.sock");
    let metrics = metrics_addr();
    let proxy = start_proxy(&config(metrics, blue.addr, down, &admin)).await;
    let http = proxy.http_addr;

    // Every class on blue: 3 × 2xx, 2 × 4xx, one POST 5xx, one 502 from a
    // service whose upstream refuses connections.
    for _ in 0..3 {
        assert_eq!(http_get(http, "app.localhost", "/").await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(
            http_get(http, "app.localhost", "/status/404").await.status,
            404
        );
    }
    let post = request("POST", "/status/503", "app.localhost", "x");
    assert_eq!(http_request(http, post).await.status, 503);
    assert_eq!(http_get(http, "app.localhost", "/down/x").await.status, 502);

    let text = scrape(metrics).await;
    let count = |labels: &[(&str, &str)]| sample(&text, "cutover_http_requests_total", labels);
    assert_eq!(count(&requests("blue", "GET", "2xx")), Some(3.0), "{text}");
    assert_eq!(count(&requests("blue", "GET", "4xx")), Some(2.0), "{text}");
    assert_eq!(count(&requests("blue", "POST", "5xx")), Some(1.0), "{text}");
    assert_eq!(count(&requests("blue", "GET", "3xx")), None, "{text}");
    assert_eq!(
        count(&[
            ("service", "down"),
            ("colour", "blue"),
            ("status_class", "5xx")
        ]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "cutover_upstream_connect_errors_total",
            &[("service", "down")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "cutover_upstream_connect_errors_total",
            &[("service", "app")]
        ),
        Some(0.0),
        "{text}"
    );
    let blue_latency = [("service", "app"), ("colour", "blue")];
    assert_eq!(
        sample(
            &text,
            "cutover_http_request_duration_seconds_count",
            &blue_latency
        ),
        Some(6.0),
        "{text}"
    );
    let expiry = sample(&text, "cutover_certificate_expiry_timestamp_seconds", &[])
        .unwrap_or_else(|| panic!("no certificate expiry:\n{text}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry > now,
        "certificate expiry {expiry} is not in the future"
    );

    // In flight while a slow response runs, back to 0 once it ends.
    let slow = tokio::spawn(async move { http_get(http, "app.localhost", "/slow?ms=1500").await });
    blue.wait_for(7).await;
    wait_for_sample(
        metrics,
        "cutover_http_requests_in_flight",
        &blue_latency,
        1.0,
    )
    .await;
    assert_eq!(slow.await.expect("join").status, 200);
    wait_for_sample(
        metrics,
        "cutover_http_requests_in_flight",
        &blue_latency,
        0.0,
    )
    .await;

    // Connections: one keep-alive HTTP/1.1 on the plain listener, one
    // HTTP/2 over TLS; both gone once closed.
    let plain = [("listener", "http"), ("protocol", "http1")];
    let h2 = [("listener", "https"), ("protocol", "http2")];
    let stream = TcpStream::connect(http).await.expect("connect");
    let (mut keep_alive, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    let plain_conn = tokio::spawn(conn);
    let resp = keep_alive
        .send_request(request("GET", "/", "app.localhost", Bytes::new()))
        .await
        .expect("keep-alive request");
    assert_eq!(resp.status(), 200);
    let https = proxy.https();
    let tls = tls_connect(https, "localhost", &[b"h2"]).await;
    let (mut h2_sender, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    let h2_conn = tokio::spawn(h2_conn);
    let req = request(
        "GET",
        &format!("https://localhost:{}/", https.port()),
        "localhost",
        Bytes::new(),
    );
    assert_eq!(
        h2_sender
            .send_request(req)
            .await
            .expect("h2 request")
            .status(),
        200
    );
    wait_for_sample(metrics, "cutover_client_connections_open", &plain, 1.0).await;
    wait_for_sample(metrics, "cutover_client_connections_open", &h2, 1.0).await;
    drop(keep_alive);
    drop(h2_sender);
    let _ = plain_conn.await;
    let _ = h2_conn.await;
    wait_for_sample(metrics, "cutover_client_connections_open", &plain, 0.0).await;
    wait_for_sample(metrics, "cutover_client_connections_open", &h2, 0.0).await;

    // Switch to green: green counts from zero, blue's totals stay (its
    // upstream is retired, the counters must not go backwards).
    let switch = Command::Switch {
        service: "app".into(),
        to: green.addr.to_string(),
        force: false,
    };
    admin_call(&admin, switch, IO_TIMEOUT)
        .await
        .expect("switch");
    for _ in 0..2 {
        let resp = http_get(http, "app.localhost", "/").await;
        assert_eq!(resp.header("x-upstream"), Some("green"));
    }
    let text = scrape(metrics).await;
    let count = |labels: &[(&str, &str)]| sample(&text, "cutover_http_requests_total", labels);
    assert_eq!(count(&requests("green", "GET", "2xx")), Some(2.0), "{text}");
    // 3 + the slow one + one on each kept connection.
    assert_eq!(count(&requests("blue", "GET", "2xx")), Some(6.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "cutover_http_request_duration_seconds_count",
            &blue_latency
        ),
        Some(9.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "cutover_http_request_duration_seconds_count",
            &[("service", "app"), ("colour", "green")]
        ),
        Some(2.0),
        "{text}"
    );
    let switched = [("service", "app"), ("outcome", "ok")];
    assert_eq!(
        sample(&text, "cutover_switches_total", &switched),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "cutover_switch_duration_seconds_count", &switched),
        Some(1.0),
        "{text}"
    );
    let passed = sample(
        &text,
        "cutover_health_checks_total",
        &[("service", "app"), ("outcome", "pass")],
    );
    assert!(passed >= Some(1.0), "no passed health check:\n{text}");

    // A switch to an address nothing listens on fails its health gate.
    let switch = Command::Switch {
        service: "app".into(),
        to: down.to_string(),
        force: false,
    };
    admin_call(&admin, switch, IO_TIMEOUT)
        .await
        .expect_err("a switch to a closed port must fail");
    let text = scrape(metrics).await;
    let failed = [("service", "app"), ("outcome", "failed")];
    assert_eq!(
        sample(&text, "cutover_switches_total", &failed),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "cutover_switches_total", &switched),
        Some(1.0),
        "{text}"
    );
    let probes_failed = sample(
        &text,
        "cutover_health_checks_total",
        &[("service", "app"), ("outcome", "fail")],
    );
    assert!(
        probes_failed >= Some(1.0),
        "no failed health check:\n{text}"
    );

    promtool_check(&text);

    // OpenMetrics when asked for, as Prometheus does.
    let open = scrape_path(
        metrics,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert_eq!(open.status, 200);
    assert!(
        open.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        open.headers
    );
    let open_text = open.text();
    assert!(open_text.ends_with("# EOF\n"), "{open_text}");
    assert!(
        open_text.contains("# UNIT cutover_switch_duration_seconds seconds"),
        "{open_text}"
    );
    assert!(
        open_text.contains("cutover_http_requests_total{site=\"app.localhost\""),
        "{open_text}"
    );

    // Nothing else is served there; `/metrics` on the proxy is routed.
    assert_eq!(scrape_path(metrics, "/", None).await.status, 404);
    assert_eq!(scrape_path(metrics, "/metricsx", None).await.status, 404);
    let routed = http_get(http, "app.localhost", "/metrics").await;
    assert_eq!(routed.header("x-upstream"), Some("green"));
    assert!(!routed.text().contains("cutover_"), "{}", routed.text());

    // Stopped with the server.
    proxy.stop().await.expect("clean shutdown");
    let mut refused = false;
    for _ in 0..100 {
        match TcpStream::connect(metrics).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(mut stream) => {
                let _ = stream.shutdown().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(refused, "the metrics endpoint still accepts after shutdown");
}

#[tokio::test]
async fn metrics_are_off_by_default_and_never_on_a_proxy_listener() {
    let app = start_upstream("app").await;
    let text = format!(
        r#"[[site]]
hosts = ["*"]
service = "app"

[service.app]
upstream = "{}"
"#,
        app.addr
    );
    assert_eq!(parse_config(&text).server.metrics, None);
    let proxy = start_proxy(&text).await;
    let resp = http_get(proxy.http_addr, "localhost", "/metrics").await;
    assert_eq!(resp.header("x-upstream"), Some("app"));
    assert_eq!(resp.text(), "app saw GET /metrics");
    assert_eq!(app.single().uri.path(), "/metrics");
    // The default scrape port has nothing of ours on it (when something
    // else listens there, it is not a cutover endpoint).
    if let Ok(mut stream) = TcpStream::connect("127.0.0.1:9100").await {
        let _ = stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let answer = read_response(&mut stream).await;
        assert!(!answer.contains("cutover_"), "{answer}");
    }
    proxy.stop().await.expect("clean shutdown");
}
