//! Merges the scenario results into one report: `benches/run` calls
//! `cargo bench --bench summary` last.
//!
//! Reads the JSON every scenario wrote to `target/bench-results/` and writes
//! `summary.json` (all of them, plus the machine and the command) and
//! `summary.md`: the machine (cores and CPU model from `/proc/cpuinfo`), the
//! date, the exact command, the performance targets with met / missed and the
//! figures behind each verdict, then one table per scenario. `summary.md` is
//! meant to be pasted into `docs/benchmarks.md` as it is.
//!
//! A scenario that did not run (tool missing, no Docker, bench failed) shows
//! as such; nothing is filled in for it.
//!
//! Environment (set by `benches/run`): `BENCH_COMMAND` (the command line),
//! `BENCH_STARTED` (start date), `BENCH_WALL_SECONDS` (wall time of the
//! scenarios), `BENCH_FAILED` (benches that exited with an error).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

#[path = "support/mod.rs"]
mod support;
use support::*;

/// The scenario result files, in report order: (file stem, heading).
const SCENARIOS: [(&str, &str); 9] = [
    (
        "proxy_throughput",
        "1. HTTP/1.1 keep-alive, 64 connections, one worker per proxy",
    ),
    (
        "proxy_throughput_all_cores",
        "1b. HTTP/1.1 keep-alive, 64 connections, all cores",
    ),
    (
        "instructions",
        "1c. Instructions per proxied request (callgrind, user space, one worker)",
    ),
    (
        "tls_throughput",
        "2–3. TLS: HTTP/2 (h2load), HTTPS HTTP/1.1 (wrk), new connection per request",
    ),
    (
        "cutover_flip",
        "4. Flip every second under load, old upstream stopped after each drain",
    ),
    ("deploy_under_load", "5. Real container deploys under load"),
    (
        "memory",
        "6. Memory: idle and with idle HTTP/1.1 connections",
    ),
    ("large_bodies", "7. Large bodies through each proxy"),
    (
        "upgrade",
        "8. Replacing the proxy under load: cutover upgrade, nginx binary upgrade, plain restart",
    ),
];

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("summary: run it with `cargo bench --bench summary`; skipped");
        return;
    }
    let dir = results_dir();
    let results: Vec<(&str, &str, Option<Value>)> = SCENARIOS
        .iter()
        .map(|(stem, heading)| (*stem, *heading, read(&dir.join(format!("{stem}.json")))))
        .collect();
    let machine = machine();
    let markdown = render(&machine, &results);
    let mut json = serde_json::json!({ "machine": machine, "scenarios": {} });
    for (stem, _, value) in &results {
        json["scenarios"][*stem] = value.clone().unwrap_or(Value::Null);
    }
    json["targets"] = targets(&results)
        .iter()
        .map(Target::json)
        .collect::<Vec<_>>()
        .into();
    write_json(&dir.join("summary.json"), &json);
    let md_path = dir.join("summary.md");
    std::fs::write(&md_path, &markdown)
        .unwrap_or_else(|err| panic!("write {}: {err}", md_path.display()));
    println!("{markdown}");
    println!("Written: {} and summary.json", md_path.display());
}

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results")
}

fn read(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Date, machine and command, from this machine and `benches/run`.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_string();
    let cores = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let tool = |name: &str, args: &[&str]| first_line_of(name, args);
    serde_json::json!({
        "date": std::env::var("BENCH_STARTED")
            .unwrap_or_else(|_| first_line_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
        "cores": cores,
        "cpu": cpu,
        "kernel": first_line_of("uname", &["-sr"]),
        "load_average_at_end": load_average(),
        "command": std::env::var("BENCH_COMMAND").unwrap_or_else(|_| "benches/run".to_string()),
        "wall_seconds": std::env::var("BENCH_WALL_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()),
        "failed_benches": std::env::var("BENCH_FAILED").unwrap_or_default(),
        "tools": {
            "nginx": tool("nginx", &["-v"]),
            "haproxy": tool("haproxy", &["-v"]),
            "wrk": tool("wrk", &["-v"]),
            "h2load": tool("h2load", &["--version"]),
            "docker": tool("docker", &["version", "--format", "{{.Server.Version}}"]),
        },
    })
}

// ---------------------------------------------------------------------------
// Performance targets
// ---------------------------------------------------------------------------

/// One target with its verdict: `Some(true)` met, `Some(false)` missed,
/// `None` not measured.
struct Target {
    name: &'static str,
    measured: String,
    met: Option<bool>,
}

impl Target {
    fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        }
    }

    fn json(&self) -> Value {
        serde_json::json!({ "target": self.name, "measured": self.measured, "met": self.met })
    }
}

