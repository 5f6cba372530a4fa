//! Container-ready: a v2 archive mounted lazily, a kernel overlay on top, and `runc run` of the
//! image's own command, which reads the image and writes to its upper layer.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::process::Command;

use clip_core::container::{Overlay, resolve_user, runtime_spec, write_bundle};
use clip_core::fs::{MountOptions, mount_archive};
use clip_core::{CreateFromOciImageOptions, create_from_oci_image};
use clip_testkit::image::{RuntimeConfig, SparseFormat};
use clip_testkit::{Entry, Image, ImageBuilder, Layer, ManifestFormat, Registry};

fn busybox_image() -> Image {
    let base = clip_testkit::image::busybox_base();
    let top = Layer::new(vec![
        Entry::file("etc/greeting", "hello from a lazy image\n"),
        Entry::sparse(
            "data/sparse",
            8 << 20,
            vec![(1 << 20, vec![7; 64 << 10]), (6 << 20, vec![9; 777])],
            SparseFormat::Pax10,
        ),
    ]);
    let mut img = Image::new(vec![base, top]);
    img.config = RuntimeConfig {
        env: vec!["GREETING_FILE=/etc/greeting".into()],
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["cat $GREETING_FILE; id -u; echo written > $HOME/out; cat $HOME/out".into()],
        working_dir: "/home/app".into(),
        user: "app".into(),
        ..RuntimeConfig::default()
    };
    img
}

