//! cutover: a reverse proxy with an embedded blue/green deploy controller.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; tests drive
//! the same public API: bind listeners, build a [`Config`], call [`run`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod check;
pub mod client;
pub mod config;
pub mod controller;
pub mod deploy;
pub mod docker;
pub mod errors;
pub mod forward;
pub mod group;
pub mod health;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod slowio;
pub mod snapshot;
pub mod state;
pub mod strict;
pub mod tls;
pub mod upstream;
pub mod watch;

pub use config::Config;
pub use server::{run, Listeners, ServerError};