/// The rows of a scenario file.
fn rows<'a>(results: &'a [(&str, &str, Option<Value>)], stem: &str) -> Vec<&'a Value> {
    results
        .iter()
        .find(|(s, _, _)| *s == stem)
        .and_then(|(_, _, v)| v.as_ref()?.get("rows")?.as_array())
        .map(|rows| rows.iter().collect())
        .unwrap_or_default()
}

/// The first row whose `target` starts with `target` and whose other
/// `key = value` pairs all match.
fn find<'a>(rows: &[&'a Value], target: &str, matching: &[(&str, &str)]) -> Option<&'a Value> {
    rows.iter().copied().find(|row| {
        row["target"]
            .as_str()
            .is_some_and(|t| t.starts_with(target))
            && row.get("skipped").is_none()
            && matching
                .iter()
                .all(|(key, value)| row[*key].as_str() == Some(*value))
    })
}

fn num(row: Option<&Value>, key: &str) -> Option<f64> {
    row?.get(key)?.as_f64()
}

fn targets(results: &[(&str, &str, Option<Value>)]) -> Vec<Target> {
    let h1 = rows(results, "proxy_throughput");
    // wrk's rows when wrk ran, else the built-in generator's.
    let generator = if find(&h1, "direct", &[("generator", "wrk")]).is_some() {
        "wrk"
    } else {
        "builtin"
    };
    let h1_row = |target| find(&h1, target, &[("generator", generator)]);
    let ratio = |target| num(h1_row(target), "ratio_to_direct");
    let added = |target| num(h1_row(target), "added_p99_ms");
    let (cutover, nginx, haproxy) = (
        ratio("cutover (RUST_LOG=warn)"),
        ratio("nginx"),
        ratio("haproxy"),
    );
    let mut list = Vec::new();
    let instructions = rows(results, "instructions");
    let per_request = |target| num(find(&instructions, target, &[]), "instructions_per_request");
    list.push(compare(
        "instructions per proxied h1 request ≤ 0.9× nginx's",
        per_request("cutover"),
        per_request("nginx"),
        |c, n| format!("cutover {c:.0} vs nginx {n:.0} ({:.2}×)", c / n),
        |c, n| c <= 0.9 * n,
    ));
    list.push(compare(
        "h1 req/s ≥ 1.1× nginx's (ratio to direct, one worker)",
        cutover,
        nginx,
        |c, n| {
            format!(
                "cutover {c:.2} vs nginx {n:.2} of direct ({:.2}×), {generator}",
                c / n
            )
        },
        |c, n| c >= 1.1 * n,
    ));
    list.push(compare(
        "h1 ratio to direct ≥ 1.1× HAProxy's",
        cutover,
        haproxy,
        |c, h| format!("cutover {c:.2} vs HAProxy {h:.2} ({:.2}×)", c / h),
        |c, h| c >= 1.1 * h,
    ));
    list.push(all_cores_target(results));
    let tls = rows(results, "tls_throughput");
    let h2 = |target| {
        num(
            find(&tls, target, &[("scenario", "h2 over TLS")]),
            "requests_per_second",
        )
    };
    list.push(compare(
        "h2/TLS req/s ≥ 1.1× HAProxy's",
        h2("cutover"),
        h2("haproxy"),
        |c, h| format!("cutover {c:.0} vs HAProxy {h:.0} req/s ({:.2}×)", c / h),
        |c, h| c >= 1.1 * h,
    ));
    list.push(compare(
        "p99 added latency ≤ nginx's (h1, one worker)",
        added("cutover (RUST_LOG=warn)"),
        added("nginx"),
        |c, n| format!("cutover {c:+.2} ms vs nginx {n:+.2} ms over direct's p99"),
        |c, n| c <= n,
    ));
    list.push(failures_target(results));
    list.push(deploy_target(results));
    list.push(bake_target(results));
    list.push(upgrade_target(results));
    let memory = rows(results, "memory");
    let in_scenario = |target, scenario| find(&memory, target, &[("scenario", scenario)]);
    let cutover_memory = in_scenario("cutover", "plain h1");
    let nginx_memory = in_scenario("nginx", "plain h1");
    list.push(compare(
        "RSS idle < 15 MiB",
        num(cutover_memory, "idle_rss_mib"),
        Some(15.0),
        |c, _| {
            format!(
                "cutover {c:.1} MiB (nginx {})",
                num(nginx_memory, "idle_rss_mib").map_or("-".into(), |n| format!("{n:.1} MiB"))
            )
        },
        |c, limit| c < limit,
    ));
    let opened = num(cutover_memory, "connections_opened").unwrap_or(0.0);
    let kib = |row| num(row, "kib_per_connection");
    list.push(compare(
        "memory per idle HTTP/1.1 connection ≤ 4 KiB",
        kib(cutover_memory).filter(|_| opened >= 10_000.0),
        Some(4.0),
        |c, _| {
            format!(
                "cutover {c:.1} KiB (nginx {}, HAProxy {})",
                kib(nginx_memory).map_or("-".into(), |n| format!("{n:.1}")),
                kib(in_scenario("haproxy", "plain h1")).map_or("-".into(), |h| format!("{h:.1}")),
            )
        },
        |c, limit| c <= limit,
    ));
    list.push(idle_tls_target(&memory));
    list.push(compare(
        "RSS < 60 MiB with 10,000 idle connections",
        num(cutover_memory, "rss_with_connections_mib").filter(|_| opened >= 10_000.0),
        Some(60.0),
        |c, _| {
            format!(
                "cutover {c:.1} MiB with {opened:.0} open (nginx {})",
                num(nginx_memory, "rss_with_connections_mib")
                    .map_or("-".into(), |n| format!("{n:.1} MiB"))
            )
        },
        |c, limit| c < limit,
    ));
    let bodies = rows(results, "large_bodies");
    let body_mib = results
        .iter()
        .find(|(s, _, _)| *s == "large_bodies")
        .and_then(|(_, _, v)| v.as_ref()?["settings"]["body_mib"].as_f64());
    let cutover_bodies = find(&bodies, "cutover", &[]);
    let growth = num(cutover_bodies, "peak_rss_mib")
        .zip(num(cutover_bodies, "rss_before_mib"))
        .map(|(peak, before)| peak - before);
    list.push(compare(
        "large bodies streamed: peak RSS grows < half the body size",
        growth,
        body_mib,
        |g, b| format!("cutover +{g:.1} MiB at peak for a {b:.0} MiB body each way"),
        |g, b| g < b / 2.0,
    ));
    list
}

