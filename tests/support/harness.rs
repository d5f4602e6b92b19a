//! One deploy test's world: a `cutover serve` subprocess on its own
//! config, state directory and service name, the test's images, and the
//! checks most deploy tests end with ([`Harness::consistent`]).
//!
//! Dropped in field order: the proxy is killed first, then the service's
//! containers and images are removed, then the temporary directory.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use cutover::admin::proto::{ActiveStatus, PreviousStatus, ServiceStatus};

use super::cutover::*;
use super::images::build_testapp_image_with_env;
use tokio::task::JoinHandle;

/// The app's port inside its container.
pub const APP_PORT: u16 = 8080;

/// Knobs of one test's service; everything else is fixed and fast.
pub struct Opts {
    pub keep_previous: &'static str,
    pub deadline: &'static str,
    pub host_ports: Option<[u16; 2]>,
    pub retain: usize,
    /// More `[service.NAME]` lines (keys not set above).
    pub extra: &'static str,
    /// Health probe interval and successes needed in a row.
    pub interval: &'static str,
    pub healthy_after: u32,
    pub drain_timeout: &'static str,
    /// `state_dir`; `<tmp>/state` when `None`.
    pub state_dir: Option<std::path::PathBuf>,
    /// Environment of the `cutover serve` process (e.g. `DOCKER_HOST`).
    pub env: Vec<(String, String)>,
    /// `[server] instance`; derived from the state directory when `None`.
    pub instance: Option<String>,
    /// Serve the metrics endpoint on a free loopback port.
    pub metrics: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            keep_previous: "15m",
            deadline: "10s",
            host_ports: None,
            retain: 3,
            extra: "",
            interval: "100ms",
            healthy_after: 2,
            drain_timeout: "2s",
            state_dir: None,
            env: Vec::new(),
            instance: None,
            metrics: false,
        }
    }
}

/// One test's proxy, service and images. Dropped in field order: the proxy
/// is killed first, then the service's containers and images are removed,
/// then the temporary directory.
pub struct Harness {
    pub proxy: Proxy,
    /// `None` for a second cutover [`beside`](Harness::beside) the first:
    /// the first one's clean-up removes the service's containers and images.
    _cleanup: Option<DockerCleanup>,
    pub tmp: tempfile::TempDir,
    pub svc: String,
    pub repo: String,
    /// The `cutover.instance` label of the containers this cutover starts:
    /// the configured name, or the canonical path of its state directory.
    pub instance: String,
    /// The metrics endpoint, with [`Opts::metrics`].
    pub metrics: Option<SocketAddr>,
    pub started: Instant,
}

impl Harness {
    pub async fn start(test: &str, opts: Opts) -> Harness {
        let pid = std::process::id();
        let svc = format!("dt-{test}-{pid}");
        let repo = format!("cutover-deploytest-{test}-{pid}");
        let cleanup = DockerCleanup::new(&svc, &repo);
        Harness::launch(svc, repo, Some(cleanup), opts).await
    }

    /// A second cutover on the same Docker engine with the same service
    /// name and images, but its own config, state directory, admin socket
    /// and HTTP port (another instance on one host).
    pub async fn beside(&self, opts: Opts) -> Harness {
        Harness::launch(self.svc.clone(), self.repo.clone(), None, opts).await
    }

