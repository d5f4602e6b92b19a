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

/// `rollout` and `status --hosts` refuse bad input with exit 2 and the
/// reason, before any ssh runs.
#[test]
fn fleet_commands_refuse_bad_input_before_reaching_a_host() {
    for (args, reason) in [
        (&["rollout", "web", "--tag", "v2"][..], "no hosts"),
        (&["rollout", "web", "--hosts", "a"], "--tag"),
        (
            &[
                "rollout",
                "web",
                "--tag",
                "v2",
                "--hosts",
                "a,b",
                "--canary-host",
                "c",
            ],
            "not one of the hosts",
        ),
        (
            &[
                "rollout",
                "web",
                "--tag",
                "v2",
                "--hosts",
                "a",
                "--parallel",
                "0",
            ],
            "parallel",
        ),
        (
            &["rollout", "web", "--tag", "v2", "--hosts=-oProxyCommand=x"],
            "not a host name",
        ),
        (
            &["rollout", "web", "--tag", "v2", "--hosts", "a,a"],
            "twice",
        ),
        (
            &[
                "rollout",
                "web",
                "--tag",
                "v2",
                "--fleet",
                "/nonexistent/fleet.toml",
            ],
            "cannot read",
        ),
        (
            &[
                "rollout", "web", "--tag", "v2", "--hosts", "a", "--bake", "soon",
            ],
            "duration",
        ),
        (
            &["status", "--hosts", "a", "--socket", "/x.sock"],
            "do not combine",
        ),
    ] {
        let out = cutover(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed progress: {out:?}");
    }
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

/// The client commands' exit codes that need no Docker engine: a socket
/// nobody serves is 4 (unreachable), an unknown service or a malformed
/// address is 2 (refused), a failed health check is 1. (`deploy`'s codes,
/// busy included, are tested against the real engine in tests/deploy.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_how_a_command_ended() {
    use cutover::admin::proto::exit;
    let dir = tempfile::tempdir().expect("tempdir");
    let nowhere = dir.path().join("nobody.sock");
    let nowhere = nowhere.to_str().expect("utf-8").to_string();
    let out = tokio::task::spawn_blocking(move || cutover(&["status", "--socket", &nowhere]))
        .await
        .expect("status");
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit::UNREACHABLE)),
        "{out:?}"
    );

    let upstream = start_upstream("plain").await;
    let dead = closed_port().await;
    let socket = dir.path().join("admin.sock");
    let proxy = start_proxy(&format!(
        "[server]\nadmin_socket = \"{}\"\n\n[[site]]\nhosts = [\"*\"]\nservice = \"web\"\n\n\
         [service.web]\nupstream = \"{}\"\n\
         health = {{ path = \"/\", interval = \"50ms\", deadline = \"300ms\" }}\n",
        socket.display(),
        upstream.addr
    ))
    .await;
    wait_for_admin(&socket).await;
    let path = socket.to_str().expect("utf-8").to_string();
    let dead = dead.to_string();
    let cases: [(&[&str], u8); 4] = [
        (&["status", "nosuch"], exit::REFUSED),
        (&["switch", "web", "--to", "not-an-address"], exit::REFUSED),
        (&["switch", "web", "--to", &dead], exit::FAILED),
        (&["pause", "web"], exit::SUCCESS),
    ];
    for (args, code) in cases {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--socket".to_string(), path.clone()]);
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            cutover(&args)
        })
        .await
        .expect("cli");
        assert_eq!(
            out.status.code(),
            Some(i32::from(code)),
            "{args:?}: {out:?}"
        );
    }
    proxy.stop().await.expect("stop");
}
