//! `cutover-testapp`: a tiny HTTP/1.1 backend used by cutover's test suite.
//!
//! The tests build it as a static binary, pack it into a `FROM scratch`
//! Docker image and deploy it behind the proxy. Its behaviour (version,
//! slow start, health, crashes, signal handling) is driven by environment
//! variables so that one image covers every deploy scenario:
//!
//! | variable           | meaning                                                    |
//! |--------------------|------------------------------------------------------------|
//! | `APP_VERSION`      | version reported everywhere (default `dev`)                |
//! | `LISTEN`           | listen address (default `0.0.0.0:8080`)                    |
//! | `START_DELAY_MS`   | sleep this long before binding the listener                |
//! | `HEALTH_FAIL=1`    | `/health` answers 503 forever                              |
//! | `HEALTHY_AFTER_MS` | `/health` answers 503 until this long after process start  |
//! | `CRASH_AFTER_MS`   | exit with code 3 this long after process start             |
//! | `IGNORE_SIGTERM=1` | keep running on SIGTERM (SIGINT still exits)               |
//! | `FAIL_PERCENT=N`   | `/` answers 500 to N% of its requests, spread evenly       |
//!
//! Endpoints: `/`, `/health`, `/slow?ms=N`, `/headers`; anything else is 404.
//! Every response carries an `x-app-version` header; a 500 made by
//! `FAIL_PERCENT` also carries `x-app-failure: deliberate`, so tests count
//! the app's own failures apart from any the proxy would cause.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// Exit code used when `CRASH_AFTER_MS` fires.
const CRASH_EXIT_CODE: i32 = 3;

/// Settings read once from the environment at start.
#[derive(Debug)]
struct Config {
    version: String,
    listen: String,
    start_delay: Option<Duration>,
    health_fail: bool,
    healthy_after: Option<Duration>,
    crash_after: Option<Duration>,
    ignore_sigterm: bool,
    fail_percent: u64,
}

impl Config {
    fn from_env() -> Self {
        Config {
            version: env_or("APP_VERSION", "dev"),
            listen: env_or("LISTEN", "0.0.0.0:8080"),
            start_delay: env_millis("START_DELAY_MS"),
            health_fail: env_flag("HEALTH_FAIL"),
            healthy_after: env_millis("HEALTHY_AFTER_MS"),
            crash_after: env_millis("CRASH_AFTER_MS"),
            ignore_sigterm: env_flag("IGNORE_SIGTERM"),
            fail_percent: std::env::var("FAIL_PERCENT")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(0, |p| p.min(100)),
        }
    }
}

/// What every request handler can see.
struct State {
    config: Config,
    started: Instant,
    /// Requests to `/` so far, for `FAIL_PERCENT`.
    root_requests: std::sync::atomic::AtomicU64,
}

type Resp = Response<Full<Bytes>>;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// Reads a millisecond count; a missing or empty variable is `None`, a
/// malformed one is reported and ignored.
fn env_millis(name: &str) -> Option<Duration> {
    let raw = std::env::var(name).ok().filter(|v| !v.is_empty())?;
    match raw.trim().parse::<u64>() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            eprintln!("testapp: ignoring {name}={raw:?}: not a number of milliseconds");
            None
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let state = Arc::new(State {
        config: Config::from_env(),
        started: Instant::now(),
        root_requests: std::sync::atomic::AtomicU64::new(0),
    });
    if let Some(after) = state.config.crash_after {
        tokio::spawn(crash_after(after));
    }
    tokio::select! {
        result = serve(state.clone()) => {
            if let Err(err) = result {
                eprintln!("testapp: {err}");
                std::process::exit(1);
            }
        }
        () = wait_for_shutdown(state.config.ignore_sigterm) => {
            eprintln!("testapp {} shutting down", state.config.version);
            std::process::exit(0);
        }
    }
}

