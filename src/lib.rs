//! cutover: a reverse proxy with an embedded blue/green deploy controller.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; tests drive
//! the same public API: bind [`Listeners`], build a [`Config`], call [`run`].
//!
//! # Layout
//!
//! Each folder is one part; a part imports only the parts below it.
//!
//! | part | what it owns |
//! |---|---|
//! | [`app`] | start-up wiring: [`run`] |
//! | `handoff` | `cutover upgrade`: sockets passed to a new process (`SCM_RIGHTS`) |
//! | `rebind` | listener address changes on reload (bind new, then close old) |
//! | `check` | `cutover check` |
//! | `fleet/` | `cutover rollout` and `status --hosts`: many hosts over ssh (a client only) |
//! | `admin/` | the admin protocol, its socket server and client |
//! | `control/` | the controller (single writer), deploys, health, state file, watcher |
//! | `proxy/` | the data plane: listeners, connection serving, the request path |
//! | `routing/` | the snapshot and the one cell that holds it |
//! | `metrics/` | what both planes record, the Prometheus endpoint |
//! | `upstream/` | an upstream, its connection pool and HTTP/1.1 client |
//! | `acme/` | automatic certificates: ACME orders, storage, renewal |
//! | `docker`, `tls/`, `io/` | the Docker engine, certificates, body and socket wrappers |
//! | `config/`, `errors` | configuration, error chains |
//! | `sd_notify` | readiness reports to systemd (`Type=notify`) |
//!
//! The data plane (`proxy`) and the control plane (`control`) never import
//! each other; they meet in `routing` and `upstream`.

#![forbid(unsafe_code)]

mod acme;
pub mod admin;
mod app;
pub mod check;
pub mod config;
mod control;
pub mod docker;
pub mod errors;
pub mod fleet;
pub mod handoff;
mod io;
mod metrics;
mod proxy;
mod rebind;
mod routing;
pub mod sd_notify;
mod tls;
mod upstream;

pub use app::{run, run_with, ServerError, Startup};
pub use config::Config;
pub use proxy::{Inherited, ListenError, Listeners, RuntimeMode, RUNTIME_VAR};
pub use routing::workers::{ParkingStatus, WorkerStatus};
