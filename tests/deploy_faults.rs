//! Deploy faults against the real Docker engine, through the real binary.
//!
//! Each test injects one fault into a running deploy and checks the same
//! three outcomes: one healthy active colour keeps serving, the caller gets
//! a clear error (non-zero exit and the reason), and no orphan container is
//! left (the service's containers are exactly the active one and, when
//! status names one, the warm previous one; see `Harness::consistent`).
//!
//! | fault | how it is injected |
//! |---|---|
//! | container killed during the health check | `docker kill`, `docker rm -f` |
//! | engine gone mid-deploy | a Unix-socket forwarder between cutover and the engine, cut and restored (an engine restart as the socket sees it; containers keep running) |
//! | proxy SIGKILLed at each deploy step | `cutover deploy --json` progress events trigger the kill |
//! | state directory read-only / full | a read-only bind mount / a full 256 KiB tmpfs (we run as root: chmod would not stop a write) |
//! | image missing, registry unreachable | `127.0.0.1:<closed port>/...` and a registry that accepts but never answers |
//! | racing clients | deploy vs rollback, deploy vs deploy, started together |
//!
//! Each test has its own service name and images and removes them when it
//! ends, pass or fail. Waits are bounded; nothing asserts on durations.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use cutover::admin::Reply;
use serde_json::Value;
use support::cutover::*;
use support::harness::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// Upper bound for one deploy command in these tests (a hang guard).
const DEPLOY_LIMIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------

/// The tag of an image reference (`repo:tag` → `tag`): what the test app
/// reports as its version.
fn tag(image: &str) -> &str {
    image.rsplit(':').next().unwrap_or(image)
}

/// How long a background deploy may take (the harness's CLI bound).
const CLI_LIMIT: Duration = Duration::from_secs(120);

/// How long a deploy's container may take to come up.
const RUNNING_WITHIN: Duration = Duration::from_secs(30);

async fn finish(task: JoinHandle<CliOutput>) -> CliOutput {
    tokio::time::timeout(DEPLOY_LIMIT, task)
        .await
        .expect("deploy command ended")
        .expect("join deploy task")
}

/// Everything agrees and one healthy colour serves: engine and status
/// (`consistent`: no orphans), traffic (the version answering is the active
/// image's), and the state file (names the same colour and container).
/// Returns the version serving.
async fn all_agree(h: &Harness) -> String {
    let status = h.consistent().await;
    let active = active(&status);
    let image = active
        .image
        .clone()
        .unwrap_or_else(|| panic!("no active image: {status:?}"));
    let served = h.version().await;
    assert_eq!(
        served,
        tag(&image),
        "traffic and status disagree: {status:?}"
    );
    // The state file is read as written (its on-disk form), the status as
    // the typed report.
    let state = state_file(h);
    let saved = &state["services"][&h.svc];
    assert_eq!(saved["color"], active.color.as_str(), "state file: {state}");
    assert_eq!(
        saved["container"]["id"].as_str(),
        active.container.as_deref(),
        "state file: {state}"
    );
    served
}

