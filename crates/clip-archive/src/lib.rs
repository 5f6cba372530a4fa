//! v1 archives: data-carrying `.clip` files.
//!
//! # Model
//!
//! v1 is the default and the fallback whenever v2 cannot be used. Its archive holds the image's
//! merged root filesystem *with* every file's bytes and a sha256 per file, so it needs nothing
//! but itself (or its object) to be mounted or extracted. Three sources become one:
//!
//! - an **image** from a registry ([`archive_image`]: copied into a temporary OCI layout, layers
//!   in parallel, each verified) or an **OCI layout** directory ([`archive_layout`]): the merged
//!   tree comes from `clip-indexer`, the one implementation of the OCI layer merge, then one
//!   sequential, `diff_id`-verified pass per layer ([`clip_seekable::stream`]) copies the bytes
//!   of the files that survive the merge;
//! - a **root filesystem directory** ([`archive_rootfs`]), keeping modes incl.
//!   setuid/setgid/sticky, owners, nanosecond mtimes, xattrs, hard links, devices, fifos,
//!   sockets and symlinks.
//!
//! Memory stays bounded (only the tree is held), and the archive is published atomically. A
//! finished v1 archive may move to object storage ([`upload_v1`]): the data-carrying archive
//! becomes one object and a small v1-remote metadata archive points at it. The other direction,
//! archive → directory, is `clip-extract`.
//!
//! ```no_run
//! let summary = clip_archive::archive_rootfs("/var/lib/rootfs".as_ref(), "/tmp/rootfs.clip".as_ref(), &clip_format::Meta::default())?;
//! assert_eq!(summary.kind, clip_format::ArchiveKind::V1Local);
//! # Ok::<(), clip_archive::Error>(())
//! ```

mod image;
mod rootfs;
mod upload;

pub use image::{ImageArchiveSummary, archive_image, archive_layout};
pub use rootfs::{archive_rootfs, tree_of_dir};
pub use upload::{UploadSummary, upload_v1};

use std::path::PathBuf;

/// Why making a v1 archive failed.
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
    /// Reading the image (its layout, documents or layer tars) failed.
    #[error(transparent)]
    Index(#[from] clip_indexer::Error),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] clip_registry::Error),
    /// A layer's stream could not be decoded, or is not the one its descriptor names.
    #[error(transparent)]
    Layer(#[from] clip_seekable::Error),
    /// Object storage failed.
    #[error(transparent)]
    Store(#[from] clip_objstore::Error),
    /// The input is not something this operation takes.
    #[error("{0}")]
    Unsupported(String),
    /// An upload ended with an object of the wrong size.
    #[error("{url}: uploaded {sent} bytes but the object has {size}")]
    UploadSize {
        /// The object.
        url: String,
        /// Bytes sent.
        sent: u64,
        /// The object's size afterwards.
        size: u64,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
