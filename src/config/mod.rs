//! proxy.toml: the raw serde types, their validation, and the one immutable
//! [`Config`] the rest of the proxy reads.
//!
//! Parsing happens in two passes. The first is serde: unknown keys and badly
//! typed or badly formatted values (durations, sizes, addresses) fail there,
//! and the TOML deserializer tells us exactly where; `recover` keeps going
//! past each such error, so one run finds them all. The second pass checks
//! what serde cannot (a route naming a service that does not exist, a site
//! with two actions) on the valid rest. Every problem is anchored to a
//! `file:line:column`, so `cutover check` can list them all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod acme;
mod keys;
mod recover;

pub use acme::{AcmeSettings, ChallengeKind, FIRST_RETRY_DELAY, MAX_RETRY_DELAY};
pub use keys::Section;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

/// A validated configuration. Built once per (re)load and then shared
/// read-only; a reload builds a whole new one.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config was read from, if any; relative paths inside the
    /// file were resolved against its directory, and hot reload watches it.
    pub source: Option<PathBuf>,
    pub server: ServerConfig,
    pub tls: Vec<TlsFiles>,
    pub sites: Vec<Site>,
    pub services: BTreeMap<String, Service>,
    /// Automatic certificates: set when some site has `tls = "acme"`.
    pub acme: Option<AcmeSettings>,
}

impl Config {
    /// The names that get automatic certificates, each once, in file order.
    pub fn acme_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for host in self
            .sites
            .iter()
            .filter(|site| site.acme)
            .flat_map(|site| &site.hosts)
        {
            if !names.contains(host) {
                names.push(host.clone());
            }
        }
        names
    }
}

/// `[server]`: listeners, admin socket, state, limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Plain-HTTP listen address (redirects and plain sites).
    pub http: Option<SocketAddr>,
    /// TLS listen address.
    pub https: Option<SocketAddr>,
    /// Unix socket the CLI talks to.
    pub admin_socket: Option<PathBuf>,
    /// Group allowed to use the admin socket (mode 0660 instead of 0600).
    /// Anyone who can write to the socket can deploy.
    pub admin_group: Option<String>,
    /// Where the state file lives. Required when a service runs
    /// containers: the state file is what tells a restarted cutover which
    /// container serves.
    pub state_dir: Option<PathBuf>,
    /// This cutover's name on the Docker engine: every container it starts
    /// is labelled with it, and it only ever touches containers so labelled
    /// (see `control::identity`). `None`: derived from `state_dir`.
    pub instance: Option<String>,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Peers whose `X-Forwarded-For` we extend instead of replacing.
    pub trusted_proxies: Vec<IpNet>,
    /// Where the access log goes, and in which form.
    pub access_log: AccessLogMode,
    /// Where the Prometheus endpoint (`GET /metrics`) listens; `None`
    /// (the default) serves no metrics and records none per request. Its
    /// own listener, never one of the proxy's, so a scrape endpoint is
    /// public only if this address is.
    pub metrics: Option<SocketAddr>,
    pub limits: Limits,
}

/// `[server] access_log`: one line per request, in the log as a `tracing`
/// event (the default, filtered by `RUST_LOG`), as JSON lines, or off.
/// JSON lines are formatted on a writer thread of their own, off the
/// request path (see `proxy::access_log`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogMode {
    /// `"log"`: an INFO event on the `cutover::access` target.
    #[default]
    Log,
    /// `"off"`: nothing is recorded per request.
    Off,
    /// `"json"`: JSON lines to stderr.
    JsonStderr,
    /// A file path: JSON lines appended to that file, reopened on reload.
    JsonFile(PathBuf),
}

impl AccessLogMode {
    /// Whether requests are recorded as JSON lines (stderr or a file).
    pub fn is_json(&self) -> bool {
        matches!(self, AccessLogMode::JsonStderr | AccessLogMode::JsonFile(_))
    }
}

/// Timeouts and size limits. Defaults follow nginx where nginx has one,
/// tightened where nginx's is known to be too loose for an edge proxy.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to send a complete request head (nginx: 60s).
    /// hyper also runs this timer while an HTTP/1.1 keep-alive connection
    /// waits for its next request, so it is that connection's idle limit.
    pub header_read_timeout: Duration,
    /// A connection on which no request has started for this long is
    /// closed gracefully (HTTP/2 GOAWAY; HTTP/1 close). Requests in
    /// progress are never cut by it.
    pub idle_timeout: Duration,
    /// An HTTP/1.1 connection with no request in progress for this long is
    /// parked: hyper's buffers and state are dropped until its next byte
    /// arrives (see `proxy::h1`). Zero: never park.
    pub park_after: Duration,
    /// Largest request head accepted; larger gets 431. Also HTTP/2's
    /// SETTINGS_MAX_HEADER_LIST_SIZE (one knob for both protocols).
    pub max_header_bytes: usize,
    /// Longest request target (path and query) accepted; longer gets 414.
    /// hyper's own ceiling is 64 KiB; nginx and most origins stop at 8 KiB.
    pub max_uri_bytes: usize,
    /// Largest request body accepted; larger gets 413 (nginx: 1 MiB).
    pub max_body_bytes: u64,
    /// Longest gap between two reads of a request body before the request
    /// is failed with 408 (nginx's client_body_timeout).
    pub body_timeout: Duration,
    /// Slowest average request-body rate, in bytes per second, once
    /// `body_rate_grace` has passed; slower bodies get 408 and the
    /// connection is closed. `body_timeout` alone cannot stop a client that
    /// sends one byte just before each timeout. 0 turns the check off.
    pub body_min_rate: u64,
    /// How long a request body may take before `body_min_rate` applies
    /// (Apache mod_reqtimeout's `body=20,MinRate=500` model: the allowed
    /// time is this grace plus one second per `body_min_rate` bytes).
    pub body_rate_grace: Duration,
    /// Longest a write to a client may make no progress (the client does
    /// not read, or its window is zero) before the connection is closed
    /// (nginx's send_timeout). hyper has no write timeout of its own.
    pub send_timeout: Duration,
    /// Most client connections open at once; further accepts wait.
    pub max_connections: usize,
    /// Time to establish a TCP connection to an upstream (then 502).
    pub upstream_connect_timeout: Duration,
    /// Longest an upstream connection may move no byte while a request
    /// waits on it: no response head by then is a 504, a stalled body is
    /// cut (see `slowio`).
    pub upstream_timeout: Duration,
    /// Time a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Most concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may open and reset before we accept them
    /// ("Rapid Reset", CVE-2023-44487); past it the connection gets GOAWAY.
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams we may reset for the client's protocol errors before
    /// the connection gets GOAWAY (RUSTSEC-2024-0003's "MadeYouReset").
    pub h2_max_local_error_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            park_after: Duration::from_secs(1),
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            body_timeout: Duration::from_secs(30),
            body_min_rate: 500,
            body_rate_grace: Duration::from_secs(20),
            send_timeout: Duration::from_secs(60),
            max_connections: 25_000,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            h2_max_concurrent_streams: 128,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

