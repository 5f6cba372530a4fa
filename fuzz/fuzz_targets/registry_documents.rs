//! Untrusted registry input: image references, digests, platforms, manifests, indexes and image
//! configs are parsed into typed values or errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(r) = clip_registry::Reference::parse(s) {
            // Normalisation is idempotent.
            let again = clip_registry::Reference::parse(&r.to_string()).expect("a normalised reference parses");
            assert_eq!(again, r);
        }
        let _ = clip_registry::oci::parse_platform(s);
        let _ = clip_format::Digest::parse(s);
    }
    if let Ok(m) = serde_json::from_slice::<clip_registry::oci::Manifest>(data) {
        for d in m.layers() {
            let _ = clip_registry::oci::digest(d);
        }
    }
    if let Ok(i) = serde_json::from_slice::<clip_registry::oci::Index>(data) {
        for d in i.manifests() {
            let _ = clip_registry::oci::digest(d);
        }
    }
    if let Ok(c) = serde_json::from_slice::<clip_registry::oci::ImageConfiguration>(data) {
        let _ = clip_registry::oci::image_config(&c);
        let _ = clip_registry::oci::diff_ids(&c);
    }
});