    async fn launch(
        svc: String,
        repo: String,
        cleanup: Option<DockerCleanup>,
        opts: Opts,
    ) -> Harness {
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let host_ports = opts
            .host_ports
            .map(|[b, g]| format!("host_ports = [{b}, {g}]\n"))
            .unwrap_or_default();
        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let instance_line = opts
            .instance
            .as_ref()
            .map(|name| format!("instance = \"{name}\"\n"))
            .unwrap_or_default();
        let metrics: Option<SocketAddr> = opts.metrics.then(|| {
            format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("metrics addr")
        });
        let metrics_line = metrics
            .map(|addr| format!("metrics = \"{addr}\"\n"))
            .unwrap_or_default();
        let config = format!(
            r#"
[server]
http = "{http}"
admin_socket = "{dir}/admin.sock"
state_dir = "{state_dir}"
{instance_line}{metrics_line}shutdown_timeout = "2s"

[[site]]
hosts = ["*"]
service = "{svc}"

[service.{svc}]
image = "{repo}"
port = {APP_PORT}
{host_ports}stop_timeout = "1s"
drain_timeout = "{drain_timeout}"
keep_previous = "{keep_previous}"
retain = {retain}
{extra}
health = {{ path = "/health", interval = "{interval}", timeout = "1s", healthy_after = {healthy_after}, deadline = "{deadline}" }}
"#,
            dir = dir.path().display(),
            keep_previous = opts.keep_previous,
            deadline = opts.deadline,
            retain = opts.retain,
            extra = opts.extra,
            interval = opts.interval,
            healthy_after = opts.healthy_after,
            drain_timeout = opts.drain_timeout,
            state_dir = state_dir.display(),
        );
        // For tests with `env_file = "app.env"`; read at each deploy.
        std::fs::write(dir.path().join("app.env"), "# test env file\n").expect("env file");
        let proxy = Proxy::start_with_env(dir.path(), &config, http, opts.env).await;
        // The server has created the state directory by now.
        let instance = match opts.instance {
            Some(name) => name,
            None => std::fs::canonicalize(&state_dir)
                .unwrap_or_else(|e| panic!("state_dir {}: {e}", state_dir.display()))
                .display()
                .to_string(),
        };
        Harness {
            proxy,
            _cleanup: cleanup,
            tmp: dir,
            svc,
            repo,
            instance,
            metrics,
            started,
        }
    }

    /// Builds `<repo>:<tag>` whose app reports version `tag`, plus `env`.
    pub async fn image(&self, tag: &str, env: &[(&str, &str)]) -> String {
        let mut all = vec![("APP_VERSION", tag)];
        all.extend_from_slice(env);
        build_testapp_image_with_env(
            &format!("{}:{tag}", self.repo),
            &format!("{}-{tag}", self.svc),
            &all,
        )
        .await
    }

    /// Builds and deploys v1, then v2: v2 serves and v1 is the warm
    /// previous colour. Returns both image references.
    pub async fn v1_then_v2(&self) -> (String, String) {
        let v1 = self.image("v1", &[]).await;
        let v2 = self.image("v2", &[]).await;
        self.deploy_ok(&v1).await;
        self.deploy_ok(&v2).await;
        (v1, v2)
    }

    pub async fn deploy(&self, image: &str) -> CliOutput {
        let out = self
            .proxy
            .cli(&["deploy", &self.svc, "--image", image])
            .await;
        eprintln!("[{}] {out}", self.svc);
        out
    }

    /// Starts `cutover deploy` of `image` in the background, bounded by
    /// `limit`, so the test can act (kill, cut, race) while it runs. It
    /// borrows nothing, so the harness stays free for that.
    pub fn deploy_in_background(&self, image: &str, limit: Duration) -> JoinHandle<CliOutput> {
        let config = self.proxy.config.to_str().expect("utf-8 path").to_string();
        let (svc, image) = (self.svc.clone(), image.to_string());
        tokio::spawn(async move {
            let args = ["deploy", &svc, "--image", &image, "--config", &config];
            let out = cli(&args, limit).await;
            eprintln!("[{svc}] {out}");
            out
        })
    }

    /// Waits up to `within` until a container of `image` runs: a deploy
    /// of it is then in its health check.
    pub async fn wait_running(&self, image: &str, within: Duration) -> Ctr {
        let (listed, ok) = wait_containers(&self.svc, within, |l| {
            l.iter().any(|c| c.image == image && c.running())
        })
        .await;
        assert!(ok, "no running container of {image}:\n{}", self.ps());
        listed
            .into_iter()
            .find(|c| c.image == image)
            .expect("listed above")
    }

    /// How many health checks the server has begun probing so far (each
    /// logs its first probe as "attempt 1"); pass it to
    /// [`wait_health_probe`](Self::wait_health_probe) before starting the
    /// operation whose health check the test waits for.
    pub fn health_checks_begun(&self) -> usize {
        self.proxy.log_text().matches("(attempt 1)").count()
    }

