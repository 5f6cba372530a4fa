//! What every clip process on a node builds from the configuration the same way: the registry
//! client, the caches, the index options, mounts, the sharing of prefetch profiles, and the
//! serve-until-signal loop of a mount server.
//!
//! # Model
//!
//! One node keeps one cache under `cacheDir`, whichever clip processes run there (the worker,
//! the snapshotter's mount servers, `clip mount`): layer indexes in `<cacheDir>/layers`, spans
//! in `<cacheDir>/spans` (bounded by `cacheSizeGiB` and `cacheMinFreePercent`), recorded
//! profiles beside them. A mount is made by one [`MountBuilder`]: from the configuration
//! ([`MountBuilder::from_config`]) or from a command line's own options
//! ([`MountBuilder::from_options`]), optionally sharing prefetch profiles through a store
//! ([`ProfileObjects`]: the worker's archive store, or the fleet's span store for the
//! snapshotter).
//!
//! Profile sharing has one set of rules wherever it runs. The first run of a tree records its
//! first `profileWindowSecs` of reads and publishes them create-only as `<name>.profile.json`;
//! later runs prefetch the newest readable generation, and a run that reads enough beyond it
//! publishes a refinement (`<name>.profile.<g>.json`), up to [`PROFILE_GENERATIONS`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use clip_policy::Config;

use crate::{fs, indexer, registry};

