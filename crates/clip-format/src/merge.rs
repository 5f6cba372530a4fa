//! Applying OCI layers to a [`Tree`]: the one implementation of the layer merge, shared by the
//! v2 indexer and the v1 path.
//!
//! A layer is applied in two phases, which is exactly the OCI image-spec rule that whiteouts act
//! on *lower* layers only:
//!
//! 1. every opaque marker `DIR/.wh..wh..opq` empties `DIR` of what the layers below put there,
//!    and every whiteout `DIR/.wh.NAME` removes `DIR/NAME` (and its subtree) from below;
//! 2. the layer's other entries are inserted in order: a non-directory replacing a directory
//!    drops its subtree, a directory over a directory keeps the children and takes the new
//!    metadata, missing parents are created as implicit directories — except that a directory
//!    this layer's whiteouts removed, and that the layer needs again only as the parent of a new
//!    entry, comes back with the metadata it had (empty of what the lower layers put in it), as
//!    umoci and containerd's overlay applier both do.
//!
//! Hard links name an earlier entry; all names of one file share its inode. When a later layer
//! removes or replaces the path a link group hangs on, the group lives on through its next name
//! (as on a real filesystem, where the inode survives while any name is left).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tree::{Metadata, NodeKind, Tree, components};

/// One entry of a layer, as parsed from its tar stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// The path as written in the tar (leading `./` and `/` are ignored).
    pub path: Vec<u8>,
    /// What it is; hard links carry the path of the earlier entry they name.
    pub kind: NodeKind,
    /// Its metadata.
    pub meta: Metadata,
}

/// Whiteout prefix.
pub const WHITEOUT: &[u8] = b".wh.";
/// Opaque marker name.
pub const OPAQUE: &[u8] = b".wh..wh..opq";

/// Builds the merged tree layer by layer.
#[derive(Debug, Default)]
pub struct Merger {
    tree: Tree,
    /// link target path -> paths of hard links that name it
    links: HashMap<Vec<u8>, Vec<Vec<u8>>>,
}

fn normalize(path: &[u8]) -> Result<Vec<u8>> {
    Ok(components(path)?.join(&b'/'))
}

fn is_under(path: &[u8], prefix: &[u8]) -> bool {
    path == prefix
        || (path.len() > prefix.len() && path.starts_with(prefix) && path[prefix.len()] == b'/')
}

impl Merger {
    /// An empty root.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The merged tree so far.
    #[must_use]
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The merged tree, mutably (e.g. to attach data locations).
    pub fn tree_mut(&mut self) -> &mut Tree {
        &mut self.tree
    }

    /// The finished tree.
    #[must_use]
    pub fn into_tree(self) -> Tree {
        self.tree
    }

    /// Applies one layer. Paths with `..` components are refused.
    pub fn apply(&mut self, entries: &[LayerEntry]) -> Result<()> {
        // Directories the whiteouts below remove, with their metadata: needed again as implicit
        // parents, they keep it.
        let mut removed_dirs: HashMap<Vec<u8>, Metadata> = HashMap::new();
        // Phase 1: whiteouts and opaque markers against the lower layers.
        for e in entries {
            let path = normalize(&e.path)?;
            let (dir, name) = match path.iter().rposition(|b| *b == b'/') {
                Some(i) => (&path[..i], &path[i + 1..]),
                None => (&b""[..], &path[..]),
            };
            if name == OPAQUE {
                if let Some(id) = self.tree.lookup(dir) {
                    let kids: Vec<Vec<u8>> = self
                        .tree
                        .node(id)
                        .map(|n| n.children.keys().map(|k| join(dir, k)).collect())
                        .unwrap_or_default();
                    for k in kids {
                        self.dirs_under(&k, &mut removed_dirs);
                        self.remove(&k);
                    }
                }
            } else if let Some(target) = name.strip_prefix(WHITEOUT)
                && !target.is_empty()
            {
                let target = join(dir, target);
                self.dirs_under(&target, &mut removed_dirs);
                self.remove(&target);
            }
        }
        // Phase 2: the layer's own entries, in order.
        for e in entries {
            let path = normalize(&e.path)?;
            let name = path.rsplit(|b| *b == b'/').next().unwrap_or_default();
            if name.starts_with(WHITEOUT) {
                continue;
            }
            if path.is_empty() {
                // The root directory's own entry (`./`): only its metadata.
                if e.kind == NodeKind::Dir {
                    self.tree.insert(b"", NodeKind::Dir, e.meta.clone())?;
                }
                continue;
            }
            let kind = match &e.kind {
                NodeKind::HardLink(target) => {
                    let target = normalize(target)?;
                    let canonical = self.canonical(&target).ok_or_else(|| {
                        Error::InvalidTree(format!(
                            "hard link {} names {}, which is not an earlier regular file",
                            String::from_utf8_lossy(&path),
                            String::from_utf8_lossy(&target)
                        ))
                    })?;
                    if canonical == path {
                        continue; // a link to itself changes nothing
                    }
                    NodeKind::HardLink(canonical)
                }
                k => k.clone(),
            };
            // Replacing an existing non-directory (or a directory by a non-directory) ends that
            // inode's claim on this path.
            if let Some(existing) = self.tree.lookup(&path).and_then(|id| self.tree.node(id)) {
                let keep = existing.kind == NodeKind::Dir && kind == NodeKind::Dir;
                if !keep {
                    self.detach(&path);
                }
            }
            if let NodeKind::HardLink(target) = &kind {
                self.links
                    .entry(target.clone())
                    .or_default()
                    .push(path.clone());
            }
            // Parents this insert would create that a whiteout of this layer removed come back
            // first, top down, with the metadata they had (so that what is created inside them
            // inherits from them, as mkdir(2) does).
            if !removed_dirs.is_empty() {
                let revive: Vec<Vec<u8>> = ancestors(&path)
                    .filter(|a| removed_dirs.contains_key(*a) && self.tree.lookup(a).is_none())
                    .map(<[u8]>::to_vec)
                    .collect();
                for a in revive {
                    if let Some(meta) = removed_dirs.get(&a) {
                        self.tree.insert(&a, NodeKind::Dir, meta.clone())?;
                    }
                }
            }
            self.tree.insert(&path, kind, e.meta.clone())?;
        }
        Ok(())
    }

