//! The admin socket: a Unix socket speaking one JSON request per line and
//! answering with JSON lines — zero or more `progress` events, then exactly
//! one final `ok` or `error`. The CLI and the tests use this one protocol.
//!
//! ```text
//! → {"v":1,"cmd":"switch","service":"web","to":"127.0.0.1:9001"}
//! ← {"type":"progress","step":"health","message":"health 1/1 (attempt 1): ok"}
//! ← {"type":"progress","step":"switched","message":"switched web to green ..."}
//! ← {"type":"ok","result":{...}}
//! ```
//!
//! `v` is the protocol version; a request from a newer client is refused
//! with an error rather than misread. A malformed line gets an `error` reply
//! and the connection keeps serving. Operations run in their own task on
//! the server's task tracker, so a client that disconnects mid-switch does
//! not abort the switch, and a shutdown cancels the operation (through a
//! child of the shutdown token) and waits for its clean-up.

mod client;
pub mod group;
pub mod proto;

pub use client::{call, ClientError};
pub use proto::{decode_request, encode_request, Command, Reply, PROTOCOL_VERSION};

/// Longest request line accepted; longer lines get an error reply.
const MAX_LINE: usize = 64 * 1024;

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{ControlError, Controller, ImageChoice, Progress};
use proto::{ErrorKind, ErrorReply, ProgressEvent, Report};

/// Why the admin socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}: another cutover is already serving this admin socket")]
    InUse(PathBuf),
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("admin_group: {0}")]
    Group(#[from] group::GroupError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the admin socket, owner-only (0600) inside a directory we create
/// 0700. With `group`, the socket is 0660 and owned by that group (and a
/// directory we create is 0750, same group), so its members can use it:
/// anyone who can write to the socket can deploy, switch and roll back.
/// A leftover socket from a crashed server is removed; a live one means a
/// second server, which is refused.
pub async fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Resolve first: an unknown group must fail before anything changes.
    let gid = group
        .map(|name| group::resolve(name, Path::new(group::GROUP_FILE)))
        .transpose()?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(AdminError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse(path.to_path_buf()));
        }
        tracing::info!(path = %path.display(), "removing stale admin socket");
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            let mode = if gid.is_some() { 0o750 } else { 0o700 };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(parent)
                .map_err(io)?;
            if gid.is_some() {
                std::os::unix::fs::chown(parent, None, gid).map_err(io)?;
            }
        }
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    // Group before mode: until the chmod, the group cannot write (umask).
    if gid.is_some() {
        if let Err(err) = std::os::unix::fs::chown(path, None, gid) {
            let _ = std::fs::remove_file(path);
            return Err(io(err));
        }
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// Serves admin connections until `shutdown`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    controller: Arc<Controller>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    tracing::info!(path = %path.display(), "admin socket listening");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let controller = Arc::clone(&controller);
                let (shutdown, operations) = (shutdown.clone(), tasks.clone());
                tasks.spawn(
                    async move { connection(stream, controller, shutdown, operations).await },
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    // After an upgrade the new process serves this same socket (it was
    // handed over): the path is its now. Anyone else: remove it.
    drop(listener);
    if UnixStream::connect(&path).await.is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// Answers requests on one connection, one at a time, until it closes.
/// Operations run on `tasks` with a child of `shutdown`.
async fn connection(
    stream: UnixStream,
    controller: Arc<Controller>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let (read, mut out) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let line = tokio::select! {
            line = read_line(&mut reader, MAX_LINE) => line,
            _ = shutdown.cancelled() => return,
        };
        let command = match line {
            Err(_) | Ok(Line::End) => return,
            Ok(Line::TooLong) => Err(format!("request line longer than {MAX_LINE} bytes")),
            Ok(Line::Text(line)) if line.trim().is_empty() => continue,
            Ok(Line::Text(line)) => decode_request(&line),
        };
        let sent = match command {
            Ok(command) => {
                let operation = Operation {
                    controller: Arc::clone(&controller),
                    cancel: shutdown.child_token(),
                };
                execute(command, operation, &tasks, &mut out).await
            }
            Err(message) => {
                let error = ErrorReply::new(ErrorKind::Refused, message);
                send(&mut out, &Reply::Error { error }).await
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// One line read from a client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    /// The line exceeded the limit; it was read to its end and dropped, so
    /// the next line starts clean.
    TooLong,
    End,
}

/// Reads one `\n`-terminated line of at most `max` bytes without ever
/// buffering more than that.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                Line::End
            } else if too_long {
                Line::TooLong
            } else {
                Line::Text(String::from_utf8_lossy(&line).into_owned())
            });
        }
        let (chunk, found_newline) = match available.iter().position(|b| *b == b'\n') {
            Some(end) => (&available[..end], true),
            None => (available, false),
        };
        if !too_long {
            if line.len() + chunk.len() > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let consumed = chunk.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Text(String::from_utf8_lossy(&line).into_owned())
            });
        }
    }
}

