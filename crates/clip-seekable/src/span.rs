//! Output history and span bookkeeping shared by the gzip and plain indexers.

use std::io::{Read, Write as _};

use clip_format::{Checkpoint, CheckpointKind};
use sha2::{Digest, Sha256};

use crate::{Error, WINDOW};

/// How far span hashing lags behind the newest output, so that a checkpoint can still be placed
/// at a block boundary somewhat behind the current position (the start of a large file).
pub(crate) const HASH_LAG: u64 = 2 << 20;
/// Capacity of the output history: the lag, plus a window, plus one output chunk, with room.
const HISTORY: usize = 4 << 20;

/// A ring of the most recent output bytes.
pub(crate) struct History {
    data: Vec<u8>,
    end: u64,
}

impl History {
    fn new() -> Self {
        Self {
            data: vec![0; HISTORY],
            end: 0,
        }
    }
    fn push(&mut self, mut bytes: &[u8]) {
        if bytes.len() > HISTORY {
            // Only the newest HISTORY bytes can be kept; the rest is skipped over.
            self.end += (bytes.len() - HISTORY) as u64;
            bytes = &bytes[bytes.len() - HISTORY..];
        }
        for chunk in bytes.chunks(HISTORY) {
            let at = (self.end % HISTORY as u64) as usize;
            let first = chunk.len().min(HISTORY - at);
            self.data[at..at + first].copy_from_slice(&chunk[..first]);
            self.data[..chunk.len() - first].copy_from_slice(&chunk[first..]);
            self.end += chunk.len() as u64;
        }
    }
    /// Whether `[from, to)` is still held.
    fn holds(&self, from: u64, to: u64) -> bool {
        from <= to && to <= self.end && from >= self.end.saturating_sub(HISTORY as u64)
    }
    /// Calls `f` with the pieces of `[from, to)` in order (caller checked `holds`).
    fn each(&self, from: u64, to: u64, mut f: impl FnMut(&[u8])) {
        let mut p = from;
        while p < to {
            let at = (p % HISTORY as u64) as usize;
            let n = usize::try_from(to - p)
                .unwrap_or(usize::MAX)
                .min(HISTORY - at);
            f(&self.data[at..at + n]);
            p += n as u64;
        }
    }
}

/// Work for the hashing thread, in stream order.
enum Msg {
    /// The next output bytes.
    Data(Vec<u8>),
    /// No span will be cut before this output position: hash up to it.
    Safe(u64),
    /// A span ends at this output position.
    Cut(u64),
}

/// Span digests in order, and the whole stream's digest.
type Digests = (Vec<[u8; 32]>, [u8; 32]);

/// Hashes the output on its own thread, so inflation and hashing overlap: the whole stream's
/// sha256 immediately, span digests as soon as their cut points are known.
struct Hasher {
    tx: Option<std::sync::mpsc::SyncSender<Msg>>,
    thread: Option<std::thread::JoinHandle<Digests>>,
}

