//! The process that serves one lazy tree: `clip-snapshotter mount-server --archive A
//! --mountpoint M [--config F]`, started by the snapshotter in a process group of its own. It
//! reads registry settings and credentials from the same configuration file as the snapshotter
//! (never from its command line) — including `spanStore`, so a node's lazy trees read the spans
//! any worker or node of the fleet fetched, and share prefetch profiles through it — and
//! serves until the tree is unmounted or it is signalled. The mount itself is built like every
//! other clip mount on the node ([`clip_core::node::MountBuilder`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clip_core::node;

/// What to serve.
#[derive(Debug, Clone)]
pub struct MountServerArgs {
    /// The v2 archive.
    pub archive: PathBuf,
    /// Where.
    pub mountpoint: PathBuf,
    /// The snapshotter's configuration file.
    pub config: Option<PathBuf>,
}

/// Why a mount server could not serve.
#[derive(Debug, thiserror::Error)]
pub enum MountServerError {
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] clip_core::policy::Error),
    /// The registry client, the cache or the mount could not be made.
    #[error("mounting {}: {source}", mountpoint.display())]
    Node {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        source: node::NodeError,
    },
}

/// Mounts and serves until unmounted (then returns) or signalled (then unmounts).
pub fn serve(args: &MountServerArgs) -> Result<(), MountServerError> {
    let cfg = clip_core::policy::Config::load(args.config.as_deref())?;
    let node_err = |source| MountServerError::Node {
        mountpoint: args.mountpoint.clone(),
        source,
    };
    let net = node::registry_client(&cfg).map_err(node_err)?;
    let mut builder = node::MountBuilder::from_config(&cfg, &net);
    // With a span store, trees share prefetch profiles through it, by the archive's stem
    // (`<manifest hex>-<depth>`: the image and the depth).
    if let Some(store) = builder.options_mut().span_store.clone() {
        let name = args
            .archive
            .file_stem()
            .map_or_else(|| "tree".into(), |s| s.to_string_lossy().into_owned());
        let image = clip_core::format::Archive::open(&args.archive)
            .ok()
            .and_then(|a| {
                a.meta()
                    .source
                    .as_ref()
                    .map(|s| s.manifest_digest.to_string())
            })
            .unwrap_or_default();
        builder = builder.share_profiles(node::ProfileSharing {
            objects: Arc::new(node::SpanStoreProfiles::new(store, net.clone())),
            name,
            image,
            window: Duration::from_secs(cfg.profile_window_secs),
            record_dir: cfg.cache_dir.clone(),
        });
    }
    let mounted = builder
        .mount(&args.archive, &args.mountpoint)
        .map_err(node_err)?;
    let why = node::serve_until_signal(&mounted).map_err(node_err)?;
    let stats = mounted.stats();
    mounted.unmount().map_err(node_err)?;
    tracing::info!(mountpoint = %args.mountpoint.display(), why, served = stats.served_bytes, fetched = stats.fetched_bytes, "mount server stopped");
    Ok(())
}
