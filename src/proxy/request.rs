//! The request path: validate, route, act (forward, file, redirect,
//! status), and account for it.
//!
//! A request loads the current [`Snapshot`] once, as an `Arc`, and uses that
//! one view throughout, so a switch or reload in the middle of a request
//! never mixes two configurations. Every response leaves through
//! [`finish`], which attaches the body tracker that releases the upstream's
//! in-flight count and writes the access-log line when the body ends.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access_log;
use crate::config::{AccessLogMode, Action, Site};
use crate::errors;
use crate::io::body::{
    self, BodyLimitError, ExactLength, LimitedBody, MinRate, OnBodyEnd, ProxyBody, TrackedBody,
};
use crate::io::slowio::Stalled;
use crate::metrics::requests::Tally;
use crate::proxy::forward::{self, ClientFacts};
use crate::proxy::h1::ClientUpgrade;
use crate::proxy::static_dir;
use crate::proxy::strict::{self, Violation};
use crate::routing::canary::{self, Choice};
use crate::routing::table::{self as routes, normalize_host};
use crate::routing::{ServiceSlot, Shared, Snapshot};
use crate::tls::acme::HTTP01_PATH_PREFIX;
use crate::upstream::h1::{self, RequestFraming};
use crate::upstream::pool::{Answer, SendError};
use crate::upstream::response::UpstreamBody;
use crate::upstream::stats::Failure;
use crate::upstream::{Connection, InFlight, Upstream};

/// Facts about one client connection, prepared once per connection.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The client IP as a header value (`X-Forwarded-For`, `X-Real-IP`).
    addr_value: HeaderValue,
    /// This hop's `for=...;proto=...` for `Forwarded`.
    forwarded_for_proto: HeaderValue,
}

impl ClientConn {
    pub fn new(addr: SocketAddr, tls: bool) -> ClientConn {
        let addr_value = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        ClientConn {
            addr,
            tls,
            addr_value,
            forwarded_for_proto: forward::forwarded_for_proto(addr.ip(), proto(tls)),
        }
    }

    fn proto(&self) -> &'static str {
        proto(self.tls)
    }
}

