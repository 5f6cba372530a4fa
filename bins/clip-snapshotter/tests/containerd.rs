//! The snapshotter under Debian's containerd 1.6, with real images from the testkit registry.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clip_testkit::{Containerd, ContainerdOptions, Entry, Image, ImageBuilder, Layer, Registry};

/// What these tests need from the machine.
const NEEDS: &[clip_testkit::Need] = &[
    clip_testkit::Need::Root,
    clip_testkit::Need::Fuse,
    clip_testkit::Need::Program("containerd"),
    clip_testkit::Need::Program("ctr"),
];

/// A running `clip-snapshotter`; on drop it is killed and its lazy mounts detached.
struct Snapshotter {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Snapshotter {
    fn start(dir: &Path) -> Self {
        let root = dir.join("snap-root");
        let socket = dir.join("snap.sock");
        let config = dir.join("snapshotter.yaml");
        if !config.exists() {
            std::fs::write(
                &config,
                format!(
                    "imageService:\n  cacheDir: {}\n  cacheSizeGiB: 1\n  checkpointMiB: 1\n",
                    dir.join("cache").display()
                ),
            )
            .unwrap();
        }
        let mut s = Self {
            child: None,
            root,
            socket,
            config,
            log: dir.join("snapshotter.log"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(env!("CARGO_BIN_EXE_clip-snapshotter"))
            .arg("--address")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .env("CLIP_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        // Listening, not just bound (the path exists a moment before connects succeed).
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "snapshotter did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.kill();
        clip_testkit::containerd::detach_mounts_under(&self.root);
        if std::thread::panicking() {
            eprintln!("---- snapshotter log ----\n{}\n---- end ----", self.log());
        }
    }
}

/// An image that runs: busybox in the base layer, a file on top.
fn busybox_image(greeting: &str) -> ImageBuilder {
    let base = clip_testkit::image::busybox_base();
    let top = Layer::new(vec![Entry::file("etc/greeting", greeting)]);
    ImageBuilder::new(clip_testkit::ManifestFormat::Oci).image(Image::new(vec![base, top]))
}

/// A fresh containerd whose proxy plugin `clip` is `snap`.
fn containerd_with(snap: &Snapshotter) -> Containerd {
    Containerd::start(&ContainerdOptions {
        snapshotter_socket: Some(snap.socket.clone()),
        ..ContainerdOptions::default()
    })
    .unwrap()
}

/// A container id unique on this machine (runc keeps its state under one global root).
fn cid(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// `ctr ARGS`, retried while containerd's connection to a restarted snapshotter is still in
/// gRPC's reconnect backoff ("unavailable"), as kubelet retries.
fn ctr_retrying(ctd: &Containerd, args: &[&str]) -> std::process::Output {
    let start = Instant::now();
    loop {
        match ctd.ctr(args) {
            Ok(o) => return o,
            Err(e)
                if e.to_string().contains("unavailable")
                    && start.elapsed() < Duration::from_mins(1) =>
            {
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Without lazy-pull labels (`ctr image pull` sends none), layers are unpacked into ordinary
/// overlay snapshots; the image runs, and removing it removes its snapshots.
#[test]
fn plain_ctr_pull_and_run_use_ordinary_overlay_snapshots() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let pushed = reg
        .push(
            &busybox_image("plain\n").build().unwrap(),
            "test/plain",
            "v1",
        )
        .unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctd = containerd_with(&snap);
    ctd.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "clip",
        &pushed.reference,
    ])
    .unwrap();
    let o = ctd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &pushed.reference,
            &cid("plain"),
            "/bin/cat",
            "/etc/greeting",
        ])
        .unwrap();
    assert_eq!(stdout(&o), "plain\n");
    assert!(snap.log().contains("layer not lazy") || !snap.log().contains("lazily"));
    let listed = stdout(
        &ctd.ctr(&["snapshots", "--snapshotter", "clip", "ls"])
            .unwrap(),
    );
    assert_eq!(
        listed.lines().count(),
        3,
        "header and two layers:\n{listed}"
    );
    ctd.ctr(&["image", "rm", "--sync", &pushed.reference])
        .unwrap();
    let listed = stdout(
        &ctd.ctr(&["snapshots", "--snapshotter", "clip", "ls"])
            .unwrap(),
    );
    assert_eq!(listed.lines().count(), 1, "{listed}");
    drop(ctd);
}

/// `clip containerd pull` (the library it is a thin wrapper of), as JSON-ish counts.
fn lazy_pull(ctd: &Containerd, reference: &str) -> clip_containerd::pull::PullSummary {
    try_pull(ctd, reference, clip_core::registry::ClientConfig::default()).unwrap()
}

/// `clip containerd pull` of `reference` through the clip snapshotter, with `client`'s settings.
fn try_pull(
    ctd: &Containerd,
    reference: &str,
    client: clip_core::registry::ClientConfig,
) -> anyhow::Result<clip_containerd::pull::PullSummary> {
    let net = clip_core::registry::BlockingClient::new(client)?;
    let opts = clip_containerd::pull::PullOptions {
        address: ctd.address().to_owned(),
        namespace: "default".into(),
        snapshotter: "clip".into(),
        platform: None,
    };
    Ok(net.block_on(clip_containerd::pull::pull(reference, net.client(), &opts))?)
}

/// The busybox image with the testkit's edge-case layers on top: every entry kind and merge
/// rule, in a container (gzip and plain layers: this umoci predates zstd).
fn edge_busybox() -> ImageBuilder {
    let mut entries = clip_testkit::image::busybox_entries(&["sh", "cat", "sleep"]);
    entries.push(Entry::file("etc/greeting", "lazy\n"));
    let mut layers = vec![Layer::new(entries)];
    layers.extend(
        clip_testkit::image::edge_image([
            clip_testkit::Compression::Gzip,
            clip_testkit::Compression::GzipMultiMember(3),
            clip_testkit::Compression::None,
        ])
        .layers,
    );
    ImageBuilder::new(clip_testkit::ManifestFormat::Oci).image(Image::new(layers))
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// `clip containerd pull` puts only the manifest and config into containerd and commits every
/// layer lazily; `ctr run --snapshotter clip` runs the image, its root filesystem equals
/// umoci's unpack, and containers of one image share one mount.
#[test]
fn clip_containerd_pull_then_ctr_run_is_lazy_and_equals_umoci() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    clip_testkit::oracle::require_oracle_tools().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let image = edge_busybox();
    let built = image.build().unwrap();
    let pushed = reg.push(&built, "test/lazy", "v1").unwrap();
    let expected = clip_testkit::Snapshot::scan(
        &clip_testkit::oracle::oracle_unpack(
            &reg,
            "test/lazy:v1",
            &dir.path().join("oracle"),
            None,
        )
        .unwrap(),
    )
    .unwrap();
    // The fleet's span store: the node's lazy tree uploads what it fetches.
    let s3 = clip_testkit::S3::start().unwrap();
    s3.create_bucket("fleet").unwrap();
    std::fs::write(
        dir.path().join("snapshotter.yaml"),
        format!(
            "imageService:\n  cacheDir: {}\n  cacheSizeGiB: 1\n  checkpointMiB: 1\n  \
             spanStore:\n    s3: {{bucket: fleet, prefix: node, endpoint: \"{}\", region: {}, \
             forcePathStyle: true, accessKeyId: {}, secretAccessKey: {}}}\n",
            dir.path().join("cache").display(),
            s3.endpoint(),
            s3.region(),
            s3.access_key(),
            s3.secret_key()
        ),
    )
    .unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctd = containerd_with(&snap);
    let s = lazy_pull(&ctd, &pushed.reference);
    let layers = built.manifests[0].layers.len();
    assert_eq!(s.lazy_layers, layers, "{s:?}");
    // containerd holds the manifest and config, no layer.
    let content = stdout(&ctd.ctr(&["content", "ls", "-q"]).unwrap());
    for l in &built.manifests[0].layers {
        assert!(
            !content.contains(&l.blob.digest),
            "layer {} was downloaded",
            l.blob.digest
        );
    }
    assert!(
        content.contains(&built.manifests[0].config.digest),
        "{content}"
    );
    // A second pull finds everything in place.
    let s = lazy_pull(&ctd, &pushed.reference);
    assert_eq!(s.existing_layers, layers, "{s:?}");

    let o = ctd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &pushed.reference,
            &cid("c1"),
            "/bin/cat",
            "/etc/greeting",
        ])
        .unwrap();
    assert_eq!(stdout(&o), "lazy\n");
    // A running container's root filesystem, as the host sees it, equals umoci's unpack
    // (the runtime adds the mount points /proc, /dev, /sys, /run).
    let c2 = cid("c2");
    ctd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "clip",
        &pushed.reference,
        &c2,
        "/bin/sleep",
        "60",
    ])
    .unwrap();
    let rootfs = ctd.task_rootfs("default", &c2);
    let actual = clip_testkit::Snapshot::scan(&rootfs).unwrap();
    let diffs = expected.compare(
        &actual,
        &clip_testkit::CompareOptions {
            ignore: vec!["proc".into(), "dev".into(), "sys".into(), "run".into()],
            ..clip_testkit::CompareOptions::default()
        },
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    ctd.ctr(&["task", "kill", "-s", "SIGKILL", &c2]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = ctd.ctr(&["task", "rm", "-f", &c2]);
    ctd.ctr(&["container", "rm", &c2]).unwrap();
    assert_eq!(
        snap.log().matches("lazy tree mounted").count(),
        1,
        "one mount for the image:\n{}",
        snap.log()
    );
    let in_root = |d: &str| {
        std::fs::read_dir(dir.path().join("snap-root").join(d)).map_or(0, Iterator::count)
    };
    assert!(in_root("archives") > 0 && in_root("logs") > 0);
    // Removing the image removes its snapshots and unmounts its tree.
    ctd.ctr(&["image", "rm", "--sync", &pushed.reference])
        .unwrap();
    let start = Instant::now();
    while snap.log().matches("lazy tree unmounted").count() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not unmounted:\n{}",
            snap.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What the tree fetched is in the span store (uploaded before its mount server exited),
    // and so is the profile of what its containers read, for other nodes to prefetch.
    let count = |d: &str| std::fs::read_dir(s3.root().join(d)).map_or(0, Iterator::count);
    let start = Instant::now();
    while count("fleet/node/spans") == 0 || count("fleet/node/profiles") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no span or profile in the store:\n{}",
            snap.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let profile = std::fs::read_dir(s3.root().join("fleet/node/profiles"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let p = clip_core::fs::Profile::load(&profile).unwrap();
    assert!(p.touches.iter().any(|t| t.path == "/etc/greeting"), "{p:?}");
    // Cleanup (containerd's after its GC, or asked) collects what no snapshot uses any more:
    // the tree archives and their logs.
    let count = in_root;
    let rt = clip_testkit::runtime();
    rt.block_on(async {
        use clip_containerd::api::containerd::services::snapshots::v1 as pb;
        let mut c = pb::snapshots_client::SnapshotsClient::new(
            clip_containerd::pull::connect(&snap.socket).await.unwrap(),
        );
        c.cleanup(pb::CleanupRequest {
            snapshotter: "clip".into(),
        })
        .await
        .unwrap();
    });
    assert_eq!(
        (count("archives"), count("logs"), count("mnt")),
        (0, 0, 0),
        "{}",
        snap.log()
    );
}

/// The pids of this snapshotter's mount servers.
fn mount_servers(root: &Path) -> Vec<i32> {
    let needle = root.join("archives").display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (text.contains("mount-server") && text.contains(&needle))
                .then(|| p.file_name().to_string_lossy().parse().ok())
                .flatten()
        })
        .collect()
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// `kill -9` of the snapshotter while a container reads its image: the container finishes
/// (the tree's server is a process of its own), the restarted snapshotter adopts the live mount,
/// and new containers start. A tree whose server died is mounted again at the next start.
#[test]
fn a_killed_snapshotter_leaves_running_containers_alone() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let pushed = reg
        .push(&edge_busybox().build().unwrap(), "test/restart", "v1")
        .unwrap();
    let mut snap = Snapshotter::start(dir.path());
    let ctd = containerd_with(&snap);
    lazy_pull(&ctd, &pushed.reference);
    let reader = cid("reader");
    let script = "i=0; while [ $i -lt 60 ]; do busybox cat /etc/greeting /bin/busybox > /dev/null || exit 7; i=$((i+1)); busybox sleep 0.05; done; echo finished";
    let address = ctd.address().to_owned();
    let reference = pushed.reference.clone();
    let r2 = reader.clone();
    let run = std::thread::spawn(move || {
        Command::new("ctr")
            .arg("--address")
            .arg(&address)
            .args([
                "run",
                "--rm",
                "--snapshotter",
                "clip",
                &reference,
                &r2,
                "/bin/sh",
                "-c",
                script,
            ])
            .output()
            .unwrap()
    });
    // Once it runs, kill the snapshotter hard and start it again.
    let start = Instant::now();
    while !ctd.task_rootfs("default", &reader).join("etc").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "container never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    snap.kill();
    let servers = mount_servers(&snap.root);
    assert_eq!(
        servers.len(),
        1,
        "the tree's server outlives the snapshotter"
    );
    std::thread::sleep(Duration::from_millis(500));
    snap.spawn();
    let out = run.join().unwrap();
    assert!(
        out.status.success() && stdout(&out).contains("finished"),
        "{}\n{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        snap.log().contains("adopted a live lazy mount"),
        "{}",
        snap.log()
    );
    let o = ctr_retrying(
        &ctd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &pushed.reference,
            &cid("after"),
            "/bin/cat",
            "/etc/greeting",
        ],
    );
    assert_eq!(stdout(&o), "lazy\n");

    // A server that dies with the snapshotter down: remounted at the next start, because a
    // committed snapshot of the image still needs the tree.
    snap.kill();
    for pid in mount_servers(&snap.root) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    std::thread::sleep(Duration::from_millis(300));
    snap.spawn();
    let start = Instant::now();
    while !snap.log().contains("remounted a dead lazy mount") {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", snap.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = ctr_retrying(
        &ctd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &pushed.reference,
            &cid("again"),
            "/bin/cat",
            "/etc/greeting",
        ],
    );
    assert_eq!(stdout(&o), "lazy\n");
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// Bad input: a registry that is down when a layer is prepared (an ordinary snapshot with one
/// log line saying why, nothing committed lazily), a parent that is another snapshotter's (`NotFound`), filters it cannot parse
/// (`InvalidArgument`), and a configuration with unknown keys (the snapshotter refuses to start).
#[test]
fn bad_input_gets_clear_errors_and_leaves_nothing_behind() {
    use clip_containerd::api::containerd::services::snapshots::v1 as pb;
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::start_anonymous().unwrap();
    let built = busybox_image("down\n").build().unwrap();
    let pushed = reg.push(&built, "test/down", "v1").unwrap();
    let host = reg.host();
    reg.stop();
    let snap = Snapshotter::start(dir.path());
    let rt = clip_testkit::runtime();
    let mut client = rt.block_on(async {
        pb::snapshots_client::SnapshotsClient::new(
            clip_containerd::pull::connect(&snap.socket).await.unwrap(),
        )
    });
    let layer = &built.manifests[0].layers[0];
    let labels = std::collections::HashMap::from([
        (
            "containerd.io/snapshot.ref".to_owned(),
            "sha256:chain0".to_owned(),
        ),
        (
            "containerd.io/snapshot/cri.image-ref".to_owned(),
            pushed.reference.clone(),
        ),
        (
            "containerd.io/snapshot/cri.manifest-digest".to_owned(),
            built.manifests[0].manifest.digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.layer-digest".to_owned(),
            layer.blob.digest.clone(),
        ),
    ]);
    // The registry is down: the layer is not lazy, and the pull goes on the ordinary way (an
    // active snapshot for containerd to unpack into), with one log line saying why.
    let mounts = rt
        .block_on(client.prepare(pb::PrepareSnapshotRequest {
            snapshotter: "clip".into(),
            key: "default/1/extract-x".into(),
            parent: String::new(),
            labels,
        }))
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let log = snap.log();
    assert!(
        log.contains("layer not lazy") && log.contains(&host) && log.contains("not reachable"),
        "{log}"
    );
    let listed: Vec<pb::Info> = rt.block_on(async {
        let mut s = client
            .list(pb::ListSnapshotsRequest {
                snapshotter: "clip".into(),
                filters: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        let mut all = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            all.extend(m.info);
        }
        all
    });
    assert!(
        listed
            .iter()
            .all(|i| i.name == "default/1/extract-x" && i.kind == pb::Kind::Active as i32),
        "nothing committed: {listed:?}"
    );
    rt.block_on(client.remove(pb::RemoveSnapshotRequest {
        snapshotter: "clip".into(),
        key: "default/1/extract-x".into(),
    }))
    .unwrap();

    let err = rt
        .block_on(client.prepare(pb::PrepareSnapshotRequest {
            snapshotter: "clip".into(),
            key: "default/2/c".into(),
            parent: "default/9/sha256:of-overlayfs".into(),
            labels: std::collections::HashMap::new(),
        }))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let err = rt
        .block_on(client.list(pb::ListSnapshotsRequest {
            snapshotter: "clip".into(),
            filters: vec!["name~=x".into()],
        }))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "imageService:\n  cacheDir: /tmp/x\n  spanCache: 3\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_clip-snapshotter"))
        .args(["--address", "/tmp/never.sock", "--root"])
        .arg(dir.path().join("other-root"))
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown field") && err.contains("spanCache"),
        "{err}"
    );
}

