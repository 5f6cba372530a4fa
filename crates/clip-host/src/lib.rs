//! Host hygiene: what clip leaves on a host is its owner's alone, and nothing half-written is
//! ever seen.
//!
//! Archives, span caches, layer indexes, profiles, logs and mount points can hold the content of
//! private images, and a root daemon that writes through a path another user can prepare is a
//! classic way to lose a host. So every directory clip keeps state in is made with
//! [`private_dir`]: created `0700`, or, when it exists, checked — a real directory (not a
//! symlink) owned by this process's user, tightened to `0700` if it was wider — and every file
//! opened by a fixed name is opened with [`private_file`]: `O_NOFOLLOW`, `0600`, and refused when
//! someone else owns it. Files written under temporary names (archives, spans, indexes) are
//! created `0600` with random names (`O_EXCL`) and renamed into place: [`temp_beside`] and
//! [`persist`] (fsync, rename, fsync of the directory), or [`publish_bytes`] for both at once.
//!
//! The lowest crate of the workspace: the archive format, the caches, the services and the
//! snapshotter all keep their state through it.

use std::fs::File;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

/// Why a private path could not be had, or a file not published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The path exists but is not what it must be (a symlink, another kind of file, or owned by
    /// someone else).
    #[error("{}: {reason} — clip keeps private state here; remove it or choose another path", path.display())]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Creating, checking, opening, writing or renaming it failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<HostError> for std::io::Error {
    fn from(e: HostError) -> Self {
        let kind = match &e {
            HostError::Unsafe { .. } => std::io::ErrorKind::PermissionDenied,
            HostError::Io { source, .. } => source.kind(),
        };
        Self::new(kind, e)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HostError + use<> {
    at("at", path)
}

fn at(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HostError + use<> {
    let path = path.to_owned();
    move |source| HostError::Io {
        context,
        path,
        source,
    }
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates `dir` (its missing parents with default modes) as a `0700` directory, or checks an
/// existing one: a real directory owned by this user, tightened to `0700` if wider.
pub fn private_dir(dir: &Path) -> Result<(), HostError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dir)(e)),
    }
    let md = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    let unsafe_path = |reason: String| HostError::Unsafe {
        path: dir.to_owned(),
        reason,
    };
    if md.file_type().is_symlink() {
        return Err(unsafe_path("is a symbolic link".into()));
    }
    if !md.is_dir() {
        return Err(unsafe_path("is not a directory".into()));
    }
    let me = euid();
    if md.uid() != me {
        return Err(unsafe_path(format!(
            "is owned by uid {}, not by uid {me}",
            md.uid()
        )));
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// Opens `path` for writing, truncated, as a `0600` file of this user: a symlink at `path` is
/// not followed (the open fails), and an existing file owned by someone else is refused.
pub fn private_file(path: &Path) -> Result<File, HostError> {
    // O_NOFOLLOW: a planted symlink fails the open instead of redirecting it.
    #[allow(clippy::cast_possible_wrap)]
    let nofollow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nofollow)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                // The last component is a symbolic link.
                HostError::Unsafe {
                    path: path.to_owned(),
                    reason: "is a symbolic link".into(),
                }
            } else {
                io(path)(e)
            }
        })?;
    let md = f.metadata().map_err(io(path))?;
    let me = euid();
    if !md.is_file() || md.uid() != me {
        return Err(HostError::Unsafe {
            path: path.to_owned(),
            reason: format!("is not a regular file of uid {me}"),
        });
    }
    f.set_len(0).map_err(io(path))?;
    if md.mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io(path))?;
    }
    Ok(f)
}

/// A new `0600` temporary file in `path`'s directory (random name, `O_EXCL`), to be
/// [`persist`]ed as `path` once complete.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile, HostError> {
    let dir = parent_of(path);
    tempfile::Builder::new()
        .prefix(".clip-tmp-")
        .tempfile_in(dir)
        .map_err(at("creating a temp file in", dir))
}

/// Publishes a complete temporary file as `path`: fsync, rename over `path`, fsync of the
/// directory. A crash leaves the old file or the new one, never a mix.
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), HostError> {
    tmp.as_file()
        .sync_all()
        .map_err(at("syncing", tmp.path()))?;
    tmp.persist(path)
        .map_err(|e| at("renaming into", path)(e.error))?;
    if let Ok(d) = File::open(parent_of(path)) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically ([`temp_beside`], then [`persist`]).
pub fn publish_bytes(path: &Path, bytes: &[u8]) -> Result<(), HostError> {
    let mut tmp = temp_beside(path)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(at("writing", tmp.path()))?;
    persist(tmp, path)
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn private_dirs_are_made_tightened_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b/state");
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(matches!(private_dir(&link), Err(HostError::Unsafe { .. })));
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(private_dir(&file), Err(HostError::Unsafe { .. })));
    }

    #[test]
    fn published_files_replace_the_old_one_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("state.json");
        publish_bytes(&p, b"old").unwrap();
        publish_bytes(&p, b"new state").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new state");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left behind");
        let err = publish_bytes(&tmp.path().join("no/such/dir/x"), b"x").unwrap_err();
        assert!(matches!(err, HostError::Io { .. }), "{err}");
    }

    #[test]
    fn private_files_never_follow_a_planted_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let log = tmp.path().join("x.log");
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        let err = private_file(&log).unwrap_err();
        assert!(matches!(err, HostError::Unsafe { .. }), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let ok = tmp.path().join("ok.log");
        std::fs::write(&ok, b"old content").unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut f = private_file(&ok).unwrap();
        std::io::Write::write_all(&mut f, b"new").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&ok).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&ok).unwrap().mode() & 0o777, 0o600);
    }
}
