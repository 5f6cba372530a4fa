//! The lazy read-only FUSE filesystem.
//!
//! # Model
//!
//! A mount serves one `.clip` archive. Metadata (lookup, getattr, readdir, readlink, xattrs) comes
//! straight from the memory-mapped index; inode numbers are the archive's dense inode numbers, so
//! hard links share an inode and its link count. File bytes come from where the archive says they
//! live:
//!
//! - **v1 local**: the archive's data section, read in place from the mapping;
//! - **v2**: the image's layer blobs in the registry. A read maps the file range to its layer's
//!   uncompressed range, then to spans (checkpoint to next checkpoint). Each span comes from the
//!   [`cache`] (a content-addressed disk cache shared by every mount on the machine), else from
//!   one Range GET of the compressed bytes of the missing spans, decoded from each span's
//!   checkpoint, **verified against the span digest** recorded at indexing time, then cached.
//!   Concurrent reads of a span share one fetch; sequential readers trigger read-ahead.
//! - **v1 remote**: the data object in object storage. v1 has one digest per file, so the first
//!   read of a file fetches the whole file with one ranged GET, verifies its sha256 and caches it
//!   under that digest (a large file's first read waits for all of it).
//!
//! FUSE dispatch never blocks on the network: a read whose spans are all open already is
//! answered on the dispatch thread; any other is handed to the mount's tokio runtime and replied
//! to when its bytes arrive, so many reads are in flight at once. The archive is immutable, so the
//! kernel is told to cache entries, attributes and pages for long (`keep_cache`, 1 h TTLs, 1 MiB
//! read-ahead).
//!
//! A [`profile`] records the first-touch order of file ranges during a run; mounting with that
//! profile fetches its spans in parallel, in order, right after the mount answers, so a second
//! cold start overlaps all its fetches. On-demand reads go first: while a fetch a process's read
//! had to start itself is in flight, the prefetch starts no new fetch.
//!
//! A [`spanstore`] (optional) is a second tier between the cache and the registry, in S3, shared
//! by a fleet: spans one worker fetched are read from it by the others, verified like registry
//! bytes.
//!
//! ```no_run
//! let handle = clip_fs::mount_archive(clip_fs::MountOptions {
//!     archive: "/var/lib/clip/app.clip".into(),
//!     mountpoint: "/run/clip/app".into(),
//!     ..clip_fs::MountOptions::default()
//! })?;
//! // … run a container on /run/clip/app …
//! handle.unmount()?;
//! # Ok::<(), clip_fs::Error>(())
//! ```

pub mod cache;
mod fs;
mod layers;
pub mod profile;
mod reads;
mod remote;
pub mod spanstore;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clip_format::{Archive, ArchiveKind};

pub use cache::{CacheStats, SpanCache};
pub use layers::LARGE_SPAN;
pub use profile::Profile;
pub use spanstore::{SpanStoreOptions, SpanStoreStats};

/// Why a mount or a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The archive is invalid.
    #[error(transparent)]
    Archive(#[from] clip_format::Error),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] clip_registry::Error),
    /// Fetching bytes failed (after retries).
    #[error("fetching layer bytes: {0}")]
    Fetch(String),
    /// Fetched bytes did not match their digest, twice.
    #[error("layer {layer}: span at uncompressed offset {offset} failed verification")]
    Verify {
        /// Layer digest.
        layer: clip_format::Digest,
        /// Span offset.
        offset: u64,
    },
    /// Fetched bytes do not match their digest.
    #[error(transparent)]
    Digest(#[from] clip_format::DigestMismatch),
    /// Bad options or an archive this build cannot serve.
    #[error("{0}")]
    Config(String),
    /// A layer's registry (and its mirrors) did not answer for the layer's blob before mounting:
    /// every read of the tree would fail. `--no-registry-check` mounts anyway.
    #[error(
        "not mounting: layer {layer} cannot be read from {registry}: {source} (mount anyway with --no-registry-check)"
    )]
    RegistryCheck {
        /// The layer.
        layer: clip_format::Digest,
        /// The registry the archive reads it from.
        registry: String,
        /// What the registry answered.
        #[source]
        source: Box<clip_registry::Error>,
    },
    /// Mounting failed.
    #[error("mounting at {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Local I/O failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The fetch another read led (single flight) failed: its error, shared.
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
    /// A blocking task of the mount failed (panicked or was cancelled).
    #[error("a worker task of the mount failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to mount and how.
