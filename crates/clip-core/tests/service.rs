//! The seed's behaviour matrix, one row per test, with real parts: the distribution registry,
//! buildah, FUSE, overlayfs and runc.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use clip_core::policy::{ArchiveStore, Config, RegistryEntry};
use clip_core::service::{ImageService, ServiceOptions};
use clip_testkit::{
    Auth, Entry, Image, ImageBuilder, Layer, ManifestFormat, Registry, RegistryOptions,
};

/// What these tests need from the machine.
const NEEDS: &[clip_testkit::Need] = &[
    clip_testkit::Need::Root,
    clip_testkit::Need::Fuse,
    clip_testkit::Need::Program("buildah"),
];

/// Log lines of the current thread, captured.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let logs = Logs::default();
    let l2 = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || l2.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    (out, logs.text())
}

fn config(dir: &Path, version: u8) -> Config {
    Config {
        clip_version: version,
        archive_store: ArchiveStore::Local(dir.join("store")),
        cache_dir: dir.join("cache"),
        mount_base: dir.join("mnt"),
        ..Config::default()
    }
}

fn service(dir: &Path, cfg: Config) -> ImageService {
    ImageService::new(
        cfg,
        ServiceOptions {
            buildah_root: Some(dir.join("buildah")),
        },
    )
    .unwrap()
}

