//! Image → v2 index-only archive.
//!
//! # Model
//!
//! Given an image, stream every layer exactly once: hash the blob and check its digest, inflate
//! it while `clip-seekable` records checkpoints, walk the tar entries recording each file's offset
//! and length in the layer's *uncompressed* stream (requesting a checkpoint at the start of every
//! large file), and check the `diff_id` against the image config. Layers are processed in parallel
//! (one thread per core), then merged in order with the OCI rules of
//! [`clip_format::merge`]. The result is a v2 `.clip` archive holding the manifest digest, the
//! layer table, the checkpoints, the image config — and no file data. Nothing is written to disk
//! but the archive, which is published atomically.
//!
//! Input is an image reference, indexed straight from its registry ([`index_image`]: layer blobs
//! are streamed once through `clip-registry`, nothing is stored), or an OCI image layout directory
//! (what `buildah push oci:DIR` or `skopeo copy` writes) plus the registry location to record
//! ([`index_layout`]). Layers may be gzip (one or many members), zstd (frames are the seek
//! points; a single-frame layer is flagged to be read from its start) or uncompressed. PAX sparse
//! files (GNU tar formats 0.0, 0.1, 1.0) keep their extent map, so their holes cost nothing and
//! read as zeros; old GNU sparse entries (type `S`), which umoci, containerd and Docker refuse
//! too, are a typed error.
//!
//! A layer's index depends only on the layer blob and the span size, so it can be kept and
//! reused by every image built on that layer: with [`IndexOptions::layer_store`] set, a layer
//! whose stored index matches (blob digest, span, size, `diff_id`) is not fetched at all, and
//! new layer indexes are stored create-only ([`LayerIndexStore`], [`DirLayerStore`],
//! [`Tiered`]; the encoding is in `docs/format.md`). The merged archive is byte-for-byte the same
//! either way.
//!
//! An eStargz or zstd:chunked layer (its descriptor carries the TOC annotations) fetched from a
//! registry is indexed from its table of contents with one or two range requests instead of
//! being streamed ([`toc`]); when the TOC is unusable the layer is streamed as usual.
//!
//! ```no_run
//! use clip_indexer::{IndexOptions, index_layout};
//! let summary = index_layout("/tmp/layout".as_ref(), "/tmp/app.clip".as_ref(), &IndexOptions {
//!     tag: Some("latest".into()),
//!     registry: "127.0.0.1:5000".into(),
//!     repository: "library/app".into(),
//!     ..IndexOptions::default()
//! })?;
//! println!("{} entries, {} layers", summary.entries, summary.layers);
//! # Ok::<(), clip_indexer::Error>(())
//! ```

mod reuse;
mod tarwalk;
pub mod toc;

pub use reuse::{
    DecodeError, DirLayerStore, LAYER_INDEX_VERSION, LayerIndexStore, StoredLayer, Tiered,
    decode as decode_layer_index, encode as encode_layer_index, layer_key,
};

pub use clip_registry::oci;

/// Walks an uncompressed layer tar stream into entries (as layer `layer`), without checkpoints:
/// the parser of untrusted layer bytes, exposed for fuzzing and tools.
pub fn walk_tar<R: Read>(reader: R, layer: u32) -> Result<Vec<clip_format::merge::LayerEntry>> {
    tarwalk::walk(tarwalk::Forward::new(reader), layer, None, u64::MAX).map(|(entries, _)| entries)
}

use std::fs::File;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use clip_format::merge::{LayerEntry, Merger};
use clip_format::{LayerInfo, MediaKind, Meta, Source, write_v2};
use clip_seekable::{GzipIndexer, HashThread, InputFeed, LayerIndex, PlainIndexer};
use sha2::{Digest, Sha256};

pub use oci::Platform;

