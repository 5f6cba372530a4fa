//! Directory → v1 local archive.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use clip_format::{Meta, Metadata, NodeKind, Tree, V1Writer, WriteSummary};

use crate::{Error, Result};

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io {
        context,
        path,
        source,
    }
}

fn metadata_of(path: &Path, md: &std::fs::Metadata) -> Metadata {
    let mut xattrs = Vec::new();
    if let Ok(names) = xattr::list(path) {
        for name in names {
            if let Ok(Some(v)) = xattr::get(path, &name) {
                xattrs.push((name.as_bytes().to_vec(), v));
            }
        }
    }
    Metadata {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_sec: md.mtime(),
        mtime_nsec: u32::try_from(md.mtime_nsec()).unwrap_or(0),
        xattrs,
    }
}

/// Describes the directory `root` as a [`Tree`] (no file data is read). Symlinks are not followed;
/// files with several names become one file and [`NodeKind::HardLink`]s to its first path.
pub fn tree_of_dir(root: &Path) -> Result<Tree> {
    let md = std::fs::symlink_metadata(root).map_err(io("reading", root))?;
    let mut tree = Tree::new(metadata_of(root, &md));
    let mut seen: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io("listing", &dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io("listing", &dir))?;
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .as_os_str()
                .as_bytes()
                .to_vec();
            let md = std::fs::symlink_metadata(&path).map_err(io("reading", &path))?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(path.clone());
                NodeKind::Dir
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path).map_err(io("reading link", &path))?;
                NodeKind::Symlink(t.as_os_str().as_bytes().to_vec())
            } else if ft.is_file() {
                if md.nlink() > 1 {
                    if let Some(first) = seen.get(&(md.dev(), md.ino())) {
                        tree.insert(&rel, NodeKind::HardLink(first.clone()), Metadata::default())?;
                        continue;
                    }
                    seen.insert((md.dev(), md.ino()), rel.clone());
                }
                NodeKind::File {
                    size: md.len(),
                    span: None,
                }
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = md.rdev();
                let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
                if ft.is_char_device() {
                    NodeKind::CharDevice { major, minor }
                } else {
                    NodeKind::BlockDevice { major, minor }
                }
            } else if ft.is_fifo() {
                NodeKind::Fifo
            } else {
                NodeKind::Socket
            };
            tree.insert(&rel, kind, metadata_of(&path, &md))?;
        }
    }
    Ok(tree)
}

/// Archives the directory `root` into a v1 local archive at `out`, streaming file contents.
pub fn archive_rootfs(root: &Path, out: &Path, meta: &Meta) -> Result<WriteSummary> {
    let tree = tree_of_dir(root)?;
    let mut writer = V1Writer::create(out)?;
    for id in tree.breadth_first() {
        let Some(node) = tree.node(id) else { continue };
        if let NodeKind::File { size, .. } = node.kind
            && size > 0
        {
            let rel = tree.path_of(id);
            let path = root.join(std::ffi::OsStr::from_bytes(&rel));
            let file = File::open(&path).map_err(io("opening", &path))?;
            writer.add_file(id, file)?;
        }
    }
    Ok(writer.finish(&tree, meta)?)
}
