//! The v1 writers: a data-carrying archive streamed to disk file by file ([`V1Writer`]), and the
//! small metadata archive that points at such an archive's data in object storage
//! ([`write_v1_remote`]). Both publish atomically, like every writer.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ArchiveKind;
use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::read::Archive;
use crate::spec::{SECTION_UNCHECKED, SectionId, checksum};
use crate::tree::{NodeKind, Tree};
use crate::write::{
    FileLoc, Section, WriteSummary, assemble, build_index, header, header_len, io, meta_json,
    persist, publish_bytes, resolve_links, temp_beside,
};

/// Streams a v1 local (data-carrying) archive: file data first, index last.
///
/// Call [`V1Writer::add_file`] for every regular file with data (in any order), then
/// [`V1Writer::finish`] with the tree. Memory stays bounded: data goes straight to disk.
pub struct V1Writer {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
    out: BufWriter<File>,
    data_start: u64,
    cursor: u64,
    located: HashMap<usize, (u64, u64, [u8; 32])>,
}

/// Sections of a v1 local archive.
const V1_LOCAL_SECTIONS: usize = 7;

impl V1Writer {
    /// Starts writing the archive that will be published at `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_beside(path)?;
        let file = tmp.reopen().map_err(|e| io("opening", tmp.path(), e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let data_start = header_len(V1_LOCAL_SECTIONS) as u64;
        out.write_all(&vec![0u8; header_len(V1_LOCAL_SECTIONS)])
            .map_err(|e| io("writing", tmp.path(), e))?;
        Ok(Self {
            path: path.to_owned(),
            tmp,
            out,
            data_start,
            cursor: 0,
            located: HashMap::new(),
        })
    }

    /// Appends the content of tree node `node`; returns its length and sha256.
    pub fn add_file(&mut self, node: usize, mut reader: impl Read) -> Result<(u64, [u8; 32])> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let start = self.cursor;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| io("reading file data for", &self.path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            self.out
                .write_all(&buf[..n])
                .map_err(|e| io("writing", self.tmp.path(), e))?;
            self.cursor += n as u64;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let len = self.cursor - start;
        self.located.insert(node, (start, len, digest));
        Ok((len, digest))
    }

    /// Writes the index, the header, and publishes the archive.
    pub fn finish(mut self, tree: &Tree, meta: &Meta) -> Result<WriteSummary> {
        let canon = resolve_links(tree)?;
        let mut digests: Vec<u8> = Vec::new();
        let mut digest_index: HashMap<usize, u32> = HashMap::new();
        let empty: [u8; 32] = Sha256::digest(b"").into();
        let located = &self.located;
        let index = build_index(tree, &canon, &mut |id| {
            let size = match tree.node(id).map(|n| &n.kind) {
                Some(NodeKind::File { size, .. }) => *size,
                _ => 0,
            };
            let (offset, len, digest) = match located.get(&id) {
                Some(l) => *l,
                None if size == 0 => (0, 0, empty),
                None => {
                    return Err(Error::InvalidTree(format!(
                        "no data was written for {}",
                        String::from_utf8_lossy(&tree.path_of(id))
                    )));
                }
            };
            if len != size {
                return Err(Error::InvalidTree(format!(
                    "{} is {size} bytes in the tree but {len} bytes of data were written",
                    String::from_utf8_lossy(&tree.path_of(id))
                )));
            }
            let next = u32::try_from(digest_index.len())
                .map_err(|_| Error::InvalidTree("too many files".into()))?;
            let di = *digest_index.entry(id).or_insert_with(|| {
                digests.extend_from_slice(&digest);
                next
            });
            Ok(FileLoc::V1 {
                digest_index: di,
                offset,
            })
        })?;
        let data_len = self.cursor;
        let mut sections = index.into_sections();
        sections.extend([
            Section {
                id: SectionId::DIGESTS,
                bytes: digests,
            },
            Section {
                id: SectionId::META,
                bytes: meta_json(meta)?,
            },
        ]);
        let w = |e| io("writing", self.tmp.path(), e);
        let mut off = (self.data_start + data_len).next_multiple_of(8);
        let pad = off - (self.data_start + data_len);
        self.out
            .write_all(&vec![0u8; usize::try_from(pad).unwrap_or(0)])
            .map_err(w)?;
        let mut rows = vec![(
            SectionId::DATA,
            SECTION_UNCHECKED,
            self.data_start,
            data_len,
            0,
        )];
        for s in &sections {
            rows.push((s.id, 0, off, s.bytes.len() as u64, checksum(&s.bytes)));
            self.out.write_all(&s.bytes).map_err(w)?;
            let end = off + s.bytes.len() as u64;
            let next = end.next_multiple_of(8);
            self.out
                .write_all(&vec![0u8; usize::try_from(next - end).unwrap_or(0)])
                .map_err(w)?;
            off = next;
        }
        let index_bytes = off - data_len;
        let hdr = header(ArchiveKind::V1Local, &rows, off);
        self.out.seek(SeekFrom::Start(0)).map_err(w)?;
        self.out.write_all(&hdr).map_err(w)?;
        self.out.flush().map_err(w)?;
        drop(self.out);
        // Validate before publishing.
        let archive = Archive::open(self.tmp.path())?;
        let entries = archive.len();
        drop(archive);
        persist(self.tmp, &self.path)?;
        Ok(WriteSummary {
            kind: ArchiveKind::V1Local,
            entries,
            bytes: off,
            index_bytes,
        })
    }
}

/// Writes the small v1-remote archive for `local` (a v1 local archive) whose bytes were uploaded
/// to `url`: the same index, no data, and a pointer to the data region inside the object.
pub fn write_v1_remote(local: &Archive, url: &str, path: &Path) -> Result<WriteSummary> {
    if local.kind() != ArchiveKind::V1Local {
        return Err(Error::WrongKind {
            operation: "making a v1-remote archive",
            needed: "v1-local",
            found: local.kind(),
        });
    }
    let data = local
        .section_info(SectionId::DATA)
        .ok_or_else(|| Error::InvalidTree("no data section".into()))?;
    let mut meta = local.meta().clone();
    meta.remote = Some(crate::meta::Remote {
        url: url.to_owned(),
        size: local.as_bytes().len() as u64,
        data_offset: data.offset,
        data_length: data.length,
    });
    let copy = |id| Section {
        id,
        bytes: local.section(id).to_vec(),
    };
    let sections = [
        copy(SectionId::STRINGS),
        copy(SectionId::ENTRIES),
        copy(SectionId::ATTRS),
        copy(SectionId::XATTRS),
        copy(SectionId::DIGESTS),
        Section {
            id: SectionId::META,
            bytes: meta_json(&meta)?,
        },
    ];
    let bytes = assemble(ArchiveKind::V1Remote, &sections);
    let archive = Archive::from_bytes(bytes)?;
    publish_bytes(path, archive.as_bytes())?;
    let total = archive.as_bytes().len() as u64;
    Ok(WriteSummary {
        kind: ArchiveKind::V1Remote,
        entries: archive.len(),
        bytes: total,
        index_bytes: total,
    })
}
