//! The Docker engine, as the deploy controller sees it.
//!
//! This is the only module that knows about `bollard`. Everything else in cutover
//! talks to [`Engine`] in terms of [`ContainerSpec`] and [`ContainerInfo`], so the
//! rest of the crate never has to care about query builders, `Option`-heavy API
//! models or the shape of engine error responses. The controller holds it as a
//! [`ContainerRuntime`], the small trait of the operations a deploy needs, so
//! its decisions can be unit-tested against a fake engine.
//!
//! A few facts about the engine shape the code here:
//!
//! * The engine may be old (API 1.41), so only fields that exist at 1.41 are set.
//! * Containers are found again after a restart of cutover through their labels
//!   ([`LABEL_MANAGED`] and friends), never through names alone.
//! * Ports are published on `127.0.0.1` only: the proxy is the public face, the
//!   containers are not.
//! * bollard's request timeout runs until the response headers arrive, and a stop
//!   request only answers once the container has stopped, so stop requests get a
//!   client timeout longer than the stop timeout they ask for.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
    PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::Deserialize;
use tracing::{debug, warn};

use crate::errors;

/// Marks a container as ours, so start-up reconciliation never touches anything
/// it did not create. Value is always `"true"`.
pub const LABEL_MANAGED: &str = "cutover.managed";
/// The service (as named in cutover's config) a container belongs to.
pub const LABEL_SERVICE: &str = "cutover.service";
/// `"blue"` or `"green"`: which slot of the service the container fills.
pub const LABEL_COLOR: &str = "cutover.color";
/// The image reference exactly as the user gave it, because the engine only keeps
/// the resolved image ID, and rollback needs the name.
pub const LABEL_IMAGE: &str = "cutover.image";
/// The deploy that created the container.
pub const LABEL_DEPLOY: &str = "cutover.deploy";
/// The cutover instance that created the container (its configured
/// `instance` name or its state directory): two cutovers on one engine with
/// the same service name each touch only their own containers.
pub const LABEL_INSTANCE: &str = "cutover.instance";

/// Client timeout for ordinary requests (bollard's own default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Slack added on top of a stop timeout: after the timeout the engine still has to
/// SIGKILL the process and reap it before it answers.
const STOP_SLACK: Duration = Duration::from_secs(30);
/// All published ports are bound here; the proxy is the only public listener.
const PUBLISH_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Docker Hub's canonical name; references without a registry part live there.
const DOCKER_HUB: &str = "docker.io";
/// What the engine reports as the start time of a container that never started.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Everything that can go wrong talking to the engine.
///
/// The engine's own message is kept in every variant that has one, because it is
/// usually the only useful part ("No such image: web:v2", "address already in use").
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine cannot be reached at all (socket missing, connection refused or
    /// dropped). The proxy keeps serving on its current routes when it sees this.
    #[error("docker engine unreachable: {0}")]
    Unreachable(String),
    /// The engine did not answer within the client timeout.
    #[error("docker engine did not answer in time")]
    Timeout,
    /// 404: no such container or image.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409: e.g. the container name is already taken.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 409 from image removal: a container still uses the image. Callers cleaning up
    /// old images usually ignore this one.
    #[error("image {image} is still in use: {message}")]
    ImageInUse {
        /// The reference that could not be removed.
        image: String,
        /// The engine's explanation (names the container).
        message: String,
    },
    /// Any other error status from the engine.
    #[error("docker engine error {status}: {message}")]
    Engine {
        /// HTTP status the engine answered with.
        status: u16,
        /// The engine's message, verbatim.
        message: String,
    },
    /// The engine reported an error in the middle of a streamed answer (pull, build).
    #[error("docker engine reported: {0}")]
    Stream(String),
    /// The docker config.json with registry credentials could not be used.
    #[error("registry credentials from {path}: {message}")]
    Credentials {
        /// The config file that was read.
        path: String,
        /// What was wrong with it.
        message: String,
    },
    /// The engine's answer lacked something it always sends (a container ID, ...).
    #[error("unexpected answer from docker engine: {0}")]
    Protocol(String),
    /// Anything else bollard reports (bad URI, JSON it could not decode, ...).
    #[error("docker client error: {0}")]
    Client(String),
}

