//! `cutover upgrade`: the running binary hands its sockets to a new
//! process and drains. Under load (keep-alive HTTP/1.1 plain and over
//! TLS, HTTP/2 over TLS, and streams of fresh plain and TLS connections)
//! no connection is refused and no request fails; a new process that cannot start (bad config, exit
//! before ready) leaves the old one serving and the command exits non-zero
//! with its error.
//!
//! Counted as failures: a refused or reset connect, and any request that
//! got no response or a non-200. A keep-alive connection the draining
//! process closes *between* requests is reopened, as every HTTP client
//! does; those reopenings are counted and printed, not hidden. So are
//! requests the server provably did not process (hyper's "canceled": never
//! written; an HTTP/2 stream above a GOAWAY's last stream id), retried
//! once on a new connection as every client does; the retry must succeed.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

/// Every cutover process the test started, killed at the end whatever
/// happens.
/// The new process's pid and how long it took to get ready (ms), from
/// the upgrade's typed report.
type Upgraded = (u32, u64);

/// The upgrade's report, if `line` is its `ok` reply.
fn upgraded(line: &str) -> Option<Upgraded> {
    use cutover::admin::proto::{decode_report, Command as Admin, Reply, Report};
    let reply: Reply = serde_json::from_str(line).ok()?;
    let Reply::Ok { result } = reply else {
        return None;
    };
    let command = Admin::Upgrade { binary: None };
    match decode_report(&command, result).ok()? {
        Report::Upgrade(report) => Some((report.pid, report.ready_ms)),
        _ => None,
    }
}

#[derive(Default)]
struct Pids(Mutex<Vec<u32>>);

impl Pids {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
}

struct Server {
    dir: tempfile::TempDir,
    http: SocketAddr,
    https: SocketAddr,
    socket: PathBuf,
    pids: Pids,
    /// The process the test started.
    first: u32,
}

/// Starts `cutover serve` (the real binary) on free ports, with a file
/// route on both listeners, and waits until it answers.
async fn start_server() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["localhost.pem", "localhost-key.pem"] {
        std::fs::copy(cert_file(name), dir.path().join(name)).expect("copy cert");
    }
    std::fs::write(dir.path().join("index.html"), "hello\n").expect("page");
    let (http, https) = (free_addr(), free_addr());
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!(
            "[server]\nhttp = \"{http}\"\nhttps = \"{https}\"\nadmin_socket = \"admin.sock\"\n\
             shutdown_timeout = \"5s\"\n\n[[tls]]\ncert = \"localhost.pem\"\nkey = \"localhost-key.pem\"\n\n\
             [[site]]\nhosts = [\"*\"]\n[[site.route]]\npath = \"/\"\nfile = \"index.html\"\n"
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.path().join("log")).expect("log file");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start cutover");
    let first = child.id();
    let pids = Pids::default();
    pids.add(child.id());
    // Reaped when it exits (after handing over), so it is no zombie.
    std::thread::spawn(move || child.wait());
    let socket = dir.path().join("admin.sock");
    wait_for_process_admin(&socket).await;
    Server {
        dir,
        http,
        https,
        socket,
        pids,
        first,
    }
}

/// Runs `cutover upgrade` with `args`; returns (success, stdout+stderr,
/// the new process's pid from the JSON reply).
async fn upgrade(socket: &Path, args: &[&str]) -> (bool, String, Option<u32>) {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["upgrade", "--json", "--socket"])
        .arg(socket)
        .args(args);
    let out = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("upgrade finished in time")
        .expect("run cutover upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = text.lines().find_map(upgraded).map(|(pid, _)| pid);
    (out.status.success(), text, pid)
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    reopened: AtomicU64,
    retried: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Requests answered, by kind of client: each must have been served.
    served: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counts {
    fn ok(&self, client: String) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        *self.served.lock().unwrap().entry(client).or_default() += 1;
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 10 {
            errors.push(what);
        }
    }
}

/// A stream of fresh connections, one request each: plain HTTP/1.1, or
/// HTTP/1.1 over a new TLS connection (a full handshake each time).
async fn fresh_connections(
    addr: SocketAddr,
    tls: bool,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let connector = tokio_rustls::TlsConnector::from(client_tls_config(&[b"http/1.1"]));
    while !stop.load(Ordering::Relaxed) {
        let stream = match TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(err) => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                counts.fail(format!("connect (tls: {tls}): {err}"));
                continue;
            }
        };
        let exchange = async {
            let request = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
            let mut response = Vec::new();
            if tls {
                let name = rustls_pki_types::ServerName::try_from("localhost")
                    .expect("server name")
                    .to_owned();
                let mut stream = connector.connect(name, stream).await?;
                stream.write_all(request).await?;
                stream.read_to_end(&mut response).await?;
            } else {
                let mut stream = stream;
                stream.write_all(request).await?;
                stream.read_to_end(&mut response).await?;
            }
            std::io::Result::Ok(response)
        };
        match tokio::time::timeout(IO_TIMEOUT, exchange).await {
            Ok(Ok(response)) if response.starts_with(b"HTTP/1.1 200") => {
                counts.ok(format!("fresh connections (tls: {tls})"));
            }
            other => counts.fail(format!("fresh connection (tls: {tls}): {other:?}")),
        }
    }
}

