//! PullLazy: fetch an image's archive from the store, detect v1/v2, mount it once per image
//! (concurrent callers share the mount), and keep it until unmounted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Recording a profile to share: whether it has been offered to the store.
    profile_offered: AtomicBool,
    recording: bool,
    /// The shared profile this mount prefetched (the base a refinement adds to).
    shared: Option<fs::Profile>,
    /// The generation this mount's profile would be published as.
    next_generation: u32,
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

    /// Whether this mount prefetched a profile shared through the store.
    #[must_use]
    pub fn prefetched_shared_profile(&self) -> bool {
        self.shared.is_some()
    }

    /// Waits until the prefetch of a shared profile (if any) has finished.
    pub fn wait_prefetch(&self) {
        if let Ok(mut h) = self.handle.lock()
            && let Some(h) = h.as_mut()
        {
            h.wait_prefetch();
        }
    }
}

/// Generations of a shared profile at most: the first run's, then up to three refinements.
const PROFILE_GENERATIONS: u32 = 4;

/// The store object holding generation `g` of image `id`'s shared prefetch profile:
/// `<id>.profile.json`, then `<id>.profile.<g>.json`.
fn profile_name(id: &str, generation: u32) -> String {
    if generation <= 1 {
        format!("{id}.profile.json")
    } else {
        format!("{id}.profile.{generation}.json")
    }
}

/// The newest readable generation of image `id`'s shared profile, and the number of the
/// newest generation present (readable or not; 0 for none).
fn load_shared(store: &dyn super::store::ArchiveStore, id: &str) -> (Option<fs::Profile>, u32) {
    let mut newest = None;
    let mut present = 0;
    for g in 1..=PROFILE_GENERATIONS {
        let Some(bytes) = store.get_small(&profile_name(id, g)) else {
            break;
        };
        present = g;
        match fs::Profile::from_slice(&bytes) {
            Ok(p) => newest = Some(p),
            Err(e) => {
                tracing::warn!(image_id = id, generation = g, error = %e, "shared prefetch profile rejected");
            }
        }
    }
    (newest, present)
}

