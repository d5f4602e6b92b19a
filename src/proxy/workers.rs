//! Thread-per-core workers: `workers = N` serves client connections on N
//! OS threads, each running its own current-thread tokio runtime, so a
//! connection and everything its requests do stay on one thread (no
//! work-stealing, no cross-thread wake-ups on the request path).
//!
//! # One accept queue, dispatched
//!
//! The listeners stay whole: one accept loop per listener (on the caller's
//! runtime, beside the controller and the admin socket) accepts each
//! connection and hands the socket to the worker with the fewest open
//! connections. The alternative, one `SO_REUSEPORT` listener per worker,
//! splits the kernel's accept queue in N: connections queued on a listener
//! that closes (a worker stopping at shutdown, or a listener re-created)
//! are reset, not moved to the others, and the kernel's hash ignores how
//! busy each worker is. It would also need every listener bound by cutover,
//! while [`crate::run`]'s callers bind theirs (tests bind port 0). The price
//! of dispatching is one cross-thread hand-off per *connection*, never per
//! request.
//!
//! # Shared, and per worker
//!
//! The routing snapshot (an `ArcSwap`), the controller, the admin socket,
//! the shutdown token and the task tracker are shared: a reload or switch
//! swaps the snapshot every worker reads, and a graceful shutdown drains
//! every worker's connections because they are all on the one tracker.
//! [`current_worker`] tells code on the request path which worker it runs
//! on, for state kept per worker (an upstream connection pool).
//!
//! # The switch
//!
//! `CUTOVER_RUNTIME=work-stealing` serves on the caller's runtime instead
//! (the binary then builds tokio's multi-thread runtime with N threads, as
//! before this module existed). It exists so `benches/` can measure both in
//! one run; see `docs/benchmarks.md`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::proxy::serve::Server;

thread_local! {
    /// Set once on each worker thread, before its runtime starts.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker thread this code runs on, `None` off the workers (with
/// `workers = 1` or the work-stealing runtime, where connections are
/// served on the caller's runtime). A thread-local read: cheap enough for
/// every request.
#[allow(dead_code)] // the per-worker upstream pool will read it
pub(crate) fn current_worker() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// The environment variable that picks the runtime (see the module docs).
pub const RUNTIME_VAR: &str = "CUTOVER_RUNTIME";

/// How client connections are spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeMode {
    /// N current-thread runtimes on N threads (the default).
    PerCore,
    /// Tokio's multi-thread, work-stealing runtime, served in place.
    WorkStealing,
}

impl RuntimeMode {
    /// Reads `CUTOVER_RUNTIME`: unset or `per-core`, or `work-stealing`.
    pub fn from_env() -> Result<RuntimeMode, String> {
        match std::env::var(RUNTIME_VAR) {
            Err(std::env::VarError::NotPresent) => Ok(RuntimeMode::PerCore),
            Ok(value) => RuntimeMode::parse(&value),
            Err(err) => Err(format!("{RUNTIME_VAR}: {err}")),
        }
    }

    fn parse(value: &str) -> Result<RuntimeMode, String> {
        match value {
            "per-core" => Ok(RuntimeMode::PerCore),
            "work-stealing" => Ok(RuntimeMode::WorkStealing),
            other => Err(format!(
                "{RUNTIME_VAR}={other:?}: expected \"per-core\" or \"work-stealing\""
            )),
        }
    }