/// The Kubernetes path: containerd's CRI plugin with `snapshotter = "clip"` and snapshot
/// annotations on. `ImageService/PullImage` — the call kubelet makes — pulls lazily (containerd
/// downloads no layer blob), and a container then runs on the image.
#[test]
fn cri_pull_image_is_lazy_and_a_container_runs_on_it() {
    use clip_containerd::api::runtime::v1 as cri;
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let app_built = busybox_image("from a pod\n").build().unwrap();
    let app = reg.push(&app_built, "test/app", "v1").unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctd = Containerd::start(&ContainerdOptions {
        snapshotter_socket: Some(snap.socket.clone()),
        cri_snapshotter: Some("clip".into()),
        plain_http_registries: vec![reg.host()],
        ..ContainerdOptions::default()
    })
    .unwrap();
    let rt = clip_testkit::runtime();
    let channel = rt
        .block_on(clip_containerd::pull::connect(ctd.address()))
        .unwrap();
    let mut images = cri::image_service_client::ImageServiceClient::new(channel);

    let pulled = rt
        .block_on(images.pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: app.reference.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert!(!pulled.image_ref.is_empty());
    // containerd fetched the manifest and config only (clip's own indexing reads blobs too,
    // without containerd's user agent).
    let containerd_blob_gets: Vec<String> = reg
        .log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/test/app/blobs/") && l.contains("containerd"))
        .map(str::to_owned)
        .collect();
    let config = &app_built.manifests[0].config.digest;
    assert!(
        containerd_blob_gets.iter().all(|l| l.contains(config)),
        "containerd downloaded a layer:\n{}",
        containerd_blob_gets.join("\n")
    );
    assert!(
        snap.log().contains("layer committed lazily"),
        "{}",
        snap.log()
    );

    // A container on the image kubelet pulled (namespace k8s.io, CRI's snapshots). The pod
    // itself cannot be started on this machine: its runc shim dies under the CRI sandbox spec
    // (a cgroup-v1 sandbox that also forbids negative oom_score_adj), so the container is run
    // with ctr on the same image record and snapshot chain.
    let o = ctd
        .ctr(&[
            "-n",
            "k8s.io",
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &app.reference,
            &cid("pod-app"),
            "/bin/cat",
            "/etc/greeting",
        ])
        .unwrap();
    assert_eq!(stdout(&o), "from a pod\n");
    let unpacked = stdout(
        &ctd.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "clip", "ls"])
            .unwrap(),
    );
    assert!(unpacked.lines().count() >= 3, "{unpacked}");
}

