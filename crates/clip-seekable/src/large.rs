//! Spans too large to hold in memory, decoded streaming.
//!
//! [`crate::decode_span`] takes the compressed range as one slice and returns the span as one
//! buffer — right for spans of a few MiB. A span is as long as its layer's checkpoints make it,
//! and some of those the image's author chooses (a single-frame zstd layer, a zstd frame per
//! file, an eStargz chunk), so a span may be gigabytes. [`decode_span_to`] reads the compressed
//! bytes from a [`Read`] and hands the uncompressed bytes to a sink in pieces of at most 64 KiB,
//! so memory stays at a few buffers (and the 32 KiB window) whatever the span's length; the
//! caller feeds the same pieces to a [`crate::SpanVerifier`] and writes them to disk.

use std::io::Read;

use clip_format::{Checkpoint, CheckpointKind, MediaKind};
use libz_rs_sys::{Z_BUF_ERROR, Z_OK, Z_STREAM_END};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::span::expand_window;
use crate::zlib::{GZIP, Inflater, RAW};
use crate::{Error, zlib_error};

const IN_CHUNK: usize = 256 << 10;
const OUT_CHUNK: usize = 64 << 10;

/// Compressed input read in chunks, with its position in the blob.
struct Input<'a> {
    r: &'a mut dyn Read,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Blob offset of `buf[pos]`.
    at: u64,
    eof: bool,
}

impl<'a> Input<'a> {
    fn new(r: &'a mut dyn Read, at: u64) -> Self {
        Self {
            r,
            buf: vec![0; IN_CHUNK],
            pos: 0,
            end: 0,
            at,
            eof: false,
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        self.at += n as u64;
    }

    /// Makes bytes available when none are; `false` at the end of the input.
    fn fill(&mut self) -> Result<bool, Error> {
        if self.pos < self.end {
            return Ok(true);
        }
        if self.eof {
            return Ok(false);
        }
        loop {
            match self.r.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.pos = 0;
                    self.end = n;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Corrupt {
                        compressed: self.at,
                        reason: format!("reading the span's compressed bytes: {e}"),
                    });
                }
            }
        }
    }

    /// Drops the next `n` bytes.
    fn skip(&mut self, mut n: u64) -> Result<(), Error> {
        while n > 0 {
            if !self.fill()? {
                return Err(Error::Truncated {
                    compressed: self.at,
                });
            }
            let k = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.avail().len());
            self.consume(k);
            n -= k as u64;
        }
        Ok(())
    }
}

/// Passes at most `left` of `produced` on to `sink`, counting it off.
fn emit(
    produced: &[u8],
    left: &mut u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let take = usize::try_from(*left)
        .unwrap_or(usize::MAX)
        .min(produced.len());
    if take > 0 {
        sink(&produced[..take])?;
        *left -= take as u64;
    }
    Ok(())
}

/// Decodes the `len` bytes of the span that starts at checkpoint `cp` of a layer compressed as
/// `media`, from `input` (the blob's bytes from offset `input_offset`, which must be at or before
/// the checkpoint — including the byte before it when `cp.bits > 0`), handing them to `sink` in
/// pieces. An error if the input ends first or is not a valid stream; the caller verifies the
/// bytes (a [`crate::SpanVerifier`] fed from the sink) before using any of them.
pub fn decode_span_to(
    media: MediaKind,
    cp: &Checkpoint,
    input: &mut dyn Read,
    input_offset: u64,
    len: u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut inp = Input::new(input, input_offset);
    let mut left = len;
    let mismatch = || Error::RangeMismatch {
        checkpoint: cp.compressed_offset,
        input: input_offset,
    };
    match media {
        MediaKind::Tar => {
            inp.skip(
                cp.uncompressed_offset
                    .checked_sub(input_offset)
                    .ok_or_else(mismatch)?,
            )?;
            while left > 0 {
                if !inp.fill()? {
                    break;
                }
                let n = inp.avail().len();
                emit(inp.avail(), &mut left, sink)?;
                inp.consume(n);
            }
        }
        MediaKind::Gzip => gzip(cp, &mut inp, &mut left, sink, mismatch)?,
        MediaKind::Zstd => zstd(cp, &mut inp, &mut left, sink, mismatch)?,
    }
    if left > 0 {
        return Err(Error::Truncated { compressed: inp.at });
    }
    Ok(())
}