impl DockerError {
    /// True when the engine itself is not there, as opposed to refusing a request.
    /// Lets the proxy keep serving (and the controller retry later) while the
    /// engine restarts.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, DockerError::Unreachable(_))
    }

    /// True for 404s, which most clean-up paths treat as "already done".
    pub fn is_not_found(&self) -> bool {
        matches!(self, DockerError::NotFound(_))
    }

    /// True when a container could not start because its fixed host port is
    /// already bound (the engine reports this as a plain 500).
    pub fn is_port_in_use(&self) -> bool {
        matches!(self, DockerError::Engine { message, .. } if message.contains("address already in use"))
    }
}

impl From<BollardError> for DockerError {
    fn from(err: BollardError) -> Self {
        match err {
            BollardError::DockerResponseServerError {
                status_code,
                message,
            } => match status_code {
                404 => DockerError::NotFound(message),
                409 => DockerError::Conflict(message),
                status => DockerError::Engine { status, message },
            },
            BollardError::RequestTimeoutError => DockerError::Timeout,
            BollardError::DockerStreamError { error } => DockerError::Stream(error),
            // Transport failures: the socket is missing, refuses connections, or
            // the connection broke under us. All mean "the engine is not there".
            BollardError::SocketNotFoundError(path) => {
                DockerError::Unreachable(format!("socket {path} not found"))
            }
            err @ (BollardError::HyperLegacyError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::IOError { .. }) => DockerError::Unreachable(errors::chain(&err)),
            other => DockerError::Client(errors::chain(&other)),
        }
    }
}

/// What the controller wants running: one container of one service in one slot.
#[derive(Clone, Default)]
pub struct ContainerSpec {
    /// Container name, e.g. `cutover-web-green-<deployid>`; must be unique.
    pub name: String,
    /// Image reference; must already exist locally (see [`Engine::pull`]).
    pub image: String,
    /// Service name from the config; becomes [`LABEL_SERVICE`].
    pub service: String,
    /// `"blue"` or `"green"`; becomes [`LABEL_COLOR`].
    pub color: String,
    /// The deploy creating the container; becomes [`LABEL_DEPLOY`].
    pub deploy_id: String,
    /// The cutover instance creating it; becomes [`LABEL_INSTANCE`].
    pub instance: String,
    /// The port the app listens on inside the container (TCP).
    pub container_port: u16,
    /// Fixed host port, or `None` for an ephemeral one. Always bound on 127.0.0.1.
    pub host_port: Option<u16>,
    /// `KEY=value` pairs, env_file already merged by the caller.
    pub env: Vec<String>,
    /// `host:container[:ro]` bind mounts.
    pub volumes: Vec<String>,
    /// `name:ip` entries, e.g. `host.docker.internal:host-gateway`.
    pub extra_hosts: Vec<String>,
}

/// Hand-written so that logging a spec never prints environment values, which
/// routinely hold secrets.
impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_keys: Vec<&str> = self
            .env
            .iter()
            .map(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k))
            .collect();
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("service", &self.service)
            .field("color", &self.color)
            .field("deploy_id", &self.deploy_id)
            .field("instance", &self.instance)
            .field("container_port", &self.container_port)
            .field("host_port", &self.host_port)
            .field("env_keys", &env_keys)
            .field("volumes", &self.volumes)
            .field("extra_hosts", &self.extra_hosts)
            .finish()
    }
}

