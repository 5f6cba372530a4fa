//! The snapshot logic, apart from gRPC and from how lazy trees are made: containerd's overlay
//! model, plus committed snapshots that stand for layers of lazily pulled images.
//!
//! Ordinary snapshots are containerd's overlay model: each has `<root>/snapshots/<id>/fs` (its
//! changes) and `work`; an active snapshot mounts as overlay with its committed ancestors' `fs`
//! directories as lower layers (a bind mount when it has none), a view likewise read-only.
//!
//! Lazy pull: a `Prepare` that carries `containerd.io/snapshot.ref` (the chain id it is to be
//! committed as) and the image labels of a layer the [`Trees`] admit records a committed
//! snapshot under that name ([`Prepared::CommittedLazily`], containerd's `AlreadyExists`), so
//! containerd fetches nothing. A snapshot prepared on top of such a chain gets, as its lowest
//! layer, the mount of that chain's tree (made once per image and depth, however many
//! containers use it), below any ordinary snapshots stacked on it. A tree is unmounted when no
//! snapshot needs it any more.
//!
//! Every method blocks (metadata saves fsync; trees index and mount): the gRPC edge
//! ([`crate::service`]) calls them off its async threads. Errors are [`SnapshotError`]s, which
//! become gRPC statuses only at that edge.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::api::containerd::types::Mount;
use crate::filter::Filters;
use crate::lazy::{LazyError, labels};
use crate::meta::{Kind, LazyLayer, MetaError, MountKey, MountRecord, Snapshot, State, now};

/// Where lazy trees come from: which layers can be served lazily, and the mounts that serve
/// them. [`crate::lazy::Lazy`] is the real one (registry, indexer, mount server processes).
pub trait Trees: Send + Sync {
    /// The lazy layer a `Prepare`'s `labels` describe, sitting on a lazy tree of
    /// `parent_depth` layers (0: none), with its content checked against the chain id it is to
    /// be committed under. Any error means "not lazy": an ordinary snapshot is prepared.
    fn admit(
        &self,
        labels: &BTreeMap<String, String>,
        parent_depth: usize,
    ) -> Result<LazyLayer, LazyError>;

    /// Mounts `layer`'s tree unless it is mounted, and says where.
    fn ensure_mounted(&self, layer: &LazyLayer) -> Result<MountRecord, LazyError>;

    /// Whether the mount `record` names still answers (a dead one is detached).
    fn is_live(&self, record: &MountRecord) -> bool;

    /// Unmounts `key`'s tree.
    fn unmount(&self, key: &MountKey);

    /// Removes what no snapshot needs: anything of trees outside `keep`, and mounts not in
    /// `mounted`.
    fn collect(&self, keep: &HashSet<MountKey>, mounted: &HashSet<MountKey>);
}

