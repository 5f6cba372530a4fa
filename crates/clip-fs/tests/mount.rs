//! The mounted tree equals `umoci unpack` of the same image, reads are exact under concurrency,
//! and failures (registry down, corrupt bytes, short tokens, a small cache) behave as specified.
//! Everything runs against the testkit's real registry and the kernel's FUSE; a fake server is
//! used only to corrupt bytes, which a real registry will not do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    missing_docs
)]

mod common;
use common::can_mount;

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clip_fs::{MountHandle, MountOptions, mount_archive};
use clip_registry::{ClientConfig, RetryPolicy};
use clip_testkit::image::random_bytes;
use clip_testkit::{
    Auth, CompareOptions, Compression, Entry, FakeRegistry, FakeResponse, ImageBuilder,
    ManifestFormat, Registry, RegistryOptions, Snapshot, assert_same, oracle,
};

/// Mount options for tests that are not about disk pressure: no free-space floor, so that a
/// nearly full disk on the test machine does not shrink the span cache under the test.
fn test_options() -> MountOptions {
    MountOptions {
        cache_min_free_percent: 0,
        ..MountOptions::default()
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    registry: Registry,
    archive: PathBuf,
    reference: String,
}

/// Pushes `image` to `registry` and indexes it from there into a v2 archive.
fn indexed(registry: Registry, image: &ImageBuilder, span: u64, cfg: ClientConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    registry
        .push(&image.build().unwrap(), "test/app", "t")
        .unwrap();
    let reference = format!("{}/test/app:t", registry.host());
    let archive = dir.path().join("app.clip");
    let client = clip_registry::BlockingClient::new(cfg).unwrap();
    let opts = clip_indexer::IndexOptions {
        checkpoint_bytes: span,
        ..clip_indexer::IndexOptions::default()
    };
    let input = clip_indexer::Input::Registry {
        reference: &reference,
        client: &client,
    };
    clip_indexer::index(input, &archive, &opts, None).unwrap();
    Fixture {
        dir,
        registry,
        archive,
        reference,
    }
}

impl Fixture {
    fn mount(&self, name: &str, options: MountOptions) -> MountHandle {
        let mp = self.dir.path().join(name);
        std::fs::create_dir_all(&mp).unwrap();
        let cache_dir = if options.cache_dir == clip_fs::default_cache_dir() {
            self.dir.path().join("cache")
        } else {
            options.cache_dir.clone()
        };
        mount_archive(MountOptions {
            archive: self.archive.clone(),
            mountpoint: mp,
            cache_dir,
            ..options
        })
        .unwrap()
    }

    /// `umoci unpack` of the image, or of `twin` (the same content with layers umoci can read:
    /// its version predates zstd).
    fn oracle(&self, twin: Option<&ImageBuilder>) -> Snapshot {
        let name = if let Some(t) = twin {
            self.registry
                .push(&t.build().unwrap(), "test/twin", "t")
                .unwrap();
            "test/twin:t"
        } else {
            "test/app:t"
        };
        let want =
            oracle::oracle_unpack(&self.registry, name, &self.dir.path().join("oracle"), None)
                .unwrap();
        Snapshot::scan(&want).unwrap()
    }
}

/// Holes of the edge-case image's sparse files, seen through a mount (files closed on return).
fn check_sparse(mp: &std::path::Path) {
    let sparse = std::fs::File::open(mp.join("data/sparse-1.0")).unwrap();
    let md = sparse.metadata().unwrap();
    let size = md.len();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&md) * 512 < size / 2,
        "{md:?}"
    );
    let seek = |to: rustix::fs::SeekFrom| rustix::fs::seek(&sparse, to);
    assert_eq!(seek(rustix::fs::SeekFrom::Data(0)), Ok(size / 16));
    assert_eq!(
        seek(rustix::fs::SeekFrom::Hole(size / 16)),
        Ok(size / 16 + size / 3)
    );
    // Inside a hole, SEEK_HOLE stays put; the last extent (777 bytes) ends in the tail hole.
    assert_eq!(seek(rustix::fs::SeekFrom::Hole(size - 1)), Ok(size - 1));
    assert_eq!(
        seek(rustix::fs::SeekFrom::Hole(size * 5 / 6)),
        Ok(size * 5 / 6 + 777)
    );
    assert_eq!(
        seek(rustix::fs::SeekFrom::Data(size / 16 + size / 3)),
        Ok(size * 5 / 6)
    );
    let empty = std::fs::File::open(mp.join("data/sparse-empty")).unwrap();
    assert_eq!(
        rustix::fs::seek(&empty, rustix::fs::SeekFrom::Data(0)),
        Err(rustix::io::Errno::NXIO)
    );
}

