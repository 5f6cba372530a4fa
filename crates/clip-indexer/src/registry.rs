//! Input from a registry: the image is resolved (platform manifest and config), and every layer
//! blob is streamed once — nothing is stored on disk — unless its stored index is reused or it
//! can be indexed from its table of contents with a few range requests.

use std::path::Path;

use clip_format::{MediaKind, Source};
use clip_registry::BlockingClient;

use crate::image::{ImageTree, merge_all};
use crate::layer::{IndexedLayer, index_layer};
use crate::{Error, IndexOptions, LayerMethod, Progress, ProgressFn, Result, toc};

/// The merged image `reference` names, indexed straight from its registry.
// Over 100 lines on purpose: resolves an image and prepares every layer's input (TOC, stored
// index or stream) in one place, so the per-layer decision and its log line sit together.
pub(crate) fn registry_image(
    reference: &str,
    net: &BlockingClient,
    opts: &IndexOptions,
    progress: Option<&ProgressFn<'_>>,
) -> Result<ImageTree> {
    let r = clip_registry::Reference::parse(reference)?;
    let client = net.client();
    let image = net.block_on(client.resolve(&r, opts.platform.as_ref()))?;
    let source = Source {
        registry: r.registry.clone(),
        repository: r.repository.clone(),
        manifest_digest: image.manifest_digest.clone(),
        reference: r.to_string(),
    };
    let span = opts.checkpoint_bytes.max(64 << 10);
    let handle = net.handle();
    let pinned = image.reference.clone();
    if let Some(p) = progress {
        p(&Progress::Resolved {
            manifest_digest: image.manifest_digest.clone(),
            layers: image.manifest.layers().len(),
            bytes: image
                .manifest
                .layers()
                .iter()
                .map(crate::oci::Descriptor::size)
                .sum(),
        });
    }
    merge_all(
        &image.manifest,
        &image.config,
        source,
        &crate::image::MergeOptions {
            span,
            store: opts.layer_store.as_deref(),
            progress,
            limit: opts.layers,
            verified: opts.verify_diff_ids,
        },
        |d| {
            let announced = if opts.verify_diff_ids {
                toc::Announced::Nothing
            } else {
                toc::announced(d)
            };
            let why_streamed = match announced {
                toc::Announced::Nothing => None,
                toc::Announced::Unusable(why) => Some(why),
                toc::Announced::Toc(kind) => {
                    let fetch = |r: std::ops::Range<u64>| -> Result<Vec<u8>> {
                        Ok(handle
                            .block_on(client.read_range(&pinned, &d.digest, r))?
                            .to_vec())
                    };
                    let layer = u32::try_from(d.index)
                        .map_err(|_| Error::Image("too many layers".into()))?;
                    let (attempt, media, method) = match kind {
                        toc::TocKind::EStargz => (
                            toc::index_from_toc(
                                &fetch,
                                layer,
                                d,
                                toc::toc_digest(d).unwrap_or_default(),
                                span,
                            ),
                            MediaKind::Gzip,
                            LayerMethod::EstargzToc,
                        ),
                        toc::TocKind::ZstdChunked => (
                            toc::index_from_zstd_chunked(&fetch, layer, d, span),
                            MediaKind::Zstd,
                            LayerMethod::ZstdChunkedToc,
                        ),
                    };
                    match attempt.and_then(|t| toc::bounded_spans(t, toc::MAX_TOC_SPAN)) {
                        Ok(t) => {
                            return Ok(IndexedLayer {
                                entries: t.entries,
                                index: t.index,
                                media,
                                toc: true,
                                fetched: t.fetched,
                                method,
                                why_streamed: None,
                            });
                        }
                        Err(e) => Some(e.to_string()),
                    }
                }
            };
            if !d.urls.is_empty() {
                // A non-distributable layer: only what the registry holds is read.
                match handle.block_on(client.read_range(&pinned, &d.digest, 0..1)) {
                    Err(clip_registry::Error::NotFound { .. }) => {
                        return Err(clip_registry::Error::ForeignLayer {
                            digest: d.digest.clone(),
                            host: pinned.registry.clone(),
                            urls: d.urls.clone(),
                        }
                        .into());
                    }
                    Err(e) => return Err(e.into()),
                    Ok(_) => {}
                }
            }
            let reader = client.blob_reader_sized(handle, &pinned, &d.digest, d.size);
            match index_layer(reader, d, span, opts.bytes_read.as_deref()) {
                Ok(mut done) => {
                    done.why_streamed = why_streamed;
                    Ok(done)
                }
                Err(e) => Err(match why_streamed {
                    Some(why) => Error::TocAndStream {
                        layer: d.index,
                        why,
                        source: Box::new(e),
                    },
                    None => e,
                }),
            }
        },
    )
}

/// Where the image to index comes from.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// An image in a registry, reached through `client` (whose token cache and connections the
    /// caller shares with its other work).
    Registry {
        /// The reference, e.g. `registry.example.com/team/app:v1`.
        reference: &'a str,
        /// The client.
        client: &'a BlockingClient,
    },
    /// An OCI image layout directory; `IndexOptions::tag`, `registry`, `repository` and
    /// `reference` say which image and where it will be read from later.
    Layout {
        /// The layout directory.
        dir: &'a Path,
    },
}

/// Indexes an image into a v2 archive at `out` (published atomically): the one entry point for
/// every source. `progress` is called once the image is resolved and after each layer.
pub fn index(
    input: Input<'_>,
    out: &Path,
    opts: &IndexOptions,
    progress: Option<&ProgressFn<'_>>,
) -> Result<crate::IndexSummary> {
    let image = match input {
        Input::Registry { reference, client } => registry_image(reference, client, opts, progress)?,
        Input::Layout { dir } => crate::layout_image(dir, opts)?,
    };
    crate::image::write_image(out, &image)
}
