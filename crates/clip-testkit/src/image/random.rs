//! Seeded random many-layer images for differential tests against the reference unpacker.
//!
//! Each layer is a random mix of what real images are made of: new and rewritten files (setuid,
//! setgid, odd modes, owners, xattrs, empty files), directories with and without their own
//! entries (implicit parents), symlinks, hard links within a layer and to files of lower layers,
//! whiteouts, opaque directories — including a directory hidden by its parent's opaque marker and
//! needed again only as the parent of a new entry — mode and owner changes, type changes (a file
//! becoming a directory and back) and duplicate entries in one tar (the last one wins).
//!
//! The generator keeps a model of the merged tree so that every operation is meaningful (a
//! whiteout names something below, a hard link names a file that exists), and it avoids the few
//! layers whose meaning depends on the unpacker's entry order rather than on the OCI rules:
//! whiteouts and opaque markers are written after the layer's other entries (umoci applies a
//! whiteout only to paths the layer has not written yet), nothing is written beneath a symlink,
//! and a hard link never names a file the same layer whites out.

use std::collections::{BTreeMap, BTreeSet};

use super::{Entry, Image, Layer};

/// What the generator knows of a path of the merged tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File,
    Dir,
    Symlink,
}

/// A small deterministic PRNG (`SplitMix64`).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const TOP: [&str; 4] = ["etc", "usr", "var", "opt"];
const NAMES: [&str; 6] = ["a", "b", "c", "lib", "share", "x.conf"];
const FILE_MODES: [u32; 7] = [0o644, 0o600, 0o755, 0o4755, 0o2755, 0o444, 0o640];
const DIR_MODES: [u32; 6] = [0o755, 0o700, 0o1777, 0o2775, 0o750, 0o711];
const OWNERS: [(u64, u64); 3] = [(0, 0), (1000, 1000), (33, 33)];

/// Options of [`random_image`].
#[derive(Debug, Clone, Copy)]
pub struct RandomImageOptions {
    /// The seed: the same seed gives the same image.
    pub seed: u64,
    /// Number of layers.
    pub layers: usize,
    /// Most operations per layer (at least one each).
    pub max_ops: usize,
}

/// A random image (gzip layers) and a one-line-per-layer description of what each layer does,
/// for failure messages.
#[must_use]
pub fn random_image(opts: RandomImageOptions) -> (Image, Vec<String>) {
    let mut g = Gen {
        rng: Rng(opts.seed ^ 0x5eed_c11b),
        tree: BTreeMap::new(),
        layer: 0,
    };
    let mut layers = Vec::with_capacity(opts.layers);
    let mut log = Vec::with_capacity(opts.layers);
    for i in 0..opts.layers {
        g.layer = i;
        let (entries, what) = g.layer(opts.max_ops);
        log.push(format!("layer {i}: {}", what.join("; ")));
        layers.push(Layer::new(entries));
    }
    (Image::new(layers), log)
}

struct Gen {
    rng: Rng,
    tree: BTreeMap<String, Node>,
    layer: usize,
}

/// One layer in the making.
#[derive(Default)]
struct Pending {
    entries: Vec<Entry>,
    /// Whiteouts and opaque markers, written last.
    hides: Vec<Entry>,
    /// Paths the layer hides (whiteout targets, opaque directories).
    hidden: BTreeSet<String>,
    /// Lower files and symlinks the layer's hides remove: still on disk while the layer's
    /// entries are unpacked (hides come last), so nothing may be written beneath them.
    gone: BTreeSet<String>,
    /// Paths the layer writes.
    written: BTreeSet<String>,
    /// Files named by hard links of this layer.
    linked: BTreeSet<String>,
    what: Vec<String>,
}

fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

