//! The registry client against `curl`, on the same local distribution registry, in one run.
//!
//! Targets (registry issue): streaming a 200 MB blob >= 90% of curl's throughput; a 64 KiB range
//! read on a warm connection: median < 2 ms.
#![allow(missing_docs)]

use std::hint::black_box;
use std::process::Command;

use bytes::Bytes;
use clip_registry::{Client, ClientConfig, Reference};
use clip_testkit::Registry;
use clip_testkit::image::random_bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BLOB: usize = 200 << 20;

fn bench(c: &mut Criterion) {
    let registry = Registry::start_anonymous().expect("registry");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = Client::new(ClientConfig::default()).expect("client");
    let data = Bytes::from(random_bytes(42, BLOB));
    let digest = clip_format::Digest::sha256(&data);
    let r = Reference::parse(&format!("{}/bench/blob:x", registry.host())).expect("ref");
    rt.block_on(client.push_blob(&r, &digest, data))
        .expect("push");
    let url = format!("http://{}/v2/bench/blob/blobs/{digest}", registry.host());

    let mut g = c.benchmark_group("registry_blob_200MB");
    g.throughput(Throughput::Bytes(BLOB as u64));
    g.sample_size(10);
    g.bench_function("curl", |b| {
        b.iter(|| {
            let out = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "-w", "%{size_download}", &url])
                .output()
                .expect("curl");
            black_box(out.stdout)
        });
    });
    g.bench_function("clip_registry_stream", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(client.blob_stream(&r, &digest, |c| black_box(c.len()) > 0))
                    .expect("stream"),
            )
        });
    });
    g.finish();

    let mut g = c.benchmark_group("registry_range_64KiB");
    g.throughput(Throughput::Bytes(64 << 10));
    let mut i = 0u64;
    g.bench_function("clip_registry_read_range_warm", |b| {
        b.iter(|| {
            i = (i + 7919 * 4096) % (BLOB as u64 - (64 << 10));
            black_box(
                rt.block_on(client.read_range(&r, &digest, i..i + (64 << 10)))
                    .expect("range")
                    .len(),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