/// Why indexing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Writing or validating the archive failed.
    #[error(transparent)]
    Format(#[from] clip_format::Error),
    /// The registry failed or refused.
    #[error(transparent)]
    Registry(#[from] clip_registry::Error),
    /// A layer's compressed data is bad.
    #[error("layer {layer} ({digest}): {source}")]
    Layer {
        /// Layer index.
        layer: usize,
        /// Blob digest.
        digest: String,
        /// The cause.
        source: clip_seekable::Error,
    },
    /// A layer's tar stream is bad.
    #[error("layer {layer}: invalid tar stream: {reason}")]
    Tar {
        /// Layer index.
        layer: u32,
        /// What is wrong.
        reason: String,
    },
    /// Bytes do not match the digest that names them.
    #[error("{what} does not match its digest: expected {expected}, found {found}")]
    Digest {
        /// Which blob.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        found: String,
    },
    /// The image layout or its documents are invalid.
    #[error("invalid image: {0}")]
    Image(String),
    /// The image uses something not supported yet.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Reading the layout failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to index.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// The tag (`org.opencontainers.image.ref.name`) in the layout; `None` takes the only image.
    pub tag: Option<String>,
    /// Platform to pick from a multi-platform index (default: this machine's).
    pub platform: Option<Platform>,
    /// Uncompressed bytes between checkpoints.
    pub checkpoint_bytes: u64,
    /// Registry host to record as the image's location.
    pub registry: String,
    /// Repository to record.
    pub repository: String,
    /// The reference the user gave (informational).
    pub reference: String,
    /// Where per-layer indexes are looked up before a layer is streamed, and stored after.
    pub layer_store: Option<std::sync::Arc<dyn LayerIndexStore>>,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            tag: None,
            platform: None,
            checkpoint_bytes: 4 << 20,
            registry: String::new(),
            repository: String::new(),
            reference: String::new(),
            layer_store: None,
        }
    }
}

/// Progress of an indexing run, reported per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The image was resolved: its platform manifest and layer count.
    Resolved {
        /// Platform manifest digest.
        manifest_digest: String,
        /// Number of layers.
        layers: usize,
        /// Sum of the layer blob sizes.
        bytes: u64,
    },
    /// A layer was streamed and indexed.
    LayerDone {
        /// Layer index.
        layer: usize,
        /// Blob digest.
        digest: String,
        /// Compressed bytes fetched (the whole blob, or footer and TOC of an eStargz layer).
        compressed: u64,
        /// Tar entries walked.
        entries: usize,
    },
    /// A layer's stored index was reused: the layer was not fetched.
    LayerReused {
        /// Layer index.
        layer: usize,
        /// Blob digest.
        digest: String,
        /// Entries in the stored index.
        entries: usize,
    },
}

/// A progress callback (called from indexing threads).
pub type ProgressFn<'a> = dyn Fn(&Progress) + Send + Sync + 'a;

/// What indexing produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSummary {
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// Layers indexed.
    pub layers: usize,
    /// Entries in the merged tree.
    pub entries: usize,
    /// Checkpoints over all layers.
    pub checkpoints: usize,
    /// Archive size.
    pub archive_bytes: u64,
    /// Archive size without checkpoint windows.
    pub index_bytes: u64,
    /// Compressed bytes fetched (all of a streamed layer, footer and TOC of an eStargz one).
    pub compressed_bytes: u64,
    /// Uncompressed bytes walked.
    pub uncompressed_bytes: u64,
    /// Layers whose stored index was reused (not fetched).
    pub reused_layers: usize,
    /// Layers indexed from their eStargz table of contents (a few range requests each).
    pub toc_layers: usize,
}

const MAX_DOC: u64 = 4 << 20;

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Image(format!("unsupported or malformed digest {digest:?}")))?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