fn proto(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// Everything that can go wrong on the request path, each mapped to one
/// status by [`ProxyError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("refused: {0}")]
    Strict(#[from] Violation),
    #[error("no site for host {0:?}")]
    UnknownHost(String),
    #[error("no route for path")]
    NoRoute,
    /// The `Allow` value lists what the target does accept.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("service {0:?} has no active upstream")]
    NoUpstream(String),
    #[error("service {0:?} stayed paused longer than its pause_timeout")]
    PausedTooLong(String),
    #[error("upstream unreachable: {0}")]
    UpstreamConnect(String),
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    #[error("request body too large")]
    BodyTooLarge,
    #[error("request body too slow")]
    BodyStalled,
    #[error("file unavailable: {0}")]
    File(String),
}

impl ProxyError {
    /// The one place that decides which status a failure becomes.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Strict(Violation::UriTooLong(_)) => StatusCode::URI_TOO_LONG,
            ProxyError::Strict(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnknownHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::NoRoute | ProxyError::File(_) => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoUpstream(_) | ProxyError::PausedTooLong(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyStalled => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Errors after which the connection must not be reused: the request
    /// framing can no longer be trusted, or the body was not fully read.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::Strict(_)
                | ProxyError::BodyTooLarge
                | ProxyError::BodyStalled
        )
    }

    fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let text = format!(
            "{} {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let mut response = Response::new(body::full(text));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.closes_connection() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::MethodNotAllowed(allow) = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// What a file or directory route accepts.
pub const STATIC_METHODS: &str = "GET, HEAD";

/// The `Allow` value for what cutover forwards (every method but `TRACE`,
/// which it refuses; the app may refuse more) and for redirect and status
/// routes, which answer every method alike.
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS";

/// Serves one request. Never fails: every error becomes a response.
///
/// The request's future is boxed here, once: hyper moves the service's
/// future into its connection state, and the whole request path (routing,
/// forwarding, the upstream exchange) is a few KiB of future state that
/// would otherwise be copied on each move (measured: about 1.1k
/// instructions per request of `memcpy`, more than the allocation costs).
pub fn handle(
    shared: Arc<Shared>,
    conn: ClientConn,
    req: Request<Incoming>,
) -> Pin<Box<impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>> {
    Box::pin(serve_request(shared, conn, req))
}

async fn serve_request(
    shared: Arc<Shared>,
    conn: ClientConn,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let arrived = Instant::now();
    let snapshot = shared.snapshot.load_full();
    let mut log = AccessLog::start(&snapshot.config.server.access_log, arrived, &conn, &req);
    let produced = match dispatch(&shared, &snapshot, &conn, req, arrived, log.as_mut()).await {
        Ok(produced) => produced,
        Err(err) => {
            if err.status().is_server_error() {
                tracing::warn!(client.addr = %conn.addr, error = %err, "request failed");
            } else {
                tracing::debug!(client.addr = %conn.addr, error = %err, "request refused");
            }
            Produced::Local(err.into_response())
        }
    };
    let log = log.map(|log| log.handing_to(shared));
    Ok(finish(produced, arrived, log))
}

/// A response, and whether it streams from an upstream (whose in-flight
/// guard must live until the body ends; the body itself hands its
/// connection back to the pool when it ends cleanly), with where its
/// answer is counted when the metrics endpoint is on.
enum Produced {
    Local(Response<ProxyBody>),
    Upstream(Response<UpstreamBody>, InFlight, Option<Tally>),
}

async fn dispatch(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: &ClientConn,
    mut req: Request<Incoming>,
    arrived: Instant,
    log: Option<&mut AccessLog>,
) -> Result<Produced, ProxyError> {
    strict::check_request(&req, &snapshot.config.server.limits)?;
    if !conn.tls {
        if let Some(answer) = acme_http01(shared, &req) {
            return Ok(Produced::Local(answer));
        }
    }
    let authority = request_authority(&req)?;
    let authority_text = authority
        .as_ref()
        .map(|value| {
            value
                .to_str()
                .map_err(|_| ProxyError::BadRequest("Host is not ASCII"))
        })
        .transpose()?;
    let host = match authority_text {
        Some(text) => normalize_host(text).ok_or(ProxyError::BadRequest("invalid host"))?,
        None => Cow::Borrowed(""),
    };
    let site_index = snapshot
        .routes
        .site_index(&host)
        .ok_or_else(|| ProxyError::UnknownHost(host.to_string()))?;
    let site = snapshot
        .routes
        .site_at(site_index)
        .ok_or_else(|| ProxyError::UnknownHost(host.to_string()))?;
    let mut log = log;
    if let Some(log) = log.as_deref_mut() {
        log.set_host(&host);
    }
    // ACME challenges (certbot's `dir` route included) are validated on
    // port 80: they are routed, not redirected.
    let challenge = req.uri().path().starts_with(HTTP01_PATH_PREFIX);
    if !conn.tls && site.https_redirect && !challenge {
        let response = https_redirect(&host, shared.https_port.get(), req.uri());
        return Ok(Produced::Local(response));
    }
    let route_index = routes::route_index(site, req.uri().path()).ok_or(ProxyError::NoRoute)?;
    let route = site.routes.get(route_index).ok_or(ProxyError::NoRoute)?;
    if req.method() == Method::TRACE {
        // Never answered or forwarded: echoing a request back is how
        // cross-site tracing reads cookies and credentials.
        return Err(ProxyError::MethodNotAllowed(allowed_methods(&route.action)));
    }
    let mut produced = match &route.action {
        Action::Status(code) => Produced::Local(status_response(*code)),
        Action::Redirect { to, code } => Produced::Local(redirect(to, *code)),
        Action::File(path) => Produced::Local(serve_file(path, req.method()).await?),
        Action::Dir(root) => {
            Produced::Local(static_dir::serve(root, req.uri().path(), req.method()).await?)
        }
        Action::Service(name) => {
            let body_seen = log.as_deref_mut().and_then(|log| {
                log.set_service(name);
                log.count_body(&req)
            });
            let method = req.method().clone();
            match forward::max_forwards_hop(&method, req.headers_mut())
                .map_err(ProxyError::BadRequest)?
            {
                forward::Hop::Answer => Produced::Local(options_answer()),
                forward::Hop::Forward => {
                    let Choice { upstream, assigned } =
                        pick_upstream(shared, snapshot, name, req.headers()).await?;
                    if let Some(log) = log {
                        log.upstream = Some(Arc::clone(&upstream));
                    }
                    let authority = authority.unwrap_or(HeaderValue::from_static(""));
                    let exchange = Exchange {
                        conn,
                        authority: &authority,
                        arrived,
                        body_seen,
                        tally: snapshot
                            .routes
                            .counts(site_index, route_index)
                            .map(|counts| Tally::new(counts, &method)),
                    };
                    let mut produced = forward(shared, snapshot, exchange, req, upstream).await?;
                    // The snapshot is this request's own: its canary is
                    // the one that assigned it.
                    let cookie = assigned.and_then(|to| {
                        let canary = snapshot.service(name)?.canary.as_ref()?;
                        Some(canary.set_cookie(to))
                    });
                    if let Some(cookie) = cookie {
                        match &mut produced {
                            Produced::Local(response) => {
                                response.headers_mut().append(header::SET_COOKIE, cookie)
                            }
                            Produced::Upstream(response, ..) => {
                                response.headers_mut().append(header::SET_COOKIE, cookie)
                            }
                        };
                    }
                    produced
                }
            }
        }
    };
    match &mut produced {
        Produced::Local(response) => add_site_headers(response, site, conn),
        Produced::Upstream(response, ..) => add_site_headers(response, site, conn),
    }
    Ok(produced)
}

/// The methods a route's target accepts, for `Allow`.
fn allowed_methods(action: &Action) -> &'static str {
    match action {
        Action::File(_) | Action::Dir(_) => STATIC_METHODS,
        Action::Service(_) | Action::Status(_) | Action::Redirect { .. } => FORWARDED_METHODS,
    }
}

/// cutover's own answer to `OPTIONS` with `Max-Forwards: 0` (RFC 9110
/// §7.6.2): it is the final recipient, so it says what it forwards.
fn options_answer() -> Response<ProxyBody> {
    let mut response = status_response(200);
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}

/// The service's upstream for this request: the active one, or, while a
/// canary runs, the colour the request's sticky cookie names or the share
/// assigns (with the cookie to set). While the service is paused the
/// request waits (up to the service's `pause_timeout`, then 503) and then
/// takes the upstream that is active at release time, which is the point
/// of pausing.
async fn pick_upstream(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    headers: &http::HeaderMap,
) -> Result<Choice, ProxyError> {
    let slot = snapshot
        .service(name)
        .ok_or_else(|| ProxyError::NoUpstream(name.to_string()))?;
    let Some(gate) = &slot.pause else {
        return choose(slot, name, headers);
    };
    let limit = snapshot
        .config
        .services
        .get(name)
        .map_or(std::time::Duration::from_secs(30), |s| s.pause_timeout);
    if !gate.wait(limit).await {
        return Err(ProxyError::PausedTooLong(name.to_string()));
    }
    let now = shared.snapshot.load();
    let slot = now
        .service(name)
        .ok_or_else(|| ProxyError::NoUpstream(name.to_string()))?;
    choose(slot, name, headers)
}

/// The slot's active upstream; with a canary, the sticky or assigned one.
fn choose(slot: &ServiceSlot, name: &str, headers: &http::HeaderMap) -> Result<Choice, ProxyError> {
    let active = slot
        .active
        .as_ref()
        .ok_or_else(|| ProxyError::NoUpstream(name.to_string()))?;
    Ok(match &slot.canary {
        None => Choice {
            upstream: Arc::clone(active),
            assigned: None,
        },
        Some(canary) => canary.choose(
            active,
            headers.get_all(header::COOKIE).iter(),
            canary::draw(),
        ),
    })
}

/// The authority the client addressed: the URI's (HTTP/2 `:authority`,
/// absolute-form HTTP/1) or the single Host header. HTTP/1.1 requires
/// exactly one Host (RFC 9112 §3.2); several are a smuggling vector.
fn request_authority(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first_host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("invalid authority"));
    }
    match first_host {
        Some(value) => Ok(Some(value.clone())),
        None if req.version() == Version::HTTP_11 => {
            Err(ProxyError::BadRequest("HTTP/1.1 request without Host"))
        }
        None => Ok(None),
    }
}

