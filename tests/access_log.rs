//! The JSON-lines access log (`[server] access_log = PATH`): one line per
//! request with the fields the docs list, for forwarded requests, local
//! answers and aborted uploads; paths escaped into valid JSON; every line
//! in the file once `run` has returned; a bad value refused with its line.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

/// Starts a proxy logging to `dir/access.log`, with one site for `app`
/// plus a redirect and a status route.
async fn proxy_logging_to(dir: &Path, upstream: std::net::SocketAddr) -> TestProxy {
    start_proxy(&format!(
        r#"
[server]
access_log = "{}"
[[site]]
hosts = ["app.test"]
service = "app"
[[site.route]]
path = "/old"
redirect = "/new"
[[site.route]]
path = "/gone"
status = 410
[service.app]
upstream = "{upstream}"
"#,
        dir.join("access.log").display()
    ))
    .await
}

/// Every line of the log, parsed (a line that is not JSON fails the test).
fn lines(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("access.log")).expect("read access.log");
    assert!(
        text.ends_with('\n') || text.is_empty(),
        "partial line: {text:?}"
    );
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"))
        })
        .collect()
}

fn line_for<'a>(lines: &'a [Value], path: &str) -> &'a Value {
    lines
        .iter()
        .find(|line| line["path"] == path)
        .unwrap_or_else(|| panic!("no line for {path}: {lines:#?}"))
}

/// `2026-12-04T14:00:00.123Z`
fn assert_rfc3339_ms(time: &Value) {
    let time = time.as_str().expect("time is a string");
    let bytes = time.as_bytes();
    assert_eq!(bytes.len(), 24, "{time}");
    assert!(
        time.ends_with('Z') && bytes[10] == b'T' && bytes[19] == b'.',
        "{time}"
    );
    let year: u32 = time[..4].parse().expect("year");
    assert!((2024..3000).contains(&year), "{time}");
}

#[tokio::test]
async fn forwarded_requests_log_service_color_upstream_and_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = proxy_logging_to(dir.path(), upstream.addr).await;

    let get = http_get(proxy.http_addr, "app.test", "/hello?q=1").await;
    assert_eq!(get.status, 200);
    let post = http_request(
        proxy.http_addr,
        request(
            "POST",
            "/echo",
            "app.test",
            bytes::Bytes::from_static(b"12345"),
        ),
    )
    .await;
    assert_eq!(post.status, 200);
    assert_eq!(post.body.as_ref(), b"12345");
    let not_found = http_get(proxy.http_addr, "app.test", "/status/503").await;
    assert_eq!(not_found.status, 503);
    // Stopped at once: the lines are in the file because `run` wrote them
    // before returning, not because a flush timer ran.
    proxy.stop().await.expect("clean stop");

    let lines = lines(dir.path());
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let get_line = line_for(&lines, "/hello");
    assert_rfc3339_ms(&get_line["time"]);
    assert_eq!(get_line["method"], "GET");
    assert_eq!(get_line["host"], "app.test");
    assert_eq!(get_line["status"], 200);
    assert_eq!(get_line["service"], "app");
    assert_eq!(get_line["color"], "blue");
    assert_eq!(get_line["upstream"], upstream.addr.to_string());
    assert_eq!(get_line["bytes_in"], 0);
    assert_eq!(get_line["bytes_out"], get.body.len() as u64);
    assert_eq!(get_line["completed"], true);
    let client = get_line["client"].as_str().expect("client");
    assert!(client.starts_with("127.0.0.1:"), "{client}");
    assert!(get_line["duration_ms"].as_f64().expect("duration") >= 0.0);

    let post_line = line_for(&lines, "/echo");
    assert_eq!(post_line["method"], "POST");
    assert_eq!(post_line["bytes_in"], 5);
    assert_eq!(post_line["bytes_out"], 5);

    let error_line = line_for(&lines, "/status/503");
    assert_eq!(error_line["status"], 503);
    assert_eq!(error_line["service"], "app");
}

#[tokio::test]
async fn local_answers_log_without_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = proxy_logging_to(dir.path(), upstream.addr).await;

    assert_eq!(
        http_get(proxy.http_addr, "app.test", "/old").await.status,
        301
    );
    assert_eq!(
        http_get(proxy.http_addr, "app.test", "/gone").await.status,
        410
    );
    let unknown = http_get(proxy.http_addr, "other.test", "/x").await;
    assert_eq!(unknown.status, 421);
    proxy.stop().await.expect("clean stop");

    let lines = lines(dir.path());
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for (path, status) in [("/old", 301), ("/gone", 410), ("/x", 421)] {
        let line = line_for(&lines, path);
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["upstream"], Value::Null, "{line}");
        assert_eq!(line["color"], Value::Null, "{line}");
        assert_eq!(line["service"], Value::Null, "{line}");
        assert_eq!(line["completed"], true, "{line}");
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn a_client_aborting_mid_body_is_logged_with_what_arrived() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Reads the request head, then waits: the body never completes.
    let upstream = start_raw_upstream(None).await;
    let proxy = proxy_logging_to(dir.path(), upstream.addr).await;

    let mut stream = tokio::net::TcpStream::connect(proxy.http_addr)
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .await
        .expect("write");
    // The upstream sees the request start; then the client goes away.
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    while upstream.count() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "not forwarded");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(stream);
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    while std::fs::read_to_string(dir.path().join("access.log"))
        .unwrap_or_default()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "no line logged");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy.stop().await.expect("clean stop");

    let lines = lines(dir.path());
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    assert_eq!(line["path"], "/upload");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["bytes_in"], 10, "{line}");
    assert_eq!(line["service"], "app");
    assert_eq!(line["upstream"], upstream.addr.to_string());
    let status = line["status"].as_u64().expect("status");
    assert!((400..500).contains(&status), "{line}");
}

