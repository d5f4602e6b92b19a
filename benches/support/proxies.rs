//! The three proxies under test, configured alike: cutover, nginx and
//! HAProxy, each with one plain-HTTP listener (used to probe readiness and
//! for HTTP/1.1 scenarios) and one TLS listener with the dev certificate from
//! `certs-dev/` (HTTP/2 and HTTP/1.1 by ALPN), forwarding everything to one
//! origin over plain HTTP/1.1 with a keep-alive pool.
//!
//! Settings that would otherwise make the comparison unfair are set the same
//! way everywhere: one worker thread (or all cores), no access log, bodies
//! streamed in both directions (nginx buffers to disk by default, so
//! `proxy_request_buffering off` and `proxy_buffering off`), no body size
//! limit, and idle timeouts of 300 s so 10,000 idle connections stay open
//! while they are counted.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use super::{free_port, probe, run_under, tail, tool_installed, ChildGuard};

/// Which proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cutover,
    Nginx,
    Haproxy,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Cutover, Kind::Nginx, Kind::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Cutover => "cutover",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }
}

/// How the proxy is set up.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Worker threads (cutover `workers`, nginx `worker_processes`, HAProxy
    /// `nbthread`); 0 = one per core.
    pub workers: usize,
    /// cutover's `RUST_LOG`: `warn`, or `info` to include its access log.
    pub cutover_log: &'static str,
    /// cutover's `CUTOVER_RUNTIME` (`per-core` or `work-stealing`); `None`
    /// leaves cutover's default.
    pub cutover_runtime: Option<&'static str>,
    /// cutover's `[server] metrics` endpoint on (a loopback port of its own).
    pub cutover_metrics: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            workers: 1,
            cutover_log: "warn",
            cutover_runtime: None,
            cutover_metrics: false,
        }
    }
}

/// A started proxy; killed (with its worker processes) when dropped.
pub struct Running {
    pub kind: Kind,
    /// Plain HTTP/1.1 listener.
    pub http: SocketAddr,
    /// TLS listener (h2 and http/1.1 by ALPN).
    pub https: SocketAddr,
    /// cutover's metrics endpoint, when [`Options::cutover_metrics`] is on.
    pub metrics: Option<SocketAddr>,
    child: ChildGuard,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

impl Drop for Running {
    /// nginx with a master process: SIGTERM lets the master stop its
    /// workers (a SIGKILL to the master alone would orphan them).
    fn drop(&mut self) {
        if self.kind != Kind::Nginx {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The cutover binary cargo built for the bench (release settings), unless
/// `BENCH_CUTOVER_BIN` names another.
pub fn cutover_binary() -> PathBuf {
    std::env::var_os("BENCH_CUTOVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cutover")))
}

/// The dev certificate and key every proxy serves.
fn dev_cert() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev");
    (dir.join("localhost.pem"), dir.join("localhost-key.pem"))
}

/// Starts `kind` in `dir` in front of `origin`. A proxy that is not
/// installed, or fails to start, is an `Err` that says so (a table row).
pub fn start(
    kind: Kind,
    dir: &Path,
    origin: SocketAddr,
    options: Options,
) -> Result<Running, String> {
    start_under(kind, dir, origin, options, &[])
}

/// Like [`start`], with the proxy run by `wrapper` (a command and its
/// arguments, such as valgrind), or directly when it is empty.
pub fn start_under(
    kind: Kind,
    dir: &Path,
    origin: SocketAddr,
    options: Options,
    wrapper: &[OsString],
) -> Result<Running, String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
    let http = listen_addr();
    let https = listen_addr();
    let metrics = (kind == Kind::Cutover && options.cutover_metrics).then(listen_addr);
    let command = match kind {
        Kind::Cutover => cutover_command(dir, [http, https], metrics, origin, options)?,
        Kind::Nginx => nginx_command(dir, http, https, origin, options)?,
        Kind::Haproxy => haproxy_command(dir, http, https, origin, options)?,
    };
    // valgrind starts a program tens of times slower.
    let ready_within = Duration::from_secs(if wrapper.is_empty() { 10 } else { 60 });
    let command = run_under(command, wrapper);
    let log = dir.join(format!("{}.log", kind.name()));
    let mut child = spawn_logged(kind.name(), command, &log)?;
    wait_ready(http, &mut child, &log, ready_within)?;
    Ok(Running {
        kind,
        http,
        https,
        metrics,
        child,
    })
}

fn listen_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn write_config(dir: &Path, name: &str, text: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|err| format!("write {}: {err}", path.display()))?;
    Ok(path)
}

