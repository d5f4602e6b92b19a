//! The listening sockets: bound by the caller (the binary binds the
//! config's addresses; tests bind port 0) and handed to [`crate::run`].

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
        let http = match config.server.http {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let https = match config.server.https {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Listeners {
            http,
            https,
            admin: None,
        })
    }
}

/// Length of the listeners' queue of connections not yet accepted. std's
/// `TcpListener::bind` asks for 128, which a burst of new clients overflows
/// whenever the accept loop is briefly behind (the external 10,000-idle
/// suite saw it): the kernel then drops SYNs and clients retry a second
/// later. nginx asks for 511; the kernel caps this at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
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
