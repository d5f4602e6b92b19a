//! TLS: certificate selection by SNI, and proxying over HTTP/1.1 and HTTP/2
//! negotiated by ALPN.

mod common;

use bytes::Bytes;
use common::*;

fn two_cert_config(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
[[tls]]
cert = "certs-dev/localhost.pem"
key = "certs-dev/localhost-key.pem"

[[tls]]
cert = "certs-dev/example.pem"
key = "certs-dev/example-key.pem"

[[site]]
hosts = ["localhost", "app.localhost"]
service = "app"

[[site]]
hosts = ["example.test", "*.example.test"]
hsts = true
service = "app"

[service.app]
upstream = "{upstream}"
"#
    )
}

fn leaf_of(file: &str) -> Vec<u8> {
    load_certs(&cert_file(file))
        .into_iter()
        .next()
        .expect("leaf certificate")
        .as_ref()
        .to_vec()
}

#[tokio::test]
async fn sni_picks_the_matching_certificate() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&two_cert_config(upstream.addr)).await;
    let localhost_leaf = leaf_of("localhost.pem");
    let example_leaf = leaf_of("example.pem");
    assert_ne!(localhost_leaf, example_leaf);

    for (sni, expected) in [
        ("example.test", &example_leaf),
        ("www.example.test", &example_leaf),
        ("localhost", &localhost_leaf),
        ("app.localhost", &localhost_leaf),
    ] {
        let tls = tls_connect(proxy.https(), sni, &[b"http/1.1"]).await;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .expect("server sent certificates");
        assert_eq!(
            peer[0].as_ref(),
            &expected[..],
            "SNI {sni} got the wrong certificate"
        );
    }
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn h1_and_h2_over_tls_pass_status_and_body() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&two_cert_config(upstream.addr)).await;
    let https = proxy.https();
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();

    // HTTP/1.1 over TLS.
    let resp = https_h1(
        https,
        "localhost",
        request("GET", "/status/202", "localhost", Bytes::new()),
    )
    .await;
    assert_eq!(resp.status, 202);
    assert_eq!(resp.version, hyper::Version::HTTP_11);
    assert_eq!(resp.text(), "status 202");
    let resp = https_h1(
        https,
        "localhost",
        request("POST", "/echo", "localhost", payload.clone()),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.as_ref(), &payload[..]);

    // HTTP/2 over TLS: status, body, HSTS on the example.test site.
    let uri = format!("https://example.test:{}/status/203", https.port());
    let mut req = request("GET", &uri, "ignored", Bytes::new());
    req.headers_mut().remove("host");
    let resp = https_h2(https, "example.test", req).await;
    assert_eq!(resp.status, 203);
    assert_eq!(resp.version, hyper::Version::HTTP_2);
    assert_eq!(resp.text(), "status 203");
    assert_eq!(
        resp.header("strict-transport-security"),
        Some("max-age=31536000")
    );

    let uri = format!("https://example.test:{}/echo?h2=1", https.port());
    let mut req = request("POST", &uri, "ignored", payload.clone());
    req.headers_mut().remove("host");
    let resp = https_h2(https, "example.test", req).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.as_ref(), &payload[..], "h2 POST body");

    let seen = upstream.requests();
    assert_eq!(seen.len(), 4);
    assert_eq!(
        seen[1].body.as_deref(),
        Some(&payload[..]),
        "h1 POST reached upstream intact"
    );
    let h2_post = &seen[3];
    assert_eq!(h2_post.method, "POST");
    assert_eq!(h2_post.uri, "/echo?h2=1");
    assert_eq!(
        h2_post.version,
        hyper::Version::HTTP_11,
        "upstream leg is HTTP/1.1"
    );
    assert_eq!(
        h2_post.body.as_deref(),
        Some(&payload[..]),
        "h2 POST reached upstream intact"
    );
    assert_eq!(
        h2_post.headers["host"],
        format!("example.test:{}", https.port()),
        ":authority becomes Host"
    );
    assert_eq!(h2_post.headers["x-forwarded-proto"], "https");
    proxy.stop().await.expect("clean stop");
}
