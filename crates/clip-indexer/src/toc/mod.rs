//! Layers that carry a table of contents — eStargz and zstd:chunked — indexed with a few range
//! requests instead of streaming the layer.
//!
//! # Model
//!
//! An **eStargz** blob (containerd/stargz-snapshotter) is a gzip tar in which every chunk of a
//! regular file's data starts a new gzip member, followed by a `stargz.index.json` entry (the TOC,
//! in its own member) and a 51-byte footer member whose gzip extra field holds the TOC's
//! compressed offset; the layer descriptor's `containerd.io/snapshot/stargz/toc.digest`
//! annotation names the TOC's sha256. Indexing fetches the footer and the TOC member.
//!
//! A **zstd:chunked** blob (containers/storage) is a zstd tar in which each regular file's data is
//! in zstd frames of its own, followed by skippable frames holding the zstd-compressed TOC ("manifest")
//! and a footer; the descriptor's `io.github.containers.zstd-chunked.manifest-position`
//! (`offset:length:uncompressed length:1`) and `…manifest-checksum` (sha256 of the compressed
//! manifest) annotations locate and pin it — `io.containers.zstd-chunked.*` in containers/image
//! before 5.24 (Debian 12's skopeo, buildah, podman), same layout. Indexing fetches the manifest.
//!
//! A layer that announces a TOC which cannot be used ([`Announced::Unusable`]: a wrong media
//! type, half of a pair of annotations, an unknown annotation name) or whose TOC fails to parse
//! or verify is streamed, and the reason is logged and reported per layer.
//!
//! A TOC gives each file's (or chunk's) compressed offset and the sha256 of its uncompressed
//! bytes, but not where it sits in the layer's uncompressed tar stream; so file offsets of such a
//! layer are positions in a *virtual* stream in which the data lie back to back: each eStargz
//! chunk, or each zstd:chunked file, is one span with a checkpoint at its compressed offset, and
//! the span's digest is the TOC's digest of it, verified on every read. eStargz's TOC file itself,
//! which conventional unpackers create, is the last span (zstd:chunked keeps its manifest in
//! skippable frames, outside the tar). The layer is marked `toc_indexed` in the archive so that
//! nothing streams it against these offsets. The `diff_id` cannot be checked without reading the
//! whole layer; the TOC digest (from the manifest, which is pinned by digest) and the per-span
//! digests take its place. TOC times have whole-second precision.
//!
//! Anything this model cannot express exactly (no data digests, eStargz chunks packed into one
//! member with `innerOffset`, zstd:chunked `zeros` chunks with no data in the stream, unknown
//! entry types, a TOC that does
//! not cover every file byte, an entry named like a PAX sparse file's `GNUSparseFile.N/` stand-in)
//! is an error, and the caller streams the layer instead.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::ops::Range;

use base64::Engine as _;
use clip_format::merge::LayerEntry;
use clip_format::{Checkpoint, CheckpointKind, LayerSpan, Metadata, NodeKind};
use clip_seekable::LayerIndex;
use sha2::{Digest as _, Sha256};

use clip_format::Digest;

use crate::{Error, LayerDesc};

mod zstd;

pub(crate) use zstd::index_from_zstd_chunked;
use zstd::zstd_entries;

/// The layer annotation naming the eStargz TOC digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The zstd:chunked annotation locating the manifest: `offset:length:uncompressed:type`.
pub const ZSTD_POSITION_ANNOTATION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// The zstd:chunked annotation naming the sha256 of the compressed manifest.
pub const ZSTD_CHECKSUM_ANNOTATION: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// The older names of the same two annotations, written by containers/image before 5.24
/// (skopeo 1.9, buildah 1.28 and podman 4.3, as Debian 12 ships them). The manifest and footer
/// they point at have the same layout.
pub const ZSTD_POSITION_ANNOTATION_V1: &str = "io.containers.zstd-chunked.manifest-position";
/// See [`ZSTD_POSITION_ANNOTATION_V1`].
pub const ZSTD_CHECKSUM_ANNOTATION_V1: &str = "io.containers.zstd-chunked.manifest-checksum";

/// Which kind of table of contents a layer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TocKind {
    /// eStargz (gzip).
    EStargz,
    /// zstd:chunked (zstd).
    ZstdChunked,
}