/// What the engine says about a container, reduced to what the controller uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full container ID.
    pub id: String,
    /// Without the leading `/` the engine adds.
    pub name: String,
    /// The reference from [`LABEL_IMAGE`], falling back to the engine's config.
    pub image: String,
    /// [`LABEL_SERVICE`], if the container has it.
    pub service: Option<String>,
    /// [`LABEL_COLOR`], if the container has it.
    pub color: Option<String>,
    /// [`LABEL_DEPLOY`], if the container has it.
    pub deploy_id: Option<String>,
    /// [`LABEL_INSTANCE`]; `None` on containers an older cutover created.
    pub instance: Option<String>,
    /// Whether the process is running right now (says nothing about health).
    pub running: bool,
    /// Set once the container has exited (or died), `None` while created/running.
    pub exit_code: Option<i64>,
    /// `127.0.0.1:<published port>` of the container port, while it is published.
    pub host_addr: Option<SocketAddr>,
    /// RFC 3339 start time, `None` if it never started.
    pub started_at: Option<String>,
}

/// A handle to the Docker engine. Cheap to clone: clones share one client.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("api_version", &self.docker.client_version().to_string())
            .finish()
    }
}

impl Engine {
    /// Connects to the local engine (`DOCKER_HOST` if it is a `unix://` URL, else
    /// `/var/run/docker.sock`) and agrees on an API version with it. Fails with
    /// [`DockerError::Unreachable`] when no engine answers.
    pub async fn connect() -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults()?;
        Self::negotiate(docker).await
    }

    /// Connects to an engine at an explicit `unix://` socket URL or path, for a
    /// configured engine address and for tests that must not touch the environment.
    pub async fn connect_to(socket: &str) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_unix(
            socket,
            REQUEST_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )?;
        Self::negotiate(docker).await
    }

    /// bollard starts out at its newest API version; the engine may be older.
    async fn negotiate(docker: Docker) -> Result<Self, DockerError> {
        let docker = docker
            .with_timeout(REQUEST_TIMEOUT)
            .negotiate_version()
            .await?;
        debug!(api = %docker.client_version(), "connected to docker engine");
        Ok(Engine { docker })
    }

    /// Cheap liveness check, for health endpoints and for retry loops after
    /// [`DockerError::Unreachable`].
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker.ping().await?;
        Ok(())
    }

    /// Whether the image is present locally, so a deploy can skip the pull.
    pub async fn image_exists(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(err) => match DockerError::from(err) {
                DockerError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Pulls `image` (a reference without a tag means `:latest`, as with the CLI;
    /// the engine itself would pull *every* tag).
    ///
    /// Credentials come from a docker `config.json` when one is given: the entry in
    /// `auths` whose key names the image's registry (Docker Hub for references
    /// without a registry part), holding base64 `user:pass` in `auth`. No entry
    /// means an anonymous pull. Credential helpers (`credsStore`) are not consulted.
    ///
    /// Each progress message the engine streams is handed to `progress`.
    pub async fn pull(
        &self,
        image: &str,
        docker_config: Option<&Path>,
        progress: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), DockerError> {
        let reference = ImageRef::parse(image);
        let credentials = match docker_config {
            Some(path) => credentials_from_file(path, &reference.registry)?,
            None => None,
        };
        let mut options = CreateImageOptionsBuilder::default().from_image(&reference.repository);
        if let Some(tag) = &reference.tag {
            options = options.tag(tag);
        }
        debug!(image, registry = %reference.registry, auth = credentials.is_some(), "pulling image");
        let mut stream = self
            .docker
            .create_image(Some(options.build()), None, credentials);
        while let Some(item) = stream.next().await {
            let info = item?;
            if let Some(line) = progress_line(
                info.id.as_deref(),
                info.status.as_deref(),
                info.progress_detail
                    .as_ref()
                    .and_then(|d| d.current.zip(d.total)),
            ) {
                progress(line);
            }
        }
        Ok(())
    }

    /// Creates and starts a container for `spec` and reports where it listens.
    ///
    /// The container runs under the engine's init (tini) so it stops promptly on
    /// SIGTERM even if the app ignores signals as PID 1, has no restart policy (the
    /// controller decides about restarts), and carries the `cutover.*` labels.
    ///
    /// Either a started container comes back or nothing is left behind: if starting
    /// fails (say a fixed host port is taken: 500 "address already in use"), the
    /// created container is removed before the error is returned.
    pub async fn create_and_start(
        &self,
        spec: &ContainerSpec,
    ) -> Result<ContainerInfo, DockerError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = self
            .docker
            .create_container(Some(options), container_body(spec))
            .await?;
        if created.id.is_empty() {
            return Err(DockerError::Protocol(
                "create returned no container id".into(),
            ));
        }
        for warning in &created.warnings {
            warn!(container = %spec.name, %warning, "docker warning on create");
        }
        debug!(container = %spec.name, id = %created.id, "created container");

        let started = match self.docker.start_container(&created.id, None).await {
            Ok(()) => self.inspect(&created.id, spec.container_port).await,
            Err(err) => Err(DockerError::from(err)),
        };
        if started.is_err() {
            self.discard(&created.id, &spec.name).await;
        }
        started
    }

    /// Starts an existing, stopped container again and reports where it
    /// listens now (an ephemeral host port changes across a restart).
    pub async fn start(&self, id: &str, container_port: u16) -> Result<ContainerInfo, DockerError> {
        self.docker.start_container(id, None).await?;
        self.inspect(id, container_port).await
    }

    /// Best-effort removal of a container that failed to come up; the original
    /// error matters more to the caller than a failed clean-up.
    async fn discard(&self, id: &str, name: &str) {
        if let Err(err) = self.remove_force(id).await {
            warn!(container = %name, %id, error = %err, "could not remove failed container");
        }
    }

    /// Current state of one container, with the host address of `container_port`.
    pub async fn inspect(
        &self,
        id: &str,
        container_port: u16,
    ) -> Result<ContainerInfo, DockerError> {
        self.inspect_port(id, Some(container_port)).await
    }

    async fn inspect_port(
        &self,
        id: &str,
        container_port: Option<u16>,
    ) -> Result<ContainerInfo, DockerError> {
        let response = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await?;
        container_info(response, container_port)
    }

    /// Stops a container (SIGTERM, SIGKILL after `stop_timeout`) and removes it.
    /// A container that is already stopped or already gone is not an error: both
    /// are the state the caller wanted.
    pub async fn stop_and_remove(
        &self,
        id: &str,
        stop_timeout: Duration,
    ) -> Result<(), DockerError> {
        // The engine answers a stop only once the container is down, and bollard's
        // timeout covers the wait for that answer: give it room.
        let client_timeout = REQUEST_TIMEOUT.max(stop_timeout + STOP_SLACK);
        let docker = self.docker.clone().with_timeout(client_timeout);
        let seconds = i32::try_from(stop_timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        match docker
            .stop_container(id, Some(options))
            .await
            .map_err(DockerError::from)
        {
            // 304 (already stopped) arrives as Ok from bollard.
            Ok(()) => {}
            Err(DockerError::NotFound(_)) => return Ok(()),
            Err(err) => return Err(err),
        }
        self.remove_force(id).await
    }

    /// Removes a container whatever its state (SIGKILL if running), along with its
    /// anonymous volumes so repeated deploys do not pile them up. Tolerates a
    /// container that is already gone or already being removed.
    pub async fn remove_force(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self
            .docker
            .remove_container(id, Some(options))
            .await
            .map_err(DockerError::from)
        {
            Ok(()) | Err(DockerError::NotFound(_)) => Ok(()),
            Err(DockerError::Conflict(message)) if message.contains("already in progress") => {
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// The last `lines` lines of the container's stdout and stderr, interleaved as
    /// the engine stored them; for error reports when a container fails its checks.
    pub async fn logs_tail(&self, id: &str, lines: usize) -> Result<Vec<String>, DockerError> {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&lines.to_string())
            .build();
        let mut stream = self.docker.logs(id, Some(options));
        let mut text = Vec::new();
        while let Some(chunk) = stream.next().await {
            text.extend_from_slice(&chunk?.into_bytes());
        }
        Ok(split_lines(&text))
    }

    /// All containers cutover manages, stopped ones included, optionally only those
    /// of one service. Every instance's: the caller decides which are its own
    /// ([`ContainerInfo::instance`]). `container_port_of(service)` tells which container port's
    /// host address to report (unknown services get no `host_addr`).
    ///
    /// Containers that vanish between listing and inspecting are skipped.
    pub async fn list_managed(
        &self,
        service: Option<&str>,
        container_port_of: &(dyn Fn(&str) -> Option<u16> + Sync),
    ) -> Result<Vec<ContainerInfo>, DockerError> {
        let mut labels = vec![format!("{LABEL_MANAGED}=true")];
        if let Some(service) = service {
            labels.push(format!("{LABEL_SERVICE}={service}"));
        }
        let filters = HashMap::from([("label".to_string(), labels)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self.docker.list_containers(Some(options)).await?;

        let mut containers = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            let port = summary
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_SERVICE))
                .and_then(|service| container_port_of(service));
            match self.inspect_port(&id, port).await {
                Ok(info) => containers.push(info),
                Err(DockerError::NotFound(_)) => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(containers)
    }

    /// Removes an image reference (untags it; deletes the image once no tag is
    /// left). A missing image is fine; an image a container still uses comes back
    /// as [`DockerError::ImageInUse`] so clean-up can skip it.
    pub async fn remove_image(&self, image: &str) -> Result<(), DockerError> {
        let options = RemoveImageOptionsBuilder::default().build();
        match self
            .docker
            .remove_image(image, Some(options), None)
            .await
            .map_err(DockerError::from)
        {
            Ok(_) | Err(DockerError::NotFound(_)) => Ok(()),
            Err(DockerError::Conflict(message)) => Err(DockerError::ImageInUse {
                image: image.to_string(),
                message,
            }),
            Err(err) => Err(err),
        }
    }
}

/// The operations the deploy state machine needs from a container engine,
/// and nothing else: the seam between its decisions and Docker.
/// [`Engine`] is the real one; the controller's unit tests drive the
/// deploy, rollback, reconciliation and retirement logic with an in-memory
/// fake (and tokio's paused clock), while the Docker suites keep proving
/// the whole against a real engine.
///
/// Object-safe (boxed futures), so the controller holds an
/// `Arc<dyn ContainerRuntime>` and is not generic over it. Each method
/// behaves as the [`Engine`] method of the same name documents.
pub trait ContainerRuntime: Send + Sync {
    fn ping(&self) -> BoxFuture<'_, Result<(), DockerError>>;
    fn image_exists<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<bool, DockerError>>;
    fn pull<'a>(
        &'a self,
        image: &'a str,
        docker_config: Option<&'a Path>,
        progress: &'a mut (dyn FnMut(String) + Send),
    ) -> BoxFuture<'a, Result<(), DockerError>>;
    fn create_and_start<'a>(
        &'a self,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>>;
    fn start<'a>(
        &'a self,
        id: &'a str,
        container_port: u16,
    ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>>;
    fn inspect<'a>(
        &'a self,
        id: &'a str,
        container_port: u16,
    ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>>;
    fn stop_and_remove<'a>(
        &'a self,
        id: &'a str,
        stop_timeout: Duration,
    ) -> BoxFuture<'a, Result<(), DockerError>>;
    fn remove_force<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), DockerError>>;
    fn logs_tail<'a>(
        &'a self,
        id: &'a str,
        lines: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, DockerError>>;
    /// One service's managed containers (every instance's), with the host
    /// address of `container_port`.
    fn list_service<'a>(
        &'a self,
        service: &'a str,
        container_port: u16,
    ) -> BoxFuture<'a, Result<Vec<ContainerInfo>, DockerError>>;
    fn remove_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), DockerError>>;
}

