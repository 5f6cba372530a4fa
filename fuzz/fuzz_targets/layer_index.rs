//! Decode arbitrary bytes as a stored layer index: no input may panic or allocate from an
//! unchecked length. Each input is tried as given (exercising the magic and checksum checks) and
//! resealed with a correct trailer (exercising the structural checks behind it); whatever decodes
//! must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn seal(body: &[u8]) -> Vec<u8> {
    let mut v = b"CLIPLIX\0".to_vec();
    v.extend_from_slice(body);
    let sum = xxhash_rust::xxh3::xxh3_64(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

fn check(bytes: &[u8]) {
    if let Ok(l) = clip_indexer::decode_layer_index(bytes, 0) {
        assert_eq!(clip_indexer::encode_layer_index(&l), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&seal(data));
});
