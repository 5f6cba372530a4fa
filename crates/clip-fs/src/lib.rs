//! The lazy read-only FUSE filesystem.
//!
//! # Model
//!
//! A mount serves one `.clip` archive. Metadata (lookup, getattr, readdir, readlink, xattrs) comes
//! straight from the memory-mapped index. File bytes come from where the archive says they live:
//! the data section (v1 local), ranged reads of the data object (v1 remote), or the image's layer
//! blobs in the registry (v2): file range → layer range → spans via checkpoints → local cache, else
//! one Range GET → inflate → verify the span digest → cache → reply.
//!
//! FUSE dispatch never blocks on the network: slow reads are answered from async tasks. The cache
//! is shared by all mounts on a machine, keyed by content, bounded with LRU eviction and crash-safe.
//!
//! Status: implemented in the FUSE issue.
