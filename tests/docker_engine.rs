//! The docker module against the real engine: a scratch image of the test app,
//! run, probed over HTTP, listed, logged, stopped and removed; plus the failure
//! paths the controller relies on (port taken, missing image, engine down).
//!
//! Needs a running Docker engine (DOCKER_HOST or /var/run/docker.sock). Never
//! pulls: the only image is built locally from the test app.

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use cutover::docker::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;

/// Names unique to this test process, so parallel or leftover runs never collide.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn spec(service: &str, color: &str, image: &str, host_port: Option<u16>) -> ContainerSpec {
    ContainerSpec {
        name: format!("cutover-{service}-{color}"),
        image: image.to_string(),
        service: service.to_string(),
        color: color.to_string(),
        deploy_id: "d1".to_string(),
        instance: "docker-engine-test".to_string(),
        container_port: APP_PORT,
        host_port,
        env: vec!["APP_VERSION=v1".to_string()],
        volumes: Vec::new(),
        extra_hosts: vec!["host.docker.internal:host-gateway".to_string()],
    }
}

/// Removes every managed container of `service` (leftovers of an earlier failed run).
async fn clean_service(engine: &Engine, service: &str) {
    let leftovers = engine
        .list_managed(Some(service), &|_| None)
        .await
        .expect("list");
    for c in leftovers {
        engine.remove_force(&c.id).await.expect("remove leftover");
    }
}

