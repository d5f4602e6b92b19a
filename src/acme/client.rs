//! The ACME protocol side, on `instant-acme`: the account (created once,
//! then reused from `state_dir`), and one order per name: answer the
//! challenge through [`AcmeCerts`], wait for the CA to validate, send a CSR
//! with a fresh key, fetch the chain.
//!
//! `instant-acme` brings no HTTP client here (its default one would pull in
//! a second TLS stack); [`CaHttp`] is a small one on the hyper and rustls
//! already in the binary. It trusts the system's roots plus `ca_root`, and
//! it remembers the CA's `Retry-After`, which `instant-acme` does not pass
//! on, so a rate-limited name waits as long as the CA asked.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HOST, RETRY_AFTER};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::keys;
use super::storage::{Storage, StorageError, StoredAccount};
use crate::config::{AcmeSettings, ChallengeKind};
use crate::tls::acme::AcmeCerts;

/// One request to the CA, from connect to the last body byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer accepted from the CA (a chain is a few KiB).
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// How long to wait for the CA to validate, then to issue.
const ORDER_POLLING: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// Why an account or an order failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("the CA could not validate {name} by {challenge}: {detail}")]
    Validation {
        name: String,
        challenge: &'static str,
        detail: String,
    },
    #[error("the CA did not offer the {challenge} challenge for {name}")]
    ChallengeNotOffered {
        name: String,
        challenge: &'static str,
    },
    #[error("the CA's authorization for {name} is {status}")]
    Authorization { name: String, status: String },
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("ca_root {path}: {reason}")]
    CaRoot { path: String, reason: String },
    #[error("no trusted root certificates to verify the CA (install ca-certificates, or set [acme] ca_root)")]
    NoRoots,
    #[error("gave up after {0:?}")]
    Timeout(Duration),
    #[error("the issued certificate cannot be used: {0}")]
    Unusable(String),
}

/// A certificate as the CA issued it.
pub struct IssuedPem {
    /// The private key made for it, PKCS#8 PEM.
    pub key_pem: String,
    /// The chain, leaf first, PEM.
    pub chain_pem: String,
}

/// An account at one CA, ready to order certificates.
pub struct Issuer {
    account: Account,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl Issuer {
    /// Restores the stored account, or registers a new one (agreeing to the
    /// CA's terms, as Caddy and certbot's `--agree-tos` do) and stores it.
    /// A changed `email` is sent to the CA.
    pub async fn connect(settings: &AcmeSettings, storage: &Storage) -> Result<Issuer, AcmeError> {
        let http = CaHttp::new(settings.ca_root.as_deref())?;
        let retry_after = Arc::clone(&http.retry_after);
        let builder = Account::builder_with_http(Box::new(http));
        let contact = settings
            .email
            .as_ref()
            .map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let stored = blocking({
            let storage = storage.clone();
            move || storage.load_account()
        })
        .await?;
        let account = match stored {
            Some(stored) => {
                let email_changed = stored.email != settings.email;
                let account = builder.from_credentials(stored.credentials).await?;
                if email_changed {
                    account.update_contacts(&contacts).await?;
                    tracing::info!(email = ?settings.email, "updated the ACME account's contact");
                    // Stored again below only when the CA took the change.
                    let credentials = blocking({
                        let storage = storage.clone();
                        move || storage.load_account()
                    })
                    .await?;
                    if let Some(stored) = credentials {
                        let updated = StoredAccount {
                            email: settings.email.clone(),
                            credentials: stored.credentials,
                        };
                        let storage = storage.clone();
                        blocking(move || storage.save_account(&updated)).await?;
                    }
                }
                account
            }
            None => {
                let new_account = NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = builder
                    .create(&new_account, settings.directory.clone(), None)
                    .await?;
                let stored = StoredAccount {
                    email: settings.email.clone(),
                    credentials,
                };
                let storage_for_save = storage.clone();
                blocking(move || storage_for_save.save_account(&stored)).await?;
                tracing::info!(directory = %settings.directory, account = %account.id(), "registered an ACME account");
                account
            }
        };
        Ok(Issuer {
            account,
            retry_after,
        })
    }

    /// The `Retry-After` of the CA's last answer that had one, once.
    pub fn take_retry_after(&self) -> Option<Duration> {
        let at = self.retry_after.lock().ok()?.take()?;
        at.duration_since(SystemTime::now()).ok()
    }

    /// Orders a certificate for `name`, proving control by `kind`.
    pub async fn issue(
        &self,
        name: &str,
        kind: ChallengeKind,
        certs: &Arc<AcmeCerts>,
    ) -> Result<IssuedPem, AcmeError> {
        let identifiers = [Identifier::Dns(name.to_string())];
        let mut order = self.account.new_order(&NewOrder::new(&identifiers)).await?;
        // Answers are withdrawn when these guards drop, however this ends.
        let mut answers = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                status => {
                    return Err(AcmeError::Authorization {
                        name: name.to_string(),
                        status: format!("{status:?}").to_lowercase(),
                    })
                }
            }
            let mut challenge = authorization
                .challenge(challenge_type(kind))
                .ok_or_else(|| AcmeError::ChallengeNotOffered {
                    name: name.to_string(),
                    challenge: kind.name(),
                })?;
            let key_authorization = challenge.key_authorization();
            answers.push(match kind {
                ChallengeKind::Http01 => {
                    certs.answer_http01(&challenge.token, key_authorization.as_str())
                }
                ChallengeKind::TlsAlpn01 => {
                    let cert =
                        keys::tls_alpn01_certificate(name, key_authorization.digest().as_ref())
                            .map_err(AcmeError::Key)?;
                    certs.answer_tls_alpn01(name, cert)
                }
            });
            challenge.set_ready().await?;
        }
        let validated = match order.poll_ready(&ORDER_POLLING).await {
            Ok(OrderStatus::Ready) => Ok(()),
            Ok(_) => Err(None),
            Err(instant_acme::Error::Api(problem)) => Err(Some(problem.to_string())),
            Err(err) => return Err(err.into()),
        };
        if let Err(problem) = validated {
            let detail = match problem {
                Some(problem) => problem,
                None => challenge_errors(&mut order).await,
            };
            return Err(AcmeError::Validation {
                name: name.to_string(),
                challenge: kind.name(),
                detail,
            });
        }
        drop(answers);
        let request = keys::certificate_request(name).map_err(AcmeError::Key)?;
        order.finalize_csr(&request.csr).await?;
        let chain_pem = order.poll_certificate(&ORDER_POLLING).await?;
        Ok(IssuedPem {
            key_pem: request.key_pem,
            chain_pem,
        })
    }
}

