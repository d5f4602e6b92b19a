//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cutover;
pub mod harness;
pub mod images;
pub mod metrics;
