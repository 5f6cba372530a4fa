//! Span verification against the layer's own SHA-256.
//!
//! Indexing must compute the layer's `diff_id` (the sha256 of its uncompressed stream) anyway.
//! SHA-256 processes its input in 64-byte blocks, carrying a 32-byte chaining value from one to
//! the next. Instead of hashing every span a second time, the indexer records, per checkpoint at
//! uncompressed offset `u`, the chaining value after the first `F = u − u % 64` bytes and the
//! `u % 64` bytes between `F` and `u` (the *head*). A span `[u_i, u_{i+1})` then verifies alone:
//! starting from chaining value `i`, compressing `head_i ++ span` up to `F_{i+1}` must give
//! chaining value `i + 1`, and the rest must equal `head_{i+1}`; the last span, finished with
//! SHA-256's padding for the layer's size, must give the `diff_id` itself. Forging a span means
//! finding other bytes that take the compression chain from one recorded value to the next: a
//! second preimage on SHA-256. Indexing hashes every byte once instead of twice.

use clip_format::Checkpoint;
use sha2::digest::generic_array::GenericArray;

use crate::Error;

/// SHA-256's initial chaining value.
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// A running SHA-256 whose chaining value can be read at 64-byte boundaries and resumed from.
#[derive(Clone)]
pub(crate) struct Chain {
    state: [u32; 8],
    block: [u8; 64],
    fill: usize,
    total: u64,
}

impl Chain {
    pub(crate) fn new() -> Self {
        Self {
            state: IV,
            block: [0; 64],
            fill: 0,
            total: 0,
        }
    }

    /// Resumes from a recorded chaining value standing after `at` bytes (a multiple of 64).
    fn resume(value: &[u8; 32], at: u64) -> Self {
        let mut state = [0u32; 8];
        for (w, b) in state.iter_mut().zip(value.chunks_exact(4)) {
            *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        }
        Self {
            state,
            block: [0; 64],
            fill: 0,
            total: at,
        }
    }

    fn compress(&mut self, block: &[u8]) {
        sha2::compress256(
            &mut self.state,
            std::slice::from_ref(GenericArray::from_slice(block)),
        );
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.fill > 0 {
            let n = (64 - self.fill).min(data.len());
            self.block[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill < 64 {
                return;
            }
            let block = self.block;
            self.compress(&block);
            self.fill = 0;
        }
        let mut blocks = data.chunks_exact(64);
        for b in blocks.by_ref() {
            self.compress(b);
        }
        let rest = blocks.remainder();
        self.block[..rest.len()].copy_from_slice(rest);
        self.fill = rest.len();
    }

    /// Bytes fed so far.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// The chaining value, if the input so far is a whole number of blocks.
    pub(crate) fn value(&self) -> Option<[u8; 32]> {
        (self.fill == 0).then(|| {
            let mut out = [0u8; 32];
            for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
                o.copy_from_slice(&w.to_be_bytes());
            }
            out
        })
    }

    /// The SHA-256 digest of everything fed since the start of the stream.
    pub(crate) fn finalize(mut self) -> [u8; 32] {
        let bits = self.total.wrapping_mul(8);
        let mut tail = [0u8; 128];
        tail[..self.fill].copy_from_slice(&self.block[..self.fill]);
        tail[self.fill] = 0x80;
        let len = if self.fill < 56 { 64 } else { 128 };
        tail[len - 8..len].copy_from_slice(&bits.to_be_bytes());
        for b in tail[..len].chunks_exact(64) {
            self.compress(b);
        }
        self.fill = 0;
        self.value().unwrap_or_default()
    }
}

/// The chaining value of an empty stream (a layer's first checkpoint carries it).
pub(crate) fn initial() -> [u8; 32] {
    Chain::new().value().unwrap_or_default()
}

/// Where a layer ends: what its last span is verified against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerEnd {
    /// Uncompressed size of the layer.
    pub size: u64,
    /// sha256 of the whole uncompressed layer (its `diff_id`).
    pub diff_id: [u8; 32],
}

impl LayerEnd {
    /// From a layer's uncompressed size and `diff_id`; `None` if the digest is not a sha256.
    #[must_use]
    pub fn new(size: u64, diff_id: &clip_format::Digest) -> Option<Self> {
        Some(Self {
            size,
            diff_id: diff_id.sha256_bytes()?,
        })
    }
}

