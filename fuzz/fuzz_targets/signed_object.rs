//! Open arbitrary bytes as a signed object from a shared store (and arbitrary text as a public
//! key): a typed refusal or the payload, never a panic; nothing but a genuine signature by the
//! trusted key under its name opens.
#![no_main]

use clip_objstore::signed::{SigningKey, Trust};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (bool, String, Vec<u8>)| {
    let (allow_unsigned, name, bytes) = input;
    let _ = name.parse::<clip_objstore::signed::PublicKey>();
    // One key for the run: the fuzzer cannot produce its signatures, so only unsigned bytes
    // (when allowed) may open.
    static KEY: std::sync::OnceLock<Option<SigningKey>> = std::sync::OnceLock::new();
    let Some(key) = KEY
        .get_or_init(|| SigningKey::generate().map(|(_, k)| k).ok())
        .as_ref()
    else {
        return;
    };
    let trust = Trust {
        trusted: vec![key.public()],
        allow_unsigned,
        ..Trust::default()
    };
    if let Ok(payload) = trust.open(&name, &bytes) {
        assert!(allow_unsigned && payload == bytes.as_slice());
    }
    // A genuine one opens, and only under its own name.
    let sealed = key.seal(&name, &bytes);
    assert_eq!(trust.open(&name, &sealed).ok(), Some(bytes.as_slice()));
    assert!(trust.open(&format!("{name}x"), &sealed).is_err());
});
