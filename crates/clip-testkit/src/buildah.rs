//! Building images with real buildah into a test registry.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::error::{IoContext, Result};
use crate::process::run;
use crate::registry::Registry;

/// A buildah with its own storage (vfs driver, chroot isolation: works as root in a VM and in CI),
/// removed on drop.
#[derive(Debug)]
pub struct Buildah {
    dir: TempDir,
}

impl Buildah {
    /// Creates the private storage.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("clip-buildah-")
            .tempdir()
            .ctx(|| "creating buildah storage dir".into())?;
        Ok(Self { dir })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg(format!("--root={}", self.root().display()))
            .arg(format!(
                "--runroot={}",
                self.dir.path().join("run").display()
            ))
            .arg("--storage-driver=vfs");
        c
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `buildah bud` of `context` (with `Dockerfile` inside it) tagged `name`.
    pub fn bud(&self, context: &Path, name: &str, registry: Option<&Registry>) -> Result<()> {
        let mut c = self.cmd();
        c.args([
            "bud",
            "--isolation=chroot",
            "--layers=false",
            "--format=oci",
        ]);
        if let Some(r) = registry {
            tls_flags(&mut c, r);
        }
        c.arg(format!("--tag={name}")).arg(context);
        run(&mut c).map(drop)
    }

    /// `buildah push` of `name` to `registry` as `repo:tag`; returns the pushed manifest digest.
    pub fn push(&self, name: &str, registry: &Registry, repo_tag: &str) -> Result<String> {
        let digest_file = self.dir.path().join("digest");
        let mut c = self.cmd();
        c.arg("push");
        tls_flags(&mut c, registry);
        c.arg(format!("--digestfile={}", digest_file.display()))
            .arg(name)
            .arg(format!("docker://{}/{repo_tag}", registry.host()));
        run(&mut c)?;
        let d = std::fs::read_to_string(&digest_file)
            .ctx(|| format!("reading {}", digest_file.display()))?;
        Ok(d.trim().to_owned())
    }

    /// `buildah push` of `name` into an OCI layout directory (what the v1 build fallback archives).
    pub fn push_oci_layout(&self, name: &str, layout: &Path, tag: &str) -> Result<()> {
        let mut c = self.cmd();
        c.arg("push")
            .arg(name)
            .arg(format!("oci:{}:{tag}", layout.display()));
        run(&mut c).map(drop)
    }
}

fn tls_flags(c: &mut Command, r: &Registry) {
    match r.cert_dir() {
        Some(d) => c.arg(format!("--cert-dir={}", d.display())),
        None => c.arg("--tls-verify=false"),
    };
    if let Some((u, p)) = r.credentials() {
        c.arg(format!("--creds={u}:{p}"));
    }
}
