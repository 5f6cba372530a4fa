//! Random access into compressed OCI layer blobs.
//!
//! # Model
//!
//! An OCI layer is a tar stream, usually compressed. To serve a read of bytes `[a, b)` of the
//! *uncompressed* stream without inflating everything before `a`, the layer is streamed once at
//! indexing time and **checkpoints** are recorded:
//!
//! - **gzip** (the zran technique): at deflate block boundaries roughly every span (default 4 MiB of
//!   output), record the compressed offset, the 0–7 leftover bits, the uncompressed offset and the
//!   preceding 32 KiB window (stored compressed). Inflation resumes from a checkpoint by priming the
//!   bits and installing the window as the dictionary. Multi-member gzip restarts at each member.
//! - **zstd**: frames are the only seek points; a single-frame layer must be read from the start.
//! - **uncompressed**: uncompressed offsets are blob offsets.
//!
//! One engine serves both sides: the indexer builds checkpoints while streaming, and the reader
//! takes a checkpoint plus the compressed bytes from any range source and yields exactly the
//! requested uncompressed bytes. Each span also records the sha256 of its uncompressed bytes, so
//! lazily fetched data is verified before it is served.
//!
//! This crate is CPU work only (no async, no network): it takes `Read`, byte slices or a range-read
//! trait. Status: implemented in the v2 indexing issue.
