//! Running a container of an image: PullLazy, an overlay of its own on the shared mount, an OCI
//! bundle from the image config, `runc run`.

use std::process::Command;
use std::time::Instant;

use super::error::{ServiceError, io};
use super::{ImageService, short_hash};
use crate::container;

/// A finished container run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunOutput {
    /// Exit code.
    pub status: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl ImageService {
    /// Runs `args` (or the image's own command) in a new container of image `id`.
    pub fn run(&self, id: &str, args: Option<&[String]>) -> Result<RunOutput, ServiceError> {
        let image = self.pull_lazy(id)?;
        let cid = format!(
            "clip-{id}-{}",
            short_hash(&[
                std::process::id().to_string().as_bytes(),
                format!("{:?}", Instant::now()).as_bytes(),
            ])
        );
        let dir = self.cfg.mount_base.join("containers").join(&cid);
        let overlay = container::Overlay::mount(&image.mountpoint, &dir)?;
        // Mount points runc needs, and the working directory, made in the upper layer so a
        // read-only image without them still runs.
        let workdir = image.config.working_dir.trim_start_matches('/').to_owned();
        for d in ["proc", "sys", "dev", "tmp", workdir.as_str()] {
            if d.is_empty() || d.split('/').any(|c| c == "..") {
                continue;
            }
            let p = overlay.merged().join(d);
            if !p.exists() {
                std::fs::create_dir_all(&p).map_err(io("creating", &p))?;
            }
        }
        let spec = container::runtime_spec(&image.config, overlay.merged(), args, &cid)?;
        let bundle = container::write_bundle(&dir.join("bundle"), &spec)?;
        let out = Command::new("runc")
            .arg("--root")
            .arg(dir.join("runc"))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&cid)
            .output()
            .map_err(|source| ServiceError::Spawn {
                program: "runc".into(),
                source,
            })?;
        overlay.unmount()?;
        let _ = std::fs::remove_dir_all(&dir);
        // The first run of the image on any worker: its reads are the image's start profile.
        self.share_profile(id);
        Ok(RunOutput {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
