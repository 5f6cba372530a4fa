//! `clip-worker` end to end: one-shot subcommands with config and env precedence, and the HTTP
//! API with graceful shutdown.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clip_testkit::{Entry, Image, ImageBuilder, Layer, ManifestFormat, Registry};

fn can_run() -> bool {
    let ok = clip_testkit::is_root() && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("skipping: needs root and /dev/fuse");
    }
    ok
}

fn write_config(dir: &Path, version: u8) -> std::path::PathBuf {
    let cfg = dir.join("worker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "imageService:\n  clipVersion: {version}\n  archiveStore:\n    local: {0}/store\n  cacheDir: {0}/cache\n  cacheSizeGiB: 1\n  mountBase: {0}/mnt\n",
            dir.display()
        ),
    )
    .unwrap();
    cfg
}

fn worker(cfg: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clip-worker"));
    c.arg("--config")
        .arg(cfg)
        .arg("--buildah-root")
        .arg(cfg.with_file_name("buildah"))
        .env_remove("CLIP_VERSION");
    c
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(reg: &Registry) -> String {
    ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(vec![Layer::new(vec![Entry::file(
            "etc/hello",
            "hello from the worker\n",
        )])]))
        .build()
        .unwrap()
        .push(reg, "team/hello", "v1")
        .unwrap()
        .reference
}

#[test]
fn one_shot_pull_honours_file_then_env() {
    if !can_run() {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let image = sample(&reg);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 2);
    let out = worker(&cfg).args(["pull", &image]).output().unwrap();
    let v = json(&out);
    assert_eq!(v["version"], 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("clip version 2 configured"));
    // The environment wins over the file.
    let v = json(
        &worker(&cfg)
            .env("CLIP_VERSION", "1")
            .args(["pull", &image])
            .output()
            .unwrap(),
    );
    assert_eq!(v["version"], 1);
    // A bad value is a clear error.
    let out = worker(&cfg)
        .env("CLIP_VERSION", "7")
        .args(["pull", &image])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CLIP_VERSION"));
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_http_api_pulls_mounts_reports_and_shuts_down_cleanly() {
    if !can_run() {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let image = sample(&reg);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 2);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = worker(&cfg)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while Command::new("curl")
        .args(["-sf", &format!("{base}/healthz")])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = format!("{{\"image\":\"{image}\"}}");
    let pulled: serde_json::Value = serde_json::from_str(&curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        &format!("{base}/v1/pull"),
    ]))
    .unwrap();
    assert_eq!(pulled["version"], 2);
    let id = pulled["image_id"].as_str().unwrap().to_owned();
    let mounted: serde_json::Value = serde_json::from_str(&curl(&[
        "-X",
        "POST",
        &format!("{base}/v1/images/{id}/mount"),
    ]))
    .unwrap();
    let mp = std::path::PathBuf::from(mounted["mountpoint"].as_str().unwrap());
    assert_eq!(
        std::fs::read(mp.join("etc/hello")).unwrap(),
        b"hello from the worker\n"
    );
    let images = curl(&[&format!("{base}/v1/images")]);
    assert!(images.contains(&id), "{images}");

    // A build whose context is uploaded as a tar stream.
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("hello"), "uploaded context\n").unwrap();
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM scratch\nCOPY hello /etc/hello\n",
    )
    .unwrap();
    let tarball = dir.path().join("ctx.tar");
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(&ctx)
            .arg("-cf")
            .arg(&tarball)
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
    let built: serde_json::Value = serde_json::from_str(&curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", tarball.display()),
        &format!("{base}/v1/build-context?dockerfile=Containerfile&arg.V=1"),
    ]))
    .unwrap();
    assert!(built["image_id"].is_string(), "{built}");

    let metrics = curl(&[&format!("{base}/metrics")]);
    assert!(metrics.contains("clip_mounts 1"), "{metrics}");
    assert!(metrics.contains("clip_archives_total{"), "{metrics}");
    assert!(metrics.contains("clip_flow_seconds"), "{metrics}");
    assert!(metrics.contains("clip_phase_seconds"), "{metrics}");
    assert!(metrics.contains("clip_fetched_bytes_total{"), "{metrics}");
    let err = Command::new("curl")
        .args(["-s", "-X", "POST", &format!("{base}/v1/images/nope/mount")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&err.stdout).contains("no archive for image nope"));

    // SIGTERM: the API stops and the mount goes away.
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!mp.join("etc/hello").exists());
}

/// Credentials from docker's `config.json` (`DOCKER_CONFIG`), and the hint when there are none.
#[test]
fn private_registries_use_docker_config_json() {
    if !can_run() {
        return;
    }
    let reg = Registry::start(clip_testkit::RegistryOptions {
        auth: clip_testkit::Auth::Basic {
            username: "ci".into(),
            password: "s3cret".into(),
        },
        tls: false,
    })
    .unwrap();
    let image = sample(&reg);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 2);
    let empty = dir.path().join("empty-docker");
    std::fs::create_dir(&empty).unwrap();
    let out = worker(&cfg)
        .env("DOCKER_CONFIG", &empty)
        .args(["pull", &image])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unauthorized") && err.contains("docker login"),
        "{err}"
    );

    let docker = dir.path().join("docker");
    std::fs::create_dir(&docker).unwrap();
    let auth = "Y2k6czNjcmV0"; // base64 of "ci:s3cret"
    std::fs::write(
        docker.join("config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{auth}\"}}}}}}",
            reg.host()
        ),
    )
    .unwrap();
    let v = json(
        &worker(&cfg)
            .env("DOCKER_CONFIG", &docker)
            .args(["pull", &image])
            .output()
            .unwrap(),
    );
    assert_eq!(v["version"], 2);
}
