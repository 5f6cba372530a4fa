//! The tree a v2 archive describes, with file contents read back through clip-seekable from the
//! layer blobs, equals `umoci unpack` of the same image: paths, types, modes, owners, sizes,
//! content, symlink targets, devices, xattrs, hard-link groups and mtimes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

use clip_format::Digest;
use clip_format::{Archive, DataLocation, EntryKind, MediaKind};
use clip_indexer::{Error, IndexOptions, IndexSummary, Input, ProgressFn, index};
use clip_registry::BlockingClient;
use clip_testkit::image::{Compression, Entry, Image, Layer};
use clip_testkit::snapshot::{Item, ItemKind};
use clip_testkit::{CompareOptions, ImageBuilder, ManifestFormat, Snapshot, oracle};
use sha2::{Digest as _, Sha256};

/// Indexes the OCI layout at `layout` into a v2 archive at `out`.
fn index_layout(
    layout: &Path,
    out: &Path,
    opts: &IndexOptions,
) -> clip_indexer::Result<IndexSummary> {
    index(Input::Layout { dir: layout }, out, opts, None)
}

/// Indexes `reference` from its registry into a v2 archive at `out`.
fn index_image_with(
    reference: &str,
    out: &Path,
    client: &BlockingClient,
    opts: &IndexOptions,
    progress: Option<&ProgressFn<'_>>,
) -> clip_indexer::Result<IndexSummary> {
    index(Input::Registry { reference, client }, out, opts, progress)
}

/// The same with 1 MiB spans and no layer store.
fn index_image(
    reference: &str,
    out: &Path,
    client: &BlockingClient,
    progress: Option<&ProgressFn<'_>>,
) -> clip_indexer::Result<IndexSummary> {
    let opts = IndexOptions {
        checkpoint_bytes: 1 << 20,
        ..IndexOptions::default()
    };
    index_image_with(reference, out, client, &opts, progress)
}

fn client() -> BlockingClient {
    BlockingClient::new(clip_registry::ClientConfig::default()).unwrap()
}

/// Reads archive file contents the way the lazy reader does: a whole span is decoded once from
/// its checkpoint, verified against its digest and cached; files are sliced out of cached spans.
#[derive(Default)]
struct SpanReader {
    blobs: BTreeMap<u32, Vec<u8>>,
    spans: BTreeMap<(u32, usize), Vec<u8>>,
}

impl SpanReader {
    fn read(&mut self, a: &Archive, layout: &Path, layer: u32, offset: u64, len: u64) -> Vec<u8> {
        let info = a.layers()[layer as usize].clone();
        let blob = self
            .blobs
            .entry(layer)
            .or_insert_with(|| std::fs::read(layout.join(info.digest.blob_path())).unwrap());
        if info.media == MediaKind::Tar {
            return blob[offset as usize..(offset + len) as usize].to_vec();
        }
        let cps = a.checkpoints(layer);
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let idx = cps.partition_point(|c| c.uncompressed_offset <= pos) - 1;
            let cp = &cps[idx];
            let end = cps
                .get(idx + 1)
                .map_or(info.uncompressed_size, |n| n.uncompressed_offset);
            let span = self.spans.entry((layer, idx)).or_insert_with(|| {
                let len = (end - cp.uncompressed_offset) as usize;
                let bytes = if info.media == MediaKind::Zstd {
                    clip_seekable::zstd_layer::decode(cp, blob, 0, 0, len).unwrap()
                } else {
                    clip_seekable::gzip::decode(cp, blob, 0, 0, len).unwrap()
                };
                let layer_end =
                    clip_seekable::LayerEnd::new(info.uncompressed_size, &info.diff_id).unwrap();
                clip_seekable::verify_span(&cps, idx, &layer_end, &bytes).unwrap();
                bytes
            });
            let from = (pos - cp.uncompressed_offset) as usize;
            let to = ((offset + len).min(end) - cp.uncompressed_offset) as usize;
            out.extend_from_slice(&span[from..to]);
            pos = cp.uncompressed_offset + to as u64;
        }
        out
    }
}

