//! Debian's containerd (1.6), started with its own root, state and sockets under a temp
//! directory, optionally with a proxy snapshotter plugin named `clip` and its CRI plugin set up
//! to use it (snapshot annotations on, plain HTTP to loopback registries, a sandbox image of the
//! test's choosing, host networking so no CNI is needed). The CRI plugin keeps containers'
//! `oom_score_adj` at or above its own (`restrict_oom_score_adj`): this machine forbids lowering
//! it, and the pause container asks for -998.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};
use crate::process::{Service, run, which};

/// How to start [`Containerd`].
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// A snapshotter socket to register as the proxy plugin `clip`.
    pub snapshotter_socket: Option<PathBuf>,
    /// The snapshotter the CRI plugin uses (`clip`, or containerd's default `overlayfs`).
    pub cri_snapshotter: Option<String>,
    /// The CRI sandbox ("pause") image: a reference in a test registry.
    pub sandbox_image: Option<String>,
    /// Registries (`HOST:PORT`) the CRI plugin reaches over plain HTTP.
    pub plain_http_registries: Vec<String>,
}

/// A running containerd; stopped on drop, with its containers' shims killed and its mounts
/// detached.
#[derive(Debug)]
pub struct Containerd {
    service: Service,
    dir: TempDir,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until it answers `ctr version`.
    pub fn start(options: &ContainerdOptions) -> Result<Self> {
        let program = which("containerd").ok_or_else(|| Error::MissingProgram {
            program: "containerd".into(),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("clip-containerd-")
            .tempdir()
            .ctx(|| "creating containerd's temp dir".into())?;
        let d = dir.path();
        for sub in ["root", "state", "cni/bin", "cni/conf"] {
            std::fs::create_dir_all(d.join(sub)).ctx(|| format!("creating {sub}"))?;
        }
        let socket = d.join("containerd.sock");
        let mut toml = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\n[grpc]\n  address = \"{sock}\"\n\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\n[debug]\n  address = \"{dbg}\"\n  level = \"info\"\n\n[metrics]\n  address = \"\"\n\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            dbg = d.join("debug.sock").display(),
        );
        if let Some(s) = &options.snapshotter_socket {
            let _ = write!(
                toml,
                "[proxy_plugins]\n  [proxy_plugins.clip]\n    type = \"snapshot\"\n    address = \"{}\"\n\n",
                s.display()
            );
        }
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let _ = write!(
            toml,
            "[{cri}]\n  disable_tcp_service = true\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  enable_selinux = false\n  restrict_oom_score_adj = true\n"
        );
        if let Some(img) = &options.sandbox_image {
            let _ = writeln!(toml, "  sandbox_image = \"{img}\"");
        }
        let _ = write!(
            toml,
            "  [{cri}.containerd]\n    snapshotter = \"{}\"\n    disable_snapshot_annotations = false\n",
            options.cri_snapshotter.as_deref().unwrap_or("overlayfs")
        );
        let _ = write!(
            toml,
            "  [{cri}.cni]\n    bin_dir = \"{}\"\n    conf_dir = \"{}\"\n",
            d.join("cni/bin").display(),
            d.join("cni/conf").display()
        );
        for host in &options.plain_http_registries {
            let _ = write!(
                toml,
                "  [{cri}.registry.mirrors.\"{host}\"]\n    endpoint = [\"http://{host}\"]\n"
            );
        }
        let config = d.join("config.toml");
        std::fs::write(&config, toml).ctx(|| format!("writing {}", config.display()))?;
        let mut cmd = Command::new(program);
        cmd.arg("--config").arg(&config);
        let log = d.join("containerd.log");
        let mut service = Service::spawn("containerd", cmd, &log)?;
        let me_socket = socket.clone();
        service.wait_ready(Duration::from_secs(30), || {
            me_socket.exists() && ctr_command(&me_socket, &["version"]).is_ok()
        })?;
        Ok(Self {
            service,
            dir,
            socket,
        })
    }

    /// The gRPC socket.
    #[must_use]
    pub fn address(&self) -> &Path {
        &self.socket
    }

    /// Runs `ctr --address … ARGS` (namespace `default`); an error carries its output.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        ctr_command(&self.socket, args)
    }

    /// containerd's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.service.log_tail(64 * 1024)
    }

    /// The root filesystem of running task `id` in namespace `ns`, as the host sees it.
    #[must_use]
    pub fn task_rootfs(&self, ns: &str, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(ns)
            .join(id)
            .join("rootfs")
    }

    /// containerd's root directory (its content store is under it).
    #[must_use]
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

fn ctr_command(socket: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(socket).args(args);
    run(&mut cmd)
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims of this instance's containers, then containerd, then whatever is still mounted
        // under its directories (container root filesystems).
        let needle = self.socket.display().to_string();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if text.contains("containerd-shim")
                    && text.contains(&needle)
                    && let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>()
                {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                }
            }
        }
        self.service.stop();
        crate::containerd::detach_mounts_under(self.dir.path());
    }
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
pub fn detach_mounts_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).status();
    }
}
