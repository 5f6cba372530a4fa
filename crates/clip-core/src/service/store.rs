//! The archive store: where `<id>.clip` archives live and how workers share them.
//!
//! One trait, [`ArchiveStore`], two implementations: a local directory ([`LocalStore`]) and an
//! S3 bucket prefix ([`S3ArchiveStore`], any S3 API server). Both publish create-only — a local
//! store by a hard link that fails if the name exists, S3 by a conditional `If-None-Match: *`
//! PUT — so when several workers archive one image at once, the first wins and the others reuse
//! its archive. An S3 store also shares per-layer indexes under `<prefix>layers/`
//! ([`S3LayerStore`]), so base layers are indexed once per fleet.
//!
//! What is read back from an S3 store is bounded in size and, unless `allowUnsigned`, must be
//! signed by a key the node trusts ([`crate::node::trust`], `clip_objstore::signed`): archives and layer
//! indexes are written signed with `signingKey` (the object's name bound into the signature) and
//! an unsigned, altered or foreign-signed one is refused — an archive is then replaced by this
//! node's own, a layer index indexed again. A local directory store is the node's own disk and
//! is trusted as such.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clip_objstore::signed::{HEADER_LEN, Trust, is_signed};
use clip_objstore::{RemoteObject, RemoteOptions};

use super::error::{ServiceError, io};
use super::id::ImageId;
use super::short_hash;
use crate::{format, indexer};

/// The two kinds of archive a flow makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArchiveVersion {
    /// Data-carrying (local or with its data in object storage).
    V1,
    /// Index-only; file bytes stay in the registry.
    V2,
}

impl ArchiveVersion {
    /// The version of an archive of `kind`.
    #[must_use]
    pub fn of(kind: format::ArchiveKind) -> Self {
        match kind {
            format::ArchiveKind::V2Oci => Self::V2,
            format::ArchiveKind::V1Local | format::ArchiveKind::V1Remote => Self::V1,
        }
    }

    /// 1 or 2, as the configuration (`clipVersion`) and the JSON results spell it.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// The metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::V1 => "1",
            Self::V2 => "2",
        }
    }
}

impl std::fmt::Display for ArchiveVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.number())
    }
}

impl serde::Serialize for ArchiveVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.number())
    }
}

/// An archive in the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredArchive {
    /// The image id it is stored under.
    pub image_id: String,
    /// Where it lives (a path or an `s3://` URL).
    pub location: String,
    /// Its size (for a v1 archive in S3: the metadata archive's).
    pub bytes: u64,
    /// Its version.
    pub version: ArchiveVersion,
}

/// Where `<id>.clip` archives live.
pub trait ArchiveStore: Send + Sync + std::fmt::Debug {
    /// Where image `id`'s archive lives (a path or URL), for results and logs.
    fn location(&self, id: &ImageId) -> String;
    /// Image `id`'s archive as a local file: the store's own file (local store) or a copy in the
    /// cache (S3); `None` when the store does not have it.
    fn get(&self, id: &ImageId) -> Result<Option<PathBuf>, ServiceError>;
    /// Forgets a local copy made by [`ArchiveStore::get`] (it is damaged); a no-op for a local
    /// store.
    fn forget_copy(&self, id: &ImageId);
    /// Publishes the finished archive at `local` under `id` unless the store has one already;
    /// `Ok(true)` when this call published it. `local` is consumed either way.
    fn put_if_absent(&self, id: &ImageId, local: &Path) -> Result<bool, ServiceError>;
    /// Publishes `local` under `id`, over whatever the store holds. `local` is consumed.
    fn replace(&self, id: &ImageId, local: &Path) -> Result<(), ServiceError>;
    /// The archives in the store, sorted by id.
    fn list(&self) -> Result<Vec<StoredArchive>, ServiceError>;
    /// Where flows write new archives before publishing them.
    fn staging(&self) -> &Path;
    /// The layer-index store every worker of this archive store shares, if any.
    fn shared_layer_indexes(&self) -> Option<Box<dyn indexer::LayerIndexStore>>;
    /// A small object kept beside the archives (`<id>.profile.json`), if the store has it.
    fn get_small(&self, name: &str) -> Option<Vec<u8>>;
    /// Stores a small object beside the archives unless one exists (create-only); `Ok(true)`
    /// when this call stored it.
    fn put_small_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, ServiceError>;
}

/// A local directory of `<id>.clip` files; new archives are staged in `<dir>/.staging`.
#[derive(Debug)]
pub struct LocalStore {
    dir: PathBuf,
    staging: PathBuf,
}

