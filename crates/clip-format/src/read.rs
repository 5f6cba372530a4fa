//! The reader: open (mmap or bytes), validate once (`validate`), then zero-copy lookups
//! (`entry`).

use std::path::Path;

use crate::ArchiveKind;
pub(crate) use crate::entry::{Entry, Raw};
use crate::error::{Error, Result, section_err};
use crate::meta::{Checkpoint, CheckpointKind, LayerInfo, MediaKind, Meta};
use crate::sparse::SparseMap;
use crate::spec::{
    CHECKPOINT_SIZE, ENTRY_SIZE, FORMAT_VERSION, HEADER_FIXED, LAYER_SIZE, MAGIC, MAX_SECTIONS,
    MAX_STRING, SECTION_ROW, SECTION_UNCHECKED, SPARSE_SIZE, SectionId, checksum, mode, u16_at,
    u32_at, u64_at, varint_at,
};

pub(crate) enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// One row of the section table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionInfo {
    /// Which section.
    pub id: SectionId,
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// xxh3-64 of the section (0 when unchecked).
    pub checksum: u64,
    /// Whether the checksum covers the section.
    pub checked: bool,
}

/// An opened, validated archive. All accessors read the underlying bytes in place.
pub struct Archive {
    pub(crate) backing: Backing,
    pub(crate) kind: ArchiveKind,
    pub(crate) sections: Vec<SectionInfo>,
    pub(crate) ranges: [(usize, usize); 12],
    pub(crate) meta: Meta,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("kind", &self.kind)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum EntryKind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

impl EntryKind {
    pub(crate) fn from_mode(m: u32) -> Option<Self> {
        Some(match m & mode::S_IFMT {
            mode::S_IFDIR => Self::Dir,
            mode::S_IFREG => Self::File,
            mode::S_IFLNK => Self::Symlink,
            mode::S_IFCHR => Self::CharDevice,
            mode::S_IFBLK => Self::BlockDevice,
            mode::S_IFIFO => Self::Fifo,
            mode::S_IFSOCK => Self::Socket,
            _ => return None,
        })
    }
}

/// Where a file's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLocation {
    /// v1: `length` bytes at `offset` of the data region, with their sha256.
    V1 {
        /// Offset relative to the data region.
        offset: u64,
        /// Length.
        length: u64,
        /// sha256 of the content.
        sha256: [u8; 32],
    },
    /// v2: `length` bytes at `offset` of layer `layer`'s uncompressed stream; for a sparse
    /// file, its data extents stored back to back from `offset` ([`Entry::sparse_map`]).
    V2 {
        /// Layer index.
        layer: u32,
        /// Offset in the uncompressed layer.
        offset: u64,
        /// Length (the logical file size).
        length: u64,
        /// The file is sparse: only its data extents are stored.
        sparse: bool,
    },
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Archive {
    /// Memory-maps and validates the archive at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |context, source| Error::Io {
            context,
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(|e| io("opening", e))?;
        let len = file
            .metadata()
            .map_err(|e| io("reading metadata of", e))?
            .len();
        if len == 0 {
            return Self::from_backing(Backing::Owned(Vec::new()));
        }
        // SAFETY: the mapping is read-only and private to this process. Archives are published by
        // rename and never modified in place, so the bytes under the map do not change while it
        // lives; every access below is bounds-checked against the map's length, and a file
        // truncated underneath us could at worst raise SIGBUS, never yield out-of-bounds reads.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("memory-mapping", e))?;
        Self::from_backing(Backing::Mmap(map))
    }

