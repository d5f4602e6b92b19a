//! Which containers are this cutover's own.
//!
//! Several cutovers may share one Docker engine (staging beside production,
//! or a second one started by mistake with the same service names). Each
//! labels the containers it starts with its instance identity
//! ([`crate::docker::LABEL_INSTANCE`]) and only ever stops, removes or
//! adopts containers that are its own:
//!
//! * containers its state file names (active, warm previous, being
//!   created), whatever their label: the state file is this instance's own
//!   record, and a container an older cutover started (no instance label)
//!   or one started before `instance` was renamed stays managed;
//! * any other container labelled with its identity.
//!
//! Everything else is left alone: another instance's containers, and
//! unlabelled containers the state file does not name (an older cutover's,
//! or another instance's from before instance labels). Reconciliation logs
//! those so an operator can remove them.

use std::path::Path;

use crate::config::ServerConfig;
use crate::docker::ContainerInfo;

/// This cutover's identity: the configured `instance`, else the canonical
/// path of `state_dir` (two cutovers with different state directories are
/// different instances; one keeps its identity across restarts). Creates
/// the state directory so its canonical path exists. Empty when neither
/// is set, which only a config without container services allows.
pub fn instance_id(server: &ServerConfig) -> String {
    if let Some(name) = &server.instance {
        return name.clone();
    }
    server
        .state_dir
        .as_deref()
        .map(canonical_dir)
        .unwrap_or_default()
}

/// `dir` made absolute and free of symlinks and `..`, so two spellings of
/// one directory give one identity. Falls back to the plain absolute path
/// if the directory cannot be created (the first state write then reports
/// why).
fn canonical_dir(dir: &Path) -> String {
    let _ = std::fs::create_dir_all(dir);
    std::fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf())
        .display()
        .to_string()
}

/// The containers the state file names for one service: their ids, and the
/// name of the one a deploy was creating.
#[derive(Debug, Default)]
pub(crate) struct Named<'a> {
    pub ids: Vec<&'a str>,
    pub starting: Option<&'a str>,
}

impl Named<'_> {
    fn names(&self, info: &ContainerInfo) -> bool {
        self.ids.contains(&info.id.as_str()) || self.starting == Some(info.name.as_str())
    }
}

/// Splits a service's listed containers into this instance's own and the
/// rest (see the module header for the rule).
pub(crate) fn split_own(
    listed: Vec<ContainerInfo>,
    instance: &str,
    named: &Named<'_>,
) -> (Vec<ContainerInfo>, Vec<ContainerInfo>) {
    listed
        .into_iter()
        .partition(|info| named.names(info) || info.instance.as_deref() == Some(instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, name: &str, instance: Option<&str>) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: name.into(),
            image: "web:v1".into(),
            service: Some("web".into()),
            color: Some("blue".into()),
            deploy_id: Some("d".into()),
            instance: instance.map(Into::into),
            running: true,
            exit_code: None,
            host_addr: None,
            started_at: None,
        }
    }

    #[test]
    fn own_containers_are_labelled_or_named() {
        let listed = vec![
            container("mine", "cutover-web-blue-1", Some("/var/lib/a")),
            container("theirs", "cutover-web-blue-2", Some("/var/lib/b")),
            container("legacy-named", "cutover-web-green-3", None),
            container("legacy-stray", "cutover-web-green-4", None),
            container("creating", "cutover-web-green-5", None),
            container("renamed", "cutover-web-blue-6", Some("old-name")),
        ];
        let named = Named {
            ids: vec!["legacy-named", "renamed"],
            starting: Some("cutover-web-green-5"),
        };
        let (own, other) = split_own(listed, "/var/lib/a", &named);
        let ids = |list: &[ContainerInfo]| list.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&own), ["mine", "legacy-named", "creating", "renamed"]);
        assert_eq!(ids(&other), ["theirs", "legacy-stray"]);
    }

    #[test]
    fn identity_is_the_name_or_the_canonical_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = crate::Config::parse("", "proxy.toml", Path::new("/"))
            .expect("empty config")
            .server;
        assert_eq!(instance_id(&server), "");
        // Two spellings of one directory (one not yet created) are one identity.
        server.state_dir = Some(dir.path().join("state"));
        let plain = instance_id(&server);
        server.state_dir = Some(dir.path().join("x/../state"));
        assert_eq!(instance_id(&server), plain);
        assert!(Path::new(&plain).is_absolute() && Path::new(&plain).is_dir());
        server.instance = Some("prod".into());
        assert_eq!(instance_id(&server), "prod");
    }
}