impl LocalStore {
    /// The store in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, ServiceError> {
        let staging = dir.join(".staging");
        crate::host::private_dir(dir)?;
        crate::host::private_dir(&staging)?;
        Ok(Self {
            dir: dir.to_owned(),
            staging,
        })
    }

    fn path(&self, id: &ImageId) -> PathBuf {
        self.dir.join(format!("{id}.clip"))
    }
}

impl ArchiveStore for LocalStore {
    fn location(&self, id: &ImageId) -> String {
        self.path(id).display().to_string()
    }

    fn get(&self, id: &ImageId) -> Result<Option<PathBuf>, ServiceError> {
        let p = self.path(id);
        Ok(p.exists().then_some(p))
    }

    fn forget_copy(&self, _id: &ImageId) {}

    fn put_if_absent(&self, id: &ImageId, local: &Path) -> Result<bool, ServiceError> {
        // A hard link is created only if the name is free: the local create-only write.
        let target = self.path(id);
        let created = match std::fs::hard_link(local, &target) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io("publishing", &target)(e)),
        };
        let _ = std::fs::remove_file(local);
        Ok(created)
    }

    fn replace(&self, id: &ImageId, local: &Path) -> Result<(), ServiceError> {
        let target = self.path(id);
        std::fs::rename(local, &target).map_err(io("publishing", &target))
    }

    fn list(&self) -> Result<Vec<StoredArchive>, ServiceError> {
        let mut out: Vec<StoredArchive> = std::fs::read_dir(&self.dir)
            .map_err(io("listing", &self.dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = ImageId::parse(name.strip_suffix(".clip")?)?;
                let a = format::Archive::open(&e.path()).ok()?;
                Some(StoredArchive {
                    location: e.path().display().to_string(),
                    image_id: id.to_string(),
                    bytes: e.metadata().ok()?.len(),
                    version: ArchiveVersion::of(a.kind()),
                })
            })
            .collect();
        out.sort_by(|a, b| a.image_id.cmp(&b.image_id));
        Ok(out)
    }

    fn staging(&self) -> &Path {
        &self.staging
    }

    fn get_small(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(name)).ok()
    }

    fn put_small_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, ServiceError> {
        let tmp = self.staging.join(format!(
            "{name}.{}",
            short_hash(&[std::process::id().to_string().as_bytes(), name.as_bytes()])
        ));
        crate::host::publish_bytes(&tmp, bytes)?;
        let target = self.dir.join(name);
        let created = match std::fs::hard_link(&tmp, &target) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io("publishing", &target)(e));
            }
        };
        let _ = std::fs::remove_file(&tmp);
        Ok(created)
    }

    fn shared_layer_indexes(&self) -> Option<Box<dyn indexer::LayerIndexStore>> {
        None
    }
}

/// `s3://BUCKET/PREFIX<id>.clip` objects; v1 archives keep their data in
/// `PREFIX<id>.data.<nonce>.clip` behind a v1-remote metadata archive stored as `PREFIX<id>.clip`.
/// Archives read back are cached in `<cacheDir>/archives`.
#[derive(Debug)]
pub struct S3ArchiveStore {
    bucket: String,
    prefix: String,
    opts: RemoteOptions,
    runtime: tokio::runtime::Handle,
    staging: PathBuf,
    copies: PathBuf,
    trust: Arc<Trust>,
}

impl S3ArchiveStore {
    /// The store `s3` describes; `cache_dir` holds staging files and local copies, and
    /// `runtime` drives the requests.
    pub fn open(
        s3: &clip_policy::S3Store,
        cache_dir: &Path,
        runtime: tokio::runtime::Handle,
        trust: Arc<Trust>,
    ) -> Result<Self, ServiceError> {
        let staging = cache_dir.join("outgoing");
        let copies = cache_dir.join("archives");
        for d in [&staging, &copies] {
            crate::host::private_dir(d)?;
        }
        Ok(Self {
            bucket: s3.bucket.clone(),
            prefix: s3.prefix.clone(),
            opts: crate::node::remote_options(s3),
            runtime,
            staging,
            copies,
            trust,
        })
    }

    fn url(&self, name: &str) -> String {
        format!("s3://{}/{}{name}", self.bucket, self.prefix)
    }

    fn object(&self, name: &str) -> Result<RemoteObject, ServiceError> {
        Ok(RemoteObject::open(&self.url(name), &self.opts)?)
    }

    fn copy_path(&self, id: &ImageId) -> PathBuf {
        self.copies.join(format!("{id}.clip"))
    }