#[test]
fn v2_mounts_equal_umoci_for_every_layer_compression() {
    if !can_mount() {
        return;
    }
    for (compression, span) in [
        (
            [
                Compression::Gzip,
                Compression::GzipMultiMember(3),
                Compression::None,
            ],
            256 << 10,
        ),
        (
            [
                Compression::ZstdMultiFrame(4),
                Compression::Zstd,
                Compression::Gzip,
            ],
            1 << 20,
        ),
    ] {
        let f = indexed(
            Registry::start_anonymous().unwrap(),
            &clip_testkit::image::edge_builder(compression),
            span,
            ClientConfig::default(),
        );
        let twin = compression
            .iter()
            .any(|c| matches!(c, Compression::Zstd | Compression::ZstdMultiFrame(_)))
            .then(|| {
                clip_testkit::image::edge_builder([
                    Compression::Gzip,
                    Compression::Gzip,
                    Compression::Gzip,
                ])
            });
        let expected = f.oracle(twin.as_ref());
        let m = f.mount("mnt", test_options());
        assert_same(&expected, m.mountpoint());
        let s = m.stats();
        assert!(s.spans_fetched > 0 && s.verify_failures == 0, "{s:?}");

        // Metadata only: statfs and xattrs work; writes are refused.
        let mp = m.mountpoint().to_owned();
        let err = std::fs::write(mp.join("new-file"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(30), "EROFS expected: {err}");

        // Sparse files: holes cost no blocks, and SEEK_DATA / SEEK_HOLE find the extents (so
        // `cp --sparse`, `tar --sparse` keep them), here data at size/16 for size/3 bytes.
        check_sparse(&mp);

        // A second mount of the same image reads everything from the shared cache.
        let m2 = f.mount("mnt2", test_options());
        assert_same(&expected, m2.mountpoint());
        assert_eq!(m2.stats().requests, 0, "{:?}", m2.stats());
        m2.unmount().unwrap();
        m.unmount().unwrap();
    }
}

#[test]
fn v1_local_mount_equals_umoci() {
    if !can_mount() {
        return;
    }
    let registry = Registry::start_anonymous().unwrap();
    let dir = tempfile::tempdir().unwrap();
    registry
        .push(
            &clip_testkit::image::edge_builder([
                Compression::Gzip,
                Compression::Gzip,
                Compression::None,
            ])
            .build()
            .unwrap(),
            "test/app",
            "t",
        )
        .unwrap();
    let rootfs =
        oracle::oracle_unpack(&registry, "test/app:t", &dir.path().join("oracle"), None).unwrap();
    let expected = Snapshot::scan(&rootfs).unwrap();
    let archive = dir.path().join("v1.clip");
    clip_archive::archive_rootfs(&rootfs, &archive, &clip_format::Meta::default()).unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let m = mount_archive(MountOptions {
        archive,
        mountpoint: mp,
        cache_dir: dir.path().join("cache"),
        ..test_options()
    })
    .unwrap();
    assert_same(&expected, m.mountpoint());
    m.unmount().unwrap();
}

fn big_files_image(compression: Compression) -> (ImageBuilder, Vec<(String, Vec<u8>)>) {
    let files: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| (format!("data/big{i}"), random_bytes(100 + i, 5 << 20)))
        .chain([(
            "data/text".to_owned(),
            clip_testkit::image::text_bytes(9, 3 << 20),
        )])
        .collect();
    (common::files_image(&files, compression), files)
}