/// Reads a small JSON document blob, checking its size and digest.
fn read_doc(layout: &Path, d: &oci::Descriptor) -> Result<Vec<u8>> {
    if d.size > MAX_DOC {
        return Err(Error::Image(format!(
            "document {} is {} bytes (limit {MAX_DOC})",
            d.digest, d.size
        )));
    }
    let path = blob_path(layout, &d.digest)?;
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_DOC + 1).read_to_end(&mut bytes))
        .map_err(|source| Error::Io {
            context: "reading",
            path: path.clone(),
            source,
        })?;
    check_digest(&d.digest, &bytes, &d.digest)?;
    Ok(bytes)
}

fn check_digest(what: &str, bytes: &[u8], expected: &str) -> Result<()> {
    let found = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    if found == expected {
        Ok(())
    } else {
        Err(Error::Digest {
            what: what.into(),
            expected: expected.into(),
            found,
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Image(format!("{what}: {e}")))
}

/// Finds the platform manifest named by `opts.tag` in the layout; returns its descriptor.
fn resolve(layout: &Path, opts: &IndexOptions) -> Result<oci::Descriptor> {
    let index_path = layout.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(|source| Error::Io {
        context: "reading",
        path: index_path,
        source,
    })?;
    let index: oci::Index = parse("index.json", &bytes)?;
    let top = match &opts.tag {
        Some(tag) => index
            .manifests
            .iter()
            .find(|d| d.annotations.get("org.opencontainers.image.ref.name") == Some(tag))
            .ok_or_else(|| {
                Error::Image(format!("tag {tag:?} not found in {}", layout.display()))
            })?,
        None => match index.manifests.as_slice() {
            [one] => one,
            _ => {
                return Err(Error::Image(
                    "the layout holds several images: name one by tag".into(),
                ));
            }
        },
    };
    if !oci::INDEX_TYPES.contains(&top.media_type.as_str()) {
        return Ok(top.clone());
    }
    let want = opts.platform.clone().unwrap_or_else(Platform::host);
    let nested: oci::Index = parse("image index", &read_doc(layout, top)?)?;
    nested
        .manifests
        .into_iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.matches(&want)))
        .ok_or_else(|| {
            Error::Image(format!(
                "no manifest for platform {}/{} in the image index",
                want.os, want.architecture
            ))
        })
}

/// A layer blob's bytes in the pieces its source delivers them, passed on without copying.
trait Chunks {
    /// The next piece; `None` at the end.
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>>;
}

/// The registry's network buffers.
impl Chunks for clip_registry::BlobReader {
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        clip_registry::BlobReader::next_chunk(self)
    }
}

/// A blob file of an OCI layout, read in 1 MiB pieces.
struct FileChunks(File);

impl Chunks for FileChunks {
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        let mut buf = Vec::with_capacity(1 << 20);
        let n = (&mut self.0).take(1 << 20).read_to_end(&mut buf)?;
        Ok((n > 0).then(|| bytes::Bytes::from(buf)))
    }
}

/// A [`BufRead`] over a blob's chunks that hands each chunk, shared rather than copied, to the
/// indexer's helper thread, which computes the blob digest and byte count
/// ([`clip_seekable::LayerIndex::input`]) beside its hashing of the output.
struct Hashing<C> {
    src: C,
    cur: bytes::Bytes,
    ended: bool,
    feed: InputFeed,
}

impl<C> Hashing<C> {
    fn new(src: C, feed: InputFeed) -> Self {
        Self {
            src,
            cur: bytes::Bytes::new(),
            ended: false,
            feed,
        }
    }
}

impl<C: Chunks> BufRead for Hashing<C> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.cur.is_empty() && !self.ended {
            if let Some(c) = self.src.next_chunk()? {
                self.feed.feed(c.clone());
                self.cur = c;
            } else {
                self.ended = true;
                self.feed.flush();
            }
        }
        Ok(&self.cur)
    }

    fn consume(&mut self, n: usize) {
        let _ = self.cur.split_to(n.min(self.cur.len()));
    }
}

impl<C: Chunks> Read for Hashing<C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