fn https_redirect(host: &str, https_port: Option<u16>, uri: &Uri) -> Response<ProxyBody> {
    let port = match https_port {
        Some(443) | None => String::new(),
        Some(port) => format!(":{port}"),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    redirect(&format!("https://{host}{port}{path}"), 301)
}

fn redirect(location: &str, code: u16) -> Response<ProxyBody> {
    let mut response = status_response(code);
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn status_response(code: u16) -> Response<ProxyBody> {
    let mut response = Response::new(body::empty());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}

/// Serves one configured static file (the seeds' privacy page). Files are
/// small and read per request, so an edited file shows up immediately.
async fn serve_file(
    path: &std::path::Path,
    method: &Method,
) -> Result<Response<ProxyBody>, ProxyError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed(STATIC_METHODS));
    }
    let contents = tokio::fs::read(path).await.map_err(|err| {
        tracing::warn!(file = %path.display(), error = %err, "static file unavailable");
        ProxyError::File(err.to_string())
    })?;
    let content_type = content_type(path);
    let length = contents.len();
    let body = if method == Method::HEAD {
        body::empty()
    } else {
        body::full(contents)
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// The `Content-Type` of a served file, by its extension.
pub(super) fn content_type(path: &std::path::Path) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    if mime.type_() == mime_guess::mime::TEXT {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    }
}

