//! An eStargz writer for test images, following the layout of containerd/stargz-snapshotter's
//! `estargz` package: every chunk of a regular file's data starts a new gzip member, so a reader
//! can fetch one file with one range request; the tar stream ends with a `stargz.index.json`
//! entry (the table of contents, in its own member) and a 51-byte footer member whose gzip extra
//! field holds the TOC's compressed offset. The TOC digest goes into the layer descriptor's
//! `containerd.io/snapshot/stargz/toc.digest` annotation.
//!
//! The blob is an ordinary gzip tar to every other tool (umoci unpacks it, and the
//! `stargz.index.json` file appears in the unpacked tree as it would with any conventional
//! unpacker).

use std::io::{Read as _, Write as _};

use base64::Engine as _;
use flate2::Compression as GzLevel;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The TOC digest annotation of an eStargz layer descriptor.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The TOC's name in the tar stream.
pub const TOC_NAME: &str = "stargz.index.json";

/// An eStargz blob.
#[derive(Debug, Clone)]
pub struct EStargz {
    /// The gzip blob.
    pub blob: Vec<u8>,
    /// Its uncompressed tar stream (what the `diff_id` names).
    pub tar: Vec<u8>,
    /// `sha256:` digest of the TOC JSON.
    pub toc_digest: String,
}

struct Members {
    blob: Vec<u8>,
    tar: Vec<u8>,
    cur: Vec<u8>,
}

impl Members {
    fn close(&mut self) -> Result<()> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let io = |e: std::io::Error| Error::InvalidImage(format!("eStargz: {e}"));
        let mut enc = GzEncoder::new(Vec::new(), GzLevel::new(6));
        enc.write_all(&self.cur).map_err(io)?;
        self.blob.extend(enc.finish().map_err(io)?);
        self.tar.append(&mut self.cur);
        Ok(())
    }
}

/// The TOC fields shared by eStargz and zstd:chunked for one tar entry: name, type, times, mode,
/// owner, link target, device numbers, xattrs (base64) and, for regular files, size; and the
/// entry's cleaned name (no `./`, leading or trailing `/`).
pub(crate) fn toc_entry<R: std::io::Read>(
    entry: &mut tar::Entry<'_, R>,
) -> std::io::Result<(serde_json::Value, String)> {
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    let name = name.trim_start_matches("./").trim_start_matches('/');
    let name = name.trim_end_matches('/').to_owned();
    let link = entry
        .link_name_bytes()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default();
    let h = entry.header().clone();
    let ty = h.entry_type();
    let mut xattrs = serde_json::Map::new();
    let mut mtime = h.mtime().unwrap_or(0);
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Some(k) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                xattrs.insert(
                    String::from_utf8_lossy(k).into_owned(),
                    base64::engine::general_purpose::STANDARD
                        .encode(ext.value_bytes())
                        .into(),
                );
            } else if ext.key_bytes() == b"mtime" {
                let v = String::from_utf8_lossy(ext.value_bytes()).into_owned();
                mtime = v
                    .split('.')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(mtime);
            }
        }
    }
    let kind = match ty {
        tar::EntryType::Directory => "dir",
        tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hardlink",
        tar::EntryType::Char => "char",
        tar::EntryType::Block => "block",
        tar::EntryType::Fifo => "fifo",
        _ => "",
    };
    let mut e = serde_json::json!({
        "name": name,
        "type": kind,
        "modtime": crate::token::format_rfc3339(mtime),
        "mode": h.mode().unwrap_or(0),
        "uid": h.uid().unwrap_or(0),
        "gid": h.gid().unwrap_or(0),
    });
    if !link.is_empty() {
        e["linkName"] = link.into();
    }
    if matches!(ty, tar::EntryType::Char | tar::EntryType::Block) {
        e["devMajor"] = h.device_major().ok().flatten().unwrap_or(0).into();
        e["devMinor"] = h.device_minor().ok().flatten().unwrap_or(0).into();
    }
    if !xattrs.is_empty() {
        e["xattrs"] = xattrs.into();
    }
    if kind == "reg" {
        e["size"] = entry.size().into();
    }
    Ok((e, name))
}

