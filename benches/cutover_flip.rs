//! Blue/green flips under load: `cargo bench --bench cutover_flip`.
//!
//! Method
//! - Two upstreams, "blue" and "green": this bench binary re-executed as a
//!   tiny single-threaded hyper HTTP/1.1 server (`BENCH_ROLE=upstream`,
//!   fixed 100-byte body), each on a fixed 127.0.0.1 port chosen at start so
//!   it can be stopped and restarted on the same address.
//! - Load: the built-in generator of `proxy_throughput` (64 keep-alive
//!   HTTP/1.1 hyper connections on one thread, `GET /` back to back, every
//!   request timed), for `BENCH_SECONDS` (default 20) on a thread of its own.
//! - Meanwhile, once a second, the proxy is flipped to the other upstream:
//!   1. the target upstream is (re)started and waited for until it answers
//!      200;
//!   2. the flip: cutover = admin `switch` (health check on, path `/`; the
//!      reply comes after the drain); nginx = rewrite the `server` line of
//!      the upstream block + SIGHUP to the master (`master_process on`,
//!      `worker_processes 1`), then wait until every worker that existed
//!      before the reload has exited (bounded, 10 s) — nginx's equivalent of
//!      "drain done"; HAProxy = its runtime API on the stats socket (a
//!      backend with a `blue` and a `green` server, `nbthread 1`): `set
//!      server up/<new> state ready; set server up/<old> state maint`, then
//!      poll `show stat` until the old server has no current sessions
//!      (bounded, 10 s) — HAProxy's "drain done";
//!   3. the old upstream is STOPPED (SIGKILL: listener and connections
//!      gone), so any request still routed to it fails.
//! - A failed request is a connection error, a request error (e.g. the
//!   connection closed before the response), a body error, a 5 s timeout or
//!   a status other than 200. A keep-alive connection the server closed
//!   *between* requests, which hyper noticed before sending the next one
//!   (`ready()` fails, nothing was sent), is not a failure: it is counted as
//!   a reconnect.
//! - Drain time per flip: cutover = the switch reply's `drain.drain_ms`;
//!   nginx = time from SIGHUP until the old workers had exited; HAProxy =
//!   time from the runtime API command until the old server's `scur` was 0.
//!
//! Output: a Markdown table on stdout and JSON in
//! `target/bench-results/cutover_flip.json` (or `$BENCH_RESULTS`).
//! Environment: `BENCH_SECONDS` (default 20), `BENCH_CONNECTIONS` (64),
//! `BENCH_TARGETS` (`cutover,nginx,haproxy`), `BENCH_CUTOVER_BIN`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

#[path = "support/mod.rs"]
mod support;
use support::*;

fn main() {
    if std::env::var("BENCH_ROLE").as_deref() == Ok("upstream") {
        upstream::serve();
        return;
    }
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("cutover_flip: run it with `cargo bench --bench cutover_flip`; skipped");
        return;
    }
    let settings = Settings::from_env();
    println!("# cutover flip under load\n");
    println!(
        "- date: {}",
        first_line_of("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
    );
    println!(
        "- cores (nproc): {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("- nginx: {}", first_line_of("nginx", &["-v"]));
    println!("- haproxy: {}", first_line_of("haproxy", &["-v"]));
    println!("- load average at start: {}", load_average());
    println!(
        "- load: {} keep-alive connections (built-in generator) for {} s; one flip per second; \
         the old upstream is killed after each flip's drain\n",
        settings.connections, settings.seconds
    );

    let scratch = tempfile::tempdir().expect("create a temporary directory");
    let mut rows = Vec::new();
    for target in &settings.targets {
        eprintln!("running {target} ...");
        let row = match run_target(target, &settings, &scratch.path().join(target)) {
            Ok(row) => row,
            Err(reason) => {
                eprintln!("{target}: {reason}");
                Row {
                    target: target.clone(),
                    outcome: Err(reason),
                }
            }
        };
        rows.push(row);
    }
    println!("- load average at end: {}\n", load_average());
    println!("{}", report::markdown(&rows));
    println!("{}", report::details(&rows));
    println!("{}", report::verdict(&rows));
    let path = report::write_json(&settings, &rows);
    println!("JSON: {}", path.display());
}

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Settings {
    seconds: u64,
    connections: usize,
    targets: Vec<String>,
}

impl Settings {
    fn from_env() -> Settings {
        let targets = env_or("BENCH_TARGETS", "cutover,nginx,haproxy".to_string())
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| ["cutover", "nginx", "haproxy"].contains(&t.as_str()))
            .collect();
        Settings {
            seconds: env_or("BENCH_SECONDS", 20).clamp(3, 600),
            connections: env_or("BENCH_CONNECTIONS", 64).max(1),
            targets,
        }
    }
}

