//! Remote v1 archives against a real S3 API server (s3s-fs, SigV4 enforced) and the
//! local-filesystem store: upload (clip-archive), metadata archive, ranged reads, extract; bad
//! credentials and a missing bucket are clear errors that publish nothing.
#![allow(clippy::unwrap_used, missing_docs)]

use clip_archive::{Error, archive_layout, upload_v1};
use clip_extract::{ExtractOptions, extract};
use clip_objstore::{RemoteObject, RemoteOptions};
use clip_testkit::image::{EdgeCaseOptions, edge_cases};
use clip_testkit::{CompareOptions, ImageBuilder, ManifestFormat, S3, Snapshot};

fn options(s3: &S3) -> RemoteOptions {
    RemoteOptions::s3_compatible(
        &s3.endpoint(),
        s3.region(),
        s3.access_key(),
        s3.secret_key(),
    )
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let expected_root = dir.path().join("expected");
    extract(&local, &expected_root, &ExtractOptions::default()).unwrap();
    let expected = Snapshot::scan(&expected_root).unwrap();

    let local_store = dir.path().join("store");
    std::fs::create_dir(&local_store).unwrap();
    for url in [
        "s3://images/team/app.clip".to_owned(),
        format!("file://{}/team/app.clip", local_store.display()),
    ] {
        let meta = dir.path().join("remote.clip");
        let progress = std::sync::Mutex::new(Vec::new());
        let report = |sent: u64, total: u64| progress.lock().unwrap().push((sent, total));
        let s = upload_v1(
            rt.handle(),
            &local,
            &url,
            &meta,
            &options(&s3),
            Some(&report),
        )
        .unwrap();
        assert_eq!(s.uploaded, std::fs::metadata(&local).unwrap().len());
        assert_eq!(progress.lock().unwrap().last().unwrap().0, s.uploaded);
        let a = clip_format::Archive::open(&meta).unwrap();
        assert_eq!(a.kind(), clip_format::ArchiveKind::V1Remote);
        assert!(s.metadata.bytes * 20 < s.uploaded, "{s:?}");

        // Ranged reads return the object's exact bytes.
        let object = RemoteObject::open(&url, &options(&s3)).unwrap();
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
        let diffs = expected.compare(&Snapshot::scan(&root).unwrap(), &CompareOptions::default());
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        std::fs::remove_file(&meta).unwrap();
    }

    // Wrong secret and a missing bucket: clear errors, nothing published.
    let meta = dir.path().join("bad.clip");
    let wrong = RemoteOptions {
        secret_access_key: Some("not-the-secret".into()),
        ..options(&s3)
    };
    let h = rt.handle();
    let err = upload_v1(h, &local, "s3://images/x.clip", &meta, &wrong, None).unwrap_err();
    // S3 API servers answer a bad signature with a 403 that object_store reports as a generic
    // request error (or as denied); either way the message says what to check.
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    let err = upload_v1(
        h,
        &local,
        "s3://no-such-bucket/x.clip",
        &meta,
        &options(&s3),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(err.to_string().to_lowercase().contains("bucket"), "{err}");
    assert!(!meta.exists());
    let err = upload_v1(h, &local, "ftp://x/y", &meta, &options(&s3), None).unwrap_err();
    assert!(err.to_string().contains("unsupported URL scheme"), "{err}");

    // The object store going away: an error, and still no metadata archive.
    let opts = options(&s3);
    drop(s3);
    let err = upload_v1(h, &local, "s3://images/late.clip", &meta, &opts, None).unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(!meta.exists());
}