/// Checks span `i` of a layer with checkpoints `cps`: `bytes` must be the whole span, from
/// checkpoint `i` to the next one or the layer's end.
pub fn verify_span(
    cps: &[Checkpoint],
    i: usize,
    end: &LayerEnd,
    bytes: &[u8],
) -> Result<(), Error> {
    let mut v = SpanVerifier::new(cps, i, end)?;
    if v.len() != bytes.len() as u64 {
        return Err(Error::SpanDigest { offset: v.offset });
    }
    v.update(bytes);
    v.finish()
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

/// [`verify_span`] fed in pieces: the span's bytes as they are decoded, never all at once (for
/// spans too large to hold in memory). [`SpanVerifier::finish`] gives the same verdict
/// [`verify_span`] gives for the concatenated bytes.
#[derive(Debug)]
pub struct SpanVerifier {
    mode: VerifyMode,
    /// Bytes of the span seen so far.
    seen: u64,
    /// The span's length.
    len: u64,
    offset: u64,
}

#[derive(Debug)]
enum VerifyMode {
    /// A span with a digest of its own (TOC chunks).
    Plain(sha2::Sha256, [u8; 32]),
    /// A chain span: bytes before `cut` feed the chain, the rest must equal `want_tail`.
    Chain {
        chain: Chain,
        cut: u64,
        tail: Vec<u8>,
        want_tail: Vec<u8>,
        want_value: [u8; 32],
    },
    /// The layer's last span: the chain over everything ends in the `diff_id`.
    Last {
        chain: Chain,
        size: u64,
        diff_id: [u8; 32],
    },
    /// Both checkpoints in one 64-byte block: head plus bytes equal the next head.
    Joined { joined: Vec<u8>, want: Vec<u8> },
}

impl SpanVerifier {
    /// A verifier for span `i` of a layer with checkpoints `cps` ending as `end`.
    pub fn new(cps: &[Checkpoint], i: usize, end: &LayerEnd) -> Result<Self, Error> {
        let cp = cps
            .get(i)
            .ok_or_else(|| Error::BadCheckpoint(format!("no span {i}")))?;
        let bad = || Error::SpanDigest {
            offset: cp.uncompressed_offset,
        };
        let span_end = cps.get(i + 1).map_or(end.size, |n| n.uncompressed_offset);
        let len = span_end
            .checked_sub(cp.uncompressed_offset)
            .ok_or_else(bad)?;
        let Some(head) = &cp.chain_head else {
            use sha2::Digest as _;
            return Ok(Self {
                mode: VerifyMode::Plain(sha2::Sha256::new(), cp.span_digest),
                seen: 0,
                len,
                offset: cp.uncompressed_offset,
            });
        };
        let start = cp.uncompressed_offset - cp.uncompressed_offset % 64;
        if head.len() as u64 != cp.uncompressed_offset - start {
            return Err(bad());
        }
        let mut chain = Chain::resume(&cp.span_digest, start);
        chain.update(head);
        let mode = match cps.get(i + 1) {
            None => VerifyMode::Last {
                chain,
                size: end.size,
                diff_id: end.diff_id,
            },
            Some(next) => {
                let next_head = next.chain_head.as_deref().ok_or_else(bad)?;
                let next_start = next.uncompressed_offset - next.uncompressed_offset % 64;
                if next_start == start {
                    if next.span_digest != cp.span_digest {
                        return Err(bad());
                    }
                    VerifyMode::Joined {
                        joined: head.clone(),
                        want: next_head.to_vec(),
                    }
                } else {
                    VerifyMode::Chain {
                        chain,
                        cut: next_start - cp.uncompressed_offset,
                        tail: Vec::new(),
                        want_tail: next_head.to_vec(),
                        want_value: next.span_digest,
                    }
                }
            }
        };
        Ok(Self {
            mode,
            seen: 0,
            len,
            offset: cp.uncompressed_offset,
        })
    }

    /// The span's length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the span is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next bytes of the span.
    pub fn update(&mut self, data: &[u8]) {
        let at = self.seen;
        self.seen += data.len() as u64;
        match &mut self.mode {
            VerifyMode::Plain(h, _) => sha2::Digest::update(h, data),
            VerifyMode::Last { chain, .. } => chain.update(data),
            VerifyMode::Joined { joined, .. } => {
                // At most 64 bytes can be right; keep no more than that.
                let room = 65usize.saturating_sub(joined.len());
                joined.extend_from_slice(&data[..data.len().min(room)]);
            }
            VerifyMode::Chain {
                chain, cut, tail, ..
            } => {
                let before = usize::try_from(cut.saturating_sub(at))
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                chain.update(&data[..before]);
                let room = 65usize.saturating_sub(tail.len());
                let rest = &data[before..];
                tail.extend_from_slice(&rest[..rest.len().min(room)]);
            }
        }
    }

    /// The verdict on everything fed.
    pub fn finish(self) -> Result<(), Error> {
        let bad = Error::SpanDigest {
            offset: self.offset,
        };
        if self.seen != self.len {
            return Err(bad);
        }
        let ok = match self.mode {
            VerifyMode::Plain(h, want) => <[u8; 32]>::from(sha2::Digest::finalize(h)) == want,
            VerifyMode::Last {
                chain,
                size,
                diff_id,
            } => chain.total() == size && chain.finalize() == diff_id,
            VerifyMode::Joined { joined, want } => joined == want,
            VerifyMode::Chain {
                chain,
                tail,
                want_tail,
                want_value,
                ..
            } => chain.value() == Some(want_value) && tail == want_tail,
        };
        if ok { Ok(()) } else { Err(bad) }
    }
}

/// A name for span `i`'s content, for content-addressed caches: the span's sha256 in a plain
/// layer; in a chained layer a sha256 over what pins the span down (its start and end chaining
/// values and heads, or the layer's `diff_id` and size for the last span, and its length), so
/// that equal names mean equal bytes, the same layer in two images shares its spans, and
/// different layers never do.
#[must_use]
pub fn span_key(cps: &[Checkpoint], i: usize, end: &LayerEnd) -> [u8; 32] {
    use sha2::Digest as _;
    let Some(cp) = cps.get(i) else {
        return [0; 32];
    };
    let Some(head) = &cp.chain_head else {
        return cp.span_digest;
    };
    let mut h = sha2::Sha256::new();
    h.update(b"clip chained span\0");
    h.update(cp.uncompressed_offset.to_le_bytes());
    h.update(cp.span_digest);
    h.update(head);
    if let Some(next) = cps.get(i + 1) {
        h.update(next.uncompressed_offset.to_le_bytes());
        h.update(next.span_digest);
        h.update(next.chain_head.as_deref().unwrap_or_default());
    } else {
        h.update(end.size.to_le_bytes());
        h.update(end.diff_id);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn the_chain_is_sha256() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for len in (0..200).chain([447, 448, 449, 511, 512, 513, 1000]) {
            let mut c = Chain::new();
            // Fed in uneven pieces.
            for piece in data[..len].chunks(37) {
                c.update(piece);
            }
            assert_eq!(c.total(), len as u64);
            assert_eq!(
                c.finalize(),
                <[u8; 32]>::from(sha2::Sha256::digest(&data[..len])),
                "length {len}"
            );
        }
        // A value taken at a block boundary resumes to the same digest.
        let mut c = Chain::new();
        c.update(&data[..640]);
        let v = c.value().unwrap();
        let mut r = Chain::resume(&v, 640);
        r.update(&data[640..]);
        assert_eq!(r.finalize(), <[u8; 32]>::from(sha2::Sha256::digest(&data)));
        c.update(&data[640..641]);
        assert!(c.value().is_none(), "no value inside a block");
    }

    #[test]
    fn layer_ends_take_sha256_digests_only() {
        let d = clip_format::Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        assert_eq!(
            LayerEnd::new(7, &d),
            Some(LayerEnd {
                size: 7,
                diff_id: [0xab; 32]
            })
        );
        let sha512 = clip_format::Digest::parse(&format!("sha512:{}", "ab".repeat(64))).unwrap();
        assert_eq!(LayerEnd::new(7, &sha512), None);
    }

    #[test]
    fn spans_of_every_size_verify_alone_and_only_with_their_bytes() {
        use std::io::Read as _;
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        for span in [1u64, 5, 63, 64, 65, 100, 128, 1000, 5000] {
            let mut ix = crate::PlainIndexer::new(data.as_slice(), span);
            std::io::copy(&mut ix.by_ref(), &mut std::io::sink()).unwrap();
            let ix = ix.finish().unwrap();
            assert!(ix.checkpoints.iter().all(|c| c.chain_head.is_some()));
            for (i, cp) in ix.checkpoints.iter().enumerate() {
                let from = cp.uncompressed_offset as usize;
                let to = ix
                    .checkpoints
                    .get(i + 1)
                    .map_or(data.len(), |n| n.uncompressed_offset as usize);
                ix.verify_span(i, &data[from..to]).unwrap();
                let mut bad = data[from..to].to_vec();
                for at in [0, bad.len() / 2, bad.len() - 1] {
                    bad[at] ^= 0x20;
                    assert!(
                        ix.verify_span(i, &bad).is_err(),
                        "span {span} #{i} byte {at}"
                    );
                    bad[at] ^= 0x20;
                }
            }
            // Keys name content: distinct spans, distinct keys.
            let keys: std::collections::HashSet<[u8; 32]> = (0..ix.checkpoints.len())
                .map(|i| span_key(&ix.checkpoints, i, &ix.end()))
                .collect();
            assert_eq!(keys.len(), ix.checkpoints.len());
        }
    }
}
