//! gzip: build checkpoints while streaming a layer once, and resume from any of them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::rc::Rc;

use clip_format::{Checkpoint, CheckpointKind};
use libz_rs_sys::{Z_BUF_ERROR, Z_OK, Z_STREAM_END};

use crate::span::{HashThread, Produce, Recorder, expand_window};
use crate::zlib::{GZIP, Inflater, RAW};
use crate::{Error, LayerIndex, zlib_error};

const OUT_CHUNK: usize = 64 << 10;
/// Block boundaries remembered for placing checkpoints behind the read position.
const MAX_BOUNDARIES: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Boundary {
    compressed: u64,
    bits: u8,
    out: u64,
    member_start: bool,
}

/// Asks a running [`GzipIndexer`] for a checkpoint at (or just before) an uncompressed offset,
/// e.g. the first data byte of a large file, while a tar reader owns the indexer.
#[derive(Clone, Debug, Default)]
pub struct CheckpointRequests(Rc<RefCell<Vec<u64>>>);

impl CheckpointRequests {
    /// Requests a checkpoint at the last block boundary at or before `uncompressed_offset`.
    pub fn request(&self, uncompressed_offset: u64) {
        self.0.borrow_mut().push(uncompressed_offset);
    }
}

/// Streams a gzip layer (one or several members), yielding its uncompressed bytes through
/// [`Read`] and recording checkpoints every span and where requested. It inflates straight out
/// of the source's buffer ([`BufRead`]): a source that holds the network's buffers (the
/// registry's blob reader) costs no copy of the compressed bytes.
///
/// The members' CRC-32 trailers are not computed or checked: the sha256 of the whole output
/// ([`LayerIndex::diff_id`]) verifies every byte, and the caller compares it with the image
/// config's `diff_id` (zlib's CRC would cost about 3% of inflation and prove less).
pub struct GzipIndexer<R> {
    src: R,
    compressed: u64,
    /// Calls in a row that moved nothing (a stop at a block end moves nothing once).
    stalls: u8,
    inflater: Inflater,
    rec: Recorder,
    boundaries: VecDeque<Boundary>,
    settled: usize,
    requests: CheckpointRequests,
    member_out: u64,
    members: u32,
    done: bool,
}

impl<R: BufRead> GzipIndexer<R> {
    /// An indexer over the compressed stream `src` with checkpoints about every `span` bytes of
    /// output.
    pub fn new(src: R, span: u64) -> Result<Self, Error> {
        Self::with_hash_thread(src, span, HashThread::start())
    }

    /// [`Self::new`] with a helper thread the caller started (and may feed the input to).
    pub fn with_hash_thread(src: R, span: u64, thread: HashThread) -> Result<Self, Error> {
        let mut rec = Recorder::new(span, thread);
        rec.add(CheckpointKind::GzipMember, 0, 0, 0, false);
        let mut inflater = Inflater::new(GZIP).map_err(|c| zlib_error(c, 0))?;
        inflater.skip_check().map_err(|c| zlib_error(c, 0))?;
        Ok(Self {
            src,
            compressed: 0,
            stalls: 0,
            inflater,
            rec,
            boundaries: VecDeque::new(),
            settled: 0,
            requests: CheckpointRequests::default(),
            member_out: 0,
            members: 1,
            done: false,
        })
    }

    /// A handle for requesting checkpoints while a tar reader owns the indexer.
    #[must_use]
    pub fn requests(&self) -> CheckpointRequests {
        self.requests.clone()
    }

