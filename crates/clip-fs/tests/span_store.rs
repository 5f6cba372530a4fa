//! The shared span store against a real S3 API server (s3s-fs) and a real registry: spans one
//! mount fetched serve another mount (another worker, its own cache) with the registry gone, and
//! equal `umoci unpack`; a poisoned or truncated object is never served (the registry answers,
//! the event is counted, the object is replaced); a span a peer claimed is waited for, and a
//! claim whose holder never uploads costs a bounded wait, then the registry answers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    missing_docs
)]

mod common;
use common::can_mount;

use std::path::PathBuf;
use std::time::Duration;

use clip_fs::{MountHandle, MountOptions, SpanStoreOptions, mount_archive};
use clip_objstore::{RemoteObject, RemoteOptions};
use clip_registry::ClientConfig;
use clip_testkit::image::random_bytes;
use clip_testkit::{Compression, ImageBuilder, Registry, S3, Snapshot, assert_same, oracle};

/// A registry with `image` pushed as `test/app:t`, an S3 server with bucket `spans`, and the
/// image indexed into a v2 archive with `span`-byte spans.
struct Fleet {
    dir: tempfile::TempDir,
    registry: Registry,
    s3: S3,
    archive: PathBuf,
}

impl Fleet {
    fn new(image: &ImageBuilder, span: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::start_anonymous().unwrap();
        registry
            .push(&image.build().unwrap(), "test/app", "t")
            .unwrap();
        let s3 = S3::start().unwrap();
        s3.create_bucket("spans").unwrap();
        let archive = dir.path().join("app.clip");
        let client = clip_registry::BlockingClient::new(ClientConfig::default()).unwrap();
        let reference = format!("{}/test/app:t", registry.host());
        clip_indexer::index(
            clip_indexer::Input::Registry {
                reference: &reference,
                client: &client,
            },
            &archive,
            &clip_indexer::IndexOptions {
                checkpoint_bytes: span,
                ..clip_indexer::IndexOptions::default()
            },
            None,
        )
        .unwrap();
        Self {
            dir,
            registry,
            s3,
            archive,
        }
    }

    fn remote(&self) -> RemoteOptions {
        RemoteOptions::s3_compatible(
            &self.s3.endpoint(),
            self.s3.region(),
            self.s3.access_key(),
            self.s3.secret_key(),
        )
    }

    fn store(&self, prefix: &str) -> SpanStoreOptions {
        SpanStoreOptions::new(&format!("s3://spans/{prefix}"), self.remote())
    }

    /// The objects under `s3://spans/PREFIX/WHAT/`.
    fn objects(&self, prefix: &str, what: &str) -> (RemoteObject, Vec<String>) {
        let dir =
            RemoteObject::open(&format!("s3://spans/{prefix}/{what}"), &self.remote()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let names = rt.block_on(dir.list_children()).unwrap();
        (dir, names)
    }

    /// A "worker": a mount with its own fresh span cache and the store at `prefix`.
    fn worker(&self, name: &str, store: SpanStoreOptions, registry_check: bool) -> MountHandle {
        let mp = self.dir.path().join(name);
        std::fs::create_dir_all(&mp).unwrap();
        mount_archive(MountOptions {
            archive: self.archive.clone(),
            mountpoint: mp,
            cache_dir: self.dir.path().join(format!("cache-{name}")),
            cache_min_free_percent: 0,
            readahead_spans: 0,
            registry_check,
            span_store: Some(store),
            ..MountOptions::default()
        })
        .unwrap()
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Puts a fresh claim (now, in Unix ms) on each of `names` under `claims`, as a peer would.
fn claim_now(claims: &RemoteObject, names: &[String]) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    block_on(async {
        for n in names {
            assert!(
                claims
                    .child(n)
                    .put_if_absent(stamp.as_bytes())
                    .await
                    .unwrap()
            );
        }
    });
}

fn big_files() -> (ImageBuilder, Vec<(String, Vec<u8>)>) {
    let files: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| (format!("data/big{i}"), random_bytes(300 + i, 3 << 20)))
        .collect();
    (common::files_image(&files, Compression::Gzip), files)
}

#[test]
fn a_tree_whose_spans_all_come_from_the_store_equals_umoci() {
    if !can_mount() {
        return;
    }
    let image = clip_testkit::image::edge_builder([
        Compression::Gzip,
        Compression::Gzip,
        Compression::None,
    ]);
    let mut f = Fleet::new(&image, 64 << 10);
    let want = Snapshot::scan(
        &oracle::oracle_unpack(
            &f.registry,
            "test/app:t",
            &f.dir.path().join("oracle"),
            None,
        )
        .unwrap(),
    )
    .unwrap();

    // The first worker reads everything from the registry and fills the store.
    let a = f.worker("a", f.store("fleet"), true);
    assert_same(&want, a.mountpoint());
    let sa = a.stats();
    a.unmount().unwrap();
    assert!(sa.requests > 0 && sa.span_store.hits == 0, "{sa:?}");
    assert_eq!(sa.span_store.uploads, sa.spans_fetched, "{sa:?}");
    let (_, stored) = f.objects("fleet", "spans");
    assert_eq!(stored.len() as u64, sa.spans_fetched);
    let (_, claims) = f.objects("fleet", "claims");
    assert_eq!(
        claims, stored,
        "one claim per span fetched, kept after its upload"
    );

    // Another worker, registry gone: every span from the store, verified, same tree.
    f.registry.stop();
    let b = f.worker("b", f.store("fleet"), false);
    assert_same(&want, b.mountpoint());
    let sb = b.stats();
    b.unmount().unwrap();
    assert_eq!(sb.requests, 0, "{sb:?}");
    assert_eq!(sb.span_store.hits, sa.spans_fetched, "{sb:?}");
    assert_eq!(sb.span_store.rejected, 0);
    assert_eq!(sb.span_store.uploads, 0, "nothing new to upload: {sb:?}");
}

#[test]
fn a_poisoned_or_truncated_store_object_is_never_served_and_gets_replaced() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files();
    let mut f = Fleet::new(&image, 256 << 10);
    let read_all = |m: &MountHandle| common::assert_files(m.mountpoint(), &files);
    let a = f.worker("a", f.store("fleet"), true);
    read_all(&a);
    a.unmount().unwrap();

