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
//! Implemented: [`archive_layout`] and [`archive_image`] (image → v1 local archive: the merged
//! tree comes from `clip-indexer`, the one implementation of the OCI merge, then one sequential,
//! `diff_id`-verified pass per layer copies the surviving files' bytes), [`archive_rootfs`]
//! (directory → v1, keeping modes incl. setuid/setgid/sticky, owners, nanosecond mtimes, xattrs,
//! hard links, devices, fifos, sockets and symlinks) and [`extract`] (v1 local and v2 archives →
//! directory, every path resolved beneath the root), and [`remote`]: upload to object storage (S3 or
//! a local-filesystem store) behind a v1-remote metadata archive, and ranged reads back.
//!
//! ```no_run
//! let summary = clip_extract::archive_rootfs("/var/lib/rootfs".as_ref(), "/tmp/rootfs.clip".as_ref(), &clip_format::Meta::default())?;
//! assert_eq!(summary.kind, clip_format::ArchiveKind::V1Local);
//! # Ok::<(), clip_extract::Error>(())
//! ```

mod extract;
mod image;
mod layers;
pub mod remote;
mod rootfs;

pub use extract::{ExtractOptions, ExtractSummary, extract};
pub use image::{ImageArchiveSummary, archive_image, archive_layout};
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
    /// Reading the image failed.
    #[error(transparent)]
    Index(#[from] clip_indexer::Error),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] clip_registry::Error),
    /// A layer stream is not what its descriptor says.
    #[error("layer {layer}: {reason}")]
    Layer {
        /// The layer's digest.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// Bytes do not match their digest.
    #[error("{what}: expected {expected}, found {found}")]
    Digest {
        /// What was checked.
        what: String,
        /// The recorded digest.
        expected: String,
        /// The digest of what arrived.
        found: String,
    },
    /// An entry would be written outside the extraction root, or over something unexpected.
    #[error("refusing {path:?}: {reason}")]
    Unsafe {
        /// The entry's path inside the archive.
        path: String,
        /// Why.
        reason: String,
    },
    /// Creating device nodes needs root.
    #[error("{path:?} is a device node: extracting it needs root")]
    NeedsRoot {
        /// The entry's path.
        path: String,
    },
    /// Not supported by this build.
    #[error("{0}")]
    Unsupported(String),
    /// Object storage failed.
    #[error("{url}: {reason}")]
    Remote {
        /// The object's URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// A small runtime for the blocking entry points that talk to the network.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    clip_registry::blocking_runtime().map_err(|source| Error::Io {
        context: "starting the network runtime",
        path: PathBuf::new(),
        source,
    })
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