// ---------------------------------------------------------------------------
// One target: start it, load it, flip it once a second
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Row {
    target: String,
    outcome: Result<RunResult, String>,
}

#[derive(Debug)]
struct RunResult {
    load: loadgen::LoadResult,
    flips: Vec<Flip>,
    /// A flip that failed (the run stops flipping after it).
    flip_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Flip {
    /// Seconds since the load started, when the flip command was issued.
    at_s: f64,
    to: String,
    /// Time to restart the target upstream (0 when it was already running).
    restart_ms: f64,
    /// The flip command's wall time: cutover = switch call (health check +
    /// swap + drain); nginx = SIGHUP until the old workers exited.
    wall_ms: f64,
    /// cutover: the reply's drain.drain_ms; nginx: same as wall_ms.
    drain_ms: f64,
    /// cutover: drain.drained and drain.still_in_flight; nginx: old worker
    /// pids that had exited.
    detail: String,
}

/// How a target is flipped.
trait Flipper {
    fn flip(&mut self, to: SocketAddr) -> Result<Flip, String>;
}

fn run_target(target: &str, settings: &Settings, dir: &Path) -> Result<Row, String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
    let mut upstreams = upstream::Pair::new();
    upstreams.start(0)?;
    let blue = upstreams.addr(0);
    let (addr, mut flipper, _guard): (SocketAddr, Box<dyn Flipper>, Box<dyn std::any::Any>) =
        match target {
            "cutover" => {
                let (running, flipper) = targets::start_cutover(dir, blue)?;
                (running.addr, Box::new(flipper), Box::new(running))
            }
            "nginx" => {
                let (running, flipper) = targets::start_nginx(dir, blue)?;
                (running.addr(), Box::new(flipper), Box::new(running))
            }
            "haproxy" => {
                let (running, flipper) = targets::start_haproxy(dir, blue, upstreams.addr(1))?;
                (running.addr, Box::new(flipper), Box::new(running))
            }
            other => return Err(format!("unknown target {other}")),
        };

    let started = Instant::now();
    let (connections, seconds) = (settings.connections, settings.seconds);
    let load = std::thread::spawn(move || loadgen::run(addr, connections, seconds, started));

    let mut flips = Vec::new();
    let mut flip_error = None;
    let mut active = 0usize;
    let last_flip = Duration::from_secs(seconds) - Duration::from_millis(700);
    let mut k = 1u32;
    loop {
        let at = Duration::from_secs(u64::from(k));
        if at > last_flip {
            break;
        }
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        if started.elapsed() > last_flip {
            break;
        }
        k += 1;
        let next = 1 - active;
        let restart_began = Instant::now();
        if let Err(err) = upstreams.start(next) {
            flip_error = Some(format!("restarting the upstream failed: {err}"));
            break;
        }
        let restart_ms = restart_began.elapsed().as_secs_f64() * 1000.0;
        let at_s = started.elapsed().as_secs_f64();
        match flipper.flip(upstreams.addr(next)) {
            Ok(mut flip) => {
                flip.at_s = at_s;
                flip.restart_ms = restart_ms;
                // Drain done: stop the old upstream.
                upstreams.stop(active);
                active = next;
                flips.push(flip);
            }
            Err(err) => {
                flip_error = Some(format!("flip {} failed: {err}", flips.len() + 1));
                break;
            }
        }
    }
    let load = load
        .join()
        .map_err(|_| "the load generator thread panicked".to_string())?;
    Ok(Row {
        target: target.to_string(),
        outcome: Ok(RunResult {
            load,
            flips,
            flip_error,
        }),
    })
}

