//! Image → v2 index-only archive.
//!
//! # Model
//!
//! Given an image (a registry reference or an OCI layout directory), stream every layer exactly once:
//! verify the blob digest, inflate while recording checkpoints (`clip-seekable`), walk the tar entries
//! recording each file's offset and length in the layer's uncompressed stream, and verify the `diff_id`.
//! Layers are processed in parallel, then merged in order with OCI semantics (whiteouts hide lower
//! layers only, opaque directories hide all lower children, a non-directory replacing a directory
//! drops its subtree, hard links share an inode). The result is written as a v2 `.clip` archive that
//! records the manifest digest, layer table, checkpoints and image config — and no file data.
//!
//! Status: implemented in the v2 indexing issue.