fn private_registry() -> Registry {
    Registry::start(RegistryOptions {
        auth: Auth::Basic {
            username: "ci".into(),
            password: "secret".into(),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap()
}

fn with_creds(mut cfg: Config, reg: &Registry, password: &str) -> Config {
    cfg.registries.insert(
        reg.host(),
        RegistryEntry {
            username: Some("ci".into()),
            password: Some(password.into()),
            ..RegistryEntry::default()
        },
    );
    cfg
}

/// A new fleet signing key in `dir` (`clip keygen`'s format); its path.
fn fleet_key(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("fleet.key");
    let (text, _) = clip_core::objstore::signed::SigningKey::generate().unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn push_sample(reg: &Registry) -> String {
    let img = Image::new(vec![
        Layer::new(vec![
            Entry::file("etc/os-release", "ID=sample\n"),
            Entry::file(
                "usr/share/data.bin",
                clip_testkit::image::random_bytes(3, 3 << 20),
            ),
        ]),
        Layer::new(vec![Entry::file("etc/motd", "hello\n")]),
    ]);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    reg.push(&built, "team/sample", "v1").unwrap().reference
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
#[test]
fn pull_v2_and_v1_from_a_private_registry_mount_side_by_side() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let reg = private_registry();
    let image = push_sample(&reg);
    let dir = tempfile::tempdir().unwrap();

    let v2 = service(
        dir.path(),
        with_creds(config(dir.path(), 2), &reg, "secret"),
    );
    let (r2, logs) = with_logs(|| v2.pull_and_archive(&image).unwrap());
    assert_eq!(
        (r2.version.number(), r2.fallback_reason.as_deref()),
        (2, None)
    );
    assert!(
        logs.contains("Creating index-only archive directly from registry"),
        "{logs}"
    );
    assert!(
        logs.contains("v2 archive created directly from registry"),
        "{logs}"
    );
    assert!(r2.bytes < 200_000, "{r2:?}");

    let dir1 = tempfile::tempdir().unwrap();
    let v1 = service(
        dir1.path(),
        with_creds(config(dir1.path(), 1), &reg, "secret"),
    );
    let (r1, logs) = with_logs(|| v1.pull_and_archive(&image).unwrap());
    assert_eq!(
        (r1.version.number(), r1.fallback_reason.as_deref()),
        (1, None)
    );
    assert!(logs.contains("Creating legacy archive (Clip v1)"), "{logs}");
    assert_eq!(r1.image_id, r2.image_id, "ids are stable across versions");
    assert!(r1.bytes > 3 << 20);

    // PullLazy of both, side by side; the v2 mount fetches on read.
    let (m2, logs) = with_logs(|| v2.pull_lazy(&r2.image_id).unwrap());
    assert!(logs.contains("detected v2 (OCI) archive format"), "{logs}");
    let (m1, logs) = with_logs(|| v1.pull_lazy(&r1.image_id).unwrap());
    assert!(logs.contains("detected v1 archive format"), "{logs}");
    for m in [&m1, &m2] {
        assert_eq!(
            std::fs::read(m.mountpoint.join("etc/os-release")).unwrap(),
            b"ID=sample\n"
        );
        assert_eq!(
            std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap(),
            clip_testkit::image::random_bytes(3, 3 << 20)
        );
    }
    assert!(m2.stats().fetched_bytes > 0);

    // What the worker leaves on the host is root's alone: with the directories around them
    // open, an unprivileged user still finds no byte of the (private) image in the caches, the
    // stores or under the mount base, and cannot enter the mounts.
    for d in [dir.path(), dir1.path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let wrong = clip_testkit::probe::private_to_root(
            &[&d.join("cache"), &d.join("store"), &d.join("mnt")],
            "ID=sample",
        );
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
    let entered = clip_testkit::probe::as_nobody(
        std::path::Path::new("/bin/cat"),
        &[&m2.mountpoint.join("etc/os-release").to_string_lossy()],
    )
    .unwrap();
    assert!(
        !entered.status.success(),
        "uid 65534 read a file of the mount"
    );

    // Many concurrent PullLazy requests for one image share one mount.
    let v2 = Arc::new(v2);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (s, id) = (Arc::clone(&v2), r2.image_id.clone());
            std::thread::spawn(move || s.pull_lazy(&id).unwrap())
        })
        .collect();
    for h in handles {
        assert!(Arc::ptr_eq(&h.join().unwrap(), &m2));
    }
    assert_eq!(v2.mounts().len(), 1);

    // The same pull again does no work; a damaged archive in the store is replaced.
    let (again, logs) = with_logs(|| v2.pull_and_archive(&image).unwrap());
    assert!(again.reused && again.version.number() == 2, "{again:?}");
    assert!(logs.contains("archive already in the store"), "{logs}");
    let stored = std::path::PathBuf::from(&again.archive);
    std::fs::write(&stored, b"not an archive").unwrap();
    let (fixed, logs) = with_logs(|| v2.pull_and_archive(&image).unwrap());
    assert!(!fixed.reused && fixed.version.number() == 2, "{fixed:?}");
    assert!(logs.contains("stored archive is unreadable"), "{logs}");
    clip_core::format::Archive::open(&stored).unwrap();

    // Outside the v2 rollout (0%), clipVersion 2 pulls are v1 — not a fallback.
    let dir4 = tempfile::tempdir().unwrap();
    let cfg = Config {
        clip_v2_rollout_percent: 0,
        ..with_creds(config(dir4.path(), 2), &reg, "secret")
    };
    let (r0, logs) = with_logs(|| service(dir4.path(), cfg).pull_and_archive(&image).unwrap());
    assert_eq!(
        (r0.version.number(), r0.fallback_reason.as_deref()),
        (1, None)
    );
    assert!(logs.contains("outside the v2 rollout"), "{logs}");

    // Wrong credentials: a clear error with the docker login hint.
    let dir3 = tempfile::tempdir().unwrap();
    let bad = service(
        dir3.path(),
        with_creds(config(dir3.path(), 2), &reg, "wrong"),
    );
    let err = bad.pull_and_archive(&image).unwrap_err().to_string();
    assert!(
        err.contains("unauthorized") && err.contains("docker login"),
        "{err}"
    );
}

fn build_context(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ctx = dir.join("context");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    std::fs::write(ctx.join("hello"), "built by buildah\n").unwrap();
    let dockerfile = ctx.join("Dockerfile");
    let mut f = std::fs::File::create(&dockerfile).unwrap();
    writeln!(
        f,
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY hello /etc/hello\n\
         RUN [\"/bin/busybox\", \"mkdir\", \"-p\", \"/data\"]\n\
         ENV GREETING=/etc/hello\nCMD [\"/bin/busybox\", \"cat\", \"/etc/hello\"]"
    )
    .unwrap();
    (dockerfile, ctx)
}

#[test]
fn build_v2_with_the_registry_up_then_run_it_in_a_container() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (dockerfile, ctx) = build_context(dir.path());
    let cfg = Config {
        build_registry: reg.host(),
        build_registry_configured: true,
        ..config(dir.path(), 2)
    };
    let svc = service(dir.path(), cfg);
    let (r, logs) = with_logs(|| svc.build_and_archive(&dockerfile, &ctx, &[]).unwrap());
    assert_eq!(
        (r.version.number(), r.fallback_reason.as_deref()),
        (2, None),
        "{logs}"
    );
    assert!(logs.contains("Pushing built image to registry: "), "{logs}");
    assert!(
        logs.contains("Creating index-only archive (Clip v2)"),
        "{logs}"
    );
    assert!(logs.contains("v2 archive created from registry"), "{logs}");

    // The image's own command, then an explicit one, through overlay + runc.
    let out = svc.run(&r.image_id, None).unwrap();
    assert_eq!(
        (out.status, out.stdout.as_str()),
        (0, "built by buildah\n"),
        "{out:?}"
    );
    let args = [
        "/bin/busybox".to_owned(),
        "ls".to_owned(),
        "-d".to_owned(),
        "/data".to_owned(),
    ];
    let out = svc.run(&r.image_id, Some(&args)).unwrap();
    assert_eq!(out.stdout, "/data\n", "{out:?}");

    // Same inputs, same id; a restarted worker remounts from its cache.
    let id = r.image_id.clone();
    drop(svc);
    let svc = service(
        dir.path(),
        Config {
            build_registry: reg.host(),
            build_registry_configured: true,
            ..config(dir.path(), 2)
        },
    );
    let m = svc.pull_lazy(&id).unwrap();
    assert_eq!(
        std::fs::read(m.mountpoint.join("etc/hello")).unwrap(),
        b"built by buildah\n"
    );
}

#[test]
fn build_v2_with_the_registry_down_falls_back_to_v1_and_v1_builds_work() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (dockerfile, ctx) = build_context(dir.path());
    // Nothing listens on this port: the default-like registry is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = Config {
        build_registry: format!("127.0.0.1:{port}"),
        ..config(dir.path(), 2)
    };
    let svc = service(dir.path(), cfg);
    let (r, logs) = with_logs(|| svc.build_and_archive(&dockerfile, &ctx, &[]).unwrap());
    assert_eq!(r.version.number(), 1);
    let reason = r.fallback_reason.clone().unwrap();
    assert!(
        reason.contains("no registry configured") && reason.contains("refused"),
        "{reason}"
    );
    assert!(logs.contains("falling back to v1"), "{logs}");
    assert!(logs.contains("Creating legacy archive (Clip v1)"), "{logs}");
    let m = svc.pull_lazy(&r.image_id).unwrap();
    assert_eq!(m.version.number(), 1);
    assert!(m.mountpoint.join("data").is_dir());

    // A registry that refuses the push (wrong credentials): still a v1 archive, reason logged.
    let reg = private_registry();
    let cfg = with_creds(
        Config {
            build_registry: reg.host(),
            build_registry_configured: true,
            ..config(dir.path(), 2)
        },
        &reg,
        "wrong",
    );
    let svc = service(dir.path(), cfg);
    let (r, logs) = with_logs(|| {
        svc.build_and_archive(&dockerfile, &ctx, &[("V".into(), "2".into())])
            .unwrap()
    });
    assert_eq!(r.version.number(), 1, "{logs}");
    assert!(logs.contains("failed to push to registry"), "{logs}");
    assert!(
        r.fallback_reason
            .unwrap()
            .contains("failed to push to registry")
    );

    // clipVersion 1: v1 with no fallback reason.
    let svc = service(dir.path(), config(dir.path(), 1));
    let r = svc
        .build_and_archive(&dockerfile, &ctx, &[("V".into(), "3".into())])
        .unwrap();
    assert_eq!((r.version.number(), r.fallback_reason), (1, None));
}

#[test]
fn an_s3_archive_store_holds_v2_indexes_and_v1_data_for_pull_lazy() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let s3 = clip_testkit::S3::start().unwrap();
    s3.create_bucket("images").unwrap();
    let reg = private_registry();
    let image = push_sample(&reg);
    for version in [2u8, 1] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            archive_store: ArchiveStore::S3(clip_core::policy::S3Store {
                bucket: "images".into(),
                prefix: format!("v{version}/"),
                endpoint: Some(s3.endpoint()),
                region: Some(s3.region().into()),
                force_path_style: true,
                access_key_id: Some(s3.access_key().into()),
                secret_access_key: Some(s3.secret_key().into()),
            }),
            signing_key: Some(fleet_key(dir.path())),
            ..with_creds(config(dir.path(), version), &reg, "secret")
        };
        let svc = service(dir.path(), cfg);
        let r = svc.pull_and_archive(&image).unwrap();
        assert_eq!(r.version.number(), version);
        assert_eq!(
            r.archive,
            format!("s3://images/v{version}/{}.clip", r.image_id)
        );
        let stored = s3.root().join("images").join(format!("v{version}"));
        assert!(stored.join(format!("{}.clip", r.image_id)).exists());
        let data_objects = std::fs::read_dir(&stored)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name().into_string().unwrap();
                name.starts_with(&format!("{}.data.", r.image_id))
            })
            .count();
        assert_eq!(
            data_objects,
            usize::from(version == 1),
            "v1 keeps its data in the bucket"
        );
        // Pulling again finds the archive in the store and does nothing else.
        let again = svc.pull_and_archive(&image).unwrap();
        assert!(
            again.reused && again.version.number() == version && again.archive == r.archive,
            "{again:?}"
        );
        let (m, logs) = with_logs(|| svc.pull_lazy(&r.image_id).unwrap());
        assert!(
            logs.contains(if version == 2 {
                "detected v2"
            } else {
                "detected v1"
            }),
            "{logs}"
        );
        assert_eq!(
            std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap(),
            clip_testkit::image::random_bytes(3, 3 << 20)
        );
        assert!(m.stats().fetched_bytes >= 3 << 20);
    }
}