/// Idle TLS connections (10,000, HTTP/1.1 and HTTP/2 by ALPN): cutover's
/// KiB per connection in both, nginx's and HAProxy's beside them.
fn idle_tls_target(memory: &[&Value]) -> Target {
    let kib = |target, scenario| {
        let row = find(memory, target, &[("scenario", scenario)]);
        num(row, "kib_per_connection")
            .filter(|_| num(row, "connections_opened").is_some_and(|opened| opened >= 10_000.0))
    };
    let shown = |value: Option<f64>| value.map_or("-".into(), |v| format!("{v:.1}"));
    let (h1, h2) = (kib("cutover", "TLS h1"), kib("cutover", "TLS h2"));
    let (Some(h1), Some(h2)) = (h1, h2) else {
        return Target {
            name: "memory per idle TLS connection ≤ 8 KiB (h1 and h2)",
            measured: "not measured: no TLS idle rows with 10,000 connections".into(),
            met: None,
        };
    };
    Target {
        name: "memory per idle TLS connection ≤ 8 KiB (h1 and h2)",
        measured: format!(
            "cutover h1 {h1:.1} KiB, h2 {h2:.1} KiB (nginx {} / {}, HAProxy {} / {})",
            shown(kib("nginx", "TLS h1")),
            shown(kib("nginx", "TLS h2")),
            shown(kib("haproxy", "TLS h1")),
            shown(kib("haproxy", "TLS h2")),
        ),
        met: Some(h1 <= 8.0 && h2 <= 8.0),
    }
}

