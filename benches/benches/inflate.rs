//! Baseline: plain gzip inflate of a seeded layer with the zlib-rs inflater.
//!
//! Indexing a gzip layer must reach >= 90% of this throughput (issue: v2 indexing); this bench is
//! the denominator of that ratio.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::Read;

use clip_testkit::image::{Compression, EdgeCaseOptions, Layer, compress, edge_cases, write_tar};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn layer_tar() -> Vec<u8> {
    let img = edge_cases(&EdgeCaseOptions {
        large_file: 4 << 20,
        small_files: 2000,
        devices: true,
        ..EdgeCaseOptions::default()
    });
    let base: &Layer = &img.layers[0];
    write_tar(base).expect("seeded layer builds")
}

fn inflate(c: &mut Criterion) {
    let tar = layer_tar();
    let gz = compress(&tar, Compression::Gzip).expect("gzip");
    let mut g = c.benchmark_group("inflate");
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.sample_size(10);
    g.bench_function("flate2-zlib-rs/gzip-layer", |b| {
        b.iter(|| {
            let mut d = flate2::read::GzDecoder::new(gz.as_slice());
            let mut out = Vec::with_capacity(tar.len());
            d.read_to_end(&mut out).expect("inflate");
            black_box(out.len())
        });
    });
    g.finish();
}

criterion_group!(benches, inflate);
criterion_main!(benches);