impl Gen {
    fn layer(&mut self, max_ops: usize) -> (Vec<Entry>, Vec<String>) {
        let mut p = Pending::default();
        let ops = 1 + self.rng.below(max_ops);
        for _ in 0..ops {
            match self.rng.below(100) {
                0..=29 => self.add_file(&mut p),
                30..=39 => self.add_dir(&mut p),
                40..=46 => self.add_symlink(&mut p),
                47..=54 => self.add_hardlink(&mut p),
                55..=64 => self.whiteout(&mut p),
                65..=71 => self.opaque(&mut p),
                72..=79 => self.chmod(&mut p),
                80..=87 => self.type_change(&mut p),
                _ => self.duplicate(&mut p),
            }
        }
        if p.entries.is_empty() && p.hides.is_empty() {
            self.add_file(&mut p);
        }
        let mut entries = p.entries;
        entries.extend(p.hides);
        (entries, p.what)
    }

    fn random_path(&mut self) -> String {
        let depth = 1 + self.rng.below(3);
        let mut path = (*self.rng.pick(&TOP)).to_owned();
        for _ in 0..depth {
            path.push('/');
            let name: &&str = self.rng.pick(&NAMES);
            path.push_str(name);
        }
        path
    }

    /// Whether an entry may be written at `path` this layer: every ancestor is a directory or
    /// absent (never beneath a symlink or a file, not even one this layer hides), and no hard
    /// link of this layer names it.
    fn writable(&self, p: &Pending, path: &str) -> bool {
        ancestors(path)
            .all(|a| matches!(self.tree.get(a), None | Some(Node::Dir)) && !p.gone.contains(a))
            && !p.linked.contains(path)
            && !p.hidden.contains(path)
    }

    /// Notes the lower non-directories at or below `path` before the model forgets them.
    fn note_gone(&self, p: &mut Pending, path: &str, self_too: bool) {
        let prefix = format!("{path}/");
        for (k, n) in &self.tree {
            if *n != Node::Dir
                && ((self_too && k == path) || k.starts_with(prefix.as_str()))
                && !p.written.contains(k.as_str())
            {
                p.gone.insert(k.clone());
            }
        }
    }

    /// Makes sure `path`'s parents exist: each missing one either gets its own entry or stays
    /// implicit.
    fn parents(&mut self, p: &mut Pending, path: &str) {
        for a in ancestors(path).map(str::to_owned).collect::<Vec<_>>() {
            if self.tree.get(&a) == Some(&Node::Dir) {
                continue;
            }
            if self.rng.chance(50) {
                let mode = *self.rng.pick(&DIR_MODES);
                p.entries.push(Entry::dir(&a).mode(mode));
                p.written.insert(a.clone());
            }
            self.tree.insert(a, Node::Dir);
        }
    }

    fn file_entry(&mut self, path: &str) -> Entry {
        let len = if self.rng.chance(15) {
            0
        } else {
            self.rng.below(3000)
        };
        let seed = self.rng.next();
        let mut e =
            Entry::file(path, super::random_bytes(seed, len)).mode(*self.rng.pick(&FILE_MODES));
        let (u, g) = *self.rng.pick(&OWNERS);
        e = e.owner(u, g);
        if self.rng.chance(15) {
            e = e.xattr("user.clip.random", format!("layer {}", self.layer));
        }
        if self.rng.chance(20) {
            e = e.mtime(1_600_000_000 + self.rng.next() % 100_000_000, 0);
        }
        e
    }

    /// Drops `path` and everything below it from the model.
    fn forget(&mut self, path: &str) {
        let prefix = format!("{path}/");
        self.tree
            .retain(|k, _| k != path && !k.starts_with(prefix.as_str()));
    }

    fn add_file(&mut self, p: &mut Pending) {
        let path = self.random_path();
        if !self.writable(p, &path) || self.tree.get(&path) == Some(&Node::Dir) {
            return;
        }
        self.parents(p, &path);
        let e = self.file_entry(&path);
        p.what.push(format!("file {path} {:o}", e.mode));
        p.entries.push(e);
        p.written.insert(path.clone());
        self.tree.insert(path, Node::File);
    }

