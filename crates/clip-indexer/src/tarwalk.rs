//! Walking one layer's tar stream into [`LayerEntry`]s with data locations.

use std::io::Read;

use clip_format::merge::LayerEntry;
use clip_format::{LayerSpan, Metadata, NodeKind};
use clip_seekable::CheckpointRequests;

use crate::Error;

/// Reads every entry of a layer. File data stays where it is: each file records its offset in
/// the uncompressed stream. Files larger than `large` get a checkpoint requested at their start.
pub(crate) fn walk<R: Read>(
    reader: R,
    layer: u32,
    requests: Option<&CheckpointRequests>,
    large: u64,
) -> Result<(Vec<LayerEntry>, R), Error> {
    let bad = |reason: String| Error::Tar { layer, reason };
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    {
        let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let path = entry.path_bytes().into_owned();
            let shown = || String::from_utf8_lossy(&path).into_owned();
            let link = entry.link_name_bytes().map(std::borrow::Cow::into_owned);
            let offset = entry.raw_file_position();
            let size = entry.size();
            let hdr = entry.header().clone();
            let ty = hdr.entry_type();
            let field = |r: std::io::Result<u64>, what: &str| {
                r.map_err(|e| bad(format!("{}: bad {what}: {e}", shown())))
            };
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
                    } else if key.starts_with(b"GNU.sparse.") {
                        return Err(Error::Unsupported(format!(
                            "layer {layer}: {} is a PAX sparse file",
                            shown()
                        )));
                    }
                }
            }
            let kind = match ty {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    if size > large
                        && let Some(r) = requests
                    {
                        r.request(offset);
                    }
                    NodeKind::File {
                        size,
                        span: Some(LayerSpan { layer, offset }),
                    }
                }
                tar::EntryType::Directory => NodeKind::Dir,
                tar::EntryType::Symlink => {
                    let t = link
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| bad(format!("{}: symlink without target", shown())))?;
                    NodeKind::Symlink(t)
                }
                tar::EntryType::Link => {
                    let t = link
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| bad(format!("{}: hard link without target", shown())))?;
                    NodeKind::HardLink(t)
                }
                tar::EntryType::Char | tar::EntryType::Block => {
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
                tar::EntryType::Fifo => NodeKind::Fifo,
                tar::EntryType::GNUSparse => {
                    return Err(Error::Unsupported(format!(
                        "layer {layer}: {} is a GNU sparse file",
                        shown()
                    )));
                }
                // Global PAX headers and vendor extensions carry no file.
                _ => continue,
            };
            out.push(LayerEntry { path, kind, meta });
        }
    }
    Ok((out, archive.into_inner()))
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
    use super::parse_pax_time;

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
