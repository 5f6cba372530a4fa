//! Output chunks and span bookkeeping shared by the gzip, zstd and plain indexers.
//!
//! An indexer decodes straight into the [`Recorder`]'s current output chunk ([`Recorder::space`],
//! [`Recorder::commit`]); its consumer (the tar walker) copies out of that chunk or skips over
//! it. A full chunk is frozen and shared, without copying, with the helper thread that hashes
//! it and with the short history kept for checkpoint windows.
//!
//! One helper thread per layer ([`HashThread`]) does all the hashing that can leave the decoding
//! thread: the output's SHA-256 with its span chaining values, the checkpoint windows'
//! compression and, when the caller feeds it ([`InputFeed`]), the SHA-256 of the compressed
//! input (the blob digest). Two busy threads per layer, not three: on a two-core machine the
//! decoding thread keeps a core to itself.

use std::collections::VecDeque;
use std::io::{Read, Write as _};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use clip_format::{Checkpoint, CheckpointKind};

use crate::chain::Chain;

use crate::{Error, WINDOW};

/// How far span hashing lags behind the newest output, so that a checkpoint can still be placed
/// at a block boundary somewhat behind the current position (the start of a large file).
pub(crate) const HASH_LAG: u64 = 2 << 20;
/// Size of one output chunk.
const CHUNK: usize = 128 << 10;
/// Frozen chunks are kept while they end less than this far behind the newest output: enough for
/// a window at any position a checkpoint may still be placed.
const KEEP: u64 = HASH_LAG + 2 * CHUNK as u64 + WINDOW as u64;
/// Batches in flight to the hashing thread (with [`BATCH`], bounds the memory it holds).
const QUEUE: usize = 8;
/// Output chunks per batch sent to the hashing thread: one wake-up per megabyte, not one per
/// chunk.
const BATCH: usize = 8;
/// Spare chunk buffers kept for reuse.
const SPARE: usize = 16;

/// Chunk buffers for reuse, returned by whichever side (the output history or the hashing
/// thread) lets go of a chunk last.
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<Vec<u8>>>>);

impl Pool {
    fn get(&self) -> Vec<u8> {
        let spare = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        spare.unwrap_or_else(|| vec![0; CHUNK])
    }
    /// Takes the chunk back if nobody else holds it.
    fn give(&self, chunk: Arc<Vec<u8>>) {
        if let Ok(mut v) = Arc::try_unwrap(chunk) {
            let mut spare = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if spare.len() < SPARE {
                v.resize(CHUNK, 0);
                spare.push(v);
            }
        }
    }
}

/// The output: frozen chunks (shared, immutable) followed by the chunk being written.
struct Output {
    frozen: VecDeque<(u64, Arc<Vec<u8>>)>,
    cur: Vec<u8>,
    cur_start: u64,
    cur_fill: usize,
    consumed: u64,
    pool: Pool,
}

impl Output {
    fn new(pool: Pool) -> Self {
        Self {
            frozen: VecDeque::new(),
            cur: pool.get(),
            cur_start: 0,
            cur_fill: 0,
            consumed: 0,
            pool,
        }
    }
    fn end(&self) -> u64 {
        self.cur_start + self.cur_fill as u64
    }
    /// Freezes the current chunk (if it holds anything) and starts an empty one.
    fn freeze(&mut self) -> Option<Arc<Vec<u8>>> {
        if self.cur_fill == 0 {
            return None;
        }
        let next = self.pool.get();
        let mut full = std::mem::replace(&mut self.cur, next);
        full.truncate(self.cur_fill);
        let full = Arc::new(full);
        self.frozen.push_back((self.cur_start, Arc::clone(&full)));
        self.cur_start += self.cur_fill as u64;
        self.cur_fill = 0;
        let keep_from = self.end().saturating_sub(KEEP);
        while let Some((start, c)) = self.frozen.front()
            && start + c.len() as u64 <= keep_from
        {
            let Some((_, c)) = self.frozen.pop_front() else {
                break;
            };
            self.pool.give(c);
        }
        Some(full)
    }
    /// Whether `[from, to)` is still held.
    fn holds(&self, from: u64, to: u64) -> bool {
        let oldest = self.frozen.front().map_or(self.cur_start, |(s, _)| *s);
        from <= to && to <= self.end() && from >= oldest
    }
    /// Calls `f` with the pieces of `[from, to)` in order (caller checked `holds`).
    fn each(&self, from: u64, to: u64, f: impl FnMut(&[u8])) {
        let pieces = self
            .frozen
            .iter()
            .map(|(s, c)| (*s, c.as_slice()))
            .chain(std::iter::once((
                self.cur_start,
                &self.cur[..self.cur_fill],
            )));
        slice_pieces(pieces, from, to, f);
    }
}

