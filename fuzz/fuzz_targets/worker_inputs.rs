//! Untrusted worker inputs: the `imageService:` YAML configuration and prefetch profiles
//! (which may come from another machine) parse into typed values or errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = clip_policy::Config::from_yaml(s) {
            assert!(matches!(c.clip_version, 1 | 2));
        }
    }
    let _ = clip_fs::Profile::from_slice(data);
});