/// What a layer's descriptor says about a table of contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announced {
    /// A table of contents this indexer reads.
    Toc(TocKind),
    /// Something that looks like one but cannot be used, and why (the layer is streamed).
    Unusable(String),
    /// Nothing: a plain layer.
    Nothing,
}

/// The zstd:chunked (position, checksum) annotations of `d`, under either generation's names.
pub(super) fn zstd_annotations(d: &LayerDesc) -> (Option<&str>, Option<&str>) {
    let get = |new: &str, old: &str| {
        d.annotations
            .get(new)
            .or_else(|| d.annotations.get(old))
            .map(String::as_str)
    };
    (
        get(ZSTD_POSITION_ANNOTATION, ZSTD_POSITION_ANNOTATION_V1),
        get(ZSTD_CHECKSUM_ANNOTATION, ZSTD_CHECKSUM_ANNOTATION_V1),
    )
}

/// What `d` announces: a usable TOC, one that cannot be used (with the reason), or nothing.
#[must_use]
pub fn announced(d: &LayerDesc) -> Announced {
    let compression = clip_registry::oci::MediaKind::of_str(&d.media_type).layer();
    let zstd_media = compression == Some(clip_registry::oci::Compression::Zstd);
    let gzip_media = compression == Some(clip_registry::oci::Compression::Gzip);
    if d.annotations.contains_key(TOC_DIGEST_ANNOTATION) {
        return if gzip_media {
            Announced::Toc(TocKind::EStargz)
        } else {
            Announced::Unusable(format!(
                "{TOC_DIGEST_ANNOTATION} on a layer of media type {}",
                d.media_type
            ))
        };
    }
    match zstd_annotations(d) {
        (Some(_), Some(_)) if zstd_media => return Announced::Toc(TocKind::ZstdChunked),
        (Some(_), Some(_)) => {
            return Announced::Unusable(format!(
                "zstd:chunked annotations on a layer of media type {}",
                d.media_type
            ));
        }
        (Some(_), None) => {
            return Announced::Unusable(
                "zstd:chunked manifest position without its checksum".into(),
            );
        }
        (None, Some(_)) => {
            return Announced::Unusable(
                "zstd:chunked manifest checksum without its position".into(),
            );
        }
        (None, None) => {}
    }
    // Names this version does not know but that say "there is a TOC".
    if let Some(k) = d
        .annotations
        .keys()
        .find(|k| k.contains("zstd-chunked") || k.contains("stargz") || k.contains("estargz"))
    {
        return Announced::Unusable(format!("unknown annotation {k}"));
    }
    Announced::Nothing
}

/// The kind of TOC a layer's descriptor announces, if usable.
#[must_use]
pub fn layer_toc(d: &LayerDesc) -> Option<TocKind> {
    match announced(d) {
        Announced::Toc(k) => Some(k),
        _ => None,
    }
}
const TOC_NAME: &[u8] = b"stargz.index.json";
const FOOTER: u64 = 51;
/// Largest TOC accepted (compressed member and JSON).
const MAX_TOC: u64 = 64 << 20;

/// The TOC digest of an eStargz gzip layer, if its descriptor names one.
#[must_use]
pub fn toc_digest(d: &LayerDesc) -> Option<&str> {
    d.annotations
        .get(TOC_DIGEST_ANNOTATION)
        .map(String::as_str)
        .filter(|_| {
            clip_registry::oci::MediaKind::of_str(&d.media_type).layer()
                == Some(clip_registry::oci::Compression::Gzip)
        })
}

#[derive(serde::Deserialize)]
pub(super) struct Toc {
    #[serde(default)]
    entries: Vec<TocEntry>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    modtime: String,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: u64,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    dev_major: u32,
    #[serde(default)]
    dev_minor: u32,
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    chunk_offset: u64,
    #[serde(default)]
    chunk_size: u64,
    #[serde(default)]
    chunk_digest: String,
    #[serde(default)]
    inner_offset: u64,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    end_offset: u64,
    #[serde(default)]
    chunk_type: String,
}

/// What the TOC yields: the layer's entries (file spans name `layer`) and its index.
pub(crate) struct TocLayer {
    pub(crate) entries: Vec<LayerEntry>,
    pub(crate) index: LayerIndex,
    /// Compressed bytes fetched.
    pub(crate) fetched: u64,
}

