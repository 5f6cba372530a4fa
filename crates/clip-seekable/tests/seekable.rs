//! Random access into gzip and plain layers, checked against full decodes and an independent
//! inflater (`miniz_oxide`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, Read, Write};

use clip_format::CheckpointKind;
use clip_seekable::{Error, GzipIndexer, LayerIndex, PlainIndexer, gzip};
use clip_testkit::image::{random_bytes, text_bytes};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn gzip_members(data: &[u8], members: usize, level: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let step = data.len().div_ceil(members.max(1)).max(1);
    for chunk in data.chunks(step) {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        enc.write_all(chunk).unwrap();
        out.extend(enc.finish().unwrap());
    }
    if data.is_empty() {
        let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        out.extend(enc.finish().unwrap());
    }
    out
}

fn index(blob: &[u8], span: u64) -> LayerIndex {
    let mut ix = GzipIndexer::new(blob, span).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    ix.finish().unwrap()
}

/// Reads `[off, off+len)` of the uncompressed stream from the nearest checkpoint, giving the
/// decoder only the compressed bytes up to the next checkpoint after the range (as a lazy reader
/// fetching by HTTP range would).
fn read_range(ix: &LayerIndex, blob: &[u8], off: u64, len: usize) -> Vec<u8> {
    let cp = ix.checkpoint_for(off).unwrap();
    let from = cp.compressed_offset.saturating_sub(u64::from(cp.bits > 0));
    let end_cp = ix
        .checkpoints
        .iter()
        .find(|c| c.uncompressed_offset >= off + len as u64);
    let to = end_cp.map_or(blob.len() as u64, |c| {
        (c.compressed_offset + 1).min(blob.len() as u64)
    });
    gzip::decode(
        cp,
        &blob[from as usize..to as usize],
        from,
        off - cp.uncompressed_offset,
        len,
    )
    .unwrap()
}

fn mixed_data(seed: u64, len: usize) -> Vec<u8> {
    let mut d = text_bytes(seed, len / 2);
    d.extend(random_bytes(seed + 1, len / 4));
    d.extend(text_bytes(seed + 2, len - d.len()));
    d
}

#[test]
fn every_span_verifies_and_diff_id_is_the_stream_digest() {
    let data = mixed_data(1, 9 << 20);
    let blob = gzip_members(&data, 1, 6);
    let ix = index(&blob, 1 << 20);
    assert_eq!(ix.uncompressed_size, data.len() as u64);
    assert_eq!(ix.compressed_size, blob.len() as u64);
    assert_eq!(ix.diff_id, <[u8; 32]>::from(Sha256::digest(&data)));
    assert!(
        ix.checkpoints.len() >= 8,
        "{} checkpoints",
        ix.checkpoints.len()
    );
    // Windows are stored compressed; an incompressible one may exceed 32 KiB by deflate's framing.
    assert!(
        ix.checkpoints
            .iter()
            .skip(1)
            .all(|c| c.kind == CheckpointKind::Deflate && c.window.len() < 33 << 10)
    );
    let stored: usize = ix.checkpoints.iter().map(|c| c.window.len()).sum();
    assert!(
        stored < (ix.checkpoints.len() - 1) * (32 << 10),
        "windows compress overall: {stored}"
    );
    for (i, cp) in ix.checkpoints.iter().enumerate() {
        let end = ix
            .checkpoints
            .get(i + 1)
            .map_or(data.len() as u64, |n| n.uncompressed_offset);
        let span = &data[cp.uncompressed_offset as usize..end as usize];
        ix.verify_span(i, span).unwrap();
        let decoded = read_range(&ix, &blob, cp.uncompressed_offset, span.len());
        assert_eq!(decoded, span);
        let mut bad = span.to_vec();
        // A flipped byte anywhere (first, middle, last: inside the chained blocks or the
        // next head), a byte too few or too many: refused.
        for at in [0, bad.len() / 2, bad.len().saturating_sub(1)] {
            if let Some(b) = bad.get_mut(at) {
                *b ^= 1;
                assert!(matches!(
                    ix.verify_span(i, &bad),
                    Err(Error::SpanDigest { .. })
                ));
                bad[at] ^= 1;
            }
        }
        assert!(ix.verify_span(i, &bad[..bad.len() - 1]).is_err());
        bad.push(0);
        assert!(ix.verify_span(i, &bad).is_err());
        // Another span's bytes do not pass for this one.
        if i > 0 {
            assert!(ix.verify_span(i - 1, span).is_err());
        }
    }
}