/// Calls `f` with the parts of stream range `[from, to)` found in `pieces` (each its stream
/// offset and bytes, in stream order).
fn slice_pieces<'a>(
    pieces: impl IntoIterator<Item = (u64, &'a [u8])>,
    from: u64,
    to: u64,
    mut f: impl FnMut(&[u8]),
) {
    for (start, bytes) in pieces {
        if start >= to {
            break;
        }
        let end = start + bytes.len() as u64;
        if end <= from {
            continue;
        }
        let a = usize::try_from(from.saturating_sub(start)).unwrap_or(usize::MAX);
        let b = usize::try_from(to.min(end) - start).unwrap_or(usize::MAX);
        f(&bytes[a..b]);
    }
}

/// Work for the hashing thread, in stream order.
enum Msg {
    /// The next output bytes.
    Data(Arc<Vec<u8>>),
    /// No span will be cut before this output position: hash up to it.
    Safe(u64),
    /// A span ends at this output position.
    Cut(u64),
    /// The raw window of checkpoint `.0`, to be compressed for storage.
    Window(usize, Vec<u8>),
    /// The next compressed input bytes, for the input digest.
    Input(bytes::Bytes),
    /// Nothing more: finish (a fed input's sender may still be alive).
    End,
}

/// Per checkpoint its chaining value and head, the whole stream's digest, the compressed
/// windows, and the input's digest and length.
struct Hashed {
    chain: Vec<([u8; 32], Vec<u8>)>,
    whole: [u8; 32],
    windows: Vec<(usize, Vec<u8>)>,
    input: ([u8; 32], u64),
}

/// The SHA-256 and length of the compressed input an [`InputFeed`] passed to the hashing thread
/// (the blob digest a caller compares with the descriptor's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputDigest {
    /// SHA-256 of the bytes fed.
    pub sha256: [u8; 32],
    /// How many bytes were fed.
    pub len: u64,
}

/// An indexer's helper thread, started before the indexer so that the reader feeding it can
/// send the compressed bytes it hands out ([`HashThread::input`]); pass it to the indexer's
/// `with_hash_thread` constructor. The indexer reports the input's digest in
/// [`crate::LayerIndex::input`].
pub struct HashThread {
    hasher: Hasher,
    pool: Pool,
    fed: bool,
}

impl HashThread {
    /// Starts the thread.
    #[must_use]
    pub fn start() -> Self {
        let pool = Pool::default();
        Self {
            hasher: Hasher::start(pool.clone()),
            pool,
            fed: false,
        }
    }

    /// A feed for the compressed input. Every byte the indexer will read must be fed, in order,
    /// before the indexer finishes ([`InputFeed::flush`] at the end of the input).
    pub fn input(&mut self) -> InputFeed {
        self.fed = true;
        InputFeed {
            tx: self.hasher.tx.clone(),
            batch: Vec::new(),
            bytes: 0,
        }
    }
}

/// Passes compressed input to a [`HashThread`] for its digest, shared rather than copied, in
/// batches of about a megabyte (one wake-up each).
pub struct InputFeed {
    tx: Option<std::sync::mpsc::SyncSender<Vec<Msg>>>,
    batch: Vec<Msg>,
    bytes: usize,
}

impl InputFeed {
    /// Queues the next input bytes.
    pub fn feed(&mut self, b: bytes::Bytes) {
        self.bytes += b.len();
        self.batch.push(Msg::Input(b));
        if self.bytes >= BATCH * CHUNK {
            self.flush();
        }
    }

    /// Sends what is queued.
    pub fn flush(&mut self) {
        self.bytes = 0;
        if let Some(tx) = &self.tx
            && !self.batch.is_empty()
        {
            let _ = tx.send(std::mem::take(&mut self.batch));
        }
    }
}

