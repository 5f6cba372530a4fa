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
//! One entry point, [`index`], takes either input: an image reference, indexed straight from its
//! registry ([`Input::Registry`]: layer blobs are streamed once through `clip-registry`, nothing
//! is stored), or an OCI image layout directory (what `buildah push oci:DIR` or `skopeo copy`
//! writes) plus the registry location to record ([`Input::Layout`]). [`layout_image`] gives the
//! merged tree without writing an archive (the v1 path's input). Layers may be gzip (one or many members), zstd (frames are the seek
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
//! use clip_indexer::{IndexOptions, Input, index};
//! let opts = IndexOptions {
//!     tag: Some("latest".into()),
//!     registry: "127.0.0.1:5000".into(),
//!     repository: "library/app".into(),
//!     ..IndexOptions::default()
//! };
//! let summary = index(Input::Layout { dir: "/tmp/layout".as_ref() }, "/tmp/app.clip".as_ref(), &opts, None)?;
//! println!("{} entries, {} layers", summary.entries, summary.layers);
//! # Ok::<(), clip_indexer::Error>(())
//! ```

pub mod attached;
mod image;
mod layer;
mod layout;
mod registry;
mod reuse;
mod tarwalk;
pub mod toc;

pub use attached::{AttachSummary, Attached, attach};
pub use image::{ImageTree, LayerDesc};
pub use layer::index_gzip_layer;
pub use layout::{layout_blob, layout_image};
pub use registry::{Input, index};

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

use std::io::Read;
use std::path::PathBuf;

use clip_format::Digest;

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
    #[error("layer {layer}{}: {source}", digest.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Layer {
        /// Layer index.
        layer: usize,
        /// Blob digest (when known).
        digest: Option<Digest>,
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
    #[error(transparent)]
    Digest(#[from] clip_format::DigestMismatch),
    /// The image layout or its documents are invalid.
    #[error("invalid image: {0}")]
    Image(String),
    /// A layer's table of contents could not be used, and streaming the layer failed too.
    #[error(
        "layer {layer}: its table of contents is not usable ({why}), and streaming it failed: {source}"
    )]
    TocAndStream {
        /// Layer index.
        layer: usize,
        /// Why the table of contents was not used.
        why: String,
        /// Why streaming failed.
        source: Box<Error>,
    },
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
    /// Counts the compressed bytes read as layers stream in (for a progress display).
    pub bytes_read: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Index only the first N layers: the tree of a prefix of the image (what a containerd
    /// snapshot chain names when images share their lower layers). `None`: every layer.
    pub layers: Option<usize>,
    /// Check every layer's `diff_id`: layers that carry a table of contents are streamed like
    /// any other instead of being indexed from it, and stored indexes made from a TOC are not
    /// reused. What a containerd snapshot committed under a chain id needs (the chain id
    /// promises the uncompressed content); off by default (a TOC's per-chunk digests verify
    /// every byte read, but not that the layer is the one its `diff_id` names).
    pub verify_diff_ids: bool,
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
            bytes_read: None,
            layers: None,
            verify_diff_ids: false,
        }
    }
}

/// Progress of an indexing run, reported per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The image was resolved: its platform manifest and layer count.
    Resolved {
        /// Platform manifest digest.
        manifest_digest: Digest,
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
        digest: Digest,
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
        digest: Digest,
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
    pub manifest_digest: Digest,
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
    /// Layers indexed from their table of contents (eStargz or zstd:chunked; a few range
    /// requests each).
    pub toc_layers: usize,
    /// How each layer was indexed, bottom first.
    pub per_layer: Vec<LayerReport>,
}

/// How a layer was indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerMethod {
    /// The whole blob was read and its tar walked.
    Streamed,
    /// From its eStargz table of contents (footer and TOC member).
    EstargzToc,
    /// From its zstd:chunked manifest.
    ZstdChunkedToc,
    /// A stored index of the same layer was used; nothing was fetched.
    Reused,
}

/// One layer's line of an [`IndexSummary`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerReport {
    /// Position in the manifest, bottom first.
    pub layer: usize,
    /// Blob digest.
    pub digest: Digest,
    /// How it was indexed.
    pub method: LayerMethod,
    /// For a streamed layer that announces (or seems to announce) a table of contents: why it
    /// was not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_streamed: Option<String>,
    /// Compressed bytes fetched for it.
    pub fetched_bytes: u64,
}
