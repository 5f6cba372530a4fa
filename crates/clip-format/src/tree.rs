//! The owned, in-memory file tree that writers serialise.
//!
//! A [`Tree`] is an arena of [`Node`]s with the root at [`Tree::ROOT`]. Paths are byte strings
//! (`a/b/c`, relative, no `.` or `..` components). Inserting a path creates missing parents as
//! implicit directories (mode 0755, owned by root, mtime 0), as unpackers do. Hard links are kept
//! as [`NodeKind::HardLink`] to their target path and resolved when the archive is written: all
//! names of one file then share one inode number, one data location and a correct `nlink`.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Where a v2 file's bytes live: in a layer's uncompressed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpan {
    /// Index into the archive's layer table.
    pub layer: u32,
    /// Offset of the first (stored) byte in the layer's uncompressed tar stream.
    pub offset: u64,
    /// For a sparse file: its data extents, stored back to back from `offset`; the rest reads
    /// as zeros. `None`: the file's bytes are stored whole.
    pub sparse: Option<std::sync::Arc<crate::sparse::SparseMap>>,
}

impl LayerSpan {
    /// A file stored whole at `offset` of layer `layer`.
    #[must_use]
    pub fn new(layer: u32, offset: u64) -> Self {
        Self {
            layer,
            offset,
            sparse: None,
        }
    }

    /// How many bytes the file occupies in the layer stream, for a file of `size` bytes.
    #[must_use]
    pub fn stored_len(&self, size: u64) -> u64 {
        self.sparse.as_ref().map_or(size, |m| m.stored_len())
    }
}

/// What a node is, with its type-specific data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory; children are kept in [`Node::children`].
    Dir,
    /// A regular file of `size` bytes; `span` says where a v2 file's bytes live.
    File {
        /// Size in bytes.
        size: u64,
        /// v2 data location (None for v1, whose data the writer receives as a stream).
        span: Option<LayerSpan>,
    },
    /// A symbolic link.
    Symlink(Vec<u8>),
    /// Another name of the file at this path (resolved when written).
    HardLink(Vec<u8>),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

impl NodeKind {
    /// The `st_mode` type bits of this kind (hard links report their target's later).
    #[must_use]
    pub fn type_bits(&self) -> u32 {
        use crate::spec::mode::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK};
        match self {
            Self::Dir => S_IFDIR,
            Self::File { .. } | Self::HardLink(_) => S_IFREG,
            Self::Symlink(_) => S_IFLNK,
            Self::CharDevice { .. } => S_IFCHR,
            Self::BlockDevice { .. } => S_IFBLK,
            Self::Fifo => S_IFIFO,
            Self::Socket => S_IFSOCK,
        }
    }
}

/// Ownership, permissions, time and xattrs of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Permission bits including setuid/setgid/sticky (`& 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes (name, value); a name given twice keeps its last value.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Metadata {
    /// Metadata of an implicit parent directory.
    #[must_use]
    pub fn implicit_dir() -> Self {
        Self {
            mode: 0o755,
            ..Self::default()
        }
    }

    /// Metadata of an implicit directory created inside a directory with metadata `parent`:
    /// what `mkdir(2)` gives an unpacker running as root (umoci, containerd) — mode 0755, owned
    /// by root, except that inside a setgid directory the new one inherits the setgid bit and the
    /// parent's group.
    #[must_use]
    pub fn implicit_dir_in(parent: &Self) -> Self {
        let mut m = Self::implicit_dir();
        if parent.mode & 0o2000 != 0 {
            m.mode |= 0o2000;
            m.gid = parent.gid;
        }
        m
    }
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its name in its parent (empty for the root).
    pub name: Vec<u8>,
    /// Parent node id.
    pub parent: usize,
    /// What it is.
    pub kind: NodeKind,
    /// Its metadata.
    pub meta: Metadata,
    /// Children by name (directories only).
    pub children: BTreeMap<Vec<u8>, usize>,
}