// Independent switches, as mount(8) options are.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The `.clip` archive.
    pub archive: PathBuf,
    /// An existing empty directory.
    pub mountpoint: PathBuf,
    /// The span cache directory (shared by all mounts; default `/var/cache/clip`).
    pub cache_dir: PathBuf,
    /// Cache size bound in bytes (default 10 GiB).
    pub cache_bytes: u64,
    /// Percentage of the cache's filesystem to keep free (default 10): the cache shrinks when
    /// the disk fills from elsewhere.
    pub cache_min_free_percent: u8,
    /// The registry client (credentials, insecure hosts, CA, retries) and the runtime the mount
    /// answers network reads on; share one with the caller's other work. Default: a new one with
    /// the default settings and docker's credentials.
    pub registry: Option<clip_registry::BlockingClient>,
    /// Read the image from this registry host instead of the one recorded (a mirror).
    pub registry_override: Option<String>,
    /// Before mounting a v2 archive, read one byte of every layer through the registry client
    /// (its trust, credentials and mirrors) and refuse to mount if any cannot be read (default
    /// on): a tree whose every read fails is worse than a clear error.
    pub registry_check: bool,
    /// Spans fetched ahead of a sequential reader (0 = off).
    pub readahead_spans: usize,
    /// Prefetch the spans of this profile right after mounting.
    pub prefetch: Option<Profile>,
    /// Record a profile, written here at unmount.
    pub record_profile: Option<PathBuf>,
    /// FUSE dispatch threads.
    pub threads: usize,
    /// Let other users (container processes) use the mount (`allow_other`).
    pub allow_other: bool,
    /// Honour setuid/setgid bits on the mount itself (`suid`). Off by default: a setuid-root
    /// program of an image must not run as root from the host path. Containers get their own
    /// overlay mount on top, where setuid works as usual.
    pub suid: bool,
    /// Honour device nodes on the mount itself (`dev`). Off by default, like `suid`.
    pub dev: bool,
    /// Object-store settings, for v1-remote archives.
    pub remote: clip_objstore::RemoteOptions,
    /// v2: after mounting, fetch every layer's spans in the background at most this many
    /// compressed bytes per second (`None`: off, the default).
    pub background_fetch: Option<u64>,
    /// v2: the fleet's shared span store, read before the registry and filled after it
    /// ([`spanstore`]; `None`: off, the default).
    pub span_store: Option<SpanStoreOptions>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            archive: PathBuf::new(),
            mountpoint: PathBuf::new(),
            cache_dir: default_cache_dir(),
            cache_bytes: 10 << 30,
            cache_min_free_percent: 10,
            registry: None,
            registry_override: None,
            registry_check: true,
            readahead_spans: 2,
            prefetch: None,
            record_profile: None,
            threads: 4,
            allow_other: true,
            suid: false,
            dev: false,
            remote: clip_objstore::RemoteOptions::default(),
            background_fetch: None,
            span_store: None,
        }
    }
}

/// `/var/cache/clip` for root, `$XDG_CACHE_HOME/clip` (or `~/.cache/clip`) otherwise.
#[must_use]
pub fn default_cache_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/cache/clip");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("clip")
}

/// Counters of a mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MountStats {
    /// Range requests sent to the registry.
    pub requests: u64,
    /// Compressed bytes fetched.
    pub fetched_bytes: u64,
    /// Spans fetched, decoded and verified.
    pub spans_fetched: u64,
    /// Spans that failed verification (each refetched once).
    pub verify_failures: u64,
    /// File bytes returned to the kernel (what processes read, plus the kernel's read-ahead).
    pub served_bytes: u64,
    /// The cache's counters.
    pub cache: CacheStats,
    /// The shared span store's counters (all zero without one).
    pub span_store: SpanStoreStats,
}

/// A live mount: unmounted by [`MountHandle::unmount`] or on drop.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    v2: Option<Arc<layers::V2Source>>,
    v1_remote: Option<Arc<remote::RemoteFiles>>,
    recording: Option<Recording>,
    prefetch: Option<tokio::task::JoinHandle<()>>,
    background: Option<tokio::task::JoinHandle<()>>,
    net: clip_registry::BlockingClient,
    served: Arc<std::sync::atomic::AtomicU64>,
}