/// Converts a tar stream into an eStargz blob with data chunks of at most `chunk` bytes.
pub fn build(input: &[u8], chunk: usize) -> Result<EStargz> {
    let bad = |e: std::io::Error| Error::InvalidImage(format!("eStargz input tar: {e}"));
    let chunk = chunk.max(1);
    let mut m = Members {
        blob: Vec::new(),
        tar: Vec::new(),
        cur: Vec::new(),
    };
    let mut toc = Vec::new();
    let mut archive = tar::Archive::new(input);
    let mut prev_end = 0usize;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let data_at = usize::try_from(entry.raw_file_position()).unwrap_or(usize::MAX);
        let size = usize::try_from(entry.size()).unwrap_or(usize::MAX);
        let (mut e, name) = toc_entry(&mut entry).map_err(bad)?;
        let kind = e["type"].as_str().unwrap_or("").to_owned();
        let kind = kind.as_str();
        let mut data = Vec::with_capacity(size.min(1 << 24));
        entry.read_to_end(&mut data).map_err(bad)?;
        // The entry's header blocks (PAX and long-name headers included), copied as they are.
        m.cur.extend_from_slice(&input[prev_end..data_at]);
        if kind == "reg" {
            e["digest"] = format!("sha256:{}", hex::encode(Sha256::digest(&data))).into();
            for (k, part) in data.chunks(chunk).enumerate() {
                m.close()?;
                let fields = serde_json::json!({
                    "offset": m.blob.len(),
                    "chunkOffset": k * chunk,
                    "chunkSize": part.len(),
                    "chunkDigest": format!("sha256:{}", hex::encode(Sha256::digest(part))),
                });
                m.cur.extend_from_slice(part);
                if k == 0 {
                    if let (Some(t), serde_json::Value::Object(f)) = (e.as_object_mut(), fields) {
                        t.extend(f);
                    }
                    toc.push(e.clone());
                } else {
                    let mut c = serde_json::json!({"name": name, "type": "chunk"});
                    if let (Some(t), serde_json::Value::Object(f)) = (c.as_object_mut(), fields) {
                        t.extend(f);
                    }
                    toc.push(c);
                }
            }
            if data.is_empty() {
                toc.push(e);
            }
        } else {
            // Other entries' data (e.g. a PAX global header's records) stays as it is.
            m.cur.extend_from_slice(&data);
            if !kind.is_empty() {
                toc.push(e);
            }
        }
        let end = data_at + size;
        let padded = end.div_ceil(512) * 512;
        m.cur.resize(m.cur.len() + (padded - end), 0);
        prev_end = padded;
    }
    m.close()?;
    let json = serde_json::to_vec_pretty(&serde_json::json!({"version": 1, "entries": toc}))
        .map_err(|e| Error::InvalidImage(e.to_string()))?;
    let toc_digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    let toc_offset = m.blob.len();
    let mut tb = tar::Builder::new(Vec::new());
    let mut th = tar::Header::new_ustar();
    th.set_entry_type(tar::EntryType::Regular);
    th.set_size(json.len() as u64);
    th.set_mode(0o644);
    th.set_mtime(0);
    th.set_uid(0);
    th.set_gid(0);
    tb.append_data(&mut th, TOC_NAME, &json[..])
        .map_err(|e| Error::InvalidImage(e.to_string()))?;
    m.cur = tb
        .into_inner()
        .map_err(|e| Error::InvalidImage(e.to_string()))?;
    m.close()?;
    m.blob.extend(footer(toc_offset as u64));
    Ok(EStargz {
        blob: m.blob,
        tar: m.tar,
        toc_digest,
    })
}

/// The 51-byte eStargz footer: an empty gzip member whose extra field names the TOC offset.
#[must_use]
pub fn footer(toc_offset: u64) -> Vec<u8> {
    let sub = format!("{toc_offset:016x}STARGZ");
    let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff];
    let xlen = u16::try_from(sub.len() + 4).unwrap_or(0);
    f.extend_from_slice(&xlen.to_le_bytes());
    f.extend_from_slice(b"SG");
    f.extend_from_slice(&u16::try_from(sub.len()).unwrap_or(0).to_le_bytes());
    f.extend_from_slice(sub.as_bytes());
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff]); // final empty stored block
    f.extend_from_slice(&[0; 8]); // CRC32 and ISIZE of nothing
    f
}

/// Reads a blob back as one tar stream (all members).
pub fn gunzip(blob: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut out)
        .map_err(|e| Error::InvalidImage(format!("eStargz: {e}")))?;
    Ok(out)
}
