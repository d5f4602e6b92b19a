//! Admin socket access control: the optional `admin_group` (socket 0660
//! owned by that group, a created directory 0750), a clear error for a
//! group that does not exist, and the same checks in `cutover check`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A group from /etc/group other than the one new files get by default,
/// so the test can see the socket's group really changed.
fn other_group(default_gid: u32) -> (String, u32) {
    let text = std::fs::read_to_string("/etc/group").expect("/etc/group");
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            Some((name.to_string(), gid))
        })
        .find(|(name, gid)| *gid != default_gid && !name.is_empty())
        .expect("a second group in /etc/group")
}

fn config(socket: &Path, group: &str) -> String {
    format!(
        r#"
[server]
admin_socket = "{}"
admin_group = "{group}"

[[site]]
hosts = ["*"]
[[site.route]]
path = "/"
status = 204
"#,
        socket.display()
    )
}

#[tokio::test]
async fn admin_group_makes_the_socket_group_writable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"").expect("probe file");
    let default_gid = std::fs::metadata(&probe).expect("probe").gid();
    let (group, gid) = other_group(default_gid);

    // The socket's directory does not exist yet: cutover creates it.
    let socket = dir.path().join("run").join("admin.sock");
    // Bound (with `admin::bind`, as `run` binds it) before `run` starts.
    let proxy = start_proxy(&config(&socket, &group)).await;
    assert!(socket.exists(), "no admin socket");
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.gid(), gid, "socket group should be {group}");
    let parent = std::fs::metadata(socket.parent().expect("parent")).expect("dir");
    assert_eq!(parent.permissions().mode() & 0o777, 0o750, "directory mode");
    assert_eq!(parent.gid(), gid, "directory group should be {group}");

    // And it still answers.
    let stream = UnixStream::connect(&socket).await.expect("connect");
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"{\"v\":1,\"cmd\":\"status\"}\n")
        .await
        .expect("write");
    let mut lines = BufReader::new(read).lines();
    let reply = tokio::time::timeout(IO_TIMEOUT, lines.next_line())
        .await
        .expect("reply in time")
        .expect("read")
        .expect("a line");
    assert!(reply.contains("\"type\":\"ok\""), "{reply}");
    proxy.stop().await.expect("stop");
}

#[tokio::test]
async fn unknown_admin_group_fails_start_and_leaves_no_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run").join("admin.sock");
    let mut proxy = start_proxy(&config(&socket, "no-such-group-cutover")).await;
    let err = proxy.join().await.expect_err("start must fail");
    let text = err.to_string();
    assert!(
        text.contains("admin_group") && text.contains("\"no-such-group-cutover\""),
        "unclear error: {text}"
    );
    assert!(!socket.exists(), "socket created despite the error");
    assert!(
        !socket.parent().expect("parent").exists(),
        "directory created despite the error"
    );
}

#[test]
fn cutover_check_reports_an_unknown_admin_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    let socket = dir.path().join("admin.sock");
    std::fs::write(&path, config(&socket, "no-such-group-cutover")).expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run cutover check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "check accepted it: {stderr}");
    assert!(stderr.contains("no-such-group-cutover"), "{stderr}");
}

#[test]
fn cutover_check_warns_about_hosts_no_certificate_covers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    let text = format!(
        r#"
[[tls]]
cert = "{cert}"
key = "{key}"

[[site]]
hosts = ["example.test", "*.example.test", "shop.example.org", "*.example.net"]
service = "web"

[service.web]
upstream = "127.0.0.1:9000"
"#,
        cert = cert_file("example.pem").display(),
        key = cert_file("example-key.pem").display(),
    );
    std::fs::write(&path, text).expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run cutover check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Warnings, not problems: the config would start.
    assert!(output.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(warnings[0].contains("\"shop.example.org\""), "{stderr}");
    assert!(warnings[1].contains("\"*.example.net\""), "{stderr}");
}
