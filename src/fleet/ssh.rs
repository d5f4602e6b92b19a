//! One `cutover` client command on a remote host, over the user's own
//! ssh: `ssh -T -o BatchMode=yes … HOST <command> ARGS --json`. The
//! remote CLI talks to its local admin socket; its JSON reply lines come
//! back on stdout and are read as the admin protocol's [`Reply`]s.
//!
//! ssh authenticates both ways before any command runs: a wrong or
//! missing key is refused by sshd (exit 255, "Permission denied"), which
//! this module reports as [`RemoteError::Refused`] and logs. BatchMode
//! means ssh never waits for a password or a host-key prompt.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use super::hosts::Host;
use crate::admin::proto::{exit, ErrorReply, Reply};

/// ssh's own exit status for its failures (connect, authentication).
const SSH_FAILED: i32 = 255;
/// How much of a remote command's stderr is kept for the error message.
const STDERR_LIMIT: usize = 16 * 1024;

/// Why a remote command did not answer `ok`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// sshd refused the identity (or the host key did not match): no
    /// command ran.
    #[error("ssh refused: {0}")]
    Refused(String),
    /// ssh could not connect (name, route, port, time-out).
    #[error("unreachable over ssh: {0}")]
    Unreachable(String),
    /// The remote cutover answered with an error; `code` is its exit code.
    #[error("{error}")]
    Cutover { code: u8, error: ErrorReply },
    /// The remote command ended without a reply: cutover not installed
    /// there, the connection dropped, or it crashed.
    #[error("no reply from the remote command (exit {code}): {stderr}")]
    NoReply { code: String, stderr: String },
    #[error("no answer within {0:?}; the outcome is unknown")]
    TimedOut(Duration),
    #[error("cannot run ssh: {0}")]
    Spawn(String),
}

impl RemoteError {
    /// The CLI exit code this failure maps to (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            RemoteError::Refused(_) | RemoteError::Unreachable(_) => exit::UNREACHABLE,
            RemoteError::Cutover { code, .. } => *code,
            RemoteError::Spawn(_) => exit::REFUSED,
            RemoteError::NoReply { .. } | RemoteError::TimedOut(_) => exit::FAILED,
        }
    }

    /// Whether the outcome of the command is unknown (it may have run).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, RemoteError::NoReply { .. } | RemoteError::TimedOut(_))
    }
}

/// Runs `cutover ARGS --json` (plus the host's socket or config) on
/// `host`, calling `on_progress(step, message)` for every progress line,
/// and returns the `ok` reply's result. Bounded by `limit`; the ssh
/// process is killed if this future is dropped.
pub async fn call(
    host: &Host,
    args: &[&str],
    limit: Duration,
    mut on_progress: impl FnMut(&str, &str),
) -> Result<Value, RemoteError> {
    let mut child = ssh_command(host, args)
        .spawn()
        .map_err(|err| RemoteError::Spawn(err.to_string()))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(RemoteError::Spawn("no pipes to the ssh process".into()));
    };
    let errors = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = (&mut stderr)
            .take(STDERR_LIMIT as u64)
            .read_to_end(&mut text)
            .await;
        // Keep reading past the limit so ssh never blocks on a full pipe.
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        String::from_utf8_lossy(&text).trim().to_string()
    });
    let exchange = async {
        let mut lines = BufReader::new(stdout).lines();
        let mut answer = None;
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Reply>(&line) {
                Ok(Reply::Progress(event)) => on_progress(&event.step, &event.message),
                Ok(Reply::Ok { result }) => answer = Some(Ok(result)),
                Ok(Reply::Error { error }) => answer = Some(Err(error)),
                // Anything else the remote side prints (a login banner, a
                // shell's complaint) is shown, not parsed.
                Err(_) if !line.trim().is_empty() => on_progress("remote", line.trim()),
                Err(_) => {}
            }
        }
        let status = child.wait().await;
        (answer, status)
    };
    let (answer, status) = match tokio::time::timeout(limit, exchange).await {
        Ok(done) => done,
        Err(_) => {
            errors.abort();
            return Err(RemoteError::TimedOut(limit));
        }
    };
    let stderr = errors.await.unwrap_or_default();
    let code = status.as_ref().ok().and_then(|status| status.code());
    match (answer, code) {
        (Some(Ok(result)), Some(0)) => Ok(result),
        (Some(Err(error)), code) => Err(RemoteError::Cutover {
            code: code
                .and_then(|code| u8::try_from(code).ok())
                .filter(|code| *code != 0)
                .unwrap_or_else(|| error.kind.exit_code()),
            error,
        }),
        (None, Some(SSH_FAILED)) => Err(ssh_failure(host, stderr)),
        (_, code) => Err(RemoteError::NoReply {
            code: code.map_or_else(|| "by a signal".to_string(), |c| c.to_string()),
            stderr: if stderr.is_empty() {
                "(nothing on stderr)".into()
            } else {
                stderr
            },
        }),
    }
}

/// Tells an authentication refusal from a connection failure, from
/// ssh's own stderr (it has no finer exit status), and logs it.
fn ssh_failure(host: &Host, stderr: String) -> RemoteError {
    let refused = [
        "Permission denied",
        "Host key verification failed",
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
    ]
    .iter()
    .any(|sign| stderr.contains(sign));
    if refused {
        tracing::warn!(host = %host.name, ssh = %host.ssh, reason = %stderr, "ssh refused this client's identity or the host's key");
        let hint = match &host.identity {
            Some(key) => format!("the key {} is not authorized there", key.display()),
            None => "no key of this user's is authorized there".to_string(),
        };
        RemoteError::Refused(format!(
            "{stderr} ({hint}, or the host key is not the known one)"
        ))
    } else {
        tracing::warn!(host = %host.name, ssh = %host.ssh, reason = %stderr, "ssh could not connect");
        RemoteError::Unreachable(stderr)
    }
}

/// `ssh [options] DEST -- <command> ARGS --json <socket args>`: the
/// command line is one string the remote shell splits, so every argument
/// is quoted; `command` itself is the user's shell fragment.
fn ssh_command(host: &Host, args: &[&str]) -> Command {
    let mut command = Command::new("ssh");
    command.args(["-T", "-o", "BatchMode=yes"]);
    command.arg("-o").arg(format!(
        "ConnectTimeout={}",
        host.connect_timeout.as_secs().max(1)
    ));
    // A host that dies mid-deploy is noticed within a minute.
    command.args([
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
    ]);
    if let Some(port) = host.port {
        command.arg("-p").arg(port.to_string());
    }
    if let Some(identity) = &host.identity {
        command.arg("-i").arg(identity);
        command.args(["-o", "IdentitiesOnly=yes"]);
    }
    for option in &host.ssh_options {
        command.arg("-o").arg(option);
    }
    let mut remote = vec![host.command.clone()];
    remote.extend(args.iter().map(|arg| quote(arg)));
    remote.push("--json".into());
    remote.extend(host.admin_args().iter().map(|arg| quote(arg)));
    command.arg(&host.ssh).arg(remote.join(" "));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a Ctrl-C meant for the rollout must not
        // kill the ssh sessions it still needs to finish and roll back.
        .process_group(0);
    command
}

/// `arg` as one word for a POSIX shell.
pub fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_each_argument_one_word() {
        assert_eq!(quote("web"), "web");
        assert_eq!(
            quote("registry.example/web:3f2a"),
            "registry.example/web:3f2a"
        );
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("x'; rm -rf /"), r"'x'\''; rm -rf /'");
        assert_eq!(quote("$(id)"), "'$(id)'");
    }
}
