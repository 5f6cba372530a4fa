//! The `.clip` archive format.
//!
//! # Model
//!
//! A `.clip` file is one versioned container for three kinds of archive, told apart by its header so
//! a reader can auto-detect what it was handed:
//!
//! - **v1 local** — the merged root filesystem's index *and* every file's bytes (data-carrying);
//! - **v1 remote** — the same index plus a reference to the data object in object storage;
//! - **v2 OCI** — the index plus the image's registry location (registry, repository, manifest
//!   digest), its layer table and, per layer, the checkpoints that allow random access into the
//!   compressed layer blob. No file data at all.
//!
//! The file starts with a fixed header (magic, format version, kind, flags) and a section table;
//! each section (index, strings, layers, checkpoints, image config, data) is located by offset and
//! length and protected by a checksum. The index is sorted so that a path lookup is a binary search
//! and a directory's children are one contiguous range. Readers treat archives as untrusted input:
//! every offset and length is checked before use.
//!
//! This crate is pure: no I/O beyond `Read`/`Write` and byte slices, no async.
//!
//! Status: the format is specified and implemented in its own issue; this crate currently only
//! fixes the magic bytes every archive starts with.

/// The eight bytes every `.clip` archive starts with.
pub const MAGIC: [u8; 8] = *b"CLIPARC\0";
