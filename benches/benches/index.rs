//! Indexing one gzip layer vs plain inflate of the same layer with the same inflater (zlib-rs).
//!
//! Target (v2 indexing issue): indexing >= 90% of plain inflate throughput (two baselines: through
//! `io::copy`'s 8 KiB buffer, and into a 128 KiB buffer; compare with the faster). The layer is seeded:
//! 3,000 text files of 1-40 KiB and eight 4 MiB files, about 90 MiB uncompressed.
//!
//! Indexing paths, each a superset of the one before: `checkpoints_and_span_digests` (inflate,
//! checkpoints, span checks and the `diff_id`, read out through 64 KiB copies), `layer_index`
//! (the issue's unit: adds the tar walk and large-file checkpoints, skips file data), and
//! `full_index_from_layout` (adds reading the blob file, its digest, the merge and the archive
//! write).
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::Read;

use clip_indexer::{IndexOptions, Input, index};
use clip_testkit::image::{Compression, Entry, Image, Layer, random_bytes, text_bytes};
use clip_testkit::{ImageBuilder, ManifestFormat};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn layer() -> Image {
    let mut entries = vec![Entry::dir("usr"), Entry::dir("usr/share")];
    for i in 0..3000u64 {
        entries.push(Entry::file(
            &format!("usr/share/f{i:05}.txt"),
            text_bytes(i, 1024 + (i as usize * 7919) % (39 << 10)),
        ));
    }
    for i in 0..8u64 {
        let mut big = text_bytes(100 + i, 3 << 20);
        big.extend(random_bytes(200 + i, 1 << 20));
        entries.push(Entry::file(&format!("usr/lib/big{i}.so"), big));
    }
    Image::new(vec![Layer::new(entries).compression(Compression::Gzip)])
}

/// Plain inflate (zlib-rs through flate2) into a 128 KiB buffer; returns the bytes produced.
fn inflate_128k(blob: &[u8]) -> usize {
    let mut decoder = flate2::read::GzDecoder::new(blob);
    let mut buf = vec![0u8; 128 << 10];
    let mut total = 0;
    loop {
        let got = decoder.read(&mut buf).expect("inflate");
        if got == 0 {
            return total;
        }
        total += got;
    }
}

fn bench(c: &mut Criterion) {
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(layer())
        .build()
        .expect("build");
    let l = &built.manifests[0].layers[0];
    let dir = tempfile::tempdir().expect("tmp");
    let layout = dir.path().join("layout");
    built.write_oci_layout(&layout, "b").expect("layout");
    let blob = l.blob.bytes.clone();
    let mut g = c.benchmark_group("gzip_layer");
    g.throughput(Throughput::Bytes(l.tar.len() as u64));
    g.sample_size(10);
    g.bench_function("plain_inflate", |b| {
        b.iter(|| {
            let mut d = flate2::read::GzDecoder::new(blob.as_slice());
            black_box(std::io::copy(&mut d, &mut std::io::sink()).expect("inflate"))
        });
    });
    // The same inflater reading into a large buffer: no 8 KiB copy loop, the faster baseline.
    g.bench_function("plain_inflate_128k_reads", |b| {
        b.iter(|| black_box(inflate_128k(&blob)));
    });
    g.bench_function("checkpoints_and_span_digests", |b| {
        b.iter(|| {
            let mut ix =
                clip_seekable::GzipIndexer::new(blob.as_slice(), 4 << 20).expect("indexer");
            let mut buf = vec![0u8; 64 << 10];
            while ix.read(&mut buf).expect("read") > 0 {}
            black_box(ix.finish().expect("finish").checkpoints.len())
        });
    });
    // The issue's unit: one gzip layer indexed (inflate, tar walk, checkpoints, span checks,
    // diff_id), without the blob digest, the merge and the archive write.
    g.bench_function("layer_index", |b| {
        b.iter(|| {
            let (entries, index) =
                clip_indexer::index_gzip_layer(blob.as_slice(), 4 << 20).expect("index");
            black_box((entries.len(), index.checkpoints.len()))
        });
    });
    g.bench_function("sha256_of_uncompressed", |b| {
        use sha2::Digest;
        b.iter(|| black_box(sha2::Sha256::digest(&l.tar)));
    });
    // The blob digest a full index also verifies (with the two above: the work no indexer can
    // skip; on two cores the full index cannot beat half their sum).
    g.bench_function("sha256_of_blob", |b| {
        use sha2::Digest;
        b.iter(|| black_box(sha2::Sha256::digest(&blob)));
    });
    let out = dir.path().join("out.clip");
    let opts = IndexOptions {
        tag: Some("b".into()),
        registry: "r".into(),
        repository: "x".into(),
        ..IndexOptions::default()
    };
    g.bench_function("full_index_from_layout", |b| {
        b.iter(|| {
            let input = Input::Layout { dir: &layout };
            black_box(index(input, &out, &opts, None).expect("index").entries)
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
