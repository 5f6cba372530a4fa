//! Generates the gRPC code for containerd's snapshots service (server: the snapshotter) and the
//! containerd services a lazy pull talks to (content, images, leases, diff, snapshots: clients),
//! plus the CRI API (client; the Kubernetes path in tests), from the vendored protos in
//! `proto/` (Apache-2.0, from containerd and kubernetes/cri-api). Needs `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let containerd = "proto/github.com/containerd/containerd/api";
    let protos = [
        format!("{containerd}/services/snapshots/v1/snapshots.proto"),
        format!("{containerd}/services/content/v1/content.proto"),
        format!("{containerd}/services/images/v1/images.proto"),
        format!("{containerd}/services/leases/v1/leases.proto"),
        format!("{containerd}/services/diff/v1/diff.proto"),
        "proto/k8s.io/cri-api/runtime/v1/api.proto".to_owned(),
    ];
    println!("cargo:rerun-if-changed=build.rs");
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // The protos' comments are Go-flavoured docs that rustdoc would run as doctests.
    let mut config = tonic_prost_build::Config::new();
    config.disable_comments(["."]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, &["proto".to_owned()])?;
    // The service stubs keep their comments whatever the configuration says: drop them too.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for entry in std::fs::read_dir(&out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)?;
            let mut kept = String::with_capacity(text.len());
            for l in text.lines().filter(|l| !l.trim_start().starts_with("///")) {
                kept.push_str(l);
                kept.push('\n');
            }
            std::fs::write(&path, kept)?;
        }
    }
    Ok(())
}