impl ContainerRuntime for Engine {
    fn ping(&self) -> BoxFuture<'_, Result<(), DockerError>> {
        Box::pin(Engine::ping(self))
    }
    fn image_exists<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<bool, DockerError>> {
        Box::pin(Engine::image_exists(self, image))
    }
    fn pull<'a>(
        &'a self,
        image: &'a str,
        docker_config: Option<&'a Path>,
        progress: &'a mut (dyn FnMut(String) + Send),
    ) -> BoxFuture<'a, Result<(), DockerError>> {
        Box::pin(Engine::pull(self, image, docker_config, progress))
    }
    fn create_and_start<'a>(
        &'a self,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>> {
        Box::pin(Engine::create_and_start(self, spec))
    }
    fn start<'a>(
        &'a self,
        id: &'a str,
        container_port: u16,
    ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>> {
        Box::pin(Engine::start(self, id, container_port))
    }
    fn inspect<'a>(
        &'a self,
        id: &'a str,
        container_port: u16,
    ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>> {
        Box::pin(Engine::inspect(self, id, container_port))
    }
    fn stop_and_remove<'a>(
        &'a self,
        id: &'a str,
        stop_timeout: Duration,
    ) -> BoxFuture<'a, Result<(), DockerError>> {
        Box::pin(Engine::stop_and_remove(self, id, stop_timeout))
    }
    fn remove_force<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), DockerError>> {
        Box::pin(Engine::remove_force(self, id))
    }
    fn logs_tail<'a>(
        &'a self,
        id: &'a str,
        lines: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, DockerError>> {
        Box::pin(Engine::logs_tail(self, id, lines))
    }
    fn list_service<'a>(
        &'a self,
        service: &'a str,
        container_port: u16,
    ) -> BoxFuture<'a, Result<Vec<ContainerInfo>, DockerError>> {
        Box::pin(async move {
            Engine::list_managed(self, Some(service), &move |_| Some(container_port)).await
        })
    }
    fn remove_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), DockerError>> {
        Box::pin(Engine::remove_image(self, image))
    }
}