#[test]
fn sixty_four_concurrent_random_readers_get_every_byte_right() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        256 << 10,
        ClientConfig::default(),
    );
    let m = f.mount("mnt", test_options());
    let files = Arc::new(files);
    let mp = m.mountpoint().to_owned();
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let (files, mp) = (Arc::clone(&files), mp.clone());
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                for _ in 0..40 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (path, want) = &files[(x % files.len() as u64) as usize];
                    let file = std::fs::File::open(mp.join(path)).unwrap();
                    let off = (x >> 8) % want.len() as u64;
                    let len = ((x >> 40) % (300 << 10)).max(1);
                    let mut buf = vec![0u8; len as usize];
                    let n = file.read_at(&mut buf, off).unwrap();
                    let end = (off as usize + n).min(want.len());
                    assert_eq!(n, end - off as usize);
                    assert!(buf[..n] == want[off as usize..end], "{path} at {off}+{n}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = m.stats();
    assert_eq!(s.verify_failures, 0);
    // Single flight: no span fetched twice.
    assert!(s.cache.inserted_bytes <= 19 << 20, "{s:?}");
    m.unmount().unwrap();
}

#[test]
fn registry_outage_fails_only_the_reads_then_recovers() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let fast = ClientConfig {
        retry: RetryPolicy {
            attempts: 3,
            base: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            deadline: Duration::from_secs(2),
        },
        timeout: Some(Duration::from_secs(2)),
        ..ClientConfig::default()
    };
    let mut f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        1 << 20,
        fast.clone(),
    );
    let m = f.mount(
        "mnt",
        MountOptions {
            registry: Some(clip_registry::BlockingClient::new(fast).unwrap()),
            readahead_spans: 0,
            ..test_options()
        },
    );
    let mp = m.mountpoint().to_owned();
    let read = |p: &str, off: u64| {
        let file = std::fs::File::open(mp.join(p))?;
        let mut buf = vec![0u8; 4096];
        file.read_at(&mut buf, off).map(|n| buf[..n].to_vec())
    };
    assert_eq!(read(&files[0].0, 0).unwrap(), files[0].1[..4096]);

    f.registry.stop();
    let err = read(&files[1].0, 3 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO expected: {err}");
    // Cached data and metadata still work while the registry is away.
    assert_eq!(read(&files[0].0, 0).unwrap(), files[0].1[..4096]);
    assert!(mp.join("data/text").exists());

    f.registry.restart().unwrap();
    assert_eq!(
        read(&files[1].0, 3 << 20).unwrap(),
        files[1].1[3 << 20..(3 << 20) + 4096]
    );
    m.unmount().unwrap();
}

/// Serves `blobs` with ranges, corrupting the first `bad` blob responses.
fn corrupting_registry(
    blobs: Vec<(String, Vec<u8>)>,
    bad: usize,
) -> (FakeRegistry, Arc<std::sync::atomic::AtomicUsize>) {
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = Arc::clone(&served);
    let fake = FakeRegistry::start(move |req| {
        let Some((_, blob)) = blobs.iter().find(|(d, _)| req.path.ends_with(d.as_str())) else {
            return FakeResponse::new(if req.path == "/v2/" { 200 } else { 404 }, "");
        };
        let (a, b) = req
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .map_or((0, blob.len() - 1), |(a, b)| {
                (a.parse().unwrap(), b.parse().unwrap())
            });
        let mut body = blob[a..=b].to_vec();
        if s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < bad {
            let mid = body.len() / 2;
            body[mid] ^= 0x55;
        }
        FakeResponse::new(206, body)
            .header("content-range", &format!("bytes {a}-{b}/{}", blob.len()))
    })
    .unwrap();
    (fake, served)
}