    /// Validates an archive held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::from_backing(Backing::Owned(bytes))
    }

    /// The archive's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }

    fn from_backing(backing: Backing) -> Result<Self> {
        let mut a = Self {
            backing,
            kind: ArchiveKind::V1Local,
            sections: Vec::new(),
            ranges: [(0, 0); 12],
            meta: Meta::default(),
        };
        a.parse_header()?;
        a.validate()?;
        Ok(a)
    }

    // Over 100 lines on purpose: the header parser (untrusted bytes) checks the fixed header and
    // every section-table row in spec order, each bound next to the field it guards.
    fn parse_header(&mut self) -> Result<()> {
        let b = self.as_bytes();
        let found = b.len() as u64;
        if b.len() < HEADER_FIXED {
            if b.len() >= 8 && b[..8] != MAGIC {
                return Err(Error::BadMagic);
            }
            return Err(Error::Truncated {
                expected: HEADER_FIXED as u64,
                found,
            });
        }
        if b[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u16_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let kind = ArchiveKind::from_code(b[10])
            .ok_or_else(|| Error::InvalidHeader(format!("unknown archive kind {}", b[10])))?;
        if b[11] != 0 || u32_at(b, 12) != 0 || u32_at(b, 20) != 0 {
            return Err(Error::InvalidHeader(
                "reserved header fields or unknown flags are set".into(),
            ));
        }
        let count = u32_at(b, 16) as usize;
        if count > MAX_SECTIONS {
            return Err(Error::InvalidHeader(format!(
                "{count} sections (at most {MAX_SECTIONS})"
            )));
        }
        let table_end = HEADER_FIXED + SECTION_ROW * count;
        let header_end = (table_end + 8).next_multiple_of(8);
        let total = u64_at(b, 24);
        if found < header_end as u64 || found < total {
            return Err(Error::Truncated {
                expected: total.max(header_end as u64),
                found,
            });
        }
        if total != found {
            return Err(Error::InvalidHeader(format!(
                "file is {found} bytes but the header says {total}"
            )));
        }
        if checksum(&b[..table_end]) != u64_at(b, table_end) {
            return Err(Error::HeaderChecksum);
        }
        let mut sections: Vec<SectionInfo> = Vec::with_capacity(count);
        for i in 0..count {
            let r = HEADER_FIXED + SECTION_ROW * i;
            let id = SectionId(u32_at(b, r));
            let flags = u32_at(b, r + 4);
            let info = SectionInfo {
                id,
                offset: u64_at(b, r + 8),
                length: u64_at(b, r + 16),
                checksum: u64_at(b, r + 24),
                checked: flags & SECTION_UNCHECKED == 0,
            };
            if id.name() == "unknown" {
                return Err(Error::InvalidHeader(format!("unknown section id {}", id.0)));
            }
            if flags & !SECTION_UNCHECKED != 0 || (!info.checked && id != SectionId::DATA) {
                return Err(section_err(id, "unknown or misplaced section flags"));
            }
            if sections.iter().any(|s| s.id == id) {
                return Err(section_err(id, "appears twice"));
            }
            let end = info
                .offset
                .checked_add(info.length)
                .ok_or_else(|| section_err(id, "length overflows"))?;
            if info.offset < header_end as u64 || end > found || !info.offset.is_multiple_of(8) {
                return Err(section_err(
                    id,
                    format!(
                        "range {}..{end} is outside the file or misaligned",
                        info.offset
                    ),
                ));
            }
            if let Some(rs) = id.record_size().map(|r| r as u64)
                && !info.length.is_multiple_of(rs)
            {
                return Err(section_err(
                    id,
                    format!("length {} is not a multiple of {rs}", info.length),
                ));
            }
            sections.push(info);
        }
        let mut sorted = sections.clone();
        sorted.sort_by_key(|s| s.offset);
        for w in sorted.windows(2) {
            if w[0].offset + w[0].length > w[1].offset {
                return Err(section_err(
                    w[1].id,
                    format!("overlaps section {}", w[0].id),
                ));
            }
        }
        let required: &[SectionId] = match kind {
            ArchiveKind::V1Local => &[
                SectionId::STRINGS,
                SectionId::ENTRIES,
                SectionId::ATTRS,
                SectionId::XATTRS,
                SectionId::DIGESTS,
                SectionId::META,
                SectionId::DATA,
            ],
            ArchiveKind::V1Remote => &[
                SectionId::STRINGS,
                SectionId::ENTRIES,
                SectionId::ATTRS,
                SectionId::XATTRS,
                SectionId::DIGESTS,
                SectionId::META,
            ],
            ArchiveKind::V2Oci => &[
                SectionId::STRINGS,
                SectionId::ENTRIES,
                SectionId::ATTRS,
                SectionId::XATTRS,
                SectionId::LAYERS,
                SectionId::CHECKPOINTS,
                SectionId::WINDOWS,
                SectionId::META,
            ],
        };
        let optional: &[SectionId] = match kind {
            ArchiveKind::V2Oci => &[SectionId::SPARSE],
            ArchiveKind::V1Local | ArchiveKind::V1Remote => &[],
        };
        for r in required {
            if !sections.iter().any(|s| s.id == *r) {
                return Err(section_err(
                    *r,
                    format!("missing (required in a {kind} archive)"),
                ));
            }
        }
        if let Some(s) = sections
            .iter()
            .find(|s| !required.contains(&s.id) && !optional.contains(&s.id))
        {
            return Err(section_err(
                s.id,
                format!("does not belong in a {kind} archive"),
            ));
        }
        for s in &sections {
            let bytes = &b[usize_of(s.offset)..usize_of(s.offset + s.length)];
            if s.checked && checksum(bytes) != s.checksum {
                return Err(Error::SectionChecksum { section: s.id });
            }
        }
        let mut ranges = [(0, 0); 12];
        for s in &sections {
            ranges[s.id.0 as usize] = (usize_of(s.offset), usize_of(s.offset + s.length));
        }
        self.kind = kind;
        self.sections = sections;
        self.ranges = ranges;
        Ok(())
    }

    /// The bytes of a section (empty if the archive has none).
    #[must_use]
    pub fn section(&self, id: SectionId) -> &[u8] {
        let (s, e) = self.ranges.get(id.0 as usize).copied().unwrap_or((0, 0));
        self.as_bytes().get(s..e).unwrap_or_default()
    }

    /// The table row of a section.
    #[must_use]
    pub fn section_info(&self, id: SectionId) -> Option<SectionInfo> {
        self.sections.iter().find(|s| s.id == id).copied()
    }

    /// Every section, in table order.
    #[must_use]
    pub fn sections(&self) -> &[SectionInfo] {
        &self.sections
    }

    /// The archive kind.
    #[must_use]
    pub fn kind(&self) -> ArchiveKind {
        self.kind
    }

    /// The metadata section.
    #[must_use]
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.section(SectionId::ENTRIES).len() / ENTRY_SIZE
    }

    /// Whether the archive has no entries (never true for a valid archive: the root exists).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads a string by offset.
    pub(crate) fn string(&self, off: u32) -> Result<&[u8]> {
        let s = self.section(SectionId::STRINGS);
        let off = off as usize;
        let (len, used) = varint_at(s, off).ok_or_else(|| {
            section_err(SectionId::STRINGS, format!("bad length prefix at {off}"))
        })?;
        if len > MAX_STRING {
            return Err(section_err(
                SectionId::STRINGS,
                format!("string at {off} is {len} bytes"),
            ));
        }
        s.get(off + used..off + used + len as usize).ok_or_else(|| {
            section_err(
                SectionId::STRINGS,
                format!("string at {off} runs past the section"),
            )
        })
    }

    /// The map whose header is SPARSE record `b - 1`, for a file of `size` bytes.
    pub(crate) fn sparse_map_at(
        &self,
        b: u32,
        size: u64,
    ) -> std::result::Result<SparseMap, String> {
        let sp = self.section(SectionId::SPARSE);
        let records = sp.len() / SPARSE_SIZE;
        let head = b as usize - 1;
        if head >= records {
            return Err(format!("record {head} is past the end of the section"));
        }
        let at = |k: usize, f: usize| u64_at(sp, k * SPARSE_SIZE + f);
        let (n, reserved) = (at(head, 0), at(head, 8));
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if reserved != 0 || n > records - head - 1 {
            return Err(format!(
                "record {head} has a bad extent count or reserved field"
            ));
        }
        let extents = (head + 1..head + 1 + n).map(|k| (at(k, 0), at(k, 8)));
        if extents.clone().any(|(_, len)| len == 0) {
            return Err("an extent is empty".into());
        }
        let map = SparseMap::new(extents, size)?;
        if map.extents().len() != n {
            return Err("extents touch (they must be merged)".into());
        }
        Ok(map)
    }

    pub(crate) fn raw(&self, i: u32) -> Raw<'_> {
        let s = self.section(SectionId::ENTRIES);
        let at = i as usize * ENTRY_SIZE;
        Raw {
            r: s.get(at..at + ENTRY_SIZE).unwrap_or(&[0u8; ENTRY_SIZE]),
            attrs: self.section(SectionId::ATTRS),
        }
    }

    /// The entry at `index`.
    #[must_use]
    pub fn entry(&self, index: u32) -> Option<Entry<'_>> {
        ((index as usize) < self.len()).then_some(Entry {
            archive: self,
            index,
        })
    }

    /// The root directory.
    #[must_use]
    pub fn root(&self) -> Entry<'_> {
        Entry {
            archive: self,
            index: 0,
        }
    }

    /// The entry at `path` (`a/b/c`, with or without a leading `/`; symlinks are not followed).
    #[must_use]
    pub fn lookup(&self, path: &[u8]) -> Option<Entry<'_>> {
        let mut cur = self.root();
        for comp in path
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            cur = cur.child(comp)?;
        }
        Some(cur)
    }

    /// The layer table (v2).
    #[must_use]
    pub fn layers(&self) -> Vec<LayerInfo> {
        let s = self.section(SectionId::LAYERS);
        (0..s.len() / LAYER_SIZE)
            .map(|l| {
                let r = &s[l * LAYER_SIZE..(l + 1) * LAYER_SIZE];
                // Validated at open: every layer string is a digest. The fallback is unreachable.
                let digest = |off| {
                    std::str::from_utf8(self.string(off).unwrap_or_default())
                        .ok()
                        .and_then(|t| crate::Digest::parse(t).ok())
                        .unwrap_or_else(|| crate::Digest::sha256(b""))
                };
                LayerInfo {
                    digest: digest(u32_at(r, 0)),
                    diff_id: digest(u32_at(r, 4)),
                    media: MediaKind::from_code(r[8]).unwrap_or(MediaKind::Tar),
                    single_frame: r[9] & 1 != 0,
                    toc_indexed: r[9] & 2 != 0,
                    compressed_size: u64_at(r, 24),
                    uncompressed_size: u64_at(r, 32),
                    span_size: u64_at(r, 40),
                }
            })
            .collect()
    }

    /// The checkpoints of layer `layer`, windows included (copied).
    #[must_use]
    pub fn checkpoints(&self, layer: u32) -> Vec<Checkpoint> {
        let ls = self.section(SectionId::LAYERS);
        let at = layer as usize * LAYER_SIZE;
        if at + LAYER_SIZE > ls.len() {
            return Vec::new();
        }
        let (first, count) = (u32_at(ls, at + 12) as usize, u32_at(ls, at + 16) as usize);
        let cps = self.section(SectionId::CHECKPOINTS);
        let windows = self.section(SectionId::WINDOWS);
        let chained = ls[at + 9] & 4 != 0;
        (first..first + count)
            .filter_map(|c| cps.get(c * CHECKPOINT_SIZE..(c + 1) * CHECKPOINT_SIZE))
            .map(|cp| {
                let (wo, wl) = (u32_at(cp, 16) as usize, u32_at(cp, 20) as usize);
                let uncompressed_offset = u64_at(cp, 8);
                let mut span_digest = [0u8; 32];
                span_digest.copy_from_slice(&cp[32..64]);
                let head = (uncompressed_offset % 64) as usize;
                Checkpoint {
                    kind: CheckpointKind::from_code(cp[25]).unwrap_or(CheckpointKind::Plain),
                    compressed_offset: u64_at(cp, 0),
                    uncompressed_offset,
                    bits: cp[24],
                    window: windows.get(wo..wo + wl).unwrap_or_default().to_vec(),
                    span_digest,
                    chain_head: chained.then(|| {
                        windows
                            .get(wo + wl..wo + wl + head)
                            .unwrap_or_default()
                            .to_vec()
                    }),
                }
            })
            .collect()
    }

    /// Total checkpoints over all layers.
    #[must_use]
    pub fn checkpoint_count(&self) -> usize {
        self.section(SectionId::CHECKPOINTS).len() / CHECKPOINT_SIZE
    }

    /// The content of a v1 local file (zero-copy), verified against its digest if `verify`.
    pub fn file_data(&self, entry: &Entry<'_>, verify: bool) -> Result<&[u8]> {
        if self.kind != ArchiveKind::V1Local {
            return Err(Error::WrongKind {
                operation: "reading file data from the archive",
                needed: "v1-local",
                found: self.kind,
            });
        }
        let Some(DataLocation::V1 {
            offset,
            length,
            sha256,
        }) = entry.data()
        else {
            return Ok(&[]);
        };
        let data = self.section(SectionId::DATA);
        let bytes = data
            .get(usize_of(offset)..usize_of(offset + length))
            .unwrap_or_default();
        if verify {
            use sha2::Digest as _;
            if <[u8; 32]>::from(sha2::Sha256::digest(bytes)) != sha256 {
                return Err(Error::DigestMismatch {
                    path: String::from_utf8_lossy(&entry.path()).into_owned(),
                });
            }
        }
        Ok(bytes)
    }
}
