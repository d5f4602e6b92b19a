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

fn hsts_config(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
[[tls]]
cert = "certs-dev/localhost.pem"
key = "certs-dev/localhost-key.pem"

[[site]]
hosts = ["localhost"]
hsts = "max-age=63072000; includeSubDomains"
service = "app"

[[site]]
hosts = ["app.localhost"]
service = "app"

[service.app]
upstream = "{upstream}"
"#
    )
}

/// HSTS goes on every HTTPS response of a site that asks for it (also the
/// proxy's own error answers), never on plain HTTP (RFC 6797 section 7.2),
/// and never on a site without it.
#[tokio::test]
async fn hsts_is_sent_on_https_only_and_per_site() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&hsts_config(upstream.addr)).await;
    let https = proxy.https();
    let hsts = Some("max-age=63072000; includeSubDomains");

    let resp = https_h1(
        https,
        "localhost",
        request("GET", "/", "localhost", Bytes::new()),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("strict-transport-security"), hsts, "h1");

    let uri = format!("https://localhost:{}/status/404", https.port());
    let mut req = request("GET", &uri, "ignored", Bytes::new());
    req.headers_mut().remove("host");
    let resp = https_h2(https, "localhost", req).await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("strict-transport-security"), hsts, "h2");

    let resp = http_get(proxy.http_addr, "localhost", "/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("strict-transport-security"),
        None,
        "HSTS on plain HTTP"
    );

    let resp = https_h1(
        https,
        "app.localhost",
        request("GET", "/", "app.localhost", Bytes::new()),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("strict-transport-security"),
        None,
        "site without hsts"
    );
    proxy.stop().await.expect("clean stop");
}

#[test]
fn invalid_hsts_values_are_config_errors() {
    for bad in [
        "includeSubDomains",
        "max-age=",
        "max-age=abc",
        "max-age=1\tx",
    ] {
        let text = format!("[[site]]\nhosts = [\"a.test\"]\nhsts = {bad:?}\n");
        let err = cutover::Config::parse(&text, "t.toml", root())
            .expect_err(bad)
            .to_string();
        assert!(err.contains("invalid hsts"), "{bad}: {err}");
    }
    for good in ["max-age=0", "max-age=63072000; includeSubDomains; preload"] {
        let text = format!("[[site]]\nhosts = [\"a.test\"]\nhsts = {good:?}\n");
        cutover::Config::parse(&text, "t.toml", root()).expect(good);
    }
}

/// A minimal ClientHello record offering `version` and only `suites`.
fn client_hello(version: [u8; 2], suites: &[[u8; 2]]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        body.extend_from_slice(suite);
    }
    body.extend_from_slice(&[1, 0]); // compression: null only
                                     // Extensions: supported_groups (x25519, secp256r1), ec_point_formats,
                                     // signature_algorithms (rsa_pss_rsae_sha256, ecdsa_secp256r1_sha256,
                                     // rsa_pkcs1_sha256): enough for a TLS 1.2 server to pick an ECDHE suite.
    let extensions: &[u8] = &[
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // groups
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // point formats
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x08, 0x04, 0x04, 0x03, 0x04, 0x01,
    ];
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(extensions);
    let mut handshake = vec![1u8, 0];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Sends a ClientHello and returns the first record type the server
/// answers with (0x16 handshake, 0x15 alert) or `None` when it just closes.
async fn first_record_type(addr: std::net::SocketAddr, hello: &[u8]) -> Option<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(hello).await.expect("hello");
    let mut first = [0u8; 1];
    match tokio::time::timeout(IO_TIMEOUT, stream.read(&mut first)).await {
        Ok(Ok(1)) => Some(first[0]),
        Ok(_) => None,
        Err(_) => panic!("no answer to a ClientHello within 10s"),
    }
}

/// The TLS policy seen from the wire: a ClientHello capped at TLS 1.0 or
/// 1.1, or offering only CBC / non-forward-secret suites, gets an alert;
/// the same hello offering an ECDHE AEAD suite gets a ServerHello (so the
/// refusals are about the policy, not a broken hello).
#[tokio::test]
async fn legacy_versions_and_non_aead_suites_are_refused() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&hsts_config(upstream.addr)).await;
    let https = proxy.https();
    // The dev certificate is ECDSA P-256, so the ECDHE-ECDSA suites.
    const ECDHE_ECDSA_AES128_GCM: [u8; 2] = [0xc0, 0x2b];
    const ECDHE_ECDSA_AES128_CBC_SHA: [u8; 2] = [0xc0, 0x09];
    const ECDHE_ECDSA_AES128_CBC_SHA256: [u8; 2] = [0xc0, 0x23];
    const ECDHE_ECDSA_NULL_SHA: [u8; 2] = [0xc0, 0x06];
    const RSA_AES128_GCM: [u8; 2] = [0x00, 0x9c];
    const RSA_AES128_CBC_SHA: [u8; 2] = [0x00, 0x2f];

    let accepted = first_record_type(https, &client_hello([3, 3], &[ECDHE_ECDSA_AES128_GCM])).await;
    assert_eq!(
        accepted,
        Some(0x16),
        "TLS 1.2 ECDHE-ECDSA-AES128-GCM refused"
    );

    for (name, version, suites) in [
        (
            "TLS 1.0",
            [3, 1],
            &[ECDHE_ECDSA_AES128_GCM, ECDHE_ECDSA_AES128_CBC_SHA][..],
        ),
        (
            "TLS 1.1",
            [3, 2],
            &[ECDHE_ECDSA_AES128_GCM, ECDHE_ECDSA_AES128_CBC_SHA][..],
        ),
        (
            "CBC suites",
            [3, 3],
            &[
                ECDHE_ECDSA_AES128_CBC_SHA,
                ECDHE_ECDSA_AES128_CBC_SHA256,
                ECDHE_ECDSA_NULL_SHA,
            ][..],
        ),
        (
            "static RSA",
            [3, 3],
            &[RSA_AES128_GCM, RSA_AES128_CBC_SHA][..],
        ),
    ] {
        let answer = first_record_type(https, &client_hello(version, suites)).await;
        assert_ne!(
            answer,
            Some(0x16),
            "{name}: server answered with a handshake"
        );
    }
    proxy.stop().await.expect("clean stop");
}