/// A setuid-root program of a lazily pulled image runs as root on the root filesystem the
/// snapshotter gives a container (an overlay that honours the bit, as docker's and containerd's
/// do), although the image's clip mount on the host is `nosuid` (where it runs with the caller's
/// ids). The mounts are taken from the snapshotter and mounted by hand, then the program is run
/// as nobody: `ctr run` cannot show it, its default spec sets `no_new_privs` (Kubernetes' does not,
/// unless `allowPrivilegeEscalation: false`).
#[test]
fn setuid_programs_work_in_snapshotter_containers() {
    use clip_containerd::api::containerd::services::snapshots::v1 as pb;
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // nobody must reach the mount points below.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ids = clip_testkit::probe::ids_program().unwrap();
    let img = Image::new(vec![Layer::new(vec![
        Entry::dir("bin"),
        Entry::file("bin/ids", ids).mode(0o4755).owner(0, 0),
    ])]);
    let reg = Registry::start_anonymous().unwrap();
    let built = ImageBuilder::new(clip_testkit::ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    let pushed = reg.push(&built, "test/setuid", "v1").unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctd = containerd_with(&snap);
    lazy_pull(&ctd, &pushed.reference);
    // A single layer: its chain id is its diff_id.
    let chain = built.manifests[0].layers[0].diff_id.clone();
    let rt = clip_testkit::runtime();
    let mut client = rt.block_on(async {
        pb::snapshots_client::SnapshotsClient::new(
            clip_containerd::pull::connect(&snap.socket).await.unwrap(),
        )
    });
    let mounts = rt
        .block_on(client.prepare(pb::PrepareSnapshotRequest {
            snapshotter: "clip".into(),
            key: "test/container".into(),
            parent: chain,
            labels: std::collections::HashMap::new(),
        }))
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "overlay");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let status = Command::new("mount")
        .args([
            "-t",
            "overlay",
            "overlay",
            "-o",
            &mounts[0].options.join(","),
        ])
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(status.success());
    let in_container = clip_testkit::probe::run_as_nobody(&rootfs.join("bin/ids"), &[]);
    let _ = Command::new("umount").arg(&rootfs).status();
    assert_eq!(
        in_container.unwrap().trim(),
        "65534 0",
        "effective uid root"
    );
    // On the host, the tree's mount is nosuid: the same program runs with the caller's ids.
    let mnt = std::fs::read_dir(snap.root.join("mnt"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let out = clip_testkit::probe::run_as_nobody(&mnt.join("bin/ids"), &[]).unwrap();
    assert_eq!(out.trim(), "65534 65534");
}

/// Chain-id poisoning (#33): an image whose config copies a victim's `diff_ids` but ships its
/// own top layer (gzip, and eStargz, whose TOC alone would never check the `diff_id`) is not committed
/// under the victim's chain id on this node; the victim pulled afterwards runs its own files.
#[test]
fn a_layer_is_committed_under_a_chain_id_only_for_content_that_matches_it() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let image = |who: &str, c: clip_testkit::Compression| {
        // A base layer both images share (the attacker copies it), and a top layer of each.
        ImageBuilder::new(clip_testkit::ManifestFormat::Oci).image(Image::new(vec![
            Layer::new(vec![
                Entry::dir("bin"),
                Entry::file("bin/busybox", busybox.clone()).mode(0o755),
                Entry::symlink("bin/cat", "busybox"),
            ])
            .compression(c),
            Layer::new(vec![Entry::file("etc/who", format!("{who}\n"))]).compression(c),
        ]))
    };
    for (n, c) in [
        clip_testkit::Compression::Gzip,
        clip_testkit::Compression::EStargz(64 << 10),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::start_anonymous().unwrap();
        let victim = image("victim", c).build().unwrap();
        let mut evil = image("attacker", c).build().unwrap();
        let diff_ids: Vec<String> = victim.manifests[0]
            .layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect();
        evil.forge_diff_ids(&diff_ids).unwrap();
        let evil = reg.push(&evil, "evil/app", "v1").unwrap();
        let victim = reg.push(&victim, "good/app", "v1").unwrap();
        let snap = Snapshotter::start(dir.path());
        let ctd = containerd_with(&snap);
        let attack = try_pull(
            &ctd,
            &evil.reference,
            clip_core::registry::ClientConfig::default(),
        );
        let err = format!("{:#}", attack.expect_err("the forged image was pulled"));
        assert!(err.contains("wrong diff id"), "{err}");
        assert!(
            snap.log().contains("layer not lazy"),
            "the forged layer was committed lazily:\n{}",
            snap.log()
        );
        // The shared base may have been committed lazily by the attacker's pull (its content is
        // what its diff_id says; containerd's GC may have removed it since the pull failed);
        // the victim's own top layer is lazy now.
        let s = lazy_pull(&ctd, &victim.reference);
        assert_eq!(
            (s.existing_layers + s.lazy_layers, s.applied_layers),
            (2, 0),
            "{s:?}"
        );
        let o = ctd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "clip",
                &victim.reference,
                &cid(&format!("poison-{n}")),
                "/bin/cat",
                "/etc/who",
            ])
            .unwrap();
        assert_eq!(stdout(&o), "victim\n");
    }
}

