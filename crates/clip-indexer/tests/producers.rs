//! What real producers put in registries, beyond plain images: indexes carrying buildx
//! attestation manifests, non-distributable ("foreign") layers, and Docker schema 1 manifests.
#![allow(clippy::unwrap_used, missing_docs)]

use clip_indexer::{IndexOptions, Input, index};
use clip_registry::BlockingClient;
use clip_testkit::{
    Entry, FakeRegistry, FakeResponse, Image, ImageBuilder, Layer, ManifestFormat, Registry,
};

fn client() -> BlockingClient {
    BlockingClient::new(clip_registry::ClientConfig::default()).unwrap()
}

fn index_ref(
    reference: &str,
    out: &std::path::Path,
) -> clip_indexer::Result<clip_indexer::IndexSummary> {
    let client = client();
    index(
        Input::Registry {
            reference,
            client: &client,
        },
        out,
        &IndexOptions::default(),
        None,
    )
}

/// An index as `docker buildx build --attest` pushes it: the image, plus an attestation
/// manifest for platform `unknown/unknown` annotated `vnd.docker.reference.type:
/// attestation-manifest` (listed first here). The image's own platform is picked.
#[test]
fn an_index_with_attestation_manifests_picks_the_real_platform() {
    let host = clip_registry::oci::host_platform();
    let real = Image::new(vec![Layer::new(vec![Entry::file("etc/real", "yes\n")])]).platform(
        "linux",
        host.architecture().to_string().as_str(),
        None,
    );
    let attestation = Image::new(vec![Layer::new(vec![Entry::file("sbom.spdx.json", "{}")])])
        .platform("unknown", "unknown", None);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(attestation)
        .image(real)
        .build()
        .unwrap();
    let reg = Registry::start_anonymous().unwrap();
    reg.push(&built, "test/attested", "plain").unwrap();
    let index = built.index.as_ref().unwrap();
    let mut doc: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let real_digest = built.manifests[1].manifest.digest.clone();
    doc["manifests"][0]["annotations"] = serde_json::json!({
        "vnd.docker.reference.type": "attestation-manifest",
        "vnd.docker.reference.digest": real_digest,
    });
    let bytes = serde_json::to_vec(&doc).unwrap();
    reg.client()
        .unwrap()
        .push_manifest("test/attested", "v1", &index.media_type, &bytes)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = index_ref(
        &format!("{}/test/attested:v1", reg.host()),
        &dir.path().join("a.clip"),
    )
    .unwrap();
    assert_eq!(s.manifest_digest.as_str(), real_digest);
    let a = clip_format::Archive::open(&dir.path().join("a.clip")).unwrap();
    assert!(a.lookup(b"etc/real").is_some());
    assert!(a.lookup(b"sbom.spdx.json").is_none());
}

/// A non-distributable layer (OCI `…nondistributable…` media type with `urls`): read from the
/// registry when the registry holds it; when it does not, indexing and pulling stop with an
/// error that says so and names the URLs — clip does not download layers from outside the
/// registry.
#[test]
fn non_distributable_layers_are_read_from_the_registry_or_refused_clearly() {
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(Image::new(vec![
            Layer::new(vec![Entry::file("base", "base\n")]),
            Layer::new(vec![Entry::file("foreign", "licensed bits\n")]),
        ]))
        .build()
        .unwrap();
    let m = &built.manifests[0];
    let mut doc: serde_json::Value = serde_json::from_slice(&m.manifest.bytes).unwrap();
    doc["layers"][1]["mediaType"] =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into();
    doc["layers"][1]["urls"] = serde_json::json!(["https://downloads.example.invalid/layer.tgz"]);
    let bytes = serde_json::to_vec(&doc).unwrap();
    let reg = Registry::start_anonymous().unwrap();
    let http = reg.client().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The registry holds it (pushed with the image): indexed like any layer.
    for l in &m.layers {
        http.push_blob("test/held", &l.blob.digest, &l.blob.bytes)
            .unwrap();
    }
    http.push_blob("test/held", &m.config.digest, &m.config.bytes)
        .unwrap();
    http.push_manifest("test/held", "v1", &m.manifest.media_type, &bytes)
        .unwrap();
    let s = index_ref(
        &format!("{}/test/held:v1", reg.host()),
        &dir.path().join("held.clip"),
    )
    .unwrap();
    assert_eq!(s.layers, 2);

    // It does not: a clear refusal, from indexing and from pulling alike.
    http.push_blob(
        "test/foreign",
        &m.layers[0].blob.digest,
        &m.layers[0].blob.bytes,
    )
    .unwrap();
    http.push_blob("test/foreign", &m.config.digest, &m.config.bytes)
        .unwrap();
    http.push_manifest("test/foreign", "v1", &m.manifest.media_type, &bytes)
        .unwrap();
    let reference = format!("{}/test/foreign:v1", reg.host());
    let err = index_ref(&reference, &dir.path().join("foreign.clip"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("non-distributable") && err.contains("downloads.example.invalid"),
        "{err}"
    );
    assert!(!dir.path().join("foreign.clip").exists());
    let c = client();
    let err = c
        .block_on(c.client().pull_layout(
            &clip_registry::Reference::parse(&reference).unwrap(),
            None,
            &dir.path().join("layout"),
            "v1",
            None,
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-distributable"), "{err}");
}

/// A Docker schema 1 manifest (served by registries from before 2017; today's distribution
/// refuses to store one, hence the scripted server): a clear error naming the way out.
#[test]
fn schema_1_manifests_get_a_clear_error() {
    let fake = FakeRegistry::start(|req| {
        if req.path.contains("/manifests/") {
            FakeResponse::new(
                200,
                r#"{"schemaVersion":1,"name":"old/app","tag":"v1","architecture":"amd64","fsLayers":[],"history":[],"signatures":[]}"#,
            )
            .header(
                "content-type",
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
            )
        } else {
            FakeResponse::new(200, "{}")
        }
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = index_ref(
        &format!("{}/old/app:v1", fake.host()),
        &dir.path().join("o.clip"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("schema 1") && err.contains("push the image again"),
        "{err}"
    );
}