/// One HTTP/1.0 GET; returns the status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `path` until it answers 200. docker-proxy accepts connections before the
/// app listens and then resets them, so errors are retried, not trusted.
async fn wait_for_200(addr: SocketAddr, path: &str, limit: Duration) -> (Duration, String) {
    let start = Instant::now();
    loop {
        match http_get(addr, path).await {
            Ok((200, body)) => return (start.elapsed(), body),
            other if start.elapsed() > limit => {
                panic!("{addr}{path} not 200 after {limit:?}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test]
async fn container_lifecycle_against_real_engine() {
    let engine = Engine::connect().await.expect("docker engine reachable");
    engine.ping().await.expect("ping");
    let service = unique("dockerdev");
    clean_service(&engine, &service).await;

    let t = Instant::now();
    let image = support::images::build_testapp_image("cutover-test-dockerdev:v1", "v1").await;
    eprintln!(
        "image build (incl. test app cargo build): {:?}",
        t.elapsed()
    );
    assert!(engine.image_exists(&image).await.expect("inspect image"));
    assert!(!engine
        .image_exists("cutover-test-dockerdev:nope")
        .await
        .expect("inspect image"));

    // Ephemeral port, published on loopback only.
    let t = Instant::now();
    let info = engine
        .create_and_start(&spec(&service, "blue", &image, None))
        .await
        .expect("create and start");
    let create_start = t.elapsed();
    assert!(info.running, "{info:?}");
    assert_eq!(info.service.as_deref(), Some(service.as_str()));
    assert_eq!(info.color.as_deref(), Some("blue"));
    assert_eq!(info.deploy_id.as_deref(), Some("d1"));
    assert_eq!(info.instance.as_deref(), Some("docker-engine-test"));
    assert_eq!(info.image, image);
    assert_eq!(info.name, format!("cutover-{service}-blue"));
    assert!(info.started_at.is_some());
    assert_eq!(info.exit_code, None);
    let addr = info.host_addr.expect("published port");
    assert!(addr.ip().is_loopback(), "{addr}");

    let (first_200, body) = wait_for_200(addr, "/health", Duration::from_secs(10)).await;
    eprintln!("create+start: {create_start:?}; first HTTP 200 after that: {first_200:?}");
    let (_, root) = wait_for_200(addr, "/", Duration::from_secs(1)).await;
    assert!(
        root.contains("v1"),
        "env reached the app: {root:?} (health said {body:?})"
    );

    // Reconciliation view: found by label, with its address.
    let port_of = |s: &str| (s == service).then_some(APP_PORT);
    let listed = engine
        .list_managed(Some(&service), &port_of)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0],
        engine.inspect(&info.id, APP_PORT).await.expect("inspect")
    );
    assert_eq!(listed[0].host_addr, Some(addr));
    let everything = engine.list_managed(None, &port_of).await.expect("list all");
    assert!(everything.iter().any(|c| c.id == info.id));

    let logs = engine.logs_tail(&info.id, 20).await.expect("logs");
    assert!(logs.iter().any(|l| l.contains("listening")), "{logs:?}");

    // The image is in use: removal is refused with a distinct error.
    match engine.remove_image(&image).await {
        Err(DockerError::ImageInUse { .. }) => {}
        other => panic!("expected ImageInUse, got {other:?}"),
    }

    // A fixed host port that is already taken: start fails, nothing is left.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = blocker.local_addr().expect("addr").port();
    let t = Instant::now();
    let err = engine
        .create_and_start(&spec(&service, "green", &image, Some(taken)))
        .await
        .expect_err("port is taken");
    eprintln!("taken port {taken}: failed in {:?}: {err}", t.elapsed());
    assert!(err.is_port_in_use(), "{err:?}");
    let listed = engine
        .list_managed(Some(&service), &port_of)
        .await
        .expect("list");
    assert_eq!(
        listed.len(),
        1,
        "failed container was left behind: {listed:?}"
    );
    drop(blocker);

    // Stop with init: prompt, and a second stop is not an error.
    let t = Instant::now();
    engine
        .stop_and_remove(&info.id, Duration::from_secs(10))
        .await
        .expect("stop and remove");
    let stop_remove = t.elapsed();
    eprintln!("stop+remove: {stop_remove:?}");
    assert!(
        stop_remove < Duration::from_secs(5),
        "stop took {stop_remove:?}"
    );
    engine
        .stop_and_remove(&info.id, Duration::from_secs(10))
        .await
        .expect("already gone is fine");
    engine
        .remove_force(&info.id)
        .await
        .expect("already gone is fine");
    assert!(engine
        .inspect(&info.id, APP_PORT)
        .await
        .expect_err("gone")
        .is_not_found());

    // An app that ignores SIGTERM is killed after the stop timeout; an exited
    // container reports its exit code.
    let mut stubborn = spec(&service, "green", &image, None);
    stubborn.env.push("IGNORE_SIGTERM=1".to_string());
    let info = engine
        .create_and_start(&stubborn)
        .await
        .expect("start stubborn");
    wait_for_200(
        info.host_addr.expect("port"),
        "/health",
        Duration::from_secs(10),
    )
    .await;
    let t = Instant::now();
    engine
        .stop_and_remove(&info.id, Duration::from_secs(1))
        .await
        .expect("stop stubborn");
    eprintln!(
        "stop+remove of a SIGTERM-ignoring app, t=1s: {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() >= Duration::from_secs(1));

    let mut crasher = spec(&service, "blue", &image, None);
    crasher.env.push("CRASH_AFTER_MS=100".to_string());
    let info = engine
        .create_and_start(&crasher)
        .await
        .expect("start crasher");
    let exited = loop {
        let now = engine.inspect(&info.id, APP_PORT).await.expect("inspect");
        if !now.running {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exited.exit_code, Some(3), "{exited:?}");
    assert_eq!(
        exited.host_addr, None,
        "an exited container publishes nothing"
    );
    let listed = engine
        .list_managed(Some(&service), &port_of)
        .await
        .expect("list");
    assert_eq!(
        listed.len(),
        1,
        "stopped containers are listed too: {listed:?}"
    );
    engine.remove_force(&info.id).await.expect("remove crasher");

    clean_service(&engine, &service).await;
    engine.remove_image(&image).await.expect("remove image");
    assert!(!engine.image_exists(&image).await.expect("inspect image"));
    engine
        .remove_image(&image)
        .await
        .expect("removing a missing image is fine");
}

#[tokio::test]
async fn missing_image_is_not_found_and_leaves_nothing() {
    let engine = Engine::connect().await.expect("docker engine reachable");
    let service = unique("dockerdev-missing");
    let err = engine
        .create_and_start(&spec(
            &service,
            "blue",
            "cutover-test-dockerdev:does-not-exist",
            None,
        ))
        .await
        .expect_err("no such image");
    assert!(err.is_not_found(), "{err:?}");
    assert!(err.to_string().contains("No such image"), "{err}");
    let listed = engine
        .list_managed(Some(&service), &|_| None)
        .await
        .expect("list");
    assert!(listed.is_empty(), "{listed:?}");
}

#[tokio::test]
async fn engine_down_is_unreachable() {
    let err = Engine::connect_to("unix:///nonexistent/docker.sock")
        .await
        .expect_err("no socket");
    assert!(err.is_unreachable(), "{err:?}");

    // A socket file nobody listens on: connection refused.
    let dir = std::env::temp_dir().join(unique("cutover-dead-engine"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("docker.sock");
    let _ = std::fs::remove_file(&path);
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let err = Engine::connect_to(&format!("unix://{}", path.display()))
        .await
        .expect_err("refused");
    assert!(err.is_unreachable(), "{err:?}");
    eprintln!("engine down: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}
