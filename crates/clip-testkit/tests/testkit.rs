//! The testkit proves each service mode and the oracle work, against the real programs.
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clip_testkit::image::{Compression, EdgeCaseOptions, Entry, Image, Layer, edge_cases};
use clip_testkit::{
    Auth, Buildah, CompareOptions, ImageBuilder, ManifestFormat, Registry, RegistryOptions, S3,
    Snapshot, oracle,
};
use reqwest::Method;

fn small_image() -> Image {
    Image::new(vec![
        Layer::new(vec![
            Entry::dir("etc"),
            Entry::file("etc/hello", "hello\n"),
            Entry::file("etc/bye", "bye\n"),
        ]),
        Layer::new(vec![
            Entry::whiteout("etc/bye"),
            Entry::file("etc/new", "new\n"),
        ]),
    ])
}

fn edge_options() -> EdgeCaseOptions {
    EdgeCaseOptions {
        large_file: 1 << 20,
        small_files: 40,
        devices: clip_testkit::is_root(),
        ..EdgeCaseOptions::default()
    }
}

#[test]
fn anonymous_registry_serves_what_was_pushed() {
    let reg = Registry::start_anonymous().unwrap();
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(small_image())
        .build()
        .unwrap();
    let pushed = reg.push(&built, "tk/small", "v1").unwrap();
    assert_eq!(pushed.reference, format!("{}/tk/small:v1", reg.host()));

    let client = reg.client().unwrap();
    let m = client.get_manifest("tk/small", "v1").unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(m.digest.as_deref(), Some(built.digest()));
    assert_eq!(m.body, built.manifests[0].manifest.bytes);
    let layer = &built.manifests[0].layers[0].blob;
    let b = client
        .send(
            &Method::GET,
            &format!("/v2/tk/small/blobs/{}", layer.digest),
            None,
            None,
        )
        .unwrap();
    assert_eq!(b.body, layer.bytes);
}

