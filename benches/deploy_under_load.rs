//! Container deploys under load: `cargo bench --bench deploy_under_load`.
//!
//! Method
//! - Builds `FROM scratch` images of `tests/testapp` (via
//!   `tests/support/images.rs`): `v0` for the initial deploy and `v1..vN`
//!   (N = `BENCH_DEPLOYS`, default 5), each with its own label and
//!   `ENV APP_VERSION`, so every one is a distinct image.
//! - Runs `cutover serve` (`workers = 1`) with one container service: `port
//!   = 8080`, health `/health` every 100 ms, `keep_previous = "5s"`,
//!   `stop_timeout = "1s"`. `v0` is deployed before any load.
//! - Load: 64 keep-alive HTTP/1.1 connections (the built-in hyper generator
//!   of `proxy_throughput`, one thread), `GET /`, every request timed and
//!   stamped with its start time. First 3 s of steady load (no deploy),
//!   then admin `deploy` of v1..vN one after another (1 s apart), then the
//!   load stops. Bounded: the load stops by itself after 3 s + 60 s per
//!   deploy.
//! - Failed request = connection error, request/body error, 5 s timeout or a
//!   status other than 200. A keep-alive connection the server closed between
//!   requests (hyper notices before sending) is a reconnect, not a failure.
//! - Reported: requests, failed requests (target 0) with their kinds, p50 /
//!   p99 / max in the steady window and during the deploys (from the first
//!   deploy's start to the last one's reply), and each deploy's wall time
//!   with the reply's `timings` (start_ms, healthy_ms, persist_us, swap_ns,
//!   drain_ms, total_ms).
//! - Bad versions, under the same load, after the good deploys: the
//!   service has a bake window (`bake = { window = "3s", max_error_rate =
//!   "5%", min_requests = 100 }`, so every good deploy above also waits out
//!   its 3 s window), and two images of the test app that answer 500 to
//!   `BENCH_FAIL_PERCENT` (20) % of `GET /` (`FAIL_PERCENT`, marked
//!   `x-app-failure: deliberate`) are deployed: one as a full switch, one
//!   with `--canary 10%`. Each must be rolled back by the bake (the deploy
//!   fails) and the service must end on the last good version. Reported per
//!   bad deploy: the bake's figures and `breach_to_switch_ms`, the time
//!   from the judge's tick that saw the breach to the published snapshot
//!   that sends every new request back (target: under 100 ms). The app's
//!   deliberate 500s are counted apart; any other non-200 is a failure.
//! - Clean-up (also on panic): containers labelled `cutover.managed=true`
//!   and `cutover.service=<this run's service>`, then this run's images.
//!
//! Output: Markdown on stdout and JSON in
//! `target/bench-results/deploy_under_load.json` (or `$BENCH_RESULTS`).
//! Environment: `BENCH_DEPLOYS` (default 5), `BENCH_CONNECTIONS` (64),
//! `BENCH_STEADY_SECONDS` (3), `BENCH_FAIL_PERCENT` (20),
//! `BENCH_CUTOVER_BIN`. Needs a Docker engine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[path = "support/mod.rs"]
mod support;
use support::*;