/// The answer to an ACME HTTP-01 validation: the key authorization for a
/// token of an order in progress, on plain HTTP, before any site rule (an
/// `https_redirect` included). Unknown tokens fall through to the routes,
/// so a `dir` route for certbot still answers its own.
fn acme_http01(shared: &Shared, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    let token = req.uri().path().strip_prefix(HTTP01_PATH_PREFIX)?;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    let key_authorization = shared.acme.http01(token)?;
    tracing::info!(acme.token = token, "answering an ACME http-01 validation");
    let mut response = Response::new(body::full(key_authorization));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(response)
}

fn add_site_headers<B>(response: &mut Response<B>, site: &Site, conn: &ClientConn) {
    if let (true, Some(hsts)) = (conn.tls, &site.hsts) {
        if let Ok(value) = HeaderValue::from_str(hsts) {
            response
                .headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, value);
        }
    }
}

/// Who asked, for what authority, and since when: what forwarding one
/// request needs besides the request itself.
struct Exchange<'a> {
    conn: &'a ClientConn,
    authority: &'a HeaderValue,
    arrived: Instant,
    /// Counts the request body's bytes for the JSON access log.
    body_seen: Option<Arc<AtomicU64>>,
    /// Where the answer is counted (the metrics endpoint is on).
    tally: Option<Tally>,
}