#[test]
fn corrupt_bytes_are_refetched_and_never_served() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let built = image.build().unwrap();
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        1 << 20,
        ClientConfig::default(),
    );
    let blobs: Vec<(String, Vec<u8>)> = built.manifests[0]
        .layers
        .iter()
        .map(|l| (l.blob.digest.clone(), l.blob.bytes.clone()))
        .collect();

    // One corrupt answer: refetched, then served correctly. (No pre-mount check: its one-byte
    // reads would take the corrupt answer.)
    let (fake, _) = corrupting_registry(blobs.clone(), 1);
    let m = f.mount(
        "mnt",
        MountOptions {
            registry_override: Some(fake.host()),
            registry_check: false,
            ..test_options()
        },
    );
    let got = std::fs::read(m.mountpoint().join(&files[3].0)).unwrap();
    assert!(got == files[3].1);
    assert!(m.stats().verify_failures >= 1, "{:?}", m.stats());
    m.unmount().unwrap();

    // Always corrupt: EIO, nothing cached.
    let (fake, _) = corrupting_registry(blobs, usize::MAX);
    let m = f.mount(
        "mnt-bad",
        MountOptions {
            registry_override: Some(fake.host()),
            cache_dir: f.dir.path().join("cache-bad"),
            ..test_options()
        },
    );
    let err = std::fs::read(m.mountpoint().join(&files[0].0)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert_eq!(m.stats().cache.inserted_bytes, 0);
    m.unmount().unwrap();
}

#[test]
fn five_second_tokens_are_refreshed_during_a_long_run() {
    if !can_mount() {
        return;
    }
    let registry = Registry::start(RegistryOptions {
        auth: Auth::Token {
            users: vec![("alice".into(), "pw".into())],
            anonymous_pull: false,
            lifetime: Duration::from_secs(5),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    let cfg = ClientConfig {
        credentials: vec![(
            registry.host(),
            clip_registry::Credentials::Basic {
                username: "alice".into(),
                password: "pw".into(),
            },
        )],
        ..ClientConfig::default()
    };
    let (image, files) = big_files_image(Compression::Gzip);
    let f = indexed(registry, &image, 1 << 20, cfg.clone());
    let m = f.mount(
        "mnt",
        MountOptions {
            registry: Some(clip_registry::BlockingClient::new(cfg).unwrap()),
            readahead_spans: 0,
            ..test_options()
        },
    );
    let issued = |r: &Registry| {
        let s = r.token_stats().unwrap();
        s.get_tokens.load(std::sync::atomic::Ordering::SeqCst)
            + s.post_tokens.load(std::sync::atomic::Ordering::SeqCst)
    };
    let issued_before = issued(&f.registry);
    for (i, (path, want)) in files.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(2600));
        }
        let file = std::fs::File::open(m.mountpoint().join(path)).unwrap();
        let mut buf = vec![0u8; 8192];
        file.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert!(buf == want[1 << 20..(1 << 20) + 8192]);
    }
    assert!(issued(&f.registry) > issued_before);
    m.unmount().unwrap();
}

#[test]
fn the_cache_stays_under_its_cap_and_evicted_spans_are_refetched() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        256 << 10,
        ClientConfig::default(),
    );
    let cap = 4 << 20;
    let opts = || MountOptions {
        cache_bytes: cap,
        ..test_options()
    };
    let m = f.mount("mnt", opts());
    common::assert_files(m.mountpoint(), &files);
    let s = m.stats();
    assert!(s.cache.evictions > 0, "{s:?}");
    let on_disk = dir_size(&f.dir.path().join("cache/spans"));
    assert!(on_disk <= cap, "{on_disk} > {cap}");
    m.unmount().unwrap();

    // A new mount (a cold page cache) refetches what was evicted, correctly.
    let m = f.mount("mnt2", opts());
    common::assert_files(m.mountpoint(), &files);
    assert!(m.stats().requests > 0);
    assert!(dir_size(&f.dir.path().join("cache/spans")) <= cap);
    m.unmount().unwrap();
    let _ = &f.reference;
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    for d in std::fs::read_dir(p).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            total += f.metadata().unwrap().len();
        }
    }
    total
}

