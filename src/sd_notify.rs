//! systemd's readiness protocol (`sd_notify`): one datagram per state
//! change to the socket named by `$NOTIFY_SOCKET`, so a `Type=notify` unit
//! knows when cutover serves (`READY=1`), reloads (`RELOADING=1`) and stops
//! (`STOPPING=1`). Without `$NOTIFY_SOCKET` every call does nothing.
//!
//! A few lines on a `UnixDatagram` rather than a crate: the protocol is one
//! `sendto` of `KEY=VALUE` lines. A name starting with `@` is in Linux's
//! abstract namespace.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service
/// manager, if there is one. Failures are logged, never fatal: readiness
/// reporting must not take the proxy down.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(err) = send(&path, state) {
        tracing::warn!(error = %err, socket = ?path, state, "cannot notify the service manager");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(path)?,
    };
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
