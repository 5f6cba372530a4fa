//! Writers: the shared index and file assembly, and v2 OCI (index only); the v1 writers are in
//! `write_v1`.
//!
//! Every writer publishes atomically: it writes a temp file beside the destination, fsyncs it,
//! renames it into place and fsyncs the directory, so readers never see a partial archive.

use std::collections::HashMap;
use std::path::Path;

use crate::ArchiveKind;
use crate::error::{Error, Result};
use crate::meta::{Checkpoint, LayerInfo, Meta};
use crate::read::Archive;
use crate::spec::{
    FORMAT_VERSION, HEADER_FIXED, MAGIC, MAX_STRING, SECTION_ROW, SectionId, checksum, put_varint,
};
use crate::tree::{NodeKind, Tree};

/// Deduplicating string table.
#[derive(Default)]
struct Strings {
    buf: Vec<u8>,
    map: HashMap<Vec<u8>, u32>,
}

impl Strings {
    fn add(&mut self, s: &[u8]) -> Result<u32> {
        if let Some(&o) = self.map.get(s) {
            return Ok(o);
        }
        let len = u32::try_from(s.len())
            .ok()
            .filter(|l| *l <= MAX_STRING)
            .ok_or_else(|| {
                Error::InvalidTree(format!("string of {} bytes is too long", s.len()))
            })?;
        let off = u32::try_from(self.buf.len())
            .map_err(|_| Error::InvalidTree("string table exceeds 4 GiB".into()))?;
        put_varint(&mut self.buf, len);
        self.buf.extend_from_slice(s);
        self.map.insert(s.to_vec(), off);
        Ok(off)
    }
}

/// Where a file's data is, as the writer records it.
#[derive(Clone, Copy)]
pub(crate) enum FileLoc {
    V1 {
        digest_index: u32,
        offset: u64,
    },
    /// `sparse`: 0, or 1 + the index of the file's map header record in SPARSE.
    V2 {
        layer: u32,
        offset: u64,
        sparse: u32,
    },
}

pub(crate) struct Index {
    strings: Strings,
    entries: Vec<u8>,
    attrs: Vec<u8>,
    xattrs: Vec<u8>,
}

impl Index {
    /// The sections every archive kind carries: strings, entries, attrs, xattrs.
    pub(crate) fn into_sections(self) -> Vec<Section> {
        vec![
            Section {
                id: SectionId::STRINGS,
                bytes: self.strings.buf,
            },
            Section {
                id: SectionId::ENTRIES,
                bytes: self.entries,
            },
            Section {
                id: SectionId::ATTRS,
                bytes: self.attrs,
            },
            Section {
                id: SectionId::XATTRS,
                bytes: self.xattrs,
            },
        ]
    }
}

/// Follows hard links to the file node they name.
pub(crate) fn resolve_links(tree: &Tree) -> Result<HashMap<usize, usize>> {
    let mut canon = HashMap::new();
    for id in tree.breadth_first() {
        let Some(node) = tree.node(id) else { continue };
        let NodeKind::HardLink(_) = node.kind else {
            continue;
        };
        let mut cur = id;
        for _ in 0..64 {
            let Some(NodeKind::HardLink(target)) = tree.node(cur).map(|n| &n.kind) else {
                break;
            };
            cur = tree.lookup(target).ok_or_else(|| {
                Error::InvalidTree(format!(
                    "hard link {} points at missing {}",
                    String::from_utf8_lossy(&tree.path_of(id)),
                    String::from_utf8_lossy(target)
                ))
            })?;
        }
        match tree.node(cur).map(|n| &n.kind) {
            Some(NodeKind::File { .. }) => {
                canon.insert(id, cur);
            }
            _ => {
                return Err(Error::InvalidTree(format!(
                    "hard link {} does not resolve to a regular file",
                    String::from_utf8_lossy(&tree.path_of(id))
                )));
            }
        }
    }
    Ok(canon)
}