/// One `[[tls]]` certificate chain and key, by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One `[[site]]`: a set of host names and what to do with their requests.
#[derive(Debug, Clone)]
pub struct Site {
    /// Exact names, `*.suffix` wildcards, or `*` for the catch-all site.
    pub hosts: Vec<String>,
    /// Answer plain-HTTP requests with 301 to https.
    pub https_redirect: bool,
    /// `Strict-Transport-Security` value to add on HTTPS responses.
    pub hsts: Option<String>,
    /// `tls = "acme"`: certificates for these hosts are issued and renewed
    /// automatically.
    pub acme: bool,
    /// Routes, longest prefix first.
    pub routes: Vec<Route>,
}

/// One path prefix and its action.
#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub action: Action,
}

/// What a route does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to the named service's active upstream.
    Service(String),
    /// Serve one static file.
    File(PathBuf),
    /// Serve files under this directory, the whole request path looked up
    /// under it as nginx's `root` does (GET/HEAD, no listing, nothing
    /// outside it): `certbot --webroot` answers its challenges this way.
    Dir(PathBuf),
    /// Redirect to this URL with this status.
    Redirect { to: String, code: u16 },
    /// Answer with this status and an empty body.
    Status(u16),
}

/// `[service.NAME]`.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    /// The upstream that serves when nothing else (state file, a switch) says otherwise.
    pub upstream: Option<SocketAddr>,
    /// How a new upstream proves it is ready before traffic moves to it.
    pub health: HealthCheck,
    /// How long a switch waits for the old upstream's in-flight requests.
    pub drain_timeout: Duration,
    /// How long WebSocket tunnels to the old upstream may stay open after
    /// the drain before they are closed.
    pub websocket_grace: Duration,
    /// Longest a request waits while the service is paused; then 503.
    pub pause_timeout: Duration,
    /// Present when the deploy controller runs this service as containers.
    pub container: Option<ContainerSettings>,
    /// The bake window after a deploy, a canary or a promote: `None`
    /// judges nothing (the deploy ends at the switch, as before).
    pub bake: Option<BakeSettings>,
    /// A stepped rollout (`bake = { steps = [...] }`): a plain `deploy`
    /// goes through these canary shares, each judged for its interval.
    pub steps: Option<Steps>,
}

/// `bake = { steps = ["10%", "50%", "100%"], step_interval = "2m" }`:
/// the canary shares a deploy goes through, each judged by the bake
/// thresholds for `interval` before the next; a last step of 100% is a
/// promote (then the switch's own window).
#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    /// Ascending shares in basis points; only the last may be 10_000.
    pub shares: Vec<u32>,
    /// How long each step below 100% is judged.
    pub interval: Duration,
}

/// Most steps a rollout may list: a handful is what rollouts use.
const MAX_STEPS: usize = 10;

/// `bake = { window = "2m", max_error_rate = "1%", min_requests = 200,
/// max_p99 = "800ms" }`: what the new colour must keep to while it is
/// judged, or traffic goes back to the warm previous colour at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BakeSettings {
    /// How long the new colour is judged after a full switch, and how long
    /// `deploy --canary` stays attached judging the canary.
    pub window: Duration,
    /// Largest share of 5xx answers (0..=1) tolerated.
    pub max_error_rate: f64,
    /// Answers needed before anything is judged: a handful of requests
    /// says nothing about a rate.
    pub min_requests: u64,
    /// Largest p99 latency tolerated, when set.
    pub max_p99: Option<Duration>,
}

/// How the deploy controller runs a service's containers.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSettings {
    /// Repository used by `deploy --tag TAG`.
    pub image: String,
    /// The port the app listens on inside the container.
    pub port: u16,
    /// Fixed host ports for [blue, green]; `None` = ephemeral ports.
    pub host_ports: Option<[u16; 2]>,
    /// Environment set in the container.
    pub env: BTreeMap<String, String>,
    /// `KEY=VALUE` file read at each deploy (secrets stay out of proxy.toml).
    pub env_file: Option<PathBuf>,
    /// Bind mounts, `host:container[:ro]`.
    pub volumes: Vec<String>,
    /// `/etc/hosts` entries, e.g. `host.docker.internal:host-gateway`.
    pub extra_hosts: Vec<String>,
    /// Grace between SIGTERM and SIGKILL when stopping a container.
    pub stop_timeout: Duration,
    /// How long the previous colour stays running for an instant rollback.
    pub keep_previous: Duration,
    /// How many previously deployed images are kept locally for rollback.
    pub retain: usize,
    /// Docker config.json with registry credentials for pulls.
    pub docker_config: Option<PathBuf>,
}

/// An HTTP health probe and its thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// Path probed with GET (with `Host: localhost`).
    pub path: String,
    /// Status a healthy answer has.
    pub expect_status: u16,
    /// JSON fields (dotted paths) that must equal these values, e.g.
    /// Spring's `status = "UP"`.
    pub expect_json: Vec<(String, serde_json::Value)>,
    /// Pause between probes.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive healthy answers needed.
    pub healthy_after: u32,
    /// Overall time allowed to become healthy.
    pub deadline: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/".into(),
            expect_status: 200,
            expect_json: Vec::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            healthy_after: 1,
            deadline: Duration::from_secs(60),
        }
    }
}

/// Everything wrong with a config file, each problem located.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One problem: where, what, and (when we know one) how to fix it.
#[derive(Debug, Clone)]
pub struct Problem {
    pub file: String,
    /// 1-based line and column; 0 when the problem has no location (I/O).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Everything one read of a config file found: what `cutover check`
/// reports, and what [`Config::load`] and [`Config::parse`] boil down to.
#[derive(Debug)]
pub struct Parsed {
    /// Built from the valid part of the file (entries with problems left
    /// out); `None` when the file could not be read or is not TOML. Only
    /// fit to serve when `problems` is empty.
    pub config: Option<Config>,
    /// Every problem, in file order.
    pub problems: Vec<Problem>,
    /// The files the config names, with where, for checks that look past
    /// the config itself (a missing certificate, a missing route file); in
    /// config order, so the n-th "certificate" is that of `config.tls[n]`.
    pub files: Vec<NamedFile>,
}

/// A file a config names and the place that names it.
#[derive(Debug, Clone)]
pub struct NamedFile {
    /// What the file is for: "certificate", "private key", "route file",
    /// "env_file", "docker_config", "ca_root".
    pub role: &'static str,
    /// The path as resolved against the config file's directory.
    pub path: PathBuf,
    /// Where the path was written: a problem with no message yet.
    at: Problem,
}

impl NamedFile {
    /// A problem about this file, located where the config names it.
    pub fn problem(&self, message: String) -> Problem {
        Problem {
            message,
            ..self.at.clone()
        }
    }
}

impl Parsed {
    fn into_result(self) -> Result<Config, ConfigError> {
        match self.config {
            Some(config) if self.problems.is_empty() => Ok(config),
            _ => Err(ConfigError {
                problems: self.problems,
            }),
        }
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths inside it are
    /// resolved against the file's directory, so a config works whatever
    /// the current directory of the process is.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_all(path).into_result()
    }

