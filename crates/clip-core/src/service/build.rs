//! BuildAndArchiveImage: `buildah bud`, then v2 (push to the build registry, index from it) or
//! v1 (push to an OCI layout, archive it). Any v2 problem falls back to v1: builds never fail
//! because of v2.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use base64::Engine as _;
use clip_policy::{BuildPlan, RegistryProbe};
use sha2::{Digest as _, Sha256};

use super::error::{FallbackReason, ServiceError, io};
use super::flow::Phase;
use super::store::ArchiveVersion;
use super::{ArchiveResult, ImageId, ImageService};
use crate::{archive, indexer, registry};

impl ImageService {
    /// `profileAtBuildSecs`: runs a freshly built v2 image's own command once, in a container
    /// without network, for at most that long, so that PullLazy records its reads and publishes
    /// them as the image's prefetch profile before any worker pulls it. Never fails the build.
    fn profile_at_build(&self, r: &ArchiveResult) {
        let limit = std::time::Duration::from_secs(self.cfg.profile_at_build_secs);
        if limit.is_zero() || self.cfg.profile_window_secs == 0 || r.reused {
            return;
        }
        let id = r.image_id.as_str();
        // A mount of the image already in use on this worker is not ours to unmount.
        let mounted_before = self.mounts().iter().any(|m| m.image_id == id);
        let started = Instant::now();
        {
            let _phase = Phase::start("build_profile");
            match self.run_limited(id, None, Some(limit)) {
                Ok(out) => tracing::info!(
                    image_id = id,
                    status = out.status,
                    ms = started.elapsed().as_millis() as u64,
                    "ran the image once to record its start profile"
                ),
                Err(e) => tracing::warn!(
                    image_id = id,
                    error = %e,
                    "running the image to record its start profile failed; its first run will record it"
                ),
            }
        }
        if !mounted_before && let Err(e) = self.unmount(id) {
            tracing::warn!(image_id = id, error = %e, "unmount failed");
        }
    }

    /// Builds `dockerfile` in `context` with `build_args` and stores its archive. v2 problems
    /// fall back to v1; only a failing build itself fails.
    pub fn build_and_archive(
        &self,
        dockerfile: &Path,
        context: &Path,
        build_args: &[(String, String)],
    ) -> Result<ArchiveResult, ServiceError> {
        let start = Instant::now();
        let id = build_id(dockerfile, context, build_args)?;
        let plan = clip_policy::build_plan(&self.cfg, id.as_str(), &self.probe());
        let planned = match plan {
            BuildPlan::PushAndIndex { .. } => ArchiveVersion::V2,
            BuildPlan::V1 { .. } => ArchiveVersion::V1,
        };
        let flow = match self.begin("build", &id, planned, start)? {
            Ok(flow) => flow,
            Err(stored) => return Ok(stored),
        };
        let name = format!("localhost/clip-build-{id}");
        self.bud(dockerfile, context, build_args, &name)?;
        let out = self.staged_path(&id);
        if self.cfg.clip_version == 2 && !clip_policy::in_v2_rollout(&self.cfg, id.as_str()) {
            tracing::info!(image_id = %id, percent = self.cfg.clip_v2_rollout_percent, "outside the v2 rollout: this image uses v1");
        }
        let fallback = match plan {
            BuildPlan::V1 { reason } => reason.map(FallbackReason::from),
            BuildPlan::PushAndIndex { registry } => {
                match self.push_and_index(&name, &registry, &id, &out) {
                    Ok(reused_layers) => {
                        let r =
                            self.finish(flow, &id, ArchiveVersion::V2, &out, None, reused_layers)?;
                        self.profile_at_build(&r);
                        return Ok(r);
                    }
                    Err(reason) => Some(reason),
                }
            }
        };
        if let Some(reason) = &fallback {
            reason.log(&name);
        }
        tracing::info!(image = %name, "Creating legacy archive (Clip v1)");
        let staging = tempfile::Builder::new()
            .prefix(".clip-build-")
            .tempdir_in(self.store.staging())
            .map_err(io("creating a staging directory in", self.store.staging()))?;
        let mut push = self.buildah();
        push.arg("push")
            .arg(&name)
            .arg(format!("oci:{}:image", staging.path().display()));
        {
            let _phase = Phase::start("v1_archive");
            tool(&mut push)?;
            archive::archive_layout(staging.path(), Some("image"), None, &out)?;
        }
        self.finish(flow, &id, ArchiveVersion::V1, &out, fallback.as_ref(), 0)
    }

