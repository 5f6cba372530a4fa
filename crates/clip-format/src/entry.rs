//! Entries: a raw record's fields named for what they hold per kind, and the public [`Entry`]
//! view over them.

use crate::ArchiveKind;
use crate::read::{Archive, DataLocation, EntryKind};
use crate::sparse::SparseMap;
use crate::spec::{ATTR_SIZE, DIGEST_SIZE, SectionId, XATTR_SIZE, i64_at, u32_at, u64_at};

/// A raw entry record.
#[derive(Clone, Copy)]
pub(crate) struct Raw<'a> {
    pub(crate) r: &'a [u8],
    pub(crate) attrs: &'a [u8],
}

impl<'a> Raw<'a> {
    pub(crate) fn name_ref(self) -> u32 {
        u32_at(self.r, 0)
    }
    pub(crate) fn parent(self) -> u32 {
        u32_at(self.r, 4)
    }
    pub(crate) fn attr(self) -> u32 {
        u32_at(self.r, 8)
    }
    pub(crate) fn ino(self) -> u32 {
        u32_at(self.r, 12)
    }
    pub(crate) fn size(self) -> u64 {
        u64_at(self.r, 16)
    }
    // The last 16 bytes hold what the entry's kind needs (docs/format.md, "Entries"); each
    // accessor names one meaning. Fields a kind does not use are zero.
    /// Directory: index of the first child.
    pub(crate) fn first_child(self) -> u32 {
        u32_at(self.r, 24)
    }
    /// Directory: number of children.
    pub(crate) fn child_count(self) -> u32 {
        u32_at(self.r, 28)
    }
    /// v1 file: index of its sha256 in the DIGESTS section.
    pub(crate) fn digest_index(self) -> u32 {
        u32_at(self.r, 24)
    }
    /// v1 file: offset of its bytes in the data region.
    pub(crate) fn data_offset(self) -> u64 {
        u64_at(self.r, 32)
    }
    /// v2 file: the layer holding its bytes.
    pub(crate) fn layer(self) -> u32 {
        u32_at(self.r, 24)
    }
    /// v2 file: reference of its sparse map (0: not sparse).
    pub(crate) fn sparse_ref(self) -> u32 {
        u32_at(self.r, 28)
    }
    /// v2 file: offset of its bytes in the layer's uncompressed stream.
    pub(crate) fn layer_offset(self) -> u64 {
        u64_at(self.r, 32)
    }
    /// Symlink: string reference of its target.
    pub(crate) fn target_ref(self) -> u32 {
        u32_at(self.r, 24)
    }
    /// Device: major number.
    pub(crate) fn major(self) -> u32 {
        u32_at(self.r, 24)
    }
    /// Device: minor number.
    pub(crate) fn minor(self) -> u32 {
        u32_at(self.r, 28)
    }
    /// The 16 kind-specific bytes, whatever they mean (hard links must agree on all of them).
    pub(crate) fn payload(self) -> &'a [u8] {
        &self.r[24..40]
    }
    /// Whether the kind-specific bytes past `used` are all zero.
    pub(crate) fn unused_zero(self, used: usize) -> bool {
        self.r[24 + used..40].iter().all(|b| *b == 0)
    }
    pub(crate) fn kind_checked(self, n_attrs: usize) -> std::result::Result<EntryKind, String> {
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
    pub(crate) archive: &'a Archive,
    pub(crate) index: u32,
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
        (self.kind() == EntryKind::Symlink).then(|| {
            self.archive
                .string(self.raw().target_ref())
                .unwrap_or_default()
        })
    }
    /// Device numbers (major, minor) of a device node.
    #[must_use]
    pub fn rdev(&self) -> Option<(u32, u32)> {
        matches!(self.kind(), EntryKind::CharDevice | EntryKind::BlockDevice)
            .then(|| (self.raw().major(), self.raw().minor()))
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
                layer: r.layer(),
                offset: r.layer_offset(),
                length: r.size(),
                sparse: r.sparse_ref() != 0,
            }
        } else {
            let d = self.archive.section(SectionId::DIGESTS);
            let at = r.digest_index() as usize * DIGEST_SIZE;
            let mut sha256 = [0u8; 32];
            if let Some(s) = d.get(at..at + DIGEST_SIZE) {
                sha256.copy_from_slice(s);
            }
            DataLocation::V1 {
                offset: r.data_offset(),
                length: r.size(),
                sha256,
            }
        })
    }
    /// A sparse v2 file's extent map (`None` for any other entry).
    #[must_use]
    pub fn sparse_map(&self) -> Option<SparseMap> {
        let r = self.raw();
        if self.kind() != EntryKind::File
            || self.archive.kind != ArchiveKind::V2Oci
            || r.sparse_ref() == 0
        {
            return None;
        }
        // Validated when the archive was opened.
        self.archive.sparse_map_at(r.sparse_ref(), r.size()).ok()
    }
    /// The children of a directory, in name order.
    #[must_use]
    pub fn children(&self) -> impl ExactSizeIterator<Item = Entry<'a>> + use<'a> {
        let (first, count) = if self.kind() == EntryKind::Dir {
            (self.raw().first_child(), self.raw().child_count())
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
        let (first, count) = (self.raw().first_child(), self.raw().child_count());
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

pub(crate) fn partition(n: usize, mut pred: impl FnMut(usize) -> bool) -> usize {
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
