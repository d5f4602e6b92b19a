//! `cutover rollout`: one deploy per host, host after host (or in
//! batches), each checked through its public URL; on the first failure or
//! an interrupt, every host already switched is rolled back to its warm
//! previous colour, and a table says where each host ended.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::check::{self, Expect};
use super::hosts::{Fleet, Host};
use super::ssh::{self, RemoteError};
use super::table::Table;
use crate::admin::proto::{exit, Command, DeployReport, Report, StatusReport};

/// What to deploy, and how.
#[derive(Debug, Clone)]
pub struct Plan {
    pub service: String,
    pub target: Target,
    /// Hosts deployed at once (1: one after another).
    pub parallel: usize,
    /// The host deployed alone first, then watched for `bake`.
    pub canary: Option<String>,
    pub bake: Duration,
    /// Longest one host's deploy (or rollback) may take.
    pub deploy_timeout: Duration,
    /// Longest the public check of one host may retry.
    pub check_timeout: Duration,
}

/// `--tag` of the service's configured image, or a whole `--image`.
#[derive(Debug, Clone)]
pub enum Target {
    Tag(String),
    Image(String),
}

impl Target {
    fn args(&self) -> [&str; 2] {
        match self {
            Target::Tag(tag) => ["--tag", tag],
            Target::Image(image) => ["--image", image],
        }
    }

    /// The version a host serving it reports: the tag.
    fn version(&self) -> &str {
        match self {
            Target::Tag(tag) => tag,
            Target::Image(image) => match image.rsplit_once(':') {
                Some((_, tag)) if !tag.contains('/') => tag,
                _ => "latest",
            },
        }
    }
}

/// Where one host's deploy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Untouched,
    /// It did not answer the up-front status (so nothing was started).
    NotReached {
        reason: String,
    },
    Deployed {
        image: String,
    },
    /// `switched`: traffic moved to the new version before the failure
    /// (its public check failed), so it is rolled back too.
    Failed {
        reason: String,
        switched: bool,
    },
}

/// One host through the rollout.
struct HostRun {
    host: Host,
    /// Its active image before the rollout (from the up-front status).
    before: Option<String>,
    outcome: Outcome,
    /// Set when it was rolled back: `Ok` or why the rollback failed.
    rollback: Option<Result<(), String>>,
}

impl HostRun {
    fn switched(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Deployed { .. } | Outcome::Failed { switched: true, .. }
        )
    }
}

/// Runs the rollout and returns the exit code: 0 when every host serves
/// the new version; 1 when it stopped (a host failed, or it was
/// interrupted) and rolled back; a host that cannot be asked before
/// anything starts gives that failure's code (4 unreachable or refused by
/// ssh, 2 refused by cutover), and nothing is changed.
pub async fn run(fleet: Fleet, plan: Plan) -> u8 {
    let mut interrupt = match Interrupt::new() {
        Ok(interrupt) => interrupt,
        Err(err) => {
            eprintln!("cutover: cannot listen for SIGINT/SIGTERM: {err}");
            return exit::FAILED;
        }
    };
    let width = fleet.hosts.iter().map(|h| h.name.len()).max().unwrap_or(4);
    let expect = Expect {
        header: fleet.version_header.clone(),
        version: plan.target.version().to_string(),
    };
    let asked = tokio::select! {
        asked = preflight(&fleet.hosts, &plan.service) => asked,
        signal = interrupt.recv() => {
            eprintln!("cutover: {signal} before any host was changed; nothing to roll back");
            return exit::FAILED;
        }
    };
    let (mut runs, refusal) = host_runs(fleet.hosts, asked, width);
    if let Some(code) = refusal {
        println!("rollout not started: every host must answer first; nothing was changed");
        print_table(&runs);
        return code;
    }
    let stopped = deploy_all(&mut runs, &plan, &expect, &mut interrupt, width).await;
    let Some(reason) = stopped else {
        print_table(&runs);
        println!(
            "rollout done: {} host(s) serve {}",
            runs.len(),
            expect.version
        );
        return exit::SUCCESS;
    };
    println!("rollout stopped: {reason}; rolling back the hosts already switched");
    roll_back(&mut runs, &plan, width).await;
    print_table(&runs);
    exit::FAILED
}