/// The archive's view as a testkit tree (contents hashed after reading them back).
fn archive_tree(a: &Archive, layout: &Path) -> Snapshot {
    let mut t = Snapshot::default();
    let mut reader = SpanReader::default();
    for i in 0..a.len() as u32 {
        let e = a.entry(i).unwrap();
        let kind = match e.kind() {
            EntryKind::Dir => ItemKind::Dir,
            EntryKind::File => {
                let bytes = match e.data().unwrap() {
                    DataLocation::V2 {
                        layer,
                        offset,
                        length,
                        sparse: false,
                    } if length > 0 => reader.read(a, layout, layer, offset, length),
                    DataLocation::V2 {
                        layer,
                        offset,
                        sparse: true,
                        ..
                    } => {
                        let map = e.sparse_map().unwrap();
                        let stored = match map.stored_len() {
                            0 => Vec::new(),
                            n => reader.read(a, layout, layer, offset, n),
                        };
                        map.expand(0, map.size(), &stored)
                    }
                    _ => Vec::new(),
                };
                ItemKind::File {
                    size: e.size(),
                    sha256: hex::encode(Sha256::digest(&bytes)),
                }
            }
            EntryKind::Symlink => {
                ItemKind::Symlink(String::from_utf8_lossy(e.symlink_target().unwrap()).into_owned())
            }
            EntryKind::Fifo => ItemKind::Fifo,
            EntryKind::Socket => ItemKind::Socket,
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                let (ma, mi) = e.rdev().unwrap();
                let rdev = rustix::fs::makedev(ma, mi);
                if e.kind() == EntryKind::CharDevice {
                    ItemKind::CharDevice(rdev)
                } else {
                    ItemKind::BlockDevice(rdev)
                }
            }
        };
        let xattrs: BTreeMap<String, Vec<u8>> = e
            .xattrs()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
            .collect();
        t.nodes.insert(
            String::from_utf8_lossy(&e.path()).into_owned(),
            Item {
                kind,
                mode: e.mode(),
                uid: e.uid(),
                gid: e.gid(),
                mtime: (e.mtime().0, i64::from(e.mtime().1)),
                xattrs,
                ino: u64::from(e.ino()),
                nlink: u64::from(e.nlink()),
            },
        );
    }
    t
}

fn check(image: &ImageBuilder, span: u64, platform: Option<&str>) {
    oracle::require_oracle_tools().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let built = image.build().unwrap();
    built.write_oci_layout(&layout, "t").unwrap();
    let out = dir.path().join("img.clip");
    let opts = IndexOptions {
        tag: Some("t".into()),
        platform: platform.map(|p| clip_registry::oci::parse_platform(p).unwrap()),
        checkpoint_bytes: span,
        registry: "127.0.0.1:5000".into(),
        repository: "test/edge".into(),
        reference: "127.0.0.1:5000/test/edge:t".into(),
        layer_store: None,
        bytes_read: None,
        layers: None,
        verify_diff_ids: false,
    };
    let summary = index_layout(&layout, &out, &opts).unwrap();
    let a = Archive::open(&out).unwrap();
    assert_eq!(
        a.meta().source.as_ref().unwrap().manifest_digest,
        summary.manifest_digest
    );
    if summary.uncompressed_bytes > 4 << 20 {
        assert!(
            summary.index_bytes * 50 < summary.uncompressed_bytes,
            "index is small: {summary:?}"
        );
    }

    // The oracle: the same image pushed to a real registry, copied out by skopeo (which picks
    // the platform and converts Docker manifests) and unpacked by umoci.
    let registry = clip_testkit::Registry::start_anonymous().unwrap();
    registry.push(&built, "test/edge", "t").unwrap();
    let want = oracle::oracle_unpack(
        &registry,
        "test/edge:t",
        &dir.path().join("oracle"),
        platform,
    )
    .unwrap();
    let expected = Snapshot::scan(&want).unwrap();
    clip_testkit::snapshot::assert_same_snapshots(&expected, &archive_tree(&a, &layout));
}

#[test]
fn edge_cases_gzip_multimember_and_plain_layers_match_umoci() {
    let img = clip_testkit::image::edge_image([
        Compression::Gzip,
        Compression::GzipMultiMember(3),
        Compression::None,
    ]);
    check(
        &ImageBuilder::new(ManifestFormat::Oci).image(img),
        256 << 10,
        None,
    );
}

#[test]
fn docker_manifests_and_many_members_match_umoci() {
    let img = clip_testkit::image::edge_image([
        Compression::GzipMultiMember(9),
        Compression::None,
        Compression::Gzip,
    ]);
    check(
        &ImageBuilder::new(ManifestFormat::Docker).image(img),
        1 << 20,
        None,
    );
}

#[test]
fn platform_is_chosen_from_an_index() {
    let other = Image::new(vec![Layer::new(vec![Entry::file("which", "arm64\n")])]).platform(
        "linux",
        "arm64",
        Some("v8"),
    );
    let img =
        clip_testkit::image::edge_image([Compression::Gzip, Compression::Gzip, Compression::Gzip]);
    let builder = ImageBuilder::new(ManifestFormat::Oci)
        .image(img.clone())
        .image(other.clone());
    check(&builder, 4 << 20, Some("linux/amd64"));
    check(&builder, 4 << 20, Some("linux/arm64/v8"));
}

fn layout_of(img: Image) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .write_oci_layout(&layout, "t")
        .unwrap();
    (dir, layout)
}

fn opts() -> IndexOptions {
    IndexOptions {
        tag: Some("t".into()),
        registry: "r".into(),
        repository: "x".into(),
        ..IndexOptions::default()
    }
}

