//! Why a flow failed, and why a flow that asked for v2 made a v1 archive instead.

use std::path::PathBuf;

use crate::{archive, container, extract, format, fs, indexer, registry};

/// Why a flow failed. Every variant keeps its cause as `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] clip_policy::Error),
    /// Registry problem.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// v2 indexing failed.
    #[error(transparent)]
    Index(#[from] indexer::Error),
    /// Making a v1 archive failed.
    #[error(transparent)]
    Archive(#[from] archive::Error),
    /// Extracting an archive failed.
    #[error(transparent)]
    Extract(#[from] extract::Error),
    /// Mounting failed.
    #[error(transparent)]
    Mount(#[from] fs::Error),
    /// Building the node's client, caches or mounts from the configuration failed.
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    /// The archive is invalid.
    #[error(transparent)]
    Format(#[from] format::Error),
    /// The archive store (object storage) failed.
    #[error(transparent)]
    Store(#[from] clip_objstore::Error),
    /// An object from a shared store is not signed by a trusted key (or a key is unusable).
    #[error(transparent)]
    Untrusted(#[from] clip_objstore::signed::SignError),
    /// Preparing or running a container failed.
    #[error(transparent)]
    Container(#[from] container::ContainerError),
    /// A tool (buildah, runc) failed.
    #[error("{command} failed ({status}): {stderr}")]
    Tool {
        /// The command (never with secrets: credentials go through files).
        command: String,
        /// How it ended.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// A tool could not be started.
    #[error("running {program}: {source} (is it installed? scripts/setup installs it)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A directory clip keeps private state in is not safe to use (another owner, a symlink),
    /// or a file could not be published.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// No archive for this image id in the store.
    #[error("no archive for image {0} in the archive store")]
    UnknownImage(String),
    /// A local file or directory operation failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ServiceError {
    /// Whether the same flow can succeed if tried again later (an outage, a full disk, a store
    /// that did not answer), as opposed to an image or a configuration that will fail the same
    /// way every time.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Registry(e) | Self::Index(indexer::Error::Registry(e)) => e.is_transient(),
            Self::Index(indexer::Error::Io { .. })
            | Self::Store(_)
            | Self::Io { .. }
            | Self::Spawn { .. }
            | Self::Tool { .. } => true,
            _ => false,
        }
    }
}

/// An `io::Error` at `path` while doing `context`.
pub(crate) fn io(
    context: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> ServiceError {
    let path = path.into();
    move |source| ServiceError::Io {
        context,
        path,
        source,
    }
}

/// Why a flow that was to make a v2 archive made a v1 archive: builds (and pulls) never fail
/// because of v2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The build registry did not answer before the build (no push was tried).
    #[error(transparent)]
    RegistryDown(#[from] clip_policy::RegistryDown),
    /// Pushing the built image to the build registry failed.
    #[error("failed to push to registry {registry}: {source}")]
    PushFailed {
        /// The build registry.
        registry: String,
        /// Why.
        #[source]
        source: Box<ServiceError>,
    },
    /// Indexing the image failed.
    #[error("v2 indexing failed: {0}")]
    IndexFailed(#[source] indexer::Error),
}

impl FallbackReason {
    /// The metric label (`clip_fallbacks_total{reason=…}`).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RegistryDown(_) => "registry_unreachable",
            Self::PushFailed { .. } => "push_failed",
            Self::IndexFailed(_) => "index_failed",
        }
    }

    /// The seed's log lines for a fallback, written here only: "failed to push to registry"
    /// for a failed push, then "falling back to v1" with the reason.
    pub(crate) fn log(&self, image: &str) {
        if let Self::PushFailed { registry, source } = self {
            tracing::warn!(image, registry = %registry, error = %source, "failed to push to registry");
        }
        tracing::warn!(image, reason = %self, "falling back to v1");
    }
}