impl Drop for InputFeed {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Hashes the output on its own thread, so inflation and hashing overlap: one SHA-256 over the
/// stream (the `diff_id`), lagging behind the output so that the chaining value can be taken
/// at each checkpoint's 64-byte block boundary (module `chain`). It also compresses the
/// checkpoint windows.
struct Hasher {
    tx: Option<std::sync::mpsc::SyncSender<Vec<Msg>>>,
    thread: Option<std::thread::JoinHandle<Hashed>>,
    /// Messages not sent yet, and how many output chunks they carry.
    batch: Vec<Msg>,
    chunks: usize,
}

impl Hasher {
    fn start(pool: Pool) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Msg>>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("clip-span-hash".into())
            .spawn(move || {
                let mut chain = Chain::new();
                let mut cuts = vec![(crate::chain::initial(), Vec::new())];
                let mut windows = Vec::new();
                let mut input = (Sha256::new(), 0u64);
                let mut queue: VecDeque<Arc<Vec<u8>>> = VecDeque::new();
                // Stream position of the first queued byte not yet hashed is chain.total().
                let mut queued_from = 0u64;
                // Hashes queued bytes up to `to`.
                let advance = |queue: &mut VecDeque<Arc<Vec<u8>>>,
                               queued_from: &mut u64,
                               chain: &mut Chain,
                               to: u64| {
                    while chain.total() < to {
                        let Some(front) = queue.front() else { break };
                        let start = usize::try_from(chain.total() - *queued_from).unwrap_or(0);
                        let n = usize::try_from(to - chain.total())
                            .unwrap_or(usize::MAX)
                            .min(front.len() - start);
                        chain.update(&front[start..start + n]);
                        if start + n == front.len() {
                            *queued_from += front.len() as u64;
                            if let Some(done) = queue.pop_front() {
                                pool.give(done);
                            }
                        }
                    }
                };
                'recv: for msg in rx.into_iter().flatten() {
                    match msg {
                        Msg::Data(d) => queue.push_back(d),
                        // Only to a block boundary: a later cut may stand in the same block.
                        Msg::Safe(w) => {
                            advance(&mut queue, &mut queued_from, &mut chain, w - w % 64);
                        }
                        Msg::Cut(cut) => {
                            let block = cut - cut % 64;
                            advance(&mut queue, &mut queued_from, &mut chain, block);
                            let value = chain.value().unwrap_or_default();
                            // The head: queued bytes [block, cut), not consumed.
                            let mut head = Vec::with_capacity(64);
                            let pieces = queue.iter().scan(queued_from, |at, chunk| {
                                let start = *at;
                                *at += chunk.len() as u64;
                                Some((start, chunk.as_slice()))
                            });
                            slice_pieces(pieces, block, cut, |b| head.extend_from_slice(b));
                            cuts.push((value, head));
                        }
                        Msg::Window(i, raw) => windows.push((i, compress_window(&raw))),
                        Msg::Input(b) => {
                            input.0.update(&b);
                            input.1 += b.len() as u64;
                        }
                        Msg::End => break 'recv,
                    }
                }
                advance(&mut queue, &mut queued_from, &mut chain, u64::MAX);
                Hashed {
                    chain: cuts,
                    whole: chain.finalize(),
                    windows,
                    input: (input.0.finalize().into(), input.1),
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            thread,
            batch: Vec::with_capacity(2 * BATCH),
            chunks: 0,
        }
    }

    fn send(&mut self, m: Msg) {
        self.chunks += usize::from(matches!(m, Msg::Data(_)));
        self.batch.push(m);
        if self.chunks >= BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.chunks = 0;
        if let Some(tx) = &self.tx
            && !self.batch.is_empty()
        {
            let _ = tx.send(std::mem::replace(
                &mut self.batch,
                Vec::with_capacity(2 * BATCH),
            ));
        }
    }

