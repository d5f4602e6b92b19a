//! What the `cutover` client commands print, run as the operator runs them
//! (the real binary), against an in-process server where one is needed.

mod common;

use std::process::Output;

use common::*;

fn cutover(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run cutover")
}

/// `deploy SERVICE` without a flag names both ways to say what to deploy.
#[test]
fn deploy_without_image_or_tag_names_both_flags() {
    let out = cutover(&["deploy", "web", "--socket", "/nonexistent.sock"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--image") && stderr.contains("--tag"),
        "the error names --image and --tag: {stderr}"
    );
    let both = cutover(&["deploy", "web", "--image", "a:1", "--tag", "1"]);
    assert_eq!(both.status.code(), Some(2), "{both:?}");
}

/// A plain upstream (no container, no switch yet) has no image, container
/// or "active since": `status` prints what it has, no `-` placeholders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_plain_upstream_has_no_dangling_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = start_upstream("plain").await;
    let socket = dir.path().join("admin.sock");
    let proxy = start_proxy(&format!(
        "[server]\nadmin_socket = \"{}\"\n\n[[site]]\nhosts = [\"*\"]\nservice = \"web\"\n\n\
         [service.web]\nupstream = \"{}\"\n",
        socket.display(),
        upstream.addr
    ))
    .await;
    wait_for_admin(&socket).await;
    let path = socket.to_str().expect("utf-8").to_string();
    let out = tokio::task::spawn_blocking(move || cutover(&["status", "--socket", &path]))
        .await
        .expect("status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let active = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("active:"))
        .unwrap_or_else(|| panic!("no active line: {stdout}"));
    assert!(
        active.contains(&format!("blue {}", upstream.addr)) && active.contains("in-flight 0"),
        "{active}"
    );
    for dangling in [" -s", "image -", "container -", " - "] {
        assert!(!active.contains(dangling), "{dangling:?} in {active:?}");
    }
    proxy.stop().await.expect("stop");
}
