//! Remote v1 archives against a real S3 API server (s3s-fs, SigV4 enforced) and the
//! local-filesystem store: upload, metadata archive, ranged reads, extract; bad credentials and a
//! missing bucket are clear errors that publish nothing.
#![allow(clippy::unwrap_used, missing_docs)]

use clip_extract::remote::{RemoteObject, RemoteOptions, upload_v1};
use clip_extract::{Error, ExtractOptions, archive_layout, extract};
use clip_testkit::image::{EdgeCaseOptions, edge_cases};
use clip_testkit::{CompareOptions, ImageBuilder, ManifestFormat, S3, Tree};

fn options(s3: &S3) -> RemoteOptions {
    RemoteOptions {
        endpoint: Some(s3.endpoint()),
        region: Some(s3.region().to_owned()),
        access_key_id: Some(s3.access_key().to_owned()),
        secret_access_key: Some(s3.secret_key().to_owned()),
        path_style: true,
    }
}

#[test]
fn upload_extract_and_range_reads_through_s3_and_a_local_store() {
    let s3 = S3::start().unwrap();
    s3.create_bucket("images").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    ImageBuilder::new(ManifestFormat::Oci)
        .image(edge_cases(&EdgeCaseOptions {
            devices: clip_testkit::is_root(),
            ..EdgeCaseOptions::default()
        }))
        .build()
        .unwrap()
        .write_oci_layout(&layout, "t")
        .unwrap();
    let local = dir.path().join("local.clip");
    archive_layout(&layout, Some("t"), None, &local).unwrap();
    let expected_root = dir.path().join("expected");
    extract(&local, &expected_root, &ExtractOptions::default()).unwrap();
    let expected = Tree::scan(&expected_root).unwrap();

    let local_store = dir.path().join("store");
    std::fs::create_dir(&local_store).unwrap();
    for url in [
        "s3://images/team/app.clip".to_owned(),
        format!("file://{}/team/app.clip", local_store.display()),
    ] {
        let meta = dir.path().join("remote.clip");
        let progress = std::sync::Mutex::new(Vec::new());
        let report = |sent: u64, total: u64| progress.lock().unwrap().push((sent, total));
        let s = upload_v1(&local, &url, &meta, &options(&s3), Some(&report)).unwrap();
        assert_eq!(s.uploaded, std::fs::metadata(&local).unwrap().len());
        assert_eq!(progress.lock().unwrap().last().unwrap().0, s.uploaded);
        let a = clip_format::Archive::open(&meta).unwrap();
        assert_eq!(a.kind(), clip_format::ArchiveKind::V1Remote);
        assert!(s.metadata.bytes * 20 < s.uploaded, "{s:?}");

        // Ranged reads return the object's exact bytes.
        let object = RemoteObject::open(&url, &options(&s3)).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let whole = std::fs::read(&local).unwrap();
        let got = rt.block_on(object.get_range(1000..70_000)).unwrap();
        assert_eq!(&got[..], &whole[1000..70_000]);

        // Extracting the metadata archive reads the data object.
        let root = dir.path().join(format!("from-{}", &url[..2]));
        extract(
            &meta,
            &root,
            &ExtractOptions {
                remote: options(&s3),
                ..ExtractOptions::default()
            },
        )
        .unwrap();
        let diffs = expected.compare(&Tree::scan(&root).unwrap(), &CompareOptions::default());
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        std::fs::remove_file(&meta).unwrap();
    }

    // Wrong secret and a missing bucket: clear errors, nothing published.
    let meta = dir.path().join("bad.clip");
    let wrong = RemoteOptions {
        secret_access_key: Some("not-the-secret".into()),
        ..options(&s3)
    };
    let err = upload_v1(&local, "s3://images/x.clip", &meta, &wrong, None).unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    assert!(err.to_string().contains("access key"), "{err}");
    let err = upload_v1(
        &local,
        "s3://no-such-bucket/x.clip",
        &meta,
        &options(&s3),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    assert!(err.to_string().to_lowercase().contains("bucket"), "{err}");
    assert!(!meta.exists());
    let err = upload_v1(&local, "ftp://x/y", &meta, &options(&s3), None).unwrap_err();
    assert!(err.to_string().contains("unsupported URL scheme"), "{err}");

    // The object store going away: an error, and still no metadata archive.
    let opts = options(&s3);
    drop(s3);
    let err = upload_v1(&local, "s3://images/late.clip", &meta, &opts, None).unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    assert!(!meta.exists());
}

/// Create-only writes, the coordination point of workers sharing a store: the first writer
/// wins, a later (or concurrent) writer is told so and the object keeps the first bytes.
#[test]
fn create_only_writes_keep_the_first_object() {
    let s3 = S3::start().unwrap();
    s3.create_bucket("images").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for url in [
        "s3://images/x/one.clip".to_owned(),
        format!("file://{}/x/one.clip", dir.path().display()),
    ] {
        let o = RemoteObject::open(&url, &options(&s3)).unwrap();
        assert!(!rt.block_on(o.exists()).unwrap());
        assert_eq!(rt.block_on(o.get_all()).unwrap(), None);
        assert!(rt.block_on(o.put_if_absent(b"first")).unwrap(), "{url}");
        assert!(!rt.block_on(o.put_if_absent(b"second")).unwrap(), "{url}");
        assert_eq!(
            rt.block_on(o.get_all()).unwrap().unwrap().as_ref(),
            b"first"
        );
        // Eight writers at once: exactly one wins on the local store (an atomic create).
        let racers = RemoteObject::open(&format!("{url}.race"), &options(&s3)).unwrap();
        let wins: usize = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..8u8 {
                let r = racers.clone();
                set.spawn(async move { r.put_if_absent(&[i; 64]).await.unwrap() });
            }
            set.join_all().await.into_iter().filter(|w| *w).count()
        });
        if url.starts_with("file://") {
            assert_eq!(wins, 1);
        } else {
            // s3s-fs checks and writes in two steps; real S3 decides atomically.
            assert!(wins >= 1);
        }
        rt.block_on(o.delete()).unwrap();
        assert!(!rt.block_on(o.exists()).unwrap());
        rt.block_on(o.delete()).unwrap();
    }
}