/// A registry that demands a client certificate, behind a private CA, configured the worker's
/// way (`registries: HOST: {caFile, clientCert, clientKey}`): v2 pull and PullLazy read through
/// it. A worker without that configuration refuses to mount the same archive, with the TLS
/// error, instead of serving a tree whose every read fails.
#[test]
fn pull_lazy_from_a_registry_demanding_a_client_certificate() {
    if !clip_testkit::require(clip_testkit::MOUNT) {
        return;
    }
    let reg = Registry::start(RegistryOptions {
        tls: true,
        client_certs: true,
        ..Default::default()
    })
    .unwrap();
    let image = push_sample(&reg);
    let dir = tempfile::tempdir().unwrap();
    let no_certs_d = dir.path().join("no-certs.d");
    let client = reg.client_cert().unwrap();
    let mut cfg = Config {
        certs_dirs: Some(vec![no_certs_d.clone()]),
        ..config(dir.path(), 2)
    };
    cfg.registries.insert(
        reg.host(),
        RegistryEntry {
            ca_file: Some(reg.ca().unwrap().cert_path().to_owned()),
            client_cert: Some(client.cert_path.clone()),
            client_key: Some(client.key_path.clone()),
            ..RegistryEntry::default()
        },
    );
    let store = cfg.archive_store.clone();
    let svc = service(dir.path(), cfg);
    let pulled = svc.pull_and_archive(&image).unwrap();
    assert_eq!(
        (pulled.version.number(), pulled.fallback_reason.as_deref()),
        (2, None)
    );
    let m = svc.pull_lazy(&pulled.image_id).unwrap();
    assert_eq!(
        std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap(),
        clip_testkit::image::random_bytes(3, 3 << 20)
    );

    let other = tempfile::tempdir().unwrap();
    let bare = service(
        other.path(),
        Config {
            archive_store: store,
            certs_dirs: Some(vec![no_certs_d]),
            ..config(other.path(), 2)
        },
    );
    let err = bare.pull_lazy(&pulled.image_id).unwrap_err().to_string();
    assert!(err.contains("not mounting"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(bare.mounts().is_empty());
}

/// Shared prefetch profiles: the first lazy run of an image on any worker publishes what it
/// read beside the archive; a worker that has never seen the image prefetches it at mount, so
/// its first reads are cache hits. A damaged profile in the store is ignored.
#[test]
fn the_first_run_shares_its_profile_and_later_mounts_prefetch_it() {
    if !clip_testkit::require(clip_testkit::MOUNT) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let image = push_sample(&reg);
    let a = tempfile::tempdir().unwrap();
    let store = ArchiveStore::Local(a.path().join("store"));
    let first = service(a.path(), config(a.path(), 2));
    let id = first.pull_and_archive(&image).unwrap().image_id;
    let m = first.pull_lazy(&id).unwrap();
    assert!(!m.prefetched_shared_profile());
    let want = clip_testkit::image::random_bytes(3, 3 << 20);
    assert!(std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap() == want);
    first.unmount(&id).unwrap();
    let profile = a.path().join("store").join(format!("{id}.profile.json"));
    assert!(profile.exists(), "the first run's profile is in the store");

    // Another worker, same store, empty span cache.
    let b = tempfile::tempdir().unwrap();
    let second = service(
        b.path(),
        Config {
            archive_store: store.clone(),
            ..config(b.path(), 2)
        },
    );
    let m = second.pull_lazy(&id).unwrap();
    assert!(m.prefetched_shared_profile());
    m.wait_prefetch();
    let prefetched = m.stats();
    assert!(prefetched.fetched_bytes >= 3 << 20, "{prefetched:?}");
    assert!(std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap() == want);
    assert_eq!(
        m.stats().requests,
        prefetched.requests,
        "every read was a cache hit"
    );
    second.unmount(&id).unwrap();

    // A damaged profile is ignored: the mount works, without prefetch.
    std::fs::write(&profile, b"{not a profile").unwrap();
    let c = tempfile::tempdir().unwrap();
    let third = service(
        c.path(),
        Config {
            archive_store: store,
            ..config(c.path(), 2)
        },
    );
    let m = third.pull_lazy(&id).unwrap();
    assert!(!m.prefetched_shared_profile());
    assert!(std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap() == want);
    third.unmount(&id).unwrap();
}

#[test]
fn workers_with_a_span_store_read_what_the_first_worker_fetched() {
    if !clip_testkit::require(clip_testkit::MOUNT) {
        return;
    }
    let s3 = clip_testkit::S3::start().unwrap();
    s3.create_bucket("fleet").unwrap();
    let span_store = clip_core::policy::S3Store {
        bucket: "fleet".into(),
        prefix: "spans/".into(),
        endpoint: Some(s3.endpoint()),
        region: Some(s3.region().into()),
        force_path_style: true,
        access_key_id: Some(s3.access_key().into()),
        secret_access_key: Some(s3.secret_key().into()),
    };
    let reg = Registry::start_anonymous().unwrap();
    let image = push_sample(&reg);
    let a = tempfile::tempdir().unwrap();
    let store = ArchiveStore::Local(a.path().join("store"));
    let worker = |dir: &Path| {
        service(
            dir,
            Config {
                archive_store: store.clone(),
                span_store: Some(span_store.clone()),
                cache_min_free_percent: 0,
                ..config(dir, 2)
            },
        )
    };
    let want = clip_testkit::image::random_bytes(3, 3 << 20);
    let first = worker(a.path());
    let id = first.pull_and_archive(&image).unwrap().image_id;
    let m = first.pull_lazy(&id).unwrap();
    assert!(std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap() == want);
    let s1 = m.stats();
    first.unmount(&id).unwrap();
    assert!(s1.fetched_bytes > 0 && s1.span_store.hits == 0, "{s1:?}");
    // Unmounting waited for the uploads: the spans are under the configured prefix.
    let stored = std::fs::read_dir(s3.root().join("fleet/spans/spans"))
        .unwrap()
        .count() as u64;
    assert_eq!(stored, s1.spans_fetched, "{s1:?}");

    // A second worker (own span cache): the shared profile's prefetch and the read come from
    // the span store, not the registry.
    let b = tempfile::tempdir().unwrap();
    let second = worker(b.path());
    let m = second.pull_lazy(&id).unwrap();
    assert!(m.prefetched_shared_profile());
    m.wait_prefetch();
    assert!(std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap() == want);
    let s2 = m.stats();
    second.unmount(&id).unwrap();
    assert_eq!(s2.fetched_bytes, 0, "{s2:?}");
    assert_eq!(s2.span_store.hits, stored, "{s2:?}");
}

#[test]
fn a_build_can_record_the_profile_by_running_the_image_once_with_a_time_limit() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("context");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    std::fs::write(ctx.join("hello"), "read at start\n").unwrap();
    std::fs::write(ctx.join("unread"), "never read\n").unwrap();
    let dockerfile = ctx.join("Dockerfile");
    // The command reads one file, then would run forever: the time limit ends it.
    std::fs::write(
        &dockerfile,
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY hello /etc/hello\nCOPY unread /etc/unread\n\
         CMD [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox cat /etc/hello; exec /bin/busybox sleep 1000\"]\n",
    )
    .unwrap();
    let svc = service(
        dir.path(),
        Config {
            build_registry: reg.host(),
            build_registry_configured: true,
            profile_at_build_secs: 2,
            ..config(dir.path(), 2)
        },
    );
    let (r, logs) = with_logs(|| svc.build_and_archive(&dockerfile, &ctx, &[]).unwrap());
    assert_eq!(r.version.number(), 2, "{logs}");
    // Killed at the time limit (SIGKILL: 128 + 9).
    assert!(logs.contains("status=137"), "{logs}");
    assert!(svc.mounts().is_empty(), "the build's mount is gone");
    let path = dir
        .path()
        .join("store")
        .join(format!("{}.profile.json", r.image_id));
    let profile = clip_core::fs::Profile::load(&path).unwrap();
    let paths: Vec<&str> = profile.touches.iter().map(|t| t.path.as_str()).collect();
    assert!(paths.contains(&"/etc/hello"), "{paths:?}");
    assert!(!paths.contains(&"/etc/unread"), "{paths:?}");

    // The first pull elsewhere prefetches it.
    let m = svc.pull_lazy(&r.image_id).unwrap();
    assert!(m.prefetched_shared_profile());
    svc.unmount(&r.image_id).unwrap();
}

#[test]
fn a_later_run_that_reads_more_refines_the_shared_profile_a_bounded_number_of_times() {
    if !clip_testkit::require(clip_testkit::MOUNT) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let a_bytes = clip_testkit::image::random_bytes(11, 2 << 20);
    let b_bytes = clip_testkit::image::random_bytes(12, 2 << 20);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(vec![Layer::new(vec![
            Entry::file("opt/a.bin", a_bytes.clone()),
            Entry::file("opt/b.bin", b_bytes.clone()),
        ])]))
        .build()
        .unwrap();
    let image = reg.push(&built, "team/refine", "v1").unwrap().reference;
    let root = tempfile::tempdir().unwrap();
    let store_dir = root.path().join("store");
    let worker = |name: &str| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        service(
            &dir,
            Config {
                archive_store: ArchiveStore::Local(store_dir.clone()),
                cache_min_free_percent: 0,
                ..config(&dir, 2)
            },
        )
    };
    let gen_path = |id: &str, g: u32| {
        store_dir.join(if g == 1 {
            format!("{id}.profile.json")
        } else {
            format!("{id}.profile.{g}.json")
        })
    };
    let read = |m: &clip_core::service::MountedImage, p: &str, want: &[u8]| {
        assert!(std::fs::read(m.mountpoint.join(p)).unwrap() == want, "{p}");
    };

    // The first run reads a.bin: generation 1.
    let w1 = worker("w1");
    let id = w1.pull_and_archive(&image).unwrap().image_id;
    let m = w1.pull_lazy(&id).unwrap();
    read(&m, "opt/a.bin", &a_bytes);
    w1.unmount(&id).unwrap();
    assert!(gen_path(&id, 1).exists());

    // A run that prefetched it and also read b.bin publishes generation 2 (a + b).
    let w2 = worker("w2");
    let m = w2.pull_lazy(&id).unwrap();
    assert!(m.prefetched_shared_profile());
    read(&m, "opt/a.bin", &a_bytes);
    read(&m, "opt/b.bin", &b_bytes);
    w2.unmount(&id).unwrap();
    let g2 = clip_core::fs::Profile::load(&gen_path(&id, 2)).unwrap();
    let paths: std::collections::BTreeSet<&str> =
        g2.touches.iter().map(|t| t.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/opt/a.bin", "/opt/b.bin"].into_iter().collect(),
        "{g2:?}"
    );

    // The next worker prefetches generation 2: reading b.bin costs no fetch.
    let w3 = worker("w3");
    let m = w3.pull_lazy(&id).unwrap();
    m.wait_prefetch();
    let prefetched = m.stats();
    read(&m, "opt/a.bin", &a_bytes);
    read(&m, "opt/b.bin", &b_bytes);
    assert_eq!(m.stats().requests, prefetched.requests, "{:?}", m.stats());
    w3.unmount(&id).unwrap();
    // It read nothing new: no generation 3.
    assert!(!gen_path(&id, 3).exists());

    // Bounded: with four generations present (the newest naming a.bin only), a run that reads
    // more publishes nothing.
    std::fs::copy(gen_path(&id, 1), gen_path(&id, 3)).unwrap();
    std::fs::copy(gen_path(&id, 1), gen_path(&id, 4)).unwrap();
    let w4 = worker("w4");
    let m = w4.pull_lazy(&id).unwrap();
    read(&m, "opt/a.bin", &a_bytes);
    read(&m, "opt/b.bin", &b_bytes);
    w4.unmount(&id).unwrap();
    assert!(!gen_path(&id, 5).exists());
}

