//! Snapshots of a directory tree and a comparison that reports every difference.
//!
//! The comparison is the project's correctness oracle: what clip shows (a mount or an extracted
//! archive) must equal `umoci unpack` of the same image in paths, types, modes (including
//! setuid/setgid/sticky), owners, sizes, content digests, symlink targets, device numbers, xattrs,
//! hard-link groups and mtimes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

/// The type of a tree node and its type-specific payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKind {
    /// Regular file: size and sha256.
    File {
        /// Size in bytes.
        size: u64,
        /// Hex sha256 of the content.
        sha256: String,
    },
    /// Directory.
    Dir,
    /// Symlink and its target (raw bytes, lossily shown).
    Symlink(String),
    /// Named pipe.
    Fifo,
    /// Character device with its rdev.
    CharDevice(u64),
    /// Block device with its rdev.
    BlockDevice(u64),
    /// Unix socket.
    Socket,
}

/// One path's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Type and payload.
    pub kind: ItemKind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Inode number, used to form hard-link groups.
    pub ino: u64,
    /// Link count.
    pub nlink: u64,
}

/// A snapshot of a directory tree, keyed by path relative to its root (`""` is the root itself).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every node.
    pub nodes: BTreeMap<String, Item>,
}

/// What to compare besides paths, types, content, modes and owners (always compared).
///
/// Independent switches, so plain bools read best here.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Compare mtimes of non-directories.
    pub mtimes: bool,
    /// Compare mtimes of directories. Off by default: `umoci unpack` leaves a directory with the
    /// time of the last change an unpacker made inside it (a later layer's whiteout, a long-name
    /// child) rather than its header's mtime, so two unpacks of one image disagree (see the
    /// testkit's determinism test). Turn it on to compare two of clip's own views.
    pub dir_mtimes: bool,
    /// Compare extended attributes.
    pub xattrs: bool,
    /// Compare hard-link groups.
    pub hardlinks: bool,
    /// Paths (and everything below them) to leave out of the comparison.
    pub ignore: Vec<String>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            mtimes: true,
            dir_mtimes: false,
            xattrs: true,
            hardlinks: true,
            ignore: Vec::new(),
        }
    }
}

impl Snapshot {
    /// Walks `root` without following symlinks, reading every file's content.
    pub fn scan(root: &Path) -> Result<Self> {
        let mut tree = Self::default();
        scan_into(root, root, &mut tree)?;
        Ok(tree)
    }

    /// Hard-link groups: for each inode with several paths, the sorted paths.
    #[must_use]
    pub fn hardlink_groups(&self) -> BTreeSet<Vec<String>> {
        let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (p, n) in &self.nodes {
            if n.kind != ItemKind::Dir && n.nlink > 1 {
                by_ino.entry(n.ino).or_default().push(p.clone());
            }
        }
        by_ino.into_values().filter(|v| v.len() > 1).collect()
    }