#[allow(dead_code)]
#[path = "../tests/support/images.rs"]
mod images;

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("deploy_under_load: run it with `cargo bench --bench deploy_under_load`; skipped");
        return;
    }
    let deploys: usize = env_or("BENCH_DEPLOYS", 5).clamp(1, 50);
    let connections: usize = env_or("BENCH_CONNECTIONS", 64).max(1);
    let steady_seconds: u64 = env_or("BENCH_STEADY_SECONDS", 3).clamp(1, 60);
    let fail_percent: u32 = env_or("BENCH_FAIL_PERCENT", 20).clamp(1, 100);

    println!("# cutover deploys under load\n");
    println!(
        "- date: {}",
        first_line_of("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
    );
    println!(
        "- cores (nproc): {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "- docker: {}",
        first_line_of("docker", &["version", "--format", "{{.Server.Version}}"])
    );
    println!("- load average at start: {}", load_average());
    println!(
        "- load: {connections} keep-alive connections (built-in generator), {steady_seconds} s steady, \
         then {deploys} deploys 1 s apart\n"
    );

    let pid = std::process::id();
    let service = format!("bench-deploy-{pid}");
    let repo = format!("cutover-bench-deploy-{pid}");
    let mut cleanup = Cleanup {
        service: service.clone(),
        images: Vec::new(),
        proxy: None,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the runtime");

    // Images v0..vN.
    let build_began = Instant::now();
    let mut images = Vec::new();
    for i in 0..=deploys {
        let version = format!("v{i}");
        let tag = format!("{repo}:{version}");
        cleanup.images.push(tag.clone());
        let image = runtime.block_on(images::build_testapp_image_with_env(
            &tag,
            &format!("{service}-{version}"),
            &[("APP_VERSION", version.as_str())],
        ));
        images.push(image);
    }
    // The bad versions: the same app failing a share of its requests.
    let mut bad_images = Vec::new();
    for kind in BadKind::ALL {
        let version = format!("bad-{}", kind.name());
        let tag = format!("{repo}:{version}");
        cleanup.images.push(tag.clone());
        let fail = fail_percent.to_string();
        let image = runtime.block_on(images::build_testapp_image_with_env(
            &tag,
            &format!("{service}-{version}"),
            &[
                ("APP_VERSION", version.as_str()),
                ("FAIL_PERCENT", fail.as_str()),
            ],
        ));
        bad_images.push((kind, image));
    }
    eprintln!(
        "built {} images in {:.1} s",
        images.len() + bad_images.len(),
        build_began.elapsed().as_secs_f64()
    );

    // cutover.
    let scratch = tempfile::tempdir().expect("create a temporary directory");
    let dir = scratch.path();
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let socket = dir.join("admin.sock");
    let config = format!(
        "[server]\n\
         http = \"{http}\"\n\
         workers = 1\n\
         admin_socket = \"{}\"\n\
         state_dir = \"{}\"\n\
         shutdown_timeout = \"2s\"\n\
         \n\
         [[site]]\n\
         hosts = [\"*\"]\n\
         service = \"{service}\"\n\
         \n\
         [service.{service}]\n\
         image = \"{repo}\"\n\
         port = 8080\n\
         stop_timeout = \"1s\"\n\
         keep_previous = \"10s\"\n\
         health = {{ path = \"/health\", interval = \"100ms\" }}\n\
         bake = {{ window = \"3s\", max_error_rate = \"5%\", min_requests = 100 }}\n",
        socket.display(),
        dir.join("state").display()
    );
    let config_path = dir.join("proxy.toml");
    std::fs::write(&config_path, config).expect("write proxy.toml");
    let binary = std::env::var_os("BENCH_CUTOVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cutover")));
    let log = dir.join("cutover.log");
    let log_file = std::fs::File::create(&log).expect("create the log");
    let child = Command::new(&binary)
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file)
        .spawn()
        .expect("start cutover");
    cleanup.proxy = Some(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "cutover's admin socket never appeared; log: {}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // v0 before any load: the service must serve something to load.
    let initial = deploy(&runtime, &socket, &service, &images[0], None);
    let initial = match initial {
        Ok(d) => d,
        Err(err) => panic!(
            "initial deploy of {} failed: {err}; log: {}",
            images[0],
            tail(&log)
        ),
    };
    wait_200(http).unwrap_or_else(|err| panic!("{err}; log: {}", tail(&log)));

    // Load, then steady window, then the deploys.
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let hard_limit =
        Duration::from_secs(steady_seconds + 60 * (deploys + BadKind::ALL.len()) as u64);
    let load = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || loadgen::run(http, connections, started, hard_limit, stop))
    };
    std::thread::sleep(Duration::from_secs(steady_seconds));
    let steady_end = started.elapsed();
    let mut results = Vec::new();
    let mut deploy_error = None;
    for (i, image) in images.iter().enumerate().skip(1) {
        if i > 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
        if started.elapsed() + Duration::from_secs(5) > hard_limit {
            deploy_error = Some("ran out of the load's time budget".to_string());
            break;
        }
        let at = started.elapsed();
        match deploy(&runtime, &socket, &service, image, None) {
            Ok(mut d) => {
                d.at_s = at.as_secs_f64();
                d.end_s = started.elapsed().as_secs_f64();
                results.push(d);
            }
            Err(err) => {
                deploy_error = Some(format!("deploy of {image} failed: {err}"));
                break;
            }
        }
    }
    let deploys_end = started.elapsed();
    let mut bad_results = Vec::new();
    if deploy_error.is_none() {
        for (kind, image) in &bad_images {
            std::thread::sleep(Duration::from_secs(1));
            if started.elapsed() + Duration::from_secs(10) > hard_limit {
                deploy_error = Some("ran out of the load's time budget".to_string());
                break;
            }
            let at = started.elapsed();
            let mut bad = bad_deploy(&runtime, &socket, &service, image, *kind);
            bad.at_s = at.as_secs_f64();
            bad.end_s = started.elapsed().as_secs_f64();
            bad_results.push(bad);
        }
    }
    let bad_end = started.elapsed();
    let serving_after = active_image(&runtime, &socket, &service);
    stop.store(true, Ordering::Relaxed);
    let load = load.join().expect("the load generator thread panicked");

    // Reporting.
    let steady = load.window(Duration::ZERO, steady_end);
    let during = load.window(steady_end, deploys_end);
    let during_bad = load.window(deploys_end, bad_end);
    let mut text = String::new();
    let _ = writeln!(
        text,
        "| window | seconds | requests | FAILED | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for (name, w) in [
        ("steady (no deploy)", &steady),
        ("during deploys", &during),
        ("during bad deploys", &during_bad),
    ] {
        let _ = writeln!(
            text,
            "| {name} | {:.1} | {} | {} | {:.3} | {:.3} | {:.3} |",
            w.seconds, w.requests, w.failed, w.p50_ms, w.p99_ms, w.max_ms
        );
    }
    let _ = writeln!(
        text,
        "\n| deploy | image | at s | wall ms | start_ms | healthy_ms | persist_us | swap_ns | drain_ms | total_ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let row = |text: &mut String, name: &str, d: &Deployed| {
        let t = &d.timings;
        let _ = writeln!(
            text,
            "| {name} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {} |",
            d.image,
            d.at_s,
            d.wall_ms,
            t.start_ms,
            t.healthy_ms,
            t.persist_us,
            t.swap_ns,
            t.drain_ms,
            t.total_ms
        );
    };
    row(&mut text, "v0 (before load)", &initial);
    for (i, d) in results.iter().enumerate() {
        row(&mut text, &format!("#{}", i + 1), d);
    }
    let _ = writeln!(
        text,
        "\n| bad deploy ({fail_percent}% 500s) | image | at s | wall ms | deploy failed | bake | requests judged | 5xx | breach_to_switch_ms |\n|---|---|---:|---:|---|---|---:|---:|---:|"
    );
    for bad in &bad_results {
        let bake = bad.bake.as_ref();
        let _ = writeln!(
            text,
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} |",
            bad.kind.describe(),
            bad.image,
            bad.at_s,
            bad.wall_ms,
            if bad.failed { "yes" } else { "NO" },
            bake.map_or("none".to_string(), |b| format!("{} ({})", b.state, b.phase)),
            bake.map_or(0, |b| b.requests),
            bake.map_or(0, |b| b.errors),
            bake.and_then(|b| b.breach_to_switch_ms)
                .map_or("-".to_string(), |ms| ms.to_string()),
        );
    }
    let last_good = results.last().map_or(&initial.image, |d| &d.image);
    let rolled_back = bad_results.len() == BadKind::ALL.len()
        && bad_results.iter().all(BadDeploy::rolled_back)
        && serving_after.as_deref() == Some(last_good.as_str());
    let breach_to_switch_max = bad_results
        .iter()
        .filter_map(|bad| bad.bake.as_ref().and_then(|b| b.breach_to_switch_ms))
        .max();
    println!("- load average at end: {}\n", load_average());
    println!("{text}");
    println!(
        "After the bad deploys the service serves {} (last good: {last_good}). \
         The bad versions' own 500s: {} (counted apart, not failures).\n",
        serving_after.as_deref().unwrap_or("nothing"),
        load.deliberate
    );
    println!(
        "**Bake breach → every new request on the previous colour: max {} ms** (target < 100 ms after the breach is observed){}\n",
        breach_to_switch_max.map_or("-".to_string(), |ms| ms.to_string()),
        if rolled_back && breach_to_switch_max.is_some_and(|ms| ms < 100) { " — MEETS" } else { " — MISSES" }
    );
    for bad in bad_results.iter().filter(|bad| !bad.rolled_back()) {
        println!(
            "BAD DEPLOY NOT ROLLED BACK ({}): {}\n",
            bad.kind.describe(),
            bad.error
        );
    }
    if let Some(err) = &deploy_error {
        println!("DEPLOY ERROR: {err}\n");
    }
    if !load.kinds.is_empty() {
        println!("Failure kinds:");
        for (kind, n) in &load.kinds {
            println!("- {n}× {kind}");
        }
        println!("First failures (s since load start):");
        for (at, kind) in load.failures.iter().take(20) {
            println!("- {at:.3}: {kind}");
        }
    }
    println!(
        "\n**cutover FAILED REQUESTS during the run: {}** (target 0) over {} requests, {} deploys and {} bad deploys under load, {} reconnects{}",
        load.failed(),
        load.samples.len(),
        results.len(),
        bad_results.len(),
        load.reconnects,
        if load.failed() == 0 && deploy_error.is_none() { " — MEETS" } else { " — MISSES" }
    );

    let path = std::env::var_os("BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/bench-results/deploy_under_load.json")
        });
    let window_json = |w: &Window| {
        serde_json::json!({"seconds": w.seconds, "requests": w.requests, "failed": w.failed,
            "p50_ms": w.p50_ms, "p99_ms": w.p99_ms, "max_ms": w.max_ms})
    };
    let deploy_json = |d: &Deployed| {
        serde_json::json!({"image": d.image, "at_s": d.at_s, "end_s": d.end_s, "wall_ms": d.wall_ms,
            "timings": d.timings, "drain": d.drain})
    };
    let json = serde_json::json!({
        "settings": {"deploys": deploys, "connections": connections, "steady_seconds": steady_seconds, "fail_percent": fail_percent},
        "requests": load.samples.len(),
        "failed": load.failed(),
        "failure_kinds": load.kinds,
        "first_failures": load.failures.iter().take(200).map(|(at, k)| serde_json::json!({"at_s": at, "kind": k})).collect::<Vec<_>>(),
        "reconnects": load.reconnects,
        "steady": window_json(&steady),
        "during_deploys": window_json(&during),
        "initial_deploy": deploy_json(&initial),
        "deploys": results.iter().map(deploy_json).collect::<Vec<_>>(),
        "deploy_error": deploy_error,
        "during_bad_deploys": window_json(&during_bad),
        "deliberate_500s": load.deliberate,
        "bad_deploys": bad_results.iter().map(|bad| serde_json::json!({
            "kind": bad.kind.name(), "image": bad.image, "at_s": bad.at_s, "end_s": bad.end_s,
            "wall_ms": bad.wall_ms, "deploy_failed": bad.failed, "error": bad.error, "bake": bad.bake,
        })).collect::<Vec<_>>(),
        "serving_after_bad_deploys": serving_after,
        "bad_deploys_rolled_back": rolled_back,
        "breach_to_switch_ms_max": breach_to_switch_max,
        "load_average_at_end": load_average(),
    });
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json).expect("json") + "\n",
    )
    .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    println!("JSON: {}", path.display());
    drop(cleanup);
}

