//! Layer-index reuse: one layer's index (its tar entries with data offsets, its checkpoints and
//! span digests) stored on its own, keyed by the layer blob digest and the indexing parameters,
//! so a base layer shared by thousands of images is streamed and indexed once.
//!
//! # Model
//!
//! A layer index is a function of the layer blob (named by its digest) and the span size; it
//! does not depend on the image around it. [`layer_key`] names it; [`encode`] and [`decode`]
//! give it a small self-checking binary form (magic, version, lengths checked against the bytes
//! present before anything is allocated, an xxh3 trailer). A [`LayerIndexStore`] keeps them:
//! [`DirLayerStore`] in a local directory, any other backend (an object store shared by a fleet)
//! by implementing the trait, [`Tiered`] to look in a fast store before a shared one. Writes are
//! create-only: the first writer wins, later ones find the object present and keep it, and a
//! reader never sees a partial object. A stored index is used only if it names the same blob,
//! span, size and `diff_id` as the layer being indexed; anything else is ignored and the layer is
//! indexed again.

use clip_format::Digest;
use std::io::Write as _;
use std::path::PathBuf;

use clip_format::merge::LayerEntry;
use clip_format::{
    Checkpoint, CheckpointKind, LayerSpan, MediaKind, Metadata, NodeKind, SparseMap,
};
use clip_seekable::LayerIndex;

const MAGIC: &[u8; 8] = b"CLIPLIX\0";
/// Version of the stored layer-index encoding (part of every key).
pub const LAYER_INDEX_VERSION: u32 = 2;
const MAX_NAME: usize = 1 << 20;
const MAX_WINDOW: usize = 1 << 17;

/// The store key of the index of layer blob `digest` indexed with spans of `span` bytes.
#[must_use]
pub fn layer_key(digest: &Digest, span: u64) -> String {
    versioned_key(digest, span, LAYER_INDEX_VERSION)
}

fn versioned_key(digest: &Digest, span: u64, version: u32) -> String {
    format!(
        "{}-{}.s{span}.v{version}.cliplayer",
        digest.algorithm(),
        digest.hex()
    )
}

/// The keys earlier encodings used for the same layer and span: superseded once the current
/// one is stored.
pub(crate) fn superseded_keys(digest: &Digest, span: u64) -> impl Iterator<Item = String> {
    (1..LAYER_INDEX_VERSION).map(move |v| versioned_key(digest, span, v))
}

/// Why stored layer-index bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid layer index: {0}")]
pub struct DecodeError(pub String);

/// One layer's index as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLayer {
    /// The layer blob digest it was built from.
    pub digest: Digest,
    /// Compression of the blob.
    pub media: MediaKind,
    /// Indexed from an eStargz table of contents (virtual offsets).
    pub toc_indexed: bool,
    /// Entries of the layer's tar stream (file spans name layer 0; the user renumbers).
    pub entries: Vec<LayerEntry>,
    /// Checkpoints, sizes, `diff_id`.
    pub index: LayerIndex,
}

/// Encodes a layer index.
#[must_use]
pub fn encode(layer: &StoredLayer) -> Vec<u8> {
    encode_parts(
        &layer.digest,
        layer.media,
        layer.toc_indexed,
        &layer.entries,
        &layer.index,
    )
}