/// A layer the snapshotter cannot serve lazily (here: a private registry whose credentials only
/// the pulling client has) degrades to the ordinary path, and `clip containerd pull` streams its
/// 100 MB blob to containerd in bounded messages (one message of it would pass containerd's
/// 16 MiB gRPC limit) — the pull succeeds and the container runs (#33).
#[test]
fn a_layer_the_snapshotter_cannot_serve_is_streamed_to_containerd() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(clip_testkit::RegistryOptions {
        auth: clip_testkit::Auth::Basic {
            username: "ci".into(),
            password: "secret".into(),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    let mut entries = clip_testkit::image::busybox_entries(&["cat"]);
    entries.extend([
        Entry::file("etc/who", "private\n"),
        Entry::file(
            "opt/big.bin",
            clip_testkit::image::random_bytes(7, 100 << 20),
        ),
    ]);
    let built = ImageBuilder::new(clip_testkit::ManifestFormat::Oci)
        .image(Image::new(vec![Layer::new(entries)]))
        .build()
        .unwrap();
    let pushed = reg.push(&built, "private/app", "v1").unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctd = containerd_with(&snap);
    let with_creds = clip_core::registry::ClientConfig {
        credentials: vec![(
            reg.host(),
            clip_core::registry::Credentials::Basic {
                username: "ci".into(),
                password: "secret".into(),
            },
        )],
        ..clip_core::registry::ClientConfig::default()
    };
    let s = try_pull(&ctd, &pushed.reference, with_creds).unwrap();
    assert_eq!((s.lazy_layers, s.applied_layers), (0, 1), "{s:?}");
    assert!(snap.log().contains("layer not lazy"), "{}", snap.log());
    let o = ctd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &pushed.reference,
            &cid("private"),
            "/bin/cat",
            "/etc/who",
        ])
        .unwrap();
    assert_eq!(stdout(&o), "private\n");
}