/// A hostile image's working directory goes through a symlink to `/`: the root worker creates
/// it inside the container's rootfs, never on the host (#33).
#[test]
fn a_symlinked_working_directory_stays_inside_the_container() {
    if !clip_testkit::require(&[
        clip_testkit::Need::Root,
        clip_testkit::Need::Fuse,
        clip_testkit::Need::Program("runc"),
    ]) {
        return;
    }
    let host = std::path::PathBuf::from(format!("/var/tmp/clip-escape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&host);
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut img = Image::new(vec![Layer::new(vec![
        Entry::file("bin/busybox", busybox).mode(0o755),
        Entry::symlink("bin/sh", "busybox"),
        Entry::symlink("w", "/"),
    ])]);
    img.config.cmd = vec!["/bin/sh".into(), "-c".into(), "/bin/busybox pwd -P".into()];
    img.config.working_dir = format!("/w{}", host.display());
    let reg = Registry::start_anonymous().unwrap();
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    let image = reg.push(&built, "evil/workdir", "v1").unwrap().reference;
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path(), config(dir.path(), 2));
    let id = svc.pull_and_archive(&image).unwrap().image_id;
    let out = svc.run(&id, None).unwrap();
    assert_eq!(out.status, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), host.display().to_string());
    assert!(
        !host.exists(),
        "the image's working directory was created on the host"
    );
    svc.unmount(&id).unwrap();
}

