//! Throughput and latency of cutover against the upstream alone, nginx and
//! HAProxy: `cargo bench --bench proxy_throughput`.
//!
//! Method
//! - One upstream for every target: the origin of `support/origin.rs` (this
//!   bench binary re-executed, a single-threaded hyper 1 HTTP/1.1 server
//!   answering `GET /` with a fixed 100-byte body) in a process of its own,
//!   so it never shares a runtime with the load generator.
//! - The targets, measured one after another in one run on one machine:
//!   `direct` (the upstream itself), cutover (the release binary cargo builds
//!   for this bench, one catch-all site; once with `RUST_LOG=warn` and once
//!   with `RUST_LOG=info`, i.e. with its access log written to a file; with
//!   more than one worker also once on tokio's work-stealing runtime,
//!   `CUTOVER_RUNTIME=work-stealing`, beside the default thread-per-core
//!   workers, so both are measured in the same run),
//!   nginx (keep-alive upstream pool, no access log) and HAProxy
//!   (`http-reuse always`), all configured by `support/proxies.rs`. Every
//!   proxy gets `BENCH_WORKERS` worker threads (default 1, so the comparison
//!   is per core; 0 = all cores). A proxy that is not installed gets a "not
//!   installed" row.
//! - Load: `wrk -t1 -c64 --latency` when wrk is installed, and always the
//!   built-in generator (64 keep-alive hyper connections on one thread, every
//!   request timed in microseconds). Each measured run is preceded by an
//!   unmeasured warm-up run with the same generator. Every row names the
//!   generator that produced it; ratios and "added p99" compare a proxy with
//!   `direct` measured by the same generator. The verdict is printed per
//!   generator; prefer wrk's line when wrk is present.
//! - The load average is printed before and after: anything else running on
//!   the machine (a build) skews req/s and latency far more than it skews
//!   CPU per request.
//! - "target CPU µs/req" is the user + system CPU time the target process
//!   (the upstream for `direct`, else the proxy alone, nginx's workers
//!   included) used during the
//!   measured run, from `/proc/PID/stat`, divided by the requests served. Load
//!   generator, proxy and upstream share the machine's cores, so on a small
//!   machine req/s measures how well the three share them; CPU per request
//!   measures the proxy's own cost and is the steadier number of the two.
//! - Everything listens on 127.0.0.1 and every load is bounded in time.
//!
//! Output: a Markdown table on stdout, and the same data as JSON in
//! `target/bench-results/proxy_throughput.json` (or `$BENCH_RESULTS`).
//!
//! Environment: `BENCH_SECONDS` (measured seconds per run, default 5),
//! `BENCH_WARMUP_SECONDS` (default 1), `BENCH_CONNECTIONS` (default 64),
//! `BENCH_GENERATORS` (`wrk,builtin` by default; either one alone works),
//! `BENCH_CUTOVER_INFO=0` to skip the `RUST_LOG=info` cutover row,
//! `BENCH_WORKERS` (1; 0 = one per core), `BENCH_CUTOVER_RUNTIMES=0` to skip
//! the work-stealing cutover row (measured only when `BENCH_WORKERS` is not
//! 1: with one worker both runtimes serve the same way), `BENCH_CUTOVER_BIN`
//! to measure another cutover binary.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[path = "support/mod.rs"]
mod support;
use support::load::{wrk, Measurement};
use support::proxies::{self, Kind};
use support::*;

fn main() {
    if origin::serve_if_origin() {
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not, and a
    // test run should not spend a minute driving load.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("proxy_throughput: run it with `cargo bench --bench proxy_throughput`; skipped");
        return;
    }
    let settings = Settings::from_env();
    let machine = Machine::describe();
    println!("{}", machine.markdown());
    println!("{}", settings.describe());

    let rows = run_all(&settings);
    let load_after = load_average();
    println!(
        "- load average before / after: {} / {load_after}",
        machine.load
    );
    println!("{}", report::markdown(&rows));
    println!("{}", report::verdict(&rows));
    let path = report::write_json(&machine, &settings, &rows);
    println!("JSON: {}", path.display());
}

// ---------------------------------------------------------------------------
// Settings and machine description
// ---------------------------------------------------------------------------

/// What one bench run does, read from the environment.
#[derive(Debug, Clone)]
struct Settings {
    seconds: u64,
    warmup_seconds: u64,
    connections: usize,
    generators: Vec<Generator>,
    cutover_info_row: bool,
    /// Worker threads per proxy; 0 = one per core.
    workers: usize,
    /// Also measure cutover on the work-stealing runtime.
    compare_runtimes: bool,
}