    /// Waits up to `within` until more than `before` health checks have
    /// made their first probe: the operation is then in its health check.
    pub async fn wait_health_probe(&self, before: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.health_checks_begun() <= before {
            assert!(
                Instant::now() < deadline,
                "no health check began within {within:?}:\n{}",
                self.proxy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` until `status` counts at least `n` requests in
    /// flight on the active colour (a request has reached it).
    pub async fn wait_in_flight(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status().await;
            if status.active.as_ref().is_some_and(|a| a.in_flight >= n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never {n} request(s) in flight within {within:?}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn deploy_ok(&self, image: &str) -> CliOutput {
        let out = self.deploy(image).await;
        assert!(
            out.success(),
            "deploy of {image} failed: {out}\n{}",
            ps_table(&self.svc)
        );
        out
    }

    pub async fn rollback(&self) -> CliOutput {
        let out = self.proxy.cli(&["rollback", &self.svc]).await;
        eprintln!("[{}] {out}", self.svc);
        out
    }

    /// `status` of this service.
    pub async fn status(&self) -> ServiceStatus {
        let mut report = self.proxy.status(&self.svc).await;
        report
            .services
            .remove(&self.svc)
            .unwrap_or_else(|| panic!("no {} in status: {report:?}", self.svc))
    }

    /// This cutover's containers of the service (its instance label).
    pub fn containers(&self) -> Vec<Ctr> {
        containers(&self.svc)
            .into_iter()
            .filter(|c| c.instance == self.instance)
            .collect()
    }

    pub fn ps(&self) -> String {
        ps_table(&self.svc)
    }

    /// GET / through the proxy, which must answer 200.
    pub async fn version(&self) -> String {
        let answer = get(self.proxy.http, "/")
            .await
            .unwrap_or_else(|e| panic!("GET / through the proxy: {e}"));
        assert_eq!(answer.status, 200, "GET / through the proxy: {answer:?}");
        assert_eq!(
            answer.body.trim(),
            format!("version={}", answer.version),
            "{answer:?}"
        );
        answer.version
    }

    /// Status and engine agree: the active container (and the previous one
    /// and the canary, if status names them) is running, and no other container of the service
    /// exists. Returns the status.
    pub async fn consistent(&self) -> ServiceStatus {
        let status = self.status().await;
        let listed = self.containers();
        let same =
            |id: &str, c: &Ctr| !id.is_empty() && (c.id.starts_with(id) || id.starts_with(&c.id));
        let mut named = Vec::new();
        let roles = [
            (
                "active",
                status
                    .active
                    .as_ref()
                    .map(|a| (&a.container, &a.image, &a.color)),
            ),
            (
                "previous",
                status
                    .previous
                    .as_ref()
                    .map(|p| (&p.container, &p.image, &p.color)),
            ),
            (
                "canary",
                status
                    .canary
                    .as_ref()
                    .map(|c| (&c.container, &c.image, &c.color)),
            ),
        ];
        for (role, named_by_status) in roles {
            let Some((container, image, color)) = named_by_status else {
                continue;
            };
            let id = container.as_deref().unwrap_or_default();
            let c = listed.iter().find(|c| same(id, c)).unwrap_or_else(|| {
                panic!(
                    "{role} container {id:?} does not exist: {status:?}\n{}",
                    self.ps()
                )
            });
            assert!(c.running(), "{role} container is not running: {c:?}");
            assert_eq!(
                image.as_deref(),
                Some(c.image.as_str()),
                "{role}: {status:?}"
            );
            assert_eq!(*color, c.color, "{role}: {status:?}");
            named.push(c.id.clone());
        }
        let orphans: Vec<&Ctr> = listed.iter().filter(|c| !named.contains(&c.id)).collect();
        assert!(
            orphans.is_empty(),
            "containers neither active nor previous: {orphans:#?}\nstatus: {status:?}\n{}",
            self.ps()
        );
        status
    }

    pub fn dir(&self) -> &std::path::Path {
        self.tmp.path()
    }

    pub fn done(&self) {
        eprintln!("[{}] test took {:?}", self.svc, self.started.elapsed());
    }
}

/// The active colour a status names; the test fails (showing the status)
/// when there is none.
pub fn active(status: &ServiceStatus) -> &ActiveStatus {
    status
        .active
        .as_ref()
        .unwrap_or_else(|| panic!("no active colour: {status:?}"))
}

/// The warm previous colour a status names; the test fails (showing the
/// status) when there is none.
pub fn previous(status: &ServiceStatus) -> &PreviousStatus {
    status
        .previous
        .as_ref()
        .unwrap_or_else(|| panic!("no previous colour: {status:?}"))
}

pub fn with_image<'a>(list: &'a [Ctr], image: &str) -> Vec<&'a Ctr> {
    list.iter().filter(|c| c.image == image).collect()
}

pub fn lower(out: &CliOutput) -> String {
    out.text().to_lowercase()
}
