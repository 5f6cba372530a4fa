//! The span cache: verified, uncompressed spans on local disk, named by their content.
//!
//! One directory serves every mount and image on a machine. A span is stored under its name
//! (`spans/ab/abcdef…`, [`clip_seekable::span_key`]: a sha256 that pins down the span's bytes,
//! derived from what the archive records for it), so the key *is* the content: two images
//! sharing a layer share its span files, and a file that fails its check is garbage (a torn
//! write after a crash, a bit flip) and is deleted on sight. Files are written
//! to `tmp/` and renamed into place, so no reader ever sees a partial span under its name; no
//! fsync is needed because every file is verified the first time a process opens it.
//!
//! A span file is the span's bytes followed by a 16-byte trailer: the xxh3-64 of the bytes and
//! the magic `CLIPSPAN`. The bytes were verified against the archive when they came off the network;
//! the trailer lets a process re-verify a file it opens at memory speed (a torn or flipped file
//! fails it), instead of re-hashing sha256 on every mount. Open spans are memory-mapped, so reads
//! are served straight from the page cache with a single copy.
//!
//! The size bound is enforced by the process that crosses it: it rescans the directory (so what
//! other processes added counts) and deletes the least recently used files (modification time,
//! refreshed on use at most once a minute) until the total is under 90% of the cap. A process
//! holding an evicted span open keeps reading it; the space returns when it closes the file.
//!
//! **A full disk never fails a read.** The cache shares its filesystem with images, logs and
//! containers' writable layers, so the bound it enforces is the smaller of its configured size
//! and what leaves `min_free_percent` of the filesystem free (checked with `statvfs` at most once
//! a second as the cache grows): when the disk fills from elsewhere, the cache shrinks. A write
//! that fails anyway (ENOSPC, EDQUOT, EIO, a read-only filesystem) does not fail the read that
//! caused it: the span — already verified — is served from memory, the failure is counted and
//! logged (at most once a minute), least recently used spans are evicted to make room, and the
//! write is tried once more. A cache that cannot write at all (full with nothing to evict, or a
//! read-only or unusable directory) keeps working from memory, in a bounded in-memory span
//! cache, and tries the disk again every few seconds, so it recovers by itself when space
//! returns.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Trailer magic of a span file.
const MAGIC: &[u8; 8] = b"CLIPSPAN";
/// Trailer length: xxh3-64 then the magic.
const TRAILER: u64 = 16;

/// How often a used span's modification time is refreshed (its LRU clock).
const TOUCH_EVERY: Duration = Duration::from_mins(1);
/// Open span files kept per process.
const OPEN_FILES: usize = 512;
/// Temporary files older than this are leftovers of a crashed writer.
const STALE_TMP: Duration = Duration::from_mins(10);
/// How often free space is checked as the cache grows.
const STATVFS_EVERY: Duration = Duration::from_secs(1);
/// How long a cache that failed to write waits before it tries the disk again.
const RETRY_DISK: Duration = Duration::from_secs(5);
/// Most bytes of spans kept in memory while the disk cannot take them.
const MEMORY_BYTES: u64 = 256 << 20;
/// Least time between two warnings about the same trouble.
const WARN_EVERY: Duration = Duration::from_mins(1);

/// Counters of one cache handle (this process's view).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Span lookups answered from the cache.
    pub hits: u64,
    /// Spans that had to be fetched (not in the cache when first needed).
    pub misses: u64,
    /// Span files deleted to stay under the cap.
    pub evictions: u64,
    /// Span files found corrupt and deleted.
    pub corrupt: u64,
    /// Bytes written into the cache.
    pub inserted_bytes: u64,
    /// Bytes in the cache directory at the last scan or insert (all processes).
    pub disk_bytes: u64,
    /// Span writes that failed (full disk, quota, I/O error, read-only filesystem); the spans
    /// were served from memory.
    pub write_failures: u64,
    /// Spans deleted because the filesystem ran short of free space (not because the cache
    /// reached its configured size).
    pub pressure_evictions: u64,
    /// The bound in force: the configured size, or less when the filesystem is short of space.
    pub effective_bound: u64,
    /// Free bytes on the cache's filesystem at the last check.
    pub free_bytes: u64,
    /// Spans served from memory because the disk could not take them, and their bytes.
    pub memory_spans: u64,
    /// Whether the cache is in memory-only mode now.
    pub memory_only: bool,
}

