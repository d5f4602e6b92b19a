//! Where automatic certificates live on disk, under `state_dir`:
//!
//! ```text
//! acme/<ca>/account.json              the ACME account (its private key included)
//! acme/<ca>/certificates/<name>.pem   private key + certificate chain, one file
//! acme/<ca>/certificates/<name>.json  renewal record: failures, next retry
//! ```
//!
//! `<ca>` is made from the directory URL, so staging and production (or
//! any two CAs) never mix accounts or certificates. Key and chain share one
//! file so a single atomic rename replaces both: a crash can never pair a
//! new certificate with an old key. Every file is written 0600 through
//! [`write_private`]; the methods block, so callers run them off the
//! runtime.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use instant_acme::AccountCredentials;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::io::private_file::write_private;

/// A file under the ACME directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{0:?} cannot be used as a file name")]
    BadName(String),
}

/// The stored account, with the contact it was registered with (so a
/// changed `email` can be sent to the CA).
#[derive(Serialize, Deserialize)]
pub struct StoredAccount {
    pub email: Option<String>,
    pub credentials: AccountCredentials,
}

/// A stored certificate: the chain (leaf first), its key, and both as PEM.
#[derive(Debug)]
pub struct StoredCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// What the renewal scheduler remembers between restarts, so a crash loop
/// cannot turn into a retry storm against the CA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalRecord {
    /// Failed attempts since the last success.
    pub failures: u32,
    /// Not before this time (Unix seconds) is the next attempt made.
    pub retry_at: Option<u64>,
    /// The last failure, for status.
    pub last_error: Option<String>,
    /// When the last attempt ended (Unix seconds).
    pub last_attempt: Option<u64>,
}

/// The files of one CA's account and certificates.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    pub fn new(state_dir: &Path, directory_url: &str) -> Storage {
        Storage {
            dir: state_dir.join("acme").join(ca_dir_name(directory_url)),
        }
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    fn certificate_path(&self, name: &str) -> Result<PathBuf, StorageError> {
        Ok(self
            .dir
            .join("certificates")
            .join(format!("{}.pem", file_stem(name)?)))
    }

    fn record_path(&self, name: &str) -> Result<PathBuf, StorageError> {
        Ok(self
            .dir
            .join("certificates")
            .join(format!("{}.json", file_stem(name)?)))
    }

    pub fn load_account(&self) -> Result<Option<StoredAccount>, StorageError> {
        let path = self.account_path();
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| invalid(&path, err))
    }

    pub fn save_account(&self, account: &StoredAccount) -> Result<(), StorageError> {
        let path = self.account_path();
        let bytes = serde_json::to_vec_pretty(account).map_err(|err| invalid(&path, err))?;
        write_private(&path, &bytes).map_err(|source| StorageError::Io { path, source })
    }

    /// The stored certificate for `name`, if there is one.
    pub fn load_certificate(&self, name: &str) -> Result<Option<StoredCertificate>, StorageError> {
        let path = self.certificate_path(name)?;
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(None);
        };
        let chain = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| invalid(&path, err))?;
        if chain.is_empty() {
            return Err(invalid(&path, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| invalid(&path, err))?;
        Ok(Some(StoredCertificate { chain, key }))
    }

    /// Replaces the certificate for `name`: the key and chain (PEM) in one
    /// atomic write.
    pub fn save_certificate(
        &self,
        name: &str,
        key_pem: &str,
        chain_pem: &str,
    ) -> Result<(), StorageError> {
        let path = self.certificate_path(name)?;
        let mut bundle = String::with_capacity(key_pem.len() + chain_pem.len() + 1);
        bundle.push_str(key_pem);
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(chain_pem);
        write_private(&path, bundle.as_bytes()).map_err(|source| StorageError::Io { path, source })
    }

    /// The renewal record for `name`; an unreadable one counts as empty
    /// (it only delays or advances one attempt).
    pub fn load_record(&self, name: &str) -> RenewalRecord {
        let Ok(path) = self.record_path(name) else {
            return RenewalRecord::default();
        };
        match read_if_exists(&path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                tracing::warn!(file = %path.display(), error = %err, "renewal record unreadable; starting afresh");
                RenewalRecord::default()
            }),
            _ => RenewalRecord::default(),
        }
    }

    pub fn save_record(&self, name: &str, record: &RenewalRecord) -> Result<(), StorageError> {
        let path = self.record_path(name)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|err| invalid(&path, err))?;
        write_private(&path, &bytes).map_err(|source| StorageError::Io { path, source })
    }
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn invalid(path: &Path, reason: impl ToString) -> StorageError {
    StorageError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// A host name as a file name: only what host names are made of, and
/// never `.`-led (so `..` cannot leave the directory).
fn file_stem(name: &str) -> Result<&str, StorageError> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if plain {
        Ok(name)
    } else {
        Err(StorageError::BadName(name.to_string()))
    }
}

/// `https://acme-v02.api.letsencrypt.org/directory` →
/// `acme-v02.api.letsencrypt.org-directory` (what Caddy does too).
fn ca_dir_name(directory_url: &str) -> String {
    let rest = directory_url
        .split_once("://")
        .map_or(directory_url, |(_, rest)| rest);
    let mut name: String = rest
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() || name.starts_with('.') {
        name.insert_str(0, "ca");
    }
    name
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    crate::tls::info::unix_seconds(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_directories_are_named_after_the_url() {
        assert_eq!(
            ca_dir_name("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org-directory"
        );
        assert_eq!(
            ca_dir_name("https://127.0.0.1:14000/dir"),
            "127.0.0.1-14000-dir"
        );
        assert_eq!(ca_dir_name("https://../x"), "ca..-x");
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["..", ".x", "a/b", "", "a\0b"] {
            assert!(file_stem(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            file_stem("www.example.org").expect("plain"),
            "www.example.org"
        );
    }

    #[test]
    fn record_round_trip_and_corrupt_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::new(dir.path(), "https://ca.test/dir");
        assert_eq!(storage.load_record("a.test"), RenewalRecord::default());
        let record = RenewalRecord {
            failures: 2,
            retry_at: Some(10),
            last_error: Some("refused".into()),
            last_attempt: Some(5),
        };
        storage.save_record("a.test", &record).expect("save");
        assert_eq!(storage.load_record("a.test"), record);
        let path = storage.record_path("a.test").expect("path");
        std::fs::write(&path, b"{half").expect("corrupt");
        assert_eq!(storage.load_record("a.test"), RenewalRecord::default());
    }
}
