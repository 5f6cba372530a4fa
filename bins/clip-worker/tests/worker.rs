//! `clip-worker` end to end: one-shot subcommands with config and env precedence, and the HTTP
//! API with graceful shutdown.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clip_testkit::{Entry, Image, ImageBuilder, Layer, ManifestFormat, Registry};

/// What these tests need from the machine.
const NEEDS: &[clip_testkit::Need] = &[clip_testkit::Need::Root, clip_testkit::Need::Fuse];

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
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(vec![Layer::new(vec![Entry::file(
            "etc/hello",
            "hello from the worker\n",
        )])]))
        .build()
        .unwrap();
    reg.push(&built, "team/hello", "v1").unwrap().reference
}

#[test]
fn one_shot_pull_honours_file_then_env() {
    if !clip_testkit::require(NEEDS) {
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

/// A `clip-worker serve` process, killed (and its mounts detached) on drop.
struct Server {
    child: std::process::Child,
    /// `curl` arguments that reach it (`--unix-socket PATH` or nothing).
    via: Vec<String>,
    /// Base URL.
    base: String,
    /// Where its stderr goes.
    log: std::path::PathBuf,
}

impl Server {
    /// Starts `serve ARGS` and waits until `/healthz` answers (with `auth` if given).
    fn start(cfg: &Path, args: &[&str], via: &[&str], base: &str, auth: Option<&str>) -> Self {
        let log = cfg.with_file_name(format!("worker-{}.log", std::process::id()));
        let child = worker(cfg)
            .env(
                "CLIP_LOG",
                std::env::var("CLIP_LOG").unwrap_or_else(|_| "info".into()),
            )
            .arg("serve")
            .args(args)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            via: via.iter().map(|s| (*s).to_owned()).collect(),
            base: base.to_owned(),
            log,
        };
        let start = Instant::now();
        loop {
            let mut c = server.curl_cmd(&["-sf", "-o", "/dev/null"], "/healthz");
            if let Some(t) = auth {
                c.args(["-H", &format!("authorization: Bearer {t}")]);
            }
            if c.output().is_ok_and(|o| o.status.success()) {
                break;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("worker exited ({status}): {}", server.stderr());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "worker never answered: {}",
                server.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn curl_cmd(&self, opts: &[&str], path: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(&self.via)
            .args(opts)
            .arg(format!("{}{path}", self.base));
        c
    }

    /// `curl` of `path` with `opts`: (HTTP status, body).
    fn call(&self, opts: &[&str], path: &str) -> (u16, String) {
        let out = self
            .curl_cmd(&[&["-sS", "-w", "\n%{http_code}"][..], opts].concat(), path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// A successful JSON call.
    fn ok(&self, opts: &[&str], path: &str) -> serde_json::Value {
        let (code, body) = self.call(opts, path);
        assert!((200..300).contains(&code), "{path}: {code} {body}");
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and its exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    clip_testkit::process::free_port().unwrap()
}

fn tar_of(dir: &Path, out: &Path) {
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("-cf")
            .arg(out)
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
#[test]
fn the_api_on_its_unix_socket_pulls_mounts_builds_reports_and_shuts_down_cleanly() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let image = sample(&reg);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 2);
    let sock = dir.path().join("run/worker.sock");
    let listen = format!("unix:{}", sock.display());
    let server = Server::start(
        &cfg,
        &[
            "--listen",
            &listen,
            "--socket-group",
            "65534",
            "--socket-mode",
            "660",
        ],
        &["--unix-socket", sock.to_str().unwrap()],
        "http://worker",
        None,
    );
    // The socket's mode and group are what was asked; a user outside the group cannot connect.
    let md = std::fs::symlink_metadata(&sock).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!((md.mode() & 0o777, md.uid(), md.gid()), (0o660, 0, 65534));
    let other = Command::new("setpriv")
        .args([
            "--reuid=1234",
            "--regid=1234",
            "--clear-groups",
            "curl",
            "-sf",
            "--unix-socket",
        ])
        .arg(&sock)
        .arg("http://worker/healthz")
        .output()
        .unwrap();
    assert!(
        !other.status.success(),
        "a user outside the socket's group got in"
    );

    let body = format!("{{\"image\":\"{image}\"}}");
    let pulled = server.ok(&["-X", "POST", "-d", &body], "/v1/pull");
    assert_eq!(pulled["version"], 2);
    let id = pulled["image_id"].as_str().unwrap().to_owned();
    let mounted = server.ok(&["-X", "POST"], &format!("/v1/images/{id}/mount"));
    let mp = std::path::PathBuf::from(mounted["mountpoint"].as_str().unwrap());
    assert_eq!(
        std::fs::read(mp.join("etc/hello")).unwrap(),
        b"hello from the worker\n"
    );
    let (_, images) = server.call(&[], "/v1/images");
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
    tar_of(&ctx, &tarball);
    let built = server.ok(
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", tarball.display()),
        ],
        "/v1/build-context?dockerfile=Containerfile&arg.V=1",
    );
    assert!(built["image_id"].is_string(), "{built}");

    let (_, metrics) = server.call(&[], "/metrics");
    for want in [
        "clip_mounts 1",
        "clip_archives_total{",
        "clip_flow_seconds",
        "clip_phase_seconds",
        "clip_fetched_bytes_total{",
    ] {
        assert!(metrics.contains(want), "{want}: {metrics}");
    }
    let (code, body) = server.call(&["-X", "POST"], "/v1/images/nope/mount");
    assert_eq!(code, 404);
    assert!(body.contains("no archive for image nope"), "{body}");
    let (code, body) = server.call(&["-X", "POST", "-d", "{\"image\": 5}"], "/v1/pull");
    assert_eq!(code, 400, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());

    // SIGTERM: the API stops, the mount goes away, the socket is removed.
    let status = server.stop();
    assert!(status.success(), "{status}");
    assert!(!mp.join("etc/hello").exists());
    assert!(!sock.exists());

    // A stale socket (the worker was killed) is replaced; a live one is refused.
    let first = Server::start(
        &cfg,
        &["--listen", &listen],
        &["--unix-socket", sock.to_str().unwrap()],
        "http://worker",
        None,
    );
    let second = worker(&cfg)
        .args(["serve", "--listen", &listen])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // kill -9 with an image mounted: the mount is left dead; a restarted worker detaches it and
    // serves the image again.
    let m = first.ok(&["-X", "POST"], &format!("/v1/images/{id}/mount"));
    let mp = std::path::PathBuf::from(m["mountpoint"].as_str().unwrap());
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(sock.exists(), "a killed worker leaves its socket");
    let dead = Command::new("stat").arg("-f").arg(&mp).output().unwrap();
    assert!(
        String::from_utf8_lossy(&dead.stderr).contains("not connected"),
        "the killed worker's mount is dead"
    );
    let again = Server::start(
        &cfg,
        &["--listen", &listen],
        &["--unix-socket", sock.to_str().unwrap()],
        "http://worker",
        None,
    );
    let alive = Command::new("stat").arg("-f").arg(&mp).output().unwrap();
    assert!(
        alive.status.success(),
        "the dead mount was not cleaned: {}",
        String::from_utf8_lossy(&alive.stderr)
    );
    again.ok(&["-X", "POST"], &format!("/v1/images/{id}/mount"));
    assert_eq!(
        std::fs::read(mp.join("etc/hello")).unwrap(),
        b"hello from the worker\n"
    );
    assert!(again.stop().success());
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// Over TCP: tokens (with rotation), mutual TLS, public read-only endpoints, and the listeners
/// that are refused at start.
#[test]
fn tcp_needs_a_credential_and_tls_off_loopback() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 2);
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "old-token-0123456789\nnew-token-9876543210\n").unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let listen = format!("tcp:127.0.0.1:{port}");
    let t = tokens.to_str().unwrap();
    let server = Server::start(
        &cfg,
        &["--listen", &listen, "--token-file", t],
        &[],
        &base,
        Some("new-token-9876543210"),
    );
    let (code, body) = server.call(&[], "/v1/images");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("credential is required"), "{body}");
    let (code, _) = server.call(
        &["-H", "authorization: Bearer wrong-token-00000000"],
        "/v1/images",
    );
    assert_eq!(code, 401);
    for tok in ["old-token-0123456789", "new-token-9876543210"] {
        let (code, _) = server.call(
            &["-H", &format!("authorization: Bearer {tok}")],
            "/v1/images",
        );
        assert_eq!(code, 200);
    }
    let (code, _) = server.call(&["-X", "POST", "-d", "{\"image\":\"x\"}"], "/v1/pull");
    assert_eq!(code, 401);
    drop(server);

    // Read-only endpoints opened separately; everything else still needs the token.
    let server = Server::start(
        &cfg,
        &["--listen", &listen, "--token-file", t, "--public-read"],
        &[],
        &base,
        None,
    );
    assert_eq!(server.call(&[], "/v1/images").0, 200);
    assert_eq!(server.call(&[], "/metrics").0, 200);
    assert_eq!(
        server
            .call(&["-X", "POST", "-d", "{\"image\":\"x\"}"], "/v1/pull")
            .0,
        401
    );
    drop(server);

    // Refused at start: loopback without any credential (unless --insecure-no-auth), any other
    // address without TLS.
    let refused = |args: &[&str], why: &str| {
        let out = worker(&cfg).arg("serve").args(args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    };
    refused(&["--listen", &listen], "without authentication");
    refused(
        &[
            "--listen",
            &format!("tcp:0.0.0.0:{}", free_port()),
            "--token-file",
            t,
        ],
        "without TLS",
    );
    let open = Server::start(
        &cfg,
        &["--listen", &listen, "--insecure-no-auth"],
        &[],
        &base,
        None,
    );
    assert_eq!(open.call(&[], "/v1/images").0, 200);
    assert!(open.stderr().contains("WITHOUT authentication"));
    drop(open);

    // Mutual TLS: no client certificate, no connection; with one, in.
    let ca = clip_testkit::pki::TestCa::new(dir.path(), "clip-test-ca").unwrap();
    let server_cert = ca.issue(dir.path(), "127.0.0.1", true).unwrap();
    let client_cert = ca.issue(dir.path(), "client", false).unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let server = Server::start(
        &cfg,
        &[
            "--listen",
            &listen,
            "--tls-cert",
            server_cert.cert_path.to_str().unwrap(),
            "--tls-key",
            server_cert.key_path.to_str().unwrap(),
            "--tls-client-ca",
            ca.cert_path().to_str().unwrap(),
        ],
        &[
            "--cacert",
            ca.cert_path().to_str().unwrap(),
            "--cert",
            client_cert.cert_path.to_str().unwrap(),
            "--key",
            client_cert.key_path.to_str().unwrap(),
        ],
        &base,
        None,
    );
    assert_eq!(server.call(&[], "/v1/images").0, 200);
    let anonymous = Command::new("curl")
        .args(["-sS", "--cacert", ca.cert_path().to_str().unwrap()])
        .arg(format!("{base}/v1/images"))
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "a client without a certificate got in"
    );

    // Clients that connect and never speak hold up nobody else: each handshake runs on its own
    // with a 10 s limit, so the request below is answered while they sit there. (Before, the
    // handshake ran inside accept and every other client waited out the silent one's 10 s;
    // 5 s here is a bound far above an answer's time and far below that wait.)
    let silent: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    assert_eq!(server.call(&[], "/v1/images").0, 200);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a silent client held up the API for {took:?}"
    );
    drop(silent);
}

/// Builds read host paths only beneath `imageService.buildContextRoot` (symlinks resolved
/// first); uploads are bounded; flows are bounded; slow requests end with 408.
#[test]
fn builds_are_confined_and_uploads_bounded() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("contexts");
    std::fs::create_dir_all(root.join("app")).unwrap();
    std::fs::write(
        root.join("app/Dockerfile"),
        "FROM scratch\nCOPY Dockerfile /x\n",
    )
    .unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("Dockerfile"), "FROM scratch\nCOPY . /\n").unwrap();
    std::os::unix::fs::symlink(&secret, root.join("escape")).unwrap();
    let cfg = write_config(dir.path(), 1);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    writeln!(text, "  buildContextRoot: {}", root.display()).unwrap();
    std::fs::write(&cfg, text).unwrap();
    let port = free_port();
    let server = Server::start(
        &cfg,
        &[
            "--listen",
            &format!("tcp:127.0.0.1:{port}"),
            "--insecure-no-auth",
            "--max-context-bytes",
            "64K",
            "--max-flows",
            "1",
        ],
        &[],
        &format!("http://127.0.0.1:{port}"),
        None,
    );
    let build = |ctx: &Path| {
        server.call(
            &[
                "-X",
                "POST",
                "-d",
                &format!("{{\"context\":\"{}\"}}", ctx.display()),
            ],
            "/v1/build",
        )
    };
    let (code, body) = build(&secret);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("not beneath the build context root"),
        "{body}"
    );
    let (code, body) = build(&root.join("escape"));
    assert_eq!(code, 403, "through a symlink: {body}");
    let (code, body) = build(&root.join("../secret"));
    assert_eq!(code, 403, "through ..: {body}");

    // An upload over the limit: 413, as JSON.
    let big = dir.path().join("big");
    std::fs::create_dir(&big).unwrap();
    std::fs::write(big.join("Dockerfile"), "FROM scratch\n").unwrap();
    std::fs::write(
        big.join("blob"),
        clip_testkit::image::random_bytes(1, 200 << 10),
    )
    .unwrap();
    let tarball = dir.path().join("big.tar");
    tar_of(&big, &tarball);
    let (code, body) = server.call(
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", tarball.display()),
        ],
        "/v1/build-context",
    );
    assert_eq!(code, 413, "{body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string(),
        "{body}"
    );

    // A build inside the root is accepted (however long buildah takes on a busy machine: this
    // server has no request limit of its own).
    let (code, body) = build(&root.join("app"));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn requests_are_bounded_in_time_and_in_number() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 1);

    // Request limits, with nothing left to chance: a registry that accepts connections and never
    // answers holds a pull for as long as the client waits (a minute), so the pull outlives the
    // 10 s limit: 408; while it runs (10 s is the margin a busy machine gets to send the second
    // request), another flow finds no free slot: 429.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = std::sync::Arc::clone(&held);
    std::thread::spawn(move || {
        for c in hole.incoming().flatten() {
            keep.lock().unwrap().push(c);
        }
    });
    let port = free_port();
    let server = Server::start(
        &cfg,
        &[
            "--listen",
            &format!("tcp:127.0.0.1:{port}"),
            "--insecure-no-auth",
            "--max-flows",
            "1",
            "--request-timeout-secs",
            "10",
        ],
        &[],
        &format!("http://127.0.0.1:{port}"),
        None,
    );
    let pull = || {
        server.call(
            &[
                "-X",
                "POST",
                "-d",
                &format!("{{\"image\":\"{hole_addr}/x:y\"}}"),
            ],
            "/v1/pull",
        )
    };
    let (slow, busy) = std::thread::scope(|s| {
        let h = s.spawn(pull);
        // The first pull holds the only slot once its connection is held.
        let t0 = std::time::Instant::now();
        while held.lock().unwrap().is_empty() && t0.elapsed() < Duration::from_mins(1) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let busy = pull();
        (h.join().unwrap(), busy)
    });
    assert_eq!(slow.0, 408, "{}", slow.1);
    assert_eq!(busy.0, 429, "{}", busy.1);
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// A registry password is a secret: after a whole pull, build, mount and run cycle with trace
/// logging, it (and its base64 forms) appears nowhere — not in the logs, `/metrics`, any JSON
/// answer, the archives or the caches.
#[test]
fn registry_secrets_never_leak() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let canary = format!(
        "canary-{}-{}",
        std::process::id(),
        clip_testkit::image::text_bytes(7, 12)
            .iter()
            .map(|b| char::from(b'a' + b % 26))
            .collect::<String>()
    );
    let reg = Registry::start(clip_testkit::RegistryOptions {
        auth: clip_testkit::Auth::Basic {
            username: "ci".into(),
            password: canary.clone(),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(vec![Layer::new(vec![
            Entry::dir("bin"),
            Entry::file("bin/busybox", busybox).mode(0o755),
            Entry::file("etc/hello", "hello\n"),
        ])]))
        .build()
        .unwrap();
    let image = reg.push(&built, "team/bb", "v1").unwrap().reference;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("worker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "imageService:\n  clipVersion: 2\n  buildRegistry: {host}\n  archiveStore:\n    local: {d}/store\n  cacheDir: {d}/cache\n  mountBase: {d}/mnt\n  registries:\n    \"{host}\": {{username: ci, password: {canary}}}\n",
            host = reg.host(),
            d = dir.path().display(),
        ),
    )
    .unwrap();
    let docker = dir.path().join("docker");
    std::fs::create_dir(&docker).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("ci:{canary}"));
    std::fs::write(
        docker.join("config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{b64}\"}}}}}}",
            reg.host()
        ),
    )
    .unwrap();
    let sock = dir.path().join("w.sock");
    let log = cfg.with_file_name("trace.log");
    let mut child = worker(&cfg)
        .env("CLIP_LOG", "trace")
        .env("DOCKER_CONFIG", &docker)
        .args(["serve", "--listen", &format!("unix:{}", sock.display())])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let call = |opts: &[&str], path: &str| -> String {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--fail-with-body",
                "--unix-socket",
                sock.to_str().unwrap(),
            ])
            .args(opts)
            .arg(format!("http://worker{path}"))
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{path}: {body} {}",
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
        body
    };
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut answers = String::new();
    let pulled = call(
        &["-X", "POST", "-d", &format!("{{\"image\":\"{image}\"}}")],
        "/v1/pull",
    );
    answers.push_str(&pulled);
    let id = serde_json::from_str::<serde_json::Value>(&pulled).unwrap()["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    answers.push_str(&call(&["-X", "POST"], &format!("/v1/images/{id}/mount")));
    let ran = call(
        &[
            "-X",
            "POST",
            "-d",
            "{\"args\": [\"/bin/busybox\", \"cat\", \"/etc/hello\"]}",
        ],
        &format!("/v1/images/{id}/run"),
    );
    assert!(ran.contains("hello"), "{ran}");
    answers.push_str(&ran);
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY Dockerfile /Dockerfile\n",
    )
    .unwrap();
    let tarball = dir.path().join("ctx.tar");
    tar_of(&ctx, &tarball);
    let built = call(
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", tarball.display()),
        ],
        "/v1/build-context",
    );
    assert!(
        built.contains("\"version\":2"),
        "the build pushed with the credentials: {built}"
    );
    answers.push_str(&built);
    answers.push_str(&call(&[], "/v1/images"));
    answers.push_str(&call(&[], "/v1/mounts"));
    let metrics = call(&[], "/metrics");
    // An error answer from the same registry (a missing image).
    let missing = Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            sock.to_str().unwrap(),
            "-X",
            "POST",
            "-d",
        ])
        .arg(format!("{{\"image\":\"{}/team/missing:v1\"}}", reg.host()))
        .arg("http://worker/v1/pull")
        .output()
        .unwrap();
    let missing = String::from_utf8_lossy(&missing.stdout).into_owned();
    assert!(missing.contains("error"), "{missing}");
    answers.push_str(&missing);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();

    let forms = [
        canary.clone(),
        b64.clone(),
        base64::engine::general_purpose::STANDARD.encode(&canary),
    ];
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.len() > 10_000,
        "trace logging was on: {} bytes",
        logs.len()
    );
    for text in [&logs, &metrics, &answers] {
        for f in &forms {
            assert!(!text.contains(f.as_str()), "a secret leaked: {f}");
        }
    }
    let mut stack = vec![dir.path().join("store"), dir.path().join("cache")];
    let mut files = 0;
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if md.is_file() {
            files += 1;
            let bytes = std::fs::read(&p).unwrap();
            for f in &forms {
                assert!(
                    !bytes.windows(f.len()).any(|w| w == f.as_bytes()),
                    "a secret is in {}",
                    p.display()
                );
            }
        }
    }
    assert!(
        files > 3,
        "the cycle wrote archives and cache files ({files})"
    );
}

