//! zstd:chunked: the manifest a layer's annotations locate, read with one range request.

use std::ops::Range;

use clip_format::merge::LayerEntry;
use clip_format::{Checkpoint, CheckpointKind, Digest};
use clip_seekable::LayerIndex;

use super::{MAX_TOC, Toc, TocKind, TocLayer, entry_of, toc_entries, zstd_annotations};
use crate::{Error, LayerDesc};

/// zstd:chunked: each regular file's data is one span (its frames, decoded from the first one),
/// verified against the file's digest; chunk entries only subdivide it and are not needed.
pub(super) fn zstd_entries(
    json: &[u8],
    layer: u32,
    limit: u64,
    digest: &str,
) -> Result<(Vec<LayerEntry>, Vec<Checkpoint>, u64), Error> {
    let bad = |what: &str| Error::Image(format!("zstd:chunked layer {digest}: {what}"));
    let toc: Toc = serde_json::from_slice(json).map_err(|e| bad(&format!("manifest: {e}")))?;
    let mut entries = Vec::with_capacity(toc.entries.len());
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut virt = 0u64;
    // The compressed data range of the regular file being described.
    let mut data = 0..0;
    for e in &toc.entries {
        if e.kind == "chunk" {
            // A `zeros` chunk (a run of zeros, which a consumer may leave as a hole) is still
            // stored in the stream — the blob must decompress to the layer's tar — so it is read
            // like any other; one that lies outside its file's data is not expressible here.
            if e.chunk_type == "zeros" && !data.contains(&e.offset) {
                return Err(Error::Unsupported(format!(
                    "zstd:chunked zeros chunk of {} outside the file's data",
                    e.name
                )));
            }
            continue;
        }
        data = if e.kind == "reg" {
            e.offset..e.end_offset
        } else {
            0..0
        };
        entries.push(entry_of(e, layer, virt, &bad)?);
        if e.kind == "reg" && e.size > 0 {
            let sum = clip_format::sha256_bytes(&e.digest)
                .ok_or_else(|| Error::Unsupported(format!("no digest for {}", e.name)))?;
            if e.end_offset <= e.offset
                || e.end_offset > limit
                || checkpoints
                    .last()
                    .is_some_and(|c| c.compressed_offset >= e.offset)
            {
                return Err(bad(&format!("data range of {} out of order", e.name)));
            }
            checkpoints.push(Checkpoint {
                kind: CheckpointKind::ZstdFrame,
                compressed_offset: e.offset,
                uncompressed_offset: virt,
                bits: 0,
                window: Vec::new(),
                span_digest: sum,
                chain_head: None,
            });
            virt = virt
                .checked_add(e.size)
                .ok_or_else(|| bad("sizes overflow"))?;
        }
    }
    Ok((entries, checkpoints, virt))
}

/// Indexes zstd:chunked layer `layer` (descriptor `d`) from its manifest; `fetch` returns exact
/// byte ranges of the blob. Errors mean "stream this layer instead".
pub(crate) fn index_from_zstd_chunked(
    fetch: &dyn Fn(Range<u64>) -> Result<Vec<u8>, Error>,
    layer: u32,
    d: &LayerDesc,
    span: u64,
) -> Result<TocLayer, Error> {
    let bad = |what: &str| Error::Image(format!("zstd:chunked layer {}: {what}", d.digest));
    let (position, checksum) = zstd_annotations(d);
    let position = position.ok_or_else(|| bad("no manifest position"))?;
    let checksum = checksum.ok_or_else(|| bad("no manifest checksum"))?;
    let fields: Vec<u64> = position
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| bad(&format!("bad manifest position {position:?}")))?;
    let [offset, length, plain_len, kind] = fields[..] else {
        return Err(bad(&format!("bad manifest position {position:?}")));
    };
    if kind != 1 {
        return Err(Error::Unsupported(format!(
            "zstd:chunked manifest type {kind}"
        )));
    }
    if length == 0
        || length > MAX_TOC
        || plain_len > MAX_TOC
        || offset.checked_add(length).is_none_or(|end| end > d.size)
    {
        return Err(bad("manifest position out of range"));
    }
    let compressed = fetch(offset..offset + length)?;
    Digest::parse(checksum)
        .map_err(|e| bad(&format!("manifest checksum annotation: {e}")))?
        .verify(
            format!("zstd:chunked manifest of layer {}", d.digest),
            &compressed,
        )?;
    let cap = usize::try_from(plain_len).map_err(|_| bad("manifest too large"))?;
    let json =
        zstd::bulk::decompress(&compressed, cap).map_err(|e| bad(&format!("manifest: {e}")))?;
    let (entries, checkpoints, virt) = toc_entries(
        &json,
        layer,
        offset,
        d.digest.as_str(),
        TocKind::ZstdChunked,
    )?;
    let members = u32::try_from(checkpoints.len()).unwrap_or(u32::MAX);
    Ok(TocLayer {
        entries,
        index: LayerIndex {
            checkpoints,
            compressed_size: d.size,
            uncompressed_size: virt,
            diff_id: d
                .diff_id
                .sha256_bytes()
                .ok_or_else(|| bad("the diff_id is not a sha256"))?,
            members,
            span,
            input: None,
        },
        fetched: length,
    })
}
