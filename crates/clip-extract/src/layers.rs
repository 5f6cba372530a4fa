//! Sequential reads of layer streams: the one place the v1 path decodes layer blobs.
//!
//! The merged tree (or a v2 archive) says, for every surviving file, which layer holds its
//! bytes and where in the layer's uncompressed tar stream they start. Copying them out is one
//! sequential pass per layer: decode the blob, skip to the next file's offset, hand exactly its
//! bytes to a sink. While it passes, the whole uncompressed stream is hashed and checked against
//! the layer's `diff_id`, so every byte copied is verified.

use std::io::Read;

use clip_format::MediaKind;
use sha2::{Digest as _, Sha256};

use crate::{Error, Result};

/// A file to copy out of a layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job<T> {
    /// Offset of its first byte in the uncompressed stream.
    pub(crate) offset: u64,
    /// Its size.
    pub(crate) size: u64,
    /// Where it goes.
    pub(crate) target: T,
}

/// The uncompressed stream of a blob.
pub(crate) fn decoder<'a>(media: MediaKind, blob: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    Ok(match media {
        MediaKind::Tar => Box::new(blob),
        MediaKind::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        MediaKind::Zstd => {
            Box::new(
                zstd::stream::read::Decoder::new(blob).map_err(|e| Error::Layer {
                    layer: String::new(),
                    reason: format!("zstd: {e}"),
                })?,
            )
        }
    })
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    pos: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Copies each job's bytes from `stream` (the uncompressed layer `digest`) to `sink`, in offset
/// order, then drains the stream and checks its sha256 against `diff_id`.
pub(crate) fn copy_out<T>(
    digest: &str,
    diff_id: &str,
    stream: impl Read,
    jobs: &mut [Job<T>],
    mut sink: impl FnMut(&T, &mut dyn Read, u64) -> Result<()>,
) -> Result<()> {
    let layer_err = |reason: String| Error::Layer {
        layer: digest.to_owned(),
        reason,
    };
    jobs.sort_by_key(|j| j.offset);
    let mut s = Hashing {
        inner: stream,
        hasher: Sha256::new(),
        pos: 0,
    };
    for job in jobs.iter() {
        if job.offset < s.pos {
            return Err(layer_err(format!(
                "file data at {} overlaps earlier data (at {})",
                job.offset, s.pos
            )));
        }
        let skip = job.offset - s.pos;
        let skipped = std::io::copy(&mut (&mut s).take(skip), &mut std::io::sink())
            .map_err(|e| layer_err(e.to_string()))?;
        if skipped != skip {
            return Err(layer_err(format!(
                "stream ends before offset {}",
                job.offset
            )));
        }
        let before = s.pos;
        sink(&job.target, &mut (&mut s).take(job.size), job.size)?;
        if s.pos - before != job.size {
            return Err(layer_err(format!(
                "file at {} is {} bytes but the stream gave {}",
                job.offset,
                job.size,
                s.pos - before
            )));
        }
    }
    std::io::copy(&mut s, &mut std::io::sink()).map_err(|e| layer_err(e.to_string()))?;
    let found = format!("sha256:{}", hex::encode(s.hasher.finalize()));
    if !diff_id.is_empty() && found != diff_id {
        return Err(Error::Digest {
            what: format!("uncompressed layer {digest}"),
            expected: diff_id.to_owned(),
            found,
        });
    }
    Ok(())
}