    /// Parses and validates config text; `file` names it in errors and
    /// `base` anchors relative paths.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::parse_all(text, file, base).into_result()
    }

    /// Like [`Config::load`], but keeps going past problems: every one is
    /// listed, and the valid rest is returned for further checks.
    pub fn load_all(path: &Path) -> Parsed {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => {
                return Parsed {
                    config: None,
                    problems: vec![Problem {
                        file: path.display().to_string(),
                        line: 0,
                        column: 0,
                        message: format!("cannot read config: {err}"),
                    }],
                    files: Vec::new(),
                }
            }
        };
        // Absolute, so paths in messages and logs say where they point even
        // for `--config proxy.toml` (whose parent is "").
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = absolute.parent().unwrap_or(Path::new("."));
        let mut parsed = Config::parse_all(&text, &path.display().to_string(), base);
        if let Some(config) = &mut parsed.config {
            config.source = Some(path.to_path_buf());
        }
        parsed
    }

    /// Like [`Config::parse`], but keeps going past problems.
    pub fn parse_all(text: &str, file: &str, base: &Path) -> Parsed {
        let locate = Locator::new(text, file);
        let (raw, mut problems) = recover::deserialize_all::<RawConfig>(text, &locate);
        let Some(raw) = raw else {
            return Parsed {
                config: None,
                problems,
                files: Vec::new(),
            };
        };
        let mut validator = Validator::new(&locate, base);
        let config = validator.validate(raw);
        problems.append(&mut validator.problems);
        problems.sort_by_key(|problem| (problem.line, problem.column));
        Parsed {
            config: Some(config),
            problems,
            files: validator.files,
        }
    }
}

/// Turns byte offsets into `file:line:column`.
struct Locator<'a> {
    text: &'a str,
    file: &'a str,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str, file: &'a str) -> Self {
        Locator { text, file }
    }

    fn problem(&self, span: Option<Range<usize>>, message: String) -> Problem {
        let (line, column) = match span {
            Some(span) => self.line_column(span.start),
            None => (0, 0),
        };
        Problem {
            file: self.file.to_string(),
            line,
            column,
            message,
        }
    }

    fn line_column(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .map_or(0, |tail| tail.chars().count())
            + 1;
        (line, column)
    }
}

// ---------------------------------------------------------------------------
// Raw serde types: exactly the file's shape, unknown keys rejected.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    tls: Vec<RawTls>,
    #[serde(default)]
    site: Vec<Spanned<RawSite>>,
    #[serde(default)]
    service: BTreeMap<String, Spanned<RawService>>,
    acme: Option<Spanned<acme::RawAcme>>,
    /// `[fleet]`: the hosts `cutover rollout` deploys to. The server
    /// ignores it; `fleet::hosts` reads it and `cutover check` validates
    /// it, so one proxy.toml can describe its fleet too.
    #[serde(default, rename = "fleet")]
    _fleet: Option<de::IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawServer {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    admin_socket: Option<PathBuf>,
    admin_group: Option<Spanned<String>>,
    state_dir: Option<PathBuf>,
    instance: Option<Spanned<String>>,
    workers: Option<usize>,
    shutdown_timeout: Option<DurationValue>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    access_log: Option<Spanned<String>>,
    metrics: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawLimits {
    header_read_timeout: Option<DurationValue>,
    idle_timeout: Option<DurationValue>,
    park_after: Option<DurationValue>,
    max_header_bytes: Option<SizeValue>,
    max_uri_bytes: Option<Spanned<SizeValue>>,
    max_body_bytes: Option<SizeValue>,
    body_timeout: Option<DurationValue>,
    body_min_rate: Option<RateValue>,
    body_rate_grace: Option<DurationValue>,
    send_timeout: Option<DurationValue>,
    max_connections: Option<usize>,
    upstream_connect_timeout: Option<DurationValue>,
    upstream_timeout: Option<DurationValue>,
    tls_handshake_timeout: Option<DurationValue>,
    h2_max_concurrent_streams: Option<u32>,
    h2_max_pending_accept_reset_streams: Option<usize>,
    h2_max_local_error_reset_streams: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawTls {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawSite {
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    https_redirect: bool,
    hsts: Option<HstsValue>,
    tls: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawRoute {
    path: Spanned<String>,
    service: Option<Spanned<String>>,
    file: Option<Spanned<PathBuf>>,
    dir: Option<PathBuf>,
    redirect: Option<String>,
    /// With `redirect`: 301 (default), 302, 307 or 308.
    code: Option<u16>,
    status: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawService {
    upstream: Option<SocketAddr>,
    health: Option<Spanned<RawHealth>>,
    drain_timeout: Option<DurationValue>,
    websocket_grace: Option<DurationValue>,
    pause_timeout: Option<DurationValue>,
    image: Option<String>,
    port: Option<u16>,
    host_ports: Option<Spanned<Vec<u16>>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    env_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    extra_hosts: Vec<String>,
    stop_timeout: Option<DurationValue>,
    keep_previous: Option<DurationValue>,
    retain: Option<usize>,
    docker_config: Option<Spanned<PathBuf>>,
    bake: Option<Spanned<RawBake>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawBake {
    window: Option<DurationValue>,
    max_error_rate: Option<String>,
    min_requests: Option<u64>,
    max_p99: Option<DurationValue>,
    #[serde(default)]
    steps: Vec<String>,
    step_interval: Option<DurationValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawHealth {
    path: Option<String>,
    expect_status: Option<u16>,
    expect_json: Option<BTreeMap<String, toml::Value>>,
    interval: Option<DurationValue>,
    timeout: Option<DurationValue>,
    healthy_after: Option<u32>,
    deadline: Option<DurationValue>,
}

/// `hsts = true` (a one-year max-age) or the header's literal value.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "expected true, false, or a Strict-Transport-Security value such as \"max-age=31536000\""
)]
enum HstsValue {
    Enabled(bool),
    Header(String),
}

/// A duration written as a string: `"500ms"`, `"30s"`, `"15m"`, `"2h"`.
#[derive(Debug, Clone, Copy)]
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(DurationValue)
            .map_err(de::Error::custom)
    }
}

/// A size: a plain number of bytes, or a string like `"16KiB"`, `"10MiB"`.
#[derive(Debug, Clone, Copy)]
struct SizeValue(u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "expected a size such as 16384, \"16KiB\" or \"10MiB\""
        )]
        enum Either {
            Number(u64),
            Text(String),
        }
        match Either::deserialize(deserializer)? {
            Either::Number(n) => Ok(SizeValue(n)),
            Either::Text(text) => parse_size(&text).map(SizeValue).map_err(de::Error::custom),
        }
    }
}

/// A rate in bytes per second: a plain number, or a size with an optional
/// `/s`, like `"1KiB/s"`.
#[derive(Debug, Clone, Copy)]
struct RateValue(u64);

impl<'de> Deserialize<'de> for RateValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "expected a rate such as 500 or \"1KiB/s\"")]
        enum Either {
            Number(u64),
            Text(String),
        }
        match Either::deserialize(deserializer)? {
            Either::Number(n) => Ok(RateValue(n)),
            Either::Text(text) => parse_rate(&text).map(RateValue).map_err(de::Error::custom),
        }
    }
}

