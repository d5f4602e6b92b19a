//! A real `cutover serve` subprocess, its CLI, and the docker CLI, for the
//! deploy controller tests.
//!
//! * [`Proxy`] runs `cutover serve --config <dir>/proxy.toml` as a child process
//!   (stdout and stderr go to `<dir>/proxy.log`), waits until its HTTP listener
//!   and admin socket answer, can be SIGKILLed and restarted, and is always
//!   killed when dropped (its log tail is printed if the test is failing).
//! * [`cli`] runs one `cutover` client command with a time limit.
//! * [`containers`] lists a service's managed containers through `docker ps`;
//!   [`DockerCleanup`] removes them, and a test's images, when dropped.
//! * [`get_version`] / [`KeepAlive`]: HTTP/1.1 clients that report which app
//!   version answered (`x-app-version`).
//!
//! Every wait is bounded.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The cutover binary cargo built for this test run.
pub const CUTOVER: &str = env!("CARGO_BIN_EXE_cutover");

/// Longest a single HTTP request in these tests may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A loopback port nothing listens on right now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

// ---------------------------------------------------------------------------
// The proxy subprocess
// ---------------------------------------------------------------------------

pub struct Proxy {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub http: SocketAddr,
    pub admin_socket: PathBuf,
    /// Extra environment for the next `spawn` (e.g. a dead DOCKER_HOST).
    pub env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proxy {
    /// Writes `config_text` to `<dir>/proxy.toml` and starts `cutover serve` on
    /// it. `http` must be the `[server] http` address of the config, and the
    /// config's `admin_socket` must be `<dir>/admin.sock`.
    pub async fn start(dir: &Path, config_text: &str, http: SocketAddr) -> Proxy {
        Proxy::start_with_env(dir, config_text, http, Vec::new()).await
    }

    /// [`Proxy::start`] with extra environment for the server process.
    pub async fn start_with_env(
        dir: &Path,
        config_text: &str,
        http: SocketAddr,
        env: Vec<(String, String)>,
    ) -> Proxy {
        let config = dir.join("proxy.toml");
        std::fs::write(&config, config_text).expect("write proxy.toml");
        let mut proxy = Proxy {
            dir: dir.to_path_buf(),
            config,
            http,
            admin_socket: dir.join("admin.sock"),
            env,
            log: dir.join("proxy.log"),
            child: None,
        };
        proxy.spawn().await;
        proxy
    }

    /// Starts the server process (again) and waits until it is ready.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "proxy already running");
        // A killed server leaves its socket file behind; without it gone,
        // "ready" would be seen before the new server has reconciled and
        // bound its admin socket.
        let _ = std::fs::remove_file(&self.admin_socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open proxy log");
        let child = Command::new(CUTOVER)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn cutover serve");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Waits (bounded) until the admin socket exists and the HTTP port accepts.
    async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "cutover serve exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            if self.admin_socket.exists() && TcpStream::connect(self.http).await.is_ok() {
                return;
            }
            if start.elapsed() > Duration::from_secs(15) {
                panic!("cutover serve not ready after 15 s:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no graceful anything, as a crash or OOM kill would be.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on Unix
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful shutdown), then waits up to `limit` for the exit.
    /// Returns the exit status, or `None` if it was still running (then it
    /// is SIGKILLed).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a client subcommand against this server (`--config` appended).
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        let mut all: Vec<&str> = args.to_vec();
        let config = self.config.to_str().expect("utf-8 path");
        all.extend(["--config", config]);
        cli(&all, Duration::from_secs(120)).await
    }

    /// `cutover status SERVICE --json`, the typed report.
    pub async fn status(&self, service: &str) -> cutover::admin::proto::StatusReport {
        self.status_of(&["status", service, "--json"]).await
    }

    /// `cutover status --json`: every service, the engine, certificates.
    pub async fn status_all(&self) -> cutover::admin::proto::StatusReport {
        self.status_of(&["status", "--json"]).await
    }

    async fn status_of(&self, args: &[&str]) -> cutover::admin::proto::StatusReport {
        let out = self.cli(args).await;
        assert!(out.success(), "status failed: {out}");
        let last = out
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("status printed nothing: {out}"));
        let reply: cutover::admin::Reply =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("status reply {last:?}: {e}"));
        let cutover::admin::Reply::Ok { result } = reply else {
            panic!("status did not answer ok: {out}");
        };
        serde_json::from_value(result)
            .unwrap_or_else(|e| panic!("status result is not a StatusReport ({e}): {out}"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- last {} lines of {} ----\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------

/// What a `cutover` client command did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub args: Vec<String>,
    /// `None` when killed by a signal or by the time limit.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout and stderr together, for "the output mentions X" checks.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`cutover {}` exit {:?} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cutover ARGS...`, killing it after `limit`.
pub async fn cli(args: &[&str], limit: Duration) -> CliOutput {
    let start = Instant::now();
    let child = tokio::process::Command::new(CUTOVER)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cutover client");
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`cutover {}` still running after {limit:?}", args.join(" ")))
        .expect("wait for cutover client");
    CliOutput {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// Docker, through its CLI
// ---------------------------------------------------------------------------

/// One managed container as `docker ps -a` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctr {
    pub id: String,
    pub name: String,
    /// `created`, `running`, `exited`, ...
    pub state: String,
    pub color: String,
    /// The `cutover.image` label: the reference the deploy was given.
    pub image: String,
    pub deploy: String,
    /// The `cutover.instance` label: which cutover started it.
    pub instance: String,
}

impl Ctr {
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// Runs the docker CLI (against the real engine); panics on failure.
pub fn docker(args: &[&str]) -> String {
    docker_try(args).unwrap_or_else(|err| panic!("{err}"))
}

/// Runs the docker CLI; never panics (usable from `Drop`).
fn docker_try(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn service_filter(service: &str) -> String {
    format!("label=cutover.service={service}")
}

/// Every container (any state) labelled `cutover.managed=true` and
/// `cutover.service=SERVICE`.
pub fn containers(service: &str) -> Vec<Ctr> {
    let format = "{{.ID}}\t{{.Names}}\t{{.State}}\t{{.Label \"cutover.color\"}}\t\
                  {{.Label \"cutover.image\"}}\t{{.Label \"cutover.deploy\"}}\t\
                  {{.Label \"cutover.instance\"}}";
    docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        "label=cutover.managed=true",
        "--filter",
        &service_filter(service),
        "--format",
        format,
    ])
    .lines()
    .filter(|l| !l.trim().is_empty())
    .map(|line| {
        let f: Vec<&str> = line.split('\t').collect();
        let get = |i: usize| f.get(i).unwrap_or(&"").to_string();
        Ctr {
            id: get(0),
            name: get(1),
            state: get(2),
            color: get(3),
            image: get(4),
            deploy: get(5),
            instance: get(6),
        }
    })
    .collect()
}

/// `docker ps -a` of the service as a table, for failure messages and reports.
pub fn ps_table(service: &str) -> String {
    docker_try(&[
        "ps",
        "-a",
        "--filter",
        "label=cutover.managed=true",
        "--filter",
        &service_filter(service),
        "--format",
        "table {{.ID}}\t{{.Names}}\t{{.Status}}\t{{.Ports}}\t{{.Label \"cutover.color\"}}\t{{.Label \"cutover.image\"}}\t{{.Label \"cutover.instance\"}}",
    ])
    .unwrap_or_else(|err| err)
}

/// Polls [`containers`] until `done` holds, for at most `limit`. Returns the
/// last listing and whether `done` held.
pub async fn wait_containers(
    service: &str,
    limit: Duration,
    done: impl Fn(&[Ctr]) -> bool,
) -> (Vec<Ctr>, bool) {
    let start = Instant::now();
    loop {
        let now = containers(service);
        if done(&now) {
            return (now, true);
        }
        if start.elapsed() > limit {
            return (now, false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes, when dropped, every container of `service` and every image of the
/// repository `repo` (all tags). Also removes leftovers of an earlier run
/// when created.
pub struct DockerCleanup {
    pub service: String,
    pub repo: String,
}

impl DockerCleanup {
    pub fn new(service: &str, repo: &str) -> DockerCleanup {
        let cleanup = DockerCleanup {
            service: service.to_string(),
            repo: repo.to_string(),
        };
        cleanup.run();
        cleanup
    }

    fn run(&self) {
        let quiet = |args: &[&str]| docker_try(args).unwrap_or_default();
        let ids = quiet(&["ps", "-aq", "--filter", &service_filter(&self.service)]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            quiet(&args);
        }
        let images = quiet(&["images", "--format", "{{.Repository}}:{{.Tag}}", &self.repo]);
        let images: Vec<&str> = images.split_whitespace().collect();
        if !images.is_empty() {
            let mut args = vec!["rmi", "-f"];
            args.extend(images);
            quiet(&args);
        }
    }
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- docker ps -a for service {} at failure ----\n{}",
                self.service,
                ps_table(&self.service)
            );
        }
        self.run();
    }
}

// ---------------------------------------------------------------------------
// HTTP clients
// ---------------------------------------------------------------------------

/// One answer through the proxy: status and the app version that sent it
/// (`x-app-version`, `-` when absent, e.g. a 503 from the proxy itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub version: String,
    pub body: String,
}

fn get_request(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

async fn read_answer(response: hyper::Response<hyper::body::Incoming>) -> Result<Answer, String> {
    let status = response.status().as_u16();
    let version = response
        .headers()
        .get("x-app-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status,
        version,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// GET `path` on a fresh connection; errors are returned, not panicked on.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Answer, String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let response = sender
            .send_request(get_request(path))
            .await
            .map_err(|e| format!("request: {e}"))?;
        read_answer(response).await
    };
    tokio::time::timeout(HTTP_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("GET {path} timed out"))?
}

/// Polls `GET /` until it answers 200 from `version`, for at most `limit`.
pub async fn wait_for_version(addr: SocketAddr, version: &str, limit: Duration) -> Answer {
    let start = Instant::now();
    loop {
        let answer = get(addr, "/").await;
        match &answer {
            Ok(a) if a.status == 200 && a.version == version => return a.clone(),
            _ if start.elapsed() > limit => {
                panic!("GET / never answered 200 from {version} within {limit:?}; last: {answer:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A keep-alive HTTP/1.1 connection sending requests one after another.
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> Result<KeepAlive, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(KeepAlive { sender })
    }

    pub async fn get(&mut self, path: &str) -> Result<Answer, String> {
        let attempt = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
            let response = self
                .sender
                .send_request(get_request(path))
                .await
                .map_err(|e| format!("request: {e}"))?;
            read_answer(response).await
        };
        tokio::time::timeout(HTTP_TIMEOUT, attempt)
            .await
            .map_err(|_| format!("GET {path} timed out"))?
    }
}