#[test]
fn an_independent_inflater_agrees() {
    // miniz_oxide decodes the same raw deflate stream (gzip header and trailer stripped).
    let data = mixed_data(2, 3 << 20);
    let blob = gzip_members(&data, 1, 9);
    assert_eq!(&blob[..3], &[0x1f, 0x8b, 8]);
    let flags = blob[3];
    assert_eq!(flags, 0, "flate2 writes a plain 10-byte header");
    let raw = &blob[10..blob.len() - 8];
    let reference = miniz_oxide::inflate::decompress_to_vec(raw).unwrap();
    assert_eq!(reference, data);
    let ix = index(&blob, 256 << 10);
    for off in [0u64, 1, 65_535, 1 << 20, (3 << 20) - 10] {
        assert_eq!(
            read_range(&ix, &blob, off, 10),
            &reference[off as usize..off as usize + 10]
        );
    }
}

#[test]
fn multi_member_layers_resume_in_any_member_and_across_members() {
    let data = mixed_data(3, 5 << 20);
    for members in [2, 7, 64] {
        let blob = gzip_members(&data, members, 6);
        let ix = index(&blob, 512 << 10);
        assert_eq!(ix.members as usize, members);
        assert_eq!(ix.uncompressed_size, data.len() as u64);
        let member_len = data.len().div_ceil(members) as u64;
        // A read spanning a member boundary.
        let off = member_len - 100;
        assert_eq!(
            read_range(&ix, &blob, off, 300),
            &data[off as usize..off as usize + 300]
        );
        // A read deep inside the last member.
        let off = data.len() as u64 - 5000;
        assert_eq!(read_range(&ix, &blob, off, 5000), &data[off as usize..]);
    }
}

#[test]
fn requested_checkpoints_land_just_before_large_files() {
    let data = mixed_data(4, 6 << 20);
    let blob = gzip_members(&data, 1, 6);
    let mut ix = GzipIndexer::new(blob.as_slice(), 4 << 20).unwrap();
    let requests = ix.requests();
    let mut buf = vec![0u8; 512];
    let mut pos = 0u64;
    let wanted = [1_000_000u64, 2_500_000, 2_600_000];
    let mut w = 0;
    loop {
        let n = ix.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        pos += n as u64;
        // Like a tar walker: learn of a file when its header has been read, right before its data.
        if w < wanted.len() && pos >= wanted[w] {
            requests.request(wanted[w]);
            w += 1;
        }
    }
    let index = ix.finish().unwrap();
    for r in wanted {
        let cp = index.checkpoint_for(r).unwrap();
        assert!(
            r - cp.uncompressed_offset < 256 << 10,
            "checkpoint for {r} is {} bytes before it",
            r - cp.uncompressed_offset
        );
        assert_eq!(
            read_range(&index, &blob, r, 4096),
            &data[r as usize..r as usize + 4096]
        );
    }
}