/// The load generator that produced a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generator {
    Wrk,
    Builtin,
}

impl Generator {
    fn name(self) -> &'static str {
        match self {
            Generator::Wrk => "wrk",
            Generator::Builtin => "builtin",
        }
    }
}

impl Settings {
    fn from_env() -> Settings {
        let wanted = env_or("BENCH_GENERATORS", "wrk,builtin".to_string());
        let mut generators = Vec::new();
        if wanted.contains("wrk") {
            if tool_installed("wrk") {
                generators.push(Generator::Wrk);
            } else {
                println!("wrk: not installed (apt-get install wrk); built-in generator only");
            }
        }
        if wanted.contains("builtin") || generators.is_empty() {
            generators.push(Generator::Builtin);
        }
        let workers = env_or("BENCH_WORKERS", 1);
        Settings {
            seconds: env_or("BENCH_SECONDS", 5).max(1),
            warmup_seconds: env_or("BENCH_WARMUP_SECONDS", 1),
            connections: env_or("BENCH_CONNECTIONS", 64).max(1),
            generators,
            cutover_info_row: env_or("BENCH_CUTOVER_INFO", 1) != 0,
            workers,
            compare_runtimes: workers != 1 && env_or("BENCH_CUTOVER_RUNTIMES", 1) != 0,
        }
    }

    fn describe(&self) -> String {
        let generators: Vec<&str> = self.generators.iter().map(|g| g.name()).collect();
        format!(
            "Load: {} keep-alive connections, {} s warm-up + {} s measured per run; generators: {}; \
             worker threads per proxy: {}.\n",
            self.connections,
            self.warmup_seconds,
            self.seconds,
            generators.join(", "),
            if self.workers == 0 {
                "one per core".to_string()
            } else {
                self.workers.to_string()
            }
        )
    }
}

/// The facts printed above the table, so numbers are never read without
/// knowing what produced them.
struct Machine {
    date: String,
    cores: usize,
    cpu: String,
    kernel: String,
    tools: Vec<(String, String)>,
    /// /proc/loadavg when the bench started.
    load: String,
    /// Share of all cores busy during one second just before the start:
    /// other work on the machine skews every number, req/s most.
    busy_percent: Option<f64>,
}

impl Machine {
    fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split(':').nth(1))
            .map_or("unknown", str::trim)
            .to_string();
        let tools = [
            ("nginx", &["-v"][..]),
            ("haproxy", &["-v"][..]),
            ("wrk", &["-v"][..]),
        ]
        .iter()
        .map(|(tool, args)| (tool.to_string(), first_line_of(tool, args)))
        .collect();
        Machine {
            date: first_line_of("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            kernel: first_line_of("uname", &["-sr"]),
            tools,
            load: load_average(),
            busy_percent: busy_percent(Duration::from_secs(1)),
        }
    }

    fn markdown(&self) -> String {
        let mut text = String::from("# cutover proxy throughput\n\n");
        let _ = writeln!(text, "- date: {}", self.date);
        let _ = writeln!(text, "- cores (nproc): {}", self.cores);
        let _ = writeln!(text, "- CPU: {}", self.cpu);
        let _ = writeln!(text, "- kernel: {}", self.kernel);
        for (tool, version) in &self.tools {
            let _ = writeln!(text, "- {tool}: {version}");
        }
        let _ = writeln!(text, "- load average (1/5/15 min) at start: {}", self.load);
        if let Some(busy) = self.busy_percent {
            let _ = writeln!(text, "- CPU busy in the second before start: {busy:.0}%");
        }
        if self.busy_percent.is_some_and(|busy| busy > 10.0) {
            let _ = writeln!(
                text,
                "- WARNING: the machine is busy; req/s and latencies will be noisy"
            );
        }
        text
    }
}

/// How busy all cores were over `window`, from two reads of /proc/stat.
fn busy_percent(window: Duration) -> Option<f64> {
    let before = cpu_jiffies()?;
    std::thread::sleep(window);
    let after = cpu_jiffies()?;
    let total = after.0.checked_sub(before.0)?;
    let idle = after.1.checked_sub(before.1)?;
    (total > 0).then(|| 100.0 * (total - idle) as f64 / total as f64)
}

/// (all, idle + iowait) jiffies of the machine's aggregate `cpu` line.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = values.get(3)? + values.get(4)?;
    Some((values.iter().sum(), idle))
}

// ---------------------------------------------------------------------------
// The run: targets in order, each measured by every generator
// ---------------------------------------------------------------------------

/// One line of the result table.
#[derive(Debug, Clone)]
struct Row {
    target: String,
    generator: Option<Generator>,
    outcome: Result<Measurement, String>,
}