/// Whoever can write the shared bucket cannot hand a node an archive or a layer index: objects
/// not signed by a trusted key are refused (the archive replaced by the node's own, the layer
/// indexed again), and the node's tree is the image's (#33).
#[test]
fn rewritten_archives_and_layer_indexes_in_a_shared_store_are_refused() {
    if !clip_testkit::require(clip_testkit::MOUNT) {
        return;
    }
    let s3 = clip_testkit::S3::start().unwrap();
    s3.create_bucket("fleet").unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let image = push_sample(&reg);
    let top = tempfile::tempdir().unwrap();
    let key = fleet_key(top.path());
    let store = ArchiveStore::S3(clip_core::policy::S3Store {
        bucket: "fleet".into(),
        prefix: "p/".into(),
        endpoint: Some(s3.endpoint()),
        region: Some(s3.region().into()),
        force_path_style: true,
        access_key_id: Some(s3.access_key().into()),
        secret_access_key: Some(s3.secret_key().into()),
    });
    let node = |name: &str| {
        let dir = top.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = Config {
            archive_store: store.clone(),
            signing_key: Some(key.clone()),
            ..config(&dir, 2)
        };
        service(&dir, cfg)
    };
    let first = node("a");
    let id = first.pull_and_archive(&image).unwrap().image_id;
    drop(first);
    let bucket = s3.root().join("fleet/p");
    let archive = bucket.join(format!("{id}.clip"));
    let signed = std::fs::read(&archive).unwrap();
    assert!(clip_core::objstore::signed::is_signed(&signed));
    // The writer: the archive's header stripped (a genuine archive, unsigned), every layer
    // index altered under its signature.
    std::fs::write(&archive, &signed[clip_core::objstore::signed::HEADER_LEN..]).unwrap();
    let mut layers = 0;
    for e in std::fs::read_dir(bucket.join("layers")).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x55;
        std::fs::write(&p, b).unwrap();
        layers += 1;
    }
    assert_eq!(layers, 2);

    let second = node("b");
    let (r, logs) = with_logs(|| second.pull_and_archive(&image).unwrap());
    assert!(!r.reused, "an unsigned archive was reused: {r:?}");
    // Both layer indexes were in the store; neither was used (the refusal is logged on the
    // indexing threads, which these captured logs do not see).
    assert_eq!(r.reused_layers, 0, "{logs}");
    assert!(logs.contains("stored archive refused"), "{logs}");
    // B replaced the archive with its own, signed; a third node reuses it.
    assert!(clip_core::objstore::signed::is_signed(
        &std::fs::read(&archive).unwrap()
    ));
    let third = node("c");
    assert!(third.pull_and_archive(&image).unwrap().reused);
    // The store's listing reads through the signature header.
    let listed = third.images().unwrap();
    assert!(
        listed
            .iter()
            .any(|a| a.image_id == id && a.version.number() == 2 && a.bytes > 0),
        "{listed:?}"
    );
    let m = third.pull_lazy(&id).unwrap();
    assert_eq!(
        std::fs::read(m.mountpoint.join("usr/share/data.bin")).unwrap(),
        clip_testkit::image::random_bytes(3, 3 << 20)
    );
    third.unmount(&id).unwrap();

    // A node that trusts only another key refuses the fleet's archive.
    let dir = top.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let (_, other) = clip_core::objstore::signed::SigningKey::generate().unwrap();
    let fourth = service(
        &dir,
        Config {
            archive_store: store,
            trusted_keys: vec![other.public().to_string()],
            ..config(&dir, 2)
        },
    );
    let (_, logs) = with_logs(|| fourth.pull_and_archive(&image));
    assert!(logs.contains("not in trustedKeys"), "{logs}");
}