#[test]
fn a_recorded_profile_prefetches_a_cold_mount() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        256 << 10,
        ClientConfig::default(),
    );
    let profile_path = f.dir.path().join("profile.json");
    let m = f.mount(
        "rec",
        MountOptions {
            record_profile: Some(profile_path.clone()),
            readahead_spans: 0,
            ..test_options()
        },
    );
    // The "start-up": the head of one file and a slice in the middle of another.
    let head = std::fs::File::open(m.mountpoint().join(&files[3].0)).unwrap();
    let mut buf = vec![0u8; 200_000];
    head.read_exact_at(&mut buf, 0).unwrap();
    let mid = std::fs::File::open(m.mountpoint().join(&files[1].0)).unwrap();
    mid.read_exact_at(&mut buf, 2 << 20).unwrap();
    drop((head, mid));
    m.unmount().unwrap();
    let profile = clip_fs::Profile::load(&profile_path).unwrap();
    assert_eq!(
        profile
            .touches
            .iter()
            .map(|t| (t.path.as_str(), t.offset))
            .collect::<Vec<_>>(),
        [("/data/text", 0), ("/data/big1", 2 << 20)]
    );

    // A cold cache elsewhere: the profile's spans arrive before anyone reads them.
    let mut m = f.mount(
        "cold",
        MountOptions {
            cache_dir: f.dir.path().join("other-cache"),
            prefetch: Some(profile),
            readahead_spans: 0,
            ..test_options()
        },
    );
    m.wait_prefetch();
    let prefetched = m.stats();
    assert!(prefetched.spans_fetched > 0, "{prefetched:?}");
    let head = std::fs::File::open(m.mountpoint().join(&files[3].0)).unwrap();
    head.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == files[3].1[..200_000]);
    let mid = std::fs::File::open(m.mountpoint().join(&files[1].0)).unwrap();
    mid.read_exact_at(&mut buf, 2 << 20).unwrap();
    assert!(buf == files[1].1[2 << 20..(2 << 20) + 200_000]);
    assert_eq!(m.stats().requests, prefetched.requests, "{:?}", m.stats());
    drop((head, mid));
    m.unmount().unwrap();
}

#[test]
fn a_debian_image_mounted_lazily_equals_umoci() {
    if !can_mount() {
        return;
    }
    let top = vec![
        Entry::whiteout("etc/motd"),
        Entry::file("etc/hostname", "clip-test\n"),
    ];
    let image = ImageBuilder::new(ManifestFormat::Oci)
        .image(clip_testkit::debian::layered_image(Compression::Gzip, top).unwrap());
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        4 << 20,
        ClientConfig::default(),
    );
    let expected = f.oracle(None);
    let m = f.mount("mnt", test_options());
    assert_same(&expected, m.mountpoint());
    assert_eq!(m.stats().verify_failures, 0);
    m.unmount().unwrap();
}

#[test]
fn a_v1_remote_archive_in_s3_mounts_with_verified_files() {
    if !can_mount() {
        return;
    }
    let s3 = clip_testkit::S3::start().unwrap();
    s3.create_bucket("images").unwrap();
    let registry = Registry::start_anonymous().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = clip_testkit::image::edge_builder([
        Compression::Gzip,
        Compression::Gzip,
        Compression::None,
    ]);
    registry
        .push(&image.build().unwrap(), "test/app", "t")
        .unwrap();
    let rootfs =
        oracle::oracle_unpack(&registry, "test/app:t", &dir.path().join("oracle"), None).unwrap();
    let expected = Snapshot::scan(&rootfs).unwrap();
    let local = dir.path().join("v1.clip");
    clip_archive::archive_rootfs(&rootfs, &local, &clip_format::Meta::default()).unwrap();
    let remote = clip_objstore::RemoteOptions::s3_compatible(
        &s3.endpoint(),
        s3.region(),
        s3.access_key(),
        s3.secret_key(),
    );
    let meta = dir.path().join("v1-remote.clip");
    let net = clip_registry::BlockingClient::new(ClientConfig::default()).unwrap();
    clip_archive::upload_v1(
        net.handle(),
        &local,
        "s3://images/app.clip",
        &meta,
        &remote,
        None,
    )
    .unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let m = mount_archive(MountOptions {
        archive: meta.clone(),
        mountpoint: mp.clone(),
        cache_dir: dir.path().join("cache"),
        remote: remote.clone(),
        ..test_options()
    })
    .unwrap();
    assert_same(&expected, m.mountpoint());
    let s = m.stats();
    assert!(s.requests > 0 && s.verify_failures == 0, "{s:?}");
    m.unmount().unwrap();
    // A second mount reads every file from the cache.
    let m = mount_archive(MountOptions {
        archive: meta,
        mountpoint: mp,
        cache_dir: dir.path().join("cache"),
        remote,
        ..test_options()
    })
    .unwrap();
    assert_same(&expected, m.mountpoint());
    assert_eq!(m.stats().requests, 0);
    m.unmount().unwrap();
}

