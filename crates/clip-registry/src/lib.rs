//! OCI distribution client.
//!
//! # Model
//!
//! Everything that touches a registry goes through this crate: parsing and normalising
//! [`Reference`]s like docker (`nginx` → `docker.io/library/nginx:latest`); authenticating
//! (anonymous, Basic, Bearer tokens from the `WWW-Authenticate` challenge, cached per host and
//! scope and refreshed a fifth of their lifetime *before* they expire, plus one re-authentication
//! on 401/403); resolving manifests and image indexes with platform selection; fetching small
//! documents and blobs with digest verification; streaming layer blobs; and exact byte-range reads
//! of blobs for the lazy read path (a 206 is checked against `Content-Range`, a 200 from a
//! registry that ignores `Range` is trimmed to the asked bytes).
//!
//! Requests share one connection pool and retry with exponential backoff and jitter on
//! connection errors, 5xx and 429 (honouring `Retry-After`) within a deadline. Loopback hosts
//! are reached over plain HTTP (as docker does) and so are hosts the caller marks insecure;
//! everything else uses HTTPS with the system roots plus an optional CA bundle. Errors are typed
//! and carry the host, repository, URL and digest, worded for a user.
//!
//! Credentials come from the configuration (per host, with `*` patterns), then from docker's
//! `config.json` (`auths`, `credsStore`, `credHelpers`; helpers run off the async runtime).
//!
//! At most `max_per_host` requests (bodies included) are in flight to one host.
//!
//! Pushing: blob existence checks, cross-repository mounts (the token asks for every scope the
//! challenge names), monolithic and chunked uploads, manifests and indexes, tag lists, and
//! [`Client::push_layout`] for OCI layouts as buildah writes them.
//!
//! Referrers ([`referrers`]): artifacts attached to a manifest (OCI 1.1 `subject`), attached
//! and found through the referrers API or, where a registry lacks it, the referrers tag schema.
//!
//! Redirects are followed by hand: credentials go only to the registry, and a blob's redirect
//! target (object storage) is reused for a minute, falling back to the registry when it stops
//! answering.
//!
//! Docker `identitytoken` credentials are OAuth2 refresh tokens, exchanged at the token realm
//! with the `refresh_token` grant (POST).
//!
//! ```no_run
//! # async fn f() -> Result<(), clip_registry::Error> {
//! use clip_registry::{Client, ClientConfig, Reference};
//! let client = Client::new(ClientConfig::default())?;
//! let image = client.resolve(&Reference::parse("127.0.0.1:5000/app:latest")?, None).await?;
//! let first = &image.manifest.layers()[0];
//! let digest = clip_registry::oci::digest(first)?;
//! let head = client.read_range(&image.reference, &digest, 0..512).await?;
//! assert_eq!(head.len(), 512.min(first.size() as usize));
//! # Ok(()) }
//! ```

mod auth;
mod blocking;
mod client;
pub mod dockerconfig;
mod layout;
pub mod mirrors;
pub mod oci;
mod pull;
mod push;
mod reference;
pub mod referrers;
mod transport;
pub mod trust;

pub use blocking::BlockingClient;
pub use client::{
    ACCEPT_MANIFESTS, Client, ClientConfig, Credentials, MAX_DOCUMENT, ResolvedImage, RetryPolicy,
    is_loopback,
};
pub use oci::Platform;
pub use pull::{BlobReader, PARALLEL_CHUNK, PARALLEL_MIN, PARALLEL_STREAMS, RANGE_READER_CHUNK};
pub use push::CHUNK;
pub use reference::{DOCKER_HUB, Reference};

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The reference cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// What was given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The registry could not be reached.
    #[error("registry {host} is not reachable ({reason})")]
    Unreachable {
        /// Host.
        host: String,
        /// Transport error.
        reason: String,
    },
    /// Credentials are missing or wrong. The one place the `docker login` hint is written.
    #[error(
        "unauthorized for {repository} on {host}: run `docker login {host}` or configure credentials for it (imageService.registries, --creds)"
    )]
    Unauthorized {
        /// Host.
        host: String,
        /// Repository.
        repository: String,
    },
    /// The manifest, blob or platform does not exist.
    #[error("{what} not found in {repository} on {host}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// Repository.
        repository: String,
        /// Host.
        host: String,
    },
    /// A non-distributable ("foreign") layer the registry does not hold. Its manifest names URLs
    /// outside the registry; clip reads layers only from the registry and its mirrors (as
    /// containerd does by default), so such a layer must be pushed with the image.
    #[error(
        "layer {digest} is non-distributable and {host} does not have it (its manifest points to {}); clip reads layers only from the registry and its mirrors: copy the image with its foreign layers included (e.g. skopeo copy, or a registry that accepts non-distributable artifacts)",
        urls.join(", ")
    )]
    ForeignLayer {
        /// The layer.
        digest: clip_format::Digest,
        /// The registry.
        host: String,
        /// The URLs the manifest names.
        urls: Vec<String>,
    },
    /// Bytes do not match their digest.
    #[error(transparent)]
    Digest(#[from] clip_format::DigestMismatch),
    /// A document names something clip cannot use (a digest algorithm, a media type).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A local file (an OCI layout being read or written) failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry answered something the protocol does not allow.
    #[error("unexpected answer from {url}: {reason}")]
    Protocol {
        /// URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The client configuration is invalid.
    #[error("invalid registry client configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether asking again later can succeed: the registry was unreachable, answered outside
    /// the protocol (a 5xx or 429 after the retries), or local I/O failed. A reference that
    /// does not parse, a refused credential, a missing image, content that fails its digest or
    /// a configuration error stay what they are.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. } | Self::Protocol { .. } | Self::Io { .. }
        )
    }

    fn transport(url: &str, e: &reqwest::Error) -> Self {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| {
                u.host_str().map(|h| match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_owned(),
                })
            })
            .unwrap_or_else(|| url.to_owned());
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            reason = format!("{reason}: {s}");
            src = s.source();
        }
        if e.is_connect() && reason.contains("Connection refused") {
            reason = "connection refused".into();
        }
        Self::Unreachable { host, reason }
    }
}