    fn finish(mut self) -> Option<Hashed> {
        self.batch.push(Msg::End);
        self.flush();
        self.tx = None;
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        // Ends the thread even while an input feed's sender lives on.
        self.batch = vec![Msg::End];
        self.flush();
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Records checkpoints with their span checks (chaining values and heads) and the sha256 of the
/// whole stream, and holds the output between the decoder and its consumer.
pub(crate) struct Recorder {
    pub(crate) span: u64,
    out: Output,
    pub(crate) checkpoints: Vec<Checkpoint>,
    hasher: Hasher,
    /// No checkpoint may be placed before this output position any more.
    safe_upto: u64,
    /// Span ends not yet sent to the hashing thread (their bytes are still in the current chunk).
    cuts: VecDeque<u64>,
    /// Whether the input is fed to the hashing thread.
    fed: bool,
}

impl Recorder {
    pub(crate) fn new(span: u64, thread: HashThread) -> Self {
        Self {
            span: span.max(1),
            out: Output::new(thread.pool),
            checkpoints: Vec::new(),
            hasher: thread.hasher,
            safe_upto: 0,
            cuts: VecDeque::new(),
            fed: thread.fed,
        }
    }

    /// Total output so far.
    pub(crate) fn end(&self) -> u64 {
        self.out.end()
    }

    /// Output position of the newest checkpoint.
    pub(crate) fn last(&self) -> Option<u64> {
        self.checkpoints.last().map(|c| c.uncompressed_offset)
    }

    /// Room for the next output: the unused tail of the current chunk, never empty. Call only
    /// when everything produced has been consumed ([`Self::pending`] is 0).
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.out.cur_fill == CHUNK {
            self.ship();
        }
        &mut self.out.cur[self.out.cur_fill..]
    }

    /// Marks the first `n` bytes of [`Self::space`] as produced.
    pub(crate) fn commit(&mut self, n: usize) {
        self.out.cur_fill = (self.out.cur_fill + n).min(CHUNK);
        let target = self
            .out
            .end()
            .saturating_sub(HASH_LAG)
            .min(self.out.cur_start);
        // In steps of a chunk: a message per deflate block would wake the hashing thread
        // thousands of times per layer.
        if target >= self.safe_upto + CHUNK as u64 {
            self.safe_upto = target;
            self.hasher.send(Msg::Safe(target));
        }
    }

    /// Produced bytes the consumer has not taken yet.
    pub(crate) fn pending(&self) -> usize {
        usize::try_from(self.out.end() - self.out.consumed).unwrap_or(usize::MAX)
    }

    /// Bytes the consumer has taken or skipped.
    pub(crate) fn consumed(&self) -> u64 {
        self.out.consumed
    }

    /// Copies pending output into `buf`; returns how much.
    pub(crate) fn take(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.pending());
        let from = self.out.consumed;
        if let Some(at) = from
            .checked_sub(self.out.cur_start)
            .and_then(|a| usize::try_from(a).ok())
        {
            buf[..n].copy_from_slice(&self.out.cur[at..at + n]);
        } else {
            let mut w = 0;
            self.out.each(from, from + n as u64, |b| {
                buf[w..w + b.len()].copy_from_slice(b);
                w += b.len();
            });
        }
        self.out.consumed += n as u64;
        n
    }

    /// Passes over up to `n` pending bytes without copying them; returns how many.
    pub(crate) fn skip(&mut self, n: u64) -> u64 {
        let n = n.min(self.pending() as u64);
        self.out.consumed += n;
        n
    }

    /// Sends the current chunk, and the span ends it completes, to the hashing thread.
    fn ship(&mut self) {
        if let Some(chunk) = self.out.freeze() {
            self.hasher.send(Msg::Data(chunk));
        }
        while let Some(&p) = self.cuts.front()
            && p <= self.out.cur_start
        {
            self.cuts.pop_front();
            self.hasher.send(Msg::Cut(p));
        }
    }

    /// Whether a checkpoint at `out` can still be recorded (needing a window or not).
    pub(crate) fn can_add(&self, out: u64, window: bool) -> bool {
        let after_last = self.last().is_none_or(|l| out > l);
        let win_from = out.saturating_sub(WINDOW as u64);
        after_last
            && out >= self.safe_upto
            && (!window || self.out.holds(win_from, out))
            && out <= self.end()
    }

    /// Records a checkpoint at output position `out` (caller checked [`Self::can_add`]).
    pub(crate) fn add(
        &mut self,
        kind: CheckpointKind,
        compressed: u64,
        out: u64,
        bits: u8,
        window: bool,
    ) {
        if !self.checkpoints.is_empty() {
            if out <= self.out.cur_start {
                self.hasher.send(Msg::Cut(out));
            } else {
                self.cuts.push_back(out);
            }
        }
        self.safe_upto = self.safe_upto.max(out);
        if window {
            let from = out.saturating_sub(WINDOW as u64);
            let mut raw = Vec::with_capacity(WINDOW);
            self.out.each(from, out, |b| raw.extend_from_slice(b));
            self.hasher.send(Msg::Window(self.checkpoints.len(), raw));
        }
        self.checkpoints.push(Checkpoint {
            kind,
            compressed_offset: compressed,
            uncompressed_offset: out,
            bits,
            window: Vec::new(),
            span_digest: [0; 32],
            chain_head: None,
        });
    }

