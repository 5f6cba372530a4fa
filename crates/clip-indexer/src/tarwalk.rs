//! Walking one layer's tar stream into [`LayerEntry`]s with data locations.

use std::io::{Read, Seek};

use clip_format::merge::LayerEntry;
use clip_format::{LayerSpan, Metadata, NodeKind, SparseMap};
use clip_seekable::CheckpointRequests;

use crate::Error;

/// A reader that "seeks" forward by reading and discarding, for walking a plain [`Read`].
pub(crate) struct Forward<R> {
    inner: R,
    pos: u64,
}

impl<R> Forward<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self { inner, pos: 0 }
    }
}

impl<R: Read> Read for Forward<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Seeks forward only, stopping at the end of the stream (as the indexers do).
impl<R: Read> Seek for Forward<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let std::io::SeekFrom::Current(n) = pos else {
            return Err(std::io::ErrorKind::Unsupported.into());
        };
        let n =
            u64::try_from(n).map_err(|_| std::io::Error::from(std::io::ErrorKind::Unsupported))?;
        self.pos += std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())?;
        Ok(self.pos)
    }
}

/// Reads every entry of a layer. File data stays where it is: each file records its offset in
/// the uncompressed stream. Files larger than `large` get a checkpoint requested at their start.
// Over 100 lines on purpose: one pass over an untrusted tar stream: the header, PAX and GNU
// extension records and the entry they describe are parsed in the order they arrive, every length
// bounded before use; split up, that state (pending long names, PAX records, sparse maps) would
// cross function boundaries.
pub(crate) fn walk<R: Read + Seek>(
    reader: R,
    layer: u32,
    requests: Option<&CheckpointRequests>,
    large: u64,
) -> Result<(Vec<LayerEntry>, R), Error> {
    let bad = |reason: String| Error::Tar { layer, reason };
    // A read error that is really the decompressor's (corrupt or truncated compressed data) is
    // reported as such, typed; anything else the tar reader says is a tar error.
    let from_io = |e: std::io::Error| {
        if e.get_ref()
            .is_some_and(<dyn std::error::Error + Send + Sync>::is::<clip_seekable::Error>)
        {
            Error::Layer {
                layer: layer as usize,
                digest: None,
                source: clip_seekable::Error::from_io(e),
            }
        } else {
            bad(e.to_string())
        }
    };
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    // Where the last entry's data ends: the stream may end there (see below), not before.
    let mut data_end = 0u64;
    {
        // Seeking passes over file data without copying it out of the indexer.
        let entries = archive.entries_with_seek().map_err(from_io)?;
        for entry in entries {
            let mut entry = entry.map_err(from_io)?;
            let path = entry.path_bytes().into_owned();
            let shown = || String::from_utf8_lossy(&path).into_owned();
            let link = entry.link_name_bytes().map(std::borrow::Cow::into_owned);
            let offset = entry.raw_file_position();
            let size = entry.size();
            data_end = data_end.max(offset.saturating_add(size));
            let hdr = entry.header().clone();
            let ty = hdr.entry_type();
            let field = |r: std::io::Result<u64>, what: &str| {
                r.map_err(|e| bad(format!("{}: bad {what}: {e}", shown())))
            };
            let mut sparse = SparsePax::default();
            let mut meta = Metadata {
                mode: u32::try_from(field(hdr.mode().map(u64::from), "mode")? & 0o7777)
                    .unwrap_or(0),
                uid: u32::try_from(field(hdr.uid(), "uid")?)
                    .map_err(|_| bad(format!("{}: uid out of range", shown())))?,
                gid: u32::try_from(field(hdr.gid(), "gid")?)
                    .map_err(|_| bad(format!("{}: gid out of range", shown())))?,
                mtime_sec: i64::try_from(field(hdr.mtime(), "mtime")?).unwrap_or(i64::MAX),
                mtime_nsec: 0,
                xattrs: Vec::new(),
            };
            if let Some(exts) = entry.pax_extensions().map_err(|e| bad(e.to_string()))? {
                for ext in exts {
                    let ext = ext.map_err(|e| bad(e.to_string()))?;
                    let (key, value) = (ext.key_bytes(), ext.value_bytes());
                    let text = std::str::from_utf8(value).unwrap_or("");
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        meta.xattrs.push((name.to_vec(), value.to_vec()));
                    } else if key == b"mtime" {
                        let (s, ns) = parse_pax_time(text)
                            .ok_or_else(|| bad(format!("{}: bad PAX mtime {text:?}", shown())))?;
                        meta.mtime_sec = s;
                        meta.mtime_nsec = ns;
                    } else if key == b"uid" || key == b"gid" {
                        let v: u32 = text.parse().map_err(|_| {
                            bad(format!(
                                "{}: bad PAX {}",
                                shown(),
                                String::from_utf8_lossy(key)
                            ))
                        })?;
                        if key == b"uid" {
                            meta.uid = v;
                        } else {
                            meta.gid = v;
                        }
                    } else if let Some(k) = key.strip_prefix(b"GNU.sparse.") {
                        sparse
                            .record(k, text)
                            .map_err(|r| bad(format!("{}: {r}", shown())))?;
                    }
                }
            }
            let sparse = sparse.resolve().map_err(|r| match r {
                SparseError::Version(v) => Error::Unsupported(format!(
                    "layer {layer}: {} is a PAX sparse file of unknown format {v}",
                    shown()
                )),
                SparseError::Bad(r) => bad(format!("{}: {r}", shown())),
            })?;
            let mut name = None;
            let kind = match (ty, sparse) {
                (tar::EntryType::Regular | tar::EntryType::Continuous, Some(sp)) => {
                    name.clone_from(&sp.name);
                    let (span, logical, stored) = sparse_span(&mut entry, sp, layer, offset, size)
                        .map_err(|r| bad(format!("{}: sparse file: {r}", shown())))?;
                    if stored > large
                        && let Some(r) = requests
                    {
                        r.request(span.offset);
                    }
                    NodeKind::File {
                        size: logical,
                        span: Some(span),
                    }
                }
                (_, Some(_)) => {
                    return Err(bad(format!(
                        "{}: sparse records on an entry that is not a regular file",
                        shown()
                    )));
                }
                (tar::EntryType::Regular | tar::EntryType::Continuous, None) => {
                    if size > large
                        && let Some(r) = requests
                    {
                        r.request(offset);
                    }
                    NodeKind::File {
                        size,
                        span: Some(LayerSpan::new(layer, offset)),
                    }
                }
                (tar::EntryType::Directory, None) => NodeKind::Dir,
                (tar::EntryType::Symlink, None) => {
                    let t = link
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| bad(format!("{}: symlink without target", shown())))?;
                    NodeKind::Symlink(t)
                }
                (tar::EntryType::Link, None) => {
                    let t = link
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| bad(format!("{}: hard link without target", shown())))?;
                    NodeKind::HardLink(t)
                }
                (tar::EntryType::Char | tar::EntryType::Block, None) => {
                    let major = field(
                        hdr.device_major().map(|m| u64::from(m.unwrap_or(0))),
                        "device major",
                    )?;
                    let minor = field(
                        hdr.device_minor().map(|m| u64::from(m.unwrap_or(0))),
                        "device minor",
                    )?;
                    let (major, minor) = (
                        u32::try_from(major).unwrap_or(0),
                        u32::try_from(minor).unwrap_or(0),
                    );
                    if ty == tar::EntryType::Char {
                        NodeKind::CharDevice { major, minor }
                    } else {
                        NodeKind::BlockDevice { major, minor }
                    }
                }
                (tar::EntryType::Fifo, None) => NodeKind::Fifo,
                // Old GNU sparse entries (type 'S') are refused, as umoci, containerd and Docker
                // refuse them; GNU tar writes PAX sparse files (above) in its POSIX format.
                (tar::EntryType::GNUSparse, None) => {
                    return Err(Error::Unsupported(format!(
                        "layer {layer}: {} is an old-style GNU sparse file (type 'S'), which \
                         container runtimes do not unpack; write the layer in PAX format",
                        shown()
                    )));
                }
                // Global PAX headers and vendor extensions carry no file.
                _ => continue,
            };
            out.push(LayerEntry {
                path: name.unwrap_or(path),
                kind,
                meta,
            });
        }
    }
    // Go's archive/tar (umoci, containerd, Docker) takes a stream that ends right after an
    // entry's data, without the padding to 512 bytes and the end-of-archive blocks, as complete
    // (`umoci insert` writes such layers). The indexers' seek stops at the end of the stream,
    // and the tar reader then finds no next header, so such a stream ends the walk; a stream
    // that ends inside an entry's data is still truncated.
    let mut reader = archive.into_inner();
    let end = reader
        .stream_position()
        .map_err(|e| bad(format!("reading the stream position: {e}")))?;
    if end < data_end {
        return Err(bad(format!(
            "the stream ends at byte {end}, inside an entry's data (which ends at {data_end})"
        )));
    }
    Ok((out, reader))
}