// ---------------------------------------------------------------------------
// Deploy, clean-up, helpers
// ---------------------------------------------------------------------------

struct Deployed {
    image: String,
    at_s: f64,
    end_s: f64,
    wall_ms: f64,
    timings: cutover::admin::proto::DeployTimings,
    drain: Option<cutover::admin::proto::DrainReport>,
}

fn deploy(
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    service: &str,
    image: &str,
    canary: Option<&str>,
) -> Result<Deployed, String> {
    let command = cutover::admin::Command::Deploy {
        service: service.to_string(),
        image: Some(image.to_string()),
        tag: None,
        docker_config: None,
        canary: canary.map(str::to_string),
    };
    let began = Instant::now();
    let call = cutover::admin::call(socket, &command, |_, _| {});
    let result = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), call).await })
        .map_err(|_| "deploy did not answer within 120 s".to_string())?
        .map_err(|err| err.to_string())?;
    let result = result
        .clone()
        .into_deploy()
        .ok_or_else(|| format!("deploy answered with another report: {result:?}"))?;
    Ok(Deployed {
        image: image.to_string(),
        at_s: 0.0,
        end_s: 0.0,
        wall_ms: began.elapsed().as_secs_f64() * 1000.0,
        timings: result.timings,
        drain: result.drain,
    })
}

