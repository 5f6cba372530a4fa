//! Sequential reads of whole layer streams: the one place layer blobs are decoded front to back.
//!
//! The merged tree (or a v2 archive) says, for every surviving file, which layer holds its
//! bytes and where in the layer's uncompressed tar stream they start. Copying them out is one
//! sequential pass per layer: decode the blob ([`decoder`]), skip to the next file's offset, hand
//! exactly its bytes to a sink ([`copy_out`]). While it passes, the whole uncompressed stream is
//! hashed and checked against the layer's `diff_id`, so every byte copied is verified.

use std::io::Read;

use clip_format::{Digest, MediaKind};
use sha2::{Digest as _, Sha256};

use crate::Error;

/// A file to copy out of a layer.
#[derive(Debug, Clone, Copy)]
pub struct CopyJob<T> {
    /// Offset of its first byte in the uncompressed stream.
    pub offset: u64,
    /// Its size.
    pub size: u64,
    /// Where it goes.
    pub target: T,
}

/// The uncompressed stream of a blob of type `media`.
pub fn decoder<'a>(media: MediaKind, blob: impl Read + 'a) -> Result<Box<dyn Read + 'a>, Error> {
    Ok(match media {
        MediaKind::Tar => Box::new(blob),
        MediaKind::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        MediaKind::Zstd => Box::new(zstd::stream::read::Decoder::new(blob).map_err(Error::Io)?),
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

/// Copies each job's bytes from `stream` (the uncompressed layer or data object named `layer` in
/// errors) to `sink`, in offset order, then drains the stream and checks its sha256 against
/// `diff_id` (skipped when `None`). The sink's own errors pass through unchanged.
pub fn copy_out<T, E: From<Error>>(
    layer: &dyn std::fmt::Display,
    diff_id: Option<&Digest>,
    stream: impl Read,
    jobs: &mut [CopyJob<T>],
    mut sink: impl FnMut(&T, &mut dyn Read, u64) -> Result<(), E>,
) -> Result<(), E> {
    let short = |reason: String| E::from(Error::Stream(format!("layer {layer}: {reason}")));
    jobs.sort_by_key(|j| j.offset);
    let mut s = Hashing {
        inner: stream,
        hasher: Sha256::new(),
        pos: 0,
    };
    for job in jobs.iter() {
        if job.offset < s.pos {
            return Err(short(format!(
                "file data at {} overlaps earlier data (at {})",
                job.offset, s.pos
            )));
        }
        let skip = job.offset - s.pos;
        let skipped = std::io::copy(&mut (&mut s).take(skip), &mut std::io::sink())
            .map_err(|e| E::from(Error::from_io(e)))?;
        if skipped != skip {
            return Err(short(format!(
                "the stream ends before offset {}",
                job.offset
            )));
        }
        let before = s.pos;
        sink(&job.target, &mut (&mut s).take(job.size), job.size)?;
        if s.pos - before != job.size {
            return Err(short(format!(
                "the file at {} is {} bytes but the stream gave {}",
                job.offset,
                job.size,
                s.pos - before
            )));
        }
    }
    std::io::copy(&mut s, &mut std::io::sink()).map_err(|e| E::from(Error::from_io(e)))?;
    if let Some(diff_id) = diff_id {
        diff_id
            .check(
                format!("uncompressed layer {layer}"),
                Digest::of_hasher(s.hasher),
            )
            .map_err(|e| E::from(Error::Digest(e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files_are_copied_in_one_pass_and_the_stream_is_verified() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let layer = Digest::sha256(b"blob");
        let diff_id = Digest::sha256(&data);
        let mut jobs = vec![
            CopyJob {
                offset: 5000,
                size: 10,
                target: 1,
            },
            CopyJob {
                offset: 100,
                size: 4,
                target: 0,
            },
        ];
        let mut got = [Vec::new(), Vec::new()];
        copy_out::<_, Error>(&layer, Some(&diff_id), &data[..], &mut jobs, |t, r, _| {
            r.read_to_end(&mut got[*t]).map_err(Error::Io)?;
            Ok(())
        })
        .unwrap();
        assert_eq!(got[0], &data[100..104]);
        assert_eq!(got[1], &data[5000..5010]);
        let wrong = Digest::sha256(b"other");
        let e = copy_out::<u8, Error>(&layer, Some(&wrong), &data[..], &mut [], |_, _, _| Ok(()))
            .unwrap_err();
        assert!(matches!(e, Error::Digest(_)), "{e}");
        let mut past_end = [CopyJob {
            offset: 20_000,
            size: 1,
            target: 0u8,
        }];
        let e = copy_out::<_, Error>(&layer, None, &data[..], &mut past_end, |_, _, _| Ok(()))
            .unwrap_err();
        assert!(matches!(e, Error::Stream(_)), "{e}");
    }
}
