//! The image service: the seed's three worker flows over the capability crates.
//!
//! - [`ImageService::pull_and_archive`]: v2 indexes straight from the source registry; v1
//!   copies, extracts and archives. A v2 failure falls back to v1 with its reason.
//! - [`ImageService::build_and_archive`]: `buildah bud`, then (v2, build registry reachable)
//!   push to the build registry and index from it; otherwise, or on any v2 failure, push to an
//!   OCI layout and archive it as v1. Builds never fail because of v2.
//! - [`ImageService::pull_lazy`]: fetch `<id>.clip` from the archive store into the local cache
//!   (per-image lock, atomic copy), detect v1/v2, mount it once per image; containers get their
//!   own overlay on top ([`ImageService::run`]).
//!
//! Archives are stored as `<id>.clip`; ids are stable: the hash of the platform manifest digest
//! and repository for pulls, of the Dockerfile, the context's content and the build args for
//! builds. Log lines follow the seed's wording.
//!
//! Workers sharing a store coordinate through it: a flow whose `<id>.clip` (of the planned
//! version) is in the store answers with it and does no work; archives and per-layer indexes are
//! published with create-only conditional writes, so concurrent workers produce one archive and
//! the others reuse it. Layer indexes are kept in `<cacheDir>/layers` and, with an S3 store,
//! under `<prefix>layers/`, so base layers are indexed once per fleet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clip_policy::{ArchiveStore, BuildPlan, Config, PullPlan, RegistryProbe};
use sha2::{Digest as _, Sha256};

use crate::{format, fs, registry};

