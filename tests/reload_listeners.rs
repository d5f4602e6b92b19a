//! A reload that changes `[server] http`/`https` moves the listeners
//! without a restart: the new addresses are bound and served before the
//! old ones close, connections the old listeners accepted carry on, and a
//! new address that cannot be bound fails the reload with the old
//! listeners still serving.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use cutover::admin::Command;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A loopback address whose port was free a moment ago.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
}

/// Writes `dir/proxy.toml` listening on `http` and `https`; plain HTTP
/// redirects to https (so the redirect port shows which https is live).
fn write_config(dir: &Path, http: &str, https: SocketAddr) -> PathBuf {
    for name in ["localhost.pem", "localhost-key.pem"] {
        if !dir.join(name).exists() {
            std::fs::copy(cert_file(name), dir.join(name)).expect("copy cert");
        }
    }
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
http = "{http}"
https = "{https}"
admin_socket = "admin.sock"

[[tls]]
cert = "localhost.pem"
key = "localhost-key.pem"

[[site]]
hosts = ["localhost"]
https_redirect = true
[[site.route]]
path = "/"
status = 204
"#
        ),
    )
    .expect("write config");
    path
}

async fn reload(socket: &Path) -> Result<cutover::admin::proto::Report, String> {
    admin_call(socket, Command::Reload {}, IO_TIMEOUT).await
}

/// The `Location` a plain-HTTP request on `http` is redirected to.
async fn redirect_from(http: SocketAddr) -> String {
    let response = raw_exchange(
        http,
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 301"), "{response}");
    response
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap_or_else(|| panic!("no location: {response}"))
        .to_string()
}

async fn https_status(https: SocketAddr) -> u16 {
    let tls = tls_connect(https, "localhost", &[b"http/1.1"]).await;
    send_h1(tls, request("GET", "/", "localhost", ""))
        .await
        .expect("https request")
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_listeners_new_before_old_and_keeps_them_on_a_bad_address() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (http1, https1) = (free_addr(), free_addr());
    let path = write_config(dir.path(), &http1.to_string(), https1);
    let config = cutover::Config::load(&path).expect("config");
    let listeners = cutover::Listeners::bind(&config).await.expect("bind");
    let proxy = run_proxy(listeners.http.expect("http"), listeners.https, config).await;
    let socket = dir.path().join("admin.sock");
    wait_for_admin(&socket).await;
    assert_eq!(
        redirect_from(http1).await,
        format!("https://localhost:{}/x", https1.port())
    );

    // A keep-alive connection accepted by the old http listener.
    let stream = TcpStream::connect(http1).await.expect("connect");
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let first = kept
        .send_request(request("GET", "/a", "localhost", ""))
        .await
        .expect("first request");
    assert_eq!(first.status(), 301);

    let (http2, https2) = (free_addr(), free_addr());
    write_config(dir.path(), &http2.to_string(), https2);
    reload(&socket).await.expect("reload to new addresses");

    // The new addresses serve; redirects name the new https port.
    assert_eq!(
        redirect_from(http2).await,
        format!("https://localhost:{}/x", https2.port())
    );
    assert_eq!(https_status(https2).await, 204);
    // The old ones no longer accept.
    for old in [http1, https1] {
        let refused = TcpStream::connect(old).await;
        assert!(refused.is_err(), "{old} still accepts after the reload");
    }
    // The connection the old listener accepted is still served.
    let again = kept
        .send_request(request("GET", "/b", "localhost", ""))
        .await
        .expect("keep-alive request after the move");
    assert_eq!(again.status(), 301);

    // A new address that cannot be bound: the reload fails, saying why,
    // and the listeners stay where they are.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    write_config(dir.path(), &taken_addr.to_string(), https2);
    let err = reload(&socket)
        .await
        .expect_err("a taken address fails the reload");
    assert!(
        err.contains(&format!("cannot listen on {taken_addr}"))
            && err.contains("old listeners keep serving"),
        "{err}"
    );
    write_config(dir.path(), "192.0.2.1:80", https2);
    let err = reload(&socket)
        .await
        .expect_err("a foreign address fails the reload");
    assert!(err.contains("cannot listen on 192.0.2.1:80"), "{err}");
    assert_eq!(
        redirect_from(http2).await,
        format!("https://localhost:{}/x", https2.port())
    );
    assert_eq!(https_status(https2).await, 204);

    // And a good config after the bad ones moves them again.
    let http3 = free_addr();
    write_config(dir.path(), &http3.to_string(), https2);
    reload(&socket).await.expect("reload after failures");
    assert_eq!(
        redirect_from(http3).await,
        format!("https://localhost:{}/x", https2.port())
    );
    assert!(
        TcpStream::connect(http2).await.is_err(),
        "old http still accepts"
    );
    assert_eq!(https_status(https2).await, 204);

    drop(kept);
    tokio::time::timeout(Duration::from_secs(15), proxy.stop())
        .await
        .expect("shutdown in time")
        .expect("stop");
}