/// Forwards one request to `upstream` and relays the answer. An answer
/// cutover gives for the upstream (502, 504) and a tunnel's `101` are
/// counted in the upstream's stats here; a streamed response is counted
/// when its body ends ([`RequestEnd`]).
async fn forward(
    shared: &Shared,
    snapshot: &Snapshot,
    mut exchange: Exchange<'_>,
    req: Request<Incoming>,
    upstream: Arc<Upstream>,
) -> Result<Produced, ProxyError> {
    let arrived = exchange.arrived;
    let tally = exchange.tally.take();
    let stats_of = Arc::clone(&upstream);
    let result = relay_exchange(shared, snapshot, exchange, req, upstream).await;
    let status = match result {
        // Counted when its body ends (`RequestEnd`).
        Ok(Produced::Upstream(response, guard, _)) => {
            return Ok(Produced::Upstream(response, guard, tally));
        }
        Ok(Produced::Local(ref response)) => response.status(),
        Err(ref err) => err.status(),
    };
    if let Err(err) = &result {
        match err {
            ProxyError::UpstreamConnect(_) => stats_of.stats().record_failure(Failure::Connect),
            ProxyError::UpstreamTimeout => stats_of.stats().record_failure(Failure::Timeout),
            _ => {}
        }
    }
    // The client's own fault (a body too large or too slow) says nothing
    // about the version behind the upstream, but it was a request.
    if result.is_ok() || status.is_server_error() {
        stats_of.stats().record(status.as_u16(), arrived.elapsed());
    }
    if let Some(tally) = &tally {
        tally.record(&stats_of.label, status.as_u16());
    }
    result
}

async fn relay_exchange(
    shared: &Shared,
    snapshot: &Snapshot,
    exchange: Exchange<'_>,
    mut req: Request<Incoming>,
    upstream: Arc<Upstream>,
) -> Result<Produced, ProxyError> {
    let Exchange {
        conn,
        authority,
        body_seen,
        ..
    } = exchange;
    let limits = &snapshot.config.server.limits;
    let guard = upstream.begin_request();
    let declared = declared_length(&req)?;
    if declared > Some(limits.max_body_bytes) {
        return Err(ProxyError::BodyTooLarge);
    }
    // HTTP/2 frames a body by END_STREAM, HTTP/1.1 upstream by this length.
    let h2_declared = declared.filter(|_| req.version() == Version::HTTP_2);
    let upgrade = (req.version() == Version::HTTP_11)
        .then(|| forward::requested_upgrade(req.headers()))
        .flatten();
    let mut client_upgrade = upgrade.is_some().then(|| ClientUpgrade::of(&mut req));

    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    if parts.version == Version::HTTP_2 {
        forward::join_cookies(&mut headers);
    }
    // A bodiless request (most GETs) needs no limiter and no stall timer.
    let body = if body.is_end_stream() {
        body::empty()
    } else {
        let limited = LimitedBody::new(body, limits.max_body_bytes, limits.body_timeout)
            .with_min_rate(MinRate {
                bytes_per_sec: limits.body_min_rate,
                grace: limits.body_rate_grace,
            });
        let limited = match body_seen {
            Some(seen) => access_log::Counted::new(limited, seen).boxed_unsync(),
            None => limited.boxed_unsync(),
        };
        match h2_declared {
            None => limited,
            Some(0) => {
                let mut body = limited;
                body::expect_no_data(&mut body)
                    .await
                    .map_err(|err| body_error(&*err))?;
                body::empty()
            }
            Some(declared) => ExactLength::new(limited, declared).boxed_unsync(),
        }
    };
    let framing = h1::request_framing(&headers, body.is_end_stream(), body.size_hint().exact());
    let head = upstream_head(
        &parts.method,
        &parts.uri,
        &headers,
        &ClientFacts {
            addr: conn.addr.ip(),
            addr_value: &conn.addr_value,
            proto: conn.proto(),
            host: authority,
            forwarded_for_proto: &conn.forwarded_for_proto,
            trusted_proxies: &snapshot.config.server.trusted_proxies,
        },
        upgrade.as_ref(),
        framing,
    );
    drop(headers);

    // No per-request deadline: the connection's stall clock (upstream
    // timeout) bounds the wait for the head and every gap in the body.
    let answer = upstream
        .pool()
        .send(parts.method, head, framing, body, upgrade.is_some())
        .await
        .map_err(classify_send_error)?;
    let (head, body) = match answer {
        Answer::Switched(head, connection) => {
            let Some(client_upgrade) = client_upgrade.take() else {
                return Err(ProxyError::UpstreamProtocol(
                    "upstream switched protocols without being asked".into(),
                ));
            };
            spawn_tunnel(shared, &upstream, client_upgrade, connection);
            let mut response = Response::new(body::empty());
            *response.status_mut() = head.status;
            let headers = response.headers_mut();
            *headers = head.headers;
            let protocol = headers.get(header::UPGRADE).cloned();
            forward::strip_hop_by_hop(headers);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(protocol) = protocol {
                headers.insert(header::UPGRADE, protocol);
            }
            return Ok(Produced::Local(response));
        }
        Answer::Response(head, body) => (head, body),
    };
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    let headers = response.headers_mut();
    forward::strip_hop_by_hop(headers);
    forward::append_via(headers);
    Ok(Produced::Upstream(response, guard, None))
}