fn gzip(
    cp: &Checkpoint,
    inp: &mut Input<'_>,
    left: &mut u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    mismatch: impl Fn() -> Error,
) -> Result<(), Error> {
    let rel = cp
        .compressed_offset
        .checked_sub(inp.at)
        .ok_or_else(&mismatch)?;
    let (mut inflater, mut raw) = match cp.kind {
        CheckpointKind::Deflate => {
            let mut inf = Inflater::new(RAW).map_err(|c| zlib_error(c, cp.compressed_offset))?;
            if cp.bits > 0 {
                if cp.bits > 7 || rel == 0 {
                    return Err(mismatch());
                }
                inp.skip(rel - 1)?;
                if !inp.fill()? {
                    return Err(Error::Truncated { compressed: inp.at });
                }
                let byte = inp.avail()[0];
                inp.consume(1);
                inf.prime(cp.bits, byte >> (8 - cp.bits))
                    .map_err(|c| zlib_error(c, cp.compressed_offset))?;
            } else {
                inp.skip(rel)?;
            }
            let window = expand_window(&cp.window)?;
            inf.set_dictionary(&window)
                .map_err(|c| zlib_error(c, cp.compressed_offset))?;
            (inf, true)
        }
        CheckpointKind::GzipMember => {
            inp.skip(rel)?;
            (
                Inflater::new(GZIP).map_err(|c| zlib_error(c, cp.compressed_offset))?,
                false,
            )
        }
        other => {
            return Err(Error::BadCheckpoint(format!(
                "{other:?} checkpoint in a gzip layer"
            )));
        }
    };
    let mut buf = vec![0u8; OUT_CHUNK];
    while *left > 0 {
        let more = inp.fill()?;
        let s = inflater.inflate(inp.avail(), &mut buf, false);
        inp.consume(s.consumed);
        emit(&buf[..s.produced], left, sink)?;
        match s.code {
            Z_OK => {}
            Z_BUF_ERROR => {
                if s.consumed == 0 && s.produced == 0 && !more {
                    return Err(Error::Truncated { compressed: inp.at });
                }
            }
            Z_STREAM_END => {
                if raw {
                    inp.skip(8)?; // the member's trailer, which raw inflate does not read
                }
                if !inp.fill()? {
                    break;
                }
                inflater.reset(GZIP).map_err(|c| zlib_error(c, inp.at))?;
                raw = false;
            }
            code => return Err(zlib_error(code, inp.at)),
        }
    }
    Ok(())
}