/// Why a snapshot operation failed; [`crate::service`] maps each to containerd's gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No such snapshot.
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    /// The parent named does not exist.
    #[error("parent snapshot {0} does not exist (in this snapshotter)")]
    ParentNotFound(String),
    /// The name is taken.
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The snapshot is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A lazy tree could not be mounted.
    #[error(transparent)]
    Lazy(#[from] LazyError),
    /// The metadata could not be loaded or saved.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A state directory is not safe to use.
    #[error(transparent)]
    Host(#[from] clip_core::host::HostError),
    /// Local I/O.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What a `Prepare` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// An active snapshot, mounted like this.
    Mounts(Vec<Mount>),
    /// The layer was committed lazily under its target name: containerd's `AlreadyExists`,
    /// which tells it to fetch and unpack nothing.
    CommittedLazily {
        /// The target (chain id).
        target: String,
    },
}

/// The snapshots of one snapshotter, persisted under `root`.
pub struct Snapshots {
    root: PathBuf,
    state: Mutex<State>,
    trees: Box<dyn Trees>,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Snapshots {
    /// The snapshots under `root` (created `0700`), their lazy trees from `trees`. Mounts
    /// recorded by an earlier run are adopted when alive; dead ones that snapshots still need
    /// are mounted again.
    pub fn open(root: &Path, trees: Box<dyn Trees>) -> Result<Self, SnapshotError> {
        for d in [root.to_owned(), root.join("snapshots")] {
            clip_core::host::private_dir(&d)?;
        }
        let state = State::load(&root.join("metadata.json"))?;
        let me = Self {
            root: root.to_owned(),
            state: Mutex::new(state),
            trees,
        };
        me.adopt_mounts();
        Ok(me)
    }

    /// Where the state lives.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, st: &State) -> Result<(), SnapshotError> {
        Ok(st.save(&self.root.join("metadata.json"))?)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// A copy of snapshot `key`'s record.
    pub fn stat(&self, key: &str) -> Result<Snapshot, SnapshotError> {
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))
    }

    /// After a restart: keep mounts whose servers live on, remount the dead ones snapshots
    /// still need, forget the rest.
    fn adopt_mounts(&self) {
        let (needed, records) = {
            let st = self.lock();
            (st.needed_mounts(), st.mounts.clone())
        };
        let mut alive = Vec::new();
        for r in records {
            if self.trees.is_live(&r) {
                tracing::info!(mountpoint = %r.mountpoint.display(), "adopted a live lazy mount");
                alive.push(r);
                continue;
            }
            if !needed.contains(&r.key) {
                continue;
            }
            let lazy = find_lazy(&self.lock(), &r.key);
            match lazy.map(|l| self.trees.ensure_mounted(&l)) {
                Some(Ok(rec)) => {
                    tracing::info!(mountpoint = %rec.mountpoint.display(), "remounted a dead lazy mount");
                    alive.push(rec);
                }
                Some(Err(e)) => {
                    tracing::warn!(mountpoint = %r.mountpoint.display(), error = %e, "could not remount a dead lazy mount");
                }
                None => {}
            }
        }
        let mut st = self.lock();
        st.mounts = alive;
        if let Err(e) = self.save(&st) {
            tracing::warn!(error = %e, "saving snapshot metadata");
        }
    }

    /// The lower directories of a snapshot on `parent`, nearest first: the ordinary committed
    /// ancestors' `fs`, then the lazy base's mount (mounted here if it is not).
    fn lowers(&self, parent: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let (mut lowers, lazy) = {
            let st = self.lock();
            let mut lowers = Vec::new();
            let mut lazy = None;
            for a in st.chain(parent) {
                if let Some(l) = &a.lazy {
                    lazy = Some(l.clone());
                    break;
                }
                lowers.push(self.dir(a.id).join("fs"));
            }
            (lowers, lazy)
        };
        if let Some(l) = lazy {
            let rec = self.trees.ensure_mounted(&l)?;
            lowers.push(rec.mountpoint.clone());
            let mut st = self.lock();
            if !st.mounts.iter().any(|m| m.key == rec.key) {
                st.mounts.push(rec);
                self.save(&st)?;
            }
        }
        Ok(lowers)
    }

    /// The mounts of active or view snapshot `s`.
    pub fn mounts_of(&self, s: &Snapshot) -> Result<Vec<Mount>, SnapshotError> {
        if s.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {} is committed: it has no mounts",
                s.name
            )));
        }
        let lowers = self.lowers(&s.parent)?;
        Ok(vec![mount_for(s.kind, &self.dir(s.id), &lowers)])
    }

    /// The mounts of snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let s = self.stat(key)?;
        self.mounts_of(&s)
    }

    /// containerd's `Prepare`: a lazy commit when the labels name a layer the trees admit,
    /// otherwise an active snapshot.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Prepared, SnapshotError> {
        if let Some(target) = labels.get(labels::TARGET).cloned()
            && self.prepare_lazy(key, parent, &target, &labels)?
        {
            return Ok(Prepared::CommittedLazily { target });
        }
        self.create(key, parent, Kind::Active, labels)
            .map(Prepared::Mounts)
    }

    /// containerd's `View`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(key, parent, Kind::View, labels)
    }

    /// Creates an active or view snapshot and returns its mounts; nothing is left behind if
    /// mounting its lower layers fails.
    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let snap = {
            let mut st = self.lock();
            check_new(&st, key, parent)?;
            let id = st.next_id;
            st.next_id += 1;
            let t = now();
            Snapshot {
                id,
                name: key.to_owned(),
                parent: parent.to_owned(),
                kind,
                labels,
                created: t,
                updated: t,
                lazy: None,
            }
        };
        let dir = self.dir(snap.id);
        for d in [dir.join("fs"), dir.join("work")] {
            std::fs::create_dir_all(&d).map_err(|source| SnapshotError::Io {
                context: "creating",
                path: d.clone(),
                source,
            })?;
        }
        let done = self.mounts_of(&snap).and_then(|mounts| {
            let mut st = self.lock();
            check_new(&st, key, parent)?;
            st.snapshots.insert(key.to_owned(), snap);
            self.save(&st)?;
            Ok(mounts)
        });
        if done.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let mounts = done?;
        metrics::counter!("clip_snapshotter_snapshots_created_total", "kind" => kind.as_str())
            .increment(1);
        Ok(mounts)
    }

    /// A lazy `Prepare`: `Ok(true)` when the layer was committed lazily under `target` (or is
    /// already committed there), `Ok(false)` to prepare an ordinary snapshot.
    fn prepare_lazy(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, SnapshotError> {
        let parent_depth = {
            let st = self.lock();
            check_new(&st, key, parent)?;
            if st
                .get(target)
                .is_some_and(|t| t.kind == Kind::Committed && t.parent == parent)
            {
                return Ok(true);
            }
            match st.get(parent).map(|p| p.lazy.as_ref()) {
                None => 0,
                Some(Some(l)) => l.depth,
                Some(None) => {
                    tracing::info!(key, target, "layer not lazy: its parent was unpacked");
                    return Ok(false);
                }
            }
        };
        // Anything that keeps this layer from being served lazily — labels that do not fit,
        // a registry that refuses or fails (a pull secret this node lacks, 429), content whose
        // diff_id is not the one its chain id promises — means an ordinary snapshot: containerd
        // fetches and unpacks the layer itself. Never a failed pull that could be served.
        let layer = match self.trees.admit(labels, parent_depth) {
            Ok(l) => l,
            Err(why) => {
                tracing::info!(key, target, reason = %why, "layer not lazy; preparing an ordinary snapshot");
                metrics::counter!("clip_snapshotter_not_lazy_total").increment(1);
                return Ok(false);
            }
        };
        let mut st = self.lock();
        if st.get(target).is_some() {
            return Ok(true);
        }
        let id = st.next_id;
        st.next_id += 1;
        let t = now();
        st.snapshots.insert(
            target.to_owned(),
            Snapshot {
                id,
                name: target.to_owned(),
                parent: parent.to_owned(),
                kind: Kind::Committed,
                labels: labels.clone(),
                created: t,
                updated: t,
                lazy: Some(layer.clone()),
            },
        );
        self.save(&st)?;
        drop(st);
        metrics::counter!("clip_snapshotter_lazy_layers_total").increment(1);
        tracing::info!(target, image = %layer.image, depth = layer.depth, "layer committed lazily: content checked, nothing to fetch");
        Ok(true)
    }

    /// containerd's `Commit`: active snapshot `key` becomes committed snapshot `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let mut st = self.lock();
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument("commit needs a name".into()));
        }
        if st.get(name).is_some() {
            return Err(SnapshotError::AlreadyExists(name.to_owned()));
        }
        let mut s = st
            .snapshots
            .get(key)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))?;
        if s.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        st.snapshots.remove(key);
        name.clone_into(&mut s.name);
        s.kind = Kind::Committed;
        s.labels.extend(labels);
        s.updated = now();
        st.snapshots.insert(name.to_owned(), s);
        self.save(&st)
    }

    /// containerd's `Remove`: the snapshot, its files, and the trees nothing needs any more.
    pub fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let dir = {
            let mut st = self.lock();
            let s = st
                .get(key)
                .cloned()
                .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))?;
            if st.has_children(key) {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} has children"
                )));
            }
            st.snapshots.remove(key);
            self.save(&st)?;
            self.dir(s.id)
        };
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a snapshot's files (Cleanup retries)");
        }
        self.release_mounts();
        Ok(())
    }

    /// containerd's `Update`: labels only, all of them (`paths` empty or `labels`) or the
    /// `labels.KEY` named.
    pub fn update(
        &self,
        name: &str,
        new_labels: &BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot, SnapshotError> {
        let mut st = self.lock();
        let s = st
            .snapshots
            .get_mut(name)
            .ok_or_else(|| SnapshotError::NotFound(name.to_owned()))?;
        if paths.is_empty() {
            s.labels.clone_from(new_labels);
        }
        for p in paths {
            if p == "labels" {
                s.labels.clone_from(new_labels);
            } else if let Some(k) = p.strip_prefix("labels.") {
                match new_labels.get(k) {
                    Some(v) => {
                        s.labels.insert(k.to_owned(), v.clone());
                    }
                    None => {
                        s.labels.remove(k);
                    }
                }
            } else {
                return Err(SnapshotError::InvalidArgument(format!(
                    "cannot update field {p} (only labels)"
                )));
            }
        }
        s.updated = now();
        let out = s.clone();
        self.save(&st)?;
        Ok(out)
    }

    /// containerd's `List` (Walk): the snapshots any of `filters` matches.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Snapshot>, SnapshotError> {
        let filters =
            Filters::parse(filters).map_err(|e| SnapshotError::InvalidArgument(e.to_string()))?;
        Ok(self
            .lock()
            .snapshots
            .values()
            .filter(|s| filters.matches(s))
            .cloned()
            .collect())
    }

    /// containerd's `Usage`: bytes and inodes of the snapshot's own changes (a lazy layer
    /// holds none on this node).
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapshotError> {
        let s = self.stat(key)?;
        Ok(if s.lazy.is_some() {
            (0, 0)
        } else {
            usage(&self.dir(s.id).join("fs"))
        })
    }

    /// containerd's `Cleanup`: snapshot directories no snapshot names, trees nothing needs,
    /// and what the trees left behind.
    pub fn cleanup(&self) {
        let ids: HashSet<String> = self
            .lock()
            .snapshots
            .values()
            .map(|s| s.id.to_string())
            .collect();
        for e in std::fs::read_dir(self.root.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if !ids.contains(&*e.file_name().to_string_lossy()) {
                tracing::info!(dir = %e.path().display(), "cleanup: removing an unused snapshot directory");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        self.release_mounts();
        let (keep, mounted) = {
            let st = self.lock();
            let keep = st
                .snapshots
                .values()
                .filter_map(|s| s.lazy.as_ref().map(LazyLayer::mount_key))
                .chain(st.needed_mounts())
                .collect();
            let mounted = st.mounts.iter().map(|m| m.key.clone()).collect();
            (keep, mounted)
        };
        self.trees.collect(&keep, &mounted);
    }

    /// Unmounts the trees no snapshot needs any more.
    fn release_mounts(&self) {
        let unneeded = {
            let mut st = self.lock();
            let needed = st.needed_mounts();
            let (keep, unneeded): (Vec<_>, Vec<_>) = std::mem::take(&mut st.mounts)
                .into_iter()
                .partition(|m| needed.contains(&m.key));
            st.mounts = keep;
            if let Err(e) = self.save(&st) {
                tracing::warn!(error = %e, "saving snapshot metadata");
            }
            unneeded
        };
        for m in unneeded {
            self.trees.unmount(&m.key);
        }
    }
}

/// The mount of a snapshot of `kind` whose directory is `dir`, on `lowers` (nearest first).
fn mount_for(kind: Kind, dir: &Path, lowers: &[PathBuf]) -> Mount {
    let fs = dir.join("fs");
    let lowerdir = || {
        let joined: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        format!("lowerdir={}", joined.join(":"))
    };
    let bind = |source: &Path, mode: &str| Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![mode.into(), "rbind".into()],
    };
    let overlay = |options: Vec<String>| Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    };
    match (kind, lowers) {
        (Kind::Active, []) => bind(&fs, "rw"),
        (Kind::Active, _) => overlay(vec![
            format!("workdir={}", dir.join("work").display()),
            format!("upperdir={}", fs.display()),
            lowerdir(),
        ]),
        (_, []) => bind(&fs, "ro"),
        (_, [one]) => bind(one, "ro"),
        _ => overlay(vec![lowerdir()]),
    }
}