// ---------------------------------------------------------------------------
// Processes and readiness (as in proxy_throughput)
// ---------------------------------------------------------------------------

/// Waits until `GET /` on `addr` answers 200, the child dies, or 10 s pass.
fn wait_ready(addr: SocketAddr, child: &mut ChildGuard, log: Option<&Path>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        if let Some(exit) = child.exited() {
            return Err(format!(
                "{exit}; log: {}",
                log.map(tail).unwrap_or_default()
            ));
        }
        match probe(addr) {
            Ok(status_line) if status_line.contains(" 200 ") => return Ok(()),
            Ok(status_line) => last = status_line,
            Err(err) => last = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!(
        "{} did not answer 200 within 10 s (last: {last}); log: {}",
        child.name,
        log.map(tail).unwrap_or_default()
    ))
}

/// Parent pid of `pid`, from /proc/PID/stat.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Live children of `parent` (zombies excluded).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            parent_of(pid) == Some(parent)
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rfind(')')
                            .map(|i| s[i + 1..].trim_start().starts_with('Z'))
                    })
                    .unwrap_or(true)
        })
        .collect()
}

fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_err(|err| format!("cannot run kill: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{sig} {pid}: {status}"))
    }
}

// ---------------------------------------------------------------------------
// The upstreams: this binary re-executed with BENCH_ROLE=upstream
// ---------------------------------------------------------------------------

mod upstream {
    use super::*;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::header::{HeaderValue, CONTENT_TYPE};
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;

    const BODY: &[u8; 100] =
        b"cutover bench upstream: a fixed body of exactly one hundred bytes, padded with dots................\n";

    /// Blue (0) and green (1) on fixed ports; each may be stopped and
    /// restarted.
    pub struct Pair {
        ports: [u16; 2],
        procs: [Option<ChildGuard>; 2],
    }

    impl Pair {
        pub fn new() -> Pair {
            Pair {
                ports: [free_port(), free_port()],
                procs: [None, None],
            }
        }