/// Parses `"500"`, `"500B/s"`, `"1KiB/s"`, `"1KiB"` into bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let size = text.trim();
    let size = size.strip_suffix("/s").unwrap_or(size);
    parse_size(size).map_err(|_| {
        format!("invalid rate {text:?}; expected bytes per second such as 500 or \"1KiB/s\"")
    })
}

/// Parses a share written `"1%"`, `"0.5%"` or `"10"` (percent either way)
/// into a fraction 0..=1.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    let number = trimmed.strip_suffix('%').unwrap_or(trimmed).trim();
    match number.parse::<f64>() {
        Ok(value) if (0.0..=100.0).contains(&value) => Ok(value / 100.0),
        _ => Err(format!(
            "invalid percentage {text:?}; expected a share such as \"1%\" or \"0.5%\" (0 to 100)"
        )),
    }
}

/// Parses `"500ms"`, `"30s"`, `"15m"`, `"2h"`, `"1d"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let hint = "expected a duration such as \"500ms\", \"30s\", \"15m\" or \"2h\"";
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("invalid duration {text:?}: missing unit; {hint}"))?;
    let (number, unit) = trimmed.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}; {hint}"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("invalid duration unit in {text:?}; {hint}")),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

/// Parses `"512"`, `"16KiB"`, `"10MiB"`, `"1GiB"` (also `k`, `KB`, `M`, `MB`…,
/// all binary multiples, as nginx reads them).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let hint = "expected a size such as 16384, \"16KiB\" or \"10MiB\"";
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}; {hint}"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit in {text:?}; {hint}")),
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

// ---------------------------------------------------------------------------
// Second pass: cross-field validation, collecting every problem.
// ---------------------------------------------------------------------------

/// A literal `Strict-Transport-Security` value must be sendable as a header
/// and carry the one directive browsers require (RFC 6797 section 6.1), so a
/// typo fails at load time instead of silently sending nothing.
fn check_hsts(value: &str) -> Result<(), String> {
    let printable = value.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    let max_age = value.split(';').any(|directive| {
        directive
            .trim()
            .to_ascii_lowercase()
            .strip_prefix("max-age=")
            .is_some_and(|age| {
                let age = age.trim_matches('"');
                !age.is_empty() && age.bytes().all(|b| b.is_ascii_digit())
            })
    });
    if printable && max_age {
        Ok(())
    } else {
        Err(format!(
            "invalid hsts {value:?}: expected true, false, or a Strict-Transport-Security \
             value such as \"max-age=63072000; includeSubDomains\""
        ))
    }
}

/// A site's host names with where each was written.
type HostSpans = Vec<(String, Range<usize>)>;

struct Validator<'a> {
    locate: &'a Locator<'a>,
    base: &'a Path,
    problems: Vec<Problem>,
    /// Every file path met, for [`Parsed::files`].
    files: Vec<NamedFile>,
    /// Whether `[server] state_dir` is set (container services need it).
    has_state_dir: bool,
}

impl<'a> Validator<'a> {
    fn new(locate: &'a Locator<'a>, base: &'a Path) -> Self {
        Validator {
            locate,
            base,
            problems: Vec::new(),
            files: Vec::new(),
            has_state_dir: false,
        }
    }

    fn report(&mut self, span: Range<usize>, message: String) {
        let problem = self.locate.problem(Some(span), message);
        self.problems.push(problem);
    }

    fn resolve(&self, path: PathBuf) -> PathBuf {
        if path.is_absolute() {
            path
        } else {
            self.base.join(path)
        }
    }

    /// Resolves a path to a file the config needs, and notes where it was
    /// written so `cutover check` can point there if the file is missing.
    fn named_file(&mut self, role: &'static str, path: Spanned<PathBuf>) -> PathBuf {
        let at = self.locate.problem(Some(path.span()), String::new());
        let path = self.resolve(path.into_inner());
        self.files.push(NamedFile {
            role,
            path: path.clone(),
            at,
        });
        path
    }

    /// The config built from `raw`; problems go to `self.problems`.
    fn validate(&mut self, raw: RawConfig) -> Config {
        self.has_state_dir = raw.server.state_dir.is_some();
        let services = self.services(raw.service);
        let server = self.server(raw.server);
        let tls = raw
            .tls
            .into_iter()
            .map(|t| TlsFiles {
                cert: self.named_file("certificate", t.cert),
                key: self.named_file("private key", t.key),
            })
            .collect();
        let sites = raw
            .site
            .into_iter()
            .map(|site| self.site(site, &services))
            .collect::<Vec<_>>();
        self.check_duplicate_hosts(&sites);
        let sites: Vec<Site> = sites.into_iter().map(|(site, _)| site).collect();
        let acme = self.acme(raw.acme, &sites, server.state_dir.as_ref());
        Config {
            source: None,
            server,
            tls,
            sites,
            services,
            acme,
        }
    }

    fn services(
        &mut self,
        raw: BTreeMap<String, Spanned<RawService>>,
    ) -> BTreeMap<String, Service> {
        let mut services = BTreeMap::new();
        for (name, spanned) in raw {
            let span = spanned.span();
            if !valid_service_name(&name) {
                self.report(
                    span.clone(),
                    format!("invalid service name {name:?}: use letters, digits, '-' and '_'"),
                );
            }
            let mut raw = spanned.into_inner();
            let container = self.container(&name, &mut raw, span);
            let health = raw
                .health
                .map(|health| self.health(health))
                .unwrap_or_default();
            let bake_span = raw.bake.as_ref().map(Spanned::span);
            let (bake, steps) = match raw.bake.take().map(|bake| self.bake(bake)) {
                Some((bake, steps)) => (Some(bake), steps),
                None => (None, None),
            };
            if let (Some(bake), Some(container), Some(at)) = (&bake, &container, bake_span) {
                if bake.window > container.keep_previous {
                    self.report(
                        at,
                        format!(
                            "bake window ({:?}) is longer than keep_previous ({:?}): the warm colour a breach rolls back to would be retired first",
                            bake.window, container.keep_previous
                        ),
                    );
                }
            }
            services.insert(
                name.clone(),
                Service {
                    name,
                    upstream: raw.upstream,
                    health,
                    drain_timeout: raw.drain_timeout.map_or(Duration::from_secs(30), |d| d.0),
                    websocket_grace: raw.websocket_grace.map_or(Duration::from_secs(10), |d| d.0),
                    pause_timeout: raw.pause_timeout.map_or(Duration::from_secs(30), |d| d.0),
                    container,
                    bake,
                    steps,
                },
            );
        }
        services
    }

