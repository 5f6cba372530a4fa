//! Decode arbitrary bytes as a shared span store object (a zstd frame) into a span of a length
//! the input chooses (up to 16 MiB): no input may panic, and nothing longer than the span's
//! length is ever produced.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, object)) = data.split_first_chunk::<3>() else { return };
    let len = u64::from(u32::from_le_bytes([len[0], len[1], len[2], 0]));
    if let Some(bytes) = clip_fs::spanstore::decode(object, len) {
        assert_eq!(bytes.len() as u64, len);
    }
});