/// A worker attaches what it indexed to the image in its registry, signed with the fleet's key;
/// another worker with its own store and an empty cache finds it and streams no layer. A
/// worker that does not trust the key, or a second attach of the same image, uses or makes
/// nothing new.
#[test]
fn an_attached_signed_index_is_found_by_every_worker_that_trusts_the_key() {
    let reg = Registry::start_anonymous().unwrap();
    let image = push_sample(&reg);
    let keys = tempfile::tempdir().unwrap();
    let key = fleet_key(keys.path());
    let public = clip_core::objstore::signed::SigningKey::load(&key)
        .unwrap()
        .public()
        .to_string();

    let a = tempfile::tempdir().unwrap();
    let mut cfg = config(a.path(), 2);
    cfg.signing_key = Some(key.clone());
    let first = service(a.path(), cfg);
    let r = first.pull_and_archive(&image).unwrap();
    assert_eq!((r.reused_layers, r.attached_layers), (0, 0));
    let attached = first.attach_index(&image).unwrap().expect("attached");
    assert_eq!(attached.layers, 2);
    assert!(
        first.attach_index(&image).unwrap().is_none(),
        "attached once"
    );

    // Another worker, its own store and cache, trusting the fleet's key.
    let b = tempfile::tempdir().unwrap();
    let mut cfg = config(b.path(), 2);
    cfg.trusted_keys = vec![public];
    let second = service(b.path(), cfg);
    let r = second.pull_and_archive(&image).unwrap();
    assert_eq!((r.reused_layers, r.attached_layers), (2, 2), "{r:?}");

    // A worker that trusts no key (signatures required by default): indexes the image itself.
    let c = tempfile::tempdir().unwrap();
    let third = service(c.path(), config(c.path(), 2));
    let (r, logs) = with_logs(|| third.pull_and_archive(&image).unwrap());
    assert!(logs.contains("found attached layer indexes"), "{logs}");
    assert_eq!((r.reused_layers, r.attached_layers), (0, 0), "{r:?}");
}