    /// Records the metadata of every directory at or below `path` (before it is removed).
    fn dirs_under(&self, path: &[u8], out: &mut HashMap<Vec<u8>, Metadata>) {
        let Some(id) = self.tree.lookup(path) else {
            return;
        };
        let mut stack = vec![(path.to_vec(), id)];
        while let Some((p, id)) = stack.pop() {
            let Some(node) = self.tree.node(id) else {
                continue;
            };
            if node.kind != NodeKind::Dir {
                continue;
            }
            out.entry(p.clone()).or_insert_with(|| node.meta.clone());
            for (name, &child) in &node.children {
                stack.push((join(&p, name), child));
            }
        }
    }

    /// The path of the regular file a link to `target` must name (following existing links).
    fn canonical(&self, target: &[u8]) -> Option<Vec<u8>> {
        let node = self.tree.node(self.tree.lookup(target)?)?;
        match &node.kind {
            NodeKind::File { .. } => Some(target.to_vec()),
            NodeKind::HardLink(t) => Some(t.clone()),
            _ => None,
        }
    }

    fn remove(&mut self, path: &[u8]) {
        self.detach(path);
        self.tree.remove(path);
    }

    /// Before `prefix` (and its subtree) goes away, hands every link group rooted there to a
    /// surviving name.
    fn detach(&mut self, prefix: &[u8]) {
        let targets: Vec<Vec<u8>> = self
            .links
            .keys()
            .filter(|t| is_under(t, prefix))
            .cloned()
            .collect();
        for target in targets {
            let Some(names) = self.links.remove(&target) else {
                continue;
            };
            let alive: Vec<Vec<u8>> = names
                .into_iter()
                .filter(|n| !is_under(n, prefix))
                .filter(|n| {
                    self.tree
                        .lookup(n)
                        .and_then(|id| self.tree.node(id))
                        .is_some_and(|node| node.kind == NodeKind::HardLink(target.clone()))
                })
                .collect();
            let Some((heir, rest)) = alive.split_first() else {
                continue;
            };
            let Some(file) = self
                .tree
                .lookup(&target)
                .and_then(|id| self.tree.node(id))
                .cloned()
            else {
                continue;
            };
            if let Some(node) = self.tree.lookup(heir).and_then(|id| self.tree.node_mut(id)) {
                node.kind = file.kind;
                node.meta = file.meta;
            }
            for other in rest {
                if let Some(node) = self
                    .tree
                    .lookup(other)
                    .and_then(|id| self.tree.node_mut(id))
                {
                    node.kind = NodeKind::HardLink(heir.clone());
                }
            }
            if !rest.is_empty() {
                self.links.insert(heir.clone(), rest.to_vec());
            }
        }
        // Links whose own name is going away leave their groups.
        for names in self.links.values_mut() {
            names.retain(|n| !is_under(n, prefix));
        }
    }
}

