//! Automatic certificates (ACME, RFC 8555): issuance, storage and renewal
//! for every host of a `tls = "acme"` site, one certificate per name.
//!
//! Each name has a task that sleeps until its certificate is due (a third
//! of its lifetime left, with jitter; see [`schedule`]), then orders a new
//! one through [`client::Issuer`], answering HTTP-01 or TLS-ALPN-01
//! through [`AcmeCerts`], which the data plane reads. A new certificate is
//! stored under `state_dir` (0600, atomically; see [`storage`]) and then
//! installed for new handshakes; connections already open keep theirs. A
//! failure changes nothing that serves: the working certificate stays, the
//! name retries with backoff, and `cutover status` shows why.
//!
//! A start with a stored, valid certificate that is not yet due contacts
//! no CA at all: the account is only loaded when an order is needed.
//! Orders run one at a time, which is gentle on the CA's rate limits.
//!
//! May import: `tls`, `io`, `config`, `errors`. The app starts the
//! [`Manager`]; the controller reconfigures it on reload and asks it for
//! status and forced renewals.

mod client;
mod keys;
mod schedule;
mod storage;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AcmeSettings, ChallengeKind, Config};
use crate::tls::acme::AcmeCerts;
use crate::tls::certified_key;
use crate::tls::info::{unix_seconds, CertInfo};
use client::{AcmeError, IssuedPem, Issuer};
use storage::{unix_now, RenewalRecord, Storage, StoredCertificate};

/// Longest one order may take, from account to chain.
const ORDER_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Longest single sleep of a name's task: clocks jump (suspend, NTP), so
/// the due time is checked again at least this often.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// One certificate as `cutover status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertStatus {
    /// The name (automatic), or the names the certificate covers (file).
    pub name: String,
    /// `"acme"` (issued by cutover) or `"file"` (a `[[tls]]` certificate).
    pub source: String,
    /// `valid`, `issuing`, `pending` (no certificate yet) or `expired`.
    pub state: String,
    pub issuer: Option<String>,
    /// Unix seconds.
    pub not_after: Option<u64>,
    /// Unix seconds of the next issuance attempt (automatic names only).
    pub next_renewal: Option<u64>,
    /// Failed attempts in a row.
    pub failures: u32,
    pub last_error: Option<String>,
    /// Unix seconds when the last order ended (automatic names only).
    pub last_attempt: Option<u64>,
}

impl CertStatus {
    /// A `[[tls]]` certificate: renewed by whoever writes its files.
    pub fn of_file(info: &CertInfo) -> CertStatus {
        let expired = !info.is_valid_at(SystemTime::now());
        CertStatus {
            name: info.names.join(", "),
            source: "file".into(),
            state: if expired { "expired" } else { "valid" }.into(),
            issuer: Some(info.issuer.clone()),
            not_after: Some(unix_seconds(info.not_after)),
            next_renewal: None,
            failures: 0,
            last_error: None,
            last_attempt: None,
        }
    }
}

/// What can make a configuration unusable for automatic certificates.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("tls = \"acme\" needs [server] state_dir")]
    MissingStateDir,
    #[error(
        "tls = \"acme\" needs an HTTPS listener ([server] https): certificates are served there"
    )]
    MissingHttpsListener,
    #[error("[acme] challenges = [\"http-01\"] needs a plain-HTTP listener ([server] http); add \"tls-alpn-01\" or an http listener")]
    UnanswerableChallenges,
}

/// The settings in force and what follows from them.
struct Setup {
    settings: AcmeSettings,
    storage: Storage,
    /// The configured challenges this server's listeners can answer.
    challenges: Vec<ChallengeKind>,
}

/// One name's task handle and state.
struct NameHandle {
    state: Arc<Mutex<NameState>>,
    renew: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct NameState {
    cert: Option<CertInfo>,
    record: RenewalRecord,
    next_attempt: Option<SystemTime>,
    issuing: bool,
    /// Fixed per name, so status shows a stable next renewal.
    jitter: f64,
}

impl NameState {
    fn new() -> NameState {
        NameState {
            cert: None,
            record: RenewalRecord::default(),
            next_attempt: None,
            issuing: false,
            jitter: schedule::jitter(),
        }
    }

