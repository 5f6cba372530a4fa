//! A zstd:chunked writer for test images, following the layout containers/storage writes: each
//! regular file's data in a zstd frame of its own (tar headers and padding in frames between),
//! the zstd-compressed TOC ("manifest") in a skippable frame at the end, a 72-byte footer
//! skippable frame, and the `io.github.containers.zstd-chunked.manifest-position` / `-checksum`
//! annotations on the layer descriptor. No tar-split data is written (its position fields are 0).
//!
//! To every zstd decoder the blob is an ordinary `.tar.zst`: skippable frames are ignored.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Annotation locating the manifest: `offset:length:uncompressed length:type`.
pub const POSITION_ANNOTATION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// Annotation naming the sha256 of the compressed manifest.
pub const CHECKSUM_ANNOTATION: &str = "io.github.containers.zstd-chunked.manifest-checksum";
const SKIPPABLE: u32 = 0x184D_2A50;

/// A zstd:chunked blob.
#[derive(Debug, Clone)]
pub struct ZstdChunked {
    /// The zstd blob.
    pub blob: Vec<u8>,
    /// Its uncompressed tar stream (what the `diff_id` names).
    pub tar: Vec<u8>,
    /// Descriptor annotations.
    pub annotations: Vec<(String, String)>,
}

fn frame(out: &mut Vec<u8>, tar: &mut Vec<u8>, bytes: &mut Vec<u8>) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    out.extend(
        zstd::bulk::compress(bytes, 3).map_err(|e| Error::InvalidImage(format!("zstd: {e}")))?,
    );
    tar.append(bytes);
    Ok(())
}

fn skippable(out: &mut Vec<u8>, content: &[u8]) {
    out.extend_from_slice(&SKIPPABLE.to_le_bytes());
    out.extend_from_slice(&u32::try_from(content.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(content);
}

/// Converts a tar stream into a zstd:chunked blob.
pub fn build(input: &[u8]) -> Result<ZstdChunked> {
    let bad = |e: std::io::Error| Error::InvalidImage(format!("zstd:chunked input tar: {e}"));
    let (mut blob, mut tar, mut cur) = (Vec::new(), Vec::new(), Vec::new());
    let mut toc = Vec::new();
    let mut archive = tar::Archive::new(input);
    let mut prev_end = 0usize;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let data_at = usize::try_from(entry.raw_file_position()).unwrap_or(usize::MAX);
        let size = usize::try_from(entry.size()).unwrap_or(usize::MAX);
        let (mut e, name) = crate::estargz::toc_entry(&mut entry).map_err(bad)?;
        let end = data_at + size;
        let data = input
            .get(data_at..end)
            .ok_or_else(|| Error::InvalidImage("zstd:chunked input tar is short".into()))?;
        cur.extend_from_slice(&input[prev_end..data_at]);
        let kind = e["type"].as_str().unwrap_or("").to_owned();
        if kind == "dir" {
            e["name"] = format!("{name}/").into();
        }
        if kind == "reg" && size > 0 {
            frame(&mut blob, &mut tar, &mut cur)?;
            let offset = blob.len();
            frame(&mut blob, &mut tar, &mut data.to_vec())?;
            e["digest"] = format!("sha256:{}", hex::encode(Sha256::digest(data))).into();
            e["offset"] = offset.into();
            e["endOffset"] = blob.len().into();
        } else {
            cur.extend_from_slice(data);
        }
        if !kind.is_empty() {
            toc.push(e);
        }
        let padded = end.div_ceil(512) * 512;
        cur.resize(cur.len() + (padded - end), 0);
        prev_end = padded;
    }
    // The end-of-archive blocks, as the input has them.
    cur.extend_from_slice(input.get(prev_end..).unwrap_or_default());
    frame(&mut blob, &mut tar, &mut cur)?;
    let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": toc}))
        .map_err(|e| Error::InvalidImage(e.to_string()))?;
    let manifest =
        zstd::bulk::compress(&json, 3).map_err(|e| Error::InvalidImage(format!("zstd: {e}")))?;
    let offset = blob.len() + 8;
    skippable(&mut blob, &manifest);
    let mut footer = Vec::with_capacity(64);
    for v in [offset, manifest.len(), json.len(), 1, 0, 0, 0] {
        footer.extend_from_slice(&(v as u64).to_le_bytes());
    }
    footer.extend_from_slice(b"GNUlInUx");
    skippable(&mut blob, &footer);
    let annotations = vec![
        (
            POSITION_ANNOTATION.to_owned(),
            format!("{offset}:{}:{}:1", manifest.len(), json.len()),
        ),
        (
            CHECKSUM_ANNOTATION.to_owned(),
            format!("sha256:{}", hex::encode(Sha256::digest(&manifest))),
        ),
    ];
    Ok(ZstdChunked {
        blob,
        tar,
        annotations,
    })
}