// Over 100 lines on purpose: builds the entry table in one ordered walk of the tree
// (entry numbering, string table, attribute dedup, xattrs); the walk's running state
// would otherwise be threaded through several functions.
pub(crate) fn build_index(
    tree: &Tree,
    canon: &HashMap<usize, usize>,
    loc: &mut dyn FnMut(usize) -> Result<FileLoc>,
) -> Result<Index> {
    let order = tree.breadth_first();
    let index_of: HashMap<usize, u32> = order
        .iter()
        .enumerate()
        .map(|(i, id)| u32::try_from(i).map(|i| (*id, i)))
        .collect::<Result<_, _>>()
        .map_err(|_| Error::InvalidTree("more than 2^32 entries".into()))?;
    let canonical = |id: usize| canon.get(&id).copied().unwrap_or(id);
    let mut links: HashMap<usize, u32> = HashMap::new();
    for &id in &order {
        if matches!(
            tree.node(canonical(id)).map(|n| &n.kind),
            Some(NodeKind::File { .. })
        ) {
            *links.entry(canonical(id)).or_default() += 1;
        }
    }
    let mut inode: HashMap<usize, u32> = HashMap::new();
    let mut strings = Strings::default();
    strings.add(b"")?;
    let mut entries = Vec::with_capacity(order.len() * crate::spec::ENTRY_SIZE);
    let mut attrs = Vec::new();
    let mut attr_ids: HashMap<(u32, u32, u32, u32, i64, u32), u32> = HashMap::new();
    let mut xattrs = Vec::new();

    for &id in &order {
        let node = tree
            .node(id)
            .ok_or_else(|| Error::InvalidTree("dangling node".into()))?;
        let cid = canonical(id);
        let cnode = tree
            .node(cid)
            .ok_or_else(|| Error::InvalidTree("dangling link".into()))?;
        let next_ino = u32::try_from(inode.len() + 1)
            .map_err(|_| Error::InvalidTree("too many inodes".into()))?;
        let ino = *inode.entry(cid).or_insert(next_ino);
        let (nlink, a, b, c, size): (u32, u32, u32, u64, u64) = match &cnode.kind {
            NodeKind::Dir => {
                let subdirs = cnode
                    .children
                    .values()
                    .filter(|k| tree.node(**k).is_some_and(|n| n.kind == NodeKind::Dir))
                    .count();
                let first = cnode.children.values().next().map_or(0, |k| index_of[k]);
                let count = u32::try_from(cnode.children.len()).unwrap_or(u32::MAX);
                (
                    u32::try_from(subdirs + 2).unwrap_or(u32::MAX),
                    first,
                    count,
                    0,
                    0,
                )
            }
            NodeKind::File { size, .. } => {
                let (a, b, c) = match loc(cid)? {
                    FileLoc::V1 {
                        digest_index,
                        offset,
                    } => (digest_index, 0, offset),
                    FileLoc::V2 {
                        layer,
                        offset,
                        sparse,
                    } => (layer, sparse, offset),
                };
                (links[&cid], a, b, c, *size)
            }
            NodeKind::Symlink(t) => (1, strings.add(t)?, 0, 0, t.len() as u64),
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                (1, *major, *minor, 0, 0)
            }
            NodeKind::Fifo | NodeKind::Socket => (1, 0, 0, 0, 0),
            NodeKind::HardLink(_) => return Err(Error::InvalidTree("unresolved hard link".into())),
        };
        let m = &cnode.meta;
        if m.mtime_nsec >= 1_000_000_000 {
            return Err(Error::InvalidTree("mtime nanoseconds out of range".into()));
        }
        let st_mode = cnode.kind.type_bits() | (m.mode & 0o7777);
        let key = (st_mode, m.uid, m.gid, nlink, m.mtime_sec, m.mtime_nsec);
        let next_attr = u32::try_from(attr_ids.len())
            .map_err(|_| Error::InvalidTree("too many attrs".into()))?;
        let attr = *attr_ids.entry(key).or_insert_with(|| {
            attrs.extend_from_slice(&st_mode.to_le_bytes());
            attrs.extend_from_slice(&m.uid.to_le_bytes());
            attrs.extend_from_slice(&m.gid.to_le_bytes());
            attrs.extend_from_slice(&nlink.to_le_bytes());
            attrs.extend_from_slice(&m.mtime_sec.to_le_bytes());
            attrs.extend_from_slice(&m.mtime_nsec.to_le_bytes());
            attrs.extend_from_slice(&0u32.to_le_bytes());
            next_attr
        });
        let name = strings.add(&node.name)?;
        let parent = index_of[&node.parent];
        entries.extend_from_slice(&name.to_le_bytes());
        entries.extend_from_slice(&parent.to_le_bytes());
        entries.extend_from_slice(&attr.to_le_bytes());
        entries.extend_from_slice(&ino.to_le_bytes());
        entries.extend_from_slice(&size.to_le_bytes());
        entries.extend_from_slice(&a.to_le_bytes());
        entries.extend_from_slice(&b.to_le_bytes());
        entries.extend_from_slice(&c.to_le_bytes());

        // A name given twice keeps its last value, as with repeated PAX records.
        let xs: std::collections::BTreeMap<&[u8], &[u8]> = m
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        for (k, v) in xs {
            if k.is_empty() {
                return Err(Error::InvalidTree("empty xattr name".into()));
            }
            xattrs.extend_from_slice(&index_of[&id].to_le_bytes());
            xattrs.extend_from_slice(&strings.add(k)?.to_le_bytes());
            xattrs.extend_from_slice(&strings.add(v)?.to_le_bytes());
        }
    }
    Ok(Index {
        strings,
        entries,
        attrs,
        xattrs,
    })
}