    /// How many worker threads to start for the config's `workers` (0 =
    /// one per core). 0 here means: serve on the caller's runtime.
    pub fn worker_threads(self, configured: usize) -> usize {
        let wanted = match configured {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        match self {
            RuntimeMode::WorkStealing => 0,
            // One worker is served in place: a thread hop buys nothing.
            RuntimeMode::PerCore if wanted <= 1 => 0,
            RuntimeMode::PerCore => wanted,
        }
    }
}

/// A connection accepted by an accept loop, on its way to a worker.
pub(super) struct Accepted {
    pub stream: std::net::TcpStream,
    pub addr: SocketAddr,
    pub tls: Option<TlsAcceptor>,
    pub permit: OwnedSemaphorePermit,
}

/// The accept loops' side: where accepted connections go.
pub(super) struct Dispatch {
    inboxes: Vec<mpsc::UnboundedSender<Accepted>>,
    /// Moves on with every hand-off, so ties between equally loaded
    /// workers go round-robin.
    next: AtomicUsize,
}

impl Dispatch {
    /// Hands `accepted` to the least loaded worker. A worker that is gone
    /// (only after shutdown) drops the connection.
    pub fn hand_off(&self, server: &Server, accepted: Accepted) {
        let load = &server.shared().workers;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let worker = load.least_loaded(start);
        load.opened(worker);
        let sent = self.inboxes.get(worker).map(|inbox| inbox.send(accepted));
        if !matches!(sent, Some(Ok(()))) {
            load.closed(worker);
        }
    }
}

/// The running worker threads.
pub struct Workers {
    dispatch: Arc<Dispatch>,
    /// Cancelled to end the threads; on drop too, so an aborted
    /// [`crate::run`] leaves no thread behind.
    stop: CancellationToken,
    /// Each closes when its thread ends.
    ended: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Starts `count` worker threads serving with `server`'s settings.
    pub fn start(count: usize, server: &Server) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        // Ends the threads already started if a later one cannot start.
        let stop_on_error = stop.clone().drop_guard();
        let mut inboxes = Vec::with_capacity(count);
        let mut ended = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (inbox, received) = mpsc::unbounded_channel();
            let (end, ended_rx) = oneshot::channel();
            let worker = Worker {
                index,
                server: server.clone(),
                received,
                stop: stop.clone(),
                _end: end,
            };
            std::thread::Builder::new()
                .name(format!("cutover-worker-{index}"))
                .spawn(move || worker.run(runtime))?;
            inboxes.push(inbox);
            ended.push(ended_rx);
        }
        stop_on_error.disarm();
        tracing::info!(workers = count, "serving on one thread per worker");
        Ok(Workers {
            dispatch: Arc::new(Dispatch {
                inboxes,
                next: AtomicUsize::new(0),
            }),
            stop,
            ended,
        })
    }

    pub(super) fn dispatch(&self) -> Arc<Dispatch> {
        Arc::clone(&self.dispatch)
    }

    /// Ends the threads, dropping whatever connections they still hold,
    /// and waits until they have.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for ended in std::mem::take(&mut self.ended) {
            let _ = ended.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One worker thread's state.
struct Worker {
    index: usize,
    server: Server,
    received: mpsc::UnboundedReceiver<Accepted>,
    stop: CancellationToken,
    /// Dropped when the thread ends: [`Workers::stop`] waits for that.
    _end: oneshot::Sender<()>,
}

/// How long a stopping worker waits for its blocking tasks.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

impl Worker {
    fn run(mut self, runtime: tokio::runtime::Runtime) {
        WORKER.with(|worker| worker.set(Some(self.index)));
        crate::upstream::pool::set_worker(self.index);
        let stop = self.stop.clone();
        runtime.block_on(async {
            tokio::select! {
                () = self.serve_handed_off() => {}
                () = stop.cancelled() => {}
            }
        });
        // Drops every task still on this runtime: the connections that
        // outlived the shutdown deadline.
        runtime.shutdown_timeout(BLOCKING_GRACE);
    }

    /// Serves each connection handed over, on this thread, tracked by the
    /// shared task tracker so a graceful shutdown waits for it. When the
    /// accept loops are gone, keeps the runtime turning for the
    /// connections still open until told to stop.
    async fn serve_handed_off(&mut self) {
        while let Some(accepted) = self.received.recv().await {
            let open = Open {
                server: self.server.clone(),
                worker: self.index,
            };
            let Accepted {
                stream,
                addr,
                tls,
                permit,
            } = accepted;
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(client.addr = %addr, error = %err, "cannot register a connection with its worker");
                    continue;
                }
            };
            let server = self.server.clone();
            self.server.shared().tasks.spawn(async move {
                let _open = open;
                server.serve_tcp(stream, addr, tls, permit).await;
            });
        }
        std::future::pending::<()>().await;
    }
}

/// Counts a worker's connection as open while it lives.
struct Open {
    server: Server,
    worker: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.server.shared().workers.closed(self.worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_parse_and_others_are_refused() {
        assert_eq!(RuntimeMode::parse("per-core"), Ok(RuntimeMode::PerCore));
        assert_eq!(
            RuntimeMode::parse("work-stealing"),
            Ok(RuntimeMode::WorkStealing)
        );
        let err = RuntimeMode::parse("threads").expect_err("unknown name");
        assert!(err.contains("CUTOVER_RUNTIME=\"threads\""), "{err}");
    }

    #[test]
    fn worker_threads_follow_workers_and_mode() {
        assert_eq!(RuntimeMode::PerCore.worker_threads(3), 3);
        assert_eq!(
            RuntimeMode::PerCore.worker_threads(1),
            0,
            "one worker serves in place"
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let expected = if cores > 1 { cores } else { 0 };
        assert_eq!(RuntimeMode::PerCore.worker_threads(0), expected);
        assert_eq!(RuntimeMode::WorkStealing.worker_threads(4), 0);
    }

    #[test]
    fn current_worker_is_none_off_the_workers() {
        assert_eq!(current_worker(), None);
        let on_worker = std::thread::spawn(|| {
            WORKER.with(|worker| worker.set(Some(3)));
            current_worker()
        });
        assert_eq!(on_worker.join().ok().flatten(), Some(3));
    }
}
