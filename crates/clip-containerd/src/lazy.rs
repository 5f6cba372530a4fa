//! Lazy image trees: which image layers can be served lazily, their v2 archives, and the clip
//! mounts that serve them — each mount a server process of its own, so that the snapshotter can
//! be restarted (or killed) without taking running containers' root filesystems with it.
//!
//! A tree is the first `depth` layers of an image (a containerd chain id names exactly that);
//! its archive is indexed from the registry once (`<root>/archives/<manifest>-<depth>.clip`),
//! reusing the layer-index cache every clip process on the node shares (`<cacheDir>/layers`),
//! and mounted once (`<root>/mnt/<manifest>-<depth>`), however many containers use it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clip_core::format::Digest;
use clip_core::indexer::{IndexOptions, Input, LayerIndexStore};
use clip_core::node;
use clip_core::policy::Config;
use clip_core::registry::{BlockingClient, Reference, oci};

use crate::meta::{LazyLayer, MountKey, MountRecord};
use crate::snapshots::Trees;

/// The labels containerd's CRI plugin puts on a layer's snapshot (and `clip containerd pull`
/// does too).
pub mod labels {
    /// The chain id the snapshot will be committed as.
    pub const TARGET: &str = "containerd.io/snapshot.ref";
    /// The image reference.
    pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
    /// The platform manifest's digest.
    pub const MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
    /// This layer's blob digest.
    pub const LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
    /// This layer's and the upper layers' digests, comma separated.
    pub const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
}

/// Why a layer is not served lazily (an ordinary snapshot is prepared instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLazy {
    /// The `Prepare` carries no image labels.
    #[error(
        "no image labels (containerd's CRI plugin with disable_snapshot_annotations = false, or clip containerd pull, sends them)"
    )]
    NoLabels,
    /// A label is not what it must be (a digest that does not parse).
    #[error("label {label}: {reason}")]
    BadLabel {
        /// The label.
        label: &'static str,
        /// Why.
        reason: String,
    },
    /// A layer of the image is of a type clip does not index.
    #[error("layer media type {0} is not one clip indexes")]
    MediaType(String),
    /// The manifest is not an image manifest clip reads.
    #[error("{manifest} is not an image manifest clip reads: {reason}")]
    Manifest {
        /// Its digest.
        manifest: Digest,
        /// Why.
        reason: String,
    },
    /// The image config is unreadable, or its `diff_id`s unusable.
    #[error("the image config: {0}")]
    Config(String),
    /// The layer is not at this depth of the image.
    #[error("layer {layer} is not layer {depth} of {image}@{manifest}")]
    WrongLayer {
        /// The layer.
        layer: Digest,
        /// The depth asked for.
        depth: usize,
        /// The image.
        image: String,
        /// Its manifest.
        manifest: Digest,
    },
    /// The snapshot is to be committed under a name that is not the chain id at that depth.
    #[error("the target {target} is not the chain id of layer {depth} of {image}@{manifest}")]
    WrongChainId {
        /// The target name.
        target: String,
        /// The depth.
        depth: usize,
        /// The image.
        image: String,
        /// Its manifest.
        manifest: Digest,
    },
}

