//! The deployer's handle on the container engine: connected on first use
//! and kept, with the one-line status `cutover status` shows ("not used",
//! "ok", "unreachable: ...").
//!
//! How to connect is given at construction ([`Connect`]): the real
//! [`Engine`] in the server, an in-memory fake in the unit tests.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use crate::docker::{ContainerRuntime, DockerError, Engine};

/// Opens a connection to the engine.
pub(crate) type Connect = Box<
    dyn Fn() -> BoxFuture<'static, Result<Arc<dyn ContainerRuntime>, DockerError>> + Send + Sync,
>;

/// Connects to the local Docker engine (see [`Engine::connect`]).
pub(crate) fn docker() -> Connect {
    Box::new(|| {
        Box::pin(async {
            let engine = Engine::connect().await?;
            Ok(Arc::new(engine) as Arc<dyn ContainerRuntime>)
        })
    })
}

pub(crate) struct EngineHandle {
    connect: Connect,
    connected: tokio::sync::Mutex<Option<Arc<dyn ContainerRuntime>>>,
    status: Mutex<String>,
}

impl EngineHandle {
    pub(crate) fn new(connect: Connect) -> EngineHandle {
        EngineHandle {
            connect,
            connected: tokio::sync::Mutex::new(None),
            status: Mutex::new("not used".into()),
        }
    }

    /// The engine, connecting on first use. A failure is remembered for
    /// `status` and retried on the next call.
    pub(crate) async fn get(&self) -> Result<Arc<dyn ContainerRuntime>, DockerError> {
        let mut connected = self.connected.lock().await;
        if let Some(engine) = connected.as_ref() {
            return Ok(Arc::clone(engine));
        }
        match (self.connect)().await {
            Ok(engine) => {
                self.set_status("ok".into());
                *connected = Some(Arc::clone(&engine));
                Ok(engine)
            }
            Err(err) => {
                self.set_status(format!("unreachable: {err}"));
                Err(err)
            }
        }
    }

    /// Pings the engine (connecting if needed) and records the outcome for
    /// `status`.
    pub(crate) async fn answers(&self) -> bool {
        let pinged = match self.get().await {
            Ok(engine) => engine.ping().await.map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        match pinged {
            Ok(()) => {
                self.set_status("ok".into());
                true
            }
            Err(err) => {
                self.set_status(format!("unreachable: {err}"));
                false
            }
        }
    }

    pub(crate) fn set_status(&self, status: String) {
        if let Ok(mut current) = self.status.lock() {
            *current = status;
        }
    }

    /// What `status` says about the engine.
    pub(crate) fn status(&self) -> String {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
