//! Shared by the mount tests.
#![allow(clippy::print_stderr)]

use std::path::Path;

/// Whether this process can mount (root and `/dev/fuse`; [`clip_testkit::require()`] skips
/// loudly, or fails under `scripts/test`); sets up test logging once.
pub(crate) fn can_mount() -> bool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "clip_fs=warn".into()),
        )
        .with_test_writer()
        .try_init();
    clip_testkit::require(clip_testkit::MOUNT)
}

/// A one-layer image holding `files` (path, bytes), its layer compressed with `compression`.
pub(crate) fn files_image(
    files: &[(String, Vec<u8>)],
    compression: clip_testkit::Compression,
) -> clip_testkit::ImageBuilder {
    let layer = clip_testkit::Layer::new(
        files
            .iter()
            .map(|(p, b)| clip_testkit::Entry::file(p, b.clone()))
            .collect(),
    )
    .compression(compression);
    clip_testkit::ImageBuilder::new(clip_testkit::ManifestFormat::Oci)
        .image(clip_testkit::Image::new(vec![layer]))
}

/// Every one of `files` (path, bytes) reads back exactly through the mount at `mountpoint`.
pub(crate) fn assert_files(mountpoint: &Path, files: &[(String, Vec<u8>)]) {
    for (p, want) in files {
        let got = std::fs::read(mountpoint.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(got == *want, "{p}: wrong bytes");
    }
}