/// An HTTP/2 stream failed by a GOAWAY: its id was above the GOAWAY's last
/// stream id, so the server did not process it (RFC 9113, 6.8) and the
/// client may retry it, as browsers do.
fn refused_by_goaway(err: &hyper::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .is_some_and(|h2| h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
}

/// Waits (bounded) until the load has had more than `before` answers.
async fn served_more_than(counts: &Counts, before: u64, when: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts.ok.load(Ordering::Relaxed) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request served {when}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a keep-alive client talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// HTTP/1.1 over plain TCP.
    H1,
    /// HTTP/1.1 over TLS (ALPN http/1.1).
    H1Tls,
    /// HTTP/2 over TLS (ALPN h2).
    H2Tls,
}

/// One keep-alive connection speaking `protocol`, reopened only when the
/// server closed it between requests. A connection that cannot be opened
/// again fails the test (its task panics).
async fn keep_alive(
    addr: SocketAddr,
    protocol: Protocol,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    enum Sender {
        H1(hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>),
        H2(hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>),
    }
    let h2 = protocol == Protocol::H2Tls;
    let open = || async {
        match protocol {
            Protocol::H2Tls => {
                let tls = tls_connect(addr, "localhost", &[b"h2"]).await;
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await
                        .expect("h2 handshake");
                tokio::spawn(conn);
                Sender::H2(sender)
            }
            Protocol::H1Tls => {
                let tls = tls_connect(addr, "localhost", &[b"http/1.1"]).await;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .expect("h1 over TLS handshake");
                tokio::spawn(conn);
                Sender::H1(sender)
            }
            Protocol::H1 => {
                let stream = TcpStream::connect(addr).await.expect("connect keep-alive");
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("h1 handshake");
                tokio::spawn(conn);
                Sender::H1(sender)
            }
        }
    };
    let mut sender = open().await;
    while !stop.load(Ordering::Relaxed) {
        let ready = match &mut sender {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        };
        if !ready {
            counts.reopened.fetch_add(1, Ordering::Relaxed);
            sender = open().await;
            continue;
        }
        let uri = if h2 {
            format!("https://localhost:{}/", addr.port())
        } else {
            "/".to_string()
        };
        let req = request("GET", &uri, "localhost", "");
        let response = match &mut sender {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        };
        match response {
            Ok(response) if response.status() == 200 => {
                let body = http_body_util::BodyExt::collect(response.into_body()).await;
                if body.is_ok() {
                    counts.ok(format!("keep-alive {protocol:?}"));
                } else {
                    counts.fail(format!("body: {body:?}"));
                }
            }
            Ok(response) => counts.fail(format!("status {}", response.status())),
            // Canceled: the request was never processed (an HTTP/2 stream
            // the GOAWAY refused, or not yet written when the connection
            // closed), which every client retries; counted, retried once
            // on a new connection. Any other error is a failure.
            Err(err) if err.is_canceled() || refused_by_goaway(&err) => {
                counts.retried.fetch_add(1, Ordering::Relaxed);
                sender = open().await;
                let req = request("GET", &uri, "localhost", "");
                let response = match &mut sender {
                    Sender::H1(s) => s.send_request(req).await,
                    Sender::H2(s) => s.send_request(req).await,
                };
                match response {
                    Ok(response) if response.status() == 200 => {
                        counts.ok(format!("keep-alive {protocol:?}"));
                    }
                    other => counts.fail(format!("retried request ({protocol:?}): {other:?}")),
                }
            }
            Err(err) => counts.fail(format!("keep-alive request ({protocol:?}): {err:?}")),
        }
    }
}

/// Three upgrades under keep-alive load (HTTP/1.1 plain and over TLS,
/// HTTP/2 over TLS) and two streams of fresh connections (plain and TLS):
/// every request answered, nothing refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_under_load_refuse_and_fail_nothing() {
    let server = start_server().await;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut load = Vec::new();
    let keep_alive_clients = [
        (server.http, Protocol::H1),
        (server.http, Protocol::H1),
        (server.http, Protocol::H1),
        (server.https, Protocol::H1Tls),
        (server.https, Protocol::H1Tls),
        (server.https, Protocol::H2Tls),
        (server.https, Protocol::H2Tls),
    ];
    for (addr, protocol) in keep_alive_clients {
        load.push(tokio::spawn(keep_alive(
            addr,
            protocol,
            stop.clone(),
            counts.clone(),
        )));
    }
    for (addr, tls) in [(server.http, false), (server.https, true)] {
        load.push(tokio::spawn(fresh_connections(
            addr,
            tls,
            stop.clone(),
            counts.clone(),
        )));
    }
    // The load runs before the first upgrade...
    served_more_than(&counts, 0, "before the first upgrade").await;
    let mut ready_ms = Vec::new();
    for round in 0..3 {
        let before = counts.ok.load(Ordering::Relaxed);
        let (ok, text, pid) = upgrade(&server.socket, &[]).await;
        assert!(ok, "upgrade {round} failed: {text}");
        server.pids.add(pid.expect("pid in the reply"));
        ready_ms.push(
            text.lines()
                .find_map(upgraded)
                .map_or("?".to_string(), |(_, ready_ms)| ready_ms.to_string()),
        );
        // ...and is served after each one.
        served_more_than(&counts, before, &format!("after upgrade {round}")).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("load task ended")
            .expect("load task");
    }
    let (ok, failed, refused, reopened, retried) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.reopened.load(Ordering::Relaxed),
        counts.retried.load(Ordering::Relaxed),
    );
    println!(
        "3 upgrades: {ok} ok, {failed} failed, {refused} refused, {reopened} keep-alive \
         connections reopened after a drain, {retried} unprocessed (canceled) requests \
         retried; ready after {ready_ms:?} ms"
    );
    assert!(ok > 100, "too little load to mean anything: {ok}");
    let served = counts.served.lock().unwrap().clone();
    println!("served: {served:?}");
    assert_eq!(
        served.len(),
        5,
        "a kind of client was never served: {served:?}"
    );
    assert_eq!(
        (failed, refused),
        (0, 0),
        "errors: {:?}",
        counts.errors.lock().unwrap()
    );
    drop(server.dir);
}

