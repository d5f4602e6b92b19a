//! The after-deploy check: GET the host's public URL from where the
//! rollout runs, through the host's own listener (not the load balancer),
//! and see the new version answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Time one attempt may take (connect, TLS, request, response head).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// What a healthy answer looks like.
#[derive(Debug, Clone)]
pub struct Expect {
    /// A response header that must carry `version` (when set).
    pub header: Option<String>,
    /// The deployed tag.
    pub version: String,
}

/// Retries `GET url` until it answers with a status below 400 (and,
/// with a version header, the new version) or `limit` passes. Returns
/// what it saw, for the progress line.
pub async fn serves(url: &str, expect: &Expect, limit: Duration) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match tokio::time::timeout(ATTEMPT_TIMEOUT, get(url, expect)).await {
            Ok(Ok(seen)) => return Ok(seen),
            Ok(Err(err)) => err,
            Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
        };
        if tokio::time::Instant::now() + RETRY_EVERY >= deadline {
            return Err(format!("{url}: {last} (checked for {limit:?})"));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// One GET; `Err` says why the answer is not the new version.
async fn get(url: &str, expect: &Expect) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|err| format!("bad url: {err}"))?;
    let host = uri.host().ok_or("url has no host")?.to_string();
    let tls = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(|err| format!("cannot connect to {host}:{port}: {err}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "cutover-rollout")
        .body(Empty::<Bytes>::new())
        .map_err(|err| err.to_string())?;
    let response = if tls {
        let stream = tls_connect(bare, tcp).await?;
        send(stream, request).await?
    } else {
        send(tcp, request).await?
    };
    let status = response.status();
    if status.as_u16() >= 400 {
        return Err(format!("answered {status}"));
    }
    let Some(header) = &expect.header else {
        return Ok(format!("answered {status}"));
    };
    let seen = response
        .headers()
        .get(header.as_str())
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if seen != expect.version {
        return Err(format!(
            "answered {status} with {header}: {seen:?}, not {:?}",
            expect.version
        ));
    }
    Ok(format!("answered {status} with {header}: {seen}"))
}

async fn send<S>(
    stream: S,
    request: http::Request<Empty<Bytes>>,
) -> Result<http::Response<()>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("HTTP handshake: {err}"))?;
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("request failed: {err}"))?;
    let (parts, mut body) = response.into_parts();
    // Read (a bounded amount of) the body so the server sees a clean end.
    let mut read = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, Bytes::len);
        if read > 1 << 20 {
            break;
        }
    }
    connection.abort();
    Ok(http::Response::from_parts(parts, ()))
}

/// TLS to a public URL, verified against the system's roots.
async fn tls_connect(
    host: &str,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|err| format!("{host}: {err}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|err| format!("TLS to {host}: {err}"))
}
