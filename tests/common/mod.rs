//! Shared harness for the `proxy_*` integration tests.
//!
//! * [`start_proxy`] parses a config (relative paths resolve against the
//!   crate root, so `certs-dev/...` works), binds 127.0.0.1:0 listeners and
//!   spawns [`cutover::run`]; [`TestProxy::stop`] drains it.
//! * [`start_upstream`] is a hyper 1 server that records every request it
//!   gets and answers by path (`/echo`, `/slow?ms=N`, `/status/NNN`, anything
//!   else: 200 with a description of the request).
//! * [`start_raw_upstream`] writes fixed bytes (misbehaving responses) or
//!   never answers; [`start_ws_upstream`] is a WebSocket echo server.
//! * Clients: [`send_h1`] / [`send_h2`] over any stream, [`tls_connect`]
//!   trusting `certs-dev/ca.pem`, and [`raw_exchange`] for exact bytes.
//!
//! Everything binds loopback port 0 and every wait is bounded.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any single client operation in these tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The crate root; config paths in tests are relative to it.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn cert_file(name: &str) -> PathBuf {
    root().join("certs-dev").join(name)
}

/// `[[tls]]` block with the dev localhost certificate.
pub const TLS_LOCALHOST: &str = r#"
[[tls]]
cert = "certs-dev/localhost.pem"
key = "certs-dev/localhost-key.pem"
"#;

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=debug`).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

// ---------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------

pub struct TestProxy {
    pub http_addr: SocketAddr,
    /// Bound only when the config has at least one `[[tls]]` entry.
    pub https_addr: Option<SocketAddr>,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub handle: Option<JoinHandle<Result<(), cutover::ServerError>>>,
}

pub fn parse_config(text: &str) -> cutover::Config {
    cutover::Config::parse(text, "test.toml", root())
        .unwrap_or_else(|err| panic!("test config is invalid:\n{err}\n---\n{text}"))
}

/// Starts the proxy on 127.0.0.1:0 (http always, https when the config has
/// certificates).
pub async fn start_proxy(config_text: &str) -> TestProxy {
    start_proxy_on(config_text, "127.0.0.1").await
}

/// [`start_proxy`] on another loopback address (`"::1"` for IPv6 clients).
pub async fn start_proxy_on(config_text: &str, ip: &str) -> TestProxy {
    init_tracing();
    let config = parse_config(config_text);
    let ip: std::net::IpAddr = ip.parse().expect("loopback address");
    let http = TcpListener::bind((ip, 0)).await.expect("bind http");
    let https = if config.tls.is_empty() {
        None
    } else {
        Some(TcpListener::bind((ip, 0)).await.expect("bind https"))
    };
    run_proxy(http, https, config).await
}

/// Runs `config` on listeners the caller bound (when the test needs their
/// ports first, or a config file).
/// The admin socket, when the config has one, is bound here too, before
/// `run`: a command sent at once waits in the socket's queue instead of
/// failing, so no test polls for readiness.
pub async fn run_proxy(
    http: TcpListener,
    https: Option<TcpListener>,
    config: cutover::Config,
) -> TestProxy {
    let http_addr = http.local_addr().expect("addr");
    let https_addr = https.as_ref().map(|l| l.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    // A socket that cannot be bound is left to `run`, which then fails
    // with its own error (the tests of that error start the proxy here).
    let admin = match &config.server.admin_socket {
        Some(path) => cutover::admin::bind(path, config.server.admin_group.as_deref())
            .await
            .ok(),
        None => None,
    };
    let listeners = cutover::Listeners {
        http: Some(http),
        https,
        admin,
    };
    let handle = tokio::spawn(cutover::run(listeners, config, async move {
        let _ = rx.await;
    }));
    TestProxy {
        http_addr,
        https_addr,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// One command on the admin socket at `socket`, bounded by `limit`.
pub async fn admin_call(
    socket: &Path,
    command: cutover::admin::Command,
    limit: Duration,
) -> Result<cutover::admin::proto::Report, String> {
    tokio::time::timeout(limit, cutover::admin::call(socket, &command, |_, _| {}))
        .await
        .expect("admin command timed out")
        .map_err(|err| err.to_string())
}

/// Waits (bounded) until a `cutover serve` *process* answers on its admin
/// socket: unlike [`run_proxy`], a separate process binds the socket when
/// it gets there, so this one polls.
pub async fn wait_for_process_admin(socket: &Path) {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    let status = || cutover::admin::Command::Status { service: None };
    while tokio::time::timeout(
        IO_TIMEOUT,
        cutover::admin::call(socket, &status(), |_, _| {}),
    )
    .await
    .map_or(true, |reply| reply.is_err())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "admin socket {} never answered",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to [`IO_TIMEOUT`]) until the admin socket answers `status`.
/// [`run_proxy`] binds it before `run`, so the first call waits in the
/// socket's queue until `run` serves it: no polling.
pub async fn wait_for_admin(socket: &Path) {
    let status = cutover::admin::Command::Status { service: None };
    if let Err(err) = admin_call(socket, status, IO_TIMEOUT).await {
        panic!("admin socket {} did not answer: {err}", socket.display());
    }
}

impl TestProxy {
    pub fn https(&self) -> SocketAddr {
        self.https_addr
            .expect("config has no [[tls]], so no https listener")
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded) for `run` to return.
    pub async fn join(&mut self) -> Result<(), cutover::ServerError> {
        let handle = self.handle.take().expect("already joined");
        tokio::time::timeout(Duration::from_secs(15), handle)
            .await
            .expect("cutover::run did not return within 15s of shutdown")
            .expect("run task panicked")
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), cutover::ServerError> {
        self.trigger_shutdown();
        self.join().await
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Recording upstream
// ---------------------------------------------------------------------------

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// `None` when the body stream failed before its end.
    pub body: Option<Bytes>,
}

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub records: Arc<Mutex<Vec<Recorded>>>,
    /// How many requests were recorded: the "request arrived" signal.
    arrived: tokio::sync::watch::Receiver<usize>,
}

impl Upstream {
    pub fn requests(&self) -> Vec<Recorded> {
        self.records.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.records.lock().expect("lock").len()
    }

    /// The only request recorded so far (panics unless exactly one).
    pub fn single(&self) -> Recorded {
        let records = self.requests();
        assert_eq!(
            records.len(),
            1,
            "expected exactly one upstream request: {records:#?}"
        );
        records.into_iter().next().expect("one")
    }

    /// Waits (bounded) until at least `n` requests were recorded: woken by
    /// each recorded request, no polling.
    pub async fn wait_for(&self, n: usize) {
        let mut arrived = self.arrived.clone();
        let seen = tokio::time::timeout(IO_TIMEOUT, arrived.wait_for(|count| *count >= n)).await;
        assert!(
            matches!(seen, Ok(Ok(_))),
            "upstream {} saw {} requests, expected {n}",
            self.name,
            self.count()
        );
    }
}

/// Starts a recording hyper HTTP/1.1 upstream. Every response carries
/// `x-upstream: <name>`. Paths:
/// * `/echo` — 200 with the request body;
/// * `/slow?ms=N` — 200 "slow done" after N ms;
/// * `/status/NNN` — status NNN;
/// * anything else — 200 "`<name>` saw `<METHOD> <uri>`".
pub async fn start_upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let records = Arc::new(Mutex::new(Vec::new()));
    let (count, arrived) = tokio::sync::watch::channel(0usize);
    let count = Arc::new(count);
    let upstream = Upstream {
        addr,
        name,
        records: Arc::clone(&records),
        arrived,
    };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (records, count) = (Arc::clone(&records), Arc::clone(&count));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    upstream_handle(name, Arc::clone(&records), Arc::clone(&count), req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    upstream
}

async fn upstream_handle(
    name: &'static str,
    records: Arc<Mutex<Vec<Recorded>>>,
    count: Arc<tokio::sync::watch::Sender<usize>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.ok().map(|c| c.to_bytes());
    records.lock().expect("lock").push(Recorded {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    count.send_modify(|count| *count += 1);
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let (status, body) = if path == "/echo" {
        (StatusCode::OK, body.unwrap_or_default())
    } else if path == "/slow" {
        let ms: u64 = query
            .strip_prefix("ms=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        (StatusCode::OK, Bytes::from_static(b"slow done"))
    } else if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        (status, Bytes::from(format!("status {}", status.as_u16())))
    } else {
        let text = format!("{name} saw {} {}", parts.method, parts.uri);
        (StatusCode::OK, Bytes::from(text))
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("x-upstream", name.parse().expect("header value"));
    Ok(response)
}

/// An upstream speaking raw bytes: it reads one request head per
/// connection, records it, then writes `response` and closes — or, when
/// `response` is `None`, holds the connection open without answering.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub heads: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    pub fn count(&self) -> usize {
        self.heads.lock().expect("lock").len()
    }
}

pub async fn start_raw_upstream(response: Option<&'static [u8]>) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind raw upstream");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&heads);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                recorded.lock().expect("lock").push(head);
                match response {
                    Some(bytes) => {
                        let _ = stream.write_all(bytes).await;
                        let _ = stream.flush().await;
                        let _ = stream.shutdown().await;
                        // Let the peer read before the socket is dropped.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => {
                        // Hang (bounded, so the task cannot outlive the test run).
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
        }
    });
    RawUpstream { addr, heads }
}

/// Reads up to and including the blank line that ends a request/response head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(IO_TIMEOUT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => buf.push(byte[0]),
            _ => return None,
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A WebSocket echo server (tokio-tungstenite) on its own listener. Returns
/// its address and the number of handshakes it accepted.
pub async fn start_ws_upstream() -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ws upstream");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(Mutex::new(0usize));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                *counter.lock().expect("lock") += 1;
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        if ws.send(message).await.is_err() {
                            return;
                        }
                    } else if message.is_close() {
                        // tungstenite answers the close frame itself; drain.
                        let _ = ws.close(None).await;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// An address nothing listens on (bound then closed).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A fully read response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Builds a request; `host` becomes the Host header (HTTP/1) and, with
/// `uri` absolute, the `:authority` (HTTP/2).
pub fn request(
    method: &str,
    uri: &str,
    host: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
        .body(Full::new(body.into()))
        .expect("request")
}

async fn collect(response: Response<Incoming>) -> Result<Resp, hyper::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Resp {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// Sends one HTTP/1.1 request on `io` and reads the whole response.
pub async fn send_h1<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await?;
    collect(response).await
}

/// Sends one HTTP/2 request on `io` (prior knowledge or ALPN h2).
pub async fn send_h2<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await?;
    collect(response).await
}

/// Plain-TCP HTTP/1.1 request to `addr` with a Host header, bounded in time.
pub async fn http_request(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
    let stream = TcpStream::connect(addr).await.expect("connect");
    tokio::time::timeout(IO_TIMEOUT, send_h1(stream, req))
        .await
        .expect("request timed out")
        .expect("request failed")
}

/// GET `path` with `Host: host` over plain HTTP/1.1.
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    http_request(addr, request("GET", path, host, Bytes::new())).await
}

/// The dev CA as a rustls root store.
pub fn root_store() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(&cert_file("ca.pem")) {
        roots.add(cert).expect("add dev CA");
    }
    roots
}

pub fn load_certs(path: &Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .expect("open pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse pem")
}

pub fn client_tls_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(root_store())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// TLS connection to `addr` with SNI `sni`, verifying against the dev CA.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(client_tls_config(alpn));
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake failed")
}

/// HTTPS request over HTTP/1.1 (ALPN http/1.1).
pub async fn https_h1(addr: SocketAddr, sni: &str, req: Request<Full<Bytes>>) -> Resp {
    let tls = tls_connect(addr, sni, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tokio::time::timeout(IO_TIMEOUT, send_h1(tls, req))
        .await
        .expect("request timed out")
        .expect("request failed")
}

/// HTTPS request over HTTP/2 (ALPN h2); `req`'s URI must be absolute.
pub async fn https_h2(addr: SocketAddr, sni: &str, req: Request<Full<Bytes>>) -> Resp {
    let tls = tls_connect(addr, sni, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tokio::time::timeout(IO_TIMEOUT, send_h2(tls, req))
        .await
        .expect("request timed out")
        .expect("request failed")
}

/// Sends exact bytes and reads one response: the head plus a
/// Content-Length or chunked body, or everything until EOF. Returns what
/// was read (possibly empty if the proxy closed without answering).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_response(&mut stream).await
}

/// Reads one HTTP/1 response from `stream` (bounded by [`IO_TIMEOUT`]).
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        if response_complete(&buf) {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!(
                "no complete response within {IO_TIMEOUT:?}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= length;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    // 1xx/204/304 have no body; otherwise read to EOF.
    let status = raw_status(&head);
    (100..200).contains(&status) || status == 204 || status == 304
}

/// The status code of a raw response, or 0 when there is none.
pub fn raw_status(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| response.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Whether a raw response head has header `name` (case-insensitive).
pub fn raw_has_header(response: &str, name: &str) -> bool {
    let head = response.split("\r\n\r\n").next().unwrap_or("");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    head.lines()
        .skip(1)
        .any(|line| line.to_ascii_lowercase().starts_with(&prefix))
}