/// A profile being recorded: the recorder, where to write it, and how to name its inodes.
struct Recording {
    recorder: Arc<profile::Recorder>,
    path: PathBuf,
    archive: Arc<Archive>,
    inodes: Arc<fs::Inodes>,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl MountHandle {
    /// The mount point.
    #[must_use]
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Fetch and cache counters so far.
    #[must_use]
    pub fn stats(&self) -> MountStats {
        let served_bytes = self.served.load(Ordering::Relaxed);
        let base = MountStats {
            served_bytes,
            ..MountStats::default()
        };
        if let Some(r) = &self.v1_remote {
            return MountStats {
                requests: r.requests.load(Ordering::Relaxed),
                fetched_bytes: r.fetched_bytes.load(Ordering::Relaxed),
                spans_fetched: 0,
                verify_failures: r.verify_failures.load(Ordering::Relaxed),
                served_bytes,
                cache: r.cache().stats(),
                span_store: SpanStoreStats::default(),
            };
        }
        self.v2.as_ref().map_or(base, |s| MountStats {
            requests: s.stats.requests.load(Ordering::Relaxed),
            fetched_bytes: s.stats.fetched_bytes.load(Ordering::Relaxed),
            spans_fetched: s.stats.spans_fetched.load(Ordering::Relaxed),
            verify_failures: s.stats.verify_failures.load(Ordering::Relaxed),
            served_bytes,
            cache: s.cache().stats(),
            span_store: s.store.as_ref().map(|st| st.stats()).unwrap_or_default(),
        })
    }

    /// Waits until the prefetch of the mount's profile (if any) has finished.
    pub fn wait_prefetch(&mut self) {
        if let Some(p) = self.prefetch.take() {
            let _ = self.net.block_on(p);
        }
    }

    /// Whether the FUSE session has ended (unmounted from outside, e.g. `umount`).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// The profile recorded so far, if recording.
    #[must_use]
    pub fn profile(&self) -> Option<Profile> {
        let Recording {
            recorder,
            archive,
            inodes,
            ..
        } = self.recording.as_ref()?;
        let image = archive
            .meta()
            .source
            .as_ref()
            .map(|s| s.manifest_digest.to_string())
            .unwrap_or_default();
        Some(recorder.profile(&image, |ino| {
            let e = inodes.entry(archive, ino)?;
            Some(format!("/{}", String::from_utf8_lossy(&e.path())))
        }))
    }

    /// Unmounts, waits for the session to end and writes the recorded profile.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), Error> {
        let mut result = Ok(());
        if let Some(s) = self.session.take() {
            if s.guard.is_finished() {
                let _ = s.join();
            } else {
                result = s.umount_and_join().map_err(|e| Error::Mount {
                    path: self.mountpoint.clone(),
                    source: e,
                });
            }
        }
        if let Some(p) = self.profile()
            && let Some(Recording { path, .. }) = &self.recording
        {
            p.save(path)?;
            tracing::info!(path = %path.display(), touches = p.touches.len(), "recorded prefetch profile");
        }
        self.recording = None;
        // Let the span store receive what this mount fetched (not from inside the runtime).
        if let Some(store) = self.v2.as_ref().and_then(|s| s.store.clone())
            && tokio::runtime::Handle::try_current().is_err()
        {
            self.net
                .block_on(store.drain(std::time::Duration::from_secs(10)));
        }
        // The runtime is shared: stop this mount's own tasks.
        for task in [self.prefetch.take(), self.background.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        result
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(error = %e, "unmount failed");
        }
    }
}

/// Detaches a dead FUSE mount (its server was killed: `ENOTCONN`) left at `mountpoint`.
/// `statfs` always reaches the server (the kernel caches attributes, not statfs), so it tells a
/// live mount from a dead one.
pub fn clean_stale_mount(mountpoint: &Path) -> bool {
    let dead = match rustix::fs::statfs(mountpoint) {
        Err(e) => e == rustix::io::Errno::NOTCONN,
        Ok(_) => false,
    };
    if dead {
        tracing::warn!(path = %mountpoint.display(), "detaching a dead mount left by a killed process");
        return rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH).is_ok();
    }
    false
}

/// Unmounts whatever is mounted at `mountpoint` (a dead mount is detached).
pub fn unmount(mountpoint: &Path) -> Result<(), Error> {
    if clean_stale_mount(mountpoint) {
        return Ok(());
    }
    rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty()).map_err(|e| {
        Error::Mount {
            path: mountpoint.to_owned(),
            source: e.into(),
        }
    })
}

