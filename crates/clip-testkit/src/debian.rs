//! A real Debian root filesystem (debootstrap `minbase` of bookworm), built once per machine and
//! cached, for tests and benchmarks that need realistic content.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::process::{have_program, run};

/// The Debian mirror apt uses on this machine for bookworm `main` (the package registry CI can
/// reach), read the way apt reads its sources (see [`mirror_in`]); `deb.debian.org` if none.
#[must_use]
pub fn mirror() -> String {
    mirror_in(Path::new("/etc/apt")).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// One `deb` source as apt sees it: where, which suites, which components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// The archive's URI.
    pub uri: String,
    /// Suites (`bookworm`, `bookworm-updates`, …).
    pub suites: Vec<String>,
    /// Components (`main`, `contrib`, …).
    pub components: Vec<String>,
}

/// The first source under `etc_apt` (an `/etc/apt`-shaped directory) that serves Debian bookworm
/// `main`. Only the files apt itself reads count: `sources.list`, and in `sources.list.d` the
/// `*.list` files (one-line form) and `*.sources` files (deb822 form), in name order; files apt
/// ignores (`*.disabled-…`, `*.save`, `*.bak`) are skipped, and so are `deb-src` lines, stanzas
/// with `Enabled: no`, and the security archive (debootstrap cannot bootstrap from it).
#[must_use]
pub fn mirror_in(etc_apt: &Path) -> Option<String> {
    apt_sources(etc_apt).into_iter().find_map(|s| {
        let serves = s.suites.iter().any(|x| x == "bookworm")
            && s.components.iter().any(|c| c == "main")
            && !s.uri.contains("security");
        serves.then(|| s.uri.trim_end_matches('/').to_owned())
    })
}

/// Every binary (`deb`) source apt reads under `etc_apt`, in apt's order.
#[must_use]
pub fn apt_sources(etc_apt: &Path) -> Vec<AptSource> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(etc_apt.join("sources.list")) {
        out.extend(parse_one_line(&text));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files {
        let Some(name) = f.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // apt's own rule: only these two extensions, and names of [A-Za-z0-9_.-].
        let valid_name = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if !valid_name {
            continue;
        }
        let ext = f.extension().and_then(|e| e.to_str());
        if ext == Some("list") {
            out.extend(parse_one_line(&text));
        } else if ext == Some("sources") {
            out.extend(parse_deb822(&text));
        }
    }
    out
}

/// `deb [options] URI SUITE [COMPONENT…]` lines.
fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb") else {
            continue;
        };
        if !rest.starts_with([' ', '\t']) {
            continue; // deb-src, or not a source line
        }
        let mut rest = rest.trim_start();
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((_, after)) = opts.split_once(']') else {
                continue;
            };
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(AptSource {
            uri: uri.to_owned(),
            suites: vec![suite.to_owned()],
            components: words.map(str::to_owned).collect(),
        });
    }
    out
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Components:`, `Enabled:`), separated by blank
/// lines; fields may continue on lines that start with whitespace.
fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some((_, v)) = fields.last_mut() {
                    v.push(' ');
                    v.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let get = |k: &str| {
            fields
                .iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let enabled = get("enabled")
            .first()
            .is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        if !enabled || !get("types").iter().any(|t| t == "deb") {
            continue;
        }
        for uri in get("uris") {
            out.push(AptSource {
                uri,
                suites: get("suites"),
                components: get("components"),
            });
        }
    }
    out
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

/// A two-layer Debian image: the minbase tree as GNU tar packs it (layer 1, compressed as
/// `compression`), and `top` on it (layer 2) — the realistic image of the oracle tests.
pub fn layered_image(
    compression: crate::Compression,
    top: Vec<crate::Entry>,
) -> Result<crate::Image> {
    let tar = gnu_tar(&minbase_rootfs()?)?;
    Ok(crate::Image::new(vec![
        crate::Layer::from_tar(tar).compression(compression),
        crate::Layer::new(top),
    ]))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An `/etc/apt` as found on CI machines: disabled third-party entries first in name order,
    /// a security stanza before the main one, a deb-src line, and a disabled stanza.
    #[test]
    fn only_what_apt_reads_serves_as_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("sources.list.d");
        std::fs::create_dir_all(&d).unwrap();
        let write = |name: &str, text: &str| std::fs::write(d.join(name), text).unwrap();
        write(
            "a-nodesource.sources.disabled-by-farm",
            "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: bookworm\nComponents: main\n",
        );
        write(
            "b-google.list.disabled-by-farm",
            "deb https://packages.cloud.google.com/apt bookworm main\n",
        );
        write(
            "c-thirdparty.list",
            "deb-src http://src.example/debian bookworm main\ndeb [arch=amd64] https://vendor.example/apt stable main\n",
        );
        write(
            "d-off.sources",
            "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n",
        );
        write(
            "debian.sources",
            "Types: deb\n# a comment\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb deb-src\nURIs: http://mirror.example/debian/\nSuites: bookworm\n bookworm-updates\nComponents: main contrib\n",
        );
        assert_eq!(
            mirror_in(dir.path()).as_deref(),
            Some("http://mirror.example/debian")
        );
        let uris: Vec<String> = apt_sources(dir.path()).into_iter().map(|s| s.uri).collect();
        assert_eq!(
            uris,
            [
                "https://vendor.example/apt",
                "http://security.example/debian-security",
                "http://mirror.example/debian/"
            ]
        );
        // The one-line form in sources.list serves too, and comes first.
        std::fs::write(
            dir.path().join("sources.list"),
            "# comment\ndeb http://old.example/debian bookworm main # trailing\n",
        )
        .unwrap();
        assert_eq!(
            mirror_in(dir.path()).as_deref(),
            Some("http://old.example/debian")
        );
        // Nothing that serves bookworm main: no mirror (the caller falls back to deb.debian.org).
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(mirror_in(empty.path()), None);
    }
}
