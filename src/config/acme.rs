//! `[acme]` and a site's `tls = "acme"`: automatic certificates.
//!
//! The keys follow what Caddy and Traefik users know: an `email` for the
//! CA's expiry notices, a `directory` (Traefik's `caServer`, Caddy's
//! `acme_ca`; Let's Encrypt's production directory by default), a `ca_root`
//! to trust for a private CA (Caddy's `acme_ca_root`), the `challenges` to
//! use, and Caddy's `renewal_window_ratio`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Site, Validator};

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (untrusted certificates, generous
/// rate limits): for trying a setup out.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// How certificates are issued for `tls = "acme"` sites.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeSettings {
    /// Contact address given to the CA (expiry and policy notices).
    pub email: Option<String>,
    /// The CA's ACME directory URL.
    pub directory: String,
    /// A PEM root certificate trusted for the connection to the CA, in
    /// addition to the system's roots (a private CA, or Pebble in tests).
    pub ca_root: Option<PathBuf>,
    /// Challenge types in order of preference; a failed attempt moves on
    /// to the next one for the retry.
    pub challenges: Vec<ChallengeKind>,
    /// Renew when this share of the certificate's lifetime is left
    /// (Caddy's default: a third, so a 90-day certificate renews at 60 days).
    pub renewal_window_ratio: f64,
}

impl Default for AcmeSettings {
    fn default() -> Self {
        AcmeSettings {
            email: None,
            directory: LETS_ENCRYPT.to_string(),
            ca_root: None,
            challenges: vec![ChallengeKind::Http01, ChallengeKind::TlsAlpn01],
            renewal_window_ratio: 1.0 / 3.0,
        }
    }
}

/// The challenges cutover can answer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// A token served on the plain-HTTP listener (port 80).
    Http01,
    /// A special certificate on the TLS listener (port 443).
    TlsAlpn01,
}

impl ChallengeKind {
    /// The RFC name, as in config and logs.
    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// How long a failed attempt waits before the first retry; later retries
/// double it, up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(60);
/// The longest wait between two attempts for one name.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 3600);

/// `[acme]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawAcme {
    email: Option<Spanned<String>>,
    directory: Option<Spanned<String>>,
    ca_root: Option<Spanned<PathBuf>>,
    challenges: Option<Spanned<Vec<String>>>,
    renewal_window_ratio: Option<Spanned<f64>>,
}

impl Validator<'_> {
    /// The `[acme]` settings, when some site asks for automatic
    /// certificates (with defaults when there is no `[acme]` table).
    pub(super) fn acme(
        &mut self,
        raw: Option<Spanned<RawAcme>>,
        sites: &[Site],
        state_dir: Option<&PathBuf>,
    ) -> Option<AcmeSettings> {
        let used = sites.iter().any(|site| site.acme);
        let span = raw.as_ref().map(Spanned::span);
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let settings = self.acme_settings(raw);
        if used && state_dir.is_none() {
            let message =
                "tls = \"acme\" needs [server] state_dir: the account key and certificates are kept there";
            let problem = self.locate.problem(span, message.into());
            self.problems.push(problem);
        }
        used.then_some(settings)
    }

    fn acme_settings(&mut self, raw: RawAcme) -> AcmeSettings {
        let defaults = AcmeSettings::default();
        let email = raw.email.map(|email| {
            let span = email.span();
            let email = email.into_inner();
            let valid = email.contains('@')
                && !email.starts_with('@')
                && !email.ends_with('@')
                && !email.contains(|c: char| c.is_whitespace() || c.is_control());
            if !valid {
                self.report(
                    span,
                    format!("invalid acme email {email:?}: expected an address such as \"ops@example.org\""),
                );
            }
            email
        });
        let directory = match raw.directory {
            None => defaults.directory,
            Some(directory) => {
                let span = directory.span();
                match directory_url(directory.get_ref()) {
                    Ok(url) => url,
                    Err(message) => {
                        self.report(span, message);
                        defaults.directory
                    }
                }
            }
        };
        let challenges = match raw.challenges {
            None => defaults.challenges,
            Some(list) => {
                let span = list.span();
                match parse_challenges(list.get_ref()) {
                    Ok(kinds) => kinds,
                    Err(message) => {
                        self.report(span, message);
                        defaults.challenges
                    }
                }
            }
        };
        let renewal_window_ratio = match raw.renewal_window_ratio {
            None => defaults.renewal_window_ratio,
            Some(ratio) => {
                let span = ratio.span();
                let ratio = ratio.into_inner();
                if ratio > 0.0 && ratio < 1.0 {
                    ratio
                } else {
                    self.report(
                        span,
                        format!("renewal_window_ratio {ratio} must be between 0 and 1 (exclusive); 0.33 renews when a third of the lifetime is left"),
                    );
                    defaults.renewal_window_ratio
                }
            }
        };
        AcmeSettings {
            email,
            directory,
            ca_root: raw.ca_root.map(|path| self.named_file("ca_root", path)),
            challenges,
            renewal_window_ratio,
        }
    }

    /// A site's `tls` key: only `"acme"`, and only for names a CA can
    /// validate over HTTP or TLS (no wildcards: they need DNS-01).
    pub(super) fn site_tls(&mut self, raw: Option<Spanned<String>>, hosts: &[String]) -> bool {
        let Some(value) = raw else {
            return false;
        };
        let span = value.span();
        if value.get_ref() != "acme" {
            self.report(
                span,
                format!(
                    "tls = {:?}: the only value is \"acme\" (automatic certificates); static certificates go in [[tls]]",
                    value.get_ref()
                ),
            );
            return false;
        }
        for host in hosts.iter().filter(|host| host.starts_with('*')) {
            self.report(
                span.clone(),
                format!("tls = \"acme\" cannot cover {host:?}: wildcard certificates need the DNS-01 challenge, which cutover does not answer; list the names, or use a [[tls]] certificate"),
            );
        }
        true
    }
}

