//! From layers to an image: each layer indexed (in parallel, largest first, or its stored index
//! reused), then merged in order with the OCI rules of [`clip_format::merge`] into the tree, the
//! layer table and the checkpoints of one archive.

use std::collections::BTreeMap;
use std::path::Path;

use clip_format::merge::Merger;
use clip_format::{Digest, LayerInfo, MediaKind, Meta, Source, write_v2};

use crate::layer::IndexedLayer;
use crate::{
    Error, IndexSummary, LayerIndexStore, Progress, ProgressFn, Result, layer_key, oci, reuse,
};

/// A layer as the indexer reads it: its place in the image, its descriptor's digest (validated),
/// size, media type and annotations, and the `diff_id` the image config gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    /// Position in the manifest, bottom first.
    pub index: usize,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The descriptor's media type.
    pub media_type: String,
    /// The descriptor's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Where a non-distributable ("foreign") layer says it can be downloaded; empty for others.
    pub urls: Vec<String>,
}

impl LayerDesc {
    /// The layers of `manifest` with their `diff_id`s from `config`, checked: one `diff_id` per
    /// layer, every digest one clip can verify.
    pub fn of_image(
        manifest: &oci::Manifest,
        config: &oci::ImageConfiguration,
    ) -> Result<Vec<Self>> {
        let diff_ids = oci::diff_ids(config)?;
        if diff_ids.len() != manifest.layers().len() {
            return Err(Error::Image(format!(
                "the manifest lists {} layers but the config {} diff_ids",
                manifest.layers().len(),
                diff_ids.len()
            )));
        }
        manifest
            .layers()
            .iter()
            .zip(diff_ids)
            .enumerate()
            .map(|(index, (d, diff_id))| {
                Ok(Self {
                    index,
                    digest: oci::digest(d)?,
                    size: d.size(),
                    media_type: d.media_type().to_string(),
                    annotations: d
                        .annotations()
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                    diff_id,
                    urls: d.urls().clone().unwrap_or_default(),
                })
            })
            .collect()
    }
}

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
    /// Layers indexed from a table of contents.
    pub toc_layers: usize,
    /// How each layer was indexed.
    pub per_layer: Vec<crate::LayerReport>,
}

/// Writes a merged image as a v2 archive.
pub(crate) fn write_image(out: &Path, image: &ImageTree) -> Result<IndexSummary> {
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
            .ok_or_else(|| Error::Image("a v2 archive needs the image's source".into()))?,
        layers: image.layers.len(),
        entries: summary.entries,
        checkpoints: image.checkpoints.iter().map(Vec::len).sum(),
        archive_bytes: summary.bytes,
        index_bytes: summary.index_bytes,
        compressed_bytes: image.compressed_bytes,
        uncompressed_bytes: image.uncompressed_bytes,
        reused_layers: image.reused_layers,
        toc_layers: image.toc_layers,
        per_layer: image.per_layer.clone(),
    })
}

/// One layer's outcome: its index and whether a stored one was reused.
type LayerSlot = std::sync::Mutex<Option<Result<(IndexedLayer, bool)>>>;

/// Indexes every layer (in parallel, one thread per core, largest first) and merges them in
/// order.
/// How [`merge_all`] works: span size, the layer-index store, progress, and how many layers.
pub(crate) struct MergeOptions<'a> {
    pub(crate) span: u64,
    pub(crate) store: Option<&'a dyn LayerIndexStore>,
    pub(crate) progress: Option<&'a ProgressFn<'a>>,
    pub(crate) limit: Option<usize>,
    /// Only layers whose `diff_id` was checked here: stored indexes made from a TOC are not
    /// reused (the layer is indexed by streaming it).
    pub(crate) verified: bool,
}

// Over 100 lines on purpose: the parallel layer pipeline (workers, ordered merge, reuse and
// progress accounting) shares one scope of threads and channels; its steps are small closures
// over that scope.
pub(crate) fn merge_all(
    manifest: &oci::Manifest,
    config: &oci::ImageConfiguration,
    source: Source,
    opts: &MergeOptions<'_>,
    layer: impl Fn(&LayerDesc) -> Result<IndexedLayer> + Sync,
) -> Result<ImageTree> {
    let MergeOptions {
        span,
        store,
        progress,
        limit,
        verified,
    } = *opts;
    let mut descs = LayerDesc::of_image(manifest, config)?;
    if let Some(n) = limit {
        if n == 0 || n > descs.len() {
            return Err(Error::Image(format!(
                "asked for the first {n} of {} layers",
                descs.len()
            )));
        }
        descs.truncate(n);
    }
    let workers = std::thread::available_parallelism()
        .map_or(2, std::num::NonZero::get)
        .min(descs.len().max(1));
    // Largest blobs first: the longest single-threaded job starts at once, and the small ones
    // fill the cores at the end instead of a large one running alone.
    let mut order: Vec<usize> = (0..descs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(descs[i].size));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<LayerSlot> = descs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(d) = order.get(n).map(|&i| &descs[i]) else {
                        break;
                    };
                    let i = d.index;
                    let r = reusing(store, d, span, verified, || layer(d));
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
    let mut per_layer = Vec::with_capacity(descs.len());
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
        if let Some(why) = &done.why_streamed {
            tracing::warn!(layer = i, digest = %descs[i].digest, reason = %why, "layer streamed: its table of contents is not used");
        }
        per_layer.push(crate::LayerReport {
            layer: i,
            digest: descs[i].digest.clone(),
            method: if reused {
                crate::LayerMethod::Reused
            } else {
                done.method
            },
            why_streamed: done.why_streamed.clone(),
            fetched_bytes: if reused { 0 } else { done.fetched },
        });
        layers.push(LayerInfo {
            digest: descs[i].digest.clone(),
            diff_id: descs[i].diff_id.clone(),
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
        image: oci::image_config(config),
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
        per_layer,
    })
}

/// Layer `i`'s index from `store` when it holds a matching one, else `index()` (whose result is
/// then stored, create-only). The flag says whether the stored index was used.
fn reusing(
    store: Option<&dyn LayerIndexStore>,
    d: &LayerDesc,
    span: u64,
    verified: bool,
    index: impl FnOnce() -> Result<IndexedLayer>,
) -> Result<(IndexedLayer, bool)> {
    let i = d.index;
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
                    && Digest::from_sha256(s.index.diff_id) == d.diff_id
                    && !(verified && s.toc_indexed) =>
            {
                return Ok((
                    IndexedLayer {
                        entries: s.entries,
                        index: s.index,
                        media: s.media,
                        toc: s.toc_indexed,
                        fetched: 0,
                        method: crate::LayerMethod::Reused,
                        why_streamed: None,
                    },
                    true,
                ));
            }
            Ok(s) if verified && s.toc_indexed => {
                tracing::info!(
                    key,
                    layer = i,
                    "stored layer index was made from a table of contents (diff_id unchecked); streaming the layer to check it"
                );
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
