//! What `cutover upgrade` asks of the process: hand the listening sockets
//! to a new binary and step aside once it serves. The controller checks
//! that no deploy runs and keeps deploys and reloads out while it happens;
//! the hand-off itself (processes, sockets) is the start-up wiring's,
//! provided through this trait (see `src/handoff.rs`).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use super::report::UpgradeReport;
use super::Progress;

/// A hand-off to a new process.
pub trait Upgrade: Send + Sync {
    /// Starts `binary` (this executable when `None`) with this process's
    /// sockets and waits until it reports ready; then this process stops
    /// accepting and drains. `Err` is the new process's error (or why it
    /// could not start); this process then serves on as before.
    fn upgrade<'a>(
        &'a self,
        binary: Option<PathBuf>,
        progress: &'a Progress,
    ) -> Pin<Box<dyn Future<Output = Result<UpgradeReport, String>> + Send + 'a>>;
}