/// Quotes, backslashes and UTF-8 reach the request path and round-trip
/// through the log. Control characters, DEL and bytes that are not UTF-8
/// are refused by hyper's parser (400) before a request exists, so they
/// never reach the log; the escaping of those is unit-tested in
/// `src/access_log.rs`. The file stays valid JSON lines either way.
#[tokio::test]
async fn paths_with_quotes_backslashes_and_utf8_stay_valid_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = proxy_logging_to(dir.path(), upstream.addr).await;

    let raw = |path: &[u8]| {
        let mut bytes = b"GET ".to_vec();
        bytes.extend_from_slice(path);
        bytes.extend_from_slice(b" HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
        bytes
    };
    let answer = raw_exchange(proxy.http_addr, &raw(b"/a\"b\\c/caf\xc3\xa9")).await;
    assert_eq!(raw_status(&answer), 200);
    for refused in [&b"/x\xffy"[..], b"/x\x01y", b"/x\x7fy"] {
        let answer = raw_exchange(proxy.http_addr, &raw(refused)).await;
        assert_eq!(raw_status(&answer), 400, "{refused:?}");
    }
    proxy.stop().await.expect("clean stop");

    let lines = lines(dir.path());
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["path"], "/a\"b\\c/caf\u{e9}", "{}", lines[0]);
}

#[tokio::test]
async fn every_line_of_a_burst_is_in_the_file_when_run_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let proxy = proxy_logging_to(dir.path(), upstream.addr).await;
    for i in 0..200 {
        let resp = http_get(proxy.http_addr, "app.test", &format!("/n/{i}")).await;
        assert_eq!(resp.status, 200);
    }
    proxy.stop().await.expect("clean stop");
    let lines = lines(dir.path());
    assert_eq!(lines.len(), 200);
    for i in 0..200 {
        line_for(&lines, &format!("/n/{i}"));
    }
}

#[test]
fn an_invalid_access_log_value_is_refused_with_its_line() {
    let text = "[server]\nworkers = 1\naccess_log = \"jsno\"\n";
    let err = cutover::Config::parse(text, "proxy.toml", root())
        .expect_err("a misspelt keyword is not a file name");
    let message = err.to_string();
    assert!(message.contains("proxy.toml:3:"), "{message}");
    assert!(message.contains("invalid access_log \"jsno\""), "{message}");
    for value in [
        "json",
        "off",
        "log",
        "./access.log",
        "/var/log/cutover/access.log",
    ] {
        let text = format!("[server]\naccess_log = \"{value}\"\n");
        cutover::Config::parse(&text, "proxy.toml", root())
            .unwrap_or_else(|err| panic!("{value}: {err}"));
    }
}

#[tokio::test]
async fn an_access_log_that_cannot_be_opened_stops_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = parse_config(&format!(
        "[server]\naccess_log = \"{}\"\n",
        dir.path().join("missing-dir/access.log").display()
    ));
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut proxy = run_proxy(http, None, config).await;
    let err = proxy.join().await.expect_err("start-up must fail");
    assert!(err.to_string().contains("cannot open access log"), "{err}");
}

/// logrotate's default (rename, then `cutover reload` in `postrotate`):
/// lines before the reload stay in the renamed file, lines after it go
/// to a new file at the configured path.
#[tokio::test]
async fn a_reload_reopens_the_file_after_a_rename() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("app").await;
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nadmin_socket = \"admin.sock\"\naccess_log = \"./access.log\"\n\
             [[site]]\nhosts = [\"*\"]\nservice = \"app\"\n\
             [service.app]\nupstream = \"{}\"\n",
            upstream.addr
        ),
    )
    .expect("write config");
    let config = cutover::Config::load(&path).unwrap_or_else(|err| panic!("config: {err}"));
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy = run_proxy(http, None, config).await;
    let socket = dir.path().join("admin.sock");
    wait_for_admin(&socket).await;

    assert_eq!(
        http_get(proxy.http_addr, "a.test", "/one").await.status,
        200
    );
    let log = dir.path().join("access.log");
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    while std::fs::read_to_string(&log).unwrap_or_default().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no line logged");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    std::fs::rename(&log, dir.path().join("access.log.1")).expect("rotate");
    admin_call(&socket, cutover::admin::Command::Reload {}, IO_TIMEOUT)
        .await
        .expect("reload");
    assert_eq!(
        http_get(proxy.http_addr, "a.test", "/two").await.status,
        200
    );
    proxy.stop().await.expect("clean stop");

    let rotated = std::fs::read_to_string(dir.path().join("access.log.1")).expect("rotated");
    let current = std::fs::read_to_string(&log).expect("reopened");
    assert!(
        rotated.contains("\"/one\"") && !rotated.contains("\"/two\""),
        "{rotated}"
    );
    assert!(
        current.contains("\"/two\"") && !current.contains("\"/one\""),
        "{current}"
    );
}
