//! The hosts of a fleet: where each one is reached over SSH, which
//! `cutover` command runs there and on which admin socket, and the public
//! URL that shows what it serves. Read from a `[fleet]` table (its own
//! file, or proxy.toml) or from `--hosts a,b,c` plus flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::parse_duration;

/// How long ssh may take to connect before a host counts as unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One host of the fleet, everything needed to reach and check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// What the output calls it.
    pub name: String,
    /// The ssh destination: `host`, `user@host`, or a `Host` alias of
    /// `~/.ssh/config`.
    pub ssh: String,
    pub port: Option<u16>,
    /// The private key to log in with (`ssh -i`, only that key).
    pub identity: Option<PathBuf>,
    /// More `ssh -o` options, e.g. `ProxyJump=bastion`.
    pub ssh_options: Vec<String>,
    /// The remote command that runs cutover, as a shell fragment
    /// (`cutover`, `/usr/local/bin/cutover`, `sudo -u deploy cutover`).
    pub command: String,
    /// The remote admin socket (`--socket`), or else
    pub socket: Option<String>,
    /// the remote proxy.toml to read it from (`--config`).
    pub config: Option<String>,
    /// The host's own public listener, checked after its deploy.
    pub url: Option<String>,
    pub connect_timeout: Duration,
}

impl Host {
    /// The `--socket`/`--config` arguments of every remote command.
    pub fn admin_args(&self) -> Vec<String> {
        match (&self.socket, &self.config) {
            (Some(socket), _) => vec!["--socket".into(), socket.clone()],
            (None, Some(config)) => vec!["--config".into(), config.clone()],
            (None, None) => Vec::new(),
        }
    }
}

/// Settings every host gets unless its own entry says otherwise: the
/// `[fleet]` table's keys, or the command-line flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
    #[serde(default)]
    pub ssh_options: Vec<String>,
    pub command: Option<String>,
    pub socket: Option<String>,
    pub config: Option<String>,
    pub connect_timeout: Option<String>,
    /// A response header whose value must be the deployed tag.
    pub version_header: Option<String>,
}

/// One `[[fleet.host]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    ssh: Option<String>,
    port: Option<u16>,
    identity: Option<PathBuf>,
    ssh_options: Option<Vec<String>>,
    command: Option<String>,
    socket: Option<String>,
    config: Option<String>,
    url: Option<String>,
}

/// The `[fleet]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    port: Option<u16>,
    identity: Option<PathBuf>,
    #[serde(default)]
    ssh_options: Vec<String>,
    command: Option<String>,
    socket: Option<String>,
    config: Option<String>,
    connect_timeout: Option<String>,
    version_header: Option<String>,
    #[serde(default)]
    host: Vec<RawHost>,
}

/// A fleet: its hosts in rollout order, and how to tell a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    pub hosts: Vec<Host>,
    pub version_header: Option<String>,
}

