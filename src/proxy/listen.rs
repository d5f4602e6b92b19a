//! The listening sockets: bound by the caller (the binary binds the
//! config's addresses, or takes the ones it inherited; tests bind port 0)
//! and handed to [`crate::run`].
//!
//! Inherited sockets follow systemd's `LISTEN_FDS` protocol (fds 3, 4, …,
//! `LISTEN_PID` naming the process they are for, optional `LISTEN_FDNAMES`),
//! whoever passes them: systemd socket activation, `systemd-socket-activate`,
//! or a previous cutover handing its sockets over. Each one is matched to
//! `[server] http`/`https` by the address it listens on, so the unit and the
//! config cannot silently disagree about which port is TLS.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

use crate::config::Config;

/// The sockets to serve on, bound by the caller (the binary binds the
/// config's addresses; tests bind port 0).
#[derive(Debug, Default)]
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub https: Option<TcpListener>,
    /// The admin socket, bound by the caller (`admin::bind`) at the config's
    /// `admin_socket`, so clients can connect before `run` serves it;
    /// `None`: `run` binds it.
    pub admin: Option<tokio::net::UnixListener>,
}

impl Listeners {
    /// Binds the addresses a config names.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        Listeners::open(config, Inherited::none())
            .await
            .map_err(|err| match err {
                ListenError::Bind(err) => err,
                other => std::io::Error::other(other.to_string()),
            })
    }

    /// The config's listeners: each address served by the inherited socket
    /// listening on it, or bound here when none was inherited for it.
    ///
    /// A `LISTEN_FDS` socket that matches neither address is an error, not
    /// a warning: the service manager keeps it open, so the kernel would
    /// queue connections on it that nobody ever accepts, and clients would
    /// hang instead of being refused. One handed over by an upgrading
    /// predecessor (whose config no longer names it) is closed instead:
    /// the predecessor closes its copy as it drains.
    pub async fn open(config: &Config, inherited: Inherited) -> Result<Listeners, ListenError> {
        let Inherited {
            mut sockets,
            strict,
        } = inherited;
        let mut take = |addr: SocketAddr| {
            sockets
                .iter()
                .position(|socket| socket.addr == addr)
                .map(|index| sockets.remove(index))
        };
        let http = config.server.http.map(|addr| (addr, take(addr)));
        let https = config.server.https.map(|addr| (addr, take(addr)));
        if !strict {
            for unused in sockets.drain(..) {
                tracing::info!(socket = %unused.describe(), "handed-over socket no longer configured: closed");
            }
        }
        if let Some(unused) = sockets.first() {
            return Err(ListenError::Unused {
                socket: unused.describe(),
                http: config.server.http,
                https: config.server.https,
            });
        }
        Ok(Listeners {
            http: listener(http).await?,
            https: listener(https).await?,
            admin: None,
        })
    }
}

/// The inherited socket, made non-blocking for tokio, or a fresh bind.
async fn listener(
    wanted: Option<(SocketAddr, Option<InheritedSocket>)>,
) -> Result<Option<TcpListener>, ListenError> {
    match wanted {
        None => Ok(None),
        Some((addr, Some(inherited))) => {
            tracing::info!(listen.addr = %addr, socket = %inherited.describe(), "using an inherited socket");
            inherited
                .listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(inherited.listener))
                .map(Some)
                .map_err(ListenError::Bind)
        }
        Some((addr, None)) => bind(addr).map(Some).map_err(ListenError::Bind),
    }
}

/// Why the listeners could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0}")]
    Bind(std::io::Error),
    #[error(
        "inherited socket {socket} matches neither [server] http ({}) nor https ({}); \
         make the socket unit's ListenStream= and proxy.toml name the same addresses",
        show(.http),
        show(.https)
    )]
    Unused {
        socket: String,
        http: Option<SocketAddr>,
        https: Option<SocketAddr>,
    },
    #[error("LISTEN_FDS: {0}")]
    Inherit(String),
}