#[test]
fn truncated_and_corrupt_layers_are_errors() {
    let data = mixed_data(5, 1 << 20);
    let blob = gzip_members(&data, 1, 6);
    for cut in [5, 100, blob.len() / 2, blob.len() - 1] {
        let mut ix = GzipIndexer::new(&blob[..cut], 1 << 16).unwrap();
        let err = std::io::copy(&mut ix, &mut std::io::sink()).unwrap_err();
        assert!(
            matches!(
                Error::from_io(err),
                Error::Truncated { .. } | Error::Corrupt { .. }
            ),
            "cut {cut}"
        );
    }
    let mut bad = blob.clone();
    for b in &mut bad[2000..2100] {
        *b = !*b;
    }
    let mut ix = GzipIndexer::new(bad.as_slice(), 1 << 16).unwrap();
    let err = std::io::copy(&mut ix, &mut std::io::sink()).unwrap_err();
    assert!(matches!(Error::from_io(err), Error::Corrupt { .. }));
    // A wrong CRC-32 and length in the trailer, the data intact: the indexer leaves the trailer
    // to the diff_id, which still names exactly the data (a caller comparing it with the image
    // config accepts the layer; a changed byte of data changes it).
    let mut bad_trailer = blob.clone();
    let n = bad_trailer.len();
    for b in &mut bad_trailer[n - 8..] {
        *b = !*b;
    }
    let ix = index(&bad_trailer, 1 << 16);
    assert_eq!(ix.diff_id, <[u8; 32]>::from(Sha256::digest(&data)));
    // Not gzip at all.
    let mut ix = GzipIndexer::new(&b"this is not gzip"[..], 1 << 16).unwrap();
    assert!(std::io::copy(&mut ix, &mut std::io::sink()).is_err());
    // A window that inflates to more than 32 KiB is refused.
    let ix = index(&blob, 1 << 16);
    let mut cp = ix.checkpoints[2].clone();
    cp.window = {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&vec![0u8; 40_000]).unwrap();
        e.finish().unwrap()
    };
    assert!(matches!(
        gzip::decode(&cp, &blob, 0, 0, 10),
        Err(Error::BadCheckpoint(_))
    ));
    assert!(matches!(
        gzip::decode(&ix.checkpoints[2], &blob[10..], 10_000_000, 0, 10),
        Err(Error::RangeMismatch { .. })
    ));
}

#[test]
fn empty_and_tiny_layers() {
    for data in [Vec::new(), b"x".to_vec()] {
        let blob = gzip_members(&data, 1, 6);
        let ix = index(&blob, 1 << 20);
        assert_eq!(ix.uncompressed_size, data.len() as u64);
        assert_eq!(ix.checkpoints.len(), 1);
        ix.verify_span(0, &data).unwrap();
        assert!(ix.verify_span(0, b"y").is_err());
    }
}

#[test]
fn plain_layers_checkpoint_every_span_exactly() {
    let data = mixed_data(6, 1_000_000);
    let mut ix = PlainIndexer::new(data.as_slice(), 100_000);
    let mut out = Vec::new();
    ix.read_to_end(&mut out).unwrap();
    assert_eq!(out, data);
    let index = ix.finish().unwrap();
    assert_eq!(index.checkpoints.len(), 10);
    for (i, cp) in index.checkpoints.iter().enumerate() {
        assert_eq!(cp.uncompressed_offset, i as u64 * 100_000);
        assert_eq!(cp.compressed_offset, cp.uncompressed_offset);
        index
            .verify_span(
                i,
                &data[cp.uncompressed_offset as usize
                    ..(cp.uncompressed_offset as usize + 100_000).min(data.len())],
            )
            .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn any_range_equals_the_slice_of_a_full_decode(
        seed in any::<u64>(),
        len in 1usize..(3 << 20),
        span_kib in 16u64..2048,
        members in 1usize..6,
        level in 1u32..10,
        reads in proptest::collection::vec((any::<u64>(), 1usize..200_000), 1..8),
    ) {
        let data = mixed_data(seed, len);
        let blob = gzip_members(&data, members, level);
        let ix = index(&blob, span_kib << 10);
        for (o, l) in reads {
            let off = o % data.len() as u64;
            let l = l.min(data.len() - off as usize);
            prop_assert_eq!(read_range(&ix, &blob, off, l), &data[off as usize..off as usize + l]);
        }
    }
}

#[test]
fn zstd_frames_are_seek_points_and_single_frames_read_from_the_start() {
    use clip_seekable::{ZstdIndexer, zstd_layer};
    let data = mixed_data(7, 3 << 20);
    let frames: Vec<u8> = data
        .chunks(300_000)
        .flat_map(|c| zstd::bulk::compress(c, 3).unwrap())
        .collect();
    let mut ix = ZstdIndexer::new(frames.as_slice(), 512 << 10).unwrap();
    let mut out = Vec::new();
    ix.read_to_end(&mut out).unwrap();
    assert_eq!(out, data);
    let index = ix.finish().unwrap();
    assert_eq!(index.members, 11);
    assert!(
        index.checkpoints.len() >= 5
            && index
                .checkpoints
                .iter()
                .all(|c| c.kind == CheckpointKind::ZstdFrame)
    );
    assert_eq!(index.diff_id, <[u8; 32]>::from(Sha256::digest(&data)));
    for (i, cp) in index.checkpoints.iter().enumerate() {
        let end = index
            .checkpoints
            .get(i + 1)
            .map_or(data.len() as u64, |n| n.uncompressed_offset);
        let span =
            zstd_layer::decode(cp, &frames, 0, 0, (end - cp.uncompressed_offset) as usize).unwrap();
        assert_eq!(span, &data[cp.uncompressed_offset as usize..end as usize]);
        index.verify_span(i, &span).unwrap();
    }
    let off = 2_000_000u64;
    let cp = index.checkpoint_for(off).unwrap();
    let got = zstd_layer::decode(
        cp,
        &frames[cp.compressed_offset as usize..],
        cp.compressed_offset,
        off - cp.uncompressed_offset,
        5000,
    )
    .unwrap();
    assert_eq!(got, &data[off as usize..off as usize + 5000]);

    let single = zstd::bulk::compress(&data, 3).unwrap();
    let mut ix = ZstdIndexer::new(single.as_slice(), 512 << 10).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let index = ix.finish().unwrap();
    assert_eq!((index.members, index.checkpoints.len()), (1, 1));
    let got = zstd_layer::decode(&index.checkpoints[0], &single, 0, off, 100).unwrap();
    assert_eq!(got, &data[off as usize..off as usize + 100]);
    // Truncated zstd is an error.
    let mut ix = ZstdIndexer::new(&single[..single.len() / 2], 512 << 10).unwrap();
    assert!(std::io::copy(&mut ix, &mut std::io::sink()).is_err());
}

/// Hands out its bytes in reads of pseudo-random sizes (1 byte to 64 KiB), as a network does.
struct Choppy<'a> {
    data: &'a [u8],
    state: u64,
    avail: usize,
}

