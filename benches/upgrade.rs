//! Replacing the proxy itself under load: `cargo bench --bench upgrade`.
//!
//! Method
//! - One origin (`support/origin.rs`, fixed 100-byte body) behind each
//!   proxy, one worker each, plain HTTP/1.1 on 127.0.0.1.
//! - Load, the same for every target, on its own thread: 64 keep-alive
//!   HTTP/1.1 connections (hyper client, `GET /` back to back) plus a
//!   stream of new connections (`BENCH_NEW_PER_SECOND`, default 400: a
//!   fresh TCP connection, one `GET /` with `Connection: close`). 1 s of
//!   steady load, then `BENCH_UPGRADES` (default 10) replacements of the
//!   serving process 1 s apart, then 2 s more load while the last old
//!   process drains.
//! - Targets, each replaced `BENCH_UPGRADES` times:
//!   1. **cutover upgrade**: `cutover upgrade --binary PATH` (the real
//!      CLI against the admin socket), PATH a fresh copy of the built
//!      binary at a new path each time, so every upgrade starts a binary
//!      the server has not run. Ready = the command's reply, which comes
//!      once the new process has reported ready (it then accepts); the
//!      server's own `ready_ms` (from starting the new process to its
//!      `ready`) is reported beside it.
//!   2. **nginx binary upgrade**: `USR2` to the master (`daemon on`, so
//!      nginx accepts the signal; it re-executes its own binary, nginx has
//!      no other), wait until the new master has a worker, then `QUIT` to
//!      the old master. Ready = `USR2` → the new master's worker exists.
//!   3. **cutover restart**: `SIGTERM` (cutover drains, bounded by
//!      `shutdown_timeout`), wait for the exit, start it again. Ready =
//!      `SIGTERM` → the new process answers `GET /` with 200.
//! - Counted the same way for all three: a **refused connection** is a
//!   connect that fails (refused, reset, 5 s timeout), by a keep-alive
//!   client reconnecting or by the stream of new connections; a **failed
//!   request** is a request on an open connection that got no complete 200
//!   within 5 s (reset, connection closed before the response, body error,
//!   timeout, other status). Not failures, counted in their own columns: a
//!   keep-alive connection the server closed *between* requests (hyper
//!   sees it before sending: a reconnect), and a request hyper reports as
//!   canceled before it was written because the connection was closing
//!   (`unsent`; the next request goes out on a new connection, which every
//!   HTTP client does for a request it never sent).
//! - Bounded: every wait has a deadline; the load stops by itself after
//!   30 s per replacement.
//!
//! Output: a Markdown table on stdout and JSON in
//! `target/bench-results/upgrade.json` (or `$BENCH_RESULTS`).
//! Environment: `BENCH_UPGRADES` (10), `BENCH_CONNECTIONS` (64),
//! `BENCH_NEW_PER_SECOND` (400), `BENCH_TARGETS`
//! (`cutover_upgrade,nginx_usr2,cutover_restart`), `BENCH_CUTOVER_BIN`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[path = "support/mod.rs"]
mod support;
use support::origin::Origin;
use support::*;

/// Pause between two replacements, and the steady load before the first.
const GAP: Duration = Duration::from_secs(1);
/// Load after the last replacement, while the old process drains.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest a proxy may take to start, or a new process to serve.
const READY_WITHIN: Duration = Duration::from_secs(15);

