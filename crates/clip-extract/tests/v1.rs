//! The v1 path against the oracle: image → v1 archive → extract, v2 → extract and directory →
//! v1 → extract all equal `umoci unpack` of the same image; hostile inputs are refused without
//! writing outside the target.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::path::{Path, PathBuf};

use clip_archive::{archive_image, archive_layout};
use clip_extract::{Error, ExtractOptions, extract};
use clip_testkit::image::{EdgeCaseOptions, edge_cases};
use clip_testkit::{
    CompareOptions, Compression, Entry, Image, ImageBuilder, Layer, ManifestFormat, Registry,
    Snapshot, assert_same, oracle,
};

/// Indexes `reference` from its registry into a v2 archive at `out` (1 MiB spans).
fn index_v2(reference: &str, out: &Path, client: &clip_registry::BlockingClient) {
    let opts = clip_indexer::IndexOptions {
        checkpoint_bytes: 1 << 20,
        ..clip_indexer::IndexOptions::default()
    };
    let input = clip_indexer::Input::Registry { reference, client };
    clip_indexer::index(input, out, &opts, None).unwrap();
}

/// umoci's view of `image` (of `twin`, same content with layers umoci reads, when given).
fn oracle_tree(registry: &Registry, dir: &Path, image: &ImageBuilder) -> Snapshot {
    registry
        .push(&image.build().unwrap(), "test/oracle", "t")
        .unwrap();
    let root = oracle::oracle_unpack(registry, "test/oracle:t", &dir.join("oracle"), None).unwrap();
    Snapshot::scan(&root).unwrap()
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
#[test]
fn image_to_v1_to_extract_equals_umoci_for_layouts_and_registries() {
    oracle::require_oracle_tools().unwrap();
    let registry = Registry::start_anonymous().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gzip = clip_testkit::image::edge_builder([
        Compression::Gzip,
        Compression::GzipMultiMember(3),
        Compression::None,
    ]);
    let expected = oracle_tree(&registry, dir.path(), &gzip);

    // From an OCI layout (what `buildah push oci:` writes).
    let layout = dir.path().join("layout");
    gzip.build()
        .unwrap()
        .write_oci_layout(&layout, "t")
        .unwrap();
    let out = dir.path().join("layout.clip");
    let s = archive_layout(&layout, Some("t"), None, &out).unwrap();
    assert_eq!(s.kind, clip_format::ArchiveKind::V1Local);
    assert!(s.data_bytes > 6 << 20, "{s:?}");
    let root = dir.path().join("from-layout");
    extract(&out, &root, &ExtractOptions::default()).unwrap();
    assert_same(&expected, &root);

    // From the registry, zstd layers included (their umoci twin is the gzip image).
    let zstd = clip_testkit::image::edge_builder([
        Compression::ZstdMultiFrame(3),
        Compression::Zstd,
        Compression::Gzip,
    ]);
    registry
        .push(&zstd.build().unwrap(), "test/zstd", "t")
        .unwrap();
    let client =
        clip_registry::BlockingClient::new(clip_registry::ClientConfig::default()).unwrap();
    let out = dir.path().join("registry.clip");
    let fetched = std::sync::atomic::AtomicU64::new(0);
    archive_image(
        &format!("{}/test/zstd:t", registry.host()),
        &client,
        None,
        &out,
        Some(&fetched),
    )
    .unwrap();
    assert!(
        fetched.into_inner() > 6 << 20,
        "progress counts the layer bytes"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".clip-pull-"))
        .collect();
    assert!(leftovers.is_empty(), "staging layout left behind");
    let root = dir.path().join("from-registry");
    extract(&out, &root, &ExtractOptions::default()).unwrap();
    assert_same(&expected, &root);

    // A v2 archive extracts by streaming each layer once from the registry.
    let v2 = dir.path().join("v2.clip");
    index_v2(&format!("{}/test/zstd:t", registry.host()), &v2, &client);
    let root = dir.path().join("from-v2");
    let s = extract(&v2, &root, &ExtractOptions::default()).unwrap();
    assert!(s.bytes > 6 << 20, "{s:?}");
    assert_same(&expected, &root);
    // Sparse files keep their holes on disk (umoci writes the zeros out).
    for (name, at_most) in [("sparse-empty", 0), ("sparse-1.0", 3 << 20)] {
        let md = std::fs::metadata(root.join("data").join(name)).unwrap();
        let allocated = std::os::unix::fs::MetadataExt::blocks(&md) * 512;
        assert!(allocated <= at_most, "{name}: {allocated} bytes allocated");
    }

    // Images indexed from their tables of contents (eStargz, zstd:chunked; virtual offsets)
    // extract span by span; TOCs carry whole-second times, so one file's sub-second mtime is the
    // only difference from umoci (of the gzip twin for zstd, which this umoci cannot read).
    for (name, compression) in [
        (
            "estargz",
            [
                Compression::EStargz(64 << 10),
                Compression::EStargz(1 << 20),
                Compression::EStargz(4 << 10),
            ],
        ),
        ("chunked", [Compression::ZstdChunked; 3]),
    ] {
        let image = edge_cases(&EdgeCaseOptions {
            compression,
            devices: clip_testkit::is_root(),
            ..EdgeCaseOptions::default()
        });
        registry
            .push(
                &ImageBuilder::new(ManifestFormat::Oci)
                    .image(image)
                    .build()
                    .unwrap(),
                &format!("test/{name}"),
                "t",
            )
            .unwrap();
        let toc = dir.path().join(format!("{name}.clip"));
        index_v2(&format!("{}/test/{name}:t", registry.host()), &toc, &client);
        assert!(
            clip_format::Archive::open(&toc)
                .unwrap()
                .layers()
                .iter()
                .all(|l| l.toc_indexed)
        );
        let toc_root = dir.path().join(format!("from-{name}"));
        extract(&toc, &toc_root, &ExtractOptions::default()).unwrap();
        let want = if name == "estargz" {
            Snapshot::scan(
                &clip_testkit::oracle::oracle_unpack(
                    &registry,
                    "test/estargz:t",
                    &dir.path().join("toc-oracle"),
                    None,
                )
                .unwrap(),
            )
            .unwrap()
        } else {
            expected.clone()
        };
        let diffs = want.compare(
            &Snapshot::scan(&toc_root).unwrap(),
            &CompareOptions::default(),
        );
        assert!(
            diffs.len() == 1 && diffs[0].contains("data/ns-time"),
            "{name}: {}",
            diffs.join("\n")
        );
    }

    // Directory → v1 → extract round-trips the unpacked tree.
    let out = dir.path().join("dir.clip");
    clip_archive::archive_rootfs(&root, &out, &clip_format::Meta::default()).unwrap();
    let again = dir.path().join("again");
    extract(&out, &again, &ExtractOptions::default()).unwrap();
    assert_same(&expected, &again);
}