    /// Container settings, when the service has an `image`. Container-only
    /// keys on a static service are reported rather than silently ignored.
    fn container(
        &mut self,
        name: &str,
        raw: &mut RawService,
        span: Range<usize>,
    ) -> Option<ContainerSettings> {
        let Some(image) = raw.image.take() else {
            let container_only = raw.port.is_some()
                || raw.host_ports.is_some()
                || !raw.env.is_empty()
                || raw.env_file.is_some()
                || !raw.volumes.is_empty()
                || !raw.extra_hosts.is_empty()
                || raw.keep_previous.is_some()
                || raw.retain.is_some()
                || raw.stop_timeout.is_some()
                || raw.docker_config.is_some()
                || raw.bake.is_some();
            if container_only {
                self.report(
                    span,
                    format!("service {name:?} has container settings but no `image`; add image = \"repo\" or remove them"),
                );
            }
            return None;
        };
        if image.is_empty() || image.contains(char::is_whitespace) {
            self.report(span.clone(), format!("invalid image {image:?}"));
        }
        if !self.has_state_dir {
            self.report(
                span.clone(),
                format!(
                    "service {name:?} runs containers (`image`) but [server] state_dir is not set; \
                     without the state file a restart cannot tell which container serves: \
                     add state_dir = \"/var/lib/cutover\""
                ),
            );
        }
        let Some(port) = raw.port else {
            self.report(
                span,
                format!("service {name:?} has an image but no container `port`"),
            );
            return None;
        };
        let host_ports = raw.host_ports.take().and_then(|ports| {
            let ports_span = ports.span();
            match ports.into_inner().as_slice() {
                [blue, green] if blue != green && *blue != 0 && *green != 0 => {
                    Some([*blue, *green])
                }
                _ => {
                    self.report(
                        ports_span,
                        "host_ports needs two different ports: [blue, green]".into(),
                    );
                    None
                }
            }
        });
        if raw.upstream.is_some() {
            self.report(
                span,
                format!("service {name:?} has both `image` and `upstream`; the controller picks the upstream of a container service"),
            );
        }
        Some(ContainerSettings {
            image,
            port,
            host_ports,
            env: std::mem::take(&mut raw.env),
            env_file: raw.env_file.take().map(|p| self.named_file("env_file", p)),
            volumes: std::mem::take(&mut raw.volumes),
            extra_hosts: std::mem::take(&mut raw.extra_hosts),
            stop_timeout: raw.stop_timeout.map_or(Duration::from_secs(10), |d| d.0),
            keep_previous: raw
                .keep_previous
                .map_or(Duration::from_secs(15 * 60), |d| d.0),
            retain: raw.retain.unwrap_or(3),
            docker_config: raw
                .docker_config
                .take()
                .map(|p| self.named_file("docker_config", p)),
        })
    }

    fn bake(&mut self, spanned: Spanned<RawBake>) -> (BakeSettings, Option<Steps>) {
        let span = spanned.span();
        let mut raw = spanned.into_inner();
        let steps = self.steps(&span, &mut raw);
        let window = raw.window.map_or(Duration::from_secs(120), |d| d.0);
        if window.is_zero() {
            self.report(span.clone(), "bake window must be longer than 0s".into());
        }
        let max_error_rate = match raw.max_error_rate.as_deref().map(parse_percent) {
            None => 0.01,
            Some(Ok(rate)) => rate,
            Some(Err(err)) => {
                self.report(span.clone(), format!("bake max_error_rate: {err}"));
                0.01
            }
        };
        let bake = BakeSettings {
            window,
            max_error_rate,
            min_requests: raw.min_requests.unwrap_or(100),
            max_p99: raw.max_p99.map(|d| d.0),
        };
        let steps = steps.map(|shares| Steps {
            shares,
            interval: raw.step_interval.map_or(window, |d| d.0),
        });
        (bake, steps)
    }

    /// The bake table's `steps`, checked: ascending shares above 0%, at
    /// most 100% and only as the last.
    fn steps(&mut self, span: &Range<usize>, raw: &mut RawBake) -> Option<Vec<u32>> {
        let texts = std::mem::take(&mut raw.steps);
        if texts.is_empty() {
            if raw.step_interval.is_some() {
                self.report(span.clone(), "bake step_interval without steps".into());
            }
            return None;
        }
        if raw.step_interval.is_some_and(|d| d.0.is_zero()) {
            self.report(
                span.clone(),
                "bake step_interval must be longer than 0s".into(),
            );
        }
        if texts.len() > MAX_STEPS {
            self.report(
                span.clone(),
                format!("bake steps: at most {MAX_STEPS} steps"),
            );
        }
        let mut shares: Vec<u32> = Vec::with_capacity(texts.len());
        for text in &texts {
            let share = match parse_percent(text) {
                Ok(fraction) => (fraction * 10_000.0).round() as u32,
                Err(err) => {
                    self.report(span.clone(), format!("bake steps: {err}"));
                    return None;
                }
            };
            let ascending = shares.last().is_none_or(|&last| share > last);
            if share == 0 || share > 10_000 || !ascending {
                self.report(
                    span.clone(),
                    format!("bake steps: {text:?} must be above 0% and the previous step, and at most 100%"),
                );
                return None;
            }
            shares.push(share);
        }
        Some(shares)
    }

