//! `cutover check`: validate a config and its certificates without serving,
//! print every problem, and exit non-zero if there is any. Things that
//! would start but probably not work as meant (a TLS site no certificate
//! covers) are printed as warnings and do not fail the check.

use std::path::Path;
use std::process::ExitCode;

use crate::acme;
use crate::admin::group;
use crate::config::Config;
use crate::tls::CertStore;

/// What a check found: `problems` stop the server from starting,
/// `warnings` do not.
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
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => {
            return Findings {
                problems: err.problems.iter().map(ToString::to_string).collect(),
                warnings: Vec::new(),
            }
        }
    };
    let mut found = Findings::default();
    match CertStore::load(&config.tls) {
        Err(errors) => found
            .problems
            .extend(errors.iter().map(ToString::to_string)),
        Ok(store) => {
            if config.server.https.is_some() && store.is_empty() && config.acme.is_none() {
                found.problems.push(format!(
                    "{}: [server] https is set but there is no [[tls]] certificate",
                    path.display()
                ));
            }
            if !store.is_empty() || config.acme.is_some() {
                found
                    .warnings
                    .extend(uncovered_hosts(&config, &store, path));
            }
        }
    }
    if config.acme.is_some() {
        let (http, https) = (config.server.http.is_some(), config.server.https.is_some());
        if let Err(err) = acme::check_listeners(&config, http, https) {
            found.problems.push(format!("{}: {err}", path.display()));
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

/// Runs the check and prints a verdict.
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
        ExitCode::from(2)
    }
}