fn cutover_command(
    dir: &Path,
    [http, https]: [SocketAddr; 2],
    metrics: Option<SocketAddr>,
    origin: SocketAddr,
    options: Options,
) -> Result<Command, String> {
    let binary = cutover_binary();
    if !binary.exists() {
        return Err(format!("cutover binary {} not found", binary.display()));
    }
    let (cert, key) = dev_cert();
    let config = format!(
        "[server]\n\
         http = \"{http}\"\n\
         https = \"{https}\"\n\
         workers = {workers}\n\
         {metrics}\n\
         \n\
         [server.limits]\n\
         max_body_bytes = \"4GiB\"\n\
         header_read_timeout = \"300s\"\n\
         idle_timeout = \"300s\"\n\
         \n\
         [[tls]]\n\
         cert = \"{cert}\"\n\
         key = \"{key}\"\n\
         \n\
         [[site]]\n\
         hosts = [\"*\"]\n\
         service = \"up\"\n\
         \n\
         [service.up]\n\
         upstream = \"{origin}\"\n",
        workers = options.workers,
        metrics = metrics.map_or(String::new(), |addr| format!("metrics = \"{addr}\"")),
        cert = cert.display(),
        key = key.display(),
    );
    let path = write_config(dir, "proxy.toml", &config)?;
    let mut command = Command::new(binary);
    command
        .args(["serve", "--config"])
        .arg(path)
        .env("RUST_LOG", options.cutover_log);
    match options.cutover_runtime {
        Some(runtime) => command.env("CUTOVER_RUNTIME", runtime),
        None => command.env_remove("CUTOVER_RUNTIME"),
    };
    Ok(command)
}

fn nginx_command(
    dir: &Path,
    http: SocketAddr,
    https: SocketAddr,
    origin: SocketAddr,
    options: Options,
) -> Result<Command, String> {
    if !tool_installed("nginx") {
        return Err("not installed (apt-get install -y nginx)".to_string());
    }
    let (cert, key) = dev_cert();
    // One worker runs without a master (one process to measure); more
    // workers need the master.
    let (workers, master) = match options.workers {
        1 => ("1".to_string(), false),
        0 => ("auto".to_string(), true),
        n => (n.to_string(), true),
    };
    let config = NginxConfig {
        workers,
        master,
        tls: Some((https, cert, key)),
        streaming: true,
        ..NginxConfig::new(dir, http, origin)
    }
    .render();
    let path = write_config(dir, "nginx.conf", &config)?;
    let mut command = Command::new("nginx");
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(command)
}

/// The nginx reverse-proxy configuration every bench runs, with what the
/// benches vary as fields: one upstream with a keep-alive pool, keep-alive
/// clients without a request limit, no access log, temp paths in `dir`.
pub struct NginxConfig<'a> {
    pub dir: &'a Path,
    /// `worker_processes`: a count or `auto`.
    pub workers: String,
    /// `master_process`: off measures one process; a binary upgrade or a
    /// reload needs the master.
    pub master: bool,
    /// `daemon`: a master started with `daemon off` ignores `USR2` while
    /// its parent lives, so the binary-upgrade bench runs it daemonised.
    pub daemon: bool,
    pub listen: SocketAddr,
    /// A TLS listener (HTTP/2 and HTTP/1.1 by ALPN) with this certificate
    /// and key.
    pub tls: Option<(SocketAddr, PathBuf, PathBuf)>,
    pub upstream: SocketAddr,
    /// Bodies streamed both ways without a size limit (nginx buffers to
    /// disk by default), as cutover and HAProxy do.
    pub streaming: bool,
    pub error_log_level: &'static str,
    /// `worker_connections` and `worker_rlimit_nofile`.
    pub connections: u64,
}

