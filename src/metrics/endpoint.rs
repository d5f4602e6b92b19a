//! The scrape endpoint: `GET /metrics` on its own listener (the
//! `[server] metrics` address), a small hyper HTTP/1.1 server that lives
//! on the server's task tracker and stops with it.
//!
//! It answers in the OpenMetrics text format when the scraper asks for it
//! (Prometheus does, in its `Accept` header) and in the classic Prometheus
//! text format (0.0.4) otherwise, which `curl` and `promtool` read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::export::{CertExpiries, Scrape, UpstreamSource};
use super::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a scraper may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the metrics address. An address taken is retried for a while in
/// the background by [`serve`] instead (during `cutover upgrade` the old
/// process holds it until it hands over); any other error is returned.
pub async fn bind(addr: SocketAddr) -> std::io::Result<Option<TcpListener>> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
        Err(err) => Err(err),
    }
}

/// Serves scrapes until `shutdown`. `listener` is `None` when [`bind`]
/// found the address taken: it is then retried every 100 ms for 30 s.
pub async fn serve(
    addr: SocketAddr,
    listener: Option<TcpListener>,
    scrape: Scrape,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let registry = Arc::new(registry(scrape));
    let listener = match listener {
        Some(listener) => listener,
        None => match tokio::select! {
            listener = retry_bind(addr) => listener,
            () = shutdown.cancelled() => return,
        } {
            Some(listener) => listener,
            None => return,
        },
    };
    tracing::info!(metrics.addr = %addr, "serving metrics on /metrics");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(error = %err, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let registry = Arc::clone(&registry);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let service = service_fn(move |req| {
                let registry = Arc::clone(&registry);
                async move { Ok::<_, Infallible>(answer(&registry, &req)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// The registry a scrape encodes: the control-plane families, then the
/// collector that reads the rest at scrape time.
pub(crate) fn registry(scrape: Scrape) -> Registry {
    let mut registry = Registry::default();
    scrape.metrics.register_events(&mut registry);
    registry.register_collector(Box::new(scrape));
    registry
}

async fn retry_bind(addr: SocketAddr) -> Option<TcpListener> {
    tracing::warn!(metrics.addr = %addr, "metrics address in use; retrying for 30 s");
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(listener) = TcpListener::bind(addr).await {
            return Some(listener);
        }
    }
    tracing::error!(metrics.addr = %addr, "metrics address stayed in use: no metrics endpoint");
    None
}

/// The answer to one request: the metrics for `GET /metrics`, 404 for any
/// other path, 405 for another method.
fn answer(registry: &Registry, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "404 Not Found: try /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let openmetrics = req.headers().get_all(header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    let mut text = String::new();
    let (encoded, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut text, registry),
            OPENMETRICS,
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut text, registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if encoded.is_err() {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "500 cannot encode metrics\n",
        );
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The collector for `metrics`, reading upstreams from `source` and
/// certificates from `certificates`.
pub fn scrape(
    metrics: &Arc<Metrics>,
    source: Arc<dyn UpstreamSource>,
    certificates: Option<CertExpiries>,
) -> Scrape {
    Scrape {
        metrics: Arc::clone(metrics),
        source,
        certificates,
    }
}