/// What `recorded` read beyond `base`: `base` plus the touches no touch of `base` covers, if
/// those add at least a tenth of `base`'s bytes (and 64 KiB); bounded to twice `base`'s
/// touches plus 1024 and to 65,536 touches. `None` when the run read nothing new worth it.
fn refine(base: &fs::Profile, recorded: &fs::Profile) -> Option<fs::Profile> {
    let mut covered: std::collections::HashMap<&str, Vec<(u64, u64)>> =
        std::collections::HashMap::new();
    for t in &base.touches {
        covered
            .entry(t.path.as_str())
            .or_default()
            .push((t.offset, t.offset.saturating_add(t.len)));
    }
    let is_new = |t: &&fs::profile::Touch| {
        let end = t.offset.saturating_add(t.len);
        !covered
            .get(t.path.as_str())
            .is_some_and(|rs| rs.iter().any(|&(a, b)| a <= t.offset && end <= b))
    };
    let limit = (base.touches.len() * 2 + 1024).min(65_536);
    let room = limit.saturating_sub(base.touches.len());
    let new: Vec<fs::profile::Touch> = recorded
        .touches
        .iter()
        .filter(is_new)
        .take(room)
        .cloned()
        .collect();
    let base_bytes: u64 = base.touches.iter().map(|t| t.len).sum();
    let new_bytes: u64 = new.iter().map(|t| t.len).sum();
    if new.is_empty() || new_bytes < 64 << 10 || new_bytes.saturating_mul(10) < base_bytes {
        return None;
    }
    let mut merged = base.clone();
    merged.touches.extend(new);
    Some(merged)
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
        let manifest = archive
            .meta()
            .source
            .as_ref()
            .map(|s| s.manifest_digest.to_string())
            .unwrap_or_default();
        drop(archive);
        // Shared prefetch profiles (v2): prefetch the one another worker's first run published,
        // or record this run's to publish.
        let sharing = version == ArchiveVersion::V2 && self.cfg.profile_window_secs > 0;
        let (shared, present) = if sharing {
            load_shared(&*self.store, id)
        } else {
            (None, 0)
        };
        if let Some(p) = &shared {
            tracing::info!(
                image_id = id,
                touches = p.touches.len(),
                generation = present,
                "prefetching the image's shared profile"
            );
        }
        // Record the run to publish it: the first profile, or a refinement of the shared one
        // (while generations are left).
        let record = (sharing && present < PROFILE_GENERATIONS).then(|| {
            self.cfg
                .cache_dir
                .join(format!("profile-{id}-{}.json", std::process::id()))
        });
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
            prefetch: shared.clone(),
            record_profile: record.clone(),
            span_store: self.cfg.span_store.as_ref().map(span_store_options),
            ..fs::MountOptions::default()
        })?;
        let m = Arc::new(MountedImage {
            image_id: id.to_owned(),
            version,
            mountpoint,
            config,
            handle: Mutex::new(Some(handle)),
            profile_offered: AtomicBool::new(false),
            recording: record.is_some(),
            shared,
            next_generation: present + 1,
        });
        if m.recording {
            // The first `profileWindowSecs` of the run are its start: publish them then (or at
            // the first container's exit, or at unmount, whichever comes first).
            let (m2, store) = (Arc::clone(&m), Arc::clone(&self.store));
            let window = std::time::Duration::from_secs(self.cfg.profile_window_secs);
            std::thread::spawn(move || {
                std::thread::sleep(window);
                offer_profile(&m2, &*store, &manifest);
            });
        }
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
        if let Some(m) = m {
            offer_profile(&m, &*self.store, "");
            if let Some(h) = m.handle.lock().ok().and_then(|mut h| h.take()) {
                h.unmount()?;
            }
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
            offer_profile(&m, &*self.store, "");
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

/// Offers `m`'s recorded profile to the store once (nothing if it recorded none or nothing).
fn offer_profile(m: &MountedImage, store: &dyn super::store::ArchiveStore, manifest: &str) {
    if !m.recording || m.profile_offered.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some(mut p) = m
        .handle
        .lock()
        .ok()
        .and_then(|h| h.as_ref().and_then(fs::MountHandle::profile))
    else {
        return;
    };
    if p.touches.is_empty() {
        // Nothing read yet: let a later moment (a container's exit, the unmount) offer it.
        m.profile_offered.store(false, Ordering::SeqCst);
        return;
    }
    if !manifest.is_empty() {
        manifest.clone_into(&mut p.image);
    }
    let refined = if let Some(base) = &m.shared {
        let Some(merged) = refine(base, &p) else {
            tracing::debug!(image_id = %m.image_id, "this run read nothing new worth refining the shared profile");
            return;
        };
        p = fs::Profile {
            image: p.image,
            ..merged
        };
        true
    } else {
        false
    };
    let Ok(bytes) = serde_json::to_vec(&p) else {
        return;
    };
    let name = profile_name(&m.image_id, m.next_generation);
    match store.put_small_if_absent(&name, &bytes) {
        Ok(true) if refined => {
            tracing::info!(image_id = %m.image_id, touches = p.touches.len(), generation = m.next_generation, "refined the image's shared prefetch profile");
            metrics::counter!("clip_profiles_refined_total").increment(1);
        }
        Ok(true) => {
            tracing::info!(image_id = %m.image_id, touches = p.touches.len(), "shared the image's prefetch profile");
            metrics::counter!("clip_profiles_shared_total").increment(1);
        }
        Ok(false) => {
            tracing::debug!(image_id = %m.image_id, object = %name, "another worker published this profile generation first");
        }
        Err(e) => {
            tracing::warn!(image_id = %m.image_id, error = %e, "could not share the prefetch profile");
        }
    }
}

/// The span store of policy `spanStore.s3`: `s3://BUCKET/PREFIX` (spans under `PREFIX/spans/`).
#[must_use]
pub fn span_store_options(s3: &clip_policy::S3Store) -> fs::SpanStoreOptions {
    let prefix = s3.prefix.trim_matches('/');
    let url = if prefix.is_empty() {
        format!("s3://{}", s3.bucket)
    } else {
        format!("s3://{}/{prefix}", s3.bucket)
    };
    fs::SpanStoreOptions::new(&url, super::store::remote_options(s3))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{fs, refine};

    fn profile(touches: &[(&str, u64, u64)]) -> fs::Profile {
        fs::Profile {
            version: 1,
            image: String::new(),
            touches: touches
                .iter()
                .map(|&(p, offset, len)| fs::profile::Touch {
                    path: p.into(),
                    offset,
                    len,
                })
                .collect(),
        }
    }

    #[test]
    fn a_refinement_adds_only_uncovered_ranges_worth_it() {
        let base = profile(&[("/a", 0, 1 << 20)]);
        // Covered (inside a base range): nothing new.
        assert!(refine(&base, &profile(&[("/a", 4096, 8192)])).is_none());
        // New, but under 64 KiB, or under a tenth of the base's bytes.
        assert!(refine(&base, &profile(&[("/b", 0, 60 << 10)])).is_none());
        let big = profile(&[("/a", 0, 10 << 20)]);
        assert!(refine(&big, &profile(&[("/b", 0, 512 << 10)])).is_none());
        // Worth it: the base, then the new ranges only.
        let r = refine(&base, &profile(&[("/a", 0, 4096), ("/b", 0, 256 << 10)])).unwrap();
        assert_eq!(r, profile(&[("/a", 0, 1 << 20), ("/b", 0, 256 << 10)]));
        // Bounded: at most twice the base's touches plus 1024.
        let many: Vec<(&str, u64, u64)> = (0..5000).map(|i| ("/c", i * 65536, 65536)).collect();
        let r = refine(&base, &profile(&many)).unwrap();
        assert_eq!(r.touches.len(), 2 + 1024);
    }
}
