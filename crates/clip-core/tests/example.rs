//! The embedding example runs against a real registry, so it never rots.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

#[path = "../examples/embed_index_and_read.rs"]
mod example;

use clip_testkit::{Entry, Image, ImageBuilder, Layer, ManifestFormat, Registry};

#[test]
fn the_embedding_example_indexes_mounts_and_reads_one_file() {
    if !clip_testkit::require(clip_testkit::MOUNT) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let big = clip_testkit::image::random_bytes(5, 12 << 20);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(vec![Layer::new(vec![
            Entry::file("srv/big.bin", big),
            Entry::file("etc/os-release", "ID=example\n"),
        ])]))
        .build()
        .unwrap();
    let image = reg.push(&built, "demo/app", "v1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let (bytes, fetched) = example::run(&image.reference, "/etc/os-release", work.path()).unwrap();
    assert_eq!(bytes, b"ID=example\n");
    // Only the small file's span came over the wire, not the 12 MB neighbour.
    assert!(fetched < 8 << 20, "{fetched}");
}