/// `"8080/tcp"`: how the engine keys ports in every map.
fn port_key(port: u16) -> String {
    format!("{port}/tcp")
}

/// The create request for `spec`. Only fields that exist at API 1.41.
fn container_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let key = port_key(spec.container_port);
    let binding = PortBinding {
        host_ip: Some(PUBLISH_IP.to_string()),
        // An empty host port asks the engine for an ephemeral one.
        host_port: Some(spec.host_port.map(|p| p.to_string()).unwrap_or_default()),
    };
    let host_config = HostConfig {
        init: Some(true),
        port_bindings: Some(HashMap::from([(key.clone(), Some(vec![binding]))])),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        binds: non_empty(&spec.volumes),
        extra_hosts: non_empty(&spec.extra_hosts),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: non_empty(&spec.env),
        exposed_ports: Some(vec![key]),
        labels: Some(labels(spec)),
        host_config: Some(host_config),
        ..Default::default()
    }
}

fn labels(spec: &ContainerSpec) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_SERVICE.to_string(), spec.service.clone()),
        (LABEL_COLOR.to_string(), spec.color.clone()),
        (LABEL_IMAGE.to_string(), spec.image.clone()),
        (LABEL_DEPLOY.to_string(), spec.deploy_id.clone()),
        (LABEL_INSTANCE.to_string(), spec.instance.clone()),
    ])
}

