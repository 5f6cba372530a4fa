//! A real Debian root filesystem (debootstrap `minbase` of bookworm), built once per machine and
//! cached, for tests and benchmarks that need realistic content.

use std::path::PathBuf;
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::process::{have_program, run};

/// The Debian mirror configured for apt on this machine (the package registry CI can reach).
#[must_use]
pub fn mirror() -> String {
    let from_sources = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
        .find_map(|l| {
            let uri = l
                .strip_prefix("URIs:")?
                .split_whitespace()
                .next()?
                .to_owned();
            (!uri.contains("security")).then_some(uri)
        });
    from_sources.unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// Path of a cached `debootstrap --variant=minbase bookworm` tree, creating it (about 45 s,
/// needs root and the Debian mirror) on first use. Concurrent callers wait for one build.
pub fn minbase_rootfs() -> Result<PathBuf> {
    rootfs_with(&[])
}

/// The minbase tree plus `python3-numpy` (about 280 MB; the cold-start benchmark's image).
pub fn numpy_rootfs() -> Result<PathBuf> {
    rootfs_with(&["python3-numpy"])
}

/// A cached minbase tree with `packages` installed too (`debian-bookworm-minbase+PKG+…`).
pub fn rootfs_with(packages: &[&str]) -> Result<PathBuf> {
    let cache = std::env::var_os("CLIP_TESTKIT_CACHE").map_or_else(
        || std::env::temp_dir().join("clip-testkit-cache"),
        PathBuf::from,
    );
    let mut name = "debian-bookworm-minbase".to_owned();
    for p in packages {
        name.push('+');
        name.push_str(p);
    }
    let done = cache.join(name);
    if done.join("etc/debian_version").exists() {
        return Ok(done);
    }
    if !have_program("debootstrap") {
        return Err(Error::MissingProgram {
            program: "debootstrap".into(),
        });
    }
    std::fs::create_dir_all(&cache).ctx(|| format!("creating {}", cache.display()))?;
    // One builder at a time: a lock directory, created atomically.
    let lock = cache.join("debian.lock");
    let start = std::time::Instant::now();
    while std::fs::create_dir(&lock).is_err() {
        if done.join("etc/debian_version").exists() {
            return Ok(done);
        }
        if start.elapsed() > std::time::Duration::from_mins(10) {
            let _ = std::fs::remove_dir(&lock);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let result = (|| {
        if done.join("etc/debian_version").exists() {
            return Ok(());
        }
        let tmp = cache.join(format!("debian-build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let mut cmd = Command::new("debootstrap");
        cmd.arg("--variant=minbase");
        if !packages.is_empty() {
            cmd.arg(format!("--include={}", packages.join(",")));
        }
        run(cmd.arg("bookworm").arg(&tmp).arg(mirror()))?;
        // Drop the downloaded packages: they are not part of an image's root filesystem.
        let debs = tmp.join("var/cache/apt/archives");
        if let Ok(entries) = std::fs::read_dir(&debs) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(&tmp, &done).ctx(|| format!("publishing {}", done.display()))
    })();
    let _ = std::fs::remove_dir(&lock);
    result.map(|()| done)
}

/// The tar stream GNU tar writes for `dir` (POSIX/PAX format with xattrs and numeric owners, as
/// image builders produce), sorted by name so it is reproducible.
pub fn gnu_tar(dir: &std::path::Path) -> Result<Vec<u8>> {
    let out = run(Command::new("tar")
        .args([
            "--format=posix",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
        ])
        .args(["--pax-option=delete=atime,delete=ctime", "-C"])
        .arg(dir)
        .args(["-cf", "-", "."]))?;
    Ok(out.stdout)
}