/// The proper ancestors of `path` (`a`, `a/b` for `a/b/c`), shortest first.
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(move |(i, _)| &path[..i])
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, size: u64) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind: NodeKind::File { size, span: None },
            meta: Metadata::default(),
        }
    }
    fn d(path: &str) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind: NodeKind::Dir,
            meta: Metadata {
                mode: 0o700,
                ..Metadata::default()
            },
        }
    }
    fn l(path: &str, target: &str) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind: NodeKind::HardLink(target.into()),
            meta: Metadata::default(),
        }
    }
    fn size(m: &Merger, p: &str) -> Option<u64> {
        match &m.tree().node(m.tree().lookup(p.as_bytes())?)?.kind {
            NodeKind::File { size, .. } => Some(*size),
            NodeKind::HardLink(t) => size(m, std::str::from_utf8(t).ok()?),
            _ => None,
        }
    }

    #[test]
    fn whiteouts_and_opaque_markers_act_on_lower_layers_only() {
        let mut m = Merger::new();
        m.apply(&[
            d("a"),
            f("a/x", 1),
            f("a/y", 2),
            d("o"),
            f("o/low", 3),
            f("gone", 4),
        ])
        .unwrap();
        m.apply(&[
            f("a/.wh.x", 0),
            f("o/.wh..wh..opq", 0),
            f("o/new", 5),
            f("gone", 9),
            f(".wh.gone", 0),
        ])
        .unwrap();
        assert_eq!(size(&m, "a/x"), None);
        assert_eq!(size(&m, "a/y"), Some(2));
        assert_eq!(size(&m, "o/low"), None);
        assert_eq!(size(&m, "o/new"), Some(5));
        assert_eq!(
            size(&m, "gone"),
            Some(9),
            "a same-layer entry survives its whiteout"
        );
        m.apply(&[f("a/x", 7)]).unwrap();
        assert_eq!(size(&m, "a/x"), Some(7));
    }

    #[test]
    fn a_removed_directory_needed_again_as_an_implicit_parent_keeps_its_metadata() {
        fn meta(m: &Merger, p: &str) -> Metadata {
            m.tree()
                .node(m.tree().lookup(p.as_bytes()).unwrap())
                .unwrap()
                .meta
                .clone()
        }
        let mut m = Merger::new();
        let sticky = |p: &str| LayerEntry {
            meta: Metadata {
                mode: 0o1777,
                uid: 7,
                ..Metadata::default()
            },
            ..d(p)
        };
        m.apply(&[
            d("p"),
            sticky("p/d"),
            f("p/d/old", 1),
            d("p/d/e"),
            d("q"),
            d("q/w"),
        ])
        .unwrap();
        // Opaque p, then a new file two levels below it with no directory entries; and a
        // whiteout of q/w with a new entry below it.
        m.apply(&[
            f("p/.wh..wh..opq", 0),
            f("p/d/e/new", 2),
            f("q/.wh.w", 0),
            f("q/w/x", 3),
        ])
        .unwrap();
        assert_eq!((meta(&m, "p/d").mode, meta(&m, "p/d").uid), (0o1777, 7));
        assert_eq!(meta(&m, "p/d/e").mode, 0o700);
        assert_eq!(meta(&m, "q/w").mode, 0o700);
        assert_eq!(size(&m, "p/d/old"), None, "lower contents stay removed");
        assert_eq!(size(&m, "p/d/e/new"), Some(2));
        // A directory entry of the layer itself still wins.
        m.apply(&[f("p/.wh..wh..opq", 0), f("p/d/z", 1), d("p/d")])
            .unwrap();
        assert_eq!(meta(&m, "p/d").mode, 0o700);
        // Never removed: implicit parents are fresh.
        m.apply(&[f("fresh/x", 1)]).unwrap();
        assert_eq!(meta(&m, "fresh").mode, Metadata::implicit_dir().mode);
    }

    #[test]
    fn replacement_rules() {
        let mut m = Merger::new();
        m.apply(&[d("d"), f("d/in", 1), f("file", 1)]).unwrap();
        m.apply(&[f("d", 2), d("file"), f("file/child", 3), d("./")])
            .unwrap();
        assert_eq!(size(&m, "d"), Some(2));
        assert!(m.tree().lookup(b"d/in").is_none());
        assert_eq!(size(&m, "file/child"), Some(3));
        assert!(m.apply(&[f("../escape", 1)]).is_err());
        m.apply(&[f("/abs/olute", 1)]).unwrap();
        assert_eq!(size(&m, "abs/olute"), Some(1));
    }

    #[test]
    fn hard_link_groups_survive_the_replacement_of_their_first_name() {
        let mut m = Merger::new();
        m.apply(&[f("a", 10), l("b", "a"), l("c", "b")]).unwrap();
        assert_eq!(
            m.tree().node(m.tree().lookup(b"c").unwrap()).unwrap().kind,
            NodeKind::HardLink(b"a".to_vec())
        );
        m.apply(&[f("a", 99)]).unwrap();
        assert_eq!(size(&m, "a"), Some(99));
        assert_eq!(size(&m, "b"), Some(10));
        assert_eq!(
            m.tree().node(m.tree().lookup(b"c").unwrap()).unwrap().kind,
            NodeKind::HardLink(b"b".to_vec())
        );
        m.apply(&[f(".wh.b", 0)]).unwrap();
        assert_eq!(size(&m, "c"), Some(10));
        assert!(m.apply(&[l("x", "missing")]).is_err());
    }
}