/// Whether a clip FUSE mount is at `mountpoint` (per `/proc/self/mountinfo`; source `clip`).
#[must_use]
pub fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(mountpoint) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| {
        let mut f = l.split(' ');
        let point = f.nth(4);
        // After " - ": filesystem type, then source ("fuse"/"fuse.clip", "clip").
        let mut tail = l.split(" - ").nth(1).unwrap_or("").split(' ');
        let (fstype, source) = (tail.next(), tail.next());
        point == Some(want.as_str())
            && matches!(fstype, Some("fuse" | "fuse.clip"))
            && source == Some("clip")
    })
}

/// Where a mount's file data comes from: the `fs` side, and the sources the handle keeps
/// (v2 spans, v1-remote files).
type DataSources = (
    fs::Data,
    Option<Arc<layers::V2Source>>,
    Option<Arc<remote::RemoteFiles>>,
);

/// The data sources of `archive`: v1 data in the archive, v2 spans read from the registry
/// through `net` (the registry checked first, unless told not to), or v1 data in an object.
fn data_sources(
    archive: &Arc<Archive>,
    options: &MountOptions,
    net: &clip_registry::BlockingClient,
) -> Result<DataSources, Error> {
    let cache = || {
        SpanCache::open_with(
            &options.cache_dir,
            options.cache_bytes,
            options.cache_min_free_percent,
        )
        .map(Arc::new)
    };
    Ok(match archive.kind() {
        ArchiveKind::V1Local => (fs::Data::V1Local, None, None),
        ArchiveKind::V2Oci => {
            let mut src = layers::V2Source::new(
                archive,
                net.client().clone(),
                cache()?,
                options.registry_override.as_deref(),
            )?;
            if let Some(o) = &options.span_store {
                src.store = Some(Arc::new(spanstore::SpanStore::open(o)?));
            }
            let src = Arc::new(src);
            if options.registry_check {
                net.block_on(src.check_registry())?;
            }
            (fs::Data::V2(Arc::clone(&src)), Some(src), None)
        }
        ArchiveKind::V1Remote => {
            let remote =
                archive.meta().remote.clone().ok_or_else(|| {
                    Error::Config("v1-remote archive without a data object".into())
                })?;
            let object = clip_objstore::RemoteObject::open(&remote.url, &options.remote)
                .map_err(|e| Error::Config(e.to_string()))?;
            let files = Arc::new(remote::RemoteFiles::new(
                object,
                remote.data_offset,
                cache()?,
            ));
            (fs::Data::V1Remote(Arc::clone(&files)), None, Some(files))
        }
    })
}

/// The FUSE session's settings: read-only, `nosuid`/`nodev` unless asked, other users allowed
/// (containers), one cloned `/dev/fuse` descriptor per dispatch thread.
fn fuse_config(options: &MountOptions) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("clip".into()),
        fuser::MountOption::Subtype("clip".into()),
        fuser::MountOption::DefaultPermissions,
        if options.suid {
            fuser::MountOption::Suid
        } else {
            fuser::MountOption::NoSuid
        },
        if options.dev {
            fuser::MountOption::Dev
        } else {
            fuser::MountOption::NoDev
        },
        fuser::MountOption::Exec,
    ];
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    config
}

/// Mounts an archive; returns once the mount answers.
pub fn mount_archive(options: MountOptions) -> Result<MountHandle, Error> {
    let started = std::time::Instant::now();
    clean_stale_mount(&options.mountpoint);
    let archive = Arc::new(Archive::open(&options.archive)?);
    let net = match &options.registry {
        Some(n) => n.clone(),
        None => clip_registry::BlockingClient::new(
            clip_registry::ClientConfig::default().with_docker_config()?,
        )?,
    };
    let (data, v2, v1_remote) = data_sources(&archive, &options, &net)?;
    let recorder = options
        .record_profile
        .as_ref()
        .map(|_| Arc::new(profile::Recorder::default()));
    let inodes = Arc::new(fs::Inodes::new(&archive));
    let fs = fs::ClipFs::new(
        Arc::clone(&archive),
        Arc::clone(&inodes),
        data,
        net.handle().clone(),
        recorder.clone(),
        options.readahead_spans,
    );
    let served = Arc::clone(&fs.served);
    let config = fuse_config(&options);
    let session = fuser::Session::new(fs, &options.mountpoint, &config)
        .and_then(fuser::Session::spawn)
        .map_err(|e| Error::Mount {
            path: options.mountpoint.clone(),
            source: e,
        })?;
    tracing::info!(
        archive = %options.archive.display(),
        mountpoint = %options.mountpoint.display(),
        kind = %archive.kind(),
        ms = started.elapsed().as_millis() as u64,
        "mounted"
    );
    let prefetch = match (&options.prefetch, &v2) {
        (Some(p), Some(src)) => Some(prefetch(net.handle(), &archive, src, p)),
        _ => None,
    };
    let background = match (options.background_fetch, &v2) {
        (Some(rate), Some(src)) => Some(
            net.handle()
                .spawn(background_fetch(Arc::clone(src), rate.max(1))),
        ),
        _ => None,
    };
    Ok(MountHandle {
        session: Some(session),
        mountpoint: options.mountpoint.clone(),
        v2,
        v1_remote,
        recording: recorder
            .zip(options.record_profile)
            .map(|(recorder, path)| Recording {
                recorder,
                path,
                archive,
                inodes,
            }),
        prefetch,
        background,
        net,
        served,
    })
}

