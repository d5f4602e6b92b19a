//! Memory with idle connections: `cargo bench --bench memory`.
//!
//! Method
//! - One origin (plain HTTP/1.1, separate process) behind cutover, nginx and
//!   HAProxy, one worker each (`support/proxies.rs`, idle timeouts 300 s).
//! - Idle: the proxy is started, answers one request, and after 1 s its
//!   resident set (`VmRSS` in `/proc/PID/status`) is read.
//! - Loaded with idle connections: this process opens `BENCH_IDLE_CONNECTIONS`
//!   (10,000) HTTP/1.1 connections to the proxy, 256 at a time, sends one
//!   `GET /` on each and reads the answer, then leaves them all open and
//!   idle. After 1 s the proxy's `VmRSS` and `VmHWM` (peak) are read and the
//!   connections still open are counted; then all are closed.
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
    println!("# Memory: idle, and with {idle_connections} idle HTTP/1.1 connections\n");
    println!("- load average at start: {}", load_average());
    println!("- open files limit (soft): {:?}\n", open_files_soft_limit());

    let scratch = tempfile::tempdir().expect("create a temporary directory");
    let origin = origin::Origin::spawn();
    let mut rows = Vec::new();
    for kind in Kind::ALL {
        eprintln!(
            "{}: opening {idle_connections} idle connections ...",
            kind.name()
        );
        let dir = scratch.path().join(kind.name());
        let outcome = proxies::start(kind, &dir, origin.addr, proxies::Options::default())
            .and_then(|proxy| measure(&proxy, idle_connections));
        if let Err(reason) = &outcome {
            eprintln!("{}: {reason}", kind.name());
        }
        rows.push((kind.name(), outcome));
    }
    println!("{}", markdown(&rows));
    let path = results_path("memory");
    write_json(
        &path,
        &serde_json::json!({
            "settings": { "idle_connections": idle_connections, "workers": 1 },
            "load_average_at_end": load_average(),
            "rows": rows.iter().map(|(target, outcome)| row_json(target, outcome)).collect::<Vec<_>>(),
        }),
    );
    println!("JSON: {}", path.display());
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

fn measure(proxy: &proxies::Running, connections: usize) -> Result<Memory, String> {
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
        let (held, failed) = open_idle(proxy.http, connections).await;
        let open_seconds = began.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let loaded_rss_kib = status_kib(pid, "VmRSS").ok_or("cannot read the proxy's VmRSS")?;
        let loaded_hwm_kib = status_kib(pid, "VmHWM").ok_or("cannot read the proxy's VmHWM")?;
        let still_open = held
            .iter()
            .filter(|(_, connection)| !connection.is_finished())
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

/// A connection kept open: its request sender and its connection task.
type Held = (
    http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
);

/// Opens `count` connections, `OPEN_BATCH` at a time, each answering one
/// `GET /`; returns those that worked and the number that failed.
async fn open_idle(addr: SocketAddr, count: usize) -> (Vec<Held>, usize) {
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    let mut remaining = count;
    while remaining > 0 {
        let batch = remaining.min(OPEN_BATCH);
        remaining -= batch;
        let tasks: Vec<_> = (0..batch).map(|_| tokio::spawn(open_one(addr))).collect();
        for task in tasks {
            match task.await {
                Ok(Ok(connection)) => held.push(connection),
                _ => failed += 1,
            }
        }
    }
    (held, failed)
}

async fn open_one(addr: SocketAddr) -> Result<Held, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|err| err.to_string())?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| err.to_string())?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::get("/")
            .header(hyper::header::HOST, "bench.test")
            .body(Empty::new())
            .map_err(|err| err.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| err.to_string())?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|err| err.to_string())?;
        if status != StatusCode::OK {
            return Err(format!("status {status}"));
        }
        Ok((sender, task))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
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

fn markdown(rows: &[(&str, Result<Memory, String>)]) -> String {
    let mut text = String::from(
        "| target | idle RSS MiB | connections open | failed | still open | RSS with them MiB | peak RSS MiB | KiB per connection | open s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (target, outcome) in rows {
        match outcome {
            Ok(m) => {
                let _ = writeln!(
                    text,
                    "| {target} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
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
                let _ = writeln!(text, "| {target} | {reason} | - | - | - | - | - | - | - |");
            }
        }
    }
    text
}

fn per_connection_kib(m: &Memory) -> f64 {
    m.loaded_rss_kib.saturating_sub(m.idle_rss_kib) as f64 / m.opened.max(1) as f64
}

fn row_json(target: &str, outcome: &Result<Memory, String>) -> serde_json::Value {
    match outcome {
        Ok(m) => serde_json::json!({
            "target": target,
            "idle_rss_mib": mib(m.idle_rss_kib),
            "connections_opened": m.opened,
            "connections_failed": m.failed,
            "connections_still_open": m.still_open,
            "rss_with_connections_mib": mib(m.loaded_rss_kib),
            "peak_rss_mib": mib(m.loaded_hwm_kib),
            "kib_per_connection": per_connection_kib(m),
            "open_seconds": m.open_seconds,
        }),
        Err(reason) => serde_json::json!({ "target": target, "skipped": reason }),
    }
}
