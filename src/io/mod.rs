//! IO primitives shared by both sides of the proxy: the body wrappers
//! (size, rate and stall limits; end-of-body accounting), the stall
//! timeout around sockets, and atomic writes of private files.
//!
//! May import: `errors` only.

pub mod body;
pub mod private_file;
pub mod slowio;
