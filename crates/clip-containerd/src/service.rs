//! containerd's snapshots service: ordinary overlay snapshots, plus committed snapshots that
//! stand for layers of lazily pulled images.
//!
//! Ordinary snapshots are containerd's overlay model: each has `<root>/snapshots/<id>/fs` (its
//! changes) and `work`; an active snapshot mounts as overlay with its committed ancestors' `fs`
//! directories as lower layers (a bind mount when it has none), a view likewise read-only.
//!
//! Lazy pull: a `Prepare` that carries `containerd.io/snapshot.ref` (the chain id it is to be
//! committed as) and the image labels of a layer clip can serve ([`crate::lazy::Lazy::layer_of`])
//! records a committed snapshot under that name and answers `AlreadyExists`, so containerd
//! fetches nothing. A snapshot prepared on top of such a chain gets, as its lowest layer, the clip
//! mount of that chain's tree (indexed once per image and depth, mounted once however many
//! containers use it), below any ordinary snapshots stacked on it. A tree is unmounted when no
//! snapshot needs it any more.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::api::containerd::services::snapshots::v1 as pb;
use crate::api::containerd::types::Mount;
use crate::filter::Filters;
use crate::lazy::{Lazy, LazyError, labels};
use crate::meta::{Kind, LazyLayer, MetaError, Snapshot, State, now};

/// The snapshotter.
#[derive(Clone)]
pub struct Snapshotter {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    state: Mutex<State>,
    lazy: Lazy,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

fn meta_status(e: &MetaError) -> Status {
    Status::internal(e.to_string())
}

fn lazy_status(e: &LazyError) -> Status {
    match e {
        LazyError::Registry(_) | LazyError::Index { .. } => Status::unavailable(e.to_string()),
        LazyError::NotLazy(_) => Status::failed_precondition(e.to_string()),
        LazyError::Mount { .. } | LazyError::Io { .. } => Status::internal(e.to_string()),
    }
}

fn timestamp((seconds, nanos): (i64, i32)) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

fn info(s: &Snapshot) -> pb::Info {
    pb::Info {
        name: s.name.clone(),
        parent: s.parent.clone(),
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

/// Runs blocking work (registry, indexing, mounting) off the gRPC threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker thread: {e}")))?
}

impl Snapshotter {
    /// A snapshotter keeping its state under `root` (created `0700`), serving lazy trees with
    /// `lazy`. Mounts recorded by an earlier run are adopted when alive; dead ones that
    /// snapshots still need are mounted again.
    pub fn open(root: &Path, lazy: Lazy) -> Result<Self, Status> {
        for d in [root.to_owned(), root.join("snapshots")] {
            clip_core::format::private_dir(&d).map_err(|e| Status::internal(e.to_string()))?;
        }
        let state = State::load(&root.join("metadata.json")).map_err(|e| meta_status(&e))?;
        let me = Self {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                state: Mutex::new(state),
                lazy,
            }),
        };
        me.adopt_mounts();
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of snapshot `key`'s record.
    fn snapshot(&self, key: &str) -> Result<Snapshot, Status> {
        self.lock().get(key).cloned().ok_or_else(|| not_found(key))
    }

    fn save(&self, st: &State) -> Result<(), Status> {
        st.save(&self.inner.root.join("metadata.json"))
            .map_err(|e| meta_status(&e))
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.inner.root.join("snapshots").join(id.to_string())
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
            // A dead server's mount still shows in mountinfo; statfs tells (and detaches it).
            clip_core::fs::clean_stale_mount(&r.mountpoint);
            if clip_core::fs::is_mounted(&r.mountpoint) {
                tracing::info!(mountpoint = %r.mountpoint.display(), "adopted a live lazy mount");
                alive.push(r);
            } else if needed.contains(&r.key) {
                let lazy = {
                    let st = self.lock();
                    find_lazy(&st, &r.key)
                };
                match lazy.map(|l| self.inner.lazy.ensure_mounted(&l)) {
                    Some(Ok(rec)) => {
                        tracing::info!(mountpoint = %rec.mountpoint.display(), "remounted a dead lazy mount");
                        alive.push(rec);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(mountpoint = %r.mountpoint.display(), error = %e, "could not remount a dead lazy mount");
                    }
                    None => {
                        clip_core::fs::clean_stale_mount(&r.mountpoint);
                    }
                }
            } else {
                clip_core::fs::clean_stale_mount(&r.mountpoint);
            }
        }
        let mut st = self.lock();
        st.mounts = alive;
        if let Err(e) = self.save(&st) {
            tracing::warn!(error = %e, "saving snapshot metadata");
        }
    }