/// Each host with its answer to the up-front status; the exit code of the
/// first that did not answer, if one did not.
fn host_runs(
    hosts: Vec<Host>,
    asked: Vec<Result<Option<String>, RemoteError>>,
    width: usize,
) -> (Vec<HostRun>, Option<u8>) {
    let mut refusal = None;
    let runs = hosts
        .into_iter()
        .zip(asked)
        .map(|(host, before)| {
            let (before, outcome) = match before {
                Ok(before) => (before, Outcome::Untouched),
                Err(err) => {
                    println!("{:<width$}  {:>9}  {err}", host.name, "refused");
                    refusal.get_or_insert(err.exit_code());
                    let reason = err.to_string();
                    (None, Outcome::NotReached { reason })
                }
            };
            HostRun {
                host,
                before,
                outcome,
                rollback: None,
            }
        })
        .collect();
    (runs, refusal)
}

/// Deploys batch after batch (the canary first, then its bake) until
/// every host is done or one fails or a signal comes; returns why it
/// stopped early.
async fn deploy_all(
    runs: &mut [HostRun],
    plan: &Plan,
    expect: &Expect,
    interrupt: &mut Interrupt,
    width: usize,
) -> Option<String> {
    let batches = batches(runs, plan.canary.as_deref(), plan.parallel.max(1));
    for (number, batch) in batches.iter().enumerate() {
        let deploys = join_all(
            batch
                .iter()
                .map(|&index| deploy_one(&runs[index], plan, expect, width)),
        );
        let (outcomes, signal) = finish_despite_signals(deploys, interrupt, width).await;
        let mut stopped = None;
        for (&index, outcome) in batch.iter().zip(outcomes) {
            if let Outcome::Failed { reason, .. } = &outcome {
                let first_line = reason.lines().next().unwrap_or_default();
                stopped.get_or_insert(format!("{} failed: {first_line}", runs[index].host.name));
            }
            runs[index].outcome = outcome;
        }
        if let Some(signal) = signal {
            stopped.get_or_insert(format!("interrupted by {signal}"));
        }
        if stopped.is_some() {
            return stopped;
        }
        let is_canary = number == 0 && plan.canary.is_some();
        if is_canary && batches.len() > 1 {
            if let Some(reason) = bake(&mut runs[batch[0]], plan, expect, interrupt, width).await {
                return Some(reason);
            }
        }
    }
    None
}

/// Asks every host for its status at once: each must answer (ssh lets us
/// in, its cutover knows the service) before anything changes. Returns
/// each host's active image.
async fn preflight(hosts: &[Host], service: &str) -> Vec<Result<Option<String>, RemoteError>> {
    join_all(hosts.iter().map(|host| active_image(host, service))).await
}

/// The service's active image on `host`.
async fn active_image(host: &Host, service: &str) -> Result<Option<String>, RemoteError> {
    let command = Command::Status {
        service: Some(service.to_string()),
    };
    let result = ssh::call(
        host,
        &["status", service],
        host.connect_timeout + Duration::from_secs(30),
        |_, _| {},
    )
    .await?;
    let status: StatusReport = match crate::admin::proto::decode_report(&command, result) {
        Ok(Report::Status(status)) => status,
        other => {
            return Err(RemoteError::NoReply {
                code: "0".into(),
                stderr: format!("unreadable status reply: {other:?}"),
            })
        }
    };
    Ok(status
        .services
        .get(service)
        .and_then(|service| service.active.as_ref())
        .and_then(|active| active.image.clone()))
}

/// The canary first, then the other hosts in groups of `parallel`, in
/// the fleet's order.
fn batches(runs: &[HostRun], canary: Option<&str>, parallel: usize) -> Vec<Vec<usize>> {
    let first = canary.and_then(|name| runs.iter().position(|run| run.host.name == name));
    let rest: Vec<usize> = (0..runs.len()).filter(|i| Some(*i) != first).collect();
    let mut batches: Vec<Vec<usize>> = first.map(|i| vec![i]).into_iter().collect();
    batches.extend(rest.chunks(parallel).map(<[usize]>::to_vec));
    batches
}

