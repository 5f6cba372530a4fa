//! eStargz parsing of untrusted bytes: arbitrary bytes as a footer, and as TOC JSON turned into
//! layer entries and checkpoints. No input may panic, hang or allocate from an unchecked length;
//! whatever is accepted must be consistent (checkpoints increasing, file data inside the stream).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clip_indexer::estargz::footer_toc_offset(data);
    if let Ok((entries, cps, end)) = clip_indexer::estargz::toc_entries(data, 0, 1 << 40, "sha256:x") {
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
});