impl Fleet {
    /// The `[fleet]` table of `path` (relative identity paths resolve
    /// against the file's directory). `only`: the names to keep, in
    /// that order (`--hosts` given with a file).
    pub fn from_file(path: &Path, only: &[String]) -> Result<Fleet, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))?;
        let fleet = table
            .get("fleet")
            .ok_or_else(|| format!("{}: no [fleet] table", path.display()))?;
        let raw: RawFleet = fleet
            .clone()
            .try_into()
            .map_err(|err| format!("{}: [fleet]: {err}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let defaults = Defaults {
            port: raw.port,
            identity: raw.identity.map(|file| resolve(base, file)),
            ssh_options: raw.ssh_options,
            command: raw.command,
            socket: raw.socket,
            config: raw.config,
            connect_timeout: raw.connect_timeout,
            version_header: raw.version_header,
        };
        let timeout = connect_timeout(&defaults)?;
        let mut hosts = Vec::new();
        for entry in raw.host {
            if hosts.iter().any(|host: &Host| host.name == entry.name) {
                return Err(format!(
                    "{}: host {:?} is listed twice",
                    path.display(),
                    entry.name
                ));
            }
            let ssh = entry.ssh.unwrap_or_else(|| entry.name.clone());
            let host = Host {
                url: entry.url.or_else(|| Some(default_url(&ssh))),
                ssh,
                name: entry.name,
                port: entry.port.or(defaults.port),
                identity: entry
                    .identity
                    .map(|file| resolve(base, file))
                    .or_else(|| defaults.identity.clone()),
                ssh_options: entry
                    .ssh_options
                    .unwrap_or_else(|| defaults.ssh_options.clone()),
                command: entry
                    .command
                    .or_else(|| defaults.command.clone())
                    .unwrap_or_else(|| "cutover".into()),
                socket: entry.socket.or_else(|| defaults.socket.clone()),
                config: entry.config.or_else(|| defaults.config.clone()),
                connect_timeout: timeout,
            };
            hosts.push(validate(host)?);
        }
        let hosts = select(hosts, only, path)?;
        Ok(Fleet {
            hosts,
            version_header: defaults.version_header,
        })
    }

    /// Hosts named on the command line (`--hosts a,b,c`): each is an ssh
    /// destination, checked at `http://<its host name>/` unless `url` is
    /// set per host in a file.
    pub fn from_list(names: &[String], defaults: &Defaults) -> Result<Fleet, String> {
        let timeout = connect_timeout(defaults)?;
        let mut hosts = Vec::new();
        for name in names {
            let host = Host {
                name: name.clone(),
                ssh: name.clone(),
                port: defaults.port,
                identity: defaults.identity.clone(),
                ssh_options: defaults.ssh_options.clone(),
                command: defaults.command.clone().unwrap_or_else(|| "cutover".into()),
                socket: defaults.socket.clone(),
                config: defaults.config.clone(),
                url: Some(default_url(name)),
                connect_timeout: timeout,
            };
            if hosts.iter().any(|known: &Host| known.name == host.name) {
                return Err(format!("host {name:?} is listed twice"));
            }
            hosts.push(validate(host)?);
        }
        Ok(Fleet {
            hosts,
            version_header: defaults.version_header.clone(),
        })
    }
}

/// A key path from the file: relative to its directory, except `~/…`,
/// which ssh expands itself.
fn resolve(base: &Path, file: PathBuf) -> PathBuf {
    if file.starts_with("~") {
        file
    } else {
        base.join(file)
    }
}

/// `http://<host>/` for the ssh destination `[user@]host`.
fn default_url(destination: &str) -> String {
    let machine = destination.rsplit('@').next().unwrap_or(destination);
    format!("http://{machine}/")
}

fn connect_timeout(defaults: &Defaults) -> Result<Duration, String> {
    match &defaults.connect_timeout {
        None => Ok(DEFAULT_CONNECT_TIMEOUT),
        Some(text) => {
            let timeout = parse_duration(text).map_err(|err| format!("connect_timeout: {err}"))?;
            if timeout < Duration::from_secs(1) {
                return Err(format!("connect_timeout {text:?}: at least 1s"));
            }
            Ok(timeout)
        }
    }
}

/// Refuses what would reach ssh as something else than intended: a
/// destination or option that ssh would read as a flag, empty names.
fn validate(host: Host) -> Result<Host, String> {
    let name = &host.name;
    if name.is_empty() || host.ssh.is_empty() {
        return Err("a host has an empty name or ssh destination".into());
    }
    if host.ssh.starts_with('-') || host.ssh.chars().any(char::is_whitespace) {
        return Err(format!(
            "host {name:?}: ssh destination {:?} is not a host name",
            host.ssh
        ));
    }
    if let Some(option) = host.ssh_options.iter().find(|o| !o.contains('=')) {
        return Err(format!(
            "host {name:?}: ssh option {option:?} is not KEY=VALUE"
        ));
    }
    if host.command.trim().is_empty() {
        return Err(format!("host {name:?}: the remote command is empty"));
    }
    if let Some(url) = &host.url {
        let uri: http::Uri = url
            .parse()
            .map_err(|err| format!("host {name:?}: url {url:?}: {err}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "host {name:?}: url {url:?} must be http://HOST[:PORT]/PATH or https://…"
            ));
        }
    }
    Ok(host)
}