fn challenge_type(kind: ChallengeKind) -> ChallengeType {
    match kind {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    }
}

/// What the CA said about each failed challenge of an invalid order.
async fn challenge_errors(order: &mut Order) -> String {
    let mut details = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if let Ok(state) = authorization.refresh().await {
            details.extend(
                state
                    .challenges
                    .iter()
                    .filter_map(|challenge| challenge.error.as_ref())
                    .map(|problem| {
                        problem
                            .detail
                            .clone()
                            .unwrap_or_else(|| problem.to_string())
                    }),
            );
        }
    }
    if details.is_empty() {
        "the order became invalid".to_string()
    } else {
        details.join("; ")
    }
}

/// Runs blocking file work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, AcmeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| AcmeError::Key(format!("storage task failed: {err}")))?
        .map_err(AcmeError::from)
}

/// `instant-acme`'s HTTP client: one HTTPS connection per request (an
/// order makes about a dozen), HTTP/1.1, verified against the system's
/// roots and `ca_root`.
struct CaHttp {
    tls: TlsConnector,
    /// When the CA last asked us to come back (429/503 `Retry-After`).
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl CaHttp {
    fn new(ca_root: Option<&Path>) -> Result<CaHttp, AcmeError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_root {
            let ca_root_error = |reason: String| AcmeError::CaRoot {
                path: path.display().to_string(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|err| ca_root_error(err.to_string()))?;
            if certs.is_empty() {
                return Err(ca_root_error("no certificate in the file".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|err| ca_root_error(err.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(AcmeError::NoRoots);
        }
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| AcmeError::Key(err.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(CaHttp {
            tls: TlsConnector::from(Arc::new(config)),
            retry_after: Arc::default(),
        })
    }
}

impl HttpClient for CaHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        let retry_after = Arc::clone(&self.retry_after);
        Box::pin(async move {
            let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange(tls, req))
                .await
                .map_err(|_| {
                    other(format!("no answer from the CA within {REQUEST_TIMEOUT:?}"))
                })??;
            if let Some(at) = retry_after_header(&response) {
                if let Ok(mut slot) = retry_after.lock() {
                    *slot = Some(at);
                }
            }
            Ok(BytesResponse::from(response))
        })
    }
}

/// Sends one request on a new connection and reads the whole answer.
async fn exchange(
    tls: TlsConnector,
    mut req: Request<BodyWrapper<Bytes>>,
) -> Result<Response<Full<Bytes>>, instant_acme::Error> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(other(format!("refusing a non-HTTPS ACME URL: {uri}")));
    }
    let host = uri
        .host()
        .ok_or_else(|| other(format!("no host in {uri}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|err| other(format!("cannot connect to {host}:{port}: {err}")))?;
    let server_name =
        ServerName::try_from(host.clone()).map_err(|err| other(format!("{host}: {err}")))?;
    let stream = tls
        .connect(server_name, tcp)
        .await
        .map_err(|err| other(format!("TLS to {host}:{port}: {err}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| other(err.to_string()))?;
    if let Some(authority) = uri.authority() {
        if let Ok(value) = authority.as_str().parse() {
            req.headers_mut().insert(HOST, value);
        }
    }
    *req.uri_mut() = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    let answer = async {
        let response = sender
            .send_request(req)
            .await
            .map_err(|err| other(err.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|err| other(format!("reading the CA's answer: {err}")))?
            .to_bytes();
        Ok(Response::from_parts(parts, Full::new(body)))
    };
    let mut answer = std::pin::pin!(answer);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = &mut answer => result,
        ended = &mut connection => match ended {
            Err(err) => Err(other(err.to_string())),
            Ok(()) => answer.await,
        },
    }
}

fn retry_after_header<B>(response: &Response<B>) -> Option<SystemTime> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?.trim();
    match value.parse::<u64>() {
        Ok(seconds) => Some(SystemTime::now() + Duration::from_secs(seconds)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

fn other(message: String) -> instant_acme::Error {
    instant_acme::Error::Other(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let response = |value: &str| {
            Response::builder()
                .header(RETRY_AFTER, value)
                .body(())
                .expect("response")
        };
        let in_an_hour = retry_after_header(&response("3600")).expect("seconds");
        let left = in_an_hour
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
        let date = retry_after_header(&response("Sun, 06 Nov 2044 08:49:37 GMT")).expect("date");
        assert_eq!(
            date.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after")
                .as_secs(),
            2_362_034_977
        );
        assert!(retry_after_header(&response("soon")).is_none());
    }

    #[test]
    fn a_ca_root_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.pem");
        std::fs::write(&path, "not a certificate").expect("write");
        let err = CaHttp::new(Some(&path)).err().expect("refused");
        assert!(
            err.to_string().contains("no certificate in the file"),
            "{err}"
        );
    }
}
