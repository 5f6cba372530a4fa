//! Tests that say when they did not run.
//!
//! A test that needs root, FUSE or a program asks [`require()`] first. Where something is
//! missing it prints one loud line (`SKIPPED <test>: needs …`) and returns `false`, and the
//! test returns. Under the project's own test run (`scripts/test` sets `CLIP_TEST_REQUIRE_ALL=1`)
//! and in CI (`CI` set), a missing need is a failure instead: a green run means every test ran.

use std::path::Path;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Running as root (devices, owners, mounts, runc).
    Root,
    /// `/dev/fuse`.
    Fuse,
    /// A program on `PATH`.
    Program(&'static str),
}

impl Need {
    fn met(self) -> bool {
        match self {
            Self::Root => crate::is_root(),
            Self::Fuse => Path::new("/dev/fuse").exists(),
            Self::Program(p) => crate::process::have_program(p),
        }
    }

    fn describe(self) -> String {
        match self {
            Self::Root => "root".into(),
            Self::Fuse => "/dev/fuse".into(),
            Self::Program(p) => format!("{p} on PATH"),
        }
    }
}

/// Root, FUSE: what mounting needs.
pub const MOUNT: &[Need] = &[Need::Root, Need::Fuse];

/// Whether every test must run (the project's test run, or CI).
#[must_use]
pub fn all_required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CLIP_TEST_REQUIRE_ALL") || set("CI")
}

/// Whether the machine has every one of `needs`. If not: prints why the calling test does not
/// run, or — when every test must run ([`all_required`]) — panics with it.
///
/// # Panics
/// When something is missing and every test must run.
#[must_use]
pub fn require(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs
        .iter()
        .filter(|n| !n.met())
        .map(|n| n.describe())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    let why = format!("{test}: needs {}", missing.join(", "));
    assert!(
        !all_required(),
        "{why} — this run requires every test to run (CLIP_TEST_REQUIRE_ALL or CI); scripts/setup installs what tests need"
    );
    #[allow(clippy::print_stderr)]
    {
        eprintln!("SKIPPED {why}");
    }
    false
}