/// The row of cutover on tokio's work-stealing runtime (the default row,
/// "cutover (RUST_LOG=warn)", runs thread-per-core workers).
const WORK_STEALING_ROW: &str = "cutover work-stealing runtime (RUST_LOG=warn)";

fn run_all(settings: &Settings) -> Vec<Row> {
    let scratch = tempfile::tempdir().expect("create a temporary directory for configs and logs");
    let upstream = origin::Origin::spawn();
    let mut rows = Vec::new();

    rows.extend(measure("direct", upstream.addr, upstream.pid(), settings));

    // (row, proxy, cutover's RUST_LOG, cutover's CUTOVER_RUNTIME)
    let mut variants = vec![("cutover (RUST_LOG=warn)", Kind::Cutover, "warn", None)];
    if settings.compare_runtimes {
        variants.push((
            WORK_STEALING_ROW,
            Kind::Cutover,
            "warn",
            Some("work-stealing"),
        ));
    }
    if settings.cutover_info_row {
        variants.push((
            "cutover (RUST_LOG=info, access log)",
            Kind::Cutover,
            "info",
            None,
        ));
    }
    variants.push(("nginx", Kind::Nginx, "warn", None));
    variants.push(("haproxy", Kind::Haproxy, "warn", None));
    for (index, (name, kind, cutover_log, cutover_runtime)) in variants.into_iter().enumerate() {
        let options = proxies::Options {
            workers: settings.workers,
            cutover_log,
            cutover_runtime,
            ..proxies::Options::default()
        };
        let dir = scratch
            .path()
            .join(format!("{index}-{}-{cutover_log}", kind.name()));
        let started = proxies::start(kind, &dir, upstream.addr, options);
        rows.extend(measure_started(name, started, settings));
    }

    drop(upstream);
    rows
}

/// Measures a target that may have failed to start (or is not installed):
/// a failure becomes one row that says why.
fn measure_started(
    name: &str,
    started: Result<proxies::Running, String>,
    settings: &Settings,
) -> Vec<Row> {
    match started {
        Ok(running) => {
            let rows = measure(name, running.http, running.pid(), settings);
            drop(running);
            rows
        }
        Err(reason) => {
            eprintln!("{name}: {reason}");
            vec![Row {
                target: name.to_string(),
                generator: None,
                outcome: Err(reason),
            }]
        }
    }
}

/// Runs every generator against one address: an unmeasured warm-up, then
/// the measured run, with the CPU time process `pid` spent meanwhile.
fn measure(name: &str, addr: SocketAddr, pid: u32, settings: &Settings) -> Vec<Row> {
    settings
        .generators
        .iter()
        .map(|&generator| {
            eprintln!("measuring {name} with {} ...", generator.name());
            let outcome = measure_one(generator, addr, pid, settings);
            Row {
                target: name.to_string(),
                generator: Some(generator),
                outcome,
            }
        })
        .collect()
}

fn measure_one(
    generator: Generator,
    addr: SocketAddr,
    pid: u32,
    settings: &Settings,
) -> Result<Measurement, String> {
    let load = |seconds| match generator {
        Generator::Wrk => wrk::run(
            &format!("http://{addr}/"),
            settings.connections,
            seconds,
            &[],
        ),
        Generator::Builtin => Ok(loadgen::run(addr, settings.connections, seconds)),
    };
    if settings.warmup_seconds > 0 {
        load(settings.warmup_seconds)?;
    }
    let before = cpu_ticks(pid);
    let mut measurement = load(settings.seconds)?;
    measurement.cpu = cpu_per_request(before, cpu_ticks(pid), measurement.requests);
    Ok(measurement)
}

// Load generators
// ---------------------------------------------------------------------------

mod loadgen {
    //! The built-in generator: `connections` keep-alive HTTP/1.1
    //! connections on one thread (like `wrk -t1`), each sending `GET /`
    //! back to back and timing every request.

    use super::*;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::http1;
    use hyper::{Request, StatusCode};
    use hyper_util::rt::TokioIo;

    /// A request that takes longer than this counts as an error.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// What one connection saw during the measured window.
    #[derive(Default)]
    struct ConnStats {
        latencies_us: Vec<u32>,
        errors: u64,
    }

    /// Drives `connections` connections for `seconds` and times every request.
    pub fn run(addr: SocketAddr, connections: usize, seconds: u64) -> Measurement {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the load generator runtime");
        let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let stats = runtime.block_on(async {
            let tasks: Vec<_> = (0..connections)
                .map(|_| tokio::spawn(connection(addr, until)))
                .collect();
            let mut all = Vec::with_capacity(tasks.len());
            for task in tasks {
                all.push(task.await.unwrap_or_else(|_| ConnStats {
                    errors: 1,
                    ..ConnStats::default()
                }));
            }
            all
        });
        summarize(stats, seconds as f64)
    }