/// Parses the footer: the TOC's compressed offset.
#[must_use]
pub fn footer_toc_offset(footer: &[u8]) -> Option<u64> {
    if footer.len() != 51 || footer[..3] != [0x1f, 0x8b, 8] || footer[3] & 4 == 0 {
        return None;
    }
    let xlen = usize::from(u16::from_le_bytes([footer[10], footer[11]]));
    let extra = footer.get(12..12 + xlen)?;
    if extra.len() < 4 || &extra[..2] != b"SG" {
        return None;
    }
    let sub = extra.get(4..4 + usize::from(u16::from_le_bytes([extra[2], extra[3]])))?;
    if sub.len() != 22 || &sub[16..] != b"STARGZ" {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&sub[..16]).ok()?, 16).ok()
}

/// Parses an RFC 3339 time (`2006-01-02T15:04:05Z`, optional fraction and offset).
fn parse_time(text: &str) -> Option<(i64, u32)> {
    if text.is_empty() {
        return Some((0, 0));
    }
    let bytes = text.as_bytes();
    let num =
        |r: Range<usize>| -> Option<i64> { std::str::from_utf8(bytes.get(r)?).ok()?.parse().ok() };
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let digits: String = f.chars().take_while(char::is_ascii_digit).collect();
        rest = &f[digits.len()..];
        let mut d9: String = digits.chars().take(9).collect();
        while d9.len() < 9 {
            d9.push('0');
        }
        nanos = d9.parse().ok()?;
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let t = rest.get(1..)?;
            let (oh, om) = t.split_once(':')?;
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((
        days * 86_400 + hour * 3600 + minute * 60 + second - offset,
        nanos,
    ))
}

/// One TOC entry (not a chunk) as a layer entry whose data (if a file) starts at `virt`.
pub(super) fn entry_of(
    e: &TocEntry,
    layer: u32,
    virt: u64,
    bad: &dyn Fn(&str) -> Error,
) -> Result<LayerEntry, Error> {
    // Converters expand PAX sparse files; a stand-in name means this TOC lists one raw, and a
    // TOC cannot say where its holes are.
    if e.name.split('/').any(|c| c.starts_with("GNUSparseFile.")) {
        return Err(Error::Unsupported(format!(
            "{} looks like a PAX sparse file's stand-in name",
            e.name
        )));
    }
    let (secs, nanos) =
        parse_time(&e.modtime).ok_or_else(|| bad(&format!("bad modtime {:?}", e.modtime)))?;
    let mut xattrs = Vec::new();
    for (k, v) in &e.xattrs {
        let value = base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|_| bad(&format!("bad xattr {k} on {}", e.name)))?;
        xattrs.push((k.as_bytes().to_vec(), value));
    }
    let meta = Metadata {
        mode: u32::try_from(e.mode & 0o7777).unwrap_or(0),
        uid: e.uid,
        gid: e.gid,
        mtime_sec: secs,
        mtime_nsec: nanos,
        xattrs,
    };
    let link = || {
        (!e.link_name.is_empty())
            .then(|| e.link_name.as_bytes().to_vec())
            .ok_or_else(|| bad(&format!("{} has no link target", e.name)))
    };
    let kind = match e.kind.as_str() {
        "dir" => NodeKind::Dir,
        "reg" => NodeKind::File {
            size: e.size,
            span: Some(LayerSpan::new(layer, virt)),
        },
        "symlink" => NodeKind::Symlink(link()?),
        "hardlink" => NodeKind::HardLink(link()?),
        "char" => NodeKind::CharDevice {
            major: e.dev_major,
            minor: e.dev_minor,
        },
        "block" => NodeKind::BlockDevice {
            major: e.dev_major,
            minor: e.dev_minor,
        },
        "fifo" => NodeKind::Fifo,
        other => return Err(Error::Unsupported(format!("TOC entry type {other:?}"))),
    };
    Ok(LayerEntry {
        path: e.name.as_bytes().to_vec(),
        kind,
        meta,
    })
}

/// The largest chunk a TOC may make one span. A TOC's chunks are the image author's choice
/// (stargz's `ctr-remote` takes any chunk size): a 1 GiB chunk would be fetched, decoded and
/// verified as one buffer by every mount that reads a byte of it. A layer with a larger chunk
/// is streamed instead, and gets clip's own checkpoints (`checkpointMiB` apart).
pub const MAX_TOC_SPAN: u64 = 64 << 20;

