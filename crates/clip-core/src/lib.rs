//! The embeddable facade and image service.
//!
//! # Model
//!
//! `clip-core` composes the capability crates into the three worker flows other Rust services embed:
//!
//! - **pull and archive** an image (v2: index straight from the source registry; v1: copy, extract,
//!   archive);
//! - **build and archive** (buildah bud → push to the build registry → index; any v2 problem falls
//!   back to v1);
//! - **pull lazy**: fetch an archive, detect v1/v2, mount it once per image, and give each container
//!   an overlay on top of the read-only mount.
//!
//! The flows are [`service::ImageService`]'s methods (one file each under `service/`), over an
//! [`service::ArchiveStore`] (a local directory or an S3 prefix) and one registry client and
//! runtime per service. Containers on a mount are [`container`]'s overlays and OCI bundles.
//! What every clip process on a node builds from the configuration the same way — the registry
//! client, the one span cache, index options, mounts with shared prefetch profiles, the
//! serve-until-signal loop — is [`node`]'s, used by the service, the CLI and the snapshotter.
//!
//! For embedding without the service: [`create_from_oci_image`] (the seed's
//! `CreateFromOCIImage`: index an image straight from its registry into a v2 archive), and the
//! capability crates re-exported as [`crate::format`], [`registry`], [`indexer`], [`archive`],
//! [`extract`], [`fs`], [`host`] and [`policy`] (the seed's `MountArchive` is [`fs::mount_archive`]).
//!
//! Start from `examples/embed_index_and_read.rs` (run by the test suite): index an image
//! straight from its registry, mount it lazily, read one file.
//!
//! ```no_run
//! let summary = clip_core::create_from_oci_image(&clip_core::CreateFromOciImageOptions {
//!     image_ref: "localhost:5000/app:latest".into(),
//!     output_path: "/images/app.clip".into(),
//!     ..Default::default()
//! })?;
//! println!("{} entries in {} bytes", summary.entries, summary.archive_bytes);
//! # Ok::<(), clip_core::Error>(())
//! ```

pub mod container;
pub mod locks;
pub mod node;
pub mod rfc3339;
pub mod service;

pub use clip_archive as archive;
pub use clip_extract as extract;
pub use clip_format as format;
pub use clip_fs as fs;
pub use clip_host as host;
pub use clip_indexer as indexer;
pub use clip_objstore as objstore;
pub use clip_policy as policy;
pub use clip_registry as registry;

use std::path::PathBuf;

/// What a program's `--version` prints: its own version, then the formats this build reads and
/// writes (derived from the format constants, so it cannot drift from them), then `extra`.
#[must_use]
pub fn version_line(program_version: &str, extra: &str) -> String {
    format!(
        "{program_version} (archive format {}, layer index format {}{extra})",
        format::FORMAT_VERSION,
        indexer::LAYER_INDEX_VERSION
    )
}

/// Options of [`create_from_oci_image`] (the seed's `CreateFromOCIImageOptions`).
#[derive(Clone, Default)]
pub struct CreateFromOciImageOptions {
    /// The image, e.g. `docker.io/library/ubuntu:24.04` or `localhost:5000/app:latest`.
    pub image_ref: String,
    /// Where to write the v2 archive.
    pub output_path: PathBuf,
    /// Registry credentials for the image's registry (`username`, `password`).
    pub auth_config: Option<(String, String)>,
    /// Hosts that may be reached over plain HTTP (loopback hosts always may).
    pub insecure_registries: Vec<String>,
    /// Platform to pick from a multi-platform image (`os/arch[/variant]`; default: this machine's).
    pub platform: Option<String>,
    /// Uncompressed MiB between checkpoints (default 4).
    pub checkpoint_mib: Option<u64>,
    /// Called once the image is resolved and after each layer.
    pub progress: Option<std::sync::Arc<indexer::ProgressFn<'static>>>,
}

impl std::fmt::Debug for CreateFromOciImageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateFromOciImageOptions")
            .field("image_ref", &self.image_ref)
            .field("output_path", &self.output_path)
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

/// Why a facade call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Indexing failed.
    #[error(transparent)]
    Index(#[from] indexer::Error),
    /// The registry client could not be set up, or a reference is invalid.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// An option is invalid.
    #[error("invalid option: {0}")]
    Option(String),
}

/// Creates an index-only (v2) archive straight from the image's registry: "Remote Registry →
/// Clip Index → Tiny .clip", with no local copy and no extraction. Blocking; call it from a
/// blocking-friendly thread (e.g. `tokio::task::spawn_blocking`) in async services.
pub fn create_from_oci_image(
    opts: &CreateFromOciImageOptions,
) -> Result<indexer::IndexSummary, Error> {
    let reference = registry::Reference::parse(&opts.image_ref)?;
    let mut cfg = registry::ClientConfig {
        insecure: opts.insecure_registries.clone(),
        ..Default::default()
    }
    .with_docker_config()?;
    if let Some((username, password)) = &opts.auth_config {
        cfg.credentials.push((
            reference.registry.clone(),
            registry::Credentials::Basic {
                username: username.clone(),
                password: password.clone(),
            },
        ));
    }
    let platform = match &opts.platform {
        Some(p) => Some(
            registry::oci::parse_platform(p)
                .ok_or_else(|| Error::Option(format!("platform {p:?} is not os/arch[/variant]")))?,
        ),
        None => None,
    };
    let client = registry::BlockingClient::new(cfg)?;
    let index_opts = indexer::IndexOptions {
        platform,
        checkpoint_bytes: opts.checkpoint_mib.unwrap_or(4).max(1) << 20,
        ..indexer::IndexOptions::default()
    };
    let input = indexer::Input::Registry {
        reference: &opts.image_ref,
        client: &client,
    };
    Ok(indexer::index(
        input,
        &opts.output_path,
        &index_opts,
        opts.progress.as_deref(),
    )?)
}