impl Read for Choppy<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Offers the bytes in pieces of random length: 1-16 bytes, up to 4 KiB or up to 64 KiB.
impl BufRead for Choppy<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.avail == 0 {
            self.state = self
                .state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let want = match (self.state >> 33) % 4 {
                0 => 1 + (self.state >> 40) as usize % 16,
                1 => 1 + (self.state >> 40) as usize % 4096,
                _ => 1 + (self.state >> 40) as usize % (64 << 10),
            };
            self.avail = want.min(self.data.len());
        }
        Ok(&self.data[..self.avail])
    }
    fn consume(&mut self, n: usize) {
        self.data = &self.data[n..];
        self.avail -= n;
    }
}

/// Indexes `blob` the way the tar walker drives it: reads up to each of `requests` (a file's
/// first data byte), requests a checkpoint there, skips on; the rest is skipped by seeking.
fn index_driven(blob: &[u8], seed: u64, requests: &[u64]) -> Vec<(u64, u64, u8, [u8; 32])> {
    use std::io::{Seek, SeekFrom};
    let mut ix = GzipIndexer::new(
        Choppy {
            data: blob,
            state: seed,
            avail: 0,
        },
        1 << 20,
    )
    .unwrap();
    let handle = ix.requests();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 512];
    for &r in requests {
        while pos < r {
            let n = buf.len().min(usize::try_from(r - pos).unwrap());
            pos += ix.read(&mut buf[..n]).unwrap() as u64;
        }
        handle.request(r);
        pos = ix.seek(SeekFrom::Current(2_000)).unwrap();
    }
    let done = ix.finish().unwrap();
    done.checkpoints
        .iter()
        .map(|c| {
            (
                c.uncompressed_offset,
                c.compressed_offset,
                c.bits,
                c.span_digest,
            )
        })
        .collect()
}

#[test]
fn checkpoints_do_not_depend_on_how_the_input_arrives() {
    // Placement once depended on read sizes: when one inflate call's output crossed both a
    // file's start and the next span boundary, the span checkpoint was placed first and the
    // file's (earlier) one dropped, so a layer indexed twice could give two archives. Requests
    // just before where span checkpoints fall make that crossing likely.
    let data = mixed_data(7, 12 << 20);
    let blob = gzip_members(&data, 2, 6);
    let spans: Vec<u64> = index_driven(&blob, 0, &[])
        .iter()
        .skip(1)
        .map(|c| c.0)
        .collect();
    assert!(spans.len() > 8, "{} span checkpoints", spans.len());
    let requests: Vec<u64> = spans.iter().map(|s| s - 700).collect();
    let want = index_driven(&blob, 0, &requests);
    for seed in 1..16 {
        assert_eq!(index_driven(&blob, seed, &requests), want, "seed {seed}");
    }
}