    /// `buildah bud` of the image, tagged `name`.
    fn bud(
        &self,
        dockerfile: &Path,
        context: &Path,
        build_args: &[(String, String)],
        name: &str,
    ) -> Result<(), ServiceError> {
        let mut bud = self.buildah();
        bud.args([
            "bud",
            "--isolation=chroot",
            "--layers=false",
            "--format=oci",
        ])
        .arg(format!("--file={}", dockerfile.display()))
        .arg(format!("--tag={name}"));
        // Base images from loopback or insecure registries are pulled over plain HTTP.
        let text = std::fs::read_to_string(dockerfile).map_err(io("reading", dockerfile))?;
        let plain_http = text.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|k| k.eq_ignore_ascii_case("FROM"))
                && w.find(|t| !t.starts_with("--")).is_some_and(|image| {
                    let host = image.split('/').next().unwrap_or("");
                    image.contains('/')
                        && (registry::is_loopback(host)
                            || self.cfg.registry(host).is_some_and(|e| e.insecure))
                })
        });
        if plain_http {
            bud.arg("--tls-verify=false");
        }
        for (k, v) in build_args {
            bud.arg(format!("--build-arg={k}={v}"));
        }
        bud.arg(context);
        let _phase = Phase::start("bud");
        tool(&mut bud)
    }

    /// The v2 half of a build: push the image to the build registry, index it from there. Any
    /// failure comes back as the reason to fall back.
    fn push_and_index(
        &self,
        name: &str,
        registry_host: &str,
        id: &ImageId,
        out: &Path,
    ) -> Result<usize, FallbackReason> {
        let target = format!("{registry_host}/clip/build-{id}:latest");
        tracing::info!("Pushing built image to registry: {target}");
        let push_failed = |source: ServiceError| FallbackReason::PushFailed {
            registry: registry_host.to_owned(),
            source: Box::new(source),
        };
        // Credentials go to buildah in a file only it can read, never on its command line.
        let auth = tempfile::tempdir().map_err(|e| push_failed(io("creating", "a temp dir")(e)))?;
        let mut push = self.buildah();
        push.arg("push");
        let insecure = registry::is_loopback(registry_host)
            || self.cfg.registry(registry_host).is_some_and(|e| e.insecure);
        if insecure {
            push.arg("--tls-verify=false");
        }
        if let Some(e) = self.cfg.registry(registry_host)
            && let (Some(u), Some(p)) = (&e.username, &e.password)
        {
            let file = auth.path().join("auth.json");
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            let json = serde_json::json!({"auths": {registry_host: {"auth": token}}});
            write_private(&file, json.to_string().as_bytes()).map_err(push_failed)?;
            push.arg(format!("--authfile={}", file.display()));
        }
        push.arg(name).arg(format!("docker://{target}"));
        {
            let _phase = Phase::start("push");
            tool(&mut push).map_err(push_failed)?;
        }
        drop(auth);
        tracing::info!(image = %target, "Creating index-only archive (Clip v2)");
        let _phase = Phase::start("index");
        let input = indexer::Input::Registry {
            reference: &target,
            client: &self.net,
        };
        let s = indexer::index(input, out, &self.index_options(), None)
            .map_err(FallbackReason::IndexFailed)?;
        tracing::info!(image = %target, bytes = s.archive_bytes, reused_layers = s.reused_layers, "v2 archive created from registry");
        Ok(s.reused_layers)
    }

    fn buildah(&self) -> Command {
        let mut c = Command::new("buildah");
        if let Some(root) = &self.opts.buildah_root {
            c.arg(format!("--root={}", root.join("root").display()))
                .arg(format!("--runroot={}", root.join("run").display()));
        }
        c.arg("--storage-driver=vfs");
        c
    }

    /// Probes the build registry: can a TCP connection be made?
    fn probe(&self) -> RegistryProbe {
        use std::net::ToSocketAddrs as _;
        let host = &self.cfg.build_registry;
        let target = if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:443")
        };
        let addrs = match target.to_socket_addrs() {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => return RegistryProbe::Unreachable(e.to_string()),
        };
        let mut last = "no address".to_owned();
        for a in addrs {
            match std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)) {
                Ok(_) => return RegistryProbe::Reachable,
                Err(e) => last = e.to_string().to_lowercase(),
            }
        }
        RegistryProbe::Unreachable(last)
    }
}

/// Writes `bytes` to a new file at `path` readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io("writing", path))
}

/// Runs a tool to completion; its stderr becomes the error.
pub(crate) fn tool(c: &mut Command) -> Result<(), ServiceError> {
    let program = c.get_program().to_string_lossy().into_owned();
    let out = c.output().map_err(|source| ServiceError::Spawn {
        program: program.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ServiceError::Tool {
        command: std::iter::once(program)
            .chain(c.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" "),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Stable id of a build: Dockerfile, every context file (path, mode, content) and the args.
fn build_id(
    dockerfile: &Path,
    context: &Path,
    build_args: &[(String, String)],
) -> Result<ImageId, ServiceError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut h = Sha256::new();
    h.update(std::fs::read(dockerfile).map_err(io("reading", dockerfile))?);
    let mut stack = vec![context.to_owned()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io("listing", &d))?.flatten() {
            let md = e
                .path()
                .symlink_metadata()
                .map_err(io("reading", e.path()))?;
            if md.is_dir() {
                stack.push(e.path());
            } else {
                files.push((e.path(), md.permissions().mode()));
            }
        }
    }
    files.sort();
    for (p, mode) in files {
        h.update(
            p.strip_prefix(context)
                .unwrap_or(&p)
                .as_os_str()
                .as_encoded_bytes(),
        );
        h.update(mode.to_le_bytes());
        // A symlink counts by its target's name; it is never followed out of the context.
        if let Ok(target) = std::fs::read_link(&p) {
            h.update(target.as_os_str().as_encoded_bytes());
        } else if let Ok(bytes) = std::fs::read(&p) {
            h.update(Sha256::digest(&bytes));
        }
    }
    for (k, v) in build_args {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    Ok(ImageId::from_digest(&h.finalize().into()))
}