/// [`encode`] from borrowed parts.
pub(crate) fn encode_parts(
    digest: &Digest,
    media: MediaKind,
    toc_indexed: bool,
    entries: &[LayerEntry],
    ix: &LayerIndex,
) -> Vec<u8> {
    let mut w = Vec::with_capacity(1 << 16);
    w.extend_from_slice(MAGIC);
    put_u32(&mut w, LAYER_INDEX_VERSION);
    put_bytes(&mut w, digest.as_str().as_bytes());
    w.push(media.code());
    w.push(u8::from(toc_indexed));
    put_u64(&mut w, ix.compressed_size);
    put_u64(&mut w, ix.uncompressed_size);
    w.extend_from_slice(&ix.diff_id);
    put_u32(&mut w, ix.members);
    put_u64(&mut w, ix.span);
    put_u32(
        &mut w,
        u32::try_from(ix.checkpoints.len()).unwrap_or(u32::MAX),
    );
    for c in &ix.checkpoints {
        w.push(c.kind.code());
        put_u64(&mut w, c.compressed_offset);
        put_u64(&mut w, c.uncompressed_offset);
        w.push(c.bits);
        put_bytes(&mut w, &c.window);
        w.extend_from_slice(&c.span_digest);
        match &c.chain_head {
            None => w.push(0),
            Some(head) => {
                w.push(1);
                put_bytes(&mut w, head);
            }
        }
    }
    put_u32(&mut w, u32::try_from(entries.len()).unwrap_or(u32::MAX));
    for e in entries {
        put_bytes(&mut w, &e.path);
        match &e.kind {
            NodeKind::Dir => w.push(0),
            NodeKind::File { size, span } => {
                w.push(1);
                put_u64(&mut w, *size);
                match span {
                    Some(s) => {
                        w.push(if s.sparse.is_some() { 2 } else { 1 });
                        put_u64(&mut w, s.offset);
                        if let Some(map) = &s.sparse {
                            put_u32(
                                &mut w,
                                u32::try_from(map.extents().len()).unwrap_or(u32::MAX),
                            );
                            for e in map.extents() {
                                put_u64(&mut w, e.offset);
                                put_u64(&mut w, e.length);
                            }
                        }
                    }
                    None => w.push(0),
                }
            }
            NodeKind::Symlink(t) => {
                w.push(2);
                put_bytes(&mut w, t);
            }
            NodeKind::HardLink(t) => {
                w.push(3);
                put_bytes(&mut w, t);
            }
            NodeKind::CharDevice { major, minor } => {
                w.push(4);
                put_u32(&mut w, *major);
                put_u32(&mut w, *minor);
            }
            NodeKind::BlockDevice { major, minor } => {
                w.push(5);
                put_u32(&mut w, *major);
                put_u32(&mut w, *minor);
            }
            NodeKind::Fifo => w.push(6),
            NodeKind::Socket => w.push(7),
        }
        let m = &e.meta;
        put_u32(&mut w, m.mode);
        put_u32(&mut w, m.uid);
        put_u32(&mut w, m.gid);
        w.extend_from_slice(&m.mtime_sec.to_le_bytes());
        put_u32(&mut w, m.mtime_nsec);
        put_u32(&mut w, u32::try_from(m.xattrs.len()).unwrap_or(u32::MAX));
        for (k, v) in &m.xattrs {
            put_bytes(&mut w, k);
            put_bytes(&mut w, v);
        }
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&w);
    w.extend_from_slice(&sum.to_le_bytes());
    w
}