#[test]
fn basic_auth_registry_rejects_anonymous_and_wrong_passwords() {
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Basic {
            username: "alice".into(),
            password: "s3cret".into(),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    let client = reg.client().unwrap();
    let anon = client.anonymous().raw(Method::GET, "/v2/", None).unwrap();
    assert_eq!(anon.status, 401);
    assert!(anon.www_authenticate.unwrap().starts_with("Basic"));
    let wrong = client
        .with_credentials("alice", "nope")
        .send(&Method::GET, "/v2/", None, None)
        .unwrap();
    assert_eq!(wrong.status, 401);
    assert_eq!(
        client
            .send(&Method::GET, "/v2/", None, None)
            .unwrap()
            .status,
        200
    );

    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(small_image())
        .build()
        .unwrap();
    reg.push(&built, "tk/private", "v1").unwrap();
    assert_eq!(
        client
            .anonymous()
            .get_manifest("tk/private", "v1")
            .unwrap()
            .status,
        401
    );
    assert_eq!(client.get_manifest("tk/private", "v1").unwrap().status, 200);
}

// Over 100 lines on purpose: one end-to-end scenario on real services, each step building on
// the state the one before left.
#[test]
fn token_registry_tokens_grant_scoped_access_and_expire() {
    let lifetime = Duration::from_secs(3);
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Token {
            users: vec![("bob".into(), "pw".into())],
            anonymous_pull: true,
            lifetime,
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    let client = reg.client().unwrap();
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(small_image())
        .build()
        .unwrap();
    reg.push(&built, "tk/tokened", "v1").unwrap();
    assert!(
        reg.token_stats()
            .unwrap()
            .get_tokens
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );

    // The challenge names the realm and the scope.
    let challenge = client
        .anonymous()
        .raw(Method::GET, "/v2/tk/tokened/manifests/v1", None)
        .unwrap();
    assert_eq!(challenge.status, 401);
    let header = challenge.www_authenticate.unwrap();
    assert!(
        header.starts_with("Bearer realm=\"http://127.0.0.1:"),
        "{header}"
    );
    assert!(
        header.contains("scope=\"repository:tk/tokened:pull\""),
        "{header}"
    );

    // Anonymous clients may pull but not push.
    let anon = client.anonymous();
    assert_eq!(anon.get_manifest("tk/tokened", "v1").unwrap().status, 200);
    let push = anon
        .send(&Method::POST, "/v2/tk/tokened/blobs/uploads/", None, None)
        .unwrap();
    assert_eq!(push.status, 401);

    // A token stops working once its lifetime is over.
    let token = token_for(&reg, "repository:tk/tokened:pull", Some(("bob", "pw")));
    let auth = format!("Bearer {token}");
    let ok = client
        .raw(Method::GET, "/v2/tk/tokened/manifests/v1", Some(&auth))
        .unwrap();
    assert_eq!(ok.status, 200);
    std::thread::sleep(lifetime + Duration::from_millis(1500));
    let expired = client
        .raw(Method::GET, "/v2/tk/tokened/manifests/v1", Some(&auth))
        .unwrap();
    assert_eq!(expired.status, 401, "an expired token must be refused");

    // Wrong password: the token server refuses.
    let realm = realm_of(&reg);
    clip_testkit::http::install_crypto_provider();
    let c = reqwest::blocking::Client::new();
    let r = c
        .get(format!("{realm}?service=clip-testkit-registry"))
        .basic_auth("bob", Some("bad"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);

    // OAuth2: password grant returns a refresh token, which buys a new access token.
    let r: serde_json::Value = c
        .post(&realm)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=password&username=bob&password=pw&service=clip-testkit-registry&client_id=clip&scope=repository%3Atk%2Ftokened%3Apull")
        .send()
        .unwrap()
        .json()
        .unwrap();
    let refresh = r["refresh_token"].as_str().unwrap().to_owned();
    let r: serde_json::Value = c
        .post(&realm)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=refresh_token&refresh_token={refresh}&service=clip-testkit-registry&client_id=clip&scope=repository%3Atk%2Ftokened%3Apull"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let fresh = format!("Bearer {}", r["access_token"].as_str().unwrap());
    assert_eq!(
        client
            .raw(Method::GET, "/v2/tk/tokened/manifests/v1", Some(&fresh))
            .unwrap()
            .status,
        200
    );
    assert_eq!(r["expires_in"], 3);
}

fn realm_of(reg: &Registry) -> String {
    let ch = reg
        .client()
        .unwrap()
        .anonymous()
        .raw(Method::GET, "/v2/", None)
        .unwrap();
    let h = ch.www_authenticate.unwrap();
    let start = h.find("realm=\"").unwrap() + 7;
    h[start..].split('"').next().unwrap().to_owned()
}

fn token_for(reg: &Registry, scope: &str, creds: Option<(&str, &str)>) -> String {
    let realm = realm_of(reg);
    clip_testkit::http::install_crypto_provider();
    let c = reqwest::blocking::Client::new();
    let mut req = c
        .get(&realm)
        .query(&[("service", "clip-testkit-registry"), ("scope", scope)]);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    let v: serde_json::Value = req.send().unwrap().json().unwrap();
    v["token"].as_str().unwrap().to_owned()
}

#[test]
fn tls_registry_is_trusted_only_through_the_testkit_ca() {
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Anonymous,
        tls: true,
        ..Default::default()
    })
    .unwrap();
    assert!(reg.base_url().starts_with("https://"));
    let trusted = reg.client().unwrap();
    assert_eq!(
        trusted
            .send(&Method::GET, "/v2/", None, None)
            .unwrap()
            .status,
        200
    );
    let untrusted = clip_testkit::http::HttpClient::new(reg.base_url(), None, None).unwrap();
    let err = untrusted
        .send(&Method::GET, "/v2/", None, None)
        .unwrap_err();
    assert!(err.to_string().contains(&reg.host()), "{err}");

    // A real peer client (skopeo) reads from it with the CA directory.
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(small_image())
        .build()
        .unwrap();
    reg.push(&built, "tk/tls", "v1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let rootfs = oracle::oracle_unpack(&reg, "tk/tls:v1", work.path(), None).unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/hello")).unwrap(),
        "hello\n"
    );
}

