//! Image → v1 archive: the merged tree from the indexer (the one implementation of the OCI
//! merge), then one sequential pass per layer copying the surviving files' bytes into the archive.

use std::path::Path;

use std::sync::Arc;

use clip_format::{ArchiveKind, Digest, Meta, NodeKind, SparseMap, SparseReader, V1Writer};
use clip_indexer::{IndexOptions, layout_blob, layout_image};
use clip_seekable::stream::{CopyJob, copy_out, decoder};

use crate::{Error, Result};

/// A file to copy: its tree node and, if it is sparse, its extent map.
type Target = (usize, Option<Arc<SparseMap>>);

/// What an image → v1 run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArchiveSummary {
    /// The platform manifest's digest.
    pub manifest_digest: Option<Digest>,
    /// Layers read.
    pub layers: usize,
    /// Entries in the archive.
    pub entries: usize,
    /// Archive size.
    pub bytes: u64,
    /// File bytes stored.
    pub data_bytes: u64,
    /// Always [`ArchiveKind::V1Local`].
    pub kind: ArchiveKind,
}

/// Archives the image `tag` (or the only image) of the OCI layout `layout` as a v1 archive at
/// `out`. Memory stays bounded: layers are streamed from their blobs twice (once to build the
/// merged tree, once to copy the bytes of the files that survive the merge), and only the tree is
/// held. Every copied byte is covered by the layer's verified `diff_id`.
pub fn archive_layout(
    layout: &Path,
    tag: Option<&str>,
    platform: Option<clip_indexer::Platform>,
    out: &Path,
) -> Result<ImageArchiveSummary> {
    let image = layout_image(
        layout,
        &IndexOptions {
            tag: tag.map(str::to_owned),
            platform,
            // Checkpoints are not kept: the widest spacing keeps the first pass cheap.
            checkpoint_bytes: 1 << 40,
            ..IndexOptions::default()
        },
    )?;
    let manifest_digest = image
        .meta
        .source
        .as_ref()
        .map(|s| s.manifest_digest.clone());
    let mut per_layer: Vec<Vec<CopyJob<Target>>> = vec![Vec::new(); image.layers.len()];
    for id in image.tree.breadth_first() {
        if let Some(NodeKind::File {
            size,
            span: Some(span),
        }) = image.tree.node(id).map(|n| &n.kind)
            && *size > 0
        {
            per_layer
                .get_mut(span.layer as usize)
                .ok_or_else(|| {
                    Error::Unsupported(format!(
                        "a file names layer {}, which the image does not have",
                        span.layer
                    ))
                })?
                .push(CopyJob {
                    offset: span.offset,
                    size: span.stored_len(*size),
                    target: (id, span.sparse.clone()),
                });
        }
    }
    let mut writer = V1Writer::create(out)?;
    let mut data_bytes = 0u64;
    for (info, jobs) in image.layers.iter().zip(per_layer.iter_mut()) {
        let path = layout_blob(layout, &info.digest);
        let blob = std::fs::File::open(&path).map_err(|source| Error::Io {
            context: "opening",
            path: path.clone(),
            source,
        })?;
        let stream = decoder(info.media, std::io::BufReader::with_capacity(1 << 20, blob))?;
        copy_out::<_, Error>(
            &info.digest,
            Some(&info.diff_id),
            stream,
            jobs,
            |(id, sparse), r, _| {
                let (n, _) = match sparse {
                    // v1 data holds the logical bytes: the holes become zeros.
                    Some(map) => writer.add_file(*id, &mut SparseReader::new(map, r))?,
                    None => writer.add_file(*id, r)?,
                };
                data_bytes += n;
                Ok(())
            },
        )?;
    }
    let meta = Meta {
        image: image.meta.image.clone(),
        source: None,
        remote: None,
        created_by: format!("clip-archive {}", env!("CARGO_PKG_VERSION")),
    };
    let summary = writer.finish(&image.tree, &meta)?;
    Ok(ImageArchiveSummary {
        manifest_digest,
        layers: image.layers.len(),
        entries: summary.entries,
        bytes: summary.bytes,
        data_bytes,
        kind: summary.kind,
    })
}

/// Archives `reference` from its registry as a v1 archive at `out`: the image is copied into a
/// temporary OCI layout next to `out` (layers in parallel, each verified), archived, and the
/// layout removed. `progress` counts the layer bytes downloaded.
pub fn archive_image(
    reference: &str,
    registry: &clip_registry::BlockingClient,
    platform: Option<&clip_indexer::Platform>,
    out: &Path,
    progress: Option<&std::sync::atomic::AtomicU64>,
) -> Result<ImageArchiveSummary> {
    let r = clip_registry::Reference::parse(reference)?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".clip-pull-")
        .tempdir_in(parent)
        .map_err(|source| Error::Io {
            context: "creating a staging directory in",
            path: parent.to_owned(),
            source,
        })?;
    registry.block_on(registry.client().pull_layout(
        &r,
        platform,
        staging.path(),
        "image",
        progress,
    ))?;
    archive_layout(staging.path(), Some("image"), platform.cloned(), out)
}
