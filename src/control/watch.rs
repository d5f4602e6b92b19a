//! Hot reload: watch proxy.toml and the certificate files, and reload when
//! any of them changes.
//!
//! We watch the *parent directories* and filter by file name: editors and
//! certbot replace files by rename, which silently ends a watch placed on
//! the file itself. Bursts of events (an editor's write + rename + chmod)
//! are debounced into one reload.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Controller, Progress};
use crate::config::Config;

/// Quiet time after the last event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Starts watching; the watch ends with `shutdown`.
pub fn spawn(
    controller: Arc<Controller>,
    config: &Config,
    shutdown: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<(), notify::Error> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = sender.send(event);
        }
    })?;
    let mut reloader = Reloader {
        watcher,
        dirs: HashSet::new(),
        files: HashSet::new(),
    };
    reloader.watch(config);
    tasks.spawn(reloader.run(controller, receiver, shutdown));
    Ok(())
}

struct Reloader {
    watcher: notify::RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    files: HashSet<PathBuf>,
}

impl Reloader {
    /// Watches the directories of every file `config` depends on.
    fn watch(&mut self, config: &Config) {
        self.files = watched_files(config);
        for file in &self.files {
            let Some(dir) = file.parent() else { continue };
            if self.dirs.contains(dir) {
                continue;
            }
            match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.dirs.insert(dir.to_path_buf());
                }
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot watch directory; changes there need `cutover reload`")
                }
            }
        }
    }

    fn is_relevant(&self, event: &notify::Event) -> bool {
        let changes = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
        );
        changes && event.paths.iter().any(|path| self.files.contains(path))
    }

    async fn run(
        mut self,
        controller: Arc<Controller>,
        mut events: mpsc::UnboundedReceiver<notify::Event>,
        shutdown: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = shutdown.cancelled() => return,
            };
            let Some(event) = event else { return };
            if !self.is_relevant(&event) {
                continue;
            }
            // Let the burst settle, then reload once.
            loop {
                match tokio::time::timeout(DEBOUNCE, events.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            tracing::info!("config or certificate changed on disk; reloading");
            if controller.reload(&Progress::log_only()).await.is_ok() {
                self.watch(&controller.current_config());
            }
        }
    }
}

/// The config file and every certificate and key it names, absolute.
fn watched_files(config: &Config) -> HashSet<PathBuf> {
    let mut files = HashSet::new();
    if let Some(source) = &config.source {
        files.insert(absolute(source));
    }
    for tls in &config.tls {
        files.insert(absolute(&tls.cert));
        files.insert(absolute(&tls.key));
    }
    files
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