/// An open, verified span: its bytes, memory-mapped from its file, or held in memory when the
/// disk could not take them.
#[derive(Debug)]
pub struct Span {
    data: SpanData,
}

#[derive(Debug)]
enum SpanData {
    Mapped { map: memmap2::Mmap, len: usize },
    Memory(Vec<u8>),
}

impl Span {
    /// The span's uncompressed bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            SpanData::Mapped { map, len } => &map[..*len],
            SpanData::Memory(b) => b,
        }
    }

    /// Whether the span is backed by its file in the cache (not only by memory).
    #[must_use]
    pub fn on_disk(&self) -> bool {
        matches!(self.data, SpanData::Mapped { .. })
    }

    /// Maps `file` and checks its trailer against `len` bytes of content.
    fn map(file: &File, len: u64) -> Option<Self> {
        let size = file.metadata().ok()?.len();
        if size != len.checked_add(TRAILER)? {
            return None;
        }
        // SAFETY: span files are never modified in place: they are written under a temporary
        // name and renamed, and removed (not truncated) on eviction, so the mapping stays valid.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(file) }.ok()?;
        let len = usize::try_from(len).ok()?;
        let (bytes, trailer) = map.split_at(len);
        let ok = trailer[8..] == MAGIC[..]
            && trailer[..8] == xxhash_rust::xxh3::xxh3_64(bytes).to_le_bytes();
        ok.then_some(Self {
            data: SpanData::Mapped { map, len },
        })
    }
}

/// A shared open span.
pub type SpanFile = Arc<Span>;

/// A content-addressed, size-bounded, multi-process disk cache of spans.
#[derive(Debug)]
pub struct SpanCache {
    dir: PathBuf,
    max_bytes: u64,
    open: Mutex<OpenFiles>,
    total: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    inserted: AtomicU64,
    tmp_seq: AtomicU64,
    /// Serialises this process's size accounting with its evictions: an eviction's rescan sets
    /// the total, and an insert counted between that scan and that store would be lost,
    /// leaving the directory over its cap with nothing left to trigger another eviction.
    accounting: Mutex<()>,
    /// Percentage of the filesystem to keep free.
    min_free_percent: u8,
    /// The bound in force (≤ `max_bytes`), and the free bytes seen at the last check.
    effective: AtomicU64,
    free: AtomicU64,
    last_statvfs: Mutex<Option<std::time::Instant>>,
    write_failures: AtomicU64,
    pressure_evictions: AtomicU64,
    /// Memory-only mode: since when the disk last refused a write.
    degraded: Mutex<Option<std::time::Instant>>,
    /// Spans kept in memory while the disk cannot take them (bounded by `MEMORY_BYTES`).
    memory: Mutex<MemorySpans>,
    last_warning: Mutex<Option<std::time::Instant>>,
}

/// The in-memory tier: spans by digest, oldest dropped first past the bound.
#[derive(Debug, Default)]
struct MemorySpans {
    spans: HashMap<[u8; 32], (SpanFile, u64)>,
    bytes: u64,
    tick: u64,
    served: u64,
}

impl MemorySpans {
    fn get(&mut self, digest: &[u8; 32]) -> Option<SpanFile> {
        self.tick += 1;
        let tick = self.tick;
        let (f, used) = self.spans.get_mut(digest)?;
        *used = tick;
        Some(Arc::clone(f))
    }