/// Awaits `work` to the end even when SIGINT/SIGTERM arrive: a deploy in
/// flight runs on in its server anyway, so the rollout waits for its
/// outcome to know whether to roll it back. Returns the first signal.
async fn finish_despite_signals<T>(
    work: impl std::future::Future<Output = T>,
    interrupt: &mut Interrupt,
    width: usize,
) -> (T, Option<&'static str>) {
    tokio::pin!(work);
    let mut first = None;
    loop {
        tokio::select! {
            done = &mut work => return (done, first),
            signal = interrupt.recv() => {
                println!(
                    "{:<width$}  {:>9}  {signal}: waiting for the deploys in flight to end, then rolling back",
                    "rollout", "interrupt"
                );
                first.get_or_insert(signal);
            }
        }
    }
}

/// Deploys to one host, streaming its progress, then checks its public
/// URL.
async fn deploy_one(run: &HostRun, plan: &Plan, expect: &Expect, width: usize) -> Outcome {
    let host = &run.host;
    let [flag, value] = plan.target.args();
    let args = ["deploy", plan.service.as_str(), flag, value];
    let progress = |step: &str, message: &str| line(host, width, step, message);
    let command = Command::Deploy {
        service: plan.service.clone(),
        image: None,
        tag: None,
        docker_config: None,
        canary: None,
    };
    let image = match ssh::call(host, &args, plan.deploy_timeout, progress).await {
        Ok(result) => match crate::admin::proto::decode_report(&command, result) {
            Ok(Report::Deploy(DeployReport { image, .. })) => image,
            other => format!("{} (unreadable report: {other:?})", expect.version),
        },
        Err(err) if err.outcome_unknown() => return unknown_outcome(run, plan, err, width).await,
        Err(err) => {
            line(host, width, "failed", &err.to_string());
            return Outcome::Failed {
                reason: err.to_string(),
                switched: false,
            };
        }
    };
    verify(host, &image, expect, plan, width).await
}

/// The public check after a host switched.
async fn verify(host: &Host, image: &str, expect: &Expect, plan: &Plan, width: usize) -> Outcome {
    let Some(url) = &host.url else {
        line(host, width, "check", "no url for this host: not checked");
        return Outcome::Deployed {
            image: image.to_string(),
        };
    };
    match check::serves(url, expect, plan.check_timeout).await {
        Ok(seen) => {
            line(host, width, "check", &format!("{url} {seen}"));
            Outcome::Deployed {
                image: image.to_string(),
            }
        }
        Err(err) => {
            line(host, width, "check", &format!("FAILED: {err}"));
            Outcome::Failed {
                reason: format!("switched to {image}, but the public check failed: {err}"),
                switched: true,
            }
        }
    }
}

/// The deploy's answer was lost (connection dropped, time-out): ask the
/// host whether it switched, so it is rolled back only if it did.
async fn unknown_outcome(run: &HostRun, plan: &Plan, err: RemoteError, width: usize) -> Outcome {
    let host = &run.host;
    line(host, width, "unknown", &format!("{err}; asking the host"));
    match active_image(host, &plan.service).await {
        Ok(now) if now != run.before => Outcome::Failed {
            reason: format!("{err}; it switched to {}", now.as_deref().unwrap_or("-")),
            switched: true,
        },
        Ok(_) => Outcome::Failed {
            reason: format!("{err}; it still serves its old image"),
            switched: false,
        },
        Err(again) => Outcome::Failed {
            reason: format!("{err}; and then: {again}; check it by hand"),
            switched: false,
        },
    }
}

/// Waits `plan.bake` after the canary, then checks it again. Returns why
/// the rollout stops, if it does.
async fn bake(
    canary: &mut HostRun,
    plan: &Plan,
    expect: &Expect,
    interrupt: &mut Interrupt,
    width: usize,
) -> Option<String> {
    let host = canary.host.clone();
    line(
        &host,
        width,
        "bake",
        &format!("canary serves; watching it for {:?}", plan.bake),
    );
    tokio::select! {
        _ = tokio::time::sleep(plan.bake) => {}
        signal = interrupt.recv() => return Some(format!("interrupted by {signal} during the bake")),
    }
    let Outcome::Deployed { image } = &canary.outcome else {
        return None;
    };
    let image = image.clone();
    let outcome = verify(&host, &image, expect, plan, width).await;
    let failed = match &outcome {
        Outcome::Failed { reason, .. } => Some(format!(
            "canary {} failed after the bake: {reason}",
            host.name
        )),
        _ => None,
    };
    canary.outcome = outcome;
    failed
}

