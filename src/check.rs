//! `cutover check`: validate a config, the files it names and its
//! certificates without serving, print every problem, and exit non-zero if
//! there is any. Things that would start but probably not work as meant (a
//! TLS site no certificate covers) are printed as warnings and do not fail
//! the check.
//!
//! One run lists everything: the config pass keeps going past each problem
//! ([`Config::load_all`]), and the checks after it (files, certificates,
//! `admin_group`) run on the valid rest of the file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::acme;
use crate::admin::group;
use crate::config::{Config, NamedFile, Problem, TlsFiles};
use crate::tls::CertStore;

/// Exit status when the check found problems (0 means none).
pub const EXIT_PROBLEMS: u8 = 2;

/// What a check found: `problems` stop the server from starting, or make it
/// serve other than written (a `file` route whose file is missing answers
/// 404); `warnings` do not.
#[derive(Debug, Default)]
pub struct Findings {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// Every problem with the config at `path`, as printable lines. Empty means
/// the config would start.
pub fn problems(path: &Path) -> Vec<String> {
    findings(path).problems
}

/// Every problem and warning for the config at `path`.
pub fn findings(path: &Path) -> Findings {
    let parsed = Config::load_all(path);
    let mut found = Findings::default();
    let Some(config) = &parsed.config else {
        found.problems = parsed.problems.iter().map(ToString::to_string).collect();
        return found;
    };
    // Problems with a line, listed in file order whichever check found them.
    let mut located = parsed.problems.clone();
    let missing = missing_files(&parsed.files, &mut located);
    // `files` lists each [[tls]] certificate in config order.
    let cert_lines = parsed
        .files
        .iter()
        .filter(|named| named.role == "certificate");
    let usable: Vec<TlsFiles> = config
        .tls
        .iter()
        .zip(cert_lines)
        .filter(|(pair, _)| !missing.contains(&pair.cert) && !missing.contains(&pair.key))
        .filter(|(pair, at)| certificate_loads(pair, at, &mut located))
        .map(|(pair, _)| pair.clone())
        .collect();
    located.sort_by_key(|problem| (problem.line, problem.column));
    found.problems = located.iter().map(ToString::to_string).collect();
    if config.server.https.is_some() && config.tls.is_empty() && config.acme.is_none() {
        found.problems.push(format!(
            "{}: [server] https is set but there is no [[tls]] certificate",
            path.display()
        ));
    }
    if let Ok(store) = CertStore::load(&usable) {
        if !store.is_empty() || config.acme.is_some() {
            found.warnings.extend(uncovered_hosts(config, &store, path));
        }
    }
    if config.acme.is_some() {
        let (http, https) = (config.server.http.is_some(), config.server.https.is_some());
        if let Err(err) = acme::check_listeners(config, http, https) {
            found.problems.push(format!("{}: {err}", path.display()));
        }
    }
    if has_fleet_table(path) {
        if let Err(err) = crate::fleet::Fleet::from_file(path, &[]) {
            found.problems.push(err);
        }
    }
    if let Some(name) = &config.server.admin_group {
        if let Err(err) = group::resolve(name, Path::new(group::GROUP_FILE)) {
            found
                .problems
                .push(format!("{}: admin_group: {err}", path.display()));
        }
    }
    found
}

/// Whether the file has a `[fleet]` table (for `cutover rollout`).
fn has_fleet_table(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
        .is_some_and(|table| table.contains_key("fleet"))
}

/// Reports each named file that cannot be opened as a file, at the line
/// naming it, with its resolved path; returns their paths.
fn missing_files(files: &[NamedFile], problems: &mut Vec<Problem>) -> HashSet<PathBuf> {
    let mut missing = HashSet::new();
    for named in files {
        let opened = std::fs::File::open(&named.path).and_then(|file| file.metadata());
        let reason = match opened {
            Ok(meta) if meta.is_file() => continue,
            Ok(_) => "not a regular file".to_string(),
            Err(err) => err.to_string(),
        };
        problems.push(named.problem(format!("{} {}: {reason}", named.role, named.path.display())));
        missing.insert(named.path.clone());
    }
    missing
}

/// Whether a certificate and key that exist also load and match; if not,
/// the reason is reported at `at`, the line naming the certificate.
fn certificate_loads(pair: &TlsFiles, at: &NamedFile, problems: &mut Vec<Problem>) -> bool {
    let Err(errors) = CertStore::load(std::slice::from_ref(pair)) else {
        return true;
    };
    problems.extend(errors.iter().map(|err| at.problem(err.to_string())));
    false
}

/// Site hosts that no certificate covers: an HTTPS client for them would
/// get the default certificate and a name-mismatch error. A `*.suffix`
/// pattern is checked with one name under the suffix (a wildcard
/// certificate covers it); the catch-all `*` cannot be checked. Hosts of
/// `tls = "acme"` sites get their certificates automatically.
fn uncovered_hosts(config: &Config, store: &CertStore, path: &Path) -> Vec<String> {
    config
        .sites
        .iter()
        .filter(|site| !site.acme)
        .flat_map(|site| &site.hosts)
        .filter(|host| host.as_str() != "*")
        .filter(|host| {
            let probe = match host.strip_prefix("*.") {
                Some(suffix) => format!("cutover-check.{suffix}"),
                None => host.to_string(),
            };
            !store.covers(&probe)
        })
        .map(|host| {
            format!(
                "{}: site host {host:?} is not covered by any [[tls]] certificate; \
                 HTTPS clients will see a certificate name mismatch",
                path.display()
            )
        })
        .collect()
}

/// Runs the check and prints a verdict: exit 0 when the config would
/// start (warnings may be printed), [`EXIT_PROBLEMS`] when anything is
/// wrong, the file unreadable included.
pub fn run(path: &Path) -> ExitCode {
    let found = findings(path);
    for warning in &found.warnings {
        eprintln!("warning: {warning}");
    }
    if found.problems.is_empty() {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        for problem in &found.problems {
            eprintln!("{problem}");
        }
        eprintln!("{}: {} problem(s)", path.display(), found.problems.len());
        ExitCode::from(EXIT_PROBLEMS)
    }
}