impl<'a> NginxConfig<'a> {
    /// One worker under a master, in the foreground, plain HTTP only.
    pub fn new(dir: &'a Path, listen: SocketAddr, upstream: SocketAddr) -> NginxConfig<'a> {
        NginxConfig {
            dir,
            workers: "1".to_string(),
            master: true,
            daemon: false,
            listen,
            tls: None,
            upstream,
            streaming: false,
            error_log_level: "warn",
            connections: open_files_hard_limit().min(1 << 20),
        }
    }

    pub fn render(&self) -> String {
        let d = self.dir.display();
        let on_off = |on: bool| if on { "on" } else { "off" };
        let tls = self
            .tls
            .as_ref()
            .map_or(String::new(), |(addr, cert, key)| {
                format!(
                    "\x20       listen {addr} ssl http2;\n\
                 \x20       ssl_certificate {};\n\
                 \x20       ssl_certificate_key {};\n\
                 \x20       ssl_protocols TLSv1.2 TLSv1.3;\n",
                    cert.display(),
                    key.display()
                )
            });
        let (body_size, buffering) = if self.streaming {
            (
                "\x20   client_max_body_size 0;\n",
                "\x20           proxy_request_buffering off;\n\
                 \x20           proxy_buffering off;\n",
            )
        } else {
            ("", "")
        };
        format!(
            "worker_processes {workers};\n\
             master_process {master};\n\
             daemon {daemon};\n\
             user root;\n\
             worker_rlimit_nofile {connections};\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log {level};\n\
             events {{ worker_connections {connections}; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20   keepalive_timeout 300s;\n\
             {body_size}\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   upstream up {{\n\
             \x20       server {upstream};\n\
             \x20       keepalive 64;\n\
             \x20       keepalive_requests 1000000;\n\
             \x20   }}\n\
             \x20   server {{\n\
             \x20       listen {listen};\n\
             {tls}\
             \x20       location / {{\n\
             \x20           proxy_pass http://up;\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_set_header Connection \"\";\n\
             {buffering}\
             \x20       }}\n\
             \x20   }}\n\
             }}\n",
            workers = self.workers,
            master = on_off(self.master),
            daemon = on_off(self.daemon),
            connections = self.connections,
            level = self.error_log_level,
            upstream = self.upstream,
            listen = self.listen,
        )
    }
}

fn haproxy_command(
    dir: &Path,
    http: SocketAddr,
    https: SocketAddr,
    origin: SocketAddr,
    options: Options,
) -> Result<Command, String> {
    if !tool_installed("haproxy") {
        return Err("not installed (apt-get install -y haproxy)".to_string());
    }
    // HAProxy wants certificate and key in one file.
    let (cert, key) = dev_cert();
    let mut pem = std::fs::read(&cert).map_err(|err| format!("read {}: {err}", cert.display()))?;
    pem.extend(std::fs::read(&key).map_err(|err| format!("read {}: {err}", key.display()))?);
    let combined = dir.join("cert-and-key.pem");
    std::fs::write(&combined, pem).map_err(|err| format!("write cert: {err}"))?;
    let threads = match options.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let config = format!(
        "global\n\
         \x20   nbthread {threads}\n\
         \x20   maxconn 12000\n\
         \x20   no strict-limits\n\
         \x20   ulimit-n {nofile}\n\
         \x20   ssl-default-bind-options ssl-min-ver TLSv1.2\n\
         defaults\n\
         \x20   mode http\n\
         \x20   option http-keep-alive\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 300s\n\
         \x20   timeout server 300s\n\
         \x20   timeout http-keep-alive 300s\n\
         frontend bench\n\
         \x20   bind {http}\n\
         \x20   bind {https} ssl crt {combined} alpn h2,http/1.1\n\
         \x20   default_backend up\n\
         backend up\n\
         \x20   http-reuse always\n\
         \x20   server up {origin}\n",
        combined = combined.display(),
        nofile = open_files_hard_limit(),
    );
    let path = write_config(dir, "haproxy.cfg", &config)?;
    let mut command = Command::new("haproxy");
    command.arg("-db").arg("-f").arg(path);
    Ok(command)
}

/// The hard limit on open files this process (and so the proxy) may raise
/// its soft limit to. HAProxy refuses to start when asked to raise its limit
/// past it; given it as `ulimit-n`, it only warns that `maxconn` might not
/// fit (12,000 idle clients need no server sockets, so they do fit).
fn open_files_hard_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(4)?.parse().ok()
        })
        .unwrap_or(4096)
}

/// Spawns `command` with stdout and stderr in `log`.
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

/// Waits until `GET /` on `addr` answers 200, the child dies, or `within`
/// passes.
fn wait_ready(
    addr: SocketAddr,
    child: &mut ChildGuard,
    log: &Path,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        if let Some(exit) = child.exited() {
            return Err(format!("{exit}; log: {}", tail(log)));
        }
        match probe(addr) {
            Ok(status_line) if status_line.contains(" 200 ") => return Ok(()),
            Ok(status_line) => last = status_line,
            Err(err) => last = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} did not answer 200 within {within:?} (last: {last}); log: {}",
        child.name,
        tail(log)
    ))
}

/// A `/proc/PID/status` size field (`VmRSS`, `VmHWM`) in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}