/// The index travels with the image: an image whose layer indexes are attached in its registry,
/// signed with the fleet's key, is prepared lazily by a node that trusts the key without
/// streaming any layer; the same attachment unsigned is refused (the tree is committed under
/// chain ids other pulls trust) and the node indexes the image itself.
#[test]
fn a_signed_attachment_spares_the_node_streaming_the_layers() {
    use clip_core::indexer::{DirLayerStore, IndexOptions, Input, attach, index};
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    // Two images (other chain ids): one attached signed, one unsigned.
    let image = |greeting: &str| {
        let mut entries = clip_testkit::image::busybox_entries(&["sh", "cat"]);
        entries.push(Entry::file("etc/greeting", greeting));
        ImageBuilder::new(clip_testkit::ManifestFormat::Oci)
            .image(Image::new(vec![
                Layer::new(entries),
                Layer::new(vec![Entry::file(
                    "opt/data.bin",
                    clip_testkit::image::random_bytes(5, 2 << 20),
                )]),
            ]))
            .build()
            .unwrap()
    };
    let signed = reg
        .push(&image("attached\n"), "fleet/signed", "v1")
        .unwrap();
    let unsigned = reg
        .push(&image("unsigned\n"), "fleet/unsigned", "v1")
        .unwrap();
    // CI (or index on push) indexes the image once and attaches its layer indexes.
    let ci = tempfile::tempdir().unwrap();
    let (key_text, key) = clip_core::objstore::signed::SigningKey::generate().unwrap();
    let net =
        clip_core::registry::BlockingClient::new(clip_core::registry::ClientConfig::default())
            .unwrap();
    let store = DirLayerStore::new(ci.path().join("layers"));
    let span = 1 << 20;
    for (image, seal) in [(&signed.reference, true), (&unsigned.reference, false)] {
        let opts = IndexOptions {
            checkpoint_bytes: span,
            layer_store: Some(std::sync::Arc::new(store.clone())),
            ..IndexOptions::default()
        };
        let input = Input::Registry {
            reference: image,
            client: &net,
        };
        index(input, &ci.path().join("a.clip"), &opts, None).unwrap();
        let sealer = |k: &str, b: &[u8]| key.seal(k, b);
        attach(&net, image, None, &store, span, seal.then_some(&sealer)).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("snapshotter.yaml"),
        format!(
            "imageService:\n  cacheDir: {}\n  cacheSizeGiB: 1\n  checkpointMiB: 1\n  trustedKeys: [\"{}\"]\n",
            dir.path().join("cache").display(),
            key.public()
        ),
    )
    .unwrap();
    drop(key_text);
    let snap = Snapshotter::start(dir.path());
    let ctd = containerd_with(&snap);
    let s = lazy_pull(&ctd, &signed.reference);
    assert_eq!(s.lazy_layers, 2, "{s:?}");
    let log = snap.log();
    assert!(log.contains("found attached layer indexes"), "{log}");
    assert!(log.contains("layers_reused=2"), "nothing streamed: {log}");
    let o = ctd
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &signed.reference,
            &cid("attached"),
            "cat",
            "/etc/greeting",
        ])
        .unwrap();
    assert_eq!(stdout(&o), "attached\n");

    // Unsigned: refused, the image is indexed here (its layers streamed), still lazily.
    let s = lazy_pull(&ctd, &unsigned.reference);
    assert_eq!(s.lazy_layers, 2, "{s:?}");
    let log = snap.log();
    assert!(
        log.contains("unsigned, and this tree needs signed layer indexes"),
        "{log}"
    );
}