/// `t` if none of its spans is longer than `max`, else the error that makes the caller stream
/// the layer.
pub(crate) fn bounded_spans(t: TocLayer, max: u64) -> Result<TocLayer, Error> {
    let ix = &t.index;
    let longest = ix
        .checkpoints
        .iter()
        .map(|c| c.uncompressed_offset)
        .chain(std::iter::once(ix.uncompressed_size))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    if longest > max {
        return Err(Error::Unsupported(format!(
            "a TOC chunk of {longest} bytes is larger than the {max} bytes clip serves as one span"
        )));
    }
    Ok(t)
}

/// Indexes layer `layer` (descriptor `d`) from its TOC; `fetch` returns exact byte ranges of the
/// blob. Errors mean "stream this layer instead".
pub(crate) fn index_from_toc(
    fetch: &dyn Fn(Range<u64>) -> Result<Vec<u8>, Error>,
    layer: u32,
    d: &LayerDesc,
    toc_digest: &str,
    span: u64,
) -> Result<TocLayer, Error> {
    let bad = |what: &str| Error::Image(format!("eStargz layer {}: {what}", d.digest));
    if d.size <= FOOTER {
        return Err(bad("too small for a footer"));
    }
    let footer = fetch(d.size - FOOTER..d.size)?;
    let toc_at = footer_toc_offset(&footer).ok_or_else(|| bad("no eStargz footer"))?;
    if toc_at >= d.size - FOOTER || d.size - FOOTER - toc_at > MAX_TOC {
        return Err(bad("TOC offset out of range"));
    }
    let member = fetch(toc_at..d.size - FOOTER)?;
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&member[..])
        .take(MAX_TOC + 1)
        .read_to_end(&mut plain)
        .map_err(|e| bad(&format!("TOC member: {e}")))?;
    if plain.len() as u64 > MAX_TOC {
        return Err(bad("TOC too large"));
    }
    // The member holds one tar entry, the TOC, then the end-of-archive blocks.
    let mut ar = tar::Archive::new(&plain[..]);
    let mut entries_iter = ar.entries().map_err(|e| bad(&e.to_string()))?;
    let mut toc_entry = entries_iter
        .next()
        .ok_or_else(|| bad("empty TOC member"))?
        .map_err(|e| bad(&e.to_string()))?;
    if toc_entry.path_bytes().as_ref() != TOC_NAME {
        return Err(bad("the TOC member does not hold stargz.index.json"));
    }
    let toc_data_at = toc_entry.raw_file_position();
    let toc_hdr = toc_entry.header().clone();
    let mut json = Vec::new();
    toc_entry
        .read_to_end(&mut json)
        .map_err(|e| bad(&e.to_string()))?;
    Digest::parse(toc_digest)
        .map_err(|e| bad(&format!("TOC digest annotation: {e}")))?
        .verify(format!("eStargz TOC of layer {}", d.digest), &json)?;
    let field = |r: std::io::Result<u64>| r.map_err(|e| bad(&format!("TOC header: {e}")));
    let toc_meta = Metadata {
        mode: u32::try_from(field(toc_hdr.mode().map(u64::from))? & 0o7777).unwrap_or(0),
        uid: u32::try_from(field(toc_hdr.uid())?).unwrap_or(0),
        gid: u32::try_from(field(toc_hdr.gid())?).unwrap_or(0),
        mtime_sec: i64::try_from(field(toc_hdr.mtime())?).unwrap_or(0),
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let (mut entries, mut checkpoints, virt) =
        toc_entries(&json, layer, toc_at, d.digest.as_str(), TocKind::EStargz)?;
    // The TOC file: the whole TOC member is its span.
    entries.push(LayerEntry {
        path: TOC_NAME.to_vec(),
        kind: NodeKind::File {
            size: json.len() as u64,
            span: Some(LayerSpan::new(layer, virt + toc_data_at)),
        },
        meta: toc_meta,
    });
    checkpoints.push(Checkpoint {
        kind: CheckpointKind::GzipMember,
        compressed_offset: toc_at,
        uncompressed_offset: virt,
        bits: 0,
        window: Vec::new(),
        span_digest: Sha256::digest(&plain).into(),
        chain_head: None,
    });
    let members = u32::try_from(checkpoints.len() + 1).unwrap_or(u32::MAX);
    Ok(TocLayer {
        entries,
        index: LayerIndex {
            checkpoints,
            compressed_size: d.size,
            uncompressed_size: virt + plain.len() as u64,
            diff_id: d
                .diff_id
                .sha256_bytes()
                .ok_or_else(|| bad("the diff_id is not a sha256"))?,
            members,
            span,
            input: None,
        },
        fetched: FOOTER + member.len() as u64,
    })
}

