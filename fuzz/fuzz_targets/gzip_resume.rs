//! Resume inflation from an arbitrary (untrusted) checkpoint over arbitrary compressed bytes:
//! every outcome must be bytes or a typed error, never a panic or an unbounded allocation.
#![no_main]

use clip_format::{Checkpoint, CheckpointKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, u8, u16, u32, Vec<u8>, Vec<u8>)| {
    let (kind, bits, skip, offset, window, data) = input;
    let kind = match kind % 3 {
        0 => CheckpointKind::Deflate,
        1 => CheckpointKind::GzipMember,
        _ => CheckpointKind::Plain,
    };
    let cp = Checkpoint {
        kind,
        compressed_offset: u64::from(offset % 64),
        uncompressed_offset: 0,
        bits,
        window,
        span_digest: [0; 32],
        chain_head: None,
    };
    let _ = clip_seekable::gzip::decode(&cp, &data, 0, u64::from(skip), 1 << 16);
    // The indexer over the same bytes.
    if let Ok(mut ix) = clip_seekable::GzipIndexer::new(data.as_slice(), 1 << 12) {
        let _ = std::io::copy(&mut ix, &mut std::io::sink());
    }
});
