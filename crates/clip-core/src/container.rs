//! Running a container on a mounted archive: a writable overlay over the read-only mount, and an
//! OCI runtime bundle whose process comes from the image's config.
//!
//! Each container gets its own kernel overlayfs: the shared read-only clip mount is the lower
//! layer, the container's writes land in its own upper directory, so any number of containers
//! share one mount (and one cache) of an image. The runtime spec follows what `runc spec`
//! generates (namespaces, default mounts, masked paths, the three default capabilities) with the
//! image's entrypoint, command, environment, working directory and user filled in, the way
//! docker and containerd derive them — and, as they do by default, without `noNewPrivileges`, so
//! an image's setuid programs work inside its containers. They do not work from the host: the
//! shared mount is `nosuid,nodev` and lives under the root-only mount base; the overlay a
//! container gets is its own mount, where the image's bits count.
//!
//! Paths an image names (its working directory, `/etc/passwd`) are resolved *inside* the
//! container's root filesystem with `openat2(RESOLVE_IN_ROOT)` ([`mkdir_in_root`],
//! [`read_in_root`]), as runc's securejoin does: an image whose `/w` is a symlink to `/` and
//! whose working directory is `/w/etc/x` gets `<rootfs>/etc/x`, never the host's `/etc/x`.

use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::format::ImageConfig;

/// Why preparing a container failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    /// Creating directories, writing the bundle or mounting failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The image config cannot be turned into a process.
    #[error("image config: {0}")]
    Config(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

/// A writable overlay over a read-only lower directory; unmounted on drop.
#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    merged: PathBuf,
    mounted: bool,
}

impl Overlay {
    /// Mounts `lower` with `dir/upper` and `dir/work` at `dir/merged` (all created).
    pub fn mount(lower: &Path, dir: &Path) -> Result<Self, ContainerError> {
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let data = std::ffi::CString::new(data)
            .map_err(|_| ContainerError::Config("NUL byte in an overlay path".into()))?;
        rustix::mount::mount(
            "overlay",
            &merged,
            "overlay",
            rustix::mount::MountFlags::empty(),
            data.as_c_str(),
        )
        .map_err(|e| ContainerError::Io {
            what: format!("mounting an overlay at {}", merged.display()),
            source: e.into(),
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            merged,
            mounted: true,
        })
    }

    /// The container's root filesystem.
    #[must_use]
    pub fn merged(&self) -> &Path {
        &self.merged
    }

    /// Where the container's writes land.
    #[must_use]
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// Unmounts the overlay (the upper directory stays).
    pub fn unmount(mut self) -> Result<(), ContainerError> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<(), ContainerError> {
        if self.mounted {
            self.mounted = false;
            rustix::mount::unmount(&self.merged, rustix::mount::UnmountFlags::empty()).map_err(
                |e| ContainerError::Io {
                    what: format!("unmounting {}", self.merged.display()),
                    source: e.into(),
                },
            )?;
        }
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.do_unmount().is_err() {
            let _ = rustix::mount::unmount(&self.merged, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens `rel` resolved inside `root` (symlinks, `..` and absolute targets stay in `root`).
fn open_in_root(root: &OwnedFd, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let rel = rel.trim_start_matches('/');
    rustix::fs::openat2(
        root.as_fd(),
        if rel.is_empty() { "." } else { rel },
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Creates directory `rel` and its missing parents inside the root filesystem `root`, resolving
/// every component — the image's symlinks included — inside `root` (`openat2(RESOLVE_IN_ROOT)`),
/// so nothing outside `root` is ever created. New directories get `mode` (less the umask).
pub fn mkdir_in_root(root: &Path, rel: &str, mode: u32) -> Result<(), ContainerError> {
    let what = || format!("creating {rel} inside {}", root.display());
    let rootfd = open_root(root).map_err(io(what()))?;
    let dir = OFlags::PATH | OFlags::DIRECTORY;
    let mut prefix = String::new();
    for comp in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let path = if prefix.is_empty() {
            comp.to_owned()
        } else {
            format!("{prefix}/{comp}")
        };
        match open_in_root(&rootfd, &path, dir) {
            Ok(_) => {}
            Err(rustix::io::Errno::NOENT) => {
                let parent =
                    open_in_root(&rootfd, &prefix, dir).map_err(|e| io(what())(e.into()))?;
                match rustix::fs::mkdirat(&parent, comp, Mode::from_raw_mode(mode)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io(what())(e.into())),
                }
                // A dangling symlink named `comp` stays dangling: refuse rather than guess.
                open_in_root(&rootfd, &path, dir).map_err(|e| io(what())(e.into()))?;
            }
            Err(e) => return Err(io(what())(e.into())),
        }
        prefix = path;
    }
    Ok(())
}

/// Reads the regular file `rel` of the root filesystem `root` (at most `max` bytes), resolved
/// inside `root` like [`mkdir_in_root`]. `Ok(None)` when it does not exist.
pub fn read_in_root(root: &Path, rel: &str, max: u64) -> Result<Option<Vec<u8>>, ContainerError> {
    use std::io::Read as _;
    let what = || format!("reading {rel} inside {}", root.display());
    let rootfd = open_root(root).map_err(io(what()))?;
    let fd = match open_in_root(
        &rootfd,
        rel,
        OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(io(what())(e.into())),
    };
    let file = std::fs::File::from(fd);
    let md = file.metadata().map_err(io(what()))?;
    if !md.is_file() {
        return Err(ContainerError::Config(format!(
            "{rel} in the image is not a regular file"
        )));
    }
    let mut out = Vec::new();
    file.take(max).read_to_end(&mut out).map_err(io(what()))?;
    Ok(Some(out))
}

/// Makes the directories a container needs in its (writable) root filesystem: runc's mount
/// points (`proc`, `sys`, `dev`, `tmp`) and the image's working directory, all resolved inside
/// `root`.
pub fn prepare_rootfs(root: &Path, working_dir: &str) -> Result<(), ContainerError> {
    for d in ["proc", "sys", "dev"] {
        mkdir_in_root(root, d, 0o755)?;
    }
    mkdir_in_root(root, "tmp", 0o1777)?;
    mkdir_in_root(root, working_dir, 0o755)
}

/// The process a container of this image runs: `args` replaces the image's command (docker's
/// `run IMAGE ARGS…`), the entrypoint stays.
#[must_use]
pub fn process_args(image: &ImageConfig, args: Option<&[String]>) -> Vec<String> {
    let mut out = image.entrypoint.clone();
    match args {
        Some(a) if !a.is_empty() => out.extend_from_slice(a),
        _ => out.extend(image.cmd.iter().cloned()),
    }
    out
}

/// The id (field 3) and, for passwd, the primary group (field 4) of the line whose name
/// (field 1) — or id, when `by_id` — matches.
fn find_id(table: &str, key: &str, by_id: bool) -> Option<(u32, Option<u32>)> {
    table.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 3 || (if by_id { f[2] } else { f[0] }) != key {
            return None;
        }
        Some((f[2].parse().ok()?, f.get(3).and_then(|g| g.parse().ok())))
    })
}

/// Resolves the image's `user` (`name`, `uid`, `name:group`, `uid:gid`) against the rootfs's
/// `/etc/passwd` and `/etc/group`, as docker does. Empty means root.
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), ContainerError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let table = |rel: &str| -> Result<String, ContainerError> {
        Ok(read_in_root(rootfs, rel, 4 << 20)?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    };
    let passwd = table("etc/passwd")?;
    let (uid, primary) = match u.parse::<u32>() {
        Ok(id) => (id, find_id(&passwd, u, true).and_then(|(_, g)| g)),
        Err(_) => find_id(&passwd, u, false).ok_or_else(|| {
            ContainerError::Config(format!("user {u:?} not found in /etc/passwd"))
        })?,
    };
    let gid = match g {
        None => primary.unwrap_or(0),
        Some(g) => {
            if let Ok(id) = g.parse::<u32>() {
                id
            } else {
                let group = table("etc/group")?;
                find_id(&group, g, false).map(|(id, _)| id).ok_or_else(|| {
                    ContainerError::Config(format!("group {g:?} not found in /etc/group"))
                })?
            }
        }
    };
    Ok((uid, gid))
}

/// An OCI runtime spec (`config.json`) running the image's process on `rootfs`.
pub fn runtime_spec(
    image: &ImageConfig,
    rootfs: &Path,
    args: Option<&[String]>,
    hostname: &str,
) -> Result<serde_json::Value, ContainerError> {
    let args = process_args(image, args);
    if args.is_empty() {
        return Err(ContainerError::Config(
            "the image has no entrypoint or command, and none was given".into(),
        ));
    }
    let mut env = image.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let (uid, gid) = resolve_user(&image.user, rootfs)?;
    let cwd = if image.working_dir.is_empty() {
        "/".to_owned()
    } else {
        image.working_dir.clone()
    };
    let caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    Ok(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": false
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    }))
}

