//! Forwarding: plain HTTP/1.1 proxying, X-Forwarded-* / Via rules,
//! hop-by-hop stripping in both directions, h2c refusal, WebSocket tunnels,
//! and the upstream failure statuses (502/503/504, ambiguous framing).

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One site, `app.localhost`, forwarding everything to `upstream`.
fn app_config(upstream: SocketAddr, server_extra: &str) -> String {
    format!(
        r#"
[server]
{server_extra}

{TLS_LOCALHOST}

[[site]]
hosts = ["app.localhost"]
service = "app"

[service.app]
upstream = "{upstream}"
"#
    )
}

#[tokio::test]
async fn plain_h1_get_and_post_pass_through() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;

    let get = http_get(proxy.http_addr, "app.localhost", "/status/201").await;
    assert_eq!(get.status, 201);
    assert_eq!(get.text(), "status 201");
    assert_eq!(get.header("x-upstream"), Some("app"));

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let post = http_request(
        proxy.http_addr,
        request("POST", "/echo?x=1", "app.localhost", payload.clone()),
    )
    .await;
    assert_eq!(post.status, 200);
    assert_eq!(post.body.as_ref(), &payload[..], "echoed body differs");

    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].method, "POST");
    assert_eq!(
        seen[1].uri, "/echo?x=1",
        "origin-form target reaches upstream"
    );
    assert_eq!(seen[1].version, hyper::Version::HTTP_11);
    assert_eq!(seen[1].body.as_deref(), Some(&payload[..]));
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn forwarding_headers_for_untrusted_client_over_http() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;

    let mut req = request("GET", "/headers", "App.Localhost:1234", Bytes::new());
    let h = req.headers_mut();
    h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    h.insert("x-real-ip", "6.6.6.6".parse().unwrap());
    h.insert("x-forwarded-proto", "https".parse().unwrap());
    h.insert("x-forwarded-host", "evil.example".parse().unwrap());
    h.insert("forwarded", "for=203.0.113.7;proto=https".parse().unwrap());
    h.append("forwarded", "for=6.6.6.6".parse().unwrap());
    let resp = http_request(proxy.http_addr, req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("via"), Some("1.1 cutover"), "Via on response");

    let seen = upstream.single();
    let hdr = |name: &str| {
        let all: Vec<_> = seen.headers.get_all(name).iter().collect();
        assert!(all.len() <= 1, "{name} sent more than once: {all:?}");
        all.first().map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        hdr("host").as_deref(),
        Some("App.Localhost:1234"),
        "Host kept verbatim"
    );
    assert_eq!(
        hdr("x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "forged XFF replaced"
    );
    assert_eq!(hdr("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(hdr("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        hdr("x-forwarded-host").as_deref(),
        Some("App.Localhost:1234")
    );
    assert_eq!(
        hdr("forwarded").as_deref(),
        Some("for=127.0.0.1;proto=http;host=\"App.Localhost:1234\""),
        "forged Forwarded (RFC 7239) replaced"
    );
    assert_eq!(hdr("via").as_deref(), Some("1.1 cutover"));
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn forwarded_names_an_ipv6_client_in_quotes() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy_on(&app_config(upstream.addr, ""), "::1").await;
    let mut req = request("GET", "/v6", "app.localhost", Bytes::new());
    req.headers_mut()
        .insert("forwarded", "for=203.0.113.7".parse().unwrap());
    let resp = https_h1(proxy.https(), "app.localhost", req).await;
    assert_eq!(resp.status, 200);
    let seen = upstream.single();
    let forwarded: Vec<_> = seen.headers.get_all("forwarded").iter().collect();
    assert_eq!(
        forwarded,
        ["for=\"[::1]\";proto=https;host=app.localhost"],
        "RFC 7239 §6: an IPv6 node is bracketed and quoted"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "::1");
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn forwarding_headers_over_https() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let mut req = request("GET", "/tls", "app.localhost", Bytes::new());
    req.headers_mut()
        .insert("x-forwarded-proto", "http".parse().unwrap());
    let resp = https_h1(proxy.https(), "app.localhost", req).await;
    assert_eq!(resp.status, 200);
    let seen = upstream.single();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["host"], "app.localhost");
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn trusted_proxy_forwarding_headers_are_extended() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(
        upstream.addr,
        r#"trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]"#,
    ))
    .await;
    let mut req = request("GET", "/trusted", "app.localhost", Bytes::new());
    let h = req.headers_mut();
    h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
    h.insert("via", "1.1 lb".parse().unwrap());
    h.insert(
        "forwarded",
        "for=1.2.3.4;proto=https;host=app.localhost"
            .parse()
            .unwrap(),
    );
    let resp = http_request(proxy.http_addr, req).await;
    assert_eq!(resp.status, 200);
    let seen = upstream.single();
    assert_eq!(seen.headers["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
    let forwarded: Vec<_> = seen.headers.get_all("forwarded").iter().collect();
    assert_eq!(
        forwarded,
        ["for=1.2.3.4;proto=https;host=app.localhost, for=127.0.0.1;proto=http;host=app.localhost"],
        "a trusted proxy's Forwarded is kept and ours appended"
    );
    assert_eq!(seen.headers["via"], "1.1 lb, 1.1 cutover");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_stripped() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let raw = raw_exchange(
        proxy.http_addr,
        b"GET /hop HTTP/1.1\r\n\
          Host: app.localhost\r\n\
          Connection: X-Foo, keep-alive\r\n\
          X-Foo: secret\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
          TE: trailers\r\n\
          Trailer: X-Checksum\r\n\
          X-Kept: yes\r\n\
          \r\n",
    )
    .await;
    assert_eq!(raw_status(&raw), 200, "{raw}");
    let seen = upstream.single();
    for name in [
        "x-foo",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
    ] {
        assert!(
            !seen.headers.contains_key(name),
            "{name} reached the upstream: {:?}",
            seen.headers
        );
    }
    if let Some(connection) = seen.headers.get("connection") {
        let connection = connection.to_str().unwrap().to_ascii_lowercase();
        assert!(
            !connection.contains("x-foo"),
            "Connection forwarded: {connection}"
        );
    }
    assert_eq!(seen.headers["x-kept"], "yes");
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_stripped() {
    let upstream = start_raw_upstream(Some(
        b"HTTP/1.1 200 OK\r\n\
          Connection: X-Bar\r\n\
          X-Bar: secret\r\n\
          Keep-Alive: timeout=5, max=100\r\n\
          Proxy-Connection: keep-alive\r\n\
          Proxy-Authenticate: Basic\r\n\
          Trailer: X-Checksum\r\n\
          Upgrade: h2c\r\n\
          X-Kept: yes\r\n\
          Content-Length: 2\r\n\
          \r\n\
          ok",
    ))
    .await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let resp = http_get(proxy.http_addr, "app.localhost", "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "ok");
    for name in [
        "x-bar",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !resp.headers.contains_key(name),
            "{name} reached the client: {:?}",
            resp.headers
        );
    }
    if let Some(connection) = resp.header("connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-bar"),
            "{connection}"
        );
    }
    assert_eq!(resp.header("x-kept"), Some("yes"));
    assert_eq!(resp.header("via"), Some("1.1 cutover"));
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn h2c_upgrade_request_is_forwarded_as_plain_http1() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let raw = raw_exchange(
        proxy.http_addr,
        b"GET /h2c HTTP/1.1\r\n\
          Host: app.localhost\r\n\
          Connection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\
          \r\n",
    )
    .await;
    assert_eq!(raw_status(&raw), 200, "expected a normal response: {raw}");
    assert!(!raw_has_header(&raw, "upgrade"), "{raw}");
    let seen = upstream.single();
    assert_eq!(seen.uri, "/h2c");
    assert!(!seen.headers.contains_key("upgrade"), "{:?}", seen.headers);
    assert!(
        !seen.headers.contains_key("http2-settings"),
        "{:?}",
        seen.headers
    );
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn h2_prior_knowledge_on_plain_port_is_refused() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let stream = TcpStream::connect(proxy.http_addr).await.unwrap();
    let req = request(
        "GET",
        "http://app.localhost/prior",
        "app.localhost",
        Bytes::new(),
    );
    let result = tokio::time::timeout(IO_TIMEOUT, send_h2(stream, req))
        .await
        .expect("h2 attempt should fail promptly, not hang");
    assert!(
        result.is_err(),
        "plain listener served HTTP/2 prior knowledge (h2c): {:?}",
        result.map(|r| r.status)
    );
    assert_eq!(upstream.count(), 0, "h2c request reached the upstream");

    // And the listener still speaks HTTP/1.1.
    let ok = http_get(proxy.http_addr, "app.localhost", "/after").await;
    assert_eq!(ok.status, 200);
    proxy.stop().await.expect("clean stop");
}