#[test]
fn registry_can_be_stopped_and_restarted_with_its_storage() {
    let mut reg = Registry::start_anonymous().unwrap();
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(small_image())
        .build()
        .unwrap();
    reg.push(&built, "tk/outage", "v1").unwrap();
    reg.stop();
    let client = reg.client().unwrap();
    assert!(
        client.get_manifest("tk/outage", "v1").is_err(),
        "stopped registry must not answer"
    );
    reg.restart().unwrap();
    assert_eq!(client.get_manifest("tk/outage", "v1").unwrap().status, 200);
}

fn curl_s3(s3: &S3, secret: &str, args: &[&str]) -> (String, Vec<u8>) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
        ])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--user")
        .arg(format!("{}:{secret}", s3.access_key()))
        .args(args)
        .output()
        .unwrap();
    let mut body = out.stdout;
    let pos = body.iter().rposition(|b| *b == b'\n').unwrap();
    let code = String::from_utf8(body.split_off(pos))
        .unwrap()
        .trim()
        .to_owned();
    (code, body)
}

#[test]
fn s3_server_enforces_signatures_and_serves_ranges() {
    let s3 = S3::start().unwrap();
    s3.create_bucket("archives").unwrap();
    let src = tempfile::NamedTempFile::new().unwrap();
    let data = clip_testkit::image::random_bytes(3, 100_000);
    std::fs::write(src.path(), &data).unwrap();
    let url = format!("{}/archives/img/a.clip", s3.endpoint());

    let (code, _) = curl_s3(
        &s3,
        s3.secret_key(),
        &["-T", src.path().to_str().unwrap(), &url],
    );
    assert_eq!(code, "200", "{}", s3.log());
    let (code, body) = curl_s3(&s3, s3.secret_key(), &[&url]);
    assert_eq!(code, "200");
    assert_eq!(body, data);
    let (code, body) = curl_s3(&s3, s3.secret_key(), &["-r", "1000-1999", &url]);
    assert_eq!(code, "206");
    assert_eq!(body, &data[1000..2000]);
    let (code, _) = curl_s3(&s3, "wrong-secret", &[&url]);
    assert_eq!(code, "403");
    let (code, _) = curl_s3(
        &s3,
        s3.secret_key(),
        &[&format!("{}/no-such-bucket/x", s3.endpoint())],
    );
    assert_eq!(code, "404");
}

