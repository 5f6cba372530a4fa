//! Measures index bytes per entry for a real root filesystem, as a v1 archive (with its data)
//! and as the v2 index the same tree would have (file spans assigned as a tar would lay them
//! out; no file data).
//!
//! usage: `cargo run --release -p clip-extract --example index_size -- ROOTFS`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use clip_format::{
    Archive, LayerInfo, LayerSpan, MediaKind, Meta, NodeKind, SectionId, Source, write_v2,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args().nth(1).ok_or("usage: index_size ROOTFS")?;
    let dir = tempfile::tempdir()?;
    let v1 = dir.path().join("v1.clip");
    let s1 = clip_archive::archive_rootfs(root.as_ref(), &v1, &Meta::default())?;
    let a = Archive::open(&v1)?;
    let data = a.section_info(SectionId::DATA).map_or(0, |s| s.length);

    let mut tree = clip_archive::tree_of_dir(root.as_ref())?;
    let mut offset = 0u64;
    for id in tree.breadth_first() {
        if let Some(NodeKind::File { size, span }) = tree.node_mut(id).map(|n| &mut n.kind) {
            offset += 512;
            *span = Some(LayerSpan::new(0, offset));
            offset += size.next_multiple_of(512);
        }
    }
    let layer = LayerInfo {
        digest: clip_format::Digest::sha256(b"layer"),
        diff_id: clip_format::Digest::sha256(b"tar"),
        media: MediaKind::Gzip,
        single_frame: false,
        toc_indexed: false,
        compressed_size: offset,
        uncompressed_size: offset,
        span_size: 4 << 20,
    };
    let meta = Meta {
        source: Some(Source {
            manifest_digest: clip_format::Digest::sha256(b"manifest"),
            registry: "127.0.0.1:5000".into(),
            repository: "rootfs".into(),
            reference: "127.0.0.1:5000/rootfs:latest".into(),
        }),
        ..Meta::default()
    };
    let v2 = dir.path().join("v2.clip");
    let s2 = write_v2(&v2, &tree, &meta, &[layer], &[vec![]])?;
    let n = s1.entries as f64;
    println!(
        "rootfs {root}: {} entries, {data} bytes of file data",
        s1.entries
    );
    println!(
        "v1 archive: {} bytes; index {} bytes = {:.1} bytes/entry (incl. 32-byte sha256 per file)",
        s1.bytes,
        s1.index_bytes,
        s1.index_bytes as f64 / n
    );
    println!(
        "v2 index:   {} bytes = {:.1} bytes/entry (excl. checkpoint windows)",
        s2.index_bytes,
        s2.index_bytes as f64 / n
    );
    Ok(())
}