/// Why something lazy failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The layer cannot be served lazily.
    #[error(transparent)]
    NotLazy(#[from] NotLazy),
    /// The registry did not answer or refused.
    #[error("{0}")]
    Registry(Box<clip_core::registry::Error>),
    /// Indexing failed (a layer whose content is not its `diff_id` too).
    #[error("indexing {image}: {source}")]
    Index {
        /// The image.
        image: String,
        /// Why.
        source: Box<clip_core::indexer::Error>,
    },
    /// The registry client, a cache or a mount server could not be made.
    #[error(transparent)]
    Node(#[from] node::NodeError),
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

impl From<clip_core::registry::Error> for LazyError {
    fn from(e: clip_core::registry::Error) -> Self {
        Self::Registry(Box::new(e))
    }
}

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LazyError + use<> {
    let path = path.to_owned();
    move |source| LazyError::Io {
        context,
        path,
        source,
    }
}

/// What a manifest says, as far as lazy serving cares.
#[derive(Debug, Clone)]
struct ManifestFacts {
    /// Layer blob digests, bottom first.
    layers: Vec<Digest>,
    /// The chain ids of the image config's `diff_id`s, bottom first.
    chain_ids: Vec<Digest>,
    /// Why it cannot be served lazily, if it cannot.
    not_lazy: Option<NotLazy>,
}

/// How to start a mount server: this program, re-run with the `mount-server` subcommand.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The program (the snapshotter's own executable).
    pub program: PathBuf,
    /// The configuration file the server reads registry settings and credentials from.
    pub config: Option<PathBuf>,
}

/// Lazy trees of one snapshotter.
pub struct Lazy {
    root: PathBuf,
    cfg: Config,
    net: BlockingClient,
    layer_store: Arc<dyn LayerIndexStore>,
    /// Checks layer indexes attached to images in their registries (signed ones only: trees
    /// are committed under chain ids other pulls trust).
    trust: Arc<clip_core::objstore::signed::Trust>,
    server: ServerCommand,
    manifests: Mutex<HashMap<Digest, ManifestFacts>>,
    /// One lock per tree: a tree is indexed and mounted once, however many ask at once.
    busy: clip_core::locks::KeyedLocks<MountKey>,
    /// Whole images whose indexing failed (not tried again for each of their layers).
    whole_failed: Mutex<HashSet<MountKey>>,
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// The reference `image` pinned to `manifest`.
fn pinned(image: &str, manifest: &Digest) -> Result<Reference, LazyError> {
    Ok(Reference::parse(image)?.pinned(manifest.as_str()))
}

/// A digest label of a `Prepare`.
fn digest_label(labels: &BTreeMap<String, String>, label: &'static str) -> Result<Digest, NotLazy> {
    let v = labels.get(label).ok_or(NotLazy::NoLabels)?;
    Digest::parse(v).map_err(|e| NotLazy::BadLabel {
        label,
        reason: e.to_string(),
    })
}

impl Lazy {
    /// Lazy trees under `root`, reaching registries with `cfg`'s settings.
    pub fn new(root: &Path, cfg: Config, server: ServerCommand) -> Result<Self, LazyError> {
        for d in [root.join("archives"), root.join("mnt"), root.join("logs")] {
            clip_core::host::private_dir(&d)?;
        }
        Ok(Self {
            root: root.to_owned(),
            net: node::registry_client(&cfg)?,
            layer_store: Arc::new(node::layer_cache(&cfg)?),
            trust: Arc::new(node::trust(&cfg)?),
            cfg,
            server,
            manifests: Mutex::new(HashMap::new()),
            busy: clip_core::locks::KeyedLocks::default(),
            whole_failed: Mutex::new(HashSet::new()),
        })
    }

    /// Decides whether the layer a `Prepare` describes with `labels` (CRI's, or `clip
    /// containerd pull`'s), sitting on a lazy tree of `parent_depth` layers, can be served
    /// lazily: the labels name an image, its manifest and this layer, the manifest (fetched from
    /// the registry, by digest) lists this layer at that depth, the target is the chain id at
    /// that depth, and every layer is one clip reads. Blocking (one manifest and one config
    /// request per image).
    pub fn layer_of(
        &self,
        labels: &BTreeMap<String, String>,
        parent_depth: usize,
    ) -> Result<LazyLayer, LazyError> {
        let image = labels.get(labels::IMAGE_REF).ok_or(NotLazy::NoLabels)?;
        let manifest = digest_label(labels, labels::MANIFEST)?;
        let layer = digest_label(labels, labels::LAYER)?;
        let facts = self.manifest_facts(image, &manifest)?;
        if let Some(why) = facts.not_lazy {
            return Err(why.into());
        }
        let depth = parent_depth + 1;
        if facts.layers.get(depth - 1) != Some(&layer) {
            return Err(NotLazy::WrongLayer {
                layer,
                depth,
                image: image.clone(),
                manifest,
            }
            .into());
        }
        // The snapshot is to be committed under a chain id: it must be this image's chain id
        // at this depth (the layer's content is checked against its diff_id before the commit).
        let target = labels.get(labels::TARGET).map_or("", String::as_str);
        if facts
            .chain_ids
            .get(depth - 1)
            .is_none_or(|c| c.as_str() != target)
        {
            return Err(NotLazy::WrongChainId {
                target: target.to_owned(),
                depth,
                image: image.clone(),
                manifest,
            }
            .into());
        }
        Ok(LazyLayer {
            image: image.clone(),
            manifest,
            layer,
            depth,
        })
    }

    /// Checks that the content of `l`'s tree matches its `diff_id`s (and so the chain id it is
    /// to be committed under). The first layer of an image that needs it indexes the whole image
    /// at once (its layers in parallel, every `diff_id` checked, the layer indexes kept; the
    /// image's archive is then ready for its first container), which checks every later layer
    /// too; when the whole image fails (an upper layer that lies), `l`'s own prefix is indexed
    /// and checked on its own. Blocking.
    pub fn verify(&self, l: &LazyLayer) -> Result<PathBuf, LazyError> {
        let top = self
            .manifests
            .lock()
            .ok()
            .and_then(|m| m.get(&l.manifest).map(|f| f.layers.len()))
            .filter(|&n| n > l.depth)
            .map(|depth| LazyLayer { depth, ..l.clone() });
        let failed = |k: &MountKey| self.whole_failed.lock().is_ok_and(|f| f.contains(k));
        if let Some(top) = top.filter(|t| !failed(&t.mount_key())) {
            match self.ensure_archive(&top) {
                // Every layer up to the top checked: so are this one's. Its own tree's archive
                // is made when a container needs it.
                Ok(path) => return Ok(path),
                Err(e) => {
                    tracing::info!(image = %l.image, error = %e, "indexing the whole image failed; checking the layers up to this one alone");
                    if let Ok(mut f) = self.whole_failed.lock() {
                        if f.len() > 1024 {
                            f.clear();
                        }
                        f.insert(top.mount_key());
                    }
                }
            }
        }
        self.ensure_archive(l)
    }

    fn manifest_facts(&self, image: &str, manifest: &Digest) -> Result<ManifestFacts, LazyError> {
        if let Some(f) = self
            .manifests
            .lock()
            .ok()
            .and_then(|m| m.get(manifest).cloned())
        {
            return Ok(f);
        }
        let r = pinned(image, manifest)?;
        let (bytes, _media, _digest) = self
            .net
            .block_on(self.net.client().manifest(&r, manifest.as_str()))?;
        let facts = match serde_json::from_slice::<oci::Manifest>(&bytes) {
            Ok(m) => self.facts_of(&r, &m)?,
            Err(e) => ManifestFacts {
                layers: Vec::new(),
                chain_ids: Vec::new(),
                not_lazy: Some(NotLazy::Manifest {
                    manifest: manifest.clone(),
                    reason: e.to_string(),
                }),
            },
        };
        if let Ok(mut m) = self.manifests.lock() {
            m.insert(manifest.clone(), facts.clone());
        }
        Ok(facts)
    }

    /// What manifest `m` of `r` says: its layers, and the chain ids of its config's
    /// `diff_id`s (the config verified against its digest).
    fn facts_of(&self, r: &Reference, m: &oci::Manifest) -> Result<ManifestFacts, LazyError> {
        let mut layers = Vec::new();
        let mut not_lazy = None;
        for d in m.layers() {
            if oci::MediaKind::of(d.media_type()).layer().is_none() {
                not_lazy.get_or_insert(NotLazy::MediaType(d.media_type().to_string()));
            }
            layers.push(oci::digest(d)?);
        }
        let config = oci::digest(m.config())?;
        let limit = usize::try_from(m.config().size())
            .unwrap_or(usize::MAX)
            .min(64 << 20);
        let config_bytes = self
            .net
            .block_on(self.net.client().blob_bytes(r, &config, limit))?;
        let diff_ids = serde_json::from_slice::<oci::ImageConfiguration>(&config_bytes)
            .map_err(|e| e.to_string())
            .and_then(|c| oci::diff_ids(&c).map_err(|e| e.to_string()));
        let chain_ids = match diff_ids {
            Ok(d) => crate::pull::chain_ids(&d),
            Err(e) => {
                not_lazy.get_or_insert(NotLazy::Config(e));
                Vec::new()
            }
        };
        Ok(ManifestFacts {
            layers,
            chain_ids,
            not_lazy,
        })
    }

    fn lock_for(&self, key: &MountKey) -> Arc<Mutex<()>> {
        self.busy.get(key)
    }

    /// The v2 archive of `l`'s tree, indexed from the registry unless already there. Blocking.
    pub fn ensure_archive(&self, l: &LazyLayer) -> Result<PathBuf, LazyError> {
        let key = l.mount_key();
        let path = self
            .root
            .join("archives")
            .join(format!("{}.clip", key.file_name()));
        let lock = self.lock_for(&key);
        let _g = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if clip_core::format::Archive::open(&path).is_ok() {
            return Ok(path);
        }
        let r = pinned(&l.image, &l.manifest)?;
        let reference = r.to_string();
        // Layer indexes attached to the image in its registry, signed by a trusted key, are
        // used like the node's own: those layers are not streamed.
        let attached =
            node::attached_indexes(&self.net, &r, &l.manifest, Arc::clone(&self.trust), true)
                .map(Arc::new);
        let mut opts = IndexOptions {
            layers: Some(l.depth),
            // The tree is committed under chain ids: every layer's diff_id is checked.
            verify_diff_ids: true,
            ..node::index_options(&self.cfg, Arc::clone(&self.layer_store))
        };
        opts.layer_store = node::with_attached(opts.layer_store.take(), attached);
        let started = Instant::now();
        let summary = clip_core::indexer::index(
            Input::Registry {
                reference: &reference,
                client: &self.net,
            },
            &path,
            &opts,
            None,
        )
        .map_err(|source| LazyError::Index {
            image: reference.clone(),
            source: Box::new(source),
        })?;
        tracing::info!(image = %reference, depth = l.depth, layers_reused = summary.reused_layers, bytes = summary.archive_bytes, ms = started.elapsed().as_millis() as u64, "indexed image for lazy start");
        metrics::counter!("clip_snapshotter_indexed_total").increment(1);
        Ok(path)
    }

    /// Where `key`'s tree is (or would be) mounted.
    #[must_use]
    pub fn mountpoint(&self, key: &MountKey) -> PathBuf {
        self.root.join("mnt").join(key.file_name())
    }

    /// Mounts `l`'s tree unless it is mounted, and returns the mount point. A dead mount (its
    /// server gone) is detached and mounted again. Blocking.
    pub fn ensure_mounted(&self, l: &LazyLayer) -> Result<MountRecord, LazyError> {
        let key = l.mount_key();
        let mp = self.mountpoint(&key);
        let archive = self.ensure_archive(l)?;
        let lock = self.lock_for(&key);
        let _g = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A dead server's mount still shows in mountinfo; statfs tells (and detaches it).
        clip_core::fs::clean_stale_mount(&mp);
        if clip_core::fs::is_mounted(&mp) {
            return Ok(MountRecord {
                key,
                mountpoint: mp,
            });
        }
        std::fs::create_dir_all(&mp).map_err(io("creating", &mp))?;
        self.spawn_server(&key, &archive, &mp)?;
        metrics::counter!("clip_snapshotter_mounts_total").increment(1);
        Ok(MountRecord {
            key,
            mountpoint: mp,
        })
    }

    /// Starts a mount server for `archive` at `mp` in a process group of its own (it outlives
    /// the snapshotter) and waits until the mount answers.
    fn spawn_server(&self, key: &MountKey, archive: &Path, mp: &Path) -> Result<(), LazyError> {
        let log_path = self
            .root
            .join("logs")
            .join(format!("{}.log", key.file_name()));
        let mut cmd = Command::new(&self.server.program);
        cmd.arg("mount-server")
            .arg("--archive")
            .arg(archive)
            .arg("--mountpoint")
            .arg(mp);
        if let Some(c) = &self.server.config {
            cmd.arg("--config").arg(c);
        }
        let pid = node::spawn_mount_server(cmd, mp, &log_path, Duration::from_mins(1))?;
        tracing::info!(mountpoint = %mp.display(), pid, "lazy tree mounted");
        Ok(())
    }

    /// Unmounts `key`'s tree (its server then exits), under the tree's lock: never while the
    /// same tree is being mounted for a new snapshot.
    pub fn unmount(&self, key: &MountKey) {
        let lock = self.lock_for(key);
        let _g = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mp = self.mountpoint(key);
        if clip_core::fs::is_mounted(&mp) {
            if let Err(e) = clip_core::fs::unmount(&mp) {
                tracing::warn!(mountpoint = %mp.display(), error = %e, "unmounting a lazy tree");
            } else {
                tracing::info!(mountpoint = %mp.display(), "lazy tree unmounted: no snapshot uses it");
            }
        } else {
            clip_core::fs::clean_stale_mount(&mp);
        }
        let _ = std::fs::remove_dir(&mp);
    }

    /// Removes what no snapshot needs: archives of trees in `keep`'s complement, logs and mount
    /// points of trees not mounted (`mounted`), and mounts under `<root>/mnt` that no record
    /// names (left by a snapshotter killed between mounting and saving).
    pub fn collect(&self, keep: &HashSet<MountKey>, mounted: &HashSet<MountKey>) {
        let names = |set: &HashSet<MountKey>| -> HashSet<String> {
            set.iter().map(MountKey::file_name).collect()
        };
        let (keep, mounted) = (names(keep), names(mounted));
        let entries = |dir: &str| {
            std::fs::read_dir(self.root.join(dir))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        };
        for (name, path) in entries("archives") {
            let stem = name.strip_suffix(".clip").unwrap_or(&name);
            if !keep.contains(stem) {
                tracing::info!(archive = %path.display(), "removing the archive of a tree no snapshot uses");
                let _ = std::fs::remove_file(&path);
            }
        }
        for (name, path) in entries("logs") {
            let stem = name.strip_suffix(".log").unwrap_or(&name);
            if !mounted.contains(stem) {
                let _ = std::fs::remove_file(&path);
            }
        }
        for (name, path) in entries("mnt") {
            if mounted.contains(&name) {
                continue;
            }
            clip_core::fs::clean_stale_mount(&path);
            if clip_core::fs::is_mounted(&path) {
                tracing::info!(mountpoint = %path.display(), "unmounting a lazy tree no record names");
                let _ = clip_core::fs::unmount(&path);
            }
            let _ = std::fs::remove_dir(&path);
        }
    }
}

impl Trees for Lazy {
    fn admit(
        &self,
        labels: &BTreeMap<String, String>,
        parent_depth: usize,
    ) -> Result<LazyLayer, LazyError> {
        let layer = self.layer_of(labels, parent_depth)?;
        // The layer's content is checked against its diff_id (the tree up to it indexed,
        // every layer streamed or already checked) before it is committed under a chain id
        // that other images' pulls will trust.
        self.verify(&layer)?;
        Ok(layer)
    }

    fn ensure_mounted(&self, layer: &LazyLayer) -> Result<MountRecord, LazyError> {
        Lazy::ensure_mounted(self, layer)
    }

    fn is_live(&self, record: &MountRecord) -> bool {
        // A dead server's mount still shows in mountinfo; statfs tells (and detaches it).
        clip_core::fs::clean_stale_mount(&record.mountpoint);
        clip_core::fs::is_mounted(&record.mountpoint)
    }

    fn unmount(&self, key: &MountKey) {
        Lazy::unmount(self, key);
    }

    fn collect(&self, keep: &HashSet<MountKey>, mounted: &HashSet<MountKey>) {
        Lazy::collect(self, keep, mounted);
    }
}