/// Why something a node builds from its configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The registry settings are unusable (a missing registries.conf, a bad CA).
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// A cache directory is not safe to use.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// Mounting failed.
    #[error(transparent)]
    Mount(#[from] fs::Error),
    /// A profile store refused or failed.
    #[error("profile store: {0}")]
    Profiles(Box<dyn std::error::Error + Send + Sync>),
    /// Waiting for signals failed.
    #[error("waiting for signals: {0}")]
    Signals(#[source] std::io::Error),
    /// A mount server could not be started, or its log opened.
    #[error("starting a mount server for {}: {source}", mountpoint.display())]
    Spawn {
        /// Where it was to mount.
        mountpoint: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A signing key or a trusted key is unusable.
    #[error(transparent)]
    Keys(#[from] crate::objstore::signed::SignError),
    /// A file of trusted keys could not be read.
    #[error("reading trusted keys {}: {source}", path.display())]
    TrustedKeys {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A mount server exited, or did not answer in time.
    #[error("mounting {}: {reason}", mountpoint.display())]
    Server {
        /// Where.
        mountpoint: PathBuf,
        /// What happened (with the server's log).
        reason: String,
    },
}

/// Registry client settings from the configuration: per-registry credentials, insecure hosts,
/// CAs and client certificates, then docker's `config.json`; certs.d roots; mirrors from
/// registries.conf.
pub fn client_config(cfg: &Config) -> Result<registry::ClientConfig, NodeError> {
    let mut client_cfg = registry::ClientConfig::default().with_docker_config()?;
    for (host, e) in &cfg.registries {
        let host = if host == "docker" { "docker.io" } else { host };
        if e.insecure {
            client_cfg.insecure.push(host.to_owned());
        }
        if e.ca_file.is_some() || e.client_cert.is_some() {
            client_cfg.registry_tls.push((
                host.to_owned(),
                registry::trust::RegistryTls {
                    ca_file: e.ca_file.clone(),
                    client_cert: e.client_cert.clone(),
                    client_key: e.client_key.clone(),
                },
            ));
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
    client_cfg.certs_dirs.clone_from(&cfg.certs_dirs);
    client_cfg.mirrors = match &cfg.registries_conf {
        Some(conf) if !conf.exists() => {
            return Err(registry::Error::Config(format!(
                "imageService.registriesConf {}: no such file",
                conf.display()
            ))
            .into());
        }
        Some(conf) => registry::mirrors::load(conf)?,
        None => registry::mirrors::load_system()?,
    };
    Ok(client_cfg)
}

/// The registry client of the configuration.
pub fn registry_client(cfg: &Config) -> Result<registry::BlockingClient, NodeError> {
    Ok(registry::BlockingClient::new(client_config(cfg)?)?)
}

/// The node's span cache: `<cache_dir>/spans`.
#[must_use]
pub fn span_cache_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("spans")
}

/// The node's layer-index cache, `<cacheDir>/layers` (created private).
pub fn layer_cache(cfg: &Config) -> Result<indexer::DirLayerStore, NodeError> {
    let dir = cfg.cache_dir.join("layers");
    crate::host::private_dir(&cfg.cache_dir)?;
    crate::host::private_dir(&dir)?;
    Ok(indexer::DirLayerStore::new(dir))
}

/// The index options of the configuration (`checkpointMiB`), reusing `layer_store`.
#[must_use]
pub fn index_options(
    cfg: &Config,
    layer_store: Arc<dyn indexer::LayerIndexStore>,
) -> indexer::IndexOptions {
    indexer::IndexOptions {
        checkpoint_bytes: cfg.checkpoint_mib.max(1) << 20,
        layer_store: Some(layer_store),
        ..indexer::IndexOptions::default()
    }
}

/// What this node signs with and accepts from shared places — stores and attachments in
/// registries (`signingKey`, `trustedKeys`, `allowUnsigned`). A `trustedKeys` entry is a public
/// key's text or the path of a file of them, one per line (`#` comments allowed).
pub fn trust(cfg: &Config) -> Result<crate::objstore::signed::Trust, NodeError> {
    use crate::objstore::signed::{PublicKey, SigningKey, Trust};
    let signer = cfg
        .signing_key
        .as_deref()
        .map(SigningKey::load)
        .transpose()?;
    let mut trusted = Vec::new();
    for entry in &cfg.trusted_keys {
        if entry.trim_start().starts_with("clip-ed25519 ") {
            trusted.push(entry.parse::<PublicKey>()?);
            continue;
        }
        let text = std::fs::read_to_string(entry).map_err(|source| NodeError::TrustedKeys {
            path: PathBuf::from(entry),
            source,
        })?;
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                trusted.push(line.parse::<PublicKey>()?);
            }
        }
    }
    Ok(Trust {
        signer,
        trusted,
        allow_unsigned: cfg.allow_unsigned,
    })
}

/// The layer indexes attached to `manifest` in `reference`'s repository, each checked by
/// `trust` (signed by a trusted key, or unsigned where `allowUnsigned`; with `signed_only`,
/// unsigned never — for trees committed under chain ids). `None` when there are none or the
/// registry does not answer, with one log line saying why the image is indexed here.
#[must_use]
pub fn attached_indexes(
    net: &registry::BlockingClient,
    reference: &registry::Reference,
    manifest: &crate::format::Digest,
    trust: Arc<crate::objstore::signed::Trust>,
    signed_only: bool,
) -> Option<indexer::Attached> {
    let verify: indexer::attached::Verifier = Arc::new(move |key: &str, bytes: Vec<u8>| {
        if signed_only && !crate::objstore::signed::is_signed(&bytes) {
            return Err("unsigned, and this tree needs signed layer indexes".to_owned());
        }
        trust
            .open(key, &bytes)
            .map(<[u8]>::to_vec)
            .map_err(|e| e.to_string())
    });
    match indexer::Attached::find(net, reference, manifest, Some(verify)) {
        Ok(Some(a)) => Some(a),
        Ok(None) => {
            tracing::info!(image = %reference, "no layer indexes attached to the image; indexing here");
            None
        }
        Err(e) => {
            tracing::info!(image = %reference, error = %e, "looking for attached layer indexes failed; indexing here");
            None
        }
    }
}

/// `base`, then the layer indexes attached to the image (if found): the tiers to index
/// `reference` (pinned at `manifest`) with.
#[must_use]
pub fn with_attached(
    base: Option<Arc<dyn indexer::LayerIndexStore>>,
    attached: Option<Arc<indexer::Attached>>,
) -> Option<Arc<dyn indexer::LayerIndexStore>> {
    let Some(a) = attached else {
        return base;
    };
    let mut tiers: Vec<Box<dyn indexer::LayerIndexStore>> = Vec::new();
    if let Some(b) = base {
        tiers.push(Box::new(b));
    }
    tiers.push(Box::new(a));
    Some(Arc::new(indexer::Tiered(tiers)))
}

/// Object-store settings from the configuration's `s3:` sections.
#[must_use]
pub fn remote_options(s3: &clip_policy::S3Store) -> crate::objstore::RemoteOptions {
    crate::objstore::RemoteOptions {
        endpoint: s3.endpoint.clone(),
        region: s3.region.clone(),
        access_key_id: s3.access_key_id.clone(),
        secret_access_key: s3.secret_access_key.clone(),
        path_style: s3.force_path_style,
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
    fs::SpanStoreOptions::new(&url, remote_options(s3))
}

/// Where shared prefetch profiles are kept: small create-only objects by name.
pub trait ProfileObjects: Send + Sync {
    /// The object `name`, if present and readable.
    fn get(&self, name: &str) -> Option<Vec<u8>>;
    /// Stores `bytes` as `name` unless it exists; `Ok(true)` when this call stored it.
    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, NodeError>;
}

/// Profiles kept in the fleet's span store, under `<store>/profiles/`; a slow store never
/// holds up a mount (each request is bounded by the store's timeout).
pub struct SpanStoreProfiles {
    store: fs::SpanStoreOptions,
    net: registry::BlockingClient,
}

impl std::fmt::Debug for SpanStoreProfiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanStoreProfiles")
            .field("url", &self.store.url)
            .finish_non_exhaustive()
    }
}

impl SpanStoreProfiles {
    /// Profiles in `store`, reached on `net`'s runtime.
    #[must_use]
    pub fn new(store: fs::SpanStoreOptions, net: registry::BlockingClient) -> Self {
        Self { store, net }
    }

    fn object(&self, name: &str) -> Result<crate::objstore::RemoteObject, NodeError> {
        crate::objstore::RemoteObject::open(
            &format!("{}/profiles/{name}", self.store.url),
            &self.store.remote,
        )
        .map_err(|e| NodeError::Profiles(Box::new(e)))
    }
}

impl ProfileObjects for SpanStoreProfiles {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        let obj = self.object(name).ok()?;
        let limit = self.store.timeout;
        self.net
            .block_on(async {
                tokio::time::timeout(limit, obj.get_bounded(MAX_PROFILE_OBJECT)).await
            })
            .ok()?
            .ok()
            .flatten()
            .map(|b| b.to_vec())
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, NodeError> {
        let obj = self.object(name)?;
        let limit = self.store.timeout;
        match self
            .net
            .block_on(async { tokio::time::timeout(limit, obj.put_if_absent(bytes)).await })
        {
            Ok(r) => r.map_err(|e| NodeError::Profiles(Box::new(e))),
            Err(_) => Err(NodeError::Profiles("the span store timed out".into())),
        }
    }
}

/// The largest shared profile read.
pub const MAX_PROFILE_OBJECT: u64 = 32 << 20;

/// Generations of a shared profile at most: the first run's, then up to three refinements.
pub const PROFILE_GENERATIONS: u32 = 4;

/// The object holding generation `g` of `name`'s shared prefetch profile:
/// `<name>.profile.json`, then `<name>.profile.<g>.json`.
#[must_use]
pub fn profile_name(name: &str, generation: u32) -> String {
    if generation <= 1 {
        format!("{name}.profile.json")
    } else {
        format!("{name}.profile.{generation}.json")
    }
}

/// The newest readable generation of `name`'s shared profile, and the number of the newest
/// generation present (readable or not; 0 for none).
fn load_shared(objects: &dyn ProfileObjects, name: &str) -> (Option<fs::Profile>, u32) {
    let mut newest = None;
    let mut present = 0;
    for g in 1..=PROFILE_GENERATIONS {
        let Some(bytes) = objects.get(&profile_name(name, g)) else {
            break;
        };
        present = g;
        match fs::Profile::from_slice(&bytes) {
            Ok(p) => newest = Some(p),
            Err(e) => {
                tracing::warn!(profile = name, generation = g, error = %e, "shared prefetch profile rejected");
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

/// How a mount shares its prefetch profile.
#[derive(Clone)]
pub struct ProfileSharing {
    /// Where profiles are kept.
    pub objects: Arc<dyn ProfileObjects>,
    /// The tree's name in the store (an image id, or an archive's stem).
    pub name: String,
    /// The image manifest digest recorded in a published profile (may be empty).
    pub image: String,
    /// How long from the mount a run counts as its start (`profileWindowSecs`).
    pub window: Duration,
    /// Where the run's profile is recorded before it is published.
    pub record_dir: PathBuf,
}

impl std::fmt::Debug for ProfileSharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileSharing")
            .field("name", &self.name)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// One way to mount an archive: the options, and how the mount shares its profile.
#[derive(Debug)]
pub struct MountBuilder {
    options: fs::MountOptions,
    sharing: Option<ProfileSharing>,
}

impl MountBuilder {
    /// A mount configured by `cfg`: the node's span cache and its bounds, the span store, the
    /// archive store's object settings (for v1-remote archives), reading the registry with
    /// `net`.
    #[must_use]
    pub fn from_config(cfg: &Config, net: &registry::BlockingClient) -> Self {
        Self::from_options(fs::MountOptions {
            cache_dir: span_cache_dir(&cfg.cache_dir),
            cache_bytes: cfg.cache_size_gib << 30,
            cache_min_free_percent: cfg.cache_min_free_percent,
            registry: Some(net.clone()),
            remote: match &cfg.archive_store {
                clip_policy::ArchiveStore::S3(s3) => remote_options(s3),
                clip_policy::ArchiveStore::Local(_) => crate::objstore::RemoteOptions::default(),
            },
            span_store: cfg.span_store.as_ref().map(span_store_options),
            ..fs::MountOptions::default()
        })
    }

    /// A mount with these options (a command line's own).
    #[must_use]
    pub fn from_options(options: fs::MountOptions) -> Self {
        Self {
            options,
            sharing: None,
        }
    }

    /// The options, to adjust.
    pub fn options_mut(&mut self) -> &mut fs::MountOptions {
        &mut self.options
    }

    /// Shares the mount's prefetch profile (v2 archives only; a zero window shares nothing).
    #[must_use]
    pub fn share_profiles(mut self, sharing: ProfileSharing) -> Self {
        self.sharing = (!sharing.window.is_zero()).then_some(sharing);
        self
    }

    /// Mounts `archive` at `mountpoint`. With profile sharing: prefetches the newest shared
    /// generation, and records this run to publish (the first profile, or a refinement while
    /// generations are left) once its window has passed, or at [`Mounted::offer_profile`], or
    /// at the unmount, whichever comes first.
    pub fn mount(mut self, archive: &Path, mountpoint: &Path) -> Result<Arc<Mounted>, NodeError> {
        archive.clone_into(&mut self.options.archive);
        mountpoint.clone_into(&mut self.options.mountpoint);
        let sharing = self.sharing.take().map(|s| {
            let (shared, present) = load_shared(&*s.objects, &s.name);
            if let Some(p) = &shared {
                tracing::info!(
                    profile = %s.name,
                    touches = p.touches.len(),
                    generation = present,
                    "prefetching the shared profile"
                );
            }
            let record = (present < PROFILE_GENERATIONS).then(|| {
                s.record_dir
                    .join(format!("profile-{}-{}.json", s.name, std::process::id()))
            });
            self.options.prefetch = shared.clone().or(self.options.prefetch.take());
            self.options.record_profile = record.clone().or(self.options.record_profile.take());
            Sharing {
                recording: record.is_some(),
                base: shared,
                next_generation: present + 1,
                offered: AtomicBool::new(false),
                plan: s,
            }
        });
        let handle = fs::mount_archive(self.options)?;
        let m = Arc::new(Mounted {
            mountpoint: mountpoint.to_owned(),
            handle: Mutex::new(Some(handle)),
            sharing,
        });
        if let Some(s) = m.sharing.as_ref().filter(|s| s.recording) {
            // The first `window` of the run is its start: publish it then.
            let weak: Weak<Mounted> = Arc::downgrade(&m);
            let window = s.plan.window;
            std::thread::spawn(move || {
                std::thread::sleep(window);
                if let Some(m) = weak.upgrade() {
                    m.offer_profile();
                }
            });
        }
        Ok(m)
    }
}

/// A profile-sharing mount's state.
struct Sharing {
    plan: ProfileSharing,
    /// Recording a profile to publish.
    recording: bool,
    /// The shared profile prefetched (the base a refinement adds to).
    base: Option<fs::Profile>,
    /// The generation this run's profile would be published as.
    next_generation: u32,
    /// Whether it has been offered.
    offered: AtomicBool,
}

/// A mounted archive.
pub struct Mounted {
    mountpoint: PathBuf,
    handle: Mutex<Option<fs::MountHandle>>,
    sharing: Option<Sharing>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl Mounted {
    fn handle(&self) -> std::sync::MutexGuard<'_, Option<fs::MountHandle>> {
        self.handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where.
    #[must_use]
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Fetch and cache counters.
    #[must_use]
    pub fn stats(&self) -> fs::MountStats {
        self.handle()
            .as_ref()
            .map(fs::MountHandle::stats)
            .unwrap_or_default()
    }

    /// Whether this mount prefetched a shared profile.
    #[must_use]
    pub fn prefetched_shared_profile(&self) -> bool {
        self.sharing.as_ref().is_some_and(|s| s.base.is_some())
    }

    /// Waits until the prefetch (if any) has finished.
    pub fn wait_prefetch(&self) {
        if let Some(h) = self.handle().as_mut() {
            h.wait_prefetch();
        }
    }

    /// Whether the mount has gone (unmounted from outside, or by [`Self::unmount`]).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.handle()
            .as_ref()
            .is_none_or(fs::MountHandle::is_finished)
    }

    /// Publishes the profile this run has recorded so far, once (create-only: the first to
    /// publish a generation wins); nothing if it is not recording or has read nothing yet.
    pub fn offer_profile(&self) {
        let Some(s) = self.sharing.as_ref().filter(|s| s.recording) else {
            return;
        };
        if s.offered.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(mut p) = self.handle().as_ref().and_then(fs::MountHandle::profile) else {
            return;
        };
        if p.touches.is_empty() {
            // Nothing read yet: let a later moment (a container's exit, the unmount) offer it.
            s.offered.store(false, Ordering::SeqCst);
            return;
        }
        if !s.plan.image.is_empty() {
            s.plan.image.clone_into(&mut p.image);
        }
        let refined = match &s.base {
            Some(base) => {
                let Some(merged) = refine(base, &p) else {
                    tracing::debug!(profile = %s.plan.name, "this run read nothing new worth refining the shared profile");
                    return;
                };
                p = fs::Profile {
                    image: p.image,
                    ..merged
                };
                true
            }
            None => false,
        };
        let Ok(bytes) = serde_json::to_vec(&p) else {
            return;
        };
        let name = profile_name(&s.plan.name, s.next_generation);
        match s.plan.objects.put_if_absent(&name, &bytes) {
            Ok(true) if refined => {
                tracing::info!(profile = %s.plan.name, touches = p.touches.len(), generation = s.next_generation, "refined the shared prefetch profile");
                metrics::counter!("clip_profiles_refined_total").increment(1);
            }
            Ok(true) => {
                tracing::info!(profile = %s.plan.name, touches = p.touches.len(), "shared the prefetch profile");
                metrics::counter!("clip_profiles_shared_total").increment(1);
            }
            Ok(false) => {
                tracing::debug!(object = %name, "another run published this profile generation first");
            }
            Err(e) => {
                tracing::warn!(profile = %s.plan.name, error = %e, "could not share the prefetch profile");
            }
        }
    }

    /// Offers the profile, then unmounts (no-op if already unmounted).
    pub fn unmount(&self) -> Result<(), NodeError> {
        self.offer_profile();
        if let Some(h) = self.handle().take() {
            h.unmount()?;
        }
        Ok(())
    }
}

/// Waits while `mounted` serves, until it is unmounted from outside (`"unmounted"`) or the
/// process gets SIGTERM, SIGINT or SIGHUP; returns which. The caller then unmounts it
/// ([`Mounted::unmount`]). Blocking; the mount's own threads do the serving.
pub fn serve_until_signal(mounted: &Mounted) -> Result<&'static str, NodeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NodeError::Signals)?;
    let why = rt
        .block_on(async {
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mut hup = signal(SignalKind::hangup())?;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = term.recv() => return Ok("SIGTERM"),
                    _ = int.recv() => return Ok("SIGINT"),
                    _ = hup.recv() => return Ok("SIGHUP"),
                    _ = tick.tick() => if mounted.is_finished() { return Ok("unmounted") },
                }
            }
        })
        .map_err(NodeError::Signals)?;
    Ok(why)
}

/// Starts `cmd`, a mount server for `mountpoint`, in a process group of its own (it outlives
/// the caller) with its output in `log_path` (opened private, never through a symlink), and
/// waits until a clip mount answers there. Returns its pid; the child is reaped by a thread of
/// the caller when it exits (after the unmount), or by init once the caller has gone.
pub fn spawn_mount_server(
    mut cmd: std::process::Command,
    mountpoint: &Path,
    log_path: &Path,
    timeout: Duration,
) -> Result<u32, NodeError> {
    use std::os::unix::process::CommandExt as _;
    let spawn_err = |source| NodeError::Spawn {
        mountpoint: mountpoint.to_owned(),
        source,
    };
    let server_err = |reason: String| NodeError::Server {
        mountpoint: mountpoint.to_owned(),
        reason,
    };
    let log = crate::host::private_file(log_path)?;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(spawn_err)?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let start = std::time::Instant::now();
    loop {
        if fs::is_mounted(mountpoint) {
            let pid = child.id();
            std::thread::spawn(move || child.wait());
            return Ok(pid);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            return Err(server_err(format!(
                "the mount server exited ({status}):\n{}",
                log.trim_end()
            )));
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            return Err(server_err(format!(
                "the mount did not answer within {} s; see {}",
                timeout.as_secs(),
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{fs, profile_name, refine};

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

    #[test]
    fn profile_generations_have_stable_names() {
        assert_eq!(profile_name("img", 1), "img.profile.json");
        assert_eq!(profile_name("img", 3), "img.profile.3.json");
    }
}