fn main() {
    if support::origin::serve_if_origin() {
        return;
    }
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("upgrade: run it with `cargo bench --bench upgrade`; skipped");
        return;
    }
    let settings = Settings::from_env();
    println!("# Replacing the proxy under load\n");
    println!(
        "- date: {}",
        first_line_of("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
    );
    println!(
        "- cores (nproc): {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("- nginx: {}", first_line_of("nginx", &["-v"]));
    println!("- load average at start: {}", load_average());
    println!(
        "- load: {} keep-alive connections and {} new connections/s (built-in generator); \
         {} replacements {} s apart\n",
        settings.connections,
        settings.new_per_second,
        settings.upgrades,
        GAP.as_secs()
    );

    let origin = Origin::spawn();
    let scratch = tempfile::tempdir().expect("create a temporary directory");
    let mut rows = Vec::new();
    for target in &settings.targets {
        let dir = scratch.path().join(target.key());
        eprintln!("upgrade: {} ...", target.label());
        let row = match target.start(&dir, origin.addr) {
            Ok(subject) => measure(*target, subject, &settings),
            Err(reason) => {
                serde_json::json!({ "target": target.label(), "skipped": reason })
            }
        };
        rows.push(row);
    }
    drop(origin);

    print!("{}", markdown(&rows));
    println!("- load average at end: {}\n", load_average());
    let json = serde_json::json!({
        "settings": {
            "upgrades": settings.upgrades,
            "connections": settings.connections,
            "new_connections_per_second": settings.new_per_second,
            "gap_s": GAP.as_secs_f64(),
        },
        "rows": rows,
        "load_average_at_end": load_average(),
    });
    let path = results_path("upgrade");
    write_json(&path, &json);
    println!("JSON: {}", path.display());
}

struct Settings {
    upgrades: usize,
    connections: usize,
    new_per_second: u32,
    targets: Vec<Target>,
}

impl Settings {
    fn from_env() -> Settings {
        let targets = std::env::var("BENCH_TARGETS")
            .unwrap_or_else(|_| "cutover_upgrade,nginx_usr2,cutover_restart".to_string());
        Settings {
            upgrades: env_or("BENCH_UPGRADES", 10).clamp(1, 100),
            connections: env_or("BENCH_CONNECTIONS", 64).clamp(1, 1000),
            new_per_second: env_or("BENCH_NEW_PER_SECOND", 400).clamp(1, 5000),
            targets: targets
                .split(',')
                .filter_map(|key| Target::ALL.into_iter().find(|t| t.key() == key.trim()))
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------
// The measurement: the same load and counting for every target
// ---------------------------------------------------------------------------

/// One replacement of the serving process.
struct Replaced {
    /// From the command or signal to the new process serving.
    ready_ms: f64,
    /// cutover upgrade only: the server's own figure, from starting the new
    /// process to its `ready`.
    reported_ready_ms: Option<f64>,
}

/// A started proxy that can be replaced; stopped when dropped.
trait Subject {
    fn addr(&self) -> SocketAddr;
    /// Replaces the serving process (the `round`-th time, from 1).
    fn replace(&mut self, round: usize) -> Result<Replaced, String>;
}

fn measure(
    target: Target,
    mut subject: Box<dyn Subject>,
    settings: &Settings,
) -> serde_json::Value {
    let addr = subject.addr();
    let limit = GAP + SETTLE + Duration::from_secs(30) * settings.upgrades as u32;
    let load = load::Load::start(addr, settings.connections, settings.new_per_second, limit);
    std::thread::sleep(GAP);
    let mut replaced = Vec::new();
    let mut error = None;
    for round in 1..=settings.upgrades {
        if round > 1 {
            std::thread::sleep(GAP);
        }
        let at = load.elapsed();
        match subject.replace(round) {
            Ok(done) => replaced.push((at, done)),
            Err(err) => {
                error = Some(format!("replacement {round} failed: {err}"));
                break;
            }
        }
    }
    std::thread::sleep(SETTLE);
    let counts = load.stop();
    drop(subject);

    let ready: Vec<f64> = replaced.iter().map(|(_, r)| r.ready_ms).collect();
    let reported: Vec<f64> = replaced
        .iter()
        .filter_map(|(_, r)| r.reported_ready_ms)
        .collect();
    let mut row = serde_json::json!({
        "target": target.label(),
        "upgrades": settings.upgrades,
        "upgrades_done": replaced.len(),
        "requests": counts.ok + counts.failed,
        "failed": counts.failed,
        "refused": counts.refused,
        "unsent": counts.unsent,
        "reconnects": counts.reconnects,
        "new_connections": counts.new_connections,
        "ready_ms": spread(&ready),
        "reported_ready_ms": if reported.is_empty() { serde_json::Value::Null } else { spread(&reported) },
        "replaced_at_s": replaced.iter().map(|(at, _)| at.as_secs_f64()).collect::<Vec<_>>(),
        "failure_kinds": counts.kinds,
        "first_failures": counts.first_failures.iter()
            .map(|(at, kind)| serde_json::json!({"at_s": at, "kind": kind}))
            .collect::<Vec<_>>(),
    });
    if let Some(error) = error {
        row["error"] = error.into();
    }
    row
}

/// Median and max (and every value) of a list of milliseconds.
fn spread(values: &[f64]) -> serde_json::Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    };
    serde_json::json!({ "median": median, "max": sorted.last(), "all": values })
}

fn markdown(rows: &[serde_json::Value]) -> String {
    let mut text = String::from(
        "| target | replacements | requests | FAILED | REFUSED | unsent | reconnects | new connections | ready ms median | ready ms max |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ms = |row: &serde_json::Value, which: &str| {
        row["ready_ms"][which]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.0}"))
    };
    for row in rows {
        if let Some(reason) = row["skipped"].as_str() {
            let _ = writeln!(text, "| {} | not run: {reason} |||||||||", row["target"]);
            continue;
        }
        let _ = writeln!(
            text,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row["target"].as_str().unwrap_or("-"),
            row["upgrades_done"],
            row["upgrades"],
            row["requests"],
            row["failed"],
            row["refused"],
            row["unsent"],
            row["reconnects"],
            row["new_connections"],
            ms(row, "median"),
            ms(row, "max"),
        );
    }
    for row in rows {
        let label = row["target"].as_str().unwrap_or("-");
        if let Some(error) = row["error"].as_str() {
            let _ = writeln!(text, "\n{label}: ERROR {error}");
        }
        if let Some(reported) = row["reported_ready_ms"].as_object() {
            let _ = writeln!(
                text,
                "\n{label}: the server's own ready_ms (new process started → ready): median {}, max {}",
                reported["median"], reported["max"]
            );
        }
        if let Some(kinds) = row["failure_kinds"].as_object().filter(|k| !k.is_empty()) {
            let _ = writeln!(text, "\n{label}, failures by kind:");
            for (kind, count) in kinds {
                let _ = writeln!(text, "- {count}× {kind}");
            }
        }
    }
    text.push('\n');
    text
}

// ---------------------------------------------------------------------------
// The targets
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Target {
    CutoverUpgrade,
    NginxUsr2,
    CutoverRestart,
}

impl Target {
    const ALL: [Target; 3] = [
        Target::CutoverUpgrade,
        Target::NginxUsr2,
        Target::CutoverRestart,
    ];

    fn key(self) -> &'static str {
        match self {
            Target::CutoverUpgrade => "cutover_upgrade",
            Target::NginxUsr2 => "nginx_usr2",
            Target::CutoverRestart => "cutover_restart",
        }
    }

    /// The row's name; `benches/summary.rs` finds rows by these prefixes.
    fn label(self) -> &'static str {
        match self {
            Target::CutoverUpgrade => "cutover upgrade (new binary each time)",
            Target::NginxUsr2 => "nginx binary upgrade (USR2, then QUIT)",
            Target::CutoverRestart => "cutover restart (stop, start)",
        }
    }

    fn start(self, dir: &Path, origin: SocketAddr) -> Result<Box<dyn Subject>, String> {
        std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
        Ok(match self {
            Target::CutoverUpgrade => Box::new(cutover_target::Upgraded::start(dir, origin)?),
            Target::NginxUsr2 => Box::new(nginx::BinaryUpgraded::start(dir, origin)?),
            Target::CutoverRestart => Box::new(cutover_target::Restarted::start(dir, origin)?),
        })
    }
}

