//! TLS scenarios: `cargo bench --bench tls_throughput`.
//!
//! Method
//! - One origin (plain HTTP/1.1, 100-byte body, a separate process) behind
//!   cutover, nginx and HAProxy, each terminating TLS with the dev
//!   certificate from `certs-dev/` on one worker thread (`support/proxies.rs`).
//! - Three loads per proxy, one after another:
//!   1. `h2`: HTTP/2 over TLS, `h2load -t1 -c<clients> -m<streams>` (several
//!      streams per connection), 1 s warm-up inside h2load;
//!   2. `https h1 keep-alive`: `wrk -t1 -c64 https://…` (HTTP/1.1, no ALPN);
//!   3. `new connections`: `wrk -t1 -c<n> -H "Connection: close"
//!      https://…`, so every request is a new TCP connection and a new TLS
//!      handshake: req/s = handshakes per second.
//! - CPU per request is the proxy process's own CPU time during the measured
//!   run divided by the requests served.
//! - A tool or proxy that is not installed gives a row saying so.
//!
//! Output: Markdown on stdout, JSON in `target/bench-results/tls_throughput.json`.
//! Environment: `BENCH_SECONDS` (5), `BENCH_WARMUP_SECONDS` (1),
//! `BENCH_CONNECTIONS` (64), `BENCH_H2_CLIENTS` (16), `BENCH_H2_STREAMS` (8),
//! `BENCH_NEWCONN_CONNECTIONS` (16), `BENCH_WORKERS` (1; 0 = all cores).

use std::fmt::Write as _;
use std::path::Path;

#[path = "support/mod.rs"]
mod support;
use support::load::{h2load, wrk, Measurement};
use support::proxies::{self, Kind};
use support::*;

fn main() {
    if origin::serve_if_origin() {
        return;
    }
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("tls_throughput: run it with `cargo bench --bench tls_throughput`; skipped");
        return;
    }
    let settings = Settings::from_env();
    println!("# TLS: HTTP/2, HTTPS HTTP/1.1, new connections\n");
    println!("- load average at start: {}", load_average());
    println!("- {}\n", settings.describe());
    let rows = run_all(&settings);
    println!("- load average at end: {}\n", load_average());
    println!("{}", markdown(&rows));
    let path = results_path("tls_throughput");
    write_json(
        &path,
        &serde_json::json!({
            "settings": settings.describe(),
            "load_average_at_end": load_average(),
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        }),
    );
    println!("JSON: {}", path.display());
}

struct Settings {
    seconds: u64,
    warmup_seconds: u64,
    connections: usize,
    h2_clients: usize,
    h2_streams: usize,
    newconn_connections: usize,
    workers: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            seconds: env_or("BENCH_SECONDS", 5).clamp(1, 300),
            warmup_seconds: env_or("BENCH_WARMUP_SECONDS", 1).min(60),
            connections: env_or("BENCH_CONNECTIONS", 64).clamp(1, 10_000),
            h2_clients: env_or("BENCH_H2_CLIENTS", 16).clamp(1, 1_000),
            h2_streams: env_or("BENCH_H2_STREAMS", 8).clamp(1, 128),
            newconn_connections: env_or("BENCH_NEWCONN_CONNECTIONS", 16).clamp(1, 1_000),
            workers: env_or("BENCH_WORKERS", 1),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} s measured per load after {} s warm-up; h2load -c{} -m{}; wrk -c{} keep-alive; \
             wrk -c{} Connection: close; workers per proxy: {}",
            self.seconds,
            self.warmup_seconds,
            self.h2_clients,
            self.h2_streams,
            self.connections,
            self.newconn_connections,
            if self.workers == 0 {
                "all cores".to_string()
            } else {
                self.workers.to_string()
            }
        )
    }
}

/// The three loads.
#[derive(Clone, Copy)]
enum Scenario {
    H2,
    HttpsKeepAlive,
    NewConnections,
}