/// Decodes stored layer-index bytes; file spans name layer `layer`. Never panics; every length
/// is checked against the bytes present before it is used.
// Over 100 lines on purpose: the decoder of the layer-index format (untrusted bytes from a shared
// store): one bounds-checked pass in the order docs/format.md specifies the fields, so each check
// sits beside the field it guards.
pub fn decode(bytes: &[u8], layer: u32) -> Result<StoredLayer, DecodeError> {
    let bad = |s: &str| DecodeError(s.to_owned());
    if bytes.len() < MAGIC.len() + 4 + 8 || &bytes[..8] != MAGIC {
        return Err(bad("not a clip layer index (bad magic)"));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 8);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(trailer);
    if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(sum) {
        return Err(bad("checksum mismatch (corrupt or truncated)"));
    }
    let mut r = Cursor {
        b: &body[8..],
        at: 8,
    };
    let version = r.u32()?;
    if version != LAYER_INDEX_VERSION {
        return Err(DecodeError(format!("unsupported version {version}")));
    }
    let digest = std::str::from_utf8(r.bytes(MAX_NAME)?)
        .ok()
        .and_then(|d| Digest::parse(d).ok())
        .ok_or_else(|| bad("the layer digest is not a digest"))?;
    let media = MediaKind::from_code(r.u8()?).ok_or_else(|| bad("unknown media kind"))?;
    let toc_indexed = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(bad("bad flags")),
    };
    let compressed_size = r.u64()?;
    let uncompressed_size = r.u64()?;
    let diff_id = r.array32()?;
    let members = r.u32()?;
    let span = r.u64()?;
    let n = r.u32()?;
    let mut checkpoints = Vec::new();
    let mut last = None;
    for _ in 0..n {
        let kind =
            CheckpointKind::from_code(r.u8()?).ok_or_else(|| bad("unknown checkpoint kind"))?;
        let compressed_offset = r.u64()?;
        let uncompressed_offset = r.u64()?;
        let bits = r.u8()?;
        let window = r.bytes(MAX_WINDOW)?.to_vec();
        let span_digest = r.array32()?;
        let chain_head = match r.u8()? {
            0 => None,
            1 => Some(r.bytes(63)?.to_vec()),
            _ => return Err(bad("unknown span check")),
        };
        if chain_head
            .as_ref()
            .is_some_and(|h| h.len() as u64 != uncompressed_offset % 64)
        {
            return Err(bad("chain head of the wrong length"));
        }
        if bits > 7
            || compressed_offset > compressed_size
            || uncompressed_offset > uncompressed_size
        {
            return Err(bad("checkpoint out of range"));
        }
        if last.is_some_and(|l| l >= uncompressed_offset) {
            return Err(bad("checkpoints out of order"));
        }
        last = Some(uncompressed_offset);
        checkpoints.push(Checkpoint {
            kind,
            compressed_offset,
            uncompressed_offset,
            bits,
            window,
            span_digest,
            chain_head,
        });
    }
    if checkpoints
        .first()
        .is_some_and(|c| c.uncompressed_offset != 0)
    {
        return Err(bad("the first checkpoint is not at offset 0"));
    }
    let n = r.u32()?;
    let mut entries = Vec::new();
    for _ in 0..n {
        let path = r.bytes(MAX_NAME)?.to_vec();
        let kind = match r.u8()? {
            0 => NodeKind::Dir,
            1 => {
                let size = r.u64()?;
                let span = match r.u8()? {
                    0 => None,
                    flag @ (1 | 2) => {
                        let offset = r.u64()?;
                        let sparse = if flag == 2 {
                            let n = r.u32()? as usize;
                            if n > r.b.len() / 16 {
                                return Err(bad("sparse map longer than the index"));
                            }
                            let mut extents = Vec::with_capacity(n);
                            for _ in 0..n {
                                extents.push((r.u64()?, r.u64()?));
                            }
                            let map = SparseMap::new(extents, size)
                                .map_err(|e| DecodeError(format!("sparse map: {e}")))?;
                            Some(std::sync::Arc::new(map))
                        } else {
                            None
                        };
                        let stored = sparse.as_ref().map_or(size, |m| m.stored_len());
                        if offset
                            .checked_add(stored)
                            .is_none_or(|end| end > uncompressed_size)
                        {
                            return Err(bad("file data out of the layer"));
                        }
                        Some(LayerSpan {
                            layer,
                            offset,
                            sparse,
                        })
                    }
                    _ => return Err(bad("bad span flag")),
                };
                NodeKind::File { size, span }
            }
            2 => NodeKind::Symlink(r.bytes(MAX_NAME)?.to_vec()),
            3 => NodeKind::HardLink(r.bytes(MAX_NAME)?.to_vec()),
            4 => NodeKind::CharDevice {
                major: r.u32()?,
                minor: r.u32()?,
            },
            5 => NodeKind::BlockDevice {
                major: r.u32()?,
                minor: r.u32()?,
            },
            6 => NodeKind::Fifo,
            7 => NodeKind::Socket,
            _ => return Err(bad("unknown entry kind")),
        };
        let mode = r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let secs = i64::from_le_bytes(r.take(8)?.try_into().map_err(|_| bad("short"))?);
        let nanos = r.u32()?;
        let nx = r.u32()?;
        let mut xattrs = Vec::new();
        for _ in 0..nx {
            let k = r.bytes(MAX_NAME)?.to_vec();
            let v = r.bytes(MAX_NAME)?.to_vec();
            xattrs.push((k, v));
        }
        entries.push(LayerEntry {
            path,
            kind,
            meta: Metadata {
                mode,
                uid,
                gid,
                mtime_sec: secs,
                mtime_nsec: nanos,
                xattrs,
            },
        });
    }
    if !r.b.is_empty() {
        return Err(DecodeError(format!(
            "{} trailing bytes at {}",
            r.b.len(),
            r.at
        )));
    }
    Ok(StoredLayer {
        digest,
        media,
        toc_indexed,
        entries,
        index: LayerIndex {
            checkpoints,
            compressed_size,
            uncompressed_size,
            diff_id,
            members,
            span,
            input: None,
        },
    })
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, u32::try_from(b.len()).unwrap_or(u32::MAX));
    w.extend_from_slice(b);
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.b.len() {
            return Err(DecodeError(format!(
                "truncated at byte {} (wanted {n} more)",
                self.at
            )));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        self.at += n;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn array32(&mut self) -> Result<[u8; 32], DecodeError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError(format!(
                "length {n} at byte {} exceeds {max}",
                self.at
            )));
        }
        self.take(n)
    }
}