/// Most extents a sparse file may have (a larger map is refused before it is allocated).
const MAX_SPARSE_EXTENTS: usize = 1 << 20;

/// The `GNU.sparse.*` PAX records of one entry (GNU tar's sparse formats 0.0, 0.1 and 1.0).
#[derive(Default)]
struct SparsePax {
    major: Option<String>,
    minor: Option<String>,
    name: Option<Vec<u8>>,
    size: Option<String>,
    realsize: Option<String>,
    numblocks: Option<String>,
    /// Format 0.1's `map`, or format 0.0's repeated `offset`/`numbytes` records in order.
    map: Vec<String>,
    from_map_record: bool,
}

enum SparseError {
    Version(String),
    Bad(String),
}

/// What the PAX records say about a sparse file.
struct SparseHeader {
    /// The file's real name (`GNU.sparse.name`), if given.
    name: Option<Vec<u8>>,
    /// Its logical size.
    size: u64,
    /// Formats 0.x: the extents; format 1.0: `None` (the map leads the entry's data).
    map: Option<Vec<(u64, u64)>>,
}

impl SparsePax {
    /// Takes one record (`key` without the `GNU.sparse.` prefix).
    fn record(&mut self, key: &[u8], value: &str) -> Result<(), String> {
        match key {
            b"major" => self.major = Some(value.to_owned()),
            b"minor" => self.minor = Some(value.to_owned()),
            b"name" => self.name = Some(value.as_bytes().to_vec()),
            b"size" => self.size = Some(value.to_owned()),
            b"realsize" => self.realsize = Some(value.to_owned()),
            b"numblocks" => self.numblocks = Some(value.to_owned()),
            b"map" => {
                self.map = value.split(',').map(str::to_owned).collect();
                self.from_map_record = true;
            }
            // Format 0.0: offset and numbytes alternate, starting with an offset.
            b"offset" | b"numbytes" => {
                let want = if self.map.len().is_multiple_of(2) {
                    &b"offset"[..]
                } else {
                    &b"numbytes"[..]
                };
                if key != want || value.contains(',') || self.from_map_record {
                    return Err("GNU.sparse.offset and numbytes records do not alternate".into());
                }
                if self.map.len() >= 2 * MAX_SPARSE_EXTENTS {
                    return Err("too many sparse extents".into());
                }
                self.map.push(value.to_owned());
            }
            _ => {}
        }
        Ok(())
    }

