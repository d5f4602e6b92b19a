//! `cutover status --hosts …`: every host's active colour and image in
//! one table, so a mixed fleet shows at a glance.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::future::join_all;

use super::hosts::Fleet;
use super::ssh;
use super::table::Table;
use crate::admin::proto::{decode_report, exit, Command, Report, StatusReport};

/// How long one host's status may take beyond its ssh connect time-out.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// Prints the table; exit 0 when every host answered, else the first
/// failure's code (4 for a host ssh cannot reach or that refuses us).
pub async fn run(fleet: &Fleet, service: Option<&str>) -> u8 {
    let mut args = vec!["status"];
    args.extend(service);
    let command = Command::Status {
        service: service.map(str::to_string),
    };
    let answers = join_all(fleet.hosts.iter().map(|host| {
        ssh::call(
            host,
            &args,
            host.connect_timeout + STATUS_TIMEOUT,
            |_, _| {},
        )
    }))
    .await;
    let mut table = Table::new(["HOST", "SERVICE", "ACTIVE", "IMAGE", "PREVIOUS"]);
    let mut images: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut code = exit::SUCCESS;
    for (host, answer) in fleet.hosts.iter().zip(answers) {
        let report = answer
            .map_err(|err| (err.exit_code(), err.to_string()))
            .and_then(|result| match decode_report(&command, result) {
                Ok(Report::Status(status)) => Ok(status),
                other => Err((exit::FAILED, format!("unreadable status: {other:?}"))),
            });
        let status: StatusReport = match report {
            Ok(status) => status,
            Err((failure, message)) => {
                if code == exit::SUCCESS {
                    code = failure;
                }
                let cell = |text: &str| text.to_string();
                table.row([
                    host.name.clone(),
                    cell(service.unwrap_or("-")),
                    cell("?"),
                    format!("error: {message}"),
                    cell(""),
                ]);
                continue;
            }
        };
        for (name, state) in &status.services {
            let (color, image) =
                state
                    .active
                    .as_ref()
                    .map_or(("none".to_string(), "-".to_string()), |active| {
                        (
                            active.color.clone(),
                            active
                                .image
                                .clone()
                                .unwrap_or_else(|| active.upstream.clone()),
                        )
                    });
            images
                .entry(name.clone())
                .or_default()
                .insert(image.clone());
            let previous = state.previous.as_ref().map_or("-".to_string(), |previous| {
                format!(
                    "{} {} (warm {}s)",
                    previous.color,
                    previous.image.as_deref().unwrap_or(&previous.upstream),
                    previous.warm_for_s
                )
            });
            table.row([host.name.clone(), name.clone(), color, image, previous]);
        }
    }
    print!("{table}");
    for (name, seen) in images.iter().filter(|(_, seen)| seen.len() > 1) {
        let list: Vec<&str> = seen.iter().map(String::as_str).collect();
        println!(
            "MIXED: {name} serves {} images: {}",
            seen.len(),
            list.join(", ")
        );
    }
    code
}