fn zstd(
    cp: &Checkpoint,
    inp: &mut Input<'_>,
    left: &mut u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    mismatch: impl Fn() -> Error,
) -> Result<(), Error> {
    if cp.kind != CheckpointKind::ZstdFrame {
        return Err(Error::BadCheckpoint(format!(
            "{:?} checkpoint in a zstd layer",
            cp.kind
        )));
    }
    let corrupt = |at: u64, e: &std::io::Error| Error::Corrupt {
        compressed: at,
        reason: e.to_string(),
    };
    inp.skip(
        cp.compressed_offset
            .checked_sub(inp.at)
            .ok_or_else(&mismatch)?,
    )?;
    let mut dec = Decoder::new().map_err(|e| corrupt(cp.compressed_offset, &e))?;
    let mut buf = vec![0u8; OUT_CHUNK];
    while *left > 0 {
        let more = inp.fill()?;
        let at = inp.at;
        let mut inb = InBuffer::around(inp.avail());
        let mut outb = OutBuffer::around(&mut buf[..]);
        dec.run(&mut inb, &mut outb).map_err(|e| corrupt(at, &e))?;
        let (consumed, produced) = (inb.pos(), outb.pos());
        inp.consume(consumed);
        emit(&buf[..produced], left, sink)?;
        if consumed == 0 && produced == 0 {
            if more {
                return Err(Error::Truncated { compressed: at });
            }
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pieces(media: MediaKind, cp: &Checkpoint, blob: &[u8], from: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut r = &blob[usize::try_from(from).unwrap()..];
        decode_span_to(media, cp, &mut r, from, len, &mut |b| {
            assert!(b.len() <= IN_CHUNK.max(OUT_CHUNK));
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        out
    }

    /// The streaming decoder gives exactly what the one-buffer decoder gives, for every span of
    /// gzip (one member and many), zstd and plain layers, and its verifier agrees with
    /// `verify_span`.
    #[test]
    fn streaming_decode_equals_the_one_buffer_decode() {
        use crate::{GzipIndexer, PlainIndexer, ZstdIndexer};
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & 0x3f)
            .collect();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &data[..1_000_000]).unwrap();
            let mut a = e.finish().unwrap();
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &data[1_000_000..]).unwrap();
            a.extend(e.finish().unwrap());
            a
        };
        let zst = zstd::bulk::compress(&data, 3).unwrap();
        let cases: Vec<(MediaKind, Vec<u8>, crate::LayerIndex)> = vec![
            (MediaKind::Gzip, gz.clone(), {
                let mut ix = GzipIndexer::new(&gz[..], 256 << 10).unwrap();
                std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
                ix.finish().unwrap()
            }),
            (MediaKind::Zstd, zst.clone(), {
                let mut ix = ZstdIndexer::new(&zst[..], 256 << 10).unwrap();
                std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
                ix.finish().unwrap()
            }),
            (MediaKind::Tar, data.clone(), {
                let mut ix = PlainIndexer::new(&data[..], 256 << 10);
                std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
                ix.finish().unwrap()
            }),
        ];
        for (media, blob, ix) in cases {
            let end = ix.end();
            let span_range = |i: usize| {
                let a = ix.checkpoints[i].uncompressed_offset;
                let b = ix
                    .checkpoints
                    .get(i + 1)
                    .map_or(ix.uncompressed_size, |c| c.uncompressed_offset);
                a..b
            };
            for i in 0..ix.checkpoints.len() {
                let cp = &ix.checkpoints[i];
                let r = span_range(i);
                let from = if media == MediaKind::Tar {
                    cp.uncompressed_offset
                } else {
                    cp.compressed_offset.saturating_sub(u64::from(cp.bits > 0))
                };
                let got = pieces(media, cp, &blob, from, r.end - r.start);
                assert_eq!(
                    got,
                    &data[usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()],
                    "{media:?} span {i}"
                );
                let mut v = crate::SpanVerifier::new(&ix.checkpoints, i, &end).unwrap();
                for piece in got.chunks(7777) {
                    v.update(piece);
                }
                assert!(v.finish().is_ok(), "{media:?} span {i}");
                let mut wrong = crate::SpanVerifier::new(&ix.checkpoints, i, &end).unwrap();
                let mut bad = got.clone();
                bad[0] ^= 1;
                wrong.update(&bad);
                assert!(
                    wrong.finish().is_err(),
                    "{media:?} span {i}: a flipped byte"
                );
            }
            // Input that ends early is an error, never a short span.
            let cp = &ix.checkpoints[0];
            let r = span_range(0);
            let mut short = &blob[..blob.len() / 4];
            let res = decode_span_to(
                media,
                cp,
                &mut short,
                0,
                r.end - r.start + (1 << 30),
                &mut |_| Ok(()),
            );
            assert!(res.is_err(), "{media:?}");
        }
    }
}
