//! Canary deploys and the bake window against the real Docker engine,
//! through the real binary (as `tests/deploy.rs`): `deploy --canary`,
//! the sticky cookie, `promote`, `abort`, and the automatic rollback when
//! the new colour breaks its bake thresholds.
//!
//! The test app answers 500 to a share of `/` with `FAIL_PERCENT`, marked
//! `x-app-failure: deliberate`, so the app's own failures are counted apart
//! from any the proxy would cause. Every load loop is bounded in count and
//! time.
//!
//! Needs a running Docker engine (DOCKER_HOST or /var/run/docker.sock).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use cutover::admin::proto::{DeployReport, Reply, ServiceStatus};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use support::cutover::*;
use support::harness::*;
use support::metrics;

// ---------------------------------------------------------------------------
// A client that keeps the sticky cookie, as a browser would
// ---------------------------------------------------------------------------

/// One answer, with what the canary tests look at.
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    /// `x-app-version`, `-` when the proxy answered itself.
    version: String,
    /// The app's own deliberate 500 (`x-app-failure`).
    deliberate: bool,
    set_cookie: Option<String>,
}

/// A keep-alive connection with an optional cookie jar of one cookie.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// `name=value` sent with each request; `None` sends no cookie.
    cookie: Option<String>,
    /// Keep what `Set-Cookie` says (a browser); false: stay cookie-less.
    keep: bool,
}

impl Client {
    async fn connect(addr: SocketAddr, keep: bool) -> Result<Client, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Client {
            sender,
            cookie: None,
            keep,
        })
    }

    async fn get(&mut self) -> Result<Seen, String> {
        let mut request = Request::builder()
            .method("GET")
            .uri("/")
            .header("host", "localhost");
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", format!("theme=dark; {cookie}"));
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let attempt = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let seen = Seen {
                status: response.status().as_u16(),
                version: header("x-app-version").unwrap_or_else(|| "-".into()),
                deliberate: header("x-app-failure").as_deref() == Some("deliberate"),
                set_cookie: header("set-cookie"),
            };
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok::<_, String>(seen)
        };
        let seen = tokio::time::timeout(HTTP_TIMEOUT, attempt)
            .await
            .map_err(|_| "GET / timed out".to_string())??;
        if self.keep {
            if let Some(set) = &seen.set_cookie {
                self.cookie = set.split(';').next().map(str::to_string);
            }
        }
        Ok(seen)
    }
}

/// Whether an answer is a failure the app did not make on purpose.
fn unexpected(seen: &Seen) -> bool {
    seen.status != 200 && !seen.deliberate
}

/// Runs `cutover ARGS --config ... --json` in the background.
fn cli_in_background(
    h: &Harness,
    args: &[&str],
    limit: Duration,
) -> tokio::task::JoinHandle<CliOutput> {
    let config = h.proxy.config.to_str().expect("utf-8 path").to_string();
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--config".to_string(), config, "--json".to_string()]);
    let svc = h.svc.clone();
    tokio::spawn(async move {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = cli(&args, limit).await;
        eprintln!("[{svc}] {out}");
        out
    })
}

/// The report of a successful `deploy --json`.
fn deploy_report(out: &CliOutput) -> DeployReport {
    let last = out
        .stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output: {out}"));
    let Ok(Reply::Ok { result }) = serde_json::from_str::<Reply>(last) else {
        panic!("not an ok reply: {out}");
    };
    serde_json::from_value(result).unwrap_or_else(|e| panic!("not a DeployReport ({e}): {out}"))
}