fn find_lazy(st: &State, key: &MountKey) -> Option<LazyLayer> {
    st.snapshots
        .values()
        .filter_map(|s| s.lazy.as_ref())
        .find(|l| l.manifest == key.manifest && l.depth >= key.depth)
        .map(|l| LazyLayer {
            depth: key.depth,
            ..l.clone()
        })
}

fn check_new(st: &State, key: &str, parent: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument(
            "a snapshot needs a key".into(),
        ));
    }
    if st.get(key).is_some() {
        return Err(SnapshotError::AlreadyExists(key.to_owned()));
    }
    match st.get(parent) {
        _ if parent.is_empty() => Ok(()),
        None => Err(SnapshotError::ParentNotFound(parent.to_owned())),
        Some(p) if p.kind != Kind::Committed => Err(SnapshotError::FailedPrecondition(format!(
            "parent snapshot {parent} is not committed"
        ))),
        Some(_) => Ok(()),
    }
}

/// Disk usage of a directory tree: bytes allocated and inodes (hard links counted once).
fn usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt as _;
    let mut size = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_owned()];
    let mut seen = HashSet::new();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if seen.insert((md.dev(), md.ino())) {
                inodes += 1;
                size += md.blocks() * 512;
            }
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (
        i64::try_from(size).unwrap_or(i64::MAX),
        i64::try_from(inodes).unwrap_or(i64::MAX),
    )
}

#[cfg(test)]
mod tests;