    /// The mounts of snapshot `s` (active or view).
    fn mounts_of(&self, s: &Snapshot) -> Result<Vec<Mount>, Status> {
        let (lowers, lazy) = {
            let st = self.lock();
            let mut lowers = Vec::new();
            let mut lazy = None;
            for a in st.chain(&s.parent) {
                if let Some(l) = &a.lazy {
                    lazy = Some(l.clone());
                    break;
                }
                lowers.push(self.dir(a.id).join("fs"));
            }
            (lowers, lazy)
        };
        let mut lowers = lowers;
        if let Some(l) = lazy {
            let rec = self
                .inner
                .lazy
                .ensure_mounted(&l)
                .map_err(|e| lazy_status(&e))?;
            lowers.push(rec.mountpoint.clone());
            let mut st = self.lock();
            if !st.mounts.iter().any(|m| m.key == rec.key) {
                st.mounts.push(rec);
                self.save(&st)?;
            }
        }
        let fs = self.dir(s.id).join("fs");
        let work = self.dir(s.id).join("work");
        let lowerdir = || {
            format!(
                "lowerdir={}",
                lowers
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        let mount = match (s.kind, lowers.len()) {
            (Kind::Active, 0) => Mount {
                r#type: "bind".into(),
                source: fs.display().to_string(),
                target: String::new(),
                options: vec!["rw".into(), "rbind".into()],
            },
            (Kind::Active, _) => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    format!("workdir={}", work.display()),
                    format!("upperdir={}", fs.display()),
                    lowerdir(),
                ],
            },
            (_, 0) => Mount {
                r#type: "bind".into(),
                source: fs.display().to_string(),
                target: String::new(),
                options: vec!["ro".into(), "rbind".into()],
            },
            (_, 1) => Mount {
                r#type: "bind".into(),
                source: lowers[0].display().to_string(),
                target: String::new(),
                options: vec!["ro".into(), "rbind".into()],
            },
            _ => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![lowerdir()],
            },
        };
        Ok(vec![mount])
    }

    /// Creates an active or view snapshot and returns its mounts; nothing is left behind if
    /// mounting its lower layers fails.
    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
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
            std::fs::create_dir_all(&d)
                .map_err(|e| Status::internal(format!("creating {}: {e}", d.display())))?;
        }
        let mounts = match self.mounts_of(&snap) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut st = self.lock();
        if let Err(e) = check_new(&st, key, parent) {
            drop(st);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        st.snapshots.insert(key.to_owned(), snap);
        self.save(&st)?;
        metrics::counter!("clip_snapshotter_snapshots_created_total", "kind" => kind.as_str())
            .increment(1);
        Ok(mounts)
    }

    /// A `Prepare` naming its target: lazy when the layer can be served lazily (then
    /// `AlreadyExists`), else `None` (prepare an ordinary snapshot).
    fn prepare_lazy(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<Status>, Status> {
        let parent_depth = {
            let st = self.lock();
            check_new(&st, key, parent)?;
            if let Some(t) = st.get(target)
                && t.kind == Kind::Committed
                && t.parent == parent
            {
                return Ok(Some(Status::already_exists(format!(
                    "target snapshot {target} already exists"
                ))));
            }
            match st.get(parent).map(|p| p.lazy.as_ref()) {
                None => 0,
                Some(Some(l)) => l.depth,
                Some(None) => {
                    tracing::info!(key, target, "layer not lazy: its parent was unpacked");
                    return Ok(None);
                }
            }
        };
        // Anything that keeps this layer from being served lazily — labels that do not fit,
        // a registry that refuses or fails (a pull secret this node lacks, 429), content whose
        // diff_id is not the one its chain id promises — means an ordinary snapshot: containerd
        // fetches and unpacks the layer itself. Never a failed pull that could be served.
        let verified = self
            .inner
            .lazy
            .layer_of(labels, parent_depth)
            .map_err(|e| e.to_string())
            .and_then(|l| l)
            .and_then(|l| {
                // The layer's content is checked against its diff_id (the tree up to it
                // indexed, every layer streamed or already checked) before it is committed under
                // a chain id that other images' pulls will trust.
                self.inner
                    .lazy
                    .verify(&l)
                    .map(|_| l)
                    .map_err(|e| e.to_string())
            });
        let layer = match verified {
            Ok(l) => l,
            Err(why) => {
                tracing::info!(key, target, reason = %why, "layer not lazy; preparing an ordinary snapshot");
                metrics::counter!("clip_snapshotter_not_lazy_total").increment(1);
                return Ok(None);
            }
        };
        {
            let mut st = self.lock();
            if st.get(target).is_some() {
                return Ok(Some(Status::already_exists(format!(
                    "target snapshot {target} already exists"
                ))));
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
        }
        metrics::counter!("clip_snapshotter_lazy_layers_total").increment(1);
        tracing::info!(target, image = %layer.image, depth = layer.depth, "layer committed lazily: content checked, nothing to fetch");
        Ok(Some(Status::already_exists(format!(
            "target snapshot {target} already exists"
        ))))
    }

    /// Removes archives, logs and mounts of trees no snapshot uses (containerd's `Cleanup`).
    fn collect_leftovers(&self) {
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
        self.inner.lazy.collect(&keep, &mounted);
    }

    /// Unmounts the trees no snapshot needs any more.
    fn release_mounts(&self) {
        let unneeded = {
            let mut st = self.lock();
            let needed = st.needed_mounts();
            let (keep, drop_): (Vec<_>, Vec<_>) = std::mem::take(&mut st.mounts)
                .into_iter()
                .partition(|m| needed.contains(&m.key));
            st.mounts = keep;
            if let Err(e) = self.save(&st) {
                tracing::warn!(error = %e, "saving snapshot metadata");
            }
            drop_
        };
        for m in unneeded {
            self.inner.lazy.unmount(&m.key);
        }
    }
}

fn find_lazy(st: &State, key: &crate::meta::MountKey) -> Option<LazyLayer> {
    st.snapshots
        .values()
        .filter_map(|s| s.lazy.as_ref())
        .find(|l| l.manifest == key.manifest && l.depth >= key.depth)
        .map(|l| LazyLayer {
            depth: key.depth,
            ..l.clone()
        })
}

fn check_new(st: &State, key: &str, parent: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("a snapshot needs a key"));
    }
    if st.get(key).is_some() {
        return Err(Status::already_exists(format!(
            "snapshot {key} already exists"
        )));
    }
    if !parent.is_empty() {
        match st.get(parent) {
            None => {
                return Err(Status::not_found(format!(
                    "parent snapshot {parent} does not exist (in this snapshotter)"
                )));
            }
            Some(p) if p.kind != Kind::Committed => {
                return Err(Status::failed_precondition(format!(
                    "parent snapshot {parent} is not committed"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Disk usage of a directory tree: bytes allocated and inodes.
fn usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt as _;
    let mut size = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_owned()];
    let mut seen = std::collections::HashSet::new();
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

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Snapshotter {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        let me = self.clone();
        let mounts = blocking(move || {
            if let Some(target) = labels.get(labels::TARGET).cloned()
                && let Some(answer) = me.prepare_lazy(&r.key, &r.parent, &target, &labels)?
            {
                return Err(answer);
            }
            me.create(&r.key, &r.parent, Kind::Active, labels)
        })
        .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let me = self.clone();
        let mounts = blocking(move || {
            me.create(
                &r.key,
                &r.parent,
                Kind::View,
                r.labels.into_iter().collect(),
            )
        })
        .await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = request.into_inner().key;
        let s = self.snapshot(&key)?;
        if s.kind == Kind::Committed {
            return Err(Status::failed_precondition(format!(
                "snapshot {key} is committed: it has no mounts"
            )));
        }
        let me = self.clone();
        let mounts = blocking(move || me.mounts_of(&s)).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let mut st = self.lock();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("commit needs a name"));
        }
        if st.get(&r.name).is_some() {
            return Err(Status::already_exists(format!(
                "snapshot {} already exists",
                r.name
            )));
        }
        let mut s = st
            .snapshots
            .get(&r.key)
            .cloned()
            .ok_or_else(|| not_found(&r.key))?;
        if s.kind != Kind::Active {
            return Err(Status::failed_precondition(format!(
                "snapshot {} is not active",
                r.key
            )));
        }
        st.snapshots.remove(&r.key);
        s.name.clone_from(&r.name);
        s.kind = Kind::Committed;
        s.labels.extend(r.labels);
        s.updated = now();
        st.snapshots.insert(r.name.clone(), s);
        self.save(&st)?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        let dir = {
            let mut st = self.lock();
            let s = st.get(&key).cloned().ok_or_else(|| not_found(&key))?;
            if st.has_children(&key) {
                return Err(Status::failed_precondition(format!(
                    "snapshot {key} has children"
                )));
            }
            st.snapshots.remove(&key);
            self.save(&st)?;
            self.dir(s.id)
        };
        let me = self.clone();
        blocking(move || {
            if dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&dir)
            {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a snapshot's files (Cleanup retries)");
            }
            me.release_mounts();
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let st = self.lock();
        let s = st.get(&key).ok_or_else(|| not_found(&key))?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(s)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let new = r
            .info
            .ok_or_else(|| Status::invalid_argument("update needs the snapshot's info"))?;
        let mut st = self.lock();
        let s = st
            .snapshots
            .get_mut(&new.name)
            .ok_or_else(|| not_found(&new.name))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            s.labels = new.labels.into_iter().collect();
        } else {
            for p in paths {
                if p == "labels" {
                    s.labels = new.labels.clone().into_iter().collect();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match new.labels.get(k) {
                        Some(v) => {
                            s.labels.insert(k.to_owned(), v.clone());
                        }
                        None => {
                            s.labels.remove(k);
                        }
                    }
                } else {
                    return Err(Status::invalid_argument(format!(
                        "cannot update field {p} (only labels)"
                    )));
                }
            }
        }
        s.updated = now();
        let out = info(s);
        self.save(&st)?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(out),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = Filters::parse(&request.into_inner().filters)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let infos: Vec<pb::Info> = self
            .lock()
            .snapshots
            .values()
            .filter(|s| filters.matches(s))
            .map(info)
            .collect();
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = request.into_inner().key;
        let s = self.snapshot(&key)?;
        let dir = self.dir(s.id).join("fs");
        let (size, inodes) = if s.lazy.is_some() {
            (0, 0)
        } else {
            blocking(move || Ok(usage(&dir))).await?
        };
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let ids: std::collections::HashSet<String> = self
            .lock()
            .snapshots
            .values()
            .map(|s| s.id.to_string())
            .collect();
        let root = self.inner.root.join("snapshots");
        let me = self.clone();
        blocking(move || {
            for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !ids.contains(&name) {
                    tracing::info!(dir = %e.path().display(), "cleanup: removing an unused snapshot directory");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
            me.release_mounts();
            me.collect_leftovers();
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }
}

/// containerd's answer for a snapshot that does not exist.
fn not_found(key: &str) -> Status {
    Status::not_found(format!("snapshot {key} does not exist"))
}