fn blob_of(layout: &Path, digest: &str) -> std::path::PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[test]
fn bad_layers_are_typed_errors_and_publish_nothing() {
    let img = Image::new(vec![Layer::new(vec![Entry::file(
        "a",
        clip_testkit::image::text_bytes(1, 200_000),
    )])]);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(img.clone())
        .build()
        .unwrap();
    let digest = built.manifests[0].layers[0].blob.digest.clone();

    // A corrupted blob: its digest no longer matches (or inflate fails first).
    let (dir, layout) = layout_of(img.clone());
    let p = blob_of(&layout, &digest);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let out = dir.path().join("x.clip");
    let err = index_layout(&layout, &out, &opts()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Digest { .. } | Error::Layer { .. } | Error::Tar { .. }
        ),
        "{err}"
    );
    assert!(!out.exists());

    // A truncated blob.
    let (dir, layout) = layout_of(img.clone());
    let p = blob_of(&layout, &digest);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = index_layout(&layout, &dir.path().join("x.clip"), &opts()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Layer { .. } | Error::Tar { .. } | Error::Digest { .. }
        ),
        "{err}"
    );

    // A path escaping the root.
    let evil = Image::new(vec![Layer::new(vec![
        Entry::file("../../etc/evil", "x").pax_path(),
    ])]);
    let (dir, layout) = layout_of(evil);
    let err = index_layout(&layout, &dir.path().join("x.clip"), &opts()).unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");

    // A missing tag.
    let (dir, layout) = layout_of(img);
    let err = index_layout(
        &layout,
        &dir.path().join("x.clip"),
        &IndexOptions {
            tag: Some("nope".into()),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("\"nope\" not found"), "{err}");
}

/// A directory with files that have holes (the filesystem keeps them sparse, so GNU tar's
/// `--sparse` finds them with `SEEK_HOLE`).
fn holey_dir(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt as _;
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("var/lib")).unwrap();
    let f = std::fs::File::create(src.join("var/lib/holey.db")).unwrap();
    f.set_len(9 << 20).unwrap();
    f.write_all_at(&clip_testkit::image::random_bytes(3, 70_000), 1 << 20)
        .unwrap();
    f.write_all_at(b"tail", (9 << 20) - 4).unwrap();
    let g = std::fs::File::create(src.join("var/lib/all-hole")).unwrap();
    g.set_len(3 << 20).unwrap();
    std::fs::write(src.join("var/lib/dense"), b"not sparse at all\n").unwrap();
    src
}

fn gnu_tar(src: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("tar")
        .args(["--sparse", "--numeric-owner", "-C"])
        .arg(src)
        .args(args)
        .args(["-cf", "-", "var"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn sparse_files_written_by_gnu_tar_match_umoci() {
    let dir = tempfile::tempdir().unwrap();
    let src = holey_dir(dir.path());
    for version in ["0.0", "0.1", "1.0"] {
        let tar = gnu_tar(
            &src,
            &["--format=posix", &format!("--sparse-version={version}")],
        );
        let text = String::from_utf8_lossy(&tar);
        assert!(
            text.contains("GNU.sparse"),
            "GNU tar wrote no sparse records"
        );
        let img = Image::new(vec![Layer::from_tar(tar)]);
        check(
            &ImageBuilder::new(ManifestFormat::Oci).image(img),
            1 << 20,
            None,
        );
    }
    // Old GNU sparse entries (type 'S'): umoci, containerd and Docker refuse them, and so do we,
    // with a typed error and nothing published.
    let tar = gnu_tar(&src, &["--format=gnu"]);
    let (dir, layout) = layout_of(Image::new(vec![Layer::from_tar(tar)]));
    let out = dir.path().join("x.clip");
    let err = index_layout(&layout, &out, &opts()).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("type 'S'")),
        "{err}"
    );
    assert!(!out.exists());
}

/// A one-entry tar: PAX records, then a regular file header named `name` with `body`.
fn pax_tar(records: &[(&str, &str)], name: &str, body: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, body).unwrap();
    b.into_inner().unwrap()
}