/// Keeps the hosts named in `only`, in that order (all when empty).
fn select(hosts: Vec<Host>, only: &[String], path: &Path) -> Result<Vec<Host>, String> {
    if only.is_empty() {
        if hosts.is_empty() {
            return Err(format!(
                "{}: [fleet] lists no [[fleet.host]]",
                path.display()
            ));
        }
        return Ok(hosts);
    }
    only.iter()
        .map(|name| {
            hosts
                .iter()
                .find(|host| &host.name == name)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                    format!(
                        "host {name:?} is not in {} (it lists {})",
                        path.display(),
                        known.join(", ")
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    const FILE: &str = r#"
[server]
http = "127.0.0.1:80"

[fleet]
command = "/usr/local/bin/cutover"
socket = "/run/cutover/admin.sock"
identity = "keys/deploy"
version_header = "x-app-version"

[[fleet.host]]
name = "b"
ssh = "deploy@b.example"
url = "https://b.example/"

[[fleet.host]]
name = "a"
port = 2222
identity = "~/.ssh/a"
socket = "/srv/a.sock"
"#;

    #[test]
    fn hosts_keep_file_order_and_take_defaults() {
        let (dir, path) = write(FILE);
        let fleet = Fleet::from_file(&path, &[]).expect("valid");
        let names: Vec<&str> = fleet.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        let (b, a) = (&fleet.hosts[0], &fleet.hosts[1]);
        assert_eq!(b.ssh, "deploy@b.example");
        assert_eq!(a.ssh, "a", "the name is the destination by default");
        assert_eq!(a.url.as_deref(), Some("http://a/"));
        assert_eq!(b.url.as_deref(), Some("https://b.example/"));
        assert_eq!(a.port, Some(2222));
        assert_eq!(a.identity, Some(PathBuf::from("~/.ssh/a")), "ssh expands ~");
        assert_eq!(a.socket.as_deref(), Some("/srv/a.sock"));
        assert_eq!(b.socket.as_deref(), Some("/run/cutover/admin.sock"));
        assert_eq!(b.identity, Some(dir.path().join("keys/deploy")));
        assert_eq!(b.command, "/usr/local/bin/cutover");
        assert_eq!(fleet.version_header.as_deref(), Some("x-app-version"));
    }

    #[test]
    fn hosts_flag_selects_and_orders() {
        let (_dir, path) = write(FILE);
        let fleet = Fleet::from_file(&path, &["a".into(), "b".into()]).expect("valid");
        let names: Vec<&str> = fleet.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let err = Fleet::from_file(&path, &["c".into()]).expect_err("unknown");
        assert!(
            err.contains("\"c\" is not in") && err.contains("b, a"),
            "{err}"
        );
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        for (text, expect) in [
            ("[fleet]\nhost = []\n", "lists no"),
            ("[fleet]\nbogus = 1\n", "unknown field `bogus`"),
            (
                "[[fleet.host]]\nname = \"a\"\nssh = \"-oProxyCommand=x\"\n",
                "not a host name",
            ),
            (
                "[[fleet.host]]\nname = \"a\"\nssh_options = [\"-v\"]\n",
                "KEY=VALUE",
            ),
            (
                "[[fleet.host]]\nname = \"a\"\nurl = \"ftp://a/\"\n",
                "must be http",
            ),
            (
                "[[fleet.host]]\nname = \"a\"\n[[fleet.host]]\nname = \"a\"\n",
                "twice",
            ),
            (
                "[fleet]\nconnect_timeout = \"10\"\n[[fleet.host]]\nname = \"a\"\n",
                "connect_timeout",
            ),
            ("[server]\n", "no [fleet] table"),
        ] {
            let (_dir, path) = write(text);
            let err = Fleet::from_file(&path, &[]).expect_err(text);
            assert!(err.contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn listed_hosts_are_destinations_checked_on_their_name() {
        let defaults = Defaults {
            socket: Some("/run/cutover/admin.sock".into()),
            ..Defaults::default()
        };
        let fleet =
            Fleet::from_list(&["deploy@a.example".into(), "b".into()], &defaults).expect("valid");
        assert_eq!(fleet.hosts[0].url.as_deref(), Some("http://a.example/"));
        assert_eq!(fleet.hosts[1].command, "cutover");
        assert_eq!(
            fleet.hosts[1].admin_args(),
            ["--socket", "/run/cutover/admin.sock"]
        );
        assert!(Fleet::from_list(&["a".into(), "a".into()], &defaults).is_err());
    }
}