/// A directory URL, or the `letsencrypt` / `letsencrypt-staging` shorthands.
fn directory_url(text: &str) -> Result<String, String> {
    match text {
        "letsencrypt" => return Ok(LETS_ENCRYPT.to_string()),
        "letsencrypt-staging" => return Ok(LETS_ENCRYPT_STAGING.to_string()),
        _ => {}
    }
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("invalid acme directory {text:?}: expected an https:// URL, \"letsencrypt\" or \"letsencrypt-staging\""))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(format!(
            "acme directory {text:?} must be an https:// URL (ACME runs over HTTPS only)"
        ));
    }
    Ok(text.to_string())
}

fn parse_challenges(names: &[String]) -> Result<Vec<ChallengeKind>, String> {
    if names.is_empty() {
        return Err(
            "acme challenges is empty; use [\"http-01\", \"tls-alpn-01\"] or one of them".into(),
        );
    }
    let mut kinds = Vec::new();
    for name in names {
        let kind = match name.as_str() {
            "http-01" => ChallengeKind::Http01,
            "tls-alpn-01" => ChallengeKind::TlsAlpn01,
            "dns-01" => {
                return Err("the dns-01 challenge is not supported: cutover answers http-01 and tls-alpn-01 itself".into())
            }
            other => {
                return Err(format!(
                    "unknown acme challenge {other:?}: expected \"http-01\" or \"tls-alpn-01\""
                ))
            }
        };
        if kinds.contains(&kind) {
            return Err(format!("acme challenge {name:?} is listed twice"));
        }
        kinds.push(kind);
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, "proxy.toml", Path::new("/etc/cutover"))
    }

    const SITE: &str = "[[site]]\nhosts = [\"example.org\"]\ntls = \"acme\"\n";

    #[test]
    fn defaults_to_lets_encrypt_and_both_challenges() {
        let config = parse(&format!(
            "[server]\nstate_dir = \"/var/lib/cutover\"\n{SITE}"
        ))
        .expect("valid");
        let acme = config.acme.clone().expect("acme in use");
        assert_eq!(acme, AcmeSettings::default());
        assert!(config.sites[0].acme);
        assert_eq!(config.acme_names(), vec!["example.org".to_string()]);
    }

    #[test]
    fn keys_parse_and_shorthands_expand() {
        let config = parse(&format!(
            "[server]\nstate_dir = \"state\"\n\
             [acme]\nemail = \"ops@example.org\"\ndirectory = \"letsencrypt-staging\"\n\
             ca_root = \"pebble.pem\"\nchallenges = [\"tls-alpn-01\"]\nrenewal_window_ratio = 0.5\n{SITE}"
        ))
        .expect("valid");
        let acme = config.acme.expect("acme in use");
        assert_eq!(acme.email.as_deref(), Some("ops@example.org"));
        assert_eq!(acme.directory, LETS_ENCRYPT_STAGING);
        assert_eq!(
            acme.ca_root.as_deref(),
            Some(Path::new("/etc/cutover/pebble.pem"))
        );
        assert_eq!(acme.challenges, vec![ChallengeKind::TlsAlpn01]);
        assert_eq!(acme.renewal_window_ratio, 0.5);
    }

    #[test]
    fn every_mistake_is_located() {
        let err = parse(
            "[acme]\nemail = \"nobody\"\ndirectory = \"http://ca.test/dir\"\n\
             challenges = [\"dns-01\"]\nrenewal_window_ratio = 1.5\n\
             [[site]]\nhosts = [\"*.example.org\"]\ntls = \"acme\"\n\
             [[site]]\nhosts = [\"b.example\"]\ntls = \"static\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "proxy.toml:2:9: invalid acme email",
            "proxy.toml:3:13: acme directory \"http://ca.test/dir\" must be an https:// URL",
            "proxy.toml:4:14: the dns-01 challenge is not supported",
            "proxy.toml:5:24: renewal_window_ratio 1.5",
            "proxy.toml:8:7: tls = \"acme\" cannot cover \"*.example.org\"",
            "proxy.toml:11:7: tls = \"static\"",
            "needs [server] state_dir",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }

    #[test]
    fn no_acme_site_means_no_acme() {
        let config = parse("[acme]\nemail = \"ops@example.org\"\n").expect("valid");
        assert!(config.acme.is_none());
    }
}