/// A new process that cannot serve (an invalid config on disk, or a binary
/// that exits at once) fails the upgrade with its error; the old process
/// serves on, and a later upgrade still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_new_process_leaves_the_old_one_serving() {
    let server = start_server().await;
    let config = server.dir.path().join("proxy.toml");
    let good = std::fs::read_to_string(&config).expect("read config");
    let serves = || async {
        raw_exchange(
            server.http,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await
        .starts_with("HTTP/1.1 200")
    };

    std::fs::write(&config, format!("{good}\n[server\n")).expect("break config");
    let (ok, text, _) = upgrade(&server.socket, &[]).await;
    assert!(!ok, "an upgrade to a bad config succeeded: {text}");
    assert!(
        text.contains("did not become ready")
            && text.contains(&format!("{}:", config.display()))
            && text.contains("keeps serving"),
        "{text}"
    );
    assert!(serves().await, "the old process stopped serving");

    std::fs::write(&config, &good).expect("restore config");
    let (ok, text, _) = upgrade(&server.socket, &["--binary", "/bin/false"]).await;
    assert!(!ok, "an upgrade to /bin/false succeeded: {text}");
    assert!(text.contains("exited before"), "{text}");
    assert!(serves().await, "the old process stopped serving");

    let (ok, text, pid) = upgrade(&server.socket, &[]).await;
    assert!(ok, "{text}");
    server.pids.add(pid.expect("pid"));
    assert!(serves().await, "the new process does not serve");
}

/// `kill -USR2` hands over as `cutover upgrade` does: the first process
/// exits, a new one serves the same sockets and admin socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_over_like_cutover_upgrade() {
    let server = start_server().await;
    let log_path = server.dir.path().join("log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let new_pid = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        // The admin socket answers a moment before the hand-off is wired:
        // a signal that early is logged as refused, so send again.
        if !log.contains("started ") {
            let killed = Command::new("kill")
                .args(["-USR2", &server.first.to_string()])
                .status()
                .expect("kill");
            assert!(killed.success());
        }
        let pid = log.lines().find_map(|l| {
            l.split("(pid ")
                .nth(1)?
                .split(')')
                .next()?
                .parse::<u32>()
                .ok()
        });
        if let (Some(pid), true) = (pid, log.contains("serves after")) {
            break pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "no hand-off: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.pids.add(new_pid);
    // The first process exits once drained (its reaper thread waits on it).
    let gone = |pid: u32| {
        !Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    while !gone(server.first) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first process did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!gone(new_pid), "the new process is not running");
    let response = raw_exchange(
        server.http,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    admin_call(
        &server.socket,
        cutover::admin::Command::Status { service: None },
        IO_TIMEOUT,
    )
    .await
    .expect("the admin socket answers after the hand-off");
}