/// req/s with every proxy on all cores (thread-per-core workers by
/// default), with the work-stealing runtime's figure beside it when the
/// bench measured both.
fn all_cores_target(results: &[(&str, &str, Option<Value>)]) -> Target {
    let all = rows(results, "proxy_throughput_all_cores");
    let generator = if find(&all, "direct", &[("generator", "wrk")]).is_some() {
        "wrk"
    } else {
        "builtin"
    };
    let req_s = |target| {
        num(
            find(&all, target, &[("generator", generator)]),
            "requests_per_second",
        )
    };
    let stealing = req_s("cutover work-stealing runtime");
    compare(
        "h1 req/s, all cores ≥ 1.0× nginx",
        req_s("cutover (RUST_LOG=warn)"),
        req_s("nginx"),
        |c, n| {
            let mut text = format!("cutover {c:.0} vs nginx {n:.0} req/s ({:.2}×)", c / n);
            if let Some(s) = stealing {
                text.push_str(&format!("; work-stealing runtime {s:.0} ({:.2}×)", s / n));
            }
            format!("{text}, {generator}")
        },
        |c, n| c >= n,
    )
}

/// A target comparing two measured figures; "not measured" if either is
/// missing.
fn compare(
    name: &'static str,
    ours: Option<f64>,
    theirs: Option<f64>,
    describe: impl Fn(f64, f64) -> String,
    holds: impl Fn(f64, f64) -> bool,
) -> Target {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) => Target {
            name,
            measured: describe(ours, theirs),
            met: Some(holds(ours, theirs)),
        },
        _ => Target {
            name,
            measured: "-".to_string(),
            met: None,
        },
    }
}

/// 0 failed requests across cutover's flips, with nginx's and HAProxy's
/// beside them.
fn failures_target(results: &[(&str, &str, Option<Value>)]) -> Target {
    let flips = rows(results, "cutover_flip");
    let failed = |target| {
        let row = find(&flips, target, &[])?;
        Some((row["failed"].as_u64()?, row["flips_done"].as_u64()?))
    };
    let other = |target| failed(target).map_or("-".to_string(), |(f, _)| f.to_string());
    match failed("cutover") {
        Some((count, flips_done)) => Target {
            name: "0 failed requests while flipping every second",
            measured: format!(
                "cutover {count} over {flips_done} flips (nginx {}, HAProxy {})",
                other("nginx"),
                other("haproxy")
            ),
            met: Some(count == 0 && flips_done > 0),
        },
        None => Target {
            name: "0 failed requests while flipping every second",
            measured: "-".to_string(),
            met: None,
        },
    }
}

/// 0 failed requests across the real deploys.
fn deploy_target(results: &[(&str, &str, Option<Value>)]) -> Target {
    let deploy = results
        .iter()
        .find(|(s, _, _)| *s == "deploy_under_load")
        .and_then(|(_, _, v)| v.as_ref());
    let name = "0 failed requests during real deploys";
    match deploy.and_then(|d| Some((d["failed"].as_u64()?, d["deploys"].as_array()?.len()))) {
        Some((failed, deploys)) => {
            let error = deploy.and_then(|d| d["deploy_error"].as_str());
            Target {
                name,
                measured: format!(
                    "{failed} failed over {deploys} deploys{}",
                    error.map_or(String::new(), |e| format!(" (deploy error: {e})"))
                ),
                met: Some(failed == 0 && error.is_none() && deploys > 0),
            }
        }
        None => Target {
            name,
            measured: "-".to_string(),
            met: None,
        },
    }
}