fn layout_of(dir: &Path, layers: Vec<Layer>) -> PathBuf {
    let layout = dir.join("layout");
    ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(layers))
        .build()
        .unwrap()
        .write_oci_layout(&layout, "t")
        .unwrap();
    layout
}

/// Every path under `dir`, to show nothing appeared around the extraction target.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_inputs_are_refused_and_nothing_lands_outside() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();

    // A layer that plants a symlink to the outside and then writes through it.
    let layout = layout_of(
        &dir.path().join("a"),
        vec![
            Layer::new(vec![Entry::symlink("escape", outside.to_str().unwrap())]),
            Layer::new(vec![Entry::file("escape/pwned", "x")]),
        ],
    );
    let out = dir.path().join("a.clip");
    match archive_layout(&layout, Some("t"), None, &out) {
        Ok(_) => {
            // The merge puts the later file in a real directory that replaces the link.
            let target = dir.path().join("target-a");
            extract(&out, &target, &ExtractOptions::default()).unwrap();
            let md = std::fs::symlink_metadata(target.join("escape")).unwrap();
            assert!(md.is_dir());
            assert_eq!(std::fs::read(target.join("escape/pwned")).unwrap(), b"x");
        }
        Err(e) => eprintln!("refused at archive time: {e}"),
    }
    assert!(listing(&outside).is_empty(), "{:?}", listing(&outside));

    // Hard links and paths that climb out are refused when the image is read.
    for evil in [
        Entry::hardlink("link", "../../etc/passwd"),
        Entry::file("../../etc/evil", "x").pax_path(),
    ] {
        let layout = layout_of(&dir.path().join("b"), vec![Layer::new(vec![evil])]);
        let err = archive_layout(&layout, Some("t"), None, &dir.path().join("b.clip")).unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
        assert!(!dir.path().join("b.clip").exists());
        std::fs::remove_dir_all(dir.path().join("b")).unwrap();
    }

    // A target that already holds a symlinked directory: extraction stops, nothing outside.
    let layout = layout_of(
        &dir.path().join("c"),
        vec![Layer::new(vec![Entry::file(
            "etc/passwd",
            "root:x:0:0::/:/bin/sh\n",
        )])],
    );
    let out = dir.path().join("c.clip");
    archive_layout(&layout, Some("t"), None, &out).unwrap();
    let target = dir.path().join("target-c");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("etc")).unwrap();
    let err = extract(&out, &target, &ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Unsafe { .. }), "{err}");
    assert!(listing(&outside).is_empty(), "{:?}", listing(&outside));

    // Corrupt file data in a v1 archive: a digest error, not bad bytes on disk.
    let mut bytes = std::fs::read(&out).unwrap();
    let at = bytes
        .windows(12)
        .position(|w| w == b"root:x:0:0::")
        .unwrap();
    bytes[at] = b'R';
    std::fs::write(&out, &bytes).unwrap();
    let err = extract(
        &out,
        &dir.path().join("target-d"),
        &ExtractOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("digest"), "{err}");
}

#[test]
fn a_debian_image_to_v1_and_back_equals_umoci() {
    if !clip_testkit::require(&[
        clip_testkit::Need::Root,
        clip_testkit::Need::Program("debootstrap"),
    ]) {
        return;
    }
    oracle::require_oracle_tools().unwrap();
    let top = vec![
        Entry::whiteout("etc/motd"),
        Entry::file("etc/hostname", "clip-test\n"),
    ];
    let image = ImageBuilder::new(ManifestFormat::Oci)
        .image(clip_testkit::debian::layered_image(Compression::Gzip, top).unwrap());
    let registry = Registry::start_anonymous().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let expected = oracle_tree(&registry, dir.path(), &image);
    let layout = dir.path().join("layout");
    image.write_oci_layout(&layout, "t").unwrap();
    let out = dir.path().join("debian.clip");
    archive_layout(&layout, Some("t"), None, &out).unwrap();
    let root = dir.path().join("rootfs");
    extract(&out, &root, &ExtractOptions::default()).unwrap();
    assert_same(&expected, &root);
}
