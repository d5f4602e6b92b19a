//! HTTP health probes: one probe, and "probe until healthy or the deadline"
//! with a consecutive-success threshold.
//!
//! Probes go over plain HTTP, never a bare TCP connect: docker-proxy
//! accepts connections on a published port before the app listens, so a
//! TCP check would lie (docker-notes, pitfall 2).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::HealthCheck;

/// Largest health body we read (JSON checks); more is a failed probe.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Why an upstream is not (yet) healthy.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// With hyper's cause chain: its own text alone ("connection error",
    /// "operation was canceled") does not say what happened.
    #[error("HTTP error: {0}")]
    Http(String),
    /// The connection closed before the request went out: typically
    /// docker-proxy accepting on a published port with nothing listening
    /// in the container yet.
    #[error(
        "connection closed before the request was sent (nothing listening behind the port yet?)"
    )]
    ClosedBeforeRequest,
    #[error("status {got}, expected {expected}")]
    Status { got: u16, expected: u16 },
    #[error("body is not the expected JSON: {0}")]
    Json(String),
}

/// A progress report while waiting for health.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub attempt: u32,
    pub consecutive_ok: u32,
    pub needed: u32,
    pub result: Result<(), ProbeError>,
}

/// Probes once: GET `check.path`, compare status and JSON fields.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), ProbeError> {
    tokio::time::timeout(check.timeout, probe_inner(addr, check))
        .await
        .map_err(|_| ProbeError::Timeout(check.timeout))?
}

async fn probe_inner(addr: SocketAddr, check: &HealthCheck) -> Result<(), ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| ProbeError::Connect(err.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(check.path.as_str())
        .header(http::header::HOST, "localhost")
        .header(http::header::USER_AGENT, "cutover-health")
        .body(Empty::<Bytes>::new())
        .map_err(|err| ProbeError::Http(err.to_string()))?;
    let response = sender.send_request(request).await.map_err(http_error)?;
    let status = response.status();
    if status != StatusCode::from_u16(check.expect_status).unwrap_or(StatusCode::OK) {
        return Err(ProbeError::Status {
            got: status.as_u16(),
            expected: check.expect_status,
        });
    }
    if check.expect_json.is_empty() {
        return Ok(());
    }
    let body = Limited::new(response.into_body(), MAX_HEALTH_BODY)
        .collect()
        .await
        .map_err(|err| ProbeError::Http(crate::errors::chain(err.as_ref())))?
        .to_bytes();
    check_json(&body, &check.expect_json)
}

/// A hyper error as a probe result, with its causes.
fn http_error(err: hyper::Error) -> ProbeError {
    if err.is_canceled() {
        return ProbeError::ClosedBeforeRequest;
    }
    ProbeError::Http(crate::errors::chain(&err))
}

/// Every expected field (a dotted path) must equal its value.
fn check_json(body: &[u8], expected: &[(String, serde_json::Value)]) -> Result<(), ProbeError> {
    let document: serde_json::Value =
        serde_json::from_slice(body).map_err(|err| ProbeError::Json(err.to_string()))?;
    for (path, want) in expected {
        let got = path
            .split('.')
            .try_fold(&document, |value, key| value.get(key));
        if got != Some(want) {
            return Err(ProbeError::Json(format!(
                "{path} is {}, expected {want}",
                got.map_or("missing".to_string(), ToString::to_string)
            )));
        }
    }
    Ok(())
}

/// Probes every `interval` until `healthy_after` consecutive probes pass
/// (Ok) or `deadline` passes (the last probe's error). Callers that must
/// stop early (the container died) race this future against that event.
pub async fn wait_healthy(
    addr: SocketAddr,
    check: &HealthCheck,
    mut report: impl FnMut(&ProbeReport),
) -> Result<(), ProbeError> {
    let deadline = Instant::now() + check.deadline;
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut consecutive_ok = 0;
    let mut attempt = 0;
    let mut last_error = ProbeError::Timeout(check.deadline);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::time::sleep_until(deadline) => return Err(last_error),
        }
        attempt += 1;
        let result = probe(addr, check).await;
        match &result {
            Ok(()) => consecutive_ok += 1,
            Err(err) => {
                consecutive_ok = 0;
                last_error = err.clone();
            }
        }
        report(&ProbeReport {
            attempt,
            consecutive_ok,
            needed: check.healthy_after,
            result,
        });
        if consecutive_ok >= check.healthy_after {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(last_error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A loopback upstream that reads one request and then does `then`
    /// with the connection.
    async fn upstream(then: fn(tokio::net::TcpStream)) -> SocketAddr {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                then(stream);
            }
        });
        addr
    }

    fn check(timeout: Duration) -> HealthCheck {
        HealthCheck {
            timeout,
            ..HealthCheck::default()
        }
    }

    /// An upstream that never answers: the error names the configured
    /// timeout.
    #[tokio::test]
    async fn a_probe_that_times_out_names_the_timeout() {
        let addr = upstream(|stream| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(stream);
            });
        })
        .await;
        let err = probe(addr, &check(Duration::from_millis(300)))
            .await
            .expect_err("never answers");
        assert_eq!(err.to_string(), "no answer within 300ms");
    }

    /// hyper's own text ("connection error") hides the cause; the probe
    /// error carries it.
    #[tokio::test]
    async fn a_reset_connection_says_reset() {
        let addr = upstream(|stream| {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
        })
        .await;
        let err = probe(addr, &check(Duration::from_secs(5)))
            .await
            .expect_err("reset");
        assert!(
            err.to_string().to_lowercase().contains("reset"),
            "the error names the reset: {err}"
        );
    }

    #[test]
    fn json_fields_compare_by_dotted_path() {
        let body = br#"{"status":"UP","db":{"ok":true}}"#;
        assert!(check_json(body, &[("status".into(), json!("UP"))]).is_ok());
        assert!(check_json(body, &[("db.ok".into(), json!(true))]).is_ok());
        let err = check_json(body, &[("status".into(), json!("DOWN"))]).unwrap_err();
        assert!(err.to_string().contains("status is \"UP\""), "{err}");
        assert!(check_json(b"not json", &[("a".into(), json!(1))]).is_err());
        assert!(check_json(body, &[("missing".into(), json!(1))]).is_err());
    }
}