/// A bad version (a share of 500s) rolled back by the bake window, as a
/// full switch and as a canary, with every new request back on the
/// previous colour under 100 ms after the breach was observed.
fn bake_target(results: &[(&str, &str, Option<Value>)]) -> Target {
    let deploy = results
        .iter()
        .find(|(s, _, _)| *s == "deploy_under_load")
        .and_then(|(_, _, v)| v.as_ref());
    let name = "bake breach → all new requests on the previous colour < 100 ms";
    let figures = deploy.and_then(|d| {
        Some((
            d["bad_deploys_rolled_back"].as_bool()?,
            d["breach_to_switch_ms_max"].as_u64(),
            d["bad_deploys"].as_array()?.len(),
        ))
    });
    match figures {
        Some((rolled_back, max_ms, bad)) => Target {
            name,
            measured: format!(
                "max {} ms over {bad} bad deploys; {}",
                max_ms.map_or("-".to_string(), |ms| ms.to_string()),
                if rolled_back {
                    "all rolled back"
                } else {
                    "NOT all rolled back"
                }
            ),
            met: Some(rolled_back && max_ms.is_some_and(|ms| ms < 100)),
        },
        None => Target {
            name,
            measured: "-".to_string(),
            met: None,
        },
    }
}

/// 0 refused connections and 0 failed requests over cutover's upgrades,
/// with the time to the new process serving, and nginx's binary upgrade
/// and a plain restart counted the same way beside them.
fn upgrade_target(results: &[(&str, &str, Option<Value>)]) -> Target {
    let rows = rows(results, "upgrade");
    let name = "0 refused connections, 0 failed requests over 10 `cutover upgrade`s under load";
    let counted = |target| {
        let row = find(&rows, target, &[])?;
        Some((
            row["refused"].as_u64()?,
            row["failed"].as_u64()?,
            row["upgrades_done"].as_u64()?,
            row["upgrades"].as_u64()?,
        ))
    };
    let other = |target| {
        counted(target).map_or("-".to_string(), |(refused, failed, done, _)| {
            format!("{refused} refused, {failed} failed over {done}")
        })
    };
    let Some((refused, failed, done, asked)) = counted("cutover upgrade") else {
        return Target {
            name,
            measured: "-".to_string(),
            met: None,
        };
    };
    let upgrade = find(&rows, "cutover upgrade", &[]);
    let ready = |which| num(upgrade.map(|row| &row["ready_ms"]), which);
    let ready = match (ready("median"), ready("max")) {
        (Some(median), Some(max)) => {
            format!("; serving {median:.0} ms (median, max {max:.0}) after the command")
        }
        _ => String::new(),
    };
    Target {
        name,
        measured: format!(
            "cutover {refused} refused, {failed} failed over {done} upgrades{ready} \
             (nginx USR2+QUIT: {}; cutover stop+start: {})",
            other("nginx"),
            other("cutover restart"),
        ),
        met: Some(refused == 0 && failed == 0 && done == asked && done >= 10),
    }
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

/// Columns holding words (left-aligned); every other column is a number.
const TEXT_COLUMNS: [&str; 4] = ["target", "generator", "scenario", "window"];

/// A table column: heading, JSON key (a `/`-separated path), decimals.
type Column = (&'static str, &'static str, usize);

fn columns(stem: &str) -> Vec<Column> {
    match stem {
        "proxy_throughput" | "proxy_throughput_all_cores" => vec![
            ("target", "target", 0),
            ("generator", "generator", 0),
            ("req/s", "requests_per_second", 0),
            ("ratio to direct", "ratio_to_direct", 2),
            ("p50 ms", "p50_ms", 2),
            ("p99 ms", "p99_ms", 2),
            ("max ms", "max_ms", 2),
            ("added p99 ms", "added_p99_ms", 2),
            ("errors", "errors", 0),
            ("CPU µs/req", "target_cpu_us_per_request", 1),
            ("user µs/req", "target_cpu_user_us_per_request", 1),
            ("sys µs/req", "target_cpu_system_us_per_request", 1),
        ],
        "instructions" => vec![
            ("target", "target", 0),
            ("requests", "requests", 0),
            ("instructions per request", "instructions_per_request", 0),
            ("ratio to nginx", "ratio_to_nginx", 2),
            ("share of cutover's %", "share_of_cutover_percent", 1),
        ],
        "tls_throughput" => vec![
            ("scenario", "scenario", 0),
            ("target", "target", 0),
            ("req/s", "requests_per_second", 0),
            ("p50 ms", "p50_ms", 2),
            ("p99 ms", "p99_ms", 2),
            ("max ms", "max_ms", 2),
            ("errors", "errors", 0),
            ("CPU µs/req", "cpu_us_per_request", 1),
            ("user µs/req", "cpu_user_us_per_request", 1),
            ("sys µs/req", "cpu_system_us_per_request", 1),
        ],
        "cutover_flip" => vec![
            ("target", "target", 0),
            ("requests", "requests", 0),
            ("failed", "failed", 0),
            ("flips", "flips_done", 0),
            ("p50 ms", "p50_ms", 2),
            ("p99 ms", "p99_ms", 2),
            ("max ms", "max_ms", 2),
            ("drain ms median", "drain_ms/median", 1),
            ("drain ms max", "drain_ms/max", 1),
        ],
        "deploy_under_load" => vec![
            ("window", "window", 0),
            ("requests", "requests", 0),
            ("failed", "failed", 0),
            ("p50 ms", "p50_ms", 2),
            ("p99 ms", "p99_ms", 2),
            ("max ms", "max_ms", 2),
        ],
        "memory" => vec![
            ("target", "target", 0),
            ("scenario", "scenario", 0),
            ("idle RSS MiB", "idle_rss_mib", 1),
            ("connections", "connections_opened", 0),
            ("failed", "connections_failed", 0),
            ("still open", "connections_still_open", 0),
            ("RSS with them MiB", "rss_with_connections_mib", 1),
            ("KiB per connection", "kib_per_connection", 1),
        ],
        "upgrade" => vec![
            ("target", "target", 0),
            ("replacements", "upgrades_done", 0),
            ("requests", "requests", 0),
            ("failed", "failed", 0),
            ("refused", "refused", 0),
            ("unsent", "unsent", 0),
            ("reconnects", "reconnects", 0),
            ("new connections", "new_connections", 0),
            ("ready ms median", "ready_ms/median", 0),
            ("ready ms max", "ready_ms/max", 0),
        ],
        "large_bodies" => vec![
            ("target", "target", 0),
            ("download MiB/s", "download_mib_per_s", 0),
            ("upload MiB/s", "upload_mib_per_s", 0),
            ("RSS before MiB", "rss_before_mib", 1),
            ("peak RSS MiB", "peak_rss_mib", 1),
        ],
        _ => Vec::new(),
    }
}

/// The rows a scenario's table shows. The deploy bench writes two windows
/// instead of rows.
fn table_rows(stem: &str, value: &Value) -> Vec<Value> {
    if stem == "deploy_under_load" {
        let mut out = Vec::new();
        for (key, label) in [
            ("steady", "steady, no deploy"),
            ("during_deploys", "during deploys"),
        ] {
            let mut window = value[key].clone();
            if window.is_object() {
                window["window"] = label.into();
                out.push(window);
            }
        }
        if let Some(error) = value["deploy_error"].as_str() {
            out.push(serde_json::json!({ "window": "deploy error", "skipped": error }));
        }
        return out;
    }
    value["rows"].as_array().cloned().unwrap_or_default()
}

fn cell(row: &Value, key: &str, decimals: usize) -> String {
    let value = key.split('/').fold(row, |v, part| &v[part]);
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if decimals == 0 && n.is_f64() => format!("{f:.0}"),
            Some(f) if decimals > 0 => format!("{f:.decimals$}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.replace('|', "/"),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn table(stem: &str, value: &Value) -> String {
    let columns = columns(stem);
    let mut text = String::new();
    let headings: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let _ = writeln!(text, "| {} |", headings.join(" | "));
    let aligns: Vec<&str> = columns
        .iter()
        .map(|c| {
            if !TEXT_COLUMNS.contains(&c.1) {
                "---:"
            } else {
                "---"
            }
        })
        .collect();
    let _ = writeln!(text, "|{}|", aligns.join("|"));
    for row in table_rows(stem, value) {
        if let Some(reason) = row.get("skipped") {
            let label = row["target"]
                .as_str()
                .or(row["window"].as_str())
                .unwrap_or("-");
            let scenario = row["scenario"]
                .as_str()
                .map(|s| format!("{s}: "))
                .unwrap_or_default();
            let reason = reason.as_str().unwrap_or("skipped").replace('|', "/");
            let reason: String = reason.chars().take(160).collect();
            let blanks = vec!["-"; columns.len().saturating_sub(2)].join(" | ");
            let _ = writeln!(text, "| {scenario}{label} | not run: {reason} | {blanks} |");
            continue;
        }
        let cells: Vec<String> = columns.iter().map(|c| cell(&row, c.1, c.2)).collect();
        let _ = writeln!(text, "| {} |", cells.join(" | "));
    }
    text
}

fn render(machine: &Value, results: &[(&str, &str, Option<Value>)]) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Benchmark run of {}.\n",
        machine["date"].as_str().unwrap_or("-")
    );
    let _ = writeln!(
        text,
        "- machine: {} cores, {}, {}",
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("-"),
        machine["kernel"].as_str().unwrap_or("-")
    );
    let tools = &machine["tools"];
    let _ = writeln!(
        text,
        "- tools: {}; {}; {}; {}; docker {}",
        tools["nginx"].as_str().unwrap_or("-"),
        tools["haproxy"]
            .as_str()
            .unwrap_or("-")
            .split(" - ")
            .next()
            .unwrap_or("-"),
        tools["wrk"]
            .as_str()
            .unwrap_or("-")
            .split(" [")
            .next()
            .unwrap_or("-"),
        tools["h2load"].as_str().unwrap_or("-"),
        tools["docker"].as_str().unwrap_or("-")
    );
    let _ = writeln!(
        text,
        "- command: `{}`{}",
        machine["command"].as_str().unwrap_or("benches/run"),
        machine["wall_seconds"]
            .as_f64()
            .map_or(String::new(), |s| format!(
                ", wall time {:.0} s (build excluded)",
                s
            ))
    );
    let _ = writeln!(
        text,
        "- load average at the end: {} (other work on the machine skews req/s and latency)",
        machine["load_average_at_end"].as_str().unwrap_or("-")
    );
    if let Some(failed) = machine["failed_benches"].as_str().filter(|f| !f.is_empty()) {
        let _ = writeln!(text, "- benches that exited with an error: {failed}");
    }
    let _ = writeln!(text, "\n#### Targets\n");
    let _ = writeln!(text, "| target | measured | verdict |\n|---|---|---|");
    for target in targets(results) {
        let _ = writeln!(
            text,
            "| {} | {} | {} |",
            target.name,
            target.measured,
            target.verdict()
        );
    }
    for (stem, heading, value) in results {
        let _ = writeln!(text, "\n#### {heading}\n");
        match value {
            Some(value) => {
                if let Some(settings) = value.get("settings") {
                    let settings = match settings {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let _ = writeln!(text, "Settings: `{settings}`\n");
                }
                text.push_str(&table(stem, value));
            }
            None => {
                let _ = writeln!(
                    text,
                    "Not run: no `target/bench-results/{stem}.json` (see the run's log)."
                );
            }
        }
    }
    text
}
