//! The data plane: listeners, connection serving (hyper's HTTP/1.1 and
//! HTTP/2 server), the strictness checks, forwarding rules and the request
//! path itself.
//!
//! May import: `routing`, `metrics`, `upstream`, `io`, `tls`, `config`, `errors`.
//! Never the control plane: a request sees only the snapshot.

mod forward;
mod h1;
mod listen;
mod request;
mod serve;
mod static_dir;
mod strict;
mod workers;

pub use listen::{bind, Inherited, ListenError, Listeners};
pub use serve::Server;
#[allow(unused_imports)] // the per-worker upstream pool will use it
pub(crate) use workers::current_worker;
pub use workers::{RuntimeMode, Workers, RUNTIME_VAR};