/// An arena tree of nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    nodes: Vec<Option<Node>>,
}

/// Splits a path into validated components (`./`, leading `/` and empty components are dropped).
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::InvalidTree(format!(
                    "path {:?} has a `..` component",
                    String::from_utf8_lossy(path)
                )));
            }
            c if c.contains(&0) => {
                return Err(Error::InvalidTree(format!(
                    "path {:?} contains a NUL byte",
                    String::from_utf8_lossy(path)
                )));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

impl Default for Tree {
    fn default() -> Self {
        Self::new(Metadata::implicit_dir())
    }
}

impl Tree {
    /// The root's id.
    pub const ROOT: usize = 0;

    /// A tree holding only the root directory.
    #[must_use]
    pub fn new(root: Metadata) -> Self {
        Self {
            nodes: vec![Some(Node {
                name: Vec::new(),
                parent: 0,
                kind: NodeKind::Dir,
                meta: root,
                children: BTreeMap::new(),
            })],
        }
    }

    /// The node with `id`, if it exists.
    #[must_use]
    pub fn node(&self, id: usize) -> Option<&Node> {
        self.nodes.get(id).and_then(Option::as_ref)
    }

    /// The node with `id`, mutably.
    pub fn node_mut(&mut self, id: usize) -> Option<&mut Node> {
        self.nodes.get_mut(id).and_then(Option::as_mut)
    }

    /// The id of the node at `path`.
    #[must_use]
    pub fn lookup(&self, path: &[u8]) -> Option<usize> {
        let mut id = Self::ROOT;
        for c in components(path).ok()? {
            id = *self.node(id)?.children.get(c)?;
        }
        Some(id)
    }

    /// Number of live nodes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.iter().filter(|n| n.is_some()).count()
    }

    /// Whether only the root exists.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }

    /// Inserts or replaces the node at `path`, creating implicit parents. Replacing a directory
    /// with a directory keeps its children (as tar extraction does); replacing it with anything else
    /// drops the subtree. A non-directory in the way of a parent is replaced by an implicit
    /// directory. Returns the node id.
    pub fn insert(&mut self, path: &[u8], kind: NodeKind, meta: Metadata) -> Result<usize> {
        let comps = components(path)?;
        let Some((last, parents)) = comps.split_last() else {
            // The root itself: only its metadata can change.
            if kind != NodeKind::Dir {
                return Err(Error::InvalidTree("the root must be a directory".into()));
            }
            if let Some(root) = self.node_mut(Self::ROOT) {
                root.meta = meta;
            }
            return Ok(Self::ROOT);
        };
        let mut dir = Self::ROOT;
        for c in parents {
            dir = self.ensure_dir(dir, c);
        }
        let existing = self.node(dir).and_then(|d| d.children.get(*last).copied());
        if let Some(old) = existing {
            let keep_children =
                kind == NodeKind::Dir && self.node(old).is_some_and(|n| n.kind == NodeKind::Dir);
            if keep_children {
                if let Some(n) = self.node_mut(old) {
                    n.meta = meta;
                }
                return Ok(old);
            }
            self.remove_id(old);
        }
        let id = self.nodes.len();
        self.nodes.push(Some(Node {
            name: last.to_vec(),
            parent: dir,
            kind,
            meta,
            children: BTreeMap::new(),
        }));
        if let Some(d) = self.node_mut(dir) {
            d.children.insert(last.to_vec(), id);
        }
        Ok(id)
    }

    fn ensure_dir(&mut self, parent: usize, name: &[u8]) -> usize {
        if let Some(&id) = self.node(parent).and_then(|p| p.children.get(name)) {
            if self.node(id).is_some_and(|n| n.kind == NodeKind::Dir) {
                return id;
            }
            self.remove_id(id);
        }
        let meta = self.node(parent).map_or_else(Metadata::implicit_dir, |p| {
            Metadata::implicit_dir_in(&p.meta)
        });
        let id = self.nodes.len();
        self.nodes.push(Some(Node {
            name: name.to_vec(),
            parent,
            kind: NodeKind::Dir,
            meta,
            children: BTreeMap::new(),
        }));
        if let Some(p) = self.node_mut(parent) {
            p.children.insert(name.to_vec(), id);
        }
        id
    }

    /// Removes the node at `path` and its subtree; returns whether something was removed.
    pub fn remove(&mut self, path: &[u8]) -> bool {
        match self.lookup(path) {
            Some(Self::ROOT) | None => false,
            Some(id) => {
                self.remove_id(id);
                true
            }
        }
    }

    /// Removes every child of the directory at `path`, keeping the directory.
    pub fn clear_dir(&mut self, path: &[u8]) {
        if let Some(id) = self.lookup(path) {
            let kids: Vec<usize> = self
                .node(id)
                .map(|n| n.children.values().copied().collect())
                .unwrap_or_default();
            for k in kids {
                self.remove_id(k);
            }
        }
    }

    fn remove_id(&mut self, id: usize) {
        let Some(node) = self.nodes.get_mut(id).and_then(Option::take) else {
            return;
        };
        if let Some(p) = self.node_mut(node.parent) {
            p.children.remove(&node.name);
        }
        let mut stack: Vec<usize> = node.children.values().copied().collect();
        while let Some(c) = stack.pop() {
            if let Some(n) = self.nodes.get_mut(c).and_then(Option::take) {
                stack.extend(n.children.values().copied());
            }
        }
    }

    /// The path of node `id` (no leading slash; empty for the root).
    #[must_use]
    pub fn path_of(&self, id: usize) -> Vec<u8> {
        let mut parts = Vec::new();
        let mut cur = id;
        while cur != Self::ROOT {
            let Some(n) = self.node(cur) else { break };
            parts.push(n.name.as_slice());
            cur = n.parent;
        }
        parts.reverse();
        parts.join(&b'/')
    }

    /// Node ids breadth first from the root, children in name order: the archive's entry order.
    #[must_use]
    pub fn breadth_first(&self) -> Vec<usize> {
        let mut order = vec![Self::ROOT];
        let mut i = 0;
        while i < order.len() {
            if let Some(n) = self.node(order[i]) {
                order.extend(n.children.values().copied());
            }
            i += 1;
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> NodeKind {
        NodeKind::File { size, span: None }
    }

    #[test]
    fn insert_creates_implicit_parents_and_replacement_drops_subtrees() {
        let mut t = Tree::default();
        t.insert(b"a/b/c", file(1), Metadata::default()).unwrap();
        assert_eq!(t.node(t.lookup(b"a").unwrap()).unwrap().meta.mode, 0o755);
        assert_eq!(t.path_of(t.lookup(b"./a//b/c").unwrap()), b"a/b/c");
        t.insert(b"a/b", file(2), Metadata::default()).unwrap();
        assert!(t.lookup(b"a/b/c").is_none());
        assert_eq!(t.len(), 3);
        t.insert(b"a/b/d", file(3), Metadata::default()).unwrap();
        assert_eq!(
            t.node(t.lookup(b"a/b").unwrap()).unwrap().kind,
            NodeKind::Dir
        );
        assert!(t.insert(b"../x", file(1), Metadata::default()).is_err());
        assert!(t.remove(b"a"));
        assert!(t.is_empty());
    }

    #[test]
    fn dir_over_dir_keeps_children() {
        let mut t = Tree::default();
        t.insert(b"d/x", file(1), Metadata::default()).unwrap();
        let meta = Metadata {
            mode: 0o700,
            ..Metadata::default()
        };
        t.insert(b"d", NodeKind::Dir, meta).unwrap();
        assert!(t.lookup(b"d/x").is_some());
        assert_eq!(t.node(t.lookup(b"d").unwrap()).unwrap().meta.mode, 0o700);
        t.clear_dir(b"d");
        assert!(t.lookup(b"d/x").is_none() && t.lookup(b"d").is_some());
    }
}
