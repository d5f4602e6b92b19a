//! The admin protocol: the typed request ([`Command`]), the reply lines
//! ([`Reply`]: [`ProgressEvent`]s, then one report or one [`ErrorReply`]),
//! the reports themselves and the CLI's exit codes. The server, the CLI,
//! the tests and the benches all use these types; nobody reads the JSON by
//! string key.
//!
//! The reports are defined by the controller that produces them
//! (`control::report`) and re-exported here, so this module imports only
//! downwards.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::acme::CertStatus;
pub use crate::control::report::{
    AbortReport, ActiveStatus, BakeReport, CanaryStatus, DeployReport, DeployTimings, DrainReport,
    ErrorKind, PauseReport, PreviousStatus, PromoteReport, ReloadReport, RenewReport, Report,
    RollbackReport, ServiceStatus, StatusReport, SwapBackReport, SwapTimings, SwitchReport,
};
pub use crate::control::state::DeployRecord;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// One admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Per-service state; all services when `service` is absent.
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    /// Move a service to another upstream address.
    Switch {
        service: String,
        to: String,
        #[serde(default)]
        force: bool,
    },
    /// Hold the service's new requests.
    Pause { service: String },
    /// Release held requests.
    Resume { service: String },
    /// Deploy an image (or a tag of the configured image) to a service.
    Deploy {
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// The caller's docker config.json, for pull credentials.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        docker_config: Option<String>,
        /// Run the new colour as a canary with this share of the clients
        /// (`"10%"`) instead of switching everything to it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<String>,
    },
    /// Switch everything to the service's canary (with the usual drain).
    Promote { service: String },
    /// End the service's canary: every client back on the active colour.
    Abort { service: String },
    /// Swap back to the warm previous colour, or redeploy its image.
    Rollback {
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        docker_config: Option<String>,
    },
    /// Re-read the config file and certificates. (A struct variant, so
    /// unknown fields are rejected as for every other command.)
    Reload {},
    /// Order a new certificate for an automatic (`tls = "acme"`) name now.
    Renew { name: String },
    /// Hand the listening sockets to a new process running `binary` (this
    /// server's executable when absent), then drain and exit.
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
    },
}

/// One reply line: zero or more `progress`, then one `ok` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Progress(ProgressEvent),
    /// The command's report; its shape depends on the command (see
    /// [`decode_report`]).
    Ok {
        result: Value,
    },
    Error {
        error: ErrorReply,
    },
}

/// One step of a running operation, as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// A short machine-readable step name: `health`, `starting`,
    /// `switched`, `drain`, `drained`, `done`, ...
    pub step: String,
    pub message: String,
}

/// Why a command did not succeed: a kind to branch on, a message to show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

impl ErrorReply {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            kind,
            message: message.into(),
        }
    }
}

/// The `cutover` client commands' exit codes (documented in
/// `docs/admin-protocol.md`; CI scripts branch on them).
pub mod exit {
    /// The command did what it was asked.
    pub const SUCCESS: u8 = 0;
    /// The operation ran and failed (deploy or health check failed); the
    /// serving upstream is untouched. Also: the outcome is unknown because
    /// the server stopped answering mid-command.
    pub const FAILED: u8 = 1;
    /// The request was refused: invalid input, unknown service, nothing to
    /// roll back to, a config that does not validate.
    pub const REFUSED: u8 = 2;
    /// The service is busy with another operation; retry later.
    pub const BUSY: u8 = 3;
    /// The admin socket could not be reached (no server, wrong path, no
    /// permission).
    pub const UNREACHABLE: u8 = 4;
}

impl ErrorKind {
    /// The CLI exit code for a failure of this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Failed => exit::FAILED,
            ErrorKind::Refused => exit::REFUSED,
            ErrorKind::Busy => exit::BUSY,
        }
    }
}

/// Reads an `ok` reply's `result` as the report of `command`: the client
/// knows what it asked, so the report needs no tag of its own.
pub fn decode_report(command: &Command, result: Value) -> Result<Report, serde_json::Error> {
    Ok(match command {
        Command::Status { .. } => Report::Status(serde_json::from_value(result)?),
        Command::Switch { .. } => Report::Switch(serde_json::from_value(result)?),
        Command::Pause { .. } | Command::Resume { .. } => {
            Report::Pause(serde_json::from_value(result)?)
        }
        Command::Reload {} => Report::Reload(serde_json::from_value(result)?),
        Command::Renew { .. } => Report::Renew(serde_json::from_value(result)?),
        Command::Deploy { .. } => Report::Deploy(serde_json::from_value(result)?),
        Command::Rollback { .. } => Report::Rollback(serde_json::from_value(result)?),
        Command::Promote { .. } => Report::Promote(serde_json::from_value(result)?),
        Command::Abort { .. } => Report::Abort(serde_json::from_value(result)?),
        Command::Upgrade { .. } => Report::Upgrade(serde_json::from_value(result)?),
    })
}

/// A request line as sent: the version plus the command's fields.
pub fn encode_request(command: &Command) -> String {
    let mut value = serde_json::to_value(command).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("v".into(), Value::from(PROTOCOL_VERSION));
    }
    value.to_string()
}

/// Parses one request line, with an error message fit to send back.
pub fn decode_request(line: &str) -> Result<Command, String> {
    let mut value: Value =
        serde_json::from_str(line).map_err(|err| format!("request is not JSON: {err}"))?;
    let Value::Object(map) = &mut value else {
        return Err("request must be a JSON object".into());
    };
    let version = map
        .remove("v")
        .ok_or("request has no protocol version \"v\"")?;
    match version.as_u64() {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        _ => {
            return Err(format!(
            "protocol version {version} is not supported; this server speaks v{PROTOCOL_VERSION}"
        ))
        }
    }
    serde_json::from_value(value).map_err(|err| format!("invalid request: {err}"))
}