    fn health(&mut self, spanned: Spanned<RawHealth>) -> HealthCheck {
        let span = spanned.span();
        let raw = spanned.into_inner();
        let defaults = HealthCheck::default();
        let path = raw.path.unwrap_or(defaults.path);
        if !path.starts_with('/') {
            self.report(
                span.clone(),
                format!("health path {path:?} must start with '/'"),
            );
        }
        let healthy_after = raw.healthy_after.unwrap_or(defaults.healthy_after);
        if healthy_after == 0 {
            self.report(span.clone(), "healthy_after must be at least 1".into());
        }
        let expect_json = raw
            .expect_json
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(field, value)| match serde_json::to_value(value) {
                Ok(value) => Some((field, value)),
                Err(err) => {
                    self.report(span.clone(), format!("expect_json.{field}: {err}"));
                    None
                }
            })
            .collect();
        HealthCheck {
            path,
            expect_status: raw.expect_status.unwrap_or(defaults.expect_status),
            expect_json,
            interval: raw.interval.map_or(defaults.interval, |d| d.0),
            timeout: raw.timeout.map_or(defaults.timeout, |d| d.0),
            healthy_after,
            deadline: raw.deadline.map_or(defaults.deadline, |d| d.0),
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let defaults = Limits::default();
        let l = raw.limits;
        let limits = Limits {
            header_read_timeout: l
                .header_read_timeout
                .map_or(defaults.header_read_timeout, |d| d.0),
            idle_timeout: l.idle_timeout.map_or(defaults.idle_timeout, |d| d.0),
            park_after: l.park_after.map_or(defaults.park_after, |d| d.0),
            max_header_bytes: l
                .max_header_bytes
                .map_or(defaults.max_header_bytes, |s| s.0 as usize),
            max_uri_bytes: self.max_uri_bytes(l.max_uri_bytes, defaults.max_uri_bytes),
            max_body_bytes: l.max_body_bytes.map_or(defaults.max_body_bytes, |s| s.0),
            body_timeout: l.body_timeout.map_or(defaults.body_timeout, |d| d.0),
            body_min_rate: l.body_min_rate.map_or(defaults.body_min_rate, |r| r.0),
            body_rate_grace: l.body_rate_grace.map_or(defaults.body_rate_grace, |d| d.0),
            send_timeout: l.send_timeout.map_or(defaults.send_timeout, |d| d.0),
            max_connections: l.max_connections.unwrap_or(defaults.max_connections),
            upstream_connect_timeout: l
                .upstream_connect_timeout
                .map_or(defaults.upstream_connect_timeout, |d| d.0),
            upstream_timeout: l
                .upstream_timeout
                .map_or(defaults.upstream_timeout, |d| d.0),
            tls_handshake_timeout: l
                .tls_handshake_timeout
                .map_or(defaults.tls_handshake_timeout, |d| d.0),
            h2_max_concurrent_streams: l
                .h2_max_concurrent_streams
                .unwrap_or(defaults.h2_max_concurrent_streams),
            h2_max_pending_accept_reset_streams: l
                .h2_max_pending_accept_reset_streams
                .unwrap_or(defaults.h2_max_pending_accept_reset_streams),
            h2_max_local_error_reset_streams: l
                .h2_max_local_error_reset_streams
                .unwrap_or(defaults.h2_max_local_error_reset_streams),
        };
        let trusted_proxies = raw
            .trusted_proxies
            .into_iter()
            .filter_map(|spanned| {
                let span = spanned.span();
                match parse_net(spanned.get_ref()) {
                    Ok(net) => Some(net),
                    Err(message) => {
                        self.report(span, message);
                        None
                    }
                }
            })
            .collect();
        let admin_group = raw.admin_group.map(|group| {
            let span = group.span();
            let name = group.into_inner();
            if name.is_empty() || name.contains([':', '\n', '/']) {
                self.report(
                    span,
                    format!("invalid admin_group {name:?}: expected a group name"),
                );
            }
            name
        });
        let instance = raw.instance.map(|instance| {
            let span = instance.span();
            let name = instance.into_inner();
            if !valid_instance_name(&name) {
                self.report(
                    span,
                    format!(
                        "invalid instance {name:?}: use up to 64 letters, digits, '-', '_' and '.'"
                    ),
                );
            }
            name
        });
        let access_log = self.access_log(raw.access_log);
        let metrics = raw.metrics.map(|metrics| {
            let span = metrics.span();
            let addr = metrics.into_inner();
            if Some(addr) == raw.http || Some(addr) == raw.https {
                self.report(
                    span,
                    format!("metrics = \"{addr}\" is a proxy listener: give the metrics endpoint its own address"),
                );
            }
            addr
        });
        ServerConfig {
            http: raw.http,
            https: raw.https,
            admin_socket: raw.admin_socket.map(|p| self.resolve(p)),
            admin_group,
            state_dir: raw.state_dir.map(|p| self.resolve(p)),
            instance,
            workers: raw.workers.unwrap_or(0),
            shutdown_timeout: raw
                .shutdown_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            trusted_proxies,
            access_log,
            metrics,
            limits,
        }
    }

    /// `access_log`: `"log"`, `"json"`, `"off"`, or a file path. A path
    /// must contain a `/` (`"./access.log"`), so a misspelt keyword is an
    /// error rather than a file named after it.
    fn access_log(&mut self, raw: Option<Spanned<String>>) -> AccessLogMode {
        let Some(spanned) = raw else {
            return AccessLogMode::default();
        };
        let span = spanned.span();
        let value = spanned.into_inner();
        match value.as_str() {
            "log" => AccessLogMode::Log,
            "off" => AccessLogMode::Off,
            "json" => AccessLogMode::JsonStderr,
            path if path.contains('/') && !path.ends_with('/') => {
                AccessLogMode::JsonFile(self.resolve(PathBuf::from(path)))
            }
            _ => {
                self.report(
                    span,
                    format!(
                        "invalid access_log {value:?}: expected \"log\", \"json\", \"off\" \
                         or a file path containing '/' (such as \"./access.log\")"
                    ),
                );
                AccessLogMode::default()
            }
        }
    }

    /// `max_uri_bytes`: at least 1 (0 would refuse every request) and at
    /// most hyper's own 64 KiB ceiling, above which the setting would be a
    /// silent no-op.
    fn max_uri_bytes(&mut self, raw: Option<Spanned<SizeValue>>, default: usize) -> usize {
        const HYPER_MAX_URI: u64 = 65_534;
        let Some(spanned) = raw else {
            return default;
        };
        let span = spanned.span();
        let value = spanned.into_inner().0;
        if value == 0 || value > HYPER_MAX_URI {
            self.report(
                span,
                format!("max_uri_bytes must be between 1 and {HYPER_MAX_URI} (hyper's limit)"),
            );
            return default;
        }
        value as usize
    }

    /// Returns the site plus the spans of its hosts (for duplicate checks).
    fn site(
        &mut self,
        spanned: Spanned<RawSite>,
        services: &BTreeMap<String, Service>,
    ) -> (Site, HostSpans) {
        let site_span = spanned.span();
        let raw = spanned.into_inner();
        if raw.hosts.is_empty() {
            self.report(
                site_span.clone(),
                "site has no hosts; use hosts = [\"example.org\"] or [\"*\"] for a catch-all"
                    .into(),
            );
        }
        let mut host_spans = Vec::new();
        let mut hosts = Vec::new();
        for host in raw.hosts {
            let span = host.span();
            let name = host.into_inner().to_ascii_lowercase();
            if let Err(message) = check_host_pattern(&name) {
                self.report(span.clone(), message);
            }
            host_spans.push((name.clone(), span));
            hosts.push(name);
        }
        let mut routes = Vec::new();
        if let Some(service) = raw.service {
            self.check_service_ref(&service, services);
            routes.push(Route {
                path: "/".into(),
                action: Action::Service(service.into_inner()),
            });
        }
        for route in raw.route {
            if let Some(route) = self.route(route, services) {
                if routes.iter().any(|r: &Route| r.path == route.path) {
                    self.report(
                        site_span.clone(),
                        format!("two routes for path {:?} in one site", route.path),
                    );
                }
                routes.push(route);
            }
        }
        routes.sort_by_key(|route| std::cmp::Reverse(route.path.len()));
        let hsts = match raw.hsts {
            None | Some(HstsValue::Enabled(false)) => None,
            Some(HstsValue::Enabled(true)) => Some("max-age=31536000".to_string()),
            Some(HstsValue::Header(value)) => {
                if let Err(message) = check_hsts(&value) {
                    self.report(site_span.clone(), message);
                }
                Some(value)
            }
        };
        let acme = self.site_tls(raw.tls, &hosts);
        let site = Site {
            hosts,
            https_redirect: raw.https_redirect,
            hsts,
            acme,
            routes,
        };
        (site, host_spans)
    }