/// How a bad version is deployed.
#[derive(Debug, Clone, Copy)]
enum BadKind {
    Switch,
    Canary,
}

impl BadKind {
    const ALL: [BadKind; 2] = [BadKind::Switch, BadKind::Canary];

    fn name(self) -> &'static str {
        match self {
            BadKind::Switch => "switch",
            BadKind::Canary => "canary",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            BadKind::Switch => "full switch",
            BadKind::Canary => "canary 10%",
        }
    }

    fn canary(self) -> Option<&'static str> {
        match self {
            BadKind::Switch => None,
            BadKind::Canary => Some("10%"),
        }
    }
}

/// What deploying a bad version did: the deploy should fail with the
/// bake's breach, which the service's status then reports.
struct BadDeploy {
    kind: BadKind,
    image: String,
    at_s: f64,
    end_s: f64,
    wall_ms: f64,
    /// The deploy command failed (what a breach must cause).
    failed: bool,
    error: String,
    bake: Option<cutover::admin::proto::BakeReport>,
}

impl BadDeploy {
    fn rolled_back(&self) -> bool {
        self.failed
            && self
                .bake
                .as_ref()
                .is_some_and(|bake| bake.state == "breached" && bake.breach_to_switch_ms.is_some())
    }
}

fn bad_deploy(
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    service: &str,
    image: &str,
    kind: BadKind,
) -> BadDeploy {
    let began = Instant::now();
    let outcome = deploy(runtime, socket, service, image, kind.canary());
    let wall_ms = began.elapsed().as_secs_f64() * 1000.0;
    let bake = service_status(runtime, socket, service).and_then(|status| status.bake);
    BadDeploy {
        kind,
        image: image.to_string(),
        at_s: 0.0,
        end_s: 0.0,
        wall_ms,
        failed: outcome.is_err(),
        error: outcome.err().unwrap_or_default(),
        bake,
    }
}