/// Fetches every span of every layer, in order, four spans per request, pausing so the average
/// stays under `rate` compressed bytes per second. Spans already cached cost nothing; reads keep
/// priority: they never wait for this task (it only fills the cache), and it starts no fetch
/// while a read waits for one.
async fn background_fetch(src: Arc<layers::V2Source>, rate: u64) {
    let started = std::time::Instant::now();
    for layer in 0..src.layers.len() {
        for s in 0..src.layers[layer].checkpoints.len() {
            if src.span_local(layer, s).is_some() {
                continue;
            }
            src.yield_to_demand().await;
            let before = src.stats.fetched_bytes.load(Ordering::Relaxed);
            if let Err(e) = src.span(layer, s, 3).await {
                tracing::warn!(error = %e, "background fetch failed; stopping it");
                return;
            }
            let got = src.stats.fetched_bytes.load(Ordering::Relaxed) - before;
            let pause = std::time::Duration::from_secs_f64(got as f64 / rate as f64);
            tokio::time::sleep(pause).await;
        }
    }
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "background fetch done"
    );
}

/// Maps a profile to spans (in first-touch order, no duplicates) and fetches them, several
/// requests in flight, adjacent spans of a layer coalesced into one request.
fn prefetch(
    runtime: &tokio::runtime::Handle,
    archive: &Archive,
    src: &Arc<layers::V2Source>,
    profile: &Profile,
) -> tokio::task::JoinHandle<()> {
    let mut seen = std::collections::HashSet::new();
    let mut order: Vec<(usize, usize)> = Vec::new();
    for t in &profile.touches {
        let Some(e) = archive.lookup(t.path.as_bytes()) else {
            continue;
        };
        let Some(clip_format::DataLocation::V2 {
            layer,
            offset,
            length,
            ..
        }) = e.data()
        else {
            continue;
        };
        // A sparse file's touches map to the stored bytes of their data.
        let (length, t_offset, t_len) = match e.sparse_map() {
            Some(map) => {
                let r = map.stored_range(t.offset, t.offset.saturating_add(t.len));
                if r.is_empty() {
                    continue; // all hole: nothing stored to fetch
                }
                (map.stored_len(), r.start, r.end - r.start)
            }
            None => (length, t.offset, t.len),
        };
        let layer = layer as usize;
        let Some(l) = src.layers.get(layer) else {
            continue;
        };
        if t_offset >= length {
            continue;
        }
        let (a, b) = (
            offset + t_offset,
            offset + length.min(t_offset.saturating_add(t_len)),
        );
        for s in l.span_of(a)..=l.span_of(b.saturating_sub(1).max(a)) {
            if seen.insert((layer, s)) {
                order.push((layer, s));
            }
        }
    }
    // Group runs of adjacent spans (in profile order) into one request of up to 4 spans.
    let mut groups: Vec<(usize, usize, usize)> = Vec::new();
    for (layer, s) in order {
        match groups.last_mut() {
            Some((gl, first, n)) if *gl == layer && *first + *n == s && *n < 4 => *n += 1,
            _ => groups.push((layer, s, 1)),
        }
    }
    let src = Arc::clone(src);
    let total = groups.len();
    runtime.spawn(async move {
        use futures_util::StreamExt as _;
        let started = std::time::Instant::now();
        futures_util::stream::iter(groups)
            .for_each_concurrent(8, |(layer, first, n)| {
                let src = Arc::clone(&src);
                async move {
                    for s in first..first + n {
                        src.yield_to_demand().await;
                        if let Err(e) = src.span(layer, s, first + n - 1 - s).await {
                            tracing::warn!(error = %e, "prefetch failed");
                        }
                    }
                }
            })
            .await;
        tracing::info!(
            requests = total,
            ms = started.elapsed().as_millis() as u64,
            "prefetch done"
        );
    })
}
