//! Uncompressed tar layers: every offset is a seek point; spans exist only for verification.

use std::io::{self, Read};

use clip_format::CheckpointKind;

use crate::span::Recorder;
use crate::{Error, LayerIndex};

/// Streams an uncompressed layer, recording a plain checkpoint (and span digest) every span.
pub struct PlainIndexer<R> {
    src: R,
    rec: Recorder,
}

impl<R: Read> PlainIndexer<R> {
    /// An indexer over `src` with spans of `span` bytes.
    pub fn new(src: R, span: u64) -> Self {
        let mut rec = Recorder::new(span);
        rec.add(CheckpointKind::Plain, 0, 0, 0, false);
        Self { src, rec }
    }

    /// Reads to the end and returns the index.
    pub fn finish(mut self) -> Result<LayerIndex, Error> {
        crate::drain(&mut self)?;
        let size = self.rec.end();
        let span = self.rec.span;
        let (checkpoints, diff) = self.rec.finish();
        Ok(LayerIndex {
            checkpoints,
            compressed_size: size,
            uncompressed_size: size,
            diff_id: diff,
            members: 0,
            span,
        })
    }
}

impl<R: Read> Read for PlainIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Stop at each span boundary so checkpoints land exactly on it; a boundary becomes a
        // checkpoint only once data follows it (no empty span at the end).
        let end = self.rec.end();
        let next = self.rec.last().map_or(0, |l| l + self.rec.span);
        let at_boundary = end == next;
        let room = if at_boundary {
            self.rec.span
        } else {
            next.saturating_sub(end)
        };
        let room = usize::try_from(room)
            .unwrap_or(usize::MAX)
            .clamp(1, 64 << 10);
        let n = buf.len().min(room);
        let n = self.src.read(&mut buf[..n])?;
        if n > 0 && at_boundary {
            self.rec.add(CheckpointKind::Plain, end, end, 0, false);
        }
        self.rec.push(&buf[..n]);
        Ok(n)
    }
}