    fn route(
        &mut self,
        spanned: Spanned<RawRoute>,
        services: &BTreeMap<String, Service>,
    ) -> Option<Route> {
        let span = spanned.span();
        let raw = spanned.into_inner();
        let path_span = raw.path.span();
        let path = raw.path.into_inner();
        if !path.starts_with('/') {
            self.report(
                path_span,
                format!("route path {path:?} must start with '/'"),
            );
        }
        let mut actions = Vec::new();
        if let Some(service) = raw.service {
            self.check_service_ref(&service, services);
            actions.push(Action::Service(service.into_inner()));
        }
        if let Some(file) = raw.file {
            actions.push(Action::File(self.named_file("route file", file)));
        }
        if let Some(dir) = raw.dir {
            actions.push(Action::Dir(self.resolve(dir)));
        }
        if let Some(to) = raw.redirect {
            let code = raw.code.unwrap_or(301);
            if ![301, 302, 303, 307, 308].contains(&code) {
                self.report(
                    span.clone(),
                    format!(
                        "redirect code {code} is not a redirect; use 301, 302, 303, 307 or 308"
                    ),
                );
            }
            actions.push(Action::Redirect { to, code });
        } else if raw.code.is_some() {
            self.report(span.clone(), "`code` only goes with `redirect`".into());
        }
        if let Some(status) = raw.status {
            if !(200..=599).contains(&status) {
                self.report(span.clone(), format!("status {status} is not in 200..=599"));
            }
            actions.push(Action::Status(status));
        }
        if actions.len() != 1 {
            self.report(
                span,
                format!(
                    "route {path:?} needs exactly one of `service`, `file`, `dir`, `redirect`, `status` (found {})",
                    actions.len()
                ),
            );
            return None;
        }
        actions.pop().map(|action| Route { path, action })
    }

    fn check_service_ref(&mut self, name: &Spanned<String>, services: &BTreeMap<String, Service>) {
        if !services.contains_key(name.get_ref()) {
            let known: Vec<&str> = services.keys().map(String::as_str).collect();
            self.report(
                name.span(),
                format!(
                    "unknown service {:?}; define [service.{}] (known: {})",
                    name.get_ref(),
                    name.get_ref(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
    }

    fn check_duplicate_hosts(&mut self, sites: &[(Site, HostSpans)]) {
        let mut seen = std::collections::HashSet::new();
        for (_, hosts) in sites {
            for (host, span) in hosts {
                if !seen.insert(host.clone()) {
                    self.report(span.clone(), format!("host {host:?} belongs to two sites"));
                }
            }
        }
    }
}

fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Instance names go into a Docker label and the docs' `docker ps
/// --filter` examples: keep them plain. No `/`, so a name never equals a
/// derived (path) identity.
fn valid_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Hosts are exact names, `*.suffix`, or `*`.
fn check_host_pattern(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host == "*" {
        return Ok(());
    }
    let valid = !name.is_empty()
        && !name.contains('*')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid host {host:?}: use a name like \"example.org\", a wildcard \"*.example.org\", or \"*\" for a catch-all (no port)"
        ))
    }
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("invalid trusted proxy {text:?}: expected an IP address or CIDR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "proxy.toml", Path::new("/etc/cutover"))
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("1w").is_err());
        assert_eq!(parse_size("16KiB"), Ok(16384));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert!(parse_size("ten").is_err());
    }

    #[test]
    fn minimal_site_resolves_relative_paths() {
        let config = parse(
            r#"
            [[tls]]
            cert = "certs/a.pem"
            key = "/abs/key.pem"
            [[site]]
            hosts = ["Example.org", "*.example.org"]
            service = "web"
            [[site.route]]
            path = "/privacy"
            file = "privacy.html"
            [service.web]
            upstream = "127.0.0.1:9000"
            "#,
        )
        .expect("valid");
        assert_eq!(config.tls[0].cert, Path::new("/etc/cutover/certs/a.pem"));
        assert_eq!(config.tls[0].key, Path::new("/abs/key.pem"));
        let site = &config.sites[0];
        assert_eq!(site.hosts, vec!["example.org", "*.example.org"]);
        assert_eq!(site.routes[0].path, "/privacy");
        assert_eq!(
            site.routes[0].action,
            Action::File("/etc/cutover/privacy.html".into())
        );
        assert_eq!(site.routes[1].action, Action::Service("web".into()));
    }

    #[test]
    fn unknown_key_is_located() {
        let err = parse("[server]\nhttp = \"127.0.0.1:80\"\nworkerz = 2\n").unwrap_err();
        let problem = &err.problems[0];
        assert_eq!((problem.line, problem.column), (3, 1));
        assert!(problem.message.contains("workerz"), "{problem}");
        assert!(
            problem.message.contains("workers"),
            "hint lists valid keys: {problem}"
        );
    }

    #[test]
    fn hardening_limits_default_and_parse() {
        let defaults = parse("").expect("valid").server.limits;
        assert_eq!(defaults.max_uri_bytes, 8 * 1024);
        assert_eq!(defaults.h2_max_pending_accept_reset_streams, 20);
        assert_eq!(defaults.h2_max_local_error_reset_streams, 1024);
        let set = parse(
            "[server.limits]\nmax_uri_bytes = \"2KiB\"\n\
             h2_max_pending_accept_reset_streams = 5\n\
             h2_max_local_error_reset_streams = 50\n",
        )
        .expect("valid")
        .server
        .limits;
        assert_eq!(set.max_uri_bytes, 2048);
        assert_eq!(set.h2_max_pending_accept_reset_streams, 5);
        assert_eq!(set.h2_max_local_error_reset_streams, 50);
    }

    #[test]
    fn max_uri_bytes_out_of_range_is_located() {
        for bad in ["0", "\"1MiB\""] {
            let err = parse(&format!("[server.limits]\nmax_uri_bytes = {bad}\n")).unwrap_err();
            assert_eq!(err.problems[0].line, 2, "{bad}");
            assert!(
                err.problems[0].message.contains("max_uri_bytes"),
                "{}",
                err.problems[0]
            );
        }
    }

    #[test]
    fn bad_duration_is_located() {
        let err = parse("[server]\nshutdown_timeout = \"30 seconds\"\n").unwrap_err();
        assert_eq!(err.problems[0].line, 2);
        assert!(err.problems[0].message.contains("duration"));
    }

    #[test]
    fn container_service_settings() {
        let config = parse(
            r#"
[server]
state_dir = "/var/lib/cutover"
[service.web]
image = "registry.example/team/web"
port = 8080
host_ports = [8080, 8081]
env = { TZ = "Asia/Seoul" }
env_file = "web.env"
keep_previous = "15m"
health = { path = "/actuator/health", expect_json = { status = "UP" }, healthy_after = 2 }
"#,
        )
        .expect("valid");
        let web = &config.services["web"];
        let container = web.container.as_ref().expect("container service");
        assert_eq!(container.host_ports, Some([8080, 8081]));
        assert_eq!(
            container.env_file.as_deref(),
            Some(Path::new("/etc/cutover/web.env"))
        );
        assert_eq!(
            web.health.expect_json,
            vec![("status".to_string(), serde_json::json!("UP"))]
        );
        let err = parse("[service.web]\nport = 8080\n").unwrap_err();
        assert!(err.to_string().contains("no `image`"), "{err}");
        let err = parse(
            "[server]\nstate_dir = \"s\"\n[service.web]\nimage = \"x\"\nport = 1\nhost_ports = [1]\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("proxy.toml:6:14: host_ports"),
            "{err}"
        );
    }

