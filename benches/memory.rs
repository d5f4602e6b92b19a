//! Memory with idle connections: `cargo bench --bench memory`.
//!
//! Method
//! - One origin (plain HTTP/1.1, separate process) behind cutover, nginx and
//!   HAProxy, one worker each (`support/proxies.rs`, idle timeouts 300 s).
//! - Idle: the proxy is started, answers one request, and after 1 s its
//!   resident set (`VmRSS` in `/proc/PID/status`) is read.
//! - Loaded with idle connections: this process opens `BENCH_IDLE_CONNECTIONS`
//!   (10,000) connections to the proxy, 256 at a time, sends one `GET /` on
//!   each and reads the answer, then leaves them all open and idle. After
//!   `BENCH_IDLE_SETTLE_SECONDS` (3 s: past cutover's 1 s `park_after`, so
//!   its idle HTTP/1.1 connections are parked as they would be) the proxy's
//!   `VmRSS` and `VmHWM` (peak) are read and the connections still open are
//!   counted; then all are closed.
//! - Three scenarios, each on a freshly started proxy: plain HTTP/1.1; TLS
//!   with HTTP/1.1 by ALPN; TLS with HTTP/2 by ALPN (one request per
//!   connection, then idle). TLS connections verify the dev certificate
//!   against `certs-dev/ca.pem` (TLS 1.3, the proxies' choice).
//! - Needs about `BENCH_IDLE_CONNECTIONS` + 100 open files in this process
//!   and twice that in the proxy: `benches/run` raises `ulimit -n` to the
//!   hard limit. Too low a limit is a row that says so.
//!
//! Output: Markdown on stdout, JSON in `target/bench-results/memory.json`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

#[path = "support/mod.rs"]
mod support;
use support::proxies::{self, status_kib, Kind};
use support::*;

/// Connections opened concurrently while building up the idle set.
const OPEN_BATCH: usize = 256;

fn main() {
    if origin::serve_if_origin() {
        return;
    }
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("memory: run it with `cargo bench --bench memory`; skipped");
        return;
    }
    let idle_connections: usize = env_or("BENCH_IDLE_CONNECTIONS", 10_000).clamp(1, 50_000);
    println!("# Memory: idle, and with {idle_connections} idle connections\n");
    println!("- load average at start: {}", load_average());
    println!("- open files limit (soft): {:?}\n", open_files_soft_limit());

    let scratch = tempfile::tempdir().expect("create a temporary directory");
    let origin = origin::Origin::spawn();
    let settle = Duration::from_secs(env_or("BENCH_IDLE_SETTLE_SECONDS", 3).clamp(1, 60));
    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        for kind in Kind::ALL {
            eprintln!(
                "{} ({}): opening {idle_connections} idle connections ...",
                kind.name(),
                scenario.name()
            );
            let dir = scratch
                .path()
                .join(format!("{}-{}", kind.name(), scenario.slug()));
            let outcome = proxies::start(kind, &dir, origin.addr, proxies::Options::default())
                .and_then(|proxy| measure(&proxy, scenario, idle_connections, settle));
            if let Err(reason) = &outcome {
                eprintln!("{} ({}): {reason}", kind.name(), scenario.name());
            }
            rows.push((kind.name(), scenario, outcome));
        }
    }
    println!("{}", markdown(&rows));
    let path = results_path("memory");
    write_json(
        &path,
        &serde_json::json!({
            "settings": {
                "idle_connections": idle_connections,
                "workers": 1,
                "settle_seconds": settle.as_secs(),
            },
            "load_average_at_end": load_average(),
            "rows": rows
                .iter()
                .map(|(target, scenario, outcome)| row_json(target, *scenario, outcome))
                .collect::<Vec<_>>(),
        }),
    );
    println!("JSON: {}", path.display());
}

