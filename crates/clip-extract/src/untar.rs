//! Tar stream → directory, for untrusted uploads (a build context sent to the worker).
//!
//! The same rules as archive extraction: every path is resolved beneath the root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so no entry — however it is named, and
//! whatever symlinks earlier entries made — lands outside it. Only what a build context needs is
//! accepted: directories, regular files, symlinks (stored as they are; they are never followed
//! here) and hard links to earlier files of the stream. Device nodes, fifos and other entry kinds
//! are refused, modes keep only the permission bits (no setuid/setgid/sticky), owners are not
//! applied, and the stream is bounded in entries and bytes.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

use crate::{Error, Result};

/// Bounds on an untrusted stream.
#[derive(Debug, Clone, Copy)]
pub struct UntarLimits {
    /// Most file bytes written.
    pub max_bytes: u64,
    /// Most entries.
    pub max_entries: u64,
}

impl Default for UntarLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_entries: 200_000,
        }
    }
}

/// What an untar wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UntarSummary {
    /// Entries created.
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

fn refuse(path: &str, reason: impl Into<String>) -> Error {
    Error::Unsafe {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The entry's path as components: relative, no `..`, `.` dropped; `None` for the root.
fn clean(raw: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err("is an absolute path".into());
            }
            Component::ParentDir => return Err("has a `..` component".into()),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

fn beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        mode,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Extracts the tar stream `input` into `dir` (created if missing; should be empty).
// Over 100 lines on purpose: one pass over an untrusted tar stream into a directory: header,
// extension records and the entry they describe are handled in arrival order with every path
// resolved beneath the root; the pending-record state would otherwise cross functions.
pub fn untar(input: impl Read, dir: &Path, limits: UntarLimits) -> Result<UntarSummary> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        context: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let root = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Io {
        context: "opening",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    let mut archive = tar::Archive::new(input);
    let mut summary = UntarSummary::default();
    let bad_tar =
        |e: std::io::Error| refuse("(tar stream)", format!("not a valid tar stream: {e}"));
    for entry in archive.entries().map_err(bad_tar)? {
        let mut entry = entry.map_err(bad_tar)?;
        summary.entries += 1;
        if summary.entries > limits.max_entries {
            return Err(refuse(
                "(tar stream)",
                format!("more than {} entries", limits.max_entries),
            ));
        }
        let raw = entry.path().map_err(bad_tar)?.into_owned();
        let shown = raw.display().to_string();
        let Some(rel) = clean(&raw).map_err(|r| refuse(&shown, r))? else {
            continue;
        };
        let (parent, name) = match (rel.parent(), rel.file_name()) {
            (Some(p), Some(n)) => (p.to_owned(), n.to_owned()),
            _ => return Err(refuse(&shown, "has no name")),
        };
        let sys = |context: &'static str| {
            let path = rel.clone();
            move |e: rustix::io::Errno| Error::Io {
                context,
                path,
                source: e.into(),
            }
        };
        let pfd = if parent.as_os_str().is_empty() {
            rustix::fs::openat(
                root.as_fd(),
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys("opening the root for"))?
        } else {
            beneath(
                root.as_fd(),
                &parent,
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .map_err(|e| {
                if matches!(
                    e,
                    rustix::io::Errno::LOOP
                        | rustix::io::Errno::XDEV
                        | rustix::io::Errno::NOTDIR
                        | rustix::io::Errno::NOENT
                ) {
                    refuse(&shown, "its parent is not a directory beneath the root")
                } else {
                    sys("opening the parent of")(e)
                }
            })?
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(&pfd, &name, Mode::from_raw_mode(mode | 0o700)) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::EXIST) => {
                        let st = rustix::fs::statat(&pfd, &name, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(sys("checking"))?;
                        if st.st_mode & 0o170_000 != 0o040_000 {
                            return Err(refuse(&shown, "exists and is not a directory"));
                        }
                    }
                    Err(e) => return Err(sys("creating")(e)),
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                if summary.bytes.saturating_add(size) > limits.max_bytes {
                    return Err(refuse(
                        &shown,
                        format!("the context is larger than {} bytes", limits.max_bytes),
                    ));
                }
                let fd = rustix::fs::openat(
                    &pfd,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(mode),
                )
                .map_err(|e| {
                    if e == rustix::io::Errno::EXIST {
                        refuse(&shown, "is in the stream twice")
                    } else {
                        sys("creating")(e)
                    }
                })?;
                let mut f = std::fs::File::from(fd);
                let n = std::io::copy(&mut (&mut entry).take(size), &mut f).map_err(|source| {
                    Error::Io {
                        context: "writing",
                        path: rel.clone(),
                        source,
                    }
                })?;
                summary.bytes += n;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(bad_tar)?
                    .ok_or_else(|| refuse(&shown, "symlink without a target"))?;
                rustix::fs::symlinkat(target.as_ref(), &pfd, &name).map_err(sys("creating"))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(bad_tar)?
                    .ok_or_else(|| refuse(&shown, "hard link without a target"))?;
                let target = clean(&target)
                    .map_err(|r| refuse(&shown, format!("hard link target {r}")))?
                    .ok_or_else(|| refuse(&shown, "hard link to the root"))?;
                let src = beneath(root.as_fd(), &target, OFlags::PATH, Mode::empty())
                    .map_err(|_| refuse(&shown, "hard link to something not beneath the root"))?;
                rustix::fs::linkat(&src, "", &pfd, &name, AtFlags::EMPTY_PATH)
                    .map_err(sys("linking"))?;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                return Err(refuse(
                    &shown,
                    format!("{other:?} entries are not accepted in a build context"),
                ));
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o4755);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            // Raw names: the builder's own checks would refuse the hostile ones.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_context_extracts_beneath_its_root_and_nothing_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ctx");
        let ok = tar_of(&[
            ("app", tar::EntryType::Directory, b"", None),
            (
                "app/Dockerfile",
                tar::EntryType::Regular,
                b"FROM scratch\n",
                None,
            ),
            (
                "app/link",
                tar::EntryType::Symlink,
                b"",
                Some("/etc/passwd"),
            ),
            (
                "app/hard",
                tar::EntryType::Link,
                b"",
                Some("app/Dockerfile"),
            ),
        ]);
        let s = untar(&ok[..], &out, UntarLimits::default()).unwrap();
        assert_eq!(s.entries, 4);
        assert_eq!(
            std::fs::read(out.join("app/Dockerfile")).unwrap(),
            b"FROM scratch\n"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(out.join("app/Dockerfile"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o7777, 0o755, "setuid is dropped");
        assert_eq!(
            std::fs::read_link(out.join("app/link")).unwrap(),
            Path::new("/etc/passwd")
        );

        let victim = tmp.path().join("victim");
        for hostile in [
            tar_of(&[("../victim", tar::EntryType::Regular, b"x", None)]),
            tar_of(&[("/tmp/abs", tar::EntryType::Regular, b"x", None)]),
            tar_of(&[
                ("esc", tar::EntryType::Symlink, b"", Some("..")),
                ("esc/victim", tar::EntryType::Regular, b"x", None),
            ]),
            tar_of(&[("dev", tar::EntryType::Char, b"", None)]),
            tar_of(&[("h", tar::EntryType::Link, b"", Some("../victim"))]),
        ] {
            let d = tempfile::tempdir_in(tmp.path()).unwrap();
            assert!(untar(&hostile[..], d.path(), UntarLimits::default()).is_err());
            assert!(!victim.exists());
        }
        let big = tar_of(&[("f", tar::EntryType::Regular, &[0u8; 5000], None)]);
        let d = tempfile::tempdir_in(tmp.path()).unwrap();
        let limits = UntarLimits {
            max_bytes: 4096,
            ..UntarLimits::default()
        };
        assert!(untar(&big[..], d.path(), limits).is_err());
    }
}