pub(crate) fn meta_json(meta: &Meta) -> Result<Vec<u8>> {
    serde_json::to_vec(meta).map_err(|e| Error::InvalidMeta(e.to_string()))
}

pub(crate) struct Section {
    pub(crate) id: SectionId,
    pub(crate) bytes: Vec<u8>,
}

pub(crate) fn header_len(sections: usize) -> usize {
    (HEADER_FIXED + SECTION_ROW * sections + 8).next_multiple_of(8)
}

/// A section table row: id, flags, offset, length, checksum.
type Row = (SectionId, u32, u64, u64, u64);

pub(crate) fn header(kind: ArchiveKind, rows: &[Row], total: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(header_len(rows.len()));
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.push(kind.code());
    h.push(0);
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&u32::try_from(rows.len()).unwrap_or(u32::MAX).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&total.to_le_bytes());
    for (id, flags, off, len, sum) in rows {
        h.extend_from_slice(&id.0.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&sum.to_le_bytes());
    }
    let sum = checksum(&h);
    h.extend_from_slice(&sum.to_le_bytes());
    h.resize(header_len(rows.len()), 0);
    h
}

/// Serialises an archive whose sections are all in memory.
pub(crate) fn assemble(kind: ArchiveKind, sections: &[Section]) -> Vec<u8> {
    let mut off = header_len(sections.len()) as u64;
    let mut rows = Vec::new();
    for s in sections {
        rows.push((s.id, 0, off, s.bytes.len() as u64, checksum(&s.bytes)));
        off = (off + s.bytes.len() as u64).next_multiple_of(8);
    }
    let mut out = header(kind, &rows, off);
    for s in sections {
        out.extend_from_slice(&s.bytes);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

pub(crate) fn io(context: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        context,
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    Ok(clip_host::temp_beside(path)?)
}

pub(crate) fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    Ok(clip_host::persist(tmp, path)?)
}

pub(crate) fn publish_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(clip_host::publish_bytes(path, bytes)?)
}

/// What a writer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    /// Archive kind.
    pub kind: ArchiveKind,
    /// Entries in the index.
    pub entries: usize,
    /// Total archive size.
    pub bytes: u64,
    /// Size of everything but file data and checkpoint windows.
    pub index_bytes: u64,
}

