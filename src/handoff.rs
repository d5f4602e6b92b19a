//! `cutover upgrade`: a running server hands its listening sockets (and
//! the admin socket) to a new process, which serves the same config and
//! state; only when it reports ready does the old one stop accepting and
//! drain. No listening socket is closed on the way, so no connection is
//! refused: ones queued while the processes change are accepted by the
//! new one.
//!
//! The old process starts the new binary with one end of a socket pair as
//! its stdin and `CUTOVER_HANDOFF_FD=0` in its environment, sends the
//! sockets over the pair (`SCM_RIGHTS`, through rustix's safe `sendmsg`),
//! and reads one line back: `ready`, or `error: ...` with why the new
//! process could not start (then it exits, and the old serves on).

use std::io::{IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::control::report::UpgradeReport;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::control::upgrade::Upgrade;
use crate::control::Progress;
use crate::proxy::{Inherited, ListenError};
use crate::rebind::LiveListeners;

/// Set in the new process's environment: the fd of its end of the pair.
pub const HANDOFF_ENV: &str = "CUTOVER_HANDOFF_FD";

/// How long the new process gets to report ready (it restores the state
/// file and reconciles with Docker first) before it is killed.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many sockets change hands: http, https, admin.
const MAX_SOCKETS: usize = 3;

/// The old process's side: what it hands over and how it steps aside.
pub struct Upgrader {
    listeners: Arc<LiveListeners>,
    /// A duplicate of the admin socket, dropped when shutdown starts so
    /// the socket closes with the server as before.
    admin: Mutex<Option<OwnedFd>>,
    config: PathBuf,
    /// This executable's path, read at start: once the file is replaced
    /// (the usual way to install a new version), Linux reports the running
    /// one as "PATH (deleted)".
    executable: std::io::Result<PathBuf>,
    /// Cancelled once the new process serves: this one then drains.
    upgraded: CancellationToken,
}

impl Upgrader {
    pub fn new(
        listeners: Arc<LiveListeners>,
        admin: Option<OwnedFd>,
        config: PathBuf,
        upgraded: CancellationToken,
    ) -> Upgrader {
        Upgrader {
            listeners,
            admin: Mutex::new(admin),
            config,
            executable: std::env::current_exe(),
            upgraded,
        }
    }

    /// Drops the duplicates kept for a hand-off (shutdown has started).
    pub fn release(&self) {
        self.admin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn admin_socket(&self) -> Result<Option<OwnedFd>, String> {
        let admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        admin
            .as_ref()
            .map(OwnedFd::try_clone)
            .transpose()
            .map_err(|err| format!("cannot duplicate the admin socket: {err}"))
    }

    async fn hand_off(
        &self,
        binary: Option<PathBuf>,
        progress: &Progress,
    ) -> Result<UpgradeReport, String> {
        if self.upgraded.is_cancelled() {
            return Err("this process has already handed over to a new one and is draining".into());
        }
        let binary = match binary {
            Some(binary) => binary,
            None => match &self.executable {
                Ok(path) => path.clone(),
                Err(err) => return Err(format!("cannot find this server's executable: {err}")),
            },
        };
        let mut sockets = self
            .listeners
            .sockets()
            .map_err(|err| format!("cannot duplicate the listening sockets: {err}"))?;
        let mut kinds = vec!["tcp"; sockets.len()];
        if let Some(admin) = self.admin_socket()? {
            sockets.push(admin);
            kinds.push("admin");
        }
        let (ours, theirs) =
            UnixStream::pair().map_err(|err| format!("cannot create a socket pair: {err}"))?;
        let started = Instant::now();
        let mut command = tokio::process::Command::new(&binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env(HANDOFF_ENV, "0")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::from(OwnedFd::from(theirs)));
        let mut child = command
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", binary.display()))?;
        // Close our copy of the new process's end: EOF then means it exited.
        drop(command);
        let pid = child.id().unwrap_or_default();
        progress.emit(
            "started",
            format!(
                "started {} (pid {pid}); handing over {} sockets",
                binary.display(),
                sockets.len()
            ),
        );
        let borrowed: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
        let sent = send_sockets(&ours, &borrowed, &kinds.join(" "));
        drop(borrowed);
        drop(sockets);
        let report = match sent {
            Ok(()) => read_report(ours).await,
            Err(err) => Err(format!("it exited before taking the sockets ({err})")),
        };
        let ready_ms = started.elapsed().as_millis() as u64;
        match report {
            Ok(line) if line == "ready" => {
                progress.emit(
                    "ready",
                    format!("pid {pid} serves after {ready_ms} ms; this process stops accepting and drains"),
                );
                self.upgraded.cancel();
                Ok(UpgradeReport {
                    pid,
                    binary: binary.display().to_string(),
                    ready_ms,
                })
            }
            report => {
                let reason = match report {
                    Ok(line) => line.strip_prefix("error: ").unwrap_or(&line).to_string(),
                    Err(err) => err,
                };
                // It exits after reporting an error; one that hangs is killed.
                let exited = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let status = match exited {
                    Ok(Ok(status)) => status.to_string(),
                    _ => {
                        let _ = child.kill().await;
                        "killed".to_string()
                    }
                };
                Err(format!(
                    "the new process (pid {pid}, {}) did not become ready: {reason} \
                     ({status}); this process keeps serving",
                    binary.display()
                ))
            }
        }
    }
}

impl Upgrade for Upgrader {
    fn upgrade<'a>(
        &'a self,
        binary: Option<PathBuf>,
        progress: &'a Progress,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<UpgradeReport, String>> + Send + 'a>> {
        Box::pin(self.hand_off(binary, progress))
    }
}

/// The new process's one line, bounded by [`READY_TIMEOUT`].
async fn read_report(stream: UnixStream) -> Result<String, String> {
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
        .map_err(|err| err.to_string())?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stream);
    let read = reader.read_line(&mut line);
    match tokio::time::timeout(READY_TIMEOUT, read).await {
        Err(_) => Err(format!(
            "no report within {} s; killed",
            READY_TIMEOUT.as_secs()
        )),
        // A reset: it closed its end without reading what was sent.
        Ok(Err(err)) => Err(format!("it exited before reporting ({err}; see its log)")),
        Ok(Ok(0)) => Err("it exited before reporting (see its log)".to_string()),
        Ok(Ok(_)) => Ok(line.trim_end().to_string()),
    }
}

/// One message: the kinds as text, the sockets as `SCM_RIGHTS`.
fn send_sockets(
    stream: &UnixStream,
    sockets: &[BorrowedFd<'_>],
    kinds: &str,
) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !ancillary.push(SendAncillaryMessage::ScmRights(sockets)) {
        return Err(std::io::Error::other("too many sockets for one message"));
    }
    let payload = format!("{kinds}\n");
    rustix::net::sendmsg(
        stream,
        &[IoSlice::new(payload.as_bytes())],
        &mut ancillary,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// The new process's side: its sockets and the line back to the old one.
pub struct HandedOver {
    pub inherited: Inherited,
    pub admin: Option<UnixListener>,
    pub predecessor: Predecessor,
}

/// The old process, waiting for this one's report.
pub struct Predecessor {
    stream: UnixStream,
}

impl Predecessor {
    /// Tells the old process this one serves: it stops accepting.
    pub fn ready(&self) {
        let _ = (&self.stream).write_all(b"ready\n");
    }

    /// Tells the old process why this one cannot serve: it serves on.
    pub fn failed(&self, error: &str) {
        let line = error.replace('\n', " | ");
        let _ = (&self.stream).write_all(format!("error: {line}\n").as_bytes());
    }
}

/// The sockets a predecessor passed, when this process was started by
/// `cutover upgrade` (`CUTOVER_HANDOFF_FD` set; it is removed). Call it
/// before threads start: it edits the environment.
pub fn from_env() -> Option<Result<HandedOver, ListenError>> {
    std::env::var_os(HANDOFF_ENV)?;
    std::env::remove_var(HANDOFF_ENV);
    Some(receive())
}

fn receive() -> Result<HandedOver, ListenError> {
    let fail = |what: &str, err: &dyn std::fmt::Display| {
        ListenError::Inherit(format!("hand-off from the old process: {what}: {err}"))
    };
    let stream = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(UnixStream::from)
        .map_err(|err| fail("stdin", &err))?;
    let mut payload = [0u8; 64];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut payload)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|err| fail("recvmsg", &err))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let kinds = String::from_utf8_lossy(&payload[..received.bytes]).to_string();
    let kinds: Vec<&str> = kinds.split_whitespace().collect();
    if kinds.len() != fds.len() {
        return Err(fail(
            "message",
            &format!("{} sockets for kinds {kinds:?}", fds.len()),
        ));
    }
    let predecessor = Predecessor { stream };
    let (mut tcp, mut admin) = (Vec::new(), None);
    for (kind, fd) in kinds.into_iter().zip(fds) {
        match kind {
            "tcp" => tcp.push(std::net::TcpListener::from(fd)),
            "admin" => admin = Some(UnixListener::from(fd)),
            other => return Err(fail("message", &format!("unknown socket kind {other:?}"))),
        }
    }
    let inherited = match Inherited::from_predecessor(tcp) {
        Ok(inherited) => inherited,
        Err(err) => {
            predecessor.failed(&err.to_string());
            return Err(err);
        }
    };
    Ok(HandedOver {
        inherited,
        admin,
        predecessor,
    })
}