/// Why a flow failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] clip_policy::Error),
    /// Registry problem.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// v2 indexing failed.
    #[error(transparent)]
    Index(#[from] crate::indexer::Error),
    /// v1 archiving or extraction failed.
    #[error(transparent)]
    Extract(#[from] crate::extract::Error),
    /// Mounting failed.
    #[error(transparent)]
    Mount(#[from] fs::Error),
    /// The archive is invalid.
    #[error(transparent)]
    Format(#[from] format::Error),
    /// Preparing or running a container failed.
    #[error(transparent)]
    Container(#[from] crate::container::ContainerError),
    /// A build tool failed.
    #[error("{command} failed: {output}")]
    Tool {
        /// The command.
        command: String,
        /// Its stderr.
        output: String,
    },
    /// No archive for this image id in the store.
    #[error("no archive for image {0} in the archive store")]
    UnknownImage(String),
    /// Something else (I/O, unsupported settings).
    #[error("{0}")]
    Other(String),
}

fn other(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServiceError {
    let what = what.to_string();
    move |e| ServiceError::Other(format!("{what}: {e}"))
}

/// What a pull or build produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ArchiveResult {
    /// Stable image id.
    pub image_id: String,
    /// Archive version used (1 or 2).
    pub version: u8,
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
}

/// A flow in progress: its name (the metrics label), when it started, and whether its archive
/// replaces one of the other version in the store.
#[derive(Clone, Copy)]
struct Flow {
    name: &'static str,
    start: Instant,
    replace: bool,
}

/// What the store holds for an image before a flow does any work.
enum Stored {
    /// Nothing: the flow creates the archive (create-only).
    Absent,
    /// An archive of the planned version: the flow's answer.
    Same(ArchiveResult),
    /// An archive of the other version: the flow replaces it.
    Other,
}

/// A mounted image.
#[derive(Debug)]
pub struct MountedImage {
    /// Its id.
    pub image_id: String,
    /// 1 or 2.
    pub version: u8,
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

/// A finished container run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunOutput {
    /// Exit code.
    pub status: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
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
    client_cfg: registry::ClientConfig,
    mounts: Mutex<HashMap<String, Arc<MountedImage>>>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    layer_store: Arc<dyn crate::indexer::LayerIndexStore>,
}

/// Layer indexes in the S3 archive store, under `<prefix>layers/`, shared by every worker;
/// written create-only. One client and one small runtime serve the service's lifetime, so
/// connections are reused across layers and images.
#[derive(Debug)]
struct S3LayerStore {
    prefix: crate::extract::remote::RemoteObject,
    /// Started on first use (from an indexing thread); `None` if it could not be.
    runtime: std::sync::OnceLock<Option<tokio::runtime::Runtime>>,
}

impl S3LayerStore {
    fn open(s3: &clip_policy::S3Store) -> Option<Self> {
        let url = ImageService::s3_url(s3, "layers");
        match crate::extract::remote::RemoteObject::open(&url, &ImageService::s3_options(s3)) {
            Ok(prefix) => Some(Self {
                prefix,
                runtime: std::sync::OnceLock::new(),
            }),
            Err(e) => {
                tracing::warn!(url, error = %e, "layer index store unusable; layers are indexed locally only");
                None
            }
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> std::io::Result<F::Output> {
        let rt = self.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("clip-layer-store")
                .enable_all()
                .build()
                .ok()
        });
        rt.as_ref()
            .map(|rt| rt.block_on(f))
            .ok_or_else(|| std::io::Error::other("cannot start the layer store's runtime"))
    }
}

impl Drop for S3LayerStore {
    fn drop(&mut self) {
        // The service may be dropped inside an async context, where a runtime cannot block.
        if let Some(Some(rt)) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl crate::indexer::LayerIndexStore for S3LayerStore {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.block_on(self.prefix.child(key).get_all()) {
            Ok(Ok(b)) => b.map(|b| b.to_vec()),
            Ok(Err(e)) => {
                tracing::warn!(key, error = %e, "layer index store unreachable");
                None
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "layer index store unusable");
                None
            }
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool> {
        self.block_on(self.prefix.child(key).put_if_absent(bytes))?
            .map_err(std::io::Error::other)
    }

    fn describe(&self) -> String {
        format!("{}/", self.prefix.url())
    }
}

impl std::fmt::Debug for ImageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageService")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl ImageService {
    /// A service for `cfg`: registry credentials from the config, then docker's `config.json`.
    pub fn new(cfg: Config, opts: ServiceOptions) -> Result<Self, ServiceError> {
        let store = match &cfg.archive_store {
            ArchiveStore::Local(dir) => dir.clone(),
            ArchiveStore::S3(_) => cfg.cache_dir.join("outgoing"),
        };
        for d in [&store, &cfg.cache_dir, &cfg.mount_base] {
            std::fs::create_dir_all(d).map_err(other(format!("creating {}", d.display())))?;
        }
        let docker_config = registry::dockerconfig::default_path()
            .map(|p| registry::dockerconfig::DockerConfig::load(&p))
            .transpose()?
            .map(Arc::new);
        let mut client_cfg = registry::ClientConfig {
            docker_config,
            ..registry::ClientConfig::default()
        };
        for (host, e) in &cfg.registries {
            let host = if host == "docker" { "docker.io" } else { host };
            if e.insecure {
                client_cfg.insecure.push(host.to_owned());
            }
            if let (Some(u), Some(p)) = (&e.username, &e.password) {
                client_cfg.credentials.push((
                    host.to_owned(),
                    registry::Credentials::Basic {
                        username: u.clone(),
                        password: p.clone(),
                    },
                ));
            }
        }
        // Layer indexes: this worker's cache first, then (S3) the store every worker shares.
        let mut tiers: Vec<Box<dyn crate::indexer::LayerIndexStore>> = vec![Box::new(
            crate::indexer::DirLayerStore::new(cfg.cache_dir.join("layers")),
        )];
        if let ArchiveStore::S3(s3) = &cfg.archive_store
            && let Some(store) = S3LayerStore::open(s3)
        {
            tiers.push(Box::new(store));
        }
        let svc = Self {
            cfg,
            opts,
            client_cfg,
            mounts: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            layer_store: Arc::new(crate::indexer::Tiered(tiers)),
        };
        svc.clean_dead_mounts();
        Ok(svc)
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Where archives are written: the store itself (local), or a staging directory whose
    /// files are uploaded (S3).
    fn store_dir(&self) -> PathBuf {
        match &self.cfg.archive_store {
            ArchiveStore::Local(d) => d.clone(),
            ArchiveStore::S3(_) => self.cfg.cache_dir.join("outgoing"),
        }
    }

    /// Where image `id`'s archive is written locally (for a local store: where it lives).
    #[must_use]
    pub fn archive_path(&self, id: &str) -> PathBuf {
        self.store_dir().join(format!("{id}.clip"))
    }

    fn s3_options(s3: &clip_policy::S3Store) -> crate::extract::remote::RemoteOptions {
        crate::extract::remote::RemoteOptions {
            endpoint: s3.endpoint.clone(),
            region: s3.region.clone(),
            access_key_id: s3.access_key_id.clone(),
            secret_access_key: s3.secret_access_key.clone(),
            path_style: s3.force_path_style,
        }
    }

    fn s3_url(s3: &clip_policy::S3Store, name: &str) -> String {
        format!("s3://{}/{}{name}", s3.bucket, s3.prefix)
    }

    /// Moves a finished archive into the store: nothing to do for a local store; for S3, a v2
    /// archive is uploaded as `<prefix><id>.clip`, and a v1 archive's data goes to
    /// `<prefix><id>.data.<nonce>.clip` behind a v1-remote metadata archive stored as `<prefix><id>.clip`.
    /// Returns where it lives and whether this call published it: `<id>.clip` is written
    /// create-only, so when several workers archive one image at once, the first wins and the
    /// others keep its archive (a losing v1 upload deletes its own data object). v1 data objects
    /// get a name of their own per upload, so a loser never overwrites the data a winner's
    /// metadata points at.
    /// With `replace` (the store holds the other version), the archive is overwritten instead.
    fn publish(
        &self,
        id: &str,
        version: u8,
        local: &Path,
        replace: bool,
    ) -> Result<(String, bool), ServiceError> {
        let ArchiveStore::S3(s3) = &self.cfg.archive_store else {
            return Ok((local.display().to_string(), true));
        };
        let opts = Self::s3_options(s3);
        let index_url = Self::s3_url(s3, &format!("{id}.clip"));
        let obj = crate::extract::remote::RemoteObject::open(&index_url, &opts)?;
        let rt = runtime()?;
        let put = |rt: &tokio::runtime::Runtime,
                   obj: &crate::extract::remote::RemoteObject,
                   bytes: &[u8]|
         -> Result<bool, ServiceError> {
            if replace {
                rt.block_on(obj.upload(bytes, None))?;
                Ok(true)
            } else {
                Ok(rt.block_on(obj.put_if_absent(bytes))?)
            }
        };
        let created = if version == 1 {
            let meta = local.with_extension("remote.clip");
            let nonce = short_hash(&[
                std::process::id().to_string().as_bytes(),
                format!("{:?}", std::time::SystemTime::now()).as_bytes(),
                id.as_bytes(),
            ]);
            let data_url = Self::s3_url(s3, &format!("{id}.data.{nonce}.clip"));
            crate::extract::remote::upload_v1(local, &data_url, &meta, &opts, None)?;
            let bytes = std::fs::read(&meta).map_err(other("reading the metadata archive"))?;
            let _ = std::fs::remove_file(&meta);
            let created = put(&rt, &obj, &bytes)?;
            if !created {
                let data = crate::extract::remote::RemoteObject::open(&data_url, &opts)?;
                if let Err(e) = rt.block_on(data.delete()) {
                    tracing::warn!(url = %data_url, error = %e, "could not delete an unused data object");
                }
            }
            created
        } else {
            let bytes = std::fs::read(local).map_err(other("reading the archive"))?;
            put(&rt, &obj, &bytes)?
        };
        let _ = std::fs::remove_file(local);
        if created {
            tracing::info!(image_id = id, url = %index_url, "archive stored");
        } else {
            tracing::info!(image_id = id, url = %index_url, "archive already stored by another worker; reusing it");
        }
        Ok((index_url, created))
    }

    /// Image `id`'s archive when the store has it already: `(where, bytes, version)`. For an
    /// S3 store the archive is fetched into the local cache (PullLazy uses it from there).
    fn stored(&self, id: &str) -> Result<Option<(String, u64, u8)>, ServiceError> {
        let (place, local) = match &self.cfg.archive_store {
            ArchiveStore::Local(_) => {
                let p = self.archive_path(id);
                if !p.exists() {
                    return Ok(None);
                }
                (p.display().to_string(), p)
            }
            ArchiveStore::S3(s3) => {
                let url = Self::s3_url(s3, &format!("{id}.clip"));
                let obj = crate::extract::remote::RemoteObject::open(&url, &Self::s3_options(s3))?;
                if !runtime()?.block_on(obj.exists())? {
                    return Ok(None);
                }
                let dir = self.cfg.cache_dir.join("archives");
                std::fs::create_dir_all(&dir).map_err(other("creating the archive cache"))?;
                let local = dir.join(format!("{id}.clip"));
                if !local.exists() {
                    self.fetch_archive(id, &local)?;
                }
                (url, local)
            }
        };
        let a = match format::Archive::open(&local) {
            Ok(a) => a,
            Err(e) => {
                // A damaged archive is replaced, not served: version 0 matches no plan.
                tracing::warn!(image_id = id, archive = %place, error = %e, "stored archive is unreadable; it will be replaced");
                if matches!(self.cfg.archive_store, ArchiveStore::S3(_)) {
                    let _ = std::fs::remove_file(&local);
                }
                return Ok(Some((place, 0, 0)));
            }
        };
        let version = if a.kind() == format::ArchiveKind::V2Oci {
            2
        } else {
            1
        };
        let bytes = std::fs::metadata(&local).map_or(0, |m| m.len());
        Ok(Some((place, bytes, version)))
    }

    /// Looks for image `id`'s archive in the store before any work: an archive of the `planned`
    /// version is reused as it is; one of the other version is to be replaced (a rollout step
    /// moved the image); none is to be created.
    fn check_store(
        &self,
        flow: &'static str,
        id: &str,
        planned: u8,
        start: Instant,
    ) -> Result<Stored, ServiceError> {
        match self.stored(id)? {
            None => Ok(Stored::Absent),
            Some(found) if found.2 == planned => {
                Ok(Stored::Same(Self::reused(flow, id, found, start)))
            }
            Some((archive, _, version)) => {
                tracing::info!(image_id = id, archive = %archive, "the store holds a v{version} archive; replacing it with v{planned}");
                Ok(Stored::Other)
            }
        }
    }

    /// The result for an image whose archive `found` is already in the store.
    fn reused(
        flow: &'static str,
        id: &str,
        (archive, bytes, version): (String, u64, u8),
        start: Instant,
    ) -> ArchiveResult {
        tracing::info!(image_id = id, archive = %archive, version, "archive already in the store; reusing it");
        let v = if version == 2 { "2" } else { "1" };
        metrics::counter!("clip_archives_reused_total", "flow" => flow, "version" => v)
            .increment(1);
        ArchiveResult {
            image_id: id.to_owned(),
            version,
            archive,
            bytes,
            fallback_reason: None,
            seconds: start.elapsed().as_secs_f64(),
            reused: true,
            reused_layers: 0,
        }
    }

    /// Copies image `id`'s archive from the store to `dest` (atomically).
    fn fetch_archive(&self, id: &str, dest: &Path) -> Result<(), ServiceError> {
        let bytes = match &self.cfg.archive_store {
            ArchiveStore::Local(_) => {
                let src = self.archive_path(id);
                if !src.exists() {
                    return Err(ServiceError::UnknownImage(id.to_owned()));
                }
                std::fs::read(&src).map_err(other(format!("reading {}", src.display())))?
            }
            ArchiveStore::S3(s3) => {
                let obj = crate::extract::remote::RemoteObject::open(
                    &Self::s3_url(s3, &format!("{id}.clip")),
                    &Self::s3_options(s3),
                )?;
                runtime()?
                    .block_on(obj.get_all())
                    .ok()
                    .flatten()
                    .ok_or_else(|| ServiceError::UnknownImage(id.to_owned()))?
                    .to_vec()
            }
        };
        format::publish_bytes(dest, &bytes)?;
        Ok(())
    }

    fn client(&self) -> Result<registry::Client, ServiceError> {
        Ok(registry::Client::new(self.client_cfg.clone())?)
    }

    /// Detaches mounts under the mount base left by a killed worker.
    fn clean_dead_mounts(&self) {
        if let Ok(dir) = std::fs::read_dir(&self.cfg.mount_base) {
            for e in dir.flatten() {
                if fs::clean_stale_mount(&e.path()) {
                    tracing::warn!(path = %e.path().display(), "cleaned a dead mount");
                }
            }
        }
    }

    fn lock_for(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(locks.entry(id.to_owned()).or_default())
    }

    /// Pulls `image_ref` and stores its archive (v2 or v1 per the configuration).
    pub fn pull_and_archive(&self, image_ref: &str) -> Result<ArchiveResult, ServiceError> {
        let start = Instant::now();
        let reference = registry::Reference::parse(image_ref)?;
        let client = self.client()?;
        let rt = runtime()?;
        let resolved = rt
            .block_on(client.resolve(&reference, None))
            .map_err(|e| hinted(e, &reference.registry))?;
        let id = short_hash(&[
            reference.registry.as_bytes(),
            reference.repository.as_bytes(),
            resolved.manifest_digest.as_bytes(),
        ]);
        let plan = clip_policy::pull_plan(&self.cfg, &id);
        let planned = if plan == PullPlan::IndexFromRegistry {
            2
        } else {
            1
        };
        let replace = match self.check_store("pull", &id, planned, start)? {
            Stored::Same(r) => return Ok(r),
            Stored::Other => true,
            Stored::Absent => false,
        };
        let out = self.archive_path(&id);
        let mut fallback = None;
        if self.cfg.clip_version == 2 && !clip_policy::in_v2_rollout(&self.cfg, &id) {
            tracing::info!(image = image_ref, image_id = %id, percent = self.cfg.clip_v2_rollout_percent, "outside the v2 rollout: this image uses v1");
        }
        if plan == PullPlan::IndexFromRegistry {
            tracing::info!(
                image = image_ref,
                "Creating index-only archive directly from registry"
            );
            match crate::indexer::index_image_with(
                image_ref,
                &out,
                &client,
                &self.index_options(),
                None,
            ) {
                Ok(s) => {
                    tracing::info!(
                        image = image_ref,
                        bytes = s.archive_bytes,
                        reused_layers = s.reused_layers,
                        "v2 archive created directly from registry"
                    );
                    return self
                        .result(
                            &Flow {
                                name: "pull",
                                start,
                                replace,
                            },
                            id,
                            2,
                            &out,
                            None,
                        )
                        .map(|r| ArchiveResult {
                            reused_layers: s.reused_layers,
                            ..r
                        });
                }
                Err(e) => {
                    let reason = clip_policy::fallback_reason("v2 indexing failed", &e.to_string());
                    tracing::warn!(image = image_ref, reason = %reason, "falling back to v1");
                    fallback = Some(reason);
                }
            }
        }
        tracing::info!(image = image_ref, "Creating legacy archive (Clip v1)");
        crate::extract::archive_image(image_ref, &client, None, &out)?;
        self.result(
            &Flow {
                name: "pull",
                start,
                replace,
            },
            id,
            1,
            &out,
            fallback,
        )
    }

    fn index_options(&self) -> crate::indexer::IndexOptions {
        crate::indexer::IndexOptions {
            checkpoint_bytes: self.cfg.checkpoint_mib << 20,
            layer_store: Some(Arc::clone(&self.layer_store)),
            ..crate::indexer::IndexOptions::default()
        }
    }

    fn result(
        &self,
        flow: &Flow,
        image_id: String,
        version: u8,
        archive: &Path,
        fallback_reason: Option<String>,
    ) -> Result<ArchiveResult, ServiceError> {
        let Flow {
            name: flow,
            start,
            replace,
        } = *flow;
        let bytes = std::fs::metadata(archive).map_or(0, |m| m.len());
        let (stored, created) = self.publish(&image_id, version, archive, replace)?;
        if !created && let Some(found) = self.stored(&image_id)? {
            return Ok(Self::reused(flow, &image_id, found, start));
        }
        let v = if version == 2 { "2" } else { "1" };
        metrics::histogram!("clip_flow_seconds", "flow" => flow, "version" => v)
            .record(start.elapsed().as_secs_f64());
        metrics::histogram!("clip_archive_bytes", "flow" => flow, "version" => v)
            .record(bytes as f64);
        metrics::counter!("clip_archives_total", "flow" => flow, "version" => v).increment(1);
        if fallback_reason.is_some() {
            metrics::counter!("clip_fallbacks_total", "flow" => flow, "reason" => fallback_kind(fallback_reason.as_deref().unwrap_or(""))).increment(1);
        }
        Ok(ArchiveResult {
            image_id,
            version,
            archive: stored,
            bytes,
            fallback_reason,
            seconds: start.elapsed().as_secs_f64(),
            reused: false,
            reused_layers: 0,
        })
    }

    fn buildah(&self) -> Command {
        let mut c = Command::new("buildah");
        if let Some(root) = &self.opts.buildah_root {
            c.arg(format!("--root={}", root.join("root").display()))
                .arg(format!("--runroot={}", root.join("run").display()));
        }
        c.arg("--storage-driver=vfs");
        c
    }

    /// Probes the build registry: can a TCP connection be made?
    fn probe(&self) -> RegistryProbe {
        use std::net::ToSocketAddrs as _;
        let host = &self.cfg.build_registry;
        let target = if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:443")
        };
        let addrs = match target.to_socket_addrs() {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => return RegistryProbe::Unreachable(e.to_string()),
        };
        let mut last = "no address".to_owned();
        for a in addrs {
            match std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)) {
                Ok(_) => return RegistryProbe::Reachable,
                Err(e) => last = e.to_string().to_lowercase(),
            }
        }
        RegistryProbe::Unreachable(last)
    }

    /// Builds `dockerfile` in `context` with `build_args` and stores its archive. v2 problems
    /// fall back to v1; only a failing build itself fails.
    pub fn build_and_archive(
        &self,
        dockerfile: &Path,
        context: &Path,
        build_args: &[(String, String)],
    ) -> Result<ArchiveResult, ServiceError> {
        let start = Instant::now();
        let id = build_id(dockerfile, context, build_args)?;
        let plan = clip_policy::build_plan(&self.cfg, &id, &self.probe());
        let planned = if matches!(plan, BuildPlan::PushAndIndex { .. }) {
            2
        } else {
            1
        };
        let replace = match self.check_store("build", &id, planned, start)? {
            Stored::Same(r) => return Ok(r),
            Stored::Other => true,
            Stored::Absent => false,
        };
        let name = format!("localhost/clip-build-{id}");
        let mut bud = self.buildah();
        bud.args([
            "bud",
            "--isolation=chroot",
            "--layers=false",
            "--format=oci",
        ])
        .arg(format!("--file={}", dockerfile.display()))
        .arg(format!("--tag={name}"));
        // Base images from loopback or insecure registries are pulled over plain HTTP.
        let text = std::fs::read_to_string(dockerfile).unwrap_or_default();
        let plain_http = text.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|k| k.eq_ignore_ascii_case("FROM"))
                && w.find(|t| !t.starts_with("--")).is_some_and(|image| {
                    let host = image.split('/').next().unwrap_or("");
                    image.contains('/')
                        && (registry::is_loopback(host)
                            || self.cfg.registry(host).is_some_and(|e| e.insecure))
                })
        });
        if plain_http {
            bud.arg("--tls-verify=false");
        }
        for (k, v) in build_args {
            bud.arg(format!("--build-arg={k}={v}"));
        }
        bud.arg(context);
        let t = Instant::now();
        tool(&mut bud)?;
        phase("bud", t);
        let out = self.archive_path(&id);
        if self.cfg.clip_version == 2 && !clip_policy::in_v2_rollout(&self.cfg, &id) {
            tracing::info!(image_id = %id, percent = self.cfg.clip_v2_rollout_percent, "outside the v2 rollout: this image uses v1");
        }
        let mut fallback = match &plan {
            BuildPlan::V1 { reason } => reason.clone(),
            BuildPlan::PushAndIndex { .. } => None,
        };
        if let BuildPlan::V1 {
            reason: Some(reason),
        } = &plan
        {
            tracing::warn!(reason = %reason, "falling back to v1");
        }
        if let BuildPlan::PushAndIndex { registry } = plan {
            match self.push_and_index(&name, &registry, &id, &out) {
                Ok(reused_layers) => {
                    return self
                        .result(
                            &Flow {
                                name: "build",
                                start,
                                replace,
                            },
                            id,
                            2,
                            &out,
                            None,
                        )
                        .map(|r| ArchiveResult { reused_layers, ..r });
                }
                Err(reason) => {
                    tracing::warn!(reason = %reason, "falling back to v1");
                    fallback = Some(reason);
                }
            }
        }
        tracing::info!(image = %name, "Creating legacy archive (Clip v1)");
        let staging = tempfile::Builder::new()
            .prefix(".clip-build-")
            .tempdir_in(self.store_dir().as_path())
            .map_err(other("creating a staging directory"))?;
        let mut push = self.buildah();
        push.arg("push")
            .arg(&name)
            .arg(format!("oci:{}:image", staging.path().display()));
        let t = Instant::now();
        tool(&mut push)?;
        crate::extract::archive_layout(staging.path(), Some("image"), None, &out)?;
        phase("v1_archive", t);
        self.result(
            &Flow {
                name: "build",
                start,
                replace,
            },
            id,
            1,
            &out,
            fallback,
        )
    }

    /// v2 half of a build; any failure comes back as the reason to fall back.
    fn push_and_index(
        &self,
        name: &str,
        registry_host: &str,
        id: &str,
        out: &Path,
    ) -> Result<usize, String> {
        let target = format!("{registry_host}/clip/build-{id}:latest");
        tracing::info!("Pushing built image to registry: {target}");
        let mut push = self.buildah();
        push.arg("push");
        let insecure = registry::is_loopback(registry_host)
            || self.cfg.registry(registry_host).is_some_and(|e| e.insecure);
        if insecure {
            push.arg("--tls-verify=false");
        }
        if let Some(e) = self.cfg.registry(registry_host)
            && let (Some(u), Some(p)) = (&e.username, &e.password)
        {
            push.arg(format!("--creds={u}:{p}"));
        }
        push.arg(name).arg(format!("docker://{target}"));
        let t = Instant::now();
        let pushed = tool(&mut push);
        phase("push", t);
        if let Err(e) = pushed {
            tracing::warn!(error = %e, "failed to push to registry");
            return Err(clip_policy::fallback_reason(
                "failed to push to registry",
                &e.to_string(),
            ));
        }
        tracing::info!(image = %target, "Creating index-only archive (Clip v2)");
        let client = self.client().map_err(|e| e.to_string())?;
        let _index_timer = PhaseTimer("index", Instant::now());
        match crate::indexer::index_image_with(&target, out, &client, &self.index_options(), None) {
            Ok(s) => {
                tracing::info!(image = %target, bytes = s.archive_bytes, reused_layers = s.reused_layers, "v2 archive created from registry");
                Ok(s.reused_layers)
            }
            Err(e) => Err(clip_policy::fallback_reason(
                "v2 indexing failed",
                &e.to_string(),
            )),
        }
    }

    /// Fetches image `id`'s archive into the local cache, detects its version and mounts it
    /// once; concurrent callers for the same image share one mount.
    pub fn pull_lazy(&self, id: &str) -> Result<Arc<MountedImage>, ServiceError> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
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
        let local_dir = self.cfg.cache_dir.join("archives");
        std::fs::create_dir_all(&local_dir).map_err(other("creating the archive cache"))?;
        let local = local_dir.join(format!("{id}.clip"));
        if !local.exists() {
            self.fetch_archive(id, &local)?;
        }
        let archive = format::Archive::open(&local)?;
        let version = if archive.kind() == format::ArchiveKind::V2Oci {
            tracing::info!(image_id = id, "detected v2 (OCI) archive format");
            2
        } else {
            tracing::info!(image_id = id, "detected v1 archive format");
            1
        };
        let config = archive.meta().image.clone();
        drop(archive);
        let mountpoint = self.cfg.mount_base.join(id);
        std::fs::create_dir_all(&mountpoint).map_err(other("creating the mount point"))?;
        metrics::counter!("clip_mounts_total", "version" => if version == 2 { "2" } else { "1" })
            .increment(1);
        let handle = fs::mount_archive(fs::MountOptions {
            archive: local,
            mountpoint: mountpoint.clone(),
            cache_dir: self.cfg.cache_dir.join("spans"),
            cache_bytes: self.cfg.cache_size_gib << 30,
            registry: self.client_cfg.clone(),
            remote: match &self.cfg.archive_store {
                ArchiveStore::S3(s3) => Self::s3_options(s3),
                ArchiveStore::Local(_) => crate::extract::remote::RemoteOptions::default(),
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

    /// The archives in a local store: `(image id, archive bytes, version)`, sorted by id. An S3
    /// store is not listed (its archives are found by id).
    #[must_use]
    pub fn images(&self) -> Vec<(String, u64, u8)> {
        let ArchiveStore::Local(dir) = &self.cfg.archive_store else {
            return Vec::new();
        };
        let mut out: Vec<(String, u64, u8)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".clip")?.to_owned();
                if id.contains('.') {
                    return None;
                }
                let a = format::Archive::open(&e.path()).ok()?;
                let version = if a.kind() == format::ArchiveKind::V2Oci {
                    2
                } else {
                    1
                };
                Some((id, e.metadata().ok()?.len(), version))
            })
            .collect();
        out.sort();
        out
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

    /// Runs `args` (or the image's own command) in a new container of image `id`: PullLazy,
    /// an overlay of its own, an OCI bundle from the image config, `runc run`.
    pub fn run(&self, id: &str, args: Option<&[String]>) -> Result<RunOutput, ServiceError> {
        let image = self.pull_lazy(id)?;
        let cid = format!(
            "clip-{id}-{}",
            short_hash(&[
                std::process::id().to_string().as_bytes(),
                format!("{:?}", Instant::now()).as_bytes(),
            ])
        );
        let dir = self.cfg.mount_base.join("containers").join(&cid);
        let overlay = crate::container::Overlay::mount(&image.mountpoint, &dir)?;
        // Mount points runc needs, and the working directory, made in the upper layer so a
        // read-only image without them still runs.
        let workdir = image.config.working_dir.trim_start_matches('/').to_owned();
        for d in ["proc", "sys", "dev", "tmp", workdir.as_str()] {
            if d.is_empty() || d.split('/').any(|c| c == "..") {
                continue;
            }
            let p = overlay.merged().join(d);
            if !p.exists() {
                std::fs::create_dir_all(&p).map_err(other(format!("creating {}", p.display())))?;
            }
        }
        let spec = crate::container::runtime_spec(&image.config, overlay.merged(), args, &cid)?;
        let bundle = crate::container::write_bundle(&dir.join("bundle"), &spec)?;
        let out = Command::new("runc")
            .args(["--root", &dir.join("runc").display().to_string()])
            .args(["run", "--bundle", &bundle.display().to_string(), &cid])
            .output()
            .map_err(other("running runc"))?;
        overlay.unmount()?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(RunOutput {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

impl Drop for ImageService {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// An "unauthorized" error gets the `docker login` hint.
fn hinted(e: registry::Error, host: &str) -> ServiceError {
    let text = e.to_string();
    if text.to_lowercase().contains("unauthorized") {
        ServiceError::Other(format!(
            "{text}: unauthorized — run `docker login {host}` or configure imageService.registries"
        ))
    } else {
        ServiceError::Registry(e)
    }
}

/// Records a phase's duration when dropped.
struct PhaseTimer(&'static str, Instant);

impl Drop for PhaseTimer {
    fn drop(&mut self) {
        phase(self.0, self.1);
    }
}

/// Records how long a phase took.
fn phase(name: &'static str, since: Instant) {
    metrics::histogram!("clip_phase_seconds", "phase" => name)
        .record(since.elapsed().as_secs_f64());
}

/// The kind of a fallback reason, for the metric label.
fn fallback_kind(reason: &str) -> &'static str {
    if reason.contains("no registry configured") || reason.contains("unreachable") {
        "registry_unreachable"
    } else if reason.contains("failed to push") {
        "push_failed"
    } else {
        "index_failed"
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ServiceError> {
    registry::blocking_runtime().map_err(other("starting the runtime"))
}

fn tool(c: &mut Command) -> Result<(), ServiceError> {
    let out = c
        .output()
        .map_err(other(format!("running {}", c.get_program().display())))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ServiceError::Tool {
        command: format!(
            "{} {}",
            c.get_program().to_string_lossy(),
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

/// Stable id of a build: Dockerfile, every context file (path, mode, content) and the args.
fn build_id(
    dockerfile: &Path,
    context: &Path,
    build_args: &[(String, String)],
) -> Result<String, ServiceError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut h = Sha256::new();
    h.update(
        std::fs::read(dockerfile).map_err(other(format!("reading {}", dockerfile.display())))?,
    );
    let mut stack = vec![context.to_owned()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(other(format!("listing {}", d.display())))?
            .flatten()
        {
            let md = e.metadata().map_err(other("reading the context"))?;
            if md.is_dir() {
                stack.push(e.path());
            } else {
                files.push((e.path(), md.permissions().mode()));
            }
        }
    }
    files.sort();
    for (p, mode) in files {
        h.update(
            p.strip_prefix(context)
                .unwrap_or(&p)
                .as_os_str()
                .as_encoded_bytes(),
        );
        h.update(mode.to_le_bytes());
        if let Ok(bytes) = std::fs::read(&p) {
            h.update(Sha256::digest(&bytes));
        }
    }
    for (k, v) in build_args {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    Ok(hex::encode(&h.finalize()[..8]))
}