struct IndexedLayer {
    entries: Vec<LayerEntry>,
    index: LayerIndex,
    media: MediaKind,
    /// Indexed from an eStargz TOC (virtual offsets).
    toc: bool,
    /// Compressed bytes fetched to index it.
    fetched: u64,
}

fn index_layout_layer(
    layout: &Path,
    i: usize,
    d: &oci::Descriptor,
    diff_id: &str,
    span: u64,
) -> Result<IndexedLayer> {
    let path = blob_path(layout, &d.digest)?;
    let file = File::open(&path).map_err(|source| Error::Io {
        context: "opening",
        path: path.clone(),
        source,
    })?;
    index_layer(FileChunks(file), i, d, diff_id, span)
}

fn index_layer<C: Chunks>(
    src: C,
    i: usize,
    d: &oci::Descriptor,
    diff_id: &str,
    span: u64,
) -> Result<IndexedLayer> {
    let layer = u32::try_from(i).map_err(|_| Error::Image("too many layers".into()))?;
    // A registry failure surfaces through the reader as an io::Error wrapping the registry error.
    let io = |source: std::io::Error| {
        if source
            .get_ref()
            .is_some_and(<dyn std::error::Error + Send + Sync>::is::<clip_registry::Error>)
        {
            match source
                .into_inner()
                .map(<dyn std::error::Error + Send + Sync>::downcast::<clip_registry::Error>)
            {
                Some(Ok(e)) => Error::Registry(*e),
                _ => Error::Image(format!("layer {i}: reading failed")),
            }
        } else {
            Error::Io {
                context: "reading layer",
                path: PathBuf::from(&d.digest),
                source,
            }
        }
    };
    let mut thread = HashThread::start();
    let mut src = Hashing::new(src, thread.input());
    let mut magic = [0u8; 4];
    let head = {
        let buf = src.fill_buf().map_err(io)?;
        let n = buf.len().min(4);
        magic[..n].copy_from_slice(&buf[..n]);
        n
    };
    let media = if head >= 2 && magic[..2] == [0x1f, 0x8b] {
        MediaKind::Gzip
    } else if head == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        MediaKind::Zstd
    } else {
        MediaKind::Tar
    };
    let declared = if d.media_type.contains("zstd") {
        Some(MediaKind::Zstd)
    } else if d.media_type.contains("gzip") {
        Some(MediaKind::Gzip)
    } else if matches!(
        d.media_type.as_str(),
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.docker.image.rootfs.diff.tar"
    ) {
        Some(MediaKind::Tar)
    } else {
        None
    };
    if let Some(decl) = declared
        && decl != media
        && d.size > 0
    {
        return Err(Error::Image(format!(
            "layer {i} is declared {:?} ({}) but its bytes are {media:?}",
            decl, d.media_type
        )));
    }
    let large = span / 2;
    let layer_err = |source| Error::Layer {
        layer: i,
        digest: d.digest.clone(),
        source,
    };
    let (entries, index) = match media {
        MediaKind::Gzip => {
            let ix = GzipIndexer::with_hash_thread(src, span, thread).map_err(layer_err)?;
            walk_gzip(ix, i, &d.digest, span)?
        }
        MediaKind::Tar => {
            let ix = PlainIndexer::with_hash_thread(src, span, thread);
            let (entries, ix) = tarwalk::walk(ix, layer, None, large)
                .map_err(|e| seekable_cause(e, i, &d.digest))?;
            (entries, ix.finish().map_err(layer_err)?)
        }
        MediaKind::Zstd => {
            let ix = clip_seekable::ZstdIndexer::with_hash_thread(src, span, thread)
                .map_err(layer_err)?;
            let (entries, ix) = tarwalk::walk(ix, layer, None, large)
                .map_err(|e| seekable_cause(e, i, &d.digest))?;
            (entries, ix.finish().map_err(layer_err)?)
        }
    };
    // The indexer read its input to the end, so the helper thread saw every byte.
    let (blob_digest, read) = index
        .input
        .map(|d| (format!("sha256:{}", hex::encode(d.sha256)), d.len))
        .ok_or_else(|| Error::Image(format!("layer {i}: hashing failed")))?;
    if blob_digest != d.digest || read != d.size {
        return Err(Error::Digest {
            what: format!("layer {i} blob ({read} bytes)"),
            expected: d.digest.clone(),
            found: blob_digest,
        });
    }
    let found = format!("sha256:{}", hex::encode(index.diff_id));
    if found != diff_id {
        return Err(Error::Digest {
            what: format!("layer {i} uncompressed content (diff_id)"),
            expected: diff_id.into(),
            found,
        });
    }
    let fetched = index.compressed_size;
    Ok(IndexedLayer {
        entries,
        index,
        media,
        toc: false,
        fetched,
    })
}