/// Credentials from docker's `config.json` (`DOCKER_CONFIG`), and the hint when there are none.
#[test]
fn private_registries_use_docker_config_json() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let reg = Registry::start(clip_testkit::RegistryOptions {
        auth: clip_testkit::Auth::Basic {
            username: "ci".into(),
            password: "s3cret".into(),
        },
        tls: false,
        ..Default::default()
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

/// A worker of a fleet sharing an S3 store, signing with the fleet's key (made once, beside
/// the workers' directories).
fn s3_config(dir: &Path, prefix: &str, version: u8, s3: &clip_testkit::S3) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.parent().unwrap().join("fleet.key");
    if !key.exists() {
        let (text, _) = clip_core::objstore::signed::SigningKey::generate().unwrap();
        std::fs::write(&key, text).unwrap();
    }
    let cfg = dir.join("worker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "imageService:\n  clipVersion: {version}\n  signingKey: {key}\n  archiveStore:\n    s3: {{bucket: fleet, prefix: {prefix}/, endpoint: \"{endpoint}\", region: {region}, forcePathStyle: true, accessKeyId: {akey}, secretAccessKey: {secret}}}\n  cacheDir: {d}/cache\n  cacheSizeGiB: 1\n  mountBase: {d}/mnt\n",
            key = key.display(),
            endpoint = s3.endpoint(),
            d = dir.display(),
            region = s3.region(),
            akey = s3.access_key(),
            secret = s3.secret_key(),
        ),
    )
    .unwrap();
    cfg
}

const WORKERS: usize = 4;

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// Several worker processes, one registry, one S3 store (s3s-fs): concurrent pulls of one image
/// publish one archive (create-only writes; losers reuse it and drop their own v1 data), every
/// worker mounts that archive, a later pull does no work, and a new image that shares the base
/// layer reuses the layer index another worker stored.
#[test]
fn a_fleet_of_workers_shares_one_archive_store() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let s3 = clip_testkit::S3::start().unwrap();
    s3.create_bucket("fleet").unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let base = Layer::new(vec![
        Entry::file("etc/hello", "hello from the fleet\n"),
        Entry::file(
            "usr/lib/big.bin",
            clip_testkit::image::random_bytes(5, 2 << 20),
        ),
    ]);
    let image = reg
        .push(
            &ImageBuilder::new(ManifestFormat::Oci)
                .image(Image::new(vec![base.clone()]))
                .build()
                .unwrap(),
            "team/fleet",
            "v1",
        )
        .unwrap()
        .reference;
    let dir = tempfile::tempdir().unwrap();
    let mut v2_prefix = String::new();
    for version in [2u8, 1] {
        // s3s-fs checks the create-only condition and writes in two steps, so racers can all
        // "win" there (S3 decides atomically; the file-store test in clip-extract checks that
        // exactly one of eight racers wins). A round in which all four won is run again on a
        // fresh prefix; without the conditional write every round would end that way.
        let mut round = 0;
        let (cfgs, answers, prefix) = loop {
            round += 1;
            let prefix = format!("v{version}r{round}");
            let cfgs: Vec<_> = (0..WORKERS)
                .map(|i| {
                    s3_config(
                        &dir.path().join(format!("{prefix}-w{i}")),
                        &prefix,
                        version,
                        &s3,
                    )
                })
                .collect();
            let children: Vec<_> = cfgs
                .iter()
                .map(|c| {
                    worker(c)
                        .args(["pull", &image])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let answers: Vec<serde_json::Value> = children
                .into_iter()
                .map(|c| json(&c.wait_with_output().unwrap()))
                .collect();
            let won = answers.iter().filter(|a| a["reused"] == false).count();
            if won < WORKERS || round == 3 {
                break (cfgs, answers, prefix);
            }
            eprintln!("round {round}: all {WORKERS} workers won the s3s-fs race; again");
        };
        if version == 2 {
            v2_prefix.clone_from(&prefix);
        }
        let id = answers[0]["image_id"].as_str().unwrap().to_owned();
        let url = format!("s3://fleet/{prefix}/{id}.clip");
        for a in &answers {
            assert_eq!(
                (a["image_id"].as_str(), a["archive"].as_str()),
                (Some(id.as_str()), Some(url.as_str())),
                "{a}"
            );
            assert_eq!(a["version"], version, "{a}");
        }
        let published = answers.iter().filter(|a| a["reused"] == false).count();
        // Create-only: at least one worker published; the others were told the archive existed
        // and reused it.
        eprintln!("v{version}: {published} of {WORKERS} workers published");
        assert!((1..WORKERS).contains(&published), "{answers:?}");
        let stored = s3.root().join("fleet").join(&prefix);
        let names: Vec<String> = std::fs::read_dir(&stored)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let data = names
            .iter()
            .filter(|n| n.starts_with(&format!("{id}.data.")))
            .count();
        // Every loser deleted its own data object; only published ones remain.
        assert_eq!(data, if version == 1 { published } else { 0 }, "{names:?}");

        // Every worker mounts the one archive and reads through it.
        let mut mounts: Vec<_> = cfgs
            .iter()
            .map(|c| {
                worker(c)
                    .args(["mount", &id])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for m in &mut mounts {
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(m.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["version"], version, "{line}");
            let mp = Path::new(v["mountpoint"].as_str().unwrap());
            assert_eq!(
                std::fs::read(mp.join("etc/hello")).unwrap(),
                b"hello from the fleet\n"
            );
            assert_eq!(
                std::fs::read(mp.join("usr/lib/big.bin")).unwrap(),
                clip_testkit::image::random_bytes(5, 2 << 20)
            );
        }
        for m in mounts {
            Command::new("kill")
                .arg(m.id().to_string())
                .status()
                .unwrap();
            assert!(m.wait_with_output().unwrap().status.success());
        }

        // A worker that comes later finds the archive and does no work.
        let late = s3_config(
            &dir.path().join(format!("{prefix}-late")),
            &prefix,
            version,
            &s3,
        );
        let v = json(&worker(&late).args(["pull", &image]).output().unwrap());
        assert_eq!(
            (v["reused"].as_bool(), v["archive"].as_str()),
            (Some(true), Some(url.as_str())),
            "{v}"
        );
    }

    // A new image on the same base layer: its base layer's index comes from the store (another
    // worker stored it), only the new layer is fetched.
    let derived = ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(vec![
            base,
            Layer::new(vec![Entry::file("app/run.sh", "echo app\n")]),
        ]))
        .build()
        .unwrap();
    let derived = reg.push(&derived, "team/derived", "v1").unwrap().reference;
    let fresh = s3_config(&dir.path().join("fresh"), &v2_prefix, 2, &s3);
    let v = json(&worker(&fresh).args(["pull", &derived]).output().unwrap());
    assert_eq!(
        (
            v["version"].as_u64(),
            v["reused"].as_bool(),
            v["reused_layers"].as_u64()
        ),
        (Some(2), Some(false), Some(1)),
        "{v}"
    );
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
/// Index on push: the registry's notifications reach the worker (with the registry's
/// configured bearer token); a `skopeo copy` into a configured repository leaves a v2 archive in
/// the store, so the first pull anywhere is `reused`; the same push again indexes nothing new;
/// an event without the credential is refused; pushes while the worker is down are delivered by
/// the registry's retries once it is back.
#[test]
fn images_are_indexed_when_pushed() {
    if !clip_testkit::require(NEEDS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = "push-token-0123456789";
    let secret = "webhook-secret-0123456789";
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{token}\n")).unwrap();
    std::fs::write(dir.path().join("push-secret"), format!("{secret}\n")).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let listen = format!("tcp:127.0.0.1:{port}");
    let reg = Registry::start(clip_testkit::RegistryOptions {
        notify: Some((format!("{base}/v1/registry-events"), Some(secret.into()))),
        ..Default::default()
    })
    .unwrap();
    let cfg = dir.path().join("worker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "imageService:\n  clipVersion: 2\n  archiveStore:\n    local: {0}/store\n  cacheDir: {0}/cache\n  cacheSizeGiB: 1\n  mountBase: {0}/mnt\n  indexOnPush:\n    repositories: [\"team/*\"]\n    registries: [\"{1}\"]\n    secretFile: {0}/push-secret\n",
            dir.path().display(),
            reg.host()
        ),
    )
    .unwrap();
    let args = [
        "--listen",
        &listen,
        "--token-file",
        tokens.to_str().unwrap(),
    ];
    let mut server = Server::start(&cfg, &args, &[], &base, Some(token));
    // Images as skopeo pushes them, from an OCI layout.
    let layout = |name: &str, text: &str| {
        let l = dir.path().join(name);
        ImageBuilder::new(ManifestFormat::Oci)
            .image(Image::new(vec![Layer::new(vec![Entry::file(
                "etc/hello",
                text,
            )])]))
            .build()
            .unwrap()
            .write_oci_layout(&l, "v1")
            .unwrap();
        l
    };
    let push = |l: &Path, repo: &str| {
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", l.display()))
            .arg(format!("docker://{}/{repo}:v1", reg.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let archives = || {
        std::fs::read_dir(dir.path().join("store")).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".clip"))
                .count()
        })
    };
    let wait_for = |n: usize, server: &Server| {
        let start = Instant::now();
        while archives() < n {
            assert!(
                start.elapsed() < Duration::from_mins(1),
                "no archive appeared:\n{}\n{}",
                server.stderr(),
                reg.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let app = layout("app", "pushed\n");
    push(&app, "team/app");
    wait_for(1, &server);
    let auth = format!("authorization: Bearer {token}");
    let pulled = server.ok(
        &[
            "-X",
            "POST",
            "-H",
            &auth,
            "-d",
            &format!("{{\"image\":\"{}/team/app:v1\"}}", reg.host()),
        ],
        "/v1/pull",
    );
    assert_eq!(pulled["reused"], true, "{pulled}");
    assert_eq!(pulled["version"], 2, "{pulled}");
    // Pushed again: nothing new to index; another repository is not configured.
    push(&app, "team/app");
    push(&layout("other", "other\n"), "elsewhere/other");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(archives(), 1);
    assert_eq!(
        server.stderr().matches("indexed on push").count(),
        1,
        "{}",
        server.stderr()
    );
    // Without the webhook's own secret — with nothing, or with the API's token — refused.
    let (code, _) = server.call(
        &["-X", "POST", "-d", "{\"events\":[]}"],
        "/v1/registry-events",
    );
    assert_eq!(code, 401);
    let (code, _) = server.call(
        &["-X", "POST", "-H", &auth, "-d", "{\"events\":[]}"],
        "/v1/registry-events",
    );
    assert_eq!(code, 401, "the API's token opens the webhook");
    let hook = format!("authorization: Bearer {secret}");
    let (code, body) = server.call(
        &["-X", "POST", "-H", &hook, "-d", "not json"],
        "/v1/registry-events",
    );
    assert_eq!(code, 400, "{body}");
    // A forged event (right secret) about a registry the config does not name: ignored, nothing
    // fetched from there.
    let forged = serde_json::json!({"events": [{
        "action": "push",
        "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", "ab".repeat(32)),
            "repository": "team/app",
            "url": "http://127.0.0.1:9/v2/team/app/manifests/sha256:x"
        }
    }]});
    let v = server.ok(
        &["-X", "POST", "-H", &hook, "-d", &forged.to_string()],
        "/v1/registry-events",
    );
    assert_eq!(
        (v["ignored"].as_u64(), v["queued"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    // The API's token no longer works on the webhook, nor the webhook's secret on the API.
    let (code, _) = server.call(&["-H", &hook], "/v1/images");
    assert_eq!(code, 401);
    // The worker down while an image is pushed: the registry retries until it is back.
    let stopped = server.stop();
    assert!(stopped.success());
    push(&layout("later", "later\n"), "team/later");
    std::thread::sleep(Duration::from_secs(1));
    server = Server::start(&cfg, &args, &[], &base, Some(token));
    wait_for(2, &server);
    // The same image in another configured repository is another image id: indexed again.
    push(&app, "team/copy");
    wait_for(3, &server);
    let (_, text) = server.call(&["-H", &auth], "/metrics");
    assert!(text.contains("clip_index_on_push_events_total"), "{text}");
}