/// Sleeps, then exits with [`CRASH_EXIT_CODE`].
async fn crash_after(after: Duration) {
    tokio::time::sleep(after).await;
    eprintln!("crashing as asked");
    std::process::exit(CRASH_EXIT_CODE);
}

/// Resolves on SIGINT, or on SIGTERM unless told to ignore it. The handlers
/// are needed because the binary runs as PID 1 in its container, where the
/// kernel applies no default action to these signals.
async fn wait_for_shutdown(ignore_sigterm: bool) {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    loop {
        tokio::select! {
            _ = int.recv() => return,
            _ = term.recv() => {
                if !ignore_sigterm {
                    return;
                }
                eprintln!("testapp: ignoring SIGTERM as asked");
            }
        }
    }
}

/// Binds the listener (after the optional start delay) and serves forever.
async fn serve(state: Arc<State>) -> std::io::Result<()> {
    if let Some(delay) = state.config.start_delay {
        eprintln!("testapp: delaying start by {} ms", delay.as_millis());
        tokio::time::sleep(delay).await;
    }
    let listener = TcpListener::bind(&state.config.listen).await?;
    let addr = listener.local_addr()?;
    eprintln!("testapp {} listening on {addr}", state.config.version);
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(serve_connection(stream, peer, state.clone()));
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, state: Arc<State>) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(req, &state).await) }
    });
    if let Err(err) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        eprintln!("testapp: connection from {peer}: {err}");
    }
}

async fn route(req: Request<Incoming>, state: &State) -> Resp {
    let version = &state.config.version;
    let mut resp = match req.uri().path() {
        "/" if deliberate_failure(state) => {
            let mut resp = text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "deliberate failure (FAIL_PERCENT)\n".to_string(),
            );
            resp.headers_mut()
                .insert("x-app-failure", HeaderValue::from_static("deliberate"));
            resp
        }
        "/" => text(StatusCode::OK, format!("version={version}\n")),
        "/health" => health(state),
        "/slow" => slow(req.uri().query(), version).await,
        "/headers" => json(StatusCode::OK, headers_json(req.headers())),
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    if let Ok(value) = HeaderValue::from_str(version) {
        resp.headers_mut().insert("x-app-version", value);
    }
    resp
}

/// Whether this request to `/` is one of the `FAIL_PERCENT` that fail:
/// request n fails when n·p/100 steps up, so failures are spread evenly.
fn deliberate_failure(state: &State) -> bool {
    let percent = state.config.fail_percent;
    if percent == 0 {
        return false;
    }
    let n = state
        .root_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (n + 1) * percent / 100 != n * percent / 100
}

fn health(state: &State) -> Resp {
    let config = &state.config;
    let warming_up = config
        .healthy_after
        .is_some_and(|after| state.started.elapsed() < after);
    if config.health_fail || warming_up {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"DOWN"}"#.to_string(),
        );
    }
    json(
        StatusCode::OK,
        format!(
            r#"{{"status":"UP","version":{}}}"#,
            json_string(&config.version)
        ),
    )
}

/// `GET /slow?ms=N`: waits N ms (0 when absent), then answers like `/`.
async fn slow(query: Option<&str>, version: &str) -> Resp {
    let ms = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .unwrap_or("0");
    let Ok(ms) = ms.parse::<u64>() else {
        return text(StatusCode::BAD_REQUEST, "ms must be a number\n".to_string());
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    text(StatusCode::OK, format!("version={version}\n"))
}

/// Request headers as a JSON object; repeated headers are joined with ", ".
fn headers_json(headers: &HeaderMap) -> String {
    let mut merged: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        merged.entry(name.as_str()).or_default().push(value);
    }
    let fields: Vec<String> = merged
        .iter()
        .map(|(name, values)| format!("{}:{}", json_string(name), json_string(&values.join(", "))))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// Quotes and escapes `s` as a JSON string.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn text(status: StatusCode, body: String) -> Resp {
    respond(status, "text/plain", body)
}

fn json(status: StatusCode, body: String) -> Resp {
    respond(status, "application/json", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
