//! The reference unpacker: `skopeo copy` into an OCI layout, then `umoci unpack`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::process::run;
use crate::registry::Registry;

/// Source-side skopeo flags to read from `registry` (TLS trust or plain HTTP, credentials).
#[must_use]
pub fn skopeo_src_flags(registry: &Registry) -> Vec<String> {
    let mut f = Vec::new();
    match registry.cert_dir() {
        Some(d) => f.push(format!("--src-cert-dir={}", d.display())),
        None => f.push("--src-tls-verify=false".into()),
    }
    if let Some((u, p)) = registry.credentials() {
        f.push(format!("--src-creds={u}:{p}"));
    }
    f
}

/// Copies `repo_ref` (`REPO:TAG` or `REPO@DIGEST`, without the host) from `registry` into an OCI
/// layout at `layout` under `tag`. `platform` (`os/arch[/variant]`) picks one from an index.
pub fn skopeo_to_layout(
    registry: &Registry,
    repo_ref: &str,
    layout: &Path,
    tag: &str,
    platform: Option<&str>,
) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy"]);
    if let Some(p) = platform {
        let mut parts = p.split('/');
        if let Some(os) = parts.next() {
            cmd.arg(format!("--override-os={os}"));
        }
        if let Some(arch) = parts.next() {
            cmd.arg(format!("--override-arch={arch}"));
        }
        if let Some(v) = parts.next() {
            cmd.arg(format!("--override-variant={v}"));
        }
    }
    cmd.arg("copy").args(skopeo_src_flags(registry));
    cmd.arg(format!("docker://{}/{repo_ref}", registry.host()));
    cmd.arg(format!("oci:{}:{tag}", layout.display()));
    run(&mut cmd).map(drop)
}

/// Has the real skopeo rewrite `from` (`REPO:TAG` in `registry`) as `to` in the same registry,
/// recompressing every layer with `format` (`gzip`, `zstd`, `zstd:chunked`): images exactly as
/// containers/image (skopeo, buildah, podman) writes them. It goes through an OCI layout:
/// registry to registry, skopeo would reuse the blobs the registry already has instead.
pub fn skopeo_recompress(registry: &Registry, from: &str, to: &str, format: &str) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("clip-skopeo-")
        .tempdir()
        .ctx(|| "creating a temp dir".into())?;
    let layout = format!("oci:{}:x", tmp.path().join("layout").display());
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy"])
        .args(skopeo_src_flags(registry))
        .args(["--dest-compress", "--dest-compress-format", format])
        .arg(format!("docker://{}/{from}", registry.host()))
        .arg(&layout);
    run(&mut cmd)?;
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy"])
        .args(skopeo_dest_flags(registry))
        .arg(&layout)
        .arg(format!("docker://{}/{to}", registry.host()));
    run(&mut cmd).map(drop)
}

/// Destination-side skopeo flags to write to `registry`.
#[must_use]
pub fn skopeo_dest_flags(registry: &Registry) -> Vec<String> {
    let mut f = Vec::new();
    match registry.cert_dir() {
        Some(d) => f.push(format!("--dest-cert-dir={}", d.display())),
        None => f.push("--dest-tls-verify=false".into()),
    }
    if let Some((u, p)) = registry.credentials() {
        f.push(format!("--dest-creds={u}:{p}"));
    }
    f
}

/// `umoci unpack` of `layout:tag` into `bundle`; returns the bundle's `rootfs`.
pub fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack")
        .arg(format!("--image={}:{tag}", layout.display()))
        .arg(bundle);
    run(&mut cmd)?;
    Ok(bundle.join("rootfs"))
}

/// The oracle: unpacks `repo_ref` from `registry` with skopeo + umoci into `work/bundle/rootfs`.
pub fn oracle_unpack(
    registry: &Registry,
    repo_ref: &str,
    work: &Path,
    platform: Option<&str>,
) -> Result<PathBuf> {
    let layout = work.join("layout");
    std::fs::create_dir_all(work).ctx(|| format!("creating {}", work.display()))?;
    skopeo_to_layout(registry, repo_ref, &layout, "oracle", platform)?;
    umoci_unpack(&layout, "oracle", &work.join("bundle"))
}

/// Whether the oracle's tools are installed.
pub fn require_oracle_tools() -> Result<()> {
    for p in ["skopeo", "umoci"] {
        if !crate::process::have_program(p) {
            return Err(Error::MissingProgram { program: p.into() });
        }
    }
    Ok(())
}
