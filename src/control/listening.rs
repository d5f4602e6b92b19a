//! What a reload may ask of the listening sockets: the controller owns the
//! config, the proxy owns the sockets, and neither imports the other, so
//! the controller states what it needs here and the start-up wiring
//! ([`crate::app`]) provides it.
//!
//! Two steps, so a reload can fail without any socket changing: `prepare`
//! binds every new address (an address in use or not permitted fails the
//! reload, old listeners untouched); `commit`, once the new config is
//! published, starts serving the new sockets and only then closes the
//! ones they replace.

use std::net::SocketAddr;

/// The listeners a reload can move.
pub trait Listening: Send + Sync {
    /// Binds whichever of `http` and `https` differ from the addresses
    /// served now, serving none of them yet. `Err` is the reason, for the
    /// operator; nothing has changed then.
    fn prepare(
        &self,
        http: Option<SocketAddr>,
        https: Option<SocketAddr>,
    ) -> Result<Box<dyn ListenChange>, String>;
}

/// New sockets bound by [`Listening::prepare`]; dropped uncommitted, they
/// close and nothing changes.
pub trait ListenChange: Send {
    /// Serves the new sockets, then stops accepting on the old ones
    /// (connections they accepted carry on). One line per change made.
    fn commit(self: Box<Self>) -> Vec<String>;
}