fn show(addr: &Option<SocketAddr>) -> String {
    addr.map_or_else(|| "not set".to_string(), |addr| addr.to_string())
}

/// Listening TCP sockets this process was given rather than bound.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<InheritedSocket>,
    /// Whether a socket matching no listener is an error (see
    /// [`Listeners::open`]).
    strict: bool,
}

#[derive(Debug)]
struct InheritedSocket {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    /// How to name it in messages: fd number and `LISTEN_FDNAMES` entry.
    label: String,
}

impl InheritedSocket {
    fn describe(&self) -> String {
        format!("{} on {}", self.label, self.addr)
    }
}

impl Inherited {
    /// Nothing inherited: every address is bound.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Takes the sockets passed by `LISTEN_FDS` (when `LISTEN_PID` is this
    /// process or unset) and removes the variables, so a process started
    /// later (an upgrade's new binary) does not take them too. Call it
    /// before starting threads: it changes the environment.
    pub fn from_env() -> Result<Inherited, ListenError> {
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        std::env::remove_var("LISTEN_FDNAMES");
        // listenfd checks LISTEN_PID, removes LISTEN_FDS/LISTEN_PID, and
        // checks each fd is a TCP socket before taking it (close-on-exec).
        let mut fds = listenfd::ListenFd::from_env();
        let names: Vec<&str> = names.split(':').collect();
        let mut sockets = Vec::with_capacity(fds.len());
        for index in 0..fds.len() {
            let fd = 3 + index;
            let label = match names.get(index).filter(|name| !name.is_empty()) {
                Some(name) => format!("fd {fd} ({name})"),
                None => format!("fd {fd}"),
            };
            let listener = fds
                .take_tcp_listener(index)
                .map_err(|err| ListenError::Inherit(format!("{label}: {err}")))?
                .ok_or_else(|| ListenError::Inherit(format!("{label}: already taken")))?;
            sockets.push(InheritedSocket::new(listener, label)?);
        }
        Ok(Inherited {
            sockets,
            strict: true,
        })
    }

    /// Sockets passed some other way than the environment, with the same
    /// rules as `LISTEN_FDS` (a socket matching no listener is an error).
    pub fn from_listeners(listeners: Vec<std::net::TcpListener>) -> Result<Inherited, ListenError> {
        Inherited::labelled(listeners, true)
    }

    /// Sockets handed over by an upgrading predecessor: one the config no
    /// longer names is closed, not an error.
    pub fn from_predecessor(
        listeners: Vec<std::net::TcpListener>,
    ) -> Result<Inherited, ListenError> {
        Inherited::labelled(listeners, false)
    }

    fn labelled(
        listeners: Vec<std::net::TcpListener>,
        strict: bool,
    ) -> Result<Inherited, ListenError> {
        let sockets = listeners
            .into_iter()
            .enumerate()
            .map(|(index, listener)| InheritedSocket::new(listener, format!("socket #{index}")))
            .collect::<Result<_, _>>()?;
        Ok(Inherited { sockets, strict })
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

impl InheritedSocket {
    fn new(listener: std::net::TcpListener, label: String) -> Result<Self, ListenError> {
        let addr = listener
            .local_addr()
            .map_err(|err| ListenError::Inherit(format!("{label}: {err}")))?;
        Ok(InheritedSocket {
            listener,
            addr,
            label,
        })
    }
}

/// Length of the listeners' queue of connections not yet accepted. std's
/// `TcpListener::bind` asks for 128, which a burst of new clients overflows
/// whenever the accept loop is briefly behind (the external 10,000-idle
/// suite saw it): the kernel then drops SYNs and clients retry a second
/// later. nginx asks for 511; the kernel caps this at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds and listens on one address (within a tokio runtime).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As std's bind does: a restarted proxy can listen again at once.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen()
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}
