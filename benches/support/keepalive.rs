//! The in-process load client of the flip and deploy benches: keep-alive
//! HTTP/1.1 connections that send `GET /` back to back and report each
//! request's outcome, so a bench can count exactly which requests failed
//! around a switch (an external generator only reports totals).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Longest one connect, or one request and its body, may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection that carries the load's requests.
pub type Sender = http1::SendRequest<Empty<Bytes>>;

/// What happened to one request.
pub enum Outcome {
    Ok,
    /// The connection was closed before a request was sent on it (the
    /// server ended keep-alive): not a failure, reconnect.
    Closed,
    /// The app itself answered 500 on purpose (the test app's
    /// `FAIL_PERCENT`, marked `x-app-failure: deliberate`): a bad version's
    /// own failure, counted apart from the proxy's.
    Deliberate,
    /// The request failed; the text says how.
    Failed(String),
}

/// Opens one keep-alive connection; the error is a short kind for reports.
pub async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|err| err.kind().to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| err.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends `GET /` with `Host: host` and reads the whole body; only a 200 is
/// a success.
pub async fn request(sender: &mut Sender, host: &str) -> Outcome {
    if sender.ready().await.is_err() {
        return Outcome::Closed;
    }
    let exchange = async {
        let req = Request::get("/")
            .header(hyper::header::HOST, host)
            .body(Empty::new())
            .expect("a valid request");
        let response = sender
            .send_request(req)
            .await
            .map_err(|err| format!("request: {}", cutover::errors::chain(&err)))?;
        let status = response.status();
        let deliberate = response
            .headers()
            .get("x-app-failure")
            .is_some_and(|value| value == "deliberate");
        response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("body: {}", cutover::errors::chain(&err)))?;
        if status == StatusCode::OK {
            Ok(false)
        } else if deliberate && status == StatusCode::INTERNAL_SERVER_ERROR {
            Ok(true)
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(false)) => Outcome::Ok,
        Ok(Ok(true)) => Outcome::Deliberate,
        Ok(Err(kind)) => Outcome::Failed(kind),
        Err(_) => Outcome::Failed("timeout (5 s)".to_string()),
    }
}
