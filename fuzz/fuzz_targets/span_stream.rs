//! Decode arbitrary (untrusted) compressed bytes from an arbitrary checkpoint with the streaming
//! span decoder, as a large span is read, and verify what comes out in pieces: every outcome is
//! bytes or a typed error, never a panic; no piece is handed on beyond the span's length.
#![no_main]

use clip_format::{Checkpoint, CheckpointKind, MediaKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, u8, u8, u32, Vec<u8>, Vec<u8>)| {
    let (media, kind, bits, len, window, data) = input;
    let media = match media % 3 {
        0 => MediaKind::Gzip,
        1 => MediaKind::Zstd,
        _ => MediaKind::Tar,
    };
    let kind = match kind % 4 {
        0 => CheckpointKind::Deflate,
        1 => CheckpointKind::GzipMember,
        2 => CheckpointKind::ZstdFrame,
        _ => CheckpointKind::Plain,
    };
    let len = u64::from(len % (1 << 20));
    let cp = Checkpoint {
        kind,
        compressed_offset: u64::from(bits % 16),
        uncompressed_offset: 0,
        bits: bits % 9,
        window,
        span_digest: [0; 32],
        chain_head: None,
    };
    let end = clip_seekable::LayerEnd {
        size: len,
        diff_id: [0; 32],
    };
    let mut verifier = clip_seekable::SpanVerifier::new(std::slice::from_ref(&cp), 0, &end).ok();
    let mut seen = 0u64;
    let mut reader = data.as_slice();
    let r = clip_seekable::decode_span_to(media, &cp, &mut reader, 0, len, &mut |piece| {
        seen += piece.len() as u64;
        assert!(seen <= len);
        if let Some(v) = verifier.as_mut() {
            v.update(piece);
        }
        Ok(())
    });
    if r.is_ok() {
        assert_eq!(seen, len);
    }
    if let Some(v) = verifier {
        let _ = v.finish();
    }
});
