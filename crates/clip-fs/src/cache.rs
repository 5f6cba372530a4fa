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
}

/// An open, verified span: its bytes, memory-mapped.
#[derive(Debug)]
pub struct Span {
    map: memmap2::Mmap,
    len: usize,
}

impl Span {
    /// The span's uncompressed bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.map[..self.len]
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
        ok.then_some(Self { map, len })
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
}

#[derive(Debug, Default)]
struct OpenFiles {
    files: HashMap<[u8; 32], (SpanFile, u64, SystemTime)>,
    tick: u64,
}

impl SpanCache {
    /// Opens (creating) the cache in `dir`, bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        // Spans hold the content of private images: the cache is its owner's alone.
        for d in [dir.to_owned(), dir.join("spans"), dir.join("tmp")] {
            clip_format::private_dir(&d).map_err(std::io::Error::other)?;
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
        };
        cache.clean_tmp();
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
        let (file, used, touched) = open.files.get_mut(digest)?;
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

    /// Stores verified span bytes under their digest and returns the open file. The caller has
    /// checked `bytes` against `digest`.
    pub fn insert(&self, digest: &[u8; 32], bytes: &[u8]) -> std::io::Result<SpanFile> {
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
        let mut trailer = [0u8; TRAILER as usize];
        trailer[..8].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(bytes).to_le_bytes());
        trailer[8..].copy_from_slice(MAGIC);
        let written = f
            .write_all(bytes)
            .and_then(|()| f.write_all(&trailer))
            .and_then(|()| {
                Span::map(&f, bytes.len() as u64)
                    .ok_or_else(|| std::io::Error::other("span file reads back wrong"))
            })
            .and_then(|span| std::fs::rename(&tmp, &path).map(|()| span));
        let span = match written {
            Ok(span) => span,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let len = bytes.len() as u64 + TRAILER;
        self.inserted.fetch_add(len, Ordering::Relaxed);
        let file = self.remember(*digest, span);
        // The file is in place before its size is counted, so an eviction's rescan either
        // already sees it or runs after this addition.
        let _accounting = self
            .accounting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total = self.total.fetch_add(len, Ordering::Relaxed) + len;
        if total > self.max_bytes {
            self.evict();
        }
        Ok(file)
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
        let mut files = self.scan();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let target = self.max_bytes / 10 * 9;
        files.sort_by_key(|f| f.2);
        for (path, len, _) in files {
            if total <= target {
                break;
            }
            // Someone else may have evicted it first: only count what we removed.
            if std::fs::remove_file(&path).is_ok() {
                self.evictions.fetch_add(1, Ordering::Relaxed);
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
        let cache = SpanCache::open(dir.path(), 10_000).unwrap();
        let a = vec![1u8; 4000];
        let da = digest(&a);
        assert!(cache.get(&da, 4000).is_none());
        cache.insert(&da, &a).unwrap();

        // A second handle (another process) verifies and reads it.
        let other = SpanCache::open(dir.path(), 10_000).unwrap();
        let f = other.get(&da, 4000).unwrap();
        assert_eq!(f.bytes(), &a[..]);

        // Corruption on disk (a flipped byte, a torn file) is detected by a fresh handle and
        // the file removed.
        let mut on_disk = std::fs::read(other.path(&da)).unwrap();
        on_disk[17] ^= 1;
        std::fs::write(other.path(&da), &on_disk).unwrap();
        let third = SpanCache::open(dir.path(), 10_000).unwrap();
        assert!(third.get(&da, 4000).is_none());
        assert_eq!(third.stats().corrupt, 1);
        assert!(!third.path(&da).exists());
        third.insert(&da, &a).unwrap();
        std::fs::write(third.path(&da), &on_disk[..100]).unwrap();
        assert!(
            SpanCache::open(dir.path(), 10_000)
                .unwrap()
                .get(&da, 4000)
                .is_none()
        );

        // Filling past the cap evicts the oldest down to 90%.
        for i in 0..5u8 {
            let b = vec![i + 10; 3000];
            third.insert(&digest(&b), &b).unwrap();
        }
        let on_disk: u64 = third.scan().iter().map(|f| f.1).sum();
        assert!(on_disk <= 10_000, "{on_disk}");
        assert!(third.stats().evictions >= 2);
    }
}