/// Waits (bounded) until every container of the service is the active or
/// the previous one per `status`, and no interrupted create is still being
/// watched for. After a crash or an engine outage during a create, the
/// engine may finish the create after reconciliation looked: cutover then
/// watches for that container (`status` shows it as `starting`) and
/// removes it when it appears.
async fn wait_no_orphans(h: &Harness) {
    let start = Instant::now();
    loop {
        let status = h.status().await;
        let named: Vec<&str> = [
            status.active.as_ref().and_then(|a| a.container.as_deref()),
            status
                .previous
                .as_ref()
                .and_then(|p| p.container.as_deref()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let listed = h.containers();
        if status.starting.is_none() && listed.iter().all(|c| named.contains(&c.id.as_str())) {
            return;
        }
        if start.elapsed() > Duration::from_secs(45) {
            panic!("orphans left: {status:?}\n{}", h.ps());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn state_dir(h: &Harness) -> PathBuf {
    let config = std::fs::read_to_string(&h.proxy.config).expect("read config");
    let line = config
        .lines()
        .find(|l| l.starts_with("state_dir"))
        .expect("state_dir in config");
    PathBuf::from(line.split('"').nth(1).expect("quoted state_dir"))
}

fn state_file(h: &Harness) -> Value {
    let path = state_dir(h).join("state.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

fn assert_failed_with(out: &CliOutput, needles: &[&str]) {
    assert_ne!(out.code, Some(0), "the deploy must fail: {out}");
    let text = lower(out);
    for needle in needles {
        assert!(
            text.contains(&needle.to_lowercase()),
            "the error says {needle:?}: {out}"
        );
    }
}

// ---------------------------------------------------------------------------
// 1. container killed during the health check
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_killed_during_health_check() {
    let h = Arc::new(
        Harness::start(
            "fkill",
            Opts {
                deadline: "60s",
                ..Opts::default()
            },
        )
        .await,
    );
    let v1 = h.image("v1", &[]).await;
    // Listens at once, but /health answers 503 for a minute: the deploy
    // sits in its health check until something happens.
    let slow = h.image("slow", &[("HEALTHY_AFTER_MS", "60000")]).await;
    h.deploy_ok(&v1).await;
    let before = h.containers();

    // `rm -f` kills the container (SIGKILL) before removing it, so it is
    // seen as "disappeared", as an exit with an unknown code if the inspect
    // lands mid-removal, or as the kill's exit 137 if it lands before.
    for (how, expect) in [
        ("kill", &["exit code 137"][..]),
        (
            "rm",
            &[
                "container disappeared",
                "exit code unknown",
                "exit code 137",
            ][..],
        ),
    ] {
        let probes = h.health_checks_begun();
        let deploying = h.deploy_in_background(&slow, CLI_LIMIT);
        let victim = h.wait_running(&slow, RUNNING_WITHIN).await;
        h.wait_health_probe(probes, RUNNING_WITHIN).await;
        match how {
            "kill" => docker(&["kill", &victim.id]),
            _ => docker(&["rm", "-f", &victim.id]),
        };
        let out = finish(deploying).await;
        eprintln!("docker {how} during the health check: {out}");
        assert_failed_with(&out, &["keeps serving", "was removed"]);
        assert!(
            expect.iter().any(|e| lower(&out).contains(e)),
            "the error says one of {expect:?}: {out}"
        );
        assert_eq!(
            h.version().await,
            "v1",
            "v1 keeps serving after docker {how}"
        );
        assert_eq!(h.containers(), before, "nothing left behind:\n{}", h.ps());
        assert_eq!(all_agree(&h).await, "v1");
    }
    h.done();
}

// ---------------------------------------------------------------------------
// 2. Docker engine unavailable mid-deploy
// ---------------------------------------------------------------------------

/// A Unix-socket relay between cutover and the real engine that the test
/// can cut (close every relayed connection, stop listening, remove the
/// socket file) and restore. To cutover this is an engine restart at the
/// socket level; unlike a real restart, containers keep running, which is
/// also what an engine with `live-restore` does. The machine's real engine
/// is never touched.
struct EngineSocket {
    path: PathBuf,
    target: PathBuf,
    accept: Option<JoinHandle<()>>,
    relays: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl EngineSocket {
    fn start(path: PathBuf) -> EngineSocket {
        let mut socket = EngineSocket {
            path,
            target: real_engine_socket(),
            accept: None,
            relays: Arc::default(),
        };
        socket.restore();
        socket
    }

    fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Listens again: new connections reach the engine.
    fn restore(&mut self) {
        assert!(self.accept.is_none(), "already relaying");
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind forwarder socket");
        let (target, relays) = (self.target.clone(), Arc::clone(&self.relays));
        self.accept = Some(tokio::spawn(async move {
            // Ends when cut (aborted) or when accepting fails.
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut engine) = UnixStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut engine).await;
                    }
                });
                relays.lock().expect("relays").push(relay);
            }
        }));
    }

    /// Stops listening and drops every relayed connection mid-flight.
    async fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        let relays: Vec<_> = self.relays.lock().expect("relays").drain(..).collect();
        for relay in relays {
            relay.abort();
            let _ = relay.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EngineSocket {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        if let Ok(relays) = self.relays.lock() {
            relays.iter().for_each(JoinHandle::abort);
        }
    }
}

/// The engine socket the docker CLI and the test images use.
fn real_engine_socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => {
            PathBuf::from(host.strip_prefix("unix://").unwrap_or_else(|| {
                panic!("DOCKER_HOST={host}: only unix:// engines are supported")
            }))
        }
        _ => PathBuf::from("/var/run/docker.sock"),
    }
}

async fn docker_status(h: &Harness) -> String {
    h.proxy.status_all().await.docker
}

/// Polls `status` until its docker line starts with `prefix` (bounded).
async fn wait_docker_status(h: &Harness, prefix: &str) -> String {
    let start = Instant::now();
    loop {
        let now = docker_status(h).await;
        if now.starts_with(prefix) || start.elapsed() > Duration::from_secs(30) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_gone_mid_deploy() {
    let sockets = tempfile::tempdir().expect("tempdir");
    let mut engine = EngineSocket::start(sockets.path().join("docker.sock"));
    let h = Harness::start(
        "fengine",
        Opts {
            deadline: "60s",
            env: vec![("DOCKER_HOST".into(), engine.url())],
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    let slow = h.image("slow", &[("HEALTHY_AFTER_MS", "60000")]).await;
    h.deploy_ok(&v1).await;

    // (a) The engine is gone when the deploy starts: refused, nothing made.
    engine.cut().await;
    let out = h.deploy(&v2).await;
    assert_failed_with(&out, &["docker engine unreachable"]);
    assert_eq!(h.version().await, "v1");
    assert!(docker_status(&h).await.starts_with("unreachable"));
    engine.restore();

    // (b) The engine goes away during the health check. cutover can no
    // longer watch or remove the new container, so it does not switch to
    // it, says so, and removes it once the engine is back: no restart.
    let h = Arc::new(h);
    let probes = h.health_checks_begun();
    let deploying = h.deploy_in_background(&slow, CLI_LIMIT);
    let stranded = h.wait_running(&slow, RUNNING_WITHIN).await;
    h.wait_health_probe(probes, RUNNING_WITHIN).await;
    engine.cut().await;
    let out = finish(deploying).await;
    eprintln!("engine cut during the health check: {out}");
    assert_failed_with(
        &out,
        &[
            "lost the docker engine",
            "keeps serving",
            "removes it as soon as the engine answers again",
        ],
    );
    assert_eq!(
        h.version().await,
        "v1",
        "v1 serves while the engine is gone"
    );
    assert!(
        h.containers().iter().any(|c| c.id == stranded.id),
        "the cut was real: cutover could not remove the new container yet\n{}",
        h.ps()
    );
    assert!(wait_docker_status(&h, "unreachable")
        .await
        .starts_with("unreachable"));
    engine.restore();
    let (_, gone) = wait_containers(&h.svc, Duration::from_secs(30), |l| {
        l.iter().all(|c| c.id != stranded.id)
    })
    .await;
    assert!(
        gone,
        "the stranded container is removed once the engine is back:\n{}",
        h.ps()
    );
    assert_eq!(wait_docker_status(&h, "ok").await, "ok");
    assert_eq!(all_agree(&h).await, "v1");

    // (c) As (b), but cutover is also SIGKILLed and restarted while the
    // engine is still gone: it serves v1 unchecked, and reconciles (removes
    // the stranded container) when the engine comes back.
    let deploying = h.deploy_in_background(&slow, CLI_LIMIT);
    let stranded = h.wait_running(&slow, RUNNING_WITHIN).await;
    engine.cut().await;
    let out = finish(deploying).await;
    assert_failed_with(&out, &["lost the docker engine"]);
    let mut h = Arc::into_inner(h).expect("no other owner");
    h.proxy.kill9();
    h.proxy.spawn().await;
    assert_eq!(
        h.version().await,
        "v1",
        "restart without an engine serves v1"
    );
    assert!(h.containers().iter().any(|c| c.id == stranded.id));
    engine.restore();
    let (_, gone) = wait_containers(&h.svc, Duration::from_secs(30), |l| {
        l.iter().all(|c| c.id != stranded.id)
    })
    .await;
    assert!(gone, "reconciled once the engine is back:\n{}", h.ps());
    assert_eq!(all_agree(&h).await, "v1");

    // (d) The engine goes away as the container is being created: the
    // create may or may not reach the engine. Either way the deploy fails
    // clearly and, once the engine is back, nothing is left.
    let mut deploy = JsonDeploy::start(&h, &v2);
    assert!(deploy.until("starting").await, "no starting event");
    engine.cut().await;
    let out = deploy.finish().await;
    eprintln!("engine cut at the create: {out}");
    assert_failed_with(
        &out,
        &["docker engine unreachable", "traffic was not moved"],
    );
    assert_eq!(h.version().await, "v1");
    engine.restore();
    wait_no_orphans(&h).await;
    assert_eq!(all_agree(&h).await, "v1");

    h.deploy_ok(&v2).await;
    assert_eq!(all_agree(&h).await, "v2", "a deploy works again");

    // (e) A real engine restart (without live-restore) also stops every
    // container. Cut the engine mid-deploy and kill the serving v2 as the
    // restart would: once the engine answers, cutover starts v2 again (the
    // containers have no restart policy) and removes the stranded one.
    let active = active(&h.status().await)
        .container
        .clone()
        .expect("active container");
    let deploying = {
        let h = Arc::new(h);
        let task = h.deploy_in_background(&slow, CLI_LIMIT);
        h.wait_running(&slow, RUNNING_WITHIN).await;
        engine.cut().await;
        let out = finish(task).await;
        assert_failed_with(&out, &["lost the docker engine"]);
        Arc::into_inner(h).expect("no other owner")
    };
    let h = deploying;
    docker(&["kill", &active]);
    engine.restore();
    wait_for_version(h.proxy.http, "v2", Duration::from_secs(60)).await;
    wait_no_orphans(&h).await;
    assert_eq!(all_agree(&h).await, "v2");
    assert_eq!(
        support::harness::active(&h.status().await)
            .container
            .as_deref(),
        Some(active.as_str()),
        "the same container was started again"
    );
    h.done();
}

// ---------------------------------------------------------------------------
// 2b. engine restart or host reboot while cutover is down
// ---------------------------------------------------------------------------

/// An engine restart or a host reboot stops every container (they have no
/// restart policy). The restarted cutover starts the active one again
/// instead of removing it and answering 503 until the next deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_active_container_is_started_again_at_restart() {
    let mut h = Harness::start("freboot", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    h.deploy_ok(&v2).await;
    let status = h.consistent().await;
    let active = active(&status).container.clone().expect("active");

    h.proxy.kill9();
    for c in h.containers() {
        docker(&["kill", &c.id]);
    }
    h.proxy.spawn().await;
    assert_eq!(
        all_agree(&h).await,
        "v2",
        "v2 serves again without a deploy"
    );
    let status = h.status().await;
    assert_eq!(
        support::harness::active(&status).container.as_deref(),
        Some(active.as_str()),
        "the same container"
    );
    // The warm v1 was stopped too: a rollback target only, it is removed
    // (rollback then starts its image again).
    assert!(status.previous.is_none(), "{status:?}");
    assert_eq!(h.containers().len(), 1, "{}", h.ps());

    // With the active container gone for good and the warm one stopped,
    // nothing healthy is left: 503, and status names no container that
    // does not exist. The next deploy serves again.
    h.deploy_ok(&v1).await;
    let status = h.consistent().await;
    let (active, previous) = (
        support::harness::active(&status)
            .container
            .clone()
            .expect("active"),
        support::harness::previous(&status)
            .container
            .clone()
            .expect("previous"),
    );
    h.proxy.kill9();
    docker(&["rm", "-f", &active]);
    docker(&["kill", &previous]);
    h.proxy.spawn().await;
    let status = h.consistent().await;
    assert!(
        status.active.is_none() && status.previous.is_none(),
        "{status:?}"
    );
    assert!(h.containers().is_empty(), "{}", h.ps());
    let answer = get(h.proxy.http, "/").await.expect("GET /");
    assert_eq!(answer.status, 503, "{answer:?}");
    h.deploy_ok(&v2).await;
    assert_eq!(all_agree(&h).await, "v2");
    h.done();
}

// ---------------------------------------------------------------------------
// 3. proxy SIGKILLed at each deploy step
// ---------------------------------------------------------------------------

/// `cutover deploy IMAGE --json`, read event by event, so a test can act
/// at a given step.
struct JsonDeploy {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stdout: String,
    args: Vec<String>,
    started: Instant,
}

impl JsonDeploy {
    fn start(h: &Harness, image: &str) -> JsonDeploy {
        let config = h.proxy.config.to_str().expect("utf-8");
        let args: Vec<String> = [
            "deploy", &h.svc, "--image", image, "--json", "--config", config,
        ]
        .map(String::from)
        .to_vec();
        let mut child = tokio::process::Command::new(CUTOVER)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cutover deploy");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        JsonDeploy {
            child,
            lines,
            stdout: String::new(),
            args,
            started: Instant::now(),
        }
    }

    /// Reads events until the progress event `step` (true) or the end of
    /// the output (false).
    async fn until(&mut self, step: &str) -> bool {
        let reading = async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.stdout.push_str(&line);
                self.stdout.push('\n');
                let event = serde_json::from_str::<Reply>(&line).ok();
                if matches!(event, Some(Reply::Progress(event)) if event.step == step) {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(DEPLOY_LIMIT, reading)
            .await
            .expect("deploy output ended")
    }

    /// Reads the rest and waits for the command to exit.
    async fn finish(mut self) -> CliOutput {
        self.until("\0 no such step").await;
        let output = tokio::time::timeout(Duration::from_secs(10), self.child.wait_with_output())
            .await
            .expect("deploy command exited")
            .expect("wait");
        CliOutput {
            args: self.args,
            code: output.status.code(),
            stdout: self.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: self.started.elapsed(),
        }
    }
}

/// Runs `deploy IMAGE --json` and SIGKILLs the server as soon as the
/// progress event `step` arrives. Returns the client's output, and whether
/// the event was seen (else the deploy ran to its end).
async fn deploy_killed_at(h: &mut Harness, image: &str, step: &str) -> (CliOutput, bool) {
    let mut deploy = JsonDeploy::start(h, image);
    let seen = deploy.until(step).await;
    if seen {
        h.proxy.kill9();
    }
    (deploy.finish().await, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigkilled_at_each_deploy_step() {
    let mut h = Harness::start("fsteps", Opts::default()).await;
    // Two images, deployed in turn: each deploy changes the version that
    // answers, so traffic shows which side of the switch a kill left.
    let images = [h.image("a", &[]).await, h.image("b", &[]).await];
    let other = |serving: &str| images[usize::from(serving == "a")].clone();
    h.deploy_ok(&images[0]).await;
    // Every step a deploy reports, in order ("retire": the superseded warm
    // previous colour is stopped; "drain": requests still running on the
    // old colour).
    let steps = [
        "image", "starting", "started", "health", "switched", "retire", "drain", "drained", "warm",
        "done",
    ];
    let mut report = Vec::new();
    for step in steps {
        let before = all_agree(&h).await;
        let image = other(&before);
        // Keeps "drain" long enough to be seen: a request on the old colour.
        let slow_request = (step == "drain").then(|| {
            let http = h.proxy.http;
            tokio::spawn(async move { get(http, "/slow?ms=8000").await })
        });
        if slow_request.is_some() {
            h.wait_in_flight(1, Duration::from_secs(5)).await;
        }
        let t = Instant::now();
        let (out, seen) = deploy_killed_at(&mut h, &image, step).await;
        let killed = t.elapsed();
        assert!(seen, "the deploy never reported step {step:?}: {out}");
        // Killed before it answered: non-zero and says the outcome is
        // unknown. (Killed at "done", the answer may have been sent first.)
        if !out.success() {
            assert!(
                lower(&out).contains("outcome is unknown"),
                "a clear error: {out}"
            );
        }
        if let Some(request) = slow_request {
            let _ = request.await;
        }

        let t = Instant::now();
        h.proxy.spawn().await;
        let restarted = t.elapsed();
        wait_no_orphans(&h).await;
        let settled = t.elapsed();
        let serving = all_agree(&h).await;
        assert!(
            serving == before || serving == tag(&image),
            "after a kill at {step:?} the old ({before}) or new ({}) version serves, not {serving}",
            tag(&image)
        );
        report.push(format!(
            "{step}: {before}->{serving} (client exit {:?}; killed after {killed:?}, restarted in {restarted:?}, no orphans after {settled:?})",
            out.code
        ));

        // The next deploy works.
        let following = other(&serving);
        h.deploy_ok(&following).await;
        assert_eq!(all_agree(&h).await, tag(&following));
    }
    eprintln!("SIGKILL at each step:\n  {}", report.join("\n  "));
    h.done();
}

// ---------------------------------------------------------------------------
// 4. state directory read-only or full
// ---------------------------------------------------------------------------

/// A mount the test made, unmounted (lazily, so a busy one still goes) when
/// dropped.
struct Mount {
    path: PathBuf,
}

impl Mount {
    fn run(args: &[&str]) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
        assert!(
            out.status.success(),
            "`{}` failed (these tests need root with mount rights): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A directory bind-mounted onto itself, so it can be made read-only.
    fn bind(path: &Path) -> Mount {
        let p = path.to_str().expect("utf-8");
        Mount::run(&["mount", "--bind", p, p]);
        Mount { path: path.into() }
    }

    /// A tmpfs of `size` (e.g. "256k"), so it can be filled.
    fn tmpfs(path: &Path, size: &str) -> Mount {
        let p = path.to_str().expect("utf-8");
        Mount::run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            p,
        ]);
        Mount { path: path.into() }
    }

    fn remount(&self, mode: &str) {
        let p = self.path.to_str().expect("utf-8");
        Mount::run(&["mount", "-o", &format!("remount,{mode},bind"), p]);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// How the state directory is broken and repaired.
#[derive(Clone, Copy, Debug)]
enum Breakage {
    ReadOnly,
    Full,
}

impl Breakage {
    fn mount(self, path: &Path) -> Mount {
        match self {
            Breakage::ReadOnly => Mount::bind(path),
            Breakage::Full => Mount::tmpfs(path, "256k"),
        }
    }

    fn apply(self, mount: &Mount) {
        match self {
            Breakage::ReadOnly => mount.remount("ro"),
            Breakage::Full => {
                // dd stops at ENOSPC (and says so on stderr): the disk is full.
                let filler = mount.path.join("filler");
                let _ = std::process::Command::new("dd")
                    .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=4k"])
                    .stderr(Stdio::null())
                    .status();
                assert!(
                    std::fs::write(mount.path.join("probe"), b"x").is_err(),
                    "the tmpfs should be full"
                );
            }
        }
    }

    fn repair(self, mount: &Mount) {
        match self {
            Breakage::ReadOnly => mount.remount("rw"),
            Breakage::Full => {
                let _ = std::fs::remove_file(mount.path.join("filler"));
                let _ = std::fs::remove_file(mount.path.join("probe"));
            }
        }
    }

    /// What the error says (the OS's words).
    fn words(self) -> &'static str {
        match self {
            Breakage::ReadOnly => "read-only file system",
            Breakage::Full => "no space left on device",
        }
    }
}

async fn state_dir_broken(test: &str, breakage: Breakage) {
    let outside = tempfile::tempdir().expect("tempdir");
    let dir = outside.path().join("state");
    std::fs::create_dir(&dir).expect("mkdir state");
    let mount = breakage.mount(&dir);
    let h = Arc::new(
        Harness::start(
            test,
            Opts {
                deadline: "60s",
                state_dir: Some(dir.clone()),
                ..Opts::default()
            },
        )
        .await,
    );
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    let v3 = h.image("v3", &[("HEALTHY_AFTER_MS", "3000")]).await;
    let v4 = h.image("v4", &[]).await;
    h.deploy_ok(&v1).await;
    h.deploy_ok(&v2).await;
    let before = h.containers();

    // Broken before the deploy: refused before anything is started or
    // stopped; the warm previous colour (v1) is kept too.
    breakage.apply(&mount);
    let out = h.deploy(&v3).await;
    assert_failed_with(&out, &["state", breakage.words(), "nothing was changed"]);
    assert_eq!(
        h.containers(),
        before,
        "nothing started or stopped:\n{}",
        h.ps()
    );
    let status = h.consistent().await;
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    assert_eq!(h.version().await, "v2");
    // An instant rollback cannot record its swap either: refused, and the
    // warm v1 stays the rollback target.
    let out = h.rollback().await;
    assert_failed_with(&out, &["state", breakage.words()]);
    assert_eq!(h.containers(), before, "{}", h.ps());
    let status = h.consistent().await;
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "{status:?}"
    );
    assert_eq!(h.version().await, "v2");
    breakage.repair(&mount);

    // Broken during the health check: the state write before the swap
    // fails, traffic stays on v2, the new container is removed.
    let deploying = h.deploy_in_background(&v3, CLI_LIMIT);
    let new = h.wait_running(&v3, RUNNING_WITHIN).await;
    breakage.apply(&mount);
    let out = finish(deploying).await;
    eprintln!("state dir {breakage:?} before the swap: {out}");
    assert_failed_with(
        &out,
        &[
            "could not be recorded",
            "traffic was not moved",
            breakage.words(),
            "keeps serving",
            "was removed",
        ],
    );
    assert_eq!(h.version().await, "v2");
    assert!(
        h.containers().iter().all(|c| c.id != new.id),
        "the new container is removed:\n{}",
        h.ps()
    );
    breakage.repair(&mount);
    assert_eq!(all_agree(&h).await, "v2");
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .expect("read state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        leftovers,
        vec!["state.json".to_string()],
        "no temp files left"
    );

    h.deploy_ok(&v4).await;
    assert_eq!(
        all_agree(&h).await,
        "v4",
        "deploys work again once repaired"
    );
    h.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_read_only() {
    state_dir_broken("fro", Breakage::ReadOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_full() {
    state_dir_broken("ffull", Breakage::Full).await;
}

// ---------------------------------------------------------------------------
// 5. image missing and registry unreachable
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_and_unreachable_registry() {
    let h = Harness::start("fpull", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    h.deploy_ok(&v1).await;
    let before = h.containers();
    let status_before = h.consistent().await;

    // Nothing listens on the port: connection refused.
    let closed = format!(
        "127.0.0.1:{}/cutover-missing-{}:nope",
        free_port(),
        std::process::id()
    );
    // Accepts connections (the kernel queues them) but never answers: the
    // engine's own registry timeout ends the pull.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_image = format!(
        "127.0.0.1:{}/cutover-missing-{}:nope",
        silent.local_addr().expect("addr").port(),
        std::process::id()
    );
    for image in [&closed, &silent_image] {
        let out = h.deploy(image).await;
        eprintln!("deploy of {image}: failed after {:?}", out.elapsed);
        assert_failed_with(&out, &["cannot pull", image.as_str()]);
        assert_eq!(h.containers(), before, "nothing started:\n{}", h.ps());
        let status = h.consistent().await;
        let (now, then) = (active(&status), active(&status_before));
        assert_eq!(
            (&now.container, &now.image, &now.color),
            (&then.container, &then.image, &then.color),
            "{status:?}"
        );
        assert_eq!(all_agree(&h).await, "v1");
    }
    h.done();
}

// ---------------------------------------------------------------------------
// 6. racing clients
// ---------------------------------------------------------------------------

/// Runs two operations at once; exactly one must win and the other be
/// refused as busy. Returns the index of the winner.
async fn race(h: &Arc<Harness>, ops: [Vec<String>; 2]) -> usize {
    // A request on the active colour keeps the winner in its drain, so the
    // loser arrives while the service is busy however the two are scheduled.
    let http = h.proxy.http;
    let hold = tokio::spawn(async move { get(http, "/slow?ms=2500").await });
    h.wait_in_flight(1, Duration::from_secs(2)).await;
    let run = |args: Vec<String>| {
        let h = Arc::clone(h);
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            h.proxy.cli(&args).await
        })
    };
    let [a, b] = ops;
    let (a, b) = tokio::join!(run(a), run(b));
    let outs = [a.expect("join"), b.expect("join")];
    let _ = hold.await;
    for out in &outs {
        eprintln!("race: {out}");
    }
    let winners: Vec<usize> = (0..2).filter(|&i| outs[i].success()).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one wins: {} / {}",
        outs[0],
        outs[1]
    );
    let loser = &outs[1 - winners[0]];
    assert!(
        lower(loser).contains("busy"),
        "the loser is told busy: {loser}"
    );
    winners[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_deploy_rollback_and_deploys() {
    let h = Arc::new(
        Harness::start(
            "frace",
            Opts {
                interval: "300ms",
                healthy_after: 3,
                drain_timeout: "5s",
                ..Opts::default()
            },
        )
        .await,
    );
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    let v3 = h.image("v3", &[]).await;
    let v4 = h.image("v4", &[]).await;
    let v5 = h.image("v5", &[]).await;
    h.deploy_ok(&v1).await;
    h.deploy_ok(&v2).await;
    let svc = h.svc.clone();
    let deploy = |image: &str| -> Vec<String> {
        ["deploy", &svc, "--image", image]
            .map(String::from)
            .to_vec()
    };

    // Deploy v3 against a rollback to the warm v1.
    let winner = race(&h, [deploy(&v3), vec!["rollback".into(), svc.clone()]]).await;
    let expect = if winner == 0 { "v3" } else { "v1" };
    assert_eq!(all_agree(&h).await, expect);

    // Two deploys.
    let winner = race(&h, [deploy(&v4), deploy(&v5)]).await;
    assert_eq!(all_agree(&h).await, ["v4", "v5"][winner]);
    h.done();
}
