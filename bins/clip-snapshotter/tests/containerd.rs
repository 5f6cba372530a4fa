//! The snapshotter under Debian's containerd 1.6, with real images from the testkit registry.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clip_testkit::{Containerd, ContainerdOptions, Entry, Image, ImageBuilder, Layer, Registry};

fn can_run() -> bool {
    let ok = clip_testkit::is_root()
        && Path::new("/dev/fuse").exists()
        && clip_testkit::process::have_program("containerd")
        && clip_testkit::process::have_program("ctr");
    if !ok {
        eprintln!("skipping: needs root, /dev/fuse and containerd");
    }
    ok
}

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
        while !self.socket.exists() {
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
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let base = Layer::new(vec![
        Entry::dir("bin"),
        Entry::file("bin/busybox", busybox).mode(0o755),
        Entry::symlink("bin/sh", "busybox"),
        Entry::symlink("bin/cat", "busybox"),
        Entry::dir("etc"),
        Entry::file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        Entry::dir("tmp").mode(0o1777),
    ]);
    let top = Layer::new(vec![Entry::file("etc/greeting", greeting)]);
    ImageBuilder::new(clip_testkit::ManifestFormat::Oci).image(Image::new(vec![base, top]))
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Without lazy-pull labels (`ctr image pull` sends none), layers are unpacked into ordinary
/// overlay snapshots; the image runs, and removing it removes its snapshots.
#[test]
fn plain_ctr_pull_and_run_use_ordinary_overlay_snapshots() {
    if !can_run() {
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
    let ctd = Containerd::start(&ContainerdOptions {
        snapshotter_socket: Some(snap.socket.clone()),
        ..ContainerdOptions::default()
    })
    .unwrap();
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
            "plain-1",
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
