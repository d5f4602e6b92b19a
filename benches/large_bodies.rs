//! Large bodies: `cargo bench --bench large_bodies`.
//!
//! Method
//! - One origin (plain HTTP/1.1, separate process) that streams
//!   `GET /bytes/N` in 64 KiB chunks and counts `POST` bodies chunk by chunk,
//!   so it never holds a whole body either.
//! - Targets: `direct` (the origin), then cutover, nginx and HAProxy (one
//!   worker each, bodies streamed both ways, no size limit:
//!   `support/proxies.rs`), each freshly started so its peak RSS belongs to
//!   this scenario.
//! - Per target: one download of `BENCH_BODY_MIB` MiB (100) and one upload of
//!   the same size (`Content-Length`, sent in 64 KiB chunks) over one
//!   HTTP/1.1 connection. The client checks every byte arrived (download
//!   length; the origin's `received N` for the upload).
//! - Reported: MiB/s each way, the target's RSS before, and its peak RSS
//!   (`VmHWM` from `/proc/PID/status`) after both transfers. A proxy that
//!   buffered whole bodies would show a peak of about the body size.
//!
//! Output: Markdown on stdout, JSON in `target/bench-results/large_bodies.json`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

#[path = "support/mod.rs"]
mod support;
use support::proxies::{self, status_kib, Kind};
use support::*;

/// Upper bound for one transfer, so a stalled proxy cannot hang the bench.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

fn main() {
    if origin::serve_if_origin() {
        return;
    }
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("large_bodies: run it with `cargo bench --bench large_bodies`; skipped");
        return;
    }
    let mib: u64 = env_or("BENCH_BODY_MIB", 100).clamp(1, 4096);
    let size = mib * 1024 * 1024;
    println!("# Large bodies: {mib} MiB download and upload\n");
    println!("- load average at start: {}\n", load_average());

    let scratch = tempfile::tempdir().expect("create a temporary directory");
    let origin = origin::Origin::spawn();
    let mut rows = Vec::new();
    eprintln!("direct ...");
    rows.push(("direct", transfer(origin.addr, origin.pid(), size)));
    for kind in Kind::ALL {
        eprintln!("{} ...", kind.name());
        let dir = scratch.path().join(kind.name());
        let outcome = proxies::start(kind, &dir, origin.addr, proxies::Options::default())
            .and_then(|proxy| transfer(proxy.http, proxy.pid(), size));
        if let Err(reason) = &outcome {
            eprintln!("{}: {reason}", kind.name());
        }
        rows.push((kind.name(), outcome));
    }
    println!("{}", markdown(&rows));
    let path = results_path("large_bodies");
    write_json(
        &path,
        &serde_json::json!({
            "settings": { "body_mib": mib, "workers": 1 },
            "load_average_at_end": load_average(),
            "rows": rows.iter().map(|(target, outcome)| row_json(target, outcome)).collect::<Vec<_>>(),
        }),
    );
    println!("JSON: {}", path.display());
}

struct Transfers {
    download_mib_s: f64,
    upload_mib_s: f64,
    rss_before_kib: u64,
    peak_rss_kib: u64,
}

/// One download and one upload of `size` bytes through `addr`, with the
/// memory of process `pid`.
fn transfer(addr: SocketAddr, pid: u32, size: u64) -> Result<Transfers, String> {
    let rss_before_kib = status_kib(pid, "VmRSS").ok_or("cannot read VmRSS")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| err.to_string())?;
    let (download, upload) = runtime.block_on(async {
        let download = timed(download(addr, size)).await?;
        let upload = timed(upload(addr, size)).await?;
        Ok::<_, String>((download, upload))
    })?;
    let peak_rss_kib = status_kib(pid, "VmHWM").ok_or("cannot read VmHWM")?;
    let mib = size as f64 / (1024.0 * 1024.0);
    Ok(Transfers {
        download_mib_s: mib / download.as_secs_f64(),
        upload_mib_s: mib / upload.as_secs_f64(),
        rss_before_kib,
        peak_rss_kib,
    })
}

/// Runs `work` under `TRANSFER_TIMEOUT` and returns how long it took.
async fn timed(
    work: impl std::future::Future<Output = Result<(), String>>,
) -> Result<Duration, String> {
    let began = Instant::now();
    tokio::time::timeout(TRANSFER_TIMEOUT, work)
        .await
        .map_err(|_| format!("no complete transfer within {TRANSFER_TIMEOUT:?}"))??;
    Ok(began.elapsed())
}

async fn connect<B>(addr: SocketAddr) -> Result<http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("handshake: {err}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `GET /bytes/size`, counting the body as it streams in.
async fn download(addr: SocketAddr, size: u64) -> Result<(), String> {
    let mut sender = connect(addr).await?;
    let request = Request::get(format!("/bytes/{size}"))
        .header(hyper::header::HOST, "bench.test")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|err| err.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("download: {err}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("download: status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| format!("download body: {err}"))?;
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
        }
    }
    if received != size {
        return Err(format!("download: {received} of {size} bytes arrived"));
    }
    Ok(())
}

/// `POST /` with `size` bytes; the origin answers how many it received.
async fn upload(addr: SocketAddr, size: u64) -> Result<(), String> {
    let mut sender = connect(addr).await?;
    let request = Request::post("/")
        .header(hyper::header::HOST, "bench.test")
        .header(hyper::header::CONTENT_LENGTH, size)
        .body(origin::Filler::new(size))
        .map_err(|err| err.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("upload: {err}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("upload answer: {err}"))?
        .to_bytes();
    let answer = String::from_utf8_lossy(&body);
    if status != StatusCode::OK || answer.trim() != format!("received {size}") {
        return Err(format!(
            "upload: status {status}, answer {:?}",
            answer.trim()
        ));
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn markdown(rows: &[(&str, Result<Transfers, String>)]) -> String {
    let mut text = String::from(
        "| target | download MiB/s | upload MiB/s | RSS before MiB | peak RSS MiB |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for (target, outcome) in rows {
        match outcome {
            Ok(t) => {
                let _ = writeln!(
                    text,
                    "| {target} | {:.0} | {:.0} | {:.1} | {:.1} |",
                    t.download_mib_s,
                    t.upload_mib_s,
                    mib(t.rss_before_kib),
                    mib(t.peak_rss_kib)
                );
            }
            Err(reason) => {
                let _ = writeln!(text, "| {target} | {reason} | - | - | - |");
            }
        }
    }
    text
}

fn row_json(target: &str, outcome: &Result<Transfers, String>) -> serde_json::Value {
    match outcome {
        Ok(t) => serde_json::json!({
            "target": target,
            "download_mib_per_s": t.download_mib_s,
            "upload_mib_per_s": t.upload_mib_s,
            "rss_before_mib": mib(t.rss_before_kib),
            "peak_rss_mib": mib(t.peak_rss_kib),
        }),
        Err(reason) => serde_json::json!({ "target": target, "skipped": reason }),
    }
}
