//! Indexing an image from its tables of contents (eStargz, zstd:chunked) vs streaming the same
//! layers as plain gzip and zstd, side by side in one run against a local `docker-registry` (started by clip-testkit):
//! index time (medians) and compressed bytes fetched. Used by `benches/macro/index-toc`.
//!
//! usage: `cargo run --release -p clip-indexer --example estargz_bench -- REPS OUT.json LAYER.tar...`
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::cast_precision_loss)]

use clip_testkit::image::{Compression, Image, Layer};
use clip_testkit::{ImageBuilder, ManifestFormat, Registry};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert!(
        args.len() >= 4,
        "usage: estargz_bench REPS OUT.json LAYER.tar..."
    );
    let reps: usize = args[1].parse().unwrap();
    let tars: Vec<Vec<u8>> = args[3..]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let registry = Registry::start_anonymous().unwrap();
    let client = clip_registry::Client::new(clip_registry::ClientConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for (name, compression) in [
        ("gzip", Compression::Gzip),
        ("estargz", Compression::EStargz(4 << 20)),
        ("zstd", Compression::Zstd),
        ("zstd-chunked", Compression::ZstdChunked),
    ] {
        let layers = tars
            .iter()
            .map(|t| Layer::from_tar(t.clone()).compression(compression))
            .collect();
        let pushed = ImageBuilder::new(ManifestFormat::Oci)
            .image(Image::new(layers))
            .build()
            .unwrap()
            .push(&registry, "bench/estargz", name)
            .unwrap();
        let out = dir.path().join(format!("{name}.clip"));
        let mut secs = Vec::new();
        let mut last = None;
        for _ in 0..reps {
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            let t = std::time::Instant::now();
            last = Some(
                clip_indexer::index_image(&pushed.reference, &out, &client, None, 4 << 20, None)
                    .unwrap(),
            );
            secs.push(t.elapsed().as_secs_f64());
        }
        let s = last.unwrap();
        let layer_bytes: u64 = clip_format::Archive::open(&out)
            .unwrap()
            .layers()
            .iter()
            .map(|l| l.compressed_size)
            .sum();
        rows.push(serde_json::json!({
            "layers": name, "median_seconds": median(secs.clone()), "seconds": secs,
            "fetched_bytes": s.compressed_bytes, "layer_bytes": layer_bytes,
            "archive_bytes": s.archive_bytes, "toc_layers": s.toc_layers, "entries": s.entries,
        }));
    }
    let (g, e, z, zc) = (&rows[0], &rows[1], &rows[2], &rows[3]);
    println!(
        "| layers | index time (median of {reps}) | bytes fetched | layer bytes | archive bytes |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.3} s | {} | {} | {} |",
            r["layers"].as_str().unwrap_or(""),
            r["median_seconds"].as_f64().unwrap_or(0.0),
            r["fetched_bytes"],
            r["layer_bytes"],
            r["archive_bytes"]
        );
    }
    let r = |a: &serde_json::Value, b: &serde_json::Value, k: &str| {
        a[k].as_f64().unwrap() / b[k].as_f64().unwrap()
    };
    let (ratio, fetched) = (r(e, g, "median_seconds"), r(e, g, "fetched_bytes"));
    let (zratio, zfetched) = (r(zc, z, "median_seconds"), r(zc, z, "fetched_bytes"));
    println!(
        "\neStargz from its TOC / streaming gzip: time {ratio:.3}, bytes fetched {fetched:.4}"
    );
    println!(
        "zstd:chunked from its manifest / streaming zstd: time {zratio:.3}, bytes fetched {zfetched:.4}"
    );
    std::fs::write(
        &args[2],
        serde_json::to_vec_pretty(&serde_json::json!({"reps": reps, "rows": rows,
            "estargz_vs_gzip": {"time_ratio": ratio, "fetched_ratio": fetched},
            "zstd_chunked_vs_zstd": {"time_ratio": zratio, "fetched_ratio": zfetched}}))
        .unwrap(),
    )
    .unwrap();
}