impl Hasher {
    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(256);
        let thread = std::thread::Builder::new()
            .name("clip-span-hash".into())
            .spawn(move || {
                let mut whole = Sha256::new();
                let mut span = Sha256::new();
                let mut digests = Vec::new();
                let mut queue: std::collections::VecDeque<Vec<u8>> =
                    std::collections::VecDeque::new();
                let (mut queued_from, mut hashed) = (0u64, 0u64);
                // Feeds queued bytes up to `to` into the span hasher.
                let advance = |queue: &mut std::collections::VecDeque<Vec<u8>>,
                               queued_from: &mut u64,
                               hashed: &mut u64,
                               span: &mut Sha256,
                               to: u64| {
                    while *hashed < to {
                        let Some(front) = queue.front() else { break };
                        let start = usize::try_from(*hashed - *queued_from).unwrap_or(0);
                        let n = usize::try_from(to - *hashed)
                            .unwrap_or(usize::MAX)
                            .min(front.len() - start);
                        span.update(&front[start..start + n]);
                        *hashed += n as u64;
                        if start + n == front.len() {
                            *queued_from += front.len() as u64;
                            queue.pop_front();
                        }
                    }
                };
                for msg in rx {
                    match msg {
                        Msg::Data(d) => {
                            whole.update(&d);
                            queue.push_back(d);
                        }
                        Msg::Safe(w) => {
                            advance(&mut queue, &mut queued_from, &mut hashed, &mut span, w);
                        }
                        Msg::Cut(p) => {
                            advance(&mut queue, &mut queued_from, &mut hashed, &mut span, p);
                            digests.push(std::mem::take(&mut span).finalize().into());
                        }
                    }
                }
                advance(
                    &mut queue,
                    &mut queued_from,
                    &mut hashed,
                    &mut span,
                    u64::MAX,
                );
                digests.push(span.finalize().into());
                (digests, whole.finalize().into())
            })
            .ok();
        Self {
            tx: Some(tx),
            thread,
        }
    }

    fn send(&self, m: Msg) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(m);
        }
    }

    fn finish(mut self) -> Digests {
        self.tx = None;
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Records checkpoints and the sha256 of every span and of the whole stream.
pub(crate) struct Recorder {
    pub(crate) span: u64,
    history: History,
    pub(crate) checkpoints: Vec<Checkpoint>,
    hasher: Hasher,
    /// No checkpoint may be placed before this output position any more.
    safe_upto: u64,
}

impl Recorder {
    pub(crate) fn new(span: u64) -> Self {
        Self {
            span: span.max(1),
            history: History::new(),
            checkpoints: Vec::new(),
            hasher: Hasher::start(),
            safe_upto: 0,
        }
    }

    /// Total output so far.
    pub(crate) fn end(&self) -> u64 {
        self.history.end
    }

    /// Output position of the newest checkpoint.
    pub(crate) fn last(&self) -> Option<u64> {
        self.checkpoints.last().map(|c| c.uncompressed_offset)
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.hasher.send(Msg::Data(bytes.to_vec()));
        self.history.push(bytes);
        let target = self.history.end.saturating_sub(HASH_LAG);
        if target > self.safe_upto {
            self.safe_upto = target;
            self.hasher.send(Msg::Safe(target));
        }
    }

    /// Whether a checkpoint at `out` can still be recorded (needing a window or not).
    pub(crate) fn can_add(&self, out: u64, window: bool) -> bool {
        let after_last = self.last().is_none_or(|l| out > l);
        let win_from = out.saturating_sub(WINDOW as u64);
        after_last
            && out >= self.safe_upto
            && (!window || self.history.holds(win_from, out))
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
            self.hasher.send(Msg::Cut(out));
        }
        self.safe_upto = self.safe_upto.max(out);
        let window = if window {
            let from = out.saturating_sub(WINDOW as u64);
            let mut raw = Vec::with_capacity(WINDOW);
            self.history.each(from, out, |b| raw.extend_from_slice(b));
            compress_window(&raw)
        } else {
            Vec::new()
        };
        self.checkpoints.push(Checkpoint {
            kind,
            compressed_offset: compressed,
            uncompressed_offset: out,
            bits,
            window,
            span_digest: [0; 32],
        });
    }

    /// Closes the last span; returns the checkpoints and the sha256 of the whole output.
    pub(crate) fn finish(self) -> (Vec<Checkpoint>, [u8; 32]) {
        let Self {
            mut checkpoints,
            hasher,
            ..
        } = self;
        let (digests, whole) = hasher.finish();
        for (cp, d) in checkpoints.iter_mut().zip(digests) {
            cp.span_digest = d;
        }
        (checkpoints, whole)
    }
}

/// Compresses a window (raw deflate) for storage in the archive.
pub(crate) fn compress_window(raw: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(raw.len() / 2),
        flate2::Compression::new(6),
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