    /// Every difference between `self` (expected) and `actual`, one line each.
    #[must_use]
    pub fn compare(&self, actual: &Snapshot, o: &CompareOptions) -> Vec<String> {
        let ignored = |p: &str| {
            o.ignore
                .iter()
                .any(|i| p == i || p.starts_with(&format!("{i}/")))
        };
        let mut diffs = Vec::new();
        for (p, e) in &self.nodes {
            if ignored(p) || p.is_empty() {
                continue;
            }
            let Some(a) = actual.nodes.get(p) else {
                diffs.push(format!("{p:?}: missing (expected {})", describe(e)));
                continue;
            };
            if e.kind != a.kind {
                diffs.push(format!(
                    "{p:?}: expected {}, found {}",
                    describe(e),
                    describe(a)
                ));
                continue;
            }
            if e.mode != a.mode {
                diffs.push(format!(
                    "{p:?}: mode expected {:o}, found {:o}",
                    e.mode, a.mode
                ));
            }
            if (e.uid, e.gid) != (a.uid, a.gid) {
                diffs.push(format!(
                    "{p:?}: owner expected {}:{}, found {}:{}",
                    e.uid, e.gid, a.uid, a.gid
                ));
            }
            let is_dir = e.kind == ItemKind::Dir;
            if e.mtime != a.mtime && ((is_dir && o.dir_mtimes) || (!is_dir && o.mtimes)) {
                diffs.push(format!(
                    "{p:?}: mtime expected {}.{:09}, found {}.{:09}",
                    e.mtime.0, e.mtime.1, a.mtime.0, a.mtime.1
                ));
            }
            if o.xattrs && e.xattrs != a.xattrs {
                diffs.push(format!(
                    "{p:?}: xattrs expected {:?}, found {:?}",
                    e.xattrs, a.xattrs
                ));
            }
        }
        for p in actual.nodes.keys() {
            if !p.is_empty() && !ignored(p) && !self.nodes.contains_key(p) {
                diffs.push(format!(
                    "{p:?}: unexpected ({})",
                    describe(&actual.nodes[p])
                ));
            }
        }
        if o.hardlinks {
            let keep = |g: &Vec<String>| {
                g.iter()
                    .filter(|p| !ignored(p))
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let eg: BTreeSet<_> = self
                .hardlink_groups()
                .iter()
                .map(keep)
                .filter(|g| g.len() > 1)
                .collect();
            let ag: BTreeSet<_> = actual
                .hardlink_groups()
                .iter()
                .map(keep)
                .filter(|g| g.len() > 1)
                .collect();
            for g in eg.difference(&ag) {
                diffs.push(format!("hard-link group {g:?} expected but not found"));
            }
            for g in ag.difference(&eg) {
                diffs.push(format!("hard-link group {g:?} found but not expected"));
            }
        }
        diffs
    }
}

fn describe(n: &Item) -> String {
    match &n.kind {
        ItemKind::File { size, sha256 } => {
            format!("file of {size} bytes, sha256 {}", &sha256[..12])
        }
        ItemKind::Dir => "directory".into(),
        ItemKind::Symlink(t) => format!("symlink to {t:?}"),
        ItemKind::Fifo => "fifo".into(),
        ItemKind::CharDevice(r) => format!("char device {r:#x}"),
        ItemKind::BlockDevice(r) => format!("block device {r:#x}"),
        ItemKind::Socket => "socket".into(),
    }
}

fn scan_into(root: &Path, path: &Path, tree: &mut Snapshot) -> Result<()> {
    let md = std::fs::symlink_metadata(path).ctx(|| format!("stat {}", path.display()))?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        ItemKind::Dir
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).ctx(|| format!("readlink {}", path.display()))?;
        ItemKind::Symlink(String::from_utf8_lossy(t.as_os_str().as_bytes()).into_owned())
    } else if ft.is_file() {
        let mut f = File::open(path).ctx(|| format!("open {}", path.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f
                .read(&mut buf)
                .ctx(|| format!("read {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        ItemKind::File {
            size: md.len(),
            sha256: hex::encode(h.finalize()),
        }
    } else if ft.is_fifo() {
        ItemKind::Fifo
    } else if ft.is_char_device() {
        ItemKind::CharDevice(md.rdev())
    } else if ft.is_block_device() {
        ItemKind::BlockDevice(md.rdev())
    } else {
        ItemKind::Socket
    };
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = xattr::list(path) {
        for name in names {
            if let Ok(Some(v)) = xattr::get(path, &name) {
                xattrs.insert(name.to_string_lossy().into_owned(), v);
            }
        }
    }
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel = String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned();
    tree.nodes.insert(
        rel,
        Item {
            kind: kind.clone(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
            xattrs,
            ino: md.ino(),
            nlink: md.nlink(),
        },
    );
    if kind == ItemKind::Dir {
        let mut children: Vec<_> = std::fs::read_dir(path)
            .ctx(|| format!("readdir {}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .ctx(|| format!("readdir {}", path.display()))?;
        children.sort();
        for c in children {
            scan_into(root, &c, tree)?;
        }
    }
    Ok(())
}

/// Asserts that the directory at `root` looks exactly like `expected` (default comparison),
/// listing every difference when it does not.
///
/// # Panics
/// When the trees differ or `root` cannot be scanned: it is a test assertion.
pub fn assert_same(expected: &Snapshot, root: &Path) {
    #[allow(clippy::unwrap_used)]
    let actual = Snapshot::scan(root).unwrap();
    assert_same_snapshots(expected, &actual);
}

/// Asserts that two snapshots are the same (default comparison), listing every difference when
/// they are not.
///
/// # Panics
/// When they differ: it is a test assertion.
pub fn assert_same_snapshots(expected: &Snapshot, actual: &Snapshot) {
    let diffs = expected.compare(actual, &CompareOptions::default());
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