    /// Uploads `local`: a v2 archive as it is; a v1 archive's data to a data object of its own
    /// (a name per upload, so a losing writer never overwrites the data a winner's metadata
    /// points at) and its metadata archive as the bytes to put under `<id>.clip`. Returns those
    /// bytes and the data object, if any.
    fn prepare(
        &self,
        id: &ImageId,
        local: &Path,
    ) -> Result<(Vec<u8>, Option<RemoteObject>), ServiceError> {
        let kind = format::Archive::open(local)?.kind();
        if kind != format::ArchiveKind::V1Local {
            let bytes = std::fs::read(local).map_err(io("reading", local))?;
            return Ok((bytes, None));
        }
        let nonce = super::short_hash(&[
            std::process::id().to_string().as_bytes(),
            format!("{:?}", std::time::SystemTime::now()).as_bytes(),
            id.as_str().as_bytes(),
        ]);
        let data_url = self.url(&format!("{id}.data.{nonce}.clip"));
        let meta = local.with_extension("remote.clip");
        crate::archive::upload_v1(&self.runtime, local, &data_url, &meta, &self.opts, None)?;
        let bytes = std::fs::read(&meta).map_err(io("reading", &meta));
        let _ = std::fs::remove_file(&meta);
        Ok((bytes?, Some(RemoteObject::open(&data_url, &self.opts)?)))
    }
}

/// Publishes the bytes of `from` after its first `at` as `to` (a temporary file, fsynced, renamed).
fn publish_tail(from: &Path, at: u64, to: &Path) -> Result<(), ServiceError> {
    use std::io::{Seek as _, SeekFrom};
    if at == 0 {
        return std::fs::hard_link(from, to)
            .or_else(|_| std::fs::copy(from, to).map(|_| ()))
            .map_err(io("publishing", to));
    }
    let tmp = to.with_extension(format!("clip.tail-{}", std::process::id()));
    let copy = || -> std::io::Result<()> {
        let mut src = std::fs::File::open(from)?;
        src.seek(SeekFrom::Start(at))?;
        let mut dst = std::fs::File::create(&tmp)?;
        std::io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
        std::fs::rename(&tmp, to)
    };
    copy().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("publishing", to)(e)
    })
}

/// The largest archive read from an S3 store (a v2 index or a v1-remote metadata archive is
/// megabytes; the bound stops a damaged or hostile object from filling the disk).
const MAX_ARCHIVE_OBJECT: u64 = 4 << 30;
/// The largest small object (a prefetch profile) read from a store.
pub const MAX_SMALL_OBJECT: u64 = 32 << 20;
/// The largest layer index read from a shared store.
const MAX_LAYER_INDEX_OBJECT: u64 = 256 << 20;

impl ArchiveStore for S3ArchiveStore {
    fn location(&self, id: &ImageId) -> String {
        self.url(&format!("{id}.clip"))
    }

    fn get(&self, id: &ImageId) -> Result<Option<PathBuf>, ServiceError> {
        let local = self.copy_path(id);
        if local.exists() {
            return Ok(Some(local));
        }
        let name = format!("{id}.clip");
        let obj = self.object(&name)?;
        // Streamed to a private temporary file, bounded; its signature checked; its payload
        // published as the local copy.
        let tmp = local.with_extension(format!("clip.part-{}", std::process::id()));
        if !self
            .runtime
            .block_on(obj.download_bounded(&tmp, MAX_ARCHIVE_OBJECT))?
        {
            return Ok(None);
        }
        let published = self
            .trust
            .open_file(&name, &tmp)
            .map_err(ServiceError::from)
            .and_then(|at| publish_tail(&tmp, at, &local));
        let _ = std::fs::remove_file(&tmp);
        published?;
        Ok(Some(local))
    }

    fn forget_copy(&self, id: &ImageId) {
        let _ = std::fs::remove_file(self.copy_path(id));
    }

    fn put_if_absent(&self, id: &ImageId, local: &Path) -> Result<bool, ServiceError> {
        let prepared = self.prepare(id, local);
        let _ = std::fs::remove_file(local);
        let (bytes, data) = prepared?;
        let name = format!("{id}.clip");
        let obj = self.object(&name)?;
        let created = self
            .runtime
            .block_on(obj.put_if_absent(&self.trust.seal(&name, &bytes)))?;
        if !created
            && let Some(data) = data
            && let Err(e) = self.runtime.block_on(data.delete())
        {
            tracing::warn!(url = %data.url(), error = %e, "could not delete an unused data object");
        }
        Ok(created)
    }

