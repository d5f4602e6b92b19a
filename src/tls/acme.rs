//! What the data plane needs from automatic certificates (ACME): the
//! answers to challenges in progress, and the certificates issued so far.
//!
//! The `acme` part (the ACME client and its renewal scheduler) writes both;
//! the request path (HTTP-01) and the TLS resolver (TLS-ALPN-01, issued
//! certificates) only read them. They live here, below both sides, so the
//! proxy can answer for ACME without importing the ACME client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Where HTTP-01 validators fetch the key authorization (RFC 8555 §8.3).
pub const HTTP01_PATH_PREFIX: &str = "/.well-known/acme-challenge/";

/// Challenge answers and issued certificates, shared by the ACME client
/// (writer) and the data plane (reader).
#[derive(Debug, Default)]
pub struct AcmeCerts {
    /// HTTP-01: token → key authorization. Written a few times per order;
    /// read only by plain-HTTP requests under [`HTTP01_PATH_PREFIX`].
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: name → the self-signed challenge certificate. Read
    /// only by handshakes that offer [`ACME_TLS_ALPN`].
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Every name automatic issuance manages, with its certificate once
    /// there is one. Read on every handshake, hence an `ArcSwap`.
    issued: ArcSwap<HashMap<String, Option<Arc<CertifiedKey>>>>,
}

/// What the resolver knows about a server name.
#[derive(Debug)]
pub enum Issued {
    /// Not an automatic name: static `[[tls]]` certificates decide.
    NotManaged,
    /// Managed, but no certificate has been issued yet.
    Pending,
    /// The current certificate.
    Ready(Arc<CertifiedKey>),
}

impl AcmeCerts {
    pub fn new() -> Arc<AcmeCerts> {
        Arc::new(AcmeCerts::default())
    }

    /// The key authorization for an HTTP-01 `token`, while its order runs.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01.lock().ok()?.get(token).cloned()
    }

    /// The TLS-ALPN-01 challenge certificate for `name`, while its order runs.
    pub fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn01.lock().ok()?.get(name).cloned()
    }

    /// The issued certificate for `name` (lower case, as SNI arrives).
    pub fn issued(&self, name: &str) -> Issued {
        match self.issued.load().get(name) {
            None => Issued::NotManaged,
            Some(None) => Issued::Pending,
            Some(Some(key)) => Issued::Ready(Arc::clone(key)),
        }
    }

    /// Makes `names` the managed set: certificates of names that stay are
    /// kept, names that leave fall back to static certificates.
    pub fn manage(&self, names: &[String]) {
        self.issued.rcu(|current| {
            names
                .iter()
                .map(|name| (name.clone(), current.get(name).cloned().flatten()))
                .collect::<HashMap<_, _>>()
        });
    }

    /// Serves `key` for `name` from the next handshake on; connections
    /// already established keep the certificate they were made with. A
    /// name no longer managed (a reload removed it) is left alone.
    pub fn install(&self, name: &str, key: Arc<CertifiedKey>) {
        self.issued.rcu(|current| {
            let mut next = HashMap::clone(current);
            if let Some(slot) = next.get_mut(name) {
                *slot = Some(Arc::clone(&key));
            }
            next
        });
    }

    /// Answers HTTP-01 for `token` until the guard is dropped.
    pub fn answer_http01(self: &Arc<Self>, token: &str, key_authorization: &str) -> ChallengeGuard {
        if let Ok(mut answers) = self.http01.lock() {
            answers.insert(token.to_string(), key_authorization.to_string());
        }
        ChallengeGuard {
            certs: Arc::clone(self),
            answer: Answer::Http01(token.to_string()),
        }
    }

    /// Answers TLS-ALPN-01 for `name` with `key` until the guard is dropped.
    pub fn answer_tls_alpn01(
        self: &Arc<Self>,
        name: &str,
        key: Arc<CertifiedKey>,
    ) -> ChallengeGuard {
        if let Ok(mut answers) = self.tls_alpn01.lock() {
            answers.insert(name.to_string(), key);
        }
        ChallengeGuard {
            certs: Arc::clone(self),
            answer: Answer::TlsAlpn01(name.to_string()),
        }
    }
}

#[derive(Debug)]
enum Answer {
    Http01(String),
    TlsAlpn01(String),
}

/// Withdraws one challenge answer when dropped, so an order that fails or
/// is cancelled halfway leaves nothing behind.
#[derive(Debug)]
pub struct ChallengeGuard {
    certs: Arc<AcmeCerts>,
    answer: Answer,
}

impl Drop for ChallengeGuard {
    fn drop(&mut self) {
        match &self.answer {
            Answer::Http01(token) => {
                if let Ok(mut answers) = self.certs.http01.lock() {
                    answers.remove(token);
                }
            }
            Answer::TlsAlpn01(name) => {
                if let Ok(mut answers) = self.certs.tls_alpn01.lock() {
                    answers.remove(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_answer_lives_as_long_as_its_guard() {
        let certs = AcmeCerts::new();
        let guard = certs.answer_http01("tok", "tok.thumb");
        assert_eq!(certs.http01("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(certs.http01("other"), None);
        drop(guard);
        assert_eq!(certs.http01("tok"), None);
    }

    #[test]
    fn managed_names_are_pending_until_installed() {
        let certs = AcmeCerts::new();
        certs.manage(&["a.test".to_string()]);
        assert!(matches!(certs.issued("a.test"), Issued::Pending));
        assert!(matches!(certs.issued("b.test"), Issued::NotManaged));
    }
}