    /// One connection's loop; reconnects after an error until `until`.
    async fn connection(addr: SocketAddr, until: tokio::time::Instant) -> ConnStats {
        let mut stats = ConnStats::default();
        let host = addr.to_string();
        while tokio::time::Instant::now() < until {
            let Ok(mut sender) = connect(addr).await else {
                stats.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            while tokio::time::Instant::now() < until {
                let started = tokio::time::Instant::now();
                let ok = request(&mut sender, &host).await;
                let elapsed = started.elapsed().as_micros();
                stats
                    .latencies_us
                    .push(u32::try_from(elapsed).unwrap_or(u32::MAX));
                if !ok {
                    stats.errors += 1;
                    break;
                }
            }
        }
        stats
    }

    async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Empty<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|err| err.to_string())?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| err.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One `GET /` with its body read to the end; false on any failure or
    /// a status other than 200 (the connection is then replaced).
    async fn request(sender: &mut http1::SendRequest<Empty<Bytes>>, host: &str) -> bool {
        let exchange = async {
            sender.ready().await.ok()?;
            let req = Request::get("/")
                .header(hyper::header::HOST, host)
                .body(Empty::new())
                .ok()?;
            let response = sender.send_request(req).await.ok()?;
            let status = response.status();
            response.into_body().collect().await.ok()?;
            (status == StatusCode::OK).then_some(())
        };
        matches!(
            tokio::time::timeout(REQUEST_TIMEOUT, exchange).await,
            Ok(Some(()))
        )
    }

    fn summarize(stats: Vec<ConnStats>, seconds: f64) -> Measurement {
        let errors = stats.iter().map(|s| s.errors).sum();
        let mut latencies: Vec<u32> = stats.into_iter().flat_map(|s| s.latencies_us).collect();
        latencies.sort_unstable();
        let requests = latencies.len() as u64;
        Measurement {
            requests,
            seconds,
            requests_per_second: requests as f64 / seconds,
            p50_us: percentile(&latencies, 50.0),
            p99_us: percentile(&latencies, 99.0),
            max_us: latencies.last().copied().map_or(0.0, f64::from),
            errors,
            cpu: None,
        }
    }
}

// Reporting
// ---------------------------------------------------------------------------

mod report {
    use super::*;

    /// The `direct` measurement taken with the same generator.
    fn direct_for(rows: &[Row], generator: Option<Generator>) -> Option<&Measurement> {
        rows.iter()
            .find(|row| row.target == "direct" && row.generator == generator)
            .and_then(|row| row.outcome.as_ref().ok())
    }

    fn ms(us: f64) -> String {
        format!("{:.3}", us / 1000.0)
    }

    pub fn markdown(rows: &[Row]) -> String {
        let mut text = String::from(
            "| target | generator | req/s | ratio to direct | p50 ms | p99 ms | max ms | errors | added p99 vs direct (ms) | target CPU µs/req (user + sys) |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for row in rows {
            let generator = row.generator.map_or("-", Generator::name);
            match &row.outcome {
                Ok(m) => {
                    let direct = direct_for(rows, row.generator);
                    let ratio = direct.map_or("-".to_string(), |d| {
                        format!("{:.2}", m.requests_per_second / d.requests_per_second)
                    });
                    let added = match direct {
                        Some(d) if row.target != "direct" => ms(m.p99_us - d.p99_us),
                        _ => "-".to_string(),
                    };
                    let _ = writeln!(
                        text,
                        "| {} | {generator} | {:.0} | {ratio} | {} | {} | {} | {} | {added} | {} |",
                        row.target,
                        m.requests_per_second,
                        ms(m.p50_us),
                        ms(m.p99_us),
                        ms(m.max_us),
                        m.errors,
                        m.cpu.map_or("-".to_string(), |cpu| cpu.describe()),
                    );
                }
                Err(reason) => {
                    let _ = writeln!(
                        text,
                        "| {} | {generator} | {reason} | - | - | - | - | - | - | - |",
                        row.target
                    );
                }
            }
        }
        text
    }

