//! The reader: open (mmap or bytes), validate once, then zero-copy lookups.

use std::path::Path;

use crate::ArchiveKind;
use crate::error::{Error, Result, entry_err, section_err};
use crate::layout::{
    ATTR_SIZE, CHECKPOINT_SIZE, DIGEST_SIZE, ENTRY_SIZE, FORMAT_VERSION, HEADER_FIXED, LAYER_SIZE,
    MAGIC, MAX_META, MAX_SECTIONS, MAX_STRING, SECTION_ROW, SECTION_UNCHECKED, SPARSE_SIZE,
    SectionId, XATTR_SIZE, checksum, i64_at, mode, u16_at, u32_at, u64_at, varint_at,
};
use crate::meta::{Checkpoint, CheckpointKind, LayerInfo, MediaKind, Meta};
use crate::sparse::SparseMap;

enum Backing {
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
    backing: Backing,
    kind: ArchiveKind,
    sections: Vec<SectionInfo>,
    ranges: [(usize, usize); 12],
    meta: Meta,
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
    fn from_mode(m: u32) -> Option<Self> {
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
    fn string(&self, off: u32) -> Result<&[u8]> {
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
    fn sparse_map_at(&self, b: u32, size: u64) -> std::result::Result<SparseMap, String> {
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

    fn validate(&mut self) -> Result<()> {
        // Metadata.
        let meta_bytes = self.section(SectionId::META);
        if meta_bytes.len() as u64 > MAX_META {
            return Err(Error::InvalidMeta(format!(
                "{} bytes is too large",
                meta_bytes.len()
            )));
        }
        let meta: Meta =
            serde_json::from_slice(meta_bytes).map_err(|e| Error::InvalidMeta(e.to_string()))?;
        match self.kind {
            ArchiveKind::V2Oci => {
                let ok = meta
                    .source
                    .as_ref()
                    .is_some_and(|s| s.manifest_digest.starts_with("sha256:"));
                if !ok {
                    return Err(Error::InvalidMeta(
                        "a v2 archive needs a source pinned by a sha256 manifest digest".into(),
                    ));
                }
            }
            ArchiveKind::V1Remote => {
                if meta.remote.as_ref().is_none_or(|r| r.url.is_empty()) {
                    return Err(Error::InvalidMeta(
                        "a v1-remote archive needs a remote data URL".into(),
                    ));
                }
            }
            ArchiveKind::V1Local => {}
        }
        self.meta = meta;

        let n = self.len();
        if n == 0 {
            return Err(section_err(SectionId::ENTRIES, "no root entry"));
        }
        let n32 =
            u32::try_from(n).map_err(|_| section_err(SectionId::ENTRIES, "too many entries"))?;
        let n_attrs = self.section(SectionId::ATTRS).len() / ATTR_SIZE;
        for i in 0..n_attrs {
            let r = &self.section(SectionId::ATTRS)[i * ATTR_SIZE..(i + 1) * ATTR_SIZE];
            if EntryKind::from_mode(u32_at(r, 0)).is_none()
                || u32_at(r, 0) & !(mode::S_IFMT | 0o7777) != 0
            {
                return Err(section_err(
                    SectionId::ATTRS,
                    format!("record {i} has an invalid mode {:o}", u32_at(r, 0)),
                ));
            }
            if u32_at(r, 24) >= 1_000_000_000 || u32_at(r, 12) == 0 {
                return Err(section_err(
                    SectionId::ATTRS,
                    format!("record {i} has invalid nanoseconds or nlink"),
                ));
            }
        }
        let n_digests = self.section(SectionId::DIGESTS).len() / DIGEST_SIZE;
        let n_layers = self.section(SectionId::LAYERS).len() / LAYER_SIZE;
        let n_cps = self.section(SectionId::CHECKPOINTS).len() / CHECKPOINT_SIZE;
        let data_len = match self.kind {
            ArchiveKind::V1Local => self.section(SectionId::DATA).len() as u64,
            ArchiveKind::V1Remote => self.meta.remote.as_ref().map_or(0, |r| r.data_length),
            ArchiveKind::V2Oci => 0,
        };
        let layer_sizes: Vec<u64> = (0..n_layers)
            .map(|l| u64_at(self.section(SectionId::LAYERS), l * LAYER_SIZE + 32))
            .collect();

        // Per inode: the first entry that had it, so every name of one inode can be checked to agree.
        let mut first_of_ino: Vec<u32> = vec![u32::MAX; n];
        // Sparse maps already checked (by header record and file size): their stored length.
        let mut sparse_checked: std::collections::HashMap<(u32, u64), u64> =
            std::collections::HashMap::new();
        for i in 0..n32 {
            let e = self.raw(i);
            let kind = e.kind_checked(n_attrs).map_err(|r| entry_err(i, r))?;
            let name = self
                .string(e.name_ref())
                .map_err(|x| entry_err(i, x.to_string()))?;
            let parent = e.parent();
            if i == 0 {
                if !name.is_empty() || parent != 0 || kind != EntryKind::Dir {
                    return Err(entry_err(
                        0,
                        "the root must be an unnamed directory that is its own parent",
                    ));
                }
            } else {
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    return Err(entry_err(
                        i,
                        format!("invalid name {:?}", String::from_utf8_lossy(name)),
                    ));
                }
                if parent >= i {
                    return Err(entry_err(i, "parent does not precede the entry"));
                }
                let p = self.raw(parent);
                if p.kind_checked(n_attrs).ok() != Some(EntryKind::Dir)
                    || i < p.a()
                    || i - p.a() >= p.b()
                {
                    return Err(entry_err(i, "is not among its parent's children"));
                }
            }
            let ino = e.ino();
            if ino == 0 || ino > n32 {
                return Err(entry_err(i, format!("inode {ino} out of range")));
            }
            let slot = &mut first_of_ino[(ino - 1) as usize];
            if *slot == u32::MAX {
                *slot = i;
            } else {
                let f = self.raw(*slot);
                if kind != EntryKind::File
                    || f.attr() != e.attr()
                    || f.a() != e.a()
                    || f.b() != e.b()
                    || f.c() != e.c()
                    || f.size() != e.size()
                {
                    return Err(entry_err(
                        i,
                        format!(
                            "shares inode {ino} with entry #{} but not its data and attributes",
                            *slot
                        ),
                    ));
                }
            }
            // Fields a type does not use must be zero (see docs/format.md).
            let unused_ok = match kind {
                EntryKind::File => e.b() == 0 || self.kind == ArchiveKind::V2Oci,
                EntryKind::Symlink => e.b() == 0 && e.c() == 0,
                EntryKind::Dir | EntryKind::CharDevice | EntryKind::BlockDevice => {
                    e.size() == 0 && e.c() == 0
                }
                EntryKind::Fifo | EntryKind::Socket => {
                    e.size() == 0 && e.a() == 0 && e.b() == 0 && e.c() == 0
                }
            };
            if !unused_ok {
                return Err(entry_err(i, "a field its type does not use is not zero"));
            }
            match kind {
                EntryKind::Dir => {
                    let (first, count) = (e.a(), e.b());
                    if count > 0
                        && (first <= i || u64::from(first) + u64::from(count) > u64::from(n32))
                    {
                        return Err(entry_err(i, "children range out of bounds"));
                    }
                    let mut prev: Option<&[u8]> = None;
                    for c in first..first.saturating_add(count) {
                        let child = self.raw(c);
                        if child.parent() != i {
                            return Err(entry_err(
                                c,
                                "child does not name its directory as parent",
                            ));
                        }
                        let cn = self
                            .string(child.name_ref())
                            .map_err(|x| entry_err(c, x.to_string()))?;
                        if prev.is_some_and(|p| p >= cn) {
                            return Err(entry_err(
                                c,
                                "children are not sorted by name or repeat a name",
                            ));
                        }
                        prev = Some(cn);
                    }
                }
                EntryKind::File => match self.kind {
                    ArchiveKind::V1Local | ArchiveKind::V1Remote => {
                        if e.a() as usize >= n_digests
                            || e.c().checked_add(e.size()).is_none_or(|end| end > data_len)
                        {
                            return Err(entry_err(i, "file data is out of bounds"));
                        }
                    }
                    ArchiveKind::V2Oci => {
                        let stored = if e.b() == 0 {
                            e.size()
                        } else if let Some(n) = sparse_checked.get(&(e.b(), e.size())) {
                            *n
                        } else {
                            let n = self
                                .sparse_map_at(e.b(), e.size())
                                .map_err(|r| entry_err(i, format!("sparse map: {r}")))?
                                .stored_len();
                            sparse_checked.insert((e.b(), e.size()), n);
                            n
                        };
                        let ok = (e.a() as usize) < n_layers
                            && e.c()
                                .checked_add(stored)
                                .is_some_and(|end| end <= layer_sizes[e.a() as usize]);
                        if !ok && stored > 0 {
                            return Err(entry_err(i, "file range is outside its layer"));
                        }
                    }
                },
                EntryKind::Symlink => {
                    let t = self
                        .string(e.a())
                        .map_err(|x| entry_err(i, x.to_string()))?;
                    if t.is_empty() || t.len() as u64 != e.size() {
                        return Err(entry_err(i, "bad symlink target"));
                    }
                }
                _ => {}
            }
        }
        // Xattrs: sorted by entry, then name; references valid.
        let xs = self.section(SectionId::XATTRS);
        let mut prev: Option<(u32, &[u8])> = None;
        for k in 0..xs.len() / XATTR_SIZE {
            let r = k * XATTR_SIZE;
            let entry = u32_at(xs, r);
            let name = self.string(u32_at(xs, r + 4))?;
            self.string(u32_at(xs, r + 8))?;
            if entry >= n32
                || name.is_empty()
                || prev.is_some_and(|(pe, pn)| (pe, pn) >= (entry, name))
            {
                return Err(section_err(
                    SectionId::XATTRS,
                    format!("record {k} is out of order or out of range"),
                ));
            }
            prev = Some((entry, name));
        }
        // Layers and checkpoints.
        let windows_len = self.section(SectionId::WINDOWS).len() as u64;
        for l in 0..n_layers {
            let r = &self.section(SectionId::LAYERS)[l * LAYER_SIZE..(l + 1) * LAYER_SIZE];
            self.string(u32_at(r, 0))?;
            self.string(u32_at(r, 4))?;
            let media = MediaKind::from_code(r[8]);
            if media.is_none()
                || !matches!(
                    (media, r[9]),
                    (_, 0 | 4)
                        | (Some(MediaKind::Zstd), 1 | 5)
                        | (Some(MediaKind::Gzip | MediaKind::Zstd), 2)
                )
            {
                return Err(section_err(
                    SectionId::LAYERS,
                    format!("layer {l} has an unknown media type or flags"),
                ));
            }
            let (first, count) = (u32_at(r, 12) as usize, u32_at(r, 16) as usize);
            if first.checked_add(count).is_none_or(|end| end > n_cps) {
                return Err(section_err(
                    SectionId::LAYERS,
                    format!("layer {l} checkpoint range is out of bounds"),
                ));
            }
            let (csize, usize_) = (u64_at(r, 24), u64_at(r, 32));
            let chained = r[9] & 4 != 0;
            let mut last = (0u64, 0u64);
            for c in first..first + count {
                let cp = &self.section(SectionId::CHECKPOINTS)
                    [c * CHECKPOINT_SIZE..(c + 1) * CHECKPOINT_SIZE];
                let (co, uo) = (u64_at(cp, 0), u64_at(cp, 8));
                let (wo, wl) = (u64::from(u32_at(cp, 16)), u64::from(u32_at(cp, 20)));
                // A chained layer's checkpoint head follows its window.
                let wl = wl + if chained { uo % 64 } else { 0 };
                let bad = cp[24] > 7
                    || CheckpointKind::from_code(cp[25]).is_none()
                    || co > csize
                    || uo > usize_
                    || wo + wl > windows_len
                    || (c > first && (co, uo) <= last);
                if bad {
                    return Err(section_err(
                        SectionId::CHECKPOINTS,
                        format!("checkpoint {c} of layer {l} is invalid"),
                    ));
                }
                last = (co, uo);
            }
        }
        Ok(())
    }

    fn raw(&self, i: u32) -> Raw<'_> {
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
                let text = |off| {
                    String::from_utf8_lossy(self.string(off).unwrap_or_default()).into_owned()
                };
                LayerInfo {
                    digest: text(u32_at(r, 0)),
                    diff_id: text(u32_at(r, 4)),
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

/// A raw entry record.
#[derive(Clone, Copy)]
struct Raw<'a> {
    r: &'a [u8],
    attrs: &'a [u8],
}

impl Raw<'_> {
    fn name_ref(self) -> u32 {
        u32_at(self.r, 0)
    }
    fn parent(self) -> u32 {
        u32_at(self.r, 4)
    }
    fn attr(self) -> u32 {
        u32_at(self.r, 8)
    }
    fn ino(self) -> u32 {
        u32_at(self.r, 12)
    }
    fn size(self) -> u64 {
        u64_at(self.r, 16)
    }
    fn a(self) -> u32 {
        u32_at(self.r, 24)
    }
    fn b(self) -> u32 {
        u32_at(self.r, 28)
    }
    fn c(self) -> u64 {
        u64_at(self.r, 32)
    }
    fn kind_checked(self, n_attrs: usize) -> std::result::Result<EntryKind, String> {
        if self.attr() as usize >= n_attrs {
            return Err(format!("attribute index {} out of range", self.attr()));
        }
        EntryKind::from_mode(u32_at(self.attrs, self.attr() as usize * ATTR_SIZE))
            .ok_or_else(|| "invalid mode".into())
    }
}

/// A view of one entry, reading the mapped bytes in place.
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    archive: &'a Archive,
    index: u32,
}

impl std::fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("index", &self.index)
            .field("path", &String::from_utf8_lossy(&self.path()))
            .finish()
    }
}

