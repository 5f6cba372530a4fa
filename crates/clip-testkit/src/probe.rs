//! Small static programs for tests that must observe what the kernel grants a process.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::process::run;

/// A statically linked program that prints its real and effective user ids (`ruid euid`),
/// compiled here with the system C compiler (`cc -static`; `scripts/setup` installs gcc and the
/// static C library). Static, so it runs in any image, with or without a libc of its own; set its
/// setuid bit to see whether a mount or a container honours it.
pub fn ids_program() -> Result<Vec<u8>> {
    let dir = tempfile::tempdir().ctx(|| "creating a temp dir".to_owned())?;
    let src = dir.path().join("ids.c");
    std::fs::write(
        &src,
        b"#include <stdio.h>\n#include <unistd.h>\nint main(void) { printf(\"%d %d\\n\", (int)getuid(), (int)geteuid()); return 0; }\n",
    )
    .ctx(|| format!("writing {}", src.display()))?;
    let out = dir.path().join("ids");
    run(Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src))?;
    std::fs::read(&out).ctx(|| format!("reading {}", out.display()))
}

/// Runs `program` as the unprivileged user 65534 (`nobody`) with no supplementary groups
/// (`setpriv`) and returns how it ended, whatever that was.
pub fn as_nobody(program: &Path, args: &[&str]) -> Result<std::process::Output> {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program)
        .args(args)
        .output()
        .ctx(|| "running setpriv".to_owned())
}

/// [`as_nobody`], returning its stdout, or the error it ended with.
pub fn run_as_nobody(program: &Path, args: &[&str]) -> Result<String> {
    let out = as_nobody(program, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::CommandFailed {
            command: format!("setpriv (as uid 65534) {}", program.display()),
            status: out.status,
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Checks that an unprivileged user (65534) can neither find `canary` in any file under `dirs`
/// nor enter them, and that nothing under them grants group or other permissions. Returns what
/// is wrong, one line per finding (empty when the host is private). Mount points under `dirs`
/// (their content is the image, served by FUSE) are not walked into.
#[must_use]
pub fn private_to_root(dirs: &[&Path], canary: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for d in dirs {
        match as_nobody(
            Path::new("/bin/grep"),
            &["-r", "-l", "-s", canary, &d.to_string_lossy()],
        ) {
            Ok(out) if !out.stdout.is_empty() => wrong.push(format!(
                "uid 65534 finds {canary:?} in: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            )),
            Ok(_) => {}
            Err(e) => wrong.push(format!("running grep as uid 65534: {e}")),
        }
        let mut stack = vec![d.to_path_buf()];
        while let Some(p) = stack.pop() {
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            // A mount point shows the mounted image's root; its parent is what protects it.
            let on_other_fs = p
                .parent()
                .and_then(|parent| std::fs::symlink_metadata(parent).ok())
                .is_some_and(|pm| pm.dev() != md.dev());
            if md.mode() & 0o077 != 0 && !md.file_type().is_symlink() && !on_other_fs {
                wrong.push(format!("{} has mode {:o}", p.display(), md.mode() & 0o7777));
            }
            if md.is_dir() && !on_other_fs {
                for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                    stack.push(e.path());
                }
            }
        }
    }
    wrong
}