/// A TOC's entries as layer entries (file spans name `layer`), its data spans as checkpoints (all
/// below `toc_at`), and the virtual stream length they cover. The parser of untrusted TOC JSON:
/// never panics, every count bounded by the input.
pub fn toc_entries(
    json: &[u8],
    layer: u32,
    toc_at: u64,
    digest: &str,
    kind: TocKind,
) -> Result<(Vec<LayerEntry>, Vec<Checkpoint>, u64), Error> {
    if kind == TocKind::ZstdChunked {
        return zstd_entries(json, layer, toc_at, digest);
    }
    let bad = |what: &str| Error::Image(format!("eStargz layer {digest}: {what}"));
    let toc: Toc = serde_json::from_slice(json).map_err(|e| bad(&format!("TOC: {e}")))?;

    let mut entries = Vec::with_capacity(toc.entries.len() + 1);
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut virt = 0u64;
    // The regular file whose chunks are being read: (entry index, size, bytes covered).
    let mut open: Option<(usize, u64, u64)> = None;
    let mut add_chunk = |e: &TocEntry, virt: &mut u64, open: &mut Option<(usize, u64, u64)>| {
        let Some((_, size, covered)) = open.as_mut() else {
            return Err(bad(&format!("chunk of {} without its file", e.name)));
        };
        let len = if e.chunk_size == 0 {
            size.saturating_sub(e.chunk_offset)
        } else {
            e.chunk_size
        };
        if e.inner_offset != 0 {
            return Err(Error::Unsupported(
                "eStargz chunks packed into shared members (innerOffset)".into(),
            ));
        }
        if e.chunk_offset != *covered || len == 0 || *covered + len > *size {
            return Err(bad(&format!("chunks of {} do not tile the file", e.name)));
        }
        let digest = clip_format::sha256_bytes(&e.chunk_digest)
            .ok_or_else(|| Error::Unsupported(format!("no chunk digest for {}", e.name)))?;
        if checkpoints
            .last()
            .is_some_and(|c| c.compressed_offset >= e.offset)
            || e.offset >= toc_at
        {
            return Err(bad("chunk offsets out of order"));
        }
        checkpoints.push(Checkpoint {
            kind: CheckpointKind::GzipMember,
            compressed_offset: e.offset,
            uncompressed_offset: *virt,
            bits: 0,
            window: Vec::new(),
            span_digest: digest,
            chain_head: None,
        });
        *virt += len;
        *covered += len;
        Ok(())
    };
    for e in &toc.entries {
        if e.kind == "chunk" {
            if open.as_ref().is_none_or(|(i, _, _)| {
                entries
                    .get(*i)
                    .is_none_or(|x: &LayerEntry| x.path != e.name.as_bytes())
            }) {
                return Err(bad(&format!("chunk of {} out of place", e.name)));
            }
            add_chunk(e, &mut virt, &mut open)?;
            continue;
        }
        if let Some((_, size, covered)) = open.take()
            && covered != size
        {
            return Err(bad("a file's chunks do not cover it"));
        }
        entries.push(entry_of(e, layer, virt, &bad)?);
        if e.kind == "reg" && e.size > 0 {
            open = Some((entries.len() - 1, e.size, 0));
            add_chunk(e, &mut virt, &mut open)?;
        }
    }
    if let Some((_, size, covered)) = open
        && covered != size
    {
        return Err(bad("a file's chunks do not cover it"));
    }
    Ok((entries, checkpoints, virt))
}

#[cfg(test)]
mod tests {
    use super::{footer_toc_offset, parse_time};

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_time("2023-11-14T23:13:20+01:00"),
            Some((1_700_000_000, 0))
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.5Z"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_time("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(parse_time("2023-13-14T22:13:20Z"), None);
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn footers() {
        let mut f = vec![
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        f.extend_from_slice(b"00000000000012abSTARGZ");
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 51);
        assert_eq!(footer_toc_offset(&f), Some(0x12ab));
        f[14] = 21;
        assert_eq!(footer_toc_offset(&f), None);
        assert_eq!(footer_toc_offset(&f[..50]), None);
    }
}

