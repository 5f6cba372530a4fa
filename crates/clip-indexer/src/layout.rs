//! Input from an OCI image layout directory (what `buildah push oci:DIR` or `skopeo copy` writes):
//! `index.json`, the tag's manifest (or the platform's manifest of a nested index), the config,
//! and the layer blobs under `blobs/ALG/HEX`. Every document is size-limited and checked against
//! its digest before it is parsed.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use clip_format::{Digest, Source};

use crate::image::{ImageTree, LayerDesc, merge_all};
use crate::layer::{FileChunks, IndexedLayer, index_layer};
use crate::{Error, IndexOptions, Result, oci};

const MAX_DOC: u64 = 4 << 20;

/// Reads a small JSON document blob, checking its size and digest.
fn read_doc(layout: &Path, d: &oci::Descriptor) -> Result<Vec<u8>> {
    let digest = oci::digest(d)?;
    if d.size() > MAX_DOC {
        return Err(Error::Image(format!(
            "document {digest} is {} bytes (limit {MAX_DOC})",
            d.size()
        )));
    }
    let path = layout.join(digest.blob_path());
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_DOC + 1).read_to_end(&mut bytes))
        .map_err(|source| Error::Io {
            context: "reading",
            path: path.clone(),
            source,
        })?;
    digest.verify(format!("document {}", path.display()), &bytes)?;
    Ok(bytes)
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
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
            .manifests()
            .iter()
            .find(|d| oci::annotation(d, "org.opencontainers.image.ref.name") == Some(tag.as_str()))
            .ok_or_else(|| {
                Error::Image(format!("tag {tag:?} not found in {}", layout.display()))
            })?,
        None => match index.manifests().as_slice() {
            [one] => one,
            _ => {
                return Err(Error::Image(
                    "the layout holds several images: name one by tag".into(),
                ));
            }
        },
    };
    if !oci::is_index(top.media_type()) {
        return Ok(top.clone());
    }
    let want = opts.platform.clone().unwrap_or_else(oci::host_platform);
    let nested: oci::Index = parse("image index", &read_doc(layout, top)?)?;
    oci::select_platform(&nested, &want)
        .cloned()
        .ok_or_else(|| {
            Error::Image(format!(
                "no manifest for platform {} in the image index",
                oci::platform_name(&want)
            ))
        })
}

/// The merged image in the OCI layout at `layout`, without writing an archive: the shared input
/// of the v2 writer and the v1 path (whose files' [`clip_format::LayerSpan`]s say where to copy
/// their bytes from). Each layer's blob is at [`layout_blob`].
pub fn layout_image(layout: &Path, opts: &IndexOptions) -> Result<ImageTree> {
    let desc = resolve(layout, opts)?;
    if oci::is_index(desc.media_type()) {
        return Err(Error::Image(
            "nested image indexes are not supported".into(),
        ));
    }
    let manifest: oci::Manifest = parse("manifest", &read_doc(layout, &desc)?)?;
    let config: oci::ImageConfiguration =
        parse("image config", &read_doc(layout, manifest.config())?)?;
    let source = Source {
        registry: opts.registry.clone(),
        repository: opts.repository.clone(),
        manifest_digest: oci::digest(&desc)?,
        reference: opts.reference.clone(),
    };
    let span = opts.checkpoint_bytes.max(64 << 10);
    merge_all(
        &manifest,
        &config,
        source,
        &crate::image::MergeOptions {
            span,
            store: opts.layer_store.as_deref(),
            progress: None,
            limit: opts.layers,
            verified: opts.verify_diff_ids,
        },
        |d| index_layout_layer(layout, d, span, opts.bytes_read.as_deref()),
    )
}

/// Path of blob `digest` in an OCI layout.
#[must_use]
pub fn layout_blob(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join(digest.blob_path())
}

fn index_layout_layer(
    layout: &Path,
    d: &LayerDesc,
    span: u64,
    progress: Option<&std::sync::atomic::AtomicU64>,
) -> Result<IndexedLayer> {
    let path = layout_blob(layout, &d.digest);
    let file = File::open(&path).map_err(|source| Error::Io {
        context: "opening",
        path: path.clone(),
        source,
    })?;
    index_layer(FileChunks(file), d, span, progress)
}
