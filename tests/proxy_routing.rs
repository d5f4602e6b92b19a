//! Routing: https redirects, exact / wildcard / catch-all hosts, unknown
//! hosts, longest-prefix routes, and the file, status and redirect actions.

mod common;

use common::*;

#[tokio::test]
async fn http_site_with_https_redirect_answers_301() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&format!(
        r#"
{TLS_LOCALHOST}
[[site]]
hosts = ["localhost", "app.localhost"]
https_redirect = true
service = "app"
[service.app]
upstream = "{}"
"#,
        upstream.addr
    ))
    .await;
    let https_port = proxy.https().port();
    let resp = http_get(
        proxy.http_addr,
        "app.localhost:8080",
        "/some/path?q=1&r=two",
    )
    .await;
    assert_eq!(resp.status, 301);
    assert_eq!(
        resp.header("location"),
        Some(format!("https://app.localhost:{https_port}/some/path?q=1&r=two").as_str())
    );
    assert_eq!(
        upstream.count(),
        0,
        "redirected request must not be forwarded"
    );

    // The same site over TLS is served, not redirected.
    let resp = https_h1(
        proxy.https(),
        "app.localhost",
        request("GET", "/x", "app.localhost", bytes::Bytes::new()),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.count(), 1);
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn exact_wildcard_and_catch_all_hosts() {
    let exact = start_upstream("exact").await;
    let wild = start_upstream("wild").await;
    let deep = start_upstream("deep").await;
    let any = start_upstream("any").await;
    let proxy = start_proxy(&format!(
        r#"
[[site]]
hosts = ["example.test"]
service = "exact"
[[site]]
hosts = ["*.example.test"]
service = "wild"
[[site]]
hosts = ["*.deep.example.test"]
service = "deep"
[[site]]
hosts = ["*"]
service = "any"
[service.exact]
upstream = "{}"
[service.wild]
upstream = "{}"
[service.deep]
upstream = "{}"
[service.any]
upstream = "{}"
"#,
        exact.addr, wild.addr, deep.addr, any.addr
    ))
    .await;
    for (host, expected) in [
        ("example.test", "exact"),
        ("EXAMPLE.test:9999", "exact"),
        ("example.test.", "exact"),
        ("www.example.test", "wild"),
        ("deep.example.test", "wild"),
        ("a.deep.example.test", "deep"),
        ("other.test", "any"),
        ("notexample.test", "any"),
        ("127.0.0.1", "any"),
    ] {
        let resp = http_get(proxy.http_addr, host, "/").await;
        assert_eq!(resp.status, 200, "host {host}");
        assert_eq!(resp.header("x-upstream"), Some(expected), "host {host}");
    }
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_host_without_catch_all_is_421() {
    let upstream = start_upstream("app").await;
    let proxy = start_proxy(&format!(
        r#"
[[site]]
hosts = ["example.test"]
service = "app"
[service.app]
upstream = "{}"
"#,
        upstream.addr
    ))
    .await;
    let resp = http_get(proxy.http_addr, "unknown.test", "/").await;
    assert_eq!(resp.status, 421);
    let resp = http_get(proxy.http_addr, "sub.example.test", "/").await;
    assert_eq!(resp.status, 421, "no wildcard configured");
    assert_eq!(upstream.count(), 0);
    let resp = http_get(proxy.http_addr, "example.test", "/").await;
    assert_eq!(resp.status, 200);
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn routes_longest_prefix_file_status_and_redirect() {
    let web = start_upstream("web").await;
    let api = start_upstream("api").await;
    let v2 = start_upstream("v2").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("privacy.html");
    std::fs::write(&page, "<h1>privacy</h1>\n").expect("write page");
    let data = dir.path().join("data.json");
    std::fs::write(&data, "{\"a\":1}").expect("write json");
    let proxy = start_proxy(&format!(
        r#"
[[site]]
hosts = ["example.test"]
service = "web"
[[site.route]]
path = "/api"
service = "api"
[[site.route]]
path = "/api/v2"
service = "v2"
[[site.route]]
path = "/privacy"
file = "{}"
[[site.route]]
path = "/data"
file = "{}"
[[site.route]]
path = "/gone"
status = 410
[[site.route]]
path = "/old"
redirect = "https://example.test/new"
[[site.route]]
path = "/temp"
redirect = "/elsewhere"
code = 307
[service.web]
upstream = "{}"
[service.api]
upstream = "{}"
[service.v2]
upstream = "{}"
"#,
        page.display(),
        data.display(),
        web.addr,
        api.addr,
        v2.addr
    ))
    .await;
    let get = |path: &'static str| http_get(proxy.http_addr, "example.test", path);

    for (path, expected) in [
        ("/", "web"),
        ("/apiary", "web"),
        ("/api", "api"),
        ("/api/users?x=1", "api"),
        ("/api/v2", "v2"),
        ("/api/v2/things", "v2"),
        ("/api/v20", "api"),
    ] {
        let resp = get(path).await;
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.header("x-upstream"), Some(expected), "{path}");
    }
    assert_eq!(
        v2.requests()[0].uri,
        "/api/v2",
        "path is forwarded unchanged"
    );

    let resp = get("/privacy").await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(resp.text(), "<h1>privacy</h1>\n");
    let resp = get("/data").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.text(), "{\"a\":1}");

    let resp = get("/gone").await;
    assert_eq!(resp.status, 410);
    assert!(resp.body.is_empty());

    let resp = get("/old").await;
    assert_eq!(resp.status, 301);
    assert_eq!(resp.header("location"), Some("https://example.test/new"));
    let resp = get("/temp/x").await;
    assert_eq!(resp.status, 307);
    assert_eq!(resp.header("location"), Some("/elsewhere"));

    let file_posts = http_request(
        proxy.http_addr,
        request("POST", "/privacy", "example.test", "x"),
    )
    .await;
    assert_eq!(file_posts.status, 405);
    assert_eq!(
        web.count() + api.count() + v2.count(),
        7,
        "only service routes reach upstreams"
    );
    proxy.stop().await.expect("clean stop");
}
