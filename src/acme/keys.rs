//! Keys and certificates cutover makes itself (with `rcgen`): a fresh
//! ECDSA P-256 key and CSR for each order, and the self-signed TLS-ALPN-01
//! challenge certificate (RFC 8737).

use std::sync::Arc;

use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::tls;

/// A new key and a CSR for `name`.
pub struct Request {
    /// The CSR, DER.
    pub csr: Vec<u8>,
    /// The certificate's private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// A fresh key per order: a renewal never reuses the old key.
pub fn certificate_request(name: &str) -> Result<Request, String> {
    let key = KeyPair::generate().map_err(|err| format!("key generation: {err}"))?;
    let mut params =
        CertificateParams::new(vec![name.to_string()]).map_err(|err| format!("{name}: {err}"))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|err| format!("CSR for {name}: {err}"))?;
    Ok(Request {
        csr: csr.der().to_vec(),
        key_pem: key.serialize_pem(),
    })
}

/// The certificate a TLS-ALPN-01 validator must see for `name`: self-signed,
/// for `name` only, with the critical `acmeIdentifier` extension holding
/// the SHA-256 digest of the key authorization.
pub fn tls_alpn01_certificate(
    name: &str,
    key_authorization_digest: &[u8],
) -> Result<Arc<CertifiedKey>, String> {
    let key = KeyPair::generate().map_err(|err| format!("key generation: {err}"))?;
    let mut params =
        CertificateParams::new(vec![name.to_string()]).map_err(|err| format!("{name}: {err}"))?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(
        key_authorization_digest,
    )];
    let cert = params
        .self_signed(&key)
        .map_err(|err| format!("challenge certificate for {name}: {err}"))?;
    let der_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = tls::provider()
        .key_provider
        .load_private_key(der_key)
        .map_err(|err| format!("challenge key for {name}: {err}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::info::CertInfo;

    #[test]
    fn challenge_certificate_names_only_the_domain_and_carries_the_digest() {
        let digest = [7u8; 32];
        let key = tls_alpn01_certificate("a.example", &digest).expect("built");
        let der = key.end_entity_cert().expect("leaf");
        let info = CertInfo::parse(der).expect("parses");
        assert_eq!(info.names, vec!["a.example".to_string()]);
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        let acme_identifier = cert
            .extensions()
            .iter()
            .find(|ext| ext.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(acme_identifier.critical);
        // An OCTET STRING (0x04, length 32) around the digest.
        assert_eq!(&acme_identifier.value[..2], &[0x04, 32]);
        assert_eq!(&acme_identifier.value[2..], &digest);
    }

    #[test]
    fn each_request_has_a_new_key() {
        let first = certificate_request("a.example").expect("csr");
        let second = certificate_request("a.example").expect("csr");
        assert_ne!(first.key_pem, second.key_pem);
        assert!(first.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!first.csr.is_empty());
    }
}