/// Leaves a field unset rather than sending an empty list, so the image's own
/// defaults are not overridden by accident.
fn non_empty(items: &[String]) -> Option<Vec<String>> {
    (!items.is_empty()).then(|| items.to_vec())
}

/// Reduces an inspect response to a [`ContainerInfo`].
fn container_info(
    response: ContainerInspectResponse,
    container_port: Option<u16>,
) -> Result<ContainerInfo, DockerError> {
    let id = response
        .id
        .ok_or_else(|| DockerError::Protocol("inspect returned no container id".into()))?;
    let config = response.config.unwrap_or_default();
    let mut labels = config.labels.unwrap_or_default();
    let state = response.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let finished = matches!(
        state.status,
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
    );
    let host_addr = container_port.and_then(|port| {
        let ports = response.network_settings.as_ref()?.ports.as_ref()?;
        published_addr(ports.get(&port_key(port))?.as_deref()?)
    });
    let image = labels
        .remove(LABEL_IMAGE)
        .or(config.image)
        .unwrap_or_default();
    Ok(ContainerInfo {
        id,
        name: response
            .name
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        image,
        service: labels.remove(LABEL_SERVICE),
        color: labels.remove(LABEL_COLOR),
        deploy_id: labels.remove(LABEL_DEPLOY),
        instance: labels.remove(LABEL_INSTANCE),
        running,
        exit_code: if finished { state.exit_code } else { None },
        host_addr,
        started_at: state.started_at.filter(|t| !t.is_empty() && t != ZERO_TIME),
    })
}