fn service_status(
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    service: &str,
) -> Option<cutover::admin::proto::ServiceStatus> {
    let command = cutover::admin::Command::Status {
        service: Some(service.to_string()),
    };
    let call = cutover::admin::call(socket, &command, |_, _| {});
    let report = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), call).await })
        .ok()?
        .ok()?;
    report.into_status()?.services.remove(service)
}

/// The image the service's active colour runs.
fn active_image(runtime: &tokio::runtime::Runtime, socket: &Path, service: &str) -> Option<String> {
    service_status(runtime, socket, service)?.active?.image
}

/// Stops cutover (SIGTERM, then SIGKILL) and removes this run's containers
/// and images, also when the bench panics.
struct Cleanup {
    service: String,
    images: Vec<String>,
    proxy: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.proxy.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", "label=cutover.managed=true"])
            .arg("--filter")
            .arg(format!("label=cutover.service={}", self.service))
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .stdout(Stdio::null())
                .status();
        }
        if !self.images.is_empty() {
            let _ = Command::new("docker")
                .args(["rmi", "-f"])
                .args(&self.images)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        eprintln!(
            "cleaned up {} container(s) and {} image tag(s)",
            ids.len(),
            self.images.len()
        );
    }
}

fn wait_200(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match probe(addr) {
            Ok(line) if line.contains(" 200 ") => return Ok(()),
            Ok(line) => last = line,
            Err(err) => last = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{addr} did not answer 200 within 10 s (last: {last})"
    ))
}

/// Latency summary of the requests that started inside one window.
struct Window {
    seconds: f64,
    requests: u64,
    failed: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

// ---------------------------------------------------------------------------
// Load generator (proxy_throughput's, with start stamps and failure kinds)
// ---------------------------------------------------------------------------

mod loadgen {
    use super::*;

    use support::keepalive::{connect, request, Outcome};

