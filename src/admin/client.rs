//! The admin client: what `cutover status|switch|deploy|...` use to talk
//! to a running server over its admin socket.

use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec};

use super::proto::{decode_report, encode_request, exit, Command, ErrorReply, Reply, Report};

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the cutover admin socket {path}: {source} (is `cutover serve` running, and may you write to it?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("admin connection failed: {0}")]
    Io(String),
    #[error("server closed the connection before answering; the operation's outcome is unknown: check `cutover status`")]
    NoAnswer,
    #[error("server sent an unreadable reply: {0}")]
    BadReply(String),
    /// The server answered with an error.
    #[error("{0}")]
    Server(ErrorReply),
}

impl ClientError {
    /// The CLI exit code for this failure (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Connect { .. } => exit::UNREACHABLE,
            ClientError::Server(error) => error.kind.exit_code(),
            ClientError::Io(_) | ClientError::NoAnswer | ClientError::BadReply(_) => exit::FAILED,
        }
    }
}

/// Sends `command` and returns its report, calling `on_progress` for each
/// progress event as it arrives.
pub async fn call(
    socket: &Path,
    command: &Command,
    mut on_progress: impl FnMut(&str, &str),
) -> Result<Report, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let mut framed = Framed::new(stream, LinesCodec::new());
    framed
        .send(encode_request(command))
        .await
        .map_err(|err| ClientError::Io(err.to_string()))?;
    while let Some(line) = framed.next().await {
        let line = line.map_err(|err| ClientError::Io(err.to_string()))?;
        let reply: Reply =
            serde_json::from_str(&line).map_err(|err| ClientError::BadReply(err.to_string()))?;
        match reply {
            Reply::Progress(event) => on_progress(&event.step, &event.message),
            Reply::Ok { result } => {
                return decode_report(command, result)
                    .map_err(|err| ClientError::BadReply(err.to_string()))
            }
            Reply::Error { error } => return Err(ClientError::Server(error)),
        }
    }
    Err(ClientError::NoAnswer)
}
