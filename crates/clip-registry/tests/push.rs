//! Pushing to the real registry (token auth), read back by a peer client (skopeo).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use clip_registry::{Client, ClientConfig, Credentials, Error, Reference};
use clip_testkit::image::{EdgeCaseOptions, Entry, Image, Layer, edge_cases, random_bytes};
use clip_testkit::{Auth, ImageBuilder, ManifestFormat, Registry, RegistryOptions, oracle};

fn registry() -> Registry {
    Registry::start(RegistryOptions {
        auth: Auth::Token {
            users: vec![("pusher".into(), "pw".into())],
            anonymous_pull: true,
            lifetime: Duration::from_mins(1),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap()
}

fn client(reg: &Registry) -> Client {
    Client::new(ClientConfig {
        credentials: vec![(
            reg.host(),
            Credentials::Basic {
                username: "pusher".into(),
                password: "pw".into(),
            },
        )],
        ..ClientConfig::default()
    })
    .unwrap()
}

#[test]
fn a_pushed_layout_reads_back_identically_with_skopeo() {
    let reg = registry();
    let rt = clip_testkit::runtime();
    let img = edge_cases(&EdgeCaseOptions {
        large_file: 1 << 20,
        small_files: 20,
        devices: false,
        ..EdgeCaseOptions::default()
    });
    let other = Image::new(vec![Layer::new(vec![Entry::file("arch", "arm64\n")])])
        .platform("linux", "arm64", None);
    for (repo, builder) in [
        (
            "tk/single",
            ImageBuilder::new(ManifestFormat::Oci).image(img.clone()),
        ),
        (
            "tk/multi",
            ImageBuilder::new(ManifestFormat::Oci)
                .image(img)
                .image(other),
        ),
    ] {
        let built = builder.build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        built
            .write_oci_layout(&dir.path().join("layout"), "t")
            .unwrap();
        let r = Reference::parse(&format!("{}/{repo}:v1", reg.host())).unwrap();
        let c = client(&reg);
        let digest = rt
            .block_on(c.push_layout(&dir.path().join("layout"), "t", &r))
            .unwrap();
        assert_eq!(digest, built.digest());
        assert_eq!(rt.block_on(c.tags(&r)).unwrap(), vec!["v1".to_owned()]);
        // Pushing again uploads nothing new and gives the same digest.
        assert_eq!(
            rt.block_on(c.push_layout(&dir.path().join("layout"), "t", &r))
                .unwrap(),
            digest
        );
        // skopeo, a peer client, reads the image back with the same digest.
        let back = dir.path().join("back");
        oracle::skopeo_to_layout(&reg, &format!("{repo}:v1"), &back, "b", None).unwrap();
        let out = std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}/{repo}:v1", reg.host()))
            .output()
            .unwrap();
        let raw = out.stdout;
        let d = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&raw))
        );
        assert_eq!(d, built.digest(), "{repo}");
    }
}

#[test]
fn chunked_uploads_mounts_and_refusals() {
    let reg = registry();
    let rt = clip_testkit::runtime();
    let c = client(&reg);
    let data = Bytes::from(random_bytes(5, 1_000_000));
    let digest = clip_format::Digest::sha256(&data);
    let a = Reference::parse(&format!("{}/tk/a:x", reg.host())).unwrap();
    rt.block_on(c.push_blob_chunked(&a, &digest, data.clone(), 100_000))
        .unwrap();
    assert_eq!(
        rt.block_on(c.blob_bytes(&a, &digest, 2 << 20)).unwrap(),
        data
    );
    // Mount into another repository of the same registry.
    let b = Reference::parse(&format!("{}/tk/b:x", reg.host())).unwrap();
    assert!(!rt.block_on(c.blob_exists(&b, &digest)).unwrap());
    assert!(rt.block_on(c.mount_blob(&b, &digest, "tk/a")).unwrap());
    assert!(rt.block_on(c.blob_exists(&b, &digest)).unwrap());
    // Bytes that do not match the digest are refused before anything is sent.
    let err = rt
        .block_on(c.push_blob(&b, &digest, Bytes::from_static(b"other")))
        .unwrap_err();
    assert!(matches!(err, Error::Digest(_)), "{err}");
    // Anonymous clients may pull but not push.
    let anon = Client::new(ClientConfig::default()).unwrap();
    let small = Bytes::from_static(b"hello");
    let d2 = clip_format::Digest::sha256(&small);
    let err = rt.block_on(anon.push_blob(&b, &d2, small)).unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
}
