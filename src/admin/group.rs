//! Looking up a Unix group's id by name, for the admin socket's optional
//! `admin_group`.
//!
//! The crate forbids `unsafe`, so there is no `getgrnam(3)`: the lookup
//! reads `/etc/group` (the `files` NSS source). Groups that exist only in
//! LDAP or another directory are not found by name; give their numeric id
//! instead, which is used as is.

use std::path::Path;

/// The default group database.
pub const GROUP_FILE: &str = "/etc/group";

/// Why a group could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("group {name:?} does not exist in {file} (create it, or give its numeric gid)")]
    Unknown { name: String, file: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
}

/// The gid of `name` (or `name` itself when it is a number), looked up in
/// the group file at `file`.
pub fn resolve(name: &str, file: &Path) -> Result<u32, GroupError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string(file).map_err(|source| GroupError::Read {
        file: file.display().to_string(),
        source,
    })?;
    gid_in(&text, name).ok_or_else(|| GroupError::Unknown {
        name: name.to_string(),
        file: file.display().to_string(),
    })
}

/// Finds `name` in group-file text: `name:password:gid:members` per line.
/// Malformed lines are skipped, as the C library does.
fn gid_in(text: &str, name: &str) -> Option<u32> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let _password = fields.next()?;
            let gid = fields.next()?.trim().parse().ok()?;
            (group == name).then_some(gid)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "root:x:0:\n# comment:x:5:\nbroken line\ndaemon:x:1:\ndeploy:x:1001:alice,bob\nbad:x:notanumber:\n";

    #[test]
    fn finds_groups_by_name() {
        assert_eq!(gid_in(SAMPLE, "root"), Some(0));
        assert_eq!(gid_in(SAMPLE, "deploy"), Some(1001));
        assert_eq!(gid_in(SAMPLE, "daemon"), Some(1));
    }

    #[test]
    fn unknown_and_malformed_entries_are_not_found() {
        assert_eq!(gid_in(SAMPLE, "nobody-here"), None);
        assert_eq!(gid_in(SAMPLE, "bad"), None);
        assert_eq!(gid_in(SAMPLE, "broken line"), None);
        assert_eq!(gid_in(SAMPLE, "# comment"), None);
    }

    #[test]
    fn numeric_names_are_gids() {
        assert_eq!(
            resolve("4242", Path::new("/nonexistent")).expect("numeric"),
            4242
        );
    }

    #[test]
    fn unknown_group_error_names_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("group");
        std::fs::write(&file, SAMPLE).expect("write");
        let err = resolve("deployers", &file).expect_err("unknown");
        assert!(err.to_string().contains("\"deployers\""), "{err}");
    }
}