// Over 100 lines on purpose: a table of malformed sparse inputs, each fed through the indexer
// and checked in turn.
#[test]
fn malformed_sparse_files_are_typed_errors() {
    let map_1x0 = |text: &str, data: usize| {
        let mut body = text.as_bytes().to_vec();
        body.resize(body.len().next_multiple_of(512), 0);
        body.extend(std::iter::repeat_n(7u8, data));
        body
    };
    let v1 = [
        ("GNU.sparse.major", "1"),
        ("GNU.sparse.minor", "0"),
        ("GNU.sparse.name", "f"),
        ("GNU.sparse.realsize", "4096"),
    ];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // The map claims more data than the entry stores.
        (
            "short data",
            pax_tar(&v1, "GNUSparseFile.0/f", &map_1x0("1\n0\n900\n", 100)),
            "covers",
        ),
        // Extents out of order.
        (
            "unordered",
            pax_tar(
                &v1,
                "GNUSparseFile.0/f",
                &map_1x0("2\n2000\n10\n0\n10\n", 20),
            ),
            "before the previous",
        ),
        // An extent past the end of the file.
        (
            "past end",
            pax_tar(&v1, "GNUSparseFile.0/f", &map_1x0("1\n4090\n10\n", 10)),
            "passes the end",
        ),
        // A map that never ends.
        (
            "no map",
            pax_tar(&v1, "GNUSparseFile.0/f", b"3\n1\n"),
            "ends early",
        ),
        // Not a number.
        (
            "bad number",
            pax_tar(&v1, "GNUSparseFile.0/f", &map_1x0("1\n-5\n10\n", 10)),
            "bad number",
        ),
        // A number with no end: refused at its 21st digit, not read to the end of the entry.
        (
            "endless number",
            pax_tar(&v1, "GNUSparseFile.0/f", &[b'1'; 8192]),
            "bad number",
        ),
        // Format 0.1 with a map that does not match numblocks.
        (
            "numblocks",
            pax_tar(
                &[
                    ("GNU.sparse.size", "100"),
                    ("GNU.sparse.numblocks", "2"),
                    ("GNU.sparse.map", "0,10"),
                ],
                "f",
                &[1u8; 10],
            ),
            "numblocks",
        ),
        // Format 0.0 records out of turn.
        (
            "alternation",
            pax_tar(
                &[
                    ("GNU.sparse.size", "100"),
                    ("GNU.sparse.numblocks", "1"),
                    ("GNU.sparse.numbytes", "10"),
                    ("GNU.sparse.offset", "0"),
                ],
                "f",
                &[1u8; 10],
            ),
            "alternate",
        ),
    ];
    for (what, tar, needle) in cases {
        let (dir, layout) = layout_of(Image::new(vec![Layer::from_tar(tar)]));
        let out = dir.path().join("x.clip");
        let err = index_layout(&layout, &out, &opts()).unwrap_err();
        assert!(
            matches!(err, Error::Tar { .. }) && err.to_string().contains(needle),
            "{what}: {err}"
        );
        assert!(!out.exists(), "{what}");
    }
    // An unknown sparse format version is refused rather than guessed at.
    let tar = pax_tar(
        &[("GNU.sparse.major", "2"), ("GNU.sparse.minor", "0")],
        "f",
        b"x",
    );
    let (dir, layout) = layout_of(Image::new(vec![Layer::from_tar(tar)]));
    let err = index_layout(&layout, &dir.path().join("x.clip"), &opts()).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("2.0")),
        "{err}"
    );
}

#[test]
fn a_real_debian_rootfs_packed_by_gnu_tar_matches_umoci() {
    if !clip_testkit::require(&[
        clip_testkit::Need::Root,
        clip_testkit::Need::Program("debootstrap"),
    ]) {
        return;
    }
    // Two layers: the distribution, and a small change on top with a whiteout.
    let img = clip_testkit::debian::layered_image(
        Compression::GzipMultiMember(4),
        vec![
            Entry::whiteout("etc/motd"),
            Entry::file("etc/hostname", "clip-test\n"),
            Entry::file(
                "usr/local/bin/tool",
                clip_testkit::image::random_bytes(9, 3 << 20),
            )
            .mode(0o755),
        ],
    )
    .unwrap();
    check(
        &ImageBuilder::new(ManifestFormat::Oci).image(img),
        4 << 20,
        None,
    );
}

#[test]
fn indexing_straight_from_a_registry_matches_umoci() {
    oracle::require_oracle_tools().unwrap();
    let img = clip_testkit::image::edge_image([
        Compression::Gzip,
        Compression::GzipMultiMember(3),
        Compression::None,
    ]);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    let registry = clip_testkit::Registry::start_anonymous().unwrap();
    let pushed = registry.push(&built, "test/direct", "v1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("direct.clip");
    let client = client();
    let events = std::sync::Mutex::new(Vec::new());
    let record = |p: &clip_indexer::Progress| events.lock().unwrap().push(p.clone());
    let summary = index_image(&pushed.reference, &out, &client, Some(&record)).unwrap();
    let events = events.into_inner().unwrap();
    assert!(
        matches!(
            events[0],
            clip_indexer::Progress::Resolved { layers: 3, .. }
        ),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, clip_indexer::Progress::LayerDone { .. }))
            .count(),
        3
    );
    let a = Archive::open(&out).unwrap();
    let src = a.meta().source.clone().unwrap();
    assert_eq!(
        (src.registry.as_str(), src.repository.as_str()),
        (registry.host().as_str(), "test/direct")
    );
    assert_eq!(src.manifest_digest, summary.manifest_digest);
    // Read contents back from the same blobs (a local copy of the layout) and compare.
    let layout = dir.path().join("layout");
    built.write_oci_layout(&layout, "v1").unwrap();
    let want = oracle::oracle_unpack(
        &registry,
        "test/direct:v1",
        &dir.path().join("oracle"),
        None,
    )
    .unwrap();
    let diffs = Snapshot::scan(&want)
        .unwrap()
        .compare(&archive_tree(&a, &layout), &CompareOptions::default());
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // And an unreachable registry is a clear error, with nothing published.
    drop(registry);
    let err =
        index_image(&pushed.reference, &dir.path().join("x.clip"), &client, None).unwrap_err();
    assert!(err.to_string().contains("is not reachable"), "{err}");
    assert!(!dir.path().join("x.clip").exists());
}

