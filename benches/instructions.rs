//! Instructions per proxied request, counted by valgrind's callgrind:
//! `cargo bench --bench instructions`.
//!
//! req/s and CPU time on a small shared machine move by ±20% between runs;
//! an instruction count does not (the same binary, inputs and environment
//! give the same total whatever else the machine is doing). It is the
//! figure to decide a hot-path change by, and to compare proxies by.
//!
//! Method
//! - One origin for every proxy: `support/origin.rs` (a single-threaded
//!   hyper 1 HTTP/1.1 server answering `GET /` with 100 bytes), not under
//!   valgrind.
//! - The targets, one after another, each under `valgrind --tool=callgrind`:
//!   the origin itself answering directly (the reference row "hyper HTTP/1
//!   server alone": what hyper's server side costs per request with a
//!   trivial service), cutover, nginx and HAProxy, configured as in
//!   `support/proxies.rs` with one worker each; then cutover again with its
//!   metrics endpoint on (`[server] metrics`), scraped once after the
//!   warm-up as Prometheus would be (the scrape itself is not counted: it
//!   is per scrape interval, not per request) and once after the count,
//!   whose request total must cover the counted load.
//! - Per target: wait until it answers, send an unmeasured warm-up of
//!   `BENCH_INSTR_WARMUP` requests, `callgrind_control --zero`, send
//!   `BENCH_INSTR_REQUESTS` requests (`h2load --h1 -c16`, keep-alive), then
//!   `callgrind_control --dump`: start-up, warm-up and shutdown are not
//!   counted. Instructions per request = the dump's total / requests.
//! - User space only: the kernel's work for the syscalls is not counted
//!   (`proxy_throughput` reports it as system CPU time).
//! - cutover's count is also split by whose source the instructions come
//!   from (the dump's self costs grouped by source path: a crate, the Rust
//!   standard library, libc), inlined code counted where it came from.
//! - Everything listens on 127.0.0.1; every load is a bounded count.
//!
//! Output: a Markdown table on stdout, and JSON in
//! `target/bench-results/instructions.json` (or `$BENCH_RESULTS`).
//!
//! Environment: `BENCH_INSTR_REQUESTS` (default 20000),
//! `BENCH_INSTR_WARMUP` (default 2000), `BENCH_CUTOVER_BIN`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

#[path = "support/mod.rs"]
mod support;
use support::load::h2load;
use support::origin::Origin;
use support::proxies::{self, Kind, Options};
use support::*;

/// Connections of the load (as in the profiles docs/benchmarks.md cites).
const CLIENTS: usize = 16;

/// Source groups listed for cutover; the rest are summed as "other".
const LISTED_GROUPS: usize = 8;

fn main() {
    if origin::serve_if_origin() {
        return;
    }
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("instructions: run it with `cargo bench --bench instructions`; skipped");
        return;
    }
    let settings = Settings::from_env();
    println!("{}", settings.describe());
    let rows = match missing_tools() {
        Some(reason) => vec![Row::skipped("all targets", reason)],
        None => run_all(&settings),
    };
    let text = markdown(&rows);
    println!("{text}");
    if let (Some(off), Some(on)) = (
        Row::per_request_of(&rows, "cutover"),
        Row::per_request_of(&rows, METRICS_ROW),
    ) {
        println!(
            "metrics on: {on:.0} against {off:.0} instructions per request ({:+.1}%)",
            100.0 * (on - off) / off
        );
    }
    let path = results_path("instructions");
    write_json(
        &path,
        &serde_json::json!({
            "settings": settings.describe(),
            "rows": rows.iter().map(|row| row.json(&rows)).collect::<Vec<_>>(),
        }),
    );
    println!("JSON: {}", path.display());
}

struct Settings {
    requests: u64,
    warmup: u64,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            requests: env_or("BENCH_INSTR_REQUESTS", 20_000),
            warmup: env_or("BENCH_INSTR_WARMUP", 2_000),
        }
    }

    fn describe(&self) -> String {
        format!(
            "callgrind, user-space instructions; h2load --h1 -c{CLIENTS}; {} requests counted after {} unmeasured; one worker per proxy",
            self.requests, self.warmup
        )
    }
}

fn missing_tools() -> Option<String> {
    let missing: Vec<&str> = ["valgrind", "callgrind_control", "h2load"]
        .into_iter()
        .filter(|tool| !tool_installed(tool))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "not installed: {} (apt-get install -y valgrind nghttp2-client)",
            missing.join(", ")
        )
    })
}

/// One table row: a target's count, or a source group within cutover's.
struct Row {
    target: String,
    outcome: Result<Count, String>,
    /// Whether this row is a share of cutover's count.
    part_of_cutover: bool,
}

