//! PullLazy: fetch an image's archive from the store, detect v1/v2, mount it once per image
//! (concurrent callers share the mount), and keep it until unmounted.

use std::path::PathBuf;
use std::sync::Arc;

use super::ImageId;
use super::ImageService;
use super::error::{ServiceError, io};
use super::store::{ArchiveStore, ArchiveVersion};
use crate::{format, fs, node};

/// A mounted image.
#[derive(Debug)]
pub struct MountedImage {
    /// Its id.
    pub image_id: String,
    /// Its archive's version.
    pub version: ArchiveVersion,
    /// The read-only root filesystem.
    pub mountpoint: PathBuf,
    /// The image's runtime config.
    pub config: format::ImageConfig,
    mounted: Arc<node::Mounted>,
}

impl MountedImage {
    /// Fetch and cache counters (v2).
    #[must_use]
    pub fn stats(&self) -> fs::MountStats {
        self.mounted.stats()
    }

    /// Whether this mount prefetched a profile shared through the store.
    #[must_use]
    pub fn prefetched_shared_profile(&self) -> bool {
        self.mounted.prefetched_shared_profile()
    }

    /// Waits until the prefetch of a shared profile (if any) has finished.
    pub fn wait_prefetch(&self) {
        self.mounted.wait_prefetch();
    }
}

/// Shared profiles kept beside the archives: `<id>.profile.json`, `<id>.profile.<g>.json`.
struct StoreProfiles(Arc<dyn ArchiveStore>);

impl node::ProfileObjects for StoreProfiles {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get_small(name)
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, node::NodeError> {
        self.0
            .put_small_if_absent(name, bytes)
            .map_err(|e| node::NodeError::Profiles(Box::new(e)))
    }
}

impl ImageService {
    /// Fetches image `id`'s archive into the local cache, detects its version and mounts it
    /// once; concurrent callers for the same image share one mount.
    pub fn pull_lazy(&self, id: &str) -> Result<Arc<MountedImage>, ServiceError> {
        let id = ImageId::parse(id).ok_or_else(|| ServiceError::UnknownImage(id.to_owned()))?;
        self.pull_lazy_id(&id)
    }

    fn pull_lazy_id(&self, id: &ImageId) -> Result<Arc<MountedImage>, ServiceError> {
        let lock = self.lock_for(id);
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id.as_str())
        {
            return Ok(Arc::clone(m));
        }
        let local = self
            .store
            .get(id)?
            .ok_or_else(|| ServiceError::UnknownImage(id.to_string()))?;
        let archive = format::Archive::open(&local)?;
        let version = ArchiveVersion::of(archive.kind());
        match version {
            ArchiveVersion::V2 => {
                tracing::info!(image_id = %id, "detected v2 (OCI) archive format");
            }
            ArchiveVersion::V1 => {
                tracing::info!(image_id = %id, "detected v1 archive format");
            }
        }
        let config = archive.meta().image.clone();
        let manifest = archive
            .meta()
            .source
            .as_ref()
            .map(|s| s.manifest_digest.to_string())
            .unwrap_or_default();
        drop(archive);
        let mountpoint = self.cfg.mount_base.join(id.as_str());
        std::fs::create_dir_all(&mountpoint).map_err(io("creating", &mountpoint))?;
        metrics::counter!("clip_mounts_total", "version" => version.label()).increment(1);
        let mut builder = node::MountBuilder::from_config(&self.cfg, &self.net);
        if version == ArchiveVersion::V2 {
            // Shared prefetch profiles: prefetch the one another worker's first run
            // published, or record this run's to publish.
            builder = builder.share_profiles(node::ProfileSharing {
                objects: Arc::new(StoreProfiles(Arc::clone(&self.store))),
                name: id.to_string(),
                image: manifest,
                window: std::time::Duration::from_secs(self.cfg.profile_window_secs),
                record_dir: self.cfg.cache_dir.clone(),
            });
        }
        let mounted = builder.mount(&local, &mountpoint)?;
        let m = Arc::new(MountedImage {
            image_id: id.to_string(),
            version,
            mountpoint,
            config,
            mounted,
        });
        self.mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string(), Arc::clone(&m));
        Ok(m)
    }

    /// The images mounted now.
    #[must_use]
    pub fn mounts(&self) -> Vec<Arc<MountedImage>> {
        self.mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Unmounts image `id` (no-op if it is not mounted).
    pub fn unmount(&self, id: &str) -> Result<(), ServiceError> {
        let m = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        if let Some(m) = m {
            m.mounted.unmount()?;
        }
        Ok(())
    }

    /// Publishes the profile a first run of image `id` has recorded so far (once; create-only:
    /// the first worker to publish wins).
    pub fn share_profile(&self, id: &str) {
        let m = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(m) = m {
            m.mounted.offer_profile();
        }
    }

    /// Unmounts everything (graceful shutdown).
    pub fn unmount_all(&self) {
        let ids: Vec<String> = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.unmount(&id) {
                tracing::warn!(image_id = %id, error = %e, "unmount failed");
            }
        }
    }

    /// Detaches mounts under the mount base left by a killed worker.
    pub(crate) fn clean_dead_mounts(&self) {
        if let Ok(dir) = std::fs::read_dir(&self.cfg.mount_base) {
            for e in dir.flatten() {
                if fs::clean_stale_mount(&e.path()) {
                    tracing::warn!(path = %e.path().display(), "cleaned a dead mount");
                }
            }
        }
    }
}