impl<'a> Entry<'a> {
    fn raw(&self) -> Raw<'a> {
        self.archive.raw(self.index)
    }
    fn attr(&self, at: usize) -> &'a [u8] {
        let attrs = self.archive.section(SectionId::ATTRS);
        let base = self.raw().attr() as usize * ATTR_SIZE;
        attrs.get(base + at..base + at + 8).unwrap_or(&[0u8; 8])
    }

    /// Position in the entry table (0 is the root).
    #[must_use]
    pub fn index(&self) -> u32 {
        self.index
    }
    /// The entry's name (empty for the root).
    #[must_use]
    pub fn name(&self) -> &'a [u8] {
        self.archive
            .string(self.raw().name_ref())
            .unwrap_or_default()
    }
    /// The parent directory.
    #[must_use]
    pub fn parent(&self) -> Entry<'a> {
        Entry {
            archive: self.archive,
            index: self.raw().parent(),
        }
    }
    /// The full path, without a leading slash.
    #[must_use]
    pub fn path(&self) -> Vec<u8> {
        let mut parts = Vec::new();
        let mut cur = *self;
        while cur.index != 0 {
            parts.push(cur.name());
            cur = cur.parent();
        }
        parts.reverse();
        parts.join(&b'/')
    }
    /// Full `st_mode` (type and permission bits).
    #[must_use]
    pub fn st_mode(&self) -> u32 {
        u32_at(self.attr(0), 0)
    }
    /// Permission bits including setuid/setgid/sticky.
    #[must_use]
    pub fn mode(&self) -> u32 {
        self.st_mode() & 0o7777
    }
    /// The entry type.
    #[must_use]
    pub fn kind(&self) -> EntryKind {
        EntryKind::from_mode(self.st_mode()).unwrap_or(EntryKind::File)
    }
    /// Owner.
    #[must_use]
    pub fn uid(&self) -> u32 {
        u32_at(self.attr(4), 0)
    }
    /// Group.
    #[must_use]
    pub fn gid(&self) -> u32 {
        u32_at(self.attr(8), 0)
    }
    /// Link count (directories: 2 + subdirectories).
    #[must_use]
    pub fn nlink(&self) -> u32 {
        u32_at(self.attr(12), 0)
    }
    /// Modification time (seconds, nanoseconds).
    #[must_use]
    pub fn mtime(&self) -> (i64, u32) {
        (i64_at(self.attr(16), 0), u32_at(self.attr(24), 0))
    }
    /// Dense inode number (1-based; hard links share one).
    #[must_use]
    pub fn ino(&self) -> u32 {
        self.raw().ino()
    }
    /// Size: file length, symlink target length, 0 otherwise.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.raw().size()
    }
    /// The symlink target.
    #[must_use]
    pub fn symlink_target(&self) -> Option<&'a [u8]> {
        (self.kind() == EntryKind::Symlink)
            .then(|| self.archive.string(self.raw().a()).unwrap_or_default())
    }
    /// Device numbers (major, minor) of a device node.
    #[must_use]
    pub fn rdev(&self) -> Option<(u32, u32)> {
        matches!(self.kind(), EntryKind::CharDevice | EntryKind::BlockDevice)
            .then(|| (self.raw().a(), self.raw().b()))
    }
    /// Where the file's bytes are (files only).
    #[must_use]
    pub fn data(&self) -> Option<DataLocation> {
        if self.kind() != EntryKind::File {
            return None;
        }
        let r = self.raw();
        Some(if self.archive.kind == ArchiveKind::V2Oci {
            DataLocation::V2 {
                layer: r.a(),
                offset: r.c(),
                length: r.size(),
                sparse: r.b() != 0,
            }
        } else {
            let d = self.archive.section(SectionId::DIGESTS);
            let at = r.a() as usize * DIGEST_SIZE;
            let mut sha256 = [0u8; 32];
            if let Some(s) = d.get(at..at + DIGEST_SIZE) {
                sha256.copy_from_slice(s);
            }
            DataLocation::V1 {
                offset: r.c(),
                length: r.size(),
                sha256,
            }
        })
    }
    /// A sparse v2 file's extent map (`None` for any other entry).
    #[must_use]
    pub fn sparse_map(&self) -> Option<SparseMap> {
        let r = self.raw();
        if self.kind() != EntryKind::File || self.archive.kind != ArchiveKind::V2Oci || r.b() == 0 {
            return None;
        }
        // Validated when the archive was opened.
        self.archive.sparse_map_at(r.b(), r.size()).ok()
    }
    /// The children of a directory, in name order.
    #[must_use]
    pub fn children(&self) -> impl ExactSizeIterator<Item = Entry<'a>> + use<'a> {
        let (first, count) = if self.kind() == EntryKind::Dir {
            (self.raw().a(), self.raw().b())
        } else {
            (0, 0)
        };
        let archive = self.archive;
        (first..first + count).map(move |index| Entry { archive, index })
    }
    /// The child called `name` (binary search over the directory's sorted children).
    #[must_use]
    pub fn child(&self, name: &[u8]) -> Option<Entry<'a>> {
        if self.kind() != EntryKind::Dir {
            return None;
        }
        let (first, count) = (self.raw().a(), self.raw().b());
        let (mut lo, mut hi) = (first, first + count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = Entry {
                archive: self.archive,
                index: mid,
            };
            match e.name().cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(e),
            }
        }
        None
    }
    /// Extended attributes (name, value), sorted by name.
    pub fn xattrs(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + use<'a> {
        let xs = self.archive.section(SectionId::XATTRS);
        let n = xs.len() / XATTR_SIZE;
        let idx = self.index;
        let start = partition(n, |k| u32_at(xs, k * XATTR_SIZE) < idx);
        let archive = self.archive;
        (start..n)
            .take_while(move |k| u32_at(xs, k * XATTR_SIZE) == idx)
            .map(move |k| {
                let r = k * XATTR_SIZE;
                (
                    archive.string(u32_at(xs, r + 4)).unwrap_or_default(),
                    archive.string(u32_at(xs, r + 8)).unwrap_or_default(),
                )
            })
    }
}

fn partition(n: usize, mut pred: impl FnMut(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}
