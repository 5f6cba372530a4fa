//! Shared by the mount tests.
#![allow(clippy::print_stderr)]

use std::path::Path;

/// Whether this process can mount (root and `/dev/fuse`); sets up test logging once.
pub(crate) fn can_mount() -> bool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "clip_fs=warn".into()),
        )
        .with_test_writer()
        .try_init();
    if !clip_testkit::is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: mounting needs root and /dev/fuse");
        return false;
    }
    true
}
