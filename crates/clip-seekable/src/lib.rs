//! Random access into compressed OCI layer blobs.
//!
//! # Model
//!
//! An OCI layer is a tar stream, usually compressed. To serve a read of bytes `[a, b)` of the
//! *uncompressed* stream without inflating everything before `a`, the layer is streamed once at
//! indexing time and **checkpoints** are recorded:
//!
//! - **gzip** (the zran technique): at deflate block boundaries about every span (default 4 MiB
//!   of output) and, on request, at the last boundary before a large file's data, record the
//!   compressed offset, the 0–7 leftover bits of the byte before it, the uncompressed offset and
//!   the preceding 32 KiB window (stored deflate-compressed). [`gzip::decode`] resumes from a
//!   checkpoint by priming those bits (`inflatePrime`) and installing the window as dictionary
//!   (`inflateSetDictionary`). Multi-member gzip works: each member start is a checkpoint that
//!   needs no window, and decoding crosses member boundaries.
//! - **uncompressed**: offsets are blob offsets; plain checkpoints every span carry the digests.
//! - **zstd**: frames are the only seek points: a checkpoint at a frame start about every span;
//!   a single-frame layer has only the checkpoint at 0 and is read from the start.
//!
//! One engine serves both sides: [`GzipIndexer`] is a [`std::io::Read`] of the uncompressed
//! stream (so a tar walker can pull from it) that records checkpoints as it goes, and
//! [`gzip::decode`] takes one checkpoint plus compressed bytes from any range source. Every span
//! (checkpoint to next checkpoint) is verified before it is served ([`verify_span`]) against the
//! layer's own SHA-256: each checkpoint records the chaining value the `diff_id` computation
//! passes through there (module `chain`), so indexing hashes the stream once, not once for the
//! `diff_id` and again for the spans.
//!
//! That hashing runs on one helper thread per layer ([`HashThread`]), beside the decoding
//! thread; a caller that reads the blob can feed it the compressed bytes too ([`InputFeed`]) and
//! gets the blob digest in [`LayerIndex::input`], without a third thread.
//!
//! Whole layers read front to back (the v1 path, extraction) go through [`stream`]: a decoder
//! for each media type and a copier that hands out file byte ranges in one pass while checking
//! the `diff_id`.
//!
//! CPU work only: no async, no network. The zlib calls live in one private module that owns the
//! `z_stream` and is the crate's only `unsafe`.
//!
//! ```
//! use std::io::{Read, Write};
//! // Realistic (not trivially repetitive) data: deflate emits a block every few dozen KiB.
//! let mut x = 1u64;
//! let data: Vec<u8> = (0..12_000_000).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; b'a' + (x % 16) as u8 }).collect();
//! let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
//! gz.write_all(&data)?;
//! let blob = gz.finish()?;
//!
//! let mut indexer = clip_seekable::GzipIndexer::new(blob.as_slice(), 1 << 20)?;
//! std::io::copy(&mut indexer, &mut std::io::sink())?;
//! let index = indexer.finish()?;
//! assert!(index.checkpoints.len() > 5);
//!
//! // Read 100 bytes at offset 7,000,000 from the nearest checkpoint only.
//! let cp = index.checkpoint_for(7_000_000).expect("a checkpoint");
//! let from = cp.compressed_offset.saturating_sub(1);
//! let got = clip_seekable::gzip::decode(cp, &blob[from as usize..], from, 7_000_000 - cp.uncompressed_offset, 100)?;
//! assert_eq!(got, &data[7_000_000..7_000_100]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chain;
pub mod gzip;
mod large;
mod plain;
mod span;
pub mod stream;
mod zlib;
pub mod zstd_layer;

pub use chain::{LayerEnd, SpanVerifier, span_key, verify_span};
pub use gzip::{CheckpointRequests, GzipIndexer};
pub use large::decode_span_to;
pub use plain::PlainIndexer;
pub use span::{HashThread, InputDigest, InputFeed};
pub use zstd_layer::ZstdIndexer;

use clip_format::Checkpoint;

/// Size of a deflate window.
pub const WINDOW: usize = 32 << 10;