/// Appends `map` to the SPARSE section bytes (a head record `(extent count, 0)`, then the
/// extents); returns the entry's `b` for it: 1 + the head record's index.
fn append_sparse_map(bytes: &mut Vec<u8>, map: &crate::sparse::SparseMap) -> Result<u32> {
    let record = u32::try_from(bytes.len() / crate::spec::SPARSE_SIZE + 1)
        .map_err(|_| Error::InvalidTree("too many sparse extents".into()))?;
    bytes.extend_from_slice(&(map.extents().len() as u64).to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    for e in map.extents() {
        bytes.extend_from_slice(&e.offset.to_le_bytes());
        bytes.extend_from_slice(&e.length.to_le_bytes());
    }
    Ok(record)
}

/// Writes a v2 (index-only) archive of `tree`, whose files carry [`crate::tree::LayerSpan`]s.
// Over 100 lines on purpose: the v2 writer lays out the sections in the order docs/format.md
// specifies them, each offset following from the previous; one function keeps that order visible.
pub fn write_v2(
    path: &Path,
    tree: &Tree,
    meta: &Meta,
    layers: &[LayerInfo],
    checkpoints: &[Vec<Checkpoint>],
) -> Result<WriteSummary> {
    let source = meta
        .source
        .as_ref()
        .ok_or_else(|| Error::InvalidMeta("a v2 archive needs a source".into()))?;
    if source.manifest_digest.algorithm() != "sha256" {
        return Err(Error::InvalidMeta(
            "the source must be pinned by a sha256 manifest digest".into(),
        ));
    }
    if checkpoints.len() != layers.len() {
        return Err(Error::InvalidTree(
            "one checkpoint list per layer is needed".into(),
        ));
    }
    let canon = resolve_links(tree)?;
    // Sparse maps, once per inode (the writer is asked once per name).
    let mut sparse_bytes: Vec<u8> = Vec::new();
    let mut sparse_of: HashMap<usize, u32> = HashMap::new();
    let mut index = build_index(
        tree,
        &canon,
        &mut |id| match tree.node(id).map(|n| &n.kind) {
            Some(NodeKind::File {
                size,
                span: Some(s),
            }) => {
                let sparse = match &s.sparse {
                    None => 0,
                    Some(map) if map.size() != *size => {
                        return Err(Error::InvalidTree(format!(
                            "sparse map of {} is for {} bytes, the file has {size}",
                            String::from_utf8_lossy(&tree.path_of(id)),
                            map.size()
                        )));
                    }
                    Some(map) => {
                        if let Some(r) = sparse_of.get(&id) {
                            *r
                        } else {
                            let r = append_sparse_map(&mut sparse_bytes, map)?;
                            sparse_of.insert(id, r);
                            r
                        }
                    }
                };
                Ok(FileLoc::V2 {
                    layer: s.layer,
                    offset: s.offset,
                    sparse,
                })
            }
            Some(NodeKind::File { size: 0, .. }) => Ok(FileLoc::V2 {
                layer: 0,
                offset: 0,
                sparse: 0,
            }),
            _ => Err(Error::InvalidTree(format!(
                "file {} has no layer location",
                String::from_utf8_lossy(&tree.path_of(id))
            ))),
        },
    )?;
    let mut layer_bytes = Vec::new();
    let mut cp_bytes = Vec::new();
    let mut windows = Vec::new();
    let mut first = 0u32;
    for (l, cps) in layers.iter().zip(checkpoints) {
        let count = u32::try_from(cps.len())
            .map_err(|_| Error::InvalidTree("too many checkpoints".into()))?;
        let chained = cps.first().is_some_and(|c| c.chain_head.is_some());
        if cps.iter().any(|c| {
            c.chain_head.as_ref().map_or(chained, |h| {
                !chained || h.len() as u64 != c.uncompressed_offset % 64
            })
        }) {
            return Err(Error::InvalidTree(format!(
                "layer {} mixes chained and plain checkpoints, or has a chain head of the wrong length",
                l.digest
            )));
        }
        layer_bytes.extend_from_slice(
            &index
                .strings
                .add(l.digest.as_str().as_bytes())?
                .to_le_bytes(),
        );
        layer_bytes.extend_from_slice(
            &index
                .strings
                .add(l.diff_id.as_str().as_bytes())?
                .to_le_bytes(),
        );
        layer_bytes.push(l.media.code());
        layer_bytes.push(
            u8::from(l.single_frame) | (u8::from(l.toc_indexed) << 1) | (u8::from(chained) << 2),
        );
        layer_bytes.extend_from_slice(&0u16.to_le_bytes());
        layer_bytes.extend_from_slice(&first.to_le_bytes());
        layer_bytes.extend_from_slice(&count.to_le_bytes());
        layer_bytes.extend_from_slice(&0u32.to_le_bytes());
        layer_bytes.extend_from_slice(&l.compressed_size.to_le_bytes());
        layer_bytes.extend_from_slice(&l.uncompressed_size.to_le_bytes());
        layer_bytes.extend_from_slice(&l.span_size.to_le_bytes());
        first = first
            .checked_add(count)
            .ok_or_else(|| Error::InvalidTree("too many checkpoints".into()))?;
        for cp in cps {
            let woff = u32::try_from(windows.len())
                .map_err(|_| Error::InvalidTree("windows exceed 4 GiB".into()))?;
            let wlen = u32::try_from(cp.window.len())
                .map_err(|_| Error::InvalidTree("window too large".into()))?;
            windows.extend_from_slice(&cp.window);
            windows.extend_from_slice(cp.chain_head.as_deref().unwrap_or_default());
            cp_bytes.extend_from_slice(&cp.compressed_offset.to_le_bytes());
            cp_bytes.extend_from_slice(&cp.uncompressed_offset.to_le_bytes());
            cp_bytes.extend_from_slice(&woff.to_le_bytes());
            cp_bytes.extend_from_slice(&wlen.to_le_bytes());
            cp_bytes.push(cp.bits);
            cp_bytes.push(cp.kind.code());
            cp_bytes.extend_from_slice(&[0u8; 6]);
            cp_bytes.extend_from_slice(&cp.span_digest);
        }
    }
    let mut sections = index.into_sections();
    sections.extend([
        Section {
            id: SectionId::LAYERS,
            bytes: layer_bytes,
        },
        Section {
            id: SectionId::CHECKPOINTS,
            bytes: cp_bytes,
        },
        Section {
            id: SectionId::WINDOWS,
            bytes: windows,
        },
        Section {
            id: SectionId::META,
            bytes: meta_json(meta)?,
        },
    ]);
    if !sparse_bytes.is_empty() {
        sections.push(Section {
            id: SectionId::SPARSE,
            bytes: sparse_bytes,
        });
    }
    let window_len = sections
        .iter()
        .find(|s| s.id == SectionId::WINDOWS)
        .map_or(0, |s| s.bytes.len() as u64);
    let bytes = assemble(ArchiveKind::V2Oci, &sections);
    // Validate what we are about to publish with the reader's own checks.
    let archive = Archive::from_bytes(bytes)?;
    publish_bytes(path, archive.as_bytes())?;
    let total = archive.as_bytes().len() as u64;
    Ok(WriteSummary {
        kind: ArchiveKind::V2Oci,
        entries: archive.len(),
        bytes: total,
        index_bytes: total - window_len,
    })
}