#[cfg(test)]
mod toc_tests {
    #![allow(clippy::unwrap_used)]
    use super::{TOC_DIGEST_ANNOTATION, index_from_toc};
    use crate::{Error, LayerDesc};

    use clip_format::Digest;
    use clip_testkit::image::{Entry, Layer, write_tar};

    fn sample() -> (clip_testkit::estargz::EStargz, LayerDesc) {
        let tar = write_tar(&Layer::new(vec![
            Entry::dir("a"),
            Entry::file("a/big", clip_testkit::image::text_bytes(1, 300_000)),
            Entry::file("a/empty", ""),
            Entry::symlink("a/link", "big"),
        ]))
        .unwrap();
        let e = clip_testkit::estargz::build(&tar, 100_000).unwrap();
        let mut d = LayerDesc {
            index: 0,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: Digest::sha256(&e.blob),
            size: e.blob.len() as u64,
            annotations: std::collections::BTreeMap::new(),
            diff_id: Digest::sha256(&e.tar),
            urls: Vec::new(),
        };
        d.annotations
            .insert(TOC_DIGEST_ANNOTATION.into(), e.toc_digest.clone());
        (e, d)
    }

    #[test]
    fn chunks_become_verified_spans_and_damage_is_refused() {
        let (e, d) = sample();
        let fetch = |r: std::ops::Range<u64>| -> Result<Vec<u8>, Error> {
            Ok(e.blob[r.start as usize..r.end as usize].to_vec())
        };
        let t = index_from_toc(&fetch, 0, &d, &e.toc_digest, 4 << 20).unwrap();
        // 3 chunks of a/big, then the TOC member.
        assert_eq!(t.index.checkpoints.len(), 4);
        assert_eq!(t.entries.len(), 5, "4 entries and stargz.index.json");
        for (k, cp) in t.index.checkpoints.iter().enumerate() {
            let end = t
                .index
                .checkpoints
                .get(k + 1)
                .map_or(t.index.uncompressed_size, |c| c.uncompressed_offset);
            let len = (end - cp.uncompressed_offset) as usize;
            let span = clip_seekable::gzip::decode(cp, &e.blob, 0, 0, len).unwrap();
            t.index.verify_span(k, &span).unwrap();
        }
        // A TOC that is not the annotated one, a missing footer, a short blob.
        let err = index_from_toc(&fetch, 0, &d, &format!("sha256:{}", "0".repeat(64)), 1)
            .err()
            .unwrap();
        assert!(matches!(err, Error::Digest(_)), "{err}");
        let cut = |r: std::ops::Range<u64>| -> Result<Vec<u8>, Error> {
            Ok(e.blob[r.start as usize..(r.end as usize).min(e.blob.len() - 1)].to_vec())
        };
        assert!(index_from_toc(&cut, 0, &d, &e.toc_digest, 1).is_err());
        let small = LayerDesc {
            size: 40,
            ..d.clone()
        };
        assert!(index_from_toc(&fetch, 0, &small, &e.toc_digest, 1).is_err());
    }
}

#[cfg(test)]
mod span_bound_tests {
    use super::*;

    fn layer(offsets: &[u64], size: u64) -> TocLayer {
        TocLayer {
            entries: Vec::new(),
            index: LayerIndex {
                checkpoints: offsets
                    .iter()
                    .map(|&o| Checkpoint {
                        kind: CheckpointKind::GzipMember,
                        compressed_offset: o,
                        uncompressed_offset: o,
                        bits: 0,
                        window: Vec::new(),
                        span_digest: [0; 32],
                        chain_head: None,
                    })
                    .collect(),
                compressed_size: size,
                uncompressed_size: size,
                diff_id: [0; 32],
                members: 1,
                span: 4 << 20,
                input: None,
            },
            fetched: 0,
        }
    }

    /// The image author chooses a TOC's chunk sizes; a chunk above the bound makes the layer
    /// streamed (clip's own checkpoints) instead of one giant span.
    #[test]
    fn a_toc_chunk_above_the_bound_makes_the_layer_streamed() {
        assert!(bounded_spans(layer(&[0, 10, 20], 30), 10).is_ok());
        assert!(
            bounded_spans(layer(&[0, 10, 21], 30), 10).is_err(),
            "a middle chunk"
        );
        assert!(
            bounded_spans(layer(&[0, 10], 21), 10).is_err(),
            "the last chunk"
        );
        assert!(bounded_spans(layer(&[], 0), 10).is_ok());
    }
}
