//! `cutover check`: validate a config and its certificates without serving,
//! print every problem, and exit non-zero if there is any.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::tls::CertStore;

/// Every problem with the config at `path`, as printable lines. Empty means
/// the config would start.
pub fn problems(path: &Path) -> Vec<String> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => return err.problems.iter().map(ToString::to_string).collect(),
    };
    let mut problems = Vec::new();
    match CertStore::load(&config.tls) {
        Err(errors) => problems.extend(errors.iter().map(ToString::to_string)),
        Ok(store) => {
            if config.server.https.is_some() && store.is_empty() {
                problems.push(format!(
                    "{}: [server] https is set but there is no [[tls]] certificate",
                    path.display()
                ));
            }
        }
    }
    problems
}

/// Runs the check and prints a verdict.
pub fn run(path: &Path) -> ExitCode {
    let problems = problems(path);
    if problems.is_empty() {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        for problem in &problems {
            eprintln!("{problem}");
        }
        eprintln!("{}: {} problem(s)", path.display(), problems.len());
        ExitCode::from(2)
    }
}
