//! The v1 path: data-carrying archives and safe extraction.
//!
//! # Model
//!
//! v1 is the default and the fallback whenever v2 cannot be used. An image (from a registry or an
//! OCI layout directory) or an existing root filesystem directory becomes a v1 archive holding every
//! file's bytes and a content digest per file, written in one streaming pass with bounded memory.
//! The archive may live locally or in object storage behind a small v1-remote metadata archive.
//! Extraction restores an archive of any kind into a directory, resolving every path beneath the
//! target root so a hostile archive cannot write outside it.
//!
//! Implemented so far: [`archive_rootfs`] (directory → v1 local archive), which keeps modes
//! (setuid/setgid/sticky included), owners, nanosecond mtimes, xattrs, hard links, devices, fifos,
//! sockets and symlinks. Image → v1, remote upload and extraction land with the v1 issue.
//!
//! ```no_run
//! let summary = clip_extract::archive_rootfs("/var/lib/rootfs".as_ref(), "/tmp/rootfs.clip".as_ref(), &clip_format::Meta::default())?;
//! assert_eq!(summary.kind, clip_format::ArchiveKind::V1Local);
//! # Ok::<(), clip_extract::Error>(())
//! ```

mod rootfs;

pub use rootfs::{archive_rootfs, tree_of_dir};

use std::path::PathBuf;

/// Why a v1 operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The archive format layer refused.
    #[error(transparent)]
    Format(#[from] clip_format::Error),
    /// A file system operation failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
