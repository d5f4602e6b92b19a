//! TLS: loading certificate chains and keys, picking one by SNI, and the
//! rustls server configuration (TLS 1.2/1.3, forward-secret AEAD suites
//! only, ALPN h2 + http/1.1).
//!
//! The certificates sit behind an `ArcSwap` inside the resolver, so a
//! renewed certificate is swapped in for new handshakes without rebuilding
//! the `ServerConfig` or touching established connections. Certificates
//! issued automatically (ACME) come from [`acme::AcmeCerts`], beside the
//! static `[[tls]]` ones; [`info`] reads what a certificate says about
//! itself.

pub mod acme;
pub mod info;

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
use acme::{AcmeCerts, Issued, ACME_TLS_ALPN};
use info::CertInfo;

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
        let mut keys = Vec::new();
        let mut errors = Vec::new();
        for entry in files {
            match load_pair(&entry.cert, &entry.key) {
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

    /// Each certificate's own description, in config order (for status).
    pub fn describe(&self) -> Vec<CertInfo> {
        self.keys
            .iter()
            .filter_map(|key| CertInfo::parse(key.end_entity_cert().ok()?).ok())
            .collect()
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        sni.and_then(|host| self.find(host))
            .or_else(|| self.keys.first())
            .cloned()
    }
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
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
    certified_key(chain, key).map_err(|reason| TlsError::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        reason,
    })
}

/// A chain (leaf first) and its private key, ready to serve: the key must
/// load and belong to the leaf.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, String> {
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|err| err.to_string())?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|err| err.to_string())?;
    Ok(certified)
}

/// Picks a certificate per handshake: the static [`CertStore`] and the
/// automatically issued certificates in [`AcmeCerts`].
#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
    acme: Arc<AcmeCerts>,
}

impl SniResolver {
    pub fn new(store: CertStore, acme: Arc<AcmeCerts>) -> Arc<SniResolver> {
        Arc::new(SniResolver {
            store: ArcSwap::from_pointee(store),
            acme,
        })
    }

    /// Replaces the static certificates for all handshakes from now on.
    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }

    /// The static certificates' descriptions (for status).
    pub fn describe_static(&self) -> Vec<CertInfo> {
        self.store.load().describe()
    }

    /// The certificate for a handshake, or `None` to refuse it:
    /// 1. a TLS-ALPN-01 validation (ALPN `acme-tls/1`) gets the challenge
    ///    certificate for its name, or nothing;
    /// 2. an automatic name gets its issued certificate; until there is
    ///    one, a static certificate that covers the name, or nothing (the
    ///    client sees an `access_denied` alert, not a certificate for some
    ///    other name);
    /// 3. any other name gets the static certificate that covers it, else
    ///    the first one.
    ///
    /// rustls hands over the SNI name already in lower case.
    fn pick(&self, sni: Option<&str>, validation: bool) -> Option<Arc<CertifiedKey>> {
        if validation {
            return sni.and_then(|name| self.acme.tls_alpn01(name));
        }
        let store = self.store.load();
        if let Some(name) = sni {
            match self.acme.issued(name) {
                Issued::Ready(key) => return Some(key),
                Issued::Pending => {
                    let covering = store.find(name).cloned();
                    if covering.is_none() {
                        tracing::debug!(
                            tls.sni = name,
                            "handshake refused: no certificate issued for this name yet"
                        );
                    }
                    return covering;
                }
                Issued::NotManaged => {}
            }
        }
        store.pick(sni)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name(), is_validation(hello.alpn()))
    }
}

/// A TLS-ALPN-01 validator offers `acme-tls/1` and nothing else (RFC 8737
/// section 3); a client that also offers `h2` or `http/1.1` is an ordinary
/// one and negotiates those.
fn is_validation<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    let Some(mut protocols) = alpn else {
        return false;
    };
    protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
}

/// The rustls server config: TLS 1.2 and 1.3 only, the provider's
/// forward-secret AEAD suites only, ALPN h2 then http/1.1, and no
/// renegotiation or compression (rustls supports neither). `acme-tls/1`
/// comes last: only a TLS-ALPN-01 validator, which offers nothing else,
/// ever selects it (the connection then closes after the handshake).
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsFiles;

    fn dev_store() -> CertStore {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev");
        CertStore::load(&[TlsFiles {
            cert: dir.join("localhost.pem"),
            key: dir.join("localhost-key.pem"),
        }])
        .expect("dev certificate")
    }

    fn self_signed(name: &str) -> Arc<CertifiedKey> {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Arc::new(certified_key(vec![cert.der().clone()], der).expect("certified"))
    }

    fn names(key: &Option<Arc<CertifiedKey>>) -> Vec<String> {
        let key = key.as_ref().expect("a certificate");
        CertInfo::parse(key.end_entity_cert().expect("leaf"))
            .expect("parses")
            .names
    }

    #[test]
    fn only_a_lone_acme_tls_offer_is_a_validation() {
        let offer = |protocols: &[&'static [u8]]| is_validation(Some(protocols.iter().copied()));
        assert!(offer(&[ACME_TLS_ALPN]));
        assert!(!offer(&[b"h2", ACME_TLS_ALPN]));
        assert!(!offer(&[b"http/1.1"]));
        assert!(!offer(&[]));
        assert!(!is_validation(None::<std::iter::Empty<&[u8]>>));
    }

    #[test]
    fn automatic_names_get_their_own_certificate_or_none() {
        let acme = AcmeCerts::new();
        acme.manage(&["a.test".into(), "localhost".into()]);
        let resolver = SniResolver::new(dev_store(), Arc::clone(&acme));

        // Pending without a covering static certificate: refused.
        assert!(resolver.pick(Some("a.test"), false).is_none());
        // Pending, but a [[tls]] certificate covers it: that one meanwhile.
        assert!(names(&resolver.pick(Some("localhost"), false)).contains(&"localhost".into()));
        // Issued: the automatic certificate.
        acme.install("a.test", self_signed("a.test"));
        assert_eq!(names(&resolver.pick(Some("a.test"), false)), vec!["a.test"]);
        // Other names: static certificates as before (the first by default).
        assert!(names(&resolver.pick(Some("other.test"), false)).contains(&"localhost".into()));
        assert!(resolver.pick(None, false).is_some());

        // Validations get the challenge certificate, or nothing.
        assert!(resolver.pick(Some("a.test"), true).is_none());
        let answer = acme.answer_tls_alpn01("a.test", self_signed("challenge.a.test"));
        assert_eq!(
            names(&resolver.pick(Some("a.test"), true)),
            vec!["challenge.a.test"]
        );
        drop(answer);
        assert!(resolver.pick(Some("a.test"), true).is_none());
        assert!(resolver.pick(Some("localhost"), true).is_none());
    }
}