    /// Whether the source has no more bytes.
    fn at_end(&mut self) -> io::Result<bool> {
        loop {
            match self.src.fill_buf() {
                Ok(b) => return Ok(b.is_empty()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn boundary(&mut self, b: Boundary) {
        if let Some(last) = self.boundaries.back_mut()
            && last.out == b.out
        {
            // An empty block: the later boundary serves the same output position.
            if !last.member_start {
                *last = b;
            }
            return;
        }
        self.boundaries.push_back(b);
        if self.boundaries.len() > MAX_BOUNDARIES {
            self.boundaries.pop_front();
            self.settled = self.settled.saturating_sub(1);
        }
    }

    /// One inflate call; queues boundaries and output.
    fn step(&mut self) -> io::Result<()> {
        let truncated = |at| io::Error::from(Error::Truncated { compressed: at });
        // Inflate inside the match: a second `fill_buf` after a successful one could be
        // interrupted again, and retrying the whole step on that could go on forever.
        let s = loop {
            match self.src.fill_buf() {
                Ok([]) => return Err(truncated(self.compressed)),
                Ok(input) => break self.inflater.inflate(input, self.rec.space(), true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        self.src.consume(s.consumed);
        self.compressed += s.consumed as u64;
        self.rec.commit(s.produced);
        let out = self.rec.end();
        match s.code {
            Z_OK | Z_BUF_ERROR => {
                let dt = self.inflater.data_type();
                // A block ends here (not the member's last). A call that stops at a block end
                // without progress (Z_BUF_ERROR) still stops at a block end.
                if dt & 128 != 0 && dt & 64 == 0 && out > self.member_out {
                    let bits = u8::try_from(dt & 7).unwrap_or(0);
                    self.boundary(Boundary {
                        compressed: self.compressed,
                        bits,
                        out,
                        member_start: false,
                    });
                }
                // zlib takes in all input it is given, so only a stop at a block end moves
                // nothing, and the call after it moves on; never loop on a stuck stream.
                self.stalls = if s.consumed == 0 && s.produced == 0 {
                    self.stalls + 1
                } else {
                    0
                };
                if self.stalls > 2 {
                    return Err(truncated(self.compressed));
                }
            }
            Z_STREAM_END => {
                if self.at_end()? {
                    self.done = true;
                } else {
                    self.inflater
                        .reset(GZIP)
                        .and_then(|()| self.inflater.skip_check())
                        .map_err(|c| io::Error::from(zlib_error(c, self.compressed)))?;
                    self.members += 1;
                    self.member_out = out;
                    self.boundary(Boundary {
                        compressed: self.compressed,
                        bits: 0,
                        out,
                        member_start: true,
                    });
                }
            }
            code => return Err(zlib_error(code, self.compressed).into()),
        }
        Ok(())
    }

    /// Places checkpoints that are now decidable: requested ones whose position has been
    /// inflated past, then span checkpoints at boundaries the consumer has passed. Requests go
    /// first: a request's boundary lies at or before its position, which the consumer had reached
    /// when the request was made, so it precedes every boundary not yet settled. Taking them in
    /// this order makes placement independent of how much one inflate call produced.
    fn settle(&mut self) {
        self.settle_requests();
        while let Some(b) = self.boundaries.get(self.settled).copied() {
            if b.out > self.rec.consumed() {
                break;
            }
            self.settled += 1;
            let due = self.rec.last().is_none_or(|l| b.out >= l + self.rec.span);
            if due && self.rec.can_add(b.out, !b.member_start) {
                self.add(b);
            }
        }
    }

    fn settle_requests(&mut self) {
        let end = self.rec.end();
        let mut reqs = self.requests.0.borrow_mut();
        if reqs.is_empty() {
            return;
        }
        let ready: Vec<u64> = reqs
            .iter()
            .copied()
            .filter(|r| *r < end || self.done)
            .collect();
        // Strictly behind the output: a block ending exactly at `r` is known only once output
        // past `r` exists.
        reqs.retain(|r| *r >= end && !self.done);
        drop(reqs);
        for r in ready {
            let i = self.boundaries.partition_point(|b| b.out <= r);
            if let Some(b) = i
                .checked_sub(1)
                .and_then(|i| self.boundaries.get(i))
                .copied()
                && self.rec.can_add(b.out, !b.member_start)
            {
                self.add(b);
            }
        }
    }

    fn add(&mut self, b: Boundary) {
        let kind = if b.member_start {
            CheckpointKind::GzipMember
        } else {
            CheckpointKind::Deflate
        };
        self.rec
            .add(kind, b.compressed, b.out, b.bits, !b.member_start);
    }

    /// Reads the stream to its end (a tar reader stops at the end-of-archive marker) and returns
    /// the index.
    pub fn finish(mut self) -> Result<LayerIndex, Error> {
        crate::span::drain(&mut self)?;
        let (compressed, members, span) = (self.compressed, self.members, self.rec.span);
        let uncompressed = self.rec.end();
        let done = self.rec.finish()?;
        Ok(LayerIndex {
            checkpoints: done.checkpoints,
            compressed_size: compressed,
            uncompressed_size: uncompressed,
            diff_id: done.diff_id,
            members,
            span,
            input: done.input,
        })
    }
}

impl<R: BufRead> Produce for GzipIndexer<R> {
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
    fn consumed(&mut self) {
        self.settle();
    }
}

impl<R: BufRead> Read for GzipIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::span::read(self, buf)
    }
}

/// Skips forward without copying (how a tar reader with `entries_with_seek` passes over file data).
impl<R: BufRead> Seek for GzipIndexer<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        crate::span::seek(self, pos)
    }
}

/// Decodes `len` bytes starting `skip` bytes after `cp`'s uncompressed offset, from compressed
/// bytes `input` that start at blob offset `input_offset` (they must cover the checkpoint's
/// position, including the byte before it when `cp.bits > 0`). Crosses gzip member boundaries.
/// Returns fewer bytes only if the layer ends first.
pub fn decode(
    cp: &Checkpoint,
    input: &[u8],
    input_offset: u64,
    skip: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    let rel = crate::start_in(cp, input, input_offset)?;
    let (mut inflater, mut raw) = match cp.kind {
        CheckpointKind::Deflate => {
            let mut inf = Inflater::new(RAW).map_err(|c| zlib_error(c, cp.compressed_offset))?;
            if cp.bits > 0 {
                if cp.bits > 7 || rel == 0 {
                    return Err(Error::RangeMismatch {
                        checkpoint: cp.compressed_offset,
                        input: input_offset,
                    });
                }
                let byte = input[rel - 1];
                inf.prime(cp.bits, byte >> (8 - cp.bits))
                    .map_err(|c| zlib_error(c, cp.compressed_offset))?;
            }
            let window = expand_window(&cp.window)?;
            inf.set_dictionary(&window)
                .map_err(|c| zlib_error(c, cp.compressed_offset))?;
            (inf, true)
        }
        CheckpointKind::GzipMember => (
            Inflater::new(GZIP).map_err(|c| zlib_error(c, cp.compressed_offset))?,
            false,
        ),
        other => {
            return Err(Error::BadCheckpoint(format!(
                "{other:?} checkpoint in a gzip layer"
            )));
        }
    };
    let mut pos = rel;
    let mut skip = skip;
    let mut out = Vec::with_capacity(len.min(64 << 20));
    let mut buf = vec![0u8; OUT_CHUNK];
    while out.len() < len {
        let s = inflater.inflate(&input[pos..], &mut buf, false);
        pos += s.consumed;
        crate::take_range(&mut out, &buf[..s.produced], &mut skip, len);
        let at = input_offset + pos as u64;
        match s.code {
            Z_OK => {}
            Z_BUF_ERROR => {
                if s.consumed == 0 && s.produced == 0 {
                    return Err(Error::Truncated { compressed: at });
                }
            }
            Z_STREAM_END => {
                if raw {
                    pos += 8; // the member's trailer, which raw inflate does not read
                }
                if pos >= input.len() {
                    break;
                }
                inflater.reset(GZIP).map_err(|c| zlib_error(c, at))?;
                raw = false;
            }
            code => return Err(zlib_error(code, at)),
        }
    }
    Ok(out)
}