/// The first usable binding, as an address the proxy can dial. Bindings on the
/// wildcard address (not made by us, but possible) are dialled on loopback.
fn published_addr(bindings: &[PortBinding]) -> Option<SocketAddr> {
    bindings.iter().find_map(|binding| {
        let port: u16 = binding.host_port.as_deref()?.parse().ok()?;
        let ip = binding
            .host_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .filter(|ip| !ip.is_unspecified())
            .unwrap_or(IpAddr::V4(PUBLISH_IP));
        Some(SocketAddr::new(ip, port))
    })
}

/// Splits raw log output into lines, dropping line endings.
fn split_lines(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .lines()
        .map(str::to_string)
        .collect()
}

/// One human-readable line per pull progress message, e.g.
/// `a1b2c3: Downloading 1024/4096`.
fn progress_line(
    id: Option<&str>,
    status: Option<&str>,
    bytes: Option<(i64, i64)>,
) -> Option<String> {
    let status = status?;
    let mut line = match id {
        Some(id) => format!("{id}: {status}"),
        None => status.to_string(),
    };
    if let Some((current, total)) = bytes {
        line.push_str(&format!(" {current}/{total}"));
    }
    Some(line)
}

/// An image reference split the way the engine's pull endpoint wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageRef {
    /// Registry host, `docker.io` when the reference names none.
    registry: String,
    /// Everything but the tag (a digest, if any, stays here).
    repository: String,
    /// Explicit tag, `latest` when neither tag nor digest is given.
    tag: Option<String>,
}

impl ImageRef {
    /// Follows docker's rule: the first path component is a registry if it has a
    /// `.` or `:` in it or is `localhost`; otherwise the image is on Docker Hub.
    fn parse(image: &str) -> Self {
        let registry = match image.split_once('/') {
            Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
                first.to_string()
            }
            _ => DOCKER_HUB.to_string(),
        };
        if image.contains('@') {
            return ImageRef {
                registry,
                repository: image.to_string(),
                tag: None,
            };
        }
        let last_slash = image.rfind('/').map_or(0, |i| i + 1);
        match image[last_slash..].rsplit_once(':') {
            Some((_, tag)) => ImageRef {
                registry,
                repository: image[..image.len() - tag.len() - 1].to_string(),
                tag: Some(tag.to_string()),
            },
            None => ImageRef {
                registry,
                repository: image.to_string(),
                tag: Some("latest".into()),
            },
        }
    }
}

/// The part of docker's `config.json` that holds credentials.
#[derive(Debug, Default, Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    identitytoken: Option<String>,
}