    /// Closes the last span; returns the checkpoints, the sha256 of the whole output and, if it
    /// was fed, the input's digest.
    pub(crate) fn finish(mut self) -> Result<Finished, Error> {
        self.ship();
        let Self {
            mut checkpoints,
            hasher,
            fed,
            ..
        } = self;
        let hashed = hasher
            .finish()
            .ok_or_else(|| Error::BadCheckpoint("the hashing thread failed".into()))?;
        if hashed.chain.len() != checkpoints.len() {
            return Err(Error::BadCheckpoint(
                "the hashing thread lost a checkpoint".into(),
            ));
        }
        for (cp, (value, head)) in checkpoints.iter_mut().zip(hashed.chain) {
            cp.span_digest = value;
            cp.chain_head = Some(head);
        }
        for (i, w) in hashed.windows {
            if let Some(cp) = checkpoints.get_mut(i) {
                cp.window = w;
            }
        }
        Ok(Finished {
            checkpoints,
            diff_id: hashed.whole,
            input: fed.then_some(InputDigest {
                sha256: hashed.input.0,
                len: hashed.input.1,
            }),
        })
    }
}

/// What a [`Recorder`] ends with.
pub(crate) struct Finished {
    pub(crate) checkpoints: Vec<Checkpoint>,
    pub(crate) diff_id: [u8; 32],
    pub(crate) input: Option<InputDigest>,
}

/// A decoder that writes into a [`Recorder`]; [`read`] and [`seek`] serve its consumer.
pub(crate) trait Produce {
    fn rec(&mut self) -> &mut Recorder;
    /// Decodes more output into the recorder (possibly none); `false` once the stream has ended.
    fn produce(&mut self) -> std::io::Result<bool>;
    /// Called whenever the consumer has advanced.
    fn consumed(&mut self) {}
}

/// Decodes a [`Produce`]r to its end without copying the rest out (a tar walker stops at the
/// end-of-archive marker, the layer may go on with padding), recovering typed errors.
pub(crate) fn drain(p: &mut impl Produce) -> Result<(), Error> {
    loop {
        let pending = p.rec().pending() as u64;
        p.rec().skip(pending);
        p.consumed();
        if !p.produce().map_err(Error::from_io)? {
            return Ok(());
        }
    }
}

/// [`std::io::Read::read`] for a [`Produce`]r.
pub(crate) fn read(p: &mut impl Produce, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        if p.rec().pending() > 0 {
            let n = p.rec().take(buf);
            p.consumed();
            return Ok(n);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if !p.produce()? {
            p.consumed();
            return Ok(0);
        }
    }
}

/// [`std::io::Seek::seek`] for a [`Produce`]r: only forward from the current position (how a tar
/// reader skips file data), decoding and hashing as reading would but copying nothing. A seek
/// past the end stops at the end and returns that position (the caller compares).
pub(crate) fn seek(p: &mut impl Produce, pos: std::io::SeekFrom) -> std::io::Result<u64> {
    let left = match pos {
        std::io::SeekFrom::Current(n) => u64::try_from(n).ok(),
        _ => None,
    };
    let Some(mut left) = left else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "an indexer only seeks forward from its position",
        ));
    };
    while left > 0 {
        if p.rec().pending() > 0 {
            left -= p.rec().skip(left);
            p.consumed();
        } else if !p.produce()? {
            break;
        }
    }
    Ok(p.rec().consumed())
}

/// zlib level for stored windows: level 3 takes about two thirds of level 6's time for windows
/// 2-3% larger (measured on 32 KiB windows of shared libraries: 26.5 vs 38.8 ms per 100).
const WINDOW_LEVEL: u32 = 3;

/// Compresses a window (raw deflate) for storage in the archive.
pub(crate) fn compress_window(raw: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(raw.len() / 2),
        flate2::Compression::new(WINDOW_LEVEL),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(raw);
    enc.finish().unwrap_or_default()
}

/// Inflates a stored window, refusing anything larger than 32 KiB.
pub(crate) fn expand_window(stored: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(WINDOW);
    let mut dec = flate2::read::DeflateDecoder::new(stored).take(WINDOW as u64 + 1);
    dec.read_to_end(&mut out)
        .map_err(|e| Error::BadCheckpoint(format!("window does not inflate: {e}")))?;
    if out.len() > WINDOW {
        return Err(Error::BadCheckpoint("window is larger than 32 KiB".into()));
    }
    Ok(out)
}
