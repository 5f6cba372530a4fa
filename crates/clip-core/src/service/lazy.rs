//! PullLazy: fetch an image's archive from the store, detect v1/v2, mount it once per image
//! (concurrent callers share the mount), and keep it until unmounted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::ImageService;
use super::error::{ServiceError, io};
use super::store::{ArchiveVersion, valid_id};
use crate::{format, fs};

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
    handle: Mutex<Option<fs::MountHandle>>,
}

impl MountedImage {
    /// Fetch and cache counters (v2).
    #[must_use]
    pub fn stats(&self) -> fs::MountStats {
        self.handle
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(fs::MountHandle::stats))
            .unwrap_or_default()
    }
}

impl ImageService {
    /// Fetches image `id`'s archive into the local cache, detects its version and mounts it
    /// once; concurrent callers for the same image share one mount.
    pub fn pull_lazy(&self, id: &str) -> Result<Arc<MountedImage>, ServiceError> {
        if !valid_id(id) {
            return Err(ServiceError::UnknownImage(id.to_owned()));
        }
        let lock = self.lock_for(id);
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = self
            .mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
        {
            return Ok(Arc::clone(m));
        }
        let local = self
            .store
            .get(id)?
            .ok_or_else(|| ServiceError::UnknownImage(id.to_owned()))?;
        let archive = format::Archive::open(&local)?;
        let version = ArchiveVersion::of(archive.kind());
        match version {
            ArchiveVersion::V2 => tracing::info!(image_id = id, "detected v2 (OCI) archive format"),
            ArchiveVersion::V1 => tracing::info!(image_id = id, "detected v1 archive format"),
        }
        let config = archive.meta().image.clone();
        drop(archive);
        let mountpoint = self.cfg.mount_base.join(id);
        std::fs::create_dir_all(&mountpoint).map_err(io("creating", &mountpoint))?;
        metrics::counter!("clip_mounts_total", "version" => version.label()).increment(1);
        let handle = fs::mount_archive(fs::MountOptions {
            archive: local,
            mountpoint: mountpoint.clone(),
            cache_dir: self.cfg.cache_dir.join("spans"),
            cache_bytes: self.cfg.cache_size_gib << 30,
            cache_min_free_percent: self.cfg.cache_min_free_percent,
            registry: Some(self.net.clone()),
            remote: match &self.cfg.archive_store {
                clip_policy::ArchiveStore::S3(s3) => super::store::remote_options(s3),
                clip_policy::ArchiveStore::Local(_) => clip_objstore::RemoteOptions::default(),
            },
            ..fs::MountOptions::default()
        })?;
        let m = Arc::new(MountedImage {
            image_id: id.to_owned(),
            version,
            mountpoint,
            config,
            handle: Mutex::new(Some(handle)),
        });
        self.mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned(), Arc::clone(&m));
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
        if let Some(m) = m
            && let Some(h) = m.handle.lock().ok().and_then(|mut h| h.take())
        {
            h.unmount()?;
        }
        Ok(())
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
