//! Table-of-contents parsing of untrusted bytes: arbitrary bytes as an eStargz footer, and as TOC
//! JSON (eStargz and zstd:chunked) turned into layer entries and checkpoints. No input may panic,
//! hang or allocate from an unchecked length; whatever is accepted must be consistent
//! (checkpoints increasing, file data inside the virtual stream).
#![no_main]

use clip_indexer::toc::{TocKind, footer_toc_offset, toc_entries};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = footer_toc_offset(data);
    for kind in [TocKind::EStargz, TocKind::ZstdChunked] {
        if let Ok((entries, cps, end)) = toc_entries(data, 0, 1 << 40, "sha256:x", kind) {
            for w in cps.windows(2) {
                assert!(w[0].compressed_offset < w[1].compressed_offset);
                assert!(w[0].uncompressed_offset < w[1].uncompressed_offset);
            }
            for e in &entries {
                if let clip_format::NodeKind::File { size, span: Some(s) } = &e.kind {
                    if *size > 0 {
                        assert!(s.offset + size <= end);
                    }
                }
            }
        }
    }
});