#[test]
fn runc_runs_the_images_command_on_an_overlay_of_the_lazy_mount() {
    if !clip_testkit::require(&[
        clip_testkit::Need::Root,
        clip_testkit::Need::Fuse,
        clip_testkit::Need::Program("runc"),
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start_anonymous().unwrap();
    registry
        .push(
            &ImageBuilder::new(ManifestFormat::Oci)
                .image(busybox_image())
                .build()
                .unwrap(),
            "test/busybox",
            "t",
        )
        .unwrap();
    let archive = dir.path().join("busybox.clip");
    create_from_oci_image(&CreateFromOciImageOptions {
        image_ref: format!("{}/test/busybox:t", registry.host()),
        output_path: archive.clone(),
        ..Default::default()
    })
    .unwrap();
    let image = clip_core::format::Archive::open(&archive)
        .unwrap()
        .meta()
        .image
        .clone();

    let lower = dir.path().join("lower");
    std::fs::create_dir(&lower).unwrap();
    let mount = mount_archive(MountOptions {
        archive,
        mountpoint: lower.clone(),
        cache_dir: dir.path().join("cache"),
        ..MountOptions::default()
    })
    .unwrap();
    let overlay = Overlay::mount(&lower, &dir.path().join("c1")).unwrap();
    assert_eq!(
        resolve_user(&image.user, overlay.merged()).unwrap(),
        (1000, 1000)
    );
    let mut spec = runtime_spec(&image, overlay.merged(), None, "c1").unwrap();
    spec["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push("HOME=/home/app".into());
    let bundle = write_bundle(&dir.path().join("bundle"), &spec).unwrap();
    let id = format!("clip-test-{}", std::process::id());
    let out = Command::new("runc")
        .args(["--root", dir.path().join("runc").to_str().unwrap()])
        .args(["run", "--bundle", bundle.to_str().unwrap(), &id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "runc failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a lazy image\n1000\nwritten\n"
    );
    // The write landed in the container's upper layer; the image mount is untouched.
    assert_eq!(
        std::fs::read(overlay.upper().join("home/app/out")).unwrap(),
        b"written\n"
    );
    assert!(!lower.join("home/app/out").exists());
    check_sparse(&overlay.merged().join("data/sparse"));
    // The image's bytes came lazily from the registry.
    assert!(mount.stats().spans_fetched > 0);
    overlay.unmount().unwrap();
    mount.unmount().unwrap();
}

/// A sparse file keeps its holes through the overlay: `SEEK_DATA`/`SEEK_HOLE` pass through to
/// the lazy mount, and the bytes read back are the file's logical content.
fn check_sparse(path: &std::path::Path) {
    let f = std::fs::File::open(path).unwrap();
    let seek = |to| rustix::fs::seek(&f, to);
    assert_eq!(seek(rustix::fs::SeekFrom::Data(0)), Ok(1 << 20));
    assert_eq!(
        seek(rustix::fs::SeekFrom::Hole(1 << 20)),
        Ok((1 << 20) + (64 << 10))
    );
    assert_eq!(seek(rustix::fs::SeekFrom::Data(2 << 20)), Ok(6 << 20));
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        bytes,
        clip_testkit::image::Kind::sparse_content(
            8 << 20,
            &[(1 << 20, vec![7; 64 << 10]), (6 << 20, vec![9; 777])]
        )
    );
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// A setuid-root program of an image: from the host path of a (default, nosuid) mount it runs
/// with the caller's ids; with `suid` it would run as root (the probe works); inside a runc
/// container on an overlay of the nosuid mount it runs as root, as setuid programs do in docker
/// and containerd containers.
#[test]
fn setuid_programs_are_root_only_inside_containers() {
    if !clip_testkit::require(&[
        clip_testkit::Need::Root,
        clip_testkit::Need::Fuse,
        clip_testkit::Need::Program("runc"),
    ]) {
        return;
    }
    let ids = clip_testkit::probe::ids_program().unwrap();
    let mut img = busybox_image();
    img.layers.push(Layer::new(vec![
        Entry::file("bin/ids", ids).mode(0o4755).owner(0, 0),
    ]));
    img.config = RuntimeConfig {
        cmd: vec!["/bin/ids".into()],
        user: "app".into(),
        ..RuntimeConfig::default()
    };
    let registry = Registry::start_anonymous().unwrap();
    registry
        .push(
            &ImageBuilder::new(ManifestFormat::Oci)
                .image(img)
                .build()
                .unwrap(),
            "test/setuid",
            "t",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A place the unprivileged user can reach, as a careless operator might choose.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let archive = dir.path().join("setuid.clip");
    create_from_oci_image(&CreateFromOciImageOptions {
        image_ref: format!("{}/test/setuid:t", registry.host()),
        output_path: archive.clone(),
        ..Default::default()
    })
    .unwrap();
    let image = clip_core::format::Archive::open(&archive)
        .unwrap()
        .meta()
        .image
        .clone();
    let mount_at = |name: &str, suid: bool| {
        let mp = dir.path().join(name);
        std::fs::create_dir(&mp).unwrap();
        std::fs::set_permissions(&mp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        mount_archive(MountOptions {
            archive: archive.clone(),
            mountpoint: mp,
            cache_dir: dir.path().join("cache"),
            suid,
            ..MountOptions::default()
        })
        .unwrap()
    };

    let nosuid = mount_at("nosuid", false);
    let as_nobody = |m: &clip_core::fs::MountHandle| {
        clip_testkit::probe::run_as_nobody(&m.mountpoint().join("bin/ids"), &[]).unwrap()
    };
    assert_eq!(
        as_nobody(&nosuid),
        "65534 65534\n",
        "setuid honoured on the host path"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(nosuid.mountpoint().to_str().unwrap()))
        .unwrap();
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    let suid = mount_at("suid", true);
    assert_eq!(
        as_nobody(&suid),
        "65534 0\n",
        "the probe must see a setuid mount"
    );
    suid.unmount().unwrap();

    // Inside a container, on an overlay of the nosuid mount: setuid works.
    let overlay = Overlay::mount(nosuid.mountpoint(), &dir.path().join("c1")).unwrap();
    let spec = runtime_spec(&image, overlay.merged(), None, "c1").unwrap();
    let bundle = write_bundle(&dir.path().join("bundle"), &spec).unwrap();
    let id = format!("clip-setuid-{}", std::process::id());
    let out = Command::new("runc")
        .args(["--root", dir.path().join("runc").to_str().unwrap()])
        .args(["run", "--bundle", bundle.to_str().unwrap(), &id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "runc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1000 0\n");
    overlay.unmount().unwrap();
    nosuid.unmount().unwrap();
}