    #[test]
    fn bake_settings_and_located_errors() {
        let base = "[server]\nstate_dir = \"s\"\n[service.web]\nimage = \"x\"\nport = 1\n";
        let config = parse(&format!(
            "{base}bake = {{ window = \"2m\", max_error_rate = \"1%\", min_requests = 200, max_p99 = \"800ms\" }}\n"
        ))
        .expect("valid");
        let bake = config.services["web"].bake.expect("bake");
        assert_eq!(bake.window, Duration::from_secs(120));
        assert!((bake.max_error_rate - 0.01).abs() < 1e-12);
        assert_eq!(bake.min_requests, 200);
        assert_eq!(bake.max_p99, Some(Duration::from_millis(800)));
        let err = parse(&format!("{base}bake = {{ max_error_rate = \"lots\" }}\n")).unwrap_err();
        assert!(
            err.to_string()
                .contains("proxy.toml:6:8: bake max_error_rate"),
            "{err}"
        );
        let err = parse(&format!("{base}bake = {{ windw = \"1s\" }}\n")).unwrap_err();
        assert!(err.to_string().contains("proxy.toml:6:"), "{err}");
        let err = parse(&format!(
            "{base}keep_previous = \"1m\"\nbake = {{ window = \"2m\" }}\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("proxy.toml:7:8: bake window"),
            "{err}"
        );
        let err = parse("[service.web]\nupstream = \"127.0.0.1:1\"\nbake = {}\n").unwrap_err();
        assert!(err.to_string().contains("no `image`"), "{err}");
    }

    #[test]
    fn bake_steps_parse_and_bad_ones_are_located() {
        let base = "[server]\nstate_dir = \"s\"\n[service.web]\nimage = \"x\"\nport = 1\n";
        let config = parse(&format!(
            "{base}bake = {{ window = \"1m\", steps = [\"10%\", \"50%\", \"100%\"], step_interval = \"30s\" }}\n"
        ))
        .expect("valid");
        let steps = config.services["web"].steps.clone().expect("steps");
        assert_eq!(steps.shares, vec![1_000, 5_000, 10_000]);
        assert_eq!(steps.interval, Duration::from_secs(30));
        let config = parse(&format!("{base}bake = {{ steps = [\"5%\"] }}\n")).expect("valid");
        let steps = config.services["web"].steps.clone().expect("steps");
        assert_eq!(
            (steps.shares, steps.interval),
            (vec![500], Duration::from_secs(120)),
            "the interval defaults to the window"
        );
        assert_eq!(parse(base).expect("valid").services["web"].steps, None);
        for (bad, says) in [
            (
                "steps = [\"50%\", \"10%\"]",
                "above 0% and the previous step",
            ),
            ("steps = [\"0%\"]", "above 0%"),
            ("steps = [\"120%\"]", "0 to 100"),
            ("steps = [\"lots\"]", "bake steps"),
            ("step_interval = \"1m\"", "step_interval without steps"),
            (
                "steps = [\"10%\"], step_interval = \"0s\"",
                "longer than 0s",
            ),
        ] {
            let err = parse(&format!("{base}bake = {{ {bad} }}\n")).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("proxy.toml:6:8:") && text.contains(says),
                "{bad}: {text}"
            );
        }
    }

    /// Four mistakes that each stop serde: all four are listed, at their
    /// lines, and the semantic pass still runs on the rest (line 10).
    #[test]
    fn every_serde_problem_is_listed() {
        let err = parse(
            r#"[server]
wokers = 2
shutdown_timeout = "30 seconds"
[server.limits]
max_body_bytes = "10 megs"
[service.web]
upstream = "127.0.0.1:9000"
health = { paht = "/up" }
[[site]]
hosts = ["bad host"]
service = "web"
"#,
        )
        .unwrap_err();
        let located: Vec<(usize, usize)> =
            err.problems.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(
            located,
            [(2, 1), (3, 20), (5, 18), (8, 12), (10, 10)],
            "{err}"
        );
        assert!(
            err.problems[0].message.contains("did you mean `workers`?"),
            "{err}"
        );
        assert!(
            err.problems[1].message.contains("shutdown_timeout"),
            "{err}"
        );
        assert!(err.problems[2].message.contains("max_body_bytes"), "{err}");
        assert!(
            err.problems[3].message.contains("did you mean `path`?"),
            "{err}"
        );
        assert!(err.problems[4].message.contains("invalid host"), "{err}");
    }

    /// Without a state file a restart cannot tell which container serves
    /// (issue 11, item 9): an image service needs `state_dir`, and the
    /// problem names the service's line.
    #[test]
    fn container_service_needs_state_dir() {
        let text =
            "[server]\nhttp = \"127.0.0.1:80\"\n\n[service.web]\nimage = \"web\"\nport = 8080\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        let problem = &err.problems[0];
        assert_eq!(problem.line, 4, "{problem}");
        assert!(problem.message.contains("state_dir"), "{problem}");
        assert!(problem.message.contains("\"web\""), "{problem}");
        let with_state = text.replace("[server]\n", "[server]\nstate_dir = \"/var/lib/cutover\"\n");
        parse(&with_state).expect("valid with state_dir");
        // A static service needs no state file.
        parse("[service.web]\nupstream = \"127.0.0.1:9000\"\n").expect("valid");
    }

    #[test]
    fn metrics_is_off_by_default_and_never_a_proxy_listener() {
        let config = parse("[server]\nhttp = \"127.0.0.1:8080\"\n").expect("valid");
        assert_eq!(config.server.metrics, None);
        let config = parse("[server]\nmetrics = \"127.0.0.1:9100\"\n").expect("valid");
        assert_eq!(
            config.server.metrics,
            Some("127.0.0.1:9100".parse().expect("addr"))
        );
        let err = parse("[server]\nhttp = \"127.0.0.1:8080\"\nmetrics = \"127.0.0.1:8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its own address") && err.contains(":3"),
            "{err}"
        );
        let err = parse("[server]\nmetrics = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2"), "{err}");
    }

    #[test]
    fn instance_names_are_plain() {
        let config = parse("[server]\ninstance = \"prod-1.web\"\n").expect("valid");
        assert_eq!(config.server.instance.as_deref(), Some("prod-1.web"));
        for bad in ["\"\"", "\"a/b\"", "\"has space\""] {
            let err = parse(&format!("[server]\ninstance = {bad}\n")).unwrap_err();
            assert_eq!(err.problems[0].line, 2, "{err}");
            assert!(err.to_string().contains("invalid instance"), "{err}");
        }
    }

    #[test]
    fn every_semantic_problem_is_listed() {
        let err = parse(
            r#"
[[site]]
hosts = ["a.example"]
service = "nope"
[[site.route]]
path = "/x"
file = "x.html"
status = 404
[[site]]
hosts = ["a.example", "bad host"]
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 4, "{text}");
        assert!(
            text.contains("proxy.toml:4:11: unknown service \"nope\""),
            "{text}"
        );
        assert!(text.contains("exactly one of"), "{text}");
        assert!(text.contains("belongs to two sites"), "{text}");
        assert!(text.contains("invalid host \"bad host\""), "{text}");
    }
}