#[test]
fn background_fetch_fills_the_cache_so_the_registry_can_go_away() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let mut f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        1 << 20,
        ClientConfig::default(),
    );
    let m = f.mount(
        "mnt",
        MountOptions {
            background_fetch: Some(1 << 30),
            ..test_options()
        },
    );
    let spans = clip_format::Archive::open(&f.archive)
        .unwrap()
        .checkpoint_count() as u64;
    let start = std::time::Instant::now();
    while m.stats().spans_fetched < spans {
        assert!(start.elapsed() < Duration::from_mins(1), "{:?}", m.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    f.registry.stop();
    common::assert_files(m.mountpoint(), &files);
    m.unmount().unwrap();
}

/// eStargz and zstd:chunked images indexed from their tables of contents (virtual offsets, one
/// verified span per chunk or file) mount with the same tree as `umoci unpack` (of the gzip twin
/// for zstd), except for sub-second file times, which the TOCs do not carry.
#[test]
fn toc_indexed_images_mount_like_umoci() {
    if !can_mount() {
        return;
    }
    for compression in [
        [
            Compression::EStargz(64 << 10),
            Compression::EStargz(1 << 20),
            Compression::EStargz(4 << 10),
        ],
        [Compression::ZstdChunked; 3],
    ] {
        let f = indexed(
            Registry::start_anonymous().unwrap(),
            &clip_testkit::image::edge_builder(compression),
            1 << 20,
            ClientConfig::default(),
        );
        assert!(
            clip_format::Archive::open(&f.archive)
                .unwrap()
                .layers()
                .iter()
                .all(|l| l.toc_indexed)
        );
        let twin = (compression[0] == Compression::ZstdChunked).then(|| {
            clip_testkit::image::edge_builder([
                Compression::Gzip,
                Compression::Gzip,
                Compression::Gzip,
            ])
        });
        let expected = f.oracle(twin.as_ref());
        let m = f.mount("mnt", test_options());
        let diffs = expected.compare(
            &Snapshot::scan(m.mountpoint()).unwrap(),
            &CompareOptions::default(),
        );
        assert!(
            diffs.len() == 1 && diffs[0].contains("data/ns-time") && diffs[0].contains("mtime"),
            "{compression:?}: {}",
            diffs.join("\n")
        );
        let s = m.stats();
        assert!(s.spans_fetched > 0 && s.verify_failures == 0, "{s:?}");
        m.unmount().unwrap();
    }
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", at.display());
        Self(at.to_owned())
    }

    /// Writes a filler file until the filesystem is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![7u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
        p
    }

    fn remount_ro(&self) {
        let ok = std::process::Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Reads every file of `mp` into a map (path → bytes), like a program walking the image.
fn read_all(mp: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![mp.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                n += std::fs::read(e.path()).unwrap().len();
            }
        }
    }
    n
}