/// Where layer indexes are kept. Implementations must make `put` create-only and atomic: a
/// concurrent or later `put` of the same key leaves the first object in place, and `get` never
/// returns a partial object.
pub trait LayerIndexStore: Send + Sync + std::fmt::Debug {
    /// The bytes stored under `key`, or `None` when absent or unreachable (the caller indexes the
    /// layer instead).
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Stores `bytes` under `key` unless something is there already. `Ok(true)` when this call
    /// created it, `Ok(false)` when it was present.
    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool>;
    /// Where the store is (for logs).
    fn describe(&self) -> String;
    /// Drops `key`, found damaged or not matching its layer, so the next `put` can replace it.
    /// The default keeps it (a shared store may prefer to leave objects alone).
    fn discard(&self, key: &str) {
        let _ = key;
    }
}

impl<T: LayerIndexStore + ?Sized> LayerIndexStore for std::sync::Arc<T> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        (**self).get(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool> {
        (**self).put(key, bytes)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn discard(&self, key: &str) {
        (**self).discard(key);
    }
}

/// Layer indexes as files in a local directory (temp file, fsync, hard link into place: the
/// link fails if another process got there first).
#[derive(Debug, Clone)]
pub struct DirLayerStore {
    dir: PathBuf,
}

impl DirLayerStore {
    /// A store in `dir` (created on first write).
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() < 256
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl LayerIndexStore for DirLayerStore {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        if !valid_key(key) {
            return None;
        }
        std::fs::read(self.dir.join(key)).ok()
    }

    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool> {
        if !valid_key(key) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad layer index key {key:?}"),
            ));
        }
        clip_host::private_dir(&self.dir)?;
        let target = self.dir.join(key);
        if target.exists() {
            return Ok(false);
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        match std::fs::hard_link(tmp.path(), &target) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn discard(&self, key: &str) {
        if valid_key(key) {
            let _ = std::fs::remove_file(self.dir.join(key));
        }
    }
}

/// Several stores, fastest first: `get` returns the first hit and copies it into the faster
/// stores it missed; `put` writes to every store.
pub struct Tiered(pub Vec<Box<dyn LayerIndexStore>>);

impl LayerIndexStore for Tiered {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        for (i, s) in self.0.iter().enumerate() {
            if let Some(b) = s.get(key) {
                for faster in &self.0[..i] {
                    let _ = faster.put(key, &b);
                }
                return Some(b);
            }
        }
        None
    }

    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool> {
        let mut created = false;
        let mut first_err = None;
        for s in &self.0 {
            match s.put(key, bytes) {
                Ok(c) => created |= c,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if !created => Err(e),
            _ => Ok(created),
        }
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|s| s.describe())
            .collect::<Vec<_>>()
            .join(" → ")
    }

    fn discard(&self, key: &str) {
        for s in &self.0 {
            s.discard(key);
        }
    }
}

impl std::fmt::Debug for Tiered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tiered({})", self.describe())
    }
}