/// The HTTP/1.1 request head sent upstream, written in one pass over the
/// client's fields: `Host` first (the authority the client addressed),
/// then the client's fields minus the hop-by-hop ones and those this hop
/// replaces, then this hop's forwarding fields, the tunnel's `Connection`
/// and `Upgrade` when one was accepted, and the framing header.
///
/// The target is origin-form `/path?query` (RFC 9112 §3.2.1), whatever
/// form the client used; the Host header carries the authority.
fn upstream_head(
    method: &Method,
    uri: &Uri,
    headers: &http::HeaderMap,
    facts: &ClientFacts<'_>,
    upgrade: Option<&HeaderValue>,
    framing: RequestFraming,
) -> Vec<u8> {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let forwarding = forward::forwarding_fields(headers, facts);
    let hop_by_hop = forward::HopByHop::of(headers);
    let client_fields = headers.iter().filter(|(name, _)| {
        *name != header::HOST && !hop_by_hop.contains(name) && !forwarding.replaces(name)
    });
    let tunnel = upgrade.map(|protocol| {
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, protocol.clone()),
        ]
    });
    let fields = std::iter::once((&header::HOST, facts.host))
        .chain(client_fields)
        .chain(forwarding.iter())
        .chain(tunnel.iter().flatten().map(|(name, value)| (name, value)));
    h1::encode_request_head(method, target, fields, framing)
}

/// The request's declared Content-Length, if any. hyper has already refused
/// unparsable or conflicting values, so a parse failure here is a bug
/// signal we still answer with 400 rather than trust.
fn declared_length(req: &Request<Incoming>) -> Result<Option<u64>, ProxyError> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or(ProxyError::BadRequest("invalid Content-Length")),
    }
}

/// Maps an upstream exchange's failure to the status the client gets: a
/// stalled upstream is a 504, a failed request body the client's own 4xx,
/// anything else the upstream's fault (502).
fn classify_send_error(err: SendError) -> ProxyError {
    match err {
        SendError::Connect { .. } => ProxyError::UpstreamConnect(err.to_string()),
        SendError::Io(io) if is_stall(&io) => ProxyError::UpstreamTimeout,
        SendError::Body(body) => body_error(&*body),
        SendError::Io(_) | SendError::Closed | SendError::Protocol(_) => {
            ProxyError::UpstreamProtocol(errors::chain(&err))
        }
    }
}

/// What a failed request body becomes before anything was sent upstream.
fn body_error(err: &(dyn std::error::Error + Send + Sync + 'static)) -> ProxyError {
    match err.downcast_ref::<BodyLimitError>() {
        Some(limit) => body_limit_error(limit),
        None => ProxyError::BadRequest("request body is malformed or was cut off"),
    }
}

fn body_limit_error(limit: &BodyLimitError) -> ProxyError {
    match limit {
        BodyLimitError::TooLarge(_) => ProxyError::BodyTooLarge,
        BodyLimitError::Stalled(_) | BodyLimitError::TooSlow(_) => ProxyError::BodyStalled,
        BodyLimitError::Unreadable(_) => {
            ProxyError::BadRequest("request body is malformed or was cut off")
        }
    }
}

/// Whether `err` is the upstream connection's stall clock running out
/// (an I/O error does not list its payload as a `source`, so look inside).
fn is_stall(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<Stalled>())
}

