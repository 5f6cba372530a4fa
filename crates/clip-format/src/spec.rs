//! The byte-level specification in code: magic, versions, record sizes, section ids, limits and
//! the little-endian helpers. `docs/format.md` is the normative description. ("Layout" in clip
//! means an OCI image layout directory; this module is the archive's encoding.)

use std::fmt;

/// Magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"CLIPARC\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Fixed part of the header.
pub const HEADER_FIXED: usize = 32;
/// One section table row.
pub const SECTION_ROW: usize = 32;
/// Most sections an archive may have.
pub const MAX_SECTIONS: usize = 16;
/// Section flag: the section is not covered by a checksum (bulk file data, verified per file).
pub const SECTION_UNCHECKED: u32 = 1;
/// Largest metadata JSON accepted.
pub const MAX_META: u64 = 16 << 20;
/// Longest string (names, link targets, xattr values, digests) accepted.
pub const MAX_STRING: u32 = 1 << 20;

/// Size of an entry record.
pub const ENTRY_SIZE: usize = 40;
/// Size of an attribute record.
pub const ATTR_SIZE: usize = 32;
/// Size of an xattr record.
pub const XATTR_SIZE: usize = 12;
/// Size of a digest record.
pub const DIGEST_SIZE: usize = 32;
/// Size of a layer record.
pub const LAYER_SIZE: usize = 48;
/// Size of a checkpoint record.
pub const CHECKPOINT_SIZE: usize = 64;
/// Size of a SPARSE record.
pub const SPARSE_SIZE: usize = 16;

/// Identifies a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SectionId(pub u32);

impl SectionId {
    /// Length-prefixed strings referenced by offset.
    pub const STRINGS: Self = Self(1);
    /// Entry records, breadth first, children sorted by name.
    pub const ENTRIES: Self = Self(2);
    /// Deduplicated (mode, uid, gid, nlink, mtime) records.
    pub const ATTRS: Self = Self(3);
    /// Extended attributes, sorted by entry.
    pub const XATTRS: Self = Self(4);
    /// sha256 of each v1 file's content.
    pub const DIGESTS: Self = Self(5);
    /// The v2 layer table.
    pub const LAYERS: Self = Self(6);
    /// v2 random-access checkpoints.
    pub const CHECKPOINTS: Self = Self(7);
    /// Compressed checkpoint windows.
    pub const WINDOWS: Self = Self(8);
    /// JSON metadata: image config, source, remote data reference.
    pub const META: Self = Self(9);
    /// v1 local file data.
    pub const DATA: Self = Self(10);
    /// Extent maps of sparse files (v2, optional).
    pub const SPARSE: Self = Self(11);

    /// Human name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "strings",
            2 => "entries",
            3 => "attrs",
            4 => "xattrs",
            5 => "digests",
            6 => "layers",
            7 => "checkpoints",
            8 => "windows",
            9 => "meta",
            10 => "data",
            11 => "sparse",
            _ => "unknown",
        }
    }

    /// Record size for fixed-record sections.
    #[must_use]
    pub fn record_size(self) -> Option<usize> {
        match self {
            Self::ENTRIES => Some(ENTRY_SIZE),
            Self::ATTRS => Some(ATTR_SIZE),
            Self::XATTRS => Some(XATTR_SIZE),
            Self::DIGESTS => Some(DIGEST_SIZE),
            Self::LAYERS => Some(LAYER_SIZE),
            Self::CHECKPOINTS => Some(CHECKPOINT_SIZE),
            Self::SPARSE => Some(SPARSE_SIZE),
            _ => None,
        }
    }
}

impl fmt::Display for SectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// File type bits of `st_mode`.
pub mod mode {
    /// Mask of the type bits.
    pub const S_IFMT: u32 = 0o170_000;
    /// Socket.
    pub const S_IFSOCK: u32 = 0o140_000;
    /// Symlink.
    pub const S_IFLNK: u32 = 0o120_000;
    /// Regular file.
    pub const S_IFREG: u32 = 0o100_000;
    /// Block device.
    pub const S_IFBLK: u32 = 0o060_000;
    /// Directory.
    pub const S_IFDIR: u32 = 0o040_000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020_000;
    /// Fifo.
    pub const S_IFIFO: u32 = 0o010_000;
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}
pub(crate) fn i64_at(b: &[u8], at: usize) -> i64 {
    u64_at(b, at).cast_signed()
}

/// Reads a LEB128 length prefix at `at`: returns (value, bytes used).
pub(crate) fn varint_at(b: &[u8], at: usize) -> Option<(u32, usize)> {
    let mut v: u64 = 0;
    for i in 0..5 {
        let byte = *b.get(at + i)?;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(v).ok().map(|v| (v, i + 1));
        }
    }
    None
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Recomputes the total length, every section checksum and the header checksum of `b` in place,
/// so that a deliberately mutated archive (fuzzing, corruption tests) reaches the structural
/// checks behind the checksums. Never used on the read path.
pub fn reseal(b: &mut [u8]) {
    if b.len() < HEADER_FIXED {
        return;
    }
    let total = b.len() as u64;
    b[24..32].copy_from_slice(&total.to_le_bytes());
    let n = u32_at(b, 16) as usize;
    let Some(end) = n.checked_mul(SECTION_ROW).map(|t| t + HEADER_FIXED) else {
        return;
    };
    if end + 8 > b.len() {
        return;
    }
    for i in 0..n {
        let row = HEADER_FIXED + SECTION_ROW * i;
        let (off, len) = (u64_at(b, row + 8), u64_at(b, row + 16));
        let range = usize::try_from(off).ok().zip(usize::try_from(len).ok());
        if let Some((off, len)) = range
            && off.checked_add(len).is_some_and(|e| e <= b.len())
        {
            let sum = checksum(&b[off..off + len]);
            b[row + 24..row + 32].copy_from_slice(&sum.to_le_bytes());
        }
    }
    let sum = checksum(&b[..end]);
    b[end..end + 8].copy_from_slice(&sum.to_le_bytes());
}
