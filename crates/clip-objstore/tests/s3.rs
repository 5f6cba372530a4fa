//! Objects in a real S3 API server (s3s-fs, SigV4 enforced) and in a local-filesystem store.
#![allow(clippy::unwrap_used, missing_docs)]

use clip_objstore::{RemoteObject, RemoteOptions};
use clip_testkit::S3;

fn options(s3: &S3) -> RemoteOptions {
    RemoteOptions::s3_compatible(
        &s3.endpoint(),
        s3.region(),
        s3.access_key(),
        s3.secret_key(),
    )
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
