//! The `dir` route, as `certbot --webroot` uses it: the files under the
//! directory are served (GET and HEAD), and nothing else is: no listing,
//! no way out through `..`, encoded dots or slashes, a NUL, or a symlink.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use common::*;

const TOKEN: &str = "bm90LWEtcmVhbC10b2tlbg";
const KEY_AUTHORIZATION: &str = "bm90LWEtcmVhbC10b2tlbg.thumbprint";
const SECRET: &str = "outside the webroot";

/// A webroot laid out as certbot leaves it, plus files and links that must
/// not be reachable: `outside/secret.txt` beside the webroot, a symlink to
/// it and to its directory, a symlink that stays inside, a subdirectory.
fn webroot(base: &Path) -> std::path::PathBuf {
    let root = base.join("certbot");
    let challenges = root.join(".well-known/acme-challenge");
    std::fs::create_dir_all(challenges.join("sub")).expect("mkdir");
    std::fs::write(challenges.join(TOKEN), KEY_AUTHORIZATION).expect("token");
    std::fs::write(challenges.join("sub/nested.txt"), "nested").expect("nested");
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("secret.txt"), SECRET).expect("secret");
    symlink(outside.join("secret.txt"), challenges.join("escape")).expect("symlink");
    symlink(&outside, challenges.join("escape-dir")).expect("symlink");
    symlink(challenges.join(TOKEN), challenges.join("alias")).expect("symlink");
    root
}

async fn start(base: &Path) -> TestProxy {
    let root = webroot(base);
    start_proxy(&format!(
        r#"
[[site]]
hosts = ["example.org"]
https_redirect = true
[[site.route]]
path = "/.well-known/acme-challenge/"
dir = "{}"
"#,
        root.display()
    ))
    .await
}

/// One raw request line; the response as text.
async fn get(proxy: &TestProxy, method: &str, target: &str) -> String {
    raw_exchange(
        proxy.http_addr,
        format!("{method} {target} HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

#[tokio::test]
async fn serves_the_token_certbot_wrote_on_plain_http_despite_the_redirect() {
    let base = tempfile::tempdir().expect("tempdir");
    let proxy = start(base.path()).await;
    let resp = http_get(
        proxy.http_addr,
        "example.org",
        &format!("/.well-known/acme-challenge/{TOKEN}"),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), KEY_AUTHORIZATION);
    assert_eq!(
        resp.header("content-length"),
        Some(KEY_AUTHORIZATION.len().to_string().as_str())
    );

    let head = get(
        &proxy,
        "HEAD",
        &format!("/.well-known/acme-challenge/{TOKEN}"),
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");

    let nested = http_get(
        proxy.http_addr,
        "example.org",
        "/.well-known/acme-challenge/sub/nested.txt",
    )
    .await;
    assert_eq!(nested.text(), "nested");
    let alias = http_get(
        proxy.http_addr,
        "example.org",
        "/.well-known/acme-challenge/alias",
    )
    .await;
    assert_eq!(
        alias.text(),
        KEY_AUTHORIZATION,
        "a symlink inside the root is fine"
    );

    // Everything else on plain HTTP is still redirected.
    let other = http_get(proxy.http_addr, "example.org", "/login").await;
    assert_eq!(other.status, 301);
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn only_get_and_head() {
    let base = tempfile::tempdir().expect("tempdir");
    let proxy = start(base.path()).await;
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let resp = raw_exchange(
            proxy.http_addr,
            format!(
                "{method} /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: example.org\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status(&resp), 405, "{method}: {resp}");
        assert!(resp.contains("allow: GET, HEAD"), "{method}: {resp}");
    }
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn no_listing_and_no_way_out() {
    let base = tempfile::tempdir().expect("tempdir");
    let proxy = start(base.path()).await;
    let not_found = [
        // Directories are never listed.
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge/sub/",
        "/.well-known/acme-challenge/sub",
        // Dot segments, plain and percent-encoded in every case mix.
        "/.well-known/acme-challenge/../../outside/secret.txt",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/%2e%2e/outside/secret.txt",
        "/.well-known/acme-challenge/%2E%2E/%2E%2E/%2E%2E/outside/secret.txt",
        "/.well-known/acme-challenge/.%2e/.%2e/.%2e/outside/secret.txt",
        "/.well-known/acme-challenge/sub/./nested.txt",
        // Encoded slashes (and backslashes) inside a segment.
        "/.well-known/acme-challenge/..%2F..%2F..%2Foutside%2Fsecret.txt",
        "/.well-known/acme-challenge/..%2f..%2f..%2foutside%2fsecret.txt",
        "/.well-known/acme-challenge/sub%2Fnested.txt",
        "/.well-known/acme-challenge/..%5C..%5Coutside%5Csecret.txt",
        // Symlinks that lead out of the root.
        "/.well-known/acme-challenge/escape",
        "/.well-known/acme-challenge/escape-dir/secret.txt",
        // Missing files.
        "/.well-known/acme-challenge/missing",
    ];
    for target in not_found {
        let resp = get(&proxy, "GET", target).await;
        assert_eq!(status(&resp), 404, "{target}: {resp}");
        assert!(!resp.contains(SECRET), "{target} leaked the secret: {resp}");
    }
    for target in [
        "/.well-known/acme-challenge/a%00b",
        "/.well-known/acme-challenge/%00",
        "/.well-known/acme-challenge/bad%zzescape",
    ] {
        let resp = get(&proxy, "GET", target).await;
        assert_eq!(status(&resp), 400, "{target}: {resp}");
    }
    // A raw NUL never gets as far as the route: hyper refuses the line.
    let raw_nul = raw_exchange(
        proxy.http_addr,
        b"GET /.well-known/acme-challenge/a\0b HTTP/1.1\r\nHost: example.org\r\n\r\n",
    )
    .await;
    assert!(status(&raw_nul) >= 400, "{raw_nul}");
    proxy.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_config_with_both_file_and_dir_on_one_route_is_refused() {
    let err = cutover::Config::parse(
        "[[site]]\nhosts = [\"a.test\"]\n[[site.route]]\npath = \"/x\"\nfile = \"a\"\ndir = \"b\"\n",
        "proxy.toml",
        Path::new("/"),
    )
    .expect_err("two actions");
    assert!(err.to_string().contains("exactly one of"), "{err}");
}