    pub struct LoadResult {
        /// (start, µs since load start; latency µs; failed).
        pub samples: Vec<(u64, u32, bool)>,
        /// (seconds since load start, kind), sorted by time.
        pub failures: Vec<(f64, String)>,
        pub kinds: BTreeMap<String, u64>,
        pub reconnects: u64,
        /// The bad versions' own 500s (not failures).
        pub deliberate: u64,
    }

    impl LoadResult {
        pub fn failed(&self) -> u64 {
            self.failures.len() as u64
        }

        pub fn window(&self, from: Duration, to: Duration) -> Window {
            let (from_us, to_us) = (from.as_micros() as u64, to.as_micros() as u64);
            let mut latencies: Vec<u32> = Vec::new();
            let mut failed = 0;
            for &(at, latency, fail) in &self.samples {
                if at >= from_us && at < to_us {
                    latencies.push(latency);
                    failed += u64::from(fail);
                }
            }
            // Connection failures have no sample; count them by time.
            failed += self
                .failures
                .iter()
                .filter(|(at, kind)| {
                    kind.starts_with("connect")
                        && *at >= from.as_secs_f64()
                        && *at < to.as_secs_f64()
                })
                .count() as u64;
            latencies.sort_unstable();
            Window {
                seconds: (to - from).as_secs_f64(),
                requests: latencies.len() as u64,
                failed,
                p50_ms: percentile(&latencies, 50.0) / 1000.0,
                p99_ms: percentile(&latencies, 99.0) / 1000.0,
                max_ms: latencies.last().copied().map_or(0.0, f64::from) / 1000.0,
            }
        }
    }

    #[derive(Default)]
    struct ConnStats {
        samples: Vec<(u64, u32, bool)>,
        failures: Vec<(f64, String)>,
        reconnects: u64,
        deliberate: u64,
    }

    pub fn run(
        addr: SocketAddr,
        connections: usize,
        started: Instant,
        limit: Duration,
        stop: Arc<AtomicBool>,
    ) -> LoadResult {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the load generator runtime");
        let until = started + limit;
        let stats = runtime.block_on(async {
            let tasks: Vec<_> = (0..connections)
                .map(|_| tokio::spawn(connection(addr, until, started, Arc::clone(&stop))))
                .collect();
            let mut all = Vec::with_capacity(tasks.len());
            for task in tasks {
                all.push(task.await.unwrap_or_default());
            }
            all
        });
        let mut result = LoadResult {
            samples: Vec::new(),
            failures: Vec::new(),
            kinds: BTreeMap::new(),
            reconnects: 0,
            deliberate: 0,
        };
        for s in stats {
            result.samples.extend(s.samples);
            result.failures.extend(s.failures);
            result.reconnects += s.reconnects;
            result.deliberate += s.deliberate;
        }
        result.failures.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, kind) in &result.failures {
            *result.kinds.entry(kind.clone()).or_default() += 1;
        }
        result
    }

    async fn connection(
        addr: SocketAddr,
        until: tokio::time::Instant,
        started: Instant,
        stop: Arc<AtomicBool>,
    ) -> ConnStats {
        let mut stats = ConnStats::default();
        let host = addr.to_string();
        let running = || tokio::time::Instant::now() < until && !stop.load(Ordering::Relaxed);
        let mut first = true;
        while running() {
            if !first {
                stats.reconnects += 1;
            }
            first = false;
            let mut sender = match connect(addr).await {
                Ok(sender) => sender,
                Err(err) => {
                    stats
                        .failures
                        .push((started.elapsed().as_secs_f64(), format!("connect: {err}")));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            while running() {
                let at = started.elapsed().as_micros() as u64;
                let began = tokio::time::Instant::now();
                let outcome = request(&mut sender, &host).await;
                let latency = u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX);
                match outcome {
                    Outcome::Ok => stats.samples.push((at, latency, false)),
                    Outcome::Deliberate => {
                        stats.samples.push((at, latency, false));
                        stats.deliberate += 1;
                    }
                    Outcome::Closed => break,
                    Outcome::Failed(kind) => {
                        stats.samples.push((at, latency, true));
                        stats.failures.push((at as f64 / 1e6, kind));
                        break;
                    }
                }
            }
        }
        stats
    }
}
