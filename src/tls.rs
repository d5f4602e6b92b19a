//! TLS: loading certificate chains and keys, picking one by SNI, and the
//! rustls server configuration (TLS 1.2/1.3, forward-secret AEAD suites
//! only, ALPN h2 + http/1.1).
//!
//! The certificates sit behind an `ArcSwap` inside the resolver, so a
//! renewed certificate is swapped in for new handshakes without rebuilding
//! the `ServerConfig` or touching established connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::TlsFiles;

/// A certificate or key that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificates: {reason}")]
    Certificates { path: PathBuf, reason: String },
    #[error("{path}: no certificate found (expected PEM \"BEGIN CERTIFICATE\")")]
    NoCertificate { path: PathBuf },
    #[error("{path}: cannot read private key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{cert} and {key} do not belong together: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{path}: leaf certificate cannot be parsed: {reason}")]
    Unparsable { path: PathBuf, reason: String },
}

/// The crypto provider cutover uses everywhere: *ring*, whose suites are all
/// forward-secret AEAD (ECDHE with AES-GCM or ChaCha20-Poly1305 on TLS 1.2;
/// the three TLS 1.3 suites). Installed once as the process default so no
/// other crate can pick a different one.
pub fn provider() -> Arc<CryptoProvider> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Ignore "already installed": tests call this many times in one process.
    let _ = CryptoProvider::install_default((*provider).clone());
    provider
}

/// The loaded certificates, in config order; the first is the default for
/// clients that send no SNI or a name no certificate covers.
#[derive(Debug, Default)]
pub struct CertStore {
    keys: Vec<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads every `[[tls]]` entry, returning every problem found.
    pub fn load(files: &[TlsFiles]) -> Result<CertStore, Vec<TlsError>> {
        let provider = provider();
        let mut keys = Vec::new();
        let mut errors = Vec::new();
        for entry in files {
            match load_pair(&entry.cert, &entry.key, &provider) {
                Ok(key) => keys.push(Arc::new(key)),
                Err(err) => errors.push(err),
            }
        }
        if errors.is_empty() {
            Ok(CertStore { keys })
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether some certificate is valid for `host` (an exact name).
    pub fn covers(&self, host: &str) -> bool {
        self.find(host).is_some()
    }

    fn find(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        let name = ServerName::try_from(host).ok()?;
        self.keys.iter().find(|key| {
            key.end_entity_cert()
                .ok()
                .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                .is_some_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
        })
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        sni.and_then(|host| self.find(host))
            .or_else(|| self.keys.first())
            .cloned()
    }
}

fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|err| TlsError::Certificates {
            path: cert_path.to_path_buf(),
            reason: err.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    };
    webpki::EndEntityCert::try_from(leaf).map_err(|err| TlsError::Unparsable {
        path: cert_path.to_path_buf(),
        reason: format!("{err:?}"),
    })?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|err| TlsError::Key {
        path: key_path.to_path_buf(),
        reason: err.to_string(),
    })?;
    let mismatch = |reason: String| TlsError::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        reason,
    };
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| mismatch(err.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|err| mismatch(err.to_string()))?;
    Ok(certified)
}

/// Picks a certificate per handshake from the current [`CertStore`].
#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub fn new(store: CertStore) -> Arc<SniResolver> {
        Arc::new(SniResolver {
            store: ArcSwap::from_pointee(store),
        })
    }

    /// Replaces the certificates for all handshakes from now on.
    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().pick(hello.server_name())
    }
}

/// The rustls server config: TLS 1.2 and 1.3 only, the provider's
/// forward-secret AEAD suites only, ALPN h2 then http/1.1, and no
/// renegotiation or compression (rustls supports neither).
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
