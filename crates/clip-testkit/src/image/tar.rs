//! Layers → tar streams (GNU headers, PAX records where needed) and their compression.

use std::io::Write as _;

use flate2::Compression as GzLevel;
use flate2::write::GzEncoder;

use super::{Compression, Kind, Layer, SparseFormat};
use crate::error::{Error, Result};

/// Writes a layer's entries as a tar stream (GNU headers; PAX records where needed).
pub fn write_tar(layer: &Layer) -> Result<Vec<u8>> {
    let io = |what: &str, e: std::io::Error| {
        Error::InvalidImage(format!("writing tar entry {what}: {e}"))
    };
    let mut b = tar::Builder::new(Vec::new());
    for e in &layer.entries {
        let mut path = if layer.dot_slash {
            format!("./{}", e.path)
        } else {
            e.path.clone()
        };
        if e.kind == Kind::Dir && !path.ends_with('/') {
            path.push('/');
        }
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if e.mtime.1 != 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", e.mtime.0, e.mtime.1).into_bytes(),
            ));
        }
        for (k, v) in &e.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        if e.pax_path {
            pax.push(("path".into(), path.clone().into_bytes()));
        }
        // A sparse file: its PAX records, the name its header carries, and its stored bytes.
        let sparse_body = match &e.kind {
            Kind::Sparse { size, data, format } => {
                Some(sparse_records(&path, *size, data, *format, &mut pax))
            }
            _ => None,
        };
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(|x| io(&e.path, x))?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime.0);
        h.set_size(0);
        let (ty, data): (tar::EntryType, &[u8]) = match &e.kind {
            Kind::File(c) => (tar::EntryType::Regular, c),
            Kind::Dir => (tar::EntryType::Directory, &[]),
            Kind::Symlink(_) => (tar::EntryType::Symlink, &[]),
            Kind::Hardlink(_) => (tar::EntryType::Link, &[]),
            Kind::Fifo => (tar::EntryType::Fifo, &[]),
            Kind::CharDevice(..) => (tar::EntryType::Char, &[]),
            Kind::BlockDevice(..) => (tar::EntryType::Block, &[]),
            Kind::Sparse { .. } => (
                tar::EntryType::Regular,
                sparse_body.as_ref().map_or(&[][..], |(_, b)| b),
            ),
        };
        h.set_entry_type(ty);
        if let Kind::CharDevice(ma, mi) | Kind::BlockDevice(ma, mi) = e.kind {
            h.set_device_major(ma).map_err(|x| io(&e.path, x))?;
            h.set_device_minor(mi).map_err(|x| io(&e.path, x))?;
        }
        match &e.kind {
            Kind::Symlink(target) | Kind::Hardlink(target) => {
                let target = if layer.dot_slash && matches!(e.kind, Kind::Hardlink(_)) {
                    format!("./{target}")
                } else {
                    target.clone()
                };
                if e.pax_path {
                    set_raw_name(&mut h, &path);
                    h.set_link_name(&target).map_err(|x| io(&e.path, x))?;
                    h.set_cksum();
                    b.append(&h, data).map_err(|x| io(&e.path, x))?;
                } else {
                    b.append_link(&mut h, &path, &target)
                        .map_err(|x| io(&e.path, x))?;
                }
            }
            Kind::Sparse { .. } => {
                h.set_size(data.len() as u64);
                let name = sparse_body.as_ref().map_or(path.as_str(), |(n, _)| n);
                b.append_data(&mut h, name, data)
                    .map_err(|x| io(&e.path, x))?;
            }
            _ => {
                h.set_size(data.len() as u64);
                if e.pax_path {
                    set_raw_name(&mut h, &path);
                    h.set_cksum();
                    b.append(&h, data).map_err(|x| io(&e.path, x))?;
                } else {
                    b.append_data(&mut h, &path, data)
                        .map_err(|x| io(&e.path, x))?;
                }
            }
        }
    }
    b.into_inner().map_err(|x| io("(finish)", x))
}

