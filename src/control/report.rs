//! What the controller's operations return, as typed values: the reports
//! the admin socket sends back (serialized with serde) and the error kinds
//! a failure is sorted into. The admin protocol (`admin::proto`) re-exports
//! these, so the server, the CLI, the tests and the benches share one
//! definition instead of reading JSON by string key.
//!
//! These are plain data: no behaviour beyond (de)serialization, so the
//! admin layer can depend on them without reaching into the controller.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::DeployRecord;
use crate::acme::CertStatus;

/// How a failed admin command failed; each kind has its own CLI exit code
/// (see `docs/admin-protocol.md`), so CI scripts can branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The operation ran and failed (unhealthy new upstream, failed
    /// deploy, engine error, state file not writable). Nothing moved.
    Failed,
    /// The request itself was refused: malformed, unknown service,
    /// nothing to roll back to, a config that does not validate.
    Refused,
    /// Another deploy, rollback or switch of the service is running; the
    /// same request may succeed later.
    Busy,
}

/// Timings of the persist-then-swap step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapTimings {
    /// Time to write the state file (temp, fsync, rename, fsync dir).
    pub persist_us: u64,
    /// Time of the swap itself: one `ArcSwap::store`.
    pub swap_ns: u64,
}

/// What draining the old upstream did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Every in-flight request ended before the drain timeout.
    pub drained: bool,
    pub drain_ms: u64,
    /// Requests still running on the old upstream at the drain timeout.
    pub still_in_flight: usize,
    /// WebSocket tunnels open on the old upstream when traffic moved.
    pub websockets_at_switch: usize,
}

/// The result of `switch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchReport {
    pub service: String,
    pub color: String,
    pub upstream: String,
    pub timings: SwapTimings,
    /// `None` when the service had no active upstream before.
    pub drain: Option<DrainReport>,
}

/// Timings of a deploy, from the image check to the end of the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployTimings {
    pub start_ms: u64,
    pub healthy_ms: u64,
    pub persist_us: u64,
    pub swap_ns: u64,
    pub drain_ms: u64,
    pub total_ms: u64,
}

/// The result of `deploy` (and of a rollback that had to start the
/// previous image again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    pub service: String,
    pub color: String,
    pub image: String,
    pub container: String,
    pub upstream: String,
    pub deploy_id: String,
    pub timings: DeployTimings,
    pub drain: Option<DrainReport>,
    /// `deploy --canary`: the share the new colour took, in basis points;
    /// the old colour stays active until `promote` or `abort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_share_bp: Option<u32>,
    /// The bake window's verdict, when the service has `bake`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeReport>,
}

/// What a bake window saw of the new colour, and what it decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeReport {
    /// The colour judged.
    pub color: String,
    /// `"canary"` or `"switch"`: judged as a share, or after a full switch.
    pub phase: String,
    /// `"running"`, `"passed"`, `"breached"` (rolled back) or
    /// `"interrupted"` (another operation, or shutdown, ended it).
    pub state: String,
    /// Answers of the new colour since the window began.
    pub requests: u64,
    /// Of those, 5xx (the app's own and cutover's 502/504 for it).
    pub errors: u64,
    /// p99 latency, as the upper bound of its histogram bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<u64>,
    /// Time judged so far.
    pub elapsed_ms: u64,
    /// Why it breached, in words with the thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// From the tick that saw the breach to the snapshot that sent every
    /// new request back to the previous colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breach_to_switch_ms: Option<u64>,
    /// Unix seconds of the last change.
    pub at: u64,
}

/// The result of `promote`: the canary took all traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteReport {
    pub service: String,
    pub color: String,
    pub image: Option<String>,
    pub upstream: String,
    /// Always `true`: tells this report from the others.
    pub promoted: bool,
    pub timings: SwapTimings,
    pub drain: Option<DrainReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeReport>,
}

/// The result of `abort` (or `rollback` during a canary): every client is
/// back on the active colour and the canary's container is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortReport {
    pub service: String,
    /// The colour that serves everything again.
    pub color: String,
    /// The canary that was ended.
    pub aborted_canary: String,
    pub canary_image: Option<String>,
    /// The canary's container was stopped and removed.
    pub removed: bool,
    pub drain: DrainReport,
}