/// How the idle connections are opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    PlainH1,
    TlsH1,
    TlsH2,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::PlainH1, Scenario::TlsH1, Scenario::TlsH2];

    fn name(self) -> &'static str {
        match self {
            Scenario::PlainH1 => "plain h1",
            Scenario::TlsH1 => "TLS h1",
            Scenario::TlsH2 => "TLS h2",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Scenario::PlainH1 => "plain-h1",
            Scenario::TlsH1 => "tls-h1",
            Scenario::TlsH2 => "tls-h2",
        }
    }
}

/// What one proxy's memory looked like.
struct Memory {
    idle_rss_kib: u64,
    /// Connections that got their 200 answer.
    opened: usize,
    /// Connections that failed to connect or to get their answer.
    failed: usize,
    open_seconds: f64,
    /// Of `opened`, how many were still open when RSS was read.
    still_open: usize,
    loaded_rss_kib: u64,
    loaded_hwm_kib: u64,
}

fn measure(
    proxy: &proxies::Running,
    scenario: Scenario,
    connections: usize,
    settle: Duration,
) -> Result<Memory, String> {
    if let Some(soft) = open_files_soft_limit() {
        if soft < connections as u64 + 100 {
            return Err(format!(
                "open files limit {soft} is too low for {connections} connections: \
                 run `ulimit -n {}` first (benches/run does)",
                connections + 100
            ));
        }
    }
    probe(proxy.http).map_err(|err| format!("first request failed: {err}"))?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = proxy.pid();
    let idle_rss_kib = status_kib(pid, "VmRSS").ok_or("cannot read the proxy's VmRSS")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| err.to_string())?;
    runtime.block_on(async {
        let began = Instant::now();
        let client = Client::new(proxy, scenario)?;
        let (held, failed) = open_idle(&client, connections).await;
        let open_seconds = began.elapsed().as_secs_f64();
        tokio::time::sleep(settle).await;
        let loaded_rss_kib = status_kib(pid, "VmRSS").ok_or("cannot read the proxy's VmRSS")?;
        let loaded_hwm_kib = status_kib(pid, "VmHWM").ok_or("cannot read the proxy's VmHWM")?;
        let still_open = held
            .iter()
            .filter(|held| !held.connection.is_finished())
            .count();
        Ok(Memory {
            idle_rss_kib,
            opened: held.len(),
            failed,
            open_seconds,
            still_open,
            loaded_rss_kib,
            loaded_hwm_kib,
        })
    })
}

/// A connection kept open: its request sender (dropping it would let the
/// client end the connection) and its connection task.
struct Held {
    _sender: Box<dyn std::any::Any + Send>,
    connection: tokio::task::JoinHandle<()>,
}

/// How to reach the proxy in one scenario.
#[derive(Clone)]
struct Client {
    scenario: Scenario,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    fn new(proxy: &proxies::Running, scenario: Scenario) -> Result<Client, String> {
        let alpn: &[u8] = match scenario {
            Scenario::PlainH1 => {
                return Ok(Client {
                    scenario,
                    addr: proxy.http,
                    tls: None,
                })
            }
            Scenario::TlsH1 => b"http/1.1",
            Scenario::TlsH2 => b"h2",
        };
        let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev/ca.pem");
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject as _;
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(&ca)
            .map_err(|err| format!("{}: {err}", ca.display()))?
        {
            let cert = cert.map_err(|err| format!("{}: {err}", ca.display()))?;
            roots.add(cert).map_err(|err| err.to_string())?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Client {
            scenario,
            addr: proxy.https,
            tls: Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
                config,
            ))),
        })
    }
}

/// Opens `count` connections, `OPEN_BATCH` at a time, each answering one
/// `GET /`; returns those that worked and the number that failed.
async fn open_idle(client: &Client, count: usize) -> (Vec<Held>, usize) {
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    let mut remaining = count;
    let mut first_error = None;
    while remaining > 0 {
        let batch = remaining.min(OPEN_BATCH);
        remaining -= batch;
        let tasks: Vec<_> = (0..batch)
            .map(|_| tokio::spawn(open_one(client.clone())))
            .collect();
        for task in tasks {
            match task.await {
                Ok(Ok(connection)) => held.push(connection),
                Ok(Err(err)) => {
                    failed += 1;
                    first_error.get_or_insert(err);
                }
                Err(_) => failed += 1,
            }
        }
    }
    if let Some(err) = first_error {
        eprintln!("  {failed} connections failed; the first: {err}");
    }
    (held, failed)
}