/// A tar error that was really a decompression error is reported as such.
/// Walks a gzip layer's tar stream through its indexer, asking for a checkpoint at the start of
/// every large file (over half a span), and finishes the index.
fn walk_gzip<R: BufRead>(
    ix: GzipIndexer<R>,
    i: usize,
    digest: &str,
    span: u64,
) -> Result<(Vec<LayerEntry>, LayerIndex)> {
    let layer = u32::try_from(i).map_err(|_| Error::Image("too many layers".into()))?;
    let requests = ix.requests();
    let (entries, ix) = tarwalk::walk(ix, layer, Some(&requests), span / 2)
        .map_err(|e| seekable_cause(e, i, digest))?;
    let index = ix.finish().map_err(|source| Error::Layer {
        layer: i,
        digest: digest.into(),
        source,
    })?;
    Ok((entries, index))
}

/// Indexes one gzip layer from its compressed bytes: inflation, the tar walk, checkpoints (every
/// `span` bytes and at large files) with their span checks, and the `diff_id`. This is the
/// per-layer work of [`index_layout`] and [`index_image`], without the blob digest, the
/// comparison with the image config, the merge and the archive (the unit the micro benchmark
/// compares with plain inflate).
pub fn index_gzip_layer<R: BufRead>(blob: R, span: u64) -> Result<(Vec<LayerEntry>, LayerIndex)> {
    let ix = GzipIndexer::new(blob, span).map_err(|source| Error::Layer {
        layer: 0,
        digest: String::new(),
        source,
    })?;
    walk_gzip(ix, 0, "", span)
}

fn seekable_cause(e: Error, layer: usize, digest: &str) -> Error {
    match e {
        Error::Tar { reason, .. } if reason.contains("compressed data") => Error::Layer {
            layer,
            digest: digest.into(),
            source: clip_seekable::Error::Corrupt {
                compressed: 0,
                reason,
            },
        },
        other => other,
    }
}

/// Indexes the image in the OCI layout at `layout` into a v2 archive at `out`.
pub fn index_layout(layout: &Path, out: &Path, opts: &IndexOptions) -> Result<IndexSummary> {
    write_image(out, &layout_image(layout, opts)?)
}

/// The merged image in the OCI layout at `layout`, without writing an archive: the shared input
/// of the v2 writer and the v1 path (whose files' [`clip_format::LayerSpan`]s say where to copy
/// their bytes from). Each layer's blob is at [`layout_blob`].
pub fn layout_image(layout: &Path, opts: &IndexOptions) -> Result<ImageTree> {
    let desc = resolve(layout, opts)?;
    if oci::INDEX_TYPES.contains(&desc.media_type.as_str()) {
        return Err(Error::Image(
            "nested image indexes are not supported".into(),
        ));
    }
    let manifest: oci::Manifest = parse("manifest", &read_doc(layout, &desc)?)?;
    let config: oci::Config = parse("image config", &read_doc(layout, &manifest.config)?)?;
    let source = Source {
        registry: opts.registry.clone(),
        repository: opts.repository.clone(),
        manifest_digest: desc.digest.clone(),
        reference: opts.reference.clone(),
    };
    let span = opts.checkpoint_bytes.max(64 << 10);
    merge_all(
        &manifest,
        &config,
        source,
        span,
        opts.layer_store.as_deref(),
        None,
        |i, d| index_layout_layer(layout, i, d, &config.rootfs.diff_ids[i], span),
    )
}