/// What went wrong while indexing or decoding a layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The compressed data is not valid.
    #[error("corrupt compressed data at blob offset {compressed}: {reason}")]
    Corrupt {
        /// Blob offset where decoding failed.
        compressed: u64,
        /// zlib's reason.
        reason: String,
    },
    /// The compressed data ended early.
    #[error("compressed data ends early (at blob offset {compressed})")]
    Truncated {
        /// Blob offset where it ended.
        compressed: u64,
    },
    /// A checkpoint is malformed (untrusted archive).
    #[error("invalid checkpoint: {0}")]
    BadCheckpoint(String),
    /// The compressed bytes handed in do not cover the checkpoint.
    #[error("compressed input starting at {input} does not cover the checkpoint at {checkpoint}")]
    RangeMismatch {
        /// The checkpoint's compressed offset.
        checkpoint: u64,
        /// Where the input starts.
        input: u64,
    },
    /// A span's bytes do not match the digest recorded at indexing time.
    #[error("span at uncompressed offset {offset} does not match its digest")]
    SpanDigest {
        /// The span's uncompressed offset.
        offset: u64,
    },
    /// Reading the compressed source failed.
    #[error("reading the layer: {0}")]
    Io(#[source] std::io::Error),
    /// A sequential pass found the stream shorter than, or out of step with, the file offsets
    /// it was asked to copy (the archive or the layer is not the one it claims to be).
    #[error("uncompressed stream: {0}")]
    Stream(String),
    /// The uncompressed stream does not match its `diff_id`.
    #[error(transparent)]
    Digest(#[from] clip_format::DigestMismatch),
}

impl Error {
    /// Recovers an [`Error`] that travelled through an `io::Error` (the `Read` interface).
    #[must_use]
    pub fn from_io(e: std::io::Error) -> Self {
        if !e
            .get_ref()
            .is_some_and(<dyn std::error::Error + Send + Sync>::is::<Self>)
        {
            return Self::Io(e);
        }
        let kind = e.kind();
        match e
            .into_inner()
            .map(<dyn std::error::Error + Send + Sync>::downcast::<Self>)
        {
            Some(Ok(err)) => *err,
            _ => Self::Io(std::io::Error::from(kind)),
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match e {
            Error::Truncated { .. } => std::io::ErrorKind::UnexpectedEof,
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}

pub(crate) fn zlib_error(code: std::ffi::c_int, compressed: u64) -> Error {
    let reason = match code {
        2 => "a preset dictionary is required",
        -2 => "inconsistent stream state",
        -3 => "invalid deflate data",
        -4 => "out of memory",
        -5 => "no progress possible",
        -6 => "zlib version mismatch",
        _ => "unexpected zlib result",
    };
    Error::Corrupt {
        compressed,
        reason: format!("{reason} (zlib code {code})"),
    }
}

/// Appends what `produced` contributes to a range read: first drops up to `skip` bytes (counting
/// them off), then takes what still fits in `len`.
pub(crate) fn take_range(out: &mut Vec<u8>, produced: &[u8], skip: &mut u64, len: usize) {
    let drop = usize::try_from(*skip)
        .unwrap_or(usize::MAX)
        .min(produced.len());
    *skip -= drop as u64;
    let rest = &produced[drop..];
    let take = rest.len().min(len.saturating_sub(out.len()));
    out.extend_from_slice(&rest[..take]);
}

/// Where checkpoint `cp` starts inside `input` (compressed bytes beginning at blob offset
/// `input_offset`); an error if `input` does not cover it.
pub(crate) fn start_in(cp: &Checkpoint, input: &[u8], input_offset: u64) -> Result<usize, Error> {
    cp.compressed_offset
        .checked_sub(input_offset)
        .and_then(|r| usize::try_from(r).ok())
        .filter(|r| *r <= input.len())
        .ok_or(Error::RangeMismatch {
            checkpoint: cp.compressed_offset,
            input: input_offset,
        })
}

/// The random-access index of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerIndex {
    /// Checkpoints in increasing offset order; the first is at offset 0.
    pub checkpoints: Vec<Checkpoint>,
    /// Blob size.
    pub compressed_size: u64,
    /// Uncompressed size.
    pub uncompressed_size: u64,
    /// sha256 of the uncompressed stream (the layer's `diff_id`).
    pub diff_id: [u8; 32],
    /// gzip members or zstd frames seen (0 for uncompressed layers).
    pub members: u32,
    /// The nominal span.
    pub span: u64,
    /// The compressed input's digest, when it was fed to the indexer's [`HashThread`].
    pub input: Option<InputDigest>,
}

impl LayerIndex {
    /// The last checkpoint at or before `uncompressed_offset`.
    #[must_use]
    pub fn checkpoint_for(&self, uncompressed_offset: u64) -> Option<&Checkpoint> {
        checkpoint_for(&self.checkpoints, uncompressed_offset)
    }

    /// The layer's end, for [`verify_span`].
    #[must_use]
    pub fn end(&self) -> LayerEnd {
        LayerEnd {
            size: self.uncompressed_size,
            diff_id: self.diff_id,
        }
    }

    /// Checks span `i`'s bytes ([`verify_span`]).
    pub fn verify_span(&self, i: usize, bytes: &[u8]) -> Result<(), Error> {
        verify_span(&self.checkpoints, i, &self.end(), bytes)
    }
}

/// The last checkpoint at or before `uncompressed_offset` in `checkpoints` (sorted).
#[must_use]
pub fn checkpoint_for(checkpoints: &[Checkpoint], uncompressed_offset: u64) -> Option<&Checkpoint> {
    let i = checkpoints.partition_point(|c| c.uncompressed_offset <= uncompressed_offset);
    i.checked_sub(1).map(|i| &checkpoints[i])
}

/// The first `len` uncompressed bytes from checkpoint `cp` of a layer compressed as `media`,
/// from `input`, the blob's bytes starting at blob offset `input_offset` (for an uncompressed
/// layer blob and stream offsets are the same). One entry point for every reader of spans; the
/// caller verifies the result with [`verify_span`].
pub fn decode_span(
    media: clip_format::MediaKind,
    cp: &Checkpoint,
    input: &[u8],
    input_offset: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    match media {
        clip_format::MediaKind::Tar => {
            let from = usize::try_from(cp.uncompressed_offset.saturating_sub(input_offset))
                .unwrap_or(usize::MAX);
            input
                .get(from..from.saturating_add(len))
                .map(<[u8]>::to_vec)
                .ok_or(Error::Truncated {
                    compressed: input_offset + input.len() as u64,
                })
        }
        clip_format::MediaKind::Gzip => gzip::decode(cp, input, input_offset, 0, len),
        clip_format::MediaKind::Zstd => zstd_layer::decode(cp, input, input_offset, 0, len),
    }
}
