//! The archive index: open + validate, path lookup and readdir on a seeded 100,000-entry tree.
//!
//! Targets (format issue): open + validate < 10 ms; lookup < 1 µs median.
#![allow(missing_docs)]

use std::hint::black_box;

use clip_format::{
    Archive, LayerInfo, LayerSpan, MediaKind, Meta, Metadata, NodeKind, Source, Tree, write_v2,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const DIRS: usize = 5_000;
const FILES_PER_DIR: usize = 19;

/// A tree shaped like a distribution's /usr: 5,000 package directories of 19 files each.
fn tree() -> (Tree, Vec<Vec<u8>>) {
    let mut t = Tree::default();
    let mut paths = Vec::new();
    let mut offset = 0u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for d in 0..DIRS {
        let dir = format!("usr/share/package-{d:05}-data");
        t.insert(
            dir.as_bytes(),
            NodeKind::Dir,
            Metadata {
                mode: 0o755,
                mtime_sec: 1_700_000_000 + i64::try_from(d % 300).expect("small"),
                ..Metadata::default()
            },
        )
        .expect("dir");
        for f in 0..FILES_PER_DIR {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let size = x % 40_000;
            let path = format!("{dir}/file-{f:02}-{}.so", x % 1000);
            let meta = Metadata {
                mode: if f % 4 == 0 { 0o755 } else { 0o644 },
                mtime_sec: 1_700_000_000 + i64::try_from(d % 300).expect("small"),
                ..Metadata::default()
            };
            t.insert(
                path.as_bytes(),
                NodeKind::File {
                    size,
                    span: Some(LayerSpan::new(0, offset)),
                },
                meta,
            )
            .expect("file");
            offset += size.next_multiple_of(512) + 512;
            paths.push(path.into_bytes());
        }
    }
    let layer = LayerInfo {
        digest: clip_format::Digest::sha256(b"blob"),
        diff_id: clip_format::Digest::sha256(b"tar"),
        media: MediaKind::Gzip,
        single_frame: false,
        toc_indexed: false,
        compressed_size: offset / 3,
        uncompressed_size: offset,
        span_size: 4 << 20,
    };
    LAYER.with(|l| *l.borrow_mut() = Some(layer));
    (t, paths)
}

thread_local! {
    static LAYER: std::cell::RefCell<Option<LayerInfo>> = const { std::cell::RefCell::new(None) };
}

fn archive(c: &mut Criterion) {
    let (tree, paths) = tree();
    let layer = LAYER.with(|l| l.borrow().clone()).expect("layer");
    let meta = Meta {
        source: Some(Source {
            manifest_digest: clip_format::Digest::sha256(b"manifest"),
            registry: "127.0.0.1:5000".into(),
            repository: "bench".into(),
            reference: "127.0.0.1:5000/bench:latest".into(),
        }),
        ..Meta::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.clip");
    let summary = write_v2(&path, &tree, &meta, &[layer], &[vec![]]).expect("write");
    let entries = summary.entries;

    let mut g = c.benchmark_group("archive");
    g.throughput(Throughput::Bytes(summary.bytes));
    g.bench_function(BenchmarkId::new("open_validate", entries), |b| {
        b.iter(|| black_box(Archive::open(&path).expect("open").len()));
    });
    let a = Archive::open(&path).expect("open");
    // Lookups of existing paths in a scattered order.
    let probe: Vec<&[u8]> = (0..4096)
        .map(|i| paths[(i * 7919) % paths.len()].as_slice())
        .collect();
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function(BenchmarkId::new("lookup", entries), |b| {
        b.iter(|| {
            i = (i + 1) % probe.len();
            black_box(a.lookup(probe[i]).expect("present").ino())
        });
    });
    let pkg = a.lookup(b"usr/share/package-02500-data").expect("dir");
    g.bench_function(BenchmarkId::new("readdir_19", entries), |b| {
        b.iter(|| black_box(pkg.children().map(|c| c.name().len()).sum::<usize>()));
    });
    let share = a.lookup(b"usr/share").expect("dir");
    g.throughput(Throughput::Elements(DIRS as u64));
    g.bench_function(BenchmarkId::new("readdir_5000", entries), |b| {
        b.iter(|| black_box(share.children().map(|c| c.name().len()).sum::<usize>()));
    });
    g.finish();
}

criterion_group!(benches, archive);
criterion_main!(benches);