/// The result of an instant rollback: traffic went back to the warm
/// previous colour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapBackReport {
    pub service: String,
    pub color: String,
    pub image: String,
    /// Always `true`: tells this report from a [`DeployReport`].
    pub instant: bool,
    pub upstream: String,
    pub timings: SwapTimings,
    pub drain: Option<DrainReport>,
}

/// The result of `rollback`: an instant swap back, or a redeploy of the
/// previous image when its container was gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RollbackReport {
    /// A rollback during a canary is an abort; listed first: only this
    /// variant has the `aborted_canary` field.
    Abort(AbortReport),
    /// Only this variant has the `instant` field.
    Instant(SwapBackReport),
    Redeploy(Box<DeployReport>),
}

/// The result of `pause` and `resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReport {
    pub service: String,
    pub paused: bool,
}

/// The result of `reload`: the config file that was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub config: String,
}

/// The result of `renew`: the new certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewReport {
    pub certificate: CertStatus,
}

/// The result of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub services: BTreeMap<String, ServiceStatus>,
    /// "not used", "ok", or why the engine is unreachable.
    pub docker: String,
    /// Every certificate; only in the report of all services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<Vec<CertStatus>>,
    /// Each worker thread's connections; only in the report of all
    /// services, and only with more than one worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<crate::routing::workers::WorkerStatus>,
    /// Idle HTTP/1.1 connections parked (all workers).
    #[serde(default)]
    pub parking: crate::routing::workers::ParkingStatus,
}

/// One service in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// `None`: the service has no upstream and answers 503.
    pub active: Option<ActiveStatus>,
    /// The warm previous colour, while it is kept for a rollback.
    pub previous: Option<PreviousStatus>,
    pub last_deploy: Option<DeployRecord>,
    /// A container being created, or whose create was cut short by a crash
    /// or an engine outage and is watched for so it can be removed.
    pub starting: Option<String>,
    pub paused: bool,
    /// The active upstream was chosen by a switch or deploy, not the config.
    pub pinned: bool,
    /// A deploy, rollback or switch of the service is running.
    pub busy: bool,
    /// The service runs containers (it has an `image`).
    pub managed: bool,
    /// The canary taking a share of the clients, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    /// The last bake window (running, passed or breached) since start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeReport>,
}

/// A service's canary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub color: String,
    pub upstream: String,
    pub container: Option<String>,
    pub image: Option<String>,
    /// Its share of newly assigned clients, in basis points.
    pub share_bp: u32,
    /// Answers it gave since it started, and how many were 5xx.
    pub requests: u64,
    pub errors: u64,
    pub in_flight: usize,
}

/// The active upstream of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveStatus {
    pub color: String,
    pub upstream: String,
    pub in_flight: usize,
    pub websockets: usize,
    pub container: Option<String>,
    pub image: Option<String>,
    /// Unix seconds when it became active (from the state file).
    pub since: Option<u64>,
    pub active_for_s: Option<u64>,
    /// "healthy" or "unhealthy: why", from one probe made for this report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Answers it gave since it became active (since this server started),
    /// and how many were 5xx.
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub errors: u64,
}

/// The warm previous colour of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousStatus {
    pub color: String,
    pub upstream: String,
    pub container: Option<String>,
    pub image: Option<String>,
    /// Seconds until its container is retired.
    pub warm_for_s: u64,
}

/// What `cutover upgrade` did: the new process that now serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub pid: u32,
    pub binary: String,
    /// From starting the new process to its `ready`.
    pub ready_ms: u64,
}

/// The result of any command, as the admin server sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Report {
    Status(StatusReport),
    Switch(SwitchReport),
    Pause(PauseReport),
    Reload(ReloadReport),
    Renew(RenewReport),
    Deploy(DeployReport),
    Rollback(RollbackReport),
    Promote(PromoteReport),
    Abort(AbortReport),
    Upgrade(UpgradeReport),
}

impl Report {
    /// The status report, if this is one.
    pub fn into_status(self) -> Option<StatusReport> {
        match self {
            Report::Status(report) => Some(report),
            _ => None,
        }
    }

    /// The switch report, if this is one.
    pub fn into_switch(self) -> Option<SwitchReport> {
        match self {
            Report::Switch(report) => Some(report),
            _ => None,
        }
    }

    /// The deploy report, if this is one.
    pub fn into_deploy(self) -> Option<DeployReport> {
        match self {
            Report::Deploy(report) => Some(report),
            _ => None,
        }
    }
}