    fn add_dir(&mut self, p: &mut Pending) {
        let path = self.random_path();
        if !self.writable(p, &path)
            || matches!(self.tree.get(&path), Some(Node::File | Node::Symlink))
        {
            return;
        }
        self.parents(p, &path);
        let mode = *self.rng.pick(&DIR_MODES);
        let (u, g) = *self.rng.pick(&OWNERS);
        let mut e = Entry::dir(&path).mode(mode).owner(u, g);
        if self.rng.chance(20) {
            e = e.xattr("user.clip.dir", "d");
        }
        p.what.push(format!("dir {path} {mode:o}"));
        p.entries.push(e);
        p.written.insert(path.clone());
        self.tree.insert(path, Node::Dir);
    }

    fn add_symlink(&mut self, p: &mut Pending) {
        let path = self.random_path();
        if !self.writable(p, &path) || self.tree.get(&path) == Some(&Node::Dir) {
            return;
        }
        self.parents(p, &path);
        let target = match self.rng.below(3) {
            0 => "../a".to_owned(),
            1 => format!("/{}", self.random_path()),
            _ => (*self.rng.pick(&NAMES)).to_owned(),
        };
        p.what.push(format!("symlink {path} -> {target}"));
        p.entries.push(Entry::symlink(&path, &target));
        p.written.insert(path.clone());
        self.tree.insert(path, Node::Symlink);
    }

    fn add_hardlink(&mut self, p: &mut Pending) {
        // A file of this layer or below that this layer does not hide.
        let files: Vec<String> = self
            .tree
            .iter()
            .filter(|(_, n)| **n == Node::File)
            .map(|(k, _)| k.clone())
            .collect();
        if files.is_empty() {
            return;
        }
        let target = self.rng.pick(&files).clone();
        let path = self.random_path();
        if path == target
            || !self.writable(p, &path)
            || self.tree.get(&path) == Some(&Node::Dir)
            || p.linked.contains(&path)
        {
            return;
        }
        self.parents(p, &path);
        p.what.push(format!("hardlink {path} => {target}"));
        p.entries.push(Entry::hardlink(&path, &target));
        p.written.insert(path.clone());
        p.linked.insert(target);
        self.tree.insert(path, Node::File);
    }