/// Whether `pid` runs (a zombie does not: an orphan nobody reaps stays one).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

fn signal(pid: u32, name: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map_err(|err| format!("run kill: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{name} {pid} failed ({status})"))
    }
}

/// Polls `done` every 5 ms until it holds or `within` passes.
fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn answers_200(addr: SocketAddr) -> bool {
    probe(addr).is_ok_and(|line| line.contains(" 200 "))
}

mod cutover_target {
    //! cutover, upgraded through its admin socket or restarted.

    use super::*;

    fn config(dir: &Path, http: SocketAddr, origin: SocketAddr) -> Result<PathBuf, String> {
        let text = format!(
            "[server]\n\
             http = \"{http}\"\n\
             workers = 1\n\
             admin_socket = \"{socket}\"\n\
             state_dir = \"{state}\"\n\
             shutdown_timeout = \"5s\"\n\
             \n\
             [server.limits]\n\
             header_read_timeout = \"300s\"\n\
             idle_timeout = \"300s\"\n\
             \n\
             [[site]]\n\
             hosts = [\"*\"]\n\
             service = \"up\"\n\
             \n\
             [service.up]\n\
             upstream = \"{origin}\"\n",
            socket = dir.join("admin.sock").display(),
            state = dir.join("state").display(),
        );
        let path = dir.join("proxy.toml");
        std::fs::write(&path, text).map_err(|err| format!("write {}: {err}", path.display()))?;
        Ok(path)
    }