/// A source that fails every other call with `Interrupted` (a signal arriving mid-read), as
/// `Read` and `BufRead` allow.
struct Interrupting<'a> {
    data: &'a [u8],
    calls: u32,
}

impl Interrupting<'_> {
    fn interrupt(&mut self) -> std::io::Result<()> {
        self.calls += 1;
        if self.calls % 2 == 1 {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        Ok(())
    }
}

impl Read for Interrupting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.interrupt()?;
        let n = buf.len().min(self.data.len()).min(10_000);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl BufRead for Interrupting<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.interrupt()?;
        Ok(&self.data[..self.data.len().min(10_000)])
    }
    fn consume(&mut self, n: usize) {
        self.data = &self.data[n..];
    }
}

#[test]
fn interrupted_reads_are_retried_by_every_indexer() {
    use clip_seekable::ZstdIndexer;
    let data = mixed_data(9, 600_000);
    let want = <[u8; 32]>::from(Sha256::digest(&data));
    let src = |blob| Interrupting {
        data: blob,
        calls: 0,
    };
    let gz = gzip_members(&data, 2, 6);
    let mut ix = GzipIndexer::new(src(&gz), 1 << 16).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let gz_index = ix.finish().unwrap();
    assert_eq!(gz_index.diff_id, want);
    assert_eq!(gz_index.checkpoints, index(&gz, 1 << 16).checkpoints);
    let zst = zstd::bulk::compress(&data, 3).unwrap();
    let mut ix = ZstdIndexer::new(src(&zst), 1 << 16).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    assert_eq!(ix.finish().unwrap().diff_id, want);
    let mut ix = PlainIndexer::new(src(&data), 1 << 16);
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    assert_eq!(ix.finish().unwrap().diff_id, want);
}

#[test]
fn the_helper_thread_digests_the_input_it_is_fed() {
    let data = mixed_data(41, 3 << 20);
    let blob = gzip_members(&data, 2, 6);
    let zst = zstd::encode_all(data.as_slice(), 3).unwrap();
    let digest = |b: &[u8]| <[u8; 32]>::from(Sha256::digest(b));
    // Fed in uneven pieces, as network buffers arrive; the feed outlives the indexer's end.
    let feed_all = |thread: &mut clip_seekable::HashThread, b: &[u8]| {
        let mut feed = thread.input();
        for piece in b.chunks(77_777) {
            feed.feed(bytes::Bytes::copy_from_slice(piece));
        }
        feed.flush();
        feed
    };

    let mut thread = clip_seekable::HashThread::start();
    let _feed = feed_all(&mut thread, &blob);
    let mut ix = GzipIndexer::with_hash_thread(blob.as_slice(), 1 << 20, thread).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let got = ix.finish().unwrap();
    let want = clip_seekable::InputDigest {
        sha256: digest(&blob),
        len: blob.len() as u64,
    };
    assert_eq!(got.input, Some(want));
    assert_eq!(got.diff_id, digest(&data));

    let mut thread = clip_seekable::HashThread::start();
    let _feed = feed_all(&mut thread, &zst);
    let mut ix =
        clip_seekable::ZstdIndexer::with_hash_thread(zst.as_slice(), 1 << 20, thread).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let got = ix.finish().unwrap();
    assert_eq!(got.input.map(|d| d.sha256), Some(digest(&zst)));

    let mut thread = clip_seekable::HashThread::start();
    let _feed = feed_all(&mut thread, &data[..1000]);
    let mut ix = PlainIndexer::with_hash_thread(data.as_slice(), 1 << 20, thread);
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let got = ix.finish().unwrap();
    // Only what was fed is digested: a reader that misses bytes shows as a wrong digest.
    assert_eq!(
        got.input,
        Some(clip_seekable::InputDigest {
            sha256: digest(&data[..1000]),
            len: 1000
        })
    );

    // Without a feed there is no input digest; a dropped indexer ends its thread.
    assert_eq!(index(&blob, 1 << 20).input, None);
    let mut thread = clip_seekable::HashThread::start();
    let _feed = thread.input();
    drop(GzipIndexer::with_hash_thread(blob.as_slice(), 1 << 20, thread).unwrap());
}