async fn ws_echo_round_trip<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for text in ["hello", "second message"] {
        ws.send(Message::text(text)).await.expect("send");
        let echoed = tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .expect("echo timed out")
            .expect("stream ended")
            .expect("ws error");
        assert_eq!(echoed, Message::text(text));
    }
    ws.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    let echoed = tokio::time::timeout(IO_TIMEOUT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::binary(vec![1u8, 2, 3]));

    ws.close(None).await.expect("close");
    // The server's close reply arrives, then the stream ends.
    let mut saw_close = false;
    loop {
        match tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .expect("close timed out")
        {
            Some(Ok(Message::Close(_))) => saw_close = true,
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) | None => break,
            Some(Err(err)) => panic!("unclean close: {err}"),
        }
    }
    assert!(saw_close, "server never answered the close frame");
}

#[tokio::test]
async fn websocket_echo_over_plain_http() {
    let (ws_addr, accepted) = start_ws_upstream().await;
    let proxy = start_proxy(&app_config(ws_addr, "")).await;
    let tcp = TcpStream::connect(proxy.http_addr).await.unwrap();
    let (ws, response) = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_tungstenite::client_async("ws://app.localhost/ws", tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed");
    assert_eq!(response.status(), 101);
    assert_eq!(*accepted.lock().unwrap(), 1);
    ws_echo_round_trip(ws).await;
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn websocket_echo_over_tls() {
    let (ws_addr, accepted) = start_ws_upstream().await;
    let proxy = start_proxy(&app_config(ws_addr, "")).await;
    let tls = tls_connect(proxy.https(), "app.localhost", &[b"http/1.1"]).await;
    let (ws, response) = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_tungstenite::client_async("wss://app.localhost/ws", tls),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed");
    assert_eq!(response.status(), 101);
    assert_eq!(*accepted.lock().unwrap(), 1);
    ws_echo_round_trip(ws).await;
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn upstream_failures_map_to_502_503_504() {
    let closed = closed_port().await;
    let hang = start_raw_upstream(None).await;
    let dup_cl = start_raw_upstream(Some(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nEVIL!!",
    ))
    .await;
    let cl_te = start_raw_upstream(Some(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nEVIL!\r\n0\r\n\r\n",
    ))
    .await;
    let config = format!(
        r#"
[server.limits]
upstream_timeout = "300ms"

[[site]]
hosts = ["app.localhost"]
[[site.route]]
path = "/closed"
service = "closed"
[[site.route]]
path = "/none"
service = "none"
[[site.route]]
path = "/hang"
service = "hang"
[[site.route]]
path = "/dupcl"
service = "dupcl"
[[site.route]]
path = "/clte"
service = "clte"

[service.closed]
upstream = "{closed}"
[service.none]
[service.hang]
upstream = "{}"
[service.dupcl]
upstream = "{}"
[service.clte]
upstream = "{}"
"#,
        hang.addr, dup_cl.addr, cl_te.addr
    );
    let proxy = start_proxy(&config).await;

    let resp = http_get(proxy.http_addr, "app.localhost", "/closed").await;
    assert_eq!(resp.status, 502, "closed port: {}", resp.text());

    let resp = http_get(proxy.http_addr, "app.localhost", "/none").await;
    assert_eq!(resp.status, 503, "no upstream: {}", resp.text());

    let resp = http_get(proxy.http_addr, "app.localhost", "/hang").await;
    assert_eq!(resp.status, 504, "hanging upstream: {}", resp.text());
    assert_eq!(hang.count(), 1, "the hanging upstream got the request");

    for (path, upstream) in [("/dupcl", &dup_cl), ("/clte", &cl_te)] {
        let resp = http_get(proxy.http_addr, "app.localhost", path).await;
        assert_eq!(
            resp.status,
            502,
            "{path}: ambiguous framing was relayed: {:?} {:?}",
            resp.headers,
            resp.text()
        );
        assert!(!resp.text().contains("EVIL"), "{path}: bad body relayed");
        assert_eq!(upstream.count(), 1, "{path}: upstream was asked");
    }
    proxy.stop().await.expect("clean stop");
}

/// An OPTIONS request with the given `Max-Forwards` fields.
fn options_with_max_forwards(values: &[&str]) -> hyper::Request<http_body_util::Full<Bytes>> {
    let mut req = request("OPTIONS", "/opt", "app.localhost", Bytes::new());
    for value in values {
        req.headers_mut()
            .append("max-forwards", value.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn options_with_max_forwards_zero_is_answered_by_cutover() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let resp = http_request(proxy.http_addr, options_with_max_forwards(&["0"])).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("allow"),
        Some("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS")
    );
    assert_eq!(resp.header("content-length"), Some("0"));
    assert_eq!(resp.header("x-upstream"), None);
    // Over HTTP/2 too.
    let mut req = options_with_max_forwards(&["0"]);
    *req.uri_mut() = "https://app.localhost/opt".parse().unwrap();
    let resp = https_h2(proxy.https(), "app.localhost", req).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), Some("0"));
    assert_eq!(upstream.count(), 0, "Max-Forwards: 0 was forwarded");
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn max_forwards_is_decremented_on_options_and_left_alone_elsewhere() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    let resp = http_request(proxy.http_addr, options_with_max_forwards(&["5"])).await;
    assert_eq!(resp.header("x-upstream"), Some("app"));
    let mut get = request("GET", "/get", "app.localhost", Bytes::new());
    get.headers_mut()
        .insert("max-forwards", "0".parse().unwrap());
    let resp = http_request(proxy.http_addr, get).await;
    assert_eq!(resp.header("x-upstream"), Some("app"));
    let seen = upstream.requests();
    assert_eq!(seen[0].method, "OPTIONS");
    assert_eq!(seen[0].headers["max-forwards"], "4");
    assert_eq!(
        seen[1].headers["max-forwards"], "0",
        "GET: passed unchanged"
    );
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn invalid_max_forwards_on_options_is_refused() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&app_config(upstream.addr, "")).await;
    for values in [&["abc"][..], &["-1"], &["1.5"], &["2", "3"]] {
        let resp = http_request(proxy.http_addr, options_with_max_forwards(values)).await;
        assert_eq!(resp.status, 400, "Max-Forwards {values:?}");
    }
    assert_eq!(upstream.count(), 0);
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn trace_is_refused_and_never_forwarded() {
    let upstream = start_upstream("app").await;
    let config = format!(
        "{}\n[[site.route]]\npath = \"/file\"\nfile = \"certs-dev/ca.pem\"\n",
        app_config(upstream.addr, "")
    );
    let proxy = start_proxy(&config).await;
    for max_forwards in [None, Some("0"), Some("3")] {
        let mut req = request("TRACE", "/trace", "app.localhost", Bytes::new());
        if let Some(value) = max_forwards {
            req.headers_mut()
                .insert("max-forwards", value.parse().unwrap());
        }
        let resp = http_request(proxy.http_addr, req).await;
        assert_eq!(resp.status, 405, "Max-Forwards {max_forwards:?}");
        assert_eq!(
            resp.header("allow"),
            Some("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS")
        );
    }
    let resp = http_request(
        proxy.http_addr,
        request("TRACE", "/file", "app.localhost", Bytes::new()),
    )
    .await;
    assert_eq!(
        (resp.status.as_u16(), resp.header("allow")),
        (405, Some("GET, HEAD"))
    );
    assert_eq!(upstream.count(), 0, "TRACE reached the upstream");
    proxy.stop().await.expect("clean stop");
}