    /// `cutover serve`, logging to `log` (appended: a restart adds to it).
    fn spawn(config: &Path, log: &Path) -> Result<ChildGuard, String> {
        let binary = proxies::cutover_binary();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|err| format!("open {}: {err}", log.display()))?;
        let copy = file.try_clone().map_err(|err| err.to_string())?;
        let child = Command::new(&binary)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(copy)
            .stderr(file)
            .spawn()
            .map_err(|err| format!("start {}: {err}", binary.display()))?;
        Ok(ChildGuard::new("cutover", child))
    }

    fn wait_serving(addr: SocketAddr, child: &mut ChildGuard, log: &Path) -> Result<(), String> {
        let mut exited = None;
        let ready = wait_until(READY_WITHIN, || {
            exited = child.exited();
            exited.is_some() || answers_200(addr)
        });
        match (exited, ready) {
            (Some(exit), _) => Err(format!("{exit}; log: {}", tail(log))),
            (None, true) => Ok(()),
            (None, false) => Err(format!(
                "cutover did not answer 200 within {READY_WITHIN:?}; log: {}",
                tail(log)
            )),
        }
    }

    /// cutover replaced by `cutover upgrade --binary COPY`.
    pub struct Upgraded {
        dir: PathBuf,
        http: SocketAddr,
        log: PathBuf,
        /// The process the bench started (it exits after the first upgrade).
        _first: ChildGuard,
        /// Processes started by upgrades: the server's children, not ours.
        successors: Vec<u32>,
    }

    impl Upgraded {
        pub fn start(dir: &Path, origin: SocketAddr) -> Result<Upgraded, String> {
            let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let config = config(dir, http, origin)?;
            let log = dir.join("cutover.log");
            let mut first = spawn(&config, &log)?;
            wait_serving(http, &mut first, &log)?;
            Ok(Upgraded {
                dir: dir.to_path_buf(),
                http,
                log,
                _first: first,
                successors: Vec::new(),
            })
        }

        fn copy_path(&self, round: usize) -> PathBuf {
            self.dir.join(format!("cutover-{round}"))
        }
    }

    impl Subject for Upgraded {
        fn addr(&self) -> SocketAddr {
            self.http
        }

        fn replace(&mut self, round: usize) -> Result<Replaced, String> {
            // A binary at a new path: a copy of the built one.
            let binary = self.copy_path(round);
            std::fs::copy(proxies::cutover_binary(), &binary)
                .map_err(|err| format!("copy the binary to {}: {err}", binary.display()))?;
            let began = Instant::now();
            let output = Command::new(proxies::cutover_binary())
                .args(["upgrade", "--json", "--socket"])
                .arg(self.dir.join("admin.sock"))
                .arg("--binary")
                .arg(&binary)
                .stdin(Stdio::null())
                .output()
                .map_err(|err| format!("run cutover upgrade: {err}"))?;
            let ready_ms = began.elapsed().as_secs_f64() * 1000.0;
            // The running copy may go (Linux keeps it while it runs); the
            // one before it too. Keeps the scratch directory small.
            if round > 1 {
                let _ = std::fs::remove_file(self.copy_path(round - 1));
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            let reply = stdout.lines().find_map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                (value["type"] == "ok").then(|| value["result"].clone())
            });
            match reply {
                Some(result) if output.status.success() => {
                    if let Some(pid) = result["pid"].as_u64() {
                        self.successors.push(pid as u32);
                    }
                    Ok(Replaced {
                        ready_ms,
                        reported_ready_ms: result["ready_ms"].as_f64(),
                    })
                }
                _ => Err(format!(
                    "cutover upgrade exited {}: {}{}; log: {}",
                    output.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&output.stderr).trim(),
                    tail(&self.log)
                )),
            }
        }
    }

    impl Drop for Upgraded {
        fn drop(&mut self) {
            for &pid in &self.successors {
                let _ = signal(pid, "TERM");
            }
            let stopped = wait_until(Duration::from_secs(10), || {
                !self.successors.iter().any(|&pid| running(pid))
            });
            if !stopped {
                for &pid in &self.successors {
                    let _ = signal(pid, "KILL");
                }
            }
        }
    }

    /// cutover stopped (SIGTERM, drained) and started again.
    pub struct Restarted {
        config: PathBuf,
        http: SocketAddr,
        log: PathBuf,
        child: ChildGuard,
    }

    impl Restarted {
        pub fn start(dir: &Path, origin: SocketAddr) -> Result<Restarted, String> {
            let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let config = config(dir, http, origin)?;
            let log = dir.join("cutover.log");
            let mut child = spawn(&config, &log)?;
            wait_serving(http, &mut child, &log)?;
            Ok(Restarted {
                config,
                http,
                log,
                child,
            })
        }
    }

    impl Subject for Restarted {
        fn addr(&self) -> SocketAddr {
            self.http
        }

        fn replace(&mut self, _round: usize) -> Result<Replaced, String> {
            let began = Instant::now();
            signal(self.child.pid(), "TERM")?;
            if !wait_until(Duration::from_secs(15), || self.child.exited().is_some()) {
                return Err("cutover did not exit within 15 s of SIGTERM".to_string());
            }
            self.child = spawn(&self.config, &self.log)?;
            wait_serving(self.http, &mut self.child, &self.log)?;
            Ok(Replaced {
                ready_ms: began.elapsed().as_secs_f64() * 1000.0,
                reported_ready_ms: None,
            })
        }
    }
}