    fn replace(&self, id: &ImageId, local: &Path) -> Result<(), ServiceError> {
        let prepared = self.prepare(id, local);
        let _ = std::fs::remove_file(local);
        let (bytes, _) = prepared?;
        let name = format!("{id}.clip");
        let obj = self.object(&name)?;
        self.runtime
            .block_on(obj.upload(&self.trust.seal(&name, &bytes), None))?;
        self.forget_copy(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<StoredArchive>, ServiceError> {
        // The prefix itself (not `object`, which names things below it).
        let prefix = RemoteObject::open(
            &format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/')),
            &self.opts,
        )?;
        let names = if self.prefix.is_empty() || self.prefix.ends_with('/') {
            self.runtime.block_on(prefix.list_children())?
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        for name in names {
            let Some(id) = name.strip_suffix(".clip").and_then(ImageId::parse) else {
                continue;
            };
            let obj = self.object(&name)?;
            // A signed archive's header comes first: the archive's own starts after it.
            let sig = HEADER_LEN as u64;
            let (head, size) = self.runtime.block_on(async {
                let size = obj.size().await?;
                Ok::<_, clip_objstore::Error>((obj.get_range(0..size.min(64 + sig)).await?, size))
            })?;
            let (head, bytes) = if is_signed(&head) {
                (
                    head.get(HEADER_LEN..).unwrap_or_default(),
                    size.saturating_sub(sig),
                )
            } else {
                (&head[..], size)
            };
            let Some(kind) = format::peek_kind(head) else {
                continue;
            };
            out.push(StoredArchive {
                image_id: id.to_string(),
                location: obj.url().to_owned(),
                bytes,
                version: ArchiveVersion::of(kind),
            });
        }
        Ok(out)
    }

    fn staging(&self) -> &Path {
        &self.staging
    }

    fn get_small(&self, name: &str) -> Option<Vec<u8>> {
        let obj = self.object(name).ok()?;
        match self.runtime.block_on(obj.get_bounded(MAX_SMALL_OBJECT)) {
            Ok(b) => b.map(|b| b.to_vec()),
            Err(e) => {
                tracing::warn!(object = %self.url(name), error = %e, "archive store unreachable");
                None
            }
        }
    }

    fn put_small_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, ServiceError> {
        let obj = self.object(name)?;
        Ok(self.runtime.block_on(obj.put_if_absent(bytes))?)
    }

    fn shared_layer_indexes(&self) -> Option<Box<dyn indexer::LayerIndexStore>> {
        match self.object("layers") {
            Ok(prefix) => Some(Box::new(S3LayerStore {
                prefix,
                runtime: self.runtime.clone(),
                trust: Arc::clone(&self.trust),
            })),
            Err(e) => {
                tracing::warn!(url = %self.url("layers"), error = %e, "layer index store unusable; layers are indexed locally only");
                None
            }
        }
    }
}

/// Layer indexes in the S3 archive store, under `<prefix>layers/`, shared by every worker;
/// written create-only, on the service's client and runtime.
#[derive(Debug)]
pub struct S3LayerStore {
    prefix: RemoteObject,
    runtime: tokio::runtime::Handle,
    trust: Arc<Trust>,
}

impl indexer::LayerIndexStore for S3LayerStore {
    /// A stored layer index, if it is signed by a trusted key (anyone with the bucket's write
    /// keys could otherwise give every image on that layer files, modes and setuid bits of
    /// their choosing).
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self
            .runtime
            .block_on(self.prefix.child(key).get_bounded(MAX_LAYER_INDEX_OBJECT))
        {
            Ok(b) => {
                let b = b?;
                match self.trust.open(key, &b) {
                    Ok(payload) => Some(payload.to_vec()),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "stored layer index refused; indexing the layer here");
                        metrics::counter!("clip_store_objects_refused_total", "kind" => "layer_index")
                            .increment(1);
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "layer index store unreachable");
                None
            }
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool> {
        self.runtime
            .block_on(
                self.prefix
                    .child(key)
                    .put_if_absent(&self.trust.seal(key, bytes)),
            )
            .map_err(std::io::Error::other)
    }

    fn describe(&self) -> String {
        format!("{}/", self.prefix.url())
    }
}

/// The store the configuration names.
pub(crate) fn open(
    cfg: &clip_policy::Config,
    runtime: &tokio::runtime::Handle,
) -> Result<Arc<dyn ArchiveStore>, ServiceError> {
    Ok(match &cfg.archive_store {
        clip_policy::ArchiveStore::Local(dir) => Arc::new(LocalStore::open(dir)?),
        clip_policy::ArchiveStore::S3(s3) => Arc::new(S3ArchiveStore::open(
            s3,
            &cfg.cache_dir,
            runtime.clone(),
            Arc::new(crate::node::trust(cfg)?),
        )?),
    })
}