/// Joins the client's and the upstream's upgraded connections and copies
/// bytes both ways until either side closes, the upstream is retired, or the
/// proxy shuts down. The tunnel counts on its upstream meanwhile.
fn spawn_tunnel(
    shared: &Shared,
    upstream: &Arc<Upstream>,
    client: ClientUpgrade,
    upstream_side: Connection,
) {
    let tunnel = upstream.begin_tunnel();
    let retired = upstream.tunnel_token();
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn(async move {
        let mut client = match client.ready().await {
            Ok(client) => client,
            Err(err) => {
                tracing::debug!(error = %err, "upgrade did not complete");
                return;
            }
        };
        let (mut upstream_side, read_ahead) = upstream_side.into_parts();
        tokio::select! {
            result = relay(&mut client, &mut upstream_side, &read_ahead) => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "tunnel ended with an error");
                }
            }
            _ = retired.cancelled() => {
                tracing::info!(upstream.addr = %tunnel.upstream().addr, "closing tunnel: upstream retired");
            }
            _ = shutdown.cancelled() => {}
        }
        drop(tunnel);
    });
}

/// Copies a tunnel's bytes both ways, starting with what the upstream sent
/// right behind its `101` head.
async fn relay<C, U>(client: &mut C, upstream: &mut U, read_ahead: &[u8]) -> std::io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    if !read_ahead.is_empty() {
        client.write_all(read_ahead).await?;
    }
    tokio::io::copy_bidirectional(client, upstream).await?;
    Ok(())
}

/// Attaches the in-flight guard and the access log to the response body.
/// A local response with the access log off is returned as it is.
fn finish(produced: Produced, arrived: Instant, log: Option<AccessLog>) -> Response<ProxyBody> {
    match produced {
        Produced::Local(response) => match log {
            None => response,
            Some(mut log) => {
                log.status = response.status().as_u16();
                let end = RequestEnd {
                    arrived,
                    status: log.status,
                    log: Some(log),
                    in_flight: None,
                    tally: None,
                };
                response.map(|body| TrackedBody::new(body, end).boxed_unsync())
            }
        },
        Produced::Upstream(response, guard, tally) => {
            let status = response.status().as_u16();
            let log = log.map(|mut log| {
                log.status = status;
                log
            });
            let end = RequestEnd {
                arrived,
                status,
                log,
                in_flight: Some(guard),
                tally,
            };
            response.map(|body| TrackedBody::new(body, end).boxed_unsync())
        }
    }
}

/// What is released and logged when a response body ends.
struct RequestEnd {
    arrived: Instant,
    status: u16,
    log: Option<AccessLog>,
    /// Dropped with this record at the end of the body, which releases the
    /// upstream's in-flight count; its upstream's stats count the answer.
    in_flight: Option<InFlight>,
    /// Where the answer is counted by site and method (metrics on).
    tally: Option<Tally>,
}

impl OnBodyEnd for RequestEnd {
    fn on_error(&mut self) {
        if let Some(in_flight) = &self.in_flight {
            in_flight
                .upstream()
                .stats()
                .record_failure(Failure::Truncated);
        }
    }

    fn on_end(&mut self, bytes_sent: u64, completed: bool) {
        let elapsed = self.arrived.elapsed();
        if let Some(in_flight) = &self.in_flight {
            let upstream = in_flight.upstream();
            upstream.stats().record(self.status, elapsed);
            if let Some(tally) = &self.tally {
                tally.record(&upstream.label, self.status);
            }
        }
        if let Some(log) = self.log.take() {
            log.write(bytes_sent, completed, elapsed);
        }
    }
}

