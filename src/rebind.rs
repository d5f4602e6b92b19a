//! Listener moves on reload: the [`Listening`] the controller asks for,
//! built on the proxy's accept loops. A changed `[server] http`/`https`
//! address is bound first, served, and only then is the old listener
//! closed, so changing a port needs no restart and refuses nothing on the
//! new port. Connections the old listener accepted are served to the end;
//! ones still in its queue when it closes are reset by the kernel.
//!
//! It also keeps a duplicate of each listening socket, which is what
//! `cutover upgrade` hands to the new process (see `handoff`).

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::control::listening::{ListenChange, Listening};
use crate::proxy::{self, Server};
use crate::routing::Shared;

/// The accept loops running now, and what they need to start new ones.
pub struct LiveListeners {
    live: Arc<Mutex<Live>>,
    server: Server,
    /// Present when cutover started with an HTTPS listener: TLS is set up
    /// at start, so a reload can move that listener but not add one.
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Live {
    http: Slot,
    https: Slot,
}

/// One kind of listener: the address the config names (`None` also when
/// the caller bound it without one, as tests do), its accept loop, and a
/// duplicate of its socket for an upgrade's hand-off.
#[derive(Default)]
struct Slot {
    configured: Option<SocketAddr>,
    serving: Option<CancellationToken>,
    socket: Option<OwnedFd>,
}

/// Which listener.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Https,
}

impl LiveListeners {
    /// No listener yet: [`start`](Self::start) each.
    pub fn new(server: Server, tls: Option<TlsAcceptor>, shared: Arc<Shared>) -> LiveListeners {
        LiveListeners {
            live: Arc::new(Mutex::new(Live::default())),
            server,
            tls,
            shared,
        }
    }

    /// Serves `listener` as the `kind` listener for address `configured`.
    pub fn start(&self, kind: Kind, configured: Option<SocketAddr>, listener: TcpListener) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let (slot, tls) = match kind {
            Kind::Http => (&mut live.http, None),
            Kind::Https => (&mut live.https, self.tls.clone()),
        };
        slot.configured = configured;
        slot.socket = listener.as_fd().try_clone_to_owned().ok();
        slot.serving = Some(self.server.spawn_accept_loop(listener, tls));
    }

    /// Duplicates of the listening sockets, for a hand-off.
    pub fn sockets(&self) -> std::io::Result<Vec<OwnedFd>> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        [&live.http.socket, &live.https.socket]
            .into_iter()
            .flatten()
            .map(OwnedFd::try_clone)
            .collect()
    }

    /// Drops the duplicates (shutdown has started), so the sockets close
    /// when the accept loops stop, as they would without them.
    pub fn release(&self) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.http.socket = None;
        live.https.socket = None;
    }
}

/// What a reload does to one kind of listener.
enum Step {
    Keep,
    Close,
    Move(SocketAddr, TcpListener),
}

impl Listening for LiveListeners {
    fn prepare(
        &self,
        http: Option<SocketAddr>,
        https: Option<SocketAddr>,
    ) -> Result<Box<dyn ListenChange>, String> {
        let (http_step, https_step, http_left, https_left) = {
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            if https.is_some() && live.https.configured != https && self.tls.is_none() {
                return Err(
                    "an https listener cannot be added by a reload (TLS is set up \
                            at start); restart cutover to add it"
                        .to_string(),
                );
            }
            let http_step = step(&live.http, http)?;
            let https_step = step(&live.https, https)?;
            let left = |slot: &Slot, step: &Step| match step {
                Step::Keep => slot.serving.is_some(),
                Step::Close => false,
                Step::Move(..) => true,
            };
            let http_left = left(&live.http, &http_step);
            let https_left = left(&live.https, &https_step);
            (http_step, https_step, http_left, https_left)
        };
        if !http_left && !https_left {
            return Err("the new config has neither an http nor an https listener".to_string());
        }
        Ok(Box::new(Prepared {
            live: Arc::clone(&self.live),
            server: self.server.clone(),
            tls: self.tls.clone(),
            shared: Arc::clone(&self.shared),
            http: http_step,
            https: https_step,
        }))
    }
}

/// Binds `wanted` if it is not what `slot` serves.
fn step(slot: &Slot, wanted: Option<SocketAddr>) -> Result<Step, String> {
    match wanted {
        _ if wanted == slot.configured => Ok(Step::Keep),
        None => Ok(Step::Close),
        Some(addr) => proxy::bind(addr)
            .map(|listener| Step::Move(addr, listener))
            .map_err(|err| err.to_string()),
    }
}

/// New sockets bound, waiting for the new config to be published.
struct Prepared {
    live: Arc<Mutex<Live>>,
    server: Server,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    http: Step,
    https: Step,
}

impl ListenChange for Prepared {
    fn commit(self: Box<Self>) -> Vec<String> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let mut changes = Vec::new();
        let Prepared {
            server,
            tls,
            shared,
            http,
            https,
            ..
        } = *self;
        changes.extend(apply(&server, None, &mut live.http, http, "http"));
        let https_port = match &https {
            Step::Move(_, listener) => Some(listener.local_addr().ok().map(|a| a.port())),
            Step::Close => Some(None),
            Step::Keep => None,
        };
        changes.extend(apply(&server, tls, &mut live.https, https, "https"));
        if let Some(port) = https_port {
            shared.https_port.set(port);
        }
        changes
    }
}

/// Serves the new socket, then stops the old accept loop.
fn apply(
    server: &Server,
    tls: Option<TlsAcceptor>,
    slot: &mut Slot,
    step: Step,
    scheme: &str,
) -> Option<String> {
    let was = slot
        .configured
        .map_or_else(|| "none".to_string(), |addr| addr.to_string());
    let (configured, serving, line) = match step {
        Step::Keep => return None,
        Step::Close => {
            slot.socket = None;
            (None, None, format!("{scheme} listener on {was} closed"))
        }
        Step::Move(addr, listener) => {
            slot.socket = listener.as_fd().try_clone_to_owned().ok();
            let serving = server.spawn_accept_loop(listener, tls);
            (
                Some(addr),
                Some(serving),
                format!("{scheme} now listens on {addr} (was {was})"),
            )
        }
    };
    if let Some(old) = std::mem::replace(&mut slot.serving, serving) {
        old.cancel();
    }
    slot.configured = configured;
    tracing::info!("{line}");
    Some(line)
}
