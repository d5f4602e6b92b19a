//! Hot reload and the admin socket: an invalid proxy.toml is rejected with
//! file:line while the old config keeps serving, a valid edit is picked up
//! by the watcher, a certificate replaced by rename is served to new
//! handshakes, the socket is 0600, malformed lines get error replies on a
//! connection that keeps serving, and a second server is refused.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use cutover::admin::{Command, Reply};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixStream};

/// Starts the proxy from a config *file*, as `cutover serve` does, so hot
/// reload has a file to watch.
async fn start_from_file(path: &Path) -> TestProxy {
    init_tracing();
    let config = cutover::Config::load(path).unwrap_or_else(|e| panic!("config: {e}"));
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let https = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = run_proxy(http, Some(https), config).await;
    let dir = path.parent().expect("config dir");
    wait_for_admin(&dir.join("admin.sock")).await;
    proxy
}

/// A config file in `dir` with certificate files copied into `dir`, one
/// site whose `/` route answers `status`.
fn write_config(dir: &Path, status: u16) -> PathBuf {
    for name in ["localhost.pem", "localhost-key.pem"] {
        if !dir.join(name).exists() {
            std::fs::copy(cert_file(name), dir.join(name)).expect("copy cert");
        }
    }
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config_body(status)).expect("write config");
    path
}

fn config_body(status: u16) -> String {
    format!(
        r#"[server]
admin_socket = "admin.sock"
state_dir = "state"

[[tls]]
cert = "localhost.pem"
key = "localhost-key.pem"

[[site]]
hosts = ["*"]
[[site.route]]
path = "/"
status = {status}
"#
    )
}

/// Replaces a file the way editors and certbot do: write a temp, rename.
fn replace_by_rename(path: &Path, contents: &[u8]) {
    let temp = path.with_extension("tmp-new");
    std::fs::write(&temp, contents).expect("write temp");
    std::fs::rename(&temp, path).expect("rename");
}

async fn admin(dir: &Path, command: Command) -> Result<cutover::admin::proto::Report, String> {
    admin_call(&dir.join("admin.sock"), command, IO_TIMEOUT).await
}

#[tokio::test]
async fn invalid_reload_keeps_old_config_and_valid_edit_is_picked_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), 204);
    let proxy = start_from_file(&path).await;
    assert_eq!(
        http_get(proxy.http_addr, "localhost", "/").await.status,
        204
    );

    // An unknown key on line 3: rejected with file:line, old config serves.
    let broken = config_body(202).replace(
        "state_dir = \"state\"",
        "state_dir = \"state\"\nworkerz = 1",
    );
    std::fs::write(&path, broken).expect("write broken");
    let err = admin(dir.path(), Command::Reload {})
        .await
        .expect_err("invalid reload");
    let location = format!("{}:4:", path.display());
    assert!(err.contains(&location), "error names file:line: {err}");
    assert!(err.contains("old config keeps serving"), "{err}");
    assert_eq!(
        http_get(proxy.http_addr, "localhost", "/").await.status,
        204
    );

    // A valid edit, saved by rename: the watcher applies it by itself.
    replace_by_rename(&path, config_body(202).as_bytes());
    let http = proxy.http_addr;
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        let status = http_get(http, "localhost", "/").await.status;
        if status == 202 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher never applied the edit (still {status})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn certificate_replaced_by_rename_reaches_new_handshakes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), 204);
    let proxy = start_from_file(&path).await;
    let https = proxy.https();
    let served_leaf = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone()
    };
    let before = tls_connect(https, "localhost", &[b"http/1.1"]).await;
    assert_eq!(
        served_leaf(&before),
        load_certs(&cert_file("localhost.pem"))[0]
    );

    // certbot-style renewal: the same file names now hold another cert.
    let key = std::fs::read(cert_file("example-key.pem")).expect("key");
    let cert = std::fs::read(cert_file("example.pem")).expect("cert");
    replace_by_rename(&dir.path().join("localhost-key.pem"), &key);
    replace_by_rename(&dir.path().join("localhost.pem"), &cert);

    let expected = load_certs(&cert_file("example.pem"))[0].clone();
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        let connector = tokio_rustls::TlsConnector::from(client_tls_config(&[b"http/1.1"]));
        let tcp = tokio::net::TcpStream::connect(https)
            .await
            .expect("connect");
        let name = rustls_pki_types::ServerName::try_from("example.test").expect("name");
        if let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp)).await {
            assert_eq!(served_leaf(&tls), expected);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewed certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection made before the renewal is unaffected.
    let resp = send_h1(
        before,
        request("GET", "/", "localhost", bytes::Bytes::new()),
    )
    .await
    .expect("old connection still works");
    assert_eq!(resp.status, 204);
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn admin_socket_is_owner_only_and_survives_malformed_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), 204);
    let proxy = start_from_file(&path).await;
    let socket = dir.path().join("admin.sock");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {:o}", mode & 0o777);

    let stream = UnixStream::connect(&socket).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut ask = async |line: &str| {
        write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        let reply = tokio::time::timeout(IO_TIMEOUT, lines.next_line())
            .await
            .expect("reply in time")
            .expect("read")
            .expect("a reply line");
        serde_json::from_str::<Reply>(&reply)
            .unwrap_or_else(|e| panic!("reply is not a protocol reply ({e}): {reply}"))
    };
    for bad in [
        "garbage",
        "{\"v\":1,\"cmd\":\"explode\"}",
        "{\"cmd\":\"status\"}",
        "{\"v\":9,\"cmd\":\"status\"}",
    ] {
        let reply = ask(bad).await;
        assert!(matches!(reply, Reply::Error { .. }), "{bad} -> {reply:?}");
    }
    let reply = ask("{\"v\":1,\"cmd\":\"status\"}").await;
    assert!(
        matches!(reply, Reply::Ok { .. }),
        "same connection keeps serving: {reply:?}"
    );
    // A line far over the limit is refused, and the connection still serves.
    let reply = ask(&"x".repeat(100_000)).await;
    assert!(matches!(reply, Reply::Error { .. }), "{reply:?}");
    let reply = ask("{\"v\":1,\"cmd\":\"status\"}").await;
    assert!(matches!(reply, Reply::Ok { .. }), "{reply:?}");
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn second_server_on_the_same_socket_is_refused_and_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), 204);
    let first = start_from_file(&path).await;
    let config = cutover::Config::load(&path).expect("config");
    let listeners = cutover::Listeners {
        http: Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
        https: Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
        admin: None,
    };
    let err = cutover::run(listeners, config, std::future::pending())
        .await
        .expect_err("second server must be refused");
    assert!(err.to_string().contains("already serving"), "{err}");
    // The first server is unaffected.
    assert!(admin(dir.path(), Command::Status { service: None })
        .await
        .is_ok());
    first.stop().await.expect("stop");

    // A stale socket file (no server behind it) is replaced on start.
    let stale =
        std::os::unix::net::UnixListener::bind(dir.path().join("admin.sock")).expect("bind stale");
    drop(stale);
    assert!(dir.path().join("admin.sock").exists());
    let restarted = start_from_file(&path).await;
    assert!(admin(dir.path(), Command::Status { service: None })
        .await
        .is_ok());
    restarted.stop().await.expect("stop");
}