/// The fields of one access-log line, written when the response body ends
/// (so `bytes` and `duration` are the real ones, as in nginx's log): as an
/// event on the `cutover::access` target, or as a record handed to the
/// JSON writer thread ([`access_log`]), which formats it there.
///
/// Capturing is kept cheap for the JSON log: values the request has anyway,
/// the upstream's `Arc`, and one buffer for the path, host and service.
struct AccessLog {
    start: Instant,
    client: SocketAddr,
    method: Method,
    /// The path, then the host from `host_at`, then the service from
    /// `service_at`.
    text: Vec<u8>,
    host_at: usize,
    service_at: usize,
    status: u16,
    upstream: Option<Arc<Upstream>>,
    /// The request body's bytes, when one is forwarded (JSON log only).
    body_seen: Option<Arc<AtomicU64>>,
    /// Set for the JSON log: the sink the record goes to at the end.
    json: Option<Arc<Shared>>,
    is_json: bool,
}

impl AccessLog {
    /// A log record for this request, or `None` when the access log is off
    /// or filtered out (then no per-request log work is done at all).
    fn start(
        mode: &AccessLogMode,
        arrived: Instant,
        conn: &ClientConn,
        req: &Request<Incoming>,
    ) -> Option<AccessLog> {
        let is_json = match mode {
            AccessLogMode::Off => return None,
            AccessLogMode::Log => {
                if !tracing::enabled!(target: "cutover::access", tracing::Level::INFO) {
                    return None;
                }
                false
            }
            AccessLogMode::JsonStderr | AccessLogMode::JsonFile(_) => true,
        };
        let path = req.uri().path().as_bytes();
        let mut text = Vec::with_capacity(path.len() + 48);
        text.extend_from_slice(path);
        Some(AccessLog {
            start: arrived,
            client: conn.addr,
            method: req.method().clone(),
            host_at: text.len(),
            service_at: text.len(),
            text,
            status: 0,
            upstream: None,
            body_seen: None,
            json: None,
            is_json,
        })
    }

    fn set_host(&mut self, host: &str) {
        self.text.truncate(self.host_at);
        self.text.extend_from_slice(host.as_bytes());
        self.service_at = self.text.len();
    }

    fn set_service(&mut self, name: &str) {
        self.text.truncate(self.service_at);
        self.text.extend_from_slice(name.as_bytes());
    }

    /// A counter for the request body's bytes (`bytes_in`), when the JSON
    /// log is on and the request has a body.
    fn count_body(&mut self, req: &Request<Incoming>) -> Option<Arc<AtomicU64>> {
        if !self.is_json || req.body().is_end_stream() {
            return None;
        }
        let seen = Arc::new(AtomicU64::new(0));
        self.body_seen = Some(Arc::clone(&seen));
        Some(seen)
    }

    /// Keeps the server's state for the end of the body (JSON log: the
    /// sink lives there); the request path is done with it by then.
    fn handing_to(mut self, shared: Arc<Shared>) -> AccessLog {
        if self.is_json {
            self.json = Some(shared);
        }
        self
    }

    fn write(self, bytes_sent: u64, completed: bool, elapsed: std::time::Duration) {
        match &self.json {
            Some(shared) => shared.access_log.push(access_log::Record {
                arrived: self.start,
                duration: elapsed,
                client: self.client,
                method: self.method,
                host_at: self.host_at,
                service_at: self.service_at,
                text: self.text,
                status: self.status,
                bytes_in: self
                    .body_seen
                    .map_or(0, |seen| seen.load(Ordering::Relaxed)),
                bytes_out: bytes_sent,
                upstream: self.upstream,
                completed,
            }),
            None => self.trace(bytes_sent, completed, elapsed),
        }
    }

    /// The default access log: one `tracing` event.
    fn trace(&self, bytes_sent: u64, completed: bool, elapsed: std::time::Duration) {
        let upstream = self
            .upstream
            .as_ref()
            .map_or_else(|| "-".to_string(), |upstream| upstream.addr.to_string());
        let text = String::from_utf8_lossy(&self.text);
        tracing::info!(
            target: "cutover::access",
            host = &text[self.host_at..self.service_at],
            client.addr = %self.client,
            method = %self.method,
            path = &text[..self.host_at],
            status = self.status,
            bytes = bytes_sent,
            duration_ms = %format_args!("{:.3}", elapsed.as_secs_f64() * 1000.0),
            upstream.addr = %upstream,
            completed,
        );
    }
}
