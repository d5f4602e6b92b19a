//! Writing a file that holds secrets (a private key, an account key) so
//! that it is never readable by others and never seen half-written: a temp
//! file created 0600 in the same directory, fsync, rename over the target,
//! fsync of the directory. After a crash the file is the old version or
//! the new one, never a torn mix.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Replaces `path` with `bytes` atomically, mode 0600; creates missing
/// parent directories with mode 0700. Blocking: call it off the runtime.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(err) = written {
        // A full disk fails after the temp file exists: do not leave it.
        let _ = std::fs::remove_file(&temp);
        return Err(err);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_with_mode_0600_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/key.pem");
        write_private(&path, b"old").expect("first write");
        write_private(&path, b"new").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let parent = std::fs::metadata(dir.path().join("nested")).expect("meta");
        assert_eq!(parent.permissions().mode() & 0o777, 0o700);
        let entries: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .expect("dir")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("key.pem")]);
    }
}
