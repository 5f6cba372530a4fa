//! Untrusted registry input: image references, manifests, indexes, image configs and docker
//! credential configs are parsed into typed values or errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(r) = clip_registry::Reference::parse(s) {
            // Normalisation is idempotent.
            let again = clip_registry::Reference::parse(&r.to_string()).expect("a normalised reference parses");
            assert_eq!(again, r);
        }
        let _ = clip_registry::Platform::parse(s);
    }
    let _ = serde_json::from_slice::<clip_registry::oci::Manifest>(data);
    let _ = serde_json::from_slice::<clip_registry::oci::Index>(data);
    if let Ok(c) = serde_json::from_slice::<clip_registry::oci::Config>(data) {
        let _ = c.to_image_config();
    }
});