/// Reads the credentials for `registry` from a docker config file.
fn credentials_from_file(
    path: &Path,
    registry: &str,
) -> Result<Option<DockerCredentials>, DockerError> {
    let fail = |message: String| DockerError::Credentials {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let config: DockerConfigFile = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    credentials_for(&config, registry).map_err(fail)
}

/// Finds the `auths` entry for `registry`. Keys come in several spellings
/// (`https://index.docker.io/v1/`, `registry.example.com`, `https://host/v2/`),
/// so both sides are reduced to a bare host first.
fn credentials_for(
    config: &DockerConfigFile,
    registry: &str,
) -> Result<Option<DockerCredentials>, String> {
    let wanted = canonical_registry(registry);
    let Some((key, entry)) = config
        .auths
        .iter()
        .find(|(key, _)| canonical_registry(key) == wanted)
    else {
        return Ok(None);
    };
    let mut credentials = DockerCredentials {
        serveraddress: Some(key.clone()),
        identitytoken: entry.identitytoken.clone(),
        ..Default::default()
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| format!("auths.{key}.auth is not base64: {e}"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| format!("auths.{key}.auth is not UTF-8"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| format!("auths.{key}.auth is not user:password"))?;
        credentials.username = Some(user.to_string());
        credentials.password = Some(pass.to_string());
    }
    Ok(Some(credentials))
}

/// `https://index.docker.io/v1/` → `docker.io`, `http://host:5000/v2/` → `host:5000`.
fn canonical_registry(name: &str) -> String {
    let name = name
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = name.split('/').next().unwrap_or(name).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs_split_like_docker() {
        let r = ImageRef::parse("nginx");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "nginx", Some("latest"))
        );
        let r = ImageRef::parse("library/nginx:1.27");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/nginx", Some("1.27"))
        );
        let r = ImageRef::parse("localhost:5000/web");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "localhost:5000/web", Some("latest"))
        );
        let r = ImageRef::parse("ghcr.io/acme/web:v2");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("ghcr.io", "ghcr.io/acme/web", Some("v2"))
        );
        let r = ImageRef::parse("ghcr.io/acme/web@sha256:abcd");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("ghcr.io", "ghcr.io/acme/web@sha256:abcd", None)
        );
    }

    #[test]
    fn credentials_match_any_key_spelling() {
        let config: DockerConfigFile = serde_json::from_str(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="},
                "registry.example.com:5000": {"auth": "Ym9iOnNlY3JldA=="}
            }}"#,
        )
        .expect("valid test json");
        let hub = credentials_for(&config, "docker.io")
            .expect("decodes")
            .expect("found");
        assert_eq!(hub.username.as_deref(), Some("user"));
        assert_eq!(hub.password.as_deref(), Some("pa:ss"));
        let other = credentials_for(&config, "registry.example.com:5000")
            .expect("decodes")
            .expect("found");
        assert_eq!(other.username.as_deref(), Some("bob"));
        assert!(credentials_for(&config, "ghcr.io")
            .expect("no error")
            .is_none());
    }

    #[test]
    fn bad_auth_is_an_error_not_a_panic() {
        let config: DockerConfigFile =
            serde_json::from_str(r#"{"auths": {"ghcr.io": {"auth": "!!!"}}}"#)
                .expect("valid test json");
        assert!(credentials_for(&config, "ghcr.io").is_err());
    }

    #[test]
    fn published_addr_prefers_binding_ip() {
        let bindings = [PortBinding {
            host_ip: Some("127.0.0.1".into()),
            host_port: Some("49153".into()),
        }];
        assert_eq!(
            published_addr(&bindings),
            Some(SocketAddr::from(([127, 0, 0, 1], 49153)))
        );
        let wildcard = [PortBinding {
            host_ip: Some("0.0.0.0".into()),
            host_port: Some("80".into()),
        }];
        assert_eq!(
            published_addr(&wildcard),
            Some(SocketAddr::from(([127, 0, 0, 1], 80)))
        );
        let empty = [PortBinding {
            host_ip: None,
            host_port: Some(String::new()),
        }];
        assert_eq!(published_addr(&empty), None);
    }

    #[test]
    fn spec_debug_hides_env_values() {
        let spec = ContainerSpec {
            env: vec!["TOKEN=hunter2".into()],
            ..Default::default()
        };
        let text = format!("{spec:?}");
        assert!(text.contains("TOKEN"));
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn engine_errors_map_by_status() {
        let err = DockerError::from(BollardError::DockerResponseServerError {
            status_code: 404,
            message: "No such image: x".into(),
        });
        assert!(matches!(err, DockerError::NotFound(ref m) if m == "No such image: x"));
        let err = DockerError::from(BollardError::SocketNotFoundError("/nope.sock".into()));
        assert!(err.is_unreachable());
    }
}
