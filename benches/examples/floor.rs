//! The work no indexer can skip, timed on its own: inflating every layer (zlib-rs into 128 KiB
//! buffers) and SHA-256 of the uncompressed bytes (the `diff_id`s) and of the blobs (their
//! digests). Best of three, one core each. `benches/macro/index-numpy` divides the sum by the
//! core count to get the shortest indexing time this machine allows.
//!
//!   cargo run --release -p clip-benches --example floor -- BLOB...
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::io::Read;
use std::time::Instant;

use sha2::{Digest, Sha256};

fn best(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let (mut inflate, mut sha_u, mut sha_c, mut largest) = (0.0, 0.0, 0.0, 0.0f64);
    for path in std::env::args().skip(1) {
        let blob = std::fs::read(&path).unwrap();
        let t = best(|| {
            let mut d = flate2::read::MultiGzDecoder::new(blob.as_slice());
            let mut buf = vec![0u8; 128 << 10];
            while d.read(&mut buf).unwrap() > 0 {}
        });
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(blob.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        inflate += t;
        largest = largest.max(t);
        sha_u += best(|| {
            std::hint::black_box(Sha256::digest(&tar));
        });
        sha_c += best(|| {
            std::hint::black_box(Sha256::digest(&blob));
        });
    }
    println!(
        "{{\"inflate_s\": {inflate:.3}, \"largest_layer_inflate_s\": {largest:.3}, \"sha256_uncompressed_s\": {sha_u:.3}, \"sha256_blobs_s\": {sha_c:.3}}}"
    );
}