#[test]
fn zstd_layers_index_to_the_same_tree_as_their_gzip_twin() {
    // umoci cannot read zstd: the oracle is the same image with gzip layers.
    let zstd = clip_testkit::image::edge_image([
        Compression::ZstdMultiFrame(7),
        Compression::Zstd,
        Compression::ZstdMultiFrame(2),
    ]);
    let gzip =
        clip_testkit::image::edge_image([Compression::Gzip, Compression::Gzip, Compression::Gzip]);
    let dir = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    for (name, img) in [("z", zstd), ("g", gzip)] {
        let layout = dir.path().join(name);
        ImageBuilder::new(ManifestFormat::Oci)
            .image(img)
            .build()
            .unwrap()
            .write_oci_layout(&layout, "t")
            .unwrap();
        let out = dir.path().join(format!("{name}.clip"));
        index_layout(
            &layout,
            &out,
            &IndexOptions {
                checkpoint_bytes: 512 << 10,
                ..opts()
            },
        )
        .unwrap();
        let a = Archive::open(&out).unwrap();
        if name == "z" {
            let layers = a.layers();
            assert_eq!(
                layers.iter().map(|l| l.single_frame).collect::<Vec<_>>(),
                [false, true, false]
            );
            assert!(
                a.checkpoints(0).len() > 1,
                "a 7-frame layer has frame checkpoints"
            );
            assert_eq!(
                a.checkpoints(1).len(),
                1,
                "a single frame has only its start"
            );
        }
        trees.push(archive_tree(&a, &layout));
    }
    let opts = CompareOptions {
        dir_mtimes: true,
        ..CompareOptions::default()
    };
    let diffs = trees[1].compare(&trees[0], &opts);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// Counts what a layer-index store is asked for.
#[derive(Debug)]
struct Counting {
    inner: clip_indexer::DirLayerStore,
    hits: std::sync::atomic::AtomicUsize,
    created: std::sync::atomic::AtomicUsize,
}

impl clip_indexer::LayerIndexStore for Counting {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let r = self.inner.get(key);
        if r.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }
    fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool> {
        let c = self.inner.put(key, bytes)?;
        if c {
            self.created
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(c)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn discard(&self, key: &str) {
        self.inner.discard(key);
    }
}

/// GET requests for blob `digest` in the registry's access log.
fn blob_gets(registry: &clip_testkit::Registry, digest: impl std::fmt::Display) -> usize {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
        .count()
}

/// A tree read from a table of contents differs from umoci's in exactly one place: the
/// edge-case file with a sub-second mtime (TOC times are whole seconds).
fn assert_only_subsecond_mtime(diffs: &[String]) {
    assert!(
        diffs.len() == 1 && diffs[0].contains("data/ns-time") && diffs[0].contains("mtime"),
        "{}",
        diffs.join("\n")
    );
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
#[test]
fn a_second_image_reuses_the_stored_indexes_of_its_shared_layers() {
    oracle::require_oracle_tools().unwrap();
    let base = clip_testkit::image::edge_image([
        Compression::Gzip,
        Compression::GzipMultiMember(3),
        Compression::None,
    ]);
    // The same three layers plus a top layer that overrides and deletes lower files.
    let mut derived = base.clone();
    derived.layers.push(Layer::new(vec![
        Entry::file("etc/top", clip_testkit::image::text_bytes(9, 300_000)),
        Entry::whiteout("etc/hostname"),
    ]));
    let registry = clip_testkit::Registry::start_anonymous().unwrap();
    let a = ImageBuilder::new(ManifestFormat::Oci)
        .image(base)
        .build()
        .unwrap();
    let b = ImageBuilder::new(ManifestFormat::Oci)
        .image(derived)
        .build()
        .unwrap();
    let pa = registry.push(&a, "test/base", "v1").unwrap();
    let pb = registry.push(&b, "test/derived", "v1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let store = std::sync::Arc::new(Counting {
        inner: clip_indexer::DirLayerStore::new(dir.path().join("layers")),
        hits: 0.into(),
        created: 0.into(),
    });
    let with_store = IndexOptions {
        checkpoint_bytes: 1 << 20,
        layer_store: Some(store.clone()),
        ..IndexOptions::default()
    };
    // Indexes in an older encoding: the ones of layers indexed now are superseded and removed
    // from this local store; another span's and another layer's stay.
    let layers_dir = dir.path().join("layers");
    std::fs::create_dir_all(&layers_dir).unwrap();
    let old = |digest: &Digest, span: u64| {
        layers_dir.join(format!(
            "{}-{}.s{span}.v1.cliplayer",
            digest.algorithm(),
            digest.hex()
        ))
    };
    let first = Digest::parse(&a.manifests[0].layers[0].blob.digest).unwrap();
    let unrelated = Digest::sha256(b"unrelated");
    for p in [
        old(&first, 1 << 20),
        old(&first, 4 << 20),
        old(&unrelated, 1 << 20),
    ] {
        std::fs::write(p, b"old encoding").unwrap();
    }
    let sa = index_image_with(
        &pa.reference,
        &dir.path().join("a.clip"),
        &client,
        &with_store,
        None,
    )
    .unwrap();
    assert!(!old(&first, 1 << 20).exists());
    assert!(old(&first, 4 << 20).exists() && old(&unrelated, 1 << 20).exists());
    assert!(
        layers_dir
            .join(clip_indexer::layer_key(&first, 1 << 20))
            .exists()
    );
    assert_eq!(
        (
            sa.reused_layers,
            store.created.load(std::sync::atomic::Ordering::SeqCst)
        ),
        (0, 3)
    );

    // The derived image: only its top layer is fetched.
    let lower: Vec<Digest> = Archive::open(&dir.path().join("a.clip"))
        .unwrap()
        .layers()
        .iter()
        .map(|l| l.digest.clone())
        .collect();
    let before: Vec<usize> = lower.iter().map(|d| blob_gets(&registry, d)).collect();
    let events = std::sync::Mutex::new(Vec::new());
    let record = |p: &clip_indexer::Progress| events.lock().unwrap().push(p.clone());
    let reused = dir.path().join("b-reused.clip");
    let sb = index_image_with(&pb.reference, &reused, &client, &with_store, Some(&record)).unwrap();
    assert_eq!(sb.reused_layers, 3);
    assert_eq!(store.hits.load(std::sync::atomic::Ordering::SeqCst), 3);
    let after: Vec<usize> = lower.iter().map(|d| blob_gets(&registry, d)).collect();
    assert_eq!(before, after, "a reused layer was fetched again");
    let events = events.into_inner().unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, clip_indexer::Progress::LayerReused { .. }))
            .count(),
        3,
        "{events:?}"
    );

    // Byte for byte the archive indexing every layer writes, and what umoci unpacks.
    let fresh = dir.path().join("b-fresh.clip");
    index_image(&pb.reference, &fresh, &client, None).unwrap();
    assert!(std::fs::read(&reused).unwrap() == std::fs::read(&fresh).unwrap());
    let layout = dir.path().join("layout");
    b.write_oci_layout(&layout, "v1").unwrap();
    let want = oracle::oracle_unpack(
        &registry,
        "test/derived:v1",
        &dir.path().join("oracle"),
        None,
    )
    .unwrap();
    let diffs = Snapshot::scan(&want).unwrap().compare(
        &archive_tree(&Archive::open(&reused).unwrap(), &layout),
        &CompareOptions::default(),
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    // A damaged stored index, or one stored under another layer's key, is not used: the layer is
    // indexed again and the archive is the same.
    let keys: Vec<String> = lower
        .iter()
        .map(|d| clip_indexer::layer_key(d, 1 << 20))
        .collect();
    let layers_dir = dir.path().join("layers");
    let mut damaged = std::fs::read(layers_dir.join(&keys[0])).unwrap();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    std::fs::write(layers_dir.join(&keys[0]), damaged).unwrap();
    std::fs::copy(layers_dir.join(&keys[2]), layers_dir.join(&keys[1])).unwrap();
    let again = dir.path().join("b-again.clip");
    let sc = index_image_with(&pb.reference, &again, &client, &with_store, None).unwrap();
    // Layer 2 and the top layer (stored by the run before) are reused.
    assert_eq!(sc.reused_layers, 2);
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&fresh).unwrap());
    // The bad ones were replaced: now every layer is reused.
    let sd = index_image_with(&pb.reference, &again, &client, &with_store, None).unwrap();
    assert_eq!(sd.reused_layers, 4);
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&fresh).unwrap());
}

