//! The image service: the seed's worker flows over the capability crates.
//!
//! One file per flow:
//!
//! - [`ImageService::pull_and_archive`] (`pull`): v2 indexes straight from the source registry;
//!   v1 copies, extracts and archives. A v2 failure falls back to v1 with its reason.
//! - [`ImageService::build_and_archive`] (`build`): `buildah bud`, then (v2, build registry
//!   reachable) push to the build registry and index from it; otherwise, or on any v2 failure,
//!   push to an OCI layout and archive it as v1. Builds never fail because of v2.
//! - [`ImageService::pull_lazy`] (`lazy`): fetch `<id>.clip` from the archive store, detect
//!   v1/v2, mount it once per image.
//! - [`ImageService::run`] (`run`): a container of its own (overlay + OCI bundle + runc) on the
//!   shared mount.
//! - [`on_push::PushIndexer`] (`on_push`): index on push — a registry's notifications queue
//!   `pull_and_archive` of each pushed image, so its archive exists before the first pull.
//!
//! Around them: the [`ArchiveStore`] the flows publish to (`store`), the typed errors and the
//! [`FallbackReason`] (`error`), and the steps every flow shares (`flow`: looking in the store
//! before doing work, publishing, metrics, phase timing). Archives are stored as `<id>.clip`;
//! ids are stable: the hash of the platform manifest digest and repository for pulls, of the
//! Dockerfile, the context's content and the build args for builds. Log lines follow the seed's
//! wording.
//!
//! A service owns one registry client and one runtime ([`registry::BlockingClient`]) for its
//! lifetime: every flow, every mount and the S3 store share its token cache, connection pool and
//! threads. Workers sharing a store coordinate through it: a flow whose `<id>.clip` (of the
//! planned version) is in the store answers with it and does no work; archives and per-layer
//! indexes are published create-only, so concurrent workers produce one archive and the others
//! reuse it.

mod build;
mod error;
mod flow;
mod id;
mod lazy;
pub mod on_push;
mod pull;
mod run;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clip_policy::Config;
use sha2::{Digest as _, Sha256};

pub use error::{FallbackReason, ServiceError};
pub use id::ImageId;
pub use lazy::MountedImage;
pub use run::RunOutput;
pub use store::{ArchiveStore, ArchiveVersion, MAX_SMALL_OBJECT, StoredArchive};

use crate::{indexer, registry};

/// What a pull or build produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ArchiveResult {
    /// Stable image id.
    pub image_id: String,
    /// Archive version made (or found).
    pub version: ArchiveVersion,
    /// The archive in the store (a path, or an `s3://` URL).
    pub archive: String,
    /// Its size.
    pub bytes: u64,
    /// Why v2 was not used, when it was asked for.
    pub fallback_reason: Option<String>,
    /// Wall time of the flow.
    pub seconds: f64,
    /// The archive was already in the store (published earlier, or by another worker that got
    /// there first): nothing new was published.
    pub reused: bool,
    /// Layers whose stored index was reused instead of fetching the layer (v2).
    pub reused_layers: usize,
    /// Of those, layers whose index came from the attachment in the image's registry
    /// ([`crate::node::attached_indexes`]).
    pub attached_layers: usize,
}

/// Options beyond the configuration file.
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// buildah storage (`--root`; `--runroot` beside it); default: buildah's own.
    pub buildah_root: Option<PathBuf>,
}

/// The image service of one worker.
pub struct ImageService {
    cfg: Config,
    opts: ServiceOptions,
    net: registry::BlockingClient,
    store: Arc<dyn ArchiveStore>,
    layer_store: Arc<dyn indexer::LayerIndexStore>,
    trust: Arc<clip_objstore::signed::Trust>,
    mounts: Mutex<HashMap<String, Arc<MountedImage>>>,
    locks: crate::locks::KeyedLocks<ImageId>,
}

impl std::fmt::Debug for ImageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageService")
            .field("cfg", &self.cfg)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ImageService {
    /// A service for `cfg`: one registry client (credentials from the config, then docker's
    /// `config.json`) and one runtime for all its flows and mounts.
    pub fn new(cfg: Config, opts: ServiceOptions) -> Result<Self, ServiceError> {
        // Root-only: mounts (setuid programs, private content), caches, archives, logs.
        for d in [
            cfg.cache_dir.clone(),
            cfg.cache_dir.join("layers"),
            cfg.mount_base.clone(),
            cfg.mount_base.join("containers"),
        ] {
            crate::host::private_dir(&d)?;
        }
        let net = crate::node::registry_client(&cfg)?;
        let store = store::open(&cfg, net.handle())?;
        // Layer indexes: this worker's cache first, then the store every worker shares.
        let mut tiers: Vec<Box<dyn indexer::LayerIndexStore>> =
            vec![Box::new(crate::node::layer_cache(&cfg)?)];
        tiers.extend(store.shared_layer_indexes());
        let trust = Arc::new(crate::node::trust(&cfg)?);
        let svc = Self {
            cfg,
            opts,
            net,
            store,
            layer_store: Arc::new(indexer::Tiered(tiers)),
            trust,
            mounts: Mutex::new(HashMap::new()),
            locks: crate::locks::KeyedLocks::default(),
        };
        svc.clean_dead_mounts();
        Ok(svc)
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The archive store.
    #[must_use]
    pub fn store(&self) -> &dyn ArchiveStore {
        &*self.store
    }

    /// The registry client (and runtime) every flow of this service shares.
    #[must_use]
    pub fn registry(&self) -> &registry::BlockingClient {
        &self.net
    }

    /// The archives in the store.
    pub fn images(&self) -> Result<Vec<StoredArchive>, ServiceError> {
        self.store.list()
    }

    fn lock_for(&self, id: &ImageId) -> Arc<Mutex<()>> {
        self.locks.get(id)
    }

    fn index_options(&self) -> indexer::IndexOptions {
        crate::node::index_options(&self.cfg, Arc::clone(&self.layer_store))
    }

    /// A fresh path in the store's staging directory for image `id`'s new archive.
    fn staged_path(&self, id: &ImageId) -> PathBuf {
        self.store.staging().join(format!(
            "{id}.{}.clip",
            short_hash(&[
                std::process::id().to_string().as_bytes(),
                format!("{:?}", std::time::SystemTime::now()).as_bytes(),
            ])
        ))
    }
}

impl Drop for ImageService {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// The first 8 bytes of a sha256 over length-prefixed parts, in hex: stable ids and nonces.
pub(crate) fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}