    // Poison one object (a flipped byte) and truncate another.
    let (dir, names) = f.objects("fleet", "spans");
    assert!(names.len() >= 4, "{names:?}");
    block_on(async {
        let poisoned = dir.child(&names[0]);
        let mut b = poisoned.get_all().await.unwrap().unwrap().to_vec();
        let mid = b.len() / 2;
        b[mid] ^= 0x55;
        poisoned.delete().await.unwrap();
        assert!(poisoned.put_if_absent(&b).await.unwrap());
        let truncated = dir.child(&names[1]);
        let b = truncated.get_all().await.unwrap().unwrap();
        truncated.delete().await.unwrap();
        assert!(truncated.put_if_absent(&b[..b.len() - 1]).await.unwrap());
    });

    let b = f.worker("b", f.store("fleet"), true);
    read_all(&b);
    let sb = b.stats();
    b.unmount().unwrap();
    assert_eq!(sb.span_store.rejected, 2, "{sb:?}");
    assert!(sb.requests >= 1, "the registry answered for them: {sb:?}");
    assert_eq!(sb.verify_failures, 0);

    // The bad objects were replaced by the verified bytes: the registry is no longer needed.
    f.registry.stop();
    let c = f.worker("c", f.store("fleet"), false);
    read_all(&c);
    let sc = c.stats();
    c.unmount().unwrap();
    assert_eq!((sc.requests, sc.span_store.rejected), (0, 0), "{sc:?}");
}

#[test]
fn a_claimed_span_is_waited_for_and_a_dead_claim_costs_a_bounded_wait() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files();
    let f = Fleet::new(&image, 256 << 10);
    // Learn the span names by filling one store.
    let a = f.worker("a", f.store("seed"), true);
    common::assert_files(a.mountpoint(), &files);
    a.unmount().unwrap();
    let (seed, names) = f.objects("seed", "spans");

    // In store "live", a peer holds fresh claims on every span and uploads them 300 ms later:
    // the worker reads them from the store, not the registry.
    let (claims, _) = f.objects("live", "claims");
    let (spans, _) = f.objects("live", "spans");
    claim_now(&claims, &names);
    let peer = {
        let (seed, spans, names) = (seed.clone(), spans.clone(), names.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            block_on(async {
                for n in &names {
                    let b = seed.child(n).get_all().await.unwrap().unwrap();
                    spans.child(n).put_if_absent(&b).await.unwrap();
                }
            });
        })
    };
    let b = f.worker("b", f.store("live"), true);
    common::assert_files(b.mountpoint(), &files);
    let sb = b.stats();
    b.unmount().unwrap();
    peer.join().unwrap();
    assert!(sb.span_store.waited >= 1, "{sb:?}");
    assert_eq!(
        sb.requests, 0,
        "read from the store after the peer's upload: {sb:?}"
    );

    // In store "dead", the claims' holder never uploads: after `claim_wait` the registry
    // answers, and the bytes are right.
    let (claims, _) = f.objects("dead", "claims");
    claim_now(&claims, &names);
    let mut store = f.store("dead");
    store.claim_wait = Duration::from_millis(200);
    let c = f.worker("c", store, true);
    common::assert_files(c.mountpoint(), &files);
    let sc = c.stats();
    c.unmount().unwrap();
    assert!(sc.span_store.waited >= 1 && sc.requests >= 1, "{sc:?}");
    assert_eq!(sc.span_store.hits, 0, "{sc:?}");
}

#[test]
fn a_store_that_never_answers_costs_one_timeout_then_is_left_alone() {
    if !can_mount() {
        return;
    }
    let (image, files) = big_files();
    let f = Fleet::new(&image, 256 << 10);
    // A "store" that accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hole.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hole.incoming() {
            held.push(c);
        }
    });
    let mut store = SpanStoreOptions::new(
        "s3://spans/hole",
        RemoteOptions::s3_compatible(&endpoint, "us-east-1", "k", "s"),
    );
    store.timeout = Duration::from_millis(300);
    store.backoff = Duration::from_mins(10);
    let m = f.worker("w", store, true);
    common::assert_files(m.mountpoint(), &files);
    let s = m.stats();
    m.unmount().unwrap();
    // 36 spans were fetched; only the first few store operations (those already in flight
    // when the first timed out) waited for the store.
    assert!(s.spans_fetched >= 36, "{s:?}");
    assert!(
        (1..=8).contains(&s.span_store.errors),
        "the store was asked after it failed: {s:?}"
    );
    assert_eq!(s.span_store.uploads, 0, "{s:?}");
}