#[test]
fn stored_layer_indexes_round_trip_and_reject_damage() {
    let (tmp, layout) = layout_of(clip_testkit::image::edge_image([
        Compression::Gzip,
        Compression::Zstd,
        Compression::None,
    ]));
    let store = clip_indexer::DirLayerStore::new(tmp.path().join("layers"));
    let arc: std::sync::Arc<dyn clip_indexer::LayerIndexStore> = std::sync::Arc::new(store.clone());
    index_layout(
        &layout,
        &tmp.path().join("x.clip"),
        &IndexOptions {
            layer_store: Some(arc),
            ..opts()
        },
    )
    .unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(tmp.path().join("layers")).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        let decoded = clip_indexer::decode_layer_index(&bytes, 5).unwrap();
        assert_eq!(clip_indexer::encode_layer_index(&decoded), bytes);
        assert!(decoded.entries.iter().all(|e| match &e.kind {
            clip_format::NodeKind::File { span: Some(s), .. } => s.layer == 5,
            _ => true,
        }));
        // Every truncation and a flipped byte anywhere are errors, never panics.
        for cut in (0..bytes.len()).step_by(97) {
            assert!(clip_indexer::decode_layer_index(&bytes[..cut], 0).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 3] ^= 1;
        assert!(clip_indexer::decode_layer_index(&flipped, 0).is_err());
        n += 1;
    }
    assert_eq!(n, 3);
    // Create-only: a second put of a key keeps the first object.
    assert!(
        !clip_indexer::LayerIndexStore::put(
            &store,
            &std::fs::read_dir(tmp.path().join("layers"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .file_name()
                .into_string()
                .unwrap(),
            b"other"
        )
        .unwrap()
    );
}

/// eStargz layers are indexed from their TOC with a few range requests (the footer and the TOC
/// member), not streamed; the tree read back through the TOC's chunk spans equals umoci's,
/// except for sub-second file times, which the TOC format does not carry.
#[test]
fn estargz_layers_are_indexed_from_their_toc_and_match_umoci() {
    oracle::require_oracle_tools().unwrap();
    let img = clip_testkit::image::edge_image([
        Compression::EStargz(64 << 10),
        Compression::EStargz(1 << 20),
        Compression::EStargz(4 << 10),
    ]);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    let registry = clip_testkit::Registry::start_anonymous().unwrap();
    let pushed = registry.push(&built, "test/estargz", "v1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e.clip");
    let client = client();
    let summary = index_image(&pushed.reference, &out, &client, None).unwrap();
    let a = Archive::open(&out).unwrap();
    let layer_bytes: u64 = a.layers().iter().map(|l| l.compressed_size).sum();
    assert_eq!(summary.toc_layers, 3, "{summary:?}");
    assert!(a.layers().iter().all(|l| l.toc_indexed));
    assert!(
        summary.compressed_bytes * 5 < layer_bytes,
        "fetched {} of {layer_bytes} layer bytes",
        summary.compressed_bytes
    );
    // Only ranged blob requests were made: no layer was streamed.
    for l in a.layers() {
        assert_eq!(
            blob_gets(&registry, &l.digest),
            2,
            "footer and TOC of {}",
            l.digest
        );
    }
    let layout = dir.path().join("layout");
    built.write_oci_layout(&layout, "v1").unwrap();
    let want = oracle::oracle_unpack(
        &registry,
        "test/estargz:v1",
        &dir.path().join("oracle"),
        None,
    )
    .unwrap();
    let diffs = Snapshot::scan(&want)
        .unwrap()
        .compare(&archive_tree(&a, &layout), &CompareOptions::default());
    assert_only_subsecond_mtime(&diffs);
    assert!(a.lookup(b"stargz.index.json").is_some());
}

/// zstd:chunked layers are indexed from their manifest (one range request each, checked against
/// the manifest-checksum annotation); the tree read back through the per-file spans equals umoci's
/// unpack of the same image with gzip layers (umoci here predates zstd), except for sub-second
/// file times, which the manifest does not carry.
#[test]
fn zstd_chunked_layers_are_indexed_from_their_manifest_and_match_umoci() {
    oracle::require_oracle_tools().unwrap();
    let chunked = ImageBuilder::new(ManifestFormat::Oci)
        .image(clip_testkit::image::edge_image([
            Compression::ZstdChunked,
            Compression::ZstdChunked,
            Compression::ZstdChunked,
        ]))
        .build()
        .unwrap();
    let twin = ImageBuilder::new(ManifestFormat::Oci)
        .image(clip_testkit::image::edge_image([
            Compression::Gzip,
            Compression::Gzip,
            Compression::Gzip,
        ]))
        .build()
        .unwrap();
    let registry = clip_testkit::Registry::start_anonymous().unwrap();
    let pushed = registry.push(&chunked, "test/chunked", "v1").unwrap();
    registry.push(&twin, "test/twin", "v1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("z.clip");
    let client = client();
    let summary = index_image(&pushed.reference, &out, &client, None).unwrap();
    let a = Archive::open(&out).unwrap();
    assert_eq!(summary.toc_layers, 3, "{summary:?}");
    assert!(
        a.layers()
            .iter()
            .all(|l| l.toc_indexed && l.media == MediaKind::Zstd && !l.single_frame)
    );
    let layer_bytes: u64 = a.layers().iter().map(|l| l.compressed_size).sum();
    assert!(summary.compressed_bytes * 5 < layer_bytes, "{summary:?}");
    for l in a.layers() {
        assert_eq!(
            blob_gets(&registry, &l.digest),
            1,
            "only the manifest of {}",
            l.digest
        );
    }
    let layout = dir.path().join("layout");
    chunked.write_oci_layout(&layout, "v1").unwrap();
    let want =
        oracle::oracle_unpack(&registry, "test/twin:v1", &dir.path().join("oracle"), None).unwrap();
    let diffs = Snapshot::scan(&want)
        .unwrap()
        .compare(&archive_tree(&a, &layout), &CompareOptions::default());
    assert_only_subsecond_mtime(&diffs);
}

/// zstd:chunked as the real containers/image writes it (Debian 12's skopeo 1.9: the older
/// `io.containers.zstd-chunked.*` annotation names, content-defined chunks): indexed from the
/// manifest — one range request per layer, reported per layer — and equal to umoci's unpack of
/// the gzip original, sub-second times included.
#[test]
fn zstd_chunked_layers_written_by_skopeo_are_indexed_from_their_manifest() {
    oracle::require_oracle_tools().unwrap();
    // skopeo's converter expands PAX sparse files yet keeps the source's diff_ids (a
    // containers/image bug: such layers fail any diff_id check), so the source image has its
    // sparse files written whole. Runs of zeros become `zeros` chunks.
    let mut img = clip_testkit::image::edge_image([Compression::Gzip; 3]);
    img.layers = img
        .layers
        .iter()
        .map(clip_testkit::Layer::sparse_expanded)
        .collect();
    let gz = ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    let registry = clip_testkit::Registry::start_anonymous().unwrap();
    registry.push(&gz, "test/real", "gz").unwrap();
    oracle::skopeo_recompress(&registry, "test/real:gz", "test/real:zc", "zstd:chunked").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("zc.clip");
    let client = client();
    let reference = format!("{}/test/real:zc", registry.host());
    let (logs, summary) = capture_logs(|| index_image(&reference, &out, &client, None).unwrap());
    // The fast path was taken for every layer, and said so.
    assert_eq!(summary.toc_layers, 3, "{summary:?}\n{logs}");
    assert!(
        summary
            .per_layer
            .iter()
            .all(|l| l.method == clip_indexer::LayerMethod::ZstdChunkedToc
                && l.why_streamed.is_none()),
        "{:?}",
        summary.per_layer
    );
    let a = Archive::open(&out).unwrap();
    for l in a.layers() {
        assert_eq!(
            blob_gets(&registry, &l.digest),
            1,
            "only the manifest of {}",
            l.digest
        );
    }
    // skopeo's annotations are the older generation's.
    let resolved = client
        .block_on(
            client
                .client()
                .resolve(&clip_registry::Reference::parse(&reference).unwrap(), None),
        )
        .unwrap();
    assert!(resolved.manifest.layers().iter().all(|l| {
        l.annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(clip_indexer::toc::ZSTD_CHECKSUM_ANNOTATION_V1))
    }));
    let layout = dir.path().join("layout");
    oracle::skopeo_to_layout(&registry, "test/real:zc", &layout, "zc", None).unwrap();
    let want =
        oracle::oracle_unpack(&registry, "test/real:gz", &dir.path().join("oracle"), None).unwrap();
    let diffs = Snapshot::scan(&want)
        .unwrap()
        .compare(&archive_tree(&a, &layout), &CompareOptions::default());
    // containers/image writes TOC times with their fractions: nothing differs at all.
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// A layer that looks like it has a table of contents but whose TOC is not used is streamed
/// (the tree is the same), with one log line and a per-layer reason: here, the zstd:chunked
/// checksum annotation is dropped, then the manifest checksum is wrong.
#[test]
fn a_table_of_contents_not_taken_is_reported_with_its_reason() {
    use clip_testkit::ImageBuilder;
    let registry = clip_testkit::Registry::start_anonymous().unwrap();
    let img = clip_testkit::image::edge_image([Compression::ZstdChunked; 3]);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    let pushed = registry.push(&built, "test/why", "v1").unwrap();
    let client = client();
    let dir = tempfile::tempdir().unwrap();
    let good = index_image(
        &pushed.reference,
        &dir.path().join("good.clip"),
        &client,
        None,
    )
    .unwrap();
    assert_eq!(good.toc_layers, 3);
    for (edit, reason) in [
        (
            Box::new(|a: &mut serde_json::Map<String, serde_json::Value>| {
                a.remove(clip_indexer::toc::ZSTD_CHECKSUM_ANNOTATION);
            }) as Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>,
            "manifest position without its checksum",
        ),
        (
            Box::new(|a: &mut serde_json::Map<String, serde_json::Value>| {
                a.insert(
                    clip_indexer::toc::ZSTD_CHECKSUM_ANNOTATION.into(),
                    format!("sha256:{}", "0".repeat(64)).into(),
                );
            }),
            "does not match",
        ),
    ] {
        let m = &built.manifests[0];
        let mut doc: serde_json::Value = serde_json::from_slice(&m.manifest.bytes).unwrap();
        let first = doc["layers"][0]["annotations"].as_object_mut().unwrap();
        edit(first);
        let bytes = serde_json::to_vec(&doc).unwrap();
        registry
            .client()
            .unwrap()
            .push_manifest("test/why", "edited", &m.manifest.media_type, &bytes)
            .unwrap();
        let out = dir.path().join("edited.clip");
        let (logs, s) = capture_logs(|| {
            index_image(
                &format!("{}/test/why:edited", registry.host()),
                &out,
                &client,
                None,
            )
            .unwrap()
        });
        assert_eq!(s.toc_layers, 2, "{s:?}");
        let first = &s.per_layer[0];
        assert_eq!(first.method, clip_indexer::LayerMethod::Streamed);
        let why = first.why_streamed.as_deref().unwrap_or_default();
        assert!(why.contains(reason), "{why}");
        assert_eq!(
            logs.matches("layer streamed: its table of contents is not used")
                .count(),
            1,
            "{logs}"
        );
        // The tree is the one the TOC gives, except that the streamed layer's times and
        // offsets are exact.
        let a = Archive::open(&out).unwrap();
        let g = Archive::open(&dir.path().join("good.clip")).unwrap();
        assert_eq!(a.len(), g.len());
    }
}

/// Log lines of `f`, captured.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (String, T) {
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let b2 = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || b2.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (text, out)
}