/// Rolls back every switched host, all at once (each is an instant swap
/// to its warm previous colour).
async fn roll_back(runs: &mut [HostRun], plan: &Plan, width: usize) {
    let service = plan.service.as_str();
    let switched: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].switched()).collect();
    let args = ["rollback", service];
    let results = join_all(switched.iter().map(|&index| {
        let host = &runs[index].host;
        let progress = move |step: &str, message: &str| line(host, width, step, message);
        ssh::call(host, &args, plan.deploy_timeout, progress)
    }))
    .await;
    for (index, result) in switched.into_iter().zip(results) {
        let host = &runs[index].host;
        let result = result.map(|_| ()).map_err(|err| err.to_string());
        match &result {
            Ok(()) => line(host, width, "rollback", "rolled back"),
            Err(err) => {
                tracing::error!(host = %host.name, error = %err, "rollback failed");
                line(host, width, "rollback", &format!("FAILED: {err}"));
            }
        }
        runs[index].rollback = Some(result);
    }
}

/// One progress line, with the host's name in front.
fn line(host: &Host, width: usize, step: &str, message: &str) {
    println!("{:<width$}  {step:>9}  {message}", host.name);
}

fn print_table(runs: &[HostRun]) {
    let mut table = Table::new(["HOST", "RESULT", "BEFORE", "DETAIL"]);
    for run in runs {
        let (result, detail) = match (&run.outcome, &run.rollback) {
            (_, Some(Err(err))) => ("ROLLBACK FAILED", err.clone()),
            (Outcome::Untouched, _) => ("untouched", String::new()),
            (Outcome::NotReached { reason }, _) => ("not reached", reason.clone()),
            (Outcome::Deployed { image }, None) => ("deployed", format!("serves {image}")),
            (Outcome::Deployed { image }, Some(Ok(()))) => {
                ("rolled back", format!("had switched to {image}"))
            }
            (Outcome::Failed { reason, .. }, None) => ("failed", reason.clone()),
            (Outcome::Failed { reason, .. }, Some(Ok(()))) => {
                ("failed, rolled back", reason.clone())
            }
        };
        // The first line: a failed deploy's message carries the new
        // container's last log lines, already printed with its progress.
        let detail = detail.lines().next().unwrap_or_default().to_string();
        table.row([
            run.host.name.clone(),
            result.to_string(),
            run.before.clone().unwrap_or_else(|| "-".into()),
            detail,
        ]);
    }
    print!("{table}");
}

/// SIGINT and SIGTERM (Ctrl-C, a CI job cancelled).
struct Interrupt {
    int: Signal,
    term: Signal,
}

impl Interrupt {
    fn new() -> std::io::Result<Interrupt> {
        Ok(Interrupt {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(names: &[&str]) -> Vec<HostRun> {
        names
            .iter()
            .map(|name| HostRun {
                host: Host {
                    name: name.to_string(),
                    ssh: name.to_string(),
                    port: None,
                    identity: None,
                    ssh_options: Vec::new(),
                    command: "cutover".into(),
                    socket: None,
                    config: None,
                    url: None,
                    connect_timeout: Duration::from_secs(1),
                },
                before: None,
                outcome: Outcome::Untouched,
                rollback: None,
            })
            .collect()
    }

    #[test]
    fn canary_goes_alone_then_batches_in_order() {
        let hosts = runs(&["a", "b", "c", "d"]);
        assert_eq!(batches(&hosts, None, 1), [[0], [1], [2], [3]]);
        assert_eq!(
            batches(&hosts, Some("c"), 2),
            [vec![2], vec![0, 1], vec![3]]
        );
        assert_eq!(batches(&hosts, None, 9), [vec![0, 1, 2, 3]]);
    }

    #[test]
    fn the_version_is_the_tag() {
        assert_eq!(Target::Tag("v2".into()).version(), "v2");
        assert_eq!(Target::Image("reg:5000/web:v3".into()).version(), "v3");
        assert_eq!(Target::Image("reg:5000/web".into()).version(), "latest");
    }
}
