//! What a certificate says about itself: the names it covers, who issued
//! it, and when it is valid. Renewal is scheduled from these dates and
//! `cutover status` prints them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The facts about one leaf certificate that cutover uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names of the subject alternative name extension.
    pub names: Vec<String>,
    /// The issuer's common name (or its whole name when it has none).
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    /// Reads a DER certificate.
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|err| format!("cannot parse certificate: {err}"))?;
        let issuer = cert
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map_or_else(|| cert.issuer().to_string(), str::to_string);
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let validity = cert.validity();
        Ok(CertInfo {
            names,
            issuer,
            not_before: unix_time(validity.not_before.timestamp()),
            not_after: unix_time(validity.not_after.timestamp()),
        })
    }

    /// The whole validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Whether the certificate is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

fn unix_time(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs()),
    }
}

/// Seconds since the Unix epoch (0 before it), for status output.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn reads_names_issuer_and_dates_of_the_dev_certificate() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/certs-dev/example.pem");
        let der = CertificateDer::from_pem_file(path).expect("dev certificate");
        let info = CertInfo::parse(&der).expect("parses");
        assert!(info.names.contains(&"example.test".to_string()), "{info:?}");
        assert!(!info.issuer.is_empty());
        assert!(info.not_before < info.not_after);
        assert_eq!(
            info.lifetime(),
            info.not_after
                .duration_since(info.not_before)
                .expect("ordered")
        );
    }
}