/// Adds the PAX records GNU tar writes for a sparse file in `format` to `pax`; returns the name
/// its header carries and its stored bytes (the 1.0 map, padded to 512, then the data extents).
/// Like GNU tar, the map ends with an empty extent at the file's end.
fn sparse_records(
    path: &str,
    size: u64,
    data: &[(u64, Vec<u8>)],
    format: SparseFormat,
    pax: &mut Vec<(String, Vec<u8>)>,
) -> (String, Vec<u8>) {
    let mut extents: Vec<(u64, u64)> = data.iter().map(|(o, b)| (*o, b.len() as u64)).collect();
    extents.push((size, 0));
    let (dir, base) = path.rsplit_once('/').map_or(("", path), |(d, b)| (d, b));
    let hidden = if dir.is_empty() {
        format!("GNUSparseFile.0/{base}")
    } else {
        format!("{dir}/GNUSparseFile.0/{base}")
    };
    let mut rec = |k: &str, v: String| pax.push((k.to_owned(), v.into_bytes()));
    let mut body = Vec::new();
    let header_name = match format {
        SparseFormat::Pax00 => {
            rec("GNU.sparse.size", size.to_string());
            rec("GNU.sparse.numblocks", extents.len().to_string());
            for (o, l) in &extents {
                rec("GNU.sparse.offset", o.to_string());
                rec("GNU.sparse.numbytes", l.to_string());
            }
            path.to_owned()
        }
        SparseFormat::Pax01 => {
            rec("GNU.sparse.size", size.to_string());
            rec("GNU.sparse.numblocks", extents.len().to_string());
            rec("GNU.sparse.name", path.to_owned());
            let map: Vec<String> = extents
                .iter()
                .flat_map(|(o, l)| [o.to_string(), l.to_string()])
                .collect();
            rec("GNU.sparse.map", map.join(","));
            hidden
        }
        SparseFormat::Pax10 => {
            rec("GNU.sparse.major", "1".into());
            rec("GNU.sparse.minor", "0".into());
            rec("GNU.sparse.name", path.to_owned());
            rec("GNU.sparse.realsize", size.to_string());
            let mut map = format!("{}\n", extents.len());
            for (o, l) in &extents {
                for n in [o, l] {
                    map.push_str(&n.to_string());
                    map.push('\n');
                }
            }
            body.extend_from_slice(map.as_bytes());
            body.resize(body.len().next_multiple_of(512), 0);
            hidden
        }
    };
    for (_, bytes) in data {
        body.extend_from_slice(bytes);
    }
    (header_name, body)
}

/// Puts the first 99 bytes of `path` in the header's name field (the PAX record holds the rest).
fn set_raw_name(h: &mut tar::Header, path: &str) {
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    let n = path.len().min(99);
    name[..n].copy_from_slice(&path.as_bytes()[..n]);
}

fn split_points(len: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let step = len.div_ceil(parts).max(1);
    (0..len)
        .step_by(step)
        .map(|s| (s, (s + step).min(len)))
        .collect::<Vec<_>>()
}

/// Compresses a tar stream as the layer asks.
pub fn compress(tar: &[u8], c: Compression) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::InvalidImage(format!("compressing a layer: {e}"));
    let gzip = |data: &[u8]| -> Result<Vec<u8>> {
        let mut enc = GzEncoder::new(Vec::new(), GzLevel::new(6));
        enc.write_all(data).map_err(io)?;
        enc.finish().map_err(io)
    };
    let zstd = |data: &[u8]| zstd::bulk::compress(data, 3).map_err(io);
    Ok(match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => gzip(tar)?,
        Compression::Zstd => zstd(tar)?,
        Compression::GzipMultiMember(n) => {
            let mut out = Vec::new();
            for (s, e) in split_points(tar.len(), n) {
                out.extend(gzip(&tar[s..e])?);
            }
            out
        }
        Compression::ZstdMultiFrame(n) => {
            let mut out = Vec::new();
            for (s, e) in split_points(tar.len(), n) {
                out.extend(zstd(&tar[s..e])?);
            }
            out
        }
        Compression::EStargz(chunk) => crate::estargz::build(tar, chunk)?.blob,
        Compression::ZstdChunked => crate::zstd_chunked::build(tar)?.blob,
    })
}
