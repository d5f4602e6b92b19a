//! The data plane: listeners, connection serving (hyper's HTTP/1.1 and
//! HTTP/2 server), the strictness checks, forwarding rules and the request
//! path itself.
//!
//! May import: `routing`, `upstream`, `io`, `tls`, `config`, `errors`.
//! Never the control plane: a request sees only the snapshot.

mod forward;
mod listen;
mod request;
mod serve;
mod static_dir;
mod strict;

pub use listen::{bind, Inherited, ListenError, Listeners};
pub use serve::Server;