    /// Decides whether the entry is a sparse file (as Go's archive/tar, which umoci uses).
    fn resolve(self) -> Result<Option<SparseHeader>, SparseError> {
        let is_1x0 = match (self.major.as_deref(), self.minor.as_deref()) {
            (Some("0"), Some("0" | "1")) => false,
            (Some("1"), Some("0")) => true,
            (None, None) if !self.map.is_empty() => false,
            (None, None) => return Ok(None),
            (major, minor) => {
                return Err(SparseError::Version(format!(
                    "{}.{}",
                    major.unwrap_or("?"),
                    minor.unwrap_or("?")
                )));
            }
        };
        let bad = |s: &str| SparseError::Bad(s.to_owned());
        let size = self
            .size
            .or(self.realsize)
            .ok_or_else(|| bad("no GNU.sparse.size or realsize record"))?;
        let size = parse_decimal(&size).ok_or_else(|| bad("bad GNU.sparse size"))?;
        let map = if is_1x0 {
            None
        } else {
            let blocks = self
                .numblocks
                .as_deref()
                .and_then(parse_decimal)
                .ok_or_else(|| bad("bad or missing GNU.sparse.numblocks"))?;
            if blocks > MAX_SPARSE_EXTENTS as u64 || self.map.len() as u64 != 2 * blocks {
                return Err(bad("GNU.sparse.numblocks does not match the map"));
            }
            let nums: Option<Vec<u64>> = self.map.iter().map(|v| parse_decimal(v)).collect();
            let nums = nums.ok_or_else(|| bad("bad number in the sparse map"))?;
            Some(nums.chunks_exact(2).map(|p| (p[0], p[1])).collect())
        };
        Ok(Some(SparseHeader {
            name: self.name.filter(|n| !n.is_empty()),
            size,
            map,
        }))
    }
}

