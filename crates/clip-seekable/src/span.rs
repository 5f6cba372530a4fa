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

/// Records checkpoints and the sha256 of every span and of the whole stream.
pub(crate) struct Recorder {
    pub(crate) span: u64,
    history: History,
    pub(crate) checkpoints: Vec<Checkpoint>,
    hasher: Sha256,
    hashed_upto: u64,
    whole: Sha256,
}

impl Recorder {
    pub(crate) fn new(span: u64) -> Self {
        Self {
            span: span.max(1),
            history: History::new(),
            checkpoints: Vec::new(),
            hasher: Sha256::new(),
            hashed_upto: 0,
            whole: Sha256::new(),
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
        self.whole.update(bytes);
        self.history.push(bytes);
        let target = self.history.end.saturating_sub(HASH_LAG);
        if target > self.hashed_upto {
            let hasher = &mut self.hasher;
            self.history
                .each(self.hashed_upto, target, |b| hasher.update(b));
            self.hashed_upto = target;
        }
    }

    /// Whether a checkpoint at `out` can still be recorded (needing a window or not).
    pub(crate) fn can_add(&self, out: u64, window: bool) -> bool {
        let after_last = self.last().is_none_or(|l| out > l);
        let win_from = out.saturating_sub(WINDOW as u64);
        after_last
            && out >= self.hashed_upto
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
        self.close_span(out);
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

    /// Hashes up to `out` and stores the digest of the span that ends there.
    fn close_span(&mut self, out: u64) {
        if out > self.hashed_upto {
            let hasher = &mut self.hasher;
            self.history
                .each(self.hashed_upto, out, |b| hasher.update(b));
            self.hashed_upto = out;
        }
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        if let Some(last) = self.checkpoints.last_mut() {
            last.span_digest = digest;
        }
    }

    /// Closes the last span; returns the checkpoints and the sha256 of the whole output.
    pub(crate) fn finish(mut self) -> (Vec<Checkpoint>, [u8; 32]) {
        let end = self.end();
        self.close_span(end);
        (self.checkpoints, self.whole.finalize().into())
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
