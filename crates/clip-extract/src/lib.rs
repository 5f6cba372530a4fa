//! Archive → directory, safely.
//!
//! # Model
//!
//! [`extract`] restores an archive of any kind into a directory: v1 local (bytes from the data
//! section, each file checked against its sha256), v1 remote (the data object read once, in
//! order, from object storage) and v2 (each layer streamed once from the registry and checked
//! against its `diff_id`; layers indexed from a table of contents are read span by span, each
//! span verified). The archive is untrusted input: every path is resolved beneath the target
//! root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a hostile archive cannot
//! write outside it, and owners, modes (setuid/setgid/sticky included), xattrs and times are
//! applied last, directories after their contents.
//!
//! [`untar`] applies the same rules to an untrusted tar stream (a build context uploaded to the
//! worker), accepting only what a build context needs.
//!
//! Making archives is `clip-archive`; mounting them is `clip-fs`.
//!
//! ```no_run
//! let summary = clip_extract::extract("/tmp/app.clip".as_ref(), "/tmp/app".as_ref(), &clip_extract::ExtractOptions::default())?;
//! println!("{} entries, {} bytes", summary.entries, summary.bytes);
//! # Ok::<(), clip_extract::Error>(())
//! ```

mod dir;
mod untar;

pub use dir::{ExtractOptions, ExtractSummary, extract};
pub use untar::{UntarLimits, UntarSummary, untar};

use std::path::PathBuf;

/// Why an extraction failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The archive is invalid.
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
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] clip_registry::Error),
    /// A layer's bytes could not be decoded or verified.
    #[error("layer {layer}: {source}")]
    Layer {
        /// The layer's digest.
        layer: clip_format::Digest,
        /// What went wrong.
        #[source]
        source: clip_seekable::Error,
    },
    /// A sequential pass over a layer or data object failed.
    #[error(transparent)]
    Stream(#[from] clip_seekable::Error),
    /// Object storage failed.
    #[error(transparent)]
    Store(#[from] clip_objstore::Error),
    /// Bytes do not match their digest.
    #[error(transparent)]
    Digest(#[from] clip_format::DigestMismatch),
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
    /// The archive lacks what its kind needs (a source, a data object).
    #[error("{0}")]
    Unsupported(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