    /// cutover (RUST_LOG=warn) against nginx, per generator: the two
    /// criteria are req/s ≥ nginx and added p99 ≤ nginx's.
    pub fn verdict(rows: &[Row]) -> String {
        let mut text = String::from("Verdict (cutover RUST_LOG=warn vs nginx):\n");
        let find = |target: &str, generator: Generator| {
            rows.iter()
                .find(|r| r.target.starts_with(target) && r.generator == Some(generator))
                .and_then(|r| r.outcome.as_ref().ok())
        };
        let generators: Vec<Generator> = {
            let mut seen = Vec::new();
            for generator in rows.iter().filter_map(|r| r.generator) {
                if !seen.contains(&generator) {
                    seen.push(generator);
                }
            }
            seen
        };
        for generator in generators {
            let (Some(direct), Some(cutover), Some(nginx)) = (
                find("direct", generator),
                find("cutover (RUST_LOG=warn)", generator),
                find("nginx", generator),
            ) else {
                let _ = writeln!(text, "- {}: not enough rows to compare", generator.name());
                continue;
            };
            let throughput_ok = cutover.requests_per_second >= nginx.requests_per_second;
            let added_cutover = cutover.p99_us - direct.p99_us;
            let added_nginx = nginx.p99_us - direct.p99_us;
            let latency_ok = added_cutover <= added_nginx;
            let _ = writeln!(
                text,
                "- {}: req/s {:.0} vs {:.0} ({:.2}x) {}; added p99 {} ms vs {} ms {}",
                generator.name(),
                cutover.requests_per_second,
                nginx.requests_per_second,
                cutover.requests_per_second / nginx.requests_per_second,
                if throughput_ok { "MEETS" } else { "MISSES" },
                ms(added_cutover),
                ms(added_nginx),
                if latency_ok { "MEETS" } else { "MISSES" },
            );
            if let Some(stealing) = find(WORK_STEALING_ROW, generator) {
                let _ = writeln!(
                    text,
                    "  runtimes: thread-per-core {:.0} req/s vs work-stealing {:.0} req/s ({:.2}x)",
                    cutover.requests_per_second,
                    stealing.requests_per_second,
                    cutover.requests_per_second / stealing.requests_per_second,
                );
            }
            if let (Some(ours), Some(theirs)) = (cutover.cpu, nginx.cpu) {
                let _ = writeln!(
                    text,
                    "  CPU per request (user + sys): cutover {} µs vs nginx {} µs ({:.2}x; user {:.2}x, sys {:.2}x)",
                    ours.describe(),
                    theirs.describe(),
                    ours.total_us() / theirs.total_us(),
                    ours.user_us / theirs.user_us,
                    ours.system_us / theirs.system_us,
                );
            }
        }
        text
    }

    /// Writes the JSON report and returns its path.
    pub fn write_json(machine: &Machine, settings: &Settings, rows: &[Row]) -> PathBuf {
        let path = results_path("proxy_throughput");
        let json = serde_json::json!({
            "machine": {
                "date": machine.date,
                "cores": machine.cores,
                "cpu": machine.cpu,
                "kernel": machine.kernel,
                "load_average_at_start": machine.load,
                "cpu_busy_percent_before_start": machine.busy_percent,
                "tools": machine.tools.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            },
            "settings": {
                "seconds": settings.seconds,
                "warmup_seconds": settings.warmup_seconds,
                "connections": settings.connections,
                "workers": settings.workers,
            },
            "rows": rows.iter().map(|row| row_json(rows, row)).collect::<Vec<_>>(),
        });
        support::write_json(&path, &json);
        path
    }

    fn row_json(rows: &[Row], row: &Row) -> serde_json::Value {
        let generator = row.generator.map(Generator::name);
        match &row.outcome {
            Ok(m) => {
                let direct = direct_for(rows, row.generator);
                serde_json::json!({
                    "target": row.target,
                    "generator": generator,
                    "requests": m.requests,
                    "seconds": m.seconds,
                    "requests_per_second": m.requests_per_second,
                    "ratio_to_direct": direct.map(|d| m.requests_per_second / d.requests_per_second),
                    "p50_ms": m.p50_us / 1000.0,
                    "p99_ms": m.p99_us / 1000.0,
                    "max_ms": m.max_us / 1000.0,
                    "added_p99_ms": direct
                        .filter(|_| row.target != "direct")
                        .map(|d| (m.p99_us - d.p99_us) / 1000.0),
                    "errors": m.errors,
                    "target_cpu_us_per_request": m.cpu.map(|cpu| cpu.total_us()),
                    "target_cpu_user_us_per_request": m.cpu.map(|cpu| cpu.user_us),
                    "target_cpu_system_us_per_request": m.cpu.map(|cpu| cpu.system_us),
                })
            }
            Err(reason) => serde_json::json!({
                "target": row.target,
                "generator": generator,
                "skipped": reason,
            }),
        }
    }
}
