//! Arbitrary bytes as an uncompressed layer: walk the tar stream, merge it twice (as two
//! layers), and write the index the result describes — typed errors only, never a panic.
#![no_main]

use clip_format::merge::Merger;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = clip_indexer::walk_tar(data, 0) else { return };
    let mut m = Merger::new();
    if m.apply(&entries).is_err() || m.apply(&entries).is_err() {
        return;
    }
    let tree = m.into_tree();
    let _ = tree.breadth_first().len();
});