impl Scenario {
    const ALL: [Scenario; 3] = [
        Scenario::H2,
        Scenario::HttpsKeepAlive,
        Scenario::NewConnections,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::H2 => "h2 over TLS",
            Scenario::HttpsKeepAlive => "https h1 keep-alive",
            Scenario::NewConnections => "https new connection per request",
        }
    }
}

struct Row {
    scenario: Scenario,
    target: &'static str,
    outcome: Result<Measurement, String>,
}

impl Row {
    fn json(&self) -> serde_json::Value {
        let mut json = match &self.outcome {
            Ok(m) => m.json(),
            Err(reason) => serde_json::json!({ "skipped": reason }),
        };
        json["scenario"] = self.scenario.name().into();
        json["target"] = self.target.into();
        json
    }
}

fn run_all(settings: &Settings) -> Vec<Row> {
    let scratch = tempfile::tempdir().expect("create a temporary directory");
    let origin = origin::Origin::spawn();
    let mut rows = Vec::new();
    for kind in Kind::ALL {
        let options = proxies::Options {
            workers: settings.workers,
            ..proxies::Options::default()
        };
        match proxies::start(
            kind,
            &scratch.path().join(kind.name()),
            origin.addr,
            options,
        ) {
            Ok(proxy) => {
                for scenario in Scenario::ALL {
                    eprintln!("{}: {} ...", kind.name(), scenario.name());
                    let outcome = measure(scenario, &proxy, settings, scratch.path());
                    rows.push(Row {
                        scenario,
                        target: kind.name(),
                        outcome,
                    });
                }
            }
            Err(reason) => {
                eprintln!("{}: {reason}", kind.name());
                for scenario in Scenario::ALL {
                    rows.push(Row {
                        scenario,
                        target: kind.name(),
                        outcome: Err(reason.clone()),
                    });
                }
            }
        }
    }
    rows
}

/// One load against one proxy: warm-up, then the measured run with the
/// proxy's CPU time.
fn measure(
    scenario: Scenario,
    proxy: &proxies::Running,
    settings: &Settings,
    scratch: &Path,
) -> Result<Measurement, String> {
    let url = format!("https://{}/", proxy.https);
    let close = ["Connection: close"];
    let run = |seconds: u64| match scenario {
        Scenario::H2 => h2load::run(
            &url,
            settings.h2_clients,
            settings.h2_streams,
            seconds,
            &scratch.join("h2load.log"),
        ),
        Scenario::HttpsKeepAlive => wrk::run(&url, settings.connections, seconds, &[]),
        Scenario::NewConnections => wrk::run(&url, settings.newconn_connections, seconds, &close),
    };
    // h2load warms up by itself (--warm-up-time 1).
    if settings.warmup_seconds > 0 && !matches!(scenario, Scenario::H2) {
        run(settings.warmup_seconds)?;
    }
    let before = cpu_ticks(proxy.pid());
    let mut m = run(settings.seconds)?;
    m.cpu = cpu_per_request(before, cpu_ticks(proxy.pid()), m.requests);
    Ok(m)
}

fn markdown(rows: &[Row]) -> String {
    let mut text = String::from(
        "| scenario | target | req/s | p50 ms | p99 ms | max ms | errors | CPU µs/req (user + sys) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        match &row.outcome {
            Ok(m) => {
                let _ = writeln!(
                    text,
                    "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
                    row.scenario.name(),
                    row.target,
                    m.requests_per_second,
                    m.p50_us / 1000.0,
                    m.p99_us / 1000.0,
                    m.max_us / 1000.0,
                    m.errors,
                    m.cpu.map_or("-".to_string(), |cpu| cpu.describe()),
                );
            }
            Err(reason) => {
                let _ = writeln!(
                    text,
                    "| {} | {} | {reason} | - | - | - | - | - |",
                    row.scenario.name(),
                    row.target
                );
            }
        }
    }
    text
}
