//! Seeded file contents.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Seeded pseudo-random bytes (incompressible).
#[must_use]
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Seeded pseudo-text (compresses like real files do, roughly 3:1 with gzip).
#[must_use]
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "container",
        "image",
        "layer",
        "registry",
        "digest",
        "manifest",
        "gzip",
        "index",
        "mount",
        "lazy",
        "fuse",
        "overlay",
        "runtime",
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
        "for",
        "on",
        "with",
        "bytes",
        "file",
        "path",
        "root",
        "etc",
        "usr",
        "lib",
        "python",
        "numpy",
        "debian",
        "package",
        "version",
        "config",
        "0",
        "1",
        "42",
        "1024",
        "=",
        "{",
        "}",
        "\n",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        let w = WORDS[(rng.next_u32() as usize) % WORDS.len()];
        v.extend_from_slice(w.as_bytes());
        v.push(if rng.next_u32() % 11 == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    v.truncate(len);
    v
}

/// A `security.capability` value (`VFS_CAP_REVISION_2`) granting `cap` as permitted and effective.
#[must_use]
pub fn file_capability(cap: u32) -> Vec<u8> {
    let magic: u32 = 0x0200_0000 | 1; // revision 2, effective bit
    let (lo, hi) = if cap < 32 {
        (1u32 << cap, 0u32)
    } else {
        (0, 1u32 << (cap - 32))
    };
    let mut v = Vec::with_capacity(20);
    for word in [magic, lo, 0, hi, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}