/// Polls status (bounded) until `done` holds; returns it.
async fn wait_status(
    h: &Harness,
    within: Duration,
    what: &str,
    done: impl Fn(&ServiceStatus) -> bool,
) -> ServiceStatus {
    let deadline = Instant::now() + within;
    loop {
        let status = h.status().await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}: {status:?}\n{}",
            h.proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` cookie-less requests over `connections` keep-alive connections;
/// returns every answer.
async fn cookieless(addr: SocketAddr, connections: usize, n: usize) -> Vec<Seen> {
    let each = n.div_ceil(connections);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, false).await.expect("connect");
            let mut seen = Vec::with_capacity(each);
            for _ in 0..each {
                seen.push(client.get().await.expect("GET /"));
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("bounded")
                .expect("client task"),
        );
    }
    all
}

// ---------------------------------------------------------------------------
// 1. a failing canary: its share, then the automatic rollback
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_canary_gets_its_share_then_is_rolled_back() {
    // 400 answers of the canary before judging: at a 10% share the 2,500
    // measured requests leave it about 250, so the share is measured on a
    // running canary; the breach comes once the canary has 400.
    let h = Harness::start(
        "cbreach",
        Opts {
            extra: r#"bake = { window = "60s", max_error_rate = "1%", min_requests = 400 }"#,
            metrics: true,
            ..Opts::default()
        },
    )
    .await;
    let metrics = h.metrics.expect("metrics endpoint");
    let v1 = h.image("v1", &[]).await;
    let _v2 = h.image("v2", &[("FAIL_PERCENT", "10")]).await;
    h.deploy_ok(&v1).await;

    let deploy = cli_in_background(
        &h,
        &["deploy", &h.svc, "--tag", "v2", "--canary", "10%"],
        Duration::from_secs(120),
    );
    let status = wait_status(&h, Duration::from_secs(30), "canary start", |s| {
        s.canary.is_some()
    })
    .await;
    let canary = status.canary.clone().expect("canary");
    assert_eq!(canary.share_bp, 1_000, "{status:?}");

    // The share: 2,500 cookie-less requests, each assigned afresh.
    let seen = cookieless(h.proxy.http, 8, 2_500).await;
    let failures: Vec<&Seen> = seen.iter().filter(|s| unexpected(s)).collect();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let to_v2 = seen.iter().filter(|s| s.version == "v2").count();
    let share = to_v2 as f64 / seen.len() as f64;
    let deliberate = seen.iter().filter(|s| s.deliberate).count();
    eprintln!(
        "share: {to_v2} of {} cookie-less requests reached v2 ({:.2}%), {deliberate} deliberate 500s",
        seen.len(),
        share * 100.0
    );
    assert!(seen.len() >= 2_000);
    assert!((share - 0.10).abs() <= 0.02, "share {share}");
    assert!(
        seen.iter().all(|s| s.set_cookie.is_some()),
        "every cookie-less request is assigned a cookie during a canary"
    );
    let still = h.status().await;
    assert!(still.canary.is_some(), "no breach yet: {still:?}");
    let text = metrics::scrape_text(metrics).await;
    let svc = h.svc.as_str();
    let share_label = [("service", svc), ("colour", canary.color.as_str())];
    assert_eq!(
        metrics::sample(&text, "cutover_canary_share_ratio", &share_label),
        Some(0.1),
        "{text}"
    );

    // Go on until the bake breaks (bounded): the canary is aborted.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut more = 0;
    while h.status().await.canary.is_some() {
        assert!(Instant::now() < deadline, "no automatic rollback");
        let seen = cookieless(h.proxy.http, 8, 400).await;
        more += seen.len();
        let failures: Vec<&Seen> = seen.iter().filter(|s| unexpected(s)).collect();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
    }
    let out = tokio::time::timeout(Duration::from_secs(60), deploy)
        .await
        .expect("deploy ends")
        .expect("deploy task");
    assert_eq!(out.code, Some(1), "deploy fails on the breach: {out}");
    let text = out.text();
    assert!(text.contains("error rate"), "{out}");
    assert!(text.contains("breach_to_switch_ms="), "{out}");

    let status = h.status().await;
    let bake = status.bake.clone().expect("bake in status");
    assert_eq!(bake.state, "breached", "{status:?}");
    assert_eq!(bake.phase, "canary", "{status:?}");
    assert!(bake.requests >= 400, "{bake:?}");
    let breach_to_switch = bake.breach_to_switch_ms.expect("breach_to_switch_ms");
    eprintln!(
        "breach: {} answers of v2, {} 5xx, p99 {:?} ms, breach_to_switch_ms {breach_to_switch} ({more} requests after the share was measured)",
        bake.requests, bake.errors, bake.p99_ms
    );
    assert!(status.canary.is_none(), "{status:?}");
    assert_eq!(active(&status).image.as_deref(), Some(v1.as_str()));
    // Every new request is on v1, and the canary's container is gone.
    let after = cookieless(h.proxy.http, 2, 200).await;
    assert!(after.iter().all(|s| s.version == "v1" && s.status == 200));
    assert!(
        after.iter().all(|s| s.set_cookie.is_none()),
        "no cookie without a canary"
    );

    // The metrics saw it: the breach, the automatic rollback, the failed
    // deploy, the canary's answers under its colour; no share left.
    let text = metrics::scrape_text(metrics).await;
    metrics::promtool_check(&text);
    let breached = [
        ("service", svc),
        ("phase", "canary"),
        ("outcome", "breached"),
    ];
    assert_eq!(
        metrics::sample(&text, "cutover_bakes_total", &breached),
        Some(1.0),
        "{text}"
    );
    let rollbacks = [("service", svc), ("phase", "canary")];
    assert_eq!(
        metrics::sample(
            &text,
            "cutover_bake_breach_to_switch_seconds_count",
            &rollbacks
        ),
        Some(1.0),
        "{text}"
    );
    let rolled_back = [("service", svc), ("outcome", "rolled_back")];
    assert_eq!(
        metrics::sample(&text, "cutover_deploys_total", &rolled_back),
        Some(1.0),
        "{text}"
    );
    let canary_5xx = [
        ("service", svc),
        ("colour", canary.color.as_str()),
        ("status_class", "5xx"),
    ];
    let counted = metrics::sample(&text, "cutover_http_requests_total", &canary_5xx);
    assert!(
        counted.is_some_and(|n| n >= bake.errors as f64),
        "the canary's 5xx are counted under its colour ({counted:?}, bake saw {}): {text}",
        bake.errors
    );
    assert_eq!(
        metrics::sample(&text, "cutover_canary_share_ratio", &share_label),
        None,
        "no share once the canary is gone: {text}"
    );
    h.consistent().await;
    h.done();
}

// ---------------------------------------------------------------------------
// 2. a healthy version passes the window; the previous colour stays warm
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_version_passes_the_bake_window() {
    let h = Harness::start(
        "cpass",
        Opts {
            extra: r#"bake = { window = "2s", max_error_rate = "1%", min_requests = 50, max_p99 = "800ms" }"#,
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;
    let v1_container = h.containers()[0].id.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, http) = (stop.clone(), h.proxy.http);
        tokio::spawn(async move {
            let mut client = Client::connect(http, true).await.expect("connect");
            let (mut n, deadline) = (0, Instant::now() + Duration::from_secs(60));
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 100_000 {
                match client.get().await {
                    Ok(seen) if unexpected(&seen) => bad.push(format!("{seen:?}")),
                    Ok(_) => {}
                    Err(e) => bad.push(e),
                }
                n += 1;
            }
            (n, bad)
        })
    };
    let out = cli_in_background(
        &h,
        &["deploy", &h.svc, "--image", &v2],
        Duration::from_secs(60),
    )
    .await
    .expect("deploy task");
    stop.store(true, Ordering::Relaxed);
    let (requests, bad) = load.await.expect("load task");
    assert!(out.success(), "deploy passes its window: {out}");
    assert!(bad.is_empty(), "failed requests: {bad:?}");
    let report = deploy_report(&out);
    let bake = report.bake.expect("bake in the deploy report");
    eprintln!("bake passed: {bake:?} ({requests} requests sent)");
    assert_eq!(
        (bake.state.as_str(), bake.phase.as_str()),
        ("passed", "switch")
    );
    assert!(
        bake.requests >= 50,
        "the window judged real answers: {bake:?}"
    );
    assert!(bake.elapsed_ms >= 2_000, "{bake:?}");
    assert!(out.stdout.contains("passed its bake window"), "{out}");

    let status = h.consistent().await;
    assert_eq!(active(&status).image.as_deref(), Some(v2.as_str()));
    let warm = previous(&status);
    assert!(
        warm.container
            .as_deref()
            .is_some_and(|id| v1_container.starts_with(id) || id.starts_with(&v1_container)),
        "v1 is the warm previous colour: {status:?}"
    );
    assert_eq!(status.bake.map(|b| b.state), Some("passed".to_string()));
    h.done();
}

// ---------------------------------------------------------------------------
// 3. stickiness, promote, abort
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_keeps_clients_on_their_colour_until_promote_or_abort() {
    let mut h = Harness::start("csticky", Opts::default()).await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    let v3 = h.image("v3", &[]).await;
    h.deploy_ok(&v1).await;
    let out = h
        .proxy
        .cli(&["deploy", &h.svc, "--image", &v2, "--canary", "50%"])
        .await;
    assert!(out.success(), "{out}");
    let status = h.consistent().await;
    assert_eq!(active(&status).image.as_deref(), Some(v1.as_str()));

    // Browsers: assigned on their first request, then kept there.
    let mut on = std::collections::BTreeMap::<String, Client>::new();
    for _ in 0..200 {
        if on.len() == 2 {
            break;
        }
        let mut client = Client::connect(h.proxy.http, true).await.expect("connect");
        let first = client.get().await.expect("GET");
        assert_eq!(first.status, 200, "{first:?}");
        assert!(first.set_cookie.is_some(), "assigned: {first:?}");
        on.entry(first.version.clone()).or_insert(client);
    }
    assert_eq!(
        on.len(),
        2,
        "50% share: both colours assigned within 200 clients"
    );
    for (version, client) in on.iter_mut() {
        for _ in 0..60 {
            let seen = client.get().await.expect("GET");
            assert_eq!(&seen.version, version, "sticky: {seen:?}");
            assert!(seen.set_cookie.is_none(), "a kept cookie is not set again");
        }
    }
    // A restart (SIGKILL) keeps the split, the canary's container and
    // every client's colour.
    h.proxy.kill9();
    h.proxy.spawn().await;
    let status = h.consistent().await;
    assert_eq!(
        status.canary.as_ref().map(|c| c.share_bp),
        Some(5_000),
        "{status:?}"
    );
    for (version, client) in on.iter_mut() {
        let mut again = Client::connect(h.proxy.http, true).await.expect("connect");
        again.cookie = client.cookie.clone();
        for _ in 0..10 {
            let seen = again.get().await.expect("GET");
            assert_eq!(&seen.version, version, "sticky after a restart: {seen:?}");
        }
        *client = again;
    }
    // A cookie for a colour that is not serving is reassigned.
    let mut stale = Client::connect(h.proxy.http, true).await.expect("connect");
    stale.cookie = Some(format!("cutover_{}=green-0", h.svc));
    let seen = stale.get().await.expect("GET");
    assert!(seen.set_cookie.is_some(), "reassigned: {seen:?}");

    // Promote: everyone on v2, whatever their cookie.
    let out = h.proxy.cli(&["promote", &h.svc]).await;
    assert!(out.success(), "{out}");
    for client in on.values_mut() {
        for _ in 0..10 {
            let seen = client.get().await.expect("GET");
            assert_eq!(seen.version, "v2", "promoted: {seen:?}");
            assert!(seen.set_cookie.is_none());
        }
    }
    let status = h.consistent().await;
    assert_eq!(active(&status).image.as_deref(), Some(v2.as_str()));
    assert_eq!(previous(&status).image.as_deref(), Some(v1.as_str()));
    assert!(status.canary.is_none());

    // Abort: a v3 canary, then everyone back on v2 and v3's container gone.
    let out = h
        .proxy
        .cli(&["deploy", &h.svc, "--image", &v3, "--canary", "50%"])
        .await;
    assert!(out.success(), "{out}");
    let mut on_v3 = None;
    for _ in 0..200 {
        let mut client = Client::connect(h.proxy.http, true).await.expect("connect");
        if client.get().await.expect("GET").version == "v3" {
            on_v3 = Some(client);
            break;
        }
    }
    let mut on_v3 = on_v3.expect("a client assigned to v3 within 200");
    let busy = h.proxy.cli(&["deploy", &h.svc, "--image", &v1]).await;
    assert_eq!(busy.code, Some(2), "no deploy during a canary: {busy}");
    assert!(busy.text().contains("promote"), "{busy}");
    let out = h.proxy.cli(&["abort", &h.svc]).await;
    assert!(out.success(), "{out}");
    for _ in 0..10 {
        let seen = on_v3.get().await.expect("GET");
        assert_eq!(seen.version, "v2", "aborted: {seen:?}");
    }
    let status = h.consistent().await;
    assert!(status.canary.is_none());
    assert!(
        with_image(&h.containers(), &v3).is_empty(),
        "the aborted canary's container is removed:\n{}",
        h.ps()
    );
    let again = h.proxy.cli(&["abort", &h.svc]).await;
    assert_eq!(again.code, Some(2), "nothing to abort: {again}");
    h.done();
}

// ---------------------------------------------------------------------------
// 4. under load: canary start, promote, automatic rollback
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_promote_and_automatic_rollback_lose_no_request_under_load() {
    let h = Harness::start(
        "cload",
        Opts {
            extra: r#"bake = { window = "3s", max_error_rate = "1%", min_requests = 100 }"#,
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    let v3 = h.image("v3", &[("FAIL_PERCENT", "10")]).await;
    h.deploy_ok(&v1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let (answers, deliberate) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hard_limit = Instant::now() + Duration::from_secs(120);
    let mut clients = Vec::new();
    for n in 0..8 {
        let (stop, failures) = (stop.clone(), failures.clone());
        let (answers, deliberate, http) = (answers.clone(), deliberate.clone(), h.proxy.http);
        clients.push(tokio::spawn(async move {
            // Half keep their cookie (browsers), half never send one.
            let mut client = match Client::connect(http, n % 2 == 0).await {
                Ok(client) => client,
                Err(e) => return failures.lock().expect("lock").push(format!("{n}: {e}")),
            };
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard_limit && sent < 200_000 {
                sent += 1;
                match client.get().await {
                    Ok(seen) if unexpected(&seen) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("{n}: {seen:?}")),
                    Ok(seen) => {
                        answers.fetch_add(1, Ordering::Relaxed);
                        deliberate.fetch_add(usize::from(seen.deliberate), Ordering::Relaxed);
                    }
                    Err(e) => {
                        failures.lock().expect("lock").push(format!("{n}: {e}"));
                        return;
                    }
                }
            }
        }));
    }
    let running = |at_least: usize| {
        let answers = answers.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while answers.load(Ordering::Relaxed) < at_least && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    running(50).await;
    let canary = h
        .proxy
        .cli(&["deploy", &h.svc, "--image", &v2, "--canary", "20%"])
        .await;
    running(answers.load(Ordering::Relaxed) + 200).await;
    let promote = h.proxy.cli(&["promote", &h.svc]).await;
    running(answers.load(Ordering::Relaxed) + 200).await;
    let bad = h.proxy.cli(&["deploy", &h.svc, "--image", &v3]).await;
    running(answers.load(Ordering::Relaxed) + 200).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("load client finished")
            .expect("load client task");
    }
    eprintln!("canary: {canary}\npromote: {promote}\nbad deploy: {bad}");
    assert!(canary.success(), "{canary}");
    assert!(promote.success(), "{promote}");
    assert_eq!(bad.code, Some(1), "the bad deploy breaches: {bad}");
    let failures = failures.lock().expect("lock").clone();
    let status = h.consistent().await;
    let bake = status.bake.clone().expect("bake");
    eprintln!(
        "load: {} answers, {} deliberate 500s from v3, {} failed; breach: {bake:?}",
        answers.load(Ordering::Relaxed),
        deliberate.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert_eq!(
        (bake.state.as_str(), bake.phase.as_str()),
        ("breached", "switch")
    );
    assert!(bake.breach_to_switch_ms.is_some(), "{bake:?}");
    assert_eq!(active(&status).image.as_deref(), Some(v2.as_str()));
    assert_eq!(h.version().await, "v2");
    let _ = v3;
    h.done();
}

// ---------------------------------------------------------------------------
// 5. a crash during the bake window: the restart resumes it
// ---------------------------------------------------------------------------

/// cutover is SIGKILLed while a full switch to a failing version is being
/// judged, before any request reached it. The restarted server resumes the
/// window from the state file; the first real requests breach it, traffic
/// goes back to the warm v1, and no request fails but v2's own 500s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_the_bake_window_is_resumed_and_still_rolls_back() {
    let mut h = Harness::start(
        "cresume",
        Opts {
            extra: r#"bake = { window = "60s", max_error_rate = "1%", min_requests = 200 }"#,
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[("FAIL_PERCENT", "10")]).await;
    h.deploy_ok(&v1).await;

    let deploy = cli_in_background(
        &h,
        &["deploy", &h.svc, "--tag", "v2"],
        Duration::from_secs(120),
    );
    let status = wait_status(&h, Duration::from_secs(30), "the switch to v2", |s| {
        s.bake.as_ref().is_some_and(|b| b.state == "running")
    })
    .await;
    assert_eq!(active(&status).image.as_deref(), Some(v2.as_str()));

    // The crash: the attached deploy loses its server.
    h.proxy.kill9();
    let out = tokio::time::timeout(Duration::from_secs(30), deploy)
        .await
        .expect("the deploy command ends")
        .expect("deploy task");
    assert_ne!(
        out.code,
        Some(0),
        "a deploy cut off by a crash is no success: {out}"
    );

    h.proxy.spawn().await;
    let status = wait_status(&h, Duration::from_secs(10), "the resumed window", |s| {
        s.bake.as_ref().is_some_and(|b| b.state == "running")
    })
    .await;
    assert_eq!(active(&status).image.as_deref(), Some(v2.as_str()));
    let bake = status.bake.clone().expect("bake");
    assert_eq!(bake.phase, "switch", "{status:?}");

    // Real requests: v2 fails 10% of them, the resumed judge sees it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    while active(&h.status().await).image.as_deref() == Some(v2.as_str()) {
        assert!(
            Instant::now() < deadline,
            "no automatic rollback after the restart:\n{}",
            h.proxy.log_text()
        );
        let seen = cookieless(h.proxy.http, 4, 200).await;
        sent += seen.len();
        let failures: Vec<&Seen> = seen.iter().filter(|s| unexpected(s)).collect();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
    }
    let status = h.status().await;
    let bake = status.bake.clone().expect("bake in status");
    eprintln!(
        "resumed window breached after {sent} requests: {} answers of v2, {} 5xx, breach_to_switch_ms {:?}",
        bake.requests, bake.errors, bake.breach_to_switch_ms
    );
    assert_eq!(
        (bake.state.as_str(), bake.phase.as_str()),
        ("breached", "switch"),
        "{status:?}"
    );
    assert!(bake.breach_to_switch_ms.is_some(), "{bake:?}");
    assert_eq!(active(&status).image.as_deref(), Some(v1.as_str()));
    let after = cookieless(h.proxy.http, 2, 100).await;
    assert!(after.iter().all(|s| s.version == "v1" && s.status == 200));
    h.consistent().await;
    h.done();
}

// ---------------------------------------------------------------------------
// 6. a stepped rollout (`bake.steps`) under load
// ---------------------------------------------------------------------------

/// A plain deploy on a service whose bake lists steps goes 10% → 50% →
/// 100% (a promote), each step judged; under cookie-less load no request
/// fails and both versions answer along the way; the deploy exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_rollout_goes_through_its_shares_under_load() {
    let h = Harness::start(
        "csteps",
        Opts {
            extra: r#"bake = { window = "2s", max_error_rate = "1%", min_requests = 20, steps = ["10%", "50%", "100%"], step_interval = "1s" }"#,
            ..Opts::default()
        },
    )
    .await;
    let v1 = h.image("v1", &[]).await;
    let v2 = h.image("v2", &[]).await;
    h.deploy_ok(&v1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, http) = (stop.clone(), h.proxy.http);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut all = Vec::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && all.len() < 200_000
            {
                all.extend(cookieless(http, 4, 100).await);
            }
            all
        })
    };
    let out = h.proxy.cli(&["deploy", &h.svc, "--image", &v2]).await;
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("load ends")
        .expect("load task");
    eprintln!("stepped deploy: {out}");
    assert!(out.success(), "{out}");
    let text = out.text();
    for step in [
        "takes 10% of new clients",
        "step 2/3: ",
        "takes 50% of new clients",
        "step 3/3: 100%: promoting",
        "passed its bake window",
    ] {
        assert!(text.contains(step), "no {step:?} in: {out}");
    }
    let failures: Vec<&Seen> = seen.iter().filter(|s| unexpected(s)).collect();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let on_v2 = seen.iter().filter(|s| s.version == "v2").count();
    eprintln!(
        "{} requests during the rollout, {on_v2} answered by v2",
        seen.len()
    );
    assert!(on_v2 > 0 && on_v2 < seen.len(), "both versions answered");
    let status = h.consistent().await;
    assert_eq!(active(&status).image.as_deref(), Some(v2.as_str()));
    assert!(status.canary.is_none(), "{status:?}");
    assert_eq!(
        previous(&status).image.as_deref(),
        Some(v1.as_str()),
        "v1 kept warm"
    );
    h.done();
}
