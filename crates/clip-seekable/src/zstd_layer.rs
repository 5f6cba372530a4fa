//! zstd: frames are the only seek points. A layer of several frames gets a checkpoint at a frame
//! start about every span; a single-frame layer has one checkpoint at 0 and must be read from the
//! start (readers materialise it once).

use std::io::{self, Read, Seek, SeekFrom};

use clip_format::{Checkpoint, CheckpointKind};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::span::{HashThread, Produce, Recorder};
use crate::{Error, LayerIndex};

const IN_CHUNK: usize = 256 << 10;
const OUT_CHUNK: usize = 128 << 10;

fn corrupt(compressed: u64, e: &io::Error) -> Error {
    Error::Corrupt {
        compressed,
        reason: format!("zstd: {e}"),
    }
}

/// Streams a zstd layer (one or several frames), yielding its uncompressed bytes through
/// [`Read`] and recording a checkpoint at a frame start about every span.
pub struct ZstdIndexer<R> {
    src: R,
    dec: Decoder<'static>,
    inbuf: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    eof: bool,
    compressed: u64,
    rec: Recorder,
    frames: u32,
    in_frame: bool,
    done: bool,
}

impl<R: Read> ZstdIndexer<R> {
    /// An indexer over the compressed stream `src`.
    pub fn new(src: R, span: u64) -> Result<Self, Error> {
        Self::with_hash_thread(src, span, HashThread::start())
    }

    /// [`Self::new`] with a helper thread the caller started (and may feed the input to).
    pub fn with_hash_thread(src: R, span: u64, thread: HashThread) -> Result<Self, Error> {
        let mut rec = Recorder::new(span, thread);
        rec.add(CheckpointKind::ZstdFrame, 0, 0, 0, false);
        Ok(Self {
            src,
            dec: Decoder::new().map_err(|e| corrupt(0, &e))?,
            inbuf: vec![0; IN_CHUNK].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            eof: false,
            compressed: 0,
            rec,
            frames: 0,
            in_frame: false,
            done: false,
        })
    }

    fn step(&mut self) -> io::Result<()> {
        if self.in_pos == self.in_len && !self.eof {
            let n = loop {
                match self.src.read(&mut self.inbuf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            self.in_pos = 0;
            self.in_len = n;
            self.eof = n == 0;
        }
        if self.in_pos == self.in_len && self.eof {
            if self.in_frame || self.frames == 0 {
                return Err(Error::Truncated {
                    compressed: self.compressed,
                }
                .into());
            }
            self.done = true;
            return Ok(());
        }
        let mut inb = InBuffer::around(&self.inbuf[self.in_pos..self.in_len]);
        let mut outb = OutBuffer::around(self.rec.space());
        let hint = self
            .dec
            .run(&mut inb, &mut outb)
            .map_err(|e| io::Error::from(corrupt(self.compressed, &e)))?;
        let (consumed, produced) = (inb.pos(), outb.pos());
        self.in_pos += consumed;
        self.compressed += consumed as u64;
        self.in_frame = true;
        self.rec.commit(produced);
        if hint == 0 {
            // A frame ended here; the next byte (if any) starts the next frame.
            self.in_frame = false;
            self.frames += 1;
            let out = self.rec.end();
            let due = self.rec.last().is_none_or(|l| out >= l + self.rec.span);
            if due && self.rec.can_add(out, false) {
                self.rec
                    .add(CheckpointKind::ZstdFrame, self.compressed, out, 0, false);
            }
        }
        Ok(())
    }

    /// Reads to the end and returns the index (`members` counts frames).
    pub fn finish(mut self) -> Result<LayerIndex, Error> {
        crate::span::drain(&mut self)?;
        let (compressed, frames, span) = (self.compressed, self.frames, self.rec.span);
        let uncompressed = self.rec.end();
        let done = self.rec.finish()?;
        let mut checkpoints = done.checkpoints;
        // A checkpoint recorded at the very end (after the last frame) starts nothing.
        if checkpoints.len() > 1
            && checkpoints
                .last()
                .is_some_and(|c| c.uncompressed_offset == uncompressed)
        {
            checkpoints.pop();
        }
        Ok(LayerIndex {
            checkpoints,
            compressed_size: compressed,
            uncompressed_size: uncompressed,
            diff_id: done.diff_id,
            members: frames,
            span,
            input: done.input,
        })
    }
}

impl<R: Read> Produce for ZstdIndexer<R> {
    fn rec(&mut self) -> &mut Recorder {
        &mut self.rec
    }
    fn produce(&mut self) -> io::Result<bool> {
        if self.done {
            return Ok(false);
        }
        self.step()?;
        Ok(true)
    }
}

impl<R: Read> Read for ZstdIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::span::read(self, buf)
    }
}

/// Skips forward without copying.
impl<R: Read> Seek for ZstdIndexer<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        crate::span::seek(self, pos)
    }
}

/// Decodes `len` bytes starting `skip` bytes after frame-start checkpoint `cp`, from compressed
/// bytes `input` starting at blob offset `input_offset`. Crosses frame boundaries.
pub fn decode(
    cp: &Checkpoint,
    input: &[u8],
    input_offset: u64,
    skip: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    if cp.kind != CheckpointKind::ZstdFrame {
        return Err(Error::BadCheckpoint(format!(
            "{:?} checkpoint in a zstd layer",
            cp.kind
        )));
    }
    let rel = crate::start_in(cp, input, input_offset)?;
    let mut dec = Decoder::new().map_err(|e| corrupt(cp.compressed_offset, &e))?;
    let mut pos = rel;
    let mut skip = skip;
    let mut out = Vec::with_capacity(len.min(64 << 20));
    let mut buf = vec![0u8; OUT_CHUNK];
    while out.len() < len && pos < input.len() {
        let mut inb = InBuffer::around(&input[pos..]);
        let mut outb = OutBuffer::around(&mut buf[..]);
        dec.run(&mut inb, &mut outb)
            .map_err(|e| corrupt(input_offset + pos as u64, &e))?;
        let (consumed, produced) = (inb.pos(), outb.pos());
        if consumed == 0 && produced == 0 {
            return Err(Error::Truncated {
                compressed: input_offset + pos as u64,
            });
        }
        pos += consumed;
        crate::take_range(&mut out, &buf[..produced], &mut skip, len);
    }
    // Drain output still buffered inside the decoder.
    while out.len() < len {
        let mut inb = InBuffer::around(&[][..]);
        let mut outb = OutBuffer::around(&mut buf[..]);
        dec.run(&mut inb, &mut outb)
            .map_err(|e| corrupt(input_offset + pos as u64, &e))?;
        let produced = outb.pos();
        if produced == 0 {
            break;
        }
        crate::take_range(&mut out, &buf[..produced], &mut skip, len);
    }
    Ok(out)
}
