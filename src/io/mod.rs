//! IO primitives shared by both sides of the proxy: the body wrappers
//! (size, rate and stall limits; end-of-body accounting) and the stall
//! timeout around sockets.
//!
//! May import: `errors` only.

pub mod body;
pub mod slowio;