#[derive(Debug, Clone, Copy)]
struct Count {
    requests: u64,
    instructions: u64,
}

impl Count {
    fn per_request(&self) -> f64 {
        self.instructions as f64 / self.requests as f64
    }
}

impl Row {
    fn skipped(target: &str, reason: String) -> Row {
        Row {
            target: target.to_string(),
            outcome: Err(reason),
            part_of_cutover: false,
        }
    }

    fn per_request_of(rows: &[Row], target: &str) -> Option<f64> {
        rows.iter()
            .find(|row| row.target == target && !row.part_of_cutover)
            .and_then(|row| row.outcome.as_ref().ok())
            .map(Count::per_request)
    }

    /// A target's ratio to nginx, or a source group's share of cutover's
    /// count in percent (the other is `None`).
    fn relative(&self, rows: &[Row]) -> (Option<f64>, Option<f64>) {
        let Ok(count) = &self.outcome else {
            return (None, None);
        };
        let per_request = count.per_request();
        if self.part_of_cutover {
            let share =
                Row::per_request_of(rows, "cutover").map(|total| 100.0 * per_request / total);
            (None, share)
        } else {
            let ratio = Row::per_request_of(rows, "nginx").map(|nginx| per_request / nginx);
            (ratio, None)
        }
    }

    fn json(&self, rows: &[Row]) -> serde_json::Value {
        let count = match &self.outcome {
            Ok(count) => count,
            Err(reason) => {
                return serde_json::json!({ "target": self.target, "skipped": reason });
            }
        };
        let per_request = count.per_request();
        let (ratio_to_nginx, share_of_cutover) = self.relative(rows);
        serde_json::json!({
            "target": self.target,
            "requests": count.requests,
            "instructions": count.instructions,
            "instructions_per_request": per_request,
            "ratio_to_nginx": ratio_to_nginx,
            "share_of_cutover_percent": share_of_cutover,
        })
    }
}

