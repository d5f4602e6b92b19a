//! The state file: which upstream each service serves from, so a restart
//! resumes the same active colour instead of falling back to the config.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory):
//! after a crash the file is either the old version or the new one, never a
//! torn mix. The controller writes it off the async runtime
//! ([`StateStore::write`]): an fsync takes milliseconds, and with
//! `workers = 1` every connection would wait for it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use crate::upstream::ContainerState;

/// The file's name inside `state_dir`.
pub const STATE_FILE: &str = "state.json";

/// Bumped when the format changes incompatibly.
const FORMAT_VERSION: u32 = 1;

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub services: BTreeMap<String, ServiceState>,
    /// Per service, the name of the container a deploy was creating when
    /// this file was written. The engine finishes a create (and a start)
    /// even when its client died, so after a crash the container can appear
    /// after start-up reconciliation listed the service's containers; a
    /// restart watches for it and removes it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub starting: BTreeMap<String, String>,
}

/// One service's persisted facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    /// "blue" or "green".
    pub color: String,
    /// Where the active colour listens.
    pub addr: SocketAddr,
    /// Unix seconds of the last change, for status output.
    pub since: u64,
    /// The active container, when the controller runs this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerState>,
    /// The previous colour, kept warm for an instant rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousState>,
    /// Images deployed, newest first (rollback targets, retention).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<String>,
    /// The last deploy's outcome, for status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deploy: Option<DeployRecord>,
    /// A canary taking a share of the clients (`deploy --canary`): a
    /// restart keeps serving the split, and reconciliation keeps its
    /// container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryState>,
    /// A bake window judging a colour: a restart resumes it, so a bad
    /// version is still rolled back after a crash or an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeState>,
}

/// A running bake window (see `control::deploy::bake`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeState {
    /// The colour judged.
    pub color: String,
    pub phase: BakePhase,
    /// Unix seconds at which the window ends. A canary goes on being
    /// judged after it, until promoted or aborted.
    pub until: u64,
}

/// What a bake window judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BakePhase {
    /// A canary beside the active colour.
    Canary,
    /// A colour that took all traffic, the previous one warm.
    Switch,
}

/// A running canary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryState {
    pub color: String,
    pub addr: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerState>,
    /// Its share of newly assigned clients, in basis points.
    pub share_bp: u32,
}

/// The previous colour and when it will be retired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousState {
    pub color: String,
    pub addr: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerState>,
    /// Unix seconds after which its container is stopped and removed.
    pub retire_at: u64,
}

/// What the last deploy or rollback did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub image: String,
    pub ok: bool,
    pub message: String,
    pub at: u64,
}

/// Reading or writing the state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a cutover state file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: state format version {found} is newer than this cutover understands ({FORMAT_VERSION})")]
    TooNew { path: PathBuf, found: u32 },
}

/// Where the state lives, and the one way to read and write it.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    /// Held for each write. A write runs on a blocking thread and goes on
    /// even if the task that asked for it is dropped, so the async writer
    /// lock alone could let two writes share the temp file.
    writing: Arc<Mutex<()>>,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> StateStore {
        StateStore {
            dir: dir.into(),
            writing: Arc::default(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the state; a missing file is an empty state (first start).
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: FORMAT_VERSION,
                    ..State::default()
                })
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: State =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.version > FORMAT_VERSION {
            return Err(StateError::TooNew {
                path,
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Replaces the state file atomically, on a blocking thread; returns
    /// once the new file is durable. A service whose colour and address
    /// are unchanged keeps the `since` the file has.
    pub async fn write(&self, state: State) -> Result<(), StateError> {
        self.off_runtime(move |store| store.save_keeping_since(state))
            .await
    }

    /// [`check_writable`](Self::check_writable), on a blocking thread.
    pub async fn probe(&self) -> Result<(), StateError> {
        self.off_runtime(StateStore::check_writable).await
    }

    /// [`load`](Self::load), on a blocking thread.
    pub async fn read(&self) -> Result<State, StateError> {
        self.off_runtime(StateStore::load).await
    }

    /// Runs blocking file work on tokio's blocking pool.
    async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&StateStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|err| StateError::Io {
                path: self.path(),
                source: std::io::Error::other(format!("state writer thread: {err}")),
            })?
    }

    fn save_keeping_since(&self, mut state: State) -> Result<(), StateError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.load().unwrap_or_default();
        for (name, service) in &mut state.services {
            if let Some(old) = previous
                .services
                .get(name)
                .filter(|old| old.addr == service.addr && old.color == service.color)
            {
                service.since = old.since;
            }
        }
        self.replace(&state)
    }

    /// Replaces the state file atomically (blocking).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.replace(state)
    }

    #[cfg(test)]
    pub(crate) fn write_lock(&self) -> Arc<Mutex<()>> {
        Arc::clone(&self.writing)
    }

    /// Temp file, fsync, rename, fsync of the directory; the caller holds
    /// `writing`.
    fn replace(&self, state: &State) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut state = state.clone();
        state.version = FORMAT_VERSION;
        let bytes = serde_json::to_vec_pretty(&state).map_err(|err| io(err.into()))?;
        let temp = self
            .dir
            .join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        if let Err(err) = write_synced(&temp, &bytes) {
            // A full disk fails the write after the file was created: do
            // not leave a half-written temp file taking space.
            let _ = std::fs::remove_file(&temp);
            return Err(io(err));
        }
        std::fs::rename(&temp, self.path()).map_err(|err| {
            let _ = std::fs::remove_file(&temp);
            io(err)
        })?;
        sync_dir(&self.dir).map_err(io)
    }

    /// Proves the directory takes a write as large as the state file, so a
    /// deploy can refuse up front (before starting or stopping anything)
    /// when the state directory is read-only or full. The write before the
    /// swap is still checked: the disk can fill in between.
    pub fn check_writable(&self) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let size = std::fs::metadata(self.path()).map_or(1, |m| m.len().max(1));
        let probe = self
            .dir
            .join(format!(".{STATE_FILE}.{}.probe", std::process::id()));
        let written = write_synced(&probe, &vec![b' '; usize::try_from(size).unwrap_or(1)]);
        let _ = std::fs::remove_file(&probe);
        written.map_err(io)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes the rename itself durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Seconds since the Unix epoch, for `since` fields.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path().join("nested"));
        assert!(store.load().expect("empty").services.is_empty());
        let mut state = State::default();
        state.services.insert(
            "web".into(),
            ServiceState {
                color: "green".into(),
                addr: "127.0.0.1:9001".parse().expect("addr"),
                since: 1,
                container: None,
                previous: None,
                history: vec!["web:v2".into()],
                last_deploy: None,
                canary: None,
                bake: Some(BakeState {
                    color: "green".into(),
                    phase: BakePhase::Switch,
                    until: 1_700_000_000,
                }),
            },
        );
        store.save(&state).expect("save");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.services, state.services);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STATE_FILE), b"{half").expect("write");
        let err = StateStore::new(dir.path()).load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }
}