/// A non-negative decimal number (digits only, as tar writes them).
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Reads a format 1.0 map from the head of the entry's data: decimal numbers each ending in a
/// newline (the count, then offset/length pairs), in whole 512-byte blocks, read one at a time
/// only as the next number needs them (as Go's archive/tar does). Only the unparsed tail of the
/// text is kept, and a number is at most 20 digits, so memory stays bounded whatever the entry
/// holds. Returns the extents and the bytes the map occupies.
fn read_map_1x0(data: &mut impl Read) -> Result<(Vec<(u64, u64)>, u64), String> {
    let mut pending: Vec<u8> = Vec::new();
    let mut block = [0u8; 512];
    let mut blocks = 0u64;
    let mut next = || -> Result<u64, String> {
        loop {
            if let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let n = std::str::from_utf8(&pending[..end])
                    .ok()
                    .and_then(parse_decimal)
                    .ok_or("its map holds a bad number")?;
                pending.drain(..=end);
                return Ok(n);
            }
            if pending.len() > 20 {
                return Err("its map holds a bad number".into());
            }
            data.read_exact(&mut block)
                .map_err(|e| format!("its map ends early ({e})"))?;
            blocks += 1;
            pending.extend_from_slice(&block);
        }
    };
    let count = usize::try_from(next()?).unwrap_or(usize::MAX);
    if count > MAX_SPARSE_EXTENTS {
        return Err(format!(
            "its map has {count} extents (at most {MAX_SPARSE_EXTENTS})"
        ));
    }
    let mut extents = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        extents.push((next()?, next()?));
    }
    Ok((extents, blocks * 512))
}

/// Where a PAX sparse file's data lies: its span (data offset and map), logical size and stored
/// length. The stored length must be exactly the entry's data (less a format 1.0 map).
fn sparse_span<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    sp: SparseHeader,
    layer: u32,
    offset: u64,
    size: u64,
) -> Result<(LayerSpan, u64, u64), String> {
    let (extents, map_len) = match sp.map {
        Some(m) => (m, 0),
        None => read_map_1x0(entry)?,
    };
    let map = SparseMap::new(extents, sp.size)?;
    let stored = size - map_len.min(size);
    if map.stored_len() != stored {
        return Err(format!(
            "its map covers {} bytes but the entry stores {stored}",
            map.stored_len()
        ));
    }
    let sparse = (!map.is_dense()).then(|| std::sync::Arc::new(map));
    Ok((
        LayerSpan {
            layer,
            offset: offset + map_len,
            sparse,
        },
        sp.size,
        stored,
    ))
}

/// Parses a PAX time `SECONDS[.FRACTION]` (seconds may be negative).
fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let ns: u32 = digits.parse().ok()?;
    if secs < 0 && ns > 0 {
        // -1.5 means 1.5 s before the epoch: -2 s + 0.5 s.
        return Some((secs - 1, 1_000_000_000 - ns));
    }
    Some((secs, ns))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::parse_pax_time;

    /// A tar of a directory and two files (the last 1000 bytes, not a multiple of 512).
    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        b.append_data(&mut h, "d/", std::io::empty()).unwrap();
        for (name, len) in [("d/a", 700usize), ("d/b", 1000)] {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(len as u64);
            b.append_data(&mut h, name, vec![b'x'; len].as_slice())
                .unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_stream_may_end_right_after_the_last_data_but_not_inside_it() {
        let full = sample_tar();
        // Headers at 0, 512 and 2048 (d/a's data at 1024, padded); d/b's data at 2560..3560.
        let want = crate::walk_tar(full.as_slice(), 0).unwrap();
        assert_eq!(want.len(), 3);
        // Without the padding and the end-of-archive blocks, as `umoci insert` writes layers and
        // Go's archive/tar accepts: the same entries, through the copying walker and an indexer.
        let bare = &full[..3560];
        assert_eq!(crate::walk_tar(bare, 0).unwrap(), want);
        let ix = clip_seekable::PlainIndexer::new(bare, 1 << 20);
        let (entries, ix) = super::walk(ix, 0, None, u64::MAX).unwrap();
        assert_eq!(entries, want);
        assert_eq!(ix.finish().unwrap().uncompressed_size, 3560);
        // Ending inside d/b's data, or inside a header, is truncation.
        for cut in [3559, 3000, 2561, 2300, 1500, 600] {
            let err = crate::walk_tar(&full[..cut], 0).unwrap_err();
            assert!(
                matches!(err, crate::Error::Tar { .. }),
                "cut at {cut}: {err}"
            );
            let ix = clip_seekable::PlainIndexer::new(&full[..cut], 1 << 20);
            assert!(super::walk(ix, 0, None, u64::MAX).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("1600000000.123456789"),
            Some((1_600_000_000, 123_456_789))
        );
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.2e3"), None);
    }
}