async fn open_one(client: Client) -> Result<Held, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(client.addr)
            .await
            .map_err(|err| err.to_string())?;
        let Some(connector) = &client.tls else {
            return exchange_h1(TokioIo::new(stream)).await;
        };
        let name =
            rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = connector
            .connect(name, stream)
            .await
            .map_err(|err| format!("TLS: {err}"))?;
        let io = TokioIo::new(tls);
        match client.scenario {
            Scenario::TlsH2 => exchange_h2(io).await,
            _ => exchange_h1(io).await,
        }
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
}

/// One `GET /` over HTTP/1.1; the connection is kept.
async fn exchange_h1<IO>(io: IO) -> Result<Held, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = http1::handshake(io).await.map_err(|err| err.to_string())?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get("/")
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|err| err.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| err.to_string())?;
    expect_ok(response).await?;
    Ok(Held {
        _sender: Box::new(sender),
        connection,
    })
}

/// One `GET /` over HTTP/2; the connection is kept.
async fn exchange_h2<IO>(io: IO) -> Result<Held, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|err| err.to_string())?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get("https://localhost/")
        .body(Empty::<Bytes>::new())
        .map_err(|err| err.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| err.to_string())?;
    expect_ok(response).await?;
    Ok(Held {
        _sender: Box::new(sender),
        connection,
    })
}

async fn expect_ok(response: hyper::Response<hyper::body::Incoming>) -> Result<(), String> {
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|err| err.to_string())?;
    if status != StatusCode::OK {
        return Err(format!("status {status}"));
    }
    Ok(())
}

/// The soft limit on open files of this process.
fn open_files_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn markdown(rows: &[(&str, Scenario, Result<Memory, String>)]) -> String {
    let mut text = String::from(
        "| target | scenario | idle RSS MiB | connections open | failed | still open | RSS with them MiB | peak RSS MiB | KiB per connection | open s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (target, scenario, outcome) in rows {
        let scenario = scenario.name();
        match outcome {
            Ok(m) => {
                let _ = writeln!(
                    text,
                    "| {target} | {scenario} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    mib(m.idle_rss_kib),
                    m.opened,
                    m.failed,
                    m.still_open,
                    mib(m.loaded_rss_kib),
                    mib(m.loaded_hwm_kib),
                    per_connection_kib(m),
                    m.open_seconds,
                );
            }
            Err(reason) => {
                let _ = writeln!(
                    text,
                    "| {target} | {scenario} | {reason} | - | - | - | - | - | - | - |"
                );
            }
        }
    }
    text
}

fn per_connection_kib(m: &Memory) -> f64 {
    m.loaded_rss_kib.saturating_sub(m.idle_rss_kib) as f64 / m.opened.max(1) as f64
}

fn row_json(
    target: &str,
    scenario: Scenario,
    outcome: &Result<Memory, String>,
) -> serde_json::Value {
    match outcome {
        Ok(m) => serde_json::json!({
            "target": target,
            "scenario": scenario.name(),
            "idle_rss_mib": mib(m.idle_rss_kib),
            "connections_opened": m.opened,
            "connections_failed": m.failed,
            "connections_still_open": m.still_open,
            "rss_with_connections_mib": mib(m.loaded_rss_kib),
            "peak_rss_mib": mib(m.loaded_hwm_kib),
            "kib_per_connection": per_connection_kib(m),
            "open_seconds": m.open_seconds,
        }),
        Err(reason) => {
            serde_json::json!({ "target": target, "scenario": scenario.name(), "skipped": reason })
        }
    }
}