    /// Sets the certificate and the record, and the next attempt that
    /// follows from them, in one go: status never sees one without the
    /// other.
    fn update(&mut self, cert: Option<CertInfo>, record: RenewalRecord, ratio: f64) {
        self.next_attempt = Some(schedule::next_attempt(
            cert.as_ref(),
            &record,
            ratio,
            self.jitter,
        ));
        self.cert = cert;
        self.record = record;
    }
}

/// Issues and renews the certificates of every automatic name.
pub struct Manager {
    setup: ArcSwap<Setup>,
    certs: Arc<AcmeCerts>,
    /// Whether a plain-HTTP listener exists (HTTP-01 can be answered).
    has_http: bool,
    /// The account, connected at the first order and kept while the
    /// settings it was made with stay the same.
    issuer: tokio::sync::Mutex<Option<(AcmeSettings, Arc<Issuer>)>>,
    /// Orders run one at a time.
    one_order_at_a_time: Semaphore,
    names: Mutex<BTreeMap<String, NameHandle>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Manager {
    /// A manager for the automatic names of `config`. `has_http` and
    /// `has_https` say which listeners exist (challenges are answered on
    /// them); `certs` is what the data plane reads. Nothing runs until
    /// [`start`](Self::start).
    pub fn new(
        config: &Config,
        certs: Arc<AcmeCerts>,
        has_http: bool,
        has_https: bool,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Arc<Manager>, SetupError> {
        check_listeners(config, has_http, has_https)?;
        let setup = setup(config, has_http)?;
        let manager = Arc::new(Manager {
            setup: ArcSwap::from_pointee(setup),
            certs,
            has_http,
            issuer: tokio::sync::Mutex::new(None),
            one_order_at_a_time: Semaphore::new(1),
            names: Mutex::new(BTreeMap::new()),
            shutdown,
            tasks,
        });
        Ok(manager)
    }

    /// Starts a task per automatic name of `config`; call it once the
    /// listeners accept, since the CA validates by connecting to them.
    pub fn start(self: &Arc<Self>, config: &Config) {
        self.follow_names(&config.acme_names(), false);
    }

    /// Applies a reloaded config: new names start, removed names stop
    /// (their handshakes fall back to `[[tls]]`), and changed `[acme]`
    /// settings restart every name with the new CA or account. Certificates
    /// already installed keep serving until replaced.
    pub fn reconfigure(self: &Arc<Self>, config: &Config) -> Result<(), SetupError> {
        let names = config.acme_names();
        if names.is_empty() {
            self.follow_names(&[], false);
            return Ok(());
        }
        let setup = setup(config, self.has_http)?;
        let changed = self.setup.load().settings != setup.settings;
        if changed {
            self.setup.store(Arc::new(setup));
        }
        self.follow_names(&names, changed);
        Ok(())
    }

    /// Each automatic name's certificate, by name.
    pub fn status(&self) -> Vec<CertStatus> {
        let Ok(names) = self.names.lock() else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|(name, handle)| {
                let state = handle.state.lock().ok()?;
                Some(name_status(name, &state))
            })
            .collect()
    }

    /// Orders a new certificate for `name` now, whatever its schedule, and
    /// waits for the outcome. The working certificate serves until the new
    /// one is in place, and stays if the order fails.
    /// `started` is called once the name is known to be automatic.
    pub async fn renew(&self, name: &str, started: impl FnOnce()) -> Result<CertStatus, String> {
        let (renew, state) = {
            let names = self.names.lock().map_err(|_| "poisoned".to_string())?;
            let handle = names.get(name).ok_or_else(|| {
                let known: Vec<&str> = names.keys().map(String::as_str).collect();
                format!(
                    "{name:?} has no automatic certificate (automatic names: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            })?;
            (handle.renew.clone(), Arc::clone(&handle.state))
        };
        started();
        let (reply, outcome) = oneshot::channel();
        renew
            .send(reply)
            .await
            .map_err(|_| format!("{name}: renewal stopped (shutting down)"))?;
        outcome
            .await
            .map_err(|_| format!("{name}: renewal stopped (shutting down)"))??;
        let state = state.lock().map_err(|_| "poisoned".to_string())?;
        Ok(name_status(name, &state))
    }

    /// Starts tasks for names not yet followed, stops those no longer
    /// wanted (all of them when `restart_all`).
    fn follow_names(self: &Arc<Self>, wanted: &[String], restart_all: bool) {
        self.certs.manage(wanted);
        let Ok(mut names) = self.names.lock() else {
            return;
        };
        names.retain(|name, handle| {
            let keep = !restart_all && wanted.contains(name);
            if !keep {
                handle.stop.cancel();
            }
            keep
        });
        for name in wanted {
            if names.contains_key(name) {
                continue;
            }
            let (renew, requests) = mpsc::channel(1);
            let handle = NameHandle {
                state: Arc::new(Mutex::new(NameState::new())),
                renew,
                stop: self.shutdown.child_token(),
            };
            self.tasks.spawn(Arc::clone(self).follow(
                name.clone(),
                Arc::clone(&handle.state),
                requests,
                handle.stop.clone(),
            ));
            names.insert(name.clone(), handle);
        }
    }

    /// One name's life: restore from disk, then sleep until due (or until
    /// asked), order, repeat.
    async fn follow(
        self: Arc<Self>,
        name: String,
        state: Arc<Mutex<NameState>>,
        mut requests: mpsc::Receiver<oneshot::Sender<Result<(), String>>>,
        stop: CancellationToken,
    ) {
        self.restore(&name, &state).await;
        loop {
            let due = state
                .lock()
                .ok()
                .and_then(|state| state.next_attempt)
                .unwrap_or_else(|| SystemTime::now() + MAX_SLEEP);
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(MAX_SLEEP);
            let reply = tokio::select! {
                _ = stop.cancelled() => return,
                request = requests.recv() => match request {
                    Some(reply) => Some(reply),
                    None => return,
                },
                _ = tokio::time::sleep(wait) => {
                    if SystemTime::now() < due {
                        continue;
                    }
                    None
                }
            };
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.attempt(&name, &state) => outcome,
            };
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
    }

    /// Installs the stored certificate of `name`, if valid, and reads its
    /// renewal record; touches no network.
    async fn restore(&self, name: &str, state: &Mutex<NameState>) {
        let storage = self.setup.load().storage.clone();
        let owned = name.to_string();
        let loaded = tokio::task::spawn_blocking(move || {
            (
                storage.load_certificate(&owned),
                storage.load_record(&owned),
            )
        })
        .await;
        let Ok((stored, record)) = loaded else {
            return;
        };
        let cert = match stored {
            Ok(Some(stored)) => match self.use_stored(name, stored) {
                Ok(info) => Some(info),
                Err(reason) => {
                    tracing::warn!(tls.name = name, error = %reason, "stored certificate unusable; ordering a new one");
                    None
                }
            },
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(tls.name = name, error = %err, "cannot read the stored certificate; ordering a new one");
                None
            }
        };
        let ratio = self.setup.load().settings.renewal_window_ratio;
        if let Ok(mut state) = state.lock() {
            state.update(cert, record, ratio);
        }
    }

    /// Serves a stored certificate unless it has expired.
    fn use_stored(&self, name: &str, stored: StoredCertificate) -> Result<CertInfo, String> {
        let (key, info) = ready_to_serve(name, stored.chain, stored.key)?;
        if info.is_valid_at(SystemTime::now()) {
            self.certs.install(name, key);
            tracing::info!(tls.name = name, issuer = %info.issuer, not_after = unix_seconds(info.not_after), "using the stored certificate");
        }
        Ok(info)
    }

    /// One order for `name`, its outcome recorded and logged.
    async fn attempt(&self, name: &str, state: &Mutex<NameState>) -> Result<(), String> {
        let _turn = self
            .one_order_at_a_time
            .acquire()
            .await
            .map_err(|_| "shutting down".to_string())?;
        let setup = self.setup.load_full();
        let (mut record, mut cert) = state
            .lock()
            .map(|s| (s.record.clone(), s.cert.clone()))
            .unwrap_or_default();
        let kind = setup.challenges[record.failures as usize % setup.challenges.len()];
        if let Ok(mut state) = state.lock() {
            state.issuing = true;
        }
        tracing::info!(tls.name = name, challenge = kind.name(), directory = %setup.settings.directory, "ordering a certificate");
        let ordered = tokio::time::timeout(ORDER_TIMEOUT, self.order(&setup, name, kind))
            .await
            .unwrap_or(Err(AcmeError::Timeout(ORDER_TIMEOUT)));
        let outcome = match ordered {
            Ok((info, stored)) => {
                tracing::info!(tls.name = name, issuer = %info.issuer, not_after = unix_seconds(info.not_after), "certificate issued and installed");
                record = RenewalRecord {
                    last_error: stored.err(),
                    last_attempt: Some(unix_now()),
                    ..RenewalRecord::default()
                };
                cert = Some(info);
                Ok(())
            }
            Err(err) => {
                let retry_after = self.drop_issuer().await;
                record.failures += 1;
                let delay = schedule::retry_delay(record.failures, schedule::jitter(), retry_after);
                let now = unix_now();
                record.retry_at = Some(now + delay.as_secs());
                record.last_error = Some(err.to_string());
                record.last_attempt = Some(now);
                tracing::warn!(tls.name = name, challenge = kind.name(), failures = record.failures, retry_in_s = delay.as_secs(), error = %err, "certificate order failed; the current certificate (if any) keeps serving");
                Err(err.to_string())
            }
        };
        if let Ok(mut state) = state.lock() {
            state.issuing = false;
            state.update(cert, record.clone(), setup.settings.renewal_window_ratio);
        }
        let storage = setup.storage.clone();
        let owned = name.to_string();
        let saved = tokio::task::spawn_blocking(move || storage.save_record(&owned, &record)).await;
        if let Ok(Err(err)) = saved {
            tracing::warn!(tls.name = name, error = %err, "cannot store the renewal record");
        }
        outcome
    }

    /// Orders, stores and installs a certificate. The second value is an
    /// error storing it: the certificate serves anyway (ordering it again
    /// would only spend the CA's rate limit), and the next start orders anew.
    async fn order(
        &self,
        setup: &Setup,
        name: &str,
        kind: ChallengeKind,
    ) -> Result<(CertInfo, Result<(), String>), AcmeError> {
        let issuer = self.issuer(setup).await?;
        let IssuedPem { key_pem, chain_pem } = issuer.issue(name, kind, &self.certs).await?;
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| AcmeError::Unusable(err.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| AcmeError::Unusable(err.to_string()))?;
        let (certified, info) = ready_to_serve(name, chain, key).map_err(AcmeError::Unusable)?;
        let storage = setup.storage.clone();
        let owned = name.to_string();
        let stored = tokio::task::spawn_blocking(move || {
            storage.save_certificate(&owned, &key_pem, &chain_pem)
        })
        .await
        .map_err(|err| err.to_string())
        .and_then(|saved| saved.map_err(|err| err.to_string()))
        .map_err(|err| format!("certificate issued but not stored: {err}"));
        if let Err(err) = &stored {
            tracing::error!(tls.name = name, error = %err, "serving the new certificate, but it is not on disk");
        }
        self.certs.install(name, certified);
        Ok((info, stored))
    }

    /// The account, connected (restored or registered) on first use.
    async fn issuer(&self, setup: &Setup) -> Result<Arc<Issuer>, AcmeError> {
        let mut issuer = self.issuer.lock().await;
        if let Some((settings, issuer)) = issuer.as_ref() {
            if *settings == setup.settings {
                return Ok(Arc::clone(issuer));
            }
        }
        let connected = Arc::new(Issuer::connect(&setup.settings, &setup.storage).await?);
        *issuer = Some((setup.settings.clone(), Arc::clone(&connected)));
        Ok(connected)
    }

    /// Forgets the account after a failure (the next order reconnects, so
    /// a CA that lost or changed state is met afresh) and returns the
    /// `Retry-After` the CA last sent.
    async fn drop_issuer(&self) -> Option<Duration> {
        self.issuer
            .lock()
            .await
            .take()
            .and_then(|(_, issuer)| issuer.take_retry_after())
    }
}

/// Whether listeners like these can serve `config`'s automatic names:
/// certificates are served on HTTPS, and some configured challenge must be
/// answerable (HTTP-01 needs the plain listener). `cutover check` asks the
/// same of the configured addresses.
pub fn check_listeners(config: &Config, has_http: bool, has_https: bool) -> Result<(), SetupError> {
    if !has_https {
        return Err(SetupError::MissingHttpsListener);
    }
    setup(config, has_http).map(|_| ())
}

/// The settings of `config` and the challenges its listeners can answer.
fn setup(config: &Config, has_http: bool) -> Result<Setup, SetupError> {
    let settings = config.acme.clone().unwrap_or_default();
    let state_dir: PathBuf = config
        .server
        .state_dir
        .clone()
        .ok_or(SetupError::MissingStateDir)?;
    let challenges: Vec<ChallengeKind> = settings
        .challenges
        .iter()
        .copied()
        .filter(|kind| has_http || *kind != ChallengeKind::Http01)
        .collect();
    if challenges.is_empty() {
        return Err(SetupError::UnanswerableChallenges);
    }
    Ok(Setup {
        storage: Storage::new(&state_dir, &settings.directory),
        settings,
        challenges,
    })
}

/// A chain and key made ready to serve, and what the leaf says; the leaf
/// must cover `name`.
fn ready_to_serve(
    name: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(Arc<rustls::sign::CertifiedKey>, CertInfo), String> {
    let leaf = chain.first().ok_or("empty certificate chain")?;
    let info = CertInfo::parse(leaf)?;
    if !info.names.iter().any(|covered| covered == name) {
        return Err(format!(
            "the certificate covers {:?}, not {name}",
            info.names
        ));
    }
    let certified = certified_key(chain, key)?;
    Ok((Arc::new(certified), info))
}

fn name_status(name: &str, state: &NameState) -> CertStatus {
    let now = SystemTime::now();
    let cert = state.cert.as_ref();
    let status = if state.issuing {
        "issuing"
    } else {
        match cert {
            None => "pending",
            Some(cert) if cert.is_valid_at(now) => "valid",
            Some(_) => "expired",
        }
    };
    CertStatus {
        name: name.to_string(),
        source: "acme".into(),
        state: status.into(),
        issuer: cert.map(|cert| cert.issuer.clone()),
        not_after: cert.map(|cert| unix_seconds(cert.not_after)),
        next_renewal: state.next_attempt.map(unix_seconds),
        failures: state.record.failures,
        last_error: state.record.last_error.clone(),
        last_attempt: state.record.last_attempt,
    }
}