fn run_all(settings: &Settings) -> Vec<Row> {
    let dir = std::env::temp_dir().join(format!("cutover-bench-instr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(err) = std::fs::create_dir_all(&dir) {
        return vec![Row::skipped(
            "all targets",
            format!("create {}: {err}", dir.display()),
        )];
    }
    let mut rows = vec![measure_origin_alone(&dir, settings)];
    let origin = Origin::spawn();
    for kind in Kind::ALL {
        eprintln!("counting {} ...", kind.name());
        let target_dir = dir.join(kind.name());
        let outfile = target_dir.join("callgrind.out");
        let started = std::fs::create_dir_all(&target_dir)
            .map_err(|err| err.to_string())
            .and_then(|()| {
                proxies::start_under(
                    kind,
                    &target_dir,
                    origin.addr,
                    Options::default(),
                    &callgrind(&outfile),
                )
            });
        let outcome =
            started.and_then(|proxy| count(proxy.pid(), proxy.http, None, &outfile, settings));
        let cutover_requests = match (&outcome, kind) {
            (Ok(count), Kind::Cutover) => Some(count.requests),
            _ => None,
        };
        rows.push(Row {
            target: kind.name().to_string(),
            outcome,
            part_of_cutover: false,
        });
        if let Some(requests) = cutover_requests {
            rows.extend(by_source(&dump_of(&outfile), requests));
            rows.push(measure_cutover_with_metrics(&dir, origin.addr, settings));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

/// The name of the row with the metrics endpoint on.
const METRICS_ROW: &str = "cutover, metrics on (scraped)";

/// cutover with `[server] metrics` on, scraped as Prometheus would.
fn measure_cutover_with_metrics(dir: &Path, origin: SocketAddr, settings: &Settings) -> Row {
    eprintln!("counting cutover with metrics on ...");
    let target_dir = dir.join("cutover-metrics");
    let outfile = target_dir.join("callgrind.out");
    let options = Options {
        cutover_metrics: true,
        ..Options::default()
    };
    let outcome = proxies::start_under(
        Kind::Cutover,
        &target_dir,
        origin,
        options,
        &callgrind(&outfile),
    )
    .and_then(|proxy| count(proxy.pid(), proxy.http, proxy.metrics, &outfile, settings));
    Row {
        target: METRICS_ROW.to_string(),
        outcome,
        part_of_cutover: false,
    }
}

/// One scrape of a metrics endpoint: the sum of its
/// `cutover_http_requests_total` samples.
fn scrape_requests_total(metrics: SocketAddr) -> Result<u64, String> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect(metrics).map_err(|err| format!("scrape: {err}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|err| err.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|err| format!("scrape: {err}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|err| format!("scrape: {err}"))?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "scrape answered: {}",
            text.lines().next().unwrap_or("")
        ));
    }
    Ok(text
        .lines()
        .filter(|line| line.starts_with("cutover_http_requests_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// The origin itself under callgrind, answering the load directly.
fn measure_origin_alone(dir: &Path, settings: &Settings) -> Row {
    eprintln!("counting the origin alone ...");
    let outfile = dir.join("origin.callgrind.out");
    // Ready: it prints its address only once it is listening.
    let origin = Origin::spawn_under(&callgrind(&outfile));
    let outcome = count(origin.pid(), origin.addr, None, &outfile, settings);
    Row {
        target: "hyper HTTP/1 server alone (the origin)".to_string(),
        outcome,
        part_of_cutover: false,
    }
}

/// The valgrind command line that runs a program under callgrind, its
/// counts written to `outfile` (dumps get `.1`, `.2`… appended).
fn callgrind(outfile: &Path) -> Vec<OsString> {
    let mut out_arg = OsString::from("--callgrind-out-file=");
    out_arg.push(outfile);
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        out_arg,
        // valgrind's own messages, kept out of the program's log.
        "--log-file=/dev/null".into(),
    ]
}

/// Warm-up, zero the counters, the counted load, dump: the instructions
/// `pid` executed for exactly `settings.requests` requests. With a
/// `metrics` endpoint it is scraped after the warm-up and after the dump.
fn count(
    pid: u32,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    outfile: &Path,
    settings: &Settings,
) -> Result<Count, String> {
    let url = format!("http://{addr}/");
    load(&url, settings.warmup)?;
    let before = metrics.map(scrape_requests_total).transpose()?;
    callgrind_control("--zero", pid)?;
    load(&url, settings.requests)?;
    callgrind_control("--dump", pid)?;
    if let (Some(metrics), Some(before)) = (metrics, before) {
        let after = scrape_requests_total(metrics)?;
        if after < before + settings.requests {
            return Err(format!(
                "the metrics counted {} requests of {}",
                after - before,
                settings.requests
            ));
        }
    }
    let instructions = dump_total(&dump_of(outfile))?;
    Ok(Count {
        requests: settings.requests,
        instructions,
    })
}

fn load(url: &str, requests: u64) -> Result<(), String> {
    let m = h2load::run_h1_count(url, CLIENTS, requests)?;
    if m.requests != requests || m.errors > 0 {
        return Err(format!(
            "{} of {requests} requests succeeded, {} errors",
            m.requests, m.errors
        ));
    }
    Ok(())
}

fn callgrind_control(action: &str, pid: u32) -> Result<(), String> {
    let output = Command::new("callgrind_control")
        .arg(action)
        .arg(pid.to_string())
        .output()
        .map_err(|err| format!("cannot run callgrind_control: {err}"))?;
    let said = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !said.contains("OK") {
        return Err(format!("callgrind_control {action} {pid}: {}", said.trim()));
    }
    Ok(())
}

/// The first dump callgrind wrote for `outfile` (the counted load).
fn dump_of(outfile: &Path) -> PathBuf {
    let mut name = outfile.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The `totals:` line of a callgrind dump (instructions, the one event).
fn dump_total(dump: &Path) -> Result<u64, String> {
    // The dump is written by valgrind's process; give it a moment to land.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(dump) {
            if let Some(total) = text
                .lines()
                .find_map(|line| line.strip_prefix("totals:"))
                .and_then(|rest| rest.trim().parse().ok())
            {
                return Ok(total);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no totals in {}", dump.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// cutover's instructions grouped by the source they come from, largest
/// first; rows named "cutover: GROUP".
fn by_source(dump: &Path, requests: u64) -> Vec<Row> {
    let text = match std::fs::read_to_string(dump) {
        Ok(text) => text,
        Err(err) => {
            return vec![Row::skipped(
                "cutover: by source",
                format!("read {}: {err}", dump.display()),
            )];
        }
    };
    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
    for ((file, object), instructions) in self_cost_by_file(&text) {
        *groups.entry(source_group(&file, &object)).or_default() += instructions;
    }
    let mut groups: Vec<(String, u64)> = groups.into_iter().collect();
    groups.sort_by_key(|group| std::cmp::Reverse(group.1));
    let other: u64 = groups.iter().skip(LISTED_GROUPS).map(|g| g.1).sum();
    groups.truncate(LISTED_GROUPS);
    if other > 0 {
        groups.push(("other".to_string(), other));
    }
    groups
        .into_iter()
        .map(|(group, instructions)| Row {
            target: format!("cutover: {group}"),
            outcome: Ok(Count {
                requests,
                instructions,
            }),
            part_of_cutover: true,
        })
        .collect()
}

/// Self cost per (source file, object) from a callgrind dump. The format
/// (valgrind's callgrind "format" docs): `ob=`, `fl=`, `fi=`/`fe=` (the
/// file of inlined code) set where the following cost lines belong; names
/// are compressed as `(id) name` on first use and `(id)` after; the cost
/// line after a `calls=` line is a call's inclusive cost, not self cost.
fn self_cost_by_file(text: &str) -> BTreeMap<(String, String), u64> {
    let mut names = CompressedNames::default();
    let mut costs: BTreeMap<(String, String), u64> = BTreeMap::new();
    let (mut object, mut cost_file) = (String::new(), String::new());
    let mut next_is_call_cost = false;
    for line in text.lines() {
        let (key, spec) = line.split_once('=').unwrap_or(("", ""));
        match key {
            "ob" => object = names.resolve("ob", spec),
            "fl" | "fi" | "fe" => cost_file = names.resolve("fl", spec),
            // Names of called functions and their places: only remembered.
            "cob" => drop(names.resolve("ob", spec)),
            "cfl" | "cfi" => drop(names.resolve("fl", spec)),
            "fn" | "cfn" => drop(names.resolve("fn", spec)),
            "calls" => next_is_call_cost = true,
            _ if line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) => {
                if std::mem::take(&mut next_is_call_cost) {
                    continue;
                }
                let cost: u64 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|cost| cost.parse().ok())
                    .unwrap_or(0);
                *costs
                    .entry((cost_file.clone(), object.clone()))
                    .or_default() += cost;
            }
            _ => {}
        }
    }
    costs
}

/// callgrind's name compression: `(id) name` defines, `(id)` refers; one
/// id space for objects, one for files, one for functions.
#[derive(Default)]
struct CompressedNames {
    known: BTreeMap<(&'static str, String), String>,
}

impl CompressedNames {
    fn resolve(&mut self, space: &'static str, spec: &str) -> String {
        let spec = spec.trim();
        let Some((id, name)) = spec.strip_prefix('(').and_then(|rest| rest.split_once(')')) else {
            return spec.to_string();
        };
        let key = (space, id.to_string());
        let name = name.trim();
        if !name.is_empty() {
            self.known.insert(key.clone(), name.to_string());
        }
        self.known
            .get(&key)
            .cloned()
            .unwrap_or_else(|| "unknown".to_string())
    }
}

/// Whose source a file is: a crate from the cargo registry, cutover's own
/// `src/`, the Rust standard library, or the shared object it was found
/// in (libc) for code without a Rust path.
fn source_group(file: &str, object: &str) -> String {
    if file.contains("/rustc/") {
        return "Rust standard library".to_string();
    }
    if file.starts_with(env!("CARGO_MANIFEST_DIR")) {
        return "cutover's own code".to_string();
    }
    if let Some(after) = file.split("/index.crates.io-").nth(1) {
        if let Some(crate_dir) = after.split('/').nth(1) {
            return crate_name(crate_dir);
        }
    }
    match Path::new(object).file_name().and_then(|name| name.to_str()) {
        Some(name) if name.starts_with("libc.so") || name.starts_with("ld-linux") => {
            "libc (memcpy, syscall stubs)".to_string()
        }
        Some(name) => name.to_string(),
        None => "unknown".to_string(),
    }
}

/// `hyper-1.12.0` → `hyper`; `libmimalloc-sys-0.1.49` → `libmimalloc-sys`.
fn crate_name(dir: &str) -> String {
    match dir.rsplit_once('-') {
        Some((name, version)) if version.starts_with(|c: char| c.is_ascii_digit()) => {
            name.to_string()
        }
        _ => dir.to_string(),
    }
}

fn markdown(rows: &[Row]) -> String {
    let mut text = String::from(
        "| target | requests | instructions per request | ratio to nginx | share of cutover's |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for row in rows {
        match &row.outcome {
            Ok(count) => {
                let (ratio, share) = row.relative(rows);
                let ratio = ratio.map_or("-".to_string(), |r| format!("{r:.2}"));
                let share = share.map_or("-".to_string(), |s| format!("{s:.1}%"));
                let _ = writeln!(
                    text,
                    "| {} | {} | {:.0} | {ratio} | {share} |",
                    row.target,
                    count.requests,
                    count.per_request()
                );
            }
            Err(reason) => {
                let _ = writeln!(text, "| {} | not run: {reason} | - | - | - |", row.target);
            }
        }
    }
    text
}
