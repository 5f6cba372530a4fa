//! Uncompressed tar layers: every offset is a seek point; spans exist only for verification.

use std::io::{self, Read, Seek, SeekFrom};

use clip_format::CheckpointKind;

use crate::span::{HashThread, Produce, Recorder};
use crate::{Error, LayerIndex};

/// Streams an uncompressed layer, recording a plain checkpoint (and span digest) every span.
pub struct PlainIndexer<R> {
    src: R,
    rec: Recorder,
}

impl<R: Read> PlainIndexer<R> {
    /// An indexer over `src` with spans of `span` bytes.
    pub fn new(src: R, span: u64) -> Self {
        Self::with_hash_thread(src, span, HashThread::start())
    }

    /// [`Self::new`] with a helper thread the caller started (and may feed the input to).
    pub fn with_hash_thread(src: R, span: u64, thread: HashThread) -> Self {
        let mut rec = Recorder::new(span, thread);
        rec.add(CheckpointKind::Plain, 0, 0, 0, false);
        Self { src, rec }
    }

    /// Reads to the end and returns the index.
    pub fn finish(mut self) -> Result<LayerIndex, Error> {
        crate::span::drain(&mut self)?;
        let size = self.rec.end();
        let span = self.rec.span;
        let done = self.rec.finish()?;
        Ok(LayerIndex {
            checkpoints: done.checkpoints,
            compressed_size: size,
            uncompressed_size: size,
            diff_id: done.diff_id,
            members: 0,
            span,
            input: done.input,
        })
    }
}

impl<R: Read> Produce for PlainIndexer<R> {
    fn rec(&mut self) -> &mut Recorder {
        &mut self.rec
    }
    fn produce(&mut self) -> io::Result<bool> {
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
        let room = usize::try_from(room).unwrap_or(usize::MAX).max(1);
        let space = self.rec.space();
        let room = room.min(space.len());
        let n = loop {
            match self.src.read(&mut space[..room]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n > 0 && at_boundary {
            self.rec.add(CheckpointKind::Plain, end, end, 0, false);
        }
        self.rec.commit(n);
        Ok(n > 0)
    }
}

impl<R: Read> Read for PlainIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::span::read(self, buf)
    }
}

/// Skips forward without copying.
impl<R: Read> Seek for PlainIndexer<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        crate::span::seek(self, pos)
    }
}
