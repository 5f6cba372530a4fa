//! Running a container of an image: PullLazy, an overlay of its own on the shared mount, an OCI
//! bundle from the image config, `runc run`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::error::ServiceError;
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
        self.run_limited(id, args, None)
    }

    /// Like [`run`](Self::run), killing the container (`SIGKILL`) once it has run for `limit`
    /// (its status is then -1 or 137).
    pub fn run_limited(
        &self,
        id: &str,
        args: Option<&[String]>,
        limit: Option<Duration>,
    ) -> Result<RunOutput, ServiceError> {
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
        // Mount points runc needs, and the working directory, made in the upper layer so an
        // image without them still runs — resolved inside the rootfs, never on the host.
        container::prepare_rootfs(overlay.merged(), &image.config.working_dir)?;
        let spec = container::runtime_spec(&image.config, overlay.merged(), args, &cid)?;
        let bundle = container::write_bundle(&dir.join("bundle"), &spec)?;
        let runc_root = dir.join("runc");
        let child = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&cid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ServiceError::Spawn {
                program: "runc".into(),
                source,
            })?;
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let out = std::thread::scope(|s| {
            if let Some(limit) = limit {
                let (root, cid) = (&runc_root, &cid);
                s.spawn(move || {
                    if finished.recv_timeout(limit).is_err() {
                        tracing::info!(container = %cid, secs = limit.as_secs(), "time limit reached; killing the container");
                        let _ = Command::new("runc")
                            .arg("--root")
                            .arg(root)
                            .args(["kill", cid, "KILL"])
                            .status();
                    }
                });
            }
            let out = child.wait_with_output();
            let _ = done.send(());
            out
        })
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