mod nginx {
    //! nginx with a master process, upgraded the documented way.

    use super::*;
    use support::proxies::NginxConfig;

    /// nginx re-executes `argv[0]` on `USR2`, so it must be started by its
    /// absolute path.
    fn absolute_nginx() -> Option<PathBuf> {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|dir| Path::new(dir).join("nginx"))
            .find(|path| path.is_file())
    }

    pub struct BinaryUpgraded {
        dir: PathBuf,
        http: SocketAddr,
    }

    impl BinaryUpgraded {
        pub fn start(dir: &Path, origin: SocketAddr) -> Result<BinaryUpgraded, String> {
            let Some(nginx) = absolute_nginx().filter(|_| tool_installed("nginx")) else {
                return Err("not installed (apt-get install -y nginx)".to_string());
            };
            let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
            // As proxies.rs configures it for the other scenarios, with
            // `daemon on`: a master started with `daemon off` ignores USR2
            // while its parent lives ("the changing binary signal is
            // ignored").
            let config = NginxConfig {
                daemon: true,
                error_log_level: "notice",
                connections: 4096,
                ..NginxConfig::new(dir, http, origin)
            }
            .render();
            let path = dir.join("nginx.conf");
            std::fs::write(&path, config)
                .map_err(|err| format!("write {}: {err}", path.display()))?;
            let status = Command::new(&nginx)
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .status()
                .map_err(|err| format!("start nginx: {err}"))?;
            let nginx = BinaryUpgraded {
                dir: dir.to_path_buf(),
                http,
            };
            if !status.success() {
                return Err(format!(
                    "nginx exited {status}; log: {}",
                    tail(&dir.join("error.log"))
                ));
            }
            if !wait_until(READY_WITHIN, || answers_200(http)) {
                return Err(format!(
                    "nginx did not answer 200; log: {}",
                    tail(&dir.join("error.log"))
                ));
            }
            Ok(nginx)
        }

        fn master(&self, file: &str) -> Option<u32> {
            std::fs::read_to_string(self.dir.join(file))
                .ok()?
                .trim()
                .parse()
                .ok()
        }
    }

    impl Subject for BinaryUpgraded {
        fn addr(&self) -> SocketAddr {
            self.http
        }

        fn replace(&mut self, _round: usize) -> Result<Replaced, String> {
            let old = self
                .master("nginx.pid")
                .ok_or("no nginx.pid: is nginx running?")?;
            let began = Instant::now();
            signal(old, "USR2")?;
            // The new master writes nginx.pid (the old one's is renamed
            // nginx.pid.oldbin), then starts its worker.
            let mut new = None;
            let started = wait_until(READY_WITHIN, || {
                new = self.master("nginx.pid").filter(|&pid| pid != old);
                new.is_some_and(|pid| child_pids(pid).iter().any(|&w| running(w)))
            });
            let ready_ms = began.elapsed().as_secs_f64() * 1000.0;
            if !started {
                return Err(format!(
                    "no new nginx master with a worker within {READY_WITHIN:?}; log: {}",
                    tail(&self.dir.join("error.log"))
                ));
            }
            signal(old, "QUIT")?;
            if !wait_until(Duration::from_secs(15), || !running(old)) {
                return Err(format!(
                    "the old nginx master {old} did not exit after QUIT"
                ));
            }
            Ok(Replaced {
                ready_ms,
                reported_ready_ms: None,
            })
        }
    }

    impl Drop for BinaryUpgraded {
        fn drop(&mut self) {
            let masters: Vec<u32> = ["nginx.pid", "nginx.pid.oldbin"]
                .iter()
                .filter_map(|file| self.master(file))
                .collect();
            for &pid in &masters {
                let _ = signal(pid, "TERM");
            }
            let _ = wait_until(Duration::from_secs(5), || {
                !masters.iter().any(|&pid| running(pid))
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Load: keep-alive connections and a stream of new ones
// ---------------------------------------------------------------------------

mod load {
    use super::*;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::{Request, StatusCode};
    use support::keepalive::{connect, Sender, REQUEST_TIMEOUT};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the load saw, summed over its connections.
    #[derive(Default)]
    pub struct Counts {
        pub ok: u64,
        pub failed: u64,
        pub refused: u64,
        pub unsent: u64,
        pub reconnects: u64,
        pub new_connections: u64,
        pub kinds: BTreeMap<String, u64>,
        /// (seconds since the load started, kind), the first ones in time.
        pub first_failures: Vec<(f64, String)>,
    }

    impl Counts {
        fn add(&mut self, other: Counts) {
            self.ok += other.ok;
            self.failed += other.failed;
            self.refused += other.refused;
            self.unsent += other.unsent;
            self.reconnects += other.reconnects;
            self.new_connections += other.new_connections;
            for (kind, n) in other.kinds {
                *self.kinds.entry(kind).or_default() += n;
            }
            self.first_failures.extend(other.first_failures);
        }

        fn failure(&mut self, started: Instant, kind: String) {
            self.failed += 1;
            self.note(started, kind);
        }

        fn refusal(&mut self, started: Instant, kind: String) {
            self.refused += 1;
            self.note(started, format!("connect: {kind}"));
        }

        fn note(&mut self, started: Instant, kind: String) {
            if self.first_failures.len() < 20 {
                self.first_failures
                    .push((started.elapsed().as_secs_f64(), kind.clone()));
            }
            *self.kinds.entry(kind).or_default() += 1;
        }
    }

    /// The running load; [`Load::stop`] ends it and sums what it saw.
    pub struct Load {
        started: Instant,
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<Counts>,
    }

    impl Load {
        /// Starts `connections` keep-alive clients and `new_per_second` new
        /// connections a second against `addr`; all stop after `limit`
        /// whatever happens.
        pub fn start(
            addr: SocketAddr,
            connections: usize,
            new_per_second: u32,
            limit: Duration,
        ) -> Load {
            let started = Instant::now();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build the load runtime");
                runtime.block_on(run(addr, connections, new_per_second, started, limit, flag))
            });
            Load {
                started,
                stop,
                thread,
            }
        }

        pub fn elapsed(&self) -> Duration {
            self.started.elapsed()
        }

        pub fn stop(self) -> Counts {
            self.stop.store(true, Ordering::Relaxed);
            let mut counts = self.thread.join().expect("the load thread panicked");
            counts.first_failures.sort_by(|a, b| a.0.total_cmp(&b.0));
            counts.first_failures.truncate(20);
            counts
        }
    }

    async fn run(
        addr: SocketAddr,
        connections: usize,
        new_per_second: u32,
        started: Instant,
        limit: Duration,
        stop: Arc<AtomicBool>,
    ) -> Counts {
        let until = started + limit;
        let running = move || Instant::now() < until && !stop.load(Ordering::Relaxed);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            tasks.push(tokio::spawn(keep_alive(addr, started, running.clone())));
        }
        tasks.push(tokio::spawn(new_connections(
            addr,
            new_per_second,
            started,
            running.clone(),
        )));
        let mut total = Counts::default();
        for task in tasks {
            total.add(task.await.unwrap_or_default());
        }
        total
    }

    /// What one request on a keep-alive connection came to.
    enum Attempt {
        Ok,
        /// Closed by the server between requests: reconnect.
        Closed,
        /// Canceled by hyper before it was written (the connection was
        /// closing): reconnect; the next request is the same `GET /`.
        Unsent,
        Failed(String),
    }

    async fn keep_alive(addr: SocketAddr, started: Instant, running: impl Fn() -> bool) -> Counts {
        let mut counts = Counts::default();
        let host = addr.to_string();
        let mut first = true;
        while running() {
            if !first {
                counts.reconnects += 1;
            }
            first = false;
            let mut sender = match connect(addr).await {
                Ok(sender) => sender,
                Err(kind) => {
                    counts.refusal(started, kind);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            while running() {
                match get(&mut sender, &host).await {
                    Attempt::Ok => counts.ok += 1,
                    Attempt::Closed => break,
                    Attempt::Unsent => {
                        counts.unsent += 1;
                        break;
                    }
                    Attempt::Failed(kind) => {
                        counts.failure(started, kind);
                        break;
                    }
                }
            }
        }
        counts
    }

    async fn get(sender: &mut Sender, host: &str) -> Attempt {
        if sender.ready().await.is_err() {
            return Attempt::Closed;
        }
        let request = Request::get("/")
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let exchange = async {
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(err) if err.is_canceled() => return Attempt::Unsent,
                Err(err) => {
                    return Attempt::Failed(format!("request: {}", cutover::errors::chain(&err)))
                }
            };
            let status = response.status();
            if let Err(err) = response.into_body().collect().await {
                return Attempt::Failed(format!("body: {}", cutover::errors::chain(&err)));
            }
            if status == StatusCode::OK {
                Attempt::Ok
            } else {
                Attempt::Failed(format!("status {}", status.as_u16()))
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Attempt::Failed("timeout (5 s)".to_string()))
    }

    /// `per_second` new connections a second, each one `GET /` with
    /// `Connection: close`; a connection that is not accepted in time is
    /// not retried (the next one is due anyway).
    async fn new_connections(
        addr: SocketAddr,
        per_second: u32,
        started: Instant,
        running: impl Fn() -> bool + Clone + 'static,
    ) -> Counts {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inflight = tokio::task::JoinSet::new();
        let mut counts = Counts::default();
        while running() {
            tick.tick().await;
            inflight.spawn(one_connection(addr, started));
            while let Some(done) = inflight.try_join_next() {
                counts.add(done.unwrap_or_default());
            }
        }
        while let Some(done) = inflight.join_next().await {
            counts.add(done.unwrap_or_default());
        }
        counts
    }

    async fn one_connection(addr: SocketAddr, started: Instant) -> Counts {
        let mut counts = Counts {
            new_connections: 1,
            ..Counts::default()
        };
        let connected =
            tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
        let mut stream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                counts.refusal(started, err.kind().to_string());
                return counts;
            }
            Err(_) => {
                counts.refusal(started, "timeout (5 s)".to_string());
                return counts;
            }
        };
        let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let exchange = async {
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            std::io::Result::Ok(response)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(response)) if response.starts_with(b"HTTP/1.1 200") => counts.ok += 1,
            Ok(Ok(response)) => {
                let line = String::from_utf8_lossy(&response);
                let line = line.lines().next().unwrap_or("no response").to_string();
                counts.failure(started, format!("new connection: {line}"));
            }
            Ok(Err(err)) => counts.failure(started, format!("new connection: {}", err.kind())),
            Err(_) => counts.failure(started, "new connection: timeout (5 s)".to_string()),
        }
        counts
    }
}