async fn send(out: &mut OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    out.write_all(line.as_bytes()).await
}

/// What an admin command runs with: the controller, and the token that
/// cancels it (a child of the server's shutdown token).
struct Operation {
    controller: Arc<Controller>,
    cancel: CancellationToken,
}

/// Runs one command in its own task on `tasks`, streaming its progress as
/// it comes. If the client goes away, the command runs on (a half-done
/// deploy must finish or clean up), and shutdown still waits for it.
async fn execute(
    command: Command,
    operation: Operation,
    tasks: &TaskTracker,
    out: &mut OwnedWriteHalf,
) -> std::io::Result<()> {
    let (events, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let task = tasks.spawn(async move {
        let progress = Progress::new(events);
        run_command(command, &operation, &progress).await
    });
    while let Some(event) = receiver.recv().await {
        let progress = Reply::Progress(ProgressEvent {
            step: event.step,
            message: event.message,
        });
        if let Err(err) = send(out, &progress).await {
            tracing::info!(error = %err, "admin client went away; the operation continues, and shutdown waits for it");
            return Err(err);
        }
    }
    let reply = match task.await {
        Ok(Ok(report)) => match serde_json::to_value(report) {
            Ok(result) => Reply::Ok { result },
            Err(err) => Reply::Error {
                error: ErrorReply::new(
                    ErrorKind::Failed,
                    format!("internal error: the report does not serialize: {err}"),
                ),
            },
        },
        Ok(Err(error)) => Reply::Error { error },
        Err(join) => Reply::Error {
            error: ErrorReply::new(ErrorKind::Failed, format!("internal error: {join}")),
        },
    };
    send(out, &reply).await
}

async fn run_command(
    command: Command,
    operation: &Operation,
    progress: &Progress,
) -> Result<Report, ErrorReply> {
    let (controller, cancel) = (&operation.controller, &operation.cancel);
    let result = match command {
        Command::Status { service } => controller
            .status(service.as_deref())
            .await
            .map(Report::Status),
        Command::Switch { service, to, force } => {
            let to = to.parse().map_err(|_| {
                ErrorReply::new(
                    ErrorKind::Refused,
                    format!("invalid upstream address {to:?}: expected IP:PORT"),
                )
            })?;
            controller
                .switch(&service, to, force, progress)
                .await
                .map(Report::Switch)
        }
        Command::Pause { service } => controller.pause(&service).await.map(Report::Pause),
        Command::Resume { service } => controller.resume(&service).await.map(Report::Pause),
        Command::Reload {} => controller.reload(progress).await.map(Report::Reload),
        Command::Renew { name } => controller.renew(&name, progress).await.map(Report::Renew),
        Command::Upgrade { binary } => controller
            .upgrade(binary.map(PathBuf::from), progress)
            .await
            .map(Report::Upgrade),
        Command::Deploy {
            service,
            image,
            tag,
            docker_config,
            canary,
        } => {
            let choice = match (image, tag) {
                (Some(image), None) => ImageChoice::Image(image),
                (None, Some(tag)) => ImageChoice::Tag(tag),
                _ => {
                    return Err(ErrorReply::new(
                        ErrorKind::Refused,
                        "deploy needs exactly one of \"image\" or \"tag\"",
                    ))
                }
            };
            let canary = canary
                .as_deref()
                .map(crate::control::parse_share)
                .transpose()
                .map_err(|err| ErrorReply::new(ErrorKind::Refused, err))?;
            controller
                .deploy(
                    &service,
                    choice,
                    canary,
                    docker_config.map(PathBuf::from),
                    progress,
                    cancel,
                )
                .await
                .map(Report::Deploy)
        }
        Command::Promote { service } => controller
            .promote(&service, progress, cancel)
            .await
            .map(Report::Promote),
        Command::Abort { service } => controller
            .abort(&service, progress)
            .await
            .map(Report::Abort),
        Command::Rollback {
            service,
            docker_config,
        } => controller
            .rollback(&service, docker_config.map(PathBuf::from), progress, cancel)
            .await
            .map(Report::Rollback),
    };
    result.map_err(|err: ControlError| ErrorReply::new(err.kind(), err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlong_lines_are_dropped_and_reading_continues() {
        let input: &[u8] = b"short\nxxxxxxxxxxxxxxxx\nnext\ntail";
        let mut reader = BufReader::with_capacity(4, input);
        let mut lines = Vec::new();
        loop {
            match read_line(&mut reader, 8).await.expect("read") {
                Line::End => break,
                line => lines.push(line),
            }
        }
        assert_eq!(
            lines,
            vec![
                Line::Text("short".into()),
                Line::TooLong,
                Line::Text("next".into()),
                Line::Text("tail".into())
            ]
        );
    }

    #[test]
    fn requests_round_trip_with_version() {
        let command = Command::Switch {
            service: "web".into(),
            to: "127.0.0.1:9001".into(),
            force: true,
        };
        let line = encode_request(&command);
        assert!(line.contains("\"v\":1"), "{line}");
        assert_eq!(decode_request(&line), Ok(command));
    }

    #[test]
    fn malformed_requests_are_explained() {
        let cases = [
            ("not json", "not JSON"),
            ("[1]", "JSON object"),
            (r#"{"cmd":"status"}"#, "protocol version"),
            (r#"{"v":2,"cmd":"status"}"#, "not supported"),
            (r#"{"v":1,"cmd":"launch"}"#, "unknown variant"),
            (r#"{"v":1,"cmd":"pause"}"#, "missing field"),
            (r#"{"v":1,"cmd":"reload","extra":1}"#, "unknown field"),
        ];
        for (line, expected) in cases {
            let err = decode_request(line).expect_err(line);
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Line framing on arbitrary bytes arriving in arbitrary pieces:
        /// no panic, no line over the limit, and the short lines come out
        /// exactly as they went in.
        #[test]
        fn read_line_frames_any_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            piece in 1usize..64,
        ) {
            const MAX: usize = 40;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let lines = runtime.block_on(async {
                let (mut tx, rx) = tokio::io::duplex(piece);
                let input = bytes.clone();
                let writer = tokio::spawn(async move {
                    for chunk in input.chunks(piece) {
                        if tx.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                });
                let mut reader = BufReader::with_capacity(piece, rx);
                let mut lines = Vec::new();
                // At most one line per input byte, plus the end.
                for _ in 0..=bytes.len() + 1 {
                    match read_line(&mut reader, MAX).await.expect("duplex read") {
                        Line::End => break,
                        line => lines.push(line),
                    }
                }
                let _ = writer.await;
                lines
            });
            let mut expected: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
            if bytes.is_empty() || bytes.ends_with(b"\n") {
                expected.pop();
            }
            proptest::prop_assert_eq!(lines.len(), expected.len());
            for (line, raw) in lines.iter().zip(expected) {
                match line {
                    Line::Text(text) => {
                        proptest::prop_assert!(raw.len() <= MAX);
                        proptest::prop_assert_eq!(text, &String::from_utf8_lossy(raw).into_owned());
                    }
                    Line::TooLong => proptest::prop_assert!(raw.len() > MAX),
                    Line::End => proptest::prop_assert!(false, "End inside the input"),
                }
            }
        }
    }
}
