//! The `.clip` archive format.
//!
//! # Model
//!
//! A `.clip` file is one versioned container for three kinds of archive, told apart by its header
//! so a reader can auto-detect what it was handed ([`ArchiveKind`]):
//!
//! - **v1 local** — the merged root filesystem's index *and* every file's bytes (data-carrying);
//! - **v1 remote** — the same index plus a pointer to the data object in object storage;
//! - **v2 OCI** — the index plus the image's registry location (pinned by manifest digest), its
//!   layer table and, per layer, the checkpoints that allow random access into the compressed
//!   layer blob. No file data at all.
//!
//! The file is a fixed header (magic, format version, kind, a section table with an xxh3-64
//! checksum per section, and a header checksum) followed by 8-byte-aligned sections of
//! fixed-width little-endian records. The index is laid out breadth first with each directory's
//! children contiguous and sorted by name, so a path lookup is a binary search per component and a
//! directory listing reads exactly its children. Attributes that repeat across entries (mode,
//! owner, link count, mtime) are stored once in an attribute table, and all strings once in a
//! string table, which keeps the index near 50 bytes per entry.
//!
//! [`Archive::open`] memory-maps the file and validates it once (checksums, every offset, every
//! reference, the tree shape, name rules); afterwards every accessor reads the mapping in place
//! without copying. Archives are untrusted input: malformed ones produce a typed [`Error`] naming
//! what is wrong, never a panic, and no allocation is sized by an unchecked field.
//!
//! Writers ([`write_v2`], [`V1Writer`], [`write_v1_remote`]) take an owned [`Tree`] and publish
//! atomically (temp file, fsync, rename). `docs/format.md` is the byte-level specification.
//!
//! ```
//! use clip_format::{Archive, Meta, Source, Tree, Metadata, NodeKind, LayerSpan, write_v2};
//! # let dir = tempfile::tempdir()?;
//! let mut tree = Tree::default();
//! tree.insert(b"etc/hostname", NodeKind::File { size: 5, span: Some(LayerSpan::new(0, 512)) },
//!             Metadata { mode: 0o644, ..Metadata::default() })?;
//! let manifest_digest = clip_format::Digest::sha256(b"{}");
//! let meta = Meta { source: Some(Source { manifest_digest, registry: "127.0.0.1:5000".into(),
//!     repository: "app".into(), reference: "127.0.0.1:5000/app:v1".into() }), ..Meta::default() };
//! let layer = clip_format::LayerInfo { digest: clip_format::Digest::sha256(b"blob"), diff_id: clip_format::Digest::sha256(b"tar"),
//!     media: clip_format::MediaKind::Tar, single_frame: false, toc_indexed: false, compressed_size: 2048, uncompressed_size: 2048, span_size: 0 };
//! let path = dir.path().join("img.clip");
//! write_v2(&path, &tree, &meta, &[layer], &[vec![]])?;
//!
//! let archive = Archive::open(&path)?;
//! let entry = archive.lookup(b"/etc/hostname").expect("present");
//! assert_eq!(entry.size(), 5);
//! assert_eq!(archive.root().children().count(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod digest;
mod entry;
mod error;
pub mod merge;
mod meta;
mod read;
pub mod sparse;
pub mod spec;
pub mod tree;
mod validate;
mod write;
mod write_v1;

pub use digest::{Digest, DigestMismatch, DigestParseError};
pub use entry::Entry;
pub use error::{Error, Result};
pub use meta::{
    Checkpoint, CheckpointKind, ImageConfig, LayerInfo, MediaKind, Meta, Remote, Source,
    sha256_bytes,
};
pub use read::{Archive, DataLocation, EntryKind, SectionInfo};
pub use sparse::{SparseMap, SparseReader};
pub use spec::{FORMAT_VERSION, MAGIC, SectionId};
pub use tree::{LayerSpan, Metadata, NodeKind, Tree};
pub use write::{WriteSummary, write_v2};
pub use write_v1::{V1Writer, write_v1_remote};

/// The three kinds of archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ArchiveKind {
    /// Index plus embedded file data.
    V1Local,
    /// Index plus a pointer to the data in object storage.
    V1Remote,
    /// Index plus registry location and checkpoints; file data stays in the registry.
    V2Oci,
}

impl ArchiveKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::V1Local => 1,
            Self::V1Remote => 2,
            Self::V2Oci => 3,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::V1Local),
            2 => Some(Self::V1Remote),
            3 => Some(Self::V2Oci),
            _ => None,
        }
    }
}

/// The kind of archive whose first bytes are `head` (at least 11 of them), without opening or
/// validating it — enough to list a store; `None` if it is not a `.clip` archive.
#[must_use]
pub fn peek_kind(head: &[u8]) -> Option<ArchiveKind> {
    if head.len() < 11 || head[..8] != MAGIC {
        return None;
    }
    ArchiveKind::from_code(head[10])
}

impl std::fmt::Display for ArchiveKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1Local => "v1-local",
            Self::V1Remote => "v1-remote",
            Self::V2Oci => "v2-oci",
        })
    }
}
