//! The deploy controller against the real Docker engine, through the real
//! binary: `cutover serve` runs as a subprocess, and `cutover deploy` /
//! `rollback` / `status` are run as the operator would run them.
//!
//! Each test builds its own `FROM scratch` images of the test app
//! (`cutover-deploytest-<test>-<pid>:<tag>`) with the behaviour baked in as
//! `ENV` lines (the deploy starts containers from the image alone), uses its
//! own service name (so label filters never see another test's containers),
//! and removes its containers and images when it ends, pass or fail.
//!
//! Needs a running Docker engine (DOCKER_HOST or /var/run/docker.sock). Never
//! pulls: every image is built locally.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use cutover::admin::proto::exit;
use support::cutover::*;
use support::harness::*;

// ---------------------------------------------------------------------------
// 1. first deploy
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_deploy_serves_v1() {
    let h = Harness::start("first", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;

    // Before any deploy the service has no upstream.
    let before = get(h.proxy.http, "/").await.expect("GET before deploy");
    assert_eq!(before.status, 503, "{before:?}");

    let out = h.deploy_ok(&v1).await;
    assert_eq!(h.version().await, "v1");

    let listed = h.containers();
    assert_eq!(listed.len(), 1, "exactly one container:\n{}", h.ps());
    let c = &listed[0];
    assert!(c.running(), "{c:?}");
    assert_eq!(c.image, v1, "{c:?}");
    assert!(c.color == "blue" || c.color == "green", "{c:?}");
    assert!(!c.deploy.is_empty(), "cutover.deploy label: {c:?}");

    let status = h.consistent().await;
    let active = active(&status);
    assert_eq!(active.image.as_deref(), Some(v1.as_str()), "{status:?}");
    assert_eq!(active.color, c.color, "{status:?}");
    let container = active.container.as_deref().unwrap_or_default();
    assert!(
        (!container.is_empty() && c.id.starts_with(container)) || container.starts_with(&c.id),
        "status names the running container {}: {status:?}",
        c.id
    );
    let upstream: SocketAddr = active
        .upstream
        .parse()
        .unwrap_or_else(|_| panic!("active.upstream: {status:?}"));
    assert!(upstream.ip().is_loopback(), "{upstream}");
    assert!(status.previous.is_none(), "no previous yet: {status:?}");
    eprintln!("first deploy took {:?}", out.elapsed);
    h.done();
}

// ---------------------------------------------------------------------------
// 2. deploy under load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_under_keepalive_load_loses_nothing() {
    let h = Harness::start("load", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let _v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    assert_eq!(h.version().await, "v1");
    let v1_container = h.containers()[0].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    // Answers received, by all connections: the signal that the load runs.
    let answers = Arc::new(AtomicUsize::new(0));
    let hard_limit = Instant::now() + Duration::from_secs(60);
    let http = h.proxy.http;
    let mut clients = Vec::new();
    for n in 0..16 {
        let (stop, failures, answers) = (stop.clone(), failures.clone(), answers.clone());
        clients.push(tokio::spawn(async move {
            // Versions in the order this connection saw them.
            let mut seen: Vec<String> = Vec::new();
            let mut conn = match KeepAlive::connect(http).await {
                Ok(conn) => conn,
                Err(e) => {
                    failures
                        .lock()
                        .expect("lock")
                        .push(format!("conn {n}: {e}"));
                    return seen;
                }
            };
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard_limit {
                match conn.get("/").await {
                    Ok(a) if a.status == 200 => {
                        seen.push(a.version);
                        answers.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("conn {n}: status {} {:?}", a.status, a.body));
                    }
                    Err(e) => {
                        failures
                            .lock()
                            .expect("lock")
                            .push(format!("conn {n}: {e}"));
                        return seen;
                    }
                }
            }
            seen
        }));
    }
    // The load runs (v1 answers) before the deploy starts...
    let answered = |at_least: usize| {
        let (answers, failures) = (answers.clone(), failures.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while answers.load(Ordering::Relaxed) < at_least
                && failures.lock().expect("lock").is_empty()
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    answered(16).await;
    // The configured repository plus --tag.
    let out = h.proxy.cli(&["deploy", &h.svc, "--tag", "v2"]).await;
    eprintln!("[{}] {out}", h.svc);
    // ...and goes on after it (v2 answers).
    answered(answers.load(Ordering::Relaxed) + 16).await;
    stop.store(true, Ordering::Relaxed);
    let mut per_conn = Vec::new();
    for client in clients {
        per_conn.push(
            tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .expect("load client finished")
                .expect("load client task"),
        );
    }
    assert!(out.success(), "deploy --tag v2 failed: {out}");

    let failures = failures.lock().expect("lock").clone();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for seen in &per_conn {
        for v in seen {
            *counts.entry(v.clone()).or_default() += 1;
        }
    }
    eprintln!(
        "load: {counts:?} over 16 connections, {} failures, deploy took {:?}",
        failures.len(),
        out.elapsed
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(counts.get("v1").copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(counts.get("v2").copied().unwrap_or(0) > 0, "{counts:?}");
    assert_eq!(counts.len(), 2, "only v1 and v2 answered: {counts:?}");
    for (n, seen) in per_conn.iter().enumerate() {
        // Once a connection saw v2, it never sees v1 again.
        if let Some(first_v2) = seen.iter().position(|v| v == "v2") {
            assert!(
                seen[first_v2..].iter().all(|v| v == "v2"),
                "conn {n} went back to v1 after v2"
            );
        }
        assert_eq!(
            seen.last().map(String::as_str),
            Some("v2"),
            "conn {n} ended on v2"
        );
    }
    assert_eq!(h.version().await, "v2");

    // keep_previous = 15m: the v1 container is still running, warm.
    let listed = h.containers();
    let old = listed
        .iter()
        .find(|c| c.id == v1_container.id)
        .unwrap_or_else(|| panic!("the v1 container is gone:\n{}", h.ps()));
    assert!(old.running(), "v1 kept running: {old:?}");
    let new: Vec<_> = listed.iter().filter(|c| c.image.ends_with(":v2")).collect();
    assert_eq!(new.len(), 1, "{}", h.ps());
    assert!(new[0].running() && new[0].color != old.color, "{listed:?}");
    assert_eq!(listed.len(), 2, "{}", h.ps());

    let status = h.consistent().await;
    assert_eq!(
        active(&status).image.as_deref(),
        Some(format!("{}:v2", h.repo).as_str()),
        "{status:?}"
    );
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    assert_eq!(previous(&status).color, old.color, "{status:?}");
    h.done();
}

// ---------------------------------------------------------------------------
// 3. never healthy
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_healthy_image_is_refused_and_removed() {
    let h = Harness::start(
        "unhealthy",
        Opts {
            deadline: "3s",
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    let bad = h.image("bad", &[("HEALTH_FAIL", "1")]).await;
    h.deploy_ok(&v1).await;
    h.deploy_ok(&v2).await;
    assert_eq!(h.version().await, "v2");
    let before = h.containers();

    let out = h.deploy(&bad).await;
    assert_ne!(out.code, Some(0), "a never-healthy deploy must fail: {out}");
    assert_eq!(
        out.code,
        Some(i32::from(exit::FAILED)),
        "a failed deploy exits 1: {out}"
    );
    let text = lower(&out);
    assert!(
        text.contains("health"),
        "the reason names the health check: {out}"
    );
    assert!(
        text.contains("listening"),
        "the failed container's log lines are printed: {out}"
    );
    assert!(
        out.elapsed >= Duration::from_secs(3),
        "gave up before the 3 s deadline: {:?}",
        out.elapsed
    );
    assert_eq!(h.version().await, "v2", "v2 keeps serving");

    let listed = h.containers();
    let left = with_image(&listed, &bad);
    assert!(
        left.is_empty(),
        "the failed container is removed when the command returns:\n{}",
        h.ps()
    );
    // The active v2 container and the warm v1 container are untouched
    // (see failed_deploy_keeps_the_instant_rollback), and status agrees.
    assert_eq!(listed, before, "{}", h.ps());
    let status = h.consistent().await;
    assert_eq!(
        active(&status).image.as_deref(),
        Some(v2.as_str()),
        "{status:?}"
    );
    h.done();
}

// ---------------------------------------------------------------------------
// 4. crash during the health check
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_health_check_fails_fast() {
    let h = Harness::start(
        "crash",
        Opts {
            deadline: "20s",
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let crash = h
        .image(
            "crash",
            &[("CRASH_AFTER_MS", "300"), ("HEALTHY_AFTER_MS", "60000")],
        )
        .await;
    h.deploy_ok(&v1).await;
    let before = h.containers();

    let out = h.deploy(&crash).await;
    assert_ne!(out.code, Some(0), "a crashing deploy must fail: {out}");
    eprintln!(
        "crashing deploy failed after {:?} (deadline 20 s)",
        out.elapsed
    );
    assert!(
        out.elapsed < Duration::from_secs(8),
        "the exit is noticed, not the 20 s deadline waited out: {:?}\n{out}",
        out.elapsed
    );
    let text = lower(&out);
    assert!(text.contains("exit"), "the reason mentions the exit: {out}");
    assert!(
        text.contains("crashing as asked") || text.contains("listening"),
        "the crashed container's log lines are printed: {out}"
    );
    assert_eq!(h.version().await, "v1", "v1 keeps serving");
    let listed = h.containers();
    assert!(with_image(&listed, &crash).is_empty(), "{}", h.ps());
    let status = h.consistent().await;
    assert_eq!(
        active(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    assert_eq!(listed, before, "{}", h.ps());
    h.done();
}

// ---------------------------------------------------------------------------
// 5. rollback
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_to_warm_previous_is_instant() {
    let h = Harness::start("rbwarm", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    let v1_id = h.containers()[0].id.clone();
    h.deploy_ok(&v2).await;
    assert_eq!(h.version().await, "v2");
    let before: Vec<String> = h.containers().iter().map(|c| c.id.clone()).collect();
    assert_eq!(before.len(), 2, "{}", h.ps());

    let out = h.rollback().await;
    assert!(out.success(), "rollback failed: {out}");
    eprintln!(
        "warm rollback took {:?} (wall, CLI process included)",
        out.elapsed
    );
    assert_eq!(h.version().await, "v1", "traffic is back on v1");

    let after = h.containers();
    let ids: Vec<String> = after.iter().map(|c| c.id.clone()).collect();
    assert_eq!(
        {
            let mut a = ids.clone();
            a.sort();
            a
        },
        {
            let mut b = before.clone();
            b.sort();
            b
        },
        "no container was started or removed by a warm rollback:\n{}",
        h.ps()
    );
    let status = h.consistent().await;
    assert_eq!(
        active(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    let active_container = active(&status).container.as_deref().unwrap_or_default();
    assert!(
        (!active_container.is_empty() && v1_id.starts_with(active_container))
            || active_container.starts_with(&v1_id),
        "the original v1 container is active again ({v1_id}): {status:?}"
    );
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v2.as_str()),
        "v2 is now the warm previous: {status:?}"
    );
    h.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_previous_retired_starts_it_again() {
    let h = Harness::start(
        "rbcold",
        Opts {
            keep_previous: "1s",
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    let v1_id = h.containers()[0].id.clone();
    h.deploy_ok(&v2).await;
    assert_eq!(h.version().await, "v2");

    // keep_previous = 1s: the v1 container is stopped and removed.
    let t = Instant::now();
    let (listed, retired) = wait_containers(&h.svc, Duration::from_secs(20), |l| {
        l.iter().all(|c| c.id != v1_id)
    })
    .await;
    assert!(
        retired,
        "v1 not retired 20 s after keep_previous = 1s:\n{}",
        h.ps()
    );
    eprintln!(
        "previous retired {:?} after the deploy returned",
        t.elapsed()
    );
    assert_eq!(listed.len(), 1, "{}", h.ps());
    let status = h.consistent().await;
    eprintln!("status after retirement: {status:?}");

    let out = h.rollback().await;
    assert!(out.success(), "cold rollback failed: {out}");
    eprintln!("cold rollback took {:?}", out.elapsed);
    assert_eq!(h.version().await, "v1", "traffic is back on v1");
    let listed = h.containers();
    let v1_now = with_image(&listed, &v1);
    assert_eq!(v1_now.len(), 1, "{}", h.ps());
    assert!(v1_now[0].running(), "{:?}", v1_now[0]);
    assert_ne!(v1_now[0].id, v1_id, "a new container from the v1 image");
    let status = h.consistent().await;
    assert_eq!(
        active(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    h.done();
}

// ---------------------------------------------------------------------------
// 6. concurrent deploys
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_concurrent_deploy_is_refused() {
    let h = Harness::start("busy", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let slow = h.image("slow", &[("START_DELAY_MS", "3000")]).await;
    let v3 = h.image("v3", &[]).await;
    h.deploy_ok(&v1).await;

    let first = h.deploy_in_background(&slow, Duration::from_secs(120));
    // Wait until the first deploy has its container up (in the health check).
    h.wait_running(&slow, Duration::from_secs(15)).await;

    let second = h.deploy(&v3).await;
    assert_ne!(
        second.code,
        Some(0),
        "second deploy must be refused: {second}"
    );
    assert_eq!(
        second.code,
        Some(i32::from(exit::BUSY)),
        "busy exits 3 (retry later): {second}"
    );
    let text = lower(&second);
    assert!(
        text.contains("busy") || text.contains("already running") || text.contains("in progress"),
        "the refusal says why: {second}"
    );
    assert!(
        second.elapsed < Duration::from_secs(2),
        "refused at once, not queued: {:?}",
        second.elapsed
    );
    assert!(
        !first.is_finished(),
        "the first deploy was still running when the second was refused"
    );
    assert!(
        with_image(&h.containers(), &v3).is_empty(),
        "the refused deploy started nothing:\n{}",
        h.ps()
    );

    let first = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("first deploy finished")
        .expect("join");
    assert!(first.success(), "the first deploy completes: {first}");
    assert_eq!(h.version().await, "slow");
    let status = h.consistent().await;
    assert_eq!(
        active(&status).image.as_deref(),
        Some(slow.as_str()),
        "{status:?}"
    );
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    h.done();
}

// ---------------------------------------------------------------------------
// 7. proxy SIGKILLed mid-deploy
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_mid_deploy_recovers_without_orphans() {
    let mut h = Harness::start("kill", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let slow = h.image("slow", &[("START_DELAY_MS", "4000")]).await;
    h.deploy_ok(&v1).await;
    let v1_id = h.containers()[0].id.clone();

    let probes = h.health_checks_begun();
    let deploying = h.deploy_in_background(&slow, Duration::from_secs(60));
    h.wait_running(&slow, Duration::from_secs(15)).await;
    // In the health check: its first probe has been made.
    h.wait_health_probe(probes, Duration::from_secs(15)).await;
    h.proxy.kill9();
    let killed_at = Instant::now();
    let cli_out = tokio::time::timeout(Duration::from_secs(10), deploying)
        .await
        .expect("the deploy command notices the dead server")
        .expect("join");
    eprintln!("deploy command when the server died: {cli_out}");
    assert_ne!(cli_out.code, Some(0), "{cli_out}");
    eprintln!("at SIGKILL:\n{}", h.ps());

    h.proxy.spawn().await;
    eprintln!("restarted {:?} after the kill", killed_at.elapsed());

    // Bounded: the half-started container goes, v1 keeps (or again) serving.
    let (listed, clean) = wait_containers(&h.svc, Duration::from_secs(30), |l| {
        with_image(l, &slow).is_empty()
    })
    .await;
    eprintln!("after restart ({:?}):\n{}", killed_at.elapsed(), h.ps());
    assert!(
        clean,
        "the half-started container is still there:\n{}",
        h.ps()
    );
    let answer = wait_for_version(h.proxy.http, "v1", Duration::from_secs(15)).await;
    assert_eq!(answer.status, 200);
    assert!(
        listed.len() == 1 && listed[0].id == v1_id && listed[0].running(),
        "only the active v1 container remains:\n{}",
        h.ps()
    );
    let status = h.consistent().await;
    assert_eq!(
        active(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    // Exactly one active colour, and it is the v1 container's.
    assert_eq!(active(&status).color, listed[0].color, "{status:?}");
    h.done();
}

// ---------------------------------------------------------------------------
// 8. fixed host port taken
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_host_port_fails_clearly_and_leaves_nothing() {
    let ports = [free_port(), free_port()];
    assert_ne!(ports[0], ports[1]);
    let h = Harness::start(
        "port",
        Opts {
            host_ports: Some(ports),
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    let status = h.consistent().await;
    let upstream: SocketAddr = active(&status)
        .upstream
        .parse()
        .unwrap_or_else(|_| panic!("{status:?}"));
    assert!(
        ports.contains(&upstream.port()),
        "v1 is published on a configured host port {ports:?}: {status:?}"
    );
    // The port the next colour needs: the other one. Hold it.
    let taken = if upstream.port() == ports[0] {
        ports[1]
    } else {
        ports[0]
    };
    let blocker = std::net::TcpListener::bind(("127.0.0.1", taken))
        .unwrap_or_else(|e| panic!("bind 127.0.0.1:{taken}: {e}"));
    let before = h.containers();

    let out = h.deploy(&v2).await;
    assert_ne!(
        out.code,
        Some(0),
        "deploy onto a taken port must fail: {out}"
    );
    let text = lower(&out);
    assert!(
        text.contains(&taken.to_string()),
        "the error names the port {taken}: {out}"
    );
    assert!(
        text.contains("in use"),
        "the error says the address is in use: {out}"
    );
    assert!(
        out.elapsed < Duration::from_secs(5),
        "fails at start, no health deadline: {:?}",
        out.elapsed
    );
    assert_eq!(h.version().await, "v1", "v1 keeps serving");
    let listed = h.containers();
    assert!(with_image(&listed, &v2).is_empty(), "{}", h.ps());
    assert_eq!(listed, before, "{}", h.ps());
    h.consistent().await;
    drop(blocker);
    h.done();
}

// ---------------------------------------------------------------------------
// Beyond the basic list: rollback with nothing, restart with a warm previous,
// keep_previous after a double rollback, env/env_file, retain.
// ---------------------------------------------------------------------------

/// `cutover deploy`'s refused and unreachable exit codes (failed and busy
/// are checked by the never-healthy and concurrent-deploy tests): CI
/// scripts branch on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_exit_codes_for_refused_and_unreachable() {
    let h = Harness::start("codes", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let out = h
        .proxy
        .cli(&["deploy", "no-such-service", "--image", &v1])
        .await;
    assert_eq!(
        out.code,
        Some(i32::from(exit::REFUSED)),
        "unknown service: {out}"
    );
    assert!(lower(&out).contains("unknown service"), "{out}");

    let json = h
        .proxy
        .cli(&["deploy", "no-such-service", "--image", &v1, "--json"])
        .await;
    assert_eq!(json.code, Some(i32::from(exit::REFUSED)), "{json}");
    let reply: cutover::admin::Reply = serde_json::from_str(json.stdout.trim())
        .unwrap_or_else(|err| panic!("one typed reply line ({err}): {json}"));
    match reply {
        cutover::admin::Reply::Error { error } => {
            assert_eq!(error.kind, cutover::admin::proto::ErrorKind::Refused)
        }
        other => panic!("expected an error reply: {other:?}"),
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let nowhere = dir.path().join("no-server.sock");
    let nowhere = nowhere.to_str().expect("utf-8 path");
    let args = ["deploy", &h.svc, "--image", &v1, "--socket", nowhere];
    let out = cli(&args, Duration::from_secs(30)).await;
    assert_eq!(
        out.code,
        Some(i32::from(exit::UNREACHABLE)),
        "wrong socket path: {out}"
    );
    assert!(lower(&out).contains("cannot reach"), "{out}");
    // Nothing was deployed by any of them.
    assert!(h.containers().is_empty(), "{}", h.ps());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_with_nothing_to_roll_back_is_refused() {
    let h = Harness::start("rbnone", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let out = h.rollback().await;
    assert_ne!(out.code, Some(0), "rollback before any deploy: {out}");
    assert_eq!(out.code, Some(i32::from(exit::REFUSED)), "{out}");
    assert!(lower(&out).contains("nothing to roll back"), "{out}");
    h.deploy_ok(&v1).await;
    let out = h.rollback().await;
    assert_ne!(out.code, Some(0), "rollback after a single deploy: {out}");
    assert!(lower(&out).contains("nothing to roll back"), "{out}");
    assert_eq!(h.version().await, "v1");
    h.consistent().await;
    h.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_warm_previous_and_still_retires_it() {
    let mut h = Harness::start(
        "rbrestart",
        Opts {
            keep_previous: "4s",
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    let v1_id = h.containers()[0].id.clone();
    h.deploy_ok(&v2).await;
    let deployed = Instant::now();

    h.proxy.kill9();
    h.proxy.spawn().await;
    assert_eq!(h.version().await, "v2");
    // Still inside keep_previous: the warm v1 survives the restart...
    let status = h.consistent().await;
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    assert!(
        deployed.elapsed() < Duration::from_secs(3),
        "test too slow to check the warm window"
    );
    // ...and is still retired on time by the restarted server.
    let (_, retired) = wait_containers(&h.svc, Duration::from_secs(15), |l| {
        l.iter().all(|c| c.id != v1_id)
    })
    .await;
    assert!(
        retired,
        "warm previous never retired after the restart:\n{}",
        h.ps()
    );
    eprintln!(
        "previous retired {:?} after the deploy (keep_previous 4s, restart in between)",
        deployed.elapsed()
    );
    assert!(
        deployed.elapsed() >= Duration::from_secs(3),
        "retired early"
    );
    let status = h.consistent().await;
    assert!(status.previous.is_none(), "{status:?}");
    h.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_rollback_restarts_the_keep_previous_clock() {
    let h = Harness::start(
        "pingpong",
        Opts {
            keep_previous: "5s",
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    let v1_id = h.containers()[0].id.clone();
    h.deploy_ok(&v2).await; // v1 warm until ~t+5s
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(h.rollback().await.success()); // v1 active, v2 warm
    assert!(h.rollback().await.success()); // v2 active, v1 warm again, until ~t+7.5s
    let again = Instant::now();
    assert_eq!(h.version().await, "v2");
    // Check between the first retirement time and the new one.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let listed = h.containers();
    let v1_now = listed.iter().find(|c| c.id == v1_id);
    assert!(
        v1_now.is_some_and(Ctr::running),
        "v1 became the previous colour again {:?} ago with keep_previous = 5s, \
         but it is already gone (retired by the first deploy's timer):\n{}",
        again.elapsed(),
        h.ps()
    );
    let status = h.consistent().await;
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    h.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_and_env_file_reach_the_container() {
    let h = Harness::start(
        "env",
        Opts {
            deadline: "3s",
            extra: r#"env = { HEALTH_FAIL = "0" }
env_file = "app.env""#,
            ..Opts::default()
        },
    )
    .await;
    // The image alone is never healthy; the config's env turns that off.
    let v1 = h.image("v1", &[("HEALTH_FAIL", "1")]).await;
    // Read at deploy time, so written after the server started.
    std::fs::write(
        h.dir().join("app.env"),
        "# comment\n\nAPP_VERSION=fromfile\n",
    )
    .expect("env file");
    h.deploy_ok(&v1).await;
    assert_eq!(
        h.version().await,
        "fromfile",
        "env_file overrides image ENV"
    );

    std::fs::write(h.dir().join("app.env"), "APP_VERSION=edited\n").expect("env file");
    h.deploy_ok(&v1).await;
    assert_eq!(
        h.version().await,
        "edited",
        "env_file is re-read per deploy"
    );

    std::fs::remove_file(h.dir().join("app.env")).expect("rm env file");
    let out = h.deploy(&v1).await;
    assert_ne!(out.code, Some(0), "missing env_file: {out}");
    assert!(out.text().contains("app.env"), "names the file: {out}");
    assert_eq!(h.version().await, "edited");
    h.consistent().await;
    h.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_prunes_old_images() {
    let h = Harness::start(
        "retain",
        Opts {
            retain: 1,
            ..Opts::default()
        },
    )
    .await;
    let mut images = Vec::new();
    for tag in ["v1", "v2", "v3", "v4"] {
        images.push(h.image(tag, &[]).await);
    }
    for image in &images {
        h.deploy_ok(image).await;
    }
    assert_eq!(h.version().await, "v4");
    let present = |image: &str| {
        std::process::Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .expect("docker image inspect")
            .status
            .success()
    };
    let kept: Vec<bool> = images.iter().map(|i| present(i)).collect();
    eprintln!("retain = 1 after deploying v1..v4: present {kept:?}");
    assert_eq!(
        kept,
        vec![false, false, true, true],
        "retain = 1 keeps the active image plus one rollback target"
    );
    h.consistent().await;
    h.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_deploy_exits_in_time_and_restart_is_clean() {
    let mut h = Harness::start("term", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let slow = h.image("slow", &[("START_DELAY_MS", "4000")]).await;
    h.deploy_ok(&v1).await;
    let v1_id = h.containers()[0].id.clone();

    let probes = h.health_checks_begun();
    let deploying = h.deploy_in_background(&slow, Duration::from_secs(60));
    h.wait_running(&slow, Duration::from_secs(15)).await;
    h.wait_health_probe(probes, Duration::from_secs(15)).await;
    let t = Instant::now();
    // shutdown_timeout = 2s; stop_timeout = 1s.
    let status = tokio::task::block_in_place(|| h.proxy.terminate(Duration::from_secs(10)));
    eprintln!(
        "SIGTERM mid-deploy: exit {status:?} after {:?}",
        t.elapsed()
    );
    assert!(
        status.is_some(),
        "cutover serve still running 10 s after SIGTERM"
    );
    let out = tokio::time::timeout(Duration::from_secs(10), deploying)
        .await
        .expect("deploy command ends")
        .expect("join");
    eprintln!("deploy command at shutdown: {out}");
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        lower(&out).contains("shutting down") && lower(&out).contains("was removed"),
        "the deploy is cancelled and says so: {out}"
    );
    // The shutdown cancelled the deploy and removed its container itself.
    assert!(
        with_image(&h.containers(), &slow).is_empty(),
        "graceful exit leaves no half-started container:\n{}",
        h.ps()
    );

    h.proxy.spawn().await;
    let (listed, clean) = wait_containers(&h.svc, Duration::from_secs(30), |l| {
        with_image(l, &slow).is_empty()
    })
    .await;
    assert!(clean, "{}", h.ps());
    wait_for_version(h.proxy.http, "v1", Duration::from_secs(15)).await;
    assert!(
        listed.len() == 1 && listed[0].id == v1_id,
        "only v1 remains:\n{}",
        h.ps()
    );
    h.consistent().await;
    h.done();
}

// ---------------------------------------------------------------------------
// Engine unreachable at start-up
// ---------------------------------------------------------------------------

/// With the Docker engine unreachable after a restart, the proxy keeps
/// serving its last known upstream, `status` says the engine is
/// unreachable, and a deploy fails clearly without touching traffic.
#[tokio::test]
async fn engine_unreachable_at_restart_keeps_serving_and_says_so() {
    let mut h = Harness::start("nodocker", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    h.deploy_ok(&v1).await;
    let v2 = h.image("v2", &[]).await;

    h.proxy.kill9();
    let dead = format!("unix://{}/no-docker.sock", h.dir().display());
    h.proxy.env.push(("DOCKER_HOST".into(), dead));
    h.proxy.spawn().await;

    assert_eq!(h.version().await, "v1", "last known upstream keeps serving");
    let status = h.proxy.status_all().await;
    assert!(
        status.docker.starts_with("unreachable"),
        "status reports the engine: {status:?}"
    );
    let out = h.deploy(&v2).await;
    assert!(!out.success(), "deploy without an engine must fail: {out}");
    assert!(out.text().contains("docker"), "{out}");
    assert_eq!(
        h.version().await,
        "v1",
        "a failed deploy leaves traffic alone"
    );
    h.done();
}

// ---------------------------------------------------------------------------
// Instance identity and lost state (issue 11, item 9)
// ---------------------------------------------------------------------------

/// Container ids, sorted, for "nothing was started or removed" checks.
fn ids(listed: &[Ctr]) -> Vec<String> {
    let mut ids: Vec<String> = listed.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    ids
}

/// The state directory is wiped while cutover is stopped (a restart
/// without state): the restarted cutover adopts the container that served
/// (and the warm one) instead of removing them as orphans and answering
/// 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_state_adopts_the_serving_container() {
    let mut h = Harness::start("adopt", Opts::default()).await;
    let (_, v2) = h.v1_then_v2().await;
    let before = h.consistent().await;
    let containers_before = ids(&h.containers());
    assert_eq!(containers_before.len(), 2, "{}", h.ps());

    let exit = tokio::task::block_in_place(|| h.proxy.terminate(Duration::from_secs(10)));
    assert!(exit.is_some(), "cutover serve did not exit on SIGTERM");
    let state_dir = h.dir().join("state");
    std::fs::remove_dir_all(&state_dir).expect("wipe the state directory");
    h.proxy.spawn().await;

    assert_eq!(
        h.version().await,
        "v2",
        "the serving container keeps serving"
    );
    assert_eq!(
        ids(&h.containers()),
        containers_before,
        "no container was removed or started:\n{}",
        h.ps()
    );
    let status = h.consistent().await;
    assert_eq!(active(&status).container, active(&before).container);
    assert_eq!(
        active(&status).image.as_deref(),
        Some(v2.as_str()),
        "{status:?}"
    );
    assert_eq!(
        previous(&status).container,
        previous(&before).container,
        "the warm v1 container is adopted as the previous colour: {status:?}"
    );
    let log = h.proxy.log_text();
    assert!(!log.contains("removing orphan"), "{log}");
    assert!(log.contains("adopted"), "the log says what happened: {log}");

    // The adopted pair works as before: an instant rollback to v1.
    let out = h.rollback().await;
    assert!(out.success(), "rollback after adoption: {out}");
    assert!(out.stdout.contains("\"instant\":true"), "{out}");
    assert_eq!(h.version().await, "v1");
    assert_eq!(ids(&h.containers()), containers_before, "{}", h.ps());
    h.consistent().await;
    h.done();
}

/// Two cutovers on one engine with the same service name (another state
/// directory, or another configured `instance`): each starts, deploys,
/// restarts and rolls back without touching the other's containers, and
/// each one's `status` keeps matching the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_one_service_name_never_touch_each_other() {
    let mut first = Harness::start("twoinst", Opts::default()).await;
    let (v1, v2) = first.v1_then_v2().await;
    let first_containers = ids(&first.containers());
    assert_eq!(first_containers.len(), 2, "{}", first.ps());

    let mut second = first
        .beside(Opts {
            instance: Some(format!("second-{}", std::process::id())),
            ..Opts::default()
        })
        .await;
    assert_ne!(first.instance, second.instance);
    let unchanged = |first: &Harness, when: &str| {
        assert_eq!(
            ids(&first.containers()),
            first_containers,
            "the first instance's containers changed {when}:\n{}",
            first.ps()
        );
    };
    unchanged(&first, "when the second started");
    assert_eq!(first.version().await, "v2");

    second.deploy_ok(&v1).await;
    second.deploy_ok(&v2).await;
    let second_containers = ids(&second.containers());
    assert_eq!(second_containers.len(), 2, "{}", second.ps());
    unchanged(&first, "during the second's deploys");
    let status = first.consistent().await;
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    assert_eq!(first.version().await, "v2");
    second.consistent().await;

    // Each restart reconciles only its own containers.
    first.proxy.kill9();
    first.proxy.spawn().await;
    second.proxy.kill9();
    second.proxy.spawn().await;
    unchanged(&first, "across the restarts");
    assert_eq!(
        ids(&second.containers()),
        second_containers,
        "{}",
        second.ps()
    );
    first.consistent().await;
    second.consistent().await;

    // A rollback of one is instant and leaves the other serving as it was.
    let out = first.rollback().await;
    assert!(out.success(), "{out}");
    assert_eq!(first.version().await, "v1");
    assert_eq!(second.version().await, "v2");
    second.consistent().await;
    first.consistent().await;
    drop(second);
    first.done();
}

/// An image service without `state_dir` is refused by `check` and
/// `serve`, with the service's file:line: without the state file a restart
/// cannot tell which container serves.
#[tokio::test]
async fn image_service_without_state_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp = \"127.0.0.1:{}\"\n\n[service.web]\nimage = \"web\"\nport = 8080\n",
            free_port()
        ),
    )
    .expect("write config");
    let path = config.to_str().expect("utf-8");
    for command in ["check", "serve"] {
        let out = cli(&[command, "--config", path], Duration::from_secs(20)).await;
        assert_ne!(out.code, Some(0), "{out}");
        assert!(
            out.stderr.contains(&format!("{path}:4:")) && out.stderr.contains("state_dir"),
            "names the service's line and the missing key: {out}"
        );
    }
}

// ---------------------------------------------------------------------------
// A failed deploy keeps the warm previous colour (issue 11, item 10)
// ---------------------------------------------------------------------------

/// With ephemeral host ports the warm previous colour is kept until the new
/// container has passed its health check: after a failed deploy, rollback
/// is still an instant swap (no container started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deploy_keeps_the_instant_rollback() {
    let h = Harness::start(
        "keepwarm",
        Opts {
            deadline: "2s",
            ..Opts::default()
        },
    )
    .await;
    let (v1, v2) = h.v1_then_v2().await;
    let bad = h.image("bad", &[("HEALTH_FAIL", "1")]).await;
    let warm = previous(&h.consistent().await).container.clone();
    let before = ids(&h.containers());

    let out = h.deploy(&bad).await;
    assert_ne!(out.code, Some(0), "a never-healthy deploy must fail: {out}");
    assert_eq!(ids(&h.containers()), before, "{}", h.ps());
    let status = h.consistent().await;
    assert_eq!(previous(&status).container, warm, "{status:?}");
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );

    let out = h.rollback().await;
    assert!(out.success(), "rollback after a failed deploy: {out}");
    assert!(
        out.stdout.contains("\"instant\":true"),
        "an instant swap: {out}"
    );
    assert_eq!(h.version().await, "v1");
    assert_eq!(
        ids(&h.containers()),
        before,
        "no container was started or removed:\n{}",
        h.ps()
    );
    let status = h.consistent().await;
    assert_eq!(active(&status).container, warm, "{status:?}");

    // A successful deploy then retires the superseded warm colour (v2 is
    // warm now; deploying v2's colour again replaces it).
    h.deploy_ok(&v2).await;
    let status = h.consistent().await;
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    assert_eq!(h.containers().len(), 2, "{}", h.ps());
    h.done();
}

/// With fixed `host_ports` the warm previous colour holds the port the new
/// container needs: the deploy says it gives it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_host_ports_deploy_says_it_gives_up_the_warm_previous() {
    let h = Harness::start(
        "fixedwarm",
        Opts {
            host_ports: Some([free_port(), free_port()]),
            ..Opts::default()
        },
    )
    .await;
    let (_, v2) = h.v1_then_v2().await;
    let v3 = h.image("v3", &[]).await;
    let out = h.deploy_ok(&v3).await;
    let text = lower(&out);
    assert!(
        text.contains("host_ports are fixed") && text.contains("giving up the warm previous"),
        "the deploy says the warm previous colour is given up: {out}"
    );
    assert_eq!(h.version().await, "v3");
    let status = h.consistent().await;
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v2.as_str()),
        "{status:?}"
    );
    h.done();
}

// ---------------------------------------------------------------------------
// Shutdown waits for an operation whose client went away (issue 11, item 6)
// ---------------------------------------------------------------------------

/// A deploy whose CLI went away is still the server's to finish: SIGTERM
/// during its health check cancels it, and the server removes the new
/// container before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_the_client_went_away_removes_the_new_container() {
    let mut h = Harness::start(
        "termgone",
        Opts {
            deadline: "60s",
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let slow = h.image("slow", &[("START_DELAY_MS", "30000")]).await;
    h.deploy_ok(&v1).await;

    let deploying = h.deploy_in_background(&slow, Duration::from_secs(90));
    // Its container runs: the deploy is in its health check.
    let new = h.wait_running(&slow, Duration::from_secs(30)).await;
    // Dropping the task kills the CLI process (kill_on_drop).
    deploying.abort();
    let _ = deploying.await;
    // The server notices at its next progress line.
    let start = Instant::now();
    while !h.proxy.log_text().contains("admin client went away") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the server never noticed the client left:\n{}",
            h.proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let exit = tokio::task::block_in_place(|| h.proxy.terminate(Duration::from_secs(15)));
    assert!(exit.is_some(), "cutover serve did not exit on SIGTERM");
    let left: Vec<Ctr> = h
        .containers()
        .into_iter()
        .filter(|c| c.id == new.id)
        .collect();
    assert!(
        left.is_empty(),
        "the cancelled deploy's container is still there after the server exited: {left:?}\n{}",
        h.proxy.log_text()
    );
    assert!(
        h.proxy.log_text().contains("the deploy was cancelled"),
        "{}",
        h.proxy.log_text()
    );

    h.proxy.spawn().await;
    assert_eq!(h.version().await, "v1");
    h.consistent().await;
    h.done();
}