/// The span cache on a full filesystem: every read is served (the verified spans from memory),
/// the tree equals the oracle, the mount stays up, no cache file is corrupt, and once space
/// returns the cache writes again by itself.
#[test]
fn a_full_disk_never_fails_a_read() {
    if !can_mount() {
        return;
    }
    let (image, _) = big_files_image(Compression::Gzip);
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        1 << 20,
        ClientConfig::default(),
    );
    let expected = f.oracle(None);
    let small = SmallFs::new(&f.dir.path().join("smallfs"), "24m");
    let cache_dir = small.0.join("cache");
    // The cache exists (as on a worker that ran before), then the disk fills up from elsewhere.
    drop(clip_fs::SpanCache::open(&cache_dir, 10 << 30).unwrap());
    let filler = small.fill();
    let m = f.mount(
        "mnt",
        MountOptions {
            cache_dir: cache_dir.clone(),
            cache_bytes: 10 << 30,
            readahead_spans: 0,
            ..MountOptions::default()
        },
    );
    assert_same(&expected, m.mountpoint());
    let st = m.stats();
    assert!(
        st.cache.write_failures > 0 && st.cache.memory_spans > 0,
        "{st:?}"
    );
    assert!(st.cache.memory_only, "{st:?}");
    assert_eq!(st.verify_failures, 0);
    let cache = clip_fs::SpanCache::open(&cache_dir, 10 << 30).unwrap();
    assert_eq!(cache.verify_all().1, 0, "a corrupt span file was left");
    assert!(
        std::fs::read_dir(cache_dir.join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "temporary files were left"
    );

    // Space returns: after the retry delay the cache writes spans to disk again.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(6));
    let before = cache.verify_all().0;
    let m2 = f.mount(
        "mnt2",
        MountOptions {
            cache_dir: cache_dir.clone(),
            readahead_spans: 0,
            ..MountOptions::default()
        },
    );
    read_all(m2.mountpoint());
    assert!(
        cache.verify_all().0 > before,
        "nothing was written once space returned"
    );
    assert!(!m2.stats().cache.memory_only);
    m2.unmount().unwrap();
    m.unmount().unwrap();
}

/// Another process fills the disk while a cold start reads the image: the start succeeds and
/// reads the right bytes.
#[test]
fn a_disk_filling_during_a_cold_start_does_not_fail_it() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        1 << 20,
        ClientConfig::default(),
    );
    let small = SmallFs::new(&f.dir.path().join("smallfs"), "20m");
    let m = f.mount(
        "mnt",
        MountOptions {
            cache_dir: small.0.join("cache"),
            readahead_spans: 0,
            ..MountOptions::default()
        },
    );
    std::thread::scope(|s| {
        let filler = s.spawn(|| small.fill());
        common::assert_files(m.mountpoint(), &files);
        filler.join().unwrap();
    });
    // Everything read again, now certainly on a full disk.
    common::assert_files(m.mountpoint(), &files);
    m.unmount().unwrap();
}

/// A read-only cache directory: the mount works from memory, with one clear warning.
#[test]
fn a_read_only_cache_serves_from_memory_with_one_warning() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files_image(Compression::Gzip);
    let f = indexed(
        Registry::start_anonymous().unwrap(),
        &image,
        1 << 20,
        ClientConfig::default(),
    );
    let small = SmallFs::new(&f.dir.path().join("rofs"), "8m");
    let cache_dir = small.0.join("cache");
    drop(clip_fs::SpanCache::open(&cache_dir, 10 << 30).unwrap());
    small.remount_ro();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let l2 = std::sync::Arc::clone(&logs);
    let sub = tracing_subscriber::fmt()
        .with_writer(move || Writer(std::sync::Arc::clone(&l2)))
        .with_ansi(false)
        .finish();
    let m = tracing::subscriber::with_default(sub, || {
        f.mount(
            "mnt",
            MountOptions {
                cache_dir: cache_dir.clone(),
                readahead_spans: 0,
                ..MountOptions::default()
            },
        )
    });
    common::assert_files(m.mountpoint(), &files);
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert_eq!(text.matches("cannot be written").count(), 1, "{text}");
    assert!(m.stats().cache.memory_only);
    m.unmount().unwrap();
}

/// A log sink shared with the test.
struct Writer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