/// Path of blob `digest` in an OCI layout (the digest is validated first).
pub fn layout_blob(layout: &Path, digest: &str) -> Result<PathBuf> {
    blob_path(layout, digest)
}

/// Indexes `reference` straight from its registry into a v2 archive at `out`: manifests and
/// config are fetched, every layer blob is streamed once (nothing is stored on disk), and the
/// archive records the registry, repository and platform manifest digest. `progress` is called
/// once the image is resolved and after each layer.
pub fn index_image(
    reference: &str,
    out: &Path,
    client: &clip_registry::Client,
    platform: Option<&Platform>,
    checkpoint_bytes: u64,
    progress: Option<&ProgressFn<'_>>,
) -> Result<IndexSummary> {
    let opts = IndexOptions {
        platform: platform.cloned(),
        checkpoint_bytes,
        ..IndexOptions::default()
    };
    index_image_with(reference, out, client, &opts, progress)
}

/// [`index_image`] with all options: `opts.platform`, `opts.checkpoint_bytes` and
/// `opts.layer_store` (layers whose index is stored there are not fetched; new layer indexes
/// are stored). The registry and repository recorded come from `reference`.
pub fn index_image_with(
    reference: &str,
    out: &Path,
    client: &clip_registry::Client,
    opts: &IndexOptions,
    progress: Option<&ProgressFn<'_>>,
) -> Result<IndexSummary> {
    let r = clip_registry::Reference::parse(reference)?;
    let runtime = clip_registry::blocking_runtime().map_err(|source| Error::Io {
        context: "starting the network runtime",
        path: PathBuf::new(),
        source,
    })?;
    let image = runtime.block_on(client.resolve(&r, opts.platform.as_ref()))?;
    let source = Source {
        registry: r.registry.clone(),
        repository: r.repository.clone(),
        manifest_digest: image.manifest_digest.clone(),
        reference: r.to_string(),
    };
    let span = opts.checkpoint_bytes.max(64 << 10);
    let handle = runtime.handle().clone();
    let pinned = image.reference.clone();
    let diff_ids = image.config.rootfs.diff_ids.clone();
    if let Some(p) = progress {
        p(&Progress::Resolved {
            manifest_digest: image.manifest_digest.clone(),
            layers: image.manifest.layers.len(),
            bytes: image.manifest.layers.iter().map(|l| l.size).sum(),
        });
    }
    let built = merge_all(
        &image.manifest,
        &image.config,
        source,
        span,
        opts.layer_store.as_deref(),
        progress,
        |i, d| {
            if let Some(kind) = toc::layer_toc(d) {
                let fetch = |r: std::ops::Range<u64>| -> Result<Vec<u8>> {
                    Ok(handle
                        .block_on(client.read_range(&pinned, &d.digest, r))?
                        .to_vec())
                };
                let layer = u32::try_from(i).map_err(|_| Error::Image("too many layers".into()))?;
                let (attempt, media) = match kind {
                    toc::TocKind::EStargz => (
                        toc::index_from_toc(
                            &fetch,
                            layer,
                            d,
                            toc::toc_digest(d).unwrap_or_default(),
                            &diff_ids[i],
                            span,
                        ),
                        MediaKind::Gzip,
                    ),
                    toc::TocKind::ZstdChunked => (
                        toc::index_from_zstd_chunked(&fetch, layer, d, &diff_ids[i], span),
                        MediaKind::Zstd,
                    ),
                };
                match attempt {
                    Ok(t) => {
                        return Ok(IndexedLayer {
                            entries: t.entries,
                            index: t.index,
                            media,
                            toc: true,
                            fetched: t.fetched,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(layer = i, digest = %d.digest, error = %e, "table of contents not usable; streaming the layer");
                    }
                }
            }
            let reader = client.blob_reader(&handle, &pinned, &d.digest);
            index_layer(reader, i, d, &diff_ids[i], span)
        },
    )?;
    write_image(out, &built)
}

/// A merged image: the tree (files carry their layer spans), the layer table, the checkpoints
/// and the metadata of the archive to write.
#[derive(Debug)]
pub struct ImageTree {
    /// The merged file tree.
    pub tree: clip_format::Tree,
    /// One entry per layer, bottom first.
    pub layers: Vec<LayerInfo>,
    /// Checkpoints per layer.
    pub checkpoints: Vec<Vec<clip_format::Checkpoint>>,
    /// Image config and registry source.
    pub meta: Meta,
    /// Blob bytes read.
    pub compressed_bytes: u64,
    /// Uncompressed bytes walked.
    pub uncompressed_bytes: u64,
    /// Layers whose stored index was reused.
    pub reused_layers: usize,
    /// Layers indexed from an eStargz table of contents.
    pub toc_layers: usize,
}

/// Writes a merged image as a v2 archive.
fn write_image(out: &Path, image: &ImageTree) -> Result<IndexSummary> {
    let summary = write_v2(
        out,
        &image.tree,
        &image.meta,
        &image.layers,
        &image.checkpoints,
    )?;
    Ok(IndexSummary {
        manifest_digest: image
            .meta
            .source
            .as_ref()
            .map(|s| s.manifest_digest.clone())
            .unwrap_or_default(),
        layers: image.layers.len(),
        entries: summary.entries,
        checkpoints: image.checkpoints.iter().map(Vec::len).sum(),
        archive_bytes: summary.bytes,
        index_bytes: summary.index_bytes,
        compressed_bytes: image.compressed_bytes,
        uncompressed_bytes: image.uncompressed_bytes,
        reused_layers: image.reused_layers,
        toc_layers: image.toc_layers,
    })
}

/// One layer's outcome: its index and whether a stored one was reused.
type LayerSlot = std::sync::Mutex<Option<Result<(IndexedLayer, bool)>>>;

/// Indexes every layer (in parallel, one thread per core, largest first) and merges them in
/// order.
fn merge_all(
    manifest: &oci::Manifest,
    config: &oci::Config,
    source: Source,
    span: u64,
    store: Option<&dyn LayerIndexStore>,
    progress: Option<&ProgressFn<'_>>,
    layer: impl Fn(usize, &oci::Descriptor) -> Result<IndexedLayer> + Sync,
) -> Result<ImageTree> {
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(Error::Image(format!(
            "the manifest lists {} layers but the config {} diff_ids",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let workers = std::thread::available_parallelism()
        .map_or(2, std::num::NonZero::get)
        .min(manifest.layers.len().max(1));
    // Largest blobs first: the longest single-threaded job starts at once, and the small ones
    // fill the cores at the end instead of a large one running alone.
    let mut order: Vec<usize> = (0..manifest.layers.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(manifest.layers[i].size));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<LayerSlot> = manifest
        .layers
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((i, d)) = order.get(n).map(|&i| (i, &manifest.layers[i])) else {
                        break;
                    };
                    let r = reusing(store, i, d, &config.rootfs.diff_ids[i], span, || {
                        layer(i, d)
                    });
                    if let (Some(p), Ok((done, reused))) = (progress, &r) {
                        p(&if *reused {
                            Progress::LayerReused {
                                layer: i,
                                digest: d.digest.clone(),
                                entries: done.entries.len(),
                            }
                        } else {
                            Progress::LayerDone {
                                layer: i,
                                digest: d.digest.clone(),
                                compressed: done.fetched,
                                entries: done.entries.len(),
                            }
                        });
                    }
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    let mut merger = Merger::new();
    let mut layers = Vec::new();
    let mut checkpoints = Vec::new();
    let (mut compressed_bytes, mut uncompressed_bytes, mut reused_layers) = (0, 0, 0);
    let mut toc_layers = 0;
    for (i, slot) in results.into_iter().enumerate() {
        let done = slot
            .into_inner()
            .ok()
            .flatten()
            .ok_or_else(|| Error::Image(format!("layer {i} was not indexed")))?;
        let (done, reused) = done?;
        merger.apply(&done.entries)?;
        if reused {
            reused_layers += 1;
        } else {
            compressed_bytes += done.fetched;
            if !done.toc {
                uncompressed_bytes += done.index.uncompressed_size;
            }
        }
        toc_layers += usize::from(done.toc);
        layers.push(LayerInfo {
            digest: manifest.layers[i].digest.clone(),
            diff_id: config.rootfs.diff_ids[i].clone(),
            media: done.media,
            single_frame: !done.toc && done.media == MediaKind::Zstd && done.index.members <= 1,
            toc_indexed: done.toc,
            compressed_size: done.index.compressed_size,
            uncompressed_size: done.index.uncompressed_size,
            span_size: span,
        });
        checkpoints.push(done.index.checkpoints);
    }
    let meta = Meta {
        image: config.to_image_config(),
        source: Some(source),
        remote: None,
        created_by: format!("clip-indexer {}", env!("CARGO_PKG_VERSION")),
    };
    Ok(ImageTree {
        tree: merger.into_tree(),
        layers,
        checkpoints,
        meta,
        compressed_bytes,
        uncompressed_bytes,
        reused_layers,
        toc_layers,
    })
}

/// Layer `i`'s index from `store` when it holds a matching one, else `index()` (whose result is
/// then stored, create-only). The flag says whether the stored index was used.
fn reusing(
    store: Option<&dyn LayerIndexStore>,
    i: usize,
    d: &oci::Descriptor,
    diff_id: &str,
    span: u64,
    index: impl FnOnce() -> Result<IndexedLayer>,
) -> Result<(IndexedLayer, bool)> {
    let Some(store) = store else {
        return index().map(|l| (l, false));
    };
    let layer = u32::try_from(i).map_err(|_| Error::Image("too many layers".into()))?;
    let key = layer_key(&d.digest, span);
    if let Some(bytes) = store.get(&key) {
        match reuse::decode(&bytes, layer) {
            Ok(s)
                if s.digest == d.digest
                    && s.index.span == span
                    && s.index.compressed_size == d.size
                    && format!("sha256:{}", hex::encode(s.index.diff_id)) == diff_id =>
            {
                return Ok((
                    IndexedLayer {
                        entries: s.entries,
                        index: s.index,
                        media: s.media,
                        toc: s.toc_indexed,
                        fetched: 0,
                    },
                    true,
                ));
            }
            Ok(_) => {
                tracing::warn!(key, store = %store.describe(), layer = i, "stored layer index does not match the layer; indexing it again");
                store.discard(&key);
            }
            Err(e) => {
                tracing::warn!(key, store = %store.describe(), error = %e, "stored layer index rejected; indexing the layer again");
                store.discard(&key);
            }
        }
    }
    let done = index()?;
    // The encoding records file offsets, not layer numbers: no renumbering needed here.
    let bytes = reuse::encode_parts(&d.digest, done.media, done.toc, &done.entries, &done.index);
    match store.put(&key, &bytes) {
        Ok(created) => {
            tracing::debug!(key, created, store = %store.describe(), "layer index stored");
            // Indexes in an older encoding are never read again by this version. Stores that
            // others share (S3) keep them for workers not yet upgraded (`discard`'s default).
            if created {
                for old in reuse::superseded_keys(&d.digest, span) {
                    store.discard(&old);
                }
            }
        }
        Err(e) => {
            tracing::warn!(key, store = %store.describe(), error = %e, "could not store a layer index");
        }
    }
    Ok((done, false))
}
