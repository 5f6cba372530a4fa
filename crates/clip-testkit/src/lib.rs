//! Test support for clip: real services, real images, and the oracle.
//!
//! # Model
//!
//! Every integration test in the project runs against the real thing, started here on loopback
//! with a random port and a temp directory, and stopped (with its files removed) on drop:
//!
//! - [`Registry`] — the CNCF distribution registry (`docker-registry serve`), anonymous, with
//!   htpasswd Basic auth, with Bearer tokens from the testkit's [`token`] server (configurable
//!   lifetime, so expiry is testable), and/or with TLS from a generated CA. It can be stopped and
//!   restarted on the same port to model an outage. [`ReferrersRegistry`] puts a front before one
//!   that speaks the OCI 1.1 referrers API (distribution 2.8 does not).
//! - [`Tap`] — a TCP forwarder that records whether each connection opened with TLS.
//! - [`S3`] — the `s3s-fs` S3 API server with random credentials.
//! - [`ImageBuilder`] — seeded, deterministic OCI and Docker images (every compression, every
//!   entry kind, every merge rule; see [`image::edge_cases`]) pushed to a [`Registry`] or written
//!   as an OCI layout.
//! - [`Buildah`] — real `buildah bud` / `buildah push`.
//! - [`Containerd`] — Debian's containerd 1.6 with its own root, state and sockets, optionally
//!   with a proxy snapshotter and its CRI plugin pointed at it.
//! - The oracle: [`oracle::oracle_unpack`] (`skopeo copy` + `umoci unpack`) and [`Snapshot::compare`],
//!   which reports every difference between two trees.
//!
//! A service's log goes to a file in its temp directory and is printed when a test panics. A
//! test that needs root, FUSE or a program says so with [`require()`]: it skips loudly, and fails
//! under `scripts/test` and CI, so a green run means every test ran.
//!
//! ```no_run
//! use clip_testkit::{Registry, ImageBuilder, ManifestFormat, image::{edge_cases, EdgeCaseOptions}};
//! let registry = Registry::start_anonymous()?;
//! let image = ImageBuilder::new(ManifestFormat::Oci).image(edge_cases(&EdgeCaseOptions::default())).build()?;
//! let pushed = registry.push(&image, "test/edge", "v1")?;
//! println!("{} is {}", pushed.reference, pushed.digest);
//! # Ok::<(), clip_testkit::Error>(())
//! ```

pub mod buildah;
pub mod containerd;
pub mod debian;
mod error;
pub mod estargz;
pub mod fake;
pub mod http;
pub mod image;
pub mod media;
pub mod oracle;
pub mod pki;
pub mod probe;
pub mod process;
pub mod referrers;
pub mod registry;
pub mod require;
pub mod s3;
pub mod snapshot;
pub mod tap;
pub mod token;
pub mod zstd_chunked;

pub use buildah::Buildah;
pub use containerd::{Containerd, ContainerdOptions};
pub use error::{Error, Result};
pub use fake::{FakeRegistry, FakeRequest, FakeResponse};
pub use image::{Compression, Entry, Image, ImageBuilder, Layer, ManifestFormat, SparseFormat};
pub use referrers::ReferrersRegistry;
pub use registry::{Auth, Registry, RegistryOptions};
pub use require::{MOUNT, Need, require};
pub use s3::S3;
pub use snapshot::{CompareOptions, Snapshot, assert_same};
pub use tap::Tap;

/// Whether the tests run as root (needed for devices, owners and FUSE).
#[must_use]
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A multi-threaded tokio runtime (two workers, I/O and timers) for tests that drive async
/// clients.
///
/// # Panics
/// When the runtime cannot be built (a test setup failure).
#[must_use]
pub fn runtime() -> tokio::runtime::Runtime {
    #[allow(clippy::expect_used)]
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