        pub fn addr(&self, index: usize) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], self.ports[index]))
        }

        /// Starts upstream `index` unless it runs, and waits until it answers.
        pub fn start(&mut self, index: usize) -> Result<(), String> {
            if let Some(child) = &mut self.procs[index] {
                if child.exited().is_none() {
                    return Ok(());
                }
            }
            let name = ["blue", "green"][index];
            let exe = std::env::current_exe().map_err(|err| err.to_string())?;
            let mut last = String::new();
            // A killed upstream's port is free at once (SO_REUSEADDR); retry
            // a few times anyway in case of a bind race.
            for _ in 0..20 {
                let child = Command::new(&exe)
                    .env("BENCH_ROLE", "upstream")
                    .env("BENCH_PORT", self.ports[index].to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|err| format!("start upstream {name}: {err}"))?;
                let mut guard = ChildGuard::new(name, child);
                match wait_ready(self.addr(index), &mut guard, None) {
                    Ok(()) => {
                        self.procs[index] = Some(guard);
                        return Ok(());
                    }
                    Err(err) => last = err,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(last)
        }

        /// Kills upstream `index` (listener and every connection closed).
        pub fn stop(&mut self, index: usize) {
            self.procs[index] = None;
        }
    }

    /// The child's entry point: serve on BENCH_PORT until stdin closes.
    pub fn serve() {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
        let port: u16 = env_or("BENCH_PORT", 0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the upstream runtime");
        runtime.block_on(accept_loop(port));
    }

    async fn accept_loop(port: u16) {
        // tokio sets SO_REUSEADDR, so a restart binds through TIME_WAIT.
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("upstream: bind 127.0.0.1:{port}: {err}");
                std::process::exit(2);
            }
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

// ---------------------------------------------------------------------------
// The proxies and how each is flipped
// ---------------------------------------------------------------------------

mod targets {
    use super::*;
    use support::proxies::NginxConfig;

    pub struct Running {
        pub addr: SocketAddr,
        _child: ChildGuard,
    }

    fn write_config(dir: &Path, name: &str, text: &str) -> Result<PathBuf, String> {
        std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|err| format!("write {}: {err}", path.display()))?;
        Ok(path)
    }

    fn spawn_logged(name: &str, mut command: Command, log: &Path) -> Result<ChildGuard, String> {
        let log_file =
            std::fs::File::create(log).map_err(|err| format!("create {}: {err}", log.display()))?;
        let log_copy = log_file
            .try_clone()
            .map_err(|err| format!("duplicate log handle: {err}"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log_copy)
            .stderr(log_file)
            .spawn()
            .map_err(|err| format!("cannot start {name}: {err}"))?;
        Ok(ChildGuard::new(name, child))
    }

    fn listen_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], free_port()))
    }

    // --- cutover -----------------------------------------------------------

    pub struct CutoverFlipper {
        socket: PathBuf,
        runtime: tokio::runtime::Runtime,
    }

    pub fn start_cutover(
        dir: &Path,
        upstream: SocketAddr,
    ) -> Result<(Running, CutoverFlipper), String> {
        let binary = std::env::var_os("BENCH_CUTOVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cutover")));
        if !binary.exists() {
            return Err(format!("cutover binary {} not found", binary.display()));
        }
        let addr = listen_addr();
        let socket = dir.join("admin.sock");
        let state = dir.join("state");
        let config = format!(
            "[server]\n\
             http = \"{addr}\"\n\
             workers = 1\n\
             admin_socket = \"{}\"\n\
             state_dir = \"{}\"\n\
             \n\
             [[site]]\n\
             hosts = [\"*\"]\n\
             service = \"web\"\n\
             \n\
             [service.web]\n\
             upstream = \"{upstream}\"\n",
            socket.display(),
            state.display()
        );
        let path = write_config(dir, "proxy.toml", &config)?;
        let mut command = Command::new(&binary);
        command
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn");
        let log = dir.join("cutover.log");
        let mut child = spawn_logged("cutover", command, &log)?;
        wait_ready(addr, &mut child, Some(&log))?;
        // The admin socket is bound at start-up; wait for it too (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(format!("admin socket {} never appeared", socket.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| err.to_string())?;
        Ok((
            Running {
                addr,
                _child: child,
            },
            CutoverFlipper { socket, runtime },
        ))
    }

    impl Flipper for CutoverFlipper {
        fn flip(&mut self, to: SocketAddr) -> Result<Flip, String> {
            let command = cutover::admin::Command::Switch {
                service: "web".to_string(),
                to: to.to_string(),
                force: false,
            };
            let began = Instant::now();
            let call = cutover::admin::call(&self.socket, &command, |_, _| {});
            let result = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(60), call).await })
                .map_err(|_| "switch did not answer within 60 s".to_string())?
                .map_err(|err| err.to_string())?;
            let wall_ms = began.elapsed().as_secs_f64() * 1000.0;
            let result = result
                .clone()
                .into_switch()
                .ok_or_else(|| format!("switch answered with another report: {result:?}"))?;
            let drain = result
                .drain
                .ok_or_else(|| format!("switch reply has no drain: {result:?}"))?;
            let drain_ms = drain.drain_ms as f64;
            Ok(Flip {
                at_s: 0.0,
                to: to.to_string(),
                restart_ms: 0.0,
                wall_ms,
                drain_ms,
                detail: format!(
                    "drained={} still_in_flight={} swap_ns={}",
                    drain.drained, drain.still_in_flight, result.timings.swap_ns
                ),
            })
        }
    }

    // --- nginx -------------------------------------------------------------

    /// nginx with a master process; stopped with SIGTERM (then SIGKILL for
    /// master and workers) so no worker outlives the bench.
    pub struct Nginx {
        addr: SocketAddr,
        child: ChildGuard,
    }

    impl Nginx {
        pub fn addr(&self) -> SocketAddr {
            self.addr
        }
    }

    impl Drop for Nginx {
        fn drop(&mut self) {
            let master = self.child.pid();
            let workers = children_of(master);
            let _ = signal(master, "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            for pid in workers {
                if parent_of(pid).is_some() {
                    let _ = signal(pid, "KILL");
                }
            }
        }
    }

    pub struct NginxFlipper {
        dir: PathBuf,
        listen: SocketAddr,
        master: u32,
    }

    fn nginx_config(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
        NginxConfig {
            connections: 4096,
            ..NginxConfig::new(dir, listen, upstream)
        }
        .render()
    }

    pub fn start_nginx(dir: &Path, upstream: SocketAddr) -> Result<(Nginx, NginxFlipper), String> {
        if !tool_installed("nginx") {
            return Err("nginx: not installed (apt-get install nginx)".to_string());
        }
        let addr = listen_addr();
        let path = write_config(dir, "nginx.conf", &nginx_config(dir, addr, upstream))?;
        let error_log = dir.join("error.log");
        let mut command = Command::new("nginx");
        command
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(&error_log);
        let mut child = spawn_logged("nginx", command, &dir.join("nginx.out"))?;
        let master = child.pid();
        if let Err(err) = wait_ready(addr, &mut child, Some(&error_log)) {
            drop(Nginx { addr, child });
            return Err(err);
        }
        Ok((
            Nginx { addr, child },
            NginxFlipper {
                dir: dir.to_path_buf(),
                listen: addr,
                master,
            },
        ))
    }

    impl Flipper for NginxFlipper {
        fn flip(&mut self, to: SocketAddr) -> Result<Flip, String> {
            let old_workers = children_of(self.master);
            if old_workers.is_empty() {
                return Err("nginx master has no workers".to_string());
            }
            write_config(
                &self.dir,
                "nginx.conf",
                &nginx_config(&self.dir, self.listen, to),
            )?;
            let began = Instant::now();
            signal(self.master, "HUP")?;
            // Drain done = every worker of the old configuration has exited.
            let deadline = began + Duration::from_secs(10);
            loop {
                let now_children = children_of(self.master);
                let old_left = old_workers
                    .iter()
                    .filter(|pid| now_children.contains(pid))
                    .count();
                let new_started = now_children.iter().any(|pid| !old_workers.contains(pid));
                if old_left == 0 && new_started {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{old_left} old nginx worker(s) still running 10 s after the reload"
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let wall_ms = began.elapsed().as_secs_f64() * 1000.0;
            Ok(Flip {
                at_s: 0.0,
                to: to.to_string(),
                restart_ms: 0.0,
                wall_ms,
                drain_ms: wall_ms,
                detail: format!("old workers {old_workers:?} exited"),
            })
        }
    }
    // --- HAProxy -------------------------------------------------------------

    /// Flips HAProxy between its `blue` and `green` servers over the runtime
    /// API (the admin-level stats socket).
    pub struct HaproxyFlipper {
        socket: PathBuf,
        servers: [(SocketAddr, &'static str); 2],
    }

    pub fn start_haproxy(
        dir: &Path,
        blue: SocketAddr,
        green: SocketAddr,
    ) -> Result<(Running, HaproxyFlipper), String> {
        if !tool_installed("haproxy") {
            return Err("haproxy: not installed (apt-get install -y haproxy)".to_string());
        }
        let addr = listen_addr();
        let socket = dir.join("haproxy.sock");
        let config = format!(
            "global\n\
             \x20   nbthread 1\n\
             \x20   stats socket {socket} mode 600 level admin\n\
             defaults\n\
             \x20   mode http\n\
             \x20   option http-keep-alive\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 30s\n\
             \x20   timeout server 30s\n\
             frontend bench\n\
             \x20   bind {addr}\n\
             \x20   default_backend up\n\
             backend up\n\
             \x20   http-reuse always\n\
             \x20   server blue {blue}\n\
             \x20   server green {green} disabled\n",
            socket = socket.display(),
        );
        let path = write_config(dir, "haproxy.cfg", &config)?;
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&path);
        let log = dir.join("haproxy.log");
        let mut child = spawn_logged("haproxy", command, &log)?;
        wait_ready(addr, &mut child, Some(&log))?;
        Ok((
            Running {
                addr,
                _child: child,
            },
            HaproxyFlipper {
                socket,
                servers: [(blue, "blue"), (green, "green")],
            },
        ))
    }

    impl HaproxyFlipper {
        /// One runtime API command (several joined by `;`); HAProxy answers
        /// and closes. Any non-empty answer to `set` is an error message.
        fn command(&self, line: &str) -> Result<String, String> {
            use std::io::{Read, Write};
            let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)
                .map_err(|err| format!("connect {}: {err}", self.socket.display()))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|err| err.to_string())?;
            stream
                .write_all(format!("{line}\n").as_bytes())
                .map_err(|err| format!("send {line:?}: {err}"))?;
            let mut answer = String::new();
            stream
                .read_to_string(&mut answer)
                .map_err(|err| format!("read the answer to {line:?}: {err}"))?;
            Ok(answer)
        }

        /// Current sessions on server `name` of backend `up`, from the
        /// `show stat` CSV (`pxname,svname,qcur,qmax,scur,...`).
        fn current_sessions(&self, name: &str) -> Result<u64, String> {
            let csv = self.command("show stat")?;
            csv.lines()
                .map(|line| line.split(',').collect::<Vec<_>>())
                .find(|fields| fields.first() == Some(&"up") && fields.get(1) == Some(&name))
                .and_then(|fields| fields.get(4)?.parse().ok())
                .ok_or_else(|| format!("no up/{name} line in show stat"))
        }
    }

    impl Flipper for HaproxyFlipper {
        fn flip(&mut self, to: SocketAddr) -> Result<Flip, String> {
            let (new, old) = if self.servers[0].0 == to {
                (self.servers[0].1, self.servers[1].1)
            } else {
                (self.servers[1].1, self.servers[0].1)
            };
            let began = Instant::now();
            let answer = self.command(&format!(
                "set server up/{new} state ready; set server up/{old} state maint"
            ))?;
            if !answer.trim().is_empty() {
                return Err(format!("runtime API refused the flip: {}", answer.trim()));
            }
            let wall_ms = began.elapsed().as_secs_f64() * 1000.0;
            // Drain done = no session left on the old server.
            let deadline = began + Duration::from_secs(10);
            let mut polls = 0u32;
            loop {
                polls += 1;
                let left = self.current_sessions(old)?;
                if left == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{left} session(s) still on {old} 10 s after the flip"
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(Flip {
                at_s: 0.0,
                to: to.to_string(),
                restart_ms: 0.0,
                wall_ms,
                drain_ms: began.elapsed().as_secs_f64() * 1000.0,
                detail: format!("{new} ready, {old} maint; old scur 0 after {polls} poll(s)"),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Load generator (proxy_throughput's, with failures classified)
// ---------------------------------------------------------------------------

mod loadgen {
    use super::*;

    use support::keepalive::{connect, request, Outcome};

    /// At most this many failures are kept with their time, for the report.
    const KEEP_FAILURES: usize = 1000;

    #[derive(Debug, Default)]
    pub struct LoadResult {
        pub requests: u64,
        pub seconds: f64,
        pub p50_us: f64,
        pub p99_us: f64,
        pub max_us: f64,
        pub failed: u64,
        /// Failure kind → count.
        pub kinds: BTreeMap<String, u64>,
        /// (seconds since start, kind) of the first failures.
        pub first_failures: Vec<(f64, String)>,
        /// Connections the server closed between requests (not failures).
        pub reconnects: u64,
    }

    #[derive(Default)]
    struct ConnStats {
        latencies_us: Vec<u32>,
        failures: Vec<(f64, String)>,
        reconnects: u64,
    }

    pub fn run(addr: SocketAddr, connections: usize, seconds: u64, started: Instant) -> LoadResult {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the load generator runtime");
        let until = started + Duration::from_secs(seconds);
        let stats = runtime.block_on(async {
            let tasks: Vec<_> = (0..connections)
                .map(|_| tokio::spawn(connection(addr, until, started)))
                .collect();
            let mut all = Vec::with_capacity(tasks.len());
            for task in tasks {
                all.push(task.await.unwrap_or_else(|_| ConnStats {
                    failures: vec![(0.0, "load task panicked".to_string())],
                    ..ConnStats::default()
                }));
            }
            all
        });
        summarize(stats, seconds as f64)
    }

    async fn connection(
        addr: SocketAddr,
        until: tokio::time::Instant,
        started: Instant,
    ) -> ConnStats {
        let mut stats = ConnStats::default();
        let host = addr.to_string();
        let mut first = true;
        while tokio::time::Instant::now() < until {
            if !first {
                stats.reconnects += 1;
            }
            first = false;
            let mut sender = match connect(addr).await {
                Ok(sender) => sender,
                Err(err) => {
                    stats
                        .failures
                        .push((started.elapsed().as_secs_f64(), format!("connect: {err}")));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            while tokio::time::Instant::now() < until {
                let began = tokio::time::Instant::now();
                let outcome = request(&mut sender, &host).await;
                let elapsed = began.elapsed().as_micros();
                match outcome {
                    Outcome::Ok => stats
                        .latencies_us
                        .push(u32::try_from(elapsed).unwrap_or(u32::MAX)),
                    Outcome::Closed => break,
                    // The flip's origin never fails on purpose: a 500 is a failure.
                    outcome @ (Outcome::Failed(_) | Outcome::Deliberate) => {
                        let kind = match outcome {
                            Outcome::Failed(kind) => kind,
                            _ => "status 500".to_string(),
                        };
                        stats
                            .latencies_us
                            .push(u32::try_from(elapsed).unwrap_or(u32::MAX));
                        stats.failures.push((started.elapsed().as_secs_f64(), kind));
                        break;
                    }
                }
            }
        }
        stats
    }

    fn summarize(stats: Vec<ConnStats>, seconds: f64) -> LoadResult {
        let mut result = LoadResult {
            seconds,
            ..LoadResult::default()
        };
        let mut failures: Vec<(f64, String)> = Vec::new();
        let mut latencies = Vec::new();
        for s in stats {
            result.reconnects += s.reconnects;
            failures.extend(s.failures);
            latencies.extend(s.latencies_us);
        }
        failures.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, kind) in &failures {
            *result.kinds.entry(kind.clone()).or_default() += 1;
        }
        result.failed = failures.len() as u64;
        failures.truncate(KEEP_FAILURES);
        result.first_failures = failures;
        latencies.sort_unstable();
        // Every attempted request, failed ones included (they are timed too).
        result.requests = latencies.len() as u64
            + result
                .kinds
                .iter()
                .filter(|(k, _)| k.starts_with("connect"))
                .map(|(_, n)| n)
                .sum::<u64>();
        result.p50_us = percentile(&latencies, 50.0);
        result.p99_us = percentile(&latencies, 99.0);
        result.max_us = latencies.last().copied().map_or(0.0, f64::from);
        result
    }
}

// ---------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------

mod report {
    use super::*;

    fn ms(us: f64) -> String {
        format!("{:.3}", us / 1000.0)
    }

    fn drain_summary(flips: &[Flip]) -> (f64, f64, f64) {
        let mut drains: Vec<f64> = flips.iter().map(|f| f.drain_ms).collect();
        drains.sort_by(f64::total_cmp);
        if drains.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        (
            drains[0],
            drains[drains.len() / 2],
            drains[drains.len() - 1],
        )
    }

    pub fn markdown(rows: &[Row]) -> String {
        let mut text = String::from(
            "| target | requests | FAILED | failure kinds | reconnects | p50 ms | p99 ms | max ms | flips | drain ms min / median / max | flip wall ms median |\n\
             |---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|\n",
        );
        for row in rows {
            match &row.outcome {
                Ok(r) => {
                    let l = &r.load;
                    let kinds = if l.kinds.is_empty() {
                        "-".to_string()
                    } else {
                        l.kinds
                            .iter()
                            .map(|(k, n)| format!("{n}× {k}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    };
                    let (lo, mid, hi) = drain_summary(&r.flips);
                    let mut walls: Vec<f64> = r.flips.iter().map(|f| f.wall_ms).collect();
                    walls.sort_by(f64::total_cmp);
                    let wall = walls.get(walls.len() / 2).copied().unwrap_or(0.0);
                    let _ = writeln!(
                        text,
                        "| {} | {} | {} | {kinds} | {} | {} | {} | {} | {} | {lo:.1} / {mid:.1} / {hi:.1} | {wall:.1} |",
                        row.target,
                        l.requests,
                        l.failed,
                        l.reconnects,
                        ms(l.p50_us),
                        ms(l.p99_us),
                        ms(l.max_us),
                        r.flips.len(),
                    );
                }
                Err(reason) => {
                    let _ = writeln!(
                        text,
                        "| {} | {reason} | - | - | - | - | - | - | - | - | - |",
                        row.target
                    );
                }
            }
        }
        text
    }

    pub fn details(rows: &[Row]) -> String {
        let mut text = String::new();
        for row in rows {
            let Ok(r) = &row.outcome else { continue };
            let _ = writeln!(text, "## {}: flips", row.target);
            if let Some(err) = &r.flip_error {
                let _ = writeln!(text, "- FLIP ERROR: {err}");
            }
            for (i, f) in r.flips.iter().enumerate() {
                let _ = writeln!(
                    text,
                    "- #{:>2} at {:>6.3} s → {}: restart {:.1} ms, flip {:.1} ms, drain {:.1} ms ({})",
                    i + 1,
                    f.at_s,
                    f.to,
                    f.restart_ms,
                    f.wall_ms,
                    f.drain_ms,
                    f.detail
                );
            }
            if !r.load.first_failures.is_empty() {
                // Grouped by 10 ms window and kind, so a burst is one line.
                let mut groups: Vec<(f64, &str, u64)> = Vec::new();
                for (at, kind) in &r.load.first_failures {
                    let bucket = (at * 100.0).floor() / 100.0;
                    match groups.last_mut() {
                        Some((b, k, n)) if *b == bucket && *k == kind.as_str() => *n += 1,
                        _ => groups.push((bucket, kind.as_str(), 1)),
                    }
                }
                let _ = writeln!(
                    text,
                    "First {} failures (s since start, 10 ms buckets):",
                    r.load.first_failures.len()
                );
                for (at, kind, n) in groups {
                    let _ = writeln!(text, "  - {at:.2} s: {n}× {kind}");
                }
            }
            text.push('\n');
        }
        text
    }

    pub fn verdict(rows: &[Row]) -> String {
        let mut text = String::new();
        for row in rows.iter().filter(|r| r.target == "cutover") {
            match &row.outcome {
                Ok(r) => {
                    let _ = writeln!(
                        text,
                        "**cutover FAILED REQUESTS: {}** (target 0) over {} requests and {} flips{}",
                        r.load.failed,
                        r.load.requests,
                        r.flips.len(),
                        if r.load.failed == 0 && r.flip_error.is_none() {
                            " — MEETS"
                        } else {
                            " — MISSES"
                        }
                    );
                }
                Err(reason) => {
                    let _ = writeln!(text, "**cutover: not measured: {reason}**");
                }
            }
        }
        text
    }

    pub fn write_json(settings: &Settings, rows: &[Row]) -> PathBuf {
        let path = std::env::var_os("BENCH_RESULTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results/cutover_flip.json")
            });
        let rows_json: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| match &row.outcome {
                Ok(r) => {
                    let l = &r.load;
                    let (lo, mid, hi) = drain_summary(&r.flips);
                    serde_json::json!({
                        "target": row.target,
                        "requests": l.requests,
                        "failed": l.failed,
                        "failure_kinds": l.kinds,
                        "first_failures": l.first_failures.iter().map(|(at, kind)| serde_json::json!({"at_s": at, "kind": kind})).collect::<Vec<_>>(),
                        "reconnects": l.reconnects,
                        "p50_ms": l.p50_us / 1000.0,
                        "p99_ms": l.p99_us / 1000.0,
                        "max_ms": l.max_us / 1000.0,
                        "seconds": l.seconds,
                        "flips_done": r.flips.len(),
                        "flip_error": r.flip_error,
                        "drain_ms": {"min": lo, "median": mid, "max": hi},
                        "flips": r.flips.iter().map(|f| serde_json::json!({
                            "at_s": f.at_s, "to": f.to, "restart_ms": f.restart_ms,
                            "wall_ms": f.wall_ms, "drain_ms": f.drain_ms, "detail": f.detail,
                        })).collect::<Vec<_>>(),
                    })
                }
                Err(reason) => serde_json::json!({"target": row.target, "skipped": reason}),
            })
            .collect();
        let json = serde_json::json!({
            "settings": {"seconds": settings.seconds, "connections": settings.connections, "flip_interval_s": 1},
            "load_average_at_end": load_average(),
            "rows": rows_json,
        });
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let text = serde_json::to_string_pretty(&json).expect("serialize the results");
        std::fs::write(&path, text + "\n")
            .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        path
    }
}