    fn insert(&mut self, digest: [u8; 32], span: SpanFile) {
        let len = span.bytes().len() as u64;
        self.tick += 1;
        self.served += 1;
        while self.bytes + len > MEMORY_BYTES && !self.spans.is_empty() {
            let Some(oldest) = self
                .spans
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(d, _)| *d)
            else {
                break;
            };
            if let Some((f, _)) = self.spans.remove(&oldest) {
                self.bytes -= f.bytes().len() as u64;
            }
        }
        if let Some((old, _)) = self.spans.insert(digest, (span, self.tick)) {
            self.bytes -= old.bytes().len() as u64;
        }
        self.bytes += len;
    }
}

#[derive(Debug, Default)]
struct OpenFiles {
    files: HashMap<[u8; 32], (SpanFile, u64, SystemTime)>,
    tick: u64,
}

impl SpanCache {
    /// Opens (creating) the cache in `dir`, bounded to `max_bytes` and to what leaves 10% of
    /// its filesystem free.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        Self::open_with(dir, max_bytes, 10)
    }

    /// Opens (creating) the cache in `dir`, bounded to `max_bytes` and to what leaves
    /// `min_free_percent` of its filesystem free. A directory that exists but cannot be
    /// written (read-only, full) is not an error: the cache serves from memory until it can.
    /// One that is unsafe (a symlink, another owner) is.
    pub fn open_with(dir: &Path, max_bytes: u64, min_free_percent: u8) -> std::io::Result<Self> {
        // Spans hold the content of private images: the cache is its owner's alone.
        let mut unwritable = None;
        for d in [dir.to_owned(), dir.join("spans"), dir.join("tmp")] {
            match clip_host::private_dir(&d) {
                Ok(()) => {}
                Err(e @ clip_host::HostError::Unsafe { .. }) => {
                    return Err(e.into());
                }
                Err(e) => {
                    unwritable = Some(e);
                    break;
                }
            }
        }
        // Existing directories on a read-only filesystem pass the checks above: try a write.
        if unwritable.is_none() {
            let probe = dir
                .join("tmp")
                .join(format!(".probe-{}", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
            {
                Ok(_) => {
                    let _ = std::fs::remove_file(&probe);
                }
                Err(e) => {
                    unwritable = Some(clip_host::HostError::Io {
                        context: "writing in",
                        path: probe,
                        source: e,
                    });
                }
            }
        }
        let cache = Self {
            dir: dir.to_owned(),
            max_bytes,
            open: Mutex::new(OpenFiles::default()),
            total: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            accounting: Mutex::new(()),
            min_free_percent: min_free_percent.min(90),
            effective: AtomicU64::new(max_bytes),
            free: AtomicU64::new(0),
            last_statvfs: Mutex::new(None),
            write_failures: AtomicU64::new(0),
            pressure_evictions: AtomicU64::new(0),
            degraded: Mutex::new(None),
            memory: Mutex::new(MemorySpans::default()),
            last_warning: Mutex::new(None),
        };
        if let Some(e) = unwritable {
            tracing::warn!(dir = %dir.display(), error = %e, "the span cache cannot be written; serving spans from memory until it can");
            *lock(&cache.last_warning) = Some(std::time::Instant::now());
            *lock(&cache.degraded) = Some(std::time::Instant::now());
        }
        cache.clean_tmp();
        cache.refresh_bound(true);
        let total = cache.scan().iter().map(|f| f.1).sum();
        cache.total.store(total, Ordering::Relaxed);
        if total > max_bytes {
            cache.evict();
        }
        Ok(cache)
    }

    /// The cache directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size bound.
    #[must_use]
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// This handle's counters.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            inserted_bytes: self.inserted.load(Ordering::Relaxed),
            disk_bytes: self.total.load(Ordering::Relaxed),
            write_failures: self.write_failures.load(Ordering::Relaxed),
            pressure_evictions: self.pressure_evictions.load(Ordering::Relaxed),
            effective_bound: self.effective.load(Ordering::Relaxed),
            free_bytes: self.free.load(Ordering::Relaxed),
            memory_spans: lock(&self.memory).served,
            memory_only: lock(&self.degraded).is_some(),
        }
    }

    fn path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(digest);
        self.dir.join("spans").join(&hex[..2]).join(hex)
    }

    /// A span already open in this process (no disk access): the fast path of every read.
    #[must_use]
    pub fn get_open(&self, digest: &[u8; 32]) -> Option<SpanFile> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.tick += 1;
        let tick = open.tick;
        let Some((file, used, touched)) = open.files.get_mut(digest) else {
            drop(open);
            let f = lock(&self.memory).get(digest)?;
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Some(f);
        };
        *used = tick;
        let file = Arc::clone(file);
        if touched.elapsed().unwrap_or_default() > TOUCH_EVERY {
            *touched = SystemTime::now();
            if let Ok(f) = File::open(self.path(digest)) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(file)
    }

    /// The span with this digest, if some process cached it: opened and verified once per process.
    /// A file that fails verification is deleted and reported as a miss.
    #[must_use]
    pub fn get(&self, digest: &[u8; 32], len: u64) -> Option<SpanFile> {
        if let Some(f) = self.get_open(digest) {
            return Some(f);
        }
        let path = self.path(digest);
        let Ok(file) = File::open(&path) else {
            return None;
        };
        let Some(span) = Span::map(&file, len) else {
            tracing::warn!(path = %path.display(), "cached span fails its check; deleting it");
            let _ = std::fs::remove_file(&path);
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let _ = file.set_modified(SystemTime::now());
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(self.remember(*digest, span))
    }

    /// Counts spans that were not cached and are being fetched.
    pub fn count_misses(&self, n: u64) {
        self.misses.fetch_add(n, Ordering::Relaxed);
    }

    fn remember(&self, digest: [u8; 32], span: Span) -> SpanFile {
        let file = Arc::new(span);
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.tick += 1;
        let tick = open.tick;
        if open.files.len() >= OPEN_FILES {
            // Close the least recently used eighth in one pass.
            let mut by_use: Vec<(u64, [u8; 32])> = open
                .files
                .iter()
                .map(|(d, (_, used, _))| (*used, *d))
                .collect();
            by_use.sort_unstable();
            for (_, d) in by_use.iter().take(OPEN_FILES / 8) {
                open.files.remove(d);
            }
        }
        open.files
            .insert(digest, (Arc::clone(&file), tick, SystemTime::now()));
        file
    }

    /// Stores verified span bytes under their digest and returns the open span. The caller has
    /// checked `bytes` against `digest`. Never fails: when the disk cannot take the span, it is
    /// served from memory (see the module doc).
    pub fn insert(&self, digest: &[u8; 32], bytes: Vec<u8>) -> SpanFile {
        let retry_due = lock(&self.degraded).is_none_or(|since| since.elapsed() >= RETRY_DISK);
        if retry_due {
            let first = self.write(digest, &bytes).or_else(|e| {
                self.write_failed(&e);
                // Make room (least recently used first), then try once more.
                self.evict_to(
                    self.total
                        .load(Ordering::Relaxed)
                        .saturating_sub(2 * (bytes.len() as u64 + TRAILER)),
                    true,
                );
                self.write(digest, &bytes)
            });
            match first {
                Ok(span) => {
                    if lock(&self.degraded).take().is_some() {
                        tracing::info!(dir = %self.dir.display(), "the span cache is writable again");
                    }
                    return span;
                }
                Err(e) => {
                    self.write_failed(&e);
                    *lock(&self.degraded) = Some(std::time::Instant::now());
                }
            }
        }
        let span = Arc::new(Span {
            data: SpanData::Memory(bytes),
        });
        lock(&self.memory).insert(*digest, Arc::clone(&span));
        metrics::gauge!("clip_cache_memory_only").set(1.0);
        span
    }

    /// Writes a span file (temporary name, then renamed into place) and accounts for it.
    fn write(&self, digest: &[u8; 32], bytes: &[u8]) -> std::io::Result<SpanFile> {
        self.write_with(digest, bytes.len() as u64, |put| put(bytes))
    }

    /// Stores a span of `len` bytes that `fill` produces in pieces (handing each to the `put`
    /// it is given), without ever holding it whole: for spans too large for memory. `fill`
    /// verifies the bytes as they pass and fails to abandon the span; nothing is stored then.
    /// Unlike [`insert`](Self::insert) there is no memory fallback: a disk that cannot take the
    /// span is an error.
    pub fn insert_with(
        &self,
        digest: &[u8; 32],
        len: u64,
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()>,
    ) -> std::io::Result<SpanFile> {
        self.write_with(digest, len, fill)
            .inspect_err(|e| self.write_failed(e))
    }

    fn write_with(
        &self,
        digest: &[u8; 32],
        len: u64,
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()>,
    ) -> std::io::Result<SpanFile> {
        let path = self.path(digest);
        if let Some(parent) = path.parent() {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}.{}",
            hex::encode(&digest[..8]),
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?
        };
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut written = 0u64;
        let written = {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut f);
            fill(&mut |piece: &[u8]| {
                hasher.update(piece);
                written += piece.len() as u64;
                out.write_all(piece)
            })
            .and_then(|()| {
                if written == len {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "span of {written} bytes, {len} expected"
                    )))
                }
            })
            .and_then(|()| {
                let mut trailer = [0u8; TRAILER as usize];
                trailer[..8].copy_from_slice(&hasher.digest().to_le_bytes());
                trailer[8..].copy_from_slice(MAGIC);
                out.write_all(&trailer)?;
                out.flush()
            })
        }
        .and_then(|()| {
            Span::map(&f, len).ok_or_else(|| std::io::Error::other("span file reads back wrong"))
        })
        .and_then(|span| std::fs::rename(&tmp, &path).map(|()| span));
        let span = match written {
            Ok(span) => span,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let len = len + TRAILER;
        self.inserted.fetch_add(len, Ordering::Relaxed);
        let opened = self.remember(*digest, span);
        self.refresh_bound(false);
        // The file is in place before its size is counted, so an eviction's rescan either
        // already sees it or runs after this addition.
        let _accounting = lock(&self.accounting);
        let total = self.total.fetch_add(len, Ordering::Relaxed) + len;
        let bound = self.effective.load(Ordering::Relaxed);
        if total > bound {
            self.evict_to(bound / 10 * 9, bound < self.max_bytes);
        }
        Ok(opened)
    }

    /// Counts and (at most once a minute) logs a failed span write.
    fn write_failed(&self, e: &std::io::Error) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("clip_cache_write_failures_total").increment(1);
        let mut last = lock(&self.last_warning);
        if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write to the span cache; serving verified spans from memory and making room");
        }
    }

    /// Re-reads the filesystem's free space (at most once a second unless `now`) and sets the
    /// bound in force: the configured size, or less when keeping `min_free_percent` free needs
    /// it.
    fn refresh_bound(&self, now: bool) {
        {
            let mut last = lock(&self.last_statvfs);
            if !now && last.is_some_and(|t| t.elapsed() < STATVFS_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let Ok(st) = rustix::fs::statvfs(&self.dir) else {
            return;
        };
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let size = st.f_blocks.saturating_mul(st.f_frsize);
        let keep = size / 100 * u64::from(self.min_free_percent);
        let room = self.total.load(Ordering::Relaxed) + free.saturating_sub(keep);
        let bound = self.max_bytes.min(room);
        self.free.store(free, Ordering::Relaxed);
        self.effective.store(bound, Ordering::Relaxed);
        metrics::gauge!("clip_cache_free_bytes").set(free as f64);
        metrics::gauge!("clip_cache_effective_bound_bytes").set(bound as f64);
    }

    /// Checks every span file on disk (its trailer: size, magic, xxh3) and deletes the ones that
    /// fail; returns (files checked, files deleted). For operators and tests: a cache is never
    /// trusted without this check on open anyway.
    pub fn verify_all(&self) -> (usize, usize) {
        let (mut checked, mut bad) = (0, 0);
        for (path, size, _) in self.scan() {
            checked += 1;
            let ok = size >= TRAILER
                && File::open(&path)
                    .ok()
                    .and_then(|f| Span::map(&f, size - TRAILER))
                    .is_some();
            if !ok {
                bad += 1;
                let _ = std::fs::remove_file(&path);
            }
        }
        (checked, bad)
    }

    /// Every span file with its size and modification time.
    fn scan(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.dir.join("spans")) else {
            return out;
        };
        for d in dirs.flatten() {
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(m) = f.metadata()
                    && m.is_file()
                {
                    out.push((
                        f.path(),
                        m.len(),
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    ));
                }
            }
        }
        out
    }

    /// Deletes least recently used spans until the directory is under 90% of the cap.
    fn evict(&self) {
        self.evict_to(self.max_bytes / 10 * 9, false);
    }

    /// Deletes least recently used spans until the directory holds at most `target` bytes;
    /// `pressure`: because the filesystem is short of space (counted apart).
    fn evict_to(&self, target: u64, pressure: bool) {
        let mut files = self.scan();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|f| f.2);
        for (path, len, _) in files {
            if total <= target {
                break;
            }
            // Someone else may have evicted it first: only count what we removed.
            if std::fs::remove_file(&path).is_ok() {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                if pressure {
                    self.pressure_evictions.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("clip_cache_pressure_evictions_total").increment(1);
                }
            }
            total -= len;
        }
        self.total.store(total, Ordering::Relaxed);
    }

    fn clean_tmp(&self) {
        let Ok(files) = std::fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for f in files.flatten() {
            let old = f
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP);
            if old {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use sha2::{Digest as _, Sha256};

    fn digest(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    #[test]
    fn insert_get_verify_and_evict() {
        let dir = tempfile::tempdir().unwrap();
        // No free-space floor: the test machine's disk may be nearly full.
        let cache = SpanCache::open_with(dir.path(), 10_000, 0).unwrap();
        let a = vec![1u8; 4000];
        let da = digest(&a);
        assert!(cache.get(&da, 4000).is_none());
        cache.insert(&da, a.clone());

        // A second handle (another process) verifies and reads it.
        let other = SpanCache::open_with(dir.path(), 10_000, 0).unwrap();
        let f = other.get(&da, 4000).unwrap();
        assert_eq!(f.bytes(), &a[..]);

        // Corruption on disk (a flipped byte, a torn file) is detected by a fresh handle and
        // the file removed.
        let mut on_disk = std::fs::read(other.path(&da)).unwrap();
        on_disk[17] ^= 1;
        std::fs::write(other.path(&da), &on_disk).unwrap();
        let third = SpanCache::open_with(dir.path(), 10_000, 0).unwrap();
        assert!(third.get(&da, 4000).is_none());
        assert_eq!(third.stats().corrupt, 1);
        assert!(!third.path(&da).exists());
        third.insert(&da, a.clone());
        std::fs::write(third.path(&da), &on_disk[..100]).unwrap();
        assert!(
            SpanCache::open_with(dir.path(), 10_000, 0)
                .unwrap()
                .get(&da, 4000)
                .is_none()
        );

        // Filling past the cap evicts the oldest down to 90%.
        for i in 0..5u8 {
            let b = vec![i + 10; 3000];
            third.insert(&digest(&b), b.clone());
        }
        let on_disk: u64 = third.scan().iter().map(|f| f.1).sum();
        assert!(on_disk <= 10_000, "{on_disk}");
        assert!(third.stats().evictions >= 2);
    }
}