    /// A path of the model the layer has not written, and that neither is nor contains a file
    /// this layer's hard links name (a whiteout must not take a link's target away).
    fn lower_path(&mut self, p: &Pending, want_dir: bool) -> Option<String> {
        let candidates: Vec<String> = self
            .tree
            .iter()
            .filter(|(k, n)| (!want_dir || **n == Node::Dir) && !p.written.contains(k.as_str()))
            .filter(|(k, _)| {
                let prefix = format!("{k}/");
                !p.linked
                    .iter()
                    .any(|l| l == *k || l.starts_with(prefix.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        (!candidates.is_empty()).then(|| self.rng.pick(&candidates).clone())
    }

    fn whiteout(&mut self, p: &mut Pending) {
        let Some(path) = self.lower_path(p, false) else {
            return;
        };
        p.what.push(format!("whiteout {path}"));
        p.hides.push(Entry::whiteout(&path));
        p.hidden.insert(path.clone());
        self.note_gone(p, &path, true);
        // Whiteouts act on lower layers only: what this layer wrote there stays.
        let prefix = format!("{path}/");
        let keep: Vec<String> = p
            .written
            .iter()
            .filter(|w| *w == &path || w.starts_with(prefix.as_str()))
            .cloned()
            .collect();
        let kept: Vec<(String, Node)> = keep
            .iter()
            .filter_map(|k| self.tree.get(k).map(|n| (k.clone(), *n)))
            .collect();
        self.forget(&path);
        for (k, n) in kept {
            for a in ancestors(&k) {
                self.tree.entry(a.to_owned()).or_insert(Node::Dir);
            }
            self.tree.insert(k, n);
        }
    }

    fn opaque(&mut self, p: &mut Pending) {
        let Some(dir) = self.lower_path(p, true) else {
            return;
        };
        p.what.push(format!("opaque {dir}"));
        p.hides.push(Entry::opaque(&dir));
        self.note_gone(p, &dir, false);
        let prefix = format!("{dir}/");
        let kept: Vec<(String, Node)> = self
            .tree
            .iter()
            .filter(|(k, _)| k.starts_with(prefix.as_str()) && p.written.contains(k.as_str()))
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        // A lower subdirectory needed again below, as the implicit parent of a new file.
        let revive = self
            .tree
            .iter()
            .filter(|(k, n)| {
                **n == Node::Dir
                    && k.starts_with(prefix.as_str())
                    && !p.written.contains(k.as_str())
            })
            .map(|(k, _)| k.clone())
            .next();
        self.tree.retain(|k, _| !k.starts_with(prefix.as_str()));
        for (k, n) in kept {
            for a in ancestors(&k) {
                self.tree.entry(a.to_owned()).or_insert(Node::Dir);
            }
            self.tree.insert(k, n);
        }
        if let Some(sub) = revive
            && self.rng.chance(70)
        {
            let path = format!("{sub}/new-{}", self.layer);
            for a in ancestors(&path) {
                self.tree.entry(a.to_owned()).or_insert(Node::Dir);
            }
            let e = self.file_entry(&path);
            p.what.push(format!("file {path} below the opaque {dir}"));
            p.entries.push(e);
            p.written.insert(path.clone());
            self.tree.insert(path, Node::File);
        }
        // The opaque directory itself is not rewritten this layer.
        p.hidden.insert(dir);
    }

    fn chmod(&mut self, p: &mut Pending) {
        let Some(path) = self.lower_path(p, false) else {
            return;
        };
        if !self.writable(p, &path) {
            return;
        }
        let (u, g) = *self.rng.pick(&OWNERS);
        match self.tree.get(&path) {
            Some(Node::Dir) => {
                let mode = *self.rng.pick(&DIR_MODES);
                p.what.push(format!("chmod dir {path} {mode:o}"));
                p.entries.push(Entry::dir(&path).mode(mode).owner(u, g));
            }
            Some(Node::File) => {
                let e = self.file_entry(&path);
                p.what.push(format!("rewrite {path} {:o}", e.mode));
                p.entries.push(e);
            }
            _ => return,
        }
        p.written.insert(path);
    }

    fn type_change(&mut self, p: &mut Pending) {
        let Some(path) = self.lower_path(p, false) else {
            return;
        };
        if !self.writable(p, &path) {
            return;
        }
        match self.tree.get(&path) {
            Some(Node::File | Node::Symlink) => {
                p.what.push(format!("{path} becomes a directory"));
                p.entries
                    .push(Entry::dir(&path).mode(*self.rng.pick(&DIR_MODES)));
                self.tree.insert(path.clone(), Node::Dir);
            }
            Some(Node::Dir) => {
                // The directory and everything in it go; this layer must not have written below.
                let prefix = format!("{path}/");
                if p.written.iter().any(|w| w.starts_with(prefix.as_str()))
                    || p.linked.iter().any(|w| w.starts_with(prefix.as_str()))
                {
                    return;
                }
                let e = self.file_entry(&path);
                p.what.push(format!("directory {path} becomes a file"));
                p.entries.push(e);
                self.forget(&path);
                self.tree.insert(path.clone(), Node::File);
            }
            None => return,
        }
        p.written.insert(path);
    }

    fn duplicate(&mut self, p: &mut Pending) {
        let path = self.random_path();
        if !self.writable(p, &path) || self.tree.get(&path) == Some(&Node::Dir) {
            return;
        }
        self.parents(p, &path);
        let first = self.file_entry(&path);
        let second = self.file_entry(&path);
        p.what.push(format!("{path} written twice"));
        p.entries.push(first);
        p.entries.push(second);
        p.written.insert(path.clone());
        self.tree.insert(path, Node::File);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_image() {
        let o = RandomImageOptions {
            seed: 7,
            layers: 40,
            max_ops: 8,
        };
        let (a, la) = random_image(o);
        let (b, lb) = random_image(o);
        assert_eq!(a, b);
        assert_eq!(la, lb);
        let (c, _) = random_image(RandomImageOptions { seed: 8, ..o });
        assert_ne!(a, c);
        let text = la.join("\n");
        for op in ["whiteout", "opaque", "hardlink", "becomes", "twice"] {
            assert!(text.contains(op), "{op} never generated:\n{text}");
        }
    }
}