/// Writes `dir/config.json` for `spec` (atomically) and returns the bundle directory.
pub fn write_bundle(dir: &Path, spec: &serde_json::Value) -> Result<PathBuf, ContainerError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let bytes = serde_json::to_vec_pretty(spec)
        .map_err(|e| ContainerError::Config(format!("serialising the spec: {e}")))?;
    crate::host::publish_bytes(&dir.join("config.json"), &bytes).map_err(|e| {
        ContainerError::Io {
            what: format!("writing {}/config.json", dir.display()),
            source: e.into(),
        }
    })?;
    Ok(dir.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An image's symlinks resolve inside its root: `/w -> /` and `/e -> /etc/../..` make
    /// `w/…` and `e/…` paths of the rootfs, never of the host.
    #[test]
    fn image_paths_resolve_inside_the_rootfs() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::os::unix::fs::symlink("/", r.join("w")).unwrap();
        std::os::unix::fs::symlink("/etc/../..", r.join("e")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        let host = std::env::temp_dir().join(format!("clip-escape-{}", std::process::id()));
        let rel = host.to_str().unwrap().trim_start_matches('/').to_owned();
        mkdir_in_root(r, &format!("/w/{rel}/deeper"), 0o755).unwrap();
        mkdir_in_root(r, &format!("e/{rel}/other"), 0o755).unwrap();
        mkdir_in_root(r, &format!("../../{rel}/up"), 0o755).unwrap();
        assert!(!host.exists(), "{} was created on the host", host.display());
        for sub in ["deeper", "other", "up"] {
            assert!(r.join(&rel).join(sub).is_dir(), "{sub}");
        }
        // Existing directories are fine; a dangling symlink is refused, not followed out.
        mkdir_in_root(r, "w", 0o755).unwrap();
        std::os::unix::fs::symlink("/nowhere/x", r.join("dangling")).unwrap();
        assert!(mkdir_in_root(r, "dangling/y", 0o755).is_err());
        assert!(!Path::new("/nowhere").exists());

        std::fs::write(r.join("etc/passwd"), "app:x:7:8::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("pw")).unwrap();
        assert_eq!(
            read_in_root(r, "w/pw", 1 << 20).unwrap().unwrap(),
            b"app:x:7:8::/:/bin/sh\n"
        );
        assert_eq!(read_in_root(r, "etc/group", 1 << 20).unwrap(), None);
        assert_eq!(resolve_user("app", r).unwrap(), (7, 8));
    }
}
