//! The embeddable facade against a real registry.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};

use clip_core::format::{Archive, ArchiveKind};
use clip_core::{CreateFromOciImageOptions, create_from_oci_image};
use clip_testkit::image::{EdgeCaseOptions, edge_cases};
use clip_testkit::{Auth, ImageBuilder, ManifestFormat, Registry, RegistryOptions};

#[test]
fn create_from_oci_image_indexes_a_private_image_with_progress() {
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Basic {
            username: "w".into(),
            password: "pw".into(),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    let img = edge_cases(&EdgeCaseOptions {
        large_file: 1 << 20,
        small_files: 10,
        devices: false,
        ..EdgeCaseOptions::default()
    });
    let pushed = reg
        .push(
            &ImageBuilder::new(ManifestFormat::Docker)
                .image(img)
                .build()
                .unwrap(),
            "team/svc",
            "2024",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(0usize));
    let s2 = Arc::clone(&seen);
    let opts = CreateFromOciImageOptions {
        image_ref: pushed.reference.clone(),
        output_path: dir.path().join("svc.clip"),
        auth_config: Some(("w".into(), "pw".into())),
        progress: Some(Arc::new(move |_| *s2.lock().unwrap() += 1)),
        ..Default::default()
    };
    let summary = create_from_oci_image(&opts).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        1 + 3,
        "resolved + one event per layer"
    );
    let a = Archive::open(&opts.output_path).unwrap();
    assert_eq!(a.kind(), ArchiveKind::V2Oci);
    assert_eq!(
        a.meta().source.as_ref().unwrap().manifest_digest.as_str(),
        pushed.digest
    );
    assert_eq!(a.len(), summary.entries);
    assert_eq!(a.meta().image.working_dir, "/data");

    let err = create_from_oci_image(&CreateFromOciImageOptions {
        auth_config: None,
        output_path: dir.path().join("x.clip"),
        ..opts.clone()
    })
    .unwrap_err();
    assert!(err.to_string().contains("docker login"), "{err}");
    let err = create_from_oci_image(&CreateFromOciImageOptions {
        image_ref: "Not A Ref".into(),
        ..opts
    })
    .unwrap_err();
    assert!(err.to_string().contains("invalid image reference"), "{err}");
}