#[test]
fn oracle_sees_a_whiteout_delete_a_lower_file() {
    oracle::require_oracle_tools().unwrap();
    let reg = Registry::start_anonymous().unwrap();
    reg.push(
        &ImageBuilder::new(ManifestFormat::Oci)
            .image(small_image())
            .build()
            .unwrap(),
        "tk/wh",
        "v1",
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let rootfs = oracle::oracle_unpack(&reg, "tk/wh:v1", work.path(), None).unwrap();
    assert!(rootfs.join("etc/hello").exists());
    assert!(rootfs.join("etc/new").exists());
    assert!(
        !rootfs.join("etc/bye").exists(),
        "the whiteout must delete etc/bye"
    );
    assert!(!rootfs.join("etc/.wh.bye").exists());
}

#[test]
fn oracle_applies_every_edge_case_as_the_oci_spec_says() {
    oracle::require_oracle_tools().unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let img = edge_cases(&edge_options());
    reg.push(
        &ImageBuilder::new(ManifestFormat::Oci)
            .image(img)
            .build()
            .unwrap(),
        "tk/edge",
        "v1",
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let r = oracle::oracle_unpack(&reg, "tk/edge:v1", work.path(), None).unwrap();
    let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap();
    let md = |p: &str| std::fs::symlink_metadata(r.join(p)).unwrap();

    assert_eq!(read("data/remove-me"), "re-added above the whiteout\n");
    assert_eq!(
        read("data/keep-me"),
        "upper keep\n",
        "same-layer whiteout hides only lower layers"
    );
    assert!(!r.join("olddir").exists());
    assert!(!r.join("opaque/lower1").exists() && !r.join("opaque/lowerdir").exists());
    assert_eq!(read("opaque/upper"), "upper\n");
    assert!(md("replace-dir").is_file());
    assert!(md("replace-file").is_dir());
    assert_eq!(read("replace-file/child"), "child\n");
    assert_eq!(read("implicit/parent/child.txt"), "implicit\n");
    assert_eq!(
        md("usr/bin/suid-tool").permissions().mode() & 0o7777,
        0o4711
    );
    assert_eq!(
        md("usr/bin/sgid-tool").permissions().mode() & 0o7777,
        0o2755
    );
    assert_eq!(md("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(md("data/ns-time").mtime_nsec(), 123_456_789);
    assert_eq!(
        std::fs::read_link(r.join("usr/bin/abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &md("data/fifo").file_type()
    ));
    assert_eq!(md("data/hl-a").ino(), md("data/hl-c").ino());
    assert_eq!(md("data/hl-a").nlink(), 3);
    assert_eq!(
        xattr::get(r.join("data/xattrs"), "user.comment")
            .unwrap()
            .unwrap(),
        b"hello"
    );
    if clip_testkit::is_root() {
        assert_eq!(md("data/owned").uid(), 1000);
        assert_eq!(md("data/pax-owner").uid(), 3_000_000);
        assert!(
            xattr::get(r.join("usr/bin/cap-tool"), "security.capability")
                .unwrap()
                .is_some()
        );
    }
    let tree = Snapshot::scan(&r).unwrap();
    assert!(tree.hardlink_groups().contains(&vec![
        "data/hl-a".to_owned(),
        "data/hl-b".into(),
        "data/hl-c".into()
    ]));
}

#[test]
fn oracle_is_deterministic_and_compare_reports_each_difference() {
    oracle::require_oracle_tools().unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let img = edge_cases(&edge_options());
    reg.push(
        &ImageBuilder::new(ManifestFormat::Docker)
            .image(img)
            .build()
            .unwrap(),
        "tk/det",
        "v1",
    )
    .unwrap();
    let (w1, w2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Snapshot::scan(&oracle::oracle_unpack(&reg, "tk/det:v1", w1.path(), None).unwrap())
        .unwrap();
    let r2 = oracle::oracle_unpack(&reg, "tk/det:v1", w2.path(), None).unwrap();
    let opts = CompareOptions::default();
    assert_eq!(
        a.compare(&Snapshot::scan(&r2).unwrap(), &opts),
        Vec::<String>::new()
    );

    // Change one thing of each kind and expect exactly those reports.
    std::fs::write(r2.join("etc/os-release"), "changed").unwrap();
    std::fs::set_permissions(
        r2.join("data/empty"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(r2.join("data/hl-c")).unwrap();
    std::fs::write(r2.join("data/extra"), "x").unwrap();
    xattr::set(r2.join("data/xattrs"), "user.comment", b"other").unwrap();
    let diffs = a.compare(&Snapshot::scan(&r2).unwrap(), &opts);
    let has = |s: &str| diffs.iter().any(|d| d.contains(s));
    assert!(has("\"etc/os-release\": expected file of"), "{diffs:#?}");
    assert!(
        has("\"data/empty\": mode expected 644, found 600"),
        "{diffs:#?}"
    );
    assert!(has("\"data/hl-c\": missing"), "{diffs:#?}");
    assert!(has("\"data/extra\": unexpected"), "{diffs:#?}");
    assert!(has("\"data/xattrs\": xattrs"), "{diffs:#?}");
    assert!(has("hard-link group"), "{diffs:#?}");
}

#[test]
fn multi_platform_indexes_and_every_compression_are_accepted() {
    let reg = Registry::start_anonymous().unwrap();
    let amd = small_image().with_compression(Compression::GzipMultiMember(4));
    let arm = Image::new(vec![
        Layer::new(vec![Entry::file("arch", "arm64\n")])
            .compression(Compression::ZstdMultiFrame(2)),
    ])
    .platform("linux", "arm64", Some("v8"));
    let plain = Image::new(vec![
        Layer::new(vec![Entry::file("arch", "s390x\n")]).compression(Compression::None),
    ])
    .platform("linux", "s390x", None);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(amd)
        .image(arm)
        .image(plain)
        .build()
        .unwrap();
    reg.push(&built, "tk/multi", "v1").unwrap();
    let client = reg.client().unwrap();
    let idx = client.get_manifest("tk/multi", "v1").unwrap();
    assert_eq!(
        idx.content_type.as_deref(),
        Some("application/vnd.oci.image.index.v1+json")
    );
    let v: serde_json::Value = serde_json::from_slice(&idx.body).unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 3);
    assert_eq!(v["manifests"][1]["platform"]["variant"], "v8");

    // Multi-member gzip unpacks with the oracle like any gzip layer.
    let work = tempfile::tempdir().unwrap();
    let r = oracle::oracle_unpack(&reg, "tk/multi:v1", work.path(), Some("linux/amd64")).unwrap();
    assert_eq!(std::fs::read_to_string(r.join("etc/new")).unwrap(), "new\n");
    let work = tempfile::tempdir().unwrap();
    let r = oracle::oracle_unpack(&reg, "tk/multi:v1", work.path(), Some("linux/s390x")).unwrap();
    assert_eq!(std::fs::read_to_string(r.join("arch")).unwrap(), "s390x\n");

    // Docker manifest lists too.
    let built = ImageBuilder::new(ManifestFormat::Docker)
        .image(small_image())
        .force_index()
        .build()
        .unwrap();
    reg.push(&built, "tk/dockerlist", "v1").unwrap();
    let idx = client.get_manifest("tk/dockerlist", "v1").unwrap();
    assert_eq!(
        idx.content_type.as_deref(),
        Some("application/vnd.docker.distribution.manifest.list.v2+json")
    );
    assert!(
        ImageBuilder::new(ManifestFormat::Docker)
            .image(small_image().with_compression(Compression::Zstd))
            .build()
            .is_err()
    );
}

#[test]
fn oci_layout_unpacks_with_umoci() {
    oracle::require_oracle_tools().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    ImageBuilder::new(ManifestFormat::Oci)
        .image(small_image())
        .build()
        .unwrap()
        .write_oci_layout(&layout, "t")
        .unwrap();
    let r = oracle::umoci_unpack(&layout, "t", &dir.path().join("bundle")).unwrap();
    assert_eq!(
        std::fs::read_to_string(r.join("etc/hello")).unwrap(),
        "hello\n"
    );
}

#[test]
fn buildah_builds_and_pushes_into_the_registry() {
    if !clip_testkit::require(&[
        clip_testkit::Need::Root,
        clip_testkit::Need::Program("buildah"),
    ]) {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("hello.txt"), "built by buildah\n").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /srv/hello.txt\nENV GREETING=hi\nCMD [\"/srv/hello.txt\"]\n",
    )
    .unwrap();
    let b = Buildah::new().unwrap();
    b.bud(ctx.path(), "localhost/tk-built:latest", Some(&reg))
        .unwrap();
    let digest = b
        .push("localhost/tk-built:latest", &reg, "tk/built:latest")
        .unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let work = tempfile::tempdir().unwrap();
    let r = oracle::oracle_unpack(&reg, "tk/built:latest", work.path(), None).unwrap();
    assert_eq!(
        std::fs::read_to_string(r.join("srv/hello.txt")).unwrap(),
        "built by buildah\n"
    );
}
